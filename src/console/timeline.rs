//! A saga's timeline: every step attempt and compensation attempt as a bar over time, read
//! from the saga's history (its journal), one lane per step in stage order, so the steps of
//! one stage, which run in parallel, are drawn one above the other over the same stretch of
//! time. A step's compensation has a lane of its own right below it.
//!
//! [`build`] is pure (snapshot in, lanes out); [`render`] draws the lanes as SVG bars (their
//! positions are SVG attributes, so the console's content security policy, which allows no
//! inline style, does not get in the way) and [`attempts`] lists the same attempts as a table.

use maud::{html, Markup};
use sagaflow_actors::definition::SagaDefinition;
use sagaflow_actors::machine::{Happening, Saga};

use super::layout::{self, duration};

/// What a bar stands for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Kind {
    /// A forward attempt (a command sent).
    Forward,
    /// A compensation attempt.
    Compensation,
    /// A wait for a signal.
    Wait,
}

/// How a bar ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Outcome {
    /// Not yet: it runs at the time of the snapshot.
    Running,
    /// Succeeded (compensated, for a compensation; the signal came, for a wait).
    Ok,
    /// Failed with this error kind and message.
    Failed { kind: String, message: String },
    /// Skipped by an operator.
    Skipped,
    /// Ended without an answer recorded (the saga moved on, or the entries were elided).
    Ended,
}

/// One attempt.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Bar {
    pub(crate) kind: Kind,
    /// Attempt number (0 for a wait).
    pub(crate) attempt: u32,
    pub(crate) start: i64,
    /// `None` while it runs.
    pub(crate) end: Option<i64>,
    pub(crate) outcome: Outcome,
}

/// One lane: a step's forward attempts, or its compensation attempts.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Lane {
    /// The step's name.
    pub(crate) step: String,
    /// Its stage's name (`after_compensation` for that step).
    pub(crate) stage: String,
    /// What it runs (`payment.charge`, `payment.refund`, `wait for signal …`).
    pub(crate) action: String,
    /// Whether this is the compensation lane.
    pub(crate) compensation: bool,
    pub(crate) bars: Vec<Bar>,
}

/// Something that happened to the saga as a whole, marked on the time axis.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Marker {
    pub(crate) at: i64,
    pub(crate) text: String,
}

/// The whole timeline.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Timeline {
    pub(crate) start: i64,
    pub(crate) end: i64,
    pub(crate) lanes: Vec<Lane>,
    pub(crate) markers: Vec<Marker>,
    /// Older entries were dropped from the history (it is bounded): what the marker said.
    pub(crate) elided: Option<String>,
}

fn close(open: &mut Option<usize>, bars: &mut [Bar], at: i64, outcome: Outcome) -> bool {
    match open.take() {
        Some(i) => {
            bars[i].end = Some(at);
            bars[i].outcome = outcome;
            true
        }
        None => false,
    }
}

/// Closes the open bar with `outcome`, or, with none open (an operator settled the step, say),
/// records an instant with it.
fn close_or_instant(
    open: &mut Option<usize>,
    bars: &mut Vec<Bar>,
    at: i64,
    outcome: Outcome,
    kind: Kind,
    attempt: u32,
) {
    if !close(open, bars, at, outcome.clone()) {
        bars.push(Bar {
            kind,
            attempt,
            start: at,
            end: Some(at),
            outcome,
        });
    }
}

/// The timeline of `saga` at `now`, its steps named by `def` (by slot without it).
pub(crate) fn build(saga: &Saga, def: Option<&SagaDefinition>, now: i64) -> Timeline {
    let slots = saga.steps.len();
    // Per slot: forward bars, compensation bars, and the open bar of each.
    let mut forward: Vec<Vec<Bar>> = vec![Vec::new(); slots];
    let mut backward: Vec<Vec<Bar>> = vec![Vec::new(); slots];
    let mut open_fwd: Vec<Option<usize>> = vec![None; slots];
    let mut open_comp: Vec<Option<usize>> = vec![None; slots];
    let mut markers = Vec::new();
    let mut elided = None;
    let mut last_at = saga.started_at;
    let step_name = |i: usize| {
        def.and_then(|d| d.step(i))
            .map_or_else(|| format!("step-{i}"), |s| s.name.clone())
    };
    for entry in &saga.history {
        last_at = last_at.max(entry.at);
        let at = entry.at;
        let Some(slot) = entry.step.map(|s| s as usize).filter(|s| *s < slots) else {
            match &entry.what {
                Happening::Elided { .. } => elided = Some(entry.what.to_string()),
                Happening::Started
                | Happening::Status { .. }
                | Happening::ReplyRefused { .. }
                | Happening::SignalReceived { .. }
                | Happening::SignalIgnored { .. } => {}
                other => markers.push(Marker {
                    at,
                    text: other.to_string(),
                }),
            }
            continue;
        };
        let fwd = &mut forward[slot];
        let comp = &mut backward[slot];
        match &entry.what {
            Happening::Sent { attempt } => {
                close(&mut open_fwd[slot], fwd, at, Outcome::Ended);
                fwd.push(Bar {
                    kind: Kind::Forward,
                    attempt: *attempt,
                    start: at,
                    end: None,
                    outcome: Outcome::Running,
                });
                open_fwd[slot] = Some(fwd.len() - 1);
            }
            Happening::Waiting { .. } => {
                close(&mut open_fwd[slot], fwd, at, Outcome::Ended);
                fwd.push(Bar {
                    kind: Kind::Wait,
                    attempt: 0,
                    start: at,
                    end: None,
                    outcome: Outcome::Running,
                });
                open_fwd[slot] = Some(fwd.len() - 1);
            }
            Happening::Succeeded { attempt } => close_or_instant(
                &mut open_fwd[slot],
                fwd,
                at,
                Outcome::Ok,
                Kind::Forward,
                *attempt,
            ),
            Happening::SignalReceived { kept: false, .. } => {
                close(&mut open_fwd[slot], fwd, at, Outcome::Ok);
            }
            Happening::AttemptFailed {
                attempt,
                kind,
                message,
            } => close_or_instant(
                &mut open_fwd[slot],
                fwd,
                at,
                Outcome::Failed {
                    kind: kind.clone(),
                    message: message.clone(),
                },
                Kind::Forward,
                *attempt,
            ),
            Happening::StepFailed => {
                close(&mut open_fwd[slot], fwd, at, Outcome::Ended);
            }
            // A compensation skipped, or else the forward step.
            Happening::Skipped if close(&mut open_comp[slot], comp, at, Outcome::Skipped) => {}
            Happening::Skipped => close_or_instant(
                &mut open_fwd[slot],
                fwd,
                at,
                Outcome::Skipped,
                Kind::Forward,
                0,
            ),
            Happening::CompensationSent { attempt } => {
                close(&mut open_comp[slot], comp, at, Outcome::Ended);
                comp.push(Bar {
                    kind: Kind::Compensation,
                    attempt: *attempt,
                    start: at,
                    end: None,
                    outcome: Outcome::Running,
                });
                open_comp[slot] = Some(comp.len() - 1);
            }
            Happening::Compensated => close_or_instant(
                &mut open_comp[slot],
                comp,
                at,
                Outcome::Ok,
                Kind::Compensation,
                0,
            ),
            Happening::CompensationAttemptFailed { kind, message, .. } => {
                close(
                    &mut open_comp[slot],
                    comp,
                    at,
                    Outcome::Failed {
                        kind: kind.clone(),
                        message: message.clone(),
                    },
                );
            }
            Happening::Intervened { .. } => markers.push(Marker {
                at,
                text: format!("{}: {}", step_name(slot), entry.what),
            }),
            _ => {}
        }
    }
    // Bars still open: running, unless the saga is over (then they ended with it).
    if saga.is_terminal() {
        for (bars, open) in forward
            .iter_mut()
            .zip(open_fwd.iter_mut())
            .chain(backward.iter_mut().zip(open_comp.iter_mut()))
        {
            close(open, bars, last_at, Outcome::Ended);
        }
    }
    let mut lanes = Vec::new();
    for slot in 0..slots {
        let step = def.and_then(|d| d.step(slot));
        let after_compensation = def.is_some_and(|d| slot == d.steps.len());
        if after_compensation && forward[slot].is_empty() {
            continue;
        }
        let stage = match (def, step) {
            (Some(d), Some(s)) => d
                .stages
                .get(s.stage)
                .map_or_else(|| "after compensation".to_string(), |g| g.name.clone()),
            _ => String::new(),
        };
        lanes.push(Lane {
            step: step_name(slot),
            stage: stage.clone(),
            action: step.map(|s| s.action.to_string()).unwrap_or_default(),
            compensation: false,
            bars: std::mem::take(&mut forward[slot]),
        });
        if !backward[slot].is_empty() {
            lanes.push(Lane {
                step: step_name(slot),
                stage,
                action: step
                    .and_then(|s| s.compensation.as_ref())
                    .map(ToString::to_string)
                    .unwrap_or_default(),
                compensation: true,
                bars: std::mem::take(&mut backward[slot]),
            });
        }
    }
    let start = if elided.is_some() {
        saga.history
            .iter()
            .map(|h| h.at)
            .filter(|at| *at > 0)
            .min()
            .unwrap_or(saga.started_at)
            .min(saga.started_at.max(1))
    } else {
        saga.started_at
    };
    let end = if saga.is_terminal() {
        last_at.max(saga.updated_at)
    } else {
        now.max(last_at)
    };
    Timeline {
        start,
        end: end.max(start + 1),
        lanes,
        markers,
        elided,
    }
}

/// Width of the drawing, in SVG units.
const WIDTH: f64 = 1000.0;
/// Narrowest bar drawn, so an instant stays visible.
const MIN_BAR: f64 = 4.0;

impl Timeline {
    fn x(&self, at: i64) -> f64 {
        let span = (self.end - self.start).max(1) as f64;
        ((at - self.start) as f64 / span * WIDTH).clamp(0.0, WIDTH)
    }
}

fn bar_class(bar: &Bar) -> &'static str {
    match (&bar.outcome, bar.kind) {
        (Outcome::Running, Kind::Compensation) => "bar comp running",
        (Outcome::Running, _) => "bar run running",
        (Outcome::Ok, Kind::Compensation) => "bar comp",
        (Outcome::Ok, Kind::Wait) => "bar wait",
        (Outcome::Ok, Kind::Forward) => "bar ok",
        (Outcome::Failed { .. }, Kind::Compensation) => "bar comp-bad",
        (Outcome::Failed { .. }, _) => "bar bad",
        (Outcome::Skipped, _) => "bar skip",
        (Outcome::Ended, _) => "bar ended",
    }
}

/// What a bar says in words (its tooltip and its row in the attempts table).
pub(crate) fn describe(bar: &Bar, now: i64) -> String {
    let what = match bar.kind {
        Kind::Forward if bar.attempt > 0 => format!("attempt {}", bar.attempt),
        Kind::Forward => "step".to_string(),
        Kind::Compensation if bar.attempt > 0 => format!("compensation attempt {}", bar.attempt),
        Kind::Compensation => "compensation".to_string(),
        Kind::Wait => "wait".to_string(),
    };
    let took = duration(bar.end.unwrap_or(now) - bar.start);
    let outcome = match &bar.outcome {
        Outcome::Running => format!("running for {took}"),
        Outcome::Ok => format!("ok after {took}"),
        Outcome::Failed { kind, message } => format!("{kind} after {took}: {message}"),
        Outcome::Skipped => "skipped".to_string(),
        Outcome::Ended => format!("ended after {took}"),
    };
    format!("{what}: {outcome}")
}

/// The timeline drawn: a time axis, one row per lane (its label, then its bars), the saga's
/// own events as marks on a last row.
pub(crate) fn render(t: &Timeline, now: i64) -> Markup {
    let span = t.end - t.start;
    let ticks: Vec<String> = (0..=4)
        .map(|i| format!("+{}", duration(span * i / 4)))
        .collect();
    // The first lane of each stage gets the stage's heading.
    let heads: Vec<bool> = t
        .lanes
        .iter()
        .enumerate()
        .map(|(i, l)| i == 0 || t.lanes[i - 1].stage != l.stage)
        .collect();
    html! {
        div.timeline role="group" aria-label="Timeline of step attempts and compensations" {
            @if let Some(e) = &t.elided {
                p.hint { "The history is bounded: " (e) ". The timeline shows what is left." }
            }
            div.tl-row.tl-axis aria-hidden="true" {
                div.tl-label { (layout::time(t.start)) }
                div.tl-ticks { @for tick in &ticks { span { (tick) } } }
            }
            @for (lane, head) in t.lanes.iter().zip(&heads) {
                @if *head {
                    div.tl-stage { "stage " (lane.stage) }
                }
                @let label = if lane.compensation {
                    format!("↩ {} ({})", lane.step, lane.action)
                } else {
                    format!("{} ({})", lane.step, lane.action)
                };
                @let summary = if lane.bars.is_empty() {
                    format!("{label}: not started")
                } else {
                    format!("{label}: {}", lane.bars.iter().map(|b| describe(b, now)).collect::<Vec<_>>().join("; "))
                };
                div class=(if lane.compensation { "tl-row comp-lane" } else { "tl-row" }) data-step=(lane.step) {
                    div.tl-label title=(label) { (label) }
                    svg.tl-track viewBox="0 0 1000 12" preserveAspectRatio="none" role="img" aria-label=(summary) {
                        @if lane.bars.is_empty() {
                            rect.bar.pending x="0" y="5" width="1000" height="2" {}
                        }
                        @for bar in &lane.bars {
                            @let x = t.x(bar.start);
                            @let w = (t.x(bar.end.unwrap_or(now)) - x).max(MIN_BAR);
                            rect class=(bar_class(bar)) x=(format!("{:.1}", x.min(WIDTH - MIN_BAR))) y="1" width=(format!("{w:.1}")) height="10" {
                                title { (lane.step) " " (describe(bar, now)) }
                            }
                        }
                    }
                }
            }
            @if !t.markers.is_empty() {
                div.tl-row.tl-marks {
                    div.tl-label { "saga events" }
                    svg.tl-track viewBox="0 0 1000 12" preserveAspectRatio="none" role="img"
                        aria-label=(t.markers.iter().map(|m| m.text.as_str()).collect::<Vec<_>>().join("; ")) {
                        @for m in &t.markers {
                            rect.mark x=(format!("{:.1}", t.x(m.at).min(WIDTH - 3.0))) y="0" width="3" height="12" {
                                title { (m.text) }
                            }
                        }
                    }
                }
            }
            ul.legend aria-hidden="true" {
                li { span.sw.ok {} "succeeded" }
                li { span.sw.run {} "running" }
                li { span.sw.bad {} "failed attempt" }
                li { span.sw.comp {} "compensation" }
                li { span.sw.wait {} "wait for a signal" }
                li { span.sw.skip {} "skipped" }
            }
        }
    }
}

/// Every attempt as a table row: step, what, start, end, duration, outcome, error.
pub(crate) fn attempts(t: &Timeline, now: i64) -> Markup {
    let rows: Vec<(&Lane, &Bar)> = {
        let mut rows: Vec<(&Lane, &Bar)> = t
            .lanes
            .iter()
            .flat_map(|l| l.bars.iter().map(move |b| (l, b)))
            .collect();
        rows.sort_by_key(|(_, b)| b.start);
        rows
    };
    html! {
        @if rows.is_empty() {
            p.muted { "No attempt yet." }
        } @else {
            div.scroll {
                table.attempts {
                    thead { tr { th { "Step" } th { "Attempt" } th { "Started" } th { "Took" } th { "Outcome" } th { "Error" } } }
                    tbody {
                        @for (lane, bar) in rows {
                            tr {
                                td { @if lane.compensation { "↩ " } (lane.step) }
                                td { @match bar.kind {
                                    Kind::Forward => { (bar.attempt) }
                                    Kind::Compensation => { "comp " (bar.attempt) }
                                    Kind::Wait => { "wait" }
                                } }
                                td { (layout::time(bar.start)) }
                                td { (duration(bar.end.unwrap_or(now) - bar.start)) @if bar.end.is_none() { "…" } }
                                td { @match &bar.outcome {
                                    Outcome::Running => { span.badge.run { "running" } }
                                    Outcome::Ok => { span.badge.ok { "ok" } }
                                    Outcome::Failed { kind, .. } => { span.badge.bad { (kind) } }
                                    Outcome::Skipped => { span.badge.muted { "skipped" } }
                                    Outcome::Ended => { span.badge.muted { "ended" } }
                                } }
                                td.error-text { @if let Outcome::Failed { message, .. } = &bar.outcome { (message) } }
                            }
                        }
                    }
                }
            }
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use std::path::Path;

    use sagaflow_actors::machine::{Event, StepError};

    use super::*;

    fn order() -> SagaDefinition {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("sagas/order.toml");
        let text = std::fs::read_to_string(&path).unwrap();
        sagaflow_actors::definition::parse(&text, &path).unwrap()
    }

    fn reply(step: usize, attempt: u32, compensation: bool, ok: Result<(), (&str, &str)>) -> Event {
        Event::Reply {
            step,
            attempt,
            compensation,
            outcome: ok
                .map(|()| b"{}".to_vec())
                .map_err(|(kind, message)| StepError {
                    kind: kind.into(),
                    message: message.into(),
                }),
        }
    }

    #[test]
    fn attempts_and_compensations_become_bars_in_stage_order() {
        let def = order();
        let t0 = 1_764_187_200_000;
        let (mut saga, _) = Saga::start(&def, "order-1".into(), b"{}".to_vec(), t0);
        // charge fails once, then succeeds; reserve is refused for good: the fulfilment's other
        // steps answer, then everything is undone.
        saga.apply(
            &def,
            reply(0, 1, false, Err(("unavailable", "bank down"))),
            t0 + 100,
        )
        .unwrap();
        let retry_at = saga.steps[0].due_at.unwrap();
        saga.apply(&def, Event::Tick, retry_at).unwrap();
        saga.apply(&def, reply(0, 2, false, Ok(())), retry_at + 50)
            .unwrap();
        let t1 = retry_at + 50;
        saga.apply(
            &def,
            reply(1, 1, false, Err(("out_of_stock", "<script>x</script>"))),
            t1 + 10,
        )
        .unwrap();
        saga.apply(&def, reply(2, 1, false, Ok(())), t1 + 20)
            .unwrap();
        saga.apply(&def, reply(3, 1, false, Ok(())), t1 + 30)
            .unwrap();
        let t = build(&saga, Some(&def), t1 + 40);
        let names: Vec<(String, bool)> = t
            .lanes
            .iter()
            .map(|l| (l.step.clone(), l.compensation))
            .collect();
        assert_eq!(names[0], ("charge".to_string(), false));
        assert_eq!(names[1].0, "reserve");
        // The charge's two attempts: the first failed, the second succeeded.
        let charge = &t.lanes[0].bars;
        assert!(charge.len() >= 2, "{charge:?}");
        assert!(
            matches!(&charge[0].outcome, Outcome::Failed { kind, .. } if kind == "unavailable")
        );
        assert_eq!(charge.last().unwrap().outcome, Outcome::Ok);
        // reserve, prepare_shipment and notify ran side by side: their first bars overlap.
        let first = |name: &str| {
            t.lanes
                .iter()
                .find(|l| l.step == name && !l.compensation)
                .unwrap()
                .bars[0]
                .clone()
        };
        let (r, p) = (first("reserve"), first("prepare_shipment"));
        assert!(
            r.start <= p.end.unwrap() && p.start <= r.end.unwrap(),
            "{r:?} {p:?}"
        );
        // Compensation started, in reverse order (the last step first), on a lane of its own
        // right below its step.
        assert_eq!(
            names.last().unwrap(),
            &("notify".to_string(), true),
            "{names:?}"
        );
        let html = render(&t, t1 + 40).into_string();
        assert!(html.contains("↩ notify (notification.withdraw)"), "{html}");
        let table = attempts(&t, t1 + 40).into_string();
        assert!(table.contains("&lt;script&gt;x&lt;/script&gt;"), "{table}");
        assert!(!table.contains("<script>"), "{table}");
    }

    #[test]
    fn a_running_attempt_runs_until_now() {
        let def = order();
        let t0 = 1_000_000;
        let (saga, _) = Saga::start(&def, "order-2".into(), b"{}".to_vec(), t0);
        let t = build(&saga, Some(&def), t0 + 5_000);
        assert_eq!(t.end, t0 + 5_000);
        let charge = &t.lanes[0].bars[0];
        assert_eq!(
            (charge.outcome.clone(), charge.end),
            (Outcome::Running, None)
        );
        assert!(describe(charge, t0 + 5_000).starts_with("attempt 1: running for 5.0 s"));
        // Steps not started yet have a lane too, empty.
        assert!(t
            .lanes
            .iter()
            .any(|l| l.step == "notify" && l.bars.is_empty()));
        // The after-compensation step is not drawn while it never ran.
        assert!(!t.lanes.iter().any(|l| l.step == "notify_cancellation"));
    }
}
