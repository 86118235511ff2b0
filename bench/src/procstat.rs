//! CPU time and memory of a process, from `/proc` (Linux only; elsewhere every reading is
//! `None` and the report leaves the figures out).
//!
//! - CPU: `utime + stime` of `/proc/<pid>/stat` (all threads, in clock ticks), so a run's CPU
//!   seconds are the difference of two readings.
//! - Memory: `VmRSS` (now) and `VmHWM` (the peak resident set) of `/proc/<pid>/status`. The
//!   peak is reset at the start of each measured run by writing `5` to
//!   `/proc/<pid>/clear_refs`, so it is the peak *of that run*, not of the process's life
//!   (which would include the warm-up, or the other system's run on a shared nats-server).
//!   The reset needs the right to write that file (our own children, or root); when it fails
//!   the peak is the lifetime peak, and the report says so.
//! - The machine: the `cpu` line of `/proc/stat` (all CPUs, in clock ticks), read at both ends
//!   of a run, tells how busy the CPUs were, how much of that the measured processes account
//!   for, and how much time the hypervisor gave to other guests (`steal`). A run that kept
//!   the CPUs busy [`SATURATED_AT`] of the time or more measured a saturated machine, and its
//!   latencies include waiting for a CPU.

use std::sync::OnceLock;
use std::time::Instant;

use serde::Serialize;

/// Clock ticks per second of `/proc/<pid>/stat` (`getconf CLK_TCK`, 100 when unknown: the
/// value on every Linux we run on; no libc call, the workspace forbids `unsafe`).
fn ticks_per_second() -> f64 {
    static TICKS: OnceLock<f64> = OnceLock::new();
    *TICKS.get_or_init(|| {
        std::process::Command::new("getconf")
            .arg("CLK_TCK")
            .stdin(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .output()
            .ok()
            .and_then(|o| String::from_utf8(o.stdout).ok())
            .and_then(|s| s.trim().parse::<f64>().ok())
            .filter(|t| *t > 0.0)
            .unwrap_or(100.0)
    })
}

/// CPU seconds (user + system, all threads) the process has used so far.
pub fn cpu_seconds(pid: u32) -> Option<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    parse_cpu_ticks(&stat).map(|t| t as f64 / ticks_per_second())
}

/// `utime + stime` from the text of `/proc/<pid>/stat`. The command name (field 2) may hold
/// spaces and parentheses, so fields are counted from the last `)`.
fn parse_cpu_ticks(stat: &str) -> Option<u64> {
    let rest = &stat[stat.rfind(')')? + 1..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // `rest` starts at field 3 (state); utime is field 14, stime field 15.
    let utime: u64 = fields.get(11)?.parse().ok()?;
    let stime: u64 = fields.get(12)?.parse().ok()?;
    Some(utime + stime)
}

/// Resident set now and its peak (`VmRSS`, `VmHWM`), KiB.
pub fn memory_kib(pid: u32) -> Option<(u64, u64)> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    parse_memory(&status)
}

fn parse_memory(status: &str) -> Option<(u64, u64)> {
    let field = |name: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
    };
    Some((field("VmRSS:")?, field("VmHWM:")?))
}

/// Resets the peak resident set (`VmHWM`) of `pid` to its current size. Returns whether it
/// could.
pub fn reset_peak(pid: u32) -> bool {
    std::fs::write(format!("/proc/{pid}/clear_refs"), "5").is_ok()
}

/// The resident sets of the node and of nats-server at one moment of a run.
#[derive(Debug, Clone, Copy)]
pub struct RssSample {
    /// When they were read.
    pub at: tokio::time::Instant,
    /// The node's resident set, KiB (when known).
    pub node_kib: Option<u64>,
    /// nats-server's, KiB.
    pub nats_kib: Option<u64>,
}

/// A process being measured over one run.
#[derive(Debug, Clone)]
pub struct Watch {
    pid: u32,
    cpu_at_start: Option<f64>,
    rss_at_start: Option<u64>,
    peak_reset: bool,
    started: Instant,
}

impl Watch {
    /// Starts measuring `pid`: reads its CPU time and resets its memory peak.
    pub fn start(pid: u32) -> Self {
        let peak_reset = reset_peak(pid);
        Watch {
            pid,
            cpu_at_start: cpu_seconds(pid),
            rss_at_start: memory_kib(pid).map(|(rss, _)| rss),
            peak_reset,
            started: Instant::now(),
        }
    }

    /// What the process used since [`Watch::start`]; `None` if it cannot be read (gone, not
    /// Linux).
    pub fn finish(&self) -> Option<Usage> {
        let cpu = cpu_seconds(self.pid)? - self.cpu_at_start?;
        let (rss, peak) = memory_kib(self.pid)?;
        let wall = self.started.elapsed().as_secs_f64();
        Some(Usage {
            cpu_s: round3(cpu.max(0.0)),
            cores: if wall > 0.0 {
                round3(cpu.max(0.0) / wall)
            } else {
                0.0
            },
            peak_rss_mib: round3(peak as f64 / 1024.0),
            rss_mib: round3(rss as f64 / 1024.0),
            rss_start_mib: round3(self.rss_at_start.unwrap_or_default() as f64 / 1024.0),
            peak_is_lifetime: !self.peak_reset,
        })
    }
}

/// What one process used during a run.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct Usage {
    /// CPU seconds (user + system, all threads) during the run.
    pub cpu_s: f64,
    /// `cpu_s` / wall-clock seconds of the run: 1.0 is one core busy all the time.
    pub cores: f64,
    /// Peak resident set during the run (of the process's life if `peak_is_lifetime`), MiB.
    pub peak_rss_mib: f64,
    /// Resident set at the end of the run, MiB.
    pub rss_mib: f64,
    /// Resident set at the start of the run, MiB: `peak_rss_mib - rss_start_mib` is what the
    /// run's sagas in flight cost at most.
    pub rss_start_mib: f64,
    /// The peak could not be reset at the start of the run: it is the lifetime peak.
    pub peak_is_lifetime: bool,
}

/// Share of the machine's CPU time that was busy at or above which a run is reported as
/// measured on a saturated machine.
pub const SATURATED_AT: f64 = 0.9;

/// Clock ticks of all CPUs together, from the `cpu` line of `/proc/stat`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct MachineTicks {
    /// Running anything: user, nice, system, irq and softirq (guest time is part of user).
    busy: u64,
    /// Taken by the hypervisor for other guests while this one wanted to run.
    steal: u64,
    /// Everything, idle and waiting for I/O included.
    total: u64,
    /// CPUs (`cpuN` lines).
    cpus: usize,
}

fn parse_machine(stat: &str) -> Option<MachineTicks> {
    let line = stat.lines().find(|l| l.starts_with("cpu "))?;
    let fields: Vec<u64> = line
        .split_whitespace()
        .skip(1)
        .map(|f| f.parse().ok())
        .collect::<Option<_>>()?;
    // user nice system idle iowait irq softirq steal [guest guest_nice]
    if fields.len() < 8 {
        return None;
    }
    let f = |i: usize| fields[i];
    let cpus = stat
        .lines()
        .filter(|l| {
            l.strip_prefix("cpu")
                .is_some_and(|n| n.starts_with(|c: char| c.is_ascii_digit()))
        })
        .count();
    Some(MachineTicks {
        busy: f(0) + f(1) + f(2) + f(5) + f(6),
        steal: f(7),
        total: (0..8).map(f).sum(),
        cpus,
    })
}

fn machine_ticks() -> Option<MachineTicks> {
    parse_machine(&std::fs::read_to_string("/proc/stat").ok()?)
}

/// The whole machine's CPUs, measured over one run.
#[derive(Debug, Clone)]
pub struct MachineWatch {
    at_start: Option<MachineTicks>,
}

impl MachineWatch {
    /// Starts measuring.
    pub fn start() -> Self {
        MachineWatch {
            at_start: machine_ticks(),
        }
    }

    /// How busy the machine was since [`MachineWatch::start`]; `measured_cores` is what the
    /// processes the run measured used (cores), so the rest can be told apart.
    pub fn finish(&self, measured_cores: f64) -> Option<MachineUsage> {
        machine_usage(self.at_start?, machine_ticks()?, measured_cores)
    }
}

fn machine_usage(a: MachineTicks, b: MachineTicks, measured_cores: f64) -> Option<MachineUsage> {
    let total = b.total.checked_sub(a.total).filter(|t| *t > 0)? as f64;
    let busy = b.busy.saturating_sub(a.busy) as f64 / total;
    let steal = b.steal.saturating_sub(a.steal) as f64 / total;
    let cpus = b.cpus.max(1);
    let busy_cores = busy * cpus as f64;
    Some(MachineUsage {
        cpus,
        busy: round3(busy),
        busy_cores: round3(busy_cores),
        other_cores: round3((busy_cores - measured_cores).max(0.0)),
        steal: round3(steal),
        saturated: busy + steal >= SATURATED_AT,
    })
}

/// How busy the whole machine was during a run.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct MachineUsage {
    /// CPUs of the machine.
    pub cpus: usize,
    /// Share of all CPU time spent running anything (0 to 1).
    pub busy: f64,
    /// The same in cores (`busy × cpus`).
    pub busy_cores: f64,
    /// Busy cores the measured processes (node, nats-server, the bench) do not account for:
    /// other processes, or a node or server the bench was not given the pid of.
    pub other_cores: f64,
    /// Share of CPU time the hypervisor gave to other guests while this one wanted to run.
    pub steal: f64,
    /// `busy + steal` reached [`SATURATED_AT`]: the CPUs were the bottleneck, and latencies
    /// include waiting for one.
    pub saturated: bool,
}

fn round3(x: f64) -> f64 {
    (x * 1000.0).round() / 1000.0
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn procstat_parses_stat_with_odd_command_names() {
        let stat = "4242 (nats (x) y) S 1 4242 4242 0 -1 4194560 1207 0 0 0 731 269 0 0 20 0 9 0 \
                    123 456 789";
        assert_eq!(parse_cpu_ticks(stat), Some(1000));
        assert_eq!(parse_cpu_ticks("garbage"), None);
    }

    #[test]
    fn procstat_parses_status_memory() {
        let status =
            "Name:\tnats-server\nVmPeak:\t 100 kB\nVmHWM:\t   2048 kB\nVmRSS:\t   1024 kB\n";
        assert_eq!(parse_memory(status), Some((1024, 2048)));
        assert_eq!(parse_memory("Name:\tx\n"), None);
    }

    #[test]
    fn procstat_parses_the_machine_and_tells_saturation() {
        let stat = |user: u64, idle: u64, steal: u64| {
            format!(
                "cpu  {user} 0 100 {idle} 10 0 5 {steal} 0 0\ncpu0 1 2 3 4 5 6 7 8 0 0\n\
                 cpu1 1 2 3 4 5 6 7 8 0 0\nintr 12345\nctxt 999\n"
            )
        };
        let a = parse_machine(&stat(1_000, 5_000, 50)).unwrap();
        assert_eq!(a.cpus, 2);
        assert_eq!(a.busy, 1_105);
        assert_eq!(a.total, 6_165);
        // 1,000 ticks later: 900 busy, 95 idle, 5 stolen.
        let b = parse_machine(&stat(1_900, 5_095, 55)).unwrap();
        let u = machine_usage(a, b, 1.5).unwrap();
        assert_eq!(u.cpus, 2);
        assert!((u.busy - 0.9).abs() < 1e-9, "{u:?}");
        assert!((u.busy_cores - 1.8).abs() < 1e-9, "{u:?}");
        assert!((u.other_cores - 0.3).abs() < 1e-9, "{u:?}");
        assert!((u.steal - 0.005).abs() < 1e-9, "{u:?}");
        assert!(u.saturated);
        // Mostly idle: not saturated, and nothing unaccounted for when the processes used more
        // than the coarser machine counters show.
        let c = parse_machine(&stat(2_100, 5_895, 55)).unwrap();
        let u = machine_usage(b, c, 0.5).unwrap();
        assert!((u.busy - 0.2).abs() < 1e-9, "{u:?}");
        assert!(!u.saturated);
        assert_eq!(u.other_cores, 0.0);
        // No time passed, or no such line: nothing to say.
        assert_eq!(machine_usage(a, a, 0.0), None);
        assert_eq!(parse_machine("intr 1\n"), None);
        assert_eq!(parse_machine("cpu  1 2 3\n"), None);
    }

    #[test]
    fn procstat_reads_this_process() {
        if !std::path::Path::new("/proc/self/stat").exists() {
            return;
        }
        let pid = std::process::id();
        let watch = Watch::start(pid);
        let mut x = 0u64;
        for i in 0..2_000_000u64 {
            x = x.wrapping_mul(31).wrapping_add(i);
        }
        assert!(x != 1);
        let usage = watch.finish().unwrap();
        assert!(usage.cpu_s >= 0.0);
        assert!(usage.peak_rss_mib >= usage.rss_mib * 0.5);
        assert!(usage.rss_mib > 0.0);
    }
}
