//! The floor: the same containers created, started, killed and deleted by running an OCI
//! runtime binary directly from the load client, at the same concurrency, with no daemon in
//! between: berthd's runtime (runc), and optionally a second one beside it (youki).

use std::fs;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use serde::Serialize;
use tokio::task::JoinSet;

use super::LoadError;
use super::daemon::{join_all, per_sec};
use super::density::MemoryTrace;
use super::progress::Progress;
use super::session::{Runtime, Session, reap_zombie_children};
use super::summary::Percentiles;

/// How the runtime starts a container.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Launch {
    /// `create` then `start`: two runtime processes, what berthd does.
    CreateStart,
    /// `run -d`: one runtime process.
    RunDetached,
}

impl Launch {
    pub fn name(self) -> &'static str {
        match self {
            Launch::CreateStart => "create+start",
            Launch::RunDetached => "run -d",
        }
    }

    /// The name in a table column's header.
    pub fn short_name(self) -> &'static str {
        match self {
            Launch::CreateStart => "c+s",
            Launch::RunDetached => "run-d",
        }
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct Throughput {
    pub per_sec: f64,
    pub latency: Option<Percentiles>,
    /// p50 of the first and of the last 100 creates: the kernel's own slowing with more running.
    pub p50_first_100_ms: Option<f64>,
    pub p50_last_100_ms: Option<f64>,
    /// SIGKILL and reap of every container, then `delete` of each, containers a second.
    pub teardown_per_sec: f64,
    /// From each SIGKILL to its init reaped (`waitpid` returns), the kills back to back: the
    /// kernel's part of an exit, the floor under berthd's exit event.
    pub reaped_after_kill: Option<Percentiles>,
    /// Containers made: N, unless a memory trace's creates stopped short.
    pub made: usize,
    /// The host's memory every K containers (`--memory-every`).
    pub memory: Option<MemoryTrace>,
}

#[derive(Debug, Clone, Serialize)]
pub struct Floor {
    pub create_start: Throughput,
    pub run_detached: Throughput,
}

impl Floor {
    /// The faster way to start a container, which is the floor berthd is held to.
    pub fn best(&self) -> (Launch, &Throughput) {
        if self.run_detached.per_sec > self.create_start.per_sec {
            (Launch::RunDetached, &self.run_detached)
        } else {
            (Launch::CreateStart, &self.create_start)
        }
    }

    /// The faster launch's p50 of its first and of its last 100 creates.
    pub fn p50_first_and_last_100(&self) -> Option<(Launch, f64, f64)> {
        let (launch, best) = self.best();
        Some((launch, best.p50_first_100_ms?, best.p50_last_100_ms?))
    }

    /// The kernel's kill-to-reaped latency, from the faster launch's teardown.
    pub fn reaped_after_kill(&self) -> Option<Percentiles> {
        self.best().1.reaped_after_kill
    }

    /// The faster kill+delete of the two launches' teardowns.
    pub fn best_teardown_per_sec(&self) -> f64 {
        self.create_start
            .teardown_per_sec
            .max(self.run_detached.teardown_per_sec)
    }

    /// The memory traces of both launches, when they were taken.
    pub fn memory_traces(&self) -> Vec<&MemoryTrace> {
        [&self.create_start.memory, &self.run_detached.memory]
            .into_iter()
            .flatten()
            .collect()
    }
}

/// Checks that `runtime` can run the bundle here: one `run -d` and `delete -f`.
pub async fn probe(session: &Session, runtime: &Runtime) -> Result<(), LoadError> {
    let root = session.runtime_root(runtime, &format!("{}-probe-root", runtime.name));
    let err = session.dir.join(format!("{}-probe.err", runtime.name));
    let id = format!("berth-load-probe-{}", std::process::id());
    let bundle = session.bundle_str();
    let result = runtime
        .run(&root, &["run", "-d", "--bundle", &bundle, &id], &err)
        .await;
    let _ = runtime.run(&root, &["delete", "-f", &id], &err).await;
    reap_zombie_children(Duration::from_secs(5)).await;
    result
}

/// N containers started each way by `runtime` at concurrency `c`, each set deleted before the
/// next; with `memory_every`, created in chunks of that many with a look at the host's memory
/// after each. A floor that fails deletes what it made before it returns the error.
pub async fn floor(
    session: &Arc<Session>,
    runtime: &Runtime,
    n: usize,
    c: usize,
    memory_every: Option<usize>,
) -> Result<Floor, LoadError> {
    let root = session.runtime_root(runtime, &format!("{}-direct-c{c}", runtime.name));
    let on = Direct {
        session: session.clone(),
        runtime: Arc::new(runtime.clone()),
        root,
    };
    let measured = async {
        let create_start = measure(&on, n, c, Launch::CreateStart, memory_every).await?;
        let run_detached = measure(&on, n, c, Launch::RunDetached, memory_every).await?;
        Ok(Floor {
            create_start,
            run_detached,
        })
    };
    let floor = measured.await;
    if floor.is_err() {
        session.delete_all(runtime, &on.root).await;
    }
    floor
}

/// Where a floor runs: the runtime and the root holding its containers.
struct Direct {
    session: Arc<Session>,
    runtime: Arc<Runtime>,
    root: PathBuf,
}

async fn measure(
    on: &Direct,
    n: usize,
    c: usize,
    launch: Launch,
    memory_every: Option<usize>,
) -> Result<Throughput, LoadError> {
    let mut ids: Vec<String> = (0..n)
        .map(|i| on.session.id(format_args!("direct-{i}")))
        .collect();
    let label = format!("{} {} C={c}", on.runtime.name, launch.name());
    let start = move |ctx: Job| async move {
        let bundle = ctx.session.bundle_str();
        let pid_file = ctx.pid_file();
        let pid_file = pid_file.to_string_lossy();
        let began = Instant::now();
        match launch {
            Launch::CreateStart => {
                let args = [
                    "create",
                    "--bundle",
                    &bundle,
                    "--pid-file",
                    &pid_file,
                    &ctx.id,
                ];
                ctx.runtime(&args).await?;
                fs::read_to_string(ctx.pid_file())
                    .map_err(|e| LoadError(format!("{pid_file}: {e}")))?;
                ctx.runtime(&["start", &ctx.id]).await?;
            }
            Launch::RunDetached => {
                ctx.runtime(&run_detached_args(&bundle, &pid_file, &ctx.id))
                    .await?;
            }
        }
        Ok(began.elapsed())
    };
    crate::memory::cgroups_settled().await;
    let (latencies, created, memory) = match memory_every {
        None => {
            let started = Instant::now();
            let latencies = for_each(on, &ids, c, &label, start).await?;
            (latencies, started.elapsed(), None)
        }
        Some(every) => {
            let side = format!("{} {}", on.runtime.name, launch.short_name());
            let this = std::process::id();
            let mut trace = MemoryTrace::start(&side, this, false);
            let (mut latencies, mut created) = (Vec::with_capacity(n), Duration::ZERO);
            for chunk in ids.chunks(every.max(1)) {
                let started = Instant::now();
                match for_each(on, chunk, c, &label, start).await {
                    Ok(chunk_latencies) => {
                        created += started.elapsed();
                        trace.look(latencies.len() + chunk.len(), this, false, &chunk_latencies);
                        latencies.extend(chunk_latencies);
                    }
                    Err(e) => {
                        eprintln!("{side}: creates stopped at {}: {}", latencies.len(), e.0);
                        trace.stopped = Some(e.0);
                        break;
                    }
                }
            }
            if trace.stopped.is_some() {
                // The failed chunk's containers: gone before the next launch reuses the ids.
                on.session.delete_all(&on.runtime, &on.root).await;
                reap_zombie_children(Duration::from_secs(10)).await;
                ids.truncate(latencies.len());
            }
            (latencies, created, Some(trace))
        }
    };
    let made = ids.len();
    let deleting = Instant::now();
    // What berthd does: SIGKILL the init and reap it (this process is its subreaper), every
    // container first, then `delete` the stopped ones (`delete -f` would poll for the death in
    // 100 ms steps). The kills go back to back as berthd's exits come under the load's kills:
    // the kernel's exit is slower at that pace (kill to reaped p99 5.0 and 6.3 ms back to back,
    // 3.7 and 2.8 ms with a delete between kills, runc, 500 containers).
    let label = format!("{} kill C={c}", on.runtime.name);
    let reaped_after_kill = for_each(on, &ids, c, &label, |ctx| async move {
        let pid = init_pid(&ctx.pid_file())?;
        let killed = Instant::now();
        kill_and_reap(pid, &ctx.id).await?;
        Ok(killed.elapsed())
    })
    .await?;
    let label = format!("{} delete C={c}", on.runtime.name);
    for_each(on, &ids, c, &label, |ctx| async move {
        ctx.runtime(&["delete", &ctx.id]).await?;
        Ok(Duration::ZERO)
    })
    .await?;
    let deleted = deleting.elapsed();
    reap_zombie_children(Duration::from_secs(10)).await;
    let (p50_first_100_ms, p50_last_100_ms) =
        Percentiles::p50_first_and_last_100(&latencies).unzip();
    Ok(Throughput {
        per_sec: per_sec(made, created),
        latency: Percentiles::of(&latencies),
        p50_first_100_ms,
        p50_last_100_ms,
        teardown_per_sec: per_sec(made, deleted),
        reaped_after_kill: Percentiles::of(&reaped_after_kill),
        made,
        memory,
    })
}

/// `run -d` of container `id` from `bundle`, its init's pid written to `pid_file`.
pub fn run_detached_args<'a>(bundle: &'a str, pid_file: &'a str, id: &'a str) -> [&'a str; 7] {
    ["run", "-d", "--bundle", bundle, "--pid-file", pid_file, id]
}

/// The pid a runtime wrote to `pid_file`.
pub fn init_pid(pid_file: &Path) -> Result<rustix::process::Pid, LoadError> {
    fs::read_to_string(pid_file)
        .ok()
        .and_then(|text| text.trim().parse::<i32>().ok())
        .and_then(rustix::process::Pid::from_raw)
        .ok_or_else(|| LoadError(format!("{}: no pid", pid_file.display())))
}

/// SIGKILLs container `id`'s init `pid` and reaps it (this process is its subreaper).
pub async fn kill_and_reap(pid: rustix::process::Pid, id: &str) -> Result<(), LoadError> {
    rustix::process::kill_process(pid, rustix::process::Signal::KILL)
        .map_err(|e| LoadError(format!("kill {id}: {e}")))?;
    tokio::task::spawn_blocking(move || {
        rustix::process::waitpid(Some(pid), rustix::process::WaitOptions::empty())
    })
    .await
    .map_err(|e| LoadError(format!("reaping {id}: {e}")))?
    .map_err(|e| LoadError(format!("reaping {id}: {e}")))?;
    Ok(())
}

/// What one runtime job knows: its container, its task's stderr file, the runtime and root.
struct Job {
    session: Arc<Session>,
    runtime: Arc<Runtime>,
    root: PathBuf,
    id: String,
    stderr: PathBuf,
}

impl Job {
    async fn runtime(&self, args: &[&str]) -> Result<(), LoadError> {
        self.runtime.run(&self.root, args, &self.stderr).await
    }

    fn pid_file(&self) -> PathBuf {
        self.root
            .with_extension("pids")
            .join(format!("{}.pid", self.id))
    }
}

/// Runs `job` for every id on `c` tasks, returning what each returned, in id order.
async fn for_each<F, Fut>(
    on: &Direct,
    ids: &[String],
    c: usize,
    label: &str,
    job: F,
) -> Result<Vec<Duration>, LoadError>
where
    F: Fn(Job) -> Fut + Clone + Send + 'static,
    Fut: Future<Output = Result<Duration, LoadError>> + Send,
{
    let pids = on.root.with_extension("pids");
    fs::create_dir_all(&pids).map_err(|e| LoadError(format!("{}: {e}", pids.display())))?;
    let ids = Arc::new(ids.to_vec());
    let next = Arc::new(AtomicUsize::new(0));
    let results = Arc::new(std::sync::Mutex::new(vec![Duration::ZERO; ids.len()]));
    let progress = Arc::new(Progress::start(label, ids.len()));
    let mut tasks = JoinSet::new();
    for task in 0..c {
        let (ids, next, results, progress) =
            (ids.clone(), next.clone(), results.clone(), progress.clone());
        let (session, runtime) = (on.session.clone(), on.runtime.clone());
        let (root, job) = (on.root.clone(), job.clone());
        let stderr = session
            .dir
            .join(format!("{}-direct-task-{task}.err", runtime.name));
        tasks.spawn(async move {
            loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                let Some(id) = ids.get(i) else {
                    return Ok(());
                };
                let ctx = Job {
                    session: session.clone(),
                    runtime: runtime.clone(),
                    root: root.clone(),
                    id: id.clone(),
                    stderr: stderr.clone(),
                };
                let took = job(ctx).await?;
                results.lock().expect("results lock")[i] = took;
                progress.inc();
            }
        });
    }
    let outcome = join_all(tasks).await;
    if let Ok(progress) = Arc::try_unwrap(progress) {
        progress.finish();
    }
    outcome?;
    let results = std::mem::take(&mut *results.lock().expect("results lock"));
    Ok(results)
}
