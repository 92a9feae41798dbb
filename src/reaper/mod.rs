//! Exit tracking for the processes berthd is parent of: container inits, added processes and
//! orphans reparented to it as the child subreaper.
//!
//! Owns: one pidfd per tracked process, polled by the tokio reactor; collecting a tracked
//! process's status with `waitid(P_PIDFD)`; reaping orphans nobody registered; decoding a wait
//! status into the exit code the API reports ([`exit_code`], the only place that does).
//! Does not own: what an exit means for a container (the supervisor) or spawning (spawn).
//!
//! Nothing here reaps with `waitpid(-1)`. Orphans are found by peeking with
//! `waitid(P_ALL, WNOWAIT)`, which reaps nothing, and reaped by pid only when untracked, under
//! the same lock that registration takes. A process that exits before it is registered (a
//! container whose init exits at once) may be reaped as an orphan first; its exit code is kept
//! for a while so registration still reports the true code.

mod pidfd;

use std::collections::{HashMap, HashSet};
use std::io;
use std::os::fd::{AsFd, OwnedFd};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use nix::sys::wait::{Id, WaitPidFlag, WaitStatus, waitid};
use tokio::io::unix::AsyncFd;

use crate::error::{Error, Result};

/// How long the exit code of an orphan reaped before registration is kept for it.
const ORPHAN_EXIT_RETENTION: Duration = Duration::from_secs(300);
/// How soon to look again when the oldest zombie is a tracked process its waiter has not reaped yet.
const SWEEP_RETRY: Duration = Duration::from_millis(20);

/// The exit code the API reports for a wait status: the code for a normal exit, 128 + the signal
/// number for a process killed by a signal. `None` for states that are not an exit.
pub fn exit_code(status: &WaitStatus) -> Option<u32> {
    match *status {
        WaitStatus::Exited(_, code) => Some((code & 0xff) as u32),
        WaitStatus::Signaled(_, signal, _) => Some(128 + signal as u32),
        _ => None,
    }
}

#[derive(Default)]
struct Tables {
    tracked: HashSet<i32>,
    orphan_exits: HashMap<i32, (u32, Instant)>,
}

/// Tracks child processes by pidfd and reaps orphans.
#[derive(Default)]
pub struct Reaper {
    tables: Mutex<Tables>,
}

impl Reaper {
    pub fn new() -> Arc<Self> {
        Arc::new(Self::default())
    }

    /// Starts tracking `pid`, a child of this process. Must be called from within the tokio
    /// runtime. A child that already exited and was reaped as an orphan yields a process whose
    /// wait returns at once with its recorded code.
    pub fn track(self: &Arc<Self>, pid: i32) -> Result<TrackedProcess> {
        let mut tables = self.tables.lock().expect("reaper lock poisoned");
        match pidfd::open(pid) {
            Ok(fd) => {
                // A pidfd of a process that is not our child would never yield a status.
                let probe = waitid(
                    Id::PIDFd(fd.as_fd()),
                    WaitPidFlag::WEXITED | WaitPidFlag::WNOHANG | WaitPidFlag::WNOWAIT,
                );
                if let Err(nix::errno::Errno::ECHILD) = probe {
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
                    reaper: Arc::clone(self),
                })
            }
            Err(e) if e.raw_os_error() == Some(libc::ESRCH) => {
                match tables.orphan_exits.remove(&pid) {
                    Some((code, _)) => Ok(TrackedProcess {
                        pid,
                        fd: None,
                        early_exit: Some(code),
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

    /// Reaps every zombie child that is not tracked. Returns false when a tracked zombie is in
    /// the way and the sweep should be retried shortly.
    fn sweep(&self) -> bool {
        loop {
            let peek = waitid(
                Id::All,
                WaitPidFlag::WEXITED | WaitPidFlag::WNOHANG | WaitPidFlag::WNOWAIT,
            );
            let pid = match peek {
                Ok(WaitStatus::StillAlive) | Err(_) => return true,
                Ok(status) => match status.pid() {
                    Some(pid) => pid,
                    None => return true,
                },
            };
            let mut tables = self.tables.lock().expect("reaper lock poisoned");
            if tables.tracked.contains(&pid.as_raw()) {
                return false;
            }
            match waitid(Id::Pid(pid), WaitPidFlag::WEXITED | WaitPidFlag::WNOHANG) {
                Ok(status) => {
                    if let Some(code) = exit_code(&status) {
                        tracing::debug!(pid = pid.as_raw(), code, "reaped an orphan");
                        let now = Instant::now();
                        tables
                            .orphan_exits
                            .retain(|_, (_, at)| now.duration_since(*at) < ORPHAN_EXIT_RETENTION);
                        tables.orphan_exits.insert(pid.as_raw(), (code, now));
                    }
                }
                Err(e) => {
                    tracing::warn!(pid = pid.as_raw(), error = %e, "could not reap orphan");
                    return true;
                }
            }
        }
    }

    /// Runs the orphan sweep on every SIGCHLD, for as long as the runtime lives.
    pub fn spawn_orphan_sweeper(self: &Arc<Self>) -> io::Result<()> {
        let mut sigchld = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::child())?;
        let reaper = Arc::clone(self);
        tokio::spawn(async move {
            let mut retry = false;
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

/// A tracked child process: its pidfd in the reactor, or the exit code recorded when it was
/// reaped as an orphan before registration.
pub struct TrackedProcess {
    pid: i32,
    fd: Option<AsyncFd<OwnedFd>>,
    early_exit: Option<u32>,
    reaper: Arc<Reaper>,
}

impl TrackedProcess {
    pub fn pid(&self) -> i32 {
        self.pid
    }

    /// Sends `signal` through the pidfd, so a recycled pid is never signalled by mistake.
    pub fn signal(&self, signal: i32) -> Result<()> {
        let fd = self
            .fd
            .as_ref()
            .ok_or_else(|| Error::NotFound(format!("process {} has already exited", self.pid)))?;
        pidfd::send_signal(fd.get_ref().as_fd(), signal).map_err(|e| {
            if e.raw_os_error() == Some(libc::ESRCH) {
                Error::NotFound(format!("process {} has already exited", self.pid))
            } else {
                Error::sys(format!("signal {signal} to process {}", self.pid), e)
            }
        })
    }

    /// Waits for the process to exit, reaps it and returns its exit code.
    pub async fn wait(&self) -> u32 {
        let Some(fd) = &self.fd else {
            return self.early_exit.unwrap_or(255);
        };
        loop {
            let mut guard = match fd.readable().await {
                Ok(guard) => guard,
                Err(e) => {
                    tracing::error!(pid = self.pid, error = %e, "pidfd poll failed");
                    return 255;
                }
            };
            let reaped = {
                // Hold the table lock so the orphan sweep never sees this pid half-reaped.
                let mut tables = self.reaper.tables.lock().expect("reaper lock poisoned");
                let status = waitid(
                    Id::PIDFd(fd.get_ref().as_fd()),
                    WaitPidFlag::WEXITED | WaitPidFlag::WNOHANG,
                );
                match status {
                    Ok(WaitStatus::StillAlive) => None,
                    Ok(status) => {
                        tables.tracked.remove(&self.pid);
                        Some(exit_code(&status).unwrap_or(255))
                    }
                    Err(e) => {
                        tables.tracked.remove(&self.pid);
                        tracing::error!(pid = self.pid, error = %e, "waitid on pidfd failed");
                        Some(255)
                    }
                }
            };
            match reaped {
                Some(code) => return code,
                None => guard.clear_ready(),
            }
        }
    }
}

impl Drop for TrackedProcess {
    fn drop(&mut self) {
        if self.fd.is_some() {
            let mut tables = self.reaper.tables.lock().expect("reaper lock poisoned");
            tables.tracked.remove(&self.pid);
        }
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use nix::sys::signal::Signal;
    use nix::unistd::Pid;

    #[test]
    fn exit_codes_follow_the_shell_convention() {
        let pid = Pid::from_raw(1);
        assert_eq!(exit_code(&WaitStatus::Exited(pid, 0)), Some(0));
        assert_eq!(exit_code(&WaitStatus::Exited(pid, 7)), Some(7));
        assert_eq!(
            exit_code(&WaitStatus::Signaled(pid, Signal::SIGKILL, false)),
            Some(137)
        );
        assert_eq!(
            exit_code(&WaitStatus::Signaled(pid, Signal::SIGSEGV, true)),
            Some(139)
        );
        assert_eq!(exit_code(&WaitStatus::StillAlive), None);
        assert_eq!(exit_code(&WaitStatus::Stopped(pid, Signal::SIGSTOP)), None);
    }

    #[test]
    fn raw_wait_statuses_decode_through_the_same_function() {
        let pid = Pid::from_raw(1);
        let exited = WaitStatus::from_raw(pid, 3 << 8).unwrap();
        assert_eq!(exit_code(&exited), Some(3));
        let killed = WaitStatus::from_raw(pid, libc::SIGTERM).unwrap();
        assert_eq!(exit_code(&killed), Some(143));
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
    async fn an_orphan_reaped_before_registration_keeps_its_code() {
        let _children = CHILD_PROCESSES.lock().await;
        let reaper = Reaper::new();
        let pid = spawn_child("exit 9");
        // Wait until it is a zombie, then let the sweep reap it as an unknown orphan.
        loop {
            let peek = waitid(
                Id::Pid(Pid::from_raw(pid)),
                WaitPidFlag::WEXITED | WaitPidFlag::WNOHANG | WaitPidFlag::WNOWAIT,
            )
            .unwrap();
            if peek != WaitStatus::StillAlive {
                break;
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        assert!(reaper.sweep());
        let process = reaper.track(pid).unwrap();
        assert_eq!(process.wait().await, 9);
    }

    #[tokio::test]
    async fn a_pid_that_is_not_a_child_is_refused() {
        let reaper = Reaper::new();
        assert!(reaper.track(1).is_err());
    }
}
