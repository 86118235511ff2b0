//! Publishing commands to participants and lifecycle events, over JetStream.
//!
//! Every command carries `Nats-Msg-Id = command_id`, so republishing after a crash is
//! de-duplicated by the server within the stream's duplicate window (and by the participants'
//! idempotency keys beyond it). Publishes are pipelined: all are sent, then all acks awaited.

use std::future::IntoFuture;

use async_nats::jetstream;
use async_nats::HeaderMap;
use async_trait::async_trait;
use futures::future::try_join_all;
use prost::Message as _;
use sagaflow_actors::definition::SagaDefinition;
use sagaflow_actors::hash::partition_of;
use sagaflow_actors::machine::{CommandSpec, Saga};
use sagaflow_actors::ports::{CommandBus, Error};
use sagaflow_proto::v1;

use crate::topology::{command_subject, event_subject, status_subject};

/// The command id of one attempt (`Nats-Msg-Id`).
pub fn command_id(saga_id: &str, step: &str, compensation: bool, attempt: u32) -> String {
    if compensation {
        format!("{saga_id}/{step}/c{attempt}")
    } else {
        format!("{saga_id}/{step}/{attempt}")
    }
}

/// The idempotency key participants record effects under.
pub fn idempotency_key(saga_id: &str, step: &str, compensation: bool) -> String {
    if compensation {
        format!("{saga_id}/{step}/compensate")
    } else {
        format!("{saga_id}/{step}")
    }
}

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
        input: saga.input.clone(),
        reply_subject: event_subject(partition_of(&saga.id, partitions), &saga.id, "reply"),
        deadline_unix_ms: state.due_at.unwrap_or_default(),
    };
    Some((command_subject(&action.service, &action.name), cmd))
}

/// [`CommandBus`] over JetStream.
#[derive(Clone, Debug)]
pub struct JetStreamBus {
    js: jetstream::Context,
    partitions: u32,
}

impl JetStreamBus {
    /// A bus publishing through `js`.
    pub fn new(js: jetstream::Context, partitions: u32) -> Self {
        JetStreamBus { js, partitions }
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
        for spec in commands {
            let Some((subject, cmd)) = build_command(def, saga, *spec, self.partitions) else {
                tracing::error!(saga_id = %saga.id, ?spec, "command names a step or compensation the definition lacks");
                continue;
            };
            let mut headers = HeaderMap::new();
            headers.insert(async_nats::header::NATS_MESSAGE_ID, cmd.command_id.as_str());
            tracing::debug!(saga_id = %saga.id, command_id = %cmd.command_id, %subject, "publishing command");
            let ack = self
                .js
                .publish_with_headers(subject, headers, cmd.encode_to_vec().into())
                .await
                .map_err(|e| transport("publish command")(&e))?;
            acks.push(ack.into_future());
        }
        try_join_all(acks)
            .await
            .map_err(|e| transport("publish command")(&e))?;
        Ok(())
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
        self.js
            .publish_with_headers(
                status_subject(&saga.definition, &saga.id),
                headers,
                event.encode_to_vec().into(),
            )
            .await
            .map_err(|e| transport("publish status")(&e))?
            .await
            .map_err(|e| transport("publish status")(&e))?;
        Ok(())
    }
}
