//! berthd as a library: everything the daemon does, so `src/bin/berthd.rs` only does the work
//! that must happen before threads exist and then calls [`daemon::run`].
//!
//! How a request flows, top to bottom (imports run the same way, never back up):
//!
//! - [`api`]: the tonic services. Convert wire messages, call the supervisor, convert back.
//! - [`supervisor`]: the registry of containers and every operation on them (create, exec,
//!   signal, update, checkpoint, recovery at start), each undone by its own guard on failure.
//! - below it, each knowing nothing of the supervisor:
//!   - [`runtime`]: typed runtime operations turned into argv, run through the [`runtime::Spawner`]
//!     trait; [`spawn`] implements it with the helper forked before the daemon grew.
//!   - [`reaper`]: a pidfd per process in the reactor, exit statuses, orphans.
//!   - [`stats`]: the io_uring sampler and the shared snapshots GetStats streams; OOM watches.
//!   - [`events`]: the bounded event bus. [`store`]: the state files.
//! - leaves: [`model`] (records shared by several modules), [`procfs`], [`wait_status`] (the one
//!   decoder of wait statuses), [`error`] (the one `Error` and its mapping to gRPC codes).
//!
//! Around them: [`config`] (flags), [`fd_limit`] (raising the open file limit, and the share of
//! it connections and held namespaces may each take), [`daemon`] (wiring and the serve/upgrade
//! loop), [`edge`]
//! (the `:authority` rewrite on each accepted connection), [`listener`] (accepting connections
//! within limits; each connection's socket registered for reading only), [`metrics`] (the
//! Prometheus endpoint; [`instruments`] the RPC and runtime timings it shows,
//! `container_metrics` the per-container series), [`upgrade`] (the listener across `execve`, and
//! from socket activation), [`notify`] (readiness for the service manager), [`reactor`]
//! (registering owned fds with tokio), [`heap`] (handing memory freed by ended connections and
//! streams back to the kernel).
//!
//! Unsafe code is denied crate-wide; the modules allowed it are named on their `mod` lines below.
#![deny(unsafe_code)]

/// With the `mimalloc` feature berthd allocates with mimalloc.
#[cfg(feature = "mimalloc")]
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

mod api;
mod client_fs;
pub mod config;
mod container_metrics;
pub mod daemon;
pub mod edge;
pub mod error;
mod events;
pub mod fd_limit;
mod hand_back;
#[allow(unsafe_code)]
mod heap;
pub mod instruments;
mod listener;
mod metrics;
mod model;
pub mod notify;
mod procfs;
#[allow(unsafe_code)]
mod reactor;
mod reaper;
pub mod runtime;
pub mod spawn;
pub mod stats;
mod store;
mod supervisor;
#[allow(unsafe_code)]
pub mod upgrade;
mod wait_status;

pub use berth_api::{daemon_proto, proto};
