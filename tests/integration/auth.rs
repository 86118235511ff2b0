//! Authentication and roles on a node with a tokens file: every RPC against every role (and no
//! token), the journal's operator is the token's name, health stays open, and the CLI sends its
//! token from `SAGAFLOW_TOKEN` or `--token-file`.

use crate::common;

use std::time::Duration;

use async_nats::jetstream;
use common::*;
use sagaflow::auth::sha256_hex;
use sagaflow_proto::v1::admin_service_client::AdminServiceClient;
use sagaflow_proto::v1::analytics_service_client::AnalyticsServiceClient;
use sagaflow_proto::v1::order_service_client::OrderServiceClient;
use sagaflow_proto::v1::saga_service_client::SagaServiceClient;
use sagaflow_proto::v1::*;
use tonic::transport::Channel;
use tonic::Code;

/// (name, role, secret) of the tokens the node accepts.
const TOKENS: [(&str, &str, &str); 4] = [
    ("rita", "reader", "secret-of-rita"),
    ("carl", "client", "secret-of-carl"),
    ("otto", "operator", "secret-of-otto"),
    ("ada", "admin", "secret-of-ada"),
];

/// Every RPC of the protocol and the lowest role it needs, written out here rather than read
/// from the node's table, so a change there has to change this too.
const RPCS: [(&str, usize); 22] = [
    ("OrderService/PlaceOrder", 1),
    ("OrderService/GetOrder", 0),
    ("OrderService/WatchOrder", 0),
    ("OrderService/ListOrders", 0),
    ("SagaService/StartSaga", 1),
    ("SagaService/GetSaga", 0),
    ("SagaService/WatchSaga", 0),
    ("SagaService/ListDefinitions", 0),
    ("SagaService/InterveneSaga", 2),
    ("SagaService/ListSagasNeedingAttention", 0),
    ("SagaService/SignalSaga", 1),
    ("DefinitionService/PlanDefinitions", 0),
    ("DefinitionService/ApplyDefinitions", 3),
    ("DefinitionService/ListDefinitionVersions", 0),
    ("DefinitionService/GetDefinition", 0),
    ("DefinitionService/RollbackDefinition", 3),
    ("AnalyticsService/GetSales", 0),
    ("AdminService/ClusterStatus", 0),
    ("AdminService/ListDeadLetters", 0),
    ("AdminService/GetDeadLetter", 0),
    ("AdminService/ReplayDeadLetter", 2),
    ("AdminService/DiscardDeadLetter", 2),
];

fn tokens_file(dir: &std::path::Path) -> std::path::PathBuf {
    let text: String = TOKENS
        .iter()
        .map(|(name, role, secret)| {
            format!(
                "[[token]]\nname = \"{name}\"\nrole = \"{role}\"\nsha256 = \"{}\"\n\n",
                sha256_hex(secret)
            )
        })
        .collect();
    let path = dir.join("tokens.toml");
    std::fs::write(&path, text).unwrap();
    path
}

/// `msg` with `authorization: Bearer <secret>` when a secret is given.
fn req<T>(msg: T, secret: Option<&str>) -> tonic::Request<T> {
    let mut r = tonic::Request::new(msg);
    if let Some(s) = secret {
        r.metadata_mut()
            .insert("authorization", format!("Bearer {s}").parse().unwrap());
    }
    r
}

/// Calls `rpc` with an empty request (so nothing happens past the check: a call let through
/// ends in a validation error, NOT_FOUND or OK); returns the code.
async fn call(channel: &Channel, rpc: &str, secret: Option<&str>) -> Code {
    let mut orders = OrderServiceClient::new(channel.clone());
    let mut sagas = SagaServiceClient::new(channel.clone());
    let mut analytics = AnalyticsServiceClient::new(channel.clone());
    let mut admin = AdminServiceClient::new(channel.clone());
    let mut defs = sagaflow_proto::v1::definition_service_client::DefinitionServiceClient::new(
        channel.clone(),
    );
    fn code<T>(r: Result<T, tonic::Status>) -> Code {
        r.map_or_else(|s| s.code(), |_| Code::Ok)
    }
    let s = secret;
    let fut = async {
        match rpc {
            "OrderService/PlaceOrder" => code(orders.place_order(req(Default::default(), s)).await),
            "OrderService/GetOrder" => code(orders.get_order(req(Default::default(), s)).await),
            "OrderService/WatchOrder" => code(orders.watch_order(req(Default::default(), s)).await),
            "OrderService/ListOrders" => code(orders.list_orders(req(Default::default(), s)).await),
            "SagaService/StartSaga" => code(sagas.start_saga(req(Default::default(), s)).await),
            "SagaService/GetSaga" => code(sagas.get_saga(req(Default::default(), s)).await),
            "SagaService/WatchSaga" => code(sagas.watch_saga(req(Default::default(), s)).await),
            "SagaService/ListDefinitions" => {
                code(sagas.list_definitions(req(Default::default(), s)).await)
            }
            "SagaService/InterveneSaga" => {
                code(sagas.intervene_saga(req(Default::default(), s)).await)
            }
            "SagaService/ListSagasNeedingAttention" => code(
                sagas
                    .list_sagas_needing_attention(req(Default::default(), s))
                    .await,
            ),
            "SagaService/SignalSaga" => code(sagas.signal_saga(req(Default::default(), s)).await),
            "DefinitionService/PlanDefinitions" => {
                code(defs.plan_definitions(req(Default::default(), s)).await)
            }
            "DefinitionService/ApplyDefinitions" => {
                code(defs.apply_definitions(req(Default::default(), s)).await)
            }
            "DefinitionService/ListDefinitionVersions" => code(
                defs.list_definition_versions(req(Default::default(), s))
                    .await,
            ),
            "DefinitionService/GetDefinition" => {
                code(defs.get_definition(req(Default::default(), s)).await)
            }
            "DefinitionService/RollbackDefinition" => {
                code(defs.rollback_definition(req(Default::default(), s)).await)
            }
            "AnalyticsService/GetSales" => {
                code(analytics.get_sales(req(Default::default(), s)).await)
            }
            "AdminService/ClusterStatus" => {
                code(admin.cluster_status(req(Default::default(), s)).await)
            }
            "AdminService/ListDeadLetters" => {
                code(admin.list_dead_letters(req(Default::default(), s)).await)
            }
            "AdminService/GetDeadLetter" => {
                code(admin.get_dead_letter(req(Default::default(), s)).await)
            }
            "AdminService/ReplayDeadLetter" => {
                code(admin.replay_dead_letter(req(Default::default(), s)).await)
            }
            "AdminService/DiscardDeadLetter" => {
                code(admin.discard_dead_letter(req(Default::default(), s)).await)
            }
            other => panic!("no call for {other}"),
        }
    };
    within(TIMEOUT, rpc, fut).await.unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_rpc_answers_every_role_as_the_table_says() {
    // The table covers the whole protocol.
    use prost::Message as _;
    let set = prost_types::FileDescriptorSet::decode(sagaflow_proto::FILE_DESCRIPTOR_SET).unwrap();
    let methods: usize = set
        .file
        .iter()
        .flat_map(|f| &f.service)
        .map(|s| s.method.len())
        .sum();
    assert_eq!(
        methods,
        RPCS.len(),
        "an RPC is missing from this test's table"
    );

    let nats = start_nats().await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let tokens = tokens_file(dir.path());
    let node = TestNode::on(&nats)
        .id("auth-1")
        .partitions(2)
        .env("SAGAFLOW_AUTH__TOKENS", tokens.to_str().unwrap())
        .start()
        .await
        .unwrap();
    let channel = channel(&node.grpc_addr.to_string()).await.unwrap();

    let mut failures = Vec::new();
    for (rpc, needed) in RPCS {
        let without = call(&channel, rpc, None).await;
        if without != Code::Unauthenticated {
            failures.push(format!("{rpc} without a token: {without:?}"));
        }
        let wrong = call(&channel, rpc, Some("not-a-token")).await;
        if wrong != Code::Unauthenticated {
            failures.push(format!("{rpc} with an unknown token: {wrong:?}"));
        }
        for (level, (name, _, secret)) in TOKENS.iter().enumerate() {
            let got = call(&channel, rpc, Some(secret)).await;
            let refused = matches!(got, Code::Unauthenticated | Code::PermissionDenied);
            if level < needed && got != Code::PermissionDenied {
                failures.push(format!(
                    "{rpc} as {name}: {got:?}, expected PermissionDenied"
                ));
            }
            if level >= needed && refused {
                failures.push(format!("{rpc} as {name}: {got:?}, expected to pass"));
            }
        }
    }
    assert!(failures.is_empty(), "{failures:#?}");

    // The refusal names the role needed.
    let mut orders = OrderServiceClient::new(channel.clone());
    let denied = orders
        .place_order(req(PlaceOrderRequest::default(), Some("secret-of-rita")))
        .await
        .unwrap_err();
    assert!(denied.message().contains("needs role client"), "{denied:?}");
    let missing = orders
        .get_order(req(GetOrderRequest::default(), None))
        .await
        .unwrap_err();
    assert!(missing.message().contains("SAGAFLOW_TOKEN"), "{missing:?}");

    // Health needs no token.
    let mut health = tonic_health::pb::health_client::HealthClient::new(channel.clone());
    let status = within(
        TIMEOUT,
        "health",
        health.check(tonic_health::pb::HealthCheckRequest {
            service: String::new(),
        }),
    )
    .await
    .unwrap()
    .unwrap()
    .into_inner()
    .status;
    assert_eq!(
        status,
        tonic_health::pb::health_check_response::ServingStatus::Serving as i32
    );
    node.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_journal_records_the_token_and_the_cli_sends_it() {
    let nats = start_nats().await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let tokens = tokens_file(dir.path());
    let node = TestNode::on(&nats)
        .id("auth-2")
        .partitions(2)
        .env("SAGAFLOW_AUTH__TOKENS", tokens.to_str().unwrap())
        .start()
        .await
        .unwrap();
    let addr = node.grpc_addr.to_string();
    let channel = channel(&addr).await.unwrap();
    let mut admin = AdminServiceClient::new(channel.clone());

    // A malformed reply becomes a dead letter.
    let js = jetstream::new(nats_client(&nats.url()).await.unwrap());
    let subject = "sagaflow.evt.1.order-x.reply";
    within(TIMEOUT, "publish", async {
        js.publish(subject, b"\xff not protobuf".to_vec().into())
            .await
            .unwrap()
            .await
            .unwrap()
    })
    .await
    .unwrap();
    let list = |admin: AdminServiceClient<Channel>, journal: bool| async move {
        let mut admin = admin;
        admin
            .list_dead_letters(req(
                ListDeadLettersRequest {
                    include_journal: journal,
                    ..Default::default()
                },
                Some("secret-of-rita"),
            ))
            .await
            .map(|r| r.into_inner().entries)
            .unwrap_or_default()
    };
    let seq = std::sync::Arc::new(std::sync::Mutex::new(0));
    {
        let (admin, seq) = (admin.clone(), seq.clone());
        wait_until(Duration::from_secs(20), "the dead letter", move || {
            let (admin, seq) = (admin.clone(), seq.clone());
            async move {
                let hit = list(admin, false)
                    .await
                    .into_iter()
                    .find(|e| e.subject == subject);
                hit.map(|e| *seq.lock().unwrap() = e.seq).is_some()
            }
        })
        .await
        .unwrap();
    }
    let seq = *seq.lock().unwrap();

    // The operator recorded is the token's name, whatever the caller types.
    within(
        TIMEOUT,
        "discard",
        admin.discard_dead_letter(req(
            DiscardDeadLetterRequest {
                seq,
                operator: "mallory".into(),
                reason: "test".into(),
            },
            Some("secret-of-otto"),
        )),
    )
    .await
    .unwrap()
    .unwrap();
    let journaled: Vec<DeadLetterJournalRecord> = list(admin.clone(), true)
        .await
        .into_iter()
        .filter_map(|e| e.journal)
        .filter(|j| j.dead_letter_seq == seq)
        .collect();
    assert_eq!(journaled.len(), 1, "{journaled:?}");
    assert_eq!(journaled[0].operator, "otto", "{journaled:?}");

    // The CLI: no token, a token from the environment, one from a file, a missing file.
    let cli = |args: Vec<String>, env: Option<&'static str>| {
        let mut cmd = std::process::Command::new(env!("CARGO_BIN_EXE_sagaflow"));
        cmd.args(&args).env_remove("SAGAFLOW_TOKEN");
        if let Some(secret) = env {
            cmd.env("SAGAFLOW_TOKEN", secret);
        }
        tokio::task::spawn_blocking(move || cmd.output().unwrap())
    };
    let base = |extra: &[&str]| {
        let mut v: Vec<String> = ["cluster", "status", "--server", &addr]
            .iter()
            .map(|s| s.to_string())
            .collect();
        v.extend(extra.iter().map(|s| s.to_string()));
        v
    };
    let out = within(Duration::from_secs(60), "cli", cli(base(&[]), None))
        .await
        .unwrap()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(err.contains("unauthenticated"), "{err}");

    let out = within(
        Duration::from_secs(60),
        "cli",
        cli(base(&[]), Some("secret-of-rita")),
    )
    .await
    .unwrap()
    .unwrap();
    assert!(out.status.success(), "{out:?}");
    assert!(String::from_utf8_lossy(&out.stdout).contains("auth-2"));

    let file = dir.path().join("token");
    std::fs::write(&file, "secret-of-rita\n").unwrap();
    let out = within(
        Duration::from_secs(60),
        "cli",
        cli(base(&["--token-file", file.to_str().unwrap()]), None),
    )
    .await
    .unwrap()
    .unwrap();
    assert!(out.status.success(), "{out:?}");

    let missing = dir.path().join("no-such-token");
    let out = within(
        Duration::from_secs(60),
        "cli",
        cli(base(&["--token-file", missing.to_str().unwrap()]), None),
    )
    .await
    .unwrap()
    .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(err.contains("--token-file"), "{err}");
    node.shutdown().await.unwrap();
}
