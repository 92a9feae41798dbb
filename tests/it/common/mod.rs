//! Shared fixture for the integration tests: OCI bundles built from busybox, a real berthd on a
//! temp socket and state dir, event and FIFO helpers, loud skips, and the "nothing left behind"
//! checks, which look at the kernel's own account (the cgroups a process was put in, berthd's fd
//! table, its children) rather than at berthd's.

use std::collections::{BTreeSet, HashMap};
use std::fs::{self, File};
use std::future::Future;
use std::io::Write;
use std::os::unix::fs::{PermissionsExt, symlink};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, Instant};

use berth_api::proto::api_client::ApiClient;
use berth_api::proto::{
    AddProcessRequest, CreateContainerRequest, SignalRequest, StateRequest, StateResponse,
};
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use serde_json::Value;
use tempfile::TempDir;
use tonic::transport::Channel;

pub mod hpack;
mod procfs;
mod skip;
mod stream;

pub use procfs::*;
pub use skip::*;
pub use stream::*;

pub type Client = ApiClient<Channel>;

/// Longest any single test may run before it fails instead of hanging CI.
const TEST_TIMEOUT: Duration = Duration::from_secs(90);
/// Longest we wait for one expected event.
pub const EVENT_TIMEOUT: Duration = Duration::from_secs(20);
/// Time the daemon gets to close fds and reap children after a request returned.
pub const SETTLE: Duration = Duration::from_secs(5);

pub const BUSYBOX: &str = "/bin/busybox";
const APPLETS: &[&str] = &[
    "sh", "sleep", "cat", "echo", "true", "env", "id", "pwd", "ls",
];

pub const SIGKILL: u32 = libc::SIGKILL as u32;
pub const SIGTERM: u32 = libc::SIGTERM as u32;

/// Runs a test body with a deadline. The body stays alive while the timeout panic unwinds, so a
/// `Daemon` inside it still sees `thread::panicking()` and prints berthd's log.
pub async fn within<F: Future>(fut: F) -> F::Output {
    within_for(TEST_TIMEOUT, fut).await
}

/// [`within`] for a test that does more than most (hundreds of containers).
pub async fn within_for<F: Future>(limit: Duration, fut: F) -> F::Output {
    let mut fut = std::pin::pin!(fut);
    match tokio::time::timeout(limit, &mut fut).await {
        Ok(out) => out,
        Err(_) => panic!("test did not finish within {limit:?}"),
    }
}

/// A container id unique to this test run, so parallel tests never share a cgroup: a container
/// without `cgroupsPath` is put in `<id>` beneath berthd's cgroup, which the berthds of all tests
/// share, and deleting it kills (built-in runtime) or waits on (runc) what else is there. A name
/// asked for twice fails the test that asked second.
pub fn id(name: &str) -> String {
    static NAMES: Mutex<BTreeSet<String>> = Mutex::new(BTreeSet::new());
    let id = format!("{name}-{}", std::process::id());
    assert!(id.len() <= 64, "test container id too long: {id}");
    let fresh = NAMES
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .insert(id.clone());
    assert!(
        fresh,
        "container name {name:?} is used by two tests, or twice in one"
    );
    id
}

/// `name` with a number no other call gave, for a helper that several tests call.
pub fn numbered(name: &str) -> String {
    static CALLS: AtomicUsize = AtomicUsize::new(0);
    format!("{name}-{}", CALLS.fetch_add(1, Ordering::Relaxed))
}

/// Starts a berthd for the test (`daemon!()`, or `daemon!(Options { .. })`), or returns from the
/// test after a loud skip when the host cannot run one.
macro_rules! daemon {
    () => {
        daemon!($crate::common::Options::default())
    };
    ($options:expr) => {
        match $crate::common::Daemon::start($options).await {
            Some(daemon) => daemon,
            None => return,
        }
    };
}

// ----- bundles -----

/// `runc spec` output, generated once per test binary.
fn base_spec() -> &'static Value {
    static SPEC: OnceLock<Value> = OnceLock::new();
    SPEC.get_or_init(|| {
        let dir = TempDir::new().expect("temp dir");
        let out = Command::new("runc")
            .arg("spec")
            .arg("--bundle")
            .arg(dir.path())
            .output()
            .expect("run runc spec");
        assert!(out.status.success(), "runc spec: {out:?}");
        let text = fs::read_to_string(dir.path().join("config.json")).expect("runc spec output");
        serde_json::from_str(&text).expect("runc spec writes JSON")
    })
}

/// An OCI bundle in a temp dir: a rootfs holding busybox and its applets, and the `runc spec`
/// config with `process.args` set and no terminal.
pub struct Bundle {
    dir: TempDir,
}

impl Bundle {
    pub fn new(args: &[&str]) -> Bundle {
        let dir = TempDir::new().expect("temp dir");
        let bin = dir.path().join("rootfs/bin");
        fs::create_dir_all(&bin).expect("rootfs/bin");
        fs::create_dir_all(dir.path().join("rootfs/tmp")).expect("rootfs/tmp");
        fs::copy(BUSYBOX, bin.join("busybox")).expect("copy busybox");
        for applet in APPLETS {
            symlink("busybox", bin.join(applet)).expect("applet symlink");
        }
        let bundle = Bundle { dir };
        let mut spec = base_spec().clone();
        spec["process"]["terminal"] = false.into();
        spec["process"]["args"] = args.into();
        bundle.write_config(&spec);
        bundle
    }

    pub fn path(&self) -> &Path {
        self.dir.path()
    }

    pub fn path_str(&self) -> String {
        path_str(self.dir.path())
    }

    /// A FIFO at `/tmp/<name>` inside the container, for the test to release a process that
    /// waits on it (`read x < /tmp/<name>`): returns its host path.
    pub fn gate(&self, name: &str) -> PathBuf {
        let path = self.path().join("rootfs/tmp").join(name);
        mkfifo(&path);
        path
    }

    /// Changes config.json, e.g. `b.edit(|c| c["process"]["terminal"] = true.into())`.
    pub fn edit(&self, change: impl FnOnce(&mut Value)) {
        let mut spec = self.config();
        change(&mut spec);
        self.write_config(&spec);
    }

    /// Takes the pid namespace out of the spec: the containers share the host's.
    pub fn share_the_hosts_pids(&self) {
        self.edit(|c| {
            let namespaces = c["linux"]["namespaces"].as_array_mut().expect("namespaces");
            namespaces.retain(|ns| ns["type"] != "pid");
        });
    }

    pub fn config(&self) -> Value {
        let text = fs::read_to_string(self.path().join("config.json")).expect("config.json");
        serde_json::from_str(&text).expect("config.json is JSON")
    }

    fn write_config(&self, spec: &Value) {
        let text = serde_json::to_string_pretty(spec).expect("serialize spec");
        fs::write(self.path().join("config.json"), text).expect("write config.json");
    }
}

/// Opens a gate made by `Bundle::gate`: the process reading it goes on. Keep the returned end
/// until it has (a FIFO's data is lost when both ends close).
#[must_use]
pub fn open_gate(gate: &Path) -> File {
    let mut file = open_rw(gate);
    file.write_all(b"go\n").expect("write gate");
    file
}

/// A container a test started: its id, init pid and bundle (kept as long as the container).
pub struct Container {
    pub id: String,
    pub pid: u32,
    pub bundle: Bundle,
}

// ----- the daemon -----

/// A berthd started for one test on its own socket and state dir.
pub struct Daemon {
    child: Option<Child>,
    dir: TempDir,
    socket: PathBuf,
    pub client: Client,
    /// The cgroup directories of each container's init, read from /proc when it was created.
    cgroups: HashMap<String, Vec<PathBuf>>,
}

/// How to start a berthd beyond the defaults.
#[derive(Default)]
pub struct Options<'a> {
    /// Extra flags.
    pub args: &'a [&'a str],
    /// Extra environment variables.
    pub env: &'a [(&'a str, &'a str)],
    /// The socket path relative to the daemon's temp dir (default `berth.sock`).
    pub socket: Option<&'a str>,
    /// The berthd binary to run (default: the one cargo built).
    pub binary: Option<&'a Path>,
}

impl<'a> Options<'a> {
    pub fn args(args: &'a [&'a str]) -> Options<'a> {
        Options {
            args,
            ..Options::default()
        }
    }
}

impl Daemon {
    /// Starts berthd, or returns None after a loud skip when the host cannot run containers
    /// (use `daemon!`).
    pub async fn start(options: Options<'_>) -> Option<Daemon> {
        if !ready() {
            return None;
        }
        let dir = TempDir::new().expect("temp dir");
        let socket = dir.path().join(options.socket.unwrap_or("berth.sock"));
        let child = spawn_berthd(dir.path(), &socket, &options);
        let mut daemon = Daemon {
            child: Some(child),
            client: wait_for_socket(&socket, dir.path()).await,
            socket,
            dir,
            cgroups: HashMap::new(),
        };
        if let Some(status) = daemon.try_wait() {
            panic!("berthd exited right after start: {status}");
        }
        daemon.wait_for_signal_handlers().await;
        Some(daemon)
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().expect("berthd running").id()
    }

    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    pub fn socket(&self) -> PathBuf {
        self.socket.clone()
    }

    pub fn state_dir(&self) -> PathBuf {
        self.dir.path().join("state")
    }

    pub fn state_file(&self, id: &str) -> PathBuf {
        self.state_dir()
            .join("containers")
            .join(format!("{id}.json"))
    }

    pub fn log(&self) -> String {
        fs::read_to_string(self.dir.path().join("berthd.log")).unwrap_or_default()
    }

    /// A second, independent connection (its own HTTP/2 flow-control windows).
    pub async fn connect(&self) -> Client {
        berth_api::client::connect(&self.socket())
            .await
            .expect("connect to berthd")
    }

    pub fn try_wait(&mut self) -> Option<ExitStatus> {
        let child = self.child.as_mut().expect("berthd running");
        child.try_wait().expect("try_wait berthd")
    }

    // ----- requests -----

    /// Creates a container and returns its init pid, failing the test on error. The init's
    /// cgroups are recorded for `assert_gone`.
    pub async fn create(&mut self, req: CreateContainerRequest) -> u32 {
        let id = req.id.clone();
        let pid = create(&mut self.client, req).await;
        self.record_cgroups(&id, pid);
        pid
    }

    /// Creates containers `id("{prefix}{n}")` for n in 0..count from `bundle`, one after the
    /// other: their ids and inits, in that order.
    pub async fn create_numbered(
        &mut self,
        prefix: &str,
        count: usize,
        bundle: &Bundle,
    ) -> Vec<(String, u32)> {
        let mut created = Vec::with_capacity(count);
        for n in 0..count {
            let id = id(&format!("{prefix}{n}"));
            let pid = self.create(create_req(&id, bundle)).await;
            created.push((id, pid));
        }
        created
    }

    /// Creates container `id(name)` running `args` from a fresh busybox bundle.
    pub async fn run(&mut self, name: &str, args: &[&str]) -> Container {
        let bundle = Bundle::new(args);
        let id = id(name);
        let pid = self.create(create_req(&id, &bundle)).await;
        Container { id, pid, bundle }
    }

    /// Adds a process and returns its host pid, failing the test on error.
    pub async fn exec(&mut self, req: AddProcessRequest) -> u32 {
        let what = format!("{} {:?}", req.id, req.args);
        match self.client.add_process(req).await {
            Ok(resp) => resp.into_inner().pid,
            Err(status) => panic!("AddProcess {what}: {status:?}"),
        }
    }

    pub async fn signal(&mut self, id: &str, pid: u32, signal: u32) {
        send_signal(&mut self.client, id, pid, signal).await;
    }

    /// Kills container `id` through its init with SIGKILL, expects its exit event (137) on
    /// `events`, and checks it is gone everywhere (`assert_gone`).
    pub async fn kill_container(&mut self, events: &mut Events, id: &str, init: u32) {
        self.signal(id, init, SIGKILL).await;
        assert_eq!(
            events.exit_status(id, init).await,
            137,
            "exit of {id}/{init}"
        );
        self.assert_gone(id).await;
    }

    pub async fn state(&mut self) -> StateResponse {
        state(&mut self.client).await
    }

    pub async fn events(&mut self) -> Events {
        Events::subscribe(&mut self.client).await
    }

    // ----- what berthd holds, from the kernel -----

    /// Container ids the runtime knows under berthd's runtime root.
    pub fn runtime_ids(&self) -> Vec<String> {
        runtime_ids(&self.state_dir().join("runtime"))
    }

    /// The mount and network namespaces berthd holds open (`mnt:[…]`, `net:[…]`), sorted.
    pub fn held_namespaces(&self) -> Vec<String> {
        self.fds()
            .into_iter()
            .filter(|fd| fd.starts_with("mnt:[") || fd.starts_with("net:["))
            .collect()
    }

    /// The targets of berthd's open fds, sorted (a multiset: pidfds all read `anon_inode:[pidfd]`).
    pub fn fds(&self) -> Vec<String> {
        let dir = format!("/proc/{}/fd", self.pid());
        let mut fds: Vec<String> = fs::read_dir(&dir)
            .unwrap_or_else(|e| panic!("{dir}: {e}"))
            .filter_map(|entry| {
                let target = fs::read_link(entry.ok()?.path()).ok()?;
                Some(target.display().to_string())
            })
            .collect();
        fds.sort();
        fds
    }

    /// berthd's direct children other than its live spawn helper: container inits, added
    /// processes, and whatever else it has become the parent of, an ended helper it has not
    /// reaped among them.
    pub fn children(&self) -> BTreeSet<u32> {
        children_of(self.pid())
            .into_iter()
            .filter(|&pid| {
                !(is_spawn_helper(pid) && proc_stat(pid).is_some_and(|s| s.state != 'Z'))
            })
            .collect()
    }

    /// What berthd holds now, to compare against after a request (`assert_settles`).
    pub fn baseline(&self) -> Baseline {
        Baseline {
            fds: self.fds(),
            children: self.children(),
            scratch: self.scratch_files(),
        }
    }

    /// The names in berthd's scratch directory (`<state-dir>/tmp`: pid files, console sockets,
    /// runtime logs with something in them), sorted. An empty runtime log is kept for the next
    /// runtime command (`runtime::log_files`), not left over.
    pub fn scratch_files(&self) -> Vec<String> {
        let dir = self.state_dir().join("tmp");
        let kept_log = |entry: &fs::DirEntry| {
            let name = entry.file_name().to_string_lossy().into_owned();
            name.starts_with("runtime-")
                && name.ends_with(".log")
                && entry.metadata().is_ok_and(|m| m.len() == 0)
        };
        let mut names: Vec<String> = match fs::read_dir(&dir) {
            Ok(entries) => entries
                .filter_map(|entry| entry.ok())
                .filter(|entry| !kept_log(entry))
                .map(|entry| entry.file_name().to_string_lossy().into_owned())
                .collect(),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Vec::new(),
            Err(e) => panic!("{}: {e}", dir.display()),
        };
        names.sort();
        names
    }

    /// Waits until every fd berthd holds was already open in `baseline` (by target, counted per
    /// target), it has no child that was not there then, and its scratch directory holds no
    /// file that was not there then (a runtime's log is emptied after a success and a failure
    /// alike).
    pub async fn assert_settles(&self, baseline: &Baseline) {
        let deadline = Instant::now() + SETTLE;
        loop {
            let extra_fds = multiset_minus(&self.fds(), &baseline.fds);
            let extra_children: Vec<u32> = self
                .children()
                .difference(&baseline.children)
                .copied()
                .collect();
            let extra_scratch = multiset_minus(&self.scratch_files(), &baseline.scratch);
            if extra_fds.is_empty() && extra_children.is_empty() && extra_scratch.is_empty() {
                return;
            }
            if Instant::now() > deadline {
                let described: Vec<String> = extra_children.iter().map(|&p| describe(p)).collect();
                panic!(
                    "berthd holds fds not in the baseline: {extra_fds:#?}\n\
                     children not in the baseline: {described:#?}\n\
                     and scratch files not in the baseline: {extra_scratch:#?}"
                );
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// `assert_settles` for fds only, by kind: `socket:[N]` and `pipe:[N]` count as `socket` and
    /// `pipe`, for comparisons across an upgrade, after which berthd's own sockets are new ones.
    pub async fn assert_fd_kinds_settle(&self, baseline: &Baseline) {
        let kinds = |fds: &[String]| -> Vec<String> {
            let mut kinds: Vec<String> = fds
                .iter()
                .map(|fd| match fd.split_once(":[") {
                    Some((kind, _)) if kind == "socket" || kind == "pipe" => kind.to_owned(),
                    _ => fd.clone(),
                })
                .collect();
            kinds.sort();
            kinds
        };
        let before = kinds(&baseline.fds);
        let deadline = Instant::now() + SETTLE;
        loop {
            let extra = multiset_minus(&kinds(&self.fds()), &before);
            if extra.is_empty() {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "berthd holds fds of kinds not in the baseline: {extra:#?}"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Waits until berthd has no zombie child and every other child of it is a process it
    /// tracks (listed by State): nothing it became the parent of is forgotten.
    pub async fn assert_no_zombies(&mut self) {
        self.assert_no_zombies_except(&[]).await;
    }

    /// `assert_no_zombies`, allowing the live, untracked children `allowed`.
    pub async fn assert_no_zombies_except(&mut self, allowed: &[u32]) {
        let deadline = Instant::now() + SETTLE;
        loop {
            let tracked: BTreeSet<u32> = self
                .state()
                .await
                .containers
                .iter()
                .flat_map(|c| c.processes.iter().map(|p| p.pid))
                .collect();
            let bad: Vec<String> = self
                .children()
                .into_iter()
                .filter(|&pid| {
                    let zombie = proc_stat(pid).is_some_and(|s| s.state == 'Z');
                    zombie || !(tracked.contains(&pid) || allowed.contains(&pid))
                })
                .map(describe)
                .collect();
            if bad.is_empty() {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "berthd has zombie or untracked children: {bad:#?}"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Container `id` is gone everywhere: from State at once (README: once its exit event is
    /// published), and from the runtime, its state file and every cgroup its init was in soon
    /// after (DESIGN: their removal follows the event).
    pub async fn assert_gone(&mut self, id: &str) {
        let listed: Vec<String> = self
            .state()
            .await
            .containers
            .into_iter()
            .map(|c| c.id)
            .collect();
        assert!(!listed.contains(&id.to_owned()), "State still lists {id}");
        let mut left = self.cgroup_dirs(id);
        left.push(self.state_file(id));
        // The spec the runtime is given, and the built-in runtime's own copy of it.
        left.push(self.state_dir().join("runtime.configs").join(id));
        left.push(self.state_dir().join("runtime.bundles").join(id));
        let deadline = Instant::now() + SETTLE;
        loop {
            left.retain(|path| path.exists());
            let in_runtime = self.runtime_ids().iter().any(|c| c == id);
            if left.is_empty() && !in_runtime {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "left behind by {id} (state file, cgroups, spec for the runtime, private bundle; still in the runtime: {in_runtime}): {left:#?}"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// A request failed: nothing of `id` may remain, and berthd holds no fd or child that it did
    /// not hold in `baseline`, and no zombie.
    pub async fn assert_nothing_left(&mut self, id: &str, baseline: &Baseline) {
        self.assert_gone(id).await;
        self.assert_settles(baseline).await;
        self.assert_no_zombies().await;
    }

    /// Records the cgroup directories of container `id`'s init `pid`: those of every line of its
    /// /proc/<pid>/cgroup that berthd itself is not in (so never a hierarchy's root or berthd's
    /// own group). An init that is already gone leaves only the guesses of `assert_cgroups_gone`.
    pub fn record_cgroups(&mut self, id: &str, pid: u32) {
        let own = cgroups_of(self.pid());
        let dirs: Vec<PathBuf> = cgroups_of(pid)
            .into_iter()
            .filter(|dir| !own.iter().any(|mine| mine.starts_with(dir)))
            .collect();
        self.cgroups.entry(id.to_owned()).or_default().extend(dirs);
    }

    /// Every cgroup directory recorded for `id`, and where runc puts a container without
    /// `cgroupsPath` (`<id>` under each hierarchy's root and under berthd's own group).
    fn cgroup_dirs(&mut self, id: &str) -> Vec<PathBuf> {
        let mut dirs = self.cgroups.remove(id).unwrap_or_default();
        for mount in cgroup_mounts() {
            dirs.push(mount.dir.join(id));
        }
        for own in cgroups_of(self.pid()) {
            dirs.push(own.join(id));
        }
        dirs.sort();
        dirs.dedup();
        dirs
    }

    // ----- stopping and restarting -----

    /// Kills berthd with SIGKILL, as a crash would, leaving its containers running, then starts
    /// a new berthd on the same socket and state dir.
    pub async fn kill_and_restart(&mut self) {
        self.crash();
        self.start_again().await;
    }

    /// Kills berthd with SIGKILL, leaving its containers, socket file and state dir behind.
    pub fn crash(&mut self) {
        let mut child = self.child.take().expect("berthd running");
        child.kill().expect("kill -9 berthd");
        child.wait().expect("wait for berthd");
    }

    /// Waits until berthd handles SIGTERM and SIGINT, so that a test's `stop` is the clean stop
    /// README promises. berthd installs them before it binds or takes over its socket, so this
    /// returns at once unless that broke (which
    /// `lifecycle::sigterm_once_the_socket_exists_stops_berthd_cleanly` tests on its own).
    async fn wait_for_signal_handlers(&self) {
        let deadline = Instant::now() + SETTLE;
        while !(catches(self.pid(), libc::SIGTERM) && catches(self.pid(), libc::SIGINT)) {
            assert!(
                Instant::now() < deadline,
                "berthd serves but does not handle SIGTERM and SIGINT"
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    /// Starts a new berthd on the same socket and state dir after `crash` or `stop`.
    pub async fn start_again(&mut self) {
        self.start_again_with(Options::default()).await;
    }

    /// `start_again` with more flags (the socket and binary stay those of the first start).
    pub async fn start_again_with(&mut self, options: Options<'_>) {
        assert!(self.child.is_none(), "berthd is still running");
        self.child = Some(spawn_berthd(self.dir.path(), &self.socket, &options));
        self.client = wait_for_socket(&self.socket, self.dir.path()).await;
        self.wait_for_signal_handlers().await;
    }

    /// Sends `signal` to berthd and waits for it to exit.
    pub fn stop_with(&mut self, signal: Signal) -> ExitStatus {
        let mut child = self.child.take().expect("berthd running");
        terminate(&mut child, signal)
    }

    /// SIGTERM berthd and wait for it to exit.
    pub fn stop(&mut self) -> ExitStatus {
        self.stop_with(Signal::SIGTERM)
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        // berthd leaves containers running when it stops, so remove them through the runtime.
        let root = self.state_dir().join("runtime");
        for id in runtime_ids(&root) {
            if builtin_runtime() {
                remove_builtin(&root, &id);
                continue;
            }
            let _ = Command::new("runc")
                .arg("--root")
                .arg(&root)
                .args(["delete", "-f", &id])
                .output();
        }
        if let Some(mut child) = self.child.take() {
            terminate(&mut child, Signal::SIGTERM);
        }
        if std::thread::panicking() {
            eprintln!(
                "----- berthd log -----\n{}----- end of berthd log -----",
                self.log()
            );
        }
    }
}

/// What berthd held at one moment: its fds' targets and its children (spawn helper excluded).
pub struct Baseline {
    fds: Vec<String>,
    children: BTreeSet<u32>,
    scratch: Vec<String>,
}

/// Process `pid`'s mount and network namespaces, as their links read (`mnt:[…]`, `net:[…]`).
pub fn mount_and_network_namespaces(pid: u32) -> Vec<String> {
    ["mnt", "net"]
        .iter()
        .map(|kind| {
            let link = format!("/proc/{pid}/ns/{kind}");
            let target = fs::read_link(&link).unwrap_or_else(|e| panic!("{link}: {e}"));
            target.display().to_string()
        })
        .collect()
}

/// The items of sorted `now` beyond those in sorted `before`, counting repeats.
pub fn multiset_minus(now: &[String], before: &[String]) -> Vec<String> {
    let mut counts: HashMap<&str, usize> = HashMap::new();
    for fd in before {
        *counts.entry(fd).or_default() += 1;
    }
    now.iter()
        .filter(|fd| match counts.get_mut(fd.as_str()) {
            Some(n) if *n > 0 => {
                *n -= 1;
                false
            }
            _ => true,
        })
        .cloned()
        .collect()
}

fn describe(pid: u32) -> String {
    let cmdline = fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
    let cmdline = String::from_utf8_lossy(&cmdline).replace('\0', " ");
    let state = proc_stat(pid).map_or('?', |s| s.state);
    // A zombie has no command line left, only its name.
    let what = match cmdline.trim() {
        "" => fs::read_to_string(format!("/proc/{pid}/comm")).unwrap_or_default(),
        cmdline => cmdline.to_owned(),
    };
    format!("{pid} ({state}) {}", what.trim())
}

fn spawn_berthd(dir: &Path, socket: &Path, options: &Options) -> Child {
    let log = File::create(dir.join("berthd.log")).expect("berthd log file");
    let binary = options.binary.map_or_else(
        || PathBuf::from(env!("CARGO_BIN_EXE_berthd")),
        Path::to_owned,
    );
    let runtime = test_runtime().filter(|_| !options.args.contains(&"--runtime"));
    // A copied binary (`options.binary`) is busy while any child forked elsewhere in the test
    // binary during the copy still holds its write descriptor, until that child execs.
    let mut tries = 0;
    loop {
        let spawned = Command::new(&binary)
            .arg("--listen")
            .arg(socket)
            .arg("--state-dir")
            .arg(dir.join("state"))
            .args(["--log-level", "debug"])
            .args(runtime.iter().flat_map(|r| ["--runtime", r.as_str()]))
            .args(options.args)
            .envs(options.env.iter().copied())
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("dup log fd"))
            .stderr(log.try_clone().expect("dup log fd"))
            .spawn();
        match spawned {
            Err(e) if e.raw_os_error() == Some(libc::ETXTBSY) && tries < 100 => {
                tries += 1;
                std::thread::sleep(Duration::from_millis(20));
            }
            spawned => return spawned.expect("spawn berthd"),
        }
    }
}

async fn wait_for_socket(socket: &Path, dir: &Path) -> Client {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        // A connection alone proves little: the socket listens (and the HTTP/2 client's
        // handshake completes) before berthd has recovered and serves. An answered State does.
        if socket.exists()
            && let Ok(mut client) = berth_api::client::connect(socket).await
            && client.state(StateRequest::default()).await.is_ok()
        {
            return client;
        }
        if Instant::now() > deadline {
            let log = fs::read_to_string(dir.join("berthd.log")).unwrap_or_default();
            panic!(
                "berthd did not serve {} within 10 s; log:\n{log}",
                socket.display()
            );
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn terminate(child: &mut Child, signal: Signal) -> ExitStatus {
    let pid = Pid::from_raw(child.id() as i32);
    let _ = kill(pid, signal);
    let deadline = Instant::now() + Duration::from_secs(10);
    while Instant::now() < deadline {
        if let Some(status) = child.try_wait().expect("try_wait berthd") {
            return status;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let _ = child.kill();
    let status = child.wait().expect("wait berthd");
    panic!("berthd ignored {signal} for 10 s; killed it ({status})");
}

/// The runtime berthd runs the tests' containers with unless a test names one:
/// `BERTH_TEST_RUNTIME` (scripts/test's second pass sets `builtin`), else berthd's default.
pub fn test_runtime() -> Option<String> {
    std::env::var("BERTH_TEST_RUNTIME")
        .ok()
        .filter(|r| !r.is_empty())
}

/// Whether the tests run on the built-in runtime, whose state under `<state>/runtime` is
/// libcontainer's (a directory per container with a `state.json`), not runc's.
pub fn builtin_runtime() -> bool {
    test_runtime().as_deref() == Some("builtin")
}

/// Kills what the built-in runtime left of container `id` under `root` and removes its state.
/// What `runc delete -f` does, for the built-in runtime's container `id`: kills its init,
/// removes its cgroups once they are empty, and its state.
fn remove_builtin(root: &Path, id: &str) {
    let dir = root.join(id);
    let json = |file: &str| {
        fs::read_to_string(dir.join(file))
            .ok()
            .and_then(|text| serde_json::from_str::<serde_json::Value>(&text).ok())
    };
    let pid = json("state.json").and_then(|state| state["pid"].as_i64());
    if let Some(pid) = pid.filter(|&p| p > 0) {
        let _ = kill(Pid::from_raw(pid as i32), Signal::SIGKILL);
    }
    let cgroup = json("youki_config.json")
        .and_then(|config| config["cgroup_path"].as_str().map(PathBuf::from));
    let deadline = Instant::now() + SETTLE;
    for cgroup_dir in cgroup.map(|c| dirs_of_cgroup(&c)).unwrap_or_default() {
        while cgroup_dir.exists()
            && fs::remove_dir(&cgroup_dir).is_err()
            && Instant::now() < deadline
        {
            std::thread::sleep(Duration::from_millis(10));
        }
    }
    let _ = fs::remove_dir_all(dir);
}

fn runtime_ids(root: &Path) -> Vec<String> {
    if builtin_runtime() {
        let mut ids: Vec<String> = fs::read_dir(root)
            .into_iter()
            .flatten()
            .flatten()
            .filter(|entry| entry.path().join("state.json").exists())
            .map(|entry| entry.file_name().to_string_lossy().into_owned())
            .collect();
        ids.sort();
        return ids;
    }
    // `runc list` fails as a whole when a container's state goes while it reads it (a delete
    // running meanwhile): asked again, never taken as an empty list.
    let mut attempts = 0;
    loop {
        let out = Command::new("runc")
            .arg("--root")
            .arg(root)
            .args(["list", "-q"])
            .output()
            .expect("run runc list");
        if out.status.success() {
            return String::from_utf8_lossy(&out.stdout)
                .lines()
                .filter(|l| !l.is_empty())
                .map(str::to_owned)
                .collect();
        }
        attempts += 1;
        assert!(
            attempts < 50,
            "runc list keeps failing: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

// ----- requests -----

/// Creates `rounds` containers of `bundle` one after another and expects each init's exit event
/// to carry `status`, each container to be gone after it, and no zombie at the end.
pub async fn each_exits_with(
    d: &mut Daemon,
    name: &str,
    bundle: &Bundle,
    status: u32,
    rounds: usize,
) {
    let mut events = d.events().await;
    for round in 0..rounds {
        let id = id(&format!("{name}-{round}"));
        let pid = d.create(create_req(&id, bundle)).await;
        assert_eq!(
            events.exit_status(&id, pid).await,
            status,
            "{name}, round {round}"
        );
        d.assert_gone(&id).await;
    }
    d.assert_no_zombies().await;
}

pub fn create_req(id: &str, bundle: &Bundle) -> CreateContainerRequest {
    CreateContainerRequest {
        id: id.to_owned(),
        bundle_path: bundle.path_str(),
        ..Default::default()
    }
}

/// Sends `signal` to process `pid` of container `id` through `client` (a clone of the daemon's,
/// for signals sent from a task of their own), and expects it accepted.
pub async fn send_signal(client: &mut Client, id: &str, pid: u32, signal: u32) {
    let req = SignalRequest {
        id: id.to_owned(),
        pid,
        signal,
    };
    if let Err(status) = client.signal(req).await {
        panic!("Signal {signal} to {id}/{pid}: {status:?}");
    }
}

/// Creates a container on `client` and returns its init pid, failing the test on error.
/// (`Daemon::create` also records its cgroups.)
pub async fn create(client: &mut Client, req: CreateContainerRequest) -> u32 {
    let id = req.id.clone();
    match client.create_container(req).await {
        Ok(resp) => resp.into_inner().pid,
        Err(status) => panic!("CreateContainer {id}: {status:?}"),
    }
}

pub fn exec_req(id: &str, args: &[&str]) -> AddProcessRequest {
    AddProcessRequest {
        id: id.to_owned(),
        args: args.iter().map(|a| a.to_string()).collect(),
        ..Default::default()
    }
}

pub async fn state(client: &mut Client) -> StateResponse {
    match client.state(StateRequest::default()).await {
        Ok(resp) => resp.into_inner(),
        Err(status) => panic!("State: {status:?}"),
    }
}

/// Asserts that `result` failed with `code`, returning the status message.
pub fn expect_code<T: std::fmt::Debug>(
    result: Result<T, tonic::Status>,
    code: tonic::Code,
) -> String {
    match result {
        Ok(value) => panic!("expected {code:?}, got success: {value:?}"),
        Err(status) => {
            assert_eq!(status.code(), code, "wrong code; status: {status:?}");
            status.message().to_owned()
        }
    }
}

/// The Info of the berthd image serving `socket` (pid, version, when the image started).
pub async fn image_info(socket: &Path) -> berth_api::daemon_proto::InfoResponse {
    let mut admin = berth_api::client::connect_daemon(socket)
        .await
        .expect("connect to the Daemon service");
    admin
        .info(berth_api::daemon_proto::InfoRequest {})
        .await
        .expect("Info")
        .into_inner()
}

/// Asks berthd for Daemon.Upgrade in place and waits for the new image to answer; returns the
/// old image's Info and the new one's.
pub async fn upgrade_in_place(
    socket: &Path,
) -> (
    berth_api::daemon_proto::InfoResponse,
    berth_api::daemon_proto::InfoResponse,
) {
    let mut admin = berth_api::client::connect_daemon(socket)
        .await
        .expect("connect to the Daemon service");
    let old = admin
        .info(berth_api::daemon_proto::InfoRequest {})
        .await
        .expect("Info")
        .into_inner();
    admin
        .upgrade(berth_api::daemon_proto::UpgradeRequest {})
        .await
        .expect("Upgrade");
    let new = new_image(socket, &old).await;
    (old, new)
}

/// The `berth` CLI beside berthd in the target directory, which scripts/test builds first (it
/// is another package's binary, so cargo builds it for no test of this one); or why not.
pub fn berth_cli() -> Result<PathBuf, String> {
    let cli = Path::new(env!("CARGO_BIN_EXE_berthd")).with_file_name("berth");
    if cli.exists() {
        Ok(cli)
    } else {
        Err(format!(
            "{} is not built (cargo build -p berth-cli; scripts/test does)",
            cli.display()
        ))
    }
}

/// Waits until an image other than `old` answers Info on `socket` (clients reconnect to the
/// same path; the new image answers once it has recovered), and returns its Info.
pub async fn new_image(
    socket: &Path,
    old: &berth_api::daemon_proto::InfoResponse,
) -> berth_api::daemon_proto::InfoResponse {
    let deadline = Instant::now() + EVENT_TIMEOUT;
    loop {
        assert!(Instant::now() < deadline, "the new image never answered");
        if let Ok(mut admin) = berth_api::client::connect_daemon(socket).await
            && let Ok(info) = admin.info(berth_api::daemon_proto::InfoRequest {}).await
            && info.get_ref().image_started != old.image_started
        {
            return info.into_inner();
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// The runc the tests run, found in PATH: wrapper runtimes hand their commands to it.
pub fn runc_in_path() -> PathBuf {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .map(|dir| dir.join("runc"))
        .find(|p| p.is_file())
        .expect("runc in PATH")
}

/// Looks at `done` every `every` until it holds; fails the test saying `what` if it does not
/// within `limit`.
pub async fn poll_until(
    limit: Duration,
    every: Duration,
    what: &str,
    mut done: impl FnMut() -> bool,
) {
    let deadline = Instant::now() + limit;
    while !done() {
        assert!(Instant::now() < deadline, "{what}");
        tokio::time::sleep(every).await;
    }
}

/// Writes an executable script `name` with `body` in `dir`: a wrapper runtime for one test.
pub fn write_script(dir: &Path, name: &str, body: &str) -> PathBuf {
    let script = dir.join(name);
    fs::write(&script, body).expect("write runtime script");
    fs::set_permissions(&script, fs::Permissions::from_mode(0o755)).expect("chmod script");
    script
}

/// A process holding a lease (fcntl F_SETLEASE) on `path` until dropped: a read lease, broken by
/// an open for writing, or a write lease, broken by any open. It ignores the SIGIO a break
/// sends, so the lease stays until the kernel's break time (45 s by default) runs out.
pub struct LeaseHolder(Child);

impl LeaseHolder {
    pub fn take(path: &Path, write: bool) -> LeaseHolder {
        use std::io::{BufRead, BufReader};
        // F_SETLEASE is 1024; F_RDLCK 0, F_WRLCK 1.
        let mut child = Command::new("python3")
            .args([
                "-c",
                "import fcntl, os, signal, sys\n\
                 signal.signal(signal.SIGIO, signal.SIG_IGN)\n\
                 fd = os.open(sys.argv[1], os.O_RDONLY)\n\
                 fcntl.fcntl(fd, 1024, int(sys.argv[2]))\n\
                 print('held', flush=True)\n\
                 sys.stdin.read()\n",
            ])
            .arg(path)
            .arg(if write { "1" } else { "0" })
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .expect("run python3");
        let mut held = String::new();
        BufReader::new(child.stdout.take().expect("holder's stdout"))
            .read_line(&mut held)
            .expect("read the lease holder");
        assert_eq!(held.trim(), "held", "no lease on {}", path.display());
        LeaseHolder(child)
    }
}

impl Drop for LeaseHolder {
    fn drop(&mut self) {
        // Its stdin closed, the holder ends, and its lease with it.
        drop(self.0.stdin.take());
        let _ = self.0.wait();
    }
}

// ----- a runtime that hangs -----

/// Writes, in `dir`, a runtime that is real runc except that a container's start hangs: `start`
/// sleeps `secs` seconds instead, and `run --detach` (the default create mode) creates the
/// container and then sleeps instead of starting it. Either way a create through it hangs with a
/// created container until berthd gives up.
pub fn slow_start_runtime(dir: &Path, secs: u32) -> PathBuf {
    let body = format!(
        r#"#!/bin/sh
run=
for arg in "$@"; do
  shift
  case "$arg" in
    start) exec sleep {secs} ;;
    run) run=1; set -- "$@" create ;;
    --detach) [ -n "$run" ] || set -- "$@" "$arg" ;;
    *) set -- "$@" "$arg" ;;
  esac
done
[ -n "$run" ] || exec {runc} "$@"
{runc} "$@" || exit
exec sleep {secs}
"#,
        runc = runc_in_path().display()
    );
    write_script(dir, "slow-start-runc", &body)
}

/// Writes, in `dir`, a runtime that is real runc for every command except `command`, which
/// sleeps `secs` seconds instead.
pub fn slow_runtime(dir: &Path, command: &str, secs: u32) -> PathBuf {
    let body = format!(
        "#!/bin/sh\nfor arg in \"$@\"; do\n  [ \"$arg\" = {command} ] && exec sleep {secs}\ndone\nexec {} \"$@\"\n",
        runc_in_path().display()
    );
    write_script(dir, &format!("slow-{command}-runc"), &body)
}

/// Writes, in `dir`, a runtime that is real runc, except that `command` first waits `secs`
/// seconds: a request through it is in flight for that long and then completes for real.
pub fn delayed_runtime(dir: &Path, command: &str, secs: u32) -> PathBuf {
    let body = format!(
        "#!/bin/sh\nfor arg in \"$@\"; do\n  [ \"$arg\" = {command} ] && sleep {secs}\ndone\nexec {} \"$@\"\n",
        runc_in_path().display()
    );
    write_script(dir, &format!("delayed-{command}-runc"), &body)
}

/// Whether process `pid` runs `sleep <secs>`.
fn sleeps_for(pid: u32, secs: u32) -> bool {
    let cmdline = format!("sleep\0{secs}\0");
    fs::read(format!("/proc/{pid}/cmdline")).is_ok_and(|c| c == cmdline.as_bytes())
}

/// The pids of the slow runtime's `sleep <secs>` below berthd.
pub fn slow_starts(berthd: u32, secs: u32) -> Vec<u32> {
    descendants_of(berthd)
        .into_iter()
        .filter(|&pid| sleeps_for(pid, secs))
        .collect()
}

/// The slow runtime's `sleep <secs>` below berthd, once one runs.
pub async fn slow_start_running(berthd: u32, secs: u32) -> Vec<u32> {
    let deadline = Instant::now() + EVENT_TIMEOUT;
    loop {
        let running = slow_starts(berthd, secs);
        if !running.is_empty() {
            return running;
        }
        assert!(
            Instant::now() < deadline,
            "the runtime command that sleeps {secs} s never ran"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// The pids of processes anywhere on the host that run `sleep <secs>`.
pub fn sleeps_of(secs: u32) -> Vec<u32> {
    fs::read_dir("/proc")
        .expect("read /proc")
        .filter_map(|entry| entry.ok()?.file_name().to_str()?.parse::<u32>().ok())
        .filter(|&pid| sleeps_for(pid, secs))
        .collect()
}

#[test]
fn fds_are_compared_as_a_multiset_of_targets() {
    let fds = |list: &[&str]| list.iter().map(|s| s.to_string()).collect::<Vec<_>>();
    let before = fds(&["anon_inode:[pidfd]", "anon_inode:[pidfd]", "socket:[1]"]);
    let now = fds(&["anon_inode:[pidfd]", "socket:[2]", "anon_inode:[pidfd]"]);
    // Same count, but socket:[1] was closed and socket:[2] opened: that is a new fd.
    assert_eq!(multiset_minus(&now, &before), ["socket:[2]"]);
    let now = fds(&["anon_inode:[pidfd]"; 3]);
    assert_eq!(multiset_minus(&now, &before), ["anon_inode:[pidfd]"]);
    assert!(multiset_minus(&before[..1], &before).is_empty());
}

/// `source` mirrored at `point` through FUSE by bindfs, unmounted when dropped.
pub struct FuseMirror {
    point: PathBuf,
}

impl FuseMirror {
    /// None after a loud skip where bindfs cannot mount.
    pub fn mount(source: &Path, point: &Path) -> Option<FuseMirror> {
        let mounted = Command::new("bindfs")
            .arg(source)
            .arg(point)
            .output()
            .map_err(|e| format!("bindfs: {e} (install bindfs)"))
            .and_then(|out| {
                out.status.success().then_some(()).ok_or_else(|| {
                    format!("bindfs: {}", String::from_utf8_lossy(&out.stderr).trim())
                })
            });
        if !host_supports("needs a FUSE mount (bindfs)", mounted) {
            return None;
        }
        Some(FuseMirror {
            point: point.to_owned(),
        })
    }
}

impl Drop for FuseMirror {
    /// Unmounts, lazily if the mount is still busy, so nothing is removed through it and no
    /// mount is left behind (declare it after the directories it mounts on).
    fn drop(&mut self) {
        let unmounted = |lazy: bool| {
            let mut umount = Command::new("umount");
            if lazy {
                umount.arg("-l");
            }
            umount.arg(&self.point).status().is_ok_and(|s| s.success())
        };
        if !unmounted(false) && !unmounted(true) {
            eprintln!("could not unmount {}", self.point.display());
        }
    }
}
