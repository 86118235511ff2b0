//! The idempotency ledger: one durable entry per effect in a KV bucket, keyed
//! `<service>.<idempotency_key>`, written with `create` (refused when the key exists).
//!
//! This is what turns JetStream's at-least-once delivery into exactly-once effects
//! (`docs/participants.md`, rules 3 and 4):
//! - Whoever creates a key first decides its outcome; a redelivered command, a retry or a
//!   concurrent duplicate reads it back and answers the same.
//! - **Final outcomes only**: successes and final failures ([`Outcome::Failure`]). A transient
//!   failure ([`Outcome::Transient`], `unavailable`) is answered but never recorded, or every
//!   retry would get it again and the step could never succeed.
//! - **Voiding**: a compensation that finds no entry for the forward key it undoes (the forward
//!   command timed out and has not arrived) records that key as [`Recorded::Voided`] first; the
//!   late forward command then answers kind `voided` and changes nothing.
//!
//! [`Ledger::forward`] and [`Ledger::compensate`] do all of it around your work. The entry is
//! the record of the effect, not the effect: if your effect lives elsewhere (another
//! database, a payment provider), make it idempotent on the same key too (most providers take
//! an idempotency key), since a crash between the effect and the record repeats the work.
//!
//! Values are postcard inside a versioned envelope; `D` is your own detail (amounts, ids),
//! `()` when there is none.

use std::future::Future;
use std::marker::PhantomData;

use async_nats::jetstream::{self, kv, stream};
use futures::TryStreamExt;
use sagaflow_proto::v1;
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

use crate::command::forward_key;
use crate::{now_ms, Outcome, Unavailable};

/// One recorded effect (or refusal) of a service.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Entry<D = ()> {
    /// Service (`payment`).
    pub service: String,
    /// Action (`charge`, `refund`…); for a `Voided` entry, the forward action it blocks.
    pub action: String,
    /// Saga the effect belongs to.
    pub saga_id: String,
    /// Saga step.
    pub step: String,
    /// The command's idempotency key (as sent; the KV key is [`ledger_key`]).
    pub idempotency_key: String,
    /// What was decided: repeats answer this again.
    pub outcome: Recorded,
    /// Your detail of the effect.
    pub detail: D,
    /// For compensations: whether a successful forward effect was undone (false when the
    /// forward step failed, never happened or was voided). False for forward entries.
    pub undid: bool,
    /// When it was recorded, unix milliseconds.
    pub at_unix_ms: i64,
}

/// Stored value (append-only variants: postcard is not self-describing).
#[derive(Serialize, Deserialize)]
enum Stored<D> {
    V1(Entry<D>),
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

/// The failure kind a voided forward command is answered with.
pub const VOIDED: &str = "voided";

impl Recorded {
    /// The answer to the saga for this entry.
    pub fn to_outcome(&self) -> Outcome {
        match self {
            Recorded::Success { output } => Outcome::Success(output.clone()),
            Recorded::Failure { kind, message } => Outcome::failure(kind, message),
            Recorded::Voided => Outcome::failure(VOIDED, "compensated before it was applied"),
        }
    }

    /// What to record of `outcome` (`None`: a transient failure, never recorded).
    pub fn of(outcome: &Outcome) -> Option<Recorded> {
        match outcome {
            Outcome::Success(output) => Some(Recorded::Success {
                output: output.clone(),
            }),
            Outcome::Failure { kind, message } => Some(Recorded::Failure {
                kind: kind.clone(),
                message: message.clone(),
            }),
            Outcome::Transient { .. } => None,
        }
    }

    /// Whether this is a success.
    pub fn is_success(&self) -> bool {
        matches!(self, Recorded::Success { .. })
    }
}

impl<D: Serialize + DeserializeOwned + Clone + Default> Entry<D> {
    /// An entry for `cmd` with `outcome` and a default detail.
    pub fn for_command(service: &str, action: &str, cmd: &v1::Command, outcome: Recorded) -> Self {
        Entry {
            service: service.to_string(),
            action: action.to_string(),
            saga_id: cmd.saga_id.clone(),
            step: cmd.step.clone(),
            idempotency_key: cmd.idempotency_key.clone(),
            outcome,
            detail: D::default(),
            undid: false,
            at_unix_ms: now_ms(),
        }
    }

    /// Encodes this entry in its envelope.
    pub fn encode(&self) -> Result<Vec<u8>, postcard::Error> {
        postcard::to_stdvec(&Stored::V1(self.clone()))
    }

    /// Decodes an envelope.
    pub fn decode(bytes: &[u8]) -> Result<Self, postcard::Error> {
        match postcard::from_bytes::<Stored<D>>(bytes)? {
            Stored::V1(e) => Ok(e),
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
            sagaflow_proto::hash::fnv1a(idempotency_key.as_bytes())
        ));
    }
    format!("{service}.{clean}")
}

/// What [`Ledger::begin_undo`] found.
#[derive(Debug)]
pub enum Undo<D> {
    /// The compensation was recorded before: its answer.
    Answered(Outcome),
    /// The forward entry (voided now if it had not arrived) and the undo entry to complete
    /// and record, with `undid` set when there is a successful effect to undo.
    Pending {
        /// The forward entry.
        forward: Box<Entry<D>>,
        /// The compensation's entry.
        entry: Box<Entry<D>>,
    },
}

/// Why the ledger's bucket could not be opened.
#[derive(Debug, thiserror::Error)]
#[error("cannot open the ledger bucket `{bucket}`")]
pub struct OpenError {
    /// The bucket.
    pub bucket: String,
    /// The server's or the connection's error.
    #[source]
    pub source: jetstream::context::CreateKeyValueError,
}

/// A ledger in a KV bucket (see the [module docs](self)). Cheap to clone.
#[derive(Debug)]
pub struct Ledger<D = ()> {
    /// `None`: stateless, nothing is recorded.
    kv: Option<kv::Store>,
    _detail: PhantomData<fn() -> D>,
}

impl<D> Clone for Ledger<D> {
    fn clone(&self) -> Self {
        Ledger {
            kv: self.kv.clone(),
            _detail: PhantomData,
        }
    }
}

impl<D: Serialize + DeserializeOwned + Clone + Default> Ledger<D> {
    /// Opens the bucket `bucket`, creating it (file storage, history 1, `replicas` replicas)
    /// if it does not exist.
    pub async fn open(
        js: &jetstream::Context,
        bucket: &str,
        replicas: usize,
    ) -> Result<Self, OpenError> {
        let kv = match js.get_key_value(bucket).await {
            Ok(kv) => kv,
            Err(_) => {
                let config = kv::Config {
                    bucket: bucket.to_string(),
                    description:
                        "participant ledger: one entry per effect, keyed by idempotency key"
                            .to_string(),
                    history: 1,
                    storage: stream::StorageType::File,
                    num_replicas: replicas.max(1),
                    ..Default::default()
                };
                match js.create_key_value(config).await {
                    Ok(kv) => kv,
                    // Another instance created it first.
                    Err(source) => js.get_key_value(bucket).await.map_err(|_| OpenError {
                        bucket: bucket.to_string(),
                        source,
                    })?,
                }
            }
        };
        Ok(Ledger {
            kv: Some(kv),
            _detail: PhantomData,
        })
    }

    /// A ledger that records nothing: `get` finds nothing and `create` always succeeds, so
    /// every command is answered as if it were the first, from the command alone.
    pub fn stateless() -> Self {
        Ledger {
            kv: None,
            _detail: PhantomData,
        }
    }

    /// The entry of `service` for `idempotency_key`, if any.
    pub async fn get(
        &self,
        service: &str,
        idempotency_key: &str,
    ) -> Result<Option<Entry<D>>, Unavailable> {
        let Some(kv) = &self.kv else {
            return Ok(None);
        };
        let key = ledger_key(service, idempotency_key);
        let entry = kv
            .entry(key.clone())
            .await
            .map_err(|e| Unavailable(format!("cannot read the ledger: {e}")))?;
        match entry {
            Some(e) if e.operation == kv::Operation::Put => Entry::decode(&e.value)
                .map(Some)
                .map_err(|err| Unavailable(format!("corrupt ledger entry `{key}`: {err}"))),
            _ => Ok(None),
        }
    }

    /// Records `entry` unless its key exists. `Ok(None)`: recorded; `Ok(Some(existing))`: the
    /// key was taken first, by `existing`.
    pub async fn create(&self, entry: &Entry<D>) -> Result<Option<Entry<D>>, Unavailable> {
        let Some(kv) = &self.kv else {
            return Ok(None);
        };
        let bytes = entry
            .encode()
            .map_err(|e| Unavailable(format!("cannot encode ledger entry: {e}")))?;
        let key = ledger_key(&entry.service, &entry.idempotency_key);
        match kv.create(key, bytes.into()).await {
            Ok(_) => Ok(None),
            Err(e) if create_conflict(&e) => {
                match self.get(&entry.service, &entry.idempotency_key).await? {
                    Some(existing) => Ok(Some(existing)),
                    None => Err(Unavailable(
                        "ledger entry exists but cannot be read back".to_string(),
                    )),
                }
            }
            Err(e) => Err(Unavailable(format!("cannot write the ledger: {e}"))),
        }
    }

    /// Records `entry`, or answers what the entry that got there first recorded.
    pub async fn record(&self, entry: Entry<D>) -> Result<Outcome, Unavailable> {
        Ok(match self.create(&entry).await? {
            None => entry.outcome.to_outcome(),
            Some(existing) => existing.outcome.to_outcome(),
        })
    }

    /// The forward entry a compensation undoes: the existing one, or a `Voided` entry created
    /// now so that the late forward command is refused.
    pub async fn forward_or_void(
        &self,
        service: &str,
        forward_action: &str,
        cmd: &v1::Command,
        forward_key: &str,
    ) -> Result<Entry<D>, Unavailable> {
        if let Some(existing) = self.get(service, forward_key).await? {
            return Ok(existing);
        }
        let mut void = Entry::for_command(service, forward_action, cmd, Recorded::Voided);
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
    /// compensation's own key (a repeat), or else the forward entry it undoes (voided now if
    /// the forward command has not arrived) and the entry to record for the undo.
    pub async fn begin_undo(
        &self,
        service: &str,
        forward_action: &str,
        undo_action: &str,
        cmd: &v1::Command,
        forward_key: &str,
    ) -> Result<Undo<D>, Unavailable> {
        if let Some(existing) = self.get(service, &cmd.idempotency_key).await? {
            return Ok(Undo::Answered(existing.outcome.to_outcome()));
        }
        let forward = self
            .forward_or_void(service, forward_action, cmd, forward_key)
            .await?;
        let mut entry = Entry::for_command(service, undo_action, cmd, Recorded::Voided);
        entry.undid = forward.outcome.is_success();
        Ok(Undo::Pending {
            forward: Box::new(forward),
            entry: Box::new(entry),
        })
    }

    /// A forward command, exactly once: a repeat is answered from its entry (`voided` if a
    /// compensation came first); otherwise `work` runs and its outcome is recorded when final
    /// (if another delivery recorded first, that answer wins).
    pub async fn forward<F, Fut>(&self, cmd: &v1::Command, work: F) -> Result<Outcome, Unavailable>
    where
        F: FnOnce() -> Fut,
        Fut: Future<Output = Result<(Outcome, D), Unavailable>>,
    {
        if let Some(existing) = self.get(&cmd.service, &cmd.idempotency_key).await? {
            return Ok(existing.outcome.to_outcome());
        }
        let (outcome, detail) = work().await?;
        let Some(recorded) = Recorded::of(&outcome) else {
            return Ok(outcome);
        };
        let mut entry = Entry::for_command(&cmd.service, &cmd.action, cmd, recorded);
        entry.detail = detail;
        self.record(entry).await
    }

    /// A compensation, exactly once: a repeat is answered from its entry; otherwise the
    /// forward entry is looked up (its key voided if the forward command has not arrived), and
    /// `undo` runs with it when the forward effect happened (`Some`, a success), or with
    /// `None` when there is nothing to undo; its outcome is recorded when final.
    /// `forward_action` names the action a voided entry blocks.
    pub async fn compensate<F, Fut>(
        &self,
        cmd: &v1::Command,
        forward_action: &str,
        undo: F,
    ) -> Result<Outcome, Unavailable>
    where
        F: FnOnce(Option<Entry<D>>) -> Fut,
        Fut: Future<Output = Result<(Outcome, D), Unavailable>>,
    {
        let Some(forward) = forward_key(cmd) else {
            return Ok(Outcome::failure(
                "invalid",
                "compensation without the key of the step it undoes",
            ));
        };
        let (forward, mut entry) = match self
            .begin_undo(&cmd.service, forward_action, &cmd.action, cmd, &forward)
            .await?
        {
            Undo::Answered(outcome) => return Ok(outcome),
            Undo::Pending { forward, entry } => (*forward, *entry),
        };
        let done = forward.outcome.is_success().then_some(forward);
        let (outcome, detail) = undo(done).await?;
        let Some(recorded) = Recorded::of(&outcome) else {
            return Ok(outcome);
        };
        entry.outcome = recorded;
        entry.detail = detail;
        self.record(entry).await
    }

    /// Every entry (reads every key: for tests and small ledgers).
    pub async fn entries(&self) -> Result<Vec<Entry<D>>, Unavailable> {
        let Some(kv) = &self.kv else {
            return Ok(Vec::new());
        };
        let failed =
            |e: &dyn std::fmt::Display| Unavailable(format!("cannot read the ledger: {e}"));
        let keys: Vec<String> = match kv.keys().await {
            Ok(keys) => keys.try_collect().await.map_err(|e| failed(&e))?,
            Err(e) => return Err(failed(&e)),
        };
        let mut entries = Vec::with_capacity(keys.len());
        for key in keys {
            let Some(bytes) = kv.get(key.clone()).await.map_err(|e| failed(&e))? else {
                continue;
            };
            let entry = Entry::decode(&bytes)
                .map_err(|e| Unavailable(format!("corrupt ledger entry `{key}`: {e}")))?;
            entries.push(entry);
        }
        Ok(entries)
    }
}

/// Whether a failed KV `create` means the key already exists (a lost race, not an outage).
///
/// In a clustered JetStream, NATS ≥ 2.12 reports a lost compare-and-set with error code 10164
/// (`wrong last sequence`, constant message), which async-nats 0.51 does not map to
/// `AlreadyExists`/`WrongLastRevision`; the source chain is checked too.
pub fn create_conflict(e: &kv::CreateError) -> bool {
    e.kind() == kv::CreateErrorKind::AlreadyExists || wrong_last_sequence(e)
}

/// Whether a failed KV `update` means the revision moved on (a lost compare-and-set).
pub fn update_conflict(e: &kv::UpdateError) -> bool {
    e.kind() == kv::UpdateErrorKind::WrongLastRevision || wrong_last_sequence(e)
}

fn wrong_last_sequence(e: &(dyn std::error::Error + 'static)) -> bool {
    use async_nats::jetstream::ErrorCode;
    let mut current = Some(e);
    while let Some(err) = current {
        if let Some(js) = err.downcast_ref::<async_nats::jetstream::Error>() {
            let code = js.error_code();
            if code == ErrorCode::STREAM_WRONG_LAST_SEQUENCE
                || code == ErrorCode::STREAM_WRONG_LAST_SEQUENCE_CONSTANT
            {
                return true;
            }
        }
        current = err.source();
    }
    false
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

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
    fn only_final_outcomes_are_recorded() {
        assert_eq!(Recorded::of(&Outcome::unavailable("db down")), None);
        assert_eq!(
            Recorded::of(&Outcome::failure("sold_out", "full")),
            Some(Recorded::Failure {
                kind: "sold_out".into(),
                message: "full".into()
            })
        );
        assert!(Recorded::of(&Outcome::success(b"{}".to_vec()))
            .unwrap()
            .is_success());
        assert!(matches!(
            Recorded::Voided.to_outcome(),
            Outcome::Failure { kind, .. } if kind == VOIDED
        ));
    }

    #[test]
    fn entries_round_trip_with_a_detail() {
        #[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
        struct Room {
            number: u32,
        }
        let cmd = v1::Command {
            saga_id: "t-1".into(),
            step: "book_hotel".into(),
            idempotency_key: "t-1/book_hotel".into(),
            ..Default::default()
        };
        let mut e: Entry<Room> =
            Entry::for_command("hotel", "book", &cmd, Recorded::Success { output: vec![] });
        e.detail.number = 12;
        assert_eq!(Entry::<Room>::decode(&e.encode().unwrap()).unwrap(), e);
    }
}
