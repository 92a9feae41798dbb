//! A client that goes away mid-request changes nothing about the outcome: CreateContainer and
//! AddProcess cancelled by a client deadline (1 ms up to the whole call) or by killing the client
//! process either finish (the container or process is reported and can be killed as usual) or
//! leave nothing: no runtime state, cgroup, untracked process, zombie or fd, and the id is free.

use std::io::Read;
use std::process::{Command, Stdio};
use std::time::Duration;

use berth_api::proto::{AddProcessRequest, CreateContainerRequest, ListCheckpointRequest};
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use tonic::Code;

use crate::common::*;

/// Client deadlines from "gone before berthd reads the request" to "outlives the call".
const DEADLINES_MS: &[u64] = &[1, 5, 20, 50, 100, 200, 500, 10_000];

/// A request carrying a gRPC deadline: berthd's server drops the handler when it passes.
fn with_deadline<T>(message: T, ms: u64) -> tonic::Request<T> {
    let mut request = tonic::Request::new(message);
    request.set_timeout(Duration::from_millis(ms));
    request
}

/// One create/exec/kill cycle so that lazily opened fds are in the baseline it returns.
async fn warm_up(d: &mut Daemon) -> Baseline {
    let mut events = d.events().await;
    let ctr = d.run(&numbered("cancel-warm"), &["sleep", "1000"]).await;
    let child = d.exec(exec_req(&ctr.id, &["/bin/true"])).await;
    assert_eq!(events.exit_status(&ctr.id, child).await, 0);
    d.kill_container(&mut events, &ctr.id, ctr.pid).await;
    d.assert_no_zombies().await;
    d.baseline()
}

/// The call either succeeded or ended because the client gave up.
fn succeeded_or_abandoned<T>(result: Result<T, tonic::Status>, what: &str) {
    if let Err(status) = result {
        assert!(
            matches!(status.code(), Code::DeadlineExceeded | Code::Cancelled),
            "{what}: {status:?}"
        );
    }
}

/// After a create of `id` a client abandoned: the one container berthd ends up with under `id`,
/// whichever create made it (the abandoned one, or this fresh one if the abandoned one never
/// started). Returns its init pid, with its start-container event taken from `events`.
async fn settle_create(d: &mut Daemon, events: &mut Events, id: &str, bundle: &Bundle) -> u32 {
    let pid = loop {
        match d.client.create_container(create_req(id, bundle)).await {
            Ok(response) => break response.into_inner().pid,
            Err(status) if status.code() == Code::AlreadyExists => {
                let listed = d.state().await;
                if let Some(c) = listed.containers.iter().find(|c| c.id == id) {
                    break c.processes[0].pid;
                }
                // Still being created by the abandoned call.
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            Err(status) => panic!("CreateContainer {id}: {status:?}"),
        }
    };
    assert_eq!(
        events.started(id).await.pid,
        pid,
        "one start-container for {id}"
    );
    d.record_cgroups(id, pid);
    pid
}

/// After an AddProcess in `id` a client abandoned: the process it started, if it started one
/// (an exec takes well under a second; one abandoned before berthd read it never starts).
async fn settle_exec(events: &mut Events, id: &str) -> Option<u32> {
    let what = format!("start-process in {id}");
    let started = events.wait_for(&what, |e| e.r#type == "start-process" && e.id == id);
    tokio::time::timeout(Duration::from_secs(3), started)
        .await
        .ok()
        .map(|event| event.pid)
}

/// Kills the added process `pid` of container `ctr` if there is one, after checking State lists
/// it after the init, and checks berthd has no untracked child or zombie.
async fn kill_added(d: &mut Daemon, events: &mut Events, ctr: (&str, u32), pid: Option<u32>) {
    let (id, init) = ctr;
    let listed = d.state().await;
    let pids: Vec<u32> = listed
        .containers
        .iter()
        .filter(|c| c.id == id)
        .flat_map(|c| c.processes.iter().map(|p| p.pid))
        .collect();
    let expected: Vec<u32> = [init].into_iter().chain(pid).collect();
    assert_eq!(pids, expected, "processes of {id}");
    d.assert_no_zombies().await;
    if let Some(pid) = pid {
        d.signal(id, pid, SIGKILL).await;
        assert_eq!(events.exit_status(id, pid).await, 137);
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn create_abandoned_at_any_deadline_finishes_whole_or_not_at_all() {
    within(async {
        let mut d = daemon!();
        let baseline = warm_up(&mut d).await;
        let mut events = d.events().await;
        let bundle = Bundle::new(&["sleep", "1000"]);
        // One id for every round: each round also proves the id is free again.
        let id = id("cancel-create");
        for &ms in DEADLINES_MS {
            let request = with_deadline(create_req(&id, &bundle), ms);
            let result = d.client.create_container(request).await;
            succeeded_or_abandoned(result, &format!("CreateContainer with a {ms} ms deadline"));
            let pid = settle_create(&mut d, &mut events, &id, &bundle).await;
            d.kill_container(&mut events, &id, pid).await;
            d.assert_settles(&baseline).await;
            d.assert_no_zombies().await;
        }
    })
    .await
}

/// Creates `id` until berthd answers for this call rather than for one still in flight (which
/// holds the id: AlreadyExists), and returns that answer.
async fn create_once_free(
    client: &mut Client,
    request: CreateContainerRequest,
) -> Result<u32, tonic::Status> {
    loop {
        match client.create_container(request.clone()).await {
            Err(status) if status.code() == Code::AlreadyExists => {
                tokio::time::sleep(Duration::from_millis(50)).await
            }
            other => return other.map(|r| r.into_inner().pid),
        }
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn create_abandoned_while_the_runtime_hangs_is_undone_whole() {
    within(async {
        if !crate::common::ready() {
            return;
        }
        let scripts = tempfile::TempDir::new().expect("temp dir");
        let wrapper = slow_start_runtime(scripts.path(), 30);
        let flags = ["--runtime", &path_str(&wrapper), "--runtime-timeout", "2"];
        let mut d = daemon!(Options::args(&flags));
        let bundle = Bundle::new(&["sleep", "1000"]);
        let id = id("cancel-hang");
        // The first full round is the warm-up for the fd baseline.
        let warm = create_once_free(&mut d.client, create_req(&id, &bundle)).await;
        expect_code(warm, Code::DeadlineExceeded);
        d.assert_no_zombies().await;
        let baseline = d.baseline();
        for &ms in &[1, 20, 200, 1000] {
            let request = with_deadline(create_req(&id, &bundle), ms);
            let status = d.client.create_container(request).await.expect_err("hangs");
            assert!(
                matches!(status.code(), Code::DeadlineExceeded | Code::Cancelled),
                "{ms} ms: {status:?}"
            );
            // The abandoned create still holds the id until its own start times out and it is
            // undone; then this one runs (and fails the same way).
            let next = create_once_free(&mut d.client, create_req(&id, &bundle)).await;
            expect_code(next, Code::DeadlineExceeded);
            d.assert_nothing_left(&id, &baseline).await;
            let sleepers = slow_starts(d.pid(), 30);
            assert!(
                sleepers.is_empty(),
                "{ms} ms: runtime left running: {sleepers:?}"
            );
        }
    })
    .await
}

#[tokio::test(flavor = "multi_thread")]
async fn add_process_abandoned_at_any_deadline_is_tracked_or_never_started() {
    within(async {
        let mut d = daemon!();
        let baseline = warm_up(&mut d).await;
        let mut events = d.events().await;
        let ctr = d.run("cancel-exec", &["sleep", "1000"]).await;
        for &ms in DEADLINES_MS {
            let request = with_deadline(exec_req(&ctr.id, &["sleep", "1000"]), ms);
            let result = d.client.add_process(request).await;
            succeeded_or_abandoned(result, &format!("AddProcess with a {ms} ms deadline"));
            let added = settle_exec(&mut events, &ctr.id).await;
            kill_added(&mut d, &mut events, (&ctr.id, ctr.pid), added).await;
        }
        d.kill_container(&mut events, &ctr.id, ctr.pid).await;
        d.assert_nothing_left(&ctr.id, &baseline).await;
    })
    .await
}

/// Environment variable that makes `killed_client` act as the client process of these tests:
/// `create`, socket, id, bundle or `exec`, socket, id, one a line.
const CLIENT_ENV: &str = "BERTH_IT_CANCEL_CLIENT";

/// Not a test of its own: the client process `client_process_killed_mid_call` starts and kills.
/// It prints one line just before it sends its request, then waits for the answer.
#[test]
#[ignore = "the client process of client_process_killed_mid_call, run by it"]
fn killed_client() {
    let Ok(spec) = std::env::var(CLIENT_ENV) else {
        return;
    };
    let words: Vec<&str> = spec.split('\n').collect();
    let runtime = tokio::runtime::Runtime::new().expect("runtime");
    runtime.block_on(async {
        let mut client = berth_api::client::connect(std::path::Path::new(words[1]))
            .await
            .expect("connect");
        // Connected: the call is all that is left.
        println!("calling");
        match words[0] {
            "create" => {
                let request = CreateContainerRequest {
                    id: words[2].into(),
                    bundle_path: words[3].into(),
                    ..Default::default()
                };
                let _ = client.create_container(request).await;
            }
            _ => {
                let request = AddProcessRequest {
                    id: words[2].into(),
                    args: vec!["sleep".into(), "1000".into()],
                    ..Default::default()
                };
                let _ = client.add_process(request).await;
            }
        }
        // Never reached in the tests: the client is killed before.
        std::thread::sleep(Duration::from_secs(60));
    });
}

/// Starts this test binary as the client process `killed_client` with `spec`, waits until it
/// is about to call, lets it run for `after`, and SIGKILLs it.
fn kill_client_mid_call(spec: Vec<String>, after: Duration) {
    let exe = std::env::current_exe().expect("test binary");
    let mut child = Command::new(exe)
        .args([
            "--exact",
            "cancel::killed_client",
            "--ignored",
            "--nocapture",
        ])
        .args(["--test-threads", "1"])
        .env(CLIENT_ENV, spec.join("\n"))
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("start the client process");
    let mut stdout = child.stdout.take().expect("client stdout");
    let mut seen = Vec::new();
    let mut byte = [0u8; 1];
    while !String::from_utf8_lossy(&seen).contains("calling") {
        match stdout.read(&mut byte) {
            Ok(1) => seen.push(byte[0]),
            _ => panic!(
                "the client process ended before calling: {}",
                String::from_utf8_lossy(&seen)
            ),
        }
    }
    std::thread::sleep(after);
    kill(Pid::from_raw(child.id() as i32), Signal::SIGKILL).expect("kill the client");
    child.wait().expect("wait for the client");
}

async fn kill_client(spec: &[&str], after: Duration) {
    let spec: Vec<String> = spec.iter().map(|s| s.to_string()).collect();
    tokio::task::spawn_blocking(move || kill_client_mid_call(spec, after))
        .await
        .expect("client process");
}

#[tokio::test(flavor = "multi_thread")]
async fn client_process_killed_mid_call_changes_nothing() {
    within(async {
        let mut d = daemon!();
        let baseline = warm_up(&mut d).await;
        let mut events = d.events().await;
        let bundle = Bundle::new(&["sleep", "1000"]);
        let socket = path_str(&d.socket());
        let id = id("cancel-killed");
        for ms in [0, 2, 10, 40, 150] {
            let after = Duration::from_millis(ms);
            kill_client(&["create", &socket, &id, &bundle.path_str()], after).await;
            let init = settle_create(&mut d, &mut events, &id, &bundle).await;
            kill_client(&["exec", &socket, &id], after).await;
            let added = settle_exec(&mut events, &id).await;
            kill_added(&mut d, &mut events, (&id, init), added).await;
            d.kill_container(&mut events, &id, init).await;
            d.assert_settles(&baseline).await;
            d.assert_no_zombies().await;
        }
        // The id is free: nothing is reserved under it.
        let listed = d
            .client
            .list_checkpoint(ListCheckpointRequest { id: id.clone() })
            .await;
        expect_code(listed, Code::NotFound);
    })
    .await
}
