//! The spawn helper's side: a single-threaded loop that starts runtime commands, captures their
//! output, enforces their timeouts and reports how they ended. It runs in a small process forked
//! before berthd's runtime exists (or exec'd afresh when berthd restarts it), so forking here is
//! cheap and safe.

use std::collections::HashMap;
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use rustix::event::{PollFd, PollFlags};

use super::fdpass;
use super::protocol::{CAPTURE_LIMIT, MAX_MESSAGE, Outcome, Request, Response, StdioSpec};

struct Capture {
    pipe: Option<OwnedFd>,
    bytes: Vec<u8>,
}

impl Capture {
    fn new(pipe: Option<OwnedFd>) -> Self {
        if let Some(pipe) = &pipe {
            // Drained without blocking: a grandchild (the container) may keep a write end open.
            let flags = rustix::fs::fcntl_getfl(pipe).unwrap_or(rustix::fs::OFlags::empty());
            let _ = rustix::fs::fcntl_setfl(pipe, flags | rustix::fs::OFlags::NONBLOCK);
        }
        Capture {
            pipe,
            bytes: Vec::new(),
        }
    }

    fn drain(&mut self) {
        let Some(pipe) = &self.pipe else { return };
        let mut chunk = [0u8; 4096];
        loop {
            match rustix::io::read(pipe, &mut chunk) {
                Ok(0) => {
                    self.pipe = None;
                    return;
                }
                Ok(n) => {
                    let room = CAPTURE_LIMIT.saturating_sub(self.bytes.len());
                    self.bytes.extend_from_slice(&chunk[..n.min(room)]);
                }
                Err(rustix::io::Errno::INTR) => continue,
                Err(rustix::io::Errno::AGAIN) => return,
                Err(_) => {
                    self.pipe = None;
                    return;
                }
            }
        }
    }

    fn text(&self) -> String {
        String::from_utf8_lossy(&self.bytes).into_owned()
    }
}

struct Running {
    child: Child,
    pidfd: OwnedFd,
    deadline: Instant,
    timed_out: bool,
    stdout: Capture,
    stderr: Capture,
}

/// Serves spawn requests on `socket` until berthd closes it.
pub fn serve(socket: OwnedFd) -> ! {
    // A session of its own keeps terminal signals aimed at berthd away from runtime commands.
    let _ = rustix::process::setsid();
    super::name_this_process();
    let mut running: HashMap<u64, Running> = HashMap::new();
    let mut buf = vec![0u8; MAX_MESSAGE];
    loop {
        let now = Instant::now();
        let timeout = running
            .values()
            .filter(|r| !r.timed_out)
            .map(|r| r.deadline.saturating_duration_since(now))
            .min();
        let ids: Vec<u64> = running.keys().copied().collect();
        let (socket_ready, ready) = {
            let mut fds = vec![PollFd::new(&socket, PollFlags::IN)];
            for id in &ids {
                let r = &running[id];
                fds.push(PollFd::new(&r.pidfd, PollFlags::IN));
                for capture in [&r.stdout, &r.stderr] {
                    if let Some(pipe) = &capture.pipe {
                        fds.push(PollFd::new(pipe, PollFlags::IN));
                    }
                }
            }
            let timespec = timeout.map(|d| {
                rustix::time::Timespec::try_from(d.max(Duration::from_millis(1))).unwrap_or(
                    rustix::time::Timespec {
                        tv_sec: 1,
                        tv_nsec: 0,
                    },
                )
            });
            match rustix::event::poll(&mut fds, timespec.as_ref()) {
                Ok(_) | Err(rustix::io::Errno::INTR) => {}
                Err(e) => fatal(&format!("poll: {e}")),
            }
            let socket_ready = !fds[0].revents().is_empty();
            (
                socket_ready,
                fds.iter().skip(1).any(|f| !f.revents().is_empty()),
            )
        };

        if ready || timeout.is_some() {
            reap_and_report(&socket, &mut running);
        }
        if socket_ready {
            match fdpass::recv(&socket, &mut buf) {
                Ok((0, fds)) if fds.is_empty() => std::process::exit(0),
                Ok((len, fds)) => match serde_json::from_slice::<Request>(&buf[..len]) {
                    Ok(request) => start(&socket, request, fds, &mut running),
                    Err(e) => fatal(&format!("malformed request: {e}")),
                },
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e) => fatal(&format!("receive: {e}")),
            }
        }
    }
}

fn fatal(message: &str) -> ! {
    eprintln!("berthd spawn helper: {message}");
    std::process::exit(1)
}

fn start(
    socket: &OwnedFd,
    request: Request,
    fds: Vec<OwnedFd>,
    running: &mut HashMap<u64, Running>,
) {
    let mut fds = fds.into_iter();
    let [stdin, stdout, stderr] = request.stdio.map(|spec| match spec {
        StdioSpec::Null => Stdio::null(),
        StdioSpec::Capture => Stdio::piped(),
        StdioSpec::Passed => fds.next().map(Stdio::from).unwrap_or_else(Stdio::null),
    });
    let Some((program, args)) = request.argv.split_first() else {
        return respond(socket, failed(request.id, "empty argv".into()));
    };
    // A group of its own, so a timeout kills what the command started as well.
    let spawned = Command::new(program)
        .args(args)
        .process_group(0)
        .stdin(stdin)
        .stdout(stdout)
        .stderr(stderr)
        .spawn();
    let mut child = match spawned {
        Ok(child) => child,
        Err(e) => return respond(socket, failed(request.id, format!("{program}: {e}"))),
    };
    let pid = child.id() as i32;
    let pidfd = match rustix::process::Pid::from_raw(pid)
        .ok_or(rustix::io::Errno::SRCH)
        .and_then(|p| rustix::process::pidfd_open(p, rustix::process::PidfdFlags::empty()))
    {
        Ok(fd) => fd,
        Err(e) => {
            let _ = child.kill();
            let _ = child.wait();
            return respond(socket, failed(request.id, format!("pidfd_open {pid}: {e}")));
        }
    };
    let stdout = Capture::new(child.stdout.take().map(OwnedFd::from));
    let stderr = Capture::new(child.stderr.take().map(OwnedFd::from));
    running.insert(
        request.id,
        Running {
            child,
            pidfd,
            deadline: Instant::now() + Duration::from_millis(request.timeout_ms),
            timed_out: false,
            stdout,
            stderr,
        },
    );
}

fn failed(id: u64, error: String) -> Response {
    Response {
        id,
        pid: 0,
        outcome: Outcome::SpawnFailed { error },
        stdout: String::new(),
        stderr: String::new(),
    }
}

fn reap_and_report(socket: &OwnedFd, running: &mut HashMap<u64, Running>) {
    let now = Instant::now();
    let mut finished = Vec::new();
    for (id, r) in running.iter_mut() {
        r.stdout.drain();
        r.stderr.drain();
        if !r.timed_out && now >= r.deadline {
            r.timed_out = true;
            if let Some(group) = rustix::process::Pid::from_raw(r.child.id() as i32) {
                let _ = rustix::process::kill_process_group(group, rustix::process::Signal::KILL);
            }
            let _ = r.child.kill();
        }
        if let Ok(Some(status)) = r.child.try_wait() {
            r.stdout.drain();
            r.stderr.drain();
            let outcome = if r.timed_out {
                Outcome::TimedOut
            } else {
                Outcome::Exited {
                    wait_status: status.into_raw(),
                }
            };
            finished.push(Response {
                id: *id,
                pid: r.child.id() as i32,
                outcome,
                stdout: r.stdout.text(),
                stderr: r.stderr.text(),
            });
        }
    }
    for response in finished {
        running.remove(&response.id);
        respond(socket, response);
    }
}

fn respond(socket: &OwnedFd, response: Response) {
    let bytes = match serde_json::to_vec(&response) {
        Ok(bytes) => bytes,
        Err(e) => fatal(&format!("encode response: {e}")),
    };
    if let Err(e) = fdpass::send(socket.as_fd(), &bytes, &[]) {
        if e.kind() == std::io::ErrorKind::BrokenPipe {
            std::process::exit(0);
        }
        fatal(&format!("send response: {e}"));
    }
}
