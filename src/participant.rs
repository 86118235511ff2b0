//! Hosting participant services: a service's durable consumer (its consumer group) feeding a
//! supervised [`ServicePool`](sagaflow_actors::service::ServicePool) of instances, each handling one command at a time.
//!
//! A participant in another language does the same with any NATS client: pull from the
//! service's consumer, do the work idempotently (keyed by `idempotency_key`), publish a
//! protobuf `Reply` to `reply_subject`, then ack. See `docs/participants.md`.
//!
//! Each command is handled inside a `participant.handle` span (consumer), a child of the
//! `step.attempt` span named by the command's `traceparent` header (or of the saga's root when
//! the header is missing or invalid); the reply carries the handling span's `traceparent`.

use std::sync::Arc;
use std::time::Duration;

use async_nats::jetstream::{self, consumer};
use async_nats::HeaderMap;
use async_trait::async_trait;
use futures::future::BoxFuture;
use prost::Message as _;
use ractor::ActorRef;
use sagaflow_actors::ports::Delivery;
use sagaflow_actors::service::{Job, ServicePoolMsg};
use sagaflow_proto::v1;
use tokio_util::sync::CancellationToken;
use tracing::Instrument as _;

use crate::config::ConsumerConfig;
use crate::consume::{pull_forever, Flow};
use crate::dlq::JsDelivery;
use crate::telemetry::{self, TraceParent};
use crate::topology::COMMANDS_STREAM;

/// What a participant's handler decided.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// Done (output JSON, may be empty).
    Success(Vec<u8>),
    /// Refused or failed: `kind` decides whether the saga retries.
    Failure {
        /// Machine-readable kind (`declined`, `out_of_stock`, `unavailable`).
        kind: String,
        /// Detail.
        message: String,
    },
}

/// The handler could not decide now (its own storage is unavailable): the command is
/// returned and redelivered later; no reply is sent.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct Unavailable(pub String);

/// A participant service's business logic.
#[async_trait]
pub trait Participant: Send + Sync + 'static {
    /// Handles one command. Must be idempotent on `cmd.idempotency_key`: a duplicate answers
    /// what the first one answered.
    async fn handle(&self, cmd: &v1::Command) -> Result<Outcome, Unavailable>;
}

/// Creates (or updates) the durable consumer shared by every instance of `service`.
pub async fn ensure_consumer(
    js: &jetstream::Context,
    service: &str,
    cfg: &ConsumerConfig,
) -> Result<consumer::PullConsumer, String> {
    let stream = js
        .get_stream(COMMANDS_STREAM)
        .await
        .map_err(|e| e.to_string())?;
    stream
        .create_consumer(consumer::pull::Config {
            durable_name: Some(format!("svc-{service}")),
            description: Some(format!(
                "consumer group of the `{service}` participant service"
            )),
            filter_subject: format!("sagaflow.cmd.{service}.>"),
            ack_policy: consumer::AckPolicy::Explicit,
            ack_wait: cfg.command_ack_wait,
            max_deliver: cfg.command_max_deliver,
            max_ack_pending: cfg.max_ack_pending,
            ..Default::default()
        })
        .await
        .map_err(|e| e.to_string())
}

/// Pulls `service`'s commands and hands them to `pool` until `cancel` fires.
///
/// At most `in_hand` commands are held by the pool at once (running or waiting in an
/// instance's mailbox): beyond that the pull loop waits for one to finish, and the rest stay
/// in JetStream, where other nodes' instances can take them. Without this bound a slow
/// service would pull every pending command into memory (`max_ack_pending` of them).
pub async fn run_consumer(
    js: jetstream::Context,
    service: String,
    cfg: ConsumerConfig,
    participant: Arc<dyn Participant>,
    pool: ActorRef<ServicePoolMsg>,
    in_hand: usize,
    cancel: CancellationToken,
) {
    let what = format!("svc-{service}");
    let slots = Arc::new(tokio::sync::Semaphore::new(in_hand.max(1)));
    pull_forever(
        &what,
        PULL_BATCH.min(in_hand.max(1)),
        cancel.clone(),
        || ensure_consumer(&js, &service, &cfg),
        |message| {
            let message = Arc::new(message);
            let fallback = JsDelivery {
                message: message.clone(),
                source: "commands",
            };
            let slots = slots.clone();
            let participant = participant.clone();
            let pool = pool.clone();
            let cancel = cancel.clone();
            let service = service.as_str();
            async move {
                // Waits for a place; on shutdown the command goes back to JetStream at once.
                let slot = tokio::select! {
                    slot = slots.acquire_owned() => slot,
                    () = cancel.cancelled() => {
                        Box::new(fallback).nak(Duration::ZERO).await;
                        return Flow::Stop;
                    }
                };
                let Ok(slot) = slot else {
                    return Flow::Stop;
                };
                let job = CommandJob {
                    message,
                    participant,
                    _slot: slot,
                };
                if pool
                    .cast(ServicePoolMsg::Dispatch(Box::new(job), Box::new(fallback)))
                    .is_err()
                {
                    tracing::warn!(
                        service,
                        "service pool stopped; leaving commands to other instances"
                    );
                    return Flow::Stop;
                }
                Flow::Continue
            }
        },
    )
    .await;
}

/// Messages asked for per pull request.
const PULL_BATCH: usize = 256;

/// One command being handled by an instance.
struct CommandJob {
    /// The command; its JetStream context publishes the reply.
    message: Arc<jetstream::Message>,
    participant: Arc<dyn Participant>,
    /// Its place among the commands in hand, given back when the job is done or dropped.
    _slot: tokio::sync::OwnedSemaphorePermit,
}

impl Job for CommandJob {
    fn run(self: Box<Self>) -> BoxFuture<'static, ()> {
        Box::pin(async move { self.handle().await })
    }
}

impl CommandJob {
    async fn handle(self) {
        let delivery = Box::new(JsDelivery {
            message: self.message.clone(),
            source: "commands",
        });
        let cmd = match v1::Command::decode(self.message.payload.as_ref()) {
            Ok(c) if !c.reply_subject.is_empty() && !c.command_id.is_empty() => c,
            Ok(_) => {
                return delivery
                    .dead_letter("command lacks reply_subject or command_id".into())
                    .await
            }
            Err(e) => {
                return delivery
                    .dead_letter(format!("undecodable command: {e}"))
                    .await
            }
        };
        let headers = self.message.headers.as_ref();
        let parent = TraceParent::from_headers(headers)
            .unwrap_or_else(|| telemetry::saga_root(&cmd.saga_id));
        let tracestate = telemetry::header(headers, telemetry::TRACESTATE).map(str::to_string);
        let span = tracing::info_span!(
            "participant.handle",
            otel.kind = "consumer",
            otel.status_description = tracing::field::Empty,
            saga.id = %cmd.saga_id,
            saga.name = %cmd.saga_name,
            step = %cmd.step,
            attempt = cmd.attempt,
            compensation = cmd.compensation,
            service = %cmd.service,
            action = %cmd.action,
            messaging.system = "nats",
            messaging.message.id = %cmd.command_id,
            trace_id = %parent.trace_id_hex(),
            outcome = tracing::field::Empty,
            outcome.kind = tracing::field::Empty,
        );
        let trace = telemetry::continue_trace(&span, &parent);
        self.answer(cmd, delivery, trace, tracestate)
            .instrument(span)
            .await;
    }

    /// Handles a decoded command inside its `participant.handle` span, replies (with `trace` as
    /// the reply's trace context) and acks.
    async fn answer(
        self,
        cmd: v1::Command,
        delivery: Box<JsDelivery>,
        trace: TraceParent,
        tracestate: Option<String>,
    ) {
        let span = tracing::Span::current();
        // Load shedding: the saga stopped waiting for this attempt (it timed out, and a newer
        // attempt with the same idempotency key is or will be out). Doing it now would only
        // delay the commands that still matter.
        if cmd.deadline_unix_ms > 0 && crate::dlq::now_ms() > cmd.deadline_unix_ms {
            span.record("outcome", "expired");
            tracing::debug!(command_id = %cmd.command_id, "command expired before it was handled, skipped");
            return delivery.ack().await;
        }
        tracing::debug!("handling command");
        let outcome = match self.participant.handle(&cmd).await {
            Ok(o) => o,
            Err(Unavailable(e)) => {
                span.record("outcome", "unavailable");
                span.record("otel.status_description", e.as_str());
                tracing::warn!(command_id = %cmd.command_id, error = %e, "participant unavailable, command returned");
                return delivery.nak(Duration::from_millis(500)).await;
            }
        };
        match &outcome {
            Outcome::Success(_) => {
                span.record("outcome", "success");
            }
            Outcome::Failure { kind, message } => {
                span.record("outcome", "failure");
                span.record("outcome.kind", kind.as_str());
                span.record(
                    "otel.status_description",
                    format!("{kind}: {message}").as_str(),
                );
            }
        }
        let reply = v1::Reply {
            command_id: cmd.command_id.clone(),
            saga_id: cmd.saga_id.clone(),
            step: cmd.step.clone(),
            attempt: cmd.attempt,
            compensation: cmd.compensation,
            outcome: Some(match outcome {
                Outcome::Success(output) => v1::reply::Outcome::Success(v1::Success { output }),
                Outcome::Failure { kind, message } => {
                    v1::reply::Outcome::Failure(v1::Failure { kind, message })
                }
            }),
        };
        let mut headers = HeaderMap::new();
        headers.insert(
            async_nats::header::NATS_MESSAGE_ID,
            format!("reply/{}", cmd.command_id).as_str(),
        );
        telemetry::inject(&mut headers, &trace, tracestate.as_deref());
        let published = match self
            .message
            .context
            .publish_with_headers(
                cmd.reply_subject.clone(),
                headers,
                reply.encode_to_vec().into(),
            )
            .await
        {
            Ok(ack) => ack.await.map(|_| ()).map_err(|e| e.to_string()),
            Err(e) => Err(e.to_string()),
        };
        match published {
            Ok(()) => delivery.ack().await,
            Err(e) => {
                span.record(
                    "otel.status_description",
                    format!("reply not published: {e}").as_str(),
                );
                tracing::warn!(command_id = %cmd.command_id, error = %e, "cannot publish reply, command returned");
                delivery.nak(Duration::from_millis(500)).await;
            }
        }
    }
}
