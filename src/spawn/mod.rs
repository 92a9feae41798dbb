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
    socket: AsyncFd<OwnedFd>,
    /// Requests waiting for their response; `None` once the helper is gone.
    pending: Mutex<Option<HashMap<u64, oneshot::Sender<Response>>>>,
}

impl Connection {
    fn new(socket: OwnedFd) -> io::Result<Arc<Self>> {
        rustix::io::ioctl_fionbio(&socket, true)?;
        Ok(Arc::new(Connection {
            socket: crate::reactor::register(
                socket,
                tokio::io::Interest::READABLE | tokio::io::Interest::WRITABLE,
            )?,
            pending: Mutex::new(Some(HashMap::new())),
        }))
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
        let sent = loop {
            let mut guard = match connection.socket.writable().await {
                Ok(guard) => guard,
                Err(e) => break Err(e),
            };
            match guard.try_io(|s| fdpass::send(s.get_ref(), &bytes, &borrowed)) {
                Ok(result) => break result,
                Err(_would_block) => continue,
            }
        };
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
