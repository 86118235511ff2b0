//! # sagaflow-devkit
//!
//! What `sagaflow dev`, `sagaflow-bench` and the tests share to run Sagaflow on one machine:
//! real `nats-server` processes on loopback ports, never a mock of NATS.
//!
//! # Layout
//! - [`nats_server`]: finding the pinned `nats-server` binary (≥ 2.11), starting one server or
//!   an n-node JetStream cluster on free loopback ports, restarting, pausing and stopping them.
//!
//! It depends on no other Sagaflow crate, so anything may use it.

pub mod nats_server;
