//! A node on a NATS server that requires authentication and TLS: with the right credentials
//! (user and password, an nkey seed) it runs orders to the end; with wrong ones it keeps
//! retrying without ever logging the password it was given.

use crate::common;

use std::time::Duration;

use common::certs::gen_certs;
use common::checks::order;
use common::*;

/// Starts a nats-server with `extra` configuration (off the runtime's threads).
async fn nats_with(extra: String) -> NatsServer {
    within(
        TIMEOUT,
        "start nats-server",
        tokio::task::spawn_blocking(move || NatsServer::builder().config(extra).start()),
    )
    .await
    .unwrap()
    .unwrap()
    .unwrap()
}

/// Places one order on `node` and waits for it to ship.
async fn ships(node: &sagaflow::node::NodeHandle, id: &str) {
    let mut client = connect_orders(&node.grpc_addr.to_string()).await.unwrap();
    within(
        TIMEOUT,
        "PlaceOrder",
        client.place_order(order(id, 1999, &[("SKU-1", 1)])),
    )
    .await
    .unwrap()
    .unwrap();
    let what = format!("{id} shipped");
    wait_until(Duration::from_secs(60), &what, || {
        let mut client = client.clone();
        async move {
            client
                .get_order(sagaflow_proto::v1::GetOrderRequest {
                    order_id: id.to_string(),
                })
                .await
                .is_ok_and(|o| o.into_inner().status == "SHIPPED")
        }
    })
    .await
    .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_authenticates_to_nats_over_tls_and_never_logs_its_password() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    gen_certs(d);
    let user = nkeys::KeyPair::new_user();
    let seed_file = d.join("node.nk");
    std::fs::write(&seed_file, user.seed().unwrap()).unwrap();
    let nats = nats_with(format!(
        "tls {{\n  cert_file: \"{}\"\n  key_file: \"{}\"\n}}\n\
         authorization {{\n  users = [\n    {{ user: \"node\", password: \"s3cret-pw\" }}\n    {{ nkey: \"{}\" }}\n  ]\n}}\n",
        d.join("node.crt").display(),
        d.join("node.key").display(),
        user.public_key()
    ))
    .await;
    let ca_file = d.join("ca.crt");

    // User and password, TLS verified against the CA.
    let node = TestNode::on(&nats)
        .id("nats-auth-1")
        .partitions(2)
        .env("SAGAFLOW_NATS_TLS__CA", ca_file.to_str().unwrap())
        .env("SAGAFLOW_NATS_CREDENTIALS__USER", "node")
        .env("SAGAFLOW_NATS_CREDENTIALS__PASSWORD", "s3cret-pw")
        .start()
        .await
        .unwrap();
    ships(&node, "na-1").await;
    node.shutdown().await.unwrap();

    // An nkey seed file.
    let node = TestNode::on(&nats)
        .id("nats-auth-2")
        .partitions(2)
        .env("SAGAFLOW_NATS_TLS__CA", ca_file.to_str().unwrap())
        .env(
            "SAGAFLOW_NATS_CREDENTIALS__NKEY_FILE",
            seed_file.to_str().unwrap(),
        )
        .start()
        .await
        .unwrap();
    ships(&node, "na-2").await;
    node.shutdown().await.unwrap();

    // A wrong password in the URL: the node keeps retrying, and its log names the server
    // without the password.
    let url = format!("nats://node:wrong-pw-123@127.0.0.1:{}", nats.port());
    let mut process = NodeProcess::start_with(
        NodeOptions::new("nats-auth-3", &[url])
            .env("SAGAFLOW_NATS_TLS__CA", ca_file.to_str().unwrap()),
    )
    .unwrap();
    wait_until(Duration::from_secs(30), "a retry logged", || {
        let log = process.log();
        async move { log.contains("cannot reach nats") }
    })
    .await
    .unwrap_or_else(|e| panic!("{e}: {}", process.log()));
    let log = process.log();
    assert!(!log.contains("wrong-pw-123"), "{log}");
    assert!(log.contains("***@127.0.0.1"), "{log}");
    assert!(process.is_running());
    process.kill();
}
