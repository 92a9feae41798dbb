//! In-place upgrade: berthd replaces its own image with the binary now on disk (`execve` in
//! the same process), handing the listening socket to the new image. Its children, the
//! containers, stay its children, so their exit codes stay exact on any kernel; everything else
//! is rebuilt from the state directory as after a restart.
//!
//! Owns: passing the listener across `execve` and taking it on the other side.
//! Does not own: deciding when to upgrade (`daemon::run`), performing it (berthd's `main`) or
//! recovery (supervisor).

use std::ffi::{CString, OsString};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::Path;

use rustix::io::FdFlags;

use crate::error::{Error, Result};

/// Names the descriptor of the listening socket a previous image handed over.
const LISTENER_FD_ENV: &str = "BERTH_UPGRADE_LISTENER_FD";

/// The listening socket handed over by the image that exec'd this one, if any.
///
/// # Safety
///
/// Call at most once, from `main` before any other thread exists: it takes the variable out of
/// the environment, which no other thread may read or write meanwhile, and takes ownership of
/// the descriptor it names, which nothing else in this image may own.
pub unsafe fn take_inherited_listener() -> Result<Option<std::os::unix::net::UnixListener>> {
    let Some(value) = std::env::var_os(LISTENER_FD_ENV) else {
        return Ok(None);
    };
    // SAFETY: the caller guarantees no other thread exists, so nothing reads the environment
    // concurrently.
    unsafe { std::env::remove_var(LISTENER_FD_ENV) };
    let fd: i32 = value.to_str().and_then(|v| v.parse().ok()).ok_or_else(|| {
        Error::InvalidArgument(format!(
            "{LISTENER_FD_ENV}={value:?} is not a descriptor number"
        ))
    })?;
    let stat = rustix::fs::fstat(
        // SAFETY: only borrowed for the check; an fd number that is not open fails fstat.
        unsafe { BorrowedFd::borrow_raw(fd) },
    )
    .map_err(|e| Error::sys(format!("inherited listener fd {fd}"), e))?;
    if rustix::fs::FileType::from_raw_mode(stat.st_mode) != rustix::fs::FileType::Socket {
        return Err(Error::InvalidArgument(format!(
            "inherited listener fd {fd} is not a socket"
        )));
    }
    // SAFETY: the previous image left this descriptor open for us under this number, it is a
    // socket (checked above), and the caller guarantees this is the only call, so nothing else
    // in this new image owns it.
    let owned = unsafe { OwnedFd::from_raw_fd(fd) };
    rustix::io::fcntl_setfd(&owned, FdFlags::CLOEXEC)
        .map_err(|e| Error::sys("mark the inherited listener close-on-exec", e))?;
    Ok(Some(std::os::unix::net::UnixListener::from(owned)))
}

/// Replaces this process's image with `exe` run with `args`, handing `listener` over.
/// Returns only if `execve` failed, with the listener as it was.
pub fn exec(exe: &Path, args: &[OsString], listener: BorrowedFd<'_>) -> Error {
    let cstring = |bytes: &[u8]| {
        CString::new(bytes).map_err(|_| Error::InvalidArgument("argument with a NUL byte".into()))
    };
    let built = (|| {
        let path = cstring(exe.as_os_str().as_bytes())?;
        let mut argv = vec![path.clone()];
        for arg in args {
            argv.push(cstring(arg.as_bytes())?);
        }
        let mut env = Vec::new();
        for (key, value) in std::env::vars_os() {
            if key != LISTENER_FD_ENV {
                let mut pair = key.as_bytes().to_vec();
                pair.push(b'=');
                pair.extend_from_slice(value.as_bytes());
                env.push(cstring(&pair)?);
            }
        }
        env.push(cstring(
            format!("{LISTENER_FD_ENV}={}", listener.as_raw_fd()).as_bytes(),
        )?);
        Ok::<_, Error>((path, argv, env))
    })();
    let (path, argv, env) = match built {
        Ok(built) => built,
        Err(e) => return e,
    };
    if let Err(e) = rustix::io::fcntl_setfd(listener.as_fd(), FdFlags::empty()) {
        return Error::sys("hand over the listener", e);
    }
    let err = match nix::unistd::execve(&path, &argv, &env) {
        Err(e) => e,
        Ok(never) => match never {},
    };
    let _ = rustix::io::fcntl_setfd(listener.as_fd(), FdFlags::CLOEXEC);
    Error::sys(format!("execve {}", exe.display()), err)
}
