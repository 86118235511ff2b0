//! The demo shipping service: `prepare` (records a shipment with a tracking id derived from the
//! idempotency key, so a duplicate gets the same one) and `cancel`.

use async_trait::async_trait;
use sagaflow_proto::v1;

use super::ledger::{Ledger, LedgerEntry, Recorded, Undo};
use super::{failure, forward_key, Knobs};
use sagaflow_participant::{Handler as Participant, Outcome, Unavailable};

/// Service name.
pub const SERVICE: &str = "shipping";

/// The tracking id of the shipment prepared under `idempotency_key`.
pub fn tracking_id(idempotency_key: &str) -> String {
    format!(
        "TRK-{:016X}",
        sagaflow_actors::hash::fnv1a(idempotency_key.as_bytes())
    )
}

/// The shipping participant.
#[derive(Debug, Clone)]
pub struct Shipping {
    ledger: Ledger,
    knobs: Knobs,
}

impl Shipping {
    /// A shipping service recording into `ledger`.
    pub fn new(ledger: Ledger, knobs: Knobs) -> Self {
        Shipping { ledger, knobs }
    }

    async fn prepare(&self, cmd: &v1::Command) -> Result<Outcome, Unavailable> {
        // No read first: the outcome depends only on the command, and `record` answers what an
        // earlier delivery recorded when the key is taken (one write instead of a read and a write).
        let output = serde_json::json!({ "tracking_id": tracking_id(&cmd.idempotency_key) });
        let entry = LedgerEntry::for_command(
            SERVICE,
            "prepare",
            cmd,
            Recorded::Success {
                output: output.to_string().into_bytes(),
            },
        );
        self.ledger.record(entry).await
    }

    async fn cancel(&self, cmd: &v1::Command, forward: &str) -> Result<Outcome, Unavailable> {
        let mut entry = match self
            .ledger
            .begin_undo(SERVICE, "prepare", "cancel", cmd, forward)
            .await?
        {
            Undo::Answered(outcome) => return Ok(outcome),
            Undo::Pending { entry, .. } => *entry,
        };
        let output = if entry.undid {
            serde_json::json!({ "cancelled": tracking_id(forward) })
        } else {
            serde_json::json!({ "cancelled": null })
        };
        entry.outcome = Recorded::Success {
            output: output.to_string().into_bytes(),
        };
        self.ledger.record(entry).await
    }
}

#[async_trait]
impl Participant for Shipping {
    async fn handle(&self, cmd: &v1::Command) -> Result<Outcome, Unavailable> {
        if let Some(early) = crate::demo::precheck(&self.knobs, cmd).await {
            return Ok(early);
        }
        match cmd.action.as_str() {
            "prepare" => self.prepare(cmd).await,
            "cancel" => match forward_key(cmd) {
                Some(forward) => self.cancel(cmd, &forward).await,
                None => Ok(failure(
                    "invalid",
                    "cancel without the key of the shipment it undoes",
                )),
            },
            other => Ok(failure(
                "invalid",
                format!("unknown shipping action `{other}`"),
            )),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tracking_ids_are_deterministic() {
        assert_eq!(
            tracking_id("order-A1/prepare_shipment"),
            tracking_id("order-A1/prepare_shipment")
        );
        assert_ne!(
            tracking_id("order-A1/prepare_shipment"),
            tracking_id("order-A2/prepare_shipment")
        );
        assert!(tracking_id("x").starts_with("TRK-"));
    }
}
