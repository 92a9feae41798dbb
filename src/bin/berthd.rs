//! berthd: flags → config, fork the spawn helper, become the child subreaper, set up tracing,
//! and serve the API until SIGTERM or SIGINT. Containers keep running when berthd stops.

use std::io::Write;
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use clap::Parser;
use tokio::signal::unix::{SignalKind, signal};
use tokio_stream::wrappers::UnixListenerStream;

use berth::api::daemon::{DaemonService, UpgradeReady};
use berth::api::service::ApiService;
use berth::config::{Config, LogFormat, resolve_runtime};
use berth::daemon_proto::daemon_server::DaemonServer;
use berth::error::{Error, Result};
use berth::events::EventBus;
use berth::proto::api_server::ApiServer;
use berth::reaper::Reaper;
use berth::runtime::{Runtime, RuntimeBinary, SpawnStdio};
use berth::spawn::protocol::Outcome;
use berth::spawn::{self, SpawnHelper};
use berth::stats::StatsHub;
use berth::store::Store;
use berth::supervisor::{Machine, Supervisor};
use berth::wait_status::exit_code;

/// How long requests in flight get to finish once berthd is told to stop.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(5);
/// How long an upgrade waits after answering before the exec drops the connection.
const UPGRADE_REPLY_GRACE: Duration = Duration::from_millis(100);

fn main() -> ExitCode {
    if std::env::args_os()
        .nth(1)
        .is_some_and(|a| a == spawn::HELPER_ARG)
    {
        spawn::serve_stdin();
    }
    let config = Config::parse();
    // Before any thread: an upgrade hands the listener over through the environment.
    let inherited = match berth::upgrade::take_inherited_listener() {
        Ok(inherited) => inherited,
        Err(e) => {
            eprintln!("berthd: {e}");
            return ExitCode::FAILURE;
        }
    };
    if let Err(e) = init_tracing(&config) {
        eprintln!("berthd: {e}");
        return ExitCode::FAILURE;
    }
    let runtime_path = match resolve_runtime(&config.runtime, std::env::var_os("PATH").as_deref()) {
        Ok(path) => path,
        Err(e) => {
            eprintln!("berthd: {e}");
            return ExitCode::FAILURE;
        }
    };
    // The helper is forked now, while berthd is one small thread; every runtime command is
    // forked from it later instead of from the grown daemon.
    let helper_socket = match spawn::fork_helper() {
        Ok(socket) => socket,
        Err(e) => {
            eprintln!("berthd: could not fork the spawn helper: {e}");
            return ExitCode::FAILURE;
        }
    };
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(e) => {
            eprintln!("berthd: could not start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(serve(config, runtime_path, helper_socket, inherited)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("berthd: {e}");
            ExitCode::FAILURE
        }
    }
}

fn init_tracing(config: &Config) -> std::result::Result<(), String> {
    let filter = tracing_subscriber::EnvFilter::try_new(&config.log_level)
        .map_err(|e| format!("invalid --log-level {:?}: {e}", config.log_level))?;
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match config.log_format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().init(),
    }
    Ok(())
}

async fn serve(
    config: Config,
    runtime_path: PathBuf,
    helper_socket: OwnedFd,
    inherited: Option<std::os::unix::net::UnixListener>,
) -> Result<()> {
    let image_started = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as u64);
    // Recorded now: an upgrade runs whatever binary is at this path by then.
    let exe = std::env::current_exe().map_err(|e| Error::sys("find berthd's own binary", e))?;
    raise_fd_limit();
    rustix::process::set_child_subreaper(Some(rustix::process::getpid()))
        .map_err(|e| Error::sys("become the child subreaper", e))?;

    std::fs::create_dir_all(&config.state_dir).map_err(|e| Error::io(&config.state_dir, e))?;
    let _state_lock = lock(
        &config.state_dir.join("berthd.lock"),
        "state dir",
        &config.state_dir,
    )?;
    let socket_lock_path = PathBuf::from(format!("{}.lock", config.listen.display()));
    if let Some(parent) = config.listen.parent() {
        create_socket_dir(parent)?;
    }
    let _socket_lock = lock(&socket_lock_path, "socket", &config.listen)?;
    let listener = match inherited {
        Some(listener) => listener,
        None => bind_socket(&config.listen, &config.group)?,
    };
    // Kept apart from the server's copy: it survives the server's shutdown and an upgrade.
    let handover = OwnedFd::from(listener);

    let reaper = Reaper::new();
    tracing::info!(
        adopted_exit_codes = if reaper.exit_info_supported() {
            "exact, from the pidfd (PIDFD_INFO_EXIT)"
        } else {
            "unknown (255): this kernel has no PIDFD_INFO_EXIT"
        },
        "exit status path for processes adopted after a restart"
    );
    let helper =
        SpawnHelper::start(helper_socket).map_err(|e| Error::sys("start the spawn helper", e))?;
    let scratch = config.scratch_dir();
    let binary = RuntimeBinary {
        path: runtime_path,
        root: config.runtime_root(),
    };
    let runtime = Runtime::new(
        binary,
        helper.clone(),
        config.runtime_timeout(),
        scratch.clone(),
    );
    let events = Arc::new(EventBus::new(config.events_buffer as usize));
    let stats = StatsHub::start(
        config.stats_interval,
        config.stats_backend,
        Arc::clone(&events),
    )?;
    let supervisor = Supervisor::new(
        runtime,
        Arc::clone(&reaper),
        events,
        Arc::clone(&stats),
        Store::open(config.containers_dir())?,
        scratch,
        machine(&config),
    )?;
    let recovery = supervisor
        .recover(Duration::from_secs(config.recovery_replay))
        .await?;
    tracing::info!(
        adopted = recovery.adopted,
        ended = recovery.ended,
        leftovers = recovery.leftovers,
        took_ms = recovery.took.as_millis() as u64,
        "state directory recovered"
    );
    // Only now: until every recorded process is tracked again, a sweep could reap one of them.
    reaper
        .spawn_orphan_sweeper()
        .map_err(|e| Error::sys("watch SIGCHLD", e))?;

    let (metrics_stop, metrics_stopping) = tokio::sync::watch::channel(false);
    if let Some(addr) = &config.metrics_listen {
        let listener = berth::metrics::Listener::bind(addr).await?;
        let metrics = Arc::new(berth::metrics::Metrics::new(Arc::clone(&supervisor), stats));
        tracing::info!(addr = %addr, bound = ?listener.local_addr(), "metrics endpoint serving /metrics");
        tokio::spawn(listener.serve(metrics, metrics_stopping));
    }

    let (upgrade_tx, mut upgrade_rx) = tokio::sync::mpsc::channel(1);
    let serve_on = |handover: &OwnedFd| -> Result<Serving> {
        let listener = handover
            .try_clone()
            .map_err(|e| Error::sys("duplicate the listener", e))?;
        Serving::start(
            listener,
            Arc::clone(&supervisor),
            DaemonService::new(upgrade_tx.clone(), image_started),
        )
    };
    let mut serving = serve_on(&handover)?;
    tracing::info!(
        listen = %config.listen.display(),
        state_dir = %config.state_dir.display(),
        runtime = %config.runtime,
        "berthd serving"
    );

    let mut term = signal(SignalKind::terminate()).map_err(|e| Error::sys("watch SIGTERM", e))?;
    let mut int = signal(SignalKind::interrupt()).map_err(|e| Error::sys("watch SIGINT", e))?;
    let mut usr2 =
        signal(SignalKind::user_defined2()).map_err(|e| Error::sys("watch SIGUSR2", e))?;
    loop {
        let order = tokio::select! {
            _ = term.recv() => break,
            _ = int.recv() => break,
            _ = usr2.recv() => None,
            order = upgrade_rx.recv() => order,
        };
        let binary = match check_binary(&helper, &exe).await {
            Ok(ready) => {
                let binary = ready.binary.clone();
                if let Some(order) = order {
                    let _ = order.reply.send(Ok(ready));
                    // Let the answer reach the client before the server goes.
                    tokio::time::sleep(UPGRADE_REPLY_GRACE).await;
                }
                binary
            }
            Err(e) => {
                tracing::error!(error = %e, "upgrade refused; still serving");
                if let Some(order) = order {
                    let _ = order.reply.send(Err(e));
                }
                continue;
            }
        };
        tracing::info!(binary = %binary, "upgrading in place");
        // The handed-over descriptor keeps the socket listening meanwhile: clients that
        // connect now are queued for the new image.
        serving.stop().await;
        let args: Vec<std::ffi::OsString> = std::env::args_os().skip(1).collect();
        let err = berth::upgrade::exec(&exe, &args, handover.as_fd());
        tracing::error!(error = %err, "upgrade failed; serving again");
        serving = serve_on(&handover)?;
    }
    tracing::info!("stopping; containers keep running");
    let _ = metrics_stop.send(true);
    serving.stop().await;
    let _ = std::fs::remove_file(&config.listen);
    Ok(())
}

/// The gRPC server running on the listener, and how to stop it.
struct Serving {
    stop: tokio::sync::watch::Sender<bool>,
    server: tokio::task::JoinHandle<std::result::Result<(), tonic::transport::Error>>,
}

impl Serving {
    fn start(
        listener: OwnedFd,
        supervisor: Arc<Supervisor>,
        daemon: DaemonService,
    ) -> Result<Self> {
        let listener = std::os::unix::net::UnixListener::from(listener);
        listener
            .set_nonblocking(true)
            .map_err(|e| Error::sys("make the listener non-blocking", e))?;
        let listener = tokio::net::UnixListener::from_std(listener)
            .map_err(|e| Error::sys("register the listener", e))?;
        let (stop, stopping) = tokio::sync::watch::channel(false);
        let mut stopped = stopping.clone();
        let server = tokio::spawn(
            tonic::transport::Server::builder()
                .add_service(ApiServer::new(ApiService::new(supervisor, stopping)))
                .add_service(DaemonServer::new(daemon))
                .serve_with_incoming_shutdown(UnixListenerStream::new(listener), async move {
                    let _ = stopped.wait_for(|stop| *stop).await;
                }),
        );
        Ok(Serving { stop, server })
    }

    /// Ends the streams (UNAVAILABLE: reconnect), lets requests in flight finish for a grace
    /// period, and stops accepting.
    async fn stop(self) {
        let _ = self.stop.send(true);
        match tokio::time::timeout(SHUTDOWN_GRACE, self.server).await {
            Ok(Ok(Err(e))) => tracing::error!(error = %e, "server error"),
            Err(_) => {
                tracing::warn!("requests still in flight after the grace period were dropped")
            }
            _ => {}
        }
    }
}

/// Runs the binary an upgrade would execute with `--version`, so a missing or broken binary
/// is refused while this image still serves.
async fn check_binary(helper: &SpawnHelper, exe: &Path) -> Result<UpgradeReady> {
    let binary = exe.display().to_string();
    let response = helper
        .run(
            vec![binary.clone(), "--version".into()],
            [SpawnStdio::Null, SpawnStdio::Capture, SpawnStdio::Capture],
            Duration::from_secs(10),
        )
        .await?;
    let status = match response.outcome {
        Outcome::Exited { wait_status } => exit_code(wait_status),
        Outcome::TimedOut => {
            return Err(Error::FailedPrecondition(format!(
                "{binary} --version did not finish; not upgrading to it"
            )));
        }
        Outcome::SpawnFailed { error } => {
            return Err(Error::FailedPrecondition(format!(
                "{binary} cannot run ({error}); not upgrading to it"
            )));
        }
    };
    if status != Some(0) || !response.stdout.starts_with("berthd ") {
        return Err(Error::FailedPrecondition(format!(
            "{binary} --version failed ({}); not upgrading to it",
            response.stderr.trim()
        )));
    }
    Ok(UpgradeReady {
        binary,
        version: response.stdout.trim().to_owned(),
    })
}

/// Dense hosts need several fds per container. The ceiling is the kernel's `fs/nr_open`, which
/// root (with CAP_SYS_RESOURCE) can raise the hard limit to; without it, the hard limit stays
/// the operator's ceiling and only the soft limit rises.
fn raise_fd_limit() {
    use rustix::process::{Resource, Rlimit, getrlimit, setrlimit};
    let before = getrlimit(Resource::Nofile);
    let ceiling = std::fs::read_to_string("/proc/sys/fs/nr_open")
        .ok()
        .and_then(|n| n.trim().parse::<u64>().ok());
    let wanted = |limit: Option<u64>| Rlimit {
        current: limit,
        maximum: limit,
    };
    let raised = ceiling.is_some_and(|n| setrlimit(Resource::Nofile, wanted(Some(n))).is_ok())
        || setrlimit(Resource::Nofile, wanted(before.maximum)).is_ok();
    let after = getrlimit(Resource::Nofile);
    if raised {
        tracing::info!(soft = ?after.current, hard = ?after.maximum, "open file limit");
    } else {
        tracing::warn!(soft = ?after.current, hard = ?after.maximum, "could not raise the open file limit");
    }
}

/// Takes an exclusive lock on `path`, writing our pid into it, or says who holds it.
fn lock(path: &Path, what: &str, guarded: &Path) -> Result<std::fs::File> {
    let mut file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(path)
        .map_err(|e| Error::io(path, e))?;
    if rustix::fs::flock(&file, rustix::fs::FlockOperation::NonBlockingLockExclusive).is_err() {
        let holder = std::fs::read_to_string(path).unwrap_or_default();
        return Err(Error::FailedPrecondition(format!(
            "another berthd (pid {}) is already using {what} {}; stop it first or choose another",
            holder.trim(),
            guarded.display()
        )));
    }
    file.set_len(0).map_err(|e| Error::io(path, e))?;
    write!(file, "{}", std::process::id()).map_err(|e| Error::io(path, e))?;
    Ok(file)
}

fn create_socket_dir(dir: &Path) -> Result<()> {
    if dir.exists() {
        return Ok(());
    }
    std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o711))
        .map_err(|e| Error::io(dir, e))
}

fn bind_socket(path: &Path, group: &str) -> Result<std::os::unix::net::UnixListener> {
    // We hold the socket's lock, so a socket file left there is stale.
    match std::fs::remove_file(path) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(Error::io(path, e)),
    }
    let gid = match group.parse::<u32>() {
        Ok(gid) => gid,
        Err(_) => nix::unistd::Group::from_name(group)
            .map_err(|e| Error::sys(format!("look up group {group}"), e))?
            .ok_or_else(|| Error::NotFound(format!("group {group} does not exist")))?
            .gid
            .as_raw(),
    };
    let listener = std::os::unix::net::UnixListener::bind(path).map_err(|e| Error::io(path, e))?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o660))
        .map_err(|e| Error::io(path, e))?;
    std::os::unix::fs::chown(path, None, Some(gid)).map_err(|e| Error::io(path, e))?;
    Ok(listener)
}

fn machine(config: &Config) -> Machine {
    let id = config.id.clone().unwrap_or_else(|| {
        nix::unistd::gethostname()
            .map(|h| h.to_string_lossy().into_owned())
            .unwrap_or_default()
    });
    let info = rustix::system::sysinfo();
    Machine {
        id,
        cpus: std::thread::available_parallelism().map_or(1, |n| n.get() as u32),
        memory: info.totalram as u64 * u64::from(info.mem_unit.max(1)),
    }
}
