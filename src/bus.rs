//! Publishing commands to participants and lifecycle events, over JetStream.
//!
//! Every command carries `Nats-Msg-Id = command_id`, so republishing after a crash is
//! de-duplicated by the server within the stream's duplicate window (and by the participants'
//! idempotency keys beyond it). Publishes are pipelined: all are sent, then all acks awaited.
//!
//! Every command is published inside a `step.attempt` span (one per attempt, forward or
//! compensation) in the saga's trace, and carries that span's W3C `traceparent` header so the
//! participant's handling joins the trace (see [`crate::telemetry`]).

use std::future::IntoFuture;

use async_nats::jetstream;
use async_nats::HeaderMap;
use async_trait::async_trait;
use bytes::Bytes;
use futures::future::try_join_all;
use prost::Message as _;
use sagaflow_actors::definition::SagaDefinition;
use sagaflow_actors::hash::partition_of;
use sagaflow_actors::machine::{CommandSpec, Saga};
use sagaflow_actors::ports::{CommandBus, Error};
use sagaflow_proto::v1;
use tracing::Instrument as _;

use crate::config::StatusEvents;
use crate::telemetry;
use crate::topology::{command_subject, reply_subject, status_subject};

/// The command id of one attempt (`Nats-Msg-Id`) and the idempotency key participants record
/// effects under: the wire contract's (`sagaflow-proto`).
pub use sagaflow_proto::subjects::{command_id, idempotency_key};

/// Builds the protobuf command for one attempt, with its subject.
pub fn build_command(
    def: &SagaDefinition,
    saga: &Saga,
    spec: CommandSpec,
    partitions: u32,
) -> Option<(String, v1::Command)> {
    let step = def.step(spec.step)?;
    let action = if spec.compensation {
        step.compensation.as_ref()?
    } else {
        &step.action
    };
    let state = saga.steps.get(spec.step)?;
    let cmd = v1::Command {
        command_id: command_id(&saga.id, &step.name, spec.compensation, spec.attempt),
        idempotency_key: idempotency_key(&saga.id, &step.name, spec.compensation),
        saga_id: saga.id.clone(),
        saga_name: saga.definition.clone(),
        step: step.name.clone(),
        service: action.service.clone(),
        action: action.name.clone(),
        attempt: spec.attempt,
        compensation: spec.compensation,
        compensates_key: if spec.compensation {
            idempotency_key(&saga.id, &step.name, false)
        } else {
            String::new()
        },
        input: with_signals(def, saga),
        reply_subject: reply_subject(partition_of(&saga.id, partitions), &action.service),
        deadline_unix_ms: state.due_at.unwrap_or_default(),
    };
    Some((command_subject(&action.service, &action.name), cmd))
}

/// The saga's input as commands carry it: unchanged, unless signals ended waits, whose
/// payloads are then under `"signals"` by name (`{"signals": {"delivery.confirmed": {...}}}`),
/// for the steps after them. An input that is not a JSON object, or a payload that is not
/// JSON, is left out rather than altered.
pub fn with_signals(def: &SagaDefinition, saga: &Saga) -> Vec<u8> {
    let received: Vec<(&str, &[u8])> = def
        .steps
        .iter()
        .zip(&saga.steps)
        .filter_map(|(step, state)| {
            let signal = step.wait_for()?;
            (state.phase == sagaflow_actors::machine::StepPhase::Succeeded)
                .then_some((signal, state.output.as_deref().unwrap_or(b"null")))
        })
        .collect();
    if received.is_empty() {
        return saga.input.clone();
    }
    let Ok(serde_json::Value::Object(mut input)) =
        serde_json::from_slice::<serde_json::Value>(&saga.input)
    else {
        return saga.input.clone();
    };
    let mut signals = serde_json::Map::new();
    for (name, payload) in received {
        let value = serde_json::from_slice(payload).unwrap_or(serde_json::Value::Null);
        signals.insert(name.to_string(), value);
    }
    input.insert("signals".to_string(), serde_json::Value::Object(signals));
    serde_json::to_vec(&input).unwrap_or_else(|_| saga.input.clone())
}

/// The `Nats-TTL` of one attempt's command: its step's timeout in whole seconds, rounded up
/// (at least 1 s). Past it the saga no longer waits for this attempt (it timed out, and its
/// retry, with the same idempotency key, is or will be out): the server drops the command if
/// no participant took it by then. The expiry is measured by the server alone, from when it
/// stored the command, so no clock of a node or a participant enters into it.
pub fn command_ttl(def: &SagaDefinition, spec: CommandSpec) -> String {
    let timeout = def
        .step(spec.step)
        .map_or(std::time::Duration::from_secs(30), |s| s.timeout);
    let secs = timeout.as_secs() + u64::from(timeout.subsec_nanos() > 0);
    format!("{}s", secs.max(1))
}

/// One command ready to publish, inside the span of its attempt.
#[derive(Debug)]
pub struct Outgoing {
    /// `sagaflow.cmd.<service>.<action>`.
    pub subject: String,
    /// `Nats-Msg-Id` (the command id) and `traceparent` (the attempt's span).
    pub headers: HeaderMap,
    /// The encoded [`v1::Command`].
    pub payload: Bytes,
    /// The `step.attempt` span (producer), ended once the server stored the command.
    pub span: tracing::Span,
    /// The trace context in `headers`.
    pub trace: telemetry::TraceParent,
}

/// Builds one attempt's command with its headers, in a new `step.attempt` span: a child of the
/// saga's root span, in the saga's trace.
pub fn prepare(
    def: &SagaDefinition,
    saga: &Saga,
    spec: CommandSpec,
    partitions: u32,
) -> Option<Outgoing> {
    let (subject, cmd) = build_command(def, saga, spec, partitions)?;
    let root = telemetry::saga_root(&saga.id);
    let span = tracing::info_span!(
        "step.attempt",
        otel.kind = "producer",
        otel.status_description = tracing::field::Empty,
        saga.id = %saga.id,
        saga.name = %saga.definition,
        step = %cmd.step,
        attempt = cmd.attempt,
        compensation = cmd.compensation,
        service = %cmd.service,
        action = %cmd.action,
        messaging.system = "nats",
        messaging.destination.name = %subject,
        messaging.message.id = %cmd.command_id,
        trace_id = %root.trace_id_hex(),
        duplicate = tracing::field::Empty,
    );
    let trace = telemetry::continue_trace(&span, &root);
    let mut headers = HeaderMap::new();
    headers.insert(async_nats::header::NATS_MESSAGE_ID, cmd.command_id.as_str());
    headers.insert(
        async_nats::header::NATS_MESSAGE_TTL,
        command_ttl(def, spec).as_str(),
    );
    telemetry::inject(&mut headers, &trace, None);
    Some(Outgoing {
        subject,
        headers,
        payload: cmd.encode_to_vec().into(),
        span,
        trace,
    })
}

/// [`CommandBus`] over JetStream.
#[derive(Clone, Debug)]
pub struct JetStreamBus {
    js: jetstream::Context,
    partitions: u32,
    status_events: StatusEvents,
}

impl JetStreamBus {
    /// A bus publishing through `js`, lifecycle events stored in `SAGA_STATUS`.
    pub fn new(js: jetstream::Context, partitions: u32) -> Self {
        JetStreamBus {
            js,
            partitions,
            status_events: StatusEvents::Stream,
        }
    }

    /// …publishing lifecycle events as `status_events` says.
    pub fn with_status_events(mut self, status_events: StatusEvents) -> Self {
        self.status_events = status_events;
        self
    }
}

/// Marks the spans of attempts whose command may not have been stored (the saga retries).
fn failed<'a>(spans: impl Iterator<Item = &'a tracing::Span>, e: &Error) {
    let message = e.to_string();
    for span in spans {
        span.record("otel.status_description", message.as_str());
    }
}

fn transport(operation: &'static str) -> impl Fn(&dyn std::fmt::Display) -> Error {
    move |e| Error::Transport {
        operation,
        message: e.to_string(),
    }
}

#[async_trait]
impl CommandBus for JetStreamBus {
    async fn send(
        &self,
        def: &SagaDefinition,
        saga: &Saga,
        commands: &[CommandSpec],
    ) -> Result<(), Error> {
        let mut acks = Vec::with_capacity(commands.len());
        // Each attempt's span lasts until the server stored its command.
        let mut spans = Vec::with_capacity(commands.len());
        for spec in commands {
            let Some(out) = prepare(def, saga, *spec, self.partitions) else {
                tracing::error!(saga_id = %saga.id, ?spec, "command names a step or compensation the definition lacks");
                continue;
            };
            tracing::debug!(parent: &out.span, subject = %out.subject, "publishing command");
            let published = self
                .js
                .publish_with_headers(out.subject, out.headers, out.payload)
                .instrument(out.span.clone())
                .await;
            let ack = match published {
                Ok(ack) => ack,
                Err(e) => {
                    let e = transport("publish command")(&e);
                    failed(spans.iter().chain([&out.span]), &e);
                    return Err(e);
                }
            };
            acks.push(ack.into_future());
            spans.push(out.span);
        }
        match try_join_all(acks).await {
            Ok(stored) => {
                // A republished attempt (recovery, a redelivered event) is dropped by the
                // server's de-duplication: say so, the trace then shows why two spans exist.
                for (span, ack) in spans.iter().zip(stored) {
                    span.record("duplicate", ack.duplicate);
                }
                Ok(())
            }
            Err(e) => {
                let e = transport("publish command")(&e);
                failed(spans.iter(), &e);
                Err(e)
            }
        }
    }

    async fn announce(
        &self,
        saga: &Saga,
        from: &str,
        to: &str,
        sequence: u64,
    ) -> Result<(), Error> {
        let event = v1::StatusEvent {
            saga_id: saga.id.clone(),
            saga_name: saga.definition.clone(),
            previous_status: from.to_string(),
            status: to.to_string(),
            phase: saga.phase.as_str().to_string(),
            terminal: saga.is_terminal(),
            reason: saga.reason.clone().unwrap_or_default(),
            input: saga.input.clone(),
            at_unix_ms: saga.updated_at,
            sequence,
        };
        let mut headers = HeaderMap::new();
        headers.insert(
            async_nats::header::NATS_MESSAGE_ID,
            format!("{}/status/{sequence}", saga.id).as_str(),
        );
        let subject = status_subject(&saga.definition, &saga.id);
        let payload = event.encode_to_vec().into();
        match self.status_events {
            StatusEvents::Stream => {
                self.js
                    .publish_with_headers(subject, headers, payload)
                    .await
                    .map_err(|e| transport("publish status")(&e))?
                    .await
                    .map_err(|e| transport("publish status")(&e))?;
            }
            // Best effort: handed to the connection, no acknowledgement to wait for.
            StatusEvents::Core => self
                .js
                .client()
                .publish_with_headers(subject, headers, payload)
                .await
                .map_err(|e| transport("publish status")(&e))?,
        }
        // The saga's last status change: its root span can be exported now that its end is
        // known (earlier changes of the same transition see the same terminal snapshot).
        if saga.is_terminal() && sequence == saga.status_seq {
            telemetry::saga_finished(saga);
        }
        Ok(())
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use std::path::Path;

    use sagaflow_actors::machine::Effect;

    use super::*;
    use crate::telemetry::{saga_root_span_id, saga_trace_id, TraceParent, TRACEPARENT};

    #[test]
    fn commands_carry_the_message_id_and_the_sagas_trace_context() {
        let def = sagaflow_actors::definition::parse(
            include_str!("../sagas/order.toml"),
            Path::new("sagas/order.toml"),
        )
        .unwrap();
        let (saga, t) = Saga::start(&def, "order-T-1".into(), b"{}".to_vec(), 1_000);
        let specs: Vec<CommandSpec> = t
            .effects
            .iter()
            .filter_map(|e| match e {
                Effect::Send(c) => Some(*c),
                _ => None,
            })
            .collect();
        assert!(!specs.is_empty(), "the saga starts with a command");
        let mut span_ids = Vec::new();
        for &spec in &specs {
            let out = prepare(&def, &saga, spec, 4).unwrap();
            let cmd = v1::Command::decode(out.payload.as_ref()).unwrap();
            assert_eq!(
                out.headers
                    .get(async_nats::header::NATS_MESSAGE_ID)
                    .map(|v| v.as_str()),
                Some(cmd.command_id.as_str())
            );
            let raw = out.headers.get(TRACEPARENT).unwrap().as_str();
            assert_eq!(raw.len(), 55, "{raw}");
            assert!(raw.starts_with("00-") && raw.ends_with("-01"), "{raw}");
            let tp = TraceParent::parse(raw).unwrap();
            assert_eq!(tp, out.trace);
            assert_eq!(tp.trace_id, saga_trace_id("order-T-1"), "the saga's trace");
            assert_ne!(tp.parent_id, saga_root_span_id("order-T-1"), "its own span");
            span_ids.push(tp.parent_id);
        }
        // A republished attempt is a new span in the same trace.
        let again = prepare(&def, &saga, specs[0], 4).unwrap();
        assert_eq!(again.trace.trace_id, saga_trace_id("order-T-1"));
        assert!(!span_ids.contains(&again.trace.parent_id));
    }

    /// Attempt 1 of the order saga's first step, as the node builds it.
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
        build_command(&def, &saga, spec, 8).unwrap().1
    }

    #[test]
    fn commands_the_node_builds_pass_the_participants_check() {
        // The forged commands it refuses are the SDK's own tests
        // (sagaflow_participant::command).
        let built = command();
        assert_eq!(sagaflow_participant::command::check_command(&built), Ok(()));
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
        assert_eq!(sagaflow_participant::command::check_command(&older), Ok(()));
    }
}
