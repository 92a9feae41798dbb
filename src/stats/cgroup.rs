//! Finding a container's cgroup and opening its stats files once.
//!
//! Owns: the cgroup location of a process (from `/proc/<pid>/cgroup` and the host's cgroup
//! mounts; cgroups-rs finds the v1 mount points and tells a unified host), the choice of files per
//! hierarchy, and the open descriptors. Does not own: reading them (sampler), what they mean
//! (snapshot), OOM notification (oom).

use std::os::fd::OwnedFd;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use cgroups_rs::fs::Controllers;
use cgroups_rs::fs::hierarchies::{self, V1};
use rustix::fs::{Mode, OFlags};

use crate::error::{Error, Result};
use crate::stats::parse;
use crate::stats::snapshot::{BlkioList, Field, FileKind, MemoryCounter};

/// Where a container's cgroup lives.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Location {
    V1(V1Dirs),
    /// The cgroup's directory in the unified hierarchy.
    V2(PathBuf),
}

/// The cgroup's directory in each v1 hierarchy berth reads; `None` where the controller is not
/// mounted.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct V1Dirs {
    pub cpuacct: Option<PathBuf>,
    pub cpu: Option<PathBuf>,
    pub memory: Option<PathBuf>,
    pub blkio: Option<PathBuf>,
    pub hugetlb: Option<PathBuf>,
}

/// The host's cgroup mounts, found once.
#[derive(Debug, Clone)]
pub struct Mounts {
    v1: V1,
    /// Where the unified hierarchy is mounted, if it is.
    v2: Option<PathBuf>,
}

impl Mounts {
    pub fn discover() -> Mounts {
        let v2 = if hierarchies::is_cgroup2_unified_mode() {
            Some(PathBuf::from(hierarchies::UNIFIED_MOUNTPOINT))
        } else {
            std::fs::read("/proc/self/mountinfo")
                .ok()
                .and_then(|text| cgroup2_mount(&text))
        };
        Mounts { v1: V1::new(), v2 }
    }

    fn v1_dir(&self, controller: Controllers, cgroup: &str) -> Option<PathBuf> {
        let (mount_point, mount_root) = self.v1.get_mount_point(controller)?;
        let relative = Path::new(cgroup).strip_prefix(&mount_root).unwrap_or(
            Path::new(cgroup)
                .strip_prefix("/")
                .unwrap_or(Path::new(cgroup)),
        );
        Some(mount_point.join(relative))
    }

    /// The v1 directories of cgroup path `cgroup` (as `/proc/<pid>/cgroup` writes it) in every
    /// hierarchy, as when all controllers share one path.
    pub fn v1_dirs(&self, cgroup: &str) -> V1Dirs {
        V1Dirs {
            cpuacct: self.v1_dir(Controllers::CpuAcct, cgroup),
            cpu: self.v1_dir(Controllers::Cpu, cgroup),
            memory: self.v1_dir(Controllers::Mem, cgroup),
            blkio: self.v1_dir(Controllers::BlkIo, cgroup),
            hugetlb: self.v1_dir(Controllers::HugeTlb, cgroup),
        }
    }

    /// The cgroup of process `pid`: v1 where its controllers are on v1 hierarchies, else v2.
    pub fn locate(&self, pid: u32) -> Result<Location> {
        let path = format!("/proc/{pid}/cgroup");
        let text = std::fs::read(&path).map_err(|e| Error::io(&path, e))?;
        self.locate_in(&text)
            .map_err(|e| Error::Internal(format!("{path}: {e}")))
    }

    fn locate_in(&self, proc_cgroup: &[u8]) -> Result<Location> {
        let mut v1 = V1Dirs::default();
        let mut unified = None;
        parse::proc_cgroup(proc_cgroup, |line| {
            if line.hierarchy == 0 && line.controllers.is_empty() {
                unified = Some(line.path.to_owned());
                return;
            }
            for controller in line.controllers.split(',') {
                let (slot, which) = match controller {
                    "cpuacct" => (&mut v1.cpuacct, Controllers::CpuAcct),
                    "cpu" => (&mut v1.cpu, Controllers::Cpu),
                    "memory" => (&mut v1.memory, Controllers::Mem),
                    "blkio" => (&mut v1.blkio, Controllers::BlkIo),
                    "hugetlb" => (&mut v1.hugetlb, Controllers::HugeTlb),
                    _ => continue,
                };
                *slot = self.v1_dir(which, line.path);
            }
        })?;
        if v1.cpuacct.is_some() || v1.memory.is_some() {
            return Ok(Location::V1(v1));
        }
        match (unified, &self.v2) {
            (Some(path), Some(mount)) => Ok(Location::V2(
                mount.join(path.strip_prefix('/').unwrap_or(&path)),
            )),
            _ => Err(Error::NotFound(
                "no cgroup with cpu or memory accounting: neither a v1 cpuacct or memory hierarchy nor a mounted unified hierarchy".into(),
            )),
        }
    }
}

/// The mount point of the unified hierarchy in `/proc/self/mountinfo` text.
fn cgroup2_mount(mountinfo: &[u8]) -> Option<PathBuf> {
    let text = std::str::from_utf8(mountinfo).ok()?;
    text.lines().find_map(|line| {
        let (mount, fs) = line.split_once(" - ")?;
        fs.starts_with("cgroup2 ")
            .then(|| mount.split(' ').nth(4).map(PathBuf::from))?
    })
}

/// One open stats file.
#[derive(Debug)]
pub struct StatsFile {
    pub kind: FileKind,
    pub fd: OwnedFd,
    pub path: Box<Path>,
}

/// A container's open stats files.
#[derive(Debug, Default)]
pub struct Source {
    pub files: Vec<StatsFile>,
    /// Page sizes ("2MB") in the order of their `FileKind::Hugetlb` index.
    pub hugetlb_sizes: Vec<Arc<str>>,
}

impl Source {
    /// Opens the stats files of the cgroup at `location`, and the network counters of the
    /// network namespace of `net_pid`. Files this kernel does not have are left out.
    pub fn open(location: &Location, net_pid: Option<u32>) -> Result<Source> {
        let mut source = Source::default();
        match location {
            Location::V1(dirs) => source.open_v1(dirs)?,
            Location::V2(dir) => source.open_v2(dir)?,
        }
        if let Some(pid) = net_pid {
            source.add(Path::new(&format!("/proc/{pid}/net/dev")), FileKind::NetDev)?;
        }
        Ok(source)
    }

    /// Opens `path` as `kind`; a file that does not exist is not an error, since which files
    /// exist depends on the kernel and its configuration. Returns whether it was opened.
    fn add(&mut self, path: &Path, kind: FileKind) -> Result<bool> {
        match rustix::fs::open(path, OFlags::RDONLY | OFlags::CLOEXEC, Mode::empty()) {
            Ok(fd) => {
                self.files.push(StatsFile {
                    kind,
                    fd,
                    path: path.into(),
                });
                Ok(true)
            }
            Err(rustix::io::Errno::NOENT) => Ok(false),
            Err(e) => Err(Error::io(path, e.into())),
        }
    }

    fn open_v1(&mut self, dirs: &V1Dirs) -> Result<()> {
        for dir in [&dirs.cpuacct, &dirs.memory].into_iter().flatten() {
            if !dir.is_dir() {
                return Err(Error::NotFound(format!(
                    "cgroup {} does not exist",
                    dir.display()
                )));
            }
        }
        if let Some(dir) = &dirs.cpuacct {
            self.add(&dir.join("cpuacct.usage_percpu"), FileKind::CpuacctPercpu)?;
            self.add(&dir.join("cpuacct.usage_all"), FileKind::CpuacctUsageAll)?;
        }
        if let Some(dir) = &dirs.cpu {
            self.add(&dir.join("cpu.stat"), FileKind::CpuStat)?;
        }
        if let Some(dir) = &dirs.memory {
            for (prefix, counter) in [
                ("memory", MemoryCounter::Usage),
                ("memory.memsw", MemoryCounter::Swap),
                ("memory.kmem", MemoryCounter::Kernel),
            ] {
                for (suffix, field) in [
                    ("usage_in_bytes", Field::Usage),
                    ("max_usage_in_bytes", Field::MaxUsage),
                    ("failcnt", Field::Failcnt),
                ] {
                    let path = dir.join(format!("{prefix}.{suffix}"));
                    self.add(&path, FileKind::Memory(counter, field))?;
                }
            }
            self.add(&dir.join("memory.stat"), FileKind::MemoryStatV1)?;
        }
        if let Some(dir) = &dirs.blkio {
            // CFQ's files (kernels before 5.0) where they exist, else the throttle policy's (which
            // counts every bio), else BFQ's.
            for list in BlkioList::ALL {
                for policy in ["blkio.", "blkio.throttle.", "blkio.bfq."] {
                    let path = dir.join(format!("{policy}{}", list.file_name()));
                    if self.add(&path, FileKind::BlkioV1(list))? {
                        break;
                    }
                }
            }
        }
        if let Some(dir) = &dirs.hugetlb {
            for (index, size) in self.hugetlb_sizes(dir, ".usage_in_bytes")? {
                for (suffix, field) in [
                    ("usage_in_bytes", Field::Usage),
                    ("max_usage_in_bytes", Field::MaxUsage),
                    ("failcnt", Field::Failcnt),
                ] {
                    let path = dir.join(format!("hugetlb.{size}.{suffix}"));
                    self.add(&path, FileKind::Hugetlb(index, field))?;
                }
            }
        }
        Ok(())
    }

    fn open_v2(&mut self, dir: &Path) -> Result<()> {
        if !dir.is_dir() {
            return Err(Error::NotFound(format!(
                "cgroup {} does not exist",
                dir.display()
            )));
        }
        let files = [
            ("cpu.stat", FileKind::CpuStat),
            (
                "memory.current",
                FileKind::Memory(MemoryCounter::Usage, Field::Usage),
            ),
            (
                "memory.peak",
                FileKind::Memory(MemoryCounter::Usage, Field::MaxUsage),
            ),
            ("memory.events", FileKind::MemoryEventsV2),
            ("memory.stat", FileKind::MemoryStatV2),
            ("memory.swap.current", FileKind::SwapCurrentV2),
            ("io.stat", FileKind::IoStat),
        ];
        for (name, kind) in files {
            self.add(&dir.join(name), kind)?;
        }
        for (index, size) in self.hugetlb_sizes(dir, ".current")? {
            let current = dir.join(format!("hugetlb.{size}.current"));
            self.add(&current, FileKind::Hugetlb(index, Field::Usage))?;
            let events = dir.join(format!("hugetlb.{size}.events"));
            self.add(&events, FileKind::HugetlbEventsV2(index))?;
        }
        Ok(())
    }

    /// Records the page sizes that have a `hugetlb.<size><suffix>` file in `dir`, with the index
    /// each one gets.
    fn hugetlb_sizes(&mut self, dir: &Path, suffix: &str) -> Result<Vec<(u8, Arc<str>)>> {
        let entries = std::fs::read_dir(dir).map_err(|e| Error::io(dir, e))?;
        let mut sizes: Vec<String> = entries
            .filter_map(|entry| {
                let name = entry.ok()?.file_name().into_string().ok()?;
                let size = name.strip_prefix("hugetlb.")?.strip_suffix(suffix)?;
                (!size.contains('.')).then(|| size.to_owned())
            })
            .collect();
        sizes.sort();
        let mut found = Vec::new();
        for size in sizes {
            let index = u8::try_from(self.hugetlb_sizes.len()).map_err(|_| {
                Error::Internal(format!("{}: too many huge page sizes", dir.display()))
            })?;
            let size: Arc<str> = size.into();
            self.hugetlb_sizes.push(Arc::clone(&size));
            found.push((index, size));
        }
        Ok(found)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_unified_mount_is_found_in_mountinfo() {
        let mountinfo = b"32 31 0:29 / /sys/fs/cgroup/cpu rw,relatime - cgroup cgroup rw,cpu\n\
            41 31 0:38 / /sys/fs/cgroup/unified rw,relatime - cgroup2 cgroup2 rw\n";
        assert_eq!(
            cgroup2_mount(mountinfo),
            Some(PathBuf::from("/sys/fs/cgroup/unified"))
        );
        assert_eq!(
            cgroup2_mount(b"31 23 0:28 / /sys/fs/cgroup rw - tmpfs tmpfs rw\n"),
            None
        );
    }

    #[test]
    fn a_v2_only_process_is_located_under_the_unified_mount() {
        let mounts = Mounts {
            v1: V1::new(),
            v2: Some(PathBuf::from("/sys/fs/cgroup")),
        };
        assert_eq!(
            mounts.locate_in(b"0::/system.slice/ctr\n").unwrap(),
            Location::V2(PathBuf::from("/sys/fs/cgroup/system.slice/ctr"))
        );
        let none = Mounts {
            v1: V1::new(),
            v2: None,
        };
        assert!(matches!(
            none.locate_in(b"0::/ctr\n"),
            Err(Error::NotFound(_))
        ));
    }

    fn v2_fixture() -> tempfile::TempDir {
        let dir = tempfile::tempdir().unwrap();
        for (name, text) in [
            ("cpu.stat", "usage_usec 10\n"),
            ("memory.current", "4096\n"),
            ("memory.events", "max 0\noom_kill 0\n"),
            ("memory.stat", "file 0\n"),
            ("io.stat", ""),
            ("hugetlb.2MB.current", "0\n"),
            ("hugetlb.2MB.events", "max 0\n"),
            ("hugetlb.2MB.max", "max\n"),
            ("hugetlb.1GB.current", "0\n"),
            ("hugetlb.1GB.events", "max 0\n"),
        ] {
            std::fs::write(dir.path().join(name), text).unwrap();
        }
        dir
    }

    #[test]
    fn v2_files_that_exist_are_opened_and_the_rest_left_out() {
        let dir = v2_fixture();
        let source = Source::open(&Location::V2(dir.path().to_owned()), None).unwrap();
        let kinds: Vec<FileKind> = source.files.iter().map(|f| f.kind).collect();
        assert_eq!(
            kinds,
            [
                FileKind::CpuStat,
                FileKind::Memory(MemoryCounter::Usage, Field::Usage),
                FileKind::MemoryEventsV2,
                FileKind::MemoryStatV2,
                FileKind::IoStat,
                FileKind::Hugetlb(0, Field::Usage),
                FileKind::HugetlbEventsV2(0),
                FileKind::Hugetlb(1, Field::Usage),
                FileKind::HugetlbEventsV2(1),
            ]
        );
        let sizes: Vec<&str> = source.hugetlb_sizes.iter().map(|s| &**s).collect();
        assert_eq!(sizes, ["1GB", "2MB"]);
    }

    #[test]
    fn a_missing_cgroup_is_not_found() {
        let gone = Location::V2(PathBuf::from("/nonexistent/cgroup"));
        let err = Source::open(&gone, None).unwrap_err();
        assert_eq!(err.to_string(), "cgroup /nonexistent/cgroup does not exist");
    }
}
