//! # Sagaflow
//!
//! A saga orchestrator on NATS JetStream. This crate holds the outside world's side; the domain
//! (definitions, the pure state machine, the actors) is in `sagaflow-actors`.
//!
//! # Layout
//! - [`config`]: node configuration, layered defaults → file → env → CLI.
//! - [`node`]: one node: NATS connection, topology, coordinators, demo services, gRPC.
//! - [`dev`]: `sagaflow dev`, a local NATS + node + demo in one command.
//! - [`bench`](mod@bench): `sagaflow bench`, sagas per second and latency against the bare JetStream pattern.
//! - [`nats_server`]: finding, starting and stopping `nats-server` processes (dev and tests).
//! - [`cli`]: the command line; a gRPC client for everything but `node`, `dev` and `saga validate`.

pub mod admission;
pub mod advisories;
pub mod bench;
pub mod bus;
pub mod cli;
pub mod clock;
pub mod cluster;
pub mod config;
pub mod consume;
pub mod demo;
pub mod dev;
pub mod dlq;
pub mod events;
pub mod fence;
pub mod grpc;
pub mod http;
pub mod index;
pub mod metrics;
pub mod nats_server;
pub mod node;
pub mod participant;
pub mod store;
pub mod telemetry;
pub mod topology;
