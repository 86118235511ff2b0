//! The harness itself: a real `nats-server` starts, restarts on the same port with its store,
//! and answers JetStream requests; `wait_until` polls and times out.
use crate::common;

use std::time::Duration;

use common::{nats_client, start_nats, wait_until, within, TIMEOUT};

#[tokio::test]
async fn nats_server_restarts_with_its_store() -> anyhow::Result<()> {
    let server = start_nats().await?;
    let url = server.url();
    let js = async_nats::jetstream::new(nats_client(&url).await?);
    let account = within(TIMEOUT, "query account", js.query_account()).await??;
    assert_eq!(account.streams, 0);
    let config = async_nats::jetstream::stream::Config {
        name: "SMOKE".into(),
        subjects: vec!["smoke.>".into()],
        ..Default::default()
    };
    within(TIMEOUT, "create stream", js.create_stream(config)).await??;
    within(TIMEOUT, "publish", async {
        js.publish("smoke.1", "x".into()).await?.await
    })
    .await??;

    let server = within(
        TIMEOUT,
        "restart",
        tokio::task::spawn_blocking(move || server.restart().map(|()| server)),
    )
    .await???;
    assert_eq!(server.url(), url, "same port after restart");

    // A fresh connection sees the stream and its message: the store survived.
    let js = async_nats::jetstream::new(nats_client(&url).await?);
    let mut stream = within(TIMEOUT, "get stream", js.get_stream("SMOKE")).await??;
    let info = within(TIMEOUT, "stream info", stream.info()).await??;
    assert_eq!(info.state.messages, 1);

    server.stop()?;
    assert!(!server.is_running());
    Ok(())
}

#[tokio::test]
async fn wait_until_polls_and_times_out() {
    let start = std::time::Instant::now();
    let mut n = 0;
    wait_until(Duration::from_secs(5), "three polls", || {
        n += 1;
        let done = n >= 3;
        async move { done }
    })
    .await
    .unwrap();
    assert_eq!(n, 3);
    let err = wait_until(Duration::from_millis(200), "never", || async { false })
        .await
        .unwrap_err();
    assert!(err.to_string().contains("waiting for never"), "{err}");
    assert!(start.elapsed() < Duration::from_secs(5));
    assert_ne!(common::free_port(), 0);
}

#[tokio::test]
async fn node_process_serves_and_terminates() -> anyhow::Result<()> {
    let nats = start_nats().await?;
    let mut node =
        common::NodeProcess::start("smoke-1", &nats.url(), &[("SAGAFLOW_PARTITIONS", "4")])?;
    let mut orders = node.connect_orders().await?;
    let request = sagaflow_proto::v1::ListOrdersRequest::default();
    within(TIMEOUT, "list orders", orders.list_orders(request)).await??;
    assert!(node.is_running());
    drop(orders);
    let status = node.terminate(Duration::from_secs(30))?;
    assert!(
        status.success(),
        "node exit status {status}; log:\n{}",
        node.log_tail(40)
    );
    assert!(!node.is_running());
    Ok(())
}

#[tokio::test]
async fn a_node_whose_nats_is_gone_still_stops_promptly_on_sigterm() -> anyhow::Result<()> {
    let nats = start_nats().await?;
    let mut node = common::NodeProcess::start(
        "smoke-2",
        &nats.url(),
        &[
            ("SAGAFLOW_PARTITIONS", "4"),
            ("SAGAFLOW_DEMO_SERVICES", "true"),
        ],
    )?;
    let mut orders = node.connect_orders().await?;
    let request = sagaflow_proto::v1::ListOrdersRequest::default();
    within(TIMEOUT, "list orders", orders.list_orders(request)).await??;
    drop(orders);
    // gRPC answers before the node has joined the cluster: wait until it has finished
    // starting, so what is stopped below is a running node (a node still starting stops
    // at once, without the shutdown path this test is about).
    wait_until(TIMEOUT, "the node to finish starting", || {
        let ready = node.log_tail(200).contains("node ready");
        async move { ready }
    })
    .await?;
    // NATS goes away for good: nothing can be handed back, and the node must not wait for it
    // (its partitions expire with their ttl).
    nats.stop()?;
    wait_until(TIMEOUT, "the node to notice", || {
        let seen = node.log_tail(100).contains("disconnected from nats");
        async move { seen }
    })
    .await?;
    let started = std::time::Instant::now();
    let status = node.terminate(Duration::from_secs(30))?;
    assert!(
        status.success(),
        "node exit status {status}; log:\n{}",
        node.log_tail(40)
    );
    assert!(
        started.elapsed() < Duration::from_secs(20),
        "took {:?} to stop; log:\n{}",
        started.elapsed(),
        node.log_tail(40)
    );
    assert!(node.log_tail(200).contains("NATS unreachable"));
    Ok(())
}
