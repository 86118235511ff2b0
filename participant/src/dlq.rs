//! Dead letters: a message that can never be processed is published to `SAGA_DLQ` on
//! `sagaflow.dlq.<source>` with its original bytes and headers saying why, where it came from
//! and when; only once the server has stored the dead letter is the original acked. If the
//! publish fails, the original is nak'ed instead: nothing is dropped silently.

use std::time::Duration;

use async_nats::jetstream::{self, AckKind};
use async_nats::HeaderMap;
use sagaflow_proto::subjects::dlq_subject;

use crate::now_ms;

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

/// Header: the original payload's size, when the dead letter holds only its first bytes (it
/// was too large to be stored with the dead letter's headers).
pub const TRUNCATED: &str = "Sagaflow-Dlq-Truncated";

/// Bytes of the server's max payload kept for the protocol's header framing and the headers
/// added after the size is taken.
const DLQ_HEADROOM: usize = 1024;

/// Whether `name` is one of the headers [`dead_letter`] adds (`Sagaflow-Dlq-*`).
pub fn is_dlq_header(name: &str) -> bool {
    name.len() >= "Sagaflow-Dlq-".len()
        && name[.."Sagaflow-Dlq-".len()].eq_ignore_ascii_case("Sagaflow-Dlq-")
}

/// Whether `name` is a NATS-reserved header (`Nats-Msg-Id`, `Nats-Expected-*`…): never copied
/// into a dead letter nor into a replay (an old `Nats-Msg-Id` would make the server drop the
/// replay as a duplicate).
pub fn is_nats_header(name: &str) -> bool {
    name.len() >= 5 && name[..5].eq_ignore_ascii_case("Nats-")
}

/// Copies the headers of `from` into `to`, except NATS-reserved and `Sagaflow-Dlq-*` ones.
pub fn copy_user_headers(from: Option<&HeaderMap>, to: &mut HeaderMap) {
    let Some(from) = from else { return };
    for (name, values) in from.iter() {
        let text = name.to_string();
        if is_nats_header(&text) || is_dlq_header(&text) {
            continue;
        }
        for value in values {
            to.append(text.as_str(), value.as_str());
        }
    }
}

/// `text` as a header value: one line (header values cannot hold newlines), at most 1024
/// characters.
pub fn header_value(text: &str) -> String {
    text.chars()
        .map(|c| if c.is_control() { ' ' } else { c })
        .take(1024)
        .collect()
}

/// Publishes `message` to the DLQ with `reason`, then acks it (or naks it if that failed).
pub async fn dead_letter(
    js: &jetstream::Context,
    source: &str,
    message: &jetstream::Message,
    reason: &str,
) {
    let mut headers = HeaderMap::new();
    copy_user_headers(message.headers.as_ref(), &mut headers);
    let clean = header_value(reason);
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
    // The dead letter carries the original bytes and more headers than the original: an
    // original near the server's max payload would not fit, and a dead letter that cannot be
    // stored would be retried forever. Past the room left, the payload is cut and says so.
    let header_bytes: usize = headers
        .iter()
        .map(|(name, values)| {
            values
                .iter()
                .map(|v| AsRef::<str>::as_ref(name).len() + v.as_str().len() + 4)
                .sum::<usize>()
        })
        .sum();
    let room = js
        .client()
        .server_info()
        .max_payload
        .saturating_sub(header_bytes + DLQ_HEADROOM);
    let mut payload = message.payload.clone();
    if payload.len() > room {
        headers.insert(TRUNCATED, payload.len().to_string().as_str());
        payload.truncate(room);
    }
    let published = match js
        .publish_with_headers(dlq_subject(source), headers, payload)
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
