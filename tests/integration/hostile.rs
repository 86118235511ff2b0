//! A hostile publisher against a real `nats-server` and an in-process node with the demo
//! services: while 1,000 ordinary orders run, a plain NATS client (not Sagaflow's code)
//! publishes every class of bad saga event — bad, huge, empty and unicode saga ids, garbage,
//! replies on another partition's subject, forged command ids, answers to attempts never sent,
//! unknown steps and sagas, duplicates, an oversized output — and the test asserts:
//!
//! - every ordinary order ends right (the participants' ledgers agree);
//! - every hostile message is dead-lettered exactly once with its precise reason, or ignored
//!   and counted (duplicates), and the refused ones are counted by reason;
//! - the node never lost its NATS connection nor its readiness;
//! - nothing is still being retried afterwards (every partition consumer is drained).
use crate::common;

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use async_nats::jetstream;
use async_nats::HeaderMap;
use common::checks::*;
use common::*;
use prost::Message as _;
use sagaflow::bus::command_id;
use sagaflow::topology::{event_subject, SAGA_ID_HEADER};
use sagaflow_actors::hash::partition_of;
use sagaflow_actors::wire::{self, Control};
use sagaflow_proto::v1::admin_service_client::AdminServiceClient;
use sagaflow_proto::v1::{self, ListDeadLettersRequest};

const PARTITIONS: u32 = 4;
const ORDERS: usize = 1_000;

/// What must become of one hostile message.
enum Fate {
    /// Dead-lettered once, the reason containing this text.
    Dead(&'static str),
    /// Acked without effect and counted as ignored.
    Ignored,
}

fn reply(saga_id: &str, step: &str, attempt: u32, output: Vec<u8>) -> v1::Reply {
    v1::Reply {
        command_id: command_id(saga_id, step, false, attempt),
        saga_id: saga_id.into(),
        step: step.into(),
        attempt,
        compensation: false,
        outcome: Some(v1::reply::Outcome::Success(v1::Success { output })),
    }
}

fn home(saga_id: &str) -> String {
    event_subject(partition_of(saga_id, PARTITIONS), "reply")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_events_are_refused_while_ordinary_orders_run() {
    let nats = start_nats().await.unwrap();
    let node = Arc::new(
        TestNode::on(&nats)
            .id("hostile-1")
            .partitions(PARTITIONS)
            .start()
            .await
            .unwrap(),
    );
    let addr = node.grpc_addr.to_string();
    let mut orders = connect_orders(&addr).await.unwrap();
    let mut admin = AdminServiceClient::new(channel(&addr).await.unwrap());
    let js = jetstream::new(nats_client(&nats.url()).await.unwrap());

    // A saga that exists and has finished: the target of the messages about real sagas.
    place_retrying(&mut orders, order("victim", 1_500, &[("SKU-1", 1)]))
        .await
        .unwrap()
        .unwrap();
    let victim_order = wait_all_terminal(&orders, &["victim".to_string()], TIMEOUT).await;
    assert_eq!(victim_order[0].status, "SHIPPED");
    let victim = "order-victim";

    // Readiness is sampled throughout.
    let watching = Arc::new(AtomicBool::new(true));
    let not_ready = Arc::new(AtomicUsize::new(0));
    let sampler = {
        let (node, watching, not_ready) = (node.clone(), watching.clone(), not_ready.clone());
        tokio::spawn(async move {
            let mut samples = 0usize;
            while watching.load(Ordering::SeqCst) {
                if !node.ready() {
                    not_ready.fetch_add(1, Ordering::SeqCst);
                }
                samples += 1;
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            samples
        })
    };
    let placing = {
        let orders = orders.clone();
        tokio::spawn(async move { place_mix(&orders, "calm", ORDERS).await })
    };

    // The hostile messages: (subject, headers, payload, fate).
    let mut hostile: Vec<(String, HeaderMap, Vec<u8>, Fate)> = Vec::new();
    let bad_ids = [
        "x y".to_string(),
        "a*".to_string(),
        "été".to_string(),
        "a>".to_string(),
        "Z".repeat(5_000),
        "a\nb".to_string(),
        "a.b".to_string(),
    ];
    for id in &bad_ids {
        hostile.push((
            event_subject(0, "reply"),
            HeaderMap::new(),
            reply(id, "charge", 1, Vec::new()).encode_to_vec(),
            Fate::Dead("saga id `"),
        ));
    }
    hostile.push((
        event_subject(0, "reply"),
        HeaderMap::new(),
        reply("", "charge", 1, Vec::new()).encode_to_vec(),
        Fate::Dead("reply names no saga"),
    ));
    let garbage: Vec<u8> = (0..300u32).map(|i| (i * 7 + 0x80) as u8).collect();
    hostile.push((
        event_subject(1, "reply"),
        HeaderMap::new(),
        garbage.clone(),
        Fate::Dead("undecodable reply"),
    ));
    let mut named = HeaderMap::new();
    named.insert(SAGA_ID_HEADER, victim);
    hostile.push((
        event_subject(partition_of(victim, PARTITIONS), "cancel"),
        named.clone(),
        garbage,
        Fate::Dead("cannot decode control event"),
    ));
    let cancel = wire::encode_control(&Control::Cancel {
        reason: "hostile".into(),
        at: 1,
    })
    .unwrap();
    let mut spaced = HeaderMap::new();
    spaced.insert(SAGA_ID_HEADER, "x y");
    hostile.push((
        event_subject(0, "cancel"),
        spaced,
        cancel.clone(),
        Fate::Dead("saga id `x y`"),
    ));
    let elsewhere = (partition_of(victim, PARTITIONS) + 1) % PARTITIONS;
    hostile.push((
        event_subject(elsewhere, "cancel"),
        named,
        cancel,
        Fate::Dead("the saga belongs to partition"),
    ));
    hostile.push((
        event_subject(elsewhere, "reply"),
        HeaderMap::new(),
        reply(victim, "charge", 1, Vec::new()).encode_to_vec(),
        Fate::Dead("the saga belongs to partition"),
    ));
    let forged = v1::Reply {
        command_id: format!("{victim}/charge/7"),
        ..reply(victim, "charge", 1, Vec::new())
    };
    hostile.push((
        home(victim),
        HeaderMap::new(),
        forged.encode_to_vec(),
        Fate::Dead("is not the command it claims to answer"),
    ));
    hostile.push((
        home(victim),
        HeaderMap::new(),
        reply(victim, "charge", 2, Vec::new()).encode_to_vec(),
        Fate::Dead("attempt 2 of step `charge`, which was never sent"),
    ));
    hostile.push((
        home(victim),
        HeaderMap::new(),
        reply(victim, "bogus", 1, Vec::new()).encode_to_vec(),
        Fate::Dead("unknown step `bogus`"),
    ));
    hostile.push((
        home("order-nobody"),
        HeaderMap::new(),
        reply("order-nobody", "charge", 1, Vec::new()).encode_to_vec(),
        Fate::Dead("unknown saga `order-nobody`"),
    ));
    hostile.push((
        "sagaflow.evt.0.bogus".into(),
        HeaderMap::new(),
        Vec::new(),
        Fate::Dead("unknown event kind"),
    ));
    // Answers to an attempt that was answered already: a duplicate, however large its output.
    hostile.push((
        home(victim),
        HeaderMap::new(),
        reply(victim, "charge", 1, b"{\"dup\":1}".to_vec()).encode_to_vec(),
        Fate::Ignored,
    ));
    hostile.push((
        home(victim),
        HeaderMap::new(),
        reply(victim, "charge", 1, vec![b'x'; 900 * 1024]).encode_to_vec(),
        Fate::Ignored,
    ));
    // An output as large as the server takes, for an attempt never sent: its dead letter
    // cannot hold it whole with its headers, so it holds the first bytes and says so.
    hostile.push((
        home(victim),
        HeaderMap::new(),
        reply(victim, "charge", 3, vec![b'y'; 1_048_000]).encode_to_vec(),
        Fate::Dead("attempt 3 of step `charge`, which was never sent"),
    ));

    // Published twice over, in the middle of the ordinary load.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let mut fates: HashMap<u64, (String, Fate)> = HashMap::new();
    for round in 0..2 {
        for (subject, headers, payload, fate) in &hostile {
            let ack = within(TIMEOUT, "publish hostile message", async {
                js.publish_with_headers(subject.clone(), headers.clone(), payload.clone().into())
                    .await
                    .unwrap()
                    .await
                    .unwrap()
            })
            .await
            .unwrap();
            let fate = match fate {
                Fate::Dead(part) => Fate::Dead(part),
                Fate::Ignored => Fate::Ignored,
            };
            fates.insert(ack.sequence, (format!("{subject} (round {round})"), fate));
        }
    }

    let ids = within(Duration::from_secs(300), "place orders", placing)
        .await
        .unwrap()
        .unwrap();
    let done = wait_all_terminal(&orders, &ids, Duration::from_secs(300)).await;
    check_ledgers(&done, &ledgers(&nats).await);

    // Every hostile message: dead-lettered once with its reason, or ignored.
    let expected_dead = fates
        .values()
        .filter(|(_, f)| matches!(f, Fate::Dead(_)))
        .count();
    let dead: Arc<std::sync::Mutex<Vec<v1::DeadLetterEntry>>> = Arc::default();
    wait_until(
        Duration::from_secs(60),
        "every hostile message dead-lettered",
        || {
            let (mut admin, dead) = (admin.clone(), dead.clone());
            async move {
                let entries = admin
                    .list_dead_letters(ListDeadLettersRequest {
                        source: "events".into(),
                        limit: 1000,
                        ..Default::default()
                    })
                    .await
                    .map(|r| r.into_inner().entries)
                    .unwrap_or_default();
                let n = entries.len();
                *dead.lock().unwrap() = entries;
                n >= expected_dead
            }
        },
    )
    .await
    .unwrap();
    let dead = dead.lock().unwrap().clone();
    assert_eq!(dead.len(), expected_dead, "one dead letter each: {dead:#?}");
    for entry in &dead {
        let seq: u64 = entry
            .origin
            .strip_prefix("SAGA_EVENTS:")
            .and_then(|s| s.parse().ok())
            .unwrap_or_else(|| panic!("dead letter of no hostile event: {entry:?}"));
        let Some((what, Fate::Dead(part))) = fates.get(&seq) else {
            panic!("event {seq} dead-lettered, but it was not to be: {entry:?}");
        };
        assert!(
            entry.reason.contains(part),
            "{what}: reason {:?} does not say {part:?}",
            entry.reason
        );
    }
    let truncated = dead
        .iter()
        .find(|e| e.reason.contains("attempt 3"))
        .expect("the oversized message's dead letter");
    let shown = admin
        .get_dead_letter(v1::GetDeadLetterRequest { seq: truncated.seq })
        .await
        .unwrap()
        .into_inner();
    assert!(
        shown
            .headers
            .get(sagaflow::dlq::TRUNCATED)
            .is_some_and(|n| n.parse::<usize>().unwrap_or(0) > 1_048_000),
        "{:?}",
        shown.headers
    );

    // Counted: refused by reason, the duplicates as ignored (those may still be on their way:
    // an event that reaches a saga's actor as it stops is redelivered after `ack_wait`, 30 s).
    let ignored = fates
        .values()
        .filter(|(_, f)| matches!(f, Fate::Ignored))
        .count();
    let http = node.http_addr;
    wait_until(
        Duration::from_secs(75),
        "duplicates counted",
        || async move {
            let (_, metrics) = http_get(http, "/metrics").await.unwrap_or_default();
            sample_sum(&metrics, "sagaflow_events_ignored_total").unwrap_or(0.0) >= ignored as f64
        },
    )
    .await
    .unwrap();
    let (_, metrics) = http_get(node.http_addr, "/metrics").await.unwrap();
    assert_eq!(
        sample_sum(&metrics, "sagaflow_events_refused_total"),
        Some(expected_dead as f64),
        "{metrics}"
    );
    assert!(
        metrics.contains("sagaflow_events_refused_total{reason=\"partition\"} 4"),
        "{metrics}"
    );

    // Never off NATS, never unready, and nothing left to retry.
    watching.store(false, Ordering::SeqCst);
    let samples = sampler.await.unwrap();
    assert!(samples > 20, "readiness sampled {samples} times");
    assert_eq!(not_ready.load(Ordering::SeqCst), 0, "readiness lost");
    assert_eq!(
        node.nats_disconnects(),
        0,
        "the node's NATS connection dropped"
    );
    assert_eq!(
        sample_sum(&metrics, "sagaflow_nats_disconnects_total"),
        Some(0.0)
    );
    wait_until(
        Duration::from_secs(75),
        "every partition consumer drained",
        || {
            let js = js.clone();
            async move { drained(&js).await }
        },
    )
    .await
    .unwrap();
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert!(drained(&js).await, "an event came back for another try");
}

/// Whether every partition consumer has delivered and had acked every event.
async fn drained(js: &jetstream::Context) -> bool {
    let Ok(stream) = js.get_stream(sagaflow::topology::EVENTS_STREAM).await else {
        return false;
    };
    for p in 0..PARTITIONS {
        let Ok(mut c) = stream
            .get_consumer::<jetstream::consumer::pull::Config>(&sagaflow::events::consumer_name(p))
            .await
        else {
            return false;
        };
        match c.info().await {
            Ok(info) if info.num_pending == 0 && info.num_ack_pending == 0 => {}
            _ => return false,
        }
    }
    true
}
