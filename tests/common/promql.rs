//! What a node exports, for the tests that check PromQL written against it: the alert rules
//! (`tests/integration/metrics.rs`) and the Grafana dashboard
//! (`tests/integration/dashboards.rs`). A module of its own in `tests/integration/main.rs`
//! (it needs none of the process harness).
// Support code shared by several test binaries: its `pub` items are for them.
#![allow(unreachable_pub)]
// Each test uses part of it.
#![allow(dead_code)]

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use sagaflow::metrics::{ConsumerLabels, Metrics};
use sagaflow_actors::machine::Phase;
use sagaflow_actors::ports::{AttentionCount, Observer};

/// The OpenMetrics text of a node's metrics with a series in every family.
fn exposition() -> String {
    // Families print only once they have a series: give each one.
    let m = Metrics::new();
    m.saga_finished("alert-check", Phase::Completed);
    m.saga_finished("alert-check", Phase::Compensated);
    m.saga_finished("alert-check", Phase::Failed);
    m.step_settled("alert-check", "s", false, Duration::from_millis(5), None);
    m.step_settled("alert-check", "s", true, Duration::from_millis(5), None);
    m.step_attempt("alert-check", "s", "svc", false);
    m.step_error("alert-check", "s", "svc", "declined");
    m.live_sagas(1);
    m.saga_parked("alert-check");
    m.attention(&[AttentionCount {
        saga: "alert-check".into(),
        needs_attention: 1,
        stuck: 1,
    }]);
    // A refusal (the partition's owner reported full pressure).
    assert!(m.admission.admit("alert-check", 0.25, 1.0).is_err());
    let labels = ConsumerLabels {
        stream: "S".into(),
        consumer: "c".into(),
    };
    m.event_refused("saga_id");
    m.event_ignored("duplicate");
    m.orphan_adopted("order-1");
    let readiness = sagaflow::metrics::Readiness::default();
    readiness.set_connected(true);
    readiness.set_connected(false);
    m.set_readiness(&readiness);
    m.fenced_writes.inc();
    m.consumer_pending.get_or_create(&labels).set(1);
    m.consumer_ack_pending.get_or_create(&labels).set(1);
    m.service_served("svc", false);
    m.sagas_started
        .get_or_create(&sagaflow::metrics::SagaLabels {
            saga: "alert-check".into(),
        })
        .inc();
    m.encode()
}

/// Every metric family a node exports (`sagaflow_…`, as on its `# TYPE` line) and its type
/// (`counter`, `gauge`, `histogram`).
///
/// Panics if `src/metrics.rs` registers a metric this function gives no series: an empty
/// family is not encoded, so it would silently escape the checks built on this list.
pub fn exported_families() -> BTreeMap<String, String> {
    let mut families = BTreeMap::new();
    for line in exposition().lines() {
        let Some(rest) = line.strip_prefix("# TYPE ") else {
            continue;
        };
        let mut parts = rest.split_whitespace();
        if let (Some(name), Some(kind)) = (parts.next(), parts.next()) {
            families.insert(name.to_string(), kind.to_string());
        }
    }
    for name in registered_families() {
        assert!(
            families.contains_key(&name),
            "src/metrics.rs registers {name}, but tests/common/promql.rs gives it no series: \
             add one in exposition()"
        );
    }
    families
}

/// The names PromQL uses for a family: counters end `_total`, histograms are read through
/// `_bucket`, `_sum` and `_count`.
pub fn series_names(family: &str, kind: &str) -> Vec<String> {
    let suffixes: &[&str] = match kind {
        "counter" => &["_total"],
        "histogram" => &["_bucket", "_sum", "_count"],
        _ => &[""],
    };
    suffixes.iter().map(|s| format!("{family}{s}")).collect()
}

/// Every metric name a node exports, with the suffixes Prometheus queries use.
pub fn exported_names() -> BTreeSet<String> {
    exported_families()
        .iter()
        .flat_map(|(family, kind)| series_names(family, kind))
        .collect()
}

/// The label names of every exported series name (`sagaflow_…_bucket` has `le`).
pub fn exported_labels() -> BTreeMap<String, BTreeSet<String>> {
    let mut out: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for line in exposition().lines().filter(|l| !l.starts_with('#')) {
        let end = line.find(['{', ' ']).unwrap_or(line.len());
        let labels = out.entry(line[..end].to_string()).or_default();
        if let Some((_, rest)) = line[end..].split_once('{') {
            let (pairs, _) = rest.split_once('}').unwrap_or((rest, ""));
            // The seeded label values contain no commas.
            for pair in pairs.split(',').filter(|p| !p.is_empty()) {
                if let Some((name, _)) = pair.split_once('=') {
                    labels.insert(name.to_string());
                }
            }
        }
    }
    out
}

/// The families `src/metrics.rs` registers (`registry.register("name", …)`, prefixed
/// `sagaflow_`), read from its source.
pub fn registered_families() -> BTreeSet<String> {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("src/metrics.rs");
    let source = std::fs::read_to_string(&path).expect("read src/metrics.rs");
    let names: BTreeSet<String> = source
        .split(".register(")
        .skip(1)
        .filter_map(|call| {
            let rest = call.trim_start().strip_prefix('"')?;
            let (name, _) = rest.split_once('"')?;
            Some(format!("sagaflow_{name}"))
        })
        .collect();
    assert!(
        names.len() >= 10,
        "found only {names:?} registered in src/metrics.rs: did its registration change shape?"
    );
    names
}

/// Identifiers starting `sagaflow_` in a PromQL expression.
pub fn metric_refs(expr: &str) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    let bytes = expr.as_bytes();
    let mut i = 0;
    while let Some(at) = expr[i..].find("sagaflow_") {
        let start = i + at;
        let boundary = start == 0 || {
            let c = bytes[start - 1];
            !(c.is_ascii_alphanumeric() || c == b'_' || c == b':')
        };
        let end = expr[start..]
            .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_' || c == ':'))
            .map_or(expr.len(), |e| start + e);
        if boundary {
            out.insert(expr[start..end].to_string());
        }
        i = end;
    }
    out
}
