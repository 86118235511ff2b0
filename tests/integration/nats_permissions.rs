//! Least privilege on NATS, with the authorization block `sagaflow security nats-config`
//! writes: each participant service connects as its own user and the orders complete; a
//! service cannot publish a reply as another service (the server refuses it) nor read another
//! service's commands; a reply on another service's subject that does reach the stream (here,
//! from the node's own user) is dead-lettered by the orchestrator.

use crate::common;

use std::path::Path;
use std::time::Duration;

use async_nats::jetstream::{self, consumer};
use common::checks::order;
use common::participant::{success, Handling, RawParticipant};
use common::*;
use prost::Message as _;
use sagaflow_proto::v1;

const SERVICES: [&str; 4] = ["payment", "inventory", "shipping", "notification"];

/// `sagaflow security nats-config` into `dir`.
fn generate(dir: &Path) {
    let mut cmd = std::process::Command::new(env!("CARGO_BIN_EXE_sagaflow"));
    cmd.args(["security", "nats-config", "--out"]).arg(dir);
    for s in SERVICES {
        cmd.args(["--service", s]);
    }
    let out = cmd.output().unwrap();
    assert!(out.status.success(), "{out:?}");
}

/// A connection as `user` (its seed in `dir/<user>.nk`), with the inbox prefix it may use.
async fn connect_as(
    url: &str,
    dir: &Path,
    user: &str,
    inbox: Option<String>,
) -> async_nats::Client {
    let seed = std::fs::read_to_string(dir.join(format!("{user}.nk"))).unwrap();
    let mut options = async_nats::ConnectOptions::new().nkey(seed.trim().to_string());
    if let Some(prefix) = inbox {
        options = options.custom_inbox_prefix(prefix);
    }
    within(TIMEOUT, "connect", options.connect(url))
        .await
        .unwrap()
        .unwrap()
}

async fn service_client(url: &str, dir: &Path, service: &str) -> async_nats::Client {
    connect_as(
        url,
        dir,
        &format!("svc-{service}"),
        Some(format!("_INBOX_{service}")),
    )
    .await
}

/// A participant for `service`, answering success, on its own user.
async fn participant(url: &str, dir: &Path, service: &str) -> RawParticipant {
    RawParticipant::start_on(
        service_client(url, dir, service).await,
        [service],
        Handling::InOrder,
        |_| {},
        |_| async { success(serde_json::json!({})) },
    )
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_service_acts_only_as_itself_on_nats() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    generate(d);
    let auth = std::fs::read_to_string(d.join("authorization.conf")).unwrap();
    let nats = within(
        TIMEOUT,
        "start nats-server",
        tokio::task::spawn_blocking(move || NatsServer::builder().config(auth).start()),
    )
    .await
    .unwrap()
    .unwrap()
    .unwrap();
    let url = nats.url();

    // The node as `node`, without demo services: each service is a participant of its own.
    let node = TestNode::on(&nats)
        .id("perm-1")
        .partitions(2)
        .without_demo()
        .env(
            "SAGAFLOW_NATS_CREDENTIALS__NKEY_FILE",
            d.join("node.nk").to_str().unwrap(),
        )
        .start()
        .await
        .unwrap();
    let node_js = jetstream::new(connect_as(&url, d, "node", None).await);

    // Every service but payment answers; the order waits at its charge.
    let mut others = Vec::new();
    for s in &SERVICES[1..] {
        others.push(participant(&url, d, s).await);
    }
    let mut orders = connect_orders(&node.grpc_addr.to_string()).await.unwrap();
    within(
        TIMEOUT,
        "PlaceOrder",
        orders.place_order(order("perm-1", 1999, &[("SKU-1", 1)])),
    )
    .await
    .unwrap()
    .unwrap();
    let saga_id = "order-perm-1";
    let partition = sagaflow_actors::hash::partition_of(saga_id, 2);
    let charge = v1::Reply {
        command_id: sagaflow::bus::command_id(saga_id, "charge", false, 1),
        saga_id: saga_id.into(),
        step: "charge".into(),
        attempt: 1,
        compensation: false,
        outcome: Some(v1::reply::Outcome::Success(v1::Success {
            output: b"{}".to_vec(),
        })),
    }
    .encode_to_vec();

    // Shipping's user may not publish a reply as payment: the server refuses it.
    let shipping = service_client(&url, d, "shipping").await;
    let forged = jetstream::new(shipping.clone())
        .publish(
            sagaflow::topology::reply_subject(partition, "payment"),
            charge.clone().into(),
        )
        .await;
    let stored = match forged {
        Ok(ack) => within(Duration::from_secs(5), "forged ack", async { ack.await })
            .await
            .ok()
            .and_then(Result::ok),
        Err(_) => None,
    };
    assert!(
        stored.is_none(),
        "a reply published as another service was stored: {stored:?}"
    );

    // Nor may it read payment's commands: no consumer on payment's filter…
    let commands = jetstream::new(shipping.clone());
    let stolen = within(Duration::from_secs(10), "steal a consumer", async {
        let stream = commands.get_stream("SAGA_COMMANDS").await?;
        stream
            .get_or_create_consumer(
                "svc-payment",
                consumer::pull::Config {
                    durable_name: Some("svc-payment".into()),
                    filter_subject: "sagaflow.cmd.payment.>".into(),
                    ..Default::default()
                },
            )
            .await
            .map_err(|e| Box::new(e) as Box<dyn std::error::Error + Send + Sync>)
    })
    .await;
    assert!(
        !matches!(stolen, Ok(Ok(_))),
        "shipping's user opened payment's consumer"
    );
    // …and no plain subscription to its subjects.
    let mut sub = shipping.subscribe("sagaflow.cmd.payment.>").await.unwrap();
    let got =
        tokio::time::timeout(Duration::from_secs(2), futures::StreamExt::next(&mut sub)).await;
    assert!(
        !matches!(got, Ok(Some(_))),
        "shipping received payment's commands"
    );

    // A reply on shipping's subject for payment's step, from a user allowed to publish it (the
    // node's), reaches the stream: the orchestrator dead-letters it.
    node_js
        .publish(
            sagaflow::topology::reply_subject(partition, "shipping"),
            charge.clone().into(),
        )
        .await
        .unwrap()
        .await
        .unwrap();
    let mut admin = sagaflow_proto::v1::admin_service_client::AdminServiceClient::new(
        channel(&node.grpc_addr.to_string()).await.unwrap(),
    );
    wait_until(
        Duration::from_secs(20),
        "the wrong-service dead letter",
        || {
            let mut admin = admin.clone();
            async move {
                admin
                    .list_dead_letters(v1::ListDeadLettersRequest::default())
                    .await
                    .is_ok_and(|r| {
                        r.into_inner()
                            .entries
                            .iter()
                            .any(|e| e.reason.contains("came from service `shipping`"))
                    })
            }
        },
    )
    .await
    .unwrap();
    let _ = &mut admin;

    // Payment, on its own user, answers: the order ships.
    others.push(participant(&url, d, "payment").await);
    wait_until(Duration::from_secs(60), "the order shipped", || {
        let mut orders = orders.clone();
        async move {
            orders
                .get_order(v1::GetOrderRequest {
                    order_id: "perm-1".into(),
                })
                .await
                .is_ok_and(|o| o.into_inner().status == "SHIPPED")
        }
    })
    .await
    .unwrap();
    for p in &others {
        assert_eq!(p.undecodable(), 0);
    }
    node.shutdown().await.unwrap();
}
