//! What a bench prints: one [`RunReport`] per measured run, the whole [`Report`] as JSON
//! (`--json`, exactly one object) or as text.

use std::collections::BTreeMap;
use std::fmt::Write as _;

use serde::Serialize;

use super::load::{quantile, Mix, Samples, Shape};
use super::procstat::{MachineUsage, RssSample, Usage};
use super::system::Traffic;

/// One measured run of one system.
#[derive(Debug, Clone, Serialize)]
pub struct RunReport {
    /// `sagaflow` or `baseline`.
    pub system: &'static str,
    /// `closed` or `open`.
    #[serde(rename = "loop")]
    pub shape: &'static str,
    /// Closed loop: sagas in flight.
    pub concurrency: Option<usize>,
    /// Open loop: sagas started per second (offered load).
    pub offered_per_sec: Option<f64>,
    /// Sagas the bench tried to start in the measured run (warm-up excluded).
    pub orders: u64,
    /// Sagas seen to reach a terminal status.
    pub completed: u64,
    /// Started but not seen to end within the order timeout (or the run's deadline).
    pub unfinished: u64,
    /// Refused or failed to start.
    pub start_errors: u64,
    /// The first start error, if any.
    pub first_error: Option<String>,
    /// Refused by the system because it was overloaded (`RESOURCE_EXHAUSTED`, admission
    /// control); not start errors, and not counted in `completed`.
    pub refused: u64,
    /// Terminal status → sagas.
    pub outcomes: BTreeMap<String, u64>,
    /// Sagas whose terminal status is not the one their kind leads to (a shipped order
    /// expected declined, …).
    pub unexpected_outcomes: u64,
    /// Sagas whose end was found by the straggler poll (latency an upper bound).
    pub detected_by_poll: u64,
    /// From the first saga due to the last one ended, seconds.
    pub elapsed_s: f64,
    /// Completed sagas per second over `elapsed_s`.
    pub sagas_per_sec: f64,
    /// End-to-end latency (start → terminal status), milliseconds.
    pub p50_ms: f64,
    /// 95th percentile.
    pub p95_ms: f64,
    /// 99th percentile.
    pub p99_ms: f64,
    /// Slowest.
    pub max_ms: f64,
    /// Mean.
    pub mean_ms: f64,
    /// Duration of the start call (`PlaceOrder`; the baseline's first publish), median, ms.
    pub start_p50_ms: f64,
    /// Its 99th percentile.
    pub start_p99_ms: f64,
    /// How late the bench sent the start call after it was due, 99th percentile, ms: the
    /// client's own scheduling delay (counted in the open loop's latency; near 0 when the
    /// bench keeps up with its schedule).
    pub send_lag_p99_ms: f64,
    /// The node process during the run (when known).
    pub node: Option<Usage>,
    /// The nats-server process during the run (when known).
    pub nats: Option<Usage>,
    /// The bench itself (driver, gRPC client, status subscription; for the baseline also its
    /// participant and orchestrator).
    pub client: Option<Usage>,
    /// The whole machine's CPUs during the run (Linux): how busy, how much of it the
    /// processes above do not account for, and whether it was saturated.
    pub machine: Option<MachineUsage>,
    /// Messages the NATS server received per completed saga (publishes, acks, pull
    /// requests, API calls of every client, the bench's included), when the bench started it.
    pub nats_in_msgs_per_saga: Option<f64>,
    /// Messages the NATS server sent per completed saga (deliveries, publish acks, replies).
    pub nats_out_msgs_per_saga: Option<f64>,
    /// Bytes through the NATS server (in + out) per completed saga.
    pub nats_bytes_per_saga: Option<f64>,
    /// The run ended by the bench's overall deadline (`--max-time`).
    pub cut_by_deadline: bool,
    /// The run in windows of `--window` (10 s), from the first saga due: what ended in each
    /// and the resident sets at its end. A run that keeps up shows flat throughput, latency
    /// and memory here; a leak or a growing lag shows as a trend.
    pub timeline: Vec<Window>,
}

/// One window of a run's timeline.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Window {
    /// End of the window, seconds from the first saga due. The last window may be shorter, or
    /// longer by less than a quarter window: a shorter tail (the run's drain, the sagas still in
    /// flight at its end) is folded into it rather than reported as a burst of its own.
    pub t_s: f64,
    /// Sagas that ended in the window.
    pub completed: u64,
    /// `completed` per second of the window.
    pub sagas_per_sec: f64,
    /// Median latency of the sagas that ended in the window, ms.
    pub p50_ms: f64,
    /// Their 99th percentile, ms.
    pub p99_ms: f64,
    /// The node's resident set at the end of the window (the last reading in it), MiB.
    pub node_rss_mib: Option<f64>,
    /// nats-server's, MiB.
    pub nats_rss_mib: Option<f64>,
}

/// The timeline of `samples` in windows of `window`, with the resident sets read during the
/// run (`rss`, in time order). Empty when nothing ended.
pub fn timeline(samples: &Samples, window: std::time::Duration, rss: &[RssSample]) -> Vec<Window> {
    let (Some(start), Some(end)) = (samples.first_due, samples.last_done) else {
        return Vec::new();
    };
    let window = window.max(std::time::Duration::from_millis(100));
    let total = end.saturating_duration_since(start);
    let full = (total.as_secs_f64() / window.as_secs_f64()).floor() as usize;
    let tail = total.saturating_sub(window * full as u32);
    let count = if full >= 1 && tail < window / 4 {
        full
    } else {
        full + 1
    };
    let mut latencies: Vec<Vec<u64>> = vec![Vec::new(); count];
    for (at, lat) in &samples.ends {
        let k = (at.saturating_duration_since(start).as_secs_f64() / window.as_secs_f64()).floor()
            as usize;
        latencies[k.min(count - 1)].push(*lat);
    }
    let mib = |kib: Option<u64>| kib.map(|k| round(k as f64 / 1024.0, 1));
    latencies
        .into_iter()
        .enumerate()
        .map(|(k, mut lat)| {
            lat.sort_unstable();
            let from = window * k as u32;
            let to = if k + 1 == count {
                total
            } else {
                window * (k as u32 + 1)
            };
            let secs = to.saturating_sub(from).as_secs_f64();
            let last = rss.iter().take_while(|r| r.at <= start + to).last();
            Window {
                t_s: round(to.as_secs_f64(), 1),
                completed: lat.len() as u64,
                sagas_per_sec: if secs > 0.0 {
                    round(lat.len() as f64 / secs, 1)
                } else {
                    0.0
                },
                p50_ms: ms(quantile(&lat, 0.50)),
                p99_ms: ms(quantile(&lat, 0.99)),
                node_rss_mib: last.and_then(|r| mib(r.node_kib)),
                nats_rss_mib: last.and_then(|r| mib(r.nats_kib)),
            }
        })
        .collect()
}

fn ms(us: u64) -> f64 {
    (us as f64 / 10.0).round() / 100.0
}

fn round(x: f64, digits: i32) -> f64 {
    let f = 10f64.powi(digits);
    (x * f).round() / f
}

impl RunReport {
    /// The report of `samples` of `system` under `shape`.
    pub fn new(system: &'static str, shape: Shape, samples: &Samples) -> Self {
        let lat = &samples.latencies_us;
        let elapsed = samples.elapsed().as_secs_f64();
        let completed = samples.completed();
        let mean = if lat.is_empty() {
            0.0
        } else {
            lat.iter().map(|v| *v as f64).sum::<f64>() / lat.len() as f64 / 1000.0
        };
        let (shape_name, concurrency, offered) = match shape {
            Shape::Closed { concurrency } => ("closed", Some(concurrency), None),
            Shape::Open { rate } => ("open", None, Some(rate)),
        };
        RunReport {
            system,
            shape: shape_name,
            concurrency,
            offered_per_sec: offered,
            orders: samples.attempted,
            completed,
            unfinished: samples.unfinished,
            start_errors: samples.start_errors,
            first_error: samples.first_error.clone(),
            refused: samples.refused,
            outcomes: samples.outcomes.clone(),
            unexpected_outcomes: samples.unexpected,
            detected_by_poll: samples.by_poll,
            elapsed_s: round(elapsed, 3),
            sagas_per_sec: if elapsed > 0.0 {
                round(completed as f64 / elapsed, 1)
            } else {
                0.0
            },
            p50_ms: ms(quantile(lat, 0.50)),
            p95_ms: ms(quantile(lat, 0.95)),
            p99_ms: ms(quantile(lat, 0.99)),
            max_ms: ms(lat.last().copied().unwrap_or_default()),
            mean_ms: round(mean, 2),
            start_p50_ms: ms(quantile(&samples.start_us, 0.50)),
            start_p99_ms: ms(quantile(&samples.start_us, 0.99)),
            send_lag_p99_ms: ms(quantile(&samples.lag_us, 0.99)),
            node: None,
            nats: None,
            client: None,
            machine: None,
            nats_in_msgs_per_saga: None,
            nats_out_msgs_per_saga: None,
            nats_bytes_per_saga: None,
            cut_by_deadline: samples.cut,
            timeline: Vec::new(),
        }
    }

    /// Records the NATS traffic of the run (`before` and `after` it) per completed saga.
    pub fn set_traffic(&mut self, before: Traffic, after: Traffic) {
        if self.completed == 0 {
            return;
        }
        let per =
            |a: u64, b: u64| Some(round(a.saturating_sub(b) as f64 / self.completed as f64, 1));
        self.nats_in_msgs_per_saga = per(after.in_msgs, before.in_msgs);
        self.nats_out_msgs_per_saga = per(after.out_msgs, before.out_msgs);
        self.nats_bytes_per_saga = per(
            after.in_bytes + after.out_bytes,
            before.in_bytes + before.out_bytes,
        );
    }

    /// Every started saga ended, none failed to start.
    pub fn clean(&self) -> bool {
        self.unfinished == 0 && self.start_errors == 0 && !self.cut_by_deadline
    }
}

/// Sagaflow against the baseline: each Sagaflow figure divided by the baseline's.
#[derive(Debug, Clone, Copy, Serialize)]
pub struct Ratios {
    /// Throughput: Sagaflow / baseline (1.0: as fast as the bare pattern).
    pub throughput: f64,
    /// Median latency: Sagaflow / baseline (1.0: no added latency).
    pub p50: f64,
    /// 99th percentile latency: Sagaflow / baseline.
    pub p99: f64,
}

impl Ratios {
    /// Ratios of `s` to `b` (0 where the baseline figure is 0).
    pub fn of(s: &RunReport, b: &RunReport) -> Self {
        let r = |x: f64, y: f64| if y > 0.0 { round(x / y, 3) } else { 0.0 };
        Ratios {
            throughput: r(s.sagas_per_sec, b.sagas_per_sec),
            p50: r(s.p50_ms, b.p50_ms),
            p99: r(s.p99_ms, b.p99_ms),
        }
    }
}

/// One load level: Sagaflow's run and, with `--baseline`, the baseline's under the same load.
#[derive(Debug, Clone, Serialize)]
pub struct Point {
    /// Sagaflow.
    pub sagaflow: RunReport,
    /// The bare pattern.
    pub baseline: Option<RunReport>,
    /// Sagaflow / baseline.
    pub ratios: Option<Ratios>,
}

impl Point {
    /// A point, with ratios when there is a baseline.
    pub fn new(sagaflow: RunReport, baseline: Option<RunReport>) -> Self {
        let ratios = baseline.as_ref().map(|b| Ratios::of(&sagaflow, b));
        Point {
            sagaflow,
            baseline,
            ratios,
        }
    }
}

/// Where and with what the bench ran.
#[derive(Debug, Clone, Serialize)]
pub struct Environment {
    /// `sagaflow` version.
    pub sagaflow_version: &'static str,
    /// The NATS server's version, as it reports it.
    pub nats_server_version: String,
    /// `started` (the bench ran NATS and the node) or `existing`.
    pub cluster: &'static str,
    /// CPU model (`/proc/cpuinfo`).
    pub cpu: String,
    /// CPUs available to the bench.
    pub cpus: usize,
    /// Memory, GiB (`/proc/meminfo`).
    pub memory_gib: f64,
    /// Kernel release.
    pub kernel: String,
    /// Environment given to the node the bench started (`--node-env`).
    pub node_env: Vec<String>,
    /// Whether the bench called the node over TLS with a token (`--tls`).
    pub tls: bool,
}

impl Environment {
    /// Reads the machine's facts.
    pub fn read(nats_server_version: String, cluster: &'static str, node_env: Vec<String>) -> Self {
        let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
        let cpu = cpuinfo
            .lines()
            .find_map(|l| l.strip_prefix("model name"))
            .and_then(|l| l.split_once(':'))
            .map(|(_, v)| v.trim().to_string())
            .unwrap_or_else(|| "unknown".to_string());
        let meminfo = std::fs::read_to_string("/proc/meminfo").unwrap_or_default();
        let memory_kib = meminfo
            .lines()
            .find_map(|l| l.strip_prefix("MemTotal:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<f64>().ok())
            .unwrap_or(0.0);
        Environment {
            sagaflow_version: env!("CARGO_PKG_VERSION"),
            nats_server_version,
            cluster,
            cpu,
            cpus: std::thread::available_parallelism().map_or(1, |n| n.get()),
            memory_gib: round(memory_kib / 1024.0 / 1024.0, 1),
            kernel: std::fs::read_to_string("/proc/sys/kernel/osrelease")
                .map(|s| s.trim().to_string())
                .unwrap_or_default(),
            node_env,
            tls: false,
        }
    }
}

/// Share of the offered rate a sweep step must complete per second to count as kept up.
pub const KEPT_UP: f64 = 0.95;

/// The whole bench: `--json` prints it as one object.
///
/// The top level carries the headline figures: those of the measured run, or for a sweep
/// those of the highest offered rate Sagaflow kept up with (completed at least [`KEPT_UP`] of
/// it per second, every order ended), else of the step with the highest throughput; `orders`
/// is then the total over all steps. `points` has every run.
#[derive(Debug, Clone, Serialize)]
pub struct Report {
    /// `closed`, `open` or `sweep`.
    pub mode: &'static str,
    /// Orders measured (all points of a sweep).
    pub orders: u64,
    /// Sagaflow's completed sagas per second (at the headline point of a sweep).
    pub sagas_per_sec: f64,
    /// The offered rate of the headline point (open loop and sweep).
    pub offered_per_sec: Option<f64>,
    /// The highest throughput of any point.
    pub peak_sagas_per_sec: f64,
    /// Sagaflow's median latency, ms (at that point).
    pub p50_ms: f64,
    /// Sagaflow's 95th percentile latency, ms.
    pub p95_ms: f64,
    /// Sagaflow's 99th percentile latency, ms.
    pub p99_ms: f64,
    /// Sagaflow's slowest saga, ms.
    pub max_ms: f64,
    /// The baseline's throughput under the same load (with `--baseline`).
    pub baseline_sagas_per_sec: Option<f64>,
    /// The baseline's median latency, ms.
    pub baseline_p50_ms: Option<f64>,
    /// The baseline's 99th percentile latency, ms.
    pub baseline_p99_ms: Option<f64>,
    /// Sagaflow / baseline.
    pub ratios: Option<Ratios>,
    /// Warm-up orders (per system) before the measured runs.
    pub warmup: u64,
    /// Shares of declined and out-of-stock orders.
    pub mix: Mix,
    /// Every started order ended, none failed to start, no deadline cut.
    pub clean: bool,
    /// Every measured run.
    pub points: Vec<Point>,
    /// Machine and versions.
    pub environment: Environment,
}

impl Report {
    /// The report of `points` (at least one).
    pub fn new(
        mode: &'static str,
        points: Vec<Point>,
        warmup: u64,
        mix: Mix,
        environment: Environment,
    ) -> Self {
        let fastest = points.iter().max_by(|a, b| {
            a.sagaflow
                .sagas_per_sec
                .total_cmp(&b.sagaflow.sagas_per_sec)
        });
        let kept_up = |p: &&Point| {
            p.sagaflow.clean()
                && p.sagaflow
                    .offered_per_sec
                    .is_some_and(|o| p.sagaflow.sagas_per_sec >= KEPT_UP * o)
        };
        let highest_kept_up = points.iter().filter(kept_up).max_by(|a, b| {
            let o = |p: &Point| p.sagaflow.offered_per_sec.unwrap_or_default();
            o(a).total_cmp(&o(b))
        });
        let best = if points.len() > 1 {
            highest_kept_up.or(fastest)
        } else {
            fastest
        }
        .cloned();
        let orders = points.iter().map(|p| p.sagaflow.orders).sum();
        let clean = points
            .iter()
            .all(|p| p.sagaflow.clean() && p.baseline.as_ref().is_none_or(RunReport::clean));
        let pick = |f: fn(&RunReport) -> f64| best.as_ref().map_or(0.0, |p| f(&p.sagaflow));
        let base =
            |f: fn(&RunReport) -> f64| best.as_ref().and_then(|p| p.baseline.as_ref()).map(f);
        Report {
            mode,
            orders,
            sagas_per_sec: pick(|r| r.sagas_per_sec),
            offered_per_sec: best.as_ref().and_then(|p| p.sagaflow.offered_per_sec),
            peak_sagas_per_sec: fastest.map_or(0.0, |p| p.sagaflow.sagas_per_sec),
            p50_ms: pick(|r| r.p50_ms),
            p95_ms: pick(|r| r.p95_ms),
            p99_ms: pick(|r| r.p99_ms),
            max_ms: pick(|r| r.max_ms),
            baseline_sagas_per_sec: base(|r| r.sagas_per_sec),
            baseline_p50_ms: base(|r| r.p50_ms),
            baseline_p99_ms: base(|r| r.p99_ms),
            ratios: best.as_ref().and_then(|p| p.ratios),
            warmup,
            mix,
            clean,
            points,
            environment,
        }
    }

    /// The report as text, for people.
    pub fn text(&self) -> String {
        let mut out = String::new();
        let e = &self.environment;
        let _ = writeln!(
            out,
            "sagaflow-bench: sagaflow {} · nats-server {} ({}) · {} × {} · {} GiB{}",
            e.sagaflow_version,
            e.nats_server_version,
            e.cluster,
            e.cpus,
            e.cpu,
            e.memory_gib,
            if e.tls {
                " · gRPC over TLS with a token"
            } else {
                ""
            }
        );
        let mix = if self.mix.declined + self.mix.out_of_stock > 0.0 {
            format!(
                "{:.0}% declined, {:.0}% out of stock",
                self.mix.declined * 100.0,
                self.mix.out_of_stock * 100.0
            )
        } else {
            "every order ships".to_string()
        };
        let _ = writeln!(out, "orders: {mix}; warm-up {} per system", self.warmup);
        for p in &self.points {
            out.push('\n');
            run_text(&mut out, &p.sagaflow);
            if let Some(b) = &p.baseline {
                run_text(&mut out, b);
            }
            if let Some(r) = &p.ratios {
                let _ = writeln!(
                    out,
                    "  sagaflow / baseline: throughput {:.2}×, p50 {:.2}×, p99 {:.2}×",
                    r.throughput, r.p50, r.p99
                );
            }
        }
        if self.points.len() > 1 {
            out.push('\n');
            match self.offered_per_sec {
                Some(o) => {
                    let _ = writeln!(
                        out,
                        "highest rate kept up with: {o}/s offered, {:.0} sagas/s completed, p50 {} ms, p99 {} ms",
                        self.sagas_per_sec, self.p50_ms, self.p99_ms
                    );
                }
                None => {
                    let _ = writeln!(
                        out,
                        "best: {:.0} sagas/s (p50 {} ms, p99 {} ms)",
                        self.sagas_per_sec, self.p50_ms, self.p99_ms
                    );
                }
            }
            let _ = writeln!(
                out,
                "peak throughput: {:.0} sagas/s",
                self.peak_sagas_per_sec
            );
        }
        if !self.clean {
            out.push('\n');
            out.push_str("NOT CLEAN: some orders failed to start or did not end (see above)\n");
        }
        out
    }
}

fn usage_text(u: &Usage) -> String {
    format!(
        "cpu {:.2} s ({:.2} cores), peak rss {:.1} MiB{}",
        u.cpu_s,
        u.cores,
        u.peak_rss_mib,
        if u.peak_is_lifetime {
            " (lifetime)"
        } else {
            ""
        }
    )
}

fn run_text(out: &mut String, r: &RunReport) {
    let load = match (r.concurrency, r.offered_per_sec) {
        (Some(c), _) => format!("closed loop, {c} in flight"),
        (_, Some(rate)) => format!("open loop, {rate} /s offered"),
        _ => String::new(),
    };
    let title = if r.system == "baseline" {
        "baseline (bare JetStream: 4 × command + reply + KV CAS)"
    } else {
        "sagaflow (order saga: PlaceOrder → terminal status)"
    };
    let _ = writeln!(out, "{title}, {load}");
    let outcomes: Vec<String> = r.outcomes.iter().map(|(k, v)| format!("{k} {v}")).collect();
    let _ = writeln!(
        out,
        "  orders      {} placed, {} ended ({}), {} unfinished, {} refused (overloaded), {} start errors{}",
        r.orders,
        r.completed,
        outcomes.join(", "),
        r.unfinished,
        r.refused,
        r.start_errors,
        r.first_error
            .as_deref()
            .map(|e| format!(" (first: {e})"))
            .unwrap_or_default()
    );
    if r.unexpected_outcomes > 0 || r.detected_by_poll > 0 {
        let _ = writeln!(
            out,
            "  note        {} unexpected outcomes, {} ends found by polling",
            r.unexpected_outcomes, r.detected_by_poll
        );
    }
    let _ = writeln!(
        out,
        "  throughput  {:.1} sagas/s over {:.2} s",
        r.sagas_per_sec, r.elapsed_s
    );
    let _ = writeln!(
        out,
        "  latency     p50 {} ms · p95 {} ms · p99 {} ms · max {} ms · mean {} ms",
        r.p50_ms, r.p95_ms, r.p99_ms, r.max_ms, r.mean_ms
    );
    let _ = writeln!(
        out,
        "  start call  p50 {} ms · p99 {} ms (sent late by up to {} ms, p99)",
        r.start_p50_ms, r.start_p99_ms, r.send_lag_p99_ms
    );
    for (name, u) in [
        ("node", &r.node),
        ("nats-server", &r.nats),
        ("bench", &r.client),
    ] {
        if let Some(u) = u {
            let per_saga = if r.completed > 0 {
                format!(
                    ", {:.2} ms cpu per saga",
                    u.cpu_s * 1000.0 / r.completed as f64
                )
            } else {
                String::new()
            };
            let _ = writeln!(out, "  {name:<11} {}{per_saga}", usage_text(u));
        }
    }
    if let Some(m) = &r.machine {
        let _ = writeln!(
            out,
            "  machine     {} cpus {:.0} % busy ({:.2} cores, {:.2} of them not the processes above), {:.1} % stolen by the hypervisor",
            m.cpus,
            m.busy * 100.0,
            m.busy_cores,
            m.other_cores,
            m.steal * 100.0
        );
        if m.saturated {
            let _ = writeln!(
                out,
                "  note        the CPUs were saturated: latencies include waiting for a CPU, behind the bench's own work too (--server and --nats measure a system on other machines)"
            );
        }
    }
    if let (Some(i), Some(o), Some(b)) = (
        r.nats_in_msgs_per_saga,
        r.nats_out_msgs_per_saga,
        r.nats_bytes_per_saga,
    ) {
        let _ = writeln!(
            out,
            "  nats        per saga: {i} msgs in, {o} msgs out, {:.1} KiB",
            b / 1024.0
        );
    }
    if r.cut_by_deadline {
        let _ = writeln!(out, "  cut short by --max-time");
    }
    // Short runs have one or two windows, which say nothing the totals do not.
    if r.timeline.len() >= 3 {
        let _ = writeln!(
            out,
            "  timeline    {:>7} {:>9} {:>9} {:>9} {:>9} {:>9}",
            "t (s)", "sagas/s", "p50 ms", "p99 ms", "node MiB", "nats MiB"
        );
        let opt = |v: Option<f64>| v.map_or_else(|| "-".to_string(), |v| format!("{v:.1}"));
        for w in &r.timeline {
            let _ = writeln!(
                out,
                "              {:>7.1} {:>9.1} {:>9.2} {:>9.2} {:>9} {:>9}",
                w.t_s,
                w.sagas_per_sec,
                w.p50_ms,
                w.p99_ms,
                opt(w.node_rss_mib),
                opt(w.nats_rss_mib)
            );
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use tokio::time::Instant;

    fn samples(lat_ms: &[u64]) -> Samples {
        let t0 = Instant::now();
        let mut s = Samples {
            attempted: lat_ms.len() as u64,
            latencies_us: lat_ms.iter().map(|m| m * 1000).collect(),
            start_us: lat_ms.iter().map(|_| 500).collect(),
            first_due: Some(t0),
            last_done: Some(t0 + std::time::Duration::from_secs(2)),
            ..Default::default()
        };
        s.latencies_us.sort_unstable();
        s.outcomes.insert("SHIPPED".into(), lat_ms.len() as u64);
        s
    }

    #[test]
    fn report_figures_and_ratios() {
        let s = RunReport::new(
            "sagaflow",
            Shape::Closed { concurrency: 8 },
            &samples(&(1..=100).collect::<Vec<_>>()),
        );
        assert_eq!(s.orders, 100);
        assert_eq!(s.sagas_per_sec, 50.0);
        assert_eq!((s.p50_ms, s.p99_ms, s.max_ms), (50.0, 99.0, 100.0));
        assert_eq!(s.mean_ms, 50.5);
        assert!(s.clean());
        let b = RunReport::new(
            "baseline",
            Shape::Closed { concurrency: 8 },
            &samples(&[10, 20, 30, 40]),
        );
        let r = Ratios::of(&s, &b);
        assert_eq!(r.throughput, 25.0);
        let report = Report::new(
            "closed",
            vec![Point::new(s, Some(b))],
            0,
            Mix::default(),
            Environment::read("2.15.1".into(), "started", vec![]),
        );
        let v = serde_json::to_value(&report).unwrap();
        assert_eq!(v["orders"], 100);
        assert_eq!(v["baseline_sagas_per_sec"], 2.0);
        assert_eq!(v["points"][0]["sagaflow"]["loop"], "closed");
        assert!(report
            .text()
            .contains("sagaflow / baseline: throughput 25.00×"));
    }

    #[test]
    fn report_says_when_the_machine_was_saturated() {
        let machine = |busy: f64, saturated| MachineUsage {
            cpus: 2,
            busy,
            busy_cores: busy * 2.0,
            other_cores: 0.02,
            steal: 0.001,
            saturated,
        };
        let text = |m: Option<MachineUsage>| {
            let mut s = RunReport::new("sagaflow", Shape::Open { rate: 2000.0 }, &samples(&[5]));
            s.machine = m;
            let v = serde_json::to_value(&s).unwrap();
            let mut out = String::new();
            run_text(&mut out, &s);
            (v, out)
        };
        let (v, out) = text(Some(machine(0.93, true)));
        assert_eq!(v["machine"]["saturated"], true);
        assert!(
            out.contains("machine     2 cpus 93 % busy (1.86 cores, 0.02 of them not the processes above), 0.1 % stolen"),
            "{out}"
        );
        assert!(out.contains("the CPUs were saturated"), "{out}");
        let (v, out) = text(Some(machine(0.40, false)));
        assert_eq!(v["machine"]["saturated"], false);
        assert!(out.contains("40 % busy"), "{out}");
        assert!(!out.contains("saturated"), "{out}");
        let (v, out) = text(None);
        assert!(v["machine"].is_null());
        assert!(!out.contains("machine"), "{out}");
    }

    #[test]
    fn report_timeline_splits_the_run_into_windows() {
        let t0 = Instant::now();
        let secs = std::time::Duration::from_secs;
        let mut s = Samples {
            first_due: Some(t0),
            last_done: Some(t0 + std::time::Duration::from_millis(25_000)),
            ..Default::default()
        };
        // 0-10 s: 20 sagas of 5 ms; 10-20 s: 10 of 50 ms; 20-25 s: 5 of 500 ms.
        for i in 0..20u64 {
            s.ends
                .push((t0 + std::time::Duration::from_millis(i * 400), 5_000));
        }
        for i in 0..10u64 {
            s.ends.push((t0 + secs(10 + i), 50_000));
        }
        for i in 0..5u64 {
            s.ends.push((t0 + secs(20 + i), 500_000));
        }
        let rss = [
            RssSample {
                at: t0 + secs(9),
                node_kib: Some(10 * 1024),
                nats_kib: None,
            },
            RssSample {
                at: t0 + secs(19),
                node_kib: Some(12 * 1024),
                nats_kib: Some(2048),
            },
            RssSample {
                at: t0 + secs(24),
                node_kib: Some(16 * 1024),
                nats_kib: Some(4096),
            },
        ];
        let t = timeline(&s, secs(10), &rss);
        let got: Vec<_> = t
            .iter()
            .map(|w| {
                (
                    w.t_s,
                    w.completed,
                    w.sagas_per_sec,
                    w.p50_ms,
                    w.node_rss_mib,
                    w.nats_rss_mib,
                )
            })
            .collect();
        assert_eq!(
            got,
            vec![
                (10.0, 20, 2.0, 5.0, Some(10.0), None),
                (20.0, 10, 1.0, 50.0, Some(12.0), Some(2.0)),
                (25.0, 5, 1.0, 500.0, Some(16.0), Some(4.0)),
            ]
        );
        let mut r = RunReport::new("sagaflow", Shape::Open { rate: 2.0 }, &s);
        r.timeline = t;
        let mut text = String::new();
        run_text(&mut text, &r);
        assert!(text.contains("timeline"), "{text}");
        assert_eq!(
            serde_json::to_value(&r).unwrap()["timeline"][2]["p99_ms"],
            500.0
        );
        // Nothing ended: no timeline.
        assert!(timeline(&Samples::default(), secs(10), &rss).is_empty());
    }

    #[test]
    fn report_timeline_folds_a_short_drain_into_the_last_window() {
        let t0 = Instant::now();
        let ms = std::time::Duration::from_millis;
        // 10 sagas a second for 20 s, then the 6 still in flight end within 0.5 s.
        let mut s = Samples {
            first_due: Some(t0),
            last_done: Some(t0 + ms(20_500)),
            ..Default::default()
        };
        for i in 0..200u64 {
            s.ends.push((t0 + ms(i * 100), 5_000));
        }
        for i in 0..6u64 {
            s.ends.push((t0 + ms(20_000 + i * 100), 5_000));
        }
        let t = timeline(&s, std::time::Duration::from_secs(10), &[]);
        let got: Vec<_> = t.iter().map(|w| (w.t_s, w.completed)).collect();
        assert_eq!(got, vec![(10.0, 100), (20.5, 106)]);
        // 106 over 10.5 s, not 6 over 0.5 s (12/s).
        assert_eq!(t[1].sagas_per_sec, 10.1);
        // A tail of a quarter window or more stays a window of its own.
        s.last_done = Some(t0 + ms(22_500));
        s.ends.push((t0 + ms(22_500), 5_000));
        let t = timeline(&s, std::time::Duration::from_secs(10), &[]);
        let got: Vec<_> = t.iter().map(|w| (w.t_s, w.completed)).collect();
        assert_eq!(got, vec![(10.0, 100), (20.0, 100), (22.5, 7)]);
    }

    #[test]
    fn report_sweep_headline_is_the_highest_rate_kept_up_with() {
        let step = |rate: f64, completed: usize, p50: u64| {
            let mut s = samples(&vec![p50; completed]);
            s.last_done = s.first_due.map(|t| t + std::time::Duration::from_secs(1));
            Point::new(RunReport::new("sagaflow", Shape::Open { rate }, &s), None)
        };
        let report = Report::new(
            "sweep",
            vec![
                step(100.0, 100, 3),
                step(400.0, 390, 20),
                step(800.0, 500, 900),
            ],
            0,
            Mix::default(),
            Environment::read("2.15.1".into(), "started", vec![]),
        );
        assert_eq!(report.offered_per_sec, Some(400.0));
        assert_eq!(report.sagas_per_sec, 390.0);
        assert_eq!(report.p50_ms, 20.0);
        assert_eq!(report.peak_sagas_per_sec, 500.0);
        assert_eq!(report.orders, 990);
        assert!(report
            .text()
            .contains("highest rate kept up with: 400/s offered"));
    }
}
