//! The sampler: reads the open stats files of every container that has a subscriber, once a tick,
//! builds each container's snapshot and publishes it.
//!
//! Owns: the read backend (io_uring, or pread on the same fds where io_uring cannot be set up or
//! is switched off), one tick's batch of reads, and the sampler thread's loop. Does not own: the
//! registry of containers or subscriptions (the hub in `mod.rs`), what a file means (snapshot),
//! the unsafe part of io_uring (uring).

use std::io;
use std::os::fd::AsFd;
use std::sync::atomic::Ordering;
use std::sync::{Arc, mpsc};
use std::time::{Duration, Instant, SystemTime};

use crate::error::Error;
use crate::stats::snapshot::Builder;
use crate::stats::uring::Ring;
use crate::stats::{ContainerStats, Shared};

/// Buffer for a file holding one number.
pub const SMALL_BUFFER: usize = 64;
/// Buffer for a table (memory.stat, cpuacct.usage_all, blkio, net/dev).
pub const LARGE_BUFFER: usize = 16 * 1024;

/// How the sampler reads files.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Backend {
    /// One io_uring submission per tick.
    IoUring,
    /// One pread per file.
    Pread,
}

enum Reader {
    IoUring(Ring),
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
                    Reader::IoUring(ring)
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
        let mut done = |index: usize, result: io::Result<&[u8]>| {
            let (ci, fi) = owners[index];
            let file = &containers[ci].source.files[fi];
            let applied = result
                .map_err(|e| Error::io(&file.path, e))
                .and_then(|content| {
                    let capacity = if reads[index].1 {
                        LARGE_BUFFER
                    } else {
                        SMALL_BUFFER
                    };
                    if content.len() == capacity {
                        return Err(Error::Internal(format!(
                            "{}: larger than the {capacity}-byte read buffer",
                            file.path.display()
                        )));
                    }
                    builders[ci].apply(file.kind, content).map_err(|e| {
                        Error::Internal(format!("{}: {e}", file.path.display()))
                    })
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
        let result = loop {
            match rustix::io::pread(fd, &mut buffer[..capacity], 0) {
                Err(rustix::io::Errno::INTR) => continue,
                other => break other,
            }
        };
        done(index, result.map(|n| &buffer[..n]).map_err(io::Error::from));
    }
    reads.len() as u64
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
        counters.files_read.fetch_add(tick.files_read, Ordering::Relaxed);
        counters.read_errors.fetch_add(tick.read_errors, Ordering::Relaxed);
        counters.syscalls.fetch_add(tick.syscalls, Ordering::Relaxed);
        let nanos = now.elapsed().as_nanos() as u64;
        counters.tick_nanos_total.fetch_add(nanos, Ordering::Relaxed);
        counters.last_tick_nanos.store(nanos, Ordering::Relaxed);
    }
}
