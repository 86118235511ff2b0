//! The baseline: the bare JetStream message pattern of one 4-step order saga, written by hand
//! without Sagaflow, on the same NATS server.
//!
//! ```text
//! start ──cmd 1──▶ SAGABENCH_CMD ──(durable pull "participants")──▶ participant
//!                                                                      │ reply
//! orchestrator ◀──(durable pull "orchestrator")── SAGABENCH_RPL ◀──────┘
//!   │ KV compare-and-set of the saga's state in `sagabench_state` (create for step 1,
//!   │ update on the revision for steps 2-4), then cmd 2 … until step 4's write ends the saga
//! ```
//!
//! Per saga that is 4 commands, 4 replies and 4 state writes, each publish acknowledged by the
//! stream (JetStream publish, awaited) and carrying a `Nats-Msg-Id` like Sagaflow's, each
//! message acked after its effect. It is what one would build by hand for the same guarantees
//! at the message layer (durable commands and replies, a state write compare-and-set per step,
//! de-duplicated publishes), without the saga engine: no definition, no snapshot encoding, no
//! retries, timers, compensation, status events, parallel steps, partitions or leases. Its
//! latency ends when step 4's state write is stored.
//!
//! The streams, consumers and bucket have their own names (below), so the node is not
//! disturbed; they are deleted before (left over from an interrupted run) and after the run.

use std::sync::Arc;
use std::time::Duration;

use async_nats::jetstream::{self, consumer, kv, stream};
use async_nats::HeaderMap;
use bytes::Bytes;
use tokio::sync::Semaphore;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use super::load::{Done, Kind, StartError, StartFuture, Target};
use super::orders::Current;
use sagaflow::consume::{pull_forever, Flow};

/// Stream of the baseline's commands.
pub const COMMANDS_STREAM: &str = "SAGABENCH_CMD";
/// Stream of the baseline's replies.
pub const REPLIES_STREAM: &str = "SAGABENCH_RPL";
/// Bucket of the baseline's saga states.
pub const STATE_BUCKET: &str = "sagabench_state";

/// Steps of the baseline saga (the order saga has four: charge, reserve, prepare, notify).
pub const STEPS: u32 = 4;

/// Messages handled at once by each of the two workers.
const IN_FLIGHT: usize = 1024;

/// Messages pulled per pull request.
const BATCH: usize = 256;

/// Why the baseline could not be set up.
#[derive(Debug, thiserror::Error)]
#[error("baseline: cannot {what}: {message}")]
pub struct Error {
    /// What was being done.
    pub what: &'static str,
    /// Cause.
    pub message: String,
}

fn err(what: &'static str) -> impl Fn(&dyn std::fmt::Display) -> Error {
    move |e| Error {
        what,
        message: e.to_string(),
    }
}

/// The baseline's streams, bucket and two workers (participant and orchestrator), running.
#[derive(Debug)]
pub struct Baseline {
    js: jetstream::Context,
    cancel: CancellationToken,
    workers: tokio::task::JoinSet<()>,
    /// The run the orchestrator reports ends to.
    pub current: Current,
}

/// One message of the baseline: saga id, step, state revision, and the order input (so the
/// payloads are about the size of Sagaflow's).
#[derive(Debug, Clone, PartialEq, Eq)]
struct Msg {
    id: String,
    step: u32,
    revision: u64,
    input: Bytes,
}

impl Msg {
    fn encode(&self) -> Bytes {
        let mut out = format!("{} {} {}\n", self.id, self.step, self.revision).into_bytes();
        out.extend_from_slice(&self.input);
        out.into()
    }

    fn decode(b: &[u8]) -> Option<Msg> {
        let nl = b.iter().position(|c| *c == b'\n')?;
        let head = std::str::from_utf8(&b[..nl]).ok()?;
        let mut parts = head.split(' ');
        let id = parts.next()?.to_string();
        let step = parts.next()?.parse().ok()?;
        let revision = parts.next()?.parse().ok()?;
        Some(Msg {
            id,
            step,
            revision,
            input: Bytes::copy_from_slice(&b[nl + 1..]),
        })
    }
}

fn with_id(id: String) -> HeaderMap {
    let mut h = HeaderMap::new();
    h.insert(async_nats::header::NATS_MESSAGE_ID, id.as_str());
    h
}

async fn publish(
    js: &jetstream::Context,
    subject: String,
    msg_id: String,
    payload: Bytes,
) -> Result<(), String> {
    js.publish_with_headers(subject, with_id(msg_id), payload)
        .await
        .map_err(|e| e.to_string())?
        .await
        .map(|_| ())
        .map_err(|e| e.to_string())
}

async fn delete_all(js: &jetstream::Context) {
    // Missing ones are fine: they are deleted in case an interrupted run left them.
    let _ = js.delete_key_value(STATE_BUCKET).await;
    let _ = js.delete_stream(COMMANDS_STREAM).await;
    let _ = js.delete_stream(REPLIES_STREAM).await;
}

impl Baseline {
    /// Creates the streams, consumers and bucket (fresh) and starts the two workers.
    pub async fn start(js: jetstream::Context) -> Result<Self, Error> {
        delete_all(&js).await;
        for (name, subjects) in [
            (COMMANDS_STREAM, "sagabench.cmd.>"),
            (REPLIES_STREAM, "sagabench.rpl.>"),
        ] {
            js.create_stream(stream::Config {
                name: name.to_string(),
                subjects: vec![subjects.to_string()],
                storage: stream::StorageType::File,
                num_replicas: 1,
                duplicate_window: Duration::from_secs(120),
                ..Default::default()
            })
            .await
            .map_err(|e| err("create stream")(&e))?;
        }
        let state = js
            .create_key_value(kv::Config {
                bucket: STATE_BUCKET.to_string(),
                history: 1,
                storage: stream::StorageType::File,
                num_replicas: 1,
                ..Default::default()
            })
            .await
            .map_err(|e| err("create bucket")(&e))?;
        let consumer_config = |name: &str| consumer::pull::Config {
            durable_name: Some(name.to_string()),
            ack_policy: consumer::AckPolicy::Explicit,
            ack_wait: Duration::from_secs(30),
            max_ack_pending: 20_000,
            ..Default::default()
        };
        let commands = js
            .get_stream(COMMANDS_STREAM)
            .await
            .map_err(|e| err("open stream")(&e))?;
        commands
            .create_consumer(consumer_config("participants"))
            .await
            .map_err(|e| err("create consumer")(&e))?;
        let replies = js
            .get_stream(REPLIES_STREAM)
            .await
            .map_err(|e| err("open stream")(&e))?;
        replies
            .create_consumer(consumer_config("orchestrator"))
            .await
            .map_err(|e| err("create consumer")(&e))?;

        let cancel = CancellationToken::new();
        let current = Current::default();
        let mut workers = tokio::task::JoinSet::new();
        workers.spawn(serve(
            "baseline participants",
            js.clone(),
            COMMANDS_STREAM,
            "participants",
            cancel.clone(),
            Arc::new(Participant { js: js.clone() }),
        ));
        workers.spawn(serve(
            "baseline orchestrator",
            js.clone(),
            REPLIES_STREAM,
            "orchestrator",
            cancel.clone(),
            Arc::new(Orchestrator {
                js: js.clone(),
                state,
                current: current.clone(),
            }),
        ));
        Ok(Baseline {
            js,
            cancel,
            workers,
            current,
        })
    }

    /// A [`Target`] starting baseline sagas.
    pub fn target(&self) -> Starter {
        Starter {
            js: self.js.clone(),
        }
    }

    /// Stops the workers and deletes the streams, consumers and bucket.
    pub async fn stop(mut self) {
        self.cancel.cancel();
        while self.workers.join_next().await.is_some() {}
        delete_all(&self.js).await;
    }
}

/// Starts baseline sagas: publishes step 1's command.
#[derive(Debug, Clone)]
pub struct Starter {
    js: jetstream::Context,
}

impl Target for Starter {
    fn start(&self, id: String, index: u64, kind: Kind) -> StartFuture {
        let js = self.js.clone();
        Box::pin(async move {
            let req = super::orders::Orders::request(id.clone(), index, kind);
            let input = format!(
                r#"{{"order_id":"{}","customer":"{}","amount_cents":{},"items":[{{"sku":"{}","quantity":1}}]}}"#,
                req.order_id,
                req.customer,
                req.amount_cents,
                req.items
                    .first()
                    .map(|i| i.sku.as_str())
                    .unwrap_or_default()
            );
            let msg = Msg {
                id: id.clone(),
                step: 1,
                revision: 0,
                input: input.into(),
            };
            publish(
                &js,
                "sagabench.cmd.step1".to_string(),
                format!("{id}/1"),
                msg.encode(),
            )
            .await
            .map_err(StartError::Failed)
        })
    }

    /// The baseline has no business outcomes: every saga runs its four steps.
    fn expected_status(&self, _kind: Kind) -> &'static str {
        "DONE"
    }
}

trait Handler: Send + Sync + 'static {
    fn handle(
        self: Arc<Self>,
        msg: jetstream::Message,
    ) -> impl std::future::Future<Output = ()> + Send;
}

/// Pulls from `consumer` of `stream`, handling up to [`IN_FLIGHT`] messages at once.
async fn serve<H: Handler>(
    what: &'static str,
    js: jetstream::Context,
    stream: &'static str,
    consumer: &'static str,
    cancel: CancellationToken,
    handler: Arc<H>,
) {
    let permits = Arc::new(Semaphore::new(IN_FLIGHT));
    let tasks = TaskTracker::new();
    let open = || {
        let js = js.clone();
        async move {
            js.get_stream(stream)
                .await
                .map_err(|e| e.to_string())?
                .get_consumer::<consumer::pull::Config>(consumer)
                .await
                .map_err(|e| e.to_string())
        }
    };
    pull_forever(what, BATCH, cancel.clone(), open, |msg| {
        let permits = permits.clone();
        let handler = handler.clone();
        let tasks = tasks.clone();
        async move {
            let Ok(permit) = permits.acquire_owned().await else {
                return Flow::Stop;
            };
            tasks.spawn(async move {
                handler.handle(msg).await;
                drop(permit);
            });
            Flow::Continue
        }
    })
    .await;
    // Let the messages being handled finish (bounded: each call inside is).
    tasks.close();
    if tokio::time::timeout(Duration::from_secs(10), tasks.wait())
        .await
        .is_err()
    {
        tracing::warn!(worker = what, "baseline handlers still running at stop");
    }
}

struct Participant {
    js: jetstream::Context,
}

impl Handler for Participant {
    async fn handle(self: Arc<Self>, msg: jetstream::Message) {
        let Some(m) = Msg::decode(&msg.payload) else {
            tracing::warn!(subject = %msg.subject, "baseline: undecodable command");
            let _ = msg.ack().await;
            return;
        };
        // The "work" is nothing: the participant answers at once, like the demo services.
        let reply_id = format!("{}/{}/r", m.id, m.step);
        match publish(
            &self.js,
            "sagabench.rpl.orchestrator".to_string(),
            reply_id,
            m.encode(),
        )
        .await
        {
            Ok(()) => {
                let _ = msg.ack().await;
            }
            // Not acked: redelivered after ack_wait.
            Err(e) => tracing::warn!(error = %e, "baseline: cannot publish reply"),
        }
    }
}

struct Orchestrator {
    js: jetstream::Context,
    state: kv::Store,
    current: Current,
}

impl Handler for Orchestrator {
    async fn handle(self: Arc<Self>, msg: jetstream::Message) {
        let Some(m) = Msg::decode(&msg.payload) else {
            tracing::warn!(subject = %msg.subject, "baseline: undecodable reply");
            let _ = msg.ack().await;
            return;
        };
        let value: Bytes = {
            let mut v = format!("step {} done\n", m.step).into_bytes();
            v.extend_from_slice(&m.input);
            v.into()
        };
        // One compare-and-set per step: create for the first, update on the revision after.
        let written = if m.step == 1 {
            self.state
                .create(&m.id, value)
                .await
                .map_err(|e| e.to_string())
        } else {
            self.state
                .update(&m.id, value, m.revision)
                .await
                .map_err(|e| e.to_string())
        };
        let revision = match written {
            Ok(r) => r,
            Err(e) => {
                // A lost race can only be a redelivered reply whose write already happened.
                tracing::warn!(saga = %m.id, step = m.step, error = %e, "baseline: state write failed");
                let _ = msg.ack().await;
                return;
            }
        };
        if m.step < STEPS {
            let next = Msg {
                id: m.id.clone(),
                step: m.step + 1,
                revision,
                input: m.input.clone(),
            };
            if let Err(e) = publish(
                &self.js,
                format!("sagabench.cmd.step{}", next.step),
                format!("{}/{}", next.id, next.step),
                next.encode(),
            )
            .await
            {
                tracing::warn!(error = %e, "baseline: cannot publish command");
                return;
            }
        } else if let Some(tracker) = self.current.get() {
            if let Some(index) = tracker.index(&m.id) {
                tracker.complete(
                    index,
                    Done {
                        at: Instant::now(),
                        status: "DONE".to_string(),
                        by_poll: false,
                    },
                );
            }
        }
        let _ = msg.ack().await;
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn baseline_messages_round_trip() {
        let m = Msg {
            id: "bench-1-b0-7".into(),
            step: 3,
            revision: 42,
            input: Bytes::from_static(b"{\"a\":1}\nwith a newline"),
        };
        assert_eq!(Msg::decode(&m.encode()), Some(m));
        assert_eq!(Msg::decode(b"no newline"), None);
        assert_eq!(Msg::decode(b"id x 1\n"), None);
    }
}
