//! Where the host's memory goes as containers accumulate: one look at `/proc/meminfo`,
//! `/proc/slabinfo`, `/proc/cgroups`, the task count, the container inits' PSS and berthd's RSS
//! and fds; and the growth between two looks, per container, by kind.
//!
//! The parsers take the files' bytes and nothing else, so fixtures test them. Does not own when
//! the looks are taken (density) or the table (density).

use std::fs;
use std::io;

use serde::Serialize;

use super::procfs::{ProcSample, children_of, parse_smaps_rollup};

/// The `/proc/meminfo` fields a container can grow, in KiB.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize)]
pub struct Meminfo {
    pub mem_free_kb: u64,
    pub mem_available_kb: u64,
    pub anon_pages_kb: u64,
    pub shmem_kb: u64,
    pub slab_kb: u64,
    pub s_unreclaim_kb: u64,
    pub kernel_stack_kb: u64,
    pub page_tables_kb: u64,
    pub percpu_kb: u64,
    pub committed_as_kb: u64,
}

/// The [`Meminfo`] fields' names in `/proc/meminfo`, in the struct's order.
const MEMINFO_FIELDS: [&str; 10] = [
    "MemFree",
    "MemAvailable",
    "AnonPages",
    "Shmem",
    "Slab",
    "SUnreclaim",
    "KernelStack",
    "PageTables",
    "Percpu",
    "Committed_AS",
];

/// Parses `/proc/meminfo`; every field of [`Meminfo`] must be there.
pub fn parse_meminfo(text: &[u8]) -> Result<Meminfo, String> {
    let mut values = [None; MEMINFO_FIELDS.len()];
    for line in text.split(|&b| b == b'\n') {
        let Some(colon) = line.iter().position(|&b| b == b':') else {
            continue;
        };
        let name = &line[..colon];
        let Some(i) = MEMINFO_FIELDS.iter().position(|f| f.as_bytes() == name) else {
            continue;
        };
        let value = line[colon + 1..]
            .split(u8::is_ascii_whitespace)
            .find(|w| !w.is_empty())
            .and_then(|w| std::str::from_utf8(w).ok()?.parse().ok())
            .ok_or_else(|| format!("{}: no number of kB", MEMINFO_FIELDS[i]))?;
        values[i] = Some(value);
    }
    let missing: Vec<&str> = MEMINFO_FIELDS
        .iter()
        .zip(&values)
        .filter(|(_, value)| value.is_none())
        .map(|(name, _)| *name)
        .collect();
    if !missing.is_empty() {
        return Err(format!("no {} line", missing.join(", ")));
    }
    let [
        mem_free_kb,
        mem_available_kb,
        anon_pages_kb,
        shmem_kb,
        slab_kb,
        s_unreclaim_kb,
        kernel_stack_kb,
        page_tables_kb,
        percpu_kb,
        committed_as_kb,
    ] = values.map(|value| value.unwrap_or_default());
    Ok(Meminfo {
        mem_free_kb,
        mem_available_kb,
        anon_pages_kb,
        shmem_kb,
        slab_kb,
        s_unreclaim_kb,
        kernel_stack_kb,
        page_tables_kb,
        percpu_kb,
        committed_as_kb,
    })
}

/// One line of `/proc/slabinfo`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct SlabCache {
    pub name: String,
    pub objects: u64,
    /// Its slabs' pages: what the cache holds, used or not (slabtop's CACHE SIZE).
    pub bytes: u64,
}

/// Parses `/proc/slabinfo` version 2.x: `name active_objs num_objs objsize objperslab
/// pagesperslab : tunables … : slabdata active_slabs num_slabs sharedavail`.
pub fn parse_slabinfo(text: &[u8], page_size: u64) -> Result<Vec<SlabCache>, String> {
    let mut lines = text.split(|&b| b == b'\n');
    let version = lines.next().unwrap_or_default();
    if !version.starts_with(b"slabinfo - version: 2.") {
        return Err(format!(
            "unknown slabinfo header {:?}",
            String::from_utf8_lossy(&version[..version.len().min(60)])
        ));
    }
    let mut caches = Vec::new();
    for line in lines.filter(|l| !l.is_empty() && !l.starts_with(b"#")) {
        let words: Vec<&[u8]> = line
            .split(u8::is_ascii_whitespace)
            .filter(|w| !w.is_empty())
            .collect();
        let Some(first) = words.first() else {
            continue;
        };
        let name = String::from_utf8_lossy(first).into_owned();
        let number = |i: usize| -> Result<u64, String> {
            words
                .get(i)
                .and_then(|w| std::str::from_utf8(w).ok()?.parse().ok())
                .ok_or_else(|| format!("{name}: no number in column {}", i + 1))
        };
        // Columns: 0 name, 1 active_objs, 2 num_objs, 3 objsize, 4 objperslab, 5 pagesperslab,
        // 6 ':', 7 'tunables', 8-10, 11 ':', 12 'slabdata', 13 active_slabs, 14 num_slabs.
        if words.get(12).copied() != Some(b"slabdata".as_slice()) {
            return Err(format!("{name}: no slabdata columns"));
        }
        caches.push(SlabCache {
            objects: number(2)?,
            bytes: number(14)? * number(5)? * page_size,
            name,
        });
    }
    Ok(caches)
}

/// Cgroups on the host from `/proc/cgroups`: each mounted v1 hierarchy counted once (controllers
/// mounted together share one), and the memory controller's own count.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize)]
pub struct CgroupCounts {
    pub v1_hierarchies: u64,
    pub memory: u64,
}

pub fn parse_proc_cgroups(text: &[u8]) -> Result<CgroupCounts, String> {
    let mut hierarchies: Vec<(u64, u64)> = Vec::new();
    let mut counts = CgroupCounts::default();
    for line in text.split(|&b| b == b'\n') {
        if line.is_empty() || line.starts_with(b"#") {
            continue;
        }
        let text = String::from_utf8_lossy(line);
        let words: Vec<&str> = text.split_whitespace().collect();
        let [name, hierarchy, count, _enabled] = words[..] else {
            return Err(format!("{text:?}: not four columns"));
        };
        let (Ok(hierarchy), Ok(count)) = (hierarchy.parse::<u64>(), count.parse::<u64>()) else {
            return Err(format!("{text:?}: hierarchy or count is not a number"));
        };
        if name == "memory" {
            counts.memory = count;
        }
        if hierarchy != 0 && !hierarchies.iter().any(|&(h, _)| h == hierarchy) {
            hierarchies.push((hierarchy, count));
        }
    }
    counts.v1_hierarchies = hierarchies.iter().map(|&(_, count)| count).sum();
    Ok(counts)
}

/// Waits (at most [`SETTLE_BOUND`]) until the host's memory cgroups stop going away: the
/// kernel frees a removed cgroup in the background (its workqueue and RCU), so a phase that
/// starts right after another one's teardown would share the CPU with freeing that phase's
/// cgroups. Every measured phase, berthd's and each direct floor's, starts after this.
pub async fn cgroups_settled() {
    let memory_cgroups = || {
        fs::read("/proc/cgroups")
            .ok()
            .and_then(|text| parse_proc_cgroups(&text).ok())
            .map(|counts| counts.memory)
    };
    let deadline = std::time::Instant::now() + SETTLE_BOUND;
    let mut last = memory_cgroups();
    while std::time::Instant::now() < deadline {
        tokio::time::sleep(SETTLE_LOOK).await;
        let now = memory_cgroups();
        if now.is_none() || now >= last {
            return;
        }
        last = now;
    }
}

/// How long [`cgroups_settled`] waits at most, and how often it looks.
const SETTLE_BOUND: std::time::Duration = std::time::Duration::from_secs(20);
const SETTLE_LOOK: std::time::Duration = std::time::Duration::from_millis(250);

/// The number of tasks on the host: the denominator of `/proc/loadavg`'s fourth field.
pub fn parse_loadavg_tasks(text: &[u8]) -> Result<u64, String> {
    let text = String::from_utf8_lossy(text);
    text.split_whitespace()
        .nth(3)
        .and_then(|field| field.split_once('/'))
        .and_then(|(_, total)| total.parse().ok())
        .ok_or_else(|| format!("{:?}: no running/total field", text.trim()))
}

/// One look at the host, with `containers` running.
#[derive(Debug, Clone, Serialize)]
pub struct HostMemory {
    pub containers: usize,
    pub meminfo: Meminfo,
    pub slabs: Vec<SlabCache>,
    pub cgroups: CgroupCounts,
    pub tasks: u64,
    /// The container inits found (children named `sleep` of berthd or of this process).
    pub inits: u64,
    pub inits_pss_kb: u64,
    /// berthd's own figures, on its side.
    pub daemon: Option<ProcSample>,
}

impl HostMemory {
    /// Looks now; the inits are the `sleep` children of `parent` (berthd or this subreaper).
    pub fn take(containers: usize, parent: u32, daemon: bool) -> io::Result<HostMemory> {
        let page_size = nix::unistd::sysconf(nix::unistd::SysconfVar::PAGE_SIZE)
            .ok()
            .flatten()
            .map_or(4096, |size| size as u64);
        let read =
            |path: &str| fs::read(path).map_err(|e| io::Error::other(format!("{path}: {e}")));
        let bad = |path: &str, e: String| io::Error::other(format!("{path}: {e}"));
        let meminfo =
            parse_meminfo(&read("/proc/meminfo")?).map_err(|e| bad("/proc/meminfo", e))?;
        let slabs = parse_slabinfo(&read("/proc/slabinfo")?, page_size)
            .map_err(|e| bad("/proc/slabinfo", e))?;
        let cgroups =
            parse_proc_cgroups(&read("/proc/cgroups")?).map_err(|e| bad("/proc/cgroups", e))?;
        let tasks =
            parse_loadavg_tasks(&read("/proc/loadavg")?).map_err(|e| bad("/proc/loadavg", e))?;
        let (mut inits, mut inits_pss_kb) = (0, 0);
        for pid in children_of(parent) {
            let is_init = fs::read(format!("/proc/{pid}/comm")).is_ok_and(|c| c == b"sleep\n");
            let rollup = fs::read_to_string(format!("/proc/{pid}/smaps_rollup"));
            if let (true, Ok(Ok((_, pss)))) = (is_init, rollup.map(|t| parse_smaps_rollup(&t))) {
                inits += 1;
                inits_pss_kb += pss;
            }
        }
        let daemon = if daemon {
            Some(ProcSample::take(parent)?)
        } else {
            None
        };
        Ok(HostMemory {
            containers,
            meminfo,
            slabs,
            cgroups,
            tasks,
            inits,
            inits_pss_kb,
            daemon,
        })
    }
}

/// What one kind of thing grew by between two looks, per container.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Growth {
    pub kind: String,
    /// kB per container, or a count per container when `unit` says so.
    pub per_container: f64,
    pub unit: &'static str,
}

/// The growth from `from` to `to` per container added, by kind: the host's counters, the inits,
/// berthd, and every slab cache that grew (largest first).
pub fn growth(from: &HostMemory, to: &HostMemory) -> Vec<Growth> {
    let added = to.containers.saturating_sub(from.containers).max(1) as f64;
    let per = |before: u64, after: u64| (after as f64 - before as f64) / added;
    let (a, b) = (&from.meminfo, &to.meminfo);
    let kb = |kind: &str, before: u64, after: u64| Growth {
        kind: kind.into(),
        per_container: per(before, after),
        unit: "kB",
    };
    let count = |kind: &str, before: u64, after: u64| Growth {
        kind: kind.into(),
        per_container: per(before, after),
        unit: "count",
    };
    let mut out = vec![
        kb("MemAvailable drop", b.mem_available_kb, a.mem_available_kb),
        kb("MemFree drop", b.mem_free_kb, a.mem_free_kb),
        kb("Slab", a.slab_kb, b.slab_kb),
        kb("  of which SUnreclaim", a.s_unreclaim_kb, b.s_unreclaim_kb),
        kb("Percpu", a.percpu_kb, b.percpu_kb),
        kb("KernelStack", a.kernel_stack_kb, b.kernel_stack_kb),
        kb("PageTables", a.page_tables_kb, b.page_tables_kb),
        kb("Shmem", a.shmem_kb, b.shmem_kb),
        kb("AnonPages", a.anon_pages_kb, b.anon_pages_kb),
        kb("Committed_AS", a.committed_as_kb, b.committed_as_kb),
        kb("container inits' PSS", from.inits_pss_kb, to.inits_pss_kb),
    ];
    if let (Some(before), Some(after)) = (&from.daemon, &to.daemon) {
        out.push(kb("berthd RSS", before.rss_kb, after.rss_kb));
        out.push(count("berthd fds", before.fds, after.fds));
    }
    out.push(count("tasks on the host", from.tasks, to.tasks));
    out.push(count(
        "cgroups (all v1 hierarchies)",
        from.cgroups.v1_hierarchies,
        to.cgroups.v1_hierarchies,
    ));
    out.push(count(
        "memory cgroups",
        from.cgroups.memory,
        to.cgroups.memory,
    ));
    let mut slabs: Vec<Growth> = to
        .slabs
        .iter()
        .map(|cache| {
            let before = from
                .slabs
                .iter()
                .find(|c| c.name == cache.name)
                .map_or(0, |c| c.bytes);
            kb(
                &format!("slab {}", cache.name),
                before / 1024,
                cache.bytes / 1024,
            )
        })
        .filter(|g| g.per_container > 0.0)
        .collect();
    slabs.sort_by(|x, y| y.per_container.total_cmp(&x.per_container));
    out.extend(slabs);
    out
}

#[cfg(test)]
mod tests;
