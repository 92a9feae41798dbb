//! `--metrics-containers`: one series set per running container (CPU seconds, memory usage and
//! limit, memory limit hits, OOM kills, network bytes by interface), what cAdvisor gives, from the
//! stats sampler's shared snapshots: the endpoint holds one GetStats-style subscription per
//! container, so the sampler reads each container's files once per tick for everyone, and a
//! scrape reads no cgroup file at all.
//!
//! Owns: keeping a subscription per running container (synced every stats interval) and
//! encoding the newest snapshots. Does not own: sampling (stats) or serving (metrics).

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, Weak};

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric};
use prometheus_client::metrics::MetricType;
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::gauge::ConstGauge;

use crate::stats::{Snapshot, StatsHub, Subscription};
use crate::supervisor::Supervisor;

pub struct ContainerSeries {
    supervisor: Arc<Supervisor>,
    stats: Arc<StatsHub>,
    subscriptions: Mutex<BTreeMap<String, Subscription>>,
}

impl std::fmt::Debug for ContainerSeries {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("per-container series")
    }
}

impl ContainerSeries {
    /// Starts following every running container; the task ends when the series are dropped.
    pub fn start(supervisor: Arc<Supervisor>, stats: Arc<StatsHub>) -> Arc<Self> {
        let series = Arc::new(ContainerSeries {
            supervisor,
            stats,
            subscriptions: Mutex::new(BTreeMap::new()),
        });
        let weak = Arc::downgrade(&series);
        let interval = series.stats.interval();
        tokio::spawn(async move {
            let mut ticks = tokio::time::interval(interval);
            loop {
                ticks.tick().await;
                let Some(series) = Weak::upgrade(&weak) else {
                    break;
                };
                series.sync();
            }
        });
        series
    }

    /// Subscribes to containers new since the last sync and drops those gone.
    fn sync(&self) {
        let running = self.supervisor.container_ids();
        let mut subscriptions = self.subscriptions.lock().expect("subscriptions poisoned");
        subscriptions.retain(|id, _| running.binary_search(id).is_ok());
        for id in running {
            if subscriptions.contains_key(&id) {
                continue;
            }
            match self.stats.subscribe(&id) {
                Ok(Some(subscription)) => {
                    subscriptions.insert(id, subscription);
                }
                Ok(None) => {}
                Err(e) => tracing::debug!(id, error = %e, "no metrics for this container yet"),
            }
        }
    }

    /// The newest snapshot of each followed container, ordered by id.
    fn snapshots(&self) -> Vec<(String, Arc<Snapshot>)> {
        let subscriptions = self.subscriptions.lock().expect("subscriptions poisoned");
        subscriptions
            .iter()
            .filter_map(|(id, s)| s.latest().map(|snap| (id.clone(), snap)))
            .collect()
    }
}

/// The registered collector; the sync task holds only a weak reference, so dropping the
/// registry ends it.
#[derive(Debug)]
pub struct Shared(pub Arc<ContainerSeries>);

/// One family: a value per container (and per interface for network).
fn family<'a>(
    encoder: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    counter: bool,
    values: impl Iterator<Item = (Vec<(&'static str, &'a str)>, f64)>,
) -> std::fmt::Result {
    let kind = if counter {
        MetricType::Counter
    } else {
        MetricType::Gauge
    };
    let mut metric = encoder.encode_descriptor(name, help, None, kind)?;
    for (labels, value) in values {
        let encoder = metric.encode_family(&labels)?;
        if counter {
            ConstCounter::new(value).encode(encoder)?;
        } else {
            ConstGauge::new(value).encode(encoder)?;
        }
    }
    Ok(())
}

impl Collector for Shared {
    fn encode(&self, mut encoder: DescriptorEncoder) -> std::fmt::Result {
        let snapshots = self.0.snapshots();
        let per = |value: fn(&Snapshot) -> Option<f64>| {
            snapshots
                .iter()
                .filter_map(move |(id, s)| value(s).map(|v| (vec![("id", id.as_str())], v)))
        };
        let e = &mut encoder;
        family(
            e,
            "berth_container_cpu_usage_seconds",
            "CPU time the container used",
            true,
            per(|s| Some(s.cpu.total as f64 / 1e9)),
        )?;
        family(
            e,
            "berth_container_memory_usage_bytes",
            "Memory the container's cgroup uses",
            false,
            per(|s| Some(s.memory.usage.usage as f64)),
        )?;
        family(
            e,
            "berth_container_memory_limit_bytes",
            "The cgroup's memory limit, where the cgroup reports one",
            false,
            per(|s| memory_limit(s).map(|l| l as f64)),
        )?;
        family(
            e,
            "berth_container_memory_failures",
            "Times the cgroup hit its memory limit (failcnt; cgroup v2: the max events)",
            true,
            per(|s| Some(s.memory.usage.failcnt as f64)),
        )?;
        let kills = self.0.stats.oom_kills();
        family(
            e,
            "berth_container_oom_kills",
            "Processes the OOM killer killed in the container's cgroup",
            true,
            snapshots.iter().map(|(id, _)| {
                let count = kills.get(id).copied().unwrap_or(0);
                (vec![("id", id.as_str())], count as f64)
            }),
        )?;
        let network = |bytes: fn(&crate::stats::snapshot::Interface) -> u64| {
            snapshots.iter().flat_map(move |(id, s)| {
                s.network.iter().map(move |i| {
                    (
                        vec![("id", id.as_str()), ("interface", &*i.name)],
                        bytes(i) as f64,
                    )
                })
            })
        };
        family(
            e,
            "berth_container_network_receive_bytes",
            "Bytes the container received, by interface",
            true,
            network(|i| i.rx_bytes),
        )?;
        family(
            e,
            "berth_container_network_transmit_bytes",
            "Bytes the container sent, by interface",
            true,
            network(|i| i.tx_bytes),
        )?;
        Ok(())
    }
}

/// cgroup v1 reports the effective limit in memory.stat; "no limit" is a huge number there.
fn memory_limit(snapshot: &Snapshot) -> Option<u64> {
    snapshot
        .memory
        .stats
        .iter()
        .find(|(key, _)| &**key == "hierarchical_memory_limit")
        .map(|(_, limit)| *limit)
        .filter(|&limit| limit < i64::MAX as u64 / 2)
}
