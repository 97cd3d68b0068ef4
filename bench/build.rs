//! Generates the etcd v3 client stubs from `proto/etcd_kv.proto` with protox (pure Rust), so
//! building the benchmark never needs a hand-installed `protoc`.
fn main() -> Result<(), Box<dyn std::error::Error>> {
    println!("cargo:rerun-if-changed=proto/etcd_kv.proto");
    let fds = protox::compile(["proto/etcd_kv.proto"], ["proto"])?;
    tonic_prost_build::configure().build_server(false).compile_fds(fds)?;
    Ok(())
}
