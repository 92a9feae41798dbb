//! AddProcess: starting another process in a running container with `runtime exec` (what
//! happens when it exits is exit's).
//!
//! Owns: the process JSON an added process runs with (the bundle's process with the request's
//! args, env, cwd, user and terminal) and the order of exec (check, write, run, track, register,
//! publish). Does not own: the argv (runtime), the stdio paths (stdio).

use std::path::{Path, PathBuf};
use std::sync::Arc;

use super::Supervisor;
use super::create::spec_of;
use super::operation::Undo;
use super::registry::{Container, Process, Status};
use super::scratch::{ScratchFiles, read_pid_file};
use super::stdio::{self, CONSOLE_TIMEOUT, StdioPaths, process_stdio};
use super::validate::UidMap;
use crate::error::{Error, Result};
use crate::events::EventKind;
use crate::model::ProcessSpec;
use crate::procfs::process_start_time;
use crate::runtime::{Asker, Operation};
use crate::store::TerminalPaths;

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
    /// `--max-process-spec-bytes`, which args, env, cwd and additional gids must fit.
    pub max_spec_bytes: usize,
    /// `--max-processes-per-container`: added processes running in the container at once.
    pub max_processes: usize,
    /// What the specs of all the container's processes may come to ([`Container::spec_bytes`]),
    /// so its State still fits in a message.
    pub max_container_spec_bytes: usize,
}

impl Supervisor {
    /// Starts an added process in a running container; returns its host pid. The exec is the
    /// supervisor's: a caller that goes away changes nothing about its outcome, and a failure
    /// after the runtime started the process kills and reaps it.
    pub(crate) async fn exec(self: &Arc<Self>, request: ExecRequest) -> Result<u32> {
        let uid = request.stdio.caller()?.peer.uid;
        let supervisor = Arc::clone(self);
        self.owned(uid, async move { supervisor.exec_owned(request).await })
            .await
    }

    async fn exec_owned(self: &Arc<Self>, request: ExecRequest) -> Result<u32> {
        // The request's own fields first: malformed input is that on any id.
        if request.args.is_empty() {
            return Err(Error::InvalidArgument(
                "args is empty: give the program to run and its arguments".into(),
            ));
        }
        let gids = request
            .user
            .as_ref()
            .map_or(&[][..], |u| &u.additional_gids);
        if let Some(user) = &request.user {
            super::validate::user("", user.uid, user.gid, gids)?;
        }
        super::validate::process(
            "",
            &request.args,
            &request.env,
            &request.cwd,
            gids,
            request.max_spec_bytes,
        )?;
        request.stdio.check()?;
        let container = self.container(&request.id)?;
        let _operations = container.operations.lock().await;
        if container.lock().status == Status::Paused {
            return Err(Error::FailedPrecondition(format!(
                "container {} is paused; resume it before adding a process",
                container.id
            )));
        }
        let (process_json, spec) = added_process(&container.base_process, &request)?;
        within_container_limits(&container, &spec, &request)?;
        let pid_file = self.exec_pid_path(&container.id);
        let started = self
            .exec_started(&container, &request, spec, process_json, &pid_file)
            .await;
        // Removed once the exec has ended, either way, and not when berthd stops with it in
        // flight: the next start then finds the process the runtime may have started.
        let _ = std::fs::remove_file(&pid_file);
        started
    }

    /// The part of exec that runs the runtime with `pid_file`: from the process's spec to its
    /// record.
    async fn exec_started(
        self: &Arc<Self>,
        container: &Arc<Container>,
        request: &ExecRequest,
        spec: ProcessSpec,
        process_json: Vec<u8>,
        pid_file: &Path,
    ) -> Result<u32> {
        let process_file = self.scratch_path(".json");
        let _scratch = ScratchFiles(vec![process_file.clone()]);
        std::fs::write(&process_file, process_json).map_err(|e| Error::io(&process_file, e))?;
        let console = spec
            .terminal
            .then(|| stdio::ConsoleSocket::bind(self.scratch_path(".sock")))
            .transpose()?;
        let asker = Asker::Uid(request.stdio.caller()?.peer.uid);
        let mut undo = Undo::new(self, &container.id, asker);
        let exec = Operation::Exec {
            id: &container.id,
            process: &process_file,
            pid_file,
            console_socket: console.as_ref().map(|c| c.path()),
        };
        let started = self
            .exec_steps(
                exec,
                &container.id,
                pid_file,
                &request.stdio,
                (spec.uid, container.init.pid()),
                console.as_ref(),
                &mut undo,
            )
            .await;
        if let Err(e) = started {
            let e = container.exit_seen_by_the_runtime(e, || {
                format!(
                    "container {} has exited; no process can be added to it",
                    container.id
                )
            });
            return Err(undo.undo(e).await);
        }
        let (Some(tracked), _) = undo.keep() else {
            return Err(Error::Internal(format!(
                "exec in {} finished without its process",
                container.id
            )));
        };
        let pid = tracked.pid() as u32;
        let terminal = spec.terminal.then(|| TerminalPaths {
            stdin: request.stdio.stdin.clone(),
            stdout: request.stdio.stdout.clone(),
            console: request.stdio.console.clone(),
            named_by: request.stdio.named_by(),
        });
        let start_time = process_start_time(pid).unwrap_or(0);
        let process = Arc::new(Process::new(tracked, spec.clone(), start_time, terminal));
        container.lock().added.push(Arc::clone(&process));
        let saved = self.save_flushed(container);
        self.events.publish(
            &container.id,
            pid,
            EventKind::StartProcess { process: spec },
        );
        self.watch_process(Arc::clone(container), Arc::clone(&process));
        // Answer once the record holds the process: a berthd that dies now still finds it.
        self.recorded_or_killed(&container.id, saved, &process.tracked, || {
            format!("process {pid} of container {}", container.id)
        })
        .await?;
        Ok(pid)
    }

    /// The steps of exec that leave something behind, each recorded in `undo`: the runtime
    /// starts the process, berthd tracks it and relays its pty. `uid` is the process's user,
    /// `init` the container's init, whose user namespace is the process's.
    // The operation and what it names, the stdio and who the process is: a struct of them
    // would only restate this list.
    #[allow(clippy::too_many_arguments)]
    async fn exec_steps(
        &self,
        exec: Operation<'_>,
        id: &str,
        pid_file: &Path,
        paths: &StdioPaths,
        (uid, init): (u32, u32),
        console: Option<&stdio::ConsoleSocket>,
        undo: &mut Undo<'_>,
    ) -> Result<()> {
        let asker = undo.asker();
        let stdio = process_stdio(paths, console.is_some()).await?;
        paths.refuse_a_file_taken(&stdio, false, uid, || {
            crate::procfs::process_uid_map(init).map_or(UidMap::Unknown, UidMap::of_ranges)
        })?;
        let relay_ends = match console {
            Some(_) => Some(stdio::relay_ends(paths).await?),
            None => None,
        };
        // As for an init (see create): the process may be a zombie by the time the runtime
        // returns, and the orphan sweep must leave it to `track`. Held until the process is
        // tracked or gone, so its pid cannot be reused meanwhile.
        let _claim = self.reaper.claim(pid_file);
        let ran = async {
            match console {
                Some(console) => {
                    // runc sends the master before it returns, so receive while it runs; a
                    // runtime that fails before it connects is answered at once, not after the
                    // timeout. The receive's time starts with the runtime, not before its turn.
                    let turn = self.runtime.turn(&exec, asker).await;
                    let run = self.runtime.run_in_turn(turn, exec, stdio);
                    let receive = console.receive_master(CONSOLE_TIMEOUT);
                    tokio::pin!(run, receive);
                    let master = tokio::select! {
                        ran = &mut run => {
                            ran?;
                            receive.await
                        }
                        master = &mut receive => {
                            run.await?;
                            master
                        }
                    };
                    Ok(Some(master))
                }
                None => self
                    .runtime
                    .run_with_stdio(exec, stdio, asker)
                    .await
                    .map(|_| None),
            }
        }
        .await;
        let master = match ran {
            Ok(master) => master,
            Err(e) => {
                // A runtime that failed after it started the process (killed at its timeout,
                // an error after its pid file) leaves it running in the container, where no
                // delete would find it.
                if let Ok(pid) = read_pid_file(pid_file) {
                    self.take_back(pid, undo).await;
                }
                return Err(e);
            }
        };
        let pid = read_pid_file(pid_file)?;
        self.take_back_or_track(pid, undo).await?;
        if let (Some(master), Some(ends)) = (master, relay_ends) {
            undo.relay(self.relay_terminal(id, pid as u32, master?, ends)?);
        }
        Ok(())
    }
}

/// Refuses a process past the container's limits: how many added processes may run in it at
/// once, and what all its processes' specs may come to. Checked under the container's
/// operations lock, so two AddProcess requests cannot both take the last place.
fn within_container_limits(
    container: &Container,
    spec: &ProcessSpec,
    request: &ExecRequest,
) -> Result<()> {
    let (added, bytes) = {
        let mutable = container.lock();
        (mutable.added.len(), container.spec_bytes(&mutable))
    };
    if added >= request.max_processes {
        return Err(Error::ResourceExhausted(format!(
            "container {} already runs {added} added processes, the most --max-processes-per-container allows; wait for one to exit",
            container.id
        )));
    }
    let after = bytes + Container::process_bytes(spec);
    if after > request.max_container_spec_bytes {
        return Err(Error::ResourceExhausted(format!(
            "container {}'s processes would come to {after} bytes of args, env, cwd and groups, more than its State can answer (two thirds of --max-message-bytes, {}); wait for one to exit or give this one less",
            container.id, request.max_container_spec_bytes
        )));
    }
    Ok(())
}

impl Supervisor {
    /// Tracks the started process `pid` in `undo`; if it cannot be tracked (no descriptor
    /// left), kills and reaps it instead and says why. Called while its pid is claimed.
    async fn take_back_or_track(&self, pid: i32, undo: &mut Undo<'_>) -> Result<()> {
        match self.reaper.track(pid) {
            Ok(tracked) => {
                undo.started(pid);
                undo.tracked(tracked);
                Ok(())
            }
            Err(e) => {
                kill_and_reap(pid).await;
                Err(e)
            }
        }
    }

    /// Leaves the started process `pid` to `undo` to kill and reap, or kills and reaps it now.
    async fn take_back(&self, pid: i32, undo: &mut Undo<'_>) {
        if let Err(e) = self.take_back_or_track(pid, undo).await {
            tracing::debug!(pid, error = %e, "a failed exec's process, not tracked, was killed");
        }
    }
}

/// Kills berthd's child `pid` and waits for it off the reactor. Only while its pid is claimed:
/// unreaped, it cannot have been reused.
async fn kill_and_reap(pid: i32) {
    let Some(pid) = rustix::process::Pid::from_raw(pid) else {
        return;
    };
    if let Err(e) = rustix::process::kill_process(pid, rustix::process::Signal::KILL) {
        tracing::warn!(pid = pid.as_raw_nonzero().get(), error = %e, "could not kill a failed exec's process");
        return;
    }
    let reaped = tokio::task::spawn_blocking(move || {
        rustix::process::waitpid(Some(pid), rustix::process::WaitOptions::empty())
    })
    .await;
    if !matches!(reaped, Ok(Ok(_))) {
        tracing::warn!(
            pid = pid.as_raw_nonzero().get(),
            "a failed exec's killed process was not reaped"
        );
    }
}

/// The process JSON for `runtime exec --process`: the bundle's process (capabilities, rlimits,
/// security settings) with the request's args, env, cwd, user and terminal.
fn added_process(
    base: &oci_spec::runtime::Process,
    request: &ExecRequest,
) -> Result<(Vec<u8>, ProcessSpec)> {
    let mut process = base.clone();
    process.set_args(Some(request.args.clone()));
    if !request.env.is_empty() {
        process.set_env(Some(request.env.clone()));
    }
    if !request.cwd.is_empty() {
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

    fn base() -> oci_spec::runtime::Process {
        serde_json::from_value(serde_json::json!({
            "terminal": true,
            "consoleSize": {"height": 24, "width": 80},
            "user": {"uid": 1000, "gid": 1000},
            "args": ["sh"],
            "env": ["PATH=/bin", "TERM=xterm"],
            "cwd": "/srv",
            "capabilities": {"bounding": ["CAP_KILL"], "effective": ["CAP_KILL"], "permitted": ["CAP_KILL"]},
            "noNewPrivileges": true
        }))
        .unwrap()
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
            max_spec_bytes: 1024,
            max_processes: 8,
            max_container_spec_bytes: 4096,
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
    }
}
