//! What applying a definition would change: the difference between the active version of a
//! saga and a new one, in words an operator reviews before `saga apply` (`saga plan`).
//!
//! Steps and stages are matched by name (names are unique within a saga): a step that keeps
//! its name but changes its action is *changed*, one with a new name is *added*.

use std::fmt;
use std::time::Duration;

use super::{Action, RetryPolicy, SagaDefinition, Step};

/// A definition's version: its content hash ([`SagaDefinition::fingerprint`]) as 16 lowercase
/// hex digits. The same content gives the same version on every node, whatever the file.
pub fn version(definition: &SagaDefinition) -> String {
    version_of(definition.fingerprint)
}

/// A fingerprint as a version string.
pub fn version_of(fingerprint: u64) -> String {
    format!("{fingerprint:016x}")
}

/// One difference, read as a line of the plan.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Change {
    /// A saga with no active version yet.
    NewSaga {
        /// Stages.
        stages: usize,
        /// Forward steps.
        steps: usize,
    },
    /// A stage that was not there.
    StageAdded(String),
    /// A stage no longer there.
    StageRemoved(String),
    /// The stages' order changed (the new order, then the old).
    StagesReordered(Vec<String>, Vec<String>),
    /// A step that was not there, in stage `stage`.
    StepAdded {
        /// Step.
        step: String,
        /// Its stage.
        stage: String,
        /// Its action.
        action: String,
        /// Its compensation, if any.
        compensation: Option<String>,
    },
    /// A step no longer there (it was in stage `stage`).
    StepRemoved {
        /// Step.
        step: String,
        /// Its stage.
        stage: String,
    },
    /// The steps of a stage are in another order (the new order, then the old).
    StepsReordered {
        /// The stage.
        stage: String,
        /// New order.
        now: Vec<String>,
        /// Old order.
        was: Vec<String>,
    },
    /// A field of the saga, a stage or a step changed (`what` names it).
    Field {
        /// `statuses.completed`, `stage reserve: status`, `step charge: timeout`…
        what: String,
        /// Old value.
        was: String,
        /// New value.
        now: String,
    },
}

impl fmt::Display for Change {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Change::NewSaga { stages, steps } => {
                write!(f, "+ new saga: {stages} stages, {steps} steps")
            }
            Change::StageAdded(s) => write!(f, "+ stage `{s}`"),
            Change::StageRemoved(s) => write!(f, "- stage `{s}`"),
            Change::StagesReordered(now, was) => write!(
                f,
                "~ stages reordered: {} (was {})",
                now.join(", "),
                was.join(", ")
            ),
            Change::StepAdded {
                step,
                stage,
                action,
                compensation,
            } => {
                write!(f, "+ step `{step}` in stage `{stage}`: {action}")?;
                match compensation {
                    Some(c) => write!(f, ", compensated by {c}"),
                    None => Ok(()),
                }
            }
            Change::StepRemoved { step, stage } => {
                write!(f, "- step `{step}` (stage `{stage}`)")
            }
            Change::StepsReordered { stage, now, was } => write!(
                f,
                "~ stage `{stage}`: steps reordered: {} (was {})",
                now.join(", "),
                was.join(", ")
            ),
            Change::Field { what, was, now } => write!(f, "~ {what}: {was} → {now}"),
        }
    }
}

/// The changes from `active` (none: a new saga) to `new`, in a stable order: the saga's own
/// fields, stages, then steps in the new definition's order, then removals.
pub fn diff(active: Option<&SagaDefinition>, new: &SagaDefinition) -> Vec<Change> {
    let Some(old) = active else {
        return vec![Change::NewSaga {
            stages: new.stages.len(),
            steps: new.steps.len(),
        }];
    };
    if old.fingerprint == new.fingerprint {
        return Vec::new();
    }
    let mut out = Vec::new();
    let mut field = |what: String, was: String, now: String| {
        if was != now {
            out.push(Change::Field { what, was, now });
        }
    };
    field(
        "description".into(),
        quoted(&old.description),
        quoted(&new.description),
    );
    field("deadline".into(), human(old.deadline), human(new.deadline));
    for (name, was, now) in [
        ("initial", &old.statuses.initial, &new.statuses.initial),
        (
            "completed",
            &old.statuses.completed,
            &new.statuses.completed,
        ),
        (
            "compensated",
            &old.statuses.compensated,
            &new.statuses.compensated,
        ),
        ("failed", &old.statuses.failed, &new.statuses.failed),
        (
            "needs_attention",
            &old.statuses.needs_attention,
            &new.statuses.needs_attention,
        ),
    ] {
        field(format!("statuses.{name}"), was.clone(), now.clone());
    }
    let old_stages: Vec<&str> = old.stages.iter().map(|s| s.name.as_str()).collect();
    let new_stages: Vec<&str> = new.stages.iter().map(|s| s.name.as_str()).collect();
    for stage in &new.stages {
        let Some(before) = old.stages.iter().find(|s| s.name == stage.name) else {
            out.push(Change::StageAdded(stage.name.clone()));
            continue;
        };
        let status = |s: &Option<String>| s.clone().unwrap_or_else(|| "(none)".into());
        if before.status != stage.status {
            out.push(Change::Field {
                what: format!("stage `{}`: status", stage.name),
                was: status(&before.status),
                now: status(&stage.status),
            });
        }
        let names = |d: &SagaDefinition, idx: &[usize]| -> Vec<String> {
            idx.iter().map(|&i| d.steps[i].name.clone()).collect()
        };
        let (now, was) = (names(new, &stage.steps), names(old, &before.steps));
        let common_now: Vec<&String> = now.iter().filter(|n| was.contains(n)).collect();
        let common_was: Vec<&String> = was.iter().filter(|n| now.contains(n)).collect();
        if common_now != common_was {
            out.push(Change::StepsReordered {
                stage: stage.name.clone(),
                now,
                was,
            });
        }
    }
    for stage in &old.stages {
        if !new_stages.contains(&stage.name.as_str()) {
            out.push(Change::StageRemoved(stage.name.clone()));
        }
    }
    let common_new: Vec<&str> = new_stages
        .iter()
        .copied()
        .filter(|n| old_stages.contains(n))
        .collect();
    let common_old: Vec<&str> = old_stages
        .iter()
        .copied()
        .filter(|n| new_stages.contains(n))
        .collect();
    if common_new != common_old {
        out.push(Change::StagesReordered(
            new_stages.iter().map(|s| s.to_string()).collect(),
            old_stages.iter().map(|s| s.to_string()).collect(),
        ));
    }
    let stage_of = |d: &SagaDefinition, s: &Step| {
        d.stages
            .get(s.stage)
            .map_or_else(|| "(after compensation)".to_string(), |st| st.name.clone())
    };
    for step in &new.steps {
        match old.steps.iter().find(|s| s.name == step.name) {
            None => out.push(Change::StepAdded {
                step: step.name.clone(),
                stage: stage_of(new, step),
                action: step.action.to_string(),
                compensation: step.compensation.as_ref().map(Action::to_string),
            }),
            Some(before) => {
                if stage_of(old, before) != stage_of(new, step) {
                    out.push(Change::Field {
                        what: format!("step `{}`: stage", step.name),
                        was: stage_of(old, before),
                        now: stage_of(new, step),
                    });
                }
                step_fields(&mut out, &format!("step `{}`", step.name), before, step);
            }
        }
    }
    for step in &old.steps {
        if !new.steps.iter().any(|s| s.name == step.name) {
            out.push(Change::StepRemoved {
                step: step.name.clone(),
                stage: stage_of(old, step),
            });
        }
    }
    match (&old.after_compensation, &new.after_compensation) {
        (None, None) => {}
        (Some(a), Some(b)) => {
            step_fields(&mut out, &format!("after_compensation `{}`", b.name), a, b)
        }
        (was, now) => out.push(Change::Field {
            what: "after_compensation".into(),
            was: was
                .as_ref()
                .map_or("(none)".into(), |s| s.action.to_string()),
            now: now
                .as_ref()
                .map_or("(none)".into(), |s| s.action.to_string()),
        }),
    }
    out
}

fn step_fields(out: &mut Vec<Change>, who: &str, was: &Step, now: &Step) {
    let mut field = |name: &str, a: String, b: String| {
        if a != b {
            out.push(Change::Field {
                what: format!("{who}: {name}"),
                was: a,
                now: b,
            });
        }
    };
    field("action", was.action.to_string(), now.action.to_string());
    let comp = |c: &Option<Action>| c.as_ref().map_or("(none)".into(), Action::to_string);
    field(
        "compensation",
        comp(&was.compensation),
        comp(&now.compensation),
    );
    field("pivot", was.pivot.to_string(), now.pivot.to_string());
    field("timeout", human(was.timeout), human(now.timeout));
    retry_fields(&mut field, "retry", &was.retry, &now.retry);
    retry_fields(
        &mut field,
        "compensation_retry",
        &was.compensation_retry,
        &now.compensation_retry,
    );
}

fn retry_fields(
    field: &mut impl FnMut(&str, String, String),
    name: &str,
    was: &RetryPolicy,
    now: &RetryPolicy,
) {
    field(
        &format!("{name}.max_attempts"),
        was.max_attempts.to_string(),
        now.max_attempts.to_string(),
    );
    field(
        &format!("{name}.initial_backoff"),
        human(was.initial_backoff),
        human(now.initial_backoff),
    );
    field(
        &format!("{name}.max_backoff"),
        human(was.max_backoff),
        human(now.max_backoff),
    );
    field(
        &format!("{name}.multiplier"),
        was.multiplier.to_string(),
        now.multiplier.to_string(),
    );
    field(
        &format!("{name}.non_retryable"),
        format!("{:?}", was.non_retryable),
        format!("{:?}", now.non_retryable),
    );
}

fn quoted(text: &str) -> String {
    format!("{text:?}")
}

/// A duration as a file would write it: `250ms`, `15s`, `2m`, `1h30m`.
pub fn human(d: Duration) -> String {
    let ms = d.as_millis();
    if ms == 0 {
        return "0s".into();
    }
    if !ms.is_multiple_of(1000) {
        return format!("{ms}ms");
    }
    let mut secs = ms / 1000;
    let mut out = String::new();
    for (unit, size) in [("h", 3600), ("m", 60), ("s", 1)] {
        if secs >= size {
            out.push_str(&format!("{}{unit}", secs / size));
            secs %= size;
        }
    }
    out
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use std::path::Path;

    use super::*;
    use crate::definition::parse;

    const TRIP: &str = include_str!("../../../sagas/trip.toml");

    fn trip(edit: impl Fn(String) -> String) -> SagaDefinition {
        parse(&edit(TRIP.to_string()), Path::new("trip.toml")).unwrap()
    }

    #[test]
    fn the_same_content_has_no_changes_and_a_new_saga_says_so() {
        let a = trip(|s| s);
        let b = trip(|s| format!("# a comment\n{s}"));
        assert_eq!(version(&a), version(&b));
        assert_eq!(version(&a).len(), 16);
        assert!(diff(Some(&a), &b).is_empty());
        assert_eq!(
            diff(None, &a),
            [Change::NewSaga {
                stages: 4,
                steps: 5
            }]
        );
    }

    #[test]
    fn reordered_added_removed_and_changed_steps_are_named() {
        let old = trip(|s| s);
        let new = trip(|s| {
            s.replace(
                "[[stage.step]]\nname = \"hold_flight\"\naction = \"flight.hold\"\ncompensation = \"flight.release\"\n",
                "",
            )
            .replace(
                "# Hotel channel managers are slow to answer.\ntimeout = \"45s\"\n",
                "timeout = \"1m\"\n\n[[stage.step]]\nname = \"hold_flight\"\naction = \"flight.hold\"\ncompensation = \"flight.release\"\n\n[[stage.step]]\nname = \"insure\"\naction = \"insurance.buy\"\ncompensation = \"insurance.cancel\"\n",
            )
            .replace("completed = \"BOOKED\"", "completed = \"CONFIRMED\"")
        });
        let lines: Vec<String> = diff(Some(&old), &new)
            .iter()
            .map(ToString::to_string)
            .collect();
        assert_eq!(
            lines,
            [
                "~ statuses.completed: BOOKED → CONFIRMED",
                "~ stage `reserve`: steps reordered: book_hotel, hold_flight, insure (was hold_flight, book_hotel)",
                "~ step `book_hotel`: timeout: 45s → 1m",
                "+ step `insure` in stage `reserve`: insurance.buy, compensated by insurance.cancel",
            ]
        );
    }

    #[test]
    fn durations_read_like_the_files() {
        assert_eq!(human(Duration::from_millis(250)), "250ms");
        assert_eq!(human(Duration::from_secs(15)), "15s");
        assert_eq!(human(Duration::from_secs(5400)), "1h30m");
        assert_eq!(human(Duration::ZERO), "0s");
    }
}
