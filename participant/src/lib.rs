//! # sagaflow-participant: write a Sagaflow participant service in Rust
//!
//! A participant does one kind of work for sagas (charge a card, book a hotel). Sagaflow sends
//! it protobuf [`Command`]s over NATS JetStream and waits for one [`v1::Reply`] per command.
//! This crate does the protocol (`docs/participants.md`) so that a service is only its
//! business logic:
//!
//! ```text
//!  SAGA_COMMANDS ── consumer group svc-<service> ──▶ Runner ──▶ ServicePool (ractor)
//!                   (created or bound with the        │ bounded in hand  ├─ instance ─▶ Handler::handle
//!                    documented settings)             │ expired skipped  ├─ instance ─▶ …
//!                                                     ▼                  └─ (restarted on panic)
//!  SAGA_EVENTS ◀── Reply (Nats-Msg-Id reply/<command id>, traceparent) ── ack after the reply is stored
//! ```
//!
//! - [`Handler`]: your logic, `Command` in, [`Outcome`] out (or [`Unavailable`]: no answer
//!   now, the command comes back later).
//! - [`Runner`]: binds the service's durable consumer ([`ConsumerSettings`]), runs a
//!   supervised pool of instances, bounds the commands in hand, skips commands long past their
//!   deadline, replies, and acks only once the reply is stored; each command is handled in a
//!   `participant.handle` span continuing the saga's trace.
//! - [`ledger::Ledger`]: the idempotency ledger in a KV bucket, keyed by `idempotency_key`:
//!   final outcomes only, and forward keys voided by a compensation that arrives first.
//! - [`testing`] (feature `testing`): a real nats-server and the streams, to run a handler
//!   in tests.
//!
//! A whole service (see `examples/hotel.rs`):
//!
//! ```no_run
//! use sagaflow_participant::{async_trait, Command, Handler, Outcome, Runner, Unavailable};
//!
//! struct Hotel;
//!
//! #[async_trait]
//! impl Handler for Hotel {
//!     async fn handle(&self, cmd: &Command) -> Result<Outcome, Unavailable> {
//!         Ok(match cmd.action.as_str() {
//!             "book" | "cancel" => Outcome::success(br#"{"room": 12}"#.to_vec()),
//!             other => Outcome::failure("invalid", format!("unknown action {other}")),
//!         })
//!     }
//! }
//!
//! # async fn run() -> Result<(), Box<dyn std::error::Error>> {
//! let client = async_nats::connect("nats://127.0.0.1:4222").await?;
//! let js = async_nats::jetstream::new(client);
//! let cancel = tokio_util::sync::CancellationToken::new();
//! let running = Runner::new(js, "hotel", Hotel).start(cancel).await?;
//! tokio::signal::ctrl_c().await?;
//! running.shutdown().await;
//! # Ok(()) }
//! ```

pub mod command;
pub mod consume;
pub mod consumer;
pub mod dlq;
pub mod ledger;
pub mod pool;
pub mod runner;
#[cfg(feature = "testing")]
pub mod testing;
pub mod trace;

pub use async_trait::async_trait;
pub use sagaflow_proto::v1;
/// A command to a participant service (the protobuf message `sagaflow.v1.Command`).
pub use sagaflow_proto::v1::Command;

pub use consumer::ConsumerSettings;
pub use runner::{Runner, Running, StartError};

/// What a handler decided about one command.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// Done. `output` is optional JSON, recorded in the saga's history.
    Success(Vec<u8>),
    /// Refused for good (`declined`, `sold_out`): the ledger records it, so every retry and
    /// redelivery is answered the same. Use a kind the saga lists as `non_retryable` to fail
    /// the step at once.
    Failure {
        /// Machine-readable kind.
        kind: String,
        /// Detail.
        message: String,
    },
    /// Failed this time (`unavailable`): answered as a failure so the saga retries with
    /// backoff, and never recorded, so the retry gets a fresh chance.
    Transient {
        /// Machine-readable kind (`unavailable` when in doubt).
        kind: String,
        /// Detail.
        message: String,
    },
}

impl Outcome {
    /// A success with `output` (JSON bytes, may be empty).
    pub fn success(output: impl Into<Vec<u8>>) -> Self {
        Outcome::Success(output.into())
    }

    /// A final failure of `kind`.
    pub fn failure(kind: impl Into<String>, message: impl Into<String>) -> Self {
        Outcome::Failure {
            kind: kind.into(),
            message: message.into(),
        }
    }

    /// A transient failure of kind `unavailable`.
    pub fn unavailable(message: impl Into<String>) -> Self {
        Outcome::Transient {
            kind: "unavailable".to_string(),
            message: message.into(),
        }
    }

    /// The same outcome as the saga sees it: a transient failure is a failure on the wire.
    pub fn into_failure(self) -> Self {
        match self {
            Outcome::Transient { kind, message } => Outcome::Failure { kind, message },
            other => other,
        }
    }

    /// Whether the ledger records it (a success or a final failure).
    pub fn is_final(&self) -> bool {
        !matches!(self, Outcome::Transient { .. })
    }

    /// The reply's outcome.
    pub fn into_reply(self) -> v1::reply::Outcome {
        match self {
            Outcome::Success(output) => v1::reply::Outcome::Success(v1::Success { output }),
            Outcome::Failure { kind, message } | Outcome::Transient { kind, message } => {
                v1::reply::Outcome::Failure(v1::Failure { kind, message })
            }
        }
    }
}

/// The handler cannot decide now (its own storage is down): no reply is sent and the command
/// is returned to JetStream, to come back after a short delay (to this or another instance).
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct Unavailable(pub String);

/// A participant service's business logic.
#[async_trait]
pub trait Handler: Send + Sync + 'static {
    /// Handles one command. Must be idempotent on `cmd.idempotency_key`: a repeat answers what
    /// the first one answered ([`ledger::Ledger`] does that for you).
    async fn handle(&self, cmd: &Command) -> Result<Outcome, Unavailable>;
}

#[async_trait]
impl<H: Handler + ?Sized> Handler for std::sync::Arc<H> {
    async fn handle(&self, cmd: &Command) -> Result<Outcome, Unavailable> {
        (**self).handle(cmd).await
    }
}

/// An error and its sources, `outer: inner: innermost`, for a log line.
pub fn error_chain(error: &(dyn std::error::Error + 'static)) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(s) = source {
        text.push_str(": ");
        text.push_str(&s.to_string());
        source = s.source();
    }
    text
}

/// Unix milliseconds now, by this machine's clock.
pub fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
}

/// Something a pool can give back to JetStream when the instance holding it dies.
pub trait Returnable: Send + 'static {
    /// Returns it for redelivery after `delay`.
    fn give_back(
        self: Box<Self>,
        delay: std::time::Duration,
    ) -> futures::future::BoxFuture<'static, ()>;
}

impl Returnable for std::sync::Arc<async_nats::jetstream::Message> {
    fn give_back(
        self: Box<Self>,
        delay: std::time::Duration,
    ) -> futures::future::BoxFuture<'static, ()> {
        Box::pin(async move { nak(&self, delay).await })
    }
}

/// Returns `message` to JetStream for redelivery after `delay` (at once when zero); a failure
/// is logged (the message then comes back after the consumer's `ack_wait`).
pub async fn nak(message: &async_nats::jetstream::Message, delay: std::time::Duration) {
    let delay = (!delay.is_zero()).then_some(delay);
    if let Err(e) = message
        .ack_with(async_nats::jetstream::AckKind::Nak(delay))
        .await
    {
        tracing::warn!(subject = %message.subject, error = %e, "nak failed");
    }
}
