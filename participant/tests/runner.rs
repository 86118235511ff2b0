//! The SDK against a real nats-server: the example service, the ledger's rules, the runner's
//! consumer, dead letters, deadline skips, supervision and trace continuation.
#![allow(clippy::unwrap_used, missing_docs)]

use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;
use std::time::Duration;

use async_nats::jetstream::consumer::{AckPolicy, DeliverPolicy};
use futures::StreamExt;
use sagaflow_participant::ledger::{Ledger, Recorded};
use sagaflow_participant::testing::TestBed;
use sagaflow_participant::trace::{saga_trace_id, TraceParent};
use sagaflow_participant::{async_trait, Command, Handler, Outcome, Unavailable};

#[path = "../examples/hotel.rs"]
#[allow(dead_code, unreachable_pub)]
mod hotel;

fn trip_input(nights: u32) -> Vec<u8> {
    format!(r#"{{"nights":{nights}}}"#).into_bytes()
}

#[tokio::test]
async fn the_example_books_once_and_voids_a_late_booking() {
    let bed = TestBed::start().await.unwrap();
    let ledger: Ledger<u32> = Ledger::open(bed.js(), "hotel_ledger", 1).await.unwrap();
    let hotel = hotel::Hotel {
        ledger: ledger.clone(),
    };
    let running = bed
        .runner("hotel", hotel)
        .start(bed.cancel())
        .await
        .unwrap();

    // Booked, and a retry (another attempt, same idempotency key) answers the same.
    let book = TestBed::command("trip-1", "book_hotel", "hotel", "book", &trip_input(3));
    let first = bed.call(&book).await.unwrap();
    assert_eq!(first, Outcome::success(br#"{"room":3}"#.to_vec()));
    assert_eq!(bed.call(&TestBed::retry(&book)).await.unwrap(), first);
    // A final refusal is recorded too.
    let long = TestBed::command("trip-2", "book_hotel", "hotel", "book", &trip_input(40));
    assert!(
        matches!(bed.call(&long).await.unwrap(), Outcome::Failure { kind, .. } if kind == "sold_out")
    );

    // A cancellation that arrives before its booking voids it; the late booking is refused.
    let late = TestBed::command("trip-3", "book_hotel", "hotel", "book", &trip_input(2));
    let cancel = TestBed::compensation(&late, "cancel");
    assert_eq!(
        bed.call(&cancel).await.unwrap(),
        Outcome::success(br#"{"freed":0}"#.to_vec())
    );
    let refused = bed.call(&late).await.unwrap();
    assert!(
        matches!(&refused, Outcome::Failure { kind, .. } if kind == "voided"),
        "{refused:?}"
    );
    // The cancellation of a real booking frees its room.
    let undo = TestBed::compensation(&book, "cancel");
    assert_eq!(
        bed.call(&undo).await.unwrap(),
        Outcome::success(br#"{"freed":3}"#.to_vec())
    );

    let entries = ledger.entries().await.unwrap();
    let of = |key: &str| {
        entries
            .iter()
            .filter(|e| e.idempotency_key == key)
            .collect::<Vec<_>>()
    };
    assert_eq!(of("trip-1/book_hotel").len(), 1, "{entries:?}");
    assert_eq!(of("trip-3/book_hotel")[0].outcome, Recorded::Voided);
    assert!(of("trip-1/book_hotel/compensate")[0].undid);
    assert!(!of("trip-3/book_hotel/compensate")[0].undid);
    assert_eq!(entries.len(), 5, "{entries:?}");
    running.shutdown().await;
}

/// Answers `unavailable` to the first attempt, panics on the first delivery of `panic-*`
/// sagas, counts every call.
#[derive(Default)]
struct Flaky {
    calls: AtomicU32,
    panicked: AtomicU32,
    ledger: Option<Ledger>,
}

#[async_trait]
impl Handler for Flaky {
    async fn handle(&self, cmd: &Command) -> Result<Outcome, Unavailable> {
        self.calls.fetch_add(1, Ordering::SeqCst);
        if cmd.saga_id.starts_with("panic-") && self.panicked.fetch_add(1, Ordering::SeqCst) == 0 {
            panic!("injected panic");
        }
        let attempt = cmd.attempt;
        let ledger = self.ledger.as_ref().unwrap();
        ledger
            .forward(cmd, || async move {
                Ok(match attempt {
                    1 => (Outcome::unavailable("the channel manager timed out"), ()),
                    _ => (Outcome::success(b"{}".to_vec()), ()),
                })
            })
            .await
    }
}

#[tokio::test]
async fn transient_failures_are_not_recorded_and_panics_return_the_command() {
    let bed = TestBed::start().await.unwrap();
    let ledger: Ledger = Ledger::open(bed.js(), "flaky_ledger", 1).await.unwrap();
    let handler = Arc::new(Flaky {
        ledger: Some(ledger.clone()),
        ..Flaky::default()
    });
    let running = bed
        .runner("flight", handler.clone())
        .start(bed.cancel())
        .await
        .unwrap();

    let hold = TestBed::command("t-1", "hold_flight", "flight", "hold", b"{}");
    assert_eq!(
        bed.call(&hold).await.unwrap(),
        Outcome::unavailable("the channel manager timed out").into_failure()
    );
    assert!(
        ledger.entries().await.unwrap().is_empty(),
        "a transient failure is never recorded"
    );
    assert_eq!(
        bed.call(&TestBed::retry(&hold)).await.unwrap(),
        Outcome::success(b"{}".to_vec())
    );
    assert_eq!(ledger.entries().await.unwrap().len(), 1);

    // The instance that panics dies; its command goes back and is answered by a new one.
    let panics = TestBed::retry(&TestBed::command(
        "panic-1",
        "hold_flight",
        "flight",
        "hold",
        b"{}",
    ));
    assert_eq!(
        bed.call(&panics).await.unwrap(),
        Outcome::success(b"{}".to_vec())
    );
    let stats = running.stats().await.unwrap();
    assert_eq!(stats.restarts, 1, "{stats:?}");
    running.shutdown().await;
}

#[tokio::test]
async fn consumer_dead_letters_skips_and_traces_as_documented() {
    let bed = TestBed::start().await.unwrap();
    let handler = Arc::new(Flaky {
        ledger: Some(Ledger::stateless()),
        ..Flaky::default()
    });
    let running = bed
        .runner("identity", handler.clone())
        .start(bed.cancel())
        .await
        .unwrap();
    // The trace continues: same trace, a new span, in the reply's headers.
    let verify = TestBed::retry(&TestBed::command(
        "t-9",
        "verify_traveller",
        "identity",
        "verify",
        b"{}",
    ));
    let (reply, headers) = bed.call_raw(&verify).await.unwrap();
    assert_eq!(reply.saga_id, "t-9");
    let context = TraceParent::from_headers(Some(&headers)).unwrap();
    assert_eq!(context.trace_id, saga_trace_id("t-9"));

    // The consumer is the documented one.
    let mut consumer: async_nats::jetstream::consumer::PullConsumer = bed
        .js()
        .get_stream("SAGA_COMMANDS")
        .await
        .unwrap()
        .get_consumer("svc-identity")
        .await
        .unwrap();
    let config = consumer.info().await.unwrap().config.clone();
    assert_eq!(config.filter_subject, "sagaflow.cmd.identity.>");
    assert_eq!(config.ack_policy, AckPolicy::Explicit);
    assert_eq!(config.deliver_policy, DeliverPolicy::All);
    assert_eq!(
        (config.ack_wait, config.max_deliver),
        (Duration::from_secs(30), 20)
    );

    // A command past its deadline is skipped: acked, the handler never called.
    let calls = handler.calls.load(Ordering::SeqCst);
    let mut expired = TestBed::command("t-10", "verify_traveller", "identity", "verify", b"{}");
    expired.deadline_unix_ms = sagaflow_participant::now_ms() - 600_000;
    let mut dlq = bed.client().subscribe("sagaflow.dlq.>").await.unwrap();
    for payload in [
        prost::Message::encode_to_vec(&expired),
        b"\xff\xffnot protobuf".to_vec(),
    ] {
        bed.js()
            .publish("sagaflow.cmd.identity.verify", payload.into())
            .await
            .unwrap()
            .await
            .unwrap();
    }
    // The undecodable one is dead-lettered with its reason.
    let dead = tokio::time::timeout(Duration::from_secs(15), dlq.next())
        .await
        .unwrap()
        .unwrap();
    let reason = dead
        .headers
        .as_ref()
        .unwrap()
        .get("Sagaflow-Dlq-Reason")
        .unwrap()
        .to_string();
    assert!(reason.starts_with("undecodable command"), "{reason}");
    assert_eq!(dead.payload.as_ref(), b"\xff\xffnot protobuf");
    let deadline = tokio::time::Instant::now() + Duration::from_secs(15);
    loop {
        let info = consumer.info().await.unwrap();
        if info.num_pending == 0 && info.num_ack_pending == 0 {
            break;
        }
        assert!(tokio::time::Instant::now() < deadline, "{info:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(
        handler.calls.load(Ordering::SeqCst),
        calls,
        "the expired command was handled"
    );
    running.shutdown().await;
}
