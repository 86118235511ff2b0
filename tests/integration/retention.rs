//! Retention of finished sagas and the idempotency window of `PlaceOrder`, against a real
//! `nats-server`: the snapshot that finishes a saga carries a per-message TTL
//! (`retention.finished_sagas`) and rolls up the key's older revisions; the server removes it
//! with no janitor, while a running saga's snapshot is kept. Also: a bucket created by an older
//! version is upgraded in place, and the finished write keeps the compare-and-set.
use crate::common;

use std::time::{Duration, Instant, SystemTime};

use async_nats::jetstream::{self, kv, stream};
use common::checks::{get_order, order};
use common::*;
use futures::StreamExt;
use sagaflow::config::StreamsConfig;
use sagaflow::store::KvStateStore;
use sagaflow::topology::{self, SAGAS_BUCKET};
use sagaflow_actors::hash::partition_of;
use sagaflow_actors::machine::{Phase, Saga};
use sagaflow_actors::ports::{Error as PortError, StateStore};
use sagaflow_proto::v1::order_service_client::OrderServiceClient;
use sagaflow_proto::v1::{self, GetSagaRequest, StartSagaRequest};
use tonic::transport::Channel;
use tonic::Code;

/// `retention.finished_sagas` in these tests.
const KEEP: Duration = Duration::from_secs(2);
/// Bound on the server removing an expired snapshot, generous for a loaded 2-core machine.
const REMOVAL_TIMEOUT: Duration = Duration::from_secs(60);
/// Bound on an order reaching its terminal status.
const ORDER_TIMEOUT: Duration = Duration::from_secs(60);
const PARTITIONS: u32 = 4;

/// The subject of a saga's snapshot in the bucket's stream.
fn kv_subject(saga_id: &str) -> String {
    format!(
        "$KV.{SAGAS_BUCKET}.{}",
        topology::saga_key(partition_of(saga_id, PARTITIONS), saga_id)
    )
}

async fn kv_stream(js: &jetstream::Context) -> stream::Stream {
    within(
        TIMEOUT,
        "get the bucket's stream",
        js.get_stream(format!("KV_{SAGAS_BUCKET}")),
    )
    .await
    .unwrap()
    .unwrap()
}

/// How many messages the bucket's stream holds on `subject`.
async fn messages_on(js: &jetstream::Context, subject: &str) -> u64 {
    let s = kv_stream(js).await;
    let subjects = within(TIMEOUT, "stream subjects", s.info_with_subjects(subject))
        .await
        .unwrap()
        .unwrap();
    let counts: Vec<(String, usize)> =
        within(TIMEOUT, "read subjects", subjects.collect::<Vec<_>>())
            .await
            .unwrap()
            .into_iter()
            .map(Result::unwrap)
            .collect();
    counts
        .iter()
        .filter(|(s, _)| s == subject)
        .map(|(_, n)| *n as u64)
        .sum()
}

/// The last message on `subject`, if any.
async fn last_on(
    js: &jetstream::Context,
    subject: &str,
) -> Option<jetstream::message::StreamMessage> {
    let s = kv_stream(js).await;
    match within(
        TIMEOUT,
        "last message",
        s.get_last_raw_message_by_subject(subject),
    )
    .await
    .unwrap()
    {
        Ok(m) => Some(m),
        Err(e) if e.kind() == stream::LastRawMessageErrorKind::NoMessageFound => None,
        Err(e) => panic!("cannot read the last message on {subject}: {e}"),
    }
}

fn header<'a>(m: &'a jetstream::message::StreamMessage, name: &str) -> Option<&'a str> {
    m.headers.get(name).map(|v| v.as_str())
}

async fn wait_terminal(client: &mut OrderServiceClient<Channel>, id: &str) -> v1::Order {
    let deadline = Instant::now() + ORDER_TIMEOUT;
    loop {
        let o = get_order(client, id).await.unwrap();
        if o.terminal {
            return o;
        }
        assert!(
            Instant::now() < deadline,
            "order {id} not terminal after {ORDER_TIMEOUT:?}: {o:?}"
        );
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn finished_orders_expire_after_the_retention_and_running_sagas_stay() {
    let nats = start_nats().await.unwrap();
    let sagas_dir = tempfile::tempdir().unwrap();
    std::fs::copy(
        repo_dir().join("sagas/order.toml"),
        sagas_dir.path().join("order.toml"),
    )
    .unwrap();
    // A saga nobody answers, which stays RUNNING for the whole test.
    std::fs::copy(
        fixture_sagas("hold.toml"),
        sagas_dir.path().join("hold.toml"),
    )
    .unwrap();
    let node = TestNode::on(&nats)
        .id("retention-1")
        .partitions(PARTITIONS)
        .envs(&[
            ("SAGAFLOW_RETENTION__FINISHED_SAGAS", "2s"),
            // The retention may not be shorter than the duplicate window.
            ("SAGAFLOW_STREAMS__DUPLICATE_WINDOW", "1s"),
            // Several revisions per key are kept, so the final write's rollup is visible.
            ("SAGAFLOW_STREAMS__KV_HISTORY", "8"),
        ])
        .saga_dir(sagas_dir.path());
    assert_eq!(node.config().retention.finished_sagas, KEEP);
    let node = node.start().await.unwrap();
    let addr = node.grpc_addr.to_string();
    let mut orders = connect_orders(&addr).await.unwrap();
    let mut sagas = connect_sagas(&addr).await.unwrap();
    let js = jetstream::new(nats_client(&nats.url()).await.unwrap());

    // A saga that keeps running through the whole test.
    let hold = within(
        TIMEOUT,
        "StartSaga",
        sagas.start_saga(StartSagaRequest {
            saga_name: "hold".into(),
            saga_id: "hold-1".into(),
            input_json: "{}".into(),
        }),
    )
    .await
    .unwrap()
    .unwrap()
    .into_inner();
    assert!(hold.created);
    let hold_started = Instant::now();

    // An order that finishes; placing it again while it is kept returns the same saga.
    let placed = within(
        TIMEOUT,
        "PlaceOrder",
        orders.place_order(order("keep-1", 1999, &[("SKU-1", 1)])),
    )
    .await
    .unwrap()
    .unwrap()
    .into_inner();
    assert!(placed.created);
    let done = wait_terminal(&mut orders, "keep-1").await;
    assert_eq!(done.status, "SHIPPED", "{done:?}");
    let again = within(
        TIMEOUT,
        "PlaceOrder again",
        orders.place_order(order("keep-1", 1999, &[("SKU-1", 1)])),
    )
    .await
    .unwrap()
    .unwrap()
    .into_inner();
    assert!(!again.created, "a finished order is kept: {again:?}");
    assert_eq!(again.saga_id, placed.saga_id);
    assert_eq!(again.status, "SHIPPED");

    // The final snapshot carries the TTL and rolled up the key's earlier revisions.
    let subject = kv_subject(&placed.saga_id);
    let last = last_on(&js, &subject)
        .await
        .expect("the finished snapshot is stored");
    assert_eq!(header(&last, "Nats-TTL"), Some("2s"), "{:?}", last.headers);
    assert_eq!(header(&last, "Nats-Rollup"), Some("sub"));
    assert_eq!(
        messages_on(&js, &subject).await,
        1,
        "the rollup leaves only the final revision"
    );
    let written_at = SystemTime::from(last.time);

    // The server removes it: GetOrder answers NOT_FOUND, and no message (not even a delete
    // marker) is left for the key.
    wait_until(REMOVAL_TIMEOUT, "the finished order to be removed", || {
        let mut orders = orders.clone();
        async move {
            matches!(get_order(&mut orders, "keep-1").await, Err(s) if s.code() == Code::NotFound)
        }
    })
    .await
    .unwrap();
    let kept_for = SystemTime::now()
        .duration_since(written_at)
        .unwrap_or_default();
    assert!(
        kept_for >= KEEP - Duration::from_millis(250),
        "removed after {kept_for:?}, before the retention of {KEEP:?}"
    );
    assert!(last_on(&js, &subject).await.is_none(), "no delete marker");
    assert_eq!(messages_on(&js, &subject).await, 0);

    // The running saga outlives the retention: older than twice `KEEP`, still there, and its
    // snapshots carry no TTL.
    let min_age = KEEP * 2;
    if let Some(rest) = min_age.checked_sub(hold_started.elapsed()) {
        tokio::time::sleep(rest).await;
    }
    let held = within(
        TIMEOUT,
        "GetSaga",
        sagas.get_saga(GetSagaRequest {
            saga_id: "hold-1".into(),
        }),
    )
    .await
    .unwrap()
    .unwrap()
    .into_inner();
    assert_eq!(held.phase, "RUNNING", "{held:?}");
    assert!(!held.terminal);
    let hold_subject = kv_subject("hold-1");
    let hold_last = last_on(&js, &hold_subject)
        .await
        .expect("the running saga is kept");
    assert_eq!(header(&hold_last, "Nats-TTL"), None);
    assert!(messages_on(&js, &hold_subject).await >= 1);

    // Once removed, the order id is free again: placing it starts a new saga.
    let fresh = within(
        TIMEOUT,
        "PlaceOrder after removal",
        orders.place_order(order("keep-1", 1999, &[("SKU-1", 1)])),
    )
    .await
    .unwrap()
    .unwrap()
    .into_inner();
    assert!(fresh.created, "{fresh:?}");
    assert_eq!(wait_terminal(&mut orders, "keep-1").await.status, "SHIPPED");
    within(TIMEOUT, "shutdown", node.shutdown())
        .await
        .unwrap()
        .unwrap();
}

/// A bucket and stream as a version before retention created them.
async fn create_old_topology(js: &jetstream::Context) -> kv::Store {
    js.create_stream(stream::Config {
        name: topology::EVENTS_STREAM.to_string(),
        subjects: vec!["sagaflow.evt.>".to_string()],
        storage: stream::StorageType::File,
        max_age: Duration::from_secs(7 * 24 * 3600),
        duplicate_window: Duration::from_secs(120),
        max_bytes: -1,
        ..Default::default()
    })
    .await
    .unwrap();
    js.create_key_value(kv::Config {
        bucket: SAGAS_BUCKET.to_string(),
        description: "latest saga snapshot per saga".to_string(),
        history: 1,
        storage: stream::StorageType::File,
        num_replicas: 1,
        ..Default::default()
    })
    .await
    .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_older_topology_is_upgraded_in_place() {
    let nats = start_nats().await.unwrap();
    let js = jetstream::new(nats_client(&nats.url()).await.unwrap());
    let old = create_old_topology(&js).await;
    old.put("0.old-1", "kept".into()).await.unwrap();
    let info = kv_stream(&js).await.info().await.unwrap().config.clone();
    assert!(!info.allow_message_ttl);

    let cfg = StreamsConfig {
        max_age: Duration::from_secs(3600),
        duplicate_window: Duration::from_secs(30),
        max_bytes: 64 << 20,
        kv_history: 3,
        ..StreamsConfig::default()
    };
    let bucket = within(TIMEOUT, "ensure", topology::ensure(&js, &cfg))
        .await
        .unwrap()
        .unwrap();
    let kv_cfg = kv_stream(&js).await.info().await.unwrap().config.clone();
    assert!(kv_cfg.allow_message_ttl, "per-message TTL turned on");
    assert_eq!(kv_cfg.max_messages_per_subject, 3);
    assert_eq!(kv_cfg.subject_delete_marker_ttl, None, "no delete markers");
    assert_eq!(
        bucket.get("0.old-1").await.unwrap().as_deref(),
        Some(&b"kept"[..]),
        "keys survive the upgrade"
    );
    let mut events = js.get_stream(topology::EVENTS_STREAM).await.unwrap();
    let ev = events.info().await.unwrap().config.clone();
    assert_eq!(ev.max_age, cfg.max_age);
    assert_eq!(ev.duplicate_window, cfg.duplicate_window);
    assert_eq!(ev.max_bytes, cfg.max_bytes);

    // A stream an operator turned per-message TTL on for still updates (TTL cannot be turned
    // off again, so it stays on).
    let mut ttl_on = ev.clone();
    ttl_on.allow_message_ttl = true;
    js.update_stream(ttl_on).await.unwrap();

    // Idempotent, and the history can go back down (TTL stays on: it cannot be turned off).
    let cfg = StreamsConfig {
        kv_history: 1,
        max_age: Duration::from_secs(7200),
        ..cfg
    };
    for _ in 0..2 {
        within(TIMEOUT, "ensure again", topology::ensure(&js, &cfg))
            .await
            .unwrap()
            .unwrap();
    }
    let kv_cfg = kv_stream(&js).await.info().await.unwrap().config.clone();
    assert!(kv_cfg.allow_message_ttl);
    assert_eq!(kv_cfg.max_messages_per_subject, 1);
    let ev = events.info().await.unwrap().config.clone();
    assert_eq!(ev.max_age, cfg.max_age);
    assert!(ev.allow_message_ttl);
    assert!(!topology::stream_differs(
        &ev,
        &stream::Config {
            name: topology::EVENTS_STREAM.to_string(),
            subjects: vec!["sagaflow.evt.>".to_string()],
            max_age: cfg.max_age,
            duplicate_window: cfg.duplicate_window,
            max_bytes: cfg.max_bytes,
            num_replicas: 1,
            ..Default::default()
        }
    ));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_finished_write_keeps_compare_and_set() {
    let nats = start_nats().await.unwrap();
    finished_write_keeps_compare_and_set(&nats.url(), 1).await;
}

/// The same on a 3-server cluster with replicated (R3) streams, where the server reports a
/// lost compare-and-set with another error code.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_finished_write_keeps_compare_and_set_in_a_cluster() {
    let servers = start_nats_cluster(3).await.unwrap();
    finished_write_keeps_compare_and_set(&servers[1].url(), 3).await;
}

async fn finished_write_keeps_compare_and_set(url: &str, replicas: usize) {
    let js = jetstream::new(nats_client(url).await.unwrap());
    let cfg = StreamsConfig {
        kv_history: 4,
        replicas,
        ..StreamsConfig::default()
    };
    // A cluster just formed may answer "no responders" for a moment.
    let deadline = Instant::now() + Duration::from_secs(60);
    let bucket = loop {
        match within(TIMEOUT, "ensure", topology::ensure(&js, &cfg)).await {
            Ok(Ok(bucket)) => break bucket,
            other => assert!(Instant::now() < deadline, "ensure: {other:?}"),
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    };
    assert_eq!(
        kv_stream(&js)
            .await
            .info()
            .await
            .unwrap()
            .config
            .num_replicas,
        replicas
    );
    let store = KvStateStore::new(js.clone(), bucket, PARTITIONS).expire_finished(KEEP);
    assert_eq!(store.finished_ttl(), Some(KEEP));
    let defs = sagaflow_actors::definition::load_dir(&repo_dir().join("sagas")).unwrap();
    let def = defs.iter().find(|d| d.name == "order").unwrap();
    let (mut saga, _) = Saga::start(def, "cas-1".into(), b"{}".to_vec(), 1);
    let subject = kv_subject("cas-1");

    let r1 = store.save(&saga, None).await.unwrap();
    let conflict = store.save(&saga, None).await.unwrap_err();
    assert!(matches!(conflict, PortError::Conflict { .. }), "{conflict}");
    saga.updated_at = 2;
    let r2 = store.save(&saga, Some(r1)).await.unwrap();
    assert_eq!(messages_on(&js, &subject).await, 2, "history 4 keeps both");

    saga.phase = Phase::Completed;
    assert!(saga.is_terminal());
    let stale = store.save(&saga, Some(r1)).await.unwrap_err();
    assert!(
        matches!(stale, PortError::Conflict { expected: Some(r), .. } if r == r1),
        "a lost compare-and-set is a conflict, as for any other write: {stale}"
    );
    assert_eq!(messages_on(&js, &subject).await, 2, "nothing written");
    let r3 = store.save(&saga, Some(r2)).await.unwrap();
    assert!(r3 > r2);
    // Reads are direct gets, which a lagging replica may answer in a cluster: poll.
    wait_until(TIMEOUT, "the finished snapshot to be read back", || {
        let store = store.clone();
        async move {
            matches!(store.load("cas-1").await, Ok(Some((s, rev))) if s.phase == Phase::Completed && rev == r3)
        }
    })
    .await
    .unwrap();
    assert_eq!(messages_on(&js, &subject).await, 1, "rolled up");

    // Gone from what `load` reads and from the stream leader (each replica expires on its own).
    wait_until(REMOVAL_TIMEOUT, "the finished snapshot to expire", || {
        let (store, js, subject) = (store.clone(), js.clone(), subject.clone());
        async move {
            matches!(store.load("cas-1").await, Ok(None)) && messages_on(&js, &subject).await == 0
        }
    })
    .await
    .unwrap();
    // The id can be created again.
    saga.phase = Phase::Running;
    store.save(&saga, None).await.unwrap();
}

/// Take-over reads the index headers of each key's last write, not snapshots: it finds the
/// running sagas, a saga written by an older version (no headers: read to be safe) and skips
/// the finished ones and keys that name no saga; the orphan sweep finds the unfinished sagas
/// written since a moment.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn take_over_finds_the_unfinished_sagas_by_their_headers() {
    let server = start_nats().await.unwrap();
    let js = jetstream::new(nats_client(&server.url()).await.unwrap());
    let cfg = StreamsConfig {
        kv_history: 4,
        ..StreamsConfig::default()
    };
    let bucket = topology::ensure(&js, &cfg).await.unwrap();
    let store =
        KvStateStore::new(js.clone(), bucket.clone(), PARTITIONS).expire_finished(KEEP * 1000);
    let defs = sagaflow_actors::definition::load_dir(&repo_dir().join("sagas")).unwrap();
    let def = defs.iter().find(|d| d.name == "order").unwrap();
    // Ids of one partition: some running, some finished (written twice), one parked.
    let ids: Vec<String> = (0..400)
        .map(|i| format!("scan-{i}"))
        .filter(|id| partition_of(id, PARTITIONS) == 1)
        .take(30)
        .collect();
    let mut expect_unfinished = Vec::new();
    for (i, id) in ids.iter().enumerate() {
        let (mut saga, _) = Saga::start(def, id.clone(), b"{}".to_vec(), 1_000 + i as i64);
        let rev = store.save(&saga, None).await.unwrap();
        match i % 3 {
            0 => expect_unfinished.push(id.clone()),
            1 => {
                saga.phase = Phase::Completed;
                saga.status = "SHIPPED".into();
                store.save(&saga, Some(rev)).await.unwrap();
            }
            _ => {
                saga.phase = Phase::NeedsAttention;
                store.save(&saga, Some(rev)).await.unwrap();
                expect_unfinished.push(id.clone());
            }
        }
    }
    // Written by a version before the index headers: a plain KV put.
    let old_id = (0..400)
        .map(|i| format!("old-{i}"))
        .find(|id| partition_of(id, PARTITIONS) == 1)
        .unwrap();
    let (old, _) = Saga::start(def, old_id.clone(), b"{}".to_vec(), 7);
    bucket
        .put(
            topology::saga_key(1, &old_id),
            sagaflow_actors::wire::encode_snapshot(&old).unwrap().into(),
        )
        .await
        .unwrap();
    expect_unfinished.push(old_id);
    bucket.put("1.not a saga", "x".into()).await.ok();
    bucket.put("1.x*y", "x".into()).await.ok();

    let mut found = sagaflow::index::unfinished(&bucket, 1).await.unwrap();
    found.sort();
    expect_unfinished.sort();
    assert_eq!(found, expect_unfinished);
    assert!(
        sagaflow::index::unfinished(&bucket, 2)
            .await
            .unwrap()
            .is_empty(),
        "another partition's sagas are not listed"
    );

    // Since a moment: only what was written after it.
    let since = sagaflow::clock::now_ms() - 1;
    tokio::time::sleep(Duration::from_millis(20)).await;
    let late = ids[0].clone();
    let (saga, rev) = store.load(&late).await.unwrap().unwrap();
    let mut saga = saga;
    saga.updated_at += 1;
    store.save(&saga, Some(rev)).await.unwrap();
    let (mut done, rev) = store.load(&ids[3]).await.unwrap().unwrap();
    done.phase = Phase::Completed;
    store.save(&done, Some(rev)).await.unwrap();
    let recent = sagaflow::index::recently_unfinished(&bucket, 1, since, i64::MAX)
        .await
        .unwrap();
    assert!(
        sagaflow::index::recently_unfinished(&bucket, 1, since, since)
            .await
            .unwrap()
            .is_empty(),
        "nothing was written before `since`"
    );
    assert_eq!(recent, vec![late], "{} finished since", ids[3]);
}
