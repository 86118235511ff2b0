//! Waiting for external events (docs/saga-config.md, *Waiting for a signal*): signals before,
//! during and after the wait, duplicates, timeouts, the errors of `SignalSaga`, the payload in
//! later commands' input, and waits that survive a node killed while they wait.
use crate::common;

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::participant::{success, Handling, RawParticipant};
use common::*;
use sagaflow_proto::v1::saga_service_client::SagaServiceClient;
use sagaflow_proto::v1::{self, GetSagaRequest, SignalSagaRequest, StartSagaRequest};
use tonic::transport::Channel;

const WAIT: Duration = Duration::from_secs(60);

async fn start(sagas: &mut SagaServiceClient<Channel>, id: &str) {
    sagas
        .start_saga(StartSagaRequest {
            saga_name: "approval".into(),
            saga_id: id.into(),
            input_json: r#"{"change":"CHG-1"}"#.into(),
        })
        .await
        .unwrap();
}

async fn saga(sagas: &mut SagaServiceClient<Channel>, id: &str) -> v1::Saga {
    sagas
        .get_saga(GetSagaRequest { saga_id: id.into() })
        .await
        .unwrap()
        .into_inner()
}

/// Waits until `saga`'s step `step` is in `state`.
async fn until_step(sagas: &mut SagaServiceClient<Channel>, id: &str, step: &str, state: &str) {
    let deadline = Instant::now() + WAIT;
    loop {
        let s = saga(sagas, id).await;
        if s.steps
            .iter()
            .any(|st| st.name == step && st.state == state)
        {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{id}: `{step}` never {state}: {s:#?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

async fn until_terminal(sagas: &mut SagaServiceClient<Channel>, id: &str) -> v1::Saga {
    let deadline = Instant::now() + WAIT;
    loop {
        let s = saga(sagas, id).await;
        if s.terminal {
            return s;
        }
        assert!(Instant::now() < deadline, "{id} never finished: {s:#?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn request(id: &str, name: &str, payload: &str, signal_id: &str) -> SignalSagaRequest {
    SignalSagaRequest {
        saga_id: id.into(),
        name: name.into(),
        payload_json: payload.into(),
        signal_id: signal_id.into(),
    }
}

/// Serves `approvals`; holds `prepare` of the sagas named in `held` until they are removed,
/// and records the input each `finish` command carried.
async fn participant(
    nats: &str,
    held: Arc<Mutex<Vec<String>>>,
    finished_inputs: Arc<Mutex<Vec<(String, serde_json::Value)>>>,
) -> RawParticipant {
    RawParticipant::start(
        nats,
        ["approvals"],
        Handling::Concurrent,
        |_| {},
        move |cmd: v1::Command| {
            let held = held.clone();
            let inputs = finished_inputs.clone();
            async move {
                while cmd.action == "prepare" && held.lock().unwrap().contains(&cmd.saga_id) {
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
                if cmd.action == "finish" {
                    let input = serde_json::from_slice(&cmd.input).unwrap();
                    inputs.lock().unwrap().push((cmd.saga_id.clone(), input));
                }
                success(serde_json::json!({}))
            }
        },
    )
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn signals_before_during_and_after_the_wait_duplicates_and_timeouts() {
    let nats = start_nats().await.unwrap();
    let node = TestNode::on(&nats)
        .id("signals-1")
        .without_demo()
        .saga_dir(fixture_sagas("signals"))
        .start()
        .await
        .unwrap();
    let mut sagas = connect_sagas(&node.grpc_addr.to_string()).await.unwrap();
    let held = Arc::new(Mutex::new(vec!["early".to_string()]));
    let inputs = Arc::new(Mutex::new(Vec::new()));
    let _participant = participant(&nats.url(), held.clone(), inputs.clone()).await;

    // A wait step calls no service: the definition lists only the participant's.
    let defs = sagas
        .list_definitions(v1::ListDefinitionsRequest {})
        .await
        .unwrap()
        .into_inner()
        .definitions;
    let approval = defs.iter().find(|d| d.name == "approval").unwrap();
    let services: Vec<&str> = approval.services.iter().map(|s| s.name.as_str()).collect();
    assert_eq!(services, ["approvals"], "{approval:?}");

    // During the wait: the signal ends it, its payload reaches the next command's input.
    start(&mut sagas, "during").await;
    until_step(&mut sagas, "during", "approved", "WAITING").await;
    let waiting = saga(&mut sagas, "during").await;
    assert!(
        waiting
            .progress
            .contains("waiting for signal `change.approved`"),
        "{}",
        waiting.progress
    );
    let sent = sagas
        .signal_saga(request(
            "during",
            "change.approved",
            r#"{"by":"cab"}"#,
            "sig-1",
        ))
        .await
        .unwrap()
        .into_inner();
    assert!(!sent.duplicate);
    let done = until_terminal(&mut sagas, "during").await;
    assert_eq!(done.status, "APPROVED", "{done:#?}");
    assert!(done
        .history
        .iter()
        .any(|h| h.step == "approved" && h.what == "signal `change.approved` received (id sig-1)"));
    let finish_input = inputs
        .lock()
        .unwrap()
        .iter()
        .find(|(id, _)| id == "during")
        .map(|(_, input)| input.clone())
        .unwrap();
    assert_eq!(finish_input["signals"]["change.approved"]["by"], "cab");
    assert_eq!(finish_input["change"], "CHG-1", "the input is kept");
    // A retried request (same id) is a duplicate; another signal for a finished saga is not taken.
    let again = sagas
        .signal_saga(request("during", "change.approved", "{}", "sig-1"))
        .await
        .unwrap()
        .into_inner();
    assert!(again.duplicate);
    let finished = sagas
        .signal_saga(request("during", "change.approved", "{}", "sig-2"))
        .await
        .unwrap_err();
    assert_eq!(
        finished.code(),
        tonic::Code::FailedPrecondition,
        "{finished:?}"
    );
    assert!(
        finished.message().contains("has finished"),
        "{}",
        finished.message()
    );

    // Before the wait: kept, and taken as soon as the step waits.
    start(&mut sagas, "early").await;
    until_step(&mut sagas, "early", "prepare", "RUNNING").await;
    sagas
        .signal_saga(request("early", "change.approved", "true", "sig-early"))
        .await
        .unwrap();
    let kept = saga(&mut sagas, "early").await;
    let deadline = Instant::now() + WAIT;
    let mut kept = kept;
    while !kept
        .history
        .iter()
        .any(|h| h.what.contains("kept until its step waits"))
    {
        assert!(Instant::now() < deadline, "{kept:#?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
        kept = saga(&mut sagas, "early").await;
    }
    held.lock().unwrap().clear();
    let done = until_terminal(&mut sagas, "early").await;
    assert_eq!(done.status, "APPROVED", "{done:#?}");

    // No signal: the wait times out after 3 s and the prepared change is withdrawn.
    start(&mut sagas, "silent").await;
    let done = until_terminal(&mut sagas, "silent").await;
    assert_eq!(done.status, "WITHDRAWN", "{done:#?}");
    assert!(
        done.reason
            .contains("no signal `change.approved` within 3s"),
        "{}",
        done.reason
    );
    assert!(
        done.compensations.iter().any(|c| c.step == "prepare"),
        "{:?}",
        done.compensations
    );

    // The errors: unknown saga, unknown signal, bad payload.
    let unknown = sagas
        .signal_saga(request("nobody", "change.approved", "{}", ""))
        .await
        .unwrap_err();
    assert_eq!(unknown.code(), tonic::Code::NotFound);
    start(&mut sagas, "names").await;
    let wrong = sagas
        .signal_saga(request("names", "change.rejected", "{}", ""))
        .await
        .unwrap_err();
    assert_eq!(wrong.code(), tonic::Code::InvalidArgument);
    assert!(
        wrong.message().contains("waits for `change.approved`"),
        "{}",
        wrong.message()
    );
    let not_json = sagas
        .signal_saga(request("names", "change.approved", "{nope", ""))
        .await
        .unwrap_err();
    assert_eq!(not_json.code(), tonic::Code::InvalidArgument);
    assert!(
        not_json.message().starts_with("payload_json"),
        "{}",
        not_json.message()
    );
    node.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn waits_survive_a_node_killed_while_they_wait() {
    let nats = start_nats().await.unwrap();
    let mut opts = NodeOptions::new("waits-a", &[nats.url()]);
    opts.saga_dir = fixture_sagas("signals");
    opts.demo_services = false;
    for (k, v) in FAST_CLUSTER {
        opts = opts.env(k, v);
    }
    let mut node = NodeProcess::start_with(opts).unwrap();
    node.connect_orders().await.unwrap();
    let mut sagas = connect_sagas(&node.server_arg()).await.unwrap();
    let held = Arc::new(Mutex::new(Vec::new()));
    let inputs = Arc::new(Mutex::new(Vec::new()));
    let _participant = participant(&nats.url(), held, inputs).await;
    for id in ["kept", "timed"] {
        start(&mut sagas, id).await;
        until_step(&mut sagas, id, "approved", "WAITING").await;
    }
    // kill -9 while both wait, then a new process of the same node.
    node.kill();
    node.restart().unwrap();
    node.connect_orders().await.unwrap();
    let mut sagas = connect_sagas(&node.server_arg()).await.unwrap();
    sagas
        .signal_saga(request(
            "kept",
            "change.approved",
            r#"{"after":"restart"}"#,
            "s-k",
        ))
        .await
        .unwrap();
    let kept = until_terminal(&mut sagas, "kept").await;
    assert_eq!(kept.status, "APPROVED", "{kept:#?}");
    // The other wait's timeout still fires after the restart.
    let timed = until_terminal(&mut sagas, "timed").await;
    assert_eq!(timed.status, "WITHDRAWN", "{timed:#?}");
    assert!(timed.reason.contains("no signal"), "{}", timed.reason);
}
