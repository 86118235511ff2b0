//! Compiles `sagaflow/v1/*.proto` with `protox` (pure Rust), so no `protoc` is needed on the machine.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let files = [
        "sagaflow/v1/participant.proto",
        "sagaflow/v1/events.proto",
        "sagaflow/v1/sagas.proto",
        "sagaflow/v1/orders.proto",
        "sagaflow/v1/analytics.proto",
        "sagaflow/v1/admin.proto",
        "sagaflow/v1/definitions.proto",
    ];
    for f in files {
        println!("cargo:rerun-if-changed={f}");
    }
    let fds = protox::compile(files, ["."])?;
    let out = std::path::PathBuf::from(std::env::var("OUT_DIR")?);
    // For gRPC reflection: protox already built the descriptors, so write them ourselves.
    std::fs::write(
        out.join("sagaflow_descriptor.bin"),
        prost::Message::encode_to_vec(&fds),
    )?;
    // Without the `grpc` feature only the messages are generated (no tonic clients or servers).
    let grpc = std::env::var_os("CARGO_FEATURE_GRPC").is_some();
    tonic_prost_build::configure()
        .build_client(grpc)
        .build_server(grpc)
        .compile_fds(fds)?;
    Ok(())
}
