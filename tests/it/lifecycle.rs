//! Container lifecycle through a real berthd and runc: create, state, stdio, terminal, pause and
//! resume, exit, id reuse, shutdown, and berthd's own resources over many cycles.

use std::fs;
use std::io::Write;
use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use crate::common::*;
use berth_api::proto::UpdateContainerRequest;
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;

/// Every string and number in a JSON document, as text.
fn json_leaves(value: &serde_json::Value) -> Vec<String> {
    match value {
        serde_json::Value::String(s) => vec![s.clone()],
        serde_json::Value::Number(n) => vec![n.to_string()],
        serde_json::Value::Array(items) => items.iter().flat_map(json_leaves).collect(),
        serde_json::Value::Object(map) => map.values().flat_map(json_leaves).collect(),
        _ => Vec::new(),
    }
}

/// Writes, in `dir`, a python script that runs `setup` (with `os`, `signal` and `sys` imported)
/// and then execs berthd with its own arguments: a parent leaving berthd some state.
fn python_wrapper(dir: &std::path::Path, setup: &str) -> std::path::PathBuf {
    let wrapper = dir.join("berthd");
    let berthd = env!("CARGO_BIN_EXE_berthd");
    let script = format!(
        "#!/usr/bin/env python3\n\
         import os, signal, sys\n\
         {setup}\
         os.execv({berthd:?}, [{berthd:?}] + sys.argv[1:])\n"
    );
    fs::write(&wrapper, script).expect("write the wrapper");
    fs::set_permissions(&wrapper, fs::Permissions::from_mode(0o755)).expect("chmod");
    wrapper
}

#[tokio::test(flavor = "multi_thread")]
async fn create_runs_init_as_child_of_berthd_and_state_reports_it() {
    within(async {
        let mut d = daemon!();
        let mut events = d.events().await;
        let Container { id, pid, bundle } = d.run("create-state", &["sleep", "1000"]).await;

        let stat = proc_stat(pid).expect("init is alive");
        assert_eq!(
            stat.ppid,
            d.pid(),
            "the init is reparented to berthd (subreaper)"
        );
        assert_eq!(d.runtime_ids(), vec![id.clone()]);
        let file = fs::read_to_string(d.state_file(&id)).expect("state file exists");
        let saved: serde_json::Value = serde_json::from_str(&file).expect("state file is JSON");
        let values = json_leaves(&saved);
        for wanted in [id.clone(), bundle.path_str(), pid.to_string()] {
            assert!(
                values.contains(&wanted),
                "state file lacks {wanted}: {saved}"
            );
        }

        let started = events.started(&id).await;
        assert_eq!(started.r#type, "start-container");
        assert_eq!(started.pid, pid);
        assert_eq!(started.bundle_path, bundle.path_str());

        let st = d.state().await;
        let c = st.containers.iter().find(|c| c.id == id).expect("listed");
        assert_eq!(c.bundle_path, bundle.path_str());
        assert_eq!(c.status, "running");
        let init = c.processes.first().expect("init listed");
        let spec = bundle.config();
        assert_eq!(init.pid, pid);
        assert_eq!(init.args, ["sleep", "1000"]);
        assert_eq!(
            init.env,
            spec["process"]["env"].as_array().unwrap().as_slice()
        );
        assert_eq!(init.cwd, "/");
        assert!(!init.terminal);
        let user = init.user.as_ref().expect("init user");
        assert_eq!((user.uid, user.gid), (0, 0));

        d.signal(&id, pid, SIGKILL).await;
        assert_eq!(events.exit_status(&id, pid).await, 137);
        d.assert_gone(&id).await;
        assert!(proc_stat(pid).is_none(), "the init was reaped");
        d.assert_no_zombies().await;
    })
    .await
}

#[tokio::test(flavor = "multi_thread")]
async fn init_that_exits_at_once_reports_its_real_status() {
    within(async {
        let mut d = daemon!();
        let bundle = Bundle::new(&["sh", "-c", "exit 7"]);
        // Repeated because the race between exit and registration does not show every time.
        each_exits_with(&mut d, "exit7", &bundle, 7, 5).await;
    })
    .await
}

#[tokio::test(flavor = "multi_thread")]
async fn a_berthd_whose_parent_ignored_sigchld_and_blocked_signals_runs_and_stops() {
    within(async {
        // Both pass through exec: a supervisor written carelessly, or a shell, may leave them.
        let dir = tempfile::tempdir().expect("temp dir");
        let wrapper = python_wrapper(
            dir.path(),
            "signal.signal(signal.SIGCHLD, signal.SIG_IGN)\n\
             signal.pthread_sigmask(signal.SIG_BLOCK, signal.valid_signals())\n",
        );
        let options = Options {
            binary: Some(&wrapper),
            ..Options::default()
        };
        let mut d = daemon!(options);
        let bundle = Bundle::new(&["sh", "-c", "exit 7"]);
        each_exits_with(&mut d, "parent-signals", &bundle, 7, 3).await;
        assert!(d.stop().success(), "berthd stops on SIGTERM");
    })
    .await
}

#[tokio::test(flavor = "multi_thread")]
async fn a_berthd_started_under_umask_000_makes_nothing_other_users_can_write() {
    within(async {
        let dir = tempfile::tempdir().expect("temp dir");
        let wrapper = python_wrapper(dir.path(), "os.umask(0)\n");
        // Directories berthd has to make on the way to its socket, as on a fresh host's /run.
        let options = Options {
            binary: Some(&wrapper),
            socket: Some("run/berth/api/berth.sock"),
            ..Options::default()
        };
        let mut d = daemon!(options);
        let mut events = d.events().await;
        let Container { id, pid, .. } = d.run("umask", &["sleep", "1000"]).await;
        let writable = writable_by_others(d.dir());
        assert!(writable.is_empty(), "other users may write {writable:?}");
        d.signal(&id, pid, SIGKILL).await;
        assert_eq!(events.exit_status(&id, pid).await, 137);
        d.assert_gone(&id).await;
    })
    .await
}

#[tokio::test(flavor = "multi_thread")]
async fn a_descriptor_berthds_parent_left_open_is_held_by_neither_berthd_nor_its_helper() {
    within(async {
        let dir = tempfile::tempdir().expect("temp dir");
        let left_open = dir.path().join("left-open");
        // As a shell's `exec 7>file` or a supervisor's pipe would leave it.
        let wrapper = python_wrapper(
            dir.path(),
            &format!(
                "fd = os.open({left_open:?}, os.O_WRONLY | os.O_CREAT, 0o600)\n\
                 os.set_inheritable(fd, True)\n"
            ),
        );
        let options = Options {
            binary: Some(&wrapper),
            ..Options::default()
        };
        let mut d = daemon!(options);
        let mut events = d.events().await;
        let Container { id, pid, .. } = d.run("left-open", &["sleep", "1000"]).await;
        let helpers: Vec<u32> = children_of(d.pid())
            .into_iter()
            .filter(|&child| is_spawn_helper(child))
            .collect();
        assert_eq!(helpers.len(), 1, "berthd has one spawn helper");
        for holder in [d.pid(), helpers[0]] {
            let fds = fs::read_dir(format!("/proc/{holder}/fd")).expect("fds");
            for fd in fds {
                let target = fs::read_link(fd.expect("fd").path()).unwrap_or_default();
                assert_ne!(
                    target, left_open,
                    "{holder} holds the fd its parent left open"
                );
            }
        }
        d.signal(&id, pid, SIGKILL).await;
        assert_eq!(events.exit_status(&id, pid).await, 137);
        d.assert_gone(&id).await;
    })
    .await
}

/// Every file and directory under `dir` that users other than its owner and group may write,
/// symbolic links aside (their mode means nothing).
fn writable_by_others(dir: &Path) -> Vec<String> {
    let mut found = Vec::new();
    for entry in fs::read_dir(dir).expect("read dir") {
        let path = entry.expect("dir entry").path();
        let Ok(meta) = fs::symlink_metadata(&path) else {
            continue;
        };
        if meta.file_type().is_symlink() {
            continue;
        }
        if meta.permissions().mode() & 0o002 != 0 {
            found.push(format!(
                "{} ({:o})",
                path.display(),
                meta.permissions().mode() & 0o7777
            ));
        }
        if meta.is_dir() {
            found.extend(writable_by_others(&path));
        }
    }
    found
}

#[tokio::test(flavor = "multi_thread")]
async fn id_is_free_again_as_soon_as_the_exit_event_arrives() {
    within(async {
        let mut d = daemon!();
        let id = id("reuse");
        let bundle = Bundle::new(&["sh", "-c", "exit 3"]);
        let mut events = d.events().await;
        for round in 0..3 {
            let pid = d.create(create_req(&id, &bundle)).await;
            assert_eq!(events.exit_status(&id, pid).await, 3, "round {round}");
            // Gone from State with the event; the runtime's delete follows, and the next
            // create of the id waits for it.
            d.assert_gone(&id).await;
        }
        let bundle = Bundle::new(&["sleep", "1000"]);
        let pid = d.create(create_req(&id, &bundle)).await;
        d.signal(&id, pid, SIGKILL).await;
        assert_eq!(events.exit_status(&id, pid).await, 137);
        d.assert_no_zombies().await;
    })
    .await
}

/// The freezer state of the cgroup `pid` is in (v1 `freezer.state`, v2 `cgroup.freeze`).
pub fn freezer_state(pid: u32) -> String {
    let dirs = cgroups_of(pid);
    for dir in &dirs {
        if let Ok(state) = fs::read_to_string(dir.join("freezer.state")) {
            return state.trim().to_owned();
        }
    }
    for dir in &dirs {
        if let Ok(frozen) = fs::read_to_string(dir.join("cgroup.freeze")) {
            return if frozen.trim() == "1" {
                "FROZEN"
            } else {
                "THAWED"
            }
            .into();
        }
    }
    panic!("no freezer cgroup for {pid} among {dirs:?}")
}

pub fn update(id: &str, status: &str, signal: u32) -> UpdateContainerRequest {
    UpdateContainerRequest {
        id: id.to_owned(),
        signal,
        status: status.to_owned(),
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn update_pauses_resumes_and_signals() {
    within(async {
        let mut d = daemon!();
        let mut events = d.events().await;
        let ctr = d.run("pause", &["sleep", "1000"]).await;
        let status_of = |st: berth_api::proto::StateResponse| {
            st.containers
                .into_iter()
                .find(|c| c.id == ctr.id)
                .expect("listed")
                .status
        };

        d.client
            .update_container(update(&ctr.id, "paused", 0))
            .await
            .expect("pause");
        assert_eq!(freezer_state(ctr.pid), "FROZEN");
        assert_eq!(status_of(d.state().await), "paused");
        let paused = events
            .wait_for("pause", |e| e.id == ctr.id && e.r#type != "start-container")
            .await;
        assert_eq!(paused.r#type, "pause");

        d.client
            .update_container(update(&ctr.id, "running", 0))
            .await
            .expect("resume");
        assert_eq!(freezer_state(ctr.pid), "THAWED");
        assert_eq!(status_of(d.state().await), "running");
        assert_eq!(events.next().await.r#type, "resume");

        d.client
            .update_container(update(&ctr.id, "", SIGKILL))
            .await
            .expect("signal");
        assert_eq!(events.exit_status(&ctr.id, ctr.pid).await, 137);
        d.assert_gone(&ctr.id).await;
        d.assert_no_zombies().await;
    })
    .await
}

#[tokio::test(flavor = "multi_thread")]
async fn state_reports_the_machine() {
    within(async {
        let mut d = daemon!();
        let machine = d.state().await.machine.expect("machine");
        let host = nix::unistd::gethostname().expect("hostname");
        assert_eq!(machine.id, host.to_string_lossy());
        assert!(machine.cpus >= 1);
        let meminfo = fs::read_to_string("/proc/meminfo").expect("meminfo");
        let total_kib: u64 = meminfo
            .lines()
            .find_map(|l| l.strip_prefix("MemTotal:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
            .expect("MemTotal");
        let total = total_kib * 1024;
        assert!(
            machine.memory.abs_diff(total) <= total / 100,
            "memory {} bytes, MemTotal {total} bytes",
            machine.memory
        );
        d.assert_no_zombies().await;
    })
    .await
}

#[tokio::test(flavor = "multi_thread")]
async fn machine_id_comes_from_the_id_flag() {
    within(async {
        let mut d = daemon!(Options::args(&["--id", "berth-test-machine"]));
        let machine = d.state().await.machine.expect("machine");
        assert_eq!(machine.id, "berth-test-machine");
        d.assert_no_zombies().await;
    })
    .await
}

#[tokio::test(flavor = "multi_thread")]
async fn stdout_and_stderr_fifos_carry_the_init_output() {
    within(async {
        let mut d = daemon!();
        let id = id("stdio");
        let bundle = Bundle::new(&["sh", "-c", "echo out; echo err >&2"]);
        let (out, err) = (d.dir().join("out"), d.dir().join("err"));
        mkfifo(&out);
        mkfifo(&err);
        let mut out_reader = Reader::open(&out);
        let mut err_reader = Reader::open(&err);
        let mut events = d.events().await;
        let mut req = create_req(&id, &bundle);
        req.stdout = path_str(&out);
        req.stderr = path_str(&err);
        let pid = d.create(req).await;

        assert_eq!(out_reader.read_to_end().await, "out\n");
        assert_eq!(err_reader.read_to_end().await, "err\n");
        assert_eq!(events.exit_status(&id, pid).await, 0);
        d.assert_gone(&id).await;
        d.assert_no_zombies().await;
    })
    .await
}

#[tokio::test(flavor = "multi_thread")]
async fn stdin_fifo_feeds_the_init() {
    within(async {
        let mut d = daemon!();
        let id = id("stdin");
        let bundle = Bundle::new(&["cat"]);
        let (input, output) = (d.dir().join("in"), d.dir().join("out"));
        mkfifo(&input);
        mkfifo(&output);
        // Held open across the create so `cat` cannot see end-of-file before our data.
        let mut writer = open_rw(&input);
        let mut reader = Reader::open(&output);
        let mut events = d.events().await;
        let mut req = create_req(&id, &bundle);
        req.stdin = path_str(&input);
        req.stdout = path_str(&output);
        let pid = d.create(req).await;

        std::io::Write::write_all(&mut writer, b"ping\n").expect("write stdin");
        assert_eq!(reader.read_until("ping\n").await, "ping\n");
        // Closing the last writer must reach `cat` as end-of-file: berthd keeps no copy open.
        drop(writer);
        assert_eq!(reader.read_to_end().await, "ping\n");
        assert_eq!(events.exit_status(&id, pid).await, 0);
        d.assert_no_zombies().await;
    })
    .await
}

#[tokio::test(flavor = "multi_thread")]
async fn terminal_output_is_relayed_to_the_stdout_fifo() {
    within(async {
        let mut d = daemon!();
        let id = id("tty");
        let bundle = Bundle::new(&["sh", "-c", "echo hi; [ -t 1 ] && echo is-a-tty"]);
        bundle.edit(|c| c["process"]["terminal"] = true.into());
        let out = d.dir().join("out");
        mkfifo(&out);
        let mut reader = Reader::open(&out);
        let mut events = d.events().await;
        let mut req = create_req(&id, &bundle);
        req.stdout = path_str(&out);
        let pid = d.create(req).await;

        let text = reader.read_until("is-a-tty").await;
        assert!(text.contains("hi\r\n"), "pty output: {text:?}");
        assert!(text.contains("is-a-tty"), "pty output: {text:?}");
        assert_eq!(events.exit_status(&id, pid).await, 0);
        let st = d.state().await;
        assert!(st.containers.iter().all(|c| c.id != id));
        d.assert_no_zombies().await;
    })
    .await
}

#[tokio::test(flavor = "multi_thread")]
async fn regular_file_stdout_is_not_truncated() {
    within(async {
        let mut d = daemon!();
        let id = id("file-stdout");
        let bundle = Bundle::new(&["echo", "new"]);
        let out = d.dir().join("out.txt");
        fs::write(&out, "previous content\n").expect("write file");
        let mut events = d.events().await;
        let mut req = create_req(&id, &bundle);
        req.stdout = path_str(&out);
        let pid = d.create(req).await;
        assert_eq!(events.exit_status(&id, pid).await, 0);

        let text = fs::read_to_string(&out).expect("read file");
        assert!(text.contains("new\n"), "file: {text:?}");
        assert!(
            text.len() >= "previous content\n".len(),
            "file was truncated: {text:?}"
        );
        d.assert_no_zombies().await;
    })
    .await
}

/// berthd stops cleanly on `signal`: exit status 0, its sockets removed (the API's and the
/// metrics endpoint's), containers still running.
async fn stopping_leaves_containers_running(signal: Signal) {
    let metrics_dir = tempfile::tempdir().expect("tempdir");
    let metrics = metrics_dir.path().join("metrics.sock");
    let mut d = daemon!(Options::args(&["--metrics-listen", &path_str(&metrics)]));
    let c = d.run(&numbered("survive"), &["sleep", "1000"]).await;
    assert!(metrics.exists(), "no metrics socket");

    let status = d.stop_with(signal);
    assert!(
        status.success(),
        "berthd exit status after {signal}: {status}"
    );
    assert!(!d.socket().exists(), "socket left behind");
    assert!(!metrics.exists(), "metrics socket left behind");
    let init = proc_stat(c.pid).expect("the container outlives berthd");
    assert_ne!(init.state, 'Z');
    assert_eq!(d.runtime_ids(), vec![c.id]);
}

#[tokio::test(flavor = "multi_thread")]
async fn sigterm_removes_the_socket_and_leaves_containers_running() {
    within(stopping_leaves_containers_running(Signal::SIGTERM)).await
}

/// README: "SIGTERM or SIGINT stops berthd cleanly: the socket is removed, containers keep
/// running."
#[tokio::test(flavor = "multi_thread")]
async fn sigint_removes_the_socket_and_leaves_containers_running() {
    within(stopping_leaves_containers_running(Signal::SIGINT)).await
}

/// README: "SIGTERM or SIGINT stops berthd cleanly: the socket is removed". A script that waits
/// for the socket to appear and then stops berthd must be able to rely on that.
#[tokio::test(flavor = "multi_thread")]
async fn sigterm_once_the_socket_exists_stops_berthd_cleanly() {
    within(async {
        if !ready() {
            return;
        }
        for round in 0..20 {
            let dir = tempfile::TempDir::new().expect("temp dir");
            let socket = dir.path().join("s.sock");
            let mut child = Command::new(env!("CARGO_BIN_EXE_berthd"))
                .arg("--listen")
                .arg(&socket)
                .arg("--state-dir")
                .arg(dir.path().join("state"))
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .expect("spawn berthd");
            // The socket is there, as a script waiting for berthd would check.
            let deadline = Instant::now() + Duration::from_secs(10);
            while !socket.exists() {
                assert!(Instant::now() < deadline, "berthd never made its socket");
                std::thread::sleep(Duration::from_millis(1));
            }
            let pid = child.id();
            let handled = catches(pid, libc::SIGTERM) && catches(pid, libc::SIGINT);
            let _ = kill(Pid::from_raw(pid as i32), Signal::SIGTERM);
            let status = child.wait().expect("wait berthd");
            assert!(
                handled && status.success() && !socket.exists(),
                "round {round}: socket there, SIGTERM/SIGINT handled: {handled}; after SIGTERM: \
                 {status}, socket left: {}",
                socket.exists()
            );
        }
    })
    .await
}

/// Runs a berthd expected to refuse to start: returns whether it exited successfully and what
/// it printed, killing it if it serves instead.
fn refused_berthd(socket: &Path, state_dir: &Path, extra: &[&str]) -> (bool, String) {
    let mut child = Command::new(env!("CARGO_BIN_EXE_berthd"))
        .arg("--listen")
        .arg(socket)
        .arg("--state-dir")
        .arg(state_dir)
        .args(extra)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn berthd");
    let deadline = Instant::now() + Duration::from_secs(10);
    while Instant::now() < deadline {
        if child.try_wait().expect("try_wait").is_some() {
            let out = child.wait_with_output().expect("output");
            let text = String::from_utf8_lossy(&out.stderr).into_owned()
                + &String::from_utf8_lossy(&out.stdout);
            return (out.status.success(), text);
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let _ = child.kill();
    let _ = child.wait();
    panic!("berthd kept running for 10 s instead of refusing to start");
}

#[tokio::test(flavor = "multi_thread")]
async fn second_berthd_on_the_same_socket_or_state_dir_refuses() {
    within(async {
        let mut d = daemon!();
        let (ok, text) = refused_berthd(&d.socket(), &d.dir().join("other-state"), &[]);
        assert!(
            !ok && !text.trim().is_empty(),
            "same socket: ok={ok}, said {text:?}"
        );
        let (ok, text) = refused_berthd(&d.dir().join("other.sock"), &d.state_dir(), &[]);
        assert!(
            !ok && !text.trim().is_empty(),
            "same state dir: ok={ok}, said {text:?}"
        );
        assert!(
            d.socket().exists(),
            "the refused berthd removed the first one's socket"
        );
        // The first daemon still serves on a fresh connection.
        let mut client = d.connect().await;
        state(&mut client).await;
        d.state().await;
        d.assert_no_zombies().await;
    })
    .await
}

/// README: "A second berthd on the same socket or state directory refuses to start and names the
/// pid holding it."
#[tokio::test(flavor = "multi_thread")]
async fn a_refused_second_berthd_names_the_pid_holding_the_socket_or_state_dir() {
    within(async {
        let d = daemon!();
        let holder = d.pid().to_string();
        let (_, text) = refused_berthd(&d.socket(), &d.dir().join("other-state"), &[]);
        assert!(
            text.contains(&holder),
            "same socket, pid {holder} not named: {text:?}"
        );
        let (_, text) = refused_berthd(&d.dir().join("other.sock"), &d.state_dir(), &[]);
        assert!(
            text.contains(&holder),
            "same state dir, pid {holder} not named: {text:?}"
        );
    })
    .await
}

#[tokio::test(flavor = "multi_thread")]
async fn fds_and_children_stay_the_same_across_create_exec_kill_cycles() {
    within(async {
        let mut d = daemon!();
        let bundle = Bundle::new(&["sleep", "1000"]);
        let out = d.dir().join("out.txt");
        fs::write(&out, "").expect("create output file");
        let mut events = d.events().await;
        let mut baseline = None;
        for round in 0..21 {
            let id = id(&format!("fds-{round}"));
            let mut req = create_req(&id, &bundle);
            req.stdout = path_str(&out);
            let init = d.create(req).await;
            let mut req = exec_req(&id, &["/bin/echo", "exec"]);
            req.stdout = path_str(&out);
            let child = d.exec(req).await;
            assert_eq!(events.exit_status(&id, child).await, 0);
            d.kill_container(&mut events, &id, init).await;
            if round == 0 {
                // Measured after a warm-up cycle: lazily opened fds are not leaks.
                d.assert_no_zombies().await;
                baseline = Some(d.baseline());
            }
        }
        d.assert_settles(&baseline.expect("measured in round 0"))
            .await;
        d.assert_no_zombies().await;
        let text = fs::read_to_string(&out).expect("read output");
        assert!(text.contains("exec"), "output file: {text:?}");
    })
    .await
}

#[tokio::test(flavor = "multi_thread")]
async fn a_missing_runtime_stops_berthd_at_start() {
    within(async {
        if !crate::common::ready() {
            return;
        }
        let dir = tempfile::TempDir::new().expect("temp dir");
        let runtime = ["--runtime", "no-such-runtime-berth-test"];
        let (ok, text) =
            refused_berthd(&dir.path().join("s.sock"), &dir.path().join("st"), &runtime);
        assert!(!ok, "berthd started without its runtime");
        assert!(
            text.contains("no-such-runtime-berth-test"),
            "unclear error: {text:?}"
        );
        assert!(!dir.path().join("s.sock").exists(), "socket left behind");
    })
    .await
}

#[tokio::test(flavor = "multi_thread")]
async fn socket_parent_is_created_0711_and_socket_is_0660() {
    within(async {
        let options = Options {
            socket: Some("run/berth/berth.sock"),
            ..Options::default()
        };
        let mut d = daemon!(options);
        let socket = fs::metadata(d.socket()).expect("socket");
        assert!(socket.file_type().is_socket());
        assert_eq!(socket.permissions().mode() & 0o7777, 0o660);
        let parent = fs::metadata(d.socket().parent().unwrap()).expect("parent");
        assert_eq!(parent.permissions().mode() & 0o7777, 0o711);
        d.state().await;
        d.stop();
        assert!(!d.socket().exists(), "socket left behind");
    })
    .await
}

#[tokio::test(flavor = "multi_thread")]
async fn flags_are_read_from_berth_environment_variables() {
    within(async {
        let options = Options {
            env: &[("BERTH_ID", "machine-from-env")],
            ..Options::default()
        };
        let mut d = daemon!(options);
        let machine = d.state().await.machine.expect("machine");
        assert_eq!(machine.id, "machine-from-env");
    })
    .await
}

#[tokio::test(flavor = "multi_thread")]
async fn terminal_output_goes_to_the_console_path_and_input_comes_from_stdin() {
    within(async {
        let mut d = daemon!();
        let id = id("console");
        let bundle = Bundle::new(&[
            "sh",
            "-c",
            "stty -echo; [ -t 1 ] && read line && echo on-the-console-$line",
        ]);
        bundle.edit(|c| c["process"]["terminal"] = true.into());
        let console = d.dir().join("console");
        let stdin = d.dir().join("stdin");
        mkfifo(&console);
        mkfifo(&stdin);
        let mut reader = Reader::open(&console);
        let mut events = d.events().await;
        let mut req = create_req(&id, &bundle);
        req.console = path_str(&console);
        req.stdin = path_str(&stdin);
        let pid = d.create(req).await;
        open_rw(&stdin).write_all(b"typed\n").expect("write stdin");

        // The console is output only: were berthd to read it back, the line it wrote would
        // race the reader here and come back into the terminal as input.
        let text = reader.read_until("on-the-console-typed\r\n").await;
        assert!(
            text.contains("on-the-console-typed\r\n"),
            "console output: {text:?}"
        );
        assert_eq!(events.exit_status(&id, pid).await, 0);
        d.assert_no_zombies().await;
    })
    .await
}

/// Regular files at both ends of a terminal: the relay reads and writes them off the reactor
/// (a file on a slow file system would otherwise hold a worker), and still carries every byte.
#[tokio::test(flavor = "multi_thread")]
async fn a_terminals_input_and_output_may_be_regular_files() {
    within(async {
        let mut d = daemon!();
        let id = id("tty-files");
        let bundle = Bundle::new(&[
            "sh",
            "-c",
            "stty -echo; read first && read second && echo got-$first-$second",
        ]);
        bundle.edit(|c| c["process"]["terminal"] = true.into());
        let stdin = d.dir().join("stdin.txt");
        let stdout = d.dir().join("stdout.log");
        std::fs::write(&stdin, "one\ntwo\n").expect("write stdin");
        std::fs::write(&stdout, "before\n").expect("write stdout");
        let mut events = d.events().await;
        let mut req = create_req(&id, &bundle);
        req.stdin = path_str(&stdin);
        req.stdout = path_str(&stdout);
        let pid = d.create(req).await;
        assert_eq!(events.exit_status(&id, pid).await, 0);
        let deadline = std::time::Instant::now() + SETTLE;
        let text = loop {
            let text = std::fs::read_to_string(&stdout).expect("read stdout");
            if text.contains("got-one-two\r\n") || std::time::Instant::now() > deadline {
                break text;
            }
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        };
        // Appended to, not truncated; the terminal may echo the input before `stty -echo` runs.
        assert!(
            text.starts_with("before\n") && text.ends_with("got-one-two\r\n"),
            "{text:?}"
        );
        d.assert_no_zombies().await;
    })
    .await
}

#[tokio::test(flavor = "multi_thread")]
async fn a_terminal_given_as_the_console_is_the_input_and_the_output() {
    use rustix::pty::{OpenptFlags, grantpt, openpt, ptsname, unlockpt};
    within(async {
        let mut d = daemon!();
        let id = id("pts");
        let bundle = Bundle::new(&["sh", "-c", "stty -echo; read line && echo got-$line"]);
        bundle.edit(|c| c["process"]["terminal"] = true.into());
        // What the original clients of this API did: hold a pty and pass its terminal side.
        let master = openpt(OpenptFlags::RDWR | OpenptFlags::NOCTTY).expect("openpt");
        grantpt(&master).expect("grantpt");
        unlockpt(&master).expect("unlockpt");
        let terminal = ptsname(&master, Vec::new()).expect("ptsname");
        let master = fs::File::from(master);
        let mut events = d.events().await;
        let mut req = create_req(&id, &bundle);
        req.console = terminal.to_str().expect("terminal path").to_owned();
        let pid = d.create(req).await;

        (&master).write_all(b"typed\n").expect("write the terminal");
        let (tx, mut output) = tokio::sync::mpsc::unbounded_channel();
        std::thread::spawn(move || {
            let mut buf = [0; 4096];
            // Ends with EIO once berthd closes the terminal side.
            while let Ok(n @ 1..) = std::io::Read::read(&mut &master, &mut buf) {
                if tx.send(buf[..n].to_vec()).is_err() {
                    break;
                }
            }
        });
        let mut text = String::new();
        while !text.contains("got-typed") {
            let chunk = output
                .recv()
                .await
                .unwrap_or_else(|| panic!("terminal output: {text:?}"));
            text.push_str(&String::from_utf8_lossy(&chunk));
        }
        assert_eq!(events.exit_status(&id, pid).await, 0);
        d.assert_no_zombies().await;
    })
    .await
}

#[tokio::test(flavor = "multi_thread")]
async fn a_killed_spawn_helper_is_replaced() {
    within(async {
        let mut d = daemon!();
        let helper = wait_for_spawn_helper(d.pid(), None).await;
        kill(Pid::from_raw(helper as i32), Signal::SIGKILL).expect("kill the helper");

        // A request racing the restart may fail with Unavailable; soon one must succeed.
        let id = id("new-helper");
        let bundle = Bundle::new(&["sleep", "1000"]);
        let mut events = d.events().await;
        let deadline = Instant::now() + Duration::from_secs(10);
        let pid = loop {
            match d.client.create_container(create_req(&id, &bundle)).await {
                Ok(resp) => break resp.into_inner().pid,
                Err(status) if status.code() == tonic::Code::Unavailable => {
                    assert!(Instant::now() < deadline, "still unavailable: {status:?}");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
                Err(status) => panic!("CreateContainer after the helper died: {status:?}"),
            }
        };
        wait_for_spawn_helper(d.pid(), Some(helper)).await;
        d.signal(&id, pid, SIGKILL).await;
        assert_eq!(events.exit_status(&id, pid).await, 137);
        d.assert_gone(&id).await;
        d.assert_no_zombies().await;
    })
    .await
}

#[tokio::test(flavor = "multi_thread")]
async fn a_container_without_a_cgroups_path_is_in_its_id_beneath_berthds_cgroup() {
    within(async {
        let mut d = daemon!();
        let mut events = d.events().await;
        let ctr = d.run("cgroup-placed", &["sleep", "1000"]).await;
        let own = memory_cgroup_of(d.pid()).expect("berthd's memory cgroup");
        assert_eq!(
            memory_cgroup_of(ctr.pid),
            Some(own.join(&ctr.id)),
            "where runc puts a container without cgroupsPath"
        );
        d.kill_container(&mut events, &ctr.id, ctr.pid).await;
        d.assert_gone(&ctr.id).await;
    })
    .await;
}

#[tokio::test(flavor = "multi_thread")]
async fn an_added_process_joins_its_containers_cgroup_whatever_the_bundle_says_later() {
    within(async {
        let mut d = daemon!();
        let mut events = d.events().await;
        let ctr = d.run("cgroup-kept", &["sleep", "1000"]).await;
        let elsewhere = format!("/berth-test-elsewhere-{}", std::process::id());
        let moved = elsewhere.clone();
        ctr.bundle
            .edit(|c| c["linux"]["cgroupsPath"] = moved.as_str().into());
        let added = d.exec(exec_req(&ctr.id, &["sleep", "1000"])).await;
        let init_cgroup = memory_cgroup_of(ctr.pid).expect("the init's memory cgroup");
        assert_eq!(memory_cgroup_of(added), Some(init_cgroup.clone()));
        let hierarchy = init_cgroup
            .ancestors()
            .find(|dir| {
                dir.join("cgroup.procs").exists()
                    && !dir
                        .parent()
                        .is_some_and(|p| p.join("cgroup.procs").exists())
            })
            .expect("the hierarchy's root");
        let made = hierarchy.join(elsewhere.trim_start_matches('/'));
        assert!(!made.exists(), "{} was made", made.display());
        d.kill_container(&mut events, &ctr.id, ctr.pid).await;
        d.assert_gone(&ctr.id).await;
    })
    .await;
}
