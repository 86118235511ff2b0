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
//! - [`consume`]: the loop every durable pull consumer runs.
//! - [`dlq`], [`advisories`]: dead letters, and commands that exhausted their deliveries.
//! - [`cluster`]: membership, heartbeats, partition leases; [`fence`], [`clock`].
//! - [`participant`]: hosting participant services (consumer groups).
//!
//! The node:
//! - [`config`]: node configuration, layered defaults → file → env → CLI.
//! - [`node`]: one node: NATS connection, topology, coordinators, demo services, gRPC.
//! - [`grpc`], [`http`]: the API edges; [`admission`]: refusing sagas when overloaded.
//! - [`metrics`], [`telemetry`]: Prometheus metrics; logs and traces.
//! - [`demo`]: the demo participant services.
//!
//! The binaries' side:
//! - [`cli`]: the command line; a gRPC client for everything but `node`, `dev` and `saga validate`.
//! - [`dev`]: `sagaflow dev`, a local NATS + node + demo in one command.
//! - [`bench`](mod@bench): `sagaflow bench`, sagas per second and latency against the bare JetStream pattern.
//! - [`nats_server`]: finding, starting and stopping `nats-server` processes (dev, bench and tests).

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
pub mod partition;
pub mod store;
pub mod telemetry;
pub mod topology;
