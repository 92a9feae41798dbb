//! Forking the spawn helper while berthd is still single-threaded.
//!
//! Owns: the `fork` and what each side keeps of the socketpair. Does not own: what the helper
//! does once forked (helper) or restarting it later (by re-exec, in the parent module).

use std::io;
use std::os::fd::OwnedFd;

/// Forks the helper, which serves spawn requests on its end of a new socketpair and never
/// returns; returns berthd's end.
///
/// # Safety
///
/// Call before any other thread exists (before the tokio runtime is built): the child is a copy
/// of the calling process and runs ordinary Rust code (allocation, locks) after the fork, which
/// is sound only if no other thread could have held a lock at that instant.
pub unsafe fn fork_helper() -> io::Result<OwnedFd> {
    let (berthd_end, helper_end) = super::socketpair()?;
    // SAFETY: the caller guarantees this process is single-threaded, so the child may run
    // ordinary Rust code after the fork.
    match unsafe { nix::unistd::fork() }.map_err(io::Error::from)? {
        nix::unistd::ForkResult::Child => {
            drop(berthd_end);
            crate::upgrade::close_handed_in_child();
            super::helper::serve(helper_end)
        }
        nix::unistd::ForkResult::Parent { .. } => {
            drop(helper_end);
            Ok(berthd_end)
        }
    }
}
