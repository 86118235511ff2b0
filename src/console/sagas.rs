//! Sagas: the list (filters, counts by status, pages through the API's list index, live), one
//! saga (facts, what it waits for, its timeline, steps, attempts, input and outcome, history,
//! live while it runs) and the operator's actions on it (each with a reason and a confirmation
//! page; sent through `SagaService.InterveneSaga` and `SignalSaga` in-process).

use std::collections::BTreeMap;
use std::sync::Mutex;
use std::time::Duration;

use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Redirect, Response};
use axum::{Extension, Form};
use futures::StreamExt;
use maud::{html, Markup};
use sagaflow_actors::definition::SagaDefinition;
use sagaflow_actors::machine::{Happening, OperatorAction, Phase, Saga};
use sagaflow_proto::v1::saga_service_server::SagaService;
use sagaflow_proto::v1::{InterveneSagaRequest, SignalSagaRequest};
use serde::Deserialize;

use super::layout::{self, Nav};
use super::session::Viewer;
use super::{live, method, request, timeline, Console, Ctx};
use crate::api::ApiError;
use crate::grpc::render;
use crate::index::{Cursor, Listed};

/// Sagas per list page.
const PAGE: usize = 50;
/// Candidates one list page loads at most (filters on what the index knows come first).
const EXAMINE: usize = 200;
/// How often a live list is rendered again.
const LIST_EVERY: Duration = Duration::from_secs(1);
/// How often a running saga's page is rendered again without a change (its bars grow).
const SAGA_TICK: Duration = Duration::from_secs(2);

const PHASES: &[&str] = &[
    "RUNNING",
    "COMPENSATING",
    "NEEDS_ATTENTION",
    "COMPLETED",
    "COMPENSATED",
    "FAILED",
];

/// The list's filters, as the URL carries them (so a filtered list is a link).
#[derive(Debug, Clone, Default, Deserialize)]
pub(crate) struct ListQuery {
    #[serde(default)]
    pub(crate) definition: String,
    #[serde(default)]
    pub(crate) status: String,
    #[serde(default)]
    pub(crate) phase: String,
    #[serde(default)]
    pub(crate) q: String,
    #[serde(default)]
    pub(crate) since: String,
    #[serde(default)]
    pub(crate) from: String,
    #[serde(default)]
    pub(crate) to: String,
    #[serde(default)]
    pub(crate) after: String,
}

impl ListQuery {
    /// The query string of these filters (page cursor included or not).
    pub(crate) fn encode(&self, with_after: bool) -> String {
        let mut s = form_urlencoded::Serializer::new(String::new());
        for (k, v) in [
            ("definition", &self.definition),
            ("status", &self.status),
            ("phase", &self.phase),
            ("q", &self.q),
            ("since", &self.since),
            ("from", &self.from),
            ("to", &self.to),
        ] {
            if !v.trim().is_empty() {
                s.append_pair(k, v.trim());
            }
        }
        if with_after && !self.after.is_empty() {
            s.append_pair("after", &self.after);
        }
        s.finish()
    }

    fn with(&self, f: impl FnOnce(&mut ListQuery)) -> ListQuery {
        let mut q = self.clone();
        q.after.clear();
        f(&mut q);
        q
    }
}

fn list_url(q: &ListQuery, with_after: bool) -> String {
    let qs = q.encode(with_after);
    if qs.is_empty() {
        "/ui/sagas".into()
    } else {
        format!("/ui/sagas?{qs}")
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum PhaseFilter {
    Any,
    One(Phase),
    Unfinished,
    Finished,
}

impl PhaseFilter {
    fn accepts(self, p: Phase) -> bool {
        match self {
            PhaseFilter::Any => true,
            PhaseFilter::One(one) => p == one,
            PhaseFilter::Unfinished => !p.is_terminal(),
            PhaseFilter::Finished => p.is_terminal(),
        }
    }
}

/// The filters, checked.
#[derive(Debug, Clone)]
pub(crate) struct Filter {
    definition: Option<String>,
    status: Option<String>,
    phase: PhaseFilter,
    q: String,
    from: Option<i64>,
    to: Option<i64>,
    /// What could not be read (the filter is then left out).
    problems: Vec<String>,
}

/// Days since 1970-01-01 of a civil date (proleptic Gregorian).
fn days_from_civil(y: i64, m: i64, d: i64) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = (m + 9) % 12;
    let doy = (153 * mp + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

/// `2025-11-26T20:00`, `2025-11-26 20:00:05` or `2025-11-26` (UTC) in unix ms.
pub(crate) fn parse_utc(s: &str) -> Option<i64> {
    let s = s.trim().trim_end_matches('Z');
    let (date, time) = match s.split_once(['T', ' ']) {
        Some((d, t)) => (d, t),
        None => (s, "00:00"),
    };
    let mut d = date.split('-');
    let y: i64 = d.next()?.parse().ok()?;
    let m: i64 = d.next()?.parse().ok()?;
    let day: i64 = d.next()?.parse().ok()?;
    if d.next().is_some() || !(1..=12).contains(&m) || !(1..=31).contains(&day) {
        return None;
    }
    let mut t = time.split(':');
    let h: i64 = t.next()?.parse().ok()?;
    let mi: i64 = t.next().unwrap_or("0").parse().ok()?;
    let sec: f64 = t.next().unwrap_or("0").parse().ok()?;
    if t.next().is_some() || h > 23 || mi > 59 || !(0.0..60.0).contains(&sec) {
        return None;
    }
    let secs = days_from_civil(y, m, day) * 86_400 + h * 3600 + mi * 60;
    Some(secs * 1000 + (sec * 1000.0) as i64)
}

/// `5m`, `1h`, `24h`, `7d` in ms.
fn parse_since(s: &str) -> Option<i64> {
    let s = s.trim();
    let (n, unit) = s.split_at(s.len().checked_sub(1)?);
    let n: i64 = n.parse().ok()?;
    let ms = match unit {
        "m" => 60_000,
        "h" => 3_600_000,
        "d" => 86_400_000,
        _ => return None,
    };
    (n > 0).then(|| n.saturating_mul(ms))
}

impl Filter {
    pub(crate) fn of(q: &ListQuery, now: i64) -> Filter {
        let mut problems = Vec::new();
        let phase = match q.phase.trim() {
            "" => PhaseFilter::Any,
            "unfinished" => PhaseFilter::Unfinished,
            "finished" => PhaseFilter::Finished,
            p => match Phase::from_name(&p.to_ascii_uppercase()) {
                Some(p) => PhaseFilter::One(p),
                None => {
                    problems.push(format!("phase: no phase {:?}", layout::cut(p, 40)));
                    PhaseFilter::Any
                }
            },
        };
        let mut time = |field: &str, value: &str| {
            if value.trim().is_empty() {
                return None;
            }
            let parsed = parse_utc(value);
            if parsed.is_none() {
                problems.push(format!(
                    "{field}: {:?} is not a time (YYYY-MM-DDTHH:MM, UTC)",
                    layout::cut(value, 40)
                ));
            }
            parsed
        };
        let mut from = time("from", &q.from);
        let to = time("to", &q.to);
        if !q.since.trim().is_empty() {
            match parse_since(&q.since) {
                Some(ms) => from = Some(from.map_or(now - ms, |f| f.max(now - ms))),
                None => problems.push(format!(
                    "since: {:?} is not a span",
                    layout::cut(&q.since, 20)
                )),
            }
        }
        let text = |s: &str| Some(s.trim().to_string()).filter(|s| !s.is_empty());
        Filter {
            definition: text(&q.definition),
            status: text(&q.status).map(|s| s.to_ascii_uppercase()),
            phase,
            q: q.q.trim().to_ascii_lowercase(),
            from,
            to,
            problems,
        }
    }

    fn id_matches(&self, id: &str) -> bool {
        self.q.is_empty() || id.to_ascii_lowercase().contains(&self.q)
    }

    fn started_in(&self, at: i64) -> bool {
        self.from.is_none_or(|f| at >= f) && self.to.is_none_or(|t| at <= t)
    }

    /// By what the index knows (sagas written before index headers pass: their snapshot
    /// decides).
    fn keep(&self, l: &Listed, status: bool) -> bool {
        if !self.id_matches(&l.id) {
            return false;
        }
        let Some(h) = &l.headers else { return true };
        self.definition.as_ref().is_none_or(|d| *d == h.definition)
            && (!status || self.status.as_ref().is_none_or(|s| *s == h.status))
            && self.phase.accepts(h.phase)
            && self.started_in(h.started_at)
    }

    /// By the snapshot.
    fn accept(&self, s: &Saga) -> bool {
        self.id_matches(&s.id)
            && self.definition.as_ref().is_none_or(|d| *d == s.definition)
            && self.status.as_ref().is_none_or(|st| *st == s.status)
            && self.phase.accepts(s.phase)
            && self.started_in(s.started_at)
    }
}

/// How many sagas the index lists, by status and by phase.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub(crate) struct Counts {
    pub(crate) total: u64,
    pub(crate) by_status: BTreeMap<String, u64>,
    pub(crate) by_phase: BTreeMap<&'static str, u64>,
}

/// Counts the sagas of the list index that `keep` accepts, from their index headers alone
/// (one pass over the index in memory; no snapshot is read).
pub(crate) async fn count(
    console: &Console,
    keep: impl Fn(&Listed) -> bool,
) -> Result<Counts, ApiError> {
    let counts = Mutex::new(Counts::default());
    let tally = |l: &Listed| {
        if keep(l) {
            if let Ok(mut c) = counts.lock() {
                c.total += 1;
                let (status, phase) = match &l.headers {
                    Some(h) => (h.status.clone(), h.phase.as_str()),
                    None => ("?".to_string(), "?"),
                };
                *c.by_status.entry(status).or_default() += 1;
                *c.by_phase.entry(phase).or_default() += 1;
            }
        }
        false
    };
    console
        .inner
        .api
        .list_page(None, 1, 1, tally, |_| false)
        .await?;
    Ok(counts.into_inner().unwrap_or_default())
}

/// Every status label of the loaded definitions, in the order sagas meet them.
fn all_statuses(console: &Console) -> Vec<String> {
    let mut out: Vec<String> = Vec::new();
    let mut defs = console.inner.api.definitions();
    defs.sort_by(|a, b| a.name.cmp(&b.name));
    for d in defs {
        for s in d.status_labels() {
            if !out.iter().any(|o| o == s) {
                out.push(s.to_string());
            }
        }
    }
    out
}

/// The live part of the list: counts, the table, the pager.
async fn list_fragment(console: &Console, q: &ListQuery, now: i64) -> Markup {
    let filter = Filter::of(q, now);
    let api = &console.inner.api;
    let after = match q.after.trim() {
        "" => None,
        t => Cursor::parse(t),
    };
    let counts = count(console, |l| filter.keep(l, false))
        .await
        .map_err(tonic::Status::from);
    let page = api
        .list_page(
            after.as_ref(),
            PAGE,
            EXAMINE,
            |l| filter.keep(l, true),
            |s| filter.accept(s),
        )
        .await
        .map_err(tonic::Status::from);
    html! {
        @match &counts {
            Ok(c) => {
                div.counts aria-label="Sagas by status (the other filters applied)"
                    data-announce=(format!("{} sagas: {}", c.total, c.by_status.iter().map(|(s, n)| format!("{n} {s}")).collect::<Vec<_>>().join(", "))) {
                    @let all = q.with(|x| x.status.clear());
                    a.chip href=(list_url(&all, false)) aria-current=[q.status.is_empty().then_some("true")] {
                        "all " strong { (c.total) }
                    }
                    @for (status, n) in &c.by_status {
                        @let link = q.with(|x| x.status = status.clone());
                        a.chip href=(list_url(&link, false)) aria-current=[(q.status.eq_ignore_ascii_case(status)).then_some("true")] {
                            (status) " " strong { (n) }
                        }
                    }
                }
            }
            Err(status) => { (layout::error_box(&format!("cannot count: {}", layout::status_text(status)))) }
        }
        @match &page {
            Err(status) => { (layout::error_box(&layout::status_text(status))) }
            Ok((sagas, next)) => {
                @if sagas.is_empty() {
                    p.empty { "No saga matches. " @if !q.encode(false).is_empty() { a href="/ui/sagas" { "Clear the filters" } } }
                } @else {
                    div.scroll {
                        table.sagas {
                            thead { tr {
                                th scope="col" { "Saga" }
                                th scope="col" { "Status" }
                                th.opt scope="col" { "Definition" }
                                th scope="col" { "Started" }
                                th.opt scope="col" { "Took" }
                                th.wide scope="col" { "Now" }
                            } }
                            tbody {
                                @for s in sagas {
                                    @let def = api.definition_of(s);
                                    @let progress = def.as_deref().map(|d| render::progress(s, d, now)).unwrap_or_default();
                                    @let took = if s.is_terminal() { s.updated_at - s.started_at } else { now - s.started_at };
                                    tr data-saga=(s.id) data-phase=(s.phase.as_str()) {
                                        td.id { a href=(format!("/ui/sagas/{}", s.id)) { (s.id) } }
                                        td.status { (layout::status_badge(&s.status, s.phase.as_str())) }
                                        td.opt { (s.definition) }
                                        td { span title=(crate::clock::format_ms(s.started_at)) { (layout::ago(now, s.started_at)) } }
                                        td.opt { (layout::duration(took)) @if !s.is_terminal() { "…" } }
                                        td.wide.progress-cell title=(progress) { (layout::cut(&progress, 140)) }
                                    }
                                }
                            }
                        }
                    }
                }
                nav.pager aria-label="Pages" {
                    @if !q.after.is_empty() {
                        a href=(list_url(q, false)) { "← Newest" }
                    }
                    @if let Some(next) = next {
                        @let older = { let mut o = q.clone(); o.after = next.token(); o };
                        a href=(list_url(&older, true)) rel="next" { "Older →" }
                    }
                }
            }
        }
    }
}

/// `GET /ui/sagas`.
pub(crate) async fn list(
    State(ctx): State<Ctx>,
    Extension(viewer): Extension<Viewer>,
    Query(q): Query<ListQuery>,
) -> Response {
    let console = &ctx.console;
    let now = console.inner.api.now_ms();
    let filter = Filter::of(&q, now);
    let mut names: Vec<String> = console
        .inner
        .api
        .definitions()
        .iter()
        .map(|d| d.name.clone())
        .collect();
    names.sort();
    let statuses = all_statuses(console);
    let live_url = format!("/ui/live/sagas?{}", q.encode(true));
    let fragment = list_fragment(console, &q, now).await;
    let body = html! {
        h1 { "Sagas" }
        form.filters method="get" action="/ui/sagas" role="search" {
            div.field {
                label for="f-q" { "Saga id contains" }
                input #f-q type="search" name="q" value=(q.q) placeholder="order-A-1";
            }
            div.field {
                label for="f-definition" { "Definition" }
                select #f-definition name="definition" {
                    option value="" { "any" }
                    @for n in &names { option value=(n) selected[*n == q.definition] { (n) } }
                }
            }
            div.field {
                label for="f-status" { "Status" }
                select #f-status name="status" {
                    option value="" { "any" }
                    @for s in &statuses { option value=(s) selected[s.eq_ignore_ascii_case(&q.status)] { (s) } }
                }
            }
            div.field {
                label for="f-phase" { "Phase" }
                select #f-phase name="phase" {
                    option value="" { "any" }
                    option value="unfinished" selected[q.phase == "unfinished"] { "unfinished" }
                    option value="finished" selected[q.phase == "finished"] { "finished" }
                    @for p in PHASES { option value=(p) selected[q.phase.eq_ignore_ascii_case(p)] { (p) } }
                }
            }
            div.field {
                label for="f-since" { "Started" }
                select #f-since name="since" {
                    option value="" { "any time" }
                    @for (v, label) in [("5m", "last 5 minutes"), ("15m", "last 15 minutes"), ("1h", "last hour"), ("24h", "last 24 hours"), ("7d", "last 7 days")] {
                        option value=(v) selected[q.since == v] { (label) }
                    }
                }
            }
            div.field {
                label for="f-from" { "From (UTC)" }
                input #f-from type="datetime-local" name="from" value=(q.from) step="1";
            }
            div.field {
                label for="f-to" { "To (UTC)" }
                input #f-to type="datetime-local" name="to" value=(q.to) step="1";
            }
            div.field.buttons {
                button type="submit" { "Filter" }
                a href="/ui/sagas" { "Clear" }
            }
        }
        @for p in &filter.problems { (layout::error_box(&format!("invalid_argument: {p}"))) }
        div #sagas-live data-live=(live_url) { (fragment) }
    };
    layout::page(console, &viewer, Nav::Sagas, "Sagas", Some("sagas"), body).into_response()
}

/// `GET /ui/live/sagas`: the list's live part, rendered again every second.
pub(crate) async fn list_live(State(ctx): State<Ctx>, Query(q): Query<ListQuery>) -> Response {
    let console = ctx.console.clone();
    live::poll(&ctx, LIST_EVERY, move || {
        let console = console.clone();
        let q = q.clone();
        async move {
            let now = console.inner.api.now_ms();
            Some(list_fragment(&console, &q, now).await.into_string())
        }
    })
}

/// The operator actions that apply to `saga` now, as (action, step name, label).
fn applicable(saga: &Saga, def: &SagaDefinition) -> Vec<(&'static str, String, String)> {
    let mut out = Vec::new();
    let name = |i: usize| def.step(i).map(|s| s.name.clone()).unwrap_or_default();
    if let Ok(steps) = saga.check(def, &OperatorAction::Retry { step: None }) {
        let names: Vec<String> = steps.iter().map(|&i| name(i)).collect();
        out.push((
            "retry",
            String::new(),
            format!("Retry {}", names.join(", ")),
        ));
    }
    for i in 0..def.step_slots() {
        let skip = OperatorAction::Skip {
            step: i,
            output: Vec::new(),
        };
        if saga.check(def, &skip).is_ok() {
            out.push(("skip", name(i), format!("Skip {}", name(i))));
        }
        let settle = OperatorAction::Settle {
            step: i,
            output: Vec::new(),
        };
        if saga.check(def, &settle).is_ok() {
            out.push(("settle", name(i), format!("Settle {}", name(i))));
        }
    }
    for (action, label) in [
        (OperatorAction::Compensate, "Compensate"),
        (OperatorAction::Cancel, "Cancel"),
        (OperatorAction::Abandon, "Abandon"),
    ] {
        if saga.check(def, &action).is_ok() {
            out.push((action.name(), String::new(), label.to_string()));
        }
    }
    out
}

fn act_url(id: &str, action: &str, step: &str) -> String {
    let mut s = form_urlencoded::Serializer::new(String::new());
    s.append_pair("action", action);
    if !step.is_empty() {
        s.append_pair("step", step);
    }
    format!("/ui/sagas/{id}/act?{}", s.finish())
}

fn actions(saga: &Saga, def: Option<&SagaDefinition>, viewer: &Viewer) -> Markup {
    html! {
        section.actions aria-labelledby="actions-h" {
            h2 #actions-h { "Actions" }
            @if saga.is_terminal() {
                p.muted { "Finished: no action applies." }
            } @else if let Some(def) = def {
                @if !viewer.may(method::INTERVENE) {
                    p.muted { "Read-only: your role is "
                        (viewer.identity.as_ref().map_or("none".into(), |i| i.role.to_string()))
                        "; actions need role " (Viewer::needs(method::INTERVENE)) "." }
                } @else {
                    @let list = applicable(saga, def);
                    @if list.is_empty() { p.muted { "No operator action applies now." } }
                    ul.buttons {
                        @for (action, step, label) in &list {
                            li { a.button href=(act_url(&saga.id, action, step)) data-action=(action) { (label) "…" } }
                        }
                        @if !def.signals().is_empty() && viewer.may(method::SIGNAL) {
                            li { a.button.secondary href=(format!("/ui/sagas/{}/signal", saga.id)) { "Send a signal…" } }
                        }
                    }
                }
            } @else {
                p.warn { "Its definition (" (saga.definition) ") is not loaded on this node: actions are not offered." }
            }
        }
    }
}

/// The live part of a saga's page.
pub(crate) fn saga_fragment(
    console: &Console,
    viewer: &Viewer,
    saga: &Saga,
    rev: u64,
    now: i64,
) -> Markup {
    let def = console.inner.api.definition_of(saga);
    let v = render::saga(saga, rev, def.as_deref());
    let t = timeline::build(saga, def.as_deref(), now);
    let took = if saga.is_terminal() {
        saga.updated_at - saga.started_at
    } else {
        now - saga.started_at
    };
    html! {
        div.saga-head data-announce=(format!("{} is {} ({})", v.saga_id, v.status, v.phase)) {
            h1 { span.muted { "saga " } (v.saga_id) }
            p.sub {
                (layout::status_badge(&v.status, &v.phase)) " "
                span.phase { (v.phase) } " · "
                a href=(format!("/ui/definitions/{}", v.saga_name)) { (v.saga_name) }
                " version " code { (v.definition_version) }
            }
        }
        dl.facts {
            div { dt { "Started" } dd { (layout::time(v.started_at_unix_ms)) } }
            div { dt { "Updated" } dd { (layout::time(v.updated_at_unix_ms)) } }
            div { dt { @if saga.is_terminal() { "Took" } @else { "Running for" } } dd { (layout::duration(took)) } }
            @if !saga.is_terminal() {
                div { dt { "Deadline" } dd { (layout::time(v.deadline_unix_ms)) } }
            }
            div { dt { "Revision" } dd { (v.revision) } }
        }
        @if !v.reason.is_empty() {
            p.reason { strong { "Why: " } (v.reason) }
        }
        p class=(if v.stuck { "progress stuck" } else { "progress" }) {
            strong { "Now: " } (v.progress)
        }
        (actions(saga, def.as_deref(), viewer))
        section aria-labelledby="timeline-h" {
            h2 #timeline-h { "Timeline" }
            (timeline::render(&t, now))
        }
        section aria-labelledby="steps-h" {
            h2 #steps-h { "Steps" }
            div.scroll {
                table.steps {
                    thead { tr {
                        th scope="col" { "Step" } th scope="col" { "Stage" } th scope="col" { "Action" }
                        th scope="col" { "Compensation" } th scope="col" { "State" } th scope="col" { "Attempts" }
                        th scope="col" { "Started" } th scope="col" { "Finished" } th scope="col" { "Last error" }
                    } }
                    tbody {
                        @for st in &v.steps {
                            tr data-step=(st.name) {
                                th scope="row" { (st.name) }
                                td { (st.stage) }
                                td { code { (st.action) } }
                                td { @if st.compensation.is_empty() { span.muted { "none" } } @else { code { (st.compensation) } } }
                                td.state { (layout::step_badge(&st.state)) }
                                td { (st.attempts) @if st.compensation_attempts > 0 { " + " (st.compensation_attempts) " comp" } }
                                td { (layout::time(st.started_at_unix_ms)) }
                                td { @if st.next_attempt_at_unix_ms > 0 { "next " (layout::time(st.next_attempt_at_unix_ms)) } @else { (layout::time(st.finished_at_unix_ms)) } }
                                td.error-text { @if !st.last_error_kind.is_empty() { strong { (st.last_error_kind) } ": " (st.last_error) } }
                            }
                        }
                    }
                }
            }
        }
        section aria-labelledby="attempts-h" {
            h2 #attempts-h { "Attempts" }
            (timeline::attempts(&t, now))
        }
        div.two {
            section aria-labelledby="input-h" {
                h2 #input-h { "Input" }
                pre.json { (layout::pretty_json(&v.input_json)) }
            }
            section aria-labelledby="outcome-h" {
                h2 #outcome-h { "Outcome" }
                @if saga.is_terminal() {
                    p { (layout::status_badge(&v.status, &v.phase)) " " (v.phase) @if !v.reason.is_empty() { ": " (v.reason) } }
                } @else {
                    p.muted { "Not finished yet." }
                }
                @let outputs: Vec<_> = v.steps.iter().filter(|s| !s.output_json.is_empty()).collect();
                @for st in outputs {
                    details id=(format!("out-{}", st.name)) {
                        summary { "output of " (st.name) }
                        pre.json { (layout::pretty_json(&st.output_json)) }
                    }
                }
            }
        }
        section aria-labelledby="history-h" {
            h2 #history-h { "History" }
            div.scroll {
                table.history {
                    thead { tr { th scope="col" { "Time" } th scope="col" { "Step" } th scope="col" { "What" } } }
                    tbody {
                        @for h in &v.history {
                            tr { td { (layout::time(h.at_unix_ms)) } td { (h.step) } td.what { (h.what) } }
                        }
                    }
                }
            }
        }
    }
}

#[derive(Debug, Clone, Default, Deserialize)]
pub(crate) struct ShowQuery {
    #[serde(default)]
    request: String,
    #[serde(default)]
    signal: String,
    #[serde(default)]
    duplicate: String,
}

fn invalid_id(id: &str) -> Option<tonic::Status> {
    (!crate::api::valid_id(id, sagaflow_actors::ids::MAX_SAGA_ID)).then(|| {
        crate::grpc::invalid(
            "saga_id",
            "must be 1 to 128 characters of A-Z, a-z, 0-9, `_` or `-`",
        )
    })
}

async fn load(console: &Console, id: &str) -> Result<(Saga, u64), tonic::Status> {
    if let Some(e) = invalid_id(id) {
        return Err(e);
    }
    console.inner.api.get(id).await.map_err(tonic::Status::from)
}

/// Saga `id` for a form's page, or the error page to answer instead.
async fn saga_or_error(console: &Console, viewer: &Viewer, id: &str) -> Result<Saga, Response> {
    load(console, id)
        .await
        .map(|(saga, _)| saga)
        .map_err(|status| layout::error_page(console, viewer, Nav::Sagas, "Saga", &status))
}

/// What became of the intervention `request` of `saga`, in the CLI's words.
fn intervention_notice(saga: &Saga, request: &str) -> Markup {
    let found = saga.history.iter().rev().find_map(|h| match &h.what {
        Happening::Intervened {
            id,
            action,
            operator,
            refused,
            ..
        } if id == request => Some((action.clone(), operator.clone(), refused.clone())),
        _ => None,
    });
    match found {
        Some((action, operator, refused)) if refused.is_empty() => layout::notice_box(&format!(
            "{action} applied to saga {} (request {request}) by {operator}: now {} ({})",
            saga.id,
            saga.status,
            saga.phase.as_str()
        )),
        Some((action, _, refused)) => {
            layout::error_box(&format!("{action} refused by the saga's owner: {refused}"))
        }
        None => layout::notice_box(&format!(
            "action queued for saga {} (request {request}); its owner has not applied it yet",
            saga.id
        )),
    }
}

/// `GET /ui/sagas/{id}`.
pub(crate) async fn show(
    State(ctx): State<Ctx>,
    Extension(viewer): Extension<Viewer>,
    Path(id): Path<String>,
    Query(q): Query<ShowQuery>,
) -> Response {
    let console = &ctx.console;
    let (saga, rev) = match load(console, &id).await {
        Ok(s) => s,
        Err(status) => {
            return layout::error_page(console, &viewer, Nav::Sagas, "Saga", &status);
        }
    };
    let now = console.inner.api.now_ms();
    let body = html! {
        nav.crumbs aria-label="Breadcrumb" { a href="/ui/sagas" { "Sagas" } " / " (saga.id) }
        @if !q.request.is_empty() { (intervention_notice(&saga, &q.request)) }
        @if !q.signal.is_empty() {
            @if q.duplicate == "1" {
                (layout::notice_box(&format!("the saga had already received signal {}: nothing sent", q.signal)))
            } @else {
                (layout::notice_box(&format!("signal sent to saga {} (id {})", saga.id, q.signal)))
            }
        }
        div #saga-live data-live=(format!("/ui/live/sagas/{}", saga.id)) {
            (saga_fragment(console, &viewer, &saga, rev, now))
        }
    };
    layout::page(console, &viewer, Nav::Sagas, &saga.id, Some("saga"), body).into_response()
}

struct Follow {
    watch: futures::stream::BoxStream<'static, Result<(Saga, u64), ApiError>>,
    console: Console,
    viewer: Viewer,
    latest: Option<(Saga, u64)>,
    last: Option<String>,
    ended: bool,
    finished: bool,
    deadline: tokio::time::Instant,
    _permit: tokio::sync::OwnedSemaphorePermit,
}

/// `GET /ui/live/sagas/{id}`: the saga's live part at every change of its snapshot (and every
/// [`SAGA_TICK`] while it runs); `end` once it is finished.
pub(crate) async fn show_live(
    State(ctx): State<Ctx>,
    Extension(viewer): Extension<Viewer>,
    Path(id): Path<String>,
) -> Response {
    if let Some(e) = invalid_id(&id) {
        return (StatusCode::BAD_REQUEST, layout::status_text(&e)).into_response();
    }
    let Some(permit) = live::permit(&ctx) else {
        return live::busy();
    };
    let console = ctx.console.clone();
    let watch = match console.inner.api.watch(&id).await {
        Ok(w) => w.boxed(),
        Err(e) => {
            let status = tonic::Status::from(e);
            return (layout::http_status(&status), layout::status_text(&status)).into_response();
        }
    };
    let cancel = console.inner.cancel.clone();
    let state = Follow {
        watch,
        console,
        viewer,
        latest: None,
        last: None,
        ended: false,
        finished: false,
        deadline: tokio::time::Instant::now() + super::LIVE_FOR,
        _permit: permit,
    };
    let stream = futures::stream::unfold(state, move |mut s| {
        let cancel = cancel.clone();
        async move {
            loop {
                if s.finished {
                    return None;
                }
                if s.ended {
                    s.finished = true;
                    return Some((Ok::<_, std::convert::Infallible>(live::end_event()), s));
                }
                let running = s.latest.as_ref().is_some_and(|(x, _)| !x.is_terminal());
                tokio::select! {
                    _ = cancel.cancelled() => return None,
                    _ = tokio::time::sleep_until(s.deadline) => return None,
                    item = s.watch.next() => match item {
                        Some(Ok(v)) => s.latest = Some(v),
                        Some(Err(e)) => {
                            tracing::debug!(error = %e, "console saga watch failed");
                            return None;
                        }
                        // The watch ends after the terminal snapshot, or with the node.
                        None => {
                            if s.latest.as_ref().is_some_and(|(x, _)| x.is_terminal()) {
                                s.ended = true;
                                continue;
                            }
                            return None;
                        }
                    },
                    _ = tokio::time::sleep(SAGA_TICK), if running => {}
                }
                let Some((saga, rev)) = &s.latest else {
                    continue;
                };
                let now = s.console.inner.api.now_ms();
                let html = saga_fragment(&s.console, &s.viewer, saga, *rev, now).into_string();
                if saga.is_terminal() {
                    s.ended = true;
                }
                if s.last.as_deref() != Some(html.as_str()) {
                    let event = live::html_event(&html);
                    s.last = Some(html);
                    return Some((Ok(event), s));
                }
            }
        }
    });
    live::respond(stream)
}

/// An operator's action as the confirmation form sends it.
#[derive(Debug, Clone, Default, Deserialize)]
pub(crate) struct ActForm {
    #[serde(default)]
    action: String,
    #[serde(default)]
    step: String,
    #[serde(default)]
    output_json: String,
    #[serde(default)]
    reason: String,
    #[serde(default)]
    operator: String,
    #[serde(default)]
    request_id: String,
}

/// What an action does, in words.
fn explain(action: &str, step: &str) -> String {
    match action {
        "retry" if step.is_empty() => "Sends the next attempt now, with a fresh retry budget: of each step waiting to retry or still waiting for its reply, or of the compensation that parked the saga.".into(),
        "retry" => format!("Sends the next attempt of `{step}` now, with a fresh retry budget."),
        "skip" => format!("Settles `{step}` as if its participant had answered: a forward step of the current stage succeeds with the result below; a compensation counts as done. The participant is not told."),
        "settle" => format!("Records the pivot `{step}` as succeeded with the result below (it timed out, but the participant did the work) and goes forward to completion."),
        "compensate" => "Stops going forward and undoes every completed step, in reverse order (a saga parked on a pivot compensates everything that has a compensation, the pivot included).".into(),
        "cancel" => "Cancels the running saga: it stops going forward and compensates every completed step, in reverse order.".into(),
        "abandon" => "Gives up on the parked saga: it ends FAILED as it stands. Nothing more is undone; what was done stays done.".into(),
        _ => "Not an action of the console: retry, skip, settle, compensate, cancel or abandon.".into(),
    }
}

fn title_of(action: &str) -> String {
    let mut c = action.chars();
    c.next()
        .map(|f| f.to_uppercase().chain(c).collect())
        .unwrap_or_default()
}

/// The operator action a form names, for [`Saga::check`] (with an empty result).
fn action_of(def: &SagaDefinition, action: &str, step: &str) -> Option<OperatorAction> {
    let slot = (0..def.step_slots()).find(|&i| def.step(i).is_some_and(|s| s.name == step));
    Some(match action {
        "retry" => OperatorAction::Retry { step: slot },
        "skip" => OperatorAction::Skip {
            step: slot?,
            output: Vec::new(),
        },
        "settle" => OperatorAction::Settle {
            step: slot?,
            output: Vec::new(),
        },
        "compensate" => OperatorAction::Compensate,
        "cancel" => OperatorAction::Cancel,
        "abandon" => OperatorAction::Abandon,
        _ => return None,
    })
}

fn confirm_page(
    console: &Console,
    viewer: &Viewer,
    saga: &Saga,
    form: &ActForm,
    error: Option<String>,
    status: StatusCode,
) -> Response {
    let def = console.inner.api.definition_of(saga);
    let now = console.inner.api.now_ms();
    let progress = def
        .as_deref()
        .map(|d| render::progress(saga, d, now))
        .unwrap_or_default();
    let denied = viewer.authorize(console, method::INTERVENE).err();
    let check = def.as_deref().and_then(|d| {
        action_of(d, &form.action, &form.step).map(|a| saga.check(d, &a).map(|_| ()))
    });
    let steps: Vec<String> = def
        .as_deref()
        .map(|d| {
            (0..d.step_slots())
                .filter_map(|i| d.step(i))
                .map(|s| s.name.clone())
                .collect()
        })
        .unwrap_or_default();
    let retry_steps: Vec<String> = match (def.as_deref(), form.action.as_str()) {
        (Some(d), "retry") => saga
            .check(d, &OperatorAction::Retry { step: None })
            .unwrap_or_default()
            .iter()
            .filter_map(|&i| d.step(i).map(|s| s.name.clone()))
            .collect(),
        _ => Vec::new(),
    };
    let with_result = matches!(form.action.as_str(), "skip" | "settle");
    let title = if form.step.is_empty() {
        format!("{} saga {}", title_of(&form.action), saga.id)
    } else {
        format!(
            "{} step {} of saga {}",
            title_of(&form.action),
            form.step,
            saga.id
        )
    };
    let body = html! {
        nav.crumbs aria-label="Breadcrumb" {
            a href="/ui/sagas" { "Sagas" } " / " a href=(format!("/ui/sagas/{}", saga.id)) { (saga.id) } " / " (form.action)
        }
        h1 { (title) "?" }
        @if let Some(e) = &error { (layout::error_box(e)) }
        p.explain { (explain(&form.action, &form.step)) }
        p { "The saga now: " (layout::status_badge(&saga.status, saga.phase.as_str())) " " (saga.phase.as_str()) }
        p.progress { strong { "Now: " } (progress) }
        @if let Some(Err(why)) = &check {
            p.warn { "This does not apply as the saga stands: " (why) ". Sent anyway, the node refuses it with this reason." }
        }
        @if let Some(status) = &denied {
            (layout::error_box(&layout::status_text(status)))
            p { a href=(format!("/ui/sagas/{}", saga.id)) { "Back to the saga" } }
        } @else {
            form.card method="post" action=(format!("/ui/sagas/{}/act", saga.id)) {
                input type="hidden" name="csrf" value=(viewer.csrf);
                input type="hidden" name="action" value=(form.action);
                input type="hidden" name="request_id" value=(form.request_id);
                @if form.action == "retry" {
                    label for="a-step" { "Step" }
                    select #a-step name="step" {
                        option value="" { "every step it applies to" @if !retry_steps.is_empty() { " (" (retry_steps.join(", ")) ")" } }
                        @for s in &steps { option value=(s) selected[*s == form.step] { (s) } }
                    }
                } @else if with_result {
                    input type="hidden" name="step" value=(form.step);
                    label for="a-result" { "Result (JSON, optional)" }
                    textarea #a-result name="output_json" rows="4" placeholder="{\"tracking\": \"BY-HAND\"}" { (form.output_json) }
                    p.hint { "Recorded as the step's output; what later steps and the saga's outcome see." }
                } @else {
                    input type="hidden" name="step" value=(form.step);
                }
                label for="a-reason" { "Reason" }
                textarea #a-reason name="reason" rows="2" required maxlength="1024" placeholder="customer called; ticket 1234" { (form.reason) }
                p.hint { "Journaled in the saga's history with who did it." }
                @if !viewer.auth {
                    label for="a-operator" { "Operator" }
                    input #a-operator type="text" name="operator" required maxlength="200" autocomplete="username" value=(if form.operator.is_empty() { viewer.operator.as_str() } else { form.operator.as_str() });
                    p.hint { "This node runs without authentication: say who you are, as with the CLI's --operator." }
                } @else if let Some(id) = &viewer.identity {
                    p.hint { "Recorded as done by " strong { (id.name) } "." }
                }
                div.buttons {
                    button.danger type="submit" { (title_of(&form.action)) @if !form.step.is_empty() { " " (form.step) } }
                    a href=(format!("/ui/sagas/{}", saga.id)) { "Back to the saga" }
                }
            }
        }
    };
    let mut response =
        layout::page(console, viewer, Nav::Sagas, &title, None, body).into_response();
    *response.status_mut() = status;
    response
}

/// `GET /ui/sagas/{id}/act?action=…&step=…`: the confirmation page (a GET never acts).
pub(crate) async fn confirm(
    State(ctx): State<Ctx>,
    Extension(viewer): Extension<Viewer>,
    Path(id): Path<String>,
    Query(q): Query<ActForm>,
) -> Response {
    let console = &ctx.console;
    let saga = match saga_or_error(console, &viewer, &id).await {
        Ok(s) => s,
        Err(page) => return page,
    };
    let form = ActForm {
        action: q.action,
        step: q.step,
        request_id: format!("console-{:016x}", rand::random::<u64>()),
        ..Default::default()
    };
    confirm_page(console, &viewer, &saga, &form, None, StatusCode::OK)
}

/// `POST /ui/sagas/{id}/act`: sends the action through `SagaService.InterveneSaga`, then
/// shows the saga with what became of it (an error, in the CLI's words, on the form).
pub(crate) async fn act(
    State(ctx): State<Ctx>,
    Extension(viewer): Extension<Viewer>,
    Path(id): Path<String>,
    Form(form): Form<ActForm>,
) -> Response {
    let console = &ctx.console;
    let saga = match saga_or_error(console, &viewer, &id).await {
        Ok(s) => s,
        Err(page) => return page,
    };
    let refuse = |status: tonic::Status| {
        confirm_page(
            console,
            &viewer,
            &saga,
            &form,
            Some(layout::status_text(&status)),
            layout::http_status(&status),
        )
    };
    let identity = match viewer.authorize(console, method::INTERVENE) {
        Ok(i) => i,
        Err(status) => return refuse(status),
    };
    if form.reason.trim().is_empty() {
        return refuse(crate::grpc::invalid(
            "reason",
            "required (the console asks why for every action)",
        ));
    }
    if !viewer.auth && !form.operator.trim().is_empty() {
        console
            .inner
            .sessions
            .remember_operator(&viewer.session, form.operator.trim());
    }
    let req = InterveneSagaRequest {
        saga_id: id.clone(),
        action: form.action.clone(),
        step: form.step.clone(),
        output_json: form.output_json.trim().to_string(),
        operator: form.operator.trim().to_string(),
        reason: form.reason.trim().to_string(),
        request_id: form.request_id.clone(),
    };
    match console
        .inner
        .sagas
        .intervene_saga(request(req, identity))
        .await
    {
        Ok(r) => {
            let r = r.into_inner();
            tracing::info!(saga_id = %id, action = %form.action, step = %form.step, request_id = %r.request_id, applied = r.applied, "console: intervention sent");
            let q: String = form_urlencoded::Serializer::new(String::new())
                .append_pair("request", &r.request_id)
                .finish();
            Redirect::to(&format!("/ui/sagas/{id}?{q}")).into_response()
        }
        Err(status) => refuse(status),
    }
}

/// A signal as its form sends it.
#[derive(Debug, Clone, Default, Deserialize)]
pub(crate) struct SignalForm {
    #[serde(default)]
    name: String,
    #[serde(default)]
    payload_json: String,
    #[serde(default)]
    signal_id: String,
}

fn signal_page(
    console: &Console,
    viewer: &Viewer,
    saga: &Saga,
    form: &SignalForm,
    error: Option<String>,
    status: StatusCode,
) -> Response {
    let def = console.inner.api.definition_of(saga);
    let signals: Vec<String> = def
        .as_deref()
        .map(|d| d.signals().iter().map(|s| s.to_string()).collect())
        .unwrap_or_default();
    let denied = viewer.authorize(console, method::SIGNAL).err();
    let title = format!("Send a signal to saga {}", saga.id);
    let body = html! {
        nav.crumbs aria-label="Breadcrumb" {
            a href="/ui/sagas" { "Sagas" } " / " a href=(format!("/ui/sagas/{}", saga.id)) { (saga.id) } " / signal"
        }
        h1 { (title) "?" }
        @if let Some(e) = &error { (layout::error_box(e)) }
        p.explain { "Ends the wait of the step waiting for this signal (or is kept for the step that will), with the payload as the step's output. A signal is idempotent on its id: sending this form again sends nothing more." }
        p { "The saga now: " (layout::status_badge(&saga.status, saga.phase.as_str())) " " (saga.phase.as_str()) }
        @if let Some(status) = &denied {
            (layout::error_box(&layout::status_text(status)))
        } @else if signals.is_empty() {
            p.warn { "Its definition waits for no signal." }
        } @else {
            form.card method="post" action=(format!("/ui/sagas/{}/signal", saga.id)) {
                input type="hidden" name="csrf" value=(viewer.csrf);
                input type="hidden" name="signal_id" value=(form.signal_id);
                label for="s-name" { "Signal" }
                select #s-name name="name" {
                    @for s in &signals { option value=(s) selected[*s == form.name] { (s) } }
                }
                label for="s-payload" { "Payload (JSON, optional)" }
                textarea #s-payload name="payload_json" rows="4" placeholder="{\"by\": \"ann\"}" { (form.payload_json) }
                div.buttons {
                    button type="submit" { "Send the signal" }
                    a href=(format!("/ui/sagas/{}", saga.id)) { "Back to the saga" }
                }
            }
        }
    };
    let mut response =
        layout::page(console, viewer, Nav::Sagas, &title, None, body).into_response();
    *response.status_mut() = status;
    response
}

/// `GET /ui/sagas/{id}/signal`.
pub(crate) async fn signal_form(
    State(ctx): State<Ctx>,
    Extension(viewer): Extension<Viewer>,
    Path(id): Path<String>,
) -> Response {
    let console = &ctx.console;
    let saga = match saga_or_error(console, &viewer, &id).await {
        Ok(s) => s,
        Err(page) => return page,
    };
    let form = SignalForm {
        signal_id: format!("console-{:016x}", rand::random::<u64>()),
        ..Default::default()
    };
    signal_page(console, &viewer, &saga, &form, None, StatusCode::OK)
}

/// `POST /ui/sagas/{id}/signal`: sends it through `SagaService.SignalSaga`.
pub(crate) async fn signal(
    State(ctx): State<Ctx>,
    Extension(viewer): Extension<Viewer>,
    Path(id): Path<String>,
    Form(form): Form<SignalForm>,
) -> Response {
    let console = &ctx.console;
    let saga = match saga_or_error(console, &viewer, &id).await {
        Ok(s) => s,
        Err(page) => return page,
    };
    let refuse = |status: tonic::Status| {
        signal_page(
            console,
            &viewer,
            &saga,
            &form,
            Some(layout::status_text(&status)),
            layout::http_status(&status),
        )
    };
    let identity = match viewer.authorize(console, method::SIGNAL) {
        Ok(i) => i,
        Err(status) => return refuse(status),
    };
    let req = SignalSagaRequest {
        saga_id: id.clone(),
        name: form.name.clone(),
        payload_json: form.payload_json.trim().to_string(),
        signal_id: form.signal_id.clone(),
    };
    match console
        .inner
        .sagas
        .signal_saga(request(req, identity))
        .await
    {
        Ok(r) => {
            let r = r.into_inner();
            tracing::info!(saga_id = %id, signal = %form.name, signal_id = %r.signal_id, duplicate = r.duplicate, "console: signal sent");
            let q: String = form_urlencoded::Serializer::new(String::new())
                .append_pair("signal", &r.signal_id)
                .append_pair("duplicate", if r.duplicate { "1" } else { "0" })
                .finish();
            Redirect::to(&format!("/ui/sagas/{id}?{q}")).into_response()
        }
        Err(status) => refuse(status),
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn utc_times_and_spans_parse() {
        assert_eq!(parse_utc("1970-01-01"), Some(0));
        assert_eq!(parse_utc("1970-01-02T00:00"), Some(86_400_000));
        // 2025-11-26T20:00:00Z
        assert_eq!(parse_utc("2025-11-26T20:00"), Some(1_764_187_200_000));
        assert_eq!(parse_utc("2025-11-26 20:00:00.5"), Some(1_764_187_200_500));
        assert_eq!(parse_utc("2024-02-29T12:00:00Z"), Some(1_709_208_000_000));
        for bad in [
            "",
            "yesterday",
            "2025-13-01",
            "2025-11-26T25:00",
            "2025-11-26T20:00:00:00",
        ] {
            assert_eq!(parse_utc(bad), None, "{bad}");
        }
        assert_eq!(parse_since("15m"), Some(900_000));
        assert_eq!(parse_since("7d"), Some(7 * 86_400_000));
        assert_eq!(parse_since("0m"), None);
        assert_eq!(parse_since("5w"), None);
    }

    #[test]
    fn filters_travel_in_the_url_and_read_back() {
        let q = ListQuery {
            definition: "order".into(),
            status: "shipped".into(),
            phase: "finished".into(),
            q: "A-1 <b>".into(),
            since: "1h".into(),
            after: "123.order-A-1".into(),
            ..Default::default()
        };
        let qs = q.encode(true);
        assert_eq!(
            qs,
            "definition=order&status=shipped&phase=finished&q=A-1+%3Cb%3E&since=1h&after=123.order-A-1"
        );
        assert!(!q.encode(false).contains("after"));
        let f = Filter::of(&q, 10_000_000);
        assert_eq!(f.status.as_deref(), Some("SHIPPED"));
        assert_eq!(f.phase, PhaseFilter::Finished);
        assert_eq!(f.from, Some(10_000_000 - 3_600_000));
        assert!(f.problems.is_empty());
        let bad = Filter::of(
            &ListQuery {
                phase: "SLEEPING".into(),
                from: "soon".into(),
                ..Default::default()
            },
            0,
        );
        assert_eq!(bad.problems.len(), 2, "{:?}", bad.problems);
        assert_eq!(bad.phase, PhaseFilter::Any);
    }
}
