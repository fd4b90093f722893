//! Compiles our etcd v3 subset (`proto/etcd.proto`) in pure Rust (protox),
//! so no system `protoc` is needed. Client stubs only.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    println!("cargo:rerun-if-changed=proto/etcd.proto");
    let fds = protox::compile(["etcd.proto"], ["proto"])?;
    tonic_prost_build::configure().build_server(false).compile_fds(fds)?;
    Ok(())
}
