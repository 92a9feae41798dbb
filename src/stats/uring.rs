//! Reading many open files at offset 0 through one io_uring, with a fixed pool of buffers.
//!
//! Owns: the ring, the buffer pool and the only unsafe code of stats (queueing a read hands the
//! kernel a buffer it writes later). Does not own: which files are read or what is done with
//! their content (sampler).

use std::io;
use std::os::fd::{AsRawFd, BorrowedFd};

use io_uring::{IoUring, opcode, types};

use crate::stats::sampler::{LARGE_BUFFER, SMALL_BUFFER};

/// Reads in flight at most, per buffer size: memory for buffers is fixed, whatever the number of
/// containers (512 × 64 B + 64 × 16 KiB ≈ 1 MiB).
const SMALL_SLOTS: usize = 512;
const LARGE_SLOTS: usize = 64;
const SLOTS: usize = SMALL_SLOTS + LARGE_SLOTS;

/// One read of a batch: the file and whether it needs a large buffer.
pub type Read<'fd> = (BorrowedFd<'fd>, bool);

pub struct Ring {
    // Declared before `buffers` so the ring closes first: no read can target freed memory.
    ring: IoUring,
    buffers: Box<[u8]>,
    free_small: Vec<u32>,
    free_large: Vec<u32>,
    /// Which read of the batch each slot holds.
    slot_read: Box<[usize]>,
    /// Set when a batch failed with reads still in flight: their buffers were given up.
    broken: bool,
}

fn slot_range(slot: u32) -> std::ops::Range<usize> {
    let slot = slot as usize;
    if slot < SMALL_SLOTS {
        slot * SMALL_BUFFER..(slot + 1) * SMALL_BUFFER
    } else {
        let start = SMALL_SLOTS * SMALL_BUFFER + (slot - SMALL_SLOTS) * LARGE_BUFFER;
        start..start + LARGE_BUFFER
    }
}

impl Ring {
    /// Sets up the ring; `iowq_workers` caps the kernel's io-wq workers that serve the reads
    /// (cgroup files cannot be read without blocking, so every read is served by one).
    pub fn new(iowq_workers: Option<u32>) -> io::Result<Ring> {
        let ring = IoUring::new(SLOTS.next_power_of_two() as u32)?;
        if let Some(workers) = iowq_workers {
            ring.submitter()
                .register_iowq_max_workers(&mut [workers, workers])?;
        }
        Ok(Ring {
            ring,
            buffers: vec![0u8; SMALL_SLOTS * SMALL_BUFFER + LARGE_SLOTS * LARGE_BUFFER].into(),
            free_small: (0..SMALL_SLOTS as u32).rev().collect(),
            free_large: (SMALL_SLOTS as u32..SLOTS as u32).rev().collect(),
            slot_read: vec![0; SLOTS].into(),
            broken: false,
        })
    }

    /// Reads every file in `reads` at offset 0 and calls `done(index, content)` for each as it
    /// completes. Submitting and waiting share one `io_uring_enter`; when all reads fit in the pool
    /// that is one call for the whole batch. Returns how many `io_uring_enter` calls it made.
    pub fn read_all(
        &mut self,
        reads: &[Read<'_>],
        mut done: impl FnMut(usize, io::Result<&[u8]>),
    ) -> io::Result<u64> {
        if self.broken {
            return Err(io::Error::other(
                "the io_uring failed earlier with reads in flight",
            ));
        }
        let (mut next, mut in_flight, mut enters) = (0, 0usize, 0);
        loop {
            while let Some(&(fd, large)) = reads.get(next) {
                let free = if large {
                    &mut self.free_large
                } else {
                    &mut self.free_small
                };
                let Some(slot) = free.pop() else { break };
                let range = slot_range(slot);
                let entry = opcode::Read::new(
                    types::Fd(fd.as_raw_fd()),
                    self.buffers[range.clone()].as_mut_ptr(),
                    range.len() as u32,
                )
                .offset(0)
                .build()
                .user_data(u64::from(slot));
                // SAFETY: the slot's buffer was free, so nothing else reads or writes it until its
                // completion is reaped below, and `buffers` outlives every read (the ring is
                // dropped first, and a failed batch gives the buffers up instead of freeing
                // them). The fd is borrowed for the whole batch, so it stays open. The queue has
                // room: it holds more entries than there are slots.
                let pushed = unsafe { self.ring.submission().push(&entry) };
                if pushed.is_err() {
                    free.push(slot);
                    break;
                }
                self.slot_read[slot as usize] = next;
                next += 1;
                in_flight += 1;
            }
            if in_flight == 0 {
                return Ok(enters);
            }
            // With reads still to queue, wait for half the pool to come back before refilling,
            // so a large batch costs a few calls rather than one per read.
            let want = if next == reads.len() {
                in_flight
            } else {
                (in_flight / 2).max(1)
            };
            enters += 1;
            if let Err(e) = self.submit_and_wait(want) {
                // Reads in flight may still write their buffers: give the buffers up for good.
                self.broken = true;
                std::mem::forget(std::mem::take(&mut self.buffers));
                return Err(e);
            }
            for cqe in self.ring.completion() {
                let slot = cqe.user_data() as u32;
                let index = self.slot_read[slot as usize];
                let result = cqe.result();
                let range = slot_range(slot);
                let content = if result < 0 {
                    Err(io::Error::from_raw_os_error(-result))
                } else {
                    Ok(&self.buffers[range.start..range.start + result as usize])
                };
                done(index, content);
                if (slot as usize) < SMALL_SLOTS {
                    self.free_small.push(slot);
                } else {
                    self.free_large.push(slot);
                }
                in_flight -= 1;
            }
        }
    }

    fn submit_and_wait(&self, want: usize) -> io::Result<()> {
        loop {
            match self.ring.submit_and_wait(want) {
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                result => return result.map(drop),
            }
        }
    }
}
