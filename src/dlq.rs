//! Dead letters and message acknowledgement.
//!
//! A message that can never be processed is published to `SAGA_DLQ` on
//! `sagaflow.dlq.<source>` with its original bytes as the payload and headers saying why,
//! where it came from and when; only once the server has stored the dead letter is the
//! original acked. If the DLQ publish fails, the original is nak'ed instead: nothing is
//! dropped silently.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use async_nats::jetstream::{self, AckKind};
use async_nats::HeaderMap;
use async_trait::async_trait;
use sagaflow_actors::ports::Delivery;

use crate::topology::dlq_subject;

/// Header: why the message was dead-lettered.
pub const REASON: &str = "Sagaflow-Dlq-Reason";
/// Header: the original subject.
pub const SUBJECT: &str = "Sagaflow-Dlq-Subject";
/// Header: the original stream and sequence (`SAGA_EVENTS:42`).
pub const ORIGIN: &str = "Sagaflow-Dlq-Origin";
/// Header: when it was dead-lettered (unix ms).
pub const AT: &str = "Sagaflow-Dlq-At";
/// Header: which consumer gave up on it (`events`, `payment`…).
pub const SOURCE: &str = "Sagaflow-Dlq-Source";

/// Unix milliseconds now.
pub fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
}

/// Publishes `message` to the DLQ with `reason`, then acks it (or naks it if that failed).
pub async fn dead_letter(
    js: &jetstream::Context,
    source: &str,
    message: &jetstream::Message,
    reason: &str,
) {
    let mut headers = HeaderMap::new();
    // Header values cannot hold newlines.
    let clean: String = reason
        .chars()
        .map(|c| if c.is_control() { ' ' } else { c })
        .take(1024)
        .collect();
    headers.insert(REASON, clean.as_str());
    headers.insert(SUBJECT, message.subject.as_str());
    headers.insert(SOURCE, source);
    headers.insert(AT, now_ms().to_string().as_str());
    if let Ok(info) = message.info() {
        headers.insert(
            ORIGIN,
            format!("{}:{}", info.stream, info.stream_sequence).as_str(),
        );
        headers.insert(
            async_nats::header::NATS_MESSAGE_ID,
            format!("dlq/{}/{}", info.stream, info.stream_sequence).as_str(),
        );
    }
    let published = match js
        .publish_with_headers(dlq_subject(source), headers, message.payload.clone())
        .await
    {
        Ok(ack) => ack.await.map(|_| ()).map_err(|e| e.to_string()),
        Err(e) => Err(e.to_string()),
    };
    match published {
        Ok(()) => {
            tracing::warn!(source, subject = %message.subject, reason = %clean, "message dead-lettered");
            if let Err(e) = message.ack().await {
                tracing::warn!(error = %e, "ack after dead-lettering failed; the message will come back");
            }
        }
        Err(e) => {
            tracing::error!(source, subject = %message.subject, error = %e, "cannot dead-letter message, returning it");
            let _ = message
                .ack_with(AckKind::Nak(Some(Duration::from_secs(5))))
                .await;
        }
    }
}

/// A delivered JetStream message as a [`Delivery`].
pub struct JsDelivery {
    /// The message.
    pub message: jetstream::Message,
    /// Where dead letters go.
    pub js: jetstream::Context,
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
        let delay = (!delay.is_zero()).then_some(delay);
        if let Err(e) = self.message.ack_with(AckKind::Nak(delay)).await {
            tracing::warn!(subject = %self.message.subject, error = %e, "nak failed");
        }
    }

    async fn in_progress(&self) {
        let _ = self.message.ack_with(AckKind::Progress).await;
    }

    async fn dead_letter(self: Box<Self>, reason: String) {
        dead_letter(&self.js, self.source, &self.message, &reason).await;
    }
}
