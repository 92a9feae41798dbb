//! README claims that no other test covered: streams ending on stop, pause and resume in the
//! wrong state, AddProcess on a paused container, two creates of one id at once, an init
//! exiting under its added processes, the fds an idle container costs, an exec timeout, and a
//! pty that never arrives.

use berth_api::proto::StatsRequest;
use tonic::Code;

use crate::common::*;
use crate::lifecycle::{freezer_state, update};

/// README: "Streams (Events, GetStats) end with UNAVAILABLE when berthd stops or upgrades".
#[tokio::test(flavor = "multi_thread")]
async fn events_and_stats_streams_end_with_unavailable_when_berthd_stops() {
    within(async {
        let mut d = daemon!(Options::args(&["--stats-interval", "200ms"]));
        let c = d.run("stop-streams", &["sleep", "1000"]).await;
        let mut events = d.events().await;
        let mut stats = d
            .client
            .get_stats(StatsRequest { id: c.id.clone() })
            .await
            .expect("GetStats")
            .into_inner();
        // A first sample: the subscription is live.
        stats.message().await.expect("a sample").expect("a sample");

        let status = d.stop();
        assert!(status.success(), "berthd after SIGTERM: {status}");

        let ended = loop {
            match events.next_result().await {
                Ok(Some(_)) => continue,
                other => break other,
            }
        };
        match ended {
            Err(status) => assert_eq!(status.code(), Code::Unavailable, "Events: {status:?}"),
            Ok(_) => panic!("Events ended with OK, not UNAVAILABLE"),
        }
        let ended = loop {
            match stats.message().await {
                Ok(Some(_)) => continue,
                other => break other,
            }
        };
        match ended {
            Err(status) => assert_eq!(status.code(), Code::Unavailable, "GetStats: {status:?}"),
            Ok(_) => panic!("GetStats ended with OK, not UNAVAILABLE"),
        }
    })
    .await
}

/// A pause that races its container's exit is answered as every other call racing an exit is:
/// NOT_FOUND "has exited" (or done, if it came first), never the runtime's "container not
/// running" as a FAILED_PRECONDITION.
#[tokio::test(flavor = "multi_thread")]
async fn a_pause_racing_the_inits_exit_says_the_container_has_exited() {
    within(async {
        let mut d = daemon!();
        let mut events = d.events().await;
        for round in 0..20 {
            let c = d
                .run(&format!("pause-exit-{round}"), &["sleep", "1000"])
                .await;
            d.signal(&c.id, c.pid, SIGKILL).await;
            let paused = d.client.update_container(update(&c.id, "paused", 0)).await;
            match paused {
                Err(status) => assert_eq!(
                    (status.code(), status.message()),
                    (Code::NotFound, &*format!("container {} has exited", c.id)),
                    "round {round}"
                ),
                // Frozen before the kill took it: it dies once thawed.
                Ok(_) => {
                    let _ = d.client.update_container(update(&c.id, "running", 0)).await;
                }
            }
            assert_eq!(events.exit_status(&c.id, c.pid).await, 137);
            d.assert_gone(&c.id).await;
        }
    })
    .await
}

/// DESIGN: "FailedPrecondition (the state of things forbids it)": pausing a paused container and
/// resuming a running one are refused, and change nothing.
#[tokio::test(flavor = "multi_thread")]
async fn pausing_twice_or_resuming_a_running_container_fails_precondition() {
    within(async {
        let mut d = daemon!();
        let c = d.run("pause-twice", &["sleep", "1000"]).await;
        let mut events = d.events().await;

        let again = d.client.update_container(update(&c.id, "running", 0)).await;
        let message = expect_code(again, Code::FailedPrecondition);
        assert!(message.contains(&c.id), "{message}");
        assert_eq!(freezer_state(c.pid), "THAWED");

        d.client
            .update_container(update(&c.id, "paused", 0))
            .await
            .expect("pause");
        let again = d.client.update_container(update(&c.id, "paused", 0)).await;
        let message = expect_code(again, Code::FailedPrecondition);
        assert!(message.contains(&c.id), "{message}");
        assert_eq!(freezer_state(c.pid), "FROZEN");

        // One pause event, nothing for the refused requests.
        d.client
            .update_container(update(&c.id, "running", SIGKILL))
            .await
            .expect("resume and kill");
        let mut kinds = Vec::new();
        loop {
            let event = events.next().await;
            kinds.push(event.r#type.clone());
            if event.r#type == "exit" {
                assert_eq!((event.pid, event.status), (c.pid, 137));
                break;
            }
        }
        assert_eq!(kinds, ["pause", "resume", "exit"]);
        d.assert_gone(&c.id).await;
        d.assert_no_zombies().await;
    })
    .await
}

/// AddProcess on a paused container is refused (it could not start in a frozen cgroup), and
/// leaves nothing; after resume it works.
#[tokio::test(flavor = "multi_thread")]
async fn add_process_on_a_paused_container_fails_precondition_and_leaves_nothing() {
    within(async {
        let mut d = daemon!();
        let c = d.run("exec-paused", &["sleep", "1000"]).await;
        let mut events = d.events().await;
        d.client
            .update_container(update(&c.id, "paused", 0))
            .await
            .expect("pause");
        let baseline = d.baseline();

        let refused = d.client.add_process(exec_req(&c.id, &["/bin/true"])).await;
        let message = expect_code(refused, Code::FailedPrecondition);
        assert!(message.contains("paused"), "{message}");
        let st = d.state().await;
        let listed = st.containers.iter().find(|x| x.id == c.id).expect("listed");
        let pids: Vec<u32> = listed.processes.iter().map(|p| p.pid).collect();
        assert_eq!(pids, [c.pid], "only the init");
        d.assert_settles(&baseline).await;

        d.client
            .update_container(update(&c.id, "running", 0))
            .await
            .expect("resume");
        let added = d.exec(exec_req(&c.id, &["/bin/true"])).await;
        assert_eq!(events.exit_status(&c.id, added).await, 0);
        d.signal(&c.id, c.pid, SIGKILL).await;
        assert_eq!(events.exit_status(&c.id, c.pid).await, 137);
        d.assert_gone(&c.id).await;
        d.assert_no_zombies().await;
    })
    .await
}

/// Two CreateContainer requests for one id at once: one wins, the other gets ALREADY_EXISTS,
/// and only the winner's container exists; once it is gone nothing of either is left.
#[tokio::test(flavor = "multi_thread")]
async fn two_concurrent_creates_of_one_id_one_wins_and_nothing_leaks() {
    within(async {
        let mut d = daemon!();
        // Warm-up: what berthd opens lazily on its first container is not a leak.
        let warm = d.run("race-warm-up", &["sleep", "1000"]).await;
        let mut events = d.events().await;
        // Gone from the runtime too: its delete follows its exit, after a lull (exit).
        d.kill_container(&mut events, &warm.id, warm.pid).await;
        d.assert_no_zombies().await;
        let baseline = d.baseline();

        let id = id("race");
        let (first, second) = (
            Bundle::new(&["sleep", "1000"]),
            Bundle::new(&["sleep", "1000"]),
        );
        let (mut a, mut b) = (d.connect().await, d.connect().await);
        let (ra, rb) = tokio::join!(
            a.create_container(create_req(&id, &first)),
            b.create_container(create_req(&id, &second)),
        );
        let (winner, bundle, loser) = match (ra, rb) {
            (Ok(won), Err(lost)) => (won.into_inner().pid, &first, lost),
            (Err(lost), Ok(won)) => (won.into_inner().pid, &second, lost),
            (ra, rb) => panic!("expected one success and one failure: {ra:?}, {rb:?}"),
        };
        assert_eq!(loser.code(), Code::AlreadyExists, "{loser:?}");
        assert_eq!(d.runtime_ids(), vec![id.clone()]);
        let st = d.state().await;
        let listed: Vec<_> = st.containers.iter().filter(|c| c.id == id).collect();
        assert_eq!(listed.len(), 1);
        assert_eq!(listed[0].bundle_path, bundle.path_str());
        assert_eq!(listed[0].processes[0].pid, winner);

        d.signal(&id, winner, SIGKILL).await;
        assert_eq!(events.exit_status(&id, winner).await, 137);
        drop((a, b));
        d.assert_nothing_left(&id, &baseline).await;
    })
    .await
}

/// When the init exits while added processes run, the kernel ends them with it (they share its
/// pid namespace): each one's exit is reported (killed, 137), and the init's own code, and the
/// container is gone with nothing left.
#[tokio::test(flavor = "multi_thread")]
async fn an_init_exiting_under_running_added_processes_reports_every_exit() {
    within(async {
        let mut d = daemon!();
        // Repeated: the order in which berthd handles the exits varies from run to run.
        for round in 0..10 {
            let bundle = Bundle::new(&["sh", "-c", "read x < /tmp/stop; exit 5"]);
            let gate = bundle.gate("stop");
            let id = id(&format!("init-first-{round}"));
            let mut events = d.events().await;
            let init = d.create(create_req(&id, &bundle)).await;
            let mut added = Vec::new();
            for _ in 0..3 {
                added.push(d.exec(exec_req(&id, &["/bin/sleep", "1000"])).await);
            }
            let _gate = open_gate(&gate);

            let mut exits = Vec::new();
            while exits.len() < added.len() + 1 {
                let event = events
                    .wait_for("an exit", |e| e.r#type == "exit" && e.id == id)
                    .await;
                exits.push((event.pid, event.status));
            }
            let status_of = |pid: u32| exits.iter().find(|(p, _)| *p == pid).map(|(_, s)| *s);
            assert_eq!(
                status_of(init),
                Some(5),
                "round {round}, the init: {exits:?}"
            );
            for &pid in &added {
                assert_eq!(status_of(pid), Some(137), "round {round}, {pid}: {exits:?}");
            }
            d.assert_gone(&id).await;
            d.assert_no_zombies().await;
            for pid in added.iter().chain([&init]) {
                assert!(proc_stat(*pid).is_none(), "{pid} is still there");
            }
        }
    })
    .await
}

/// README: an idle container costs berthd its pidfd and the two fds holding its init's mount and
/// network namespaces (OOM kills are watched through one eventfd, or one inotify instance, for
/// all containers), and a container's stats files are opened with its first GetStats subscriber
/// and closed after its last.
#[tokio::test(flavor = "multi_thread")]
async fn an_idle_container_holds_three_fds_and_stats_files_close_after_the_last_subscriber() {
    within(async {
        let mut d = daemon!(Options::args(&["--stats-interval", "100ms"]));
        // A first container warms up whatever berthd opens once (the runtime's log dir, the
        // OOM eventfd or inotify instance all containers share, …).
        let start = d.fds();
        let warm = d.run("fds-warm", &["sleep", "1000"]).await;
        let before = d.fds();
        let c = d.run("fds-idle", &["sleep", "1000"]).await;
        let added: Vec<String> = multiset_minus(&d.fds(), &before)
            .into_iter()
            .map(|fd| match fd.split_once(":[") {
                Some((kind @ ("mnt" | "net"), _)) => kind.to_owned(),
                _ => fd,
            })
            .collect();
        assert_eq!(
            added,
            ["anon_inode:[pidfd]", "mnt", "net"],
            "the fds one idle container costs berthd"
        );
        let oom_watchers = multiset_minus(&d.fds(), &start)
            .into_iter()
            .filter(|fd| fd == "anon_inode:[eventfd]" || fd == "anon_inode:inotify")
            .count();
        assert_eq!(oom_watchers, 1, "one OOM watcher for both containers");

        let idle = d.fds();
        let mut streams = Vec::new();
        for _ in 0..2 {
            let mut client = d.connect().await;
            let mut stream = client
                .get_stats(StatsRequest { id: c.id.clone() })
                .await
                .expect("GetStats")
                .into_inner();
            stream.message().await.expect("a sample").expect("a sample");
            streams.push((client, stream));
        }
        let cgroup_files: Vec<String> = multiset_minus(&d.fds(), &idle)
            .into_iter()
            .filter(|fd| fd.starts_with("/sys/fs/cgroup/"))
            .collect();
        assert!(
            !cgroup_files.is_empty(),
            "a subscribed container has no cgroup file open"
        );
        streams.pop();
        // One subscriber is left: the files stay open for it.
        streams[0]
            .1
            .message()
            .await
            .expect("a sample")
            .expect("a sample");
        let open = d.fds();
        for file in &cgroup_files {
            assert!(
                open.contains(file),
                "{file} closed while a subscriber is left"
            );
        }
        streams.clear();
        let deadline = std::time::Instant::now() + SETTLE;
        loop {
            let still: Vec<String> = multiset_minus(&d.fds(), &idle)
                .into_iter()
                .filter(|fd| fd.starts_with("/sys/fs/cgroup/"))
                .collect();
            if still.is_empty() {
                break;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "stats files still open after the last subscriber left: {still:?}"
            );
            tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        }
        let mut events = d.events().await;
        d.kill_container(&mut events, &c.id, c.pid).await;
        d.kill_container(&mut events, &warm.id, warm.pid).await;
    })
    .await
}

/// README: "a runtime command running longer is killed (with what it started) and its request
/// fails with DEADLINE_EXCEEDED" — for AddProcess too: the container keeps running with only its
/// init, and no runtime process is left.
#[tokio::test(flavor = "multi_thread")]
async fn an_exec_that_outlives_the_runtime_timeout_fails_and_leaves_the_container_as_it_was() {
    within(async {
        let scripts = tempfile::TempDir::new().expect("temp dir");
        let wrapper = slow_runtime(scripts.path(), "exec", 30);
        let flags = ["--runtime", &path_str(&wrapper), "--runtime-timeout", "2"];
        let mut d = daemon!(Options::args(&flags));
        let c = d.run("exec-timeout", &["sleep", "1000"]).await;
        let baseline = d.baseline();
        let result = d
            .client
            .add_process(exec_req(&c.id, &["sleep", "1000"]))
            .await;
        expect_code(result, Code::DeadlineExceeded);
        let sleepers = slow_starts(d.pid(), 30);
        assert!(
            sleepers.is_empty(),
            "the timed-out exec still runs: {sleepers:?}"
        );
        let state = d.state().await;
        let container = state
            .containers
            .iter()
            .find(|x| x.id == c.id)
            .expect("the container is still listed");
        let pids: Vec<u32> = container.processes.iter().map(|p| p.pid).collect();
        assert_eq!(pids, [c.pid], "processes after the timed-out exec");
        assert_eq!(
            d.children(),
            [c.pid].into_iter().collect(),
            "berthd's children"
        );
        d.assert_settles(&baseline).await;
        let mut events = d.events().await;
        d.kill_container(&mut events, &c.id, c.pid).await;
    })
    .await
}

/// README: a terminal's pty master is taken "on a console socket"; a runtime that never hands it
/// over fails the create once the console wait runs out (10 s), and leaves nothing: no runtime
/// state, no registry entry, no process. The runtime here is runc behind a wrapper that gives
/// runc a console socket of its own, which takes the master and keeps it from berthd.
#[tokio::test(flavor = "multi_thread")]
async fn a_runtime_that_never_hands_over_the_pty_fails_the_create_and_leaves_nothing() {
    within(async {
        let scripts = tempfile::TempDir::new().expect("temp dir");
        let runc = runc_in_path();
        let script = format!(
            r#"#!/usr/bin/env python3
import os, socket, sys
args = sys.argv[1:]
if "--console-socket" in args:
    i = args.index("--console-socket")
    own = os.path.join({scripts:?}, "own-console-%d.sock" % os.getpid())
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(own)
    listener.listen(1)
    if os.fork() == 0:
        # Take the master and hold it for longer than berthd waits.
        conn, _ = listener.accept()
        socket.recv_fds(conn, 1024, 1)
        os.execvp("sleep", ["sleep", "12"])
    args[i + 1] = own
os.execv({runc:?}, [{runc:?}] + args)
"#,
            scripts = scripts.path().display().to_string(),
            runc = runc.display().to_string(),
        );
        let wrapper = write_script(scripts.path(), "pty-keeping-runc", &script);
        let mut d = daemon!(Options::args(&["--runtime", &path_str(&wrapper)]));
        let baseline = d.baseline();
        let id = id("pty-kept");
        let bundle = Bundle::new(&["sleep", "1000"]);
        bundle.edit(|c| c["process"]["terminal"] = true.into());
        let started = std::time::Instant::now();
        let result = d.client.create_container(create_req(&id, &bundle)).await;
        let took = started.elapsed();
        let status = result.expect_err("a create whose pty never arrives");
        assert!(
            status.message().contains("console") || status.message().contains("pty"),
            "{status:?}"
        );
        assert!(
            took >= std::time::Duration::from_secs(9),
            "failed before the console wait ran out ({took:?}): {status:?}"
        );
        d.assert_gone(&id).await;
        // The wrapper's pty keeper is the test's, not berthd's: berthd, the subreaper, inherits
        // it and must reap it when it ends.
        let deadline = std::time::Instant::now() + EVENT_TIMEOUT;
        while !slow_starts(d.pid(), 12).is_empty() {
            assert!(
                std::time::Instant::now() < deadline,
                "the pty keeper never ended"
            );
            tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        }
        d.assert_no_zombies().await;
        d.assert_settles(&baseline).await;
    })
    .await
}
