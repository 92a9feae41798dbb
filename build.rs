//! Generates the gRPC code for `proto/api.proto` with a protoc that ships in a crate,
//! so a build needs nothing but the Rust toolchain.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let protoc = protoc_bin_vendored::protoc_bin_path()?;
    let mut config = tonic_prost_build::Config::new();
    config.protoc_executable(protoc);
    tonic_prost_build::configure().compile_with_config(
        config,
        &["proto/api.proto", "proto/daemon.proto"],
        &["proto"],
    )?;
    println!("cargo:rerun-if-changed=proto/api.proto");
    println!("cargo:rerun-if-changed=proto/daemon.proto");
    Ok(())
}
