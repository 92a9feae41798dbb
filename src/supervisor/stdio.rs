//! A container process's stdio: opening the client's paths without creating, truncating or
//! blocking, handing them to a runtime command, and relaying a pty master to them when the
//! process has a terminal, and stopping that relay so its master can outlive it; the copy loop
//! the init's stdio pipes are relayed with too (stdio_pipes).
//! Does not own: passing descriptors over a socket (spawn's fdpass), running the command
//! (runtime).

use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use rustix::fs::OFlags;
use tokio::io::Interest;
use tokio::io::unix::AsyncFd;
use tokio::net::UnixListener;
use tokio::sync::watch;

use super::caller::Caller;
use crate::client_fs::shown;
use crate::client_fs::{Access, Console};
use crate::error::{Error, Result};
use crate::runtime::SpawnStdio;
use crate::spawn::fdpass;

/// How long a runtime may take to hand over a pty master once it has been started.
pub const CONSOLE_TIMEOUT: Duration = Duration::from_secs(10);

/// The client's stdio paths for a process; empty means none (`/dev/null`). They are opened as
/// the request's caller may open them (see [`Caller::open_stdio`]).
#[derive(Debug, Clone, Default)]
pub struct StdioPaths {
    pub stdin: String,
    pub stdout: String,
    pub stderr: String,
    pub console: String,
    /// Who named them, or who a state file says did (root for one that does not say).
    pub caller: Option<Arc<Caller>>,
}

impl StdioPaths {
    /// Every non-empty path must be absolute (the rest is checked when it is opened).
    pub fn check(&self) -> Result<()> {
        for (name, path) in self.named() {
            if !path.is_empty() && !Path::new(path).is_absolute() {
                return Err(Error::InvalidArgument(format!(
                    "{name} path {} is not absolute",
                    shown(Path::new(path))
                )));
            }
        }
        self.caller().map(drop)
    }

    fn named(&self) -> [(&'static str, &str); 4] {
        [
            ("stdin", &self.stdin),
            ("stdout", &self.stdout),
            ("stderr", &self.stderr),
            ("console", &self.console),
        ]
    }

    /// Who named the paths, for a record: opened again as that client after a restart.
    pub(super) fn named_by(&self) -> Option<crate::store::NamedBy> {
        self.caller.as_ref().map(|caller| crate::store::NamedBy {
            uid: caller.peer.uid,
            gid: caller.peer.gid,
            groups: caller.peer.groups.clone(),
        })
    }

    pub(super) fn caller(&self) -> Result<&Caller> {
        self.caller.as_deref().ok_or_else(|| {
            Error::Internal("stdio paths without the caller to check them against".into())
        })
    }

    /// Whether none of stdin, stdout and stderr is named.
    fn all_empty(&self) -> bool {
        self.stdin.is_empty() && self.stdout.is_empty() && self.stderr.is_empty()
    }

    /// Opens stdin, stdout and stderr for a process without a terminal; one not named is
    /// `/dev/null`, which the spawned process opens itself. A console named all the same is
    /// not used, but it is checked as if it were: a caller may name only what it may use.
    pub fn open_all(&self) -> Result<[SpawnStdio; 3]> {
        let caller = self.caller()?;
        if !self.console.is_empty() {
            caller.check_console(&self.console)?;
        }
        let open = |what, path: &str, access| match path {
            "" => Ok(SpawnStdio::Null),
            path => caller.open_stdio(what, path, access).map(SpawnStdio::Fd),
        };
        let opened = [
            open("stdin", &self.stdin, Access::Read)?,
            open("stdout", &self.stdout, Access::Write)?,
            open("stderr", &self.stderr, Access::Write)?,
        ];
        fn fd(stdio: &SpawnStdio) -> Option<BorrowedFd<'_>> {
            match stdio {
                SpawnStdio::Fd(fd) => Some(fd.as_fd()),
                _ => None,
            }
        }
        refuse_a_fifo_loop(
            fd(&opened[0]),
            &[("stdout", fd(&opened[1])), ("stderr", fd(&opened[2]))],
            &self.stdin,
        )?;
        Ok(opened)
    }

    /// What a pty master is relayed to. A console that is a terminal is both input and output;
    /// any other console is output only (a FIFO read back would feed the terminal its own
    /// output), with input from stdin. Without a console: input from stdin, output to stdout.
    /// The paths a terminal replaces (stderr always, stdout with a console, stdin with a
    /// console that is a terminal) are checked all the same: a caller may name only what it
    /// may use.
    pub(super) fn open_relay(&self) -> Result<RelayEnds> {
        let caller = self.caller()?;
        let check = |what, path: &str, access| match path {
            "" => Ok(()),
            path => caller.check_stdio(what, path, access),
        };
        check("stderr", &self.stderr, Access::Write)?;
        let output = match (self.console.is_empty(), self.stdout.is_empty()) {
            (false, _) => {
                check("stdout", &self.stdout, Access::Write)?;
                match caller.open_console(&self.console)? {
                    Console::Terminal(console) => {
                        check("stdin", &self.stdin, Access::Read)?;
                        let input = console
                            .try_clone()
                            .map_err(|e| Error::sys("duplicate the console descriptor", e))?;
                        return Ok((Some(input), Some(console)));
                    }
                    Console::Output(output) => Some(output),
                }
            }
            (true, false) => Some(caller.open_stdio("stdout", &self.stdout, Access::Write)?),
            (true, true) => None,
        };
        let input = (!self.stdin.is_empty())
            .then(|| caller.open_stdio("stdin", &self.stdin, Access::Read))
            .transpose()?;
        let output_name = if self.console.is_empty() {
            "stdout"
        } else {
            "console"
        };
        refuse_a_fifo_loop(
            input.as_ref().map(|fd| fd.as_fd()),
            &[(output_name, output.as_ref().map(|fd| fd.as_fd()))],
            &self.stdin,
        )?;
        Ok((input, output))
    }
}

/// Refuses a stdin that is the same FIFO as an output: berthd relays FIFOs, so it would carry
/// the process's output back into its input, and whatever goes in would circle through berthd
/// (and a terminal's echo) for ever, at berthd's CPU. The same regular file or `/dev/null` is
/// the process's own business.
fn refuse_a_fifo_loop(
    input: Option<BorrowedFd<'_>>,
    outputs: &[(&str, Option<BorrowedFd<'_>>)],
    stdin: &str,
) -> Result<()> {
    let fifo = |fd: BorrowedFd<'_>| {
        rustix::fs::fstat(fd)
            .ok()
            .filter(|st| {
                rustix::fs::FileType::from_raw_mode(st.st_mode) == rustix::fs::FileType::Fifo
            })
            .map(|st| (st.st_dev, st.st_ino))
    };
    let Some(input) = input.and_then(fifo) else {
        return Ok(());
    };
    for (name, output) in outputs {
        if output.and_then(fifo) == Some(input) {
            return Err(Error::InvalidArgument(format!(
                "stdin and {name} are the same FIFO ({stdin}): berthd would carry the process's output back into its input; give each its own FIFO"
            )));
        }
    }
    Ok(())
}

impl StdioPaths {
    /// Refuses a stdio file the runtime would take from its owner. runc hands each stdio
    /// descriptor it is given, `/dev/null` aside, to the process's user (a chown, its
    /// `fixStdioPermissions`), which a caller other than root may not do with a file another
    /// user owns: it would take the file. So for such a caller each file the runtime gets as it
    /// is from `opened` (not a FIFO when `fifos_relayed`: berthd puts a pipe of its own in front
    /// of those) must be the caller's own, or already the process's user's (`process_uid`,
    /// through `uids` on the host), or owned by a uid the container's user namespace does not
    /// map (runc's chown is refused there, and it leaves the file). `uids` is asked only for a
    /// caller other than root.
    pub(super) fn refuse_a_file_taken(
        &self,
        opened: &[SpawnStdio; 3],
        fifos_relayed: bool,
        process_uid: u32,
        uids: impl FnOnce() -> super::validate::UidMap,
    ) -> Result<()> {
        let caller = self.caller()?;
        if caller.peer.uid == 0 {
            return Ok(());
        }
        let uids = uids();
        let host_uid = uids.host_uid(process_uid);
        let names = [
            ("stdin", &self.stdin),
            ("stdout", &self.stdout),
            ("stderr", &self.stderr),
        ];
        for ((what, path), stdio) in names.iter().zip(opened) {
            let SpawnStdio::Fd(fd) = stdio else {
                continue;
            };
            let st = rustix::fs::fstat(fd).map_err(|e| Error::sys(format!("stat {what}"), e))?;
            let relayed = fifos_relayed
                && rustix::fs::FileType::from_raw_mode(st.st_mode) == rustix::fs::FileType::Fifo;
            if relayed
                || crate::client_fs::is_dev_null(&st)
                || st.st_uid == caller.peer.uid
                || Some(st.st_uid) == host_uid
                || !uids.maps_host_uid(st.st_uid)
            {
                continue;
            }
            let on_host = match host_uid {
                Some(uid) if uid == process_uid => String::new(),
                Some(uid) => format!(", uid {uid} on the host"),
                None => ", a uid berthd cannot tell on the host".into(),
            };
            return Err(Error::PermissionDenied(format!(
                "{what} {} is owned by uid {}, neither uid {} nor the process's user (uid {process_uid}{on_host}), to whom the runtime gives a process's stdio files; name a file of one of theirs, or /dev/null",
                shown(Path::new(path.as_str())),
                st.st_uid,
                caller.peer.uid
            )));
        }
        Ok(())
    }
}

/// What a pty master is relayed to: input, output (see [`StdioPaths::open_relay`]).
pub type RelayEnds = (Option<OwnedFd>, Option<OwnedFd>);

/// The paths a process's pty master will be relayed to, opened off the reactor before the
/// runtime runs, so a path the caller may not use is refused before anything has started.
pub async fn relay_ends(paths: &StdioPaths) -> Result<RelayEnds> {
    let caller = paths.caller()?;
    let paths = paths.clone();
    caller
        .off_reactor("opening the terminal's stdio paths", move || {
            paths.open_relay()
        })
        .await
}

/// The stdio a runtime command gets: the client's paths, or nothing when a pty replaces them
/// (those are opened by [`relay_ends`]; opening and closing a FIFO here would show its reader a
/// writer that came and went).
/// Without any path there is nothing of the client's to open, and no trip off the reactor.
pub async fn process_stdio(paths: &StdioPaths, terminal: bool) -> Result<[SpawnStdio; 3]> {
    if terminal || (paths.all_empty() && paths.console.is_empty()) {
        return Ok([SpawnStdio::Null, SpawnStdio::Null, SpawnStdio::Null]);
    }
    let caller = paths.caller()?;
    let paths = paths.clone();
    caller
        .off_reactor("opening the stdio paths", move || paths.open_all())
        .await
}

fn set_nonblocking(fd: impl AsFd, on: bool) -> std::io::Result<()> {
    let flags = rustix::fs::fcntl_getfl(&fd)?;
    let flags = if on {
        flags | OFlags::NONBLOCK
    } else {
        flags - OFlags::NONBLOCK
    };
    Ok(rustix::fs::fcntl_setfl(&fd, flags)?)
}

/// The socket a runtime hands a new process's pty master over (`--console-socket`).
pub struct ConsoleSocket {
    listener: UnixListener,
    path: PathBuf,
}

impl ConsoleSocket {
    pub fn bind(path: PathBuf) -> Result<Self> {
        let listener = UnixListener::bind(&path).map_err(|e| Error::io(&path, e))?;
        Ok(ConsoleSocket { listener, path })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Waits for the runtime to connect and send the pty master.
    pub async fn receive_master(&self, timeout: Duration) -> Result<OwnedFd> {
        let receive = async {
            let (stream, _) = self
                .listener
                .accept()
                .await
                .map_err(|e| Error::io(&self.path, e))?;
            let mut buf = [0u8; 4096];
            loop {
                stream
                    .readable()
                    .await
                    .map_err(|e| Error::io(&self.path, e))?;
                match stream.try_io(Interest::READABLE, || fdpass::recv(&stream, &mut buf)) {
                    Ok((_, fds)) => {
                        return fds.into_iter().next().ok_or_else(|| {
                            Error::Internal(
                                "the runtime sent no pty master on the console socket".into(),
                            )
                        });
                    }
                    Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => continue,
                    Err(e) => return Err(Error::io(&self.path, e)),
                }
            }
        };
        tokio::time::timeout(timeout, receive)
            .await
            .map_err(|_| Error::Timeout {
                what: "receiving the pty master from the runtime".into(),
                secs: timeout.as_secs(),
            })?
    }
}

impl Drop for ConsoleSocket {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

/// One end of a relay: pollable descriptors go through the reactor; regular files, which epoll
/// refuses, are read, written and closed on the blocking pool, since on a network or FUSE file
/// system, under writeback throttling, or for a file whose writes do work in the kernel, each
/// can block for as long as the file system likes.
pub(super) enum Endpoint {
    Polled(AsyncFd<OwnedFd>),
    File(BlockingFile),
}

/// A regular file relayed off the reactor. Shared with the blocking call in flight; the last
/// holder closes it, never a worker.
pub(super) struct BlockingFile(Option<Arc<OwnedFd>>);

/// Relay reads and writes on files running at once, stuck ones included (a file on a mount
/// that does not answer holds its thread for good): a quarter of tokio's blocking threads, so
/// relays on such files cannot take the ones berthd's own work needs. Past it, relays wait.
static RELAY_FILE_CALLS: tokio::sync::Semaphore = tokio::sync::Semaphore::const_new(128);

impl BlockingFile {
    /// Runs `call` on the file on the blocking pool, in one of [`RELAY_FILE_CALLS`]' places,
    /// which it keeps until the call ends.
    async fn run<T: Send + 'static>(
        &self,
        call: impl FnOnce(&OwnedFd) -> std::io::Result<T> + Send + 'static,
    ) -> std::io::Result<T> {
        let Some(fd) = self.0.clone() else {
            return Err(std::io::Error::other("the relayed file is closed"));
        };
        let place = RELAY_FILE_CALLS
            .acquire()
            .await
            .map_err(std::io::Error::other)?;
        tokio::task::spawn_blocking(move || {
            let _place = place;
            call(&fd)
        })
        .await
        .map_err(std::io::Error::other)?
    }
}

impl Drop for BlockingFile {
    fn drop(&mut self) {
        if let Some(fd) = self.0.take()
            && let Ok(runtime) = tokio::runtime::Handle::try_current()
        {
            drop(runtime.spawn_blocking(move || drop(fd)));
        }
    }
}

impl Endpoint {
    pub(super) fn new(fd: OwnedFd) -> std::io::Result<Self> {
        let regular = rustix::fs::fstat(&fd)
            .map(|st| {
                rustix::fs::FileType::from_raw_mode(st.st_mode) == rustix::fs::FileType::RegularFile
            })
            .unwrap_or(false);
        if regular {
            return Ok(Endpoint::File(BlockingFile(Some(Arc::new(fd)))));
        }
        set_nonblocking(&fd, true)?;
        match crate::reactor::try_register(fd, Interest::READABLE | Interest::WRITABLE) {
            Ok(polled) => Ok(Endpoint::Polled(polled)),
            // One that cannot be polled (`/dev/null`) is relayed as a regular file is.
            Err((fd, e)) if e.raw_os_error() == Some(rustix::io::Errno::PERM.raw_os_error()) => {
                set_nonblocking(&fd, false)?;
                Ok(Endpoint::File(BlockingFile(Some(Arc::new(fd)))))
            }
            Err((_, e)) => Err(e),
        }
    }

    /// The descriptor, out of the reactor. A file is shared only while a call on it is in
    /// flight, which a relay that stopped between chunks has none of.
    pub(super) fn into_fd(self) -> std::io::Result<OwnedFd> {
        match self {
            Endpoint::Polled(fd) => Ok(fd.into_inner()),
            Endpoint::File(mut file) => match file.0.take() {
                Some(shared) => Arc::try_unwrap(shared).or_else(|shared| shared.try_clone()),
                None => Err(std::io::Error::other("the relayed file is closed")),
            },
        }
    }

    /// The next chunk, empty at end of file. The buffer exists only once there is something to
    /// read: a relay waiting for input holds none (thousands of idle relays hold no memory).
    async fn read_chunk(&self) -> std::io::Result<Vec<u8>> {
        fn read(fd: &OwnedFd) -> std::io::Result<Vec<u8>> {
            let mut chunk = vec![0u8; CHUNK];
            let n = rustix::io::read(fd, &mut chunk)?;
            chunk.truncate(n);
            Ok(chunk)
        }
        match self {
            Endpoint::File(file) => file.run(read).await,
            Endpoint::Polled(fd) => loop {
                let mut guard = fd.readable().await?;
                let closed = guard.ready().is_read_closed();
                match guard.try_io(|fd| read(fd.get_ref())) {
                    Ok(result) => return result,
                    // Closed readiness never clears: waiting again would return at once, for
                    // ever, without yielding. Nothing more will come.
                    Err(_would_block) if closed => return Ok(Vec::new()),
                    Err(_would_block) => continue,
                }
            },
        }
    }

    /// Writes the whole chunk, which a file's write takes to the blocking pool.
    async fn write_all(&self, bytes: Vec<u8>) -> std::io::Result<()> {
        match self {
            Endpoint::File(file) => {
                file.run(move |fd| {
                    let mut rest = &bytes[..];
                    while !rest.is_empty() {
                        let written = rustix::io::write(fd, rest)?;
                        rest = &rest[written..];
                    }
                    Ok(())
                })
                .await
            }
            Endpoint::Polled(fd) => {
                let mut rest = &bytes[..];
                while !rest.is_empty() {
                    let written = loop {
                        let mut guard = fd.writable().await?;
                        let closed = guard.ready().is_write_closed();
                        match guard.try_io(|fd| Ok(rustix::io::write(fd.get_ref(), rest)?)) {
                            Ok(result) => break result?,
                            // A pty master whose slave side is closed: its input queue full,
                            // it refuses every write, and the hang-up readiness never clears,
                            // so waiting again would spin the worker without yielding.
                            Err(_would_block) if closed => {
                                return Err(std::io::ErrorKind::BrokenPipe.into());
                            }
                            Err(_would_block) => continue,
                        }
                    };
                    rest = &rest[written..];
                }
                Ok(())
            }
        }
    }

    /// A regular file never waits for input, and its read runs to its end on the blocking pool
    /// whatever becomes of the relay: raced against a stop, what it read would be lost.
    fn is_file(&self) -> bool {
        matches!(self, Endpoint::File(_))
    }
}

/// The most a relay reads at once, and so holds per stream.
const CHUNK: usize = 8192;

/// Why a copy ended.
#[derive(PartialEq, Eq)]
pub(super) enum Ended {
    /// The source closed or failed, or the destination refused a write.
    Closed,
    /// Told to stop: between two chunks, so nothing read is left unwritten.
    Stopped,
}

pub(super) async fn copy(
    from: &Endpoint,
    to: Option<&Endpoint>,
    mut stop: watch::Receiver<bool>,
) -> Ended {
    loop {
        // Stopping only ever interrupts the wait for input: a chunk read is always written.
        let read = if from.is_file() {
            if *stop.borrow() {
                return Ended::Stopped;
            }
            from.read_chunk().await
        } else {
            tokio::select! {
                biased;
                stopped = stop.wait_for(|stop| *stop) => {
                    return if stopped.is_ok() { Ended::Stopped } else { Ended::Closed };
                }
                read = from.read_chunk() => read,
            }
        };
        // A pty master reads EIO once the process side has closed: that is the end.
        let chunk = match read {
            Ok(chunk) if !chunk.is_empty() => chunk,
            _ => return Ended::Closed,
        };
        if let Some(to) = to
            && to.write_all(chunk).await.is_err()
        {
            return Ended::Closed;
        }
    }
}

/// How long a relay stopped for an upgrade may take to finish writing the chunk it holds.
pub(super) const STOP_BOUND: Duration = Duration::from_secs(1);

/// A running pty relay: its tasks end by themselves when the process side closes. It keeps its
/// own descriptor of the master, outside its tasks, so that the master outlives them when they
/// are stopped for an upgrade (or dropped with the runtime) and can be handed to the next image.
pub struct Relay {
    master: OwnedFd,
    stop: watch::Sender<bool>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl Relay {
    /// Stops relaying now and closes the master (the operation that started the process failed).
    pub fn stop(self) {
        for task in &self.tasks {
            task.abort();
        }
    }

    /// Stops relaying between two chunks and returns the master, still open, for the next
    /// image. A relay stuck writing to a destination nobody reads is cut after [`STOP_BOUND`].
    pub async fn stop_for_handover(self) -> OwnedFd {
        let _ = self.stop.send(true);
        for task in self.tasks {
            let abort = task.abort_handle();
            if tokio::time::timeout(STOP_BOUND, task).await.is_err() {
                abort.abort();
            }
        }
        self.master
    }
}

/// Relays a pty master to the client's paths until the process side closes: output to the
/// console path if one was given, else to stdout; input from the console path or stdin.
/// `on_end` runs once the process side has closed (not when the relay is stopped).
pub fn relay_terminal(
    master: OwnedFd,
    (input, output): RelayEnds,
    on_end: impl FnOnce() + Send + 'static,
) -> Result<Relay> {
    let kept = master
        .try_clone()
        .map_err(|e| Error::sys("duplicate the pty master", e))?;
    let endpoint = |fd: OwnedFd| Endpoint::new(fd).map_err(|e| Error::sys("relay terminal", e));
    let master = Arc::new(endpoint(master)?);
    let input = input.map(endpoint).transpose()?;
    let output = output.map(endpoint).transpose()?;
    let (stop, stopped) = watch::channel(false);
    let to_master = input.map(|input| {
        let master = Arc::clone(&master);
        let stopped = stopped.clone();
        tokio::spawn(async move {
            copy(&input, Some(&master), stopped).await;
        })
    });
    let to_master_abort = to_master.as_ref().map(|t| t.abort_handle());
    let from_master = tokio::spawn(async move {
        if copy(&master, output.as_ref(), stopped).await == Ended::Closed {
            if let Some(task) = to_master_abort {
                task.abort();
            }
            on_end();
        }
    });
    let tasks = to_master.into_iter().chain([from_master]).collect();
    Ok(Relay {
        master: kept,
        stop,
        tasks,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn as_root(dir: &Path) -> Option<Arc<Caller>> {
        Some(Arc::new(Caller::berthd(dir.join("state"))))
    }

    /// A relay read on `file`: one byte.
    async fn read_one(file: BlockingFile) -> std::io::Result<usize> {
        file.run(|fd| Ok(rustix::io::read(fd, &mut [0; 1])?)).await
    }

    #[tokio::test(flavor = "multi_thread")]
    async fn relay_calls_stuck_on_their_files_hold_their_places_and_the_next_waits() {
        let places = RELAY_FILE_CALLS.available_permits();
        let (mut writers, mut stuck) = (Vec::new(), Vec::new());
        for _ in 0..places {
            let (read, write) = rustix::pipe::pipe().unwrap();
            stuck.push(tokio::spawn(read_one(BlockingFile(Some(Arc::new(read))))));
            writers.push(write);
        }
        while RELAY_FILE_CALLS.available_permits() > 0 {
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        let (read, write) = rustix::pipe::pipe().unwrap();
        rustix::io::write(&write, b"x").unwrap();
        let next = tokio::spawn(read_one(BlockingFile(Some(Arc::new(read)))));
        tokio::time::sleep(Duration::from_millis(100)).await;
        assert!(!next.is_finished(), "a relay call ran past every place");
        rustix::io::write(&writers[0], b"x").unwrap();
        let read = tokio::time::timeout(Duration::from_secs(5), next).await;
        assert_eq!(read.expect("a place came back").unwrap().unwrap(), 1);
        drop(writers);
        for call in stuck {
            call.await.unwrap().unwrap();
        }
    }

    /// A pty master whose terminal side is closed with its input queue full refuses every write
    /// and reports a hang-up that never clears: the write ends with an error instead of waiting
    /// again at once, for ever, on a worker it never gives back.
    #[test]
    fn a_write_to_a_pty_whose_terminal_side_closed_ends_instead_of_spinning() {
        use rustix::pty::{OpenptFlags, grantpt, openpt, ptsname, unlockpt};
        let master = openpt(OpenptFlags::RDWR | OpenptFlags::NOCTTY).unwrap();
        grantpt(&master).unwrap();
        unlockpt(&master).unwrap();
        let name = ptsname(&master, Vec::new()).unwrap();
        let terminal = rustix::fs::open(
            name.as_c_str(),
            rustix::fs::OFlags::RDWR | rustix::fs::OFlags::NOCTTY,
            rustix::fs::Mode::empty(),
        )
        .unwrap();
        set_nonblocking(&master, true).unwrap();
        drop(terminal);
        // Once the kernel has let go of the closed terminal's queue (in a worker of its own),
        // what the master takes piles up with nobody to read it, until it takes no more.
        std::thread::sleep(Duration::from_millis(100));
        while rustix::io::write(&master, &[b'x'; 1024]).is_ok() {}
        assert_eq!(
            rustix::io::write(&master, b"x"),
            Err(rustix::io::Errno::AGAIN),
            "the master still takes writes"
        );
        let (ended, outcome) = std::sync::mpsc::channel();
        // On a thread of its own: a write that spins never returns, and is left behind.
        std::thread::spawn(move || {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            let result = runtime.block_on(async {
                let endpoint = Endpoint::new(master).unwrap();
                // More than the terminal's queue holds, so that it must wait for room.
                endpoint.write_all(vec![b'y'; 1 << 20]).await
            });
            let _ = ended.send(result.map_err(|e| e.kind()));
        });
        let result = outcome
            .recv_timeout(Duration::from_secs(10))
            .expect("the write to a closed terminal's full master did not end");
        assert_eq!(result, Err(std::io::ErrorKind::BrokenPipe));
    }

    /// One FIFO as stdin and as an output would have berthd carry the process's output back
    /// into its input for ever; the same regular file or `/dev/null` twice is the process's
    /// own business.
    #[tokio::test]
    async fn stdin_may_not_be_the_same_fifo_as_an_output() {
        let dir = tempfile::tempdir().unwrap();
        let fifo = dir.path().join("fifo");
        nix::unistd::mkfifo(&fifo, nix::sys::stat::Mode::from_bits_truncate(0o600)).unwrap();
        let file = dir.path().join("file");
        std::fs::write(&file, "").unwrap();
        let paths = |stdin: &Path, stdout: &Path, stderr: &Path| StdioPaths {
            stdin: stdin.display().to_string(),
            stdout: stdout.display().to_string(),
            stderr: stderr.display().to_string(),
            console: String::new(),
            caller: as_root(dir.path()),
        };
        let null = Path::new("/dev/null");
        let same_fifo = |result: Result<()>| match result {
            Err(Error::InvalidArgument(message)) => message.contains("same FIFO"),
            _ => false,
        };
        assert!(same_fifo(paths(&fifo, &fifo, null).open_all().map(drop)));
        assert!(same_fifo(paths(&fifo, null, &fifo).open_all().map(drop)));
        assert!(same_fifo(paths(&fifo, &fifo, null).open_relay().map(drop)));
        // With a terminal, stderr is the terminal's: the FIFO named there is only checked.
        assert!(paths(&fifo, null, &fifo).open_relay().is_ok());
        assert!(paths(&file, &file, &file).open_all().is_ok());
        assert!(paths(null, null, null).open_all().is_ok());
    }

    #[tokio::test]
    async fn relative_paths_and_a_missing_caller_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let relative = StdioPaths {
            stdin: "in".into(),
            caller: as_root(dir.path()),
            ..Default::default()
        };
        assert!(matches!(relative.check(), Err(Error::InvalidArgument(_))));
        let no_caller = StdioPaths::default();
        assert!(matches!(no_caller.check(), Err(Error::Internal(_))));
    }

    #[tokio::test]
    async fn fifos_open_without_a_peer_and_regular_files_are_not_truncated() {
        let dir = tempfile::tempdir().unwrap();
        let fifo = dir.path().join("fifo");
        let output = dir.path().join("output");
        for path in [&fifo, &output] {
            nix::unistd::mkfifo(path, nix::sys::stat::Mode::from_bits_truncate(0o600)).unwrap();
        }
        let file = dir.path().join("log");
        std::fs::write(&file, "kept\n").unwrap();
        // Neither FIFO open may block although nobody has the other end open.
        let paths = StdioPaths {
            stdin: fifo.display().to_string(),
            stdout: output.display().to_string(),
            stderr: file.display().to_string(),
            console: String::new(),
            caller: as_root(dir.path()),
        };
        let [_, _, SpawnStdio::Fd(stderr)] = paths.open_all().unwrap() else {
            panic!("a named stderr is opened by berthd");
        };
        rustix::io::write(&stderr, b"added\n").unwrap();
        assert_eq!(std::fs::read_to_string(&file).unwrap(), "kept\nadded\n");
        let empty = StdioPaths {
            caller: as_root(dir.path()),
            ..Default::default()
        };
        assert!(empty.all_empty());
        assert!(matches!(
            empty.open_all().unwrap(),
            [SpawnStdio::Null, SpawnStdio::Null, SpawnStdio::Null]
        ));
    }
}
