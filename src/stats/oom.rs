//! OOM events: an `oom` event when the kernel's OOM killer kills in a container's cgroup.
//!
//! Owns: one watch per container and the rule that decides an OOM kill happened: the cgroup's
//! `oom_kill` counter went up since the last report. The wake-ups only say when to look:
//! - v1: one eventfd for all containers, registered for each cgroup's `memory.oom_control`
//!   through its `cgroup.event_control`, read by one task; a wake-up does not say which cgroup,
//!   so every watched container's counter is looked at, off the reactor, but only when the
//!   host's own count of OOM kills (`oom_kill` in `/proc/vmstat`) went up since the last look:
//!   the kernel also signals a registration when its cgroup is removed, so without that every
//!   container's exit would cost a read of every other container's counter. No descriptor per
//!   container (an eventfd each would be half of berthd's descriptors on a dense host), and the
//!   kernel drops a cgroup's registration when the cgroup is removed;
//! - v2: one inotify instance for all containers, watching each `memory.events` for changes, read by
//!   one task: no thread and no inotify instance per container.
//!
//! Does not own: the event bus (events) or when a container is watched (hub, supervisor).

use std::collections::HashMap;
use std::io::Write;
use std::mem::MaybeUninit;
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use rustix::fs::inotify;
use rustix::fs::{Mode, OFlags};
use tokio::io::Interest;
use tokio::task::AbortHandle;

use crate::error::{Error, Result};
use crate::events::{EventBus, EventKind};
use crate::reactor::Eventfd;
use crate::stats::cgroup::Location;
use crate::stats::parse;

/// After a v1 notification the kill follows within the same kernel call path; look again a few
/// times in case the counter was read between the two.
const RECHECKS: [Duration; 4] = [
    Duration::ZERO,
    Duration::from_millis(10),
    Duration::from_millis(50),
    Duration::from_millis(200),
];

/// One container's OOM watch.
struct Watch {
    id: String,
    pid: u32,
    /// `memory.oom_control` (v1) or `memory.events` (v2). Opened only to look: an idle container
    /// keeps no descriptor for it (the v1 registration does not need it open).
    counter_path: PathBuf,
    reported: Mutex<u64>,
    /// v1: the shared eventfd, registered for its cgroup. v2: the inotify watch descriptor.
    waker: Waker,
}

enum Waker {
    SharedEventfd,
    Inotify(i32),
}

impl Watch {
    /// Publishes an `oom` event if the kill counter went up since the last one; says whether it did.
    fn check(&self, events: &EventBus) -> bool {
        self.check_in(open_counter(&self.counter_path), events)
    }

    /// [`Watch::check`] with the counter file already opened (or not).
    fn check_in(&self, counter: Result<OwnedFd>, events: &EventBus) -> bool {
        let mut buffer = [0u8; 512];
        let count = counter
            .and_then(|counter| {
                rustix::io::pread(&counter, &mut buffer, 0)
                    .map_err(|e| Error::io(&self.counter_path, e.into()))
            })
            .and_then(|n| oom_kills(&buffer[..n]));
        let count = match count {
            Ok(count) => count,
            Err(e) => {
                tracing::debug!(id = %self.id, error = %e, "OOM counter unreadable");
                return false;
            }
        };
        let mut reported = self.reported.lock().expect("oom counter lock poisoned");
        if count <= *reported {
            return false;
        }
        *reported = count;
        tracing::info!(id = %self.id, oom_kills = count, "container hit its memory limit");
        events.publish(&self.id, self.pid, EventKind::Oom);
        true
    }
}

/// The OOM kills the host's kernel has made since boot, in every cgroup (`oom_kill` of
/// `/proc/vmstat`); `None` where it does not count them (before Linux 4.13) or cannot be read.
fn host_oom_kills() -> Option<u64> {
    let vmstat = crate::procfs::read_generated("/proc/vmstat", 8192).ok()?;
    oom_kills(&vmstat).ok()
}

/// `oom_kill` of a `memory.oom_control` or `memory.events` file, or of `/proc/vmstat`.
fn oom_kills(content: &[u8]) -> Result<u64> {
    let mut kills = None;
    parse::flat_keyed("oom counter", content, |key, value| {
        if key == "oom_kill" {
            kills = Some(value);
        }
    })?;
    kills.ok_or_else(|| {
        Error::Internal("no oom_kill line: this kernel does not count OOM kills".into())
    })
}

struct Inotify {
    fd: Arc<tokio::io::unix::AsyncFd<OwnedFd>>,
    by_wd: Arc<Mutex<HashMap<i32, Arc<Watch>>>>,
    reader: AbortHandle,
}

/// The v1 eventfd every watched cgroup signals, and the task reading it.
struct SharedEventfd {
    fd: Arc<Eventfd>,
    reader: AbortHandle,
}

type Watches = Arc<Mutex<HashMap<String, Arc<Watch>>>>;

pub struct Watcher {
    events: Arc<EventBus>,
    watches: Watches,
    /// Created with the first v1 watch.
    eventfd: Mutex<Option<SharedEventfd>>,
    /// Created with the first v2 watch.
    inotify: Mutex<Option<Inotify>>,
}

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().expect("oom watcher lock poisoned")
}

fn open_counter(path: &Path) -> Result<OwnedFd> {
    rustix::fs::open(path, OFlags::RDONLY | OFlags::CLOEXEC, Mode::empty())
        .map_err(|e| Error::io(path, e.into()))
}

impl Watcher {
    pub fn new(events: Arc<EventBus>) -> Watcher {
        Watcher {
            events,
            watches: Watches::default(),
            eventfd: Mutex::new(None),
            inotify: Mutex::new(None),
        }
    }

    /// Watches container `id` (init `pid`) in the cgroup at `location`. Every kill the cgroup
    /// counts is reported, including kills before this call. Must be called inside the tokio
    /// runtime.
    pub fn watch(&self, id: &str, pid: u32, location: &Location) -> Result<()> {
        let (watch, counter) = match location {
            Location::V1(dirs) => {
                let dir = dirs.memory.as_deref().ok_or_else(|| {
                    Error::NotFound("no v1 memory hierarchy to watch for OOM kills".into())
                })?;
                self.watch_v1(id, pid, dir)?
            }
            Location::V2(dir) => self.watch_v2(id, pid, &dir.join("memory.events"))?,
        };
        if let Some(old) = lock(&self.watches).insert(id.to_owned(), Arc::clone(&watch)) {
            self.stop(&old);
        }
        // A kill before the watch existed wakes nothing: look now.
        watch.check_in(Ok(counter), &self.events);
        Ok(())
    }

    /// The OOM kills reported so far per watched container, as the cgroup counted them.
    pub fn kills(&self) -> HashMap<String, u64> {
        lock(&self.watches)
            .iter()
            .map(|(id, watch)| (id.clone(), *lock(&watch.reported)))
            .collect()
    }

    /// The watch, and its counter file opened (to look at it once now).
    fn watch_v1(&self, id: &str, pid: u32, dir: &Path) -> Result<(Arc<Watch>, OwnedFd)> {
        let counter_path = dir.join("memory.oom_control");
        let counter = open_counter(&counter_path)?;
        let mut shared = lock(&self.eventfd);
        let eventfd = match &mut *shared {
            Some(started) => &started.fd,
            empty => &empty.insert(self.start_eventfd()?).fd,
        };
        let control = dir.join("cgroup.event_control");
        std::fs::OpenOptions::new()
            .write(true)
            .open(&control)
            // One write: the kernel parses each write on its own.
            .and_then(|mut file| {
                let line = format!("{} {}", eventfd.as_fd().as_raw_fd(), counter.as_raw_fd());
                file.write_all(line.as_bytes())
            })
            .map_err(|e| Error::io(&control, e))?;
        let watch = Arc::new(Watch {
            id: id.to_owned(),
            pid,
            counter_path,
            reported: Mutex::new(0),
            waker: Waker::SharedEventfd,
        });
        Ok((watch, counter))
    }

    /// The v1 eventfd and its reader: on each wake-up, and again after each of [`RECHECKS`]
    /// until one reports, every v1 watch is looked at (off the reactor: one read per container)
    /// if the host has OOM-killed anything since the last look.
    fn start_eventfd(&self) -> Result<SharedEventfd> {
        let fd = Arc::new(Eventfd::new().map_err(|e| Error::sys("watch the OOM eventfd", e))?);
        let (task_fd, watches, events) = (
            Arc::clone(&fd),
            Arc::clone(&self.watches),
            Arc::clone(&self.events),
        );
        // The host's OOM kills when every watch's counter had last been looked at: a watch
        // looks at its own when it starts, so none has been missed at this count.
        let mut looked_at = host_oom_kills();
        let reader = tokio::spawn(async move {
            loop {
                if let Err(e) = task_fd.wait().await {
                    tracing::error!(error = %e, "reading the OOM eventfd failed; v1 OOM events stop");
                    return;
                }
                for delay in RECHECKS {
                    tokio::time::sleep(delay).await;
                    let host_kills = host_oom_kills();
                    if host_kills.is_some() && host_kills == looked_at {
                        continue;
                    }
                    // Taken after the host's count, so every watch looked at or not (one
                    // started later looks at its own counter when it starts) has had its
                    // counter read since that count: the next look may skip those it covers.
                    let v1: Vec<Arc<Watch>> = lock(&watches)
                        .values()
                        .filter(|w| matches!(w.waker, Waker::SharedEventfd))
                        .cloned()
                        .collect();
                    let events = Arc::clone(&events);
                    let look = move || v1.iter().fold(false, |any, w| w.check(&events) | any);
                    let reported = tokio::task::spawn_blocking(look).await.unwrap_or(false);
                    looked_at = host_kills;
                    if reported {
                        break;
                    }
                }
            }
        });
        Ok(SharedEventfd {
            fd,
            reader: reader.abort_handle(),
        })
    }

    /// The watch, and its counter file opened (to look at it once now).
    fn watch_v2(&self, id: &str, pid: u32, events_path: &Path) -> Result<(Arc<Watch>, OwnedFd)> {
        let counter = open_counter(events_path)?;
        let mut inotify = lock(&self.inotify);
        let shared = match &mut *inotify {
            Some(started) => &*started,
            empty => &*empty.insert(self.start_inotify()?),
        };
        let wd = inotify::add_watch(
            shared.fd.get_ref(),
            events_path,
            inotify::WatchFlags::MODIFY,
        )
        .map_err(|e| Error::io(events_path, e.into()))?;
        let watch = Arc::new(Watch {
            id: id.to_owned(),
            pid,
            counter_path: events_path.to_owned(),
            reported: Mutex::new(0),
            waker: Waker::Inotify(wd),
        });
        lock(&shared.by_wd).insert(wd, Arc::clone(&watch));
        Ok((watch, counter))
    }

    fn start_inotify(&self) -> Result<Inotify> {
        let fd = inotify::init(inotify::CreateFlags::CLOEXEC | inotify::CreateFlags::NONBLOCK)
            .map_err(|e| Error::sys("create an inotify instance", e))?;
        let fd = Arc::new(
            crate::reactor::register(fd, Interest::READABLE)
                .map_err(|e| Error::sys("watch the inotify instance", e))?,
        );
        let by_wd: Arc<Mutex<HashMap<i32, Arc<Watch>>>> = Arc::default();
        let events = Arc::clone(&self.events);
        let (task_fd, task_by_wd) = (Arc::clone(&fd), Arc::clone(&by_wd));
        let reader = tokio::spawn(async move {
            let mut buffer = [MaybeUninit::<u8>::uninit(); 4096];
            loop {
                let Ok(mut ready) = task_fd.readable().await else {
                    return;
                };
                let mut changed = Vec::new();
                let mut reader = inotify::Reader::new(task_fd.get_ref().as_fd(), &mut buffer);
                loop {
                    match reader.next() {
                        Ok(event) => changed.push(event.wd()),
                        Err(rustix::io::Errno::AGAIN) => {
                            ready.clear_ready();
                            break;
                        }
                        Err(e) => {
                            tracing::error!(error = %e, "reading OOM inotify events failed; v2 OOM events stop");
                            return;
                        }
                    }
                }
                let watches: Vec<Arc<Watch>> = {
                    let by_wd = lock(&task_by_wd);
                    changed
                        .iter()
                        .filter_map(|wd| by_wd.get(wd).cloned())
                        .collect()
                };
                for watch in watches {
                    watch.check(&events);
                }
            }
        });
        Ok(Inotify {
            fd,
            by_wd,
            reader: reader.abort_handle(),
        })
    }

    /// Stops watching container `id`, first reporting a kill not reported yet.
    pub fn unwatch(&self, id: &str) {
        let Some(watch) = lock(&self.watches).remove(id) else {
            return;
        };
        watch.check(&self.events);
        self.stop(&watch);
    }

    fn stop(&self, watch: &Watch) {
        match watch.waker {
            // The registration goes with the cgroup; until then a wake-up for it finds no watch.
            Waker::SharedEventfd => {}
            Waker::Inotify(wd) => {
                if let Some(inotify) = lock(&self.inotify).as_ref() {
                    lock(&inotify.by_wd).remove(&wd);
                    // The cgroup may be gone already, which removed the watch with it.
                    let _ = inotify::remove_watch(inotify.fd.get_ref(), wd);
                }
            }
        }
    }
}

impl Drop for Watcher {
    fn drop(&mut self) {
        if let Some(eventfd) = lock(&self.eventfd).take() {
            eventfd.reader.abort();
        }
        if let Some(inotify) = lock(&self.inotify).take() {
            inotify.reader.abort();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::events::Lagged;

    #[test]
    fn the_kill_counter_of_both_versions_and_of_the_host() {
        assert_eq!(
            oom_kills(b"oom_kill_disable 0\nunder_oom 0\noom_kill 3\n").unwrap(),
            3
        );
        assert_eq!(
            oom_kills(b"low 0\nhigh 0\nmax 9\noom 2\noom_kill 2\noom_group_kill 0\n").unwrap(),
            2
        );
        assert_eq!(
            oom_kills(b"nr_free_pages 5837650\npgfault 902\noom_kill 306\nnr_unstable 0\n")
                .unwrap(),
            306
        );
        let old_kernel = oom_kills(b"oom_kill_disable 0\nunder_oom 0\n").unwrap_err();
        assert!(old_kernel.to_string().contains("no oom_kill line"));
        assert!(oom_kills(b"oom_kill many\n").is_err());
    }

    async fn next_kind(sub: &mut crate::events::Subscription) -> Result<EventKind, Lagged> {
        tokio::time::timeout(Duration::from_secs(5), sub.next())
            .await
            .expect("an event within 5 s")
            .expect("bus open")
            .map(|e| e.kind.clone())
    }

    #[tokio::test]
    async fn a_v2_kill_count_change_is_one_oom_event_and_unwatch_reports_the_rest() {
        let dir = tempfile::tempdir().unwrap();
        let events_file = dir.path().join("memory.events");
        std::fs::write(&events_file, "max 0\noom 0\noom_kill 0\n").unwrap();
        let bus = Arc::new(EventBus::new(16));
        let mut sub = bus.subscribe();
        let watcher = Watcher::new(Arc::clone(&bus));
        watcher
            .watch("c", 7, &Location::V2(dir.path().to_owned()))
            .unwrap();
        std::fs::write(&events_file, "max 4\noom 1\noom_kill 1\n").unwrap();
        assert_eq!(next_kind(&mut sub).await, Ok(EventKind::Oom));
        // A change that is not a kill is no event; a kill nobody was woken for is reported when
        // the watch ends, before the container's exit would be.
        std::fs::write(&events_file, "max 5\noom 1\noom_kill 1\n").unwrap();
        tokio::time::sleep(Duration::from_millis(100)).await;
        watcher.stop(&lock(&watcher.watches)["c"]);
        std::fs::write(&events_file, "max 6\noom 2\noom_kill 2\n").unwrap();
        watcher.unwatch("c");
        bus.publish("c", 7, EventKind::Exit { status: 137 });
        assert_eq!(next_kind(&mut sub).await, Ok(EventKind::Oom));
        assert_eq!(
            next_kind(&mut sub).await,
            Ok(EventKind::Exit { status: 137 })
        );
    }

    #[tokio::test]
    async fn kills_before_the_watch_are_reported_at_once() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("memory.events"), "oom_kill 1\n").unwrap();
        let bus = Arc::new(EventBus::new(16));
        let mut sub = bus.subscribe();
        let watcher = Watcher::new(Arc::clone(&bus));
        watcher
            .watch("c", 7, &Location::V2(dir.path().to_owned()))
            .unwrap();
        assert_eq!(next_kind(&mut sub).await, Ok(EventKind::Oom));
    }
}
