//! Who is asking: a connection's peer from `SO_PEERCRED` and its supplementary groups, and
//! whether a file's ACL or mode bits grant it an access.

use std::io::Read;

use rustix::fs::Stat;

use super::acl::{self, At};
use super::permission_denied;
use crate::error::{Error, Result};

/// `/proc/<pid>/status` is read up to this many bytes (65,536 groups fit).
const MAX_STATUS_BYTES: u64 = 1 << 20;

/// Who is asking: from `SO_PEERCRED` plus the supplementary groups.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Peer {
    pub pid: u32,
    pub uid: u32,
    pub gid: u32,
    pub groups: Vec<u32>,
}

impl Peer {
    /// berthd itself, for its own use and for tests.
    pub fn root() -> Peer {
        Peer {
            pid: std::process::id(),
            uid: 0,
            gid: 0,
            groups: Vec::new(),
        }
    }

    /// The peer of a connection, from its `SO_PEERCRED` (effective ids) and the `Groups:` line
    /// of `/proc/<pid>/status` (a bounded read). The status must still show the same effective
    /// uid and gid: if the process changed its credentials, or exited and its pid was reused,
    /// the groups read would not be the peer's, and this fails instead.
    ///
    /// The pid can still be reused by a process of the same uid and gid between the connection
    /// and this read; a pidfd from `SO_PEERPIDFD` would close that gap.
    pub fn from_credentials(pid: u32, uid: u32, gid: u32) -> Result<Peer> {
        if uid == 0 {
            // Root may open everything here; its groups change nothing.
            return Ok(Peer {
                pid,
                uid,
                gid,
                groups: Vec::new(),
            });
        }
        if pid == 0 {
            return Err(permission_denied(
                "/proc".into(),
                format!(
                    "the process of uid {uid} that connected is not visible in berthd's pid namespace, so its groups cannot be read; connect from berthd's pid namespace"
                ),
            ));
        }
        let path = format!("/proc/{pid}/status");
        let mut text = Vec::new();
        let read = std::fs::File::open(&path)
            .and_then(|file| file.take(MAX_STATUS_BYTES).read_to_end(&mut text));
        match read {
            Ok(_) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                return Err(Error::Unavailable(format!(
                    "peer pid {pid} exited before berthd could read its groups from {path}; retry the request"
                )));
            }
            Err(e) => return Err(Error::io(&path, e)),
        }
        let groups = parse_status(&text, pid, uid, gid)?;
        Ok(Peer {
            pid,
            uid,
            gid,
            groups,
        })
    }

    pub fn is_root(&self) -> bool {
        self.uid == 0
    }

    pub fn in_group(&self, gid: u32) -> bool {
        self.gid == gid || self.groups.contains(&gid)
    }

    /// Whether the file `at`, whose stat is `st`, grants this peer all of `want` (`rwx` bits):
    /// by its access ACL where the kernel consults one ([`acl`]), else by its mode bits. An ACL that cannot be
    /// read or is not one the kernel would hold grants nothing.
    pub(super) fn may(&self, at: At<'_>, st: &Stat, want: u32) -> bool {
        if self.is_root() {
            return true;
        }
        let owner = (st.st_uid, st.st_gid);
        // The kernel skips the ACL for the owner, and where the mask leaves nothing to grant.
        if st.st_uid != self.uid && st.st_mode & 0o070 != 0 {
            match acl::read(at) {
                Ok(None) => {}
                Ok(Some(bytes)) => {
                    return acl::parse(&bytes)
                        .is_some_and(|acl| acl::grants(&acl, owner, self, want));
                }
                Err(_) => return false,
            }
        }
        let mode = st.st_mode;
        let granted = if st.st_uid == self.uid {
            (mode >> 6) & 0o7
        } else if self.in_group(st.st_gid) {
            (mode >> 3) & 0o7
        } else {
            mode & 0o7
        };
        granted & want == want
    }

    pub(super) fn describe(&self) -> String {
        if self.groups.is_empty() {
            format!("uid {} (gid {})", self.uid, self.gid)
        } else {
            let groups: Vec<String> = self.groups.iter().map(u32::to_string).collect();
            format!(
                "uid {} (gid {}, groups {})",
                self.uid,
                self.gid,
                groups.join(",")
            )
        }
    }
}

/// The supplementary groups in a `/proc/<pid>/status`, after checking that its effective uid
/// and gid are still `uid` and `gid`.
pub(super) fn parse_status(text: &[u8], pid: u32, uid: u32, gid: u32) -> Result<Vec<u32>> {
    let text = String::from_utf8_lossy(text);
    let mut effective_uid = None;
    let mut effective_gid = None;
    let mut groups = None;
    // A line cut by the size bound has no newline and is ignored, so it cannot pass as whole.
    for line in text.split_inclusive('\n').filter(|l| l.ends_with('\n')) {
        let field = |prefix: &str| line.strip_prefix(prefix).map(str::split_whitespace);
        if let Some(mut ids) = field("Uid:") {
            effective_uid = ids.nth(1).and_then(|id| id.parse::<u32>().ok());
        } else if let Some(mut ids) = field("Gid:") {
            effective_gid = ids.nth(1).and_then(|id| id.parse::<u32>().ok());
        } else if let Some(ids) = field("Groups:") {
            groups = ids
                .map(|id| id.parse::<u32>().ok())
                .collect::<Option<Vec<u32>>>();
        }
    }
    let unreadable = || {
        Error::Internal(format!(
            "/proc/{pid}/status has no readable Uid, Gid and Groups lines"
        ))
    };
    let (Some(euid), Some(egid), Some(groups)) = (effective_uid, effective_gid, groups) else {
        return Err(unreadable());
    };
    if euid != uid || egid != gid {
        return Err(permission_denied(
            format!("/proc/{pid}/status"),
            format!(
                "peer pid {pid} connected as uid {uid} gid {gid} but now runs as uid {euid} gid {egid} (it changed credentials, or exited and the pid was reused); reconnect"
            ),
        ));
    }
    Ok(groups)
}
