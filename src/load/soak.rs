//! Churn soak: containers created and killed continuously for a while, with an Events stream and
//! stats subscribers attached, watching berthd's memory and fds and every exit event.

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::proto::{CreateContainerRequest, SignalRequest};
use serde::Serialize;
use tokio::sync::oneshot;
use tokio::task::JoinSet;

use super::LoadError;
use super::daemon::{self, Client, join_all, rpc};
use super::procfs::ProcSample;
use super::session::Session;
use super::summary::Percentiles;

/// How long a killed container's `exit` event may take before it counts as missing.
const EXIT_PATIENCE: Duration = Duration::from_secs(10);

#[derive(Debug, Clone, Serialize)]
pub struct Soak {
    pub secs: f64,
    pub concurrency: usize,
    /// Long-lived containers carrying the stats subscribers.
    pub base_containers: usize,
    pub cycles: usize,
    pub cycles_per_sec: f64,
    pub create: Option<Percentiles>,
    pub exit: Option<Percentiles>,
    pub missing_exits: usize,
    /// `exit` events for containers nobody killed.
    pub unexpected_exits: usize,
    pub stats_subscribers: usize,
    pub stats_skipped: Option<String>,
    pub start: ProcSample,
    pub middle: ProcSample,
    pub end: ProcSample,
    /// berthd every second: (seconds since the churn began, sample).
    pub timeline: Vec<(f64, ProcSample)>,
}

impl Soak {
    /// RSS and fd change from the middle to the end, in percent.
    pub fn drift_percent(&self) -> (f64, f64) {
        let change = |from: u64, to: u64| (to as f64 - from as f64) / (from.max(1) as f64) * 100.0;
        (
            change(self.middle.rss_kb, self.end.rss_kb),
            change(self.middle.fds, self.end.fds),
        )
    }
}

pub struct SoakPlan {
    pub duration: Duration,
    pub base: usize,
    pub subscribers: usize,
}

pub async fn soak(
    session: &Arc<Session>,
    clients: &[Client],
    berthd_pid: u32,
    plan: SoakPlan,
) -> Result<Soak, LoadError> {
    let base_ids = (0..plan.base).map(|i| format!("soak-base-{i}")).collect();
    let base = daemon::create(session, clients, base_ids, "soak: base containers").await?;
    let stats = daemon::subscribe(&clients[0], &base.containers, plan.subscribers).await;
    let (stats_subscribers, stats_skipped) = match &stats {
        Ok(_) => (plan.subscribers, None),
        Err(why) => (0, Some(why.clone())),
    };
    let waiters: Arc<Mutex<HashMap<String, oneshot::Sender<Instant>>>> = Arc::default();
    let unexpected = Arc::new(AtomicUsize::new(0));
    let mut exits = daemon::exit_events(clients[0].clone()).await?;
    let dispatcher = tokio::spawn({
        let (waiters, unexpected) = (waiters.clone(), unexpected.clone());
        async move {
            while let Some(event) = exits.recv().await {
                let (id, at) = event?;
                match waiters.lock().expect("waiters lock").remove(&id) {
                    Some(waiter) => {
                        let _ = waiter.send(at);
                    }
                    None => {
                        unexpected.fetch_add(1, Ordering::Relaxed);
                    }
                }
            }
            Ok::<(), LoadError>(())
        }
    });

    let began = Instant::now();
    let timeline = Arc::new(Mutex::new(Vec::new()));
    let sampler = tokio::spawn({
        let timeline = timeline.clone();
        async move {
            let mut every = tokio::time::interval(Duration::from_secs(1));
            loop {
                every.tick().await;
                if let Ok(sample) = ProcSample::take(berthd_pid) {
                    let at = began.elapsed().as_secs_f64();
                    timeline.lock().expect("timeline lock").push((at, sample));
                }
            }
        }
    });
    let deadline = began + plan.duration;
    let creates = Arc::new(Mutex::new(Vec::new()));
    let exit_latencies = Arc::new(Mutex::new(Vec::new()));
    let missing = Arc::new(AtomicUsize::new(0));
    let bundle = session.bundle_str();
    let mut workers = JoinSet::new();
    for (w, client) in clients.iter().enumerate() {
        let mut client = client.clone();
        let (creates, exit_latencies, missing) =
            (creates.clone(), exit_latencies.clone(), missing.clone());
        let (waiters, session, bundle) = (waiters.clone(), session.clone(), bundle.clone());
        workers.spawn(async move {
            for cycle in 0.. {
                if Instant::now() >= deadline {
                    return Ok(());
                }
                let id = format!("soak-{w}-{cycle}");
                let req = CreateContainerRequest {
                    id: id.clone(),
                    bundle_path: bundle.clone(),
                    ..Default::default()
                };
                let start = Instant::now();
                let pid = rpc(
                    format!("CreateContainer {id}"),
                    client.create_container(req),
                )
                .await?
                .pid;
                creates.lock().expect("creates lock").push(start.elapsed());
                session.track(&id, pid);
                let (tx, rx) = oneshot::channel();
                waiters.lock().expect("waiters lock").insert(id.clone(), tx);
                let sent = Instant::now();
                let req = SignalRequest {
                    id: id.clone(),
                    pid,
                    signal: libc::SIGKILL as u32,
                };
                rpc(format!("Signal {id}"), client.signal(req)).await?;
                match tokio::time::timeout(EXIT_PATIENCE, rx).await {
                    Ok(Ok(at)) => exit_latencies
                        .lock()
                        .expect("exit latencies lock")
                        .push(at.saturating_duration_since(sent)),
                    _ => {
                        waiters.lock().expect("waiters lock").remove(&id);
                        missing.fetch_add(1, Ordering::Relaxed);
                    }
                }
                session.untrack(&id);
            }
            Ok(())
        });
    }
    eprintln!(
        "soak: churning for {} s at concurrency {}",
        plan.duration.as_secs(),
        clients.len()
    );
    let churned = tokio::select! {
        joined = join_all(workers) => joined,
        dispatched = dispatcher => match dispatched {
            Ok(Err(e)) => Err(e),
            _ => Err(LoadError("the exit event dispatcher stopped".into())),
        },
    };
    let secs = began.elapsed().as_secs_f64();
    sampler.abort();
    if let Ok((mut streams, _)) = stats {
        streams.abort_all();
    }
    churned?;
    daemon::kill_all(session, clients, &base.containers, "soak: base teardown").await?;

    let timeline = std::mem::take(&mut *timeline.lock().expect("timeline lock"));
    let at = |secs_in: f64| {
        timeline
            .iter()
            .min_by(|a, b| (a.0 - secs_in).abs().total_cmp(&(b.0 - secs_in).abs()))
            .map(|&(_, sample)| sample)
            .unwrap_or_default()
    };
    let creates = std::mem::take(&mut *creates.lock().expect("creates lock"));
    let exits = std::mem::take(&mut *exit_latencies.lock().expect("exit latencies lock"));
    Ok(Soak {
        secs,
        concurrency: clients.len(),
        base_containers: plan.base,
        cycles: creates.len(),
        cycles_per_sec: daemon::per_sec(creates.len(), Duration::from_secs_f64(secs)),
        create: Percentiles::of(&creates),
        exit: Percentiles::of(&exits),
        missing_exits: missing.load(Ordering::Relaxed),
        unexpected_exits: unexpected.load(Ordering::Relaxed),
        stats_subscribers,
        stats_skipped,
        start: at(0.0),
        middle: at(secs / 2.0),
        end: at(secs),
        timeline,
    })
}
