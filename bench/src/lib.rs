//! `sagaflow-bench`: how many order sagas per second a node completes, and how long each
//! takes, measured side by side with the bare JetStream pattern underneath.
//!
//! ```text
//! sagaflow-bench [--orders N | --duration D] [--concurrency C | --rate R | --sweep R1,R2,…]
//!                [--warmup N] [--mix [DECLINED,OUT_OF_STOCK]] [--baseline] [--plot FILE.svg]
//!                [--nats URL [--server ADDR]] [--node-env KEY=VALUE]… [--json]
//! ```
//!
//! By default the bench starts its own system ([`system`]): a JetStream `nats-server` (file
//! store, R1) on a free loopback port and one `sagaflow node` child process with the demo
//! services answering at once. `--nats URL` uses an existing NATS (the bench still starts the
//! node), `--nats URL --server ADDR` an existing cluster (then `--node-pid`/`--nats-pid` name
//! the processes to measure, if they run on this machine). Addresses must be loopback unless
//! `--allow-remote` is given.
//!
//! A run: warm-up orders (not measured), then the measured orders ([`load`]): a closed loop
//! (`--concurrency C` orders in flight, finds the maximum throughput) or an open loop (`--rate
//! R` orders per second on a fixed schedule, latency from the scheduled time, so queueing is
//! not hidden). `--sweep` runs the open loop at each rate for `--duration` (10 s by default)
//! and `--plot` draws throughput and latency against the offered load ([`plot`]). Each order is
//! placed with `PlaceOrder`; its end is seen on the status stream ([`orders`] says why that
//! way). `--baseline` runs the same load through the bare message pattern ([`baseline`]) on the
//! same NATS, after Sagaflow's run at each load, and reports Sagaflow's figures as ratios of it.
//! CPU seconds and peak memory of the node, nats-server and the bench itself come from
//! `/proc` ([`procstat`]).
//!
//! Everything is bounded: every call has a timeout, every order an order timeout, the whole
//! bench `--max-time`; child processes are killed and temporary folders removed on every exit
//! path (including Ctrl-C). The report is printed as text, or with `--json` as exactly one JSON
//! object on stdout ([`report::Report`]); progress goes to stderr. The exit code is 0 when every
//! order started and ended, 1 otherwise (the report is printed either way).

use std::net::IpAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use clap::Args;
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressState, ProgressStyle};
use sagaflow_proto::v1::order_service_client::OrderServiceClient;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use sagaflow::client::{JsonArg, Server};

pub mod baseline;
pub mod load;
pub mod orders;
pub mod plot;
pub mod procstat;
pub mod report;
pub mod system;

use load::{Amount, Load, Mix, Samples, Shape, Target, Tracker};
use orders::Current;
use report::{Environment, Point, Report, RunReport};
use system::{Setup, System, Traffic};

/// Default measured orders of a closed or open loop run.
pub const DEFAULT_ORDERS: u64 = 10_000;

/// Default length of each step of a sweep.
pub const DEFAULT_SWEEP_STEP: Duration = Duration::from_secs(10);

/// `sagaflow-bench`.
#[derive(Debug, Clone, Args)]
pub struct BenchArgs {
    /// Measured orders (after the warm-up) [default: 10000].
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u64).range(1..), conflicts_with_all = ["duration", "sweep"])]
    pub orders: Option<u64>,
    /// Measure for this long instead (`30s`, `2m`); with --sweep, the length of each step
    /// [sweep default: 10s].
    #[arg(long, value_name = "DURATION", value_parser = parse_duration)]
    pub duration: Option<Duration>,
    /// Closed loop: orders in flight at once.
    #[arg(long, value_name = "C", default_value_t = 256, value_parser = clap::value_parser!(u32).range(1..=100_000))]
    pub concurrency: u32,
    /// Open loop: orders placed per second, on a fixed schedule.
    #[arg(long, value_name = "R", value_parser = parse_rate, conflicts_with_all = ["concurrency", "sweep"])]
    pub rate: Option<f64>,
    /// Open-loop sweep: one measured step per rate, e.g. `100,500,1000,2000`.
    #[arg(long, value_name = "R1,R2,…", value_delimiter = ',', value_parser = parse_rate, conflicts_with = "concurrency")]
    pub sweep: Vec<f64>,
    /// Warm-up orders per system before measuring (not counted).
    #[arg(long, value_name = "N", default_value_t = 200)]
    pub warmup: u64,
    /// Mixed outcomes: the shares of declined orders (above the payment limit) and of
    /// out-of-stock orders; `--mix` alone is `0.1,0.1`. Without it every order ships.
    #[arg(long, value_name = "DECLINED,OUT_OF_STOCK", num_args = 0..=1, default_missing_value = "0.1,0.1", value_parser = parse_mix)]
    pub mix: Option<Mix>,
    /// Also run the same load through the bare JetStream pattern of the saga (4 × command,
    /// reply and KV compare-and-set) on the same NATS, and print Sagaflow's figures as ratios.
    #[arg(long)]
    pub baseline: bool,
    /// Draw throughput and latency against offered load into this SVG file.
    #[arg(long, value_name = "FILE.svg", value_parser = parse_plot)]
    pub plot: Option<PathBuf>,
    /// Serve the node the bench starts over TLS and require a token on every call (a CA and
    /// certificate made with `openssl`): measures what TLS and authentication cost.
    #[arg(long, conflicts_with = "server")]
    pub tls: bool,
    /// Start the node's list index before measuring (one `ListOrders` call): measures a node
    /// that serves lists, whose index follows every snapshot write.
    #[arg(long)]
    pub list_index: bool,
    /// Use this NATS server instead of starting one (`nats://127.0.0.1:4222`).
    #[arg(long, value_name = "URL")]
    pub nats: Option<String>,
    /// Use this node instead of starting one (`host:port`); needs --nats (the bench watches
    /// the orders' status events there).
    #[arg(long, value_name = "ADDR", requires = "nats", value_parser = sagaflow::client::parse_server)]
    pub server: Option<Server>,
    /// Allow --nats and --server addresses that are not loopback.
    #[arg(long)]
    pub allow_remote: bool,
    /// The `sagaflow` binary of the node the bench starts [default: `sagaflow` next to
    /// `sagaflow-bench`].
    #[arg(long, value_name = "FILE", conflicts_with = "server")]
    pub node_bin: Option<PathBuf>,
    /// Environment of the node the bench starts (`SAGAFLOW_DEMO__LATENCY_MS=5`,
    /// `RUST_LOG=warn`); repeat for several.
    #[arg(long = "node-env", value_name = "KEY=VALUE", value_parser = parse_env, conflicts_with = "server")]
    pub node_env: Vec<(String, String)>,
    /// With --server: the pid of that node, to report its CPU time and memory.
    #[arg(long, value_name = "PID", requires = "server")]
    pub node_pid: Option<u32>,
    /// With --nats: the pid of that nats-server, to report its CPU time and memory.
    #[arg(long, value_name = "PID", requires = "nats")]
    pub nats_pid: Option<u32>,
    /// gRPC connections the orders are spread over.
    #[arg(long, value_name = "N", default_value_t = 4, value_parser = clap::value_parser!(u32).range(1..=64))]
    pub connections: u32,
    /// An order not terminal this long after it was due counts as unfinished.
    #[arg(long, value_name = "DURATION", default_value = "60s", value_parser = parse_duration)]
    pub order_timeout: Duration,
    /// Length of the windows of each run's timeline (throughput, latency and memory over
    /// time, for long runs).
    #[arg(long, value_name = "DURATION", default_value = "10s", value_parser = parse_duration)]
    pub window: Duration,
    /// Bound on the whole bench; what was measured by then is reported, marked cut.
    #[arg(long, value_name = "DURATION", default_value = "30m", value_parser = parse_duration)]
    pub max_time: Duration,
    /// Output.
    #[command(flatten)]
    pub json: JsonArg,
}

fn parse_duration(s: &str) -> Result<Duration, String> {
    let d = sagaflow_actors::duration::parse(s)?;
    if d.is_zero() {
        return Err("must be longer than 0".to_string());
    }
    Ok(d)
}

fn parse_rate(s: &str) -> Result<f64, String> {
    match s.trim().parse::<f64>() {
        Ok(r) if r.is_finite() && r > 0.0 && r <= 1_000_000.0 => Ok(r),
        _ => Err(format!(
            "{s:?}: expected a rate in orders per second, > 0 and at most 1000000"
        )),
    }
}

fn parse_mix(s: &str) -> Result<Mix, String> {
    let bad =
        || format!("{s:?}: expected DECLINED,OUT_OF_STOCK, two shares from 0 to 1 (e.g. 0.1,0.1)");
    let (d, o) = s.split_once(',').ok_or_else(bad)?;
    let share = |x: &str| {
        x.trim()
            .parse::<f64>()
            .ok()
            .filter(|v| (0.0..=1.0).contains(v))
    };
    let (Some(declined), Some(out_of_stock)) = (share(d), share(o)) else {
        return Err(bad());
    };
    if declined + out_of_stock > 1.0 {
        return Err(format!("{s:?}: the two shares add up to more than 1"));
    }
    Ok(Mix {
        declined,
        out_of_stock,
    })
}

fn parse_plot(s: &str) -> Result<PathBuf, String> {
    let p = PathBuf::from(s);
    match p.extension().and_then(|e| e.to_str()) {
        Some(e) if e.eq_ignore_ascii_case("svg") => Ok(p),
        _ => Err(format!("{s:?}: the plot is drawn as SVG, name a .svg file")),
    }
}

fn parse_env(s: &str) -> Result<(String, String), String> {
    match s.split_once('=') {
        Some((k, v)) if !k.trim().is_empty() => Ok((k.trim().to_string(), v.to_string())),
        _ => Err(format!("{s:?}: expected KEY=VALUE")),
    }
}

/// Why the bench could not run.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A bad combination of options.
    #[error("{0}")]
    Usage(String),
    /// The system under test could not be set up.
    #[error(transparent)]
    System(#[from] system::Error),
    /// The baseline could not be set up.
    #[error(transparent)]
    Baseline(#[from] baseline::Error),
    /// NATS could not be reached.
    #[error("nats at {url}: {message}")]
    Nats {
        /// Its URL.
        url: String,
        /// Why.
        message: String,
    },
    /// The node could not be reached.
    #[error("node at {url}: {message}")]
    Grpc {
        /// Its URL.
        url: String,
        /// Why.
        message: String,
    },
    /// The plot could not be drawn.
    #[error(transparent)]
    Plot(#[from] plot::Error),
    /// Writing the report failed.
    #[error("cannot write the report: {0}")]
    Output(std::io::Error),
    /// Interrupted (SIGINT, SIGTERM).
    #[error("interrupted")]
    Interrupted,
}

/// Whether `url`'s host (`nats://h:p`, `http://h:p`, `h:p`) is a loopback address.
pub fn is_loopback(url: &str) -> bool {
    let rest = url.split_once("://").map_or(url, |(_, r)| r);
    let authority = rest.split('/').next().unwrap_or_default();
    let host_port = authority.rsplit_once('@').map_or(authority, |(_, h)| h);
    let host = if let Some(v6) = host_port.strip_prefix('[') {
        v6.split(']').next().unwrap_or_default()
    } else {
        host_port.rsplit_once(':').map_or(host_port, |(h, _)| h)
    };
    host.eq_ignore_ascii_case("localhost")
        || host.parse::<IpAddr>().is_ok_and(|ip| ip.is_loopback())
}

/// The measured load points, in order.
fn points(args: &BenchArgs) -> Vec<(Shape, Amount)> {
    if !args.sweep.is_empty() {
        let step = args.duration.unwrap_or(DEFAULT_SWEEP_STEP);
        return args
            .sweep
            .iter()
            .map(|r| (Shape::Open { rate: *r }, Amount::For(step)))
            .collect();
    }
    let amount = match (args.orders, args.duration) {
        (_, Some(d)) => Amount::For(d),
        (Some(n), None) => Amount::Orders(n),
        (None, None) => Amount::Orders(DEFAULT_ORDERS),
    };
    let shape = match args.rate {
        Some(rate) => Shape::Open { rate },
        None => Shape::Closed {
            concurrency: args.concurrency as usize,
        },
    };
    vec![(shape, amount)]
}

fn progress(label: String, len: Option<u64>) -> ProgressBar {
    let bar = match len {
        Some(n) => ProgressBar::with_draw_target(Some(n), ProgressDrawTarget::stderr()),
        None => ProgressBar::with_draw_target(None, ProgressDrawTarget::stderr()),
    };
    let template = if len.is_some() {
        "{prefix:>24} [{bar:30}] {pos}/{len} orders · {rate} · {elapsed}"
    } else {
        "{prefix:>24} {spinner} {pos} orders · {rate} · {elapsed}"
    };
    if let Ok(style) = ProgressStyle::with_template(template) {
        let style = style.progress_chars("=> ").with_key(
            "rate",
            |s: &ProgressState, w: &mut dyn std::fmt::Write| {
                let _ = write!(w, "{:.0}/s", s.per_sec());
            },
        );
        bar.set_style(style);
    }
    bar.set_prefix(label);
    bar.enable_steady_tick(Duration::from_millis(200));
    bar
}

fn expected(shape: Shape, amount: Amount) -> Option<u64> {
    match (shape, amount) {
        (_, Amount::Orders(n)) => Some(n),
        (Shape::Open { rate }, Amount::For(d)) => Some((d.as_secs_f64() * rate).ceil() as u64),
        (Shape::Closed { .. }, Amount::For(_)) => None,
    }
}

/// Runs the bench; prints the report; the exit code says whether the run was clean.
pub async fn run(args: BenchArgs) -> Result<ExitCode, Error> {
    for url in args.nats.iter().chain(args.server.as_ref().map(|s| &s.url)) {
        if !args.allow_remote && !is_loopback(url) {
            return Err(Error::Usage(format!(
                "{url} is not a loopback address; pass --allow-remote to bench a remote cluster"
            )));
        }
    }
    let deadline = Instant::now() + args.max_time;
    tokio::select! {
        r = bench(&args, deadline) => {
            let report = r?;
            finish(&args, &report)
        }
        _ = sagaflow::client::shutdown_signal() => Err(Error::Interrupted),
    }
}

/// Prints the report (and draws the plot).
fn finish(args: &BenchArgs, report: &Report) -> Result<ExitCode, Error> {
    if let Some(path) = &args.plot {
        let title = format!(
            "sagaflow-bench · {} × {} · nats-server {}",
            report.environment.cpus, report.environment.cpu, report.environment.nats_server_version
        );
        plot::draw(path, &title, &report.points)?;
        eprintln!("plot written to {}", path.display());
    }
    let text = if args.json.json {
        let mut s = serde_json::to_string(report).map_err(|e| Error::Output(e.into()))?;
        s.push('\n');
        s
    } else {
        report.text()
    };
    {
        use std::io::Write;
        let mut out = std::io::stdout().lock();
        match out.write_all(text.as_bytes()).and_then(|()| out.flush()) {
            Err(e) if e.kind() != std::io::ErrorKind::BrokenPipe => return Err(Error::Output(e)),
            _ => {}
        }
    }
    Ok(if report.clean {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}

/// Everything the measured runs share.
struct Bench {
    run_id: String,
    system: System,
    orders: Arc<dyn Target>,
    current: Current,
    baseline: Option<baseline::Baseline>,
    mix: Mix,
    order_timeout: Duration,
    deadline: Instant,
}

impl Bench {
    /// One run of `system` (`sagaflow` or `baseline`) named `tag`.
    async fn run(
        &mut self,
        which: &'static str,
        tag: &str,
        shape: Shape,
        amount: Amount,
        label: String,
    ) -> (Samples, Watches, Option<(Traffic, Traffic)>) {
        let tracker = Tracker::new(format!("bench-{}-{tag}", self.run_id));
        let (target, current): (Arc<dyn Target>, &Current) = match (which, &self.baseline) {
            ("baseline", Some(b)) => (Arc::new(b.target()), &b.current),
            _ => (self.orders.clone(), &self.current),
        };
        current.set(Some(tracker.clone()));
        let before = self.system.nats_traffic().await;
        let watches = Watches::start(&mut self.system);
        let bar = progress(label, expected(shape, amount));
        let samples = load::drive(
            target,
            tracker,
            Load {
                shape,
                amount,
                mix: self.mix,
                order_timeout: self.order_timeout,
                deadline: self.deadline,
            },
            bar.clone(),
        )
        .await;
        bar.finish_and_clear();
        current.set(None);
        let after = self.system.nats_traffic().await;
        (samples, watches, before.zip(after))
    }
}

/// CPU and memory watches of the node, nats-server and the bench over one run.
struct Watches {
    node: Option<procstat::Watch>,
    nats: Option<procstat::Watch>,
    client: procstat::Watch,
    machine: procstat::MachineWatch,
    /// The resident sets read every second during the run, for its timeline.
    rss: Arc<std::sync::Mutex<Vec<procstat::RssSample>>>,
    sampler: tokio::task::JoinHandle<()>,
}

/// How often the resident sets are read during a run.
const RSS_EVERY: Duration = Duration::from_secs(1);

impl Watches {
    fn start(system: &mut System) -> Self {
        let node_pid = system
            .node
            .as_mut()
            .and_then(system::NodeProcess::pid)
            .or(system.node_pid);
        let nats_pid = system
            .nats
            .as_ref()
            .and_then(sagaflow_devkit::nats_server::NatsServer::pid)
            .or(system.nats_pid);
        let rss = Arc::new(std::sync::Mutex::new(Vec::new()));
        let sampler = tokio::spawn({
            let rss = rss.clone();
            async move {
                let mut every = tokio::time::interval(RSS_EVERY);
                loop {
                    every.tick().await;
                    let read =
                        |pid: Option<u32>| pid.and_then(procstat::memory_kib).map(|(rss, _)| rss);
                    let sample = procstat::RssSample {
                        at: Instant::now(),
                        node_kib: read(node_pid),
                        nats_kib: read(nats_pid),
                    };
                    // Two /proc reads a second: a run of hours keeps a few MiB.
                    rss.lock().unwrap_or_else(|e| e.into_inner()).push(sample);
                }
            }
        });
        Watches {
            node: node_pid.map(procstat::Watch::start),
            nats: nats_pid.map(procstat::Watch::start),
            client: procstat::Watch::start(std::process::id()),
            machine: procstat::MachineWatch::start(),
            rss,
            sampler,
        }
    }

    /// Stops the sampler; the resident sets read during the run.
    fn rss(&self) -> Vec<procstat::RssSample> {
        self.sampler.abort();
        self.rss.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    fn apply(&self, r: &mut RunReport, with_node: bool) {
        let node = self.node.as_ref().and_then(procstat::Watch::finish);
        r.nats = self.nats.as_ref().and_then(procstat::Watch::finish);
        r.client = self.client.finish();
        // Every process watched counts as measured, the node too in the baseline's run (where
        // it idles and is not reported).
        let measured: f64 = [node, r.nats, r.client]
            .iter()
            .flatten()
            .map(|u| u.cores)
            .sum();
        r.machine = self.machine.finish(measured);
        if with_node {
            r.node = node;
        }
    }
}

impl Drop for Watches {
    fn drop(&mut self) {
        self.sampler.abort();
    }
}

async fn connect_nats(url: &str) -> Result<async_nats::Client, Error> {
    let options = async_nats::ConnectOptions::new()
        .name("sagaflow-bench")
        .connection_timeout(system::CONNECT_TIMEOUT)
        .request_timeout(Some(Duration::from_secs(10)))
        // The status subscription must not drop events when the bench is busy (see `orders`).
        .subscription_capacity(1 << 20);
    match tokio::time::timeout(system::CONNECT_TIMEOUT * 2, options.connect(url)).await {
        Ok(Ok(c)) => Ok(c),
        Ok(Err(e)) => Err(Error::Nats {
            url: url.to_string(),
            message: e.to_string(),
        }),
        Err(_) => Err(Error::Nats {
            url: url.to_string(),
            message: "no answer".to_string(),
        }),
    }
}

/// A progress line, on stderr in both modes (stdout holds only the report).
fn say(line: &str) {
    eprintln!("{line}");
}

async fn bench(args: &BenchArgs, deadline: Instant) -> Result<Report, Error> {
    let setup = Setup {
        nats: args.nats.clone(),
        server: args.server.as_ref().map(|s| s.url.clone()),
        node_bin: match &args.server {
            Some(_) => PathBuf::new(),
            None => system::node_binary(args.node_bin.as_deref())?,
        },
        node_env: args.node_env.clone(),
        node_pid: args.node_pid,
        nats_pid: args.nats_pid,
        tls: args.tls,
    };
    say(match (&setup.nats, &setup.server) {
        (None, _) => {
            "starting nats-server (JetStream, file store, R1) and a node with the demo services…"
        }
        (Some(_), None) => "starting a node with the demo services on the given NATS…",
        (Some(_), Some(_)) => "connecting to the given cluster…",
    });
    let system = System::start(&setup).await?;
    if args.list_index {
        system::start_list_index(&system.grpc_url, system.auth.as_ref())
            .await
            .map_err(|message| system::Error::Unreachable {
                addr: system.grpc_url.clone(),
                message,
            })?;
    }
    let client = connect_nats(&system.nats_url).await?;
    let nats_version = client.server_info().version.clone();
    let sub = client
        .subscribe(orders::STATUS_SUBJECTS)
        .await
        .map_err(|e| Error::Nats {
            url: system.nats_url.clone(),
            message: format!("cannot subscribe to {}: {e}", orders::STATUS_SUBJECTS),
        })?;
    // The subscription is registered with the server before any order is placed.
    client.flush().await.map_err(|e| Error::Nats {
        url: system.nats_url.clone(),
        message: e.to_string(),
    })?;
    let mut channels = Vec::with_capacity(args.connections as usize);
    for _ in 0..args.connections {
        channels.push(
            system::channel(&system.grpc_url, system.auth.as_ref())
                .await
                .map_err(|message| Error::Grpc {
                    url: system.grpc_url.clone(),
                    message,
                })?,
        );
    }
    let poll_client = OrderServiceClient::new(channels[0].clone());
    let current = Current::default();
    let cancel = CancellationToken::new();
    let mut observers = tokio::task::JoinSet::new();
    observers.spawn(orders::follow_status(sub, current.clone(), cancel.clone()));
    observers.spawn(orders::poll_stragglers(
        poll_client,
        current.clone(),
        cancel.clone(),
    ));
    let baseline = if args.baseline {
        let mut js = async_nats::jetstream::new(client.clone());
        js.set_timeout(Duration::from_secs(10));
        Some(baseline::Baseline::start(js).await?)
    } else {
        None
    };
    let cluster = if system.started() {
        "started"
    } else {
        "existing"
    };
    let mut bench = Bench {
        run_id: format!("{:08x}", rand::random::<u32>()),
        system,
        orders: Arc::new(orders::Orders::new(channels)),
        current,
        baseline,
        mix: args.mix.unwrap_or_default(),
        order_timeout: args.order_timeout,
        deadline,
    };
    let plan = points(args);
    let systems: &[&'static str] = if args.baseline {
        &["sagaflow", "baseline"]
    } else {
        &["sagaflow"]
    };

    if args.warmup > 0 {
        let (shape, _) = plan[0];
        for (k, which) in systems.iter().enumerate() {
            say(&format!("{which}: warm-up, {} orders", args.warmup));
            let (s, _, _) = bench
                .run(
                    which,
                    &format!("w{k}"),
                    shape,
                    Amount::Orders(args.warmup),
                    format!("{which} warm-up"),
                )
                .await;
            if s.start_errors > 0 || s.unfinished > 0 {
                tracing::warn!(
                    system = which,
                    start_errors = s.start_errors,
                    unfinished = s.unfinished,
                    first_error = s.first_error.as_deref().unwrap_or(""),
                    "warm-up orders failed"
                );
            }
        }
    }

    let mut points = Vec::with_capacity(plan.len());
    for (i, (shape, amount)) in plan.iter().enumerate() {
        if Instant::now() >= deadline {
            say("--max-time reached: the remaining steps are skipped");
            break;
        }
        let what = match shape {
            Shape::Closed { concurrency } => format!("closed loop, {concurrency} in flight"),
            Shape::Open { rate } => format!("open loop, {rate} orders/s"),
        };
        let mut runs = Vec::with_capacity(2);
        for which in systems {
            say(&format!("{which}: measuring, {what}"));
            let (samples, watches, traffic) = bench
                .run(
                    which,
                    &format!("{}{i}", &which[..1]),
                    *shape,
                    *amount,
                    format!("{which} {}", short(shape)),
                )
                .await;
            let mut r = RunReport::new(which, *shape, &samples);
            watches.apply(&mut r, *which == "sagaflow");
            r.timeline = report::timeline(&samples, args.window, &watches.rss());
            if let Some((before, after)) = traffic {
                r.set_traffic(before, after);
            }
            say(&format!(
                "{which}: {:.0} sagas/s, p50 {} ms, p99 {} ms",
                r.sagas_per_sec, r.p50_ms, r.p99_ms
            ));
            runs.push(r);
        }
        let mut runs = runs.into_iter();
        if let Some(s) = runs.next() {
            points.push(Point::new(s, runs.next()));
        }
    }

    cancel.cancel();
    while observers.join_next().await.is_some() {}
    if let Some(b) = bench.baseline.take() {
        b.stop().await;
    }
    // Close the connection before the server goes away (bounded: the server is local).
    let _ = tokio::time::timeout(Duration::from_secs(5), client.drain()).await;
    let node_env = args
        .node_env
        .iter()
        .map(|(k, v)| format!("{k}={v}"))
        .collect();
    bench.system.stop().await;
    let mode = match plan.first() {
        _ if !args.sweep.is_empty() => "sweep",
        Some((Shape::Open { .. }, _)) => "open",
        _ => "closed",
    };
    Ok(Report::new(
        mode,
        points,
        args.warmup,
        args.mix.unwrap_or_default(),
        Environment {
            tls: args.tls,
            ..Environment::read(nats_version, cluster, node_env)
        },
    ))
}

fn short(shape: &Shape) -> String {
    match shape {
        Shape::Closed { concurrency } => format!("C={concurrency}"),
        Shape::Open { rate } => format!("{rate}/s"),
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Debug, Parser)]
    struct Cli {
        #[command(flatten)]
        args: BenchArgs,
    }

    fn parse(args: &[&str]) -> Result<BenchArgs, clap::Error> {
        Cli::try_parse_from(std::iter::once("bench").chain(args.iter().copied())).map(|c| c.args)
    }

    #[test]
    fn bench_args_choose_the_load() {
        let a = parse(&[]).unwrap();
        assert_eq!(
            points(&a),
            vec![(
                Shape::Closed { concurrency: 256 },
                Amount::Orders(DEFAULT_ORDERS)
            )]
        );
        assert!(a.mix.is_none() && !a.baseline && !a.json.json);
        let a = parse(&["--rate", "500", "--duration", "20s", "--mix"]).unwrap();
        assert_eq!(
            points(&a),
            vec![(
                Shape::Open { rate: 500.0 },
                Amount::For(Duration::from_secs(20))
            )]
        );
        assert_eq!(
            a.mix,
            Some(Mix {
                declined: 0.1,
                out_of_stock: 0.1
            })
        );
        let a = parse(&["--sweep", "100,500", "--plot", "x.svg", "--mix", "0.2,0"]).unwrap();
        assert_eq!(
            points(&a),
            vec![
                (Shape::Open { rate: 100.0 }, Amount::For(DEFAULT_SWEEP_STEP)),
                (Shape::Open { rate: 500.0 }, Amount::For(DEFAULT_SWEEP_STEP)),
            ]
        );
        assert_eq!(a.mix.unwrap().declined, 0.2);
        let a = parse(&[
            "--orders",
            "40",
            "--concurrency",
            "8",
            "--json",
            "--baseline",
        ])
        .unwrap();
        assert_eq!(
            points(&a),
            vec![(Shape::Closed { concurrency: 8 }, Amount::Orders(40))]
        );
        assert!(a.json.json && a.baseline);
    }

    #[test]
    fn bench_args_refuse_bad_combinations() {
        for bad in [
            &["--rate", "10", "--concurrency", "5"][..],
            &["--orders", "10", "--duration", "5s"],
            &["--sweep", "10", "--orders", "5"],
            &["--sweep", "10", "--rate", "5"],
            &["--rate", "0"],
            &["--rate", "-3"],
            &["--mix", "0.7,0.7"],
            &["--mix", "half"],
            &["--plot", "x.png"],
            &["--server", "127.0.0.1:50051"],
            &["--duration", "0s"],
            &["--node-env", "NOEQUALS"],
            &["--orders", "0"],
        ] {
            assert!(parse(bad).is_err(), "{bad:?} accepted");
        }
        let a = parse(&[
            "--nats",
            "nats://127.0.0.1:4222",
            "--server",
            "127.0.0.1:50051",
            "--node-pid",
            "7",
        ])
        .unwrap();
        assert_eq!(a.server.unwrap().url, "http://127.0.0.1:50051");
        assert!(parse(&[
            "--nats",
            "nats://x:1",
            "--node-env",
            "A=b",
            "--server",
            "h:1"
        ])
        .is_err());
    }

    #[test]
    fn bench_addresses_must_be_loopback() {
        for ok in [
            "nats://127.0.0.1:4222",
            "nats://localhost:4222",
            "http://127.0.0.2:50051",
            "http://[::1]:50051",
            "nats://user:pw@127.0.0.1:4222",
            "127.0.0.1:4222",
        ] {
            assert!(is_loopback(ok), "{ok}");
        }
        for remote in [
            "nats://10.0.0.1:4222",
            "http://example.invalid:50051",
            "nats://[2001:db8::1]:4222",
            "http://0.0.0.0:1",
        ] {
            assert!(!is_loopback(remote), "{remote}");
        }
    }
}
