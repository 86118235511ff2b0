//! Sagaflow's integration tests, in one binary: the crate graph is linked once, and the tests
//! share one harness ([`common`]): real `nats-server` processes on free loopback ports,
//! in-process nodes ([`common::TestNode`]) or `sagaflow node` child processes, bounded waits.
//!
//! Run one area with a filter, e.g. `cargo test --test integration orders::`.
//!
//! Three kinds of test keep binaries of their own: `tests/chaos.rs` (a 3-node NATS cluster and
//! node kills, alone on the machine), `tests/tracing.rs` (it installs the process's one
//! global tracing subscriber) and `tests/console.rs` (the web console in a headless browser).
#![allow(clippy::unwrap_used, clippy::expect_used)]

#[path = "../common/mod.rs"]
mod common;
#[path = "../fuzz/mod.rs"]
mod fuzz;
#[path = "../common/promql.rs"]
mod promql;

mod auth;
mod cli;
mod cluster;
mod cluster_cli;
mod console;
mod custom_saga;
mod dashboards;
mod definitions;
mod demo_services;
mod dlq;
mod fuzz_corpus;
mod harness_smoke;
mod hostile;
mod max_deliver;
mod metrics;
mod nats_auth;
mod nats_permissions;
mod operations;
mod orders;
mod python_participant;
mod retention;
mod signals;
mod stray_replies;
mod tls;
