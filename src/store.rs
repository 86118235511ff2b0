//! Saga snapshots in the `sagaflow_sagas` KV bucket, written compare-and-set on the revision.
//!
//! Every write is published on the key's subject with
//!
//! - `Nats-Expected-Last-Subject-Sequence: <revision>`: the same compare-and-set as a KV
//!   `update` or `create` (a lost race is [`Error::Conflict`]);
//! - the index header ([`INDEX_HEADER`]): phase, status, start time and definition, so that a
//!   headers-only reader knows which sagas are unfinished without reading a snapshot
//!   (take-over, [`crate::index`]).
//!
//! The snapshot that finishes a saga (phase COMPLETED, COMPENSATED or FAILED) can carry a
//! per-message TTL ([`KvStateStore::expire_finished`]): the server removes it once the TTL has
//! passed, with no janitor. It also carries
//!
//! - `Nats-TTL: <seconds>s`: the bucket's stream has `allow_msg_ttl` (see
//!   [`crate::topology::ensure_sagas_bucket`]);
//! - `Nats-Rollup: sub`: older revisions of the key (kept when `streams.kv_history` > 1) are
//!   removed, so none of them can resurface as the latest value once the final one expires.
//!
//! Once it has expired the key has no message at all (no delete marker: the bucket has no
//! `subject_delete_marker_ttl`), so [`StateStore::load`] returns `None`. Every other write,
//! including the NEEDS_ATTENTION phase (not terminal), has no TTL and is kept while the saga
//! exists.

use std::time::Duration;

use async_nats::header::{NATS_EXPECTED_LAST_SUBJECT_SEQUENCE, NATS_MESSAGE_TTL, NATS_ROLLUP};
use async_nats::jetstream::{self, kv};
use async_nats::HeaderMap;
use async_trait::async_trait;
use sagaflow_actors::hash::partition_of;
use sagaflow_actors::machine::{Phase, Saga};
use sagaflow_actors::ports::{Error, StateStore};
use sagaflow_actors::wire;

use crate::topology::{saga_key, update_conflict};

/// Header of every snapshot write: `<phase> <status> <started ms> <definition> <version>`,
/// e.g. `COMPLETED SHIPPED 1765012345678 order 5f1c0e8a2b3d4c6e` (the version, the
/// definition's content hash, was added with versioned definitions: a header without it is
/// still read, as one of an unknown version).
///
/// It lets a reader that asks for headers only (a JetStream consumer with `headers_only`) know
/// what a saga is without its snapshot: take-over finds the unfinished sagas of a partition this
/// way, and [`crate::index`] lists sagas. One header, because the server scans every message's
/// header block for its own headers and stores it: four separate ones cost twice the bytes.
/// Snapshots written by versions before this header have none; readers treat them as
/// unfinished (and read them).
pub const INDEX_HEADER: &str = "Sagaflow-Index";

/// [`StateStore`] over a JetStream KV bucket.
#[derive(Clone, Debug)]
pub struct KvStateStore {
    kv: kv::Store,
    /// The context the bucket was opened with: writes are published through it.
    js: jetstream::Context,
    partitions: u32,
    /// TTL of finished snapshots, whole seconds (at least 1); `None`: kept forever.
    finished_ttl: Option<u64>,
}

impl KvStateStore {
    /// A store over `kv` (opened through `js`) with `partitions` partitions (part of every
    /// key). Finished sagas are kept forever unless [`KvStateStore::expire_finished`] is
    /// applied.
    pub fn new(js: jetstream::Context, kv: kv::Store, partitions: u32) -> Self {
        KvStateStore {
            kv,
            js,
            partitions,
            finished_ttl: None,
        }
    }

    /// Writes the snapshot that finishes a saga with a TTL of `after` (rounded up to whole
    /// seconds, at least 1 s). The bucket's stream must allow per-message TTLs.
    pub fn expire_finished(mut self, after: Duration) -> Self {
        let secs = after.as_secs() + u64::from(after.subsec_nanos() > 0);
        self.finished_ttl = Some(secs.max(1));
        self
    }

    /// The TTL of finished snapshots, if they expire.
    pub fn finished_ttl(&self) -> Option<Duration> {
        self.finished_ttl.map(Duration::from_secs)
    }

    /// The bucket.
    pub fn bucket(&self) -> &kv::Store {
        &self.kv
    }

    /// Key of a saga.
    pub fn key(&self, saga_id: &str) -> String {
        saga_key(partition_of(saga_id, self.partitions), saga_id)
    }

    /// Compare-and-set write of `saga` (encoded as `bytes`) over revision `expected` (0: the
    /// key must have no message), with the index header; a finished snapshot carries the TTL
    /// (if any) and rolls up older revisions.
    ///
    /// It is what KV `update` publishes (`Nats-Expected-Last-Subject-Sequence`), plus headers:
    /// `Nats-TTL: <seconds>s` (the bucket's stream has `allow_msg_ttl`, see
    /// [`crate::topology::ensure_sagas_bucket`]) and `Nats-Rollup: sub` (older revisions, kept
    /// when `streams.kv_history` > 1, are removed, so none can resurface as the latest value
    /// once the final one expires).
    async fn write(
        &self,
        saga: &Saga,
        key: &str,
        bytes: Vec<u8>,
        expected: u64,
    ) -> Result<u64, kv::UpdateError> {
        let subject = format!(
            "{}{key}",
            self.kv.put_prefix.as_deref().unwrap_or(&self.kv.prefix)
        );
        let mut headers = HeaderMap::new();
        headers.insert(
            NATS_EXPECTED_LAST_SUBJECT_SEQUENCE,
            expected.to_string().as_str(),
        );
        if saga.is_terminal() {
            if let Some(ttl) = self.finished_ttl {
                headers.insert(NATS_MESSAGE_TTL, format!("{ttl}s").as_str());
                headers.insert(NATS_ROLLUP, "sub");
            }
        }
        index_headers(saga, &mut headers);
        let ack = self
            .js
            .publish_with_headers(subject, headers, bytes.into())
            .await?
            .await?;
        Ok(ack.sequence)
    }

    /// [`KvStateStore::write`] of a new key; a key whose last message deletes or purges it
    /// (never written by Sagaflow, but possible by hand) counts as absent.
    async fn create(&self, saga: &Saga, key: &str, bytes: Vec<u8>) -> Result<u64, Error> {
        let conflict = || Error::Conflict {
            saga: saga.id.clone(),
            expected: None,
        };
        let first = match self.write(saga, key, bytes.clone(), 0).await {
            Ok(revision) => return Ok(revision),
            Err(e) if update_conflict(&e) => e,
            Err(e) => return Err(transport("create snapshot", &e)),
        };
        match self.kv.entry(key).await {
            Ok(Some(e)) if e.operation != kv::Operation::Put => {
                self.write(saga, key, bytes, e.revision).await.map_err(|e| {
                    if update_conflict(&e) {
                        conflict()
                    } else {
                        transport("create snapshot", &e)
                    }
                })
            }
            Ok(Some(_)) => Err(conflict()),
            Ok(None) => Err(transport("create snapshot", &first)),
            Err(e) => Err(transport("create snapshot", &e)),
        }
    }
}

/// Adds the index header of `saga` to `headers` (see [`INDEX_HEADER`]).
pub fn index_headers(saga: &Saga, headers: &mut HeaderMap) {
    // Statuses and definition names are validated labels; one that is not (a snapshot decoded
    // from elsewhere) is left out rather than risk a line break or a space in the header, and
    // readers then treat the saga as one without the header.
    let label =
        |v: &str| !v.is_empty() && v.len() <= 256 && v.bytes().all(|b| b.is_ascii_graphic());
    if !(label(&saga.status) && label(&saga.definition)) {
        return;
    }
    let value = format!(
        "{} {} {} {} {:016x}",
        saga.phase.as_str(),
        saga.status,
        saga.started_at,
        saga.definition,
        saga.fingerprint
    );
    headers.insert(INDEX_HEADER, value.as_str());
}

/// What the index header of one snapshot write says.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IndexHeaders {
    /// The saga's phase.
    pub phase: Phase,
    /// Its status label.
    pub status: String,
    /// Its definition name.
    pub definition: String,
    /// When it started (ms since the epoch).
    pub started_at: i64,
    /// The version of its definition it runs on (`None`: written before versions).
    pub version: Option<u64>,
}

impl IndexHeaders {
    /// The index header of a snapshot message, or `None` when it has none (written by an
    /// older version) or it does not parse.
    pub fn read(headers: Option<&HeaderMap>) -> Option<IndexHeaders> {
        let value = headers?.get(INDEX_HEADER)?.as_str();
        let mut parts = value.split(' ');
        let phase = Phase::from_name(parts.next()?)?;
        let status = parts.next()?.to_string();
        let started_at = parts.next()?.parse().ok()?;
        let definition = parts.next()?.to_string();
        let version = match parts.next() {
            Some(v) => Some(u64::from_str_radix(v, 16).ok()?),
            None => None,
        };
        if parts.next().is_some() {
            return None;
        }
        Some(IndexHeaders {
            phase,
            status,
            definition,
            started_at,
            version,
        })
    }
}

fn transport(operation: &'static str, e: &dyn std::fmt::Display) -> Error {
    Error::Transport {
        operation,
        message: e.to_string(),
    }
}

#[async_trait]
impl StateStore for KvStateStore {
    async fn load(&self, saga_id: &str) -> Result<Option<(Saga, u64)>, Error> {
        // No saga is ever created with such an id, and as a key it could make the server
        // close the connection (a line over `max_control_line`): it does not exist.
        if !sagaflow_actors::ids::valid_saga_id(saga_id) {
            return Ok(None);
        }
        let entry = self
            .kv
            .entry(self.key(saga_id))
            .await
            .map_err(|e| Error::Transport {
                operation: "load snapshot",
                message: e.to_string(),
            })?;
        match entry {
            Some(e) if e.operation == kv::Operation::Put => {
                let saga = wire::decode_snapshot(&e.value).map_err(|err| Error::Corrupt {
                    saga: saga_id.to_string(),
                    message: err.to_string(),
                })?;
                Ok(Some((saga, e.revision)))
            }
            _ => Ok(None),
        }
    }

    async fn save(&self, saga: &Saga, expected: Option<u64>) -> Result<u64, Error> {
        let bytes = wire::encode_snapshot(saga).map_err(|e| Error::Corrupt {
            saga: saga.id.clone(),
            message: e.to_string(),
        })?;
        let key = self.key(&saga.id);
        match expected {
            None => self.create(saga, &key, bytes).await,
            Some(rev) => self.write(saga, &key, bytes, rev).await.map_err(|e| {
                if update_conflict(&e) {
                    Error::Conflict {
                        saga: saga.id.clone(),
                        expected,
                    }
                } else {
                    transport("update snapshot", &e)
                }
            }),
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn the_index_header_round_trips_and_refuses_what_does_not_parse() {
        let def = sagaflow_actors::definition::parse(
            r#"
version = 1
name = "order"
[statuses]
initial = "PENDING"
completed = "SHIPPED"
compensated = "CANCELLED"
failed = "FAILED"
[[stage]]
name = "one"
[[stage.step]]
name = "charge"
action = "payment.charge"
read_only = true
"#,
            std::path::Path::new("t.toml"),
        );
        let def = match def {
            Ok(d) => d,
            Err(e) => panic!("{e:?}"),
        };
        let (mut saga, _) = Saga::start(&def, "order-1".into(), b"{}".to_vec(), 1_765_012_345_678);
        saga.phase = Phase::Completed;
        saga.status = "SHIPPED".into();
        let mut headers = HeaderMap::new();
        index_headers(&saga, &mut headers);
        assert_eq!(
            headers.get(INDEX_HEADER).unwrap().as_str(),
            format!(
                "COMPLETED SHIPPED 1765012345678 order {:016x}",
                def.fingerprint
            )
        );
        assert_eq!(
            IndexHeaders::read(Some(&headers)),
            Some(IndexHeaders {
                phase: Phase::Completed,
                status: "SHIPPED".into(),
                definition: "order".into(),
                started_at: 1_765_012_345_678,
                version: Some(def.fingerprint),
            })
        );
        // Written before versions: read, with no version.
        let mut older = HeaderMap::new();
        older.insert(INDEX_HEADER, "COMPLETED SHIPPED 1765012345678 order");
        assert_eq!(IndexHeaders::read(Some(&older)).unwrap().version, None);
        saga.status = "NOT A LABEL".into();
        let mut none = HeaderMap::new();
        index_headers(&saga, &mut none);
        assert!(none.get(INDEX_HEADER).is_none());
        for bad in [
            "",
            "DONE SHIPPED 1 order",
            "COMPLETED SHIPPED x order",
            "COMPLETED SHIPPED 1",
            "COMPLETED SHIPPED 1 order extra",
        ] {
            let mut h = HeaderMap::new();
            h.insert(INDEX_HEADER, bad);
            assert_eq!(IndexHeaders::read(Some(&h)), None, "{bad:?}");
        }
        assert_eq!(IndexHeaders::read(None), None);
    }
}
