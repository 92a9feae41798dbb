//! What berthd costs, from /proc: memory (smaps_rollup), threads, fds, CPU time and children;
//! and the host's available memory.

use std::fs;
use std::io;
use std::path::Path;

use serde::Serialize;

/// One look at a process.
#[derive(Debug, Clone, Copy, PartialEq, Default, Serialize)]
pub struct ProcSample {
    pub rss_kb: u64,
    pub pss_kb: u64,
    pub threads: u64,
    pub fds: u64,
    /// utime + stime, in seconds.
    pub cpu_secs: f64,
    /// Direct children (container inits, added processes, the spawn helper).
    pub children: u64,
}

impl ProcSample {
    pub fn take(pid: u32) -> io::Result<ProcSample> {
        let proc = Path::new("/proc").join(pid.to_string());
        let (rss_kb, pss_kb) = parse_smaps_rollup(&fs::read_to_string(proc.join("smaps_rollup"))?)
            .map_err(|e| io::Error::other(format!("{}/smaps_rollup: {e}", proc.display())))?;
        let threads = parse_status_threads(&fs::read_to_string(proc.join("status"))?)
            .map_err(|e| io::Error::other(format!("{}/status: {e}", proc.display())))?;
        Ok(ProcSample {
            rss_kb,
            pss_kb,
            threads,
            fds: fs::read_dir(proc.join("fd"))?.count() as u64,
            cpu_secs: cpu_secs(pid)?,
            children: children_of(pid).len() as u64,
        })
    }
}

fn clock_ticks_per_second() -> f64 {
    use nix::unistd::{SysconfVar, sysconf};
    // Linux reports USER_HZ, 100 on every architecture, if sysconf cannot say.
    match sysconf(SysconfVar::CLK_TCK) {
        Ok(Some(hz)) if hz > 0 => hz as f64,
        _ => 100.0,
    }
}

/// `Rss:` and `Pss:` of /proc/<pid>/smaps_rollup, in KiB.
pub fn parse_smaps_rollup(text: &str) -> Result<(u64, u64), String> {
    Ok((kib_field(text, "Rss:")?, kib_field(text, "Pss:")?))
}

/// `Threads:` of /proc/<pid>/status.
pub fn parse_status_threads(text: &str) -> Result<u64, String> {
    field(text, "Threads:")?
        .parse()
        .map_err(|e| format!("Threads: {e}"))
}

/// utime + stime (fields 14 and 15) of /proc/<pid>/stat, in clock ticks.
pub fn parse_stat_cpu_ticks(text: &str) -> Result<u64, String> {
    // comm (field 2) may hold spaces and parentheses: count fields from the last ')'.
    let after_comm = text
        .rfind(')')
        .map(|at| &text[at + 1..])
        .ok_or("no ')' closing the command name")?;
    let fields: Vec<&str> = after_comm.split_whitespace().collect();
    // fields[0] is field 3 (state), so utime (14) is fields[11] and stime (15) fields[12].
    let tick = |i: usize| -> Result<u64, String> {
        fields
            .get(i)
            .ok_or_else(|| format!("only {} fields after the command name", fields.len()))?
            .parse::<u64>()
            .map_err(|e| format!("field {}: {e}", i + 3))
    };
    Ok(tick(11)? + tick(12)?)
}

/// The soft limit of `Max open files` in /proc/<pid>/limits.
pub fn parse_open_files_limit(text: &str) -> Result<u64, String> {
    let soft = field(text, "Max open files")?
        .split_whitespace()
        .next()
        .ok_or("Max open files: no value")?;
    soft.parse()
        .map_err(|e| format!("Max open files {soft:?}: {e}"))
}

pub fn open_files_limit(pid: u32) -> io::Result<u64> {
    let text = fs::read_to_string(format!("/proc/{pid}/limits"))?;
    parse_open_files_limit(&text).map_err(io::Error::other)
}

/// `MemAvailable:` of /proc/meminfo, in KiB.
pub fn parse_mem_available(text: &str) -> Result<u64, String> {
    kib_field(text, "MemAvailable:")
}

pub fn mem_available_kb() -> io::Result<u64> {
    parse_mem_available(&fs::read_to_string("/proc/meminfo")?).map_err(io::Error::other)
}

/// The 1-minute load average from /proc/loadavg.
pub fn load_average() -> Option<f64> {
    fs::read_to_string("/proc/loadavg")
        .ok()?
        .split_whitespace()
        .next()?
        .parse()
        .ok()
}

/// The CPU time (utime + stime, in seconds) `pid` has used itself, not counting its reaped
/// children.
pub fn cpu_secs(pid: u32) -> io::Result<f64> {
    let path = format!("/proc/{pid}/stat");
    let ticks = parse_stat_cpu_ticks(&fs::read_to_string(&path)?)
        .map_err(|e| io::Error::other(format!("{path}: {e}")))?;
    Ok(ticks as f64 / clock_ticks_per_second())
}

/// berthd's spawn helpers among the direct children of `pid`: the processes that start its
/// runtime commands, whose CPU is berthd's as much as its own threads' is.
pub fn spawn_helpers_of(pid: u32) -> Vec<u32> {
    children_of(pid)
        .into_iter()
        .filter(|&child| is_spawn_helper(child))
        .collect()
}

/// Whether `pid` is a berthd spawn helper, by the name it gives itself.
pub fn is_spawn_helper(pid: u32) -> bool {
    fs::read_to_string(format!("/proc/{pid}/comm"))
        .is_ok_and(|comm| comm.trim_end() == SPAWN_HELPER_NAME)
}

/// The name berthd's spawn helper gives itself (berthd's `spawn::HELPER_NAME`).
const SPAWN_HELPER_NAME: &str = "berthd-spawn";

/// The direct children of `pid`, from every thread's `children` list.
pub fn children_of(pid: u32) -> Vec<u32> {
    let Ok(tasks) = fs::read_dir(format!("/proc/{pid}/task")) else {
        return Vec::new();
    };
    let mut children: Vec<u32> = tasks
        .flatten()
        .filter_map(|task| fs::read_to_string(task.path().join("children")).ok())
        .flat_map(|list| {
            list.split_whitespace()
                .filter_map(|p| p.parse().ok())
                .collect::<Vec<u32>>()
        })
        .collect();
    children.sort_unstable();
    children.dedup();
    children
}

fn field<'a>(text: &'a str, name: &str) -> Result<&'a str, String> {
    text.lines()
        .find_map(|line| line.strip_prefix(name))
        .map(str::trim)
        .ok_or_else(|| format!("no {name} line"))
}

fn kib_field(text: &str, name: &str) -> Result<u64, String> {
    let value = field(text, name)?;
    let number = value.strip_suffix("kB").unwrap_or(value).trim();
    number.parse().map_err(|e| format!("{name} {value:?}: {e}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    const SMAPS_ROLLUP: &str = "\
55d0c8a2a000-7ffd5b3f4000 ---p 00000000 00:00 0                          [rollup]
Rss:               12345 kB
Pss:                9876 kB
Pss_Dirty:          8000 kB
Shared_Clean:       3000 kB
Swap:                  0 kB
";

    #[test]
    fn smaps_rollup_gives_rss_and_pss() {
        assert_eq!(parse_smaps_rollup(SMAPS_ROLLUP), Ok((12345, 9876)));
        let err = parse_smaps_rollup("Rss: 1 kB\n").unwrap_err();
        assert_eq!(err, "no Pss: line");
        assert!(parse_smaps_rollup("Rss: lots kB\nPss: 1 kB\n").is_err());
    }

    #[test]
    fn stat_cpu_ticks_survive_a_command_name_with_spaces_and_parentheses() {
        let stat = "4242 (tokio (rt) 1) S 1 4242 4242 0 -1 4194560 2000 0 0 0 \
                    150 35 0 0 20 0 9 0 12345 100000000 3000 18446744073709551615";
        assert_eq!(parse_stat_cpu_ticks(stat), Ok(185));
        assert!(parse_stat_cpu_ticks("4242 (x) S 1 2").is_err());
        assert!(parse_stat_cpu_ticks("no parenthesis").is_err());
    }

    #[test]
    fn status_threads_and_meminfo() {
        let status = "Name:\tberthd\nState:\tS (sleeping)\nThreads:\t5\nSigQ:\t0/1\n";
        assert_eq!(parse_status_threads(status), Ok(5));
        let meminfo =
            "MemTotal:       24576000 kB\nMemFree:  100 kB\nMemAvailable:   20000000 kB\n";
        assert_eq!(parse_mem_available(meminfo), Ok(20_000_000));
        assert!(parse_status_threads("Name:\tx\n").is_err());
    }

    #[test]
    fn open_files_limit_is_the_soft_column() {
        let limits = "\
Limit                     Soft Limit           Hard Limit           Units
Max processes             95000                95000                processes
Max open files            20000                40000                files
Max locked memory         8388608              8388608              bytes
";
        assert_eq!(parse_open_files_limit(limits), Ok(20000));
        assert!(parse_open_files_limit("Max processes 1 1 processes\n").is_err());
    }

    #[test]
    fn this_process_can_be_sampled() {
        let sample = ProcSample::take(std::process::id()).unwrap();
        assert!(sample.rss_kb > 0 && sample.pss_kb > 0, "{sample:?}");
        assert!(sample.threads >= 1 && sample.fds >= 3, "{sample:?}");
    }
}
