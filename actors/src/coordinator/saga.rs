//! One saga's actor: loads the snapshot, applies each event to the pure machine, saves it
//! (compare-and-set), publishes what the transition asks for, acks, and arms its timer. Routed
//! to and supervised by the [`Coordinator`](super::Coordinator).

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use ractor::{Actor, ActorProcessingErr, ActorRef};
use tokio::task::JoinHandle;

use super::{event_retry_delay, Context, CoordinatorMsg, Input, Summary, PASSIVATED};
use crate::definition::SagaDefinition;
use crate::machine::{
    CommandSpec, Effect, Event, Happening, Millis, Phase, ReplyFit, Saga, StepPhase, Transition,
};
use crate::ports::{Delivery, Error as PortError, Observer};
use crate::service::restart_backoff;

/// Hosts one saga's state machine (no data; see [`SagaState`]).
#[derive(Debug, Default)]
pub struct SagaActor;

/// Arguments of [`SagaActor`].
pub struct SagaArgs {
    pub(super) id: String,
    pub(super) ctx: Arc<Context>,
    pub(super) coordinator: ActorRef<CoordinatorMsg>,
    pub(super) queued: Arc<AtomicUsize>,
}

/// Messages of [`SagaActor`].
pub enum SagaMsg {
    /// An event from the saga's subject.
    Deliver(Input, Box<dyn Delivery>),
    /// Reload, republish in-flight commands, re-arm the timer.
    Recover,
    /// A due time passed.
    Tick,
    /// Stop and leave the saga dormant (the coordinator holds its next due time).
    Passivate,
}

/// State of [`SagaActor`].
pub struct SagaState {
    id: String,
    ctx: Arc<Context>,
    loaded: Option<Loaded>,
    timer: Option<JoinHandle<()>>,
    /// The saga does not exist or can never be loaded here: the actor stops.
    unusable: bool,
    /// Whether `loaded` comes from memory (kept since an earlier message) rather than a read
    /// of the store for this message.
    loaded_from_cache: bool,
    /// Who to tell when passivated.
    coordinator: ActorRef<CoordinatorMsg>,
    /// Stopped by passivation: the saga stays in the census.
    passivated: bool,
    /// This saga's events sent to the actor and not yet taken from its mailbox.
    queued: Arc<AtomicUsize>,
    /// Changes applied to `loaded` but not yet written, and the events that made them.
    unsaved: Option<Unsaved>,
}

/// Transitions applied and not yet written (see [`Applied::Deferred`]): their events are
/// acked only once a write holds them.
struct Unsaved {
    /// The snapshot as last written.
    before: Before,
    deliveries: Vec<Box<dyn Delivery>>,
}

struct Loaded {
    saga: Saga,
    revision: u64,
    def: Arc<SagaDefinition>,
}

/// What applying an event did.
enum Applied {
    /// The snapshot changed and was persisted; if the event was a reply the machine refused
    /// (and recorded), why: it is dead-lettered instead of acked.
    Changed(Option<String>),
    /// Nothing to do (a duplicate, a late reply, a finished saga).
    Unchanged,
    /// The snapshot changed, with no effect to carry out, and the saga's next event is already
    /// waiting: the write is left to that event's transition, which then covers both (one
    /// write instead of two, e.g. when the replies of parallel steps arrive together). The
    /// event is acked after that write.
    Deferred,
}

/// Why an event could not be handled now.
enum Failure {
    /// Retry later (the store or NATS is unavailable).
    Transient(String),
    /// The saga lost a compare-and-set: reload and retry at once.
    Conflict,
    /// The event can never be handled: dead-letter it.
    Permanent(String),
}

impl Failure {
    /// What a failed snapshot write means for the event(s) it held.
    fn of_write(e: PortError) -> Self {
        match e {
            PortError::Conflict { .. } => Failure::Conflict,
            e => Failure::Transient(e.to_string()),
        }
    }
}

impl Actor for SagaActor {
    type Msg = SagaMsg;
    type State = SagaState;
    type Arguments = SagaArgs;

    async fn pre_start(
        &self,
        _myself: ActorRef<Self::Msg>,
        args: SagaArgs,
    ) -> Result<Self::State, ActorProcessingErr> {
        // Loading happens on the first message, so spawning costs the coordinator no I/O.
        Ok(SagaState {
            id: args.id,
            ctx: args.ctx,
            loaded: None,
            timer: None,
            unusable: false,
            loaded_from_cache: false,
            coordinator: args.coordinator,
            passivated: false,
            queued: args.queued,
            unsaved: None,
        })
    }

    async fn handle(
        &self,
        myself: ActorRef<Self::Msg>,
        msg: Self::Msg,
        state: &mut Self::State,
    ) -> Result<(), ActorProcessingErr> {
        // The work runs in a boxed future that exists only while a message is handled: the
        // actor's task, which lives as long as the saga, then stays small while it waits
        // (its size would otherwise be that of the largest future below, kilobytes per saga).
        Box::pin(async move {
            match msg {
                SagaMsg::Deliver(input, delivery) => {
                    // Saturating: an event sent other than through `Live::deliver` is not counted.
                    let _ = state
                        .queued
                        .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1));
                    state.on_delivery(input, delivery).await;
                }
                SagaMsg::Recover => {
                    state.flush().await;
                    state.loaded = None;
                    match state.load().await {
                        Ok(true) => {
                            // Recovered after a restart or a take-over: the previous owner
                            // may have died before announcing its last change.
                            state.reannounce().await;
                            state.resend_in_flight().await;
                        }
                        Ok(false) => {
                            tracing::warn!(saga_id = %state.id, "asked to recover a saga that does not exist")
                        }
                        Err(Failure::Permanent(reason)) => {
                            tracing::error!(saga_id = %state.id, reason, "cannot recover saga")
                        }
                        Err(_) => {
                            // Try again shortly; the coordinator's map keeps us alive meanwhile.
                            myself.send_after(Duration::from_secs(1), || SagaMsg::Recover);
                            return Ok(());
                        }
                    }
                }
                SagaMsg::Passivate => {
                    state.flush().await;
                    if state.unusable || state.loaded.as_ref().is_some_and(|l| l.saga.is_terminal())
                    {
                        // Nothing worth keeping dormant: stop as usual (the coordinator hands
                        // any queued event to a new actor).
                        myself.stop(None);
                        return Ok(());
                    }
                    let wake_at = match state.loaded.as_ref() {
                        Some(l) => l.saga.next_wakeup(),
                        // Between a transient failure and its retry: wake soon and reload.
                        None => Some(state.now() + 1_000),
                    };
                    if let Some(t) = state.timer.take() {
                        t.abort();
                    }
                    state.passivated = true;
                    let _ = state.coordinator.cast(CoordinatorMsg::Passivated {
                        saga_id: state.id.clone(),
                        wake_at,
                    });
                    myself.stop(Some(PASSIVATED.to_string()));
                    return Ok(());
                }
                SagaMsg::Tick => {
                    // The timer that sent this tick has finished; a newer one (if re-armed since)
                    // is aborted and replaced by `arm_timer` below.
                    if let Err(f) = state.process(Event::Tick, None, false).await {
                        let delay = match f {
                            Failure::Conflict => {
                                // Our copy is stale: retrying it would lose every compare-and-set.
                                // Reload before the next tick.
                                state.loaded = None;
                                Duration::ZERO
                            }
                            _ => Duration::from_secs(1),
                        };
                        if let Some(old) = state.timer.replace(schedule_tick(&myself, delay)) {
                            old.abort();
                        }
                        return Ok(());
                    }
                }
            }
            // Nothing more to fold into this write: make it now.
            if state.queued.load(Ordering::SeqCst) == 0 {
                state.flush().await;
            }
            state.arm_timer(&myself);
            state.report();
            // Stop once finished or unusable, but not while events of this saga wait in the
            // mailbox: stopping drops them, and they would come back only after the consumer's
            // `ack_wait` (a burst of duplicates at a finished saga waited 30 s). After a
            // transient failure the actor stays (with no snapshot loaded) and reloads on the
            // next event.
            let done =
                state.unusable || state.loaded.as_ref().is_some_and(|l| l.saga.is_terminal());
            if done && state.queued.load(Ordering::SeqCst) == 0 {
                myself.stop(None);
            }
            Ok(())
        })
        .await
    }

    async fn post_stop(
        &self,
        _myself: ActorRef<Self::Msg>,
        state: &mut Self::State,
    ) -> Result<(), ActorProcessingErr> {
        if let Some(t) = state.timer.take() {
            t.abort();
        }
        if !state.passivated {
            state.forget();
        }
        Ok(())
    }
}

fn schedule_tick(myself: &ActorRef<SagaMsg>, delay: Duration) -> JoinHandle<()> {
    let me = myself.clone();
    tokio::spawn(async move {
        tokio::time::sleep(delay).await;
        let _ = me.cast(SagaMsg::Tick);
    })
}

impl SagaState {
    fn now(&self) -> Millis {
        (self.ctx.clock)()
    }

    /// Keeps this saga's line of the census up to date (none once finished).
    fn report(&self) {
        let mut census = self.ctx.census();
        let Some(l) = self.loaded.as_ref().filter(|l| !l.saga.is_terminal()) else {
            census.remove(&self.id);
            return;
        };
        let parked = l.saga.phase == Phase::NeedsAttention;
        let stuck_at = l.saga.stuck_at(&l.def, self.ctx.stuck_multiple);
        let last_active = self.now();
        // Runs after every message: update the line in place, allocate only the first time.
        match census.get_mut(&self.id) {
            Some(line) => {
                line.parked = parked;
                line.stuck_at = stuck_at;
                line.last_active = last_active;
            }
            None => {
                census.insert(
                    self.id.clone(),
                    Summary {
                        definition: l.def.name.clone(),
                        parked,
                        stuck_at,
                        last_active,
                    },
                );
            }
        }
    }

    fn forget(&self) {
        self.ctx.census().remove(&self.id);
    }

    /// Takes `saga` (at `revision`) as the loaded copy, as if read from the store.
    fn adopt(&mut self, saga: Saga, revision: u64) {
        let Some(def) = self
            .ctx
            .definitions
            .version(&saga.definition, saga.fingerprint)
        else {
            // Not known here yet: `load` reads the store and the definition's version.
            return;
        };
        if let Err(e) = saga.consistent_with(&def) {
            // Not what the creator wrote: read the stored snapshot instead.
            tracing::warn!(saga_id = %self.id, error = %e, "embedded snapshot refused");
            return;
        }
        self.loaded = Some(Loaded {
            saga,
            revision,
            def,
        });
    }

    /// The version of its definition `saga` started on: from the catalog, else from the
    /// definition source (applied on another node). A saga whose version is known nowhere
    /// (started before versions were stored, under a file changed since) runs on the active
    /// version if its snapshot fits it, as before versions.
    async fn definition_of(&self, saga: &Saga) -> Result<Arc<SagaDefinition>, Failure> {
        let (name, fingerprint) = (&saga.definition, saga.fingerprint);
        if let Some(def) = self.ctx.definitions.version(name, fingerprint) {
            return Ok(def);
        }
        match self.ctx.definition_source.load(name, fingerprint).await {
            Ok(Some(def)) => Ok(self.ctx.definitions.insert(def)),
            Ok(None) => match self.ctx.definitions.active(name) {
                Some(def) => {
                    tracing::warn!(
                        saga_id = %self.id, definition = %name,
                        version = %crate::definition::plan::version_of(fingerprint),
                        active = %crate::definition::plan::version(&def),
                        "the version this saga started on is stored nowhere: running it on the active version"
                    );
                    Ok(def)
                }
                None => Err(Failure::Permanent(format!(
                    "saga definition `{name}` is not loaded on this node"
                ))),
            },
            Err(PortError::Corrupt { message, .. }) => Err(Failure::Permanent(message)),
            Err(e) => Err(Failure::Transient(e.to_string())),
        }
    }

    /// Loads the snapshot if not loaded; `Ok(false)` if the saga does not exist.
    async fn load(&mut self) -> Result<bool, Failure> {
        if self.loaded.is_some() {
            return Ok(true);
        }
        self.loaded_from_cache = false;
        match self.ctx.store.load(&self.id).await {
            Ok(Some((saga, revision))) => {
                let def = match self.definition_of(&saga).await {
                    Ok(def) => def,
                    Err(e) => {
                        self.unusable = matches!(e, Failure::Permanent(_));
                        return Err(e);
                    }
                };
                if let Err(e) = saga.consistent_with(&def) {
                    self.unusable = true;
                    return Err(Failure::Permanent(format!(
                        "stored snapshot of saga `{}` cannot run under definition `{}`: {e}",
                        self.id, def.name
                    )));
                }
                self.loaded = Some(Loaded {
                    saga,
                    revision,
                    def,
                });
                Ok(true)
            }
            Ok(None) => {
                self.unusable = true;
                Ok(false)
            }
            Err(PortError::Corrupt { message, .. }) => {
                self.unusable = true;
                Err(Failure::Permanent(message))
            }
            Err(e) => Err(Failure::Transient(e.to_string())),
        }
    }

    async fn on_delivery(&mut self, input: Input, delivery: Box<dyn Delivery>) {
        // A copy kept from an earlier message may be stale if another node advanced the saga.
        self.loaded_from_cache = self.loaded.is_some();
        let mut sent_by_creator = false;
        let input = match input {
            Input::Created {
                saga,
                revision,
                commands_sent,
            } => {
                if self.loaded.is_none() && saga.id == self.id {
                    self.adopt(*saga, revision);
                    sent_by_creator = commands_sent && self.loaded.is_some();
                    if let Some(l) = self.loaded.as_ref().filter(|_| sent_by_creator) {
                        self.observe_sent(l, &l.saga.in_flight());
                    }
                }
                Input::Started
            }
            other => other,
        };
        match self.load().await {
            Ok(true) => {}
            Ok(false) => {
                self.ctx.observer.event_refused("unknown_saga");
                delivery
                    .dead_letter(format!("event for unknown saga `{}`", self.id))
                    .await;
                return;
            }
            Err(Failure::Permanent(reason)) => {
                self.ctx.observer.event_refused("unloadable");
                delivery.dead_letter(reason).await;
                return;
            }
            Err(Failure::Transient(e)) => {
                self.retry_later(delivery, "cannot load saga", &e).await;
                return;
            }
            Err(Failure::Conflict) => {
                delivery.nak(Duration::ZERO).await;
                return;
            }
        }
        // For a reply the machine will not apply: why, for the ignored-events metric.
        let mut ignored = None;
        // For a reply refused (recorded in the history, then dead-lettered): the metric's
        // label and the dead letter's reason, in case the machine records nothing (a finished
        // saga).
        let mut refused: Option<(&'static str, String)> = None;
        let event = match input {
            Input::Started | Input::Created { .. } => {
                if !sent_by_creator {
                    self.resend_in_flight().await;
                }
                if delivery.delivered() > 1 {
                    self.reannounce().await;
                }
                delivery.ack().await;
                return;
            }
            Input::Cancel { reason } => Event::Cancel { reason },
            Input::Signal { id, name, payload } => Event::Signal { id, name, payload },
            Input::Intervene(intervention) => {
                tracing::info!(
                    saga_id = %self.id,
                    action = intervention.action.name(),
                    operator = %intervention.operator,
                    reason = %intervention.reason,
                    "operator intervention"
                );
                Event::Intervene(intervention)
            }
            Input::Reply {
                service,
                step,
                attempt,
                compensation,
                outcome,
            } => {
                let index = self.loaded.as_ref().and_then(|l| step_index(&l.def, &step));
                let Some(i) = index else {
                    let definition = self.loaded.as_ref().map_or("", |l| l.def.name.as_str());
                    let reason = format!(
                        "reply names unknown step `{step}`: definition `{definition}` has no such step"
                    );
                    refused = Some(("unknown_step", reason.clone()));
                    let event = Event::ReplyRefused { step: None, reason };
                    self.apply_event(event, None, refused, delivery).await;
                    return;
                };
                // A reply comes from the service its command went to: NATS permissions let each
                // service publish only on its own reply subject, and this holds them to it.
                // (Compared in place: a string is copied only for a refusal.)
                let wrong = service.as_deref().and_then(|from| {
                    let s = self.loaded.as_ref()?.def.step(i)?;
                    let action = if compensation {
                        s.compensation.as_ref()?
                    } else {
                        &s.action
                    };
                    (action.service != from).then(|| (from, action.service.clone()))
                });
                if let Some((from, to)) = wrong {
                    let reason = format!(
                        "reply for step `{step}` came from service `{from}`; its command went to service `{to}`"
                    );
                    refused = Some(("wrong_service", reason.clone()));
                    let event = Event::ReplyRefused {
                        step: Some(i),
                        reason,
                    };
                    self.apply_event(event, None, refused, delivery).await;
                    return;
                }
                // What the reply is to the saga. A reply not applied is checked against the
                // stored snapshot first: a copy kept in memory may be behind.
                let mut fit = self.reply_fit(i, attempt, compensation, &outcome);
                if fit.reason().is_some() && self.loaded_from_cache {
                    self.flush().await;
                    self.loaded = None;
                    if let Err(f) = self.load().await {
                        let why = match f {
                            Failure::Transient(e) | Failure::Permanent(e) => e,
                            Failure::Conflict => "conflict".to_string(),
                        };
                        self.retry_later(delivery, "cannot load saga", &why).await;
                        return;
                    }
                    self.loaded_from_cache = false;
                    fit = self.reply_fit(i, attempt, compensation, &outcome);
                }
                match fit {
                    ReplyFit::Expected => {}
                    ReplyFit::Duplicate => ignored = Some("duplicate"),
                    ReplyFit::Late(_) => ignored = Some("stale_attempt"),
                    ReplyFit::Unsent(why) => refused = Some(("unsent_attempt", why)),
                    ReplyFit::Contradicts(why) => refused = Some(("contradicting_reply", why)),
                }
                Event::Reply {
                    step: i,
                    attempt,
                    compensation,
                    outcome,
                }
            }
        };
        self.apply_event(event, ignored, refused, delivery).await;
    }

    /// Applies `event` and settles its delivery: acked once applied (or found to change
    /// nothing, counted under `ignored` if given), dead-lettered if it is a reply refused
    /// (`refused`: the metric's label and the reason, used when the machine records nothing).
    async fn apply_event(
        &mut self,
        event: Event,
        ignored: Option<&'static str>,
        refused: Option<(&'static str, String)>,
        delivery: Box<dyn Delivery>,
    ) {
        // A lost compare-and-set means our copy is stale: reload and apply again (the machine
        // ignores what was already applied), a bounded number of times.
        let mut verified = false;
        for _ in 0..4 {
            match self.process(event.clone(), Some(&*delivery), true).await {
                Ok(Applied::Changed(None)) => {
                    // (A late reply, recorded.)
                    if let Some(label) = ignored {
                        self.ctx.observer.event_ignored(label);
                    }
                    delivery.ack().await;
                    return;
                }
                Ok(Applied::Changed(Some(reason))) => {
                    let label = refused.as_ref().map_or("refused_reply", |r| r.0);
                    self.dead_letter_reply(label, &reason, delivery).await;
                    return;
                }
                Ok(Applied::Deferred) => {
                    if let Some(label) = ignored {
                        self.ctx.observer.event_ignored(label);
                    }
                    if let Some(u) = self.unsaved.as_mut() {
                        u.deliveries.push(delivery);
                    }
                    return;
                }
                Ok(Applied::Unchanged) if !verified && self.loaded_from_cache => {
                    // The event looks like a duplicate, but our copy may be stale (another
                    // node advanced the saga during a partition hand-over): acking it on a
                    // stale copy would lose it. Check against the stored snapshot once
                    // (after writing what this actor applied and has not written yet).
                    verified = true;
                    self.flush().await;
                    self.loaded = None;
                }
                Ok(Applied::Unchanged) => {
                    if let Some((label, reason)) = refused {
                        // Refused, with nothing recorded (the saga has finished).
                        self.dead_letter_reply(label, &reason, delivery).await;
                        return;
                    }
                    if let Some(label) = ignored {
                        tracing::debug!(saga_id = %self.id, reason = label, "reply ignored");
                        self.ctx.observer.event_ignored(label);
                    }
                    if delivery.delivered() > 1 {
                        // Delivered again although applied: whoever applied it may have died
                        // before announcing what it changed.
                        self.reannounce().await;
                    }
                    delivery.ack().await;
                    return;
                }
                Err(Failure::Conflict) => {
                    self.loaded = None;
                    match self.load().await {
                        Ok(true) => self.resend_in_flight().await,
                        _ => break,
                    }
                }
                Err(Failure::Permanent(reason)) => {
                    self.ctx.observer.event_refused("inapplicable");
                    delivery.dead_letter(reason).await;
                    return;
                }
                Err(Failure::Transient(e)) => {
                    self.loaded = None;
                    self.retry_later(delivery, "cannot persist saga", &e).await;
                    return;
                }
            }
        }
        self.retry_later(
            delivery,
            "lost every compare-and-set",
            "the snapshot kept changing under this node",
        )
        .await;
    }

    /// Gives an event that failed for a transient reason back to JetStream with a growing
    /// delay, or, at its [`Context::event_deliveries`]-th delivery, dead-letters it with the
    /// last error: an event is never retried forever.
    async fn retry_later(&self, delivery: Box<dyn Delivery>, what: &str, error: &str) {
        let delivered = delivery.delivered();
        if delivered >= self.ctx.event_deliveries.max(1) {
            tracing::error!(saga_id = %self.id, error, delivered, "{what}; giving up on the event, dead-lettered");
            self.ctx.observer.event_refused("retries_exhausted");
            delivery
                .dead_letter(format!(
                    "{what} after {delivered} deliveries (saga `{}`): {error}",
                    self.id
                ))
                .await;
            return;
        }
        let delay = event_retry_delay(delivered);
        tracing::warn!(saga_id = %self.id, error, delivered, ?delay, "{what}, event will be retried");
        delivery.nak(delay).await;
    }

    /// What a reply to attempt `attempt` of step slot `i` reporting `outcome` is to the saga
    /// ([`Saga::reply_fit`]). The snapshot must be loaded.
    fn reply_fit(
        &self,
        i: usize,
        attempt: u32,
        compensation: bool,
        outcome: &Result<Vec<u8>, crate::machine::StepError>,
    ) -> ReplyFit {
        match self.loaded.as_ref() {
            Some(l) => {
                l.saga
                    .reply_fit(&l.def, i, attempt, compensation, outcome, &self.ctx.limits)
            }
            None => ReplyFit::Expected,
        }
    }

    /// Dead-letters a reply refused because of `reason` (recorded in the saga's history if
    /// it runs), counted under `label`.
    async fn dead_letter_reply(&self, label: &str, reason: &str, delivery: Box<dyn Delivery>) {
        tracing::warn!(saga_id = %self.id, reason, "reply refused");
        self.ctx.observer.event_refused(label);
        delivery
            .dead_letter(format!("{reason} (saga `{}`)", self.id))
            .await;
    }

    /// Applies `event`, persists, then carries out the effects and acks the events of the
    /// transitions this write also covers. With `may_defer`, a change with no effects is not
    /// written yet if another event of this saga is waiting ([`Applied::Deferred`]).
    async fn process(
        &mut self,
        event: Event,
        delivery: Option<&dyn Delivery>,
        may_defer: bool,
    ) -> Result<Applied, Failure> {
        if !self.load().await? {
            return Ok(Applied::Unchanged);
        }
        let now = self.now();
        let Some(l) = self.loaded.as_mut() else {
            return Ok(Applied::Unchanged);
        };
        // The machine changes the snapshot in place (no copy of the saga per event); if the
        // write fails, the copy is dropped and the next message reloads the stored one.
        let before = Before::of(&l.saga);
        let t: Transition = l
            .saga
            .apply_with_limits(&l.def, event, now, &self.ctx.limits)
            .map_err(|e| Failure::Permanent(e.to_string()))?;
        if !t.changed {
            return Ok(Applied::Unchanged);
        }
        if may_defer
            && t.effects.is_empty()
            && !l.saga.is_terminal()
            && l.saga.phase != Phase::NeedsAttention
            && self.queued.load(Ordering::SeqCst) > 0
        {
            self.unsaved.get_or_insert(Unsaved {
                before,
                deliveries: Vec::new(),
            });
            return Ok(Applied::Deferred);
        }
        // This write also covers the transitions deferred before it.
        let unsaved = self.unsaved.take();
        let before = match &unsaved {
            Some(u) => &u.before,
            None => &before,
        };
        match self.ctx.store.save(&l.saga, Some(l.revision)).await {
            Ok(r) => l.revision = r,
            Err(e) => {
                let failure = Failure::of_write(e);
                self.loaded = None;
                give_back(unsaved, &failure).await;
                return Err(failure);
            }
        }
        observe(&*self.ctx.observer, &l.def, before, &l.saga);
        let dead_letter = t.effects.iter().find_map(|e| match e {
            Effect::DeadLetterReply { reason } => Some(reason.clone()),
            _ => None,
        });
        self.carry_out(t.effects, delivery).await;
        if let Some(u) = unsaved {
            for d in u.deliveries {
                d.ack().await;
            }
        }
        Ok(Applied::Changed(dead_letter))
    }

    /// Writes the transitions deferred so far, if any, and acks their events. If the write
    /// fails, the copy is dropped and the events go back to JetStream to be applied again.
    async fn flush(&mut self) {
        let Some(unsaved) = self.unsaved.take() else {
            return;
        };
        let Some(l) = self.loaded.as_mut() else {
            give_back(Some(unsaved), &Failure::Conflict).await;
            return;
        };
        match self.ctx.store.save(&l.saga, Some(l.revision)).await {
            Ok(r) => {
                l.revision = r;
                observe(&*self.ctx.observer, &l.def, &unsaved.before, &l.saga);
                for d in unsaved.deliveries {
                    d.ack().await;
                }
            }
            Err(e) => {
                tracing::warn!(saga_id = %self.id, error = %e, "cannot persist saga, its latest events will be retried");
                let failure = Failure::of_write(e);
                self.loaded = None;
                give_back(Some(unsaved), &failure).await;
            }
        }
    }

    /// Tells the observer about attempts sent.
    fn observe_sent(&self, l: &Loaded, sends: &[CommandSpec]) {
        for c in sends {
            if let Some(step) = l.def.step(c.step) {
                self.ctx
                    .observer
                    .attempt_sent(&l.def.name, &step.name, step.timeout);
            }
        }
    }

    /// Publishes commands and status changes, retrying until NATS takes them: the snapshot
    /// already says they happened, so they must not be skipped.
    async fn carry_out(&self, effects: Vec<Effect>, delivery: Option<&dyn Delivery>) {
        let Some(l) = self.loaded.as_ref() else {
            return;
        };
        let sends: Vec<CommandSpec> = effects
            .iter()
            .filter_map(|e| {
                if let Effect::Send(c) = e {
                    Some(*c)
                } else {
                    None
                }
            })
            .collect();
        self.observe_sent(l, &sends);
        // Commands and status changes go out together: neither waits for the other's acks.
        let commands = async {
            if !sends.is_empty() {
                retry_forever(&self.id, "publish commands", delivery, || {
                    self.ctx.bus.send(&l.def, &l.saga, &sends)
                })
                .await;
            }
        };
        let statuses = async {
            self.settle_parking(l, &effects, delivery).await;
            let changes: Vec<(&str, &str)> = effects
                .iter()
                .filter_map(|e| {
                    if let Effect::StatusChanged { from, to } = e {
                        Some((from.as_str(), to.as_str()))
                    } else {
                        None
                    }
                })
                .collect();
            let first_seq = l.saga.status_seq + 1 - changes.len() as u64;
            for (k, (from, to)) in changes.into_iter().enumerate() {
                let seq = first_seq + k as u64;
                retry_forever(&self.id, "announce status", delivery, || {
                    self.ctx.bus.announce(&l.saga, from, to, seq)
                })
                .await;
            }
        };
        futures::join!(commands, statuses);
    }

    /// Dead-letters a saga that parked, or settles the dead letters of one an operator resumed.
    async fn settle_parking(
        &self,
        l: &Loaded,
        effects: &[Effect],
        delivery: Option<&dyn Delivery>,
    ) {
        for effect in effects {
            match effect {
                Effect::Parked { reason, count } => {
                    tracing::error!(saga_id = %self.id, definition = %l.def.name, reason, "saga parked NEEDS_ATTENTION");
                    self.ctx.observer.saga_parked(&l.def.name);
                    retry_forever(&self.id, "dead-letter parked saga", delivery, || {
                        self.ctx.parker.park(&l.saga, reason, *count)
                    })
                    .await;
                }
                Effect::Unparked {
                    operator,
                    action,
                    request,
                } => {
                    tracing::info!(saga_id = %self.id, operator, action, "parked saga resumed by an operator");
                    if request.starts_with(crate::machine::REPLAY_REQUEST_PREFIX) {
                        // Resumed by replaying its dead letter: the replay settles that one.
                        continue;
                    }
                    retry_forever(
                        &self.id,
                        "settle the parked saga's dead letters",
                        delivery,
                        || self.ctx.parker.unpark(&l.saga, operator, action),
                    )
                    .await;
                }
                _ => {}
            }
        }
    }

    /// Announces the saga's current status again if it changed within
    /// [`Context::reannounce_within`] (see there); the server drops it as a duplicate if the
    /// first announcement went out.
    async fn reannounce(&self) {
        let Some(l) = self.loaded.as_ref() else {
            return;
        };
        let within = i64::try_from(self.ctx.reannounce_within.as_millis()).unwrap_or(i64::MAX);
        if l.saga.status_seq == 0 || within == 0 || self.now() - l.saga.updated_at > within {
            return;
        }
        let mut statuses = l.saga.history.iter().rev().filter_map(|h| match &h.what {
            Happening::Status { status } => Some(status.as_str()),
            _ => None,
        });
        // The status before the current one: the one logged before it, or the first status.
        let from = match statuses.next() {
            Some(last) if last == l.saga.status => {
                statuses.next().unwrap_or(l.def.statuses.initial.as_str())
            }
            _ => "",
        };
        retry_forever(&self.id, "announce status again", None, || {
            self.ctx
                .bus
                .announce(&l.saga, from, &l.saga.status, l.saga.status_seq)
        })
        .await;
    }

    async fn resend_in_flight(&self) {
        let Some(l) = self.loaded.as_ref() else {
            return;
        };
        if l.saga.phase == Phase::NeedsAttention {
            // The dead letter may not have been written before a crash; it is idempotent on
            // (saga, parking), so writing it again is harmless.
            let count = l.saga.parkings();
            let reason = l.saga.reason.clone().unwrap_or_default();
            retry_forever(&self.id, "dead-letter parked saga", None, || {
                self.ctx.parker.park(&l.saga, &reason, count)
            })
            .await;
        }
        let in_flight = l.saga.in_flight();
        if !in_flight.is_empty() {
            self.observe_sent(l, &in_flight);
            retry_forever(&self.id, "republish in-flight commands", None, || {
                self.ctx.bus.send(&l.def, &l.saga, &in_flight)
            })
            .await;
        }
    }

    fn arm_timer(&mut self, myself: &ActorRef<SagaMsg>) {
        if let Some(t) = self.timer.take() {
            t.abort();
        }
        let Some(at) = self.loaded.as_ref().and_then(|l| l.saga.next_wakeup()) else {
            return;
        };
        let delay = u64::try_from(at.saturating_sub(self.now())).unwrap_or(0);
        self.timer = Some(schedule_tick(myself, Duration::from_millis(delay)));
    }
}

/// What [`observe`] needs of a snapshot before a change.
struct Before {
    /// Per step: its phase, and when its in-flight attempt times out (its send time plus the
    /// step timeout).
    steps: Vec<(StepPhase, Option<Millis>)>,
    /// History entries logged so far (compaction included).
    logged: u64,
    phase: Phase,
}

impl Before {
    fn of(saga: &Saga) -> Self {
        Before {
            steps: saga
                .steps
                .iter()
                .map(|s| {
                    let in_flight = matches!(s.phase, StepPhase::Running | StepPhase::Compensating);
                    (s.phase, in_flight.then_some(s.due_at).flatten())
                })
                .collect(),
            logged: saga.logged(),
            phase: saga.phase,
        }
    }
}

/// Reports to `observer` what changed between two persisted snapshots of a saga.
fn observe(observer: &dyn Observer, def: &SagaDefinition, old: &Before, new: &Saga) {
    let saga = def.name.as_str();
    let ms = |from: Option<Millis>, to: Option<Millis>| match (from, to) {
        (Some(a), Some(b)) => Duration::from_millis(u64::try_from(b - a).unwrap_or(0)),
        _ => Duration::ZERO,
    };
    for (i, ((before, _), after)) in old.steps.iter().zip(new.steps.iter()).enumerate() {
        let Some(step) = def.step(i) else {
            continue;
        };
        let name = step.name.as_str();
        if *before == after.phase {
            continue;
        }
        let kind = after.last_error.as_ref().map(|e| e.kind.as_str());
        match after.phase {
            StepPhase::Succeeded => observer.step_settled(
                saga,
                name,
                false,
                ms(after.started_at, after.finished_at),
                None,
            ),
            StepPhase::Failed => observer.step_settled(
                saga,
                name,
                false,
                ms(after.started_at, after.finished_at),
                kind,
            ),
            StepPhase::Compensated | StepPhase::CompensationFailed => {
                // From the first compensation attempt to the end.
                let began = new
                    .history
                    .iter()
                    .find(|h| {
                        h.step == Some(i as u32)
                            && matches!(h.what, Happening::CompensationSent { .. })
                    })
                    .map(|h| h.at);
                let kind = if after.phase == StepPhase::Compensated {
                    None
                } else {
                    kind
                };
                observer.step_settled(saga, name, true, ms(began, after.finished_at), kind);
            }
            _ => {}
        }
    }
    // Attempts that ended (answered or timed out) with this change, and the failed ones.
    for h in new.logged_since(old.logged) {
        let (compensation, kind) = match &h.what {
            Happening::Succeeded { .. } => (false, None),
            Happening::AttemptFailed { kind, .. } => (false, Some(kind.as_str())),
            Happening::Compensated => (true, None),
            Happening::CompensationAttemptFailed { kind, .. } => (true, Some(kind.as_str())),
            _ => continue,
        };
        let Some(i) = h.step.map(|i| i as usize) else {
            continue;
        };
        let Some(step) = def.step(i) else {
            continue;
        };
        // How much of its timeout the attempt used: the attempt was sent at `due - timeout`.
        if let Some(due) = old.steps.get(i).and_then(|(_, due)| *due) {
            let timeout = i64::try_from(step.timeout.as_millis()).unwrap_or(i64::MAX);
            if timeout > 0 {
                let left = (due - h.at).clamp(0, timeout);
                observer.attempt_share(saga, &step.name, (timeout - left) as f64 / timeout as f64);
            }
        }
        let service = if compensation {
            step.compensation
                .as_ref()
                .map_or(&step.action.service, |c| &c.service)
        } else {
            &step.action.service
        };
        observer.step_attempt(saga, &step.name, service, compensation);
        if let Some(kind) = kind {
            observer.step_error(saga, &step.name, service, kind);
        }
    }
    if !old.phase.is_terminal() && new.phase.is_terminal() {
        observer.saga_finished(saga, new.phase);
    }
}

/// Returns the events of unwritten transitions to JetStream, to be applied again: at once
/// after a lost compare-and-set (the reloaded copy takes them), after a second otherwise.
async fn give_back(unsaved: Option<Unsaved>, why: &Failure) {
    let Some(u) = unsaved else {
        return;
    };
    let delay = match why {
        Failure::Conflict => Duration::ZERO,
        _ => Duration::from_secs(1),
    };
    for d in u.deliveries {
        d.nak(delay).await;
    }
}

fn step_index(def: &SagaDefinition, name: &str) -> Option<usize> {
    def.steps.iter().position(|s| s.name == name).or_else(|| {
        def.after_compensation
            .as_ref()
            .filter(|s| s.name == name)
            .map(|_| def.steps.len())
    })
}

async fn retry_forever<F, Fut>(saga_id: &str, what: &str, delivery: Option<&dyn Delivery>, mut f: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<(), PortError>>,
{
    let mut failures = 0u32;
    loop {
        match f().await {
            Ok(()) => return,
            Err(e) => {
                failures += 1;
                let delay = restart_backoff(failures);
                tracing::warn!(saga_id, error = %e, attempt = failures, ?delay, "{what} failed, retrying");
                if let Some(d) = delivery {
                    d.in_progress().await;
                }
                tokio::time::sleep(delay).await;
            }
        }
    }
}
