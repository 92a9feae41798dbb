//! The sampler: reads the open stats files of every container that has a subscriber, once a tick,
//! builds each container's snapshot and publishes it.
//!
//! Owns: the read backend (io_uring, or pread on the same fds where io_uring cannot be set up or
//! is switched off), one tick's batch of reads, and the sampler thread's loop. Does not own: the
//! registry of containers or subscriptions (the hub in `mod.rs`), what a file means (snapshot),
//! the unsafe part of io_uring (uring).

use std::borrow::Cow;
use std::io;
use std::os::fd::{AsFd, BorrowedFd};
use std::sync::atomic::Ordering;
use std::sync::{Arc, mpsc};
use std::time::{Duration, Instant, SystemTime};

use crate::error::Error;
use crate::stats::snapshot::{Builder, FileKind};
use crate::stats::uring::Ring;
use crate::stats::{ContainerStats, Shared};

/// Buffer for a file holding one number.
pub const SMALL_BUFFER: usize = 64;
/// Buffer for a table (memory.stat, cpuacct.usage_all, blkio, net/dev).
pub const LARGE_BUFFER: usize = 16 * 1024;
/// The most of a `net/dev` read. The kernel hands that file over a page at a time, a line an
/// interface, and a container may make as many interfaces as it likes: past this, the rest are
/// left out of its stats (about 600 interfaces).
pub const NET_DEV_MOST: usize = 64 * 1024;

/// How the sampler reads files.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    /// One io_uring submission per tick.
    IoUring,
    /// One pread per file.
    Pread,
}

enum Reader {
    IoUring(Box<Ring>),
    Pread(Box<[u8; LARGE_BUFFER]>),
}

fn pread_reader() -> Reader {
    Reader::Pread(Box::new([0; LARGE_BUFFER]))
}

/// What one tick did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Tick {
    pub files_read: u64,
    pub read_errors: u64,
    /// System calls that submitted or waited for reads.
    pub syscalls: u64,
}

pub struct Sampler {
    reader: Reader,
}

impl Sampler {
    /// A sampler on `backend`; io_uring falls back to pread when it cannot be set up.
    /// `iowq_workers` caps io_uring's kernel workers. The choice is logged.
    pub fn new(backend: Backend, iowq_workers: Option<u32>) -> Sampler {
        let reader = match backend {
            Backend::Pread => {
                tracing::info!("stats sampler reads with pread (--stats-backend pread)");
                pread_reader()
            }
            Backend::IoUring => match Ring::new(iowq_workers) {
                Ok(ring) => {
                    tracing::info!("stats sampler reads with io_uring");
                    Reader::IoUring(Box::new(ring))
                }
                Err(e) => {
                    tracing::warn!(error = %e, "io_uring is unavailable; stats sampler reads with pread");
                    pread_reader()
                }
            },
        };
        Sampler { reader }
    }

    pub fn backend(&self) -> Backend {
        match self.reader {
            Reader::IoUring(_) => Backend::IoUring,
            Reader::Pread(_) => Backend::Pread,
        }
    }

    /// Reads every file of `containers`, then publishes one snapshot per container.
    pub fn tick(&mut self, containers: &[Arc<ContainerStats>]) -> Tick {
        let mut states: Vec<_> = containers.iter().map(|c| c.lock_state()).collect();
        let mut builders: Vec<Builder<'_>> = states
            .iter_mut()
            .zip(containers)
            .map(|(state, c)| Builder::new(&mut state.names, &c.source.hugetlb_sizes))
            .collect();
        let total: usize = containers.iter().map(|c| c.source.files.len()).sum();
        let mut reads = Vec::with_capacity(total);
        let mut owners = Vec::with_capacity(total);
        for (ci, container) in containers.iter().enumerate() {
            for (fi, file) in container.source.files.iter().enumerate() {
                reads.push((file.fd.as_fd(), !file.kind.is_single_value()));
                owners.push((ci, fi));
            }
        }
        let mut failures = Vec::new();
        let mut cut_short = Vec::new();
        let paged_past = rustix::param::page_size() / 2;
        let mut done = |index: usize, result: io::Result<&[u8]>| {
            let (ci, fi) = owners[index];
            let file = &containers[ci].source.files[fi];
            let applied = result
                .and_then(|content| {
                    // Its first read may have been its first page only: read on to its end.
                    if file.kind != FileKind::NetDev || content.len() < paged_past {
                        return Ok((content.into(), false));
                    }
                    let (whole, cut) = read_on(reads[index].0, content, NET_DEV_MOST)?;
                    Ok((whole.into(), cut))
                })
                .map_err(|e| Error::io(&file.path, e))
                .and_then(|(content, cut): (Cow<'_, [u8]>, bool)| {
                    let capacity = if reads[index].1 {
                        LARGE_BUFFER
                    } else {
                        SMALL_BUFFER
                    };
                    if content.len() == capacity && file.kind != FileKind::NetDev {
                        return Err(Error::Internal(format!(
                            "{}: larger than the {capacity}-byte read buffer",
                            file.path.display()
                        )));
                    }
                    if cut {
                        cut_short.push((ci, fi));
                    }
                    builders[ci]
                        .apply(file.kind, &content)
                        .map_err(|e| Error::Internal(format!("{}: {e}", file.path.display())))
                });
            if let Err(e) = applied {
                failures.push((ci, fi, e));
            }
        };
        let syscalls = match &mut self.reader {
            Reader::IoUring(ring) => match ring.read_all(&reads, &mut done) {
                Ok(enters) => enters,
                Err(e) => {
                    tracing::error!(error = %e, "io_uring read batch failed; stats sampler reads with pread from now on");
                    let mut buffer = Box::new([0; LARGE_BUFFER]);
                    let syscalls = pread_all(&mut buffer, &reads, &mut done);
                    self.reader = Reader::Pread(buffer);
                    syscalls
                }
            },
            Reader::Pread(buffer) => pread_all(buffer, &reads, &mut done),
        };
        let timestamp = SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos() as u64);
        for (builder, container) in builders.into_iter().zip(containers) {
            container
                .sender
                .send_replace(Some(Arc::new(builder.finish(timestamp))));
        }
        for (ci, fi) in cut_short {
            if !std::mem::replace(&mut states[ci].warned[fi], true) {
                let path = containers[ci].source.files[fi].path.display();
                tracing::warn!(id = %containers[ci].id, file = %path, "more interfaces than fit in {} KiB of net/dev: the rest are left out of the container's stats", NET_DEV_MOST / 1024);
            }
        }
        let read_errors = failures.len() as u64;
        for (ci, fi, error) in failures {
            // A file that fails keeps failing (a kernel that formats it differently), so say it
            // once per container and file.
            let warned = &mut states[ci].warned;
            if !std::mem::replace(&mut warned[fi], true) {
                tracing::warn!(id = %containers[ci].id, %error, "stats file unreadable; its fields stay zero");
            }
        }
        Tick {
            files_read: total as u64,
            read_errors,
            syscalls,
        }
    }
}

/// The fallback: one pread per file into one buffer.
fn pread_all(
    buffer: &mut [u8; LARGE_BUFFER],
    reads: &[(std::os::fd::BorrowedFd<'_>, bool)],
    done: &mut impl FnMut(usize, io::Result<&[u8]>),
) -> u64 {
    for (index, &(fd, large)) in reads.iter().enumerate() {
        let capacity = if large { LARGE_BUFFER } else { SMALL_BUFFER };
        let result =
            rustix::io::retry_on_intr(|| rustix::io::pread(fd, &mut buffer[..capacity], 0));
        done(index, result.map(|n| &buffer[..n]).map_err(io::Error::from));
    }
    reads.len() as u64
}

/// `first`, the start of the file at `fd`, and what follows it up to `most` bytes in all; and
/// whether the file went on past that (the result then ends at its last whole line).
fn read_on(fd: BorrowedFd<'_>, first: &[u8], most: usize) -> io::Result<(Vec<u8>, bool)> {
    let mut whole = first.to_vec();
    while whole.len() < most {
        let filled = whole.len();
        whole.resize(most, 0);
        let n = rustix::io::retry_on_intr(|| {
            rustix::io::pread(fd, &mut whole[filled..], filled as u64)
        })?;
        whole.truncate(filled + n);
        if n == 0 {
            return Ok((whole, false));
        }
    }
    let end = whole
        .iter()
        .rposition(|&b| b == b'\n')
        .map_or(0, |at| at + 1);
    whole.truncate(end);
    Ok((whole, true))
}

/// The sampler thread: a tick every `interval` until the hub is dropped (`stop` disconnects).
pub(super) fn run(
    shared: Arc<Shared>,
    mut sampler: Sampler,
    interval: Duration,
    stop: mpsc::Receiver<()>,
) {
    let mut next = Instant::now() + interval;
    let mut active = Vec::new();
    loop {
        match stop.recv_timeout(next.saturating_duration_since(Instant::now())) {
            Err(mpsc::RecvTimeoutError::Timeout) => {}
            Ok(()) | Err(mpsc::RecvTimeoutError::Disconnected) => return,
        }
        let now = Instant::now();
        next += interval;
        if next < now {
            // Behind by more than a tick (a slow tick or a stopped machine): skip, do not burst.
            next = now + interval;
        }
        active.extend(shared.subscribed());
        if active.is_empty() {
            continue;
        }
        let tick = sampler.tick(&active);
        // Unregistered containers close their files as soon as this tick lets go of them.
        active.clear();
        let counters = &shared.counters;
        counters.batches.fetch_add(1, Ordering::Relaxed);
        counters
            .files_read
            .fetch_add(tick.files_read, Ordering::Relaxed);
        counters
            .read_errors
            .fetch_add(tick.read_errors, Ordering::Relaxed);
        counters
            .syscalls
            .fetch_add(tick.syscalls, Ordering::Relaxed);
        let nanos = now.elapsed().as_nanos() as u64;
        counters
            .tick_nanos_total
            .fetch_add(nanos, Ordering::Relaxed);
        counters.last_tick_nanos.store(nanos, Ordering::Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use super::*;
    use crate::stats::cgroup::{Location, Source, StatsFile, V1Dirs};
    use crate::stats::{Snapshot, Subscription};

    fn write_all(dir: &Path, files: &[(&str, &str)]) {
        for (name, text) in files {
            std::fs::write(dir.join(name), text).unwrap();
        }
    }

    fn v1_fixture() -> (tempfile::TempDir, Location) {
        let root = tempfile::tempdir().unwrap();
        let dir = |name: &str| {
            let path = root.path().join(name);
            std::fs::create_dir(&path).unwrap();
            path
        };
        let (cpuacct, cpu, memory, blkio) =
            (dir("cpuacct"), dir("cpu"), dir("memory"), dir("blkio"));
        write_all(
            &cpuacct,
            &[
                ("cpuacct.usage_percpu", "6 \n"),
                ("cpuacct.usage_all", "cpu user system\n0 5 1\n"),
            ],
        );
        write_all(
            &cpu,
            &[(
                "cpu.stat",
                "nr_periods 1\nnr_throttled 0\nthrottled_time 0\n",
            )],
        );
        write_all(
            &memory,
            &[
                ("memory.usage_in_bytes", "4096\n"),
                ("memory.failcnt", "0\n"),
                ("memory.stat", "cache 8\nrss 16\n"),
            ],
        );
        write_all(
            &blkio,
            &[
                (
                    "blkio.throttle.io_serviced_recursive",
                    "8:0 Read 3\nTotal 3\n",
                ),
                (
                    "blkio.bfq.io_serviced_recursive",
                    "8:0 Read 999\nTotal 999\n",
                ),
            ],
        );
        let dirs = V1Dirs {
            cpuacct: Some(cpuacct),
            cpu: Some(cpu),
            memory: Some(memory),
            blkio: Some(blkio),
            hugetlb: None,
        };
        (root, Location::V1(dirs))
    }

    fn sample(backend: Backend, location: &Location) -> (Arc<Snapshot>, Tick) {
        let source = Source::open(location, Some(std::process::id())).unwrap();
        let container = Arc::new(ContainerStats::new("c", source));
        let mut sub = container.subscribe();
        let mut sampler = Sampler::new(backend, None);
        assert_eq!(sampler.backend(), backend);
        let tick = sampler.tick(std::slice::from_ref(&container));
        let snapshot = sub.receiver.borrow_and_update().clone().expect("published");
        (snapshot, tick)
    }

    #[test]
    fn both_backends_read_the_same_v1_snapshot() {
        let (_root, location) = v1_fixture();
        let (uring, tick) = sample(Backend::IoUring, &location);
        // Two cpuacct, cpu, two memory counters, memory.stat, blkio serviced, net/dev.
        assert_eq!(
            tick,
            Tick {
                files_read: 8,
                read_errors: 0,
                syscalls: 1
            }
        );
        let (pread, tick) = sample(Backend::Pread, &location);
        assert_eq!(tick.syscalls, 8);
        assert_eq!(uring.cpu, pread.cpu);
        assert_eq!(uring.memory, pread.memory);
        assert_eq!(uring.blkio, pread.blkio);
        assert_eq!(uring.cpu.total, 6);
        assert_eq!(uring.memory.usage.usage, 4096);
        assert_eq!(uring.memory.cache, 8);
        // The throttle policy's file is preferred over BFQ's.
        assert_eq!(uring.blkio.lists[1][0].value, 3);
        assert!(uring.network.iter().any(|i| &*i.name == "lo"));
        assert!(uring.timestamp > 1_600_000_000_000_000_000);
    }

    #[test]
    fn a_v2_fixture_is_sampled_with_every_mapped_field() {
        let dir = tempfile::tempdir().unwrap();
        write_all(
            dir.path(),
            &[
                ("cpu.stat", "usage_usec 7\nuser_usec 5\nsystem_usec 2\n"),
                ("memory.current", "100\n"),
                ("memory.peak", "200\n"),
                ("memory.swap.current", "1\n"),
                ("memory.events", "max 3\noom_kill 0\n"),
                ("memory.stat", "file 11\nkernel 12\n"),
                ("io.stat", "8:0 rbytes=1 wbytes=2 rios=3 wios=4\n"),
            ],
        );
        let location = Location::V2(dir.path().to_owned());
        let (snap, tick) = sample(Backend::IoUring, &location);
        assert_eq!(tick.read_errors, 0);
        assert_eq!(snap.cpu.total, 7000);
        assert_eq!(snap.memory.usage.max_usage, 200);
        assert_eq!(snap.memory.usage.failcnt, 3);
        assert_eq!(snap.memory.swap.usage, 101);
        assert_eq!(snap.memory.kernel.usage, 12);
        assert_eq!(snap.blkio.lists[0].len(), 2);
    }

    #[test]
    fn unreadable_and_oversized_files_are_errors_not_panics() {
        let dir = tempfile::tempdir().unwrap();
        write_all(
            dir.path(),
            &[
                ("cpu.stat", "usage_usec seven\n"),
                ("memory.current", &"9".repeat(SMALL_BUFFER)),
                ("memory.stat", &"x 1\n".repeat(LARGE_BUFFER)),
            ],
        );
        let location = Location::V2(dir.path().to_owned());
        for backend in [Backend::IoUring, Backend::Pread] {
            let (snap, tick) = sample(backend, &location);
            assert_eq!(tick.read_errors, 3, "{backend:?}");
            assert_eq!(snap.cpu.total, 0);
            assert_eq!(snap.memory.usage.usage, 0);
            assert!(snap.memory.stats.is_empty());
        }
    }

    /// A `net/dev` of `interfaces` interfaces, each line as long as the kernel's.
    fn net_dev_text(interfaces: usize) -> String {
        let mut text = String::from(
            "Inter-|   Receive                      |  Transmit\n face |bytes    packets|bytes    packets\n",
        );
        for n in 0..interfaces {
            text += &format!("{:>6}:{}\n", format!("v{n}"), " 1234567".repeat(16));
        }
        text
    }

    fn net_dev_sample(backend: Backend, text: &str) -> (Arc<Snapshot>, Tick) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("dev");
        std::fs::write(&path, text).unwrap();
        let fd = rustix::fs::open(
            &path,
            rustix::fs::OFlags::RDONLY | rustix::fs::OFlags::CLOEXEC,
            rustix::fs::Mode::empty(),
        )
        .unwrap();
        let file = StatsFile {
            kind: FileKind::NetDev,
            fd,
            path: path.into(),
        };
        let source = Source {
            files: vec![file],
            ..Source::default()
        };
        let container = Arc::new(ContainerStats::new("c", source));
        let mut sub = container.subscribe();
        let tick = Sampler::new(backend, None).tick(std::slice::from_ref(&container));
        let snapshot = sub.receiver.borrow_and_update().clone().expect("published");
        (snapshot, tick)
    }

    #[test]
    fn a_net_dev_longer_than_its_first_read_is_read_to_its_end() {
        let text = net_dev_text(300);
        assert!(text.len() > LARGE_BUFFER && text.len() < NET_DEV_MOST);
        for backend in [Backend::IoUring, Backend::Pread] {
            let (snap, tick) = net_dev_sample(backend, &text);
            assert_eq!(tick.read_errors, 0, "{backend:?}");
            assert_eq!(snap.network.len(), 300, "{backend:?}");
            assert_eq!(&*snap.network[299].name, "v299");
        }
    }

    #[test]
    fn a_net_dev_past_its_most_keeps_the_interfaces_that_fit() {
        let text = net_dev_text(1000);
        let fit = text[..NET_DEV_MOST].matches('\n').count() - 2;
        for backend in [Backend::IoUring, Backend::Pread] {
            let (snap, tick) = net_dev_sample(backend, &text);
            assert_eq!(tick.read_errors, 0, "{backend:?}");
            assert_eq!(snap.network.len(), fit, "{backend:?}");
            assert_eq!(snap.network[fit - 1].rx_bytes, 1234567);
        }
    }

    #[test]
    fn a_batch_larger_than_the_buffer_pool_reads_every_file() {
        let (_root, location) = v1_fixture();
        let containers: Vec<Arc<ContainerStats>> = (0..300)
            .map(|n| {
                Arc::new(ContainerStats::new(
                    format!("c{n}"),
                    Source::open(&location, None).unwrap(),
                ))
            })
            .collect();
        let mut subs: Vec<Subscription> = containers.iter().map(|c| c.subscribe()).collect();
        let mut sampler = Sampler::new(Backend::IoUring, None);
        let tick = sampler.tick(&containers);
        assert_eq!((tick.files_read, tick.read_errors), (2100, 0));
        assert!(tick.syscalls > 1, "2100 reads do not fit the pool at once");
        for sub in &mut subs {
            let snap = sub.receiver.borrow_and_update().clone().unwrap();
            assert_eq!((snap.cpu.total, snap.memory.cache), (6, 8));
        }
    }
}
