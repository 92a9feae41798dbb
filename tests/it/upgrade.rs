//! README's in-place upgrade by SIGUSR2, with a request in flight ("lets requests in flight
//! finish, then `execve`s it in the same process"), and a second Upgrade asked while one runs.

use std::os::unix::fs::PermissionsExt;
use std::time::{Duration, Instant};

use berth_api::daemon_proto::{InfoRequest, UpgradeRequest};
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;

use crate::common::*;

#[tokio::test(flavor = "multi_thread")]
async fn sigusr2_upgrades_in_place_and_a_create_in_flight_finishes() {
    within(async {
        let scripts = tempfile::TempDir::new().expect("temp dir");
        let wrapper = delayed_runtime(scripts.path(), "run", 2);
        let mut d = daemon!(Options::args(&["--runtime", &path_str(&wrapper)]));
        let old_image = image_info(&d.socket()).await;

        let bundle = Bundle::new(&["sleep", "1000"]);
        let id = id("usr2-inflight");
        let mut client = d.connect().await;
        let request = create_req(&id, &bundle);
        let in_flight = tokio::spawn(async move { client.create_container(request).await });
        let berthd = d.pid();
        slow_start_running(berthd, 2).await;
        kill(Pid::from_raw(berthd as i32), Signal::SIGUSR2).expect("SIGUSR2 to berthd");

        let pid = in_flight
            .await
            .expect("create task")
            .expect("the create in flight at the upgrade finishes")
            .into_inner()
            .pid;
        let new_image = new_image(&d.socket(), &old_image).await;
        assert_eq!(new_image.pid, old_image.pid, "an upgrade keeps the process");
        assert_eq!(d.try_wait(), None, "berthd exited");

        let mut client = d.connect().await;
        let state = state(&mut client).await;
        let container = state
            .containers
            .iter()
            .find(|c| c.id == id)
            .expect("the new image lists the container created across the upgrade");
        assert_eq!(container.processes[0].pid, pid);
        assert_eq!(
            proc_stat(pid).map(|s| s.ppid),
            Some(berthd),
            "the init's parent"
        );
        d.client = client;
        let mut events = d.events().await;
        d.record_cgroups(&id, pid);
        d.kill_container(&mut events, &id, pid).await;
    })
    .await
}

/// A second Upgrade asked while one is under way is not run as well: it is answered
/// UNAVAILABLE (berthd is already upgrading) and the first one completes once.
#[tokio::test(flavor = "multi_thread")]
async fn a_second_upgrade_while_one_runs_is_refused_unavailable() {
    within(async {
        // berthd runs from a path the test controls; after start that path becomes a script
        // that waits before running berthd, so the first upgrade's pre-flight takes a while.
        let bin_dir = tempfile::TempDir::new().expect("temp dir");
        let binary = bin_dir.path().join("berthd");
        let real = bin_dir.path().join("berthd-real");
        std::fs::copy(env!("CARGO_BIN_EXE_berthd"), &binary).expect("copy berthd");
        std::fs::copy(env!("CARGO_BIN_EXE_berthd"), &real).expect("copy berthd");
        let mut d = daemon!(Options {
            binary: Some(&binary),
            ..Options::default()
        });
        let c = d.run("second-upgrade", &["sleep", "1000"]).await;
        std::fs::remove_file(&binary).expect("remove the binary");
        std::fs::write(
            &binary,
            format!("#!/bin/sh\nsleep 2\nexec {} \"$@\"\n", real.display()),
        )
        .expect("write the slow binary");
        std::fs::set_permissions(&binary, std::fs::Permissions::from_mode(0o755)).expect("chmod");
        let mut admin = berth_api::client::connect_daemon(&d.socket())
            .await
            .expect("connect to the Daemon service");
        let old_image = admin.info(InfoRequest {}).await.expect("Info").into_inner();

        let mut first_admin = admin.clone();
        let first = tokio::spawn(async move { first_admin.upgrade(UpgradeRequest {}).await });
        // The first is in its pre-flight: the slow binary's `sleep 2` runs below berthd.
        let berthd = d.pid();
        slow_start_running(berthd, 2).await;
        let second = admin.upgrade(UpgradeRequest {}).await;
        let message = expect_code(second, tonic::Code::Unavailable);
        assert!(message.contains("already upgrading"), "{message}");
        let first = first
            .await
            .expect("first upgrade task")
            .expect("the first upgrade");
        assert_eq!(first.into_inner().pid, berthd);

        new_image(&d.socket(), &old_image).await;
        assert_eq!(d.try_wait(), None, "berthd exited");
        d.client = d.connect().await;
        let mut events = d.events().await;
        d.kill_container(&mut events, &c.id, c.pid).await;
    })
    .await
}

/// An attached `berth exec` across an in-place upgrade: the upgrade ends its event stream, and
/// the CLI subscribes again once the new image serves, relaying the process's output and
/// exiting with its code as if nothing happened.
#[tokio::test(flavor = "multi_thread")]
async fn an_attached_berth_exec_outlives_an_in_place_upgrade() {
    within(async {
        let cli = berth_cli();
        if !host_supports(
            "needs the berth CLI",
            cli.as_ref().map(drop).map_err(Clone::clone),
        ) {
            return;
        }
        let mut d = daemon!();
        let c = d.run("cli-across-upgrade", &["sleep", "1000"]).await;
        let attached = std::process::Command::new(cli.expect("checked"))
            .arg("--address")
            .arg(d.socket())
            .args([
                "exec",
                &c.id,
                "--",
                "sh",
                "-c",
                "echo before; sleep 4; echo after; exit 5",
            ])
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .expect("run berth exec");
        let deadline = Instant::now() + EVENT_TIMEOUT;
        loop {
            let state = d.state().await;
            let ours = state
                .containers
                .iter()
                .find(|x| x.id == c.id)
                .expect("listed");
            if ours.processes.len() == 2 {
                break;
            }
            assert!(Instant::now() < deadline, "the exec never started");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        upgrade_in_place(&d.socket()).await;
        let out = tokio::task::spawn_blocking(move || attached.wait_with_output())
            .await
            .expect("join")
            .expect("berth exec");
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert_eq!(
            out.status.code(),
            Some(5),
            "stdout {stdout:?}, stderr {:?}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert_eq!(stdout, "before\nafter\n");
        d.client = d.connect().await;
        let mut events = d.events().await;
        d.kill_container(&mut events, &c.id, c.pid).await;
    })
    .await
}
