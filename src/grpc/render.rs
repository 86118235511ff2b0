//! Snapshots rendered as API messages.

use sagaflow_actors::definition::SagaDefinition;
use sagaflow_actors::machine::{Saga, StepPhase};
use sagaflow_proto::v1;
use serde::Deserialize;

/// A saga as the API shows it. `def` names the steps; without it, steps are shown by index.
pub fn saga(s: &Saga, revision: u64, def: Option<&SagaDefinition>) -> v1::Saga {
    let step_name = |i: usize| {
        def.and_then(|d| d.step(i))
            .map_or_else(|| format!("step-{i}"), |st| st.name.clone())
    };
    let steps = s
        .steps
        .iter()
        .enumerate()
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
    }
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
