//! The spawn helper's side: a single-threaded loop that starts runtime commands (programs, or
//! built-in runtime calls in a forked child), captures their output, enforces their timeouts,
//! empties the log of a command that exited 0 and reports how they ended; once berthd is gone it
//! kills the commands that asked for it and exits. It runs in a small process forked before
//! berthd's runtime exists (or exec'd afresh when berthd restarts it), so forking here is cheap
//! and safe.

use std::collections::HashMap;
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::process::CommandExt;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use rustix::event::{PollFd, PollFlags};

use super::fdpass;
use super::protocol::{
    CAPTURE_LIMIT, Command as Job, MAX_MESSAGE, Outcome, Request, Response, StdioSpec,
};
use crate::runtime::builtin::BuiltinCall;
use crate::wait_status::exit_code;

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
    /// The command, also the leader of its own process group.
    pid: rustix::process::Pid,
    pidfd: OwnedFd,
    deadline: Instant,
    timed_out: bool,
    stdout: Capture,
    stderr: Capture,
    /// Emptied here if the command exits 0, so berthd's reactor never waits on the file.
    log: Option<PathBuf>,
    kill_if_abandoned: bool,
}

impl Running {
    /// SIGKILLs the command and its process group, so what it started goes with it.
    fn kill(&self) {
        let _ = rustix::process::kill_process_group(self.pid, rustix::process::Signal::KILL);
        let _ = rustix::process::kill_process(self.pid, rustix::process::Signal::KILL);
    }
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
        let (socket_ready, ready) = wait_for_readiness(&socket, &running, timeout);
        reap_and_report(&socket, &mut running, &ready);
        if socket_ready {
            match fdpass::recv(&socket, &mut buf) {
                Ok((0, fds)) if fds.is_empty() => abandon(&running),
                Ok((len, fds)) => match serde_json::from_slice::<Request>(&buf[..len]) {
                    Ok(request) => start(&socket, request, fds, &mut running),
                    Err(e) => fatal(&format!("malformed request: {e}")),
                },
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                // berthd died with answers unread: its end is gone as surely as when closed.
                Err(e) if berthd_is_gone(&e) => abandon(&running),
                Err(e) => fatal(&format!("receive: {e}")),
            }
        }
    }
}

/// berthd is gone (it closed its end, or died): the commands that asked for it are killed, each
/// with its process group (a dump or restore, whose checkpoint a restarted berthd gives back; an
/// exec, whose process nothing would track), and the helper exits; the others run to their end.
fn abandon(running: &HashMap<u64, Running>) -> ! {
    for r in running.values().filter(|r| r.kill_if_abandoned) {
        r.kill();
    }
    std::process::exit(0)
}

/// The errors a socket gives once its peer is gone: closed (EPIPE), or closed with data it had
/// not read (ECONNRESET).
fn berthd_is_gone(e: &std::io::Error) -> bool {
    matches!(
        e.kind(),
        std::io::ErrorKind::BrokenPipe | std::io::ErrorKind::ConnectionReset
    )
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
    let started = match request.command {
        Job::Exec { argv } => exec(&argv, request.stdio, fds),
        Job::Builtin(call) => builtin(&call, request.stdio, fds),
    };
    let (pid, stdout, stderr) = match started {
        Ok(started) => started,
        Err(error) => return respond(socket, failed(request.id, error)),
    };
    let pidfd = match rustix::process::pidfd_open(pid, rustix::process::PidfdFlags::empty()) {
        Ok(fd) => fd,
        Err(e) => {
            let _ = rustix::process::kill_process(pid, rustix::process::Signal::KILL);
            let _ = rustix::process::waitpid(Some(pid), rustix::process::WaitOptions::empty());
            return respond(
                socket,
                failed(
                    request.id,
                    format!("pidfd_open {}: {e}", pid.as_raw_nonzero()),
                ),
            );
        }
    };
    running.insert(
        request.id,
        Running {
            pid,
            pidfd,
            deadline: Instant::now() + Duration::from_millis(request.timeout_ms),
            timed_out: false,
            stdout: Capture::new(stdout),
            stderr: Capture::new(stderr),
            log: request.log,
            kill_if_abandoned: request.kill_if_abandoned,
        },
    );
}

/// A started command: its pid, and the read ends of its captured stdout and stderr.
type Started = (rustix::process::Pid, Option<OwnedFd>, Option<OwnedFd>);

fn exec(argv: &[String], stdio: [StdioSpec; 3], fds: Vec<OwnedFd>) -> Result<Started, String> {
    let mut fds = fds.into_iter();
    let [stdin, stdout, stderr] = stdio.map(|spec| match spec {
        StdioSpec::Null => Stdio::null(),
        StdioSpec::Capture => Stdio::piped(),
        StdioSpec::Passed => fds.next().map(Stdio::from).unwrap_or_else(Stdio::null),
    });
    let Some((program, args)) = argv.split_first() else {
        return Err("empty argv".into());
    };
    // A group of its own, so a timeout kills what the command started as well. Without the
    // service manager's variables berthd keeps for itself (notify): given `NOTIFY_SOCKET`, runc
    // passes it into the container and waits for a `READY=1` the container never sends.
    let mut command = Command::new(program);
    command
        .args(args)
        .env_remove("NOTIFY_SOCKET")
        .env_remove("WATCHDOG_USEC")
        .env_remove("WATCHDOG_PID")
        .process_group(0)
        .stdin(stdin)
        .stdout(stdout)
        .stderr(stderr);
    let mut child = command.spawn().map_err(|e| format!("{program}: {e}"))?;
    let pid = rustix::process::Pid::from_child(&child);
    // Reaped by pid in reap_and_report, as the built-in runtime's children (which have no
    // `Child`) are.
    Ok((
        pid,
        child.stdout.take().map(OwnedFd::from),
        child.stderr.take().map(OwnedFd::from),
    ))
}

/// Forks a child that carries out `call` with stdio as asked, then exits 0, or 1 after writing
/// why to the call's log.
fn builtin(
    call: &BuiltinCall,
    stdio: [StdioSpec; 3],
    fds: Vec<OwnedFd>,
) -> Result<Started, String> {
    let mut fds = fds.into_iter();
    let mut captured: [Option<OwnedFd>; 3] = [None, None, None];
    let mut child_stdio: Vec<OwnedFd> = Vec::with_capacity(3);
    for (spec, read_end) in stdio.iter().zip(captured.iter_mut()) {
        let fd = match spec {
            StdioSpec::Passed => match fds.next() {
                Some(fd) => fd,
                None => dev_null()?,
            },
            StdioSpec::Null => dev_null()?,
            StdioSpec::Capture => {
                let (read, write) = rustix::pipe::pipe_with(rustix::pipe::PipeFlags::CLOEXEC)
                    .map_err(|e| format!("pipe: {e}"))?;
                *read_end = Some(read);
                write
            }
        };
        child_stdio.push(fd);
    }
    let Ok(child_stdio) = <[OwnedFd; 3]>::try_from(child_stdio) else {
        return Err("stdio: three streams expected".into());
    };
    let pid = super::fork::fork_builtin(call, child_stdio).map_err(|e| format!("fork: {e}"))?;
    let [_, stdout, stderr] = captured;
    Ok((pid, stdout, stderr))
}

fn dev_null() -> Result<OwnedFd, String> {
    rustix::fs::open(
        "/dev/null",
        rustix::fs::OFlags::RDWR | rustix::fs::OFlags::CLOEXEC,
        rustix::fs::Mode::empty(),
    )
    .map_err(|e| format!("/dev/null: {e}"))
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

/// What one poll found ready among the running commands.
#[derive(Default)]
struct Ready {
    /// Commands whose pidfd is readable: exited, waiting to be reaped.
    exited: Vec<u64>,
    /// Commands with output (or end of file) on a captured pipe.
    output: Vec<u64>,
}

/// Polls the socket and every running command's pidfd and captured pipes, until one is ready or
/// the nearest deadline; answers whether the socket is readable and which commands are. Only
/// those are drained and reaped: with a burst of commands running, every wake-up waiting on
/// each of them cost two reads and a `waitpid` per command.
fn wait_for_readiness(
    socket: &OwnedFd,
    running: &HashMap<u64, Running>,
    timeout: Option<Duration>,
) -> (bool, Ready) {
    let mut fds = vec![PollFd::new(socket, PollFlags::IN)];
    // Which command, and whether it is the exit, for each entry of `fds` after the socket.
    let mut owners: Vec<(u64, bool)> = Vec::with_capacity(running.len() * 3);
    for (&id, r) in running {
        fds.push(PollFd::new(&r.pidfd, PollFlags::IN));
        owners.push((id, true));
        for capture in [&r.stdout, &r.stderr] {
            if let Some(pipe) = &capture.pipe {
                fds.push(PollFd::new(pipe, PollFlags::IN));
                owners.push((id, false));
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
    let mut ready = Ready::default();
    for (fd, &(id, exit)) in fds[1..].iter().zip(&owners) {
        match (fd.revents().is_empty(), exit) {
            (true, _) => {}
            (false, true) => ready.exited.push(id),
            (false, false) if ready.output.last() != Some(&id) => ready.output.push(id),
            (false, false) => {}
        }
    }
    (!fds[0].revents().is_empty(), ready)
}

/// Drains the commands with output, kills those past their deadline, and reaps and reports those
/// that exited.
fn reap_and_report(socket: &OwnedFd, running: &mut HashMap<u64, Running>, ready: &Ready) {
    for id in &ready.output {
        if let Some(r) = running.get_mut(id) {
            r.stdout.drain();
            r.stderr.drain();
        }
    }
    let now = Instant::now();
    for r in running.values_mut() {
        if !r.timed_out && now >= r.deadline {
            r.timed_out = true;
            r.kill();
        }
    }
    for id in &ready.exited {
        let Some(r) = running.get_mut(id) else {
            continue;
        };
        let Ok(Some((_, status))) =
            rustix::process::waitpid(Some(r.pid), rustix::process::WaitOptions::NOHANG)
        else {
            continue;
        };
        r.stdout.drain();
        r.stderr.drain();
        let outcome = if r.timed_out {
            Outcome::TimedOut
        } else {
            Outcome::Exited {
                wait_status: status.as_raw(),
            }
        };
        if let (Outcome::Exited { wait_status }, Some(log)) = (&outcome, &r.log)
            && exit_code(*wait_status) == Some(0)
        {
            crate::runtime::empty_if_written(log);
        }
        let response = Response {
            id: *id,
            pid: r.pid.as_raw_nonzero().get(),
            outcome,
            stdout: r.stdout.text(),
            stderr: r.stderr.text(),
        };
        running.remove(id);
        respond(socket, response);
    }
}

fn respond(socket: &OwnedFd, response: Response) {
    let bytes = match serde_json::to_vec(&response) {
        Ok(bytes) => bytes,
        Err(e) => fatal(&format!("encode response: {e}")),
    };
    if let Err(e) = fdpass::send(socket.as_fd(), &bytes, &[]) {
        // berthd is gone: the loop finds its end gone and abandons what asked for it.
        if berthd_is_gone(&e) {
            return;
        }
        fatal(&format!("send response: {e}"));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn shell(id: u64, script: &str, timeout: Duration) -> Request {
        Request {
            id,
            command: Job::Exec {
                argv: vec!["/bin/sh".into(), "-c".into(), script.into()],
            },
            stdio: [StdioSpec::Null, StdioSpec::Capture, StdioSpec::Capture],
            timeout_ms: timeout.as_millis() as u64,
            log: None,
            kill_if_abandoned: false,
        }
    }

    /// Turns the helper's loop (its socket reads aside) until `want` responses reached berthd's
    /// end of the socket.
    fn serve_until(
        helper_end: &OwnedFd,
        berthd_end: &OwnedFd,
        running: &mut HashMap<u64, Running>,
        want: usize,
    ) -> Vec<Response> {
        let mut responses = Vec::new();
        let mut buf = vec![0u8; MAX_MESSAGE];
        let deadline = Instant::now() + Duration::from_secs(30);
        while responses.len() < want {
            assert!(
                Instant::now() < deadline,
                "only {} of {want} commands reported",
                responses.len()
            );
            let (_, ready) =
                wait_for_readiness(helper_end, running, Some(Duration::from_millis(50)));
            reap_and_report(helper_end, running, &ready);
            loop {
                let mut answer = [PollFd::new(berthd_end, PollFlags::IN)];
                let zero = rustix::time::Timespec {
                    tv_sec: 0,
                    tv_nsec: 0,
                };
                if rustix::event::poll(&mut answer, Some(&zero)).unwrap() == 0 {
                    break;
                }
                let (len, _) = fdpass::recv(berthd_end, &mut buf).unwrap();
                responses.push(serde_json::from_slice(&buf[..len]).unwrap());
            }
        }
        responses
    }

    #[test]
    fn only_the_commands_that_ended_are_reported_and_output_is_drained_while_they_run() {
        // A reaper test's orphan sweep would reap these children too.
        let _children = crate::reaper::tests::CHILD_PROCESSES.blocking_lock();
        let (berthd_end, helper_end) = super::super::socketpair().unwrap();
        let mut running = HashMap::new();
        let minute = Duration::from_secs(60);
        // Four times a pipe's buffer: it ends only if its stdout is drained while it runs.
        let chatty = "head -c 262144 /dev/zero; exit 3";
        start(
            &helper_end,
            shell(1, chatty, minute),
            Vec::new(),
            &mut running,
        );
        start(
            &helper_end,
            shell(2, "echo oops >&2", minute),
            Vec::new(),
            &mut running,
        );
        let short = Duration::from_millis(200);
        start(
            &helper_end,
            shell(3, "exec sleep 30", short),
            Vec::new(),
            &mut running,
        );
        start(
            &helper_end,
            shell(4, "exec sleep 30", minute),
            Vec::new(),
            &mut running,
        );

        let mut responses = serve_until(&helper_end, &berthd_end, &mut running, 3);
        responses.sort_by_key(|r| r.id);
        let outcomes: Vec<_> = responses.iter().map(|r| (r.id, &r.outcome)).collect();
        assert!(
            matches!(
                outcomes[..],
                [
                    (1, Outcome::Exited { wait_status: chatty }),
                    (2, Outcome::Exited { wait_status: quiet }),
                    (3, Outcome::TimedOut),
                ] if exit_code(*chatty) == Some(3) && exit_code(*quiet) == Some(0)
            ),
            "{outcomes:?}"
        );
        assert_eq!(responses[0].stdout.len(), CAPTURE_LIMIT);
        assert_eq!(responses[1].stderr, "oops\n");
        assert_eq!(running.keys().collect::<Vec<_>>(), [&4]);

        let sleeping = running.remove(&4).unwrap();
        sleeping.kill();
        rustix::process::waitpid(Some(sleeping.pid), rustix::process::WaitOptions::empty())
            .unwrap();
    }

    #[test]
    fn a_log_is_emptied_after_a_success_and_left_as_written_after_a_failure() {
        let _children = crate::reaper::tests::CHILD_PROCESSES.blocking_lock();
        let (berthd_end, helper_end) = super::super::socketpair().unwrap();
        let mut running = HashMap::new();
        let dir = tempfile::tempdir().unwrap();
        let minute = Duration::from_secs(60);
        for (id, exit) in [(1, 0), (2, 1)] {
            let log = dir.path().join(format!("{id}.log"));
            let script = format!("echo a warning >> {}; exit {exit}", log.display());
            let request = Request {
                log: Some(log),
                ..shell(id, &script, minute)
            };
            start(&helper_end, request, Vec::new(), &mut running);
        }
        serve_until(&helper_end, &berthd_end, &mut running, 2);
        let written = |id| std::fs::read_to_string(dir.path().join(format!("{id}.log"))).unwrap();
        assert_eq!(
            written(1),
            "",
            "a success's log is kept, empty, for the next command"
        );
        assert_eq!(
            written(2),
            "a warning\n",
            "a failure's log is berthd's to read"
        );
    }
}
