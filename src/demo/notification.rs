//! The demo notification service: `send` (the order is confirmed), `withdraw` (its
//! compensation: the confirmation is withdrawn) and `send_cancellation` (the order was
//! cancelled). Each is recorded once per idempotency key, so the customer is told at most once
//! each. A message cannot be unsent: `withdraw` stands for dropping a confirmation not yet
//! delivered or marking a delivered one void; the cancellation notice is what tells the customer.

use async_trait::async_trait;
use sagaflow_proto::v1;

use super::ledger::{Ledger, LedgerEntry, Recorded, Undo};
use super::{failure, forward_key, Knobs, OrderInput};
use sagaflow_participant::{Handler as Participant, Outcome, Unavailable};

/// Service name.
pub const SERVICE: &str = "notification";

/// The notification participant.
#[derive(Debug, Clone)]
pub struct Notification {
    ledger: Ledger,
    knobs: Knobs,
}

impl Notification {
    /// A notification service recording into `ledger`.
    pub fn new(ledger: Ledger, knobs: Knobs) -> Self {
        Notification { ledger, knobs }
    }

    async fn send(
        &self,
        cmd: &v1::Command,
        action: &str,
        template: &str,
    ) -> Result<Outcome, Unavailable> {
        // No read first: the outcome depends only on the command, and `record` answers what an
        // earlier delivery recorded when the key is taken (one write instead of a read and a write).
        // The recipient is informative only: a message is sent even for an input we cannot read.
        let customer = OrderInput::parse(&cmd.input)
            .map(|o| o.customer)
            .unwrap_or_default();
        let output = serde_json::json!({ "sent_to": customer, "template": template });
        let entry = LedgerEntry::for_command(
            SERVICE,
            action,
            cmd,
            Recorded::Success {
                output: output.to_string().into_bytes(),
            },
        );
        self.ledger.record(entry).await
    }

    async fn withdraw(&self, cmd: &v1::Command, forward: &str) -> Result<Outcome, Unavailable> {
        // A withdrawal that overtakes its confirmation voids it: the late `send` is refused.
        let mut entry = match self
            .ledger
            .begin_undo(SERVICE, "send", "withdraw", cmd, forward)
            .await?
        {
            Undo::Answered(outcome) => return Ok(outcome),
            Undo::Pending { entry, .. } => *entry,
        };
        let output = serde_json::json!({ "withdrawn": entry.undid });
        entry.outcome = Recorded::Success {
            output: output.to_string().into_bytes(),
        };
        self.ledger.record(entry).await
    }
}

#[async_trait]
impl Participant for Notification {
    async fn handle(&self, cmd: &v1::Command) -> Result<Outcome, Unavailable> {
        if let Some(early) = crate::demo::precheck(&self.knobs, cmd).await {
            return Ok(early);
        }
        match cmd.action.as_str() {
            "send" => self.send(cmd, "send", "order_confirmed").await,
            "withdraw" => match forward_key(cmd) {
                Some(forward) => self.withdraw(cmd, &forward).await,
                None => Ok(failure(
                    "invalid",
                    "withdraw without the key of the notification it undoes",
                )),
            },
            "send_cancellation" => self.send(cmd, "send_cancellation", "order_cancelled").await,
            other => Ok(failure(
                "invalid",
                format!("unknown notification action `{other}`"),
            )),
        }
    }
}
