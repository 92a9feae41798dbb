//! Generates the gRPC code for `proto/api.proto` and `proto/daemon.proto` with a protoc that
//! ships in a crate, so a build needs nothing but the Rust toolchain. Client and server stubs
//! follow this crate's features.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let protoc = protoc_bin_vendored::protoc_bin_path()?;
    let out = std::path::PathBuf::from(std::env::var_os("OUT_DIR").ok_or("OUT_DIR is not set")?);
    let descriptors = out.join("descriptors.bin");
    let mut config = tonic_prost_build::Config::new();
    config.protoc_executable(protoc);
    config.file_descriptor_set_path(&descriptors);
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
    let set = {
        use prost::Message;
        prost_types::FileDescriptorSet::decode(std::fs::read(&descriptors)?.as_slice())?
    };
    write_methods(&set, &out.join("methods.rs"))?;
    write_directions(&set, &out.join("directions.rs"))?;
    println!("cargo:rerun-if-changed=../../proto/api.proto");
    println!("cargo:rerun-if-changed=../../proto/daemon.proto");
    Ok(())
}

/// Writes `METHODS`, the path of every RPC the protos define (`/types.API/State`), so that
/// berthd can tell the methods it serves from any path a client makes up.
fn write_methods(
    set: &prost_types::FileDescriptorSet,
    to: &std::path::Path,
) -> Result<(), Box<dyn std::error::Error>> {
    let mut code =
        String::from("/// The path of every RPC in `proto/`.\npub const METHODS: &[&str] = &[\n");
    for (package, service, method) in rpcs(set) {
        code.push_str(&format!(
            "    \"/{package}.{}/{}\",\n",
            service.name(),
            method.name()
        ));
    }
    code.push_str("];\n");
    std::fs::write(to, code)?;
    Ok(())
}

/// Writes an `impl Direction` for every message an RPC takes or returns, so that the codec can
/// tell a request that does not decode (the client's fault) from a response that does not.
fn write_directions(
    set: &prost_types::FileDescriptorSet,
    to: &std::path::Path,
) -> Result<(), Box<dyn std::error::Error>> {
    // The proto's own name: prost keeps a name that is already UpperCamelCase, as all of this
    // API's are; one it would rename fails to compile here rather than mapping wrongly.
    let rust_path = |proto: &str| -> Result<String, Box<dyn std::error::Error>> {
        let (module, name) = match proto.rsplit_once('.') {
            Some((".types", name)) => ("proto", name),
            Some((".berth.daemon", name)) => ("daemon_proto", name),
            _ => {
                return Err(
                    format!("{proto}: a message of a package berth-api does not know").into(),
                );
            }
        };
        Ok(format!("crate::{module}::{name}"))
    };
    let mut directions = std::collections::BTreeMap::new();
    for (_, _, method) in rpcs(set) {
        for (message, is_request) in [(method.input_type(), true), (method.output_type(), false)] {
            if directions.insert(rust_path(message)?, is_request) == Some(!is_request) {
                return Err(format!("{message} is both a request and a response").into());
            }
        }
    }
    let mut code = String::new();
    for (message, is_request) in directions {
        code.push_str(&format!(
            "impl crate::codec::Direction for {message} {{\n    const IS_REQUEST: bool = {is_request};\n}}\n"
        ));
    }
    std::fs::write(to, code)?;
    Ok(())
}

/// Every RPC the protos define, with its package and service.
fn rpcs(
    set: &prost_types::FileDescriptorSet,
) -> impl Iterator<
    Item = (
        &str,
        &prost_types::ServiceDescriptorProto,
        &prost_types::MethodDescriptorProto,
    ),
> {
    set.file.iter().flat_map(|file| {
        file.service.iter().flat_map(move |service| {
            service
                .method
                .iter()
                .map(move |method| (file.package(), service, method))
        })
    })
}
