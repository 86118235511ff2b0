//! `AdminService.ClusterStatus` and `sagaflow cluster status`: one `nats-server`, two nodes in
//! this process (8 partitions, fast heartbeats). Either node answers with both nodes and every
//! partition owned, split between them; the CLI's `--json` carries the same figures; both
//! nodes report the same partition table.
use crate::common;

use std::collections::{BTreeMap, BTreeSet};
use std::process::Stdio;
use std::time::Duration;

use common::*;
use sagaflow::node::{self, NodeHandle};
use sagaflow_proto::v1::admin_service_client::AdminServiceClient;
use sagaflow_proto::v1::{ClusterStatusRequest, ClusterStatusResponse};
use serde_json::Value;

const PARTITIONS: u32 = 8;

/// Bound on the cluster settling (two nodes, every partition leased).
const SETTLE: Duration = Duration::from_secs(45);

async fn start_node(node_id: &str, nats_url: &str) -> NodeHandle {
    let config = TestNode::on_urls(&[nats_url.to_string()])
        .id(node_id)
        .partitions(PARTITIONS)
        .fast_cluster()
        .env("SAGAFLOW_CLUSTER__DRAIN_TIMEOUT", "2s")
        .config();
    within(
        Duration::from_secs(60),
        "start node",
        Box::pin(node::start(config)),
    )
    .await
    .unwrap()
    .unwrap()
}

/// One `ClusterStatus` call on `addr` (bounded); `None` if it fails.
async fn status(addr: &str) -> Option<ClusterStatusResponse> {
    let channel = channel(addr).await.ok()?;
    let mut client = AdminServiceClient::new(channel);
    within(
        Duration::from_secs(10),
        "ClusterStatus",
        client.cluster_status(ClusterStatusRequest {}),
    )
    .await
    .ok()?
    .ok()
    .map(tonic::Response::into_inner)
}

/// Two nodes, every partition owned by one of them, each owning some, and each node's list of
/// partitions agreeing with the partition table.
fn settled(s: &ClusterStatusResponse, ids: &[&str; 2]) -> bool {
    let nodes: BTreeSet<&str> = s.nodes.iter().map(|n| n.node_id.as_str()).collect();
    if nodes != ids.iter().copied().collect() || s.partitions.len() != PARTITIONS as usize {
        return false;
    }
    if !s
        .partitions
        .iter()
        .all(|p| ids.contains(&p.owner.as_str()) && p.epoch > 0)
    {
        return false;
    }
    s.nodes.iter().all(|n| {
        let from_table: Vec<u32> = s
            .partitions
            .iter()
            .filter(|p| p.owner == n.node_id)
            .map(|p| p.partition)
            .collect();
        !n.partitions.is_empty() && n.partitions == from_table
    })
}

/// `(partition, owner, epoch)` rows.
fn table(s: &ClusterStatusResponse) -> Vec<(u32, String, u64)> {
    s.partitions
        .iter()
        .map(|p| (p.partition, p.owner.clone(), p.epoch))
        .collect()
}

/// Runs `sagaflow ARGS` (bounded), without the caller's `SAGAFLOW_*`/`RUST_LOG`.
async fn sagaflow(args: &[&str]) -> std::process::Output {
    let mut cmd = tokio::process::Command::new(env!("CARGO_BIN_EXE_sagaflow"));
    cmd.args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .env_remove("RUST_LOG");
    for (key, _) in std::env::vars_os() {
        if key.to_string_lossy().starts_with("SAGAFLOW_") {
            cmd.env_remove(key);
        }
    }
    within(Duration::from_secs(60), "run sagaflow", cmd.output())
        .await
        .unwrap()
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn cluster_status_over_grpc_and_cli() {
    let nats = start_nats().await.unwrap();
    let ids = ["cc-a", "cc-b"];
    let a = start_node(ids[0], &nats.url()).await;
    let b = start_node(ids[1], &nats.url()).await;
    let addrs = [a.grpc_addr.to_string(), b.grpc_addr.to_string()];

    // Either node answers: wait until one of them reports the settled cluster.
    let seen = std::sync::Mutex::new(None);
    wait_until(SETTLE, "2 nodes owning all 8 partitions", || {
        let addrs = addrs.clone();
        let seen = &seen;
        async move {
            for addr in &addrs {
                if let Some(s) = status(addr).await {
                    if settled(&s, &ids) {
                        *seen.lock().unwrap() = Some(s);
                        return true;
                    }
                }
            }
            false
        }
    })
    .await
    .unwrap();
    let s = seen.into_inner().unwrap().unwrap();
    assert!(ids.contains(&s.answered_by.as_str()), "{s:?}");
    let by_node: BTreeMap<&str, &[u32]> = s
        .nodes
        .iter()
        .map(|n| (n.node_id.as_str(), n.partitions.as_slice()))
        .collect();
    assert_eq!(
        by_node.values().map(|p| p.len()).sum::<usize>(),
        PARTITIONS as usize
    );
    for n in &s.nodes {
        assert!(addrs.contains(&n.grpc_addr), "{n:?} not one of {addrs:?}");
        assert!(n.started_at_unix_ms > 0 && n.last_heartbeat_unix_ms >= n.started_at_unix_ms);
    }
    // Every partition consumer exists once its partition is consumed; the demo services'
    // consumers and the analytics consumer are listed with their streams.
    let consumers: BTreeSet<(String, String)> = s
        .consumers
        .iter()
        .map(|c| (c.stream.clone(), c.name.clone()))
        .collect();
    for p in 0..PARTITIONS {
        assert!(
            consumers.contains(&("SAGA_EVENTS".into(), format!("evt-p{p}"))),
            "{consumers:?}"
        );
    }
    for svc in ["svc-payment", "svc-inventory", "svc-shipping"] {
        assert!(
            consumers.contains(&("SAGA_COMMANDS".into(), svc.into())),
            "{consumers:?}"
        );
    }
    assert!(
        consumers.contains(&("SAGA_STATUS".into(), "analytics".into())),
        "{consumers:?}"
    );

    // Both nodes give the same partition table (each refreshes its view every heartbeat, so
    // allow a round or two to line up).
    wait_until(SETTLE, "both nodes report the same partition table", || {
        let addrs = addrs.clone();
        async move {
            let (Some(x), Some(y)) = (status(&addrs[0]).await, status(&addrs[1]).await) else {
                return false;
            };
            x.answered_by == ids[0]
                && y.answered_by == ids[1]
                && settled(&x, &ids)
                && settled(&y, &ids)
                && table(&x) == table(&y)
        }
    })
    .await
    .unwrap();

    // The CLI, from either node: one JSON object with the same figures.
    for (addr, id) in addrs.iter().zip(ids) {
        let out = sagaflow(&["cluster", "status", "--server", addr, "--json"]).await;
        let stdout = String::from_utf8(out.stdout).unwrap();
        assert_eq!(
            out.status.code(),
            Some(0),
            "{stdout}\n{}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert_eq!(stdout.lines().count(), 1, "one JSON object: {stdout}");
        let v: Value = serde_json::from_str(&stdout).unwrap();
        assert_eq!(v["answered_by"], id, "{v}");
        let nodes = v["nodes"].as_array().unwrap();
        let names: BTreeSet<&str> = nodes
            .iter()
            .map(|n| n["node_id"].as_str().unwrap())
            .collect();
        assert_eq!(names, ids.iter().copied().collect(), "{v}");
        let owned: usize = nodes
            .iter()
            .map(|n| {
                let len = n["partitions"].as_array().unwrap().len();
                assert!(len > 0, "each node owns some partitions: {v}");
                len
            })
            .sum();
        assert_eq!(owned, PARTITIONS as usize, "{v}");
        let parts = v["partitions"].as_array().unwrap();
        assert_eq!(parts.len(), PARTITIONS as usize, "{v}");
        assert!(
            parts
                .iter()
                .all(|p| ids.contains(&p["owner"].as_str().unwrap())
                    && p["epoch"].as_u64().unwrap() > 0
                    && p["pending_events"].is_u64()),
            "{v}"
        );
        let consumers = v["consumers"].as_array().unwrap();
        assert!(
            consumers.iter().any(|c| c["name"] == "evt-p0"
                && c["stream"] == "SAGA_EVENTS"
                && c["pending"].is_u64()
                && c["ack_pending"].is_u64()
                && c["redelivered"].is_u64()),
            "{v}"
        );
    }

    // And the table for people.
    let out = sagaflow(&["cluster", "status", "--server", &addrs[0]]).await;
    let text = String::from_utf8(out.stdout).unwrap();
    assert_eq!(out.status.code(), Some(0), "{text}");
    assert!(
        text.starts_with("answered by cc-a: 2 node(s), 8 of 8 partition(s) owned"),
        "{text}"
    );
    assert!(
        text.contains("PENDING EVENTS") && text.contains("svc-payment"),
        "{text}"
    );

    within(Duration::from_secs(60), "shut down node b", b.shutdown())
        .await
        .unwrap()
        .unwrap();
    within(Duration::from_secs(60), "shut down node a", a.shutdown())
        .await
        .unwrap()
        .unwrap();
}
