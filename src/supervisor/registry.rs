//! The registry: id → container, and what State reports of it.
//!
//! Owns: a container's record in memory (bundle, stdio paths, init and added processes, status,
//! its locks), the slot an id holds while it is being created, looking containers up, and
//! writing a container's state file. Does not own: what the operations do with a container
//! (create, exec, signal, update, checkpoint, recovery) or the state file's format (store).

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};

use super::stdio_pipes::PipeInodes;
use super::{StdioPaths, Supervisor, validate};
use crate::error::{Error, Result};
use crate::model::ProcessSpec;
use crate::reaper::TrackedProcess;
use crate::store::{ContainerRecord, ProcessRecord, TerminalPaths};

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
}

impl Process {
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
    pub(super) base_process: serde_json::Value,
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
        }
    }
}

pub(super) enum Slot {
    /// Being created: the id is taken, nothing else is visible yet.
    Reserved,
    Live(Arc<Container>),
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

    /// Takes `id` for a create, or says it is taken.
    pub(super) fn reserve<'a>(&'a self, id: &'a str) -> Result<Reservation<'a>> {
        let mut registry = self.registry();
        if registry.contains_key(id) {
            return Err(Error::AlreadyExists(format!(
                "container {id} already exists"
            )));
        }
        registry.insert(id.to_owned(), Slot::Reserved);
        Ok(Reservation {
            supervisor: self,
            id,
            committed: false,
        })
    }

    /// Makes `container` visible under its id.
    pub(super) fn insert(&self, container: Arc<Container>) {
        self.registry()
            .insert(container.id.clone(), Slot::Live(container));
    }

    /// Removes `container` from the registry unless another has taken its id since.
    pub(super) fn forget(&self, container: &Arc<Container>) {
        let mut registry = self.registry();
        if let Some(Slot::Live(current)) = registry.get(&container.id)
            && Arc::ptr_eq(current, container)
        {
            registry.remove(&container.id);
        }
    }

    pub(super) fn container(&self, id: &str) -> Result<Arc<Container>> {
        validate::container_id(id)?;
        match self.registry().get(id) {
            Some(Slot::Live(container)) => Ok(Arc::clone(container)),
            Some(Slot::Reserved) => Err(Error::FailedPrecondition(format!(
                "container {id} is still being created"
            ))),
            None => Err(Error::NotFound(format!("container {id} does not exist"))),
        }
    }

    /// Writes the container's state file; a failure is logged, the container carries on.
    /// Under the container's lock, and never after `remove_record`: an added process whose exit
    /// is handled after the init's must not bring back the record of a deleted container.
    pub(super) fn save(&self, container: &Container) {
        let mutable = container.lock();
        if mutable.removed {
            return;
        }
        let record = container.record(&self.runtime.binary().path, &mutable);
        if let Err(e) = self.store.write(&record) {
            tracing::error!(id = %container.id, error = %e, "could not write the state file");
        }
    }

    /// Removes the container's state file for good (its init has exited).
    pub(super) fn remove_record(&self, container: &Container) {
        let mut mutable = container.lock();
        mutable.removed = true;
        if let Err(e) = self.store.remove(&container.id) {
            tracing::error!(id = %container.id, error = %e, "could not remove the state file");
        }
    }

    /// Every container, ordered by id.
    pub(crate) fn containers(&self) -> Vec<ContainerInfo> {
        let live: Vec<Arc<Container>> = self
            .registry()
            .values()
            .filter_map(|slot| match slot {
                Slot::Live(container) => Some(Arc::clone(container)),
                Slot::Reserved => None,
            })
            .collect();
        let mut infos: Vec<ContainerInfo> = live.iter().map(|c| c.info()).collect();
        infos.sort_by(|a, b| a.id.cmp(&b.id));
        infos
    }

    /// The id of every container, ordered: what needs only the ids need not copy every
    /// container's processes.
    pub(crate) fn container_ids(&self) -> Vec<String> {
        let mut ids: Vec<String> = self
            .registry()
            .iter()
            .filter_map(|(id, slot)| match slot {
                Slot::Live(_) => Some(id.clone()),
                Slot::Reserved => None,
            })
            .collect();
        ids.sort();
        ids
    }

    /// Container `id` as State reports it.
    pub(crate) fn container_info(&self, id: &str) -> Result<ContainerInfo> {
        Ok(self.container(id)?.info())
    }
}
