//! The daemon as one call, in the shape of tokio-rs/mini-redis: [`run`] serves the API on a
//! listener until a shutdown future completes or an upgrade is ready, and says which.
//!
//! Owns: the wiring and its order (state directory and its lock, reaper, runtime, event bus,
//! stats hub, supervisor, recovery before the orphan sweep, the metrics endpoint, the gRPC
//! server), the upgrade trigger (Daemon.Upgrade and SIGUSR2) with its pre-flight, and a
//! graceful stop; and what berthd needs around [`run`]: the API socket and its lock, the open
//! file limit.
//! Does not own: what must happen before any thread exists (forking the spawn helper, taking an
//! inherited listener, tracing: berthd's `main`), the `execve` of an upgrade (berthd's `main`,
//! through [`crate::upgrade`]), or what a request does (api, supervisor).

use std::fs::File;
use std::future::Future;
use std::io::{Read, Write};
use std::os::fd::OwnedFd;
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::UnixListener;
use std::path::{Path, PathBuf};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, SystemTime};

use tokio::signal::unix::{SignalKind, signal};
use tokio_stream::StreamExt;
use tonic::service::interceptor::InterceptedService;

use crate::api::content_type::GrpcOnlyLayer;
use crate::api::daemon::{DaemonService, UpgradeOrder, UpgradeReady};
use crate::api::grpc_message::{MessageLimits, status_on_the_wire};
use crate::api::one_message::OneMessageLayer;
use crate::api::pacing::AnswerPacingLayer;
use crate::api::peer::Gate;
use crate::api::request_budget::{self, RequestBudgetLayer};
use crate::api::service::ApiService;
use crate::config::{Config, CreateMode, StatsBackend, resolve_runtime};
use crate::daemon_proto::daemon_server::DaemonServer;
use crate::edge::{self, Edge};
use crate::error::{Error, Result};
use crate::events::EventBus;
use crate::hand_back::HandBack;
use crate::instruments::RpcMetricsLayer;
use crate::listener::{self, Limited, Limits};
use crate::metrics::{self, Metrics};
use crate::notify;
use crate::proto::api_server::ApiServer;
use crate::reaper::Reaper;
use crate::runtime::builtin::BUILTIN;
use crate::runtime::{
    self, Completion, Outcome, Runtime, RuntimeBinary, SpawnOptions, SpawnStdio, Spawner,
};
use crate::stats::{self, StatsHub};
use crate::store::Store;
use crate::supervisor::{ClientFileLimits, Machine, OperationLimits, Supervisor};

/// How long requests in flight get to finish once berthd is told to stop.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(5);
/// How long an upgrade waits after answering before the exec drops the connection.
const UPGRADE_REPLY_GRACE: Duration = Duration::from_millis(100);
/// How long the binary an upgrade would run has to pass `--preflight`.
const PREFLIGHT_TIMEOUT: Duration = Duration::from_secs(10);
/// hyper's own default, which tonic overrides with none.
const MAX_LOCAL_ERROR_RESETS: usize = 1024;
/// h2's default.
const MAX_PENDING_ACCEPT_RESETS: usize = 20;

/// What berthd must do once [`run`] returns.
#[derive(Debug)]
pub enum Exit {
    /// Told to stop: the server is down and the socket file removed. Containers keep running.
    Stopped,
    /// An upgrade passed its pre-flight and the server is down: `execve` `binary`, handing over
    /// `listener`, which still listens (clients connecting meanwhile queue for the new image).
    Upgrade { binary: PathBuf, listener: OwnedFd },
}

/// Serves the API on `listener`, bound at `config.listen` (whose [`SocketLock`] the caller
/// holds, if the path is shared), until `shutdown` completes or an upgrade is ready. Every
/// runtime command, and an upgrade's pre-flight, runs through `spawner`.
///
/// Call inside a multi-thread tokio runtime, and call it again only in a new one: the tasks it
/// leaves (exit watchers, the orphan sweeper) belong to this run and end with its runtime.
pub async fn run(
    config: Config,
    spawner: Arc<dyn Spawner>,
    listener: UnixListener,
    shutdown: impl Future<Output = ()>,
) -> Result<Exit> {
    // Kept apart from the server's copy: it outlives the server, to be handed to an upgrade.
    let handover = OwnedFd::from(listener);
    match serve(&config, spawner, &handover, shutdown).await {
        Ok(Some(binary)) => Ok(Exit::Upgrade {
            binary,
            listener: handover,
        }),
        stopped => {
            if !config.socket_activated {
                let _ = std::fs::remove_file(&config.listen);
            }
            // A unix socket the metrics endpoint bound, as the API's is removed (only a socket:
            // a start that failed may have refused a file there).
            if let Some(path) = config.metrics_listen.as_ref().filter(|a| a.contains('/')) {
                let _ = crate::listener::remove_stale_socket(Path::new(path));
            }
            stopped.map(|_| Exit::Stopped)
        }
    }
}

/// Wires the daemon, serves, and returns the binary to upgrade to, or `None` once stopped.
async fn serve(
    config: &Config,
    spawner: Arc<dyn Spawner>,
    handover: &OwnedFd,
    shutdown: impl Future<Output = ()>,
) -> Result<Option<PathBuf>> {
    let image = image()?;
    // From the start: recovering thousands of containers may outlast the watchdog's timeout.
    notify::spawn_watchdog();
    rustix::process::set_child_subreaper(Some(rustix::process::getpid()))
        .map_err(|e| Error::sys("become the child subreaper", e))?;
    private_dir(&config.state_dir)?;
    let _state_lock = lock(
        &config.state_dir.join("berthd.lock"),
        "state dir",
        &config.state_dir,
    )?;
    let binary = runtime_binary(config)?;

    let reaper = Reaper::new();
    tracing::info!(
        adopted_exit_codes = if reaper.exit_info_supported() {
            "exact, from the pidfd (PIDFD_INFO_EXIT), for exits while berthd runs; those the host's init reaped while berthd was away are 255"
        } else {
            "unknown (255): this kernel has no PIDFD_INFO_EXIT"
        },
        "exit status path for processes adopted after a restart"
    );
    let scratch = config.scratch_dir();
    let runtime = Runtime::new(
        binary,
        Arc::clone(&spawner),
        config.runtime_timeout(),
        scratch.clone(),
    )
    .with_create_mode(match config.create_mode {
        CreateMode::Run => runtime::CreateMode::Run,
        CreateMode::CreateStart => runtime::CreateMode::CreateStart,
    });
    let runtime = match config.max_runtime_processes {
        Some(most) => runtime.with_max_processes(usize::try_from(most).unwrap_or(usize::MAX)),
        None => runtime,
    };
    // An added process's event holds its spec, with the bundle's env where it gives none.
    let largest_event = 2 * config.max_process_spec_bytes + 64 * 1024;
    let events =
        Arc::new(EventBus::new(config.events_buffer as usize).with_largest_event(largest_event));
    let backend = match config.stats_backend {
        StatsBackend::IoUring => stats::Backend::IoUring,
        StatsBackend::Pread => stats::Backend::Pread,
    };
    let stats = StatsHub::start(config.stats_interval, backend, Arc::clone(&events))?;
    let hand_back = HandBack::start()?;
    let supervisor = Supervisor::new(
        runtime,
        Arc::clone(&reaper),
        events,
        Arc::clone(&stats),
        Store::open(config.containers_dir(), hand_back.clone())?,
        scratch,
        machine(config),
        ClientFileLimits {
            max_bytes: config.client_file_max_bytes,
            timeout: Duration::from_secs(config.client_file_timeout),
        },
        OperationLimits {
            per_uid: usize::try_from(config.max_operations_per_uid).unwrap_or(usize::MAX),
            total: usize::try_from(config.max_operations).unwrap_or(usize::MAX),
        },
        hand_back,
    )?;
    // Checked off the start path: the log says soon whether checkpoints can work here.
    let checking = Arc::clone(&supervisor);
    tokio::spawn(async move {
        let _ = checking.criu_ready().await;
    });
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
        let listener = metrics::Listener::bind(addr).await?;
        let metrics = Arc::new(Metrics::new(
            Arc::clone(&supervisor),
            stats,
            config.metrics_containers,
        ));
        tracing::info!(addr = %addr, bound = ?listener.local_addr(), "metrics endpoint serving /metrics");
        let most = config.metrics_max_connections as usize;
        tokio::spawn(listener.serve(metrics, most, metrics_stopping));
    }

    let (upgrade_tx, mut upgrade_rx) = tokio::sync::mpsc::channel(1);
    let serving = Serving::start(
        config,
        handover,
        Gate::new(group_id(&config.group)?),
        Arc::clone(&supervisor),
        DaemonService::new(upgrade_tx, image.started),
    )?;
    tracing::info!(
        listen = %config.listen.display(),
        state_dir = %config.state_dir.display(),
        runtime = %config.runtime,
        "berthd serving"
    );
    notify::ready(recovery.adopted);

    let mut usr2 =
        signal(SignalKind::user_defined2()).map_err(|e| Error::sys("watch SIGUSR2", e))?;
    let mut shutdown = std::pin::pin!(shutdown);
    let upgrade = loop {
        let order = tokio::select! {
            () = &mut shutdown => break None,
            _ = usr2.recv() => None,
            order = upgrade_rx.recv() => order,
        };
        match preflight(spawner.as_ref(), &image.exe).await {
            Ok(ready) => {
                if let Some(order) = order {
                    let _ = order.reply.send(Ok(ready));
                }
                refuse_pending_upgrades(&mut upgrade_rx, "berthd is already upgrading");
                // Let the answers reach their clients before the server goes.
                tokio::time::sleep(UPGRADE_REPLY_GRACE).await;
                break Some(image.exe.clone());
            }
            Err(e) => {
                tracing::error!(error = %e, "upgrade refused; still serving");
                if let Some(order) = order {
                    let _ = order.reply.send(Err(e));
                }
            }
        }
    };
    refuse_pending_upgrades(&mut upgrade_rx, "berthd is stopping");
    match &upgrade {
        // The handed-over descriptor keeps the socket listening meanwhile.
        Some(binary) => {
            tracing::info!(binary = %binary.display(), "upgrading in place");
            notify::reloading();
        }
        None => {
            tracing::info!("stopping; containers keep running");
            notify::stopping();
        }
    }
    // Operations are the supervisor's, not their requests': let them finish (within one runtime
    // timeout) so their clients get answers and nothing is cut in half by the exit or execve.
    // Then no exit is collected any more, and the clean-ups of those collected meanwhile are
    // waited for: all within the one bound.
    let grace_ends = tokio::time::Instant::now() + config.runtime_timeout();
    supervisor.drain_operations(config.runtime_timeout()).await;
    let left = grace_ends.saturating_duration_since(tokio::time::Instant::now());
    let abandoned = supervisor.stop_collecting_exits(left).await;
    if abandoned > 0 {
        tracing::warn!(
            abandoned,
            "operations or clean-ups after exits still in flight after the grace period; the next start removes what they left"
        );
    }
    let _ = metrics_stop.send(true);
    serving.stop().await;
    if upgrade.is_some() {
        supervisor.hand_over_terminals().await;
    }
    Ok(upgrade)
}

/// Answers every Upgrade queued behind the one being carried out, and any asked from now on,
/// with UNAVAILABLE: an order left in the queue would be cut off by the `execve` or the exit
/// with no answer at all.
fn refuse_pending_upgrades(orders: &mut tokio::sync::mpsc::Receiver<UpgradeOrder>, why: &str) {
    orders.close();
    while let Ok(order) = orders.try_recv() {
        let _ = order.reply.send(Err(Error::Unavailable(format!(
            "{why}; ask again once it answers"
        ))));
    }
}

/// This process image: the binary an upgrade executes and when the image started. Recorded when
/// the image first runs the daemon and kept for its lifetime: an upgrade runs whatever binary is
/// at that path by then, while `/proc/self/exe` names a replaced one "… (deleted)".
struct Image {
    exe: PathBuf,
    /// Nanoseconds since the epoch, as Daemon.Info reports it.
    started: u64,
}

fn image() -> Result<&'static Image> {
    static IMAGE: OnceLock<Image> = OnceLock::new();
    if let Some(image) = IMAGE.get() {
        return Ok(image);
    }
    let started = SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as u64);
    let exe = std::env::current_exe().map_err(|e| Error::sys("find berthd's own binary", e))?;
    Ok(IMAGE.get_or_init(|| Image { exe, started }))
}

/// The gRPC server running on the listener, and how to stop it.
struct Serving {
    stop: tokio::sync::watch::Sender<bool>,
    server: tokio::task::JoinHandle<std::result::Result<(), tonic::transport::Error>>,
}

impl Serving {
    fn start(
        config: &Config,
        handover: &OwnedFd,
        gate: Gate,
        supervisor: Arc<Supervisor>,
        daemon: DaemonService,
    ) -> Result<Self> {
        let listener = handover
            .try_clone()
            .map_err(|e| Error::sys("duplicate the listener", e))?;
        let (stop, stopping) = tokio::sync::watch::channel(false);
        let mut stopped = stopping.clone();
        let max_message = config.max_message_bytes as usize;
        let message_limits =
            MessageLimits::new(max_message, config.max_process_spec_bytes as usize);
        let request_budget_size = request_budget::per_uid(message_limits.request_bytes);
        let limits = Limits::within_fd_limit(
            config.max_connections,
            config.max_connections_per_uid,
            config.handshake_timeout,
            request_budget_size,
            crate::api::pacing::answer_bytes_per_uid(max_message),
        );
        let incoming = listener::accept(listener, limits)
            .map_err(|e| Error::sys("register the listener", e))?
            .map(move |accepted| {
                accepted
                    .map(|a| Edge::new(Limited::new(a.socket, a.permit), limits.handshake_timeout))
            });
        let api = ApiService::new(supervisor, stopping)
            .limit(
                max_message,
                config.max_process_spec_bytes as usize,
                config.max_processes_per_container as usize,
            )
            .limit_streams(usize::try_from(config.max_streams_per_uid).unwrap_or(usize::MAX));
        let server = tokio::spawn(
            tonic::transport::Server::builder()
                .layer(GrpcOnlyLayer)
                .layer(RpcMetricsLayer)
                .layer(tower::util::MapResponseLayer::new(status_on_the_wire(
                    message_limits,
                )))
                // Before the pacing, which may hold a request waiting for its turn: a stream
                // is charged from its first frame.
                .layer(RequestBudgetLayer {
                    size: request_budget_size,
                })
                .layer(AnswerPacingLayer)
                .layer(OneMessageLayer)
                .max_concurrent_streams(config.max_streams_per_connection)
                .http2_max_header_list_size(edge::MAX_HEADER_LIST_SIZE)
                // Streams h2 resets for the client's errors, and streams the client resets
                // before they are served, end the connection past these counts (tonic leaves
                // the first unbounded: CVE-2025-8671; the second is h2's default, said here).
                .http2_max_local_error_reset_streams(Some(MAX_LOCAL_ERROR_RESETS))
                .http2_max_pending_accept_reset_streams(Some(MAX_PENDING_ACCEPT_RESETS))
                .http2_keepalive_interval(Some(config.keepalive))
                .http2_keepalive_timeout(Some(config.keepalive))
                // No compressed requests: tonic decompresses one whole while it waits for the
                // request's end, beyond the request budget, which counts the bytes on the wire
                // (a member's 1600 streams of 604 gzip bytes each took berthd to 1.86 GB).
                .add_service(InterceptedService::new(
                    ApiServer::new(api)
                        .max_decoding_message_size(message_limits.request_bytes)
                        .max_encoding_message_size(max_message),
                    gate,
                ))
                .add_service(InterceptedService::new(
                    DaemonServer::new(daemon)
                        .max_decoding_message_size(message_limits.request_bytes)
                        .max_encoding_message_size(max_message),
                    gate,
                ))
                .serve_with_incoming_shutdown(incoming, async move {
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

/// Runs the binary an upgrade would execute with this image's own flags and `--preflight`, so a
/// missing, broken or hanging binary is refused while this image still serves.
async fn preflight(spawner: &dyn Spawner, exe: &Path) -> Result<UpgradeReady> {
    let binary = exe.display().to_string();
    let mut argv = vec![binary.clone()];
    argv.extend(
        std::env::args_os()
            .skip(1)
            .map(|a| a.to_string_lossy().into_owned()),
    );
    argv.push("--preflight".into());
    let response = spawner
        .spawn(
            argv,
            SpawnStdio::captured(),
            SpawnOptions {
                timeout: PREFLIGHT_TIMEOUT,
                log: None,
                kill_if_berthd_dies: false,
            },
        )
        .await?;
    let version = version_of(&binary, response)?;
    Ok(UpgradeReady { binary, version })
}

/// The version a pre-flight run of `binary` printed, or why it is refused.
fn version_of(binary: &str, response: Completion) -> Result<String> {
    let status = match response.outcome {
        Outcome::Exited { code } => code,
        Outcome::TimedOut => {
            return Err(Error::FailedPrecondition(format!(
                "{binary} --preflight did not finish within {} s; not upgrading to it",
                PREFLIGHT_TIMEOUT.as_secs()
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
            "{binary} --preflight failed ({}); not upgrading to it",
            response.stderr.trim()
        )));
    }
    Ok(response.stdout.trim().to_owned())
}

/// The runtime binary the config names, found in PATH, with its `--criu` checked: what both a
/// start and an upgrade's pre-flight must refuse before anything runs.
fn runtime_binary(config: &Config) -> Result<RuntimeBinary> {
    config.check_limits()?;
    if config.runtime == BUILTIN {
        return builtin_runtime(config);
    }
    let binary = RuntimeBinary {
        path: resolve_runtime(&config.runtime, std::env::var_os("PATH").as_deref())?,
        root: config.runtime_root(),
        criu: config.criu.clone(),
    };
    binary.check_criu_flag()?;
    Ok(binary)
}

/// `--runtime builtin`: no binary to find; refused when this build lacks it, or with a CRIU it
/// would never run.
fn builtin_runtime(config: &Config) -> Result<RuntimeBinary> {
    if !cfg!(feature = "builtin") {
        return Err(Error::InvalidArgument(
            "--runtime builtin: this berthd was built without the builtin feature (cargo build --features builtin); use --runtime runc".into(),
        ));
    }
    if let Some(criu) = &config.criu {
        return Err(Error::InvalidArgument(format!(
            "--criu {} cannot be used with --runtime builtin: it has no checkpoints; use --runtime runc",
            criu.display()
        )));
    }
    Ok(RuntimeBinary {
        path: BUILTIN.into(),
        root: config.runtime_root(),
        criu: None,
    })
}

/// `berthd --preflight`: whether this binary can start with `config`, changing nothing. Returns
/// the version line an upgrade reports.
pub fn preflight_check(config: &Config) -> Result<String> {
    runtime_binary(config)?;
    group_id(&config.group)?;
    let own = rustix::process::pidfd_open(
        rustix::process::getpid(),
        rustix::process::PidfdFlags::empty(),
    )
    .map_err(|e| Error::sys("probe pidfd_open (Linux 5.3 or later needed)", e))?;
    drop(own);
    let resolve = rustix::fs::ResolveFlags::BENEATH | rustix::fs::ResolveFlags::NO_SYMLINKS;
    rustix::fs::openat2(
        rustix::fs::CWD,
        "/",
        rustix::fs::OFlags::PATH | rustix::fs::OFlags::CLOEXEC,
        rustix::fs::Mode::empty(),
        rustix::fs::ResolveFlags::empty(),
    )
    .and_then(|root| {
        rustix::fs::openat2(
            &root,
            ".",
            rustix::fs::OFlags::PATH | rustix::fs::OFlags::CLOEXEC,
            rustix::fs::Mode::empty(),
            resolve,
        )
    })
    .map_err(|e| Error::sys("probe openat2 (Linux 5.6 or later needed)", e))?;
    for dir in [config.state_dir.clone(), config.containers_dir()] {
        let flags = rustix::fs::OFlags::RDONLY
            | rustix::fs::OFlags::DIRECTORY
            | rustix::fs::OFlags::NOFOLLOW
            | rustix::fs::OFlags::CLOEXEC;
        match rustix::fs::open(&dir, flags, rustix::fs::Mode::empty()) {
            Ok(fd) => {
                rustix::fs::Dir::read_from(&fd)
                    .map_err(|e| Error::io(&dir, e.into()))?
                    .next();
            }
            // A first start makes it.
            Err(rustix::io::Errno::NOENT) => {}
            Err(e) => return Err(Error::io(&dir, e.into())),
        }
    }
    Ok(format!("berthd {}", env!("CARGO_PKG_VERSION")))
}

/// The lock on the API socket's path (the file `<listen>.lock`, holding the pid): while it is
/// held, a socket file at the path belongs to this berthd, also across an upgrade.
pub struct SocketLock {
    listen: PathBuf,
    _file: File,
}

impl SocketLock {
    /// Creates the socket's directory (mode 0711) if it is missing and takes the lock, or says
    /// which berthd holds it.
    pub fn take(listen: &Path) -> Result<SocketLock> {
        if let Some(dir) = listen.parent().filter(|dir| !dir.exists()) {
            std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
            std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o711))
                .map_err(|e| Error::io(dir, e))?;
        }
        let path = PathBuf::from(format!("{}.lock", listen.display()));
        Ok(SocketLock {
            listen: listen.to_owned(),
            _file: lock(&path, "socket", listen)?,
        })
    }

    /// Binds the socket afresh, replacing a stale socket file (nothing else): mode 0660, owned
    /// by `group` (a name or a numeric gid).
    pub fn bind(&self, group: &str) -> Result<UnixListener> {
        let path = &self.listen;
        // We hold the socket's lock, so a socket file left there is stale.
        crate::listener::remove_stale_socket(path)?;
        let gid = group_id(group)?;
        let listener = UnixListener::bind(path).map_err(|e| Error::io(path, e))?;
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o660))
            .map_err(|e| Error::io(path, e))?;
        std::os::unix::fs::chown(path, None, Some(gid)).map_err(|e| Error::io(path, e))?;
        Ok(listener)
    }
}

/// `--group` as a gid: a numeric gid or a group name.
fn group_id(group: &str) -> Result<u32> {
    match group.parse::<u32>() {
        Ok(gid) => Ok(gid),
        Err(_) => Ok(nix::unistd::Group::from_name(group)
            .map_err(|e| Error::sys(format!("look up group {group}"), e))?
            .ok_or_else(|| Error::NotFound(format!("group {group} does not exist")))?
            .gid
            .as_raw()),
    }
}

/// Takes an exclusive lock on `path`, writing our pid into it, or says who holds it. The file is
/// opened `O_NOFOLLOW` and must be a regular file with one link, so neither a symbolic nor a hard
/// link planted at that name (in a shared directory) gets truncated or written.
fn lock(path: &Path, what: &str, guarded: &Path) -> Result<File> {
    use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
    let mut file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .mode(0o600)
        .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK)
        .open(path)
        .map_err(|e| match e.raw_os_error() {
            Some(libc::ELOOP) => Error::FailedPrecondition(format!(
                "lock file {} is a symbolic link, which berthd does not follow; remove it",
                path.display()
            )),
            _ => Error::io(path, e),
        })?;
    let meta = file.metadata().map_err(|e| Error::io(path, e))?;
    if !meta.file_type().is_file() || meta.nlink() != 1 {
        return Err(Error::FailedPrecondition(format!(
            "lock file {} is not a regular file with a single link; remove it",
            path.display()
        )));
    }
    if rustix::fs::flock(&file, rustix::fs::FlockOperation::NonBlockingLockExclusive).is_err() {
        let mut holder = String::new();
        let _ = (&file).take(32).read_to_string(&mut holder);
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

/// Makes `dir` (and its parents) if missing and gives it mode 0700: berthd's state holds every
/// process's environment, which no other user may read. An existing directory is fixed too.
fn private_dir(dir: &Path) -> Result<()> {
    std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))
        .map_err(|e| Error::io(dir, e))
}

/// What State reports about this host: `--id` or the host name, CPUs, memory.
fn machine(config: &Config) -> Machine {
    let id = config.id.clone().unwrap_or_else(|| {
        rustix::system::uname()
            .nodename()
            .to_string_lossy()
            .into_owned()
    });
    let info = rustix::system::sysinfo();
    Machine {
        id,
        cpus: std::thread::available_parallelism().map_or(1, |n| n.get() as u32),
        memory: info.totalram as u64 * u64::from(info.mem_unit.max(1)),
    }
}

#[cfg(test)]
mod tests {
    use clap::Parser;

    use super::*;

    /// An upgrade's pre-flight refuses what the start would: a `--criu` that is not there.
    #[test]
    fn the_preflight_refuses_a_criu_the_start_would_refuse() {
        let dir = tempfile::tempdir().unwrap();
        let config = Config::parse_from([
            "berthd".as_ref(),
            "--runtime".as_ref(),
            "/bin/sh".as_ref(),
            "--criu".as_ref(),
            dir.path().join("no-criu").as_os_str(),
            "--state-dir".as_ref(),
            dir.path().as_os_str(),
        ]);
        let err = preflight_check(&config).unwrap_err();
        assert!(err.to_string().contains("--criu"), "{err}");
    }
}
