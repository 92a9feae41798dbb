//! berthd: flags → config, fork the spawn helper, become the child subreaper, set up tracing,
//! and serve the API until SIGTERM or SIGINT. Containers keep running when berthd stops.

use std::io::Write;
use std::os::fd::OwnedFd;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use clap::Parser;
use tokio::signal::unix::{SignalKind, signal};
use tokio_stream::wrappers::UnixListenerStream;

use berth::api::service::ApiService;
use berth::config::{Config, LogFormat, resolve_runtime};
use berth::error::{Error, Result};
use berth::events::EventBus;
use berth::proto::api_server::ApiServer;
use berth::reaper::Reaper;
use berth::runtime::{Runtime, RuntimeBinary};
use berth::spawn::{self, SpawnHelper};
use berth::store::Store;
use berth::supervisor::{Machine, Supervisor};

/// How long requests in flight get to finish once berthd is told to stop.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(5);

fn main() -> ExitCode {
    if std::env::args_os()
        .nth(1)
        .is_some_and(|a| a == spawn::HELPER_ARG)
    {
        spawn::serve_stdin();
    }
    let config = Config::parse();
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
    match runtime.block_on(serve(config, runtime_path, helper_socket)) {
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

async fn serve(config: Config, runtime_path: PathBuf, helper_socket: OwnedFd) -> Result<()> {
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
    let listener = bind_socket(&config.listen, &config.group)?;

    let reaper = Reaper::new();
    reaper
        .spawn_orphan_sweeper()
        .map_err(|e| Error::sys("watch SIGCHLD", e))?;
    let helper =
        SpawnHelper::start(helper_socket).map_err(|e| Error::sys("start the spawn helper", e))?;
    let scratch = config.scratch_dir();
    let binary = RuntimeBinary {
        path: runtime_path,
        root: config.runtime_root(),
    };
    let runtime = Runtime::new(binary, helper, config.runtime_timeout(), scratch.clone());
    let supervisor = Supervisor::new(
        runtime,
        reaper,
        Arc::new(EventBus::new(config.events_buffer as usize)),
        Store::open(config.containers_dir())?,
        scratch,
        machine(&config),
    )?;

    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let service = ApiServer::new(ApiService::new(supervisor, stop_rx.clone()));
    let mut stopped = stop_rx.clone();
    let server = tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(service)
            .serve_with_incoming_shutdown(UnixListenerStream::new(listener), async move {
                let _ = stopped.wait_for(|stop| *stop).await;
            }),
    );
    tracing::info!(
        listen = %config.listen.display(),
        state_dir = %config.state_dir.display(),
        runtime = %config.runtime,
        "berthd serving"
    );

    wait_for_stop_signal().await?;
    tracing::info!("stopping; containers keep running");
    let _ = stop_tx.send(true);
    match tokio::time::timeout(SHUTDOWN_GRACE, server).await {
        Ok(Ok(Err(e))) => tracing::error!(error = %e, "server error"),
        Err(_) => tracing::warn!("requests still in flight after the grace period were dropped"),
        _ => {}
    }
    let _ = std::fs::remove_file(&config.listen);
    Ok(())
}

async fn wait_for_stop_signal() -> Result<()> {
    let mut term = signal(SignalKind::terminate()).map_err(|e| Error::sys("watch SIGTERM", e))?;
    let mut int = signal(SignalKind::interrupt()).map_err(|e| Error::sys("watch SIGINT", e))?;
    tokio::select! {
        _ = term.recv() => {}
        _ = int.recv() => {}
    }
    Ok(())
}

/// Dense hosts need an fd per container and more; the hard limit is the operator's ceiling.
fn raise_fd_limit() {
    use rustix::process::{Resource, getrlimit, setrlimit};
    let mut limit = getrlimit(Resource::Nofile);
    if limit.current != limit.maximum {
        limit.current = limit.maximum;
        if let Err(e) = setrlimit(Resource::Nofile, limit) {
            tracing::warn!(error = %e, "could not raise the open file limit");
        }
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

fn bind_socket(path: &Path, group: &str) -> Result<tokio::net::UnixListener> {
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
    let listener = tokio::net::UnixListener::bind(path).map_err(|e| Error::io(path, e))?;
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
