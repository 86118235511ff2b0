//! A Sagaflow node: connects to NATS, ensures the topology, hosts the coordinator, the
//! optional demo services and the gRPC API.
//!
//! ```text
//!  start(config)
//!    ├─ load sagas/*.toml (refused with file:line:column before anything starts)
//!    ├─ connect to NATS (retrying with backoff while it is unreachable)
//!    ├─ ensure streams and buckets
//!    ├─ Coordinator actor ◀── partition consumers (one task per partition)
//!    ├─ recover unfinished sagas from the snapshot bucket
//!    ├─ demo services (optional): one ServicePool + consumer task per service, analytics
//!    ├─ gRPC server (orders, sagas, analytics, health, reflection)
//!    └─ HTTP server (/metrics, /healthz, /readyz, the web console under /ui) and the metrics poller
//!  shutdown()
//!    stop taking work (health NOT_SERVING, /readyz 503, consumers and gRPC stop) → stop actors →
//!    join every task → drain the NATS connection
//! ```
//! Every spawned task is tracked and joined at shutdown; none is detached.

use std::collections::HashMap;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use async_nats::jetstream;
use ractor::{Actor, ActorRef};
use sagaflow_actors::catalog::Catalog;
use sagaflow_actors::coordinator::{Context, Coordinator, CoordinatorMsg};
use sagaflow_actors::definition::{self, SagaDefinition};
use sagaflow_actors::service::restart_backoff;
use sagaflow_proto::v1;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::api::SagaApi;
use crate::bus::JetStreamBus;
use crate::cluster::{self, ClusterView, SharedView};
use crate::config::{redact_url, NodeConfig};
use crate::definitions::DefinitionStore;
use crate::demo::{self, Demo};
use crate::fence::{Fence, FencedBus, FencedStore};
use crate::grpc::{analytics::Analytics, orders::Orders, sagas::Sagas};
use crate::metrics::{Metrics, Readiness};
use crate::store::KvStateStore;
use crate::topology;

/// A saga with no progress for this many times its step timeout is flagged stuck.
pub use crate::config::STUCK_MULTIPLE;
/// How often each node counts its parked and stuck sagas (for metrics and logs).
pub const CENSUS_EVERY: Duration = Duration::from_secs(5);

/// Why a node could not start or stopped with an error.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Saga definitions were refused.
    #[error("invalid saga definitions:\n{}", .0.iter().map(ToString::to_string).collect::<Vec<_>>().join("\n"))]
    Definitions(Vec<definition::Error>),
    /// No saga definitions found.
    #[error("no saga definitions in {0}")]
    NoDefinitions(String),
    /// The saga definitions folder does not exist.
    #[error("no saga definitions folder {0}: name yours with --saga-dir DIR (or `saga_dir` in the node's file)")]
    SagaDir(String),
    /// The gRPC address could not be bound (the OS error is its source).
    #[error("cannot listen on {addr} (is another sagaflow node or `sagaflow dev` running? choose another address with --grpc-addr)")]
    Bind {
        /// Address.
        addr: SocketAddr,
        /// Cause.
        source: std::io::Error,
    },
    /// The HTTP address (metrics, probes) could not be bound.
    #[error("cannot listen on {addr} for HTTP (is another sagaflow node or `sagaflow dev` running? choose another address with --http-addr)")]
    HttpBind {
        /// Address.
        addr: SocketAddr,
        /// Cause.
        source: std::io::Error,
    },
    /// An actor could not be spawned.
    #[error("cannot start actor: {0}")]
    Actor(String),
    /// A NATS credentials file could not be read.
    #[error("cannot read the NATS {what} {}", path.display())]
    NatsCredentials {
        /// Which file.
        what: &'static str,
        /// Where.
        path: std::path::PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The TLS files were refused.
    #[error(transparent)]
    Tls(crate::tls::TlsError),
    /// The tokens file was refused.
    #[error("auth: {0}")]
    Auth(#[source] crate::auth::TokensError),
    /// The configured `partitions` is not the deployment's.
    #[error("{0}")]
    Partitions(String),
}

/// A running node.
pub struct NodeHandle {
    /// Where the gRPC API actually listens (resolves port 0).
    pub grpc_addr: SocketAddr,
    /// Where `/metrics`, `/healthz` and `/readyz` actually listen (resolves port 0).
    pub http_addr: SocketAddr,
    /// This node's id.
    pub node_id: String,
    cancel: CancellationToken,
    membership_stop: CancellationToken,
    membership_task: tokio::task::JoinHandle<()>,
    view: SharedView,
    tasks: TaskTracker,
    coordinator: ActorRef<CoordinatorMsg>,
    demo: Option<Demo>,
    client: async_nats::Client,
    health: tonic_health::server::HealthReporter,
    metrics: Arc<Metrics>,
    readiness: Arc<Readiness>,
}

impl std::fmt::Debug for NodeHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NodeHandle")
            .field("grpc_addr", &self.grpc_addr)
            .field("http_addr", &self.http_addr)
            .field("node_id", &self.node_id)
            .finish()
    }
}

impl NodeHandle {
    /// The demo services, if this node runs them.
    pub fn demo(&self) -> Option<&Demo> {
        self.demo.as_ref()
    }

    /// The cluster as this node last saw it.
    pub async fn cluster_view(&self) -> ClusterView {
        self.view.read().await.clone()
    }

    /// This node's metrics.
    pub fn metrics(&self) -> &Arc<Metrics> {
        &self.metrics
    }

    /// How many times this node's NATS connection was lost since it started.
    pub fn nats_disconnects(&self) -> u64 {
        self.readiness.disconnects()
    }

    /// Whether the node is ready (serving, NATS connected).
    pub fn ready(&self) -> bool {
        self.readiness.ready()
    }

    /// Number of live saga actors on this node.
    pub async fn live_sagas(&self) -> usize {
        ractor::call_t!(self.coordinator, CoordinatorMsg::Live, 5_000).unwrap_or(0)
    }

    /// Stops taking work, stops the actors, joins every task and drains the NATS connection.
    pub async fn shutdown(self) -> Result<(), Error> {
        tracing::info!(node_id = %self.node_id, "shutting down");
        self.readiness.set_serving(false);
        set_health(&self.health, false).await;
        // Hand our partitions back first, drained, while everything else still runs. Without
        // NATS nothing can be handed back: stop at once, the leases expire with their ttl.
        self.membership_stop.cancel();
        let connected = self.client.connection_state() == async_nats::connection::State::Connected;
        let hand_back = if connected {
            Duration::from_secs(60)
        } else {
            tracing::warn!("NATS unreachable: partitions are left to expire with their ttl");
            Duration::from_secs(2)
        };
        if tokio::time::timeout(hand_back, self.membership_task)
            .await
            .is_err()
        {
            tracing::warn!(
                ?hand_back,
                "partitions not handed back in time; other nodes take them over after the ttl"
            );
        }
        self.cancel.cancel();
        self.tasks.close();
        if tokio::time::timeout(Duration::from_secs(10), self.tasks.wait())
            .await
            .is_err()
        {
            tracing::warn!("some tasks did not stop within 10s");
        }
        if let Some(demo) = self.demo {
            demo.shutdown().await;
        }
        // Events still in saga mailboxes were not acked: JetStream redelivers them.
        let _ = self
            .coordinator
            .stop_and_wait(None, Some(Duration::from_secs(5)))
            .await;
        match tokio::time::timeout(Duration::from_secs(5), self.client.drain()).await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => tracing::debug!(error = %e, "drain"),
            Err(_) => tracing::warn!("NATS connection not drained within 5s"),
        }
        tracing::info!(node_id = %self.node_id, "stopped");
        Ok(())
    }
}

/// Warns of each definition whose snapshots could outgrow the server's max payload under the
/// configured `[snapshots]` limits (a snapshot that cannot be written stops its saga: its
/// events are dead-lettered after `consumers.event_max_deliver` tries).
fn warn_of_unbounded_snapshots(
    config: &NodeConfig,
    definitions: &HashMap<String, Arc<SagaDefinition>>,
    max_payload: usize,
) {
    for def in definitions.values() {
        let bound = config.snapshots.snapshot_bound(
            def,
            sagaflow_actors::ids::MAX_SAGA_ID,
            crate::api::MAX_INPUT,
        );
        if bound > max_payload {
            tracing::warn!(
                saga = %def.name,
                bound,
                max_payload,
                "a snapshot of this saga may outgrow the NATS server's max payload: lower the [snapshots] limits or raise max_payload"
            );
        }
    }
}

/// Tells `metrics` which services the active definitions call.
fn watch_services(metrics: &Metrics, catalog: &Catalog) {
    let mut services: Vec<String> = catalog
        .active_all()
        .iter()
        .flat_map(|d| d.services())
        .collect();
    services.sort();
    services.dedup();
    metrics.watch_services(services);
}

/// Each definition with the text it was read from (its file, or the built-in copy), to be
/// stored as its version.
fn definition_texts(
    definitions: &HashMap<String, Arc<SagaDefinition>>,
) -> Vec<(Arc<SagaDefinition>, String)> {
    let mut out: Vec<(Arc<SagaDefinition>, String)> = definitions
        .values()
        .filter_map(|def| {
            let built_in = BUILT_IN_DEFINITIONS
                .iter()
                .find(|(file, _)| std::path::Path::new(file) == def.source)
                .map(|(_, text)| (*text).to_string());
            let text = std::fs::read_to_string(&def.source).ok().or(built_in);
            // The file may have changed since it was loaded: store only a text that is this
            // version, or other nodes would load something else under its name.
            let same = |text: &String| {
                definition::parse(text, &def.source).is_ok_and(|d| d.fingerprint == def.fingerprint)
            };
            match text.filter(same) {
                Some(text) => Some((def.clone(), text)),
                None => {
                    tracing::warn!(saga = %def.name, file = %def.source.display(), "cannot read the definition's file again as it was loaded (changed since?): its version is not stored");
                    None
                }
            }
        })
        .collect();
    out.sort_by(|a, b| a.0.name.cmp(&b.0.name));
    out
}

/// The saga definitions built into the binary (the repository's `sagas/`): a node or
/// `sagaflow dev` started where the default folder `sagas` does not exist runs these.
pub const BUILT_IN_DEFINITIONS: &[(&str, &str)] = &[
    ("sagas/order.toml", include_str!("../sagas/order.toml")),
    ("sagas/trip.toml", include_str!("../sagas/trip.toml")),
    (
        "sagas/delivery.toml",
        include_str!("../sagas/delivery.toml"),
    ),
];

/// Loads and validates the saga definitions of `dir`. The default folder (`sagas`, relative)
/// falls back to [`BUILT_IN_DEFINITIONS`] when it does not exist; any other folder must exist.
pub fn load_definitions(
    dir: &std::path::Path,
) -> Result<HashMap<String, Arc<SagaDefinition>>, Error> {
    load_definitions_in(dir, std::path::Path::new("."))
}

/// [`load_definitions`] with relative paths taken from `cwd`.
fn load_definitions_in(
    dir: &std::path::Path,
    cwd: &std::path::Path,
) -> Result<HashMap<String, Arc<SagaDefinition>>, Error> {
    let default = dir == std::path::Path::new(crate::config::DEFAULT_SAGA_DIR);
    let joined;
    let dir = if cwd == std::path::Path::new(".") {
        dir
    } else {
        joined = cwd.join(dir);
        &joined
    };
    let defs = if default && !dir.exists() {
        tracing::info!(
            "no `sagas` folder here: running the saga definitions built into the binary (order, trip, delivery); --saga-dir DIR loads your own"
        );
        let mut defs = Vec::new();
        let mut errors = Vec::new();
        for (file, source) in BUILT_IN_DEFINITIONS {
            match definition::parse(source, std::path::Path::new(file)) {
                Ok(d) => defs.push(d),
                Err(e) => errors.extend(e),
            }
        }
        if !errors.is_empty() {
            return Err(Error::Definitions(errors));
        }
        defs
    } else if !dir.is_dir() {
        return Err(Error::SagaDir(dir.display().to_string()));
    } else {
        definition::load_dir(dir).map_err(Error::Definitions)?
    };
    if defs.is_empty() {
        return Err(Error::NoDefinitions(dir.display().to_string()));
    }
    Ok(defs
        .into_iter()
        .map(|d| (d.name.clone(), Arc::new(d)))
        .collect())
}

/// Connects to NATS, retrying with capped backoff while no server is reachable.
pub async fn connect(config: &NodeConfig) -> Result<async_nats::Client, Error> {
    connect_with(config, Arc::new(Readiness::default())).await
}

/// Applies `[nats_credentials]` and `[nats_tls]` to `options`.
async fn secure(
    mut options: async_nats::ConnectOptions,
    config: &NodeConfig,
) -> Result<async_nats::ConnectOptions, Error> {
    let c = &config.nats_credentials;
    let file_error = |what: &'static str, path: &std::path::Path| {
        let path = path.to_path_buf();
        move |source: std::io::Error| Error::NatsCredentials { what, path, source }
    };
    if let Some(path) = &c.creds_file {
        options = options
            .credentials_file(path)
            .await
            .map_err(file_error("creds file", path))?;
    }
    if let Some(path) = &c.nkey_file {
        let seed = std::fs::read_to_string(path).map_err(file_error("nkey seed file", path))?;
        options = options.nkey(seed.trim().to_string());
    }
    if let (Some(user), Some(password)) = (&c.user, &c.password) {
        options = options.user_and_password(user.clone(), password.0.clone());
    }
    if let Some(token) = &c.token {
        options = options.token(token.0.clone());
    }
    let t = &config.nats_tls;
    if let Some(ca) = &t.ca {
        options = options.add_root_certificates(ca.clone());
    }
    if let (Some(cert), Some(key)) = (&t.cert, &t.key) {
        options = options.add_client_certificate(cert.clone(), key.clone());
    }
    if t.required || t.ca.is_some() || t.cert.is_some() {
        options = options.require_tls(true);
    }
    Ok(options)
}

/// [`connect`], keeping `readiness` informed of the connection state.
pub async fn connect_with(
    config: &NodeConfig,
    readiness: Arc<Readiness>,
) -> Result<async_nats::Client, Error> {
    let mut failures = 0u32;
    let servers: Vec<String> = config.nats.iter().map(|u| redact_url(u)).collect();
    loop {
        let events = readiness.clone();
        let options = async_nats::ConnectOptions::new()
            .name(format!("sagaflow-{}", config.node_id))
            .connection_timeout(Duration::from_secs(5))
            .request_timeout(Some(topology::API_TIMEOUT))
            .event_callback(move |event| {
                let readiness = events.clone();
                async move {
                    match event {
                        async_nats::Event::Disconnected => {
                            readiness.set_connected(false);
                            tracing::warn!("disconnected from nats, reconnecting")
                        }
                        async_nats::Event::Connected => {
                            readiness.set_connected(true);
                            tracing::info!("connected to nats")
                        }
                        other => tracing::debug!(event = %other, "nats event"),
                    }
                }
            });
        let options = secure(options, config).await?;
        match options.connect(config.nats.as_slice()).await {
            Ok(client) => {
                if client.connection_state() == async_nats::connection::State::Connected {
                    readiness.set_connected(true);
                }
                return Ok(client);
            }
            Err(e) => {
                failures += 1;
                let delay = restart_backoff(failures).max(Duration::from_millis(500));
                let error = redact_url(&e.to_string());
                tracing::warn!(servers = %servers.join(","), %error, retry_in = ?delay, "cannot reach nats, retrying");
                tokio::time::sleep(delay).await;
            }
        }
    }
}

/// Starts a node and returns once it serves gRPC.
pub async fn start(mut config: NodeConfig) -> Result<NodeHandle, Error> {
    let definitions = Arc::new(load_definitions(&config.saga_dir)?);
    tracing::info!(node_id = %config.node_id, sagas = ?definitions.keys().collect::<Vec<_>>(), "definitions loaded");
    let readiness = Arc::new(Readiness::default());
    let metrics = Arc::new(Metrics::new());
    // Every version seen and the active one of each saga: the files' until the bucket says
    // otherwise (below).
    let catalog = Arc::new(Catalog::new(definitions.values().cloned()));
    watch_services(&metrics, &catalog);
    let client = connect_with(&config, readiness.clone()).await?;
    warn_of_unbounded_snapshots(&config, &definitions, client.server_info().max_payload);
    let js = jetstream::new(client.clone());
    let mut failures = 0u32;
    let sagas_kv = loop {
        let ensured = match topology::ensure(&js, &config.streams).await {
            Ok(kv) => crate::advisories::ensure(&js, &config.streams)
                .await
                .map(|()| kv),
            Err(e) => Err(e),
        };
        match ensured {
            Ok(kv) => break kv,
            Err(e) => {
                failures += 1;
                let delay = restart_backoff(failures).max(Duration::from_millis(500));
                tracing::warn!(error = %e, retry_in = ?delay, "jetstream not ready, retrying");
                tokio::time::sleep(delay).await;
            }
        }
    };
    // Membership and partition leases; and before anything is placed under a partition, the
    // check that this node counts partitions as the deployment does.
    let buckets = loop {
        let checked = match cluster::ensure_buckets(&js, &config).await {
            Ok(b) => cluster::check_partition_count(&b.1, config.partitions, config.partitions_set)
                .await
                .map(|count| (b, count)),
            Err(e) => Err(cluster::CountCheck::Unavailable(e.to_string())),
        };
        match checked {
            Ok((b, count)) => {
                if count != config.partitions {
                    tracing::info!(
                        partitions = count,
                        "`partitions` not set: using the deployment's count"
                    );
                    config.partitions = count;
                }
                break b;
            }
            Err(cluster::CountCheck::Mismatch(message)) => return Err(Error::Partitions(message)),
            Err(cluster::CountCheck::Unavailable(e)) => {
                tracing::warn!(error = %e, "cluster buckets not ready, retrying");
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
        }
    };
    let cancel = CancellationToken::new();
    let tasks = TaskTracker::new();
    // Definitions are live configuration (crate::definitions): this node's files are applied
    // (a no-op when unchanged), the catalog follows the bucket's active versions, and sagas
    // started on a version this node lacks find it there.
    let definition_store = {
        let mut failures = 0u32;
        let texts = definition_texts(&definitions);
        loop {
            let opened =
                match DefinitionStore::open(&js, config.streams.replicas, catalog.clone()).await {
                    Ok(store) => {
                        let hook_metrics = metrics.clone();
                        let store = store.on_activate(Arc::new(move |c: &Catalog| {
                            watch_services(&hook_metrics, c)
                        }));
                        store
                            .apply_at_start(&texts, &config.node_id)
                            .await
                            .map(|()| store)
                            .map_err(|e| crate::telemetry::error_chain(&e))
                    }
                    Err(e) => Err(e.to_string()),
                };
            match opened {
                Ok(store) => break store,
                Err(e) => {
                    failures += 1;
                    let delay = restart_backoff(failures).max(Duration::from_millis(500));
                    tracing::warn!(error = %e, retry_in = ?delay, "definitions bucket not ready, retrying");
                    tokio::time::sleep(delay).await;
                }
            }
        }
    };
    tracing::info!(
        sagas = ?catalog.active_all().iter().map(|d| format!("{} {}", d.name, sagaflow_actors::definition::plan::version(d))).collect::<Vec<_>>(),
        "definitions active"
    );
    tasks.spawn(definition_store.clone().watch(cancel.child_token()));
    // Commands that exhausted their deliveries become dead letters.
    tasks.spawn(crate::advisories::run(js.clone(), cancel.child_token()));

    // Sagas are timed by the cluster's clock: the server's, as this node estimates it.
    let clock = Arc::new(crate::clock::ClusterClock::new(config.clock_offset_ms));
    // The saga actors' writes pass this node's fence (crate::fence), kept by its heartbeats.
    let fence = Arc::new(Fence::new(metrics.fenced_writes.clone()));
    let ctx = Arc::new(Context {
        definitions: catalog.clone(),
        definition_source: Arc::new(definition_store.clone()),
        store: Arc::new(FencedStore {
            inner: KvStateStore::new(js.clone(), sagas_kv.clone(), config.partitions)
                .expire_finished(config.retention.finished_sagas),
            fence: fence.clone(),
        }),
        bus: Arc::new(FencedBus {
            inner: JetStreamBus::new(js.clone(), config.partitions)
                .with_status_events(config.streams.status_events),
            fence: fence.clone(),
        }),
        clock: {
            let clock = clock.clone();
            Arc::new(move || clock.now_ms())
        },
        partitions: config.partitions,
        observer: metrics.clone(),
        parker: Arc::new(crate::dlq::DlqParker::new(js.clone(), config.partitions)),
        stuck_multiple: STUCK_MULTIPLE,
        census_every: CENSUS_EVERY,
        passivate_after: config.cluster.passivate_after,
        passivate_above: config.cluster.passivate_above,
        passivate_always_after: config.cluster.passivate_always_after,
        census: std::sync::Mutex::default(),
        event_deliveries: config.consumers.event_max_deliver,
        limits: config.snapshots.clone(),
        // Stored status events are de-duplicated by the server, so announcing one again after
        // a crash is safe; core-NATS ones are not (and are best effort anyway).
        reannounce_within: match config.streams.status_events {
            crate::config::StatusEvents::Stream => config.streams.duplicate_window / 2,
            crate::config::StatusEvents::Core => Duration::ZERO,
        },
    });
    let (coordinator, _) = Actor::spawn(None, Coordinator, ctx)
        .await
        .map_err(|e| Error::Actor(e.to_string()))?;

    let demo = if config.demo_services {
        // Buckets just created in a NATS cluster can answer "no responders" for a moment:
        // retry rather than fail the node.
        let mut failures = 0u32;
        loop {
            match demo::start(js.clone(), &config, cancel.child_token()).await {
                Ok(d) => break Some(d),
                Err(e) => {
                    failures += 1;
                    let delay = restart_backoff(failures).max(Duration::from_millis(500));
                    tracing::warn!(error = %e, retry_in = ?delay, "demo services not ready, retrying");
                    tokio::time::sleep(delay).await;
                }
            }
        }
    } else {
        None
    };

    // The cluster view the membership task keeps up to date; the admin service and admission
    // control read it.
    let view = SharedView::default();
    let api = SagaApi::new(
        js.clone(),
        sagas_kv,
        catalog.clone(),
        config.partitions,
        cancel.child_token(),
    )
    .with_status_events(config.streams.status_events)
    .with_started_counter(metrics.sagas_started.clone())
    .with_clock(clock.clone())
    .with_admission(
        metrics.admission.clone(),
        config.admission.max_timeout_share,
        view.clone(),
    );
    let listener = tokio::net::TcpListener::bind(config.grpc_addr)
        .await
        .map_err(|source| Error::Bind {
            addr: config.grpc_addr,
            source,
        })?;
    let grpc_addr = listener.local_addr().map_err(|source| Error::Bind {
        addr: config.grpc_addr,
        source,
    })?;
    let (health, health_service) = tonic_health::server::health_reporter();
    set_health(&health, readiness.connected()).await;
    // Both reflection versions: v1 for current clients, v1alpha for grpcurl before 1.9, many
    // IDE plugins and Postman, which know only that one.
    let reflection_builder = || {
        tonic_reflection::server::Builder::configure()
            .register_encoded_file_descriptor_set(sagaflow_proto::FILE_DESCRIPTOR_SET)
            .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
    };
    // Who may call what (no tokens file and no certificate roles: everyone, everything).
    let certificates: Vec<(String, crate::auth::Identity)> = config
        .auth
        .certificate
        .iter()
        .filter_map(|c| {
            let role = crate::auth::Role::from_name(&c.role)?;
            let name = c.name.clone().unwrap_or_else(|| c.common_name.clone());
            Some((c.common_name.clone(), crate::auth::Identity { name, role }))
        })
        .collect();
    let auth = if config.auth.tokens.is_some() || !certificates.is_empty() {
        let path = config.auth.tokens.as_deref();
        let auth = Arc::new(
            crate::auth::Auth::new(path, &certificates, config.auth.reflection)
                .map_err(Error::Auth)?,
        );
        if let Some(path) = path {
            let reloading = auth.clone();
            // Ends with the node (its stop token).
            drop(crate::reload::watch(
                "auth tokens",
                vec![path.to_path_buf()],
                crate::reload::POLL_EVERY,
                cancel.child_token(),
                move || match reloading.reload() {
                    Ok(n) => tracing::info!(tokens = n, "auth tokens reloaded"),
                    Err(e) => {
                        tracing::error!(error = %crate::telemetry::error_chain(&e), "auth tokens not reloaded; the previous ones stay in force")
                    }
                },
            ));
        }
        tracing::info!(
            tokens = ?path.map(|p| p.display().to_string()),
            certificate_roles = certificates.len(),
            "gRPC calls need a token or a mapped client certificate"
        );
        Some(auth)
    } else {
        None
    };
    let reflection = reflection_builder()
        .build_v1()
        .map_err(|e| Error::Actor(format!("reflection: {e}")))?;
    let reflection_v1alpha = reflection_builder()
        .build_v1alpha()
        .map_err(|e| Error::Actor(format!("reflection: {e}")))?;
    const MAX_MESSAGE: usize = 1024 * 1024;
    // The web console (served on the HTTP endpoint) calls the same services in-process.
    let console = crate::console::Console::new(crate::console::Parts {
        api: api.clone(),
        definitions: definition_store.clone(),
        admin: crate::grpc::admin::Admin::new(
            js.clone(),
            view.clone(),
            config.node_id.clone(),
            config.partitions,
        ),
        auth: auth.clone(),
        metrics: metrics.clone(),
        node_id: config.node_id.clone(),
        insecure: config.insecure,
        cancel: cancel.child_token(),
    });
    let reflection = config.auth.reflection.then_some(reflection);
    let reflection_v1alpha = config.auth.reflection.then_some(reflection_v1alpha);
    let router = tonic::transport::Server::builder()
        .layer(crate::auth::AuthLayer::new(auth))
        .add_service(health_service)
        .add_optional_service(reflection)
        .add_optional_service(reflection_v1alpha)
        .add_service(
            v1::order_service_server::OrderServiceServer::new(Orders::new(api.clone()))
                .max_decoding_message_size(MAX_MESSAGE),
        )
        .add_service(
            v1::saga_service_server::SagaServiceServer::new(Sagas::new(api.clone()))
                .max_decoding_message_size(MAX_MESSAGE),
        )
        .add_service(
            v1::definition_service_server::DefinitionServiceServer::new(
                crate::grpc::definitions::Definitions::new(definition_store.clone(), api),
            )
            .max_decoding_message_size(4 * MAX_MESSAGE),
        )
        .add_service(v1::analytics_service_server::AnalyticsServiceServer::new(
            Analytics::new(js.clone()),
        ))
        .add_service(v1::admin_service_server::AdminServiceServer::new(
            crate::grpc::admin::Admin::new(
                js.clone(),
                view.clone(),
                config.node_id.clone(),
                config.partitions,
            ),
        ));
    let stop = cancel.child_token();
    // TLS (reloaded on SIGHUP or change), or plain TCP.
    let tls = match crate::tls::TlsFiles::from_config(&config.tls) {
        Some(files) => {
            let tls = Arc::new(crate::tls::ServerTls::load(files).map_err(Error::Tls)?);
            let reloading = tls.clone();
            // Ends with the node (its stop token).
            drop(crate::reload::watch(
                "tls certificate",
                tls.files().paths(),
                crate::reload::POLL_EVERY,
                cancel.child_token(),
                move || match reloading.reload() {
                    Ok(()) => {
                        tracing::info!(cert = %reloading.files().cert.display(), "tls certificate reloaded")
                    }
                    Err(e) => {
                        tracing::error!(error = %crate::telemetry::error_chain(&e), "tls certificate not reloaded; the previous one stays in use")
                    }
                },
            ));
            tracing::info!(
                cert = %tls.files().cert.display(),
                mutual = tls.files().client_ca.is_some(),
                "gRPC over TLS"
            );
            Some(tls)
        }
        None => None,
    };
    tasks.spawn(async move {
        if let Some(tls) = tls {
            let incoming = crate::tls::incoming(listener, tls, stop.clone());
            if let Err(e) = router
                .serve_with_incoming_shutdown(incoming, stop.cancelled_owned())
                .await
            {
                tracing::error!(error = %e, "grpc server failed");
            }
            return;
        }
        // tonic sets TCP_NODELAY only on connections it accepts itself: without it, a response
        // of more than one segment (a page of orders) waited ~40 ms for the client's delayed
        // ACK (Nagle).
        let incoming = tokio_stream::StreamExt::map(
            tokio_stream::wrappers::TcpListenerStream::new(listener),
            |conn| {
                if let Ok(c) = &conn {
                    let _ = c.set_nodelay(true);
                }
                conn
            },
        );
        if let Err(e) = router
            .serve_with_incoming_shutdown(incoming, stop.cancelled_owned())
            .await
        {
            tracing::error!(error = %e, "grpc server failed");
        }
    });
    // Membership and partition leases: this node consumes the partitions it is assigned.
    let membership = cluster::Membership::new(
        js.clone(),
        buckets,
        config.clone(),
        grpc_addr.to_string(),
        coordinator.clone(),
        view.clone(),
        (metrics.admission.clone(), metrics.clone()),
    )
    .with_fence(fence)
    .with_clock(clock);
    let owned = membership.held_partitions();
    let membership_stop = CancellationToken::new();
    let membership_task = tokio::spawn(membership.run(membership_stop.clone()));
    // HTTP: metrics and probes.
    let http_listener = bind_http(config.http_addr).await?;
    let http_addr = http_listener.local_addr().map_err(|source| Error::Bind {
        addr: config.http_addr,
        source,
    })?;
    tasks.spawn(crate::http::serve(
        http_listener,
        crate::http::router(
            metrics.clone(),
            readiness.clone(),
            client.clone(),
            console.router(http_addr),
        ),
        cancel.child_token(),
    ));
    tasks.spawn(console.sample_metrics(cancel.child_token()));
    tasks.spawn(crate::metrics::poll(
        js.clone(),
        metrics.clone(),
        readiness.clone(),
        owned,
        cancel.child_token(),
    ));
    readiness.set_serving(true);
    tasks.spawn(follow_readiness(
        readiness.clone(),
        health.clone(),
        metrics.clone(),
        cancel.child_token(),
    ));
    tracing::info!(node_id = %config.node_id, %grpc_addr, %http_addr, partitions = config.partitions, demo = config.demo_services, "node ready");
    Ok(NodeHandle {
        grpc_addr,
        node_id: config.node_id.clone(),
        cancel,
        membership_stop,
        membership_task,
        view,
        tasks,
        coordinator,
        demo,
        client,
        health,
        metrics,
        readiness,
        http_addr,
    })
}

/// Binds the HTTP endpoint; the default address falls back to a free port when taken.
async fn bind_http(addr: SocketAddr) -> Result<tokio::net::TcpListener, Error> {
    match tokio::net::TcpListener::bind(addr).await {
        Ok(l) => Ok(l),
        Err(e) if addr == crate::config::DEFAULT_HTTP_ADDR => {
            let fallback = SocketAddr::new(addr.ip(), 0);
            tracing::warn!(%addr, error = %e, "default http address taken, using a free port");
            tokio::net::TcpListener::bind(fallback)
                .await
                .map_err(|source| Error::HttpBind {
                    addr: fallback,
                    source,
                })
        }
        Err(source) => Err(Error::HttpBind { addr, source }),
    }
}

/// Sets every gRPC service (and the server as a whole) SERVING or NOT_SERVING.
async fn set_health(health: &tonic_health::server::HealthReporter, serving: bool) {
    use tonic_health::ServingStatus;
    let status = if serving {
        ServingStatus::Serving
    } else {
        ServingStatus::NotServing
    };
    health
        .set_service_status(
            <v1::order_service_server::OrderServiceServer<Orders> as tonic::server::NamedService>::NAME,
            status,
        )
        .await;
    health
        .set_service_status(
            <v1::saga_service_server::SagaServiceServer<Sagas> as tonic::server::NamedService>::NAME,
            status,
        )
        .await;
    health
        .set_service_status(
            <v1::analytics_service_server::AnalyticsServiceServer<Analytics> as tonic::server::NamedService>::NAME,
            status,
        )
        .await;
    health
        .set_service_status(
            <v1::definition_service_server::DefinitionServiceServer<
                crate::grpc::definitions::Definitions,
            > as tonic::server::NamedService>::NAME,
            status,
        )
        .await;
    health
        .set_service_status(
            <v1::admin_service_server::AdminServiceServer<crate::grpc::admin::Admin> as tonic::server::NamedService>::NAME,
            status,
        )
        .await;
    health.set_service_status("", status).await;
}

/// Keeps the gRPC health status and the readiness gauges in step with [`Readiness`]
/// (NOT_SERVING while NATS is disconnected) until `cancel`.
async fn follow_readiness(
    readiness: Arc<Readiness>,
    health: tonic_health::server::HealthReporter,
    metrics: Arc<Metrics>,
    cancel: CancellationToken,
) {
    let mut last = None;
    loop {
        let ready = readiness.ready();
        if last != Some(ready) {
            if !ready && readiness.connected() {
                // Starting or shutting down: expected, not a warning.
                tracing::info!(
                    "not ready (not serving yet, or shutting down): gRPC health NOT_SERVING"
                );
            } else if !ready {
                tracing::warn!("not ready: NATS disconnected, gRPC health NOT_SERVING");
            } else if last.is_some() {
                tracing::info!("ready again: gRPC health SERVING");
            }
            set_health(&health, ready).await;
            metrics.set_readiness(&readiness);
            last = Some(ready);
        }
        tokio::select! {
            _ = cancel.cancelled() => return,
            _ = readiness.changed() => {}
            // Notifications only reach a waiting task: re-check now and then.
            _ = tokio::time::sleep(Duration::from_millis(500)) => {}
        }
    }
}

/// Runs a node until `shutdown` resolves, then stops it gracefully. A shutdown requested
/// while the node is still starting (waiting for NATS, say) stops it there: that is what the
/// operator asked for, so it is not an error. What it may already hold (its membership entry,
/// a partition lease) is not released gracefully: it expires with `cluster.node_ttl`, as after a
/// crash, and the events it pulled are redelivered.
pub async fn run(
    config: NodeConfig,
    shutdown: impl Future<Output = ()> + Send,
) -> Result<(), Error> {
    tokio::pin!(shutdown);
    let handle = tokio::select! {
        h = start(config) => h?,
        _ = &mut shutdown => {
            tracing::warn!("shutdown requested before the node finished starting; stopping");
            return Ok(());
        }
    };
    shutdown.await;
    handle.shutdown().await
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn without_a_sagas_folder_the_built_in_definitions_run_and_a_named_folder_must_exist() {
        let elsewhere = tempfile::tempdir().unwrap();
        let defs = load_definitions_in(
            std::path::Path::new(crate::config::DEFAULT_SAGA_DIR),
            elsewhere.path(),
        )
        .unwrap();
        let mut names: Vec<&str> = defs.keys().map(String::as_str).collect();
        names.sort();
        assert_eq!(names, ["delivery", "order", "trip"]);
        // The same definitions as the repository's files.
        let here = load_definitions(std::path::Path::new("sagas")).unwrap();
        assert_eq!(here.len(), defs.len(), "every shipped saga is built in");
        for (name, def) in &here {
            assert_eq!(defs[name].fingerprint, def.fingerprint, "{name}");
        }
        let err = load_definitions_in(std::path::Path::new("my-sagas"), elsewhere.path())
            .unwrap_err()
            .to_string();
        assert!(err.contains("--saga-dir DIR"), "{err}");
    }
}
