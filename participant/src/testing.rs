//! Run a handler against a real nats-server in tests (feature `testing`).
//!
//! [`TestBed::start`] starts a `nats-server` (≥ 2.11; found through `NATS_SERVER_BIN`, `PATH`
//! or the pinned install, see `sagaflow_devkit::nats_server`) on a free loopback port with
//! JetStream in a temporary directory, and creates the streams a Sagaflow node would
//! (`SAGA_COMMANDS`, `SAGA_EVENTS`, `SAGA_DLQ`). Run your handler with [`TestBed::runner`],
//! then [`TestBed::call`] sends a command the way a node does and returns the reply:
//!
//! ```no_run
//! # use sagaflow_participant::{testing::TestBed, Outcome};
//! # async fn t(handler: impl sagaflow_participant::Handler) -> Result<(), sagaflow_participant::testing::Error> {
//! let bed = TestBed::start().await?;
//! let running = bed.runner("hotel", handler).start(bed.cancel()).await?;
//! let book = TestBed::command("trip-1", "book_hotel", "hotel", "book", br#"{"nights": 3}"#);
//! assert_eq!(bed.call(&book).await?, Outcome::success(br#"{"room":12}"#.to_vec()));
//! running.shutdown().await;
//! # Ok(()) }
//! ```

use std::time::Duration;

use async_nats::jetstream::{self, stream};
use async_nats::HeaderMap;
use futures::StreamExt;
use prost::Message as _;
use sagaflow_devkit::nats_server::NatsServer;
use sagaflow_proto::subjects::{
    command_id, command_subject, idempotency_key, reply_subject, COMMANDS_STREAM, DLQ_STREAM,
    EVENTS_STREAM,
};
use sagaflow_proto::v1;
use tokio_util::sync::CancellationToken;

use crate::{Handler, Outcome, Runner};

/// Any error of the test bed.
pub type Error = Box<dyn std::error::Error + Send + Sync>;

/// How long [`TestBed::call`] waits for a reply.
pub const REPLY_TIMEOUT: Duration = Duration::from_secs(15);

/// A nats-server with Sagaflow's streams; stopped when dropped.
#[derive(Debug)]
pub struct TestBed {
    server: NatsServer,
    client: async_nats::Client,
    js: jetstream::Context,
    cancel: CancellationToken,
}

impl TestBed {
    /// Starts the server and creates the streams.
    pub async fn start() -> Result<Self, Error> {
        let server = NatsServer::start()?;
        let client = async_nats::connect(server.url()).await?;
        let js = jetstream::new(client.clone());
        for (name, subject) in [
            (COMMANDS_STREAM, "sagaflow.cmd.>"),
            (EVENTS_STREAM, "sagaflow.evt.>"),
            (DLQ_STREAM, "sagaflow.dlq.>"),
        ] {
            js.get_or_create_stream(stream::Config {
                name: name.to_string(),
                subjects: vec![subject.to_string()],
                allow_message_ttl: name == COMMANDS_STREAM,
                ..Default::default()
            })
            .await?;
        }
        Ok(TestBed {
            server,
            client,
            js,
            cancel: CancellationToken::new(),
        })
    }

    /// The server's URL (`nats://127.0.0.1:<port>`).
    pub fn url(&self) -> String {
        self.server.url()
    }

    /// A client of the server.
    pub fn client(&self) -> &async_nats::Client {
        &self.client
    }

    /// Its JetStream context.
    pub fn js(&self) -> &jetstream::Context {
        &self.js
    }

    /// A token cancelled when the bed is dropped (pass it to [`Runner::start`]).
    pub fn cancel(&self) -> CancellationToken {
        self.cancel.child_token()
    }

    /// A runner of `service` with `handler` on this server (2 instances).
    pub fn runner(&self, service: &str, handler: impl Handler) -> Runner {
        Runner::new(self.js.clone(), service, handler).instances(2)
    }

    /// Attempt 1 of the forward command of `step` in saga `saga_id`, as a node builds it
    /// (partition 0, deadline a minute from now).
    pub fn command(
        saga_id: &str,
        step: &str,
        service: &str,
        action: &str,
        input: &[u8],
    ) -> v1::Command {
        v1::Command {
            command_id: command_id(saga_id, step, false, 1),
            idempotency_key: idempotency_key(saga_id, step, false),
            saga_id: saga_id.to_string(),
            saga_name: "test".to_string(),
            step: step.to_string(),
            service: service.to_string(),
            action: action.to_string(),
            attempt: 1,
            compensation: false,
            compensates_key: String::new(),
            input: input.to_vec(),
            reply_subject: reply_subject(0, service),
            deadline_unix_ms: crate::now_ms() + 60_000,
        }
    }

    /// The next attempt of `cmd`.
    pub fn retry(cmd: &v1::Command) -> v1::Command {
        let attempt = cmd.attempt + 1;
        v1::Command {
            command_id: command_id(&cmd.saga_id, &cmd.step, cmd.compensation, attempt),
            attempt,
            ..cmd.clone()
        }
    }

    /// Attempt 1 of the compensation of forward command `cmd`, by `action`.
    pub fn compensation(cmd: &v1::Command, action: &str) -> v1::Command {
        v1::Command {
            command_id: command_id(&cmd.saga_id, &cmd.step, true, 1),
            idempotency_key: idempotency_key(&cmd.saga_id, &cmd.step, true),
            action: action.to_string(),
            attempt: 1,
            compensation: true,
            compensates_key: cmd.idempotency_key.clone(),
            ..cmd.clone()
        }
    }

    /// Publishes `cmd` as a node does (through JetStream, `Nats-Msg-Id` = its command id) and
    /// returns the reply's outcome (at most [`REPLY_TIMEOUT`]).
    pub async fn call(&self, cmd: &v1::Command) -> Result<Outcome, Error> {
        let (reply, _) = self.call_raw(cmd).await?;
        match reply.outcome {
            Some(v1::reply::Outcome::Success(s)) => Ok(Outcome::Success(s.output)),
            Some(v1::reply::Outcome::Failure(f)) => Ok(Outcome::Failure {
                kind: f.kind,
                message: f.message,
            }),
            None => Err("a reply without an outcome".into()),
        }
    }

    /// Like [`TestBed::call`], with the command carrying a `traceparent` (a child of the
    /// saga's root span, as a node's `step.attempt` span would be); returns the whole reply
    /// and its headers.
    pub async fn call_raw(&self, cmd: &v1::Command) -> Result<(v1::Reply, HeaderMap), Error> {
        let mut replies = self.client.subscribe(cmd.reply_subject.clone()).await?;
        let mut headers = HeaderMap::new();
        headers.insert(async_nats::header::NATS_MESSAGE_ID, cmd.command_id.as_str());
        let context = crate::trace::saga_root(&cmd.saga_id).child();
        crate::trace::inject(&mut headers, &context, None);
        self.js
            .publish_with_headers(
                command_subject(&cmd.service, &cmd.action),
                headers,
                cmd.encode_to_vec().into(),
            )
            .await?
            .await?;
        let wait = async {
            while let Some(message) = replies.next().await {
                let reply = v1::Reply::decode(message.payload.as_ref())?;
                if reply.command_id == cmd.command_id {
                    return Ok((reply, message.headers.unwrap_or_default()));
                }
            }
            Err::<_, Error>("the reply subscription ended".into())
        };
        tokio::time::timeout(REPLY_TIMEOUT, wait)
            .await
            .map_err(|_| format!("no reply to {} within {REPLY_TIMEOUT:?}", cmd.command_id))?
    }
}

impl Drop for TestBed {
    fn drop(&mut self) {
        self.cancel.cancel();
    }
}
