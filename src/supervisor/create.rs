//! CreateContainer: from a bundle (or a checkpoint of it) to a running, registered container.
//!
//! Owns: the order of create (reserve the id, pipe FIFO stdio, runtime `run --detach`, or create
//! and later start, or restore; track the init, hand over the pty, register, publish) and
//! undoing it on failure: after a runtime killed at its timeout, what it left running in the
//! container's cgroups and the cgroups themselves; after the record could not be written, the
//! container, killed. Does not own: what happens when the init exits (exit), the argv or
//! which create mode (runtime), CRIU images (checkpoint), the stdio paths (stdio), the stdio
//! pipes (stdio_pipes).

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use super::operation::Undo;
use super::registry::{Container, Mutable, Process, Status};
use super::scratch::{ScratchFiles, read_pid_file};
use super::stdio::{self, CONSOLE_TIMEOUT, StdioPaths, process_stdio};
use super::stdio_pipes::{self, InitStdio, PipeInodes};
use super::{Caller, Supervisor, checkpoint, validate};
use crate::error::{Error, Result};
use crate::events::EventKind;
use crate::model::ProcessSpec;
use crate::procfs::process_start_time;
use crate::runtime::{Asker, CreateMode, Operation, RecordedCgroup};

/// What [`Supervisor::create_steps`] works from.
struct CreateSteps<'a> {
    request: &'a CreateRequest,
    /// The spec berthd checked, which the runtime is given instead of the bundle's, and the
    /// bundle with the names beside its `config.json`, which the copy mirrors.
    runtime_config: &'a [u8],
    bundle: &'a Path,
    names: &'a [std::ffi::OsString],
    cgroups_path: Option<&'a Path>,
    restore: Option<&'a checkpoint::Restorable>,
    /// The init's uid, and how the container's uids appear on the host.
    init_uid: u32,
    uids: &'a validate::UidMap,
    pid_file: &'a Path,
    console: Option<&'a stdio::ConsoleSocket>,
}

pub struct CreateRequest {
    pub id: String,
    pub bundle: String,
    pub stdio: StdioPaths,
    pub checkpoint: String,
    /// `--max-process-spec-bytes`, which the bundle's process must fit.
    pub max_spec_bytes: usize,
    /// Who asks: the bundle and the checkpoint are opened as it may open them.
    pub caller: Arc<Caller>,
}

impl Supervisor {
    /// Creates and starts a container, or restores it from `<bundle>/checkpoints/<checkpoint>`;
    /// returns its init's pid. The create is the supervisor's: a caller that goes away changes
    /// nothing about its outcome. On failure nothing is left.
    pub(crate) async fn create(self: &Arc<Self>, request: CreateRequest) -> Result<u32> {
        let uid = request.caller.peer.uid;
        let supervisor = Arc::clone(self);
        self.owned(uid, async move { supervisor.create_owned(request).await })
            .await
    }

    async fn create_owned(self: &Arc<Self>, request: CreateRequest) -> Result<u32> {
        validate::container_id(&request.id)?;
        request.stdio.check()?;
        // The bundle's process is kept as the base of added processes.
        let validate::BundleConfig {
            dir: bundle,
            process: base_process,
            runtime_config,
            names,
            cgroups_path,
            uids,
        } = validate::bundle(&request.bundle, &request.caller).await?;
        let restore = match request.checkpoint.as_str() {
            "" => None,
            name => Some(
                checkpoint::for_restore(
                    &request.caller,
                    &bundle,
                    name,
                    &self.restores,
                    &self.checkpoint_locks,
                )
                .await?,
            ),
        };
        if restore.is_some() {
            self.criu_ready().await?;
        }
        let init_spec = spec_of(&base_process);
        validate::process(
            "config.json: process.",
            &init_spec.args,
            &init_spec.env,
            &init_spec.cwd,
            &init_spec.additional_gids,
            request.max_spec_bytes,
        )?;
        validate::user(
            "config.json: process.",
            init_spec.uid,
            init_spec.gid,
            &init_spec.additional_gids,
        )?;

        self.refuse_a_leftover_id(&request.id)?;
        let mut undo = Undo::new(self, &request.id, Asker::Uid(request.caller.peer.uid));
        undo.reserved(self.reserve(&request.id).await?);
        let pid_file = self.scratch_path(".pid");
        let _scratch = ScratchFiles(vec![pid_file.clone()]);
        let steps = async {
            let console = init_spec
                .terminal
                .then(|| stdio::ConsoleSocket::bind(self.scratch_path(".sock")))
                .transpose()?;
            let steps = CreateSteps {
                request: &request,
                runtime_config: &runtime_config,
                bundle: &bundle,
                names: &names,
                cgroups_path: cgroups_path.as_deref(),
                restore: restore.as_ref(),
                init_uid: init_spec.uid,
                uids: &uids,
                pid_file: &pid_file,
                console: console.as_ref(),
            };
            self.create_steps(steps, &mut undo).await
        };
        let pipes = match steps.await {
            Ok(pipes) => pipes,
            Err(e) => return Err(undo.undo(e).await),
        };
        let (Some(init), Some(reservation)) = undo.keep() else {
            return Err(Error::Internal(format!(
                "create of {} finished without its init or its reservation",
                request.id
            )));
        };

        let pid = init.pid() as u32;
        let container = Arc::new(Container {
            id: request.id.clone(),
            bundle: bundle.clone(),
            stdio: request.stdio,
            base_process,
            init: Arc::new(Process::new(
                init,
                init_spec,
                process_start_time(pid).unwrap_or(0),
                None,
            )),
            lost_terminals: Vec::new(),
            pipes,
            mutable: Mutex::new(Mutable {
                status: Status::Running,
                added: Vec::new(),
                removed: false,
            }),
            operations: tokio::sync::Mutex::new(()),
        });
        // Nothing below can fail: the state file is written once the container is certain.
        let saved = self.save_flushed(&container);
        reservation.commit(Arc::clone(&container));
        self.register_stats(&request.id, pid).await;
        self.events.publish(
            &request.id,
            pid,
            EventKind::StartContainer {
                bundle: bundle.display().to_string(),
            },
        );
        // After the start: an OOM kill in the first instant is published at once by the watch.
        // Before the answer, not beside it (which took 0.18 ms off the handler, measured): what a
        // container holds in berthd (its namespaces, the OOM eventfd) is in place when its
        // create is answered, so a count of berthd's fds then is the container's.
        self.stats.watch_oom(&request.id);
        let init = Arc::clone(&container.init);
        self.watch_init(container);
        // Answer once the record is on disk: a berthd that dies now still finds the container
        // (without it, a restart would take it for a create cut off and delete it unannounced).
        self.recorded_or_killed(&request.id, saved, &init.tracked, || {
            format!("container {}", request.id)
        })
        .await?;
        Ok(pid)
    }

    /// The steps of create that leave something behind, each recorded in `undo` before it acts:
    /// the stdio pipes' relay, runtime run (or create, or restore), tracking the init, the pty
    /// relay, runtime start after create. Returns the inodes of the init's stdio pipes. The pid
    /// file is claimed from the reaper before the runtime runs: once the runtime exits the init
    /// is berthd's child and may already be a zombie, which the orphan sweep must leave for
    /// `track` (its true status, its `/proc` entry for the cgroup).
    async fn create_steps(
        &self,
        steps: CreateSteps<'_>,
        undo: &mut Undo<'_>,
    ) -> Result<PipeInodes> {
        let CreateSteps {
            request,
            runtime_config,
            bundle,
            names,
            cgroups_path,
            restore,
            init_uid,
            uids,
            pid_file,
            console,
        } = steps;
        let id = &request.id;
        let asker = undo.asker();
        let opened = process_stdio(&request.stdio, console.is_some()).await?;
        // A restored process's stdio is CRIU's to attach: runc's init, which chowns it, does
        // not run.
        if restore.is_none() {
            request
                .stdio
                .refuse_a_file_taken(&opened, true, init_uid, || uids.clone())?;
        }
        let relay_ends = match console {
            Some(_) => Some(stdio::relay_ends(&request.stdio).await?),
            None => None,
        };
        // A terminal's init has no stdio of its own to pipe (its pty is relayed instead).
        let InitStdio {
            container: stdio,
            relay,
            pipes,
        } = stdio_pipes::pipe_fifos(opened)?;
        let console_socket = console.map(|c| c.path());
        undo.runtime_state(cgroups_path.map(Path::to_path_buf));
        // Removed with the runtime's state: by the undo's delete, or the exit's.
        let bundle = &self
            .runtime
            .binary()
            .write_config(id, runtime_config, bundle, names)?;
        let claim = self.reaper.claim(pid_file);
        let create_mode = self.runtime.create_mode();
        match restore {
            None => {
                let create = match create_mode {
                    CreateMode::Run => Operation::Run {
                        id,
                        bundle,
                        pid_file,
                        console_socket,
                    },
                    CreateMode::CreateStart => Operation::Create {
                        id,
                        bundle,
                        pid_file,
                        console_socket,
                    },
                };
                self.runtime.run_with_stdio(create, stdio, asker).await?;
            }
            Some(restorable) => {
                let work = self.scratch_dir(".criu")?;
                let held = checkpoint::hold(&request.caller, restorable, &self.held_ledger).await?;
                let restore = Operation::Restore {
                    id,
                    bundle,
                    image: &held.path(),
                    work: work.path(),
                    pid_file,
                    console_socket,
                    options: restorable.options,
                };
                let restored = self.runtime.run_with_stdio(restore, stdio, asker).await;
                checkpoint::give_back(&request.caller, held).await;
                restored.map_err(|e| checkpoint::with_criu_log(e, work.path(), "restore.log"))?;
            }
        }
        let pid = read_pid_file(pid_file)?;
        undo.started(pid);
        undo.tracked(self.reaper.track(pid)?);
        drop(claim);
        if let Some(relay) = relay {
            undo.pipe_relay();
            self.keep_pipe_relay(id, pid as u32, relay);
        }
        if let (Some(console), Some(ends)) = (console, relay_ends) {
            let master = console.receive_master(CONSOLE_TIMEOUT).await?;
            undo.relay(self.relay_terminal(id, pid as u32, master, ends)?);
        }
        if restore.is_none() && create_mode == CreateMode::CreateStart {
            self.runtime.run(Operation::Start { id }, asker).await?;
        }
        Ok(pipes)
    }

    /// Registers the new container's stats. Its init may have exited already (`run --detach`,
    /// or an OOM kill before this): on a v1 host its cgroup is then taken from the runtime's
    /// state.
    async fn register_stats(&self, id: &str, pid: u32) {
        let Err(from_proc) = self.stats.register(id, pid) else {
            return;
        };
        let registered =
            self.runtime
                .recorded_cgroup(id)
                .await
                .and_then(|recorded| match recorded {
                    RecordedCgroup::Dirs(dirs) => self.stats.register_dirs(id, pid, &dirs),
                    RecordedCgroup::Path(path) => self.stats.register_path(id, pid, &path),
                });
        if let Err(from_runtime) = registered {
            tracing::warn!(
                id,
                error = %from_proc,
                runtime = %from_runtime,
                "no stats or OOM events for this container"
            );
        }
    }

    /// Removes the cgroups the runtime made for container `id` and left behind when it was
    /// killed at `--runtime-timeout` (say while an OCI hook sleeps): it removed none, and its
    /// delete cannot, knowing no such container. Where runc's cgroupfs driver puts them: in each
    /// hierarchy berthd is in, the bundle's `cgroupsPath` when absolute, else it or `<id>`
    /// beneath the cgroup the runtime ran in there (berthd's; beside it for runc's v2 driver on
    /// a unified host; for the built-in runtime beneath its memory cgroup in every hierarchy, as
    /// it places them). Only the leaf, never berthd's own cgroup, one above it or a root, and
    /// only when empty (the kernel refuses otherwise), as the runtime's own delete would.
    pub(super) async fn remove_left_cgroups(
        &self,
        id: &str,
        cgroups_path: Option<&Path>,
        since: u64,
    ) {
        let own = match crate::procfs::read_generated("/proc/self/cgroup", 2048) {
            Ok(own) => own,
            Err(e) => {
                tracing::warn!(id, error = %e, "/proc/self/cgroup: a failed create's cgroups are not looked for");
                return;
            }
        };
        let one_for_all = if self.runtime.binary().is_builtin() {
            crate::runtime::builtin::own_cgroup(&own).ok()
        } else {
            None
        };
        let mut lines = Vec::new();
        let parsed = crate::stats::parse::proc_cgroup(&own, |line| {
            lines.push((
                line.hierarchy,
                line.controllers.to_owned(),
                PathBuf::from(line.path),
            ));
        });
        if let Err(e) = parsed {
            tracing::warn!(id, error = %e, "a failed create's cgroups are not looked for");
            return;
        }
        let unified_only = lines.iter().all(|(hierarchy, ..)| *hierarchy == 0);
        let mounts = self.stats.mounts();
        let mut dirs = Vec::new();
        for (hierarchy, controllers, own) in &lines {
            let beneath = match &one_for_all {
                Some(all) => all.clone(),
                None if unified_only => own.parent().unwrap_or(own).to_path_buf(),
                None => own.clone(),
            };
            let placed = crate::runtime::builtin::cgroup_placement(cgroups_path, id, &beneath);
            if placed == Path::new("/") || own.starts_with(&placed) {
                continue;
            }
            dirs.extend(mounts.dir_in(*hierarchy, controllers, &placed));
        }
        let id = id.to_owned();
        let reaper = Arc::clone(&self.reaper);
        // The runtime's init stage is started as the runtime (as berthd, built in).
        let runtime: Option<Vec<u8>> = if self.runtime.binary().is_builtin() {
            std::env::args_os()
                .next()
                .map(|arg0| arg0.into_encoded_bytes())
        } else {
            Some(
                self.runtime
                    .binary()
                    .path
                    .as_os_str()
                    .as_encoded_bytes()
                    .to_vec(),
            )
        };
        let removing = tokio::task::spawn_blocking(move || {
            // A runtime killed while its init stage ran (a createContainer hook that hangs)
            // leaves that stage, and what it started, in the container's cgroups, reparented
            // to berthd. Only that stage is looked for, with what descends from it: a cgroup
            // the bundle names may hold another container's processes, orphans of berthd's too.
            let kill_left = || {
                let mut left: Vec<i32> = dirs
                    .iter()
                    .flat_map(|dir| crate::procfs::read_pids(dir.join("cgroup.procs")))
                    .collect();
                left.sort_unstable();
                left.dedup();
                let Some(runtime) = &runtime else {
                    return;
                };
                let killed = reaper.kill_left_init_stages(&left, runtime, since);
                if killed > 0 {
                    tracing::info!(
                        id,
                        killed,
                        "killed what the runtime left running in the container's cgroups"
                    );
                }
            };
            kill_left();
            for dir in &dirs {
                // A process killed with the runtime leaves its cgroup as it finishes exiting.
                let mut tries = 0;
                let removed = loop {
                    match std::fs::remove_dir(dir) {
                        Err(e) if e.raw_os_error() == Some(libc::EBUSY) && tries < 10 => {
                            tries += 1;
                            std::thread::sleep(std::time::Duration::from_millis(100));
                            kill_left();
                        }
                        other => break other,
                    }
                };
                match removed {
                    Ok(()) => {
                        tracing::info!(id, dir = %dir.display(), "removed a cgroup the runtime left")
                    }
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                    Err(e) => {
                        tracing::warn!(id, dir = %dir.display(), error = %e, "a cgroup the runtime left stays")
                    }
                }
            }
        });
        if let Err(e) = removing.await {
            tracing::warn!(error = %e, "removing a failed create's cgroups ended abnormally");
        }
    }

    /// Best effort: removes whatever the runtime holds for `id` after a failed request, in
    /// `asker`'s runtime turn.
    pub(super) async fn delete_from_runtime(&self, id: &str, asker: Asker) {
        if let Err(e) = self.runtime.run(Operation::Delete { id }, asker).await {
            tracing::debug!(id, error = %e, "runtime delete after a failed request");
        }
    }
}

/// What State and events report of an OCI process.
pub(super) fn spec_of(process: &oci_spec::runtime::Process) -> ProcessSpec {
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
