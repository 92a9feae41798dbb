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
//! pipe always has a reader: while berthd is away (a crash, a restart) output waits in the
//! pipe, then blocks the writer, and never raises SIGPIPE. Its end of stdin is the read end
//! alone, so the client closing its FIFO reaches it as end-of-file. Each relay holds at most one
//! chunk, so a client that does not read holds the container up, never berthd's memory. An
//! upgrade hands every stream's ends to the next image; after a restart berthd finds its pipe
//! ends through `/proc/<pid>/fd/<n>`, checked against each pipe's recorded inode.
//!
//! Owns: making the pipes, their relays by container, and finding the pipes again after a
//! restart or an upgrade. Does not own: opening the client's paths (stdio, caller), the copy
//! loop (stdio), the state file (store).

use std::collections::HashMap;
use std::os::fd::{AsFd, OwnedFd};
use std::sync::Mutex;
use std::time::Duration;

use rustix::fs::{FileType, Mode, OFlags};
use tokio::sync::watch;
use tokio::task::JoinHandle;

use super::Supervisor;
use super::stdio::{self, Ended, Endpoint, StdioPaths};
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
    let mut ends: [Option<Ends>; 3] = Default::default();
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
            (reopen_read_write(&write)?, read)
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

/// A new open of the pipe behind `fd` (through `/proc/self/fd`) that both reads and writes it.
fn reopen_read_write(fd: impl AsFd) -> Result<OwnedFd> {
    let path = crate::client_fs::self_fd_path(fd);
    rustix::fs::open(&path, OFlags::RDWR | OFlags::CLOEXEC, Mode::empty())
        .map_err(|e| Error::sys("reopen a stdio pipe read-write", e))
}

/// The streams by fd number, as the relay names them to [`crate::upgrade`].
const STREAMS: [&str; 3] = ["stdin", "stdout", "stderr"];

/// A stream's two ends: berthd's end of the pipe and the client's FIFO.
type Ends = (OwnedFd, OwnedFd);

/// The relays of one init's stdio pipes: input from the client's FIFO into the pipe, output
/// from each pipe to the client's FIFO. Each task gives its ends back when it is stopped.
pub(super) struct PipeRelay {
    stop: watch::Sender<bool>,
    /// By stream (0 is stdin).
    tasks: Vec<(usize, JoinHandle<Option<Ends>>)>,
}

impl PipeRelay {
    /// Starts relaying the ends of each stream that has them (by fd number).
    fn start(ends: [Option<Ends>; 3]) -> Result<Option<Self>> {
        if ends.iter().all(Option::is_none) {
            return Ok(None);
        }
        let endpoint = |fd: OwnedFd| Endpoint::new(fd).map_err(|e| Error::sys("relay stdio", e));
        let (stop, stopped) = watch::channel(false);
        // Built first, so that a stream failing to start drops (and stops) those started.
        let mut relay = PipeRelay {
            stop,
            tasks: Vec::new(),
        };
        for (n, ends) in ends.into_iter().enumerate() {
            let Some((pipe, client)) = ends else { continue };
            let (pipe, client) = (endpoint(pipe)?, endpoint(client)?);
            let stopped = stopped.clone();
            let task = tokio::spawn(async move {
                let ended = if n == 0 {
                    stdio::copy(&client, Some(&pipe), stopped).await
                } else {
                    stdio::copy(&pipe, Some(&client), stopped).await
                };
                if ended != Ended::Stopped {
                    return None;
                }
                Some((pipe.into_fd().ok()?, client.into_fd().ok()?))
            });
            relay.tasks.push((n, task));
        }
        Ok(Some(relay))
    }

    /// The init exited: input stops now; each output copies what is left in its pipe until its
    /// last writer is gone, within [`DRAIN_BOUND`].
    async fn finish(&mut self) {
        let mut outputs = Vec::new();
        for (n, task) in &mut self.tasks {
            if *n == 0 {
                task.abort();
            } else {
                outputs.push(task);
            }
        }
        let drained = futures_util::future::join_all(outputs);
        if tokio::time::timeout(DRAIN_BOUND, drained).await.is_err() {
            tracing::debug!("stdio output not drained within its bound: cut");
        }
    }

    /// Stops every stream between two chunks (an upgrade): nothing read is left unwritten.
    /// Returns each stopped stream's ends, which the next image takes up: closed, the pipe would
    /// read as end-of-file to the container (stdin) and the FIFO to the client (output).
    async fn stop_between_chunks(&mut self) -> Vec<(usize, Ends)> {
        let _ = self.stop.send(true);
        let stopped = self.tasks.iter_mut().map(|(n, task)| async move {
            match tokio::time::timeout(stdio::STOP_BOUND, task).await {
                Ok(Ok(Some(ends))) => Some((*n, ends)),
                _ => None,
            }
        });
        futures_util::future::join_all(stopped)
            .await
            .into_iter()
            .flatten()
            .collect()
    }
}

/// A relay dropped stops at once: the operation that made its pipes failed, it has finished,
/// or a stream did not stop within its bound for an upgrade.
impl Drop for PipeRelay {
    fn drop(&mut self) {
        for (_, task) in &self.tasks {
            task.abort();
        }
    }
}

/// The running pipe relays, by container id, with their init's pid.
#[derive(Default)]
pub(super) struct PipeRelays(Mutex<HashMap<String, (u32, PipeRelay)>>);

impl PipeRelays {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, (u32, PipeRelay)>> {
        self.0
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

impl Supervisor {
    /// Keeps the pipe relay of container `id`, whose init is `pid`, until the init exits.
    pub(super) fn keep_pipe_relay(&self, id: &str, pid: u32, relay: PipeRelay) {
        self.pipe_relays.lock().insert(id.to_owned(), (pid, relay));
    }

    /// Stops container `id`'s pipe relay now (the create that started it failed).
    pub(super) fn abort_pipe_relay(&self, id: &str) {
        drop(self.pipe_relays.lock().remove(id));
    }

    /// Container `id`'s init exited: its relay copies what is left and ends.
    pub(super) async fn finish_pipe_relay(&self, id: &str) {
        let relay = self.pipe_relays.lock().remove(id);
        if let Some((_, mut relay)) = relay {
            relay.finish().await;
        }
    }

    /// Stops every pipe relay between two chunks, all at once, before an upgrade, and leaves
    /// their ends with [`crate::upgrade`] for the next image.
    pub(super) async fn stop_pipe_relays(&self) {
        let relays: Vec<(String, (u32, PipeRelay))> = self.pipe_relays.lock().drain().collect();
        let stopped = relays.into_iter().map(|(id, (pid, mut relay))| async move {
            let ends = relay.stop_between_chunks().await;
            (id, pid, ends)
        });
        for (id, pid, streams) in futures_util::future::join_all(stopped).await {
            for (n, (pipe, client)) in streams {
                crate::upgrade::hand_over_stdio(&id, pid, &format!("{}-pipe", STREAMS[n]), pipe);
                crate::upgrade::hand_over_stdio(&id, pid, &format!("{}-fifo", STREAMS[n]), client);
            }
        }
    }

    /// Takes up the relay of an adopted init's stdio pipes again: berthd's ends from
    /// `/proc/<pid>/fd/<n>` if they are still the recorded pipes (stdin's from the image before
    /// this one when it handed it over), the client's FIFOs from their recorded paths, opened
    /// as the client who named them may (`paths.caller`, from the record), with the checks
    /// every stdio path gets, and only if they are FIFOs still: a file put in a FIFO's place
    /// is not read into the container or written with its output.
    pub(super) async fn resume_pipe_relay(
        &self,
        id: &str,
        pid: u32,
        paths: &StdioPaths,
        pipes: PipeInodes,
    ) -> Result<()> {
        if pipes == [0; 3] {
            return Ok(());
        }
        let caller = match &paths.caller {
            Some(caller) => std::sync::Arc::clone(caller),
            None => self.caller(Peer::root()),
        };
        let client_paths = [
            (&paths.stdin, Access::Read, OFlags::WRONLY),
            (&paths.stdout, Access::Write, OFlags::RDONLY),
            (&paths.stderr, Access::Write, OFlags::RDONLY),
        ];
        let mut ends: [Option<Ends>; 3] = Default::default();
        for (n, (path, access, ours)) in client_paths.into_iter().enumerate() {
            if pipes[n] == 0 {
                continue;
            }
            let name = STREAMS[n];
            let handed = |end: &str| crate::upgrade::claim_stdio(id, pid, &format!("{name}-{end}"));
            let pipe = match handed("pipe") {
                Some(pipe) => pipe,
                None => {
                    let proc_fd = format!("/proc/{pid}/fd/{n}");
                    let flags = ours | OFlags::NONBLOCK | OFlags::CLOEXEC;
                    rustix::fs::open(&proc_fd, flags, Mode::empty()).map_err(|e| {
                        Error::sys(format!("reopen the {name} pipe at {proc_fd}"), e)
                    })?
                }
            };
            if !is_fifo(&pipe) || inode(&pipe)? != pipes[n] {
                return Err(Error::FailedPrecondition(format!(
                    "the init's {name} is no longer the pipe berthd made for it"
                )));
            }
            let client = match handed("fifo") {
                Some(client) => client,
                // Off the reactor within the client-file bound: a path on a mount that hangs
                // keeps berthd from serving no longer than that.
                // What is there now is taken only if it is a FIFO still.
                None => {
                    let (opener, path) = (std::sync::Arc::clone(&caller), path.clone());
                    caller
                        .off_reactor("reopening a stdio FIFO", move || {
                            let client = opener.open_stdio(name, &path, access)?;
                            if !is_fifo(&client) {
                                return Err(Error::FailedPrecondition(format!(
                                    "the init's {name} path is no longer the FIFO it named when the container was created"
                                )));
                            }
                            Ok(client)
                        })
                        .await?
                }
            };
            ends[n] = Some((pipe, client));
        }
        if let Some(relay) = PipeRelay::start(ends)? {
            self.keep_pipe_relay(id, pid, relay);
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fifo(dir: &std::path::Path, name: &str) -> std::path::PathBuf {
        let path = dir.join(name);
        nix::unistd::mkfifo(&path, nix::sys::stat::Mode::from_bits_truncate(0o600)).unwrap();
        path
    }

    fn open(path: &std::path::Path, access: OFlags) -> OwnedFd {
        rustix::fs::open(
            path,
            access | OFlags::NONBLOCK | OFlags::CLOEXEC,
            Mode::empty(),
        )
        .unwrap()
    }

    #[tokio::test]
    async fn fifos_get_pipes_relayed_both_ways_and_dev_null_stays_direct() {
        let dir = tempfile::tempdir().unwrap();
        let (input, output) = (fifo(dir.path(), "in"), fifo(dir.path(), "out"));
        let client_writer = open(&input, OFlags::RDWR);
        let client_reader = open(&output, OFlags::RDONLY);
        let null = rustix::fs::open("/dev/null", OFlags::WRONLY, Mode::empty()).unwrap();
        let opened = [
            SpawnStdio::Fd(open(&input, OFlags::RDONLY)),
            SpawnStdio::Fd(open(&output, OFlags::RDWR)),
            SpawnStdio::Fd(null),
        ];
        let piped = pipe_fifos(opened).unwrap();
        let [
            SpawnStdio::Fd(stdin),
            SpawnStdio::Fd(stdout),
            SpawnStdio::Fd(stderr),
        ] = piped.container
        else {
            panic!("every stream is a descriptor");
        };
        assert!(is_fifo(&stdin) && is_fifo(&stdout) && !is_fifo(&stderr));
        assert_eq!(piped.pipes[0], inode(&stdin).unwrap());
        assert_eq!(piped.pipes[1], inode(&stdout).unwrap());
        assert_eq!(piped.pipes[2], 0);
        // The container's end of an output pipe also reads it: it always has a reader.
        let flags = rustix::fs::fcntl_getfl(&stdout).unwrap();
        assert_eq!(flags & OFlags::RWMODE, OFlags::RDWR);

        rustix::io::write(&stdout, b"out\n").unwrap();
        rustix::io::write(&client_writer, b"in\n").unwrap();
        let read = |fd: &OwnedFd| {
            let fd = fd.try_clone().unwrap();
            async move {
                let mut buf = [0u8; 16];
                for _ in 0..500 {
                    match rustix::io::read(&fd, &mut buf) {
                        Ok(n) if n > 0 => return buf[..n].to_vec(),
                        _ => tokio::time::sleep(Duration::from_millis(10)).await,
                    }
                }
                panic!("nothing relayed");
            }
        };
        rustix::fs::fcntl_setfl(&stdin, OFlags::NONBLOCK).unwrap();
        assert_eq!(read(&client_reader).await, b"out\n");
        assert_eq!(read(&stdin).await, b"in\n");
        drop(piped.relay);
    }
}
