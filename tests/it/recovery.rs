//! What a restart finds and cleans up, checked against the runtime, the kernel and the state
//! directory rather than berthd's log: a container berthd died creating, an added process that
//! ended while berthd was down, a record whose runtime state is gone, and a runtime delete that
//! failed.

use std::time::{Duration, Instant};

use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use serde_json::Value;

use crate::common::*;

/// The init pid the runtime holds for `id` under berthd's runtime root.
fn runtime_init_pid(d: &Daemon, id: &str) -> u32 {
    let out = std::process::Command::new("runc")
        .arg("--root")
        .arg(d.state_dir().join("runtime"))
        .args(["state", id])
        .output()
        .expect("run runc state");
    assert!(out.status.success(), "runc state {id}: {out:?}");
    let state: Value = serde_json::from_slice(&out.stdout).expect("runc state prints JSON");
    state["pid"].as_u64().expect("runc state has a pid") as u32
}

async fn wait_until(what: &str, done: impl Fn() -> bool) {
    let deadline = Instant::now() + EVENT_TIMEOUT;
    while !done() {
        assert!(Instant::now() < deadline, "timed out waiting until {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// The status reported for a process that ended while berthd was down: 255 (unknown) once the
/// host's init has reaped it, since nobody can read it then; while it is still a zombie the
/// kernel keeps its code for a pidfd, so berthd may read the real one.
fn assert_ended_while_down(status: u32, real: u32, reaped_before_restart: bool) {
    if reaped_before_restart {
        assert_eq!(status, 255, "a process reaped before the restart");
    } else {
        assert!(
            status == real || status == 255,
            "a zombie at the restart reads {real} or, once reaped meanwhile, 255: got {status}"
        );
    }
}

fn alive(pid: u32) -> bool {
    std::path::Path::new(&format!("/proc/{pid}")).exists()
}

/// berthd is killed while a create waits in the runtime's `start`: the runtime holds a created
/// container that no state file records. The next berthd removes it (its `runc init` and cgroups
/// included) before serving, and the id can be created again.
#[tokio::test(flavor = "multi_thread")]
async fn a_container_berthd_died_creating_is_removed_at_restart_and_its_id_is_free() {
    within(async {
        let scripts = tempfile::TempDir::new().expect("temp dir");
        let wrapper = slow_start_runtime(scripts.path(), 30);
        let wrapper = wrapper.to_str().expect("utf-8 path");
        let mut d = daemon!(Options::args(&["--runtime", wrapper]));
        let bundle = Bundle::new(&["sleep", "1000"]);
        let id = id("midcreate");
        let mut client = d.connect().await;
        let request = create_req(&id, &bundle);
        let pending = tokio::spawn(async move { client.create_container(request).await });
        let berthd = d.pid();
        wait_until("the runtime's start hangs", || {
            !slow_starts(berthd, 30).is_empty()
        })
        .await;
        let stranded = slow_starts(berthd, 30);
        let init = runtime_init_pid(&d, &id);
        let cgroups = cgroups_of(init);
        assert!(!cgroups.is_empty(), "the created init has no cgroups");

        d.crash();
        for pid in stranded {
            let _ = kill(Pid::from_raw(pid as i32), Signal::SIGKILL);
        }
        let answer = pending.await.expect("create task");
        assert!(
            answer.is_err(),
            "a create cut off by a crash succeeded: {answer:?}"
        );
        assert!(
            d.runtime_ids().contains(&id),
            "the runtime should still hold {id}"
        );

        // Plain runc: the wrapper passed every command but `start` to it.
        d.start_again().await;
        assert!(
            !d.runtime_ids().contains(&id),
            "{id} is still in the runtime after the restart"
        );
        assert!(
            !d.state_file(&id).exists(),
            "a state file appeared for {id}"
        );
        assert!(
            !d.state().await.containers.iter().any(|c| c.id == id),
            "State lists {id}"
        );
        wait_until("the created init is gone", || !alive(init)).await;
        for dir in &cgroups {
            wait_until(&format!("{} is removed", dir.display()), || !dir.exists()).await;
        }

        let pid = d.create(create_req(&id, &bundle)).await;
        let mut events = d.events().await;
        d.kill_container(&mut events, &id, pid).await;
    })
    .await
}

/// An added process that ends while berthd is down is reported at the restart (its exit is
/// replayed), is gone from State and from the state file, and the container itself is adopted.
#[tokio::test(flavor = "multi_thread")]
async fn an_added_process_that_ended_while_berthd_was_down_is_reported_at_restart() {
    within(async {
        let mut d = daemon!();
        let c = d.run("downexec", &["sleep", "1000"]).await;
        let gate = c.bundle.gate("go");
        let added = d
            .exec(exec_req(&c.id, &["sh", "-c", "read x < /tmp/go; exit 4"]))
            .await;
        let before = std::fs::read_to_string(d.state_file(&c.id)).expect("state file");
        assert!(
            before.contains(&format!("\"pid\":{added}"))
                || before.contains(&format!("\"pid\": {added}")),
            "the state file does not record the added process: {before}"
        );

        d.crash();
        let _gate = open_gate(&gate);
        wait_until("the added process has ended", || {
            proc_stat(added).is_none_or(|stat| stat.state == 'Z')
        })
        .await;

        let reaped_before_restart = proc_stat(added).is_none();
        d.start_again().await;
        let mut events = d.events().await;
        let status = events.exit_status(&c.id, added).await;
        assert_ended_while_down(status, 4, reaped_before_restart);
        let state = d.state().await;
        let container = state
            .containers
            .iter()
            .find(|x| x.id == c.id)
            .expect("the container is adopted");
        let pids: Vec<u32> = container.processes.iter().map(|p| p.pid).collect();
        assert_eq!(pids, [c.pid], "State after the restart");
        let after = std::fs::read_to_string(d.state_file(&c.id)).expect("state file");
        assert!(
            !after.contains(&format!("\"pid\":{added}"))
                && !after.contains(&format!("\"pid\": {added}")),
            "the state file still records the ended process: {after}"
        );
        d.kill_container(&mut events, &c.id, c.pid).await;
    })
    .await
}

/// A record whose container the runtime no longer has (deleted by hand while berthd was down,
/// which kills its init): the restart reports the exit, removes the record and frees the id.
#[tokio::test(flavor = "multi_thread")]
async fn a_record_whose_runtime_state_is_gone_is_reported_ended_and_removed() {
    within(async {
        let mut d = daemon!();
        let c = d.run("gone", &["sleep", "1000"]).await;
        let cgroups = cgroups_of(c.pid);
        d.crash();
        let out = std::process::Command::new("runc")
            .arg("--root")
            .arg(d.state_dir().join("runtime"))
            .args(["delete", "-f", &c.id])
            .output()
            .expect("runc delete");
        assert!(out.status.success(), "runc delete -f: {out:?}");
        assert!(d.state_file(&c.id).exists());

        let reaped_before_restart = proc_stat(c.pid).is_none();
        d.start_again().await;
        let mut events = d.events().await;
        let status = events.exit_status(&c.id, c.pid).await;
        assert_ended_while_down(status, 137, reaped_before_restart);
        assert!(!d.state_file(&c.id).exists(), "the record was kept");
        assert!(!d.state().await.containers.iter().any(|x| x.id == c.id));
        for dir in &cgroups {
            wait_until(&format!("{} is removed", dir.display()), || !dir.exists()).await;
        }
        let pid = d.create(create_req(&c.id, &c.bundle)).await;
        d.kill_container(&mut events, &c.id, pid).await;
    })
    .await
}

/// DESIGN: an init's `exit` is published as soon as its status is collected, and the runtime's
/// delete follows. A delete that fails does not hold the exit back or keep the container
/// listed; the runtime's leftover is removed by the next start, which frees the id.
#[tokio::test(flavor = "multi_thread")]
async fn a_failed_runtime_delete_still_reports_the_exit_and_the_next_start_removes_the_leftover() {
    within(async {
        let scripts = tempfile::TempDir::new().expect("temp dir");
        let wrapper = write_script(
            scripts.path(),
            "failing-delete-runc",
            &format!(
                "#!/bin/sh\nfor arg in \"$@\"; do\n  [ \"$arg\" = delete ] && {{ echo 'delete refused by the test' >&2; exit 1; }}\ndone\nexec {} \"$@\"\n",
                runc_in_path().display()
            ),
        );
        let mut d = daemon!(Options::args(&["--runtime", &path_str(&wrapper)]));
        let c = d.run("failed-delete", &["sh", "-c", "exit 6"]).await;
        wait_until("the container leaves State", || {
            !d.state_file(&c.id).exists()
        })
        .await;
        assert!(
            d.runtime_ids().contains(&c.id),
            "the failing delete should have left the runtime's state"
        );
        let again = Bundle::new(&["sh", "-c", "read x < /tmp/go; exit 6"]);
        let gate = again.gate("go");
        let id = id("failed-delete-2");
        let mut events = d.events().await;
        let pid = d.create(create_req(&id, &again)).await;
        let _gate = open_gate(&gate);
        assert_eq!(events.exit_status(&id, pid).await, 6, "the exit is published");
        assert!(!d.state().await.containers.iter().any(|x| x.id == id));
        assert!(d.runtime_ids().contains(&id), "the runtime still holds {id}");

        // The next start, with a runtime whose delete works, removes both leftovers.
        d.stop();
        d.start_again().await;
        for leftover in [&c.id, &id] {
            assert!(
                !d.runtime_ids().contains(leftover),
                "{leftover} is still in the runtime after the restart"
            );
        }
        let pid = d.create(create_req(&id, &again)).await;
        let mut events = d.events().await;
        d.kill_container(&mut events, &id, pid).await;
    })
    .await
}

/// A create or restore killed with berthd before the runtime recorded its container leaves the
/// container's directory in the runtime's root without a `state.json` (runc's `exec.fifo`, or
/// the rootfs its restore bind-mounts at `criu-root`): the runtime does not list it, berthd
/// never deletes an id the runtime does not list, and the runtime refuses the id for good. The
/// next start removes it, unmounting what is mounted in it and never removing what the mount
/// showed, and the id can be created again.
#[tokio::test(flavor = "multi_thread")]
async fn a_runtime_directory_no_container_was_recorded_in_is_removed_at_restart_and_its_id_is_free()
{
    within(async {
        let mut d = daemon!();
        let bundle = Bundle::new(&["sleep", "1000"]);
        let id = id("stateless");
        d.stop();
        let dir = d.state_dir().join("runtime").join(&id);
        std::fs::create_dir_all(dir.join("criu-root")).expect("make the runtime directory");
        let fifo = std::process::Command::new("mkfifo")
            .arg(dir.join("exec.fifo"))
            .status()
            .expect("mkfifo");
        assert!(fifo.success());
        let mounted = std::process::Command::new("mount")
            .arg("--bind")
            .arg(bundle.path().join("rootfs"))
            .arg(dir.join("criu-root"))
            .status()
            .expect("mount --bind");
        assert!(mounted.success());
        // Cut off an hour ago: a directory changed within the runtime bound may still be a
        // create's of the previous berthd at work, and is left to the next start.
        let backdated = std::process::Command::new("touch")
            .args(["-m", "-d", "1 hour ago"])
            .arg(&dir)
            .status()
            .expect("touch");
        assert!(backdated.success());
        // One just made: as a create the previous berthd gave up on, still at work, would have
        // it. It is looked at again once such a create is past the runtime bound.
        let young_id = crate::common::id("stateless-young");
        let young = d.state_dir().join("runtime").join(&young_id);
        std::fs::create_dir_all(&young).expect("make the runtime directory");
        std::fs::write(young.join("exec.fifo"), b"").expect("plant a file");

        // The bound is longer than berthd may take to start (and so to look at the directories)
        // in start_again, so the young one is young at that look.
        d.start_again_with(Options::args(&["--runtime-timeout", "15"]))
            .await;
        assert!(
            young.exists(),
            "a directory changed just now was removed at once"
        );
        // Its id is refused meanwhile saying why, not with the runtime's "already exists"
        // about a container State does not know.
        let refused = d
            .client
            .create_container(create_req(&young_id, &bundle))
            .await;
        let message = expect_code(refused, tonic::Code::FailedPrecondition);
        assert!(
            message.contains("cut off when berthd last stopped"),
            "{message}"
        );
        let mountinfo = std::fs::read_to_string("/proc/self/mountinfo").expect("mountinfo");
        assert!(
            !mountinfo.contains(&*dir.to_string_lossy()),
            "the rootfs is still mounted in {}",
            dir.display()
        );
        assert!(!dir.exists(), "{} is left", dir.display());
        assert!(
            bundle.path().join("rootfs/bin/busybox").exists(),
            "what the mount showed was removed"
        );
        let mut events = d.events().await;
        let pid = d.create(create_req(&id, &bundle)).await;
        d.kill_container(&mut events, &id, pid).await;

        let deadline = Instant::now() + Duration::from_secs(60);
        while young.exists() {
            assert!(
                Instant::now() < deadline,
                "{} is never removed",
                young.display()
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        let pid = d.create(create_req(&young_id, &bundle)).await;
        d.kill_container(&mut events, &young_id, pid).await;
    })
    .await
}

/// A create cut off by berthd's death that the runtime finishes after the next start (a
/// `createRuntime` hook held it while berthd restarted): its container is deleted once the
/// runtime bound has passed, not left running with no record, no events and its id refused
/// for good; then the id can be created again.
#[tokio::test(flavor = "multi_thread")]
async fn a_create_cut_off_by_a_crash_that_finishes_after_the_restart_is_deleted() {
    within(async {
        if builtin_runtime() {
            return;
        }
        let bound = ["--runtime-timeout", "5"];
        let mut d = daemon!(Options::args(&bound));
        let bundle = Bundle::new(&["sleep", "1000"]);
        bundle.edit(|c| {
            c["hooks"] = serde_json::json!({
                "createRuntime": [{"path": BUSYBOX, "args": ["busybox", "sleep", "2"]}]
            });
        });
        let id = id("finished-late");
        let mut client = d.client.clone();
        let request = create_req(&id, &bundle);
        let create = tokio::spawn(async move { client.create_container(request).await });
        let runtime_dir = d.state_dir().join("runtime").join(&id);
        poll_until(
            Duration::from_secs(2),
            Duration::from_millis(5),
            "the runtime never began the create",
            || runtime_dir.exists(),
        )
        .await;
        d.crash();
        let _ = create.await;
        d.start_again_with(Options::args(&bound)).await;

        let deadline = Instant::now() + Duration::from_secs(20);
        poll_until(
            Duration::from_secs(20),
            Duration::from_millis(50),
            "the cut-off create never finished",
            || d.runtime_ids().contains(&id),
        )
        .await;
        poll_until(
            deadline.saturating_duration_since(Instant::now()),
            Duration::from_millis(100),
            "the container of the cut-off create is left in the runtime",
            || !d.runtime_ids().contains(&id),
        )
        .await;
        d.assert_gone(&id).await;
        let mut events = d.events().await;
        bundle.edit(|c| {
            c.as_object_mut().unwrap().remove("hooks");
        });
        let pid = d.create(create_req(&id, &bundle)).await;
        d.kill_container(&mut events, &id, pid).await;
    })
    .await
}
