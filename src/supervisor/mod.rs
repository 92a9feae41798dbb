//! The supervisor: the registry of containers and what happens to them.
//!
//! Owns: the registry (id → container), each container's state machine (reserved while it is
//! being created, then running or paused, exited once its init has exited: hidden, its id kept
//! until the runtime has deleted it), its added processes, the state files, and the order of
//! events for each container. One file per operation: `create`, `exec`, `signal`, `update`,
//! `checkpoint`, `recovery`, and `exit` for what follows a process's exit; `operation` runs
//! them as the supervisor's own tasks and undoes them; `registry` holds the containers,
//! `stdio`, `scratch` and `validate` serve the operations; `terminals` keeps the pty relays
//! across an upgrade; `stdio_pipes` relays an init's FIFO stdio through pipes CRIU can dump.
//! Does not own: argv (runtime), process spawning (spawn), exit collection (reaper), the wire
//! format (api), the records it shares with them (model).

mod caller;
mod checkpoint;
mod create;
mod exec;
mod exit;
mod operation;
mod recovery;
mod registry;
mod scratch;
mod signal;
mod stdio;
mod stdio_pipes;
mod terminals;
mod uid_counts;
mod update;
pub(crate) mod validate;

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::atomic::AtomicU64;
use std::sync::{Arc, Mutex};

use crate::client_fs::Peer;
use crate::error::{Error, Result};
use crate::events::EventBus;
use crate::hand_back::HandBack;
use crate::reaper::Reaper;
use crate::runtime::Runtime;
use crate::stats::{StatsHub, Subscription};
use crate::store::Store;
pub(crate) use caller::Caller;
pub use caller::ClientFileLimits;
pub(crate) use create::CreateRequest;
pub(crate) use exec::{ExecRequest, User};
pub use operation::OperationLimits;
pub(crate) use registry::ContainerInfo;
use registry::Slot;
pub(crate) use stdio::StdioPaths;

/// The host: State's `machine`.
#[derive(Debug, Clone)]
pub struct Machine {
    pub id: String,
    pub cpus: u32,
    pub memory: u64,
}

pub struct Supervisor {
    registry: Mutex<HashMap<String, Slot>>,
    runtime: Runtime,
    reaper: Arc<Reaper>,
    events: Arc<EventBus>,
    stats: Arc<StatsHub>,
    store: Store,
    scratch: PathBuf,
    /// The pid files of execs, `<state-dir>/execs`: left by a berthd that died mid-exec, they
    /// name processes no record holds (see recovery).
    exec_pids: PathBuf,
    next_scratch: AtomicU64,
    machine: Machine,
    checkpoint_locks: checkpoint::Turns<PathBuf>,
    /// Restores of one checkpoint directory take turns: each holds it, root's, from opening it
    /// to giving it back (see `checkpoint::hold`).
    restores: checkpoint::RestoreTurns,
    in_flight: Arc<operation::InFlight>,
    client_files: ClientFileLimits,
    /// Trips off the reactor for client paths still running ([`caller::Trips`]).
    client_file_trips: Arc<caller::Trips>,
    hand_back: HandBack,
    terminals: terminals::Terminals,
    pipe_relays: stdio_pipes::PipeRelays,
    /// When runtime deletes after exits may start (see exit).
    cleanup_pacing: Arc<exit::CleanupPacing>,
    /// The fds the inits' held namespaces may take (see exit).
    namespace_budget: Arc<exit::NamespaceBudget>,
    /// The checkpoint directories taken from their owners for as long as they are (see
    /// checkpoint).
    held_ledger: checkpoint::HeldLedger,
    /// Ids whose runtime directory a create or restore cut off by berthd's last stop left, too
    /// recent to remove yet (see recovery): a create of one is refused saying so.
    leftover_runtime_dirs: Mutex<std::collections::HashSet<String>>,
}

impl Supervisor {
    // Each argument is a part the wiring (daemon::run) builds and owns; a struct of them would
    // only restate this list.
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        runtime: Runtime,
        reaper: Arc<Reaper>,
        events: Arc<EventBus>,
        stats: Arc<StatsHub>,
        store: Store,
        scratch: PathBuf,
        machine: Machine,
        client_files: ClientFileLimits,
        operations: OperationLimits,
        hand_back: HandBack,
    ) -> Result<Arc<Self>> {
        scratch::empty_scratch_dir(&scratch);
        std::fs::create_dir_all(&scratch).map_err(|e| Error::io(&scratch, e))?;
        let exec_pids = scratch.parent().unwrap_or(&scratch).join("execs");
        std::fs::create_dir_all(&exec_pids).map_err(|e| Error::io(&exec_pids, e))?;
        let cpus = usize::try_from(machine.cpus).unwrap_or(1).max(1);
        let held_ledger =
            checkpoint::HeldLedger::in_state_dir(scratch.parent().unwrap_or(&scratch));
        Ok(Arc::new(Supervisor {
            registry: Mutex::new(HashMap::new()),
            runtime,
            reaper,
            events,
            stats,
            store,
            scratch,
            exec_pids,
            next_scratch: AtomicU64::new(crate::procfs::first_scratch_number()),
            machine,
            checkpoint_locks: checkpoint::Turns::default(),
            restores: checkpoint::RestoreTurns::default(),
            in_flight: Arc::new(operation::InFlight::new(operations)),
            client_files,
            client_file_trips: Arc::default(),
            hand_back,
            terminals: terminals::Terminals::default(),
            pipe_relays: stdio_pipes::PipeRelays::default(),
            cleanup_pacing: Arc::default(),
            namespace_budget: exit::NamespaceBudget::of_fd_limit(cpus),
            held_ledger,
            leftover_runtime_dirs: Mutex::default(),
        }))
    }

    pub(crate) fn events(&self) -> &EventBus {
        &self.events
    }

    /// Subscribes to container `id`'s stats snapshots, opening its stats files if it has no
    /// subscriber yet (file system work: call it off the reactor). A container with no stats
    /// registered is refused as any other call on its id would be (unknown, still being created,
    /// exited), or, running, as one whose cgroup could not be read when it started.
    pub(crate) fn subscribe_stats(&self, id: &str) -> Result<Subscription> {
        if let Some(subscription) = self.stats.subscribe(id)? {
            return Ok(subscription);
        }
        self.container(id)?;
        Err(Error::NotFound(format!(
            "container {id} has no stats: its cgroup could not be read when it started"
        )))
    }

    pub(crate) fn machine(&self) -> &Machine {
        &self.machine
    }

    /// Who a record says named its stdio paths, to open them again as that client may: root
    /// for a record written before that was recorded.
    pub(super) fn caller_named_by(&self, named_by: Option<&crate::store::NamedBy>) -> Arc<Caller> {
        let peer = match named_by {
            Some(named_by) => Peer {
                pid: 0,
                uid: named_by.uid,
                gid: named_by.gid,
                groups: named_by.groups.clone(),
            },
            None => Peer::root(),
        };
        self.caller(peer)
    }

    /// `peer` as the requests it makes are checked: against what it may open itself, and never
    /// inside berthd's state directory (the scratch directory's parent, `<state-dir>/tmp`).
    pub(crate) fn caller(&self, peer: Peer) -> Arc<Caller> {
        let state_dir = self.scratch.parent().unwrap_or(&self.scratch).to_owned();
        Arc::new(Caller::new(
            peer,
            state_dir,
            self.client_files,
            self.hand_back.clone(),
            Arc::clone(&self.client_file_trips),
        ))
    }
}
