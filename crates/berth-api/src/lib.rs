//! berth's wire contract as Rust types, generated from `proto/` by `build.rs`, and (with the
//! `client` feature) the client that dials berthd's unix socket.
//!
//! Owns: the generated messages, the client stubs and (with `server`) the service traits.
//! Does not own: any behaviour; berthd implements the traits, the CLI and load client call them.

#![deny(unsafe_code)]

#[cfg(feature = "client")]
pub mod client;
mod codec;
mod maps;

pub use codec::SmallBufferCodec;

include!(concat!(env!("OUT_DIR"), "/methods.rs"));

/// Code generated from `proto/api.proto` (package `types`, service `API`).
pub mod proto {
    tonic::include_proto!("types");
    pub use crate::maps::{CgroupStats, MemoryStats};
}

/// Code generated from `proto/daemon.proto`: berthd's own administration service.
pub mod daemon_proto {
    tonic::include_proto!("berth.daemon");
}
