//! A container's first instant, under the default create mode (one `run --detach`, after which
//! the init may already have exited when berthd tracks it) and under `--create-mode
//! create-start`: true exit codes, an OOM kill before registration, a terminal.

use std::path::{Path, PathBuf};

use crate::common::*;

/// Rounds per case: the race between the init's exit and its registration does not show every
/// time.
const ROUNDS: usize = 20;

/// Writes, in `dir`, a runtime that is real runc but lingers half a second after `run`: berthd
/// registers the init only after that, when an init that ends at once has long been a zombie
/// (berthd's child, seen by its orphan sweep; on cgroup v1 shown in the roots by `/proc`).
fn late_runtime(dir: &Path) -> PathBuf {
    let body = format!(
        "#!/bin/sh\n{} \"$@\"\nrc=$?\nfor arg in \"$@\"; do\n  [ \"$arg\" = run ] && sleep 0.5\ndone\nexit $rc\n",
        runc_in_path().display()
    );
    write_script(dir, "late-runc", &body)
}

/// An init that fills its 16 MiB limit at once: the OOM killer kills it (137).
fn oom_bundle() -> Bundle {
    let bundle = Bundle::new(&[
        "sh",
        "-c",
        "x=$(busybox head -c 67108864 /dev/zero | busybox tr '\\0' x); echo survived",
    ]);
    bundle.edit(|c| {
        c["linux"]["resources"]["memory"] = serde_json::json!({"limit": 16 * 1024 * 1024});
    });
    bundle
}

/// Creates `rounds` containers of [`oom_bundle`] and expects `oom`, then `exit` 137, for each.
async fn each_oom_then_exit_137(d: &mut Daemon, name: &str, rounds: usize) {
    let bundle = oom_bundle();
    let mut events = d.events().await;
    for round in 0..rounds {
        let id = id(&format!("{name}-{round}"));
        let pid = d.create(create_req(&id, &bundle)).await;
        let first = events
            .wait_for("start-container, oom or exit", |e| {
                e.id == id && ["start-container", "oom", "exit"].contains(&e.r#type.as_str())
            })
            .await;
        assert_eq!(
            first.r#type, "start-container",
            "round {round}: an event before start-container: {first:?}"
        );
        let first = events
            .wait_for("oom or exit", |e| {
                e.id == id && (e.r#type == "oom" || e.r#type == "exit")
            })
            .await;
        assert_eq!(
            first.r#type, "oom",
            "round {round}: exit before oom: {first:?}"
        );
        assert_eq!(first.pid, pid);
        assert_eq!(events.exit_status(&id, pid).await, 137, "round {round}");
        d.assert_gone(&id).await;
    }
    d.assert_no_zombies().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn true_at_once_exits_0() {
    within(async {
        let mut d = daemon!();
        let bundle = Bundle::new(&["true"]);
        each_exits_with(&mut d, "first-true", &bundle, 0, ROUNDS).await;
    })
    .await
}

#[tokio::test(flavor = "multi_thread")]
async fn exit_7_at_once_exits_7() {
    within(async {
        let mut d = daemon!();
        let bundle = Bundle::new(&["sh", "-c", "exit 7"]);
        each_exits_with(&mut d, "first-exit7", &bundle, 7, ROUNDS).await;
    })
    .await
}

#[tokio::test(flavor = "multi_thread")]
async fn killed_by_a_signal_at_once_exits_128_plus_it() {
    within(async {
        let mut d = daemon!();
        let bundle = Bundle::new(&["sh", "-c", "kill -9 $$"]);
        // Without its own pid namespace: the init of one ignores the signals its own processes
        // send it, SIGKILL included, and would exit 0.
        bundle.share_the_hosts_pids();
        each_exits_with(&mut d, "first-kill9", &bundle, 137, ROUNDS).await;
    })
    .await
}

#[tokio::test(flavor = "multi_thread")]
async fn a_container_sharing_the_hosts_pids_sees_its_own_memory_cgroup() {
    within(async {
        let mut d = daemon!();
        // Its own pid is a host pid: in its own cgroup's cgroup.procs (v1 memory, else v2).
        let bundle = Bundle::new(&[
            "sh",
            "-c",
            "for f in /sys/fs/cgroup/memory/cgroup.procs /sys/fs/cgroup/cgroup.procs; do [ -f $f ] && { grep -qx $$ $f; exit $?; }; done; exit 2",
        ]);
        bundle.share_the_hosts_pids();
        each_exits_with(&mut d, "host-pids-cgroup", &bundle, 0, 1).await;
    })
    .await
}

#[tokio::test(flavor = "multi_thread")]
async fn an_oom_kill_in_the_first_instant_gives_oom_then_exit_137() {
    within(async {
        let mut d = daemon!();
        // No gate: the kill may come before berthd registers the init or after.
        each_oom_then_exit_137(&mut d, "first-oom", 3).await;
    })
    .await
}

/// A container's process killed by the OOM killer in its first instant while the init lives
/// on: `oom` comes when the cgroup counts the kill, not with the init's exit. Each round starts
/// right after the exit of the round before, whose cgroup removal also wakes the OOM watch
/// (cgroup v1): a kill during that wake-up's looks was missed until the init exited.
#[tokio::test(flavor = "multi_thread")]
async fn an_oom_kill_in_the_first_instant_is_published_while_the_init_lives_on() {
    within(async {
        let mut d = daemon!();
        let bundle = Bundle::new(&[
            "sh",
            "-c",
            "busybox dd if=/dev/zero of=/dev/null bs=64M count=1; exec sleep 1000",
        ]);
        bundle.edit(|c| {
            c["linux"]["resources"]["memory"] = serde_json::json!({"limit": 16 * 1024 * 1024});
        });
        let mut events = d.events().await;
        for round in 0..8 {
            let id = id(&format!("oom-lives-on-{round}"));
            let pid = d.create(create_req(&id, &bundle)).await;
            let first = events
                .wait_for("oom or exit", |e| {
                    e.id == id && (e.r#type == "oom" || e.r#type == "exit")
                })
                .await;
            assert_eq!(
                (first.r#type.as_str(), first.pid),
                ("oom", pid),
                "round {round}: {first:?}"
            );
            d.kill_container(&mut events, &id, pid).await;
        }
    })
    .await
}

/// Eight at once, as an agent starting a batch does: each container's events are
/// `start-container`, `oom`, `exit` 137, in that order, whichever of their kills comes first.
#[tokio::test(flavor = "multi_thread")]
async fn concurrent_creates_killed_by_oom_at_once_each_start_then_oom_then_exit() {
    const AT_ONCE: usize = 8;
    within(async {
        let mut d = daemon!();
        let bundle = oom_bundle();
        for round in 0..2 {
            let mut events = d.events().await;
            let mut creates = tokio::task::JoinSet::new();
            for n in 0..AT_ONCE {
                let mut client = d.connect().await;
                let req = create_req(&id(&format!("oom-batch-{round}-{n}")), &bundle);
                creates.spawn(async move { create(&mut client, req).await });
            }
            creates.join_all().await;
            let mut seen = std::collections::HashMap::<String, Vec<String>>::new();
            while seen
                .values()
                .filter(|kinds| kinds.iter().any(|k| k.starts_with("exit")))
                .count()
                < AT_ONCE
            {
                let event = events.next().await;
                if event.id.contains("oom-batch-") {
                    let kind = match event.r#type.as_str() {
                        "exit" => format!("exit {}", event.status),
                        other => other.to_owned(),
                    };
                    seen.entry(event.id).or_default().push(kind);
                }
            }
            for (id, kinds) in &seen {
                assert_eq!(
                    kinds,
                    &["start-container", "oom", "exit 137"],
                    "round {round}: {id}"
                );
            }
        }
        d.assert_no_zombies().await;
    })
    .await
}

/// The same two guarantees where registration is surely late: the init is a zombie (exited,
/// or killed by the OOM killer) for half a second before berthd tracks it.
#[tokio::test(flavor = "multi_thread")]
async fn an_init_dead_long_before_registration_keeps_its_code_and_its_oom() {
    within(async {
        let scripts = tempfile::TempDir::new().expect("temp dir");
        let late = late_runtime(scripts.path());
        let mut d = daemon!(Options::args(&["--runtime", &path_str(&late)]));
        let bundle = Bundle::new(&["sh", "-c", "exit 7"]);
        each_exits_with(&mut d, "late-exit7", &bundle, 7, 3).await;
        each_oom_then_exit_137(&mut d, "late-oom", 3).await;
    })
    .await
}

#[tokio::test(flavor = "multi_thread")]
async fn a_terminal_init_that_writes_and_exits_at_once_is_relayed_whole() {
    within(async {
        let mut d = daemon!();
        let bundle = Bundle::new(&["sh", "-c", "[ -t 1 ] && echo tty-up; exit 3"]);
        bundle.edit(|c| c["process"]["terminal"] = true.into());
        let mut events = d.events().await;
        for round in 0..5 {
            let id = id(&format!("first-tty-{round}"));
            let out = d.dir().join(format!("out-{round}"));
            mkfifo(&out);
            let mut reader = Reader::open(&out);
            let mut req = create_req(&id, &bundle);
            req.stdout = path_str(&out);
            let pid = d.create(req).await;
            // The terminal passes "\r\n" for the newline on in a write of its own, so it can
            // arrive after "tty-up": wait for both, or time out if the relay lost the tail.
            let text = reader.read_until("tty-up\r\n").await;
            assert_eq!(text, "tty-up\r\n", "round {round}");
            assert_eq!(events.exit_status(&id, pid).await, 3, "round {round}");
            d.assert_gone(&id).await;
        }
        d.assert_no_zombies().await;
    })
    .await
}

#[tokio::test(flavor = "multi_thread")]
async fn create_start_mode_still_creates_runs_and_reports_codes() {
    within(async {
        let mut d = daemon!(Options::args(&["--create-mode", "create-start"]));
        let bundle = Bundle::new(&["sh", "-c", "exit 7"]);
        each_exits_with(&mut d, "cs-exit7", &bundle, 7, 5).await;
        let mut events = d.events().await;
        let ctr = d.run("cs-sleep", &["sleep", "1000"]).await;
        let listed = d.state().await;
        let container = listed
            .containers
            .iter()
            .find(|c| c.id == ctr.id)
            .expect("listed");
        assert_eq!(container.status, "running");
        assert_eq!(container.processes[0].pid, ctr.pid);
        d.kill_container(&mut events, &ctr.id, ctr.pid).await;
    })
    .await
}
