//! The demo participant services and analytics against a real `nats-server`: commands are
//! published straight to `sagaflow.cmd.<service>.<action>` (no saga running) and the replies
//! read with a core subscription on the reply subject, which `SAGA_EVENTS` also stores.
use crate::common;

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use async_nats::jetstream;
use async_trait::async_trait;
use common::{nats_client, start_nats, wait_until, within, NatsServer, TIMEOUT};
use futures::StreamExt;
use prost::Message as _;
use sagaflow::config::NodeConfig;
use sagaflow::demo::{self, payment::Payment, Knobs, LedgerSummary};
use sagaflow_participant::{Handler as Participant, Outcome, Runner, Running, Unavailable};
use sagaflow_proto::v1;
use tokio_util::sync::CancellationToken;

const ORDER: &str = r#"{"order_id":"A1","customer":"ann","amount_cents":1200,"items":[{"sku":"SKU-1","quantity":2}]}"#;

/// A NATS server with the topology, and a client listening on one reply subject.
struct Env {
    _nats: NatsServer,
    js: jetstream::Context,
    replies: async_nats::Subscriber,
    reply_subject: String,
    cfg: NodeConfig,
}

async fn env(test: &str) -> Env {
    let nats = start_nats().await.unwrap();
    let client = nats_client(&nats.url()).await.unwrap();
    let js = jetstream::new(client.clone());
    let mut cfg = NodeConfig::default();
    cfg.demo.instances = 2;
    within(
        TIMEOUT,
        "ensure topology",
        sagaflow::topology::ensure(&js, &cfg.streams),
    )
    .await
    .unwrap()
    .unwrap();
    let reply_subject = format!("sagaflow.evt.0.{test}.reply");
    let replies = within(
        TIMEOUT,
        "subscribe to replies",
        client.subscribe(reply_subject.clone()),
    )
    .await
    .unwrap()
    .unwrap();
    within(TIMEOUT, "flush", client.flush())
        .await
        .unwrap()
        .unwrap();
    Env {
        _nats: nats,
        js,
        replies,
        reply_subject,
        cfg,
    }
}

impl Env {
    /// A command for step `step` of `saga`: `action` is `service.action`; `refund`, `release`
    /// and `cancel` are compensations.
    fn command(
        &self,
        action: &str,
        saga: &str,
        step: &str,
        attempt: u32,
        input: &str,
    ) -> v1::Command {
        let (service, action) = action.split_once('.').expect("service.action");
        let compensation = matches!(action, "refund" | "release" | "cancel" | "withdraw");
        let forward = format!("{saga}/{step}");
        v1::Command {
            command_id: format!("{forward}/{}{attempt}", if compensation { "c" } else { "" }),
            idempotency_key: if compensation {
                format!("{forward}/compensate")
            } else {
                forward.clone()
            },
            saga_id: saga.to_string(),
            saga_name: "order".to_string(),
            step: step.to_string(),
            service: service.to_string(),
            action: action.to_string(),
            attempt,
            compensation,
            compensates_key: if compensation { forward } else { String::new() },
            input: input.as_bytes().to_vec(),
            reply_subject: self.reply_subject.clone(),
            deadline_unix_ms: 0,
        }
    }

    /// Publishes `cmd` to its service's consumer group (stored).
    async fn publish(&self, cmd: &v1::Command) {
        let subject = sagaflow::topology::command_subject(&cmd.service, &cmd.action);
        within(TIMEOUT, "publish command", async {
            self.js
                .publish(subject, cmd.encode_to_vec().into())
                .await?
                .await
        })
        .await
        .unwrap()
        .unwrap();
    }

    /// Serves the `payment` consumer group with `participant` through the SDK's runner: one
    /// instance, at most `in_hand` commands in hand.
    async fn serve_payment(&self, participant: Arc<dyn Participant>, in_hand: usize) -> Running {
        within(
            TIMEOUT,
            "start the runner",
            Runner::shared(self.js.clone(), "payment", participant)
                .instances(1)
                .in_hand(in_hand)
                .consumer(demo::consumer_settings(&self.cfg.consumers))
                .start(CancellationToken::new()),
        )
        .await
        .unwrap()
        .unwrap()
    }

    /// Publishes `cmd` and waits for its reply's outcome.
    async fn send(&mut self, cmd: &v1::Command) -> v1::reply::Outcome {
        self.publish(cmd).await;
        loop {
            let msg = within(TIMEOUT, "reply", self.replies.next())
                .await
                .unwrap()
                .expect("reply subscription open");
            let reply = v1::Reply::decode(msg.payload.as_ref()).unwrap();
            if reply.command_id == cmd.command_id {
                assert_eq!(
                    (reply.saga_id.as_str(), reply.attempt),
                    (cmd.saga_id.as_str(), cmd.attempt)
                );
                return reply.outcome.expect("reply has an outcome");
            }
        }
    }

    /// Starts the demo services with this environment's configuration; they stop when the
    /// returned token is cancelled or at `Demo::shutdown`.
    async fn start_demo(&self) -> (CancellationToken, demo::Demo) {
        let cancel = CancellationToken::new();
        let running = within(
            TIMEOUT,
            "start demo",
            demo::start(self.js.clone(), &self.cfg, cancel.clone()),
        )
        .await
        .unwrap()
        .unwrap();
        (cancel, running)
    }

    async fn summary(&self) -> LedgerSummary {
        let entries = within(TIMEOUT, "read ledger", demo::ledger(&self.js))
            .await
            .unwrap()
            .unwrap();
        LedgerSummary::from_entries(&entries)
    }

    async fn entries_of(&self, saga: &str) -> Vec<demo::LedgerEntry> {
        let entries = within(TIMEOUT, "read ledger", demo::ledger(&self.js))
            .await
            .unwrap()
            .unwrap();
        entries.into_iter().filter(|e| e.saga_id == saga).collect()
    }
}

fn failure_kind(outcome: &v1::reply::Outcome) -> &str {
    match outcome {
        v1::reply::Outcome::Failure(f) => &f.kind,
        v1::reply::Outcome::Success(_) => "",
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn payment_is_idempotent_declines_and_voids_late_charges() {
    let mut env = env("pay").await;
    let (cancel, running) = env.start_demo().await;

    // The same charge twice (a retry: new attempt, same idempotency key): one effect, one answer.
    let first = env
        .send(&env.command("payment.charge", "order-A1", "charge", 1, ORDER))
        .await;
    assert!(matches!(first, v1::reply::Outcome::Success(_)), "{first:?}");
    let again = env
        .send(&env.command("payment.charge", "order-A1", "charge", 2, ORDER))
        .await;
    assert_eq!(first, again, "a duplicate answers what the first answered");
    assert_eq!(
        env.entries_of("order-A1").await.len(),
        1,
        "one ledger entry for the charge"
    );
    let a1 = env.summary().await.saga("order-A1");
    assert_eq!((a1.charged, a1.charged_cents), (1, 1200));

    // Above the limit (1,000.00): declined, recorded, and a duplicate is declined the same way.
    let big = r#"{"order_id":"A2","customer":"bob","amount_cents":100001,"items":[]}"#;
    let declined = env
        .send(&env.command("payment.charge", "order-A2", "charge", 1, big))
        .await;
    assert_eq!(failure_kind(&declined), "declined");
    let v1::reply::Outcome::Failure(f) = &declined else {
        unreachable!()
    };
    assert_eq!(f.message, "amount 100001 above limit 100000");
    assert_eq!(
        env.send(&env.command("payment.charge", "order-A2", "charge", 2, big))
            .await,
        declined
    );
    let invalid = env
        .send(&env.command("payment.charge", "order-A9", "charge", 1, "not json"))
        .await;
    assert_eq!(failure_kind(&invalid), "invalid");

    // A refund before its charge voids the charge: the late charge does nothing.
    let refund = env
        .send(&env.command("payment.refund", "order-A3", "charge", 1, ORDER))
        .await;
    assert!(
        matches!(refund, v1::reply::Outcome::Success(_)),
        "{refund:?}"
    );
    let late = env
        .send(&env.command("payment.charge", "order-A3", "charge", 1, ORDER))
        .await;
    assert_eq!(failure_kind(&late), "voided");
    let a3 = env.summary().await.saga("order-A3");
    assert_eq!((a3.charged, a3.refunded, a3.voided), (0, 0, 1), "{a3:?}");

    // A refund after the charge returns it, once.
    let refund = env
        .send(&env.command("payment.refund", "order-A1", "charge", 1, ORDER))
        .await;
    assert_eq!(
        env.send(&env.command("payment.refund", "order-A1", "charge", 2, ORDER))
            .await,
        refund
    );
    let summary = env.summary().await;
    let a1 = summary.saga("order-A1");
    assert_eq!(
        (a1.charged, a1.refunded, a1.net_charged_cents()),
        (1, 1, 0),
        "{a1:?}"
    );
    assert!(
        summary.violations().is_empty(),
        "{:?}",
        summary.violations()
    );

    // Shipping and notification record once too; a cancelled shipment and a withdrawn
    // confirmation count once.
    let prepared = env
        .send(&env.command("shipping.prepare", "order-A1", "prepare_shipment", 1, ORDER))
        .await;
    assert_eq!(
        env.send(&env.command("shipping.prepare", "order-A1", "prepare_shipment", 2, ORDER))
            .await,
        prepared
    );
    env.send(&env.command("shipping.cancel", "order-A1", "prepare_shipment", 1, ORDER))
        .await;
    for attempt in [1, 2] {
        let sent = env
            .send(&env.command("notification.send", "order-A1", "notify", attempt, ORDER))
            .await;
        assert!(matches!(sent, v1::reply::Outcome::Success(_)), "{sent:?}");
    }
    for attempt in [1, 2] {
        let withdrawn = env
            .send(&env.command(
                "notification.withdraw",
                "order-A1",
                "notify",
                attempt,
                ORDER,
            ))
            .await;
        assert_eq!(
            withdrawn,
            v1::reply::Outcome::Success(v1::Success {
                output: br#"{"withdrawn":true}"#.to_vec()
            }),
            "attempt {attempt}"
        );
    }
    env.send(&env.command(
        "notification.send_cancellation",
        "order-A1",
        "notify_cancellation",
        1,
        ORDER,
    ))
    .await;
    env.send(&env.command(
        "notification.send_cancellation",
        "order-A1",
        "notify_cancellation",
        2,
        ORDER,
    ))
    .await;
    let a1 = env.summary().await.saga("order-A1");
    assert_eq!(
        (
            a1.shipped,
            a1.shipment_cancelled,
            a1.notified,
            a1.notification_withdrawn,
            a1.notified_cancellation
        ),
        (1, 1, 1, 1, 1),
        "{a1:?}"
    );

    // A withdrawal that overtakes its confirmation voids it: the late confirmation is refused.
    let early = env
        .send(&env.command("notification.withdraw", "order-A4", "notify", 1, ORDER))
        .await;
    assert_eq!(
        early,
        v1::reply::Outcome::Success(v1::Success {
            output: br#"{"withdrawn":false}"#.to_vec()
        })
    );
    let late = env
        .send(&env.command("notification.send", "order-A4", "notify", 1, ORDER))
        .await;
    assert_eq!(failure_kind(&late), "voided");
    let a4 = env.summary().await.saga("order-A4");
    assert_eq!(
        (a4.notified, a4.notification_withdrawn, a4.voided),
        (0, 0, 1),
        "{a4:?}"
    );
    let summary = env.summary().await;
    assert!(
        summary.violations().is_empty(),
        "{:?}",
        summary.violations()
    );

    cancel.cancel();
    within(TIMEOUT, "demo shutdown", running.shutdown())
        .await
        .unwrap();
}

/// `demo.stateless`: every service answers from the command alone, with the same refusals as
/// the recording services (payment limit, stock listed in `demo.stock`), the same answer to a
/// duplicate, and nothing written to NATS (neither the ledger nor the stock bucket exists).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stateless_services_answer_from_the_command_and_record_nothing() {
    let mut env = env("stateless").await;
    env.cfg.demo.stateless = true;
    let (cancel, running) = env.start_demo().await;

    let charged = env
        .send(&env.command("payment.charge", "order-S1", "charge", 1, ORDER))
        .await;
    assert!(
        matches!(charged, v1::reply::Outcome::Success(_)),
        "{charged:?}"
    );
    assert_eq!(
        env.send(&env.command("payment.charge", "order-S1", "charge", 2, ORDER))
            .await,
        charged,
        "a duplicate answers the same"
    );
    let big = r#"{"order_id":"S2","amount_cents":150000,"items":[{"sku":"SKU-1","quantity":1}]}"#;
    let declined = env
        .send(&env.command("payment.charge", "order-S2", "charge", 1, big))
        .await;
    assert_eq!(failure_kind(&declined), "declined");

    let reserved = env
        .send(&env.command("inventory.reserve", "order-S1", "reserve", 1, ORDER))
        .await;
    assert!(
        matches!(reserved, v1::reply::Outcome::Success(_)),
        "{reserved:?}"
    );
    let short = r#"{"order_id":"S3","amount_cents":10,"items":[{"sku":"SKU-1","quantity":2},{"sku":"SKU-OUT","quantity":1}]}"#;
    let refused = env
        .send(&env.command("inventory.reserve", "order-S3", "reserve", 1, short))
        .await;
    assert_eq!(failure_kind(&refused), "out_of_stock");
    let unknown = r#"{"amount_cents":10,"items":[{"sku":"NOPE","quantity":1}]}"#;
    let refused = env
        .send(&env.command("inventory.reserve", "order-S4", "reserve", 1, unknown))
        .await;
    assert_eq!(failure_kind(&refused), "out_of_stock");
    // Stock listed is never used up: the same SKU is reserved again for another order.
    assert!(matches!(
        env.send(&env.command("inventory.reserve", "order-S5", "reserve", 1, ORDER))
            .await,
        v1::reply::Outcome::Success(_)
    ));

    // Compensations and the other services succeed.
    for (action, step) in [
        ("payment.refund", "charge"),
        ("inventory.release", "reserve"),
        ("shipping.prepare", "prepare_shipment"),
        ("shipping.cancel", "prepare_shipment"),
        ("notification.send", "notify"),
        ("notification.withdraw", "notify"),
    ] {
        let outcome = env
            .send(&env.command(action, "order-S1", step, 1, ORDER))
            .await;
        assert!(
            matches!(outcome, v1::reply::Outcome::Success(_)),
            "{action}: {outcome:?}"
        );
    }

    for bucket in [demo::ledger::LEDGER_BUCKET, demo::inventory::STOCK_BUCKET] {
        assert!(
            env.js.get_key_value(bucket).await.is_err(),
            "bucket {bucket} was created"
        );
    }
    cancel.cancel();
    within(TIMEOUT, "demo shutdown", running.shutdown())
        .await
        .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn inventory_refuses_what_it_lacks_and_keeps_stock_consistent() {
    let mut env = env("inv").await;
    let (cancel, running) = env.start_demo().await;
    let js = env.js.clone();
    let stock = move |sku: &'static str| {
        let js = js.clone();
        async move {
            within(TIMEOUT, "read stock", demo::inventory::stock(&js, sku))
                .await
                .unwrap()
                .unwrap()
        }
    };
    assert_eq!(stock("SKU-1").await, Some(1_000_000));
    assert_eq!(stock("SKU-OUT").await, Some(0));

    // SKU-1 is taken first, then SKU-OUT is short: SKU-1 goes back.
    let short = r#"{"order_id":"B1","amount_cents":10,"items":[{"sku":"SKU-1","quantity":2},{"sku":"SKU-OUT","quantity":1}]}"#;
    let refused = env
        .send(&env.command("inventory.reserve", "order-B1", "reserve", 1, short))
        .await;
    assert_eq!(failure_kind(&refused), "out_of_stock");
    assert_eq!(
        stock("SKU-1").await,
        Some(1_000_000),
        "nothing kept from a refused reservation"
    );
    assert_eq!(
        env.send(&env.command("inventory.reserve", "order-B1", "reserve", 2, short))
            .await,
        refused
    );
    let unknown = r#"{"amount_cents":10,"items":[{"sku":"NOPE","quantity":1}]}"#;
    let refused = env
        .send(&env.command("inventory.reserve", "order-B2", "reserve", 1, unknown))
        .await;
    assert_eq!(failure_kind(&refused), "out_of_stock");

    // A reservation is taken once however often it is delivered, and released once.
    let ok = r#"{"order_id":"B3","amount_cents":10,"items":[{"sku":"SKU-2","quantity":3}]}"#;
    let reserved = env
        .send(&env.command("inventory.reserve", "order-B3", "reserve", 1, ok))
        .await;
    assert!(
        matches!(reserved, v1::reply::Outcome::Success(_)),
        "{reserved:?}"
    );
    assert_eq!(
        env.send(&env.command("inventory.reserve", "order-B3", "reserve", 2, ok))
            .await,
        reserved
    );
    assert_eq!(stock("SKU-2").await, Some(999_997));
    env.send(&env.command("inventory.release", "order-B3", "reserve", 1, ok))
        .await;
    env.send(&env.command("inventory.release", "order-B3", "reserve", 2, ok))
        .await;
    assert_eq!(stock("SKU-2").await, Some(1_000_000));
    let b3 = env.summary().await.saga("order-B3");
    assert_eq!((b3.reserved, b3.released), (1, 1), "{b3:?}");

    // A release before its reservation voids it: the late reservation takes nothing.
    env.send(&env.command("inventory.release", "order-B4", "reserve", 1, ok))
        .await;
    let late = env
        .send(&env.command("inventory.reserve", "order-B4", "reserve", 1, ok))
        .await;
    assert_eq!(failure_kind(&late), "voided");
    assert_eq!(stock("SKU-2").await, Some(1_000_000));

    cancel.cancel();
    within(TIMEOUT, "demo shutdown", running.shutdown())
        .await
        .unwrap();

    // A restart keeps the counts (the configured stock is only an initial value).
    let mut cfg = env.cfg.clone();
    cfg.demo.stock.insert("SKU-2".to_string(), 5);
    let cancel = CancellationToken::new();
    let running = within(
        TIMEOUT,
        "restart demo",
        demo::start(env.js.clone(), &cfg, cancel.clone()),
    )
    .await
    .unwrap()
    .unwrap();
    let reserved = env
        .send(&env.command("inventory.reserve", "order-B5", "reserve", 1, ok))
        .await;
    assert!(
        matches!(reserved, v1::reply::Outcome::Success(_)),
        "{reserved:?}"
    );
    assert_eq!(stock("SKU-2").await, Some(999_997));
    within(TIMEOUT, "demo shutdown", running.shutdown())
        .await
        .unwrap();
}

/// Panics on its first command, then behaves as `inner`.
struct PanicOnce {
    inner: Payment,
    panicked: AtomicBool,
}

#[async_trait]
impl Participant for PanicOnce {
    async fn handle(&self, cmd: &v1::Command) -> Result<Outcome, Unavailable> {
        assert!(
            self.panicked.swap(true, Ordering::SeqCst),
            "injected test panic on the first command"
        );
        self.inner.handle(cmd).await
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_command_whose_instance_panicked_is_handled_after_the_restart() {
    let mut env = env("panic").await;
    let ledger = within(TIMEOUT, "open ledger", demo::ledger::open(&env.js, 1))
        .await
        .unwrap()
        .unwrap();
    let participant = Arc::new(PanicOnce {
        inner: Payment::new(ledger, Knobs::default(), 100_000),
        panicked: AtomicBool::new(false),
    });
    let served = env.serve_payment(participant.clone(), 64).await;
    let pool = served.pool().clone();

    let outcome = env
        .send(&env.command("payment.charge", "order-C1", "charge", 1, ORDER))
        .await;
    assert!(
        matches!(outcome, v1::reply::Outcome::Success(_)),
        "{outcome:?}"
    );
    assert!(participant.panicked.load(Ordering::SeqCst));
    let stats = within(TIMEOUT, "pool stats", async {
        ractor::call!(pool, sagaflow_participant::pool::ServicePoolMsg::Stats)
    })
    .await
    .unwrap()
    .unwrap();
    assert_eq!(stats.restarts, 1, "{stats:?}");
    assert_eq!(
        stats.returned, 1,
        "the command was returned when its instance died: {stats:?}"
    );
    wait_until(TIMEOUT, "instance back", || {
        let pool = pool.clone();
        async move {
            ractor::call!(pool, sagaflow_participant::pool::ServicePoolMsg::Stats)
                .is_ok_and(|s| s.live == 1)
        }
    })
    .await
    .unwrap();
    assert_eq!(env.summary().await.saga("order-C1").charged, 1);
    within(TIMEOUT, "shutdown", served.shutdown())
        .await
        .unwrap();
}

/// Takes each command and waits for `release` before answering.
struct Held {
    started: AtomicUsize,
    release: tokio::sync::Semaphore,
}

#[async_trait]
impl Participant for Held {
    async fn handle(&self, _cmd: &v1::Command) -> Result<Outcome, Unavailable> {
        self.started.fetch_add(1, Ordering::SeqCst);
        let permit = self.release.acquire().await;
        drop(permit);
        Ok(Outcome::Success(b"{}".to_vec()))
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_service_holds_only_its_commands_in_hand_and_leaves_the_rest_in_jetstream() {
    let mut env = env("in-hand").await;
    let participant = Arc::new(Held {
        started: AtomicUsize::new(0),
        release: tokio::sync::Semaphore::new(0),
    });
    let in_hand = 2;
    let mut served = env.serve_payment(participant.clone(), in_hand).await;
    let total = 10;
    for i in 0..total {
        let cmd = env.command("payment.charge", &format!("order-H{i}"), "charge", 1, ORDER);
        env.publish(&cmd).await;
    }
    wait_until(TIMEOUT, "the first command to be taken", || {
        let p = participant.clone();
        async move { p.started.load(Ordering::SeqCst) == 1 }
    })
    .await
    .unwrap();
    // Give the pull loop time to take more than it should, if it would.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let info = within(TIMEOUT, "consumer info", async {
        let stream = env
            .js
            .get_stream(sagaflow::topology::COMMANDS_STREAM)
            .await?;
        stream
            .consumer_info("svc-payment")
            .await
            .map_err(|e| e.to_string())
            .map_err(Into::<Box<dyn std::error::Error + Send + Sync>>::into)
    })
    .await
    .unwrap()
    .unwrap();
    // In hand (2) plus at most one pull request's worth (2) waiting for a place.
    assert!(
        info.num_ack_pending <= 2 * in_hand,
        "the node took {} commands with {in_hand} in hand",
        info.num_ack_pending
    );
    assert!(
        info.num_pending as usize >= total - 2 * in_hand,
        "commands left in JetStream: {}",
        info.num_pending
    );
    assert_eq!(
        participant.started.load(Ordering::SeqCst),
        1,
        "one instance"
    );
    // Shutting down while the pull loop waits for a place: it stops at once and gives the
    // command it was holding back.
    within(
        TIMEOUT,
        "the pull loop stops while waiting for a place",
        served.stop_pulling(),
    )
    .await
    .unwrap();
    // Released, the commands in hand finish, and a new runner takes all the others.
    participant.release.add_permits(total);
    within(TIMEOUT, "shutdown", served.shutdown())
        .await
        .unwrap();
    let served = env.serve_payment(participant.clone(), 64).await;
    let mut answered = std::collections::BTreeSet::new();
    while answered.len() < total {
        let msg = within(TIMEOUT, "reply", env.replies.next())
            .await
            .unwrap()
            .unwrap();
        let reply = v1::Reply::decode(msg.payload.as_ref()).unwrap();
        assert!(matches!(
            reply.outcome,
            Some(v1::reply::Outcome::Success(_))
        ));
        answered.insert(reply.saga_id);
    }
    within(TIMEOUT, "shutdown", served.shutdown())
        .await
        .unwrap();
}

fn status_event(saga_id: &str, phase: &str, terminal: bool, input: &str) -> v1::StatusEvent {
    v1::StatusEvent {
        saga_id: saga_id.into(),
        saga_name: "order".into(),
        previous_status: "PAID".into(),
        status: if terminal {
            "SHIPPED".into()
        } else {
            "PAID".into()
        },
        phase: phase.into(),
        terminal,
        input: input.as_bytes().to_vec(),
        sequence: 1,
        ..Default::default()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn analytics_counts_completed_orders_once_across_a_restart() {
    let env = env("analytics").await;
    let publish = |subject: String, payload: Vec<u8>| {
        let js = env.js.clone();
        async move {
            within(TIMEOUT, "publish status", async {
                js.publish(subject, payload.into()).await?.await
            })
            .await
            .unwrap()
            .unwrap()
        }
    };
    let input = r#"{"order_id":"D1","customer":"ann","amount_cents":1000,"items":[{"sku":"SKU-1","quantity":1},{"sku":"SKU-2","quantity":2}]}"#;
    publish(
        "sagaflow.status.order.order-D1".into(),
        status_event("order-D1", "RUNNING", false, input).encode_to_vec(),
    )
    .await;
    publish(
        "sagaflow.status.order.order-D1".into(),
        status_event("order-D1", "COMPLETED", true, input).encode_to_vec(),
    )
    .await;
    publish(
        "sagaflow.status.order.order-D2".into(),
        b"\xffnot protobuf".to_vec(),
    )
    .await;

    let (cancel, running) = env.start_demo().await;
    let sales = || {
        let js = env.js.clone();
        async move {
            within(TIMEOUT, "sales", demo::sales(&js))
                .await
                .unwrap()
                .unwrap()
        }
    };
    wait_until(TIMEOUT, "two events counted", || async {
        sales().await.events_processed == 2
    })
    .await
    .unwrap();
    let report = sales().await;
    assert_eq!((report.completed_orders, report.revenue_cents), (1, 1000));
    let skus: Vec<(&str, u64, u64)> = report
        .skus
        .iter()
        .map(|s| (s.sku.as_str(), s.units, s.revenue_cents))
        .collect();
    assert_eq!(skus, [("SKU-1", 1, 334), ("SKU-2", 2, 666)]);
    // The undecodable event went to the DLQ.
    wait_until(TIMEOUT, "dead letter stored", || {
        let js = env.js.clone();
        async move {
            match js.get_stream(sagaflow::topology::DLQ_STREAM).await {
                Ok(mut s) => s.info().await.is_ok_and(|i| i.state.messages == 1),
                Err(_) => false,
            }
        }
    })
    .await
    .unwrap();

    // Through the gRPC edge type too.
    use sagaflow_proto::v1::analytics_service_server::AnalyticsService as _;
    let grpc = sagaflow::grpc::analytics::Analytics::new(env.js.clone());
    let via_grpc = within(
        TIMEOUT,
        "get_sales",
        grpc.get_sales(tonic::Request::new(v1::GetSalesRequest {})),
    )
    .await
    .unwrap()
    .unwrap();
    assert_eq!(via_grpc.into_inner(), report);

    // A restart counts only new events (the pin may take a few seconds to come back).
    cancel.cancel();
    within(TIMEOUT, "demo shutdown", running.shutdown())
        .await
        .unwrap();
    let cancel = CancellationToken::new();
    let running = within(
        TIMEOUT,
        "restart demo",
        demo::start(env.js.clone(), &env.cfg, cancel.clone()),
    )
    .await
    .unwrap()
    .unwrap();
    publish(
        "sagaflow.status.order.order-D3".into(),
        status_event("order-D3", "COMPLETED", true, input).encode_to_vec(),
    )
    .await;
    wait_until(Duration::from_secs(40), "third event counted", || async {
        sales().await.events_processed == 3
    })
    .await
    .unwrap();
    let report = sales().await;
    assert_eq!((report.completed_orders, report.revenue_cents), (2, 2000));
    within(TIMEOUT, "demo shutdown", running.shutdown())
        .await
        .unwrap();
}

/// Two nodes' inventories (two `Stock` handles, each with its own per-SKU lock and cached
/// revision) take from one SKU at once: the compare-and-set keeps the count exact and never
/// sells more than there is, even though each handle's cache goes stale at every write of the
/// other; stock given back by one is seen by the other.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_nodes_inventories_never_oversell_one_sku() {
    use sagaflow::demo::inventory::{Stock, Take};
    let nats = start_nats().await.unwrap();
    let js = jetstream::new(nats_client(&nats.url()).await.unwrap());
    let a = Stock::open(&js, 1).await.unwrap();
    let b = Stock::open(&js, 1).await.unwrap();
    let initial = std::collections::BTreeMap::from([("SKU-HOT".to_string(), 150u64)]);
    a.init(&initial).await.unwrap();
    let mut tasks = tokio::task::JoinSet::new();
    for (i, stock) in [a.clone(), b.clone()]
        .into_iter()
        .cycle()
        .take(8)
        .enumerate()
    {
        tasks.spawn(async move {
            let mut taken = 0u64;
            for _ in 0..30 {
                match stock.take("SKU-HOT", 1).await.unwrap() {
                    Take::Taken => taken += 1,
                    Take::Short { available } => assert_eq!(available, 0, "task {i}"),
                    Take::Unknown => panic!("SKU-HOT exists"),
                }
            }
            taken
        });
    }
    let mut taken = 0;
    while let Some(t) = tasks.join_next().await {
        taken += t.unwrap();
    }
    // 8 × 30 = 240 asked for, 150 there: exactly 150 sold, none left.
    assert_eq!(taken, 150);
    assert_eq!(a.units("SKU-HOT").await.unwrap(), Some(0));
    // B gives 5 back; A (whose cache says 0) sees them before refusing.
    b.give("SKU-HOT", 5).await.unwrap();
    for _ in 0..5 {
        assert_eq!(a.take("SKU-HOT", 1).await.unwrap(), Take::Taken);
    }
    assert_eq!(
        a.take("SKU-HOT", 1).await.unwrap(),
        Take::Short { available: 0 }
    );
}

/// A node runs only the demo services it is told to (`demo.services`), so your own
/// participants can take the other services' consumer groups.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_runs_only_the_demo_services_it_is_told_to() {
    let nats = start_nats().await.unwrap();
    let node = common::TestNode::on(&nats)
        .id("some-demo")
        .partitions(2)
        .env("SAGAFLOW_DEMO__SERVICES", r#"["payment", "notification"]"#)
        .start()
        .await
        .unwrap();
    let js = jetstream::new(nats_client(&nats.url()).await.unwrap());
    let names = || {
        let js = js.clone();
        async move {
            let Ok(stream) = js.get_stream("SAGA_COMMANDS").await else {
                return Vec::new();
            };
            let names: Vec<String> = stream
                .consumer_names()
                .filter_map(|n| async move { n.ok() })
                .collect()
                .await;
            names
        }
    };
    wait_until(TIMEOUT, "the demo consumers", || async {
        let n = names().await;
        n.contains(&"svc-payment".to_string()) && n.contains(&"svc-notification".to_string())
    })
    .await
    .unwrap();
    let n = names().await;
    assert!(
        !n.contains(&"svc-inventory".to_string()) && !n.contains(&"svc-shipping".to_string()),
        "{n:?}"
    );
    node.shutdown().await.unwrap();
}
