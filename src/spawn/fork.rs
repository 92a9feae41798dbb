//! Forking the spawn helper while berthd is still single-threaded.
#![allow(unsafe_code)]

use std::io;
use std::os::fd::OwnedFd;

/// Forks; the child serves spawn requests on `helper_end` and never returns.
///
/// Must be called before any thread is started (before the tokio runtime is built).
pub fn fork_helper(berthd_end: OwnedFd, helper_end: OwnedFd) -> io::Result<OwnedFd> {
    // SAFETY: berthd calls this from main before it starts any thread, so the child is a copy of
    // a single-threaded process and may run ordinary Rust code (allocation, locks) after fork.
    match unsafe { nix::unistd::fork() }.map_err(io::Error::from)? {
        nix::unistd::ForkResult::Child => {
            drop(berthd_end);
            super::helper::serve(helper_end)
        }
        nix::unistd::ForkResult::Parent { .. } => {
            drop(helper_end);
            Ok(berthd_end)
        }
    }
}
