//! The core of every API call, whatever the edge: starting sagas (with admission control and
//! idempotent repeats), reading, watching and listing them, and sending interventions.
//!
//! [`SagaApi`] knows nothing of gRPC or HTTP: it fails with an [`ApiError`], and each edge
//! ([`crate::grpc`]) translates that into its own status codes. Reads go straight to the
//! snapshot bucket, so any node answers for any saga.

use std::collections::HashMap;
use std::sync::Arc;

use async_nats::jetstream::{self, kv};
use async_nats::HeaderMap;
use futures::{Stream, StreamExt};
use sagaflow_actors::definition::SagaDefinition;
use sagaflow_actors::hash::partition_of;
use sagaflow_actors::machine::{Happening, Saga, StepPhase};
use sagaflow_actors::ports::{CommandBus, Error as PortError, StateStore};
use sagaflow_actors::wire::{self, Control};
use tokio_util::sync::CancellationToken;

use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;

use crate::admission::{Admission, Overloaded, SagaLabels};
use crate::bus::JetStreamBus;
use crate::cluster::SharedView;
use crate::index::{Cursor, Listed, SagaIndex};
use crate::store::KvStateStore;
use crate::topology::event_subject;

/// The core every API edge shares: start, read, watch and list sagas, send interventions.
#[derive(Clone)]
pub struct SagaApi {
    js: jetstream::Context,
    store: KvStateStore,
    bus: JetStreamBus,
    definitions: Arc<sagaflow_actors::catalog::Catalog>,
    partitions: u32,
    shutdown: CancellationToken,
    /// Admission control, its limit (`admission.max_timeout_share`; 0: off) and the cluster
    /// view with the other nodes' pressures.
    admission: (Arc<Admission>, f64, SharedView),
    /// The cluster's time (see [`crate::clock`]): new sagas are timed by it.
    clock: Arc<crate::clock::ClusterClock>,
    /// The list index, once a list asked for it.
    index: Arc<tokio::sync::Mutex<Option<Arc<SagaIndex>>>>,
    /// Sagas created here, by definition (the node's `sagaflow_sagas_started_total`).
    started: Family<SagaLabels, Counter>,
}

impl std::fmt::Debug for SagaApi {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SagaApi")
            .field("partitions", &self.partitions)
            .finish()
    }
}

/// Checks an id: 1 to `max` characters of `[A-Za-z0-9_-]`, the rule every id from outside
/// passes ([`sagaflow_actors::ids`]; the event decoder applies the same one).
pub use sagaflow_actors::ids::valid_id;

/// Largest saga input (and operator-given output) the API accepts, in bytes.
pub const MAX_INPUT: usize = 256 * 1024;

/// Why a call on [`SagaApi`] failed. Each API edge translates it into its own codes (gRPC:
/// the code each variant names); the messages are what users see.
#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    /// The node is overloaded and started nothing (gRPC `RESOURCE_EXHAUSTED`, with a retry
    /// delay): retrying later is safe.
    #[error(transparent)]
    Overloaded(Overloaded),
    /// A saga with this id exists with another input (`ALREADY_EXISTS`).
    #[error(
        "`{id}` already exists with a different input ({} differ); repeat the request unchanged, or use another id",
        .fields.join(", ")
    )]
    DifferentInput {
        /// The saga id.
        id: String,
        /// The top-level input fields that differ.
        fields: Vec<String>,
    },
    /// The saga was created and removed while this call ran (`ABORTED`): retry.
    #[error("saga was created and removed concurrently; retry")]
    Raced,
    /// No saga with this id (`NOT_FOUND`).
    #[error("no saga with id `{0}`")]
    NotFound(String),
    /// The stored snapshot cannot be read (`DATA_LOSS`).
    #[error("{0}")]
    Corrupt(String),
    /// NATS or the bucket failed (`UNAVAILABLE`): retrying later may succeed.
    #[error(transparent)]
    Unavailable(Box<dyn std::error::Error + Send + Sync>),
    /// A message could not be encoded (`INTERNAL`).
    #[error(transparent)]
    Encode(wire::Error),
    /// A request field is wrong (`INVALID_ARGUMENT`): which one and why.
    #[error("{field}: {message}")]
    Invalid {
        /// The request field.
        field: &'static str,
        /// What is wrong.
        message: String,
    },
    /// The saga is not in a state the call applies to (`FAILED_PRECONDITION`).
    #[error("{0}")]
    Precondition(String),
}

/// What [`SagaApi::signal`] did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Signalled {
    /// The signal id (given, or generated).
    pub signal_id: String,
    /// The saga had already received it: nothing was sent.
    pub duplicate: bool,
}

fn unavailable(e: impl std::error::Error + Send + Sync + 'static) -> ApiError {
    ApiError::Unavailable(Box::new(e))
}

/// A failed [`StateStore::load`] or save.
fn store_error(e: PortError) -> ApiError {
    match e {
        PortError::Corrupt { message, .. } => ApiError::Corrupt(message),
        e => unavailable(e),
    }
}

impl SagaApi {
    /// A core over the node's JetStream context and snapshot bucket.
    pub fn new(
        js: jetstream::Context,
        sagas: kv::Store,
        definitions: Arc<sagaflow_actors::catalog::Catalog>,
        partitions: u32,
        shutdown: CancellationToken,
    ) -> Self {
        SagaApi {
            store: KvStateStore::new(js.clone(), sagas, partitions),
            bus: JetStreamBus::new(js.clone(), partitions),
            js,
            definitions,
            partitions,
            shutdown,
            admission: (Arc::default(), 0.0, SharedView::default()),
            clock: Arc::default(),
            index: Arc::default(),
            started: Family::default(),
        }
    }

    /// Counts the sagas this core creates in `started` (the node's metric).
    pub fn with_started_counter(mut self, started: Family<SagaLabels, Counter>) -> Self {
        self.started = started;
        self
    }

    /// Times new sagas and interventions by `clock` (the node's cluster clock).
    pub fn with_clock(mut self, clock: Arc<crate::clock::ClusterClock>) -> Self {
        self.clock = clock;
        self
    }

    /// The cluster's time, unix ms.
    pub fn now_ms(&self) -> i64 {
        self.clock.now_ms()
    }

    /// Publishes the first lifecycle event of each saga as `status_events` says.
    pub fn with_status_events(mut self, status_events: crate::config::StatusEvents) -> Self {
        self.bus = self.bus.with_status_events(status_events);
        self
    }

    /// Refuses new sagas while `admission` measures more than `limit`, or the node owning
    /// the saga's partition reported more in its last heartbeat (`view`); see
    /// [`crate::admission`]. A `limit` of 0: never.
    pub fn with_admission(
        mut self,
        admission: Arc<Admission>,
        limit: f64,
        view: SharedView,
    ) -> Self {
        self.admission = (admission, limit, view);
        self
    }

    /// The active version of a definition (what new sagas start on).
    pub fn definition(&self, name: &str) -> Option<Arc<SagaDefinition>> {
        self.definitions.active(name)
    }

    /// The version of its definition `saga` runs on, if this node knows it (else the active
    /// one, as the saga's owner falls back to for a version stored nowhere).
    pub fn definition_of(&self, saga: &Saga) -> Option<Arc<SagaDefinition>> {
        self.definitions
            .version(&saga.definition, saga.fingerprint)
            .or_else(|| self.definitions.active(&saga.definition))
    }

    /// The consumer groups (durable consumers) on the commands stream: `svc-<service>` for
    /// each service somebody serves.
    pub async fn command_consumers(&self) -> Result<std::collections::HashSet<String>, ApiError> {
        let stream = self
            .js
            .get_stream(crate::topology::COMMANDS_STREAM)
            .await
            .map_err(unavailable)?;
        let names: Vec<Result<String, _>> = stream.consumer_names().collect().await;
        names.into_iter().map(|n| n.map_err(unavailable)).collect()
    }

    /// The active version of every definition, by name.
    pub fn definitions(&self) -> Vec<Arc<SagaDefinition>> {
        self.definitions.active_all()
    }

    /// Starts saga `id` of `def` with `input` (JSON), idempotently: returns whether it was created.
    ///
    /// The snapshot is created here (create-only, so a repeat finds it), then a `start` event
    /// tells the partition's owner to publish the first commands. A repeat of an unfinished
    /// saga publishes the `start` event again (de-duplicated by `Nats-Msg-Id` within the
    /// window, harmless beyond it), which also repairs a crash between the two writes.
    ///
    /// While the node is overloaded ([`crate::admission`]) it fails with
    /// [`ApiError::Overloaded`] and writes nothing, repeats included (retrying later is safe).
    pub async fn start(
        &self,
        def: &SagaDefinition,
        id: &str,
        input: Vec<u8>,
    ) -> Result<(bool, Saga), ApiError> {
        // Overloaded: refuse before writing anything, so a refused saga costs one check.
        let (admission, limit, view) = &self.admission;
        let owner = if *limit > 0.0 {
            view.read()
                .await
                .owner_pressure(partition_of(id, self.partitions))
        } else {
            0.0
        };
        if let Err(e) = admission.admit(&def.name, *limit, owner) {
            tracing::debug!(saga_id = %id, pressure = e.pressure, "saga refused: overloaded");
            return Err(ApiError::Overloaded(e));
        }
        // Create first: a new order (the common case) costs one write and no read; a repeat
        // finds the existing snapshot through the conflict.
        let requested = input.clone();
        let (fresh, _) = Saga::start(def, id.to_string(), input, self.now_ms());
        let (created, saga, revision) = match self.store.save(&fresh, None).await {
            Ok(revision) => (true, fresh, Some(revision)),
            Err(PortError::Conflict { .. }) => {
                match self.store.load(id).await.map_err(store_error)? {
                    Some((saga, _)) => (false, saga, None),
                    None => return Err(ApiError::Raced),
                }
            }
            Err(e) => return Err(store_error(e)),
        };
        if !created {
            // A repeat is idempotent only if it asks for the same thing.
            let fields = differing_fields(&saga.input, &requested);
            if !fields.is_empty() {
                return Err(ApiError::DifferentInput {
                    id: id.to_string(),
                    fields,
                });
            }
        }
        let at = self.now_ms();
        // The creator hands the owner the snapshot it wrote, sparing it a read, and publishes
        // the first commands itself (below): the owner then only arms their timers. A repeat
        // sends a plain start: the owner reads the current snapshot and (re)publishes what is in
        // flight.
        let control = match revision.map(|r| wire::encode_snapshot(&saga).map(|s| (r, s))) {
            Some(Ok((revision, snapshot))) => Control::Created {
                at,
                revision,
                snapshot,
                commands_sent: true,
            },
            _ => Control::Started { at },
        };
        let start = async {
            if saga.is_terminal() {
                return Ok(());
            }
            self.publish_control(id, "start", &control, format!("start/{id}"))
                .await
        };
        // The snapshot just written lists them as in flight, so they may go out now, without
        // waiting for the owner (the owner's copy, and any later republish, carry the same
        // command ids: the server de-duplicates). If this publish fails the start still stands:
        // the step's timeout retries the command.
        let first_commands = async {
            if !created {
                return;
            }
            let in_flight = saga.in_flight();
            if let Err(e) = self.bus.send(def, &saga, &in_flight).await {
                tracing::warn!(saga_id = %id, error = %e, "cannot publish the first commands; the step timeout retries them");
            }
        };
        // The first lifecycle event (status `initial`); later ones come from the owner. Sent
        // alongside the start event: neither waits for the other.
        let announce = async {
            if created {
                if let Err(e) = self.bus.announce(&saga, "", &saga.status, 1).await {
                    tracing::warn!(saga_id = %id, error = %e, "cannot announce initial status");
                }
            }
        };
        let (started, (), ()) = futures::join!(start, announce, first_commands);
        if let Err(e) = started {
            if !created {
                return Err(e);
            }
            // The saga is stored: it must not be left with nothing to drive it. Keep trying
            // in the background (the server de-duplicates by message id); should this node die
            // first, the orphan sweep of the partition's owner takes the saga up.
            tracing::warn!(saga_id = %id, error = %e, "cannot publish the start event; retrying in the background");
            tokio::spawn(self.clone().republish_start(id.to_string(), control));
        }
        if created {
            self.started
                .get_or_create(&SagaLabels {
                    saga: def.name.clone(),
                })
                .inc();
            tracing::info!(saga_id = %id, saga = %def.name, "saga started");
        }
        Ok((created, saga))
    }

    /// Publishes a created saga's start event until it is stored (or the node shuts down).
    async fn republish_start(self, id: String, control: Control) {
        let mut delay = std::time::Duration::from_millis(200);
        loop {
            tokio::select! {
                _ = self.shutdown.cancelled() => return,
                _ = tokio::time::sleep(delay) => {}
            }
            if self
                .publish_control(&id, "start", &control, format!("start/{id}"))
                .await
                .is_ok()
            {
                tracing::info!(saga_id = %id, "start event published after a retry");
                return;
            }
            delay = (delay * 2).min(std::time::Duration::from_secs(30));
        }
    }

    /// Publishes a control event (`kind`: `start`, `intervene`…) for saga `id` to its
    /// partition, de-duplicated by `msg_id`, and returns once the stream stored it.
    pub async fn publish_control(
        &self,
        id: &str,
        kind: &str,
        control: &Control,
        msg_id: String,
    ) -> Result<(), ApiError> {
        let payload = wire::encode_control(control).map_err(ApiError::Encode)?;
        let mut headers = HeaderMap::new();
        headers.insert(async_nats::header::NATS_MESSAGE_ID, msg_id.as_str());
        headers.insert(crate::topology::SAGA_ID_HEADER, id);
        let subject = event_subject(partition_of(id, self.partitions), kind);
        self.js
            .publish_with_headers(subject, headers, payload.into())
            .await
            .map_err(unavailable)?
            .await
            .map_err(unavailable)?;
        Ok(())
    }

    /// Delivers signal `name` with `payload` (JSON; empty: `null`) to saga `saga_id`,
    /// idempotently on `signal_id` (empty: a fresh id): checked against the saga and its
    /// definition first, then stored as an event of the saga's partition (ordered with its
    /// other events) before this returns.
    pub async fn signal(
        &self,
        saga_id: &str,
        name: &str,
        payload: Vec<u8>,
        signal_id: String,
    ) -> Result<Signalled, ApiError> {
        if !sagaflow_actors::definition::valid_signal_name(name) {
            return Err(ApiError::Invalid {
                field: "name",
                message: format!(
                    "{} is not a signal name (dot-separated lowercase parts, e.g. `delivery.confirmed`)",
                    sagaflow_actors::ids::quote(name)
                ),
            });
        }
        let payload = if payload.is_empty() {
            b"null".to_vec()
        } else {
            payload
        };
        if payload.len() > crate::events::MAX_SIGNAL_PAYLOAD {
            return Err(ApiError::Invalid {
                field: "payload_json",
                message: format!(
                    "{} bytes, at most {}",
                    payload.len(),
                    crate::events::MAX_SIGNAL_PAYLOAD
                ),
            });
        }
        if let Err(e) = serde_json::from_slice::<serde_json::Value>(&payload) {
            return Err(ApiError::Invalid {
                field: "payload_json",
                message: format!("not JSON: {e}"),
            });
        }
        let signal_id = if signal_id.is_empty() {
            format!("sig-{:016x}", rand::random::<u64>())
        } else {
            signal_id
        };
        if !valid_id(&signal_id, sagaflow_actors::ids::MAX_SAGA_ID) {
            return Err(ApiError::Invalid {
                field: "signal_id",
                message: "1 to 128 of [A-Za-z0-9_-]".into(),
            });
        }
        let (saga, _) = self.get(saga_id).await?;
        let def = self.definition_of(&saga).ok_or_else(|| {
            ApiError::Precondition(format!(
                "saga definition `{}` is not loaded on this node",
                saga.definition
            ))
        })?;
        let waits = def.signals();
        if !waits.contains(&name) {
            let them = if waits.is_empty() {
                "it waits for no signal".to_string()
            } else {
                format!(
                    "it waits for {}",
                    waits
                        .iter()
                        .map(|w| format!("`{w}`"))
                        .collect::<Vec<_>>()
                        .join(", ")
                )
            };
            return Err(ApiError::Invalid {
                field: "name",
                message: format!(
                    "saga `{saga_id}` ({}) waits for no signal `{name}`: {them}",
                    def.name
                ),
            });
        }
        let seen = saga.history.iter().any(|h| {
            matches!(&h.what, Happening::SignalReceived { id, .. } | Happening::SignalIgnored { id, .. } if *id == signal_id)
        });
        if seen {
            return Ok(Signalled {
                signal_id,
                duplicate: true,
            });
        }
        if saga.is_terminal() {
            return Err(ApiError::Precondition(format!(
                "saga `{saga_id}` has finished ({}, {}): signals are for running sagas",
                saga.phase.as_str(),
                saga.status
            )));
        }
        let takes = def.steps.iter().zip(&saga.steps).any(|(step, state)| {
            step.wait_for() == Some(name)
                && (state.phase == StepPhase::Waiting
                    || (state.phase == StepPhase::Pending
                        && state.output.is_none()
                        && saga.phase == sagaflow_actors::machine::Phase::Running))
        });
        if !takes {
            return Err(ApiError::Precondition(format!(
                "no step of saga `{saga_id}` waits for signal `{name}` any more (it was received, timed out, or the saga compensates)"
            )));
        }
        let control = Control::Signal {
            id: signal_id.clone(),
            name: name.to_string(),
            payload,
            at: self.now_ms(),
        };
        self.publish_control(
            saga_id,
            "signal",
            &control,
            format!("signal/{saga_id}/{signal_id}"),
        )
        .await?;
        Ok(Signalled {
            signal_id,
            duplicate: false,
        })
    }

    /// The saga's snapshot and revision, or [`ApiError::NotFound`].
    pub async fn get(&self, id: &str) -> Result<(Saga, u64), ApiError> {
        match self.store.load(id).await {
            Ok(Some(s)) => Ok(s),
            Ok(None) => Err(ApiError::NotFound(id.to_string())),
            Err(e) => Err(store_error(e)),
        }
    }

    /// Every change of the saga's snapshot, starting with the current one, until terminal.
    pub async fn watch(
        &self,
        id: &str,
    ) -> Result<impl Stream<Item = Result<(Saga, u64), ApiError>> + Send + 'static, ApiError> {
        // Existence check first, so an unknown id is NOT_FOUND rather than a silent wait.
        self.get(id).await?;
        let watch = self
            .store
            .bucket()
            .watch_with_history(self.store.key(id))
            .await
            .map_err(unavailable)?;
        let stream = watch
            .filter_map(|entry| async move {
                match entry {
                    Ok(e) if e.operation == kv::Operation::Put => Some(
                        wire::decode_snapshot(&e.value)
                            .map(|s| (s, e.revision))
                            .map_err(|e| ApiError::Corrupt(e.to_string())),
                    ),
                    Ok(_) => None,
                    Err(e) => Some(Err(unavailable(e))),
                }
            })
            // Watchers end when the node shuts down, so they do not hold the server open.
            .take_until(self.shutdown.clone().cancelled_owned());
        // Yield up to and including the first terminal snapshot, then end at once (not on the
        // next update, which never comes).
        let stream =
            futures::stream::unfold((Box::pin(stream), false), |(mut s, done)| async move {
                if done {
                    return None;
                }
                let item = s.next().await?;
                let terminal = matches!(&item, Ok((saga, _)) if saga.is_terminal());
                Some((item, (s, terminal)))
            });
        Ok(stream)
    }

    /// This node's list index (see [`crate::index::SagaIndex`]), started on first use and
    /// after it stopped (idle, or its consumer failed); caught up with every write made before
    /// the call.
    async fn index(&self) -> Result<Arc<SagaIndex>, ApiError> {
        let index = {
            let mut slot = self.index.lock().await;
            match slot.as_ref().filter(|i| i.running()) {
                Some(i) => i.clone(),
                None => {
                    let started = std::time::Instant::now();
                    let index = SagaIndex::start(self.store.bucket().clone(), &self.shutdown)
                        .await
                        .map_err(unavailable)?;
                    let sagas = index.len();
                    tracing::info!(
                        sagas,
                        took = ?started.elapsed(),
                        "list index started"
                    );
                    tokio::spawn(stop_when_idle(index.clone()));
                    *slot = Some(index.clone());
                    index
                }
            }
        };
        let mut stream = self.store.bucket().stream.clone();
        let last = stream
            .info()
            .await
            .map_err(unavailable)?
            .state
            .last_sequence;
        index.catch_up(last).await;
        Ok(index)
    }

    /// Unfinished sagas of definition `name` per version they run on (by their index headers;
    /// sagas written before versions count under `None`).
    pub async fn running_versions(
        &self,
        name: &str,
    ) -> Result<HashMap<Option<u64>, u64>, ApiError> {
        let index = self.index().await?;
        let (listed, _) = index
            .page(None, usize::MAX, self.now_ms(), |l| {
                l.headers
                    .as_ref()
                    .is_some_and(|h| h.definition == name && !h.phase.is_terminal())
            })
            .await;
        let mut counts = HashMap::new();
        for l in listed {
            *counts.entry(l.headers.and_then(|h| h.version)).or_insert(0) += 1;
        }
        Ok(counts)
    }

    /// One page of sagas, newest first: candidates from the index that `keep` accepts by their
    /// headers, loaded in order, and kept if `accept` accepts the snapshot. At most `n` sagas,
    /// and at most `examine` candidates loaded; the cursor is where the next page starts
    /// (`None`: no more).
    pub async fn list_page(
        &self,
        after: Option<&Cursor>,
        n: usize,
        examine: usize,
        keep: impl Fn(&Listed) -> bool,
        accept: impl Fn(&Saga) -> bool,
    ) -> Result<(Vec<Saga>, Option<Cursor>), ApiError> {
        let index = self.index().await?;
        let now = self.now_ms();
        let mut out = Vec::with_capacity(n);
        let mut cursor = after.cloned();
        let mut examined = 0;
        loop {
            let want = (n - out.len()).min(examine - examined).max(1);
            let (candidates, more) = index.page(cursor.as_ref(), want, now, &keep).await;
            let Some(last) = candidates.last() else {
                return Ok((out, None));
            };
            cursor = Some(Cursor::after(last));
            examined += candidates.len();
            let store = self.store.clone();
            let loaded: Vec<(String, Loaded)> = futures::stream::iter(candidates)
                .map(|c| {
                    let store = store.clone();
                    async move {
                        let r = store.load(&c.id).await;
                        (c.id, r)
                    }
                })
                .buffered(64)
                .collect()
                .await;
            for (id, l) in loaded {
                match l {
                    Ok(Some((s, _))) if accept(&s) => out.push(s),
                    Ok(Some(_)) | Err(PortError::Corrupt { .. }) => {}
                    // Expired before the index saw it go.
                    Ok(None) => index.forget(&id),
                    Err(e) => return Err(store_error(e)),
                }
            }
            if !more {
                return Ok((out, None));
            }
            if out.len() >= n || examined >= examine {
                return Ok((out, cursor));
            }
        }
    }
}

/// The top-level fields in which two JSON inputs differ (`["input"]` if either is not a JSON
/// object); empty if they are equal as JSON (key order and spacing aside).
pub fn differing_fields(old: &[u8], new: &[u8]) -> Vec<String> {
    let parse = |b: &[u8]| serde_json::from_slice::<serde_json::Value>(b).ok();
    match (parse(old), parse(new)) {
        (Some(serde_json::Value::Object(a)), Some(serde_json::Value::Object(b))) => {
            let mut keys: Vec<&String> = a.keys().chain(b.keys()).collect();
            keys.sort();
            keys.dedup();
            keys.into_iter()
                .filter(|k| a.get(*k) != b.get(*k))
                .map(|k| k.to_string())
                .collect()
        }
        (Some(a), Some(b)) if a == b => Vec::new(),
        _ if old == new => Vec::new(),
        _ => vec!["input".to_string()],
    }
}

/// A snapshot as [`StateStore::load`] returns it.
type Loaded = Result<Option<(Saga, u64)>, PortError>;

/// Stops `index` once no list has used it for [`crate::index::IDLE_STOP`].
async fn stop_when_idle(index: Arc<SagaIndex>) {
    let check = std::time::Duration::from_secs(30);
    while index.running() {
        tokio::time::sleep(check).await;
        if index.idle() >= crate::index::IDLE_STOP {
            tracing::info!("list index stopped: unused");
            index.stop();
        }
    }
}
