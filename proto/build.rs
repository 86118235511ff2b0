//! Compiles `sagaflow/v1/*.proto` with `protox` (pure Rust), so no `protoc` is needed on the machine.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let files = [
        "sagaflow/v1/participant.proto",
        "sagaflow/v1/events.proto",
        "sagaflow/v1/sagas.proto",
        "sagaflow/v1/orders.proto",
        "sagaflow/v1/analytics.proto",
        "sagaflow/v1/admin.proto",
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
    tonic_prost_build::configure().compile_fds(fds)?;
    Ok(())
}
