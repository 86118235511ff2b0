//! A command no instance can handle (every handler panics) is redelivered up to the
//! consumer's `max_deliver`, then JetStream's max-deliveries advisory turns it into a dead
//! letter with the original bytes and the reason, instead of it silently stopping.
use crate::common;

use std::time::Duration;

use async_nats::jetstream;
use common::checks::order;
use common::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_command_that_exhausts_its_deliveries_is_dead_lettered() {
    let nats = start_nats().await.unwrap();
    let node = TestNode::on(&nats)
        .id("md-1")
        .partitions(2)
        .envs(&[
            ("SAGAFLOW_DEMO__PANIC_RATE", "1.0"),
            ("SAGAFLOW_CONSUMERS__COMMAND_MAX_DELIVER", "2"),
            ("SAGAFLOW_CONSUMERS__COMMAND_ACK_WAIT", "1"),
        ])
        .http()
        .start()
        .await
        .unwrap();
    let mut client = connect_orders(&node.grpc_addr.to_string()).await.unwrap();
    client
        .place_order(order("md-1", 900, &[("SKU-1", 1)]))
        .await
        .unwrap();

    let js = jetstream::new(nats_client(&nats.url()).await.unwrap());
    let dlq = js.get_stream("SAGA_DLQ").await.unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    let m = loop {
        if let Ok(m) = within(
            TIMEOUT,
            "read the DLQ",
            dlq.get_last_raw_message_by_subject("sagaflow.dlq.commands"),
        )
        .await
        .unwrap()
        {
            let reason = m
                .headers
                .get(sagaflow::dlq::REASON)
                .map(|v| v.to_string())
                .unwrap_or_default();
            if reason.contains("max_deliver reached") {
                break m;
            }
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the exhausted charge command never reached the DLQ"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let origin = m
        .headers
        .get(sagaflow::dlq::ORIGIN)
        .map(|v| v.to_string())
        .unwrap_or_default();
    assert!(origin.starts_with("SAGA_COMMANDS:"), "{origin}");
    let subject = m
        .headers
        .get(sagaflow::dlq::SUBJECT)
        .map(|v| v.to_string())
        .unwrap_or_default();
    assert_eq!(subject, "sagaflow.cmd.payment.charge");
    // The original bytes are kept: they decode as the command that was never handled.
    let cmd = <sagaflow_proto::v1::Command as prost::Message>::decode(m.payload.as_ref()).unwrap();
    assert_eq!(cmd.saga_id, "order-md-1");
    node.shutdown().await.unwrap();
}
