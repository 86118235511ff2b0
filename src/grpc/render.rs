//! Snapshots rendered as API messages.

use sagaflow_actors::definition::SagaDefinition;
use sagaflow_actors::machine::{Happening, Millis, Phase, Saga, StepPhase};

use crate::clock::format_ms as time;
use sagaflow_proto::v1;
use serde::Deserialize;

/// A saga as the API shows it. `def` names the steps; without it, steps are shown by index.
pub fn saga(s: &Saga, revision: u64, def: Option<&SagaDefinition>) -> v1::Saga {
    let now = crate::clock::now_ms();
    let stuck_at = def.and_then(|d| s.stuck_at(d, crate::config::STUCK_MULTIPLE));
    let step_name = |i: usize| {
        def.and_then(|d| d.step(i))
            .map_or_else(|| format!("step-{i}"), |st| st.name.clone())
    };
    // The after-compensation step is listed once the saga compensates (or it ran): an order
    // that shipped never needed it, and listing it PENDING read as if it still might run.
    let after_compensation_unneeded = |i: usize, st: &sagaflow_actors::machine::StepState| {
        def.is_some_and(|d| d.after_compensation.is_some() && i == d.steps.len())
            && st.phase == StepPhase::Pending
            && s.compensation_plan.is_none()
    };
    let steps = s
        .steps
        .iter()
        .enumerate()
        .filter(|(i, st)| !after_compensation_unneeded(*i, st))
        .map(|(i, st)| {
            let d = def.and_then(|d| d.step(i));
            let stage = match (def, d) {
                (Some(def), Some(step)) => def
                    .stages
                    .get(step.stage)
                    .map_or_else(|| "after_compensation".to_string(), |g| g.name.clone()),
                _ => String::new(),
            };
            v1::StepStatus {
                name: step_name(i),
                stage,
                action: d.map(|d| d.action.to_string()).unwrap_or_default(),
                compensation: d
                    .and_then(|d| d.compensation.as_ref())
                    .map(ToString::to_string)
                    .unwrap_or_default(),
                state: st.phase.as_str().to_string(),
                attempts: st.attempt,
                compensation_attempts: st.comp_attempt,
                last_error_kind: st
                    .last_error
                    .as_ref()
                    .map(|e| e.kind.clone())
                    .unwrap_or_default(),
                last_error: st
                    .last_error
                    .as_ref()
                    .map(|e| e.message.clone())
                    .unwrap_or_default(),
                started_at_unix_ms: st.started_at.unwrap_or_default(),
                finished_at_unix_ms: st.finished_at.unwrap_or_default(),
                next_attempt_at_unix_ms: if matches!(
                    st.phase,
                    StepPhase::RetryWait | StepPhase::CompensationRetryWait
                ) {
                    st.due_at.unwrap_or_default()
                } else {
                    0
                },
                output_json: st
                    .output
                    .as_deref()
                    .map(|o| String::from_utf8_lossy(o).into_owned())
                    .unwrap_or_default(),
            }
        })
        .collect();
    let compensations = s
        .compensation_plan
        .iter()
        .flatten()
        .filter_map(|&i| {
            let i = i as usize;
            let st = s.steps.get(i)?;
            (st.comp_attempt > 0).then(|| v1::CompensationRecord {
                step: step_name(i),
                action: def
                    .and_then(|d| d.step(i))
                    .and_then(|d| d.compensation.as_ref())
                    .map(ToString::to_string)
                    .unwrap_or_default(),
                state: st.phase.as_str().to_string(),
                attempts: st.comp_attempt,
                finished_at_unix_ms: if st.phase == StepPhase::Compensated {
                    st.finished_at.unwrap_or_default()
                } else {
                    0
                },
            })
        })
        .collect();
    let history = s
        .history
        .iter()
        .map(|h| v1::HistoryEntry {
            at_unix_ms: h.at,
            step: h.step.map(|i| step_name(i as usize)).unwrap_or_default(),
            what: h.what.to_string(),
        })
        .collect();
    v1::Saga {
        saga_id: s.id.clone(),
        saga_name: s.definition.clone(),
        status: s.status.clone(),
        phase: s.phase.as_str().to_string(),
        terminal: s.is_terminal(),
        reason: s.reason.clone().unwrap_or_default(),
        input_json: String::from_utf8_lossy(&s.input).into_owned(),
        started_at_unix_ms: s.started_at,
        updated_at_unix_ms: s.updated_at,
        deadline_unix_ms: s.deadline_at,
        steps,
        compensations,
        history,
        revision,
        progress: def.map(|d| progress(s, d, now)).unwrap_or_default(),
        stuck: stuck_at.is_some_and(|at| now >= at),
        stuck_at_unix_ms: stuck_at.unwrap_or_default(),
        definition_version: sagaflow_actors::definition::plan::version_of(s.fingerprint),
    }
}

/// The consumer group that serves `service` (docs/participants.md).
pub fn consumer_group(service: &str) -> String {
    format!("svc-{service}")
}

/// What keeps an unfinished saga waiting for ever, in words: the steps it waits on (running
/// or waiting to retry, forward or compensation) whose service has no consumer group among
/// `consumers` (the command stream's consumer names), e.g. ``waiting on `hotel.book`: no
/// consumer serves `hotel` (consumer group svc-hotel)``. `None` when every one is served.
pub fn unserved(
    s: &Saga,
    def: &SagaDefinition,
    consumers: &std::collections::HashSet<String>,
) -> Option<String> {
    if s.is_terminal() {
        return None;
    }
    let mut waits: Vec<String> = Vec::new();
    for (i, st) in s.steps.iter().enumerate() {
        let Some(step) = def.step(i) else { continue };
        let action = match st.phase {
            StepPhase::Running | StepPhase::RetryWait => &step.action,
            StepPhase::Compensating | StepPhase::CompensationRetryWait => {
                match step.compensation.as_ref() {
                    Some(c) => c,
                    None => continue,
                }
            }
            _ => continue,
        };
        let group = consumer_group(&action.service);
        if consumers.contains(&group) {
            continue;
        }
        let text = format!(
            "waiting on `{action}`: no consumer serves `{}` (consumer group {group})",
            action.service
        );
        if !waits.contains(&text) {
            waits.push(text);
        }
    }
    (!waits.is_empty()).then(|| waits.join("; "))
}

/// What the saga is doing or waiting for, in words, at `now`: for an operator reading
/// `GetOrder`, "retrying, attempt N, next at T".
pub fn progress(s: &Saga, def: &SagaDefinition, now: Millis) -> String {
    match s.phase {
        Phase::Completed | Phase::Compensated | Phase::Failed => {
            return format!("finished {}: {}", s.phase.as_str(), s.status);
        }
        Phase::NeedsAttention => {
            let why = s
                .history
                .iter()
                .rev()
                .find_map(|h| match &h.what {
                    Happening::Parked { reason } => Some(reason.as_str()),
                    _ => None,
                })
                .unwrap_or("");
            return format!(
                "needs attention: {why}; an operator can retry, skip or compensate \
                 (sagaflow saga retry|skip|compensate|abandon {})",
                s.id
            );
        }
        Phase::Running | Phase::Compensating => {}
    }
    let mut parts = Vec::new();
    if s.stuck_at(def, crate::config::STUCK_MULTIPLE)
        .is_some_and(|at| now >= at)
    {
        parts.push(format!("STUCK: no progress since {}", time(s.updated_at)));
    }
    for (i, st) in s.steps.iter().enumerate() {
        let Some(step) = def.step(i) else { continue };
        let comp = step
            .compensation
            .as_ref()
            .map(ToString::to_string)
            .unwrap_or_default();
        let after = |st: &sagaflow_actors::machine::StepState| {
            st.last_error
                .as_ref()
                .map(|e| format!(" after {}: {}", e.kind, e.message))
                .unwrap_or_default()
        };
        let due = time(st.due_at.unwrap_or_default());
        // Attempts count within the current retry budget (an operator's retry starts a new
        // one); the overall attempt number is added when they differ.
        let nth = |compensation: bool, next: bool, overall: u32, max: u32| {
            let used = s.attempts_in_budget(i, compensation) + u32::from(next);
            let overall = overall + u32::from(next);
            if used == overall {
                format!("attempt {used} of {max}")
            } else {
                format!("attempt {used} of {max} (#{overall} overall)")
            }
        };
        let text = match st.phase {
            StepPhase::RetryWait => format!(
                "retrying `{}` ({}): {} at {due}{}",
                step.name,
                step.action,
                nth(false, true, st.attempt, step.retry.max_attempts),
                after(st)
            ),
            StepPhase::CompensationRetryWait => format!(
                "retrying compensation `{comp}` of `{}`: {} at {due}{}",
                step.name,
                nth(
                    true,
                    true,
                    st.comp_attempt,
                    step.compensation_retry.max_attempts
                ),
                after(st)
            ),
            StepPhase::Waiting => format!(
                "waiting for signal `{}` (step `{}`) until {due}",
                step.wait_for().unwrap_or_default(),
                step.name
            ),
            StepPhase::Running => format!(
                "waiting for `{}` ({}): {}, times out at {due}",
                step.name,
                step.action,
                nth(false, false, st.attempt, step.retry.max_attempts)
            ),
            StepPhase::Compensating => format!(
                "compensating `{}` ({comp}): {}, times out at {due}",
                step.name,
                nth(
                    true,
                    false,
                    st.comp_attempt,
                    step.compensation_retry.max_attempts
                )
            ),
            _ => continue,
        };
        parts.push(text);
    }
    if parts.is_empty() {
        parts.push(format!("{} ({})", s.phase.as_str(), s.status));
    }
    parts.join("; ")
}

/// The order saga's input.
#[derive(Debug, Clone, Default, Deserialize, serde::Serialize, PartialEq, Eq)]
pub struct OrderInput {
    /// Client's order id.
    pub order_id: String,
    /// Customer.
    pub customer: String,
    /// Total, cents.
    pub amount_cents: i64,
    /// Items.
    pub items: Vec<OrderItem>,
}

/// One order line.
#[derive(Debug, Clone, Default, Deserialize, serde::Serialize, PartialEq, Eq)]
pub struct OrderItem {
    /// SKU.
    pub sku: String,
    /// Quantity.
    pub quantity: u32,
}

/// Saga id of an order.
pub fn order_saga_id(order_id: &str) -> String {
    format!("order-{order_id}")
}

/// An order saga as an order.
pub fn order(s: &Saga, revision: u64, def: Option<&SagaDefinition>) -> v1::Order {
    let input: OrderInput = serde_json::from_slice(&s.input).unwrap_or_default();
    v1::Order {
        order_id: if input.order_id.is_empty() {
            s.id.trim_start_matches("order-").to_string()
        } else {
            input.order_id
        },
        customer: input.customer,
        amount_cents: input.amount_cents,
        items: input
            .items
            .into_iter()
            .map(|i| v1::OrderItem {
                sku: i.sku,
                quantity: i.quantity,
            })
            .collect(),
        status: s.status.clone(),
        reason: s.reason.clone().unwrap_or_default(),
        terminal: s.is_terminal(),
        saga: Some(saga(s, revision, def)),
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

    fn fail(kind: &str, step: usize, attempt: u32, compensation: bool) -> Event {
        Event::Reply {
            step,
            attempt,
            compensation,
            outcome: Err(StepError {
                kind: kind.into(),
                message: "bank down".into(),
            }),
        }
    }

    #[test]
    fn progress_says_what_the_saga_waits_for() {
        let def = order();
        let t0 = 1_764_187_200_000; // 2025-11-26T20:00:00Z
        let (mut saga, _) = Saga::start(&def, "order-1".into(), b"{}".to_vec(), t0);
        assert_eq!(
            progress(&saga, &def, t0),
            "waiting for `charge` (payment.charge): attempt 1 of 5, times out at 2025-11-26T20:00:10.000Z"
        );
        saga.apply(&def, fail("unavailable", 0, 1, false), t0 + 1)
            .unwrap();
        let text = progress(&saga, &def, t0 + 2);
        assert!(
            text.starts_with(
                "retrying `charge` (payment.charge): attempt 2 of 5 at 2025-11-26T20:00:00."
            ),
            "{text}"
        );
        assert!(text.ends_with("after unavailable: bank down"), "{text}");
        // Much later with nothing done: flagged stuck.
        let text = progress(&saga, &def, t0 + 3_600_000);
        assert!(
            text.starts_with("STUCK: no progress since 2025-11-26T20:00:00.001Z; retrying"),
            "{text}"
        );
        let rendered = saga_at(&saga, &def, t0 + 3_600_000);
        assert!(rendered.stuck);
        assert!(rendered.stuck_at_unix_ms > t0);
    }

    fn saga_at(s: &Saga, def: &SagaDefinition, now: Millis) -> v1::Saga {
        let mut v = saga(s, 1, Some(def));
        v.stuck = s
            .stuck_at(def, crate::config::STUCK_MULTIPLE)
            .is_some_and(|at| now >= at);
        v
    }

    #[test]
    fn a_step_whose_service_nobody_serves_is_named() {
        let def = order();
        let (mut saga, _) = Saga::start(&def, "order-3".into(), b"{}".to_vec(), 1_000);
        let first = &def.steps[def.stages[0].steps[0]];
        let service = first.action.service.clone();
        let mut consumers: std::collections::HashSet<String> = def
            .steps
            .iter()
            .map(|s| consumer_group(&s.action.service))
            .collect();
        assert_eq!(unserved(&saga, &def, &consumers), None);
        consumers.remove(&consumer_group(&service));
        assert_eq!(
            unserved(&saga, &def, &consumers).unwrap(),
            format!(
                "waiting on `{}`: no consumer serves `{service}` (consumer group svc-{service})",
                first.action
            )
        );
        // Waiting to retry counts too; a finished saga waits on nothing.
        saga.apply(
            &def,
            fail("unavailable", def.stages[0].steps[0], 1, false),
            2_000,
        )
        .unwrap();
        assert!(unserved(&saga, &def, &consumers).is_some());
        saga.phase = Phase::Compensated;
        assert_eq!(unserved(&saga, &def, &consumers), None);
    }

    #[test]
    fn progress_of_a_parked_saga_names_the_way_out() {
        let def = order();
        let mut def1 = def.clone();
        def1.steps[0].compensation_retry.max_attempts = 1;
        let (mut saga, _) = Saga::start(&def1, "order-2".into(), b"{}".to_vec(), 1_000);
        saga.apply(
            &def1,
            Event::Reply {
                step: 0,
                attempt: 1,
                compensation: false,
                outcome: Ok(Vec::new()),
            },
            1_001,
        )
        .unwrap();
        saga.apply(
            &def1,
            Event::Cancel {
                reason: "test".into(),
            },
            1_002,
        )
        .unwrap();
        // The fulfilment steps are in flight: answer them, then fail the refund for good.
        saga.apply(&def1, fail("out_of_stock", 1, 1, false), 1_003)
            .unwrap();
        saga.apply(&def1, fail("invalid", 2, 1, false), 1_004)
            .unwrap();
        saga.apply(&def1, fail("invalid", 3, 1, false), 1_005)
            .unwrap();
        saga.apply(&def1, fail("closed_account", 0, 1, true), 1_006)
            .unwrap();
        assert_eq!(saga.phase, Phase::NeedsAttention);
        let text = progress(&saga, &def1, 2_000);
        assert!(text.starts_with("needs attention: compensation `payment.refund` of step `charge` failed after 1 attempt(s): closed_account: bank down"), "{text}");
        assert!(
            text.contains("sagaflow saga retry|skip|compensate|abandon order-2"),
            "{text}"
        );
    }
}
