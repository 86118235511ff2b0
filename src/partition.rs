//! Consuming one partition: its events into the coordinator, with at most
//! [`EVENTS_IN_HAND`] of them in the node at once; on acquisition, the take-over scan that
//! brings back the partition's unfinished sagas; after a node departs, the orphan sweep. Which
//! partitions a node consumes is decided by [`crate::cluster`].

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use async_nats::jetstream;
use async_trait::async_trait;
use futures::StreamExt;
use ractor::ActorRef;
use sagaflow_actors::coordinator::{CoordinatorMsg, Input};
use sagaflow_actors::ports::{Delivery, Observer};
use tokio_util::sync::CancellationToken;

use crate::config::NodeConfig;
use crate::dlq::{self, JsDelivery};
use crate::events::{decode, ensure_consumer};
use crate::topology::SAGAS_BUCKET;

/// A delivery counted in its partition's in-flight total until it is acked, nak'ed,
/// dead-lettered or dropped.
struct Tracked {
    inner: Option<Box<JsDelivery>>,
    count: Arc<AtomicUsize>,
}

impl Tracked {
    fn new(inner: JsDelivery, count: Arc<AtomicUsize>) -> Self {
        count.fetch_add(1, Ordering::SeqCst);
        Tracked {
            inner: Some(Box::new(inner)),
            count,
        }
    }
}

impl Drop for Tracked {
    fn drop(&mut self) {
        self.count.fetch_sub(1, Ordering::SeqCst);
    }
}

#[async_trait]
impl Delivery for Tracked {
    async fn ack(mut self: Box<Self>) {
        if let Some(d) = self.inner.take() {
            d.ack().await;
        }
    }
    async fn nak(mut self: Box<Self>, delay: Duration) {
        if let Some(d) = self.inner.take() {
            d.nak(delay).await;
        }
    }
    async fn in_progress(&self) {
        if let Some(d) = &self.inner {
            d.in_progress().await;
        }
    }
    fn delivered(&self) -> u32 {
        self.inner.as_ref().map_or(1, |d| d.delivered())
    }
    async fn dead_letter(mut self: Box<Self>, reason: String) {
        if let Some(d) = self.inner.take() {
            d.dead_letter(reason).await;
        }
    }
}

/// Events of one partition a node holds at once (delivered, not yet acked).
const EVENTS_IN_HAND: usize = 512;

/// Consumes partition `p` in fetched batches until `stop`; a batch already fetched is always
/// handed over in full, so stopping never strands pulled messages until their ack_wait.
pub(crate) async fn consume_partition(
    js: jetstream::Context,
    p: u32,
    cfg: NodeConfig,
    coordinator: ActorRef<CoordinatorMsg>,
    observer: Arc<dyn Observer>,
    stop: CancellationToken,
    in_flight: Arc<AtomicUsize>,
) {
    let mut failures = 0u32;
    let mut consumer = None;
    let mut recovered = false;
    while !stop.is_cancelled() {
        let c = match &consumer {
            Some(c) => c,
            None => match ensure_consumer(&js, p, &cfg.consumers).await {
                Ok(c) => consumer.insert(c),
                Err(e) => {
                    failures += 1;
                    let delay = sagaflow_actors::service::restart_backoff(failures);
                    tracing::warn!(partition = p, error = %crate::telemetry::error_chain(&e), ?delay, "cannot open partition consumer, retrying");
                    tokio::select! { _ = stop.cancelled() => return, _ = tokio::time::sleep(delay) => continue }
                }
            },
        };
        if !recovered {
            // Sagas of this partition waiting only on timers have no event coming: bring them back.
            match recover_partition(&js, p, &coordinator).await {
                Ok(n) => tracing::info!(partition = p, sagas = n, "partition recovered"),
                Err(e) => {
                    tracing::warn!(partition = p, error = %crate::telemetry::error_chain(&e), "cannot list partition sagas, retrying");
                    tokio::select! { _ = stop.cancelled() => return, _ = tokio::time::sleep(Duration::from_secs(1)) => continue }
                }
            }
            recovered = true;
        }
        // Back-pressure: at most EVENTS_IN_HAND events of this partition are in the node at
        // once, so its memory stays bounded when it falls behind; the rest wait in JetStream,
        // where no ack_wait runs. (This alone does not keep an overloaded node at full speed:
        // see "Overload" in docs/benchmarks.md.)
        let room = loop {
            let held = in_flight.load(Ordering::SeqCst);
            if held < EVENTS_IN_HAND {
                break EVENTS_IN_HAND - held;
            }
            tokio::select! {
                _ = stop.cancelled() => return,
                _ = tokio::time::sleep(Duration::from_millis(2)) => {}
            }
        };
        let batch = c
            .batch()
            .max_messages(room.min(256))
            .expires(Duration::from_millis(500))
            .messages()
            .await;
        let mut batch = match batch {
            Ok(b) => b,
            Err(e) => {
                failures += 1;
                tracing::warn!(partition = p, error = %e, "cannot fetch events, retrying");
                consumer = None;
                tokio::select! { _ = stop.cancelled() => return, _ = tokio::time::sleep(sagaflow_actors::service::restart_backoff(failures)) => continue }
            }
        };
        failures = 0;
        while let Some(next) = batch.next().await {
            match next {
                Ok(message) => {
                    match decode(
                        &message.subject,
                        message.headers.as_ref(),
                        &message.payload,
                        cfg.partitions,
                    ) {
                        Ok((saga_id, mut input)) => {
                            if matches!(input, Input::Created { .. })
                                && message.info().map_or(true, |i| i.delivered > 1)
                            {
                                // Redelivered: the saga may have moved on since; read the store.
                                input = Input::Started;
                            }
                            let delivery = Box::new(Tracked::new(
                                JsDelivery {
                                    message: Arc::new(message),
                                    source: "events",
                                },
                                in_flight.clone(),
                            ));
                            if coordinator
                                .cast(CoordinatorMsg::Deliver {
                                    saga_id,
                                    input,
                                    delivery,
                                })
                                .is_err()
                            {
                                return;
                            }
                        }
                        Err(refused) => {
                            observer.event_refused(refused.label);
                            dlq::dead_letter(&js, "events", &message, &refused.detail).await;
                        }
                    }
                }
                Err(e) => {
                    tracing::debug!(partition = p, error = %e, "fetch ended");
                    break;
                }
            }
        }
    }
}

/// Brings back every unfinished saga stored under partition `p`; returns how many.
///
/// Finished sagas are not read: the headers-only scan of [`crate::index::unfinished`] tells
/// them apart by the index header of their last write.
async fn recover_partition(
    js: &jetstream::Context,
    p: u32,
    coordinator: &ActorRef<CoordinatorMsg>,
) -> Result<usize, RecoverError> {
    let bucket = js
        .get_key_value(SAGAS_BUCKET)
        .await
        .map_err(RecoverError::Bucket)?;
    let ids = crate::index::unfinished(&bucket, p).await?;
    let n = ids.len();
    for saga_id in ids {
        if coordinator
            .cast(CoordinatorMsg::Recover { saga_id })
            .is_err()
        {
            return Err(RecoverError::CoordinatorGone);
        }
    }
    Ok(n)
}

/// Why a partition's unfinished sagas could not be brought back (retried after a second).
#[derive(Debug, thiserror::Error)]
enum RecoverError {
    /// The snapshot bucket could not be opened.
    #[error("cannot open the saga bucket")]
    Bucket(#[source] async_nats::jetstream::context::KeyValueError),
    /// The headers-only scan failed.
    #[error(transparent)]
    Scan(#[from] crate::index::ScanError),
    /// The coordinator stopped (the node is shutting down).
    #[error("the coordinator has stopped")]
    CoordinatorGone,
}

/// How far back, past three node TTLs, the orphan sweep looks for interrupted creations.
const ORPHAN_MARGIN: Duration = Duration::from_secs(30);

/// Takes up the sagas of `partitions` that a departed node may have left orphaned: written
/// recently, unfinished, and driven by no actor of this node (see `docs/semantics.md`, "No
/// orphans").
///
/// It waits one `node_ttl` first, then looks at writes from `3 × node_ttl + ORPHAN_MARGIN`
/// ago up to `node_ttl` ago: whatever the departed node wrote is at least a TTL old by the
/// time it is judged dead, and younger writes belong to sagas whose start may still be on its
/// way.
pub(crate) async fn sweep_orphans(
    js: jetstream::Context,
    partitions: Vec<u32>,
    node_ttl: Duration,
    clock: Arc<crate::clock::ClusterClock>,
    coordinator: ActorRef<CoordinatorMsg>,
    departed: Vec<String>,
) {
    tokio::time::sleep(node_ttl).await;
    let ttl_ms = i64::try_from(node_ttl.as_millis()).unwrap_or(i64::MAX);
    let margin_ms = i64::try_from(ORPHAN_MARGIN.as_millis()).unwrap_or(0);
    let now = clock.now_ms();
    let (since, until) = (
        now.saturating_sub(ttl_ms.saturating_mul(3).saturating_add(margin_ms)),
        now.saturating_sub(ttl_ms),
    );
    let bucket = match js.get_key_value(SAGAS_BUCKET).await {
        Ok(b) => b,
        Err(e) => {
            tracing::warn!(error = %e, ?departed, "orphan sweep skipped: cannot open the saga bucket");
            return;
        }
    };
    let mut candidates = 0;
    for p in partitions {
        match crate::index::recently_unfinished(&bucket, p, since, until).await {
            Ok(ids) => {
                candidates += ids.len();
                for saga_id in ids {
                    if coordinator.cast(CoordinatorMsg::Adopt { saga_id }).is_err() {
                        return;
                    }
                }
            }
            Err(e) => {
                tracing::warn!(partition = p, error = %crate::telemetry::error_chain(&e), ?departed, "orphan sweep of a partition failed")
            }
        }
    }
    tracing::debug!(?departed, candidates, "orphan sweep done");
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;
    use crate::topology;

    /// Stands in for the coordinator: hands every delivered event to the test, which decides
    /// when to ack it.
    struct Holder;

    impl ractor::Actor for Holder {
        type Msg = CoordinatorMsg;
        type State = tokio::sync::mpsc::UnboundedSender<Box<dyn Delivery>>;
        type Arguments = tokio::sync::mpsc::UnboundedSender<Box<dyn Delivery>>;

        async fn pre_start(
            &self,
            _: ActorRef<CoordinatorMsg>,
            tx: Self::Arguments,
        ) -> Result<Self::State, ractor::ActorProcessingErr> {
            Ok(tx)
        }

        async fn handle(
            &self,
            _: ActorRef<CoordinatorMsg>,
            msg: CoordinatorMsg,
            tx: &mut Self::State,
        ) -> Result<(), ractor::ActorProcessingErr> {
            if let CoordinatorMsg::Deliver { delivery, .. } = msg {
                let _ = tx.send(delivery);
            }
            Ok(())
        }
    }

    /// The next `n` deliveries (each within 30 s).
    async fn receive(
        held: &mut tokio::sync::mpsc::UnboundedReceiver<Box<dyn Delivery>>,
        n: usize,
    ) -> Vec<Box<dyn Delivery>> {
        let mut got = Vec::with_capacity(n);
        while got.len() < n {
            match tokio::time::timeout(Duration::from_secs(30), held.recv()).await {
                Ok(Some(d)) => got.push(d),
                _ => panic!("only {} of {n} events delivered", got.len()),
            }
        }
        got
    }

    /// The partition consumer's own ack-pending count, as the server sees it.
    async fn ack_pending(js: &jetstream::Context, p: u32) -> (usize, u64) {
        let mut c: jetstream::consumer::PullConsumer = js
            .get_stream(topology::EVENTS_STREAM)
            .await
            .unwrap()
            .get_consumer(&crate::events::consumer_name(p))
            .await
            .unwrap();
        let info = c.info().await.unwrap();
        (info.num_ack_pending, info.num_pending)
    }

    /// Back-pressure: a partition whose events are not acked (the node is behind) holds at
    /// most `EVENTS_IN_HAND` of them; the rest wait in JetStream, unpulled, and flow in as
    /// the held ones are acked. Nothing is lost or delivered twice on the way.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_partition_holds_at_most_its_cap_of_events_and_takes_more_as_they_are_acked() {
        use prost::Message as _;
        use sagaflow_proto::v1;

        let nats = tokio::task::spawn_blocking(sagaflow_devkit::nats_server::NatsServer::start)
            .await
            .unwrap()
            .unwrap();
        let cfg = NodeConfig::default();
        let js = jetstream::new(async_nats::connect(nats.url()).await.unwrap());
        topology::ensure(&js, &cfg.streams).await.unwrap();
        let extra = 88;
        let total = EVENTS_IN_HAND + extra;
        let mut acks = Vec::with_capacity(total);
        // Well-formed replies of sagas of partition 0 (the edge refuses any other).
        let sagas = (0..)
            .map(|i| format!("held-{i}"))
            .filter(|id| sagaflow_actors::hash::partition_of(id, cfg.partitions) == 0);
        for saga_id in sagas.take(total) {
            let reply = v1::Reply {
                command_id: crate::bus::command_id(&saga_id, "charge", false, 1),
                saga_id: saga_id.clone(),
                step: "charge".into(),
                attempt: 1,
                compensation: false,
                outcome: Some(v1::reply::Outcome::Success(v1::Success {
                    output: Vec::new(),
                })),
            };
            let subject = topology::event_subject(0, "reply");
            acks.push(
                js.publish(subject, reply.encode_to_vec().into())
                    .await
                    .unwrap(),
            );
        }
        for ack in acks {
            ack.await.unwrap();
        }

        let (tx, mut held) = tokio::sync::mpsc::unbounded_channel();
        let (holder, holder_task) = ractor::Actor::spawn(None, Holder, tx).await.unwrap();
        let stop = CancellationToken::new();
        let in_flight = Arc::new(AtomicUsize::new(0));
        let task = tokio::spawn(consume_partition(
            js.clone(),
            0,
            cfg,
            holder.clone(),
            Arc::new(sagaflow_actors::ports::NoopObserver),
            stop.clone(),
            in_flight.clone(),
        ));
        // The cap is reached, and nothing more is pulled while every held event is unacked.
        let mut first = receive(&mut held, EVENTS_IN_HAND).await;
        tokio::time::sleep(Duration::from_millis(700)).await;
        assert!(
            held.try_recv().is_err(),
            "an event beyond the cap of {EVENTS_IN_HAND} was pulled"
        );
        assert_eq!(in_flight.load(Ordering::SeqCst), EVENTS_IN_HAND);
        assert_eq!(
            ack_pending(&js, 0).await,
            (EVENTS_IN_HAND, extra as u64),
            "(ack pending, not yet delivered) at the server"
        );

        // Acking some makes room for exactly as many more.
        for d in first.drain(..extra) {
            d.ack().await;
        }
        let rest = receive(&mut held, extra).await;
        assert_eq!(in_flight.load(Ordering::SeqCst), EVENTS_IN_HAND);
        for d in first.into_iter().chain(rest) {
            d.ack().await;
        }
        assert_eq!(in_flight.load(Ordering::SeqCst), 0);
        let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
        while ack_pending(&js, 0).await != (0, 0) {
            assert!(
                tokio::time::Instant::now() < deadline,
                "acks not seen by the server: {:?}",
                ack_pending(&js, 0).await
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        assert!(held.try_recv().is_err(), "an event was delivered twice");

        stop.cancel();
        tokio::time::timeout(Duration::from_secs(10), task)
            .await
            .unwrap()
            .unwrap();
        holder.stop(None);
        holder_task.await.unwrap();
    }
}
