//! Which sagas exist, and in which phase, read from the index header of the snapshot bucket's
//! messages ([`crate::store::INDEX_HEADER`]) without reading snapshots.
//!
//! - [`unfinished`]: the unfinished sagas of one partition, for take-over. A headers-only
//!   consumer delivers the last write of each key; finished sagas cost one small message
//!   each and are never loaded.
//! - [`recently_unfinished`]: the sagas of one partition written since a moment and still
//!   unfinished, for the orphan sweep after a node leaves (see `docs/semantics.md`, "No
//!   orphans").
//! - [`SagaIndex`]: a node's live, in-memory view of every saga (id, definition, phase,
//!   status, start time), which `ListOrders` and `ListSagasNeedingAttention` page through. It is
//!   started by the first list call and stops after [`IDLE_STOP`] without one: while it runs,
//!   the node receives the headers of every snapshot write (see `docs/benchmarks.md`).

use std::collections::{BTreeSet, HashMap};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use async_nats::jetstream::consumer::{pull, DeliverPolicy};
use async_nats::jetstream::{self, kv};
use futures::StreamExt;
use sagaflow_actors::ids::valid_saga_id;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use crate::store::IndexHeaders;

/// A list index unused this long stops (its consumer is deleted); the next list starts it.
pub const IDLE_STOP: Duration = Duration::from_secs(120);
/// How long a list call waits for the index to reach the bucket's last write.
const CATCH_UP: Duration = Duration::from_secs(2);
/// How long a headers-only scan may take before it fails (and is retried by its caller).
const SCAN_TIMEOUT: Duration = Duration::from_secs(120);

/// The latest write of one key, as its headers tell it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Seen {
    /// Saga id.
    pub id: String,
    /// Its index header; `None` for a snapshot written by an older version.
    pub headers: Option<IndexHeaders>,
    /// When the server stored it (ms since the epoch).
    pub written_ms: i64,
}

impl Seen {
    /// Not known to be finished (finished, or no index header to tell).
    pub fn unfinished(&self) -> bool {
        !self.headers.as_ref().is_some_and(|h| h.phase.is_terminal())
    }
}

/// Why a scan failed.
#[derive(Debug, thiserror::Error)]
pub enum ScanError {
    /// The consumer could not be created or its messages read.
    #[error("cannot read the snapshot bucket's headers")]
    Read(#[source] Box<dyn std::error::Error + Send + Sync>),
    /// The list index ended before it had read what was there when it started.
    #[error("the list index stopped while starting")]
    Stopped,
    /// The scan took longer than its bound.
    #[error("reading the snapshot bucket's headers took longer than {0:?}")]
    TimedOut(Duration),
}

fn key_filter(bucket: &kv::Store, keys: &str) -> String {
    format!("{}{keys}", bucket.prefix)
}

/// An ordered, headers-only consumer of the writes of the keys matching `keys` (a KV key
/// pattern such as `3.*`), from `policy` on.
async fn headers_consumer(
    bucket: &kv::Store,
    keys: &str,
    policy: DeliverPolicy,
    description: &str,
) -> Result<jetstream::consumer::Consumer<pull::OrderedConfig>, ScanError> {
    bucket
        .stream
        .create_consumer(pull::OrderedConfig {
            filter_subject: key_filter(bucket, keys),
            deliver_policy: policy,
            headers_only: true,
            description: Some(description.into()),
            ..Default::default()
        })
        .await
        .map_err(|e| ScanError::Read(Box::new(e)))
}

/// The latest write of every key matching `keys` (a KV key pattern such as `3.*`) from
/// `policy` on, headers only, read until the consumer has nothing pending.
async fn scan(
    bucket: &kv::Store,
    keys: &str,
    policy: DeliverPolicy,
) -> Result<HashMap<String, Seen>, ScanError> {
    let prefix = bucket.prefix.clone();
    let consumer = headers_consumer(bucket, keys, policy, "sagaflow headers scan").await?;
    let mut seen = HashMap::new();
    if consumer.cached_info().num_pending == 0 {
        return Ok(seen);
    }
    let read = async {
        let mut messages = consumer
            .messages()
            .await
            .map_err(|e| ScanError::Read(Box::new(e)))?;
        while let Some(message) = messages.next().await {
            let message = message.map_err(|e| ScanError::Read(Box::new(e)))?;
            let (pending, written_ms) = message
                .info()
                .map(|i| (i.pending, unix_ms(i.published)))
                .unwrap_or((0, 0));
            if let Some(id) = message.subject.strip_prefix(prefix.as_str()) {
                if let Some(seen_one) = seen_of(id, message.headers.as_ref(), written_ms) {
                    seen.insert(seen_one.id.clone(), seen_one);
                }
            }
            if pending == 0 {
                break;
            }
        }
        Ok::<_, ScanError>(())
    };
    tokio::time::timeout(SCAN_TIMEOUT, read)
        .await
        .map_err(|_| ScanError::TimedOut(SCAN_TIMEOUT))??;
    Ok(seen)
}

/// A key (`<partition>.<saga id>`) and its headers as a [`Seen`]; `None` for a key that names
/// no saga (left alone).
fn seen_of(key: &str, headers: Option<&async_nats::HeaderMap>, written_ms: i64) -> Option<Seen> {
    let (_, id) = key.split_once('.')?;
    valid_saga_id(id).then(|| Seen {
        id: id.to_string(),
        headers: IndexHeaders::read(headers),
        written_ms,
    })
}

fn unix_ms(t: time::OffsetDateTime) -> i64 {
    i64::try_from(t.unix_timestamp_nanos() / 1_000_000).unwrap_or(i64::MAX)
}

/// Milliseconds since the epoch as a time for a consumer's start.
pub fn time_of_ms(ms: i64) -> time::OffsetDateTime {
    time::OffsetDateTime::from_unix_timestamp_nanos(i128::from(ms) * 1_000_000)
        .unwrap_or(time::OffsetDateTime::UNIX_EPOCH)
}

/// The sagas of `partition` that are not finished (or whose last write has no index header),
/// from the last write of every key: snapshots of finished sagas are not read.
pub async fn unfinished(bucket: &kv::Store, partition: u32) -> Result<Vec<String>, ScanError> {
    let seen = scan(
        bucket,
        &format!("{partition}.*"),
        DeliverPolicy::LastPerSubject,
    )
    .await?;
    Ok(seen
        .into_values()
        .filter(Seen::unfinished)
        .map(|s| s.id)
        .collect())
}

/// The sagas of `partition` last written between `since_ms` and `until_ms` (ms since the
/// epoch, by the server's clock) and unfinished by that write.
pub async fn recently_unfinished(
    bucket: &kv::Store,
    partition: u32,
    since_ms: i64,
    until_ms: i64,
) -> Result<Vec<String>, ScanError> {
    let seen = scan(
        bucket,
        &format!("{partition}.*"),
        DeliverPolicy::ByStartTime {
            start_time: time_of_ms(since_ms),
        },
    )
    .await?;
    Ok(seen
        .into_values()
        .filter(|s| s.unfinished() && s.written_ms <= until_ms)
        .map(|s| s.id)
        .collect())
}

/// One saga in the [`SagaIndex`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Listed {
    /// Saga id.
    pub id: String,
    /// What its last write's headers say (`None`: written by an older version; listed with
    /// every filter, the caller checks the snapshot).
    pub headers: Option<IndexHeaders>,
    /// When a finished saga's snapshot expires (ms since the epoch, server clock).
    expires_at: Option<i64>,
}

/// Order of a list: newest start first, then id.
type SortKey = (std::cmp::Reverse<i64>, String);

fn sort_key(l: &Listed) -> SortKey {
    (
        std::cmp::Reverse(l.headers.as_ref().map_or(i64::MAX, |h| h.started_at)),
        l.id.clone(),
    )
}

/// Where a page starts: after this (start time, id).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Cursor {
    started_at: i64,
    id: String,
}

impl Cursor {
    /// The cursor after `l`.
    pub fn after(l: &Listed) -> Cursor {
        let (std::cmp::Reverse(started_at), id) = sort_key(l);
        Cursor { started_at, id }
    }

    /// As a page token.
    pub fn token(&self) -> String {
        format!("{}.{}", self.started_at, self.id)
    }

    /// A page token back into a cursor; `None` if it is not one.
    pub fn parse(token: &str) -> Option<Cursor> {
        let (at, id) = token.split_once('.')?;
        let started_at = at.parse().ok()?;
        valid_saga_id(id).then(|| Cursor {
            started_at,
            id: id.to_string(),
        })
    }
}

#[derive(Debug, Default)]
struct State {
    by_id: HashMap<String, Listed>,
    order: BTreeSet<SortKey>,
}

impl State {
    /// Whether `id`'s entry already says what `headers` and `expires_at` say.
    fn unchanged(&self, id: &str, headers: Option<&IndexHeaders>, expires_at: Option<i64>) -> bool {
        self.by_id
            .get(id)
            .is_some_and(|l| l.headers.as_ref() == headers && l.expires_at == expires_at)
    }

    fn apply(&mut self, listed: Listed) {
        if let Some(old) = self.by_id.remove(&listed.id) {
            self.order.remove(&sort_key(&old));
        }
        self.order.insert(sort_key(&listed));
        self.by_id.insert(listed.id.clone(), listed);
    }

    fn forget(&mut self, id: &str) {
        if let Some(old) = self.by_id.remove(id) {
            self.order.remove(&sort_key(&old));
        }
    }
}

/// A live view of every saga in the bucket, kept by a headers-only consumer of every write.
///
/// Memory: about 150 bytes per saga (100,000 retained sagas: ~15 MB). Cost while it runs: the
/// server sends this node the headers of every snapshot write.
#[derive(Debug)]
pub struct SagaIndex {
    state: RwLock<State>,
    /// Stream sequence of the last write applied.
    applied: watch::Sender<u64>,
    /// A last sequence that was waited for in vain (its message is gone, e.g. expired): not
    /// waited for again.
    unreachable: Mutex<u64>,
    last_used: Mutex<Instant>,
    stop: CancellationToken,
}

impl SagaIndex {
    /// Starts an index over `bucket`; it has read every key's last write when this returns.
    pub async fn start(
        bucket: kv::Store,
        shutdown: &CancellationToken,
    ) -> Result<Arc<SagaIndex>, ScanError> {
        let prefix = bucket.prefix.clone();
        let consumer = headers_consumer(
            &bucket,
            ">",
            DeliverPolicy::LastPerSubject,
            "sagaflow list index",
        )
        .await?;
        let initial = consumer.cached_info().num_pending;
        let messages = consumer
            .messages()
            .await
            .map_err(|e| ScanError::Read(Box::new(e)))?;
        let index = Arc::new(SagaIndex {
            state: RwLock::default(),
            applied: watch::channel(0).0,
            unreachable: Mutex::new(0),
            last_used: Mutex::new(Instant::now()),
            stop: shutdown.child_token(),
        });
        let (ready_tx, ready) = tokio::sync::oneshot::channel();
        tokio::spawn(index.clone().follow(messages, prefix, initial, ready_tx));
        match tokio::time::timeout(SCAN_TIMEOUT, ready).await {
            Ok(Ok(Ok(()))) => Ok(index),
            Ok(Ok(Err(e))) => Err(e),
            Ok(Err(_)) => Err(ScanError::Stopped),
            Err(_) => {
                index.stop.cancel();
                Err(ScanError::TimedOut(SCAN_TIMEOUT))
            }
        }
    }

    async fn follow(
        self: Arc<Self>,
        mut messages: pull::Ordered,
        prefix: String,
        mut initial: u64,
        ready: tokio::sync::oneshot::Sender<Result<(), ScanError>>,
    ) {
        let mut ready = Some(ready);
        if initial == 0 {
            if let Some(r) = ready.take() {
                let _ = r.send(Ok(()));
            }
        }
        loop {
            let message = tokio::select! {
                _ = self.stop.cancelled() => break,
                m = messages.next() => m,
            };
            let message = match message {
                Some(Ok(m)) => m,
                Some(Err(e)) => {
                    // The ordered consumer recreates itself after gaps and reconnects; an error
                    // here is final for this index. The next list call starts a new one.
                    tracing::warn!(error = %e, "list index stopped");
                    if let Some(r) = ready.take() {
                        let _ = r.send(Err(ScanError::Read(Box::new(e))));
                    }
                    break;
                }
                None => break,
            };
            let Ok(info) = message.info() else { continue };
            let (seq, pending) = (info.stream_sequence, info.pending);
            let published_ms = unix_ms(info.published);
            if let Some(key) = message.subject.strip_prefix(prefix.as_str()) {
                if let Some(seen) = seen_of(key, message.headers.as_ref(), published_ms) {
                    let ttl_ms = message
                        .headers
                        .as_ref()
                        .and_then(|h| h.get(async_nats::header::NATS_MESSAGE_TTL))
                        .and_then(|v| parse_ttl_ms(v.as_str()));
                    let expires_at = ttl_ms.map(|t| published_ms.saturating_add(t));
                    // Most writes of a saga change none of what is listed (a step's progress).
                    let unchanged = self
                        .state
                        .read()
                        .is_ok_and(|s| s.unchanged(&seen.id, seen.headers.as_ref(), expires_at));
                    if !unchanged {
                        if let Ok(mut state) = self.state.write() {
                            state.apply(Listed {
                                id: seen.id,
                                headers: seen.headers,
                                expires_at,
                            });
                        }
                    }
                }
            }
            self.applied.send_replace(seq);
            if initial > 0 {
                initial = pending;
                if pending == 0 {
                    if let Some(r) = ready.take() {
                        let _ = r.send(Ok(()));
                    }
                }
            }
        }
        self.stop.cancel();
    }

    /// Whether it still follows the bucket.
    pub fn running(&self) -> bool {
        !self.stop.is_cancelled()
    }

    /// Stops following the bucket.
    pub fn stop(&self) {
        self.stop.cancel();
    }

    /// How long since a list last used it.
    pub fn idle(&self) -> Duration {
        self.last_used
            .lock()
            .map(|t| t.elapsed())
            .unwrap_or_default()
    }

    /// Waits (at most [`CATCH_UP`]) until every write up to `last_seq` (the bucket stream's
    /// last sequence when the list was asked for) is applied, so a list shows what was written
    /// before it was asked for.
    pub async fn catch_up(&self, last_seq: u64) {
        if let Ok(mut t) = self.last_used.lock() {
            *t = Instant::now();
        }
        if self.unreachable.lock().is_ok_and(|u| *u == last_seq) {
            return;
        }
        let mut rx = self.applied.subscribe();
        let reached = tokio::time::timeout(CATCH_UP, rx.wait_for(|s| *s >= last_seq)).await;
        if reached.is_err() {
            // The last message may be gone (expired); do not wait for it again.
            if let Ok(mut u) = self.unreachable.lock() {
                *u = last_seq;
            }
        }
    }

    /// Up to `n` listed sagas after `after` (newest first) that `keep` accepts, and whether
    /// more follow. Expired finished sagas are dropped on the way.
    pub async fn page(
        &self,
        after: Option<&Cursor>,
        n: usize,
        now_ms: i64,
        keep: impl Fn(&Listed) -> bool,
    ) -> (Vec<Listed>, bool) {
        let mut out = Vec::with_capacity(n.min(1024));
        let mut expired = Vec::new();
        let mut more = false;
        {
            let Ok(state) = self.state.read() else {
                return (out, false);
            };
            let start = after.map(|c| (std::cmp::Reverse(c.started_at), c.id.clone()));
            let range = match &start {
                Some(s) => state.order.range((
                    std::ops::Bound::Excluded(s.clone()),
                    std::ops::Bound::Unbounded,
                )),
                None => state.order.range(..),
            };
            for (_, id) in range {
                let Some(listed) = state.by_id.get(id) else {
                    continue;
                };
                if listed.expires_at.is_some_and(|at| at <= now_ms) {
                    expired.push(id.clone());
                    continue;
                }
                if !keep(listed) {
                    continue;
                }
                if out.len() == n {
                    more = true;
                    break;
                }
                out.push(listed.clone());
            }
        }
        if !expired.is_empty() {
            if let Ok(mut state) = self.state.write() {
                for id in &expired {
                    state.forget(id);
                }
            }
        }
        (out, more)
    }

    /// Forgets a saga whose snapshot is gone (expired before the index saw it go).
    pub fn forget(&self, id: &str) {
        if let Ok(mut state) = self.state.write() {
            state.forget(id);
        }
    }

    /// Number of sagas in the index.
    pub fn len(&self) -> usize {
        self.state.read().map_or(0, |s| s.by_id.len())
    }

    /// Whether the index is empty.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// A `Nats-TTL` value (`30s`, `1h`, or plain seconds) in milliseconds.
fn parse_ttl_ms(v: &str) -> Option<i64> {
    let v = v.trim();
    if v.eq_ignore_ascii_case("never") {
        return None;
    }
    if let Ok(secs) = v.parse::<i64>() {
        return Some(secs.saturating_mul(1000));
    }
    let (n, unit) = v.split_at(v.len().checked_sub(1)?);
    let n: i64 = n.parse().ok()?;
    let ms = match unit {
        "s" => 1_000,
        "m" => 60_000,
        "h" => 3_600_000,
        _ => return None,
    };
    Some(n.saturating_mul(ms))
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use sagaflow_actors::machine::Phase;

    fn listed(id: &str, started_at: i64) -> Listed {
        Listed {
            id: id.into(),
            headers: Some(IndexHeaders {
                phase: Phase::Running,
                status: "PENDING".into(),
                definition: "order".into(),
                started_at,
                version: None,
            }),
            expires_at: None,
        }
    }

    #[test]
    fn cursors_round_trip_and_refuse_junk() {
        let c = Cursor::after(&listed("order-A-1", 1_700_000_000_123));
        assert_eq!(Cursor::parse(&c.token()), Some(c));
        for junk in ["", "12", "x.order-1", "12.a b", "12.", "5"] {
            assert_eq!(Cursor::parse(junk), None, "{junk:?}");
        }
    }

    #[test]
    fn ttl_headers_parse() {
        assert_eq!(parse_ttl_ms("30s"), Some(30_000));
        assert_eq!(parse_ttl_ms("604800"), Some(604_800_000));
        assert_eq!(parse_ttl_ms("1h"), Some(3_600_000));
        assert_eq!(parse_ttl_ms("never"), None);
        assert_eq!(parse_ttl_ms("soon"), None);
    }

    #[tokio::test]
    async fn pages_are_newest_first_and_skip_what_expired() {
        let index = SagaIndex {
            state: RwLock::default(),
            applied: watch::channel(0).0,
            unreachable: Mutex::new(0),
            last_used: Mutex::new(Instant::now()),
            stop: CancellationToken::new(),
        };
        {
            let mut s = index.state.write().unwrap();
            for i in 0..10 {
                s.apply(listed(&format!("s-{i}"), 1000 + i));
            }
            // A rewrite moves the saga, not duplicates it.
            s.apply(listed("s-3", 1003));
            let mut gone = listed("s-5", 1005);
            gone.expires_at = Some(50);
            s.apply(gone);
        }
        let (first, more) = index.page(None, 4, 100, |_| true).await;
        let ids: Vec<_> = first.iter().map(|l| l.id.as_str()).collect();
        assert_eq!(ids, ["s-9", "s-8", "s-7", "s-6"]);
        assert!(more);
        let cursor = Cursor::after(first.last().unwrap());
        let (second, more) = index.page(Some(&cursor), 4, 100, |_| true).await;
        let ids: Vec<_> = second.iter().map(|l| l.id.as_str()).collect();
        assert_eq!(ids, ["s-4", "s-3", "s-2", "s-1"], "s-5 expired");
        assert!(more);
        assert_eq!(index.len(), 9);
        let (odd, more) = index
            .page(None, 100, 100, |l| l.id.ends_with(['1', '3']))
            .await;
        assert_eq!(odd.len(), 2);
        assert!(!more);
    }
}
