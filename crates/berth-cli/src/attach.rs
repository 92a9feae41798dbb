//! Attaching to a process berthd starts: stdio FIFOs in a private directory, relays between
//! them and our own stdio, signal forwarding, and waiting for the process's `exit` event.

use std::fs::File;
use std::io::{self, Read, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::PathBuf;
use std::pin::pin;
use std::process::ExitCode;

use berth_api::proto::api_client::ApiClient;
use berth_api::proto::{Event, SignalRequest};
use nix::fcntl::{FcntlArg, OFlag, fcntl};
use nix::sys::signal::Signal;
use nix::sys::stat::Mode;
use nix::sys::termios::{self, SetArg, Termios};
use tokio::signal::unix::{Signal as UnixSignal, SignalKind, signal};
use tokio::sync::oneshot;
use tonic::Streaming;
use tonic::transport::Channel;

use crate::error::{Error, io_error};
use crate::events;
use crate::utf8;

pub fn exit_code(status: u32) -> ExitCode {
    ExitCode::from(u8::try_from(status).unwrap_or(u8::MAX))
}

/// The stdio FIFOs of an attached process, in a private directory that is removed on drop.
pub struct Attachment {
    dir: TempDir,
    stdin_writer: File,
    stdout_reader: File,
    stderr_reader: File,
    // Watched from the start, so a Ctrl-C while the process is being started is forwarded to it
    // once it runs, instead of killing berth and leaving the directory behind.
    interrupts: UnixSignal,
    terminations: UnixSignal,
}

impl Attachment {
    pub fn create() -> Result<Self, Error> {
        let interrupts =
            signal(SignalKind::interrupt()).map_err(io_error("watching for SIGINT"))?;
        let terminations =
            signal(SignalKind::terminate()).map_err(io_error("watching for SIGTERM"))?;
        let template = std::env::temp_dir().join("berth-attach-XXXXXX");
        let dir = nix::unistd::mkdtemp(&template).map_err(|errno| {
            io_error(format!("creating a directory like {}", template.display()))(errno.into())
        })?;
        let dir = TempDir(dir);
        for name in ["stdin", "stdout", "stderr"] {
            let path = dir.0.join(name);
            nix::unistd::mkfifo(&path, Mode::S_IRUSR | Mode::S_IWUSR).map_err(|errno| {
                io_error(format!("making fifo {}", path.display()))(errno.into())
            })?;
        }
        // Our read sides are open before berthd opens the write sides, so its non-blocking opens
        // find a reader. Opening them must not wait for a writer either; reads then block as
        // usual, and start only once berthd has opened the write side.
        let open_reader = |name: &str| {
            let path = dir.0.join(name);
            let context = format!("opening {}", path.display());
            let reader = std::fs::OpenOptions::new()
                .read(true)
                .custom_flags(OFlag::O_NONBLOCK.bits())
                .open(&path)
                .map_err(io_error(context.clone()))?;
            fcntl(&reader, FcntlArg::F_SETFL(OFlag::empty()))
                .map_err(|errno| io_error(context)(errno.into()))?;
            Ok::<_, Error>(reader)
        };
        let stdout_reader = open_reader("stdout")?;
        let stderr_reader = open_reader("stderr")?;
        // Read-write, so opening does not wait for a reader and the process sees no EOF on stdin
        // until we close it.
        let stdin_path = dir.0.join("stdin");
        let stdin_writer = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(&stdin_path)
            .map_err(io_error(format!("opening {}", stdin_path.display())))?;
        Ok(Self {
            dir,
            stdin_writer,
            stdout_reader,
            stderr_reader,
            interrupts,
            terminations,
        })
    }

    pub fn path_of(&self, name: &str) -> Result<String, Error> {
        utf8(self.dir.0.join(name))
    }

    /// Forwards stdin, streams stdout and stderr until EOF, and returns the exit status from the
    /// `exit` event of (`id`, `pid`).
    pub async fn attach(
        self,
        mut client: ApiClient<Channel>,
        events: Streaming<Event>,
        id: String,
        pid: u32,
    ) -> Result<u32, Error> {
        // The directory lives until we return; dropping it removes the FIFOs.
        let Self {
            dir: _dir,
            stdin_writer,
            stdout_reader,
            stderr_reader,
            mut interrupts,
            mut terminations,
        } = self;
        forward_stdin(stdin_writer);
        let stdout_relayed = relay_in_thread(stdout_reader, io::stdout());
        let stderr_relayed = relay_in_thread(stderr_reader, io::stderr());
        let mut resubscriber = client.clone();
        let finished = async {
            let ((), (), status) = tokio::try_join!(
                stdout_relayed,
                stderr_relayed,
                wait_for_exit(&mut resubscriber, events, &id, pid)
            )?;
            Ok(status)
        };
        let mut finished = pin!(finished);
        let mut forwarded = false;
        loop {
            let received = tokio::select! {
                result = &mut finished => return result,
                _ = interrupts.recv() => Signal::SIGINT,
                _ = terminations.recv() => Signal::SIGTERM,
            };
            if forwarded {
                return Err(Error::Detached {
                    id: id.clone(),
                    pid,
                });
            }
            forwarded = true;
            // A failure here means the process is already gone; its exit event follows.
            let _ = client
                .signal(SignalRequest {
                    id: id.clone(),
                    pid,
                    signal: received as u32,
                })
                .await;
        }
    }
}

/// A directory removed, with its contents, when dropped.
struct TempDir(PathBuf);

impl Drop for TempDir {
    fn drop(&mut self) {
        // Nothing useful can be done if it fails; the directory is in the temp dir.
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Copies our stdin into the process's stdin FIFO, then closes it so the process sees EOF.
fn forward_stdin(mut writer: File) {
    // A plain thread: a blocking read of our stdin cannot be cancelled, and unlike tokio's
    // blocking pool a detached thread does not hold up the exit.
    std::thread::spawn(move || {
        // Forwarding ends at EOF or at the first error; either way dropping the writer closes it.
        let _ = io::copy(&mut io::stdin().lock(), &mut writer);
    });
}

/// Runs [`relay`] in a thread of its own, so a slow reader of our output never delays reading
/// the event stream, and a relay still running (detached) does not hold up the exit.
fn relay_in_thread(
    mut from: File,
    mut to: impl Write + Send + 'static,
) -> impl Future<Output = Result<(), Error>> {
    let (done, finished) = oneshot::channel();
    std::thread::spawn(move || {
        // Nobody waits for the result any more once we have detached.
        let _ = done.send(relay(&mut from, &mut to));
    });
    async {
        finished
            .await
            // A dropped sender means the relay thread panicked.
            .unwrap_or_else(|_| Err(io::Error::other("the relay thread stopped")))
            .map_err(io_error("relaying the process's output"))
    }
}

/// Copies `from` to `to` until EOF. If `to` is closed by its reader, keeps draining `from` so
/// the process never blocks on a full pipe.
fn relay(from: &mut impl Read, to: &mut impl Write) -> io::Result<()> {
    let mut buffer = vec![0; 64 * 1024];
    let mut to_open = true;
    loop {
        let read = match from.read(&mut buffer) {
            Ok(0) => return Ok(()),
            Ok(read) => read,
            Err(error) if error.kind() == io::ErrorKind::Interrupted => continue,
            Err(error) => return Err(error),
        };
        if to_open {
            // Flushing every chunk shows prompts that end without a newline.
            match to.write_all(&buffer[..read]).and_then(|()| to.flush()) {
                Err(error) if error.kind() == io::ErrorKind::BrokenPipe => to_open = false,
                other => other?,
            }
        }
    }
}

/// The exit status of process `pid` of container `id`, from its `exit` event. A stream lost
/// to berthd's upgrade or restart is subscribed to again: the process runs on, its output
/// relays are berthd's to hand over, and an exit while berthd was away is replayed.
async fn wait_for_exit(
    client: &mut ApiClient<Channel>,
    mut events: Streaming<Event>,
    id: &str,
    pid: u32,
) -> Result<u32, Error> {
    let lost = |status| Error::EventsLost {
        id: id.to_owned(),
        pid,
        status,
    };
    loop {
        let went_away = match events.message().await {
            Ok(Some(event)) => {
                if event.r#type == "exit" && event.id == id && event.pid == pid {
                    return Ok(event.status);
                }
                continue;
            }
            Ok(None) => None,
            Err(status) if events::berthd_went_away(&status) => Some(status),
            Err(status) => return Err(lost(status)),
        };
        events::note_lost(went_away.as_ref());
        events = match events::resubscribe(client).await.map_err(lost)? {
            Some(again) => again,
            None => {
                return Err(match went_away {
                    Some(status) => lost(status),
                    None => Error::EventsEnded {
                        id: id.to_owned(),
                        pid,
                    },
                });
            }
        };
        // Gone by now, it exited while the stream was down: an init's exit is replayed, an
        // added process's may have been published to nobody.
        if !events::still_runs(client, id, pid).await.map_err(lost)? {
            return match tokio::time::timeout(EXIT_REPLAYED_WITHIN, exit_of(&mut events, id, pid))
                .await
            {
                Ok(Ok(Some(status))) => Ok(status),
                Ok(Err(status)) => Err(lost(status)),
                Ok(Ok(None)) | Err(_) => Err(Error::ExitUnknown {
                    id: id.to_owned(),
                    pid,
                }),
            };
        }
    }
}

/// How long a replayed exit may take to come after subscribing again.
const EXIT_REPLAYED_WITHIN: std::time::Duration = std::time::Duration::from_secs(2);

/// The status of process `pid`'s exit on `events`; `None` if the stream ends first.
async fn exit_of(
    events: &mut Streaming<Event>,
    id: &str,
    pid: u32,
) -> Result<Option<u32>, tonic::Status> {
    while let Some(event) = events.message().await? {
        if event.r#type == "exit" && event.id == id && event.pid == pid {
            return Ok(Some(event.status));
        }
    }
    Ok(None)
}

/// Our terminal in raw mode, so keys reach the process's terminal untouched; restored on drop.
pub struct RawTerminal {
    original: Termios,
}

impl RawTerminal {
    pub fn enter() -> Result<Self, Error> {
        let terminal_error =
            |errno: nix::Error| io_error("setting the terminal to raw mode")(errno.into());
        let original = termios::tcgetattr(io::stdin()).map_err(terminal_error)?;
        let mut raw = original.clone();
        termios::cfmakeraw(&mut raw);
        termios::tcsetattr(io::stdin(), SetArg::TCSANOW, &raw).map_err(terminal_error)?;
        Ok(Self { original })
    }
}

impl Drop for RawTerminal {
    fn drop(&mut self) {
        // If the terminal is gone there is nothing left to restore.
        let _ = termios::tcsetattr(io::stdin(), SetArg::TCSANOW, &self.original);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A writer whose reader has gone away.
    struct ClosedPipe;

    impl Write for ClosedPipe {
        fn write(&mut self, _: &[u8]) -> io::Result<usize> {
            Err(io::ErrorKind::BrokenPipe.into())
        }

        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn relay_copies_to_eof_and_drains_when_the_output_is_closed() {
        let data = vec![7u8; 200_000];
        let mut copied = Vec::new();
        relay(&mut data.as_slice(), &mut copied).unwrap();
        assert_eq!(copied, data);
        let mut input = data.as_slice();
        relay(&mut input, &mut ClosedPipe).unwrap();
        assert!(input.is_empty());
    }
}
