//! Finding a container's cgroup and opening its stats files once.
//!
//! Owns: the cgroup location of a process (from `/proc/<pid>/cgroup` and the host's cgroup
//! mounts, read once from `/proc/self/mountinfo`), the choice of files per hierarchy, and the open
//! descriptors. Does not own: reading them (sampler), what they mean (snapshot), OOM notification
//! (oom).

use std::collections::BTreeSet;
use std::ffi::OsString;
use std::os::fd::OwnedFd;
use std::os::unix::ffi::OsStringExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

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

/// The directory of cgroup path `cgroup` where its hierarchy is mounted at `point` with the
/// cgroup `root` at the mount's root (`/` unless a subtree is mounted).
fn mounted_dir(point: &Path, root: &Path, cgroup: &Path) -> PathBuf {
    let relative = cgroup
        .strip_prefix(root)
        .or_else(|_| cgroup.strip_prefix("/"))
        .unwrap_or(cgroup);
    point.join(relative)
}

/// Where the unified hierarchy is when the host runs it alone.
const UNIFIED_MOUNT_POINT: &str = "/sys/fs/cgroup";

/// Super options of a v1 cgroup mount that are not controllers: `rw`/`ro` and the flags the
/// kernel's `cgroup1_show_options` writes (`release_agent=` is told apart by its `=`).
const V1_FLAGS: [&[u8]; 7] = [
    b"rw",
    b"ro",
    b"noprefix",
    b"xattr",
    b"clone_children",
    b"cpuset_v2_mode",
    b"favordynmods",
];

/// A mounted v1 hierarchy.
#[derive(Debug, Clone, PartialEq, Eq)]
struct V1Mount {
    /// Its controllers from the super options, comma-separated (`cpu,cpuacct`), a named
    /// hierarchy as `name=systemd`.
    controllers: String,
    /// The cgroup at the root of the mount: `/` unless a subtree is mounted.
    root: PathBuf,
    /// Where it is mounted.
    point: PathBuf,
}

impl V1Mount {
    fn carries(&self, controller: &str) -> bool {
        self.controllers.split(',').any(|c| c == controller)
    }
}

/// The host's cgroup mounts, found once.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Mounts {
    /// The v1 hierarchies in mount order; the first that carries a controller is the one read.
    v1: Vec<V1Mount>,
    /// Where the unified hierarchy is mounted, if it is.
    v2: Option<PathBuf>,
}

impl Mounts {
    /// The cgroup mounts of berthd's mount namespace. Without them no container's cgroup can be
    /// located, which `locate` reports per container; so an unreadable mountinfo is logged here
    /// and not fatal.
    pub fn discover() -> Mounts {
        const PATH: &str = "/proc/self/mountinfo";
        match std::fs::read(PATH) {
            Ok(text) => Mounts::from_mountinfo(&text),
            Err(e) => {
                let error = Error::io(PATH, e);
                tracing::warn!(%error, "no cgroup mounts known: container stats are unavailable");
                Mounts::default()
            }
        }
    }

    /// The cgroup mounts in `/proc/<pid>/mountinfo` text: every `cgroup` (v1) mount with its
    /// controllers, and the unified (`cgroup2`) mount: `/sys/fs/cgroup` if that is one, as on a
    /// unified host, else the first one (`/sys/fs/cgroup/unified` on a hybrid host). Lines that
    /// are not a mount as proc(5) describes it are skipped; mount points and roots are unescaped
    /// (`\040` is a space).
    fn from_mountinfo(mountinfo: &[u8]) -> Mounts {
        let mut mounts = Mounts::default();
        // Whether the last mount on /sys/fs/cgroup, the one visible there, is cgroup2.
        let mut unified_host = false;
        for line in mountinfo.split(|&b| b == b'\n') {
            // `id parent major:minor root point options [optional...] - fstype source super`
            let mut fields = line.split(|&b| b == b' ');
            let (Some(root), Some(point)) = (fields.nth(3), fields.next()) else {
                continue;
            };
            let mut fs = fields.skip_while(|&f| f != b"-").skip(1);
            let (Some(fstype), Some(_source), Some(options)) = (fs.next(), fs.next(), fs.next())
            else {
                continue;
            };
            if point == UNIFIED_MOUNT_POINT.as_bytes() {
                unified_host = fstype == b"cgroup2";
            }
            match fstype {
                b"cgroup" => mounts.v1.push(V1Mount {
                    controllers: v1_controllers(options),
                    root: unescape(root),
                    point: unescape(point),
                }),
                b"cgroup2" if mounts.v2.is_none() => mounts.v2 = Some(unescape(point)),
                _ => {}
            }
        }
        if unified_host {
            mounts.v2 = Some(PathBuf::from(UNIFIED_MOUNT_POINT));
        }
        mounts
    }

    /// The directory of cgroup path `cgroup` in the hierarchy a `/proc/<pid>/cgroup` line names
    /// by `hierarchy` and `controllers` (`name=systemd` for a named one; hierarchy 0 with none
    /// is the unified one), where this host mounts it.
    pub fn dir_in(&self, hierarchy: u64, controllers: &str, cgroup: &Path) -> Option<PathBuf> {
        let (root, point) = if hierarchy == 0 && controllers.is_empty() {
            (Path::new("/"), self.v2.as_deref()?)
        } else {
            let wanted: BTreeSet<&str> = controllers.split(',').collect();
            let mount = self
                .v1
                .iter()
                .find(|m| m.controllers.split(',').collect::<BTreeSet<_>>() == wanted)?;
            (mount.root.as_path(), mount.point.as_path())
        };
        Some(mounted_dir(point, root, cgroup))
    }

    /// Where each v1 hierarchy is mounted.
    pub fn v1_points(&self) -> impl Iterator<Item = &Path> {
        self.v1.iter().map(|mount| mount.point.as_path())
    }

    /// The first v1 hierarchy that carries `controller`.
    fn v1_mount(&self, controller: &str) -> Option<&V1Mount> {
        self.v1.iter().find(|mount| mount.carries(controller))
    }

    fn v1_dir(&self, controller: &str, cgroup: &str) -> Option<PathBuf> {
        let mount = self.v1_mount(controller)?;
        Some(mounted_dir(&mount.point, &mount.root, Path::new(cgroup)))
    }

    /// The v1 directories of cgroup path `cgroup` (as `/proc/<pid>/cgroup` writes it) in every
    /// hierarchy, as when all controllers share one path.
    pub fn v1_dirs(&self, cgroup: &str) -> V1Dirs {
        V1Dirs {
            cpuacct: self.v1_dir("cpuacct", cgroup),
            cpu: self.v1_dir("cpu", cgroup),
            memory: self.v1_dir("memory", cgroup),
            blkio: self.v1_dir("blkio", cgroup),
            hugetlb: self.v1_dir("hugetlb", cgroup),
        }
    }

    /// The cgroup of process `pid`: v1 where its controllers are on v1 hierarchies, else v2.
    /// Refused for a process that has begun to exit when it is v1: the kernel then shows `/`
    /// for every v1 hierarchy (v2 keeps the cgroup). Checked after the read, and only when the
    /// read shows a `/`: a process not exiting then was not exiting during it, and one whose
    /// read shows no `/` was not exiting during the read.
    pub fn locate(&self, pid: u32) -> Result<Location> {
        let (path, text) = crate::procfs::process_cgroups(pid)?;
        let (location, shows_a_v1_root) = self
            .locate_in(&text)
            .map_err(|e| Error::Internal(format!("{path}: {e}")))?;
        if matches!(location, Location::V1(_))
            && shows_a_v1_root
            && crate::procfs::process_exiting(pid)?
        {
            return Err(Error::NotFound(format!(
                "process {pid} has exited, and {path} names the v1 roots, not its cgroups"
            )));
        }
        Ok(location)
    }

    /// The location of cgroup path `cgroup` in every hierarchy: v1 where this host has a
    /// cpuacct or memory hierarchy, else v2.
    pub fn locate_path(&self, cgroup: &Path) -> Result<Location> {
        let text = cgroup.to_str().ok_or_else(|| {
            Error::Internal(format!("cgroup path {} is not UTF-8", cgroup.display()))
        })?;
        self.v1_else_v2(self.v1_dirs(text), Some(text))
    }

    /// The location `/proc/<pid>/cgroup` names, and whether it shows `/` for a v1 hierarchy (as
    /// it does for every v1 hierarchy of a process that has begun to exit).
    fn locate_in(&self, proc_cgroup: &[u8]) -> Result<(Location, bool)> {
        let mut v1 = V1Dirs::default();
        let mut unified = None;
        let mut shows_a_v1_root = false;
        parse::proc_cgroup(proc_cgroup, |line| {
            shows_a_v1_root |= line.hierarchy != 0 && line.path == "/";
            if line.hierarchy == 0 && line.controllers.is_empty() {
                unified = Some(line.path.to_owned());
                return;
            }
            for controller in line.controllers.split(',') {
                let slot = match controller {
                    "cpuacct" => &mut v1.cpuacct,
                    "cpu" => &mut v1.cpu,
                    "memory" => &mut v1.memory,
                    "blkio" => &mut v1.blkio,
                    "hugetlb" => &mut v1.hugetlb,
                    _ => continue,
                };
                *slot = self.v1_dir(controller, line.path);
            }
        })?;
        Ok((self.v1_else_v2(v1, unified.as_deref())?, shows_a_v1_root))
    }

    /// The v1 directories where a cpuacct or memory one is among them, else the unified
    /// cgroup `unified` under the unified mount.
    fn v1_else_v2(&self, v1: V1Dirs, unified: Option<&str>) -> Result<Location> {
        if v1.cpuacct.is_some() || v1.memory.is_some() {
            return Ok(Location::V1(v1));
        }
        match (unified, &self.v2) {
            (Some(path), Some(mount)) => Ok(Location::V2(
                mount.join(path.strip_prefix('/').unwrap_or(path)),
            )),
            _ => Err(Error::NotFound(
                "no cgroup with cpu or memory accounting: neither a v1 cpuacct or memory hierarchy nor a mounted unified hierarchy".into(),
            )),
        }
    }
}

/// The controllers among the super options of a v1 cgroup mount (`rw,cpu,cpuacct` gives
/// `cpu,cpuacct`; `rw,xattr,name=systemd` gives `name=systemd`).
fn v1_controllers(options: &[u8]) -> String {
    let is_flag = |option: &[u8]| {
        V1_FLAGS.contains(&option) || (option.contains(&b'=') && !option.starts_with(b"name="))
    };
    let mut controllers = String::new();
    for option in options.split(|&b| b == b',') {
        if option.is_empty() || is_flag(option) {
            continue;
        }
        if !controllers.is_empty() {
            controllers.push(',');
        }
        controllers.push_str(&String::from_utf8_lossy(option));
    }
    controllers
}

/// A mountinfo path field with the kernel's octal escapes (`\040` space, `\011` tab, `\012`
/// newline, `\134` backslash) undone.
fn unescape(field: &[u8]) -> PathBuf {
    let mut bytes = Vec::with_capacity(field.len());
    let mut rest = field;
    while let Some((&first, tail)) = rest.split_first() {
        let (byte, after) = match tail {
            [
                a @ b'0'..=b'3',
                b @ b'0'..=b'7',
                c @ b'0'..=b'7',
                after @ ..,
            ] if first == b'\\' => (((a - b'0') << 6) | ((b - b'0') << 3) | (c - b'0'), after),
            _ => (first, tail),
        };
        bytes.push(byte);
        rest = after;
    }
    PathBuf::from(OsString::from_vec(bytes))
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

    /// This host (a VM with every v1 controller on its own hierarchy, systemd's named one and
    /// the unified hierarchy beside them; no hugetlb).
    const THIS_HOST: &[u8] = include_bytes!("fixtures/mountinfo-this-host");

    /// A unified systemd host (Ubuntu 22.04): cgroup2 alone on /sys/fs/cgroup, with a
    /// delegated subtree bind-mounted at a path with a space, and a USB stick's label escaped.
    const UNIFIED_HOST: &[u8] = include_bytes!("fixtures/mountinfo-unified-host");

    /// A hybrid systemd host (Ubuntu 20.04): v1 controllers, some sharing a hierarchy, systemd's
    /// named hierarchy with `xattr`, cgroup2 at /sys/fs/cgroup/unified, and a hand-mounted named
    /// hierarchy at a path with a space.
    const HYBRID_HOST: &[u8] = include_bytes!("fixtures/mountinfo-hybrid-host");

    fn v1_mount(mounts: &Mounts, controller: &str) -> Option<(String, String, String)> {
        let mount = mounts.v1_mount(controller)?;
        Some((
            mount.controllers.clone(),
            mount.root.display().to_string(),
            mount.point.display().to_string(),
        ))
    }

    fn at(controllers: &str, point: &str) -> Option<(String, String, String)> {
        Some((controllers.into(), "/".into(), point.into()))
    }

    #[test]
    fn this_host_has_one_hierarchy_per_controller_beside_the_unified_one() {
        let mounts = Mounts::from_mountinfo(THIS_HOST);
        assert_eq!(mounts.v1.len(), 9);
        for name in ["cpu", "cpuacct", "memory", "blkio", "pids"] {
            let point = format!("/sys/fs/cgroup/{name}");
            assert_eq!(v1_mount(&mounts, name), at(name, &point));
        }
        assert_eq!(
            v1_mount(&mounts, "name=systemd"),
            at("name=systemd", "/sys/fs/cgroup/systemd")
        );
        assert_eq!(v1_mount(&mounts, "hugetlb"), None);
        assert_eq!(mounts.v2, Some(PathBuf::from("/sys/fs/cgroup/unified")));
        assert_eq!(
            mounts.v1_dirs("/ctr"),
            V1Dirs {
                cpuacct: Some(PathBuf::from("/sys/fs/cgroup/cpuacct/ctr")),
                cpu: Some(PathBuf::from("/sys/fs/cgroup/cpu/ctr")),
                memory: Some(PathBuf::from("/sys/fs/cgroup/memory/ctr")),
                blkio: Some(PathBuf::from("/sys/fs/cgroup/blkio/ctr")),
                hugetlb: None,
            }
        );
    }

    #[test]
    fn a_unified_host_has_only_its_cgroup2_mount() {
        let mounts = Mounts::from_mountinfo(UNIFIED_HOST);
        assert_eq!(mounts.v1, []);
        assert_eq!(mounts.v2, Some(PathBuf::from("/sys/fs/cgroup")));
        assert_eq!(
            mounts.locate_in(b"0::/system.slice/ctr\n").unwrap().0,
            Location::V2(PathBuf::from("/sys/fs/cgroup/system.slice/ctr"))
        );
    }

    #[test]
    fn a_hybrid_host_has_shared_and_named_hierarchies() {
        let mounts = Mounts::from_mountinfo(HYBRID_HOST);
        assert_eq!(mounts.v1.len(), 10);
        let cpu = at("cpu,cpuacct", "/sys/fs/cgroup/cpu,cpuacct");
        assert_eq!(v1_mount(&mounts, "cpu"), cpu);
        assert_eq!(v1_mount(&mounts, "cpuacct"), cpu);
        assert_eq!(
            v1_mount(&mounts, "net_prio"),
            at("net_cls,net_prio", "/sys/fs/cgroup/net_cls,net_prio")
        );
        assert_eq!(
            v1_mount(&mounts, "cpuset"),
            at("cpuset", "/sys/fs/cgroup/cpuset")
        );
        assert_eq!(
            v1_mount(&mounts, "name=systemd"),
            at("name=systemd", "/sys/fs/cgroup/systemd")
        );
        assert_eq!(
            v1_mount(&mounts, "name=tools"),
            at("name=tools", "/srv/cgroup tools")
        );
        assert_eq!(mounts.v2, Some(PathBuf::from("/sys/fs/cgroup/unified")));
        let proc_cgroup = b"12:hugetlb:/ctr\n11:pids:/ctr\n7:memory:/ctr\n\
            5:blkio:/ctr\n3:cpu,cpuacct:/ctr\n1:name=systemd:/ctr\n0::/ctr\n";
        assert_eq!(
            mounts.locate_in(proc_cgroup).unwrap().0,
            Location::V1(V1Dirs {
                cpuacct: Some(PathBuf::from("/sys/fs/cgroup/cpu,cpuacct/ctr")),
                cpu: Some(PathBuf::from("/sys/fs/cgroup/cpu,cpuacct/ctr")),
                memory: Some(PathBuf::from("/sys/fs/cgroup/memory/ctr")),
                blkio: Some(PathBuf::from("/sys/fs/cgroup/blkio/ctr")),
                hugetlb: Some(PathBuf::from("/sys/fs/cgroup/hugetlb/ctr")),
            })
        );
        // Only a `/` on a v1 line calls for the exiting check; the first is what the kernel
        // shows for a process that has begun to exit.
        let shows_a_v1_root = |text: &[u8]| mounts.locate_in(text).unwrap().1;
        assert!(!shows_a_v1_root(proc_cgroup));
        assert!(shows_a_v1_root(
            b"12:hugetlb:/\n7:memory:/\n3:cpu,cpuacct:/\n0::/ctr\n"
        ));
        assert!(shows_a_v1_root(b"7:memory:/ctr\n1:name=systemd:/\n"));
        assert!(!shows_a_v1_root(b"7:memory:/ctr\n0::/\n"));
    }

    #[test]
    fn the_first_cgroup2_mount_stands_in_when_sys_fs_cgroup_is_none() {
        let mountinfo = b"31 23 0:28 / /sys/fs/cgroup rw - tmpfs tmpfs rw\n\
            41 30 0:38 / /run/cgroup\\040two rw - cgroup2 none rw\n\
            42 30 0:38 / /run/cgroup3 rw - cgroup2 none rw\n";
        let mounts = Mounts::from_mountinfo(mountinfo);
        assert_eq!(mounts.v2, Some(PathBuf::from("/run/cgroup two")));
        // cgroup2 on /sys/fs/cgroup, then covered by a tmpfs: the tmpfs is what is there.
        let covered = b"34 24 0:28 / /sys/fs/cgroup rw - cgroup2 cgroup2 rw\n\
            35 34 0:29 / /sys/fs/cgroup rw - tmpfs tmpfs rw\n\
            36 35 0:30 / /sys/fs/cgroup/unified rw - cgroup2 cgroup2 rw\n";
        assert_eq!(
            Mounts::from_mountinfo(covered).v2,
            Some(PathBuf::from("/sys/fs/cgroup"))
        );
        assert_eq!(Mounts::from_mountinfo(b"").v2, None);
    }

    #[test]
    fn a_hierarchy_mounted_from_a_subtree_is_joined_below_its_root() {
        let mountinfo = b"1093 1085 0:32 /docker/abc /sys/fs/cgroup/memory ro,nosuid - cgroup cgroup rw,memory\n";
        let mounts = Mounts::from_mountinfo(mountinfo);
        assert_eq!(
            mounts.v1_dirs("/docker/abc/ctr").memory,
            Some(PathBuf::from("/sys/fs/cgroup/memory/ctr"))
        );
        assert_eq!(
            mounts.v1_dirs("/elsewhere").memory,
            Some(PathBuf::from("/sys/fs/cgroup/memory/elsewhere"))
        );
    }

    #[test]
    fn lines_that_are_not_mounts_are_skipped() {
        let mountinfo = b"\n32 31 0:29 / /sys/fs/cgroup/cpu rw\n\
            33 31 0:30 / /sys/fs/cgroup/memory rw - cgroup\n\
            35 31 0:32 / /sys/fs/cgroup/pids rw,relatime - cgroup cgroup rw,pids\n";
        let mounts = Mounts::from_mountinfo(mountinfo);
        assert_eq!(mounts.v1.len(), 1);
        assert_eq!(v1_mount(&mounts, "pids"), at("pids", "/sys/fs/cgroup/pids"));
    }

    #[test]
    fn octal_escapes_are_undone_and_anything_else_kept() {
        assert_eq!(
            unescape(br"/a\040b\011c\012d\134e"),
            PathBuf::from("/a b\tc\nd\\e")
        );
        assert_eq!(unescape(br"/a\04b\9"), PathBuf::from(r"/a\04b\9"));
    }

    #[test]
    fn discovery_agrees_with_cgroups_rs_on_this_host() {
        use cgroups_rs::fs::hierarchies;
        let ours = Mounts::discover();
        let theirs = hierarchies::auto();
        if theirs.v2() {
            assert_eq!(ours.v2, Some(theirs.root()));
            return;
        }
        let subsystems = theirs.subsystems();
        for name in [
            "memory",
            "cpuacct",
            "cpu",
            "blkio",
            "pids",
            "hugetlb",
            "name=systemd",
        ] {
            let theirs = subsystems
                .iter()
                .find(|s| s.controller_name() == name)
                .map(|s| {
                    let controller = s.to_controller();
                    (controller.path().to_owned(), controller.base().to_owned())
                });
            let ours = ours
                .v1_mount(name)
                .map(|m| (m.point.clone(), m.root.clone()));
            assert_eq!(ours, theirs, "{name}");
        }
    }

    #[test]
    fn a_v2_only_process_is_located_under_the_unified_mount() {
        let mounts = Mounts {
            v1: Vec::new(),
            v2: Some(PathBuf::from("/sys/fs/cgroup")),
        };
        assert_eq!(
            mounts.locate_in(b"0::/system.slice/ctr\n").unwrap().0,
            Location::V2(PathBuf::from("/sys/fs/cgroup/system.slice/ctr"))
        );
        assert!(matches!(
            Mounts::default().locate_in(b"0::/ctr\n"),
            Err(Error::NotFound(_))
        ));
    }

    #[test]
    fn one_cgroup_path_is_located_in_every_v1_hierarchy_else_under_the_unified_mount() {
        let hybrid = Mounts::from_mountinfo(THIS_HOST);
        let Ok(Location::V1(dirs)) = hybrid.locate_path(Path::new("/berthd/web")) else {
            panic!("this host has v1 controllers");
        };
        assert_eq!(
            dirs.memory,
            Some(PathBuf::from("/sys/fs/cgroup/memory/berthd/web"))
        );
        assert_eq!(
            dirs.cpuacct,
            Some(PathBuf::from("/sys/fs/cgroup/cpuacct/berthd/web"))
        );
        let unified = Mounts::from_mountinfo(UNIFIED_HOST);
        assert_eq!(
            unified.locate_path(Path::new("/berthd/web")).unwrap(),
            Location::V2(PathBuf::from("/sys/fs/cgroup/berthd/web"))
        );
        assert!(Mounts::default().locate_path(Path::new("/a")).is_err());
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
