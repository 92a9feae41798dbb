#![deny(unsafe_code)]

/// With the `mimalloc` feature every binary of the crate allocates with mimalloc.
#[cfg(feature = "mimalloc")]
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

pub mod api;
pub mod client_fs;
pub mod config;
pub mod error;
pub mod events;
pub mod metrics;
pub mod reactor;
pub mod reaper;
pub mod runtime;
pub mod spawn;
pub mod stats;
pub mod store;
pub mod supervisor;
pub mod upgrade;

pub use berth_api::{daemon_proto, proto};
