//! Fencing: a node that may no longer own its partitions writes nothing.
//!
//! The other nodes judge this one dead once its heartbeat entry has not changed for
//! `cluster.node_ttl` (see [`crate::cluster`]) and then take its partitions over. A node that
//! was paused (SIGSTOP, a VM freeze, a long GC-like stall) or cut off from NATS for that long
//! does not know it yet when it resumes: its actors still hold events and would write
//! snapshots and publish commands for sagas that now belong to another node.
//!
//! So every write of the node's saga actors (snapshot saves, command and status publishes)
//! first asks the [`Fence`]:
//!
//! - each heartbeat keeps the node *alive until* the moment it was sent plus `node_ttl` minus
//!   one `heartbeat_interval` (a margin), measured on this process's monotonic clock, which
//!   keeps running while the process is stopped: before any other node can see the heartbeat
//!   as expired, this node has stopped writing;
//! - a heartbeat sent after that moment (the node was paused or cut off past it) *suspends*
//!   the node: writes stay refused, even though the new heartbeat makes it alive again, until a
//!   membership round that started after the suspension has read every lease again and
//!   dropped the partitions taken over meanwhile.
//!
//! A refused write fails like an unavailable store (the event goes back to JetStream and is
//! retried, bounded) and is counted in `sagaflow_fenced_writes_total`. Snapshot writes are
//! also compare-and-set on the revision, so even a write that slipped between the check and
//! the server cannot overwrite a newer snapshot.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use prometheus_client::metrics::counter::Counter;
use sagaflow_actors::definition::SagaDefinition;
use sagaflow_actors::machine::{CommandSpec, Saga};
use sagaflow_actors::ports::{CommandBus, Error, StateStore};

/// Whether this node may write as the owner of its partitions (see the module doc).
#[derive(Debug)]
pub struct Fence {
    origin: Instant,
    /// Milliseconds since `origin` until which the last heartbeat keeps the node alive.
    alive_until: AtomicU64,
    /// A heartbeat came too late; cleared by the next complete membership round.
    suspended: AtomicBool,
    /// Suspensions so far (a round clears only those it started after).
    suspensions: AtomicU64,
    refused: Counter,
}

impl Fence {
    /// A fence that refuses everything until the first heartbeat; `refused` counts refusals.
    pub fn new(refused: Counter) -> Self {
        Fence {
            origin: Instant::now(),
            alive_until: AtomicU64::new(0),
            suspended: AtomicBool::new(false),
            suspensions: AtomicU64::new(0),
            refused,
        }
    }

    /// A fence that never refuses (nodes without membership, tests).
    pub fn open() -> Arc<Self> {
        let fence = Fence::new(Counter::default());
        fence.alive_until.store(u64::MAX, Ordering::SeqCst);
        Arc::new(fence)
    }

    /// Milliseconds since the fence was made, on the monotonic clock.
    pub fn now(&self) -> u64 {
        u64::try_from(self.origin.elapsed().as_millis()).unwrap_or(u64::MAX)
    }

    /// A heartbeat sent at `sent` ([`Fence::now`] before the write) was stored: the node is
    /// alive until `sent + ttl - margin`. If it was sent after the previous validity ran out,
    /// the node is suspended until the next membership round.
    pub fn heartbeat_stored(&self, sent: u64, ttl: Duration, margin: Duration) {
        let valid = ttl.saturating_sub(margin);
        let valid = u64::try_from(valid.as_millis()).unwrap_or(u64::MAX);
        let previous = self.alive_until.load(Ordering::SeqCst);
        if previous != 0 && sent > previous {
            self.suspensions.fetch_add(1, Ordering::SeqCst);
            self.suspended.store(true, Ordering::SeqCst);
            tracing::warn!(
                late_ms = sent - previous,
                "this node's heartbeat lapsed (paused or cut off): its writes are refused until the partition leases are checked again"
            );
        }
        self.alive_until
            .fetch_max(sent.saturating_add(valid), Ordering::SeqCst);
    }

    /// How many suspensions there were so far: a membership round takes this at its start
    /// and passes it to [`Fence::round_done`].
    pub fn suspensions(&self) -> u64 {
        self.suspensions.load(Ordering::SeqCst)
    }

    /// A membership round that started when [`Fence::suspensions`] was `seen` has checked
    /// every lease: lifts a suspension that began before it.
    pub fn round_done(&self, seen: u64) {
        if self.suspensions() == seen && self.suspended.swap(false, Ordering::SeqCst) {
            tracing::info!("partition leases checked again: this node writes again");
        }
    }

    /// `Ok` if the node may write now; otherwise counts the refusal and says why.
    pub fn check(&self, what: &'static str) -> Result<(), Error> {
        let why = if self.suspended.load(Ordering::SeqCst) {
            "its heartbeat lapsed and its partition leases have not been checked again since"
        } else if self.alive_until.load(Ordering::SeqCst) == 0 {
            "it has not written a heartbeat yet"
        } else if self.now() > self.alive_until.load(Ordering::SeqCst) {
            "its last heartbeat may have expired for the other nodes"
        } else {
            return Ok(());
        };
        self.refused.inc();
        Err(Error::Transport {
            operation: what,
            message: format!("refused by this node's fence: {why}"),
        })
    }
}

/// A [`StateStore`] whose writes pass the [`Fence`] first.
pub struct FencedStore<S> {
    /// The store.
    pub inner: S,
    /// The fence.
    pub fence: Arc<Fence>,
}

#[async_trait]
impl<S: StateStore> StateStore for FencedStore<S> {
    async fn load(&self, saga_id: &str) -> Result<Option<(Saga, u64)>, Error> {
        self.inner.load(saga_id).await
    }

    async fn save(&self, saga: &Saga, expected: Option<u64>) -> Result<u64, Error> {
        self.fence.check("save snapshot")?;
        self.inner.save(saga, expected).await
    }
}

/// A [`CommandBus`] whose publishes pass the [`Fence`] first.
pub struct FencedBus<B> {
    /// The bus.
    pub inner: B,
    /// The fence.
    pub fence: Arc<Fence>,
}

#[async_trait]
impl<B: CommandBus> CommandBus for FencedBus<B> {
    async fn send(
        &self,
        def: &SagaDefinition,
        saga: &Saga,
        commands: &[CommandSpec],
    ) -> Result<(), Error> {
        self.fence.check("publish commands")?;
        self.inner.send(def, saga, commands).await
    }

    async fn announce(
        &self,
        saga: &Saga,
        from: &str,
        to: &str,
        sequence: u64,
    ) -> Result<(), Error> {
        self.fence.check("announce status")?;
        self.inner.announce(saga, from, to, sequence).await
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    const TTL: Duration = Duration::from_secs(5);
    const MARGIN: Duration = Duration::from_secs(1);

    #[test]
    fn writes_wait_for_the_first_heartbeat_and_stop_when_it_lapses() {
        let refused = Counter::default();
        let fence = Fence::new(refused.clone());
        assert!(fence.check("x").is_err(), "no heartbeat yet");
        fence.heartbeat_stored(fence.now(), TTL, MARGIN);
        assert!(fence.check("x").is_ok());
        // A heartbeat long ago: valid for ttl - margin after it was sent, then no more.
        let fence = Fence::new(refused.clone());
        fence.heartbeat_stored(0, Duration::from_millis(2), Duration::ZERO);
        std::thread::sleep(Duration::from_millis(5));
        let err = fence.check("save snapshot").unwrap_err().to_string();
        assert!(err.contains("may have expired"), "{err}");
        assert_eq!(refused.get(), 2, "both refusals counted");
    }

    #[test]
    fn a_late_heartbeat_suspends_until_a_round_that_started_after_it() {
        let fence = Fence::new(Counter::default());
        fence.heartbeat_stored(0, TTL, MARGIN);
        let before = fence.suspensions();
        // Paused past the validity (4 s), then the next heartbeat goes out.
        fence.heartbeat_stored(10_000, TTL, MARGIN);
        assert!(fence.check("x").is_err(), "suspended though alive again");
        // A round that began before the suspension does not lift it...
        fence.round_done(before);
        assert!(fence.check("x").is_err());
        // ...one that began after it does.
        let seen = fence.suspensions();
        fence.round_done(seen);
        // (the monotonic clock of this test is near 0: alive until 14 s)
        assert!(fence.check("x").is_ok());
        // On-time heartbeats never suspend.
        fence.heartbeat_stored(11_000, TTL, MARGIN);
        fence.heartbeat_stored(12_000, TTL, MARGIN);
        assert!(fence.check("x").is_ok());
        assert!(Fence::open().check("x").is_ok());
    }
}
