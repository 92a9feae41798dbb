//! berthd as a host service: the systemd units, socket activation (also across an upgrade),
//! readiness and stop notifications, and the metrics operators scrape (per-RPC counts and
//! latencies, runtime command durations, per-container series).

use std::os::unix::net::UnixDatagram;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use berth_api::daemon_proto::UpgradeRequest;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::common::*;

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn tool(name: &str) -> Result<(), String> {
    match Command::new(name).arg("--version").output() {
        Ok(out) if out.status.success() => Ok(()),
        _ => Err(format!("{name} is not installed (apt-get install systemd)")),
    }
}

#[test]
fn the_systemd_units_pass_verify() {
    if !host_supports("needs systemd-analyze", tool("systemd-analyze")) {
        return;
    }
    // verify checks that ExecStart's binary exists: point it at the one cargo built.
    let dir = tempfile::tempdir().unwrap();
    let units = repo().join("contrib/systemd");
    let service = std::fs::read_to_string(units.join("berthd.service")).unwrap();
    assert!(service.contains("ExecStart=/usr/local/bin/berthd"));
    let service = service.replace("/usr/local/bin/berthd", env!("CARGO_BIN_EXE_berthd"));
    std::fs::write(dir.path().join("berthd.service"), service).unwrap();
    std::fs::copy(
        units.join("berthd.socket"),
        dir.path().join("berthd.socket"),
    )
    .unwrap();
    let out = Command::new("systemd-analyze")
        .arg("verify")
        .arg(dir.path().join("berthd.socket"))
        .arg(dir.path().join("berthd.service"))
        .current_dir(dir.path())
        .output()
        .expect("run systemd-analyze");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success() && stderr.trim().is_empty(), "{stderr}");
    for needed in [
        "Type=notify",
        "KillMode=process",
        "Delegate=yes",
        "TasksMax=",
    ] {
        assert!(
            std::fs::read_to_string(dir.path().join("berthd.service"))
                .unwrap()
                .contains(needed),
            "{needed}"
        );
    }
}

/// A script that runs berthd under `systemd-socket-activate`, listening on berthd's `--listen`
/// (the fixture passes it as the second argument).
fn activating_wrapper(dir: &Path) -> PathBuf {
    let script = dir.join("activate");
    std::fs::write(
        &script,
        format!(
            "#!/bin/sh\nexec systemd-socket-activate -l \"$2\" {} \"$@\"\n",
            env!("CARGO_BIN_EXE_berthd")
        ),
    )
    .unwrap();
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&script, std::fs::Permissions::from_mode(0o755)).unwrap();
    script
}

#[tokio::test(flavor = "multi_thread")]
async fn a_socket_activated_berthd_serves_and_keeps_serving_across_an_upgrade() {
    within(async {
        if !host_supports(
            "needs systemd-socket-activate",
            tool("systemd-socket-activate"),
        ) {
            return;
        }
        let tools = tempfile::tempdir().unwrap();
        let wrapper = activating_wrapper(tools.path());
        let mut d = daemon!(Options {
            binary: Some(&wrapper),
            ..Options::default()
        });
        let c = d.run("activated", &["sleep", "1000"]).await;
        let log = d.log();
        assert!(log.contains("berthd serving"), "{log}");
        assert!(
            log.contains("Execing"),
            "not started by systemd-socket-activate: {log}"
        );

        let (old, info) = upgrade_in_place(&d.socket()).await;
        assert_eq!(info.pid, old.pid);
        let mut client = d.connect().await;
        let listed = state(&mut client).await;
        assert!(listed.containers.iter().any(|x| x.id == c.id));
        d.client = client;
        let second = d.run("activated-after", &["sleep", "1000"]).await;

        // Stopping leaves the service manager's socket where it is.
        let mut events = d.events().await;
        for container in [&c, &second] {
            d.signal(&container.id, container.pid, SIGKILL).await;
            events.exit_status(&container.id, container.pid).await;
        }
        let status = d.stop();
        assert!(status.success(), "{status}");
        assert!(d.socket().exists(), "berthd removed the activated socket");
    })
    .await
}

/// Reads notifications until one contains `wanted`, returning everything read.
fn read_until(socket: &UnixDatagram, wanted: &str) -> String {
    let deadline = Instant::now() + Duration::from_secs(20);
    let mut seen = String::new();
    let mut buf = vec![0; 4096];
    while !seen.contains(wanted) {
        assert!(Instant::now() < deadline, "no {wanted} in {seen:?}");
        if let Ok(n) = socket.recv(&mut buf) {
            seen.push_str(&String::from_utf8_lossy(&buf[..n]));
            seen.push('\n');
        }
    }
    seen
}

#[tokio::test(flavor = "multi_thread")]
async fn readiness_watchdog_and_stop_reach_the_notify_socket() {
    within(async {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("notify");
        let socket = UnixDatagram::bind(&path).unwrap();
        socket
            .set_read_timeout(Some(Duration::from_millis(200)))
            .unwrap();
        let notify = path_str(&path);
        let mut d = daemon!(Options {
            env: &[("NOTIFY_SOCKET", &notify), ("WATCHDOG_USEC", "400000")],
            // A runtime given the notify socket waits for the container's READY=1, in vain.
            args: &["--runtime-timeout", "10"],
            ..Options::default()
        });
        let ready = read_until(&socket, "READY=1");
        assert!(ready.contains(&format!("MAINPID={}", d.pid())), "{ready}");
        // Ready means serving: a request answers at once.
        d.state().await;
        let mut events = d.events().await;
        let ctr = d.run("notified", &["sleep", "1000"]).await;
        d.kill_container(&mut events, &ctr.id, ctr.pid).await;
        read_until(&socket, "WATCHDOG=1");
        read_until(&socket, "WATCHDOG=1");
        // An upgrade: RELOADING=1 from the old image, READY=1 from the new one, same pid.
        let mut admin = berth_api::client::connect_daemon(&d.socket())
            .await
            .expect("connect to the Daemon service");
        admin.upgrade(UpgradeRequest {}).await.expect("Upgrade");
        let reloading = read_until(&socket, "RELOADING=1");
        assert!(reloading.contains("MONOTONIC_USEC="), "{reloading}");
        let ready = read_until(&socket, "READY=1");
        assert!(ready.contains(&format!("MAINPID={}", d.pid())), "{ready}");
        d.client = d.connect().await;
        d.state().await;
        let mut events = d.events().await;
        let ctr = d.run("notified-after-upgrade", &["sleep", "1000"]).await;
        d.kill_container(&mut events, &ctr.id, ctr.pid).await;
        let status = d.stop();
        assert!(status.success(), "{status}");
        read_until(&socket, "STOPPING=1");
    })
    .await
}

async fn scrape(socket: &Path) -> (String, Duration) {
    let started = Instant::now();
    let response = ask_metrics(socket, "GET /metrics HTTP/1.0").await;
    assert!(response.starts_with("HTTP/1.0 200"), "{response}");
    (response, started.elapsed())
}

/// The metrics endpoint's whole answer to `request` (its request line).
async fn ask_metrics(socket: &Path, request: &str) -> String {
    let mut stream = tokio::net::UnixStream::connect(socket)
        .await
        .unwrap_or_else(|e| panic!("connect {}: {e}", socket.display()));
    stream
        .write_all(format!("{request}\r\n\r\n").as_bytes())
        .await
        .unwrap();
    let mut response = String::new();
    stream.read_to_string(&mut response).await.unwrap();
    response
}

fn value(text: &str, series: &str) -> f64 {
    text.lines()
        .find_map(|line| line.strip_prefix(series)?.strip_prefix(' ')?.parse().ok())
        .unwrap_or_else(|| panic!("no {series} in:\n{text}"))
}

fn handled(method: &str, code: &str) -> String {
    format!(
        "berth_grpc_server_handled_total{{grpc_service=\"types.API\",grpc_method=\"{method}\",grpc_code=\"{code}\"}}"
    )
}

/// Whether a read saw its connection closed by berthd: end of file, or a reset where berthd
/// closed it with the client's byte unread.
fn closed(read: &Result<std::io::Result<usize>, tokio::time::error::Elapsed>) -> bool {
    match read {
        Ok(Ok(0)) => true,
        Ok(Err(e)) => e.kind() == std::io::ErrorKind::ConnectionReset,
        _ => false,
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn metrics_count_rpcs_by_code_with_latency_and_runtime_histograms() {
    within(async {
        let dir = tempfile::tempdir().unwrap();
        let metrics = dir.path().join("metrics.sock");
        let args = ["--metrics-listen", metrics.to_str().unwrap()];
        let mut d = daemon!(Options::args(&args));
        let first = d.run("metrics-a", &["sleep", "1000"]).await;
        let second = d.run("metrics-b", &["sleep", "1000"]).await;
        d.exec(exec_req(&first.id, &["true"])).await;
        let bad = create_req("bad id!", &first.bundle);
        expect_code(d.client.create_container(bad).await, tonic::Code::InvalidArgument);

        let (text, _) = scrape(&metrics).await;
        assert_eq!(value(&text, "berth_containers"), 2.0);
        // The two inits, and the added `true` unless it has exited already.
        let processes = value(&text, "berth_processes");
        assert!((2.0..=3.0).contains(&processes), "{processes}");
        assert_eq!(value(&text, &handled("CreateContainer", "OK")), 2.0);
        assert_eq!(value(&text, &handled("CreateContainer", "InvalidArgument")), 1.0);
        assert_eq!(value(&text, &handled("AddProcess", "OK")), 1.0);
        let count = "berth_grpc_server_handling_seconds_count{grpc_service=\"types.API\",grpc_method=\"CreateContainer\"}";
        assert_eq!(value(&text, count), 3.0);
        let inf = "berth_grpc_server_handling_seconds_bucket{le=\"+Inf\",grpc_service=\"types.API\",grpc_method=\"CreateContainer\"}";
        assert!(
            text.contains(inf) || text.contains("grpc_method=\"CreateContainer\",le=\"+Inf\""),
            "no +Inf bucket in:\n{text}"
        );
        // One `run --detach` per create under the default create mode.
        let creates = "berth_runtime_command_duration_seconds_count{operation=\"run\"}";
        assert_eq!(value(&text, creates), 2.0);
        assert!(value(&text, "berth_runtime_command_duration_seconds_count{operation=\"exec\"}") >= 1.0);
        // Each command waited for its turn first, if only for no time.
        let waits = "berth_runtime_turn_wait_seconds_count{operation=\"run\"}";
        assert_eq!(value(&text, waits), 2.0);
        assert!(text.contains("# TYPE berth_grpc_server_handling_seconds histogram"));
        assert!(!text.contains("berth_container_cpu_usage_seconds"), "per-container series are opt-in");
        // Only read: a POST is refused, a HEAD answered without the body.
        let post = ask_metrics(&metrics, "POST /metrics HTTP/1.0").await;
        assert!(post.starts_with("HTTP/1.0 405") && post.contains("allow: GET, HEAD"), "{post}");
        let head = ask_metrics(&metrics, "HEAD /metrics HTTP/1.0").await;
        assert!(head.starts_with("HTTP/1.0 200") && !head.contains("berth_containers"), "{head}");

        let mut events = d.events().await;
        for c in [&first, &second] {
            d.signal(&c.id, c.pid, SIGKILL).await;
            events.exit_status(&c.id, c.pid).await;
        }
    })
    .await
}

/// A flood of connections to the metrics endpoint (a TCP address is open to every local user)
/// holds at most `--metrics-max-connections` of berthd's fds, each for at most 10 s: a new one
/// takes the place of the oldest that has not sent a whole request (these send a byte), so a
/// scrape gets through during the flood, and the API is served meanwhile.
#[tokio::test(flavor = "multi_thread")]
async fn a_flood_of_metrics_connections_holds_a_bounded_few_of_berthds_fds() {
    within(async {
        const FLOOD: usize = 300;
        const PLACES: usize = 8;
        let dir = tempfile::tempdir().unwrap();
        let metrics = dir.path().join("metrics.sock");
        let places = PLACES.to_string();
        let args = [
            "--metrics-listen",
            metrics.to_str().unwrap(),
            "--metrics-max-connections",
            &places,
        ];
        let mut d = daemon!(Options::args(&args));
        let before = d.fds().len();
        scrape(&metrics).await;
        let flood_started = Instant::now();
        let mut flood = Vec::new();
        for _ in 0..FLOOD {
            let stream = tokio::net::UnixStream::connect(&metrics).await;
            let stream = stream.expect("connect to the metrics socket");
            // A byte of a request, never the rest: not yet asking.
            let _ = stream.try_write(b"G");
            flood.push(stream);
        }
        // Accepted in order, each silent one giving its place to the next: once the last but
        // PLACES is closed, berthd has seen them all.
        let mut byte = [0u8; 1];
        let evicted = &mut flood[FLOOD - PLACES - 1];
        let read = tokio::time::timeout(EVENT_TIMEOUT, evicted.read(&mut byte)).await;
        assert!(closed(&read), "an early one of the flood: {read:?}");
        // The evicted ones' tasks close their sockets as they are aborted, on a busy host a
        // moment after the eviction that the read above saw.
        let bound = before + PLACES..=before + PLACES + 2;
        let settle = Instant::now() + Duration::from_secs(5);
        let mut during = d.fds().len();
        while !bound.contains(&during) && Instant::now() < settle {
            tokio::time::sleep(Duration::from_millis(50)).await;
            during = d.fds().len();
        }
        assert!(
            bound.contains(&during),
            "berthd holds {during} fds during the flood, {before} before: the last {PLACES} \
             should hold a place each, the rest none"
        );
        d.state().await;
        // A scraper, which speaks at once, gets a place while the silent ones hold them all.
        let (_, took) = scrape(&metrics).await;
        assert!(
            took < Duration::from_secs(5),
            "a scrape during the flood took {took:?}"
        );
        // The last ones hold places until their deadline (10 s after they were accepted).
        let last = flood.last_mut().expect("the flood");
        let read = tokio::time::timeout(Duration::from_secs(30), last.read(&mut byte)).await;
        assert!(closed(&read), "the last of the flood: {read:?}");
        let held = flood_started.elapsed();
        assert!(
            (Duration::from_secs(9)..Duration::from_secs(20)).contains(&held),
            "a silent connection kept its place {held:?}, not about 10 s"
        );
        drop(flood);
        let deadline = Instant::now() + Duration::from_secs(10);
        while d.fds().len() > before {
            assert!(Instant::now() < deadline, "the flood's fds stay");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        scrape(&metrics).await;
        // One request a connection, also where HTTP/1.1 would keep it open.
        let mut stream = tokio::net::UnixStream::connect(&metrics).await.unwrap();
        stream
            .write_all(b"GET /metrics HTTP/1.1\r\nHost: localhost\r\n\r\n")
            .await
            .unwrap();
        let mut response = String::new();
        let read =
            tokio::time::timeout(Duration::from_secs(5), stream.read_to_string(&mut response));
        assert!(
            matches!(read.await, Ok(Ok(_))),
            "an HTTP/1.1 connection stays open after its response"
        );
        assert!(
            response.starts_with("HTTP/1.1 200")
                && response.to_ascii_lowercase().contains("connection: close"),
            "{}",
            &response[..response.len().min(300)]
        );
    })
    .await
}

#[tokio::test(flavor = "multi_thread")]
async fn per_container_series_follow_every_running_container() {
    within(async {
        let dir = tempfile::tempdir().unwrap();
        let metrics = dir.path().join("metrics.sock");
        let args = [
            "--metrics-listen",
            metrics.to_str().unwrap(),
            "--metrics-containers",
            "--stats-interval",
            "200ms",
        ];
        let mut d = daemon!(Options::args(&args));
        let busy = d
            .run("series-busy", &["sh", "-c", "while true; do :; done"])
            .await;
        let idle = d.run("series-idle", &["sleep", "1000"]).await;
        let cpu = |id: &str| format!("berth_container_cpu_usage_seconds_total{{id=\"{id}\"}}");
        let deadline = Instant::now() + Duration::from_secs(20);
        let first = loop {
            let (text, _) = scrape(&metrics).await;
            if text.contains(&cpu(&busy.id)) && text.contains(&cpu(&idle.id)) {
                break text;
            }
            assert!(
                Instant::now() < deadline,
                "no series for both containers:\n{text}"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        };
        // The busy one's series grows as it gets CPU, which a busy host may ration: wait for it.
        let deadline = Instant::now() + Duration::from_secs(20);
        let second = loop {
            let (text, _) = scrape(&metrics).await;
            let grew = value(&text, &cpu(&busy.id)) - value(&first, &cpu(&busy.id));
            if grew > 0.2 {
                break text;
            }
            assert!(Instant::now() < deadline, "busy CPU grew by only {grew}");
            tokio::time::sleep(Duration::from_millis(200)).await;
        };
        let idle_grew = value(&second, &cpu(&idle.id)) - value(&first, &cpu(&idle.id));
        assert!(idle_grew < 0.05, "idle CPU grew by {idle_grew}");
        for id in [&busy.id, &idle.id] {
            let series = format!("berth_container_memory_usage_bytes{{id=\"{id}\"}}");
            assert!(value(&second, &series) > 0.0);
            let kills = format!("berth_container_oom_kills_total{{id=\"{id}\"}}");
            assert_eq!(value(&second, &kills), 0.0);
            assert_eq!(
                second.matches(&cpu(id)).count(),
                1,
                "one series per container"
            );
        }

        let mut events = d.events().await;
        d.signal(&busy.id, busy.pid, SIGKILL).await;
        events.exit_status(&busy.id, busy.pid).await;
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let (text, _) = scrape(&metrics).await;
            if !text.contains(&cpu(&busy.id)) {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "series of an exited container stayed"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        d.signal(&idle.id, idle.pid, SIGKILL).await;
        events.exit_status(&idle.id, idle.pid).await;
    })
    .await
}
