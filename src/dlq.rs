//! Dead letters and message acknowledgement.
//!
//! A message that can never be processed is published to `SAGA_DLQ` on
//! `sagaflow.dlq.<source>` with its original bytes as the payload and headers saying why,
//! where it came from and when; only once the server has stored the dead letter is the
//! original acked. If the DLQ publish fails, the original is nak'ed instead: nothing is
//! dropped silently.
//!
//! Headers of the original message other than `Nats-*` ones travel with it into the dead
//! letter (so a replay carries them again, `Sagaflow-Replayed-From` included). Operators list,
//! show, replay and discard dead letters through `AdminService` (`src/grpc/admin.rs`); what
//! they did is journaled as JSON [`JournalRecord`]s on [`JOURNAL_SUBJECT`], inside `SAGA_DLQ`.

use std::sync::Arc;
use std::time::Duration;

use async_nats::jetstream::{self, AckKind};
use async_nats::HeaderMap;
use async_trait::async_trait;
use sagaflow_actors::ports::Delivery;

use crate::clock::now_ms;

// The dead letter itself (headers, size cap, ack after the store) is the participant SDK's:
// participants dead-letter malformed commands the same way.
pub use sagaflow_participant::dlq::{
    copy_user_headers, dead_letter, header_value, is_dlq_header, is_nats_header, AT, ORIGIN,
    REASON, SOURCE, SUBJECT, TRUNCATED,
};

/// Header of a replayed message: the dead letter it came from (`SAGA_DLQ:7`).
pub const REPLAYED_FROM: &str = "Sagaflow-Replayed-From";

/// Subject (inside `SAGA_DLQ`) of the journal of replays and discards.
pub const JOURNAL_SUBJECT: &str = "sagaflow.dlq.journal";

/// The headers a replay of a dead letter is published with: the dead letter's own headers
/// minus the `Sagaflow-Dlq-*` and `Nats-*` ones, plus `Sagaflow-Replayed-From: SAGA_DLQ:<seq>`
/// and a `Nats-Msg-Id` of `replay/SAGA_DLQ:<seq>` (so a retried replay is stored once).
pub fn replay_headers(dead_letter: &HeaderMap, seq: u64) -> HeaderMap {
    let mut headers = HeaderMap::new();
    copy_user_headers(Some(dead_letter), &mut headers);
    let from = format!("{}:{seq}", crate::topology::DLQ_STREAM);
    headers.insert(REPLAYED_FROM, from.as_str());
    headers.insert(
        async_nats::header::NATS_MESSAGE_ID,
        format!("replay/{from}").as_str(),
    );
    headers
}

/// One entry of the journal on [`JOURNAL_SUBJECT`]: what an operator did to a dead letter.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct JournalRecord {
    /// The dead letter's sequence in `SAGA_DLQ`.
    pub seq: u64,
    /// `replay`, `discard` or `resolved` (see [`ACTION_RESOLVED`]).
    pub action: String,
    /// Who did it.
    pub operator: String,
    /// Why (discards only).
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub reason: String,
    /// When, unix ms.
    pub at: i64,
    /// The dead letter's source (`events`, `commands`…), for the reader's convenience.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub source: String,
    /// The dead letter's original subject.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub subject: String,
}

/// Journal action of a replay.
pub const ACTION_REPLAY: &str = "replay";
/// Journal action of a discard.
pub const ACTION_DISCARD: &str = "discard";
/// Journal action of a parked saga's dead letter settled because an operator resumed the saga
/// by other means.
pub const ACTION_RESOLVED: &str = "resolved";

/// A header's value as text (empty when absent).
pub fn header_text(headers: &HeaderMap, name: &str) -> String {
    headers
        .get(name)
        .map(|v| v.as_str().to_string())
        .unwrap_or_default()
}

/// Source of the dead letters of parked sagas.
pub const SOURCE_PARKED: &str = "saga";

/// Reports parked sagas as dead letters on `sagaflow.dlq.saga`: the payload is a control event
/// that retries the compensation that parked the saga, published (on replay) on the saga's
/// `intervene` event subject. Ids are per (saga, parking), so a dead letter written again after
/// a crash is stored once (within the duplicate window) and a replay applied twice counts once.
pub struct DlqParker {
    js: jetstream::Context,
    partitions: u32,
}

impl DlqParker {
    /// A parker publishing into `SAGA_DLQ`.
    pub fn new(js: jetstream::Context, partitions: u32) -> Self {
        DlqParker { js, partitions }
    }
}

/// A transport error of `operation`.
fn transport(operation: &'static str, e: &dyn std::fmt::Display) -> sagaflow_actors::ports::Error {
    sagaflow_actors::ports::Error::Transport {
        operation,
        message: e.to_string(),
    }
}

impl DlqParker {
    /// The dead-letter stream, for `operation`.
    async fn stream(
        &self,
        operation: &'static str,
    ) -> Result<jetstream::stream::Stream, sagaflow_actors::ports::Error> {
        self.js
            .get_stream(crate::topology::DLQ_STREAM)
            .await
            .map_err(|e| transport(operation, &e))
    }

    /// Whether the latest dead letter of `saga_id` is the one with id `msg_id`.
    async fn already_parked(
        &self,
        saga_id: &str,
        msg_id: &str,
    ) -> Result<bool, sagaflow_actors::ports::Error> {
        const OPERATION: &str = "look up parked saga's dead letter";
        let unavailable = |e: &dyn std::fmt::Display| transport(OPERATION, e);
        let stream = self.stream(OPERATION).await?;
        let subject = crate::topology::parked_dlq_subject(saga_id);
        match stream.get_last_raw_message_by_subject(&subject).await {
            Ok(m) => {
                Ok(header_text(&m.headers, async_nats::header::NATS_MESSAGE_ID.as_ref()) == msg_id)
            }
            Err(e)
                if matches!(
                    e.kind(),
                    async_nats::jetstream::stream::LastRawMessageErrorKind::NoMessageFound
                ) =>
            {
                Ok(false)
            }
            Err(e) => Err(unavailable(&e)),
        }
    }
}

#[async_trait]
impl sagaflow_actors::ports::Parker for DlqParker {
    async fn park(
        &self,
        saga: &sagaflow_actors::machine::Saga,
        reason: &str,
        count: u32,
    ) -> Result<(), sagaflow_actors::ports::Error> {
        use sagaflow_actors::machine::{Intervention, OperatorAction};
        use sagaflow_actors::wire::{self, Control};
        let unavailable = |e: &dyn std::fmt::Display| sagaflow_actors::ports::Error::Transport {
            operation: "dead-letter parked saga",
            message: e.to_string(),
        };
        let control = Control::Intervene {
            intervention: Intervention {
                id: format!(
                    "{}park/{}/{count}",
                    sagaflow_actors::machine::REPLAY_REQUEST_PREFIX,
                    saga.id
                ),
                action: OperatorAction::Retry { step: None },
                operator: "dlq-replay".to_string(),
                reason: format!("replay of the dead letter of parking {count}"),
            },
            at: now_ms(),
        };
        let payload = wire::encode_control(&control).map_err(|e| unavailable(&e))?;
        let msg_id = format!("park/{}/{count}", saga.id);
        // Written again at every recovery of the parked saga: once it is in the stream (the
        // server's duplicate window is only minutes long), it is not written twice.
        if self.already_parked(&saga.id, &msg_id).await? {
            return Ok(());
        }
        let partition = sagaflow_actors::hash::partition_of(&saga.id, self.partitions);
        let subject = crate::topology::event_subject(partition, "intervene");
        let clean = header_value(reason);
        let mut headers = HeaderMap::new();
        // Kept by a replay (it is not a dead-letter header): the replayed event names its saga.
        headers.insert(crate::topology::SAGA_ID_HEADER, saga.id.as_str());
        headers.insert(
            REASON,
            format!("saga `{}` parked NEEDS_ATTENTION: {clean}", saga.id).as_str(),
        );
        headers.insert(SUBJECT, subject.as_str());
        headers.insert(SOURCE, SOURCE_PARKED);
        headers.insert(AT, now_ms().to_string().as_str());
        headers.insert(
            ORIGIN,
            format!(
                "{}:{}",
                crate::topology::SAGAS_BUCKET,
                crate::topology::saga_key(partition, &saga.id)
            )
            .as_str(),
        );
        headers.insert(async_nats::header::NATS_MESSAGE_ID, msg_id.as_str());
        self.js
            .publish_with_headers(
                crate::topology::parked_dlq_subject(&saga.id),
                headers,
                payload.into(),
            )
            .await
            .map_err(|e| unavailable(&e))?
            .await
            .map_err(|e| unavailable(&e))?;
        Ok(())
    }

    async fn unpark(
        &self,
        saga: &sagaflow_actors::machine::Saga,
        operator: &str,
        action: &str,
    ) -> Result<(), sagaflow_actors::ports::Error> {
        const OPERATION: &str = "settle parked saga's dead letters";
        let unavailable = |e: &dyn std::fmt::Display| transport(OPERATION, e);
        let stream = self.stream(OPERATION).await?;
        let subject = crate::topology::parked_dlq_subject(&saga.id);
        // A saga is parked a few times at most: this loop is short.
        loop {
            let m = match stream.get_first_raw_message_by_subject(&subject, 1).await {
                Ok(m) => m,
                Err(e)
                    if matches!(
                        e.kind(),
                        async_nats::jetstream::stream::RawMessageErrorKind::NoMessageFound
                    ) =>
                {
                    return Ok(());
                }
                Err(e) => return Err(unavailable(&e)),
            };
            journal(
                &self.js,
                &JournalRecord {
                    seq: m.sequence,
                    action: ACTION_RESOLVED.to_string(),
                    operator: operator.to_string(),
                    reason: format!("saga resumed by `{action}`"),
                    at: now_ms(),
                    source: SOURCE_PARKED.to_string(),
                    subject: header_text(&m.headers, SUBJECT),
                },
            )
            .await
            .map_err(|e| unavailable(&crate::telemetry::error_chain(&e)))?;
            match stream.delete_message(m.sequence).await {
                Ok(_) => {}
                Err(e) if matches!(e.kind(), async_nats::jetstream::stream::DeleteMessageErrorKind::JetStream(ref j) if j.error_code() == async_nats::jetstream::ErrorCode::NO_MESSAGE_FOUND) =>
                    {}
                Err(e) => return Err(unavailable(&e)),
            }
        }
    }
}

/// A NATS call of the dead-letter paths failed: what was being done, and the server's or
/// client's error as its source.
#[derive(Debug, thiserror::Error)]
#[error("cannot {what}")]
pub struct CallError {
    /// What was being done (`publish the journal record`).
    pub what: &'static str,
    /// Why it failed.
    #[source]
    pub source: Box<dyn std::error::Error + Send + Sync>,
}

impl CallError {
    /// Wraps an error of the call doing `what`, for `map_err`.
    pub fn of<E>(what: &'static str) -> impl FnOnce(E) -> CallError
    where
        E: std::error::Error + Send + Sync + 'static,
    {
        move |e| CallError {
            what,
            source: Box::new(e),
        }
    }
}

/// Writes `record` to the journal (de-duplicated per dead letter and action); returns its
/// sequence in `SAGA_DLQ`.
pub async fn journal(js: &jetstream::Context, record: &JournalRecord) -> Result<u64, CallError> {
    let payload = serde_json::to_vec(record).map_err(CallError::of("encode the journal record"))?;
    let mut headers = HeaderMap::new();
    headers.insert(
        async_nats::header::NATS_MESSAGE_ID,
        format!("journal/{}/{}", record.action, record.seq).as_str(),
    );
    let what = "publish the journal record";
    let ack = js
        .publish_with_headers(JOURNAL_SUBJECT, headers, payload.into())
        .await
        .map_err(CallError::of(what))?
        .await
        .map_err(CallError::of(what))?;
    Ok(ack.sequence)
}

/// A delivered JetStream message as a [`Delivery`]. Dead letters go out through the message's
/// own JetStream context. The message is shared (`Arc`) with whoever else needs it (a command's
/// job and its fallback), so handing it around copies no headers and clones no context.
pub struct JsDelivery {
    /// The message.
    pub message: Arc<jetstream::Message>,
    /// Consumer name for the DLQ `source`.
    pub source: &'static str,
}

#[async_trait]
impl Delivery for JsDelivery {
    async fn ack(self: Box<Self>) {
        if let Err(e) = self.message.ack().await {
            // The message will be redelivered after ack_wait; handlers are idempotent.
            tracing::warn!(subject = %self.message.subject, error = %e, "ack failed");
        }
    }

    async fn nak(self: Box<Self>, delay: Duration) {
        sagaflow_participant::nak(&self.message, delay).await;
    }

    async fn in_progress(&self) {
        let _ = self.message.ack_with(AckKind::Progress).await;
    }

    fn delivered(&self) -> u32 {
        self.message
            .info()
            .map_or(1, |i| u32::try_from(i.delivered).unwrap_or(u32::MAX))
    }

    async fn dead_letter(self: Box<Self>, reason: String) {
        dead_letter(&self.message.context, self.source, &self.message, &reason).await;
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn replay_headers_drop_dlq_and_nats_ones() {
        let mut h = HeaderMap::new();
        h.insert(REASON, "bad");
        h.insert(SUBJECT, "sagaflow.evt.1.x.reply");
        h.insert(async_nats::header::NATS_MESSAGE_ID, "dlq/SAGA_EVENTS:3");
        h.insert("traceparent", "00-abc");
        let r = replay_headers(&h, 7);
        assert_eq!(header_text(&r, REPLAYED_FROM), "SAGA_DLQ:7");
        assert_eq!(header_text(&r, "Nats-Msg-Id"), "replay/SAGA_DLQ:7");
        assert_eq!(header_text(&r, "traceparent"), "00-abc");
        assert!(r.get(REASON).is_none() && r.get(SUBJECT).is_none());
        assert!(is_dlq_header("sagaflow-dlq-at") && !is_dlq_header("Sagaflow"));
        assert!(is_nats_header("NATS-Expected-Stream") && !is_nats_header("Nat"));
    }

    #[test]
    fn journal_records_are_small_json() {
        let r = JournalRecord {
            seq: 4,
            action: ACTION_DISCARD.into(),
            operator: "ops".into(),
            reason: "test data".into(),
            at: 1,
            source: String::new(),
            subject: String::new(),
        };
        let text = serde_json::to_string(&r).unwrap();
        assert_eq!(
            text,
            r#"{"seq":4,"action":"discard","operator":"ops","reason":"test data","at":1}"#
        );
        assert_eq!(serde_json::from_str::<JournalRecord>(&text).unwrap(), r);
    }
}
