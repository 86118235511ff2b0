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
//!    └─ gRPC server (orders, sagas, analytics, health, reflection)
//!  shutdown()
//!    stop taking work (health NOT_SERVING, consumers and gRPC stop) → stop actors →
//!    join every task → drain the NATS connection
//! ```
//! Every spawned task is tracked and joined at shutdown; none is detached.

use std::collections::HashMap;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use async_nats::jetstream;
use futures::StreamExt;
use ractor::{Actor, ActorRef};
use sagaflow_actors::coordinator::{Context, Coordinator, CoordinatorMsg};
use sagaflow_actors::definition::{self, SagaDefinition};
use sagaflow_actors::hash::partition_of;
use sagaflow_actors::service::restart_backoff;
use sagaflow_proto::v1;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::bus::JetStreamBus;
use crate::config::NodeConfig;
use crate::demo::{self, Demo};
use crate::dlq::now_ms;
use crate::grpc::{analytics::Analytics, orders::Orders, sagas::Sagas, SagaApi};
use crate::store::KvStateStore;
use crate::{events, topology};

/// Why a node could not start or stopped with an error.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Saga definitions were refused.
    #[error("invalid saga definitions:\n{}", .0.iter().map(ToString::to_string).collect::<Vec<_>>().join("\n"))]
    Definitions(Vec<definition::Error>),
    /// No saga definitions found.
    #[error("no saga definitions in {0}")]
    NoDefinitions(String),
    /// The gRPC address could not be bound.
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        /// Address.
        addr: SocketAddr,
        /// Cause.
        source: std::io::Error,
    },
    /// An actor could not be spawned.
    #[error("cannot start actor: {0}")]
    Actor(String),
    /// The demo services could not start.
    #[error("cannot start demo services: {0}")]
    Demo(String),
    /// Shut down before it finished starting.
    #[error("shut down while starting")]
    Interrupted,
}

/// A running node.
pub struct NodeHandle {
    /// Where the gRPC API actually listens (resolves port 0).
    pub grpc_addr: SocketAddr,
    /// This node's id.
    pub node_id: String,
    cancel: CancellationToken,
    tasks: TaskTracker,
    coordinator: ActorRef<CoordinatorMsg>,
    demo: Option<Demo>,
    client: async_nats::Client,
    health: tonic_health::server::HealthReporter,
}

impl std::fmt::Debug for NodeHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NodeHandle")
            .field("grpc_addr", &self.grpc_addr)
            .field("node_id", &self.node_id)
            .finish()
    }
}

impl NodeHandle {
    /// The demo services, if this node runs them.
    pub fn demo(&self) -> Option<&Demo> {
        self.demo.as_ref()
    }

    /// Number of live saga actors on this node.
    pub async fn live_sagas(&self) -> usize {
        ractor::call_t!(self.coordinator, CoordinatorMsg::Live, 5_000).unwrap_or(0)
    }

    /// Stops taking work, stops the actors, joins every task and drains the NATS connection.
    pub async fn shutdown(self) -> Result<(), Error> {
        tracing::info!(node_id = %self.node_id, "shutting down");
        self.health
            .set_not_serving::<v1::order_service_server::OrderServiceServer<Orders>>()
            .await;
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
        if let Err(e) = self.client.drain().await {
            tracing::debug!(error = %e, "drain");
        }
        tracing::info!(node_id = %self.node_id, "stopped");
        Ok(())
    }
}

/// Loads and validates the saga definitions of `dir`.
pub fn load_definitions(
    dir: &std::path::Path,
) -> Result<HashMap<String, Arc<SagaDefinition>>, Error> {
    let defs = definition::load_dir(dir).map_err(Error::Definitions)?;
    if defs.is_empty() {
        return Err(Error::NoDefinitions(dir.display().to_string()));
    }
    Ok(defs
        .into_iter()
        .map(|d| (d.name.clone(), Arc::new(d)))
        .collect())
}

/// Connects to NATS, retrying with capped backoff while no server is reachable.
pub async fn connect(config: &NodeConfig) -> async_nats::Client {
    let mut failures = 0u32;
    loop {
        let options = async_nats::ConnectOptions::new()
            .name(format!("sagaflow-{}", config.node_id))
            .connection_timeout(Duration::from_secs(5))
            .request_timeout(Some(topology::API_TIMEOUT))
            .event_callback(|event| async move {
                match event {
                    async_nats::Event::Disconnected => {
                        tracing::warn!("disconnected from nats, reconnecting")
                    }
                    async_nats::Event::Connected => tracing::info!("connected to nats"),
                    other => tracing::debug!(event = %other, "nats event"),
                }
            });
        match options.connect(config.nats.join(",")).await {
            Ok(client) => return client,
            Err(e) => {
                failures += 1;
                let delay = restart_backoff(failures).max(Duration::from_millis(500));
                tracing::warn!(servers = %config.nats.join(","), error = %e, retry_in = ?delay, "cannot reach nats, retrying");
                tokio::time::sleep(delay).await;
            }
        }
    }
}

/// Starts a node and returns once it serves gRPC.
pub async fn start(config: NodeConfig) -> Result<NodeHandle, Error> {
    let definitions = Arc::new(load_definitions(&config.saga_dir)?);
    tracing::info!(node_id = %config.node_id, sagas = ?definitions.keys().collect::<Vec<_>>(), "definitions loaded");
    let client = connect(&config).await;
    let js = jetstream::new(client.clone());
    let mut failures = 0u32;
    let sagas_kv = loop {
        match topology::ensure(&js, &config.streams).await {
            Ok(kv) => break kv,
            Err(e) => {
                failures += 1;
                let delay = restart_backoff(failures).max(Duration::from_millis(500));
                tracing::warn!(error = %e, retry_in = ?delay, "jetstream not ready, retrying");
                tokio::time::sleep(delay).await;
            }
        }
    };
    let cancel = CancellationToken::new();
    let tasks = TaskTracker::new();

    let ctx = Arc::new(Context {
        definitions: definitions
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect(),
        store: Arc::new(KvStateStore::new(sagas_kv.clone(), config.partitions)),
        bus: Arc::new(JetStreamBus::new(js.clone(), config.partitions)),
        clock: Arc::new(now_ms),
    });
    let (coordinator, _) = Actor::spawn(None, Coordinator, ctx)
        .await
        .map_err(|e| Error::Actor(e.to_string()))?;

    // This node owns every partition (single-node deployment).
    let owned: Vec<u32> = (0..config.partitions).collect();
    for &p in &owned {
        tasks.spawn(events::run_partition(
            js.clone(),
            p,
            config.consumers.clone(),
            coordinator.clone(),
            cancel.child_token(),
        ));
    }
    tasks.spawn(recover(
        sagas_kv.clone(),
        owned,
        config.partitions,
        coordinator.clone(),
    ));

    let demo = if config.demo_services {
        Some(
            demo::start(js.clone(), &config, cancel.child_token())
                .await
                .map_err(|e| Error::Demo(e.to_string()))?,
        )
    } else {
        None
    };

    let api = SagaApi::new(
        js.clone(),
        sagas_kv,
        definitions,
        config.partitions,
        cancel.child_token(),
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
    health
        .set_serving::<v1::order_service_server::OrderServiceServer<Orders>>()
        .await;
    health
        .set_serving::<v1::saga_service_server::SagaServiceServer<Sagas>>()
        .await;
    health
        .set_serving::<v1::analytics_service_server::AnalyticsServiceServer<Analytics>>()
        .await;
    let reflection = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(sagaflow_proto::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .build_v1()
        .map_err(|e| Error::Actor(format!("reflection: {e}")))?;
    const MAX_MESSAGE: usize = 1024 * 1024;
    let router = tonic::transport::Server::builder()
        .add_service(health_service)
        .add_service(reflection)
        .add_service(
            v1::order_service_server::OrderServiceServer::new(Orders::new(api.clone()))
                .max_decoding_message_size(MAX_MESSAGE),
        )
        .add_service(
            v1::saga_service_server::SagaServiceServer::new(Sagas::new(api))
                .max_decoding_message_size(MAX_MESSAGE),
        )
        .add_service(v1::analytics_service_server::AnalyticsServiceServer::new(
            Analytics::new(js.clone()),
        ));
    let stop = cancel.child_token();
    tasks.spawn(async move {
        let incoming = tokio_stream::wrappers::TcpListenerStream::new(listener);
        if let Err(e) = router
            .serve_with_incoming_shutdown(incoming, stop.cancelled_owned())
            .await
        {
            tracing::error!(error = %e, "grpc server failed");
        }
    });
    tracing::info!(node_id = %config.node_id, %grpc_addr, partitions = config.partitions, demo = config.demo_services, "node ready");
    Ok(NodeHandle {
        grpc_addr,
        node_id: config.node_id.clone(),
        cancel,
        tasks,
        coordinator,
        demo,
        client,
        health,
    })
}

/// Brings back every unfinished saga of the owned partitions: their actors reload the
/// snapshot, republish in-flight commands and re-arm their timers. Finished sagas stop at once.
async fn recover(
    kv: jetstream::kv::Store,
    owned: Vec<u32>,
    partitions: u32,
    coordinator: ActorRef<CoordinatorMsg>,
) {
    let keys = match kv.keys().await {
        Ok(k) => k,
        Err(e) => {
            tracing::error!(error = %e, "cannot list sagas to recover");
            return;
        }
    };
    let ids: Vec<String> = keys
        .filter_map(|k| async move { k.ok() })
        .filter_map(|k| async move { k.split_once('.').map(|(_, id)| id.to_string()) })
        .collect()
        .await;
    let mut n = 0usize;
    for id in ids {
        if owned.contains(&partition_of(&id, partitions)) {
            n += 1;
            if coordinator
                .cast(CoordinatorMsg::Recover { saga_id: id })
                .is_err()
            {
                return;
            }
        }
    }
    tracing::info!(sagas = n, "recovery scan done");
}

/// Runs a node until `shutdown` resolves, then stops it gracefully.
pub async fn run(
    config: NodeConfig,
    shutdown: impl Future<Output = ()> + Send,
) -> Result<(), Error> {
    tokio::pin!(shutdown);
    let handle = tokio::select! {
        h = start(config) => h?,
        _ = &mut shutdown => return Err(Error::Interrupted),
    };
    shutdown.await;
    handle.shutdown().await
}
