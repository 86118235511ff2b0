//! Saga definitions as live, versioned configuration (docs/saga-config.md, *Versions*): each
//! saga runs on the version it started on while newer ones are applied, an apply through one
//! node is in force on every node, plans and rollbacks, and the CLI's exit codes.
use crate::common;

use std::collections::HashSet;
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::participant::{success, Handling, RawParticipant};
use common::*;
use futures::{StreamExt, TryStreamExt};
use sagaflow_proto::v1::definition_service_client::DefinitionServiceClient;
use sagaflow_proto::v1::saga_service_client::SagaServiceClient;
use sagaflow_proto::v1::{
    self, DefinitionFile, DefinitionFiles, GetDefinitionRequest, GetSagaRequest,
    ListDefinitionVersionsRequest, ListDefinitionsRequest, RollbackDefinitionRequest,
    StartSagaRequest,
};
use tonic::transport::Channel;

/// Bound on the sagas of one test finishing.
const RUN_TIMEOUT: Duration = Duration::from_secs(180);

fn files(dir: &str) -> DefinitionFiles {
    let dir = fixture_sagas(dir);
    let mut files = Vec::new();
    for entry in std::fs::read_dir(&dir).unwrap() {
        let path = entry.unwrap().path();
        files.push(DefinitionFile {
            path: path.display().to_string(),
            text: std::fs::read_to_string(&path).unwrap(),
        });
    }
    DefinitionFiles { files }
}

async fn definitions_client(addr: &str) -> DefinitionServiceClient<Channel> {
    DefinitionServiceClient::new(channel(addr).await.unwrap())
}

/// Starts `n` sagas of `pin` named `<prefix>-<i>`.
async fn start_sagas(sagas: &SagaServiceClient<Channel>, prefix: &str, n: usize) -> Vec<String> {
    let ids: Vec<String> = (0..n).map(|i| format!("{prefix}-{i}")).collect();
    futures::stream::iter(ids.clone())
        .map(|id| {
            let mut client = sagas.clone();
            async move {
                within(
                    TIMEOUT,
                    "start saga",
                    client.start_saga(StartSagaRequest {
                        saga_name: "pin".into(),
                        saga_id: id,
                        input_json: "{}".into(),
                    }),
                )
                .await
                .unwrap()
                .unwrap();
            }
        })
        .buffer_unordered(32)
        .collect::<Vec<()>>()
        .await;
    ids
}

/// Waits until every saga of `ids` is terminal and returns them.
async fn finished(sagas: &SagaServiceClient<Channel>, ids: &[String]) -> Vec<v1::Saga> {
    let deadline = Instant::now() + RUN_TIMEOUT;
    let mut done = Vec::with_capacity(ids.len());
    let mut waiting: Vec<String> = ids.to_vec();
    while !waiting.is_empty() {
        assert!(
            Instant::now() < deadline,
            "{} sagas unfinished, e.g. {:?}",
            waiting.len(),
            waiting.first()
        );
        let got: Vec<v1::Saga> = futures::stream::iter(waiting.clone())
            .map(|id| {
                let mut client = sagas.clone();
                async move {
                    client
                        .get_saga(GetSagaRequest { saga_id: id })
                        .await
                        .map(tonic::Response::into_inner)
                }
            })
            .buffer_unordered(32)
            .try_collect()
            .await
            .unwrap();
        waiting.clear();
        for saga in got {
            if saga.terminal {
                done.push(saga);
            } else {
                waiting.push(saga.saga_id);
            }
        }
        if !waiting.is_empty() {
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
    }
    done
}

/// The steps of `saga` in the order they started.
fn step_order(saga: &v1::Saga) -> Vec<String> {
    let mut steps: Vec<&v1::StepStatus> = saga.steps.iter().collect();
    steps.sort_by_key(|s| s.started_at_unix_ms);
    steps.iter().map(|s| s.name.clone()).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sagas_finish_on_the_version_they_started_on_while_a_new_one_is_applied() {
    let nats = start_nats().await.unwrap();
    let node = TestNode::on(&nats)
        .id("versions-1")
        .partitions(4)
        .without_demo()
        .saga_dir(fixture_sagas("versions/v1"))
        .start()
        .await
        .unwrap();
    let addr = node.grpc_addr.to_string();
    let sagas = connect_sagas(&addr).await.unwrap();
    let mut defs = definitions_client(&addr).await;

    // The participant holds every first attempt of `a` of the v1 sagas until the gate opens,
    // so they are all in flight, mid-saga, when v2 is applied.
    let (open, gate) = tokio::sync::watch::channel(false);
    let gate = Arc::new(gate);
    let _participant = RawParticipant::start(
        &nats.url(),
        ["pinsvc"],
        Handling::Concurrent,
        |_| {},
        move |cmd: v1::Command| {
            let mut gate = (*gate).clone();
            async move {
                if cmd.saga_id.starts_with("v1-") && cmd.step == "a" {
                    let _ = gate.wait_for(|open| *open).await;
                }
                success(serde_json::json!({ "step": cmd.step }))
            }
        },
    )
    .await;

    let v1_ids = start_sagas(&sagas, "v1", 500).await;
    let listed = within(
        TIMEOUT,
        "list definitions",
        defs.list_definition_versions(ListDefinitionVersionsRequest { name: "pin".into() }),
    )
    .await
    .unwrap()
    .unwrap()
    .into_inner()
    .versions;
    assert_eq!(listed.len(), 1, "{listed:?}");
    let v1_version = listed[0].version.clone();
    assert!(listed[0].active);
    assert_eq!(listed[0].applied_by, "node versions-1");

    // The plan names every change; applying it makes v2 active.
    let plan = defs
        .plan_definitions(files("versions/v2"))
        .await
        .unwrap()
        .into_inner();
    let changes = &plan.sagas[0].changes;
    assert_eq!(plan.sagas[0].active_version, v1_version);
    for expected in [
        "~ step `a`: stage: one → two",
        "~ step `b`: stage: two → one",
        "+ step `d` in stage `four`: pinsvc.d",
        "- step `c` (stage `three`)",
        "+ stage `four`",
        "- stage `three`",
    ] {
        assert!(
            changes.iter().any(|c| c == expected),
            "missing {expected:?} in {changes:#?}"
        );
    }
    let applied = defs
        .apply_definitions(files("versions/v2"))
        .await
        .unwrap()
        .into_inner();
    let v2_version = applied.sagas[0].new_version.clone();
    assert_ne!(v1_version, v2_version);
    // Applying the same files again changes nothing.
    let again = defs
        .plan_definitions(files("versions/v2"))
        .await
        .unwrap()
        .into_inner();
    assert!(again.sagas[0].changes.is_empty(), "{again:?}");

    let v2_ids = start_sagas(&sagas, "v2", 500).await;
    let running = defs
        .list_definition_versions(ListDefinitionVersionsRequest { name: "pin".into() })
        .await
        .unwrap()
        .into_inner()
        .versions;
    let v1_running = running.iter().find(|v| v.version == v1_version).unwrap();
    assert!(!v1_running.active && v1_running.running > 0, "{running:?}");
    open.send(true).unwrap();

    for (ids, version, order) in [
        (&v1_ids, &v1_version, ["a", "b", "c"]),
        (&v2_ids, &v2_version, ["b", "a", "d"]),
    ] {
        let done = finished(&sagas, ids).await;
        assert_eq!(done.len(), 500);
        for saga in &done {
            assert_eq!(saga.status, "DONE", "{saga:#?}");
            assert_eq!(&saga.definition_version, version, "{}", saga.saga_id);
            assert_eq!(step_order(saga), order, "{}", saga.saga_id);
            // Its history is the one of its own version's steps, each sent and answered once.
            let sent: Vec<&str> = saga
                .history
                .iter()
                .filter(|h| h.what == "attempt 1 sent")
                .map(|h| h.step.as_str())
                .collect();
            assert_eq!(sent, order, "{}: {:#?}", saga.saga_id, saga.history);
        }
    }

    // Rollback makes v1 active again: a new saga runs a, b, c.
    defs.rollback_definition(RollbackDefinitionRequest {
        name: "pin".into(),
        version: v1_version.clone(),
    })
    .await
    .unwrap();
    let back = start_sagas(&sagas, "back", 1).await;
    let done = finished(&sagas, &back).await;
    assert_eq!(done[0].definition_version, v1_version);
    assert_eq!(step_order(&done[0]), ["a", "b", "c"]);
    let versions = defs
        .list_definition_versions(ListDefinitionVersionsRequest { name: "pin".into() })
        .await
        .unwrap()
        .into_inner()
        .versions;
    assert_eq!(
        versions
            .iter()
            .map(|v| (v.version.clone(), v.active, v.running))
            .collect::<Vec<_>>(),
        [
            (v1_version.clone(), true, 0),
            (v2_version.clone(), false, 0)
        ]
    );

    // `show` returns the file as applied.
    let shown = defs
        .get_definition(GetDefinitionRequest {
            name: "pin".into(),
            version: v2_version.clone(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        shown.text,
        std::fs::read_to_string(fixture_sagas("versions/v2/pin.toml")).unwrap()
    );

    // An invalid set is refused whole, naming file:line:column and the field; nothing changes.
    let refused = defs
        .apply_definitions(files("versions/broken"))
        .await
        .unwrap_err();
    assert_eq!(refused.code(), tonic::Code::InvalidArgument);
    assert!(
        refused
            .message()
            .contains("broken/pin.toml:16:1: `stage[0].step[0].compensation`"),
        "{}",
        refused.message()
    );
    let unknown = defs
        .rollback_definition(RollbackDefinitionRequest {
            name: "pin".into(),
            version: "0123456789abcdef".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(unknown.code(), tonic::Code::NotFound, "{unknown:?}");
    let active = defs
        .get_definition(GetDefinitionRequest {
            name: "pin".into(),
            version: String::new(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(active.version.unwrap().version, v1_version);
    node.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_apply_through_one_node_is_in_force_on_the_others_within_two_seconds() {
    let nats = start_nats().await.unwrap();
    let mut nodes = Vec::new();
    for id in ["live-1", "live-2", "live-3"] {
        nodes.push(
            TestNode::on(&nats)
                .id(id)
                .partitions(6)
                .fast_cluster()
                .without_demo()
                .saga_dir(fixture_sagas("versions/v1"))
                .start()
                .await
                .unwrap(),
        );
    }
    let fingerprint = |plan_version: &str| u64::from_str_radix(plan_version, 16).unwrap();
    let mut defs = definitions_client(&nodes[0].grpc_addr.to_string()).await;
    let applied = defs
        .apply_definitions(files("versions/v2"))
        .await
        .unwrap()
        .into_inner();
    let started = Instant::now();
    let v2 = fingerprint(&applied.sagas[0].new_version);
    let mut third = connect_sagas(&nodes[2].grpc_addr.to_string())
        .await
        .unwrap();
    loop {
        let defs = third
            .list_definitions(ListDefinitionsRequest {})
            .await
            .unwrap()
            .into_inner()
            .definitions;
        if defs.iter().any(|d| d.name == "pin" && d.fingerprint == v2) {
            break;
        }
        assert!(
            started.elapsed() < Duration::from_secs(2),
            "node 3 still on the old version after {:?}",
            started.elapsed()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    println!(
        "apply through node 1 in force on node 3 after {:?}",
        started.elapsed()
    );
    // A saga started through node 3 starts on v2.
    let id = third
        .start_saga(StartSagaRequest {
            saga_name: "pin".into(),
            saga_id: "live-a".into(),
            input_json: "{}".into(),
        })
        .await
        .unwrap()
        .into_inner();
    let saga = third
        .get_saga(GetSagaRequest {
            saga_id: id.saga_id,
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(saga.definition_version, applied.sagas[0].new_version);
    // A node started later with the older files does not roll the cluster back.
    let late = TestNode::on(&nats)
        .id("live-4")
        .partitions(6)
        .fast_cluster()
        .without_demo()
        .saga_dir(fixture_sagas("versions/v1"))
        .start()
        .await
        .unwrap();
    let mut fourth = connect_sagas(&late.grpc_addr.to_string()).await.unwrap();
    let defs4 = fourth
        .list_definitions(ListDefinitionsRequest {})
        .await
        .unwrap()
        .into_inner()
        .definitions;
    assert!(
        defs4.iter().any(|d| d.name == "pin" && d.fingerprint == v2),
        "{defs4:?}"
    );
    late.shutdown().await.unwrap();
    // A node that never saw v1 (an empty catalog) loads it from the bucket, as a saga's new
    // owner does for a saga started on it.
    let js = async_nats::jetstream::new(nats_client(&nats.url()).await.unwrap());
    let catalog = std::sync::Arc::new(sagaflow_actors::catalog::Catalog::default());
    let store = sagaflow::definitions::DefinitionStore::open(&js, 1, catalog.clone())
        .await
        .unwrap();
    let v1 =
        sagaflow::node::load_definitions(&fixture_sagas("versions/v1")).unwrap()["pin"].clone();
    assert!(catalog.version("pin", v1.fingerprint).is_none());
    let loaded = store
        .load_version("pin", v1.fingerprint)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(loaded.fingerprint, v1.fingerprint);
    assert_eq!(
        loaded
            .steps
            .iter()
            .map(|s| s.name.as_str())
            .collect::<Vec<_>>(),
        ["a", "b", "c"]
    );
    assert!(
        catalog.version("pin", v1.fingerprint).is_some(),
        "kept once loaded"
    );
    assert!(store.load_version("pin", 0x0123).await.unwrap().is_none());
    for node in nodes {
        node.shutdown().await.unwrap();
    }
}

/// Runs the `sagaflow` binary with `args`; returns (exit code, stdout, stderr).
fn sagaflow(args: &[&str]) -> (Option<i32>, String, String) {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_sagaflow"))
        .args(args)
        .env_remove("SAGAFLOW_SERVER")
        .env_remove("SAGAFLOW_TOKEN")
        .output()
        .unwrap();
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_cli_plans_applies_and_rolls_back_with_terraform_exit_codes() {
    let nats = start_nats().await.unwrap();
    let node = TestNode::on(&nats)
        .id("cli-defs")
        .without_demo()
        .saga_dir(fixture_sagas("versions/v1"))
        .start()
        .await
        .unwrap();
    let server = node.grpc_addr.to_string();
    let dir = |d: &str| fixture_sagas(d).display().to_string();
    let run = |args: Vec<String>| {
        let server = server.clone();
        async move {
            tokio::task::spawn_blocking(move || {
                let mut all: Vec<&str> = args.iter().map(String::as_str).collect();
                all.extend(["--server", &server]);
                sagaflow(&all)
            })
            .await
            .unwrap()
        }
    };
    let args = |v: &[&str]| v.iter().map(|s| s.to_string()).collect::<Vec<_>>();

    let (code, out, err) = run(args(&["saga", "plan", &dir("versions/v1")])).await;
    assert_eq!(code, Some(0), "{out}{err}");
    assert!(out.contains("saga `pin`: no changes"), "{out}");
    let (code, out, err) = run(args(&["saga", "plan", &dir("versions/v2")])).await;
    assert_eq!(code, Some(2), "{out}{err}");
    assert!(out.contains("  - step `c` (stage `three`)"), "{out}");
    assert!(out.contains("1 saga to change"), "{out}");
    let (code, out, err) = run(args(&["saga", "plan", &dir("versions/broken")])).await;
    assert_eq!(code, Some(1), "{out}{err}");
    assert!(err.contains("pin.toml:16:1"), "{err}");
    assert!(out.is_empty(), "{out}");

    let (code, out, err) = run(args(&["saga", "apply", &dir("versions/v2")])).await;
    assert_eq!(code, Some(0), "{out}{err}");
    assert!(out.contains("applied"), "{out}");
    let (code, out, err) = run(args(&["saga", "versions", "pin", "--json"])).await;
    assert_eq!(code, Some(0), "{out}{err}");
    let listed: serde_json::Value = serde_json::from_str(out.trim()).unwrap();
    let versions = listed["versions"].as_array().unwrap();
    assert_eq!(versions.len(), 2, "{listed}");
    let v1 = versions[0]["version"].as_str().unwrap().to_string();
    assert_eq!(versions[1]["active"], true);
    let (code, out, err) = run(args(&["saga", "rollback", "pin", "--to", &v1])).await;
    assert_eq!(code, Some(0), "{out}{err}");
    let (code, out, _) = run(args(&["saga", "show", "pin"])).await;
    assert_eq!(code, Some(0));
    assert!(out.contains(&format!("version {v1}, active")), "{out}");
    assert!(out.contains("name = \"pin\""), "{out}");
    let (code, _, err) = run(args(&["saga", "rollback", "pin", "--to", "nothex"])).await;
    assert_eq!(code, Some(1));
    assert!(
        err.contains("invalid_argument") && err.contains("version"),
        "{err}"
    );
    let seen: HashSet<&str> = versions
        .iter()
        .filter_map(|v| v["applied_by"].as_str())
        .collect();
    assert!(
        seen.contains("node cli-defs") && seen.contains("anonymous"),
        "{seen:?}"
    );
    node.shutdown().await.unwrap();
}
