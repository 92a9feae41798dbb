#![deny(unsafe_code)]

/// With the `mimalloc` feature every binary of the crate allocates with mimalloc.
#[cfg(feature = "mimalloc")]
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

pub mod api;
pub mod config;
pub mod error;
pub mod events;
pub mod load;
pub mod metrics;
pub mod reactor;
pub mod reaper;
pub mod runtime;
pub mod spawn;
pub mod stats;
pub mod store;
pub mod supervisor;
pub mod upgrade;

/// Code generated from `proto/api.proto` (package `types`, service `API`).
pub mod proto {
    tonic::include_proto!("types");
}

/// Code generated from `proto/daemon.proto`: berthd's own administration service.
pub mod daemon_proto {
    tonic::include_proto!("berth.daemon");
}
