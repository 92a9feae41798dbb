//! A client's absolute path, resolved one component at a time from `/` without following any
//! symbolic link, with the peer's search rights checked on the way and the forbidden
//! directories refused by device and inode.

use std::ffi::OsStr;
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

use rustix::fs::{AtFlags, FileType, Mode, OFlags, Stat};
use rustix::io::Errno;

use super::acl::At;
use super::{
    MAX_PATH_BYTES, Peer, SEARCH, file_id, kind_name, mode_and_owner, permission_denied,
    plain_components, refused_open, reopen, same_file, shown,
};
use crate::error::{Error, Result};

/// What a missing path is: InvalidArgument with advice (stdio: berthd never creates it), or
/// NotFound.
#[derive(Clone, Copy)]
pub(super) enum Missing {
    Invalid(&'static str),
    NotFound,
}

/// One client-named path on its way from `/`.
pub(super) struct Walk<'a> {
    pub(super) what: &'a str,
    pub(super) path: &'a Path,
    pub(super) components: Vec<&'a OsStr>,
    pub(super) peer: &'a Peer,
    forbidden: Vec<(u64, u64)>,
    missing: Missing,
}

impl<'a> Walk<'a> {
    pub(super) fn new(
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
    pub(super) fn dirs(&self, components: &[&OsStr]) -> Result<(OwnedFd, Stat)> {
        let flags = OFlags::PATH | OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC;
        let mut at = PathBuf::from("/");
        let mut dir = rustix::fs::openat(rustix::fs::CWD, "/", flags, Mode::empty())
            .map_err(|e| Error::io("/", e.into()))?;
        let mut st = rustix::fs::fstat(&dir).map_err(|e| Error::io("/", e.into()))?;
        self.not_forbidden(&st, &at)?;
        for name in components {
            self.may_search(&dir, &st, &at)?;
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
    pub(super) fn leaf(&self) -> Result<(OwnedFd, Stat)> {
        let Some((name, dirs)) = self.components.split_last() else {
            return Err(Error::InvalidArgument(format!(
                "{} / is a directory; give a file",
                self.what
            )));
        };
        let (dir, dir_st) = self.dirs(dirs)?;
        let mut at = self.path.parent().unwrap_or(Path::new("/")).to_owned();
        self.may_search(&dir, &dir_st, &at)?;
        at.push(name);
        let flags = OFlags::PATH | OFlags::NOFOLLOW | OFlags::CLOEXEC;
        let leaf = rustix::fs::openat(&dir, *name, flags, Mode::empty())
            .map_err(|e| self.explain(&dir, name, &at, e))?;
        let st = rustix::fs::fstat(&leaf).map_err(|e| self.io(e))?;
        if FileType::from_raw_mode(st.st_mode) == FileType::Symlink {
            return Err(self.symlink(&at));
        }
        // The kernel opens `file/` only as a directory (ENOTDIR); so does berthd.
        if self.path.as_os_str().as_bytes().ends_with(b"/")
            && FileType::from_raw_mode(st.st_mode) != FileType::Directory
        {
            return Err(Error::InvalidArgument(format!(
                "{} {} ends in '/' but is {}, not a directory; name it without the '/'",
                self.what,
                shown(self.path),
                kind_name(&st)
            )));
        }
        self.not_forbidden(&st, &at)?;
        Ok((leaf, st))
    }

    /// The inode behind `handle`, opened for I/O, checked to be the one stat'ed.
    pub(super) fn reopen(&self, handle: &OwnedFd, st: &Stat, flags: OFlags) -> Result<OwnedFd> {
        let fd = reopen(handle, flags | OFlags::NOCTTY).map_err(|e| {
            refused_open(&format!("{} {}", self.what, shown(self.path)), e)
                .unwrap_or_else(|| self.io(e))
        })?;
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

    fn may_search(&self, dir: &OwnedFd, st: &Stat, at: &Path) -> Result<()> {
        if self.peer.may(At::Fd(dir.as_fd()), st, SEARCH) {
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
            Errno::NAMETOOLONG => Error::InvalidArgument(format!(
                "{} {}: a component is longer than the file system allows; give a shorter path",
                self.what,
                shown(self.path)
            )),
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

    pub(super) fn denied(&self, why: String) -> Error {
        permission_denied(shown(self.path), why)
    }

    pub(super) fn io(&self, e: Errno) -> Error {
        Error::io(shown(self.path), e.into())
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
    plain_components(bytes).ok_or_else(|| {
        Error::InvalidArgument(format!(
            "{what} path {} contains a `.` or `..` component; give the path without them",
            shown(path)
        ))
    })
}
