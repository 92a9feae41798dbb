//! Giving memory freed by ended connections and streams back to the kernel.
//!
//! glibc's malloc keeps what is freed inside its arenas for reuse and returns to the kernel only
//! the free space at the very top of an arena; everything freed below a chunk still in use stays
//! resident. So without help, berthd's RSS stays at the peak of every burst of streams: 20,000
//! idle Events streams took it from 18 to 142 MB, where it stayed after they all ended (while
//! glibc counted under 2 MB in use), and each later burst grew it further (189, then 223 MB), its
//! allocations landing in other threads' arenas. `malloc_trim` hands every free page of every
//! arena back; [`release_soon`] asks for it once a connection or stream ends, at most once per
//! [`SETTLE`]: a burst of endings costs one trim a second while it lasts (20,000 streams ending
//! on a loaded two-core host: 4 or 5 trims of 0.2–35 ms each, off the reactor's threads).
//!
//! Owns: when the heap is trimmed. Does not own: what allocates and frees (everything else), or
//! the allocator of a `mimalloc` build, which returns memory on its own schedule.

use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use futures_util::{Stream, StreamExt};

/// How long after the first ending the trim runs: endings meanwhile (a client closing thousands
/// of streams, or many clients leaving at once) are covered by the same trim.
const SETTLE: Duration = Duration::from_secs(1);

/// A trim is waiting for [`SETTLE`] to pass.
static SCHEDULED: AtomicBool = AtomicBool::new(false);

/// Asks for the heap to be trimmed [`SETTLE`] from now, unless a trim is already waiting. Does
/// nothing outside a tokio runtime or with an allocator other than glibc's.
pub(crate) fn release_soon() {
    if !cfg!(all(target_env = "gnu", not(feature = "mimalloc"))) {
        return;
    }
    let Ok(runtime) = tokio::runtime::Handle::try_current() else {
        return;
    };
    if SCHEDULED.swap(true, Ordering::AcqRel) {
        return;
    }
    runtime.spawn(async {
        let waiting = Waiting;
        tokio::time::sleep(SETTLE).await;
        // Before the trim: an ending during it asks for the next one.
        drop(waiting);
        // It walks every arena under its lock: off the reactor's threads.
        let _ = tokio::task::spawn_blocking(trim).await;
    });
}

/// Clears [`SCHEDULED`] when dropped, also when the runtime shuts down before the trim ran (as
/// it does in a daemon run inside tests), so the next runtime can trim again.
struct Waiting;

impl Drop for Waiting {
    fn drop(&mut self) {
        SCHEDULED.store(false, Ordering::Release);
    }
}

/// `stream`, calling [`release_soon`] when it is dropped: when its client goes away or it ends,
/// what it held (its task, h2's buffers) is given back.
pub(crate) fn release_when_dropped<S: Stream>(stream: S) -> impl Stream<Item = S::Item> {
    let on_drop = ReleaseOnDrop;
    stream.map(move |item| {
        // Only to move the guard into the stream, which drops it.
        let _held = &on_drop;
        item
    })
}

/// Calls [`release_soon`] when dropped.
struct ReleaseOnDrop;

impl Drop for ReleaseOnDrop {
    fn drop(&mut self) {
        release_soon();
    }
}

#[cfg(all(target_env = "gnu", not(feature = "mimalloc")))]
fn trim() {
    let started = std::time::Instant::now();
    // SAFETY: malloc_trim takes no pointers; it only returns free pages of glibc's own arenas,
    // under their locks, and is safe to call from any thread at any time.
    let released = unsafe { libc::malloc_trim(0) } == 1;
    tracing::debug!(
        released,
        took_us = started.elapsed().as_micros() as u64,
        "freed heap memory returned to the kernel"
    );
}

#[cfg(not(all(target_env = "gnu", not(feature = "mimalloc"))))]
fn trim() {}

#[cfg(test)]
mod tests {
    use super::*;

    /// Endings within [`SETTLE`] of each other share one trim, and the next ending after it
    /// schedules another.
    #[tokio::test]
    async fn a_burst_of_endings_trims_once() {
        if !cfg!(all(target_env = "gnu", not(feature = "mimalloc"))) {
            return;
        }
        for _ in 0..1000 {
            drop(ReleaseOnDrop);
        }
        assert!(SCHEDULED.load(Ordering::Acquire));
        tokio::time::sleep(SETTLE + Duration::from_millis(200)).await;
        assert!(!SCHEDULED.load(Ordering::Acquire));
        release_soon();
        assert!(SCHEDULED.load(Ordering::Acquire));
    }
}
