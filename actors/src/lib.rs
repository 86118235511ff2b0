//! # sagaflow-actors: the domain
//!
//! Everything Sagaflow knows about sagas, with no network and no environment:
//!
//! - [`catalog`]: every known version of each saga definition, and the active one.
//! - [`definition`]: saga definitions loaded from `sagas/*.toml`, validated into a model that
//!   cannot be invalid.
//! - [`machine`]: the pure saga state machine, `(state, event, now) -> (state, effects)`.
//! - [`wire`]: versioned postcard envelopes for everything stored or sent.
//! - [`coordinator`]: the ractor actors hosting the machine: the coordinator routes events and
//!   supervises, one saga actor (`coordinator/saga.rs`) per live saga drives it.
//! - [`service`]: the backoff of supervised restarts.
//! - [`ports`]: the small traits through which the actors reach the outside (event log, command
//!   bus, state store), implemented over NATS JetStream by the `sagaflow` crate.
//! - [`ids`]: the rules every id from outside passes before it is used (from `sagaflow-proto`,
//!   the wire contract).
//! - [`cluster`]: the cluster's pure logic: which node owns which partition, lease steps.
//! - [`hash`] (from `sagaflow-proto`), [`duration`]: stable hashing, human durations.

pub use sagaflow_proto::{hash, ids};

pub mod catalog;
pub mod cluster;
pub mod coordinator;
pub mod definition;
pub mod duration;
pub mod machine;
pub mod ports;
pub mod service;
pub mod wire;
