//! # Sagaflow
//!
//! A saga orchestrator on NATS JetStream. This crate holds the outside world's side; the domain
//! (definitions, the pure state machine, the actors) is in `sagaflow-actors`.
//!
//! # Layout
//! The NATS adapters (the engine's ports over JetStream):
//! - [`topology`]: stream and bucket names, subjects, their idempotent creation.
//! - [`store`]: saga snapshots in the KV bucket (compare-and-set, index header, TTL).
//! - [`bus`]: commands and lifecycle events out.
//! - [`events`]: saga events in: decoding and checking each message.
//! - [`partition`]: consuming one partition; take-over scan; orphan sweep.
//! - [`index`]: unfinished sagas and the list index, from headers only.
//! - [`consume`]: the loop every durable pull consumer runs (the participant SDK's).
//! - [`definitions`]: saga definitions as live, versioned configuration (KV `sagaflow_definitions`).
//! - [`dlq`], [`advisories`]: dead letters, and commands that exhausted their deliveries.
//! - [`cluster`]: membership, heartbeats, partition leases; [`fence`], [`clock`].
//!
//! The node:
//! - [`config`]: node configuration, layered defaults → file → env → CLI.
//! - [`node`]: one node: NATS connection, topology, coordinators, demo services, gRPC.
//! - [`api`]: the core of every API call ([`api::SagaApi`], failing with [`api::ApiError`]).
//! - [`auth`]: tokens, roles and the layer that checks every call; [`tls`]: the API's TLS; [`reload`]: files read
//!   again on `SIGHUP` or change.
//! - [`grpc`], [`http`]: the API edges, which only translate; [`admission`]: refusing sagas
//!   when overloaded.
//! - [`console`]: the web console on the HTTP endpoint (`/ui`), over the gRPC services in-process.
//! - [`metrics`], [`telemetry`]: Prometheus metrics; logs and traces.
//! - [`demo`]: the demo participant services, on the participant SDK (`sagaflow-participant`).
//!
//! The binaries' side:
//! - [`cli`]: the command line; a gRPC client for everything but `node`, `dev` and `saga validate`.
//! - [`client`]: what the CLI and `sagaflow-bench` share as clients (node address, `--json`).
//! - [`dev`]: `sagaflow dev`, a local NATS + node + demo in one command (its `nats-server`
//!   processes come from the `sagaflow-devkit` crate).
//!
//! The bench is its own crate and binary (`bench/`, `sagaflow-bench`), so the node binary links
//! neither its plotting nor its progress bar.

pub mod admission;
pub mod advisories;
pub mod api;
pub mod auth;
pub mod bus;
pub mod cli;
pub mod client;
pub mod clock;
pub mod cluster;
pub mod config;
pub mod console;
pub mod consume;
pub mod definitions;
pub mod demo;
pub mod dev;
pub mod dlq;
pub mod events;
pub mod fence;
pub mod grpc;
pub mod http;
pub mod index;
pub mod metrics;
pub mod node;
pub mod partition;
pub mod reload;
pub mod store;
pub mod telemetry;
pub mod tls;
pub mod topology;

/// The layers of this crate, lowest first. A module may use modules of its own layer or below,
/// never above, and no two modules may use each other (directly or around a circle).
/// `docs/architecture.md` draws them.
pub const LAYERS: &[(&str, &[&str])] = &[
    (
        "base",
        &[
            "clock",
            "client",
            "config",
            "consume",
            "reload",
            "telemetry",
        ],
    ),
    (
        "NATS adapters",
        &[
            "topology",
            "definitions",
            "store",
            "index",
            "bus",
            "events",
            "dlq",
            "advisories",
            "fence",
            "admission",
            "partition",
            "cluster",
        ],
    ),
    (
        "node",
        &[
            "metrics", "api", "auth", "tls", "http", "grpc", "console", "demo", "node",
        ],
    ),
    ("binaries", &["cli", "dev"]),
];

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod layers {
    use std::collections::{BTreeMap, BTreeSet};
    use std::path::Path;

    use super::LAYERS;

    /// `crate::<module>` paths used by the code (not comments, not test modules) of each
    /// top-level module of `src/`.
    fn imports() -> BTreeMap<String, BTreeSet<String>> {
        fn walk(dir: &Path, out: &mut Vec<std::path::PathBuf>) {
            for entry in std::fs::read_dir(dir).unwrap() {
                let path = entry.unwrap().path();
                if path.is_dir() {
                    walk(&path, out);
                } else if path.extension().is_some_and(|e| e == "rs") {
                    out.push(path);
                }
            }
        }
        let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
        let mut files = Vec::new();
        walk(&src, &mut files);
        let mut graph: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
        for file in files {
            let rel = file.strip_prefix(&src).unwrap().with_extension("");
            let module = rel
                .components()
                .next()
                .unwrap()
                .as_os_str()
                .to_string_lossy()
                .to_string();
            if module == "main" || module == "lib" {
                continue;
            }
            let text = std::fs::read_to_string(&file).unwrap();
            let code = text.split("#[cfg(test)]").next().unwrap_or("");
            let uses = graph.entry(module.clone()).or_default();
            for line in code.lines().filter(|l| !l.trim_start().starts_with("//")) {
                for (i, _) in line.match_indices("crate::") {
                    let name: String = line[i + 7..]
                        .chars()
                        .take_while(|c| c.is_ascii_lowercase() || *c == '_')
                        .collect();
                    if !name.is_empty() && name != module {
                        uses.insert(name);
                    }
                }
            }
        }
        graph
    }

    #[test]
    fn every_module_has_a_layer_and_no_arrow_points_up_or_around_a_circle() {
        let layer_of: BTreeMap<&str, usize> = LAYERS
            .iter()
            .enumerate()
            .flat_map(|(i, (_, mods))| mods.iter().map(move |m| (*m, i)))
            .collect();
        let graph = imports();
        for module in graph.keys() {
            assert!(
                layer_of.contains_key(module.as_str()),
                "src/{module} is in no layer: add it to LAYERS in src/lib.rs"
            );
        }
        for (module, uses) in &graph {
            for used in uses {
                let (from, to) = (layer_of[module.as_str()], layer_of[used.as_str()]);
                assert!(
                    to <= from,
                    "{module} ({}) uses {used} ({}), a layer above it",
                    LAYERS[from].0,
                    LAYERS[to].0
                );
            }
        }
        // No circle: repeatedly remove modules that use nothing left.
        let mut left: BTreeMap<&str, BTreeSet<&str>> = graph
            .iter()
            .map(|(m, u)| (m.as_str(), u.iter().map(String::as_str).collect()))
            .collect();
        loop {
            let free: Vec<&str> = left
                .iter()
                .filter(|(_, u)| u.iter().all(|d| !left.contains_key(d)))
                .map(|(m, _)| *m)
                .collect();
            if free.is_empty() {
                break;
            }
            for m in free {
                left.remove(m);
            }
        }
        assert!(left.is_empty(), "modules that use each other: {left:?}");
    }
}
