//! Exit tracking for the processes berthd is parent of: container inits, added processes and
//! orphans reparented to it as the child subreaper.
//!
//! Owns: one pidfd per tracked process, polled by the tokio reactor; collecting a tracked
//! process's status with `waitid(P_PIDFD)`, or from the pidfd for an adopted one; opening its
//! namespaces; reaping orphans nobody registered; collecting nothing once berthd stops or
//! upgrades ([`Reaper::stop_collecting`]), and the statuses an upgrade left uncollected.
//! Does not own: decoding a wait status (the one decoder is [`crate::wait_status::exit_code`]),
//! what an exit means for a container (the supervisor) or spawning (spawn).
//!
//! Nothing here reaps with `waitpid(-1)`. Orphans are found by peeking with
//! `waitid(P_ALL, WNOWAIT)`, which reaps nothing, and reaped by pid only when untracked and
//! unclaimed, under the same lock that registration takes. A runtime command's init becomes
//! berthd's child only when the command exits, after it wrote the init's pid file (runc writes it
//! whole, by rename); an init that exits at once is already a zombie then. A [`PidClaim`] on that
//! pid file, taken before the command runs, keeps the sweep off the pid it names until it is
//! tracked, so registration collects the true status through the pidfd and the zombie's
//! `/proc/<pid>` stays readable meanwhile. A process that exits before it is registered without a
//! claim (an added process) may be reaped as an orphan first; its exit code is kept for a while
//! so registration still reports the true code.
//!
//! Processes adopted after a restart are not berthd's children: their exit code comes from the
//! pidfd (`PIDFD_GET_INFO` with `PIDFD_INFO_EXIT`, Linux ≥ 6.15) whoever reaps them, or is
//! reported as [`UNKNOWN_EXIT`] where the kernel lacks it.
//!
//! A tracked process's namespaces are opened through its pidfd (`PIDFD_GET_*_NAMESPACE`, Linux ≥
//! 6.11), or from `/proc/<pid>/ns` where the kernel cannot; what holding them is for is the
//! supervisor's.

#[allow(unsafe_code)]
mod sys;

use std::collections::{HashMap, HashSet};
use std::io;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use tokio::io::unix::AsyncFd;

use sys::WaitTarget;

use crate::error::{Error, Result};
use crate::wait_status::exit_code;

/// The exit code reported when the true one cannot be known.
pub(crate) const UNKNOWN_EXIT: u32 = 255;
/// How long the exit code of an orphan reaped before registration is kept for it.
const ORPHAN_EXIT_RETENTION: Duration = Duration::from_secs(300);
/// How long to wait for the parent of an adopted process to reap it so its status is known.
const EXIT_INFO_WAIT: Duration = Duration::from_secs(15);
/// How soon to look again when the oldest zombie is a tracked process its waiter has not reaped yet.
const SWEEP_RETRY: Duration = Duration::from_millis(20);

#[derive(Default)]
struct Tables {
    /// Set once berthd stops collecting exits ([`Reaper::stop_collecting`]).
    stopped_collecting: bool,
    tracked: HashSet<i32>,
    orphan_exits: HashMap<i32, (u32, Instant)>,
    /// Pid files whose pid registration is about to track, by claim number.
    claims: HashMap<u64, Claimed>,
    next_claim: u64,
}

/// A pid file a [`PidClaim`] holds, and its pid once the sweep has read it.
struct Claimed {
    pid_file: PathBuf,
    pid: Option<i32>,
}

/// The most a pid file holds: a pid and a newline.
const PID_FILE_MAX_BYTES: u64 = 32;

impl Tables {
    /// Whether a claim names `pid`. A claim whose pid file does not exist yet names no zombie:
    /// its command has not finished, so its init is still the command's child, not berthd's. One
    /// whose pid file cannot be read whole counts as naming it: the sweep then only waits.
    fn claimed(&mut self, pid: i32) -> bool {
        self.claims.values_mut().any(|claim| {
            if claim.pid.is_none() {
                match read_pid_file(&claim.pid_file) {
                    Ok(Some(read)) => claim.pid = Some(read),
                    Ok(None) => return false,
                    Err(e) => {
                        tracing::debug!(pid_file = %claim.pid_file.display(), error = %e, "claimed pid file unreadable; the sweep waits");
                        return true;
                    }
                }
            }
            claim.pid == Some(pid)
        })
    }
}

/// The pid a runtime wrote to its `--pid-file` at `path`, read no further than a pid can be
/// long; `None` while it does not exist.
pub(crate) fn read_pid_file(path: &Path) -> io::Result<Option<i32>> {
    use std::io::Read;
    let file = match std::fs::File::open(path) {
        Ok(file) => file,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(e),
    };
    let mut text = String::new();
    file.take(PID_FILE_MAX_BYTES).read_to_string(&mut text)?;
    text.trim()
        .parse()
        .map(Some)
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidData, format!("not a pid: {text:?}")))
}

/// Which of a tracked process's namespaces to open ([`TrackedProcess::open_namespaces`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Namespace {
    Mount,
    Network,
}

impl Namespace {
    fn proc_name(self) -> &'static str {
        match self {
            Namespace::Mount => "mnt",
            Namespace::Network => "net",
        }
    }

    fn pidfd_request(self) -> libc::c_ulong {
        match self {
            Namespace::Mount => sys::PIDFD_GET_MNT_NAMESPACE,
            Namespace::Network => sys::PIDFD_GET_NET_NAMESPACE,
        }
    }

    /// Whether `namespace` is berthd's own of this kind. A namespace is its inode; berthd's are
    /// looked up until found once (nothing in berthd changes namespace, and an upgrade's exec
    /// starts afresh).
    fn is_shared_with_berthd(self, namespace: &OwnedFd) -> bool {
        static MOUNT: OnceLock<(u64, u64)> = OnceLock::new();
        static NETWORK: OnceLock<(u64, u64)> = OnceLock::new();
        let identity = |st: rustix::fs::Stat| (st.st_dev, st.st_ino);
        let cached = match self {
            Namespace::Mount => &MOUNT,
            Namespace::Network => &NETWORK,
        };
        let own = match cached.get() {
            Some(own) => *own,
            None => {
                let path = format!("/proc/self/ns/{}", self.proc_name());
                match rustix::fs::stat(path) {
                    Ok(st) => *cached.get_or_init(|| identity(st)),
                    // Not known: held, as a namespace of its own would be.
                    Err(_) => return false,
                }
            }
        };
        rustix::fs::fstat(namespace).is_ok_and(|st| identity(st) == own)
    }
}

/// Every process descending from `pid`, from each of its threads' `children` in /proc.
fn descendants_of(pid: i32) -> Vec<i32> {
    let mut found = Vec::new();
    let mut looking = vec![pid];
    while let Some(parent) = looking.pop() {
        let Ok(tasks) = std::fs::read_dir(format!("/proc/{parent}/task")) else {
            continue;
        };
        for task in tasks.flatten() {
            for child in crate::procfs::read_pids(task.path().join("children")) {
                // A bound against a loop through a pid reused meanwhile.
                if !found.contains(&child) && found.len() < 4096 {
                    found.push(child);
                    looking.push(child);
                }
            }
        }
    }
    found
}

/// Tracks child processes by pidfd and reaps orphans.
pub struct Reaper {
    tables: Mutex<Tables>,
    exit_info: bool,
}

impl Reaper {
    pub fn new() -> Arc<Self> {
        let exit_info = kernel_reports_exit_status();
        Arc::new(Reaper {
            tables: Mutex::default(),
            exit_info,
        })
    }

    /// From now on no exit watcher collects an exit ([`TrackedProcess::wait_collected`]) and the
    /// orphan sweep reaps nothing: berthd is stopping or upgrading, its Events streams are about
    /// to end, and an exit collected now would reach nobody while its record went. Left
    /// uncollected, the next image adopts it with its status, or the next start reports it.
    pub(crate) fn stop_collecting(&self) {
        self.tables
            .lock()
            .expect("reaper lock poisoned")
            .stopped_collecting = true;
    }

    /// Whether the kernel reports the exit status of processes berthd is not the parent of.
    pub fn exit_info_supported(&self) -> bool {
        self.exit_info
    }

    /// The exit status of `pid`, an init the runtime reports stopped at a restart or upgrade,
    /// where it is still berthd's to collect: a zombie child that started at `start_time`
    /// (clock ticks since boot), left by an image that stopped collecting before its upgrade,
    /// or one the orphan sweep has reaped since. None where the host's init reaped it.
    pub(crate) fn collect_ended(&self, pid: i32, start_time: u64) -> Option<u32> {
        let mut tables = self.tables.lock().expect("reaper lock poisoned");
        if let Some((code, _)) = tables.orphan_exits.remove(&pid) {
            return Some(code);
        }
        let fd = sys::open(pid).ok()?;
        match crate::procfs::process_start_time(pid as u32) {
            Ok(now) if now == start_time => {}
            _ => return None,
        }
        let (_, raw) = sys::waitid(WaitTarget::PidFd(fd.as_fd()), false).ok()??;
        Some(exit_code(raw).unwrap_or(UNKNOWN_EXIT))
    }

    /// Starts tracking `pid` again after a restart or upgrade, if it is still the process that
    /// started at `start_time` (clock ticks since boot). `Ok(None)` when it is gone.
    pub(crate) fn adopt(
        self: &Arc<Self>,
        pid: i32,
        start_time: u64,
    ) -> Result<Option<TrackedProcess>> {
        let mut tables = self.tables.lock().expect("reaper lock poisoned");
        let fd = match sys::open(pid) {
            Ok(fd) => fd,
            Err(e) if e.raw_os_error() == Some(libc::ESRCH) => return Ok(None),
            Err(e) => return Err(Error::sys(format!("pidfd_open {pid}"), e)),
        };
        // Checked after the pidfd is open: if the pid was reused before, the start time differs;
        // if the process ends after, the pidfd still refers to it and reports its exit.
        match crate::procfs::process_start_time(pid as u32) {
            Ok(now) if now == start_time => {}
            _ => return Ok(None),
        }
        let child = !is_not_our_child(sys::waitid(WaitTarget::PidFd(fd.as_fd()), true));
        let fd = crate::reactor::register(fd, tokio::io::Interest::READABLE)
            .map_err(|e| Error::sys(format!("register pidfd of {pid}"), e))?;
        if child {
            tables.tracked.insert(pid);
        }
        Ok(Some(TrackedProcess {
            pid,
            fd: Some(fd),
            early_exit: None,
            child,
            reaper: Arc::clone(self),
        }))
    }

    /// Starts tracking `pid`, a child of this process. Must be called from within the tokio
    /// runtime. A child that already exited and was reaped as an orphan yields a process whose
    /// wait returns at once with its recorded code.
    pub(crate) fn track(self: &Arc<Self>, pid: i32) -> Result<TrackedProcess> {
        let mut tables = self.tables.lock().expect("reaper lock poisoned");
        match sys::open(pid) {
            Ok(fd) => {
                // A pidfd of a process that is not our child would never yield a status.
                if is_not_our_child(sys::waitid(WaitTarget::PidFd(fd.as_fd()), true)) {
                    return Err(Error::Internal(format!(
                        "pid {pid} is not a child of berthd; is berthd the child subreaper?"
                    )));
                }
                let fd = crate::reactor::register(fd, tokio::io::Interest::READABLE)
                    .map_err(|e| Error::sys(format!("register pidfd of {pid}"), e))?;
                tables.tracked.insert(pid);
                Ok(TrackedProcess {
                    pid,
                    fd: Some(fd),
                    early_exit: None,
                    child: true,
                    reaper: Arc::clone(self),
                })
            }
            Err(e) if e.raw_os_error() == Some(libc::ESRCH) => {
                match tables.orphan_exits.remove(&pid) {
                    Some((code, _)) => Ok(TrackedProcess {
                        pid,
                        fd: None,
                        early_exit: Some(code),
                        child: true,
                        reaper: Arc::clone(self),
                    }),
                    None => Err(Error::Internal(format!(
                        "process {pid} is gone and its exit status was not seen"
                    ))),
                }
            }
            Err(e) => Err(Error::sys(format!("pidfd_open {pid}"), e)),
        }
    }

    /// Claims the pid a runtime command will write to `pid_file`: until the claim is dropped,
    /// the orphan sweep does not reap it, so [`Reaper::track`] finds it even if it exited at
    /// once. Take it before the command runs and drop it once the pid is tracked.
    pub(crate) fn claim(self: &Arc<Self>, pid_file: &Path) -> PidClaim {
        let mut tables = self.tables.lock().expect("reaper lock poisoned");
        let key = tables.next_claim;
        tables.next_claim += 1;
        let claimed = Claimed {
            pid_file: pid_file.to_owned(),
            pid: None,
        };
        tables.claims.insert(key, claimed);
        PidClaim {
            reaper: Arc::clone(self),
            key,
        }
    }

    /// Kills with SIGKILL, through pidfds, each of `pids` that is a runtime's init stage a
    /// runtime killed at its timeout left behind (runc's `init`, running the createContainer
    /// hooks), and every process descending from it; returns how many. An init stage is
    /// berthd's own child, reparented as the runtime died, neither tracked nor claimed, started
    /// at tick `since` or later, with `runtime` as its `argv[0]` (runc's init runs a sealed copy
    /// of runc, so its executable's path says nothing). Nothing else is berthd's to kill: the
    /// cgroup may be another container's, whose orphans are berthd's children too. Blocks on
    /// /proc: call it off the reactor.
    pub(crate) fn kill_left_init_stages(&self, pids: &[i32], runtime: &[u8], since: u64) -> usize {
        let own = std::process::id();
        let mut killed = 0;
        for &pid in pids {
            // Looked at once the pidfd is open, so what is looked at is what is signalled.
            let Ok(pidfd) = sys::open(pid) else {
                continue;
            };
            let mine = crate::procfs::process_parent(pid as u32).is_ok_and(|parent| parent == own);
            let runs_runtime = crate::procfs::read_generated(format!("/proc/{pid}/cmdline"), 256)
                .is_ok_and(|cmdline| cmdline.split(|&b| b == 0).next() == Some(runtime));
            let started = crate::procfs::process_start_time(pid as u32).is_ok_and(|t| t >= since);
            let registered = {
                let mut tables = self.tables.lock().expect("reaper lock poisoned");
                tables.tracked.contains(&pid) || tables.claimed(pid)
            };
            if !(mine && runs_runtime && started) || registered {
                continue;
            }
            // Its descendants are held by pidfd before it dies: without a pid namespace of
            // their own they would outlive it, reparented to berthd like any orphan.
            let descendants: Vec<OwnedFd> = descendants_of(pid)
                .into_iter()
                .filter_map(|child| sys::open(child).ok())
                .collect();
            for fd in std::iter::once(&pidfd).chain(&descendants) {
                if sys::send_signal(fd.as_fd(), libc::SIGKILL).is_ok() {
                    killed += 1;
                }
            }
        }
        killed
    }

    /// Reaps every zombie child that is neither tracked nor claimed. Returns false when such a
    /// zombie is in the way and the sweep should be retried shortly.
    fn sweep(&self) -> bool {
        loop {
            if self
                .tables
                .lock()
                .expect("reaper lock poisoned")
                .stopped_collecting
            {
                return true;
            }
            let pid = match sys::waitid(WaitTarget::Any, true) {
                Ok(Some((pid, _))) => pid,
                Ok(None) | Err(_) => return true,
            };
            let mut tables = self.tables.lock().expect("reaper lock poisoned");
            if tables.stopped_collecting {
                return true;
            }
            if tables.tracked.contains(&pid) || tables.claimed(pid) {
                return false;
            }
            match sys::waitid(WaitTarget::Pid(pid), false) {
                Ok(Some((_, raw))) => {
                    if let Some(code) = exit_code(raw) {
                        tracing::debug!(pid, code, "reaped an orphan");
                        let now = Instant::now();
                        tables
                            .orphan_exits
                            .retain(|_, (_, at)| now.duration_since(*at) < ORPHAN_EXIT_RETENTION);
                        tables.orphan_exits.insert(pid, (code, now));
                    }
                }
                Ok(None) => return true,
                // Another waiter reaped it between the look and the reap: nothing is lost.
                Err(e) if e.raw_os_error() == Some(libc::ECHILD) => return true,
                Err(e) => {
                    tracing::warn!(pid, error = %e, "could not reap orphan");
                    return true;
                }
            }
        }
    }

    /// Runs the orphan sweep once SIGCHLD is watched, then on every SIGCHLD, for as long as the
    /// runtime lives.
    pub fn spawn_orphan_sweeper(self: &Arc<Self>) -> io::Result<()> {
        let mut sigchld = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::child())?;
        let reaper = Arc::clone(self);
        tokio::spawn(async move {
            // A child that ended before the watch signalled no one: SIGCHLD's default action
            // discards it. After an upgrade that is the old image's spawn helper, which exits
            // when the execve closes its socket; at any start, an orphan that ended during
            // recovery. Swept now, since no later SIGCHLD need come.
            let mut retry = !reaper.sweep();
            loop {
                if retry {
                    tokio::select! {
                        _ = sigchld.recv() => {}
                        _ = tokio::time::sleep(SWEEP_RETRY) => {}
                    }
                } else if sigchld.recv().await.is_none() {
                    return;
                }
                retry = !reaper.sweep();
            }
        });
        Ok(())
    }

    #[cfg(test)]
    fn tracked_count(&self) -> usize {
        self.tables.lock().unwrap().tracked.len()
    }
}

/// Keeps the orphan sweep off the pid in a pid file until dropped ([`Reaper::claim`]).
pub(crate) struct PidClaim {
    reaper: Arc<Reaper>,
    key: u64,
}

impl Drop for PidClaim {
    fn drop(&mut self) {
        let mut tables = self.reaper.tables.lock().expect("reaper lock poisoned");
        tables.claims.remove(&self.key);
    }
}

/// A tracked child process: its pidfd in the reactor, or the exit code recorded when it was
/// reaped as an orphan before registration.
pub(crate) struct TrackedProcess {
    pid: i32,
    fd: Option<AsyncFd<OwnedFd>>,
    early_exit: Option<u32>,
    /// False for a process adopted after a restart: someone else is its parent.
    child: bool,
    reaper: Arc<Reaper>,
}

impl TrackedProcess {
    pub fn pid(&self) -> i32 {
        self.pid
    }

    /// Whether the process has exited (its pidfd polls readable), whether or not it is reaped.
    pub fn has_exited(&self) -> bool {
        let Some(fd) = &self.fd else {
            return true;
        };
        let mut poll = [rustix::event::PollFd::new(
            fd.get_ref(),
            rustix::event::PollFlags::IN,
        )];
        let no_wait = rustix::time::Timespec::default();
        matches!(rustix::event::poll(&mut poll, Some(&no_wait)), Ok(n) if n > 0)
    }

    /// Sends `signal` through the pidfd, so a recycled pid is never signalled by mistake.
    pub fn signal(&self, signal: i32) -> Result<()> {
        let fd = self
            .fd
            .as_ref()
            .ok_or_else(|| Error::NotFound(format!("process {} has already exited", self.pid)))?;
        sys::send_signal(fd.get_ref().as_fd(), signal).map_err(|e| {
            if e.raw_os_error() == Some(libc::ESRCH) {
                Error::NotFound(format!("process {} has already exited", self.pid))
            } else {
                Error::sys(format!("signal {signal} to process {}", self.pid), e)
            }
        })
    }

    /// Opens the process's namespaces of `kinds` that it does not share with berthd. Through its
    /// pidfd, which names this process and no other, so no check that it still runs is needed:
    /// once it has exited the kernel has none to give (ESRCH), and what was opened before that
    /// is still its own.
    pub fn open_namespaces(&self, kinds: &[Namespace]) -> Vec<OwnedFd> {
        static PIDFD_REQUESTS_UNKNOWN: AtomicBool = AtomicBool::new(false);
        let Some(pidfd) = &self.fd else {
            return Vec::new();
        };
        let pidfd = pidfd.get_ref().as_fd();
        if PIDFD_REQUESTS_UNKNOWN.load(Ordering::Relaxed) {
            return self.open_namespaces_by_path(pidfd, kinds);
        }
        let mut opened = Vec::with_capacity(kinds.len());
        for &kind in kinds {
            match sys::pidfd_namespace(pidfd, kind.pidfd_request()) {
                Ok(theirs) => {
                    if !kind.is_shared_with_berthd(&theirs) {
                        opened.push(theirs);
                    }
                }
                Err(e) if e.raw_os_error() == Some(libc::ESRCH) => return opened,
                Err(e) => {
                    // ENOTTY: a kernel before 6.11, for good. Anything else (a kernel without
                    // network namespaces, a security module's refusal): /proc may still serve.
                    if e.raw_os_error() == Some(libc::ENOTTY) {
                        PIDFD_REQUESTS_UNKNOWN.store(true, Ordering::Relaxed);
                    }
                    return self.open_namespaces_by_path(pidfd, kinds);
                }
            }
        }
        opened
    }

    /// [`Self::open_namespaces`] where the pidfd cannot serve (a kernel before 6.11):
    /// `/proc/<pid>/ns/<kind>`, and then the process is checked to be running, which is what makes
    /// certain the pid named it when they were opened (an adopted process is not berthd's child,
    /// so its pid can be reused once it is gone). Empty once it has exited.
    fn open_namespaces_by_path(&self, pidfd: BorrowedFd<'_>, kinds: &[Namespace]) -> Vec<OwnedFd> {
        use rustix::fs::{Mode, OFlags};
        let opened: Vec<OwnedFd> = kinds
            .iter()
            .filter_map(|kind| {
                let path = format!("/proc/{}/ns/{}", self.pid, kind.proc_name());
                let theirs =
                    rustix::fs::open(path, OFlags::RDONLY | OFlags::CLOEXEC, Mode::empty()).ok()?;
                (!kind.is_shared_with_berthd(&theirs)).then_some(theirs)
            })
            .collect();
        let mut poll = [rustix::event::PollFd::new(
            &pidfd,
            rustix::event::PollFlags::IN,
        )];
        let no_wait = rustix::time::Timespec::default();
        match rustix::event::poll(&mut poll, Some(&no_wait)) {
            Ok(0) => opened,
            _ => Vec::new(),
        }
    }

    /// Waits for the process to exit, reaps it and returns its exit code.
    pub async fn wait(&self) -> u32 {
        match self.wait_inner(false, || ()).await {
            Some((code, ())) => code,
            None => UNKNOWN_EXIT,
        }
    }

    /// [`Self::wait`] for an exit watcher: `collected` runs under the reaper's lock as the exit
    /// is collected, so whatever it takes (the clean-up's place among the operations a stop
    /// waits for) is held before [`Reaper::stop_collecting`] can return. None once berthd has
    /// stopped collecting: the process is left as it is, unreaped (one the orphan sweep reaped
    /// before it was tracked keeps its code in the sweep's table for a while).
    pub async fn wait_collected<T>(&self, collected: impl FnOnce() -> T) -> Option<(u32, T)> {
        self.wait_inner(true, collected).await
    }

    async fn wait_inner<T>(&self, gated: bool, collected: impl FnOnce() -> T) -> Option<(u32, T)> {
        let stopped = |tables: &Tables| gated && tables.stopped_collecting;
        // A status known without reaping: recorded by the orphan sweep, given by the pidfd of
        // a process someone else reaps, or unknown.
        let known = match &self.fd {
            None => self.early_exit.unwrap_or(UNKNOWN_EXIT),
            Some(fd) => loop {
                let mut guard = match fd.readable().await {
                    Ok(guard) => guard,
                    Err(e) => {
                        tracing::error!(pid = self.pid, error = %e, "pidfd poll failed");
                        break UNKNOWN_EXIT;
                    }
                };
                if !self.child {
                    // Readable means it exited; its parent, not berthd, reaps it.
                    break self.exit_code_from_pidfd(fd.get_ref().as_fd()).await;
                }
                // Hold the table lock so the orphan sweep never sees this pid half-reaped.
                let mut tables = self.reaper.tables.lock().expect("reaper lock poisoned");
                if stopped(&tables) {
                    return None;
                }
                let code = match sys::waitid(WaitTarget::PidFd(fd.get_ref().as_fd()), false) {
                    Ok(None) => None,
                    Ok(Some((_, raw))) => {
                        tables.tracked.remove(&self.pid);
                        Some(exit_code(raw).unwrap_or(UNKNOWN_EXIT))
                    }
                    Err(e) => {
                        tables.tracked.remove(&self.pid);
                        tracing::error!(pid = self.pid, error = %e, "waitid on pidfd failed");
                        Some(UNKNOWN_EXIT)
                    }
                };
                match code {
                    Some(code) => return Some((code, collected())),
                    None => {
                        drop(tables);
                        guard.clear_ready();
                    }
                }
            },
        };
        let tables = self.reaper.tables.lock().expect("reaper lock poisoned");
        (!stopped(&tables)).then(|| (known, collected()))
    }
}

impl TrackedProcess {
    async fn exit_code_from_pidfd(&self, fd: std::os::fd::BorrowedFd<'_>) -> u32 {
        let mut raw = None;
        if self.reaper.exit_info {
            // The kernel records the status when the parent reaps the process, which a host's
            // init does promptly but not necessarily before we look.
            let deadline = Instant::now() + EXIT_INFO_WAIT;
            loop {
                raw = sys::exit_status(fd).ok().flatten();
                if raw.is_some() || Instant::now() >= deadline {
                    break;
                }
                tokio::time::sleep(SWEEP_RETRY).await;
            }
        }
        match raw {
            Some(raw) => exit_code(raw).unwrap_or(UNKNOWN_EXIT),
            None => {
                tracing::warn!(
                    pid = self.pid,
                    "exit status unknown: berthd is not this process's parent, and the kernel did not report it (PIDFD_INFO_EXIT needs Linux 6.15 and a parent that reaps)"
                );
                UNKNOWN_EXIT
            }
        }
    }
}

/// Whether `PIDFD_GET_INFO` reports exit statuses, found by asking it about a child that has
/// exited with a known code.
fn kernel_reports_exit_status() -> bool {
    let Ok(mut child) = std::process::Command::new("/bin/sh")
        .args(["-c", "exit 3"])
        .stdin(std::process::Stdio::null())
        .spawn()
    else {
        return false;
    };
    let fd = sys::open(child.id() as i32);
    let _ = child.wait();
    let Ok(fd) = fd else { return false };
    let raw = sys::exit_status(fd.as_fd()).ok().flatten();
    raw.and_then(exit_code) == Some(3)
}

/// Whether a `waitid` on a pidfd failed because the process is not our child.
fn is_not_our_child(result: io::Result<Option<(i32, i32)>>) -> bool {
    matches!(result, Err(e) if e.raw_os_error() == Some(libc::ECHILD))
}

impl Drop for TrackedProcess {
    fn drop(&mut self) {
        if self.fd.is_some() && self.child {
            let mut tables = self.reaper.tables.lock().expect("reaper lock poisoned");
            tables.tracked.remove(&self.pid);
        }
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    #[tokio::test]
    async fn a_child_killed_by_a_real_time_signal_reports_128_plus_it() {
        let _children = CHILD_PROCESSES.lock().await;
        let reaper = Reaper::new();
        let process = reaper.track(spawn_child("sleep 30")).unwrap();
        process.signal(64).unwrap();
        assert_eq!(process.wait().await, 192);
    }

    /// Tests in this process share one set of children; a sweep in one test would reap another's.
    pub(crate) static CHILD_PROCESSES: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

    fn spawn_child(script: &str) -> i32 {
        // std's Child would reap on its own terms; forget it and let the reaper own the pid.
        let child = std::process::Command::new("/bin/sh")
            .args(["-c", script])
            .spawn()
            .unwrap();
        let pid = child.id() as i32;
        std::mem::forget(child);
        pid
    }

    const BOTH: [Namespace; 2] = [Namespace::Mount, Namespace::Network];

    /// The inode naming a namespace, as `/proc/<pid>/ns/<kind>` links to it (`net:[4026531840]`).
    fn namespace_of(fd: &OwnedFd) -> u64 {
        rustix::fs::fstat(fd).unwrap().st_ino
    }

    #[tokio::test]
    async fn the_namespaces_opened_are_the_running_processs_own_and_none_once_it_exited() {
        let _children = CHILD_PROCESSES.lock().await;
        let reaper = Reaper::new();
        let sharing = reaper.track(spawn_child("sleep 30")).unwrap();
        assert!(
            sharing.open_namespaces(&BOTH).is_empty(),
            "the ones it shares with this process are not held"
        );
        sharing.signal(libc::SIGKILL).unwrap();
        sharing.wait().await;

        let own = reaper
            .track(spawn_child("exec unshare --net sleep 30"))
            .unwrap();
        let link = loop {
            // Until `unshare` has made its namespace.
            let link = std::fs::read_link(format!("/proc/{}/ns/net", own.pid())).unwrap();
            if link != std::fs::read_link("/proc/self/ns/net").unwrap() {
                break link;
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        };
        let pidfd = own.fd.as_ref().unwrap().get_ref().as_fd();
        // The pidfd serves, or the kernel does not know the request (before 6.11).
        if let Err(e) = sys::pidfd_namespace(pidfd, Namespace::Network.pidfd_request()) {
            assert_eq!(e.raw_os_error(), Some(libc::ENOTTY), "{e}");
        }
        // Through the pidfd, and through /proc as on kernels before 6.11: the same.
        for opened in [
            own.open_namespaces(&BOTH),
            own.open_namespaces_by_path(pidfd, &BOTH),
        ] {
            assert_eq!(
                opened.len(),
                1,
                "its own network namespace, not the shared mount one"
            );
            assert_eq!(
                format!("net:[{}]", namespace_of(&opened[0])),
                link.to_string_lossy()
            );
        }
        own.signal(libc::SIGKILL).unwrap();
        until_zombie(own.pid()).await;
        assert!(own.open_namespaces(&BOTH).is_empty(), "it exited");
        assert!(
            own.open_namespaces_by_path(pidfd, &BOTH).is_empty(),
            "it exited"
        );
        own.wait().await;
    }

    #[tokio::test]
    async fn tracked_child_reports_its_exit_code_and_is_untracked() {
        let _children = CHILD_PROCESSES.lock().await;
        let reaper = Reaper::new();
        let process = reaper.track(spawn_child("exit 7")).unwrap();
        assert_eq!(process.wait().await, 7);
        assert_eq!(reaper.tracked_count(), 0);
    }

    #[tokio::test]
    async fn signals_go_through_the_pidfd() {
        let _children = CHILD_PROCESSES.lock().await;
        let reaper = Reaper::new();
        let process = reaper.track(spawn_child("sleep 30")).unwrap();
        process.signal(libc::SIGKILL).unwrap();
        assert_eq!(process.wait().await, 137);
        assert!(matches!(
            process.signal(libc::SIGTERM),
            Err(Error::NotFound(_))
        ));
    }

    #[tokio::test]
    async fn an_exit_shows_before_it_is_collected() {
        let _children = CHILD_PROCESSES.lock().await;
        let reaper = Reaper::new();
        let process = reaper.track(spawn_child("sleep 30")).unwrap();
        assert!(!process.has_exited());
        process.signal(libc::SIGKILL).unwrap();
        until_zombie(process.pid()).await;
        assert!(process.has_exited());
        assert_eq!(process.wait().await, 137);
    }

    /// Once berthd stops collecting (it is stopping or upgrading), an exit watcher collects
    /// nothing and the orphan sweep reaps nothing: the zombie is left, with its status, for
    /// the next image or start.
    #[tokio::test]
    async fn once_collecting_stops_exits_are_left_uncollected() {
        let _children = CHILD_PROCESSES.lock().await;
        let reaper = Reaper::new();
        let process = reaper.track(spawn_child("exit 5")).unwrap();
        let orphan = spawn_child("exit 6");
        until_zombie(process.pid()).await;
        until_zombie(orphan).await;
        reaper.stop_collecting();
        let collected = tokio::time::timeout(
            Duration::from_secs(5),
            process.wait_collected(|| "collected"),
        )
        .await
        .expect("a stopped collection answers at once");
        assert_eq!(collected, None);
        assert!(reaper.sweep());
        for pid in [process.pid(), orphan] {
            assert!(
                sys::waitid(WaitTarget::Pid(pid), true).unwrap().is_some(),
                "{pid} was reaped"
            );
        }
        // Taken back the way an undo or the next image would.
        assert_eq!(process.wait().await, 5);
        let (_, raw) = sys::waitid(WaitTarget::Pid(orphan), false)
            .unwrap()
            .unwrap();
        assert_eq!(exit_code(raw), Some(6));
    }

    #[tokio::test]
    async fn an_orphan_reaped_before_registration_keeps_its_code() {
        let _children = CHILD_PROCESSES.lock().await;
        let reaper = Reaper::new();
        let pid = spawn_child("exit 9");
        // Once it is a zombie, the sweep reaps it as an unknown orphan.
        until_zombie(pid).await;
        assert!(reaper.sweep());
        let process = reaper.track(pid).unwrap();
        assert_eq!(process.wait().await, 9);
    }

    async fn until_zombie(pid: i32) {
        while sys::waitid(WaitTarget::Pid(pid), true).unwrap().is_none() {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }

    #[tokio::test]
    async fn a_claimed_zombie_is_left_for_registration_and_others_are_reaped() {
        let _children = CHILD_PROCESSES.lock().await;
        let reaper = Reaper::new();
        let dir = tempfile::tempdir().unwrap();
        let pid_file = dir.path().join("init.pid");
        let claim = reaper.claim(&pid_file);
        // No pid file yet: the claimed init is not berthd's child, so this zombie is not it.
        let stranger = spawn_child("exit 1");
        until_zombie(stranger).await;
        assert!(reaper.sweep());
        assert_eq!(reaper.tables.lock().unwrap().orphan_exits[&stranger].0, 1);

        let init = spawn_child("exit 7");
        std::fs::write(&pid_file, format!("{init}")).unwrap();
        until_zombie(init).await;
        assert!(!reaper.sweep(), "the claimed zombie must be left");
        let process = reaper.track(init).unwrap();
        drop(claim);
        assert!(
            process.fd.is_some(),
            "tracked through its pidfd, not as an orphan"
        );
        assert!(!reaper.sweep(), "tracked now, for its waiter to reap");
        assert_eq!(process.wait().await, 7);
        assert!(reaper.sweep());
        assert!(reaper.tables.lock().unwrap().claims.is_empty());
    }

    #[tokio::test]
    async fn adopted_children_report_exact_codes_and_strangers_are_checked() {
        let _children = CHILD_PROCESSES.lock().await;
        let reaper = Reaper::new();
        let pid = spawn_child("sleep 0.2; exit 4");
        let start = crate::procfs::process_start_time(pid as u32).unwrap();
        assert!(
            reaper.adopt(pid, start + 1).unwrap().is_none(),
            "start time must match"
        );
        let adopted = reaper.adopt(pid, start).unwrap().unwrap();
        assert_eq!(adopted.wait().await, 4);
    }

    #[tokio::test]
    async fn adopted_non_children_report_their_code_through_the_pidfd() {
        use std::io::BufRead;
        let _children = CHILD_PROCESSES.lock().await;
        let reaper = Reaper::new();
        // A grandchild whose parent (the outer shell) reaps it, as a host's init reaps the
        // orphans of a berthd that died. It exits once the test closes the shell's stdin, after
        // the adoption (a background job's own stdin is /dev/null, hence fd 3).
        let mut shell = std::process::Command::new("/bin/sh")
            .args(["-c", "exec 3<&0; (read x <&3; exit 5) & echo $!; wait $!"])
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        let mut line = String::new();
        std::io::BufReader::new(shell.stdout.take().unwrap())
            .read_line(&mut line)
            .unwrap();
        let pid: i32 = line.trim().parse().unwrap();
        let start = crate::procfs::process_start_time(pid as u32).unwrap();
        let adopted = reaper.adopt(pid, start).unwrap().unwrap();
        drop(shell.stdin.take());
        let expected = if reaper.exit_info_supported() {
            5
        } else {
            UNKNOWN_EXIT
        };
        assert_eq!(adopted.wait().await, expected);
        shell.wait().unwrap();
    }

    #[tokio::test]
    async fn a_pid_that_is_not_a_child_is_refused() {
        let reaper = Reaper::new();
        assert!(reaper.track(1).is_err());
    }
}
