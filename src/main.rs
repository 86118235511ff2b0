//! The `sagaflow` binary: parse the command line, initialise tracing, run, exit.
//! Everything else lives in [`sagaflow::cli`].

use std::process::ExitCode;

use clap::Parser;
use sagaflow::cli::{self, Cli};

/// mimalloc rather than glibc's malloc: measurably less CPU per saga (docs/benchmarks.md).
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[tokio::main]
async fn main() -> ExitCode {
    // Usage errors print clap's message and exit 2; `--help` and `--version` exit 0.
    let cli = Cli::parse();
    let plan = match cli.plan() {
        Ok(plan) => plan,
        Err(e) => return cli::report(&e),
    };
    let telemetry = cli::init_tracing(&plan.telemetry());
    let code = match plan.run().await {
        Ok(code) => code,
        Err(e) => cli::report(&e),
    };
    // Export the last spans (bounded: an unreachable collector does not hold the exit).
    telemetry.shutdown().await;
    code
}
