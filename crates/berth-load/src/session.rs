//! One load run's resources: its work directory, the shared busybox bundle, the berthd it
//! started, the runtime roots it used, and the cleanup that removes every container they hold,
//! whether the run finished, failed or was interrupted.

use std::collections::HashMap;
use std::fs::{self, File};
use std::os::unix::fs::symlink;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use berth_api::proto::SignalRequest;
use berth_api::proto::api_client::ApiClient;
use futures_util::{StreamExt, stream};
use tonic::transport::Channel;

use super::LoadError;
use super::procfs::children_of;

const BUSYBOX: &str = "/bin/busybox";
/// Applets the bundle's `sleep` container needs, plus a shell for poking at it by hand.
const APPLETS: &[&str] = &["sh", "sleep"];
/// Longest one runtime command may take before it is killed and counted as failed.
const RUNTIME_TIMEOUT: Duration = Duration::from_secs(120);
/// Runtime commands in flight while cleaning up.
const CLEANUP_CONCURRENCY: usize = 8;

/// An OCI runtime binary, run directly by a direct floor and by cleanup.
#[derive(Debug, Clone)]
pub struct Runtime {
    /// What is executed: a name looked up in `PATH`, or a path.
    pub program: PathBuf,
    /// What the output calls it: the program's file name.
    pub name: String,
}

impl Runtime {
    pub fn new(program: impl Into<PathBuf>) -> Runtime {
        let program = program.into();
        let name = program.file_name().map_or_else(
            || program.to_string_lossy().into_owned(),
            |name| name.to_string_lossy().into_owned(),
        );
        Runtime { program, name }
    }

    /// Runs `<runtime> --root <root> <args>` with stdin and stdout on /dev/null and stderr in
    /// `stderr` (a container started by `create` or `run -d` keeps these as its stdio, so a pipe
    /// would never reach end of file). Fails with the runtime's own error text.
    pub async fn run(&self, root: &Path, args: &[&str], stderr: &Path) -> Result<(), LoadError> {
        let what = || format!("{} {}", self.program.display(), args.join(" "));
        let err_file =
            File::create(stderr).map_err(|e| LoadError(format!("{}: {e}", stderr.display())))?;
        let mut child = tokio::process::Command::new(&self.program)
            .arg("--root")
            .arg(root)
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(err_file)
            .kill_on_drop(true)
            .spawn()
            .map_err(|e| LoadError(format!("{}: {e}", what())))?;
        let status = tokio::time::timeout(RUNTIME_TIMEOUT, child.wait())
            .await
            .map_err(|_| LoadError(format!("{} took longer than {RUNTIME_TIMEOUT:?}", what())))?
            .map_err(|e| LoadError(format!("{}: {e}", what())))?;
        if status.success() {
            return Ok(());
        }
        let text = fs::read_to_string(stderr).unwrap_or_default();
        Err(LoadError(format!(
            "{} failed ({status}): {}",
            what(),
            error_line(&text)
        )))
    }

    /// The ids of the containers under `root`.
    pub fn list(&self, root: &Path) -> Vec<String> {
        let out = Command::new(&self.program)
            .arg("--root")
            .arg(root)
            .args(["list", "-q"])
            .stderr(Stdio::null())
            .output();
        out.map(|out| listed_ids(&String::from_utf8_lossy(&out.stdout)))
            .unwrap_or_default()
    }

    /// The first line of `<runtime> --version`.
    pub fn version(&self) -> String {
        Command::new(&self.program)
            .arg("--version")
            .output()
            .ok()
            .and_then(|out| {
                let text = String::from_utf8_lossy(&out.stdout).into_owned();
                text.lines().next().map(str::to_owned)
            })
            .unwrap_or_else(|| format!("{} (version unknown)", self.name))
    }
}

/// The line of a runtime's stderr that says what failed: the last, or with a Rust runtime run
/// under RUST_BACKTRACE (youki), the last before anyhow's `Stack backtrace:`.
fn error_line(stderr: &str) -> &str {
    let message = stderr
        .split("\nStack backtrace:")
        .next()
        .unwrap_or_default();
    let last = message.lines().rev().find(|line| !line.trim().is_empty());
    last.map_or("no error text", str::trim)
}

/// The container ids in `<runtime> list -q`'s output. youki 0.7 ignores `-q` and prints its
/// table, a header and then one container a line with its id first, so a header is skipped and
/// each line's first word taken (an OCI container id has no whitespace).
fn listed_ids(stdout: &str) -> Vec<String> {
    let mut lines = stdout.lines().peekable();
    let header = |line: &&str| line.split_whitespace().take(2).eq(["ID", "PID"]);
    if lines.peek().is_some_and(header) {
        lines.next();
    }
    lines
        .filter_map(|line| line.split_whitespace().next())
        .map(str::to_owned)
        .collect()
}

/// A berthd this run started on its own socket and state directory.
pub struct Berthd {
    child: Child,
    pub socket: PathBuf,
    pub state_dir: PathBuf,
    pub log: PathBuf,
    /// Where it serves its metrics.
    pub metrics: String,
}

impl Berthd {
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    pub fn runtime_root(&self) -> PathBuf {
        self.state_dir.join("runtime")
    }

    fn stop(mut self) {
        let pid = nix::unistd::Pid::from_raw(self.child.id() as i32);
        let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM);
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        eprintln!("berthd ignored SIGTERM for 10 s; killing it");
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// How to start a berthd.
pub struct BerthdFlags<'a> {
    pub binary: &'a Path,
    pub runtime: &'a str,
    pub log_level: &'a str,
    /// Its metrics endpoint; a socket beside its API socket when None.
    pub metrics_listen: Option<&'a str>,
}

pub struct Session {
    pub dir: PathBuf,
    /// Put before every container id (`--id-prefix`).
    id_prefix: String,
    pub runtime: Runtime,
    pub bundle: PathBuf,
    berthd: Mutex<Option<Berthd>>,
    /// The direct floors' runtime roots, each with the runtime whose containers it holds.
    roots: Mutex<Vec<(Runtime, PathBuf)>>,
    /// Containers made through a berthd this run did not start, with their init pids, so an
    /// interrupted run can still kill them through the API.
    live: Mutex<HashMap<String, u32>>,
}

impl Session {
    /// Makes the work directory `<work_dir>/<pid>` and the bundle every container shares: a
    /// read-only busybox rootfs and the runtime's default spec running `sleep`.
    pub fn new(work_dir: &Path, runtime: &str, id_prefix: &str) -> Result<Session, LoadError> {
        let dir = work_dir.join(std::process::id().to_string());
        let io = |what: &Path, e: std::io::Error| LoadError(format!("{}: {e}", what.display()));
        fs::create_dir_all(&dir).map_err(|e| io(&dir, e))?;
        let session = Session {
            bundle: dir.join("bundle"),
            dir,
            id_prefix: id_prefix.to_owned(),
            runtime: Runtime::new(runtime),
            berthd: Mutex::new(None),
            roots: Mutex::new(Vec::new()),
            live: Mutex::new(HashMap::new()),
        };
        session.make_bundle()?;
        Ok(session)
    }

    /// The id of the container this run calls `name`: with `--id-prefix` before it, as it is
    /// also the name of the container's cgroup, which two runs on one host must not share.
    pub fn id(&self, name: std::fmt::Arguments<'_>) -> String {
        format!("{}{name}", self.id_prefix)
    }

    fn make_bundle(&self) -> Result<(), LoadError> {
        let io = |what: &Path, e: std::io::Error| LoadError(format!("{}: {e}", what.display()));
        let bin = self.bundle.join("rootfs/bin");
        fs::create_dir_all(&bin).map_err(|e| io(&bin, e))?;
        fs::copy(BUSYBOX, bin.join("busybox"))
            .map_err(|e| LoadError(format!("{BUSYBOX}: {e} (install busybox-static)")))?;
        for applet in APPLETS {
            symlink("busybox", bin.join(applet)).map_err(|e| io(&bin.join(applet), e))?;
        }
        // runc and crun both write their default spec with `spec`; runc's serves both.
        let out = Command::new("runc")
            .arg("spec")
            .arg("--bundle")
            .arg(&self.bundle)
            .output()
            .map_err(|e| LoadError(format!("runc spec: {e} (install runc)")))?;
        if !out.status.success() {
            return Err(LoadError(format!(
                "runc spec: {}",
                String::from_utf8_lossy(&out.stderr).trim()
            )));
        }
        let config = self.bundle.join("config.json");
        let text = fs::read_to_string(&config).map_err(|e| io(&config, e))?;
        let mut spec: serde_json::Value = serde_json::from_str(&text)
            .map_err(|e| LoadError(format!("{}: {e}", config.display())))?;
        spec["process"]["terminal"] = false.into();
        spec["process"]["args"] = serde_json::json!(["sleep", "100000"]);
        let text = serde_json::to_string_pretty(&spec).expect("a JSON value serializes");
        fs::write(&config, text).map_err(|e| io(&config, e))
    }

    pub fn bundle_str(&self) -> String {
        self.bundle.to_string_lossy().into_owned()
    }

    /// A root for `runtime`'s containers in a direct floor, swept with it at cleanup.
    pub fn runtime_root(&self, runtime: &Runtime, name: &str) -> PathBuf {
        let root = self.dir.join(name);
        let mut roots = self.roots.lock().expect("roots lock");
        roots.push((runtime.clone(), root.clone()));
        root
    }

    /// Starts a fresh berthd in `<dir>/<name>` and waits until it serves its socket.
    pub async fn start_berthd(&self, name: &str, flags: &BerthdFlags<'_>) -> Result<(), LoadError> {
        let dir = self.dir.join(name);
        fs::create_dir_all(&dir).map_err(|e| LoadError(format!("{}: {e}", dir.display())))?;
        let socket = dir.join("berth.sock");
        let state_dir = dir.join("state");
        let log = dir.join("berthd.log");
        let metrics = flags.metrics_listen.map_or_else(
            || dir.join("metrics.sock").to_string_lossy().into_owned(),
            str::to_owned,
        );
        let log_file =
            File::create(&log).map_err(|e| LoadError(format!("{}: {e}", log.display())))?;
        let mut command = Command::new(flags.binary);
        command
            .arg("--listen")
            .arg(&socket)
            .arg("--state-dir")
            .arg(&state_dir)
            .args(["--runtime", flags.runtime, "--log-level", flags.log_level])
            .args(["--metrics-listen", &metrics]);
        let child = command
            .stdin(Stdio::null())
            .stdout(log_file.try_clone().map_err(|e| LoadError(e.to_string()))?)
            .stderr(log_file)
            .spawn()
            .map_err(|e| {
                LoadError(format!(
                    "{}: {e} (build it with cargo build --release)",
                    flags.binary.display()
                ))
            })?;
        let mut berthd = Berthd {
            child,
            socket,
            state_dir,
            log,
            metrics,
        };
        let deadline = Instant::now() + Duration::from_secs(15);
        loop {
            if let Ok(Some(status)) = berthd.child.try_wait() {
                let log = fs::read_to_string(&berthd.log).unwrap_or_default();
                return Err(LoadError(format!(
                    "berthd exited at start ({status}): {}",
                    log.trim()
                )));
            }
            if berthd.socket.exists() && berth_api::client::connect(&berthd.socket).await.is_ok() {
                break;
            }
            if Instant::now() > deadline {
                berthd.stop();
                return Err(LoadError(
                    "berthd did not serve its socket within 15 s".into(),
                ));
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        *self.berthd.lock().expect("berthd lock") = Some(berthd);
        Ok(())
    }

    /// Socket, pid and metrics endpoint of the berthd this run started.
    pub fn berthd(&self) -> Option<(PathBuf, u32, String)> {
        let berthd = self.berthd.lock().expect("berthd lock");
        berthd
            .as_ref()
            .map(|b| (b.socket.clone(), b.pid(), b.metrics.clone()))
    }

    /// The runtime state directory of the berthd this run started.
    pub fn berthd_runtime_root(&self) -> Option<PathBuf> {
        let berthd = self.berthd.lock().expect("berthd lock");
        berthd.as_ref().map(Berthd::runtime_root)
    }

    /// Stops the berthd this run started and removes whatever containers it left.
    pub async fn stop_berthd(&self) {
        let berthd = self.berthd.lock().expect("berthd lock").take();
        if let Some(berthd) = berthd {
            let root = berthd.runtime_root();
            tokio::task::spawn_blocking(move || berthd.stop())
                .await
                .expect("stopping berthd does not panic");
            self.delete_all(&self.runtime, &root).await;
        }
    }

    pub fn track(&self, id: &str, pid: u32) {
        self.live
            .lock()
            .expect("live lock")
            .insert(id.to_owned(), pid);
    }

    /// Containers made and not yet killed.
    pub fn tracked(&self) -> usize {
        self.live.lock().expect("live lock").len()
    }

    pub fn untrack(&self, id: &str) {
        self.live.lock().expect("live lock").remove(id);
    }

    /// Removes every container this run made: those of the berthd it started and of every
    /// direct-floor root through the runtime, those of a berthd it did not start through that
    /// berthd (`client`); then reaps the inits that were reparented to this process.
    pub async fn cleanup(&self, client: Option<ApiClient<Channel>>) {
        self.stop_berthd().await;
        let roots = self.roots.lock().expect("roots lock").clone();
        for (runtime, root) in roots {
            self.delete_all(&runtime, &root).await;
        }
        let live: Vec<(String, u32)> = self.live.lock().expect("live lock").drain().collect();
        if let (Some(client), false) = (client, live.is_empty()) {
            eprintln!("cleanup: killing {} containers through berthd", live.len());
            stream::iter(live)
                .for_each_concurrent(CLEANUP_CONCURRENCY, |(id, pid)| {
                    let mut client = client.clone();
                    async move {
                        let req = SignalRequest {
                            id,
                            pid,
                            signal: libc::SIGKILL as u32,
                        };
                        let _ = client.signal(req).await;
                    }
                })
                .await;
        }
        reap_zombie_children(Duration::from_secs(5)).await;
        if let Err(e) = fs::remove_dir_all(&self.dir) {
            eprintln!("cleanup: {}: {e}", self.dir.display());
        }
    }

    /// Deletes (`<runtime> delete -f`) every container under `root`.
    pub async fn delete_all(&self, runtime: &Runtime, root: &Path) {
        let (lister, list_root) = (runtime.clone(), root.to_owned());
        let ids = tokio::task::spawn_blocking(move || lister.list(&list_root))
            .await
            .unwrap_or_default();
        if ids.is_empty() {
            return;
        }
        eprintln!(
            "cleanup: deleting {} containers under {}",
            ids.len(),
            root.display()
        );
        stream::iter(ids.into_iter().enumerate())
            .for_each_concurrent(CLEANUP_CONCURRENCY, |(i, id)| async move {
                let err = self
                    .dir
                    .join(format!("cleanup-{}.err", i % CLEANUP_CONCURRENCY));
                if let Err(e) = runtime.run(root, &["delete", "-f", &id], &err).await {
                    eprintln!("cleanup: {e}");
                }
            })
            .await;
    }
}

/// Reaps the zombie children of this process (container inits reparented to it, the subreaper,
/// once their runtime exited), waiting up to `patience` for dying ones to turn zombie.
pub async fn reap_zombie_children(patience: Duration) {
    use rustix::process::{Pid, WaitOptions, waitpid};
    let deadline = Instant::now() + patience;
    loop {
        let mut dying = 0;
        for pid in children_of(std::process::id()) {
            let state = fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
            let state = state
                .rfind(')')
                .and_then(|at| state[at + 1..].split_whitespace().next().map(str::to_owned));
            match state.as_deref() {
                Some("Z") => {
                    if let Some(pid) = Pid::from_raw(pid as i32) {
                        let _ = waitpid(Some(pid), WaitOptions::NOHANG);
                    }
                }
                // Killed but not yet dead.
                Some(_) if is_container_init(pid) => dying += 1,
                _ => {}
            }
        }
        if dying == 0 || Instant::now() > deadline {
            return;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Whether `pid` is a container init of ours (its command is `sleep`) rather than berthd or a
/// runtime command tokio is waiting for.
fn is_container_init(pid: u32) -> bool {
    fs::read_to_string(format!("/proc/{pid}/comm")).is_ok_and(|comm| comm.trim() == "sleep")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_runtime_is_named_by_its_program_file_name() {
        let youki = Runtime::new("/opt/youki/bin/youki");
        assert_eq!(youki.program, Path::new("/opt/youki/bin/youki"));
        assert_eq!(youki.name, "youki");
        assert_eq!(Runtime::new("runc").name, "runc");
    }

    #[test]
    fn error_line_is_the_message_not_the_backtrace() {
        let runc = "time=\"2026\" level=error msg=\"container does not exist\"\n";
        assert_eq!(error_line(runc), runc.trim());
        let youki = "\
Error: failed to start container

Caused by:
    the root cause

Stack backtrace:
   0: anyhow::error::<impl anyhow::Error>::msg
   7: _start
";
        assert_eq!(error_line(youki), "the root cause");
        assert_eq!(error_line(" \n"), "no error text");
    }

    #[test]
    fn listed_ids_reads_runc_quiet_output_and_youki_table() {
        assert_eq!(listed_ids("direct-0\ndirect-1\n"), ["direct-0", "direct-1"]);
        assert!(listed_ids("").is_empty());
        // youki 0.7's `list -q`, verbatim: the table, quiet or not.
        let youki = "\
ID  PID    STATUS   BUNDLE               CREATED                    CREATOR
c1  29528  Running  /run/yk-test/bundle  2026-11-30T02:40:57+00:00  root
c2         Stopped  /run/yk-test/bundle  2026-11-30T02:41:03+00:00  root
";
        assert_eq!(listed_ids(youki), ["c1", "c2"]);
        assert!(listed_ids("ID  PID  STATUS  BUNDLE  CREATED  CREATOR\n").is_empty());
    }
}
