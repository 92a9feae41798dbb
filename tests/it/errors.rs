//! Bad input gets the right gRPC code and a useful message, and a failed request leaves
//! nothing behind: no runtime state, cgroup, registry entry, state file, fd or zombie.

use std::fs;
use std::time::{Duration, Instant};

use crate::common::*;
use berth_api::proto::{SignalRequest, StatsRequest, UpdateContainerRequest};
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use tonic::Code;

/// Whether a runtime's error says that `/nonexistent` is missing: runc says "no such file",
/// libcontainer (`--runtime builtin`) "not found".
fn names_missing_binary(message: &str) -> bool {
    message.contains("nonexistent")
        && (message.contains("no such file") || message.contains("not found"))
}

/// One full create/exec/kill cycle so that lazily opened fds are in the baseline it returns.
async fn warm_up(d: &mut Daemon) -> Baseline {
    let name = numbered("warm-up");
    let mut events = d.events().await;
    let ctr = d.run(&name, &["sleep", "1000"]).await;
    let child = d.exec(exec_req(&ctr.id, &["/bin/true"])).await;
    assert_eq!(events.exit_status(&ctr.id, child).await, 0);
    d.kill_container(&mut events, &ctr.id, ctr.pid).await;
    d.assert_no_zombies().await;
    d.baseline()
}

#[tokio::test(flavor = "multi_thread")]
async fn invalid_container_ids_are_rejected() {
    within(async {
        let mut d = daemon!();
        let baseline = warm_up(&mut d).await;
        let bundle = Bundle::new(&["sleep", "1000"]);
        let too_long = "x".repeat(65);
        for bad in [
            "", "-a", ".a", "_a", "a/b", "../x", "a b", "a:b", "ä", &too_long,
        ] {
            let result = d.client.create_container(create_req(bad, &bundle)).await;
            expect_code(result, Code::InvalidArgument);
        }
        assert!(d.runtime_ids().is_empty(), "runtime: {:?}", d.runtime_ids());
        assert!(d.state().await.containers.is_empty());
        d.assert_settles(&baseline).await;
        d.assert_no_zombies().await;

        // The longest valid id, using every allowed punctuation mark.
        let base = id("Max_len.ok");
        let longest = format!("{base}{}", "x".repeat(64 - base.len()));
        let mut events = d.events().await;
        let pid = d.create(create_req(&longest, &bundle)).await;
        d.signal(&longest, pid, SIGKILL).await;
        assert_eq!(events.exit_status(&longest, pid).await, 137);
        d.assert_nothing_left(&longest, &baseline).await;
    })
    .await
}

#[tokio::test(flavor = "multi_thread")]
async fn bad_bundle_paths_are_rejected_with_the_path_in_the_message() {
    within(async {
        let mut d = daemon!();
        let baseline = warm_up(&mut d).await;
        let id = id("bad-bundle");
        let no_config = tempfile::TempDir::new().expect("temp dir");
        let a_file = d.dir().join("not-a-dir");
        fs::write(&a_file, "").expect("write file");
        let garbage = Bundle::new(&["true"]);
        fs::write(garbage.path().join("config.json"), "{ not json").expect("write config");
        let not_a_spec = Bundle::new(&["true"]);
        fs::write(not_a_spec.path().join("config.json"), r#"{"process": 5}"#).expect("write");

        let cases: Vec<(String, &[Code])> = vec![
            ("relative/bundle".into(), &[Code::InvalidArgument]),
            (path_str(&d.dir().join("missing")), &[Code::NotFound]),
            (path_str(&a_file), &[Code::NotFound, Code::InvalidArgument]),
            (path_str(no_config.path()), &[Code::NotFound]),
            (garbage.path_str(), &[Code::InvalidArgument]),
            (not_a_spec.path_str(), &[Code::InvalidArgument]),
        ];
        for (bundle_path, codes) in cases {
            let mut req = create_req(&id, &garbage);
            req.bundle_path = bundle_path.clone();
            let status = d
                .client
                .create_container(req)
                .await
                .expect_err(&format!("CreateContainer with bundle {bundle_path}"));
            assert!(codes.contains(&status.code()), "{bundle_path}: {status:?}");
            assert!(
                status.message().contains(&bundle_path),
                "message lacks the path {bundle_path}: {status:?}"
            );
            d.assert_nothing_left(&id, &baseline).await;
        }
    })
    .await
}

#[tokio::test(flavor = "multi_thread")]
async fn duplicate_id_is_rejected_and_the_original_keeps_running() {
    within(async {
        let mut d = daemon!();
        let id = id("dup");
        let bundle = Bundle::new(&["sleep", "1000"]);
        let mut events = d.events().await;
        let pid = d.create(create_req(&id, &bundle)).await;
        let fds = d.baseline();

        let other = Bundle::new(&["sleep", "1000"]);
        let result = d.client.create_container(create_req(&id, &other)).await;
        expect_code(result, Code::AlreadyExists);

        assert!(proc_stat(pid).is_some_and(|s| s.state != 'Z'));
        assert_eq!(d.runtime_ids(), vec![id.clone()]);
        assert!(d.state_file(&id).exists());
        let st = d.state().await;
        let listed: Vec<_> = st.containers.iter().filter(|c| c.id == id).collect();
        assert_eq!(listed.len(), 1);
        assert_eq!(listed[0].bundle_path, bundle.path_str());
        assert_eq!(listed[0].processes[0].pid, pid);
        d.assert_settles(&fds).await;

        d.signal(&id, pid, SIGKILL).await;
        assert_eq!(events.exit_status(&id, pid).await, 137);
        d.assert_gone(&id).await;
        d.assert_no_zombies().await;
    })
    .await
}

#[tokio::test(flavor = "multi_thread")]
async fn missing_stdio_paths_are_rejected_and_never_created() {
    within(async {
        let mut d = daemon!();
        let baseline = warm_up(&mut d).await;
        let id = id("no-stdio");
        let bundle = Bundle::new(&["sleep", "1000"]);
        for field in ["stdin", "stdout", "stderr"] {
            let missing = d.dir().join(format!("missing-{field}"));
            let mut req = create_req(&id, &bundle);
            match field {
                "stdin" => req.stdin = path_str(&missing),
                "stdout" => req.stdout = path_str(&missing),
                _ => req.stderr = path_str(&missing),
            }
            let message = expect_code(d.client.create_container(req).await, Code::InvalidArgument);
            assert!(message.contains(&path_str(&missing)), "{field}: {message}");
            assert!(!missing.exists(), "berthd created {}", missing.display());
            d.assert_nothing_left(&id, &baseline).await;
        }
    })
    .await
}

/// README: stdin may not be the same FIFO as an output. berthd relays FIFOs: `cat` with one
/// FIFO as both would have each byte circle through berthd for ever, at berthd's CPU.
#[tokio::test(flavor = "multi_thread")]
async fn one_fifo_as_stdin_and_an_output_is_refused_and_leaves_nothing() {
    within(async {
        let mut d = daemon!();
        let baseline = warm_up(&mut d).await;
        let id = id("fifo-loop");
        let bundle = Bundle::new(&["cat"]);
        let fifo = d.dir().join("loop");
        crate::common::mkfifo(&fifo);
        for output in ["stdout", "stderr"] {
            let mut req = create_req(&id, &bundle);
            req.stdin = path_str(&fifo);
            match output {
                "stdout" => req.stdout = path_str(&fifo),
                _ => req.stderr = path_str(&fifo),
            }
            let message = expect_code(d.client.create_container(req).await, Code::InvalidArgument);
            assert!(
                message.contains("same FIFO") && message.contains(&path_str(&fifo)),
                "{output}: {message}"
            );
            d.assert_nothing_left(&id, &baseline).await;
        }
    })
    .await
}

#[tokio::test(flavor = "multi_thread")]
async fn fifos_without_a_peer_do_not_hang_create() {
    within(async {
        let mut d = daemon!();
        let id = id("lonely-fifo");
        let bundle = Bundle::new(&["cat"]);
        let (input, out) = (d.dir().join("in"), d.dir().join("out"));
        crate::common::mkfifo(&input);
        crate::common::mkfifo(&out);
        // Our end of stdin keeps `cat` alive until the late reader of stdout is there.
        let mut writer = crate::common::open_rw(&input);
        let mut events = d.events().await;
        let mut req = create_req(&id, &bundle);
        req.stdin = path_str(&input);
        req.stdout = path_str(&out);
        let pid = tokio::time::timeout(Duration::from_secs(10), d.create(req))
            .await
            .expect("CreateContainer with an unread stdout FIFO hung");
        let mut reader = crate::common::Reader::open(&out);
        std::io::Write::write_all(&mut writer, b"late\n").expect("write stdin");
        drop(writer);
        assert_eq!(reader.read_to_end().await, "late\n");
        assert_eq!(events.exit_status(&id, pid).await, 0);

        let id = crate::common::id("lonely-stdin");
        let input = d.dir().join("in-unwritten");
        crate::common::mkfifo(&input);
        let mut req = create_req(&id, &bundle);
        req.stdin = path_str(&input);
        let pid = tokio::time::timeout(Duration::from_secs(10), d.create(req))
            .await
            .expect("CreateContainer with an unwritten stdin FIFO hung");
        // `cat` saw end-of-file or still waits for a writer; either way SIGKILL ends it.
        let _ = d
            .client
            .signal(SignalRequest {
                id: id.clone(),
                pid,
                signal: SIGKILL,
            })
            .await;
        let status = events.exit_status(&id, pid).await;
        assert!(status == 0 || status == 137, "cat exit status {status}");
        d.assert_gone(&id).await;
        d.assert_no_zombies().await;
    })
    .await
}

#[tokio::test(flavor = "multi_thread")]
async fn restore_from_a_missing_or_misnamed_checkpoint_is_refused() {
    within(async {
        let mut d = daemon!();
        let baseline = warm_up(&mut d).await;
        let id = id("restore");
        let bundle = Bundle::new(&["sleep", "1000"]);
        let mut req = create_req(&id, &bundle);
        req.checkpoint = "cp1".into();
        let message = expect_code(d.client.create_container(req.clone()).await, Code::NotFound);
        assert!(message.contains("cp1"), "{message}");
        req.checkpoint = "../escape".into();
        expect_code(d.client.create_container(req).await, Code::InvalidArgument);
        d.assert_nothing_left(&id, &baseline).await;
    })
    .await
}

#[tokio::test(flavor = "multi_thread")]
async fn runtime_failure_returns_the_runtime_error_and_leaves_nothing() {
    within(async {
        let mut d = daemon!();
        let baseline = warm_up(&mut d).await;
        let id = id("no-binary");
        let bundle = Bundle::new(&["/nonexistent"]);
        for _ in 0..3 {
            let status = d
                .client
                .create_container(create_req(&id, &bundle))
                .await
                .expect_err("CreateContainer of a missing binary");
            // The runtime refused the client's bundle: not berthd's internal error.
            assert_eq!(status.code(), Code::FailedPrecondition, "{status:?}");
            let message = status.message().to_lowercase();
            assert!(
                names_missing_binary(&message),
                "not the runtime's error: {status:?}"
            );
            d.assert_nothing_left(&id, &baseline).await;
        }
    })
    .await
}

#[tokio::test(flavor = "multi_thread")]
async fn signal_rejects_unknown_ids_foreign_pids_and_bad_signals() {
    within(async {
        let mut d = daemon!();
        let (a, b) = (id("sig-a"), id("sig-b"));
        let bundle = Bundle::new(&["sleep", "1000"]);
        let mut events = d.events().await;
        let init_a = d.create(create_req(&a, &bundle)).await;
        let init_b = d.create(create_req(&b, &bundle)).await;
        let child_b = d.exec(exec_req(&b, &["/bin/sleep", "1000"])).await;
        let child_a = d.exec(exec_req(&a, &["/bin/sleep", "1000"])).await;

        let req = |id: &str, pid: u32, signal: u32| SignalRequest {
            id: id.to_owned(),
            pid,
            signal,
        };
        let unknown = crate::common::id("sig-unknown");
        let cases = [
            (req(&unknown, init_a, SIGKILL), Code::NotFound),
            (req(&a, init_b, SIGKILL), Code::NotFound),
            (req(&a, child_b, SIGKILL), Code::NotFound),
            (req(&a, d.pid(), SIGKILL), Code::NotFound),
            (req(&a, 1, SIGKILL), Code::NotFound),
            (req(&a, init_b, 0), Code::NotFound),
            (req(&a, init_a, 65), Code::InvalidArgument),
            (req(&a, child_a, 1000), Code::InvalidArgument),
            // Pid 0 names no process; a malformed field is that on any id.
            (req(&a, 0, SIGKILL), Code::InvalidArgument),
            (req(&unknown, 0, SIGKILL), Code::InvalidArgument),
            (req(&unknown, init_a, 65), Code::InvalidArgument),
        ];
        for (request, code) in cases {
            let what = format!("{request:?}");
            let status = d.client.signal(request).await.expect_err(&what);
            assert_eq!(status.code(), code, "{what}: {status:?}");
        }
        let message = expect_code(
            d.client.signal(req(&a, 0, SIGKILL)).await,
            Code::InvalidArgument,
        );
        assert!(message.starts_with("pid is 0"), "{message}");
        for pid in [init_a, init_b, child_a, child_b] {
            assert!(proc_stat(pid).is_some_and(|s| s.state != 'Z'), "{pid} died");
        }

        // Signal 0 only checks that the process exists, as kill -0.
        d.signal(&a, init_a, 0).await;
        // 64 is the last valid signal; its default action terminates the process.
        d.signal(&a, child_a, 64).await;
        assert_eq!(events.exit_status(&a, child_a).await, 128 + 64);
        for signal in [SIGKILL, 0] {
            let gone = d.client.signal(req(&a, child_a, signal)).await;
            expect_code(gone, Code::NotFound);
        }
        for (id, pid) in [(&a, init_a), (&b, init_b)] {
            d.signal(id, pid, SIGKILL).await;
            assert_eq!(events.exit_status(id, pid).await, 137);
        }
        assert!(d.try_wait().is_none(), "berthd died");
        d.assert_no_zombies().await;
    })
    .await
}

#[tokio::test(flavor = "multi_thread")]
async fn add_process_errors_leave_nothing_behind() {
    within(async {
        let mut d = daemon!();
        let baseline = warm_up(&mut d).await;
        let mut events = d.events().await;
        let ctr = d.run("exec-errors", &["sleep", "1000"]).await;
        let fds = d.baseline();

        expect_code(
            d.client.add_process(exec_req(&ctr.id, &[])).await,
            Code::InvalidArgument,
        );
        let unknown = crate::common::id("exec-unknown");
        expect_code(
            d.client
                .add_process(exec_req(&unknown, &["/bin/true"]))
                .await,
            Code::NotFound,
        );
        let missing = d.dir().join("missing-out");
        let mut req = exec_req(&ctr.id, &["/bin/true"]);
        req.stdout = path_str(&missing);
        let message = expect_code(d.client.add_process(req).await, Code::InvalidArgument);
        assert!(message.contains(&path_str(&missing)), "{message}");
        assert!(!missing.exists(), "berthd created {}", missing.display());

        let status = d
            .client
            .add_process(exec_req(&ctr.id, &["/nonexistent"]))
            .await
            .expect_err("AddProcess of a missing binary");
        let message = status.message().to_lowercase();
        assert!(
            names_missing_binary(&message),
            "not the runtime's error: {status:?}"
        );

        let st = d.state().await;
        let c = st
            .containers
            .iter()
            .find(|c| c.id == ctr.id)
            .expect("listed");
        let pids: Vec<u32> = c.processes.iter().map(|p| p.pid).collect();
        assert_eq!(pids, [ctr.pid], "only the init is registered");
        d.assert_settles(&fds).await;
        d.assert_no_zombies().await;

        d.kill_container(&mut events, &ctr.id, ctr.pid).await;
        d.assert_nothing_left(&ctr.id, &baseline).await;
    })
    .await
}

#[tokio::test(flavor = "multi_thread")]
async fn update_rejects_unknown_ids_and_statuses() {
    within(async {
        let mut d = daemon!();
        let mut events = d.events().await;
        let ctr = d.run("update-errors", &["sleep", "1000"]).await;
        let req = |id: &str, status: &str| UpdateContainerRequest {
            id: id.to_owned(),
            signal: 0,
            status: status.to_owned(),
        };
        let unknown = crate::common::id("update-unknown");
        expect_code(
            d.client.update_container(req(&unknown, "paused")).await,
            Code::NotFound,
        );
        // Malformed fields are that on any id.
        expect_code(
            d.client.update_container(req(&unknown, "frozen")).await,
            Code::InvalidArgument,
        );
        let bad_signal = UpdateContainerRequest {
            signal: 65,
            ..req(&unknown, "")
        };
        let message = expect_code(
            d.client.update_container(bad_signal).await,
            Code::InvalidArgument,
        );
        assert!(message.contains("or 0 for none"), "{message}");
        for bad in ["frozen", "PAUSED", "stopped"] {
            expect_code(
                d.client.update_container(req(&ctr.id, bad)).await,
                Code::InvalidArgument,
            );
        }
        let st = d.state().await;
        let c = st
            .containers
            .iter()
            .find(|c| c.id == ctr.id)
            .expect("listed");
        assert_eq!(c.status, "running");

        d.signal(&ctr.id, ctr.pid, SIGKILL).await;
        // Nothing was published for the rejected updates.
        let first = events
            .wait_for("an event of the container", |e| e.id == ctr.id)
            .await;
        assert_eq!(first.r#type, "start-container");
        assert_eq!(events.next().await.r#type, "exit");
        d.assert_no_zombies().await;
    })
    .await
}

#[tokio::test(flavor = "multi_thread")]
async fn runtime_timeout_fails_create_and_cleans_up() {
    within(async {
        if !crate::common::ready() {
            return;
        }
        let scripts = tempfile::TempDir::new().expect("temp dir");
        let wrapper = slow_start_runtime(scripts.path(), 30);
        let flags = ["--runtime", &path_str(&wrapper), "--runtime-timeout", "2"];
        let mut d = daemon!(Options::args(&flags));
        let bundle = Bundle::new(&["sleep", "1000"]);
        let mut baseline = None;
        for round in 0..2 {
            let id = id(&format!("timeout-{round}"));
            let started = Instant::now();
            let result = d.client.create_container(create_req(&id, &bundle)).await;
            expect_code(result, Code::DeadlineExceeded);
            let took = started.elapsed();
            assert!(
                took < Duration::from_secs(15),
                "took {took:?} with a 2 s timeout"
            );
            d.assert_gone(&id).await;
            d.assert_no_zombies().await;
            let sleepers = slow_starts(d.pid(), 30);
            assert!(
                sleepers.is_empty(),
                "the timed-out runtime still runs: {sleepers:?}"
            );
            // The first round is the warm-up for the fd baseline.
            if round == 0 {
                baseline = Some(d.baseline());
            } else if let Some(baseline) = &baseline {
                d.assert_settles(baseline).await;
            }
        }
    })
    .await
}

/// README: a failed request leaves no cgroup. runc makes the container's cgroups before its
/// `createRuntime` hooks run; killed at the runtime timeout while one sleeps, it removes none,
/// and its delete cannot, knowing no container without a `state.json`. berthd removes them.
/// A container whose state file cannot be written is not answered as created: a restart would
/// take it for a create cut off and delete it unannounced. It is killed, its exit reported and
/// cleaned up as any other's, and its id is free again.
#[tokio::test(flavor = "multi_thread")]
async fn a_create_or_exec_whose_state_file_cannot_be_written_fails_and_leaves_nothing() {
    within(async {
        let mut d = daemon!();
        let baseline = warm_up(&mut d).await;
        let mut events = d.events().await;
        let id = id("unrecorded");
        let bundle = Bundle::new(&["sleep", "1000"]);
        // The writer's temp file taken by a directory: the write fails.
        let blocker = d.state_dir().join(format!("containers/.{id}.json.tmp"));
        std::fs::create_dir(&blocker).expect("plant the blocker");
        let status = d
            .client
            .create_container(create_req(&id, &bundle))
            .await
            .expect_err("a create without its state file");
        assert_eq!(status.code(), Code::Internal, "{status:?}");
        assert!(
            status.message().contains("was killed") && status.message().contains("state file"),
            "{status:?}"
        );
        let started = events.started(&id).await;
        assert_eq!(events.exit_status(&id, started.pid).await, 137);
        d.assert_nothing_left(&id, &baseline).await;
        std::fs::remove_dir(&blocker).expect("remove the blocker");
        let pid = d.create(create_req(&id, &bundle)).await;
        assert!(d.state_file(&id).exists());
        // The same for an added process, which a restart would not know either.
        std::fs::create_dir(&blocker).expect("plant the blocker again");
        let status = d
            .client
            .add_process(exec_req(&id, &["sleep", "1000"]))
            .await
            .expect_err("an exec without its record");
        assert_eq!(status.code(), Code::Internal, "{status:?}");
        assert!(status.message().contains("was killed"), "{status:?}");
        let started = events
            .wait_for("its start-process", |e| {
                e.r#type == "start-process" && e.id == id
            })
            .await;
        assert_eq!(events.exit_status(&id, started.pid).await, 137);
        std::fs::remove_dir(&blocker).expect("remove the blocker again");
        d.kill_container(&mut events, &id, pid).await;
    })
    .await
}

#[tokio::test(flavor = "multi_thread")]
async fn a_create_killed_in_a_hook_at_the_runtime_timeout_leaves_no_cgroup() {
    within(async {
        if builtin_runtime() {
            return;
        }
        let mut d = daemon!(Options::args(&["--runtime-timeout", "3"]));
        let bundle = Bundle::new(&["sleep", "1000"]);
        let id = id("hook-timeout");
        // createRuntime hooks run in the runtime's own process group, killed with it;
        // createContainer hooks run in its init stage (runc's `init`, in the container's pid
        // namespace and cgroups), which the kill leaves to berthd, reparented.
        for (hook, cgroups_path) in [
            ("createRuntime", None),
            ("createRuntime", Some("/berth-test-hook-abs")),
            ("createContainer", None),
            ("createContainer", Some("/berth-test-hook-abs")),
        ] {
            bundle.edit(|c| {
                c["hooks"] = serde_json::json!({
                    hook: [{"path": BUSYBOX, "args": ["busybox", "sleep", "1000"]}]
                });
                if let Some(path) = cgroups_path {
                    c["linux"]["cgroupsPath"] = path.into();
                }
            });
            let result = d.client.create_container(create_req(&id, &bundle)).await;
            expect_code(result, Code::DeadlineExceeded);
            d.assert_gone(&id).await;
            if let Some(path) = cgroups_path {
                for mount in cgroup_mounts() {
                    let left = mount.dir.join(path.trim_start_matches('/'));
                    assert!(!left.exists(), "{hook}: {} was left", left.display());
                }
            }
            d.assert_no_zombies().await;
            let deadline = Instant::now() + Duration::from_secs(5);
            while !d.children().is_empty() && Instant::now() < deadline {
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            let children = d.children();
            assert!(
                children.is_empty(),
                "{hook}: berthd's children left: {children:?}"
            );
        }
    })
    .await
}

/// While its create is under way an id answers GetStats as it answers every other call:
/// FAILED_PRECONDITION "still being created" (it was NOT_FOUND, as for an unknown id).
#[tokio::test(flavor = "multi_thread")]
async fn get_stats_on_a_container_still_being_created_fails_precondition() {
    within(async {
        if builtin_runtime() {
            return;
        }
        let mut d = daemon!(Options::args(&["--runtime-timeout", "3"]));
        let bundle = Bundle::new(&["sleep", "1000"]);
        let id = id("stats-creating");
        bundle.edit(|c| {
            c["hooks"] = serde_json::json!({
                "createRuntime": [{"path": BUSYBOX, "args": ["busybox", "sleep", "1000"]}]
            });
        });
        let mut client = d.client.clone();
        let request = create_req(&id, &bundle);
        let create = tokio::spawn(async move { client.create_container(request).await });
        let deadline = Instant::now() + Duration::from_millis(2500);
        let message = loop {
            let answer = d
                .client
                .get_stats(StatsRequest { id: id.clone() })
                .await
                .map(|_| "a stats stream");
            match answer {
                Err(status) if status.code() == Code::NotFound && Instant::now() < deadline => {
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
                other => break expect_code(other, Code::FailedPrecondition),
            }
        };
        assert!(message.contains("still being created"), "{message}");
        expect_code(create.await.unwrap(), Code::DeadlineExceeded);
        d.assert_gone(&id).await;
    })
    .await
}

/// An AddProcess whose container's init exits while the runtime's exec is on its way: the
/// runtime's refusal ("container does not exist", "cannot exec in a stopped container") is
/// that exit, answered NOT_FOUND as for a container already gone, and leaves nothing.
#[tokio::test(flavor = "multi_thread")]
async fn an_exec_racing_its_containers_exit_is_not_found() {
    within(async {
        if builtin_runtime() {
            return;
        }
        let scripts = tempfile::TempDir::new().expect("temp dir");
        // Real runc whose exec starts only after the container's init has ended.
        let body = format!(
            "#!/bin/sh\nfor arg in \"$@\"; do\n  [ \"$arg\" = exec ] && sleep 2\ndone\nexec {} \"$@\"\n",
            runc_in_path().display()
        );
        let wrapper = write_script(scripts.path(), "late-exec-runc", &body);
        let mut d = daemon!(Options::args(&["--runtime", &path_str(&wrapper)]));
        let baseline = warm_up(&mut d).await;
        let mut events = d.events().await;
        let ctr = d.run("exits-under-exec", &["sh", "-c", "sleep 1"]).await;
        let result = d
            .client
            .add_process(exec_req(&ctr.id, &["sleep", "30"]))
            .await;
        // "has exited", or, on a host slow enough that the clean-up was done first, "does not
        // exist": NOT_FOUND either way.
        let message = expect_code(result, Code::NotFound);
        assert!(message.contains(&ctr.id), "{message}");
        assert_eq!(events.exit_status(&ctr.id, ctr.pid).await, 0);
        d.assert_nothing_left(&ctr.id, &baseline).await;
    })
    .await
}

#[tokio::test(flavor = "multi_thread")]
async fn requests_in_flight_when_the_helper_dies_fail_unavailable() {
    within(async {
        if !crate::common::ready() {
            return;
        }
        let scripts = tempfile::TempDir::new().expect("temp dir");
        // `start` hangs for STRANDED seconds: long enough to kill the helper under it, short
        // enough to see what becomes of it afterwards.
        const STRANDED: u32 = 8;
        let wrapper = slow_start_runtime(scripts.path(), STRANDED);
        let flags = ["--runtime", &path_str(&wrapper), "--runtime-timeout", "25"];
        let mut d = daemon!(Options::args(&flags));
        let id = id("helper-dies");
        let bundle = Bundle::new(&["sleep", "1000"]);
        let helper = wait_for_spawn_helper(d.pid(), None).await;
        let mut client = d.client.clone();
        let request = create_req(&id, &bundle);
        let create = tokio::spawn(async move { client.create_container(request).await });
        let deadline = Instant::now() + Duration::from_secs(10);
        while slow_starts(d.pid(), STRANDED).is_empty() {
            assert!(
                Instant::now() < deadline,
                "the create never reached `start`"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }

        kill(Pid::from_raw(helper as i32), Signal::SIGKILL).expect("kill the helper");
        let result = tokio::time::timeout(Duration::from_secs(10), create)
            .await
            .expect("the in-flight create did not fail when the helper died")
            .expect("create task");
        expect_code(result, Code::Unavailable);
        // Whatever is left of the container is either still tracked (listed, and it can be
        // killed through berthd) or gone everywhere: never an untracked container.
        let st = d.state().await;
        if let Some(c) = st.containers.iter().find(|c| c.id == id) {
            let init = c
                .processes
                .first()
                .expect("a listed container has its init")
                .pid;
            let mut events = d.events().await;
            d.kill_container(&mut events, &id, init).await;
        }
        d.assert_gone(&id).await;
        // The stranded `start` (the runtime's own command, not a container process) is
        // berthd's orphan now, and nothing times it out any more (that was the dead helper's
        // job): it may run on, but only it, and once it ends berthd reaps it.
        let stranded = slow_starts(d.pid(), STRANDED);
        d.assert_no_zombies_except(&stranded).await;
        let deadline =
            Instant::now() + Duration::from_secs(STRANDED.into()) + Duration::from_secs(5);
        while !slow_starts(d.pid(), STRANDED).is_empty() {
            assert!(
                Instant::now() < deadline,
                "the stranded `start` never ended"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        d.assert_no_zombies().await;
        wait_for_spawn_helper(d.pid(), Some(helper)).await;
    })
    .await
}

/// The built-in runtime has no CRIU: a checkpoint and a restore are refused with
/// FAILED_PRECONDITION naming the runtime that can, and leave nothing behind.
#[cfg(feature = "builtin")]
#[tokio::test(flavor = "multi_thread")]
async fn checkpoint_and_restore_on_the_builtin_runtime_name_runc() {
    use berth_api::proto::{Checkpoint, CreateCheckpointRequest};
    within(async {
        let mut d = daemon!(Options::args(&["--runtime", "builtin"]));
        let mut events = d.events().await;
        let ctr = d.run("builtin-cp", &["sleep", "1000"]).await;
        let fds = d.baseline();
        let req = CreateCheckpointRequest {
            id: ctr.id.clone(),
            checkpoint: Some(Checkpoint {
                name: "cp1".into(),
                ..Default::default()
            }),
        };
        let message = expect_code(
            d.client.create_checkpoint(req).await,
            Code::FailedPrecondition,
        );
        assert!(message.contains("--runtime runc"), "{message}");
        assert!(!ctr.bundle.path().join("checkpoints/cp1").exists());

        fs::create_dir_all(ctr.bundle.path().join("checkpoints/cp2")).expect("checkpoint dir");
        let restored = id("builtin-restore");
        let mut req = create_req(&restored, &ctr.bundle);
        req.checkpoint = "cp2".into();
        let message = expect_code(
            d.client.create_container(req).await,
            Code::FailedPrecondition,
        );
        assert!(message.contains("--runtime runc"), "{message}");
        d.assert_nothing_left(&restored, &fds).await;
        d.kill_container(&mut events, &ctr.id, ctr.pid).await;
    })
    .await
}

/// A terminal's console or stdio path that cannot be used is refused before the runtime starts
/// anything (no `run`, `create` or `exec` is called), for a create and for an added process.
#[tokio::test(flavor = "multi_thread")]
async fn an_unusable_terminal_path_is_refused_before_the_runtime_runs() {
    within(async {
        let scripts = tempfile::tempdir().expect("temp dir");
        let calls = scripts.path().join("calls");
        let body = format!(
            "#!/bin/sh\necho \"$*\" >> '{}'\nexec '{}' \"$@\"\n",
            calls.display(),
            runc_in_path().display()
        );
        let wrapper = write_script(scripts.path(), "logging-runc", &body);
        let mut d = daemon!(Options::args(&["--runtime", &path_str(&wrapper)]));
        let baseline = warm_up(&mut d).await;
        let running = d.run("terminal-paths", &["sleep", "1000"]).await;
        fs::write(&calls, "").expect("truncate the call log");

        let bundle = Bundle::new(&["sh", "-c", "exit 0"]);
        bundle.edit(|c| c["process"]["terminal"] = true.into());
        let id = id("bad-console");
        let directory = path_str(d.dir());
        for console in ["/dev/zero", directory.as_str()] {
            let mut req = create_req(&id, &bundle);
            req.console = console.to_owned();
            let message = expect_code(d.client.create_container(req).await, Code::InvalidArgument);
            assert!(message.contains("console"), "{message}");
        }
        let mut req = exec_req(&running.id, &["true"]);
        req.terminal = true;
        req.stdout = "/dev/zero".into();
        let message = expect_code(d.client.add_process(req).await, Code::InvalidArgument);
        assert!(message.contains("stdout"), "{message}");

        let called = fs::read_to_string(&calls).expect("read the call log");
        let started: Vec<&str> = called
            .lines()
            .filter(|line| {
                line.split_whitespace()
                    .any(|word| ["run", "create", "exec"].contains(&word))
            })
            .collect();
        assert!(
            started.is_empty(),
            "the runtime was asked to start: {started:?}"
        );
        d.assert_gone(&id).await;
        let mut events = d.events().await;
        d.kill_container(&mut events, &running.id, running.pid)
            .await;
        d.assert_nothing_left(&id, &baseline).await;
    })
    .await
}

/// Process fields no kernel takes (a NUL in args, env or cwd, an env entry that is not
/// NAME=value, a cwd longer than PATH_MAX, an arg or env entry longer than MAX_ARG_STRLEN,
/// more than NGROUPS_MAX groups, a uid or gid runc does not set) are INVALID_ARGUMENT
/// naming the field, from AddProcess on any id and from a bundle's config.json, and leave
/// nothing behind.
#[tokio::test(flavor = "multi_thread")]
async fn malformed_process_fields_are_refused_naming_the_field() {
    use berth_api::proto::User;
    within(async {
        let mut d = daemon!();
        let baseline = warm_up(&mut d).await;
        let mut events = d.events().await;
        let ctr = d.run("bad-fields", &["sleep", "1000"]).await;
        let fds = d.baseline();
        let unknown = id("bad-fields-unknown");
        let long_cwd = format!("/{}", "d".repeat(5000));
        let mut cases = Vec::new();
        let mut with = |field: &str, change: &dyn Fn(&mut berth_api::proto::AddProcessRequest)| {
            let mut req = exec_req(&ctr.id, &["true"]);
            change(&mut req);
            cases.push((field.to_owned(), req));
        };
        with("args[1]", &|r| r.args.push("a\0b".into()));
        with("env[0]", &|r| r.env = vec!["A=\0".into()]);
        with("env[1]", &|r| r.env = vec!["A=1".into(), "FOO".into()]);
        with("cwd", &|r| r.cwd = "/tm\0p".into());
        with("cwd", &|r| r.cwd = long_cwd.clone());
        with("args[0]", &|r| r.args = vec![long_cwd.clone()]);
        // Longer than the kernel's MAX_ARG_STRLEN: the exec would fail after the start.
        let huge = "y".repeat(140_000);
        with("args[1]", &|r| r.args.push(huge.clone()));
        with("env[0]", &|r| r.env = vec![format!("A={huge}")]);
        with("user.additionalGids", &|r| {
            r.user = Some(User {
                uid: 0,
                gid: 0,
                additional_gids: vec![7; 65537],
            })
        });
        with("user.uid", &|r| {
            r.user = Some(User {
                uid: u32::MAX,
                gid: 0,
                additional_gids: Vec::new(),
            })
        });
        with("user.additionalGids[1]", &|r| {
            r.user = Some(User {
                uid: 0,
                gid: 0,
                additional_gids: vec![7, 1 << 31],
            })
        });
        for (field, req) in cases {
            for target in [&ctr.id, &unknown] {
                let req = berth_api::proto::AddProcessRequest {
                    id: target.clone(),
                    ..req.clone()
                };
                let message = expect_code(d.client.add_process(req).await, Code::InvalidArgument);
                assert!(message.starts_with(&field), "{field}: {message}");
                assert!(message.len() < 400, "{} bytes", message.len());
            }
        }
        let st = d.state().await;
        let c = st
            .containers
            .iter()
            .find(|c| c.id == ctr.id)
            .expect("listed");
        assert_eq!(c.processes.len(), 1, "only the init is registered");
        d.assert_settles(&fds).await;

        let bundle = Bundle::new(&["sleep", "1000"]);
        let id = id("bad-fields-bundle");
        type Edit = fn(&mut serde_json::Value);
        let edits: [(&str, Edit); 7] = [
            ("process.args[1]", |c| {
                c["process"]["args"][1] = "a\0".into()
            }),
            ("process.env[0] is 140002 bytes", |c| {
                c["process"]["env"] = vec![format!("A={}", "y".repeat(140_000))].into()
            }),
            ("process.env[0]", |c| {
                c["process"]["env"] = vec!["PATH"].into()
            }),
            ("process.user.additionalGids", |c| {
                c["process"]["user"]["additionalGids"] = vec![7; 65537].into()
            }),
            ("process.user.uid", |c| {
                c["process"]["user"]["uid"] = u32::MAX.into()
            }),
            ("process.args is empty", |c| {
                c["process"]["args"] = serde_json::Value::Null
            }),
            ("process.cwd is empty", |c| c["process"]["cwd"] = "".into()),
        ];
        for (field, edit) in edits {
            let original = bundle.config();
            bundle.edit(edit);
            let message = expect_code(
                d.client.create_container(create_req(&id, &bundle)).await,
                Code::InvalidArgument,
            );
            assert!(
                message.starts_with(&format!("config.json: {field}")),
                "{field}: {message}"
            );
            bundle.edit(|c| *c = original);
            d.assert_gone(&id).await;
            d.assert_settles(&fds).await;
        }
        d.kill_container(&mut events, &ctr.id, ctr.pid).await;
        d.assert_nothing_left(&ctr.id, &baseline).await;
    })
    .await
}

/// A runtime message that quotes a client's input whole (runc's `exec: "<args[0]>": ...`,
/// `chdir to cwd ("<cwd>")`) reaches the client cut to both its ends, with its code.
#[tokio::test(flavor = "multi_thread")]
async fn runtime_errors_quoting_huge_input_are_bounded() {
    within(async {
        let mut d = daemon!();
        let mut events = d.events().await;
        let ctr = d.run("huge-echo", &["sleep", "1000"]).await;
        let fds = d.baseline();
        // The longest name a path may have: enough to be cut.
        let program = format!("nonexistent-{}", "x".repeat(4_000));
        let mut missing_dir = exec_req(&ctr.id, &["true"]);
        missing_dir.cwd = format!("/{}", "d/".repeat(2000));
        for req in [exec_req(&ctr.id, &[&program]), missing_dir] {
            let message = expect_code(d.client.add_process(req).await, Code::FailedPrecondition);
            assert!(message.len() < 1024, "{} bytes: {message}", message.len());
            if !builtin_runtime() {
                assert!(message.contains(" bytes cut) …"), "{message}");
            }
        }
        d.assert_settles(&fds).await;
        d.kill_container(&mut events, &ctr.id, ctr.pid).await;
    })
    .await
}

/// AddProcess whose runtime fails after it started the process (here: real runc, then an exit
/// 1) answers with the error and leaves no process behind in the container: the process the
/// pid file names is killed and reaped.
#[tokio::test(flavor = "multi_thread")]
async fn an_exec_the_runtime_fails_after_starting_leaves_no_process() {
    within(async {
        let scripts = tempfile::tempdir().expect("temp dir");
        let body = format!(
            r#"#!/bin/sh
log= previous=
for arg in "$@"; do
    if [ "$previous" = --log ]; then log=$arg; fi
    if [ "$arg" = exec ]; then
        '{runc}' "$@" || exit $?
        echo '{{"level":"error","msg":"failed after the exec by the test runtime","time":"t"}}' >> "$log"
        exit 1
    fi
    previous=$arg
done
exec '{runc}' "$@"
"#,
            runc = runc_in_path().display()
        );
        let wrapper = write_script(scripts.path(), "exec-then-failing-runc", &body);
        let mut d = daemon!(Options::args(&["--runtime", &path_str(&wrapper)]));
        let mut events = d.events().await;
        let ctr = d.run("failed-after-exec", &["sleep", "1000"]).await;
        let baseline = d.baseline();
        let message = expect_code(
            d.client
                .add_process(exec_req(&ctr.id, &["sleep", "4242"]))
                .await,
            Code::FailedPrecondition,
        );
        assert!(message.contains("failed after the exec"), "{message}");
        let cgroup_procs = |pid: u32| -> Vec<u32> {
            let line = std::fs::read_to_string(format!("/proc/{pid}/cgroup")).unwrap();
            let memory = line
                .lines()
                .find_map(|l| l.split_once(":memory:").map(|(_, path)| path.to_owned()))
                .expect("a memory cgroup");
            std::fs::read_to_string(format!("/sys/fs/cgroup/memory{memory}/cgroup.procs"))
                .unwrap()
                .lines()
                .map(|p| p.parse().unwrap())
                .collect()
        };
        let deadline = Instant::now() + Duration::from_secs(5);
        while cgroup_procs(ctr.pid) != [ctr.pid] {
            assert!(
                Instant::now() < deadline,
                "a process of the failed exec is left in the container: {:?}",
                cgroup_procs(ctr.pid)
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        d.assert_settles(&baseline).await;
        d.assert_no_zombies().await;
        d.kill_container(&mut events, &ctr.id, ctr.pid).await;
    })
    .await
}

/// AddProcess with a terminal whose runtime fails before it connects to the console socket
/// answers at once with the runtime's error (not after the console timeout, holding the
/// container's lock), and leaves nothing behind: no console socket, scratch file, fd or child.
#[tokio::test(flavor = "multi_thread")]
async fn a_terminal_exec_the_runtime_refuses_fails_at_once() {
    within(async {
        let scripts = tempfile::tempdir().expect("temp dir");
        // Real runc, except that `exec` fails at once, saying so in its log as runc would.
        let body = format!(
            r#"#!/bin/sh
log= previous=
for arg in "$@"; do
    if [ "$previous" = --log ]; then log=$arg; fi
    if [ "$arg" = exec ]; then
        echo '{{"level":"error","msg":"exec refused by the test runtime","time":"t"}}' >> "$log"
        exit 1
    fi
    previous=$arg
done
exec '{}' "$@"
"#,
            runc_in_path().display()
        );
        let wrapper = write_script(scripts.path(), "exec-refusing-runc", &body);
        let mut d = daemon!(Options::args(&["--runtime", &path_str(&wrapper)]));
        let mut events = d.events().await;
        let ctr = d.run("refused-tty", &["sleep", "1000"]).await;
        let baseline = d.baseline();
        for _ in 0..2 {
            let mut req = exec_req(&ctr.id, &["sh"]);
            req.terminal = true;
            let started = Instant::now();
            let message = expect_code(d.client.add_process(req).await, Code::FailedPrecondition);
            let took = started.elapsed();
            assert!(
                message.contains("exec refused by the test runtime"),
                "{message}"
            );
            assert!(took < Duration::from_secs(5), "answered after {took:?}");
            d.assert_settles(&baseline).await;
        }
        // The container's operations lock was let go: a pause and a resume go through.
        for status in ["paused", "running"] {
            let update = UpdateContainerRequest {
                id: ctr.id.clone(),
                status: status.into(),
                signal: 0,
            };
            tokio::time::timeout(Duration::from_secs(5), d.client.update_container(update))
                .await
                .expect("the update waited for the container's lock")
                .expect("update");
        }
        d.kill_container(&mut events, &ctr.id, ctr.pid).await;
        d.assert_no_zombies().await;
    })
    .await
}

/// A stdio path berthd cannot open for writing because of the file's own state (here a
/// running executable: ETXTBSY; a read-only mount is EROFS alike) is FAILED_PRECONDITION naming
/// the path, not an internal error.
#[tokio::test(flavor = "multi_thread")]
async fn a_stdout_that_cannot_be_written_is_a_failed_precondition() {
    use std::os::unix::process::CommandExt;
    within(async {
        let mut d = daemon!();
        let baseline = warm_up(&mut d).await;
        let busy = d.dir().join("running-busybox");
        fs::copy(BUSYBOX, &busy).expect("copy busybox");
        // Busybox runs the applet its argv[0] names. A fork elsewhere in the test binary while
        // the copy's write descriptor was open keeps it open in that child until it execs: the
        // exec fails with ETXTBSY meanwhile, so it is tried again.
        let mut tries = 0;
        let mut running = loop {
            match std::process::Command::new(&busy)
                .arg0("sleep")
                .arg("1000")
                .spawn()
            {
                Err(e) if e.raw_os_error() == Some(libc::ETXTBSY) && tries < 100 => {
                    tries += 1;
                    tokio::time::sleep(std::time::Duration::from_millis(20)).await;
                }
                spawned => break spawned.expect("run the copy"),
            }
        };
        let id = id("busy-stdout");
        let bundle = Bundle::new(&["true"]);
        let mut req = create_req(&id, &bundle);
        req.stdout = path_str(&busy);
        let result = d.client.create_container(req).await;
        running.kill().expect("kill the copy");
        running.wait().expect("reap the copy");
        let message = expect_code(result, Code::FailedPrecondition);
        assert!(message.contains(&path_str(&busy)), "{message}");
        d.assert_nothing_left(&id, &baseline).await;
    })
    .await
}

/// A stdout whose own state keeps berthd from opening it is FAILED_PRECONDITION at once, with
/// what to do: a lease another process holds (a blocking open would wait out the host's
/// lease-break time, 45 s by default) or an immutable file. Nothing is left, and the same id
/// works once the file is released.
#[tokio::test(flavor = "multi_thread")]
async fn a_stdout_under_a_lease_or_immutable_is_refused_at_once_and_leaves_nothing() {
    within(async {
        let mut d = daemon!();
        let baseline = warm_up(&mut d).await;
        let bundle = Bundle::new(&["true"]);
        let leased = d.dir().join("leased-stdout");
        fs::write(&leased, b"").expect("make the file");
        let holder = LeaseHolder::take(&leased, false);

        let leased_id = id("leased-stdout");
        let mut req = create_req(&leased_id, &bundle);
        req.stdout = path_str(&leased);
        let result = d.client.create_container(req.clone()).await;
        let message = expect_code(result, Code::FailedPrecondition);
        assert!(message.contains("lease"), "{message}");
        assert!(message.contains(&path_str(&leased)), "{message}");
        d.assert_nothing_left(&leased_id, &baseline).await;

        drop(holder);
        let mut events = d.events().await;
        let pid = d.create(req).await;
        assert_eq!(events.exit_status(&leased_id, pid).await, 0);

        let immutable = d.dir().join("immutable-stdout");
        fs::write(&immutable, b"").expect("make the file");
        let set = std::process::Command::new("chattr")
            .arg("+i")
            .arg(&immutable)
            .status();
        if !set.is_ok_and(|s| s.success()) {
            note("the immutable case: chattr +i failed here (no chattr, or no such attribute on this file system)");
            return;
        }
        let id = id("immutable-stdout");
        let mut req = create_req(&id, &bundle);
        req.stdout = path_str(&immutable);
        let result = d.client.create_container(req).await;
        let cleared = std::process::Command::new("chattr")
            .arg("-i")
            .arg(&immutable)
            .status()
            .expect("chattr");
        assert!(cleared.success());
        let message = expect_code(result, Code::FailedPrecondition);
        assert!(message.contains("immutable"), "{message}");
        d.assert_nothing_left(&id, &baseline).await;
    })
    .await
}
