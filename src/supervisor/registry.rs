//! The registry: id → container, and what State reports of it.
//!
//! Owns: a container's record in memory (bundle, stdio paths, init and added processes, status,
//! its locks), the slot an id holds while it is being created and while its exited container is
//! being cleaned up (a create of that id waits for the clean-up, within a bound), looking
//! containers up, and asking for a container's state file to be written. Does not own: what
//! the operations do with a container (create, exec, signal, update, checkpoint, recovery, exit)
//! or the state file's format and writing (store).

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use tokio::sync::{Notify, watch};

use super::stdio_pipes::PipeInodes;
use super::{StdioPaths, Supervisor, validate};
use crate::error::{Error, Result};
use crate::model::ProcessSpec;
use crate::reaper::TrackedProcess;
use crate::store::{ContainerRecord, Flushed, ProcessRecord, TerminalPaths};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Status {
    Running,
    Paused,
}

impl Status {
    pub fn as_str(self) -> &'static str {
        match self {
            Status::Running => "running",
            Status::Paused => "paused",
        }
    }
}

/// One container as State reports it: init first, then added processes in start order.
#[derive(Debug, Clone)]
pub struct ContainerInfo {
    pub id: String,
    pub bundle: PathBuf,
    pub status: Status,
    pub processes: Vec<(u32, ProcessSpec)>,
}

pub(super) struct Process {
    pub(super) tracked: TrackedProcess,
    pub(super) spec: ProcessSpec,
    pub(super) start_time: u64,
    /// Where an added process's terminal is relayed; `None` for the init (its container's
    /// paths) and for a process without a terminal.
    pub(super) terminal: Option<TerminalPaths>,
    /// Given a permit once an added process's `exit` is published (the init's `exit` waits for
    /// it: it is the container's last event).
    pub(super) exit_published: tokio::sync::Notify,
}

impl Process {
    pub(super) fn new(
        tracked: TrackedProcess,
        spec: ProcessSpec,
        start_time: u64,
        terminal: Option<TerminalPaths>,
    ) -> Process {
        Process {
            tracked,
            spec,
            start_time,
            terminal,
            exit_published: tokio::sync::Notify::new(),
        }
    }

    pub(super) fn pid(&self) -> u32 {
        self.tracked.pid() as u32
    }

    fn record(&self) -> ProcessRecord {
        ProcessRecord {
            pid: self.pid(),
            start_time: self.start_time,
            spec: self.spec.clone(),
            terminal: self.terminal.clone(),
        }
    }
}

pub(super) struct Mutable {
    pub(super) status: Status,
    pub(super) added: Vec<Arc<Process>>,
    /// The init's exit removed the state file: nothing may write it again.
    pub(super) removed: bool,
}

pub(super) struct Container {
    pub(super) id: String,
    pub(super) bundle: PathBuf,
    pub(super) stdio: StdioPaths,
    /// The bundle's `process`, the base of every added process (capabilities, rlimits, ...).
    pub(super) base_process: oci_spec::runtime::Process,
    pub(super) init: Arc<Process>,
    /// Processes (by pid) whose terminal berthd no longer relays (see recovery).
    pub(super) lost_terminals: Vec<u32>,
    /// The init's stdio pipes berthd relays, by inode (see stdio_pipes).
    pub(super) pipes: PipeInodes,
    pub(super) mutable: Mutex<Mutable>,
    /// Serializes runtime operations that change the container (pause, resume, exec).
    pub(super) operations: tokio::sync::Mutex<()>,
}

impl Container {
    /// `err`, or NOT_FOUND with `exited`'s message when `err` is the runtime's refusal and the
    /// init has exited: the runtime's refusal of a container whose init has just exited
    /// ("container not running", "cannot exec in a stopped container") is that exit, seen first
    /// there, and is said as every other call racing an exit says it.
    pub(super) fn exit_seen_by_the_runtime(
        &self,
        err: Error,
        exited: impl FnOnce() -> String,
    ) -> Error {
        match err {
            Error::Runtime { .. } if self.init.tracked.has_exited() => Error::NotFound(exited()),
            err => err,
        }
    }

    /// What a process counts toward its container's limit: its spec's bytes as
    /// `--max-process-spec-bytes` counts them, and the pid, user and flags beside them.
    pub(super) fn process_bytes(spec: &ProcessSpec) -> usize {
        const PER_PROCESS: usize = 64;
        super::validate::spec_bytes(&spec.args, &spec.env, &spec.cwd, &spec.additional_gids)
            + PER_PROCESS
    }

    /// What the container's processes, the init's and those added, count toward its limit.
    pub(super) fn spec_bytes(&self, mutable: &Mutable) -> usize {
        std::iter::once(&self.init)
            .chain(&mutable.added)
            .map(|process| Container::process_bytes(&process.spec))
            .sum()
    }

    /// The bytes of every process's args, env and cwd: less than they take encoded.
    fn strings_bytes(&self) -> usize {
        let mutable = self.lock();
        std::iter::once(&self.init)
            .chain(&mutable.added)
            .map(|process| process.spec.string_bytes())
            .sum()
    }

    fn info(&self) -> ContainerInfo {
        let mutable = self.lock();
        let mut processes = vec![(self.init.pid(), self.init.spec.clone())];
        processes.extend(mutable.added.iter().map(|p| (p.pid(), p.spec.clone())));
        ContainerInfo {
            id: self.id.clone(),
            bundle: self.bundle.clone(),
            status: mutable.status,
            processes,
        }
    }

    pub(super) fn lock(&self) -> MutexGuard<'_, Mutable> {
        self.mutable.lock().expect("container lock poisoned")
    }

    fn record(&self, runtime: &Path, mutable: &Mutable) -> ContainerRecord {
        ContainerRecord {
            id: self.id.clone(),
            bundle: self.bundle.clone(),
            runtime: runtime.to_owned(),
            stdin: self.stdio.stdin.clone(),
            stdout: self.stdio.stdout.clone(),
            stderr: self.stdio.stderr.clone(),
            console: self.stdio.console.clone(),
            init: self.init.record(),
            processes: mutable.added.iter().map(|p| p.record()).collect(),
            lost_terminals: self.lost_terminals.clone(),
            pipes: self.pipes,
            named_by: self.stdio.named_by(),
        }
    }
}

/// How long a create waits for the clean-up of an exited container of the same id (its runtime
/// delete, whose runtime turn then comes from a queue of its own) before it gives up.
const CLEANUP_WAIT: Duration = Duration::from_secs(5);

pub(super) enum Slot {
    /// Being created: the id is taken, nothing else is visible yet.
    Reserved,
    Live(Arc<Container>),
    /// Its init has exited and the exit is published; the runtime's state is being removed. The
    /// id stays taken, the container is no longer visible (State does not list it, lookups say
    /// it has exited).
    Exited(ExitedSlot),
}

pub(super) struct ExitedSlot {
    /// Its sender is dropped once the id is free.
    freed: watch::Receiver<()>,
    /// Notified by a create that waits for the id, so the clean-up starts at once.
    wanted: Arc<Notify>,
}

/// The id of an exited container, kept until dropped once its clean-up is done.
pub(super) struct ExitedId<'a> {
    supervisor: &'a Supervisor,
    id: &'a str,
    wanted: Arc<Notify>,
    /// Dropped after the slot is gone: wakes the creates waiting for the id.
    _freed: watch::Sender<()>,
}

impl ExitedId<'_> {
    /// Returns once a create waits for this id (at once if one already asked).
    pub(super) async fn wanted(&self) {
        self.wanted.notified().await;
    }
}

impl Drop for ExitedId<'_> {
    fn drop(&mut self) {
        let mut registry = self.supervisor.registry();
        if matches!(registry.get(self.id), Some(Slot::Exited(_))) {
            registry.remove(self.id);
        }
    }
}

/// An id taken for a create; freed when dropped unless the create committed its container.
pub(super) struct Reservation<'a> {
    supervisor: &'a Supervisor,
    id: &'a str,
    committed: bool,
}

impl Reservation<'_> {
    /// Makes `container` visible under the reserved id.
    pub(super) fn commit(mut self, container: Arc<Container>) {
        self.supervisor.insert(container);
        self.committed = true;
    }
}

impl Drop for Reservation<'_> {
    fn drop(&mut self) {
        if !self.committed {
            let mut registry = self.supervisor.registry();
            if matches!(registry.get(self.id), Some(Slot::Reserved)) {
                registry.remove(self.id);
            }
        }
    }
}

impl Supervisor {
    fn registry(&self) -> MutexGuard<'_, HashMap<String, Slot>> {
        self.registry.lock().expect("registry lock poisoned")
    }

    /// Takes `id` for a create, or says it is taken. An id whose container has exited and is
    /// being cleaned up is taken once the clean-up is done, if that takes at most CLEANUP_WAIT.
    pub(super) async fn reserve<'a>(&'a self, id: &'a str) -> Result<Reservation<'a>> {
        let deadline = tokio::time::Instant::now() + CLEANUP_WAIT;
        loop {
            let mut freed = {
                let mut registry = self.registry();
                match registry.get(id) {
                    None => {
                        registry.insert(id.to_owned(), Slot::Reserved);
                        return Ok(Reservation {
                            supervisor: self,
                            id,
                            committed: false,
                        });
                    }
                    Some(Slot::Exited(exited)) => {
                        exited.wanted.notify_one();
                        exited.freed.clone()
                    }
                    Some(Slot::Reserved | Slot::Live(_)) => {
                        return Err(Error::AlreadyExists(format!(
                            "container {id} already exists"
                        )));
                    }
                }
            };
            // Err once the sender is dropped: the id is free (or taken by another create).
            let cleaned = tokio::time::timeout_at(deadline, freed.changed()).await;
            if cleaned.is_err() {
                return Err(Error::Unavailable(format!(
                    "container {id} has exited and its runtime state is still being removed after {}s; try again in a moment",
                    CLEANUP_WAIT.as_secs()
                )));
            }
        }
    }

    /// Hides `container`, whose init has exited, and keeps its id until the returned guard is
    /// dropped; `None` if the id no longer holds this container (nothing of the id is then its
    /// to clean up).
    pub(super) fn retire<'a>(&'a self, container: &'a Container) -> Option<ExitedId<'a>> {
        let mut registry = self.registry();
        let slot = registry.get_mut(&container.id)?;
        if !matches!(slot, Slot::Live(current) if std::ptr::eq(Arc::as_ptr(current), container)) {
            return None;
        }
        let (freed, waiters) = watch::channel(());
        let wanted = Arc::new(Notify::new());
        *slot = Slot::Exited(ExitedSlot {
            freed: waiters,
            wanted: Arc::clone(&wanted),
        });
        Some(ExitedId {
            supervisor: self,
            id: &container.id,
            wanted,
            _freed: freed,
        })
    }

    /// Whether `id` is taken: created, being created, or being cleaned up after its exit.
    pub(super) fn holds_id(&self, id: &str) -> bool {
        self.registry().contains_key(id)
    }

    /// Makes `container` visible under its id.
    pub(super) fn insert(&self, container: Arc<Container>) {
        self.registry()
            .insert(container.id.clone(), Slot::Live(container));
    }

    pub(super) fn container(&self, id: &str) -> Result<Arc<Container>> {
        validate::container_id(id)?;
        match self.registry().get(id) {
            Some(Slot::Live(container)) => Ok(Arc::clone(container)),
            Some(Slot::Reserved) => Err(Error::FailedPrecondition(format!(
                "container {id} is still being created"
            ))),
            Some(Slot::Exited(_)) => Err(Error::NotFound(format!("container {id} has exited"))),
            None => Err(Error::NotFound(format!("container {id} does not exist"))),
        }
    }

    /// Asks for the container's state file to be written (by the store's writer, in the order
    /// asked; a failure is logged, the container carries on). Under the container's lock, so
    /// writes are queued in the order the container changed, and never after `remove_record`:
    /// an added process whose exit is handled after the init's must not bring back the record
    /// of a deleted container.
    pub(super) fn save(&self, container: &Container) {
        let mutable = container.lock();
        if mutable.removed {
            return;
        }
        self.store
            .write(container.record(&self.runtime.binary().path, &mutable));
    }

    /// Saves the container's state file as [`Supervisor::save`] does; the returned future
    /// resolves once it is on disk, with everything asked of the store before it.
    pub(super) fn save_flushed(&self, container: &Container) -> Flushed {
        let mutable = container.lock();
        if mutable.removed {
            return self.store.flush();
        }
        self.store
            .write_flushed(container.record(&self.runtime.binary().path, &mutable))
    }

    /// Waits for `saved`, the write of container `id`'s record that holds `process`, just
    /// started. If that write failed, a restart would not know the process: it is killed, its
    /// exit then reported and cleaned up as any other's, and the file's own error is returned,
    /// naming `what` (a full disk or no descriptor left is RESOURCE_EXHAUSTED).
    pub(super) async fn recorded_or_killed(
        &self,
        id: &str,
        saved: Flushed,
        process: &TrackedProcess,
        what: impl FnOnce() -> String,
    ) -> Result<()> {
        saved.await;
        let Some(failure) = self.store.take_failure(id) else {
            return Ok(());
        };
        let what = what();
        if let Err(e) = process.signal(libc::SIGKILL) {
            tracing::warn!(id, error = %e, "could not kill {what}, whose state file could not be written");
        }
        Err(match failure {
            Error::Io { path, source } => Error::sys(
                format!(
                    "{what} was killed: the state file {} could not be written",
                    path.display()
                ),
                source,
            ),
            other => Error::Internal(format!(
                "{what} was killed: the state file could not be written: {other}"
            )),
        })
    }

    /// Removes the container's state file for good (its init has exited).
    pub(super) fn remove_record(&self, container: &Container) {
        let mut mutable = container.lock();
        mutable.removed = true;
        self.store.remove(&container.id);
    }

    /// Every container, ordered by id; RESOURCE_EXHAUSTED, before anything is copied, when
    /// their processes' strings alone come to more than `limit` bytes, which no answer of at
    /// most `limit` bytes could hold (each string is encoded with at least its bytes).
    pub(crate) fn containers_within(&self, limit: usize) -> Result<Vec<ContainerInfo>> {
        let live: Vec<Arc<Container>> = self
            .registry()
            .values()
            .filter_map(|slot| match slot {
                Slot::Live(container) => Some(Arc::clone(container)),
                Slot::Reserved | Slot::Exited(_) => None,
            })
            .collect();
        let strings: usize = live.iter().map(|c| c.strings_bytes()).sum();
        if strings > limit {
            return Err(Error::ResourceExhausted(format!(
                "State of {} containers would be more than {strings} bytes, more than --max-message-bytes ({limit}); ask for one container with StateRequest.id",
                live.len()
            )));
        }
        let mut infos: Vec<ContainerInfo> = live.iter().map(|c| c.info()).collect();
        infos.sort_by(|a, b| a.id.cmp(&b.id));
        Ok(infos)
    }

    /// The id of every container, ordered: what needs only the ids need not copy every
    /// container's processes.
    pub(crate) fn container_ids(&self) -> Vec<String> {
        let mut ids: Vec<String> = self
            .registry()
            .iter()
            .filter_map(|(id, slot)| match slot {
                Slot::Live(_) => Some(id.clone()),
                Slot::Reserved | Slot::Exited(_) => None,
            })
            .collect();
        ids.sort();
        ids
    }

    /// How many containers there are and how many processes they run (inits included),
    /// without copying what the processes run with: what a metrics scrape counts.
    pub(crate) fn counts(&self) -> (usize, usize) {
        let live: Vec<Arc<Container>> = self
            .registry()
            .values()
            .filter_map(|slot| match slot {
                Slot::Live(container) => Some(Arc::clone(container)),
                Slot::Reserved | Slot::Exited(_) => None,
            })
            .collect();
        let processes = live.iter().map(|c| 1 + c.lock().added.len()).sum();
        (live.len(), processes)
    }

    /// Container `id` as State reports it.
    pub(crate) fn container_info(&self, id: &str) -> Result<ContainerInfo> {
        Ok(self.container(id)?.info())
    }
}
