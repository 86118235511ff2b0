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
use sagaflow_actors::ids;
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
) -> Result<consumer::PullConsumer, crate::consume::OpenError> {
    crate::consume::open_durable(
        js,
        COMMANDS_STREAM,
        consumer::pull::Config {
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
        },
    )
    .await
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

/// Checks what of a command reaches a subject or a header: the saga id, the step, the
/// `command_id` (the reply's `Nats-Msg-Id`) and the `reply_subject` (where the reply is
/// published: only this service's reply subject, `sagaflow.evt.<partition>.reply.<service>`,
/// or the older `sagaflow.evt.<partition>.reply` that names no service). A command that fails
/// is dead-lettered, never answered: answering it could publish anywhere.
pub fn check_command(cmd: &v1::Command) -> Result<(), String> {
    if let Some(problem) = ids::saga_id_problem(&cmd.saga_id) {
        return Err(format!("command's {problem}"));
    }
    if !ids::valid_id(&cmd.step, ids::MAX_STEP_NAME) || cmd.attempt == 0 {
        return Err(format!(
            "command's step {} or attempt {} is not well-formed",
            ids::quote(&cmd.step),
            cmd.attempt
        ));
    }
    let expected = crate::bus::command_id(&cmd.saga_id, &cmd.step, cmd.compensation, cmd.attempt);
    if cmd.command_id != expected {
        return Err(format!(
            "command's command_id {} is not the id of the attempt it names (`{expected}`)",
            ids::quote(&cmd.command_id)
        ));
    }
    // Older nodes named the saga in the subject too (a 5-token subject): still a saga event
    // subject.
    // A partition is digits only (`u32::from_str` would also take `+5`, a subject no
    // partition consumer reads).
    let partition = |p: &str| {
        !p.is_empty() && p.bytes().all(|b| b.is_ascii_digit()) && p.parse::<u32>().is_ok()
    };
    let reply_to_event = match cmd.reply_subject.split('.').collect::<Vec<_>>().as_slice() {
        ["sagaflow", "evt", p, "reply", service]
            if !crate::events::CONTROL_KINDS.contains(service) && *service != "reply" =>
        {
            if *service != cmd.service {
                return Err(format!(
                    "command's reply_subject {} is another service's (this command is for `{}`)",
                    ids::quote(&cmd.reply_subject),
                    cmd.service
                ));
            }
            partition(p)
        }
        ["sagaflow", "evt", p, "reply"] => partition(p),
        ["sagaflow", "evt", p, id, "reply"] => partition(p) && ids::valid_saga_id(id),
        _ => false,
    };
    if !reply_to_event {
        return Err(format!(
            "command's reply_subject {} is not a saga reply subject (`sagaflow.evt.<partition>.reply.<service>`)",
            ids::quote(&cmd.reply_subject)
        ));
    }
    Ok(())
}

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
        if let Err(why) = check_command(&cmd) {
            return delivery.dead_letter(why).await;
        }
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
        // No skipping by `deadline_unix_ms`: it is the orchestrator's clock, and a participant
        // whose clock runs ahead would skip every command. Commands whose attempt timed out are
        // dropped by the server instead (`Nats-TTL`, measured by the server's clock alone).
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

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use sagaflow_actors::machine::{CommandSpec, Saga};

    fn command() -> v1::Command {
        let def = sagaflow_actors::definition::parse(
            include_str!("../sagas/order.toml"),
            std::path::Path::new("sagas/order.toml"),
        )
        .unwrap();
        let (saga, _) = Saga::start(&def, "order-A-1".into(), b"{}".to_vec(), 1);
        let spec = CommandSpec {
            step: 0,
            attempt: 1,
            compensation: false,
        };
        crate::bus::build_command(&def, &saga, spec, 8).unwrap().1
    }

    #[test]
    fn commands_the_node_builds_pass_and_forged_ones_do_not() {
        let built = command();
        assert_eq!(check_command(&built), Ok(()));
        assert!(
            built.reply_subject.ends_with(".reply.payment"),
            "{}",
            built.reply_subject
        );
        // The older subject without the service is still answered (a node not yet upgraded).
        let older = v1::Command {
            reply_subject: built.reply_subject.trim_end_matches(".payment").into(),
            ..command()
        };
        assert_eq!(check_command(&older), Ok(()));
        let forged = [
            // Another service's reply subject.
            v1::Command {
                reply_subject: built.reply_subject.replace(".payment", ".shipping"),
                ..command()
            },
            v1::Command {
                reply_subject: "$JS.API.STREAM.DELETE.SAGA_EVENTS".into(),
                ..command()
            },
            v1::Command {
                reply_subject: "sagaflow.evt.x.reply".into(),
                ..command()
            },
            v1::Command {
                reply_subject: "sagaflow.evt.+5.reply".into(),
                ..command()
            },
            v1::Command {
                command_id: "order-A-1/charge/1\r\nPUB x 1".into(),
                ..command()
            },
            v1::Command {
                saga_id: "Z".repeat(5_000),
                ..command()
            },
            v1::Command {
                attempt: 0,
                ..command()
            },
        ];
        for cmd in forged {
            let why = check_command(&cmd).unwrap_err();
            assert!(why.starts_with("command's"), "{why}");
            assert!(!why.chars().any(char::is_control), "{why:?}");
        }
    }
}
