//! The supplementary groups of a unix socket's peer as the kernel recorded them when it
//! connected (`SO_PEERGROUPS`, Linux 4.13): neither rustix nor nix offers that option.
//!
//! Owns: that one `getsockopt`. Does not own: what the groups admit (api), the other
//! credentials (socket).

use std::io;
use std::os::fd::{AsRawFd, BorrowedFd};

/// The most groups a process may have (`NGROUPS_MAX`).
const MOST_GROUPS: usize = 65536;

/// The peer's supplementary groups at connect time: unlike `/proc/<pid>/status`, still there
/// once the process that connected has exited or handed the connection on.
pub fn of(socket: BorrowedFd<'_>) -> io::Result<Vec<u32>> {
    const GID: usize = std::mem::size_of::<libc::gid_t>();
    let mut groups: Vec<libc::gid_t> = vec![0; 32];
    loop {
        let mut len = (groups.len() * GID) as libc::socklen_t;
        // SAFETY: `groups` is valid for writes of `len` bytes for the whole call and `len` is a
        // valid socklen_t; the kernel writes at most `len` bytes there and sets `len` to what it
        // wrote, or on ERANGE to what it needs.
        let rc = unsafe {
            libc::getsockopt(
                socket.as_raw_fd(),
                libc::SOL_SOCKET,
                libc::SO_PEERGROUPS,
                groups.as_mut_ptr().cast(),
                &mut len,
            )
        };
        if rc == 0 {
            groups.truncate(len as usize / GID);
            return Ok(groups);
        }
        let error = io::Error::last_os_error();
        let needed = len as usize / GID;
        if error.raw_os_error() == Some(libc::ERANGE)
            && needed > groups.len()
            && needed <= MOST_GROUPS
        {
            groups.resize(needed, 0);
            continue;
        }
        return Err(error);
    }
}

#[cfg(test)]
mod tests {
    use std::os::fd::AsFd;

    #[test]
    fn a_peers_groups_are_this_process_groups() {
        let (ours, theirs) = std::os::unix::net::UnixStream::pair().unwrap();
        let mut groups = super::of(ours.as_fd()).unwrap();
        groups.sort_unstable();
        let mut own: Vec<u32> = rustix::process::getgroups()
            .unwrap()
            .into_iter()
            .map(|g| g.as_raw())
            .collect();
        own.sort_unstable();
        own.dedup();
        groups.dedup();
        assert_eq!(groups, own);
        drop(theirs);
    }
}
