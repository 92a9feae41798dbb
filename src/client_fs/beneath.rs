//! Inside a directory berthd already holds (a bundle): opening, listing, creating and removing
//! with `openat2(RESOLVE_BENEATH | RESOLVE_NO_SYMLINKS | RESOLVE_NO_MAGICLINKS)`, so nothing
//! outside it is ever touched.

use std::ffi::OsStr;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::Path;

use rustix::fs::{AtFlags, Dir, FileType, Mode, OFlags, ResolveFlags};
use rustix::io::Errno;

use super::acl::At;
use super::{
    BENEATH, MAX_PATH_BYTES, MAX_REMOVE_DEPTH, Peer, READ, SEARCH, WRITE, fd_path, file_id,
    kind_name, mode_and_owner, permission_denied, plain_components, refused_open, reopen,
    same_file, shown, truncate,
};
use crate::error::{Error, Result};

/// The device and inode of the directory `relative` names beneath `dir`, resolved as root
/// without following any link and without opening it for reading: which directory a request
/// is about before it is opened as its caller, who then must be let in by the usual checks.
pub fn dir_id_beneath(dir: &OwnedFd, relative: &Path) -> Option<(u64, u64)> {
    let flags = OFlags::PATH | OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC;
    let found = rustix::fs::openat2(dir, relative, flags, Mode::empty(), BENEATH).ok()?;
    rustix::fs::fstat(&found).ok().map(|st| file_id(&st))
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
    if !peer.may(At::Fd(handle.as_fd()), &st, want) {
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
    // Without blocking: a lease another process holds on the file is refused at once rather
    // than waited out (reads and writes of directories and regular files do not block).
    let fd = reopen(&handle, (flags - OFlags::NOFOLLOW) | OFlags::NONBLOCK)
        .map_err(|e| refused_open(&beneath.shown(), e).unwrap_or_else(|| beneath.io(e)))?;
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
            return Err(Error::ResourceExhausted(format!(
                "{shown_dir} holds more than {max} directories, the most berthd lists; remove some"
            )));
        }
        names.push(name.to_owned());
    }
    names.sort();
    Ok(names)
}

/// Removes the directory `<dir>/<relative>` and everything in it, never through a symbolic
/// link: the path to it is resolved beneath `dir` as in [`open_beneath`]; inside, each
/// directory is opened `O_NOFOLLOW` with `RESOLVE_NO_XDEV` relative to its parent's descriptor
/// and its entries are removed with `unlinkat`, so a symbolic link inside is removed itself and
/// never followed, and a mount point inside stops the removal instead of being emptied.
///
/// `<dir>/<relative>` itself must be a directory (a checkpoint is one): a symbolic link or
/// anything else is refused, as [`list_dirs_beneath`] does not list it. The peer must be
/// allowed to write to and search the directory that holds it (and own it or the directory,
/// when that one is sticky), and each directory it empties (one with entries), as the kernel
/// asks of a peer that removes the tree itself (the sticky rule included); where it may not,
/// the removal stops there with PERMISSION_DENIED, as `rm -r` would. At most
/// [`MAX_REMOVE_DEPTH`] levels are descended.
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
    if !peer.may(At::Fd(parent.as_fd()), &parent_st, WRITE | SEARCH) || !sticky_owner {
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
            remove_tree(top, parent.as_fd(), leaf, &beneath.shown(), Some(peer))
        }
        // There, but no checkpoint: said so, as a link is, not as if nothing were there.
        _ => Err(Error::InvalidArgument(format!(
            "{} is {}, not a directory: no checkpoint, and berthd does not remove it",
            beneath.shown(),
            kind_name(&st)
        ))),
    }
}

/// Removes the directory berthd holds as `held`, made as `<dir>/<relative>`: emptied through
/// `held`, whatever the name names by now (its parent may be the client's, who can rename
/// entries in it at any time), then the name removed if it is an empty directory.
pub fn remove_held(dir: &OwnedFd, relative: &Path, held: OwnedFd) -> Result<()> {
    let beneath = Beneath::new(dir, relative)?;
    let (parent, leaf) = beneath.parent(&Peer::root())?;
    remove_tree(held, parent.as_fd(), leaf, &beneath.shown(), None)
}

/// Creates the directory `<dir>/<relative>` (its parent must exist), resolved beneath `dir` as
/// in [`open_beneath`], owned by `owner` with `mode`, and returns it opened
/// `O_RDONLY | O_DIRECTORY`. The peer must be allowed to write to and search the parent. An
/// existing entry of that name, directory or not, is AlreadyExists: nothing is reused.
pub fn create_dir_beneath(
    dir: &OwnedFd,
    relative: &Path,
    mode: u32,
    peer: &Peer,
    owner: &Peer,
) -> Result<OwnedFd> {
    let beneath = Beneath::new(dir, relative)?;
    let (parent, leaf) = beneath.parent(peer)?;
    let parent_st = rustix::fs::fstat(&parent).map_err(|e| beneath.io(e))?;
    if !peer.may(At::Fd(parent.as_fd()), &parent_st, WRITE | SEARCH) {
        return Err(permission_denied(
            beneath.shown(),
            format!(
                "{} may not create it in its directory ({}); give it write permission there",
                peer.describe(),
                mode_and_owner(&parent_st)
            ),
        ));
    }
    // The parent is an O_PATH descriptor, which mkdirat takes; an O_PATH open never follows
    // the last component here because mkdirat does not follow one either.
    match rustix::fs::mkdirat(&parent, leaf, Mode::from_raw_mode(mode & 0o777)) {
        Ok(()) => {}
        Err(Errno::EXIST) => {
            return Err(Error::AlreadyExists(format!(
                "{} already exists",
                beneath.shown()
            )));
        }
        Err(e) => return Err(beneath.io(e)),
    }
    let created = beneath.open(
        parent.as_fd(),
        leaf,
        OFlags::RDONLY | OFlags::DIRECTORY | OFlags::NOFOLLOW,
        ResolveFlags::empty(),
    )?;
    // The name was looked up again after the mkdirat: the peer, who may write to the parent,
    // can have renamed another directory over it meanwhile (RENAME_EXCHANGE), one it filled
    // with links for the runtime to write through, or one it may not own. What berthd made is
    // root's and empty; the peer can make neither.
    still_what_was_made(&created, &beneath)?;
    // Past the umask: the mode asked for is the mode made.
    set_owner(&created, (owner.uid, owner.gid), mode & 0o777).map_err(|e| beneath.io(e))?;
    // Kept berthd's: something put in before the mode above shut the peer out (a root
    // directory it may write to, renamed in) is seen now, when nothing more can be.
    if owner.uid == rustix::process::geteuid().as_raw() {
        still_what_was_made(&created, &beneath)?;
    }
    Ok(created)
}

/// Refuses a directory berthd did not just make: one not owned by berthd's user, or not empty.
fn still_what_was_made(created: &OwnedFd, beneath: &Beneath<'_>) -> Result<()> {
    let st = rustix::fs::fstat(created).map_err(|e| beneath.io(e))?;
    let replaced = || {
        Error::FailedPrecondition(format!(
            "{} was replaced by another directory while berthd made it; nothing was written \
             there",
            beneath.shown()
        ))
    };
    if st.st_uid != rustix::process::geteuid().as_raw() {
        return Err(replaced());
    }
    let mut empty = true;
    each_entry(created, &beneath.shown(), |_| {
        empty = false;
        Ok(())
    })?;
    if empty { Ok(()) } else { Err(replaced()) }
}

/// Makes what `fd` holds owned by `uid`:`gid`, with `mode`.
pub fn set_owner(fd: &OwnedFd, (uid, gid): (u32, u32), mode: u32) -> rustix::io::Result<()> {
    let (uid, gid) = (
        rustix::process::Uid::from_raw(uid),
        rustix::process::Gid::from_raw(gid),
    );
    rustix::fs::fchown(fd, Some(uid), Some(gid))?;
    rustix::fs::fchmod(fd, Mode::from_raw_mode(mode))
}

/// Calls `visit` with the name of every entry of the directory `dir` but `.` and `..`.
fn each_entry(
    dir: &OwnedFd,
    shown: &str,
    mut visit: impl FnMut(&std::ffi::CStr) -> Result<()>,
) -> Result<()> {
    let io = |e: Errno| Error::io(shown, e.into());
    let mut entries = Dir::read_from(dir).map_err(io)?;
    while let Some(entry) = entries.read() {
        let entry = entry.map_err(io)?;
        let name = entry.file_name();
        if !matches!(name.to_bytes(), b"." | b"..") {
            visit(name)?;
        }
    }
    Ok(())
}

/// Gives the directory `dir` and what is directly in it to the peer, never through a link
/// (a link itself is given, not what it names). Shown in errors as `shown`.
pub fn give_to(dir: &OwnedFd, shown: &str, peer: &Peer) -> Result<()> {
    let io = |e: Errno| Error::io(shown, e.into());
    let (uid, gid) = (
        rustix::process::Uid::from_raw(peer.uid),
        rustix::process::Gid::from_raw(peer.gid),
    );
    each_entry(dir, shown, |name| {
        match rustix::fs::chownat(dir, name, Some(uid), Some(gid), AtFlags::SYMLINK_NOFOLLOW) {
            Ok(()) | Err(Errno::NOENT) => Ok(()),
            Err(e) => Err(io(e)),
        }
    })?;
    rustix::fs::fchown(dir, Some(uid), Some(gid)).map_err(io)
}

/// Checks that every entry of the directory `dir` (shown in errors as `shown`) is a regular
/// file the peer may read and, unless the peer owns it, has no other link: what a restore hands
/// CRIU, which reads the images by name, following links, and writes `stats-restore` beside
/// them. A link, a directory, a device or a file the peer could not read is refused, so a
/// checkpoint cannot bring in another's images or have another's file written. At most `max`
/// entries.
pub fn check_readable_files(dir: &OwnedFd, shown: &str, peer: &Peer, max: usize) -> Result<()> {
    let io = |e: Errno| Error::io(shown, e.into());
    let mut seen = 0;
    each_entry(dir, shown, |name| {
        seen += 1;
        if seen > max {
            return Err(Error::ResourceExhausted(format!(
                "{shown} holds more than {max} entries, more than a checkpoint has"
            )));
        }
        let st = match rustix::fs::statat(dir, name, AtFlags::SYMLINK_NOFOLLOW) {
            Ok(st) => st,
            Err(Errno::NOENT) => return Ok(()),
            Err(e) => return Err(io(e)),
        };
        let at = truncate(format!(
            "{shown}/{}",
            String::from_utf8_lossy(name.to_bytes())
        ));
        if FileType::from_raw_mode(st.st_mode) != FileType::RegularFile {
            return Err(Error::InvalidArgument(format!(
                "{at} is {}; a checkpoint holds only regular files",
                kind_name(&st)
            )));
        }
        if !peer.may(At::Entry(dir.as_fd(), name), &st, READ) {
            return Err(permission_denied(
                at,
                format!(
                    "{} may not read it ({}); a checkpoint restores only from files its caller may read",
                    peer.describe(),
                    mode_and_owner(&st)
                ),
            ));
        }
        // CRIU opens each image blocking: one with a lease on it would hold the restore, and the
        // restores queued behind it, for the host's lease-break time. Opening it without
        // blocking refuses the restore at once. A lease taken after this check, through a
        // descriptor opened before the hold, still delays it.
        rustix::fs::openat(
            dir,
            name,
            OFlags::RDONLY | OFlags::NONBLOCK | OFlags::NOFOLLOW | OFlags::NOCTTY | OFlags::CLOEXEC,
            Mode::empty(),
        )
        .map_err(|e| refused_open(&at, e).unwrap_or_else(|| Error::io(&at, e.into())))?;
        // CRIU writes `stats-restore` there: a hard link to another's file would be written.
        if st.st_nlink > 1 && st.st_uid != peer.uid && !peer.is_root() {
            return Err(permission_denied(
                at,
                format!(
                    "it has {} links and is not {}'s ({}); copy the checkpoint instead of linking it",
                    st.st_nlink,
                    peer.describe(),
                    mode_and_owner(&st)
                ),
            ));
        }
        Ok(())
    })
}

/// One directory being emptied: its entries, and its name in the directory above.
struct Frame {
    entries: Dir,
    name: std::ffi::CString,
    passes: u8,
    /// Sticky and not the peer's: only the peer's own entries may go. Known once the peer's
    /// right to empty it is checked, at its first entry ([`may_empty`]).
    owners_only: Option<bool>,
}

/// Whether `peer` may empty the directory `dir` (`path`): write and search on it. Returns
/// whether it is sticky and not the peer's, so that only the peer's own entries may go.
fn may_empty(dir: BorrowedFd<'_>, path: impl Fn() -> String, peer: &Peer) -> Result<bool> {
    let st = rustix::fs::fstat(dir).map_err(|e| Error::io(path(), e.into()))?;
    if !peer.may(At::Fd(dir), &st, WRITE | SEARCH) {
        return Err(permission_denied(
            path(),
            format!(
                "{} may not remove what is in it ({}); remove it yourself or ask its owner",
                peer.describe(),
                mode_and_owner(&st)
            ),
        ));
    }
    Ok(st.st_mode & 0o1000 != 0 && st.st_uid != peer.uid && !peer.is_root())
}

/// Empties and removes the directory `top` (named `top_name` in `top_parent`), depth first,
/// with an explicit stack of directory descriptors instead of recursion. With `peer`, only
/// what the peer could remove itself ([`may_empty`]).
fn remove_tree(
    top: OwnedFd,
    top_parent: BorrowedFd<'_>,
    top_name: &OsStr,
    shown: &str,
    peer: Option<&Peer>,
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
        owners_only: None,
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
        let name = entry.file_name();
        if name.to_bytes() == b"." || name.to_bytes() == b".." {
            continue;
        }
        // Checked at its first entry: an empty directory needs nothing of its own to go.
        if let Some(peer) = peer
            && stack
                .last()
                .is_some_and(|frame| frame.owners_only.is_none())
        {
            let frame = stack.last().expect("the stack is not empty");
            let at = frame
                .entries
                .fd()
                .map_err(|e| io(inside(&stack, None), e))?;
            let owners_only = may_empty(at, || inside(&stack, None), peer)?;
            if let Some(frame) = stack.last_mut() {
                frame.owners_only = Some(owners_only);
            }
        }
        let frame = stack.last().expect("the stack is not empty");
        let at = frame
            .entries
            .fd()
            .map_err(|e| io(inside(&stack, None), e))?;
        if let (Some(true), Some(peer)) = (frame.owners_only, peer) {
            match rustix::fs::statat(at, name, AtFlags::SYMLINK_NOFOLLOW) {
                Ok(st) if st.st_uid == peer.uid => {}
                Ok(st) => {
                    return Err(permission_denied(
                        inside(&stack, Some(name.to_bytes())),
                        format!(
                            "{} may not remove it from its sticky directory ({}); ask its owner",
                            peer.describe(),
                            mode_and_owner(&st)
                        ),
                    ));
                }
                Err(Errno::NOENT) => continue,
                Err(e) => return Err(io(inside(&stack, Some(name.to_bytes())), e)),
            }
        }
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
            return Err(Error::ResourceExhausted(format!(
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
            owners_only: None,
        });
    }
    Ok(())
}

/// `relative` inside the directory `dir`, for the `*_beneath` functions.
pub(super) struct Beneath<'a> {
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
        let Some(components) = plain_components(bytes) else {
            return refuse("contains a `.` or `..` component");
        };
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
        if peer.may(At::Fd(dir.as_fd()), &st, SEARCH) {
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
                "{}: {} is a symbolic link, which berthd does not follow here; replace it with \
                 what it points to",
                self.shown(),
                Path::new(name).display()
            )),
            Errno::NOTDIR => Error::InvalidArgument(format!(
                "{}: {} is not a directory, so nothing beneath it can be reached; move it out of \
                 the way",
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
