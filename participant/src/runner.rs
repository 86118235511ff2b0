//! The runner: a service's consumer group feeding a supervised pool of instances.
//!
//! At most `in_hand` commands are held at once (running, or waiting in an instance's
//! mailbox): beyond that the pull loop waits for one to finish, and the rest stay in
//! JetStream, where other processes' instances can take them. Without this bound a slow
//! service would pull every pending command into memory (`max_ack_pending` of them).
//!
//! For each command: decode and check it (a malformed one is dead-lettered, never answered:
//! answering it could publish anywhere), skip it if it is long past its deadline, run the
//! handler inside a `participant.handle` span (a child of the `step.attempt` span named by the
//! command's `traceparent`, or of the saga's root), publish the reply through JetStream with
//! `Nats-Msg-Id: reply/<command id>` and the span's `traceparent`, and ack only once the reply
//! is stored. A handler that is [`Unavailable`] or a reply that cannot be stored returns the
//! command (nak with a delay); a handler that panics kills its instance, whose commands go
//! back to JetStream at once while the pool restarts it.

use std::sync::Arc;
use std::time::Duration;

use async_nats::jetstream;
use async_nats::HeaderMap;
use futures::future::BoxFuture;
use prost::Message as _;
use ractor::ActorRef;
use sagaflow_proto::v1;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tracing::Instrument as _;

use crate::command::check_command;
use crate::consume::{pull_forever, Flow};
use crate::consumer::{ensure_consumer, ConsumerSettings};
use crate::pool::{Job, PoolStats, ServicePool, ServicePoolArgs, ServicePoolMsg};
use crate::trace::{self, TraceParent};
use crate::{nak, Handler, Outcome, Unavailable};

/// Messages asked for per pull request (at most the commands in hand).
const PULL_BATCH: usize = 256;

/// How long [`Running::shutdown`] waits for the commands in hand before stopping the pool.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(10);

/// The DLQ source of malformed commands.
const DLQ_SOURCE: &str = "commands";

/// How a command's handling span is tied to the trace it continues: given the span (not yet
/// entered) and the remote parent, returns the context to put in the reply. The default gives
/// the parent's trace a fresh random span id; a process exporting spans with OpenTelemetry
/// makes the span a child of `parent` and returns the span's own ids.
pub type ContinueTrace = fn(&tracing::Span, &TraceParent) -> TraceParent;

/// Why a runner could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    /// The instance pool could not be spawned.
    #[error("cannot start the `{service}` service pool")]
    Spawn {
        /// The service.
        service: String,
        /// The actor system's error.
        #[source]
        source: ractor::SpawnErr,
    },
}

/// Runs one service: see the [module docs](self).
pub struct Runner {
    js: jetstream::Context,
    service: String,
    handler: Arc<dyn Handler>,
    consumer: ConsumerSettings,
    instances: usize,
    in_hand: Option<usize>,
    skip_expired: Option<Duration>,
    continue_trace: ContinueTrace,
}

impl std::fmt::Debug for Runner {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Runner")
            .field("service", &self.service)
            .field("consumer", &self.consumer)
            .field("instances", &self.instances)
            .field("in_hand", &self.in_hand)
            .field("skip_expired", &self.skip_expired)
            .finish()
    }
}

fn child_of(_span: &tracing::Span, parent: &TraceParent) -> TraceParent {
    parent.child()
}

impl Runner {
    /// A runner of `service` (`hotel`) with `handler`, on the JetStream context `js`:
    /// 4 instances, 4 commands in hand per instance, the default [`ConsumerSettings`], commands
    /// more than 30 s past their deadline skipped.
    pub fn new(js: jetstream::Context, service: impl Into<String>, handler: impl Handler) -> Self {
        Runner::shared(js, service, Arc::new(handler))
    }

    /// Like [`Runner::new`], with a handler that is already shared.
    pub fn shared(
        js: jetstream::Context,
        service: impl Into<String>,
        handler: Arc<dyn Handler>,
    ) -> Self {
        Runner {
            js,
            service: service.into(),
            handler,
            consumer: ConsumerSettings::default(),
            instances: 4,
            in_hand: None,
            skip_expired: Some(Duration::from_secs(30)),
            continue_trace: child_of,
        }
    }

    /// Instances in the pool, each handling one command at a time (at least 1).
    pub fn instances(mut self, instances: usize) -> Self {
        self.instances = instances.max(1);
        self
    }

    /// Commands held at once, running or queued (default: 4 per instance).
    pub fn in_hand(mut self, commands: usize) -> Self {
        self.in_hand = Some(commands.max(1));
        self
    }

    /// The consumer's settings (they must match whatever created the consumer).
    pub fn consumer(mut self, settings: ConsumerSettings) -> Self {
        self.consumer = settings;
        self
    }

    /// Skip (ack, no work, no reply) a command whose `deadline_unix_ms` passed more than
    /// `grace` ago by this machine's clock: the saga stopped waiting for that attempt, and a
    /// newer attempt with the same idempotency key may already be out. The grace absorbs clock
    /// differences between this machine and the orchestrator's; `None` never skips (commands
    /// still expire from the stream at their step's timeout, by the server's clock).
    pub fn skip_expired(mut self, grace: Option<Duration>) -> Self {
        self.skip_expired = grace;
        self
    }

    /// How each handling span joins the saga's trace (see [`ContinueTrace`]).
    pub fn continue_trace(mut self, hook: ContinueTrace) -> Self {
        self.continue_trace = hook;
        self
    }

    /// Spawns the pool and starts pulling. The consumer is created (or bound) by the pull
    /// loop, which retries with backoff while the stream does not exist yet (a node not yet
    /// started). Stops when `cancel` fires or at [`Running::shutdown`].
    pub async fn start(self, cancel: CancellationToken) -> Result<Running, StartError> {
        let args = ServicePoolArgs {
            service: self.service.clone(),
            instances: self.instances,
        };
        let (pool, handle) = ractor::Actor::spawn(None, ServicePool, args)
            .await
            .map_err(|source| StartError::Spawn {
                service: self.service.clone(),
                source,
            })?;
        let pool_task = tokio::spawn(async move {
            if let Err(e) = handle.await {
                tracing::error!(error = %e, "service pool task failed");
            }
        });
        let cancel = cancel.child_token();
        let in_hand = self.in_hand.unwrap_or(self.instances * 4);
        let service = self.service.clone();
        let consumer_task = tokio::spawn(consume(
            Arc::new(Shared {
                js: self.js,
                service: self.service,
                handler: self.handler,
                consumer: self.consumer,
                skip_expired: self.skip_expired,
                continue_trace: self.continue_trace,
            }),
            pool.clone(),
            in_hand,
            cancel.clone(),
        ));
        tracing::info!(
            service,
            instances = self.instances,
            in_hand,
            "participant service started"
        );
        Ok(Running {
            service,
            pool,
            pool_task,
            consumer_task: Some(consumer_task),
            cancel,
        })
    }
}

/// A started [`Runner`].
#[derive(Debug)]
pub struct Running {
    service: String,
    pool: ActorRef<ServicePoolMsg>,
    pool_task: JoinHandle<()>,
    consumer_task: Option<JoinHandle<()>>,
    cancel: CancellationToken,
}

impl Running {
    /// Stops pulling (a command waiting for a place goes back to JetStream at once) and
    /// returns when the pull loop has ended; the commands in hand still finish.
    pub async fn stop_pulling(&mut self) {
        self.cancel.cancel();
        if let Some(task) = self.consumer_task.take() {
            let _ = task.await;
        }
    }

    /// The service.
    pub fn service(&self) -> &str {
        &self.service
    }

    /// The instance pool (supervision tests send it messages).
    pub fn pool(&self) -> &ActorRef<ServicePoolMsg> {
        &self.pool
    }

    /// The pool's counters (`None` if it stopped).
    pub async fn stats(&self) -> Option<PoolStats> {
        ractor::call_t!(self.pool, ServicePoolMsg::Stats, 1_000).ok()
    }

    /// Stops taking commands, waits (at most 10 s) for the commands in hand, then stops the
    /// pool; whatever it still holds goes back to JetStream for redelivery.
    pub async fn shutdown(mut self) {
        self.stop_pulling().await;
        let deadline = tokio::time::Instant::now() + DRAIN_TIMEOUT;
        loop {
            let stats = ractor::call_t!(self.pool, ServicePoolMsg::Stats, 1_000).ok();
            let idle = stats.is_none_or(|s| s.completed + s.returned >= s.dispatched);
            if idle || tokio::time::Instant::now() >= deadline {
                if !idle {
                    tracing::warn!(service = %self.service, "service pool still busy at shutdown, returning its commands");
                }
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        self.pool.stop(None);
        let _ = self.pool_task.await;
        tracing::info!(service = %self.service, "participant service stopped");
    }
}

/// What every command of one runner needs.
struct Shared {
    js: jetstream::Context,
    service: String,
    handler: Arc<dyn Handler>,
    consumer: ConsumerSettings,
    skip_expired: Option<Duration>,
    continue_trace: ContinueTrace,
}

async fn consume(
    shared: Arc<Shared>,
    pool: ActorRef<ServicePoolMsg>,
    in_hand: usize,
    cancel: CancellationToken,
) {
    let what = sagaflow_proto::subjects::service_consumer(&shared.service);
    let slots = Arc::new(tokio::sync::Semaphore::new(in_hand));
    pull_forever(
        &what,
        PULL_BATCH.min(in_hand),
        cancel.clone(),
        || ensure_consumer(&shared.js, &shared.service, &shared.consumer),
        |message| {
            let message = Arc::new(message);
            let slots = slots.clone();
            let shared = shared.clone();
            let pool = pool.clone();
            let cancel = cancel.clone();
            async move {
                // Waits for a place; on shutdown the command goes back to JetStream at once.
                let slot = tokio::select! {
                    slot = slots.acquire_owned() => slot,
                    () = cancel.cancelled() => {
                        nak(&message, Duration::ZERO).await;
                        return Flow::Stop;
                    }
                };
                let Ok(slot) = slot else {
                    return Flow::Stop;
                };
                let job = CommandJob {
                    message: message.clone(),
                    shared: shared.clone(),
                    _slot: slot,
                };
                if pool
                    .cast(ServicePoolMsg::Dispatch(Box::new(job), Box::new(message)))
                    .is_err()
                {
                    tracing::warn!(service = %shared.service, "service pool stopped; leaving commands to other instances");
                    return Flow::Stop;
                }
                Flow::Continue
            }
        },
    )
    .await;
}

async fn ack(message: &jetstream::Message) {
    if let Err(e) = message.ack().await {
        // Redelivered after ack_wait; handlers are idempotent.
        tracing::warn!(subject = %message.subject, error = %e, "ack failed");
    }
}

/// One command being handled by an instance.
struct CommandJob {
    message: Arc<jetstream::Message>,
    shared: Arc<Shared>,
    /// Its place among the commands in hand, given back when the job is done or dropped.
    _slot: tokio::sync::OwnedSemaphorePermit,
}

impl Job for CommandJob {
    fn run(self: Box<Self>) -> BoxFuture<'static, ()> {
        Box::pin(async move { self.handle().await })
    }
}

impl CommandJob {
    async fn dead_letter(&self, reason: &str) {
        crate::dlq::dead_letter(&self.shared.js, DLQ_SOURCE, &self.message, reason).await;
    }

    async fn handle(self) {
        let cmd = match v1::Command::decode(self.message.payload.as_ref()) {
            Ok(c) if !c.reply_subject.is_empty() && !c.command_id.is_empty() => c,
            Ok(_) => {
                return self
                    .dead_letter("command lacks reply_subject or command_id")
                    .await
            }
            Err(e) => return self.dead_letter(&format!("undecodable command: {e}")).await,
        };
        if let Err(why) = check_command(&cmd) {
            return self.dead_letter(&why).await;
        }
        if let Some(grace) = self.shared.skip_expired {
            let late_ms = crate::now_ms().saturating_sub(cmd.deadline_unix_ms);
            if cmd.deadline_unix_ms > 0
                && u128::try_from(late_ms).is_ok_and(|late| late > grace.as_millis())
            {
                tracing::warn!(
                    command_id = %cmd.command_id, late_ms,
                    "command skipped: its deadline passed (if every command is skipped, this machine's clock runs ahead)"
                );
                return ack(&self.message).await;
            }
        }
        let headers = self.message.headers.as_ref();
        let parent =
            TraceParent::from_headers(headers).unwrap_or_else(|| trace::saga_root(&cmd.saga_id));
        let tracestate = trace::header(headers, trace::TRACESTATE).map(str::to_string);
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
        let context = (self.shared.continue_trace)(&span, &parent);
        self.answer(cmd, context, tracestate).instrument(span).await;
    }

    /// Handles a checked command inside its span, replies (with `context` as the reply's trace
    /// context) and acks.
    async fn answer(self, cmd: v1::Command, context: TraceParent, tracestate: Option<String>) {
        let span = tracing::Span::current();
        tracing::debug!("handling command");
        let outcome = match self.shared.handler.handle(&cmd).await {
            Ok(o) => o,
            Err(Unavailable(e)) => {
                span.record("outcome", "unavailable");
                span.record("otel.status_description", e.as_str());
                tracing::warn!(command_id = %cmd.command_id, error = %e, "participant unavailable, command returned");
                return nak(&self.message, Duration::from_millis(500)).await;
            }
        };
        match &outcome {
            Outcome::Success(_) => {
                span.record("outcome", "success");
            }
            Outcome::Failure { kind, message } | Outcome::Transient { kind, message } => {
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
            outcome: Some(outcome.into_reply()),
        };
        let mut headers = HeaderMap::new();
        headers.insert(
            async_nats::header::NATS_MESSAGE_ID,
            format!("reply/{}", cmd.command_id).as_str(),
        );
        trace::inject(&mut headers, &context, tracestate.as_deref());
        let published = match self
            .shared
            .js
            .publish_with_headers(cmd.reply_subject, headers, reply.encode_to_vec().into())
            .await
        {
            Ok(ack) => ack.await.map(|_| ()).map_err(|e| e.to_string()),
            Err(e) => Err(e.to_string()),
        };
        match published {
            Ok(()) => ack(&self.message).await,
            Err(e) => {
                span.record(
                    "otel.status_description",
                    format!("reply not published: {e}").as_str(),
                );
                tracing::warn!(command_id = %cmd.command_id, error = %e, "cannot publish reply, command returned");
                nak(&self.message, Duration::from_millis(500)).await;
            }
        }
    }
}
