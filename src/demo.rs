//! The demo participant services (payment, inventory, shipping, notification) and the
//! analytics service, hosted in a node when `demo_services = true`.
//!
//! ```text
//!   SAGA_COMMANDS ── svc-payment ──▶ run_consumer ──▶ ServicePool "payment" ─▶ instances ─▶ Payment::handle
//!                 ── svc-inventory ─▶ …                                                   Inventory::handle
//!                 ── svc-shipping ──▶ …                                                   Shipping::handle
//!                 ── svc-notification ▶ …                                                 Notification::handle
//!   SAGA_STATUS   ── analytics ─────▶ one task, batches in stream order ─▶ KV sagaflow_analytics/totals
//! ```
//!
//! # Layout
//! - [`ledger`](mod@ledger): the durable, exactly-once record of every effect (KV `sagaflow_ledger`), and
//!   [`ledger::LedgerSummary`] for tests that check ledgers.
//! - [`payment`], [`inventory`], [`shipping`], [`notification`]: one participant each.
//! - [`analytics`]: completed orders, revenue and per-SKU sales from the lifecycle events.
//!
//! # Idempotency
//! Every effect is recorded under `<service>.<idempotency_key>` with a KV `create`, which fails
//! when the key exists: a duplicate (redelivered or retried) command finds the first entry and
//! answers the same outcome again without doing anything. A compensation that arrives before its
//! forward command first records the forward key as `Voided`, so the late forward command is
//! refused (`Failure{kind: "voided"}`) rather than applied.
//!
//! # Knobs
//! [`DemoConfig`]'s `latency_ms`, `failure_rate` and `panic_rate` apply
//! to **every** command, compensations included: the saga retries compensations until they succeed,
//! so an injected transient failure there only delays them, and an injected panic exercises the
//! pool's supervision the same way. Injected `unavailable` failures are not recorded in the ledger
//! (they are transient; the retry gets a fresh chance).
//!
//! # Stateless
//! With `demo.stateless = true` nothing is recorded ([`ledger::Ledger::stateless`],
//! [`inventory::Stock::stateless`]): each answer is computed from the command alone, which
//! makes it idempotent by itself. Payment still declines above its limit and inventory still
//! refuses what `demo.stock` does not list enough of (`SKU-OUT`), so mixed outcomes keep their
//! shares; refunds and releases succeed with nothing to undo. It exists to measure the
//! orchestrator without its participants' own storage: six KV operations per order (four
//! ledger entries, the inventory's ledger read and its stock compare-and-set) that the bench's
//! baseline participant does not do.

pub mod analytics;
pub mod inventory;
pub mod ledger;
pub mod notification;
pub mod payment;
pub mod shipping;

use std::sync::Arc;
use std::time::Duration;

use async_nats::jetstream;
use sagaflow_participant::{ConsumerSettings, Handler, Outcome, Runner, Running, Unavailable};
use sagaflow_proto::v1;
use serde::Deserialize;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::config::{ConsumerConfig, DemoConfig, NodeConfig, StatusEvents};

pub use analytics::sales;
pub use ledger::{ledger, LedgerEntry, LedgerSummary};

/// Commands a node's service pool holds per instance (running or queued); the rest wait in
/// JetStream (see [`sagaflow_participant::runner`]). An instance runs one at a time, so a few
/// queued behind it keep it busy; more would only hold slow commands in memory (with the
/// default 64 instances, 256 per service, as many as 4 instances × 64 held before).
const COMMANDS_IN_HAND_PER_INSTANCE: usize = 4;

/// The demo services, in the order they are started.
pub const SERVICES: [&str; 4] = crate::config::DEMO_SERVICES;

/// Why the demo services could not start or a read failed.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A bucket could not be created or opened.
    #[error(transparent)]
    Topology(#[from] crate::topology::Error),
    /// A KV read or write failed.
    #[error("cannot {operation}: {message}")]
    Storage {
        /// What we were doing.
        operation: &'static str,
        /// Cause.
        message: String,
    },
    /// A stored value could not be decoded.
    #[error("corrupt {what} `{key}`: {message}")]
    Corrupt {
        /// Which kind of value.
        what: &'static str,
        /// Its key.
        key: String,
        /// Cause.
        message: String,
    },
    /// A service could not be started.
    #[error(transparent)]
    Start(#[from] sagaflow_participant::StartError),
}

/// The running demo services (each a [`sagaflow_participant::Runner`]) and analytics.
pub struct Demo {
    services: Vec<Running>,
    tasks: TaskTracker,
    cancel: CancellationToken,
}

impl std::fmt::Debug for Demo {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Demo")
            .field(
                "services",
                &self
                    .services
                    .iter()
                    .map(Running::service)
                    .collect::<Vec<_>>(),
            )
            .finish()
    }
}

/// Starts the demo services: ensures their buckets, initialises the stock, spawns one
/// [`ServicePool`] of `cfg.demo.instances` instances per service fed by the service's consumer
/// group, and the analytics consumer. Everything stops when `cancel` fires or at
/// [`Demo::shutdown`].
pub async fn start(
    js: jetstream::Context,
    cfg: &NodeConfig,
    cancel: CancellationToken,
) -> Result<Demo, Error> {
    let replicas = cfg.streams.replicas;
    let (ledger, stock) = if cfg.demo.stateless {
        (
            ledger::Ledger::stateless(),
            inventory::Stock::stateless(cfg.demo.stock.clone()),
        )
    } else {
        let stock = inventory::Stock::open(&js, replicas).await?;
        stock.init(&cfg.demo.stock).await?;
        (ledger::open(&js, replicas).await?, stock)
    };
    let knobs = Knobs::from_config(&cfg.demo);
    let participants: [(&str, Arc<dyn Handler>); 4] = [
        (
            "payment",
            Arc::new(payment::Payment::new(
                ledger.clone(),
                knobs,
                cfg.demo.payment_limit_cents,
            )),
        ),
        (
            "inventory",
            Arc::new(inventory::Inventory::new(ledger.clone(), stock, knobs)),
        ),
        (
            "shipping",
            Arc::new(shipping::Shipping::new(ledger.clone(), knobs)),
        ),
        (
            "notification",
            Arc::new(notification::Notification::new(ledger, knobs)),
        ),
    ];
    let analytics_store = analytics::Totals::open(&js, replicas).await?;

    // A child token: shutdown can stop our tasks without cancelling the caller's token.
    let cancel = cancel.child_token();
    let mut demo = Demo {
        services: Vec::new(),
        tasks: TaskTracker::new(),
        cancel: cancel.clone(),
    };
    let chosen = |service: &str| cfg.demo.services.iter().any(|s| s == service);
    for (service, participant) in participants.into_iter().filter(|(s, _)| chosen(s)) {
        let started = Runner::shared(js.clone(), service, participant)
            .instances(cfg.demo.instances)
            .in_hand(cfg.demo.instances * COMMANDS_IN_HAND_PER_INSTANCE)
            .consumer(consumer_settings(&cfg.consumers))
            .continue_trace(crate::telemetry::continue_trace)
            .start(cancel.clone())
            .await;
        match started {
            Ok(running) => demo.services.push(running),
            Err(e) => {
                demo.shutdown().await;
                return Err(e.into());
            }
        }
    }
    // Analytics counts each lifecycle event once through a durable consumer of SAGA_STATUS:
    // with events that are not stored there is nothing for it to read.
    let analytics = cfg.streams.status_events == StatusEvents::Stream;
    if analytics {
        demo.tasks.spawn(analytics::run(
            js,
            analytics_store,
            cfg.consumers.clone(),
            cancel,
        ));
    } else {
        tracing::warn!("demo analytics not started: status events are not stored (streams.status_events = \"core\")");
    }
    tracing::info!(
        services = ?cfg.demo.services,
        instances = cfg.demo.instances,
        stateless = cfg.demo.stateless,
        analytics,
        "demo services started"
    );
    Ok(demo)
}

impl Demo {
    /// The running services (for stats and supervision tests).
    pub fn services(&self) -> &[Running] {
        &self.services
    }

    /// Stops taking commands and events, waits (bounded) for the commands the pools hold, then
    /// stops the pools; whatever is still held then is returned to JetStream for redelivery.
    pub async fn shutdown(self) {
        self.cancel.cancel();
        self.tasks.close();
        self.tasks.wait().await;
        futures::future::join_all(self.services.into_iter().map(Running::shutdown)).await;
        tracing::info!("demo services stopped");
    }
}

/// The SDK's consumer settings from the node's `consumers.*` (the same table,
/// `docs/participants.md`).
pub fn consumer_settings(cfg: &ConsumerConfig) -> ConsumerSettings {
    ConsumerSettings {
        ack_wait: cfg.command_ack_wait,
        max_deliver: cfg.command_max_deliver,
        max_ack_pending: cfg.max_ack_pending,
    }
}

/// Failure injection, applied before every command (see the module docs).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Knobs {
    /// Sleep before handling.
    pub latency: Duration,
    /// Probability of a transient `unavailable` failure (not recorded).
    pub failure_rate: f64,
    /// Probability of a panic in the handler.
    pub panic_rate: f64,
}

impl Default for Knobs {
    fn default() -> Self {
        Knobs {
            latency: Duration::ZERO,
            failure_rate: 0.0,
            panic_rate: 0.0,
        }
    }
}

impl Knobs {
    /// The knobs of `cfg`.
    pub fn from_config(cfg: &DemoConfig) -> Self {
        Knobs {
            latency: Duration::from_millis(cfg.latency_ms),
            failure_rate: cfg.failure_rate,
            panic_rate: cfg.panic_rate,
        }
    }

    /// Sleeps, then maybe panics (on purpose) or answers an injected transient failure.
    pub(crate) async fn apply(&self, cmd: &v1::Command) -> Option<Outcome> {
        if !self.latency.is_zero() {
            tokio::time::sleep(self.latency).await;
        }
        if self.panic_rate > 0.0 && rand::random::<f64>() < self.panic_rate {
            panic!(
                "injected panic in {}.{} for {}",
                cmd.service, cmd.action, cmd.command_id
            );
        }
        if self.failure_rate > 0.0 && rand::random::<f64>() < self.failure_rate {
            return Some(Outcome::unavailable("injected transient failure"));
        }
        None
    }
}

/// The order saga's input (`Command.input`, `StatusEvent.input`).
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct OrderInput {
    /// The client's order id.
    #[serde(default)]
    pub order_id: String,
    /// Who ordered.
    #[serde(default)]
    pub customer: String,
    /// Amount to charge, cents.
    pub amount_cents: i64,
    /// What was ordered.
    #[serde(default)]
    pub items: Vec<OrderItem>,
}

/// One line of an order.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct OrderItem {
    /// Stock keeping unit.
    pub sku: String,
    /// Units.
    pub quantity: u32,
}

impl OrderInput {
    /// Parses and checks an order input: valid JSON, `amount_cents ≥ 0`, every item with a SKU
    /// and a quantity of at least 1.
    pub fn parse(input: &[u8]) -> Result<Self, String> {
        if input.is_empty() {
            return Err("missing input".to_string());
        }
        let order: OrderInput =
            serde_json::from_slice(input).map_err(|e| format!("invalid order input: {e}"))?;
        if order.amount_cents < 0 {
            return Err(format!("negative amount {}", order.amount_cents));
        }
        if let Some(item) = order
            .items
            .iter()
            .find(|i| i.sku.is_empty() || i.quantity == 0)
        {
            return Err(format!("invalid item {:?} x {}", item.sku, item.quantity));
        }
        Ok(order)
    }

    /// The items as `(sku, quantity)` pairs.
    pub fn item_pairs(&self) -> Vec<(String, u32)> {
        self.items
            .iter()
            .map(|i| (i.sku.clone(), i.quantity))
            .collect()
    }
}

/// A failure outcome.
/// What every demo service checks before its own logic: injected faults first (the knobs),
/// then that the command has an idempotency key to record its effect under.
pub(crate) async fn precheck(knobs: &Knobs, cmd: &v1::Command) -> Option<Outcome> {
    if let Some(injected) = knobs.apply(cmd).await {
        return Some(injected);
    }
    if cmd.idempotency_key.is_empty() {
        return Some(failure("invalid", "missing idempotency key"));
    }
    None
}

pub(crate) fn failure(kind: &str, message: impl Into<String>) -> Outcome {
    Outcome::failure(kind, message)
}

pub(crate) use sagaflow_participant::command::forward_key;

/// Maps a storage error to [`Unavailable`] (the command is returned and retried).
pub(crate) fn unavailable(
    operation: &str,
) -> impl FnOnce(&dyn std::fmt::Display) -> Unavailable + '_ {
    move |e| Unavailable(format!("cannot {operation}: {e}"))
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    /// The JSON block after `### {saga}` in docs/participants.md.
    fn documented_input(saga: &str) -> serde_json::Value {
        let doc = include_str!("../docs/participants.md");
        let section = doc
            .split(&format!("### {saga}\n"))
            .nth(1)
            .expect("a section for the saga");
        let block = section
            .split("```json\n")
            .nth(1)
            .and_then(|b| b.split("```").next())
            .expect("a json block");
        serde_json::from_str(block).expect("the documented input is JSON")
    }

    #[test]
    fn the_documented_inputs_are_what_the_demo_payment_reads() {
        // docs/participants.md: order and trip inputs, and that the trip's needs amount_cents.
        let order = documented_input("order");
        let parsed = OrderInput::parse(order.to_string().as_bytes()).unwrap();
        assert_eq!(parsed.amount_cents, 1999);
        assert_eq!(parsed.item_pairs(), [("SKU-1".to_string(), 2)]);
        let trip = documented_input("trip");
        assert_eq!(
            OrderInput::parse(trip.to_string().as_bytes())
                .unwrap()
                .amount_cents,
            184_000
        );
        let mut without = trip.clone();
        without.as_object_mut().unwrap().remove("amount_cents");
        assert!(OrderInput::parse(without.to_string().as_bytes()).is_err());
    }

    /// The value column of the consumer settings table in docs/participants.md.
    fn documented_setting(name: &str) -> String {
        let doc = include_str!("../docs/participants.md");
        let row = doc
            .lines()
            .find(|l| l.trim_start().starts_with(&format!("| {name} |")))
            .unwrap_or_else(|| panic!("a row for {name}"));
        row.split('|').nth(2).unwrap().trim().to_string()
    }

    #[test]
    fn the_documented_consumer_settings_are_the_nodes_and_the_sdks() {
        let sdk = ConsumerSettings::default();
        // The node's defaults are the SDK's, so a participant creating the consumer first
        // creates the one a node would.
        assert_eq!(consumer_settings(&ConsumerConfig::default()), sdk);
        let config = sdk.config("hotel");
        assert_eq!(documented_setting("durable name"), "`svc-<service>`",);
        assert_eq!(config.durable_name.as_deref(), Some("svc-hotel"));
        assert_eq!(
            documented_setting("filter subject").split(' ').next(),
            Some("`sagaflow.cmd.<service>.>`")
        );
        assert_eq!(config.filter_subject, "sagaflow.cmd.hotel.>");
        assert!(documented_setting("ack policy").starts_with("explicit"));
        assert_eq!(
            config.ack_policy,
            async_nats::jetstream::consumer::AckPolicy::Explicit
        );
        assert!(documented_setting("deliver policy").starts_with("all"));
        assert_eq!(
            config.deliver_policy,
            async_nats::jetstream::consumer::DeliverPolicy::All
        );
        assert!(
            documented_setting("`ack_wait`").starts_with(&format!("{} s", sdk.ack_wait.as_secs()))
        );
        assert!(documented_setting("`max_deliver`").starts_with(&format!("{} ", sdk.max_deliver)));
        assert!(documented_setting("`max_ack_pending`").starts_with("20,000 "));
        assert_eq!(sdk.max_ack_pending, 20_000);
    }

    #[test]
    fn order_input_parses_and_validates() {
        let ok = br#"{"order_id":"A1","customer":"ann","amount_cents":1200,"items":[{"sku":"SKU-1","quantity":2}]}"#;
        let o = OrderInput::parse(ok).unwrap();
        assert_eq!(o.amount_cents, 1200);
        assert_eq!(o.item_pairs(), vec![("SKU-1".to_string(), 2)]);
        assert!(OrderInput::parse(b"").unwrap_err().contains("missing"));
        assert!(OrderInput::parse(b"{")
            .unwrap_err()
            .contains("invalid order input"));
        assert!(OrderInput::parse(br#"{"order_id":"A1"}"#)
            .unwrap_err()
            .contains("amount_cents"));
        assert!(OrderInput::parse(br#"{"amount_cents":-1}"#)
            .unwrap_err()
            .contains("negative"));
        let zero = br#"{"amount_cents":1,"items":[{"sku":"S","quantity":0}]}"#;
        assert!(OrderInput::parse(zero)
            .unwrap_err()
            .contains("invalid item"));
        // Only the amount is required; a charge needs no items.
        assert!(OrderInput::parse(br#"{"amount_cents":5}"#)
            .unwrap()
            .items
            .is_empty());
    }

    #[tokio::test]
    async fn knobs_inject_failures_and_panics() {
        let cmd = v1::Command::default();
        assert_eq!(Knobs::default().apply(&cmd).await, None);
        let always = Knobs {
            failure_rate: 1.0,
            ..Knobs::default()
        };
        assert!(
            matches!(always.apply(&cmd).await, Some(Outcome::Transient { kind, .. }) if kind == "unavailable")
        );
        let panics = Knobs {
            panic_rate: 1.0,
            ..Knobs::default()
        };
        let joined = tokio::spawn(async move { panics.apply(&v1::Command::default()).await }).await;
        assert!(joined.unwrap_err().is_panic());
    }
}
