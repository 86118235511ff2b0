//! Prometheus metrics (OpenMetrics text on `GET /metrics`, see [`crate::http`]) and the
//! node's readiness flags.
//!
//! | metric | type | labels |
//! | --- | --- | --- |
//! | `sagaflow_sagas_started_total` | counter | `saga` |
//! | `sagaflow_sagas_completed_total` | counter | `saga` |
//! | `sagaflow_sagas_compensated_total` | counter | `saga` |
//! | `sagaflow_sagas_failed_total` | counter | `saga` |
//! | `sagaflow_sagas_in_flight` | gauge | (live saga actors on this node) |
//! | `sagaflow_step_duration_seconds` | histogram | `saga`, `step`, `outcome` (forward steps) |
//! | `sagaflow_compensation_duration_seconds` | histogram | `saga`, `step`, `outcome` |
//! | `sagaflow_step_attempts_total` | counter | `service`, `compensation` (attempts that ended) |
//! | `sagaflow_step_errors_total` | counter | `service`, `kind` |
//! | `sagaflow_dlq_depth` | gauge | (messages in `SAGA_DLQ`) |
//! | `sagaflow_events_refused_total` | counter | `reason` (saga events dead-lettered: `saga_id`, `partition`, `command_id`, `unknown_step`, `wrong_service`, `unsent_attempt`, `contradicting_reply`, `retries_exhausted`…) |
//! | `sagaflow_events_ignored_total` | counter | `reason` (replies acked without being applied: `duplicate`, `stale_attempt` — a late reply, recorded in the saga's history) |
//! | `sagaflow_nats_disconnects_total` | counter | (times the node's NATS connection was lost) |
//! | `sagaflow_orphans_adopted_total` | counter | (unfinished sagas nothing drove, taken up by the orphan sweep after a node left) |
//! | `sagaflow_fenced_writes_total` | counter | (writes refused because this node's heartbeat lapsed, see [`crate::fence`]) |
//! | `sagaflow_consumer_pending` | gauge | `stream`, `consumer` |
//! | `sagaflow_consumer_ack_pending` | gauge | `stream`, `consumer` |
//! | `sagaflow_service_without_consumer` | gauge | `service` (1 while a service the definitions call has no consumer group) |
//! | `sagaflow_admission_pressure` | gauge | (share of step timeouts used, see [`crate::admission`]) |
//! | `sagaflow_sagas_refused_total` | counter | `saga` (refused by admission control) |
//! | `sagaflow_partitions_owned` | gauge | |
//! | `sagaflow_nats_connected` | gauge | |
//! | `sagaflow_ready` | gauge | |
//!
//! Every metric is per node, saga starts included (counted where the API core creates the
//! saga, [`crate::api::SagaApi::start`]), so several nodes in one process (tests) never mix
//! their counts. JetStream-derived gauges are polled every [`POLL_EVERY`] (see [`poll`]).

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_nats::jetstream;
use futures::StreamExt;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;
use sagaflow_actors::machine::Phase;
use sagaflow_actors::ports::{AttentionCount, Observer};
use tokio_util::sync::CancellationToken;

use crate::admission::Admission;
use crate::topology::{COMMANDS_STREAM, DLQ_STREAM, EVENTS_STREAM, STATUS_STREAM};

/// How often JetStream stream and consumer info is polled.
pub const POLL_EVERY: Duration = Duration::from_secs(5);
/// At most this many `svc-*` consumers are reported (bounded cardinality).
pub const MAX_SERVICE_CONSUMERS: usize = 64;

/// Labels of per-saga counters (defined with admission control, which counts refusals).
pub use crate::admission::SagaLabels;

/// Labels of the step latency histograms.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct StepLabels {
    /// Saga definition name.
    pub saga: String,
    /// Step name.
    pub step: String,
    /// `ok` or the error kind of a failure.
    pub outcome: String,
}

/// Labels of step attempts.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct AttemptLabels {
    /// Participant service.
    pub service: String,
    /// `true` for compensation attempts.
    pub compensation: String,
}

/// Labels of step errors.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ErrorLabels {
    /// Participant service.
    pub service: String,
    /// Error kind (`declined`, `timeout`, `unavailable`…).
    pub kind: String,
}

/// Labels of the refused and ignored event counters.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ReasonLabels {
    /// A short stable label (never free text: bounded cardinality).
    pub reason: String,
}

/// Labels of per-service gauges.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ServiceLabels {
    /// The participant service.
    pub service: String,
}

/// Labels of consumer gauges.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ConsumerLabels {
    /// Stream.
    pub stream: String,
    /// Durable consumer name.
    pub consumer: String,
}

fn step_histogram() -> Histogram {
    // 5 ms … ~82 s.
    Histogram::new(exponential_buckets(0.005, 2.0, 15))
}

/// Whether the node can take work: NATS connected, and started (not yet shutting down).
#[derive(Debug, Default)]
pub struct Readiness {
    connected: AtomicBool,
    serving: AtomicBool,
    disconnects: AtomicU64,
    changed: tokio::sync::Notify,
}

impl Readiness {
    /// Records the NATS connection state (from the client's event callback).
    pub fn set_connected(&self, up: bool) {
        let was = self.connected.swap(up, Ordering::SeqCst);
        if was != up {
            if was {
                self.disconnects.fetch_add(1, Ordering::SeqCst);
            }
            self.changed.notify_waiters();
        }
    }

    /// How many times the NATS connection was lost since the node started.
    pub fn disconnects(&self) -> u64 {
        self.disconnects.load(Ordering::SeqCst)
    }

    /// Records whether the node serves (after start, before shutdown).
    pub fn set_serving(&self, up: bool) {
        if self.serving.swap(up, Ordering::SeqCst) != up {
            self.changed.notify_waiters();
        }
    }

    /// Whether NATS is connected.
    pub fn connected(&self) -> bool {
        self.connected.load(Ordering::SeqCst)
    }

    /// Whether the node is ready: serving and connected.
    pub fn ready(&self) -> bool {
        self.serving.load(Ordering::SeqCst) && self.connected()
    }

    /// Resolves at the next change of either flag.
    pub async fn changed(&self) {
        self.changed.notified().await;
    }
}

/// One node's metrics.
pub struct Metrics {
    registry: Registry,
    completed: Family<SagaLabels, Counter>,
    compensated: Family<SagaLabels, Counter>,
    failed: Family<SagaLabels, Counter>,
    parked: Family<SagaLabels, Counter>,
    needs_attention: Family<SagaLabels, Gauge>,
    stuck: Family<SagaLabels, Gauge>,
    in_flight: Gauge,
    step_duration: Family<StepLabels, Histogram, fn() -> Histogram>,
    compensation_duration: Family<StepLabels, Histogram, fn() -> Histogram>,
    attempts: Family<AttemptLabels, Counter>,
    errors: Family<ErrorLabels, Counter>,
    events_refused: Family<ReasonLabels, Counter>,
    events_ignored: Family<ReasonLabels, Counter>,
    nats_disconnects: Counter,
    orphans_adopted: Counter,
    mirroring: Mutex<()>,
    /// Writes refused by the node's fence ([`crate::fence`]).
    pub fenced_writes: Counter,
    /// Messages in the dead-letter stream.
    pub dlq_depth: Gauge,
    /// Per consumer: messages not yet delivered.
    pub consumer_pending: Family<ConsumerLabels, Gauge>,
    /// Per consumer: messages delivered, not yet acked.
    pub consumer_ack_pending: Family<ConsumerLabels, Gauge>,
    /// Partitions this node consumes.
    pub partitions_owned: Gauge,
    nats_connected: Gauge,
    ready: Gauge,
    /// Partition consumers with series, to drop those of partitions handed over.
    reported_events: Mutex<Vec<String>>,
    /// Admission control's measure of overload, fed by the attempts that end on this node.
    pub admission: Arc<Admission>,
    /// 1 while a service the loaded definitions call has no consumer group.
    service_without_consumer: Family<ServiceLabels, Gauge>,
    /// The services the loaded definitions call (see [`Metrics::watch_services`]).
    services: Mutex<Vec<String>>,
    /// Sagas created through this node's API (counted by [`crate::api::SagaApi::start`]).
    pub sagas_started: Family<SagaLabels, Counter>,
}

impl std::fmt::Debug for Metrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Metrics").finish_non_exhaustive()
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    /// Records whether `service` has a consumer group (`sagaflow_service_without_consumer`).
    pub fn service_served(&self, service: &str, served: bool) {
        self.service_without_consumer
            .get_or_create(&ServiceLabels {
                service: service.to_string(),
            })
            .set(i64::from(!served));
    }

    /// Reports, from the next poll on, whether each of `services` (those the loaded
    /// definitions call) has a consumer group (`sagaflow_service_without_consumer`).
    pub fn watch_services(&self, services: Vec<String>) {
        if let Ok(mut s) = self.services.lock() {
            *s = services;
        }
    }

    /// Every metric, registered (names prefixed `sagaflow_`).
    pub fn new() -> Self {
        let mut registry = Registry::with_prefix("sagaflow");
        let m = Metrics {
            completed: Family::default(),
            compensated: Family::default(),
            failed: Family::default(),
            parked: Family::default(),
            needs_attention: Family::default(),
            stuck: Family::default(),
            in_flight: Gauge::default(),
            step_duration: Family::new_with_constructor(step_histogram),
            compensation_duration: Family::new_with_constructor(step_histogram),
            attempts: Family::default(),
            errors: Family::default(),
            events_refused: Family::default(),
            events_ignored: Family::default(),
            nats_disconnects: Counter::default(),
            orphans_adopted: Counter::default(),
            mirroring: Mutex::default(),
            fenced_writes: Counter::default(),
            dlq_depth: Gauge::default(),
            consumer_pending: Family::default(),
            consumer_ack_pending: Family::default(),
            partitions_owned: Gauge::default(),
            nats_connected: Gauge::default(),
            ready: Gauge::default(),
            reported_events: Mutex::default(),
            admission: Arc::default(),
            service_without_consumer: Family::default(),
            services: Mutex::default(),
            sagas_started: Family::default(),
            registry: Registry::default(),
        };
        registry.register(
            "sagas_started",
            "Sagas created through this node's API",
            m.sagas_started.clone(),
        );
        registry.register(
            "events_refused",
            "Saga events refused at the edge or by their saga, and dead-lettered, by reason",
            m.events_refused.clone(),
        );
        registry.register(
            "events_ignored",
            "Saga events acked without effect (duplicates, answers to older attempts), by reason",
            m.events_ignored.clone(),
        );
        registry.register(
            "fenced_writes",
            "Snapshot writes and publishes refused because this node's heartbeat lapsed (paused or cut off)",
            m.fenced_writes.clone(),
        );
        registry.register(
            "service_without_consumer",
            "1 while a participant service that a loaded saga definition calls has no consumer group (nobody takes its commands; its steps fail after their timeouts)",
            m.service_without_consumer.clone(),
        );
        registry.register(
            "orphans_adopted",
            "Unfinished sagas that nothing drove (creation interrupted), taken up by the orphan sweep",
            m.orphans_adopted.clone(),
        );
        registry.register(
            "nats_disconnects",
            "Times this node's NATS connection was lost",
            m.nats_disconnects.clone(),
        );
        registry.register(
            "sagas_completed",
            "Sagas that completed (every step succeeded)",
            m.completed.clone(),
        );
        registry.register(
            "sagas_compensated",
            "Sagas whose completed steps were all undone",
            m.compensated.clone(),
        );
        registry.register(
            "sagas_failed",
            "Sagas an operator abandoned (FAILED) after they were parked NEEDS_ATTENTION",
            m.failed.clone(),
        );
        registry.register(
            "sagas_parked",
            "Sagas parked NEEDS_ATTENTION (a compensation exhausted its retries, or a pivot cannot be undone)",
            m.parked.clone(),
        );
        registry.register(
            "sagas_needs_attention",
            "Live sagas on this node parked NEEDS_ATTENTION, waiting for an operator",
            m.needs_attention.clone(),
        );
        registry.register(
            "sagas_stuck",
            "Live sagas on this node with no progress for longer than the stuck multiple of their step timeout",
            m.stuck.clone(),
        );
        registry.register(
            "sagas_in_flight",
            "Live saga actors on this node",
            m.in_flight.clone(),
        );
        registry.register(
            "step_duration_seconds",
            "Forward step latency, first attempt sent to settled",
            m.step_duration.clone(),
        );
        registry.register(
            "compensation_duration_seconds",
            "Compensation latency, first compensation attempt sent to settled",
            m.compensation_duration.clone(),
        );
        registry.register(
            "step_attempts",
            "Step attempts that ended (answered or timed out), by participant service",
            m.attempts.clone(),
        );
        registry.register(
            "step_errors",
            "Failed step attempts, by participant service and error kind",
            m.errors.clone(),
        );
        registry.register(
            "dlq_depth",
            "Messages in the SAGA_DLQ dead-letter stream",
            m.dlq_depth.clone(),
        );
        registry.register(
            "consumer_pending",
            "Messages not yet delivered to a consumer",
            m.consumer_pending.clone(),
        );
        registry.register(
            "consumer_ack_pending",
            "Messages delivered to a consumer and not yet acked",
            m.consumer_ack_pending.clone(),
        );
        registry.register(
            "admission_pressure",
            "Average share of their step timeout used by the step attempts that ended on this node in the last second; above admission.max_timeout_share new sagas are refused",
            m.admission.gauge(),
        );
        registry.register(
            "sagas_refused",
            "Sagas refused with RESOURCE_EXHAUSTED by admission control (the node was overloaded)",
            m.admission.refused(),
        );
        registry.register(
            "partitions_owned",
            "Saga event partitions this node consumes",
            m.partitions_owned.clone(),
        );
        registry.register(
            "nats_connected",
            "1 while the NATS connection is up",
            m.nats_connected.clone(),
        );
        registry.register(
            "ready",
            "1 while the node is ready to take work",
            m.ready.clone(),
        );
        Metrics { registry, ..m }
    }

    /// The OpenMetrics text of every metric.
    pub fn encode(&self) -> String {
        let mut out = String::new();
        if let Err(e) = prometheus_client::encoding::text::encode(&mut out, &self.registry) {
            tracing::warn!(error = %e, "cannot encode metrics");
        }
        out
    }

    /// Mirrors the readiness flags into gauges.
    pub fn set_readiness(&self, r: &Readiness) {
        self.nats_connected.set(i64::from(r.connected()));
        // Mirrored under a lock: the HTTP handler and the poller both call this.
        if let Ok(_mirroring) = self.mirroring.lock() {
            let lost = r.disconnects();
            let counted = self.nats_disconnects.get();
            if lost > counted {
                self.nats_disconnects.inc_by(lost - counted);
            }
        }
        self.ready.set(i64::from(r.ready()));
    }
}

impl Observer for Metrics {
    fn event_refused(&self, reason: &str) {
        self.events_refused
            .get_or_create(&ReasonLabels {
                reason: reason.to_string(),
            })
            .inc();
    }

    fn orphan_adopted(&self, _saga_id: &str) {
        self.orphans_adopted.inc();
    }

    fn event_ignored(&self, reason: &str) {
        self.events_ignored
            .get_or_create(&ReasonLabels {
                reason: reason.to_string(),
            })
            .inc();
    }

    fn attempt_share(&self, saga: &str, step: &str, share: f64) {
        self.admission.record(saga, step, share);
    }

    fn attempt_sent(&self, saga: &str, step: &str, timeout: Duration) {
        self.admission.sent(saga, step, timeout);
    }

    fn saga_finished(&self, saga: &str, phase: Phase) {
        let family = match phase {
            Phase::Completed => &self.completed,
            Phase::Compensated => &self.compensated,
            Phase::Failed => &self.failed,
            // Parking is counted by `saga_parked`: a parked saga is not finished.
            Phase::Running | Phase::Compensating | Phase::NeedsAttention => return,
        };
        family
            .get_or_create(&SagaLabels {
                saga: saga.to_string(),
            })
            .inc();
    }

    fn step_settled(
        &self,
        saga: &str,
        step: &str,
        compensation: bool,
        latency: Duration,
        outcome_kind: Option<&str>,
    ) {
        let family = if compensation {
            &self.compensation_duration
        } else {
            &self.step_duration
        };
        family
            .get_or_create(&StepLabels {
                saga: saga.to_string(),
                step: step.to_string(),
                outcome: outcome_kind.unwrap_or("ok").to_string(),
            })
            .observe(latency.as_secs_f64());
    }

    fn step_attempt(&self, _saga: &str, _step: &str, service: &str, compensation: bool) {
        self.attempts
            .get_or_create(&AttemptLabels {
                service: service.to_string(),
                compensation: compensation.to_string(),
            })
            .inc();
    }

    fn step_error(&self, _saga: &str, _step: &str, service: &str, kind: &str) {
        self.errors
            .get_or_create(&ErrorLabels {
                service: service.to_string(),
                kind: kind.to_string(),
            })
            .inc();
    }

    fn live_sagas(&self, live: usize) {
        self.in_flight.set(i64::try_from(live).unwrap_or(i64::MAX));
    }

    fn saga_parked(&self, saga: &str) {
        self.parked
            .get_or_create(&SagaLabels {
                saga: saga.to_string(),
            })
            .inc();
    }

    fn attention(&self, census: &[AttentionCount]) {
        // The census lists every loaded definition, zeros included, so a resolved alert clears.
        self.needs_attention.clear();
        self.stuck.clear();
        for c in census {
            let labels = SagaLabels {
                saga: c.saga.clone(),
            };
            self.needs_attention
                .get_or_create(&labels)
                .set(i64::try_from(c.needs_attention).unwrap_or(i64::MAX));
            self.stuck
                .get_or_create(&labels)
                .set(i64::try_from(c.stuck).unwrap_or(i64::MAX));
        }
    }
}

/// Keeps the polled gauges up to date until `cancel`: partitions owned and readiness every
/// second, DLQ depth and consumer lag every [`POLL_EVERY`].
pub async fn poll(
    js: jetstream::Context,
    metrics: Arc<Metrics>,
    readiness: Arc<Readiness>,
    owned: Arc<Mutex<Vec<u32>>>,
    cancel: CancellationToken,
) {
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let every = POLL_EVERY.as_secs().max(1);
    let mut n = 0u64;
    let mut last_held = Vec::new();
    loop {
        tokio::select! {
            _ = cancel.cancelled() => return,
            _ = tick.tick() => {}
        }
        let held: Vec<u32> = owned.lock().map(|l| l.clone()).unwrap_or_default();
        metrics
            .partitions_owned
            .set(i64::try_from(held.len()).unwrap_or(i64::MAX));
        metrics.set_readiness(&readiness);
        // Also at once when partitions moved, so their consumers show up without delay.
        let moved = held != last_held;
        if (n.is_multiple_of(every) || moved) && readiness.connected() {
            last_held.clone_from(&held);
            let polled = tokio::select! {
                _ = cancel.cancelled() => return,
                r = tokio::time::timeout(POLL_EVERY, poll_jetstream(&js, &metrics, &held)) => r,
            };
            if polled.is_err() {
                tracing::debug!("jetstream metrics poll timed out");
            }
        }
        n += 1;
    }
}

async fn poll_jetstream(js: &jetstream::Context, metrics: &Metrics, held: &[u32]) {
    match js.get_stream(DLQ_STREAM).await {
        Ok(mut s) => match s.info().await {
            Ok(info) => {
                metrics
                    .dlq_depth
                    .set(i64::try_from(info.state.messages).unwrap_or(i64::MAX));
            }
            Err(e) => tracing::debug!(error = %e, "dlq stream info"),
        },
        Err(e) => tracing::debug!(error = %e, "dlq stream"),
    }
    // Partition consumers this node owns: drop the series of partitions handed over.
    let mut events: Vec<String> = held
        .iter()
        .map(|p| crate::events::consumer_name(*p))
        .collect();
    events.sort();
    if let Ok(mut reported) = metrics.reported_events.lock() {
        for gone in reported.iter().filter(|c| events.binary_search(c).is_err()) {
            let labels = ConsumerLabels {
                stream: EVENTS_STREAM.to_string(),
                consumer: gone.clone(),
            };
            metrics.consumer_pending.remove(&labels);
            metrics.consumer_ack_pending.remove(&labels);
        }
        reported.clone_from(&events);
    }
    consumers(js, metrics, EVENTS_STREAM, &events).await;
    // Service consumer groups (`svc-*`), bounded.
    if let Ok(stream) = js.get_stream(COMMANDS_STREAM).await {
        let names: Vec<String> = stream
            .consumer_names()
            .filter_map(|n| async move { n.ok() })
            .filter(|n| futures::future::ready(n.starts_with("svc-")))
            .take(MAX_SERVICE_CONSUMERS)
            .collect()
            .await;
        let services = metrics
            .services
            .lock()
            .map(|s| s.clone())
            .unwrap_or_default();
        for service in services {
            let served = names
                .iter()
                .any(|n| n.strip_prefix("svc-") == Some(&service));
            metrics.service_served(&service, served);
        }
        consumers(js, metrics, COMMANDS_STREAM, &names).await;
    }
    consumers(
        js,
        metrics,
        STATUS_STREAM,
        &[crate::demo::analytics::CONSUMER.to_string()],
    )
    .await;
}

async fn consumers(js: &jetstream::Context, metrics: &Metrics, stream: &str, names: &[String]) {
    let Ok(s) = js.get_stream(stream).await else {
        return;
    };
    for name in names {
        let info = match s.consumer_info(name).await {
            Ok(i) => i,
            Err(_) => continue, // not created (yet): no series
        };
        let labels = ConsumerLabels {
            stream: stream.to_string(),
            consumer: name.clone(),
        };
        metrics
            .consumer_pending
            .get_or_create(&labels)
            .set(i64::try_from(info.num_pending).unwrap_or(i64::MAX));
        metrics
            .consumer_ack_pending
            .get_or_create(&labels)
            .set(i64::try_from(info.num_ack_pending).unwrap_or(i64::MAX));
    }
}
