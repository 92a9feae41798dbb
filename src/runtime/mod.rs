//! Typed runtime operations and the one place they become argv for runc, crun or youki.
//!
//! Owns: the argv of every runtime invocation, its timeout, turning a failed invocation into an
//! error that carries the runtime's own message (from its JSON log, else its stderr), and the
//! [`Spawner`] interface with what it takes ([`SpawnStdio`]) and returns ([`Completion`]); with
//! `--runtime builtin`, the same operations as calls for the built-in runtime ([`builtin`]).
//! Does not own: starting processes or decoding how they ended (the spawn helper implements
//! [`Spawner`]), or what the supervisor does with the result; whether CRIU works ([`criu`]).

pub mod builtin;
mod criu;

use std::os::fd::OwnedFd;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use futures_util::future::BoxFuture;

use crate::error::{Error, Result};
use builtin::BuiltinCall;

/// One runtime invocation, with everything its argv needs.
#[derive(Debug, Clone, Copy)]
pub(crate) enum Operation<'a> {
    Create {
        id: &'a str,
        bundle: &'a Path,
        pid_file: &'a Path,
        console_socket: Option<&'a Path>,
    },
    Start {
        id: &'a str,
    },
    Exec {
        id: &'a str,
        process: &'a Path,
        pid_file: &'a Path,
        console_socket: Option<&'a Path>,
    },
    Pause {
        id: &'a str,
    },
    Resume {
        id: &'a str,
    },
    Delete {
        id: &'a str,
    },
    /// Every container the runtime knows, as JSON.
    List,
    Checkpoint {
        id: &'a str,
        image: &'a Path,
        work: &'a Path,
        options: CriuOptions,
    },
    Restore {
        id: &'a str,
        bundle: &'a Path,
        image: &'a Path,
        work: &'a Path,
        pid_file: &'a Path,
        console_socket: Option<&'a Path>,
        options: CriuOptions,
    },
}

/// What CRIU may dump and restore, and whether the container keeps running after a dump.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) struct CriuOptions {
    pub leave_running: bool,
    pub tcp_established: bool,
    pub external_unix_sockets: bool,
    pub shell_job: bool,
}

impl CriuOptions {
    fn flags(&self) -> impl Iterator<Item = String> {
        [
            (self.tcp_established, "--tcp-established"),
            (self.external_unix_sockets, "--ext-unix-sk"),
            (self.shell_job, "--shell-job"),
        ]
        .into_iter()
        .filter(|(on, _)| *on)
        .map(|(_, flag)| flag.to_owned())
    }
}

impl Operation<'_> {
    pub fn name(&self) -> &'static str {
        match self {
            Operation::Create { .. } => "create",
            Operation::Start { .. } => "start",
            Operation::Exec { .. } => "exec",
            Operation::Pause { .. } => "pause",
            Operation::Resume { .. } => "resume",
            Operation::Delete { .. } => "delete",
            Operation::List => "list",
            Operation::Checkpoint { .. } => "checkpoint",
            Operation::Restore { .. } => "restore",
        }
    }

    /// Whether the runtime's stdio becomes the container process's stdio, so output cannot be
    /// captured and the error text must come from the log file.
    fn passes_stdio(&self) -> bool {
        matches!(
            self,
            Operation::Create { .. } | Operation::Exec { .. } | Operation::Restore { .. }
        )
    }
}

/// The runtime binary and where it keeps its state.
#[derive(Debug, Clone)]
pub struct RuntimeBinary {
    pub path: PathBuf,
    pub root: PathBuf,
    /// The CRIU binary runc checkpoints and restores with (its global `--criu`); `None` for
    /// `criu` in `PATH`.
    pub criu: Option<PathBuf>,
}

impl RuntimeBinary {
    /// Whether this is `--runtime builtin`: operations go to the spawn helper as
    /// [`BuiltinCall`]s, no binary is run.
    pub(crate) fn is_builtin(&self) -> bool {
        self.path == Path::new(builtin::BUILTIN)
    }

    /// The runtime's short name for messages: `runc`, `crun`, or the file name given.
    pub(crate) fn name(&self) -> String {
        self.path
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_else(|| self.path.display().to_string())
    }

    /// The full argv for `op`. runc, crun and youki share these flags; only runc takes `--criu`
    /// ([`RuntimeBinary::check_criu_flag`]).
    pub(crate) fn argv(&self, op: &Operation<'_>, log: &Path) -> Vec<String> {
        let path = |p: &Path| p.display().to_string();
        let mut argv = vec![
            path(&self.path),
            "--root".into(),
            path(&self.root),
            "--log".into(),
            path(log),
            "--log-format".into(),
            "json".into(),
        ];
        if let Some(criu) = &self.criu {
            argv.extend(["--criu".into(), path(criu)]);
        }
        argv.push(op.name().into());
        match *op {
            Operation::Create {
                id,
                bundle,
                pid_file,
                console_socket,
            } => {
                argv.extend(["--bundle".into(), path(bundle)]);
                argv.extend(["--pid-file".into(), path(pid_file)]);
                if let Some(socket) = console_socket {
                    argv.extend(["--console-socket".into(), path(socket)]);
                }
                argv.push(id.into());
            }
            Operation::Exec {
                id,
                process,
                pid_file,
                console_socket,
            } => {
                argv.push("--detach".into());
                argv.extend(["--pid-file".into(), path(pid_file)]);
                argv.extend(["--process".into(), path(process)]);
                if let Some(socket) = console_socket {
                    argv.extend(["--console-socket".into(), path(socket)]);
                }
                argv.push(id.into());
            }
            Operation::Delete { id } => {
                argv.extend(["--force".into(), id.into()]);
            }
            Operation::List => argv.extend(["--format".into(), "json".into()]),
            Operation::Checkpoint {
                id,
                image,
                work,
                options,
            } => {
                argv.extend(["--image-path".into(), path(image)]);
                argv.extend(["--work-path".into(), path(work)]);
                if options.leave_running {
                    argv.push("--leave-running".into());
                }
                argv.extend(options.flags());
                argv.push(id.into());
            }
            Operation::Restore {
                id,
                bundle,
                image,
                work,
                pid_file,
                console_socket,
                options,
            } => {
                argv.push("--detach".into());
                argv.extend(["--bundle".into(), path(bundle)]);
                argv.extend(["--image-path".into(), path(image)]);
                argv.extend(["--work-path".into(), path(work)]);
                argv.extend(["--pid-file".into(), path(pid_file)]);
                if let Some(socket) = console_socket {
                    argv.extend(["--console-socket".into(), path(socket)]);
                }
                argv.extend(options.flags());
                argv.push(id.into());
            }
            Operation::Start { id } | Operation::Pause { id } | Operation::Resume { id } => {
                argv.push(id.into())
            }
        }
        argv
    }
}

/// One stdio stream of a spawned command.
pub enum SpawnStdio {
    Null,
    Capture,
    Fd(OwnedFd),
}

/// How a spawned command ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// The command ended with this exit code; `None` when its wait status was not an exit.
    Exited { code: Option<u32> },
    /// The command outlived its timeout and was killed.
    TimedOut,
    /// The command could not be started at all.
    SpawnFailed { error: String },
}

/// A spawned command that has ended, with what it wrote to its captured streams.
#[derive(Debug)]
pub struct Completion {
    pub pid: i32,
    pub outcome: Outcome,
    pub stdout: String,
    pub stderr: String,
}

/// Starts processes for the runtime; the spawn helper in berthd, a stub in unit tests.
pub trait Spawner: Send + Sync + 'static {
    /// Runs `argv`, killing it (and its process group) after `timeout`.
    fn spawn(
        &self,
        argv: Vec<String>,
        stdio: [SpawnStdio; 3],
        timeout: Duration,
    ) -> BoxFuture<'_, Result<Completion>>;

    /// Carries out `call` with the built-in runtime, killing it after `timeout`. Spawners
    /// without one refuse.
    fn run_builtin(
        &self,
        call: BuiltinCall,
        stdio: [SpawnStdio; 3],
        timeout: Duration,
    ) -> BoxFuture<'_, Result<Completion>> {
        let _ = (call, stdio, timeout);
        Box::pin(async {
            Err(Error::FailedPrecondition(
                "this spawner has no built-in runtime".into(),
            ))
        })
    }
}

/// Runs typed operations through a spawner, with a timeout and the runtime's errors.
pub struct Runtime {
    binary: RuntimeBinary,
    spawner: Arc<dyn Spawner>,
    timeout: Duration,
    log_dir: PathBuf,
    next_log: AtomicU64,
    criu: criu::Criu,
}

impl Runtime {
    pub fn new(
        binary: RuntimeBinary,
        spawner: Arc<dyn Spawner>,
        timeout: Duration,
        log_dir: PathBuf,
    ) -> Self {
        Runtime {
            criu: criu::Criu::new(binary.criu.clone()),
            binary,
            spawner,
            timeout,
            log_dir,
            next_log: AtomicU64::new(0),
        }
    }

    pub(crate) fn binary(&self) -> &RuntimeBinary {
        &self.binary
    }

    /// Ok when CRIU passed `criu check` on this host (run once, on the first call); else
    /// FAILED_PRECONDITION with the check's own message.
    pub(crate) async fn criu_ready(&self) -> Result<()> {
        if self.binary.is_builtin() {
            return Err(builtin::needs_binary());
        }
        self.criu.ready(&self.spawner).await
    }

    /// Runs `op` with its output captured; returns its stdout.
    pub(crate) async fn run(&self, op: Operation<'_>) -> Result<String> {
        self.run_with_stdio(
            op,
            [SpawnStdio::Null, SpawnStdio::Capture, SpawnStdio::Capture],
        )
        .await
    }

    /// Runs `op` with the given stdio (the container's, for create and exec).
    pub(crate) async fn run_with_stdio(
        &self,
        op: Operation<'_>,
        stdio: [SpawnStdio; 3],
    ) -> Result<String> {
        let log = self.log_dir.join(format!(
            "{}.log",
            self.next_log.fetch_add(1, Ordering::Relaxed)
        ));
        let what = format!("{} {}", self.binary.name(), op.name());
        let started = std::time::Instant::now();
        let completion = if self.binary.is_builtin() {
            let call = BuiltinCall::new(&op, &self.binary.root, &log)?;
            tracing::debug!(?call, "runtime");
            self.spawner.run_builtin(call, stdio, self.timeout).await
        } else {
            let argv = self.binary.argv(&op, &log);
            tracing::debug!(?argv, "runtime");
            self.spawner.spawn(argv, stdio, self.timeout).await
        };
        crate::instruments::runtime_command(op.name(), started.elapsed());
        let log_text = std::fs::read_to_string(&log).unwrap_or_default();
        let _ = std::fs::remove_file(&log);
        let completion = completion?;
        match completion.outcome {
            Outcome::Exited { code } => {
                if code == Some(0) {
                    Ok(completion.stdout)
                } else {
                    let captured = if op.passes_stdio() {
                        ""
                    } else {
                        &completion.stderr
                    };
                    let message = failure_message(&log_text, captured, code);
                    // runc already says "runc create failed: ..."; say it once.
                    let message = match message.strip_prefix(&format!("{what} failed: ")) {
                        Some(rest) => rest.to_owned(),
                        None => message,
                    };
                    Err(Error::Runtime { op: what, message })
                }
            }
            Outcome::TimedOut => Err(Error::Timeout {
                what,
                secs: self.timeout.as_secs(),
            }),
            Outcome::SpawnFailed { error } => Err(Error::Runtime {
                op: what,
                message: error,
            }),
        }
    }
}

/// The most useful line a failed runtime left: the last error in its JSON log, else the last
/// non-empty line of its stderr, else its exit status.
fn failure_message(log: &str, stderr: &str, status: Option<u32>) -> String {
    #[derive(serde::Deserialize)]
    struct LogLine {
        level: String,
        msg: String,
    }
    let from_log = log
        .lines()
        .rev()
        .filter_map(|line| serde_json::from_str::<LogLine>(line).ok())
        .find(|line| line.level == "error" || line.level == "fatal")
        .map(|line| line.msg);
    from_log
        .or_else(|| {
            stderr
                .lines()
                .rev()
                .map(str::trim)
                .find(|l| !l.is_empty())
                .map(str::to_owned)
        })
        .unwrap_or_else(|| match status {
            Some(code) => format!("exited with status {code} and no message"),
            None => "ended abnormally with no message".into(),
        })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Mutex;

    fn binary() -> RuntimeBinary {
        RuntimeBinary {
            path: "/usr/bin/runc".into(),
            root: "/run/berth/runtime".into(),
            criu: None,
        }
    }

    fn args(op: Operation<'_>) -> Vec<String> {
        binary().argv(&op, Path::new("/run/berth/tmp/1.log"))[7..].to_vec()
    }

    #[test]
    fn global_flags_come_first() {
        let argv = binary().argv(&Operation::Start { id: "a" }, Path::new("/l.log"));
        assert_eq!(
            argv,
            [
                "/usr/bin/runc",
                "--root",
                "/run/berth/runtime",
                "--log",
                "/l.log",
                "--log-format",
                "json",
                "start",
                "a"
            ]
        );
    }

    #[test]
    fn create_and_exec_argv() {
        let create = Operation::Create {
            id: "web",
            bundle: Path::new("/b"),
            pid_file: Path::new("/p"),
            console_socket: None,
        };
        assert_eq!(
            args(create),
            ["create", "--bundle", "/b", "--pid-file", "/p", "web"]
        );
        let with_console = Operation::Create {
            id: "web",
            bundle: Path::new("/b"),
            pid_file: Path::new("/p"),
            console_socket: Some(Path::new("/c.sock")),
        };
        assert_eq!(
            args(with_console),
            [
                "create",
                "--bundle",
                "/b",
                "--pid-file",
                "/p",
                "--console-socket",
                "/c.sock",
                "web"
            ]
        );
        let exec = Operation::Exec {
            id: "web",
            process: Path::new("/proc.json"),
            pid_file: Path::new("/p"),
            console_socket: None,
        };
        assert_eq!(
            args(exec),
            [
                "exec",
                "--detach",
                "--pid-file",
                "/p",
                "--process",
                "/proc.json",
                "web"
            ]
        );
    }

    #[test]
    fn checkpoint_and_restore_argv_map_every_flag() {
        let all = CriuOptions {
            leave_running: true,
            tcp_established: true,
            external_unix_sockets: true,
            shell_job: true,
        };
        let checkpoint = Operation::Checkpoint {
            id: "a",
            image: Path::new("/b/checkpoints/c1"),
            work: Path::new("/w"),
            options: all,
        };
        assert_eq!(
            args(checkpoint),
            [
                "checkpoint",
                "--image-path",
                "/b/checkpoints/c1",
                "--work-path",
                "/w",
                "--leave-running",
                "--tcp-established",
                "--ext-unix-sk",
                "--shell-job",
                "a"
            ]
        );
        let exiting = Operation::Checkpoint {
            id: "a",
            image: Path::new("/i"),
            work: Path::new("/w"),
            options: CriuOptions::default(),
        };
        assert_eq!(
            args(exiting),
            ["checkpoint", "--image-path", "/i", "--work-path", "/w", "a"]
        );
        let restore = Operation::Restore {
            id: "a",
            bundle: Path::new("/b"),
            image: Path::new("/i"),
            work: Path::new("/w"),
            pid_file: Path::new("/p"),
            console_socket: None,
            options: CriuOptions {
                shell_job: true,
                ..CriuOptions::default()
            },
        };
        assert_eq!(
            args(restore),
            [
                "restore",
                "--detach",
                "--bundle",
                "/b",
                "--image-path",
                "/i",
                "--work-path",
                "/w",
                "--pid-file",
                "/p",
                "--shell-job",
                "a"
            ]
        );
    }

    #[test]
    fn other_operations_argv() {
        assert_eq!(
            args(Operation::Delete { id: "a" }),
            ["delete", "--force", "a"]
        );
        assert_eq!(args(Operation::Pause { id: "a" }), ["pause", "a"]);
        assert_eq!(args(Operation::Resume { id: "a" }), ["resume", "a"]);
        assert_eq!(args(Operation::List), ["list", "--format", "json"]);
    }

    #[test]
    fn failure_message_prefers_the_log_then_stderr_then_status() {
        let log = concat!(
            r#"{"level":"warning","msg":"ignored","time":"t"}"#,
            "\n",
            r#"{"level":"error","msg":"runc create failed: exec: \"/nope\": no such file or directory","time":"t"}"#,
            "\n"
        );
        assert!(failure_message(log, "x", Some(1)).contains("/nope"));
        assert_eq!(
            failure_message("", "first\nlast line\n\n", Some(1)),
            "last line"
        );
        assert_eq!(
            failure_message("", "", Some(2)),
            "exited with status 2 and no message"
        );
    }

    /// A spawner that records argv and answers with a fixed outcome.
    struct StubSpawner {
        outcome: Outcome,
        stderr: String,
        seen: Mutex<Vec<Vec<String>>>,
    }

    impl Spawner for StubSpawner {
        fn spawn(
            &self,
            argv: Vec<String>,
            _stdio: [SpawnStdio; 3],
            _timeout: Duration,
        ) -> BoxFuture<'_, Result<Completion>> {
            self.seen.lock().unwrap().push(argv);
            let completion = Completion {
                pid: 42,
                outcome: self.outcome.clone(),
                stdout: "{\"status\":\"running\"}".into(),
                stderr: self.stderr.clone(),
            };
            Box::pin(async move { Ok(completion) })
        }
    }

    fn runtime_with(outcome: Outcome, stderr: &str) -> (Runtime, Arc<StubSpawner>) {
        let stub = Arc::new(StubSpawner {
            outcome,
            stderr: stderr.into(),
            seen: Mutex::new(Vec::new()),
        });
        let runtime = Runtime::new(
            binary(),
            stub.clone(),
            Duration::from_secs(3),
            std::env::temp_dir(),
        );
        (runtime, stub)
    }

    #[tokio::test]
    async fn success_returns_stdout() {
        let (runtime, stub) = runtime_with(Outcome::Exited { code: Some(0) }, "");
        let out = runtime.run(Operation::List).await.unwrap();
        assert_eq!(out, "{\"status\":\"running\"}");
        assert_eq!(stub.seen.lock().unwrap()[0][7], "list");
    }

    #[tokio::test]
    async fn failures_carry_the_runtime_message() {
        let (runtime, _) = runtime_with(
            Outcome::Exited { code: Some(1) },
            "container \"a\" does not exist\n",
        );
        let err = runtime.run(Operation::Pause { id: "a" }).await.unwrap_err();
        assert_eq!(
            err.to_string(),
            "runc pause failed: container \"a\" does not exist"
        );
        assert_eq!(
            tonic::Status::from(err).code(),
            tonic::Code::FailedPrecondition
        );
    }

    #[tokio::test]
    async fn timeouts_and_spawn_failures_map_to_their_errors() {
        let (runtime, _) = runtime_with(Outcome::TimedOut, "");
        let err = runtime.run(Operation::Start { id: "a" }).await.unwrap_err();
        assert_eq!(
            tonic::Status::from(err).code(),
            tonic::Code::DeadlineExceeded
        );
        let (runtime, _) = runtime_with(
            Outcome::SpawnFailed {
                error: "/usr/bin/runc: No such file or directory".into(),
            },
            "",
        );
        let err = runtime.run(Operation::Start { id: "a" }).await.unwrap_err();
        assert!(err.to_string().contains("No such file"), "{err}");
    }
}
