//! The demo payment service: `charge` (declines amounts above a limit) and `refund`.
//!
//! Money exists only in the ledger: a charge is its ledger entry, a refund is a second entry
//! returning the charge's amount. Refusals (`declined`, `invalid`) are recorded too, so a
//! duplicate gets the same answer even if the limit changed meanwhile.

use async_trait::async_trait;
use sagaflow_proto::v1;

use super::ledger::{Ledger, LedgerEntry, Recorded, Undo};
use super::{failure, forward_key, Knobs, OrderInput};
use sagaflow_participant::{Handler as Participant, Outcome, Unavailable};

/// Service name.
pub const SERVICE: &str = "payment";

/// The payment participant.
#[derive(Debug, Clone)]
pub struct Payment {
    ledger: Ledger,
    knobs: Knobs,
    limit_cents: i64,
}

impl Payment {
    /// A payment service recording into `ledger`, declining charges above `limit_cents`.
    pub fn new(ledger: Ledger, knobs: Knobs, limit_cents: i64) -> Self {
        Payment {
            ledger,
            knobs,
            limit_cents,
        }
    }

    async fn charge(&self, cmd: &v1::Command) -> Result<Outcome, Unavailable> {
        // No read first: the outcome depends only on the command, and `record` answers what an
        // earlier delivery recorded when the key is taken (one write instead of a read and a write).
        let mut entry = LedgerEntry::for_command(SERVICE, "charge", cmd, Recorded::Voided);
        entry.outcome = match OrderInput::parse(&cmd.input) {
            Err(message) => Recorded::Failure {
                kind: "invalid".into(),
                message,
            },
            Ok(order) if order.amount_cents > self.limit_cents => Recorded::Failure {
                kind: "declined".into(),
                message: format!(
                    "amount {} above limit {}",
                    order.amount_cents, self.limit_cents
                ),
            },
            Ok(order) => {
                entry.detail.amount_cents = order.amount_cents;
                let output = serde_json::json!({ "charged_cents": order.amount_cents, "customer": order.customer });
                Recorded::Success {
                    output: output.to_string().into_bytes(),
                }
            }
        };
        self.ledger.record(entry).await
    }

    async fn refund(&self, cmd: &v1::Command, forward: &str) -> Result<Outcome, Unavailable> {
        let (charge, mut entry) = match self
            .ledger
            .begin_undo(SERVICE, "charge", "refund", cmd, forward)
            .await?
        {
            Undo::Answered(outcome) => return Ok(outcome),
            Undo::Pending { forward, entry } => (*forward, *entry),
        };
        if entry.undid {
            entry.detail.amount_cents = charge.detail.amount_cents;
        }
        let output = serde_json::json!({ "refunded_cents": entry.detail.amount_cents });
        entry.outcome = Recorded::Success {
            output: output.to_string().into_bytes(),
        };
        self.ledger.record(entry).await
    }
}

#[async_trait]
impl Participant for Payment {
    async fn handle(&self, cmd: &v1::Command) -> Result<Outcome, Unavailable> {
        if let Some(early) = crate::demo::precheck(&self.knobs, cmd).await {
            return Ok(early);
        }
        match cmd.action.as_str() {
            "charge" => self.charge(cmd).await,
            "refund" => match forward_key(cmd) {
                Some(forward) => self.refund(cmd, &forward).await,
                None => Ok(failure(
                    "invalid",
                    "refund without the key of the charge it undoes",
                )),
            },
            other => Ok(failure(
                "invalid",
                format!("unknown payment action `{other}`"),
            )),
        }
    }
}
