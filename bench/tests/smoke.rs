//! `sagaflow-bench` in smoke mode: the built binary starts its own NATS and node, places 40
//! orders, runs the baseline, and prints one JSON object. No thresholds: this proves the bench
//! works and its output parses, not how fast anything is.

use std::io::Read;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};

/// Bound on the whole bench run (it has its own `--max-time` below it).
const TIMEOUT: Duration = Duration::from_secs(150);

/// Runs `sagaflow-bench ARGS`, killing it after [`TIMEOUT`]; returns (exit ok, stdout, stderr).
fn bench(args: &[&str]) -> anyhow::Result<(bool, String, String)> {
    let dir = tempfile::tempdir()?;
    let (out_path, err_path) = (dir.path().join("out"), dir.path().join("err"));
    // The node runs the `sagaflow` binary built next to this one (`cargo test --workspace`
    // builds both); the bench finds it there itself.
    let mut child = Command::new(env!("CARGO_BIN_EXE_sagaflow-bench"))
        .args(args)
        .env_remove("RUST_LOG")
        .stdin(Stdio::null())
        .stdout(std::fs::File::create(&out_path)?)
        .stderr(std::fs::File::create(&err_path)?)
        .spawn()
        .context("spawn sagaflow-bench")?;
    let deadline = Instant::now() + TIMEOUT;
    let status = loop {
        if let Some(status) = child.try_wait()? {
            break status;
        }
        if Instant::now() >= deadline {
            let _ = child.kill();
            let _ = child.wait();
            bail!(
                "sagaflow-bench did not finish within {TIMEOUT:?}; stderr:\n{}",
                std::fs::read_to_string(&err_path).unwrap_or_default()
            );
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    let read = |p: &std::path::Path| -> anyhow::Result<String> {
        let mut s = String::new();
        std::fs::File::open(p)?.read_to_string(&mut s)?;
        Ok(s)
    };
    Ok((status.success(), read(&out_path)?, read(&err_path)?))
}

#[test]
fn bench_smoke_json_with_baseline() -> anyhow::Result<()> {
    let (ok, stdout, stderr) = bench(&[
        "--orders",
        "40",
        "--concurrency",
        "8",
        "--warmup",
        "20",
        "--mix",
        "--baseline",
        "--json",
        "--max-time",
        "120s",
    ])?;
    assert!(ok, "bench failed\nstdout:\n{stdout}\nstderr:\n{stderr}");
    // Exactly one JSON object on stdout.
    let lines: Vec<&str> = stdout.lines().filter(|l| !l.trim().is_empty()).collect();
    assert_eq!(lines.len(), 1, "stdout:\n{stdout}");
    let v: serde_json::Value = serde_json::from_str(lines[0]).context("stdout is JSON")?;
    assert_eq!(v["orders"], 40, "{v:#}");
    let rate = v["sagas_per_sec"].as_f64().context("sagas_per_sec")?;
    assert!(rate > 0.0, "{v:#}");
    let (p50, p99) = (
        v["p50_ms"].as_f64().context("p50_ms")?,
        v["p99_ms"].as_f64().context("p99_ms")?,
    );
    assert!(p50 > 0.0 && p50 <= p99, "{v:#}");
    assert!(v["clean"].as_bool().context("clean")?, "{v:#}");
    let base = v["baseline_sagas_per_sec"]
        .as_f64()
        .context("baseline_sagas_per_sec")?;
    assert!(base > 0.0, "{v:#}");
    let point = &v["points"][0];
    assert_eq!(point["sagaflow"]["completed"], 40, "{v:#}");
    assert_eq!(point["sagaflow"]["unexpected_outcomes"], 0, "{v:#}");
    assert_eq!(point["baseline"]["completed"], 40, "{v:#}");
    assert!(point["ratios"]["throughput"].as_f64().is_some(), "{v:#}");
    // The timeline accounts for every saga that ended.
    let windows = point["sagaflow"]["timeline"]
        .as_array()
        .context("timeline")?;
    let in_windows: u64 = windows
        .iter()
        .map(|w| w["completed"].as_u64().unwrap_or(0))
        .sum();
    assert_eq!(in_windows, 40, "{v:#}");
    // The mix: some of the 40 orders are cancelled (declined or out of stock).
    let outcomes = &point["sagaflow"]["outcomes"];
    assert!(outcomes["CANCELLED"].as_u64().unwrap_or(0) > 0, "{v:#}");
    assert!(outcomes["SHIPPED"].as_u64().unwrap_or(0) > 0, "{v:#}");
    // The processes the bench started were measured (Linux).
    if std::path::Path::new("/proc/self/stat").exists() {
        assert!(
            point["sagaflow"]["node"]["cpu_s"].as_f64().is_some(),
            "{v:#}"
        );
        assert!(
            point["sagaflow"]["nats"]["peak_rss_mib"].as_f64().is_some(),
            "{v:#}"
        );
        // And the machine: its busy share is a share of at least one CPU.
        let machine = &point["sagaflow"]["machine"];
        let busy = machine["busy"].as_f64().context("machine.busy")?;
        assert!((0.0..=1.0).contains(&busy), "{v:#}");
        assert!(machine["cpus"].as_u64().unwrap_or(0) >= 1, "{v:#}");
        assert!(machine["saturated"].is_boolean(), "{v:#}");
    }
    Ok(())
}

/// The like-for-like setting of the benchmarks (demo services that record nothing): every
/// order still ends as its kind says (declined and out-of-stock orders are cancelled).
#[test]
fn bench_smoke_with_stateless_participants_keeps_the_mix() -> anyhow::Result<()> {
    let (ok, stdout, stderr) = bench(&[
        "--orders",
        "40",
        "--concurrency",
        "8",
        "--warmup",
        "0",
        "--mix",
        "0.2,0.2",
        "--node-env",
        "SAGAFLOW_DEMO__STATELESS=true",
        "--json",
        "--max-time",
        "120s",
    ])?;
    assert!(ok, "bench failed\nstdout:\n{stdout}\nstderr:\n{stderr}");
    let v: serde_json::Value = serde_json::from_str(stdout.trim()).context("stdout is JSON")?;
    let point = &v["points"][0]["sagaflow"];
    assert_eq!(point["completed"], 40, "{v:#}");
    assert_eq!(point["unexpected_outcomes"], 0, "{v:#}");
    // Each order's status was checked against its kind (above); both kinds occur.
    let count = |s: &str| point["outcomes"][s].as_u64().unwrap_or(0);
    assert_eq!(count("CANCELLED") + count("SHIPPED"), 40, "{v:#}");
    assert!(count("CANCELLED") >= 8 && count("SHIPPED") >= 8, "{v:#}");
    Ok(())
}

/// `--tls`: the node serves gRPC over TLS and requires a token; the bench's clients present
/// both, and every order still ends.
#[test]
fn bench_smoke_over_tls_with_a_token() -> anyhow::Result<()> {
    let (ok, stdout, stderr) = bench(&[
        "--orders",
        "40",
        "--concurrency",
        "8",
        "--warmup",
        "0",
        "--tls",
        "--json",
        "--max-time",
        "120s",
    ])?;
    assert!(ok, "bench failed\nstdout:\n{stdout}\nstderr:\n{stderr}");
    let v: serde_json::Value = serde_json::from_str(stdout.trim()).context("stdout is JSON")?;
    assert_eq!(v["environment"]["tls"], true, "{v:#}");
    assert_eq!(v["points"][0]["sagaflow"]["completed"], 40, "{v:#}");
    Ok(())
}

#[test]
fn bench_smoke_refuses_bad_options() -> anyhow::Result<()> {
    let (ok, _, stderr) = bench(&["--rate", "10", "--concurrency", "4"])?;
    assert!(!ok);
    assert!(stderr.contains("cannot be used with"), "{stderr}");
    let (ok, _, stderr) = bench(&["--nats", "nats://10.1.2.3:4222"])?;
    assert!(!ok);
    assert!(stderr.contains("not a loopback address"), "{stderr}");
    Ok(())
}
