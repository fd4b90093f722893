//! Compiles `proto/potluck.proto` in pure Rust (protox), so no system
//! `protoc` is needed.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    println!("cargo:rerun-if-changed=proto/potluck.proto");
    let fds = protox::compile(["potluck.proto"], ["proto"])?;
    tonic_prost_build::configure().compile_fds(fds)?;
    Ok(())
}
