//! Configuration is enough: the trip saga (`sagas/trip.toml`), which no engine code knows about,
//! runs against a participant written here against the documented wire protocol only
//! (`docs/participants.md`): plain `async_nats`, `prost` and `sagaflow_proto::v1`, none of
//! Sagaflow's own participant code. The node runs WITHOUT the demo services, so every command of
//! the trip saga is answered by this participant.
use crate::common;

use std::collections::{BTreeSet, HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::participant::{failure, Handling, RawParticipant};
use common::*;
use futures::StreamExt;
use sagaflow::node::NodeHandle;
use sagaflow_proto::v1::saga_service_client::SagaServiceClient;
use sagaflow_proto::v1::{self, GetSagaRequest, ListDefinitionsRequest, StartSagaRequest};
use tonic::transport::Channel;

/// Bound on a whole saga run (its steps time out after 15 s at most when nobody answers).
const SAGA_TIMEOUT: Duration = Duration::from_secs(60);

// ---------------------------------------------------------------------------------------------
// What trip.toml says (read from the file, so the test follows the configuration).
// ---------------------------------------------------------------------------------------------

/// A step as trip.toml writes it: `(name, action, compensation)`.
type Step = (String, String, Option<String>);

/// A stage: `(name, steps, status label)`.
type Stage = (String, Vec<Step>, Option<String>);

/// The parts of `sagas/trip.toml` the assertions need.
#[derive(Debug, Clone)]
struct TripFile {
    /// `statuses.*`.
    initial: String,
    completed: String,
    compensated: String,
    /// Stage names, each with its steps `(name, action, compensation)` and its status label.
    stages: Vec<Stage>,
    /// `after_compensation` `(name, action)`.
    after_compensation: (String, String),
}

impl TripFile {
    fn load() -> Self {
        let text = std::fs::read_to_string(repo_dir().join("sagas/trip.toml")).unwrap();
        let v: toml::Value = toml::from_str(&text).unwrap();
        let s = |v: &toml::Value, k: &str| v[k].as_str().unwrap().to_string();
        let statuses = &v["statuses"];
        let stages = v["stage"]
            .as_array()
            .unwrap()
            .iter()
            .map(|stage| {
                let steps = stage["step"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .map(|st| {
                        (
                            s(st, "name"),
                            s(st, "action"),
                            st.get("compensation")
                                .and_then(|c| c.as_str())
                                .map(str::to_string),
                        )
                    })
                    .collect();
                let status = stage
                    .get("status")
                    .and_then(|c| c.as_str())
                    .map(str::to_string);
                (s(stage, "name"), steps, status)
            })
            .collect();
        let after = &v["after_compensation"];
        TripFile {
            initial: s(statuses, "initial"),
            completed: s(statuses, "completed"),
            compensated: s(statuses, "compensated"),
            stages,
            after_compensation: (s(after, "name"), s(after, "action")),
        }
    }

    /// Every service named by an action or a compensation.
    fn services(&self) -> BTreeSet<String> {
        let mut actions: Vec<&str> = vec![self.after_compensation.1.as_str()];
        for (_, steps, _) in &self.stages {
            for (_, action, comp) in steps {
                actions.push(action);
                actions.extend(comp.as_deref());
            }
        }
        actions
            .iter()
            .map(|a| a.split_once('.').unwrap().0.to_string())
            .collect()
    }

    /// Forward steps in definition order: `(name, action, compensation)`.
    fn steps(&self) -> Vec<Step> {
        self.stages
            .iter()
            .flat_map(|(_, steps, _)| steps.iter().cloned())
            .collect()
    }

    /// The action and compensation of step `name`.
    fn step(&self, name: &str) -> (String, Option<String>) {
        let (_, a, c) = self
            .steps()
            .into_iter()
            .find(|(n, _, _)| n == name)
            .unwrap_or_else(|| panic!("trip.toml has no step {name}"));
        (a, c)
    }
}

// ---------------------------------------------------------------------------------------------
// The participant: the wire protocol only.
// ---------------------------------------------------------------------------------------------

/// How the participant answers one `service.action` (forward commands only; anything without a
/// rule succeeds).
#[derive(Debug, Clone)]
enum Rule {
    /// Refuse every attempt with this kind (trip.toml lists it as non-retryable).
    Refuse(&'static str),
    /// Fail the first `times` attempts with a transient kind, then succeed.
    Flaky { times: u32, kind: &'static str },
}

/// A recorded answer.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Answer {
    Success(Vec<u8>),
    Failure { kind: String, message: String },
}

/// One command as received (duplicates included).
#[derive(Debug, Clone)]
struct Received {
    command_id: String,
    idempotency_key: String,
    compensates_key: String,
    saga_id: String,
    step: String,
    action: String,
    attempt: u32,
    compensation: bool,
    input: Vec<u8>,
}

/// One effect applied (the first time an idempotency key was done).
#[derive(Debug, Clone)]
struct Effect {
    /// Global order in which effects were applied.
    seq: u64,
    saga_id: String,
    /// `service.action`.
    action: String,
    idempotency_key: String,
    compensation: bool,
}

/// The participant's in-memory ledger: the outcome per idempotency key, the effects applied,
/// every command received.
#[derive(Debug, Default, Clone)]
struct Ledger {
    outcomes: HashMap<String, Answer>,
    effects: Vec<Effect>,
    received: Vec<Received>,
    transient_failures: HashMap<String, u32>,
    voided: HashSet<String>,
    undecodable: u32,
    next_seq: u64,
}

impl Ledger {
    /// Decides the answer to `cmd`, idempotently on its `idempotency_key`.
    fn decide(&mut self, cmd: &v1::Command, rules: &HashMap<String, Rule>) -> Answer {
        let action = format!("{}.{}", cmd.service, cmd.action);
        self.received.push(Received {
            command_id: cmd.command_id.clone(),
            idempotency_key: cmd.idempotency_key.clone(),
            compensates_key: cmd.compensates_key.clone(),
            saga_id: cmd.saga_id.clone(),
            step: cmd.step.clone(),
            action: action.clone(),
            attempt: cmd.attempt,
            compensation: cmd.compensation,
            input: cmd.input.clone(),
        });
        // A repeat (retry or redelivery) answers what the first one answered.
        if let Some(answer) = self.outcomes.get(&cmd.idempotency_key) {
            return answer.clone();
        }
        if cmd.compensation {
            // Rule 4: undoing something never done voids the forward key first.
            let done = matches!(
                self.outcomes.get(&cmd.compensates_key),
                Some(Answer::Success(_))
            );
            if !done {
                self.voided.insert(cmd.compensates_key.clone());
            }
        } else {
            if self.voided.contains(&cmd.idempotency_key) {
                let answer = Answer::Failure {
                    kind: "invalid".into(),
                    message: "already compensated".into(),
                };
                self.outcomes
                    .insert(cmd.idempotency_key.clone(), answer.clone());
                return answer;
            }
            match rules.get(&action) {
                Some(Rule::Refuse(kind)) => {
                    let answer = Answer::Failure {
                        kind: (*kind).to_string(),
                        message: format!("{action} refused by the test participant"),
                    };
                    self.outcomes
                        .insert(cmd.idempotency_key.clone(), answer.clone());
                    return answer;
                }
                Some(Rule::Flaky { times, kind }) => {
                    let failed = self
                        .transient_failures
                        .entry(cmd.idempotency_key.clone())
                        .or_insert(0);
                    if *failed < *times {
                        *failed += 1;
                        // Transient: not recorded, the next attempt decides again.
                        return Answer::Failure {
                            kind: (*kind).to_string(),
                            message: format!("{action} unavailable ({failed} of {times})"),
                        };
                    }
                }
                None => {}
            }
        }
        self.next_seq += 1;
        self.effects.push(Effect {
            seq: self.next_seq,
            saga_id: cmd.saga_id.clone(),
            action: action.clone(),
            idempotency_key: cmd.idempotency_key.clone(),
            compensation: cmd.compensation,
        });
        let output = serde_json::json!({ "done": action, "ref": format!("R-{}", self.next_seq) });
        let answer = Answer::Success(output.to_string().into_bytes());
        self.outcomes
            .insert(cmd.idempotency_key.clone(), answer.clone());
        answer
    }

    /// Effects applied for `saga_id`, in order.
    fn effects_of(&self, saga_id: &str) -> Vec<Effect> {
        self.effects
            .iter()
            .filter(|e| e.saga_id == saga_id)
            .cloned()
            .collect()
    }

    /// How many effects of `action` were applied for `saga_id`.
    fn count(&self, saga_id: &str, action: &str) -> usize {
        self.effects
            .iter()
            .filter(|e| e.saga_id == saga_id && e.action == action)
            .count()
    }
}

/// A participant for a set of services ([`RawParticipant`], in order): the ledger decides
/// each answer as the command arrives.
struct TestParticipant {
    ledger: Arc<Mutex<Ledger>>,
    raw: RawParticipant,
}

impl TestParticipant {
    async fn start(
        nats_url: &str,
        services: &BTreeSet<String>,
        rules: HashMap<String, Rule>,
    ) -> TestParticipant {
        let ledger = Arc::new(Mutex::new(Ledger::default()));
        let deciding = ledger.clone();
        let raw = RawParticipant::start(
            nats_url,
            services,
            Handling::InOrder,
            |_| {},
            move |cmd| {
                let answer = deciding.lock().unwrap().decide(&cmd, &rules);
                async move {
                    match answer {
                        Answer::Success(output) => {
                            Some(v1::reply::Outcome::Success(v1::Success { output }))
                        }
                        Answer::Failure { kind, message } => failure(&kind, message),
                    }
                }
            },
        )
        .await;
        TestParticipant { ledger, raw }
    }

    /// A copy of the ledger as it is now.
    fn ledger(&self) -> Ledger {
        let mut ledger = self.ledger.lock().unwrap().clone();
        ledger.undecodable = self.raw.undecodable();
        ledger
    }
}

// ---------------------------------------------------------------------------------------------
// The node and the gRPC client.
// ---------------------------------------------------------------------------------------------

/// A node without demo services, the test participant for every trip service, a saga client.
struct Setup {
    trip: TripFile,
    participant: TestParticipant,
    sagas: SagaServiceClient<Channel>,
    node: NodeHandle,
    nats: NatsServer,
}

async fn setup(rules: &[(&str, Rule)]) -> Setup {
    let trip = TripFile::load();
    let nats = start_nats().await.unwrap();
    // Only the test participant answers commands.
    let node = TestNode::on(&nats)
        .id("custom-saga-1")
        .partitions(4)
        .without_demo()
        .start()
        .await
        .unwrap();
    assert!(node.demo().is_none(), "the node must not run demo services");
    let rules = rules
        .iter()
        .map(|(a, r)| (a.to_string(), r.clone()))
        .collect();
    let participant = TestParticipant::start(&nats.url(), &trip.services(), rules).await;
    let sagas = connect_sagas(&node.grpc_addr.to_string()).await.unwrap();
    Setup {
        trip,
        participant,
        sagas,
        node,
        nats,
    }
}

impl Setup {
    async fn start_trip(&mut self, saga_id: &str, input: &serde_json::Value) -> bool {
        let r = within(
            TIMEOUT,
            "StartSaga",
            self.sagas.start_saga(StartSagaRequest {
                saga_name: "trip".into(),
                saga_id: saga_id.into(),
                input_json: input.to_string(),
            }),
        )
        .await
        .unwrap()
        .unwrap()
        .into_inner();
        assert_eq!(r.saga_id, saga_id);
        r.created
    }

    async fn get(&mut self, saga_id: &str) -> v1::Saga {
        within(
            TIMEOUT,
            "GetSaga",
            self.sagas.get_saga(GetSagaRequest {
                saga_id: saga_id.into(),
            }),
        )
        .await
        .unwrap()
        .unwrap()
        .into_inner()
    }

    /// Polls `GetSaga` until the saga is terminal.
    async fn wait_terminal(&mut self, saga_id: &str) -> v1::Saga {
        let sagas = self.sagas.clone();
        let id = saga_id.to_string();
        wait_until(SAGA_TIMEOUT, &format!("saga {saga_id} terminal"), || {
            let mut sagas = sagas.clone();
            let id = id.clone();
            async move {
                sagas
                    .get_saga(GetSagaRequest { saga_id: id })
                    .await
                    .is_ok_and(|s| s.into_inner().terminal)
            }
        })
        .await
        .unwrap_or_else(|e| panic!("{e}: last state {:?}", self.last_state(saga_id)));
        self.get(saga_id).await
    }

    fn last_state(&self, saga_id: &str) -> Vec<String> {
        self.participant
            .ledger()
            .received
            .iter()
            .filter(|r| r.saga_id == saga_id)
            .map(|r| format!("{} {} #{}", r.step, r.action, r.attempt))
            .collect()
    }

    async fn stop(self) {
        let Setup {
            participant,
            node,
            nats,
            ..
        } = self;
        within(TIMEOUT, "node shutdown", node.shutdown())
            .await
            .unwrap()
            .unwrap();
        drop(participant);
        drop(nats);
    }
}

fn step<'a>(saga: &'a v1::Saga, name: &str) -> &'a v1::StepStatus {
    saga.steps
        .iter()
        .find(|s| s.name == name)
        .unwrap_or_else(|| panic!("no step {name} in {saga:?}"))
}

fn trip_input(traveller: &str) -> serde_json::Value {
    serde_json::json!({
        "traveller": traveller,
        "from": "LIS",
        "to": "NRT",
        "nights": 3,
        "amount_cents": 184_000
    })
}

// ---------------------------------------------------------------------------------------------
// Tests.
// ---------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn trip_is_booked_by_a_raw_protocol_participant_and_start_is_idempotent() {
    let mut t = setup(&[]).await;
    let id = "trip-happy-1";
    let input = trip_input("ann");
    assert!(
        t.start_trip(id, &input).await,
        "the first StartSaga creates"
    );
    assert!(
        !t.start_trip(id, &input).await,
        "StartSaga again with the same saga_id returns created == false"
    );

    // WatchSaga: every change until terminal, through the statuses trip.toml names.
    let mut watch = within(
        TIMEOUT,
        "WatchSaga",
        t.sagas.watch_saga(GetSagaRequest { saga_id: id.into() }),
    )
    .await
    .unwrap()
    .unwrap()
    .into_inner();
    let mut seen: Vec<String> = Vec::new();
    let mut last = None;
    while let Some(update) = within(SAGA_TIMEOUT, "watch update", watch.next())
        .await
        .unwrap()
    {
        let update = update.unwrap();
        if seen.last() != Some(&update.status) {
            seen.push(update.status.clone());
        }
        last = Some(update);
    }
    let last = last.expect("the watch yields at least the current state");
    assert!(
        last.terminal,
        "the watch ends on a terminal state: {last:?}"
    );
    // The labels in the order trip.toml sets them: initial, each stage's, completed.
    let mut allowed = vec![t.trip.initial.clone()];
    allowed.extend(t.trip.stages.iter().filter_map(|(_, _, s)| s.clone()));
    allowed.push(t.trip.completed.clone());
    let positions: Vec<usize> = seen
        .iter()
        .map(|s| {
            allowed
                .iter()
                .position(|a| a == s)
                .unwrap_or_else(|| panic!("unexpected status {s}: {seen:?} vs {allowed:?}"))
        })
        .collect();
    assert!(
        positions.windows(2).all(|w| w[0] < w[1]),
        "statuses only move forward: {seen:?}"
    );
    assert_eq!(seen.last(), Some(&t.trip.completed), "{seen:?}");

    let saga = t.get(id).await;
    assert_eq!(saga.saga_name, "trip");
    assert_eq!(saga.status, t.trip.completed, "{saga:?}");
    assert_eq!(saga.phase, "COMPLETED");
    assert!(saga.reason.is_empty(), "{}", saga.reason);
    assert_eq!(
        serde_json::from_str::<serde_json::Value>(&saga.input_json).unwrap(),
        input
    );
    let names: Vec<&str> = saga.steps.iter().map(|s| s.name.as_str()).collect();
    // The after-compensation step is not listed: the trip never compensated.
    let expected: Vec<String> = t.trip.steps().into_iter().map(|(n, _, _)| n).collect();
    assert_eq!(names, expected);
    for (name, action, comp) in t.trip.steps() {
        let s = step(&saga, &name);
        assert_eq!(s.state, "SUCCEEDED", "{s:?}");
        assert_eq!(s.attempts, 1, "{s:?}");
        assert_eq!(s.action, action);
        assert_eq!(s.compensation, comp.unwrap_or_default());
        let output: serde_json::Value = serde_json::from_str(&s.output_json).unwrap();
        assert_eq!(
            output["done"],
            action.as_str(),
            "the reply's output is kept"
        );
    }
    assert!(
        !saga
            .steps
            .iter()
            .any(|s| s.name == t.trip.after_compensation.0),
        "the after-compensation step never runs when the saga completes, and is not listed"
    );
    assert!(saga.compensations.is_empty(), "{:?}", saga.compensations);

    // Starting it again once finished still finds the same saga and changes nothing.
    assert!(!t.start_trip(id, &input).await);

    {
        let ledger = t.participant.ledger();
        for (name, action, _) in t.trip.steps() {
            assert_eq!(ledger.count(id, &action), 1, "{action} done exactly once");
            // Documented keys: `<saga_id>/<step>` for every attempt of the step.
            let r = ledger
                .received
                .iter()
                .find(|r| r.saga_id == id && r.step == name)
                .unwrap();
            assert_eq!(r.idempotency_key, format!("{id}/{name}"));
            assert!(r.compensates_key.is_empty() && !r.compensation);
            assert_eq!(
                serde_json::from_slice::<serde_json::Value>(&r.input).unwrap(),
                input,
                "participants get the saga input"
            );
        }
        let effects = ledger.effects_of(id);
        assert_eq!(effects.len(), t.trip.steps().len(), "{effects:?}");
        assert!(effects.iter().all(|e| !e.compensation), "{effects:?}");
        assert_eq!(ledger.undecodable, 0);
        // Stages run in order: the issuing (last stage) is applied last, verifying first.
        assert_eq!(
            effects.first().unwrap().action,
            t.trip.step("verify_traveller").0
        );
        assert_eq!(
            effects.last().unwrap().action,
            t.trip.step("issue_tickets").0
        );
    }
    t.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refused_step_in_the_parallel_stage_compensates_then_notifies() {
    let (hotel, _) = TripFile::load().step("book_hotel");
    let mut t = setup(&[(hotel.as_str(), Rule::Refuse("sold_out"))]).await;
    let id = "trip-sold-out-1";
    assert!(t.start_trip(id, &trip_input("bob")).await);
    let saga = t.wait_terminal(id).await;

    assert_eq!(saga.status, t.trip.compensated, "{saga:?}");
    assert_eq!(saga.phase, "COMPENSATED");
    assert!(saga.reason.contains("sold_out"), "{}", saga.reason);
    assert_eq!(step(&saga, "verify_traveller").state, "SUCCEEDED");
    let hotel_step = step(&saga, "book_hotel");
    assert_eq!(hotel_step.state, "FAILED", "{hotel_step:?}");
    assert_eq!(
        hotel_step.attempts, 1,
        "a non-retryable kind is not retried"
    );
    assert_eq!(hotel_step.last_error_kind, "sold_out");
    assert_eq!(step(&saga, "hold_flight").state, "COMPENSATED");
    assert_eq!(step(&saga, "charge").state, "SKIPPED");
    assert_eq!(step(&saga, "issue_tickets").state, "SKIPPED");
    let after = &t.trip.after_compensation;
    assert_eq!(step(&saga, &after.0).state, "SUCCEEDED");
    let trail: Vec<(&str, &str)> = saga
        .compensations
        .iter()
        .map(|c| (c.step.as_str(), c.state.as_str()))
        .collect();
    assert_eq!(trail, [("hold_flight", "COMPENSATED")], "{trail:?}");

    let (flight_hold, flight_release) = t.trip.step("hold_flight");
    let flight_release = flight_release.unwrap();
    let hotel_cancel = t.trip.step("book_hotel").1.unwrap();
    let ledger = t.participant.ledger();
    let effects = ledger.effects_of(id);
    let order: Vec<&str> = effects.iter().map(|e| e.action.as_str()).collect();
    assert_eq!(ledger.count(id, &flight_hold), 1, "{order:?}");
    assert_eq!(ledger.count(id, &flight_release), 1, "{order:?}");
    assert_eq!(
        ledger.count(id, &hotel),
        0,
        "the refused booking did nothing"
    );
    assert_eq!(
        ledger.count(id, &hotel_cancel),
        0,
        "nothing to cancel: {order:?}"
    );
    assert_eq!(ledger.count(id, &after.1), 1, "{order:?}");
    assert_eq!(ledger.count(id, &t.trip.step("charge").0), 0, "{order:?}");
    let comp = effects.iter().find(|e| e.action == flight_release).unwrap();
    assert!(comp.compensation);
    assert_eq!(comp.idempotency_key, format!("{id}/hold_flight/compensate"));
    let notified = effects.iter().find(|e| e.action == after.1).unwrap();
    assert!(
        notified.seq > comp.seq,
        "the after-compensation step runs after the compensations: {order:?}"
    );
    assert_eq!(
        effects.last().map(|e| e.action.as_str()),
        Some(after.1.as_str()),
        "{order:?}"
    );
    t.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn declined_charge_compensates_both_parallel_steps_newest_first() {
    let (charge, _) = TripFile::load().step("charge");
    let mut t = setup(&[(charge.as_str(), Rule::Refuse("declined"))]).await;
    let id = "trip-declined-1";
    assert!(t.start_trip(id, &trip_input("cy")).await);
    let saga = t.wait_terminal(id).await;

    assert_eq!(saga.status, t.trip.compensated, "{saga:?}");
    assert!(saga.reason.contains("declined"), "{}", saga.reason);
    assert_eq!(step(&saga, "charge").state, "FAILED");
    assert_eq!(step(&saga, "charge").attempts, 1);
    assert_eq!(step(&saga, "issue_tickets").state, "SKIPPED");
    // Newest first; within the parallel stage, the reverse of the definition order.
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

    let hotel_cancel = t.trip.step("book_hotel").1.unwrap();
    let flight_release = t.trip.step("hold_flight").1.unwrap();
    let refund = t.trip.step("charge").1.unwrap();
    let after = t.trip.after_compensation.1.clone();
    let ledger = t.participant.ledger();
    let order: Vec<String> = ledger
        .effects_of(id)
        .iter()
        .filter(|e| e.compensation || e.action == after)
        .map(|e| e.action.clone())
        .collect();
    assert_eq!(
        order,
        [hotel_cancel.clone(), flight_release.clone(), after.clone()]
    );
    assert_eq!(ledger.count(id, &charge), 0);
    assert_eq!(
        ledger.count(id, &refund),
        0,
        "a refused charge is not refunded"
    );
    // Each compensation was done once, under the documented key, naming the step it undoes
    // (redeliveries, if any, were answered from the ledger).
    for (step_name, action) in [
        ("book_hotel", &hotel_cancel),
        ("hold_flight", &flight_release),
    ] {
        assert_eq!(ledger.count(id, action), 1, "{action}");
        let received: Vec<&Received> = ledger
            .received
            .iter()
            .filter(|r| r.saga_id == id && &r.action == action)
            .collect();
        assert!(!received.is_empty(), "{action}");
        for r in received {
            assert!(r.compensation, "{r:?}");
            assert_eq!(r.idempotency_key, format!("{id}/{step_name}/compensate"));
            assert_eq!(r.compensates_key, format!("{id}/{step_name}"));
            assert_eq!(r.step, step_name);
        }
    }
    t.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn transient_failures_are_retried_and_counted() {
    let (flight_hold, _) = TripFile::load().step("hold_flight");
    let rule = Rule::Flaky {
        times: 2,
        kind: "unavailable",
    };
    let mut t = setup(&[(flight_hold.as_str(), rule)]).await;
    let id = "trip-flaky-1";
    assert!(t.start_trip(id, &trip_input("dee")).await);
    let saga = t.wait_terminal(id).await;

    assert_eq!(saga.status, t.trip.completed, "{saga:?}");
    let hold = step(&saga, "hold_flight");
    assert_eq!(hold.state, "SUCCEEDED", "{hold:?}");
    assert_eq!(
        hold.attempts, 3,
        "two transient failures, then success: {hold:?}"
    );
    for (name, _, _) in t.trip.steps() {
        assert_eq!(step(&saga, &name).state, "SUCCEEDED", "{name}");
    }
    assert!(saga.compensations.is_empty());

    let ledger = t.participant.ledger();
    assert_eq!(ledger.count(id, &flight_hold), 1, "held exactly once");
    let mut attempts: Vec<(u32, String)> = ledger
        .received
        .iter()
        .filter(|r| r.saga_id == id && r.action == flight_hold)
        .map(|r| (r.attempt, r.command_id.clone()))
        .collect();
    attempts.sort();
    attempts.dedup();
    assert_eq!(
        attempts.iter().map(|a| a.0).collect::<Vec<_>>(),
        [1, 2, 3],
        "{attempts:?}"
    );
    let ids: HashSet<&String> = attempts.iter().map(|a| &a.1).collect();
    assert_eq!(ids.len(), 3, "each attempt has its own command id");
    assert!(ledger
        .received
        .iter()
        .filter(|r| r.saga_id == id && r.action == flight_hold)
        .all(|r| r.idempotency_key == format!("{id}/hold_flight")));
    t.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn list_definitions_shows_order_and_trip_with_their_stages() {
    let mut t = setup(&[]).await;
    let defs = within(
        TIMEOUT,
        "ListDefinitions",
        t.sagas.list_definitions(ListDefinitionsRequest {}),
    )
    .await
    .unwrap()
    .unwrap()
    .into_inner()
    .definitions;
    let names: Vec<&str> = defs.iter().map(|d| d.name.as_str()).collect();
    assert!(
        names.contains(&"order") && names.contains(&"trip"),
        "{names:?}"
    );

    let trip = defs.iter().find(|d| d.name == "trip").unwrap();
    let stages: Vec<(String, Vec<String>, String)> = trip
        .stages
        .iter()
        .map(|s| (s.name.clone(), s.steps.clone(), s.status.clone()))
        .collect();
    let expected: Vec<(String, Vec<String>, String)> = t
        .trip
        .stages
        .iter()
        .map(|(name, steps, status)| {
            (
                name.clone(),
                steps.iter().map(|s| s.0.clone()).collect(),
                status.clone().unwrap_or_default(),
            )
        })
        .collect();
    assert_eq!(stages, expected);
    assert_eq!(trip.after_compensation, t.trip.after_compensation.0);
    assert!(!trip.description.is_empty());
    assert!(trip.source.ends_with("trip.toml"), "{}", trip.source);
    assert_ne!(trip.fingerprint, 0);

    let order = defs.iter().find(|d| d.name == "order").unwrap();
    let order_stages: Vec<(&str, Vec<&str>)> = order
        .stages
        .iter()
        .map(|s| {
            (
                s.name.as_str(),
                s.steps.iter().map(String::as_str).collect(),
            )
        })
        .collect();
    assert_eq!(
        order_stages,
        [
            ("payment", vec!["charge"]),
            ("fulfilment", vec!["reserve", "prepare_shipment", "notify"]),
        ]
    );
    assert_eq!(order.after_compensation, "notify_cancellation");

    // Each definition names the services it calls, their actions, and whether anybody serves
    // them: here the test participant serves the trip's services, and no demo runs.
    let trip_services: Vec<(&str, bool)> = trip
        .services
        .iter()
        .map(|s| (s.name.as_str(), s.consumer))
        .collect();
    assert!(!trip_services.is_empty());
    assert!(trip_services.iter().all(|(_, c)| *c), "{trip_services:?}");
    assert_eq!(
        trip_services
            .iter()
            .map(|(n, _)| n.to_string())
            .collect::<BTreeSet<_>>(),
        t.trip.services(),
    );
    let inventory = order
        .services
        .iter()
        .find(|s| s.name == "inventory")
        .unwrap();
    assert_eq!(inventory.actions, ["reserve", "release"]);
    assert!(!inventory.consumer, "nobody serves inventory here");
    t.stop().await;
}
