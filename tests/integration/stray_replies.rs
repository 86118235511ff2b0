//! Nothing silent (issue 20, item 4), end to end: replies the node does not apply are recorded in
//! their saga's history and dead-lettered with their reason; a timed-out attempt says how many
//! replies were refused while it waited; a saga waiting on a service nobody serves shows in
//! `saga attention`; `saga skip --result` on a compensation is refused rather than dropped.
//!
//! Against a real `nats-server` and an in-process node without demo services, over the sagas
//! of `tests/fixtures/sagas/stray/`. Commands are answered by a [`RawParticipant`] scripted per
//! saga; the stray replies are published by the test itself, as a participant with a bug would.
use crate::common;

use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_nats::jetstream;
use common::participant::{failure, success, Handling, RawParticipant};
use common::*;
use prost::Message as _;
use sagaflow::bus::command_id;
use sagaflow::node::NodeHandle;
use sagaflow_proto::v1::admin_service_client::AdminServiceClient;
use sagaflow_proto::v1::saga_service_client::SagaServiceClient;
use sagaflow_proto::v1::{
    self, GetSagaRequest, ListDeadLettersRequest, ListSagasNeedingAttentionRequest,
    StartSagaRequest,
};
use tonic::transport::Channel;

/// Bound on waiting for a saga to get somewhere (its steps time out after 4 s).
const SAGA_TIMEOUT: Duration = Duration::from_secs(60);

/// The node, its clients, and the commands the participant received.
struct Stray {
    node: NodeHandle,
    sagas: SagaServiceClient<Channel>,
    admin: AdminServiceClient<Channel>,
    js: jetstream::Context,
    received: Arc<Mutex<Vec<v1::Command>>>,
    _participant: RawParticipant,
    _nats: NatsServer,
}

/// How the participant answers `service.action` for saga `saga_id` (`None`: never).
fn script(saga_id: &str, action: &str) -> Option<v1::reply::Outcome> {
    match (saga_id, action) {
        // stray-a: the room is never answered (only stray replies come).
        ("stray-a", "hotel.book") => None,
        // stray-b: the flight is never answered, so the saga waits while the test replies again.
        ("stray-b", "air.book") => None,
        // stray-c: the flight is declined and the room's cancellation never answered.
        ("stray-c", "air.book") => failure("declined", "no seat"),
        ("stray-c", "hotel.cancel") => None,
        _ => success(serde_json::json!({ "done": action })),
    }
}

impl Stray {
    async fn start() -> Stray {
        let nats = start_nats().await.unwrap();
        let node = TestNode::on(&nats)
            .id("stray-1")
            .partitions(4)
            .saga_dir(fixture_sagas("stray"))
            .without_demo()
            .start()
            .await
            .unwrap();
        let received: Arc<Mutex<Vec<v1::Command>>> = Arc::default();
        let seen = received.clone();
        let participant = RawParticipant::start(
            &nats.url(),
            ["hotel", "air"],
            Handling::Concurrent,
            move |cmd| seen.lock().unwrap().push(cmd.clone()),
            |cmd| async move { script(&cmd.saga_id, &format!("{}.{}", cmd.service, cmd.action)) },
        )
        .await;
        let addr = node.grpc_addr.to_string();
        Stray {
            sagas: connect_sagas(&addr).await.unwrap(),
            admin: AdminServiceClient::new(channel(&addr).await.unwrap()),
            js: jetstream::new(nats_client(&nats.url()).await.unwrap()),
            node,
            received,
            _participant: participant,
            _nats: nats,
        }
    }

    fn server(&self) -> String {
        self.node.grpc_addr.to_string()
    }

    async fn start_saga(&self, saga_name: &str, saga_id: &str) {
        let r = within(
            TIMEOUT,
            "StartSaga",
            self.sagas.clone().start_saga(StartSagaRequest {
                saga_name: saga_name.into(),
                saga_id: saga_id.into(),
                input_json: serde_json::json!({ "guest": saga_id }).to_string(),
            }),
        )
        .await
        .unwrap()
        .unwrap()
        .into_inner();
        assert!(r.created, "{saga_id} is new");
    }

    /// Waits for the command of `step` (forward) of `saga_id`; returns it.
    async fn command(&self, saga_id: &str, step: &str) -> v1::Command {
        let find = || {
            self.received
                .lock()
                .unwrap()
                .iter()
                .find(|c| c.saga_id == saga_id && c.step == step && !c.compensation)
                .cloned()
        };
        wait_until(SAGA_TIMEOUT, &format!("{saga_id}: {step} sent"), || async {
            find().is_some()
        })
        .await
        .unwrap();
        find().unwrap()
    }

    /// Publishes a reply to the saga of `cmd` naming `step`, `attempt` and `compensation`, as
    /// service `service` (on its reply subject), with `outcome`.
    async fn reply(
        &self,
        cmd: &v1::Command,
        service: &str,
        (step, attempt, compensation): (&str, u32, bool),
        outcome: Option<v1::reply::Outcome>,
    ) {
        let reply = v1::Reply {
            command_id: command_id(&cmd.saga_id, step, compensation, attempt),
            saga_id: cmd.saga_id.clone(),
            step: step.into(),
            attempt,
            compensation,
            outcome,
        };
        let subject = cmd
            .reply_subject
            .rsplit_once('.')
            .map(|(base, _)| format!("{base}.{service}"))
            .unwrap();
        within(
            TIMEOUT,
            "publish a reply",
            self.js.publish(subject, reply.encode_to_vec().into()),
        )
        .await
        .unwrap()
        .unwrap()
        .await
        .unwrap();
    }

    async fn get(&self, saga_id: &str) -> v1::Saga {
        within(
            TIMEOUT,
            "GetSaga",
            self.sagas.clone().get_saga(GetSagaRequest {
                saga_id: saga_id.into(),
            }),
        )
        .await
        .unwrap()
        .unwrap()
        .into_inner()
    }

    /// Polls `GetSaga` until `ok` holds; returns the saga that satisfied it.
    async fn wait_saga(
        &self,
        saga_id: &str,
        what: &str,
        ok: impl Fn(&v1::Saga) -> bool,
    ) -> v1::Saga {
        let last: Arc<Mutex<Option<v1::Saga>>> = Arc::default();
        let ok = &ok;
        let result = wait_until(SAGA_TIMEOUT, &format!("{saga_id}: {what}"), || {
            let last = last.clone();
            async move {
                let saga = self.get(saga_id).await;
                let done = ok(&saga);
                *last.lock().unwrap() = Some(saga);
                done
            }
        })
        .await;
        let last = last.lock().unwrap().clone();
        if let Err(e) = result {
            panic!("{e}\nlast state: {last:#?}");
        }
        last.unwrap()
    }

    /// The reasons of the events' dead letters about `saga_id`, oldest first.
    async fn dead_letters(&self, saga_id: &str) -> Vec<String> {
        let tag = format!("(saga `{saga_id}`)");
        within(
            TIMEOUT,
            "ListDeadLetters",
            self.admin
                .clone()
                .list_dead_letters(ListDeadLettersRequest {
                    source: "events".into(),
                    limit: 1000,
                    ..Default::default()
                }),
        )
        .await
        .unwrap()
        .unwrap()
        .into_inner()
        .entries
        .into_iter()
        .map(|e| e.reason)
        .filter(|r| r.ends_with(&tag))
        .collect()
    }

    /// Waits until `saga_id` has `n` dead letters; returns their reasons.
    async fn wait_dead_letters(&self, saga_id: &str, n: usize) -> Vec<String> {
        wait_until(
            SAGA_TIMEOUT,
            &format!("{saga_id}: {n} dead letters"),
            || async { self.dead_letters(saga_id).await.len() >= n },
        )
        .await
        .unwrap();
        self.dead_letters(saga_id).await
    }
}

/// The history of `step` of `saga`, in words.
fn history(saga: &v1::Saga, step: &str) -> Vec<String> {
    saga.history
        .iter()
        .filter(|h| h.step == step)
        .map(|h| h.what.clone())
        .collect()
}

/// Runs `sagaflow COMMAND` (split on whitespace), off the runtime's threads and bounded.
async fn cli(command: &str) -> std::process::Output {
    let args: Vec<String> = command.split_whitespace().map(str::to_string).collect();
    within(
        Duration::from_secs(60),
        "sagaflow cli",
        tokio::task::spawn_blocking(move || {
            std::process::Command::new(env!("CARGO_BIN_EXE_sagaflow"))
                .args(&args)
                .env_remove("SAGAFLOW_SERVER")
                .output()
                .unwrap()
        }),
    )
    .await
    .unwrap()
    .unwrap()
}

/// Whether docs/participants.md shows `observed` (a reason or history entry this test saw),
/// with the test's names in the docs' (`charge` of the payment service, a 5 s timeout).
fn documented(observed: &str) -> bool {
    let words = |t: &str| t.split_whitespace().collect::<Vec<_>>().join(" ");
    let doc = words(include_str!("../../docs/participants.md"));
    let mut text = observed.to_string();
    if let Some(i) = text.find(" (saga `stray-") {
        text.truncate(i);
    }
    for (ours, theirs) in [
        ("`room`", "`charge`"),
        ("`flight`", "`charge`"),
        ("`hotel`", "`shipping`"),
        ("`air`", "`payment`"),
        (" after 4s", " after 5s"),
    ] {
        text = text.replace(ours, theirs);
    }
    doc.contains(&words(&text))
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stray_replies_are_recorded_dead_lettered_and_counted_by_the_timeout() {
    let t = Stray::start().await;

    // stray-a: while the room's attempt 1 waits, its service replies three times wrongly.
    t.start_saga("stray", "stray-a").await;
    let room = t.command("stray-a", "room").await;
    assert!(room.reply_subject.ends_with(".reply.hotel"), "{room:?}");
    let ok = || success(serde_json::json!({ "room": 12 }));
    // An attempt never sent, then a compensation never sent: both name the room.
    t.reply(&room, "hotel", ("room", 2, false), ok()).await;
    t.wait_dead_letters("stray-a", 1).await;
    t.reply(&room, "hotel", ("room", 1, true), ok()).await;
    t.wait_dead_letters("stray-a", 2).await;
    // Another real step of the saga, which the hotel does not serve.
    t.reply(&room, "hotel", ("flight", 1, false), ok()).await;
    let reasons = t.wait_dead_letters("stray-a", 3).await;
    assert_eq!(
        reasons,
        [
            "reply to attempt 2 of step `room`, which was never sent (the latest sent is 1) (saga `stray-a`)",
            "reply to compensation attempt 1 of step `room`, which was never sent (none was sent) (saga `stray-a`)",
            "reply for step `flight` came from service `hotel`; its command went to service `air` (saga `stray-a`)",
        ]
    );
    for reason in &reasons {
        assert!(documented(reason), "docs/participants.md shows {reason:?}");
    }
    // The room times out: its history says replies came, and were refused.
    let saga = t
        .wait_saga("stray-a", "compensated", |s| s.status == "UNDONE")
        .await;
    let room_history = history(&saga, "room");
    let first = "reply to attempt 2 of step `room`, which was never sent (the latest sent is 1)";
    assert!(
        room_history.contains(&format!(
            "2 replies refused while attempt 1 was the latest; the first: {first}"
        )),
        "{room_history:#?}"
    );
    assert!(
        room_history.contains(&format!(
            "attempt 1 failed: timeout: no accepted reply after 4s (2 replies refused; the first: {first})"
        )),
        "{room_history:#?}"
    );
    assert!(
        !room_history.iter().any(|h| h.contains("no reply after")),
        "{room_history:#?}"
    );
    let timeout = room_history.iter().find(|h| h.contains("timeout")).unwrap();
    assert!(
        documented(timeout),
        "docs/participants.md shows {timeout:?}"
    );
    // The step the stray reply named has its own entry (it never ran).
    assert_eq!(
        history(&saga, "flight"),
        [
            "reply refused: reply for step `flight` came from service `hotel`; its command went to service `air`",
            "skipped"
        ]
    );

    // stray-b: the hotel answers the room (applied); then the same answer again (a plain
    // duplicate: nothing), then a different one (refused, recorded, dead-lettered).
    t.start_saga("stray", "stray-b").await;
    let room = t.command("stray-b", "room").await;
    t.command("stray-b", "flight").await;
    t.reply(
        &room,
        "hotel",
        ("room", 1, false),
        success(serde_json::json!({ "done": "hotel.book" })),
    )
    .await;
    t.reply(
        &room,
        "hotel",
        ("room", 1, false),
        failure("declined", "changed my mind"),
    )
    .await;
    let reasons = t.wait_dead_letters("stray-b", 1).await;
    let second = "second reply to attempt 1 of step `room` contradicts the answer applied: it says failed with `declined`, the attempt had succeeded";
    assert_eq!(reasons, [format!("{second} (saga `stray-b`)")]);
    assert!(
        documented(&reasons[0]),
        "docs/participants.md shows {:?}",
        reasons[0]
    );
    let saga = t
        .wait_saga("stray-b", "compensated", |s| s.status == "UNDONE")
        .await;
    let refused: Vec<String> = history(&saga, "room")
        .into_iter()
        .filter(|h| h.contains("refused"))
        .collect();
    assert_eq!(refused, [format!("reply refused: {second}")]);
    // The flight, never answered, timed out with no reply at all.
    assert!(
        history(&saga, "flight")
            .contains(&"attempt 1 failed: timeout: no reply after 4s".to_string()),
        "{:#?}",
        saga.history
    );
    assert_eq!(
        t.dead_letters("stray-b").await.len(),
        1,
        "the duplicate is no refusal"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn attention_names_an_unserved_service_and_skip_keeps_no_result_of_a_compensation() {
    let t = Stray::start().await;
    let server = t.server();

    // A saga waiting on a service nobody serves is listed, with why.
    t.start_saga("ghost", "ghost-1").await;
    t.start_saga("stray", "stray-c").await;
    let why = "waiting on `ghost.haunt`: no consumer serves `ghost` (consumer group svc-ghost)";
    let attention = || async {
        within(
            TIMEOUT,
            "ListSagasNeedingAttention",
            t.sagas
                .clone()
                .list_sagas_needing_attention(ListSagasNeedingAttentionRequest::default()),
        )
        .await
        .unwrap()
        .unwrap()
        .into_inner()
        .sagas
    };
    wait_until(SAGA_TIMEOUT, "ghost-1 needs attention", || async {
        attention().await.iter().any(|s| s.saga_id == "ghost-1")
    })
    .await
    .unwrap();
    let listed = attention().await;
    let ids: Vec<&str> = listed.iter().map(|s| s.saga_id.as_str()).collect();
    assert_eq!(ids, ["ghost-1"], "served sagas are not listed");
    assert!(
        listed[0].progress.starts_with(why),
        "{}",
        listed[0].progress
    );
    let out = cli(&format!("saga attention --server {server}")).await;
    assert!(out.status.success(), "{}", text(&out.stderr));
    let out = text(&out.stdout);
    assert!(out.contains("ghost-1") && out.contains(why), "{out}");

    // stray-c: the flight is declined; the room's cancellation hangs.
    let saga = t
        .wait_saga("stray-c", "compensating the room", |s| {
            s.steps.iter().any(|st| {
                st.name == "room"
                    && ["COMPENSATING", "COMPENSATION_RETRY_WAIT"].contains(&st.state.as_str())
            })
        })
        .await;
    assert_eq!(saga.phase, "COMPENSATING");
    // A result is refused: a compensation skipped counts as done and keeps none.
    let out = cli(&format!(
        "saga skip stray-c --step room --result {{\"refund\":\"manual\"}} --operator alice --server {server}"
    ))
    .await;
    assert_eq!(out.status.code(), Some(1), "{}", text(&out.stderr));
    let stderr = text(&out.stderr);
    assert!(
        stderr.starts_with("error: failed_precondition: skip: skipping step `room` (")
            && stderr.contains(
                "counts its compensation as done and records no result, so it takes none: skip it without a result"
            ),
        "{stderr}"
    );
    assert_eq!(
        t.get("stray-c").await.phase,
        "COMPENSATING",
        "nothing changed"
    );
    // Without one, the skip applies and the saga ends.
    let out = cli(&format!(
        "saga skip stray-c --step room --operator alice --server {server}"
    ))
    .await;
    assert!(out.status.success(), "{}", text(&out.stderr));
    let saga = t
        .wait_saga("stray-c", "compensated", |s| s.status == "UNDONE")
        .await;
    assert!(
        history(&saga, "room")
            .iter()
            .any(|h| h.starts_with("operator `alice`: skip")),
        "{:#?}",
        saga.history
    );
}
