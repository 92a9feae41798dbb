//! Exits before clean-up (DESIGN: an init's `exit` is published as soon as its status is
//! collected; the runtime's delete and the state file's removal follow, and the id stays taken
//! until they are done; README: the deletes wait for a lull in the exits): an id can be created
//! again at once after its exit event, even while other exits hold the deletes back, the clean-up
//! of the old container never touches the new one, many exits at once all arrive and leave
//! nothing behind, and the state files stay atomic across a crash.

use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, Instant};

use crate::common::*;
use berth_api::proto::{Stats, StatsRequest};
use tonic::Code;

/// How long a create waits for the clean-up of an exited container of the same id (README).
const CLEANUP_WAIT: Duration = Duration::from_secs(5);

/// One sample of container `id`'s stats: its stats registration is intact.
async fn one_sample(client: &mut Client, id: &str) -> Stats {
    let mut stream = client
        .get_stats(StatsRequest { id: id.to_owned() })
        .await
        .unwrap_or_else(|status| panic!("GetStats {id}: {status:?}"))
        .into_inner();
    match tokio::time::timeout(EVENT_TIMEOUT, stream.message()).await {
        Ok(Ok(Some(stats))) => stats,
        other => panic!("no stats sample of {id}: {other:?}"),
    }
}

/// The init pid the state file of `id` records.
fn recorded_init(d: &Daemon, id: &str) -> u64 {
    let record: serde_json::Value =
        serde_json::from_slice(&std::fs::read(d.state_file(id)).expect("state file"))
            .expect("state file is JSON");
    record["init"]["pid"].as_u64().expect("init pid recorded")
}

/// The container `id` runs init `pid`, alive and everywhere berthd keeps it: State, its record,
/// the runtime, its stats.
async fn assert_intact(d: &mut Daemon, id: &str, pid: u32) {
    assert!(proc_stat(pid).is_some(), "init {pid} of {id} is alive");
    let state = d.state().await;
    let listed = state
        .containers
        .iter()
        .find(|c| c.id == id)
        .unwrap_or_else(|| panic!("State lists {id}"));
    assert_eq!(listed.status, "running");
    assert_eq!(listed.processes.first().map(|p| p.pid), Some(pid));
    assert_eq!(
        recorded_init(d, id),
        u64::from(pid),
        "the record is the new container's"
    );
    assert!(
        d.runtime_ids().contains(&id.to_owned()),
        "the runtime holds {id}"
    );
    let stats = one_sample(&mut d.client, id).await;
    assert!(stats.cgroup_stats.is_some(), "stats of {id}: {stats:?}");
}

/// Waits until the runtime no longer holds `id` (a delete slowed down by the test).
async fn wait_for_delete(d: &Daemon, id: &str) {
    let deadline = Instant::now() + Duration::from_secs(15);
    while d.runtime_ids().contains(&id.to_owned()) {
        assert!(
            Instant::now() < deadline,
            "the delete of {id} never finished"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// The id of a container whose exit was just published is created again at once (the create
/// waits for the old clean-up, never fails), ten times over; each new container is left alone by
/// its predecessor's clean-up: still running, listed, recorded, in the runtime, with stats.
#[tokio::test(flavor = "multi_thread")]
async fn an_id_is_created_again_right_after_its_exit_and_the_old_cleanup_leaves_it_alone() {
    within(async {
        let mut d = daemon!(Options::args(&["--stats-interval", "100ms"]));
        let mut events = d.events().await;
        let bundle = Bundle::new(&["sleep", "1000"]);
        let id = id("again");
        let mut pid = d.create(create_req(&id, &bundle)).await;
        for round in 0..10 {
            d.signal(&id, pid, SIGKILL).await;
            assert_eq!(events.exit_status(&id, pid).await, 137, "round {round}");
            let again = d.create(create_req(&id, &bundle)).await;
            assert_ne!(again, pid, "round {round}");
            // The old container's delete and record removal are done (the create waited for
            // them); give anything that would still touch the id a moment to do so.
            tokio::time::sleep(Duration::from_millis(200)).await;
            assert_intact(&mut d, &id, again).await;
            pid = again;
        }
        d.kill_container(&mut events, &id, pid).await;
        d.assert_no_zombies().await;
    })
    .await
}

/// While an exited container's runtime delete runs, State does not list it and a create of its
/// id waits for the delete; a delete slower than the create's bound gives UNAVAILABLE (and leaves
/// nothing of the refused create), after which the id is free again.
#[tokio::test(flavor = "multi_thread")]
async fn a_create_waits_for_the_delete_of_its_id_within_a_bound() {
    within(async {
        let scripts = tempfile::TempDir::new().expect("temp dir");
        let slow = delayed_runtime(scripts.path(), "delete", 2);
        let mut d = daemon!(Options::args(&["--runtime", &path_str(&slow)]));
        let mut events = d.events().await;
        let bundle = Bundle::new(&["sleep", "1000"]);
        let id = id("waits");
        let pid = d.create(create_req(&id, &bundle)).await;
        d.signal(&id, pid, SIGKILL).await;
        let killed = Instant::now();
        assert_eq!(events.exit_status(&id, pid).await, 137);
        assert!(
            killed.elapsed() < Duration::from_millis(1500),
            "the exit came after the 2 s delete: {:?}",
            killed.elapsed()
        );
        assert!(
            d.state().await.containers.iter().all(|c| c.id != id),
            "State lists a container whose exit was published"
        );
        let again = d.create(create_req(&id, &bundle)).await;
        assert!(
            killed.elapsed() >= Duration::from_secs(2),
            "the create did not wait for the delete: {:?}",
            killed.elapsed()
        );
        assert_intact(&mut d, &id, again).await;
        d.kill_container(&mut events, &id, again).await;
        d.stop();

        let slower = delayed_runtime(scripts.path(), "delete", 8);
        d.start_again_with(Options::args(&["--runtime", &path_str(&slower)]))
            .await;
        let mut events = d.events().await;
        let pid = d.create(create_req(&id, &bundle)).await;
        d.signal(&id, pid, SIGKILL).await;
        assert_eq!(events.exit_status(&id, pid).await, 137);
        let asked = Instant::now();
        let refused = d.client.create_container(create_req(&id, &bundle)).await;
        let message = expect_code(refused, Code::Unavailable);
        assert!(
            message.contains(&id) && message.contains("try again"),
            "{message}"
        );
        assert!(asked.elapsed() >= CLEANUP_WAIT, "{:?}", asked.elapsed());
        assert!(d.state().await.containers.is_empty());
        wait_for_delete(&d, &id).await;
        let again = d.create(create_req(&id, &bundle)).await;
        assert_intact(&mut d, &id, again).await;
        d.signal(&id, again, SIGKILL).await;
        assert_eq!(events.exit_status(&id, again).await, 137);
        // Its slow delete must finish before the test's berthd goes, or its cgroup is left.
        wait_for_delete(&d, &id).await;
        d.assert_no_zombies().await;
    })
    .await
}

/// A create waiting for its id's clean-up is not behind the other deletes of a burst of exits:
/// with one runtime turn and deletes of a second each, fifteen exits at once queue fifteen
/// seconds of deletes, yet the id whose exit came last is created again within the create's
/// wait (5 s), its delete moved to a queue of its own (runtime turns).
#[tokio::test(flavor = "multi_thread")]
async fn a_create_waiting_for_its_id_is_not_behind_a_bursts_deletes() {
    within(async {
        const COUNT: usize = 15;
        let scripts = tempfile::TempDir::new().expect("temp dir");
        let slow = path_str(&delayed_runtime(scripts.path(), "delete", 1));
        let flags = ["--runtime", &slow, "--max-runtime-processes", "1"];
        let mut d = daemon!(Options::args(&flags));
        let mut events = d.events().await;
        let bundle = Bundle::new(&["sleep", "1000"]);
        let burst: BTreeMap<String, u32> = d
            .create_numbered("queued", COUNT, &bundle)
            .await
            .into_iter()
            .collect();
        kill_at_once(&d, &burst).await;
        let mut exited = Vec::new();
        while exited.len() < COUNT {
            let exit = events
                .wait_for("an exit of the burst", |e| {
                    e.r#type == "exit" && burst.get(&e.id) == Some(&e.pid)
                })
                .await;
            exited.push(exit.id);
        }
        // Past the lull: every delete has been let go and waits for the one turn.
        tokio::time::sleep(Duration::from_millis(300)).await;
        let last = exited.last().expect("exits").clone();
        let again = d.create(create_req(&last, &bundle)).await;
        let mut left: Vec<&String> = burst.keys().filter(|id| **id != last).collect();
        let in_runtime = d.runtime_ids();
        assert!(
            left.iter().any(|id| in_runtime.contains(id)),
            "the other deletes were all done before the create: nothing was queued ahead of it"
        );
        assert_intact(&mut d, &last, again).await;
        // The queued deletes must finish before the test's berthd goes, or cgroups are left:
        // a second or more each, one at a time.
        let deadline = Instant::now() + Duration::from_secs(60);
        while !left.is_empty() {
            let in_runtime = d.runtime_ids();
            left.retain(|id| in_runtime.contains(id));
            assert!(
                Instant::now() < deadline,
                "deletes never finished: {left:?}"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        d.kill_container(&mut events, &last, again).await;
        d.assert_no_zombies().await;
    })
    .await
}

/// Sends SIGKILL to every init of `inits` (id → pid) at once.
async fn kill_at_once(d: &Daemon, inits: &BTreeMap<String, u32>) {
    let kills = inits.iter().map(|(id, pid)| {
        let mut client = d.client.clone();
        async move { send_signal(&mut client, id, *pid, SIGKILL).await }
    });
    futures_util::future::join_all(kills).await;
}

/// The deletes after exits that come close together wait for a lull in the exits (README), but
/// not for a create of their id: while other containers keep exiting, one every 20 ms, an exited
/// container's id is created again before they stop and before the longest hold (2 s) could have
/// let its old delete go (it went at once, not after the lull).
#[tokio::test(flavor = "multi_thread")]
async fn a_create_of_an_exited_id_does_not_wait_for_the_exits_to_pause() {
    within(async {
        // More exits than 2 s holds at one every 20 ms: the burst outlasts the longest hold, and
        // ends early once the create is answered.
        const COUNT: usize = 110;
        const MAX_HOLD: Duration = Duration::from_secs(2);
        let mut d = daemon!();
        let mut events = d.events().await;
        let bundle = Bundle::new(&["sleep", "1000"]);
        let burst = d.create_numbered("lull", COUNT, &bundle).await;
        // The second: the first exit of a burst is lone, its delete not held.
        let (again_id, again_pid) = burst[1].clone();
        let mut client = d.client.clone();
        let (answered, mut answer_seen) = tokio::sync::watch::channel(false);
        let kills = tokio::spawn(async move {
            let mut left = burst.into_iter();
            for (id, pid) in left.by_ref() {
                send_signal(&mut client, &id, pid, SIGKILL).await;
                tokio::time::sleep(Duration::from_millis(20)).await;
                if *answer_seen.borrow_and_update() {
                    break;
                }
            }
            left.collect::<Vec<_>>()
        });
        assert_eq!(events.exit_status(&again_id, again_pid).await, 137);
        let exited = Instant::now();
        let again = d.create(create_req(&again_id, &bundle)).await;
        let took = exited.elapsed();
        answered.send_replace(true);
        let spared = kills.await.expect("the kills");
        // A create that waited for the hold would answer some 70 ms after the hold ends (its
        // delete and run), and the test sees the exit a moment after berthd: 200 ms short of
        // the hold keeps the two apart.
        assert!(
            !spared.is_empty() && took < MAX_HOLD - Duration::from_millis(200),
            "the create of {again_id} waited until the exits stopped: answered {took:?} after \
             its exit, with {} of {COUNT} containers not yet killed",
            spared.len()
        );
        let spared: BTreeMap<String, u32> = spared.into_iter().collect();
        kill_at_once(&d, &spared).await;
        let mut exited = BTreeSet::new();
        while exited.len() < spared.len() {
            let event = events.next().await;
            if event.r#type == "exit" && spared.get(&event.id) == Some(&event.pid) {
                exited.insert(event.id);
            }
        }
        assert_intact(&mut d, &again_id, again).await;
        d.kill_container(&mut events, &again_id, again).await;
        d.assert_no_zombies().await;
    })
    .await
}

/// Many containers killed at once: every exit arrives with its status, and all their runtime
/// state, records and cgroups go.
#[tokio::test(flavor = "multi_thread")]
async fn many_containers_killed_at_once_all_report_their_exit_and_leave_nothing() {
    within(async {
        const COUNT: usize = 24;
        let mut d = daemon!();
        let mut events = d.events().await;
        // The first container opens what berthd keeps for all (the OOM watcher).
        let warm = d.run("burst-warm", &["sleep", "1000"]).await;
        d.kill_container(&mut events, &warm.id, warm.pid).await;
        let baseline = d.baseline();
        let bundle = Bundle::new(&["sleep", "1000"]);
        let inits: BTreeMap<String, u32> = d
            .create_numbered("burst", COUNT, &bundle)
            .await
            .into_iter()
            .collect();
        kill_at_once(&d, &inits).await;
        let mut exited = BTreeSet::new();
        while exited.len() < COUNT {
            let event = events.next().await;
            if event.r#type != "exit" {
                continue;
            }
            assert_eq!(inits.get(&event.id), Some(&event.pid), "{event:?}");
            assert_eq!(event.status, 137, "{event:?}");
            assert!(exited.insert(event.id.clone()), "two exits: {event:?}");
        }
        for id in inits.keys() {
            d.assert_gone(id).await;
        }
        assert!(d.runtime_ids().is_empty(), "runtime: {:?}", d.runtime_ids());
        let records = std::fs::read_dir(d.state_dir().join("containers"))
            .expect("containers dir")
            .count();
        assert_eq!(records, 0, "no state file, no temp file left");
        assert_runtime_logs_reused(&d, 2 * COUNT + 2);
        d.assert_settles(&baseline).await;
        d.assert_no_zombies().await;
    })
    .await
}

/// The runtime commands' log files are kept for the next command, empty, rather than made and
/// removed per command: after `commands` commands there are no more of them than commands that
/// can run at once (four per CPU). A runtime program makes its log when it starts; the built-in
/// runtime writes one only to say why it failed.
fn assert_runtime_logs_reused(d: &Daemon, commands: usize) {
    let logs: Vec<_> = std::fs::read_dir(d.state_dir().join("tmp"))
        .expect("scratch dir")
        .map(|entry| entry.unwrap().path())
        .filter(|path| path.extension().is_some_and(|e| e == "log"))
        .collect();
    let at_once = 4 * std::thread::available_parallelism().map_or(1, |n| n.get());
    assert!(
        (builtin_runtime() || !logs.is_empty()) && logs.len() <= at_once,
        "{} log files after {commands} runtime commands, at most {at_once} at once: {logs:?}",
        logs.len()
    );
    for log in &logs {
        let len = std::fs::metadata(log).unwrap().len();
        assert_eq!(len, 0, "{} is not empty", log.display());
    }
}

/// berthd holds a running container's mount and network namespaces, so the kernel does not tear
/// them down in the init's exit (supervisor::exit), and lets go of them with the clean-up after
/// the exit: none is left held.
#[tokio::test(flavor = "multi_thread")]
async fn a_containers_namespaces_are_held_while_it_runs_and_let_go_after_its_exit() {
    within(async {
        let mut d = daemon!();
        let mut events = d.events().await;
        // The first container opens what berthd keeps for all (the OOM watcher).
        let warm = d.run("ns-warm", &["sleep", "1000"]).await;
        d.kill_container(&mut events, &warm.id, warm.pid).await;
        let baseline = d.baseline();
        let c = d.run("ns", &["sleep", "1000"]).await;
        let namespaces = mount_and_network_namespaces(c.pid);
        let host_net = std::fs::read_link("/proc/self/ns/net").expect("our network namespace");
        assert_ne!(
            namespaces[1],
            host_net.to_string_lossy(),
            "the bundle's own netns"
        );
        assert_eq!(
            d.held_namespaces(),
            namespaces,
            "berthd holds the init's mnt and net"
        );
        d.kill_container(&mut events, &c.id, c.pid).await;
        wait_for_delete(&d, &c.id).await;
        d.assert_settles(&baseline).await;
        assert!(d.held_namespaces().is_empty(), "{:?}", d.fds());
        d.assert_no_zombies().await;
    })
    .await
}

/// An exited container's namespaces are let go of before its runtime delete runs (the cgroup
/// removal the delete starts walks every live superblock, which a held mount namespace keeps
/// alive): a wrapper runtime writes down berthd's held namespaces each time it is asked to
/// delete. Two exits back to back, so the second's delete also waits for the lull.
#[tokio::test(flavor = "multi_thread")]
async fn an_exited_containers_namespaces_are_let_go_of_before_its_delete_runs() {
    within(async {
        let scripts = tempfile::TempDir::new().expect("temp dir");
        let log = scripts.path().join("held-at-delete");
        // The runtime's parent is the spawn helper, whose parent is berthd.
        let body = format!(
            r#"#!/bin/sh
for arg in "$@"; do last=$arg; done
for arg in "$@"; do
  if [ "$arg" = delete ]; then
    berthd=$(awk '/^PPid:/ {{ print $2 }}' /proc/$PPID/status)
    held=$(for fd in /proc/$berthd/fd/*; do readlink "$fd"; done | grep -E '^(mnt|net):' | tr '
' ' ')
    printf '%s: %s
' "$last" "$held" >> {log}
  fi
done
exec {runc} "$@"
"#,
            log = log.display(),
            runc = runc_in_path().display()
        );
        let wrapper = write_script(scripts.path(), "recording-runc", &body);
        let mut d = daemon!(Options::args(&["--runtime", &path_str(&wrapper)]));
        let mut events = d.events().await;
        let first = d.run("ns-order-a", &["sleep", "1000"]).await;
        let second = d.run("ns-order-b", &["sleep", "1000"]).await;
        let namespaces = [
            mount_and_network_namespaces(first.pid),
            mount_and_network_namespaces(second.pid),
        ];
        let held = d.held_namespaces();
        for ns in namespaces.iter().flatten() {
            assert!(held.contains(ns), "{ns} not held while running: {held:?}");
        }
        d.signal(&first.id, first.pid, SIGKILL).await;
        d.signal(&second.id, second.pid, SIGKILL).await;
        assert_eq!(events.exit_status(&first.id, first.pid).await, 137);
        assert_eq!(events.exit_status(&second.id, second.pid).await, 137);
        wait_for_delete(&d, &first.id).await;
        wait_for_delete(&d, &second.id).await;
        let recorded = std::fs::read_to_string(&log).expect("the wrapper's record");
        for (container, namespaces) in [&first, &second].into_iter().zip(&namespaces) {
            let prefix = format!("{}: ", container.id);
            let line = recorded
                .lines()
                .find(|l| l.starts_with(&prefix))
                .unwrap_or_else(|| panic!("no delete of {} recorded: {recorded}", container.id));
            for ns in namespaces {
                assert!(
                    !line.contains(ns.as_str()),
                    "{ns} of {} still held when its delete ran: {line}",
                    container.id
                );
            }
        }
        d.assert_no_zombies().await;
    })
    .await
}

/// A write torn by a crash leaves only its temp file (the rename never happened): at restart
/// the temp file is ignored and removed, and the record it would have replaced is adopted.
#[tokio::test(flavor = "multi_thread")]
async fn a_torn_temp_file_is_ignored_at_restart() {
    within(async {
        let mut d = daemon!();
        let c = d.run("torn", &["sleep", "1000"]).await;
        let dir = d.state_dir().join("containers");
        let names = |dir: &std::path::Path| -> Vec<String> {
            let mut names: Vec<String> = std::fs::read_dir(dir)
                .expect("containers dir")
                .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
                .collect();
            names.sort();
            names
        };
        assert_eq!(
            names(&dir),
            [format!("{}.json", c.id)],
            "no temp file beside it"
        );
        d.crash();
        let torn = dir.join(format!(".{}.json.tmp", c.id));
        std::fs::write(&torn, br#"{"id": "torn-by-a-cr"#).expect("write torn temp file");
        let stray = dir.join(".never-renamed.json.tmp");
        std::fs::write(&stray, b"{").expect("write torn temp file");

        d.start_again().await;
        assert!(!torn.exists() && !stray.exists(), "temp files removed");
        let state = d.state().await;
        let adopted = state.containers.iter().find(|x| x.id == c.id);
        assert_eq!(
            adopted.and_then(|x| x.processes.first()).map(|p| p.pid),
            Some(c.pid),
            "the record is adopted: {state:?}"
        );
        assert_eq!(recorded_init(&d, &c.id), u64::from(c.pid));
        let mut events = d.events().await;
        d.kill_container(&mut events, &c.id, c.pid).await;
    })
    .await
}

/// The runtime's delete after an exit runs at berthd's own CPU priority, as a create's runtime
/// does: run nicer, deletes made the teardown slower and the exits no sooner (supervisor::exit).
#[tokio::test(flavor = "multi_thread")]
async fn the_delete_after_an_exit_runs_at_berthds_own_cpu_priority() {
    within(async {
        let scripts = tempfile::TempDir::new().expect("temp dir");
        let niceness = scripts.path().join("niceness");
        let body = format!(
            "#!/bin/sh\nfor arg in \"$@\"; do\n  case $arg in run|delete) echo \"$arg $(nice)\" >> {};; esac\ndone\nexec {} \"$@\"\n",
            niceness.display(),
            runc_in_path().display()
        );
        let runtime = write_script(scripts.path(), "nice-runc", &body);
        let mut d = daemon!(Options::args(&["--runtime", &path_str(&runtime)]));
        let mut events = d.events().await;
        let bundle = Bundle::new(&["sleep", "1000"]);
        let id = id("niced");
        let pid = d.create(create_req(&id, &bundle)).await;
        d.kill_container(&mut events, &id, pid).await;
        d.assert_gone(&id).await;
        let seen = std::fs::read_to_string(&niceness).expect("the runtime noted its niceness");
        let ours = std::process::Command::new("nice").output().expect("nice");
        let ours: i32 = String::from_utf8_lossy(&ours.stdout).trim().parse().unwrap();
        assert_eq!(seen, format!("run {ours}\ndelete {ours}\n"));
    })
    .await
}
