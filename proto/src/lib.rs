//! Sagaflow's protobuf contracts, generated at build time from `sagaflow/v1/*.proto`, and the
//! naming rules of the wire protocol that every side (node, participant SDK) shares.
//!
//! - `participant.proto`: the command/reply envelope any participant service speaks.
//! - `events.proto`: lifecycle events for systems outside the saga.
//! - `sagas.proto`, `orders.proto`, `analytics.proto`, `admin.proto`: the gRPC API (its
//!   clients and servers only with the `grpc` feature, on by default).
//! - [`ids`]: the rules every id from outside passes before it is used.
//! - [`hash`]: stable hashing (saga id → partition).
//! - [`subjects`]: stream names, subjects and the ids derived from a saga's step.

pub mod hash;
pub mod ids;
pub mod subjects;

/// `sagaflow.v1`.
#[allow(missing_docs, clippy::all, clippy::pedantic, unreachable_pub)]
pub mod v1 {
    include!(concat!(env!("OUT_DIR"), "/sagaflow.v1.rs"));
}

/// Encoded `FileDescriptorSet` of every proto file, for gRPC reflection.
pub const FILE_DESCRIPTOR_SET: &[u8] =
    include_bytes!(concat!(env!("OUT_DIR"), "/sagaflow_descriptor.bin"));
