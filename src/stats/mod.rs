//! Container stats for GetStats: one sampler thread, one shared snapshot per container and tick.
//!
//! Owns: the stats registry (container id → its cgroup, and while it has subscribers its open
//! stats files and snapshot channel), the subscriptions, the sampler thread's life and its
//! counters, and the OOM watches. Does not own:
//! the container's lifecycle (supervisor: it registers a container once it has started and
//! unregisters it when its init exits), the wire types (api).
//!
//! How it works: `register` resolves the init's cgroup from `/proc/<pid>/cgroup` (v1 or v2). The
//! first subscriber opens its stats files and the network namespace's `net/dev`, once for all
//! subscribers; the sampler closes them when the last subscriber has gone, so an idle container
//! costs no stats descriptors (a dense host runs out of descriptors long before memory: sixteen
//! files a container would cap it near a thousand under a 20000 limit). The sampler thread wakes once
//! an interval, reads at offset 0 every file of every container that has at least one subscriber
//! (one io_uring batch, or pread), parses without allocating per file and publishes one
//! `Arc<Snapshot>` per container through a `tokio::sync::watch`: every subscriber of a container
//! shares that one snapshot and never reads a file. Unregistering drops the channel's sender, which
//! ends every subscription cleanly.
//!
//! cgroup v1 → proto (files that do not exist on a kernel are not read; their fields stay 0):
//! - cpu_usage: percpu_usage = `cpuacct.usage_percpu`, total_usage = its sum (what
//!   `cpuacct.usage` adds up); usage_in_usermode / usage_in_kernelmode = the user / system columns
//!   of `cpuacct.usage_all` summed, in nanoseconds (as `cpuacct.usage_user` / `usage_sys`).
//! - throttling_data: `cpu.stat` nr_periods, nr_throttled, throttled_time.
//! - memory usage / swap_usage / kernel_usage: `memory.`, `memory.memsw.`, `memory.kmem.`
//!   {usage_in_bytes, max_usage_in_bytes, failcnt}; cache and the stats map: `memory.stat`.
//! - blkio: the eight `*_recursive` lists from `blkio.<list>` (CFQ), else `blkio.throttle.<list>`,
//!   else `blkio.bfq.<list>`; the closing `Total` line is not an entry.
//! - hugetlb: `hugetlb.<size>.{usage_in_bytes, max_usage_in_bytes, failcnt}` keyed by size.
//!
//! cgroup v2 → proto:
//! - cpu_usage: `cpu.stat` usage_usec → total_usage, user_usec → usage_in_usermode, system_usec
//!   → usage_in_kernelmode (all × 1000 to nanoseconds); percpu_usage is empty (v2 has no per-CPU
//!   usage). throttling_data: nr_periods, nr_throttled, throttled_usec × 1000.
//! - memory usage: usage = `memory.current`, max_usage = `memory.peak` (Linux ≥ 5.19), failcnt =
//!   `max` of `memory.events`. swap_usage.usage = `memory.current` + `memory.swap.current`
//!   (v1's memsw counts memory plus swap; v2 has no combined peak or failcnt, so those stay 0).
//!   kernel_usage.usage = `kernel` of `memory.stat` (kernel_stack + slab before Linux 5.18).
//!   cache = `file` of `memory.stat`; the stats map is the whole `memory.stat`.
//! - blkio: `io.stat` rbytes/wbytes → io_service_bytes_recursive Read/Write, rios/wios →
//!   io_serviced_recursive Read/Write; the other six lists have no v2 source and stay empty.
//! - hugetlb: usage = `hugetlb.<size>.current`, failcnt = `max` of `hugetlb.<size>.events`;
//!   max_usage has no v2 source.
//! - OOM: `oom_kill` of `memory.events` (v1: `oom_kill` of `memory.oom_control`).
//!
//! Both: network_stats from `/proc/<init pid>/net/dev`, one entry per interface; timestamp in
//! nanoseconds since the epoch, taken when the tick's reads are done.

pub mod cgroup;
pub mod oom;
pub mod parse;
pub mod sampler;
pub mod snapshot;
#[allow(unsafe_code)]
mod uring;

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicU64;
use std::sync::{Arc, Mutex, MutexGuard, mpsc};
use std::time::Duration;

use tokio::sync::watch;

use crate::error::{Error, Result};
use crate::events::EventBus;
pub use sampler::{Backend, Sampler};
pub use snapshot::Snapshot;

/// Sampler counters, for the metrics endpoint.
#[derive(Debug, Default)]
pub struct Counters {
    /// Ticks that read files: one batch each, however many subscribers.
    pub batches: AtomicU64,
    pub files_read: AtomicU64,
    pub read_errors: AtomicU64,
    /// `io_uring_enter` calls, or preads.
    pub syscalls: AtomicU64,
    pub tick_nanos_total: AtomicU64,
    pub last_tick_nanos: AtomicU64,
}

/// What only the sampler thread changes, between ticks.
#[derive(Debug, Default)]
pub struct SamplerState {
    names: snapshot::Names,
    /// Per file: whether its failure was logged already.
    warned: Vec<bool>,
}

/// The stats side of one container: its open files and the channel its snapshots go out on.
pub struct ContainerStats {
    id: String,
    source: cgroup::Source,
    state: Mutex<SamplerState>,
    sender: watch::Sender<Option<Arc<Snapshot>>>,
}

impl ContainerStats {
    pub fn new(id: impl Into<String>, source: cgroup::Source) -> Self {
        let state = SamplerState {
            names: snapshot::Names::default(),
            warned: vec![false; source.files.len()],
        };
        ContainerStats {
            id: id.into(),
            source,
            state: Mutex::new(state),
            sender: watch::Sender::new(None),
        }
    }

    fn lock_state(&self) -> MutexGuard<'_, SamplerState> {
        self.state.lock().expect("sampler state lock poisoned")
    }

    /// A subscription to the snapshots published from now on.
    pub fn subscribe(&self) -> Subscription {
        Subscription {
            receiver: self.sender.subscribe(),
        }
    }

    pub fn subscribers(&self) -> usize {
        self.sender.receiver_count()
    }

    pub fn files(&self) -> usize {
        self.source.files.len()
    }

    /// The open files, for measuring reads of them.
    pub fn source(&self) -> &cgroup::Source {
        &self.source
    }
}

/// One GetStats subscriber's view of a container's snapshots.
pub struct Subscription {
    receiver: watch::Receiver<Option<Arc<Snapshot>>>,
}

impl Subscription {
    /// The newest snapshot published, without waiting (`None` before the first).
    pub fn latest(&self) -> Option<Arc<Snapshot>> {
        self.receiver.borrow().clone()
    }

    /// The next snapshot published after the previous one returned (or after subscribing); a
    /// subscriber slower than the interval gets the newest and skips the rest. `None` once the
    /// container is unregistered.
    pub async fn next(&mut self) -> Option<Arc<Snapshot>> {
        loop {
            self.receiver.changed().await.ok()?;
            if let Some(snapshot) = self.receiver.borrow_and_update().clone() {
                return Some(snapshot);
            }
        }
    }
}

/// What the hub and its sampler thread share.
pub(crate) struct Shared {
    registry: Mutex<HashMap<String, Registered>>,
    counters: Counters,
}

/// A registered container: where its cgroup is, and its files while someone subscribes.
struct Registered {
    pid: u32,
    location: cgroup::Location,
    open: Option<Arc<ContainerStats>>,
}

impl Shared {
    fn registry(&self) -> MutexGuard<'_, HashMap<String, Registered>> {
        self.registry.lock().expect("stats registry lock poisoned")
    }

    /// The containers someone is subscribed to. Closes the files of those nobody is any more.
    fn subscribed(&self) -> Vec<Arc<ContainerStats>> {
        let mut active = Vec::new();
        for registered in self.registry().values_mut() {
            match &registered.open {
                Some(stats) if stats.subscribers() > 0 => active.push(Arc::clone(stats)),
                Some(_) => registered.open = None,
                None => {}
            }
        }
        active
    }
}

pub struct StatsHub {
    shared: Arc<Shared>,
    mounts: cgroup::Mounts,
    oom: oom::Watcher,
    interval: Duration,
    backend: Backend,
    /// Dropping it stops the sampler thread.
    _stop: mpsc::Sender<()>,
}

impl StatsHub {
    /// Starts the sampler thread, sampling every `interval` with `backend` (io_uring falls back to
    /// pread where it cannot be set up). OOM events go to `events`. Must be called inside the tokio
    /// runtime.
    pub fn start(
        interval: Duration,
        backend: Backend,
        events: Arc<EventBus>,
    ) -> Result<Arc<StatsHub>> {
        let shared = Arc::new(Shared {
            registry: Mutex::new(HashMap::new()),
            counters: Counters::default(),
        });
        let sampler = Sampler::new(backend, None);
        let backend = sampler.backend();
        let (stop, stopped) = mpsc::channel();
        let thread_shared = Arc::clone(&shared);
        std::thread::Builder::new()
            .name("berth-stats".into())
            .spawn(move || sampler::run(thread_shared, sampler, interval, stopped))
            .map_err(|e| Error::sys("start the stats sampler thread", e))?;
        Ok(Arc::new(StatsHub {
            shared,
            mounts: cgroup::Mounts::discover(),
            oom: oom::Watcher::new(events),
            interval,
            backend,
            _stop: stop,
        }))
    }

    pub fn interval(&self) -> Duration {
        self.interval
    }

    /// The backend the sampler really uses.
    pub fn backend(&self) -> Backend {
        self.backend
    }

    /// Finds the cgroup of container `id`, whose init is `pid`, and registers it.
    /// Fails for an init that has already exited on a v1 host ([`cgroup::Mounts::locate`]):
    /// [`StatsHub::register_dirs`] then takes the cgroup from the runtime.
    pub fn register(&self, id: &str, pid: u32) -> Result<()> {
        self.register_at(id, pid, self.mounts.locate(pid)?);
        Ok(())
    }

    /// [`StatsHub::register`] with the cgroup's directory per controller as a runtime recorded
    /// them (`""` for the unified hierarchy).
    pub fn register_dirs(&self, id: &str, pid: u32, dirs: &[(String, PathBuf)]) -> Result<()> {
        self.register_at(id, pid, location_of_dirs(dirs)?);
        Ok(())
    }

    /// [`StatsHub::register`] with the cgroup's one path in every hierarchy, as a runtime
    /// recorded it.
    pub fn register_path(&self, id: &str, pid: u32, cgroup: &Path) -> Result<()> {
        self.register_at(id, pid, self.mounts.locate_path(cgroup)?);
        Ok(())
    }

    /// Watches registered container `id` for OOM kills, reporting at once a kill its cgroup
    /// counted already. Separate from the registration so that a create publishes its
    /// `start-container` first: no `oom` may come before it.
    pub fn watch_oom(&self, id: &str) {
        let registered = self
            .shared
            .registry()
            .get(id)
            .map(|r| (r.pid, r.location.clone()));
        let Some((pid, location)) = registered else {
            return;
        };
        if let Err(e) = self.oom.watch(id, pid, &location) {
            tracing::warn!(id, error = %e, "no OOM events for this container");
        }
    }

    /// Registers container `id` in the cgroup at `location` (its OOM watch comes with
    /// [`StatsHub::watch_oom`]).
    fn register_at(&self, id: &str, pid: u32, location: cgroup::Location) {
        tracing::debug!(id, ?location, "stats registered");
        self.shared.registry().insert(
            id.to_owned(),
            Registered {
                pid,
                location,
                open: None,
            },
        );
    }

    /// Forgets container `id`, which closes its files and ends its subscriptions, and reports an
    /// OOM kill not reported yet, so that it comes before the container's exit.
    pub fn unregister(&self, id: &str) {
        self.shared.registry().remove(id);
        self.oom.unwatch(id);
    }

    /// Subscribes to container `id`'s snapshots, opening its stats files if it has no subscriber
    /// yet; `Ok(None)` if it is not registered. The files are opened outside the registry's lock,
    /// which the sampler takes every tick and create and exit take to register and unregister:
    /// none of them waits for a subscriber's opens.
    pub fn subscribe(&self, id: &str) -> Result<Option<Subscription>> {
        let (location, pid) = {
            let registry = self.shared.registry();
            let Some(registered) = registry.get(id) else {
                return Ok(None);
            };
            if let Some(stats) = &registered.open {
                return Ok(Some(stats.subscribe()));
            }
            (registered.location.clone(), registered.pid)
        };
        let source = cgroup::Source::open(&location, Some(pid))?;
        let mut registry = self.shared.registry();
        // Unregistered meanwhile, or registered again for a new container of the same id: these
        // files are not its.
        let Some(registered) = registry.get_mut(id).filter(|r| r.pid == pid) else {
            return Ok(None);
        };
        let stats = match &registered.open {
            // Another subscriber opened them meanwhile: share those, close these.
            Some(stats) => Arc::clone(stats),
            None => {
                tracing::debug!(id, files = source.files.len(), "stats files opened");
                let stats = Arc::new(ContainerStats::new(id, source));
                registered.open = Some(Arc::clone(&stats));
                stats
            }
        };
        Ok(Some(stats.subscribe()))
    }

    /// The host's cgroup mounts, as found at start.
    pub fn mounts(&self) -> &cgroup::Mounts {
        &self.mounts
    }

    /// OOM kills per container, as last reported by the OOM watches (no file is read).
    pub fn oom_kills(&self) -> HashMap<String, u64> {
        self.oom.kills()
    }

    pub fn counters(&self) -> &Counters {
        &self.shared.counters
    }

    /// Containers whose stats files are open (those with a subscriber), and their subscribers
    /// in total.
    pub fn tracked(&self) -> (usize, usize) {
        let registry = self.shared.registry();
        let open = registry.values().filter_map(|r| r.open.as_ref());
        let (containers, subscribers) =
            open.fold((0, 0), |(n, all), c| (n + 1, all + c.subscribers()));
        (containers, subscribers)
    }
}

/// The location of a cgroup from its directory per controller (`""` for the unified
/// hierarchy): v1 where a cpuacct or memory directory is named, else v2.
fn location_of_dirs(dirs: &[(String, PathBuf)]) -> Result<cgroup::Location> {
    let dir = |controller: &str| {
        dirs.iter()
            .find(|(name, _)| name == controller)
            .map(|(_, dir)| dir.clone())
    };
    let v1 = cgroup::V1Dirs {
        cpuacct: dir("cpuacct"),
        cpu: dir("cpu"),
        memory: dir("memory"),
        blkio: dir("blkio"),
        hugetlb: dir("hugetlb"),
    };
    if v1.cpuacct.is_some() || v1.memory.is_some() {
        return Ok(cgroup::Location::V1(v1));
    }
    dir("")
        .map(cgroup::Location::V2)
        .ok_or_else(|| Error::NotFound("no cgroup directory with cpu or memory accounting".into()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_runtimes_cgroup_dirs_are_v1_where_cpuacct_or_memory_is_named_else_v2() {
        let dirs = |list: &[(&str, &str)]| -> Vec<(String, PathBuf)> {
            list.iter()
                .map(|(name, dir)| (name.to_string(), PathBuf::from(dir)))
                .collect()
        };
        let hybrid = dirs(&[
            ("", "/sys/fs/cgroup/unified/c"),
            ("memory", "/sys/fs/cgroup/memory/berthd/c"),
            ("cpuacct", "/sys/fs/cgroup/cpuacct/c"),
            ("pids", "/sys/fs/cgroup/pids/c"),
        ]);
        assert_eq!(
            location_of_dirs(&hybrid).unwrap(),
            cgroup::Location::V1(cgroup::V1Dirs {
                cpuacct: Some("/sys/fs/cgroup/cpuacct/c".into()),
                memory: Some("/sys/fs/cgroup/memory/berthd/c".into()),
                ..Default::default()
            })
        );
        assert_eq!(
            location_of_dirs(&dirs(&[("", "/sys/fs/cgroup/c")])).unwrap(),
            cgroup::Location::V2("/sys/fs/cgroup/c".into())
        );
        assert!(location_of_dirs(&dirs(&[("pids", "/sys/fs/cgroup/pids/c")])).is_err());
    }
}
