//! The coordinator: one [`SagaActor`] per live saga (in `coordinator/saga.rs`), under a
//! [`Coordinator`] (this file) that routes events to them, restarts them and passivates idle
//! ones.
//!
//! ```text
//!  partition consumers ──Deliver(saga_id, input, delivery)──▶ Coordinator ──▶ SagaActor(saga_id)
//!  (sagaflow crate)                                          spawns/restarts     │
//!                                                                                │ 1. load snapshot (once)
//!                                                                                │ 2. apply event (pure machine)
//!                                                                                │ 3. CAS-save snapshot
//!                                                                                │ 4. publish commands, announce status
//!                                                                                │ 5. ack the event
//!                                                                                │ 6. arm the timer for next_wakeup
//! ```
//!
//! **Ordering.** A saga's events reach its actor in stream order and its mailbox handles one
//! at a time, so per-saga events are applied in order, one at a time. The actor awaits its
//! own I/O inside `handle` on purpose: that blocks only this saga, which is what ordering needs.
//!
//! **Persist before anything else.** The snapshot is written (compare-and-set on the revision)
//! before the commands it lists are published and before the event is acked. If the process
//! dies after the write, the event is redelivered and is a no-op for the machine, and recovery
//! republishes [`Saga::in_flight`] (same command ids: the server and participants de-duplicate).
//!
//! **Restart policy.** A saga actor that fails (a bug: the machine is pure and tested) is
//! respawned by the coordinator with capped backoff; it reloads its snapshot, republishes its
//! in-flight commands and re-arms its timer. Events that were in its mailbox were never acked:
//! JetStream redelivers them after the consumer's `ack_wait`. A saga actor that finished stops
//! itself and is forgotten.

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use ractor::{Actor, ActorId, ActorProcessingErr, ActorRef, RpcReplyPort, SupervisionEvent};

use crate::machine::{Intervention, Millis, Saga, StepError};
use crate::ports::{AttentionCount, CommandBus, Delivery, Observer, Parker, StateStore};
use crate::service::restart_backoff;

/// What a delivered saga event says.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Input {
    /// The saga's snapshot was created; publish its first commands.
    Started,
    /// The same, carrying the snapshot as created and its revision, so the owner need not
    /// read it back. Used only when the actor holds no copy yet; a stale one costs no more than
    /// a lost compare-and-set (the next write reloads).
    Created {
        /// The snapshot as created.
        saga: Box<Saga>,
        /// Its revision.
        revision: u64,
        /// Whether the creator published the first commands itself (the owner then only arms
        /// the timers; if that publish failed, the step's timeout retries it).
        commands_sent: bool,
    },
    /// A participant's reply.
    Reply {
        /// The service the reply came from, as its subject names it
        /// (`sagaflow.evt.<partition>.reply.<service>`); `None` on the older subject that names
        /// none. A reply from another service than the one the command went to is refused.
        service: Option<String>,
        /// Step name.
        step: String,
        /// Attempt answered.
        attempt: u32,
        /// Whether it answers a compensation.
        compensation: bool,
        /// Output or error.
        outcome: Result<Vec<u8>, StepError>,
    },
    /// Compensate now.
    Cancel {
        /// Why.
        reason: String,
    },
    /// An operator's action.
    Intervene(Intervention),
    /// A signal for the saga's wait steps.
    Signal {
        /// Its id.
        id: String,
        /// Its name.
        name: String,
        /// Its payload, JSON.
        payload: Vec<u8>,
    },
}

/// What the actors share: definitions, ports, clock.
pub struct Context {
    /// Every known version of each definition, and the active one (what new sagas start on).
    pub definitions: Arc<crate::catalog::Catalog>,
    /// Where a version this node does not know is loaded from (a saga started on a version
    /// applied elsewhere).
    pub definition_source: Arc<dyn crate::ports::DefinitionSource>,
    /// Snapshot store.
    pub store: Arc<dyn StateStore>,
    /// Command and status publisher.
    pub bus: Arc<dyn CommandBus>,
    /// Current time, unix milliseconds.
    pub clock: Arc<dyn Fn() -> Millis + Send + Sync>,
    /// Number of event partitions (to tell which partition a saga belongs to).
    pub partitions: u32,
    /// Told about persisted changes (metrics); [`crate::ports::NoopObserver`] to ignore them.
    pub observer: Arc<dyn Observer>,
    /// Where parked sagas are reported.
    pub parker: Arc<dyn Parker>,
    /// A saga with no progress for longer than this many times its step timeout (counted from
    /// its next due time) is flagged stuck.
    pub stuck_multiple: u32,
    /// How often the coordinator counts parked and stuck sagas.
    pub census_every: Duration,
    /// A saga actor idle for this long is stopped and its saga kept *dormant*: the coordinator
    /// holds only its next due time, and its next event or due time brings it back (one read of
    /// the store). Zero: never.
    pub passivate_after: Duration,
    /// Passivation after [`Context::passivate_after`] starts only when the node holds more
    /// saga actors than this: below it, memory is not worth a reload per event.
    pub passivate_above: usize,
    /// A saga actor idle for this long is passivated whatever the node holds: a saga that
    /// waits this long for a participant or a timer pays one reload, which is nothing beside
    /// the wait, and no longer keeps an actor. Zero: only above [`Context::passivate_above`].
    pub passivate_always_after: Duration,
    /// What each live saga actor last persisted, for the census (kept by the actors).
    pub census: std::sync::Mutex<HashMap<String, Summary>>,
    /// An event that fails for a transient reason (the store or NATS unavailable) is
    /// delivered again with a growing delay ([`event_retry_delay`]) up to this many
    /// deliveries in all, then dead-lettered with the last error: never retried forever. A
    /// reply given up on this way costs its step a timeout (the step's retry then sends it
    /// again); a cancel or intervention can be replayed from the dead letter.
    pub event_deliveries: u32,
    /// Size limits that keep every snapshot bounded ([`Saga::apply_with_limits`]).
    pub limits: crate::machine::Limits,
    /// A saga changed less than this long ago has its current status announced again when it
    /// is recovered or one of its events comes back already applied: its owner may have died
    /// between writing the snapshot and announcing the change. Announcements carry a message
    /// id per (saga, status sequence), so keep this well inside the server's duplicate window
    /// (the node uses half of `streams.duplicate_window`); zero: never.
    pub reannounce_within: Duration,
}

/// How long an event that failed for a transient reason at its `delivered`-th delivery waits
/// before the next: 1 s, doubling, at most 30 s.
pub fn event_retry_delay(delivered: u32) -> Duration {
    let doublings = delivered.saturating_sub(1).min(5);
    Duration::from_secs(1u64 << doublings).min(Duration::from_secs(30))
}

/// What the census knows of one live saga.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Summary {
    /// Definition name.
    pub definition: String,
    /// Parked `NEEDS_ATTENTION`.
    pub parked: bool,
    /// When the saga counts as stuck if nothing changes ([`Saga::stuck_at`]).
    pub stuck_at: Option<Millis>,
    /// When its actor last handled a message.
    pub last_active: Millis,
}

impl Context {
    /// After how long idle a saga actor is passivated while the node holds more than
    /// [`Context::passivate_above`] actors (`crowded`) or not; `None`: never.
    pub fn passivation_after(&self, crowded: bool) -> Option<Duration> {
        [
            Some(self.passivate_after).filter(|_| crowded),
            Some(self.passivate_always_after),
        ]
        .into_iter()
        .flatten()
        .filter(|d| !d.is_zero())
        .min()
    }

    /// The census, locked (a panic elsewhere while holding it leaves it usable: each line is
    /// rewritten by its saga's next message).
    fn census(&self) -> std::sync::MutexGuard<'_, HashMap<String, Summary>> {
        match self.census.lock() {
            Ok(c) => c,
            Err(poisoned) => poisoned.into_inner(),
        }
    }
}

impl std::fmt::Debug for Context {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Context")
            .field("definitions", &self.definitions.names())
            .finish()
    }
}

/// Supervisor and router of saga actors (no data; see [`CoordinatorState`]).
#[derive(Debug, Default)]
pub struct Coordinator;

/// Messages of [`Coordinator`].
pub enum CoordinatorMsg {
    /// Route an event to its saga.
    Deliver {
        /// Saga id.
        saga_id: String,
        /// The event.
        input: Input,
        /// Its acknowledgement.
        delivery: Box<dyn Delivery>,
    },
    /// Bring a saga found unfinished in the store back to life (after a restart or takeover).
    Recover {
        /// Saga id.
        saga_id: String,
    },
    /// Bring back a saga found unfinished by the orphan sweep, unless this node already drives
    /// it (a live, passivating or dormant actor): a saga whose creation was cut short.
    Adopt {
        /// Saga id.
        saga_id: String,
    },
    /// Respawn a failed saga actor.
    Respawn(String),
    /// Stop every saga actor of `partition` (it is handed to another node); replies with how
    /// many were stopped.
    DropPartition {
        /// The partition.
        partition: u32,
        /// How many actors were stopped.
        reply: RpcReplyPort<usize>,
    },
    /// Number of live saga actors.
    Live(RpcReplyPort<usize>),
    /// Count parked and stuck sagas (periodic).
    Census,
    /// Passivate idle saga actors (periodic), unless the coordinator is behind.
    Sweep {
        /// When the sweep was asked for (its wait in the mailbox says how far behind the
        /// coordinator is).
        sent_at: Millis,
    },
    /// A saga actor asked to passivate has stopped; its saga is dormant until `wake_at`.
    Passivated {
        /// Saga id.
        saga_id: String,
        /// Its next due time, if any.
        wake_at: Option<Millis>,
    },
    /// Bring back dormant sagas whose due time has come.
    Wake,
}

/// A sweep that waited longer than this in the coordinator's mailbox is skipped.
const SWEEP_MAX_LAG_MS: Millis = 50;

/// An event held for a saga whose actor is stopping.
type Queued = (Input, Box<dyn Delivery>);

/// State of [`Coordinator`].
pub struct CoordinatorState {
    ctx: Arc<Context>,
    /// Sagas flagged stuck at the last census (to log each once).
    stuck: std::collections::HashSet<String>,
    actors: HashMap<String, Live>,
    ids: HashMap<ActorId, String>,
    failures: HashMap<String, u32>,
    /// Sagas whose actor was asked to passivate, with the events that arrived since (delivered
    /// in order to a new actor if any came).
    passivating: HashMap<String, Vec<Queued>>,
    /// Dormant sagas (no actor) and their next due time.
    dormant: HashMap<String, Option<Millis>>,
    /// Due times of dormant sagas (entries of sagas woken since are skipped).
    wakeups: std::collections::BTreeSet<(Millis, String)>,
    /// The earliest `Wake` already scheduled.
    wake_scheduled: Option<Millis>,
}

impl Actor for Coordinator {
    type Msg = CoordinatorMsg;
    type State = CoordinatorState;
    type Arguments = Arc<Context>;

    async fn pre_start(
        &self,
        myself: ActorRef<Self::Msg>,
        ctx: Arc<Context>,
    ) -> Result<Self::State, ActorProcessingErr> {
        if !ctx.census_every.is_zero() {
            // Stops with the actor (the send fails once it is gone).
            myself.send_interval(ctx.census_every, || CoordinatorMsg::Census);
        }
        // The shortest idle time that can passivate is the crowded one.
        if let Some(period) = ctx.passivation_after(true) {
            // Idle actors are looked for twice per period, so none stays much longer.
            let every = (period / 2).max(Duration::from_millis(10));
            let clock = ctx.clock.clone();
            myself.send_interval(every, move || CoordinatorMsg::Sweep { sent_at: clock() });
        }
        Ok(CoordinatorState {
            ctx,
            stuck: std::collections::HashSet::new(),
            actors: HashMap::new(),
            ids: HashMap::new(),
            failures: HashMap::new(),
            passivating: HashMap::new(),
            dormant: HashMap::new(),
            wakeups: std::collections::BTreeSet::new(),
            wake_scheduled: None,
        })
    }

    async fn handle(
        &self,
        myself: ActorRef<Self::Msg>,
        msg: Self::Msg,
        state: &mut Self::State,
    ) -> Result<(), ActorProcessingErr> {
        match msg {
            CoordinatorMsg::Deliver {
                saga_id,
                input,
                delivery,
            } => {
                if let Some(queue) = state.passivating.get_mut(&saga_id) {
                    // Its actor is stopping: keep the order, hand these to the next one.
                    queue.push((input, delivery));
                    return Ok(());
                }
                let actor = match state.actor_for(&myself, &saga_id).await {
                    Ok(a) => a,
                    Err(e) => {
                        tracing::error!(saga_id, error = %e, "cannot spawn saga actor");
                        delivery.nak(Duration::from_secs(1)).await;
                        return Ok(());
                    }
                };
                if let Err(e) = actor.deliver(input, delivery) {
                    // The actor stopped between lookup and send: the message is dropped with it
                    // un-acked, and JetStream redelivers it.
                    tracing::debug!(saga_id, error = %e, "saga actor gone, event will be redelivered");
                }
            }
            CoordinatorMsg::Adopt { saga_id } => {
                let driven = state.actors.contains_key(&saga_id)
                    || state.passivating.contains_key(&saga_id)
                    || state.dormant.contains_key(&saga_id);
                if driven {
                    return Ok(());
                }
                match state.actor_for(&myself, &saga_id).await {
                    Ok(live) => {
                        tracing::warn!(
                            saga_id,
                            "orphaned saga taken up: its creation was interrupted"
                        );
                        state.ctx.observer.orphan_adopted(&saga_id);
                        let _ = live.actor.cast(SagaMsg::Recover);
                    }
                    Err(e) => tracing::error!(saga_id, error = %e, "cannot spawn saga actor"),
                }
            }
            CoordinatorMsg::Recover { saga_id } | CoordinatorMsg::Respawn(saga_id) => {
                if state.passivating.contains_key(&saga_id) {
                    // The next actor reloads the saga anyway.
                    return Ok(());
                }
                match state.actor_for(&myself, &saga_id).await {
                    Ok(live) => {
                        let _ = live.actor.cast(SagaMsg::Recover);
                    }
                    Err(e) => tracing::error!(saga_id, error = %e, "cannot spawn saga actor"),
                }
            }
            CoordinatorMsg::DropPartition { partition, reply } => {
                let parts = state.ctx.partitions;
                let doomed: Vec<String> = state
                    .actors
                    .keys()
                    .filter(|id| crate::hash::partition_of(id, parts) == partition)
                    .cloned()
                    .collect();
                for id in &doomed {
                    if let Some(live) = state.actors.remove(id) {
                        state.ids.remove(&live.actor.get_id());
                        state.failures.remove(id);
                        live.actor.stop(Some("partition handed over".into()));
                    }
                    // Events queued for it were never acked: the next owner gets them again.
                    state.passivating.remove(id);
                }
                let dormant: Vec<String> = state
                    .dormant
                    .keys()
                    .filter(|id| crate::hash::partition_of(id, parts) == partition)
                    .cloned()
                    .collect();
                {
                    let mut census = state.ctx.census();
                    for id in &dormant {
                        state.dormant.remove(id);
                        census.remove(id);
                    }
                }
                let _ = reply.send(doomed.len() + dormant.len());
            }
            CoordinatorMsg::Live(reply) => {
                let _ = reply.send(state.live());
            }
            CoordinatorMsg::Census => state.census(),
            CoordinatorMsg::Sweep { sent_at } => {
                // A backlog in this mailbox holds events for sagas that look idle only because
                // their events have not reached them yet: passivating them then would make the
                // overload worse (each would be reloaded at once). Sweep only when caught up.
                let behind = (state.ctx.clock)() - sent_at;
                if behind <= SWEEP_MAX_LAG_MS {
                    state.passivate_idle();
                } else {
                    tracing::debug!(behind_ms = behind, "coordinator behind, not passivating");
                }
            }
            CoordinatorMsg::Passivated { saga_id, wake_at } => {
                // No entry: its partition was handed over meanwhile, forget it. While the entry
                // exists no other actor of this saga can have been spawned (events are queued).
                let Some(queued) = state.passivating.remove(&saga_id) else {
                    return Ok(());
                };
                if let Some(live) = state.actors.remove(&saga_id) {
                    state.ids.remove(&live.actor.get_id());
                }
                state.failures.remove(&saga_id);
                if queued.is_empty() {
                    state.sleep(&myself, saga_id, wake_at);
                } else {
                    state.hand_over(&myself, &saga_id, queued).await;
                }
            }
            CoordinatorMsg::Wake => state.wake(&myself).await,
        }
        state.ctx.observer.live_sagas(state.live());
        Ok(())
    }

    async fn handle_supervisor_evt(
        &self,
        myself: ActorRef<Self::Msg>,
        event: SupervisionEvent,
        state: &mut Self::State,
    ) -> Result<(), ActorProcessingErr> {
        match event {
            SupervisionEvent::ActorTerminated(cell, _, reason) => {
                if let Some(id) = state.ids.remove(&cell.get_id()) {
                    state.actors.remove(&id);
                    state.failures.remove(&id);
                    // Passivated: its `Passivated` message (which may come after this event)
                    // settles the queue. Otherwise it stopped (finished) before it could
                    // passivate, and events that came meanwhile go to a new actor.
                    if reason.as_deref() != Some(PASSIVATED) {
                        if let Some(queued) = state.passivating.remove(&id) {
                            state.hand_over(&myself, &id, queued).await;
                        }
                    }
                }
            }
            SupervisionEvent::ActorFailed(cell, err) => {
                if let Some(id) = state.ids.remove(&cell.get_id()) {
                    state.actors.remove(&id);
                    if let Some(queued) = state.passivating.remove(&id) {
                        // A new actor reloads the saga and takes the queued events (the
                        // respawn below then finds it).
                        state.hand_over(&myself, &id, queued).await;
                    }
                    let n = state.failures.entry(id.clone()).or_insert(0);
                    *n += 1;
                    let delay = restart_backoff(*n);
                    tracing::error!(saga_id = %id, error = %err, ?delay, "saga actor failed, restarting it");
                    myself.send_after(delay, move || CoordinatorMsg::Respawn(id));
                }
            }
            _ => {}
        }
        state.ctx.observer.live_sagas(state.live());
        Ok(())
    }
}

impl CoordinatorState {
    /// Counts parked and stuck sagas per definition, tells the observer, and logs each saga
    /// that became stuck (once).
    fn census(&mut self) {
        let now = (self.ctx.clock)();
        let names = self.ctx.definitions.names();
        let mut counts: HashMap<&str, AttentionCount> = names
            .iter()
            .map(|name| {
                (
                    name.as_str(),
                    AttentionCount {
                        saga: name.clone(),
                        ..AttentionCount::default()
                    },
                )
            })
            .collect();
        let mut stuck_now = std::collections::HashSet::new();
        {
            let census = self.ctx.census();
            for (id, summary) in census.iter() {
                let Some(count) = counts.get_mut(summary.definition.as_str()) else {
                    continue;
                };
                if summary.parked {
                    count.needs_attention += 1;
                }
                if summary.stuck_at.is_some_and(|at| now >= at) {
                    count.stuck += 1;
                    if !self.stuck.contains(id) {
                        tracing::warn!(
                            saga_id = %id,
                            definition = %summary.definition,
                            multiple = self.ctx.stuck_multiple,
                            "saga stuck: no progress for longer than the stuck multiple of its step timeout"
                        );
                    }
                    stuck_now.insert(id.clone());
                }
            }
        }
        self.stuck = stuck_now;
        let mut lines: Vec<AttentionCount> = counts.into_values().collect();
        lines.sort_by(|a, b| a.saga.cmp(&b.saga));
        self.ctx.observer.attention(&lines);
    }

    /// Sagas this node holds: with an actor, or dormant.
    fn live(&self) -> usize {
        self.actors.len() + self.dormant.len()
    }

    /// Asks every actor idle for [`Context::passivate_after`] (while the node holds more than
    /// [`Context::passivate_above`] actors) or for [`Context::passivate_always_after`] to
    /// passivate. From now on, events for its saga are queued here until it has stopped.
    fn passivate_idle(&mut self) {
        let crowded = self.actors.len() > self.ctx.passivate_above;
        let Some(after) = self.ctx.passivation_after(crowded) else {
            return;
        };
        let idle_since = (self.ctx.clock)() - i64::try_from(after.as_millis()).unwrap_or(i64::MAX);
        let idle: Vec<String> = {
            let census = self.ctx.census();
            census
                .iter()
                .filter(|(id, line)| {
                    line.last_active <= idle_since
                        && self.actors.contains_key(*id)
                        && !self.passivating.contains_key(*id)
                })
                .map(|(id, _)| id.clone())
                .collect()
        };
        for id in idle {
            if let Some(live) = self.actors.get(&id) {
                if live.actor.cast(SagaMsg::Passivate).is_ok() {
                    self.passivating.insert(id, Vec::new());
                }
            }
        }
    }

    /// Keeps a passivated saga dormant until `wake_at`.
    fn sleep(
        &mut self,
        myself: &ActorRef<CoordinatorMsg>,
        saga_id: String,
        wake_at: Option<Millis>,
    ) {
        if let Some(at) = wake_at {
            self.wakeups.insert((at, saga_id.clone()));
            self.schedule_wake(myself, at);
        }
        self.dormant.insert(saga_id, wake_at);
    }

    fn schedule_wake(&mut self, myself: &ActorRef<CoordinatorMsg>, at: Millis) {
        if self.wake_scheduled.is_some_and(|s| s <= at) {
            return;
        }
        self.wake_scheduled = Some(at);
        let delay = u64::try_from(at - (self.ctx.clock)()).unwrap_or(0);
        myself.send_after(Duration::from_millis(delay), || CoordinatorMsg::Wake);
    }

    /// Brings back the dormant sagas that are due, each with a tick.
    async fn wake(&mut self, myself: &ActorRef<CoordinatorMsg>) {
        self.wake_scheduled = None;
        let now = (self.ctx.clock)();
        while let Some((at, id)) = self.wakeups.first().cloned() {
            if at > now {
                self.schedule_wake(myself, at);
                break;
            }
            self.wakeups.pop_first();
            if self.dormant.get(&id) != Some(&Some(at)) {
                continue; // woken since by an event
            }
            match self.actor_for(myself, &id).await {
                Ok(live) => {
                    let _ = live.actor.cast(SagaMsg::Tick);
                }
                Err(e) => {
                    tracing::error!(saga_id = %id, error = %e, "cannot spawn saga actor");
                    self.sleep(myself, id, Some(now + 1_000));
                }
            }
        }
    }

    /// Gives the events that arrived while a saga's actor stopped to a new actor, in order.
    async fn hand_over(
        &mut self,
        myself: &ActorRef<CoordinatorMsg>,
        saga_id: &str,
        queued: Vec<Queued>,
    ) {
        if queued.is_empty() {
            return;
        }
        match self.actor_for(myself, saga_id).await {
            Ok(live) => {
                for (input, delivery) in queued {
                    // If the send fails the delivery is dropped un-acked: JetStream redelivers.
                    let _ = live.deliver(input, delivery);
                }
            }
            Err(e) => {
                tracing::error!(saga_id, error = %e, "cannot spawn saga actor");
                for (_, delivery) in queued {
                    delivery.nak(Duration::from_secs(1)).await;
                }
            }
        }
    }

    async fn actor_for(
        &mut self,
        myself: &ActorRef<CoordinatorMsg>,
        saga_id: &str,
    ) -> Result<Live, ActorProcessingErr> {
        if let Some(live) = self.actors.get(saga_id) {
            return Ok(live.clone());
        }
        // A dormant saga comes back (its stale wake-up entry is skipped when it falls due).
        self.dormant.remove(saga_id);
        let queued = Arc::new(AtomicUsize::new(0));
        let args = SagaArgs {
            id: saga_id.to_string(),
            ctx: self.ctx.clone(),
            coordinator: myself.clone(),
            queued: queued.clone(),
        };
        let (actor, _) = Actor::spawn_linked(None, SagaActor, args, myself.get_cell()).await?;
        self.ids.insert(actor.get_id(), saga_id.to_string());
        let live = Live { actor, queued };
        self.actors.insert(saga_id.to_string(), live.clone());
        Ok(live)
    }
}

/// A live saga actor, and the count of its events sent and not yet taken from its mailbox.
#[derive(Clone)]
struct Live {
    actor: ActorRef<SagaMsg>,
    queued: Arc<AtomicUsize>,
}

impl Live {
    /// Sends the actor an event, counting it as queued until the actor takes it.
    // The error hands the message back (the actor is gone: rare); boxing it would cost an
    // allocation on every send instead.
    #[allow(clippy::result_large_err)]
    fn deliver(
        &self,
        input: Input,
        delivery: Box<dyn Delivery>,
    ) -> Result<(), ractor::MessagingErr<SagaMsg>> {
        self.queued.fetch_add(1, Ordering::SeqCst);
        let sent = self.actor.cast(SagaMsg::Deliver(input, delivery));
        if sent.is_err() {
            self.queued.fetch_sub(1, Ordering::SeqCst);
        }
        sent
    }
}

/// Stop reason of a passivated saga actor.
const PASSIVATED: &str = "passivated";

mod saga;
pub use saga::{SagaActor, SagaArgs, SagaMsg, SagaState};
