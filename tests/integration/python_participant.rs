//! The Python participant of `examples/python` (nats-py, and protobuf code that protoc compiles
//! from `proto/sagaflow/v1/participant.proto` when it starts) runs as a child process. It serves
//! the trip saga's `identity`, `flight` and `hotel` services, and the node's demo services serve
//! `payment` and `notification`. The trip input scripts how the Python services answer.
//!
//! The interpreter is `$PARTICIPANT_PYTHON`, else `target/python-venv/bin/python`; both come
//! from `bash scripts/python-env.sh`, which `.ci/run` calls. Without one the tests fail: they
//! never skip.
use crate::common;

use std::collections::BTreeMap;
use std::future::IntoFuture;
use std::io::{BufRead, BufReader};
use std::path::PathBuf;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::Duration;

use async_nats::jetstream::{self, consumer};
use async_nats::HeaderMap;
use common::*;
use futures::{StreamExt, TryStreamExt};
use prost::Message as _;
use sagaflow_proto::v1::saga_service_client::SagaServiceClient;
use sagaflow_proto::v1::{self, GetSagaRequest, StartSagaRequest};
use serde_json::{json, Value};
use tonic::transport::Channel;

/// Bound on a whole saga run (a step nobody answers times out after 15 s, the hotel's 45 s).
const SAGA_TIMEOUT: Duration = Duration::from_secs(60);

/// Bound on the participant's start: Python, its imports and protoc, on a loaded machine.
const READY_TIMEOUT: Duration = Duration::from_secs(60);

/// The services the Python participant serves (its ledger buckets are `svc_<service>`).
const SERVICES: [&str; 3] = ["identity", "flight", "hotel"];

/// The interpreter that has `examples/python/requirements.txt`.
fn python() -> PathBuf {
    let hint = "run `export PARTICIPANT_PYTHON=\"$(bash scripts/python-env.sh)\"` first (it \
                creates the virtualenv target/python-venv with examples/python/requirements.txt)";
    if let Some(path) = std::env::var_os("PARTICIPANT_PYTHON").filter(|p| !p.is_empty()) {
        let path = PathBuf::from(path);
        assert!(
            path.is_file(),
            "PARTICIPANT_PYTHON={} is not a file: {hint}",
            path.display()
        );
        return path;
    }
    let venv = repo_dir().join("target/python-venv/bin/python");
    assert!(
        venv.is_file(),
        "no Python for the participant example (PARTICIPANT_PYTHON is unset and {} is missing): \
         {hint}",
        venv.display()
    );
    venv
}

/// `examples/python/participant.py` as a child process: stdout read for its `ready` line,
/// stderr (its log) in a file, printed if the test panics. Killed when dropped.
struct PythonParticipant {
    child: Option<Child>,
    log: PathBuf,
    _dir: tempfile::TempDir,
}

impl PythonParticipant {
    /// Starts it for `services` and waits until it says `ready` (its consumers are bound).
    async fn start(nats_url: &str, services: &[&str]) -> PythonParticipant {
        let dir = tempfile::Builder::new()
            .prefix("sagaflow-python-")
            .tempdir()
            .unwrap();
        let log = dir.path().join("participant.log");
        let mut child = Command::new(python())
            .arg(repo_dir().join("examples/python/participant.py"))
            .arg("--nats")
            .arg(nats_url)
            .arg("--services")
            .arg(services.join(","))
            .arg("--proto-out")
            .arg(dir.path().join("generated"))
            .env("PYTHONUNBUFFERED", "1")
            .env("PYTHONDONTWRITEBYTECODE", "1")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .expect("spawn the Python participant");
        let stdout = child.stdout.take().unwrap();
        let (ready_tx, ready_rx) = tokio::sync::oneshot::channel();
        // Reads stdout to its end (so the child never blocks on a full pipe); the first line
        // starting with `ready` is passed on. Ends when the child exits.
        std::thread::spawn(move || {
            let mut ready_tx = Some(ready_tx);
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                if line.starts_with("ready") {
                    if let Some(tx) = ready_tx.take() {
                        let _ = tx.send(line);
                    }
                }
            }
        });
        let participant = PythonParticipant {
            child: Some(child),
            log,
            _dir: dir,
        };
        match within(READY_TIMEOUT, "the Python participant's `ready`", ready_rx).await {
            Ok(Ok(line)) => assert!(line.contains(services[0]), "{line}"),
            Ok(Err(_)) => panic!(
                "the Python participant exited before it was ready:\n{}",
                participant.log()
            ),
            Err(e) => panic!("{e}:\n{}", participant.log()),
        }
        participant
    }

    fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Sends SIGTERM and waits (bounded) for it to exit.
    async fn terminate(mut self) -> ExitStatus {
        let mut child = self.child.take().unwrap();
        let sent = Command::new("kill")
            .arg("-TERM")
            .arg(child.id().to_string())
            .status()
            .unwrap();
        assert!(
            sent.success(),
            "kill -TERM failed: the participant had exited"
        );
        let waited = wait_until(TIMEOUT, "the Python participant to exit on SIGTERM", || {
            let exited = matches!(child.try_wait(), Ok(Some(_)));
            async move { exited }
        })
        .await;
        if let Err(e) = waited {
            let _ = child.kill();
            let _ = child.wait();
            panic!("{e}:\n{}", self.log());
        }
        child.wait().unwrap()
    }
}

impl Drop for PythonParticipant {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
        if std::thread::panicking() {
            eprintln!("--- the Python participant's log ---\n{}\n---", self.log());
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Reading sagas and the participant's ledger.
// ---------------------------------------------------------------------------------------------

async fn start_trip(sagas: &mut SagaServiceClient<Channel>, saga_id: &str, input: &Value) {
    let r = within(
        TIMEOUT,
        "StartSaga",
        sagas.start_saga(StartSagaRequest {
            saga_name: "trip".into(),
            saga_id: saga_id.into(),
            input_json: input.to_string(),
        }),
    )
    .await
    .unwrap()
    .unwrap()
    .into_inner();
    assert!(r.created, "{saga_id} is new");
}

/// Polls `GetSaga` until the saga is terminal; returns it.
async fn wait_terminal(
    sagas: &SagaServiceClient<Channel>,
    saga_id: &str,
    py: &PythonParticipant,
) -> v1::Saga {
    let last = std::sync::Arc::new(std::sync::Mutex::new(None::<v1::Saga>));
    let polled = wait_until(SAGA_TIMEOUT, &format!("saga {saga_id} terminal"), || {
        let mut sagas = sagas.clone();
        let last = last.clone();
        let saga_id = saga_id.to_string();
        async move {
            let Ok(saga) = sagas.get_saga(GetSagaRequest { saga_id }).await else {
                return false;
            };
            let saga = saga.into_inner();
            let terminal = saga.terminal;
            *last.lock().unwrap() = Some(saga);
            terminal
        }
    })
    .await;
    if let Err(e) = polled {
        panic!(
            "{e}: last seen {:#?}\nparticipant log:\n{}",
            last.lock().unwrap(),
            py.log()
        );
    }
    let saga = last.lock().unwrap().take();
    saga.unwrap()
}

fn step<'a>(saga: &'a v1::Saga, name: &str) -> &'a v1::StepStatus {
    saga.steps
        .iter()
        .find(|s| s.name == name)
        .unwrap_or_else(|| panic!("no step {name} in {saga:#?}"))
}

/// The history entries of `step`, oldest first.
fn history<'a>(saga: &'a v1::Saga, step: &str) -> Vec<&'a str> {
    saga.history
        .iter()
        .filter(|h| h.step == step)
        .map(|h| h.what.as_str())
        .collect()
}

/// Where in the saga's history (oldest first) `step` logged `what`.
fn history_index(saga: &v1::Saga, step: &str, what: &str) -> usize {
    saga.history
        .iter()
        .position(|h| h.step == step && h.what == what)
        .unwrap_or_else(|| panic!("no `{what}` of {step} in {:#?}", saga.history))
}

/// The Python participant's ledger records of `saga_id` in the buckets of `services`, by
/// `<service> <idempotency key>`. Every key must have been written exactly once: the buckets
/// keep several revisions per key, so a second write would show in its history.
async fn ledger_of(
    js: &jetstream::Context,
    services: &[&str],
    saga_id: &str,
) -> BTreeMap<String, Value> {
    let mut records = BTreeMap::new();
    for service in services {
        let kv = within(
            TIMEOUT,
            "open a ledger bucket",
            js.get_key_value(format!("svc_{service}")),
        )
        .await
        .unwrap()
        .unwrap();
        let status = within(TIMEOUT, "ledger status", kv.status())
            .await
            .unwrap()
            .unwrap();
        assert!(
            status.history() > 1,
            "svc_{service} keeps one revision per key: rewrites would not show"
        );
        let keys: Vec<String> = within(TIMEOUT, "ledger keys", async {
            kv.keys().await.unwrap().try_collect().await.unwrap()
        })
        .await
        .unwrap();
        for key in keys
            .into_iter()
            .filter(|k| k.starts_with(&format!("{saga_id}/")))
        {
            let entries: Vec<_> = within(TIMEOUT, "a ledger key's history", async {
                kv.history(&key).await.unwrap().try_collect().await.unwrap()
            })
            .await
            .unwrap();
            assert_eq!(
                entries.len(),
                1,
                "{service} {key} was written more than once: {entries:?}"
            );
            let record: Value = serde_json::from_slice(&entries[0].value).unwrap();
            records.insert(format!("{service} {key}"), record);
        }
    }
    records
}

/// A ledger as `<service> <key>` → `success`, `failure <kind>` or `voided`.
fn outcomes(ledger: &BTreeMap<String, Value>) -> BTreeMap<String, String> {
    ledger
        .iter()
        .map(|(key, record)| {
            let outcome = match record["outcome"].as_str().unwrap() {
                "failure" => format!("failure {}", record["kind"].as_str().unwrap()),
                other => other.to_string(),
            };
            (key.clone(), outcome)
        })
        .collect()
}

fn expect(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
    pairs
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

fn trip(traveller: &str, amount_cents: i64) -> Value {
    json!({"traveller": traveller, "from": "LIS", "to": "NRT", "nights": 3, "amount_cents": amount_cents})
}

// ---------------------------------------------------------------------------------------------
// Tests.
// ---------------------------------------------------------------------------------------------

/// Four trips through the Python participant and the demo payment: one booked, one cancelled
/// because the hotel is sold out, one cancelled because the charge is declined (above the demo's
/// 100000 limit), one booked after the hotel answered `unavailable` once. Each saga is read
/// back over gRPC, and the participant's ledger shows each key recorded once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn trips_are_booked_compensated_and_retried_through_the_python_participant() {
    let nats = start_nats().await.unwrap();
    let node_setup = TestNode::on(&nats)
        .id("python-trips")
        .partitions(2)
        .env("SAGAFLOW_DEMO__SERVICES", r#"["payment", "notification"]"#);
    let consumers = node_setup.config().consumers;
    let node = node_setup.start().await.unwrap();
    let py = PythonParticipant::start(&nats.url(), &SERVICES).await;
    let js = jetstream::new(nats_client(&nats.url()).await.unwrap());

    // The consumers it created have the settings of docs/participants.md, a node's own.
    let commands = within(TIMEOUT, "SAGA_COMMANDS", js.get_stream("SAGA_COMMANDS"))
        .await
        .unwrap()
        .unwrap();
    for service in SERVICES {
        let info = within(
            TIMEOUT,
            "consumer info",
            commands.consumer_info(format!("svc-{service}")),
        )
        .await
        .unwrap()
        .unwrap();
        let c = &info.config;
        assert_eq!(c.durable_name.as_deref(), Some(&*format!("svc-{service}")));
        assert_eq!(c.filter_subject, format!("sagaflow.cmd.{service}.>"));
        assert_eq!(c.ack_policy, consumer::AckPolicy::Explicit);
        assert_eq!(c.deliver_policy, consumer::DeliverPolicy::All);
        assert_eq!(c.ack_wait, consumers.command_ack_wait, "{service}");
        assert_eq!(c.max_deliver, consumers.command_max_deliver, "{service}");
        assert_eq!(c.max_ack_pending, consumers.max_ack_pending, "{service}");
    }

    let mut sagas = connect_sagas(&node.grpc_addr.to_string()).await.unwrap();
    let booked = "py-booked";
    let sold_out = "py-sold-out";
    let declined = "py-declined";
    let flaky = "py-flaky";
    start_trip(&mut sagas, booked, &trip("ann", 84_000)).await;
    let mut input = trip("bob", 84_000);
    input["hotel"] = json!("sold_out");
    start_trip(&mut sagas, sold_out, &input).await;
    start_trip(&mut sagas, declined, &trip("cy", 184_000)).await;
    let mut input = trip("di", 84_000);
    input["hotel_flaky"] = json!(1);
    start_trip(&mut sagas, flaky, &input).await;

    // (a) Booked: every step once, the Python outputs kept.
    let saga = wait_terminal(&sagas, booked, &py).await;
    assert_eq!(saga.status, "BOOKED", "{saga:#?}");
    assert_eq!(saga.phase, "COMPLETED");
    for name in [
        "verify_traveller",
        "hold_flight",
        "book_hotel",
        "charge",
        "issue_tickets",
    ] {
        let s = step(&saga, name);
        assert_eq!((s.state.as_str(), s.attempts), ("SUCCEEDED", 1), "{s:?}");
    }
    let output: Value = serde_json::from_str(&step(&saga, "hold_flight").output_json).unwrap();
    assert_eq!(output, json!({"held": "LIS-NRT", "traveller": "ann"}));
    assert!(saga.compensations.is_empty(), "{:?}", saga.compensations);
    assert_eq!(
        outcomes(&ledger_of(&js, &SERVICES, booked).await),
        expect(&[
            ("flight py-booked/hold_flight", "success"),
            ("flight py-booked/issue_tickets", "success"),
            ("hotel py-booked/book_hotel", "success"),
            ("identity py-booked/verify_traveller", "success"),
        ])
    );

    // (b) Sold out: the hotel refuses for good, the flight hold is released, the traveller told.
    let saga = wait_terminal(&sagas, sold_out, &py).await;
    assert_eq!(saga.status, "CANCELLED", "{saga:#?}");
    assert_eq!(saga.phase, "COMPENSATED");
    let hotel = step(&saga, "book_hotel");
    assert_eq!(
        (
            hotel.state.as_str(),
            hotel.attempts,
            hotel.last_error_kind.as_str()
        ),
        ("FAILED", 1, "sold_out"),
        "a non-retryable kind is not retried: {hotel:?}"
    );
    assert_eq!(step(&saga, "hold_flight").state, "COMPENSATED");
    assert_eq!(step(&saga, "charge").state, "SKIPPED");
    assert_eq!(step(&saga, "notify_cancellation").state, "SUCCEEDED");
    let trail: Vec<(&str, &str)> = saga
        .compensations
        .iter()
        .map(|c| (c.step.as_str(), c.state.as_str()))
        .collect();
    assert_eq!(trail, [("hold_flight", "COMPENSATED")]);
    let ledger = ledger_of(&js, &SERVICES, sold_out).await;
    assert_eq!(
        outcomes(&ledger),
        expect(&[
            ("flight py-sold-out/hold_flight", "success"),
            ("flight py-sold-out/hold_flight/compensate", "success"),
            ("hotel py-sold-out/book_hotel", "failure sold_out"),
            ("identity py-sold-out/verify_traveller", "success"),
        ]),
        "the refused booking is recorded, and nothing is cancelled: {ledger:#?}"
    );
    assert_eq!(
        ledger["flight py-sold-out/hold_flight/compensate"]["output"]["undone"],
        "release"
    );

    // (b) Declined: the demo payment refuses the amount, the hotel is cancelled and then the
    // flight released (newest first, one at a time), both by the Python participant.
    let saga = wait_terminal(&sagas, declined, &py).await;
    assert_eq!(saga.status, "CANCELLED", "{saga:#?}");
    let charge = step(&saga, "charge");
    assert_eq!(
        (charge.state.as_str(), charge.last_error_kind.as_str()),
        ("FAILED", "declined")
    );
    assert_eq!(step(&saga, "issue_tickets").state, "SKIPPED");
    let trail: Vec<(&str, &str)> = saga
        .compensations
        .iter()
        .map(|c| (c.step.as_str(), c.state.as_str()))
        .collect();
    assert_eq!(
        trail,
        [
            ("book_hotel", "COMPENSATED"),
            ("hold_flight", "COMPENSATED")
        ]
    );
    assert!(
        history_index(&saga, "book_hotel", "compensated")
            < history_index(&saga, "hold_flight", "compensation attempt 1 sent"),
        "the flight is released only once the hotel is cancelled: {:#?}",
        saga.history
    );
    let ledger = ledger_of(&js, &SERVICES, declined).await;
    assert_eq!(
        outcomes(&ledger),
        expect(&[
            ("flight py-declined/hold_flight", "success"),
            ("flight py-declined/hold_flight/compensate", "success"),
            ("hotel py-declined/book_hotel", "success"),
            ("hotel py-declined/book_hotel/compensate", "success"),
            ("identity py-declined/verify_traveller", "success"),
        ])
    );
    assert_eq!(
        ledger["hotel py-declined/book_hotel/compensate"]["output"]["undone"],
        "cancel"
    );

    // (c) Flaky hotel: attempt 1 answered `unavailable` (not recorded), attempt 2 booked.
    let saga = wait_terminal(&sagas, flaky, &py).await;
    assert_eq!(saga.status, "BOOKED", "{saga:#?}");
    let hotel = step(&saga, "book_hotel");
    assert_eq!(
        (hotel.state.as_str(), hotel.attempts),
        ("SUCCEEDED", 2),
        "{hotel:?}"
    );
    let hotel_history = history(&saga, "book_hotel");
    assert!(
        hotel_history.len() == 5
            && hotel_history[0] == "attempt 1 sent"
            && hotel_history[1].starts_with("attempt 1 failed: unavailable: ")
            && hotel_history[2].starts_with("attempt 2 scheduled at ")
            && hotel_history[3] == "attempt 2 sent"
            && hotel_history[4] == "succeeded on attempt 2",
        "{hotel_history:#?}"
    );
    let ledger = ledger_of(&js, &SERVICES, flaky).await;
    assert_eq!(
        outcomes(&ledger),
        expect(&[
            ("flight py-flaky/hold_flight", "success"),
            ("flight py-flaky/issue_tickets", "success"),
            ("hotel py-flaky/book_hotel", "success"),
            ("identity py-flaky/verify_traveller", "success"),
        ])
    );
    assert_eq!(
        ledger["hotel py-flaky/book_hotel"]["attempt"], 2,
        "the one record is attempt 2's: the `unavailable` was never recorded"
    );

    // SIGTERM: it finishes what it holds and exits cleanly.
    let status = py.terminate().await;
    assert!(status.success(), "exit status {status:?}");
    within(TIMEOUT, "node shutdown", node.shutdown())
        .await
        .unwrap()
        .unwrap();
}

/// A command for the Python participant's `hotel`, as a node would publish it.
fn hotel_command(
    saga_id: &str,
    attempt: u32,
    compensation: bool,
    reply_service: &str,
) -> v1::Command {
    let step = "book_hotel";
    let forward_key = format!("{saga_id}/{step}");
    v1::Command {
        command_id: if compensation {
            format!("{saga_id}/{step}/c{attempt}")
        } else {
            format!("{saga_id}/{step}/{attempt}")
        },
        idempotency_key: if compensation {
            format!("{forward_key}/compensate")
        } else {
            forward_key.clone()
        },
        saga_id: saga_id.into(),
        saga_name: "trip".into(),
        step: step.into(),
        service: "hotel".into(),
        action: if compensation { "cancel" } else { "book" }.into(),
        attempt,
        compensation,
        compensates_key: if compensation {
            forward_key
        } else {
            String::new()
        },
        input: trip("eve", 84_000).to_string().into_bytes(),
        // A partition no node has: the replies stay in SAGA_EVENTS, read by no node.
        reply_subject: format!("sagaflow.evt.9999.reply.{reply_service}"),
        deadline_unix_ms: 0,
    }
}

/// Publishes `cmd` as a node does (`Nats-Msg-Id`, `traceparent`) and waits until it is stored.
async fn publish(js: &jetstream::Context, cmd: v1::Command) {
    let mut headers = HeaderMap::new();
    headers.insert("Nats-Msg-Id", cmd.command_id.as_str());
    headers.insert("traceparent", TRACEPARENT);
    let subject = format!("sagaflow.cmd.{}.{}", cmd.service, cmd.action);
    let ack = within(
        TIMEOUT,
        "publish a command",
        js.publish_with_headers(subject, headers, cmd.encode_to_vec().into()),
    )
    .await
    .unwrap()
    .unwrap();
    within(TIMEOUT, "command stored", ack.into_future())
        .await
        .unwrap()
        .unwrap();
}

/// The next reply on `replies`, with its headers checked: `Nats-Msg-Id: reply/<command_id>`
/// and the command's `traceparent`, on hotel's reply subject.
async fn next_reply(replies: &mut async_nats::Subscriber, py: &PythonParticipant) -> v1::Reply {
    let Ok(Some(msg)) = within(TIMEOUT, "a reply", replies.next()).await else {
        panic!("no reply within {TIMEOUT:?}:\n{}", py.log())
    };
    let reply = v1::Reply::decode(msg.payload.as_ref()).unwrap();
    let headers = msg.headers.clone().unwrap_or_default();
    let header = |name: &str| headers.get(name).map(|v| v.as_str().to_string());
    assert_eq!(
        header("Nats-Msg-Id"),
        Some(format!("reply/{}", reply.command_id))
    );
    assert_eq!(header("traceparent").as_deref(), Some(TRACEPARENT));
    assert_eq!(msg.subject.as_str(), "sagaflow.evt.9999.reply.hotel");
    reply
}

const TRACEPARENT: &str = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";

/// Rule 4 and the refusals, with commands the test publishes itself: a compensation that
/// arrives first voids the forward key, the late forward command is answered `voided` (again
/// on a retry), a command whose reply subject is another service's is never answered, and a
/// repeat is answered from the ledger. Replies carry `Nats-Msg-Id: reply/<command_id>` and the
/// command's `traceparent`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_python_participant_voids_late_forward_commands_and_refuses_foreign_reply_subjects() {
    let nats = start_nats().await.unwrap();
    let node = TestNode::on(&nats)
        .id("python-protocol")
        .partitions(2)
        .without_demo()
        .start()
        .await
        .unwrap();
    let py = PythonParticipant::start(&nats.url(), &["hotel"]).await;
    let client = nats_client(&nats.url()).await.unwrap();
    let js = jetstream::new(client.clone());
    let mut replies = within(
        TIMEOUT,
        "subscribe to replies",
        client.subscribe("sagaflow.evt.9999.reply.>"),
    )
    .await
    .unwrap()
    .unwrap();
    within(TIMEOUT, "flush", client.flush())
        .await
        .unwrap()
        .unwrap();

    let failure = |reply: &v1::Reply| match &reply.outcome {
        Some(v1::reply::Outcome::Failure(f)) => (f.kind.clone(), f.message.clone()),
        other => panic!("a failure expected: {other:?}"),
    };
    let success = |reply: &v1::Reply| match &reply.outcome {
        Some(v1::reply::Outcome::Success(s)) => serde_json::from_slice::<Value>(&s.output).unwrap(),
        other => panic!("a success expected: {other:?}"),
    };

    // The compensation comes first (the forward command timed out at the orchestrator): it
    // voids the forward key and succeeds with nothing to undo.
    let voided = "py-void-1";
    publish(&js, hotel_command(voided, 1, true, "hotel")).await;
    let reply = next_reply(&mut replies, &py).await;
    assert_eq!(reply.command_id, format!("{voided}/book_hotel/c1"));
    assert!(reply.compensation && reply.saga_id == voided && reply.step == "book_hotel");
    assert_eq!(success(&reply)["undone"], Value::Null, "{reply:?}");
    // The late forward command, and its retry, are refused as voided.
    for attempt in [1, 2] {
        publish(&js, hotel_command(voided, attempt, false, "hotel")).await;
        let reply = next_reply(&mut replies, &py).await;
        assert_eq!(reply.command_id, format!("{voided}/book_hotel/{attempt}"));
        assert_eq!(reply.attempt, attempt);
        assert!(!reply.compensation);
        assert_eq!(
            failure(&reply),
            (
                "voided".to_string(),
                "compensated before it was applied".to_string()
            )
        );
    }

    // A command whose reply subject is another service's is not answered; the one after it is
    // (commands are handled in order, so by then the refused one was handled), and so is its
    // retry, from the ledger.
    let refused = "py-refused-1";
    publish(&js, hotel_command(refused, 1, false, "flight")).await;
    let booked = "py-book-1";
    publish(&js, hotel_command(booked, 1, false, "hotel")).await;
    let reply = next_reply(&mut replies, &py).await;
    assert_eq!(
        reply.command_id,
        format!("{booked}/book_hotel/1"),
        "the refused command got no reply"
    );
    let first = success(&reply);
    assert_eq!(first["traveller"], "eve");
    publish(&js, hotel_command(booked, 2, false, "hotel")).await;
    let reply = next_reply(&mut replies, &py).await;
    assert_eq!(reply.attempt, 2);
    assert_eq!(success(&reply), first, "a repeat gets the recorded answer");

    let ledger = ledger_of(&js, &["hotel"], voided).await;
    assert_eq!(
        outcomes(&ledger),
        expect(&[
            ("hotel py-void-1/book_hotel", "voided"),
            ("hotel py-void-1/book_hotel/compensate", "success"),
        ])
    );
    assert_eq!(
        outcomes(&ledger_of(&js, &["hotel"], booked).await),
        expect(&[("hotel py-book-1/book_hotel", "success")])
    );
    assert!(ledger_of(&js, &["hotel"], refused).await.is_empty());
    assert!(
        py.log().contains("another service's"),
        "the refusal is logged:\n{}",
        py.log()
    );

    let status = py.terminate().await;
    assert!(status.success(), "exit status {status:?}");
    within(TIMEOUT, "node shutdown", node.shutdown())
        .await
        .unwrap()
        .unwrap();
}
