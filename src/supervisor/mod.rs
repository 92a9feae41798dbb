//! The supervisor: the registry of containers and what happens to them.
//!
//! Owns: the registry (id → container), each container's state machine (reserved while it is
//! being created, then running or paused, gone once its init has exited and it is deleted), its
//! added processes, the state files, and the order of events for each container.
//! Does not own: argv (runtime), process spawning (spawn), exit collection (reaper), the wire
//! format (api).

pub mod checkpoint;
mod recovery;
mod stdio;
pub mod validate;

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use crate::error::{Error, Result};
use crate::events::{EventBus, EventKind};
use crate::model::ProcessSpec;
use crate::procfs::process_start_time;
use crate::reaper::{Reaper, TrackedProcess};
use crate::runtime::{Operation, Runtime, SpawnStdio};
use crate::stats::StatsHub;
use crate::store::{ContainerRecord, ProcessRecord, Store};
pub use stdio::StdioPaths;

/// How long a runtime may take to hand over a pty master once it has been started.
const CONSOLE_TIMEOUT: Duration = Duration::from_secs(10);

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

pub struct CreateRequest {
    pub id: String,
    pub bundle: String,
    pub stdio: StdioPaths,
    pub checkpoint: String,
}

pub struct User {
    pub uid: u32,
    pub gid: u32,
    pub additional_gids: Vec<u32>,
}

pub struct ExecRequest {
    pub id: String,
    pub args: Vec<String>,
    /// Empty means the container's environment.
    pub env: Vec<String>,
    /// Empty means the container's working directory.
    pub cwd: String,
    /// `None` means the container's user.
    pub user: Option<User>,
    pub terminal: bool,
    pub stdio: StdioPaths,
}

/// The host: State's `machine`.
#[derive(Debug, Clone)]
pub struct Machine {
    pub id: String,
    pub cpus: u32,
    pub memory: u64,
}

/// One container as State reports it: init first, then added processes in start order.
#[derive(Debug, Clone)]
pub struct ContainerInfo {
    pub id: String,
    pub bundle: PathBuf,
    pub status: Status,
    pub processes: Vec<(u32, ProcessSpec)>,
}

struct Process {
    tracked: TrackedProcess,
    spec: ProcessSpec,
    start_time: u64,
}

impl Process {
    fn pid(&self) -> u32 {
        self.tracked.pid() as u32
    }

    fn record(&self) -> ProcessRecord {
        ProcessRecord {
            pid: self.pid(),
            start_time: self.start_time,
            spec: self.spec.clone(),
        }
    }
}

struct Mutable {
    status: Status,
    added: Vec<Arc<Process>>,
}

struct Container {
    id: String,
    bundle: PathBuf,
    stdio: StdioPaths,
    /// The bundle's `process`, the base of every added process (capabilities, rlimits, ...).
    base_process: serde_json::Value,
    init: Arc<Process>,
    mutable: Mutex<Mutable>,
    /// Serializes runtime operations that change the container (pause, resume, exec).
    operations: tokio::sync::Mutex<()>,
}

impl Container {
    fn lock(&self) -> std::sync::MutexGuard<'_, Mutable> {
        self.mutable.lock().expect("container lock poisoned")
    }

    fn record(&self, runtime: &Path) -> ContainerRecord {
        ContainerRecord {
            id: self.id.clone(),
            bundle: self.bundle.clone(),
            runtime: runtime.to_owned(),
            stdin: self.stdio.stdin.clone(),
            stdout: self.stdio.stdout.clone(),
            stderr: self.stdio.stderr.clone(),
            console: self.stdio.console.clone(),
            init: self.init.record(),
            processes: self.lock().added.iter().map(|p| p.record()).collect(),
        }
    }
}

enum Slot {
    /// Being created: the id is taken, nothing else is visible yet.
    Reserved,
    Live(Arc<Container>),
}

pub struct Supervisor {
    registry: Mutex<HashMap<String, Slot>>,
    runtime: Runtime,
    reaper: Arc<Reaper>,
    events: Arc<EventBus>,
    stats: Arc<StatsHub>,
    store: Store,
    scratch: PathBuf,
    next_scratch: AtomicU64,
    machine: Machine,
    checkpoint_locks: checkpoint::BundleLocks,
}

/// Frees a reserved id unless the create that reserved it succeeded.
struct Reservation<'a> {
    supervisor: &'a Supervisor,
    id: &'a str,
    committed: bool,
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

/// Removes request scratch files however the request ends.
struct ScratchFiles(Vec<PathBuf>);

impl Drop for ScratchFiles {
    fn drop(&mut self) {
        for path in &self.0 {
            let _ = std::fs::remove_file(path);
        }
    }
}

/// A scratch directory (CRIU's work directory) removed with what is in it when dropped.
struct ScratchDir(PathBuf);

impl ScratchDir {
    fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for ScratchDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

impl Supervisor {
    pub fn new(
        runtime: Runtime,
        reaper: Arc<Reaper>,
        events: Arc<EventBus>,
        stats: Arc<StatsHub>,
        store: Store,
        scratch: PathBuf,
        machine: Machine,
    ) -> Result<Arc<Self>> {
        // Scratch files belong to requests in flight; any found now are from a berthd that died.
        if scratch.exists() {
            std::fs::remove_dir_all(&scratch).map_err(|e| Error::io(&scratch, e))?;
        }
        std::fs::create_dir_all(&scratch).map_err(|e| Error::io(&scratch, e))?;
        Ok(Arc::new(Supervisor {
            registry: Mutex::new(HashMap::new()),
            runtime,
            reaper,
            events,
            stats,
            store,
            scratch,
            next_scratch: AtomicU64::new(0),
            machine,
            checkpoint_locks: checkpoint::BundleLocks::default(),
        }))
    }

    pub fn events(&self) -> &EventBus {
        &self.events
    }

    pub fn stats(&self) -> &StatsHub {
        &self.stats
    }

    pub fn machine(&self) -> &Machine {
        &self.machine
    }

    fn registry(&self) -> std::sync::MutexGuard<'_, HashMap<String, Slot>> {
        self.registry.lock().expect("registry lock poisoned")
    }

    fn container(&self, id: &str) -> Result<Arc<Container>> {
        validate::container_id(id)?;
        match self.registry().get(id) {
            Some(Slot::Live(container)) => Ok(Arc::clone(container)),
            Some(Slot::Reserved) => Err(Error::FailedPrecondition(format!(
                "container {id} is still being created"
            ))),
            None => Err(Error::NotFound(format!("container {id} does not exist"))),
        }
    }

    fn scratch_path(&self, suffix: &str) -> PathBuf {
        let n = self.next_scratch.fetch_add(1, Ordering::Relaxed);
        self.scratch.join(format!("{n}{suffix}"))
    }

    fn scratch_dir(&self, suffix: &str) -> Result<ScratchDir> {
        let path = self.scratch_path(suffix);
        std::fs::create_dir(&path).map_err(|e| Error::io(&path, e))?;
        Ok(ScratchDir(path))
    }

    fn save(&self, container: &Container) {
        if let Err(e) = self
            .store
            .write(&container.record(&self.runtime.binary().path))
        {
            tracing::error!(id = %container.id, error = %e, "could not write the state file");
        }
    }

    /// Creates and starts a container, or restores it from `<bundle>/checkpoints/<checkpoint>`;
    /// returns its init's pid. On failure nothing is left.
    pub async fn create(self: &Arc<Self>, request: CreateRequest) -> Result<u32> {
        validate::container_id(&request.id)?;
        let (bundle, spec) = validate::bundle(&request.bundle)?;
        let restore = (!request.checkpoint.is_empty())
            .then(|| checkpoint::for_restore(&bundle, &request.checkpoint))
            .transpose()?;
        request.stdio.check()?;
        let process = spec.process().as_ref().ok_or_else(|| {
            Error::InvalidArgument("the bundle's config.json has no process".into())
        })?;
        let init_spec = spec_of(process);
        let base_process = serde_json::to_value(process)
            .map_err(|e| Error::Internal(format!("encode the bundle's process: {e}")))?;

        {
            let mut registry = self.registry();
            if registry.contains_key(&request.id) {
                return Err(Error::AlreadyExists(format!(
                    "container {} already exists",
                    request.id
                )));
            }
            registry.insert(request.id.clone(), Slot::Reserved);
        }
        let mut reservation = Reservation {
            supervisor: self,
            id: &request.id,
            committed: false,
        };

        let pid_file = self.scratch_path(".pid");
        let _scratch = ScratchFiles(vec![pid_file.clone()]);
        let console = init_spec
            .terminal
            .then(|| stdio::ConsoleSocket::bind(self.scratch_path(".sock")))
            .transpose()?;
        let stdio = process_stdio(&request.stdio, init_spec.terminal).await?;
        let console_socket = console.as_ref().map(|c| c.path());
        let created = match &restore {
            None => {
                let create = Operation::Create {
                    id: &request.id,
                    bundle: &bundle,
                    pid_file: &pid_file,
                    console_socket,
                };
                self.runtime.run_with_stdio(create, stdio).await
            }
            Some((image, options)) => {
                let work = self.scratch_dir(".criu")?;
                let restore = Operation::Restore {
                    id: &request.id,
                    bundle: &bundle,
                    image,
                    work: work.path(),
                    pid_file: &pid_file,
                    console_socket,
                    options: *options,
                };
                let restored = self.runtime.run_with_stdio(restore, stdio).await;
                restored.map_err(|e| checkpoint::with_criu_log(e, work.path(), "restore.log"))
            }
        };
        if let Err(e) = created {
            self.delete_from_runtime(&request.id).await;
            return Err(e);
        }
        let init = match read_pid_file(&pid_file).and_then(|pid| self.reaper.track(pid)) {
            Ok(init) => init,
            Err(e) => {
                self.delete_from_runtime(&request.id).await;
                return Err(e);
            }
        };
        let started = self
            .start_registered(
                &request.id,
                console.as_ref(),
                &request.stdio,
                restore.is_none(),
            )
            .await;
        if let Err(e) = started {
            self.delete_from_runtime(&request.id).await;
            init.wait().await;
            return Err(e);
        }

        let pid = init.pid() as u32;
        let container = Arc::new(Container {
            id: request.id.clone(),
            bundle: bundle.clone(),
            stdio: request.stdio,
            base_process,
            init: Arc::new(Process {
                start_time: process_start_time(pid).unwrap_or(0),
                tracked: init,
                spec: init_spec,
            }),
            mutable: Mutex::new(Mutable {
                status: Status::Running,
                added: Vec::new(),
            }),
            operations: tokio::sync::Mutex::new(()),
        });
        self.save(&container);
        self.registry()
            .insert(request.id.clone(), Slot::Live(Arc::clone(&container)));
        reservation.committed = true;
        if let Err(e) = self.stats.register(&request.id, pid) {
            tracing::warn!(id = %request.id, error = %e, "no stats or OOM events for this container");
        }
        self.events.publish(
            &request.id,
            pid,
            EventKind::StartContainer {
                bundle: bundle.display().to_string(),
            },
        );
        self.watch_init(container);
        Ok(pid)
    }

    /// Cleans up after the container once its init exits.
    fn watch_init(self: &Arc<Self>, container: Arc<Container>) {
        let supervisor = Arc::clone(self);
        tokio::spawn(async move {
            let status = container.init.tracked.wait().await;
            supervisor.init_exited(&container, status).await;
        });
    }

    /// Forgets an added process and reports its exit once it exits.
    fn watch_process(self: &Arc<Self>, container: Arc<Container>, process: Arc<Process>) {
        let supervisor = Arc::clone(self);
        tokio::spawn(async move {
            let status = process.tracked.wait().await;
            let still_live = {
                let mut mutable = container.lock();
                mutable.added.retain(|p| !Arc::ptr_eq(p, &process));
                matches!(supervisor.registry().get(&container.id), Some(Slot::Live(c)) if Arc::ptr_eq(c, &container))
            };
            if still_live {
                supervisor.save(&container);
            }
            supervisor
                .events
                .publish(&container.id, process.pid(), EventKind::Exit { status });
        });
    }

    /// The part of create between `create` and a running container: the pty, then `start`
    /// (a restored container is already running).
    async fn start_registered(
        &self,
        id: &str,
        console: Option<&stdio::ConsoleSocket>,
        paths: &StdioPaths,
        start: bool,
    ) -> Result<()> {
        if let Some(console) = console {
            let master = console.receive_master(CONSOLE_TIMEOUT).await?;
            stdio::relay_terminal(master, paths)?;
        }
        if start {
            self.runtime.run(Operation::Start { id }).await?;
        }
        Ok(())
    }

    /// Best effort: removes whatever the runtime holds for `id` after a failed request.
    async fn delete_from_runtime(&self, id: &str) {
        if let Err(e) = self.runtime.run(Operation::Delete { id }).await {
            tracing::debug!(id, error = %e, "runtime delete after a failed request");
        }
    }

    async fn init_exited(&self, container: &Arc<Container>, status: u32) {
        let id = &container.id;
        let pid = container.init.pid();
        tracing::info!(id = %id, pid, status, "container exited");
        // Before the runtime removes the cgroup, and so that an OOM kill is published before the exit.
        self.stats.unregister(id);
        if let Err(e) = self.runtime.run(Operation::Delete { id }).await {
            tracing::error!(id = %id, error = %e, "could not delete the container from the runtime");
        }
        {
            let mut registry = self.registry();
            if let Some(Slot::Live(current)) = registry.get(id)
                && Arc::ptr_eq(current, container)
            {
                registry.remove(id);
            }
        }
        if let Err(e) = self.store.remove(id) {
            tracing::error!(id = %id, error = %e, "could not remove the state file");
        }
        self.events.publish(id, pid, EventKind::Exit { status });
    }

    /// Starts an added process in a running container; returns its host pid.
    pub async fn exec(self: &Arc<Self>, request: ExecRequest) -> Result<u32> {
        let container = self.container(&request.id)?;
        if request.args.is_empty() {
            return Err(Error::InvalidArgument(
                "args is empty: give the program to run and its arguments".into(),
            ));
        }
        request.stdio.check()?;
        let _operations = container.operations.lock().await;
        if container.lock().status == Status::Paused {
            return Err(Error::FailedPrecondition(format!(
                "container {} is paused; resume it before adding a process",
                container.id
            )));
        }
        let (process_json, spec) = added_process(&container.base_process, &request)?;
        let process_file = self.scratch_path(".json");
        let pid_file = self.scratch_path(".pid");
        let _scratch = ScratchFiles(vec![process_file.clone(), pid_file.clone()]);
        std::fs::write(&process_file, process_json).map_err(|e| Error::io(&process_file, e))?;
        let console = spec
            .terminal
            .then(|| stdio::ConsoleSocket::bind(self.scratch_path(".sock")))
            .transpose()?;
        let stdio = process_stdio(&request.stdio, spec.terminal).await?;
        let exec = Operation::Exec {
            id: &container.id,
            process: &process_file,
            pid_file: &pid_file,
            console_socket: console.as_ref().map(|c| c.path()),
        };
        let run = async {
            if let Some(console) = &console {
                // runc sends the master before it returns, so receive while it runs.
                let (ran, master) = tokio::join!(
                    self.runtime.run_with_stdio(exec, stdio),
                    console.receive_master(CONSOLE_TIMEOUT)
                );
                ran?;
                stdio::relay_terminal(master?, &request.stdio)
            } else {
                self.runtime.run_with_stdio(exec, stdio).await.map(drop)
            }
        };
        run.await?;
        let tracked = read_pid_file(&pid_file).and_then(|pid| self.reaper.track(pid))?;
        let pid = tracked.pid() as u32;
        let process = Arc::new(Process {
            start_time: process_start_time(pid).unwrap_or(0),
            tracked,
            spec: spec.clone(),
        });
        container.lock().added.push(Arc::clone(&process));
        self.save(&container);
        self.events.publish(
            &container.id,
            pid,
            EventKind::StartProcess { process: spec },
        );
        self.watch_process(Arc::clone(&container), process);
        Ok(pid)
    }

    /// Sends `signal` to `pid`, which must be the init or an added process of container `id`.
    pub fn signal(&self, id: &str, pid: u32, signal: u32) -> Result<()> {
        let container = self.container(id)?;
        let signal = validate::signal(signal)?;
        if container.init.pid() == pid {
            return container.init.tracked.signal(signal);
        }
        let process = container
            .lock()
            .added
            .iter()
            .find(|p| p.pid() == pid)
            .cloned();
        match process {
            Some(process) => process.tracked.signal(signal),
            None => Err(Error::NotFound(format!(
                "process {pid} is not part of container {id}"
            ))),
        }
    }

    /// Freezes ("paused") or thaws ("running") the container, then signals its init if `signal`
    /// is not 0.
    pub async fn update(&self, id: &str, status: &str, signal: u32) -> Result<()> {
        let container = self.container(id)?;
        let target = match status {
            "" => None,
            "paused" => Some(Status::Paused),
            "running" => Some(Status::Running),
            other => {
                return Err(Error::InvalidArgument(format!(
                    "invalid status {other:?}: use \"paused\" or \"running\""
                )));
            }
        };
        let signal = (signal != 0)
            .then(|| validate::signal(signal))
            .transpose()?;
        if let Some(target) = target {
            let _operations = container.operations.lock().await;
            if container.lock().status == target {
                return Err(Error::FailedPrecondition(format!(
                    "container {id} is already {}",
                    target.as_str()
                )));
            }
            let (op, kind) = match target {
                Status::Paused => (Operation::Pause { id }, EventKind::Pause),
                Status::Running => (Operation::Resume { id }, EventKind::Resume),
            };
            self.runtime.run(op).await?;
            container.lock().status = target;
            self.events.publish(id, container.init.pid(), kind);
        }
        if let Some(signal) = signal {
            container.init.tracked.signal(signal)?;
        }
        Ok(())
    }

    /// Every container, ordered by id.
    pub fn containers(&self) -> Vec<ContainerInfo> {
        let live: Vec<Arc<Container>> = self
            .registry()
            .values()
            .filter_map(|slot| match slot {
                Slot::Live(container) => Some(Arc::clone(container)),
                Slot::Reserved => None,
            })
            .collect();
        let mut infos: Vec<ContainerInfo> = live
            .iter()
            .map(|c| {
                let mutable = c.lock();
                let mut processes = vec![(c.init.pid(), c.init.spec.clone())];
                processes.extend(mutable.added.iter().map(|p| (p.pid(), p.spec.clone())));
                ContainerInfo {
                    id: c.id.clone(),
                    bundle: c.bundle.clone(),
                    status: mutable.status,
                    processes,
                }
            })
            .collect();
        infos.sort_by(|a, b| a.id.cmp(&b.id));
        infos
    }
}

/// The stdio a runtime command gets: the client's paths, or nothing when a pty replaces them.
async fn process_stdio(paths: &StdioPaths, terminal: bool) -> Result<[SpawnStdio; 3]> {
    if terminal {
        return Ok([SpawnStdio::Null, SpawnStdio::Null, SpawnStdio::Null]);
    }
    let paths = paths.clone();
    // Opening a file can block (a slow filesystem); keep it off the reactor threads.
    let fds = tokio::task::spawn_blocking(move || paths.open_all())
        .await
        .map_err(|e| Error::Internal(format!("open stdio: {e}")))??;
    Ok(fds.map(SpawnStdio::Fd))
}

fn read_pid_file(path: &Path) -> Result<i32> {
    let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
    text.trim()
        .parse()
        .map_err(|_| Error::Internal(format!("{}: not a pid: {text:?}", path.display())))
}

fn spec_of(process: &oci_spec::runtime::Process) -> ProcessSpec {
    ProcessSpec {
        args: process.args().clone().unwrap_or_default(),
        env: process.env().clone().unwrap_or_default(),
        cwd: process.cwd().display().to_string(),
        uid: process.user().uid(),
        gid: process.user().gid(),
        additional_gids: process.user().additional_gids().clone().unwrap_or_default(),
        terminal: process.terminal().unwrap_or(false),
    }
}

/// The process JSON for `runtime exec --process`: the bundle's process (capabilities, rlimits,
/// security settings) with the request's args, env, cwd, user and terminal.
fn added_process(
    base: &serde_json::Value,
    request: &ExecRequest,
) -> Result<(Vec<u8>, ProcessSpec)> {
    let mut process: oci_spec::runtime::Process = serde_json::from_value(base.clone())
        .map_err(|e| Error::Internal(format!("decode the bundle's process: {e}")))?;
    process.set_args(Some(request.args.clone()));
    if !request.env.is_empty() {
        process.set_env(Some(request.env.clone()));
    }
    if !request.cwd.is_empty() {
        if !Path::new(&request.cwd).is_absolute() {
            return Err(Error::InvalidArgument(format!(
                "cwd {} is not absolute",
                request.cwd
            )));
        }
        process.set_cwd(PathBuf::from(&request.cwd));
    }
    if let Some(user) = &request.user {
        let mut spec_user = process.user().clone();
        spec_user.set_uid(user.uid);
        spec_user.set_gid(user.gid);
        spec_user.set_additional_gids(
            (!user.additional_gids.is_empty()).then(|| user.additional_gids.clone()),
        );
        spec_user.set_username(None);
        process.set_user(spec_user);
    }
    process.set_terminal(Some(request.terminal));
    if !request.terminal {
        process.set_console_size(None);
    }
    let spec = spec_of(&process);
    let json = serde_json::to_vec(&process)
        .map_err(|e| Error::Internal(format!("encode the added process: {e}")))?;
    Ok((json, spec))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn base() -> serde_json::Value {
        serde_json::json!({
            "terminal": true,
            "consoleSize": {"height": 24, "width": 80},
            "user": {"uid": 1000, "gid": 1000},
            "args": ["sh"],
            "env": ["PATH=/bin", "TERM=xterm"],
            "cwd": "/srv",
            "capabilities": {"bounding": ["CAP_KILL"], "effective": ["CAP_KILL"], "permitted": ["CAP_KILL"]},
            "noNewPrivileges": true
        })
    }

    fn request() -> ExecRequest {
        ExecRequest {
            id: "a".into(),
            args: vec!["ls".into(), "-l".into()],
            env: vec![],
            cwd: String::new(),
            user: None,
            terminal: false,
            stdio: StdioPaths::default(),
        }
    }

    #[test]
    fn added_process_inherits_what_the_request_leaves_empty() {
        let (json, spec) = added_process(&base(), &request()).unwrap();
        assert_eq!(spec.args, ["ls", "-l"]);
        assert_eq!(spec.env, ["PATH=/bin", "TERM=xterm"]);
        assert_eq!(spec.cwd, "/srv");
        assert_eq!((spec.uid, spec.gid), (1000, 1000));
        assert!(!spec.terminal);
        let value: serde_json::Value = serde_json::from_slice(&json).unwrap();
        assert_eq!(value["capabilities"]["bounding"][0], "CAP_KILL");
        assert_eq!(value["noNewPrivileges"], true);
        assert!(value.get("consoleSize").is_none());
    }

    #[test]
    fn added_process_takes_what_the_request_gives() {
        let mut req = request();
        req.env = vec!["A=1".into()];
        req.cwd = "/tmp".into();
        req.terminal = true;
        req.user = Some(User {
            uid: 0,
            gid: 5,
            additional_gids: vec![7, 8],
        });
        let (_, spec) = added_process(&base(), &req).unwrap();
        assert_eq!(spec.env, ["A=1"]);
        assert_eq!(spec.cwd, "/tmp");
        assert_eq!((spec.uid, spec.gid), (0, 5));
        assert_eq!(spec.additional_gids, [7, 8]);
        assert!(spec.terminal);
        req.cwd = "relative".into();
        assert!(matches!(
            added_process(&base(), &req),
            Err(Error::InvalidArgument(_))
        ));
    }
}
