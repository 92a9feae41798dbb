//! Limits that keep one client from costing the others: process specs bounded where they enter,
//! State never built larger than it may be sent, and idle connections that can neither lock
//! out a client that talks nor make berthd spin.

use std::time::{Duration, Instant};

use berth_api::proto::{SignalRequest, StateRequest, UpdateContainerRequest, User};
use tonic::Code;

use crate::common::*;

/// berthd's CPU time (user + system) in clock ticks, from /proc/<pid>/stat.
fn cpu_ticks(pid: u32) -> u64 {
    let text = std::fs::read_to_string(format!("/proc/{pid}/stat")).expect("berthd stat");
    let fields: Vec<&str> = text[text.rfind(')').expect("comm") + 2..]
        .split_whitespace()
        .collect();
    // utime and stime are fields 14 and 15; the slice starts at field 3.
    fields[11].parse::<u64>().expect("utime") + fields[12].parse::<u64>().expect("stime")
}

#[tokio::test(flavor = "multi_thread")]
async fn oversized_process_specs_are_refused_where_they_enter() {
    within(async {
        let flags = ["--max-process-spec-bytes", "16384"];
        let mut d = daemon!(Options::args(&flags));
        let mut events = d.events().await;
        let ctr = d.run("spec-limit", &["sleep", "1000"]).await;
        let baseline = d.baseline();

        // Over the spec limit, within the largest request (twice the spec limit and 64 KiB).
        let big = "x".repeat(40_000);
        let request = exec_req(&ctr.id, &["echo", &big]);
        let message = expect_code(d.client.add_process(request).await, Code::ResourceExhausted);
        assert!(
            message.contains("--max-process-spec-bytes (16384)"),
            "{message}"
        );
        assert!(
            message.len() < 300,
            "the client's input echoed: {} bytes",
            message.len()
        );
        let mut request = exec_req(&ctr.id, &["true"]);
        request.env = vec![format!("BIG={big}")];
        expect_code(d.client.add_process(request).await, Code::ResourceExhausted);
        // cwd and the additional gids (4 bytes each) count too, each within what it may be.
        let mut request = exec_req(&ctr.id, &["true", &"a".repeat(13_000)]);
        request.cwd = format!("/{}", "c".repeat(4000));
        expect_code(d.client.add_process(request).await, Code::ResourceExhausted);
        let mut request = exec_req(&ctr.id, &["true"]);
        request.user = Some(User {
            uid: 0,
            gid: 0,
            additional_gids: vec![7; 5000],
        });
        let message = expect_code(d.client.add_process(request).await, Code::ResourceExhausted);
        assert!(
            message.contains("--max-process-spec-bytes (16384)"),
            "{message}"
        );
        d.assert_settles(&baseline).await;
        d.assert_no_zombies().await;

        let bundle = Bundle::new(&["sleep", "1000"]);
        bundle.edit(|c| c["process"]["env"] = vec![format!("BIG={big}")].into());
        let id = id("spec-limit-bundle");
        let message = expect_code(
            d.client.create_container(create_req(&id, &bundle)).await,
            Code::ResourceExhausted,
        );
        assert!(message.contains("--max-process-spec-bytes"), "{message}");
        d.assert_gone(&id).await;
        d.kill_container(&mut events, &ctr.id, ctr.pid).await;
    })
    .await
}

#[tokio::test(flavor = "multi_thread")]
async fn state_is_never_built_larger_than_it_may_be_sent() {
    within(async {
        let flags = [
            "--max-message-bytes",
            "65536",
            "--max-process-spec-bytes",
            "24576",
        ];
        let mut d = daemon!(Options::args(&flags));
        let mut events = d.events().await;
        let small = d.run("state-small", &["sleep", "1000"]).await;
        let ctr = d.run("state-big", &["sleep", "1000"]).await;
        let other = d.run("state-big-too", &["sleep", "1000"]).await;
        let arg = "y".repeat(20_000);
        let mut added = Vec::new();
        for big in [&ctr, &other] {
            for _ in 0..2 {
                let exec = exec_req(&big.id, &["sh", "-c", "sleep 1000", &arg]);
                added.push((big.id.clone(), d.exec(exec).await));
            }
        }
        // One container's processes stay within what its own State can answer.
        let third = exec_req(&ctr.id, &["sh", "-c", "sleep 1000", &arg]);
        let message = expect_code(d.client.add_process(third).await, Code::ResourceExhausted);
        assert!(
            message.contains("more than its State can answer")
                && message.contains("--max-message-bytes, 43690"),
            "{message}"
        );
        // All of them together do not fit.
        let message = expect_code(
            d.client.state(StateRequest::default()).await,
            Code::ResourceExhausted,
        );
        assert!(
            message.contains("--max-message-bytes (65536)") && message.contains("StateRequest.id"),
            "{message}"
        );
        // A request over the limit is refused as gRPC's other servers do, naming the flag.
        let too_big = exec_req(&ctr.id, &["true", &"z".repeat(70_000)]);
        let message = expect_code(d.client.add_process(too_big).await, Code::ResourceExhausted);
        assert!(
            message.starts_with("request of ")
                && message.ends_with(" bytes is over --max-message-bytes (65536)"),
            "{message}"
        );
        // One container at a time still answers, for the one that fits.
        let one = d
            .client
            .state(StateRequest {
                id: small.id.clone(),
            })
            .await
            .expect("State of one container")
            .into_inner();
        let ids: Vec<&str> = one.containers.iter().map(|c| c.id.as_str()).collect();
        assert_eq!(ids, [small.id.as_str()]);
        let unknown = StateRequest {
            id: id("state-unknown"),
        };
        expect_code(d.client.state(unknown).await, Code::NotFound);
        for (id, pid) in added {
            d.signal(&id, pid, SIGKILL).await;
            assert_eq!(events.exit_status(&id, pid).await, 137);
        }
        assert_eq!(d.state().await.containers.len(), 3);
        for c in [&ctr, &other, &small] {
            d.kill_container(&mut events, &c.id, c.pid).await;
        }
    })
    .await
}

#[tokio::test(flavor = "multi_thread")]
async fn a_container_runs_at_most_its_limit_of_added_processes() {
    within(async {
        let flags = ["--max-processes-per-container", "2"];
        let mut d = daemon!(Options::args(&flags));
        let mut events = d.events().await;
        let ctr = d.run("process-limit", &["sleep", "1000"]).await;
        let baseline = d.baseline();
        let first = d.exec(exec_req(&ctr.id, &["sleep", "1000"])).await;
        let second = d.exec(exec_req(&ctr.id, &["sleep", "1000"])).await;
        let message = expect_code(
            d.client
                .add_process(exec_req(&ctr.id, &["sleep", "1000"]))
                .await,
            Code::ResourceExhausted,
        );
        assert!(
            message.contains("already runs 2 added processes")
                && message.contains("--max-processes-per-container"),
            "{message}"
        );
        let pids: Vec<u32> = d.state().await.containers[0]
            .processes
            .iter()
            .map(|p| p.pid)
            .collect();
        assert_eq!(
            pids.len(),
            3,
            "the refused process was not started: {pids:?}"
        );
        // Once one has exited, its place is free again.
        d.signal(&ctr.id, first, SIGKILL).await;
        assert_eq!(events.exit_status(&ctr.id, first).await, 137);
        let third = d.exec(exec_req(&ctr.id, &["sleep", "1000"])).await;
        for pid in [second, third] {
            d.signal(&ctr.id, pid, SIGKILL).await;
            assert_eq!(events.exit_status(&ctr.id, pid).await, 137);
        }
        d.assert_settles(&baseline).await;
        d.kill_container(&mut events, &ctr.id, ctr.pid).await;
        d.assert_no_zombies().await;
    })
    .await
}

#[tokio::test(flavor = "multi_thread")]
async fn oversized_input_is_refused_without_being_echoed() {
    within(async {
        let mut d = daemon!();
        let mut events = d.events().await;
        let ctr = d.run("echo-limit", &["sleep", "1000"]).await;
        let big = "z".repeat(100_000);
        let update = UpdateContainerRequest {
            id: ctr.id.clone(),
            status: big.clone(),
            ..Default::default()
        };
        let message = expect_code(
            d.client.update_container(update).await,
            Code::InvalidArgument,
        );
        assert!(message.len() < 400, "{} bytes echoed", message.len());
        assert!(message.contains("(100000 bytes)"), "{message}");
        let unknown = UpdateContainerRequest {
            id: big.clone(),
            status: "paused".into(),
            ..Default::default()
        };
        let message = expect_code(
            d.client.update_container(unknown).await,
            Code::InvalidArgument,
        );
        assert!(message.len() < 400, "{} bytes echoed", message.len());
        let mut exec = exec_req(&ctr.id, &["true"]);
        exec.cwd = big;
        let message = expect_code(d.client.add_process(exec).await, Code::InvalidArgument);
        assert!(message.len() < 400, "{} bytes echoed", message.len());
        d.kill_container(&mut events, &ctr.id, ctr.pid).await;
    })
    .await
}

/// A request's id reaches berthd's log escaped and bounded, whatever it holds and whichever
/// request carries it: a newline cannot start a forged line (an audit line, say), and a
/// megabyte id does not make megabyte lines.
#[tokio::test(flavor = "multi_thread")]
async fn hostile_ids_reach_the_log_escaped_and_bounded() {
    within(async {
        let mut d = daemon!();
        let bundle = Bundle::new(&["true"]);
        let forged = "forged-line INFO berth::audit: request peer_uid=0 rpc=\"Daemon.Upgrade\"";
        for hostile in [format!("x\n{forged}"), "h".repeat(1 << 18)] {
            let create = d
                .client
                .create_container(create_req(&hostile, &bundle))
                .await;
            expect_code(create, Code::InvalidArgument);
            let update = UpdateContainerRequest {
                id: hostile.clone(),
                status: "paused".into(),
                signal: 0,
            };
            expect_code(
                d.client.update_container(update).await,
                Code::InvalidArgument,
            );
            let signal = SignalRequest {
                id: hostile.clone(),
                pid: 1,
                signal: SIGKILL,
            };
            expect_code(d.client.signal(signal).await, Code::InvalidArgument);
            let exec = exec_req(&hostile, &["true"]);
            expect_code(d.client.add_process(exec).await, Code::InvalidArgument);
            let state = StateRequest { id: hostile };
            expect_code(d.client.state(state).await, Code::InvalidArgument);
        }
        let log = d.log();
        assert!(
            log.contains("forged-line"),
            "the requests were not logged:\n{log}"
        );
        assert!(
            !log.lines().any(|line| line.starts_with("forged-line")),
            "a client forged a log line:\n{log}"
        );
        let longest = log.lines().map(str::len).max().unwrap_or(0);
        assert!(longest < 4096, "a log line of {longest} bytes");
    })
    .await
}

/// Raises this test process's open file limit to its hard limit, for the flood's sockets.
fn raise_own_fd_limit() -> u64 {
    use rustix::process::{Resource, Rlimit, getrlimit, setrlimit};
    let limit = getrlimit(Resource::Nofile);
    let raised = Rlimit {
        current: limit.maximum,
        maximum: limit.maximum,
    };
    setrlimit(Resource::Nofile, raised).expect("raise RLIMIT_NOFILE");
    limit.maximum.unwrap_or(u64::MAX)
}

#[tokio::test(flavor = "multi_thread")]
async fn a_flood_of_silent_connections_neither_locks_out_a_client_nor_spins() {
    within(async {
        const FLOOD: usize = 3000;
        if raise_own_fd_limit() < FLOOD as u64 + 256 {
            skip(&format!("needs an open file limit above {}", FLOOD + 256));
            return;
        }
        let flags = ["--max-connections", "256", "--handshake-timeout", "60s"];
        let d = daemon!(Options::args(&flags));
        let socket = d.socket();
        let started = Instant::now();
        let mut flood = Vec::with_capacity(FLOOD);
        while flood.len() < FLOOD {
            let connect = tokio::net::UnixStream::connect(&socket);
            match tokio::time::timeout(Duration::from_secs(5), connect).await {
                Ok(Ok(stream)) => flood.push(stream),
                // The listen backlog is full until berthd accepts: try again.
                Ok(Err(e)) if e.kind() == std::io::ErrorKind::WouldBlock => {
                    tokio::time::sleep(Duration::from_millis(1)).await
                }
                Ok(Err(e)) => panic!("connection {} of the flood: {e}", flood.len()),
                Err(_) => panic!("connection {} of the flood hung", flood.len()),
            }
        }
        let flooded = started.elapsed();
        // A client that talks is served while the silent ones are still open.
        let served = Instant::now();
        let mut client = tokio::time::timeout(Duration::from_secs(5), d.connect())
            .await
            .expect("a fresh client connects during the flood");
        tokio::time::timeout(Duration::from_secs(5), client.state(StateRequest::default()))
            .await
            .expect("State answers during the flood")
            .expect("State");
        let answered = served.elapsed();
        // Idle, berthd must be idle too: no accept loop spinning on a full table.
        let before = cpu_ticks(d.pid());
        let window = Duration::from_secs(2);
        tokio::time::sleep(window).await;
        let used = cpu_ticks(d.pid()) - before;
        // /proc reports CPU time in USER_HZ, which Linux fixes at 100 for user space.
        let percent = used as f64 * 100.0 / (100.0 * window.as_secs_f64());
        println!(
            "flood of {FLOOD} silent connections took {flooded:?}; a fresh client was answered in {answered:?}; berthd used {percent:.1}% CPU over {window:?} after it"
        );
        assert!(
            percent < 10.0,
            "berthd used {percent:.1}% CPU while only silent connections were open"
        );
        drop(flood);
    })
    .await
}

/// Opens `streams` idle Events streams, 250 a connection, then ends them all by closing their
/// connections; berthd's RSS while they were open.
async fn open_and_end_idle_streams(d: &Daemon, streams: usize) -> u64 {
    const PER_CONNECTION: usize = 250;
    let mut clients = Vec::new();
    let mut open = Vec::new();
    while open.len() < streams {
        let mut client = d.connect().await;
        for _ in 0..PER_CONNECTION.min(streams - open.len()) {
            open.push(Events::subscribe(&mut client).await);
        }
        clients.push(client);
    }
    let rss = status_kib(d.pid(), "VmRSS");
    drop(open);
    drop(clients);
    rss
}

/// berthd's RSS once it is at most `bound` KiB, or after `patience` if it never gets there.
async fn rss_settled_under(pid: u32, bound: u64, patience: Duration) -> u64 {
    let deadline = Instant::now() + patience;
    loop {
        let rss = status_kib(pid, "VmRSS");
        if rss <= bound || Instant::now() > deadline {
            return rss;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// The memory idle streams held goes back to the kernel once they end, round after round.
/// glibc's malloc kept it before (RSS stayed at each round's peak and grew with every round, so
/// 20,000 streams a round took berthd 18 → 142 → 189 → 223 MB); berthd now trims the heap
/// about a second after connections and streams end.
#[tokio::test(flavor = "multi_thread")]
async fn memory_of_idle_streams_is_returned_when_they_end() {
    within(async {
        const STREAMS: usize = 2500;
        let d = daemon!();
        let idle = status_kib(d.pid(), "VmRSS");
        let mut first_open = None;
        for round in 1..=3 {
            let open = open_and_end_idle_streams(&d, STREAMS).await;
            let held = open.saturating_sub(idle);
            let bound = idle + held / 2;
            // Ending 2500 streams takes berthd a moment, seconds on a loaded host.
            let after = rss_settled_under(d.pid(), bound, Duration::from_secs(20)).await;
            println!(
                "round {round}: berthd RSS {idle} KiB idle, {open} KiB with {STREAMS} idle Events streams, {after} KiB after they ended"
            );
            assert!(
                after <= bound,
                "round {round}: {after} KiB 20 s after the streams ended, over {bound} KiB (idle {idle}, open {open})"
            );
            let first = *first_open.get_or_insert(open);
            assert!(
                open <= first + first.saturating_sub(idle) / 4,
                "round {round} grew berthd again: {idle} idle, {first} KiB in the first round, {open} KiB now"
            );
        }
    })
    .await
}

/// Writes, in `dir`, runc behind a wrapper that notes in `runs` when each of its `run`s
/// begins and ends, and holds each for 0.3 s before runc runs (6 s for ids that start with
/// `stuck-`), so that runs asked for together overlap.
fn timing_runtime(dir: &std::path::Path) -> std::path::PathBuf {
    let body = format!(
        r#"#!/bin/sh
for arg in "$@"; do last=$arg; done
case " $* " in
*" run "*)
  echo "$last start $(date +%s.%N)" >> {dir}/runs
  case $last in stuck-*) sleep 6 ;; *) sleep 0.3 ;; esac
  {runc} "$@"
  status=$?
  echo "$last end $(date +%s.%N)" >> {dir}/runs
  exit $status ;;
esac
exec {runc} "$@"
"#,
        dir = dir.display(),
        runc = runc_in_path().display()
    );
    write_script(dir, "timing-runc", &body)
}

/// One run the timing runtime saw: its container, and when it began and ended (seconds).
#[derive(Debug)]
struct Run {
    id: String,
    start: f64,
    end: Option<f64>,
}

fn runs(dir: &std::path::Path) -> Vec<Run> {
    let text = std::fs::read_to_string(dir.join("runs")).unwrap_or_default();
    let mut runs: Vec<Run> = Vec::new();
    for line in text.lines() {
        let [id, what, at] = line.split(' ').collect::<Vec<_>>()[..] else {
            panic!("a line of runs: {line:?}");
        };
        let at: f64 = at.parse().expect("a time");
        match what {
            "start" => runs.push(Run {
                id: id.to_owned(),
                start: at,
                end: None,
            }),
            _ => {
                let run = runs.iter_mut().find(|r| r.id == id).expect("a run begun");
                run.end = Some(at);
            }
        }
    }
    runs
}

/// For each run, how many others were running as it began and had begun less than 1.5 s
/// before: within their turn's 2 s lease, less the time before the wrapper notes the start.
fn others_in_their_turn(runs: &[Run]) -> Vec<usize> {
    runs.iter()
        .map(|run| {
            runs.iter()
                .filter(|other| other.id != run.id && other.start <= run.start)
                .filter(|other| other.end.is_none_or(|end| run.start < end))
                .filter(|other| run.start - other.start < 1.5)
                .count()
        })
        .collect()
}

/// A burst of creates runs at most --max-runtime-processes runtimes at once; the others wait
/// for a turn, and every create succeeds.
#[tokio::test(flavor = "multi_thread")]
async fn runtime_commands_beyond_the_limit_wait_for_a_turn() {
    within(async {
        let scripts = tempfile::TempDir::new().expect("temp dir");
        let runtime = path_str(&timing_runtime(scripts.path()));
        let flags = ["--runtime", &runtime, "--max-runtime-processes", "2"];
        let mut d = daemon!(Options::args(&flags));
        let mut events = d.events().await;
        let bundles: Vec<Bundle> = (0..6).map(|_| Bundle::new(&["sleep", "1000"])).collect();
        let ids: Vec<String> = (0..6).map(|i| id(&format!("turn-{i}"))).collect();
        let mut creates = Vec::new();
        for (id, bundle) in ids.iter().zip(&bundles) {
            let mut client = d.connect().await;
            let req = create_req(id, bundle);
            creates.push(async move { create(&mut client, req).await });
        }
        let pids = futures_util::future::join_all(creates).await;
        let runs = runs(scripts.path());
        assert_eq!(runs.len(), 6, "one run per create: {runs:?}");
        assert_eq!(
            others_in_their_turn(&runs).iter().max(),
            Some(&1),
            "two runtimes at once in their turns, no more: {runs:?}"
        );
        for (id, pid) in ids.iter().zip(pids) {
            d.kill_container(&mut events, id, pid).await;
        }
    })
    .await
}

/// A runtime command still running after its lease (2 s) gives its turn up: a create whose
/// runtime is stuck holds the next one back no longer than that.
#[tokio::test(flavor = "multi_thread")]
async fn a_runtime_stuck_past_its_lease_does_not_hold_back_the_next_create() {
    within(async {
        let scripts = tempfile::TempDir::new().expect("temp dir");
        let runtime = path_str(&timing_runtime(scripts.path()));
        let flags = ["--runtime", &runtime, "--max-runtime-processes", "1"];
        let mut d = daemon!(Options::args(&flags));
        let mut events = d.events().await;
        let (stuck_bundle, next_bundle) = (
            Bundle::new(&["sleep", "1000"]),
            Bundle::new(&["sleep", "1000"]),
        );
        let stuck = id("stuck-lease");
        let mut client = d.connect().await;
        let req = create_req(&stuck, &stuck_bundle);
        let stuck_create = tokio::spawn(async move { create(&mut client, req).await });
        while runs(scripts.path()).is_empty() {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let next = id("after-lease");
        let next_pid = d.create(create_req(&next, &next_bundle)).await;
        assert!(
            !stuck_create.is_finished(),
            "the next create waited for the stuck one: its runtime kept the only turn past the lease"
        );
        let stuck_pid = stuck_create.await.expect("the stuck create's task");
        d.kill_container(&mut events, &next, next_pid).await;
        d.kill_container(&mut events, &stuck, stuck_pid).await;
    })
    .await
}
