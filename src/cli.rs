//! The `sagaflow` command line: `node` and `dev` run things, `saga validate` checks files
//! locally, everything else is a gRPC client of a running node.
//!
//! ```text
//! sagaflow dev [--grpc-addr 127.0.0.1:50051] [--nodes N] [--nats-cluster] [--demo-orders N]
//!              [--saga-dir sagas]
//! sagaflow node [--config node.toml] [--nats URL]... [--grpc-addr ADDR] [--demo-services]
//!               [--saga-dir DIR] [--node-id ID] [--log-format text|json]
//! sagaflow order place|get|list|watch --server ADDR ...
//! sagaflow saga validate FILE... | list | start | get
//! sagaflow analytics sales --server ADDR [--json]
//! sagaflow cluster status --server ADDR [--json]
//! sagaflow dlq list|show|replay|discard --server ADDR ...
//! ```
//!
//! The benchmark is a binary of its own, `sagaflow-bench` (crate `bench/`).
//!
//! `main.rs` parses a [`Cli`], turns it into a [`Plan`] (which loads the node configuration,
//! so the log format can come from the file), initialises tracing and runs the plan. Errors
//! are printed as one `error: ...` line by [`report`]; usage errors exit 2 (clap), others 1.
//!
//! - [`remote`]: the gRPC client commands.
//! - [`render`]: tables and JSON built by hand from the proto messages.
//! - [`validate`]: `saga validate`.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Args, Parser, Subcommand};

use crate::config::{NodeConfig, Overrides};
use crate::dev::DevOptions;

pub mod definitions;
pub mod remote;
pub mod render;
pub mod security;
pub mod validate;

/// Default node address of the client commands.
pub const DEFAULT_SERVER: &str = "127.0.0.1:50051";

/// `sagaflow`: a saga orchestrator on NATS JetStream.
#[derive(Debug, Parser)]
#[command(name = "sagaflow", version, about, propagate_version = true)]
pub struct Cli {
    /// What to do.
    #[command(subcommand)]
    pub command: Command,
}

/// Top-level commands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run a local NATS JetStream server, a node with the demo services and a short demo.
    Dev(DevArgs),
    /// Run a node of a Sagaflow cluster.
    Node(NodeArgs),
    /// Place and follow orders.
    #[command(subcommand)]
    Order(OrderCommand),
    /// Validate, list, start and inspect sagas.
    #[command(subcommand)]
    Saga(SagaCommand),
    /// Reports of the demo analytics service.
    #[command(subcommand)]
    Analytics(AnalyticsCommand),
    /// Inspect the cluster: nodes, partition leases, consumer lag.
    #[command(subcommand)]
    Cluster(ClusterCommand),
    /// Dead letters: list, show, replay and discard them.
    #[command(subcommand)]
    Dlq(DlqCommand),
    /// Security helpers: make a token for the tokens file.
    #[command(subcommand)]
    Security(SecurityCommand),
    /// The benchmark moved to its own binary; this only says so.
    #[command(hide = true)]
    Bench {
        /// Whatever was passed.
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<String>,
    },
}

/// `sagaflow dev`.
#[derive(Debug, Args)]
pub struct DevArgs {
    /// Where the first node's gRPC API listens; node i listens on the port + i - 1.
    #[arg(long, value_name = "ADDR", default_value = DEFAULT_SERVER)]
    pub grpc_addr: SocketAddr,
    /// Nodes started in this process (`dev-1` … `dev-N`), all with the demo services.
    #[arg(long, value_name = "N", default_value_t = 1, value_parser = clap::value_parser!(u16).range(1..=16))]
    pub nodes: u16,
    /// Run a 3-server NATS JetStream cluster (streams and buckets replicated 3 times) instead
    /// of one server.
    #[arg(long)]
    pub nats_cluster: bool,
    /// Orders placed as a demo once the node is up (0: none).
    #[arg(long, value_name = "N", default_value_t = 6)]
    pub demo_orders: usize,
    /// Folder of saga definitions (without it, and no `sagas` folder here: the definitions
    /// built into the binary).
    #[arg(long, value_name = "DIR", default_value = crate::config::DEFAULT_SAGA_DIR)]
    pub saga_dir: PathBuf,
    /// Where the first node's HTTP endpoint (metrics, probes) listens; node i listens on the
    /// port + i - 1.
    #[arg(long, value_name = "ADDR", default_value_t = crate::config::DEFAULT_HTTP_ADDR)]
    pub http_addr: SocketAddr,
    /// The demo services to run, e.g. `payment,notification` when your own participants serve
    /// the others [default: all of payment, inventory, shipping, notification].
    #[arg(long, value_name = "SERVICES", value_delimiter = ',', default_values_t = crate::config::DEMO_SERVICES.map(String::from), value_parser = clap::builder::PossibleValuesParser::new(crate::config::DEMO_SERVICES))]
    pub demo_services: Vec<String>,
    /// Run no demo service: your own participants serve every step.
    #[arg(long, conflicts_with = "demo_services")]
    pub no_demo: bool,
    /// Show the nodes' info logs (default: warnings and errors only; `RUST_LOG` overrides).
    #[arg(short, long)]
    pub verbose: bool,
}

/// `sagaflow node`: flags override the file and the `SAGAFLOW_*` environment.
#[derive(Debug, Args)]
pub struct NodeArgs {
    /// Configuration file (TOML); without it, defaults and the environment apply.
    #[arg(long, value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// NATS server URL; repeat for a NATS cluster.
    #[arg(long, value_name = "URL")]
    pub nats: Vec<String>,
    /// Where the gRPC API listens.
    #[arg(long, value_name = "ADDR")]
    pub grpc_addr: Option<SocketAddr>,
    /// Where /metrics, /healthz and /readyz listen (default 127.0.0.1:9464).
    #[arg(long, value_name = "ADDR")]
    pub http_addr: Option<SocketAddr>,
    /// Run the demo participant services in this node: all of them, or the ones listed
    /// (`--demo-services payment,notification`) when your own participants serve the others.
    #[arg(long, value_name = "SERVICES", num_args = 0..=1, value_delimiter = ',', require_equals = false)]
    pub demo_services: Option<Vec<String>>,
    /// Folder of saga definitions.
    #[arg(long, value_name = "DIR")]
    pub saga_dir: Option<PathBuf>,
    /// This node's id in the cluster.
    #[arg(long, value_name = "ID")]
    pub node_id: Option<String>,
    /// Log format on stderr: `text`, or `json` (one object per line).
    #[arg(long, value_name = "FORMAT")]
    pub log_format: Option<LogFormat>,
    /// OpenTelemetry collector to export spans to over OTLP/gRPC (`http://host:4317`); also
    /// `otlp_endpoint` in the file, `SAGAFLOW_OTLP_ENDPOINT`, or the standard
    /// `OTEL_EXPORTER_OTLP_ENDPOINT`. Needs a build with `--features otel`.
    #[arg(long, value_name = "URL", value_parser = parse_otlp_endpoint)]
    pub otlp_endpoint: Option<String>,
    /// Require a token on every call but health checks: the tokens file (`[[token]]` entries
    /// of name, role and the secret's SHA-256; see docs/security.md). Also `auth.tokens`.
    #[arg(long, value_name = "FILE")]
    pub auth_tokens: Option<PathBuf>,
    /// Serve gRPC over TLS with this certificate chain (PEM); also `tls.cert`.
    #[arg(long, value_name = "FILE", requires = "tls_key")]
    pub tls_cert: Option<PathBuf>,
    /// The certificate's private key (PEM); also `tls.key`.
    #[arg(long, value_name = "FILE", requires = "tls_cert")]
    pub tls_key: Option<PathBuf>,
    /// Require client certificates signed by this CA (PEM): mutual TLS. Also `tls.client_ca`.
    #[arg(long, value_name = "FILE", requires = "tls_cert")]
    pub tls_client_ca: Option<PathBuf>,
    /// Listen on a non-loopback address without TLS and tokens (only behind something else
    /// that secures the port).
    #[arg(long)]
    pub insecure: bool,
}

/// Checks `--otlp-endpoint`.
fn parse_otlp_endpoint(s: &str) -> Result<String, String> {
    crate::telemetry::check_endpoint(s.trim()).map(|()| s.trim().to_string())
}

/// Log output format (defined with the logs, [`crate::telemetry`]).
pub use crate::telemetry::LogFormat;

pub use crate::client::{parse_server, shutdown_signal, JsonArg, Server};

/// The node to talk to: `host:port` or an `http://` URL.
#[derive(Debug, Clone, Args)]
pub struct ServerArg {
    /// Node address, `host:port` or `http://host:port`.
    #[arg(long, value_name = "ADDR", env = "SAGAFLOW_SERVER", default_value = DEFAULT_SERVER, value_parser = parse_server)]
    pub server: Server,
    /// Read the token for a node that requires one from this file (its first line); else the
    /// token is taken from SAGAFLOW_TOKEN.
    #[arg(long, value_name = "FILE")]
    pub token_file: Option<PathBuf>,
    /// With an https:// node: the CA certificate (PEM) that signed the node's certificate
    /// (default: the system's trusted roots).
    #[arg(long, value_name = "FILE")]
    pub ca: Option<PathBuf>,
    /// With a node that requires client certificates: this certificate (PEM)…
    #[arg(long, value_name = "FILE", requires = "key")]
    pub cert: Option<PathBuf>,
    /// …and its private key (PEM).
    #[arg(long, value_name = "FILE", requires = "cert")]
    pub key: Option<PathBuf>,
}

/// `sagaflow security ...`.
#[derive(Debug, Subcommand)]
pub enum SecurityCommand {
    /// Make a random secret and print it with the `[[token]]` entry (its SHA-256) to add to the
    /// node's tokens file; the secret itself is stored nowhere.
    GenToken {
        /// The identity recorded in journals and logs.
        #[arg(long, value_name = "NAME")]
        name: String,
        /// reader, client, operator or admin.
        #[arg(long, value_name = "ROLE", value_parser = ["reader", "client", "operator", "admin"])]
        role: String,
    },
    /// Write a nats-server authorization block with one nkey user for the nodes and one per
    /// participant service (only its own consumer, replies and bucket), and the users' seeds.
    NatsConfig {
        /// A participant service (repeat for each).
        #[arg(long = "service", value_name = "NAME", required = true)]
        services: Vec<String>,
        /// Folder to write `authorization.conf` and the `<user>.nk` seed files into.
        #[arg(long, value_name = "DIR")]
        out: PathBuf,
    },
}

/// `sagaflow order ...`.
#[derive(Debug, Subcommand)]
pub enum OrderCommand {
    /// Place an order (idempotent on the order id).
    Place {
        /// Node.
        #[command(flatten)]
        server: ServerArg,
        /// Client's order id (`[A-Za-z0-9_-]`, 1 to 100 characters).
        #[arg(long, value_name = "ID")]
        order_id: String,
        /// Customer name.
        #[arg(long, value_name = "NAME")]
        customer: String,
        /// Total in cents, a whole number ≥ 1 (19.99 → 1999).
        #[arg(long, value_name = "CENTS", allow_negative_numbers = true, value_parser = parse_amount)]
        amount: i64,
        /// An item, `SKU:QTY`; repeat for several.
        #[arg(long = "item", value_name = "SKU:QTY", required = true, value_parser = parse_item)]
        items: Vec<Item>,
    },
    /// Show an order: status, steps, compensations, history.
    Get {
        /// Node.
        #[command(flatten)]
        server: ServerArg,
        /// Order id.
        #[arg(value_name = "ID")]
        order_id: String,
        /// Output.
        #[command(flatten)]
        json: JsonArg,
    },
    /// List orders, newest first.
    List {
        /// Node.
        #[command(flatten)]
        server: ServerArg,
        /// Only orders in this status (`PENDING`, `SHIPPED`, `CANCELLED`…).
        #[arg(long, value_name = "S")]
        status: Option<String>,
        /// At most this many orders (0: all of them).
        #[arg(long, value_name = "N", default_value_t = 100)]
        limit: usize,
        /// Output.
        #[command(flatten)]
        json: JsonArg,
    },
    /// Print a line per change of an order until it is terminal.
    Watch {
        /// Node.
        #[command(flatten)]
        server: ServerArg,
        /// Order id.
        #[arg(value_name = "ID")]
        order_id: String,
    },
}

/// `sagaflow saga ...`.
#[derive(Debug, Subcommand)]
pub enum SagaCommand {
    /// Check saga definition files (or folders of `*.toml`) without a node.
    Validate {
        /// Files to check.
        #[arg(value_name = "FILE", required = true)]
        files: Vec<PathBuf>,
    },
    /// List the saga definitions a node has loaded.
    List {
        /// Node.
        #[command(flatten)]
        server: ServerArg,
        /// Output.
        #[command(flatten)]
        json: JsonArg,
    },
    /// Start a saga of any loaded definition (idempotent on `--saga-id`).
    Start {
        /// Node.
        #[command(flatten)]
        server: ServerArg,
        /// Definition name.
        #[arg(value_name = "NAME")]
        name: String,
        /// Input, a JSON object sent to every participant.
        #[arg(long, value_name = "JSON", value_parser = parse_input)]
        input: String,
        /// Saga id (generated by the node when absent).
        #[arg(long, value_name = "ID")]
        saga_id: Option<String>,
    },
    /// Show a saga: status, steps, compensations, history.
    Get {
        /// Node.
        #[command(flatten)]
        server: ServerArg,
        /// Saga id.
        #[arg(value_name = "ID")]
        saga_id: String,
        /// Output.
        #[command(flatten)]
        json: JsonArg,
    },
    /// List sagas that need an operator: parked NEEDS_ATTENTION, or stuck.
    Attention {
        /// Node (any node answers).
        #[command(flatten)]
        server: ServerArg,
        /// Only sagas of this definition.
        #[arg(long = "saga", value_name = "NAME")]
        saga_name: Option<String>,
        /// Output.
        #[command(flatten)]
        json: JsonArg,
    },
    /// Send the next attempt of the current step now, with a fresh retry budget (a step
    /// waiting to retry or hanging, or the compensation that parked the saga).
    Retry {
        /// Saga and operator.
        #[command(flatten)]
        target: Intervene,
        /// Only this step.
        #[arg(long, value_name = "STEP")]
        step: Option<String>,
    },
    /// Settle a step by hand as if its participant had answered: a forward step succeeds with
    /// `--result`; a compensation (or a parked pivot) counts as done.
    Skip {
        /// Saga and operator.
        #[command(flatten)]
        target: Intervene,
        /// The step.
        #[arg(long, value_name = "STEP")]
        step: String,
        /// The step's result, JSON.
        #[arg(long, value_name = "JSON", value_parser = parse_json)]
        result: Option<String>,
    },
    /// The pivot that parked the saga really succeeded (it timed out, but the work was done):
    /// record it as succeeded, with `--result`, and go forward to completion.
    Settle {
        /// Saga and operator.
        #[command(flatten)]
        target: Intervene,
        /// The pivot step.
        #[arg(long, value_name = "STEP")]
        step: String,
        /// The step's result, JSON.
        #[arg(long, value_name = "JSON", value_parser = parse_json)]
        result: Option<String>,
    },
    /// Deliver a signal to a saga's wait steps (`wait_for` in its definition): stored before
    /// this returns; repeating it with the same `--signal-id` delivers it once.
    Signal {
        /// Node.
        #[command(flatten)]
        server: ServerArg,
        /// Saga id.
        #[arg(value_name = "SAGA_ID")]
        saga_id: String,
        /// The signal's name (`delivery.confirmed`).
        #[arg(value_name = "NAME")]
        name: String,
        /// Its payload, JSON: later steps get it in their input under `signals.<NAME>`.
        #[arg(long, value_name = "JSON", value_parser = parse_json)]
        payload: Option<String>,
        /// Idempotency key (default: a fresh one).
        #[arg(long, value_name = "ID")]
        signal_id: Option<String>,
        /// Output.
        #[command(flatten)]
        json: JsonArg,
    },
    /// Show what applying definition files would change against the active versions (exit 0:
    /// nothing to do, 2: changes, 1: errors, as terraform plan).
    Plan {
        /// Node.
        #[command(flatten)]
        server: ServerArg,
        /// Definition files, or folders of `*.toml`.
        #[arg(value_name = "FILE_OR_DIR", required = true)]
        files: Vec<PathBuf>,
        /// Output.
        #[command(flatten)]
        json: JsonArg,
    },
    /// Apply definition files on every node at once: validated as one set (an invalid set
    /// changes nothing), stored as immutable versions, made active (new sagas start on them;
    /// running sagas finish on theirs).
    Apply {
        /// Node.
        #[command(flatten)]
        server: ServerArg,
        /// Definition files, or folders of `*.toml`.
        #[arg(value_name = "FILE_OR_DIR", required = true)]
        files: Vec<PathBuf>,
        /// Output.
        #[command(flatten)]
        json: JsonArg,
    },
    /// List a saga definition's versions: hash, who applied it and when, active, running sagas.
    Versions {
        /// Node.
        #[command(flatten)]
        server: ServerArg,
        /// Saga name.
        #[arg(value_name = "NAME")]
        name: String,
        /// Output.
        #[command(flatten)]
        json: JsonArg,
    },
    /// Print one version of a saga definition (default: the active one).
    #[command(disable_version_flag = true)]
    Show {
        /// Node.
        #[command(flatten)]
        server: ServerArg,
        /// Saga name.
        #[arg(value_name = "NAME")]
        name: String,
        /// The version (as `saga versions` lists it).
        #[arg(long, value_name = "VERSION")]
        version: Option<String>,
    },
    /// Make an older version of a saga definition active again.
    Rollback {
        /// Node.
        #[command(flatten)]
        server: ServerArg,
        /// Saga name.
        #[arg(value_name = "NAME")]
        name: String,
        /// The version to make active.
        #[arg(long = "to", value_name = "VERSION")]
        to: String,
        /// Output.
        #[command(flatten)]
        json: JsonArg,
    },
    /// Stop going forward and compensate (also: compensate through a parked pivot).
    Compensate {
        /// Saga and operator.
        #[command(flatten)]
        target: Intervene,
    },
    /// Cancel a running saga: it compensates what was done.
    Cancel {
        /// Saga and operator.
        #[command(flatten)]
        target: Intervene,
    },
    /// Give up on a parked saga: it ends FAILED as it stands.
    Abandon {
        /// Saga and operator.
        #[command(flatten)]
        target: Intervene,
    },
}

/// The saga an operator acts on, and who and why (journaled in the saga's history).
#[derive(Debug, Args)]
pub struct Intervene {
    /// Node.
    #[command(flatten)]
    pub server: ServerArg,
    /// Saga id.
    #[arg(value_name = "ID")]
    pub saga_id: String,
    /// Who acts (default: $USER).
    #[arg(long, value_name = "NAME", env = "USER", hide_env_values = true)]
    pub operator: String,
    /// Why.
    #[arg(long, value_name = "TEXT", default_value = "")]
    pub reason: String,
    /// Idempotency key: repeating a command with the same id applies it once.
    #[arg(long, value_name = "ID")]
    pub request_id: Option<String>,
    /// Output.
    #[command(flatten)]
    pub json: JsonArg,
}

fn parse_json(s: &str) -> Result<String, String> {
    serde_json::from_str::<serde_json::Value>(s)
        .map(|_| s.to_string())
        .map_err(|e| format!("not JSON: {e}"))
}

/// `sagaflow analytics ...`.
#[derive(Debug, Subcommand)]
pub enum AnalyticsCommand {
    /// Completed orders, revenue and units per SKU.
    Sales {
        /// Node.
        #[command(flatten)]
        server: ServerArg,
        /// Output.
        #[command(flatten)]
        json: JsonArg,
    },
}

/// `sagaflow cluster ...`.
#[derive(Debug, Subcommand)]
pub enum ClusterCommand {
    /// Nodes and their partitions, partition leases with their event backlog, consumer lag.
    Status {
        /// Node (any node answers).
        #[command(flatten)]
        server: ServerArg,
        /// Output.
        #[command(flatten)]
        json: JsonArg,
    },
}

/// `sagaflow dlq ...`.
#[derive(Debug, Subcommand)]
pub enum DlqCommand {
    /// List dead letters (all pages), oldest first.
    List {
        /// Node (any node answers).
        #[command(flatten)]
        server: ServerArg,
        /// Only dead letters from this source (`events`, `commands`, `analytics`…).
        #[arg(long, value_name = "S")]
        source: Option<String>,
        /// Also list the journal of replays and discards.
        #[arg(long)]
        journal: bool,
        /// Output.
        #[command(flatten)]
        json: JsonArg,
    },
    /// Show one dead letter: reason, origin, headers and payload (hex and a UTF-8 preview).
    Show {
        /// Node.
        #[command(flatten)]
        server: ServerArg,
        /// Dead letter sequence (from `dlq list`).
        #[arg(value_name = "SEQ")]
        seq: u64,
        /// Output.
        #[command(flatten)]
        json: JsonArg,
    },
    /// Publish a dead letter's original message again to its original subject, then remove
    /// it from the DLQ (journaled).
    Replay {
        /// Node.
        #[command(flatten)]
        server: ServerArg,
        /// Dead letter sequence.
        #[arg(value_name = "SEQ")]
        seq: u64,
        /// Who replays it (recorded in the journal).
        #[arg(long, value_name = "NAME")]
        operator: String,
    },
    /// Remove a dead letter from the DLQ for good (journaled with the reason).
    Discard {
        /// Node.
        #[command(flatten)]
        server: ServerArg,
        /// Dead letter sequence.
        #[arg(value_name = "SEQ")]
        seq: u64,
        /// Who discards it (recorded in the journal).
        #[arg(long, value_name = "NAME")]
        operator: String,
        /// Why (recorded in the journal).
        #[arg(long, value_name = "TEXT")]
        reason: String,
    },
}

/// One `--item SKU:QTY`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Item {
    /// Stock keeping unit.
    pub sku: String,
    /// Units, > 0.
    pub quantity: u32,
}

/// `--amount`: cents, a whole number ≥ 1; a decimal amount is refused with its value in cents.
fn parse_amount(s: &str) -> Result<i64, String> {
    const HINT: &str = "the amount is in cents, a whole number ≥ 1 (19.99 → 1999)";
    let s = s.trim();
    match s.parse::<i64>() {
        Ok(n) if n >= 1 => Ok(n),
        Ok(n) => Err(format!("{n} is not an amount: {HINT}")),
        Err(_) => match decimal_cents(s) {
            Some(cents) => Err(format!(
                "{s} is not in cents: {HINT}; here --amount {cents}"
            )),
            None => Err(format!("{s:?} is not a whole number: {HINT}")),
        },
    }
}

/// `19.99` → 1999, `5.5` → 550, `7.` → 700; `None` for anything else.
fn decimal_cents(s: &str) -> Option<i64> {
    let (whole, fraction) = s.split_once('.')?;
    let digits = |t: &str| t.bytes().all(|b| b.is_ascii_digit());
    if whole.is_empty() || !digits(whole) || !digits(fraction) || fraction.len() > 2 {
        return None;
    }
    let cents: i64 = format!("{fraction:0<2}").parse().ok()?;
    whole
        .parse::<i64>()
        .ok()?
        .checked_mul(100)?
        .checked_add(cents)
}

/// Parses `--item SKU:QTY`.
pub fn parse_item(s: &str) -> Result<Item, String> {
    let Some((sku, qty)) = s.rsplit_once(':') else {
        return Err(format!("--item {s:?}: expected SKU:QTY"));
    };
    let sku = sku.trim();
    if sku.is_empty() {
        return Err(format!("--item {s:?}: expected SKU:QTY, the SKU is empty"));
    }
    match qty.trim().parse::<u32>() {
        Ok(quantity) if quantity > 0 => Ok(Item {
            sku: sku.to_string(),
            quantity,
        }),
        _ => Err(format!(
            "--item {s:?}: expected SKU:QTY with QTY a whole number > 0"
        )),
    }
}

/// Checks `--input` is a JSON object.
fn parse_input(s: &str) -> Result<String, String> {
    match serde_json::from_str::<serde_json::Value>(s) {
        Ok(serde_json::Value::Object(_)) => Ok(s.to_string()),
        Ok(_) => Err("--input: expected a JSON object".to_string()),
        Err(e) => Err(format!("--input: invalid JSON: {e}")),
    }
}

/// What to run, with the node configuration already loaded (so its log format is known before
/// tracing starts).
#[derive(Debug)]
pub enum Plan {
    /// `sagaflow node`.
    Node(Box<NodeConfig>),
    /// `sagaflow dev`.
    Dev(DevOptions),
    /// `sagaflow saga validate`.
    Validate(Vec<PathBuf>),
    /// `sagaflow security nats-config`.
    NatsConfig {
        /// The services.
        services: Vec<String>,
        /// Where to write.
        out: PathBuf,
    },
    /// `sagaflow security gen-token`.
    GenToken {
        /// Its name.
        name: String,
        /// Its role.
        role: String,
    },
    /// `sagaflow saga plan|apply|versions|show|rollback`: the definitions client.
    Definitions(SagaCommand),
    /// A gRPC client command.
    Remote(Command),
}

impl Cli {
    /// Loads what the command needs before it runs (the node configuration).
    pub fn plan(self) -> anyhow::Result<Plan> {
        Ok(match self.command {
            Command::Node(args) => {
                let overrides = Overrides {
                    nats: args.nats,
                    grpc_addr: args.grpc_addr,
                    demo_services: args.demo_services.as_ref().map(|_| true),
                    demo_service_list: args.demo_services.clone().filter(|list| !list.is_empty()),
                    saga_dir: args.saga_dir,
                    node_id: args.node_id,
                    log_format: args.log_format.map(|f| f.as_str().to_string()),
                    auth_tokens: args.auth_tokens,
                    tls: crate::config::TlsConfig {
                        cert: args.tls_cert,
                        key: args.tls_key,
                        client_ca: args.tls_client_ca,
                    },
                    insecure: args.insecure,
                };
                let mut config = NodeConfig::load(args.config.as_deref(), &node_env(), &overrides)?
                    .with_http_addr(args.http_addr);
                if let Some(endpoint) = args.otlp_endpoint {
                    config.otlp_endpoint = Some(endpoint);
                }
                Plan::Node(Box::new(config))
            }
            Command::Dev(args) => Plan::Dev(DevOptions {
                grpc_addr: args.grpc_addr,
                nodes: usize::from(args.nodes),
                nats_cluster: args.nats_cluster,
                demo_orders: args.demo_orders,
                saga_dir: args.saga_dir,
                http_addr: args.http_addr,
                verbose: args.verbose,
                demo_services: if args.no_demo {
                    Vec::new()
                } else {
                    args.demo_services
                },
            }),
            Command::Saga(SagaCommand::Validate { files }) => Plan::Validate(files),
            Command::Saga(
                c @ (SagaCommand::Plan { .. }
                | SagaCommand::Apply { .. }
                | SagaCommand::Versions { .. }
                | SagaCommand::Show { .. }
                | SagaCommand::Rollback { .. }),
            ) => Plan::Definitions(c),
            Command::Security(SecurityCommand::GenToken { name, role }) => {
                Plan::GenToken { name, role }
            }
            Command::Security(SecurityCommand::NatsConfig { services, out }) => {
                Plan::NatsConfig { services, out }
            }
            Command::Bench { .. } => anyhow::bail!(
                "the bench is its own binary: `cargo build --release --workspace`, then \
                 `target/release/sagaflow-bench --help` (docs/benchmarks.md)"
            ),
            other => Plan::Remote(other),
        })
    }
}

impl Plan {
    /// The log format to initialise tracing with.
    pub fn log_format(&self) -> LogFormat {
        match self {
            Plan::Node(config) if config.log_format == "json" => LogFormat::Json,
            _ => LogFormat::Text,
        }
    }

    /// What to initialise tracing with: the log format and, for `node` and `dev`, the OTLP
    /// endpoint (the node's `otlp_endpoint`, else `OTEL_EXPORTER_OTLP_TRACES_ENDPOINT` or
    /// `OTEL_EXPORTER_OTLP_ENDPOINT`). Client commands export nothing.
    pub fn telemetry(&self) -> crate::telemetry::Settings {
        let standard = || {
            [
                "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT",
                "OTEL_EXPORTER_OTLP_ENDPOINT",
            ]
            .into_iter()
            .filter_map(|k| std::env::var(k).ok())
            .map(|v| v.trim().to_string())
            .find(|v| !v.is_empty())
        };
        let (otlp_endpoint, service_instance) = match self {
            Plan::Node(config) => (
                config.otlp_endpoint.clone().or_else(standard),
                Some(config.node_id.clone()),
            ),
            Plan::Dev(_) => (standard(), None),
            _ => (None, None),
        };
        crate::telemetry::Settings {
            log_format: self.log_format(),
            // `dev` prints its own summary: only warnings, unless `dev -v` or RUST_LOG says
            // otherwise.
            log_filter: match self {
                _ if std::env::var_os("RUST_LOG").is_some() => None,
                Plan::Dev(opts) if !opts.verbose => Some("warn".to_string()),
                _ => None,
            },
            otlp_endpoint,
            service_instance,
        }
    }

    /// Runs the command; `Ok` carries the exit code of a command that reported its own failures
    /// (`saga validate`).
    pub async fn run(self) -> anyhow::Result<ExitCode> {
        match self {
            Plan::Node(config) => {
                crate::node::run(*config, shutdown_signal()).await?;
                Ok(ExitCode::SUCCESS)
            }
            Plan::Dev(opts) => {
                crate::dev::run(opts, shutdown_signal()).await?;
                Ok(ExitCode::SUCCESS)
            }
            Plan::Validate(files) => Ok(validate::run(&files)),
            Plan::NatsConfig { services, out } => {
                emit(&write_nats_config(&services, &out)?)?;
                Ok(ExitCode::SUCCESS)
            }
            Plan::GenToken { name, role } => {
                emit(&gen_token(&name, &role)?)?;
                Ok(ExitCode::SUCCESS)
            }
            Plan::Definitions(command) => definitions::run(command).await,
            Plan::Remote(command) => remote::run(command).await.map(|()| ExitCode::SUCCESS),
        }
    }
}

/// `sagaflow security nats-config`: writes the block and the seeds (owner-only), and says
/// what to do with them.
fn write_nats_config(services: &[String], out: &std::path::Path) -> anyhow::Result<String> {
    use std::io::Write as _;
    use std::os::unix::fs::OpenOptionsExt as _;
    let a = security::nats_authorization(services)?;
    std::fs::create_dir_all(out)
        .map_err(|e| anyhow::anyhow!("cannot create {}: {e}", out.display()))?;
    let write = |name: &str, text: &str, mode: u32| -> anyhow::Result<std::path::PathBuf> {
        let path = out.join(name);
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(mode)
            .open(&path)
            .map_err(|e| anyhow::anyhow!("cannot write {}: {e}", path.display()))?;
        f.write_all(text.as_bytes())
            .map_err(|e| anyhow::anyhow!("cannot write {}: {e}", path.display()))?;
        Ok(path)
    };
    let conf = write("authorization.conf", &a.config, 0o644)?;
    let mut lines = vec![format!(
        "wrote {} (add `include ./authorization.conf` to nats-server.conf)",
        conf.display()
    )];
    for (user, seed) in &a.seeds {
        let path = write(&format!("{user}.nk"), &format!("{seed}\n"), 0o600)?;
        let how = if user == "node" {
            "nodes: nats_credentials.nkey_file".to_string()
        } else {
            format!(
                "service {}: nkey seed, inbox prefix {}",
                user.trim_start_matches("svc-"),
                security::inbox_prefix(user.trim_start_matches("svc-"))
            )
        };
        lines.push(format!("wrote {} ({how})", path.display()));
    }
    Ok(lines.join("\n") + "\n")
}

/// `sagaflow security gen-token`: a random secret (32 bytes from the OS-seeded generator, as
/// hex) and the `[[token]]` entry that admits it.
fn gen_token(name: &str, role: &str) -> anyhow::Result<String> {
    if !crate::auth::valid_name(name) {
        anyhow::bail!("--name: 1 to 100 of letters, digits, `-_.@`, got {name:?}");
    }
    let secret: String = rand::random::<[u8; 32]>()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    Ok(format!(
        "# The secret for `{name}`: give it to the caller (SAGAFLOW_TOKEN or --token-file); it is not stored anywhere.\n\
         {secret}\n\
         # Add to the node's tokens file (reloaded on change or SIGHUP):\n\
         [[token]]\nname = \"{name}\"\nrole = \"{role}\"\nsha256 = \"{}\"\n",
        crate::auth::sha256_hex(&secret)
    ))
}

/// The `SAGAFLOW_*` environment, for [`NodeConfig::load`]. `SAGAFLOW_SERVER` belongs to the
/// client commands and is left out; variables that are not Unicode are skipped.
fn node_env() -> BTreeMap<String, String> {
    std::env::vars_os()
        .filter_map(|(k, v)| Some((k.into_string().ok()?, v.into_string().ok()?)))
        .filter(|(k, _)| k.starts_with("SAGAFLOW_") && k != "SAGAFLOW_SERVER")
        .collect()
}

/// Initialises tracing (see [`crate::telemetry::init`]): logs to stderr (stdout is for command
/// output), `RUST_LOG` filter, default `info`, and the OTLP export when configured. Does
/// nothing if a subscriber is already set. Shut the guard down before exiting.
pub fn init_tracing(settings: &crate::telemetry::Settings) -> crate::telemetry::Guard {
    crate::telemetry::init(settings)
}

/// Writes `text` to stdout. A closed pipe (`sagaflow order list | head`) is not an error: the
/// reader has what it wanted.
fn emit(text: &str) -> anyhow::Result<()> {
    use std::io::Write;
    let mut out = std::io::stdout().lock();
    match out.write_all(text.as_bytes()).and_then(|()| out.flush()) {
        Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => Ok(()),
        other => Ok(other.map_err(|e| anyhow::anyhow!("cannot write to stdout: {e}"))?),
    }
}

/// Prints `error: ...` (with the cause chain on one line) to stderr; returns exit code 1.
pub fn report(error: &anyhow::Error) -> ExitCode {
    eprintln!("error: {error:#}");
    ExitCode::FAILURE
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;

    fn parse(args: &[&str]) -> Result<Cli, clap::Error> {
        Cli::try_parse_from(std::iter::once("sagaflow").chain(args.iter().copied()))
    }

    #[test]
    fn a_generated_token_is_admitted_by_its_entry_and_by_nothing_else() {
        let text = gen_token("ann", "operator").unwrap();
        let secret = text.lines().nth(1).unwrap().to_string();
        let entry: String = text.lines().skip(3).map(|l| format!("{l}\n")).collect();
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("tokens.toml");
        std::fs::write(&path, entry).unwrap();
        let tokens = crate::auth::Tokens::load(&path).unwrap();
        let who = tokens.identify(&secret).unwrap();
        assert_eq!(
            (who.name.as_str(), who.role),
            ("ann", crate::auth::Role::Operator)
        );
        assert!(tokens
            .identify(&gen_token("ann", "operator").unwrap())
            .is_none());
        assert_ne!(
            secret,
            gen_token("ann", "operator")
                .unwrap()
                .lines()
                .nth(1)
                .unwrap()
        );
        assert!(gen_token("a b", "reader").is_err());
    }

    #[test]
    fn cli_definition_is_consistent() {
        use clap::CommandFactory;
        Cli::command().debug_assert();
    }

    #[test]
    fn cli_server_addresses_are_normalised() {
        let url = |s: &str| parse_server(s).map(|s| s.url);
        assert_eq!(url("127.0.0.1:50051").unwrap(), "http://127.0.0.1:50051");
        assert_eq!(url("localhost:7000").unwrap(), "http://localhost:7000");
        assert_eq!(url("http://node-1:50051/").unwrap(), "http://node-1:50051");
        assert_eq!(url(" http://10.0.0.1:1 ").unwrap(), "http://10.0.0.1:1");
        assert_eq!(url("[::1]:50051").unwrap(), "http://[::1]:50051");
        assert_eq!(parse_server("http://x:1").unwrap().given, "http://x:1");
        assert!(url("").is_err());
        assert!(url("localhost").unwrap_err().contains("no port"));
        assert!(url("localhost:http").unwrap_err().contains("not a port"));
        assert!(url("localhost:70000").is_err());
        assert_eq!(url("https://x:1/").unwrap(), "https://x:1");
        assert!(url("grpc://x:1").is_err());
        assert!(url("http://x:1/path").is_err());
        assert!(url("::1:50051").is_err());
    }

    #[test]
    fn cli_items_are_parsed() {
        assert_eq!(
            parse_item("SKU-1:2").unwrap(),
            Item {
                sku: "SKU-1".into(),
                quantity: 2
            }
        );
        assert_eq!(
            parse_item(" SKU-1 : 3 ").unwrap(),
            Item {
                sku: "SKU-1".into(),
                quantity: 3
            }
        );
        assert_eq!(
            parse_item("X").unwrap_err(),
            "--item \"X\": expected SKU:QTY"
        );
        assert!(parse_item(":2").unwrap_err().contains("SKU is empty"));
        assert!(parse_item("X:0").unwrap_err().contains("> 0"));
        assert!(parse_item("X:-1").unwrap_err().contains("expected SKU:QTY"));
        assert!(parse_item("X:two")
            .unwrap_err()
            .contains("expected SKU:QTY"));
    }

    #[test]
    fn cli_parses_dev_with_defaults() {
        let Command::Dev(a) = parse(&["dev"]).unwrap().command else {
            panic!("not dev")
        };
        assert_eq!(a.grpc_addr, "127.0.0.1:50051".parse().unwrap());
        assert_eq!(a.demo_orders, 6);
        assert_eq!(a.nodes, 1);
        assert!(!a.nats_cluster);
        assert_eq!(a.saga_dir, PathBuf::from("sagas"));
        let Command::Dev(a) = parse(&[
            "dev",
            "--grpc-addr",
            "127.0.0.1:6000",
            "--demo-orders",
            "0",
            "--saga-dir",
            "x",
        ])
        .unwrap()
        .command
        else {
            panic!("not dev")
        };
        assert_eq!(a.grpc_addr.port(), 6000);
        assert_eq!(a.demo_orders, 0);
        assert_eq!(a.saga_dir, PathBuf::from("x"));
    }

    #[test]
    fn cli_parses_dev_cluster_flags() {
        let plan = parse(&["dev", "--nodes", "3", "--nats-cluster"])
            .unwrap()
            .plan()
            .unwrap();
        let Plan::Dev(opts) = plan else {
            panic!("not a dev plan")
        };
        assert_eq!(opts.nodes, 3);
        assert!(opts.nats_cluster);
        // `dev` prints its own summary: the nodes log warnings only, unless -v (or RUST_LOG).
        if std::env::var_os("RUST_LOG").is_none() {
            assert_eq!(
                Plan::Dev(opts).telemetry().log_filter.as_deref(),
                Some("warn")
            );
            let verbose = parse(&["dev", "-v"]).unwrap().plan().unwrap();
            assert_eq!(verbose.telemetry().log_filter, None);
        }
        assert!(parse(&["dev", "--nodes", "0"]).is_err());
        assert!(parse(&["dev", "--nodes", "17"]).is_err());
    }

    #[test]
    fn cli_parses_cluster_status() {
        let Command::Cluster(ClusterCommand::Status { server, json }) =
            parse(&["cluster", "status", "--server", "h:7", "--json"])
                .unwrap()
                .command
        else {
            panic!("not cluster status")
        };
        assert_eq!(server.server.url, "http://h:7");
        assert!(json.json);
        assert!(parse(&["cluster", "status", "--server", "h"]).is_err());
    }

    #[test]
    fn cli_parses_node() {
        let cli = parse(&[
            "node",
            "--config",
            "node.toml",
            "--nats",
            "nats://a:1",
            "--nats",
            "nats://b:2",
            "--grpc-addr",
            "127.0.0.1:7000",
            "--demo-services",
            "--saga-dir",
            "s",
            "--node-id",
            "n1",
            "--log-format",
            "json",
        ])
        .unwrap();
        let Command::Node(a) = cli.command else {
            panic!("not node")
        };
        assert_eq!(a.config, Some(PathBuf::from("node.toml")));
        assert_eq!(a.nats, vec!["nats://a:1", "nats://b:2"]);
        assert_eq!(a.grpc_addr.unwrap().port(), 7000);
        assert_eq!(a.demo_services, Some(vec![]), "all demo services");
        assert_eq!(a.saga_dir, Some(PathBuf::from("s")));
        assert_eq!(a.node_id.as_deref(), Some("n1"));
        assert_eq!(a.log_format, Some(LogFormat::Json));

        let Command::Node(a) = parse(&["node"]).unwrap().command else {
            panic!("not node")
        };
        assert!(
            a.config.is_none()
                && a.nats.is_empty()
                && a.demo_services.is_none()
                && a.log_format.is_none()
        );
        let Command::Node(a) = parse(&["node", "--demo-services", "payment,notification"])
            .unwrap()
            .command
        else {
            panic!("not node")
        };
        assert_eq!(
            a.demo_services,
            Some(vec!["payment".to_string(), "notification".to_string()])
        );
        assert!(parse(&["node", "--log-format", "xml"]).is_err());
        assert!(parse(&["node", "--grpc-addr", "nowhere"]).is_err());
    }

    #[test]
    fn cli_node_plan_applies_flags() {
        let cli = parse(&[
            "node",
            "--nats",
            "nats://x:1",
            "--node-id",
            "n-7",
            "--log-format",
            "json",
        ])
        .unwrap();
        let plan = cli.plan().unwrap();
        assert_eq!(plan.log_format(), LogFormat::Json);
        let Plan::Node(config) = plan else {
            panic!("not a node plan")
        };
        assert_eq!(config.nats, vec!["nats://x:1"]);
        assert_eq!(config.node_id, "n-7");
        let err = parse(&["node", "--node-id", "bad id"])
            .unwrap()
            .plan()
            .unwrap_err();
        assert!(err.to_string().contains("node_id"), "{err}");
    }

    #[test]
    fn cli_parses_order_place() {
        let cli = parse(&[
            "order",
            "place",
            "--server",
            "http://n:1",
            "--order-id",
            "o-1",
            "--customer",
            "alice",
            "--amount",
            "1200",
            "--item",
            "SKU-1:2",
            "--item",
            "SKU-2:1",
        ])
        .unwrap();
        let Command::Order(OrderCommand::Place {
            server,
            order_id,
            customer,
            amount,
            items,
        }) = cli.command
        else {
            panic!("not order place")
        };
        assert_eq!(server.server.url, "http://n:1");
        assert_eq!(
            (order_id.as_str(), customer.as_str(), amount),
            ("o-1", "alice", 1200)
        );
        assert_eq!(items.len(), 2);
        assert_eq!(
            items[1],
            Item {
                sku: "SKU-2".into(),
                quantity: 1
            }
        );

        let base = [
            "order",
            "place",
            "--order-id",
            "o",
            "--customer",
            "c",
            "--amount",
            "5",
        ];
        let err = parse(&[&base[..], &["--item", "X"]].concat()).unwrap_err();
        assert_eq!(err.kind(), clap::error::ErrorKind::ValueValidation);
        assert!(
            err.to_string().contains("--item \"X\": expected SKU:QTY"),
            "{err}"
        );
        assert!(parse(&base).is_err(), "at least one item");
        assert!(parse(&[
            "order",
            "place",
            "--order-id",
            "o",
            "--customer",
            "c",
            "--amount",
            "0",
            "--item",
            "A:1"
        ])
        .is_err());
        assert_eq!(err.exit_code(), 2);
        // Amounts: every mistake says the unit and the fix.
        for (amount, says) in [
            ("-5", "-5 is not an amount: the amount is in cents"),
            ("0", "0 is not an amount"),
            ("19.99", "19.99 is not in cents: the amount is in cents, a whole number ≥ 1 (19.99 → 1999); here --amount 1999"),
            ("5.5", "here --amount 550"),
            ("ten", "\"ten\" is not a whole number"),
        ] {
            let err = parse(&[&base[..], &["--item", "A:1"]].concat().iter().map(|a| if *a == "5" { amount } else { a }).collect::<Vec<_>>()).unwrap_err();
            assert!(err.to_string().contains(says), "{amount}: {err}");
        }
        assert!(matches!(
            parse(&[&base[..], &["--item", "A:1"]].concat())
                .unwrap()
                .command,
            Command::Order(OrderCommand::Place { amount: 5, .. })
        ));
    }

    #[test]
    fn cli_parses_order_get_list_watch() {
        let Command::Order(OrderCommand::Get {
            server,
            order_id,
            json,
        }) = parse(&["order", "get", "--server", "h:9", "o-1", "--json"])
            .unwrap()
            .command
        else {
            panic!("not order get")
        };
        assert_eq!(
            (server.server.url.as_str(), order_id.as_str(), json.json),
            ("http://h:9", "o-1", true)
        );

        let Command::Order(OrderCommand::List {
            status,
            limit,
            json,
            server,
        }) = parse(&["order", "list", "--status", "SHIPPED"])
            .unwrap()
            .command
        else {
            panic!("not order list")
        };
        assert_eq!(status.as_deref(), Some("SHIPPED"));
        assert_eq!(limit, 100, "the newest 100 unless asked");
        assert!(!json.json);
        // The default applies unless SAGAFLOW_SERVER is set in the test's environment.
        if std::env::var_os("SAGAFLOW_SERVER").is_none() {
            assert_eq!(server.server.url, "http://127.0.0.1:50051");
        }

        let Command::Order(OrderCommand::Watch { order_id, .. }) =
            parse(&["order", "watch", "--server", "h:9", "o-2"])
                .unwrap()
                .command
        else {
            panic!("not order watch")
        };
        assert_eq!(order_id, "o-2");
        assert!(
            parse(&["order", "get", "--server", "h"]).is_err(),
            "id and port required"
        );
    }

    #[test]
    fn cli_parses_saga_commands() {
        let Command::Saga(SagaCommand::Validate { files }) =
            parse(&["saga", "validate", "a.toml", "b.toml"])
                .unwrap()
                .command
        else {
            panic!("not saga validate")
        };
        assert_eq!(files.len(), 2);
        assert!(parse(&["saga", "validate"]).is_err());

        let Command::Saga(SagaCommand::List { json, .. }) =
            parse(&["saga", "list", "--json"]).unwrap().command
        else {
            panic!("not saga list")
        };
        assert!(json.json);

        let Command::Saga(SagaCommand::Start {
            name,
            input,
            saga_id,
            ..
        }) = parse(&[
            "saga",
            "start",
            "--server",
            "h:1",
            "order",
            "--input",
            r#"{"a":1}"#,
            "--saga-id",
            "s1",
        ])
        .unwrap()
        .command
        else {
            panic!("not saga start")
        };
        assert_eq!(
            (name.as_str(), input.as_str(), saga_id.as_deref()),
            ("order", r#"{"a":1}"#, Some("s1"))
        );
        let err = parse(&["saga", "start", "order", "--input", "[1]"]).unwrap_err();
        assert!(err.to_string().contains("expected a JSON object"), "{err}");
        assert!(parse(&["saga", "start", "order", "--input", "{"]).is_err());

        let Command::Saga(SagaCommand::Get { saga_id, json, .. }) =
            parse(&["saga", "get", "--server", "h:1", "s1"])
                .unwrap()
                .command
        else {
            panic!("not saga get")
        };
        assert_eq!((saga_id.as_str(), json.json), ("s1", false));
    }

    #[test]
    fn cli_parses_analytics_sales() {
        let Command::Analytics(AnalyticsCommand::Sales { server, json }) =
            parse(&["analytics", "sales", "--server", "http://a:2", "--json"])
                .unwrap()
                .command
        else {
            panic!("not analytics sales")
        };
        assert_eq!(server.server.url, "http://a:2");
        assert!(json.json);
    }

    #[test]
    fn cli_parses_dlq_commands() {
        let Command::Dlq(DlqCommand::List {
            server,
            source,
            journal,
            json,
        }) = parse(&[
            "dlq", "list", "--server", "h:1", "--source", "events", "--json",
        ])
        .unwrap()
        .command
        else {
            panic!("not dlq list")
        };
        assert_eq!(server.server.url, "http://h:1");
        assert_eq!(source.as_deref(), Some("events"));
        assert!(json.json && !journal);
        let Command::Dlq(DlqCommand::Show { seq, .. }) =
            parse(&["dlq", "show", "--server", "h:1", "7"])
                .unwrap()
                .command
        else {
            panic!("not dlq show")
        };
        assert_eq!(seq, 7);
        let Command::Dlq(DlqCommand::Replay { seq, operator, .. }) =
            parse(&["dlq", "replay", "3", "--operator", "ops"])
                .unwrap()
                .command
        else {
            panic!("not dlq replay")
        };
        assert_eq!((seq, operator.as_str()), (3, "ops"));
        let Command::Dlq(DlqCommand::Discard { reason, .. }) = parse(&[
            "dlq",
            "discard",
            "3",
            "--operator",
            "ops",
            "--reason",
            "junk",
        ])
        .unwrap()
        .command
        else {
            panic!("not dlq discard")
        };
        assert_eq!(reason, "junk");
        for bad in [
            &["dlq", "discard", "3", "--operator", "ops"][..],
            &["dlq", "replay", "3"],
            &["dlq", "show", "x"],
            &["dlq", "show"],
        ] {
            assert_eq!(parse(bad).unwrap_err().exit_code(), 2, "{bad:?}");
        }
    }

    #[test]
    fn cli_usage_errors_exit_2() {
        let err = parse(&["order", "frobnicate"]).unwrap_err();
        assert_eq!(err.exit_code(), 2);
        let err = parse(&["order", "get", "--server", "nope", "x"]).unwrap_err();
        assert_eq!(err.exit_code(), 2);
        assert!(err.to_string().contains("no port"), "{err}");
    }
}
