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

/// A spawner that records argv and options, writes `log` to the command's log file, and
/// answers with a fixed outcome.
struct StubSpawner {
    outcome: Outcome,
    stderr: String,
    log: String,
    seen: Mutex<Vec<Vec<String>>>,
    options: Mutex<Vec<SpawnOptions>>,
    /// The log directory of a runtime made by [`runtime_with`], removed with the stub.
    own_log_dir: Option<tempfile::TempDir>,
}

impl Spawner for StubSpawner {
    fn spawn(
        &self,
        argv: Vec<String>,
        _stdio: [SpawnStdio; 3],
        options: SpawnOptions,
    ) -> BoxFuture<'_, Result<Completion>> {
        if let Some(log) = &options.log {
            std::fs::write(log, &self.log).unwrap();
        }
        self.seen.lock().unwrap().push(argv);
        self.options.lock().unwrap().push(options);
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
    let logs = tempfile::tempdir().unwrap();
    let stub = stub_spawner(outcome, stderr, "", Some(logs));
    let log_dir = stub.own_log_dir.as_ref().unwrap().path().to_owned();
    (runtime_on(stub.clone(), log_dir), stub)
}

/// A runtime whose stub spawner writes `log` to each command's log file under `log_dir`.
fn runtime_logging(
    outcome: Outcome,
    stderr: &str,
    log: &str,
    log_dir: PathBuf,
) -> (Runtime, Arc<StubSpawner>) {
    let stub = stub_spawner(outcome, stderr, log, None);
    (runtime_on(stub.clone(), log_dir), stub)
}

fn stub_spawner(
    outcome: Outcome,
    stderr: &str,
    log: &str,
    own_log_dir: Option<tempfile::TempDir>,
) -> Arc<StubSpawner> {
    Arc::new(StubSpawner {
        outcome,
        stderr: stderr.into(),
        log: log.into(),
        seen: Mutex::new(Vec::new()),
        options: Mutex::new(Vec::new()),
        own_log_dir,
    })
}

fn runtime_on(stub: Arc<StubSpawner>, log_dir: PathBuf) -> Runtime {
    Runtime::new(binary(), stub, Duration::from_secs(3), log_dir)
}

#[tokio::test]
async fn success_returns_stdout() {
    let (runtime, stub) = runtime_with(Outcome::Exited { code: Some(0) }, "");
    let out = runtime.run(Operation::List, Asker::Berthd).await.unwrap();
    assert_eq!(out, "{\"status\":\"running\"}");
    assert_eq!(stub.seen.lock().unwrap()[0][7], "list");
}

#[tokio::test]
async fn a_log_goes_to_the_next_command_once_emptied_by_the_spawner_or_read_and_emptied() {
    let logs = tempfile::tempdir().unwrap();
    let exited = |code| Outcome::Exited { code: Some(code) };
    let (runtime, stub) = runtime_logging(exited(0), "", "", logs.path().to_owned());
    runtime.run(Operation::List, Asker::Berthd).await.unwrap();
    runtime.run(Operation::List, Asker::Berthd).await.unwrap();
    let named: Vec<_> = stub
        .options
        .lock()
        .unwrap()
        .iter()
        .map(|o| o.log.clone().unwrap())
        .collect();
    assert!(named[0].starts_with(logs.path()), "{named:?}");
    assert_eq!(named[0], named[1], "a success's log is the next command's");

    let line = r#"{"level":"error","msg":"container \"a\" does not exist","time":"t"}"#;
    let (runtime, stub) = runtime_logging(exited(1), "", line, logs.path().to_owned());
    for _ in 0..2 {
        let err = runtime
            .run(Operation::Pause { id: "a" }, Asker::Berthd)
            .await
            .unwrap_err();
        assert_eq!(
            err.to_string(),
            "runc pause failed: container \"a\" does not exist"
        );
    }
    let named: Vec<_> = stub
        .options
        .lock()
        .unwrap()
        .iter()
        .map(|o| o.log.clone().unwrap())
        .collect();
    assert_eq!(
        named[0], named[1],
        "a failure's log, once read, is the next command's"
    );
    assert_eq!(
        std::fs::metadata(&named[0]).unwrap().len(),
        0,
        "read and emptied"
    );
}

#[tokio::test]
async fn failures_carry_the_runtime_message() {
    let (runtime, _) = runtime_with(
        Outcome::Exited { code: Some(1) },
        "container \"a\" does not exist\n",
    );
    let err = runtime
        .run(Operation::Pause { id: "a" }, Asker::Berthd)
        .await
        .unwrap_err();
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
async fn a_runtime_message_quoting_a_huge_argument_is_bounded() {
    let huge = "x".repeat(3 << 20);
    let line = format!("exec: \"{huge}\": executable file not found in $PATH\n");
    let (runtime, _) = runtime_with(Outcome::Exited { code: Some(1) }, &line);
    let err = runtime
        .run(Operation::Pause { id: "a" }, Asker::Berthd)
        .await
        .unwrap_err();
    let message = tonic::Status::from(err).message().to_owned();
    assert!(message.len() < 1024, "{} bytes", message.len());
    assert!(
        message.starts_with("runc pause failed: exec: \"xx"),
        "{message}"
    );
    assert!(
        message.ends_with("\": executable file not found in $PATH"),
        "{message}"
    );
}

#[tokio::test]
async fn timeouts_and_spawn_failures_map_to_their_errors() {
    let (runtime, _) = runtime_with(Outcome::TimedOut, "");
    let err = runtime
        .run(Operation::Start { id: "a" }, Asker::Berthd)
        .await
        .unwrap_err();
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
    let err = runtime
        .run(Operation::Start { id: "a" }, Asker::Berthd)
        .await
        .unwrap_err();
    assert!(err.to_string().contains("No such file"), "{err}");
    assert_eq!(tonic::Status::from(err).code(), tonic::Code::Internal);
}

#[test]
fn run_argv_detaches_and_names_the_pid_file_and_console() {
    let run = Operation::Run {
        id: "web",
        bundle: Path::new("/b"),
        pid_file: Path::new("/p"),
        console_socket: None,
    };
    assert_eq!(
        args(run),
        [
            "run",
            "--detach",
            "--bundle",
            "/b",
            "--pid-file",
            "/p",
            "web"
        ]
    );
    let with_console = Operation::Run {
        id: "web",
        bundle: Path::new("/b"),
        pid_file: Path::new("/p"),
        console_socket: Some(Path::new("/c.sock")),
    };
    assert_eq!(
        args(with_console),
        [
            "run",
            "--detach",
            "--bundle",
            "/b",
            "--pid-file",
            "/p",
            "--console-socket",
            "/c.sock",
            "web"
        ]
    );
}

#[tokio::test]
async fn a_recorded_cgroup_comes_from_the_runtime_state_file() {
    let root = tempfile::tempdir().unwrap();
    let (runtime, _) = runtime_with(Outcome::Exited { code: Some(0) }, "");
    let runtime = Runtime {
        binary: RuntimeBinary {
            root: root.path().to_owned(),
            ..binary()
        },
        ..runtime
    };
    std::fs::create_dir(root.path().join("a")).unwrap();
    std::fs::write(
        root.path().join("a/state.json"),
        r#"{"id":"a","cgroup_paths":{"memory":"/sys/fs/cgroup/memory/a","":"/sys/fs/cgroup/unified/a"}}"#,
    )
    .unwrap();
    let Ok(RecordedCgroup::Dirs(mut dirs)) = runtime.recorded_cgroup("a").await else {
        panic!("runc's state.json gives a directory per controller");
    };
    dirs.sort();
    assert_eq!(
        dirs,
        [
            ("".to_owned(), PathBuf::from("/sys/fs/cgroup/unified/a")),
            (
                "memory".to_owned(),
                PathBuf::from("/sys/fs/cgroup/memory/a")
            ),
        ]
    );
    std::fs::create_dir(root.path().join("b")).unwrap();
    std::fs::write(root.path().join("b/state.json"), r#"{"id":"b"}"#).unwrap();
    let err = runtime.recorded_cgroup("b").await.unwrap_err();
    assert!(err.to_string().contains("no cgroup paths"), "{err}");
    assert!(runtime.recorded_cgroup("missing").await.is_err());

    let builtin = Runtime {
        binary: RuntimeBinary {
            path: PathBuf::from(crate::runtime::builtin::BUILTIN),
            ..runtime.binary.clone()
        },
        ..runtime
    };
    std::fs::write(
        root.path().join("a/youki_config.json"),
        r#"{"hooks":null,"cgroup_path":"/berthd/a"}"#,
    )
    .unwrap();
    assert_eq!(
        builtin.recorded_cgroup("a").await.unwrap(),
        RecordedCgroup::Path(PathBuf::from("/berthd/a"))
    );
    assert!(builtin.recorded_cgroup("b").await.is_err());
}

#[test]
fn only_unlisted_directories_without_state_are_removed_and_never_what_is_mounted_in_them() {
    if !rustix::process::geteuid().is_root() {
        eprintln!("skipped: bind-mounting a rootfs as runc's restore does needs root");
        return;
    }
    let top = tempfile::tempdir().unwrap();
    let root = top.path().join("runtime");
    let rootfs = top.path().join("rootfs");
    std::fs::create_dir_all(rootfs.join("etc")).unwrap();
    std::fs::write(rootfs.join("etc/hostname"), "client's").unwrap();
    // A restore cut off half-way: its directory, a file and the rootfs bind-mounted.
    let cut_off = root.join("cut-off");
    std::fs::create_dir_all(cut_off.join("criu-root")).unwrap();
    std::fs::write(cut_off.join("exec.fifo"), "").unwrap();
    rustix::mount::mount_bind(&rootfs, cut_off.join("criu-root")).unwrap();
    // A container the runtime records, one it lists, and a file that is no container.
    for kept in ["recorded", "listed"] {
        std::fs::create_dir_all(root.join(kept)).unwrap();
    }
    std::fs::write(root.join("recorded/state.json"), "{}").unwrap();
    // crun's record.
    std::fs::create_dir_all(root.join("crun-recorded")).unwrap();
    std::fs::write(root.join("crun-recorded/status"), "").unwrap();
    std::fs::write(root.join("stray"), "").unwrap();
    // What a create still at work has made: too new to tell from one cut off.
    std::fs::create_dir_all(root.join("young")).unwrap();
    std::fs::write(root.join("young/exec.fifo"), "").unwrap();
    let hour_ago = std::time::SystemTime::now() - std::time::Duration::from_secs(3600);
    for old in ["cut-off", "recorded", "listed", "crun-recorded"] {
        let dir = std::fs::File::open(root.join(old)).unwrap();
        dir.set_modified(hour_ago).unwrap();
    }
    let binary = RuntimeBinary {
        root: root.clone(),
        ..binary()
    };
    // Specs for the runtime: of the cut-off create, of one cut off before the runtime made its
    // directory (however new), and of a listed container.
    for id in ["cut-off", "before-the-runtime", "listed"] {
        binary
            .write_config(id, b"{}", Path::new("/bundle"), &[])
            .unwrap();
    }

    let mut found =
        binary.remove_stateless_dirs(|id| id == "listed", std::time::Duration::from_secs(60));
    found.recorded.sort();
    let mounted = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
    let still_mounted = mounted.contains(&*cut_off.to_string_lossy());
    if still_mounted {
        let _ = rustix::mount::unmount(
            cut_off.join("criu-root"),
            rustix::mount::UnmountFlags::DETACH,
        );
    }
    assert_eq!(
        found,
        StatelessDirs {
            removed: vec!["cut-off".to_owned(), "before-the-runtime".to_owned()],
            young: vec!["young".to_owned()],
            left: Vec::new(),
            recorded: vec!["crun-recorded".to_owned(), "recorded".to_owned()],
        }
    );
    assert!(!binary.config_dir("cut-off").exists());
    assert!(binary.config_dir("listed").join("config.json").exists());
    assert!(!still_mounted, "the rootfs is still mounted");
    assert!(!cut_off.exists());
    assert_eq!(
        std::fs::read_to_string(rootfs.join("etc/hostname")).unwrap(),
        "client's"
    );
    for kept in [
        "recorded/state.json",
        "crun-recorded/status",
        "listed",
        "stray",
        "young/exec.fifo",
    ] {
        assert!(root.join(kept).exists(), "{kept} was removed");
    }
}
