//! The in-repo fuzzing driver: structure-aware generation plus byte-level mutation of the
//! corpus, on a seeded RNG (reproducible), for every decoder that takes bytes from outside.
//! See `tests/fuzz/README.md`.
//!
//! ```text
//! cargo run --release --example fuzz -- [--target NAME|all] [--iterations N] [--seed S]
//!                                       [--save-corpus] [--keep N] [--write-seeds] [--replay]
//!                                       [--kinds]
//! ```
//!
//! - `--iterations N`: inputs per target (default 100,000).
//! - `--save-corpus`: keep inputs that reach a new outcome kind under
//!   `tests/fuzz/corpus/<target>/gen-*` (at most `--keep` per target and run, default 50,
//!   each at most 4 KiB), and every crash as `crash-*`.
//! - `--write-seeds`: (re)write the hand-made seeds (`seed-*`) and exit.
//! - `--replay`: run the corpus only.
//! - `--kinds`: list the outcome kinds each target reached.
//!
//! Exits non-zero if any input panicked.

#[path = "../tests/fuzz/mod.rs"]
mod fuzz;

use std::process::ExitCode;
use std::time::Instant;

use fuzz::engine::{self, hex};
use fuzz::targets::{Target, TARGETS};

struct Options {
    targets: Vec<&'static Target>,
    iterations: u64,
    seed: u64,
    save: bool,
    keep: usize,
    write_seeds: bool,
    replay: bool,
    kinds: bool,
}

fn usage() -> String {
    let names: Vec<&str> = TARGETS.iter().map(|t| t.name).collect();
    format!(
        "usage: fuzz [--target NAME|all] [--iterations N] [--seed S] [--save-corpus] [--keep N] \
         [--write-seeds] [--replay] [--kinds]\ntargets: {}",
        names.join(", ")
    )
}

fn options() -> Result<Options, String> {
    let mut o = Options {
        targets: TARGETS.iter().collect(),
        iterations: 100_000,
        seed: 1,
        save: false,
        keep: 50,
        write_seeds: false,
        replay: false,
        kinds: false,
    };
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        let mut value = |what: &str| args.next().ok_or_else(|| format!("{what} needs a value"));
        match arg.as_str() {
            "--target" => {
                let name = value("--target")?;
                o.targets = if name == "all" {
                    TARGETS.iter().collect()
                } else {
                    name.split(',')
                        .map(|n| fuzz::targets::target(n).ok_or_else(|| format!("no target `{n}`")))
                        .collect::<Result<_, _>>()?
                };
            }
            "--iterations" => {
                o.iterations = value("--iterations")?
                    .replace('_', "")
                    .parse()
                    .map_err(|e| format!("--iterations: {e}"))?
            }
            "--seed" => {
                o.seed = value("--seed")?
                    .parse()
                    .map_err(|e| format!("--seed: {e}"))?
            }
            "--keep" => {
                o.keep = value("--keep")?
                    .parse()
                    .map_err(|e| format!("--keep: {e}"))?
            }
            "--save-corpus" => o.save = true,
            "--write-seeds" => o.write_seeds = true,
            "--replay" => o.replay = true,
            "--kinds" => o.kinds = true,
            "-h" | "--help" => return Err(usage()),
            other => return Err(format!("unknown argument `{other}`\n{}", usage())),
        }
    }
    Ok(o)
}

/// Whether this build checks integer overflow (a release build does not unless asked).
fn overflow_checks() -> bool {
    let quiet = std::panic::take_hook();
    std::panic::set_hook(Box::new(|_| {}));
    let x = std::hint::black_box(u8::MAX);
    let checked =
        std::panic::catch_unwind(|| std::hint::black_box(x) + std::hint::black_box(1)).is_err();
    std::panic::set_hook(quiet);
    checked
}

fn write(target: &str, name: &str, bytes: &[u8]) {
    let dir = engine::corpus_dir(target);
    let result = std::fs::create_dir_all(&dir).and_then(|()| std::fs::write(dir.join(name), bytes));
    if let Err(e) = result {
        eprintln!("cannot write {}/{name}: {e}", dir.display());
    }
}

fn main() -> ExitCode {
    let o = match options() {
        Ok(o) => o,
        Err(e) => {
            eprintln!("{e}");
            return ExitCode::from(2);
        }
    };
    if o.write_seeds {
        let seeds = fuzz::seeds::seeds();
        for (target, name, bytes) in &seeds {
            write(target, &format!("seed-{name}"), bytes);
        }
        println!("wrote {} seeds", seeds.len());
        return ExitCode::SUCCESS;
    }
    // The panic hook prints nothing for caught panics; overflow is a panic only if checked.
    let checks = overflow_checks();
    println!(
        "seed {}, {} inputs per target, overflow checks {}",
        o.seed,
        if o.replay { 0 } else { o.iterations },
        if checks {
            "on"
        } else {
            "OFF (add --config profile.release.overflow-checks=true)"
        }
    );
    println!(
        "{:<11} {:>12} {:>7} {:>11} {:>6} {:>6} {:>8}",
        "target", "inputs", "panics", "inputs/s", "kinds", "kept", "seconds"
    );
    let mut total_inputs = 0;
    let mut total_panics = 0;
    for target in &o.targets {
        let corpus = engine::read_corpus(target.name);
        let mut replay_panics = 0;
        for (name, bytes) in &corpus {
            if let Err(crash) = engine::run_catching(target, bytes) {
                replay_panics += 1;
                println!("  {}/{name}: {crash}", target.name);
            }
        }
        let mut pool: Vec<Vec<u8>> = corpus.into_iter().map(|(_, b)| b).collect();
        let iterations = if o.replay { 0 } else { o.iterations };
        let name = target.name;
        let started = Instant::now();
        let stats = engine::campaign(target, o.seed, iterations, &mut pool, o.keep, |s| {
            eprintln!(
                "  … {name}: {} inputs, {} panics, {:.0}/s",
                s.inputs,
                s.panics,
                s.inputs as f64 / s.elapsed.as_secs_f64().max(1e-9)
            );
        });
        let secs = started.elapsed().as_secs_f64();
        println!(
            "{:<11} {:>12} {:>7} {:>11.0} {:>6} {:>6} {:>8.1}",
            target.name,
            stats.inputs,
            stats.panics + replay_panics,
            stats.inputs as f64 / stats.elapsed.as_secs_f64().max(1e-9),
            stats.kinds.len(),
            stats.kept.len(),
            secs
        );
        if o.kinds {
            let mut kinds: Vec<&String> = stats.kinds.iter().collect();
            kinds.sort();
            for kind in kinds {
                println!("  kind {kind}");
            }
        }
        total_inputs += stats.inputs;
        total_panics += stats.panics + replay_panics;
        for (crash, input) in &stats.crashes {
            println!("  PANIC {crash}");
            println!("  minimized input ({} bytes): {}", input.len(), hex(input));
            if o.save {
                let id = sagaflow_actors::hash::fnv1a(crash.location.as_bytes());
                write(target.name, &format!("crash-{id:016x}"), input);
            }
        }
        if o.save {
            for (kind, input) in &stats.kept {
                let id = sagaflow_actors::hash::fnv1a(kind.as_bytes());
                write(target.name, &format!("gen-{id:016x}"), input);
            }
        }
    }
    println!("total: {total_inputs} inputs, {total_panics} panics");
    if total_panics > 0 {
        ExitCode::FAILURE
    } else {
        ExitCode::SUCCESS
    }
}
