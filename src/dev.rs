//! `sagaflow dev`: a NATS JetStream server on a free loopback port with a temporary store, a
//! node with the demo services on `--grpc-addr`, and a short demo: a few orders placed, both
//! outcomes shown. Ctrl-C stops everything (the node drains, then the server is killed and its
//! temporary store removed).

use std::future::Future;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use sagaflow_proto::v1::order_service_client::OrderServiceClient;
use sagaflow_proto::v1::{GetOrderRequest, OrderItem, PlaceOrderRequest};

use crate::config::{NodeConfig, Overrides};
use crate::nats_server::NatsServer;
use crate::node;

/// Options of `sagaflow dev`.
#[derive(Debug, Clone)]
pub struct DevOptions {
    /// gRPC address of the node.
    pub grpc_addr: SocketAddr,
    /// Orders placed as a demo once the node is up (0: none).
    pub demo_orders: usize,
    /// Folder of saga definitions.
    pub saga_dir: PathBuf,
}

/// Why the dev cluster failed.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// nats-server could not be found or started.
    #[error(transparent)]
    NatsServer(#[from] crate::nats_server::Error),
    /// The node failed.
    #[error(transparent)]
    Node(#[from] node::Error),
    /// Configuration.
    #[error(transparent)]
    Config(#[from] crate::config::Error),
}

/// Runs the dev cluster until `shutdown` resolves.
pub async fn run(opts: DevOptions, shutdown: impl Future<Output = ()> + Send) -> Result<(), Error> {
    let server = tokio::task::spawn_blocking(NatsServer::start)
        .await
        .map_err(|e| crate::nats_server::Error::Io {
            what: "starting nats-server".into(),
            source: std::io::Error::other(e),
        })??;
    println!("nats-server (JetStream) listening on {}", server.url());
    let overrides = Overrides {
        nats: vec![server.url()],
        grpc_addr: Some(opts.grpc_addr),
        demo_services: Some(true),
        saga_dir: Some(opts.saga_dir.clone()),
        node_id: Some("dev-1".to_string()),
        log_format: None,
    };
    let config = NodeConfig::load(None, &Default::default(), &overrides)?;
    let node = node::start(config).await?;
    let addr = node.grpc_addr;
    println!("sagaflow node dev-1 serving gRPC on {addr} with the demo services");
    tokio::pin!(shutdown);
    if opts.demo_orders > 0 {
        tokio::select! {
            r = demo(addr, opts.demo_orders) => if let Err(e) = r { eprintln!("demo: {e}") },
            _ = &mut shutdown => { node.shutdown().await?; return Ok(()); }
        }
    }
    println!();
    println!("try:  sagaflow order place --server {addr} --order-id my-1 --customer ann --amount 1999 --item SKU-1:2");
    println!("      sagaflow order get --server {addr} my-1");
    println!("      sagaflow order list --server {addr}");
    println!("Ctrl-C stops the node and nats-server.");
    shutdown.await;
    node.shutdown().await?;
    drop(server);
    Ok(())
}

/// Places `n` orders (a mix of outcomes) and prints how each ended.
async fn demo(addr: SocketAddr, n: usize) -> Result<(), String> {
    let mut client = OrderServiceClient::connect(format!("http://{addr}"))
        .await
        .map_err(|e| e.to_string())?;
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
        client
            .place_order(req)
            .await
            .map_err(|e| e.message().to_string())?;
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
                .map_err(|e| e.message().to_string())?
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
