//! Taking containers back after berthd restarts (stop, crash, kill -9) or upgrades in place:
//! adopting the ones still running, reporting the ones that ended while berthd was away,
//! removing runtime leftovers of requests that never finished (a container half created, the
//! process of an exec no record holds), and giving back the checkpoints those requests held.
//! Does not own: telling a process from a later one with its pid (reaper), the state files
//! (store).

use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use super::registry::{Container, Mutable, Process, Status};
use super::scratch::{ScratchFiles, exec_pid_file_container};
use super::{StdioPaths, Supervisor, validate};
use crate::client_fs::Peer;
use crate::error::{Error, Result};
use crate::events::EventKind;
use crate::reaper::UNKNOWN_EXIT;
use crate::runtime::{Asker, Operation, SpawnStdio};
use crate::store::{ContainerRecord, ProcessRecord};

/// Bundle configs restart reads at once.
const RECOVERY_READS: usize = 16;

/// What a recovery found, for the start-up log.
#[derive(Debug, Default)]
pub struct Recovery {
    pub adopted: usize,
    pub ended: usize,
    pub leftovers: usize,
    pub took: Duration,
}

impl Supervisor {
    /// Adopts every container recorded in the state directory whose init is still the process
    /// that was started, and reports the others with an `exit` of unknown status. Runs before
    /// berthd serves and before its orphan sweep starts, so no status can be reaped from under
    /// it. The `live` and `exit` events it makes are replayed to subscribers for `replay`.
    pub async fn recover(self: &Arc<Self>, replay: Duration) -> Result<Recovery> {
        let started = Instant::now();
        let mut recovery = Recovery::default();
        let listing = self.runtime_statuses().await;
        let listed_whole = listing.is_some();
        let listed = listing.unwrap_or_default();
        let records = self.store.load_all()?;
        let base_processes = self.recorded_processes(&records).await;
        for (record, base_process) in records.iter().zip(base_processes) {
            if let Err(e) = validate::container_id(&record.id) {
                tracing::error!(error = %e, "state file with an invalid id skipped");
                continue;
            }
            let confirmed = self.confirmed(record, listed.get(&record.id));
            // A live runtime container the record does not match is not the record's to kill.
            let unmatched_live = confirmed.is_err()
                && listed
                    .get(&record.id)
                    .is_some_and(|l| l.status != "stopped");
            let init = match confirmed {
                // A container the runtime lists as stopped, or not at all, simply ended.
                Err(why) if unmatched_live => {
                    tracing::warn!(id = %record.id, pid = record.init.pid, why, "the runtime does not confirm this record; not adopted");
                    Ok(None)
                }
                Err(why) => {
                    tracing::debug!(id = %record.id, pid = record.init.pid, why, "the runtime does not confirm this record; not adopted");
                    Ok(None)
                }
                Ok(()) => self
                    .reaper
                    .adopt(record.init.pid as i32, record.init.start_time),
            };
            let init = match init {
                Ok(init) => init,
                Err(e) => {
                    tracing::error!(id = %record.id, error = %e, "could not adopt; left as it is");
                    continue;
                }
            };
            match init {
                Some(init) => {
                    let status = match listed.get(&record.id).map(|l| l.status.as_str()) {
                        Some("paused") => Status::Paused,
                        _ => Status::Running,
                    };
                    self.adopt(record, init, status, base_process, replay).await;
                    recovery.adopted += 1;
                }
                None => {
                    if unmatched_live {
                        tracing::error!(id = %record.id, "a live runtime container of this id does not match its record; left running for an operator (runtime delete --force to remove it)");
                    } else {
                        tracing::info!(id = %record.id, pid = record.init.pid, "container ended while berthd was down");
                        self.delete_from_runtime(&record.id, Asker::Berthd).await;
                    }
                    // An upgrade leaves the exits of its last moments uncollected: their
                    // statuses are still berthd's to read.
                    let status = if unmatched_live {
                        None
                    } else {
                        self.reaper
                            .collect_ended(record.init.pid as i32, record.init.start_time)
                    };
                    self.store.remove(&record.id);
                    self.events.record_recovery(
                        &record.id,
                        record.init.pid,
                        EventKind::Exit {
                            status: status.unwrap_or(UNKNOWN_EXIT),
                        },
                        replay,
                    );
                    recovery.ended += 1;
                }
            }
        }
        for id in listed.keys() {
            if !records.iter().any(|r| &r.id == id) {
                tracing::info!(id = %id, "removing a runtime container no request finished creating");
                self.delete_from_runtime(id, Asker::Berthd).await;
                recovery.leftovers += 1;
            }
        }
        recovery.leftovers += self.kill_cut_off_execs(&records);
        // Only from a whole listing: any container it failed to name would lose its state.
        if listed_whole {
            self.remove_stateless_runtime_dirs(&listed).await;
        }
        // After the leftovers: a restore cut off by the crash is gone, with its CRIU (the spawn
        // helper kills a dump or restore once berthd is gone), before its checkpoint is given
        // back.
        self.give_back_held_checkpoints().await;
        // The records of containers that ended are gone, and those adopted rewritten, before
        // anyone is served.
        self.store.flush().await;
        for (id, pid) in crate::upgrade::close_unclaimed_terminals() {
            tracing::info!(id = %id, pid, "closed a handed-over pty master no adopted container claimed");
        }
        for (stream, pid) in crate::upgrade::close_unclaimed_stdio() {
            tracing::info!(stream = %stream, pid, "closed a handed-over stdio pipe or FIFO no adopted container claimed");
        }
        recovery.took = started.elapsed();
        Ok(recovery)
    }

    /// Kills the processes of execs cut off by the death of the berthd that asked for them: the
    /// runtime started them (their pid files say so), but no record holds them and no client
    /// was given their pids, so nothing would ever track, signal or report them. Only a process
    /// an exec pid file names, in its adopted container's cgroups, held by none of `records`,
    /// whose parent is outside the container (the container's own processes have theirs
    /// inside), and started no later than the file was written (a later process with its pid
    /// is not it). Every exec pid file is removed. Returns how many were killed.
    fn kill_cut_off_execs(&self, records: &[ContainerRecord]) -> usize {
        let files = match std::fs::read_dir(&self.exec_pids) {
            Ok(files) => files,
            Err(e) => {
                tracing::warn!(dir = %self.exec_pids.display(), error = %e, "the pid files of execs cut off by a crash were not looked at");
                return 0;
            }
        };
        let mut killed = 0;
        for file in files.flatten() {
            let path = file.path();
            if let Some((id, pid)) = self.cut_off_exec(&path, records) {
                match pid.signal(libc::SIGKILL) {
                    Ok(()) => {
                        tracing::warn!(
                            id,
                            pid = pid.pid(),
                            "killed the process of an exec cut off when berthd died: no record holds it and no client was given its pid"
                        );
                        killed += 1;
                    }
                    Err(e) => tracing::debug!(id, error = %e, "an exec cut off by a crash"),
                }
            }
            if let Err(e) = std::fs::remove_file(&path) {
                tracing::warn!(path = %path.display(), error = %e, "an exec pid file stays");
            }
        }
        killed
    }

    /// The container and the process of the exec pid file `path` if that process is one
    /// [`Self::kill_cut_off_execs`] kills.
    fn cut_off_exec(
        &self,
        path: &Path,
        records: &[ContainerRecord],
    ) -> Option<(String, crate::reaper::TrackedProcess)> {
        let id = exec_pid_file_container(path.file_name()?.to_str()?)?;
        let container = self.container(id).ok()?;
        let pid = crate::reaper::read_pid_file(path).ok()?? as u32;
        let written = std::fs::symlink_metadata(path).ok()?.modified().ok()?;
        let init = container.init.pid();
        let recorded = records
            .iter()
            .filter(|r| r.id == id)
            .any(|r| r.init.pid == pid || r.processes.iter().any(|p| p.pid == pid));
        if recorded || !same_cgroup(init, pid) {
            return None;
        }
        let parent = crate::procfs::process_parent(pid).ok()?;
        if same_cgroup(init, parent) {
            return None;
        }
        let started = crate::procfs::process_start_time(pid).ok()?;
        // A tick of slack: the two clocks are read apart, and each is cut to a tick.
        if started > crate::procfs::ticks_since_boot(written)? + 1 {
            return None;
        }
        // Checked again through its pidfd: the process it opens started then.
        let process = self.reaper.adopt(pid as i32, started).ok()??;
        Some((id.to_owned(), process))
    }

    /// Resumes relaying the terminal of process `pid` of container `id` to its recorded `stdio`
    /// if the image before this one handed its pty master over (an upgrade), and says whether
    /// it did. After a restart the master is gone: the process runs on, its terminal unrelayed.
    async fn resume_terminal(&self, id: &str, pid: u32, stdio: &StdioPaths) -> bool {
        let Some(master) = crate::upgrade::claim_terminal(id, pid) else {
            tracing::warn!(
                id,
                pid,
                "terminal lost: its pty master did not survive berthd's restart, so the process runs on with nothing relaying its terminal"
            );
            return false;
        };
        // The paths come from berthd's own record; they are opened as the client who named them
        // may, with the checks every stdio path gets (FIFO, /dev/null or regular file, never in
        // the state dir), off the reactor within the client-file bound: one on a mount that
        // hangs keeps berthd from serving no longer than that.
        let opened = match &stdio.caller {
            Some(caller) => {
                let paths = stdio.clone();
                caller
                    .off_reactor("reopening a terminal's paths", move || paths.open_relay())
                    .await
            }
            None => stdio.open_relay(),
        };
        match opened.and_then(|ends| self.relay_terminal(id, pid, master, ends)) {
            Ok(_) => {
                tracing::info!(id, pid, "terminal resumed from the pty master handed over");
                true
            }
            Err(e) => {
                tracing::warn!(id, pid, error = %e, "terminal lost: the handed-over pty master could not be relayed");
                false
            }
        }
    }

    /// Gives back the checkpoint directories a berthd killed while holding them left behind,
    /// before any request may hold one; bounded as a client file is (one on a hung mount
    /// finishes in the background).
    async fn give_back_held_checkpoints(&self) {
        let ledger = self.held_ledger.clone();
        let caller = self.caller(Peer::root());
        let given = caller
            .off_reactor(
                "giving back the checkpoints held when berthd stopped",
                move || {
                    ledger.give_back_all();
                    Ok(())
                },
            )
            .await;
        if let Err(e) = given {
            tracing::warn!(error = %e, "checkpoints held when berthd stopped are not all given back yet");
        }
    }

    /// Whether the runtime confirms `record`: it holds a live container of that id, with that
    /// init pid, from that bundle (or berthd's copy of its spec). A record the runtime does not
    /// confirm is never adopted, so a forged or stale record cannot make berthd signal a
    /// process that is not its container's.
    fn confirmed(&self, record: &ContainerRecord, listed: Option<&Listed>) -> Result<(), String> {
        let Some(listed) = listed else {
            return Err("the runtime holds no container of this id".into());
        };
        if listed.status == "stopped" || listed.pid != record.init.pid {
            return Err(format!(
                "the runtime reports init pid {} ({}), the record {}",
                listed.pid, listed.status, record.init.pid
            ));
        }
        // Its spec for the runtime since berthd wrote one; the client's bundle before.
        let given = self.runtime.binary().config_dir(&record.id);
        if listed.bundle != given && listed.bundle != record.bundle {
            return Err(format!(
                "the runtime reports bundle {}, the record {}",
                listed.bundle.display(),
                record.bundle.display()
            ));
        }
        Ok(())
    }

    /// The bundle's process of each record, in order: [`RECOVERY_READS`] at a time (all at
    /// once took more places than a uid has for trips off the reactor, and the reads refused
    /// fell back to the recorded process), all within two of the client file bound, so a mount
    /// that hangs costs that much in all, not a bound for each of its records. A record not
    /// read by then has its recorded process.
    async fn recorded_processes(
        &self,
        records: &[ContainerRecord],
    ) -> Vec<oci_spec::runtime::Process> {
        use futures_util::StreamExt;
        let deadline = tokio::time::Instant::now() + 2 * self.client_files.timeout;
        let mut read: Vec<Option<oci_spec::runtime::Process>> = vec![None; records.len()];
        let mut waiting = records.iter().enumerate();
        let mut reading = futures_util::stream::FuturesUnordered::new();
        loop {
            while reading.len() < RECOVERY_READS
                && let Some((at, record)) = waiting.next()
            {
                reading.push(async move { (at, self.recorded_process(record).await) });
            }
            match tokio::time::timeout_at(deadline, reading.next()).await {
                Ok(Some((at, process))) => read[at] = Some(process),
                Ok(None) | Err(_) => break,
            }
        }
        records
            .iter()
            .zip(read)
            .map(|(record, process)| {
                process.unwrap_or_else(|| {
                    tracing::warn!(id = %record.id, "bundle config not read within two of --client-file-timeout; added processes will run with the recorded process only, with no new privileges");
                    minimal_process(&record.init)
                })
            })
            .collect()
    }

    /// The bundle's process of a record, the base of later added processes: read as berthd
    /// reads any client's config (as the client who created the container may, no link,
    /// bounded size, off the reactor within a bound), or the recorded init's process when it
    /// cannot be.
    async fn recorded_process(&self, record: &ContainerRecord) -> oci_spec::runtime::Process {
        let caller = self.caller_named_by(record.named_by.as_ref());
        let path = record.bundle.display().to_string();
        match super::validate::bundle(&path, &caller).await {
            Ok(config) => config.process,
            Err(e) => {
                tracing::warn!(id = %record.id, error = %e, "bundle config unreadable; added processes will run with the recorded process only, with no new privileges");
                minimal_process(&record.init)
            }
        }
    }

    /// Every container the runtime holds, by id, or `None` when it could not list them. The
    /// list goes to a scratch file rather than through the spawn helper's capture, which is cut
    /// at 16 KiB (about 60 containers).
    async fn runtime_statuses(&self) -> Option<HashMap<String, Listed>> {
        let bytes = self
            .runtime_list()
            .await
            .map_err(|e| tracing::error!(error = %e, "could not list the runtime's containers"))
            .ok()?;
        // runc lists no containers as `null`.
        let listed = serde_json::from_slice::<Option<Vec<Listed>>>(&bytes)
            .map_err(
                |e| tracing::error!(error = %e, "could not parse the runtime's container list"),
            )
            .ok()?;
        Some(
            listed
                .unwrap_or_default()
                .into_iter()
                .map(|l| (l.id.clone(), l))
                .collect(),
        )
    }

    /// Removes the runtime's directories of creates and restores cut off by berthd's end before
    /// the runtime recorded their container (see `RuntimeBinary::remove_stateless_dirs`). Those
    /// too recent to tell from a create the previous berthd gave up on are looked at again once
    /// such a create is past the runtime bound, unless a request has taken their id meanwhile.
    async fn remove_stateless_runtime_dirs(self: &Arc<Self>, listed: &HashMap<String, Listed>) {
        let listed: HashSet<String> = listed.keys().cloned().collect();
        // The runtime lists every directory it recorded a container in.
        let (young, _) = self
            .remove_stateless_dirs_once(move |id| listed.contains(id))
            .await;
        if young.is_empty() {
            return;
        }
        tracing::info!(
            ids = ?young,
            "runtime directories of creates or restores cut off half-way are too recent to remove yet"
        );
        self.leftover_runtime_dirs().extend(young.iter().cloned());
        let supervisor = Arc::clone(self);
        tokio::spawn(async move {
            tokio::time::sleep(supervisor.runtime.timeout()).await;
            let candidates: HashSet<String> = young
                .iter()
                .filter(|id| !supervisor.holds_id(id))
                .cloned()
                .collect();
            let (still_young, finished) = supervisor
                .remove_stateless_dirs_once(move |id| !candidates.contains(id))
                .await;
            // A create the previous berthd gave up on that finished since made a container no
            // one was answered for and no record names: deleted, as the start deletes one it
            // finds, before its id is free again.
            for id in finished {
                tracing::warn!(id = %id, "a create cut off when berthd last stopped finished since; its container is deleted");
                supervisor.delete_from_runtime(&id, Asker::Berthd).await;
            }
            // Those still changing are left to the next start, and their creates to the
            // runtime's own answer: this refusal's "ask again then" would not come true.
            let mut leftovers = supervisor.leftover_runtime_dirs();
            for id in &young {
                leftovers.remove(id);
            }
            drop(leftovers);
            for id in still_young {
                tracing::warn!(id = %id, "a runtime directory no container is recorded in keeps changing; the next start looks at it again");
            }
        });
    }

    fn leftover_runtime_dirs(&self) -> std::sync::MutexGuard<'_, HashSet<String>> {
        self.leftover_runtime_dirs
            .lock()
            .expect("leftover runtime dirs lock poisoned")
    }

    /// Refuses a create of `id` while its runtime directory is one a create or restore cut off
    /// by berthd's last stop left and berthd has not removed yet: the runtime would say only
    /// that the container exists, which State denies.
    pub(super) fn refuse_a_leftover_id(&self, id: &str) -> Result<()> {
        if !self.leftover_runtime_dirs().contains(id) {
            return Ok(());
        }
        Err(Error::FailedPrecondition(format!(
            "the runtime still holds a directory for {id}, left by a create or restore cut off when berthd last stopped; berthd removes it once it has not changed for --runtime-timeout ({} s): ask again then",
            self.runtime.timeout().as_secs()
        )))
    }

    /// One pass of `RuntimeBinary::remove_stateless_dirs` over the ids `skipped` does not name,
    /// logged; returns the ids too recent to remove, and those the runtime has recorded a
    /// container in.
    async fn remove_stateless_dirs_once(
        &self,
        skipped: impl Fn(&str) -> bool + Send + 'static,
    ) -> (Vec<String>, Vec<String>) {
        let binary = self.runtime.binary().clone();
        let settled = self.runtime.timeout();
        let found =
            tokio::task::spawn_blocking(move || binary.remove_stateless_dirs(skipped, settled))
                .await;
        let found = match found {
            Ok(found) => found,
            Err(e) => {
                tracing::error!(error = %e, "the runtime's directories were not looked through");
                return (Vec::new(), Vec::new());
            }
        };
        for id in found.removed {
            tracing::info!(id = %id, "removed the runtime directory of a create or restore cut off half-way");
        }
        for why in found.left {
            tracing::warn!(
                why,
                "a runtime directory of a create or restore cut off half-way was left; remove it by hand"
            );
        }
        (found.young, found.recorded)
    }

    async fn runtime_list(&self) -> Result<Vec<u8>> {
        use std::os::unix::fs::OpenOptionsExt;
        let path = self.scratch_path(".list");
        let _scratch = ScratchFiles(vec![path.clone()]);
        let file = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&path)
            .map_err(|e| crate::error::Error::io(&path, e))?;
        let stdio = [
            SpawnStdio::Null,
            SpawnStdio::Fd(file.into()),
            SpawnStdio::Capture,
        ];
        self.runtime
            .run_with_stdio(Operation::List, stdio, Asker::Berthd)
            .await?;
        std::fs::read(&path).map_err(|e| crate::error::Error::io(&path, e))
    }

    async fn adopt(
        self: &Arc<Self>,
        record: &ContainerRecord,
        init: crate::reaper::TrackedProcess,
        status: Status,
        base_process: oci_spec::runtime::Process,
        replay: Duration,
    ) {
        let mut added = Vec::new();
        for process in &record.processes {
            let adopted = if same_cgroup(record.init.pid, process.pid) {
                self.reaper.adopt(process.pid as i32, process.start_time)
            } else {
                // One that is gone simply ended while berthd was away.
                if crate::procfs::process_start_time(process.pid).is_ok() {
                    tracing::warn!(id = %record.id, pid = process.pid, "recorded added process is not in its container's cgroup; not adopted");
                }
                Ok(None)
            };
            match adopted {
                Ok(Some(tracked)) => added.push(Arc::new(Process::new(
                    tracked,
                    process.spec.clone(),
                    process.start_time,
                    process.terminal.clone(),
                ))),
                Ok(None) | Err(_) => self.events.record_recovery(
                    &record.id,
                    process.pid,
                    EventKind::Exit {
                        status: UNKNOWN_EXIT,
                    },
                    replay,
                ),
            }
        }
        let stdio = StdioPaths {
            stdin: record.stdin.clone(),
            stdout: record.stdout.clone(),
            stderr: record.stderr.clone(),
            console: record.console.clone(),
            caller: Some(self.caller_named_by(record.named_by.as_ref())),
        };
        let live: Vec<u32> = std::iter::once(record.init.pid)
            .chain(added.iter().map(|p| p.pid()))
            .collect();
        let mut lost_terminals: Vec<u32> = record
            .lost_terminals
            .iter()
            .copied()
            .filter(|pid| live.contains(pid))
            .collect();
        if record.init.spec.terminal
            && !self
                .resume_terminal(&record.id, record.init.pid, &stdio)
                .await
        {
            lost_terminals.push(record.init.pid);
        }
        for process in added.iter().filter(|p| p.spec.terminal) {
            let resumed = match &process.terminal {
                Some(paths) => {
                    let paths = StdioPaths {
                        stdin: paths.stdin.clone(),
                        stdout: paths.stdout.clone(),
                        console: paths.console.clone(),
                        caller: Some(self.caller_named_by(paths.named_by.as_ref())),
                        ..StdioPaths::default()
                    };
                    self.resume_terminal(&record.id, process.pid(), &paths)
                        .await
                }
                None => {
                    tracing::warn!(
                        id = %record.id,
                        pid = process.pid(),
                        "terminal lost: this record does not hold the added process's stdio paths, so nothing relays its terminal"
                    );
                    false
                }
            };
            if !resumed {
                lost_terminals.push(process.pid());
            }
        }
        if let Err(e) = self
            .resume_pipe_relay(&record.id, record.init.pid, &stdio, record.pipes)
            .await
        {
            tracing::warn!(id = %record.id, error = %e, "stdio not relayed: the init's pipes could not be taken up again, so its output waits in them and then blocks it");
        }
        lost_terminals.sort_unstable();
        lost_terminals.dedup();
        let container = Arc::new(Container {
            id: record.id.clone(),
            bundle: record.bundle.clone(),
            stdio,
            base_process,
            init: Arc::new(Process::new(
                init,
                record.init.spec.clone(),
                record.init.start_time,
                None,
            )),
            lost_terminals,
            pipes: record.pipes,
            mutable: Mutex::new(Mutable {
                status,
                added: added.clone(),
                removed: false,
            }),
            operations: tokio::sync::Mutex::new(()),
        });
        self.save(&container);
        self.insert(Arc::clone(&container));
        match self.stats.register(&record.id, record.init.pid) {
            Ok(()) => self.stats.watch_oom(&record.id),
            Err(e) => {
                tracing::warn!(id = %record.id, error = %e, "no stats or OOM events for this adopted container")
            }
        }
        let live = EventKind::Live {
            bundle: record.bundle.display().to_string(),
        };
        self.events
            .record_recovery(&record.id, record.init.pid, live, replay);
        for process in added {
            self.watch_process(Arc::clone(&container), process);
        }
        self.watch_init(container);
    }
}

/// A container as `runtime list --format json` reports it.
#[derive(serde::Deserialize)]
struct Listed {
    id: String,
    pid: u32,
    status: String,
    bundle: PathBuf,
}

/// Whether `pid` is in the same cgroups as the init `init`, as every process `runtime exec`
/// starts is: a recorded added process elsewhere is not the container's.
fn same_cgroup(init: u32, pid: u32) -> bool {
    let cgroups = |pid: u32| {
        crate::procfs::process_cgroups(pid)
            .ok()
            .map(|(_, text)| text)
    };
    matches!((cgroups(init), cgroups(pid)), (Some(a), Some(b)) if a == b)
}

/// The process an added process starts from when the bundle can no longer be read: the init's
/// args, env, cwd and user as recorded, and none of the capabilities, rlimits or security
/// settings the record does not hold.
fn minimal_process(init: &ProcessRecord) -> oci_spec::runtime::Process {
    let mut user = oci_spec::runtime::User::default();
    user.set_uid(init.spec.uid);
    user.set_gid(init.spec.gid);
    user.set_additional_gids(Some(init.spec.additional_gids.clone()));
    let mut process = oci_spec::runtime::Process::default();
    process.set_args(Some(init.spec.args.clone()));
    process.set_env(Some(init.spec.env.clone()));
    process.set_cwd(PathBuf::from(&init.spec.cwd));
    process.set_user(user);
    process.set_terminal(Some(false));
    // What `Process::default` fills in beyond the above, cleared.
    process.set_console_size(None);
    process.set_capabilities(None);
    process.set_rlimits(None);
    // Fails closed: what the bundle allowed is not known, so no process gains privileges.
    process.set_no_new_privileges(Some(true));
    process.set_apparmor_profile(None);
    process.set_selinux_label(None);
    process.set_oom_score_adj(None);
    process.set_io_priority(None);
    process.set_scheduler(None);
    process.set_exec_cpu_affinity(None);
    process.set_command_line(None);
    process
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::ProcessSpec;

    #[test]
    fn the_minimal_process_is_the_inits_own_with_no_new_privileges() {
        let init = ProcessRecord {
            pid: 10,
            start_time: 99,
            spec: ProcessSpec {
                args: vec!["sleep".into(), "9".into()],
                env: vec!["A=1".into()],
                cwd: "/srv".into(),
                uid: 5,
                gid: 6,
                additional_gids: vec![7],
                terminal: true,
            },
            terminal: None,
        };
        assert_eq!(
            serde_json::to_value(minimal_process(&init)).unwrap(),
            serde_json::json!({
                "args": ["sleep", "9"],
                "env": ["A=1"],
                "cwd": "/srv",
                "user": {"uid": 5, "gid": 6, "additionalGids": [7]},
                "terminal": false,
                "noNewPrivileges": true,
            })
        );
    }
}
