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
use async_trait::async_trait;
use futures::StreamExt;
use ractor::ActorRef;
use sagaflow_actors::cluster::{assignment, next_step, Lease, LeaseStep};
use sagaflow_actors::coordinator::{CoordinatorMsg, Input};
use sagaflow_actors::ports::{Delivery, Observer};
use serde::{Deserialize, Serialize};
use tokio::sync::RwLock;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::admission::Admission;
use crate::config::{NodeConfig, MAX_PARTITIONS};
use crate::dlq::{self, now_ms, JsDelivery};
use crate::events::{decode, ensure_consumer};
use crate::topology::{self, SAGAS_BUCKET};

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
    /// A reconciler for this node; `metrics` gives its admission pressure (heartbeats) and
    /// counts refused events.
    pub fn new(
        js: jetstream::Context,
        (nodes, leases): (kv::Store, kv::Store),
        cfg: NodeConfig,
        grpc_addr: String,
        coordinator: ActorRef<CoordinatorMsg>,
        view: SharedView,
        metrics: Arc<crate::metrics::Metrics>,
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
            admission: metrics.admission.clone(),
            observer: metrics,
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
                    tracing::warn!(node_id = %self.cfg.node_id, error = %e, "cluster round failed; retrying next heartbeat")
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
    async fn members(&mut self) -> Result<BTreeMap<String, NodeInfo>, String> {
        let keys: Vec<String> = self
            .nodes
            .keys()
            .await
            .map_err(|e| e.to_string())?
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
                        tracing::debug!(node_id = %k, error = %e, "cannot read a member's heartbeat; keeping its last one");
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
    async fn heartbeat(&mut self, node: &str) -> Result<Option<NodeInfo>, String> {
        let Some(entry) = self.nodes.entry(node).await.map_err(|e| e.to_string())? else {
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

    async fn read_lease(&self, p: u32) -> Result<(Option<Lease>, Option<u64>), String> {
        match self
            .leases
            .entry(lease_key(p))
            .await
            .map_err(|e| e.to_string())?
        {
            Some(e) if e.operation == kv::Operation::Put => {
                let lease = serde_json::from_slice::<Lease>(&e.value)
                    .map_err(|err| format!("lease p{p} unreadable: {err}"))?;
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
    ) -> Result<bool, String> {
        let bytes: bytes::Bytes = serde_json::to_vec(lease).map_err(|e| e.to_string())?.into();
        let result = match revision {
            Some(r) => self
                .leases
                .update(lease_key(p), bytes, r)
                .await
                .map(|_| ())
                .map_err(|e| (topology::update_conflict(&e), e.to_string())),
            None => self
                .leases
                .create(lease_key(p), bytes)
                .await
                .map(|_| ())
                .map_err(|e| (topology::create_conflict(&e), e.to_string())),
        };
        match result {
            Ok(()) => Ok(true),
            Err((true, _)) => Ok(false), // lost the race: decide again next round
            Err((false, e)) => Err(e),
        }
    }

    /// One heartbeat and one reconciliation of every partition.
    async fn round(&mut self) -> Result<(), String> {
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
                tokio::spawn(sweep_orphans(
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
        let task = tokio::spawn(consume_partition(
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

/// A delivery counted in its partition's in-flight total until it is acked, nak'ed,
/// dead-lettered or dropped.
struct Tracked {
    inner: Option<Box<JsDelivery>>,
    count: Arc<AtomicUsize>,
}

impl Tracked {
    fn new(inner: JsDelivery, count: Arc<AtomicUsize>) -> Self {
        count.fetch_add(1, Ordering::SeqCst);
        Tracked {
            inner: Some(Box::new(inner)),
            count,
        }
    }
}

impl Drop for Tracked {
    fn drop(&mut self) {
        self.count.fetch_sub(1, Ordering::SeqCst);
    }
}

#[async_trait]
impl Delivery for Tracked {
    async fn ack(mut self: Box<Self>) {
        if let Some(d) = self.inner.take() {
            d.ack().await;
        }
    }
    async fn nak(mut self: Box<Self>, delay: Duration) {
        if let Some(d) = self.inner.take() {
            d.nak(delay).await;
        }
    }
    async fn in_progress(&self) {
        if let Some(d) = &self.inner {
            d.in_progress().await;
        }
    }
    fn delivered(&self) -> u32 {
        self.inner.as_ref().map_or(1, |d| d.delivered())
    }
    async fn dead_letter(mut self: Box<Self>, reason: String) {
        if let Some(d) = self.inner.take() {
            d.dead_letter(reason).await;
        }
    }
}

/// Events of one partition a node holds at once (delivered, not yet acked).
const EVENTS_IN_HAND: usize = 512;

/// Consumes partition `p` in fetched batches until `stop`; a batch already fetched is always
/// handed over in full, so stopping never strands pulled messages until their ack_wait.
async fn consume_partition(
    js: jetstream::Context,
    p: u32,
    cfg: NodeConfig,
    coordinator: ActorRef<CoordinatorMsg>,
    observer: Arc<dyn Observer>,
    stop: CancellationToken,
    in_flight: Arc<AtomicUsize>,
) {
    let mut failures = 0u32;
    let mut consumer = None;
    let mut recovered = false;
    while !stop.is_cancelled() {
        let c = match &consumer {
            Some(c) => c,
            None => match ensure_consumer(&js, p, &cfg.consumers).await {
                Ok(c) => consumer.insert(c),
                Err(e) => {
                    failures += 1;
                    let delay = sagaflow_actors::service::restart_backoff(failures);
                    tracing::warn!(partition = p, error = %e, ?delay, "cannot open partition consumer, retrying");
                    tokio::select! { _ = stop.cancelled() => return, _ = tokio::time::sleep(delay) => continue }
                }
            },
        };
        if !recovered {
            // Sagas of this partition waiting only on timers have no event coming: bring them back.
            match recover_partition(&js, p, &coordinator).await {
                Ok(n) => tracing::info!(partition = p, sagas = n, "partition recovered"),
                Err(e) => {
                    tracing::warn!(partition = p, error = %e, "cannot list partition sagas, retrying");
                    tokio::select! { _ = stop.cancelled() => return, _ = tokio::time::sleep(Duration::from_secs(1)) => continue }
                }
            }
            recovered = true;
        }
        // Back-pressure: at most EVENTS_IN_HAND events of this partition are in the node at
        // once, so its memory stays bounded when it falls behind; the rest wait in JetStream,
        // where no ack_wait runs. (This alone does not keep an overloaded node at full speed:
        // see "Overload" in docs/benchmarks.md.)
        let room = loop {
            let held = in_flight.load(Ordering::SeqCst);
            if held < EVENTS_IN_HAND {
                break EVENTS_IN_HAND - held;
            }
            tokio::select! {
                _ = stop.cancelled() => return,
                _ = tokio::time::sleep(Duration::from_millis(2)) => {}
            }
        };
        let batch = c
            .batch()
            .max_messages(room.min(256))
            .expires(Duration::from_millis(500))
            .messages()
            .await;
        let mut batch = match batch {
            Ok(b) => b,
            Err(e) => {
                failures += 1;
                tracing::warn!(partition = p, error = %e, "cannot fetch events, retrying");
                consumer = None;
                tokio::select! { _ = stop.cancelled() => return, _ = tokio::time::sleep(sagaflow_actors::service::restart_backoff(failures)) => continue }
            }
        };
        failures = 0;
        while let Some(next) = batch.next().await {
            match next {
                Ok(message) => {
                    match decode(
                        &message.subject,
                        message.headers.as_ref(),
                        &message.payload,
                        cfg.partitions,
                    ) {
                        Ok((saga_id, mut input)) => {
                            if matches!(input, Input::Created { .. })
                                && message.info().map_or(true, |i| i.delivered > 1)
                            {
                                // Redelivered: the saga may have moved on since; read the store.
                                input = Input::Started;
                            }
                            let delivery = Box::new(Tracked::new(
                                JsDelivery {
                                    message: Arc::new(message),
                                    source: "events",
                                },
                                in_flight.clone(),
                            ));
                            if coordinator
                                .cast(CoordinatorMsg::Deliver {
                                    saga_id,
                                    input,
                                    delivery,
                                })
                                .is_err()
                            {
                                return;
                            }
                        }
                        Err(refused) => {
                            observer.event_refused(refused.label);
                            dlq::dead_letter(&js, "events", &message, &refused.detail).await;
                        }
                    }
                }
                Err(e) => {
                    tracing::debug!(partition = p, error = %e, "fetch ended");
                    break;
                }
            }
        }
    }
}

/// Brings back every unfinished saga stored under partition `p`; returns how many.
///
/// Finished sagas are not read: the headers-only scan of [`crate::index::unfinished`] tells
/// them apart by the index header of their last write.
async fn recover_partition(
    js: &jetstream::Context,
    p: u32,
    coordinator: &ActorRef<CoordinatorMsg>,
) -> Result<usize, String> {
    let bucket = js
        .get_key_value(SAGAS_BUCKET)
        .await
        .map_err(|e| e.to_string())?;
    let ids = crate::index::unfinished(&bucket, p)
        .await
        .map_err(|e| e.to_string())?;
    let n = ids.len();
    for saga_id in ids {
        coordinator
            .cast(CoordinatorMsg::Recover { saga_id })
            .map_err(|e| e.to_string())?;
    }
    Ok(n)
}

/// How far back, past three node TTLs, the orphan sweep looks for interrupted creations.
const ORPHAN_MARGIN: Duration = Duration::from_secs(30);

/// Takes up the sagas of `partitions` that a departed node may have left orphaned: written
/// recently, unfinished, and driven by no actor of this node (see `docs/semantics.md`, "No
/// orphans").
///
/// It waits one `node_ttl` first, then looks at writes from `3 × node_ttl + ORPHAN_MARGIN`
/// ago up to `node_ttl` ago: whatever the departed node wrote is at least a TTL old by the
/// time it is judged dead, and younger writes belong to sagas whose start may still be on its
/// way.
async fn sweep_orphans(
    js: jetstream::Context,
    partitions: Vec<u32>,
    node_ttl: Duration,
    clock: Arc<crate::clock::ClusterClock>,
    coordinator: ActorRef<CoordinatorMsg>,
    departed: Vec<String>,
) {
    tokio::time::sleep(node_ttl).await;
    let ttl_ms = i64::try_from(node_ttl.as_millis()).unwrap_or(i64::MAX);
    let margin_ms = i64::try_from(ORPHAN_MARGIN.as_millis()).unwrap_or(0);
    let now = clock.now_ms();
    let (since, until) = (
        now.saturating_sub(ttl_ms.saturating_mul(3).saturating_add(margin_ms)),
        now.saturating_sub(ttl_ms),
    );
    let bucket = match js.get_key_value(SAGAS_BUCKET).await {
        Ok(b) => b,
        Err(e) => {
            tracing::warn!(error = %e, ?departed, "orphan sweep skipped: cannot open the saga bucket");
            return;
        }
    };
    let mut candidates = 0;
    for p in partitions {
        match crate::index::recently_unfinished(&bucket, p, since, until).await {
            Ok(ids) => {
                candidates += ids.len();
                for saga_id in ids {
                    if coordinator.cast(CoordinatorMsg::Adopt { saga_id }).is_err() {
                        return;
                    }
                }
            }
            Err(e) => {
                tracing::warn!(partition = p, error = %e, ?departed, "orphan sweep of a partition failed")
            }
        }
    }
    tracing::debug!(?departed, candidates, "orphan sweep done");
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

    /// Stands in for the coordinator: hands every delivered event to the test, which decides
    /// when to ack it.
    struct Holder;

    impl ractor::Actor for Holder {
        type Msg = CoordinatorMsg;
        type State = tokio::sync::mpsc::UnboundedSender<Box<dyn Delivery>>;
        type Arguments = tokio::sync::mpsc::UnboundedSender<Box<dyn Delivery>>;

        async fn pre_start(
            &self,
            _: ActorRef<CoordinatorMsg>,
            tx: Self::Arguments,
        ) -> Result<Self::State, ractor::ActorProcessingErr> {
            Ok(tx)
        }

        async fn handle(
            &self,
            _: ActorRef<CoordinatorMsg>,
            msg: CoordinatorMsg,
            tx: &mut Self::State,
        ) -> Result<(), ractor::ActorProcessingErr> {
            if let CoordinatorMsg::Deliver { delivery, .. } = msg {
                let _ = tx.send(delivery);
            }
            Ok(())
        }
    }

    /// The next `n` deliveries (each within 30 s).
    async fn receive(
        held: &mut tokio::sync::mpsc::UnboundedReceiver<Box<dyn Delivery>>,
        n: usize,
    ) -> Vec<Box<dyn Delivery>> {
        let mut got = Vec::with_capacity(n);
        while got.len() < n {
            match tokio::time::timeout(Duration::from_secs(30), held.recv()).await {
                Ok(Some(d)) => got.push(d),
                _ => panic!("only {} of {n} events delivered", got.len()),
            }
        }
        got
    }

    /// The partition consumer's own ack-pending count, as the server sees it.
    async fn ack_pending(js: &jetstream::Context, p: u32) -> (usize, u64) {
        let mut c: jetstream::consumer::PullConsumer = js
            .get_stream(topology::EVENTS_STREAM)
            .await
            .unwrap()
            .get_consumer(&crate::events::consumer_name(p))
            .await
            .unwrap();
        let info = c.info().await.unwrap();
        (info.num_ack_pending, info.num_pending)
    }

    /// Back-pressure: a partition whose events are not acked (the node is behind) holds at
    /// most `EVENTS_IN_HAND` of them; the rest wait in JetStream, unpulled, and flow in as
    /// the held ones are acked. Nothing is lost or delivered twice on the way.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_partition_holds_at_most_its_cap_of_events_and_takes_more_as_they_are_acked() {
        use prost::Message as _;
        use sagaflow_proto::v1;

        let nats = tokio::task::spawn_blocking(crate::nats_server::NatsServer::start)
            .await
            .unwrap()
            .unwrap();
        let cfg = NodeConfig::default();
        let js = jetstream::new(async_nats::connect(nats.url()).await.unwrap());
        topology::ensure(&js, &cfg.streams).await.unwrap();
        let extra = 88;
        let total = EVENTS_IN_HAND + extra;
        let mut acks = Vec::with_capacity(total);
        // Well-formed replies of sagas of partition 0 (the edge refuses any other).
        let sagas = (0..)
            .map(|i| format!("held-{i}"))
            .filter(|id| sagaflow_actors::hash::partition_of(id, cfg.partitions) == 0);
        for saga_id in sagas.take(total) {
            let reply = v1::Reply {
                command_id: crate::bus::command_id(&saga_id, "charge", false, 1),
                saga_id: saga_id.clone(),
                step: "charge".into(),
                attempt: 1,
                compensation: false,
                outcome: Some(v1::reply::Outcome::Success(v1::Success {
                    output: Vec::new(),
                })),
            };
            let subject = topology::event_subject(0, "reply");
            acks.push(
                js.publish(subject, reply.encode_to_vec().into())
                    .await
                    .unwrap(),
            );
        }
        for ack in acks {
            ack.await.unwrap();
        }

        let (tx, mut held) = tokio::sync::mpsc::unbounded_channel();
        let (holder, holder_task) = ractor::Actor::spawn(None, Holder, tx).await.unwrap();
        let stop = CancellationToken::new();
        let in_flight = Arc::new(AtomicUsize::new(0));
        let task = tokio::spawn(consume_partition(
            js.clone(),
            0,
            cfg,
            holder.clone(),
            Arc::new(sagaflow_actors::ports::NoopObserver),
            stop.clone(),
            in_flight.clone(),
        ));
        // The cap is reached, and nothing more is pulled while every held event is unacked.
        let mut first = receive(&mut held, EVENTS_IN_HAND).await;
        tokio::time::sleep(Duration::from_millis(700)).await;
        assert!(
            held.try_recv().is_err(),
            "an event beyond the cap of {EVENTS_IN_HAND} was pulled"
        );
        assert_eq!(in_flight.load(Ordering::SeqCst), EVENTS_IN_HAND);
        assert_eq!(
            ack_pending(&js, 0).await,
            (EVENTS_IN_HAND, extra as u64),
            "(ack pending, not yet delivered) at the server"
        );

        // Acking some makes room for exactly as many more.
        for d in first.drain(..extra) {
            d.ack().await;
        }
        let rest = receive(&mut held, extra).await;
        assert_eq!(in_flight.load(Ordering::SeqCst), EVENTS_IN_HAND);
        for d in first.into_iter().chain(rest) {
            d.ack().await;
        }
        assert_eq!(in_flight.load(Ordering::SeqCst), 0);
        let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
        while ack_pending(&js, 0).await != (0, 0) {
            assert!(
                tokio::time::Instant::now() < deadline,
                "acks not seen by the server: {:?}",
                ack_pending(&js, 0).await
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        assert!(held.try_recv().is_err(), "an event was delivered twice");

        stop.cancel();
        tokio::time::timeout(Duration::from_secs(10), task)
            .await
            .unwrap()
            .unwrap();
        holder.stop(None);
        holder_task.await.unwrap();
    }
}
