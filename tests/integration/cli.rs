//! The `sagaflow` binary end to end, as people and scripts use it: exit codes, what goes to
//! stdout and stderr, one JSON object per `--json` call. One `nats-server` and one
//! `sagaflow node --demo-services` process back the client commands; `saga validate` and the
//! usage errors need no node.
use crate::common;

use std::path::Path;
use std::process::{Output, Stdio};
use std::time::{Duration, Instant};

use common::*;
use serde_json::Value;

/// Bound on one CLI run (the client bounds its own connect to 5 s and each call to 30 s).
const RUN_TIMEOUT: Duration = Duration::from_secs(60);

/// What one run of the binary printed.
#[derive(Debug)]
struct Run {
    code: Option<i32>,
    stdout: String,
    stderr: String,
    took: Duration,
}

impl Run {
    fn stderr_lines(&self) -> Vec<&str> {
        self.stderr
            .lines()
            .filter(|l| !l.trim().is_empty())
            .collect()
    }

    fn stdout_lines(&self) -> Vec<&str> {
        self.stdout
            .lines()
            .filter(|l| !l.trim().is_empty())
            .collect()
    }

    /// Asserts exit 0 and returns stdout.
    fn ok(&self) -> &str {
        assert_eq!(self.code, Some(0), "expected success: {self:#?}");
        &self.stdout
    }

    /// Asserts exit 0 and that stdout is exactly one JSON object.
    fn json(&self) -> Value {
        let out = self.ok();
        assert_eq!(
            out.lines().filter(|l| !l.trim().is_empty()).count(),
            1,
            "one JSON object on one line: {out}"
        );
        let v: Value = serde_json::from_str(out).unwrap_or_else(|e| panic!("{e}: {out}"));
        assert!(v.is_object(), "{v}");
        v
    }
}

/// Runs `sagaflow ARGS` in `dir` (bounded by [`RUN_TIMEOUT`]; the child is killed if it overruns).
/// The caller's `SAGAFLOW_*` and `RUST_LOG` settings are removed so they cannot change the output.
async fn sagaflow_in(dir: &Path, args: &[&str]) -> Run {
    let mut cmd = tokio::process::Command::new(env!("CARGO_BIN_EXE_sagaflow"));
    cmd.args(args)
        .current_dir(dir)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .env_remove("RUST_LOG");
    for (key, _) in std::env::vars_os() {
        if key.to_string_lossy().starts_with("SAGAFLOW_") {
            cmd.env_remove(key);
        }
    }
    let started = Instant::now();
    let Output {
        status,
        stdout,
        stderr,
    } = within(RUN_TIMEOUT, &format!("sagaflow {args:?}"), cmd.output())
        .await
        .unwrap()
        .unwrap();
    Run {
        code: status.code(),
        stdout: String::from_utf8(stdout).unwrap(),
        stderr: String::from_utf8(stderr).unwrap(),
        took: started.elapsed(),
    }
}

async fn sagaflow(args: &[&str]) -> Run {
    sagaflow_in(&repo_dir(), args).await
}

/// A step of an order's JSON by name.
fn json_step<'a>(order: &'a Value, name: &str) -> &'a Value {
    order["steps"]
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["name"] == name)
        .unwrap_or_else(|| panic!("no step {name} in {order}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn order_commands_against_a_node() {
    let nats = start_nats().await.unwrap();
    let node = NodeProcess::start_with(NodeOptions::new("cli-node", &[nats.url()])).unwrap();
    node.connect_orders().await.unwrap();
    let server = node.server_arg();
    let s = server.as_str();

    // place
    let placed = sagaflow(&[
        "order",
        "place",
        "--server",
        s,
        "--order-id",
        "cli-1",
        "--customer",
        "ann",
        "--amount",
        "1999",
        "--item",
        "SKU-1:2",
        "--item",
        "SKU-2:1",
    ])
    .await;
    let out = placed.ok();
    assert!(out.contains("cli-1"), "{out}");
    assert!(placed.stderr.is_empty(), "{placed:#?}");

    // watch: one line per change until terminal, the last one SHIPPED.
    let watched = sagaflow(&["order", "watch", "--server", s, "cli-1"]).await;
    let lines = watched.stdout_lines();
    let last = lines.last().copied().unwrap_or_default();
    assert_eq!(watched.code, Some(0), "{watched:#?}");
    assert!(last.contains("SHIPPED"), "{watched:#?}");
    assert!(
        last.contains("cli-1") && last.contains("(terminal)"),
        "{last}"
    );

    // get --json: exactly one object with the documented fields.
    let o = sagaflow(&["order", "get", "--server", s, "cli-1", "--json"])
        .await
        .json();
    assert_eq!(o["order_id"], "cli-1");
    assert_eq!(o["status"], "SHIPPED");
    assert_eq!(o["terminal"], true);
    assert_eq!(o["customer"], "ann");
    assert_eq!(o["amount_cents"], 1999);
    assert_eq!(o["items"][0]["sku"], "SKU-1");
    assert_eq!(o["items"][0]["quantity"], 2);
    let steps = o["steps"].as_array().unwrap();
    assert!(!steps.is_empty(), "{o}");
    for step in steps {
        assert!(step["name"].is_string(), "{step}");
        assert!(step["state"].is_string(), "{step}");
        assert!(step["attempts"].is_u64(), "{step}");
    }
    let step_names: Vec<&str> = steps.iter().map(|s| s["name"].as_str().unwrap()).collect();
    for name in ["charge", "reserve", "prepare_shipment", "notify"] {
        let st = json_step(&o, name);
        assert_eq!(st["state"], "SUCCEEDED", "{st}");
        assert_eq!(st["attempts"], 1, "{st}");
    }

    // get (for people): the status and every step.
    let text = sagaflow(&["order", "get", "--server", s, "cli-1"]).await;
    let text = text.ok();
    assert!(text.contains("SHIPPED"), "{text}");
    for name in &step_names {
        assert!(text.contains(name), "step {name} missing from:\n{text}");
    }

    // An order that cannot be fulfilled is cancelled, with a reason.
    sagaflow(&[
        "order",
        "place",
        "--server",
        s,
        "--order-id",
        "cli-oos",
        "--customer",
        "bob",
        "--amount",
        "4200",
        "--item",
        "SKU-OUT:1",
    ])
    .await
    .ok();
    let watched = sagaflow(&["order", "watch", "--server", s, "cli-oos"]).await;
    assert_eq!(watched.code, Some(0), "{watched:#?}");
    let o = sagaflow(&["order", "get", "--server", s, "cli-oos", "--json"])
        .await
        .json();
    assert_eq!(o["order_id"], "cli-oos");
    assert_eq!(o["status"], "CANCELLED", "{o}");
    assert_eq!(o["terminal"], true);
    let reason = o["reason"].as_str().unwrap();
    assert!(!reason.is_empty(), "{o}");
    assert!(reason.contains("out_of_stock"), "{reason}");

    // list --status CANCELLED --json: only cancelled orders, this one among them.
    let list = sagaflow(&[
        "order",
        "list",
        "--server",
        s,
        "--status",
        "CANCELLED",
        "--json",
    ])
    .await
    .json();
    let orders = list["orders"].as_array().unwrap();
    assert!(orders.iter().any(|o| o["order_id"] == "cli-oos"), "{list}");
    assert!(orders.iter().all(|o| o["status"] == "CANCELLED"), "{list}");
    assert!(!orders.iter().any(|o| o["order_id"] == "cli-1"), "{list}");
    let all = sagaflow(&["order", "list", "--server", s, "--json"])
        .await
        .json();
    let ids: Vec<&str> = all["orders"]
        .as_array()
        .unwrap()
        .iter()
        .map(|o| o["order_id"].as_str().unwrap())
        .collect();
    assert!(
        ids.contains(&"cli-1") && ids.contains(&"cli-oos"),
        "{ids:?}"
    );

    // Errors: one `error:` line on stderr, non-zero exit, nothing on stdout.
    let missing = sagaflow(&["order", "get", "--server", s, "nope"]).await;
    assert_ne!(missing.code, Some(0), "{missing:#?}");
    assert_eq!(missing.code, Some(1), "{missing:#?}");
    assert_eq!(missing.stderr_lines().len(), 1, "{missing:#?}");
    assert!(missing.stderr.contains("not_found"), "{missing:#?}");
    assert!(missing.stdout.is_empty(), "{missing:#?}");
    let missing = sagaflow(&["order", "get", "--server", s, "nope", "--json"]).await;
    assert_eq!(missing.code, Some(1), "{missing:#?}");
    assert!(
        missing.stdout.is_empty(),
        "no partial JSON on stdout: {missing:#?}"
    );

    // saga list --json: both definitions.
    let defs = sagaflow(&["saga", "list", "--server", s, "--json"])
        .await
        .json();
    let names: Vec<&str> = defs["definitions"]
        .as_array()
        .unwrap()
        .iter()
        .map(|d| d["name"].as_str().unwrap())
        .collect();
    assert!(
        names.contains(&"order") && names.contains(&"trip"),
        "{defs}"
    );
    let text = sagaflow(&["saga", "list", "--server", s]).await;
    let text = text.ok();
    assert!(text.contains("order") && text.contains("trip"), "{text}");

    // analytics: a separate consumer group; it catches up with the shipped order eventually.
    let last = std::sync::Arc::new(std::sync::Mutex::new(Value::Null));
    let found = wait_until(
        Duration::from_secs(60),
        "analytics counts the order",
        || {
            let last = last.clone();
            async move {
                let run = sagaflow(&["analytics", "sales", "--server", s, "--json"]).await;
                if run.code != Some(0) {
                    return false;
                }
                let v = run.json();
                let done = v["completed_orders"].as_u64().unwrap_or(0) >= 1;
                *last.lock().unwrap() = v;
                done
            }
        },
    )
    .await;
    let last = last.lock().unwrap().clone();
    assert!(found.is_ok(), "{found:?}: last report {last}");
    assert!(last["revenue_cents"].as_u64().unwrap() >= 1999, "{last}");
    assert!(last["skus"].is_array(), "{last}");
    let text = sagaflow(&["analytics", "sales", "--server", s]).await;
    assert!(text.ok().contains("completed orders"), "{text:#?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn usage_errors_exit_2_before_any_network() {
    // Nothing listens here: a usage error must be reported before connecting.
    let port = free_port().to_string();
    let server = format!("127.0.0.1:{port}");
    let place = |amount: &'static str, item: &'static str| {
        let server = server.clone();
        async move {
            sagaflow(&[
                "order",
                "place",
                "--server",
                &server,
                "--order-id",
                "cli-bad",
                "--customer",
                "ann",
                "--amount",
                amount,
                "--item",
                item,
            ])
            .await
        }
    };
    let bad_item = place("100", "BAD").await;
    assert_eq!(bad_item.code, Some(2), "{bad_item:#?}");
    assert!(bad_item.stderr.contains("BAD"), "{bad_item:#?}");
    assert!(bad_item.stderr.contains("SKU:QTY"), "{bad_item:#?}");
    assert!(bad_item.stdout.is_empty());

    // The CLI refuses a zero amount itself (clap range 1..), naming the flag.
    let zero = place("0", "SKU-1:1").await;
    assert_ne!(zero.code, Some(0), "{zero:#?}");
    assert_eq!(zero.code, Some(2), "{zero:#?}");
    assert!(zero.stderr.contains("--amount"), "{zero:#?}");
    assert!(zero.stdout.is_empty());

    let bad_server = sagaflow(&["order", "get", "--server", "ftp://x:1", "o"]).await;
    assert_eq!(bad_server.code, Some(2), "{bad_server:#?}");
    assert!(
        bad_server.stderr.contains("expected host:port"),
        "{bad_server:#?}"
    );

    let no_item = sagaflow(&[
        "order",
        "place",
        "--server",
        &server,
        "--order-id",
        "x",
        "--customer",
        "c",
        "--amount",
        "1",
    ])
    .await;
    assert_eq!(no_item.code, Some(2), "{no_item:#?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unreachable_node_is_one_error_line_quickly() {
    let server = format!("127.0.0.1:{}", free_port());
    for args in [
        vec!["order", "get", "--server", &server, "cli-1"],
        vec!["order", "list", "--server", &server, "--json"],
        vec!["saga", "list", "--server", &server],
        vec!["analytics", "sales", "--server", &server, "--json"],
    ] {
        let run = sagaflow(&args).await;
        assert_eq!(run.code, Some(1), "{args:?}: {run:#?}");
        assert!(run.took < Duration::from_secs(15), "{args:?}: {run:#?}");
        let lines = run.stderr_lines();
        assert_eq!(lines.len(), 1, "{args:?}: {run:#?}");
        assert!(
            lines[0].starts_with(&format!("error: cannot reach sagaflow node at {server}")),
            "{args:?}: {run:#?}"
        );
        assert!(run.stdout.is_empty(), "{args:?}: {run:#?}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn saga_validate_accepts_the_shipped_sagas() {
    let run = sagaflow(&["saga", "validate", "sagas/order.toml", "sagas/trip.toml"]).await;
    let out = run.ok();
    assert!(run.stderr.is_empty(), "{run:#?}");
    let lines = run.stdout_lines();
    assert_eq!(lines.len(), 2, "{out}");
    assert!(
        lines[0].starts_with("ok: sagas/order.toml (saga order,"),
        "{out}"
    );
    assert!(
        lines[1].starts_with("ok: sagas/trip.toml (saga trip,"),
        "{out}"
    );
    // A folder stands for its *.toml files.
    let run = sagaflow(&["saga", "validate", "sagas"]).await;
    let shipped = std::fs::read_dir(repo_dir().join("sagas"))
        .unwrap()
        .filter(|e| {
            e.as_ref()
                .unwrap()
                .path()
                .extension()
                .is_some_and(|x| x == "toml")
        })
        .count();
    assert_eq!(shipped, 3, "order, trip and delivery");
    assert_eq!(run.stdout_lines().len(), shipped, "{run:#?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn saga_validate_names_file_line_and_column_of_each_error() {
    // Two invalid files; in the second, the second step's header is indented by two spaces
    // (its column is 3).
    let dir = repo_dir().join("tests/fixtures/invalid");
    let good = repo_dir().join("sagas/order.toml");
    let good = good.to_str().unwrap();
    let run = sagaflow_in(
        &dir,
        &[
            "saga",
            "validate",
            "unknown_key.toml",
            "no_compensation.toml",
            good,
        ],
    )
    .await;
    assert_eq!(run.code, Some(1), "{run:#?}");
    let errors = run.stderr_lines();
    assert_eq!(errors.len(), 2, "{run:#?}");
    assert!(
        errors[0].starts_with("unknown_key.toml:3:1: `colour`: unknown field `colour`"),
        "{run:#?}"
    );
    assert!(
        errors[1].starts_with(
            "no_compensation.toml:21:3: `stage[1].step[0].compensation`: step `ship` changes state but has no `compensation`"
        ),
        "{run:#?}"
    );
    // The valid file is still reported as valid.
    assert_eq!(
        run.stdout_lines(),
        [format!(
            "ok: {good} (saga order, 4 steps, and `notify_cancellation` after a compensation)"
        )],
        "{run:#?}"
    );

    // Each bad file alone fails too; a missing file is one error line.
    let run = sagaflow_in(&dir, &["saga", "validate", "no_compensation.toml"]).await;
    assert_eq!(run.code, Some(1), "{run:#?}");
    assert!(run.stdout.is_empty(), "{run:#?}");
    let run = sagaflow_in(&dir, &["saga", "validate", "missing.toml"]).await;
    assert_eq!(run.code, Some(1), "{run:#?}");
    assert_eq!(run.stderr_lines().len(), 1, "{run:#?}");
    assert!(run.stderr.contains("missing.toml"), "{run:#?}");
}
