//! berth: the daemon as a library. `berthd` (src/bin/berthd.rs) does the work that must come
//! before any thread exists and then calls [`daemon::run`]; everything else lives here.
//!
//! Unsafe code is denied everywhere but in the few modules whose `mod` line allows it.
#![deny(unsafe_code)]

/// With the `mimalloc` feature every binary of the crate allocates with mimalloc.
#[cfg(feature = "mimalloc")]
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

pub mod api;
pub mod config;
pub mod daemon;
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
#[allow(unsafe_code)]
pub mod upgrade;

pub use berth_api::{daemon_proto, proto};
