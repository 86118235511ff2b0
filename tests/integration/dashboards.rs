//! The Grafana dashboard `deploy/grafana/sagaflow.json`: its structure (ids, types, data
//! sources, queries, a layout without overlaps), its template variables, and its queries
//! against what a node exports. Every exported metric family must have a panel, or be listed
//! in [`NO_PANEL`] with the reason, so the dashboard keeps up with new metrics.
//!
//! No PromQL parser runs here (CI has no `promtool`): the queries are checked for the metric
//! names, labels and variables they use.
use crate::promql;

use std::collections::{BTreeMap, BTreeSet};

use promql::{exported_families, exported_labels, exported_names, metric_refs, series_names};
use serde_json::Value;

const DASHBOARD: &str = "deploy/grafana/sagaflow.json";

/// Exported metric families that deliberately have no panel: (family, reason).
const NO_PANEL: &[(&str, &str)] = &[(
    "sagaflow_service_without_consumer",
    "0 or 1 per service, and 1 only until someone serves it: an alert (SagaflowServiceWithoutConsumer) says so, and `sagaflow saga list` shows which",
)];

/// Grafana's own variables, usable in any query.
const BUILTIN_VARS: &[&str] = &[
    "__rate_interval",
    "__interval",
    "__interval_ms",
    "__range",
    "__range_s",
    "__range_ms",
];

/// Units a panel may declare.
const UNITS: &[&str] = &["s", "ops", "short", "percentunit"];

/// Labels Prometheus adds to every scraped series.
const TARGET_LABELS: &[&str] = &["instance", "job"];

/// The data source every panel and query names: the `datasource` template variable.
const DATASOURCE_UID: &str = "${datasource}";

fn dashboard() -> Value {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join(DASHBOARD);
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{DASHBOARD}: {e}"));
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("{DASHBOARD}: {e}"))
}

/// Every panel: the top-level ones, then those inside collapsed rows.
fn all_panels(d: &Value) -> Vec<&Value> {
    let top = d["panels"].as_array().expect("panels: a list");
    let nested = top.iter().filter_map(|p| p["panels"].as_array()).flatten();
    top.iter().chain(nested).collect()
}

/// (panel title, expr, legend) of every query.
fn queries(d: &Value) -> Vec<(String, String, String)> {
    all_panels(d)
        .into_iter()
        .flat_map(|p| {
            let title = p["title"].as_str().unwrap_or_default().to_string();
            p["targets"].as_array().into_iter().flatten().map(move |t| {
                (
                    title.clone(),
                    t["expr"].as_str().unwrap_or_default().to_string(),
                    t["legendFormat"].as_str().unwrap_or_default().to_string(),
                )
            })
        })
        .collect()
}

/// The query text of a query template variable (a string, or `{"query": …}`).
fn variable_query(v: &Value) -> Option<&str> {
    v["query"].as_str().or_else(|| v["query"]["query"].as_str())
}

/// Names of the variables used in `text`: `$name`, `${name}`, `${name:format}`, `[[name]]`.
fn variables_used(text: &str) -> BTreeSet<String> {
    let word = |s: &str| {
        s.chars()
            .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
            .collect::<String>()
    };
    let mut out = BTreeSet::new();
    for (i, _) in text.match_indices('$') {
        let rest = &text[i + 1..];
        let name = match rest.strip_prefix('{') {
            Some(braced) => {
                let inner = braced.split('}').next().unwrap_or_default();
                inner.split(':').next().unwrap_or_default().to_string()
            }
            None => word(rest),
        };
        assert!(!name.is_empty(), "a `$` names no variable in {text:?}");
        out.insert(name);
    }
    for (i, _) in text.match_indices("[[") {
        out.insert(word(&text[i + 2..]));
    }
    out
}

/// The label names used inside the `{…}` selectors of `metric` in `expr`.
fn selector_labels(expr: &str, metric: &str) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    for (i, _) in expr.match_indices(metric) {
        let after = &expr[i + metric.len()..];
        // A longer name that starts with this one is another metric.
        if after.starts_with(|c: char| c.is_ascii_alphanumeric() || c == '_' || c == ':') {
            continue;
        }
        let Some(body) = after.strip_prefix('{') else {
            continue;
        };
        let body = body.split('}').next().unwrap_or_default();
        for matcher in split_outside_quotes(body) {
            let name = matcher
                .split(['=', '!', '~'])
                .next()
                .unwrap_or_default()
                .trim();
            if !name.is_empty() {
                out.insert(name.to_string());
            }
        }
    }
    out
}

/// Splits label matchers on the commas that are not inside a quoted value.
fn split_outside_quotes(body: &str) -> Vec<&str> {
    let mut parts = Vec::new();
    let (mut start, mut quoted) = (0, false);
    for (i, c) in body.char_indices() {
        match c {
            '"' => quoted = !quoted,
            ',' if !quoted => {
                parts.push(&body[start..i]);
                start = i + 1;
            }
            _ => {}
        }
    }
    parts.push(&body[start..]);
    parts
}

/// The labels of every `by (…)` / `without (…)` clause in `expr`.
fn grouping_labels(expr: &str) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    for keyword in ["by", "without"] {
        for (i, _) in expr.match_indices(keyword) {
            // Not the end of a longer word (`max_by`, `nearby`).
            let word_start = i == 0 || {
                let c = expr.as_bytes()[i - 1];
                !(c.is_ascii_alphanumeric() || c == b'_' || c == b':')
            };
            let Some(list) = expr[i + keyword.len()..].trim_start().strip_prefix('(') else {
                continue;
            };
            if !word_start {
                continue;
            }
            let list = list.split(')').next().unwrap_or_default();
            out.extend(
                list.split(',')
                    .map(str::trim)
                    .filter(|l| !l.is_empty())
                    .map(str::to_string),
            );
        }
    }
    out
}

/// The `{{label}}` names of a legend format.
fn legend_labels(legend: &str) -> BTreeSet<String> {
    legend
        .split("{{")
        .skip(1)
        .filter_map(|s| s.split_once("}}"))
        .map(|(l, _)| l.trim().to_string())
        .collect()
}

fn grid(p: &Value) -> (i64, i64, i64, i64) {
    let g = &p["gridPos"];
    let field = |k: &str| {
        g[k].as_i64()
            .unwrap_or_else(|| panic!("panel {:?}: gridPos.{k}", p["title"]))
    };
    (field("x"), field("y"), field("w"), field("h"))
}

/// No two panels of one layer (the top level, or one collapsed row's content) overlap, and
/// every panel fits in 24 columns.
fn check_layout(layer: &[&Value]) {
    let boxes: Vec<(String, (i64, i64, i64, i64))> = layer
        .iter()
        .map(|p| (p["title"].as_str().unwrap_or_default().to_string(), grid(p)))
        .collect();
    for (title, (x, y, w, h)) in &boxes {
        assert!(
            *x >= 0 && *y >= 0 && *w >= 1 && *h >= 1,
            "{title}: gridPos {:?}",
            (x, y, w, h)
        );
        assert!(x + w <= 24, "{title}: x {x} + w {w} exceeds 24 columns");
    }
    for (i, (a, (ax, ay, aw, ah))) in boxes.iter().enumerate() {
        for (b, (bx, by, bw, bh)) in &boxes[i + 1..] {
            let apart = ax + aw <= *bx || bx + bw <= *ax || ay + ah <= *by || by + bh <= *ay;
            assert!(apart, "panels {a:?} and {b:?} overlap");
        }
    }
}

#[test]
fn dashboard_structure() {
    let d = dashboard();
    assert!(d["title"].as_str().is_some_and(|t| !t.is_empty()), "title");
    let uid = d["uid"].as_str().expect("uid");
    assert!(
        !uid.is_empty() && uid.len() <= 40,
        "uid {uid:?}: 1 to 40 characters"
    );
    let schema = d["schemaVersion"].as_i64().expect("schemaVersion");
    assert!(schema >= 36, "schemaVersion {schema}");

    let panels = all_panels(&d);
    assert!(panels.len() > 10, "{} panels", panels.len());
    let mut ids = BTreeSet::new();
    for p in &panels {
        let title = p["title"].as_str().expect("every panel has a title");
        let id = p["id"]
            .as_i64()
            .unwrap_or_else(|| panic!("{title}: numeric id"));
        assert!(ids.insert(id), "{title}: duplicate panel id {id}");
        let kind = p["type"]
            .as_str()
            .unwrap_or_else(|| panic!("{title}: type"));
        assert!(!kind.is_empty(), "{title}: type");
        if kind == "row" {
            let (x, _, w, h) = grid(p);
            assert_eq!(
                (x, w, h),
                (0, 24, 1),
                "row {title}: full width, one unit high"
            );
            continue;
        }
        assert!(!title.is_empty(), "panel {id} has an empty title");
        assert!(
            p["description"]
                .as_str()
                .is_some_and(|s| !s.trim().is_empty()),
            "{title}: description"
        );
        assert_eq!(
            p["datasource"]["uid"].as_str(),
            Some(DATASOURCE_UID),
            "{title}: datasource"
        );
        assert_eq!(
            p["datasource"]["type"].as_str(),
            Some("prometheus"),
            "{title}: datasource type"
        );
        let unit = p["fieldConfig"]["defaults"]["unit"]
            .as_str()
            .unwrap_or_else(|| panic!("{title}: fieldConfig.defaults.unit"));
        assert!(
            UNITS.contains(&unit),
            "{title}: unit {unit} not in {UNITS:?}"
        );
        let targets = p["targets"]
            .as_array()
            .filter(|t| !t.is_empty())
            .unwrap_or_else(|| panic!("{title}: targets"));
        let mut refs = BTreeSet::new();
        for t in targets {
            let expr = t["expr"].as_str().unwrap_or_default();
            assert!(!expr.trim().is_empty(), "{title}: a target without expr");
            let ref_id = t["refId"]
                .as_str()
                .unwrap_or_else(|| panic!("{title}: refId of {expr}"));
            assert!(refs.insert(ref_id), "{title}: duplicate refId {ref_id}");
            if !t["datasource"].is_null() {
                assert_eq!(
                    t["datasource"]["uid"].as_str(),
                    Some(DATASOURCE_UID),
                    "{title}: target datasource"
                );
            }
        }
    }

    let top: Vec<&Value> = d["panels"].as_array().unwrap().iter().collect();
    check_layout(&top);
    for row in &top {
        if let Some(inner) = row["panels"].as_array().filter(|p| !p.is_empty()) {
            assert_eq!(
                row["collapsed"].as_bool(),
                Some(true),
                "row {:?} holds panels but is not collapsed",
                row["title"]
            );
            check_layout(&inner.iter().collect::<Vec<_>>());
        }
    }
}

#[test]
fn dashboard_variables_are_defined_and_used() {
    let d = dashboard();
    let vars = d["templating"]["list"].as_array().expect("templating.list");
    let mut defined = BTreeMap::new();
    for v in vars {
        let name = v["name"].as_str().expect("variable name");
        let kind = v["type"].as_str().expect("variable type");
        assert!(
            defined.insert(name.to_string(), v).is_none(),
            "variable {name} defined twice"
        );
        if kind == "query" {
            assert_eq!(
                v["datasource"]["uid"].as_str(),
                Some(DATASOURCE_UID),
                "variable {name}: datasource"
            );
        }
    }
    let ds = defined.get("datasource").expect("a `datasource` variable");
    assert_eq!(ds["type"].as_str(), Some("datasource"));
    assert_eq!(ds["query"].as_str(), Some("prometheus"));
    let names = exported_names();
    for var in ["instance", "saga"] {
        let v = defined
            .get(var)
            .unwrap_or_else(|| panic!("a `{var}` variable"));
        assert_eq!(v["type"].as_str(), Some("query"), "{var}: type");
        let q = variable_query(v).unwrap_or_else(|| panic!("{var}: query"));
        assert!(q.starts_with("label_values("), "{var}: {q}");
        assert!(
            q.trim_end().ends_with(&format!(", {var})")),
            "{var}: values of the `{var}` label: {q}"
        );
        let refs = metric_refs(q);
        assert!(!refs.is_empty(), "{var}: names no metric: {q}");
        for r in refs {
            assert!(names.contains(&r), "{var}: `{r}` is not exported");
        }
    }

    // Every variable used is defined (or Grafana's), and every one defined is used.
    let mut texts: Vec<String> = queries(&d).into_iter().map(|(_, e, _)| e).collect();
    texts.extend(vars.iter().filter_map(variable_query).map(str::to_string));
    let mut used = BTreeSet::new();
    for p in all_panels(&d) {
        if let Some(uid) = p["datasource"]["uid"].as_str() {
            used.extend(variables_used(uid));
        }
    }
    for text in &texts {
        for name in variables_used(text) {
            assert!(
                defined.contains_key(&name) || BUILTIN_VARS.contains(&name.as_str()),
                "`${name}` in {text:?} is not a template variable"
            );
            used.insert(name);
        }
    }
    for name in defined.keys() {
        assert!(used.contains(name), "variable {name} is never used");
    }
}

#[test]
fn dashboard_queries_use_exported_metrics_and_cover_every_family() {
    let d = dashboard();
    let names = exported_names();
    let labels = exported_labels();
    let mut used = BTreeSet::new();
    for (title, expr, legend) in queries(&d) {
        let refs = metric_refs(&expr);
        assert!(!refs.is_empty(), "{title}: no sagaflow metric in {expr}");
        let mut available: BTreeSet<String> = TARGET_LABELS.iter().map(|l| l.to_string()).collect();
        for r in &refs {
            assert!(
                names.contains(r),
                "{title}: `{r}` is not exported ({names:?})"
            );
            let own = labels.get(r).cloned().unwrap_or_default();
            for l in selector_labels(&expr, r) {
                assert!(
                    own.contains(&l) || TARGET_LABELS.contains(&l.as_str()),
                    "{title}: `{r}` has no label `{l}` ({own:?}): {expr}"
                );
            }
            available.extend(own);
        }
        let grouped = grouping_labels(&expr);
        for l in &grouped {
            assert!(
                available.contains(l),
                "{title}: groups by `{l}`, which none of its metrics has: {expr}"
            );
        }
        // With an aggregation, only the grouping labels survive into the legend.
        let shown = if grouped.is_empty() {
            &available
        } else {
            &grouped
        };
        for l in legend_labels(&legend) {
            assert!(
                shown.contains(&l),
                "{title}: legend {legend:?} shows `{l}`, which {expr} does not keep"
            );
        }
        used.extend(refs);
    }

    let families = exported_families();
    let skipped: BTreeMap<&str, &str> = NO_PANEL.iter().copied().collect();
    for (family, reason) in &skipped {
        assert!(
            families.contains_key(*family),
            "NO_PANEL lists {family}, which is not exported"
        );
        assert!(
            !reason.trim().is_empty(),
            "NO_PANEL {family}: give the reason"
        );
    }
    for (family, kind) in &families {
        let shown = series_names(family, kind).iter().any(|n| used.contains(n));
        if skipped.contains_key(family.as_str()) {
            assert!(!shown, "{family} has a panel now: remove it from NO_PANEL");
        } else {
            assert!(
                shown,
                "no panel shows {family} ({kind}): add one to {DASHBOARD}, or list it in \
                 NO_PANEL with the reason"
            );
        }
    }
}

#[test]
fn query_helpers() {
    assert_eq!(
        variables_used("rate(x{a=~\"$instance\"}[$__rate_interval]) ${saga:regex} [[old]]"),
        ["__rate_interval", "instance", "old", "saga"]
            .map(String::from)
            .into()
    );
    assert_eq!(
        selector_labels(
            "sum by (le) (rate(m_bucket{a=\"x,y\", b!~\"z\"}[5m])) / m_bucket_more{c=\"1\"}",
            "m_bucket"
        ),
        ["a", "b"].map(String::from).into()
    );
    assert_eq!(
        grouping_labels("sum by (le, step) (x) / sum without(kind) (y) + max_by_(z)"),
        ["kind", "le", "step"].map(String::from).into()
    );
    assert_eq!(
        legend_labels("{{step}} p99 {{ saga }}"),
        ["saga", "step"].map(String::from).into()
    );
}
