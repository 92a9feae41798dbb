//! berthd: the work that must come before any thread exists (signals as a parent may have left
//! them, the spawn helper's fork, taking the listener and pty masters handed over by an upgrade or
//! the listener passed by the service manager), tracing, the socket, then
//! [`berth::daemon::run`] until SIGTERM or SIGINT, or an upgrade's `execve`. Containers keep
//! running when berthd stops.

use std::io::IsTerminal;
use std::os::fd::AsFd;
use std::os::unix::net::UnixListener;
use std::process::ExitCode;
use std::time::Duration;

use clap::Parser;
use tokio::signal::unix::{SignalKind, signal};

use berth::config::{Config, LogFormat};
use berth::daemon::{self, Exit, SocketLock};
use berth::error::{Error, Result};
use berth::spawn::{self, SpawnHelper};

/// How long the runtime of a run whose upgrade failed to exec gets to wind down before the next.
const RUN_WIND_DOWN: Duration = Duration::from_secs(5);

/// Undoes what a parent can leave behind through exec that berthd and its spawn helper (forked
/// or exec'd from here) cannot work with: an ignored SIGCHLD makes the kernel reap every child at
/// once, so the helper's `waitpid` fails and no runtime command is ever reported (berthd does not
/// even finish starting: recovery's `runtime list` never ends); a blocked SIGCHLD or SIGTERM is
/// never delivered, so orphans are not swept and berthd does not stop.
///
/// # Safety
///
/// Call before any thread exists: the mask is the calling thread's, and threads started later
/// inherit it.
#[allow(unsafe_code)]
unsafe fn default_signals() {
    // SAFETY: SIG_DFL installs no handler, so no code of ours runs in a signal's context.
    unsafe { libc::signal(libc::SIGCHLD, libc::SIG_DFL) };
    let mut none = std::mem::MaybeUninit::<libc::sigset_t>::uninit();
    // SAFETY: sigemptyset initialises the set it is given; sigprocmask reads it once initialised
    // and takes no old set.
    unsafe {
        libc::sigemptyset(none.as_mut_ptr());
        libc::sigprocmask(libc::SIG_SETMASK, none.as_ptr(), std::ptr::null_mut());
    }
}

#[allow(unsafe_code)]
fn main() -> ExitCode {
    // SAFETY: the first thing done, before any thread exists.
    unsafe { default_signals() };
    // The umask passes through exec too. Under 000 the directories berthd makes on the way to its
    // socket and state would be writable by every user, who could then swap them for their own.
    // 022, a root shell's, also gives the runtime commands the same files as by hand.
    rustix::process::umask(rustix::fs::Mode::from_raw_mode(0o022));
    if std::env::args_os()
        .nth(1)
        .is_some_and(|a| a == spawn::HELPER_ARG)
    {
        spawn::serve_stdin();
    }
    let mut config = Config::parse();
    if config.preflight {
        return match daemon::preflight_check(&config) {
            Ok(version) => {
                println!("{version}");
                ExitCode::SUCCESS
            }
            Err(e) => fail(format!("pre-flight failed: {e}")),
        };
    }
    // An upgrade hands the listener over through the environment.
    // SAFETY: the only call, made before any thread exists.
    let inherited = match unsafe { berth::upgrade::take_inherited_listener() } {
        Ok(inherited) => inherited,
        Err(e) => return fail(e),
    };
    // ... and the containers' pty masters and stdin pipes, for recovery to resume their relays.
    // SAFETY: the only call, made before any thread exists.
    let stdio_problems = unsafe { berth::upgrade::take_inherited_stdio() };
    // SAFETY: the only call, made before any thread exists.
    let activated = match unsafe { berth::upgrade::take_activated_listener() } {
        Ok(activated) => activated,
        Err(e) => return fail(e),
    };
    let taken: Vec<_> = inherited
        .iter()
        .chain(&activated)
        .map(AsFd::as_fd)
        .collect();
    // SAFETY: nothing has opened a descriptor since main began but the takes just above.
    unsafe { berth::upgrade::close_untaken_descriptors(&taken) };
    if let Some(listener) = &activated {
        if let Err(e) = check_activated_path(listener, &config) {
            return fail(e);
        }
        config.socket_activated = true;
    }
    if let Err(e) = init_tracing(&config) {
        return fail(e);
    }
    for problem in stdio_problems {
        tracing::warn!(
            problem,
            "terminal or stdin lost: a descriptor handed over by the upgrade could not be taken"
        );
    }
    // The helper is forked now, while berthd is one small thread; every runtime command is
    // forked from it later instead of from the grown daemon.
    // SAFETY: no thread has been started yet (tracing's subscriber starts none).
    let helper_socket = match unsafe { spawn::fork_helper() } {
        Ok(socket) => socket,
        Err(e) => return fail(format!("could not fork the spawn helper: {e}")),
    };
    berth::fd_limit::raise();
    let socket_lock = match SocketLock::take(&config.listen) {
        Ok(lock) => lock,
        Err(e) => return fail(e),
    };
    let mut handed_over = inherited.or(activated);
    loop {
        // A runtime per run: dropping it ends every task of the run before the next adopts
        // the same containers.
        let runtime = match tokio::runtime::Builder::new_multi_thread()
            .enable_all()
            .build()
        {
            Ok(runtime) => runtime,
            Err(e) => return fail(format!("could not start the async runtime: {e}")),
        };
        let exit = runtime.block_on(async {
            // Watched before the socket exists: a stop that comes as soon as clients can
            // connect must find its handler, not kill berthd and leave the socket file.
            let stop = stop_signal()?;
            let listener = match handed_over.take() {
                Some(listener) => listener,
                None => socket_lock.bind(&config.group)?,
            };
            let helper = helper_socket
                .try_clone()
                .and_then(SpawnHelper::start)
                .map_err(|e| Error::sys("start the spawn helper", e))?;
            daemon::run(config.clone(), helper, listener, stop).await
        });
        let (binary, handover) = match exit {
            Ok(Exit::Stopped) => return ExitCode::SUCCESS,
            Ok(Exit::Upgrade { binary, listener }) => (binary, listener),
            Err(e) => return fail(e),
        };
        let mut args: Vec<std::ffi::OsString> = std::env::args_os().skip(1).collect();
        // The next image must not remove the service manager's socket either.
        if config.socket_activated && !args.iter().any(|a| a == "--socket-activated") {
            args.push("--socket-activated".into());
        }
        let err = berth::upgrade::exec(&binary, &args, handover.as_fd());
        tracing::error!(error = %err, "upgrade failed; serving again");
        runtime.shutdown_timeout(RUN_WIND_DOWN);
        handed_over = Some(UnixListener::from(handover));
    }
}

/// The socket the service manager passed must be the one `--listen` names: berthd's socket lock
/// and its logs go by that path.
fn check_activated_path(listener: &UnixListener, config: &Config) -> Result<()> {
    let address = listener
        .local_addr()
        .map_err(|e| Error::sys("read the activated socket's address", e))?;
    match address.as_pathname() {
        Some(path) if path == config.listen => Ok(()),
        other => Err(Error::InvalidArgument(format!(
            "the socket passed by the service manager is {}, but --listen is {}; make them the same (ListenStream= in berthd.socket)",
            other.map_or_else(|| "not a path".into(), |p| p.display().to_string()),
            config.listen.display()
        ))),
    }
}

fn fail(e: impl std::fmt::Display) -> ExitCode {
    eprintln!("berthd: {e}");
    ExitCode::FAILURE
}

fn init_tracing(config: &Config) -> std::result::Result<(), String> {
    let filter = tracing_subscriber::EnvFilter::try_new(&config.log_level)
        .map_err(|e| format!("invalid --log-level {:?}: {e}", config.log_level))?;
    // Colours only on a terminal: a log file or the journal would keep the escape codes.
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::stderr().is_terminal())
        .with_writer(std::io::stderr);
    match config.log_format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().init(),
    }
    Ok(())
}

/// Completes on SIGTERM or SIGINT. Must be called inside the tokio runtime.
fn stop_signal() -> Result<impl Future<Output = ()>> {
    let mut term = signal(SignalKind::terminate()).map_err(|e| Error::sys("watch SIGTERM", e))?;
    let mut int = signal(SignalKind::interrupt()).map_err(|e| Error::sys("watch SIGINT", e))?;
    Ok(async move {
        tokio::select! {
            _ = term.recv() => {}
            _ = int.recv() => {}
        }
    })
}
