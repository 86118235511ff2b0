//! Dead letters operators can see and act on, against a real `nats-server` and an in-process
//! node with the demo services: `AdminService` `ListDeadLetters` / `GetDeadLetter` /
//! `ReplayDeadLetter` / `DiscardDeadLetter`, the journal, and the `sagaflow dlq` commands.
use crate::common;

use common::checks::*;

use std::process::Output;
use std::time::Duration;

use async_nats::jetstream;
use common::*;
use sagaflow::node::NodeHandle;
use sagaflow_actors::hash::partition_of;
use sagaflow_actors::wire::{self, Control};
use sagaflow_proto::v1::admin_service_client::AdminServiceClient;
use sagaflow_proto::v1::order_service_client::OrderServiceClient;
use sagaflow_proto::v1::{
    DeadLetterEntry, DiscardDeadLetterRequest, GetDeadLetterRequest, GetOrderRequest,
    ListDeadLettersRequest, ReplayDeadLetterRequest,
};
use tonic::transport::Channel;
use tonic::Code;

const PARTITIONS: u32 = 4;

async fn start_node(
    nats: &NatsServer,
    env: &[(&str, &str)],
) -> (
    NodeHandle,
    OrderServiceClient<Channel>,
    AdminServiceClient<Channel>,
) {
    let node = TestNode::on(nats)
        .id("dlq-1")
        .envs(env)
        .partitions(PARTITIONS)
        .start()
        .await
        .unwrap();
    let addr = node.grpc_addr.to_string();
    let orders = connect_orders(&addr).await.unwrap();
    let admin = AdminServiceClient::new(channel(&addr).await.unwrap());
    (node, orders, admin)
}

async fn publish(js: &jetstream::Context, subject: &str, payload: Vec<u8>) {
    within(TIMEOUT, "publish", async {
        js.publish(subject.to_string(), payload.into())
            .await
            .unwrap()
            .await
            .unwrap()
    })
    .await
    .unwrap();
}

async fn list(
    admin: &mut AdminServiceClient<Channel>,
    source: &str,
    include_journal: bool,
) -> Vec<DeadLetterEntry> {
    within(
        TIMEOUT,
        "ListDeadLetters",
        admin.list_dead_letters(ListDeadLettersRequest {
            source: source.into(),
            start_seq: 0,
            limit: 0,
            include_journal,
        }),
    )
    .await
    .unwrap()
    .unwrap()
    .into_inner()
    .entries
}

/// Waits until a dead letter whose original subject is `subject` is listed; returns it.
async fn wait_dead_letter(
    admin: &AdminServiceClient<Channel>,
    subject: &str,
    reason_part: &str,
) -> DeadLetterEntry {
    let found = std::sync::Arc::new(std::sync::Mutex::new(None));
    wait_until(
        Duration::from_secs(20),
        &format!("dead letter of {subject}"),
        || {
            let mut admin = admin.clone();
            let found = found.clone();
            async move {
                let entries = list(&mut admin, "", false).await;
                let hit = entries.into_iter().find(|e| e.subject == subject);
                let ok = hit.as_ref().is_some_and(|e| e.reason.contains(reason_part));
                *found.lock().unwrap() = hit;
                ok
            }
        },
    )
    .await
    .unwrap();
    let hit = found.lock().unwrap().clone();
    hit.unwrap()
}

fn sagaflow(args: &[&str]) -> Output {
    std::process::Command::new(env!("CARGO_BIN_EXE_sagaflow"))
        .args(args)
        .env_remove("SAGAFLOW_SERVER")
        .output()
        .unwrap()
}

async fn sagaflow_async(args: Vec<String>) -> Output {
    within(
        Duration::from_secs(60),
        "sagaflow cli",
        tokio::task::spawn_blocking(move || {
            let refs: Vec<&str> = args.iter().map(String::as_str).collect();
            sagaflow(&refs)
        }),
    )
    .await
    .unwrap()
    .unwrap()
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dead_letters_are_listed_shown_discarded_and_replayed() {
    let nats = start_nats().await.unwrap();
    let (node, _orders, mut admin) = start_node(&nats, &[]).await;
    let server = node.grpc_addr.to_string();
    let js = jetstream::new(nats_client(&nats.url()).await.unwrap());
    let event_subject = "sagaflow.evt.1.order-x.reply";
    let command_subject = "sagaflow.cmd.payment.charge";
    let event_payload = b"\xff\xfe not protobuf".to_vec();
    publish(&js, event_subject, event_payload.clone()).await;
    publish(&js, command_subject, b"\xff\xff\xff".to_vec()).await;

    // Both are listed, with their reasons, sources and origins.
    let event = wait_dead_letter(&admin, event_subject, "undecodable reply").await;
    let command = wait_dead_letter(&admin, command_subject, "undecodable command").await;
    assert_eq!(event.source, "events");
    assert_eq!(command.source, "commands");
    assert!(event.origin.starts_with("SAGA_EVENTS:"), "{event:?}");
    assert!(command.origin.starts_with("SAGA_COMMANDS:"), "{command:?}");
    assert_eq!(event.payload_size, event_payload.len() as u64);
    assert!(event.at_unix_ms > 0 && !event.discarded && event.journal.is_none());
    let only_commands = list(&mut admin, "commands", false).await;
    assert_eq!(
        only_commands.iter().map(|e| e.seq).collect::<Vec<_>>(),
        [command.seq]
    );
    // Paging: one entry per page, the second page starts after the first.
    let page = admin
        .list_dead_letters(ListDeadLettersRequest {
            limit: 1,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(page.entries.len(), 1);
    assert!(page.next_seq > page.entries[0].seq, "{page:?}");
    let err = admin
        .list_dead_letters(ListDeadLettersRequest {
            limit: 1001,
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    assert!(err.message().starts_with("limit"), "{}", err.message());

    // Show: the original bytes and every header.
    let shown = admin
        .get_dead_letter(GetDeadLetterRequest { seq: event.seq })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(shown.payload, event_payload);
    assert_eq!(shown.entry.as_ref().unwrap().seq, event.seq);
    assert_eq!(
        shown
            .headers
            .get(sagaflow::dlq::SUBJECT)
            .map(String::as_str),
        Some(event_subject)
    );
    assert!(shown.headers.contains_key(sagaflow::dlq::REASON));
    let err = admin
        .get_dead_letter(GetDeadLetterRequest { seq: 999_999 })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::NotFound);

    // The CLI: list --json, show --json, usage and server errors.
    let out = sagaflow_async(vec![
        "dlq".into(),
        "list".into(),
        "--server".into(),
        server.clone(),
        "--json".into(),
    ])
    .await;
    assert!(out.status.success(), "{}", text(&out.stderr));
    let json: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let listed = json["dead_letters"].as_array().unwrap();
    assert_eq!(listed.len(), 2, "{json}");
    assert!(listed.iter().any(|d| d["seq"] == event.seq
        && d["source"] == "events"
        && d["reason"].as_str().unwrap().contains("undecodable reply")));
    let out = sagaflow_async(vec![
        "dlq".into(),
        "show".into(),
        "--server".into(),
        server.clone(),
        event.seq.to_string(),
        "--json".into(),
    ])
    .await;
    assert!(out.status.success(), "{}", text(&out.stderr));
    let json: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert!(
        json["payload_hex"]
            .as_str()
            .unwrap()
            .starts_with("fffe206e6f74"),
        "{json}"
    );
    assert!(json["payload_utf8"]
        .as_str()
        .unwrap()
        .ends_with(" not protobuf"));
    let out = sagaflow_async(vec![
        "dlq".into(),
        "show".into(),
        "--server".into(),
        server.clone(),
        event.seq.to_string(),
    ])
    .await;
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert!(text(&out.stdout).contains("undecodable reply"));
    let out = sagaflow_async(vec![
        "dlq".into(),
        "discard".into(),
        "--server".into(),
        server.clone(),
        command.seq.to_string(),
        "--operator".into(),
        "ops".into(),
    ])
    .await;
    assert_eq!(
        out.status.code(),
        Some(2),
        "missing --reason is a usage error"
    );
    assert!(
        text(&out.stderr).contains("--reason"),
        "{}",
        text(&out.stderr)
    );
    let out = sagaflow_async(vec![
        "dlq".into(),
        "show".into(),
        "--server".into(),
        server.clone(),
        "999999".into(),
    ])
    .await;
    assert_eq!(out.status.code(), Some(1));
    let stderr = text(&out.stderr);
    assert!(stderr.starts_with("error: not_found: "), "{stderr}");
    assert_eq!(stderr.lines().count(), 1, "{stderr}");

    // Discard: operator and reason required, then journaled and gone.
    for (operator, reason, field) in [("ops", " ", "reason"), ("", "junk", "operator")] {
        let err = admin
            .discard_dead_letter(DiscardDeadLetterRequest {
                seq: command.seq,
                operator: operator.into(),
                reason: reason.into(),
            })
            .await
            .unwrap_err();
        assert_eq!(err.code(), Code::InvalidArgument);
        assert!(err.message().starts_with(field), "{}", err.message());
    }
    let out = sagaflow_async(vec![
        "dlq".into(),
        "discard".into(),
        "--server".into(),
        server.clone(),
        command.seq.to_string(),
        "--operator".into(),
        "ops".into(),
        "--reason".into(),
        "test poison".into(),
    ])
    .await;
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert!(text(&out.stdout).starts_with(&format!("discarded dead letter {}", command.seq)));
    let left = list(&mut admin, "", false).await;
    assert_eq!(left.iter().map(|e| e.seq).collect::<Vec<_>>(), [event.seq]);
    let err = admin
        .get_dead_letter(GetDeadLetterRequest { seq: command.seq })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::NotFound);
    let err = admin
        .discard_dead_letter(DiscardDeadLetterRequest {
            seq: command.seq,
            operator: "ops".into(),
            reason: "again".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::NotFound);
    let journal: Vec<_> = list(&mut admin, "", true)
        .await
        .into_iter()
        .filter_map(|e| e.journal.clone().map(|j| (e, j)))
        .collect();
    assert_eq!(journal.len(), 1, "{journal:?}");
    let (entry, record) = &journal[0];
    assert!(entry.discarded);
    assert_eq!(record.dead_letter_seq, command.seq);
    assert_eq!(
        (
            record.action.as_str(),
            record.operator.as_str(),
            record.reason.as_str()
        ),
        ("discard", "ops", "test poison")
    );
    assert!(record.at_unix_ms > 0);

    // Replay of a poison message: it goes back to SAGA_EVENTS, is dead-lettered again (a new
    // dead letter that says where it was replayed from), the old one is gone and journaled.
    let err = admin
        .replay_dead_letter(ReplayDeadLetterRequest {
            seq: event.seq,
            operator: " ".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    assert!(err.message().starts_with("operator"), "{}", err.message());
    let replayed = admin
        .replay_dead_letter(ReplayDeadLetterRequest {
            seq: event.seq,
            operator: "ops".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(replayed.stream, "SAGA_EVENTS");
    assert_eq!(replayed.subject, event_subject);
    let again = wait_dead_letter(&admin, event_subject, "undecodable reply").await;
    assert_ne!(again.seq, event.seq);
    assert_eq!(again.origin, format!("SAGA_EVENTS:{}", replayed.stream_seq));
    let shown = admin
        .get_dead_letter(GetDeadLetterRequest { seq: again.seq })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(shown.payload, event_payload);
    assert_eq!(
        shown
            .headers
            .get(sagaflow::dlq::REPLAYED_FROM)
            .map(String::as_str),
        Some(format!("SAGA_DLQ:{}", event.seq).as_str())
    );
    let err = admin
        .replay_dead_letter(ReplayDeadLetterRequest {
            seq: event.seq,
            operator: "ops".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::NotFound, "replaying twice");
    let actions: Vec<(u64, String)> = list(&mut admin, "", true)
        .await
        .into_iter()
        .filter_map(|e| e.journal.map(|j| (j.dead_letter_seq, j.action)))
        .collect();
    assert_eq!(
        actions,
        [
            (command.seq, "discard".to_string()),
            (event.seq, "replay".to_string())
        ]
    );
    node.shutdown().await.unwrap();
}

/// A cancel for a saga that does not exist yet is dead-lettered ("event for unknown saga");
/// once the order is placed, replaying the dead letter delivers the cancel and the order ends
/// CANCELLED. The demo participants are slowed down so the saga is still running when the
/// replayed cancel arrives.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replayed_dead_letter_reaches_its_consumer() {
    let nats = start_nats().await.unwrap();
    let (node, mut orders, mut admin) =
        start_node(&nats, &[("SAGAFLOW_DEMO__LATENCY_MS", "2000")]).await;
    let js = jetstream::new(nats_client(&nats.url()).await.unwrap());
    let saga_id = "order-dl-cancel";
    let subject = format!(
        "sagaflow.evt.{}.{saga_id}.cancel",
        partition_of(saga_id, PARTITIONS)
    );
    let cancel = wire::encode_control(&Control::Cancel {
        reason: "customer changed their mind".into(),
        at: sagaflow::clock::now_ms(),
    })
    .unwrap();
    publish(&js, &subject, cancel).await;
    let dead = wait_dead_letter(&admin, &subject, "unknown saga").await;
    assert_eq!(dead.source, "events");

    orders
        .place_order(order("dl-cancel", 700, &[("SKU-1", 1)]))
        .await
        .unwrap();
    let replayed = admin
        .replay_dead_letter(ReplayDeadLetterRequest {
            seq: dead.seq,
            operator: "ops".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(replayed.stream, "SAGA_EVENTS");
    // The replayed event carries where it came from.
    let events = js.get_stream("SAGA_EVENTS").await.unwrap();
    let m = events.get_raw_message(replayed.stream_seq).await.unwrap();
    assert_eq!(m.subject.as_str(), subject);
    assert_eq!(
        m.headers
            .get(sagaflow::dlq::REPLAYED_FROM)
            .map(|v| v.to_string()),
        Some(format!("SAGA_DLQ:{}", dead.seq))
    );

    // The cancel reaches the saga: the order is compensated.
    let status = std::sync::Arc::new(std::sync::Mutex::new(String::new()));
    wait_until(Duration::from_secs(60), "order dl-cancel terminal", || {
        let mut orders = orders.clone();
        let status = status.clone();
        async move {
            match orders
                .get_order(GetOrderRequest {
                    order_id: "dl-cancel".into(),
                })
                .await
            {
                Ok(o) => {
                    let o = o.into_inner();
                    *status.lock().unwrap() = o.status.clone();
                    o.terminal
                }
                Err(_) => false,
            }
        }
    })
    .await
    .unwrap();
    let status = status.lock().unwrap().clone();
    assert_eq!(status, "CANCELLED");
    // Nothing new was dead-lettered, the old one is gone, the replay is journaled.
    assert!(list(&mut admin, "", false).await.is_empty());
    let journal: Vec<_> = list(&mut admin, "", true)
        .await
        .into_iter()
        .filter_map(|e| e.journal)
        .collect();
    assert_eq!(journal.len(), 1);
    assert_eq!(
        (journal[0].dead_letter_seq, journal[0].action.as_str()),
        (dead.seq, "replay")
    );
    node.shutdown().await.unwrap();
}
