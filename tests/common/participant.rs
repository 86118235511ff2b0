//! A participant that speaks the raw wire protocol (a protobuf `Command` in, a `Reply` out,
//! over JetStream), for tests that script how services answer. What it does is what
//! `docs/participants.md` asks of any participant: for each service the durable consumer
//! `svc-<service>` (filter `sagaflow.cmd.<service>.>`, explicit ack) on `SAGA_COMMANDS`; each
//! reply published with `Nats-Msg-Id: reply/<command_id>`; the command acked only once the
//! reply is stored, so a lost reply means a redelivery, answered the same way.
//!
//! The test supplies the behaviour: `on_receive` sees every delivery as it arrives (duplicates
//! included), `answer` decides the reply (`None`: take the command and never answer, leaving it
//! to the step's timeout).

use std::future::Future;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;
use std::time::Duration;

use async_nats::jetstream::{self, consumer};
use async_nats::HeaderMap;
use futures::StreamExt;
use prost::Message as _;
use sagaflow_proto::v1;
use tokio::task::JoinSet;

use super::{nats_client, within, TIMEOUT};

/// How one service's commands are handled.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Handling {
    /// One after another, in delivery order (decisions happen in the order commands arrive).
    InOrder,
    /// Each in its own task, so a held or silent command never delays the others.
    Concurrent,
}

/// A successful reply carrying `output` (JSON).
pub fn success(output: serde_json::Value) -> Option<v1::reply::Outcome> {
    Some(v1::reply::Outcome::Success(v1::Success {
        output: output.to_string().into_bytes(),
    }))
}

/// A failed reply of `kind` (`declined`, `unavailable`…) with `message`.
pub fn failure(kind: &str, message: impl Into<String>) -> Option<v1::reply::Outcome> {
    Some(v1::reply::Outcome::Failure(v1::Failure {
        kind: kind.to_string(),
        message: message.into(),
    }))
}

/// The running participant; its tasks end when it is dropped.
pub struct RawParticipant {
    undecodable: Arc<AtomicU32>,
    _tasks: JoinSet<()>,
}

impl RawParticipant {
    /// Serves `services` on the NATS at `nats_url` (the node must have created the streams).
    pub async fn start<R, A, F>(
        nats_url: &str,
        services: impl IntoIterator<Item = impl AsRef<str>>,
        handling: Handling,
        on_receive: R,
        answer: A,
    ) -> RawParticipant
    where
        R: Fn(&v1::Command) + Send + Sync + 'static,
        A: Fn(v1::Command) -> F + Send + Sync + 'static,
        F: Future<Output = Option<v1::reply::Outcome>> + Send + 'static,
    {
        #[allow(clippy::expect_used)]
        let client = nats_client(nats_url).await.expect("connect to nats");
        Self::start_on(client, services, handling, on_receive, answer).await
    }

    /// The same over a connection the test made (its own credentials, inbox prefix…).
    pub async fn start_on<R, A, F>(
        client: async_nats::Client,
        services: impl IntoIterator<Item = impl AsRef<str>>,
        handling: Handling,
        on_receive: R,
        answer: A,
    ) -> RawParticipant
    where
        R: Fn(&v1::Command) + Send + Sync + 'static,
        A: Fn(v1::Command) -> F + Send + Sync + 'static,
        F: Future<Output = Option<v1::reply::Outcome>> + Send + 'static,
    {
        let js = jetstream::new(client);
        #[allow(clippy::expect_used)]
        let stream = within(TIMEOUT, "get SAGA_COMMANDS", js.get_stream("SAGA_COMMANDS"))
            .await
            .and_then(|r| Ok(r?))
            .expect("the commands stream");
        let undecodable = Arc::new(AtomicU32::new(0));
        let script = Arc::new((on_receive, answer));
        let mut tasks = JoinSet::new();
        for service in services {
            let service = service.as_ref().to_string();
            let name = format!("svc-{service}");
            #[allow(clippy::expect_used)]
            let consumer: consumer::PullConsumer = within(
                TIMEOUT,
                "create service consumer",
                stream.get_or_create_consumer(
                    &name,
                    consumer::pull::Config {
                        durable_name: Some(name.clone()),
                        filter_subject: format!("sagaflow.cmd.{service}.>"),
                        ack_policy: consumer::AckPolicy::Explicit,
                        ..Default::default()
                    },
                ),
            )
            .await
            .and_then(|r| Ok(r?))
            .expect("the service's consumer");
            #[allow(clippy::expect_used)]
            let messages = within(TIMEOUT, "pull commands", consumer.messages())
                .await
                .and_then(|r| Ok(r?))
                .expect("the service's messages");
            tasks.spawn(serve(
                js.clone(),
                service,
                messages,
                handling,
                undecodable.clone(),
                script.clone(),
            ));
        }
        RawParticipant {
            undecodable,
            _tasks: tasks,
        }
    }

    /// Commands that did not decode as a `v1::Command` (acked and dropped).
    pub fn undecodable(&self) -> u32 {
        self.undecodable.load(Ordering::Relaxed)
    }
}

async fn serve<R, A, F>(
    js: jetstream::Context,
    service: String,
    mut messages: consumer::pull::Stream,
    handling: Handling,
    undecodable: Arc<AtomicU32>,
    script: Arc<(R, A)>,
) where
    R: Fn(&v1::Command) + Send + Sync + 'static,
    A: Fn(v1::Command) -> F + Send + Sync + 'static,
    F: Future<Output = Option<v1::reply::Outcome>> + Send + 'static,
{
    let mut handlers = JoinSet::new();
    while let Some(message) = messages.next().await {
        let message = match message {
            Ok(m) => m,
            Err(e) => {
                eprintln!("participant {service}: pull error: {e}");
                continue;
            }
        };
        let cmd = match v1::Command::decode(message.payload.as_ref()) {
            Ok(c) => c,
            Err(e) => {
                eprintln!("participant {service}: undecodable command: {e}");
                undecodable.fetch_add(1, Ordering::Relaxed);
                let _ = message.ack().await;
                continue;
            }
        };
        (script.0)(&cmd);
        let answer = (script.1)(cmd.clone());
        let reply = handle(js.clone(), service.clone(), message, cmd, answer);
        match handling {
            Handling::InOrder => reply.await,
            Handling::Concurrent => {
                handlers.spawn(reply);
                // Reap finished handlers as we go.
                while handlers.try_join_next().is_some() {}
            }
        }
    }
}

/// Awaits the answer, publishes the reply, and acks the command once the reply is stored.
async fn handle(
    js: jetstream::Context,
    service: String,
    message: jetstream::Message,
    cmd: v1::Command,
    answer: impl Future<Output = Option<v1::reply::Outcome>>,
) {
    let Some(outcome) = answer.await else {
        // Taken, never answered: the node's step timeout decides.
        let _ = message.ack().await;
        return;
    };
    let reply = v1::Reply {
        command_id: cmd.command_id.clone(),
        saga_id: cmd.saga_id.clone(),
        step: cmd.step.clone(),
        attempt: cmd.attempt,
        compensation: cmd.compensation,
        outcome: Some(outcome),
    };
    let mut headers = HeaderMap::new();
    headers.insert("Nats-Msg-Id", format!("reply/{}", cmd.command_id).as_str());
    let published = async {
        js.publish_with_headers(cmd.reply_subject, headers, reply.encode_to_vec().into())
            .await?
            .await?;
        Ok::<_, Box<dyn std::error::Error + Send + Sync>>(())
    };
    match tokio::time::timeout(Duration::from_secs(10), published).await {
        Ok(Ok(())) => {
            if let Err(e) = message.ack().await {
                eprintln!("participant {service}: ack failed: {e}");
            }
        }
        // Not acked: JetStream redelivers the command after ack_wait, answered the same way.
        Ok(Err(e)) => eprintln!("participant {service}: reply not stored: {e}"),
        Err(_) => eprintln!("participant {service}: reply publish timed out"),
    }
}
