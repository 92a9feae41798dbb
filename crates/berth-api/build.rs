//! Generates the gRPC code for `proto/api.proto` and `proto/daemon.proto` with a protoc that
//! ships in a crate, so a build needs nothing but the Rust toolchain. Client and server stubs
//! follow this crate's features.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let protoc = protoc_bin_vendored::protoc_bin_path()?;
    let mut config = tonic_prost_build::Config::new();
    config.protoc_executable(protoc);
    tonic_prost_build::configure()
        .build_client(std::env::var_os("CARGO_FEATURE_CLIENT").is_some())
        .build_server(std::env::var_os("CARGO_FEATURE_SERVER").is_some())
        // Hand-written so that every map entry carries its key and value (src/maps.rs).
        .extern_path(".types.MemoryStats", "crate::maps::MemoryStats")
        .extern_path(".types.CgroupStats", "crate::maps::CgroupStats")
        // Each response's encode buffer lasts as long as the response: a small one (src/codec.rs).
        .codec_path("crate::SmallBufferCodec")
        .compile_with_config(
            config,
            &["../../proto/api.proto", "../../proto/daemon.proto"],
            &["../../proto"],
        )?;
    println!("cargo:rerun-if-changed=../../proto/api.proto");
    println!("cargo:rerun-if-changed=../../proto/daemon.proto");
    Ok(())
}
