//! The phases driven through berthd's API: create N containers at concurrency C, subscribe to
//! their stats, kill them all while an Events stream times each exit.

use std::collections::HashMap;
use std::path::Path;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::proto::api_client::ApiClient;
use crate::proto::{CreateContainerRequest, EventsRequest, SignalRequest, StatsRequest};
use serde::Serialize;
use tokio::sync::mpsc;
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
/// How long after the last kill the exit events may still arrive.
const EXIT_GRACE: Duration = Duration::from_secs(30);

/// One client per load task: clones of one HTTP/2 connection, or a connection each.
pub async fn clients(
    socket: &Path,
    mode: ChannelMode,
    tasks: usize,
) -> Result<Vec<Client>, LoadError> {
    let connect = || async {
        crate::api::client::connect(socket)
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
    /// Containers gone a second, from the first Signal to the last `exit` event.
    pub teardown_per_sec: f64,
    pub missing: usize,
}

/// Sends SIGKILL to every container at the clients' concurrency, with an Events stream opened
/// first, and times each Signal → `exit` event.
pub async fn kill_all(
    session: &Arc<Session>,
    clients: &[Client],
    containers: &[(String, u32)],
    label: &str,
) -> Result<Exits, LoadError> {
    let mut exits = exit_events(clients[0].clone()).await?;
    let sent = Arc::new(Mutex::new(HashMap::with_capacity(containers.len())));
    let queue = Arc::new(Mutex::new(containers.to_vec()));
    let progress = Arc::new(Progress::start(label, containers.len()));
    let mut tasks = JoinSet::new();
    for client in clients {
        let (mut client, queue, sent) = (client.clone(), queue.clone(), sent.clone());
        tasks.spawn(async move {
            loop {
                let Some((id, pid)) = queue.lock().expect("queue lock").pop() else {
                    return Ok(());
                };
                let req = SignalRequest {
                    id: id.clone(),
                    pid,
                    signal: libc::SIGKILL as u32,
                };
                sent.lock()
                    .expect("sent lock")
                    .insert(id.clone(), Instant::now());
                rpc(format!("Signal {id}"), client.signal(req)).await?;
            }
        });
    }
    let mut received: HashMap<String, Instant> = HashMap::with_capacity(containers.len());
    // Collect exits while the kills are being sent; then wait at most EXIT_GRACE more.
    let mut grace_until = None;
    while received.len() < containers.len() {
        let event = match grace_until {
            None => tokio::select! {
                event = exits.recv() => event,
                joined = tasks.join_next() => {
                    match joined {
                        None => grace_until = Some(Instant::now() + EXIT_GRACE),
                        Some(Ok(Ok(()))) => {}
                        Some(Ok(Err(e))) => return Err(e),
                        Some(Err(e)) => return Err(LoadError(format!("signal task: {e}"))),
                    }
                    continue;
                }
            },
            Some(until) => match tokio::time::timeout_at(until.into(), exits.recv()).await {
                Ok(event) => event,
                Err(_) => break,
            },
        };
        match event {
            Some(Ok((id, at))) => {
                if received.insert(id, at).is_none() {
                    progress.inc();
                }
            }
            Some(Err(e)) => return Err(e),
            None => return Err(LoadError("the Events stream ended".into())),
        }
    }
    join_all(tasks).await?;
    if let Ok(progress) = Arc::try_unwrap(progress) {
        progress.finish();
    }
    let sent = std::mem::take(&mut *sent.lock().expect("sent lock"));
    let mut latencies = Vec::with_capacity(received.len());
    let mut missing = 0;
    for (id, _) in containers {
        match (sent.get(id), received.get(id)) {
            (Some(&sent), Some(&got)) => latencies.push(got.saturating_duration_since(sent)),
            _ => missing += 1,
        }
        session.untrack(id);
    }
    let first = sent.values().min().copied();
    let last = received.values().max().copied();
    let span = match (first, last) {
        (Some(first), Some(last)) => last.saturating_duration_since(first),
        _ => Duration::ZERO,
    };
    Ok(Exits {
        latency: Percentiles::of(&latencies),
        teardown_per_sec: per_sec(latencies.len(), span),
        missing,
    })
}

/// `exit` events as (container id, when received) from an Events stream that is open when this
/// returns; the stream's failure arrives as an error.
pub async fn exit_events(
    mut client: Client,
) -> Result<mpsc::UnboundedReceiver<Result<(String, Instant), LoadError>>, LoadError> {
    let mut stream = rpc("Events".into(), client.events(EventsRequest {})).await?;
    let (tx, rx) = mpsc::unbounded_channel();
    tokio::spawn(async move {
        loop {
            let item = match stream.message().await {
                Ok(Some(event)) if event.r#type == "exit" => Ok((event.id, Instant::now())),
                Ok(Some(_)) => continue,
                Ok(None) => Err(LoadError("berthd ended the Events stream".into())),
                Err(status) => Err(LoadError(format!("Events stream: {status}"))),
            };
            let failed = item.is_err();
            if tx.send(item).is_err() || failed {
                return;
            }
        }
    });
    Ok(rx)
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
    let (mut streams, received) = match subscribe(client, containers, subscribers).await {
        Ok(subscribed) => subscribed,
        Err(why) => {
            return StatsLoad {
                skipped: Some(why),
                ..StatsLoad::default()
            };
        }
    };
    let scrape = |address: Option<&str>| {
        let address = address.map(str::to_owned);
        async move {
            match address {
                None => Err(
                    "no metrics endpoint configured (pass --metrics-listen with --address)"
                        .to_owned(),
                ),
                Some(address) => metrics::scrape(&address).await.map(|t| metrics::parse(&t)),
            }
        }
    };
    let before = ProcSample::take(berthd_pid);
    let metrics_before = scrape(metrics_address).await;
    let start = Instant::now();
    tokio::time::sleep(window).await;
    let after = ProcSample::take(berthd_pid);
    let metrics_after = scrape(metrics_address).await;
    let secs = start.elapsed().as_secs_f64();
    streams.abort_all();
    let (tick, tick_skipped) = match (metrics_before, metrics_after) {
        (Ok(before), Ok(after)) => match metrics::tick_time(&before, &after) {
            Some(tick) => (Some(tick), None),
            None => (
                None,
                Some("the metrics endpoint serves no tick time metric".into()),
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
