//! Restart and in-place upgrade: a real berthd is killed with SIGKILL or upgraded while real runc
//! containers run, and the next berthd (or the new image) must know every one of them.

mod common;

use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use berth_api::daemon_proto::{InfoRequest, UpgradeRequest};
use berth_api::proto::{StatsRequest, UpdateContainerRequest};
use common::*;

/// Restarts on the same state dir, as after a crash.
async fn crash_and_restart(daemon: &mut Daemon) {
    daemon.kill_and_restart(Options::default()).await;
}

/// The exit status berthd reports for an adopted process killed with SIGKILL: exact where the
/// kernel reports it through the pidfd, 255 (unknown) where it does not. berthd logs which.
fn adopted_sigkill_status(daemon: &Daemon) -> u32 {
    if daemon.log().contains("exact, from the pidfd") {
        137
    } else {
        eprintln!("this kernel has no PIDFD_INFO_EXIT: adopted exits report 255");
        255
    }
}

fn pid_gone(pid: u32) -> bool {
    !Path::new(&format!("/proc/{pid}")).exists()
}

#[tokio::test(flavor = "multi_thread")]
async fn a_restart_adopts_running_and_paused_containers_and_their_processes() {
    within(async {
        let Some(mut daemon) = Daemon::start().await else {
            return;
        };
        let bundle = Bundle::new(&["sleep", "1000"]);
        let (running, paused) = (id("adopt-run"), id("adopt-pause"));
        let client = &mut daemon.client;
        let running_pid = create(client, create_req(&running, &bundle)).await;
        let paused_pid = create(client, create_req(&paused, &bundle)).await;
        let added_pid = exec(client, exec_req(&running, &["sleep", "1000"])).await;
        client
            .update_container(UpdateContainerRequest {
                id: paused.clone(),
                status: "paused".into(),
                signal: 0,
            })
            .await
            .expect("pause");

        crash_and_restart(&mut daemon).await;

        let mut events = Events::subscribe(&mut daemon.client).await;
        let mut live = Vec::new();
        for _ in 0..2 {
            let event = events.wait_for("live", |e| e.r#type == "live").await;
            live.push((event.id, event.pid));
        }
        live.sort();
        let mut expected = vec![(running.clone(), running_pid), (paused.clone(), paused_pid)];
        expected.sort();
        assert_eq!(live, expected);

        let state = state(&mut daemon.client).await;
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
        let quick = exec(
            &mut daemon.client,
            exec_req(&running, &["sh", "-c", "exit 4"]),
        )
        .await;
        assert_eq!(events.exit_status(&running, quick).await, 4);

        let expected_kill = adopted_sigkill_status(&daemon);
        signal(&mut daemon.client, &running, added_pid, SIGKILL).await;
        assert_eq!(events.exit_status(&running, added_pid).await, expected_kill);
        signal(&mut daemon.client, &running, running_pid, SIGKILL).await;
        assert_eq!(
            events.exit_status(&running, running_pid).await,
            expected_kill
        );
        daemon.assert_gone(&running).await;
        signal(&mut daemon.client, &paused, paused_pid, SIGKILL).await;
        assert_eq!(events.exit_status(&paused, paused_pid).await, expected_kill);
        daemon.assert_gone(&paused).await;
        daemon.assert_no_zombies().await;
    })
    .await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_container_that_ended_while_berthd_was_down_is_reported_and_its_id_freed() {
    within(async {
        let Some(mut daemon) = Daemon::start().await else {
            return;
        };
        let bundle = Bundle::new(&["sleep", "1000"]);
        let gone = id("gone-while-down");
        let pid = create(&mut daemon.client, create_req(&gone, &bundle)).await;

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
        daemon.start_again(Options::default()).await;

        let mut events = Events::subscribe(&mut daemon.client).await;
        assert_eq!(events.exit_status(&gone, pid).await, 255);
        let state = state(&mut daemon.client).await;
        assert!(state.containers.iter().all(|c| c.id != gone));
        assert!(!daemon.runtime_ids().contains(&gone));
        assert!(!daemon.state_file(&gone).exists());
        let again = create(&mut daemon.client, create_req(&gone, &bundle)).await;
        signal(&mut daemon.client, &gone, again, SIGKILL).await;
        assert_eq!(events.exit_status(&gone, again).await, 137);
    })
    .await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_corrupt_state_file_is_skipped_with_a_log_line_naming_it() {
    within(async {
        let Some(mut daemon) = Daemon::start().await else {
            return;
        };
        let bundle = Bundle::new(&["sleep", "1000"]);
        let kept = id("kept-beside-corrupt");
        let pid = create(&mut daemon.client, create_req(&kept, &bundle)).await;
        let corrupt = daemon.state_dir().join("containers").join("torn.json");
        std::fs::write(&corrupt, "{\"id\": \"torn\", \"bund").expect("write a torn state file");

        crash_and_restart(&mut daemon).await;
        // Answered only once recovery is over, so the log is complete after it.
        let state = state(&mut daemon.client).await;

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
async fn a_restart_with_200_containers_reattaches_them_all() {
    within(async {
        let Some(mut daemon) = Daemon::start().await else {
            return;
        };
        let bundle = Arc::new(Bundle::new(&["sleep", "1000"]));
        let ids: Vec<String> = (0..200).map(|n| id(&format!("many{n}"))).collect();
        let mut tasks = Vec::new();
        for chunk in ids.chunks(50) {
            let chunk = chunk.to_vec();
            let bundle = Arc::clone(&bundle);
            let mut client = daemon.connect().await;
            tasks.push(tokio::spawn(async move {
                for id in chunk {
                    create(&mut client, create_req(&id, &bundle)).await;
                }
            }));
        }
        for task in tasks {
            task.await.expect("create task");
        }
        let before = state(&mut daemon.client).await;
        assert_eq!(before.containers.len(), 200);

        let started = Instant::now();
        crash_and_restart(&mut daemon).await;
        let after = state(&mut daemon.client).await;
        let took = started.elapsed();
        let pids = |s: &berth_api::proto::StateResponse| {
            s.containers
                .iter()
                .map(|c| (c.id.clone(), c.processes[0].pid))
                .collect::<Vec<_>>()
        };
        assert_eq!(pids(&after), pids(&before));
        let recovered = daemon
            .log()
            .lines()
            .find(|l| l.contains("state directory recovered"))
            .unwrap_or_default()
            .to_owned();
        eprintln!("restart with 200 containers: serving again after {took:?}; {recovered}");
    })
    .await;
}

#[tokio::test(flavor = "multi_thread")]
async fn an_in_place_upgrade_keeps_pids_exit_codes_and_the_socket() {
    within(async {
        let Some(mut daemon) = Daemon::start().await else {
            return;
        };
        let bundle = Arc::new(Bundle::new(&["sleep", "1000"]));
        let ids: Vec<String> = (0..50).map(|n| id(&format!("up{n}"))).collect();
        for id in &ids {
            create(&mut daemon.client, create_req(id, &bundle)).await;
        }
        let before = state(&mut daemon.client).await;
        let baseline = daemon.fds();
        let late = exec(
            &mut daemon.client,
            exec_req(&ids[0], &["sh", "-c", "sleep 3; exit 3"]),
        )
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
        let answer = admin
            .upgrade(UpgradeRequest {})
            .await
            .expect("Upgrade")
            .into_inner();
        assert_eq!(answer.pid, daemon.pid());
        assert!(answer.version.starts_with("berthd "), "{answer:?}");
        // Clients reconnect to the same path; the new image answers once it has recovered.
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            assert!(Instant::now() < deadline, "the new image never answered");
            if let Ok(mut admin) = berth_api::client::connect_daemon(&daemon.socket()).await
                && let Ok(info) = admin.info(InfoRequest {}).await
                && info.get_ref().image_started != old_image.image_started
            {
                assert_eq!(info.get_ref().pid, old_image.pid);
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }

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
        assert_eq!(events.exit_status(&ids[0], late).await, 3);
        daemon.assert_no_zombies().await;
        daemon.assert_fds_settle(&baseline).await;
    })
    .await;
}

#[tokio::test(flavor = "multi_thread")]
async fn an_upgrade_to_a_broken_binary_is_refused_and_berthd_keeps_serving() {
    within(async {
        // berthd runs from a copy, so the test can break "the binary on disk" safely.
        let bin_dir = tempfile::TempDir::new().expect("temp dir");
        let binary = bin_dir.path().join("berthd");
        std::fs::copy(env!("CARGO_BIN_EXE_berthd"), &binary).expect("copy berthd");
        let Some(mut daemon) = Daemon::start_with_options(Options {
            binary: Some(&binary),
            ..Options::default()
        })
        .await
        else {
            return;
        };
        let bundle = Bundle::new(&["sleep", "1000"]);
        let kept = id("kept-after-bad-upgrade");
        let pid = create(&mut daemon.client, create_req(&kept, &bundle)).await;
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
        let state = state(&mut daemon.client).await;
        assert_eq!(state.containers[0].processes[0].pid, pid);
        assert_eq!(
            std::fs::read(daemon.state_file(&kept)).expect("state file"),
            record
        );
    })
    .await;
}
