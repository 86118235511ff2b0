//! Integration tests of the coordinator actors ([`Coordinator`] and its saga actors) over
//! in-memory ports: a compare-and-set store with injectable failures, a command bus that records
//! what it publishes and feeds a scripted participant, and deliveries that behave like
//! JetStream's (a nak or a message dropped un-acked comes back later).
//!
//! Real time, real timers: every wait polls a condition with a generous timeout, nothing asserts
//! after a bare sleep.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::HashMap;
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use async_trait::async_trait;
use ractor::{Actor, ActorRef};
use sagaflow_actors::coordinator::{Context, Coordinator, CoordinatorMsg, Input};
use sagaflow_actors::definition::{RetryPolicy, SagaDefinition};
use sagaflow_actors::machine::{
    CommandSpec, Happening, Intervention, Millis, OperatorAction, Phase, Saga, StepError,
    StepPhase, TIMEOUT_KIND,
};
use sagaflow_actors::ports::{
    AttentionCount, CommandBus, Delivery, Error as PortError, Observer, Parker, StateStore,
};
use sagaflow_actors::wire;
use tokio::sync::mpsc;

/// Upper bound of every wait: far above what the tests need, even on a loaded machine.
const PATIENCE: Duration = Duration::from_secs(15);

fn now_millis() -> Millis {
    Millis::try_from(
        SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap()
            .as_millis(),
    )
    .unwrap()
}

/// The order saga with notify as its pivot (as shipped until 2026-11-27): a sequential stage, a
/// parallel stage and a pivot alone in the last stage.
fn order() -> SagaDefinition {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/order_with_pivot.toml");
    let source = std::fs::read_to_string(&path).unwrap();
    sagaflow_actors::definition::parse(&source, &path).expect("order_with_pivot.toml is valid")
}

/// The order saga with 50 ms timeouts and short retries, for tests of the timers.
fn fast_order() -> SagaDefinition {
    let mut def = order();
    let fast = |max_attempts| RetryPolicy {
        max_attempts,
        initial_backoff: Duration::from_millis(10),
        max_backoff: Duration::from_millis(20),
        multiplier: 2.0,
        non_retryable: vec!["declined".to_string()],
    };
    for step in def
        .steps
        .iter_mut()
        .chain(def.after_compensation.iter_mut())
    {
        step.timeout = Duration::from_millis(50);
        step.retry = fast(2);
        step.compensation_retry = fast(3);
    }
    def.deadline = Duration::from_secs(60);
    def
}

/// Answers every command but the forward `charge`, which waits forever.
fn charge_never_answered() -> Behaviour {
    Arc::new(|c: &Command| (c.step != "charge" || c.spec.compensation).then(|| Ok(b"{}".to_vec())))
}

/// Polls `condition` until it holds; panics after [`PATIENCE`].
async fn eventually(what: &str, mut condition: impl FnMut() -> bool) {
    let start = Instant::now();
    while !condition() {
        assert!(start.elapsed() < PATIENCE, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

// ---------------------------------------------------------------------------------------------
// The store.
// ---------------------------------------------------------------------------------------------

/// Snapshots in a map, encoded as in the real bucket, with a revision per write.
#[derive(Default)]
struct MemStore {
    inner: Mutex<StoreInner>,
    loads_held: LoadGate,
}

/// Holds loads while closed (`true` = open).
struct LoadGate(tokio::sync::watch::Sender<bool>);

impl Default for LoadGate {
    fn default() -> Self {
        LoadGate(tokio::sync::watch::channel(true).0)
    }
}

#[derive(Default)]
struct StoreInner {
    sagas: HashMap<String, (Vec<u8>, u64)>,
    last_revision: u64,
    failing_loads: u32,
    failing_saves: u32,
    concurrent_write: bool,
    saves: u32,
    loads: u32,
}

impl MemStore {
    fn get(&self, id: &str) -> Option<Saga> {
        let inner = self.inner.lock().unwrap();
        inner
            .sagas
            .get(id)
            .map(|(bytes, _)| wire::decode_snapshot(bytes).unwrap())
    }

    fn phase(&self, id: &str) -> Option<Phase> {
        self.get(id).map(|s| s.phase)
    }

    /// The next `n` loads fail with a transport error.
    fn fail_loads(&self, n: u32) {
        self.inner.lock().unwrap().failing_loads = n;
    }

    /// The next `n` saves fail with a transport error (and store nothing).
    fn fail_saves(&self, n: u32) {
        self.inner.lock().unwrap().failing_saves = n;
    }

    /// Someone else rewrites the snapshot just before the next save, which then loses its
    /// compare-and-set.
    fn write_concurrently_before_next_save(&self) {
        self.inner.lock().unwrap().concurrent_write = true;
    }

    fn successful_saves(&self) -> u32 {
        self.inner.lock().unwrap().saves
    }

    /// Loads wait (after being counted) until [`MemStore::release_loads`].
    fn hold_loads(&self) {
        self.loads_held.0.send_replace(false);
    }

    fn release_loads(&self) {
        self.loads_held.0.send_replace(true);
    }

    /// Reads of a snapshot, failed ones included.
    fn loads(&self) -> u32 {
        self.inner.lock().unwrap().loads
    }
}

#[async_trait]
impl StateStore for MemStore {
    async fn load(&self, saga_id: &str) -> Result<Option<(Saga, u64)>, PortError> {
        self.inner.lock().unwrap().loads += 1;
        let mut open = self.loads_held.0.subscribe();
        let _ = open.wait_for(|open| *open).await;
        let mut inner = self.inner.lock().unwrap();
        if inner.failing_loads > 0 {
            inner.failing_loads -= 1;
            return Err(PortError::Transport {
                operation: "load snapshot",
                message: "injected failure".to_string(),
            });
        }
        match inner.sagas.get(saga_id) {
            None => Ok(None),
            Some((bytes, revision)) => {
                let saga = wire::decode_snapshot(bytes).map_err(|e| PortError::Corrupt {
                    saga: saga_id.to_string(),
                    message: e.to_string(),
                })?;
                Ok(Some((saga, *revision)))
            }
        }
    }

    async fn save(&self, saga: &Saga, expected: Option<u64>) -> Result<u64, PortError> {
        let mut inner = self.inner.lock().unwrap();
        if inner.failing_saves > 0 {
            inner.failing_saves -= 1;
            return Err(PortError::Transport {
                operation: "save snapshot",
                message: "injected failure".to_string(),
            });
        }
        if std::mem::take(&mut inner.concurrent_write) {
            inner.last_revision += 1;
            let revision = inner.last_revision;
            if let Some(entry) = inner.sagas.get_mut(&saga.id) {
                entry.1 = revision;
            }
        }
        let current = inner.sagas.get(&saga.id).map(|(_, r)| *r);
        if current != expected {
            return Err(PortError::Conflict {
                saga: saga.id.clone(),
                expected,
            });
        }
        inner.last_revision += 1;
        let revision = inner.last_revision;
        inner.sagas.insert(
            saga.id.clone(),
            (wire::encode_snapshot(saga).unwrap(), revision),
        );
        inner.saves += 1;
        Ok(revision)
    }
}

// ---------------------------------------------------------------------------------------------
// The bus and the participants.
// ---------------------------------------------------------------------------------------------

/// A published command, as a participant sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Command {
    saga_id: String,
    step: String,
    /// `service.action`
    action: String,
    spec: CommandSpec,
}

#[derive(Debug, Clone, PartialEq, Eq)]
struct Announcement {
    saga_id: String,
    from: String,
    to: String,
    sequence: u64,
}

struct MemBus {
    commands: Mutex<Vec<Command>>,
    announcements: Mutex<Vec<Announcement>>,
    to_participants: mpsc::UnboundedSender<Command>,
}

impl MemBus {
    fn new() -> (Arc<Self>, mpsc::UnboundedReceiver<Command>) {
        let (tx, rx) = mpsc::unbounded_channel();
        (
            Arc::new(MemBus {
                commands: Mutex::default(),
                announcements: Mutex::default(),
                to_participants: tx,
            }),
            rx,
        )
    }

    fn commands(&self, saga_id: &str) -> Vec<Command> {
        self.commands
            .lock()
            .unwrap()
            .iter()
            .filter(|c| c.saga_id == saga_id)
            .cloned()
            .collect()
    }

    /// (action, attempt) of every command sent for the saga, in order.
    fn sent(&self, saga_id: &str) -> Vec<(String, u32)> {
        self.commands(saga_id)
            .into_iter()
            .map(|c| (c.action, c.spec.attempt))
            .collect()
    }

    fn announcements(&self, saga_id: &str) -> Vec<(String, String, u64)> {
        let all = self.announcements.lock().unwrap();
        all.iter()
            .filter(|a| a.saga_id == saga_id)
            .map(|a| (a.from.clone(), a.to.clone(), a.sequence))
            .collect()
    }
}

#[async_trait]
impl CommandBus for MemBus {
    async fn send(
        &self,
        def: &SagaDefinition,
        saga: &Saga,
        commands: &[CommandSpec],
    ) -> Result<(), PortError> {
        for c in commands {
            let step = def
                .step(c.step)
                .expect("a command for a step of the definition");
            let action = if c.compensation {
                step.compensation.as_ref().expect("a compensation")
            } else {
                &step.action
            };
            let command = Command {
                saga_id: saga.id.clone(),
                step: step.name.clone(),
                action: action.to_string(),
                spec: *c,
            };
            self.commands.lock().unwrap().push(command.clone());
            let _ = self.to_participants.send(command);
        }
        Ok(())
    }

    async fn announce(
        &self,
        saga: &Saga,
        from: &str,
        to: &str,
        sequence: u64,
    ) -> Result<(), PortError> {
        let a = Announcement {
            saga_id: saga.id.clone(),
            from: from.to_string(),
            to: to.to_string(),
            sequence,
        };
        // As the server does (`Nats-Msg-Id` per saga and sequence): an announcement made
        // again is stored once.
        let mut announcements = self.announcements.lock().unwrap();
        if !announcements
            .iter()
            .any(|b| b.saga_id == a.saga_id && b.sequence == a.sequence)
        {
            announcements.push(a);
        }
        Ok(())
    }
}

/// Records the parked sagas it is told about, as (saga id, count, reason).
#[derive(Default)]
struct MemParker {
    parked: Mutex<Vec<(String, u32, String)>>,
}

#[async_trait]
impl Parker for MemParker {
    async fn park(&self, saga: &Saga, reason: &str, count: u32) -> Result<(), PortError> {
        let mut parked = self.parked.lock().unwrap();
        // Idempotent on (saga, count), like the dead-letter stream's de-duplication.
        if !parked
            .iter()
            .any(|(id, n, _)| *id == saga.id && *n == count)
        {
            parked.push((saga.id.clone(), count, reason.to_string()));
        }
        Ok(())
    }
}

/// Keeps the latest census, the share of its timeout each ended attempt used, and the steps
/// of the attempts sent.
#[derive(Default)]
struct CensusObserver {
    last: Mutex<Vec<AttentionCount>>,
    shares: Mutex<Vec<f64>>,
    sent: Mutex<Vec<String>>,
    refused: Mutex<Vec<String>>,
    ignored: Mutex<Vec<String>>,
}

impl Observer for CensusObserver {
    fn event_refused(&self, reason: &str) {
        self.refused.lock().unwrap().push(reason.to_string());
    }

    fn event_ignored(&self, reason: &str) {
        self.ignored.lock().unwrap().push(reason.to_string());
    }

    fn attention(&self, census: &[AttentionCount]) {
        *self.last.lock().unwrap() = census.to_vec();
    }

    fn attempt_share(&self, _saga: &str, _step: &str, share: f64) {
        self.shares.lock().unwrap().push(share);
    }

    fn attempt_sent(&self, _saga: &str, step: &str, _timeout: Duration) {
        self.sent.lock().unwrap().push(step.to_string());
    }
}

impl CensusObserver {
    /// The steps of the attempts sent, sorted.
    fn sent_steps(&self) -> Vec<String> {
        let mut sent = self.sent.lock().unwrap().clone();
        sent.sort();
        sent
    }

    fn counts(&self, saga: &str) -> (usize, usize) {
        let last = self.last.lock().unwrap();
        last.iter()
            .find(|c| c.saga == saga)
            .map_or((usize::MAX, usize::MAX), |c| (c.needs_attention, c.stuck))
    }
}

/// How the participants answer a command: `None` means never.
type Behaviour = Arc<dyn Fn(&Command) -> Option<Result<Vec<u8>, StepError>> + Send + Sync>;

fn always_succeed() -> Behaviour {
    Arc::new(|_| Some(Ok(b"{}".to_vec())))
}

// ---------------------------------------------------------------------------------------------
// Deliveries, JetStream style.
// ---------------------------------------------------------------------------------------------

#[derive(Debug, Clone, PartialEq, Eq)]
enum Settlement {
    Ack,
    Nak,
    DeadLetter(String),
    /// Dropped without an answer: JetStream redelivers after `ack_wait`.
    Dropped,
}

#[derive(Debug, Clone)]
struct Settled {
    saga_id: String,
    input: Input,
    how: Settlement,
    /// Snapshot writes made by then.
    writes: u32,
}

/// The event stream: delivers to the current coordinator, records how each delivery was
/// settled, redelivers what was nakked or dropped.
#[derive(Default)]
struct Stream {
    coordinator: Mutex<Option<ActorRef<CoordinatorMsg>>>,
    /// The store whose writes each settlement records.
    store: Mutex<Option<Arc<MemStore>>>,
    delivered: AtomicU64,
    settled: Mutex<Vec<Settled>>,
}

/// How long a dropped delivery waits before it comes back (JetStream's `ack_wait`), and the
/// longest nak delay honoured (the actors ask for up to a second; the tests need not wait that).
const REDELIVERY: Duration = Duration::from_millis(100);

impl Stream {
    fn attach(&self, coordinator: ActorRef<CoordinatorMsg>) {
        *self.coordinator.lock().unwrap() = Some(coordinator);
    }

    fn deliver(self: &Arc<Self>, saga_id: &str, input: Input) {
        self.delivered.fetch_add(1, Ordering::SeqCst);
        let delivery = TestDelivery {
            stream: self.clone(),
            saga_id: saga_id.to_string(),
            input: input.clone(),
            settled: false,
        };
        let coordinator = self
            .coordinator
            .lock()
            .unwrap()
            .clone()
            .expect("a coordinator");
        let msg = CoordinatorMsg::Deliver {
            saga_id: saga_id.to_string(),
            input,
            delivery: Box::new(delivery),
        };
        // If the coordinator is gone, the message (and its delivery) is dropped: redelivered.
        let _ = coordinator.cast(msg);
    }

    fn redeliver_later(self: &Arc<Self>, saga_id: String, input: Input, delay: Duration) {
        let stream = self.clone();
        tokio::spawn(async move {
            tokio::time::sleep(delay.min(REDELIVERY)).await;
            stream.deliver(&saga_id, input);
        });
    }

    fn settled(&self) -> Vec<Settled> {
        self.settled.lock().unwrap().clone()
    }

    fn count(&self, how: &Settlement) -> usize {
        self.settled
            .lock()
            .unwrap()
            .iter()
            .filter(|s| &s.how == how)
            .count()
    }

    fn dead_letters(&self) -> Vec<(String, String)> {
        let all = self.settled.lock().unwrap();
        all.iter()
            .filter_map(|s| match &s.how {
                Settlement::DeadLetter(reason) => Some((s.saga_id.clone(), reason.clone())),
                _ => None,
            })
            .collect()
    }

    /// Every delivery so far was settled (none is waiting in a mailbox).
    fn all_settled(&self) -> bool {
        self.settled.lock().unwrap().len() as u64 == self.delivered.load(Ordering::SeqCst)
    }
}

struct TestDelivery {
    stream: Arc<Stream>,
    saga_id: String,
    input: Input,
    settled: bool,
}

impl TestDelivery {
    fn settle(&mut self, how: Settlement) {
        self.settled = true;
        let store = self.stream.store.lock().unwrap().clone();
        let record = Settled {
            saga_id: self.saga_id.clone(),
            input: self.input.clone(),
            how,
            writes: store.map_or(0, |s| s.successful_saves()),
        };
        self.stream.settled.lock().unwrap().push(record);
    }
}

#[async_trait]
impl Delivery for TestDelivery {
    async fn ack(mut self: Box<Self>) {
        self.settle(Settlement::Ack);
    }

    async fn nak(mut self: Box<Self>, delay: Duration) {
        self.settle(Settlement::Nak);
        self.stream
            .redeliver_later(self.saga_id.clone(), self.input.clone(), delay);
    }

    async fn dead_letter(mut self: Box<Self>, reason: String) {
        self.settle(Settlement::DeadLetter(reason));
    }
}

impl Drop for TestDelivery {
    fn drop(&mut self) {
        if !self.settled {
            self.settle(Settlement::Dropped);
            self.stream
                .redeliver_later(self.saga_id.clone(), self.input.clone(), REDELIVERY);
        }
    }
}

// ---------------------------------------------------------------------------------------------
// The harness.
// ---------------------------------------------------------------------------------------------

struct Harness {
    def: Arc<SagaDefinition>,
    store: Arc<MemStore>,
    bus: Arc<MemBus>,
    parker: Arc<MemParker>,
    census: Arc<CensusObserver>,
    stream: Arc<Stream>,
    coordinator: ActorRef<CoordinatorMsg>,
    participant: tokio::task::JoinHandle<()>,
    /// Added to the wall clock the coordinator and its actors read, ms.
    clock_offset: Arc<AtomicI64>,
}

/// A clock for a coordinator.
type Clock = Arc<dyn Fn() -> Millis + Send + Sync>;

impl Harness {
    async fn start(def: SagaDefinition, behaviour: Behaviour) -> Harness {
        Harness::start_passivating(def, behaviour, Duration::ZERO).await
    }

    /// …with saga actors passivated after `passivate_after` idle (zero: never).
    async fn start_passivating(
        def: SagaDefinition,
        behaviour: Behaviour,
        passivate_after: Duration,
    ) -> Harness {
        Harness::start_passivating_above(def, behaviour, passivate_after, 0).await
    }

    /// …and only while the coordinator holds more than `above` actors.
    async fn start_passivating_above(
        def: SagaDefinition,
        behaviour: Behaviour,
        passivate_after: Duration,
        above: usize,
    ) -> Harness {
        Harness::start_with_passivation(def, behaviour, (passivate_after, above, Duration::ZERO))
            .await
    }

    /// …with `(passivate_after, passivate_above, passivate_always_after)`.
    async fn start_with_passivation(
        def: SagaDefinition,
        behaviour: Behaviour,
        passivation: (Duration, usize, Duration),
    ) -> Harness {
        let def = Arc::new(def);
        let store = Arc::new(MemStore::default());
        let (bus, mut commands) = MemBus::new();
        let stream = Arc::new(Stream::default());
        let parker = Arc::new(MemParker::default());
        let census = Arc::new(CensusObserver::default());
        let clock_offset = Arc::new(AtomicI64::new(0));
        let coordinator = spawn_coordinator(
            &def,
            &store,
            &bus,
            &parker,
            &census,
            passivation,
            offset_clock(&clock_offset),
        )
        .await;
        stream.attach(coordinator.clone());
        *stream.store.lock().unwrap() = Some(store.clone());
        // The participants: answer each published command as the behaviour says, on the
        // saga's event stream.
        let replies = stream.clone();
        let participant = tokio::spawn(async move {
            while let Some(c) = commands.recv().await {
                if let Some(outcome) = behaviour(&c) {
                    let input = Input::Reply {
                        service: Some(c.action.split('.').next().unwrap_or_default().to_string()),
                        step: c.step.clone(),
                        attempt: c.spec.attempt,
                        compensation: c.spec.compensation,
                        outcome,
                    };
                    replies.deliver(&c.saga_id, input);
                }
            }
        });
        Harness {
            def,
            store,
            bus,
            parker,
            census,
            stream,
            coordinator,
            participant,
            clock_offset,
        }
    }

    /// Creates the saga as the gRPC front does: the snapshot first…
    async fn create_saga(&self, id: &str) -> Saga {
        let (saga, t) = Saga::start(
            &self.def,
            id.to_string(),
            br#"{"order":1}"#.to_vec(),
            now_millis(),
        );
        assert!(t.changed);
        self.store.save(&saga, None).await.unwrap();
        saga
    }

    /// …then the `Started` event.
    async fn start_saga(&self, id: &str) -> Saga {
        let saga = self.create_saga(id).await;
        self.stream.deliver(id, Input::Started);
        saga
    }

    async fn finished(&self, id: &str) -> Saga {
        eventually(&format!("saga {id} to finish"), || {
            self.store.get(id).is_some_and(|s| s.is_terminal())
        })
        .await;
        eventually("every delivery to be settled", || self.stream.all_settled()).await;
        self.store.get(id).unwrap()
    }

    /// Creates saga `id` in the store as `PlaceOrder` does; returns it and its revision.
    async fn create(&self, id: &str) -> (Saga, u64) {
        let (saga, _) = Saga::start(&self.def, id.to_string(), b"{}".to_vec(), now_millis());
        let revision = self.store.save(&saga, None).await.unwrap();
        (saga, revision)
    }

    /// Delivers the `Created` event that hands `saga` over to its owner.
    fn hand_over(&self, saga: Saga, revision: u64, commands_sent: bool) {
        let id = saga.id.clone();
        self.stream.deliver(
            &id,
            Input::Created {
                saga: Box::new(saga),
                revision,
                commands_sent,
            },
        );
    }

    /// Waits until saga `id` has sent its first command and its actor has passivated.
    async fn dormant(&self, id: &str) {
        eventually("the first command to be sent", || {
            !self.bus.sent(id).is_empty()
        })
        .await;
        eventually("the idle actor to passivate", || {
            self.coordinator.get_children().is_empty()
        })
        .await;
    }

    /// Starts saga `id`, waits for its first command, lets many passivation sweeps pass and
    /// checks that its actor is still there (`why` it should be, for the failure message).
    async fn start_and_stay_live(&self, id: &str, why: &str) {
        self.start_until_sent(id).await;
        tokio::time::sleep(Duration::from_millis(300)).await;
        assert_eq!(
            self.coordinator.get_children().len(),
            1,
            "passivated: {why}"
        );
    }

    /// Starts saga `id` and waits until it has sent its first command.
    async fn start_until_sent(&self, id: &str) {
        self.start_saga(id).await;
        eventually("the first command to be sent", || {
            !self.bus.sent(id).is_empty()
        })
        .await;
    }

    async fn live_actors(&self) -> usize {
        ractor::call_t!(self.coordinator, CoordinatorMsg::Live, 5_000).unwrap()
    }

    /// Kills the node: coordinator and saga actors, without any clean-up.
    /// After [`Harness::crash`]: a new coordinator over the same store, bus and stream
    /// recovers `saga_id`, as a node taking the partition over does. Returns it.
    async fn recover_on_a_new_node(&self, saga_id: &str) -> ActorRef<CoordinatorMsg> {
        let coordinator = spawn_coordinator(
            &self.def,
            &self.store,
            &self.bus,
            &self.parker,
            &self.census,
            (Duration::ZERO, 0, Duration::ZERO),
            offset_clock(&self.clock_offset),
        )
        .await;
        self.stream.attach(coordinator.clone());
        coordinator
            .cast(CoordinatorMsg::Recover {
                saga_id: saga_id.to_string(),
            })
            .unwrap();
        coordinator
    }

    async fn crash(&self) {
        let children = self.coordinator.get_children();
        self.coordinator
            .kill_and_wait(Some(PATIENCE))
            .await
            .unwrap();
        for child in children {
            let _ = child.kill_and_wait(Some(PATIENCE)).await;
        }
    }

    async fn stop(self) {
        for child in self.coordinator.get_children() {
            let _ = child.stop_and_wait(None, Some(PATIENCE)).await;
        }
        self.coordinator
            .stop_and_wait(None, Some(PATIENCE))
            .await
            .unwrap();
        self.participant.abort();
    }
}

/// The wall clock plus `offset` ms.
fn offset_clock(offset: &Arc<AtomicI64>) -> Clock {
    let offset = offset.clone();
    Arc::new(move || now_millis() + offset.load(Ordering::SeqCst))
}

async fn spawn_coordinator(
    def: &Arc<SagaDefinition>,
    store: &Arc<MemStore>,
    bus: &Arc<MemBus>,
    parker: &Arc<MemParker>,
    observer: &Arc<CensusObserver>,
    (passivate_after, passivate_above, passivate_always_after): (Duration, usize, Duration),
    clock: Clock,
) -> ActorRef<CoordinatorMsg> {
    let ctx = Context {
        definitions: Arc::new(sagaflow_actors::catalog::Catalog::new([def.clone()])),
        definition_source: Arc::new(sagaflow_actors::ports::NoDefinitionSource),
        store: store.clone(),
        bus: bus.clone(),
        clock,
        partitions: 4,
        observer: observer.clone(),
        parker: parker.clone(),
        stuck_multiple: 3,
        census_every: Duration::from_millis(20),
        passivate_after,
        passivate_above,
        passivate_always_after,
        census: Mutex::default(),
        event_deliveries: 10,
        limits: Default::default(),
        reannounce_within: Duration::from_secs(60),
    };
    let (coordinator, _) = Actor::spawn(None, Coordinator, Arc::new(ctx))
        .await
        .unwrap();
    coordinator
}

/// The order saga with hour-long step timeouts: no timer wakes its sagas during a test.
fn unhurried_order() -> SagaDefinition {
    let mut def = order();
    for step in def.steps.iter_mut() {
        step.timeout = Duration::from_secs(3600);
    }
    def.deadline = Duration::from_secs(7200);
    def
}

fn strings(items: &[(&str, u32)]) -> Vec<(String, u32)> {
    items.iter().map(|(a, n)| (a.to_string(), *n)).collect()
}

fn status_changes(items: &[(&str, &str, u64)]) -> Vec<(String, String, u64)> {
    items
        .iter()
        .map(|(f, t, n)| (f.to_string(), t.to_string(), *n))
        .collect()
}

// ---------------------------------------------------------------------------------------------
// Tests.
// ---------------------------------------------------------------------------------------------

#[tokio::test]
async fn a_started_saga_runs_to_shipped() {
    let h = Harness::start(order(), always_succeed()).await;
    h.start_saga("order-1").await;
    let saga = h.finished("order-1").await;

    assert_eq!(
        (saga.phase, saga.status.as_str()),
        (Phase::Completed, "SHIPPED")
    );
    // One command per step, first attempts only, stage by stage.
    assert_eq!(
        h.bus.sent("order-1"),
        strings(&[
            ("payment.charge", 1),
            ("inventory.reserve", 1),
            ("shipping.prepare", 1),
            ("notification.send", 1)
        ])
    );
    assert!(h
        .bus
        .commands("order-1")
        .iter()
        .all(|c| !c.spec.compensation));
    assert_eq!(
        h.bus.announcements("order-1"),
        status_changes(&[("PENDING", "PAID", 2), ("PAID", "SHIPPED", 3)])
    );
    // Started + four replies, every one acked.
    let settled = h.stream.settled();
    assert_eq!(settled.len(), 5, "{settled:?}");
    assert!(
        settled.iter().all(|s| s.how == Settlement::Ack),
        "{settled:?}"
    );
    // One write at creation and at most one per reply (the replies of the parallel steps
    // share one when the second is already waiting); Started changes nothing and writes
    // nothing.
    let saves = h.store.successful_saves();
    assert!((4..=5).contains(&saves), "{saves} writes");
    // Four attempts ended, each answered well within its 10 s timeout.
    let shares = h.census.shares.lock().unwrap().clone();
    assert_eq!(shares.len(), 4, "{shares:?}");
    assert!(shares.iter().all(|s| (0.0..0.1).contains(s)), "{shares:?}");
    // … and four were sent (the first by the owner here: the start event was a plain one).
    assert_eq!(
        h.census.sent_steps(),
        ["charge", "notify", "prepare_shipment", "reserve"]
    );
    // The saga actor stopped once its saga finished.
    let mut live = usize::MAX;
    for _ in 0..500 {
        live = h.live_actors().await;
        if live == 0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(live, 0, "the finished saga's actor is still alive");
    h.stop().await;
}

#[tokio::test]
async fn many_sagas_run_side_by_side() {
    // Declined charges for the odd ones: they end CANCELLED, the others SHIPPED.
    let behaviour: Behaviour = Arc::new(|c: &Command| {
        let odd = c.saga_id.ends_with(['1', '3', '5', '7', '9']);
        if odd && c.action == "payment.charge" {
            Some(Err(StepError {
                kind: "declined".to_string(),
                message: "insufficient funds".to_string(),
            }))
        } else {
            Some(Ok(Vec::new()))
        }
    });
    let h = Harness::start(order(), behaviour).await;
    let ids: Vec<String> = (0..20).map(|i| format!("order-{i}")).collect();
    for id in &ids {
        h.start_saga(id).await;
    }
    for (i, id) in ids.iter().enumerate() {
        let saga = h.finished(id).await;
        let expected = if i % 2 == 1 { "CANCELLED" } else { "SHIPPED" };
        assert_eq!(saga.status, expected, "{id}");
        if i % 2 == 1 {
            assert_eq!(
                h.bus.sent(id),
                strings(&[("payment.charge", 1), ("notification.send_cancellation", 1)])
            );
        } else {
            assert_eq!(h.bus.sent(id).len(), 4);
        }
    }
    assert_eq!(h.stream.count(&Settlement::Ack), h.stream.settled().len());
    h.stop().await;
}

#[tokio::test]
async fn a_reply_for_an_unknown_saga_is_dead_lettered() {
    let h = Harness::start(order(), always_succeed()).await;
    let reply = Input::Reply {
        service: None,
        step: "charge".to_string(),
        attempt: 1,
        compensation: false,
        outcome: Ok(Vec::new()),
    };
    h.stream.deliver("ghost", reply);
    eventually("the dead letter", || !h.stream.dead_letters().is_empty()).await;
    let dead = h.stream.dead_letters();
    assert_eq!(dead.len(), 1);
    assert_eq!(dead[0].0, "ghost");
    assert!(dead[0].1.contains("unknown saga `ghost`"), "{}", dead[0].1);
    assert!(
        h.store.get("ghost").is_none(),
        "nothing is created for an unknown saga"
    );
    assert!(h.bus.commands("ghost").is_empty());
    h.stop().await;
}

/// `after` is `before` with one more history entry, `what` about step slot `step`: a
/// refused reply is recorded, and changes nothing else.
#[track_caller]
fn assert_moved_only_in_history(after: &Saga, before: &Saga, step: Option<u32>, what: &str) {
    let strip = |s: &Saga| Saga {
        history: Vec::new(),
        updated_at: 0,
        ..s.clone()
    };
    assert_eq!(strip(after), strip(before), "the saga did not move");
    assert_eq!(after.history[..before.history.len()], before.history[..]);
    let new: Vec<(Option<u32>, String)> = after.history[before.history.len()..]
        .iter()
        .map(|h| (h.step, h.what.to_string()))
        .collect();
    assert_eq!(new, [(step, what.to_string())]);
}

#[tokio::test]
async fn a_reply_from_another_service_than_the_commands_is_dead_lettered() {
    // The participants never answer on their own: the test plays them.
    let h = Harness::start(order(), Arc::new(|_| None)).await;
    h.start_saga("order-3").await;
    eventually("the charge command", || {
        !h.bus.commands("order-3").is_empty()
    })
    .await;
    let before = h.store.get("order-3").unwrap();
    let reply = |service: Option<&str>| Input::Reply {
        service: service.map(str::to_string),
        step: "charge".to_string(),
        attempt: 1,
        compensation: false,
        outcome: Ok(b"{}".to_vec()),
    };
    // `charge` went to the payment service: shipping may not answer for it.
    h.stream.deliver("order-3", reply(Some("shipping")));
    eventually("the dead letter", || !h.stream.dead_letters().is_empty()).await;
    let (saga_id, reason) = h.stream.dead_letters().remove(0);
    assert_eq!(saga_id, "order-3");
    assert!(
        reason.contains("came from service `shipping`")
            && reason.contains("went to service `payment`"),
        "{reason}"
    );
    assert_moved_only_in_history(
        &h.store.get("order-3").unwrap(),
        &before,
        Some(0),
        "reply refused: reply for step `charge` came from service `shipping`; its command went to service `payment`",
    );
    // Payment's own reply is applied.
    h.stream.deliver("order-3", reply(Some("payment")));
    eventually("the charge to be applied", || {
        h.store.get("order-3").is_some_and(|s| s.status == "PAID")
    })
    .await;
}

#[tokio::test]
async fn a_reply_naming_an_unknown_step_is_dead_lettered() {
    // The participants never answer on their own: the test plays them.
    let h = Harness::start(order(), Arc::new(|_| None)).await;
    h.start_saga("order-2").await;
    eventually("the charge command", || {
        !h.bus.commands("order-2").is_empty()
    })
    .await;
    let before = h.store.get("order-2").unwrap();

    let bogus = Input::Reply {
        service: None,
        step: "teleport".to_string(),
        attempt: 1,
        compensation: false,
        outcome: Ok(Vec::new()),
    };
    h.stream.deliver("order-2", bogus);
    eventually("the dead letter", || !h.stream.dead_letters().is_empty()).await;
    let (saga_id, reason) = h.stream.dead_letters().remove(0);
    assert_eq!(saga_id, "order-2");
    assert!(reason.contains("unknown step `teleport`"), "{reason}");
    assert_moved_only_in_history(
        &h.store.get("order-2").unwrap(),
        &before,
        None,
        "reply refused: reply names unknown step `teleport`: definition `order` has no such step",
    );

    // The saga is still served: a genuine reply is applied and acked.
    let charged = Input::Reply {
        service: None,
        step: "charge".to_string(),
        attempt: 1,
        compensation: false,
        outcome: Ok(Vec::new()),
    };
    h.stream.deliver("order-2", charged);
    eventually("the charge to be applied", || {
        h.store.get("order-2").is_some_and(|s| s.status == "PAID")
    })
    .await;
    eventually("every delivery to be settled", || h.stream.all_settled()).await;
    assert_eq!(
        h.stream.count(&Settlement::Ack),
        2,
        "{:?}",
        h.stream.settled()
    );
    h.stop().await;
}

#[tokio::test]
async fn transient_store_failures_nak_and_the_redelivery_completes_the_saga() {
    let h = Harness::start(order(), always_succeed()).await;
    // Stop the saga before its first reply is persisted: load the Started event fails once,
    // then the save of the charge reply fails once.
    h.create_saga("order-3").await;
    h.store.fail_loads(1);
    h.store.fail_saves(1);
    h.stream.deliver("order-3", Input::Started);
    let saga = h.finished("order-3").await;

    assert_eq!(saga.status, "SHIPPED");
    let naks: Vec<Input> = h
        .stream
        .settled()
        .into_iter()
        .filter(|s| s.how == Settlement::Nak)
        .map(|s| s.input)
        .collect();
    assert_eq!(naks.len(), 2, "{:?}", h.stream.settled());
    assert_eq!(naks[0], Input::Started);
    assert!(
        matches!(&naks[1], Input::Reply { step, .. } if step == "charge"),
        "{naks:?}"
    );
    // Nothing was published twice: the failed save published nothing, the redelivery did it once.
    assert_eq!(
        h.bus.sent("order-3"),
        strings(&[
            ("payment.charge", 1),
            ("inventory.reserve", 1),
            ("shipping.prepare", 1),
            ("notification.send", 1)
        ])
    );
    assert_eq!(
        h.bus.announcements("order-3"),
        status_changes(&[("PENDING", "PAID", 2), ("PAID", "SHIPPED", 3)])
    );
    assert!(h.stream.dead_letters().is_empty());
    // Every event ended acked eventually: Started + 4 replies.
    assert_eq!(
        h.stream.count(&Settlement::Ack),
        5,
        "{:?}",
        h.stream.settled()
    );
    h.stop().await;
}

#[tokio::test]
async fn a_created_event_spares_the_owner_a_read_and_a_stale_one_costs_a_reload() {
    let h = Harness::start(order(), always_succeed()).await;
    let all_steps = strings(&[
        ("payment.charge", 1),
        ("inventory.reserve", 1),
        ("shipping.prepare", 1),
        ("notification.send", 1),
    ]);
    // The creator hands over the snapshot it wrote: the owner never reads the store.
    let (saga, revision) = h.create("order-c1").await;
    h.hand_over(saga, revision, false);
    assert_eq!(h.finished("order-c1").await.status, "SHIPPED");
    assert_eq!(h.store.loads(), 0, "the snapshot was read back");
    assert_eq!(h.bus.sent("order-c1"), all_steps);

    // A handed-over copy that is no longer current (someone wrote since) loses its first
    // compare-and-set and is reloaded; the saga still finishes, every step sent as attempt 1
    // (the reload republishes the in-flight charge under the same command id, which the
    // server de-duplicates).
    let (saga, revision) = h.create("order-c2").await;
    h.store.write_concurrently_before_next_save();
    h.hand_over(saga, revision, false);
    assert_eq!(h.finished("order-c2").await.status, "SHIPPED");
    assert!(h.store.loads() >= 1, "the stale copy was not reloaded");
    let mut with_republished_charge = all_steps.clone();
    with_republished_charge.insert(0, all_steps[0].clone());
    assert_eq!(h.bus.sent("order-c2"), with_republished_charge);
    eventually("every delivery to be settled", || h.stream.all_settled()).await;
    assert!(h.stream.dead_letters().is_empty());
    assert_eq!(
        h.stream.count(&Settlement::Nak),
        0,
        "{:?}",
        h.stream.settled()
    );
    h.stop().await;
}

#[tokio::test]
async fn when_the_creator_sent_the_first_commands_the_owner_only_arms_their_timers() {
    let h = Harness::start(order(), always_succeed()).await;
    let (saga, revision) = h.create("order-c3").await;
    h.hand_over(saga, revision, true);
    // The creator's charge is answered; the owner never published it.
    h.stream.deliver(
        "order-c3",
        Input::Reply {
            service: None,
            step: "charge".into(),
            attempt: 1,
            compensation: false,
            outcome: Ok(b"{}".to_vec()),
        },
    );
    assert_eq!(h.finished("order-c3").await.status, "SHIPPED");
    assert_eq!(
        h.bus.sent("order-c3"),
        strings(&[
            ("inventory.reserve", 1),
            ("shipping.prepare", 1),
            ("notification.send", 1)
        ])
    );
    assert_eq!(h.store.loads(), 0);
    // The creator's charge still counts as sent, for the step's backlog.
    assert_eq!(
        h.census.sent_steps(),
        ["charge", "notify", "prepare_shipment", "reserve"]
    );
    h.stop().await;
}

#[tokio::test]
async fn an_idle_saga_passivates_and_its_next_event_brings_it_back() {
    // Nobody answers the charge: the saga waits, its actor goes idle and is passivated.
    let h = Harness::start_passivating(order(), charge_never_answered(), Duration::from_millis(60))
        .await;
    h.start_saga("order-p1").await;
    h.dormant("order-p1").await;
    assert_eq!(h.live_actors().await, 1, "a dormant saga is still held");
    let loads = h.store.loads();
    // The charge answer arrives: a new actor reloads the saga and it runs to the end.
    h.stream.deliver(
        "order-p1",
        Input::Reply {
            service: None,
            step: "charge".into(),
            attempt: 1,
            compensation: false,
            outcome: Ok(b"{}".to_vec()),
        },
    );
    assert_eq!(h.finished("order-p1").await.status, "SHIPPED");
    assert!(h.store.loads() > loads, "the dormant saga was not reloaded");
    assert_eq!(
        h.bus.sent("order-p1"),
        strings(&[
            ("payment.charge", 1),
            ("inventory.reserve", 1),
            ("shipping.prepare", 1),
            ("notification.send", 1)
        ])
    );
    eventually("the finished saga to be forgotten", || {
        h.coordinator.get_children().is_empty()
    })
    .await;
    assert_eq!(h.live_actors().await, 0);
    assert!(h.stream.dead_letters().is_empty());
    h.stop().await;
}

/// A sweep that waited in the coordinator's mailbox (its `sent_at` is behind the clock) does
/// not passivate: the backlog may hold the events of the sagas that look idle. The next sweep
/// that is on time does.
#[tokio::test]
async fn a_sweep_that_waited_in_the_mailbox_passivates_nothing() {
    // Idle after a minute: the periodic sweeps (every 30 s) never come during the test, the
    // test sends its own. Steps time out after an hour, so no timer fires either.
    let h = Harness::start_passivating(
        unhurried_order(),
        charge_never_answered(),
        Duration::from_secs(60),
    )
    .await;
    h.start_until_sent("order-lag").await;
    // A minute and a second later, by the coordinator's clock: the actor is idle.
    h.clock_offset.fetch_add(61_000, Ordering::SeqCst);
    let now = now_millis() + h.clock_offset.load(Ordering::SeqCst);
    h.coordinator
        .cast(CoordinatorMsg::Sweep {
            sent_at: now - 1_000,
        })
        .unwrap();
    // Nothing to wait for but time: give the coordinator and the actor a moment to act on it.
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(
        h.coordinator.get_children().len(),
        1,
        "passivated by a late sweep"
    );
    h.coordinator
        .cast(CoordinatorMsg::Sweep {
            sent_at: now_millis() + h.clock_offset.load(Ordering::SeqCst),
        })
        .unwrap();
    h.dormant("order-lag").await;
    assert_eq!(h.live_actors().await, 1, "dormant, still held");
    h.stop().await;
}

#[tokio::test]
async fn passivation_waits_until_the_node_holds_more_actors_than_its_threshold() {
    let h = Harness::start_passivating_above(
        order(),
        charge_never_answered(),
        Duration::from_millis(20),
        1,
    )
    .await;
    // Idle for many passivation periods, but alone: it keeps its actor.
    h.start_and_stay_live("order-t1", "alone, below the threshold")
        .await;
    // A second saga puts the node above it: idle actors go until it is back at the threshold.
    h.start_saga("order-t2").await;
    eventually("the second charge to be sent", || {
        !h.bus.sent("order-t2").is_empty()
    })
    .await;
    eventually("an idle actor to passivate", || {
        h.coordinator.get_children().len() <= 1
    })
    .await;
    assert_eq!(h.live_actors().await, 2, "both sagas are still held");
    h.stop().await;
}

/// Below the threshold, an actor idle for `passivate_always_after` passivates all the same.
#[tokio::test]
async fn a_saga_idle_for_long_passivates_below_the_threshold() {
    // Quick passivation only above 10 actors; any actor idle for a minute. Steps time out
    // after an hour, so no timer wakes the saga meanwhile.
    let h = Harness::start_with_passivation(
        unhurried_order(),
        charge_never_answered(),
        (Duration::from_millis(20), 10, Duration::from_secs(60)),
    )
    .await;
    // Many sweeps later (every 10 ms), idle but not for a minute, and alone: still an actor.
    h.start_and_stay_live("order-long", "before it was idle for a minute")
        .await;
    // A minute later by the coordinator's clock, the next sweep passivates it.
    h.clock_offset.fetch_add(61_000, Ordering::SeqCst);
    h.dormant("order-long").await;
    assert_eq!(h.live_actors().await, 1, "dormant, still held");
    h.stop().await;
}

#[tokio::test]
async fn handing_a_partition_over_drops_its_dormant_sagas() {
    let h = Harness::start_passivating(order(), charge_never_answered(), Duration::from_millis(60))
        .await;
    h.start_saga("order-p3").await;
    h.dormant("order-p3").await;
    assert_eq!(h.live_actors().await, 1);
    let partition = sagaflow_actors::hash::partition_of("order-p3", 4);
    let dropped = ractor::call_t!(
        h.coordinator,
        |reply| CoordinatorMsg::DropPartition { partition, reply },
        5_000
    )
    .unwrap();
    assert_eq!(dropped, 1, "the dormant saga was not dropped");
    assert_eq!(h.live_actors().await, 0, "the node still holds the saga");
    h.stop().await;
}

#[tokio::test]
async fn a_dormant_saga_wakes_at_its_due_time() {
    // Nobody ever answers the charge, whose attempts time out after 1 s. The saga passivates
    // while it waits (after 20 ms idle), and the coordinator wakes it for the timeout: the
    // second attempt is sent, then the charge is given up and the saga compensates.
    let mut def = fast_order();
    def.steps[0].timeout = Duration::from_secs(1);
    let h =
        Harness::start_passivating(def, charge_never_answered(), Duration::from_millis(20)).await;
    h.start_saga("order-p2").await;
    h.dormant("order-p2").await;
    assert!(
        h.store.get("order-p2").is_some_and(|s| !s.is_terminal()),
        "the saga should be waiting, dormant"
    );
    let saga = h.finished("order-p2").await;
    assert_eq!(saga.status, "CANCELLED");
    let charges: Vec<u32> = h
        .bus
        .commands("order-p2")
        .into_iter()
        .filter(|c| c.step == "charge" && !c.spec.compensation)
        .map(|c| c.spec.attempt)
        .collect();
    assert_eq!(charges, vec![1, 2], "both attempts sent, each once");
    h.stop().await;
}

/// Answers only the forward `charge`; the tests deliver the other replies by hand.
fn only_charge_answered() -> Behaviour {
    Arc::new(|c: &Command| (c.step == "charge" && !c.spec.compensation).then(|| Ok(b"{}".to_vec())))
}

fn success(step: &str) -> Input {
    Input::Reply {
        service: None,
        step: step.into(),
        attempt: 1,
        compensation: false,
        outcome: Ok(b"{}".to_vec()),
    }
}

/// Brings saga `id` to its parallel stage (reserve and prepare sent, unanswered), lets its
/// actor passivate, then delivers both replies while the new actor is held in its load, so
/// that both wait in its mailbox together. Returns the writes made before the replies.
async fn replies_waiting_together(h: &Harness, id: &str) -> u32 {
    h.start_saga(id).await;
    eventually("reserve and prepare to be sent", || {
        h.bus.sent(id).len() == 3
    })
    .await;
    eventually("the idle actor to passivate", || {
        h.coordinator.get_children().is_empty()
    })
    .await;
    h.store.hold_loads();
    let loads = h.store.loads();
    h.stream.deliver(id, success("reserve"));
    h.stream.deliver(id, success("prepare_shipment"));
    eventually("the woken actor to wait on its load", || {
        h.store.loads() > loads
    })
    .await;
    // The coordinator answers this after it has handed both replies to the actor.
    h.live_actors().await;
    h.store.successful_saves()
}

/// The settlements of the replies of `step`, in order.
fn settled_replies(h: &Harness, step: &str) -> Vec<Settled> {
    h.stream
        .settled()
        .into_iter()
        .filter(|s| matches!(&s.input, Input::Reply { step: st, .. } if st == step))
        .collect()
}

#[tokio::test]
async fn replies_waiting_together_share_one_write_and_are_acked_after_it() {
    let h = Harness::start_passivating(
        unhurried_order(),
        only_charge_answered(),
        Duration::from_millis(60),
    )
    .await;
    let writes = replies_waiting_together(&h, "order-w1").await;
    h.store.release_loads();
    eventually("the notify command", || h.bus.sent("order-w1").len() == 4).await;
    eventually("both replies to be settled", || h.stream.all_settled()).await;

    // The reserve reply changed the saga with nothing to carry out and the prepare reply was
    // already waiting: one write holds both, and only then are the commands sent and both
    // events acked.
    assert_eq!(h.store.successful_saves(), writes + 1);
    let saga = h.store.get("order-w1").unwrap();
    let succeeded: Vec<&str> = saga
        .steps
        .iter()
        .zip(&h.def.steps)
        .filter(|(s, _)| s.phase == StepPhase::Succeeded)
        .map(|(_, d)| d.name.as_str())
        .collect();
    assert_eq!(succeeded, ["charge", "reserve", "prepare_shipment"]);
    for step in ["reserve", "prepare_shipment"] {
        let settled = settled_replies(&h, step);
        assert_eq!(settled.len(), 1, "{settled:?}");
        assert_eq!(settled[0].how, Settlement::Ack);
        assert_eq!(
            settled[0].writes,
            writes + 1,
            "{step} acked before its write"
        );
    }
    assert_eq!(
        h.bus.sent("order-w1"),
        strings(&[
            ("payment.charge", 1),
            ("inventory.reserve", 1),
            ("shipping.prepare", 1),
            ("notification.send", 1)
        ])
    );
    h.stop().await;
}

#[tokio::test]
async fn a_failed_shared_write_gives_both_replies_back_and_they_are_applied_again() {
    let h = Harness::start_passivating(
        unhurried_order(),
        only_charge_answered(),
        Duration::from_millis(60),
    )
    .await;
    let writes = replies_waiting_together(&h, "order-w2").await;
    h.store.fail_saves(1);
    h.store.release_loads();
    eventually("the notify command", || h.bus.sent("order-w2").len() == 4).await;
    eventually("every delivery to be settled", || h.stream.all_settled()).await;

    // The write holding both failed: both events went back, neither was acked on a change
    // that was never stored, and their redelivery was applied.
    for step in ["reserve", "prepare_shipment"] {
        let how: Vec<Settlement> = settled_replies(&h, step)
            .into_iter()
            .map(|s| s.how)
            .collect();
        assert_eq!(how, [Settlement::Nak, Settlement::Ack], "{step}");
    }
    assert!(h.store.successful_saves() > writes);
    // Nothing went out before the write that holds it: notify once.
    assert_eq!(
        h.bus.sent("order-w2"),
        strings(&[
            ("payment.charge", 1),
            ("inventory.reserve", 1),
            ("shipping.prepare", 1),
            ("notification.send", 1)
        ])
    );
    assert!(h.stream.dead_letters().is_empty());
    h.stop().await;
}

#[tokio::test]
async fn a_lost_compare_and_set_reloads_and_the_event_is_still_applied() {
    let h = Harness::start(order(), always_succeed()).await;
    h.create_saga("order-4").await;
    h.store.write_concurrently_before_next_save();
    h.stream.deliver("order-4", Input::Started);
    let saga = h.finished("order-4").await;

    assert_eq!(saga.status, "SHIPPED");
    // The conflict is handled inside the actor: nothing nakked, nothing dead-lettered.
    let settled = h.stream.settled();
    assert!(
        settled.iter().all(|s| s.how == Settlement::Ack),
        "{settled:?}"
    );
    // After reloading, the actor republished the charge (same attempt: de-duplicated
    // downstream); the duplicate reply changed nothing.
    let mut sent = h.bus.sent("order-4");
    assert_eq!(
        sent[..2],
        strings(&[("payment.charge", 1), ("payment.charge", 1)])[..]
    );
    sent.dedup();
    assert_eq!(
        sent,
        strings(&[
            ("payment.charge", 1),
            ("inventory.reserve", 1),
            ("shipping.prepare", 1),
            ("notification.send", 1)
        ])
    );
    // The duplicate reply was not written either: creation plus at most one write per reply.
    let saves = h.store.successful_saves();
    assert!((4..=5).contains(&saves), "{saves} writes");
    assert_eq!(
        h.bus.announcements("order-4"),
        status_changes(&[("PENDING", "PAID", 2), ("PAID", "SHIPPED", 3)])
    );
    h.stop().await;
}

#[tokio::test]
async fn recovery_after_a_restart_republishes_in_flight_commands() {
    // Before the crash the fulfilment participants are down: the commands stay unanswered.
    let fulfilment_up = Arc::new(AtomicBool::new(false));
    let up = fulfilment_up.clone();
    let behaviour: Behaviour = Arc::new(move |c: &Command| {
        let fulfilment = c.step == "reserve" || c.step == "prepare_shipment";
        (!fulfilment || up.load(Ordering::SeqCst)).then(|| Ok(Vec::new()))
    });
    let h = Harness::start(order(), behaviour).await;
    h.start_saga("order-5").await;
    eventually("the fulfilment commands", || {
        h.bus.commands("order-5").len() == 3
    })
    .await;
    eventually("every delivery to be settled", || h.stream.all_settled()).await;
    let before = h.store.get("order-5").unwrap();
    assert_eq!(
        (before.phase, before.status.as_str()),
        (Phase::Running, "PAID")
    );
    let in_flight = before.in_flight();
    assert_eq!(in_flight.len(), 2);

    h.crash().await;
    fulfilment_up.store(true, Ordering::SeqCst);
    let published = h.bus.commands("order-5").len();

    // A new node over the same store takes the saga over.
    let coordinator = h.recover_on_a_new_node("order-5").await;
    eventually("the in-flight commands to be republished", || {
        h.bus.commands("order-5").len() >= published + 2
    })
    .await;
    let republished: Vec<CommandSpec> = h.bus.commands("order-5")[published..published + 2]
        .iter()
        .map(|c| c.spec)
        .collect();
    assert_eq!(
        republished, in_flight,
        "the same commands, with the same attempts"
    );

    let h = Harness { coordinator, ..h };
    let saga = h.finished("order-5").await;
    assert_eq!(saga.status, "SHIPPED");
    let sent = h.bus.sent("order-5");
    assert_eq!(sent.last(), Some(&("notification.send".to_string(), 1)));
    assert!(
        sent.iter().all(|(_, attempt)| *attempt == 1),
        "no step needed a second attempt: {sent:?}"
    );
    h.stop().await;
}

/// Charges are never answered; refunds and notifications are.
fn charge_never_answers() -> Behaviour {
    Arc::new(|c: &Command| (c.action != "payment.charge").then(|| Ok(Vec::new())))
}

fn assert_charge_timed_out_and_was_refunded(h: &Harness, id: &str, saga: &Saga) {
    assert_eq!(
        (saga.phase, saga.status.as_str()),
        (Phase::Compensated, "CANCELLED")
    );
    // Two attempts that timed out, then the refund (the charge may have gone through), then the
    // customer is told.
    assert_eq!(
        h.bus.sent(id),
        strings(&[
            ("payment.charge", 1),
            ("payment.charge", 2),
            ("payment.refund", 1),
            ("notification.send_cancellation", 1)
        ])
    );
    let timeouts: Vec<u32> = saga
        .history
        .iter()
        .filter_map(|e| match &e.what {
            Happening::AttemptFailed { attempt, kind, .. } if kind == TIMEOUT_KIND => {
                Some(*attempt)
            }
            _ => None,
        })
        .collect();
    assert_eq!(timeouts, [1, 2]);
    assert!(saga.steps[0].maybe_applied);
    let reason = saga.reason.clone().unwrap();
    assert!(
        reason.contains("charge") && reason.contains(TIMEOUT_KIND),
        "{reason}"
    );
    assert_eq!(
        h.bus.announcements(id),
        status_changes(&[("PENDING", "CANCELLED", 2)])
    );
}

#[tokio::test]
async fn a_step_whose_participant_never_answers_times_out() {
    let h = Harness::start(fast_order(), charge_never_answers()).await;
    h.start_saga("order-6").await;
    let saga = h.finished("order-6").await;
    assert_charge_timed_out_and_was_refunded(&h, "order-6", &saga);
    // Every timed-out attempt used its whole timeout; the refund was answered at once.
    let shares = h.census.shares.lock().unwrap().clone();
    let timed_out = saga.steps[0].attempt as usize;
    assert_eq!(
        shares.iter().filter(|s| **s == 1.0).count(),
        timed_out,
        "{shares:?}"
    );
    assert!(shares.iter().any(|s| *s < 1.0), "{shares:?}");
    // The timers, not events, drove the saga: Started and the two answered commands only.
    let settled = h.stream.settled();
    assert_eq!(settled.len(), 3, "{settled:?}");
    assert!(
        settled.iter().all(|s| s.how == Settlement::Ack),
        "{settled:?}"
    );
    h.stop().await;
}

#[tokio::test]
async fn a_lost_compare_and_set_on_a_timer_tick_reloads_the_saga() {
    // The first write of this saga is the timeout handled by a Tick; it loses its
    // compare-and-set. The actor must reload the snapshot rather than retry its stale copy.
    let h = Harness::start(fast_order(), charge_never_answers()).await;
    h.create_saga("order-7").await;
    h.store.write_concurrently_before_next_save();
    h.stream.deliver("order-7", Input::Started);
    let saga = h.finished("order-7").await;
    assert_charge_timed_out_and_was_refunded(&h, "order-7", &saga);
    h.stop().await;
}

#[tokio::test]
async fn a_cancel_event_compensates_a_running_saga() {
    // Fulfilment never answers on its own, so the saga sits in stage 2 until cancelled; the
    // test answers the in-flight commands after the cancel.
    let behaviour: Behaviour = Arc::new(|c: &Command| {
        (c.action != "inventory.reserve" && c.action != "shipping.prepare").then(|| Ok(Vec::new()))
    });
    let h = Harness::start(order(), behaviour).await;
    h.start_saga("order-8").await;
    eventually("the fulfilment commands", || {
        h.bus.commands("order-8").len() == 3
    })
    .await;
    h.stream.deliver(
        "order-8",
        Input::Cancel {
            reason: "customer changed their mind".to_string(),
        },
    );
    eventually("the cancel", || {
        h.store.phase("order-8") == Some(Phase::Compensating)
    })
    .await;
    for step in ["reserve", "prepare_shipment"] {
        let reply = Input::Reply {
            service: None,
            step: step.to_string(),
            attempt: 1,
            compensation: false,
            outcome: Ok(Vec::new()),
        };
        h.stream.deliver("order-8", reply);
    }
    let saga = h.finished("order-8").await;
    assert_eq!(saga.status, "CANCELLED");
    assert_eq!(
        saga.reason.as_deref(),
        Some("cancelled: customer changed their mind")
    );
    let sent = h.bus.sent("order-8");
    assert_eq!(
        sent[3..],
        strings(&[
            ("shipping.cancel", 1),
            ("inventory.release", 1),
            ("payment.refund", 1),
            ("notification.send_cancellation", 1)
        ])[..]
    );
    assert_eq!(
        h.bus.announcements("order-8"),
        status_changes(&[("PENDING", "PAID", 2), ("PAID", "CANCELLED", 3)])
    );
    h.stop().await;
}

/// Two nodes briefly consume the same partition during a hand-over. Node A still holds an old
/// copy of the saga in memory when node B has already advanced it; a reply that only makes
/// sense for the newer state reaches A. A must not ack it as a duplicate on its stale copy:
/// that would lose the reply and stall the saga.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reply_that_looks_stale_on_a_cached_copy_is_checked_against_the_store() {
    let never: Behaviour = Arc::new(|_| None);
    let h = Harness::start(order(), never).await;
    let id = "order-handover";
    h.start_saga(id).await;
    // Node A has loaded the saga (charge in flight) and keeps it in memory.
    eventually("node A to publish the charge", || h.bus.sent(id).len() == 1).await;

    // Node B advances the saga: the charge succeeded, reserve and prepare_shipment are out.
    let b = spawn_coordinator(
        &h.def,
        &h.store,
        &h.bus,
        &h.parker,
        &h.census,
        (Duration::ZERO, 0, Duration::ZERO),
        offset_clock(&h.clock_offset),
    )
    .await;
    let stream_b = Arc::new(Stream::default());
    stream_b.attach(b.clone());
    stream_b.deliver(
        id,
        Input::Reply {
            service: None,
            step: "charge".into(),
            attempt: 1,
            compensation: false,
            outcome: Ok(b"{}".to_vec()),
        },
    );
    eventually("node B to start the fulfilment stage", || {
        h.bus.sent(id).len() == 3
    })
    .await;

    // The reserve reply reaches node A, whose copy still has reserve pending.
    h.stream.deliver(
        id,
        Input::Reply {
            service: None,
            step: "reserve".into(),
            attempt: 1,
            compensation: false,
            outcome: Ok(b"{}".to_vec()),
        },
    );
    eventually("the reserve reply to be applied", || {
        h.store
            .get(id)
            .is_some_and(|s| s.steps[1].phase == StepPhase::Succeeded)
    })
    .await;
    b.stop_and_wait(None, Some(PATIENCE)).await.unwrap();
    h.stop().await;
}

#[tokio::test]
async fn a_parked_saga_is_dead_lettered_counted_and_resumed_by_an_operator_once() {
    // The refund fails until the operator "fixes the payment service".
    let fixed = Arc::new(AtomicBool::new(false));
    let flag = fixed.clone();
    let behaviour: Behaviour = Arc::new(move |c: &Command| match c.action.as_str() {
        "inventory.reserve" => Some(Err(StepError {
            kind: "out_of_stock".into(),
            message: "none left".into(),
        })),
        "payment.refund" if !flag.load(Ordering::SeqCst) => Some(Err(StepError {
            kind: "unavailable".into(),
            message: "bank down".into(),
        })),
        _ => Some(Ok(Vec::new())),
    });
    let h = Harness::start(fast_order(), behaviour).await;
    h.start_saga("order-p").await;
    eventually("the saga to park", || {
        h.store.phase("order-p") == Some(Phase::NeedsAttention)
    })
    .await;
    eventually("the dead letter", || {
        h.parker.parked.lock().unwrap().len() == 1
    })
    .await;
    let (id, count, reason) = h.parker.parked.lock().unwrap()[0].clone();
    assert_eq!((id.as_str(), count), ("order-p", 1));
    assert!(
        reason.contains("payment.refund") && reason.contains("bank down"),
        "{reason}"
    );
    eventually("the census to count it", || {
        h.census.counts("order") == (1, 0)
    })
    .await;
    let refunds = |h: &Harness| {
        h.bus
            .sent("order-p")
            .iter()
            .filter(|(a, _)| a == "payment.refund")
            .count()
    };
    assert_eq!(refunds(&h), 3, "the compensation's own budget");

    fixed.store(true, Ordering::SeqCst);
    let retry = Intervention {
        id: "op-1".into(),
        action: OperatorAction::Retry { step: None },
        operator: "alice".into(),
        reason: "bank is back".into(),
    };
    h.stream.deliver("order-p", Input::Intervene(retry.clone()));
    let saga = h.finished("order-p").await;
    assert_eq!(saga.status, "CANCELLED");
    assert_eq!(refunds(&h), 4, "one more attempt");
    // Redelivered after a crash: applied once.
    h.stream.deliver("order-p", Input::Intervene(retry));
    eventually("the redelivery settled", || h.stream.all_settled()).await;
    let saga = h.store.get("order-p").unwrap();
    let journaled = saga
        .history
        .iter()
        .filter(|e| matches!(&e.what, Happening::Intervened { id, .. } if id == "op-1"))
        .count();
    assert_eq!(journaled, 1);
    eventually("the census to clear", || h.census.counts("order") == (0, 0)).await;
    h.stop().await;
}

/// A reply is bound to a command the saga sent: one to an attempt or a compensation never
/// sent is dead-lettered (with the reason) and counted; a second answer to an answered attempt
/// is acked without effect and counted as a duplicate.
#[tokio::test]
async fn replies_to_attempts_never_sent_are_dead_lettered_and_duplicates_ignored() {
    let h = Harness::start(order(), Arc::new(|_| None)).await;
    h.start_saga("order-7").await;
    eventually("the charge command", || {
        !h.bus.commands("order-7").is_empty()
    })
    .await;
    let reply = |attempt: u32, compensation: bool| Input::Reply {
        service: None,
        step: "charge".to_string(),
        attempt,
        compensation,
        outcome: Ok(Vec::new()),
    };
    h.stream.deliver("order-7", reply(2, false));
    h.stream.deliver("order-7", reply(1, true));
    eventually("two dead letters", || h.stream.dead_letters().len() == 2).await;
    let reasons: Vec<String> = h.stream.dead_letters().into_iter().map(|d| d.1).collect();
    assert!(
        reasons[0]
            .contains("attempt 2 of step `charge`, which was never sent (the latest sent is 1)"),
        "{reasons:?}"
    );
    assert!(
        reasons[1].contains(
            "compensation attempt 1 of step `charge`, which was never sent (none was sent)"
        ),
        "{reasons:?}"
    );
    assert_eq!(h.store.get("order-7").unwrap().status, "PENDING");

    h.stream.deliver("order-7", reply(1, false));
    eventually("the charge to be applied", || {
        h.store.get("order-7").is_some_and(|s| s.status == "PAID")
    })
    .await;
    h.stream.deliver("order-7", reply(1, false));
    eventually("every delivery to be settled", || h.stream.all_settled()).await;
    assert_eq!(
        h.stream.count(&Settlement::Ack),
        3,
        "{:?}",
        h.stream.settled()
    );
    assert_eq!(
        *h.census.refused.lock().unwrap(),
        ["unsent_attempt", "unsent_attempt"]
    );
    assert_eq!(*h.census.ignored.lock().unwrap(), ["duplicate"]);
    h.stop().await;
}

/// A second reply contradicting the one applied is recorded in the saga's history and
/// dead-lettered; the same reply again is a plain duplicate (acked, nothing recorded).
#[tokio::test]
async fn a_second_contradicting_reply_is_recorded_and_dead_lettered() {
    let h = Harness::start(order(), Arc::new(|_| None)).await;
    h.start_saga("order-9").await;
    eventually("the charge command", || {
        !h.bus.commands("order-9").is_empty()
    })
    .await;
    let reply = |outcome: Result<Vec<u8>, StepError>| Input::Reply {
        service: Some("payment".to_string()),
        step: "charge".to_string(),
        attempt: 1,
        compensation: false,
        outcome,
    };
    h.stream.deliver("order-9", reply(Ok(Vec::new())));
    eventually("the charge to be applied", || {
        h.store.get("order-9").is_some_and(|s| s.status == "PAID")
    })
    .await;
    eventually("every delivery to be settled", || h.stream.all_settled()).await;
    let before = h.store.get("order-9").unwrap();
    h.stream.deliver("order-9", reply(Ok(Vec::new())));
    let declined = Err(StepError {
        kind: "declined".to_string(),
        message: "card declined".to_string(),
    });
    h.stream.deliver("order-9", reply(declined));
    eventually("the dead letter", || !h.stream.dead_letters().is_empty()).await;
    eventually("every delivery to be settled", || h.stream.all_settled()).await;
    let (saga_id, reason) = h.stream.dead_letters().remove(0);
    assert_eq!(saga_id, "order-9");
    assert_eq!(
        reason,
        "second reply to attempt 1 of step `charge` contradicts the answer applied: it says failed with `declined`, the attempt had succeeded (saga `order-9`)"
    );
    assert_moved_only_in_history(
        &h.store.get("order-9").unwrap(),
        &before,
        Some(0),
        "reply refused: second reply to attempt 1 of step `charge` contradicts the answer applied: it says failed with `declined`, the attempt had succeeded",
    );
    assert_eq!(*h.census.refused.lock().unwrap(), ["contradicting_reply"]);
    assert_eq!(*h.census.ignored.lock().unwrap(), ["duplicate"]);
    h.stop().await;
}

/// A node that dies after writing a status change and before announcing it: the node that
/// recovers the saga announces the change (same sequence, so the server keeps it once).
#[tokio::test]
async fn a_status_change_whose_announcement_was_lost_is_announced_on_recovery() {
    let h = Harness::start(order(), only_charge_answered()).await;
    h.start_saga("order-8").await;
    eventually("PAID", || {
        h.store.get("order-8").is_some_and(|s| s.status == "PAID")
    })
    .await;
    eventually("every delivery to be settled", || h.stream.all_settled()).await;
    h.crash().await;
    // The announcement never left the dead node.
    h.bus.announcements.lock().unwrap().clear();

    let coordinator = h.recover_on_a_new_node("order-8").await;
    eventually("the lost announcement", || {
        h.bus.announcements("order-8") == status_changes(&[("PENDING", "PAID", 2)])
    })
    .await;
    let h = Harness { coordinator, ..h };
    h.stop().await;
}
