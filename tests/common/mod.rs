//! The shared integration-test harness: real `nats-server` processes (re-exported from
//! [`sagaflow_devkit::nats_server`]), real `sagaflow node` processes, bounded polling, gRPC clients.
//!
//! Every await in a test is bounded: use [`within`] (or `tokio::time::timeout`) around single
//! calls and [`wait_until`] for conditions; nothing here sleeps for a fixed time to "let things
//! settle". Processes are killed when dropped; a node's log is printed when a test panics.
#![allow(dead_code, unreachable_pub)]

use std::future::Future;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use sagaflow_proto::v1::analytics_service_client::AnalyticsServiceClient;
use sagaflow_proto::v1::order_service_client::OrderServiceClient;
use sagaflow_proto::v1::saga_service_client::SagaServiceClient;
use sagaflow_proto::v1::{ListDefinitionsRequest, ListOrdersRequest};
use tonic::transport::Channel;

pub use sagaflow_devkit::nats_server::{start_cluster, NatsServer};

pub mod certs;
pub mod checks;
pub mod participant;

/// Default bound for one await in a test.
pub const TIMEOUT: Duration = Duration::from_secs(20);

/// How long [`connect_orders`] and friends keep retrying.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(20);

/// Awaits `fut` for at most `timeout`; the error names `what`.
pub async fn within<T>(
    timeout: Duration,
    what: &str,
    fut: impl Future<Output = T>,
) -> anyhow::Result<T> {
    tokio::time::timeout(timeout, fut)
        .await
        .map_err(|_| anyhow::anyhow!("timed out after {timeout:?}: {what}"))
}

/// Polls `f` every 50 ms until it returns true; fails after `timeout` (each poll is bounded by
/// the time left, so a hanging poll cannot outlive the bound).
pub async fn wait_until<F, Fut>(timeout: Duration, what: &str, mut f: F) -> anyhow::Result<()>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        let left = deadline.saturating_duration_since(tokio::time::Instant::now());
        if let Ok(true) = tokio::time::timeout(left, f()).await {
            return Ok(());
        }
        if tokio::time::Instant::now() >= deadline {
            bail!("timed out after {timeout:?} waiting for {what}");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// A free loopback port (bind 127.0.0.1:0, read it, close). Panics if none can be bound.
pub fn free_port() -> u16 {
    #[allow(clippy::expect_used)]
    sagaflow_devkit::nats_server::free_port().expect("bind a free loopback port")
}

/// Starts a single JetStream `nats-server` on free ports with a temporary store, off the async
/// runtime's threads.
pub async fn start_nats() -> anyhow::Result<NatsServer> {
    let server = within(
        TIMEOUT,
        "start nats-server",
        tokio::task::spawn_blocking(NatsServer::start),
    )
    .await???;
    Ok(server)
}

/// Starts an `n`-node JetStream cluster, off the async runtime's threads.
pub async fn start_nats_cluster(n: usize) -> anyhow::Result<Vec<NatsServer>> {
    let servers = within(
        Duration::from_secs(60),
        "start nats cluster",
        tokio::task::spawn_blocking(move || start_cluster(n)),
    )
    .await???;
    Ok(servers)
}

/// The repository root (where `sagas/` is).
pub fn repo_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// How to run a `sagaflow node` process.
#[derive(Debug, Clone)]
pub struct NodeOptions {
    /// `--node-id`.
    pub node_id: String,
    /// `--nats`, one per URL.
    pub nats: Vec<String>,
    /// gRPC port on 127.0.0.1 (0: a free one).
    pub grpc_port: u16,
    /// `--saga-dir` (default: the repository's `sagas/`).
    pub saga_dir: PathBuf,
    /// `--demo-services` (default on).
    pub demo_services: bool,
    /// Extra environment (`SAGAFLOW_DEMO__FAILURE_RATE=0.2`, `RUST_LOG=debug`…).
    pub env: Vec<(String, String)>,
    /// Extra arguments after the others.
    pub args: Vec<String>,
}

impl NodeOptions {
    /// A node with the demo services against `nats`, on a free gRPC port.
    pub fn new(node_id: &str, nats: &[String]) -> Self {
        NodeOptions {
            node_id: node_id.to_string(),
            nats: nats.to_vec(),
            grpc_port: 0,
            saga_dir: repo_dir().join("sagas"),
            demo_services: true,
            env: Vec::new(),
            args: Vec::new(),
        }
    }

    /// Adds an environment variable.
    pub fn env(mut self, key: &str, value: &str) -> Self {
        self.env.push((key.to_string(), value.to_string()));
        self
    }
}

/// A `sagaflow node` child process (the binary under test), its stderr and stdout in a log file.
/// Killed (SIGKILL) when dropped; its log tail is printed if the test is panicking.
#[derive(Debug)]
pub struct NodeProcess {
    opts: NodeOptions,
    grpc_addr: SocketAddr,
    log_file: PathBuf,
    child: Option<Child>,
    _dir: tempfile::TempDir,
}

impl NodeProcess {
    /// Runs `sagaflow node --nats URL --grpc-addr 127.0.0.1:PORT --demo-services --saga-dir
    /// <repo>/sagas --node-id ID` with `env` added. Returns once the process is spawned; use
    /// [`NodeProcess::connect_orders`] to wait until it serves.
    pub fn start(node_id: &str, nats_url: &str, env: &[(&str, &str)]) -> anyhow::Result<Self> {
        let mut opts = NodeOptions::new(node_id, &[nats_url.to_string()]);
        opts.env = env
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        Self::start_with(opts)
    }

    /// Runs a node with explicit options.
    pub fn start_with(mut opts: NodeOptions) -> anyhow::Result<Self> {
        if opts.grpc_port == 0 {
            opts.grpc_port = free_port();
        }
        let dir = tempfile::Builder::new()
            .prefix("sagaflow-node-")
            .tempdir()
            .context("create node log dir")?;
        let log_file = dir.path().join(format!("{}.log", opts.node_id));
        let mut node = NodeProcess {
            grpc_addr: SocketAddr::from(([127, 0, 0, 1], opts.grpc_port)),
            opts,
            log_file,
            child: None,
            _dir: dir,
        };
        node.spawn()?;
        Ok(node)
    }

    fn spawn(&mut self) -> anyhow::Result<()> {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log_file)
            .with_context(|| format!("open {}", self.log_file.display()))?;
        let log_out = log.try_clone().context("clone log file handle")?;
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_sagaflow"));
        cmd.arg("node");
        for url in &self.opts.nats {
            cmd.arg("--nats").arg(url);
        }
        cmd.arg("--grpc-addr").arg(self.grpc_addr.to_string());
        if self.opts.demo_services {
            cmd.arg("--demo-services");
        }
        cmd.arg("--saga-dir")
            .arg(&self.opts.saga_dir)
            .arg("--node-id")
            .arg(&self.opts.node_id);
        cmd.args(&self.opts.args);
        // The test's own SAGAFLOW_* settings must not leak into the node.
        for (key, _) in std::env::vars_os() {
            if key.to_string_lossy().starts_with("SAGAFLOW_") {
                cmd.env_remove(key);
            }
        }
        cmd.envs(self.opts.env.iter().map(|(k, v)| (k, v)));
        let child = cmd
            .stdin(Stdio::null())
            .stdout(Stdio::from(log_out))
            .stderr(Stdio::from(log))
            .spawn()
            .context("spawn sagaflow node")?;
        self.child = Some(child);
        Ok(())
    }

    /// Node id.
    pub fn node_id(&self) -> &str {
        &self.opts.node_id
    }

    /// Where its gRPC API listens.
    pub fn grpc_addr(&self) -> SocketAddr {
        self.grpc_addr
    }

    /// `127.0.0.1:PORT`, as the CLI's `--server` takes it.
    pub fn server_arg(&self) -> String {
        self.grpc_addr.to_string()
    }

    /// Process id, while it runs.
    pub fn pid(&mut self) -> Option<u32> {
        if self.is_running() {
            self.child.as_ref().map(Child::id)
        } else {
            None
        }
    }

    /// Whether the process is alive.
    pub fn is_running(&mut self) -> bool {
        matches!(self.child.as_mut().map(Child::try_wait), Some(Ok(None)))
    }

    /// Its exit status, if it exited (without waiting).
    pub fn exit_status(&mut self) -> Option<ExitStatus> {
        self.child
            .as_mut()
            .and_then(|c| c.try_wait().ok().flatten())
    }

    /// The log file (stderr + stdout, appended across restarts).
    pub fn log_file(&self) -> &Path {
        &self.log_file
    }

    /// The whole log so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log_file).unwrap_or_default()
    }

    /// Kills the process (SIGKILL, a crash) and reaps it.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Sends SIGTERM and waits up to `timeout` for a graceful exit; kills it and fails if it
    /// does not exit in time.
    pub fn terminate(&mut self, timeout: Duration) -> anyhow::Result<ExitStatus> {
        let Some(mut child) = self.child.take() else {
            bail!("node {} is not running", self.opts.node_id)
        };
        let status = Command::new("kill")
            .arg("-TERM")
            .arg(child.id().to_string())
            .status()
            .context("run kill -TERM")?;
        if !status.success() {
            // Already gone: reap it.
            return child.wait().context("wait for node");
        }
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = child.try_wait().context("wait for node")? {
                return Ok(status);
            }
            if Instant::now() >= deadline {
                let _ = child.kill();
                let _ = child.wait();
                bail!(
                    "node {} did not exit within {timeout:?} of SIGTERM",
                    self.opts.node_id
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Kills the process if it runs and starts it again with the same options and gRPC port.
    pub fn restart(&mut self) -> anyhow::Result<()> {
        self.kill();
        self.spawn()
    }

    /// An order client, once the node answers (bounded by [`CONNECT_TIMEOUT`]).
    pub async fn connect_orders(&self) -> anyhow::Result<OrderServiceClient<Channel>> {
        connect_orders(&self.server_arg()).await
    }

    /// The last `n` lines of the log.
    pub fn log_tail(&self, n: usize) -> String {
        let log = self.log();
        let lines: Vec<&str> = log.lines().collect();
        lines[lines.len().saturating_sub(n)..].join("\n")
    }
}

impl Drop for NodeProcess {
    fn drop(&mut self) {
        self.kill();
        if std::thread::panicking() {
            eprintln!(
                "--- last lines of node {} log ---\n{}\n---",
                self.opts.node_id,
                self.log_tail(60)
            );
        }
    }
}

/// A gRPC channel to `addr` (`host:port` or `http://host:port`); one attempt, bounded by 5 s.
pub async fn channel(addr: &str) -> anyhow::Result<Channel> {
    let url = if addr.starts_with("http://") {
        addr.to_string()
    } else {
        format!("http://{addr}")
    };
    let endpoint =
        tonic::transport::Endpoint::from_shared(url)?.connect_timeout(Duration::from_secs(5));
    Ok(within(Duration::from_secs(5), "grpc connect", endpoint.connect()).await??)
}

/// Retries `attempt` until it succeeds, for at most `timeout`; the error keeps the last failure.
async fn retry<T, F, Fut>(timeout: Duration, what: &str, mut attempt: F) -> anyhow::Result<T>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = anyhow::Result<T>>,
{
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        let left = deadline.saturating_duration_since(tokio::time::Instant::now());
        let last = match tokio::time::timeout(left, attempt()).await {
            Ok(Ok(v)) => return Ok(v),
            Ok(Err(e)) => format!("{e:#}"),
            Err(_) => "attempt timed out".to_string(),
        };
        if tokio::time::Instant::now() >= deadline {
            bail!("{what}: gave up after {timeout:?}: {last}");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// An `OrderService` client, once a `ListOrders` call on `addr` succeeds (bounded by
/// [`CONNECT_TIMEOUT`]).
pub async fn connect_orders(addr: &str) -> anyhow::Result<OrderServiceClient<Channel>> {
    retry(
        CONNECT_TIMEOUT,
        &format!("connect to orders at {addr}"),
        || async {
            let mut client = OrderServiceClient::new(channel(addr).await?);
            let probe = ListOrdersRequest {
                page_size: 1,
                ..Default::default()
            };
            within(
                Duration::from_secs(5),
                "ListOrders",
                client.list_orders(probe),
            )
            .await??;
            Ok(client)
        },
    )
    .await
}

/// A `SagaService` client, once a `ListDefinitions` call on `addr` succeeds.
pub async fn connect_sagas(addr: &str) -> anyhow::Result<SagaServiceClient<Channel>> {
    retry(
        CONNECT_TIMEOUT,
        &format!("connect to sagas at {addr}"),
        || async {
            let mut client = SagaServiceClient::new(channel(addr).await?);
            within(
                Duration::from_secs(5),
                "ListDefinitions",
                client.list_definitions(ListDefinitionsRequest {}),
            )
            .await??;
            Ok(client)
        },
    )
    .await
}

/// An `AnalyticsService` client on `addr` (connects once the port answers).
pub async fn connect_analytics(addr: &str) -> anyhow::Result<AnalyticsServiceClient<Channel>> {
    retry(
        CONNECT_TIMEOUT,
        &format!("connect to analytics at {addr}"),
        || async { Ok(AnalyticsServiceClient::new(channel(addr).await?)) },
    )
    .await
}

/// An async-nats client on `url` (bounded).
pub async fn nats_client(url: &str) -> anyhow::Result<async_nats::Client> {
    Ok(within(TIMEOUT, "connect to nats", async_nats::connect(url)).await??)
}

/// Cluster timings short enough for tests that watch nodes come and go: heartbeats every
/// 200 ms, a node lost after 1 s, drained within 3 s.
pub const FAST_CLUSTER: &[(&str, &str)] = &[
    ("SAGAFLOW_CLUSTER__HEARTBEAT_INTERVAL", "200ms"),
    ("SAGAFLOW_CLUSTER__NODE_TTL", "1s"),
    ("SAGAFLOW_CLUSTER__DRAIN_TIMEOUT", "3s"),
];

/// A saga folder of the test fixtures (`tests/fixtures/sagas/<name>`).
pub fn fixture_sagas(name: &str) -> PathBuf {
    repo_dir().join("tests/fixtures/sagas").join(name)
}

/// An in-process node for a test, configured step by step and started with a bound:
///
/// ```ignore
/// let node = TestNode::on(&nats).id("a").partitions(8).fast_cluster().start().await?;
/// ```
///
/// Defaults: node id `test-1`, the demo services, the repository's `sagas/`, gRPC on a free
/// loopback port, the configuration's own defaults for everything else (as `SAGAFLOW_*`
/// variables would set them, so [`TestNode::config`] is what a node started that way reads).
#[derive(Debug, Clone)]
pub struct TestNode {
    nats: Vec<String>,
    id: String,
    env: std::collections::BTreeMap<String, String>,
    saga_dir: PathBuf,
    demo: bool,
}

impl TestNode {
    /// A node on `nats`.
    pub fn on(nats: &NatsServer) -> Self {
        Self::on_urls(&[nats.url()])
    }

    /// A node on the NATS servers at `urls` (a cluster: any of them).
    pub fn on_urls(urls: &[String]) -> Self {
        TestNode {
            nats: urls.to_vec(),
            id: "test-1".to_string(),
            env: Default::default(),
            saga_dir: repo_dir().join("sagas"),
            demo: true,
        }
    }

    /// The node id.
    pub fn id(mut self, id: &str) -> Self {
        self.id = id.to_string();
        self
    }

    /// `partitions` (unset: the configuration's default, and `partitions_set` false).
    pub fn partitions(self, n: u32) -> Self {
        self.env("SAGAFLOW_PARTITIONS", &n.to_string())
    }

    /// [`FAST_CLUSTER`] timings.
    pub fn fast_cluster(self) -> Self {
        self.envs(FAST_CLUSTER)
    }

    /// The metrics and probe endpoint on a free loopback port.
    pub fn http(self) -> Self {
        self.env("SAGAFLOW_HTTP_ADDR", "127.0.0.1:0")
    }

    /// One setting, as its `SAGAFLOW_*` variable (`SAGAFLOW_STREAMS__KV_HISTORY`, `64`).
    pub fn env(mut self, key: &str, value: &str) -> Self {
        self.env.insert(key.to_string(), value.to_string());
        self
    }

    /// Several settings (see [`TestNode::env`]).
    pub fn envs(self, pairs: &[(&str, &str)]) -> Self {
        pairs.iter().fold(self, |n, (k, v)| n.env(k, v))
    }

    /// The saga definitions' folder.
    pub fn saga_dir(mut self, dir: impl Into<PathBuf>) -> Self {
        self.saga_dir = dir.into();
        self
    }

    /// No demo services: the test's own participants answer the commands.
    pub fn without_demo(mut self) -> Self {
        self.demo = false;
        self
    }

    /// The configuration this node starts with.
    pub fn config(&self) -> sagaflow::config::NodeConfig {
        let overrides = sagaflow::config::Overrides {
            nats: self.nats.clone(),
            grpc_addr: Some(SocketAddr::from(([127, 0, 0, 1], 0))),
            demo_services: Some(self.demo),
            demo_service_list: None,
            saga_dir: Some(self.saga_dir.clone()),
            node_id: Some(self.id.clone()),
            log_format: None,
            auth_tokens: None,
            tls: Default::default(),
            insecure: false,
        };
        #[allow(clippy::expect_used)]
        sagaflow::config::NodeConfig::load(None, &self.env, &overrides)
            .expect("valid test node configuration")
    }

    /// Starts the node (bounded by [`TIMEOUT`]).
    pub async fn start(self) -> anyhow::Result<sagaflow::node::NodeHandle> {
        start_node(self.config()).await
    }
}

/// Starts a node from `config`, bounded by [`TIMEOUT`].
pub async fn start_node(
    config: sagaflow::config::NodeConfig,
) -> anyhow::Result<sagaflow::node::NodeHandle> {
    // Boxed: the start future is large, and a test's runtime may poll it on the test thread's
    // stack.
    Ok(within(
        TIMEOUT,
        "start node",
        Box::pin(sagaflow::node::start(config)),
    )
    .await??)
}

/// A plain HTTP/1.1 GET: (status, body).
pub async fn http_get(addr: SocketAddr, path: &str) -> anyhow::Result<(u16, String)> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(addr).await?;
    s.write_all(
        format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n").as_bytes(),
    )
    .await?;
    let mut raw = Vec::new();
    s.read_to_end(&mut raw).await?;
    let text = String::from_utf8(raw)?;
    let (head, body) = text
        .split_once("\r\n\r\n")
        .ok_or_else(|| anyhow::anyhow!("no header end in {text:?}"))?;
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .ok_or_else(|| anyhow::anyhow!("bad status line in {head:?}"))?;
    Ok((status, body.to_string()))
}

/// Sum of the samples of `name` (any labels) in an OpenMetrics text; `None` if absent.
pub fn sample_sum(text: &str, name: &str) -> Option<f64> {
    let mut found = None;
    for line in text.lines().filter(|l| !l.starts_with('#')) {
        let Some(rest) = line.strip_prefix(name) else {
            continue;
        };
        if !(rest.starts_with('{') || rest.starts_with(' ')) {
            continue;
        }
        let value = rest
            .rsplit_once('}')
            .map_or(rest, |(_, v)| v)
            .split_whitespace()
            .next()
            .and_then(|v| v.parse::<f64>().ok());
        if let Some(v) = value {
            *found.get_or_insert(0.0) += v;
        }
    }
    found
}
