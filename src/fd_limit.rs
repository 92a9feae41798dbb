//! berthd's open file limit: raised as far as it may go at start, and the share of it one kind
//! of fd that berthd could hold without end may take, so the rest stays for containers.
//!
//! Owns: raising the limit, and the share ([`quarter`]) that API connections (listener) and the
//! inits' held namespaces (supervisor::exit) are each capped at. Does not own: what holds fds.

/// Dense hosts need several fds per container. The ceiling is the kernel's `fs/nr_open`, which
/// root (with CAP_SYS_RESOURCE) can raise the hard limit to; without it, the hard limit stays
/// the operator's ceiling and only the soft limit rises. Failing to raise it is only a warning.
pub fn raise() {
    use rustix::process::{Resource, Rlimit, getrlimit, setrlimit};
    let before = getrlimit(Resource::Nofile);
    let ceiling = std::fs::read_to_string("/proc/sys/fs/nr_open")
        .ok()
        .and_then(|n| n.trim().parse::<u64>().ok());
    let wanted = |limit: Option<u64>| Rlimit {
        current: limit,
        maximum: limit,
    };
    let raised = ceiling.is_some_and(|n| setrlimit(Resource::Nofile, wanted(Some(n))).is_ok())
        || setrlimit(Resource::Nofile, wanted(before.maximum)).is_ok();
    let after = getrlimit(Resource::Nofile);
    if raised {
        tracing::info!(soft = ?after.current, hard = ?after.maximum, "open file limit");
    } else {
        tracing::warn!(soft = ?after.current, hard = ?after.maximum, "could not raise the open file limit");
    }
}

/// A quarter of the soft open file limit, at least 1 (unlimited: `u64::MAX`): what one kind of
/// fd that grows with its clients or containers may take, so the others keep the rest (a pidfd
/// a container, stats files, runtime commands).
pub fn quarter() -> u64 {
    let soft = rustix::process::getrlimit(rustix::process::Resource::Nofile).current;
    soft.map_or(u64::MAX, |n| (n / 4).max(1))
}
