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
use ractor::ActorRef;
use sagaflow_actors::service::{PoolStats, ServicePool, ServicePoolArgs, ServicePoolMsg};
use sagaflow_proto::v1;
use serde::Deserialize;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::config::{DemoConfig, NodeConfig, StatusEvents};
use crate::participant::{self, Outcome, Participant, Unavailable};

pub use analytics::sales;
pub use ledger::{ledger, LedgerEntry, LedgerSummary};

/// Commands a node's service pool holds per instance (running or queued); the rest wait in
/// JetStream (see [`participant::run_consumer`]). An instance runs one at a time, so a few
/// queued behind it keep it busy; more would only hold slow commands in memory (with the
/// default 64 instances, 256 per service, as many as 4 instances × 64 held before).
const COMMANDS_IN_HAND_PER_INSTANCE: usize = 4;

/// The demo services, in the order they are started.
pub const SERVICES: [&str; 4] = crate::config::DEMO_SERVICES;

/// Bound on how long [`Demo::shutdown`] waits for in-flight commands before stopping the pools.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(10);

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
    /// A service pool could not be spawned.
    #[error("cannot start the `{service}` service pool: {message}")]
    Spawn {
        /// The service.
        service: String,
        /// Cause.
        message: String,
    },
}

/// The running demo services: their pools and the tasks feeding them.
pub struct Demo {
    pools: Vec<(String, ActorRef<ServicePoolMsg>)>,
    pool_handles: Vec<JoinHandle<()>>,
    tasks: TaskTracker,
    cancel: CancellationToken,
}

impl std::fmt::Debug for Demo {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Demo")
            .field(
                "services",
                &self.pools.iter().map(|(s, _)| s).collect::<Vec<_>>(),
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
        (ledger::Ledger::open(&js, replicas).await?, stock)
    };
    let knobs = Knobs::from_config(&cfg.demo);
    let participants: [(&str, Arc<dyn Participant>); 4] = [
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
        pools: Vec::new(),
        pool_handles: Vec::new(),
        tasks: TaskTracker::new(),
        cancel: cancel.clone(),
    };
    let chosen = |service: &str| cfg.demo.services.iter().any(|s| s == service);
    for (service, participant) in participants.into_iter().filter(|(s, _)| chosen(s)) {
        let args = ServicePoolArgs {
            service: service.to_string(),
            instances: cfg.demo.instances,
        };
        let (pool, handle) = match ractor::Actor::spawn(None, ServicePool, args).await {
            Ok(p) => p,
            Err(e) => {
                let err = Error::Spawn {
                    service: service.to_string(),
                    message: e.to_string(),
                };
                demo.shutdown().await;
                return Err(err);
            }
        };
        demo.pool_handles.push(tokio::spawn(async move {
            if let Err(e) = handle.await {
                tracing::error!(error = %e, "service pool task failed");
            }
        }));
        demo.pools.push((service.to_string(), pool.clone()));
        demo.tasks.spawn(participant::run_consumer(
            js.clone(),
            service.to_string(),
            cfg.consumers.clone(),
            participant,
            pool,
            cfg.demo.instances * COMMANDS_IN_HAND_PER_INSTANCE,
            cancel.clone(),
        ));
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
    /// Each service's name and pool (for stats and supervision tests).
    pub fn pools(&self) -> &[(String, ActorRef<ServicePoolMsg>)] {
        &self.pools
    }

    /// Stops taking commands and events, waits (bounded) for the commands the pools hold, then
    /// stops the pools; whatever is still held then is returned to JetStream for redelivery.
    pub async fn shutdown(self) {
        self.cancel.cancel();
        self.tasks.close();
        self.tasks.wait().await;
        let deadline = tokio::time::Instant::now() + DRAIN_TIMEOUT;
        for (service, pool) in &self.pools {
            loop {
                let stats: Option<PoolStats> =
                    ractor::call_t!(pool, ServicePoolMsg::Stats, 1_000).ok();
                let idle = stats.is_none_or(|s| s.completed + s.returned >= s.dispatched);
                if idle || tokio::time::Instant::now() >= deadline {
                    if !idle {
                        tracing::warn!(
                            service,
                            "service pool still busy at shutdown, returning its commands"
                        );
                    }
                    break;
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            pool.stop(None);
        }
        for handle in self.pool_handles {
            let _ = handle.await;
        }
        tracing::info!("demo services stopped");
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
            return Some(failure("unavailable", "injected transient failure"));
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
    Outcome::Failure {
        kind: kind.to_string(),
        message: message.into(),
    }
}

/// The forward key a compensation undoes: `compensates_key`, else the idempotency key without
/// its `/compensate` suffix.
pub(crate) fn forward_key(cmd: &v1::Command) -> Option<String> {
    if !cmd.compensates_key.is_empty() {
        return Some(cmd.compensates_key.clone());
    }
    cmd.idempotency_key
        .strip_suffix("/compensate")
        .filter(|k| !k.is_empty())
        .map(str::to_string)
}

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

    #[test]
    fn forward_key_prefers_compensates_key() {
        let mut cmd = v1::Command {
            idempotency_key: "order-A1/charge/compensate".into(),
            ..Default::default()
        };
        assert_eq!(forward_key(&cmd).as_deref(), Some("order-A1/charge"));
        cmd.compensates_key = "x/y".into();
        assert_eq!(forward_key(&cmd).as_deref(), Some("x/y"));
        let plain = v1::Command {
            idempotency_key: "order-A1/charge".into(),
            ..Default::default()
        };
        assert_eq!(forward_key(&plain), None);
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
            matches!(always.apply(&cmd).await, Some(Outcome::Failure { kind, .. }) if kind == "unavailable")
        );
        let panics = Knobs {
            panic_rate: 1.0,
            ..Knobs::default()
        };
        let joined = tokio::spawn(async move { panics.apply(&v1::Command::default()).await }).await;
        assert!(joined.unwrap_err().is_panic());
    }
}
