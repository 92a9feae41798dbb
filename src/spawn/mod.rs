//! The spawn helper: every runtime command berthd runs is forked and exec'd by a small helper
//! process, never by the daemon itself.
//!
//! Owns: forking the helper before berthd's runtime starts, the request/response protocol over a
//! `SOCK_SEQPACKET` socketpair (stdio passed with `SCM_RIGHTS`), restarting the helper when it
//! dies (re-exec of berthd's own binary, since forking the grown multi-threaded daemon is what the
//! helper exists to avoid) and failing the requests it had in flight with Unavailable.
//! It implements the runtime's [`Spawner`], turning the helper's wire response into the runtime's
//! [`Completion`] with the wait status decoded.
//! Does not own: what commands are run (runtime) or the processes they leave behind (reaper).

mod builtin;
pub(crate) mod fdpass;
#[allow(unsafe_code)]
mod fork;
mod helper;
pub mod protocol;

pub use fork::fork_helper;

use std::collections::HashMap;
use std::io;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, Weak};

use futures_util::future::BoxFuture;
use rustix::net::{AddressFamily, SocketFlags, SocketType};
use tokio::io::unix::AsyncFd;
use tokio::sync::oneshot;

use crate::error::{Error, Result};
use crate::runtime::builtin::BuiltinCall;
use crate::runtime::{self, Completion, SpawnOptions, SpawnStdio, Spawner};
use crate::wait_status::exit_code;
use protocol::{Command, MAX_MESSAGE, Request, Response, StdioSpec};

/// The argument that makes the berthd binary run as a restarted spawn helper on its stdin.
pub const HELPER_ARG: &str = "__spawn-helper";
/// The helper's process name, so operators and tests can tell it from berthd.
const HELPER_NAME: &str = "berthd-spawn";

fn socketpair() -> io::Result<(OwnedFd, OwnedFd)> {
    Ok(rustix::net::socketpair(
        AddressFamily::UNIX,
        SocketType::SEQPACKET,
        SocketFlags::CLOEXEC,
        None,
    )?)
}

/// Entry point of a restarted helper: serves the socket it was given as stdin.
pub fn serve_stdin() -> ! {
    let stdin = io::stdin().as_fd().try_clone_to_owned();
    match stdin {
        Ok(socket) => helper::serve(socket),
        Err(e) => {
            eprintln!("berthd spawn helper: stdin: {e}");
            std::process::exit(1)
        }
    }
}

fn name_this_process() {
    if let Ok(name) = std::ffi::CString::new(HELPER_NAME) {
        let _ = rustix::thread::set_name(&name);
    }
}

struct Connection {
    /// Registered for reading only: a socket registered for writing too wakes the reactor each
    /// time the helper reads a request (the kernel signals the space it freed), a wake-up per
    /// runtime command for nothing. Sends go straight to the socket; only one that finds it
    /// full waits for space ([`Connection::send`]).
    socket: AsyncFd<OwnedFd>,
    /// While sends wait for space: a second descriptor of the socket registered for writing,
    /// shared by every waiting send and deregistered with the last of them, so waiting costs
    /// one descriptor however many requests wait.
    space: Mutex<Weak<AsyncFd<OwnedFd>>>,
    /// Requests waiting for their response; `None` once the helper is gone.
    pending: Mutex<Option<HashMap<u64, oneshot::Sender<Response>>>>,
}

impl Connection {
    fn new(socket: OwnedFd) -> io::Result<Arc<Self>> {
        rustix::io::ioctl_fionbio(&socket, true)?;
        Ok(Arc::new(Connection {
            socket: crate::reactor::register(socket, tokio::io::Interest::READABLE)?,
            space: Mutex::new(Weak::new()),
            pending: Mutex::new(Some(HashMap::new())),
        }))
    }

    /// Sends one request. The socket is full only when the helper is far behind: then the send
    /// waits for space on [`Connection::space`].
    async fn send(&self, bytes: &[u8], fds: &[BorrowedFd<'_>]) -> io::Result<()> {
        match fdpass::send(self.socket.get_ref(), bytes, fds) {
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
            sent => return sent,
        }
        let writable = self.space()?;
        loop {
            let mut guard = writable.writable().await?;
            match guard.try_io(|s| fdpass::send(s.get_ref(), bytes, fds)) {
                Ok(sent) => return sent,
                Err(_would_block) => continue,
            }
        }
    }

    fn space(&self) -> io::Result<Arc<AsyncFd<OwnedFd>>> {
        let mut space = self.space.lock().expect("spawn lock poisoned");
        if let Some(writable) = space.upgrade() {
            return Ok(writable);
        }
        let writable = Arc::new(crate::reactor::register_duplicate(
            self.socket.as_fd(),
            tokio::io::Interest::WRITABLE,
        )?);
        *space = Arc::downgrade(&writable);
        Ok(writable)
    }

    fn fail_pending(&self) {
        // Dropping the senders wakes every waiter with an error.
        self.pending.lock().expect("spawn lock poisoned").take();
    }
}

/// berthd's handle on the spawn helper.
pub struct SpawnHelper {
    current: Mutex<Arc<Connection>>,
    next_id: AtomicU64,
}

impl SpawnHelper {
    /// Takes over berthd's end of a helper's socket. Must be called inside the tokio runtime.
    pub fn start(socket: OwnedFd) -> io::Result<Arc<Self>> {
        let connection = Connection::new(socket)?;
        let helper = Arc::new(SpawnHelper {
            current: Mutex::new(Arc::clone(&connection)),
            next_id: AtomicU64::new(1),
        });
        tokio::spawn(read_responses(Arc::downgrade(&helper), connection));
        Ok(helper)
    }

    /// Runs `argv` through the helper and returns how it ended. The helper kills the command
    /// after the options' timeout and reports `Outcome::TimedOut`.
    pub async fn run(
        &self,
        argv: Vec<String>,
        stdio: [SpawnStdio; 3],
        options: SpawnOptions,
    ) -> Result<Response> {
        self.request(Command::Exec { argv }, stdio, options).await
    }

    async fn request(
        &self,
        command: Command,
        stdio: [SpawnStdio; 3],
        options: SpawnOptions,
    ) -> Result<Response> {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let mut specs = [StdioSpec::Null; 3];
        let mut fds: Vec<OwnedFd> = Vec::new();
        for (spec, stream) in specs.iter_mut().zip(stdio) {
            *spec = match stream {
                SpawnStdio::Null => StdioSpec::Null,
                SpawnStdio::Capture => StdioSpec::Capture,
                SpawnStdio::Fd(fd) => {
                    fds.push(fd);
                    StdioSpec::Passed
                }
            };
        }
        let request = Request {
            id,
            command,
            stdio: specs,
            timeout_ms: options.timeout.as_millis() as u64,
            log: options.log,
            kill_if_abandoned: options.kill_if_berthd_dies,
        };
        let bytes = serde_json::to_vec(&request)
            .map_err(|e| Error::Internal(format!("encode spawn request: {e}")))?;
        if bytes.len() > MAX_MESSAGE {
            return Err(Error::InvalidArgument(format!(
                "runtime command line is {} bytes, more than the {MAX_MESSAGE} the spawn helper takes",
                bytes.len()
            )));
        }
        let connection = Arc::clone(&self.current.lock().expect("spawn lock poisoned"));
        let (tx, rx) = oneshot::channel();
        match connection
            .pending
            .lock()
            .expect("spawn lock poisoned")
            .as_mut()
        {
            Some(pending) => pending.insert(id, tx),
            None => return Err(helper_gone()),
        };
        let borrowed: Vec<BorrowedFd<'_>> = fds.iter().map(|fd| fd.as_fd()).collect();
        let sent = connection.send(&bytes, &borrowed).await;
        drop(fds);
        if let Err(e) = sent {
            if let Some(pending) = connection
                .pending
                .lock()
                .expect("spawn lock poisoned")
                .as_mut()
            {
                pending.remove(&id);
            }
            return Err(Error::Unavailable(format!(
                "could not reach the spawn helper: {e}; retry the request"
            )));
        }
        rx.await.map_err(|_| helper_gone())
    }

    fn restart(self: &Arc<Self>) -> io::Result<()> {
        let (berthd_end, helper_end) = socketpair()?;
        let exe = std::env::current_exe()?;
        std::process::Command::new(exe)
            .arg(HELPER_ARG)
            .stdin(std::process::Stdio::from(helper_end))
            .spawn()?;
        let connection = Connection::new(berthd_end)?;
        *self.current.lock().expect("spawn lock poisoned") = Arc::clone(&connection);
        tokio::spawn(read_responses(Arc::downgrade(self), connection));
        Ok(())
    }
}

impl Spawner for SpawnHelper {
    fn spawn(
        &self,
        argv: Vec<String>,
        stdio: [SpawnStdio; 3],
        options: SpawnOptions,
    ) -> BoxFuture<'_, Result<Completion>> {
        Box::pin(async move { self.run(argv, stdio, options).await.map(completion) })
    }

    fn run_builtin(
        &self,
        call: BuiltinCall,
        stdio: [SpawnStdio; 3],
        options: SpawnOptions,
    ) -> BoxFuture<'_, Result<Completion>> {
        Box::pin(async move {
            self.request(Command::Builtin(call), stdio, options)
                .await
                .map(completion)
        })
    }
}

/// The runtime's view of a helper response: the wait status decoded into an exit code.
fn completion(response: Response) -> Completion {
    let outcome = match response.outcome {
        protocol::Outcome::Exited { wait_status } => runtime::Outcome::Exited {
            code: exit_code(wait_status),
        },
        protocol::Outcome::TimedOut => runtime::Outcome::TimedOut,
        protocol::Outcome::SpawnFailed { error } => runtime::Outcome::SpawnFailed { error },
    };
    Completion {
        pid: response.pid,
        outcome,
        stdout: response.stdout,
        stderr: response.stderr,
    }
}

fn helper_gone() -> Error {
    Error::Unavailable(
        "the spawn helper exited while running this request; berthd restarted it, retry the request"
            .into(),
    )
}

async fn read_responses(helper: Weak<SpawnHelper>, connection: Arc<Connection>) {
    let mut buf = vec![0u8; MAX_MESSAGE];
    loop {
        let mut guard = match connection.socket.readable().await {
            Ok(guard) => guard,
            Err(_) => break,
        };
        let received = match guard.try_io(|s| fdpass::recv(s.get_ref(), &mut buf)) {
            Ok(received) => received,
            Err(_would_block) => continue,
        };
        match received {
            Ok((0, _)) | Err(_) => break,
            Ok((len, _)) => match serde_json::from_slice::<Response>(&buf[..len]) {
                Ok(response) => {
                    let waiter = connection
                        .pending
                        .lock()
                        .expect("spawn lock poisoned")
                        .as_mut()
                        .and_then(|pending| pending.remove(&response.id));
                    if let Some(waiter) = waiter {
                        let _ = waiter.send(response);
                    }
                }
                Err(e) => {
                    tracing::error!(error = %e, "malformed response from the spawn helper");
                    break;
                }
            },
        }
    }
    connection.fail_pending();
    let Some(helper) = helper.upgrade() else {
        return;
    };
    tracing::warn!("spawn helper exited; starting a new one");
    if let Err(e) = helper.restart() {
        tracing::error!(error = %e, "could not restart the spawn helper");
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    fn respond(socket: &OwnedFd, buf: &mut [u8]) -> io::Result<bool> {
        let (len, _fds) = fdpass::recv(socket, buf)?;
        if len == 0 {
            return Ok(false);
        }
        let request: Request = serde_json::from_slice(&buf[..len]).unwrap();
        let response = Response {
            id: request.id,
            pid: 1,
            outcome: protocol::Outcome::Exited { wait_status: 0 },
            stdout: String::new(),
            stderr: String::new(),
        };
        fdpass::send(socket, &serde_json::to_vec(&response).unwrap(), &[])?;
        Ok(true)
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn requests_that_find_the_socket_full_share_one_wait_for_space_and_are_all_answered() {
        const REQUESTS: usize = 500;
        let (berthd_end, helper_end) = socketpair().unwrap();
        // The smallest send buffer the kernel allows holds a few requests of the 500: the
        // others find the socket full and must wait for the helper to read.
        rustix::net::sockopt::set_socket_send_buffer_size(&berthd_end, 1).unwrap();
        let helper = SpawnHelper::start(berthd_end).unwrap();
        let requests: Vec<_> = (0..REQUESTS)
            .map(|i| {
                let helper = Arc::clone(&helper);
                tokio::spawn(async move {
                    let options = SpawnOptions {
                        timeout: Duration::from_secs(60),
                        log: None,
                        kill_if_berthd_dies: false,
                    };
                    let argv = vec![format!("request-{i}")];
                    helper
                        .run(argv, [const { SpawnStdio::Null }; 3], options)
                        .await
                })
            })
            .collect();
        // The helper starts reading only once the socket is full and sends wait on it.
        let connection = Arc::clone(&helper.current.lock().unwrap());
        let deadline = std::time::Instant::now() + Duration::from_secs(20);
        loop {
            let waiting = connection.space.lock().unwrap().upgrade();
            let sharing = waiting.map(|space| Arc::strong_count(&space) - 1);
            if sharing.is_some_and(|sends| sends > 1) {
                break;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "waiting sends should share one registration, found {sharing:?}"
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        let responder = std::thread::spawn(move || {
            let mut buf = vec![0u8; MAX_MESSAGE];
            for _ in 0..REQUESTS {
                assert!(respond(&helper_end, &mut buf).unwrap());
            }
            helper_end
        });
        for request in requests {
            let response = tokio::time::timeout(Duration::from_secs(30), request)
                .await
                .expect("a request was never answered")
                .unwrap()
                .unwrap();
            assert_eq!(response.pid, 1);
        }
        assert!(
            connection.space.lock().unwrap().upgrade().is_none(),
            "the registration for space outlived the sends that waited"
        );
        drop(responder.join().unwrap());
    }
}
