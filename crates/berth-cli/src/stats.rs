//! `berth stats`: one GetStats stream per container, shown as a table refreshed at each sample
//! (like `docker stats`) or as one JSON object per sample.

use std::collections::{HashMap, HashSet};
use std::io::{self, IsTerminal};
use std::pin::Pin;
use std::time::{Duration, UNIX_EPOCH};

use berth_api::proto::api_client::ApiClient;
use berth_api::proto::{BlkioStatsEntry, NetworkStats, Stats, StatsRequest};
use clap::Args;
use serde_json::{Value, json};
use tokio::time::Instant;
use tokio_stream::{Stream, StreamExt, StreamMap};
use tonic::Status;
use tonic::transport::Channel;

use crate::error::Error;
use crate::output::{format_table, human_bytes, rfc3339, write_stdout};

#[derive(Args)]
pub struct StatsArgs {
    /// Container ids
    #[arg(required = true, value_name = "ID")]
    ids: Vec<String>,
    /// Print one table once each container has two samples (CPU % needs two), then exit
    #[arg(long)]
    no_stream: bool,
    /// Print one JSON object per sample, a line each, instead of a table
    #[arg(long)]
    json: bool,
}

/// cgroup v1 reports no memory limit as the largest page-aligned i64; nothing this large is a
/// real limit.
const NO_MEMORY_LIMIT: u64 = 1 << 62;

/// How long a redraw waits for the other containers' samples of the same tick, so a tick
/// redraws the table once rather than once per container.
const REDRAW_DELAY: Duration = Duration::from_millis(50);

/// Clears a terminal and puts the cursor top left, for redrawing in place.
const CLEAR_SCREEN: &str = "\x1b[2J\x1b[H";

/// A container's samples; a final `None` says the stream ended (the container exited).
type SampleStream = Pin<Box<dyn Stream<Item = Option<Result<Stats, Status>>> + Send>>;

/// The figures berth shows from one `Stats`.
#[derive(Clone, Debug, Default, PartialEq)]
struct Sample {
    /// Nanoseconds since the epoch.
    timestamp: u64,
    /// CPU time used since the container started, in nanoseconds.
    cpu_total: u64,
    memory_usage: u64,
    memory_max_usage: u64,
    /// Only cgroup v1 reports it (`hierarchical_memory_limit` in memory.stat).
    memory_limit: Option<u64>,
    network_rx: u64,
    network_tx: u64,
    blkio_read: u64,
    blkio_write: u64,
}

impl Sample {
    fn of(stats: &Stats) -> Self {
        let cgroup = stats.cgroup_stats.as_ref();
        let cpu_total = cgroup
            .and_then(|cgroup| cgroup.cpu_stats.as_ref())
            .and_then(|cpu| cpu.cpu_usage.as_ref())
            .map_or(0, |usage| usage.total_usage);
        let memory = cgroup.and_then(|cgroup| cgroup.memory_stats.as_ref());
        let memory_usage = memory.and_then(|memory| memory.usage.as_ref());
        let memory_limit = memory
            .and_then(|memory| memory.stats.get("hierarchical_memory_limit"))
            .copied()
            .filter(|limit| *limit < NO_MEMORY_LIMIT);
        let (blkio_read, blkio_write) = cgroup
            .and_then(|cgroup| cgroup.blkio_stats.as_ref())
            .map_or((0, 0), |blkio| {
                blkio_read_write(&blkio.io_service_bytes_recursive)
            });
        let (network_rx, network_tx) = network_rx_tx(&stats.network_stats);
        Sample {
            timestamp: stats.timestamp,
            cpu_total,
            memory_usage: memory_usage.map_or(0, |usage| usage.usage),
            memory_max_usage: memory_usage.map_or(0, |usage| usage.max_usage),
            memory_limit,
            network_rx,
            network_tx,
            blkio_read,
            blkio_write,
        }
    }
}

/// CPU time used between two samples over the time between them, in percent of one CPU.
fn cpu_percent(previous: &Sample, current: &Sample) -> Option<f64> {
    let elapsed = current
        .timestamp
        .checked_sub(previous.timestamp)
        .filter(|elapsed| *elapsed > 0)?;
    let used = current.cpu_total.saturating_sub(previous.cpu_total);
    Some(used as f64 / elapsed as f64 * 100.0)
}

/// Bytes read and written, summed over devices; the kernel spells the ops `Read`/`Write` (v1)
/// and berthd maps v2's `rbytes`/`wbytes` onto the same names.
fn blkio_read_write(entries: &[BlkioStatsEntry]) -> (u64, u64) {
    entries.iter().fold((0, 0), |(read, write), entry| {
        if entry.op.eq_ignore_ascii_case("read") {
            (read + entry.value, write)
        } else if entry.op.eq_ignore_ascii_case("write") {
            (read, write + entry.value)
        } else {
            (read, write)
        }
    })
}

/// Bytes received and sent, summed over the interfaces of the container's network namespace.
fn network_rx_tx(interfaces: &[NetworkStats]) -> (u64, u64) {
    interfaces.iter().fold((0, 0), |(rx, tx), interface| {
        (rx + interface.rx_bytes, tx + interface.tx_bytes)
    })
}

/// The last two samples of a container (CPU % needs both) and the last one as berthd sent it.
#[derive(Default)]
struct History {
    previous: Option<Sample>,
    latest: Option<Sample>,
    latest_stats: Option<Stats>,
}

impl History {
    fn push(&mut self, stats: Stats) {
        self.previous = self.latest.replace(Sample::of(&stats));
        self.latest_stats = Some(stats);
    }

    fn cpu_percent(&self) -> Option<f64> {
        cpu_percent(self.previous.as_ref()?, self.latest.as_ref()?)
    }
}

/// One table row; a container without a sample yet shows `--` throughout.
fn stats_row(id: &str, history: &History) -> Vec<String> {
    let unknown = || "--".to_owned();
    let Some(sample) = &history.latest else {
        let mut row = vec![id.to_owned()];
        row.resize(STATS_HEADER.len(), unknown());
        return row;
    };
    let memory = match sample.memory_limit {
        Some(limit) => format!(
            "{} / {}",
            human_bytes(sample.memory_usage),
            human_bytes(limit)
        ),
        None => human_bytes(sample.memory_usage),
    };
    vec![
        id.to_owned(),
        history
            .cpu_percent()
            .map_or_else(unknown, |percent| format!("{percent:.2}%")),
        memory,
        human_bytes(sample.memory_max_usage),
        format!(
            "{} / {}",
            human_bytes(sample.network_rx),
            human_bytes(sample.network_tx)
        ),
        format!(
            "{} / {}",
            human_bytes(sample.blkio_read),
            human_bytes(sample.blkio_write)
        ),
    ]
}

const STATS_HEADER: [&str; 6] = [
    "CONTAINER",
    "CPU %",
    "MEM USAGE / LIMIT",
    "MEM PEAK",
    "NET I/O",
    "BLOCK I/O",
];

/// The rows of the containers in `ids` that have a history, in that order.
fn stats_table(ids: &[String], histories: &HashMap<String, History>) -> String {
    let rows: Vec<Vec<String>> = ids
        .iter()
        .filter_map(|id| Some(stats_row(id, histories.get(id)?)))
        .collect();
    format_table(&STATS_HEADER, &rows)
}

/// The derived figures first, then the raw ones worth having; names in the proto3 JSON style.
fn sample_json(id: &str, stats: &Stats, sample: &Sample, cpu_percent: Option<f64>) -> Value {
    let cgroup = stats.cgroup_stats.as_ref();
    let cpu_usage = cgroup
        .and_then(|cgroup| cgroup.cpu_stats.as_ref())
        .and_then(|cpu| cpu.cpu_usage.as_ref());
    let memory = cgroup.and_then(|cgroup| cgroup.memory_stats.as_ref());
    let interfaces: Vec<Value> = stats
        .network_stats
        .iter()
        .map(|interface| {
            json!({
                "name": interface.name,
                "rxBytes": interface.rx_bytes,
                "rxPackets": interface.rx_packets,
                "rxErrors": interface.rx_errors,
                "rxDropped": interface.rx_dropped,
                "txBytes": interface.tx_bytes,
                "txPackets": interface.tx_packets,
                "txErrors": interface.tx_errors,
                "txDropped": interface.tx_dropped,
            })
        })
        .collect();
    json!({
        "id": id,
        "time": rfc3339(UNIX_EPOCH + Duration::from_nanos(sample.timestamp)),
        "timestamp": sample.timestamp,
        "cpuPercent": cpu_percent,
        "cpu": {
            "totalUsage": sample.cpu_total,
            "usageInKernelmode": cpu_usage.map(|usage| usage.usage_in_kernelmode),
            "usageInUsermode": cpu_usage.map(|usage| usage.usage_in_usermode),
            "percpuUsage": cpu_usage.map(|usage| &usage.percpu_usage),
        },
        "memory": {
            "usage": sample.memory_usage,
            "maxUsage": sample.memory_max_usage,
            "limit": sample.memory_limit,
            "failcnt": memory.and_then(|memory| memory.usage.as_ref()).map(|usage| usage.failcnt),
            "cache": memory.map(|memory| memory.cache),
        },
        "network": {
            "rxBytes": sample.network_rx,
            "txBytes": sample.network_tx,
            "interfaces": interfaces,
        },
        "blkio": {
            "readBytes": sample.blkio_read,
            "writeBytes": sample.blkio_write,
        },
    })
}

fn history_json(id: &str, history: &History) -> Option<Value> {
    Some(sample_json(
        id,
        history.latest_stats.as_ref()?,
        history.latest.as_ref()?,
        history.cpu_percent(),
    ))
}

pub async fn show(client: &mut ApiClient<Channel>, args: StatsArgs) -> Result<(), Error> {
    let mut seen = HashSet::new();
    let ids: Vec<String> = args
        .ids
        .into_iter()
        .filter(|id| seen.insert(id.clone()))
        .collect();
    // Every stream is open before anything is shown, so an unknown id fails the whole command.
    let mut streams: StreamMap<String, SampleStream> = StreamMap::new();
    let mut histories = HashMap::new();
    for id in &ids {
        let samples = client
            .get_stats(StatsRequest { id: id.clone() })
            .await?
            .into_inner();
        let samples = samples.map(Some).chain(tokio_stream::iter([None]));
        streams.insert(id.clone(), Box::pin(samples));
        histories.insert(id.clone(), History::default());
    }
    match (args.no_stream, args.json) {
        (false, true) => stream_json(streams).await,
        (false, false) => stream_table(streams, &ids, histories).await,
        (true, json) => {
            let histories = collect_two_samples(streams, histories).await?;
            if json {
                let lines: String = ids
                    .iter()
                    .filter_map(|id| history_json(id, histories.get(id)?))
                    .map(|value| format!("{value}\n"))
                    .collect();
                write_stdout(&lines)
            } else {
                let sampled: HashMap<String, History> = histories
                    .into_iter()
                    .filter(|(_, history)| history.latest.is_some())
                    .collect();
                write_stdout(&stats_table(&ids, &sampled))
            }
        }
    }
}

fn stream_error(id: String) -> impl FnOnce(Status) -> Error {
    move |status| Error::StatsLost { id, status }
}

/// Reads until each container has two samples or its stream has ended.
async fn collect_two_samples(
    mut streams: StreamMap<String, SampleStream>,
    mut histories: HashMap<String, History>,
) -> Result<HashMap<String, History>, Error> {
    while let Some((id, item)) = streams.next().await {
        let Some(stats) = item else {
            continue;
        };
        let stats = stats.map_err(stream_error(id.clone()))?;
        let history = histories.entry(id.clone()).or_default();
        history.push(stats);
        if history.previous.is_some() {
            streams.remove(&id);
        }
    }
    Ok(histories)
}

async fn stream_json(mut streams: StreamMap<String, SampleStream>) -> Result<(), Error> {
    let mut histories: HashMap<String, History> = HashMap::new();
    while let Some((id, item)) = streams.next().await {
        let Some(stats) = item else {
            histories.remove(&id);
            continue;
        };
        let stats = stats.map_err(stream_error(id.clone()))?;
        let history = histories.entry(id.clone()).or_default();
        history.push(stats);
        if let Some(value) = history_json(&id, history) {
            write_stdout(&format!("{value}\n"))?;
        }
    }
    Ok(())
}

/// Redraws the table shortly after each tick's samples, until every container has exited.
async fn stream_table(
    mut streams: StreamMap<String, SampleStream>,
    ids: &[String],
    mut histories: HashMap<String, History>,
) -> Result<(), Error> {
    let terminal = io::stdout().is_terminal();
    let draw = |histories: &HashMap<String, History>| {
        let table = stats_table(ids, histories);
        if terminal {
            write_stdout(&format!("{CLEAR_SCREEN}{table}"))
        } else {
            write_stdout(&format!("{table}\n"))
        }
    };
    draw(&histories)?;
    let mut redraw_at = None;
    loop {
        tokio::select! {
            next = streams.next() => {
                let Some((id, item)) = next else {
                    break;
                };
                match item {
                    Some(stats) => {
                        let stats = stats.map_err(stream_error(id.clone()))?;
                        histories.entry(id).or_default().push(stats);
                    }
                    None => {
                        histories.remove(&id);
                    }
                }
                redraw_at.get_or_insert_with(|| Instant::now() + REDRAW_DELAY);
            }
            () = tokio::time::sleep_until(redraw_at.unwrap_or_else(Instant::now)),
                if redraw_at.is_some() =>
            {
                redraw_at = None;
                draw(&histories)?;
            }
        }
    }
    // The last containers' rows go too.
    draw(&histories)
}

#[cfg(test)]
mod tests {
    use berth_api::proto::{CgroupStats, CpuStats, CpuUsage, MemoryData, MemoryStats};

    use super::*;

    fn blkio(op: &str, value: u64) -> BlkioStatsEntry {
        BlkioStatsEntry {
            major: 8,
            minor: 0,
            op: op.to_owned(),
            value,
        }
    }

    fn stats(timestamp: u64, cpu_total: u64) -> Stats {
        Stats {
            timestamp,
            network_stats: vec![
                NetworkStats {
                    name: "lo".to_owned(),
                    rx_bytes: 100,
                    tx_bytes: 100,
                    ..NetworkStats::default()
                },
                NetworkStats {
                    name: "eth0".to_owned(),
                    rx_bytes: 2048,
                    tx_bytes: 924,
                    ..NetworkStats::default()
                },
            ],
            cgroup_stats: Some(CgroupStats {
                cpu_stats: Some(CpuStats {
                    cpu_usage: Some(CpuUsage {
                        total_usage: cpu_total,
                        ..CpuUsage::default()
                    }),
                    throttling_data: None,
                }),
                memory_stats: Some(MemoryStats {
                    usage: Some(MemoryData {
                        usage: 3 << 20,
                        max_usage: 4 << 20,
                        failcnt: 0,
                    }),
                    stats: [("hierarchical_memory_limit".to_owned(), 16 << 20)].into(),
                    ..MemoryStats::default()
                }),
                blkio_stats: Some(berth_api::proto::BlkioStats {
                    io_service_bytes_recursive: vec![
                        blkio("Read", 4096),
                        blkio("Write", 1024),
                        blkio("read", 4096),
                        blkio("Sync", 5120),
                        blkio("Total", 9216),
                    ],
                    ..Default::default()
                }),
                hugetlb_stats: HashMap::new(),
            }),
        }
    }

    #[test]
    fn cpu_percent_is_cpu_time_over_wall_time_of_one_cpu() {
        let at = |timestamp, cpu_total| Sample {
            timestamp,
            cpu_total,
            ..Sample::default()
        };
        let second = 1_000_000_000;
        assert_eq!(cpu_percent(&at(0, 0), &at(second, second / 4)), Some(25.0));
        // Two CPUs busy for the whole interval.
        assert_eq!(
            cpu_percent(&at(second, 0), &at(2 * second, 2 * second)),
            Some(200.0)
        );
        assert_eq!(cpu_percent(&at(second, 5), &at(second, 9)), None);
        assert_eq!(cpu_percent(&at(2 * second, 5), &at(second, 9)), None);
        assert_eq!(cpu_percent(&at(0, 9), &at(second, 5)), Some(0.0));
    }

    #[test]
    fn blkio_sums_reads_and_writes_over_devices_in_any_case() {
        let entries = [
            blkio("Read", 10),
            blkio("Write", 1),
            blkio("READ", 5),
            blkio("write", 2),
            blkio("Async", 7),
            blkio("Total", 18),
        ];
        assert_eq!(blkio_read_write(&entries), (15, 3));
        assert_eq!(blkio_read_write(&[]), (0, 0));
    }

    #[test]
    fn a_sample_sums_interfaces_and_keeps_a_real_memory_limit() {
        let sample = Sample::of(&stats(7, 9));
        assert_eq!(
            sample,
            Sample {
                timestamp: 7,
                cpu_total: 9,
                memory_usage: 3 << 20,
                memory_max_usage: 4 << 20,
                memory_limit: Some(16 << 20),
                network_rx: 2148,
                network_tx: 1024,
                blkio_read: 8192,
                blkio_write: 1024,
            }
        );
        let mut unlimited = stats(7, 9);
        let memory = unlimited
            .cgroup_stats
            .as_mut()
            .and_then(|cgroup| cgroup.memory_stats.as_mut())
            .unwrap();
        memory.stats.insert(
            "hierarchical_memory_limit".to_owned(),
            9_223_372_036_854_771_712,
        );
        assert_eq!(Sample::of(&unlimited).memory_limit, None);
        assert_eq!(Sample::of(&Stats::default()), Sample::default());
    }

    #[test]
    fn the_table_shows_cpu_once_there_are_two_samples() {
        let ids = ["web".to_owned(), "db".to_owned(), "gone".to_owned()];
        let mut histories = HashMap::new();
        let mut web = History::default();
        web.push(stats(1_000_000_000, 0));
        web.push(stats(2_000_000_000, 125_000_000));
        histories.insert("web".to_owned(), web);
        let mut db = History::default();
        db.push(stats(1_000_000_000, 0));
        histories.insert("db".to_owned(), db);
        histories.insert("new".to_owned(), History::default());
        let ids_with_new = [ids.as_slice(), &["new".to_owned()]].concat();
        assert_eq!(
            stats_table(&ids_with_new, &histories),
            "CONTAINER   CPU %    MEM USAGE / LIMIT    MEM PEAK   NET I/O             BLOCK I/O\n\
             web         12.50%   3.0 MiB / 16.0 MiB   4.0 MiB    2.1 KiB / 1.0 KiB   8.0 KiB / 1.0 KiB\n\
             db          --       3.0 MiB / 16.0 MiB   4.0 MiB    2.1 KiB / 1.0 KiB   8.0 KiB / 1.0 KiB\n\
             new         --       --                   --         --                  --\n"
        );
    }

    #[test]
    fn json_has_the_derived_figures_and_null_cpu_before_two_samples() {
        let mut history = History::default();
        history.push(stats(1_000_000_000, 0));
        let first = history_json("web", &history).unwrap();
        assert_eq!(first["id"], "web");
        assert_eq!(first["cpuPercent"], Value::Null);
        assert_eq!(first["time"], "1970-01-01T00:00:01.000Z");
        assert_eq!(first["memory"]["limit"], 16 << 20);
        assert_eq!(first["network"]["rxBytes"], 2148);
        assert_eq!(first["network"]["interfaces"][1]["name"], "eth0");
        assert_eq!(first["blkio"]["writeBytes"], 1024);
        history.push(stats(2_000_000_000, 500_000_000));
        let second = history_json("web", &history).unwrap();
        assert_eq!(second["cpuPercent"], 50.0);
        assert_eq!(second["cpu"]["totalUsage"], 500_000_000);
        assert_eq!(history_json("web", &History::default()), None);
    }
}
