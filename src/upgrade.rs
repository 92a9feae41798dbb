//! In-place upgrade: berthd replaces its own image with the binary now on disk (`execve` in
//! the same process), handing the listening socket to the new image. Its children, the
//! containers, stay its children, so their exit codes stay exact on any kernel; everything else
//! is rebuilt from the state directory as after a restart.
//!
//! Owns: passing the listener across `execve` and taking it on the other side; taking the
//! listener a service manager passed (socket activation, `sd_listen_fds` semantics).
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

/// The first descriptor a service manager passes (`SD_LISTEN_FDS_START`).
const LISTEN_FDS_START: i32 = 3;

/// The listening socket a service manager passed (`LISTEN_FDS`, `LISTEN_PID`), if any, with
/// `sd_listen_fds` semantics: the variables are only for the process `LISTEN_PID` names, and
/// are removed from the environment so nothing started later takes them for its own. berthd
/// serves one socket: more than one, or one that is not a listening stream socket, is an error.
///
/// # Safety
///
/// As [`take_inherited_listener`]: at most once, from `main` before any other thread exists.
pub unsafe fn take_activated_listener() -> Result<Option<std::os::unix::net::UnixListener>> {
    let pid = std::env::var("LISTEN_PID").ok();
    let fds = std::env::var("LISTEN_FDS").ok();
    for key in ["LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES"] {
        // SAFETY: the caller guarantees no other thread exists, so nothing reads the
        // environment concurrently.
        unsafe { std::env::remove_var(key) };
    }
    let (Some(pid), Some(fds)) = (pid, fds) else {
        return Ok(None);
    };
    if pid.parse::<u32>().ok() != Some(std::process::id()) {
        return Ok(None);
    }
    match fds.parse::<i32>() {
        Ok(0) => return Ok(None),
        Ok(1) => {}
        _ => {
            return Err(Error::InvalidArgument(format!(
                "LISTEN_FDS={fds:?}: berthd serves exactly one socket; give its socket unit one ListenStream"
            )));
        }
    }
    let fd = LISTEN_FDS_START;
    // SAFETY: only borrowed for the checks; an fd number that is not open fails them.
    let borrowed = unsafe { BorrowedFd::borrow_raw(fd) };
    let listening = rustix::net::sockopt::socket_type(borrowed)
        .is_ok_and(|t| t == rustix::net::SocketType::STREAM)
        && rustix::net::sockopt::socket_acceptconn(borrowed).unwrap_or(false);
    if !listening {
        return Err(Error::InvalidArgument(format!(
            "the socket passed as fd {fd} (LISTEN_FDS) is not a listening stream socket; use ListenStream= with a path"
        )));
    }
    // SAFETY: the service manager passed this descriptor to this process (LISTEN_PID), it is a
    // listening socket (checked above), and the caller guarantees this is the only call.
    let owned = unsafe { OwnedFd::from_raw_fd(fd) };
    rustix::io::fcntl_setfd(&owned, FdFlags::CLOEXEC)
        .map_err(|e| Error::sys("mark the activated listener close-on-exec", e))?;
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
