//! Typed runtime operations and the one place they become argv for runc, crun or youki.
//!
//! Owns: the argv of every runtime invocation, how many run at once ([`turns`]), its timeout and
//! log file ([`log_files`]), turning a failed invocation into an error that carries the
//! runtime's own message (from its JSON log, which it then empties; a successful invocation's
//! log is the spawner's to empty), and the [`Spawner`] interface with what it takes ([`SpawnStdio`], [`SpawnOptions`])
//! and returns ([`Completion`]); with `--runtime builtin`, the same operations as calls for the
//! built-in runtime ([`builtin`]); what runtime commands cut off half-way leave in the
//! runtime's root that the runtime itself would mishandle (a restore's `criu-root` mount, which
//! its delete would empty; a directory it recorded no container in, which it would never free).
//! Does not own: starting processes or decoding how they ended (the spawn helper implements
//! [`Spawner`]), or what the supervisor does with the result; whether CRIU works ([`criu`]).

pub mod builtin;
mod criu;
mod log_files;
mod turns;

use std::os::fd::OwnedFd;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use futures_util::future::BoxFuture;

use crate::error::{Error, Result};
use builtin::BuiltinCall;
use log_files::LogFiles;
pub(crate) use log_files::empty_if_written;
use turns::Turns;
pub(crate) use turns::{Asker, Turn};

/// One runtime invocation, with everything its argv needs.
#[derive(Debug, Clone, Copy)]
pub(crate) enum Operation<'a> {
    /// Create and start in one runtime process (`run --detach`): the create path of
    /// [`CreateMode::Run`].
    Run {
        id: &'a str,
        bundle: &'a Path,
        pid_file: &'a Path,
        console_socket: Option<&'a Path>,
    },
    Create {
        id: &'a str,
        bundle: &'a Path,
        pid_file: &'a Path,
        console_socket: Option<&'a Path>,
    },
    Start {
        id: &'a str,
    },
    Exec {
        id: &'a str,
        process: &'a Path,
        pid_file: &'a Path,
        console_socket: Option<&'a Path>,
    },
    Pause {
        id: &'a str,
    },
    Resume {
        id: &'a str,
    },
    Delete {
        id: &'a str,
    },
    /// Every container the runtime knows, as JSON.
    List,
    Checkpoint {
        id: &'a str,
        image: &'a Path,
        work: &'a Path,
        options: CriuOptions,
    },
    Restore {
        id: &'a str,
        bundle: &'a Path,
        image: &'a Path,
        work: &'a Path,
        pid_file: &'a Path,
        console_socket: Option<&'a Path>,
        options: CriuOptions,
    },
}

/// What CRIU may dump and restore, and whether the container keeps running after a dump.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) struct CriuOptions {
    pub leave_running: bool,
    pub tcp_established: bool,
    pub external_unix_sockets: bool,
    pub shell_job: bool,
}

impl CriuOptions {
    fn flags(&self) -> impl Iterator<Item = String> {
        [
            (self.tcp_established, "--tcp-established"),
            (self.external_unix_sockets, "--ext-unix-sk"),
            (self.shell_job, "--shell-job"),
        ]
        .into_iter()
        .filter(|(on, _)| *on)
        .map(|(_, flag)| flag.to_owned())
    }
}

impl Operation<'_> {
    pub fn name(&self) -> &'static str {
        match self {
            Operation::Run { .. } => "run",
            Operation::Create { .. } => "create",
            Operation::Start { .. } => "start",
            Operation::Exec { .. } => "exec",
            Operation::Pause { .. } => "pause",
            Operation::Resume { .. } => "resume",
            Operation::Delete { .. } => "delete",
            Operation::List => "list",
            Operation::Checkpoint { .. } => "checkpoint",
            Operation::Restore { .. } => "restore",
        }
    }

    /// Whether the runtime's stdio becomes the container process's stdio, so output cannot be
    /// captured and the error text must come from the log file.
    fn passes_stdio(&self) -> bool {
        matches!(
            self,
            Operation::Run { .. }
                | Operation::Create { .. }
                | Operation::Exec { .. }
                | Operation::Restore { .. }
        )
    }

    /// Whether the runtime must not go on once berthd's death cut it off
    /// ([`SpawnOptions::kill_if_berthd_dies`]): CRIU's dump or restore works in a checkpoint
    /// directory berthd holds for a client, which a restarted berthd gives back; the process an
    /// exec starts would run with nothing to track it and its client never given its pid.
    fn dies_with_berthd(&self) -> bool {
        matches!(
            self,
            Operation::Checkpoint { .. } | Operation::Restore { .. } | Operation::Exec { .. }
        )
    }
}

/// How CreateContainer runs the runtime for a new container (a restore always runs `restore`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CreateMode {
    /// One runtime process: `run --detach`. The init may have exited by the time berthd tracks
    /// it; the reaper's claim on the pid file keeps its status (see [`crate::reaper`]).
    Run,
    /// Two runtime processes: `create`, then `start` once the init is tracked. The init waits
    /// for `start` in the runtime's own code, so it is alive when it is tracked and its cgroup
    /// is read.
    CreateStart,
}

/// Where a runtime recorded a container's cgroup ([`Runtime::recorded_cgroup`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum RecordedCgroup {
    /// A directory per controller, `""` for the unified hierarchy (runc).
    Dirs(Vec<(String, PathBuf)>),
    /// One cgroup path, the same in every hierarchy (libcontainer).
    Path(PathBuf),
}

/// Whether `path` is a regular file someone may execute: what berthd asks of the runtime and
/// CRIU binaries it is given, before it runs either.
pub fn executable_file(path: &Path) -> bool {
    use std::os::unix::fs::PermissionsExt;
    std::fs::metadata(path).is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
}

/// The files in which runc and youki (`state.json`) and crun (`status`) record a container.
const RUNTIME_STATE_FILES: [&str; 2] = ["state.json", "status"];

/// Removes `dir`, a container's directory in the runtime's root, and what is in it, one level
/// deep: files, and directories once unmounted and empty (runc's restore bind-mounts the
/// bundle's rootfs at `criu-root`). Never recursive, so a client's file is never removed: what
/// is still a mount point or not empty is left, and said; so is a directory in which the
/// runtime has recorded its container meanwhile.
fn remove_stateless_dir(dir: &Path) -> std::result::Result<(), String> {
    use rustix::fs::{AtFlags, CWD, unlinkat};
    let entries = std::fs::read_dir(dir).map_err(|e| e.to_string())?;
    for entry in entries {
        let entry = entry.map_err(|e| e.to_string())?;
        let path = entry.path();
        if RUNTIME_STATE_FILES.iter().any(|f| entry.file_name() == *f) {
            return Err("the runtime recorded a container in it meanwhile".to_owned());
        }
        let is_dir = entry.file_type().is_ok_and(|t| t.is_dir());
        let flags = if is_dir {
            detach_mount(&path);
            AtFlags::REMOVEDIR
        } else {
            AtFlags::empty()
        };
        unlinkat(CWD, &path, flags).map_err(|e| format!("{}: {e}", path.display()))?;
    }
    unlinkat(CWD, dir, AtFlags::REMOVEDIR).map_err(|e| e.to_string())
}

/// Unmounts what is mounted at `path` in the runtime's root, lazily and without following a
/// link. Not a mount point (EINVAL) is the usual case, and nothing to undo.
fn detach_mount(path: &Path) {
    use rustix::mount::{UnmountFlags, unmount};
    let _ = unmount(path, UnmountFlags::DETACH | UnmountFlags::NOFOLLOW);
}

/// What [`RuntimeBinary::remove_stateless_dirs`] did with the directories no container was
/// recorded in.
#[derive(Debug, Default, PartialEq, Eq)]
pub(crate) struct StatelessDirs {
    /// The ids whose directory is removed.
    pub removed: Vec<String>,
    /// The ids whose directory changed too recently to be told from a create at work.
    pub young: Vec<String>,
    /// For each directory that could not be removed, why.
    pub left: Vec<String>,
    /// The ids not skipped whose directory the runtime has recorded a container in: on a look
    /// after the start, a create of the previous berthd that finished since.
    pub recorded: Vec<String>,
}

/// The runtime binary and where it keeps its state.
#[derive(Debug, Clone)]
pub struct RuntimeBinary {
    pub path: PathBuf,
    pub root: PathBuf,
    /// The CRIU binary runc checkpoints and restores with (its global `--criu`); `None` for
    /// `criu` in `PATH`.
    pub criu: Option<PathBuf>,
}

impl RuntimeBinary {
    /// Removes what runtime commands cut off half-way left in the runtime's root: a directory
    /// for an id that `listed` does not name and in which the runtime recorded no container (a
    /// create or restore cut off with berthd before the runtime wrote its state). The runtime
    /// would refuse that id for good ("already exists"), and berthd never asks it to delete an
    /// id it does not list. A directory changed within `settled` is only named (`young`): a
    /// create the previous berthd gave up on may still be at work in it (the spawn helper lets
    /// those run to their end).
    ///
    /// Blocks; call it off the reactor.
    pub(crate) fn remove_stateless_dirs(
        &self,
        listed: impl Fn(&str) -> bool,
        settled: std::time::Duration,
    ) -> StatelessDirs {
        let mut found = StatelessDirs::default();
        let entries = match std::fs::read_dir(&self.root) {
            Ok(entries) => entries,
            Err(e) => {
                found.left.push(format!("{}: {e}", self.root.display()));
                return found;
            }
        };
        for entry in entries.flatten() {
            let Some(id) = entry.file_name().to_str().map(str::to_owned) else {
                continue;
            };
            let dir = entry.path();
            let Ok(meta) = entry.metadata() else {
                continue;
            };
            let recorded = RUNTIME_STATE_FILES
                .iter()
                .any(|f| dir.join(f).symlink_metadata().is_ok());
            if !meta.is_dir() || listed(&id) {
                continue;
            }
            if recorded {
                found.recorded.push(id);
                continue;
            }
            let age = meta.modified().ok().and_then(|m| m.elapsed().ok());
            if age.is_none_or(|age| age < settled) {
                found.young.push(id);
                continue;
            }
            match remove_stateless_dir(&dir)
                .and_then(|()| self.remove_config(&id).map_err(|e| e.to_string()))
            {
                Ok(()) => found.removed.push(id),
                Err(why) => found.left.push(format!("{}: {why}", dir.display())),
            }
        }
        self.remove_unheld_configs(&listed, &mut found);
        found
    }

    /// Removes the specs for the runtime ([`RuntimeBinary::config_dir`]) of ids the runtime
    /// holds no directory for: a create cut off before the runtime made one. At once, however
    /// recent: a runtime command of the berthd that died that has yet to read its spec would
    /// make a container no berthd answered for, which a failed read spares.
    fn remove_unheld_configs(&self, listed: &impl Fn(&str) -> bool, found: &mut StatelessDirs) {
        let Ok(entries) = std::fs::read_dir(self.configs_root()) else {
            return;
        };
        for entry in entries.flatten() {
            let Some(id) = entry.file_name().to_str().map(str::to_owned) else {
                continue;
            };
            if listed(&id) || self.holds_dir(&id) {
                continue;
            }
            match self.remove_config(&id) {
                Ok(()) => found.removed.push(id),
                Err(e) => found.left.push(e.to_string()),
            }
        }
    }

    /// The bundle container `id`'s runtime is given: `<root>.configs/<id>`, holding the spec
    /// berthd checked as `config.json` (see `validate::runtime_config` in the supervisor). It
    /// stays while the runtime holds the container, for the hooks its delete runs.
    pub(crate) fn config_dir(&self, id: &str) -> PathBuf {
        self.configs_root().join(id)
    }

    /// Where the specs for the runtime are: `<root>.configs`.
    fn configs_root(&self) -> PathBuf {
        self.root.with_extension("configs")
    }

    /// Whether the runtime holds a directory for container `id` in its root.
    fn holds_dir(&self, id: &str) -> bool {
        self.root.join(id).symlink_metadata().is_ok()
    }

    /// Writes `config` as container `id`'s spec for the runtime, in place of any left there,
    /// beside a symbolic link to `<bundle>/<name>` for each of `names`: OCI hooks are given the
    /// copy as their bundle and run in it, and find the files beside the client's
    /// `config.json` there, as before (a relative hook path, a file a hook reads). Returns the
    /// bundle to give the runtime. Inline: a few calls in berthd's own state directory, as the
    /// create's pid file and console socket are made.
    pub(crate) fn write_config(
        &self,
        id: &str,
        config: &[u8],
        bundle: &Path,
        names: &[std::ffi::OsString],
    ) -> Result<PathBuf> {
        use std::io::Write;
        use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
        let dir = self.config_dir(id);
        self.remove_config(id)?;
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(&dir)
            .map_err(|e| Error::io(&dir, e))?;
        let path = dir.join("config.json");
        std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&path)
            .and_then(|mut file| file.write_all(config))
            .map_err(|e| Error::io(&path, e))?;
        for name in names {
            let link = dir.join(name);
            std::os::unix::fs::symlink(bundle.join(name), &link)
                .map_err(|e| Error::io(&link, e))?;
        }
        Ok(dir)
    }

    /// Removes container `id`'s spec for the runtime, if there is one, with whatever a hook
    /// (root, as the runtime runs it) put beside it: the directory is berthd's, no client's.
    pub(crate) fn remove_config(&self, id: &str) -> Result<()> {
        let dir = self.config_dir(id);
        match std::fs::remove_dir_all(&dir) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(Error::io(&dir, e)),
            _ => Ok(()),
        }
    }

    /// Unmounts the bundle's rootfs that runc's restore bind-mounts at `criu-root` in container
    /// `id`'s directory, left there when the restore was killed (by the runtime bound, or with
    /// berthd): runc's delete removes that directory and everything beneath it, as root, mounts
    /// included, and would empty the client's rootfs. Only berthd's state directory is looked
    /// up.
    pub(crate) fn unmount_restore_root(&self, id: &str) {
        detach_mount(&self.root.join(id).join("criu-root"));
    }

    /// Whether this is `--runtime builtin`: operations go to the spawn helper as
    /// [`BuiltinCall`]s, no binary is run.
    pub(crate) fn is_builtin(&self) -> bool {
        self.path == Path::new(builtin::BUILTIN)
    }

    /// The runtime's short name for messages: `runc`, `crun`, or the file name given.
    pub(crate) fn name(&self) -> String {
        self.path
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_else(|| self.path.display().to_string())
    }

    /// The full argv for `op`. runc, crun and youki share these flags; only runc takes `--criu`
    /// ([`RuntimeBinary::check_criu_flag`]).
    pub(crate) fn argv(&self, op: &Operation<'_>, log: &Path) -> Vec<String> {
        let path = |p: &Path| p.display().to_string();
        let mut argv = vec![
            path(&self.path),
            "--root".into(),
            path(&self.root),
            "--log".into(),
            path(log),
            "--log-format".into(),
            "json".into(),
        ];
        if let Some(criu) = &self.criu {
            argv.extend(["--criu".into(), path(criu)]);
        }
        argv.push(op.name().into());
        match *op {
            Operation::Run {
                id,
                bundle,
                pid_file,
                console_socket,
            } => {
                argv.push("--detach".into());
                argv.extend(["--bundle".into(), path(bundle)]);
                argv.extend(["--pid-file".into(), path(pid_file)]);
                if let Some(socket) = console_socket {
                    argv.extend(["--console-socket".into(), path(socket)]);
                }
                argv.push(id.into());
            }
            Operation::Create {
                id,
                bundle,
                pid_file,
                console_socket,
            } => {
                argv.extend(["--bundle".into(), path(bundle)]);
                argv.extend(["--pid-file".into(), path(pid_file)]);
                if let Some(socket) = console_socket {
                    argv.extend(["--console-socket".into(), path(socket)]);
                }
                argv.push(id.into());
            }
            Operation::Exec {
                id,
                process,
                pid_file,
                console_socket,
            } => {
                argv.push("--detach".into());
                argv.extend(["--pid-file".into(), path(pid_file)]);
                argv.extend(["--process".into(), path(process)]);
                if let Some(socket) = console_socket {
                    argv.extend(["--console-socket".into(), path(socket)]);
                }
                argv.push(id.into());
            }
            Operation::Delete { id } => {
                argv.extend(["--force".into(), id.into()]);
            }
            Operation::List => argv.extend(["--format".into(), "json".into()]),
            Operation::Checkpoint {
                id,
                image,
                work,
                options,
            } => {
                argv.extend(["--image-path".into(), path(image)]);
                argv.extend(["--work-path".into(), path(work)]);
                if options.leave_running {
                    argv.push("--leave-running".into());
                }
                argv.extend(options.flags());
                argv.push(id.into());
            }
            Operation::Restore {
                id,
                bundle,
                image,
                work,
                pid_file,
                console_socket,
                options,
            } => {
                argv.push("--detach".into());
                argv.extend(["--bundle".into(), path(bundle)]);
                argv.extend(["--image-path".into(), path(image)]);
                argv.extend(["--work-path".into(), path(work)]);
                argv.extend(["--pid-file".into(), path(pid_file)]);
                if let Some(socket) = console_socket {
                    argv.extend(["--console-socket".into(), path(socket)]);
                }
                argv.extend(options.flags());
                argv.push(id.into());
            }
            Operation::Start { id } | Operation::Pause { id } | Operation::Resume { id } => {
                argv.push(id.into())
            }
        }
        argv
    }
}

/// How a command is spawned, besides its argv and stdio.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SpawnOptions {
    /// The command (and its process group) is killed after this long.
    pub timeout: Duration,
    /// The log file the command writes, which the spawner empties once the command has exited
    /// 0 (nothing in it is wanted then, and the file goes to the next command). After any other
    /// ending it is left for the caller to read and empty.
    pub log: Option<PathBuf>,
    /// Killed with its process group (not what left it, such as restored tasks) if berthd dies
    /// or closes the spawn helper's socket while it runs. Other commands run to their end, and
    /// a restarted berthd removes what they leave (recovery's leftovers): a runtime killed
    /// half-way can leave what it cannot list, and so not delete.
    pub kill_if_berthd_dies: bool,
}

/// One stdio stream of a spawned command.
pub enum SpawnStdio {
    Null,
    Capture,
    Fd(OwnedFd),
}

impl SpawnStdio {
    /// No stdin; stdout and stderr captured: how berthd runs commands that have no container
    /// stdio.
    pub(crate) fn captured() -> [SpawnStdio; 3] {
        [SpawnStdio::Null, SpawnStdio::Capture, SpawnStdio::Capture]
    }
}

/// How a spawned command ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// The command ended with this exit code; `None` when its wait status was not an exit.
    Exited { code: Option<u32> },
    /// The command outlived its timeout and was killed.
    TimedOut,
    /// The command could not be started at all.
    SpawnFailed { error: String },
}

/// A spawned command that has ended, with what it wrote to its captured streams.
#[derive(Debug)]
pub struct Completion {
    pub pid: i32,
    pub outcome: Outcome,
    pub stdout: String,
    pub stderr: String,
}

/// Starts processes for the runtime; the spawn helper in berthd, a stub in unit tests.
pub trait Spawner: Send + Sync + 'static {
    /// Runs `argv` as `options` say.
    fn spawn(
        &self,
        argv: Vec<String>,
        stdio: [SpawnStdio; 3],
        options: SpawnOptions,
    ) -> BoxFuture<'_, Result<Completion>>;

    /// Carries out `call` with the built-in runtime, as `options` say. Spawners without one
    /// refuse.
    fn run_builtin(
        &self,
        call: BuiltinCall,
        stdio: [SpawnStdio; 3],
        options: SpawnOptions,
    ) -> BoxFuture<'_, Result<Completion>> {
        let _ = (call, stdio, options);
        Box::pin(async {
            Err(Error::FailedPrecondition(
                "this spawner has no built-in runtime".into(),
            ))
        })
    }
}

/// Runs typed operations through a spawner, with a timeout and the runtime's errors.
pub struct Runtime {
    binary: RuntimeBinary,
    spawner: Arc<dyn Spawner>,
    timeout: Duration,
    logs: LogFiles,
    criu: criu::Criu,
    create_mode: CreateMode,
    turns: Turns,
}

impl Runtime {
    pub fn new(
        binary: RuntimeBinary,
        spawner: Arc<dyn Spawner>,
        timeout: Duration,
        log_dir: PathBuf,
    ) -> Self {
        Runtime {
            criu: criu::Criu::new(binary.criu.clone()),
            binary,
            spawner,
            timeout,
            logs: LogFiles::new(log_dir, crate::procfs::first_scratch_number()),
            create_mode: CreateMode::Run,
            turns: Turns::new(Turns::per_cpu(
                std::thread::available_parallelism().map_or(1, |n| n.get()),
            )),
        }
    }

    /// Runs at most `most` runtime commands at once instead of the default, four per CPU
    /// ([`turns`]).
    pub fn with_max_processes(self, most: usize) -> Self {
        Runtime {
            turns: Turns::new(most),
            ..self
        }
    }

    /// Creates containers with `mode` instead of the default, [`CreateMode::Run`].
    pub fn with_create_mode(self, mode: CreateMode) -> Self {
        Runtime {
            create_mode: mode,
            ..self
        }
    }

    pub(crate) fn create_mode(&self) -> CreateMode {
        self.create_mode
    }

    pub(crate) fn binary(&self) -> &RuntimeBinary {
        &self.binary
    }

    /// How long a runtime command may run before it is killed.
    pub(crate) fn timeout(&self) -> Duration {
        self.timeout
    }

    /// Ok when CRIU passed `criu check` on this host (run once, on the first call); else
    /// FAILED_PRECONDITION with the check's own message.
    pub(crate) async fn criu_ready(&self) -> Result<()> {
        if self.binary.is_builtin() {
            return Err(builtin::needs_binary());
        }
        self.criu.ready(&self.spawner).await
    }

    /// Where the runtime recorded container `id`'s cgroup: runc's directories by controller
    /// (`""` for the unified hierarchy) from the `cgroup_paths` of its `state.json`, or the one
    /// path libcontainer gives every controller, from its `youki_config.json`. For a container
    /// whose init has already exited: a zombie's `/proc/<pid>/cgroup` names the root of every
    /// v1 hierarchy, not the cgroup it ran in.
    pub(crate) async fn recorded_cgroup(&self, id: &str) -> Result<RecordedCgroup> {
        #[derive(serde::Deserialize)]
        struct RuncState {
            #[serde(default)]
            cgroup_paths: std::collections::HashMap<String, PathBuf>,
        }
        #[derive(serde::Deserialize)]
        struct YoukiConfig {
            cgroup_path: PathBuf,
        }
        let builtin = self.binary.is_builtin();
        let file = if builtin {
            "youki_config.json"
        } else {
            "state.json"
        };
        let path = self.binary.root.join(id).join(file);
        let reading = path.clone();
        let text = tokio::task::spawn_blocking(move || std::fs::read(reading))
            .await
            .map_err(|e| Error::Internal(format!("read {}: {e}", path.display())))?
            .map_err(|e| Error::io(&path, e))?;
        let malformed = |e: serde_json::Error| Error::Internal(format!("{}: {e}", path.display()));
        if builtin {
            let config: YoukiConfig = serde_json::from_slice(&text).map_err(malformed)?;
            return Ok(RecordedCgroup::Path(config.cgroup_path));
        }
        let state: RuncState = serde_json::from_slice(&text).map_err(malformed)?;
        if state.cgroup_paths.is_empty() {
            return Err(Error::NotFound(format!(
                "{} names no cgroup paths ({} keeps them elsewhere)",
                path.display(),
                self.binary.name()
            )));
        }
        Ok(RecordedCgroup::Dirs(
            state.cgroup_paths.into_iter().collect(),
        ))
    }

    /// Runs `op` for `asker` with its output captured; returns its stdout.
    pub(crate) async fn run(&self, op: Operation<'_>, asker: Asker) -> Result<String> {
        self.run_with_stdio(op, SpawnStdio::captured(), asker).await
    }

    /// Runs `op` for `asker` with the given stdio (the container's, for create and exec), in
    /// one of the turns ([`turns`]).
    pub(crate) async fn run_with_stdio(
        &self,
        op: Operation<'_>,
        stdio: [SpawnStdio; 3],
        asker: Asker,
    ) -> Result<String> {
        let turn = self.turn(&op, asker).await;
        self.run_in_turn(turn, op, stdio).await
    }

    /// Waits for a turn to run `op` for `asker`: taken apart from the run where something
    /// timed beside the runtime (an exec's pty) must not count the wait.
    pub(crate) async fn turn(&self, op: &Operation<'_>, asker: Asker) -> Turn {
        let asked = std::time::Instant::now();
        let turn = self.turns.take(asker).await;
        crate::instruments::runtime_turn_wait(op.name(), asked.elapsed());
        turn
    }

    /// Removes container `id`'s spec for the runtime once the runtime holds no directory for
    /// it: whatever the delete's outcome, a container the runtime no longer has needs none.
    fn forget_config_once_deleted(&self, id: &str) {
        if self.binary.holds_dir(id) {
            return;
        }
        if let Err(e) = self.binary.remove_config(id) {
            tracing::warn!(id, error = %e, "the container's spec for the runtime stays");
        }
    }

    /// Runs `op` with the given stdio in `turn`.
    pub(crate) async fn run_in_turn(
        &self,
        turn: Turn,
        op: Operation<'_>,
        stdio: [SpawnStdio; 3],
    ) -> Result<String> {
        let log = self.logs.take();
        let what = format!("{} {}", self.binary.name(), op.name());
        let started = std::time::Instant::now();
        let options = SpawnOptions {
            timeout: self.timeout,
            log: Some(log.clone()),
            kill_if_berthd_dies: op.dies_with_berthd(),
        };
        let completion = if self.binary.is_builtin() {
            let call = BuiltinCall::new(&op, &self.binary.root, &log)?;
            tracing::debug!(?call, "runtime");
            Turns::hold(turn, self.spawner.run_builtin(call, stdio, options)).await
        } else {
            if let Operation::Delete { id } = op {
                self.binary.unmount_restore_root(id);
            }
            let argv = self.binary.argv(&op, &log);
            tracing::debug!(?argv, "runtime");
            Turns::hold(turn, self.spawner.spawn(argv, stdio, options)).await
        };
        crate::instruments::runtime_command(op.name(), started.elapsed());
        if let Operation::Delete { id } = op {
            self.forget_config_once_deleted(id);
        }
        let succeeded = matches!(
            completion,
            Ok(Completion {
                outcome: Outcome::Exited { code: Some(0) },
                ..
            })
        );
        // After a success the spawner has emptied the log. A command whose end is unknown (no
        // completion) may still write to its log: that file is not given back.
        let log_text = match &completion {
            Ok(_) if succeeded => {
                self.logs.give_back(log);
                String::new()
            }
            Ok(_) => {
                let (text, emptied) = log_files::take_text(log.clone()).await;
                if emptied {
                    self.logs.give_back(log);
                }
                text
            }
            Err(_) => String::new(),
        };
        let completion = completion?;
        match completion.outcome {
            Outcome::Exited { code } => {
                if code == Some(0) {
                    Ok(completion.stdout)
                } else {
                    let captured = if op.passes_stdio() {
                        ""
                    } else {
                        &completion.stderr
                    };
                    let message = failure_message(&log_text, captured, code);
                    // runc already says "runc create failed: ..."; say it once.
                    let message = match message.strip_prefix(&format!("{what} failed: ")) {
                        Some(rest) => rest.to_owned(),
                        None => message,
                    };
                    Err(Error::runtime(what, &message))
                }
            }
            Outcome::TimedOut => Err(Error::Timeout {
                what,
                secs: self.timeout.as_secs(),
            }),
            // berthd could not start the runtime at all: nothing the request asked was refused.
            Outcome::SpawnFailed { error } => {
                Err(Error::Internal(format!("could not start {what}: {error}")))
            }
        }
    }
}

/// The most useful line a failed runtime left: the last error in its JSON log, else the last
/// non-empty line of its stderr, else its exit status.
fn failure_message(log: &str, stderr: &str, status: Option<u32>) -> String {
    #[derive(serde::Deserialize)]
    struct LogLine {
        level: String,
        msg: String,
    }
    let from_log = log
        .lines()
        .rev()
        .filter_map(|line| serde_json::from_str::<LogLine>(line).ok())
        .find(|line| line.level == "error" || line.level == "fatal")
        .map(|line| line.msg);
    from_log
        .or_else(|| {
            stderr
                .lines()
                .rev()
                .map(str::trim)
                .find(|l| !l.is_empty())
                .map(str::to_owned)
        })
        .unwrap_or_else(|| match status {
            Some(code) => format!("exited with status {code} and no message"),
            None => "ended abnormally with no message".into(),
        })
}

#[cfg(test)]
mod tests;
