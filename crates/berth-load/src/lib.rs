//! The density benchmark's load client (`scripts/load`): drives a berthd through its gRPC API at
//! a chosen concurrency and measures it beside the same work done by the OCI runtime directly.
//!
//! A run, for each concurrency C: start a fresh berthd (or use `--address`); create N containers
//! of one shared busybox bundle (rate, latency percentiles); sample berthd's RSS, PSS, threads,
//! fds and CPU time from /proc (the CPU time its spawn helper's too); hold M GetStats
//! subscribers for a while; SIGKILL every container through Signal and time each kill to its
//! `exit` event on an Events stream opened first; stop berthd; then the floor: the same N
//! containers by `<runtime> create` + `start` and by `run -d`, each followed by SIGKILL, reap and
//! `delete`, at the same concurrency; and the same again with youki beside it when
//! `--direct-youki` names one. The table puts berthd beside the floor and says which of the
//! issue's targets pass (held to the first floor; youki's is for comparison). `--rounds R` runs each level R times, the floor before berthd in every other
//! round, and holds each target to its median over the rounds (a missing exit or an extra
//! process in any round fails it). `--soak SECS` runs a churn soak instead.
//!
//! This process is a child subreaper: containers started by the direct floor are reparented to
//! it and reaped here, never left as zombies for a pid 1 that may not reap.

mod daemon;
mod density;
mod direct;
mod memory;
mod metrics;
mod paired;
pub mod procfs;
mod progress;
mod report;
mod session;
mod soak;
mod summary;
mod table;
mod wakeup;

use std::os::unix::process::ExitStatusExt;
use std::path::PathBuf;
use std::process::Stdio;
use std::sync::Arc;
use std::time::Duration;

use clap::ValueEnum;
use serde::Serialize;

use direct::Floor;
use paired::Paired;
use procfs::ProcSample;
use report::{Creates, DaemonCost, DirectYouki, Host, Report, Run};
use session::{BerthdFlags, Runtime, Session};
use summary::Percentiles;

/// A load run's failure, said so a person can act on it.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct LoadError(pub String);

/// How the load tasks reach berthd.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum ChannelMode {
    /// One HTTP/2 connection shared by every task (requests multiplexed as streams).
    Shared,
    /// One connection per task.
    PerTask,
}

/// The load client's flags; each also reads `BERTH_<NAME>`.
#[derive(Debug, Clone, clap::Args)]
pub struct Options {
    /// Containers created at each concurrency level
    #[arg(long, env = "BERTH_N", default_value_t = 200)]
    pub n: usize,

    /// Concurrency levels, comma separated: each gets a fresh berthd and its own floor
    #[arg(long, env = "BERTH_CONCURRENCY", value_delimiter = ',', default_value = "1,8",
          value_parser = clap::value_parser!(u64).range(1..=1024))]
    pub concurrency: Vec<u64>,

    /// OCI runtime for berthd and for the direct floor: runc or crun; or builtin (berthd on
    /// libcontainer, the floor then runc)
    #[arg(long, env = "BERTH_RUNTIME", default_value = "runc")]
    pub runtime: String,

    /// Drive the berthd already listening on this socket instead of starting one per level
    #[arg(long, env = "BERTH_ADDRESS")]
    pub address: Option<PathBuf>,

    /// The berthd binary to start (default: berthd beside this program)
    #[arg(long, env = "BERTH_BERTHD")]
    pub berthd: Option<PathBuf>,

    /// Where the bundle, berthd's socket and state and the floor's runtime roots go
    #[arg(long, env = "BERTH_WORK_DIR", default_value = "/run/berth-load")]
    pub work_dir: PathBuf,

    /// Put before every container id, and so before every cgroup's name: two runs at once on
    /// one host (two berthd binaries compared under the same machine state) need different ones
    #[arg(long, env = "BERTH_ID_PREFIX", default_value = "", value_parser = id_prefix)]
    pub id_prefix: String,

    /// One HTTP/2 connection shared by all load tasks, or one per task
    #[arg(long, env = "BERTH_CHANNEL", value_enum, default_value_t = ChannelMode::Shared)]
    pub channel: ChannelMode,

    /// GetStats subscribers spread over the running containers
    #[arg(long, env = "BERTH_SUBSCRIBERS", default_value_t = 100)]
    pub subscribers: usize,

    /// Seconds the stats subscribers stay attached
    #[arg(long, env = "BERTH_STATS_SECS", default_value_t = 10)]
    pub stats_secs: u64,

    /// berthd's metrics endpoint (TCP host:port or a unix socket path), scraped for the sampler's
    /// tick time; a berthd this starts gets it as --metrics-listen (default: a socket beside its
    /// API socket)
    #[arg(long, env = "BERTH_METRICS_LISTEN")]
    pub metrics_listen: Option<String>,

    /// Look at the host's memory (/proc/meminfo, /proc/slabinfo, cgroups, tasks, berthd's RSS
    /// and fds) every this many containers, for berthd and for the direct runtime, and print what
    /// each container costs by kind; a create that fails then ends the creates instead of the run
    #[arg(long, env = "BERTH_MEMORY_EVERY", value_parser = clap::value_parser!(u64).range(1..))]
    pub memory_every: Option<u64>,

    /// Skip the direct-runtime floor
    #[arg(long, env = "BERTH_NO_DIRECT")]
    pub no_direct: bool,

    /// Run every concurrency level this many times, the direct floor before berthd in every
    /// other round, so that a drift in the host's speed falls on both sides alike; the targets
    /// are then held to the median of the rounds
    #[arg(long, env = "BERTH_ROUNDS", default_value_t = 1, conflicts_with = "soak",
          value_parser = clap::value_parser!(u64).range(1..=16))]
    pub rounds: u64,

    /// A youki binary to run by hand as a second direct floor beside runc's, at the same N and
    /// concurrency (skipped, saying so, without it)
    #[arg(long, env = "BERTH_DIRECT_YOUKI")]
    pub direct_youki: Option<PathBuf>,

    /// Run a churn soak for this many seconds instead of the density runs (at the highest
    /// concurrency given)
    #[arg(long, env = "BERTH_SOAK")]
    pub soak: Option<u64>,

    /// Long-lived containers carrying the soak's stats subscribers
    #[arg(long, env = "BERTH_SOAK_BASE", default_value_t = 20)]
    pub soak_base: usize,

    /// After the levels, this many creates through a fresh berthd and as many `run -d` by hand,
    /// interleaved one by one at concurrency 1 so that the host's drift falls on both alike; 0
    /// for none
    #[arg(long, env = "BERTH_PAIRED", default_value_t = 0)]
    pub paired: usize,

    /// Also write the figures as JSON to this file
    #[arg(long, env = "BERTH_JSON")]
    pub json: Option<PathBuf>,

    /// A shell command run while the creates run, with BERTHD_PID (berthd) and BERTHD_PIDS
    /// (berthd and its children before the creates: the spawn helper, comma separated) in its
    /// environment, and sent SIGINT when they end (e.g. perf record -g -p "$BERTHD_PIDS")
    #[arg(long, env = "BERTH_PROFILE_CREATE")]
    pub profile_create: Option<String>,

    /// As --profile-create, for the teardown instead: run from just before the first kill until
    /// the last container is deleted from the runtime
    #[arg(long, env = "BERTH_PROFILE_TEARDOWN")]
    pub profile_teardown: Option<String>,

    /// Seconds after which the run stops, cleans up and fails
    #[arg(long, env = "BERTH_TIMEOUT", default_value_t = 3600)]
    pub timeout: u64,

    /// The log level of the berthd this starts
    #[arg(long, env = "BERTH_LOG_LEVEL", default_value = "warn")]
    pub log_level: String,
}

/// Readies this process before any thread starts: the open file limit raised to the kernel's
/// maximum (each berthd it starts inherits it), and child subreaper for the floor's containers.
pub fn prepare_process() -> Result<(), LoadError> {
    use rustix::process::{Resource, Rlimit, getrlimit, set_child_subreaper, setrlimit};
    let most = std::fs::read_to_string("/proc/sys/fs/nr_open")
        .ok()
        .and_then(|text| text.trim().parse().ok());
    let limit = getrlimit(Resource::Nofile);
    let raised = Rlimit {
        current: most.or(limit.maximum),
        maximum: most.or(limit.maximum),
    };
    // Raising the hard limit needs CAP_SYS_RESOURCE; without it, the soft limit up to the hard.
    if let Err(e) = setrlimit(Resource::Nofile, raised) {
        eprintln!(
            "berth-load: open file limit stays at {} for berthd too ({e}): a berthd needing more \
             fds than that fails its creates",
            limit.maximum.map_or("unlimited".into(), |m| m.to_string())
        );
        let soft = Rlimit {
            current: limit.maximum,
            maximum: limit.maximum,
        };
        setrlimit(Resource::Nofile, soft)
            .map_err(|e| LoadError(format!("raising the open file limit: {e}")))?;
    }
    set_child_subreaper(Some(rustix::process::getpid()))
        .map_err(|e| LoadError(format!("becoming a child subreaper: {e}")))
}

/// `--id-prefix`: what a container id may start with (berthd takes ids of 1 to 64 letters, digits,
/// `_`, `.` or `-`, the first a letter or digit), short enough to leave room for the rest.
fn id_prefix(prefix: &str) -> Result<String, String> {
    let allowed = |c: char| c.is_ascii_alphanumeric() || "_.-".contains(c);
    match prefix.chars().next() {
        Some(first) if !first.is_ascii_alphanumeric() => {
            Err("must start with a letter or a digit".into())
        }
        _ if prefix.len() > 32 => Err("must be at most 32 characters".into()),
        _ if !prefix.chars().all(allowed) => {
            Err("may hold only letters, digits, '_', '.' and '-'".into())
        }
        _ => Ok(prefix.to_owned()),
    }
}

/// The runtime binary the direct floor runs: the one berthd runs, or runc when berthd runs its
/// built-in runtime (which has no binary to run by hand).
fn floor_runtime(runtime: &str) -> &str {
    if runtime == "builtin" {
        "runc"
    } else {
        runtime
    }
}

/// Runs the benchmark, prints its table (and writes `--json`), cleaning up every container it
/// made even when it fails, times out or is interrupted (SIGINT, SIGTERM).
pub async fn bench(options: &Options) -> Result<(), LoadError> {
    use tokio::signal::unix::{SignalKind, signal};
    let session = Arc::new(Session::new(
        &options.work_dir,
        floor_runtime(&options.runtime),
        &options.id_prefix,
    )?);
    let mut interrupt = signal(SignalKind::interrupt()).map_err(|e| LoadError(e.to_string()))?;
    let mut terminate = signal(SignalKind::terminate()).map_err(|e| LoadError(e.to_string()))?;
    let outcome = tokio::select! {
        report = run(options, &session) => report,
        _ = interrupt.recv() => Err(LoadError("interrupted".into())),
        _ = terminate.recv() => Err(LoadError("terminated".into())),
        _ = tokio::time::sleep(Duration::from_secs(options.timeout)) => Err(LoadError(format!(
            "the run took longer than --timeout {} s", options.timeout
        ))),
    };
    let client = match &options.address {
        Some(address) => berth_api::client::connect(address).await.ok(),
        None => None,
    };
    session.cleanup(client).await;
    let report = outcome?;
    print!("{}", report::render(&report));
    if let Some(path) = &options.json {
        let text = serde_json::to_string_pretty(&report).expect("the report serializes");
        std::fs::write(path, text + "\n")
            .map_err(|e| LoadError(format!("{}: {e}", path.display())))?;
        println!("figures written to {}", path.display());
    }
    Ok(())
}

async fn run(options: &Options, session: &Arc<Session>) -> Result<Report, LoadError> {
    let mut report = Report {
        host: host().await,
        runtime: options.runtime.clone(),
        runtime_version: session.runtime.version(),
        n: options.n,
        channel: options.channel,
        runtime_skipped: None,
        youki: DirectYouki::default(),
        rounds: options.rounds as usize,
        runs: Vec::new(),
        soak: None,
        paired: None,
        targets: Vec::new(),
    };
    if let Err(e) = direct::probe(session, &session.runtime).await {
        eprintln!(
            "{}: cannot run containers here, skipped: {e}",
            options.runtime
        );
        report.runtime_skipped = Some(e.0);
        report.host.load_average_end = procfs::load_average();
        return Ok(report);
    }
    match options.soak {
        Some(secs) => report.soak = Some(run_soak(options, session, secs).await?),
        None => {
            let youki = direct_youki(options, session, &mut report.youki).await;
            for round in 1..=report.rounds {
                for &c in &options.concurrency {
                    let level = Level {
                        c: c as usize,
                        round,
                        floor_first: round % 2 == 0 && !options.no_direct,
                    };
                    let run = run_level(options, session, youki.as_ref(), level).await?;
                    report.runs.push(run);
                }
            }
            if options.paired > 0 && !options.no_direct {
                report.paired = Some(run_paired(options, session).await?);
            }
        }
    }
    report.host.load_average_end = procfs::load_average();
    report.targets = report::targets(&report);
    Ok(report)
}

/// youki as a second direct floor, when `--direct-youki` names one that runs the bundle here;
/// otherwise None, with why in `said`.
async fn direct_youki(
    options: &Options,
    session: &Session,
    said: &mut DirectYouki,
) -> Option<Runtime> {
    let skip = |said: &mut DirectYouki, why: String| {
        eprintln!("youki: skipped: {why}");
        said.skipped = Some(why);
        None
    };
    if options.no_direct {
        return skip(said, "--no-direct".into());
    }
    let Some(program) = &options.direct_youki else {
        return skip(said, NO_YOUKI.into());
    };
    let youki = Runtime::new(program);
    if youki.name == session.runtime.name {
        return skip(said, format!("the direct floor is {} already", youki.name));
    }
    said.version = Some(youki.version());
    match direct::probe(session, &youki).await {
        Ok(()) => Some(youki),
        Err(e) => skip(said, e.0),
    }
}

/// Why there is no youki floor when no `--direct-youki` was given, and how to have one.
const NO_YOUKI: &str = "not installed (cargo install youki --locked --features v1,v2 \
                        --root /opt/youki, then --direct-youki /opt/youki/bin/youki)";

/// The berthd a level drives.
struct Berthd {
    socket: PathBuf,
    pid: u32,
    metrics: Option<String>,
}

/// The `--address` berthd, or a fresh one started in `<dir>/<name>`.
async fn berthd(options: &Options, session: &Session, name: &str) -> Result<Berthd, LoadError> {
    if let Some(address) = &options.address {
        let mut daemon = berth_api::client::connect_daemon(address)
            .await
            .map_err(|e| LoadError(format!("connect to {}: {e}", address.display())))?;
        let info = daemon::rpc(
            "Daemon.Info".into(),
            daemon.info(berth_api::daemon_proto::InfoRequest {}),
        )
        .await?;
        return Ok(Berthd {
            socket: address.clone(),
            pid: info.pid,
            metrics: options.metrics_listen.clone(),
        });
    }
    let binary = match &options.berthd {
        Some(path) => path.clone(),
        None => std::env::current_exe()
            .map_err(|e| LoadError(format!("finding this program: {e}")))?
            .with_file_name("berthd"),
    };
    let flags = BerthdFlags {
        binary: &binary,
        runtime: &options.runtime,
        log_level: &options.log_level,
        metrics_listen: options.metrics_listen.as_deref(),
    };
    session.start_berthd(name, &flags).await?;
    let (socket, pid, metrics) = session.berthd().expect("berthd just started");
    Ok(Berthd {
        socket,
        pid,
        metrics: Some(metrics),
    })
}

/// Which run of a concurrency level this is.
#[derive(Debug, Clone, Copy)]
struct Level {
    c: usize,
    /// From 1 (`--rounds`).
    round: usize,
    /// The direct floors run before berthd instead of after it.
    floor_first: bool,
}

/// The direct floor at this level, and youki's beside it when there is one.
async fn floors(
    options: &Options,
    session: &Arc<Session>,
    youki: Option<&Runtime>,
    c: usize,
) -> Result<(Option<Floor>, Option<Floor>), LoadError> {
    let n = options.n;
    let memory_every = options.memory_every.map(|k| k as usize);
    let floor = if options.no_direct {
        None
    } else {
        Some(direct::floor(session, &session.runtime, n, c, memory_every).await?)
    };
    // youki's floor is for comparison: its failure ends that floor, not the run.
    let youki_floor = match youki {
        Some(youki) => match direct::floor(session, youki, n, c, memory_every).await {
            Ok(floor) => Some(floor),
            Err(e) => {
                eprintln!("youki: no floor at C={c}: {}", e.0);
                None
            }
        },
        None => None,
    };
    Ok((floor, youki_floor))
}

async fn run_level(
    options: &Options,
    session: &Arc<Session>,
    youki: Option<&Runtime>,
    level: Level,
) -> Result<Run, LoadError> {
    let n = options.n;
    let c = level.c;
    let floors_before = if level.floor_first {
        Some(floors(options, session, youki, c).await?)
    } else {
        None
    };
    let Berthd {
        socket,
        pid,
        metrics,
    } = berthd(options, session, &format!("berthd-c{c}")).await?;
    let clients = daemon::clients(&socket, options.channel, c).await?;
    let ids = (0..n)
        // A berthd given by --address keeps an id until its delete: each round has its own.
        .map(|i| match options.rounds {
            1 => session.id(format_args!("load-c{c}-{i}")),
            _ => session.id(format_args!("load-r{}-c{c}-{i}", level.round)),
        })
        .collect();
    memory::cgroups_settled().await;
    let mem_before = procfs::mem_available_kb().unwrap_or(0);
    let before = sample(pid)?;
    let helpers = procfs::spawn_helpers_of(pid);
    if helpers.is_empty() {
        return Err(LoadError(format!(
            "berthd (pid {pid}) has no spawn helper child: its CPU could not be counted"
        )));
    }
    let helper_cpu = || -> f64 {
        helpers
            .iter()
            .filter_map(|&helper| procfs::cpu_secs(helper).ok())
            .sum()
    };
    let helper_cpu_before = helper_cpu();
    let profiler = match &options.profile_create {
        Some(command) => Some(Profiler::start("--profile-create", command, pid).await?),
        None => None,
    };
    let label = format!("berthd create C={c}");
    let (created, memory) = match options.memory_every {
        Some(every) => {
            let (created, trace) =
                density::create_berthd(session, &clients, ids, &label, every as usize, pid).await;
            (Ok(created), Some(trace))
        }
        None => (daemon::create(session, &clients, ids, &label).await, None),
    };
    if let Some(profiler) = profiler {
        profiler.stop().await;
    }
    let created = created.map_err(|e| explain_fd_exhaustion(e, pid, session.tracked()))?;
    // With a memory trace the creates may have stopped short of N.
    let made = created.containers.len();
    let at_n = sample(pid)?;
    let helper_cpu_secs = helper_cpu() - helper_cpu_before;
    if procfs::spawn_helpers_of(pid) != helpers {
        eprintln!(
            "berth-load: berthd's spawn helper was replaced during the creates; its CPU counts only \
             until then"
        );
    }
    let mem_after = procfs::mem_available_kb().unwrap_or(0);
    let stats = daemon::stats(
        &clients[0],
        &created.containers,
        options.subscribers,
        Duration::from_secs(options.stats_secs),
        pid,
        metrics.as_deref(),
    )
    .await;
    let label = format!("berthd kill C={c}");
    let profiler = match &options.profile_teardown {
        Some(command) => Some(Profiler::start("--profile-teardown", command, pid).await?),
        None => None,
    };
    let cpu_before_kills = procfs::cpu_secs(pid).unwrap_or(0.0) + helper_cpu();
    let exits = daemon::kill_all(session, &clients, &created.containers, &label).await;
    if let Some(profiler) = profiler {
        profiler.stop().await;
    }
    let exits = exits?;
    let teardown_cpu_secs = procfs::cpu_secs(pid).unwrap_or(0.0) + helper_cpu() - cpu_before_kills;
    drop(clients);
    session.stop_berthd().await;
    let (floor, youki_floor) = match floors_before {
        Some(floors) => floors,
        None => floors(options, session, youki, c).await?,
    };
    let (p50_first_100_ms, p50_last_100_ms) =
        Percentiles::p50_first_and_last_100(&created.latencies).unzip();
    Ok(Run {
        concurrency: c,
        round: level.round,
        floor_first: level.floor_first,
        create: Creates {
            made,
            per_sec: daemon::per_sec(made, created.elapsed),
            latency: Percentiles::of(&created.latencies),
            p50_first_100_ms,
            p50_last_100_ms,
        },
        daemon: DaemonCost {
            create_cpu_secs: at_n.cpu_secs - before.cpu_secs,
            helper_cpu_secs,
            teardown_cpu_secs,
            host_kb_per_container: mem_before.saturating_sub(mem_after) as f64 / made.max(1) as f64,
            other_children: at_n.children as i64 - made as i64,
            before,
            at_n,
        },
        stats,
        exits,
        floor,
        youki_floor,
        memory,
    })
}

async fn run_paired(options: &Options, session: &Arc<Session>) -> Result<Paired, LoadError> {
    let Berthd {
        socket, metrics, ..
    } = berthd(options, session, "berthd-paired").await?;
    let clients = daemon::clients(&socket, ChannelMode::Shared, 1).await?;
    let paired = paired::measure(
        session,
        &clients[0],
        metrics.as_deref(),
        &session.runtime,
        options.paired,
    )
    .await;
    drop(clients);
    session.stop_berthd().await;
    paired
}

async fn run_soak(
    options: &Options,
    session: &Arc<Session>,
    secs: u64,
) -> Result<soak::Soak, LoadError> {
    let c = options.concurrency.iter().copied().max().unwrap_or(1) as usize;
    let Berthd { socket, pid, .. } = berthd(options, session, "berthd-soak").await?;
    let clients = daemon::clients(&socket, options.channel, c).await?;
    let plan = soak::SoakPlan {
        duration: Duration::from_secs(secs),
        base: options.soak_base,
        subscribers: options.subscribers,
    };
    let soak = soak::soak(session, &clients, pid, plan).await;
    drop(clients);
    session.stop_berthd().await;
    soak
}

/// A create that failed for want of file descriptors, with what berthd holds against its limit.
fn explain_fd_exhaustion(error: LoadError, pid: u32, running: usize) -> LoadError {
    if !error.0.contains("Too many open files") {
        return error;
    }
    let (Ok(now), Ok(limit)) = (ProcSample::take(pid), procfs::open_files_limit(pid)) else {
        return error;
    };
    LoadError(format!(
        "{error}: berthd holds {} fds of its limit {limit}, about {:.1} per container with {running} \
         running; its hard RLIMIT_NOFILE can only be raised with CAP_SYS_RESOURCE",
        now.fds,
        now.fds as f64 / running.max(1) as f64
    ))
}

fn sample(pid: u32) -> Result<ProcSample, LoadError> {
    ProcSample::take(pid).map_err(|e| LoadError(format!("sampling berthd (pid {pid}): {e}")))
}

async fn host() -> Host {
    let wakeup = tokio::task::spawn_blocking(wakeup::measure)
        .await
        .unwrap_or_else(|e| Err(e.to_string()))
        .inspect_err(|e| eprintln!("the wake-up round trip was not measured: {e}"))
        .ok();
    let uname = rustix::system::uname();
    let memory_gib = std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|text| {
            let line = text.lines().find(|l| l.starts_with("MemTotal:"))?;
            line.split_whitespace().nth(1)?.parse::<f64>().ok()
        })
        .map_or(0.0, |kb| kb / 1024.0 / 1024.0);
    Host {
        cpus: std::thread::available_parallelism().map_or(1, |n| n.get()),
        kernel: uname.release().to_string_lossy().into_owned(),
        memory_gib,
        load_average_start: procfs::load_average(),
        load_average_end: None,
        wakeup,
    }
}

/// The `--profile-create` or `--profile-teardown` command, in its own process group so SIGINT
/// reaches all of it.
struct Profiler {
    flag: &'static str,
    child: tokio::process::Child,
}

impl Profiler {
    async fn start(
        flag: &'static str,
        command: &str,
        berthd_pid: u32,
    ) -> Result<Profiler, LoadError> {
        let pids: Vec<String> = std::iter::once(berthd_pid)
            .chain(procfs::children_of(berthd_pid))
            .map(|pid| pid.to_string())
            .collect();
        let child = tokio::process::Command::new("sh")
            .args(["-c", command])
            .env("BERTHD_PID", berthd_pid.to_string())
            .env("BERTHD_PIDS", pids.join(","))
            .stdin(Stdio::null())
            .process_group(0)
            .kill_on_drop(true)
            .spawn()
            .map_err(|e| LoadError(format!("{flag}: {e}")))?;
        // Give the profiler time to attach before the phase starts.
        tokio::time::sleep(Duration::from_secs(1)).await;
        Ok(Profiler { flag, child })
    }

    async fn stop(mut self) {
        if let Some(pid) = self.child.id() {
            let group = nix::unistd::Pid::from_raw(pid as i32);
            let _ = nix::sys::signal::killpg(group, nix::sys::signal::Signal::SIGINT);
        }
        match tokio::time::timeout(Duration::from_secs(60), self.child.wait()).await {
            // perf record ends its run by raising the SIGINT it caught again.
            Ok(Ok(status))
                if !status.success()
                    && status.code() != Some(130)
                    && status.signal() != Some(libc::SIGINT) =>
            {
                eprintln!("{} command ended with {status}", self.flag);
            }
            Ok(_) => {}
            Err(_) => eprintln!("{} command ignored SIGINT for 60 s; killed", self.flag),
        }
    }
}

#[cfg(test)]
mod tests {
    use clap::{CommandFactory, Parser};

    use super::*;

    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        options: Options,
    }

    #[test]
    fn every_flag_reads_an_environment_variable() {
        for arg in Cli::command().get_arguments() {
            let id = arg.get_id().as_str();
            if id == "help" {
                continue;
            }
            let env = arg.get_env().map(|e| e.to_string_lossy().into_owned());
            let expected = format!("BERTH_{}", id.to_uppercase());
            assert_eq!(env.as_deref(), Some(expected.as_str()), "flag {id}");
        }
    }

    #[test]
    fn concurrency_is_a_comma_separated_list() {
        let cli = Cli::parse_from(["berth-load", "--concurrency", "1,8", "--n", "20"]);
        assert_eq!(cli.options.concurrency, vec![1, 8]);
        assert_eq!(cli.options.n, 20);
        assert!(Cli::try_parse_from(["berth-load", "--concurrency", "0"]).is_err());
    }

    #[test]
    fn an_id_prefix_is_what_an_id_may_start_with() {
        let parse = |prefix: &str| {
            Cli::try_parse_from(["berth-load", "--id-prefix", prefix]).map(|c| c.options.id_prefix)
        };
        assert_eq!(parse("b2.").unwrap(), "b2.");
        assert_eq!(parse("").unwrap(), "");
        assert_eq!(Cli::parse_from(["berth-load"]).options.id_prefix, "");
        for refused in ["-a", "a/b", "a b", &"x".repeat(33)] {
            assert!(parse(refused).is_err(), "{refused:?}");
        }
    }
}
