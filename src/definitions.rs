//! Saga definitions as live, versioned configuration, kept in the KV bucket
//! `sagaflow_definitions` that every node of a cluster shares.
//!
//! ```text
//!  version.<saga>.<version>   the file's text, its name, who applied it and when (immutable)
//!  active.<saga>              which version new sagas start on (history: the last activations)
//! ```
//!
//! A version is the content hash of the validated definition ([`plan::version`]): the same
//! content is the same version on every node, whatever the file's name or comments. Versions
//! are only ever added, so a saga always finds the version it started on; a node that lacks
//! one loads it from the bucket ([`DefinitionStore::load_version`]). Every node watches the
//! `active.*` keys and switches new sagas to an applied version within the watch's delivery
//! time (well under a second on a healthy cluster); the node that applies switches at once.
//!
//! At start a node applies its `--saga-dir` files: a saga with no active version gets the
//! file's, a file whose version was never applied is applied (an edited file, as before
//! versions existed), and a file holding an *older* version than the active one is left
//! alone with a warning: restarting a node with stale files never rolls a cluster back.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use async_nats::jetstream::{self, kv, stream};
use futures::StreamExt;
use sagaflow_actors::catalog::Catalog;
use sagaflow_actors::definition::plan::{self, Change};
use sagaflow_actors::definition::{self, SagaDefinition};
use serde::{Deserialize, Serialize};
use tokio_util::sync::CancellationToken;

use crate::clock::now_ms;

/// The bucket.
pub const DEFINITIONS_BUCKET: &str = "sagaflow_definitions";

/// Activations of a saga kept in the bucket's history (`active.<saga>`).
const ACTIVE_HISTORY: i64 = 16;

/// One stored version.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VersionRecord {
    /// Saga name.
    pub name: String,
    /// Version (16 hex digits of the content hash).
    pub version: String,
    /// The file it came from, as the applier named it.
    pub file: String,
    /// The file's text.
    pub text: String,
    /// Who applied it first (an operator's token name, or `node <id>` for a start-time apply).
    pub applied_by: String,
    /// When, unix ms.
    pub applied_at_unix_ms: i64,
}

/// Which version of a saga is active.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ActiveRecord {
    /// The active version.
    pub version: String,
    /// Who made it active.
    pub activated_by: String,
    /// When, unix ms.
    pub activated_at_unix_ms: i64,
}

/// What applying a set would do to one saga (or did).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SagaPlan {
    /// Saga name.
    pub name: String,
    /// The active version before (empty: a new saga).
    pub active_version: String,
    /// The version of the file.
    pub new_version: String,
    /// The changes, in words (empty: nothing to do).
    pub changes: Vec<String>,
}

/// A version as listed by [`DefinitionStore::versions`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VersionInfo {
    /// The stored record, without its text.
    pub record: VersionRecord,
    /// Whether it is the active one.
    pub active: bool,
}

/// Why a definitions call failed.
#[derive(Debug, thiserror::Error)]
pub enum DefinitionError {
    /// The set has invalid files (gRPC `INVALID_ARGUMENT`); nothing was changed.
    #[error("invalid saga definitions, nothing applied:\n{}", .0.iter().map(ToString::to_string).collect::<Vec<_>>().join("\n"))]
    Invalid(Vec<definition::Error>),
    /// The request itself is wrong (`INVALID_ARGUMENT`): which field and why.
    #[error("`{field}`: {message}")]
    Argument {
        /// The request field.
        field: &'static str,
        /// What is wrong.
        message: String,
    },
    /// No such saga or version (`NOT_FOUND`).
    #[error("{0}")]
    NotFound(String),
    /// A stored record is unreadable (`DATA_LOSS`).
    #[error("{0}")]
    Corrupt(String),
    /// NATS or the bucket failed (`UNAVAILABLE`).
    #[error("cannot {operation}")]
    Storage {
        /// What was being done.
        operation: &'static str,
        /// The cause.
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
}

fn storage<E: std::error::Error + Send + Sync + 'static>(
    operation: &'static str,
) -> impl FnOnce(E) -> DefinitionError {
    move |e| DefinitionError::Storage {
        operation,
        source: Box::new(e),
    }
}

fn version_key(name: &str, version: &str) -> String {
    format!("version.{name}.{version}")
}

fn active_key(name: &str) -> String {
    format!("active.{name}")
}

/// Called after a version became active on this node (the node re-reads what its sagas call).
pub type OnActivate = Arc<dyn Fn(&Catalog) + Send + Sync>;

/// The bucket and the node's [`Catalog`], kept in step.
#[derive(Clone)]
pub struct DefinitionStore {
    kv: kv::Store,
    catalog: Arc<Catalog>,
    on_activate: Option<OnActivate>,
}

impl std::fmt::Debug for DefinitionStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DefinitionStore")
            .field("bucket", &DEFINITIONS_BUCKET)
            .field("sagas", &self.catalog.names())
            .finish()
    }
}

impl DefinitionStore {
    /// Opens (creating if needed) the bucket, with `replicas` replicas, over `catalog`.
    pub async fn open(
        js: &jetstream::Context,
        replicas: usize,
        catalog: Arc<Catalog>,
    ) -> Result<Self, crate::topology::Error> {
        let kv = crate::topology::ensure_bucket(
            js,
            kv::Config {
                bucket: DEFINITIONS_BUCKET.to_string(),
                description:
                    "saga definitions: every applied version, and the active one of each saga"
                        .to_string(),
                history: ACTIVE_HISTORY,
                storage: stream::StorageType::File,
                num_replicas: replicas,
                ..Default::default()
            },
        )
        .await?;
        Ok(DefinitionStore {
            kv,
            catalog,
            on_activate: None,
        })
    }

    /// Calls `hook` after each activation on this node.
    pub fn on_activate(mut self, hook: OnActivate) -> Self {
        self.on_activate = Some(hook);
        self
    }

    fn activated(&self) {
        if let Some(hook) = &self.on_activate {
            hook(&self.catalog);
        }
    }

    /// The node's catalog.
    pub fn catalog(&self) -> &Arc<Catalog> {
        &self.catalog
    }

    /// Validates `files` (`(name, text)`) as one set: every error of every file, or the
    /// definitions.
    pub fn parse(files: &[(String, String)]) -> Result<Vec<SagaDefinition>, DefinitionError> {
        if files.is_empty() {
            return Err(DefinitionError::Argument {
                field: "files",
                message: "no definition files given".into(),
            });
        }
        let files: Vec<(PathBuf, String)> = files
            .iter()
            .map(|(name, text)| (PathBuf::from(name), text.clone()))
            .collect();
        definition::parse_files(&files).map_err(DefinitionError::Invalid)
    }

    /// What applying `files` would change, per saga, against the active versions.
    pub fn plan(&self, files: &[(String, String)]) -> Result<Vec<SagaPlan>, DefinitionError> {
        let defs = Self::parse(files)?;
        Ok(defs.iter().map(|d| self.plan_of(d)).collect())
    }

    fn plan_of(&self, def: &SagaDefinition) -> SagaPlan {
        let active = self.catalog.active(&def.name);
        SagaPlan {
            name: def.name.clone(),
            active_version: active.as_deref().map(plan::version).unwrap_or_default(),
            new_version: plan::version(def),
            changes: plan::diff(active.as_deref(), def)
                .iter()
                .map(Change::to_string)
                .collect(),
        }
    }

    /// Validates `files` as one set (an invalid set changes nothing), stores every version and
    /// activates each that is not active yet, here at once and on the other nodes through the
    /// bucket. Returns what changed per saga (a saga whose file is its active version: no
    /// changes).
    pub async fn apply(
        &self,
        files: &[(String, String)],
        by: &str,
    ) -> Result<Vec<SagaPlan>, DefinitionError> {
        let defs = Self::parse(files)?;
        let texts: HashMap<PathBuf, &str> = files
            .iter()
            .map(|(n, t)| (PathBuf::from(n), t.as_str()))
            .collect();
        // Every version first, then the activations: a node seeing an activation finds its
        // version in the bucket.
        for def in &defs {
            let text = texts.get(&def.source).copied().unwrap_or_default();
            self.store_version(def, text, by).await?;
        }
        let mut plans = Vec::with_capacity(defs.len());
        for def in defs {
            let plan = self.plan_of(&def);
            let def = Arc::new(def);
            if self.active_record(&def.name).await?.map(|a| a.version)
                != Some(plan.new_version.clone())
            {
                self.activate(&def, by).await?;
            }
            plans.push(plan);
        }
        Ok(plans)
    }

    /// Stores `def`'s version (`text` is its file) unless it exists; returns whether it was new.
    async fn store_version(
        &self,
        def: &SagaDefinition,
        text: &str,
        by: &str,
    ) -> Result<bool, DefinitionError> {
        let record = VersionRecord {
            name: def.name.clone(),
            version: plan::version(def),
            file: def.source.display().to_string(),
            text: text.to_string(),
            applied_by: by.to_string(),
            applied_at_unix_ms: now_ms(),
        };
        let bytes =
            serde_json::to_vec(&record).map_err(|e| DefinitionError::Corrupt(e.to_string()))?;
        match self
            .kv
            .create(version_key(&record.name, &record.version), bytes.into())
            .await
        {
            Ok(_) => Ok(true),
            Err(e) if crate::topology::create_conflict(&e) => Ok(false),
            Err(e) => Err(storage("store a definition version")(e)),
        }
    }

    /// Makes `def` (stored) the active version of its saga: in the bucket, then here.
    async fn activate(&self, def: &Arc<SagaDefinition>, by: &str) -> Result<(), DefinitionError> {
        let record = ActiveRecord {
            version: plan::version(def),
            activated_by: by.to_string(),
            activated_at_unix_ms: now_ms(),
        };
        let bytes =
            serde_json::to_vec(&record).map_err(|e| DefinitionError::Corrupt(e.to_string()))?;
        self.kv
            .put(active_key(&def.name), bytes.into())
            .await
            .map_err(storage("activate a definition version"))?;
        if let Some(before) = self.catalog.activate(def.clone()) {
            tracing::info!(saga = %def.name, version = %record.version, was = %plan::version(&before), by, "definition version activated");
        }
        self.activated();
        Ok(())
    }

    /// The active record of saga `name`, if any.
    pub async fn active_record(&self, name: &str) -> Result<Option<ActiveRecord>, DefinitionError> {
        let Some(bytes) = self
            .kv
            .get(active_key(name))
            .await
            .map_err(storage("read the active version"))?
        else {
            return Ok(None);
        };
        serde_json::from_slice(&bytes)
            .map(Some)
            .map_err(|e| DefinitionError::Corrupt(format!("active version of `{name}`: {e}")))
    }

    /// The stored record of `version` of saga `name`.
    pub async fn record(
        &self,
        name: &str,
        version: &str,
    ) -> Result<Option<VersionRecord>, DefinitionError> {
        let Some(bytes) = self
            .kv
            .get(version_key(name, version))
            .await
            .map_err(storage("read a definition version"))?
        else {
            return Ok(None);
        };
        serde_json::from_slice(&bytes)
            .map(Some)
            .map_err(|e| DefinitionError::Corrupt(format!("version {version} of `{name}`: {e}")))
    }

    /// Version `fingerprint` of saga `name`: from the catalog, else from the bucket (then kept
    /// in the catalog). `None` when no node ever applied it.
    pub async fn load_version(
        &self,
        name: &str,
        fingerprint: u64,
    ) -> Result<Option<Arc<SagaDefinition>>, DefinitionError> {
        if let Some(def) = self.catalog.version(name, fingerprint) {
            return Ok(Some(def));
        }
        let version = plan::version_of(fingerprint);
        let Some(record) = self.record(name, &version).await? else {
            return Ok(None);
        };
        let def =
            definition::parse(&record.text, std::path::Path::new(&record.file)).map_err(|e| {
                DefinitionError::Corrupt(format!(
                    "stored version {version} of `{name}` no longer validates: {}",
                    e.iter()
                        .map(ToString::to_string)
                        .collect::<Vec<_>>()
                        .join("; ")
                ))
            })?;
        if def.fingerprint != fingerprint || def.name != name {
            return Err(DefinitionError::Corrupt(format!(
                "stored version {version} of `{name}` hashes to {} here",
                plan::version(&def)
            )));
        }
        Ok(Some(self.catalog.insert(Arc::new(def))))
    }

    /// Every version of saga `name`, oldest first.
    pub async fn versions(&self, name: &str) -> Result<Vec<VersionInfo>, DefinitionError> {
        let active = self.active_record(name).await?.map(|a| a.version);
        let keys = self
            .kv
            .keys()
            .await
            .map_err(storage("list definition versions"))?;
        let prefix = format!("version.{name}.");
        let keys: Vec<String> = keys
            .filter_map(|k| async move { k.ok() })
            .filter(|k| futures::future::ready(k.starts_with(&prefix)))
            .collect()
            .await;
        let mut out = Vec::new();
        for key in keys {
            let version = key.trim_start_matches(&prefix).to_string();
            if let Some(mut record) = self.record(name, &version).await? {
                record.text.clear();
                out.push(VersionInfo {
                    active: active.as_deref() == Some(version.as_str()),
                    record,
                });
            }
        }
        if out.is_empty() {
            return Err(DefinitionError::NotFound(format!(
                "no saga definition `{name}` was ever applied"
            )));
        }
        out.sort_by_key(|v| v.record.applied_at_unix_ms);
        Ok(out)
    }

    /// Makes stored `version` of saga `name` active again.
    pub async fn rollback(
        &self,
        name: &str,
        version: &str,
        by: &str,
    ) -> Result<SagaPlan, DefinitionError> {
        let fingerprint =
            u64::from_str_radix(version, 16).map_err(|_| DefinitionError::Argument {
                field: "version",
                message: format!(
                    "`{version}` is not a version (16 hex digits, as `saga versions` lists them)"
                ),
            })?;
        let Some(def) = self.load_version(name, fingerprint).await? else {
            return Err(DefinitionError::NotFound(format!(
                "saga `{name}` has no version {version}"
            )));
        };
        let plan = self.plan_of(&def);
        self.activate(&def, by).await?;
        Ok(plan)
    }

    /// Brings the catalog to the bucket's active versions (at start, and after a watch
    /// reconnects).
    pub async fn sync(&self) -> Result<(), DefinitionError> {
        let keys = self
            .kv
            .keys()
            .await
            .map_err(storage("list active definitions"))?;
        let names: Vec<String> = keys
            .filter_map(|k| async move { k.ok() })
            .filter_map(|k| async move { k.strip_prefix("active.").map(str::to_string) })
            .collect()
            .await;
        for name in names {
            if let Some(active) = self.active_record(&name).await? {
                self.follow(&name, &active).await?;
            }
        }
        Ok(())
    }

    /// Makes `active` the catalog's active version of `name`.
    async fn follow(&self, name: &str, active: &ActiveRecord) -> Result<(), DefinitionError> {
        let fingerprint = u64::from_str_radix(&active.version, 16).map_err(|_| {
            DefinitionError::Corrupt(format!(
                "active version of `{name}` is `{}`",
                active.version
            ))
        })?;
        match self.load_version(name, fingerprint).await? {
            Some(def) => {
                if let Some(before) = self.catalog.activate(def) {
                    tracing::info!(saga = name, version = %active.version, was = %plan::version(&before), by = %active.activated_by, "definition version now active");
                }
                self.activated();
                Ok(())
            }
            None => Err(DefinitionError::Corrupt(format!(
                "`{name}` is active at version {} which the bucket does not hold",
                active.version
            ))),
        }
    }

    /// Applies a node's own files at start (see the module docs): `defs` with their texts.
    pub async fn apply_at_start(
        &self,
        defs: &[(Arc<SagaDefinition>, String)],
        node_id: &str,
    ) -> Result<(), DefinitionError> {
        let by = format!("node {node_id}");
        for (def, text) in defs {
            let version = plan::version(def);
            let new = self.store_version(def, text, &by).await?;
            let active = self.active_record(&def.name).await?;
            match active {
                Some(a) if a.version == version => {}
                Some(a) if !new => {
                    tracing::warn!(
                        saga = %def.name, file_version = %version, active = %a.version, by = %a.activated_by,
                        "the saga folder holds an older version than the active one: not re-activated (`sagaflow saga apply` does that)"
                    );
                }
                _ => self.activate(def, &by).await?,
            }
        }
        self.sync().await
    }

    /// Follows activations made anywhere (`active.*`) until `cancel` fires, re-opening the
    /// watch after a failure.
    pub async fn watch(self, cancel: CancellationToken) {
        let mut failures = 0u32;
        while !cancel.is_cancelled() {
            let watch = match self.kv.watch("active.>").await {
                Ok(w) => w,
                Err(e) => {
                    failures += 1;
                    let delay = sagaflow_participant::pool::restart_backoff(failures)
                        .max(Duration::from_millis(500));
                    tracing::warn!(error = %e, ?delay, "cannot watch definition activations, retrying");
                    tokio::select! { () = cancel.cancelled() => return, () = tokio::time::sleep(delay) => continue }
                }
            };
            // Anything activated while no watch ran.
            if let Err(e) = self.sync().await {
                tracing::warn!(error = %crate::telemetry::error_chain(&e), "cannot read the active definitions");
            }
            failures = 0;
            let mut watch = watch;
            loop {
                let next = tokio::select! {
                    () = cancel.cancelled() => return,
                    n = watch.next() => n,
                };
                match next {
                    Some(Ok(entry)) if entry.operation == kv::Operation::Put => {
                        let name = entry.key.trim_start_matches("active.").to_string();
                        let followed = match serde_json::from_slice::<ActiveRecord>(&entry.value) {
                            Ok(active) => self.follow(&name, &active).await,
                            Err(e) => Err(DefinitionError::Corrupt(format!(
                                "active version of `{name}`: {e}"
                            ))),
                        };
                        if let Err(e) = followed {
                            tracing::error!(saga = %name, error = %crate::telemetry::error_chain(&e), "cannot follow a definition activation");
                        }
                    }
                    Some(Ok(_)) => {}
                    Some(Err(e)) => {
                        tracing::warn!(error = %e, "definition watch failed, reopening");
                        break;
                    }
                    None => break,
                }
            }
        }
    }
}

#[async_trait::async_trait]
impl sagaflow_actors::ports::DefinitionSource for DefinitionStore {
    async fn load(
        &self,
        name: &str,
        fingerprint: u64,
    ) -> Result<Option<Arc<SagaDefinition>>, sagaflow_actors::ports::Error> {
        self.load_version(name, fingerprint)
            .await
            .map_err(|e| match e {
                DefinitionError::Corrupt(message) => sagaflow_actors::ports::Error::Corrupt {
                    saga: name.to_string(),
                    message,
                },
                other => sagaflow_actors::ports::Error::Transport {
                    operation: "load a definition version",
                    message: crate::telemetry::error_chain(&other),
                },
            })
    }
}
