//! One container's stats at one instant, and how each kind of stats file fills it in.
//!
//! Owns: the snapshot types (mirroring the proto's `Stats`, field for field) and the mapping of
//! every file kind, cgroup v1 and v2, onto them. Does not own: reading (sampler), which files
//! exist (cgroup), the wire types (api).

use std::sync::Arc;

use crate::error::Result;
use crate::stats::parse;

/// Which of a container's three memory counters a v1 file belongs to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MemoryCounter {
    /// `memory.*`
    Usage,
    /// `memory.memsw.*`: memory plus swap.
    Swap,
    /// `memory.kmem.*`
    Kernel,
}

/// Which field of a usage/max_usage/failcnt triple a single-value file fills.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Field {
    Usage,
    MaxUsage,
    Failcnt,
}

/// The proto's eight blkio lists, in proto order; the index into [`Blkio::lists`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BlkioList {
    ServiceBytes,
    Serviced,
    Queued,
    ServiceTime,
    WaitTime,
    Merged,
    Time,
    Sectors,
}

impl BlkioList {
    pub const ALL: [BlkioList; 8] = [
        BlkioList::ServiceBytes,
        BlkioList::Serviced,
        BlkioList::Queued,
        BlkioList::ServiceTime,
        BlkioList::WaitTime,
        BlkioList::Merged,
        BlkioList::Time,
        BlkioList::Sectors,
    ];

    /// The v1 file name after `blkio.` (and after `blkio.throttle.` or `blkio.bfq.`).
    pub fn file_name(self) -> &'static str {
        match self {
            BlkioList::ServiceBytes => "io_service_bytes_recursive",
            BlkioList::Serviced => "io_serviced_recursive",
            BlkioList::Queued => "io_queued_recursive",
            BlkioList::ServiceTime => "io_service_time_recursive",
            BlkioList::WaitTime => "io_wait_time_recursive",
            BlkioList::Merged => "io_merged_recursive",
            BlkioList::Time => "io_time_recursive",
            BlkioList::Sectors => "sectors_recursive",
        }
    }
}

/// What an open stats file is and so how its content fills a snapshot.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FileKind {
    /// v1 `cpuacct.usage_percpu`: per-CPU usage in nanoseconds, whose sum is the total.
    CpuacctPercpu,
    /// v1 `cpuacct.usage_all`: per-CPU user and system nanoseconds. Their sum is not the usage:
    /// the kernel measures usage exactly and splits user from system at accounting ticks.
    CpuacctUsageAll,
    /// v1 and v2 `cpu.stat`: throttling (v1, v2) and usage (v2).
    CpuStat,
    /// v1 single-value memory files; v2 `memory.current` and `memory.peak`.
    Memory(MemoryCounter, Field),
    MemoryStatV1,
    MemoryStatV2,
    /// v2 `memory.events`: `max` is the failcnt.
    MemoryEventsV2,
    /// v2 `memory.swap.current`: swap without memory.
    SwapCurrentV2,
    BlkioV1(BlkioList),
    /// v2 `io.stat`.
    IoStat,
    /// v1 `hugetlb.<size>.*` and v2 `hugetlb.<size>.current`; the index of the page size.
    Hugetlb(u8, Field),
    /// v2 `hugetlb.<size>.events`: `max` is the failcnt.
    HugetlbEventsV2(u8),
    /// `/proc/<pid>/net/dev`.
    NetDev,
}

impl FileKind {
    /// A file holding a single number fits a small buffer; tables need a large one.
    pub fn is_single_value(self) -> bool {
        matches!(
            self,
            FileKind::Memory(..) | FileKind::SwapCurrentV2 | FileKind::Hugetlb(..)
        )
    }
}

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Interface {
    pub name: Arc<str>,
    pub rx_bytes: u64,
    pub rx_packets: u64,
    pub rx_errors: u64,
    pub rx_dropped: u64,
    pub tx_bytes: u64,
    pub tx_packets: u64,
    pub tx_errors: u64,
    pub tx_dropped: u64,
}

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Cpu {
    pub total: u64,
    pub percpu: Vec<u64>,
    pub kernel: u64,
    pub user: u64,
    pub periods: u64,
    pub throttled_periods: u64,
    pub throttled_time: u64,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct MemoryData {
    pub usage: u64,
    pub max_usage: u64,
    pub failcnt: u64,
}

impl MemoryData {
    fn set(&mut self, field: Field, value: u64) {
        match field {
            Field::Usage => self.usage = value,
            Field::MaxUsage => self.max_usage = value,
            Field::Failcnt => self.failcnt = value,
        }
    }
}

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Memory {
    pub cache: u64,
    pub usage: MemoryData,
    pub swap: MemoryData,
    pub kernel: MemoryData,
    /// The whole `memory.stat`, in file order.
    pub stats: Vec<(Arc<str>, u64)>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BlkioEntry {
    pub major: u64,
    pub minor: u64,
    pub op: Arc<str>,
    pub value: u64,
}

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Blkio {
    /// Indexed by [`BlkioList`] as usize, in proto order.
    pub lists: [Vec<BlkioEntry>; 8],
}

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Snapshot {
    /// Nanoseconds since the epoch.
    pub timestamp: u64,
    pub network: Vec<Interface>,
    pub cpu: Cpu,
    pub memory: Memory,
    pub blkio: Blkio,
    /// Page size ("2MB") → usage, max_usage, failcnt.
    pub hugetlb: Vec<(Arc<str>, MemoryData)>,
}

/// Names seen in a container's files (memory.stat keys, interfaces, blkio ops), kept across
/// ticks so a snapshot shares them instead of allocating a string per name per tick.
#[derive(Debug, Default)]
pub struct Names {
    names: Vec<Arc<str>>,
    next: usize,
}

impl Names {
    /// The most kept: a container may rename its interfaces every tick, and what it names must
    /// not grow berthd without bound. Past it they start over (snapshots keep their own copies).
    const MOST: usize = 4096;

    /// The shared copy of `name`. Files list their names in the same order every tick, so the
    /// name after the previous one is tried first.
    pub fn get(&mut self, name: &str) -> Arc<str> {
        let index = match self.names.get(self.next) {
            Some(hint) if &**hint == name => self.next,
            _ => match self.names.iter().position(|n| &**n == name) {
                Some(found) => found,
                None => {
                    if self.names.len() == Self::MOST {
                        self.names.clear();
                    }
                    self.names.push(Arc::from(name));
                    self.names.len() - 1
                }
            },
        };
        self.next = index + 1;
        Arc::clone(&self.names[index])
    }
}

/// Builds one snapshot from the files of one tick, in any order.
pub struct Builder<'a> {
    names: &'a mut Names,
    snapshot: Snapshot,
    swap_only: Option<u64>,
}

impl<'a> Builder<'a> {
    pub fn new(names: &'a mut Names, hugetlb_sizes: &[Arc<str>]) -> Self {
        let snapshot = Snapshot {
            hugetlb: hugetlb_sizes
                .iter()
                .map(|size| (Arc::clone(size), MemoryData::default()))
                .collect(),
            ..Snapshot::default()
        };
        Builder {
            names,
            snapshot,
            swap_only: None,
        }
    }

    /// Fills in what a file of `kind` holding `content` says. On error the snapshot keeps the
    /// file's fields as they were (zero) and stays consistent.
    pub fn apply(&mut self, kind: FileKind, content: &[u8]) -> Result<()> {
        let snap = &mut self.snapshot;
        match kind {
            FileKind::CpuacctPercpu => {
                let mut percpu = Vec::new();
                parse::u64_list("cpuacct.usage_percpu", content, |usage| percpu.push(usage))?;
                snap.cpu.total = percpu.iter().sum();
                snap.cpu.percpu = percpu;
            }
            FileKind::CpuacctUsageAll => {
                let (mut user, mut kernel) = (0, 0);
                parse::cpuacct_usage_all(content, |cpu_user, cpu_system| {
                    user += cpu_user;
                    kernel += cpu_system;
                })?;
                (snap.cpu.user, snap.cpu.kernel) = (user, kernel);
            }
            FileKind::CpuStat => {
                // Microseconds (v2) become nanoseconds, the unit of the proto and of v1.
                let mut found: [Option<u64>; 6] = [None; 6];
                parse::flat_keyed("cpu.stat", content, |key, value| {
                    let (slot, value) = match key {
                        "nr_periods" => (0, value),
                        "nr_throttled" => (1, value),
                        "throttled_time" => (2, value),
                        "throttled_usec" => (2, value.saturating_mul(1000)),
                        "usage_usec" => (3, value.saturating_mul(1000)),
                        "user_usec" => (4, value.saturating_mul(1000)),
                        "system_usec" => (5, value.saturating_mul(1000)),
                        _ => return,
                    };
                    found[slot] = Some(value);
                })?;
                let cpu = &mut snap.cpu;
                let targets = [
                    &mut cpu.periods,
                    &mut cpu.throttled_periods,
                    &mut cpu.throttled_time,
                    &mut cpu.total,
                    &mut cpu.user,
                    &mut cpu.kernel,
                ];
                for (target, value) in targets.into_iter().zip(found) {
                    if let Some(value) = value {
                        *target = value;
                    }
                }
            }
            FileKind::Memory(counter, field) => {
                let value = parse::single_u64("memory counter", content)?;
                let data = match counter {
                    MemoryCounter::Usage => &mut snap.memory.usage,
                    MemoryCounter::Swap => &mut snap.memory.swap,
                    MemoryCounter::Kernel => &mut snap.memory.kernel,
                };
                data.set(field, value);
            }
            FileKind::MemoryStatV1 | FileKind::MemoryStatV2 => {
                let v2 = kind == FileKind::MemoryStatV2;
                let names = &mut *self.names;
                let mut stats = Vec::with_capacity(64);
                let (mut cache, mut kernel, mut kernel_parts) = (0, None, 0);
                parse::flat_keyed("memory.stat", content, |key, value| {
                    match (v2, key) {
                        (false, "cache") | (true, "file") => cache = value,
                        (true, "kernel") => kernel = Some(value),
                        (true, "kernel_stack" | "slab") => kernel_parts += value,
                        _ => {}
                    }
                    stats.push((names.get(key), value));
                })?;
                snap.memory.cache = cache;
                snap.memory.stats = stats;
                if v2 {
                    // Kernels before 5.18 have no "kernel" line; stack and slab are most of it.
                    snap.memory.kernel.usage = kernel.unwrap_or(kernel_parts);
                }
            }
            FileKind::MemoryEventsV2 => {
                let mut failcnt = 0;
                parse::flat_keyed("memory.events", content, |key, value| {
                    if key == "max" {
                        failcnt = value;
                    }
                })?;
                snap.memory.usage.failcnt = failcnt;
            }
            FileKind::SwapCurrentV2 => {
                self.swap_only = Some(parse::single_u64("memory.swap.current", content)?);
            }
            FileKind::BlkioV1(list) => {
                let names = &mut *self.names;
                let mut entries = Vec::new();
                parse::blkio_v1(list.file_name(), content, |line| {
                    entries.push(BlkioEntry {
                        major: line.major,
                        minor: line.minor,
                        op: names.get(line.op),
                        value: line.value,
                    })
                })?;
                snap.blkio.lists[list as usize] = entries;
            }
            FileKind::IoStat => {
                let names = &mut *self.names;
                let (mut bytes, mut ios) = (Vec::new(), Vec::new());
                parse::io_stat(content, |major, minor, key, value| {
                    let (list, op) = match key {
                        "rbytes" => (&mut bytes, "Read"),
                        "wbytes" => (&mut bytes, "Write"),
                        "rios" => (&mut ios, "Read"),
                        "wios" => (&mut ios, "Write"),
                        _ => return,
                    };
                    list.push(BlkioEntry {
                        major,
                        minor,
                        op: names.get(op),
                        value,
                    });
                })?;
                snap.blkio.lists[BlkioList::ServiceBytes as usize] = bytes;
                snap.blkio.lists[BlkioList::Serviced as usize] = ios;
            }
            FileKind::Hugetlb(size, field) => {
                let value = parse::single_u64("hugetlb counter", content)?;
                if let Some((_, data)) = snap.hugetlb.get_mut(usize::from(size)) {
                    data.set(field, value);
                }
            }
            FileKind::HugetlbEventsV2(size) => {
                let mut failcnt = 0;
                parse::flat_keyed("hugetlb events", content, |key, value| {
                    if key == "max" {
                        failcnt = value;
                    }
                })?;
                if let Some((_, data)) = snap.hugetlb.get_mut(usize::from(size)) {
                    data.failcnt = failcnt;
                }
            }
            FileKind::NetDev => {
                let names = &mut *self.names;
                let mut network = Vec::new();
                parse::net_dev(content, |line| {
                    network.push(Interface {
                        name: names.get(&line.name),
                        rx_bytes: line.rx_bytes,
                        rx_packets: line.rx_packets,
                        rx_errors: line.rx_errors,
                        rx_dropped: line.rx_dropped,
                        tx_bytes: line.tx_bytes,
                        tx_packets: line.tx_packets,
                        tx_errors: line.tx_errors,
                        tx_dropped: line.tx_dropped,
                    })
                })?;
                snap.network = network;
            }
        }
        Ok(())
    }

    pub fn finish(mut self, timestamp: u64) -> Snapshot {
        if let Some(swap) = self.swap_only {
            // v1 reports memory plus swap (memsw); v2 reports swap alone, so add memory to match.
            self.snapshot.memory.swap.usage = self.snapshot.memory.usage.usage.saturating_add(swap);
        }
        self.snapshot.timestamp = timestamp;
        self.snapshot
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn build(sizes: &[&str], files: &[(FileKind, &str)]) -> Result<Snapshot> {
        let mut names = Names::default();
        let sizes: Vec<Arc<str>> = sizes.iter().map(|s| Arc::from(*s)).collect();
        let mut builder = Builder::new(&mut names, &sizes);
        for (kind, content) in files {
            builder.apply(*kind, content.as_bytes())?;
        }
        Ok(builder.finish(42))
    }

    #[test]
    fn v1_files_fill_the_proto_fields() {
        let snap = build(
            &["2MB"],
            &[
                (FileKind::CpuacctPercpu, "111 222 \n"),
                (
                    FileKind::CpuacctUsageAll,
                    "cpu user system\n0 100 10\n1 200 20\n",
                ),
                (
                    FileKind::CpuStat,
                    "nr_periods 9\nnr_throttled 2\nthrottled_time 3000\nnr_bursts 0\n",
                ),
                (
                    FileKind::Memory(MemoryCounter::Usage, Field::Usage),
                    "4096\n",
                ),
                (
                    FileKind::Memory(MemoryCounter::Usage, Field::MaxUsage),
                    "8192\n",
                ),
                (FileKind::Memory(MemoryCounter::Swap, Field::Failcnt), "3\n"),
                (
                    FileKind::Memory(MemoryCounter::Kernel, Field::Usage),
                    "512\n",
                ),
                (FileKind::MemoryStatV1, "cache 1024\nrss 2048\nfile 7\n"),
                (
                    FileKind::BlkioV1(BlkioList::ServiceBytes),
                    "8:0 Read 10\n8:0 Write 20\nTotal 30\n",
                ),
                (FileKind::Hugetlb(0, Field::MaxUsage), "2097152\n"),
            ],
        )
        .unwrap();
        assert_eq!(snap.timestamp, 42);
        assert_eq!(snap.cpu.percpu, [111, 222]);
        assert_eq!(
            (snap.cpu.total, snap.cpu.user, snap.cpu.kernel),
            (333, 300, 30)
        );
        assert_eq!(
            (
                snap.cpu.periods,
                snap.cpu.throttled_periods,
                snap.cpu.throttled_time
            ),
            (9, 2, 3000)
        );
        assert_eq!(
            (snap.memory.usage.usage, snap.memory.usage.max_usage),
            (4096, 8192)
        );
        assert_eq!(snap.memory.swap.failcnt, 3);
        assert_eq!(snap.memory.kernel.usage, 512);
        // v1's cache is "cache", not "file".
        assert_eq!(snap.memory.cache, 1024);
        assert_eq!(snap.memory.stats.len(), 3);
        assert_eq!(&*snap.memory.stats[1].0, "rss");
        let bytes = &snap.blkio.lists[BlkioList::ServiceBytes as usize];
        assert_eq!(bytes.len(), 2);
        assert_eq!((&*bytes[1].op, bytes[1].value), ("Write", 20));
        assert!(snap.blkio.lists[BlkioList::Serviced as usize].is_empty());
        assert_eq!(&*snap.hugetlb[0].0, "2MB");
        assert_eq!(snap.hugetlb[0].1.max_usage, 2097152);
    }

    #[test]
    fn v2_files_map_onto_the_same_fields() {
        let snap = build(
            &["2MB"],
            &[
                (
                    FileKind::CpuStat,
                    "usage_usec 300\nuser_usec 200\nsystem_usec 100\nnr_periods 4\n\
                     nr_throttled 1\nthrottled_usec 5\n",
                ),
                (
                    FileKind::Memory(MemoryCounter::Usage, Field::Usage),
                    "1000\n",
                ),
                (
                    FileKind::Memory(MemoryCounter::Usage, Field::MaxUsage),
                    "3000\n",
                ),
                (
                    FileKind::MemoryEventsV2,
                    "low 0\nhigh 0\nmax 6\noom 1\noom_kill 1\n",
                ),
                (FileKind::SwapCurrentV2, "24\n"),
                (
                    FileKind::MemoryStatV2,
                    "anon 10\nfile 20\nkernel 30\nslab 4\n",
                ),
                (
                    FileKind::IoStat,
                    "8:0 rbytes=1 wbytes=2 rios=3 wios=4 dbytes=5 dios=6\n",
                ),
                (FileKind::Hugetlb(0, Field::Usage), "0\n"),
                (FileKind::HugetlbEventsV2(0), "max 2\n"),
            ],
        )
        .unwrap();
        assert!(snap.cpu.percpu.is_empty());
        assert_eq!(
            (snap.cpu.total, snap.cpu.user, snap.cpu.kernel),
            (300_000, 200_000, 100_000)
        );
        assert_eq!(snap.cpu.throttled_time, 5000);
        assert_eq!(
            snap.memory.usage,
            MemoryData {
                usage: 1000,
                max_usage: 3000,
                failcnt: 6
            }
        );
        assert_eq!(snap.memory.swap.usage, 1024);
        assert_eq!((snap.memory.cache, snap.memory.kernel.usage), (20, 30));
        let bytes = &snap.blkio.lists[BlkioList::ServiceBytes as usize];
        let ios = &snap.blkio.lists[BlkioList::Serviced as usize];
        let values = |list: &Vec<BlkioEntry>| -> Vec<(String, u64)> {
            list.iter().map(|e| (e.op.to_string(), e.value)).collect()
        };
        assert_eq!(values(bytes), [("Read".into(), 1), ("Write".into(), 2)]);
        assert_eq!(values(ios), [("Read".into(), 3), ("Write".into(), 4)]);
        assert_eq!(snap.hugetlb[0].1.failcnt, 2);
        // Before Linux 5.18 there is no "kernel" line.
        let old = build(&[], &[(FileKind::MemoryStatV2, "kernel_stack 3\nslab 4\n")]).unwrap();
        assert_eq!(old.memory.kernel.usage, 7);
    }

    #[test]
    fn a_malformed_file_leaves_its_fields_zero_and_the_rest_intact() {
        let mut names = Names::default();
        let mut builder = Builder::new(&mut names, &[]);
        builder
            .apply(
                FileKind::Memory(MemoryCounter::Usage, Field::Usage),
                b"77\n",
            )
            .unwrap();
        let err = builder
            .apply(FileKind::CpuacctUsageAll, b"cpu user system\n0 1 x\n")
            .unwrap_err();
        assert!(
            err.to_string().starts_with("malformed cpuacct.usage_all"),
            "{err}"
        );
        assert!(builder.apply(FileKind::CpuStat, b"nr_periods\n").is_err());
        let snap = builder.finish(1);
        assert_eq!(snap.cpu, Cpu::default());
        assert_eq!(snap.memory.usage.usage, 77);
    }

    #[test]
    fn names_are_shared_between_snapshots() {
        let mut names = Names::default();
        let first = names.get("cache");
        names.get("rss");
        assert!(Arc::ptr_eq(&first, &names.get("cache")));
        assert_eq!(&*names.get("rss"), "rss");
        assert_eq!(names.names.len(), 2);
    }

    #[test]
    fn names_that_never_repeat_are_kept_up_to_a_bound() {
        let mut names = Names::default();
        let kept = names.get("eth0");
        for n in 0..3 * Names::MOST {
            names.get(&format!("renamed{n}"));
            assert!(names.names.len() <= Names::MOST);
        }
        assert_eq!(&*kept, "eth0", "a snapshot's copy outlives the start over");
        assert_eq!(&*names.get("eth0"), "eth0");
    }
}
