//! What the kernel says about processes: the cgroups one is in (resolved through this mount
//! namespace's cgroup mounts), its state and parent, berthd's spawn helper.

use std::collections::BTreeSet;
use std::fs;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

pub use berth_load::procfs::{children_of, is_spawn_helper};

use super::SETTLE;

/// A cgroup hierarchy mounted in this mount namespace.
pub struct CgroupMount {
    /// The mount point.
    pub dir: PathBuf,
    /// The path inside the hierarchy that is mounted there (mountinfo's root field).
    root: PathBuf,
    /// v1: the controllers (and `name=`) in its super options; v2: None.
    controllers: Option<Vec<String>>,
}

impl CgroupMount {
    /// Where cgroup path `cgroup` of this hierarchy is in this mount namespace, if the mount
    /// holds it.
    fn dir_of(&self, cgroup: &Path) -> Option<PathBuf> {
        let inside = cgroup.strip_prefix(&self.root).ok()?;
        Some(self.dir.join(inside))
    }
}

pub fn cgroup_mounts() -> Vec<CgroupMount> {
    let text = fs::read_to_string("/proc/self/mountinfo").expect("read /proc/self/mountinfo");
    text.lines()
        .filter_map(|line| {
            // `id parent major:minor root mountpoint options [optional...] - fstype source super`
            let (left, right) = line.split_once(" - ")?;
            let left: Vec<&str> = left.split(' ').collect();
            let right: Vec<&str> = right.split(' ').collect();
            let (root, dir) = (unescape(left.get(3)?), unescape(left.get(4)?));
            let controllers = match *right.first()? {
                "cgroup2" => None,
                "cgroup" => Some(right.get(2)?.split(',').map(str::to_owned).collect()),
                _ => return None,
            };
            Some(CgroupMount {
                dir: dir.into(),
                root: root.into(),
                controllers,
            })
        })
        .collect()
}

/// The directories of cgroup path `cgroup` in every hierarchy mounted here (where the
/// built-in runtime puts a container: one path in all of them).
pub fn dirs_of_cgroup(cgroup: &Path) -> Vec<PathBuf> {
    cgroup_mounts()
        .into_iter()
        .filter_map(|mount| mount.dir_of(cgroup))
        .collect()
}

/// The directory of `pid`'s cgroup in the memory controller's hierarchy (v1), else in the
/// unified one; None once it is gone.
pub fn memory_cgroup_of(pid: u32) -> Option<PathBuf> {
    let mounts = cgroup_mounts();
    let carries_memory = |m: &&CgroupMount| {
        m.controllers
            .as_ref()
            .is_some_and(|c| c.iter().any(|c| c == "memory"))
    };
    let mount = mounts
        .iter()
        .find(carries_memory)
        .or_else(|| mounts.iter().find(|m| m.controllers.is_none()))?;
    cgroups_of(pid)
        .into_iter()
        .find(|dir| dir.starts_with(&mount.dir))
}

/// mountinfo escapes space, tab, newline and backslash as octal.
fn unescape(field: &str) -> String {
    field
        .replace("\\040", " ")
        .replace("\\011", "\t")
        .replace("\\012", "\n")
        .replace("\\134", "\\")
}

/// The directories of every cgroup `pid` is in, one per line of /proc/<pid>/cgroup (v1
/// hierarchies and the v2 one), resolved under the hierarchy's mount; empty once it is gone.
pub fn cgroups_of(pid: u32) -> Vec<PathBuf> {
    let Ok(text) = fs::read_to_string(format!("/proc/{pid}/cgroup")) else {
        return Vec::new();
    };
    let mounts = cgroup_mounts();
    let mut dirs: Vec<PathBuf> = text
        .lines()
        .filter_map(|line| {
            let mut fields = line.splitn(3, ':');
            let (_, controllers, path) = (fields.next()?, fields.next()?, fields.next()?);
            let mount = mounts.iter().find(|m| match &m.controllers {
                None => controllers.is_empty(),
                Some(opts) => {
                    !controllers.is_empty()
                        && controllers.split(',').all(|c| opts.iter().any(|o| o == c))
                }
            })?;
            mount.dir_of(Path::new(path))
        })
        .collect();
    dirs.sort();
    dirs.dedup();
    dirs
}

// ----- processes, from /proc -----

pub struct ProcStat {
    pub state: char,
    pub ppid: u32,
}

/// State and parent of `pid` from /proc, None once it is gone.
pub fn proc_stat(pid: u32) -> Option<ProcStat> {
    let text = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // comm may contain spaces and parentheses: the fields we want follow the last ')'.
    let mut fields = text[text.rfind(')')? + 1..].split_whitespace();
    let state = fields.next()?.chars().next()?;
    let ppid = fields.next()?.parse().ok()?;
    Some(ProcStat { state, ppid })
}

/// Whether `pid` has a handler for `signal` (its bit in /proc/<pid>/status `SigCgt`).
pub fn catches(pid: u32, signal: i32) -> bool {
    let Ok(status) = fs::read_to_string(format!("/proc/{pid}/status")) else {
        return false;
    };
    status
        .lines()
        .find_map(|l| l.strip_prefix("SigCgt:"))
        .and_then(|mask| u64::from_str_radix(mask.trim(), 16).ok())
        .is_some_and(|mask| mask & (1 << (signal - 1)) != 0)
}

/// Every process below `pid`: its children, their children, and so on.
pub fn descendants_of(pid: u32) -> Vec<u32> {
    let mut found = Vec::new();
    let mut queue = vec![pid];
    while let Some(parent) = queue.pop() {
        let children = children_of(parent);
        queue.extend(&children);
        found.extend(children);
    }
    found
}

/// The live spawn helper among berthd's children, known by its process name.
fn spawn_helper(berthd: u32) -> Option<u32> {
    children_of(berthd)
        .into_iter()
        .find(|&pid| proc_stat(pid).is_some_and(|s| s.state != 'Z') && is_spawn_helper(pid))
}

/// Waits for berthd's live spawn helper, other than `old` if given: a helper names itself
/// after it starts, so right after berthd does it may not be known by name yet.
pub async fn wait_for_spawn_helper(berthd: u32, old: Option<u32>) -> u32 {
    let deadline = Instant::now() + SETTLE;
    loop {
        match spawn_helper(berthd) {
            Some(pid) if Some(pid) != old => return pid,
            _ if Instant::now() > deadline => {
                panic!("berthd has no spawn helper (other than {old:?})")
            }
            _ => tokio::time::sleep(Duration::from_millis(20)).await,
        }
    }
}

#[test]
fn every_cgroup_of_this_process_resolves_to_an_existing_directory() {
    let lines = fs::read_to_string("/proc/self/cgroup").expect("/proc/self/cgroup");
    let dirs = cgroups_of(std::process::id());
    assert!(!dirs.is_empty(), "no cgroup resolved from {lines:?}");
    for dir in &dirs {
        assert!(dir.is_dir(), "{} (from {lines:?})", dir.display());
    }
    let hierarchies: BTreeSet<&str> = lines.lines().filter_map(|l| l.split(':').nth(1)).collect();
    assert_eq!(dirs.len(), hierarchies.len(), "{dirs:?} from {lines:?}");
}

/// How many CPUs the kernel counts as possible (`/sys/devices/system/cpu/possible`, e.g. `0-3`
/// or `0,2-5`): cgroup v1's per-CPU figures have an entry for each, whatever this process may
/// use or the host has online.
pub fn possible_cpus() -> usize {
    let list = fs::read_to_string("/sys/devices/system/cpu/possible").expect("possible CPUs");
    list.trim()
        .split(',')
        .map(|range| match range.split_once('-') {
            Some((first, last)) => {
                let bound = |n: &str| n.parse::<usize>().expect("a CPU number");
                bound(last) - bound(first) + 1
            }
            None => 1,
        })
        .sum()
}

/// A `kB` line of /proc/<pid>/status (`VmRSS`, `VmHWM`, ...), in KiB.
pub fn status_kib(pid: u32, field: &str) -> u64 {
    let status = fs::read_to_string(format!("/proc/{pid}/status")).expect("/proc/<pid>/status");
    status
        .lines()
        .find_map(|l| l.strip_prefix(field)?.strip_prefix(':'))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap_or_else(|| panic!("{field} in /proc/{pid}/status"))
}
