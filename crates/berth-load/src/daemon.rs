//! The phases driven through berthd's API: create N containers at concurrency C, subscribe to
//! their stats, kill them all while an Events stream times each exit.

use std::collections::HashMap;
use std::path::Path;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use berth_api::proto::api_client::ApiClient;
use berth_api::proto::{CreateContainerRequest, EventsRequest, SignalRequest, StatsRequest};
use serde::Serialize;
use tokio::sync::oneshot;
use tokio::task::JoinSet;
use tonic::Code;
use tonic::transport::Channel;

use super::metrics::{self, TickTime};
use super::procfs::ProcSample;
use super::progress::Progress;
use super::session::Session;
use super::summary::Percentiles;
use super::{ChannelMode, LoadError};

pub type Client = ApiClient<Channel>;

/// Longest one create or signal may take before the run fails.
const RPC_TIMEOUT: Duration = Duration::from_secs(120);
/// How long a killed container's `exit` event may take before it counts as missing.
const EXIT_PATIENCE: Duration = Duration::from_secs(10);

/// One client per load task: clones of one HTTP/2 connection, or a connection each.
pub async fn clients(
    socket: &Path,
    mode: ChannelMode,
    tasks: usize,
) -> Result<Vec<Client>, LoadError> {
    let connect = || async {
        berth_api::client::connect(socket)
            .await
            .map_err(|e| LoadError(format!("connect to {}: {e}", socket.display())))
    };
    match mode {
        ChannelMode::Shared => {
            let client = connect().await?;
            Ok(vec![client; tasks])
        }
        ChannelMode::PerTask => {
            let mut clients = Vec::with_capacity(tasks);
            for _ in 0..tasks {
                clients.push(connect().await?);
            }
            Ok(clients)
        }
    }
}

/// What creating the containers took; `latencies[i]` is the i-th container's.
pub struct Created {
    pub containers: Vec<(String, u32)>,
    pub latencies: Vec<Duration>,
    pub elapsed: Duration,
}

/// Creates a container for every id, each load task taking the next id when its last create
/// returned, one task per client.
pub async fn create(
    session: &Arc<Session>,
    clients: &[Client],
    ids: Vec<String>,
    label: &str,
) -> Result<Created, LoadError> {
    let ids = Arc::new(ids);
    let next = Arc::new(AtomicUsize::new(0));
    let results = Arc::new(Mutex::new(vec![None; ids.len()]));
    let progress = Arc::new(Progress::start(label, ids.len()));
    let bundle = session.bundle_str();
    let start = Instant::now();
    let mut tasks = JoinSet::new();
    for client in clients {
        let (mut client, ids, next, results) =
            (client.clone(), ids.clone(), next.clone(), results.clone());
        let (session, progress, bundle) = (session.clone(), progress.clone(), bundle.clone());
        tasks.spawn(async move {
            loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                let Some(id) = ids.get(i) else {
                    return Ok(());
                };
                let req = CreateContainerRequest {
                    id: id.clone(),
                    bundle_path: bundle.clone(),
                    ..Default::default()
                };
                let began = Instant::now();
                let pid = rpc(
                    format!("CreateContainer {id}"),
                    client.create_container(req),
                )
                .await?
                .pid;
                let latency = began.elapsed();
                session.track(id, pid);
                results.lock().expect("results lock")[i] = Some((latency, pid));
                progress.inc();
            }
        });
    }
    let outcome = join_all(tasks).await;
    let elapsed = start.elapsed();
    if let Ok(progress) = Arc::try_unwrap(progress) {
        progress.finish();
    }
    outcome?;
    let results = std::mem::take(&mut *results.lock().expect("results lock"));
    let mut containers = Vec::with_capacity(ids.len());
    let mut latencies = Vec::with_capacity(ids.len());
    for (id, result) in ids.iter().zip(results) {
        let (latency, pid) = result.expect("every id was created");
        containers.push((id.clone(), pid));
        latencies.push(latency);
    }
    Ok(Created {
        containers,
        latencies,
        elapsed,
    })
}

/// Killing every container, timed from each Signal to its `exit` event.
#[derive(Debug, Clone, Serialize)]
pub struct Exits {
    pub latency: Option<Percentiles>,
    /// Containers killed and gone a second, at the load's concurrency.
    pub teardown_per_sec: f64,
    pub missing: usize,
}

/// SIGKILLs every container, each load task sending one Signal and waiting for that container's
/// `exit` event (on an Events stream opened first) before the next, so the latency is the
/// daemon's exit path at concurrency C and not the queue of a burst of kills.
pub async fn kill_all(
    session: &Arc<Session>,
    clients: &[Client],
    containers: &[(String, u32)],
    label: &str,
) -> Result<Exits, LoadError> {
    let watch = Arc::new(ExitWatch::open(clients[0].clone()).await?);
    let queue = Arc::new(Mutex::new(containers.to_vec()));
    let latencies = Arc::new(Mutex::new(Vec::with_capacity(containers.len())));
    let missing = Arc::new(AtomicUsize::new(0));
    let progress = Arc::new(Progress::start(label, containers.len()));
    let start = Instant::now();
    let mut tasks = JoinSet::new();
    for client in clients {
        let (mut client, queue, watch) = (client.clone(), queue.clone(), watch.clone());
        let (latencies, missing, progress) = (latencies.clone(), missing.clone(), progress.clone());
        let session = session.clone();
        tasks.spawn(async move {
            loop {
                let Some((id, pid)) = queue.lock().expect("queue lock").pop() else {
                    return Ok(());
                };
                match watch.kill(&mut client, &id, pid).await? {
                    Some(latency) => latencies.lock().expect("latencies lock").push(latency),
                    None => {
                        missing.fetch_add(1, Ordering::Relaxed);
                    }
                }
                session.untrack(&id);
                progress.inc();
            }
        });
    }
    let outcome = join_all(tasks).await;
    // berthd publishes an exit before it deletes the container from the runtime: the teardown
    // ends once that is done too, as the direct floor's ends with its `delete`.
    if let Some(root) = session.berthd_runtime_root() {
        deleted_from(&root, containers).await;
    }
    let elapsed = start.elapsed();
    if let Ok(progress) = Arc::try_unwrap(progress) {
        progress.finish();
    }
    outcome?;
    let latencies = std::mem::take(&mut *latencies.lock().expect("latencies lock"));
    Ok(Exits {
        latency: Percentiles::of(&latencies),
        teardown_per_sec: per_sec(latencies.len(), elapsed),
        missing: missing.load(Ordering::Relaxed),
    })
}

/// Waits until the runtime state directory `root` holds none of `containers` (at most a
/// minute). Each look stats only the first container still left: the deletes finish in about
/// the order of the kills, and a look at every container every few milliseconds (hundreds of
/// stats while the deletes catch up) took CPU from the deletes being timed, which the direct
/// floor's teardown does not pay.
async fn deleted_from(root: &Path, containers: &[(String, u32)]) {
    let deadline = Instant::now() + Duration::from_secs(60);
    // In the order of the kills: `kill_all` takes containers from the end of the list.
    let mut left: std::collections::VecDeque<_> = containers
        .iter()
        .rev()
        .map(|(id, _)| root.join(id))
        .collect();
    while Instant::now() < deadline {
        while left.front().is_some_and(|dir| !dir.exists()) {
            left.pop_front();
        }
        if left.is_empty() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
}

type Waiters = Arc<Mutex<HashMap<String, oneshot::Sender<Instant>>>>;

/// `exit` events of an Events stream, handed to whoever waits for that container's.
pub struct ExitWatch {
    waiters: Waiters,
    unexpected: Arc<AtomicUsize>,
    failure: Arc<Mutex<Option<String>>>,
    reader: tokio::task::JoinHandle<()>,
}

impl ExitWatch {
    /// Subscribes to Events; the stream is open when this returns.
    pub async fn open(mut client: Client) -> Result<ExitWatch, LoadError> {
        let mut stream = rpc("Events".into(), client.events(EventsRequest {})).await?;
        let waiters: Waiters = Arc::default();
        let unexpected = Arc::new(AtomicUsize::new(0));
        let failure = Arc::new(Mutex::new(None));
        let reader = tokio::spawn({
            let (waiters, unexpected, failure) =
                (waiters.clone(), unexpected.clone(), failure.clone());
            async move {
                let ended = loop {
                    match stream.message().await {
                        Ok(Some(event)) if event.r#type == "exit" => {
                            let at = Instant::now();
                            let waiter = waiters.lock().expect("waiters lock").remove(&event.id);
                            match waiter {
                                Some(waiter) => {
                                    let _ = waiter.send(at);
                                }
                                None => {
                                    unexpected.fetch_add(1, Ordering::Relaxed);
                                }
                            }
                        }
                        Ok(Some(_)) => {}
                        Ok(None) => break "berthd ended the Events stream".to_owned(),
                        Err(status) => break format!("Events stream: {status}"),
                    }
                };
                *failure.lock().expect("failure lock") = Some(ended);
                // Dropping every waiter's sender tells it the stream is gone.
                waiters.lock().expect("waiters lock").clear();
            }
        });
        Ok(ExitWatch {
            waiters,
            unexpected,
            failure,
            reader,
        })
    }

    /// SIGKILLs the container and waits for its `exit` event: the time from Signal to event, or
    /// None when the event did not come within EXIT_PATIENCE.
    pub async fn kill(
        &self,
        client: &mut Client,
        id: &str,
        pid: u32,
    ) -> Result<Option<Duration>, LoadError> {
        let (tx, rx) = oneshot::channel();
        self.waiters
            .lock()
            .expect("waiters lock")
            .insert(id.to_owned(), tx);
        let req = SignalRequest {
            id: id.to_owned(),
            pid,
            signal: libc::SIGKILL as u32,
        };
        let sent = Instant::now();
        rpc(format!("Signal {id}"), client.signal(req)).await?;
        match tokio::time::timeout(EXIT_PATIENCE, rx).await {
            Ok(Ok(at)) => Ok(Some(at.saturating_duration_since(sent))),
            Ok(Err(_)) => {
                let failure = self.failure.lock().expect("failure lock").clone();
                Err(LoadError(
                    failure.unwrap_or_else(|| "the Events stream ended".into()),
                ))
            }
            Err(_) => {
                self.waiters.lock().expect("waiters lock").remove(id);
                Ok(None)
            }
        }
    }

    /// `exit` events for containers nobody was waiting for.
    pub fn unexpected(&self) -> usize {
        self.unexpected.load(Ordering::Relaxed)
    }
}

impl Drop for ExitWatch {
    fn drop(&mut self) {
        self.reader.abort();
    }
}

/// M GetStats subscribers over the running containers for a while.
#[derive(Debug, Clone, Default, Serialize)]
pub struct StatsLoad {
    /// Why the phase did not run, when it did not.
    pub skipped: Option<String>,
    pub subscribers: usize,
    pub secs: f64,
    pub samples_received: u64,
    pub berthd_cpu_percent: f64,
    pub tick: Option<TickTime>,
    /// Why there is no tick time, when there is none.
    pub tick_skipped: Option<String>,
}

pub async fn stats(
    client: &Client,
    containers: &[(String, u32)],
    subscribers: usize,
    window: Duration,
    berthd_pid: u32,
    metrics_address: Option<&str>,
) -> StatsLoad {
    if window.is_zero() {
        return StatsLoad {
            skipped: Some("no stats window (--stats-secs 0)".into()),
            ..StatsLoad::default()
        };
    }
    let (mut streams, received) = match subscribe(client, containers, subscribers).await {
        Ok(subscribed) => subscribed,
        Err(why) => {
            return StatsLoad {
                skipped: Some(why),
                ..StatsLoad::default()
            };
        }
    };
    let before = ProcSample::take(berthd_pid);
    let metrics_before = metrics::scrape_samples(metrics_address).await;
    let start = Instant::now();
    tokio::time::sleep(window).await;
    let after = ProcSample::take(berthd_pid);
    let metrics_after = metrics::scrape_samples(metrics_address).await;
    let secs = start.elapsed().as_secs_f64();
    streams.abort_all();
    let (tick, tick_skipped) = match (metrics_before, metrics_after) {
        (Ok(before), Ok(after)) => match metrics::tick_time(&before, &after) {
            Some(tick) => (Some(tick), None),
            None => (
                None,
                Some("no sampler tick in the window, or no tick time metric".into()),
            ),
        },
        (Err(e), _) | (_, Err(e)) => (None, Some(e)),
    };
    let berthd_cpu_percent = match (before, after) {
        (Ok(before), Ok(after)) => (after.cpu_secs - before.cpu_secs) / secs * 100.0,
        _ => f64::NAN,
    };
    StatsLoad {
        skipped: None,
        subscribers,
        secs,
        samples_received: received.load(Ordering::Relaxed),
        berthd_cpu_percent,
        tick,
        tick_skipped,
    }
}

/// Opens `subscribers` GetStats streams spread over `containers`, each counting what it receives
/// until the streams are aborted; or says why it cannot (GetStats unimplemented or failing).
pub async fn subscribe(
    client: &Client,
    containers: &[(String, u32)],
    subscribers: usize,
) -> Result<(JoinSet<()>, Arc<AtomicU64>), String> {
    if containers.is_empty() || subscribers == 0 {
        return Err("no containers or no subscribers".into());
    }
    let received = Arc::new(AtomicU64::new(0));
    let mut streams = JoinSet::new();
    for i in 0..subscribers {
        let id = containers[i % containers.len()].0.clone();
        let mut client = client.clone();
        let mut stream = match client.get_stats(StatsRequest { id: id.clone() }).await {
            Ok(response) => response.into_inner(),
            Err(status) if status.code() == Code::Unimplemented => {
                return Err("GetStats answers UNIMPLEMENTED (this berthd has no stats yet)".into());
            }
            Err(status) => return Err(format!("GetStats {id}: {status}")),
        };
        let received = received.clone();
        streams.spawn(async move {
            while let Ok(Some(_)) = stream.message().await {
                received.fetch_add(1, Ordering::Relaxed);
            }
        });
    }
    Ok((streams, received))
}

/// A unary call with a deadline, its failure named after `what`.
pub async fn rpc<T>(
    what: String,
    call: impl Future<Output = Result<tonic::Response<T>, tonic::Status>>,
) -> Result<T, LoadError> {
    match tokio::time::timeout(RPC_TIMEOUT, call).await {
        Ok(Ok(response)) => Ok(response.into_inner()),
        Ok(Err(status)) => Err(LoadError(format!(
            "{what}: {:?}: {}",
            status.code(),
            status.message()
        ))),
        Err(_) => Err(LoadError(format!(
            "{what}: no answer within {RPC_TIMEOUT:?}"
        ))),
    }
}

/// Waits for every task, returning the first failure (the others are stopped).
pub async fn join_all(mut tasks: JoinSet<Result<(), LoadError>>) -> Result<(), LoadError> {
    while let Some(joined) = tasks.join_next().await {
        let failure = match joined {
            Ok(Ok(())) => continue,
            Ok(Err(e)) => e,
            Err(e) => LoadError(format!("load task: {e}")),
        };
        tasks.abort_all();
        return Err(failure);
    }
    Ok(())
}

pub fn per_sec(count: usize, span: Duration) -> f64 {
    if span.is_zero() {
        0.0
    } else {
        count as f64 / span.as_secs_f64()
    }
}
