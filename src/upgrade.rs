//! In-place upgrade: berthd replaces its own image with the binary now on disk (`execve` in
//! the same process), handing the listening socket to the new image. Its children, the
//! containers, stay its children, so their exit codes stay exact on any kernel; everything else
//! is rebuilt from the state directory as after a restart.
//!
//! Owns: passing the listener and the containers' pty masters across `execve` and taking them
//! on the other side; taking the listener a service manager passed (socket activation,
//! `sd_listen_fds` semantics).
//! Does not own: deciding when to upgrade (`daemon::run`), performing it (berthd's `main`) or
//! recovery (supervisor).

use std::ffi::{CString, OsString};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::Path;
use std::sync::Mutex;

use rustix::fs::FileType;
use rustix::io::FdFlags;

use crate::error::{Error, Result};

/// Names the descriptor of the listening socket a previous image handed over.
const LISTENER_FD_ENV: &str = "BERTH_UPGRADE_LISTENER_FD";

/// Names the pty masters a previous image handed over: `container:pid:fd`, comma-separated
/// (container ids have neither ':' nor ',').
const TERMINALS_ENV: &str = "BERTH_UPGRADE_TERMINALS";

/// A container process's pty master, kept open across `execve` so its terminal does not hang up.
#[derive(Debug)]
pub struct HandedTerminal {
    pub container: String,
    pub pid: u32,
    pub master: OwnedFd,
}

/// The masters between two images: left by the supervisor's relays as they stop for an upgrade,
/// exec'd across, taken at start and claimed by recovery. An `execve` that fails leaves them
/// here for the next run's recovery. Process-wide because they outlive the runtime of a run.
static HANDED_TERMINALS: Mutex<Vec<HandedTerminal>> = Mutex::new(Vec::new());

fn handed_terminals() -> std::sync::MutexGuard<'static, Vec<HandedTerminal>> {
    HANDED_TERMINALS
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// Leaves a stopped relay's master for the next image.
pub fn hand_over_terminal(terminal: HandedTerminal) {
    handed_terminals().push(terminal);
}

/// The master handed over for process `pid` of container `container`, if any.
pub fn claim_terminal(container: &str, pid: u32) -> Option<OwnedFd> {
    let mut handed = handed_terminals();
    let at = handed
        .iter()
        .position(|t| t.container == container && t.pid == pid)?;
    Some(handed.swap_remove(at).master)
}

/// Closes every handed-over master recovery did not claim (a process that ended meanwhile, or
/// one whose stdio berthd does not record) and says whose they were.
pub fn close_unclaimed_terminals() -> Vec<(String, u32)> {
    handed_terminals()
        .drain(..)
        .map(|t| (t.container, t.pid))
        .collect()
}

/// Takes the pty masters handed over by the image that exec'd this one, for recovery to claim.
/// Returns what it could not take, to log once logging runs: a master lost is a terminal hung
/// up, never a reason not to start.
///
/// # Safety
///
/// As [`take_inherited_listener`]: at most once, from `main` before any other thread exists.
pub unsafe fn take_inherited_terminals() -> Vec<String> {
    let Some(value) = std::env::var_os(TERMINALS_ENV) else {
        return Vec::new();
    };
    // SAFETY: the caller guarantees no other thread exists, so nothing reads the environment
    // concurrently.
    unsafe { std::env::remove_var(TERMINALS_ENV) };
    let mut problems = Vec::new();
    let value = value.to_string_lossy();
    for entry in value.split(',').filter(|e| !e.is_empty()) {
        let Some((container, pid, fd)) = terminal_entry(entry) else {
            problems.push(format!(
                "{TERMINALS_ENV} entry {entry:?} is not container:pid:fd"
            ));
            continue;
        };
        match take_master(fd) {
            Ok(master) => hand_over_terminal(HandedTerminal {
                container: container.to_owned(),
                pid,
                master,
            }),
            Err(e) => problems.push(format!("terminal of {container} pid {pid}: {e}")),
        }
    }
    problems
}

/// One `container:pid:fd` entry of [`TERMINALS_ENV`].
fn terminal_entry(entry: &str) -> Option<(&str, u32, i32)> {
    let mut parts = entry.rsplitn(3, ':');
    let (fd, pid, container) = (parts.next()?, parts.next()?, parts.next()?);
    if container.is_empty() {
        return None;
    }
    Some((container, pid.parse().ok()?, fd.parse().ok()?))
}

/// Takes ownership of inherited descriptor `fd` if it is a character device (a pty master).
fn take_master(fd: i32) -> Result<OwnedFd> {
    // SAFETY: the previous image left this descriptor open for us under this number, and the
    // caller of take_inherited_terminals guarantees one call, so nothing else in this image
    // owns it (the listener's number is another).
    unsafe {
        take_inherited(
            fd,
            (FileType::CharacterDevice, "character device"),
            "pty master",
        )
    }
}

/// Takes ownership of `fd`, left open by the previous image, if it is a `kind` (the `what` it
/// was handed over as), and marks it close-on-exec again.
///
/// # Safety
///
/// If `fd` is open, the previous image left it to this one as the `what`, and nothing else in
/// this image owns it.
unsafe fn take_inherited(
    fd: i32,
    (kind, kind_name): (FileType, &str),
    what: &str,
) -> Result<OwnedFd> {
    if fd < 0 {
        return Err(Error::InvalidArgument(format!(
            "fd {fd} is not a descriptor"
        )));
    }
    // SAFETY: only borrowed for the check; an fd number that is not open fails fstat.
    let stat = rustix::fs::fstat(unsafe { BorrowedFd::borrow_raw(fd) })
        .map_err(|e| Error::sys(format!("inherited {what} fd {fd}"), e))?;
    if FileType::from_raw_mode(stat.st_mode) != kind {
        return Err(Error::InvalidArgument(format!(
            "inherited {what} fd {fd} is not a {kind_name}"
        )));
    }
    // SAFETY: it is open and of the expected kind (checked above), and the caller guarantees
    // the previous image left it to us and nothing else here owns it.
    let owned = unsafe { OwnedFd::from_raw_fd(fd) };
    rustix::io::fcntl_setfd(&owned, FdFlags::CLOEXEC)
        .map_err(|e| Error::sys(format!("mark the inherited {what} close-on-exec"), e))?;
    Ok(owned)
}

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
    // SAFETY: the previous image left this descriptor open for us under this number, and the
    // caller guarantees this is the only call, so nothing else in this new image owns it.
    let owned = unsafe { take_inherited(fd, (FileType::Socket, "socket"), "listener") }?;
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

/// Replaces this process's image with `exe` run with `args`, handing `listener` and the pty
/// masters left by [`hand_over_terminal`] over. Returns only if `execve` failed, with the
/// listener and the masters as they were.
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
            if key != LISTENER_FD_ENV && key != TERMINALS_ENV {
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
    let (path, argv, mut env) = match built {
        Ok(built) => built,
        Err(e) => return e,
    };
    let terminals = handed_terminals();
    // A master that cannot be handed over is closed by the exec: its terminal hangs up, as
    // before there was a handover, and no other terminal is held back for it.
    let handed: Vec<&HandedTerminal> = terminals
        .iter()
        .filter(|t| {
            let cleared = rustix::io::fcntl_setfd(&t.master, FdFlags::empty());
            if let Err(e) = &cleared {
                tracing::warn!(id = %t.container, pid = t.pid, error = %e, "terminal lost: its pty master could not be handed over");
            }
            cleared.is_ok()
        })
        .collect();
    let named: Vec<String> = handed
        .iter()
        .map(|t| format!("{}:{}:{}", t.container, t.pid, t.master.as_raw_fd()))
        .collect();
    match cstring(format!("{TERMINALS_ENV}={}", named.join(",")).as_bytes()) {
        Ok(pair) => env.push(pair),
        Err(e) => return e,
    }
    let restore_terminals = || {
        for t in &handed {
            let _ = rustix::io::fcntl_setfd(&t.master, FdFlags::CLOEXEC);
        }
    };
    if let Err(e) = rustix::io::fcntl_setfd(listener.as_fd(), FdFlags::empty()) {
        restore_terminals();
        return Error::sys("hand over the listener", e);
    }
    tracing::info!(
        terminals = handed.len(),
        "handing the listener and pty masters over"
    );
    let err = match nix::unistd::execve(&path, &argv, &env) {
        Err(e) => e,
        Ok(never) => match never {},
    };
    let _ = rustix::io::fcntl_setfd(listener.as_fd(), FdFlags::CLOEXEC);
    restore_terminals();
    Error::sys(format!("execve {}", exe.display()), err)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::fd::IntoRawFd;

    #[test]
    fn terminal_entries_name_a_container_a_pid_and_a_descriptor() {
        assert_eq!(terminal_entry("web-1.x:42:7"), Some(("web-1.x", 42, 7)));
        for bad in ["", "a:1", ":1:2", "a:x:2", "a:1:y", "a:-1:2"] {
            assert_eq!(terminal_entry(bad), None, "{bad:?}");
        }
    }

    #[test]
    fn only_a_character_device_is_taken_as_a_master_and_claimed_once() {
        let null = std::fs::File::open("/dev/null").unwrap();
        let master = take_master(null.into_raw_fd()).unwrap();
        assert!(
            rustix::io::fcntl_getfd(&master)
                .unwrap()
                .contains(FdFlags::CLOEXEC)
        );
        let file = tempfile::tempfile().unwrap();
        let fd = file.as_raw_fd();
        assert!(matches!(take_master(fd), Err(Error::InvalidArgument(_))));
        drop(file);
        hand_over_terminal(HandedTerminal {
            container: "claimed-once".into(),
            pid: 7,
            master,
        });
        assert!(claim_terminal("claimed-once", 8).is_none());
        assert!(claim_terminal("claimed-once", 7).is_some());
        assert!(claim_terminal("claimed-once", 7).is_none());
    }
}
