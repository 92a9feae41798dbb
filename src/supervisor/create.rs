//! CreateContainer: from a bundle (or a checkpoint of it) to a running, registered container,
//! and the clean-up once its init exits.
//!
//! Owns: the order of create (reserve the id, runtime create or restore, track the init, hand
//! over the pty, start, register, publish) and undoing it on failure; what happens when an init
//! exits. Does not own: the argv (runtime), CRIU images (checkpoint), the stdio paths (stdio).

use std::sync::{Arc, Mutex};

use super::registry::{Container, Mutable, Process, Status};
use super::scratch::{ScratchFiles, read_pid_file};
use super::stdio::{self, CONSOLE_TIMEOUT, StdioPaths, process_stdio};
use super::{Supervisor, checkpoint, validate};
use crate::error::{Error, Result};
use crate::events::EventKind;
use crate::model::ProcessSpec;
use crate::procfs::process_start_time;
use crate::runtime::Operation;

pub struct CreateRequest {
    pub id: String,
    pub bundle: String,
    pub stdio: StdioPaths,
    pub checkpoint: String,
}

impl Supervisor {
    /// Creates and starts a container, or restores it from `<bundle>/checkpoints/<checkpoint>`;
    /// returns its init's pid. On failure nothing is left.
    pub(crate) async fn create(self: &Arc<Self>, request: CreateRequest) -> Result<u32> {
        validate::container_id(&request.id)?;
        let (bundle, spec) = validate::bundle(&request.bundle)?;
        let restore = (!request.checkpoint.is_empty())
            .then(|| checkpoint::for_restore(&bundle, &request.checkpoint))
            .transpose()?;
        if restore.is_some() {
            self.criu_ready().await?;
        }
        request.stdio.check()?;
        let process = spec.process().as_ref().ok_or_else(|| {
            Error::InvalidArgument("the bundle's config.json has no process".into())
        })?;
        let init_spec = spec_of(process);
        let base_process = serde_json::to_value(process)
            .map_err(|e| Error::Internal(format!("encode the bundle's process: {e}")))?;

        let reservation = self.reserve(&request.id)?;

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
        reservation.commit(Arc::clone(&container));
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
    pub(super) fn watch_init(self: &Arc<Self>, container: Arc<Container>) {
        let supervisor = Arc::clone(self);
        tokio::spawn(async move {
            let status = container.init.tracked.wait().await;
            supervisor.init_exited(&container, status).await;
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
    pub(super) async fn delete_from_runtime(&self, id: &str) {
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
        self.forget(container);
        if let Err(e) = self.store.remove(id) {
            tracing::error!(id = %id, error = %e, "could not remove the state file");
        }
        self.events.publish(id, pid, EventKind::Exit { status });
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
