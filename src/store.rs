//! Saga snapshots in the `sagaflow_sagas` KV bucket, written compare-and-set on the revision.
//!
//! The snapshot that finishes a saga (phase COMPLETED, COMPENSATED or FAILED) can carry a
//! per-message TTL ([`KvStateStore::expire_finished`]): the server removes it once the TTL has
//! passed, with no janitor. It is published on the key's subject with
//!
//! - `Nats-Expected-Last-Subject-Sequence: <revision>`: the same compare-and-set as a KV
//!   `update` (a lost race is [`Error::Conflict`], exactly as for other writes);
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
use sagaflow_actors::machine::Saga;
use sagaflow_actors::ports::{Error, StateStore};
use sagaflow_actors::wire;

use crate::topology::{create_conflict, saga_key, update_conflict};

/// [`StateStore`] over a JetStream KV bucket.
#[derive(Clone, Debug)]
pub struct KvStateStore {
    kv: kv::Store,
    partitions: u32,
    expiry: Option<Expiry>,
}

/// How finished snapshots are written with a TTL.
#[derive(Clone, Debug)]
struct Expiry {
    /// The context the bucket was opened with (the node's, default API prefix).
    js: jetstream::Context,
    /// Whole seconds, at least 1.
    ttl_secs: u64,
}

impl KvStateStore {
    /// A store over `kv` with `partitions` partitions (part of every key). Finished sagas are
    /// kept forever unless [`KvStateStore::expire_finished`] is applied.
    pub fn new(kv: kv::Store, partitions: u32) -> Self {
        KvStateStore {
            kv,
            partitions,
            expiry: None,
        }
    }

    /// Writes the snapshot that finishes a saga with a TTL of `after` (rounded up to whole
    /// seconds, at least 1 s), published through `js` (the context the bucket was opened
    /// with). The bucket's stream must allow per-message TTLs.
    pub fn expire_finished(mut self, js: jetstream::Context, after: Duration) -> Self {
        let secs = after.as_secs() + u64::from(after.subsec_nanos() > 0);
        self.expiry = Some(Expiry {
            js,
            ttl_secs: secs.max(1),
        });
        self
    }

    /// The TTL of finished snapshots, if they expire.
    pub fn finished_ttl(&self) -> Option<Duration> {
        self.expiry
            .as_ref()
            .map(|e| Duration::from_secs(e.ttl_secs))
    }

    /// The bucket.
    pub fn bucket(&self) -> &kv::Store {
        &self.kv
    }

    /// Key of a saga.
    pub fn key(&self, saga_id: &str) -> String {
        saga_key(partition_of(saga_id, self.partitions), saga_id)
    }

    /// Compare-and-set write of a finished snapshot with a TTL, rolling up older revisions.
    async fn update_finished(
        &self,
        expiry: &Expiry,
        key: &str,
        bytes: Vec<u8>,
        revision: u64,
    ) -> Result<u64, kv::UpdateError> {
        let subject = format!(
            "{}{key}",
            self.kv.put_prefix.as_deref().unwrap_or(&self.kv.prefix)
        );
        let mut headers = HeaderMap::new();
        headers.insert(
            NATS_EXPECTED_LAST_SUBJECT_SEQUENCE,
            revision.to_string().as_str(),
        );
        headers.insert(NATS_MESSAGE_TTL, format!("{}s", expiry.ttl_secs).as_str());
        headers.insert(NATS_ROLLUP, "sub");
        let ack = expiry
            .js
            .publish_with_headers(subject, headers, bytes.into())
            .await?
            .await?;
        Ok(ack.sequence)
    }
}

fn create_error(saga: &Saga, expected: Option<u64>, e: &kv::CreateError) -> Error {
    if create_conflict(e) {
        Error::Conflict {
            saga: saga.id.clone(),
            expected,
        }
    } else {
        Error::Transport {
            operation: "create snapshot",
            message: e.to_string(),
        }
    }
}

fn update_error(saga: &Saga, expected: Option<u64>, e: &kv::UpdateError) -> Error {
    if update_conflict(e) {
        Error::Conflict {
            saga: saga.id.clone(),
            expected,
        }
    } else {
        Error::Transport {
            operation: "update snapshot",
            message: e.to_string(),
        }
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
        let expiry = self.expiry.as_ref().filter(|_| saga.is_terminal());
        match (expected, expiry) {
            (None, None) => self
                .kv
                .create(key, bytes.into())
                .await
                .map_err(|e| create_error(saga, expected, &e)),
            // Sagas are created running; a finished one created directly still expires.
            (None, Some(x)) => self
                .kv
                .create_with_ttl(key, bytes.into(), Duration::from_secs(x.ttl_secs))
                .await
                .map_err(|e| create_error(saga, expected, &e)),
            (Some(rev), None) => self
                .kv
                .update(key, bytes.into(), rev)
                .await
                .map_err(|e| update_error(saga, expected, &e)),
            (Some(rev), Some(x)) => self
                .update_finished(x, &key, bytes, rev)
                .await
                .map_err(|e| update_error(saga, expected, &e)),
        }
    }
}
