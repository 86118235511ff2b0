//! Saga snapshots in the `sagaflow_sagas` KV bucket, written compare-and-set on the revision.

use async_nats::jetstream::kv;
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
}

impl KvStateStore {
    /// A store over `kv` with `partitions` partitions (part of every key).
    pub fn new(kv: kv::Store, partitions: u32) -> Self {
        KvStateStore { kv, partitions }
    }

    /// The bucket.
    pub fn bucket(&self) -> &kv::Store {
        &self.kv
    }

    /// Key of a saga.
    pub fn key(&self, saga_id: &str) -> String {
        saga_key(partition_of(saga_id, self.partitions), saga_id)
    }
}

#[async_trait]
impl StateStore for KvStateStore {
    async fn load(&self, saga_id: &str) -> Result<Option<(Saga, u64)>, Error> {
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
            None => self.kv.create(key, bytes.into()).await.map_err(|e| {
                if create_conflict(&e) {
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
            }),
            Some(rev) => self.kv.update(key, bytes.into(), rev).await.map_err(|e| {
                if update_conflict(&e) {
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
            }),
        }
    }
}
