//! The order saga end to end on one node, against a real `nats-server`: outcomes, ledgers,
//! bad input, poison messages, a panicking participant, NATS restarts and a killed node.
use crate::common;

use common::checks::*;

use std::time::{Duration, Instant};

use async_nats::jetstream;
use common::*;
use futures::StreamExt;
use sagaflow::node::{self, NodeHandle};
use sagaflow_proto::v1::order_service_client::OrderServiceClient;
use sagaflow_proto::v1::{
    self, GetOrderRequest, GetSagaRequest, PlaceOrderRequest, StartSagaRequest,
};
use tonic::transport::Channel;
use tonic::Code;

/// A node of these tests: 4 partitions unless `env` says otherwise.
fn test_node(nats: &NatsServer, env: &[(&str, &str)]) -> TestNode {
    TestNode::on(nats).partitions(4).envs(env)
}

async fn start_node(
    nats: &NatsServer,
    env: &[(&str, &str)],
) -> (NodeHandle, OrderServiceClient<Channel>) {
    let node = test_node(nats, env).start().await.unwrap();
    let client = connect_orders(&node.grpc_addr.to_string()).await.unwrap();
    (node, client)
}

async fn wait_terminal(
    client: &mut OrderServiceClient<Channel>,
    id: &str,
    timeout: Duration,
) -> v1::Order {
    let deadline = Instant::now() + timeout;
    loop {
        let o = get_order(client, id).await.unwrap();
        if o.terminal {
            return o;
        }
        assert!(
            Instant::now() < deadline,
            "order {id} not terminal after {timeout:?}: {o:?}"
        );
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn happy_path_ships_and_placing_again_is_idempotent() {
    let nats = start_nats().await.unwrap();
    let (node, mut client) = start_node(&nats, &[]).await;
    let placed = client
        .place_order(order("happy-1", 1999, &[("SKU-1", 2), ("SKU-2", 1)]))
        .await
        .unwrap()
        .into_inner();
    assert!(placed.created);
    assert_eq!(placed.saga_id, "order-happy-1");
    assert_eq!(placed.status, "PENDING");
    // WatchOrder streams every change until the order is terminal, then ends.
    let mut watch = client
        .watch_order(GetOrderRequest {
            order_id: "happy-1".into(),
        })
        .await
        .unwrap()
        .into_inner();
    let mut seen = Vec::new();
    while let Some(update) = within(Duration::from_secs(30), "watch update", watch.next())
        .await
        .unwrap()
    {
        let update = update.unwrap();
        if seen.last() != Some(&update.status) {
            seen.push(update.status.clone());
        }
    }
    assert_eq!(
        seen.last().map(String::as_str),
        Some("SHIPPED"),
        "watch ends on the terminal status: {seen:?}"
    );
    assert!(
        seen.iter()
            .all(|s| ["PENDING", "PAID", "SHIPPED"].contains(&s.as_str())),
        "{seen:?}"
    );
    let o = wait_terminal(&mut client, "happy-1", Duration::from_secs(30)).await;
    assert_eq!(o.status, "SHIPPED", "{o:?}");
    assert_eq!(o.amount_cents, 1999);
    assert_eq!(o.items.len(), 2);
    let saga = o.saga.clone().unwrap();
    let names: Vec<&str> = saga.steps.iter().map(|s| s.name.as_str()).collect();
    assert_eq!(
        names,
        ["charge", "reserve", "prepare_shipment", "notify",],
        "the after-compensation step is not listed for an order that never compensated"
    );
    for s in &saga.steps {
        assert_eq!(s.state, "SUCCEEDED", "{s:?}");
        assert_eq!(s.attempts, 1);
        assert!(s.finished_at_unix_ms >= s.started_at_unix_ms && s.started_at_unix_ms > 0);
    }
    assert!(saga.history.iter().any(|h| h.what.contains("status PAID")));
    assert!(saga.compensations.is_empty());

    let again = client
        .place_order(order("happy-1", 1999, &[("SKU-1", 2), ("SKU-2", 1)]))
        .await
        .unwrap()
        .into_inner();
    assert!(
        !again.created,
        "placing the same order twice returns the same saga"
    );
    assert_eq!(again.status, "SHIPPED");
    // The same id with other content is not a repeat: ALREADY_EXISTS, naming what differs.
    let mut other = order("happy-1", 500, &[("SKU-9", 9)]);
    other.customer = "zed".into();
    let err = client.place_order(other).await.unwrap_err();
    assert_eq!(err.code(), Code::AlreadyExists, "{err:?}");
    assert!(
        err.message()
            .starts_with("order `happy-1` already exists with a different input (amount_cents, customer, items differ)"),
        "{}",
        err.message()
    );
    check_ledgers(&[o], &ledgers(&nats).await);
    let mut sagas = sagaflow_proto::v1::saga_service_client::SagaServiceClient::new(
        channel(&node.grpc_addr.to_string()).await.unwrap(),
    );
    let started = |input: &str| StartSagaRequest {
        saga_name: "order".into(),
        saga_id: "same-id-1".into(),
        input_json: input.into(),
    };
    let input = r#"{"order_id":"s1","customer":"ann","amount_cents":100,"items":[{"sku":"SKU-1","quantity":1}]}"#;
    assert!(
        sagas
            .start_saga(started(input))
            .await
            .unwrap()
            .into_inner()
            .created
    );
    // Key order and spacing aside, the same input is a repeat.
    let reordered = r#"{ "customer":"ann", "order_id":"s1","items":[{"sku":"SKU-1","quantity":1}],"amount_cents":100}"#;
    assert!(
        !sagas
            .start_saga(started(reordered))
            .await
            .unwrap()
            .into_inner()
            .created
    );
    let err = sagas
        .start_saga(started(&input.replace("100", "101")))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::AlreadyExists);
    assert!(
        err.message().contains("(amount_cents differ)"),
        "{}",
        err.message()
    );
    node.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn declined_payment_cancels_with_nothing_charged() {
    let nats = start_nats().await.unwrap();
    let (node, mut client) = start_node(&nats, &[]).await;
    client
        .place_order(order("big-1", 250_000, &[("SKU-1", 1)]))
        .await
        .unwrap();
    let o = wait_terminal(&mut client, "big-1", Duration::from_secs(30)).await;
    assert_eq!(o.status, "CANCELLED");
    assert!(o.reason.contains("declined"), "{}", o.reason);
    let saga = o.saga.clone().unwrap();
    assert_eq!(saga.steps[0].state, "FAILED");
    assert_eq!(saga.steps[0].attempts, 1, "a decline is not retried");
    assert_eq!(saga.steps[1].state, "SKIPPED");
    assert_eq!(saga.steps[4].state, "SUCCEEDED", "the customer is told");
    let l = ledgers(&nats).await;
    assert_eq!(l.get("order-big-1").map(|e| e.charged), Some(0));
    check_ledgers(&[o], &l);
    node.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn out_of_stock_refunds_the_charge_exactly_once() {
    let nats = start_nats().await.unwrap();
    let (node, mut client) = start_node(&nats, &[]).await;
    client
        .place_order(order("oos-1", 4200, &[("SKU-1", 1), ("SKU-OUT", 1)]))
        .await
        .unwrap();
    let o = wait_terminal(&mut client, "oos-1", Duration::from_secs(30)).await;
    assert_eq!(o.status, "CANCELLED");
    assert!(o.reason.contains("out_of_stock"), "{}", o.reason);
    let saga = o.saga.clone().unwrap();
    assert_eq!(saga.steps[0].state, "COMPENSATED");
    // The refused reservation undoes nothing; the steps that ran beside it are compensated
    // (the parallel stage in reverse definition order), then the charge.
    let trail: Vec<&str> = saga.compensations.iter().map(|c| c.step.as_str()).collect();
    assert_eq!(
        trail,
        ["notify", "prepare_shipment", "charge"],
        "the charge is undone last: {trail:?}"
    );
    let l = ledgers(&nats).await;
    let e = l.get("order-oos-1").cloned().unwrap_or_default();
    assert_eq!((e.charged, e.refunded), (1, 1));
    assert_eq!(
        (
            e.notified,
            e.notification_withdrawn,
            e.notified_cancellation
        ),
        (1, 1, 1),
        "the confirmation sent beside the reservation is withdrawn, then the customer told: {e:?}"
    );
    check_ledgers(&[o], &l);
    node.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_requests_are_refused_naming_the_field_and_unknown_ids_are_not_found() {
    let nats = start_nats().await.unwrap();
    let (node, mut client) = start_node(&nats, &[]).await;
    let cases: Vec<(PlaceOrderRequest, &str)> = vec![
        (order("", 100, &[("SKU-1", 1)]), "order_id"),
        (order("a/b", 100, &[("SKU-1", 1)]), "order_id"),
        (order("ok", 0, &[("SKU-1", 1)]), "amount_cents"),
        (order("ok", -1, &[("SKU-1", 1)]), "amount_cents"),
        (order("ok", 100, &[]), "items"),
        (order("ok", 100, &[("bad sku", 1)]), "items[0].sku"),
        (order("ok", 100, &[("SKU-1", 0)]), "items[0].quantity"),
        (order(&"x".repeat(5000), 100, &[("SKU-1", 1)]), "order_id"),
        (
            PlaceOrderRequest {
                customer: String::new(),
                ..order("ok", 100, &[("SKU-1", 1)])
            },
            "customer",
        ),
    ];
    for (req, field) in cases {
        let err = client.place_order(req).await.unwrap_err();
        assert_eq!(err.code(), Code::InvalidArgument, "{field}: {err:?}");
        assert!(
            err.message().starts_with(field),
            "{field}: {}",
            err.message()
        );
    }
    // Health and reflection are served, so grpcurl works without the proto files.
    let channel = channel(&node.grpc_addr.to_string()).await.unwrap();
    let mut health = tonic_health::pb::health_client::HealthClient::new(channel);
    let status = health
        .check(tonic_health::pb::HealthCheckRequest {
            service: "sagaflow.v1.OrderService".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        status.status,
        tonic_health::pb::health_check_response::ServingStatus::Serving as i32
    );
    // Both reflection versions list the services: v1, and v1alpha for grpcurl < 1.9, IDE
    // plugins and Postman.
    let reflection = common::channel(&node.grpc_addr.to_string()).await.unwrap();
    {
        use tonic_reflection::pb::v1::server_reflection_client::ServerReflectionClient;
        use tonic_reflection::pb::v1::server_reflection_request::MessageRequest;
        use tonic_reflection::pb::v1::server_reflection_response::MessageResponse;
        use tonic_reflection::pb::v1::ServerReflectionRequest;
        let request = ServerReflectionRequest {
            host: String::new(),
            message_request: Some(MessageRequest::ListServices(String::new())),
        };
        let mut answers = ServerReflectionClient::new(reflection.clone())
            .server_reflection_info(futures::stream::iter([request]))
            .await
            .unwrap()
            .into_inner();
        let Some(MessageResponse::ListServicesResponse(list)) =
            answers.message().await.unwrap().unwrap().message_response
        else {
            panic!("v1: no service list")
        };
        assert!(list
            .service
            .iter()
            .any(|s| s.name == "sagaflow.v1.OrderService"));
    }
    {
        use tonic_reflection::pb::v1alpha::server_reflection_client::ServerReflectionClient;
        use tonic_reflection::pb::v1alpha::server_reflection_request::MessageRequest;
        use tonic_reflection::pb::v1alpha::server_reflection_response::MessageResponse;
        use tonic_reflection::pb::v1alpha::ServerReflectionRequest;
        let request = ServerReflectionRequest {
            host: String::new(),
            message_request: Some(MessageRequest::ListServices(String::new())),
        };
        let mut answers = ServerReflectionClient::new(reflection)
            .server_reflection_info(futures::stream::iter([request]))
            .await
            .unwrap()
            .into_inner();
        let Some(MessageResponse::ListServicesResponse(list)) =
            answers.message().await.unwrap().unwrap().message_response
        else {
            panic!("v1alpha: no service list")
        };
        assert!(list
            .service
            .iter()
            .any(|s| s.name == "sagaflow.v1.OrderService"));
    }
    // Oversize message: refused by the server, not a crash.
    let huge = PlaceOrderRequest {
        customer: "c".repeat(2 * 1024 * 1024),
        ..order("ok", 100, &[("SKU-1", 1)])
    };
    assert!(client.place_order(huge).await.is_err());

    let err = client
        .get_order(GetOrderRequest {
            order_id: "nope".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::NotFound);
    let err = client
        .watch_order(GetOrderRequest {
            order_id: "nope".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::NotFound);
    let mut sagas = connect_sagas(&node.grpc_addr.to_string()).await.unwrap();
    let err = sagas
        .get_saga(GetSagaRequest {
            saga_id: "nope".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::NotFound);
    let err = sagas
        .start_saga(StartSagaRequest {
            saga_name: "nope".into(),
            saga_id: String::new(),
            input_json: "{}".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    assert!(err.message().starts_with("saga_name"));
    let err = sagas
        .start_saga(StartSagaRequest {
            saga_name: "order".into(),
            saga_id: String::new(),
            input_json: "{oops".into(),
        })
        .await
        .unwrap_err();
    assert!(err.message().starts_with("input_json"), "{}", err.message());
    // Nothing was created by the bad requests, and the node still works.
    client
        .place_order(order("after-bad", 500, &[("SKU-3", 1)]))
        .await
        .unwrap();
    assert_eq!(
        wait_terminal(&mut client, "after-bad", Duration::from_secs(30))
            .await
            .status,
        "SHIPPED"
    );
    node.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn poison_messages_are_dead_lettered_and_the_node_keeps_going() {
    let nats = start_nats().await.unwrap();
    let (node, mut client) = start_node(&nats, &[]).await;
    let js = jetstream::new(nats_client(&nats.url()).await.unwrap());
    for (subject, payload) in [
        (
            "sagaflow.evt.1.order-x.reply",
            &b"\xff\xfe not protobuf"[..],
        ),
        ("sagaflow.evt.1.order-x.start", &b"\x09\x09"[..]),
        ("sagaflow.cmd.payment.charge", &b"\xff\xff\xff"[..]),
    ] {
        within(TIMEOUT, "publish poison", async {
            js.publish(subject, payload.to_vec().into())
                .await
                .unwrap()
                .await
                .unwrap()
        })
        .await
        .unwrap();
    }
    let dlq = js.get_stream("SAGA_DLQ").await.unwrap();
    wait_until(Duration::from_secs(20), "3 dead letters", || {
        let mut dlq = dlq.clone();
        async move {
            dlq.info()
                .await
                .map(|i| i.state.messages == 3)
                .unwrap_or(false)
        }
    })
    .await
    .unwrap();
    for seq in 1..=3u64 {
        let m = dlq.get_raw_message(seq).await.unwrap();
        let headers = m.headers;
        let reason = headers
            .get(sagaflow::dlq::REASON)
            .map(|v| v.to_string())
            .unwrap_or_default();
        assert!(!reason.is_empty(), "dead letter {seq} has a reason");
        assert!(headers.get(sagaflow::dlq::SUBJECT).is_some());
        assert!(!m.payload.is_empty(), "original bytes are kept");
    }
    client
        .place_order(order("after-poison", 500, &[("SKU-3", 1)]))
        .await
        .unwrap();
    assert_eq!(
        wait_terminal(&mut client, "after-poison", Duration::from_secs(30))
            .await
            .status,
        "SHIPPED"
    );
    node.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_thousand_concurrent_orders_all_finish_with_consistent_ledgers() {
    let nats = start_nats().await.unwrap();
    let (node, client) = start_node(&nats, &[]).await;
    let started = Instant::now();
    let ids = place_mix(&client, "bulk", 1000).await;
    let placed = started.elapsed();
    let orders = wait_all_terminal(&client, &ids, Duration::from_secs(240)).await;
    let drained = started.elapsed();
    let shipped = orders.iter().filter(|o| o.status == "SHIPPED").count();
    let cancelled = orders.iter().filter(|o| o.status == "CANCELLED").count();
    println!("1000 orders: placed in {placed:?}, all terminal after {drained:?}: {shipped} shipped, {cancelled} cancelled");
    assert_eq!(shipped + cancelled, 1000);
    assert_eq!(
        cancelled,
        100 + (0..1000).filter(|i| i % 15 == 7 && i % 10 != 3).count()
    );
    check_ledgers(&orders, &ledgers(&nats).await);

    // The analytics consumer group saw every completed order, with matching totals.
    let revenue: i64 = orders
        .iter()
        .filter(|o| o.status == "SHIPPED")
        .map(|o| o.amount_cents)
        .sum();
    let mut analytics = connect_analytics(&node.grpc_addr.to_string())
        .await
        .unwrap();
    wait_until(Duration::from_secs(30), "analytics totals", || {
        let mut a = analytics.clone();
        async move {
            a.get_sales(v1::GetSalesRequest {})
                .await
                .map(|r| r.into_inner().completed_orders == shipped as u64)
                .unwrap_or(false)
        }
    })
    .await
    .unwrap();
    let report = analytics
        .get_sales(v1::GetSalesRequest {})
        .await
        .unwrap()
        .into_inner();
    assert_eq!(report.revenue_cents, revenue as u64);
    let units: u64 = report.skus.iter().map(|s| s.units).sum();
    let expected_units: u64 = orders
        .iter()
        .filter(|o| o.status == "SHIPPED")
        .flat_map(|o| o.items.iter())
        .map(|i| u64::from(i.quantity))
        .sum();
    assert_eq!(units, expected_units);
    node.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_panicking_service_instance_is_restarted_and_nothing_is_lost() {
    let nats = start_nats().await.unwrap();
    let (node, client) = start_node(
        &nats,
        &[
            ("SAGAFLOW_DEMO__PANIC_RATE", "0.05"),
            ("SAGAFLOW_CONSUMERS__COMMAND_ACK_WAIT", "3"),
        ],
    )
    .await;
    let ids = place_mix(&client, "panic", 150).await;
    let orders = wait_all_terminal(&client, &ids, Duration::from_secs(180)).await;
    check_ledgers(&orders, &ledgers(&nats).await);
    let demo = node.demo().unwrap();
    let mut restarts = 0;
    for pool in demo.services().iter().map(|s| s.pool()) {
        restarts += ractor::call_t!(
            pool,
            sagaflow_participant::pool::ServicePoolMsg::Stats,
            5_000
        )
        .unwrap()
        .restarts;
    }
    assert!(
        restarts > 0,
        "with a 5% panic rate over ~600 commands some instance must have panicked"
    );
    println!("150 orders with injected panics: {restarts} instance restarts, all terminal, ledgers exact");
    node.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_node_rides_out_a_nats_restart() {
    let nats = start_nats().await.unwrap();
    let (node, client) = start_node(&nats, &[]).await;
    let first = place_mix(&client, "before", 100).await;
    tokio::task::block_in_place(|| nats.restart()).unwrap();
    let mut ids = first;
    // Placing may fail while the client reconnects: retry each until accepted.
    for i in 0..50 {
        let id = format!("after-{i}");
        wait_until(Duration::from_secs(30), "place after restart", || {
            let mut c = client.clone();
            let id = id.clone();
            async move {
                c.place_order(order(&id, 700, &[("SKU-6", 1)]))
                    .await
                    .is_ok()
            }
        })
        .await
        .unwrap();
        ids.push(id);
    }
    let orders = wait_all_terminal(&client, &ids, Duration::from_secs(180)).await;
    check_ledgers(&orders, &ledgers(&nats).await);
    node.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_node_waits_for_nats_at_start() {
    // Start the node against a port with no server yet: it must retry, not fail or panic.
    let port = free_port();
    let url = format!("nats://127.0.0.1:{port}");
    let dir = tempfile::tempdir().unwrap();
    let cfg = TestNode::on_urls(&[url]).id("late").partitions(2).config();
    let starting = tokio::spawn(node::start(cfg));
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert!(
        !starting.is_finished(),
        "the node must keep retrying while NATS is down"
    );
    let nats = tokio::task::spawn_blocking(move || {
        NatsServer::builder()
            .port(port)
            .store_dir(dir.path().to_path_buf())
            .start()
            .map(|s| (s, dir))
    })
    .await
    .unwrap()
    .unwrap();
    let node = within(
        Duration::from_secs(60),
        "node start after nats came up",
        starting,
    )
    .await
    .unwrap()
    .unwrap()
    .unwrap();
    let mut client = connect_orders(&node.grpc_addr.to_string()).await.unwrap();
    client
        .place_order(order("late-1", 900, &[("SKU-1", 1)]))
        .await
        .unwrap();
    assert_eq!(
        wait_terminal(&mut client, "late-1", Duration::from_secs(30))
            .await
            .status,
        "SHIPPED"
    );
    node.shutdown().await.unwrap();
    drop(nats);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_killed_mid_run_resumes_every_saga_exactly_once() {
    let nats = start_nats().await.unwrap();
    let mut proc = NodeProcess::start_with(
        NodeOptions::new("victim", &[nats.url()])
            .env("SAGAFLOW_DEMO__LATENCY_MS", "500")
            .env("SAGAFLOW_PARTITIONS", "4"),
    )
    .unwrap();
    let client = proc.connect_orders().await.unwrap();
    let ids = place_mix(&client, "crash", 300).await;
    // Kill it while sagas are in flight, then start it again. Every order needs at least three
    // stages of 500 ms after it is placed, so the last one placed is still running here even
    // when admission control held it back until the node was idle (a loaded CI machine, 64
    // demo instances per service: with 20 ms it had finished).
    let last = client
        .clone()
        .get_order(GetOrderRequest {
            order_id: ids[ids.len() - 1].clone(),
        })
        .await
        .unwrap()
        .into_inner();
    proc.kill();
    assert!(!last.terminal, "the kill must hit sagas in flight");
    proc.restart().unwrap();
    let client = proc.connect_orders().await.unwrap();
    let orders = wait_all_terminal(&client, &ids, Duration::from_secs(240)).await;
    let unfinished_at_kill = orders.len();
    check_ledgers(&orders, &ledgers(&nats).await);
    println!(
        "kill -9 mid-run: {unfinished_at_kill} orders all terminal after restart, ledgers exact"
    );
}

/// Admission control: while step attempts use more than a quarter of their timeout, a new
/// order is refused with `RESOURCE_EXHAUSTED` and a retry delay, and nothing is written for
/// it; the orders admitted before still finish; once the load is gone, the same order is
/// admitted. Here every participant answers after 400 ms and the steps time out after 1 s.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_overloaded_node_refuses_new_orders_until_it_recovers() {
    use tonic_types::StatusExt;

    let nats = start_nats().await.unwrap();
    let sagas = tempfile::tempdir().unwrap();
    let order_saga = std::fs::read_to_string(repo_dir().join("sagas/order.toml")).unwrap();
    assert!(order_saga.contains("timeout = \"10s\""));
    std::fs::write(
        sagas.path().join("order.toml"),
        order_saga.replace("timeout = \"10s\"", "timeout = \"1s\""),
    )
    .unwrap();
    let node = test_node(&nats, &[("SAGAFLOW_DEMO__LATENCY_MS", "400")])
        .saga_dir(sagas.path())
        .start()
        .await
        .unwrap();
    let mut client = connect_orders(&node.grpc_addr.to_string()).await.unwrap();

    // A steady stream of orders (25 a second, so each step has the 10 attempts a second that
    // count as evidence; bounded: 300) until one is refused.
    let mut admitted = Vec::new();
    let mut refused = None;
    for i in 0..300 {
        let id = format!("adm-{i}");
        let sku = format!("SKU-{}", 1 + i % 9);
        match within(
            TIMEOUT,
            "PlaceOrder",
            client.place_order(order(&id, 1999, &[(sku.as_str(), 1)])),
        )
        .await
        .unwrap()
        {
            Ok(_) => admitted.push(id),
            Err(status) => {
                refused = Some((id, sku, status));
                break;
            }
        }
        tokio::time::sleep(Duration::from_millis(40)).await;
    }
    let (id, sku, status) = refused.expect("an order refused while attempts take 40 % of 1 s");
    assert!(!admitted.is_empty(), "the first orders were admitted");
    assert_eq!(status.code(), Code::ResourceExhausted, "{status:?}");
    assert!(
        status.message().contains("admission.max_timeout_share"),
        "{status:?}"
    );
    assert_eq!(
        status.get_details_retry_info().map(|r| r.retry_delay),
        Some(Some(Duration::from_secs(1))),
        "{status:?}"
    );
    // Nothing was written for the refused order.
    let unknown = get_order(&mut client, &id).await.unwrap_err();
    assert_eq!(unknown.code(), Code::NotFound, "{unknown:?}");
    let metrics = within(TIMEOUT, "scrape", http_get(node.http_addr, "/metrics"))
        .await
        .unwrap()
        .unwrap()
        .1;
    assert!(
        sample_sum(&metrics, "sagaflow_sagas_refused_total").unwrap_or(0.0) >= 1.0,
        "{metrics}"
    );
    assert!(sample_sum(&metrics, "sagaflow_admission_pressure").is_some());

    // Every admitted order still ends.
    for admitted_id in &admitted {
        wait_terminal(&mut client, admitted_id, Duration::from_secs(60)).await;
    }
    // Idle, the pressure decays and the refused order is admitted when placed again.
    wait_until(Duration::from_secs(30), "the order admitted", || {
        let mut client = client.clone();
        let request = order(&id, 1999, &[(sku.as_str(), 1)]);
        async move { client.place_order(request).await.is_ok() }
    })
    .await
    .unwrap();
    let o = wait_terminal(&mut client, &id, Duration::from_secs(60)).await;
    assert!(o.terminal, "{o:?}");
    node.shutdown().await.unwrap();
}

/// With `streams.status_events = "core"`, lifecycle events reach connected subscribers as
/// plain NATS messages and nothing stores them (no `SAGA_STATUS` stream); orders, `WatchOrder`
/// and the cluster status work as before.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_events_as_core_messages_reach_subscribers_and_are_not_stored() {
    use prost::Message as _;
    use sagaflow_proto::v1::admin_service_client::AdminServiceClient;

    let nats = start_nats().await.unwrap();
    let nc = nats_client(&nats.url()).await.unwrap();
    let mut events = nc
        .subscribe("sagaflow.status.order.order-core-1")
        .await
        .unwrap();
    nc.flush().await.unwrap();
    let (node, mut client) =
        start_node(&nats, &[("SAGAFLOW_STREAMS__STATUS_EVENTS", "core")]).await;
    client
        .place_order(order("core-1", 1999, &[("SKU-1", 1)]))
        .await
        .unwrap();
    let mut seen = Vec::new();
    while seen.last().is_none_or(|e: &v1::StatusEvent| !e.terminal) {
        let msg = within(TIMEOUT, "status event", events.next())
            .await
            .unwrap()
            .unwrap();
        seen.push(v1::StatusEvent::decode(msg.payload).unwrap());
    }
    let changes: Vec<(&str, &str, u64)> = seen
        .iter()
        .map(|e| (e.previous_status.as_str(), e.status.as_str(), e.sequence))
        .collect();
    assert_eq!(
        changes,
        [
            ("", "PENDING", 1),
            ("PENDING", "PAID", 2),
            ("PAID", "SHIPPED", 3)
        ]
    );
    let o = wait_terminal(&mut client, "core-1", Duration::from_secs(30)).await;
    assert_eq!(o.status, "SHIPPED");

    // Nothing stored them.
    let js = jetstream::new(nc.clone());
    assert!(
        js.get_stream(sagaflow::topology::STATUS_STREAM)
            .await
            .is_err(),
        "SAGA_STATUS was created"
    );
    // The cluster status lists the consumers of the streams that exist.
    let mut admin = AdminServiceClient::new(channel(&node.grpc_addr.to_string()).await.unwrap());
    let status = within(
        TIMEOUT,
        "ClusterStatus",
        admin.cluster_status(v1::ClusterStatusRequest {}),
    )
    .await
    .unwrap()
    .unwrap()
    .into_inner();
    assert!(
        status.consumers.iter().any(|c| c.name == "svc-payment"),
        "{status:?}"
    );
    node.shutdown().await.unwrap();
}

/// `ListOrders` pages through the node's index, newest first: pages do not overlap or skip
/// when orders are placed between them, the status filter holds on every page, and a token
/// that no response gave is `INVALID_ARGUMENT`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn orders_are_listed_in_pages_newest_first() {
    let nats = start_nats().await.unwrap();
    let (node, mut client) = start_node(&nats, &[]).await;
    let mut placed = Vec::new();
    for i in 0..23 {
        // Every fifth above the payment limit: CANCELLED.
        let amount = if i % 5 == 0 { 150_000 } else { 1_000 };
        let id = format!("page-{i:02}");
        client
            .place_order(order(&id, amount, &[("SKU-1", 1)]))
            .await
            .unwrap();
        placed.push(id);
        // Distinct start times, so newest-first is a strict order.
        tokio::time::sleep(Duration::from_millis(3)).await;
    }
    for id in &placed {
        wait_terminal(&mut client, id, Duration::from_secs(60)).await;
    }
    let lister = client.clone();
    let list = |status: &str, page_size: u32, page_token: String| {
        let mut client = lister.clone();
        let status = status.to_string();
        async move {
            client
                .list_orders(v1::ListOrdersRequest {
                    status,
                    page_size,
                    page_token,
                })
                .await
                .map(|r| r.into_inner())
        }
    };
    let first = list("", 10, String::new()).await.unwrap();
    assert_eq!(first.orders.len(), 10);
    assert!(!first.next_page_token.is_empty());
    // Placed between pages: newer than the cursor, so on no later page.
    client
        .place_order(order("page-late", 1_000, &[("SKU-1", 1)]))
        .await
        .unwrap();
    let mut seen: Vec<String> = first.orders.iter().map(|o| o.order_id.clone()).collect();
    let mut token = first.next_page_token;
    while !token.is_empty() {
        let page = list("", 10, token).await.unwrap();
        assert!(page.orders.len() <= 10);
        seen.extend(page.orders.iter().map(|o| o.order_id.clone()));
        token = page.next_page_token;
    }
    let mut newest_first = placed.clone();
    newest_first.reverse();
    assert_eq!(seen, newest_first, "every order once, newest first");

    let mut cancelled = Vec::new();
    let mut token = String::new();
    loop {
        let page = list("cancelled", 2, token).await.unwrap();
        assert!(page.orders.iter().all(|o| o.status == "CANCELLED"));
        cancelled.extend(page.orders.iter().map(|o| o.order_id.clone()));
        token = page.next_page_token;
        if token.is_empty() {
            break;
        }
    }
    let want: Vec<String> = newest_first
        .iter()
        .filter(|id| id[5..].parse::<u32>().unwrap() % 5 == 0)
        .cloned()
        .collect();
    assert_eq!(cancelled, want);

    let err = list("BOGUS", 10, String::new()).await.unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    assert_eq!(
        err.message(),
        "status: no order status \"BOGUS\"; one of PENDING, PAID, SHIPPED, CANCELLED, FAILED, NEEDS_ATTENTION"
    );
    for bad in ["7", "x.y", "1.a b"] {
        let err = list("", 10, bad.into()).await.unwrap_err();
        assert_eq!(err.code(), Code::InvalidArgument, "{bad}");
        assert!(
            err.message().starts_with("page_token:"),
            "{}",
            err.message()
        );
    }
    node.shutdown().await.unwrap();
}
