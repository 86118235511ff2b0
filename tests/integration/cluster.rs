//! A cluster of Sagaflow nodes over one NATS server: partitions spread over the live nodes,
//! move on join, graceful leave and crash, and nothing is lost or doubled on the way.
use crate::common;

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use async_nats::jetstream;
use common::checks::*;
use common::*;
use futures::StreamExt;
use sagaflow::node::{self, NodeHandle};
use sagaflow_actors::cluster::{assignment, Lease};
use sagaflow_proto::v1::GetOrderRequest;

const FAST: &[(&str, &str)] = FAST_CLUSTER;

/// Node `id` with `partitions` and the fast cluster timings.
fn test_node(nats: &NatsServer, id: &str, partitions: u32) -> TestNode {
    TestNode::on(nats)
        .id(id)
        .partitions(partitions)
        .fast_cluster()
}

async fn start(nats: &NatsServer, id: &str, partitions: u32) -> NodeHandle {
    test_node(nats, id, partitions).start().await.unwrap()
}

/// Starts a node that leaves `partitions` unset.
async fn start_unset(nats: &NatsServer, id: &str) -> NodeHandle {
    let node = TestNode::on(nats).id(id).fast_cluster();
    assert!(!node.config().partitions_set);
    node.start().await.unwrap()
}

/// The stored leases, read straight from the bucket.
async fn leases(js: &jetstream::Context) -> BTreeMap<u32, Lease> {
    // The bucket appears once the first node has started.
    let Ok(kv) = js.get_key_value("sagaflow_partitions").await else {
        return BTreeMap::new();
    };
    let Ok(keys) = kv.keys().await else {
        return BTreeMap::new();
    };
    let keys: Vec<String> = keys.filter_map(|k| async move { k.ok() }).collect().await;
    let mut out = BTreeMap::new();
    for k in keys {
        if let (Some(p), Ok(Some(v))) = (
            k.strip_prefix('p').and_then(|p| p.parse().ok()),
            kv.get(&k).await,
        ) {
            out.insert(p, serde_json::from_slice(&v).unwrap());
        }
    }
    out
}

/// Waits until every partition's lease is held by exactly the node the assignment
/// over `owners` gives it to; returns the owner per partition.
async fn wait_owned_by(
    js: &jetstream::Context,
    partitions: u32,
    owners: &[&str],
) -> BTreeMap<u32, String> {
    let want: BTreeSet<String> = owners.iter().map(|s| s.to_string()).collect();
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    loop {
        let l = within(TIMEOUT, "read leases", leases(js)).await.unwrap();
        let holders: BTreeMap<u32, String> = l
            .iter()
            .filter_map(|(p, l)| l.owner.clone().map(|o| (*p, o)))
            .collect();
        let expected: BTreeMap<u32, String> = (0..partitions)
            .zip(assignment(partitions, &want))
            .filter_map(|(p, o)| o.map(|o| (p, o.to_string())))
            .collect();
        if holders == expected {
            return holders;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "partitions not owned by {want:?} after 30s: {holders:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn partitions_move_on_join_and_graceful_leave_and_nothing_is_lost() {
    let nats = start_nats().await.unwrap();
    let js = jetstream::new(nats_client(&nats.url()).await.unwrap());
    let a = start(&nats, "node-a", 8).await;
    wait_owned_by(&js, 8, &["node-a"]).await;
    let client_a = connect_orders(&a.grpc_addr.to_string()).await.unwrap();
    let mut ids = place_mix(&client_a, "join", 150).await;

    // Join: partitions flow to the new node while orders are in flight.
    let b = start(&nats, "node-b", 8).await;
    let split = wait_owned_by(&js, 8, &["node-a", "node-b"]).await;
    let on_b = split.values().filter(|o| *o == "node-b").count();
    assert_eq!(on_b, 4, "two nodes share 8 partitions evenly: {split:?}");
    let client_b = connect_orders(&b.grpc_addr.to_string()).await.unwrap();
    ids.extend(place_mix(&client_b, "joined", 150).await);

    // Any node answers, with the same answer.
    let first = wait_all_terminal(&client_a, &ids[..150], Duration::from_secs(120)).await;
    for o in first.iter().take(30) {
        let from_b = client_b
            .clone()
            .get_order(GetOrderRequest {
                order_id: o.order_id.clone(),
            })
            .await
            .unwrap()
            .into_inner();
        assert_eq!(
            &from_b, o,
            "node-b answers for {} exactly as node-a",
            o.order_id
        );
    }

    // Graceful leave: node-a hands everything to node-b.
    ids.extend(place_mix(&client_a, "leave", 100).await);
    within(Duration::from_secs(90), "graceful shutdown", a.shutdown())
        .await
        .unwrap()
        .unwrap();
    wait_owned_by(&js, 8, &["node-b"]).await;

    let orders = wait_all_terminal(&client_b, &ids, Duration::from_secs(180)).await;
    check_ledgers(&orders, &ledgers(&nats).await);
    let epochs = leases(&js).await;
    assert!(epochs.values().all(|l| l.epoch >= 1));
    println!(
        "join + graceful leave: {} orders all terminal, ledgers exact",
        orders.len()
    );
    b.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_crashed_nodes_partitions_are_taken_over_after_the_ttl() {
    let nats = start_nats().await.unwrap();
    let js = jetstream::new(nats_client(&nats.url()).await.unwrap());
    let env: Vec<(&str, &str)> = FAST
        .iter()
        .copied()
        .chain([
            ("SAGAFLOW_PARTITIONS", "8"),
            ("SAGAFLOW_DEMO__LATENCY_MS", "10"),
        ])
        .collect();
    let mut opts_a = NodeOptions::new("crash-a", &[nats.url()]);
    let mut opts_b = NodeOptions::new("crash-b", &[nats.url()]);
    for (k, v) in &env {
        opts_a = opts_a.env(k, v);
        opts_b = opts_b.env(k, v);
    }
    let mut a = NodeProcess::start_with(opts_a).unwrap();
    let b = NodeProcess::start_with(opts_b).unwrap();
    wait_owned_by(&js, 8, &["crash-a", "crash-b"]).await;
    let client_b = b.connect_orders().await.unwrap();
    let client_a = a.connect_orders().await.unwrap();
    let mut ids = place_mix(&client_a, "crash-a", 150).await;
    ids.extend(place_mix(&client_b, "crash-b", 150).await);
    // kill -9: no hand-over; node-b takes node-a's partitions once its heartbeat expires.
    a.kill();
    let started = std::time::Instant::now();
    wait_owned_by(&js, 8, &["crash-b"]).await;
    println!(
        "crash: partitions taken over {:?} after kill -9",
        started.elapsed()
    );
    let orders = wait_all_terminal(&client_b, &ids, Duration::from_secs(180)).await;
    check_ledgers(&orders, &ledgers(&nats).await);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn extra_nodes_stand_by_and_take_over_on_failure() {
    let nats = start_nats().await.unwrap();
    let js = jetstream::new(nats_client(&nats.url()).await.unwrap());
    let nodes = [
        start(&nats, "s-1", 2).await,
        start(&nats, "s-2", 2).await,
        start(&nats, "s-3", 2).await,
    ];
    // Two partitions, three nodes: exactly one node holds nothing.
    let owners = wait_until(Duration::from_secs(30), "two partitions held", || async {
        let l = leases(&js).await;
        l.len() == 2 && l.values().all(|l| l.owner.is_some())
    })
    .await;
    owners.unwrap();
    let held: BTreeSet<String> = leases(&js)
        .await
        .values()
        .filter_map(|l| l.owner.clone())
        .collect();
    assert!(held.len() <= 2);
    let [n1, n2, n3] = nodes;
    let mut remaining = Vec::new();
    let mut stopped = None;
    for n in [n1, n2, n3] {
        if stopped.is_none() && held.contains(&n.node_id) {
            stopped = Some(n.node_id.clone());
            within(Duration::from_secs(90), "shutdown", n.shutdown())
                .await
                .unwrap()
                .unwrap();
        } else {
            remaining.push(n);
        }
    }
    let live: Vec<&str> = remaining.iter().map(|n| n.node_id.as_str()).collect();
    wait_until(
        Duration::from_secs(30),
        "the stand-by took over",
        || async {
            let l = leases(&js).await;
            l.values()
                .all(|l| l.owner.as_deref().is_some_and(|o| live.contains(&o)))
        },
    )
    .await
    .unwrap();
    let client = connect_orders(&remaining[0].grpc_addr.to_string())
        .await
        .unwrap();
    let ids = place_mix(&client, "standby", 40).await;
    let orders = wait_all_terminal(&client, &ids, Duration::from_secs(120)).await;
    check_ledgers(&orders, &ledgers(&nats).await);
    for n in remaining {
        n.shutdown().await.unwrap();
    }
}

/// Three node processes started at the same moment settle on the assignment with each
/// partition moved at most once per node that joined after it was first taken: nobody takes a
/// live node's lease over as if it were dead. (Before, a node could take leases before its
/// first heartbeat was visible, or be missing from the bucket's listing, and partitions moved
/// up to seven times in the first seconds.) Default heartbeat settings, as in production.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nodes_started_together_take_each_partition_over_at_most_once_per_join() {
    let nats = start_nats().await.unwrap();
    let js = jetstream::new(nats_client(&nats.url()).await.unwrap());
    let ids = ["together-a", "together-b", "together-c"];
    let nodes: Vec<NodeProcess> = ids
        .iter()
        .map(|id| {
            NodeProcess::start_with(
                NodeOptions::new(id, &[nats.url()]).env("SAGAFLOW_PARTITIONS", "32"),
            )
            .unwrap()
        })
        .collect();
    wait_owned_by(&js, 32, &ids).await;
    // A partition first taken by one node moves at most once per node that joins after:
    // epoch 3 at most with three nodes. Each take-over of a live node's lease adds one more.
    let epochs: BTreeMap<u32, u64> = within(TIMEOUT, "read leases", leases(&js))
        .await
        .unwrap()
        .into_iter()
        .map(|(p, l)| (p, l.epoch))
        .collect();
    assert_eq!(epochs.len(), 32, "{epochs:?}");
    assert!(epochs.values().all(|e| (1..=3).contains(e)), "{epochs:?}");
    drop(nodes);
}

/// Starts a node with `partitions` that must be refused; returns the error.
async fn refused_start(nats: &NatsServer, id: &str, partitions: u32) -> String {
    match within(
        TIMEOUT,
        "start node",
        Box::pin(node::start(test_node(nats, id, partitions).config())),
    )
    .await
    .unwrap()
    {
        Ok(_) => panic!("a node with {partitions} partitions started on another deployment"),
        Err(e) => e.to_string(),
    }
}

/// Every node must count partitions as the deployment does (a saga's partition is in its key
/// and subjects): a node configured otherwise refuses to start, naming both counts, before it
/// serves anything, and a node that leaves the count unset takes the deployment's. A
/// deployment from before the count was recorded is known by its leases.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_counting_partitions_otherwise_than_the_deployment_refuses_to_start() {
    let nats = start_nats().await.unwrap();
    let js = jetstream::new(nats_client(&nats.url()).await.unwrap());
    let first = start(&nats, "count-a", 4).await;
    wait_owned_by(&js, 4, &["count-a"]).await;

    let e = refused_start(&nats, "count-b", 8).await;
    assert!(
        e.contains("partitions = 8") && e.contains("4 partitions") && e.contains("`count`"),
        "{e}"
    );
    // The same count joins.
    let second = start(&nats, "count-c", 4).await;
    second.shutdown().await.unwrap();
    // So does a node that leaves `partitions` unset: it takes the deployment's 4 (not the
    // default 8) and shares them.
    let unset = start_unset(&nats, "count-f").await;
    wait_owned_by(&js, 4, &["count-a", "count-f"]).await;
    unset.shutdown().await.unwrap();
    first.shutdown().await.unwrap();

    // A deployment whose count was never recorded: its leases p0…p3 give it away.
    let leases = js.get_key_value("sagaflow_partitions").await.unwrap();
    leases
        .purge(sagaflow::cluster::PARTITION_COUNT_KEY)
        .await
        .unwrap();
    let e = refused_start(&nats, "count-d", 8).await;
    assert!(
        e.contains("partitions = 8") && e.contains("4 partitions") && e.contains("`p3`"),
        "{e}"
    );
    let again = start(&nats, "count-e", 4).await;
    let recorded = leases
        .get(sagaflow::cluster::PARTITION_COUNT_KEY)
        .await
        .unwrap();
    assert_eq!(
        recorded.as_deref(),
        Some(&b"4"[..]),
        "the count is recorded again"
    );
    again.shutdown().await.unwrap();

    // Unset, in a deployment known only by its leases: the leases give the count, which is
    // recorded for the nodes after.
    leases
        .purge(sagaflow::cluster::PARTITION_COUNT_KEY)
        .await
        .unwrap();
    let adopted = start_unset(&nats, "count-g").await;
    wait_owned_by(&js, 4, &["count-g"]).await;
    let recorded = leases
        .get(sagaflow::cluster::PARTITION_COUNT_KEY)
        .await
        .unwrap();
    assert_eq!(recorded.as_deref(), Some(&b"4"[..]));
    adopted.shutdown().await.unwrap();
}

/// Two nodes whose clocks are 30 s ahead and 30 s behind share the partitions evenly, keep
/// them (no lease changes hands once settled), and run orders placed on either to the end:
/// liveness does not compare a peer's heartbeat time with the local clock, and no participant
/// decides by its clock that a command is too late.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nodes_whose_clocks_are_off_by_thirty_seconds_share_the_partitions() {
    let nats = start_nats().await.unwrap();
    let js = jetstream::new(nats_client(&nats.url()).await.unwrap());
    let skewed = |id: &str, offset_ms: i64| {
        let mut c = test_node(&nats, id, 8).config();
        c.clock_offset_ms = offset_ms;
        Box::pin(node::start(c))
    };
    let ahead = within(TIMEOUT, "start node", skewed("ahead", 30_000))
        .await
        .unwrap()
        .unwrap();
    let behind = within(TIMEOUT, "start node", skewed("behind", -30_000))
        .await
        .unwrap()
        .unwrap();
    let split = wait_owned_by(&js, 8, &["ahead", "behind"]).await;
    assert_eq!(
        split.values().filter(|o| *o == "ahead").count(),
        4,
        "{split:?}"
    );
    // Settled: over ten heartbeat intervals and several ttls no lease changes hands.
    let settled = leases(&js).await;
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(
        leases(&js).await,
        settled,
        "leases moved between skewed nodes"
    );

    let client_ahead = connect_orders(&ahead.grpc_addr.to_string()).await.unwrap();
    let client_behind = connect_orders(&behind.grpc_addr.to_string()).await.unwrap();
    let mut ids = place_mix(&client_ahead, "ahead", 60).await;
    ids.extend(place_mix(&client_behind, "behind", 60).await);
    let orders = wait_all_terminal(&client_ahead, &ids, Duration::from_secs(120)).await;
    check_ledgers(&orders, &ledgers(&nats).await);
    // Every order ended as its kind does, not by timeouts (place_mix: every tenth declined,
    // every 15th out of stock).
    for o in &orders {
        assert!(
            !o.saga
                .as_ref()
                .is_some_and(|s| s.history.iter().any(|h| h.what.contains("timeout"))),
            "order {} timed out: {o:?}",
            o.order_id
        );
    }
    assert_eq!(leases(&js).await, settled, "leases moved under load");
    ahead.shutdown().await.unwrap();
    behind.shutdown().await.unwrap();
}

/// A node stopped (SIGSTOP) for longer than its ttl while orders run: the other node takes its
/// partitions over; when it resumes, it writes nothing for them (its writes are refused by its
/// fence and counted) until it has checked the leases again, then takes its share back. No
/// participant effect happens twice.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_paused_past_its_ttl_writes_nothing_when_it_resumes() {
    let nats = start_nats().await.unwrap();
    let js = jetstream::new(nats_client(&nats.url()).await.unwrap());
    let http_port = free_port().to_string();
    let http_addr = format!("127.0.0.1:{http_port}");
    let env: Vec<(&str, &str)> = FAST
        .iter()
        .copied()
        .chain([
            ("SAGAFLOW_PARTITIONS", "8"),
            ("SAGAFLOW_DEMO__LATENCY_MS", "20"),
        ])
        .collect();
    let mut opts_a =
        NodeOptions::new("pause-a", &[nats.url()]).env("SAGAFLOW_HTTP_ADDR", &http_addr);
    let mut opts_b = NodeOptions::new("pause-b", &[nats.url()]);
    for (k, v) in &env {
        opts_a = opts_a.env(k, v);
        opts_b = opts_b.env(k, v);
    }
    let mut a = NodeProcess::start_with(opts_a).unwrap();
    let b = NodeProcess::start_with(opts_b).unwrap();
    wait_owned_by(&js, 8, &["pause-a", "pause-b"]).await;
    let client_b = b.connect_orders().await.unwrap();
    let mut ids = place_mix(&client_b, "before", 200).await;

    // Stop it while its sagas are in flight, past the ttl (1 s): node-b takes over.
    let pid = a.pid().unwrap().to_string();
    let signal = |sig: &str| {
        let status = std::process::Command::new("kill")
            .args([sig, pid.as_str()])
            .status()
            .unwrap();
        assert!(status.success(), "kill {sig} {pid}");
    };
    signal("-STOP");
    let placing = {
        let client_b = client_b.clone();
        tokio::spawn(async move { place_mix(&client_b, "paused", 100).await })
    };
    wait_owned_by(&js, 8, &["pause-b"]).await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    signal("-CONT");
    ids.extend(placing.await.unwrap());

    // It checks the leases, then takes its share back.
    wait_owned_by(&js, 8, &["pause-a", "pause-b"]).await;
    ids.extend(place_mix(&client_b, "after", 100).await);
    let orders = wait_all_terminal(&client_b, &ids, Duration::from_secs(180)).await;
    check_ledgers(&orders, &ledgers(&nats).await);
    let http: std::net::SocketAddr = http_addr.parse().unwrap();
    let (_, metrics) = http_get(http, "/metrics").await.unwrap();
    let fenced = sample_sum(&metrics, "sagaflow_fenced_writes_total").unwrap_or(0.0);
    assert!(
        fenced > 0.0,
        "the resumed node refused none of its writes:\n{}",
        a.log_tail(40)
    );
    assert!(
        a.log().contains("heartbeat lapsed"),
        "the resumed node did not notice its lapse:\n{}",
        a.log_tail(40)
    );
    println!("paused node: {fenced} writes refused after it resumed");
}

/// A saga whose creator died between writing its snapshot and publishing its start event has
/// nothing to drive it. When the creator leaves, the owner of each partition it kept sweeps
/// for such orphans and takes them up (the partitions that change hands get the take-over
/// scan): every orphan ships, and the metric counts those taken up by the sweep.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sagas_orphaned_at_creation_are_taken_up_when_their_creator_leaves() {
    use sagaflow::grpc::render::{order_saga_id, OrderInput, OrderItem};
    use sagaflow_actors::hash::partition_of;
    use sagaflow_actors::machine::Saga;
    use sagaflow_actors::ports::StateStore;

    const PARTITIONS: u32 = 4;
    let nats = start_nats().await.unwrap();
    let js = jetstream::new(nats_client(&nats.url()).await.unwrap());
    let a = start(&nats, "orphan-a", PARTITIONS).await;
    let b = start(&nats, "orphan-b", PARTITIONS).await;
    let split = wait_owned_by(&js, PARTITIONS, &["orphan-a", "orphan-b"]).await;
    let kept: BTreeSet<u32> = split
        .iter()
        .filter(|(_, o)| *o == "orphan-a")
        .map(|(p, _)| *p)
        .collect();

    // What a creator writes first: the snapshot, before the start event it never published.
    let bucket = js.get_key_value("sagaflow_sagas").await.unwrap();
    let store = sagaflow::store::KvStateStore::new(js.clone(), bucket, PARTITIONS);
    let defs = sagaflow_actors::definition::load_dir(&repo_dir().join("sagas")).unwrap();
    let def = defs.iter().find(|d| d.name == "order").unwrap();
    let mut orphans = Vec::new();
    let mut on_kept = 0;
    for i in 0..12 {
        let order_id = format!("orphan-{i}");
        let input = OrderInput {
            order_id: order_id.clone(),
            customer: "ann".into(),
            amount_cents: 1_200,
            items: vec![OrderItem {
                sku: "SKU-1".into(),
                quantity: 1,
            }],
        };
        let id = order_saga_id(&order_id);
        let (saga, _) = Saga::start(
            def,
            id.clone(),
            serde_json::to_vec(&input).unwrap(),
            sagaflow::clock::now_ms(),
        );
        store.save(&saga, None).await.unwrap();
        on_kept += usize::from(kept.contains(&partition_of(&id, PARTITIONS)));
        orphans.push(order_id);
    }
    assert!(on_kept > 0, "some orphans are in partitions node-a keeps");

    // The creator leaves.
    within(TIMEOUT, "shutdown", b.shutdown())
        .await
        .unwrap()
        .unwrap();
    wait_owned_by(&js, PARTITIONS, &["orphan-a"]).await;
    let mut client = connect_orders(&a.grpc_addr.to_string()).await.unwrap();
    for id in &orphans {
        let deadline = std::time::Instant::now() + Duration::from_secs(60);
        loop {
            let o = get_order(&mut client, id).await.unwrap();
            if o.terminal {
                assert_eq!(o.status, "SHIPPED", "{id}");
                break;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "orphan {id} still {} after 60 s",
                o.status
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
    let (_, metrics) = http_get(a.http_addr, "/metrics").await.unwrap();
    let adopted: usize = metrics
        .lines()
        .find_map(|l| l.strip_prefix("sagaflow_orphans_adopted_total "))
        .and_then(|v| v.trim().parse().ok())
        .unwrap();
    assert!(
        adopted >= on_kept,
        "{adopted} adopted by the sweep, {on_kept} orphans in kept partitions"
    );
    a.shutdown().await.unwrap();
}
