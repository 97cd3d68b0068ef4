//! Generates the gRPC code from `proto/lockstep.proto` with protox (pure Rust), so building
//! lockstep never needs a hand-installed `protoc`.
fn main() -> Result<(), Box<dyn std::error::Error>> {
    println!("cargo:rerun-if-changed=proto/lockstep.proto");
    let fds = protox::compile(["proto/lockstep.proto"], ["proto"])?;
    tonic_prost_build::configure().compile_fds(fds)?;
    Ok(())
}
