//! Forking: the spawn helper from berthd while berthd is still single-threaded, and the
//! helper's child for each built-in runtime call.
//!
//! Owns: the `fork`s, what each side keeps of the socketpair, the built-in child's stdio,
//! descriptors and signals. Does not own: what the helper does once forked (helper),
//! restarting it later (by re-exec, in the parent module), or the built-in runtime's calls
//! (builtin).

use std::io;
use std::os::fd::{AsRawFd, OwnedFd};

use crate::runtime::builtin::BuiltinCall;

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

/// Forks, in the single-threaded helper, a child that takes `stdio` as its fds 0, 1 and 2, closes
/// every other descriptor, carries out `call` with the built-in runtime and exits (0 on success).
/// The child leads a process group of its own, as exec'd commands do, so a timeout kills it and
/// what it started. Returns the child's pid.
pub(super) fn fork_builtin(
    call: &BuiltinCall,
    stdio: [OwnedFd; 3],
) -> io::Result<rustix::process::Pid> {
    // SAFETY: only the helper calls this, and the helper is single-threaded (forked before
    // berthd's threads exist, or exec'd afresh), so the child may run ordinary Rust code.
    match unsafe { nix::unistd::fork() }.map_err(io::Error::from)? {
        nix::unistd::ForkResult::Parent { child } => rustix::process::Pid::from_raw(child.as_raw())
            .ok_or_else(|| io::Error::other("fork returned pid 0 to the parent")),
        nix::unistd::ForkResult::Child => {
            let _ = rustix::process::setpgid(None, None);
            for (target, fd) in stdio.iter().enumerate() {
                // SAFETY: dup2 onto 0, 1 and 2 replaces only the child's standard streams with
                // descriptors it owns; nothing else in this process refers to those numbers.
                if unsafe { libc::dup2(fd.as_raw_fd(), target as i32) } < 0 {
                    std::process::exit(1);
                }
            }
            // The originals are closed with every other inherited descriptor just below; their
            // owners must not close those numbers again once libcontainer reuses them.
            std::mem::forget(stdio);
            // SAFETY: close_range on 3.. closes descriptors this child inherited (the helper's
            // socket, other requests' pipes and pidfds) and that nothing in it uses any more;
            // the container's processes must not hold them.
            unsafe { libc::syscall(libc::SYS_close_range, 3u32, u32::MAX, 0u32) };
            // The helper runs with SIGPIPE ignored (Rust's default) and libcontainer execs the
            // container's process without resetting it, as an exec'd runtime's start would.
            // SAFETY: restoring the default disposition of one signal in this single thread.
            unsafe { libc::signal(libc::SIGPIPE, libc::SIG_DFL) };
            let ok = super::builtin::run(call);
            std::process::exit(if ok { 0 } else { 1 })
        }
    }
}
