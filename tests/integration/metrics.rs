//! Metrics and HTTP probes: `/metrics` after a batch of orders, `/healthz` and `/readyz`
//! through a NATS outage, gRPC health following readiness, and the alert rules in
//! `deploy/prometheus/alerts.yml` referring only to exported metrics.
use crate::common;
use crate::promql;

use common::checks::*;

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::time::Duration;

use common::*;
use promql::{exported_names, metric_refs};
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;
use tonic_health::pb::HealthCheckRequest;

const PARTITIONS: u32 = 4;

async fn status_of(addr: SocketAddr, path: &str) -> u16 {
    within(Duration::from_secs(5), path, http_get(addr, path))
        .await
        .ok()
        .and_then(Result::ok)
        .map_or(0, |(s, _)| s)
}

async fn health_of(client: &mut HealthClient<tonic::transport::Channel>) -> Option<i32> {
    within(
        Duration::from_secs(5),
        "health check",
        client.check(HealthCheckRequest {
            service: "sagaflow.v1.OrderService".into(),
        }),
    )
    .await
    .ok()?
    .ok()
    .map(|r| r.into_inner().status)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn metrics_and_probes_follow_orders_and_nats() {
    let nats = start_nats().await.unwrap();
    let node = TestNode::on(&nats)
        .id("metrics-1")
        .partitions(PARTITIONS)
        .http()
        .start()
        .await
        .unwrap();
    let http = node.http_addr;
    assert_ne!(http.port(), 0);
    let client = connect_orders(&node.grpc_addr.to_string()).await.unwrap();

    // Partitions are acquired within a heartbeat or two; the gauge follows within a second.
    wait_until(
        Duration::from_secs(20),
        "partitions owned gauge",
        || async {
            let Ok(Ok((_, text))) =
                within(Duration::from_secs(5), "scrape", http_get(http, "/metrics")).await
            else {
                return false;
            };
            sample_sum(&text, "sagaflow_partitions_owned") == Some(f64::from(PARTITIONS))
        },
    )
    .await
    .unwrap();

    let ids = place_mix(&client, "m", 50).await;
    let orders = wait_all_terminal(&client, &ids, Duration::from_secs(60)).await;
    let shipped = orders.iter().filter(|o| o.status == "SHIPPED").count();
    let cancelled = orders.iter().filter(|o| o.status == "CANCELLED").count();
    assert!(
        shipped > 0 && cancelled > 0,
        "{shipped} shipped, {cancelled} cancelled"
    );
    assert_eq!(shipped + cancelled, ids.len(), "{orders:?}");

    // Counters are bumped right after each snapshot is persisted, before the order reads as
    // terminal; the DLQ gauge is polled every few seconds.
    let text = std::sync::Mutex::new(String::new());
    let settled = wait_until(Duration::from_secs(20), "metrics to settle", || async {
        let Ok(Ok((200, body))) =
            within(Duration::from_secs(5), "scrape", http_get(http, "/metrics")).await
        else {
            return false;
        };
        let ok = sample_sum(&body, "sagaflow_sagas_completed_total") == Some(shipped as f64)
            && sample_sum(&body, "sagaflow_sagas_compensated_total") == Some(cancelled as f64)
            && sample_sum(&body, "sagaflow_dlq_depth").is_some()
            && body.contains("consumer=\"evt-p0\"")
            && body.contains("consumer=\"svc-payment\"")
            // The demo serves the order saga's services; the trip's hotel nobody does.
            && body.contains("sagaflow_service_without_consumer{service=\"payment\"} 0")
            && body.contains("sagaflow_service_without_consumer{service=\"hotel\"} 1");
        *text.lock().unwrap() = body;
        ok
    })
    .await;
    let text = text.into_inner().unwrap();
    if let Err(e) = settled {
        panic!("{e}\n{text}");
    }
    assert!(
        text.contains(&format!(
            "sagaflow_sagas_started_total{{saga=\"order\"}} {}\n",
            ids.len()
        )),
        "{text}"
    );
    assert_eq!(
        sample_sum(&text, "sagaflow_sagas_failed_total"),
        None,
        "{text}"
    );
    assert!(
        sample_sum(&text, "sagaflow_step_duration_seconds_count").unwrap_or(0.0) > 0.0,
        "{text}"
    );
    assert!(
        sample_sum(&text, "sagaflow_compensation_duration_seconds_count").unwrap_or(0.0) > 0.0,
        "{text}"
    );
    assert!(
        sample_sum(&text, "sagaflow_step_attempts_total").unwrap_or(0.0) >= ids.len() as f64,
        "{text}"
    );
    assert!(
        text.contains("sagaflow_step_errors_total{service=\"payment\",kind=\"declined\"}"),
        "{text}"
    );
    assert_eq!(
        sample_sum(&text, "sagaflow_partitions_owned"),
        Some(f64::from(PARTITIONS))
    );
    assert!(text.contains("consumer=\"svc-payment\""), "{text}");
    assert!(text.contains("consumer=\"evt-p0\""), "{text}");
    assert!(text.contains("# EOF"), "OpenMetrics text ends with # EOF");

    assert_eq!(status_of(http, "/healthz").await, 200);
    assert_eq!(status_of(http, "/readyz").await, 200);
    let mut health = HealthClient::new(channel(&node.grpc_addr.to_string()).await.unwrap());
    assert_eq!(
        health_of(&mut health).await,
        Some(ServingStatus::Serving as i32)
    );

    // NATS goes away: not ready, not healthy, gRPC health NOT_SERVING.
    tokio::task::block_in_place(|| nats.stop()).unwrap();
    wait_until(
        Duration::from_secs(15),
        "/readyz 503 without nats",
        || async { status_of(http, "/readyz").await == 503 },
    )
    .await
    .unwrap();
    assert_eq!(status_of(http, "/healthz").await, 503);
    wait_until(
        Duration::from_secs(5),
        "grpc NOT_SERVING without nats",
        || {
            let mut h = health.clone();
            async move { health_of(&mut h).await == Some(ServingStatus::NotServing as i32) }
        },
    )
    .await
    .unwrap();

    // And back.
    tokio::task::block_in_place(|| nats.restart()).unwrap();
    wait_until(
        Duration::from_secs(30),
        "/readyz 200 after nats restart",
        || async { status_of(http, "/readyz").await == 200 },
    )
    .await
    .unwrap();
    assert_eq!(status_of(http, "/healthz").await, 200);
    wait_until(
        Duration::from_secs(5),
        "grpc SERVING after nats restart",
        || {
            let mut h = health.clone();
            async move { health_of(&mut h).await == Some(ServingStatus::Serving as i32) }
        },
    )
    .await
    .unwrap();

    within(Duration::from_secs(90), "shutdown", node.shutdown())
        .await
        .unwrap()
        .unwrap();
    // The HTTP endpoint is gone with the node.
    assert_eq!(status_of(http, "/readyz").await, 0);
}

#[test]
fn alert_rules_parse_and_use_exported_metrics() {
    let names = exported_names();
    for expected in [
        "sagaflow_sagas_started_total",
        "sagaflow_sagas_completed_total",
        "sagaflow_sagas_compensated_total",
        "sagaflow_sagas_failed_total",
        "sagaflow_sagas_parked_total",
        "sagaflow_sagas_needs_attention",
        "sagaflow_sagas_stuck",
        "sagaflow_sagas_in_flight",
        "sagaflow_step_duration_seconds_bucket",
        "sagaflow_compensation_duration_seconds_count",
        "sagaflow_step_attempts_total",
        "sagaflow_step_errors_total",
        "sagaflow_dlq_depth",
        "sagaflow_consumer_pending",
        "sagaflow_consumer_ack_pending",
        "sagaflow_partitions_owned",
        "sagaflow_ready",
        "sagaflow_nats_connected",
    ] {
        assert!(names.contains(expected), "{expected} not in {names:?}");
    }
    let path = repo_dir().join("deploy/prometheus/alerts.yml");
    let text = std::fs::read_to_string(&path).unwrap();
    let doc: serde_yaml::Value = serde_yaml::from_str(&text).unwrap();
    let groups = doc["groups"].as_sequence().expect("groups: a list");
    assert!(!groups.is_empty());
    let mut severities = std::collections::BTreeMap::new();
    let mut used = BTreeSet::new();
    for g in groups {
        assert!(g["name"].as_str().is_some(), "group without a name: {g:?}");
        for rule in g["rules"].as_sequence().expect("rules: a list") {
            let alert = rule["alert"].as_str().expect("alert name");
            let expr = rule["expr"].as_str().expect("expr");
            let severity = rule["labels"]["severity"]
                .as_str()
                .unwrap_or_else(|| panic!("{alert}: severity"));
            assert!(
                severities
                    .insert(alert.to_string(), severity.to_string())
                    .is_none(),
                "duplicate alert {alert}"
            );
            assert!(
                rule["annotations"]["summary"].as_str().is_some(),
                "{alert}: summary"
            );
            if let Some(f) = rule["for"].as_str() {
                assert!(
                    f.ends_with('m') || f.ends_with('s') || f.ends_with('h'),
                    "{alert}: for {f}"
                );
            }
            let refs = metric_refs(expr);
            assert!(!refs.is_empty(), "{alert} uses no sagaflow metric: {expr}");
            for r in refs {
                assert!(
                    names.contains(&r),
                    "{alert} uses `{r}`, which is not exported ({names:?})"
                );
                used.insert(r);
            }
        }
    }
    for family in [
        "sagaflow_consumer_pending",
        "sagaflow_dlq_depth",
        "sagaflow_step_errors_total",
        "sagaflow_sagas_failed_total",
        "sagaflow_sagas_needs_attention",
        "sagaflow_sagas_stuck",
    ] {
        assert!(used.contains(family), "no alert on {family}");
    }
    for (alert, severity) in [
        ("SagaflowSagasNeedAttention", "critical"),
        ("SagaflowSagasStuck", "warning"),
    ] {
        assert_eq!(
            severities.get(alert).map(String::as_str),
            Some(severity),
            "{alert}: severity"
        );
    }
}
