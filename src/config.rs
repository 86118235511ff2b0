//! Node configuration: built-in defaults → `node.toml` → `SAGAFLOW_*` environment → CLI flags,
//! then [`NodeConfig::validate`] before anything is spawned.
//!
//! The environment is passed in as a map so tests never touch the process environment.
//! An environment variable `SAGAFLOW_A__B=v` sets key `a.b` (double underscore = nesting,
//! lowercase); the value is read as a TOML scalar when it parses as one (`8`, `true`, `"x"`),
//! else as a string, and a comma-separated value for a list key (`nats`) becomes a list.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

/// Why a configuration was refused.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The file could not be read.
    #[error("cannot read config file {path}: {source}")]
    Read {
        /// File.
        path: PathBuf,
        /// Cause.
        source: std::io::Error,
    },
    /// The file, an environment variable or a flag has a bad key or value.
    #[error("invalid configuration{}: {message}", origin.as_deref().map(|o| format!(" in {o}")).unwrap_or_default())]
    Invalid {
        /// File (with line:column) or variable name, when known.
        origin: Option<String>,
        /// What is wrong.
        message: String,
    },
}

fn invalid(origin: Option<String>, message: impl Into<String>) -> Error {
    Error::Invalid {
        origin,
        message: message.into(),
    }
}

/// Default HTTP address of `/metrics`, `/healthz` and `/readyz`.
pub const DEFAULT_HTTP_ADDR: SocketAddr =
    SocketAddr::new(std::net::IpAddr::V4(std::net::Ipv4Addr::LOCALHOST), 9464);

/// A saga with no progress for this many times its step timeout (after its next due time) is
/// flagged stuck (census, metrics, `ListSagasNeedingAttention`).
pub const STUCK_MULTIPLE: u32 = 3;

/// The saga definitions folder when none is set (relative to the working directory; a node
/// started elsewhere runs the definitions built into the binary instead, see
/// [`crate::node::load_definitions`]).
pub const DEFAULT_SAGA_DIR: &str = "sagas";

/// Partitions of a new deployment when `partitions` is not set. Each partition is a durable
/// consumer on `SAGA_EVENTS`, and nats-server pays for every one: more partitions cost the
/// server measurably more CPU per saga, most on an R3 cluster (docs/benchmarks.md, *Fewer
/// partitions by default*). Eight serve up to eight nodes.
pub const DEFAULT_PARTITIONS: u32 = 8;

/// The most partitions a deployment may have.
pub const MAX_PARTITIONS: u32 = 1024;

/// Everything a node needs to run. Every field has a default, so a node runs without a file.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct NodeConfig {
    /// This node's id in the cluster (default: `node-<random>`).
    pub node_id: String,
    /// NATS server URLs; several for a NATS cluster.
    pub nats: Vec<String>,
    /// Where the gRPC API listens.
    pub grpc_addr: SocketAddr,
    /// Where the HTTP endpoint (`/metrics`, `/healthz`, `/readyz`) listens. When it is the
    /// default ([`DEFAULT_HTTP_ADDR`]) and that port is taken (several nodes on one machine),
    /// the node listens on a free port instead and logs it.
    pub http_addr: SocketAddr,
    /// Folder of saga definitions (`*.toml`).
    pub saga_dir: PathBuf,
    /// Number of saga event partitions ([`DEFAULT_PARTITIONS`] unless set). Fixed for the life
    /// of a deployment: changing it moves sagas. A node where it is not set takes the count of
    /// the deployment it joins; one where it is set refuses to join a deployment with another.
    pub partitions: u32,
    /// Whether `partitions` was set (in the file or the environment) rather than defaulted.
    #[serde(skip)]
    pub partitions_set: bool,
    /// Run the demo participant services (payment, inventory, shipping, notification, analytics) in this node.
    pub demo_services: bool,
    /// Demo services' knobs.
    pub demo: DemoConfig,
    /// Stream and KV settings.
    pub streams: StreamsConfig,
    /// How long finished sagas are kept.
    pub retention: RetentionConfig,
    /// Consumer settings.
    pub consumers: ConsumerConfig,
    /// Membership and partition leases.
    pub cluster: ClusterConfig,
    /// When the API refuses new sagas because the node is overloaded.
    pub admission: AdmissionConfig,
    /// Size limits that keep every saga snapshot bounded (outputs, error texts, reasons and
    /// the history; see [`sagaflow_actors::machine::Limits`]): `[snapshots]` in the file,
    /// `SAGAFLOW_SNAPSHOTS__MAX_OUTPUT_BYTES` and the like in the environment.
    pub snapshots: sagaflow_actors::machine::Limits,
    /// Milliseconds added to this node's wall clock (its saga timings and the `heartbeat_at`
    /// it writes): tests simulate a node whose clock is off. Never read from a file, the
    /// environment or flags.
    #[serde(skip)]
    pub clock_offset_ms: i64,
    /// `text` or `json`.
    pub log_format: String,
    /// OpenTelemetry collector (`http://host:4317`) spans are exported to over OTLP/gRPC, in a
    /// build with the `otel` feature; unset: no export.
    pub otlp_endpoint: Option<String>,
    /// Who may call the gRPC API (see [`crate::auth`]).
    pub auth: AuthConfig,
    /// TLS for the gRPC API (see [`crate::tls`]).
    pub tls: TlsConfig,
    /// Listen on a non-loopback address without TLS and tokens (`--insecure`): only behind
    /// something else that secures the port.
    pub insecure: bool,
    /// How the node (and the participants it hosts) authenticates to NATS.
    pub nats_credentials: NatsCredentials,
    /// TLS to NATS.
    pub nats_tls: NatsTls,
}

/// A secret from the configuration: never printed (`Debug` shows `***`).
#[derive(Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(transparent)]
pub struct Secret(pub String);

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("***")
    }
}

/// `[nats_credentials]`: at most one way of authenticating to NATS.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct NatsCredentials {
    /// A `.creds` file (user JWT and nkey seed), as `nsc` writes them.
    pub creds_file: Option<PathBuf>,
    /// A file holding an nkey seed (`SU…`).
    pub nkey_file: Option<PathBuf>,
    /// User name (with `password`).
    pub user: Option<String>,
    /// Password (with `user`); prefer `SAGAFLOW_NATS_CREDENTIALS__PASSWORD` to the file.
    pub password: Option<Secret>,
    /// A token.
    pub token: Option<Secret>,
}

/// `[nats_tls]`: TLS to the NATS servers.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct NatsTls {
    /// CA certificates (PEM) that the servers' certificates chain to.
    pub ca: Option<PathBuf>,
    /// Client certificate (PEM), for servers that verify clients…
    pub cert: Option<PathBuf>,
    /// …and its key.
    pub key: Option<PathBuf>,
    /// Refuse to talk to a server without TLS (on whenever any of the above is set).
    pub required: bool,
}

/// Text with the credentials of every URL in it hidden: `nats://user:password@host:4222`
/// becomes `nats://***@host:4222`. URLs in logs and answers never carry credentials.
pub fn redact_url(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    while let Some(i) = rest.find("://") {
        let (head, tail) = rest.split_at(i + 3);
        out.push_str(head);
        // The authority ends at the first `/`, whitespace, quote or comma.
        let end = tail
            .find(|c: char| c == '/' || c.is_whitespace() || "\"',".contains(c))
            .unwrap_or(tail.len());
        let authority = &tail[..end];
        match authority.rfind('@') {
            Some(at) => {
                out.push_str("***");
                out.push_str(&authority[at..]);
            }
            None => out.push_str(authority),
        }
        rest = &tail[end..];
    }
    out.push_str(rest);
    out
}

/// `[tls]`: the gRPC API's certificate, key and client CA (PEM files).
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TlsConfig {
    /// Certificate chain (`--tls-cert`).
    pub cert: Option<PathBuf>,
    /// Private key (`--tls-key`).
    pub key: Option<PathBuf>,
    /// CA that client certificates must chain to (`--tls-client-ca`); set: mutual TLS.
    pub client_ca: Option<PathBuf>,
}

/// `[auth]`: tokens and reflection.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AuthConfig {
    /// The tokens file (`--auth-tokens`); unset: no authentication (every call is allowed).
    pub tokens: Option<PathBuf>,
    /// Serve gRPC reflection (open to anyone, like health checks).
    pub reflection: bool,
    /// Roles of mutual-TLS clients by their certificate's common name (`[[auth.certificate]]`),
    /// for calls that carry no token.
    pub certificate: Vec<CertificateRole>,
}

/// `[[auth.certificate]]`: a client certificate's common name and the role it gives.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CertificateRole {
    /// The certificate's subject common name (`CN`).
    pub common_name: String,
    /// reader, client, operator or admin.
    pub role: String,
    /// The identity recorded in journals (default: the common name).
    pub name: Option<String>,
}

impl Default for AuthConfig {
    fn default() -> Self {
        AuthConfig {
            tokens: None,
            reflection: true,
            certificate: Vec::new(),
        }
    }
}

/// The demo participant services, in the order they are started.
pub const DEMO_SERVICES: [&str; 4] = ["payment", "inventory", "shipping", "notification"];

/// Knobs of the demo participant services.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DemoConfig {
    /// Which of the demo services run (default: all of [`DEMO_SERVICES`]); leave out the ones
    /// your own participants serve, so they do not share a consumer group with the demo.
    pub services: Vec<String>,
    /// Instances (actors) per service on this node, all sharing the service's consumer group.
    /// Each handles one command at a time, so this is also each demo service's concurrency on
    /// the node: too few hold the bench back on round trips to NATS; 64 are not the limit
    /// (docs/benchmarks.md).
    pub instances: usize,
    /// Payment declines any amount above this (cents).
    pub payment_limit_cents: i64,
    /// Initial stock per SKU, written once when the stock bucket has no entry for the SKU.
    pub stock: BTreeMap<String, u64>,
    /// Share of commands that fail with a transient `unavailable` error (0..1).
    pub failure_rate: f64,
    /// Added latency per command, milliseconds.
    pub latency_ms: u64,
    /// Share of commands whose handler panics (0..1), to exercise supervision.
    pub panic_rate: f64,
    /// Answer from the command alone and record nothing: no ledger entries, and the stock in
    /// `stock` is never taken from (an order is out of stock when an item wants more units
    /// than listed). Duplicates still get the same answer, since it depends only on the
    /// command. For measuring the orchestrator without the participants' own writes (the
    /// bench's baseline participant writes nothing either); the exactly-once effects are then
    /// not observable, as there are none.
    pub stateless: bool,
}

/// Stream and KV retention and replication.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct StreamsConfig {
    /// Replicas of every stream and bucket: 1 for dev, 3 in production (durability comes from replication).
    pub replicas: usize,
    /// How long events, commands and status events are kept (0: no age limit).
    #[serde(with = "humantime_secs")]
    pub max_age: Duration,
    /// Window in which a republished message with the same `Nats-Msg-Id` is dropped by the
    /// server (de-duplication of commands and control events; not the API's idempotency).
    #[serde(with = "humantime_secs")]
    pub duplicate_window: Duration,
    /// Size cap per stream, bytes (-1: unlimited). Not applied to the snapshot bucket.
    pub max_bytes: i64,
    /// How long dead letters are kept (0: no age limit).
    #[serde(with = "humantime_secs")]
    pub dlq_max_age: Duration,
    /// Revisions kept per saga in the snapshot bucket `sagaflow_sagas` (1..=64); older ones
    /// are for inspection with NATS tools only.
    pub kv_history: i64,
    /// How lifecycle events (`sagaflow.status.<saga>.<saga_id>`) go out: `stream` (stored in
    /// `SAGA_STATUS` for durable consumers) or `core` (plain NATS messages for live
    /// subscribers, nothing stored).
    pub status_events: StatusEvents,
}

/// How lifecycle events are published.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum StatusEvents {
    /// Stored in the `SAGA_STATUS` stream, published with `Nats-Msg-Id` and acknowledged: a
    /// durable consumer (the demo analytics, a data pipeline) sees every change exactly once,
    /// even if it was down when the change happened.
    #[default]
    Stream,
    /// Published as plain NATS messages on the same subjects, not stored and not
    /// acknowledged: subscribers that are connected see them (best effort), nothing else does.
    /// Three fewer stored messages per order saga. `SAGA_STATUS` is not created (one left from
    /// `stream` would still store them: delete it), and the demo analytics, which needs the
    /// stream, does not run. `WatchOrder`/`WatchSaga` do not depend on these events.
    Core,
}

/// Retention of finished sagas.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RetentionConfig {
    /// How long the snapshot of a finished saga (COMPLETED, COMPENSATED or FAILED phase) is
    /// kept after it finished, then removed by the server (per-message TTL, whole seconds,
    /// rounded up). `PlaceOrder`/`StartSaga` stay idempotent on the id for at least this long.
    /// At least 1 s and at least `streams.duplicate_window`.
    #[serde(with = "humantime_secs")]
    pub finished_sagas: Duration,
}

/// Shortest allowed [`RetentionConfig::finished_sagas`] (the server's TTL granularity).
pub const MIN_FINISHED_SAGAS: Duration = Duration::from_secs(1);
/// Longest allowed [`RetentionConfig::finished_sagas`] (about ten years).
pub const MAX_FINISHED_SAGAS: Duration = Duration::from_secs(3650 * 24 * 3600);
/// Most revisions a JetStream KV bucket keeps per key.
pub const MAX_KV_HISTORY: i64 = 64;

/// Consumer tuning.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ConsumerConfig {
    /// Redelivery delay of an unacked saga event.
    #[serde(with = "humantime_secs")]
    pub event_ack_wait: Duration,
    /// Redelivery delay of an unacked command: keep it above the p99 of participant handling.
    #[serde(with = "humantime_secs")]
    pub command_ack_wait: Duration,
    /// Deliveries of one command before it is dead-lettered.
    pub command_max_deliver: i64,
    /// Deliveries of one saga event that keeps failing for a transient reason (the store or
    /// NATS unavailable) before it is dead-lettered with the last error; between them it waits
    /// 1 s, doubling up to 30 s (the default, 10, gives up after about 3.5 minutes).
    pub event_max_deliver: u32,
    /// Unacked messages a consumer may have out; delivery stops silently beyond it, so size it
    /// for instances × concurrency.
    pub max_ack_pending: i64,
}

impl Default for NodeConfig {
    fn default() -> Self {
        NodeConfig {
            node_id: format!("node-{:08x}", rand::random::<u32>()),
            nats: vec!["nats://127.0.0.1:4222".to_string()],
            grpc_addr: SocketAddr::from(([127, 0, 0, 1], 50051)),
            http_addr: DEFAULT_HTTP_ADDR,
            saga_dir: PathBuf::from(DEFAULT_SAGA_DIR),
            partitions: DEFAULT_PARTITIONS,
            partitions_set: false,
            demo_services: false,
            demo: DemoConfig::default(),
            streams: StreamsConfig::default(),
            retention: RetentionConfig::default(),
            consumers: ConsumerConfig::default(),
            cluster: ClusterConfig::default(),
            admission: AdmissionConfig::default(),
            snapshots: sagaflow_actors::machine::Limits::default(),
            clock_offset_ms: 0,
            log_format: "text".to_string(),
            otlp_endpoint: None,
            auth: AuthConfig::default(),
            tls: TlsConfig::default(),
            insecure: false,
            nats_credentials: NatsCredentials::default(),
            nats_tls: NatsTls::default(),
        }
    }
}

impl Default for DemoConfig {
    fn default() -> Self {
        let mut stock: BTreeMap<String, u64> =
            (1..=9).map(|i| (format!("SKU-{i}"), 1_000_000)).collect();
        stock.insert("SKU-OUT".to_string(), 0);
        DemoConfig {
            services: DEMO_SERVICES.iter().map(|s| s.to_string()).collect(),
            instances: 64,
            payment_limit_cents: 100_000,
            stock,
            failure_rate: 0.0,
            latency_ms: 0,
            panic_rate: 0.0,
            stateless: false,
        }
    }
}

impl Default for StreamsConfig {
    fn default() -> Self {
        StreamsConfig {
            replicas: 1,
            max_age: Duration::from_secs(7 * 24 * 3600),
            duplicate_window: Duration::from_secs(120),
            max_bytes: -1,
            dlq_max_age: Duration::from_secs(30 * 24 * 3600),
            kv_history: 1,
            status_events: StatusEvents::Stream,
        }
    }
}

impl Default for RetentionConfig {
    fn default() -> Self {
        RetentionConfig {
            finished_sagas: Duration::from_secs(7 * 24 * 3600),
        }
    }
}

impl Default for ConsumerConfig {
    fn default() -> Self {
        ConsumerConfig {
            event_ack_wait: Duration::from_secs(30),
            command_ack_wait: Duration::from_secs(30),
            command_max_deliver: 20,
            event_max_deliver: 10,
            max_ack_pending: 20_000,
        }
    }
}

/// Membership heartbeats and partition leases.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ClusterConfig {
    /// How often a node heartbeats and reconciles its partition leases.
    #[serde(with = "humantime_secs")]
    pub heartbeat_interval: Duration,
    /// A node whose last heartbeat is older than this is considered gone, and its partitions
    /// are taken over. Keep it several heartbeats long.
    #[serde(with = "humantime_secs")]
    pub node_ttl: Duration,
    /// How long a node handing a partition over waits for its in-flight events to finish.
    #[serde(with = "humantime_secs")]
    pub drain_timeout: Duration,
    /// A saga actor with nothing to do for this long is stopped and its saga kept *dormant*:
    /// only its next due time stays in memory, and its next event or due time brings it back
    /// with one read of its snapshot. `0` keeps every actor until its saga ends.
    #[serde(with = "humantime_secs")]
    pub passivate_after: Duration,
    /// Passivation after `passivate_after` applies only while the node holds more live saga
    /// actors than this.
    pub passivate_above: usize,
    /// A saga actor idle for this long is passivated however many the node holds. `0`:
    /// only above `passivate_above`.
    #[serde(with = "humantime_secs")]
    pub passivate_always_after: Duration,
}

impl Default for ClusterConfig {
    fn default() -> Self {
        ClusterConfig {
            heartbeat_interval: Duration::from_secs(1),
            node_ttl: Duration::from_secs(5),
            drain_timeout: Duration::from_secs(5),
            passivate_after: Duration::from_secs(2),
            passivate_above: 5_000,
            passivate_always_after: Duration::from_secs(30),
        }
    }
}

/// Admission control: `PlaceOrder` and `StartSaga` refuse new sagas (`RESOURCE_EXHAUSTED`,
/// with a retry delay) while the node is overloaded, so that the sagas already admitted finish
/// within their step timeouts instead of every saga timing out, retrying and compensating.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AdmissionConfig {
    /// Refuse new sagas while the attempts of any one step wait more than this share of their
    /// step timeout: on average over the attempts that ended in the last second, or as
    /// predicted from the step's backlog (0.25: 2.5 s for a 10 s timeout). `0` turns
    /// admission control off. See [`crate::admission`].
    pub max_timeout_share: f64,
}

impl Default for AdmissionConfig {
    fn default() -> Self {
        AdmissionConfig {
            max_timeout_share: 0.25,
        }
    }
}

/// Settings given on the command line; `None` leaves the lower layers' value.
#[derive(Debug, Clone, Default)]
pub struct Overrides {
    /// `--nats` (repeatable).
    pub nats: Vec<String>,
    /// `--grpc-addr`.
    pub grpc_addr: Option<SocketAddr>,
    /// `--demo-services` (and `--no-demo`).
    pub demo_services: Option<bool>,
    /// `--demo-services LIST`: which demo services run.
    pub demo_service_list: Option<Vec<String>>,
    /// `--saga-dir`.
    pub saga_dir: Option<PathBuf>,
    /// `--node-id`.
    pub node_id: Option<String>,
    /// `--log-format`.
    pub log_format: Option<String>,
    /// `--auth-tokens`.
    pub auth_tokens: Option<PathBuf>,
    /// `--tls-cert`, `--tls-key`, `--tls-client-ca`.
    pub tls: TlsConfig,
    /// `--insecure`.
    pub insecure: bool,
}

impl NodeConfig {
    /// Applies `--http-addr` (the command line beats the file and the environment).
    pub fn with_http_addr(mut self, addr: Option<SocketAddr>) -> Self {
        if let Some(a) = addr {
            self.http_addr = a;
        }
        self
    }

    /// Layers defaults, the file (if any), `SAGAFLOW_*` variables from `env` and `overrides`,
    /// then validates.
    pub fn load(
        file: Option<&Path>,
        env: &BTreeMap<String, String>,
        overrides: &Overrides,
    ) -> Result<Self, Error> {
        let mut root = toml::Table::new();
        let mut origin = None;
        if let Some(path) = file {
            let text = std::fs::read_to_string(path).map_err(|source| Error::Read {
                path: path.to_path_buf(),
                source,
            })?;
            root = text.parse::<toml::Table>().map_err(|e| {
                let (line, col) = e.span().map_or((1, 1), |s| {
                    sagaflow_actors::definition::line_col(&text, s.start)
                });
                invalid(
                    Some(format!("{}:{line}:{col}", path.display())),
                    e.message().to_string(),
                )
            })?;
            origin = Some(path.display().to_string());
        }
        for (key, value) in env {
            let Some(rest) = key.strip_prefix("SAGAFLOW_") else {
                continue;
            };
            if rest.is_empty() {
                continue;
            }
            let path: Vec<String> = rest.split("__").map(str::to_ascii_lowercase).collect();
            set_path(&mut root, &path, env_value(&path, value))
                .map_err(|m| invalid(Some(key.clone()), m))?;
        }
        if !overrides.nats.is_empty() {
            root.insert(
                "nats".into(),
                toml::Value::Array(
                    overrides
                        .nats
                        .iter()
                        .cloned()
                        .map(toml::Value::String)
                        .collect(),
                ),
            );
        }
        if let Some(addr) = overrides.grpc_addr {
            root.insert("grpc_addr".into(), toml::Value::String(addr.to_string()));
        }
        if let Some(demo) = overrides.demo_services {
            root.insert("demo_services".into(), toml::Value::Boolean(demo));
        }
        if let Some(list) = &overrides.demo_service_list {
            set_path(
                &mut root,
                &["demo".to_string(), "services".to_string()],
                toml::Value::Array(list.iter().cloned().map(toml::Value::String).collect()),
            )
            .map_err(|m| invalid(Some("--demo-services".into()), m))?;
        }
        if let Some(dir) = &overrides.saga_dir {
            root.insert(
                "saga_dir".into(),
                toml::Value::String(dir.display().to_string()),
            );
        }
        if let Some(id) = &overrides.node_id {
            root.insert("node_id".into(), toml::Value::String(id.clone()));
        }
        if let Some(f) = &overrides.log_format {
            root.insert("log_format".into(), toml::Value::String(f.clone()));
        }
        if let Some(tokens) = &overrides.auth_tokens {
            set_path(
                &mut root,
                &["auth".to_string(), "tokens".to_string()],
                toml::Value::String(tokens.display().to_string()),
            )
            .map_err(|m| invalid(Some("--auth-tokens".into()), m))?;
        }
        for (key, flag, value) in [
            ("cert", "--tls-cert", &overrides.tls.cert),
            ("key", "--tls-key", &overrides.tls.key),
            ("client_ca", "--tls-client-ca", &overrides.tls.client_ca),
        ] {
            if let Some(path) = value {
                set_path(
                    &mut root,
                    &["tls".to_string(), key.to_string()],
                    toml::Value::String(path.display().to_string()),
                )
                .map_err(|m| invalid(Some(flag.into()), m))?;
            }
        }
        if overrides.insecure {
            root.insert("insecure".into(), toml::Value::Boolean(true));
        }
        let partitions_set = root.contains_key("partitions");
        let mut config: NodeConfig = NodeConfig::deserialize(toml::Value::Table(root))
            .map_err(|e| invalid(origin.clone(), e.to_string()))?;
        config.partitions_set = partitions_set;
        config.validate()?;
        Ok(config)
    }

    /// Refuses values the node could not run with.
    pub fn validate(&self) -> Result<(), Error> {
        let bad = |m: String| Err(invalid(None, m));
        if self.node_id.is_empty()
            || !self
                .node_id
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
        {
            return bad(format!(
                "`node_id` must be letters, digits, `-` or `_`, got {:?}",
                self.node_id
            ));
        }
        if self.nats.is_empty() {
            return bad("`nats` needs at least one server URL".into());
        }
        if !(1..=MAX_PARTITIONS).contains(&self.partitions) {
            return bad(format!(
                "`partitions` must be in 1..={MAX_PARTITIONS}, got {}",
                self.partitions
            ));
        }
        if !(1..=5).contains(&self.streams.replicas) {
            return bad(format!(
                "`streams.replicas` must be in 1..=5, got {}",
                self.streams.replicas
            ));
        }
        self.validate_retention()?;
        let mut seen = std::collections::BTreeSet::new();
        for s in &self.demo.services {
            if !DEMO_SERVICES.contains(&s.as_str()) {
                return bad(format!(
                    "`demo.services`: no demo service {s:?} (there are {})",
                    DEMO_SERVICES.join(", ")
                ));
            }
            if !seen.insert(s) {
                return bad(format!("`demo.services`: {s:?} is listed twice"));
            }
        }
        if !(1..=256).contains(&self.demo.instances) {
            return bad(format!(
                "`demo.instances` must be in 1..=256, got {}",
                self.demo.instances
            ));
        }
        for (name, rate) in [
            ("demo.failure_rate", self.demo.failure_rate),
            ("demo.panic_rate", self.demo.panic_rate),
        ] {
            if !(0.0..=1.0).contains(&rate) {
                return bad(format!("`{name}` must be in 0..=1, got {rate}"));
            }
        }
        let share = self.admission.max_timeout_share;
        if !(0.0..1.0).contains(&share) {
            return bad(format!(
                "`admission.max_timeout_share` must be in 0..1 (0: off), got {share}"
            ));
        }
        if self.consumers.max_ack_pending < 1
            || self.consumers.command_max_deliver < 1
            || self.consumers.event_max_deliver < 1
        {
            return bad(
                "`consumers.max_ack_pending`, `consumers.command_max_deliver` and `consumers.event_max_deliver` must be ≥ 1"
                    .into(),
            );
        }
        if self.consumers.event_ack_wait < Duration::from_secs(1)
            || self.consumers.command_ack_wait < Duration::from_secs(1)
        {
            return bad("`consumers.*_ack_wait` must be at least 1s".into());
        }
        if self.cluster.heartbeat_interval < Duration::from_millis(100)
            || self.cluster.node_ttl < self.cluster.heartbeat_interval.saturating_mul(3)
        {
            return bad(format!(
                "`cluster.node_ttl` ({:?}) must be at least 3 × `cluster.heartbeat_interval` ({:?}), which must be ≥ 100ms",
                self.cluster.node_ttl, self.cluster.heartbeat_interval
            ));
        }
        if !matches!(self.log_format.as_str(), "text" | "json") {
            return bad(format!(
                "`log_format` must be `text` or `json`, got {:?}",
                self.log_format
            ));
        }
        self.validate_security()?;
        if let Some(endpoint) = &self.otlp_endpoint {
            crate::telemetry::check_endpoint(endpoint).map_err(|m| invalid(None, m))?;
        }
        Ok(())
    }

    /// TLS files come as a pair; a node listens beyond loopback only with TLS and tokens, or
    /// when told `insecure`.
    fn validate_security(&self) -> Result<(), Error> {
        let bad = |m: String| Err(invalid(None, m));
        match (&self.tls.cert, &self.tls.key) {
            (Some(_), None) => return bad("`tls.cert` is set but not `tls.key` (--tls-key)".into()),
            (None, Some(_)) => {
                return bad("`tls.key` is set but not `tls.cert` (--tls-cert)".into())
            }
            (None, None) if self.tls.client_ca.is_some() => {
                return bad(
                    "`tls.client_ca` needs `tls.cert` and `tls.key` (--tls-cert, --tls-key)".into(),
                )
            }
            _ => {}
        }
        let c = &self.nats_credentials;
        let kinds = [
            c.creds_file.is_some(),
            c.nkey_file.is_some(),
            c.user.is_some() || c.password.is_some(),
            c.token.is_some(),
        ];
        if kinds.iter().filter(|k| **k).count() > 1 {
            return bad("`nats_credentials`: give one of `creds_file`, `nkey_file`, `user` + `password`, `token`".into());
        }
        if c.user.is_some() != c.password.is_some() {
            return bad(
                "`nats_credentials.user` and `nats_credentials.password` go together".into(),
            );
        }
        if self.nats_tls.cert.is_some() != self.nats_tls.key.is_some() {
            return bad("`nats_tls.cert` and `nats_tls.key` go together".into());
        }
        for (i, c) in self.auth.certificate.iter().enumerate() {
            if !matches!(c.role.as_str(), "reader" | "client" | "operator" | "admin") {
                return bad(format!(
                    "`auth.certificate[{i}].role` must be reader, client, operator or admin, got {:?}",
                    c.role
                ));
            }
            if c.common_name.trim().is_empty() {
                return bad(format!("`auth.certificate[{i}].common_name` is empty"));
            }
        }
        if !self.auth.certificate.is_empty() && self.tls.client_ca.is_none() {
            return bad("`auth.certificate` maps client certificates, which needs `tls.client_ca` (--tls-client-ca)".into());
        }
        let exposed = !self.grpc_addr.ip().is_loopback();
        let authenticated = self.auth.tokens.is_some() || !self.auth.certificate.is_empty();
        let secured = self.tls.cert.is_some() && authenticated;
        if exposed && !secured && !self.insecure {
            return bad(format!(
                "refusing to serve gRPC on {} without TLS and tokens: give --tls-cert, --tls-key and --auth-tokens (docs/security.md), listen on 127.0.0.1, or pass --insecure",
                self.grpc_addr
            ));
        }
        Ok(())
    }

    /// Stream limits, the snapshot bucket's history and `retention.*`.
    fn validate_retention(&self) -> Result<(), Error> {
        let bad = |m: String| Err(invalid(None, m));
        let s = &self.streams;
        if s.max_bytes != -1 && s.max_bytes < 1 {
            return bad(format!(
                "`streams.max_bytes` must be -1 (unlimited) or a positive number of bytes, got {}",
                s.max_bytes
            ));
        }
        if s.duplicate_window < Duration::from_secs(1) {
            return bad(format!(
                "`streams.duplicate_window` must be at least 1s, got {:?}",
                s.duplicate_window
            ));
        }
        // JetStream refuses a duplicate window longer than the stream's max age.
        for (name, age) in [
            ("streams.max_age", s.max_age),
            ("streams.dlq_max_age", s.dlq_max_age),
        ] {
            if !age.is_zero() && age < s.duplicate_window {
                return bad(format!(
                    "`{name}` ({age:?}) must be 0 (no limit) or at least `streams.duplicate_window` ({:?})",
                    s.duplicate_window
                ));
            }
        }
        if !(1..=MAX_KV_HISTORY).contains(&s.kv_history) {
            return bad(format!(
                "`streams.kv_history` must be in 1..={MAX_KV_HISTORY}, got {}",
                s.kv_history
            ));
        }
        let keep = self.retention.finished_sagas;
        if !(MIN_FINISHED_SAGAS..=MAX_FINISHED_SAGAS).contains(&keep) {
            return bad(format!(
                "`retention.finished_sagas` must be between 1s and 3650d, got {keep:?}"
            ));
        }
        // A saga id placed again once its snapshot is gone starts a new saga whose start
        // event and commands reuse the old `Nats-Msg-Id`s: inside the window the server would
        // drop them as duplicates and the new saga would never start.
        if keep < s.duplicate_window {
            return bad(format!(
                "`retention.finished_sagas` ({keep:?}) must be at least `streams.duplicate_window` ({:?})",
                s.duplicate_window
            ));
        }
        Ok(())
    }
}

fn env_value(path: &[String], raw: &str) -> toml::Value {
    if path.len() == 1 && path[0] == "nats" {
        return toml::Value::Array(
            raw.split(',')
                .map(|s| toml::Value::String(s.trim().to_string()))
                .collect(),
        );
    }
    // A scalar that parses as TOML keeps its type; anything else is a string.
    match format!("v = {raw}").parse::<toml::Table>() {
        Ok(mut t) => t
            .remove("v")
            .unwrap_or_else(|| toml::Value::String(raw.to_string())),
        Err(_) => toml::Value::String(raw.to_string()),
    }
}

fn set_path(root: &mut toml::Table, path: &[String], value: toml::Value) -> Result<(), String> {
    let Some((last, parents)) = path.split_last() else {
        return Ok(());
    };
    let mut table = root;
    for p in parents {
        let entry = table
            .entry(p.clone())
            .or_insert_with(|| toml::Value::Table(toml::Table::new()));
        table = entry
            .as_table_mut()
            .ok_or_else(|| format!("`{p}` is not a table"))?;
    }
    table.insert(last.clone(), value);
    Ok(())
}

/// Durations in config files: `"30s"`, `"5m"`, `"250ms"`, or a number of seconds.
mod humantime_secs {
    use std::time::Duration;

    use serde::{Deserialize, Deserializer};

    pub(super) fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Raw {
            Secs(u64),
            Text(String),
        }
        match Raw::deserialize(d)? {
            Raw::Secs(s) => Ok(Duration::from_secs(s)),
            Raw::Text(t) => sagaflow_actors::duration::parse(&t).map_err(serde::de::Error::custom),
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn defaults_validate() {
        let c = NodeConfig::load(None, &BTreeMap::new(), &Overrides::default()).unwrap();
        assert_eq!(c.partitions, DEFAULT_PARTITIONS);
        assert!(
            !c.partitions_set,
            "the default leaves the deployment's count to be adopted"
        );
        assert_eq!(c.demo.stock.get("SKU-OUT"), Some(&0));
        assert_eq!(c.demo.stock.get("SKU-9"), Some(&1_000_000));
    }

    #[test]
    fn a_node_listens_beyond_loopback_only_with_tls_and_tokens_or_when_told_insecure() {
        let load = |grpc: &str, extra: &[(&str, &str)], insecure: bool| {
            let mut env: BTreeMap<String, String> =
                [("SAGAFLOW_GRPC_ADDR".to_string(), grpc.to_string())].into();
            env.extend(extra.iter().map(|(k, v)| (k.to_string(), v.to_string())));
            NodeConfig::load(
                None,
                &env,
                &Overrides {
                    insecure,
                    ..Default::default()
                },
            )
        };
        assert!(load("127.0.0.1:50051", &[], false).is_ok());
        let open = load("0.0.0.0:50051", &[], false).unwrap_err().to_string();
        assert!(
            open.contains("--insecure") && open.contains("0.0.0.0:50051"),
            "{open}"
        );
        assert!(load("0.0.0.0:50051", &[], true).is_ok());
        let tls = [
            ("SAGAFLOW_TLS__CERT", "c.pem"),
            ("SAGAFLOW_TLS__KEY", "k.pem"),
        ];
        // TLS alone is not enough: anyone could still call.
        assert!(load("0.0.0.0:50051", &tls, false).is_err());
        let mut both = tls.to_vec();
        both.push(("SAGAFLOW_AUTH__TOKENS", "tokens.toml"));
        assert!(load("0.0.0.0:50051", &both, false).is_ok());
        let half = load("127.0.0.1:1", &[("SAGAFLOW_TLS__CERT", "c.pem")], false)
            .unwrap_err()
            .to_string();
        assert!(half.contains("tls.key"), "{half}");
        // Certificate roles need client certificates, and a real role.
        let cert_roles = (
            "SAGAFLOW_AUTH__CERTIFICATE",
            r#"[{ common_name = "bot", role = "reader" }]"#,
        );
        let no_ca = load("127.0.0.1:1", &[cert_roles], false)
            .unwrap_err()
            .to_string();
        assert!(no_ca.contains("tls.client_ca"), "{no_ca}");
        let bad_role = load(
            "127.0.0.1:1",
            &[(
                "SAGAFLOW_AUTH__CERTIFICATE",
                r#"[{ common_name = "bot", role = "root" }]"#,
            )],
            false,
        )
        .unwrap_err()
        .to_string();
        assert!(bad_role.contains("auth.certificate[0].role"), "{bad_role}");
    }

    #[test]
    fn credentials_in_urls_are_hidden() {
        assert_eq!(redact_url("nats://ann:pw@h:4222"), "nats://***@h:4222");
        assert_eq!(redact_url("nats://h:4222"), "nats://h:4222");
        assert_eq!(
            redact_url("failed: tls://t0k3n@a:1, nats://b:2 (x@y)"),
            "failed: tls://***@a:1, nats://b:2 (x@y)"
        );
        assert_eq!(redact_url("no url at all"), "no url at all");
    }

    #[test]
    fn nats_credentials_are_one_kind_and_never_printed() {
        let load = |pairs: &[(&str, &str)]| {
            let env: BTreeMap<String, String> = pairs
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect();
            NodeConfig::load(None, &env, &Overrides::default())
        };
        let c = load(&[
            ("SAGAFLOW_NATS_CREDENTIALS__USER", "node"),
            ("SAGAFLOW_NATS_CREDENTIALS__PASSWORD", "hunter2"),
        ])
        .unwrap();
        assert!(!format!("{c:?}").contains("hunter2"));
        assert!(load(&[("SAGAFLOW_NATS_CREDENTIALS__USER", "node")]).is_err());
        assert!(load(&[
            ("SAGAFLOW_NATS_CREDENTIALS__TOKEN", "t"),
            ("SAGAFLOW_NATS_CREDENTIALS__NKEY_FILE", "k"),
        ])
        .is_err());
        assert!(load(&[("SAGAFLOW_NATS_TLS__CERT", "c")]).is_err());
    }

    #[test]
    fn layers_apply_in_order() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("node.toml");
        std::fs::write(
            &file,
            "partitions = 8\ngrpc_addr = \"127.0.0.1:7000\"\n[demo]\ninstances = 2\n",
        )
        .unwrap();
        let env: BTreeMap<String, String> = [
            ("SAGAFLOW_PARTITIONS".to_string(), "16".to_string()),
            (
                "SAGAFLOW_DEMO__PAYMENT_LIMIT_CENTS".to_string(),
                "500".to_string(),
            ),
            ("SAGAFLOW_DEMO__STATELESS".to_string(), "true".to_string()),
            (
                "SAGAFLOW_NATS".to_string(),
                "nats://a:1, nats://b:2".to_string(),
            ),
            ("OTHER".to_string(), "x".to_string()),
        ]
        .into();
        let o = Overrides {
            grpc_addr: Some("127.0.0.1:7001".parse().unwrap()),
            ..Default::default()
        };
        let c = NodeConfig::load(Some(&file), &env, &o).unwrap();
        assert_eq!(c.partitions, 16, "env beats file");
        assert!(c.partitions_set);
        let from_file = NodeConfig::load(Some(&file), &BTreeMap::new(), &o).unwrap();
        assert_eq!((from_file.partitions, from_file.partitions_set), (8, true));
        assert_eq!(c.demo.instances, 2, "file beats default");
        assert_eq!(c.demo.payment_limit_cents, 500);
        assert!(c.demo.stateless && !NodeConfig::default().demo.stateless);
        assert_eq!(c.nats, vec!["nats://a:1", "nats://b:2"]);
        assert_eq!(c.grpc_addr.port(), 7001, "cli beats env and file");
    }

    #[test]
    fn http_addr_from_file_env_and_flag() {
        let c = NodeConfig::load(None, &BTreeMap::new(), &Overrides::default()).unwrap();
        assert_eq!(c.http_addr, DEFAULT_HTTP_ADDR);
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("node.toml");
        std::fs::write(&file, "http_addr = \"0.0.0.0:9000\"\n").unwrap();
        let c = NodeConfig::load(Some(&file), &BTreeMap::new(), &Overrides::default()).unwrap();
        assert_eq!(c.http_addr.port(), 9000);
        let env: BTreeMap<String, String> = [(
            "SAGAFLOW_HTTP_ADDR".to_string(),
            "127.0.0.1:9100".to_string(),
        )]
        .into();
        let c = NodeConfig::load(Some(&file), &env, &Overrides::default()).unwrap();
        assert_eq!(c.http_addr.port(), 9100, "env beats file");
        let c = c.with_http_addr(Some("127.0.0.1:9200".parse().unwrap()));
        assert_eq!(c.http_addr.port(), 9200, "flag beats env");
    }

    #[test]
    fn passivation_settings_default_and_layer() {
        let c = NodeConfig::load(None, &BTreeMap::new(), &Overrides::default()).unwrap();
        assert_eq!(c.cluster.passivate_after, Duration::from_secs(2));
        assert_eq!(c.cluster.passivate_above, 5_000);
        assert_eq!(c.cluster.passivate_always_after, Duration::from_secs(30));
        let env: BTreeMap<String, String> = [(
            "SAGAFLOW_CLUSTER__PASSIVATE_ALWAYS_AFTER".to_string(),
            "0s".to_string(),
        )]
        .into();
        let c = NodeConfig::load(None, &env, &Overrides::default()).unwrap();
        assert_eq!(c.cluster.passivate_always_after, Duration::ZERO);
    }

    #[test]
    fn retention_settings_default_layer_and_validate() {
        let c = NodeConfig::load(None, &BTreeMap::new(), &Overrides::default()).unwrap();
        assert_eq!(c.streams.kv_history, 1);
        assert_eq!(
            c.retention.finished_sagas,
            Duration::from_secs(7 * 24 * 3600)
        );
        assert_eq!(c.streams.duplicate_window, Duration::from_secs(120));
        assert_eq!(c.streams.max_age, Duration::from_secs(7 * 24 * 3600));
        assert_eq!(c.streams.max_bytes, -1);

        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("node.toml");
        std::fs::write(
            &file,
            "[streams]\nkv_history = 5\nmax_bytes = 1048576\n[retention]\nfinished_sagas = \"36h\"\n",
        )
        .unwrap();
        let c = NodeConfig::load(Some(&file), &BTreeMap::new(), &Overrides::default()).unwrap();
        assert_eq!(c.streams.kv_history, 5);
        assert_eq!(c.streams.max_bytes, 1_048_576);
        assert_eq!(c.retention.finished_sagas, Duration::from_secs(36 * 3600));
        let env: BTreeMap<String, String> = [
            ("SAGAFLOW_STREAMS__KV_HISTORY", "64"),
            ("SAGAFLOW_RETENTION__FINISHED_SAGAS", "2s"),
            ("SAGAFLOW_STREAMS__DUPLICATE_WINDOW", "1s"),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
        let c = NodeConfig::load(Some(&file), &env, &Overrides::default()).unwrap();
        assert_eq!(c.streams.kv_history, 64, "env beats file");
        assert_eq!(c.retention.finished_sagas, Duration::from_secs(2));
        assert_eq!(c.streams.duplicate_window, Duration::from_secs(1));

        let refused = |key: &str, value: &str, needle: &str| {
            let env: BTreeMap<String, String> = [(key.to_string(), value.to_string())].into();
            let err = NodeConfig::load(None, &env, &Overrides::default()).unwrap_err();
            assert!(err.to_string().contains(needle), "{key}={value}: {err}");
        };
        refused("SAGAFLOW_STREAMS__KV_HISTORY", "0", "streams.kv_history");
        refused("SAGAFLOW_STREAMS__KV_HISTORY", "65", "streams.kv_history");
        refused(
            "SAGAFLOW_RETENTION__FINISHED_SAGAS",
            "500ms",
            "retention.finished_sagas",
        );
        // Shorter than the default duplicate window (2m).
        refused(
            "SAGAFLOW_RETENTION__FINISHED_SAGAS",
            "1m",
            "at least `streams.duplicate_window`",
        );
        refused(
            "SAGAFLOW_RETENTION__FINISHED_SAGAS",
            "3651d",
            "retention.finished_sagas",
        );
        refused(
            "SAGAFLOW_RETENTION__FINISHED_SAGAS",
            "soon",
            "invalid duration",
        );
        refused("SAGAFLOW_RETENTION__KEEP", "1d", "keep");
        refused("SAGAFLOW_STREAMS__MAX_BYTES", "0", "streams.max_bytes");
        refused(
            "SAGAFLOW_STREAMS__DUPLICATE_WINDOW",
            "0s",
            "streams.duplicate_window",
        );
        refused("SAGAFLOW_STREAMS__MAX_AGE", "1m", "streams.max_age");
        // 0 is "no age limit" in JetStream, so any duplicate window fits.
        let env: BTreeMap<String, String> =
            [("SAGAFLOW_STREAMS__MAX_AGE".to_string(), "0s".to_string())].into();
        let c = NodeConfig::load(None, &env, &Overrides::default()).unwrap();
        assert!(c.streams.max_age.is_zero());
    }

    #[test]
    fn unknown_key_and_bad_values_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("node.toml");
        std::fs::write(&file, "partitons = 8\n").unwrap();
        let err =
            NodeConfig::load(Some(&file), &BTreeMap::new(), &Overrides::default()).unwrap_err();
        assert!(err.to_string().contains("partitons"), "{err}");
        let env: BTreeMap<String, String> =
            [("SAGAFLOW_PARTITIONS".to_string(), "0".to_string())].into();
        let err = NodeConfig::load(None, &env, &Overrides::default()).unwrap_err();
        assert!(err.to_string().contains("partitions"), "{err}");
    }

    #[test]
    fn status_events_are_stored_unless_configured_as_core() {
        let c = NodeConfig::load(None, &BTreeMap::new(), &Overrides::default()).unwrap();
        assert_eq!(c.streams.status_events, StatusEvents::Stream);
        let env = |v: &str| -> BTreeMap<String, String> {
            [("SAGAFLOW_STREAMS__STATUS_EVENTS".to_string(), v.to_string())].into()
        };
        let c = NodeConfig::load(None, &env("core"), &Overrides::default()).unwrap();
        assert_eq!(c.streams.status_events, StatusEvents::Core);
        let err = NodeConfig::load(None, &env("durable"), &Overrides::default()).unwrap_err();
        let err = err.to_string();
        assert!(
            err.contains("streams.status_events")
                && err.contains("durable")
                && err.contains("stream")
                && err.contains("core"),
            "{err}"
        );
    }
}
