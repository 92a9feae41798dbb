//! A non-terminal init's FIFO stdio through pipes berthd owns: for each stream the client gave
//! a FIFO for, the container gets a pipe and berthd relays between the pipe and the FIFO.
//! CRIU dumps a pipe whose other end is outside the container (runc records it and hands the
//! restored process the pipe it is given), but not a FIFO on a host mount the container does
//! not see ("Can't lookup mount"); so this is what makes such a container checkpointable, and
//! what lets a restore attach it to the FIFOs its request names. `/dev/null` and regular files
//! stay the container's own: `/dev/null` dumps as it is, and a regular file relayed would put
//! every write of a file-logging container through berthd's reactor (such a container's dump
//! is refused by CRIU, as before).
//!
//! The container's end of an output pipe is opened read-write, as a FIFO for output is, so the
//! pipe always has a reader: while berthd is away (restart, upgrade) output waits in the pipe,
//! then blocks the writer, and never raises SIGPIPE. Each relay holds one chunk at a time, so
//! a client that does not read holds the container up, never berthd's memory. berthd finds
//! its ends again through `/proc/<pid>/fd/<n>`, checked against each pipe's recorded inode.
//!
//! Owns: making the pipes, their relays by container, and finding the pipes again after a
//! restart or an upgrade. Does not own: opening the client's paths (stdio, caller), the copy
//! loop (stdio), the state file (store).

use std::collections::HashMap;
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::sync::Mutex;
use std::time::Duration;

use rustix::fs::{FileType, Mode, OFlags};
use tokio::sync::watch;
use tokio::task::JoinHandle;

use super::Supervisor;
use super::stdio::{self, Endpoint, StdioPaths};
use crate::client_fs::{Access, Peer};
use crate::error::{Error, Result};
use crate::runtime::SpawnStdio;

/// The inode of the pipe behind each of the init's stdin, stdout and stderr; 0 where the
/// stream is not a pipe berthd relays.
pub type PipeInodes = [u64; 3];

/// How long the output relays of an init that exited may take to copy what is left in their
/// pipes to FIFOs that may not be read.
const DRAIN_BOUND: Duration = Duration::from_secs(1);

/// The init's stdio as the runtime gets it, and the relays of those that are pipes.
pub(super) struct InitStdio {
    pub(super) container: [SpawnStdio; 3],
    pub(super) relay: Option<PipeRelay>,
    pub(super) pipes: PipeInodes,
}

fn is_fifo(fd: impl AsFd) -> bool {
    rustix::fs::fstat(fd).is_ok_and(|st| FileType::from_raw_mode(st.st_mode) == FileType::Fifo)
}

fn inode(fd: impl AsFd) -> Result<u64> {
    rustix::fs::fstat(fd)
        .map(|st| st.st_ino)
        .map_err(|e| Error::sys("stat a stdio pipe", e))
}

/// Puts a pipe between the container and each FIFO among the client's opened stdio, and
/// starts relaying them.
pub(super) fn pipe_fifos(opened: [SpawnStdio; 3]) -> Result<InitStdio> {
    let mut pipes = [0; 3];
    let mut ends: [Option<(OwnedFd, OwnedFd)>; 3] = Default::default();
    let mut container = Vec::with_capacity(3);
    for (n, stdio) in opened.into_iter().enumerate() {
        let client = match stdio {
            SpawnStdio::Fd(fd) if is_fifo(&fd) => fd,
            other => {
                container.push(other);
                continue;
            }
        };
        let (read, write) = rustix::pipe::pipe_with(rustix::pipe::PipeFlags::CLOEXEC)
            .map_err(|e| Error::sys("make a stdio pipe", e))?;
        let (theirs, ours) = if n == 0 {
            (read, write)
        } else {
            (reopen(&write, OFlags::RDWR)?, read)
        };
        pipes[n] = inode(&ours)?;
        container.push(SpawnStdio::Fd(theirs));
        ends[n] = Some((ours, client));
    }
    let container: [SpawnStdio; 3] = container
        .try_into()
        .map_err(|_| Error::Internal("a process's stdio is not three streams".into()))?;
    Ok(InitStdio {
        container,
        relay: PipeRelay::start(ends)?,
        pipes,
    })
}

/// A new open of the pipe behind `fd` (through `/proc/self/fd`), with `access`.
fn reopen(fd: impl AsFd, access: OFlags) -> Result<OwnedFd> {
    let path = format!("/proc/self/fd/{}", fd.as_fd().as_raw_fd());
    rustix::fs::open(&path, access | OFlags::CLOEXEC, Mode::empty())
        .map_err(|e| Error::sys("reopen a stdio pipe read-write", e))
}

/// The relays of one init's stdio pipes: input from the client's FIFO into the pipe, output
/// from each pipe to the client's FIFO.
pub(super) struct PipeRelay {
    stop: watch::Sender<bool>,
    input: Option<JoinHandle<()>>,
    outputs: Vec<JoinHandle<()>>,
}

impl PipeRelay {
    /// Starts relaying `(pipe end, client FIFO)` for each stream that has one (stdin first).
    fn start(ends: [Option<(OwnedFd, OwnedFd)>; 3]) -> Result<Option<Self>> {
        if ends.iter().all(Option::is_none) {
            return Ok(None);
        }
        let endpoint = |fd: OwnedFd| Endpoint::new(fd).map_err(|e| Error::sys("relay stdio", e));
        let (stop, stopped) = watch::channel(false);
        let [stdin, stdout, stderr] = ends;
        let input = match stdin {
            Some((pipe, client)) => {
                let (pipe, client) = (endpoint(pipe)?, endpoint(client)?);
                let stopped = stopped.clone();
                Some(tokio::spawn(async move {
                    stdio::copy(&client, Some(&pipe), stopped).await;
                }))
            }
            None => None,
        };
        let mut outputs = Vec::new();
        for (pipe, client) in [stdout, stderr].into_iter().flatten() {
            let (pipe, client) = (endpoint(pipe)?, endpoint(client)?);
            let stopped = stopped.clone();
            outputs.push(tokio::spawn(async move {
                stdio::copy(&pipe, Some(&client), stopped).await;
            }));
        }
        Ok(Some(PipeRelay {
            stop,
            input,
            outputs,
        }))
    }

    fn tasks(&self) -> impl Iterator<Item = &JoinHandle<()>> {
        self.input.iter().chain(&self.outputs)
    }

    /// Stops relaying now (the operation that made the pipes failed).
    fn abort(self) {
        for task in self.tasks() {
            task.abort();
        }
    }

    /// The init exited: input stops now; each output copies what is left in its pipe until its
    /// last writer is gone, within [`DRAIN_BOUND`].
    async fn finish(mut self) {
        if let Some(input) = &self.input {
            input.abort();
        }
        let drained = futures_util::future::join_all(self.outputs.iter_mut());
        if tokio::time::timeout(DRAIN_BOUND, drained).await.is_err() {
            tracing::debug!("stdio output not drained within its bound: cut");
        }
        for task in &self.outputs {
            task.abort();
        }
    }

    /// Stops every stream between two chunks (an upgrade): nothing read is left unwritten, and
    /// the pipes stay open in the container for the next image to take up.
    async fn stop_between_chunks(mut self) {
        let _ = self.stop.send(true);
        let stopped =
            futures_util::future::join_all(self.input.iter_mut().chain(&mut self.outputs));
        if tokio::time::timeout(stdio::STOP_BOUND, stopped)
            .await
            .is_err()
        {
            self.abort();
        }
    }
}

/// The running pipe relays, by container id.
#[derive(Default)]
pub(super) struct PipeRelays(Mutex<HashMap<String, PipeRelay>>);

impl PipeRelays {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, PipeRelay>> {
        self.0
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

impl Supervisor {
    /// Keeps container `id`'s pipe relay until its init exits.
    pub(super) fn keep_pipe_relay(&self, id: &str, relay: PipeRelay) {
        self.pipe_relays.lock().insert(id.to_owned(), relay);
    }

    /// Stops container `id`'s pipe relay now (the create that started it failed).
    pub(super) fn abort_pipe_relay(&self, id: &str) {
        if let Some(relay) = self.pipe_relays.lock().remove(id) {
            relay.abort();
        }
    }

    /// Container `id`'s init exited: its relay copies what is left and ends.
    pub(super) async fn finish_pipe_relay(&self, id: &str) {
        let relay = self.pipe_relays.lock().remove(id);
        if let Some(relay) = relay {
            relay.finish().await;
        }
    }

    /// Stops every pipe relay between two chunks, all at once, before an upgrade.
    pub(super) async fn stop_pipe_relays(&self) {
        let relays: Vec<PipeRelay> = self.pipe_relays.lock().drain().map(|(_, r)| r).collect();
        futures_util::future::join_all(relays.into_iter().map(PipeRelay::stop_between_chunks))
            .await;
    }

    /// Takes up the relay of an adopted init's stdio pipes again: berthd's ends from
    /// `/proc/<pid>/fd/<n>` if they are still the recorded pipes, the client's FIFOs from their
    /// recorded paths (opened as root, with the checks every stdio path gets).
    pub(super) fn resume_pipe_relay(
        &self,
        id: &str,
        pid: u32,
        paths: &StdioPaths,
        pipes: PipeInodes,
    ) -> Result<()> {
        if pipes == [0; 3] {
            return Ok(());
        }
        let caller = self.caller(Peer::root());
        let streams = [
            ("stdin", &paths.stdin, Access::Read, OFlags::WRONLY),
            ("stdout", &paths.stdout, Access::Write, OFlags::RDONLY),
            ("stderr", &paths.stderr, Access::Write, OFlags::RDONLY),
        ];
        let mut ends: [Option<(OwnedFd, OwnedFd)>; 3] = Default::default();
        for (n, (name, path, access, ours)) in streams.into_iter().enumerate() {
            if pipes[n] == 0 {
                continue;
            }
            let proc_fd = format!("/proc/{pid}/fd/{n}");
            let pipe = rustix::fs::open(
                &proc_fd,
                ours | OFlags::NONBLOCK | OFlags::CLOEXEC,
                Mode::empty(),
            )
            .map_err(|e| Error::sys(format!("reopen the {name} pipe at {proc_fd}"), e))?;
            if !is_fifo(&pipe) || inode(&pipe)? != pipes[n] {
                return Err(Error::FailedPrecondition(format!(
                    "the init's {name} is no longer the pipe berthd made for it"
                )));
            }
            let client = caller.open_stdio(name, path, access)?;
            ends[n] = Some((pipe, client));
        }
        if let Some(relay) = PipeRelay::start(ends)? {
            self.keep_pipe_relay(id, relay);
        }
        Ok(())
    }
}
