//! Churn soak: containers created and killed continuously for a while, with an Events stream and
//! stats subscribers attached, watching berthd's memory and fds and every exit event.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use berth_api::proto::CreateContainerRequest;
use serde::Serialize;
use tokio::task::JoinSet;

use super::LoadError;
use super::daemon::{self, Client, ExitWatch, join_all, rpc};
use super::procfs::ProcSample;
use super::session::Session;
use super::summary::Percentiles;

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
    /// Medians of berthd's figures over the first, middle and last tenth or so of the soak.
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

/// berthd around `fraction` of the soak: the median of each figure over the samples within a
/// tenth of the soak of that point, since the containers in flight at any one instant (each with
/// its open files) make single samples jump.
fn around(timeline: &[(f64, ProcSample)], secs: f64, fraction: f64) -> ProcSample {
    let point = secs * fraction;
    let mut near: Vec<ProcSample> = timeline
        .iter()
        .filter(|(at, _)| (at - point).abs() <= secs / 10.0)
        .map(|&(_, sample)| sample)
        .collect();
    if near.is_empty() {
        near.extend(
            timeline
                .iter()
                .min_by(|a, b| (a.0 - point).abs().total_cmp(&(b.0 - point).abs()))
                .map(|&(_, sample)| sample),
        );
    }
    let median = |pick: fn(&ProcSample) -> u64| -> u64 {
        let mut values: Vec<u64> = near.iter().map(pick).collect();
        values.sort_unstable();
        values.get(values.len() / 2).copied().unwrap_or(0)
    };
    let mut cpu: Vec<f64> = near.iter().map(|s| s.cpu_secs).collect();
    cpu.sort_by(f64::total_cmp);
    ProcSample {
        rss_kb: median(|s| s.rss_kb),
        pss_kb: median(|s| s.pss_kb),
        threads: median(|s| s.threads),
        fds: median(|s| s.fds),
        children: median(|s| s.children),
        cpu_secs: cpu.get(cpu.len() / 2).copied().unwrap_or(0.0),
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
    let base_ids = (0..plan.base)
        .map(|i| session.id(format_args!("soak-base-{i}")))
        .collect();
    let base = daemon::create(session, clients, base_ids, "soak: base containers").await?;
    let stats = daemon::subscribe(&clients[0], &base.containers, plan.subscribers).await;
    let (stats_subscribers, stats_skipped) = match &stats {
        Ok(_) => (plan.subscribers, None),
        Err(why) => (0, Some(why.clone())),
    };
    let watch = Arc::new(ExitWatch::open(clients[0].clone()).await?);
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
        let (watch, session, bundle) = (watch.clone(), session.clone(), bundle.clone());
        workers.spawn(async move {
            for cycle in 0.. {
                if Instant::now() >= deadline {
                    return Ok(());
                }
                let id = session.id(format_args!("soak-{w}-{cycle}"));
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
                match watch.kill(&mut client, &id, pid).await? {
                    Some(latency) => exit_latencies
                        .lock()
                        .expect("exit latencies lock")
                        .push(latency),
                    None => {
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
    let churned = join_all(workers).await;
    let secs = began.elapsed().as_secs_f64();
    sampler.abort();
    // Read before the base containers' exits, which are not the churn's.
    let unexpected_exits = watch.unexpected();
    drop(watch);
    if let Ok((mut streams, _)) = stats {
        streams.abort_all();
    }
    churned?;
    daemon::kill_all(session, clients, &base.containers, "soak: base teardown").await?;

    let timeline = std::mem::take(&mut *timeline.lock().expect("timeline lock"));
    let at = |fraction: f64| around(&timeline, secs, fraction);
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
        unexpected_exits,
        stats_subscribers,
        stats_skipped,
        start: at(0.0),
        middle: at(0.5),
        end: at(1.0),
        timeline,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample(rss_kb: u64, fds: u64) -> ProcSample {
        ProcSample {
            rss_kb,
            fds,
            ..ProcSample::default()
        }
    }

    #[test]
    fn around_takes_the_median_near_the_point() {
        let timeline: Vec<(f64, ProcSample)> = (0..=100)
            .map(|t| {
                (
                    t as f64,
                    sample(1000 + t, if t % 2 == 0 { 200 } else { 260 }),
                )
            })
            .collect();
        let middle = around(&timeline, 100.0, 0.5);
        assert_eq!(middle.rss_kb, 1050);
        assert_eq!(middle.fds, 200);
        assert_eq!(around(&timeline, 100.0, 1.0).rss_kb, 1095);
        assert_eq!(around(&[], 10.0, 0.5), ProcSample::default());
    }
}
