//! Reading what berthd streams: Events subscriptions and FIFOs.

use std::fs::{File, OpenOptions};
use std::io::Read;
use std::os::fd::AsFd;
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;
use std::time::Instant;

use berth_api::proto::{Event, EventsRequest};
use nix::poll::{PollFd, PollFlags, PollTimeout, poll};
use nix::sys::stat::Mode;
use tokio::sync::mpsc;

use super::{Client, EVENT_TIMEOUT};

/// One Events subscription.
pub struct Events {
    stream: tonic::Streaming<Event>,
    /// What [`Events::wait_for`] read past, for a later wait: two containers killed together
    /// may exit in either order.
    skipped: Vec<Event>,
}

impl Events {
    /// Subscribes; events published after this returns are delivered.
    pub async fn subscribe(client: &mut Client) -> Events {
        let stream = client
            .events(EventsRequest {})
            .await
            .expect("Events")
            .into_inner();
        Events {
            stream,
            skipped: Vec::new(),
        }
    }

    pub async fn next(&mut self) -> Event {
        match self.next_result().await {
            Ok(Some(event)) => event,
            Ok(None) => panic!("event stream ended"),
            Err(status) => panic!("event stream failed: {status:?}"),
        }
    }

    /// The first event that matches, among those an earlier wait read past or, after them,
    /// those still to come; the others are kept for later waits.
    pub async fn wait_for(&mut self, what: &str, matches: impl Fn(&Event) -> bool) -> Event {
        if let Some(at) = self.skipped.iter().position(&matches) {
            return self.skipped.remove(at);
        }
        let deadline = Instant::now() + EVENT_TIMEOUT;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match tokio::time::timeout(left, self.stream.message()).await {
                Ok(Ok(Some(event))) if matches(&event) => return event,
                Ok(Ok(Some(event))) => self.skipped.push(event),
                Ok(Ok(None)) => panic!(
                    "event stream ended waiting for {what}; saw {:#?}",
                    self.skipped
                ),
                Ok(Err(status)) => panic!("event stream failed waiting for {what}: {status:?}"),
                Err(_) => panic!(
                    "no {what} within {EVENT_TIMEOUT:?}; saw {:#?}",
                    self.skipped
                ),
            }
        }
    }

    /// Waits for the start-container event of `id`.
    pub async fn started(&mut self, id: &str) -> Event {
        let what = format!("start-container of {id}");
        self.wait_for(&what, |e| e.r#type == "start-container" && e.id == id)
            .await
    }

    /// Waits for the exit event of `pid` in container `id` and returns its status.
    pub async fn exit_status(&mut self, id: &str, pid: u32) -> u32 {
        let what = format!("exit of {id}/{pid}");
        let event = self
            .wait_for(&what, |e| e.r#type == "exit" && e.id == id && e.pid == pid)
            .await;
        event.status
    }

    /// The next event or the error that ended the stream, for streams expected to end.
    pub async fn next_result(&mut self) -> Result<Option<Event>, tonic::Status> {
        match tokio::time::timeout(EVENT_TIMEOUT, self.stream.message()).await {
            Ok(result) => result,
            Err(_) => panic!("event stream neither yielded nor ended within {EVENT_TIMEOUT:?}"),
        }
    }
}

// ----- FIFOs -----

pub fn mkfifo(path: &Path) {
    nix::unistd::mkfifo(path, Mode::from_bits_truncate(0o600))
        .unwrap_or_else(|e| panic!("mkfifo {}: {e}", path.display()));
}

pub fn path_str(path: &Path) -> String {
    path.to_str().expect("utf-8 path").to_owned()
}

/// Reads a FIFO on a plain thread, so a reader that hangs never stalls the runtime or keeps
/// the test binary alive.
pub struct Reader {
    chunks: mpsc::UnboundedReceiver<Vec<u8>>,
    data: Vec<u8>,
    eof: bool,
}

impl Reader {
    /// Opens the FIFO for reading before returning, so nothing written from now on is lost even
    /// if its writers come and go before the thread runs.
    pub fn open(path: &Path) -> Reader {
        // Non-blocking so the open does not wait for a writer.
        let file = OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_NONBLOCK)
            .open(path)
            .unwrap_or_else(|e| panic!("open {}: {e}", path.display()));
        let (tx, chunks) = mpsc::unbounded_channel();
        std::thread::spawn(move || {
            let mut file = file;
            let mut buf = vec![0; 64 * 1024];
            loop {
                // A FIFO polls as hung up only after a writer came and went, and reads 0 bytes
                // only then (or before any writer, which the poll rules out).
                let mut fds = [PollFd::new(file.as_fd(), PollFlags::POLLIN)];
                if poll(&mut fds, PollTimeout::NONE).is_err() {
                    break;
                }
                match file.read(&mut buf) {
                    Ok(0) => break,
                    Ok(n) if tx.send(buf[..n].to_vec()).is_err() => break,
                    Ok(_) => {}
                    Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
                    Err(_) => break,
                }
            }
        });
        Reader {
            chunks,
            data: Vec::new(),
            eof: false,
        }
    }

    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.data).into_owned()
    }

    /// Reads until the output contains `needle` (or the writers closed), returning all of it.
    pub async fn read_until(&mut self, needle: &str) -> String {
        let deadline = Instant::now() + EVENT_TIMEOUT;
        while !self.text().contains(needle) && !self.eof {
            self.read_some(deadline, needle).await;
        }
        self.text()
    }

    /// Reads until every writer closed, returning all output.
    pub async fn read_to_end(&mut self) -> String {
        let deadline = Instant::now() + EVENT_TIMEOUT;
        while !self.eof {
            self.read_some(deadline, "end of file").await;
        }
        self.text()
    }

    async fn read_some(&mut self, deadline: Instant, what: &str) {
        let left = deadline.saturating_duration_since(Instant::now());
        match tokio::time::timeout(left, self.chunks.recv()).await {
            Ok(Some(chunk)) => self.data.extend_from_slice(&chunk),
            Ok(None) => self.eof = true,
            Err(_) => panic!(
                "waited {EVENT_TIMEOUT:?} for {what}; read so far: {:?}",
                self.text()
            ),
        }
    }
}

/// Opens a FIFO read-write: never blocks, and keeps the FIFO open until dropped.
pub fn open_rw(path: &Path) -> File {
    OpenOptions::new()
        .read(true)
        .write(true)
        .open(path)
        .unwrap_or_else(|e| panic!("open {}: {e}", path.display()))
}
