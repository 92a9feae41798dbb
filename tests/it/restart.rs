//! Restart and in-place upgrade: a real berthd is killed with SIGKILL or upgraded while real runc
//! containers run, and the next berthd (or the new image) must know every one of them.

use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use crate::common::*;
use berth_api::daemon_proto::{InfoRequest, UpgradeRequest};
use berth_api::proto::{StatsRequest, UpdateContainerRequest};

/// Restarts on the same state dir, as after a crash.
async fn crash_and_restart(daemon: &mut Daemon) {
    daemon.kill_and_restart().await;
}

/// `struct pidfd_info` (linux/pidfd.h) up to `exit_code`: PIDFD_INFO_SIZE_VER0, 64 bytes.
#[repr(C)]
#[derive(Default)]
struct PidfdInfo {
    mask: u64,
    cgroupid: u64,
    pid: u32,
    tgid: u32,
    ppid: u32,
    ruid: u32,
    rgid: u32,
    euid: u32,
    egid: u32,
    suid: u32,
    sgid: u32,
    fsuid: u32,
    fsgid: u32,
    exit_code: i32,
}

/// Request bit of `pidfd_info.mask`, set in the answer when `exit_code` is filled in.
const PIDFD_INFO_EXIT: u64 = 0x8;
/// `_IOWR(PIDFS_IOCTL_MAGIC = 0xFF, 11, struct pidfd_info)`.
const PIDFD_GET_INFO: libc::c_ulong =
    (3 << 30) | ((std::mem::size_of::<PidfdInfo>() as libc::c_ulong) << 16) | (0xFF << 8) | 11;

/// Asks the kernel itself, not berthd, whether a pidfd reports the exit code of a process that
/// someone else reaped: a child of the test is killed with SIGKILL and reaped, then its pidfd
/// is asked with `PIDFD_GET_INFO` for `PIDFD_INFO_EXIT`.
#[allow(unsafe_code)]
fn kernel_reports_exit_codes() -> Result<(), String> {
    let mut child = std::process::Command::new("sleep")
        .arg("1000")
        .spawn()
        .expect("spawn sleep");
    let pid = rustix::process::Pid::from_raw(child.id() as i32).expect("a positive pid");
    let pidfd = rustix::process::pidfd_open(pid, rustix::process::PidfdFlags::empty())
        .map_err(|e| format!("pidfd_open: {e}"));
    child.kill().expect("kill sleep");
    child.wait().expect("reap sleep");
    let pidfd = pidfd?;
    let mut info = PidfdInfo {
        mask: PIDFD_INFO_EXIT,
        ..Default::default()
    };
    // SAFETY: PIDFD_GET_INFO writes at most size_of::<PidfdInfo>() bytes (the size is encoded in
    // the request number) into `info`, which we own and which outlives the call; `pidfd` is open.
    let rc = unsafe {
        libc::ioctl(
            std::os::fd::AsRawFd::as_raw_fd(&pidfd),
            PIDFD_GET_INFO,
            &mut info as *mut PidfdInfo,
        )
    };
    if rc != 0 {
        let e = std::io::Error::last_os_error();
        return Err(format!("ioctl(PIDFD_GET_INFO) fails: {e}"));
    }
    if info.mask & PIDFD_INFO_EXIT == 0 {
        return Err("PIDFD_GET_INFO answers without PIDFD_INFO_EXIT".into());
    }
    assert_eq!(
        info.exit_code,
        libc::SIGKILL,
        "the kernel's wait status of a process killed with SIGKILL"
    );
    Ok(())
}

/// The exit status berthd must report for an adopted process killed with SIGKILL: exactly 137
/// where the kernel reports exit codes through pidfds, 255 (unknown) only where it does not.
/// With CI set the kernel must report them.
fn adopted_sigkill_status() -> u32 {
    match kernel_reports_exit_codes() {
        Ok(()) => 137,
        Err(why) if std::env::var_os("CI").is_some() => {
            panic!("PIDFD_INFO_EXIT is required with CI set: {why}")
        }
        Err(why) => {
            note(&format!(
                "no PIDFD_INFO_EXIT ({why}): adopted exits must read 255"
            ));
            255
        }
    }
}

fn pid_gone(pid: u32) -> bool {
    !Path::new(&format!("/proc/{pid}")).exists()
}

#[tokio::test(flavor = "multi_thread")]
async fn a_restart_adopts_running_and_paused_containers_and_their_processes() {
    within(async {
        let mut daemon = daemon!();
        let bundle = Bundle::new(&["sleep", "1000"]);
        let (running, paused) = (id("adopt-run"), id("adopt-pause"));
        let running_pid = daemon.create(create_req(&running, &bundle)).await;
        let paused_pid = daemon.create(create_req(&paused, &bundle)).await;
        let added_pid = daemon.exec(exec_req(&running, &["sleep", "1000"])).await;
        daemon
            .client
            .update_container(UpdateContainerRequest {
                id: paused.clone(),
                status: "paused".into(),
                signal: 0,
            })
            .await
            .expect("pause");

        crash_and_restart(&mut daemon).await;

        let mut events = daemon.events().await;
        let mut live = Vec::new();
        for _ in 0..2 {
            let event = events.wait_for("live", |e| e.r#type == "live").await;
            live.push((event.id, event.pid));
        }
        live.sort();
        let mut expected = vec![(running.clone(), running_pid), (paused.clone(), paused_pid)];
        expected.sort();
        assert_eq!(live, expected);

        let state = daemon.state().await;
        let find = |id: &str| {
            state
                .containers
                .iter()
                .find(|c| c.id == id)
                .unwrap_or_else(|| panic!("{id} missing from State after the restart"))
                .clone()
        };
        let adopted = find(&running);
        assert_eq!(adopted.status, "running");
        let pids: Vec<u32> = adopted.processes.iter().map(|p| p.pid).collect();
        assert_eq!(pids, [running_pid, added_pid]);
        assert_eq!(find(&paused).status, "paused");
        // Adopted inits have their namespaces held as created ones do (see exits).
        let mut namespaces = mount_and_network_namespaces(running_pid);
        namespaces.extend(mount_and_network_namespaces(paused_pid));
        namespaces.sort();
        assert_eq!(daemon.held_namespaces(), namespaces);

        // The adopted containers work as if this berthd had created them.
        daemon
            .client
            .update_container(UpdateContainerRequest {
                id: paused.clone(),
                status: "running".into(),
                signal: 0,
            })
            .await
            .expect("resume an adopted paused container");
        let mut stats = daemon
            .client
            .get_stats(StatsRequest {
                id: running.clone(),
            })
            .await
            .expect("GetStats on an adopted container")
            .into_inner();
        let sample = stats
            .message()
            .await
            .expect("a stats sample")
            .expect("the stream yields");
        let memory = sample
            .cgroup_stats
            .and_then(|c| c.memory_stats)
            .and_then(|m| m.usage);
        assert!(
            memory.is_some_and(|m| m.usage > 0),
            "the adopted container's cgroup is sampled"
        );
        let quick = daemon
            .exec(exec_req(&running, &["sh", "-c", "exit 4"]))
            .await;
        assert_eq!(events.exit_status(&running, quick).await, 4);

        let expected_kill = adopted_sigkill_status();
        daemon.signal(&running, added_pid, SIGKILL).await;
        assert_eq!(events.exit_status(&running, added_pid).await, expected_kill);
        daemon.signal(&running, running_pid, SIGKILL).await;
        assert_eq!(
            events.exit_status(&running, running_pid).await,
            expected_kill
        );
        daemon.assert_gone(&running).await;
        daemon.signal(&paused, paused_pid, SIGKILL).await;
        assert_eq!(events.exit_status(&paused, paused_pid).await, expected_kill);
        daemon.assert_gone(&paused).await;
        assert!(daemon.held_namespaces().is_empty(), "{:?}", daemon.fds());
        daemon.assert_no_zombies().await;
    })
    .await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_container_that_ended_while_berthd_was_down_is_reported_and_its_id_freed() {
    within(async {
        let mut daemon = daemon!();
        let bundle = Bundle::new(&["sleep", "1000"]);
        let gone = id("gone-while-down");
        let pid = daemon.create(create_req(&gone, &bundle)).await;

        daemon.crash();
        nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(pid as i32),
            nix::sys::signal::Signal::SIGKILL,
        )
        .expect("kill the container init while berthd is down");
        // Its new parent, the host's init, reaps it; only then is the pid really gone.
        let deadline = Instant::now() + Duration::from_secs(20);
        while !pid_gone(pid) {
            assert!(Instant::now() < deadline, "pid {pid} was never reaped");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        daemon.start_again().await;

        let mut events = daemon.events().await;
        assert_eq!(events.exit_status(&gone, pid).await, 255);
        let state = daemon.state().await;
        assert!(state.containers.iter().all(|c| c.id != gone));
        assert!(!daemon.runtime_ids().contains(&gone));
        assert!(!daemon.state_file(&gone).exists());
        let again = daemon.create(create_req(&gone, &bundle)).await;
        daemon.signal(&gone, again, SIGKILL).await;
        assert_eq!(events.exit_status(&gone, again).await, 137);
    })
    .await;
}

/// A runtime that is real runc, except that once `<dir>/hang` exists an exec hangs (in
/// `sleep <HANG_SECS>`) after it has started its process, so berthd is still waiting for it
/// when the test kills berthd.
fn hanging_exec_runtime(dir: &Path) -> std::path::PathBuf {
    let body = format!(
        "#!/bin/sh\nfor arg in \"$@\"; do\n  if [ \"$arg\" = exec ] && [ -e '{hang}' ]; then {runc} \"$@\" || exit; exec sleep {HANG_SECS}; fi\ndone\nexec {runc} \"$@\"\n",
        hang = dir.join("hang").display(),
        runc = runc_in_path().display()
    );
    write_script(dir, "hanging-exec-runc", &body)
}

const HANG_SECS: u32 = 57;

/// Waits until `pid` is gone (reaped by the host's init, its parent once berthd is gone).
async fn until_gone(pid: u32, what: &str) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while !pid_gone(pid) {
        assert!(Instant::now() < deadline, "{what} (pid {pid}) still runs");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// An exec cut off by berthd's death, after its runtime started the process: no record holds
/// the process and no client was given its pid, so it must not run on with nothing to track
/// it. The spawn helper kills the runtime as soon as berthd is gone; the process, in a session
/// of its own, is named only by the pid file the runtime wrote, and the next berthd kills it,
/// and no process a record holds.
#[tokio::test(flavor = "multi_thread")]
async fn an_exec_cut_off_by_berthds_death_leaves_no_process_after_the_restart() {
    within(async {
        if builtin_runtime() {
            return;
        }
        let scripts = tempfile::tempdir().expect("tempdir");
        let wrapper = hanging_exec_runtime(scripts.path());
        let mut daemon = daemon!(Options::args(&["--runtime", &path_str(&wrapper)]));
        let kept = daemon.run("exec-cut-off", &["sleep", "1000"]).await;
        let recorded = daemon.exec(exec_req(&kept.id, &["sleep", "1000"])).await;

        std::fs::write(scripts.path().join("hang"), "").expect("make execs hang");
        let mut client = daemon.connect().await;
        let request = exec_req(&kept.id, &["sleep", "4201"]);
        tokio::spawn(async move { client.add_process(request).await });
        let deadline = Instant::now() + Duration::from_secs(20);
        let (process, runtime) = loop {
            if let ([process], [runtime]) = (
                &sleeps_of(4201)[..],
                &slow_starts(daemon.pid(), HANG_SECS)[..],
            ) {
                break (*process, *runtime);
            }
            assert!(Instant::now() < deadline, "the exec's process never ran");
            tokio::time::sleep(Duration::from_millis(20)).await;
        };

        daemon.crash();
        until_gone(runtime, "the runtime of an exec cut off by berthd's death").await;
        daemon.start_again().await;
        until_gone(process, "the process of an exec cut off by berthd's death").await;
        assert!(
            !pid_gone(kept.pid) && !pid_gone(recorded),
            "a recorded process was killed"
        );
        let left: Vec<_> = std::fs::read_dir(daemon.state_dir().join("execs"))
            .expect("exec pid files")
            .collect();
        assert!(left.is_empty(), "exec pid files left: {left:?}");

        let mut events = daemon.events().await;
        let state = daemon.state().await;
        let container = state.containers.iter().find(|c| c.id == kept.id);
        let mut pids: Vec<u32> = container
            .expect("adopted")
            .processes
            .iter()
            .map(|p| p.pid)
            .collect();
        pids.sort_unstable();
        let mut expected = vec![kept.pid, recorded];
        expected.sort_unstable();
        assert_eq!(pids, expected);
        daemon.kill_container(&mut events, &kept.id, kept.pid).await;
    })
    .await;
}

/// README: restart's `live` and `exit` events are replayed to subscribers that connect within
/// `--recovery-replay` seconds, and only to those.
#[tokio::test(flavor = "multi_thread")]
async fn restart_events_are_replayed_only_within_the_recovery_replay_window() {
    within(async {
        let mut daemon = daemon!();
        // Long enough for a busy host to connect the early subscriber within it.
        const WINDOW: Duration = Duration::from_secs(4);
        let kept = daemon.run("replayed", &["sleep", "1000"]).await;
        daemon.crash();
        let window = WINDOW.as_secs().to_string();
        daemon
            .start_again_with(Options::args(&["--recovery-replay", &window]))
            .await;
        let started = Instant::now();

        let mut early = daemon.events().await;
        let live = early.wait_for("live", |e| e.r#type == "live").await;
        assert_eq!((live.id.as_str(), live.pid), (kept.id.as_str(), kept.pid));
        assert_eq!(live.bundle_path, kept.bundle.path_str());

        // The window is what is under test here, so the test waits it out.
        tokio::time::sleep(WINDOW.saturating_sub(started.elapsed())).await;
        tokio::time::sleep(Duration::from_millis(500)).await;
        let mut late = daemon.events().await;
        let other = daemon.run("after-window", &["sleep", "1000"]).await;
        let first = late.next().await;
        assert_eq!(
            (first.r#type.as_str(), first.id.as_str()),
            ("start-container", other.id.as_str()),
            "a subscriber after the window got a replayed event first: {first:?}"
        );
        daemon.kill_container(&mut late, &other.id, other.pid).await;
        // Adopted: its code comes from the kernel, where the kernel gives it.
        daemon.signal(&kept.id, kept.pid, SIGKILL).await;
        let expected = adopted_sigkill_status();
        assert_eq!(late.exit_status(&kept.id, kept.pid).await, expected);
        daemon.assert_gone(&kept.id).await;
    })
    .await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_corrupt_state_file_is_skipped_with_a_log_line_naming_it() {
    within(async {
        let mut daemon = daemon!();
        let bundle = Bundle::new(&["sleep", "1000"]);
        let kept = id("kept-beside-corrupt");
        let pid = daemon.create(create_req(&kept, &bundle)).await;
        let corrupt = daemon.state_dir().join("containers").join("torn.json");
        std::fs::write(&corrupt, "{\"id\": \"torn\", \"bund").expect("write a torn state file");

        crash_and_restart(&mut daemon).await;
        // Answered only once recovery is over, so the log is complete after it.
        let state = daemon.state().await;

        let log = daemon.log();
        assert!(
            log.lines()
                .any(|l| l.contains("corrupt state file") && l.contains("torn.json")),
            "no log line names the corrupt file:\n{log}"
        );
        assert!(
            corrupt.exists(),
            "a corrupt state file is kept for the operator"
        );
        let adopted: Vec<_> = state
            .containers
            .iter()
            .map(|c| (c.id.clone(), c.processes[0].pid))
            .collect();
        assert_eq!(adopted, [(kept.clone(), pid)]);
    })
    .await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_restart_with_200_members_containers_reattaches_them_all_with_their_bundles_process() {
    // Half a minute alone here; beside three other tests on a slower host, it may take twice
    // that and more.
    within_for(Duration::from_secs(240), async {
        let mut daemon = daemon!();
        let bundle = Bundle::new(&["sleep", "1000"]);
        // Deep down, so that each read of its config (a walk checking every directory on the
        // way) takes a while and restart's reads overlap; readable by the member, as whom
        // restart reads it.
        let deep = tempfile::TempDir::new().expect("temp dir");
        let mut path = deep.path().to_owned();
        for _ in 0..400 {
            path.push("d");
        }
        std::fs::create_dir_all(&path).expect("deep dirs");
        let mut dir = path.clone();
        while dir.as_path() != std::path::Path::new("/tmp") {
            std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o755)).expect("chmod");
            dir.pop();
        }
        path.push("bundle");
        std::fs::rename(bundle.path(), &path).expect("move the bundle down");
        let bundle_path = path.display().to_string();
        let ids: Vec<String> = (0..200).map(|n| id(&format!("many{n}"))).collect();
        let mut tasks = Vec::new();
        for chunk in ids.chunks(50) {
            let chunk = chunk.to_vec();
            let bundle_path = bundle_path.clone();
            let mut client = daemon.connect().await;
            tasks.push(tokio::spawn(async move {
                for id in chunk {
                    let request = berth_api::proto::CreateContainerRequest {
                        id: id.clone(),
                        bundle_path: bundle_path.clone(),
                        ..Default::default()
                    };
                    create(&mut client, request).await;
                }
            }));
        }
        for task in tasks {
            task.await.expect("create task");
        }
        let before = daemon.state().await;
        assert_eq!(before.containers.len(), 200);
        let sampled = [&ids[0], &ids[100], &ids[199]];
        let mut added_before = Vec::new();
        for id in sampled {
            added_before.push(added_process_limits(&mut daemon, id).await);
        }

        daemon.crash();
        // As if a member of --group had created them all: restart reads each bundle's config
        // as that client, and a member has 32 places for file-system trips at once; the
        // configs it could not read left added processes without the bundle's rlimits.
        for id in &ids {
            let path = daemon.state_file(id);
            let mut record: serde_json::Value =
                serde_json::from_slice(&std::fs::read(&path).expect("record")).expect("JSON");
            record["named_by"] = serde_json::json!({"uid": 65534, "gid": 65534, "groups": [65534]});
            std::fs::write(&path, record.to_string()).expect("rewrite record");
        }
        let started = Instant::now();
        daemon.start_again().await;
        let after = daemon.state().await;
        let took = started.elapsed();
        let pids = |s: &berth_api::proto::StateResponse| {
            s.containers
                .iter()
                .map(|c| (c.id.clone(), c.processes[0].pid))
                .collect::<Vec<_>>()
        };
        assert_eq!(pids(&after), pids(&before));
        let log = daemon.log();
        let unread: Vec<&str> = log
            .lines()
            .filter(|l| l.contains("bundle config"))
            .collect();
        assert!(
            unread.is_empty(),
            "{} configs unread: {unread:?}",
            unread.len()
        );
        for (id, before) in sampled.into_iter().zip(added_before) {
            assert_eq!(added_process_limits(&mut daemon, id).await, before, "{id}");
        }
        let recovered = log
            .lines()
            .find(|l| l.contains("state directory recovered"))
            .unwrap_or_default()
            .to_owned();
        eprintln!("restart with 200 containers: serving again after {took:?}; {recovered}");
    })
    .await;
}

/// What an added process of container `id` is held to that its bundle's process sets: its
/// open-file limit and NoNewPrivs, read from /proc while it runs; it is then killed.
async fn added_process_limits(daemon: &mut Daemon, id: &str) -> (String, String) {
    let pid = daemon.exec(exec_req(id, &["sleep", "60"])).await;
    let limits = std::fs::read_to_string(format!("/proc/{pid}/limits")).expect("limits");
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("status");
    let line = |text: &str, key: &str| {
        text.lines()
            .find(|l| l.starts_with(key))
            .unwrap_or_else(|| panic!("no {key} line"))
            .split_whitespace()
            .collect::<Vec<_>>()
            .join(" ")
    };
    let held = (line(&limits, "Max open files"), line(&status, "NoNewPrivs"));
    daemon.signal(id, pid, 9).await;
    held
}

#[tokio::test(flavor = "multi_thread")]
async fn an_in_place_upgrade_keeps_pids_exit_codes_and_the_socket() {
    within(async {
        let mut daemon = daemon!();
        let bundle = Arc::new(Bundle::new(&["sleep", "1000"]));
        let ids: Vec<String> = (0..50).map(|n| id(&format!("up{n}"))).collect();
        for id in &ids {
            daemon.create(create_req(id, &bundle)).await;
        }
        let before = daemon.state().await;
        let baseline = daemon.baseline();
        // Exits with 3 once the test opens its gate, after the upgrade.
        let gate = bundle.gate("late");
        let late = daemon
            .exec(exec_req(
                &ids[0],
                &["sh", "-c", "read x < /tmp/late; exit 3"],
            ))
            .await;

        let socket = daemon.socket();
        let watching = Arc::new(AtomicBool::new(true));
        let vanished = Arc::new(AtomicBool::new(false));
        let watcher = {
            let (watching, vanished) = (Arc::clone(&watching), Arc::clone(&vanished));
            std::thread::spawn(move || {
                while watching.load(Ordering::Relaxed) {
                    if !socket.exists() {
                        vanished.store(true, Ordering::Relaxed);
                    }
                    std::thread::sleep(Duration::from_micros(200));
                }
            })
        };
        let mut admin = berth_api::client::connect_daemon(&daemon.socket())
            .await
            .expect("connect to the Daemon service");
        let old_image = admin.info(InfoRequest {}).await.expect("Info").into_inner();
        // README: streams end with UNAVAILABLE when berthd upgrades.
        let mut old_events = daemon.events().await;
        let answer = admin
            .upgrade(UpgradeRequest {})
            .await
            .expect("Upgrade")
            .into_inner();
        assert_eq!(answer.pid, daemon.pid());
        assert!(answer.version.starts_with("berthd "), "{answer:?}");
        let ended = loop {
            match old_events.next_result().await {
                Ok(Some(_)) => continue,
                other => break other,
            }
        };
        match ended {
            Err(status) => assert_eq!(status.code(), tonic::Code::Unavailable, "{status:?}"),
            Ok(_) => panic!("Events ended with OK at the upgrade, not UNAVAILABLE"),
        }
        // Clients reconnect to the same path; the new image answers once it has recovered.
        let info = new_image(&daemon.socket(), &old_image).await;
        assert_eq!(info.pid, old_image.pid);

        let mut client = daemon.connect().await;
        let mut events = Events::subscribe(&mut client).await;
        let after = state(&mut client).await;
        watching.store(false, Ordering::Relaxed);
        watcher.join().expect("socket watcher");
        assert!(
            !vanished.load(Ordering::Relaxed),
            "the socket path disappeared during the upgrade"
        );
        assert_eq!(
            daemon.try_wait(),
            None,
            "berthd is the same, still running process"
        );

        let pids = |s: &berth_api::proto::StateResponse| {
            s.containers
                .iter()
                .map(|c| {
                    (
                        c.id.clone(),
                        c.processes.iter().map(|p| p.pid).collect::<Vec<_>>(),
                    )
                })
                .collect::<Vec<_>>()
        };
        let mut expected = pids(&before);
        expected
            .iter_mut()
            .find(|(id, _)| id == &ids[0])
            .expect("first container")
            .1
            .push(late);
        assert_eq!(pids(&after), expected);
        // Still berthd's child, so the code is exact on any kernel.
        let _gate = open_gate(&gate);
        assert_eq!(events.exit_status(&ids[0], late).await, 3);
        daemon.client = client;
        daemon.assert_no_zombies().await;
        // Across the execve berthd's sockets and pipes are new ones: compared by kind.
        daemon.assert_fd_kinds_settle(&baseline).await;
    })
    .await;
}

/// Each image's spawn helper exits when the upgrade's execve closes its socket, before the next
/// image watches SIGCHLD, so its SIGCHLD reaches no one: the next image must reap it all the
/// same, with no other child's exit to prompt a sweep.
#[tokio::test(flavor = "multi_thread")]
async fn in_place_upgrades_leave_no_spawn_helper_unreaped() {
    within(async {
        let mut daemon = daemon!();
        let bundle = Bundle::new(&["sleep", "1000"]);
        let kept = id("helpers-reaped");
        let pid = daemon.create(create_req(&kept, &bundle)).await;
        for _ in 0..3 {
            upgrade_in_place(&daemon.socket()).await;
        }
        daemon.client = daemon.connect().await;
        daemon.assert_no_zombies().await;
        let mut events = daemon.events().await;
        daemon.kill_container(&mut events, &kept, pid).await;
    })
    .await
}

#[tokio::test(flavor = "multi_thread")]
async fn an_upgrade_to_a_broken_binary_is_refused_and_berthd_keeps_serving() {
    within(async {
        // berthd runs from a copy, so the test can break "the binary on disk" safely.
        let bin_dir = tempfile::TempDir::new().expect("temp dir");
        let binary = bin_dir.path().join("berthd");
        std::fs::copy(env!("CARGO_BIN_EXE_berthd"), &binary).expect("copy berthd");
        let mut daemon = daemon!(Options {
            binary: Some(&binary),
            ..Options::default()
        });
        let bundle = Bundle::new(&["sleep", "1000"]);
        let kept = id("kept-after-bad-upgrade");
        let pid = daemon.create(create_req(&kept, &bundle)).await;
        let record = std::fs::read(daemon.state_file(&kept)).expect("state file");

        std::fs::remove_file(&binary).expect("remove the binary");
        std::fs::write(&binary, "#!/bin/sh\nexit 1\n").expect("write a broken binary");
        let mut admin = berth_api::client::connect_daemon(&daemon.socket())
            .await
            .expect("connect to the Daemon service");
        let message = expect_code(
            admin.upgrade(UpgradeRequest {}).await,
            tonic::Code::FailedPrecondition,
        );
        assert!(message.contains("not upgrading"), "{message}");

        assert_eq!(daemon.try_wait(), None);
        let state = daemon.state().await;
        assert_eq!(state.containers[0].processes[0].pid, pid);
        assert_eq!(
            std::fs::read(daemon.state_file(&kept)).expect("state file"),
            record
        );
    })
    .await;
}

/// A scratch directory the start cannot empty (a berthd that died left runtime commands adding
/// files to it; here, something mounted in it) does not keep berthd down: it starts, serves,
/// and names its scratch files apart from what is left.
#[tokio::test(flavor = "multi_thread")]
async fn a_scratch_directory_that_cannot_be_emptied_does_not_keep_berthd_down() {
    within(async {
        let mut d = daemon!();
        let busy = d.state_dir().join("tmp/left-by-a-dead-berthd");
        std::fs::create_dir_all(&busy).unwrap();
        let mounted = Command::new("mount")
            .args(["-t", "tmpfs", "scratch-test", &path_str(&busy)])
            .status()
            .expect("mount");
        assert!(mounted.success(), "mount a tmpfs at {}", busy.display());
        let _unmount = DetachOnDrop(busy);
        d.kill_and_restart().await;
        let ctr = d
            .run(&numbered("after-busy-scratch"), &["sleep", "1000"])
            .await;
        let mut events = d.events().await;
        d.kill_container(&mut events, &ctr.id, ctr.pid).await;
    })
    .await
}

/// Unmounts (lazily) what the test mounted, however the test ends.
struct DetachOnDrop(std::path::PathBuf);

impl Drop for DetachOnDrop {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.0).status();
    }
}
