//! In-place upgrade: berthd replaces its own image with the binary now on disk (`execve` in
//! the same process), handing the listening socket to the new image. Its children, the
//! containers, stay its children, so their exit codes stay exact on any kernel; everything else
//! is rebuilt from the state directory as after a restart.
//!
//! Owns: passing the listener, the containers' pty masters and their inits' stdio relays across
//! `execve` and taking them on the other side; taking the listener a service manager passed (socket activation,
//! `sd_listen_fds` semantics); closing every other descriptor berthd was started with.
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

/// Names the descriptors of the inits' stdio relays a previous image handed over, in the same
/// form with `container/stream` for the container (ids have no '/'): each relayed stream's pipe
/// and the client's FIFO, so that neither the container (a pipe without a writer reads as
/// end-of-file) nor the client (a FIFO without a writer reads as end-of-file) sees one.
const STDIO_ENV: &str = "BERTH_UPGRADE_STDIO";

/// A container process's pty master, kept open across `execve` so its terminal does not hang up.
#[derive(Debug)]
pub struct HandedTerminal {
    pub container: String,
    pub pid: u32,
    pub master: OwnedFd,
}

/// One kind of descriptor kept per container process between two images: left by the
/// supervisor's relays as they stop for an upgrade, exec'd across, taken at start and claimed by
/// recovery. An `execve` that fails leaves them here for the next run's recovery. Process-wide
/// because they outlive the runtime of a run.
struct Handed {
    /// The variable naming them across `execve`.
    env: &'static str,
    /// What one is, for messages.
    what: &'static str,
    /// The file type one must have, and its name.
    kind: (FileType, &'static str),
    list: Mutex<Vec<(String, u32, OwnedFd)>>,
}

static TERMINALS: Handed = Handed {
    env: TERMINALS_ENV,
    what: "pty master",
    kind: (FileType::CharacterDevice, "character device"),
    list: Mutex::new(Vec::new()),
};

static STDIO: Handed = Handed {
    env: STDIO_ENV,
    what: "stdio pipe or FIFO",
    kind: (FileType::Fifo, "pipe or FIFO"),
    list: Mutex::new(Vec::new()),
};

impl Handed {
    fn lock(&self) -> std::sync::MutexGuard<'_, Vec<(String, u32, OwnedFd)>> {
        self.list
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    fn claim(&self, container: &str, pid: u32) -> Option<OwnedFd> {
        let mut handed = self.lock();
        let at = handed
            .iter()
            .position(|(c, p, _)| c == container && *p == pid)?;
        Some(handed.swap_remove(at).2)
    }

    fn close_unclaimed(&self) -> Vec<(String, u32)> {
        self.lock().drain(..).map(|(c, p, _)| (c, p)).collect()
    }

    /// Takes what the previous image handed over under [`Handed::env`]; returns what it could
    /// not take.
    ///
    /// # Safety
    ///
    /// As [`take_inherited_listener`]: at most once, from `main` before any other thread exists.
    unsafe fn take_inherited(&self) -> Vec<String> {
        let Some(value) = std::env::var_os(self.env) else {
            return Vec::new();
        };
        // SAFETY: the caller guarantees no other thread exists, so nothing reads the
        // environment concurrently.
        unsafe { std::env::remove_var(self.env) };
        let mut problems = Vec::new();
        let value = value.to_string_lossy();
        for entry in value.split(',').filter(|e| !e.is_empty()) {
            let Some((container, pid, fd)) = handed_entry(entry) else {
                problems.push(format!(
                    "{} entry {entry:?} is not container:pid:fd",
                    self.env
                ));
                continue;
            };
            // SAFETY: the previous image left this descriptor open for us under this number,
            // and the caller guarantees one call, so nothing else in this image owns it (the
            // listener's number and the other kinds' are others).
            match unsafe { take_inherited(fd, self.kind, self.what) } {
                Ok(fd) => self.lock().push((container.to_owned(), pid, fd)),
                Err(e) => problems.push(format!("{} of {container} pid {pid}: {e}", self.what)),
            }
        }
        problems
    }
}

/// Leaves a stopped relay's master for the next image.
pub fn hand_over_terminal(terminal: HandedTerminal) {
    TERMINALS
        .lock()
        .push((terminal.container, terminal.pid, terminal.master));
}

/// The master handed over for process `pid` of container `container`, if any.
pub fn claim_terminal(container: &str, pid: u32) -> Option<OwnedFd> {
    TERMINALS.claim(container, pid)
}

/// Closes every handed-over master recovery did not claim (a process that ended meanwhile, or
/// one whose stdio berthd does not record) and says whose they were.
pub fn close_unclaimed_terminals() -> Vec<(String, u32)> {
    TERMINALS.close_unclaimed()
}

/// Leaves `stream` (which end of which of its stdio, as the relay names it) of init `pid`'s
/// stdio relay, stopped, for the next image.
pub fn hand_over_stdio(container: &str, pid: u32, stream: &str, fd: OwnedFd) {
    STDIO
        .lock()
        .push((format!("{container}/{stream}"), pid, fd));
}

/// `stream` of init `pid`'s stdio relay in container `container`, if it was handed over.
pub fn claim_stdio(container: &str, pid: u32, stream: &str) -> Option<OwnedFd> {
    STDIO.claim(&format!("{container}/{stream}"), pid)
}

/// Closes every handed-over stdio descriptor recovery did not claim and says whose they were
/// (`container/stream`).
pub fn close_unclaimed_stdio() -> Vec<(String, u32)> {
    STDIO.close_unclaimed()
}

/// Closes this process's copies of every descriptor the previous image handed over: for a child
/// forked before recovery claims them (the spawn helper), where a copy would keep a pipe or FIFO
/// from ever reading as end-of-file and a pty from ever being freed.
pub fn close_handed_in_child() {
    drop(TERMINALS.close_unclaimed());
    drop(STDIO.close_unclaimed());
}

/// Takes the pty masters and stdio relays handed over by the image that exec'd this one, for
/// recovery to claim. Returns what it could not take, to log once logging runs: one lost is a
/// terminal hung up or a stdin at end-of-file, never a reason not to start.
///
/// # Safety
///
/// As [`take_inherited_listener`]: at most once, from `main` before any other thread exists.
pub unsafe fn take_inherited_stdio() -> Vec<String> {
    // SAFETY: the caller's guarantee, passed on; each kind is taken once.
    let mut problems = unsafe { TERMINALS.take_inherited() };
    // SAFETY: as above.
    problems.extend(unsafe { STDIO.take_inherited() });
    problems
}

/// Closes every descriptor above stderr that this image has not taken. One a parent left open
/// (a supervisor's pipe, a shell's redirection) would otherwise be held by berthd, its spawn
/// helper and every runtime command for as long as berthd runs: the parent would never read
/// that pipe's end, and a file it meant for itself would reach every runtime command.
///
/// # Safety
///
/// Call once from `main`, after the takes and before anything else opens a descriptor: nothing
/// in this image may own a descriptor other than stdio, `taken` and what the takes hold.
pub unsafe fn close_untaken_descriptors(taken: &[BorrowedFd<'_>]) {
    let mut kept: Vec<i32> = taken.iter().map(AsRawFd::as_raw_fd).collect();
    for kind in [&TERMINALS, &STDIO] {
        kept.extend(kind.lock().iter().map(|(_, _, fd)| fd.as_raw_fd()));
    }
    kept.sort_unstable();
    let mut first = 3;
    for fd in kept.into_iter().filter(|&fd| fd >= 3) {
        if fd > first {
            // SAFETY: between two kept descriptors, so owned by nothing (this function's
            // contract).
            unsafe { close_range(first, fd - 1) };
        }
        first = fd + 1;
    }
    // SAFETY: above every kept descriptor, as above.
    unsafe { close_range(first, i32::MAX) };
}

/// Closes descriptors `first..=last`, those open among them.
///
/// # Safety
///
/// Nothing in this image owns a descriptor in the range, and no other thread opens one.
unsafe fn close_range(first: i32, last: i32) {
    // SAFETY: close_range only closes, and nothing owns what it closes (the contract).
    let closed = unsafe { libc::syscall(libc::SYS_close_range, first as u32, last as u32, 0u32) };
    if closed == 0 {
        return;
    }
    // Kernels before 5.9 have no close_range: close what /proc lists. The listing's own
    // descriptor is among them, closed already when it is closed again (EBADF, harmless: no
    // other thread can have opened its number meanwhile).
    let Ok(listing) = std::fs::read_dir("/proc/self/fd") else {
        return;
    };
    let open: Vec<i32> = listing
        .flatten()
        .filter_map(|entry| entry.file_name().to_str()?.parse().ok())
        .filter(|fd| (first..=last).contains(fd))
        .collect();
    for fd in open {
        // SAFETY: in the range, so owned by nothing (the contract).
        unsafe { libc::close(fd) };
    }
}

/// One `container:pid:fd` entry of [`TERMINALS_ENV`] or [`STDIO_ENV`].
fn handed_entry(entry: &str) -> Option<(&str, u32, i32)> {
    let mut parts = entry.rsplitn(3, ':');
    let (fd, pid, container) = (parts.next()?, parts.next()?, parts.next()?);
    if container.is_empty() {
        return None;
    }
    Some((container, pid.parse().ok()?, fd.parse().ok()?))
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

/// Replaces this process's image with `exe` run with `args`, handing `listener`, the pty
/// masters left by [`hand_over_terminal`] and the stdio relays' descriptors left by [`hand_over_stdio`]
/// over. Returns only if `execve` failed, with all of them as they were.
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
            if key != LISTENER_FD_ENV && key != TERMINALS_ENV && key != STDIO_ENV {
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
    let kinds = [&TERMINALS, &STDIO];
    let lists: Vec<_> = kinds.iter().map(|kind| kind.lock()).collect();
    // One that cannot be handed over is closed by the exec: its terminal hangs up or its stdin
    // ends, as before there was a handover, and no other is held back for it.
    let handed: Vec<Vec<&(String, u32, OwnedFd)>> = lists
        .iter()
        .zip(kinds)
        .map(|(list, kind)| {
            list.iter()
                .filter(|(container, pid, fd)| {
                    let cleared = rustix::io::fcntl_setfd(fd, FdFlags::empty());
                    if let Err(e) = &cleared {
                        tracing::warn!(id = %container, pid, error = %e, "{} lost: it could not be handed over", kind.what);
                    }
                    cleared.is_ok()
                })
                .collect()
        })
        .collect();
    for (handed, kind) in handed.iter().zip(kinds) {
        let named: Vec<String> = handed
            .iter()
            .map(|(container, pid, fd)| format!("{container}:{pid}:{}", fd.as_raw_fd()))
            .collect();
        match cstring(format!("{}={}", kind.env, named.join(",")).as_bytes()) {
            Ok(pair) => env.push(pair),
            Err(e) => return e,
        }
    }
    let restore_handed = || {
        for (_, _, fd) in handed.iter().flatten() {
            let _ = rustix::io::fcntl_setfd(fd, FdFlags::CLOEXEC);
        }
    };
    if let Err(e) = rustix::io::fcntl_setfd(listener.as_fd(), FdFlags::empty()) {
        restore_handed();
        return Error::sys("hand over the listener", e);
    }
    tracing::info!(
        terminals = handed[0].len(),
        stdio = handed[1].len(),
        "handing the listener, pty masters and stdio relays over"
    );
    let err = match nix::unistd::execve(&path, &argv, &env) {
        Err(e) => e,
        Ok(never) => match never {},
    };
    let _ = rustix::io::fcntl_setfd(listener.as_fd(), FdFlags::CLOEXEC);
    restore_handed();
    Error::sys(format!("execve {}", exe.display()), err)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::fd::IntoRawFd;

    /// Takes `fd` as a `kind` would be taken from a previous image.
    fn take(kind: &Handed, fd: i32) -> Result<OwnedFd> {
        // SAFETY: each test passes a descriptor it gave up ownership of (into_raw_fd), or one it
        // still owns and that the check refuses without taking.
        unsafe { take_inherited(fd, kind.kind, kind.what) }
    }

    #[test]
    fn handed_entries_name_a_container_a_pid_and_a_descriptor() {
        assert_eq!(handed_entry("web-1.x:42:7"), Some(("web-1.x", 42, 7)));
        for bad in ["", "a:1", ":1:2", "a:x:2", "a:1:y", "a:-1:2"] {
            assert_eq!(handed_entry(bad), None, "{bad:?}");
        }
    }

    #[test]
    fn only_a_character_device_is_taken_as_a_master_and_claimed_once() {
        let null = std::fs::File::open("/dev/null").unwrap();
        let master = take(&TERMINALS, null.into_raw_fd()).unwrap();
        assert!(
            rustix::io::fcntl_getfd(&master)
                .unwrap()
                .contains(FdFlags::CLOEXEC)
        );
        let file = tempfile::tempfile().unwrap();
        let fd = file.as_raw_fd();
        assert!(matches!(
            take(&TERMINALS, fd),
            Err(Error::InvalidArgument(_))
        ));
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

    #[test]
    fn only_a_pipe_or_fifo_is_taken_as_stdio_and_claimed_once_by_stream() {
        let (read, write) = rustix::pipe::pipe().unwrap();
        let pipe = take(&STDIO, write.into_raw_fd()).unwrap();
        let null = std::fs::File::open("/dev/null").unwrap();
        assert!(matches!(
            take(&STDIO, null.as_raw_fd()),
            Err(Error::InvalidArgument(_))
        ));
        hand_over_stdio("piped-once", 7, "stdin-pipe", pipe);
        assert!(claim_stdio("piped-once", 8, "stdin-pipe").is_none());
        assert!(claim_stdio("piped-once", 7, "stdin-fifo").is_none());
        let claimed = claim_stdio("piped-once", 7, "stdin-pipe").expect("claimed");
        rustix::io::write(&claimed, b"x").unwrap();
        assert_eq!(rustix::io::read(&read, &mut [0u8; 1]).unwrap(), 1);
        assert!(claim_stdio("piped-once", 7, "stdin-pipe").is_none());
    }
}
