//! Cluster membership and partition ownership, over two KV buckets.
//!
//! Each node heartbeats into `sagaflow_nodes` (entries expire after `cluster.node_ttl`), and
//! every `cluster.heartbeat_interval` reconciles each partition's lease in
//! `sagaflow_partitions` with the assignment over the live nodes (rendezvous hashing with
//! bounded loads, [`sagaflow_actors::cluster`]). The protocol, with a sequence diagram, is in
//! `docs/cluster.md`.
//!
//! A partition is consumed only between a successful lease acquisition and its release.
//! Releasing drains first: stop pulling (the batch already pulled is still handed over),
//! wait for its in-flight events to be acked, stop its saga actors, then write the lease free.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use async_nats::jetstream::{self, kv};
use futures::StreamExt;
use ractor::ActorRef;
use sagaflow_actors::cluster::{assignment, next_step, Lease, LeaseStep};
use sagaflow_actors::coordinator::CoordinatorMsg;
use sagaflow_actors::ports::Observer;
use serde::{Deserialize, Serialize};
use tokio::sync::RwLock;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::admission::Admission;
use crate::clock::now_ms;
use crate::config::{NodeConfig, MAX_PARTITIONS};
use crate::topology;

/// Why a membership round failed (it is retried at the next heartbeat interval).
#[derive(Debug, thiserror::Error)]
pub enum MembershipError {
    /// A read or write of the nodes or leases bucket failed.
    #[error("cannot {what}")]
    Kv {
        /// What was being done.
        what: &'static str,
        /// The bucket's error.
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    /// A stored lease does not decode (or a lease does not encode).
    #[error("lease p{partition} unreadable")]
    Unreadable {
        /// Its partition.
        partition: u32,
        /// Why.
        #[source]
        source: serde_json::Error,
    },
}

/// Membership heartbeats.
pub const NODES_BUCKET: &str = "sagaflow_nodes";
/// Partition leases.
pub const PARTITIONS_BUCKET: &str = "sagaflow_partitions";

/// What a node says about itself in its heartbeat.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeInfo {
    /// Node id.
    pub node_id: String,
    /// Its gRPC address.
    pub grpc_addr: String,
    /// When it started (unix ms).
    pub started_at: i64,
    /// When it wrote this heartbeat (unix ms).
    pub heartbeat_at: i64,
    /// Partitions it consumes.
    pub partitions: Vec<u32>,
    /// Its admission control's pressure when it wrote this heartbeat, in thousandths (see
    /// [`crate::admission`]): other nodes refuse new sagas for its partitions while it is
    /// above their limit. Absent in heartbeats of older nodes (0).
    #[serde(default)]
    pub pressure_permille: u32,
}

impl ClusterView {
    /// The admission pressure last reported by the owner of `partition` (0 when unknown).
    pub fn owner_pressure(&self, partition: u32) -> f64 {
        self.leases
            .get(&partition)
            .and_then(|l| l.owner.as_ref())
            .and_then(|owner| self.nodes.get(owner))
            .map_or(0.0, |n| f64::from(n.pressure_permille) / 1000.0)
    }
}

/// The cluster as one node sees it, for the admin API.
#[derive(Debug, Clone, Default)]
pub struct ClusterView {
    /// Live nodes by id.
    pub nodes: BTreeMap<String, NodeInfo>,
    /// Stored lease per partition, with the event consumer's pending count when known.
    pub leases: BTreeMap<u32, Lease>,
}

/// A shared, updatable [`ClusterView`].
pub type SharedView = Arc<RwLock<ClusterView>>;

/// Opens (creating if needed) the membership and lease buckets.
pub async fn ensure_buckets(
    js: &jetstream::Context,
    cfg: &NodeConfig,
) -> Result<(kv::Store, kv::Store), topology::Error> {
    let nodes = topology::ensure_bucket(
        js,
        kv::Config {
            bucket: NODES_BUCKET.to_string(),
            description: "node membership heartbeats (entries expire after the node ttl)"
                .to_string(),
            history: 1,
            max_age: cfg.cluster.node_ttl,
            storage: jetstream::stream::StorageType::File,
            num_replicas: cfg.streams.replicas,
            ..Default::default()
        },
    )
    .await?;
    let leases = topology::ensure_bucket(
        js,
        kv::Config {
            bucket: PARTITIONS_BUCKET.to_string(),
            description: "partition leases: owner and epoch, compare-and-set".to_string(),
            history: 1,
            storage: jetstream::stream::StorageType::File,
            num_replicas: cfg.streams.replicas,
            ..Default::default()
        },
    )
    .await?;
    Ok((nodes, leases))
}

fn lease_key(p: u32) -> String {
    format!("p{p}")
}

/// Key of the deployment's partition count in the lease bucket.
pub const PARTITION_COUNT_KEY: &str = "count";

/// Why [`check_partition_count`] did not pass.
#[derive(Debug)]
pub enum CountCheck {
    /// The node is configured with another count than the deployment's: it must not start.
    Mismatch(String),
    /// NATS did not answer: try again.
    Unavailable(String),
}

/// The partition count this node must use: the deployment's. A new deployment records
/// `partitions` the first time. In an existing one, a node whose `partitions` was `set` must
/// have the deployment's count, and one that took the default adopts the deployment's.
///
/// A saga's partition is hash(saga id) mod `partitions`, and its snapshot key and event subject
/// carry it: a node that counted differently would place sagas where their owners do not look.
/// The count is kept under [`PARTITION_COUNT_KEY`]. A deployment from before the key existed
/// has leases `p0`…`p<N-1>`, which give its count.
pub async fn check_partition_count(
    leases: &kv::Store,
    partitions: u32,
    set: bool,
) -> Result<u32, CountCheck> {
    let unavailable = |e: &dyn std::fmt::Display| CountCheck::Unavailable(e.to_string());
    let mismatch = |deployment: u32, from: &str| {
        CountCheck::Mismatch(format!(
            "this node is configured with `partitions = {partitions}`, but the deployment on this \
             NATS has {deployment} partitions ({from}); every node must use the deployment's \
             count, which is fixed once sagas have started (set `partitions = {deployment}` or \
             SAGAFLOW_PARTITIONS={deployment})"
        ))
    };
    loop {
        if let Some(v) = leases
            .get(PARTITION_COUNT_KEY)
            .await
            .map_err(|e| unavailable(&e))?
        {
            let recorded = std::str::from_utf8(&v)
                .ok()
                .and_then(|s| s.trim().parse::<u32>().ok());
            return match recorded {
                Some(n) if n == partitions || (!set && (1..=MAX_PARTITIONS).contains(&n)) => Ok(n),
                Some(n) => Err(mismatch(
                    n,
                    &format!("key `{PARTITION_COUNT_KEY}` of bucket `{PARTITIONS_BUCKET}`"),
                )),
                None => Err(CountCheck::Mismatch(format!(
                    "key `{PARTITION_COUNT_KEY}` of bucket `{PARTITIONS_BUCKET}` does not hold a partition count: {:?}",
                    String::from_utf8_lossy(&v)
                ))),
            };
        }
        // Not recorded yet: a deployment from before the key has its leases to go by.
        let mut keys = leases.keys().await.map_err(|e| unavailable(&e))?;
        let mut highest: Option<u32> = None;
        while let Some(k) = keys.next().await {
            let k = k.map_err(|e| unavailable(&e))?;
            if let Some(p) = k.strip_prefix('p').and_then(|p| p.parse::<u32>().ok()) {
                highest = highest.max(Some(p));
            }
        }
        let mut count = partitions;
        if let Some(h) = highest {
            if !set && h < MAX_PARTITIONS {
                // Adopted, and recorded below for the nodes that come after.
                count = h + 1;
            } else if h + 1 != partitions {
                return Err(mismatch(
                    h + 1,
                    &format!("its leases go up to `p{h}` in bucket `{PARTITIONS_BUCKET}`"),
                ));
            }
        }
        match leases
            .create(PARTITION_COUNT_KEY, count.to_string().into())
            .await
        {
            Ok(_) => return Ok(count),
            // Another node recorded it first: compare with its value.
            Err(e) if e.kind() == kv::CreateErrorKind::AlreadyExists => continue,
            Err(e) => return Err(unavailable(&e)),
        }
    }
}

/// One partition this node consumes.
struct Held {
    epoch: u64,
    stop: CancellationToken,
    task: JoinHandle<()>,
    in_flight: Arc<AtomicUsize>,
}

/// The membership and lease reconciler of one node.
pub struct Membership {
    js: jetstream::Context,
    nodes: kv::Store,
    leases: kv::Store,
    cfg: NodeConfig,
    grpc_addr: String,
    started_at: i64,
    coordinator: ActorRef<CoordinatorMsg>,
    held: HashMap<u32, Held>,
    /// The partitions consumed, as the heartbeat task reports them.
    held_list: Arc<std::sync::Mutex<Vec<u32>>>,
    view: SharedView,
    admission: Arc<Admission>,
    /// Told about refused events (metrics).
    observer: Arc<dyn Observer>,
    /// The live members of the last round.
    members: BTreeMap<String, NodeInfo>,
    /// This node's fence: kept open by its heartbeats, re-opened by a round after a lapse.
    fence: Arc<crate::fence::Fence>,
    /// This node's view of the cluster's time, kept by its heartbeats.
    clock: Arc<crate::clock::ClusterClock>,
    /// Per node: the revision of its heartbeat entry last read, and when (this process's
    /// monotonic clock) that revision was first seen.
    seen: HashMap<String, (u64, std::time::Instant)>,
    /// The live nodes (this one included) of the last round, to notice departures.
    last_live: Option<BTreeSet<String>>,
}

impl Membership {
    /// A reconciler for this node; `admission` gives its pressure (heartbeats) and `observer`
    /// counts refused events.
    pub fn new(
        js: jetstream::Context,
        (nodes, leases): (kv::Store, kv::Store),
        cfg: NodeConfig,
        grpc_addr: String,
        coordinator: ActorRef<CoordinatorMsg>,
        view: SharedView,
        (admission, observer): (Arc<Admission>, Arc<dyn Observer>),
    ) -> Self {
        Membership {
            js,
            nodes,
            leases,
            cfg,
            grpc_addr,
            started_at: now_ms(),
            coordinator,
            held: HashMap::new(),
            held_list: Arc::default(),
            view,
            admission,
            observer,
            members: BTreeMap::new(),
            seen: HashMap::new(),
            last_live: None,
            fence: crate::fence::Fence::open(),
            clock: Arc::default(),
        }
    }

    /// Keeps `fence` (the one the node's saga actors write through) with this node's
    /// heartbeats and rounds; without it, the fence is [`Fence::open`](crate::fence::Fence::open).
    pub fn with_fence(mut self, fence: Arc<crate::fence::Fence>) -> Self {
        self.fence = fence;
        self
    }

    /// Keeps `clock` (the node's cluster clock) estimated from this node's heartbeats.
    pub fn with_clock(mut self, clock: Arc<crate::clock::ClusterClock>) -> Self {
        self.clock = clock;
        self
    }

    /// The partitions this node consumes, updated after every reconciliation round.
    pub fn held_partitions(&self) -> Arc<std::sync::Mutex<Vec<u32>>> {
        self.held_list.clone()
    }

    /// Heartbeats and reconciles until `cancel`, then hands every partition back and leaves.
    pub async fn run(mut self, cancel: CancellationToken) {
        // Heartbeats run on their own task, so a slow reconciliation round (a loaded machine,
        // a NATS leader election) never makes this node look dead to the others.
        let beating = CancellationToken::new();
        let (first_beat, first_beat_done) = tokio::sync::oneshot::channel();
        let heartbeats = tokio::spawn(heartbeat_loop(
            Heartbeat {
                nodes: self.nodes.clone(),
                cfg: self.cfg.clone(),
                grpc_addr: self.grpc_addr.clone(),
                started_at: self.started_at,
                held: self.held_list.clone(),
                admission: self.admission.clone(),
                fence: self.fence.clone(),
                clock: self.clock.clone(),
            },
            beating.clone(),
            first_beat,
        ));
        // Be visible before holding anything: a node that took leases before its first
        // heartbeat was stored looked dead to the others, which took the leases over at once
        // (three nodes started together moved partitions up to seven times). Bounded: a
        // heartbeat that cannot be written is retried by its loop, and rounds go on.
        let _ = tokio::time::timeout(self.cfg.cluster.node_ttl, first_beat_done).await;
        let mut tick = tokio::time::interval(self.cfg.cluster.heartbeat_interval);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = cancel.cancelled() => break,
                _ = tick.tick() => {}
            }
            let suspensions = self.fence.suspensions();
            match self.round().await {
                Ok(()) => self.fence.round_done(suspensions),
                Err(e) => {
                    tracing::warn!(node_id = %self.cfg.node_id, error = %crate::telemetry::error_chain(&e), "cluster round failed; retrying next heartbeat")
                }
            }
            self.publish_held();
        }
        self.leave().await;
        beating.cancel();
        let _ = heartbeats.await;
        if let Err(e) = self.nodes.delete(&self.cfg.node_id).await {
            tracing::warn!(error = %e, "cannot remove membership entry; it expires after the ttl");
        }
        tracing::info!(node_id = %self.cfg.node_id, "left the cluster");
    }

    fn publish_held(&self) {
        let mut partitions: Vec<u32> = self.held.keys().copied().collect();
        partitions.sort_unstable();
        if let Ok(mut list) = self.held_list.lock() {
            *list = partitions;
        }
    }

    /// Live members: entries not yet expired and heartbeating within the ttl.
    ///
    /// The bucket's key listing can miss an entry that is being rewritten while it is listed
    /// (every member rewrites its entry every heartbeat): three nodes started together judged
    /// each other dead that way, took each other's partitions over and moved some of them
    /// seven times in the first seconds. A member of the last round missing from the listing
    /// is therefore read directly: gone only if its entry is gone or stale (a node that left
    /// deleted it), kept on a read error while its last heartbeat is within the ttl.
    async fn members(&mut self) -> Result<BTreeMap<String, NodeInfo>, MembershipError> {
        let keys: Vec<String> = self
            .nodes
            .keys()
            .await
            .map_err(|e| MembershipError::Kv {
                what: "list the members",
                source: Box::new(e),
            })?
            .filter_map(|k| async move { k.ok() })
            .collect()
            .await;
        let mut out = BTreeMap::new();
        let unlisted: Vec<String> = self
            .members
            .keys()
            .filter(|k| !keys.contains(k))
            .cloned()
            .collect();
        for k in keys.iter().chain(&unlisted) {
            match self.heartbeat(k).await {
                Ok(Some(info)) => {
                    out.insert(info.node_id.clone(), info);
                }
                Ok(None) => {}
                Err(e) => {
                    if let Some(last) = self.members.get(k).filter(|_| self.seen_within_ttl(k)) {
                        tracing::debug!(node_id = %k, error = %crate::telemetry::error_chain(&e), "cannot read a member's heartbeat; keeping its last one");
                        out.insert(k.clone(), last.clone());
                    }
                }
            }
        }
        self.members.clone_from(&out);
        Ok(out)
    }

    /// Whether `node`'s heartbeat entry last changed (a new revision) within the node ttl, by
    /// this process's monotonic clock.
    fn seen_within_ttl(&self, node: &str) -> bool {
        self.seen
            .get(node)
            .is_some_and(|(_, at)| at.elapsed() <= self.cfg.cluster.node_ttl)
    }

    /// `node`'s heartbeat, read directly, if it is there and fresh.
    ///
    /// Fresh is judged without trusting anyone's wall clock: the entry exists (the bucket's
    /// `max_age` of one node ttl makes the *server* drop an entry not rewritten in time), and
    /// its revision changed within the node ttl as measured by this process's monotonic clock
    /// (a node that stopped writing, but whose entry has not expired yet, goes stale). The
    /// `heartbeat_at` a peer writes is only displayed: a peer whose clock runs ahead or behind
    /// is judged like any other.
    async fn heartbeat(&mut self, node: &str) -> Result<Option<NodeInfo>, MembershipError> {
        let entry = self
            .nodes
            .entry(node)
            .await
            .map_err(|e| MembershipError::Kv {
                what: "read a member's heartbeat",
                source: Box::new(e),
            })?;
        let Some(entry) = entry else {
            self.seen.remove(node);
            return Ok(None);
        };
        if entry.operation != kv::Operation::Put {
            self.seen.remove(node);
            return Ok(None);
        }
        let changed = self
            .seen
            .get(node)
            .is_none_or(|(revision, _)| *revision != entry.revision);
        if changed {
            self.seen.insert(
                node.to_string(),
                (entry.revision, std::time::Instant::now()),
            );
        }
        Ok(serde_json::from_slice::<NodeInfo>(&entry.value)
            .ok()
            .filter(|_| self.seen_within_ttl(node)))
    }

    async fn read_lease(&self, p: u32) -> Result<(Option<Lease>, Option<u64>), MembershipError> {
        match self
            .leases
            .entry(lease_key(p))
            .await
            .map_err(|e| MembershipError::Kv {
                what: "read a partition lease",
                source: Box::new(e),
            })? {
            Some(e) if e.operation == kv::Operation::Put => {
                let lease = serde_json::from_slice::<Lease>(&e.value).map_err(|source| {
                    MembershipError::Unreadable {
                        partition: p,
                        source,
                    }
                })?;
                Ok((Some(lease), Some(e.revision)))
            }
            Some(e) => Ok((None, Some(e.revision))),
            None => Ok((None, None)),
        }
    }

    async fn write_lease(
        &self,
        p: u32,
        lease: &Lease,
        revision: Option<u64>,
    ) -> Result<bool, MembershipError> {
        let bytes: bytes::Bytes = serde_json::to_vec(lease)
            .map_err(|source| MembershipError::Unreadable {
                partition: p,
                source,
            })?
            .into();
        let failed = |source: Box<dyn std::error::Error + Send + Sync>| MembershipError::Kv {
            what: "write a partition lease",
            source,
        };
        match revision {
            Some(r) => match self.leases.update(lease_key(p), bytes, r).await {
                Ok(_) => Ok(true),
                // Lost the race: decide again next round.
                Err(e) if topology::update_conflict(&e) => Ok(false),
                Err(e) => Err(failed(Box::new(e))),
            },
            None => match self.leases.create(lease_key(p), bytes).await {
                Ok(_) => Ok(true),
                Err(e) if topology::create_conflict(&e) => Ok(false),
                Err(e) => Err(failed(Box::new(e))),
            },
        }
    }

    /// One heartbeat and one reconciliation of every partition.
    async fn round(&mut self) -> Result<(), MembershipError> {
        let mut members = self.members().await?;
        let me = self.cfg.node_id.clone();
        let mut stored = Vec::with_capacity(self.cfg.partitions as usize);
        for p in 0..self.cfg.partitions {
            stored.push(self.read_lease(p).await?);
        }
        // A holder missing from the listing is read directly before it is judged dead and its
        // lease taken over (see `members`).
        let unlisted: BTreeSet<String> = stored
            .iter()
            .filter_map(|(lease, _)| lease.as_ref()?.owner.clone())
            .filter(|h| *h != me && !members.contains_key(h))
            .collect();
        for h in unlisted {
            if let Ok(Some(info)) = self.heartbeat(&h).await {
                tracing::debug!(node_id = %h, "lease holder missing from the member listing is alive");
                self.members.insert(h.clone(), info.clone());
                members.insert(h, info);
            }
        }
        let mut live: BTreeSet<String> = members.keys().cloned().collect();
        live.insert(me.clone());
        let mut leases = BTreeMap::new();
        let assigned_to: Vec<bool> = assignment(self.cfg.partitions, &live)
            .into_iter()
            .map(|o| o == Some(me.as_str()))
            .collect();
        let is_mine = |p: u32| assigned_to.get(p as usize).copied().unwrap_or(false);
        // A node that left or died may have cut a saga's creation short (snapshot written,
        // start not published): sweep the partitions kept through the change for such orphans
        // (those acquired now get the full take-over scan instead).
        let departed: Vec<String> = self
            .last_live
            .as_ref()
            .map(|prev| prev.difference(&live).cloned().collect())
            .unwrap_or_default();
        self.last_live = Some(live.clone());
        if !departed.is_empty() {
            let kept: Vec<u32> = self.held.keys().copied().filter(|p| is_mine(*p)).collect();
            if !kept.is_empty() {
                tokio::spawn(crate::partition::sweep_orphans(
                    self.js.clone(),
                    kept,
                    self.cfg.cluster.node_ttl,
                    self.clock.clone(),
                    self.coordinator.clone(),
                    departed,
                ));
            }
        }
        // Partitions we hold but are no longer assigned stop pulling at once (see `leave`).
        for (p, h) in &self.held {
            if !is_mine(*p) {
                h.stop.cancel();
            }
        }
        for (p, (lease, revision)) in (0..self.cfg.partitions).zip(stored) {
            // Fencing: if the stored lease is not the one we acquired, someone took over.
            if let Some(h) = self.held.get(&p) {
                let ours = lease
                    .as_ref()
                    .is_some_and(|l| l.owner.as_deref() == Some(me.as_str()) && l.epoch == h.epoch);
                if !ours {
                    tracing::warn!(
                        partition = p,
                        ?lease,
                        "partition lease taken over: dropping the partition"
                    );
                    self.stop_partition(p).await;
                }
            }
            match next_step(&me, is_mine(p), lease.as_ref(), &live) {
                LeaseStep::Acquire(new) => {
                    if self.write_lease(p, &new, revision).await? {
                        tracing::info!(partition = p, epoch = new.epoch, previous = ?lease.as_ref().and_then(|l| l.owner.clone()), "partition acquired");
                        self.start_partition(p, new.epoch);
                        leases.insert(p, new);
                    } else if let Some(l) = lease {
                        leases.insert(p, l);
                    }
                }
                LeaseStep::Release(free) => {
                    self.stop_partition(p).await;
                    if self.write_lease(p, &free, revision).await? {
                        tracing::info!(partition = p, "partition released");
                    }
                    leases.insert(p, free);
                }
                LeaseStep::Hold => {
                    let consuming = self.held.get(&p).is_some_and(|h| !h.task.is_finished());
                    if consuming {
                        if let Some(l) = lease {
                            leases.insert(p, l);
                        }
                    } else {
                        // The lease names us but we do not consume: we restarted (or the task
                        // died). Re-acquire with a higher epoch rather than trusting the old
                        // one, so a previous process with our id, if still alive, is fenced.
                        self.stop_partition(p).await;
                        let renewed = Lease {
                            owner: Some(me.clone()),
                            epoch: lease.as_ref().map_or(0, |l| l.epoch) + 1,
                        };
                        if self.write_lease(p, &renewed, revision).await? {
                            tracing::info!(
                                partition = p,
                                epoch = renewed.epoch,
                                "partition re-acquired"
                            );
                            self.start_partition(p, renewed.epoch);
                            leases.insert(p, renewed);
                        } else if let Some(l) = lease {
                            leases.insert(p, l);
                        }
                    }
                }
                LeaseStep::Wait => {
                    if let Some(l) = lease {
                        leases.insert(p, l);
                    }
                }
            }
        }
        let mut view = self.view.write().await;
        view.nodes = members;
        view.leases = leases;
        Ok(())
    }

    fn start_partition(&mut self, p: u32, epoch: u64) {
        let stop = CancellationToken::new();
        let in_flight = Arc::new(AtomicUsize::new(0));
        let task = tokio::spawn(crate::partition::consume_partition(
            self.js.clone(),
            p,
            self.cfg.clone(),
            self.coordinator.clone(),
            self.observer.clone(),
            stop.clone(),
            in_flight.clone(),
        ));
        self.held.insert(
            p,
            Held {
                epoch,
                stop,
                task,
                in_flight,
            },
        );
    }

    /// Stops consuming `p`: lets the pulled batch through, waits (bounded) for its in-flight
    /// events, then stops its saga actors.
    async fn stop_partition(&mut self, p: u32) {
        let Some(h) = self.held.remove(&p) else {
            return;
        };
        h.stop.cancel();
        let drain = self.cfg.cluster.drain_timeout;
        if tokio::time::timeout(drain, h.task).await.is_err() {
            tracing::warn!(partition = p, "partition consumer did not stop in time");
        }
        let deadline = tokio::time::Instant::now() + drain;
        while h.in_flight.load(Ordering::SeqCst) > 0 && tokio::time::Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let left = h.in_flight.load(Ordering::SeqCst);
        if left > 0 {
            tracing::warn!(
                partition = p,
                left,
                "events still in flight at hand-over; they will be redelivered"
            );
        }
        match ractor::call_t!(
            self.coordinator,
            |reply| CoordinatorMsg::DropPartition {
                partition: p,
                reply
            },
            5_000
        ) {
            Ok(n) => tracing::debug!(partition = p, actors = n, "partition actors stopped"),
            Err(e) => tracing::warn!(partition = p, error = %e, "cannot stop partition actors"),
        }
    }

    /// Graceful leave: hand every partition back and remove our membership entry.
    async fn leave(&mut self) {
        // Stop pulling on every partition at once, so their drains overlap instead of adding
        // up: the next owners wait for each release.
        for h in self.held.values() {
            h.stop.cancel();
        }
        let parts: Vec<u32> = self.held.keys().copied().collect();
        for p in parts {
            self.stop_partition(p).await;
            if let Ok((Some(lease), revision)) = self.read_lease(p).await {
                if lease.owner.as_deref() == Some(self.cfg.node_id.as_str()) {
                    let free = Lease {
                        owner: None,
                        epoch: lease.epoch,
                    };
                    let _ = self.write_lease(p, &free, revision).await;
                }
            }
        }
    }
}

/// Writes this node's heartbeat every `heartbeat_interval` until `stop`.
/// What a heartbeat is written from.
struct Heartbeat {
    nodes: kv::Store,
    cfg: NodeConfig,
    grpc_addr: String,
    started_at: i64,
    held: Arc<std::sync::Mutex<Vec<u32>>>,
    admission: Arc<Admission>,
    fence: Arc<crate::fence::Fence>,
    clock: Arc<crate::clock::ClusterClock>,
}

/// Writes a heartbeat every interval until `stop`; `first` is told once the first write was
/// tried.
async fn heartbeat_loop(
    beat: Heartbeat,
    stop: CancellationToken,
    first: tokio::sync::oneshot::Sender<()>,
) {
    let Heartbeat {
        nodes,
        cfg,
        grpc_addr,
        started_at,
        held,
        admission,
        fence,
        clock,
    } = beat;
    let mut first = Some(first);
    let mut tick = tokio::time::interval(cfg.cluster.heartbeat_interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tick.tick() => {}
        }
        let partitions = held.lock().map(|l| l.clone()).unwrap_or_default();
        let info = NodeInfo {
            node_id: cfg.node_id.clone(),
            grpc_addr: grpc_addr.clone(),
            started_at,
            heartbeat_at: clock.now_ms(),
            partitions,
            pressure_permille: (admission.pressure() * 1000.0).round() as u32,
        };
        let sent = fence.now();
        let sent_at = clock.local_ms();
        let put = match serde_json::to_vec(&info) {
            Ok(bytes) => nodes
                .put(&cfg.node_id, bytes.into())
                .await
                .map_err(|e| e.to_string()),
            Err(e) => Err(e.to_string()),
        };
        match put {
            Ok(revision) => {
                let acked_at = clock.local_ms();
                fence.heartbeat_stored(sent, cfg.cluster.node_ttl, cfg.cluster.heartbeat_interval);
                // The server's time of this write, for the cluster clock.
                if let Ok(Some(entry)) = nodes.entry(&cfg.node_id).await {
                    if entry.revision == revision {
                        let server =
                            i64::try_from(entry.created.unix_timestamp_nanos() / 1_000_000)
                                .unwrap_or(i64::MAX);
                        clock.observe(sent_at, acked_at, server);
                    }
                }
            }
            Err(e) => tracing::warn!(node_id = %cfg.node_id, error = %e, "heartbeat failed"),
        }
        if let Some(first) = first.take() {
            let _ = first.send(());
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;

    #[test]
    fn a_failed_round_says_what_failed_and_why() {
        let source = serde_json::from_slice::<Lease>(b"{").unwrap_err();
        let e = MembershipError::Unreadable {
            partition: 3,
            source,
        };
        let text = crate::telemetry::error_chain(&e);
        assert!(
            text.starts_with("lease p3 unreadable: EOF while parsing"),
            "{text}"
        );
        let e = MembershipError::Kv {
            what: "read a partition lease",
            source: "timed out".into(),
        };
        assert_eq!(
            crate::telemetry::error_chain(&e),
            "cannot read a partition lease: timed out"
        );
    }

    fn node(id: &str, pressure_permille: u32) -> NodeInfo {
        NodeInfo {
            node_id: id.to_string(),
            grpc_addr: "127.0.0.1:1".to_string(),
            started_at: 0,
            heartbeat_at: 0,
            partitions: Vec::new(),
            pressure_permille,
        }
    }

    #[test]
    fn cluster_owner_pressure_is_the_partition_owners_last_heartbeat() {
        let mut view = ClusterView::default();
        view.nodes.insert("a".into(), node("a", 50));
        view.nodes.insert("b".into(), node("b", 400));
        let lease = |owner: Option<&str>| Lease {
            owner: owner.map(str::to_string),
            epoch: 1,
        };
        view.leases.insert(0, lease(Some("a")));
        view.leases.insert(1, lease(Some("b")));
        view.leases.insert(2, lease(None));
        view.leases.insert(3, lease(Some("gone")));
        assert!((view.owner_pressure(0) - 0.05).abs() < 1e-9);
        assert!((view.owner_pressure(1) - 0.4).abs() < 1e-9);
        // No owner, an owner not heartbeating, an unknown partition: nothing known, 0.
        assert_eq!(view.owner_pressure(2), 0.0);
        assert_eq!(view.owner_pressure(3), 0.0);
        assert_eq!(view.owner_pressure(9), 0.0);
        // A heartbeat from a node without the field reads as 0.
        let old =
            r#"{"node_id":"c","grpc_addr":"x","started_at":1,"heartbeat_at":2,"partitions":[4]}"#;
        let info: NodeInfo = serde_json::from_str(old).expect("older heartbeat");
        assert_eq!(info.pressure_permille, 0);
    }
}
