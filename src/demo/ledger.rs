//! The demo services' ledger: one durable entry per effect in the KV bucket `sagaflow_ledger`,
//! keyed `<service>.<idempotency_key>`, written with `create` (refused when the key exists).
//!
//! Whoever creates a key first decides its outcome; everyone else (a redelivered command, a
//! retry, a concurrent duplicate) reads it back and answers the same. That makes each effect
//! exactly-once *as seen in the ledger*; [`LedgerSummary`] counts the effects per saga so tests
//! can check it.
//!
//! It is the participant SDK's ledger (`sagaflow_participant::ledger`) with [`Effect`] (money
//! and stock moved) as each entry's detail.
//!
//! With `demo.stateless` the ledger is [`Ledger::stateless`]: nothing is written or read, and
//! every answer is what the command alone decides (see [`crate::demo`]).

use std::collections::BTreeMap;

use async_nats::jetstream;
use serde::{Deserialize, Serialize};

use super::Error;

pub use sagaflow_participant::ledger::{ledger_key, Recorded, Undo};

/// The ledger bucket.
pub const LEDGER_BUCKET: &str = "sagaflow_ledger";

/// What an effect moved, the detail of a demo ledger entry. (Its fields follow the entry's
/// outcome in the stored bytes, where the entry held them before the ledger moved into
/// `sagaflow-participant`: entries written by older versions read the same.)
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Effect {
    /// Money moved, cents (charges and refunds; 0 otherwise).
    pub amount_cents: i64,
    /// Stock moved as `(sku, quantity)` (reservations and releases).
    pub items: Vec<(String, u32)>,
}

/// One effect (or refusal) of a demo service.
pub type LedgerEntry = sagaflow_participant::ledger::Entry<Effect>;

/// The ledger the demo services share (the SDK's, with [`Effect`] as the detail).
pub type Ledger = sagaflow_participant::ledger::Ledger<Effect>;

/// Creates or opens the demo's bucket (`replicas` replicas, history 1).
pub async fn open(js: &jetstream::Context, replicas: usize) -> Result<Ledger, Error> {
    Ledger::open(js, LEDGER_BUCKET, replicas)
        .await
        .map_err(|e| Error::Storage {
            operation: "open the ledger bucket",
            message: sagaflow_participant::error_chain(&e),
        })
}

/// Every ledger entry (for tests: reads every key).
pub async fn ledger(js: &jetstream::Context) -> Result<Vec<LedgerEntry>, Error> {
    // Only an existing bucket: reading must not create it.
    js.get_key_value(LEDGER_BUCKET)
        .await
        .map_err(|e| Error::Storage {
            operation: "open the ledger bucket",
            message: e.to_string(),
        })?;
    open(js, 1)
        .await?
        .entries()
        .await
        .map_err(|e| Error::Storage {
            operation: "read the ledger",
            message: e.0,
        })
}

/// Effects of one saga, as recorded in the ledger. Every count is of effects that happened:
/// refusals, voided entries and compensations with nothing to undo are counted apart.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct SagaEffects {
    /// Successful charges.
    pub charged: u32,
    /// Refunds that returned a charge.
    pub refunded: u32,
    /// Successful reservations.
    pub reserved: u32,
    /// Releases that returned a reservation.
    pub released: u32,
    /// Shipments prepared.
    pub shipped: u32,
    /// Shipments cancelled.
    pub shipment_cancelled: u32,
    /// Order confirmations sent.
    pub notified: u32,
    /// Order confirmations withdrawn (the compensation of a sent one).
    pub notification_withdrawn: u32,
    /// Cancellation notifications sent.
    pub notified_cancellation: u32,
    /// Cents charged.
    pub charged_cents: i64,
    /// Cents refunded.
    pub refunded_cents: i64,
    /// Forward commands refused (`declined`, `out_of_stock`, `invalid`).
    pub refused: u32,
    /// Forward keys voided by an early compensation.
    pub voided: u32,
}

impl SagaEffects {
    /// Net effects: money kept, reservations kept, shipments kept.
    pub fn net_charged_cents(&self) -> i64 {
        self.charged_cents - self.refunded_cents
    }

    /// Whether every undo matches one effect (nothing undone twice or undone without being
    /// done), each effect happened at most once, and a customer told of the cancellation has no
    /// confirmation left standing. Returns what is wrong.
    pub fn violations(&self) -> Vec<String> {
        let mut v = Vec::new();
        for (name, done, undone) in [
            ("charge", self.charged, self.refunded),
            ("reservation", self.reserved, self.released),
            ("shipment", self.shipped, self.shipment_cancelled),
            ("confirmation", self.notified, self.notification_withdrawn),
        ] {
            if done > 1 {
                v.push(format!("{name} done {done} times"));
            }
            if undone > done {
                v.push(format!(
                    "{name} undone {undone} times but done {done} times"
                ));
            }
        }
        if self.notified_cancellation > 1 {
            v.push(format!(
                "cancellation notified {} times",
                self.notified_cancellation
            ));
        }
        if self.notified_cancellation > 0 && self.notified > self.notification_withdrawn {
            v.push("cancellation notified but the confirmation not withdrawn".to_string());
        }
        v
    }
}

/// Per-saga effect counts of a ledger.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct LedgerSummary {
    /// Effects per saga id.
    pub sagas: BTreeMap<String, SagaEffects>,
}

impl LedgerSummary {
    /// Counts `entries` per saga.
    pub fn from_entries(entries: &[LedgerEntry]) -> Self {
        let mut sagas: BTreeMap<String, SagaEffects> = BTreeMap::new();
        for e in entries {
            let s = sagas.entry(e.saga_id.clone()).or_default();
            match &e.outcome {
                Recorded::Voided => s.voided += 1,
                Recorded::Failure { .. } => s.refused += 1,
                Recorded::Success { .. } => match (e.service.as_str(), e.action.as_str()) {
                    ("payment", "charge") => {
                        s.charged += 1;
                        s.charged_cents += e.detail.amount_cents;
                    }
                    ("payment", "refund") if e.undid => {
                        s.refunded += 1;
                        s.refunded_cents += e.detail.amount_cents;
                    }
                    ("inventory", "reserve") => s.reserved += 1,
                    ("inventory", "release") if e.undid => s.released += 1,
                    ("shipping", "prepare") => s.shipped += 1,
                    ("shipping", "cancel") if e.undid => s.shipment_cancelled += 1,
                    ("notification", "send") => s.notified += 1,
                    ("notification", "withdraw") if e.undid => s.notification_withdrawn += 1,
                    ("notification", "send_cancellation") => s.notified_cancellation += 1,
                    _ => {}
                },
            }
        }
        LedgerSummary { sagas }
    }

    /// Effects per saga id.
    pub fn per_saga(&self) -> &BTreeMap<String, SagaEffects> {
        &self.sagas
    }

    /// The effects of `saga_id` (all zero when it has none).
    pub fn saga(&self, saga_id: &str) -> SagaEffects {
        self.sagas.get(saga_id).copied().unwrap_or_default()
    }

    /// Every saga's [`SagaEffects::violations`], prefixed with the saga id.
    pub fn violations(&self) -> Vec<String> {
        self.sagas
            .iter()
            .flat_map(|(id, s)| {
                s.violations()
                    .into_iter()
                    .map(move |v| format!("{id}: {v}"))
            })
            .collect()
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn entry(
        saga: &str,
        service: &str,
        action: &str,
        outcome: Recorded,
        amount: i64,
        undid: bool,
    ) -> LedgerEntry {
        LedgerEntry {
            service: service.into(),
            action: action.into(),
            saga_id: saga.into(),
            step: "s".into(),
            idempotency_key: format!("{saga}/{action}"),
            outcome,
            detail: Effect {
                amount_cents: amount,
                items: vec![],
            },
            undid,
            at_unix_ms: 1,
        }
    }

    fn ok() -> Recorded {
        Recorded::Success {
            output: b"{}".to_vec(),
        }
    }

    #[test]
    fn entries_round_trip_in_their_envelope() {
        let mut e = entry("order-A1", "inventory", "reserve", ok(), 0, false);
        e.detail.items = vec![("SKU-1".into(), 2)];
        let bytes = e.encode().unwrap();
        assert_eq!(bytes[0], 0, "variant V1 is tag 0");
        assert_eq!(LedgerEntry::decode(&bytes).unwrap(), e);
        assert!(LedgerEntry::decode(&[7, 1, 2]).is_err());
        // The layout before the ledger moved into the SDK (money and stock between the outcome
        // and `undid`) reads the same.
        #[derive(Serialize)]
        enum Before {
            V1 {
                service: String,
                action: String,
                saga_id: String,
                step: String,
                idempotency_key: String,
                outcome: Recorded,
                amount_cents: i64,
                items: Vec<(String, u32)>,
                undid: bool,
                at_unix_ms: i64,
            },
        }
        let before = postcard::to_stdvec(&Before::V1 {
            service: e.service.clone(),
            action: e.action.clone(),
            saga_id: e.saga_id.clone(),
            step: e.step.clone(),
            idempotency_key: e.idempotency_key.clone(),
            outcome: e.outcome.clone(),
            amount_cents: e.detail.amount_cents,
            items: e.detail.items.clone(),
            undid: e.undid,
            at_unix_ms: e.at_unix_ms,
        })
        .unwrap();
        assert_eq!(before, bytes);
    }

    #[test]
    fn summary_counts_effects_per_saga() {
        let declined = Recorded::Failure {
            kind: "declined".into(),
            message: "x".into(),
        };
        let entries = vec![
            entry("a", "payment", "charge", ok(), 1200, false),
            entry("a", "payment", "refund", ok(), 1200, true),
            entry("a", "inventory", "reserve", ok(), 0, false),
            entry("a", "inventory", "release", ok(), 0, true),
            entry("a", "shipping", "prepare", ok(), 0, false),
            entry("a", "shipping", "cancel", ok(), 0, true),
            entry("a", "notification", "send_cancellation", ok(), 0, false),
            entry("b", "payment", "charge", Recorded::Voided, 0, false),
            entry("b", "payment", "refund", ok(), 0, false),
            entry("c", "payment", "charge", declined, 0, false),
            entry("d", "payment", "charge", ok(), 500, false),
            entry("d", "notification", "send", ok(), 0, false),
            entry("e", "notification", "send", ok(), 0, false),
            entry("e", "notification", "withdraw", ok(), 0, true),
            entry("e", "notification", "send_cancellation", ok(), 0, false),
            entry("f", "notification", "send", Recorded::Voided, 0, false),
            entry("f", "notification", "withdraw", ok(), 0, false),
        ];
        let s = LedgerSummary::from_entries(&entries);
        let a = s.saga("a");
        assert_eq!(
            (a.charged, a.refunded, a.reserved, a.released),
            (1, 1, 1, 1)
        );
        assert_eq!(
            (
                a.shipped,
                a.shipment_cancelled,
                a.notified,
                a.notified_cancellation
            ),
            (1, 1, 0, 1)
        );
        assert_eq!(a.net_charged_cents(), 0);
        let b = s.saga("b");
        assert_eq!(
            (b.charged, b.refunded, b.voided),
            (0, 0, 1),
            "a refund with nothing to undo is not a refund"
        );
        assert_eq!(s.saga("c").refused, 1);
        assert_eq!(s.saga("d").charged_cents, 500);
        let e = s.saga("e");
        assert_eq!(
            (
                e.notified,
                e.notification_withdrawn,
                e.notified_cancellation
            ),
            (1, 1, 1),
            "a withdrawn confirmation, then the cancellation notice"
        );
        let f = s.saga("f");
        assert_eq!(
            (f.notified, f.notification_withdrawn, f.voided),
            (0, 0, 1),
            "a withdrawal with nothing to withdraw voids the confirmation"
        );
        assert_eq!(s.saga("nope"), SagaEffects::default());
        assert!(s.violations().is_empty(), "{:?}", s.violations());

        let twice = vec![
            entry("x", "payment", "charge", ok(), 1, false),
            entry("x", "payment", "refund", ok(), 1, true),
            entry("x", "payment", "refund", ok(), 1, true),
            entry("x", "notification", "send", ok(), 0, false),
            entry("x", "notification", "send_cancellation", ok(), 0, false),
        ];
        let v = LedgerSummary::from_entries(&twice).violations();
        assert_eq!(v.len(), 2, "{v:?}");
        assert!(v[0].starts_with("x: charge undone 2 times"), "{v:?}");
        assert_eq!(
            v[1], "x: cancellation notified but the confirmation not withdrawn",
            "{v:?}"
        );

        let told_twice = vec![
            entry("y", "notification", "send", ok(), 0, false),
            entry("y", "notification", "withdraw", ok(), 0, true),
            entry("y", "notification", "withdraw", ok(), 0, true),
            entry("y", "notification", "send_cancellation", ok(), 0, false),
            entry("y", "notification", "send_cancellation", ok(), 0, false),
        ];
        let v = LedgerSummary::from_entries(&told_twice).violations();
        assert_eq!(
            v,
            [
                "y: confirmation undone 2 times but done 1 times",
                "y: cancellation notified 2 times"
            ],
            "{v:?}"
        );
    }
}
