//! The demo services' ledger: one durable entry per effect in the KV bucket `sagaflow_ledger`,
//! keyed `<service>.<idempotency_key>`, written with `create` (refused when the key exists).
//!
//! Whoever creates a key first decides its outcome; everyone else (a redelivered command, a
//! retry, a concurrent duplicate) reads it back and answers the same. That makes each effect
//! exactly-once *as seen in the ledger*; [`LedgerSummary`] counts the effects per saga so tests
//! can check it.
//!
//! Values are postcard inside the versioned envelope [`LedgerRecord`]; variants are
//! append-only (postcard is not self-describing).
//!
//! With `demo.stateless` the ledger is [`Ledger::stateless`]: nothing is written or read, and
//! every answer is what the command alone decides (see [`crate::demo`]).

use std::collections::BTreeMap;

use async_nats::jetstream::{self, kv, stream};
use futures::TryStreamExt;
use sagaflow_proto::v1;
use serde::{Deserialize, Serialize};

use super::{unavailable, Error};
use crate::clock::now_ms;
use crate::participant::{Outcome, Unavailable};
use crate::topology::ensure_bucket;

/// The ledger bucket.
pub const LEDGER_BUCKET: &str = "sagaflow_ledger";

/// Stored ledger value (append-only variants).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum LedgerRecord {
    /// Version 1.
    V1(LedgerEntry),
}

/// One effect (or refusal) of a demo service.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LedgerEntry {
    /// Service (`payment`).
    pub service: String,
    /// Action (`charge`, `refund`…); for a `Voided` entry, the forward action it blocks.
    pub action: String,
    /// Saga the effect belongs to.
    pub saga_id: String,
    /// Saga step.
    pub step: String,
    /// The command's idempotency key (unsanitised).
    pub idempotency_key: String,
    /// What was decided: duplicates answer this again.
    pub outcome: Recorded,
    /// Money moved, cents (charges and refunds; 0 otherwise).
    pub amount_cents: i64,
    /// Stock moved as `(sku, quantity)` (reservations and releases).
    pub items: Vec<(String, u32)>,
    /// For compensations: whether a successful forward effect was undone (false when the
    /// forward step failed, never happened or was voided). False for forward entries.
    pub undid: bool,
    /// When it was recorded, unix milliseconds.
    pub at_unix_ms: i64,
}

/// The recorded outcome of an entry.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Recorded {
    /// Done; `output` is the JSON answered to the saga.
    Success {
        /// Output JSON.
        output: Vec<u8>,
    },
    /// Refused for good (`declined`, `out_of_stock`, `invalid`).
    Failure {
        /// Machine-readable kind.
        kind: String,
        /// Detail.
        message: String,
    },
    /// The compensation arrived first: the forward command must not be applied.
    Voided,
}

impl Recorded {
    /// The answer to the saga for this entry.
    pub fn to_outcome(&self) -> Outcome {
        match self {
            Recorded::Success { output } => Outcome::Success(output.clone()),
            Recorded::Failure { kind, message } => Outcome::Failure {
                kind: kind.clone(),
                message: message.clone(),
            },
            Recorded::Voided => super::failure("voided", "compensated before it was applied"),
        }
    }

    /// Whether this is a success.
    pub fn is_success(&self) -> bool {
        matches!(self, Recorded::Success { .. })
    }
}

impl LedgerEntry {
    /// An entry for `cmd` with `outcome`, no money and no stock moved.
    pub fn for_command(service: &str, action: &str, cmd: &v1::Command, outcome: Recorded) -> Self {
        LedgerEntry {
            service: service.to_string(),
            action: action.to_string(),
            saga_id: cmd.saga_id.clone(),
            step: cmd.step.clone(),
            idempotency_key: cmd.idempotency_key.clone(),
            outcome,
            amount_cents: 0,
            items: Vec::new(),
            undid: false,
            at_unix_ms: now_ms(),
        }
    }

    /// Encodes this entry in its envelope.
    pub fn encode(&self) -> Result<Vec<u8>, postcard::Error> {
        postcard::to_stdvec(&LedgerRecord::V1(self.clone()))
    }

    /// Decodes an envelope.
    pub fn decode(bytes: &[u8]) -> Result<Self, postcard::Error> {
        match postcard::from_bytes::<LedgerRecord>(bytes)? {
            LedgerRecord::V1(e) => Ok(e),
        }
    }
}

/// The KV key of an effect: `<service>.<idempotency_key>`, with every character outside
/// `[-/_=.a-zA-Z0-9]` (and any `.` that would make an empty token) replaced by `_`. When
/// anything was replaced, `=<hash>` of the original key is appended so that two keys differing
/// only in replaced characters stay distinct.
pub fn ledger_key(service: &str, idempotency_key: &str) -> String {
    let mut clean = String::with_capacity(idempotency_key.len());
    let mut changed = false;
    let chars: Vec<char> = idempotency_key.chars().collect();
    for (i, &c) in chars.iter().enumerate() {
        let ok = match c {
            '.' => i > 0 && i + 1 < chars.len() && chars[i - 1] != '.',
            c => c.is_ascii_alphanumeric() || matches!(c, '-' | '/' | '_' | '='),
        };
        clean.push(if ok { c } else { '_' });
        changed |= !ok;
    }
    if clean.is_empty() {
        clean.push('_');
        changed = true;
    }
    if changed {
        clean.push_str(&format!(
            "={:016x}",
            sagaflow_actors::hash::fnv1a(idempotency_key.as_bytes())
        ));
    }
    format!("{service}.{clean}")
}

/// The ledger bucket, shared by the demo services.
#[derive(Clone, Debug)]
pub struct Ledger {
    /// `None`: stateless, nothing is recorded.
    kv: Option<kv::Store>,
}

impl Ledger {
    /// Creates or opens the bucket (`replicas` replicas, history 1).
    pub async fn open(js: &jetstream::Context, replicas: usize) -> Result<Self, Error> {
        let kv = ensure_bucket(
            js,
            kv::Config {
                bucket: LEDGER_BUCKET.to_string(),
                description: "demo services: one entry per effect, keyed by idempotency key"
                    .to_string(),
                history: 1,
                storage: stream::StorageType::File,
                num_replicas: replicas,
                ..Default::default()
            },
        )
        .await?;
        Ok(Ledger { kv: Some(kv) })
    }

    /// A ledger that records nothing: `get` finds nothing and `create` always succeeds, so
    /// every command is answered as if it were the first, from the command alone.
    pub fn stateless() -> Self {
        Ledger { kv: None }
    }

    /// The entry of `service` for `idempotency_key`, if any.
    pub async fn get(
        &self,
        service: &str,
        idempotency_key: &str,
    ) -> Result<Option<LedgerEntry>, Unavailable> {
        let Some(kv) = &self.kv else {
            return Ok(None);
        };
        let key = ledger_key(service, idempotency_key);
        let entry = kv
            .entry(key.clone())
            .await
            .map_err(|e| unavailable("read the ledger")(&e))?;
        match entry {
            Some(e) if e.operation == kv::Operation::Put => LedgerEntry::decode(&e.value)
                .map(Some)
                .map_err(|err| Unavailable(format!("corrupt ledger entry `{key}`: {err}"))),
            _ => Ok(None),
        }
    }

    /// Records `entry` unless its key exists. `Ok(None)`: recorded; `Ok(Some(existing))`: the key
    /// was taken first, by `existing`.
    pub async fn create(&self, entry: &LedgerEntry) -> Result<Option<LedgerEntry>, Unavailable> {
        let Some(kv) = &self.kv else {
            return Ok(None);
        };
        let bytes = entry
            .encode()
            .map_err(|e| Unavailable(format!("cannot encode ledger entry: {e}")))?;
        let key = ledger_key(&entry.service, &entry.idempotency_key);
        match kv.create(key, bytes.into()).await {
            Ok(_) => Ok(None),
            Err(e) if crate::topology::create_conflict(&e) => {
                match self.get(&entry.service, &entry.idempotency_key).await? {
                    Some(existing) => Ok(Some(existing)),
                    None => Err(Unavailable(
                        "ledger entry exists but cannot be read back".to_string(),
                    )),
                }
            }
            Err(e) => Err(unavailable("write the ledger")(&e)),
        }
    }

    /// Records `entry`, or answers what the entry that got there first recorded.
    pub(crate) async fn record(&self, entry: LedgerEntry) -> Result<Outcome, Unavailable> {
        Ok(match self.create(&entry).await? {
            None => entry.outcome.to_outcome(),
            Some(existing) => existing.outcome.to_outcome(),
        })
    }

    /// The forward entry a compensation undoes: the existing one, or a `Voided` entry created
    /// now so that the late forward command is refused.
    pub(crate) async fn forward_or_void(
        &self,
        service: &str,
        forward_action: &str,
        cmd: &v1::Command,
        forward_key: &str,
    ) -> Result<LedgerEntry, Unavailable> {
        if let Some(existing) = self.get(service, forward_key).await? {
            return Ok(existing);
        }
        let mut void = LedgerEntry::for_command(service, forward_action, cmd, Recorded::Voided);
        void.idempotency_key = forward_key.to_string();
        match self.create(&void).await? {
            None => {
                tracing::info!(
                    service,
                    key = forward_key,
                    "compensation before its forward command: forward voided"
                );
                Ok(void)
            }
            Some(existing) => Ok(existing),
        }
    }

    /// The first half of every compensation: what was already recorded under the
    /// compensation's own key (a duplicate), or else the forward entry it undoes (voided now if
    /// the forward command has not arrived) and the entry to record for the undo, with `undid`
    /// set when there is an effect to undo. The caller adds what it gives back and records it.
    pub(crate) async fn begin_undo(
        &self,
        service: &str,
        forward_action: &str,
        undo_action: &str,
        cmd: &v1::Command,
        forward_key: &str,
    ) -> Result<Undo, Unavailable> {
        if let Some(existing) = self.get(service, &cmd.idempotency_key).await? {
            return Ok(Undo::Answered(existing.outcome.to_outcome()));
        }
        let forward = self
            .forward_or_void(service, forward_action, cmd, forward_key)
            .await?;
        let mut entry = LedgerEntry::for_command(service, undo_action, cmd, Recorded::Voided);
        entry.undid = forward.outcome.is_success();
        Ok(Undo::Pending {
            forward: Box::new(forward),
            entry: Box::new(entry),
        })
    }

    /// Every entry (reads every key: for tests and small ledgers).
    pub async fn entries(&self) -> Result<Vec<LedgerEntry>, Error> {
        let storage = |operation| {
            move |e: &dyn std::fmt::Display| Error::Storage {
                operation,
                message: e.to_string(),
            }
        };
        let Some(kv) = &self.kv else {
            return Ok(Vec::new());
        };
        let keys: Vec<String> = match kv.keys().await {
            Ok(keys) => keys
                .try_collect()
                .await
                .map_err(|e| storage("list ledger keys")(&e))?,
            Err(e) => return Err(storage("list ledger keys")(&e)),
        };
        let mut entries = Vec::with_capacity(keys.len());
        for key in keys {
            let Some(bytes) = kv
                .get(key.clone())
                .await
                .map_err(|e| storage("read the ledger")(&e))?
            else {
                continue;
            };
            let entry = LedgerEntry::decode(&bytes).map_err(|e| Error::Corrupt {
                what: "ledger entry",
                key: key.clone(),
                message: e.to_string(),
            })?;
            entries.push(entry);
        }
        Ok(entries)
    }
}

/// Every ledger entry (for tests: reads every key).
pub async fn ledger(js: &jetstream::Context) -> Result<Vec<LedgerEntry>, Error> {
    let kv = js
        .get_key_value(LEDGER_BUCKET)
        .await
        .map_err(|e| Error::Storage {
            operation: "open the ledger bucket",
            message: e.to_string(),
        })?;
    Ledger { kv: Some(kv) }.entries().await
}

/// What [`Ledger::begin_undo`] found.
pub(crate) enum Undo {
    /// The compensation was recorded before: its answer.
    Answered(Outcome),
    /// The forward entry and the undo entry to complete and record.
    Pending {
        forward: Box<LedgerEntry>,
        entry: Box<LedgerEntry>,
    },
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
                        s.charged_cents += e.amount_cents;
                    }
                    ("payment", "refund") if e.undid => {
                        s.refunded += 1;
                        s.refunded_cents += e.amount_cents;
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
            amount_cents: amount,
            items: vec![],
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
    fn keys_are_sanitised() {
        assert_eq!(
            ledger_key("payment", "order-A1/charge"),
            "payment.order-A1/charge"
        );
        assert_eq!(
            ledger_key("payment", "order-A1/charge/compensate"),
            "payment.order-A1/charge/compensate"
        );
        assert_eq!(
            ledger_key("payment", "order-A.1/charge"),
            "payment.order-A.1/charge"
        );
        let spaced = ledger_key("payment", "order A1/charge");
        assert!(spaced.starts_with("payment.order_A1/charge="), "{spaced}");
        assert_ne!(
            spaced,
            ledger_key("payment", "order*A1/charge"),
            "replaced characters keep keys distinct"
        );
        assert!(ledger_key("p", ".a..b.").starts_with("p._a._b_="));
        assert!(ledger_key("p", "").starts_with("p._="));
        for k in [spaced, ledger_key("p", "ü/ñ>*"), ledger_key("p", "..")] {
            assert!(
                k.chars()
                    .all(|c| c.is_ascii_alphanumeric() || "-/_=.".contains(c)),
                "{k}"
            );
            assert!(!k.contains(".."), "{k}");
        }
    }

    #[test]
    fn entries_round_trip_in_their_envelope() {
        let mut e = entry("order-A1", "inventory", "reserve", ok(), 0, false);
        e.items = vec![("SKU-1".into(), 2)];
        let bytes = e.encode().unwrap();
        assert_eq!(bytes[0], 0, "variant V1 is tag 0");
        assert_eq!(LedgerEntry::decode(&bytes).unwrap(), e);
        assert!(LedgerEntry::decode(&[7, 1, 2]).is_err());
    }

    #[test]
    fn voided_answers_a_failure() {
        assert!(
            matches!(Recorded::Voided.to_outcome(), Outcome::Failure { kind, .. } if kind == "voided")
        );
        assert_eq!(ok().to_outcome(), Outcome::Success(b"{}".to_vec()));
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
