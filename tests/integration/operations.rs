//! Operating sagas, end to end: retries with backoff and the progress an operator reads, a
//! non-retryable refusal, a compensation that parks its saga NEEDS_ATTENTION (dead letter,
//! `saga attention`, `dlq replay`), operator interventions from the CLI (skip, retry, cancel, and
//! the refusals), and a step timeout that falls due while the node is down.
//!
//! Against a real `nats-server` and an in-process node WITHOUT demo services, started from a
//! temporary saga directory holding the `ops*` sagas below. Every command is answered by a
//! participant written here against the raw wire protocol (`docs/participants.md`: a pull
//! consumer per service, `v1::Command` in, `v1::Reply` to `reply_subject`), whose behaviour per
//! action can be switched while a test runs.
use crate::common;

use std::collections::{HashMap, HashSet};
use std::process::Output;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::participant::{Handling, RawParticipant};
use common::*;
use futures::StreamExt;
use sagaflow::cli::render::time;
use sagaflow::clock::now_ms;
use sagaflow::node::NodeHandle;
use sagaflow_proto::v1::admin_service_client::AdminServiceClient;
use sagaflow_proto::v1::saga_service_client::SagaServiceClient;
use sagaflow_proto::v1::{
    self, DeadLetterEntry, GetDeadLetterRequest, GetSagaRequest, InterveneSagaRequest,
    ListDeadLettersRequest, StartSagaRequest,
};
use tonic::transport::Channel;
use tonic::Code;

/// Bound on waiting for a saga to get somewhere (its slowest step times out after 30 s).
const SAGA_TIMEOUT: Duration = Duration::from_secs(60);

/// Services the `ops*` sagas name; the participant serves them all.
const SERVICES: [&str; 4] = ["pay", "stock", "ship", "notify"];

// ---------------------------------------------------------------------------------------------
// The sagas under test (written to a temporary saga directory).
// ---------------------------------------------------------------------------------------------

/// `ops.toml`'s forward retry ceiling before attempt `n + 1` (300 ms × 2ⁿ⁻¹, at most 2 s).
fn ops_ceiling_ms(n: u32) -> i64 {
    (300_i64 << (n - 1)).min(2_000)
}

// ---------------------------------------------------------------------------------------------
// The participant: raw wire protocol, behaviour per action switchable at runtime.
// ---------------------------------------------------------------------------------------------

/// How the participant answers an action (`service.action`).
#[derive(Debug, Clone, Copy)]
enum Behaviour {
    /// Success (the default for an action without a rule).
    Succeed,
    /// Fail the first `n` attempts of each idempotency key with `kind`, then succeed.
    FailTimes(u32, &'static str),
    /// Fail every attempt with `kind`.
    Always(&'static str),
    /// Take the command (ack it) and never answer.
    Never,
}

/// A command as received (redeliveries included).
#[derive(Debug, Clone)]
struct Received {
    command_id: String,
    saga_id: String,
    step: String,
    /// `service.action`.
    action: String,
    attempt: u32,
    compensation: bool,
    /// When it was received (unix ms, this host's clock, as the node's).
    at_ms: i64,
}

/// What the participant decided for one command.
#[derive(Debug, Clone)]
enum Answer {
    Success(Vec<u8>),
    Failure { kind: String, message: String },
    Silence,
}

#[derive(Debug, Default)]
struct ParticipantState {
    /// By `service.action`, or `saga_id/service.action` for one saga (which wins).
    behaviours: HashMap<String, Behaviour>,
    /// Actions whose commands wait (unanswered) until released.
    held: HashSet<String>,
    /// Failures answered so far per idempotency key (for `FailTimes`).
    failures: HashMap<String, u32>,
    /// The answer to each command id: a redelivery is answered the same way.
    answers: HashMap<String, Answer>,
    received: Vec<Received>,
    /// When the reply to a command id was first sent (unix ms, just before publishing).
    answered_ms: HashMap<String, i64>,
}

impl ParticipantState {
    fn behaviour(&self, saga_id: &str, action: &str) -> Behaviour {
        self.behaviours
            .get(&format!("{saga_id}/{action}"))
            .or_else(|| self.behaviours.get(action))
            .copied()
            .unwrap_or(Behaviour::Succeed)
    }

    fn decide(&mut self, cmd: &v1::Command, action: &str) -> Answer {
        if let Some(answer) = self.answers.get(&cmd.command_id) {
            return answer.clone();
        }
        let fail = |kind: &str, message: String| Answer::Failure {
            kind: kind.to_string(),
            message,
        };
        let answer = match self.behaviour(&cmd.saga_id, action) {
            Behaviour::Succeed => Answer::Success(
                serde_json::json!({ "done": action, "attempt": cmd.attempt })
                    .to_string()
                    .into_bytes(),
            ),
            Behaviour::Never => Answer::Silence,
            Behaviour::Always(kind) => fail(kind, format!("{action} always fails ({kind})")),
            Behaviour::FailTimes(n, kind) => {
                let failed = self
                    .failures
                    .entry(cmd.idempotency_key.clone())
                    .or_insert(0);
                if *failed < n {
                    *failed += 1;
                    fail(kind, format!("{action} failure {failed} of {n}"))
                } else {
                    Answer::Success(
                        serde_json::json!({ "done": action, "attempt": cmd.attempt })
                            .to_string()
                            .into_bytes(),
                    )
                }
            }
        };
        self.answers.insert(cmd.command_id.clone(), answer.clone());
        answer
    }
}

/// The test participant ([`RawParticipant`]): each command handled in its own task, so a held
/// or silent command never delays the others.
struct Participant {
    state: Arc<Mutex<ParticipantState>>,
    raw: RawParticipant,
}

impl Participant {
    async fn start(nats_url: &str) -> Participant {
        let state = Arc::new(Mutex::new(ParticipantState::default()));
        let (receiving, answering) = (state.clone(), state.clone());
        let raw = RawParticipant::start(
            nats_url,
            SERVICES,
            Handling::Concurrent,
            move |cmd| {
                receiving.lock().unwrap().received.push(Received {
                    command_id: cmd.command_id.clone(),
                    saga_id: cmd.saga_id.clone(),
                    step: cmd.step.clone(),
                    action: format!("{}.{}", cmd.service, cmd.action),
                    attempt: cmd.attempt,
                    compensation: cmd.compensation,
                    at_ms: now_ms(),
                });
            },
            move |cmd| answer(cmd, answering.clone()),
        )
        .await;
        Participant { state, raw }
    }

    /// Answers `action` (`service.action`) this way from now on, for every saga.
    fn set(&self, action: &str, behaviour: Behaviour) {
        let mut s = self.state.lock().unwrap();
        s.behaviours.insert(action.to_string(), behaviour);
    }

    /// Answers `action` this way for `saga_id` only.
    fn set_for(&self, saga_id: &str, action: &str, behaviour: Behaviour) {
        let mut s = self.state.lock().unwrap();
        s.behaviours
            .insert(format!("{saga_id}/{action}"), behaviour);
    }

    /// Commands of `action` wait, unanswered, until [`Participant::release`].
    fn hold(&self, action: &str) {
        self.state.lock().unwrap().held.insert(action.to_string());
    }

    fn release(&self, action: &str) {
        self.state.lock().unwrap().held.remove(action);
    }

    /// The commands of `action` received for `saga_id`, in order.
    fn received(&self, saga_id: &str, action: &str) -> Vec<Received> {
        self.state
            .lock()
            .unwrap()
            .received
            .iter()
            .filter(|r| r.saga_id == saga_id && r.action == action)
            .cloned()
            .collect()
    }

    /// Distinct attempts of `action` received for `saga_id` (first receipt of each).
    fn attempts(&self, saga_id: &str, action: &str) -> Vec<Received> {
        let mut seen = HashSet::new();
        self.received(saga_id, action)
            .into_iter()
            .filter(|r| seen.insert(r.attempt))
            .collect()
    }

    fn answered_ms(&self, command_id: &str) -> Option<i64> {
        self.state
            .lock()
            .unwrap()
            .answered_ms
            .get(command_id)
            .copied()
    }

    /// Waits until attempt `attempt` of `action` was received for `saga_id`; returns it.
    async fn wait_received(&self, saga_id: &str, action: &str, attempt: u32) -> Received {
        let what = format!("{saga_id}: {action} attempt {attempt} received");
        let me = self;
        wait_until(SAGA_TIMEOUT, &what, move || async move {
            me.received(saga_id, action)
                .iter()
                .any(|r| r.attempt == attempt)
        })
        .await
        .unwrap_or_else(|e| panic!("{e}; received: {:?}", self.log(saga_id)));
        self.received(saga_id, action)
            .into_iter()
            .find(|r| r.attempt == attempt)
            .unwrap()
    }

    /// What `saga_id` sent, in words (for failure messages).
    fn log(&self, saga_id: &str) -> Vec<String> {
        self.state
            .lock()
            .unwrap()
            .received
            .iter()
            .filter(|r| r.saga_id == saga_id)
            .map(|r| {
                let c = if r.compensation {
                    " (compensation)"
                } else {
                    ""
                };
                format!("{} {} #{}{c} at {}", r.step, r.action, r.attempt, r.at_ms)
            })
            .collect()
    }
}

/// The answer to `cmd`: once its action is no longer held (bounded), what the state decides.
async fn answer(
    cmd: v1::Command,
    state: Arc<Mutex<ParticipantState>>,
) -> Option<v1::reply::Outcome> {
    let action = format!("{}.{}", cmd.service, cmd.action);
    let held_until = tokio::time::Instant::now() + SAGA_TIMEOUT;
    while state.lock().unwrap().held.contains(&action) && tokio::time::Instant::now() < held_until {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let mut s = state.lock().unwrap();
    let outcome = match s.decide(&cmd, &action) {
        Answer::Success(output) => v1::reply::Outcome::Success(v1::Success { output }),
        Answer::Failure { kind, message } => {
            v1::reply::Outcome::Failure(v1::Failure { kind, message })
        }
        // Taken, never answered: the node's step timeout decides.
        Answer::Silence => return None,
    };
    s.answered_ms
        .entry(cmd.command_id.clone())
        .or_insert_with(now_ms);
    Some(outcome)
}

// ---------------------------------------------------------------------------------------------
// The node, its clients, the CLI.
// ---------------------------------------------------------------------------------------------

/// A node without demo services over the `ops*` sagas (`tests/fixtures/sagas/ops/`). Every
/// revision of a saga is kept (`kv_history` 64), so `WatchSaga` sees each one, however
/// quickly they follow each other.
fn test_node(nats: &NatsServer) -> TestNode {
    TestNode::on(nats)
        .id("ops-1")
        .partitions(4)
        .env("SAGAFLOW_STREAMS__KV_HISTORY", "64")
        .saga_dir(fixture_sagas("ops"))
        .without_demo()
}

/// NATS, a node over the `ops*` sagas, the participant, and gRPC clients.
struct Ops {
    participant: Participant,
    sagas: SagaServiceClient<Channel>,
    admin: AdminServiceClient<Channel>,
    node: Option<NodeHandle>,
    nats: NatsServer,
}

impl Ops {
    async fn start() -> Ops {
        let nats = start_nats().await.unwrap();
        let node = Self::start_node(&nats).await;
        let participant = Participant::start(&nats.url()).await;
        let addr = node.grpc_addr.to_string();
        let sagas = connect_sagas(&addr).await.unwrap();
        let admin = AdminServiceClient::new(channel(&addr).await.unwrap());
        Ops {
            participant,
            sagas,
            admin,
            node: Some(node),
            nats,
        }
    }

    async fn start_node(nats: &NatsServer) -> NodeHandle {
        let node = test_node(nats).start().await.unwrap();
        assert!(node.demo().is_none(), "the node must not run demo services");
        node
    }

    /// `127.0.0.1:PORT` of the running node, as the CLI's `--server` takes it.
    fn server(&self) -> String {
        self.node.as_ref().unwrap().grpc_addr.to_string()
    }

    /// Shuts the node down gracefully.
    async fn shutdown_node(&mut self) {
        let node = self.node.take().unwrap();
        within(Duration::from_secs(90), "node shutdown", node.shutdown())
            .await
            .unwrap()
            .unwrap();
    }

    /// Starts a new node on the same NATS and saga directory, and reconnects the clients.
    async fn start_new_node(&mut self) {
        let node = Self::start_node(&self.nats).await;
        let addr = node.grpc_addr.to_string();
        self.sagas = connect_sagas(&addr).await.unwrap();
        self.admin = AdminServiceClient::new(channel(&addr).await.unwrap());
        self.node = Some(node);
    }

    async fn stop(mut self) {
        let undecodable = self.participant.raw.undecodable();
        assert_eq!(undecodable, 0, "every command decodes as a v1::Command");
        if self.node.is_some() {
            self.shutdown_node().await;
        }
    }

    async fn start_saga(&self, saga_name: &str, saga_id: &str) {
        let r = within(
            TIMEOUT,
            "StartSaga",
            self.sagas.clone().start_saga(StartSagaRequest {
                saga_name: saga_name.into(),
                saga_id: saga_id.into(),
                input_json: serde_json::json!({ "customer": saga_id, "amount_cents": 4_200 })
                    .to_string(),
            }),
        )
        .await
        .unwrap()
        .unwrap()
        .into_inner();
        assert!(r.created, "{saga_id} is new");
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
            let mut sagas = self.sagas.clone();
            let last = last.clone();
            let id = saga_id.to_string();
            async move {
                let Ok(saga) = sagas.get_saga(GetSagaRequest { saga_id: id }).await else {
                    return false;
                };
                let saga = saga.into_inner();
                let done = ok(&saga);
                *last.lock().unwrap() = Some(saga);
                done
            }
        })
        .await;
        let last = last.lock().unwrap().clone();
        if let Err(e) = result {
            panic!(
                "{e}\nlast state: {last:#?}\nparticipant saw: {:?}",
                self.participant.log(saga_id)
            );
        }
        last.unwrap()
    }

    async fn wait_terminal(&self, saga_id: &str) -> v1::Saga {
        self.wait_saga(saga_id, "terminal", |s| s.terminal).await
    }

    /// Dead letters of parked sagas.
    async fn parked_dead_letters(&self) -> Vec<DeadLetterEntry> {
        within(
            TIMEOUT,
            "ListDeadLetters",
            self.admin
                .clone()
                .list_dead_letters(ListDeadLettersRequest {
                    source: "saga".into(),
                    ..Default::default()
                }),
        )
        .await
        .unwrap()
        .unwrap()
        .into_inner()
        .entries
    }

    /// Waits until dead letters of parked sagas are listed; returns them.
    async fn wait_parked_dead_letters(&self) -> Vec<DeadLetterEntry> {
        let found: Arc<Mutex<Vec<DeadLetterEntry>>> = Arc::default();
        let (me, seen) = (self, found.clone());
        wait_until(SAGA_TIMEOUT, "dead letters of parked sagas", move || {
            let seen = seen.clone();
            async move {
                let entries = me.parked_dead_letters().await;
                let any = !entries.is_empty();
                *seen.lock().unwrap() = entries;
                any
            }
        })
        .await
        .unwrap();
        let found = found.lock().unwrap().clone();
        found
    }

    /// `InterveneSaga` as the API answers it.
    async fn intervene(
        &self,
        saga_id: &str,
        action: &str,
        step: &str,
        operator: &str,
    ) -> Result<v1::InterveneSagaResponse, tonic::Status> {
        within(
            TIMEOUT,
            "InterveneSaga",
            self.sagas.clone().intervene_saga(InterveneSagaRequest {
                saga_id: saga_id.into(),
                action: action.into(),
                step: step.into(),
                operator: operator.into(),
                ..Default::default()
            }),
        )
        .await
        .unwrap()
        .map(tonic::Response::into_inner)
    }
}

/// Runs `sagaflow COMMAND` (split on whitespace: no argument here contains any), off the
/// runtime's threads and bounded.
async fn cli(command: &str) -> Output {
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

/// Runs the CLI and expects success; returns stdout.
async fn cli_ok(command: &str) -> String {
    let out = cli(command).await;
    assert!(
        out.status.success(),
        "sagaflow {command} failed ({:?}): {}{}",
        out.status,
        text(&out.stdout),
        text(&out.stderr)
    );
    text(&out.stdout)
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

fn step<'a>(saga: &'a v1::Saga, name: &str) -> &'a v1::StepStatus {
    saga.steps
        .iter()
        .find(|s| s.name == name)
        .unwrap_or_else(|| panic!("no step {name} in {saga:#?}"))
}

/// History entries of `step` (empty: the saga's own) whose text starts with `prefix`.
fn history<'a>(saga: &'a v1::Saga, step: &str, prefix: &str) -> Vec<&'a v1::HistoryEntry> {
    saga.history
        .iter()
        .filter(|h| h.step == step && h.what.starts_with(prefix))
        .collect()
}

/// The one history entry of `step` starting with `prefix`.
fn entry<'a>(saga: &'a v1::Saga, step: &str, prefix: &str) -> &'a v1::HistoryEntry {
    let found = history(saga, step, prefix);
    assert_eq!(
        found.len(),
        1,
        "one `{prefix}` entry of step {step:?} expected: {:#?}",
        saga.history
    );
    found[0]
}

/// The `at` of a "attempt N scheduled at AT" history entry.
fn scheduled_at(h: &v1::HistoryEntry) -> i64 {
    h.what
        .rsplit(' ')
        .next()
        .and_then(|at| at.parse().ok())
        .unwrap_or_else(|| panic!("not a RetryScheduled entry: {h:?}"))
}

// ---------------------------------------------------------------------------------------------
// 1. Retries: attempts, backoff, and the progress an operator reads while the saga waits.
// ---------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn transient_failures_are_retried_with_backoff_and_the_wait_is_reported() {
    let ops = Ops::start().await;
    let id = "ops-flaky-1";
    let p = &ops.participant;
    p.set("pay.charge", Behaviour::FailTimes(2, "unavailable"));
    // The first charge waits until the watch below is open, so it sees every revision.
    p.hold("pay.charge");
    ops.start_saga("ops", id).await;
    p.wait_received(id, "pay.charge", 1).await;
    let watch = within(
        TIMEOUT,
        "WatchSaga",
        ops.sagas
            .clone()
            .watch_saga(GetSagaRequest { saga_id: id.into() }),
    )
    .await
    .unwrap()
    .unwrap()
    .into_inner();
    p.release("pay.charge");
    let updates: Vec<v1::Saga> = within(
        SAGA_TIMEOUT,
        "watch the saga to its end",
        watch.map(Result::unwrap).collect(),
    )
    .await
    .unwrap();

    let saga = ops.get(id).await;
    assert_eq!(saga.status, "DONE", "{saga:#?}");
    assert_eq!(saga.phase, "COMPLETED");
    assert!(saga.terminal && saga.reason.is_empty(), "{saga:#?}");
    assert!(
        updates.last().is_some_and(|u| u.terminal),
        "the watch ends terminal"
    );
    let charge = step(&saga, "charge");
    assert_eq!(charge.state, "SUCCEEDED", "{charge:?}");
    assert_eq!(charge.attempts, 3, "two transient failures, then success");
    assert_eq!(charge.next_attempt_at_unix_ms, 0, "no retry pending");
    assert!(
        saga.progress.starts_with("finished COMPLETED"),
        "{}",
        saga.progress
    );
    for name in ["reserve", "ship"] {
        assert_eq!(step(&saga, name).attempts, 1, "{name}");
    }
    assert!(saga.compensations.is_empty());

    // The history: two failed attempts, each followed by a scheduled retry whose delay is drawn
    // within the policy's ceiling, and each retry sent no earlier than scheduled.
    let failures = history(&saga, "charge", "attempt ")
        .into_iter()
        .filter(|h| h.what.contains(" failed: "))
        .count();
    assert_eq!(failures, 2, "{:#?}", saga.history);
    let received = p.attempts(id, "pay.charge");
    assert_eq!(
        received.iter().map(|r| r.attempt).collect::<Vec<_>>(),
        [1, 2, 3],
        "{received:?}"
    );
    for n in 1..=2u32 {
        let fail = entry(
            &saga,
            "charge",
            &format!("attempt {n} failed: unavailable: "),
        );
        let retry = entry(&saga, "charge", &format!("attempt {} scheduled at ", n + 1));
        let sent = entry(&saga, "charge", &format!("attempt {} sent", n + 1));
        let at = scheduled_at(retry);
        let delay = at - retry.at_unix_ms;
        assert_eq!(
            retry.at_unix_ms, fail.at_unix_ms,
            "scheduled when attempt {n} failed"
        );
        assert!(
            (0..=ops_ceiling_ms(n)).contains(&delay),
            "retry {} drawn at +{delay} ms, outside [0, {}]",
            n + 1,
            ops_ceiling_ms(n)
        );
        assert!(
            sent.at_unix_ms >= at,
            "attempt {} sent before its time",
            n + 1
        );
        // Seen from the participant: its failure reply, then the next attempt no earlier than
        // scheduled and no later than the ceiling plus slack for a loaded machine.
        let replied = p.answered_ms(&received[n as usize - 1].command_id).unwrap();
        let next = &received[n as usize];
        assert!(
            fail.at_unix_ms >= replied,
            "the node saw the failure after it was sent"
        );
        assert!(
            next.at_ms >= at,
            "attempt {} received before its time",
            n + 1
        );
        let gap = next.at_ms - replied;
        let slack = 3_000;
        assert!(
            gap <= ops_ceiling_ms(n) + slack,
            "attempt {} came {gap} ms after the failure of attempt {n}: more than the \
             {} ms ceiling plus {slack} ms",
            n + 1,
            ops_ceiling_ms(n)
        );
        assert_ne!(received[n as usize - 1].command_id, next.command_id);
    }

    // While it waited, the API said so: the step's next attempt time and, in words, what comes.
    for n in 1..=2u32 {
        let retry = entry(&saga, "charge", &format!("attempt {} scheduled at ", n + 1));
        let at = scheduled_at(retry);
        let waiting = updates
            .iter()
            .find(|u| {
                let c = step(u, "charge");
                c.state == "RETRY_WAIT" && c.attempts == n
            })
            .unwrap_or_else(|| panic!("no RETRY_WAIT after attempt {n} in {updates:#?}"));
        let c = step(waiting, "charge");
        assert_eq!(c.next_attempt_at_unix_ms, at, "{c:?}");
        assert_eq!(c.last_error_kind, "unavailable");
        let expected = format!(
            "retrying `charge` (pay.charge): attempt {} of 5 at {} after unavailable: {}",
            n + 1,
            time(at),
            c.last_error
        );
        assert_eq!(waiting.progress, expected);
        assert!(!waiting.terminal && !waiting.stuck, "{waiting:#?}");
        assert!(waiting.stuck_at_unix_ms > at, "{waiting:#?}");
    }
    // ... and while an attempt was out, when it times out.
    let running = updates
        .iter()
        .find(|u| step(u, "reserve").state == "RUNNING")
        .unwrap();
    assert!(
        running
            .progress
            .starts_with("waiting for `reserve` (stock.reserve): attempt 1 of 5, times out at "),
        "{}",
        running.progress
    );
    ops.stop().await;
}

// ---------------------------------------------------------------------------------------------
// 2. A non-retryable refusal compensates at once.
// ---------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_declined_charge_is_not_retried_and_compensates_at_once() {
    let ops = Ops::start().await;
    let id = "ops-declined-1";
    ops.participant
        .set("pay.charge", Behaviour::Always("declined"));
    ops.start_saga("ops", id).await;
    let saga = ops.wait_terminal(id).await;

    assert_eq!(saga.status, "UNDONE", "{saga:#?}");
    assert_eq!(saga.phase, "COMPENSATED");
    assert!(
        saga.reason
            .starts_with("step `charge` (pay.charge) failed: declined: "),
        "{}",
        saga.reason
    );
    let charge = step(&saga, "charge");
    assert_eq!(charge.state, "FAILED", "{charge:?}");
    assert_eq!(charge.attempts, 1, "a non-retryable kind is not retried");
    assert_eq!(charge.last_error_kind, "declined");
    assert_eq!(charge.compensation_attempts, 0, "nothing was charged");
    assert!(
        history(&saga, "charge", "attempt 2").is_empty(),
        "{:#?}",
        saga.history
    );
    assert!(
        !saga.history.iter().any(|h| h.what.contains("scheduled at")),
        "no retry scheduled: {:#?}",
        saga.history
    );
    assert_eq!(
        entry(&saga, "charge", "step failed for good").step,
        "charge"
    );
    for name in ["reserve", "ship"] {
        assert_eq!(step(&saga, name).state, "SKIPPED", "{name}");
    }
    assert_eq!(step(&saga, "notify").state, "SUCCEEDED");
    assert!(saga.compensations.is_empty(), "{:?}", saga.compensations);

    let p = &ops.participant;
    assert_eq!(p.attempts(id, "pay.charge").len(), 1);
    assert!(p.received(id, "pay.refund").is_empty());
    assert!(p.received(id, "stock.reserve").is_empty());
    assert_eq!(p.attempts(id, "notify.customer").len(), 1);
    ops.stop().await;
}

// ---------------------------------------------------------------------------------------------
// 3. An exhausted compensation parks the saga; replaying its dead letter resumes it.
// ---------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_exhausted_compensation_parks_the_saga_until_its_dead_letter_is_replayed() {
    let ops = Ops::start().await;
    let id = "ops-parked-1";
    let p = &ops.participant;
    p.set("stock.reserve", Behaviour::Always("out_of_stock"));
    p.set("pay.refund", Behaviour::Always("unavailable"));
    ops.start_saga("ops", id).await;

    let saga = ops
        .wait_saga(id, "parked", |s| s.phase == "NEEDS_ATTENTION")
        .await;
    assert_eq!(
        saga.status, "NEEDS_ATTENTION",
        "the default label: {saga:#?}"
    );
    assert!(!saga.terminal, "parked is not the end");
    assert!(
        saga.reason
            .starts_with("step `reserve` (stock.reserve) failed: out_of_stock: "),
        "why it compensated comes first: {}",
        saga.reason
    );
    assert!(
        saga.reason.contains(
            "; compensation `pay.refund` of step `charge` failed after 2 attempt(s): unavailable: "
        ),
        "{}",
        saga.reason
    );
    assert!(
        saga.progress
            .starts_with("needs attention: compensation `pay.refund`"),
        "{}",
        saga.progress
    );
    assert!(saga.progress.contains(id), "{}", saga.progress);
    assert!(!saga.stuck && saga.stuck_at_unix_ms == 0, "{saga:#?}");
    let charge = step(&saga, "charge");
    assert_eq!(charge.state, "COMPENSATION_FAILED", "{charge:?}");
    assert_eq!(charge.compensation_attempts, 2, "the refund's budget");
    assert_eq!(
        charge.next_attempt_at_unix_ms, 0,
        "no timer runs while parked"
    );
    assert_eq!(step(&saga, "notify").state, "PENDING");
    assert_eq!(p.attempts(id, "pay.refund").len(), 2);
    assert_eq!(
        history(
            &saga,
            "",
            "parked NEEDS_ATTENTION: compensation `pay.refund`"
        )
        .len(),
        1,
        "{:#?}",
        saga.history
    );

    // Operators find it: `saga attention`, all sagas or this definition's, but not another's.
    let server = ops.server();
    for filter in ["", "--saga ops"] {
        let out = cli_ok(&format!("saga attention --server {server} --json {filter}")).await;
        let json: serde_json::Value = serde_json::from_str(&out).unwrap();
        let listed = json["sagas"].as_array().unwrap();
        assert_eq!(listed.len(), 1, "{json}");
        assert_eq!(listed[0]["saga_id"], id);
        assert_eq!(listed[0]["phase"], "NEEDS_ATTENTION");
        assert_eq!(listed[0]["status"], "NEEDS_ATTENTION");
        assert_eq!(listed[0]["progress"], saga.progress.as_str());
    }
    let out = cli_ok(&format!(
        "saga attention --server {server} --saga ops_slow --json"
    ))
    .await;
    let json: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(json["sagas"].as_array().unwrap().len(), 0, "{json}");
    let out = cli_ok(&format!("saga attention --server {server}")).await;
    assert!(out.contains(id) && out.contains("NEEDS_ATTENTION"), "{out}");

    // A dead letter says so.
    let dead = ops.wait_parked_dead_letters().await;
    assert_eq!(dead.len(), 1, "{dead:#?}");
    let letter = &dead[0];
    assert_eq!(letter.source, "saga");
    assert!(
        letter.subject.starts_with("sagaflow.evt.") && letter.subject.ends_with(".intervene"),
        "{letter:?}"
    );
    assert!(
        letter.reason.starts_with(&format!(
            "saga `{id}` parked NEEDS_ATTENTION: step `reserve`"
        )),
        "{letter:?}"
    );
    assert!(letter.reason.contains("pay.refund"), "{letter:?}");
    let shown = within(
        TIMEOUT,
        "GetDeadLetter",
        ops.admin
            .clone()
            .get_dead_letter(GetDeadLetterRequest { seq: letter.seq }),
    )
    .await
    .unwrap()
    .unwrap()
    .into_inner();
    assert_eq!(
        shown.headers.get("Sagaflow-Dlq-Source").map(String::as_str),
        Some("saga"),
        "{:?}",
        shown.headers
    );
    // The event a replay publishes names its saga in a header (its subject does not).
    assert_eq!(
        shown.headers.get("Sagaflow-Saga-Id").map(String::as_str),
        Some(id),
        "{:?}",
        shown.headers
    );

    // The refund works again; the replay retries it with a fresh budget and the saga goes on.
    p.set("pay.refund", Behaviour::Succeed);
    let seq = letter.seq.to_string();
    let out = cli_ok(&format!(
        "dlq replay {seq} --operator ops --server {server}"
    ))
    .await;
    assert!(
        out.starts_with(&format!("replayed dead letter {seq} to {}", letter.subject)),
        "{out}"
    );
    let saga = ops.wait_terminal(id).await;
    assert_eq!(saga.status, "UNDONE", "{saga:#?}");
    assert_eq!(saga.phase, "COMPENSATED");
    let charge = step(&saga, "charge");
    assert_eq!(charge.state, "COMPENSATED", "{charge:?}");
    assert_eq!(charge.compensation_attempts, 3, "{charge:?}");
    assert_eq!(step(&saga, "notify").state, "SUCCEEDED");
    let trail: Vec<(&str, &str)> = saga
        .compensations
        .iter()
        .map(|c| (c.step.as_str(), c.state.as_str()))
        .collect();
    assert_eq!(trail, [("charge", "COMPENSATED")]);
    // The replay is journaled as an operator's retry of the parked compensation.
    // The operator who replayed it is credited in the saga's history.
    let replayed = entry(
        &saga,
        "charge",
        "operator `ops`: retry (replay of dead letter SAGA_DLQ:",
    );
    let parked = &history(&saga, "", "parked NEEDS_ATTENTION")[0];
    assert!(replayed.at_unix_ms >= parked.at_unix_ms);
    assert_eq!(
        entry(&saga, "charge", "compensation attempt 3 sent").at_unix_ms,
        replayed.at_unix_ms
    );
    assert_eq!(
        p.attempts(id, "pay.refund").len(),
        3,
        "no timer ran while parked"
    );
    assert!(
        p.received(id, "stock.release").is_empty(),
        "nothing was reserved"
    );

    // The dead letter is gone; the journal says who replayed it.
    assert!(ops.parked_dead_letters().await.is_empty());
    let err = ops
        .admin
        .clone()
        .get_dead_letter(GetDeadLetterRequest { seq: letter.seq })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::NotFound);
    let journal: Vec<_> = within(
        TIMEOUT,
        "ListDeadLetters",
        ops.admin.clone().list_dead_letters(ListDeadLettersRequest {
            include_journal: true,
            ..Default::default()
        }),
    )
    .await
    .unwrap()
    .unwrap()
    .into_inner()
    .entries
    .into_iter()
    .filter_map(|e| e.journal)
    .map(|j| (j.dead_letter_seq, j.action, j.operator))
    .collect();
    assert_eq!(
        journal,
        [(letter.seq, "replay".to_string(), "ops".to_string())]
    );
    // Nothing needs attention any more.
    let out = cli_ok(&format!("saga attention --server {server} --json")).await;
    let json: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(json["sagas"].as_array().unwrap().len(), 0, "{json}");
    ops.stop().await;
}

/// Resuming a parked saga from the CLI (not by replaying its dead letter) settles its dead
/// letter in the journal; a retry that fails again parks it again with a new one; the status
/// goes back to what it was while it runs; a repeated request id answers the first outcome.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_parked_saga_resumed_from_the_cli_settles_its_dead_letters() {
    let ops = Ops::start().await;
    let id = "ops-parked-2";
    let p = &ops.participant;
    p.set("stock.reserve", Behaviour::Always("out_of_stock"));
    p.set("pay.refund", Behaviour::Always("unavailable"));
    ops.start_saga("ops", id).await;
    ops.wait_saga(id, "parked", |s| s.phase == "NEEDS_ATTENTION")
        .await;
    let first = ops.wait_parked_dead_letters().await;
    assert_eq!(first.len(), 1, "{first:#?}");
    let server = ops.server();

    // The refund still fails: the retry spends a fresh budget of 2 and parks the saga again.
    let out = cli_ok(&format!(
        "saga retry {id} --server {server} --operator dave --reason bank-says-fixed"
    ))
    .await;
    assert!(
        out.starts_with("retry applied to saga ops-parked-2"),
        "{out}"
    );
    let saga = ops
        .wait_saga(id, "parked again", |s| {
            s.phase == "NEEDS_ATTENTION"
                && s.history
                    .iter()
                    .filter(|h| h.what.starts_with("parked"))
                    .count()
                    == 2
        })
        .await;
    assert_eq!(
        p.attempts(id, "pay.refund").len(),
        4,
        "2 + a fresh budget of 2"
    );
    assert_eq!(step(&saga, "charge").compensation_attempts, 4);
    // While it ran again its status was the one before parking, not NEEDS_ATTENTION.
    let resumed = saga
        .history
        .iter()
        .position(|h| h.what == "resumed by an operator")
        .expect("a resumed entry");
    let next_status = saga.history[resumed..]
        .iter()
        .find(|h| h.what.starts_with("status "))
        .expect("a status change after resuming");
    assert_eq!(next_status.what, "status PAID", "{:#?}", saga.history);
    // The reason names the second parking once, not nested.
    assert_eq!(
        saga.reason.matches("failed after").count(),
        1,
        "{}",
        saga.reason
    );
    assert!(
        saga.reason.contains("failed after 2 attempt(s)"),
        "{}",
        saga.reason
    );
    // One dead letter: the first was settled when dave resumed the saga, a new one written.
    let dead = ops.wait_parked_dead_letters().await;
    assert_eq!(dead.len(), 1, "{dead:#?}");
    assert_ne!(dead[0].seq, first[0].seq);

    // The refund was made by hand: skip it, with a request id, twice. A skipped compensation
    // keeps no result: one given is refused, not dropped.
    p.set("pay.refund", Behaviour::Succeed);
    let out = cli(&format!(
        "saga skip {id} --step charge --result {{\"refund\":\"manual\"}} --server {server} --operator erin"
    ))
    .await;
    assert_eq!(out.status.code(), Some(1), "{}", text(&out.stdout));
    assert!(
        text(&out.stderr).starts_with(
            "error: failed_precondition: skip: skipping step `charge` (COMPENSATION_FAILED) counts its compensation as done and records no result"
        ),
        "{}",
        text(&out.stderr)
    );
    let skip =
        format!("saga skip {id} --step charge --request-id r-1 --server {server} --operator erin");
    let out = cli_ok(&skip).await;
    assert!(
        out.starts_with("skip applied to saga ops-parked-2 (request r-1)"),
        "{out}"
    );
    let saga = ops.wait_terminal(id).await;
    assert_eq!(saga.status, "UNDONE", "{saga:#?}");
    assert!(
        !saga.reason.contains("failed after"),
        "back to why it compensated: {}",
        saga.reason
    );
    let again = cli_ok(&skip).await;
    assert!(
        again.starts_with("skip applied to saga ops-parked-2 (request r-1)"),
        "{again}"
    );
    assert_eq!(
        history(&saga, "charge", "operator `erin`: skip").len(),
        1,
        "{:#?}",
        saga.history
    );
    assert_eq!(p.attempts(id, "pay.refund").len(), 4, "skipped, not sent");

    // No dead letter left to replay; the journal says who settled each and how.
    assert!(ops.parked_dead_letters().await.is_empty());
    let journal: Vec<(u64, String, String)> = within(
        TIMEOUT,
        "ListDeadLetters",
        ops.admin.clone().list_dead_letters(ListDeadLettersRequest {
            include_journal: true,
            ..Default::default()
        }),
    )
    .await
    .unwrap()
    .unwrap()
    .into_inner()
    .entries
    .into_iter()
    .filter_map(|e| e.journal)
    .map(|j| (j.dead_letter_seq, j.action, j.operator))
    .collect();
    assert_eq!(
        journal,
        [
            (first[0].seq, "resolved".to_string(), "dave".to_string()),
            (dead[0].seq, "resolved".to_string(), "erin".to_string()),
        ]
    );
    ops.stop().await;
}

// ---------------------------------------------------------------------------------------------
// 4. Operators act from the CLI: skip, retry, cancel; and what is refused.
// ---------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_operator_skips_a_silent_step_with_a_result() {
    let ops = Ops::start().await;
    let id = "ops-skip-1";
    ops.participant.set("ship.send", Behaviour::Never);
    ops.start_saga("ops", id).await;
    ops.participant.wait_received(id, "ship.send", 1).await;

    let server = ops.server();
    let result = r#"{"tracking":"T1"}"#;
    let out = cli_ok(&format!(
        "saga skip {id} --step ship --result {result} --operator alice --reason manual \
         --server {server}"
    ))
    .await;
    assert!(
        out.starts_with(&format!("skip applied to saga {id} (request ")),
        "{out}"
    );
    assert!(out.contains("now DONE (COMPLETED)"), "{out}");

    let saga = ops.get(id).await;
    assert_eq!(saga.status, "DONE", "{saga:#?}");
    assert_eq!(saga.phase, "COMPLETED");
    assert!(saga.terminal);
    let ship = step(&saga, "ship");
    assert_eq!(ship.state, "SUCCEEDED", "{ship:?}");
    assert_eq!(ship.attempts, 1);
    assert_eq!(
        serde_json::from_str::<serde_json::Value>(&ship.output_json).unwrap(),
        serde_json::json!({ "tracking": "T1" })
    );
    let journaled = entry(&saga, "ship", "operator `alice`: skip");
    assert_eq!(journaled.what, "operator `alice`: skip (manual)");
    assert_eq!(ops.participant.attempts(id, "ship.send").len(), 1);
    ops.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_operator_retry_sends_the_next_attempt_at_once() {
    let ops = Ops::start().await;
    let id = "ops-retry-1";
    let p = &ops.participant;
    p.set("pay.charge", Behaviour::FailTimes(1, "unavailable"));
    ops.start_saga("ops_slow", id).await;

    let saga = ops
        .wait_saga(id, "charge waits to retry", |s| {
            step(s, "charge").state == "RETRY_WAIT"
        })
        .await;
    let charge = step(&saga, "charge");
    let next_at = charge.next_attempt_at_unix_ms;
    let retry = entry(&saga, "charge", "attempt 2 scheduled at ");
    assert_eq!(scheduled_at(retry), next_at);
    // The delay is drawn in [0, 1h] from the saga id; this id draws a long one.
    assert!(
        next_at - retry.at_unix_ms >= 60_000,
        "{id} draws a backoff of only {} ms; pick another id",
        next_at - retry.at_unix_ms
    );
    assert_eq!(
        saga.progress,
        format!(
            "retrying `charge` (pay.charge): attempt 2 of 3 at {} after unavailable: {}",
            time(next_at),
            charge.last_error
        )
    );

    let server = ops.server();
    let out = cli_ok(&format!(
        "saga retry {id} --operator bob --server {server} --json"
    ))
    .await;
    let json: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(json["applied"], true, "{json}");
    assert_eq!(json["refused"], "", "{json}");
    assert_eq!(json["saga_id"], id);

    let second = p.wait_received(id, "pay.charge", 2).await;
    assert!(
        second.at_ms < next_at - 30_000,
        "attempt 2 came at {} although scheduled for {next_at}",
        second.at_ms
    );
    let saga = ops.wait_terminal(id).await;
    assert_eq!(saga.status, "DONE", "{saga:#?}");
    let charge = step(&saga, "charge");
    assert_eq!(charge.state, "SUCCEEDED");
    assert_eq!(charge.attempts, 2);
    let retried = entry(&saga, "charge", "operator `bob`: retry");
    assert_eq!(retried.what, "operator `bob`: retry");
    assert_eq!(
        entry(&saga, "charge", "attempt 2 sent").at_unix_ms,
        retried.at_unix_ms,
        "sent when the operator's retry was applied"
    );
    assert_eq!(p.attempts(id, "pay.charge").len(), 2);
    ops.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_operator_cancels_a_hanging_saga_and_it_compensates() {
    let ops = Ops::start().await;
    let id = "ops-cancel-1";
    let p = &ops.participant;
    p.set("stock.reserve", Behaviour::Never);
    ops.start_saga("ops", id).await;
    p.wait_received(id, "stock.reserve", 1).await;

    let server = ops.server();
    let out = cli_ok(&format!(
        "saga cancel {id} --operator carol --server {server}"
    ))
    .await;
    assert!(out.starts_with("cancel applied to saga"), "{out}");

    // The reservation in flight times out (its outcome unknown), then both steps are undone.
    let saga = ops.wait_terminal(id).await;
    assert_eq!(saga.status, "UNDONE", "{saga:#?}");
    assert_eq!(saga.phase, "COMPENSATED");
    assert_eq!(saga.reason, "cancelled by operator `carol`");
    let cancelled = entry(&saga, "", "operator `carol`: cancel");
    assert_eq!(cancelled.what, "operator `carol`: cancel");
    let trail: Vec<(&str, &str)> = saga
        .compensations
        .iter()
        .map(|c| (c.step.as_str(), c.state.as_str()))
        .collect();
    assert_eq!(
        trail,
        [("reserve", "COMPENSATED"), ("charge", "COMPENSATED")]
    );
    assert_eq!(step(&saga, "ship").state, "SKIPPED");
    assert_eq!(step(&saga, "notify").state, "SUCCEEDED");
    // No attempt started once the cancel was applied (the one in flight ran to its timeout).
    let reserve = step(&saga, "reserve");
    assert_eq!(reserve.last_error_kind, "timeout", "{reserve:?}");
    let cancelled_at = saga.history.iter().position(|h| h == cancelled).unwrap();
    assert!(
        !saga.history[cancelled_at..]
            .iter()
            .any(|h| h.step == "reserve"
                && h.what.starts_with("attempt ")
                && h.what.ends_with(" sent")),
        "{:#?}",
        saga.history
    );
    assert_eq!(
        p.attempts(id, "stock.reserve").len() as u32,
        reserve.attempts
    );
    assert_eq!(p.attempts(id, "stock.release").len(), 1);
    assert_eq!(p.attempts(id, "pay.refund").len(), 1);
    assert!(p.received(id, "ship.send").is_empty());
    ops.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn interventions_that_do_not_apply_are_refused() {
    let ops = Ops::start().await;
    let done = "ops-done-1";
    ops.start_saga("ops", done).await;
    let saga = ops.wait_terminal(done).await;
    assert_eq!(saga.status, "DONE", "{saga:#?}");
    let server = ops.server();

    // The CLI: cancelling a finished saga fails with the API's reason.
    let out = cli(&format!(
        "saga cancel {done} --operator carol --server {server}"
    ))
    .await;
    assert_eq!(out.status.code(), Some(1), "{}", text(&out.stderr));
    let stderr = text(&out.stderr);
    assert!(
        stderr.starts_with("error: failed_precondition: cancel: the saga has finished (COMPLETED)"),
        "{stderr}"
    );
    // A result that is not JSON is a usage error, before anything is sent.
    let out = cli(&format!(
        "saga skip {done} --step ship --result {{not-json --operator alice --server {server}"
    ))
    .await;
    assert_eq!(out.status.code(), Some(2), "{}", text(&out.stderr));
    // An unknown saga.
    let out = cli(&format!(
        "saga retry ops-nope --operator bob --server {server}"
    ))
    .await;
    assert_eq!(out.status.code(), Some(1));
    assert!(
        text(&out.stderr).starts_with("error: not_found: "),
        "{}",
        text(&out.stderr)
    );

    // The API: each refusal names what is wrong.
    let invalid = |r: Result<v1::InterveneSagaResponse, tonic::Status>, field: &str| {
        let err = r.unwrap_err();
        assert_eq!(err.code(), Code::InvalidArgument, "{err:?}");
        assert!(
            err.message().starts_with(&format!("{field}: ")),
            "{field}: {}",
            err.message()
        );
    };
    invalid(ops.intervene(done, "cancel", "", "").await, "operator");
    invalid(ops.intervene(done, "cancel", "", "  ").await, "operator");
    invalid(ops.intervene(done, "explode", "", "dave").await, "action");
    invalid(ops.intervene(done, "skip", "nope", "dave").await, "step");
    invalid(ops.intervene(done, "skip", "", "dave").await, "step");
    invalid(ops.intervene(done, "retry", "nope", "dave").await, "step");
    let err = ops
        .sagas
        .clone()
        .intervene_saga(InterveneSagaRequest {
            saga_id: done.into(),
            action: "skip".into(),
            step: "ship".into(),
            output_json: "{nope".into(),
            operator: "dave".into(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    assert!(
        err.message().starts_with("output_json: not JSON"),
        "{}",
        err.message()
    );
    let err = ops
        .intervene("ops-nope", "cancel", "", "dave")
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::NotFound, "{err:?}");
    for action in ["cancel", "abandon", "retry", "compensate"] {
        let err = ops.intervene(done, action, "", "dave").await.unwrap_err();
        assert_eq!(err.code(), Code::FailedPrecondition, "{action}: {err:?}");
        assert!(
            err.message()
                .starts_with(&format!("{action}: the saga has finished (COMPLETED)")),
            "{}",
            err.message()
        );
    }
    // Refusals change nothing and are not journaled (they never reached the saga).
    let after = ops.get(done).await;
    assert_eq!(after.history, saga.history);

    // On a running saga, what does not apply to its state is refused as well.
    let running = "ops-running-1";
    ops.participant
        .set_for(running, "ship.send", Behaviour::Never);
    ops.start_saga("ops", running).await;
    ops.participant.wait_received(running, "ship.send", 1).await;
    let err = ops
        .intervene(running, "abandon", "", "dave")
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition, "{err:?}");
    assert!(
        err.message().starts_with("abandon: the saga is RUNNING"),
        "{}",
        err.message()
    );
    let err = ops
        .intervene(running, "skip", "charge", "dave")
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition, "{err:?}");
    assert!(
        err.message()
            .starts_with("skip: step `charge` is SUCCEEDED"),
        "{}",
        err.message()
    );
    ops.stop().await;
}

// ---------------------------------------------------------------------------------------------
// 5. A step timeout that fell due while the node was down fires as soon as the saga is back.
// ---------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_timeout_due_while_the_node_was_down_fires_right_after_recovery() {
    const STEP_TIMEOUT_MS: i64 = 6_000;
    let mut ops = Ops::start().await;
    let id = "ops-timeout-1";
    ops.participant.set("stock.reserve", Behaviour::Never);
    ops.start_saga("ops_timeout", id).await;
    ops.participant.wait_received(id, "stock.reserve", 1).await;

    let saga = ops.get(id).await;
    let sent = entry(&saga, "reserve", "attempt 1 sent").at_unix_ms;
    let due = sent + STEP_TIMEOUT_MS;
    assert!(
        saga.progress.starts_with(&format!(
            "waiting for `reserve` (stock.reserve): attempt 1 of 1, times out at {}",
            time(due)
        )),
        "{}",
        saga.progress
    );
    assert!(!saga.stuck && saga.stuck_at_unix_ms > due, "{saga:#?}");

    // Down (before the attempt is due) until past the due time, then a new node on the same
    // NATS.
    let down = now_ms();
    ops.shutdown_node().await;
    let stopped = now_ms();
    assert!(
        stopped < due,
        "the node took {} ms to shut down: the attempt fell due while it still ran",
        stopped - down
    );
    wait_until(SAGA_TIMEOUT, "past the step's due time", || async move {
        now_ms() > due + 500
    })
    .await
    .unwrap();
    let restart = now_ms();
    ops.start_new_node().await;

    let saga = ops.wait_terminal(id).await;
    let timed_out = entry(&saga, "reserve", "attempt 1 failed: timeout");
    println!(
        "node shut down in {} ms, restarted {} ms after the attempt fell due; the timeout \
         fired {} ms after the restart",
        stopped - down,
        restart - due,
        timed_out.at_unix_ms - restart
    );
    assert!(
        timed_out.at_unix_ms >= due,
        "timed out at {} before it was due at {due}",
        timed_out.at_unix_ms
    );
    assert!(
        timed_out.at_unix_ms >= restart && timed_out.at_unix_ms < restart + STEP_TIMEOUT_MS / 2,
        "the timeout fired {} ms after the restart: not right after recovery",
        timed_out.at_unix_ms - restart
    );
    assert_eq!(saga.status, "UNDONE", "{saga:#?}");
    assert_eq!(saga.phase, "COMPENSATED");
    assert!(
        saga.reason
            .starts_with("step `reserve` (stock.reserve) failed: timeout: "),
        "{}",
        saga.reason
    );
    let reserve = step(&saga, "reserve");
    assert_eq!(
        (reserve.attempts, reserve.last_error_kind.as_str()),
        (1, "timeout")
    );
    // A timed-out reservation may have happened: it is released, then the charge refunded.
    let trail: Vec<(&str, &str)> = saga
        .compensations
        .iter()
        .map(|c| (c.step.as_str(), c.state.as_str()))
        .collect();
    assert_eq!(
        trail,
        [("reserve", "COMPENSATED"), ("charge", "COMPENSATED")]
    );
    let p = &ops.participant;
    assert_eq!(p.attempts(id, "stock.reserve").len(), 1);
    assert_eq!(p.attempts(id, "stock.release").len(), 1);
    assert_eq!(p.attempts(id, "pay.refund").len(), 1);
    ops.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_parked_pivot_that_really_succeeded_is_settled_and_the_saga_completes() {
    let ops = Ops::start().await;
    let id = "ops-settle-1";
    ops.participant.set("ship.send", Behaviour::Never);
    ops.start_saga("ops_pivot", id).await;
    // The shipment's only attempt times out: its outcome is unknown, the saga parks.
    let parked = ops
        .wait_saga(id, "parked on the pivot", |s| s.phase == "NEEDS_ATTENTION")
        .await;
    assert!(parked.reason.contains("may have succeeded"), "{parked:#?}");

    let server = ops.server();
    // A skip with a result would drop the result: refused, pointing to settle.
    let out = cli(&format!(
        "saga skip {id} --step ship --result {{\"tracking\":\"T9\"}} --operator alice --server {server}"
    ))
    .await;
    assert!(!out.status.success(), "{out:?}");
    assert!(text(&out.stderr).contains("settle it"), "{out:?}");

    // The carrier confirms the parcel left: settle the pivot with its result.
    let out = cli_ok(&format!(
        "saga settle {id} --step ship --result {{\"tracking\":\"T9\"}} --operator alice \
         --reason carrier-confirmed --server {server}"
    ))
    .await;
    assert!(out.contains("now DONE (COMPLETED)"), "{out}");
    let saga = ops.get(id).await;
    assert_eq!(saga.phase, "COMPLETED", "{saga:#?}");
    let ship = step(&saga, "ship");
    assert_eq!(ship.state, "SUCCEEDED", "{ship:?}");
    assert_eq!(
        serde_json::from_str::<serde_json::Value>(&ship.output_json).unwrap(),
        serde_json::json!({ "tracking": "T9" })
    );
    let journaled = entry(&saga, "ship", "operator `alice`: settle");
    assert_eq!(
        journaled.what,
        "operator `alice`: settle (carrier-confirmed)"
    );
    // Nothing was undone: no refund was ever sent.
    assert!(ops.participant.received(id, "pay.refund").is_empty());
    ops.stop().await;
}
