//! Sagaflow's protobuf contracts, generated at build time from `sagaflow/v1/*.proto`.
//!
//! - `participant.proto`: the command/reply envelope any participant service speaks.
//! - `events.proto`: lifecycle events for systems outside the saga.
//! - `sagas.proto`, `orders.proto`, `analytics.proto`: the gRPC API.

/// `sagaflow.v1`.
#[allow(missing_docs, clippy::all, clippy::pedantic, unreachable_pub)]
pub mod v1 {
    tonic::include_proto!("sagaflow.v1");
}

/// Encoded `FileDescriptorSet` of every proto file, for gRPC reflection.
pub const FILE_DESCRIPTOR_SET: &[u8] = tonic::include_file_descriptor_set!("sagaflow_descriptor");
