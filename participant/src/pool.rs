//! Supervised pools of participant service instances (ractor).
//!
//! ```text
//!   consumer group "payment" (JetStream, shared by every node)
//!        │  pull loop (runner) ── Dispatch(job, fallback) ──▶ ServicePool "payment"
//!        │                                                        │ least-loaded live instance
//!        │                                         ┌──────────────┼──────────────┐
//!        │                                      instance 0     instance 1  …  instance K-1
//!        │                                         │ Run(job): do the work, reply, ack
//!        └──────────────────── redelivery ◀─ nak ──┘ (if the instance dies with the job)
//! ```
//!
//! **Restart policy (one-for-one, capped backoff).** When an instance fails (its handler
//! panicked), the pool naks every job that instance held — the one it was running and the ones
//! queued in its mailbox — so JetStream redelivers them at once (to any instance on any node),
//! then respawns that instance alone after `50ms × 2^(consecutive failures)`, capped at 5 s.
//! A job that completes resets the instance's failure count. Nothing the pool accepted is lost:
//! a job is either completed by an instance (which acks it itself) or nak'ed back.

use std::collections::HashMap;
use std::time::Duration;

use futures::future::BoxFuture;
use ractor::{Actor, ActorProcessingErr, ActorRef, RpcReplyPort, SupervisionEvent};

use crate::Returnable;

/// One unit of work for an instance: handle a command and ack it (or nak it) when done.
pub trait Job: Send + 'static {
    /// Does the work. A panic here fails the instance; the pool then naks the job.
    fn run(self: Box<Self>) -> BoxFuture<'static, ()>;
}

/// Pool supervisor (no data; see [`ServicePoolState`]).
#[derive(Debug, Default)]
pub struct ServicePool;

/// Arguments of [`ServicePool`].
#[derive(Debug, Clone)]
pub struct ServicePoolArgs {
    /// Service name (for logs).
    pub service: String,
    /// Instances to run.
    pub instances: usize,
}

/// Messages of [`ServicePool`].
pub enum ServicePoolMsg {
    /// Hand a job to an instance. `fallback` naks the message if the instance dies with it.
    Dispatch(Box<dyn Job>, Box<dyn Returnable>),
    /// An instance finished a job.
    Done {
        /// Instance slot.
        slot: usize,
        /// Job id.
        job: u64,
    },
    /// Respawn the instance in `slot` (scheduled after a failure).
    Respawn(usize),
    /// Counters, for tests and the admin API.
    Stats(RpcReplyPort<PoolStats>),
}

/// Pool counters.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct PoolStats {
    /// Instances currently alive.
    pub live: usize,
    /// Jobs dispatched since start.
    pub dispatched: u64,
    /// Jobs completed.
    pub completed: u64,
    /// Instance restarts after a failure.
    pub restarts: u64,
    /// Jobs nak'ed back because their instance died.
    pub returned: u64,
}

/// State of [`ServicePool`].
pub struct ServicePoolState {
    service: String,
    slots: Vec<Slot>,
    next_job: u64,
    stats: PoolStats,
}

struct Slot {
    actor: Option<ActorRef<InstanceMsg>>,
    held: HashMap<u64, Box<dyn Returnable>>,
    failures: u32,
}

const BASE_BACKOFF: Duration = Duration::from_millis(50);
const MAX_BACKOFF: Duration = Duration::from_secs(5);

/// Backoff before respawning an instance that failed `failures` times in a row.
pub fn restart_backoff(failures: u32) -> Duration {
    let factor = 1u32
        .checked_shl(failures.saturating_sub(1).min(16))
        .unwrap_or(u32::MAX);
    BASE_BACKOFF.saturating_mul(factor).min(MAX_BACKOFF)
}

impl Actor for ServicePool {
    type Msg = ServicePoolMsg;
    type State = ServicePoolState;
    type Arguments = ServicePoolArgs;

    async fn pre_start(
        &self,
        myself: ActorRef<Self::Msg>,
        args: Self::Arguments,
    ) -> Result<Self::State, ActorProcessingErr> {
        let mut state = ServicePoolState {
            service: args.service,
            slots: Vec::with_capacity(args.instances),
            next_job: 0,
            stats: PoolStats::default(),
        };
        for slot in 0..args.instances.max(1) {
            let actor = spawn_instance(&myself, slot).await?;
            state.slots.push(Slot {
                actor: Some(actor),
                held: HashMap::new(),
                failures: 0,
            });
        }
        state.stats.live = state.slots.len();
        Ok(state)
    }

    async fn handle(
        &self,
        myself: ActorRef<Self::Msg>,
        msg: Self::Msg,
        state: &mut Self::State,
    ) -> Result<(), ActorProcessingErr> {
        match msg {
            ServicePoolMsg::Dispatch(job, fallback) => {
                let target = state
                    .slots
                    .iter()
                    .enumerate()
                    .filter(|(_, s)| s.actor.is_some())
                    .min_by_key(|(_, s)| s.held.len())
                    .map(|(i, _)| i);
                let Some(slot) = target else {
                    // Every instance is restarting: give the message back rather than queue it here.
                    tokio::spawn(fallback.give_back(Duration::from_millis(200)));
                    return Ok(());
                };
                let id = state.next_job;
                state.next_job += 1;
                state.stats.dispatched += 1;
                let s = &mut state.slots[slot];
                s.held.insert(id, fallback);
                if let Some(actor) = &s.actor {
                    if let Err(e) = actor.cast(InstanceMsg::Run { id, job }) {
                        tracing::warn!(service = %state.service, slot, error = %e, "instance mailbox closed, returning job");
                        if let Some(d) = s.held.remove(&id) {
                            tokio::spawn(d.give_back(Duration::ZERO));
                        }
                    }
                }
            }
            ServicePoolMsg::Done { slot, job } => {
                if let Some(s) = state.slots.get_mut(slot) {
                    // Dropping the fallback does nothing: the instance acked the message itself.
                    s.held.remove(&job);
                    s.failures = 0;
                }
                state.stats.completed += 1;
            }
            ServicePoolMsg::Respawn(slot) => {
                if let Some(s) = state.slots.get_mut(slot) {
                    if s.actor.is_none() {
                        match spawn_instance(&myself, slot).await {
                            Ok(actor) => {
                                s.actor = Some(actor);
                                state.stats.live += 1;
                                tracing::info!(service = %state.service, slot, "instance restarted");
                            }
                            Err(e) => {
                                s.failures += 1;
                                let delay = restart_backoff(s.failures);
                                tracing::error!(service = %state.service, slot, error = %e, ?delay, "instance restart failed");
                                myself.send_after(delay, move || ServicePoolMsg::Respawn(slot));
                            }
                        }
                    }
                }
            }
            ServicePoolMsg::Stats(reply) => {
                let _ = reply.send(state.stats);
            }
        }
        Ok(())
    }

    async fn handle_supervisor_evt(
        &self,
        myself: ActorRef<Self::Msg>,
        event: SupervisionEvent,
        state: &mut Self::State,
    ) -> Result<(), ActorProcessingErr> {
        let (cell, failure) = match event {
            SupervisionEvent::ActorFailed(cell, err) => (cell, Some(err.to_string())),
            SupervisionEvent::ActorTerminated(cell, _, _) => (cell, None),
            _ => return Ok(()),
        };
        let id = cell.get_id();
        let Some(slot) = state
            .slots
            .iter()
            .position(|s| s.actor.as_ref().is_some_and(|a| a.get_id() == id))
        else {
            return Ok(());
        };
        let s = &mut state.slots[slot];
        s.actor = None;
        state.stats.live = state.stats.live.saturating_sub(1);
        let returned = s.held.len();
        for (_, delivery) in s.held.drain() {
            tokio::spawn(delivery.give_back(Duration::ZERO));
        }
        state.stats.returned += returned as u64;
        s.failures += 1;
        state.stats.restarts += 1;
        let delay = restart_backoff(s.failures);
        tracing::warn!(
            service = %state.service, slot, returned, ?delay,
            reason = failure.as_deref().unwrap_or("stopped"),
            "service instance died, returning its jobs and restarting it"
        );
        myself.send_after(delay, move || ServicePoolMsg::Respawn(slot));
        Ok(())
    }

    async fn post_stop(
        &self,
        _myself: ActorRef<Self::Msg>,
        state: &mut Self::State,
    ) -> Result<(), ActorProcessingErr> {
        // Best effort on a graceful stop: return whatever is still held. (On a crash the
        // messages come back after the consumer's ack_wait anyway.)
        for s in &mut state.slots {
            for (_, d) in s.held.drain() {
                d.give_back(Duration::ZERO).await;
            }
        }
        Ok(())
    }
}

async fn spawn_instance(
    pool: &ActorRef<ServicePoolMsg>,
    slot: usize,
) -> Result<ActorRef<InstanceMsg>, ActorProcessingErr> {
    let (actor, _) = Actor::spawn_linked(
        None,
        ServiceInstance,
        InstanceArgs {
            pool: pool.clone(),
            slot,
        },
        pool.get_cell(),
    )
    .await?;
    Ok(actor)
}

/// One participant instance: runs its jobs one at a time.
#[derive(Debug, Default)]
pub struct ServiceInstance;

/// Arguments of [`ServiceInstance`].
pub struct InstanceArgs {
    pool: ActorRef<ServicePoolMsg>,
    slot: usize,
}

/// Messages of [`ServiceInstance`].
pub enum InstanceMsg {
    /// Run this job.
    Run {
        /// Job id (for `Done`).
        id: u64,
        /// The job.
        job: Box<dyn Job>,
    },
}

impl Actor for ServiceInstance {
    type Msg = InstanceMsg;
    type State = InstanceArgs;
    type Arguments = InstanceArgs;

    async fn pre_start(
        &self,
        _myself: ActorRef<Self::Msg>,
        args: Self::Arguments,
    ) -> Result<Self::State, ActorProcessingErr> {
        Ok(args)
    }

    async fn handle(
        &self,
        _myself: ActorRef<Self::Msg>,
        msg: Self::Msg,
        state: &mut Self::State,
    ) -> Result<(), ActorProcessingErr> {
        let InstanceMsg::Run { id, job } = msg;
        job.run().await;
        state.pool.cast(ServicePoolMsg::Done {
            slot: state.slot,
            job: id,
        })?;
        Ok(())
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use std::sync::atomic::{AtomicU64, Ordering};
    use std::sync::Arc;

    use tokio::sync::Mutex;

    use super::*;

    #[derive(Default)]
    struct Log {
        acked: Mutex<Vec<u64>>,
        naked: Mutex<Vec<u64>>,
    }

    struct TestDelivery(u64, Arc<Log>);

    impl TestDelivery {
        async fn ack(self: Box<Self>) {
            self.1.acked.lock().await.push(self.0);
        }
    }

    impl Returnable for TestDelivery {
        fn give_back(self: Box<Self>, _delay: Duration) -> BoxFuture<'static, ()> {
            Box::pin(async move { self.1.naked.lock().await.push(self.0) })
        }
    }

    struct TestJob {
        n: u64,
        panic: bool,
        log: Arc<Log>,
        runs: Arc<AtomicU64>,
    }

    impl Job for TestJob {
        fn run(self: Box<Self>) -> BoxFuture<'static, ()> {
            Box::pin(async move {
                self.runs.fetch_add(1, Ordering::SeqCst);
                assert!(!self.panic, "injected handler panic for job {}", self.n);
                Box::new(TestDelivery(self.n, self.log.clone())).ack().await;
            })
        }
    }

    #[test]
    fn backoff_grows_and_caps() {
        assert_eq!(restart_backoff(1), Duration::from_millis(50));
        assert_eq!(restart_backoff(2), Duration::from_millis(100));
        assert_eq!(restart_backoff(4), Duration::from_millis(400));
        assert_eq!(restart_backoff(30), MAX_BACKOFF);
    }

    #[tokio::test]
    async fn a_panicking_job_is_returned_and_the_instance_restarts() {
        let log = Arc::new(Log::default());
        let runs = Arc::new(AtomicU64::new(0));
        let (pool, handle) = Actor::spawn(
            None,
            ServicePool,
            ServicePoolArgs {
                service: "t".into(),
                instances: 2,
            },
        )
        .await
        .unwrap();
        for n in 0..20u64 {
            let job = TestJob {
                n,
                panic: n == 7,
                log: log.clone(),
                runs: runs.clone(),
            };
            pool.cast(ServicePoolMsg::Dispatch(
                Box::new(job),
                Box::new(TestDelivery(n, log.clone())),
            ))
            .unwrap();
        }
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        loop {
            let stats = ractor::call!(pool, ServicePoolMsg::Stats).unwrap();
            let acked: std::collections::BTreeSet<u64> =
                log.acked.lock().await.iter().copied().collect();
            let naked: std::collections::BTreeSet<u64> =
                log.naked.lock().await.iter().copied().collect();
            // Every job is either done (acked) or returned (nak'ed). A nak can also reach a job
            // the dead instance had finished just before (its Done still queued): JetStream
            // ignores a nak after an ack, so that is harmless.
            let accounted = acked.union(&naked).count();
            if stats.restarts == 1 && stats.live == 2 && accounted == 20 {
                assert!(naked.contains(&7), "the job that panicked must be returned");
                assert!(!acked.contains(&7), "the job that panicked was never done");
                break;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "pool did not recover: {stats:?}, acked {acked:?}, naked {naked:?}"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        pool.stop(None);
        handle.await.unwrap();
    }
}
