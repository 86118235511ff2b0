//! The system under test: a NATS server and a node the bench starts itself, or an existing
//! cluster.
//!
//! The bench's own NATS is one JetStream server (file store, R1) on a free loopback port with a
//! temporary store; its node is a `sagaflow node` **child process** (this same binary) with the
//! demo services, so its CPU time and memory are measured apart from the bench's own. The node
//! gets the reference order saga (compiled into the binary) in a temporary folder, a free
//! loopback gRPC and HTTP port, none of the caller's `SAGAFLOW_*` or `RUST_LOG` variables (the
//! run is reproducible whatever the shell has set), then `--node-env` on top. Both processes
//! are killed when [`System`] is dropped (the node is first asked to stop with SIGTERM on a
//! normal end), and the temporary folders removed.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use sagaflow::client::{Bearer, Conn};
use sagaflow::telemetry::error_chain;
use sagaflow_proto::v1::admin_service_client::AdminServiceClient;
use sagaflow_proto::v1::order_service_client::OrderServiceClient;
use sagaflow_proto::v1::{ClusterStatusRequest, GetOrderRequest};
use tokio::time::Instant;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::{Certificate, ClientTlsConfig, Endpoint};

use sagaflow_devkit::nats_server::NatsServer;

/// The reference order saga, given to the node the bench starts.
const ORDER_SAGA: &str = include_str!("../../sagas/order.toml");

/// Bound on a node becoming ready: serving gRPC and every partition leased.
pub const NODE_READY_TIMEOUT: Duration = Duration::from_secs(60);

/// Bound on connecting to a node or NATS.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// Bound on one unary gRPC call of the bench.
pub const CALL_TIMEOUT: Duration = Duration::from_secs(10);

/// How long a node asked to stop may take before it is killed.
const STOP_TIMEOUT: Duration = Duration::from_secs(10);

/// Why the system under test could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// nats-server could not be found or started.
    #[error(transparent)]
    NatsServer(#[from] sagaflow_devkit::nats_server::Error),
    /// A file or process operation failed.
    #[error("{what}: {source}")]
    Io {
        /// What was being done.
        what: String,
        /// Cause.
        source: std::io::Error,
    },
    /// The node did not become ready.
    #[error("the node is not ready: {message}\n--- last lines of its log ({log}) ---\n{tail}")]
    NodeNotReady {
        /// Why.
        message: String,
        /// Its log file.
        log: String,
        /// The end of its log.
        tail: String,
    },
    /// The node binary is not where it was looked for.
    #[error(
        "no sagaflow node binary at {}: build it with `cargo build --release --workspace` \
         (it lands next to sagaflow-bench), or name one with --node-bin",
        .0.display()
    )]
    NodeBinary(PathBuf),
    /// An existing node did not answer.
    #[error("cannot reach the node at {addr}: {message}")]
    Unreachable {
        /// Its address.
        addr: String,
        /// Why.
        message: String,
    },
}

fn io(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> Error {
    let what = what.into();
    move |source| Error::Io { what, source }
}

/// A `sagaflow node` child process. Killed when dropped.
#[derive(Debug)]
pub struct NodeProcess {
    child: Option<Child>,
    log: PathBuf,
}

impl NodeProcess {
    /// Its pid, while it runs.
    pub fn pid(&mut self) -> Option<u32> {
        let child = self.child.as_mut()?;
        matches!(child.try_wait(), Ok(None)).then(|| child.id())
    }

    /// Its exit status, if it has exited.
    fn exited(&mut self) -> Option<String> {
        let child = self.child.as_mut()?;
        match child.try_wait() {
            Ok(Some(status)) => Some(status.to_string()),
            _ => None,
        }
    }

    /// The last `n` lines of its log.
    pub fn log_tail(&self, n: usize) -> String {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(n)..].join("\n")
    }

    /// Asks the node to stop (SIGTERM: it hands its partitions back and drains), waits a
    /// bounded time, then kills it.
    pub async fn stop(&mut self) {
        let Some(mut child) = self.child.take() else {
            return;
        };
        let asked = Command::new("kill")
            .arg("-TERM")
            .arg(child.id().to_string())
            .stdin(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success());
        if asked {
            let deadline = Instant::now() + STOP_TIMEOUT;
            while Instant::now() < deadline {
                if !matches!(child.try_wait(), Ok(None)) {
                    return;
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            tracing::warn!("the bench's node did not stop within {STOP_TIMEOUT:?}; killing it");
        }
        let _ = child.kill();
        let _ = child.wait();
    }
}

impl Drop for NodeProcess {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// The NATS server and node under test.
#[derive(Debug)]
pub struct System {
    /// NATS client URL.
    pub nats_url: String,
    /// The node's gRPC URL (`http://host:port`).
    pub grpc_url: String,
    /// The node the bench started.
    pub node: Option<NodeProcess>,
    /// The NATS server the bench started.
    pub nats: Option<NatsServer>,
    /// pid of an existing node to measure (`--node-pid`).
    pub node_pid: Option<u32>,
    /// pid of an existing nats-server to measure (`--nats-pid`).
    pub nats_pid: Option<u32>,
    /// With `--tls`: what a client of the node needs (its CA and a token).
    pub auth: Option<ClientAuth>,
    // Last: removed after the processes are gone.
    _dir: tempfile::TempDir,
}

/// The node binary to start: `explicit`, else `sagaflow` next to this binary (both are built
/// into the same `target/<profile>/` folder by `cargo build --workspace`).
pub fn node_binary(explicit: Option<&Path>) -> Result<PathBuf, Error> {
    let path = match explicit {
        Some(p) => p.to_path_buf(),
        None => std::env::current_exe()
            .map_err(io("cannot find the bench's own binary"))?
            .with_file_name(format!("sagaflow{}", std::env::consts::EXE_SUFFIX)),
    };
    if path.is_file() {
        Ok(path)
    } else {
        Err(Error::NodeBinary(path))
    }
}

/// How to set the system up.
#[derive(Debug, Clone, Default)]
pub struct Setup {
    /// An existing NATS (else one is started).
    pub nats: Option<String>,
    /// An existing node's gRPC URL (else one is started; needs `nats`).
    pub server: Option<String>,
    /// The `sagaflow` binary the started node runs.
    pub node_bin: PathBuf,
    /// Environment for the started node.
    pub node_env: Vec<(String, String)>,
    /// pid of an existing node.
    pub node_pid: Option<u32>,
    /// pid of an existing nats-server.
    pub nats_pid: Option<u32>,
    /// Serve the started node over TLS and require a token (`--tls`).
    pub tls: bool,
}

/// What a client of a node started with `--tls` needs.
#[derive(Debug, Clone)]
pub struct ClientAuth {
    /// The CA that signed the node's certificate (PEM).
    pub ca_pem: Vec<u8>,
    /// A token of the `client` role.
    pub token: String,
}

/// The script users run for local certificates (`scripts/gen-certs.sh`), embedded.
const GEN_CERTS: &str = include_str!("../../scripts/gen-certs.sh");

/// Makes, in `dir`, a CA and a certificate for 127.0.0.1 (`scripts/gen-certs.sh`, with
/// `openssl`), and a tokens file with one random `client` token; returns what a client needs
/// and the node's flags.
fn make_tls(dir: &Path) -> Result<(ClientAuth, Vec<String>), Error> {
    let out = Command::new("bash")
        .arg("-c")
        .arg(GEN_CERTS)
        .arg("gen-certs.sh")
        .arg(dir)
        .output()
        .map_err(io("--tls makes its certificates with bash and openssl"))?;
    if !out.status.success() {
        return Err(Error::Io {
            what: "scripts/gen-certs.sh".to_string(),
            source: std::io::Error::other(String::from_utf8_lossy(&out.stderr).into_owned()),
        });
    }
    let token: String = rand::random::<[u8; 32]>()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    std::fs::write(
        dir.join("tokens.toml"),
        format!(
            "[[token]]\nname = \"bench\"\nrole = \"client\"\nsha256 = \"{}\"\n",
            sagaflow::auth::sha256_hex(&token)
        ),
    )
    .map_err(io("cannot write the tokens file"))?;
    let ca_pem = std::fs::read(dir.join("ca.crt")).map_err(io("cannot read the CA"))?;
    let path = |f: &str| dir.join(f).display().to_string();
    let flags = vec![
        "--tls-cert".to_string(),
        path("node.crt"),
        "--tls-key".to_string(),
        path("node.key"),
        "--auth-tokens".to_string(),
        path("tokens.toml"),
    ];
    Ok((ClientAuth { ca_pem, token }, flags))
}

impl System {
    /// Starts what `setup` does not name, and waits until the node is ready.
    pub async fn start(setup: &Setup) -> Result<System, Error> {
        let dir = tempfile::Builder::new()
            .prefix("sagaflow-bench-")
            .tempdir()
            .map_err(io("cannot create a temporary folder"))?;
        let nats = match &setup.nats {
            Some(_) => None,
            None => Some(
                tokio::task::spawn_blocking(NatsServer::start)
                    .await
                    .map_err(|e| Error::Io {
                        what: "starting nats-server".into(),
                        source: std::io::Error::other(e),
                    })??,
            ),
        };
        let nats_url = setup
            .nats
            .clone()
            .or_else(|| nats.as_ref().map(NatsServer::url))
            .unwrap_or_default();
        let mut system = System {
            nats_url,
            grpc_url: String::new(),
            node: None,
            nats_pid: setup
                .nats_pid
                .or_else(|| nats.as_ref().and_then(NatsServer::pid)),
            nats,
            node_pid: setup.node_pid,
            auth: None,
            _dir: dir,
        };
        match &setup.server {
            Some(url) => {
                system.grpc_url = url.clone();
                wait_ready(&system.grpc_url, None, false, None).await?;
            }
            None => {
                let mut flags = Vec::new();
                if setup.tls {
                    let (auth, f) = make_tls(system._dir.path())?;
                    system.auth = Some(auth);
                    flags = f;
                }
                let (node, addr) = system.spawn_node(&setup.node_bin, &setup.node_env, &flags)?;
                let scheme = if setup.tls { "https" } else { "http" };
                system.grpc_url = format!("{scheme}://{addr}");
                system.node = Some(node);
                let node = system.node.as_mut();
                wait_ready(&system.grpc_url, node, true, system.auth.as_ref()).await?;
                system.node_pid = system.node.as_mut().and_then(NodeProcess::pid);
            }
        }
        Ok(system)
    }

    fn spawn_node(
        &self,
        exe: &Path,
        env: &[(String, String)],
        flags: &[String],
    ) -> Result<(NodeProcess, SocketAddr), Error> {
        let dir = self._dir.path();
        let sagas = dir.join("sagas");
        std::fs::create_dir_all(&sagas).map_err(io("cannot create the saga folder"))?;
        std::fs::write(sagas.join("order.toml"), ORDER_SAGA)
            .map_err(io("cannot write the order saga"))?;
        let ports = (
            sagaflow_devkit::nats_server::free_port()?,
            sagaflow_devkit::nats_server::free_port()?,
        );
        let grpc = SocketAddr::from(([127, 0, 0, 1], ports.0));
        let http = SocketAddr::from(([127, 0, 0, 1], ports.1));
        let log = dir.join("node.log");
        let out = std::fs::File::create(&log).map_err(io("cannot create the node log"))?;
        let err = out.try_clone().map_err(io("cannot create the node log"))?;
        let mut cmd = Command::new(exe);
        cmd.arg("node")
            .arg("--nats")
            .arg(&self.nats_url)
            .arg("--grpc-addr")
            .arg(grpc.to_string())
            .arg("--http-addr")
            .arg(http.to_string())
            .arg("--demo-services")
            .arg("--saga-dir")
            .arg(&sagas)
            .arg("--node-id")
            .arg("bench-node")
            .args(flags);
        for (key, _) in std::env::vars_os() {
            let k = key.to_string_lossy();
            if k.starts_with("SAGAFLOW_") || k == "RUST_LOG" {
                cmd.env_remove(&key);
            }
        }
        cmd.envs(env.iter().map(|(k, v)| (k, v)));
        let child = cmd
            .stdin(Stdio::null())
            .stdout(Stdio::from(out))
            .stderr(Stdio::from(err))
            .spawn()
            .map_err(io("cannot start `sagaflow node`"))?;
        Ok((
            NodeProcess {
                child: Some(child),
                log,
            },
            grpc,
        ))
    }

    /// The traffic counters of the NATS server the bench started (`/varz` of its monitoring
    /// port); `None` for an existing server or when it does not answer in time.
    pub async fn nats_traffic(&self) -> Option<Traffic> {
        let url = self.nats.as_ref()?.monitor_url();
        let addr = url.strip_prefix("http://")?.to_string();
        let body = tokio::time::timeout(CALL_TIMEOUT, http_get(&addr, "/varz"))
            .await
            .ok()?
            .ok()?;
        let v: serde_json::Value = serde_json::from_str(&body).ok()?;
        let n = |k: &str| v.get(k).and_then(serde_json::Value::as_u64);
        Some(Traffic {
            in_msgs: n("in_msgs")?,
            out_msgs: n("out_msgs")?,
            in_bytes: n("in_bytes")?,
            out_bytes: n("out_bytes")?,
        })
    }

    /// Whether the bench started the processes.
    pub fn started(&self) -> bool {
        self.nats.is_some() || self.node.is_some()
    }

    /// Stops the node gracefully, then NATS (killed, its store removed).
    pub async fn stop(mut self) {
        if let Some(node) = self.node.as_mut() {
            node.stop().await;
        }
        if let Some(nats) = self.nats.take() {
            let _ = tokio::task::spawn_blocking(move || drop(nats)).await;
        }
    }
}

/// Messages and bytes a NATS server received from and sent to its clients so far.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Traffic {
    /// Messages received (publishes, acks, pull requests, API requests).
    pub in_msgs: u64,
    /// Messages sent (deliveries, publish acks, API replies).
    pub out_msgs: u64,
    /// Bytes received.
    pub in_bytes: u64,
    /// Bytes sent.
    pub out_bytes: u64,
}

/// A minimal HTTP/1.0 GET of `path` on `addr` (loopback): the body of a 200 answer.
async fn http_get(addr: &str, path: &str) -> std::io::Result<String> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut stream = tokio::net::TcpStream::connect(addr).await?;
    stream
        .write_all(format!("GET {path} HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n").as_bytes())
        .await?;
    let mut response = Vec::new();
    stream.read_to_end(&mut response).await?;
    let text = String::from_utf8_lossy(&response);
    let (head, body) = text
        .split_once("\r\n\r\n")
        .ok_or_else(|| std::io::Error::other("malformed http response"))?;
    if !head.starts_with("HTTP/1.1 200") && !head.starts_with("HTTP/1.0 200") {
        return Err(std::io::Error::other(format!(
            "GET {path}: {}",
            head.lines().next().unwrap_or_default()
        )));
    }
    Ok(body.to_string())
}

/// A gRPC channel to `url` (bounded connect; every call through it bounded by
/// [`CALL_TIMEOUT`]).
pub async fn channel(url: &str, auth: Option<&ClientAuth>) -> Result<Conn, String> {
    let mut endpoint = Endpoint::from_shared(url.to_string())
        .map_err(|e| e.to_string())?
        .connect_timeout(CONNECT_TIMEOUT)
        .timeout(CALL_TIMEOUT)
        .tcp_nodelay(true);
    if let Some(a) = auth {
        endpoint = endpoint
            .tls_config(ClientTlsConfig::new().ca_certificate(Certificate::from_pem(&a.ca_pem)))
            .map_err(|e| error_chain(&e))?;
    }
    let bearer = Bearer::new(auth.map(|a| a.token.as_str()))?;
    match tokio::time::timeout(CONNECT_TIMEOUT, endpoint.connect()).await {
        Ok(Ok(c)) => Ok(InterceptedService::new(c, bearer)),
        Ok(Err(e)) => Err(error_chain(&e)),
        Err(_) => Err(format!("no answer within {CONNECT_TIMEOUT:?}")),
    }
}

/// Waits until the node at `url` answers `GetOrder` from its store and (when `all_partitions`) every
/// partition has an owner, bounded by [`NODE_READY_TIMEOUT`]; fails early if `node` exits.
async fn wait_ready(
    url: &str,
    mut node: Option<&mut NodeProcess>,
    all_partitions: bool,
    auth: Option<&ClientAuth>,
) -> Result<(), Error> {
    let deadline = Instant::now() + NODE_READY_TIMEOUT;
    let mut last = String::from("not tried");
    let not_ready = |node: &Option<&mut NodeProcess>, message: String| match node {
        Some(n) => Error::NodeNotReady {
            message,
            log: n.log.display().to_string(),
            tail: n.log_tail(30),
        },
        None => Error::Unreachable {
            addr: url.to_string(),
            message,
        },
    };
    loop {
        if let Some(n) = node.as_deref_mut() {
            if let Some(status) = n.exited() {
                return Err(not_ready(&node, format!("it exited ({status})")));
            }
        }
        if Instant::now() >= deadline {
            return Err(not_ready(
                &node,
                format!("not ready within {NODE_READY_TIMEOUT:?}: {last}"),
            ));
        }
        match probe(url, all_partitions, auth).await {
            Ok(()) => return Ok(()),
            Err(e) => last = e,
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// One `ListOrders` call, which starts the node's list index.
pub(crate) async fn start_list_index(url: &str, auth: Option<&ClientAuth>) -> Result<(), String> {
    let channel = channel(url, auth).await?;
    OrderServiceClient::new(channel)
        .list_orders(sagaflow_proto::v1::ListOrdersRequest {
            page_size: 1,
            ..Default::default()
        })
        .await
        .map_err(|s| format!("ListOrders: {}", s.message()))?;
    Ok(())
}

async fn probe(url: &str, all_partitions: bool, auth: Option<&ClientAuth>) -> Result<(), String> {
    let channel = channel(url, auth).await?;
    // An order that does not exist: NOT_FOUND comes from a read of the store. (Not a list:
    // the first list starts the node's list index, which the measured run would then pay
    // for, see `docs/benchmarks.md`.)
    let mut orders = OrderServiceClient::new(channel.clone());
    match orders
        .get_order(GetOrderRequest {
            order_id: "bench-readiness-probe".into(),
        })
        .await
    {
        Ok(_) => {}
        Err(s) if s.code() == tonic::Code::NotFound => {}
        Err(s) => return Err(format!("GetOrder: {}", s.message())),
    }
    if all_partitions {
        let status = AdminServiceClient::new(channel)
            .cluster_status(ClusterStatusRequest {})
            .await
            .map_err(|s| format!("ClusterStatus: {}", s.message()))?
            .into_inner();
        let free = status
            .partitions
            .iter()
            .filter(|p| p.owner.is_empty())
            .count();
        if status.partitions.is_empty() || free > 0 {
            return Err(format!(
                "{free} of {} partitions without an owner yet",
                status.partitions.len()
            ));
        }
    }
    Ok(())
}
