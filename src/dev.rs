//! `sagaflow dev`: a NATS JetStream server on a free loopback port with a temporary store (or,
//! with `--nats-cluster`, a 3-server JetStream cluster with streams and buckets replicated 3
//! times), `--nodes N` nodes in this process (`dev-1` … `dev-N`, gRPC on consecutive ports from
//! `--grpc-addr`, all with the demo services), and a short demo against the first node: a few
//! orders placed, both outcomes shown. Ctrl-C stops everything (every node drains, then the
//! servers are killed and their temporary stores removed).

use std::collections::BTreeMap;
use std::future::Future;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use sagaflow_proto::v1::order_service_client::OrderServiceClient;
use sagaflow_proto::v1::{GetOrderRequest, OrderItem, PlaceOrderRequest};
use tonic_types::StatusExt;

use crate::config::{NodeConfig, Overrides};
use crate::node::{self, NodeHandle};
use sagaflow_devkit::nats_server::NatsServer;

/// Servers of the `--nats-cluster` NATS cluster.
pub const NATS_CLUSTER_SIZE: usize = 3;

/// Options of `sagaflow dev`.
#[derive(Debug, Clone)]
pub struct DevOptions {
    /// gRPC address of the first node; node i listens on its port + i - 1 (port 0: free ports).
    pub grpc_addr: SocketAddr,
    /// Nodes started in this process (≥ 1).
    pub nodes: usize,
    /// Run a 3-server NATS cluster and replicate streams and buckets 3 times.
    pub nats_cluster: bool,
    /// Orders placed as a demo once the nodes are up (0: none).
    pub demo_orders: usize,
    /// Folder of saga definitions.
    pub saga_dir: PathBuf,
    /// HTTP address of the first node; node i listens on its port + i - 1 (port 0: free ports).
    pub http_addr: SocketAddr,
    /// Info logs on the console (otherwise warnings only).
    pub verbose: bool,
    /// The demo services the nodes run (empty: none); your own participants serve the rest.
    pub demo_services: Vec<String>,
}

/// Why the dev cluster failed.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// nats-server could not be found or started.
    #[error(transparent)]
    NatsServer(#[from] sagaflow_devkit::nats_server::Error),
    /// A node failed.
    #[error(transparent)]
    Node(#[from] node::Error),
    /// Configuration.
    #[error(transparent)]
    Config(#[from] crate::config::Error),
    /// `--grpc-addr` or `--http-addr` port + `--nodes` runs past 65535.
    #[error("{0}: no room for {1} consecutive ports")]
    Ports(SocketAddr, usize),
    /// An address a node would listen on is taken (checked before anything starts).
    #[error("{addr} is already in use (another `sagaflow dev` or node?): choose another with {flag}, e.g. {flag} {suggestion}")]
    Taken {
        /// The address.
        addr: SocketAddr,
        /// The flag that sets it.
        flag: &'static str,
        /// A free-looking alternative.
        suggestion: SocketAddr,
    },
}

/// The gRPC address of node `i` (0-based): the base port + i, or port 0 (a free port) if the
/// base port is 0.
pub fn node_addr(base: SocketAddr, i: usize) -> Option<SocketAddr> {
    if base.port() == 0 {
        return Some(base);
    }
    let port = u16::try_from(usize::from(base.port()).checked_add(i)?).ok()?;
    Some(SocketAddr::new(base.ip(), port))
}

/// The configuration of dev node `i` (0-based): `dev-<i+1>` on [`node_addr`], demo services on,
/// every stream and bucket replicated `replicas` times.
pub fn node_config(
    opts: &DevOptions,
    i: usize,
    nats: &[String],
    replicas: usize,
) -> Result<NodeConfig, Error> {
    let grpc_addr = node_addr(opts.grpc_addr, i).ok_or(Error::Ports(opts.grpc_addr, opts.nodes))?;
    let http_addr = node_addr(opts.http_addr, i).ok_or(Error::Ports(opts.http_addr, opts.nodes))?;
    let overrides = Overrides {
        nats: nats.to_vec(),
        grpc_addr: Some(grpc_addr),
        demo_services: Some(!opts.demo_services.is_empty()),
        demo_service_list: Some(opts.demo_services.clone()),
        saga_dir: Some(opts.saga_dir.clone()),
        node_id: Some(format!("dev-{}", i + 1)),
        log_format: None,
        auth_tokens: None,
        tls: Default::default(),
        insecure: false,
    };
    // The dev cluster ignores the caller's SAGAFLOW_* settings, as it always did; only the
    // replication factor is set here.
    let env: BTreeMap<String, String> = [(
        "SAGAFLOW_STREAMS__REPLICAS".to_string(),
        replicas.to_string(),
    )]
    .into();
    Ok(NodeConfig::load(None, &env, &overrides)?.with_http_addr(Some(http_addr)))
}

/// Checks that every address the nodes will listen on is free, before anything starts, and
/// says which flag moves a taken one.
pub fn check_ports(opts: &DevOptions) -> Result<(), Error> {
    for (base, flag) in [
        (opts.grpc_addr, "--grpc-addr"),
        (opts.http_addr, "--http-addr"),
    ] {
        if base.port() == 0 {
            continue;
        }
        for i in 0..opts.nodes.max(1) {
            let addr = node_addr(base, i).ok_or(Error::Ports(base, opts.nodes))?;
            if std::net::TcpListener::bind(addr).is_err() {
                let step = u16::try_from(opts.nodes.max(1)).unwrap_or(1).max(10);
                let suggestion = SocketAddr::new(base.ip(), base.port().saturating_add(step));
                return Err(Error::Taken {
                    addr,
                    flag,
                    suggestion,
                });
            }
        }
    }
    Ok(())
}

fn join_error(e: tokio::task::JoinError) -> sagaflow_devkit::nats_server::Error {
    sagaflow_devkit::nats_server::Error::Io {
        what: "starting nats-server".into(),
        source: std::io::Error::other(e),
    }
}

/// Stops every node (concurrently: each hands its partitions back and drains), then the
/// NATS servers (killed, their temporary stores removed) off the async threads.
async fn stop_all(nodes: Vec<NodeHandle>, servers: Vec<NatsServer>) -> Result<(), Error> {
    let results = futures::future::join_all(nodes.into_iter().map(NodeHandle::shutdown)).await;
    if tokio::task::spawn_blocking(move || drop(servers))
        .await
        .is_err()
    {
        tracing::warn!("stopping nats-server panicked");
    }
    for r in results {
        r?;
    }
    Ok(())
}

/// Runs the dev cluster until `shutdown` resolves.
pub async fn run(opts: DevOptions, shutdown: impl Future<Output = ()> + Send) -> Result<(), Error> {
    let nodes_wanted = opts.nodes.max(1);
    check_ports(&opts)?;
    let (servers, replicas) = if opts.nats_cluster {
        let servers = tokio::task::spawn_blocking(|| {
            sagaflow_devkit::nats_server::start_cluster(NATS_CLUSTER_SIZE)
        })
        .await
        .map_err(join_error)??;
        let urls: Vec<String> = servers.iter().map(NatsServer::url).collect();
        println!(
            "nats-server cluster ({NATS_CLUSTER_SIZE} servers, JetStream, R{NATS_CLUSTER_SIZE}) listening on {}",
            urls.join(", ")
        );
        (servers, NATS_CLUSTER_SIZE)
    } else {
        let server = tokio::task::spawn_blocking(NatsServer::start)
            .await
            .map_err(join_error)??;
        println!("nats-server (JetStream) listening on {}", server.url());
        (vec![server], 1)
    };
    let urls: Vec<String> = servers.iter().map(NatsServer::url).collect();
    tokio::pin!(shutdown);
    let mut nodes: Vec<NodeHandle> = Vec::with_capacity(nodes_wanted);
    for i in 0..nodes_wanted {
        let started = match node_config(&opts, i, &urls, replicas) {
            Ok(config) => tokio::select! {
                r = node::start(config) => r.map_err(Error::from),
                _ = &mut shutdown => return stop_all(nodes, servers).await,
            },
            Err(e) => Err(e),
        };
        match started {
            Ok(node) => {
                let with = if opts.demo_services.is_empty() {
                    "without demo services".to_string()
                } else {
                    format!("with the demo services {}", opts.demo_services.join(", "))
                };
                println!(
                    "sagaflow node {} serving gRPC on {} {with}; web console: http://{}/ui/",
                    node.node_id, node.grpc_addr, node.http_addr
                );
                nodes.push(node);
            }
            Err(e) => {
                // Leave nothing running behind the error.
                if let Err(stop) = stop_all(nodes, servers).await {
                    tracing::warn!(error = %stop, "stopping the nodes already started");
                }
                return Err(e);
            }
        }
    }
    let Some(addr) = nodes.first().map(|n| n.grpc_addr) else {
        return stop_all(nodes, servers).await;
    };
    for line in unserved(&opts) {
        println!("{line}");
    }
    let all_demo = crate::config::DEMO_SERVICES
        .iter()
        .all(|s| opts.demo_services.iter().any(|d| d == s));
    if opts.demo_orders > 0 && !all_demo {
        println!(
            "(no demo orders: the order saga needs every demo service; run your participants and place orders yourself)"
        );
    }
    if opts.demo_orders > 0 && all_demo {
        tokio::select! {
            r = demo(addr, opts.demo_orders) => if let Err(e) = r { eprintln!("demo: {}", crate::telemetry::error_chain(&e)) },
            _ = &mut shutdown => return stop_all(nodes, servers).await,
        }
    }
    println!();
    if !opts.verbose {
        println!(
            "(the nodes log warnings and errors only; `sagaflow dev -v` shows their info logs)"
        );
    }
    println!("try:  sagaflow order place --server {addr} --order-id my-1 --customer ann --amount 1999 --item SKU-1:2");
    println!("      sagaflow order get --server {addr} my-1");
    println!("      sagaflow order list --server {addr}");
    if nodes.len() > 1 {
        println!("      sagaflow cluster status --server {addr}");
        println!("Ctrl-C stops the nodes and nats-server.");
    } else {
        println!("Ctrl-C stops the node and nats-server.");
    }
    shutdown.await;
    stop_all(nodes, servers).await
}

/// Why the demo orders stopped.
#[derive(Debug, thiserror::Error)]
enum DemoError {
    /// The first node did not take a connection.
    #[error("cannot connect to the node")]
    Connect(#[source] tonic::transport::Error),
    /// A call was refused (the status's message says why).
    #[error("{call} failed: {}", .status.message())]
    Call {
        /// The RPC.
        call: &'static str,
        /// Its answer.
        status: tonic::Status,
    },
}

/// For each saga definition, the services that no demo service of `opts` answers: your own
/// participants must serve them (with the consumer group `svc-<service>`, docs/participants.md).
fn unserved(opts: &DevOptions) -> Vec<String> {
    let Ok(definitions) = node::load_definitions(&opts.saga_dir) else {
        return Vec::new();
    };
    let mut names: Vec<&String> = definitions.keys().collect();
    names.sort();
    names
        .into_iter()
        .filter_map(|name| {
            let missing: Vec<String> = definitions[name]
                .services()
                .into_iter()
                .filter(|s| !opts.demo_services.contains(s))
                .collect();
            (!missing.is_empty()).then(|| {
                format!(
                    "saga `{name}`: run your own participants for {} (consumer group svc-<service>)",
                    missing.join(", ")
                )
            })
        })
        .collect()
}

/// Places `n` orders (a mix of outcomes) and prints how each ended.
async fn demo(addr: SocketAddr, n: usize) -> Result<(), DemoError> {
    let mut client = OrderServiceClient::connect(format!("http://{addr}"))
        .await
        .map_err(DemoError::Connect)?;
    let run = rand::random::<u16>();
    let mut ids = Vec::with_capacity(n);
    for i in 0..n {
        // Every third order is declined (above the 1,000.00 limit), every fifth is out of stock.
        let (amount, sku) = match i % 6 {
            2 => (250_000, "SKU-2"),
            4 => (4_200, "SKU-OUT"),
            _ => (1_999 + i as i64 * 100, "SKU-1"),
        };
        let order_id = format!("demo-{run:04x}-{i}");
        let req = PlaceOrderRequest {
            order_id: order_id.clone(),
            customer: "demo".into(),
            amount_cents: amount,
            items: vec![OrderItem {
                sku: sku.into(),
                quantity: 1 + (i as u32 % 3),
            }],
        };
        // An overloaded node refuses with a retry delay (admission control): wait and retry
        // (placing is idempotent on the order id), for up to 30 s.
        let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
        loop {
            match client.place_order(req.clone()).await {
                Ok(_) => break,
                Err(e)
                    if e.code() == tonic::Code::ResourceExhausted
                        && tokio::time::Instant::now() < deadline =>
                {
                    let delay = e
                        .get_details_retry_info()
                        .and_then(|r| r.retry_delay)
                        .unwrap_or(Duration::from_secs(1));
                    tokio::time::sleep(delay).await;
                }
                Err(e) => {
                    return Err(DemoError::Call {
                        call: "PlaceOrder",
                        status: e,
                    })
                }
            }
        }
        println!("placed order {order_id}: {amount} cents of {sku}");
        ids.push(order_id);
    }
    for id in ids {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
        loop {
            let order = client
                .get_order(GetOrderRequest {
                    order_id: id.clone(),
                })
                .await
                .map_err(|status| DemoError::Call {
                    call: "GetOrder",
                    status,
                })?
                .into_inner();
            if order.terminal || tokio::time::Instant::now() > deadline {
                let reason = if order.reason.is_empty() {
                    String::new()
                } else {
                    format!(" ({})", order.reason)
                };
                println!("order {id}: {}{reason}", order.status);
                break;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
    Ok(())
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn opts(addr: &str, nodes: usize) -> DevOptions {
        DevOptions {
            grpc_addr: addr.parse().unwrap(),
            nodes,
            nats_cluster: false,
            demo_orders: 0,
            saga_dir: PathBuf::from("sagas"),
            http_addr: "127.0.0.1:9464".parse().unwrap(),
            verbose: false,
            demo_services: crate::config::DEMO_SERVICES.map(String::from).to_vec(),
        }
    }

    #[test]
    fn dev_nodes_get_consecutive_ports_and_ids() {
        let o = opts("127.0.0.1:50051", 3);
        let urls = vec!["nats://127.0.0.1:1".to_string()];
        let ports: Vec<u16> = (0..3)
            .map(|i| node_config(&o, i, &urls, 3).unwrap().grpc_addr.port())
            .collect();
        assert_eq!(ports, [50051, 50052, 50053]);
        let c = node_config(&o, 2, &urls, 3).unwrap();
        assert_eq!(c.node_id, "dev-3");
        assert_eq!(c.streams.replicas, 3);
        assert!(c.demo_services);
        assert_eq!(node_config(&o, 0, &urls, 1).unwrap().streams.replicas, 1);
        assert_eq!(
            node_addr("127.0.0.1:0".parse().unwrap(), 5).unwrap().port(),
            0
        );
        assert!(node_addr("127.0.0.1:65535".parse().unwrap(), 1).is_none());
        assert_eq!(node_config(&o, 2, &urls, 3).unwrap().http_addr.port(), 9466);
    }

    #[test]
    fn dev_runs_the_demo_services_asked_for_and_names_what_it_leaves_to_you() {
        let urls = vec!["nats://127.0.0.1:1".to_string()];
        let mut o = opts("127.0.0.1:50051", 1);
        assert!(
            unserved(&o).iter().all(|l| !l.contains("saga `order`")),
            "{:?}",
            unserved(&o)
        );
        o.demo_services = vec!["payment".into(), "notification".into()];
        let c = node_config(&o, 0, &urls, 1).unwrap();
        assert!(c.demo_services);
        assert_eq!(c.demo.services, ["payment", "notification"]);
        let lines = unserved(&o);
        assert!(
            lines.iter().any(|l| l.starts_with("saga `order`")
                && l.contains("inventory, shipping")
                && !l.contains("payment")),
            "{lines:?}"
        );
        o.demo_services.clear();
        assert!(!node_config(&o, 0, &urls, 1).unwrap().demo_services);
    }

    #[test]
    fn taken_ports_are_found_before_anything_starts_and_name_their_flag() {
        let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = taken.local_addr().unwrap().port();
        let mut o = opts(&format!("127.0.0.1:{port}"), 1);
        o.http_addr = "127.0.0.1:0".parse().unwrap();
        let err = check_ports(&o).unwrap_err().to_string();
        assert!(
            err.starts_with(&format!("127.0.0.1:{port} is already in use"))
                && err.contains("choose another with --grpc-addr"),
            "{err}"
        );
        let mut o = opts("127.0.0.1:0", 1);
        o.http_addr = format!("127.0.0.1:{port}").parse().unwrap();
        let err = check_ports(&o).unwrap_err().to_string();
        assert!(err.contains("--http-addr"), "{err}");
        drop(taken);
    }
}
