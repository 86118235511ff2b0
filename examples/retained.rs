//! Take-over and list latency with many retained finished sagas: the figures of
//! "Retained sagas" in `docs/benchmarks.md`.
//!
//! ```text
//! cargo run --release --example retained -- [FINISHED] [RUNNING]     (defaults 100000 1000)
//! ```
//!
//! On a `nats-server` of its own (loopback, a temporary store) it writes FINISHED finished
//! order snapshots (nine in ten SHIPPED, one in ten CANCELLED, each with the 7-day retention
//! TTL) and RUNNING unfinished orders whose creation was cut short (nothing published), then
//! measures:
//!
//! 1. finding the unfinished sagas of every partition, as take-over does (a headers-only scan
//!    of each key's last write), against what take-over did before (list the keys, read every
//!    snapshot);
//! 2. a node taking every partition over: from its start until every running order shipped;
//! 3. `ListOrders` through that node: the first call (it builds the node's list index), then
//!    pages of 100 (SHIPPED, and CANCELLED), and a walk through every SHIPPED order in pages
//!    of 1,000.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::Context as _;
use async_nats::jetstream;
use futures::StreamExt;
use sagaflow::config::{NodeConfig, Overrides, StreamsConfig};
use sagaflow::grpc::render::{order_saga_id, OrderInput, OrderItem};
use sagaflow::store::KvStateStore;
use sagaflow_actors::machine::{Phase, Saga};
use sagaflow_actors::ports::StateStore;
use sagaflow_devkit::nats_server::NatsServer;
use sagaflow_proto::v1::order_service_client::OrderServiceClient;
use sagaflow_proto::v1::{GetOrderRequest, ListOrdersRequest};

const PARTITIONS: u32 = 8;
const RETENTION: Duration = Duration::from_secs(7 * 24 * 3600);

fn input(order_id: &str) -> anyhow::Result<Vec<u8>> {
    Ok(serde_json::to_vec(&OrderInput {
        order_id: order_id.into(),
        customer: "ann".into(),
        amount_cents: 1_200,
        items: vec![OrderItem {
            sku: "SKU-1".into(),
            quantity: 1,
        }],
    })?)
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted.get(i).copied().unwrap_or_default()
}

#[tokio::main(flavor = "multi_thread")]
async fn main() -> anyhow::Result<()> {
    let mut args = std::env::args().skip(1);
    let finished: usize = args.next().map_or(Ok(100_000), |a| a.parse())?;
    let running: usize = args.next().map_or(Ok(1_000), |a| a.parse())?;
    let repo = PathBuf::from(env!("CARGO_MANIFEST_DIR"));

    let nats = NatsServer::start().context("start nats-server")?;
    let js = jetstream::new(async_nats::connect(nats.url()).await?);
    let bucket = sagaflow::topology::ensure(&js, &StreamsConfig::default()).await?;
    let store =
        KvStateStore::new(js.clone(), bucket.clone(), PARTITIONS).expire_finished(RETENTION);
    let defs = sagaflow_actors::definition::load_dir(&repo.join("sagas"))
        .map_err(|e| anyhow::anyhow!("saga definitions: {e:?}"))?;
    let def = defs
        .iter()
        .find(|d| d.name == "order")
        .context("no order definition")?;

    let t = Instant::now();
    let now = sagaflow::clock::now_ms();
    let total = finished + running;
    let writes = futures::stream::iter(0..total)
        .map(|i| {
            let store = store.clone();
            async move {
                let order_id = if i < finished {
                    format!("R-{i}")
                } else {
                    format!("W-{i}")
                };
                let id = order_saga_id(&order_id);
                let started = now - (total - i) as i64;
                let (mut saga, _) = Saga::start(def, id, input(&order_id)?, started);
                if i < finished {
                    if i % 10 == 0 {
                        saga.phase = Phase::Compensated;
                        saga.status = "CANCELLED".into();
                    } else {
                        saga.phase = Phase::Completed;
                        saga.status = "SHIPPED".into();
                    }
                }
                store.save(&saga, None).await?;
                anyhow::Ok(())
            }
        })
        .buffer_unordered(256);
    let results: Vec<anyhow::Result<()>> = writes.collect().await;
    results.into_iter().collect::<anyhow::Result<Vec<()>>>()?;
    let mut stream = bucket.stream.clone();
    let (messages, bytes) = {
        let info = stream.info().await?;
        (info.state.messages, info.state.bytes)
    };
    println!(
        "wrote {finished} finished + {running} running snapshots in {:.1?} ({} messages, {:.1} MB)",
        t.elapsed(),
        messages,
        bytes as f64 / 1e6
    );

    // 1. Finding the unfinished sagas, now and before.
    let t = Instant::now();
    let mut found = 0;
    for p in 0..PARTITIONS {
        found += sagaflow::index::unfinished(&bucket, p).await?.len();
    }
    let scan = t.elapsed();
    anyhow::ensure!(
        found == running,
        "found {found} unfinished, wrote {running}"
    );
    let t = Instant::now();
    let mut loaded = 0;
    for p in 0..PARTITIONS {
        let prefix = format!("$KV.{}.{p}.", sagaflow::topology::SAGAS_BUCKET);
        let subjects: Vec<String> = stream
            .info_with_subjects(format!("{prefix}*"))
            .await?
            .filter_map(|s| {
                let prefix = prefix.clone();
                async move {
                    s.ok()
                        .and_then(|(s, _)| s.strip_prefix(&prefix).map(String::from))
                }
            })
            .collect()
            .await;
        let unfinished: Vec<bool> = futures::stream::iter(subjects)
            .map(|id| {
                let store = store.clone();
                async move { matches!(store.load(&id).await, Ok(Some((s, _))) if !s.is_terminal()) }
            })
            .buffer_unordered(64)
            .collect()
            .await;
        loaded += unfinished.iter().filter(|u| **u).count();
    }
    let before = t.elapsed();
    anyhow::ensure!(loaded == running, "the old way found {loaded}");
    println!(
        "unfinished sagas of {PARTITIONS} partitions: headers scan {scan:.2?}, reading every snapshot {before:.2?}"
    );

    // 2. A node takes every partition over.
    let env: std::collections::BTreeMap<String, String> = [
        ("SAGAFLOW_PARTITIONS", PARTITIONS.to_string()),
        ("SAGAFLOW_DEMO__LATENCY_MS", "0".to_string()),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v))
    .collect();
    let overrides = Overrides {
        nats: vec![nats.url()],
        grpc_addr: Some(SocketAddr::from(([127, 0, 0, 1], 0))),
        demo_services: Some(true),
        demo_service_list: None,
        saga_dir: Some(repo.join("sagas")),
        node_id: Some("retained-1".into()),
        log_format: None,
        auth_tokens: None,
        tls: Default::default(),
        insecure: false,
    };
    let config = NodeConfig::load(None, &env, &overrides)?
        .with_http_addr(Some(SocketAddr::from(([127, 0, 0, 1], 0))));
    let t = Instant::now();
    let node = sagaflow::node::start(config).await?;
    let started = t.elapsed();
    let mut client = OrderServiceClient::connect(format!("http://{}", node.grpc_addr)).await?;
    for i in finished..total {
        let order_id = format!("W-{i}");
        loop {
            let o = client
                .get_order(GetOrderRequest {
                    order_id: order_id.clone(),
                })
                .await?
                .into_inner();
            if o.terminal {
                anyhow::ensure!(o.status == "SHIPPED", "{order_id}: {}", o.status);
                break;
            }
            anyhow::ensure!(t.elapsed() < Duration::from_secs(600), "{order_id} stuck");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
    println!(
        "take-over: node started in {started:.2?}; all {running} running orders shipped {:.2?} after start",
        t.elapsed()
    );

    // 3. ListOrders.
    let list = |status: &str, page_size: u32, page_token: String| ListOrdersRequest {
        status: status.into(),
        page_size,
        page_token,
    };
    let t = Instant::now();
    let first = client
        .list_orders(list("SHIPPED", 100, String::new()))
        .await?;
    println!(
        "ListOrders, first call (builds the index): {:.2?}, {} orders",
        t.elapsed(),
        first.into_inner().orders.len()
    );
    for status in ["SHIPPED", "CANCELLED"] {
        let mut times = Vec::new();
        for _ in 0..50 {
            let t = Instant::now();
            let page = client.list_orders(list(status, 100, String::new())).await?;
            times.push(t.elapsed());
            anyhow::ensure!(page.into_inner().orders.len() == 100);
        }
        times.sort();
        println!(
            "ListOrders --status {status}, page of 100: p50 {:.1?}, p99 {:.1?}",
            percentile(&times, 0.5),
            percentile(&times, 0.99)
        );
    }
    let t = Instant::now();
    let (mut token, mut pages, mut orders) = (String::new(), 0, 0);
    loop {
        let page = client
            .list_orders(list("SHIPPED", 1000, token))
            .await?
            .into_inner();
        pages += 1;
        orders += page.orders.len();
        token = page.next_page_token;
        if token.is_empty() {
            break;
        }
    }
    println!(
        "every SHIPPED order, {pages} pages of 1,000: {orders} orders in {:.2?}",
        t.elapsed()
    );
    node.shutdown().await?;
    Ok(())
}
