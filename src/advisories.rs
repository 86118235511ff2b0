//! Commands that exhausted their deliveries go to the dead-letter stream.
//!
//! JetStream stops redelivering a command after the consumer's `max_deliver` and announces it
//! with a max-deliveries advisory. Advisories are core NATS messages (lost if nobody listens
//! at that moment), so the stream `SAGA_ADVISORIES` captures the ones about `SAGA_COMMANDS`,
//! and a durable consumer shared by every node turns each into a dead letter: the original
//! command (read back by stream sequence), the consumer, the delivery count and the reason.
//! The dead letter's `Nats-Msg-Id` is `dlq/SAGA_COMMANDS/<seq>`, so two nodes handling the
//! same advisory (a redelivery) store it once.

use std::time::Duration;

use async_nats::jetstream::{self, consumer, stream};
use async_nats::HeaderMap;
use serde::Deserialize;
use tokio_util::sync::CancellationToken;

use crate::clock::now_ms;
use crate::config::StreamsConfig;
use crate::consume::{pull_forever, Flow};
use crate::dlq::{copy_user_headers, CallError, AT, ORIGIN, REASON, SOURCE, SUBJECT};
use crate::topology::{self, dlq_subject, COMMANDS_STREAM};

/// Stream capturing max-deliveries advisories of the command stream.
pub const ADVISORIES_STREAM: &str = "SAGA_ADVISORIES";

/// Subject of the max-deliveries advisories of `SAGA_COMMANDS`' consumers.
pub fn max_deliveries_subject() -> String {
    format!("$JS.EVENT.ADVISORY.CONSUMER.MAX_DELIVERIES.{COMMANDS_STREAM}.*")
}

/// The fields of a max-deliveries advisory we use.
#[derive(Debug, Deserialize)]
pub struct MaxDeliveries {
    /// Stream of the message.
    pub stream: String,
    /// Consumer that gave up.
    pub consumer: String,
    /// Sequence of the message in its stream.
    pub stream_seq: u64,
    /// How many times it was delivered.
    pub deliveries: u64,
}

/// Creates the advisory stream.
pub async fn ensure(js: &jetstream::Context, cfg: &StreamsConfig) -> Result<(), topology::Error> {
    topology::ensure_stream(
        js,
        stream::Config {
            name: ADVISORIES_STREAM.to_string(),
            description: Some("max-deliveries advisories of the command consumers".to_string()),
            subjects: vec![max_deliveries_subject()],
            storage: stream::StorageType::File,
            num_replicas: cfg.replicas,
            max_age: cfg.dlq_max_age,
            ..Default::default()
        },
    )
    .await
}

async fn open(
    js: &jetstream::Context,
) -> Result<consumer::PullConsumer, crate::consume::OpenError> {
    crate::consume::open_durable(
        js,
        ADVISORIES_STREAM,
        consumer::pull::Config {
            durable_name: Some("dead-letterer".to_string()),
            description: Some("turns max-deliveries advisories into dead letters".to_string()),
            ack_policy: consumer::AckPolicy::Explicit,
            ack_wait: Duration::from_secs(30),
            ..Default::default()
        },
    )
    .await
}

/// Dead-letters the command an advisory names. Returns an error to retry later.
pub async fn dead_letter_exhausted(
    js: &jetstream::Context,
    advisory: &MaxDeliveries,
) -> Result<(), CallError> {
    let stream = js
        .get_stream(&advisory.stream)
        .await
        .map_err(CallError::of("look up the command's stream"))?;
    let (subject, original_headers, payload) = match stream
        .get_raw_message(advisory.stream_seq)
        .await
    {
        Ok(m) => (m.subject.to_string(), m.headers, m.payload),
        // Gone already (age limit): dead-letter the fact, with an empty payload.
        Err(e) => {
            tracing::warn!(seq = advisory.stream_seq, error = %e, "exhausted command no longer in its stream");
            (String::new(), HeaderMap::new(), bytes::Bytes::new())
        }
    };
    let mut headers = HeaderMap::new();
    copy_user_headers(Some(&original_headers), &mut headers);
    let reason = format!(
        "delivered {} times to consumer `{}` without being acked (max_deliver reached)",
        advisory.deliveries, advisory.consumer
    );
    headers.insert(REASON, reason.as_str());
    headers.insert(SUBJECT, subject.as_str());
    headers.insert(SOURCE, "commands");
    headers.insert(AT, now_ms().to_string().as_str());
    headers.insert(
        ORIGIN,
        format!("{}:{}", advisory.stream, advisory.stream_seq).as_str(),
    );
    headers.insert(
        async_nats::header::NATS_MESSAGE_ID,
        format!("dlq/{}/{}", advisory.stream, advisory.stream_seq).as_str(),
    );
    let what = "publish the dead letter";
    js.publish_with_headers(dlq_subject("commands"), headers, payload)
        .await
        .map_err(CallError::of(what))?
        .await
        .map_err(CallError::of(what))?;
    tracing::warn!(consumer = %advisory.consumer, seq = advisory.stream_seq, deliveries = advisory.deliveries, "exhausted command dead-lettered");
    Ok(())
}

/// Watches the advisories until `cancel`.
pub async fn run(js: jetstream::Context, cancel: CancellationToken) {
    pull_forever("dead-letterer", 64, cancel, || open(&js), |message| {
        let js = js.clone();
        async move {
            match serde_json::from_slice::<MaxDeliveries>(&message.payload) {
                Ok(advisory) => match dead_letter_exhausted(&js, &advisory).await {
                    Ok(()) => {
                        let _ = message.ack().await;
                    }
                    Err(e) => {
                        tracing::warn!(error = %crate::telemetry::error_chain(&e), "cannot dead-letter an exhausted command, retrying");
                        let _ = message.ack_with(jetstream::AckKind::Nak(Some(Duration::from_secs(2)))).await;
                    }
                },
                Err(e) => crate::dlq::dead_letter(&js, "advisories", &message, &format!("unreadable advisory: {e}")).await,
            }
            Flow::Continue
        }
    })
    .await;
}
