//! The memory trace of a density run (`--memory-every K`): creates in chunks of K, a look at the
//! host's memory before the first and after each chunk, and the table of what each container
//! costs by kind, berthd beside the direct runtime.
//!
//! Does not own the looks themselves (memory) or the creates (daemon, direct).

use std::sync::Arc;
use std::time::Duration;

use serde::Serialize;

use super::daemon::{self, Client, Created};
use super::memory::{Growth, HostMemory, growth};
use super::session::Session;
use super::summary::Percentiles;
use super::table::Table;

/// Looks at the host every K containers while one side creates them.
#[derive(Debug, Clone, Serialize)]
pub struct MemoryTrace {
    pub side: String,
    pub looks: Vec<HostMemory>,
    /// p50 create latency of each chunk, in ms, by the container count it ended at.
    pub chunk_p50_ms: Vec<(usize, f64)>,
    /// Why the creates stopped before N, when they did.
    pub stopped: Option<String>,
}

impl MemoryTrace {
    /// Starts a trace with the first look; `parent` is berthd (`daemon`) or this process.
    pub fn start(side: &str, parent: u32, daemon: bool) -> MemoryTrace {
        let mut trace = MemoryTrace {
            side: side.into(),
            looks: Vec::new(),
            chunk_p50_ms: Vec::new(),
            stopped: None,
        };
        trace.look(0, parent, daemon, &[]);
        trace
    }

    /// Takes a look with `containers` running, after a chunk created with `latencies`. A look
    /// that fails is said and skipped: the trace is a diagnosis, not the run.
    pub fn look(&mut self, containers: usize, parent: u32, daemon: bool, latencies: &[Duration]) {
        match HostMemory::take(containers, parent, daemon) {
            Ok(look) => {
                if let Some(p) = Percentiles::of(latencies) {
                    self.chunk_p50_ms.push((containers, p.p50_ms));
                }
                eprintln!("{}", self.progress_line(&look));
                self.looks.push(look);
            }
            Err(e) => eprintln!("{}: memory look at {containers} failed: {e}", self.side),
        }
    }

    /// The look on one line, with the slab caches that grew most per container since the first,
    /// so that a run that ends early still leaves its trace in the log.
    fn progress_line(&self, look: &HostMemory) -> String {
        let m = &look.meminfo;
        let top: Vec<String> = self
            .looks
            .first()
            .map(|first| growth(first, look))
            .unwrap_or_default()
            .into_iter()
            .filter(|g| g.kind.starts_with("slab "))
            .take(3)
            .map(|g| format!("{} {:.0} kB", &g.kind[5..], g.per_container))
            .collect();
        format!(
            "{} memory at {}: MemAvailable {} MB, Slab {} MB (SUnreclaim {}), Percpu {} MB, tasks {}, memory cgroups {}; per container: {}",
            self.side,
            look.containers,
            m.mem_available_kb / 1024,
            m.slab_kb / 1024,
            m.s_unreclaim_kb / 1024,
            m.percpu_kb / 1024,
            look.tasks,
            look.cgroups.memory,
            if top.is_empty() {
                "-".into()
            } else {
                top.join(", ")
            }
        )
    }

    /// The growth per container from the first look to the look at `containers` (or the last).
    pub fn growth_at(&self, containers: Option<usize>) -> Option<(usize, Vec<Growth>)> {
        let first = self.looks.first()?;
        let at = match containers {
            Some(n) => self.looks.iter().find(|l| l.containers == n)?,
            None => self.looks.last()?,
        };
        (at.containers > first.containers).then(|| (at.containers, growth(first, at)))
    }
}

/// Creates berthd's containers in chunks of `every`, looking at the host's memory between them.
/// A chunk that fails ends the creates: the trace says why and the run goes on with those made.
pub async fn create_berthd(
    session: &Arc<Session>,
    clients: &[Client],
    ids: Vec<String>,
    label: &str,
    every: usize,
    berthd_pid: u32,
) -> (Created, MemoryTrace) {
    let mut trace = MemoryTrace::start("berthd", berthd_pid, true);
    let mut all = Created {
        containers: Vec::with_capacity(ids.len()),
        latencies: Vec::with_capacity(ids.len()),
        elapsed: Duration::ZERO,
    };
    for chunk in ids.chunks(every.max(1)) {
        match daemon::create(session, clients, chunk.to_vec(), label).await {
            Ok(created) => {
                all.containers.extend(created.containers);
                all.elapsed += created.elapsed;
                trace.look(all.containers.len(), berthd_pid, true, &created.latencies);
                all.latencies.extend(created.latencies);
            }
            Err(e) => {
                eprintln!(
                    "berthd: creates stopped at {}: {}",
                    all.containers.len(),
                    e.0
                );
                trace.stopped = Some(e.0);
                break;
            }
        }
    }
    (all, trace)
}

/// The table: kB per container by kind, for each side at the first look after the start and at
/// the last; then each side's look every K containers with its chunk's create p50.
pub fn render(traces: &[&MemoryTrace]) -> String {
    let mut header = vec!["per container".to_owned()];
    let mut columns: Vec<Vec<Growth>> = Vec::new();
    for trace in traces {
        let first = trace.looks.get(1).map(|l| l.containers);
        let mut points = vec![trace.growth_at(first)];
        if trace.looks.len() > 2 {
            points.push(trace.growth_at(None));
        }
        for (n, growth) in points.into_iter().flatten() {
            header.push(format!("{} @{n}", trace.side));
            columns.push(growth);
        }
    }
    if columns.is_empty() {
        return "memory: fewer than two looks, nothing to compare\n".into();
    }
    let header_refs: Vec<&str> = header.iter().map(String::as_str).collect();
    let mut table = Table::new(&header_refs);
    // Every kind any column has, slab caches only when one of them grew by ≥ 0.1 kB each.
    let mut kinds: Vec<(String, &'static str)> = Vec::new();
    for column in &columns {
        for g in column {
            let worth = !g.kind.starts_with("slab ") || g.per_container >= 0.1;
            if worth && !kinds.iter().any(|(k, _)| *k == g.kind) {
                kinds.push((g.kind.clone(), g.unit));
            }
        }
    }
    for (kind, unit) in &kinds {
        let mut row = vec![if *unit == "kB" {
            format!("{kind} (kB)")
        } else {
            kind.clone()
        }];
        for column in &columns {
            let value = column.iter().find(|g| g.kind == *kind);
            row.push(value.map_or("-".into(), |g| format!("{:.1}", g.per_container)));
        }
        table.row(row);
    }
    let mut out = format!("\nmemory by kind\n{}", table.render());
    for trace in traces {
        out.push_str(&format!("\n{} every chunk\n", trace.side));
        out.push_str(&trace_table(trace).render());
        if let Some(why) = &trace.stopped {
            out.push_str(&format!("  creates stopped: {why}\n"));
        }
    }
    out
}

fn trace_table(trace: &MemoryTrace) -> Table {
    let mut table = Table::new(&[
        "containers",
        "create p50 (ms)",
        "MemAvailable (MB)",
        "Slab / SUnreclaim (MB)",
        "Percpu (MB)",
        "PageTables (MB)",
        "tasks",
        "memory cgroups",
        "berthd RSS (MB) / fds",
    ]);
    for look in &trace.looks {
        let m = &look.meminfo;
        let p50 = trace
            .chunk_p50_ms
            .iter()
            .find(|(n, _)| *n == look.containers)
            .map_or(String::new(), |(_, p)| format!("{p:.1}"));
        table.row(vec![
            look.containers.to_string(),
            p50,
            (m.mem_available_kb / 1024).to_string(),
            format!("{} / {}", m.slab_kb / 1024, m.s_unreclaim_kb / 1024),
            format!("{:.1}", m.percpu_kb as f64 / 1024.0),
            format!("{:.1}", m.page_tables_kb as f64 / 1024.0),
            look.tasks.to_string(),
            look.cgroups.memory.to_string(),
            look.daemon.map_or(String::new(), |d| {
                format!("{:.1} / {}", d.rss_kb as f64 / 1024.0, d.fds)
            }),
        ]);
    }
    table
}
