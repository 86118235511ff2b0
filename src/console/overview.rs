//! The overview: sagas by phase (the whole cluster, from the list index), the sagas needing
//! an operator, and small charts of this node's own metrics over the last minutes: sagas
//! started and finished per second, step latency p50 / p99, and the step error rate.
//!
//! The charts come from [`Metrics`](crate::metrics::Metrics) as `/metrics` serves them: every
//! [`SAMPLE_EVERY`] the OpenMetrics text is read into a [`Sample`] kept in a ring of
//! [`SAMPLES`]; each chart point is the difference between two samples. Drawn as inline SVG on
//! the server.

use std::collections::VecDeque;
use std::sync::Mutex;
use std::time::Duration;

use axum::extract::State;
use axum::response::{IntoResponse, Response};
use axum::Extension;
use maud::{html, Markup};
use sagaflow_proto::v1::saga_service_server::SagaService;
use sagaflow_proto::v1::{self, ListSagasNeedingAttentionRequest};
use tokio_util::sync::CancellationToken;

use super::layout::{self, Nav};
use super::session::Viewer;
use super::{live, sagas, Console, Ctx};

/// How often this node's metrics are sampled.
pub(crate) const SAMPLE_EVERY: Duration = Duration::from_secs(2);
/// How many samples are kept (10 minutes).
pub(crate) const SAMPLES: usize = 300;
/// How often the live overview is rendered again.
const OVERVIEW_EVERY: Duration = Duration::from_secs(2);

/// The counters the charts need, summed over their labels, at one moment.
#[derive(Debug, Clone, Default, PartialEq)]
pub(crate) struct Sample {
    pub(crate) at_ms: i64,
    pub(crate) started: f64,
    pub(crate) finished: f64,
    pub(crate) attempts: f64,
    pub(crate) errors: f64,
    /// The forward step latency histogram: (upper bound, cumulative count), ascending.
    pub(crate) buckets: Vec<(f64, f64)>,
    pub(crate) dlq: f64,
    pub(crate) in_flight: f64,
}

/// The ring of samples.
#[derive(Debug, Default)]
pub(crate) struct Samples {
    ring: Mutex<VecDeque<Sample>>,
}

impl Samples {
    fn push(&self, s: Sample) {
        let mut ring = self.ring.lock().unwrap_or_else(|e| e.into_inner());
        if ring.len() == SAMPLES {
            ring.pop_front();
        }
        ring.push_back(s);
    }

    fn all(&self) -> Vec<Sample> {
        self.ring
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
            .cloned()
            .collect()
    }
}

/// How long the overview's list of sagas needing attention is kept: finding them loads
/// unfinished sagas (up to `ListSagasNeedingAttention`'s bound), too much to do every few
/// seconds for every open overview.
const ATTENTION_FOR: Duration = Duration::from_secs(15);

/// A listing of the sagas needing attention.
type Listing = Result<Vec<v1::Saga>, tonic::Status>;

/// The sagas needing attention, as last listed, and when.
#[derive(Debug, Default)]
pub(crate) struct Attention {
    last: tokio::sync::Mutex<Option<(tokio::time::Instant, Listing)>>,
}

impl Attention {
    /// The first sagas needing attention, listed again when older than [`ATTENTION_FOR`].
    async fn get(&self, console: &Console) -> Listing {
        let mut last = self.last.lock().await;
        if let Some((at, list)) = last.as_ref() {
            if at.elapsed() < ATTENTION_FOR {
                return list.clone();
            }
        }
        let list = console
            .inner
            .sagas
            .list_sagas_needing_attention(tonic::Request::new(ListSagasNeedingAttentionRequest {
                limit: 10,
                ..Default::default()
            }))
            .await
            .map(|r| r.into_inner().sagas);
        *last = Some((tokio::time::Instant::now(), list.clone()));
        list
    }
}

/// One sample line: name, the `le` label if any, value.
fn line(l: &str) -> Option<(&str, Option<&str>, f64)> {
    if l.starts_with('#') || l.is_empty() {
        return None;
    }
    let name_end = l.find(['{', ' '])?;
    let name = &l[..name_end];
    let (labels, rest) = if l[name_end..].starts_with('{') {
        let close = l.rfind('}')?;
        (&l[name_end + 1..close], &l[close + 1..])
    } else {
        ("", &l[name_end..])
    };
    let value: f64 = rest.split_whitespace().next()?.parse().ok()?;
    let le = labels
        .split(',')
        .find_map(|kv| kv.trim().strip_prefix("le=\""))
        .map(|v| v.trim_end_matches('"'));
    Some((name, le, value))
}

/// The sample of an OpenMetrics text taken at `at_ms`.
pub(crate) fn parse(text: &str, at_ms: i64) -> Sample {
    let mut s = Sample {
        at_ms,
        ..Default::default()
    };
    let mut buckets: Vec<(f64, f64)> = Vec::new();
    for (name, le, value) in text.lines().filter_map(line) {
        match name {
            "sagaflow_sagas_started_total" => s.started += value,
            "sagaflow_sagas_completed_total"
            | "sagaflow_sagas_compensated_total"
            | "sagaflow_sagas_failed_total" => s.finished += value,
            "sagaflow_step_attempts_total" => s.attempts += value,
            "sagaflow_step_errors_total" => s.errors += value,
            "sagaflow_dlq_depth" => s.dlq += value,
            "sagaflow_sagas_in_flight" => s.in_flight += value,
            "sagaflow_step_duration_seconds_bucket" => {
                let bound = match le {
                    Some("+Inf") => f64::INFINITY,
                    Some(v) => match v.parse() {
                        Ok(b) => b,
                        Err(_) => continue,
                    },
                    None => continue,
                };
                match buckets.iter_mut().find(|(b, _)| *b == bound) {
                    Some((_, c)) => *c += value,
                    None => buckets.push((bound, value)),
                }
            }
            _ => {}
        }
    }
    buckets.sort_by(|a, b| a.0.total_cmp(&b.0));
    s.buckets = buckets;
    s
}

/// The `q` quantile of cumulative `buckets` (as Prometheus' `histogram_quantile`: linear
/// within the bucket it falls in); `None` without observations.
pub(crate) fn quantile(q: f64, buckets: &[(f64, f64)]) -> Option<f64> {
    let total = buckets.last()?.1;
    if total <= 0.0 {
        return None;
    }
    let rank = q * total;
    let (mut lower, mut below) = (0.0, 0.0);
    for &(bound, count) in buckets {
        if count >= rank {
            if bound.is_infinite() {
                return Some(lower);
            }
            let inside = count - below;
            let share = if inside > 0.0 {
                (rank - below) / inside
            } else {
                0.0
            };
            return Some(lower + (bound - lower) * share);
        }
        lower = bound;
        below = count;
    }
    None
}

/// The charts' points, one per pair of consecutive samples.
#[derive(Debug, Default, PartialEq)]
pub(crate) struct Series {
    pub(crate) started: Vec<Option<f64>>,
    pub(crate) finished: Vec<Option<f64>>,
    pub(crate) p50: Vec<Option<f64>>,
    pub(crate) p99: Vec<Option<f64>>,
    pub(crate) error_rate: Vec<Option<f64>>,
}

pub(crate) fn series(samples: &[Sample]) -> Series {
    let mut out = Series::default();
    for w in samples.windows(2) {
        let (a, b) = (&w[0], &w[1]);
        let secs = (b.at_ms - a.at_ms) as f64 / 1000.0;
        if secs <= 0.0 {
            continue;
        }
        out.started
            .push(Some((b.started - a.started).max(0.0) / secs));
        out.finished
            .push(Some((b.finished - a.finished).max(0.0) / secs));
        let attempts = b.attempts - a.attempts;
        out.error_rate
            .push((attempts > 0.0).then(|| ((b.errors - a.errors) / attempts).clamp(0.0, 1.0)));
        let delta: Vec<(f64, f64)> = b
            .buckets
            .iter()
            .map(|&(bound, count)| {
                let before = a
                    .buckets
                    .iter()
                    .find(|(x, _)| *x == bound)
                    .map_or(0.0, |(_, c)| *c);
                (bound, (count - before).max(0.0))
            })
            .collect();
        out.p50.push(quantile(0.5, &delta));
        out.p99.push(quantile(0.99, &delta));
    }
    out
}

/// Samples this node's metrics every [`SAMPLE_EVERY`] until `cancel`.
pub(crate) async fn sample(console: Console, cancel: CancellationToken) {
    let mut every = tokio::time::interval(SAMPLE_EVERY);
    every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = cancel.cancelled() => return,
            _ = every.tick() => {}
        }
        let text = console.inner.metrics.encode();
        let at = crate::clock::now_ms();
        console.inner.samples.push(parse(&text, at));
    }
}

/// A small line chart of `lines` (label, CSS class, points), scaled to their maximum.
fn chart(title: &str, unit: fn(f64) -> String, lines: &[(&str, &str, &[Option<f64>])]) -> Markup {
    const W: f64 = 300.0;
    const H: f64 = 60.0;
    let n = lines.iter().map(|l| l.2.len()).max().unwrap_or(0);
    let max = lines
        .iter()
        .flat_map(|l| l.2.iter().flatten())
        .fold(0.0_f64, |m, v| m.max(*v));
    let top = if max > 0.0 { max } else { 1.0 };
    // The points collected so far across the width, the newest at the right edge.
    let step = W / n.saturating_sub(1).max(1) as f64;
    let x = |i: usize| W - (n - 1 - i) as f64 * step;
    let spanned = layout::duration((n as u64 * SAMPLE_EVERY.as_secs() * 1000) as i64);
    let y = |v: f64| H - 2.0 - v / top * (H - 4.0);
    let described: Vec<String> = lines
        .iter()
        .map(|(label, _, points)| {
            let last = points.iter().rev().flatten().next();
            format!(
                "{label} {}",
                last.map_or("no data".to_string(), |v| unit(*v))
            )
        })
        .collect();
    html! {
        figure.chart {
            figcaption {
                strong { (title) }
                @for ((label, class, _), text) in lines.iter().zip(&described) {
                    " " span class=(format!("key {class}")) title=(label) { (text) }
                }
            }
            svg viewBox=(format!("0 0 {W} {H}")) preserveAspectRatio="none" role="img"
                aria-label=(format!("{title} over the last {spanned}: {}; highest {}", described.join(", "), unit(max))) {
                line.axis x1="0" y1=(H - 1.0) x2=(W) y2=(H - 1.0) {}
                @for (_, class, points) in lines {
                    @let segments = {
                        let mut segs: Vec<String> = Vec::new();
                        let mut cur = String::new();
                        let mut count = 0;
                        for (i, p) in points.iter().enumerate() {
                            match p {
                                Some(v) => {
                                    // A point alone is drawn as a short dash.
                                    if count == 0 { cur.push_str(&format!("{:.1},{:.1} ", x(i) - 3.0, y(*v))); }
                                    cur.push_str(&format!("{:.1},{:.1} ", x(i), y(*v)));
                                    count += 1;
                                }
                                None => if count > 0 { segs.push(std::mem::take(&mut cur)); count = 0; },
                            }
                        }
                        if count > 0 { segs.push(cur); }
                        segs
                    };
                    @for seg in segments {
                        polyline class=(format!("line {class}")) points=(seg.trim()) {}
                    }
                }
            }
            div.scale { span { "−" (spanned) } span { "max " (unit(max)) } span { "now" } }
        }
    }
}

fn per_second(v: f64) -> String {
    if v >= 100.0 {
        format!("{v:.0}/s")
    } else {
        format!("{v:.2}/s")
    }
}

fn seconds(v: f64) -> String {
    layout::duration((v * 1000.0).round() as i64)
}

fn percent(v: f64) -> String {
    format!("{:.1} %", v * 100.0)
}

async fn overview_html(console: &Console) -> Markup {
    let counts = sagas::count(console, |_| true).await;
    let attention = console.inner.attention.get(console).await;
    let samples = console.inner.samples.all();
    let s = series(&samples);
    let last = samples.last().cloned().unwrap_or_default();
    html! {
        section aria-labelledby="phases-h" {
            h2 #phases-h { "Sagas by phase " span.muted.small { "(the whole cluster, retained sagas)" } }
            @match &counts {
                Ok(c) => {
                    ul.tiles data-announce=(format!("{} sagas", c.total)) {
                        li { a.tile href="/ui/sagas" { span.n { (c.total) } span.l { "all" } } }
                        @for p in ["RUNNING", "COMPENSATING", "NEEDS_ATTENTION", "COMPLETED", "COMPENSATED", "FAILED"] {
                            li { a class=(format!("tile {}", layout::phase_class(p))) href=(format!("/ui/sagas?phase={p}")) {
                                span.n { (c.by_phase.get(p).copied().unwrap_or(0)) } span.l { (p) }
                            } }
                        }
                    }
                }
                Err(e) => { (layout::error_box(&format!("cannot count: {e}"))) }
            }
        }
        section aria-labelledby="charts-h" {
            h2 #charts-h { "This node, last 10 minutes " span.muted.small { "(node " (console.inner.node_id) "; " (last.in_flight) " sagas in flight, " (last.dlq) " dead letters)" } }
            @if samples.len() < 2 {
                p.muted { "Collecting: the charts start after two samples (" (SAMPLE_EVERY.as_secs()) " s apart)." }
            }
            div.charts {
                (chart("Sagas per second", per_second, &[("finished", "s1", &s.finished), ("started", "s2", &s.started)]))
                (chart("Step latency", seconds, &[("p50", "s1", &s.p50), ("p99", "s3", &s.p99)]))
                (chart("Step error rate", percent, &[("errors", "s4", &s.error_rate)]))
            }
        }
        section aria-labelledby="attention-h" {
            h2 #attention-h { "Needing attention " span.muted.small { "(listed every " (ATTENTION_FOR.as_secs()) " s)" } }
            @match &attention {
                Err(status) => { (layout::error_box(&layout::status_text(status))) }
                Ok(list) if list.is_empty() => { p.muted { "None: no saga is parked, stuck or waiting on an unserved service." } }
                Ok(list) => {
                    div.scroll {
                        table.sagas {
                            thead { tr { th scope="col" { "Saga" } th scope="col" { "Status" } th.wide scope="col" { "Why" } } }
                            tbody {
                                @for s in list {
                                    tr data-saga=(s.saga_id) {
                                        td.id { a href=(format!("/ui/sagas/{}", s.saga_id)) { (s.saga_id) } }
                                        td { (layout::status_badge(&s.status, &s.phase)) }
                                        td.wide.progress-cell { (layout::cut(&s.progress, 200)) }
                                    }
                                }
                            }
                        }
                    }
                    p { a href="/ui/sagas?phase=NEEDS_ATTENTION" { "Every parked saga →" } }
                }
            }
        }
    }
}

/// `GET /ui/`.
pub(crate) async fn page(State(ctx): State<Ctx>, Extension(viewer): Extension<Viewer>) -> Response {
    let console = &ctx.console;
    let body = html! {
        h1 { "Overview" }
        div #overview-live data-live="/ui/live/overview" { (overview_html(console).await) }
    };
    layout::page(
        console,
        &viewer,
        Nav::Overview,
        "Overview",
        Some("overview"),
        body,
    )
    .into_response()
}

/// `GET /ui/live/overview`.
pub(crate) async fn live(State(ctx): State<Ctx>) -> Response {
    let console = ctx.console.clone();
    live::poll(&ctx, OVERVIEW_EVERY, move || {
        let console = console.clone();
        async move { Some(overview_html(&console).await.into_string()) }
    })
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    const TEXT: &str = r#"# HELP sagaflow_sagas_started Sagas created
# TYPE sagaflow_sagas_started counter
sagaflow_sagas_started_total{saga="order"} 10
sagaflow_sagas_started_total{saga="trip"} 2
sagaflow_sagas_completed_total{saga="order"} 8
sagaflow_sagas_compensated_total{saga="order"} 1
sagaflow_step_attempts_total{service="payment",compensation="false"} 20
sagaflow_step_errors_total{service="payment",kind="declined"} 2
sagaflow_step_duration_seconds_bucket{saga="order",step="charge",outcome="ok",le="0.005"} 0
sagaflow_step_duration_seconds_bucket{saga="order",step="charge",outcome="ok",le="0.01"} 5
sagaflow_step_duration_seconds_bucket{saga="order",step="charge",outcome="ok",le="+Inf"} 10
sagaflow_step_duration_seconds_bucket{saga="order",step="reserve",outcome="ok",le="0.005"} 2
sagaflow_step_duration_seconds_bucket{saga="order",step="reserve",outcome="ok",le="0.01"} 5
sagaflow_step_duration_seconds_bucket{saga="order",step="reserve",outcome="ok",le="+Inf"} 10
sagaflow_step_duration_seconds_sum{saga="order",step="charge",outcome="ok"} 1.5
sagaflow_dlq_depth 3
sagaflow_sagas_in_flight 4
# EOF
"#;

    #[test]
    fn the_metrics_text_is_read_into_a_sample() {
        let s = parse(TEXT, 1000);
        assert_eq!(s.started, 12.0);
        assert_eq!(s.finished, 9.0);
        assert_eq!(s.attempts, 20.0);
        assert_eq!(s.errors, 2.0);
        assert_eq!(s.dlq, 3.0);
        assert_eq!(s.in_flight, 4.0);
        assert_eq!(
            s.buckets,
            vec![(0.005, 2.0), (0.01, 10.0), (f64::INFINITY, 20.0)]
        );
    }

    #[test]
    fn quantiles_interpolate_within_their_bucket() {
        let b = [(0.005, 2.0), (0.01, 10.0), (f64::INFINITY, 20.0)];
        // Rank 10 of 20 is the top of the 0.01 bucket.
        assert!((quantile(0.5, &b).unwrap() - 0.01).abs() < 1e-9);
        // Rank 6: within (0.005, 0.01], half way.
        assert!((quantile(0.3, &b).unwrap() - 0.0075).abs() < 1e-9);
        // Past the last finite bound: that bound.
        assert_eq!(quantile(0.99, &b), Some(0.01));
        assert_eq!(quantile(0.5, &[(0.01, 0.0), (f64::INFINITY, 0.0)]), None);
    }

    #[test]
    fn chart_points_are_rates_between_samples() {
        let a = parse(TEXT, 0);
        let mut b = a.clone();
        b.at_ms = 2000;
        b.started += 4.0;
        b.finished += 2.0;
        b.attempts += 10.0;
        b.errors += 1.0;
        for (bound, count) in &mut b.buckets {
            if *bound > 0.005 {
                *count += 4.0;
            }
        }
        let s = series(&[a.clone(), b, a]);
        assert_eq!(s.started[0], Some(2.0));
        assert_eq!(s.finished[0], Some(1.0));
        assert_eq!(s.error_rate[0], Some(0.1));
        assert_eq!(s.p50[0], Some(0.0075));
        // A sample earlier than the one before it is skipped.
        assert_eq!(s.started.len(), 1);
        let html = chart(
            "Sagas per second",
            per_second,
            &[("started", "s1", &s.started)],
        )
        .into_string();
        assert!(html.contains("started 2.00/s"), "{html}");
        assert!(html.contains("<polyline"), "{html}");
    }
}
