//! Files a client names, opened so that berthd, which runs as root, is never a confused deputy.
//!
//! A path a client names (a stdio or console path, a bundle, a bundle's `config.json`) is
//! checked as the client itself would be checked, and more strictly:
//!
//! - it is absolute, at most [`MAX_PATH_BYTES`] bytes, without NUL and without `.` or `..`
//!   components;
//! - it is resolved one component at a time from `/`, each directory opened
//!   `O_PATH | O_DIRECTORY | O_NOFOLLOW` relative to its parent's descriptor, so no symbolic link
//!   anywhere on it is followed and nothing can be swapped between the check and the use;
//! - the peer must be allowed to search every directory on the way and to use the file as berthd
//!   is asked to (mode bits against the peer's uid, gid and supplementary groups; uid 0 always
//!   may). POSIX ACLs are not consulted: they can only make berthd refuse what they would allow;
//! - no directory on the way, nor the file itself, may be one of the `forbidden` directories
//!   (berthd's state directory), compared by device and inode so that bind mounts and hard links
//!   are caught too;
//! - the file is looked at before it is opened: it is first opened `O_PATH | O_NOFOLLOW` (which
//!   runs no driver code) and fstat'ed, so a directory, socket or device is refused without ever
//!   being opened for I/O. When it passes, the very same inode is reopened for I/O through
//!   `/proc/self/fd/<n>` and fstat'ed again.
//!
//! Inside a directory berthd already holds (the bundle), the `*_beneath` functions resolve each
//! component with `openat2(RESOLVE_BENEATH | RESOLVE_NO_SYMLINKS | RESOLVE_NO_MAGICLINKS)`:
//! nothing outside that directory is ever opened, listed or removed.
//!
//! Every function here blocks (a file system may hang); call them off the reactor, as
//! [`read_regular_off_reactor`] does.

use std::ffi::OsStr;
use std::io::Read;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use rustix::fs::{AtFlags, Dir, FileType, Mode, OFlags, ResolveFlags, Stat};
use rustix::io::Errno;

use crate::error::{Error, Result};

/// The longest path a client may name, in bytes (PATH_MAX).
pub const MAX_PATH_BYTES: usize = 4096;

/// How deep [`remove_beneath`] descends; a deeper tree is refused, not half removed blindly.
pub const MAX_REMOVE_DEPTH: usize = 128;

/// At most this many characters of a path are quoted in a message.
const SHOWN_CHARS: usize = 200;

/// `/proc/<pid>/status` is read up to this many bytes (65,536 groups fit).
const MAX_STATUS_BYTES: u64 = 1 << 20;

/// Every `*_beneath` resolution: never leave the directory, never follow a link.
const BENEATH: ResolveFlags = ResolveFlags::BENEATH
    .union(ResolveFlags::NO_SYMLINKS)
    .union(ResolveFlags::NO_MAGICLINKS);

/// Permission bits, as in a mode's `rwx` triplets.
const READ: u32 = 4;
const WRITE: u32 = 2;
const SEARCH: u32 = 1;

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

    fn in_group(&self, gid: u32) -> bool {
        self.gid == gid || self.groups.contains(&gid)
    }

    /// Whether the mode bits and ownership in `st` grant this peer all of `want` (`rwx` bits).
    fn may(&self, st: &Stat, want: u32) -> bool {
        if self.is_root() {
            return true;
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

    fn describe(&self) -> String {
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
fn parse_status(text: &[u8], pid: u32, uid: u32, gid: u32) -> Result<Vec<u32>> {
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

/// The access a client asks berthd to use on a stdio path.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Access {
    Read,
    Write,
    ReadWrite,
}

impl Access {
    fn bits(self) -> u32 {
        match self {
            Access::Read => READ,
            Access::Write => WRITE,
            Access::ReadWrite => READ | WRITE,
        }
    }

    fn verb(self) -> &'static str {
        match self {
            Access::Read => "read",
            Access::Write => "write",
            Access::ReadWrite => "read and write",
        }
    }
}

/// Opens a stdio or console path for a container: a FIFO, a regular file or `/dev/null` that
/// exists already and that the peer itself may use with `access`. `what` names it in messages
/// ("stdout", "console").
///
/// Nothing is created or truncated and the open never blocks: a FIFO for output is opened
/// `O_RDWR`, so it needs no reader yet; a regular file for output is opened
/// `O_WRONLY | O_APPEND` (`O_RDWR | O_APPEND` for [`Access::ReadWrite`]). The descriptor is
/// returned in blocking mode, since it becomes the container's own stdio.
pub fn open_stdio(
    what: &str,
    path: &Path,
    access: Access,
    peer: &Peer,
    forbidden: &[&Path],
) -> Result<OwnedFd> {
    let walk = Walk::new(
        what,
        path,
        peer,
        forbidden,
        Missing::Invalid(
            "berthd opens existing files only; create it first (for example with mkfifo)",
        ),
    )?;
    let (leaf, st) = walk.leaf()?;
    let kind = FileType::from_raw_mode(st.st_mode);
    let dev_null = is_dev_null(&st);
    if !(kind == FileType::Fifo || kind == FileType::RegularFile || dev_null) {
        return Err(Error::InvalidArgument(format!(
            "{what} {} is {}; give a FIFO, /dev/null or a regular file",
            shown(path),
            kind_name(&st)
        )));
    }
    if !dev_null && !peer.may(&st, access.bits()) {
        return Err(walk.denied(format!(
            "{} may not {} this {what} ({}); give a file it may {} itself",
            peer.describe(),
            access.verb(),
            mode_and_owner(&st),
            access.verb()
        )));
    }
    let mode = match (access, kind) {
        (Access::Read, _) => OFlags::RDONLY,
        (Access::Write, FileType::RegularFile) => OFlags::WRONLY | OFlags::APPEND,
        (Access::ReadWrite, FileType::RegularFile) => OFlags::RDWR | OFlags::APPEND,
        (Access::Write, FileType::Fifo) | (Access::ReadWrite, _) => OFlags::RDWR,
        (Access::Write, _) => OFlags::WRONLY,
    };
    let fd = walk.reopen(&leaf, &st, mode | OFlags::NONBLOCK)?;
    let flags = rustix::fs::fcntl_getfl(&fd).map_err(|e| walk.io(e))?;
    rustix::fs::fcntl_setfl(&fd, flags - OFlags::NONBLOCK).map_err(|e| walk.io(e))?;
    Ok(fd)
}

/// Reads a client-named regular file of at most `limit` bytes (a bundle's `config.json`,
/// checkpoint metadata). A FIFO, device or directory is refused without being opened; a file
/// that grows while it is read is still read no further than `limit + 1` bytes.
pub fn read_regular(
    what: &str,
    path: &Path,
    limit: u64,
    peer: &Peer,
    forbidden: &[&Path],
) -> Result<Vec<u8>> {
    let walk = Walk::new(what, path, peer, forbidden, Missing::NotFound)?;
    let (leaf, st) = walk.leaf()?;
    if FileType::from_raw_mode(st.st_mode) != FileType::RegularFile {
        return Err(Error::InvalidArgument(format!(
            "{what} {} is {}, not a regular file; give a regular file",
            shown(path),
            kind_name(&st)
        )));
    }
    let size = u64::try_from(st.st_size).unwrap_or(0);
    let over = |size: u64| {
        Error::InvalidArgument(format!(
            "{what} {} is {size} bytes, over the limit of {limit} bytes; give a smaller file",
            shown(path)
        ))
    };
    if size > limit {
        return Err(over(size));
    }
    if !peer.may(&st, READ) {
        return Err(walk.denied(format!(
            "{} may not read this {what} ({}); give a file it may read itself",
            peer.describe(),
            mode_and_owner(&st)
        )));
    }
    let fd = walk.reopen(&leaf, &st, OFlags::RDONLY | OFlags::NONBLOCK)?;
    let capacity = usize::try_from(size.min(limit)).unwrap_or(0);
    let mut bytes = Vec::with_capacity(capacity);
    std::fs::File::from(fd)
        .take(limit.saturating_add(1))
        .read_to_end(&mut bytes)
        .map_err(|e| Error::io(shown(path), e))?;
    if bytes.len() as u64 > limit {
        return Err(Error::InvalidArgument(format!(
            "{what} {} grew past the limit of {limit} bytes while berthd read it; give a file that is not being written",
            shown(path)
        )));
    }
    Ok(bytes)
}

/// [`read_regular`] on tokio's blocking pool, given up after `timeout` (a hung file system, a
/// FUSE server that never answers). The read itself cannot be cancelled: on timeout it goes on
/// in the background and its descriptor is closed when it ends.
pub async fn read_regular_off_reactor(
    what: String,
    path: PathBuf,
    limit: u64,
    peer: Peer,
    forbidden: Vec<PathBuf>,
    timeout: Duration,
) -> Result<Vec<u8>> {
    let shown_path = shown(&path);
    let label = what.clone();
    let task = tokio::task::spawn_blocking(move || {
        let forbidden: Vec<&Path> = forbidden.iter().map(PathBuf::as_path).collect();
        read_regular(&what, &path, limit, &peer, &forbidden)
    });
    match tokio::time::timeout(timeout, task).await {
        Ok(Ok(result)) => result,
        Ok(Err(join)) => Err(Error::Internal(format!(
            "reading {label} {shown_path} failed: {join}"
        ))),
        // src/error.rs's one deadline variant; its message adds "and was killed", which a
        // blocking read left to finish is not.
        Err(_elapsed) => Err(Error::Timeout {
            what: format!("reading {label} {shown_path}"),
            secs: timeout.as_secs() + u64::from(timeout.subsec_nanos() > 0),
        }),
    }
}

/// A directory a client named (the bundle), opened the same way as the files above and
/// returned as an `O_RDONLY | O_DIRECTORY` descriptor for the `*_beneath` functions. The peer
/// must be allowed to search it.
pub fn open_dir(what: &str, path: &Path, peer: &Peer, forbidden: &[&Path]) -> Result<OwnedFd> {
    let walk = Walk::new(what, path, peer, forbidden, Missing::NotFound)?;
    let (dir, st) = walk.dirs(&walk.components)?;
    if !peer.may(&st, SEARCH) {
        return Err(walk.denied(format!(
            "{} may not search this {what} ({}); give a directory it may search itself",
            peer.describe(),
            mode_and_owner(&st)
        )));
    }
    walk.reopen(&dir, &st, OFlags::RDONLY | OFlags::DIRECTORY)
}

/// `<dir>/<relative>`, resolved beneath `dir` one component at a time with `openat2`
/// `RESOLVE_BENEATH | RESOLVE_NO_SYMLINKS`: a symbolic link or `..` anywhere is refused. It must
/// be a directory or a regular file; `flags` are its access mode plus `O_DIRECTORY` or `O_PATH`
/// (anything that creates or truncates is refused). The peer must be allowed to search every
/// directory on the way and to use the file with that access mode.
pub fn open_beneath(dir: &OwnedFd, relative: &Path, flags: OFlags, peer: &Peer) -> Result<OwnedFd> {
    let creating = OFlags::CREATE | OFlags::EXCL | OFlags::TRUNC;
    if flags.intersects(creating) || flags.contains(OFlags::TMPFILE) {
        return Err(Error::Internal(format!(
            "open_beneath was asked to create or truncate {}",
            shown(relative)
        )));
    }
    let beneath = Beneath::new(dir, relative)?;
    let (parent, leaf) = beneath.parent(peer)?;
    let handle = beneath.open(parent.as_fd(), leaf, OFlags::PATH, ResolveFlags::empty())?;
    let st = rustix::fs::fstat(&handle).map_err(|e| beneath.io(e))?;
    let kind = FileType::from_raw_mode(st.st_mode);
    if kind != FileType::Directory && kind != FileType::RegularFile {
        return Err(Error::InvalidArgument(format!(
            "{} is {}; berthd opens only directories and regular files there",
            beneath.shown(),
            kind_name(&st)
        )));
    }
    if flags.contains(OFlags::DIRECTORY) && kind != FileType::Directory {
        return Err(Error::InvalidArgument(format!(
            "{} is {}, not a directory",
            beneath.shown(),
            kind_name(&st)
        )));
    }
    if flags.contains(OFlags::PATH) {
        return Ok(handle);
    }
    let want = match flags & OFlags::ACCMODE {
        mode if mode == OFlags::WRONLY => WRITE,
        mode if mode == OFlags::RDWR => READ | WRITE,
        _ => READ,
    };
    if !peer.may(&st, want) {
        return Err(permission_denied(
            beneath.shown(),
            format!(
                "{} may not {} it ({}); give it that access first",
                peer.describe(),
                match want {
                    READ => "read",
                    WRITE => "write",
                    _ => "read and write",
                },
                mode_and_owner(&st)
            ),
        ));
    }
    let fd = reopen(&handle, flags - OFlags::NOFOLLOW).map_err(|e| beneath.io(e))?;
    same_file(&fd, &st).map_err(|why| {
        Error::InvalidArgument(format!(
            "{} {why}; do not change it while berthd opens it",
            beneath.shown()
        ))
    })?;
    Ok(fd)
}

/// The names of the real directories (not symbolic links, not files) directly in
/// `<dir>/<relative>`, sorted; empty when `<dir>/<relative>` does not exist. Names that are not
/// UTF-8 are left out (a client could not name them back). More than `max` directories is
/// refused, naming the limit. The peer must be allowed to read the directory.
pub fn list_dirs_beneath(
    dir: &OwnedFd,
    relative: &Path,
    peer: &Peer,
    max: usize,
) -> Result<Vec<String>> {
    let fd = match open_beneath(dir, relative, OFlags::RDONLY | OFlags::DIRECTORY, peer) {
        Ok(fd) => fd,
        Err(Error::NotFound(_)) => return Ok(Vec::new()),
        Err(e) => return Err(e),
    };
    let shown_dir = truncate(format!("{}/{}", fd_path(dir), relative.display()));
    let io = |e: Errno| Error::io(&shown_dir, e.into());
    let mut entries = Dir::new(fd).map_err(io)?;
    let mut names = Vec::new();
    while let Some(entry) = entries.read() {
        let entry = entry.map_err(io)?;
        let name = entry.file_name().to_bytes();
        if name == b"." || name == b".." {
            continue;
        }
        let kind = match entry.file_type() {
            FileType::Unknown => {
                let st = rustix::fs::statat(
                    entries.fd().map_err(io)?,
                    entry.file_name(),
                    AtFlags::SYMLINK_NOFOLLOW,
                );
                match st {
                    Ok(st) => FileType::from_raw_mode(st.st_mode),
                    Err(Errno::NOENT) => continue,
                    Err(e) => return Err(io(e)),
                }
            }
            kind => kind,
        };
        if kind != FileType::Directory {
            continue;
        }
        let Ok(name) = std::str::from_utf8(name) else {
            continue;
        };
        if names.len() == max {
            return Err(resource_exhausted(format!(
                "{shown_dir} holds more than {max} directories, the most berthd lists; remove some"
            )));
        }
        names.push(name.to_owned());
    }
    names.sort();
    Ok(names)
}

/// Removes `<dir>/<relative>` and, when it is a directory, everything in it, never through a
/// symbolic link: the path to it is resolved beneath `dir` as in [`open_beneath`]; inside, each
/// directory is opened `O_NOFOLLOW` with `RESOLVE_NO_XDEV` relative to its parent's descriptor
/// and its entries are removed with `unlinkat`, so a symbolic link inside is removed itself and
/// never followed, and a mount point inside stops the removal instead of being emptied.
///
/// `<dir>/<relative>` itself must not be a symbolic link (it is refused, as
/// [`list_dirs_beneath`] does not list it). The peer must be allowed to write to and search
/// the directory that holds it (and own it or the directory, when that one is sticky).
/// At most [`MAX_REMOVE_DEPTH`] levels are descended.
pub fn remove_beneath(dir: &OwnedFd, relative: &Path, peer: &Peer) -> Result<()> {
    let beneath = Beneath::new(dir, relative)?;
    let (parent, leaf) = beneath.parent(peer)?;
    let parent_st = rustix::fs::fstat(&parent).map_err(|e| beneath.io(e))?;
    let st = match rustix::fs::statat(&parent, leaf, AtFlags::SYMLINK_NOFOLLOW) {
        Ok(st) => st,
        Err(Errno::NOENT) => {
            return Err(Error::NotFound(format!(
                "{} does not exist",
                beneath.shown()
            )));
        }
        Err(e) => return Err(beneath.io(e)),
    };
    let sticky_owner = parent_st.st_mode & 0o1000 == 0
        || peer.is_root()
        || st.st_uid == peer.uid
        || parent_st.st_uid == peer.uid;
    if !peer.may(&parent_st, WRITE | SEARCH) || !sticky_owner {
        return Err(permission_denied(
            beneath.shown(),
            format!(
                "{} may not remove it from its directory ({}); remove it yourself or ask its owner",
                peer.describe(),
                mode_and_owner(&parent_st)
            ),
        ));
    }
    match FileType::from_raw_mode(st.st_mode) {
        FileType::Symlink => Err(Error::InvalidArgument(format!(
            "{} is a symbolic link, which berthd does not remove for a client; remove it yourself",
            beneath.shown()
        ))),
        FileType::Directory => {
            let top = beneath.open(
                parent.as_fd(),
                leaf,
                OFlags::RDONLY | OFlags::DIRECTORY | OFlags::NOFOLLOW,
                ResolveFlags::NO_XDEV,
            )?;
            remove_tree(top, parent.as_fd(), leaf, &beneath.shown())
        }
        _ => match rustix::fs::unlinkat(&parent, leaf, AtFlags::empty()) {
            Ok(()) | Err(Errno::NOENT) => Ok(()),
            Err(e) => Err(beneath.io(e)),
        },
    }
}

/// One directory being emptied: its entries, and its name in the directory above.
struct Frame {
    entries: Dir,
    name: std::ffi::CString,
    passes: u8,
}

/// Empties and removes the directory `top` (named `top_name` in `top_parent`), depth first,
/// with an explicit stack of directory descriptors instead of recursion.
fn remove_tree(
    top: OwnedFd,
    top_parent: BorrowedFd<'_>,
    top_name: &OsStr,
    shown: &str,
) -> Result<()> {
    let inside = |stack: &[Frame], name: Option<&[u8]>| {
        let mut path = shown.to_owned();
        for frame in stack.iter().skip(1) {
            path.push('/');
            path.push_str(&String::from_utf8_lossy(frame.name.to_bytes()));
        }
        if let Some(name) = name {
            path.push('/');
            path.push_str(&String::from_utf8_lossy(name));
        }
        truncate(path)
    };
    let io = |path: String, e: Errno| Error::io(path, e.into());
    let top_name = std::ffi::CString::new(top_name.as_bytes())
        .map_err(|_| Error::InvalidArgument(format!("{shown} contains a NUL byte")))?;
    let mut stack = vec![Frame {
        entries: Dir::new(top).map_err(|e| io(shown.to_owned(), e))?,
        name: top_name,
        passes: 0,
    }];
    while let Some(frame) = stack.last_mut() {
        let next = frame.entries.read();
        let Some(entry) = next else {
            let mut frame = stack.pop().expect("the stack is not empty");
            let parent = match stack.last() {
                Some(above) => above
                    .entries
                    .fd()
                    .map_err(|e| io(inside(&stack, None), e))?,
                None => top_parent,
            };
            match rustix::fs::unlinkat(parent, frame.name.as_c_str(), AtFlags::REMOVEDIR) {
                Ok(()) | Err(Errno::NOENT) => {}
                // Something was added while this directory was read: read it again, twice at most.
                Err(Errno::NOTEMPTY) if frame.passes < 2 => {
                    frame.passes += 1;
                    frame.entries.rewind();
                    stack.push(frame);
                }
                Err(e) => {
                    let path = inside(&stack, Some(frame.name.to_bytes()));
                    return Err(io(path, e));
                }
            }
            continue;
        };
        let entry = entry.map_err(|e| io(inside(&stack, None), e))?;
        let frame = stack.last().expect("the stack is not empty");
        let name = entry.file_name();
        if name.to_bytes() == b"." || name.to_bytes() == b".." {
            continue;
        }
        let at = frame
            .entries
            .fd()
            .map_err(|e| io(inside(&stack, None), e))?;
        let kind = match entry.file_type() {
            FileType::Unknown => match rustix::fs::statat(at, name, AtFlags::SYMLINK_NOFOLLOW) {
                Ok(st) => FileType::from_raw_mode(st.st_mode),
                Err(Errno::NOENT) => continue,
                Err(e) => return Err(io(inside(&stack, Some(name.to_bytes())), e)),
            },
            kind => kind,
        };
        if kind != FileType::Directory {
            // A symbolic link is removed itself: unlinkat never follows one.
            match rustix::fs::unlinkat(at, name, AtFlags::empty()) {
                Ok(()) | Err(Errno::NOENT) => {}
                Err(e) => return Err(io(inside(&stack, Some(name.to_bytes())), e)),
            }
            continue;
        }
        if stack.len() >= MAX_REMOVE_DEPTH {
            return Err(resource_exhausted(format!(
                "{} is nested more than {MAX_REMOVE_DEPTH} directories deep, more than berthd removes; remove it yourself",
                inside(&stack, Some(name.to_bytes()))
            )));
        }
        let flags = OFlags::RDONLY | OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC;
        let child = match rustix::fs::openat2(
            at,
            name,
            flags,
            Mode::empty(),
            BENEATH | ResolveFlags::NO_XDEV,
        ) {
            Ok(child) => child,
            Err(Errno::NOENT) => continue,
            Err(Errno::XDEV) => {
                return Err(Error::FailedPrecondition(format!(
                    "{} is a mount point; unmount it before removing {shown}",
                    inside(&stack, Some(name.to_bytes()))
                )));
            }
            Err(e) => return Err(io(inside(&stack, Some(name.to_bytes())), e)),
        };
        let name = name.to_owned();
        let entries = Dir::new(child).map_err(|e| io(inside(&stack, Some(name.to_bytes())), e))?;
        stack.push(Frame {
            entries,
            name,
            passes: 0,
        });
    }
    Ok(())
}

/// What a missing path is: InvalidArgument with advice (stdio: berthd never creates it), or
/// NotFound.
#[derive(Clone, Copy)]
enum Missing {
    Invalid(&'static str),
    NotFound,
}

/// One client-named path on its way from `/`.
struct Walk<'a> {
    what: &'a str,
    path: &'a Path,
    components: Vec<&'a OsStr>,
    peer: &'a Peer,
    forbidden: Vec<(u64, u64)>,
    missing: Missing,
}

impl<'a> Walk<'a> {
    fn new(
        what: &'a str,
        path: &'a Path,
        peer: &'a Peer,
        forbidden: &[&Path],
        missing: Missing,
    ) -> Result<Self> {
        let components = client_components(what, path)?;
        let forbidden = forbidden
            .iter()
            .filter_map(|dir| std::fs::metadata(dir).ok())
            .map(|meta| {
                use std::os::unix::fs::MetadataExt;
                (meta.dev(), meta.ino())
            })
            .collect();
        Ok(Walk {
            what,
            path,
            components,
            peer,
            forbidden,
            missing,
        })
    }

    /// The directories `components`, from `/`, each opened `O_PATH | O_DIRECTORY | O_NOFOLLOW`
    /// relative to the one before after checking that the peer may search that one. Returns the
    /// last one and its stat.
    fn dirs(&self, components: &[&OsStr]) -> Result<(OwnedFd, Stat)> {
        let flags = OFlags::PATH | OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC;
        let mut at = PathBuf::from("/");
        let mut dir = rustix::fs::openat(rustix::fs::CWD, "/", flags, Mode::empty())
            .map_err(|e| Error::io("/", e.into()))?;
        let mut st = rustix::fs::fstat(&dir).map_err(|e| Error::io("/", e.into()))?;
        self.not_forbidden(&st, &at)?;
        for name in components {
            self.may_search(&st, &at)?;
            at.push(name);
            dir = match rustix::fs::openat(&dir, *name, flags, Mode::empty()) {
                Ok(next) => next,
                Err(e) => return Err(self.explain(&dir, name, &at, e)),
            };
            st = rustix::fs::fstat(&dir).map_err(|e| Error::io(shown(&at), e.into()))?;
            self.not_forbidden(&st, &at)?;
        }
        Ok((dir, st))
    }

    /// The file the path names, opened `O_PATH | O_NOFOLLOW` (no driver code runs) in its
    /// directory, and its stat: a symbolic link is refused here, anything else by the caller.
    fn leaf(&self) -> Result<(OwnedFd, Stat)> {
        let Some((name, dirs)) = self.components.split_last() else {
            return Err(Error::InvalidArgument(format!(
                "{} / is a directory; give a file",
                self.what
            )));
        };
        let (dir, dir_st) = self.dirs(dirs)?;
        let mut at = self.path.parent().unwrap_or(Path::new("/")).to_owned();
        self.may_search(&dir_st, &at)?;
        at.push(name);
        let flags = OFlags::PATH | OFlags::NOFOLLOW | OFlags::CLOEXEC;
        let leaf = rustix::fs::openat(&dir, *name, flags, Mode::empty())
            .map_err(|e| self.explain(&dir, name, &at, e))?;
        let st = rustix::fs::fstat(&leaf).map_err(|e| self.io(e))?;
        if FileType::from_raw_mode(st.st_mode) == FileType::Symlink {
            return Err(self.symlink(&at));
        }
        self.not_forbidden(&st, &at)?;
        Ok((leaf, st))
    }

    /// The inode behind `handle`, opened for I/O, checked to be the one stat'ed.
    fn reopen(&self, handle: &OwnedFd, st: &Stat, flags: OFlags) -> Result<OwnedFd> {
        let fd = reopen(handle, flags | OFlags::NOCTTY).map_err(|e| self.io(e))?;
        same_file(&fd, st).map_err(|why| {
            Error::InvalidArgument(format!(
                "{} {} {why}; do not change it while berthd opens it",
                self.what,
                shown(self.path)
            ))
        })?;
        Ok(fd)
    }

    fn not_forbidden(&self, st: &Stat, at: &Path) -> Result<()> {
        if !self.forbidden.contains(&file_id(st)) {
            return Ok(());
        }
        let why = if at == self.path {
            "is berthd's state directory".to_owned()
        } else {
            format!("is inside berthd's state directory {}", shown(at))
        };
        Err(self.denied(format!(
            "this {} {why}, which no client may name; give a path outside it",
            self.what
        )))
    }

    fn may_search(&self, st: &Stat, at: &Path) -> Result<()> {
        if self.peer.may(st, SEARCH) {
            return Ok(());
        }
        Err(self.denied(format!(
            "{} may not search {} ({}), so it may not name this {}; give a path it can reach itself",
            self.peer.describe(),
            shown(at),
            mode_and_owner(st),
            self.what
        )))
    }

    /// Why opening `name` in `dir` (the path `at`) failed, in words.
    fn explain(&self, dir: &OwnedFd, name: &OsStr, at: &Path, e: Errno) -> Error {
        let lstat = || rustix::fs::statat(dir, name, AtFlags::SYMLINK_NOFOLLOW);
        match e {
            Errno::NOENT => {
                let missing = if at == self.path {
                    String::new()
                } else {
                    format!(" ({} is missing)", shown(at))
                };
                match self.missing {
                    Missing::Invalid(advice) => Error::InvalidArgument(format!(
                        "{} {} does not exist{missing}; {advice}",
                        self.what,
                        shown(self.path)
                    )),
                    Missing::NotFound => Error::NotFound(format!(
                        "{} {} does not exist{missing}",
                        self.what,
                        shown(self.path)
                    )),
                }
            }
            Errno::NOTDIR | Errno::LOOP => match lstat() {
                Ok(st) if FileType::from_raw_mode(st.st_mode) == FileType::Symlink => {
                    self.symlink(at)
                }
                Ok(st) => Error::InvalidArgument(format!(
                    "{} {}: {} is {}, not a directory; give a path through directories only",
                    self.what,
                    shown(self.path),
                    shown(at),
                    kind_name(&st)
                )),
                Err(_) => Error::io(shown(at), e.into()),
            },
            e => Error::io(shown(at), e.into()),
        }
    }

    fn symlink(&self, at: &Path) -> Error {
        let which = if at == self.path {
            "it is a symbolic link".to_owned()
        } else {
            format!("{} is a symbolic link", shown(at))
        };
        Error::InvalidArgument(format!(
            "{} {}: {which}, and berthd follows none in a path a client names; give the path without symbolic links",
            self.what,
            shown(self.path)
        ))
    }

    fn denied(&self, why: String) -> Error {
        permission_denied(shown(self.path), why)
    }

    fn io(&self, e: Errno) -> Error {
        Error::io(shown(self.path), e.into())
    }
}

/// `relative` inside the directory `dir`, for the `*_beneath` functions.
struct Beneath<'a> {
    dir: &'a OwnedFd,
    relative: &'a Path,
    components: Vec<&'a OsStr>,
}

impl<'a> Beneath<'a> {
    fn new(dir: &'a OwnedFd, relative: &'a Path) -> Result<Self> {
        let bytes = relative.as_os_str().as_bytes();
        let refuse = |why: &str| {
            Err(Error::InvalidArgument(format!(
                "{} {why}; give a plain name",
                shown(relative)
            )))
        };
        if bytes.is_empty() {
            return Err(Error::InvalidArgument(
                "an empty name was given; give a plain name".into(),
            ));
        }
        if bytes.len() > MAX_PATH_BYTES {
            return refuse(&format!("is longer than {MAX_PATH_BYTES} bytes"));
        }
        if bytes.contains(&0) {
            return refuse("contains a NUL byte");
        }
        if bytes[0] == b'/' {
            return refuse("is absolute where a name inside the bundle is expected");
        }
        let components: Vec<&OsStr> = bytes
            .split(|b| *b == b'/')
            .filter(|c| !c.is_empty())
            .map(OsStr::from_bytes)
            .collect();
        if components
            .iter()
            .any(|c| c.as_bytes() == b"." || c.as_bytes() == b"..")
        {
            return refuse("contains a `.` or `..` component");
        }
        Ok(Beneath {
            dir,
            relative,
            components,
        })
    }

    /// The directory holding the last component, reached beneath `dir` after checking that the
    /// peer may search each directory on the way (`dir` included), and that last component.
    fn parent(&self, peer: &Peer) -> Result<(OwnedFd, &'a OsStr)> {
        let (leaf, dirs) = self
            .components
            .split_last()
            .expect("Beneath::new refuses a path without components");
        let mut parent = self.dir.try_clone().map_err(|e| Error::sys("dup", e))?;
        self.may_search(&parent, peer)?;
        for name in dirs {
            parent = self.open(
                parent.as_fd(),
                name,
                OFlags::PATH | OFlags::DIRECTORY,
                ResolveFlags::empty(),
            )?;
            self.may_search(&parent, peer)?;
        }
        Ok((parent, leaf))
    }

    fn may_search(&self, dir: &OwnedFd, peer: &Peer) -> Result<()> {
        let st = rustix::fs::fstat(dir).map_err(|e| self.io(e))?;
        if peer.may(&st, SEARCH) {
            return Ok(());
        }
        Err(permission_denied(
            self.shown(),
            format!(
                "{} may not search the directories on the way ({} on {}); give it search permission",
                peer.describe(),
                mode_and_owner(&st),
                truncate(fd_path(dir))
            ),
        ))
    }

    /// `name` in `at`, with `openat2` beneath `at` and without following any link.
    fn open(
        &self,
        at: BorrowedFd<'_>,
        name: &OsStr,
        flags: OFlags,
        resolve: ResolveFlags,
    ) -> Result<OwnedFd> {
        rustix::fs::openat2(
            at,
            name,
            flags | OFlags::CLOEXEC,
            Mode::empty(),
            BENEATH | resolve,
        )
        .map_err(|e| match e {
            Errno::NOENT => Error::NotFound(format!("{} does not exist", self.shown())),
            Errno::LOOP => Error::InvalidArgument(format!(
                "{}: {} is a symbolic link, which berthd does not follow here",
                self.shown(),
                Path::new(name).display()
            )),
            Errno::NOTDIR => Error::InvalidArgument(format!(
                "{}: {} is not a directory",
                self.shown(),
                Path::new(name).display()
            )),
            Errno::XDEV => Error::FailedPrecondition(format!(
                "{}: {} is a mount point, which berthd does not cross here; unmount it first",
                self.shown(),
                Path::new(name).display()
            )),
            e => self.io(e),
        })
    }

    /// `<dir>/<relative>` as a path for messages.
    fn shown(&self) -> String {
        truncate(format!("{}/{}", fd_path(self.dir), self.relative.display()))
    }

    fn io(&self, e: Errno) -> Error {
        Error::io(self.shown(), e.into())
    }
}

/// The components of a client's path after the checks every such path gets.
fn client_components<'p>(what: &str, path: &'p Path) -> Result<Vec<&'p OsStr>> {
    let bytes = path.as_os_str().as_bytes();
    let refuse = |why: String| Err(Error::InvalidArgument(format!("{what} path {why}")));
    if bytes.is_empty() {
        return refuse("is empty; give an absolute path".into());
    }
    if bytes.len() > MAX_PATH_BYTES {
        return refuse(format!(
            "{} is {} bytes long, over the limit of {MAX_PATH_BYTES}; give a shorter path",
            shown(path),
            bytes.len()
        ));
    }
    if bytes.contains(&0) {
        return refuse(format!(
            "{} contains a NUL byte; give a path without one",
            shown(path)
        ));
    }
    if bytes[0] != b'/' {
        return refuse(format!(
            "{} is not absolute; give an absolute path",
            shown(path)
        ));
    }
    let components: Vec<&OsStr> = bytes
        .split(|b| *b == b'/')
        .filter(|c| !c.is_empty())
        .map(OsStr::from_bytes)
        .collect();
    if components
        .iter()
        .any(|c| c.as_bytes() == b"." || c.as_bytes() == b"..")
    {
        return refuse(format!(
            "{} contains a `.` or `..` component; give the path without them",
            shown(path)
        ));
    }
    Ok(components)
}

/// The file behind the `O_PATH` descriptor `handle`, opened anew with `flags` through its
/// `/proc/self/fd` link: exactly that inode, whatever its name points to by now.
fn reopen(handle: &OwnedFd, flags: OFlags) -> rustix::io::Result<OwnedFd> {
    let link = format!("/proc/self/fd/{}", handle.as_raw_fd());
    rustix::fs::openat(
        rustix::fs::CWD,
        link,
        flags | OFlags::CLOEXEC,
        Mode::empty(),
    )
}

/// Whether `fd` is the file `st` describes.
fn same_file(fd: &OwnedFd, st: &Stat) -> std::result::Result<(), String> {
    match rustix::fs::fstat(fd) {
        Ok(now) if file_id(&now) == file_id(st) => Ok(()),
        Ok(_) => Err("was replaced by another file".into()),
        Err(e) => Err(format!("could not be checked ({e})")),
    }
}

/// A file's identity: device and inode.
#[allow(clippy::unnecessary_cast)] // the field types differ between architectures
fn file_id(st: &Stat) -> (u64, u64) {
    (st.st_dev as u64, st.st_ino as u64)
}

/// `/dev/null` wherever it is: the character device 1:3.
#[allow(clippy::unnecessary_cast)] // the field types differ between architectures
fn is_dev_null(st: &Stat) -> bool {
    FileType::from_raw_mode(st.st_mode) == FileType::CharacterDevice
        && rustix::fs::major(st.st_rdev as _) == 1
        && rustix::fs::minor(st.st_rdev as _) == 3
}

fn kind_name(st: &Stat) -> &'static str {
    match FileType::from_raw_mode(st.st_mode) {
        FileType::RegularFile => "a regular file",
        FileType::Directory => "a directory",
        FileType::Symlink => "a symbolic link",
        FileType::Fifo => "a FIFO",
        FileType::Socket => "a socket",
        FileType::CharacterDevice if is_dev_null(st) => "/dev/null",
        FileType::CharacterDevice => "a character device other than /dev/null",
        FileType::BlockDevice => "a block device",
        _ => "an unknown kind of file",
    }
}

fn mode_and_owner(st: &Stat) -> String {
    format!(
        "mode {:04o}, owner {}:{}",
        st.st_mode & 0o7777,
        st.st_uid,
        st.st_gid
    )
}

/// The path behind a descriptor, for messages only.
fn fd_path(fd: &OwnedFd) -> String {
    std::fs::read_link(format!("/proc/self/fd/{}", fd.as_raw_fd()))
        .map(|p| p.display().to_string())
        .unwrap_or_else(|_| "the bundle".into())
}

/// At most [`SHOWN_CHARS`] characters of a path, for a message.
fn shown(path: &Path) -> String {
    truncate(path.display().to_string())
}

fn truncate(mut text: String) -> String {
    if let Some((cut, _)) = text.char_indices().nth(SHOWN_CHARS) {
        text.truncate(cut);
        text.push('…');
    }
    text
}

/// Stands in for `Error::PermissionDenied`, which src/error.rs lacks: an I/O error of kind
/// PermissionDenied maps to `Code::PermissionDenied` there, and displays as `<path>: <why>`.
fn permission_denied(path: String, why: String) -> Error {
    Error::io(
        path,
        std::io::Error::new(std::io::ErrorKind::PermissionDenied, why),
    )
}

/// Stands in for `Error::ResourceExhausted`, which src/error.rs lacks.
fn resource_exhausted(message: String) -> Error {
    Error::FailedPrecondition(message)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::{PermissionsExt, symlink};
    use std::sync::mpsc;

    fn nobody() -> Peer {
        Peer {
            pid: 0,
            uid: 65534,
            gid: 65534,
            groups: Vec::new(),
        }
    }

    /// A temporary directory that everyone may search (tempfile makes them 0700).
    fn open_tempdir() -> tempfile::TempDir {
        let dir = tempfile::TempDir::new().unwrap();
        chmod(dir.path(), 0o755);
        dir
    }

    fn chmod(path: &Path, mode: u32) {
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).unwrap();
    }

    fn mkfifo(path: &Path) {
        nix::unistd::mkfifo(path, nix::sys::stat::Mode::from_bits_truncate(0o666)).unwrap();
        chmod(path, 0o666); // past the umask
    }

    /// Runs `f` on a thread and fails, instead of hanging, if it blocks.
    fn within_a_second<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> T {
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || tx.send(f()).unwrap());
        rx.recv_timeout(Duration::from_secs(5))
            .expect("the call blocked")
    }

    fn stdio(path: &Path, access: Access, peer: &Peer) -> Result<OwnedFd> {
        open_stdio("stdout", path, access, peer, &[])
    }

    fn invalid(result: Result<impl std::fmt::Debug>) -> String {
        match result {
            Err(Error::InvalidArgument(message)) => message,
            other => panic!("expected InvalidArgument, got {other:?}"),
        }
    }

    fn denied(result: Result<impl std::fmt::Debug>) -> String {
        let err = result.expect_err("expected PermissionDenied");
        let message = err.to_string();
        let status = tonic::Status::from(err);
        assert_eq!(status.code(), tonic::Code::PermissionDenied, "{message}");
        message
    }

    #[test]
    fn symlinks_anywhere_on_the_path_are_refused() {
        let dir = open_tempdir();
        let real = dir.path().join("real");
        std::fs::create_dir(&real).unwrap();
        std::fs::write(real.join("file"), "x").unwrap();
        symlink(&real, dir.path().join("via")).unwrap();
        symlink(real.join("file"), dir.path().join("link")).unwrap();
        let root = Peer::root();

        let leaf = dir.path().join("link");
        let message = invalid(stdio(&leaf, Access::Write, &root));
        assert!(
            message.contains("symbolic link") && message.contains(&shown(&leaf)),
            "{message}"
        );
        invalid(read_regular("config", &leaf, 100, &root, &[]));

        let middle = dir.path().join("via/file");
        let message = invalid(stdio(&middle, Access::Write, &root));
        assert!(
            message.contains(&format!(
                "{} is a symbolic link",
                shown(&dir.path().join("via"))
            )),
            "{message}"
        );
        invalid(read_regular("config", &middle, 100, &root, &[]));
        invalid(open_dir("bundle", &dir.path().join("via"), &root, &[]));
        // The real path works.
        assert_eq!(
            read_regular("config", &real.join("file"), 100, &root, &[]).unwrap(),
            b"x"
        );
    }

    #[test]
    fn stdio_refuses_directories_sockets_and_devices_but_takes_dev_null() {
        let dir = open_tempdir();
        let root = Peer::root();
        let message = invalid(stdio(dir.path(), Access::Write, &root));
        assert!(
            message.contains("is a directory; give a FIFO, /dev/null or a regular file"),
            "{message}"
        );
        let socket = dir.path().join("sock");
        let _listener = std::os::unix::net::UnixListener::bind(&socket).unwrap();
        assert!(invalid(stdio(&socket, Access::Write, &root)).contains("a socket"));
        for device in ["/dev/zero", "/dev/kmsg", "/dev/tty"] {
            let device = Path::new(device);
            if device.exists() {
                let message = invalid(stdio(device, Access::Read, &root));
                assert!(
                    message.contains("character device other than /dev/null"),
                    "{message}"
                );
            }
        }
        for access in [Access::Read, Access::Write, Access::ReadWrite] {
            stdio(Path::new("/dev/null"), access, &root).unwrap();
            stdio(Path::new("/dev/null"), access, &nobody()).unwrap();
        }
    }

    #[test]
    fn fifos_open_without_a_peer_and_are_handed_over_blocking() {
        let dir = open_tempdir();
        let fifo = dir.path().join("fifo");
        mkfifo(&fifo);
        let path = fifo.clone();
        let fd = within_a_second(move || stdio(&path, Access::Write, &Peer::root())).unwrap();
        let flags = rustix::fs::fcntl_getfl(&fd).unwrap();
        assert!(flags.contains(OFlags::RDWR) && !flags.contains(OFlags::NONBLOCK));
        let path = fifo.clone();
        within_a_second(move || stdio(&path, Access::Read, &Peer::root())).unwrap();
        // The 0666 FIFO is open to everyone; only its own directory matters.
        within_a_second(move || stdio(&fifo, Access::Write, &nobody())).unwrap();
    }

    #[test]
    fn regular_files_for_output_are_appended_to_not_truncated() {
        let dir = open_tempdir();
        let file = dir.path().join("log");
        std::fs::write(&file, "kept\n").unwrap();
        let fd = stdio(&file, Access::Write, &Peer::root()).unwrap();
        rustix::io::write(&fd, b"added\n").unwrap();
        assert_eq!(std::fs::read_to_string(&file).unwrap(), "kept\nadded\n");
        let flags = rustix::fs::fcntl_getfl(&fd).unwrap();
        assert!(flags.contains(OFlags::WRONLY | OFlags::APPEND));
    }

    #[test]
    fn missing_paths_are_never_created() {
        let dir = open_tempdir();
        let missing = dir.path().join("out");
        let message = invalid(stdio(&missing, Access::Write, &Peer::root()));
        assert!(
            message.contains(&shown(&missing)) && message.contains("mkfifo"),
            "{message}"
        );
        assert!(!missing.exists());
        let missing_dir = dir.path().join("no/config.json");
        assert!(matches!(
            read_regular("config", &missing_dir, 10, &Peer::root(), &[]),
            Err(Error::NotFound(m)) if m.contains(&shown(&missing_dir))
        ));
        assert!(matches!(
            open_dir("bundle", &dir.path().join("no"), &Peer::root(), &[]),
            Err(Error::NotFound(_))
        ));
    }

    #[test]
    fn the_peer_needs_the_access_it_asks_for() {
        let dir = open_tempdir();
        let secret = dir.path().join("secret");
        std::fs::write(&secret, "root only").unwrap();
        chmod(&secret, 0o600);
        let message = denied(stdio(&secret, Access::Read, &nobody()));
        assert!(
            message.contains(&shown(&secret)) && message.contains("uid 65534"),
            "{message}"
        );
        denied(stdio(&secret, Access::Write, &nobody()));
        denied(read_regular("config", &secret, 100, &nobody(), &[]));
        assert_eq!(
            read_regular("config", &secret, 100, &Peer::root(), &[]).unwrap(),
            b"root only"
        );
        stdio(&secret, Access::ReadWrite, &Peer::root()).unwrap();

        // Readable by everyone but writable only by root.
        chmod(&secret, 0o644);
        read_regular("config", &secret, 100, &nobody(), &[]).unwrap();
        stdio(&secret, Access::Read, &nobody()).unwrap();
        denied(stdio(&secret, Access::Write, &nobody()));
        denied(stdio(&secret, Access::ReadWrite, &nobody()));

        // Group bits count for the peer's primary and supplementary groups.
        chmod(&secret, 0o640);
        std::os::unix::fs::chown(&secret, Some(0), Some(4242)).unwrap();
        denied(read_regular("config", &secret, 100, &nobody(), &[]));
        let member = Peer {
            groups: vec![4242],
            ..nobody()
        };
        read_regular("config", &secret, 100, &member, &[]).unwrap();
        // The owner's bits apply to the owner, even when they grant less than the others'.
        chmod(&secret, 0o066);
        std::os::unix::fs::chown(&secret, Some(65534), Some(0)).unwrap();
        denied(read_regular("config", &secret, 100, &nobody(), &[]));
    }

    #[test]
    fn a_file_in_a_directory_the_peer_cannot_search_is_refused() {
        let dir = open_tempdir();
        let private = dir.path().join("private");
        std::fs::create_dir(&private).unwrap();
        chmod(&private, 0o700);
        let file = private.join("open");
        std::fs::write(&file, "{}").unwrap();
        chmod(&file, 0o644);
        let message = denied(read_regular("config", &file, 100, &nobody(), &[]));
        assert!(
            message.contains(&format!("may not search {}", shown(&private))),
            "{message}"
        );
        denied(stdio(&file, Access::Read, &nobody()));
        denied(open_dir("bundle", &private, &nobody(), &[]));
        assert_eq!(
            read_regular("config", &file, 100, &Peer::root(), &[]).unwrap(),
            b"{}"
        );
        chmod(&private, 0o711);
        read_regular("config", &file, 100, &nobody(), &[]).unwrap();
        open_dir("bundle", &private, &nobody(), &[]).unwrap();
    }

    #[test]
    fn paths_inside_the_forbidden_directory_are_refused() {
        let dir = open_tempdir();
        let state = dir.path().join("state");
        std::fs::create_dir_all(state.join("containers")).unwrap();
        let record = state.join("containers/a.json");
        std::fs::write(&record, "{}").unwrap();
        let forbidden: &[&Path] = &[&state];
        let root = Peer::root();
        let message = denied(open_stdio(
            "stdout",
            &record,
            Access::Write,
            &root,
            forbidden,
        ));
        assert!(
            message.contains("inside berthd's state directory"),
            "{message}"
        );
        denied(read_regular("config", &record, 100, &root, forbidden));
        denied(open_dir("bundle", &state, &root, forbidden));
        denied(open_dir(
            "bundle",
            &state.join("containers"),
            &root,
            forbidden,
        ));
        // A bind mount or other name for the same directory is the same directory: a hard link
        // to a file in it is caught as that file is not, but its directory is.
        let outside = dir.path().join("outside");
        std::fs::write(&outside, "").unwrap();
        open_stdio("stdout", &outside, Access::Write, &root, forbidden).unwrap();
    }

    #[test]
    fn read_regular_refuses_fifos_devices_and_large_files() {
        let dir = open_tempdir();
        let root = Peer::root();
        let fifo = dir.path().join("config.json");
        mkfifo(&fifo);
        let path = fifo.clone();
        let message = invalid(within_a_second(move || {
            read_regular("config", &path, 100, &Peer::root(), &[])
        }));
        assert!(
            message.contains("is a FIFO, not a regular file"),
            "{message}"
        );
        invalid(read_regular(
            "config",
            Path::new("/dev/zero"),
            100,
            &root,
            &[],
        ));
        invalid(read_regular(
            "config",
            Path::new("/dev/null"),
            100,
            &root,
            &[],
        ));
        invalid(read_regular("config", dir.path(), 100, &root, &[]));

        let big = dir.path().join("big.json");
        std::fs::write(&big, vec![b' '; 101]).unwrap();
        let message = invalid(read_regular("config", &big, 100, &root, &[]));
        assert!(
            message.contains("101 bytes") && message.contains("limit of 100 bytes"),
            "{message}"
        );
        assert_eq!(
            read_regular("config", &big, 101, &root, &[]).unwrap().len(),
            101
        );
        let small = dir.path().join("small.json");
        std::fs::write(&small, "{}").unwrap();
        assert_eq!(
            read_regular("config", &small, 100, &root, &[]).unwrap(),
            b"{}"
        );
    }

    #[test]
    fn malformed_paths_are_refused_before_any_lookup() {
        let root = Peer::root();
        let long = format!("/{}", "a/".repeat(2100));
        for path in [
            "",
            "relative/config.json",
            "/tmp/../etc/shadow",
            "/tmp/./x",
            "/tmp/..",
            long.as_str(),
        ] {
            let message = invalid(read_regular("config", Path::new(path), 100, &root, &[]));
            assert!(message.chars().count() < 400, "{message}");
            invalid(stdio(Path::new(path), Access::Write, &root));
        }
        let nul = OsStr::from_bytes(b"/tmp/a\0b");
        invalid(open_dir("bundle", Path::new(nul), &root, &[]));
        invalid(stdio(Path::new("/"), Access::Write, &root));
    }

    #[tokio::test]
    async fn read_regular_runs_off_the_reactor() {
        let dir = open_tempdir();
        let file = dir.path().join("config.json");
        std::fs::write(&file, "{}").unwrap();
        let bytes = read_regular_off_reactor(
            "config".into(),
            file,
            100,
            Peer::root(),
            vec![dir.path().join("state")],
            Duration::from_secs(5),
        )
        .await
        .unwrap();
        assert_eq!(bytes, b"{}");
    }

    #[test]
    fn peers_get_their_groups_from_proc_and_must_still_hold_their_ids() {
        let me = Peer::from_credentials(std::process::id(), 0, 0).unwrap();
        assert!(me.is_root());
        let status = b"Name:\tx\nUid:\t1000\t1000\t1000\t1000\nGid:\t100\t100\t100\t100\nGroups:\t4 27 100 \n";
        assert_eq!(
            parse_status(status, 7, 1000, 100).unwrap(),
            vec![4, 27, 100]
        );
        denied(parse_status(status, 7, 1001, 100));
        assert!(
            parse_status(b"Uid:\t1\t1\t1\t1\nGid:\t1\t1\t1\t1\nGroups:\t1 2", 7, 1, 1).is_err()
        );
        // Our own process, as seen by a peer with our (root) ids but asked as non-root.
        let text = std::fs::read(format!("/proc/{}/status", std::process::id())).unwrap();
        assert!(parse_status(&text, 1, 0, 0).is_ok());
        assert!(matches!(
            Peer::from_credentials(u32::MAX - 1, 1000, 1000),
            Err(Error::Unavailable(_))
        ));
    }

    fn bundle() -> (tempfile::TempDir, OwnedFd) {
        let dir = open_tempdir();
        std::fs::create_dir(dir.path().join("checkpoints")).unwrap();
        let fd = open_dir("bundle", dir.path(), &Peer::root(), &[]).unwrap();
        (dir, fd)
    }

    #[test]
    fn list_dirs_beneath_lists_real_directories_only() {
        let (dir, fd) = bundle();
        let checkpoints = dir.path().join("checkpoints");
        std::fs::create_dir(checkpoints.join("b")).unwrap();
        std::fs::create_dir(checkpoints.join("a")).unwrap();
        std::fs::write(checkpoints.join("file"), "").unwrap();
        let outside = open_tempdir();
        symlink(outside.path(), checkpoints.join("linked")).unwrap();
        let names = list_dirs_beneath(&fd, Path::new("checkpoints"), &Peer::root(), 10).unwrap();
        assert_eq!(names, ["a", "b"]);
        assert!(matches!(
            list_dirs_beneath(&fd, Path::new("checkpoints"), &Peer::root(), 1),
            Err(Error::FailedPrecondition(m)) if m.contains("more than 1 directories")
        ));
        let empty = bundle();
        std::fs::remove_dir(empty.0.path().join("checkpoints")).unwrap();
        assert!(
            list_dirs_beneath(&empty.1, Path::new("checkpoints"), &Peer::root(), 10)
                .unwrap()
                .is_empty()
        );

        // A symlinked checkpoints directory is not followed.
        let (dir, fd) = bundle();
        std::fs::remove_dir(dir.path().join("checkpoints")).unwrap();
        std::fs::create_dir(outside.path().join("theirs")).unwrap();
        symlink(outside.path(), dir.path().join("checkpoints")).unwrap();
        invalid(list_dirs_beneath(
            &fd,
            Path::new("checkpoints"),
            &Peer::root(),
            10,
        ));
    }

    #[test]
    fn open_beneath_refuses_links_and_dot_dot() {
        let (dir, fd) = bundle();
        let root = Peer::root();
        std::fs::create_dir(dir.path().join("checkpoints/cp1")).unwrap();
        std::fs::write(
            dir.path().join("checkpoints/cp1/berth-checkpoint.json"),
            "{}",
        )
        .unwrap();
        open_beneath(
            &fd,
            Path::new("checkpoints/cp1"),
            OFlags::RDONLY | OFlags::DIRECTORY,
            &root,
        )
        .unwrap();
        let file = open_beneath(
            &fd,
            Path::new("checkpoints/cp1/berth-checkpoint.json"),
            OFlags::RDONLY,
            &root,
        )
        .unwrap();
        let mut text = String::new();
        std::fs::File::from(file).read_to_string(&mut text).unwrap();
        assert_eq!(text, "{}");
        assert!(matches!(
            open_beneath(&fd, Path::new("checkpoints/cp2"), OFlags::PATH, &root),
            Err(Error::NotFound(m)) if m.contains("cp2")
        ));
        for name in ["checkpoints/../..", "../x", "checkpoints/./cp1", "/etc", ""] {
            invalid(open_beneath(&fd, Path::new(name), OFlags::PATH, &root));
        }

        let outside = open_tempdir();
        std::fs::create_dir(outside.path().join("cp1")).unwrap();
        std::fs::remove_dir_all(dir.path().join("checkpoints")).unwrap();
        symlink(outside.path(), dir.path().join("checkpoints")).unwrap();
        let message = invalid(open_beneath(
            &fd,
            Path::new("checkpoints/cp1"),
            OFlags::PATH,
            &root,
        ));
        assert!(message.contains("symbolic link"), "{message}");
        // A link as the last component is refused too.
        std::fs::remove_file(dir.path().join("checkpoints")).unwrap();
        std::fs::create_dir(dir.path().join("checkpoints")).unwrap();
        symlink(
            outside.path().join("cp1"),
            dir.path().join("checkpoints/cp1"),
        )
        .unwrap();
        invalid(open_beneath(
            &fd,
            Path::new("checkpoints/cp1"),
            OFlags::PATH,
            &root,
        ));
        assert!(matches!(
            open_beneath(
                &fd,
                Path::new("checkpoints"),
                OFlags::RDONLY | OFlags::CREATE,
                &root
            ),
            Err(Error::Internal(_))
        ));
    }

    #[test]
    fn open_beneath_checks_the_peer() {
        let (dir, fd) = bundle();
        std::fs::create_dir(dir.path().join("checkpoints/cp1")).unwrap();
        chmod(&dir.path().join("checkpoints"), 0o700);
        denied(open_beneath(
            &fd,
            Path::new("checkpoints/cp1"),
            OFlags::PATH,
            &nobody(),
        ));
        chmod(&dir.path().join("checkpoints"), 0o755);
        open_beneath(&fd, Path::new("checkpoints/cp1"), OFlags::RDONLY, &nobody()).unwrap();
        denied(remove_beneath(&fd, Path::new("checkpoints/cp1"), &nobody()));
        assert!(dir.path().join("checkpoints/cp1").exists());
    }

    #[test]
    fn remove_beneath_removes_a_tree_but_nothing_a_link_inside_points_to() {
        let (dir, fd) = bundle();
        let cp = dir.path().join("checkpoints/cp1");
        std::fs::create_dir_all(cp.join("work/deeper")).unwrap();
        std::fs::write(cp.join("pages-1.img"), "x").unwrap();
        std::fs::write(cp.join("work/deeper/log"), "x").unwrap();
        mkfifo(&cp.join("work/fifo"));
        let outside = open_tempdir();
        std::fs::write(outside.path().join("precious"), "keep").unwrap();
        std::fs::create_dir(outside.path().join("sub")).unwrap();
        symlink(outside.path(), cp.join("work/escape")).unwrap();
        symlink(outside.path().join("precious"), cp.join("file-link")).unwrap();
        remove_beneath(&fd, Path::new("checkpoints/cp1"), &Peer::root()).unwrap();
        assert!(!cp.exists());
        assert!(dir.path().join("checkpoints").is_dir());
        assert_eq!(
            std::fs::read_to_string(outside.path().join("precious")).unwrap(),
            "keep"
        );
        assert!(outside.path().join("sub").is_dir());
        assert!(matches!(
            remove_beneath(&fd, Path::new("checkpoints/cp1"), &Peer::root()),
            Err(Error::NotFound(_))
        ));
        // A single file goes too.
        std::fs::write(dir.path().join("checkpoints/stray"), "").unwrap();
        remove_beneath(&fd, Path::new("checkpoints/stray"), &Peer::root()).unwrap();
        assert!(!dir.path().join("checkpoints/stray").exists());
    }

    #[test]
    fn remove_beneath_through_a_symlinked_directory_is_refused() {
        let (dir, fd) = bundle();
        let outside = open_tempdir();
        std::fs::create_dir(outside.path().join("cp1")).unwrap();
        std::fs::write(outside.path().join("cp1/pages-1.img"), "keep").unwrap();
        std::fs::remove_dir(dir.path().join("checkpoints")).unwrap();
        symlink(outside.path(), dir.path().join("checkpoints")).unwrap();
        let message = invalid(remove_beneath(
            &fd,
            Path::new("checkpoints/cp1"),
            &Peer::root(),
        ));
        assert!(message.contains("symbolic link"), "{message}");
        assert_eq!(
            std::fs::read_to_string(outside.path().join("cp1/pages-1.img")).unwrap(),
            "keep"
        );
        // The checkpoint directory itself being a link: refused, the link and its target stay.
        std::fs::remove_file(dir.path().join("checkpoints")).unwrap();
        std::fs::create_dir(dir.path().join("checkpoints")).unwrap();
        symlink(
            outside.path().join("cp1"),
            dir.path().join("checkpoints/cp1"),
        )
        .unwrap();
        invalid(remove_beneath(
            &fd,
            Path::new("checkpoints/cp1"),
            &Peer::root(),
        ));
        assert_eq!(
            std::fs::read_to_string(outside.path().join("cp1/pages-1.img")).unwrap(),
            "keep"
        );
        invalid(remove_beneath(
            &fd,
            Path::new("checkpoints/../.."),
            &Peer::root(),
        ));
    }

    #[test]
    fn remove_beneath_stops_at_its_depth_limit() {
        let (dir, fd) = bundle();
        let mut deep = dir.path().join("checkpoints/cp1");
        for _ in 0..MAX_REMOVE_DEPTH {
            deep.push("d");
        }
        std::fs::create_dir_all(&deep).unwrap();
        assert!(matches!(
            remove_beneath(&fd, Path::new("checkpoints/cp1"), &Peer::root()),
            Err(Error::FailedPrecondition(m)) if m.contains("nested more than")
        ));
    }
}
