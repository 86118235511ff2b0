//! The loop every durable pull consumer runs (a participant's, and each of a node's): open (or re-open) the consumer with
//! capped backoff, pull with explicit heartbeats and expiry, hand each message on, and stop
//! promptly when cancelled.
//!
//! Heartbeat and expiry are set explicitly: without them a pull stream sends no idle
//! heartbeat and a dead connection goes unnoticed. A missed heartbeat surfaces as a stream
//! error: it is logged and the pull subscription reopened, never treated as a crash.

use std::future::Future;
use std::time::Duration;

use crate::pool::restart_backoff;
use async_nats::jetstream::{self, consumer::PullConsumer};
use futures::{FutureExt, StreamExt};
use tokio_util::sync::CancellationToken;

/// Why a durable pull consumer could not be opened.
#[derive(Debug, thiserror::Error)]
pub enum OpenError {
    /// The stream could not be looked up.
    #[error("cannot find stream `{stream}`")]
    Stream {
        /// The stream.
        stream: String,
        /// The server's or the connection's error.
        #[source]
        source: jetstream::context::GetStreamError,
    },
    /// The consumer could not be created or updated.
    #[error("cannot create consumer `{consumer}` on stream `{stream}`")]
    Consumer {
        /// The stream.
        stream: String,
        /// The consumer's durable name.
        consumer: String,
        /// The server's or the connection's error.
        #[source]
        source: jetstream::stream::ConsumerError,
    },
}

/// Creates (or updates to `config`) the durable pull consumer of `stream`.
pub async fn open_durable(
    js: &jetstream::Context,
    stream: &str,
    config: jetstream::consumer::pull::Config,
) -> Result<PullConsumer, OpenError> {
    let consumer = config.durable_name.clone().unwrap_or_default();
    js.get_stream(stream)
        .await
        .map_err(|source| OpenError::Stream {
            stream: stream.to_string(),
            source,
        })?
        .create_consumer(config)
        .await
        .map_err(|source| OpenError::Consumer {
            stream: stream.to_string(),
            consumer,
            source,
        })
}

/// What the message handler wants next.
pub enum Flow {
    /// Keep pulling.
    Continue,
    /// Stop this consumer for good (its receiver is gone).
    Stop,
}

/// Pulls from the consumer `open` returns, `batch` messages per pull request, passing each to
/// `handle`, until `cancel` fires or `handle` says [`Flow::Stop`].
pub async fn pull_forever<O, OF, E, H, HF>(
    what: &str,
    batch: usize,
    cancel: CancellationToken,
    mut open: O,
    mut handle: H,
) where
    O: FnMut() -> OF,
    OF: Future<Output = Result<PullConsumer, E>>,
    E: Into<Box<dyn std::error::Error + Send + Sync>>,
    H: FnMut(jetstream::Message) -> HF,
    HF: Future<Output = Flow>,
{
    let mut failures = 0u32;
    // Reopenings since the last message handled: the first few for "no responders" are what a
    // consumer whose stream or leader is still being set up answers (a cluster starting), and
    // are not worth a warning.
    let mut quiet_reopens = 0u32;
    while !cancel.is_cancelled() {
        let consumer = match open().await {
            Ok(c) => c,
            Err(e) => {
                failures += 1;
                let delay = restart_backoff(failures);
                let e: Box<dyn std::error::Error + Send + Sync> = e.into();
                tracing::warn!(consumer = what, error = %crate::error_chain(&*e), ?delay, "cannot open consumer, retrying");
                tokio::select! { _ = cancel.cancelled() => return, _ = tokio::time::sleep(delay) => continue }
            }
        };
        let messages = consumer
            .stream()
            .max_messages_per_batch(batch)
            .heartbeat(Duration::from_secs(5))
            .expires(Duration::from_secs(30))
            .messages()
            .await;
        let mut messages = match messages {
            Ok(m) => m,
            Err(e) => {
                failures += 1;
                let delay = restart_backoff(failures);
                tracing::warn!(consumer = what, error = %e, ?delay, "cannot pull, retrying");
                tokio::select! { _ = cancel.cancelled() => return, _ = tokio::time::sleep(delay) => continue }
            }
        };
        failures = 0;
        loop {
            // `next()` on the pull stream is cancel-safe: a message is only taken when returned.
            let next = tokio::select! {
                _ = cancel.cancelled() => {
                    give_back(what, &mut messages).await;
                    return;
                }
                n = messages.next() => n,
            };
            match next {
                Some(Ok(message)) => {
                    quiet_reopens = 0;
                    if let Flow::Stop = handle(message).await {
                        give_back(what, &mut messages).await;
                        return;
                    }
                }
                // A missed heartbeat or another stream error: the pull subscription may be
                // dead (its server went away, the consumer leader moved). Open a fresh one
                // rather than wait on it.
                Some(Err(e)) => {
                    if e.to_string().contains("no responders") && quiet_reopens < QUIET_REOPENS {
                        tracing::debug!(consumer = what, error = %e, "consumer not served yet, reopening");
                    } else {
                        tracing::warn!(consumer = what, error = %e, "pull stream error, reopening");
                    }
                    quiet_reopens += 1;
                    break;
                }
                None => break,
            }
        }
    }
}

/// "No responders" reopenings in a row logged at debug before they are warned about.
const QUIET_REOPENS: u32 = 10;

/// Naks the messages already delivered to this pull subscription but not yet handed on, so
/// JetStream redelivers them at once (to another instance) instead of after `ack_wait`.
async fn give_back(what: &str, messages: &mut async_nats::jetstream::consumer::pull::Stream) {
    let mut given = 0usize;
    while let Some(Some(Ok(message))) = messages.next().now_or_never() {
        let nak = async_nats::jetstream::AckKind::Nak(None);
        if let Err(e) = message.ack_with(nak).await {
            tracing::debug!(consumer = what, error = %e, "cannot give a message back");
        }
        given += 1;
    }
    if given > 0 {
        tracing::debug!(consumer = what, given, "pulled messages given back");
    }
}
