//! GetStats, OOM events and the metrics endpoint against a real berthd, real runc containers and
//! their real cgroups (v1 on this host).

use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::common::*;
use berth_api::proto::{Stats, StatsRequest};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// Short, so a test sees several samples quickly.
const INTERVAL: &str = "200ms";
const SAMPLE_TIMEOUT: Duration = Duration::from_secs(10);

async fn subscribe(client: &mut Client, id: &str) -> tonic::Streaming<Stats> {
    client
        .get_stats(StatsRequest { id: id.to_owned() })
        .await
        .unwrap_or_else(|status| panic!("GetStats {id}: {status:?}"))
        .into_inner()
}

async fn next_sample(stream: &mut tonic::Streaming<Stats>) -> Stats {
    match tokio::time::timeout(SAMPLE_TIMEOUT, stream.message()).await {
        Ok(Ok(Some(stats))) => stats,
        Ok(Ok(None)) => panic!("stats stream ended"),
        Ok(Err(status)) => panic!("stats stream failed: {status:?}"),
        Err(_) => panic!("no sample within {SAMPLE_TIMEOUT:?}"),
    }
}

fn cpu_total(stats: &Stats) -> u64 {
    let cpu = stats
        .cgroup_stats
        .as_ref()
        .unwrap()
        .cpu_stats
        .as_ref()
        .unwrap();
    cpu.cpu_usage.as_ref().unwrap().total_usage
}

/// A berthd with a short stats interval and its metrics endpoint on a unix socket.
async fn stats_daemon(metrics: &Path) -> Option<Daemon> {
    let metrics = path_str(metrics);
    let args = ["--stats-interval", INTERVAL, "--metrics-listen", &metrics];
    Daemon::start(Options::args(&args)).await
}

async fn scrape(socket: &Path) -> String {
    let mut stream = tokio::net::UnixStream::connect(socket)
        .await
        .unwrap_or_else(|e| panic!("connect {}: {e}", socket.display()));
    stream
        .write_all(b"GET /metrics HTTP/1.0\r\n\r\n")
        .await
        .unwrap();
    let mut response = String::new();
    stream.read_to_string(&mut response).await.unwrap();
    assert!(response.starts_with("HTTP/1.0 200"), "{response}");
    response
}

fn metric(text: &str, name: &str) -> f64 {
    text.lines()
        .find_map(|line| line.strip_prefix(name)?.strip_prefix(' ')?.parse().ok())
        .unwrap_or_else(|| panic!("no metric {name} in:\n{text}"))
}

fn metrics_socket(dir: &tempfile::TempDir) -> PathBuf {
    dir.path().join("metrics.sock")
}

#[tokio::test]
async fn a_busy_container_reports_growing_cpu_memory_and_its_network() {
    let dir = tempfile::tempdir().unwrap();
    let Some(mut d) = stats_daemon(&metrics_socket(&dir)).await else {
        return;
    };
    within(async {
        let ctr = d
            .run("stats-busy", &["sh", "-c", "while :; do :; done"])
            .await;
        let mut stream = subscribe(&mut d.client, &ctr.id).await;
        let samples = [
            next_sample(&mut stream).await,
            next_sample(&mut stream).await,
            next_sample(&mut stream).await,
        ];
        let totals: Vec<u64> = samples.iter().map(cpu_total).collect();
        assert!(
            totals[0] < totals[1] && totals[1] < totals[2],
            "cpu does not grow: {totals:?}"
        );
        assert!(samples[0].timestamp < samples[1].timestamp);
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_nanos() as u64;
        let age = Duration::from_nanos(now.saturating_sub(samples[2].timestamp));
        assert!(age < Duration::from_secs(5), "timestamp {age:?} old");
        let cgroup = samples[2].cgroup_stats.as_ref().unwrap();
        let usage = cgroup
            .cpu_stats
            .as_ref()
            .unwrap()
            .cpu_usage
            .as_ref()
            .unwrap();
        assert_eq!(usage.percpu_usage.len(), possible_cpus());
        assert_eq!(usage.percpu_usage.iter().sum::<u64>(), usage.total_usage);
        assert!(usage.usage_in_usermode > 0, "{usage:?}");
        let memory = cgroup.memory_stats.as_ref().unwrap();
        assert!(memory.usage.as_ref().unwrap().usage > 0, "{memory:?}");
        assert!(memory.usage.as_ref().unwrap().max_usage > 0, "{memory:?}");
        assert!(memory.stats.contains_key("rss"), "{:?}", memory.stats);
        let names: Vec<&str> = samples[2]
            .network_stats
            .iter()
            .map(|n| n.name.as_str())
            .collect();
        assert!(names.contains(&"lo"), "interfaces: {names:?}");
        assert!(cgroup.hugetlb_stats.is_empty() || cgroup.hugetlb_stats.contains_key("2MB"));
        d.signal(&ctr.id, ctr.pid, SIGKILL).await;
    })
    .await;
}

/// Runs `ip` with `args` in the network namespace of `pid`, `input` on its stdin.
fn ip_in_netns_of(pid: u32, args: &[&std::ffi::OsStr], input: &str) {
    use std::io::Write;
    let mut ip = std::process::Command::new("nsenter")
        .args(["-t", &pid.to_string(), "-n", "ip"])
        .args(args)
        .stdin(std::process::Stdio::piped())
        .spawn()
        .expect("nsenter (util-linux) and ip (iproute2)");
    ip.stdin
        .take()
        .unwrap()
        .write_all(input.as_bytes())
        .unwrap();
    let status = ip.wait().unwrap();
    assert!(status.success(), "ip {args:?}: {status}");
}

/// The kernel hands `net/dev` over a page at a time, about 35 interfaces: a container with more
/// has every one reported, and one it names with bytes that are not UTF-8 (the kernel takes
/// any but `/`, `:` and white space) costs the others nothing.
#[tokio::test]
async fn every_interface_of_a_container_with_many_is_reported() {
    use std::ffi::OsStr;
    use std::os::unix::ffi::OsStrExt;
    let dir = tempfile::tempdir().unwrap();
    let Some(mut d) = stats_daemon(&metrics_socket(&dir)).await else {
        return;
    };
    within(async {
        let ctr = d.run("stats-veths", &["sleep", "1000"]).await;
        let pairs = 40;
        let batch: String = (0..pairs)
            .map(|n| format!("link add va{n} type veth peer name vb{n}\n"))
            .collect();
        ip_in_netns_of(ctr.pid, &[OsStr::new("-batch"), OsStr::new("-")], &batch);
        let not_utf8 = OsStr::from_bytes(b"\xff\xfeq");
        let rename = ["link", "set", "vb0", "name"].map(OsStr::new);
        ip_in_netns_of(ctr.pid, &[&rename[..], &[not_utf8]].concat(), "");
        let mut stream = subscribe(&mut d.client, &ctr.id).await;
        let sample = next_sample(&mut stream).await;
        let names: std::collections::BTreeSet<&str> = sample
            .network_stats
            .iter()
            .map(|n| n.name.as_str())
            .collect();
        assert_eq!(sample.network_stats.len(), 2 * pairs + 1, "{names:?}");
        let mut expected: std::collections::BTreeSet<String> = (0..pairs)
            .map(|n| format!("va{n}"))
            .chain((1..pairs).map(|n| format!("vb{n}")))
            .collect();
        expected.extend(["lo".to_owned(), "\u{fffd}\u{fffd}q".to_owned()]);
        let expected: std::collections::BTreeSet<&str> =
            expected.iter().map(String::as_str).collect();
        assert_eq!(names, expected);
        d.signal(&ctr.id, ctr.pid, SIGKILL).await;
    })
    .await;
}

#[tokio::test]
async fn two_hundred_subscribers_share_one_read_batch_per_tick() {
    let dir = tempfile::tempdir().unwrap();
    let socket = metrics_socket(&dir);
    let Some(mut d) = stats_daemon(&socket).await else {
        return;
    };
    within(async {
        let ctr = d.run("stats-fanout", &["sleep", "1000"]).await;
        // Several connections: one HTTP/2 connection caps its concurrent streams.
        let mut clients = Vec::new();
        for _ in 0..4 {
            clients.push(d.connect().await);
        }
        // Nothing is read for a container nobody subscribes to, so counting starts here.
        let before = scrape(&socket).await;
        assert_eq!(metric(&before, "berth_stats_containers"), 0.0);
        let (batches_before, files_before) = (
            metric(&before, "berth_sampler_batches_total"),
            metric(&before, "berth_sampler_files_read_total"),
        );
        let started = std::time::Instant::now();
        let mut streams = Vec::new();
        for n in 0..200 {
            streams.push(subscribe(&mut clients[n % 4], &ctr.id).await);
        }
        let subscribed = scrape(&socket).await;
        assert_eq!(metric(&subscribed, "berth_stats_subscribers"), 200.0);
        assert_eq!(metric(&subscribed, "berth_stats_containers"), 1.0);
        let received = futures_util::future::join_all(streams.iter_mut().map(|s| async {
            let mut timestamps = Vec::new();
            for _ in 0..3 {
                timestamps.push(next_sample(s).await.timestamp);
            }
            timestamps
        }))
        .await;
        let elapsed = started.elapsed();
        let after = scrape(&socket).await;
        let batches = metric(&after, "berth_sampler_batches_total") - batches_before;
        let files = metric(&after, "berth_sampler_files_read_total") - files_before;
        // Every subscriber got its samples from the shared ticks, not from reads of its own: 600
        // samples carry no more distinct timestamps than there were batches.
        let mut timestamps: Vec<u64> = received.into_iter().flatten().collect();
        assert_eq!(timestamps.len(), 600);
        timestamps.sort_unstable();
        timestamps.dedup();
        assert!(
            timestamps.len() as f64 <= batches,
            "{} distinct samples from {batches} batches",
            timestamps.len()
        );
        let ticks = elapsed.as_secs_f64() / 0.2;
        assert!(batches >= 3.0, "{batches} batches");
        assert!(
            batches <= ticks.ceil() + 2.0,
            "{batches} batches in {elapsed:?}, about {ticks:.1} ticks"
        );
        // Each batch read the container's files once, whatever the number of subscribers.
        let per_batch = files / batches;
        assert_eq!(per_batch.fract(), 0.0, "{files} files in {batches} batches");
        assert!(
            (5.0..=40.0).contains(&per_batch),
            "{per_batch} files a batch"
        );
        d.signal(&ctr.id, ctr.pid, SIGKILL).await;
    })
    .await;
}

#[tokio::test]
async fn the_stream_ends_when_the_container_exits_and_unknown_ids_are_not_found() {
    let dir = tempfile::tempdir().unwrap();
    let Some(mut d) = stats_daemon(&metrics_socket(&dir)).await else {
        return;
    };
    within(async {
        let unknown = d
            .client
            .get_stats(StatsRequest {
                id: "no-such-container".into(),
            })
            .await;
        let message = expect_code(unknown, tonic::Code::NotFound);
        assert!(message.contains("no-such-container"), "{message}");
        let ctr = d.run("stats-end", &["sleep", "1000"]).await;
        let mut stream = subscribe(&mut d.client, &ctr.id).await;
        next_sample(&mut stream).await;
        let baseline = d.fds();
        d.signal(&ctr.id, ctr.pid, SIGKILL).await;
        let end = tokio::time::timeout(SAMPLE_TIMEOUT, async {
            loop {
                match stream.message().await {
                    Ok(Some(_)) => continue,
                    other => return other,
                }
            }
        })
        .await
        .expect("the stream ends within 10 s of the exit");
        assert!(matches!(end, Ok(None)), "ended with {end:?}");
        // The container's stats files are closed with it.
        let open: Vec<String> = d
            .fds()
            .into_iter()
            .filter(|fd| fd.contains(&ctr.id))
            .collect();
        assert!(
            open.is_empty(),
            "still open: {open:?} (baseline {baseline:?})"
        );
        let again = d
            .client
            .get_stats(StatsRequest { id: ctr.id.clone() })
            .await;
        expect_code(again, tonic::Code::NotFound);
    })
    .await;
}

#[tokio::test]
async fn a_container_over_its_memory_limit_gets_oom_then_exit_137() {
    let dir = tempfile::tempdir().unwrap();
    let Some(mut d) = stats_daemon(&metrics_socket(&dir)).await else {
        return;
    };
    within(async {
        let id = id("stats-oom");
        // The shell keeps the command's 64 MiB of output in its own memory.
        let bundle = Bundle::new(&[
            "sh",
            "-c",
            "read x < /tmp/go; x=$(busybox head -c 67108864 /dev/zero | busybox tr '\\0' x); echo survived",
        ]);
        bundle.edit(|c| {
            c["linux"]["resources"]["memory"] = serde_json::json!({"limit": 16 * 1024 * 1024});
        });
        let gate = bundle.gate("go");
        let mut events = d.events().await;
        let pid = d.create(create_req(&id, &bundle)).await;
        // Registered now: let it allocate.
        let _gate = open_gate(&gate);
        let oom = events
            .wait_for("oom", |e| {
                e.id == id && (e.r#type == "oom" || e.r#type == "exit")
            })
            .await;
        assert_eq!(oom.r#type, "oom", "exit came before oom: {oom:?}");
        assert_eq!(oom.pid, pid);
        assert_eq!(events.exit_status(&id, pid).await, 137);
    })
    .await;
}

/// The sampler relies on this: reading an open cgroup file again at offset 0 gives the current
/// value, not the one from the first read.
#[tokio::test]
async fn a_read_at_offset_zero_of_an_open_cgroup_file_is_fresh() {
    let dir = tempfile::tempdir().unwrap();
    let Some(mut d) = stats_daemon(&metrics_socket(&dir)).await else {
        return;
    };
    within(async {
        let ctr = d
            .run("stats-fresh", &["sh", "-c", "while :; do :; done"])
            .await;
        let cgroup = cgroups_of(ctr.pid)
            .into_iter()
            .find(|p| p.join("cpuacct.usage").exists())
            .expect("a cpuacct cgroup");
        for name in ["cpuacct.usage", "cpuacct.usage_all"] {
            let path = cgroup.join(name);
            let file = std::fs::File::open(&path).unwrap();
            let read = || {
                let mut buf = [0u8; 4096];
                let n = rustix::io::pread(&file, &mut buf, 0).unwrap();
                String::from_utf8_lossy(&buf[..n]).into_owned()
            };
            let first = read();
            tokio::time::sleep(Duration::from_millis(100)).await;
            let second = read();
            assert_ne!(
                first, second,
                "{name} did not change on a second read at offset 0"
            );
        }
        d.signal(&ctr.id, ctr.pid, SIGKILL).await;
    })
    .await;
}

#[tokio::test]
async fn samples_agree_with_cgroups_rs_on_a_live_container() {
    use cgroups_rs::fs::{
        Cgroup, blkio::BlkIoController, cpuacct::CpuAcctController, hierarchies,
        memory::MemController,
    };
    let dir = tempfile::tempdir().unwrap();
    let Some(mut d) = stats_daemon(&metrics_socket(&dir)).await else {
        return;
    };
    within(async {
        let id = id("stats-agree");
        // Some work, then idle, so both readers see the same values.
        let bundle = Bundle::new(&[
            "sh",
            "-c",
            "i=0; while [ $i -lt 20000 ]; do i=$((i+1)); done; exec sleep 1000",
        ]);
        let pid = d.create(create_req(&id, &bundle)).await;
        // Idle once the shell has exec'd `sleep` and it sleeps.
        let deadline = std::time::Instant::now() + SAMPLE_TIMEOUT;
        let idle = || {
            std::fs::read(format!("/proc/{pid}/cmdline"))
                .ok()
                .as_deref()
                == Some(b"sleep\x001000\0")
                && proc_stat(pid).is_some_and(|s| s.state == 'S')
        };
        while !idle() {
            assert!(
                std::time::Instant::now() < deadline,
                "the init never went idle"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let mut stream = subscribe(&mut d.client, &id).await;
        let ours = next_sample(&mut stream).await;
        // The container's own cgroup paths: runc nests a v1 cgroup under berthd's own where
        // berthd is not in the root (the memory hierarchy on this host).
        let paths = cgroups_rs::fs::cgroup::get_cgroups_relative_paths_by_pid(pid).unwrap();
        let reference = Cgroup::load_with_relative_paths(hierarchies::auto(), ".", paths);
        let cg = ours.cgroup_stats.as_ref().unwrap();

        let cpuacct = reference
            .controller_of::<CpuAcctController>()
            .unwrap()
            .cpuacct();
        let usage = cg.cpu_stats.as_ref().unwrap().cpu_usage.as_ref().unwrap();
        assert!(usage.total_usage > 0);
        assert_eq!(usage.total_usage, cpuacct.usage);
        let percpu: Vec<u64> = cpuacct
            .usage_percpu
            .split_whitespace()
            .map(|v| v.parse().unwrap())
            .collect();
        assert_eq!(usage.percpu_usage, percpu);
        assert_eq!(usage.usage_in_usermode, cpuacct.usage_user);
        assert_eq!(usage.usage_in_kernelmode, cpuacct.usage_sys);

        let mem = reference.controller_of::<MemController>().unwrap();
        let (memory, swap, kmem) = (mem.memory_stat(), mem.memswap(), mem.kmem_stat());
        let ms = cg.memory_stats.as_ref().unwrap();
        // Current usage moves between our tick and the reference's read: the counter includes
        // what each CPU has charged ahead for the cgroup (up to 64 pages, the kernel's
        // MEMCG_CHARGE_BATCH), which goes when that CPU charges another cgroup. Peaks and
        // failure counts must match exactly.
        let fuzz = 64 * rustix::param::page_size() as u64 * possible_cpus() as u64;
        let agree = |ours: &Option<berth_api::proto::MemoryData>,
                     (usage, max, failcnt): (u64, u64, u64)| {
            let ours = ours.as_ref().unwrap();
            assert!(
                ours.usage.abs_diff(usage) <= fuzz,
                "usage {} vs {usage}",
                ours.usage
            );
            assert_eq!((ours.max_usage, ours.failcnt), (max, failcnt));
        };
        agree(
            &ms.usage,
            (
                memory.usage_in_bytes,
                memory.max_usage_in_bytes,
                memory.fail_cnt,
            ),
        );
        agree(
            &ms.swap_usage,
            (swap.usage_in_bytes, swap.max_usage_in_bytes, swap.fail_cnt),
        );
        agree(
            &ms.kernel_usage,
            (kmem.usage_in_bytes, kmem.max_usage_in_bytes, kmem.fail_cnt),
        );
        assert_eq!(ms.cache, memory.stat.cache);
        assert_eq!(ms.stats["rss"], memory.stat.rss);

        let blkio = reference
            .controller_of::<BlkIoController>()
            .unwrap()
            .blkio();
        let bs = cg.blkio_stats.as_ref().unwrap();
        for (ours, theirs) in [
            (
                &bs.io_service_bytes_recursive,
                &blkio.throttle.io_service_bytes_recursive,
            ),
            (
                &bs.io_serviced_recursive,
                &blkio.throttle.io_serviced_recursive,
            ),
        ] {
            for device in theirs {
                let value = |op: &str| {
                    ours.iter()
                        .find(|e| {
                            e.major == device.major as u64
                                && e.minor == device.minor as u64
                                && e.op == op
                        })
                        .map_or(0, |e| e.value)
                };
                assert_eq!((value("Read"), value("Write")), (device.read, device.write));
            }
            let devices = ours.iter().filter(|e| e.op == "Total").count();
            assert_eq!(devices, theirs.len());
        }
        // hugetlb: the same page sizes (none where the controller is not mounted).
        let hugetlb = reference
            .controller_of::<cgroups_rs::fs::hugetlb::HugeTlbController>()
            .map_or(0, |h| h.get_sizes().len());
        assert_eq!(cg.hugetlb_stats.len(), hugetlb);
        d.signal(&id, pid, SIGKILL).await;
    })
    .await;
}
