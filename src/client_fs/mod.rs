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
//!   is asked to (the file's access ACL where it has one, else its mode bits, against the peer's
//!   uid, gid and supplementary groups, as the kernel checks them; uid 0 always may);
//! - no directory on the way, nor the file itself, may be one of the `forbidden` directories
//!   (berthd's state directory), compared by device and inode so that bind mounts and hard links
//!   are caught too;
//! - the file is looked at before it is opened: it is first opened `O_PATH | O_NOFOLLOW` (which
//!   runs no driver code) and fstat'ed, so a directory, socket or device is refused without ever
//!   being opened for I/O. When it passes, the very same inode is reopened for I/O through
//!   `/proc/self/fd/<n>` and fstat'ed again;
//! - a stdio or console path may not be on a FUSE file system: every close of a FUSE regular
//!   file waits, uninterruptibly, for its server to answer a flush, and berthd, its spawn helper
//!   and runc each close their copy of a stdio descriptor; any stat of a FIFO or device there
//!   asks the server too, and berthd stats a FIFO on its reactor. A server that stops answering
//!   (an sshfs whose network went away, a user's own mount with `allow_other`) would stall the
//!   reactor, or the helper and with it every runtime command. Nor may a checkpoint's directory,
//!   where CRIU closes every image file. virtiofs, which shares FUSE's magic number but whose
//!   server is the hypervisor's, is told apart by its mount's type.
//!
//! Inside a directory berthd already holds (the bundle), the `*_beneath` functions resolve each
//! component with `openat2(RESOLVE_BENEATH | RESOLVE_NO_SYMLINKS | RESOLVE_NO_MAGICLINKS)`:
//! nothing outside that directory is ever opened, listed, created or removed.
//!
//! Owns: resolving and opening what a client names, and the peer (`SO_PEERCRED` and groups)
//! it is checked against. Does not own: reading the credentials off a connection (api) or
//! deciding which paths a request may name (supervisor).
//!
//! Every function here blocks (a file system may hang); call them off the reactor, as the
//! supervisor's `Caller` does.

mod acl;
mod beneath;
mod peer;
#[cfg(test)]
mod tests;
mod walk;

use std::ffi::OsStr;
use std::io::Read;
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

use rustix::fs::{AtFlags, FileType, Mode, OFlags, ResolveFlags, Stat, StatxFlags};

use crate::error::{Error, Result};
use acl::At;
pub use beneath::{
    check_readable_files, create_dir_beneath, dir_id_beneath, give_to, list_dirs_beneath,
    open_beneath, remove_beneath, remove_held, set_owner,
};
pub use peer::Peer;
use walk::{Missing, Walk};

/// The longest path a client may name, in bytes (PATH_MAX).
pub const MAX_PATH_BYTES: usize = 4096;

/// How deep [`remove_beneath`] descends; a deeper tree is refused, not half removed blindly.
pub const MAX_REMOVE_DEPTH: usize = 128;

/// At most this many characters of a path are quoted in a message.
const SHOWN_CHARS: usize = 200;

/// Every `*_beneath` resolution: never leave the directory, never follow a link.
const BENEATH: ResolveFlags = ResolveFlags::BENEATH
    .union(ResolveFlags::NO_SYMLINKS)
    .union(ResolveFlags::NO_MAGICLINKS);

/// Permission bits, as in a mode's `rwx` triplets.
const READ: u32 = 4;
const WRITE: u32 = 2;
const SEARCH: u32 = 1;

/// The access a client asks berthd to use on a stdio path.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Access {
    Read,
    Write,
}

impl Access {
    fn bits(self) -> u32 {
        match self {
            Access::Read => READ,
            Access::Write => WRITE,
        }
    }

    fn verb(self) -> &'static str {
        match self {
            Access::Read => "read",
            Access::Write => "write",
        }
    }
}

/// Opens a stdio path for a container: a FIFO, a regular file or `/dev/null` that exists
/// already and that the peer itself may use with `access`. `what` names it in messages
/// ("stdout", "console").
///
/// Nothing is created or truncated and the open never blocks: a FIFO for output is opened
/// `O_RDWR`, so it needs no reader yet; a regular file for output is opened
/// `O_WRONLY | O_APPEND`. The descriptor is returned in blocking mode, since it becomes the
/// container's own stdio.
pub fn open_stdio(
    what: &str,
    path: &Path,
    access: Access,
    peer: &Peer,
    forbidden: &[&Path],
) -> Result<OwnedFd> {
    let walk = stdio_walk(what, path, peer, forbidden)?;
    let (leaf, st) = walk.leaf()?;
    open_stdio_leaf(&walk, &leaf, &st, access)
}

/// A console path as [`open_console`] opened it.
#[derive(Debug)]
pub enum Console {
    /// The terminal side of a pty the client holds the other side of (`/dev/pts/N`, what the
    /// original clients of this API passed): both the input and the output.
    Terminal(OwnedFd),
    /// A FIFO, a regular file or `/dev/null`: output only, since a FIFO read back would feed
    /// the terminal its own output.
    Output(OwnedFd),
}

/// Opens a console path: a pty's terminal side that the peer may read and write, opened
/// `O_RDWR | O_NOCTTY`, or else whatever [`open_stdio`] takes for output.
pub fn open_console(path: &Path, peer: &Peer, forbidden: &[&Path]) -> Result<Console> {
    let walk = stdio_walk("console", path, peer, forbidden)?;
    let (leaf, st) = walk.leaf()?;
    if !is_pty_terminal(&st) {
        return open_stdio_leaf(&walk, &leaf, &st, Access::Write).map(Console::Output);
    }
    check_terminal(&walk, &leaf, &st)?;
    let fd = walk.reopen(&leaf, &st, OFlags::RDWR | OFlags::NONBLOCK)?;
    set_blocking(&walk, &fd)?;
    Ok(Console::Terminal(fd))
}

fn stdio_walk<'a>(
    what: &'a str,
    path: &'a Path,
    peer: &'a Peer,
    forbidden: &[&Path],
) -> Result<Walk<'a>> {
    Walk::new(
        what,
        path,
        peer,
        forbidden,
        Missing::Invalid(
            "berthd opens existing files only; create it first (for example with mkfifo)",
        ),
    )
}

/// Checks a stdio path that will not be used (its process's terminal replaces it) as
/// [`open_stdio`] would, without opening it: opening a FIFO is seen by whoever holds the other
/// end.
pub fn check_stdio(
    what: &str,
    path: &Path,
    access: Access,
    peer: &Peer,
    forbidden: &[&Path],
) -> Result<()> {
    let walk = stdio_walk(what, path, peer, forbidden)?;
    let (leaf, st) = walk.leaf()?;
    check_stdio_leaf(&walk, &leaf, &st, access)
}

/// Checks a console path that will not be used (its process has no terminal) as it would be
/// checked if it were, without opening it: opening a FIFO or a terminal is seen by whoever holds
/// the other end.
pub fn check_console(path: &Path, peer: &Peer, forbidden: &[&Path]) -> Result<()> {
    let walk = stdio_walk("console", path, peer, forbidden)?;
    let (leaf, st) = walk.leaf()?;
    if is_pty_terminal(&st) {
        check_terminal(&walk, &leaf, &st)
    } else {
        check_stdio_leaf(&walk, &leaf, &st, Access::Write)
    }
}

/// A pty's terminal side, which the peer may read and write.
fn check_terminal(walk: &Walk<'_>, leaf: &OwnedFd, st: &Stat) -> Result<()> {
    not_on_fuse(walk, leaf, file_system(walk, leaf)?)?;
    if !walk.peer.may(At::Fd(leaf.as_fd()), st, READ | WRITE) {
        return Err(walk.denied(format!(
            "{} may not read and write this console ({}); give a terminal it may use itself",
            walk.peer.describe(),
            mode_and_owner(st),
        )));
    }
    Ok(())
}

fn open_stdio_leaf(walk: &Walk<'_>, leaf: &OwnedFd, st: &Stat, access: Access) -> Result<OwnedFd> {
    check_stdio_leaf(walk, leaf, st, access)?;
    let mode = match (access, FileType::from_raw_mode(st.st_mode)) {
        (Access::Read, _) => OFlags::RDONLY,
        (Access::Write, FileType::RegularFile) => OFlags::WRONLY | OFlags::APPEND,
        (Access::Write, FileType::Fifo) => OFlags::RDWR,
        (Access::Write, _) => OFlags::WRONLY,
    };
    let fd = walk.reopen(leaf, st, mode | OFlags::NONBLOCK)?;
    set_blocking(walk, &fd)?;
    Ok(fd)
}

/// A FIFO, `/dev/null` or a regular file, which the peer may use for `access`.
fn check_stdio_leaf(walk: &Walk<'_>, leaf: &OwnedFd, st: &Stat, access: Access) -> Result<()> {
    let what = walk.what;
    let kind = FileType::from_raw_mode(st.st_mode);
    let dev_null = is_dev_null(st);
    if !(kind == FileType::Fifo || kind == FileType::RegularFile || dev_null) {
        return Err(Error::InvalidArgument(format!(
            "{what} {} is {}; give a FIFO, /dev/null or a regular file",
            shown(walk.path),
            kind_name(st)
        )));
    }
    let fs = file_system(walk, leaf)?;
    not_on_fuse(walk, leaf, fs)?;
    if kind == FileType::RegularFile {
        not_a_kernel_interface(walk, fs)?;
    }
    if !dev_null && !walk.peer.may(At::Fd(leaf.as_fd()), st, access.bits()) {
        return Err(walk.denied(format!(
            "{} may not {} this {what} ({}); give a file it may {} itself",
            walk.peer.describe(),
            access.verb(),
            mode_and_owner(st),
            access.verb()
        )));
    }
    Ok(())
}

fn set_blocking(walk: &Walk<'_>, fd: &OwnedFd) -> Result<()> {
    let flags = rustix::fs::fcntl_getfl(fd).map_err(|e| walk.io(e))?;
    rustix::fs::fcntl_setfl(fd, flags - OFlags::NONBLOCK).map_err(|e| walk.io(e))
}

/// Reads a client-named regular file of at most `limit` bytes (a bundle's `config.json`). A FIFO, device or directory is refused without being opened; a file
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
    not_a_kernel_interface(&walk, file_system(&walk, &leaf)?)?;
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
    if !peer.may(At::Fd(leaf.as_fd()), &st, READ) {
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

/// A directory a client named (the bundle), opened the same way as the files above and
/// returned as an `O_RDONLY | O_DIRECTORY` descriptor for the `*_beneath` functions. The peer
/// must be allowed to search it.
pub fn open_dir(what: &str, path: &Path, peer: &Peer, forbidden: &[&Path]) -> Result<OwnedFd> {
    let walk = Walk::new(what, path, peer, forbidden, Missing::NotFound)?;
    let (dir, st) = walk.dirs(&walk.components)?;
    if !peer.may(At::Fd(dir.as_fd()), &st, SEARCH) {
        return Err(walk.denied(format!(
            "{} may not search this {what} ({}); give a directory it may search itself",
            peer.describe(),
            mode_and_owner(&st)
        )));
    }
    walk.reopen(&dir, &st, OFlags::RDONLY | OFlags::DIRECTORY)
}

/// The file behind the `O_PATH` descriptor `handle`, opened anew with `flags` through its
/// `/proc/self/fd` link: exactly that inode, whatever its name points to by now.
fn reopen(handle: &OwnedFd, flags: OFlags) -> rustix::io::Result<OwnedFd> {
    let link = self_fd_path(handle);
    rustix::fs::openat(
        rustix::fs::CWD,
        link,
        flags | OFlags::CLOEXEC,
        Mode::empty(),
    )
}

/// The error for a client's file that its state keeps berthd from opening, where that is not
/// berthd's fault: a lease another process holds on it (berthd opens without blocking, and
/// would otherwise wait out the host's lease-break time, 45 s by default), or an immutable or
/// append-only file. `subject` names the file (`stdout /srv/out`).
fn refused_open(subject: &str, e: rustix::io::Errno) -> Option<Error> {
    match e {
        rustix::io::Errno::AGAIN => Some(Error::FailedPrecondition(format!(
            "{subject} has a lease on it that another process holds (fcntl F_SETLEASE), which \
             berthd does not wait to break; release the lease and try again"
        ))),
        rustix::io::Errno::PERM => Some(Error::FailedPrecondition(format!(
            "{subject} may not be opened: it is immutable or append-only (lsattr shows which), \
             or a security module refuses it"
        ))),
        _ => None,
    }
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

/// The magic number of the file system `leaf` is on (`f_type` of fstatfs).
fn file_system(walk: &Walk<'_>, leaf: &OwnedFd) -> Result<u32> {
    let fs = rustix::fs::fstatfs(leaf).map_err(|e| walk.io(e))?;
    // Magic numbers are 32 bits, held in a signed word whose width differs by architecture.
    Ok(fs.f_type as u32)
}

/// Refuses a file of the kernel's own file systems (procfs, sysfs, cgroupfs, ...). Some of
/// their files judge a write or read by who opened them rather than who uses them (a cgroup's
/// `cgroup.procs`, a user namespace's `uid_map`), and berthd opens as root: the caller's own
/// `cgroup.procs` as a container's stdout would let it move any process into its cgroup.
fn not_a_kernel_interface(walk: &Walk<'_>, fs: u32) -> Result<()> {
    /// configfs, efivarfs, pstore, binfmt_misc and fusectl, which libc does not name.
    const OTHERS: [u32; 5] = [
        0x6265_6570,
        0xde5e_81e4,
        0x6165_676c,
        0x4249_4e4d,
        0x6573_5543,
    ];
    let named = [
        libc::PROC_SUPER_MAGIC,
        libc::SYSFS_MAGIC,
        libc::CGROUP_SUPER_MAGIC,
        libc::CGROUP2_SUPER_MAGIC,
        libc::DEBUGFS_MAGIC,
        libc::TRACEFS_MAGIC,
        libc::SECURITYFS_MAGIC,
        libc::BPF_FS_MAGIC,
        libc::SELINUX_MAGIC,
        libc::SMACK_MAGIC,
        libc::RDTGROUP_SUPER_MAGIC,
    ];
    if named.iter().any(|&magic| magic as u32 == fs) || OTHERS.contains(&fs) {
        return Err(Error::InvalidArgument(format!(
            "{} {} is a file of a kernel interface file system ({fs:#x}), which berthd does not open for a client; give a FIFO, /dev/null or a file on a disk or tmpfs",
            walk.what,
            shown(walk.path)
        )));
    }
    Ok(())
}

/// Refuses a stdio or console path on FUSE: see the module's header.
fn not_on_fuse(walk: &Walk<'_>, leaf: &OwnedFd, fs: u32) -> Result<()> {
    if !is_fuse(leaf, fs) {
        return Ok(());
    }
    Err(Error::InvalidArgument(format!(
        "{} {} is on a FUSE file system, whose server berthd would wait for at every close; give a FIFO, /dev/null or a file on a disk or tmpfs",
        walk.what,
        shown(walk.path)
    )))
}

/// Refuses a checkpoint's directory on FUSE: CRIU closes every image file it writes or reads
/// there, each close waits for the server, and a CRIU stuck so cannot be killed, which would
/// hold up every restore after it. `shown` names the directory in the message.
pub fn checkpoint_dir_not_on_fuse(dir: &OwnedFd, shown: &str) -> Result<()> {
    let fs = rustix::fs::fstatfs(dir).map_err(|e| Error::io(shown, e.into()))?;
    if !is_fuse(dir, fs.f_type as u32) {
        return Ok(());
    }
    Err(Error::InvalidArgument(format!(
        "checkpoint {shown} is on a FUSE file system, whose server CRIU would wait for at every close; keep the bundle on a disk or tmpfs to checkpoint it"
    )))
}

/// Whether `fd`, on a file system of magic number `fs`, is on FUSE (fuse and fuseblk share the
/// number) and not on virtiofs, which shares it too but whose server is the hypervisor's.
fn is_fuse(fd: &OwnedFd, fs: u32) -> bool {
    fs == libc::FUSE_SUPER_MAGIC as u32 && !is_virtiofs(fd)
}

/// Whether the mount `leaf` is on is virtiofs; false where that cannot be told (a kernel before
/// `STATX_MNT_ID`, a mount detached since the open, a mountinfo past its bound). The statx asks
/// the file system nothing (`AT_STATX_DONT_SYNC`).
fn is_virtiofs(leaf: &OwnedFd) -> bool {
    let flags = AtFlags::EMPTY_PATH | AtFlags::STATX_DONT_SYNC;
    let Ok(st) = rustix::fs::statx(leaf, "", flags, StatxFlags::MNT_ID) else {
        return false;
    };
    st.stx_mask & StatxFlags::MNT_ID.bits() != 0
        && crate::procfs::own_mount_type(st.stx_mnt_id).is_some_and(|kind| kind == b"virtiofs")
}

/// `/dev/null` wherever it is: the character device 1:3.
#[allow(clippy::unnecessary_cast)] // the field types differ between architectures
pub fn is_dev_null(st: &Stat) -> bool {
    FileType::from_raw_mode(st.st_mode) == FileType::CharacterDevice
        && rustix::fs::major(st.st_rdev as _) == 1
        && rustix::fs::minor(st.st_rdev as _) == 3
}

/// The terminal side of a Unix98 pty (`/dev/pts/N`): majors 136 to 143.
fn is_pty_terminal(st: &Stat) -> bool {
    FileType::from_raw_mode(st.st_mode) == FileType::CharacterDevice
        && (136..=143).contains(&rustix::fs::major(st.st_rdev as _))
}

fn kind_name(st: &Stat) -> &'static str {
    match FileType::from_raw_mode(st.st_mode) {
        FileType::RegularFile => "a regular file",
        FileType::Directory => "a directory",
        FileType::Symlink => "a symbolic link",
        FileType::Fifo => "a FIFO",
        FileType::Socket => "a socket",
        FileType::CharacterDevice if is_dev_null(st) => "/dev/null",
        FileType::CharacterDevice if is_pty_terminal(st) => "a terminal",
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
    std::fs::read_link(self_fd_path(fd))
        .map(|p| p.display().to_string())
        .unwrap_or_else(|_| "the bundle".into())
}

/// The components of a path split at `/`, empty ones dropped; None when one is `.` or `..`,
/// which no path a client names may hold.
fn plain_components(bytes: &[u8]) -> Option<Vec<&OsStr>> {
    let components: Vec<&OsStr> = bytes
        .split(|b| *b == b'/')
        .filter(|c| !c.is_empty())
        .map(OsStr::from_bytes)
        .collect();
    let dots = components
        .iter()
        .any(|c| c.as_bytes() == b"." || c.as_bytes() == b"..");
    (!dots).then_some(components)
}

/// At most [`SHOWN_CHARS`] characters of a path, for a message: control characters (a NUL, a
/// newline, an escape) escaped, since the path is the client's and the message goes to logs
/// and terminals.
pub(crate) fn shown(path: &Path) -> String {
    let text = path.display().to_string();
    if !text.chars().any(char::is_control) {
        return truncate(text);
    }
    truncate(
        text.chars()
            .flat_map(|c| {
                let escaped: Vec<char> = if c.is_control() {
                    c.escape_debug().collect()
                } else {
                    vec![c]
                };
                escaped
            })
            .collect(),
    )
}

fn truncate(mut text: String) -> String {
    if let Some((cut, _)) = text.char_indices().nth(SHOWN_CHARS) {
        text.truncate(cut);
        text.push('…');
    }
    text
}

/// `/proc/self/fd/<n>`: the name by which berthd reaches exactly what `fd` holds, an `O_PATH`
/// descriptor included.
pub fn self_fd_path(fd: impl AsFd) -> String {
    format!("/proc/self/fd/{}", fd.as_fd().as_raw_fd())
}

/// The name by which another process of berthd's (the runtime, CRIU) reaches exactly what `fd`
/// holds: `/proc/<berthd>/fd/<n>`. Handed that rather than the path a client named, the runtime
/// opens what berthd checked, however the client changes the path meanwhile. Valid while `fd`
/// is open.
pub fn held_path(fd: &OwnedFd) -> PathBuf {
    PathBuf::from(format!(
        "/proc/{}/fd/{}",
        std::process::id(),
        fd.as_raw_fd()
    ))
}

fn permission_denied(path: String, why: String) -> Error {
    Error::PermissionDenied(format!("{path}: {why}"))
}
