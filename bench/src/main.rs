//! `sagaflow-bench`: see the crate documentation of [`sagaflow_bench`] (`--help` for options).

use std::process::ExitCode;

use clap::Parser;
use sagaflow::telemetry::{self, LogFormat, Settings};

/// How many order sagas per second a Sagaflow node completes, and how long each takes,
/// side by side with the bare JetStream pattern underneath.
#[derive(Debug, Parser)]
#[command(name = "sagaflow-bench", version)]
struct Cli {
    #[command(flatten)]
    args: sagaflow_bench::BenchArgs,
}

/// The node binary's allocator, so the bench's own CPU per order is measured as before.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[tokio::main]
async fn main() -> ExitCode {
    let cli = Cli::parse();
    // stderr is the progress bar: only warnings, unless RUST_LOG says otherwise.
    let guard = telemetry::init(&Settings {
        log_format: LogFormat::Text,
        log_filter: std::env::var_os("RUST_LOG")
            .is_none()
            .then(|| "warn".to_string()),
        otlp_endpoint: None,
        service_instance: None,
    });
    let code = match sagaflow_bench::run(cli.args).await {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {}", telemetry::error_chain(&e));
            ExitCode::FAILURE
        }
    };
    guard.shutdown().await;
    code
}
