//! The demo analytics service: completed orders, revenue and per-SKU sales, from the lifecycle
//! events in `SAGA_STATUS`, through its own durable consumer `analytics`.
//!
//! # Exactly once
//! The totals live in one KV key (`sagaflow_analytics` / `totals`) together with the stream
//! sequence of the last event counted. One task per node reads the consumer in stream order, in
//! batches; for each batch it skips events at or below `last_stream_seq` (already counted),
//! adds the rest, writes the totals with one compare-and-set, and only then acks the batch. A
//! crash before the write redelivers the batch, which is counted then; a crash after it
//! redelivers events that are skipped. A failed write is retried (re-reading the totals on a
//! conflict) without pulling further, so the task never moves past an unsaved event.
//!
//! The consumer uses a *pinned client* priority group: however many nodes run the demo, the
//! server delivers to one pull client at a time, so events reach the totals in stream order.
//! The pin moves when the pinned client stops pulling for [`PIN_TIMEOUT`] (a crashed or
//! restarted node; a restarted node may wait that long before it gets the pin back).
//! A client never counts past a gap: if a pinned client died or stalled in the middle of a
//! batch, the next one finds the gap's events still in the stream and gives its later events
//! back until the gap's come again (after `ack_wait`), so none is skipped as already counted.
//!
//! Undecodable events are dead-lettered (`sagaflow.dlq.analytics`) once the batch is saved.

use std::collections::BTreeMap;
use std::time::Duration;

use async_nats::jetstream::{self, consumer, kv, stream};
use futures::{FutureExt, StreamExt};
use prost::Message as _;
use sagaflow_proto::v1;
use serde::{Deserialize, Serialize};
use tokio_util::sync::CancellationToken;

use super::{Error, OrderInput};
use crate::config::ConsumerConfig;
use crate::topology::{ensure_bucket, STATUS_STREAM};

/// The totals bucket.
pub const ANALYTICS_BUCKET: &str = "sagaflow_analytics";
/// The key of the totals.
pub const TOTALS_KEY: &str = "totals";
/// Durable consumer name (and its priority group).
pub const CONSUMER: &str = "analytics";
/// How long the pinned client may stop pulling before another one takes over.
pub const PIN_TIMEOUT: Duration = Duration::from_secs(10);

/// Events per batch (and per totals write).
const BATCH: usize = 256;

/// Stored totals (append-only variants).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum AnalyticsRecord {
    /// Version 1.
    V1 {
        /// Orders completed.
        completed_orders: u64,
        /// Revenue of completed orders, cents.
        revenue_cents: u64,
        /// Lifecycle events counted (every saga, every status change).
        events_processed: u64,
        /// Stream sequence of the last event counted: events at or below it are skipped.
        last_stream_seq: u64,
        /// Per SKU: (units, revenue cents).
        skus: BTreeMap<String, (u64, u64)>,
    },
}

impl Default for AnalyticsRecord {
    fn default() -> Self {
        AnalyticsRecord::V1 {
            completed_orders: 0,
            revenue_cents: 0,
            events_processed: 0,
            last_stream_seq: 0,
            skus: BTreeMap::new(),
        }
    }
}

impl AnalyticsRecord {
    /// Adds the event at stream sequence `seq`, unless it was counted already; returns whether it
    /// was added.
    pub fn apply(&mut self, seq: u64, event: &v1::StatusEvent) -> bool {
        let AnalyticsRecord::V1 {
            completed_orders,
            revenue_cents,
            events_processed,
            last_stream_seq,
            skus,
        } = self;
        if seq <= *last_stream_seq {
            return false;
        }
        *last_stream_seq = seq;
        *events_processed += 1;
        if !(event.terminal && event.phase == "COMPLETED" && event.saga_name == "order") {
            return true;
        }
        *completed_orders += 1;
        match OrderInput::parse(&event.input) {
            Ok(order) => {
                let amount = u64::try_from(order.amount_cents).unwrap_or(0);
                *revenue_cents = revenue_cents.saturating_add(amount);
                for (sku, units, revenue) in split_revenue(amount, &order.item_pairs()) {
                    let e = skus.entry(sku).or_default();
                    e.0 = e.0.saturating_add(units);
                    e.1 = e.1.saturating_add(revenue);
                }
            }
            Err(e) => {
                tracing::warn!(saga_id = %event.saga_id, error = %e, "completed order with unreadable input: counted without revenue")
            }
        }
        true
    }

    /// As the gRPC report (SKUs sorted by name).
    pub fn report(&self) -> v1::SalesReport {
        let AnalyticsRecord::V1 {
            completed_orders,
            revenue_cents,
            events_processed,
            skus,
            ..
        } = self;
        v1::SalesReport {
            completed_orders: *completed_orders,
            revenue_cents: *revenue_cents,
            events_processed: *events_processed,
            skus: skus
                .iter()
                .map(|(sku, (units, revenue))| v1::SkuSales {
                    sku: sku.clone(),
                    units: *units,
                    revenue_cents: *revenue,
                })
                .collect(),
        }
    }

    /// Passes the event at stream sequence `seq` without counting it (it cannot be read: it
    /// is dead-lettered), so later ones are not held behind it; returns whether it was new.
    pub fn pass(&mut self, seq: u64) -> bool {
        let AnalyticsRecord::V1 {
            last_stream_seq, ..
        } = self;
        if seq <= *last_stream_seq {
            return false;
        }
        *last_stream_seq = seq;
        true
    }

    /// The last stream sequence counted.
    pub fn last_stream_seq(&self) -> u64 {
        let AnalyticsRecord::V1 {
            last_stream_seq, ..
        } = self;
        *last_stream_seq
    }
}

/// Splits `amount` over `items` in proportion to their quantities, the rounding remainder going
/// to the first item: `(sku, units, revenue)` per item, in order. Nothing for no items (or no
/// units).
pub fn split_revenue(amount: u64, items: &[(String, u32)]) -> Vec<(String, u64, u64)> {
    let total: u128 = items.iter().map(|(_, q)| u128::from(*q)).sum();
    if total == 0 {
        return Vec::new();
    }
    let mut out: Vec<(String, u64, u64)> = items
        .iter()
        .map(|(sku, q)| {
            // share ≤ amount, so it fits in u64.
            let share = u128::from(amount) * u128::from(*q) / total;
            (
                sku.clone(),
                u64::from(*q),
                u64::try_from(share).unwrap_or(u64::MAX),
            )
        })
        .collect();
    let given: u64 = out.iter().map(|(_, _, r)| *r).sum();
    if let Some(first) = out.first_mut() {
        first.2 += amount - given;
    }
    out
}

/// The totals key, read and written compare-and-set.
#[derive(Clone, Debug)]
pub struct Totals {
    kv: kv::Store,
}

impl Totals {
    /// Creates or opens the bucket (`replicas` replicas, history 1).
    pub async fn open(js: &jetstream::Context, replicas: usize) -> Result<Self, Error> {
        let kv = ensure_bucket(
            js,
            kv::Config {
                bucket: ANALYTICS_BUCKET.to_string(),
                description: "demo analytics: sales totals and the last status event counted"
                    .to_string(),
                history: 1,
                storage: stream::StorageType::File,
                num_replicas: replicas,
                ..Default::default()
            },
        )
        .await?;
        Ok(Totals { kv })
    }

    /// The totals and their revision (`None` before the first write).
    pub async fn load(&self) -> Result<(AnalyticsRecord, Option<u64>), Error> {
        let entry = self
            .kv
            .entry(TOTALS_KEY)
            .await
            .map_err(|e| Error::Storage {
                operation: "read analytics totals",
                message: e.to_string(),
            })?;
        match entry {
            Some(e) if e.operation == kv::Operation::Put => {
                let record = postcard::from_bytes::<AnalyticsRecord>(&e.value).map_err(|err| {
                    Error::Corrupt {
                        what: "analytics totals",
                        key: TOTALS_KEY.to_string(),
                        message: err.to_string(),
                    }
                })?;
                Ok((record, Some(e.revision)))
            }
            // A deleted key counts as absent; `create` works over a delete marker.
            _ => Ok((AnalyticsRecord::default(), None)),
        }
    }

    /// Writes `record` if the key is still at `revision`. `Ok(false)`: someone else wrote first.
    async fn save(&self, record: &AnalyticsRecord, revision: Option<u64>) -> Result<bool, Error> {
        let bytes = postcard::to_stdvec(record).map_err(|e| Error::Corrupt {
            what: "analytics totals",
            key: TOTALS_KEY.to_string(),
            message: e.to_string(),
        })?;
        let storage = |e: &dyn std::fmt::Display| Error::Storage {
            operation: "write analytics totals",
            message: e.to_string(),
        };
        match revision {
            None => match self.kv.create(TOTALS_KEY, bytes.into()).await {
                Ok(_) => Ok(true),
                Err(e) if crate::topology::create_conflict(&e) => Ok(false),
                Err(e) => Err(storage(&e)),
            },
            Some(rev) => match self.kv.update(TOTALS_KEY, bytes.into(), rev).await {
                Ok(_) => Ok(true),
                Err(e) if crate::topology::update_conflict(&e) => Ok(false),
                Err(e) => Err(storage(&e)),
            },
        }
    }
}

/// The sales report (zeros before the first completed order; an error before the analytics
/// service first started).
pub async fn sales(js: &jetstream::Context) -> Result<v1::SalesReport, Error> {
    // No bucket: no analytics service ever ran against this NATS (`demo_services = false`).
    let kv = js
        .get_key_value(ANALYTICS_BUCKET)
        .await
        .map_err(|e| Error::Storage {
            operation: "open the analytics bucket (is a node running the demo services?)",
            message: e.to_string(),
        })?;
    let (record, _) = Totals { kv }.load().await?;
    Ok(record.report())
}

/// Creates (or updates) the durable `analytics` consumer.
async fn ensure_consumer(
    js: &jetstream::Context,
    cfg: &ConsumerConfig,
) -> Result<consumer::PullConsumer, crate::consume::OpenError> {
    crate::consume::open_durable(
        js,
        STATUS_STREAM,
        consumer::pull::Config {
            durable_name: Some(CONSUMER.to_string()),
            description: Some("demo analytics: sales from lifecycle events".to_string()),
            filter_subject: "sagaflow.status.>".to_string(),
            ack_policy: consumer::AckPolicy::Explicit,
            ack_wait: cfg.event_ack_wait,
            max_ack_pending: cfg.max_ack_pending,
            priority_policy: consumer::PriorityPolicy::PinnedClient,
            priority_groups: vec![CONSUMER.to_string()],
            priority_timeout: PIN_TIMEOUT,
            ..Default::default()
        },
    )
    .await
}

/// Runs the analytics consumer until `cancel` fires.
pub async fn run(
    js: jetstream::Context,
    totals: Totals,
    cfg: ConsumerConfig,
    cancel: CancellationToken,
) {
    let mut failures = 0u32;
    while !cancel.is_cancelled() {
        let messages = match ensure_consumer(&js, &cfg).await {
            Ok(c) => c
                .stream()
                .group(CONSUMER)
                .max_messages_per_batch(BATCH)
                .heartbeat(Duration::from_secs(2))
                .expires(Duration::from_secs(4))
                .messages()
                .await
                .map_err(|e| e.to_string()),
            Err(e) => Err(crate::telemetry::error_chain(&e)),
        };
        let mut messages = match messages {
            Ok(m) => m,
            Err(e) => {
                failures += 1;
                let delay = sagaflow_actors::service::restart_backoff(failures);
                tracing::warn!(error = %e, ?delay, "cannot pull status events for analytics, retrying");
                tokio::select! { _ = cancel.cancelled() => return, _ = tokio::time::sleep(delay) => continue }
            }
        };
        failures = 0;
        loop {
            // `next()` is cancel-safe: a message is only taken when it is returned.
            let first = tokio::select! {
                _ = cancel.cancelled() => return,
                n = messages.next() => n,
            };
            let mut batch = match first {
                Some(Ok(m)) => vec![m],
                Some(Err(e)) => {
                    tracing::warn!(error = %e, "analytics status stream error");
                    continue;
                }
                None => break,
            };
            // Take what is already here, without waiting, up to a batch.
            while batch.len() < BATCH {
                match messages.next().now_or_never() {
                    Some(Some(Ok(m))) => batch.push(m),
                    Some(Some(Err(e))) => {
                        tracing::warn!(error = %e, "analytics status stream error")
                    }
                    _ => break,
                }
            }
            if !process(&js, &totals, batch, &cancel).await {
                return;
            }
        }
    }
}

/// Counts, saves and acks one batch; false when cancelled before the batch was saved (its
/// messages are returned).
async fn process(
    js: &jetstream::Context,
    totals: &Totals,
    batch: Vec<jetstream::Message>,
    cancel: &CancellationToken,
) -> bool {
    // (stream sequence, the event or why it cannot be read, the message)
    let mut events = Vec::with_capacity(batch.len());
    let mut undecodable = Vec::new();
    for message in batch {
        let seq = message.info().map(|i| i.stream_sequence).ok();
        match (seq, v1::StatusEvent::decode(message.payload.as_ref())) {
            (Some(seq), Ok(event)) => events.push((seq, Ok(event), message)),
            // Dead-lettered once the batch is saved; its sequence is passed like a counted one.
            (Some(seq), Err(e)) => {
                events.push((seq, Err(format!("undecodable status event: {e}")), message))
            }
            (None, _) => undecodable.push((message, "message without stream metadata".to_string())),
        }
    }
    // Events are counted in stream order: the totals remember only the last sequence counted,
    // so an event counted past a gap would make the gap's events look counted. A gap is an
    // event still held by another client (one that died mid-batch, say: its events come back
    // after `ack_wait`) or one the stream no longer has. Events past a gap that is still in
    // the stream and not acked wait (given back below); a gap acked already (an event passed by
    // an older version) or gone from the stream is stepped over.
    events.sort_by_key(|(seq, _, _)| *seq);
    let stream = js.get_stream(STATUS_STREAM).await.ok();
    let mut failures = 0u32;
    let mut held = 0usize;
    loop {
        let attempt = async {
            let (mut record, revision) = totals.load().await?;
            let mut added = 0usize;
            held = 0;
            for (k, (seq, event, _)) in events.iter().enumerate() {
                let next = record.last_stream_seq() + 1;
                if *seq > next && still_pending(stream.as_ref(), next).await {
                    held = events.len() - k;
                    break;
                }
                added += usize::from(match event {
                    Ok(event) => record.apply(*seq, event),
                    Err(_) => record.pass(*seq),
                });
            }
            if added == 0 {
                return Ok(true);
            }
            totals.save(&record, revision).await
        };
        match attempt.await {
            Ok(true) => break,
            // Another writer moved the totals: re-read and re-apply (skipping what it counted).
            Ok(false) => continue,
            Err(e) => {
                failures += 1;
                let delay = sagaflow_actors::service::restart_backoff(failures);
                tracing::warn!(error = %e, ?delay, "cannot save analytics totals, retrying");
                tokio::select! {
                    _ = cancel.cancelled() => {
                        for (_, _, m) in events {
                            let _ = m.ack_with(jetstream::AckKind::Nak(None)).await;
                        }
                        for (m, _) in undecodable {
                            let _ = m.ack_with(jetstream::AckKind::Nak(None)).await;
                        }
                        return false;
                    }
                    _ = tokio::time::sleep(delay) => {}
                }
            }
        }
    }
    let counted = events.len() - held;
    for (k, (_, event, m)) in events.into_iter().enumerate() {
        if let (true, Err(reason)) = (k < counted, &event) {
            undecodable.push((m, reason.clone()));
            continue;
        }
        if k >= counted {
            // Past a gap: back to JetStream, to be counted once the gap's events are.
            let _ = m
                .ack_with(jetstream::AckKind::Nak(Some(Duration::from_millis(500))))
                .await;
            continue;
        }
        if let Err(e) = m.ack().await {
            // Redelivered later and skipped as counted.
            tracing::debug!(error = %e, "analytics ack failed");
        }
    }
    if held > 0 {
        tracing::debug!(held, "status events wait for earlier ones held elsewhere");
    }
    for (m, reason) in undecodable {
        crate::dlq::dead_letter(js, "analytics", &m, &reason).await;
    }
    true
}

/// Whether the event at `seq` may still come to be counted: the consumer has not acked it (a
/// client holds it, or it waits for redelivery) and the stream still has it. Unknown: assume
/// it may, and wait.
async fn still_pending(stream: Option<&jetstream::stream::Stream>, seq: u64) -> bool {
    let Some(stream) = stream else {
        return true;
    };
    match stream
        .get_consumer::<consumer::pull::Config>(CONSUMER)
        .await
    {
        Ok(mut c) => match c.info().await {
            Ok(info) if info.ack_floor.stream_sequence >= seq => return false,
            Ok(_) => {}
            Err(_) => return true,
        },
        Err(_) => return true,
    }
    match stream.get_raw_message(seq).await {
        Ok(_) => true,
        Err(e) => !matches!(
            e.kind(),
            jetstream::stream::RawMessageErrorKind::NoMessageFound
        ),
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn items(v: &[(&str, u32)]) -> Vec<(String, u32)> {
        v.iter().map(|(s, q)| (s.to_string(), *q)).collect()
    }

    #[test]
    fn an_unreadable_event_is_passed_not_counted() {
        let mut r = AnalyticsRecord::default();
        assert!(r.pass(3));
        assert!(!r.pass(3), "passed once");
        assert!(!r.pass(2), "older sequences are behind the floor");
        assert_eq!(r.last_stream_seq(), 3);
        assert_eq!(r.report().events_processed, 0);
    }

    #[test]
    fn revenue_is_split_by_quantity_with_the_remainder_first() {
        assert_eq!(
            split_revenue(1000, &items(&[("A", 1), ("B", 2)])),
            vec![("A".into(), 1, 334), ("B".into(), 2, 666)]
        );
        assert_eq!(
            split_revenue(1200, &items(&[("A", 2)])),
            vec![("A".into(), 2, 1200)]
        );
        assert_eq!(
            split_revenue(10, &items(&[("A", 1), ("B", 1), ("C", 1)])),
            vec![("A".into(), 1, 4), ("B".into(), 1, 3), ("C".into(), 1, 3)]
        );
        assert!(split_revenue(10, &[]).is_empty());
        let big = split_revenue(u64::MAX, &items(&[("A", u32::MAX), ("B", u32::MAX)]));
        assert_eq!(
            big.iter().map(|(_, _, r)| u128::from(*r)).sum::<u128>(),
            u128::from(u64::MAX)
        );
    }

    fn completed(saga_id: &str, input: &str) -> v1::StatusEvent {
        v1::StatusEvent {
            saga_id: saga_id.into(),
            saga_name: "order".into(),
            status: "SHIPPED".into(),
            phase: "COMPLETED".into(),
            terminal: true,
            input: input.as_bytes().to_vec(),
            ..Default::default()
        }
    }

    #[test]
    fn totals_count_completed_orders_once() {
        let mut r = AnalyticsRecord::default();
        let a = completed(
            "order-A1",
            r#"{"order_id":"A1","amount_cents":1200,"items":[{"sku":"SKU-1","quantity":2},{"sku":"SKU-2","quantity":1}]}"#,
        );
        assert!(r.apply(3, &a));
        assert!(!r.apply(3, &a), "same sequence again is skipped");
        assert!(!r.apply(2, &a), "older sequence is skipped");
        let running = v1::StatusEvent {
            terminal: false,
            phase: "RUNNING".into(),
            ..completed("order-A2", "{}")
        };
        assert!(r.apply(4, &running));
        let other_saga = v1::StatusEvent {
            saga_name: "refund".into(),
            ..completed("r-1", r#"{"amount_cents":5}"#)
        };
        assert!(r.apply(5, &other_saga));
        let cancelled = v1::StatusEvent {
            phase: "COMPENSATED".into(),
            ..completed("order-A3", r#"{"amount_cents":5}"#)
        };
        assert!(r.apply(6, &cancelled));
        let report = r.report();
        assert_eq!(
            (
                report.completed_orders,
                report.revenue_cents,
                report.events_processed
            ),
            (1, 1200, 4)
        );
        assert_eq!(report.skus.len(), 2);
        assert_eq!(
            (
                report.skus[0].sku.as_str(),
                report.skus[0].units,
                report.skus[0].revenue_cents
            ),
            ("SKU-1", 2, 800)
        );
        assert_eq!(
            (
                report.skus[1].sku.as_str(),
                report.skus[1].units,
                report.skus[1].revenue_cents
            ),
            ("SKU-2", 1, 400)
        );
        assert_eq!(r.last_stream_seq(), 6);
    }

    #[test]
    fn totals_round_trip_in_their_envelope() {
        let mut r = AnalyticsRecord::default();
        r.apply(
            1,
            &completed(
                "o",
                r#"{"amount_cents":7,"items":[{"sku":"S","quantity":1}]}"#,
            ),
        );
        let bytes = postcard::to_stdvec(&r).unwrap();
        assert_eq!(bytes[0], 0, "variant V1 is tag 0");
        assert_eq!(postcard::from_bytes::<AnalyticsRecord>(&bytes).unwrap(), r);
    }
}
