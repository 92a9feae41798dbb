//! `berth`: the command-line client of berthd. It speaks only the wire API (`proto/api.proto`).

#![deny(unsafe_code)]

use std::borrow::Cow;
use std::fmt::Write as _;
use std::fs::File;
use std::io::{self, IsTerminal, Read, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::pin::pin;
use std::process::ExitCode;
use std::str::FromStr;
use std::time::{SystemTime, UNIX_EPOCH};

use berth::proto::api_client::ApiClient;
use berth::proto::{
    AddProcessRequest, Checkpoint, Container, CreateContainerRequest, Event, EventsRequest,
    Machine, Process, SignalRequest, StateRequest, StateResponse, UpdateContainerRequest, User,
};
use clap::{Args, Parser, Subcommand};
use nix::fcntl::{FcntlArg, OFlag, fcntl};
use nix::sys::signal::Signal;
use nix::sys::stat::Mode;
use nix::sys::termios::{self, SetArg, Termios};
use serde_json::{Value, json};
use tokio::signal::unix::{Signal as UnixSignal, SignalKind, signal};
use tokio::sync::oneshot;
use tonic::transport::Channel;
use tonic::{Code, Status, Streaming};

#[derive(Parser)]
#[command(
    name = "berth",
    version,
    about = "Command-line client of berthd, the berth container daemon"
)]
struct Cli {
    /// The unix socket berthd listens on
    #[arg(
        long,
        env = "BERTH_ADDRESS",
        default_value = "/run/berth/berth.sock",
        global = true
    )]
    address: PathBuf,

    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// List containers: id, init pid, status, process count, bundle
    Containers {
        /// Print a JSON array instead of a table
        #[arg(long)]
        json: bool,
    },
    /// Create and start a container from an OCI bundle; prints the init's pid
    ///
    /// With --attach, the container's stdio goes through FIFOs in a private temporary directory:
    /// berth forwards its stdin, streams stdout and stderr, and exits with the init's exit code.
    /// The first SIGINT or SIGTERM berth receives is forwarded to the init; a second one detaches,
    /// leaving the container running.
    Run(RunArgs),
    /// Send a signal to a container's init, or to one of its processes
    Kill {
        /// Container id
        id: String,
        /// Process to signal (default: the container's init)
        pid: Option<u32>,
        /// Signal number or name (TERM, SIGTERM, KILL, HUP, ...)
        #[arg(short, long, default_value = "TERM", value_parser = parse_signal)]
        signal: u32,
    },
    /// Run a process in a running container and attach to it, exiting with its exit code
    ///
    /// The process's stdio goes through FIFOs in a private temporary directory: berth forwards its
    /// stdin, streams stdout and stderr, and exits with the process's exit code. The first SIGINT
    /// or SIGTERM berth receives is forwarded to the process; a second one detaches, leaving it
    /// running. With --detach, berth prints the pid and returns at once.
    Exec(ExecArgs),
    /// Freeze every process of a container
    Pause {
        /// Container id
        id: String,
    },
    /// Thaw a paused container
    Resume {
        /// Container id
        id: String,
    },
    /// Show the machine and every container's processes
    State {
        /// Print berthd's whole state as one JSON object
        #[arg(long)]
        json: bool,
    },
    /// Stream berthd's events, one line each, until interrupted
    Events {
        /// Print one JSON object per line
        #[arg(long)]
        json: bool,
    },
}

#[derive(Args)]
struct RunArgs {
    /// Container id
    id: String,
    /// Path to the OCI bundle (the directory holding config.json)
    bundle: PathBuf,
    /// Stream the container's stdio through FIFOs and exit with its exit code
    #[arg(long, conflicts_with_all = ["stdin", "stdout", "stderr", "console"])]
    attach: bool,
    /// Existing file or FIFO for the init's stdin
    #[arg(long)]
    stdin: Option<PathBuf>,
    /// Existing file or FIFO for the init's stdout
    #[arg(long)]
    stdout: Option<PathBuf>,
    /// Existing file or FIFO for the init's stderr
    #[arg(long)]
    stderr: Option<PathBuf>,
    /// Console path, used when the bundle sets process.terminal
    #[arg(long)]
    console: Option<PathBuf>,
}

#[derive(Args)]
struct ExecArgs {
    /// Container id
    id: String,
    /// Give the process a terminal (our terminal is put in raw mode meanwhile)
    #[arg(short, long)]
    tty: bool,
    /// Numeric UID[:GID] to run as; GID defaults to 0 (default: the container's user)
    #[arg(short, long, value_name = "UID[:GID]", value_parser = parse_user)]
    user: Option<User>,
    /// Working directory inside the container (default: the container's)
    #[arg(short = 'w', long, value_name = "DIR")]
    cwd: Option<String>,
    /// Environment variable added to the container's environment, repeatable
    #[arg(short, long = "env", value_name = "K=V", value_parser = parse_env)]
    env: Vec<String>,
    /// Print the process's pid and return instead of attaching
    #[arg(short, long)]
    detach: bool,
    /// Command and arguments
    #[arg(required = true, trailing_var_arg = true, value_name = "ARGS")]
    args: Vec<String>,
}

#[derive(Debug, thiserror::Error)]
enum Error {
    #[error(
        "cannot connect to berthd at {}: {}; {}",
        .address.display(),
        root_cause(.source),
        connect_hint(.source)
    )]
    Connect {
        address: PathBuf,
        source: tonic::transport::Error,
    },
    #[error("{} ({})", status_message(.0), code_name(.0.code()))]
    Rpc(#[from] Status),
    #[error("{context}: {source}")]
    Io { context: String, source: io::Error },
    #[error("path {} is not valid UTF-8", .0.display())]
    NonUtf8Path(PathBuf),
    #[error("no container with id {0:?}")]
    NoSuchContainer(String),
    #[error("container {0:?} has no processes")]
    NoProcesses(String),
    #[error("berthd ended the event stream before process {pid} of {id} exited")]
    EventsEnded { id: String, pid: u32 },
    #[error(
        "lost berthd's event stream while waiting for process {pid} of {id} to exit: {} ({})",
        status_message(.status),
        code_name(.status.code())
    )]
    EventsLost {
        id: String,
        pid: u32,
        status: Status,
    },
    #[error("detached from process {pid} of {id}, which keeps running")]
    Detached { id: String, pid: u32 },
    /// Our stdout was closed by its reader (`berth events | head`): not worth a message.
    #[error("stdout is closed")]
    StdoutClosed,
}

fn io_error(context: impl Into<String>) -> impl FnOnce(io::Error) -> Error {
    let context = context.into();
    move |source| Error::Io { context, source }
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> ExitCode {
    let cli = Cli::parse();
    match execute(cli).await {
        Ok(code) => code,
        Err(Error::StdoutClosed) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("berth: {error}");
            ExitCode::FAILURE
        }
    }
}

async fn execute(cli: Cli) -> Result<ExitCode, Error> {
    let mut client = berth::api::client::connect(&cli.address)
        .await
        .map_err(|source| Error::Connect {
            address: cli.address.clone(),
            source,
        })?;
    match cli.command {
        Command::Containers { json } => {
            let state = fetch_state(&mut client).await?;
            if json {
                print_json_pretty(&containers_json(&state.containers))?;
            } else {
                write_stdout(&containers_table(&state.containers))?;
            }
        }
        Command::Run(args) => return run(client, args).await,
        Command::Kill { id, pid, signal } => {
            let pid = match pid {
                Some(pid) => pid,
                None => init_process(&mut client, &id).await?.pid,
            };
            client.signal(SignalRequest { id, pid, signal }).await?;
        }
        Command::Exec(args) => return exec(client, args).await,
        Command::Pause { id } => set_status(&mut client, id, "paused").await?,
        Command::Resume { id } => set_status(&mut client, id, "running").await?,
        Command::State { json } => {
            let state = fetch_state(&mut client).await?;
            if json {
                print_json_pretty(&state_json(&state))?;
            } else {
                write_stdout(&state_text(&state))?;
            }
        }
        Command::Events { json } => watch_events(&mut client, json).await?,
    }
    Ok(ExitCode::SUCCESS)
}

async fn fetch_state(client: &mut ApiClient<Channel>) -> Result<StateResponse, Error> {
    Ok(client.state(StateRequest {}).await?.into_inner())
}

async fn init_process(client: &mut ApiClient<Channel>, id: &str) -> Result<Process, Error> {
    let state = fetch_state(client).await?;
    let container = state
        .containers
        .into_iter()
        .find(|container| container.id == id)
        .ok_or_else(|| Error::NoSuchContainer(id.to_owned()))?;
    // The daemon lists the init first.
    container
        .processes
        .into_iter()
        .next()
        .ok_or_else(|| Error::NoProcesses(id.to_owned()))
}

async fn set_status(
    client: &mut ApiClient<Channel>,
    id: String,
    status: &str,
) -> Result<(), Error> {
    client
        .update_container(UpdateContainerRequest {
            id,
            signal: 0,
            status: status.to_owned(),
        })
        .await?;
    Ok(())
}

async fn run(mut client: ApiClient<Channel>, args: RunArgs) -> Result<ExitCode, Error> {
    // berthd resolves paths itself, from its own working directory.
    let bundle_path = absolute_utf8(&args.bundle)?;
    if !args.attach {
        let request = CreateContainerRequest {
            id: args.id,
            bundle_path,
            stdin: optional_absolute_utf8(args.stdin.as_deref())?,
            stdout: optional_absolute_utf8(args.stdout.as_deref())?,
            stderr: optional_absolute_utf8(args.stderr.as_deref())?,
            console: optional_absolute_utf8(args.console.as_deref())?,
            checkpoint: String::new(),
        };
        let pid = client.create_container(request).await?.into_inner().pid;
        write_stdout(&format!("{pid}\n"))?;
        return Ok(ExitCode::SUCCESS);
    }
    let attachment = Attachment::create()?;
    // Subscribing first means the exit cannot be missed, however soon it comes.
    let events = client.events(EventsRequest {}).await?.into_inner();
    let request = CreateContainerRequest {
        id: args.id.clone(),
        bundle_path,
        stdin: attachment.path_of("stdin")?,
        stdout: attachment.path_of("stdout")?,
        stderr: attachment.path_of("stderr")?,
        console: String::new(),
        checkpoint: String::new(),
    };
    let pid = client.create_container(request).await?.into_inner().pid;
    let status = attachment.attach(client, events, args.id, pid).await?;
    Ok(exit_code(status))
}

async fn exec(mut client: ApiClient<Channel>, args: ExecArgs) -> Result<ExitCode, Error> {
    // berthd gives a process with an empty env the container's, and any other env as it is; so
    // variables given here go on top of the init's environment rather than losing its PATH.
    let env = if args.env.is_empty() {
        Vec::new()
    } else {
        let init = init_process(&mut client, &args.id).await?;
        merge_env(&init.env, &args.env)
    };
    let mut request = AddProcessRequest {
        id: args.id.clone(),
        terminal: args.tty,
        user: args.user,
        args: args.args,
        env,
        cwd: args.cwd.unwrap_or_default(),
        stdin: String::new(),
        stdout: String::new(),
        stderr: String::new(),
        console: String::new(),
    };
    if args.detach {
        let pid = client.add_process(request).await?.into_inner().pid;
        write_stdout(&format!("{pid}\n"))?;
        return Ok(ExitCode::SUCCESS);
    }
    let attachment = Attachment::create()?;
    request.stdin = attachment.path_of("stdin")?;
    request.stdout = attachment.path_of("stdout")?;
    request.stderr = attachment.path_of("stderr")?;
    // Subscribing first means the exit cannot be missed, however soon it comes.
    let events = client.events(EventsRequest {}).await?.into_inner();
    let pid = client.add_process(request).await?.into_inner().pid;
    let _raw_terminal = if args.tty && io::stdin().is_terminal() {
        Some(RawTerminal::enter()?)
    } else {
        None
    };
    let status = attachment.attach(client, events, args.id, pid).await?;
    Ok(exit_code(status))
}

fn exit_code(status: u32) -> ExitCode {
    ExitCode::from(u8::try_from(status).unwrap_or(u8::MAX))
}

/// The stdio FIFOs of an attached process, in a private directory that is removed on drop.
struct Attachment {
    dir: TempDir,
    stdin_writer: File,
    stdout_reader: File,
    stderr_reader: File,
    // Watched from the start, so a Ctrl-C while the process is being started is forwarded to it
    // once it runs, instead of killing berth and leaving the directory behind.
    interrupts: UnixSignal,
    terminations: UnixSignal,
}

impl Attachment {
    fn create() -> Result<Self, Error> {
        let interrupts =
            signal(SignalKind::interrupt()).map_err(io_error("watching for SIGINT"))?;
        let terminations =
            signal(SignalKind::terminate()).map_err(io_error("watching for SIGTERM"))?;
        let template = std::env::temp_dir().join("berth-attach-XXXXXX");
        let dir = nix::unistd::mkdtemp(&template).map_err(|errno| {
            io_error(format!("creating a directory like {}", template.display()))(errno.into())
        })?;
        let dir = TempDir(dir);
        for name in ["stdin", "stdout", "stderr"] {
            let path = dir.0.join(name);
            nix::unistd::mkfifo(&path, Mode::S_IRUSR | Mode::S_IWUSR).map_err(|errno| {
                io_error(format!("making fifo {}", path.display()))(errno.into())
            })?;
        }
        // Our read sides are open before berthd opens the write sides, so its non-blocking opens
        // find a reader. Opening them must not wait for a writer either; reads then block as
        // usual, and start only once berthd has opened the write side.
        let open_reader = |name: &str| {
            let path = dir.0.join(name);
            let context = format!("opening {}", path.display());
            let reader = std::fs::OpenOptions::new()
                .read(true)
                .custom_flags(OFlag::O_NONBLOCK.bits())
                .open(&path)
                .map_err(io_error(context.clone()))?;
            fcntl(&reader, FcntlArg::F_SETFL(OFlag::empty()))
                .map_err(|errno| io_error(context)(errno.into()))?;
            Ok::<_, Error>(reader)
        };
        let stdout_reader = open_reader("stdout")?;
        let stderr_reader = open_reader("stderr")?;
        // Read-write, so opening does not wait for a reader and the process sees no EOF on stdin
        // until we close it.
        let stdin_path = dir.0.join("stdin");
        let stdin_writer = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(&stdin_path)
            .map_err(io_error(format!("opening {}", stdin_path.display())))?;
        Ok(Self {
            dir,
            stdin_writer,
            stdout_reader,
            stderr_reader,
            interrupts,
            terminations,
        })
    }

    fn path_of(&self, name: &str) -> Result<String, Error> {
        utf8(self.dir.0.join(name))
    }

    /// Forwards stdin, streams stdout and stderr until EOF, and returns the exit status from the
    /// `exit` event of (`id`, `pid`).
    async fn attach(
        self,
        mut client: ApiClient<Channel>,
        mut events: Streaming<Event>,
        id: String,
        pid: u32,
    ) -> Result<u32, Error> {
        // The directory lives until we return; dropping it removes the FIFOs.
        let Self {
            dir: _dir,
            stdin_writer,
            stdout_reader,
            stderr_reader,
            mut interrupts,
            mut terminations,
        } = self;
        forward_stdin(stdin_writer);
        let stdout_relayed = relay_in_thread(stdout_reader, io::stdout());
        let stderr_relayed = relay_in_thread(stderr_reader, io::stderr());
        let finished = async {
            let ((), (), status) = tokio::try_join!(
                stdout_relayed,
                stderr_relayed,
                wait_for_exit(&mut events, &id, pid)
            )?;
            Ok(status)
        };
        let mut finished = pin!(finished);
        let mut forwarded = false;
        loop {
            let received = tokio::select! {
                result = &mut finished => return result,
                _ = interrupts.recv() => Signal::SIGINT,
                _ = terminations.recv() => Signal::SIGTERM,
            };
            if forwarded {
                return Err(Error::Detached {
                    id: id.clone(),
                    pid,
                });
            }
            forwarded = true;
            // A failure here means the process is already gone; its exit event follows.
            let _ = client
                .signal(SignalRequest {
                    id: id.clone(),
                    pid,
                    signal: received as u32,
                })
                .await;
        }
    }
}

/// A directory removed, with its contents, when dropped.
struct TempDir(PathBuf);

impl Drop for TempDir {
    fn drop(&mut self) {
        // Nothing useful can be done if it fails; the directory is in the temp dir.
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Copies our stdin into the process's stdin FIFO, then closes it so the process sees EOF.
fn forward_stdin(mut writer: File) {
    // A plain thread: a blocking read of our stdin cannot be cancelled, and unlike tokio's
    // blocking pool a detached thread does not hold up the exit.
    std::thread::spawn(move || {
        // Forwarding ends at EOF or at the first error; either way dropping the writer closes it.
        let _ = io::copy(&mut io::stdin().lock(), &mut writer);
    });
}

/// Runs [`relay`] in a thread of its own, so a slow reader of our output never delays reading
/// the event stream, and a relay still running (detached) does not hold up the exit.
fn relay_in_thread(
    mut from: File,
    mut to: impl Write + Send + 'static,
) -> impl Future<Output = Result<(), Error>> {
    let (done, finished) = oneshot::channel();
    std::thread::spawn(move || {
        // Nobody waits for the result any more once we have detached.
        let _ = done.send(relay(&mut from, &mut to));
    });
    async {
        finished
            .await
            // A dropped sender means the relay thread panicked.
            .unwrap_or_else(|_| Err(io::Error::other("the relay thread stopped")))
            .map_err(io_error("relaying the process's output"))
    }
}

/// Copies `from` to `to` until EOF. If `to` is closed by its reader, keeps draining `from` so
/// the process never blocks on a full pipe.
fn relay(from: &mut impl Read, to: &mut impl Write) -> io::Result<()> {
    let mut buffer = vec![0; 64 * 1024];
    let mut to_open = true;
    loop {
        let read = match from.read(&mut buffer) {
            Ok(0) => return Ok(()),
            Ok(read) => read,
            Err(error) if error.kind() == io::ErrorKind::Interrupted => continue,
            Err(error) => return Err(error),
        };
        if to_open {
            // Flushing every chunk shows prompts that end without a newline.
            match to.write_all(&buffer[..read]).and_then(|()| to.flush()) {
                Err(error) if error.kind() == io::ErrorKind::BrokenPipe => to_open = false,
                other => other?,
            }
        }
    }
}

async fn wait_for_exit(events: &mut Streaming<Event>, id: &str, pid: u32) -> Result<u32, Error> {
    let lost = |status| Error::EventsLost {
        id: id.to_owned(),
        pid,
        status,
    };
    while let Some(event) = events.message().await.map_err(lost)? {
        if event.r#type == "exit" && event.id == id && event.pid == pid {
            return Ok(event.status);
        }
    }
    Err(Error::EventsEnded {
        id: id.to_owned(),
        pid,
    })
}

/// Our terminal in raw mode, so keys reach the process's terminal untouched; restored on drop.
struct RawTerminal {
    original: Termios,
}

impl RawTerminal {
    fn enter() -> Result<Self, Error> {
        let terminal_error =
            |errno: nix::Error| io_error("setting the terminal to raw mode")(errno.into());
        let original = termios::tcgetattr(io::stdin()).map_err(terminal_error)?;
        let mut raw = original.clone();
        termios::cfmakeraw(&mut raw);
        termios::tcsetattr(io::stdin(), SetArg::TCSANOW, &raw).map_err(terminal_error)?;
        Ok(Self { original })
    }
}

impl Drop for RawTerminal {
    fn drop(&mut self) {
        // If the terminal is gone there is nothing left to restore.
        let _ = termios::tcsetattr(io::stdin(), SetArg::TCSANOW, &self.original);
    }
}

async fn watch_events(client: &mut ApiClient<Channel>, json: bool) -> Result<(), Error> {
    let mut events = client.events(EventsRequest {}).await?.into_inner();
    while let Some(event) = events.message().await? {
        let received = SystemTime::now();
        let line = if json {
            event_json(&event, received).to_string()
        } else {
            event_line(&event, received)
        };
        write_stdout(&format!("{line}\n"))?;
    }
    Ok(())
}

fn write_stdout(text: &str) -> Result<(), Error> {
    let mut stdout = io::stdout().lock();
    match stdout
        .write_all(text.as_bytes())
        .and_then(|()| stdout.flush())
    {
        Err(error) if error.kind() == io::ErrorKind::BrokenPipe => Err(Error::StdoutClosed),
        result => result.map_err(io_error("writing to stdout")),
    }
}

fn print_json_pretty(value: &Value) -> Result<(), Error> {
    // Serializing a Value cannot fail: its map keys are strings.
    let text = serde_json::to_string_pretty(value).unwrap_or_default();
    write_stdout(&format!("{text}\n"))
}

fn utf8(path: PathBuf) -> Result<String, Error> {
    path.into_os_string()
        .into_string()
        .map_err(|path| Error::NonUtf8Path(path.into()))
}

fn absolute_utf8(path: &Path) -> Result<String, Error> {
    let absolute =
        std::path::absolute(path).map_err(io_error(format!("resolving {}", path.display())))?;
    utf8(absolute)
}

fn optional_absolute_utf8(path: Option<&Path>) -> Result<String, Error> {
    path.map_or_else(|| Ok(String::new()), absolute_utf8)
}

/// Parses a signal given as a number or a name, with or without the SIG prefix, in any case.
fn parse_signal(text: &str) -> Result<u32, String> {
    if let Ok(number) = text.parse::<u32>() {
        return Ok(number);
    }
    let upper = text.to_ascii_uppercase();
    let name = upper.strip_prefix("SIG").unwrap_or(&upper);
    Signal::from_str(&format!("SIG{name}"))
        .map(|signal| signal as u32)
        .map_err(|_| {
            format!("unknown signal {text:?}: give a number or a name such as TERM, KILL or HUP")
        })
}

/// Parses `UID[:GID]`; the gid defaults to 0 since ids are numeric and no passwd file is read.
fn parse_user(text: &str) -> Result<User, String> {
    let (uid, gid) = match text.split_once(':') {
        Some((uid, gid)) => (uid, Some(gid)),
        None => (text, None),
    };
    let number = |field: &str, value: &str| {
        value.parse::<u32>().map_err(|_| {
            format!("{field} {value:?} is not a number: the user is numeric UID[:GID]")
        })
    };
    Ok(User {
        uid: number("uid", uid)?,
        gid: gid.map(|gid| number("gid", gid)).transpose()?.unwrap_or(0),
        additional_gids: Vec::new(),
    })
}

fn parse_env(text: &str) -> Result<String, String> {
    match text.split_once('=') {
        Some((key, _)) if !key.is_empty() => Ok(text.to_owned()),
        _ => Err(format!("{text:?} is not KEY=VALUE")),
    }
}

/// `base` with each `K=V` of `overrides` replacing the entry for K, or added at the end.
fn merge_env(base: &[String], overrides: &[String]) -> Vec<String> {
    let key = |entry: &str| {
        entry
            .split_once('=')
            .map_or(entry, |(key, _)| key)
            .to_owned()
    };
    let mut merged = base.to_vec();
    for entry in overrides {
        let overridden = key(entry);
        merged.retain(|existing| key(existing) != overridden);
        merged.push(entry.clone());
    }
    merged
}

fn status_message(status: &Status) -> &str {
    if status.message().is_empty() {
        status.code().description()
    } else {
        status.message()
    }
}

/// The canonical gRPC name of a status code, as other gRPC tools print it.
fn code_name(code: Code) -> &'static str {
    match code {
        Code::Ok => "OK",
        Code::Cancelled => "CANCELLED",
        Code::Unknown => "UNKNOWN",
        Code::InvalidArgument => "INVALID_ARGUMENT",
        Code::DeadlineExceeded => "DEADLINE_EXCEEDED",
        Code::NotFound => "NOT_FOUND",
        Code::AlreadyExists => "ALREADY_EXISTS",
        Code::PermissionDenied => "PERMISSION_DENIED",
        Code::ResourceExhausted => "RESOURCE_EXHAUSTED",
        Code::FailedPrecondition => "FAILED_PRECONDITION",
        Code::Aborted => "ABORTED",
        Code::OutOfRange => "OUT_OF_RANGE",
        Code::Unimplemented => "UNIMPLEMENTED",
        Code::Internal => "INTERNAL",
        Code::Unavailable => "UNAVAILABLE",
        Code::DataLoss => "DATA_LOSS",
        Code::Unauthenticated => "UNAUTHENTICATED",
    }
}

/// The innermost error of a chain: tonic's own message ("transport error") says nothing useful.
fn root_cause(error: &(dyn std::error::Error + 'static)) -> String {
    let mut innermost = error;
    while let Some(source) = innermost.source() {
        innermost = source;
    }
    innermost.to_string()
}

fn connect_hint(error: &(dyn std::error::Error + 'static)) -> &'static str {
    let mut current = Some(error);
    while let Some(error) = current {
        if let Some(io_error) = error.downcast_ref::<io::Error>()
            && io_error.kind() == io::ErrorKind::PermissionDenied
        {
            return "run as root or as a member of berthd's --group";
        }
        current = error.source();
    }
    "is berthd running? (point --address or BERTH_ADDRESS at its socket)"
}

/// Aligns `rows` under `header` in columns three spaces apart, with no trailing blanks.
fn format_table(header: &[&str], rows: &[Vec<String>]) -> String {
    let header: Vec<String> = header.iter().map(|title| (*title).to_owned()).collect();
    let mut widths: Vec<usize> = header.iter().map(|title| title.chars().count()).collect();
    for row in rows {
        for (width, cell) in widths.iter_mut().zip(row) {
            *width = (*width).max(cell.chars().count());
        }
    }
    let mut table = String::new();
    for row in std::iter::once(&header).chain(rows) {
        let mut line = String::new();
        for (cell, width) in row.iter().zip(&widths) {
            // Writing to a String cannot fail.
            let _ = write!(line, "{cell:<width$}   ");
        }
        table.push_str(line.trim_end());
        table.push('\n');
    }
    table
}

fn containers_table(containers: &[Container]) -> String {
    let rows: Vec<Vec<String>> = containers
        .iter()
        .map(|container| {
            vec![
                container.id.clone(),
                container
                    .processes
                    .first()
                    .map_or_else(|| "-".to_owned(), |init| init.pid.to_string()),
                container.status.clone(),
                container.processes.len().to_string(),
                container.bundle_path.clone(),
            ]
        })
        .collect();
    format_table(&["ID", "PID", "STATUS", "PROCESSES", "BUNDLE"], &rows)
}

fn containers_json(containers: &[Container]) -> Value {
    containers
        .iter()
        .map(|container| {
            json!({
                "id": container.id,
                "pid": container.processes.first().map(|init| init.pid),
                "status": container.status,
                "processes": container.processes.len(),
                "bundlePath": container.bundle_path,
            })
        })
        .collect()
}

fn state_text(state: &StateResponse) -> String {
    let machine = match &state.machine {
        Some(machine) => format!(
            "machine {}: {} cpus, {} memory\n",
            machine.id,
            machine.cpus,
            human_bytes(machine.memory)
        ),
        None => "machine: not reported\n".to_owned(),
    };
    let rows: Vec<Vec<String>> = state
        .containers
        .iter()
        .flat_map(|container| {
            container.processes.iter().map(|process| {
                vec![
                    container.id.clone(),
                    container.status.clone(),
                    process.pid.to_string(),
                    user_text(process.user.as_ref()),
                    if process.terminal { "yes" } else { "no" }.to_owned(),
                    process.cwd.clone(),
                    shell_words(&process.args),
                ]
            })
        })
        .collect();
    let table = format_table(
        &[
            "CONTAINER",
            "STATUS",
            "PID",
            "USER",
            "TERMINAL",
            "CWD",
            "ARGS",
        ],
        &rows,
    );
    format!("{machine}\n{table}")
}

/// `uid:gid`, with additional groups after a `+`.
fn user_text(user: Option<&User>) -> String {
    let Some(user) = user else {
        return "-".to_owned();
    };
    let mut text = format!("{}:{}", user.uid, user.gid);
    if !user.additional_gids.is_empty() {
        let groups: Vec<String> = user.additional_gids.iter().map(u32::to_string).collect();
        text.push('+');
        text.push_str(&groups.join(","));
    }
    text
}

/// Binary (1024-based) units with one decimal, bytes as they are.
fn human_bytes(bytes: u64) -> String {
    const UNITS: [&str; 6] = ["KiB", "MiB", "GiB", "TiB", "PiB", "EiB"];
    if bytes < 1024 {
        return format!("{bytes} B");
    }
    let mut value = bytes as f64 / 1024.0;
    let mut unit = 0;
    while value >= 1024.0 && unit + 1 < UNITS.len() {
        value /= 1024.0;
        unit += 1;
    }
    format!("{value:.1} {}", UNITS[unit])
}

/// Arguments joined so that a shell would split them back the same way.
fn shell_words(args: &[String]) -> String {
    args.iter()
        .map(|word| shell_quote(word))
        .collect::<Vec<_>>()
        .join(" ")
}

fn shell_quote(word: &str) -> Cow<'_, str> {
    let plain = !word.is_empty()
        && word
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "-_./=:,+@%".contains(c));
    if plain {
        Cow::Borrowed(word)
    } else {
        Cow::Owned(format!("'{}'", word.replace('\'', r"'\''")))
    }
}

/// Field names follow the proto3 JSON mapping (lowerCamelCase), as other clients of the API see them.
fn user_json(user: Option<&User>) -> Value {
    user.map_or(
        Value::Null,
        |user| json!({"uid": user.uid, "gid": user.gid, "additionalGids": user.additional_gids}),
    )
}

fn process_json(process: &Process) -> Value {
    json!({
        "pid": process.pid,
        "args": process.args,
        "env": process.env,
        "cwd": process.cwd,
        "user": user_json(process.user.as_ref()),
        "terminal": process.terminal,
    })
}

fn container_json(container: &Container) -> Value {
    json!({
        "id": container.id,
        "bundlePath": container.bundle_path,
        "status": container.status,
        "processes": container.processes.iter().map(process_json).collect::<Vec<_>>(),
    })
}

fn machine_json(machine: Option<&Machine>) -> Value {
    machine.map_or(
        Value::Null,
        |machine| json!({"id": machine.id, "cpus": machine.cpus, "memory": machine.memory}),
    )
}

fn checkpoint_json(checkpoint: Option<&Checkpoint>) -> Value {
    checkpoint.map_or(Value::Null, |checkpoint| {
        json!({
            "name": checkpoint.name,
            "exit": checkpoint.exit,
            "tcp": checkpoint.tcp,
            "unixSockets": checkpoint.unix_sockets,
            "shell": checkpoint.shell,
        })
    })
}

fn state_json(state: &StateResponse) -> Value {
    json!({
        "machine": machine_json(state.machine.as_ref()),
        "containers": state.containers.iter().map(container_json).collect::<Vec<_>>(),
    })
}

fn event_json(event: &Event, received: SystemTime) -> Value {
    json!({
        "time": rfc3339(received),
        "type": event.r#type,
        "id": event.id,
        "pid": event.pid,
        "status": event.status,
        "bundlePath": event.bundle_path,
        "signal": event.signal,
        "process": event.process.as_ref().map_or(Value::Null, process_json),
        "containers": event.containers.iter().map(container_json).collect::<Vec<_>>(),
        "checkpoint": checkpoint_json(event.checkpoint.as_ref()),
    })
}

/// One line per event: the time it was received, its type, the container, then the fields set.
fn event_line(event: &Event, received: SystemTime) -> String {
    let mut line = format!("{}  {:<15}  {}", rfc3339(received), event.r#type, event.id);
    if event.pid != 0 {
        let _ = write!(line, "  pid={}", event.pid);
    }
    // An exit status of 0 is news; elsewhere a zero status is just unset.
    if event.r#type == "exit" || event.status != 0 {
        let _ = write!(line, "  status={}", event.status);
    }
    if event.signal != 0 {
        let _ = write!(line, "  signal={}", event.signal);
    }
    if !event.bundle_path.is_empty() {
        let _ = write!(line, "  bundle={}", event.bundle_path);
    }
    if let Some(process) = &event.process {
        let _ = write!(line, "  args={}", shell_words(&process.args));
    }
    if let Some(checkpoint) = &event.checkpoint {
        let _ = write!(line, "  checkpoint={}", checkpoint.name);
    }
    line
}

/// UTC, millisecond precision: `2024-05-01T12:34:56.789Z`.
fn rfc3339(time: SystemTime) -> String {
    let since_epoch = time.duration_since(UNIX_EPOCH).unwrap_or_default();
    let seconds = since_epoch.as_secs();
    let (year, month, day) = civil_from_days(seconds / 86_400);
    let second_of_day = seconds % 86_400;
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}.{:03}Z",
        second_of_day / 3600,
        second_of_day % 3600 / 60,
        second_of_day % 60,
        since_epoch.subsec_millis()
    )
}

/// The proleptic Gregorian date of a day count since 1970-01-01 (Howard Hinnant's algorithm).
fn civil_from_days(days: u64) -> (u64, u64, u64) {
    let shifted = days + 719_468;
    let era = shifted / 146_097;
    let day_of_era = shifted % 146_097;
    let year_of_era =
        (day_of_era - day_of_era / 1460 + day_of_era / 36_524 - day_of_era / 146_096) / 365;
    let day_of_year = day_of_era - (365 * year_of_era + year_of_era / 4 - year_of_era / 100);
    let month_from_march = (5 * day_of_year + 2) / 153;
    let day = day_of_year - (153 * month_from_march + 2) / 5 + 1;
    let month = if month_from_march < 10 {
        month_from_march + 3
    } else {
        month_from_march - 9
    };
    let year = year_of_era + era * 400 + u64::from(month <= 2);
    (year, month, day)
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    #[test]
    fn signals_parse_from_numbers_and_names_in_any_form() {
        assert_eq!(parse_signal("9"), Ok(9));
        assert_eq!(parse_signal("TERM"), Ok(15));
        assert_eq!(parse_signal("SIGTERM"), Ok(15));
        assert_eq!(parse_signal("kill"), Ok(9));
        assert_eq!(parse_signal("sigHup"), Ok(1));
        assert_eq!(parse_signal("USR1"), Ok(10));
        assert!(parse_signal("NOPE").is_err());
        assert!(parse_signal("").is_err());
        assert!(parse_signal("-1").is_err());
    }

    #[test]
    fn users_are_numeric_with_gid_defaulting_to_zero() {
        let user = parse_user("1000").unwrap();
        assert_eq!((user.uid, user.gid), (1000, 0));
        let user = parse_user("1000:100").unwrap();
        assert_eq!((user.uid, user.gid), (1000, 100));
        assert!(user.additional_gids.is_empty());
        assert!(parse_user("root").is_err());
        assert!(parse_user("1000:").is_err());
        assert!(parse_user(":100").is_err());
        assert!(parse_user("1:2:3").is_err());
    }

    #[test]
    fn env_entries_need_a_key_and_an_equals_sign() {
        assert_eq!(parse_env("A=b"), Ok("A=b".to_owned()));
        assert_eq!(parse_env("A="), Ok("A=".to_owned()));
        assert_eq!(parse_env("A=b=c"), Ok("A=b=c".to_owned()));
        assert!(parse_env("A").is_err());
        assert!(parse_env("=b").is_err());
    }

    #[test]
    fn env_given_goes_on_top_of_the_container_env() {
        let strings = |entries: &[&str]| -> Vec<String> {
            entries.iter().map(|entry| (*entry).to_owned()).collect()
        };
        let base = strings(&["PATH=/bin", "TERM=xterm", "HOME=/"]);
        assert_eq!(
            merge_env(&base, &strings(&["TERM=dumb", "A=1", "A=2"])),
            strings(&["PATH=/bin", "HOME=/", "TERM=dumb", "A=2"])
        );
        assert_eq!(merge_env(&[], &strings(&["A=1"])), strings(&["A=1"]));
    }

    #[test]
    fn tables_align_columns_without_trailing_blanks() {
        let rows = vec![
            vec!["web".to_owned(), "12345".to_owned(), "".to_owned()],
            vec!["database-1".to_owned(), "7".to_owned(), "x".to_owned()],
        ];
        assert_eq!(
            format_table(&["ID", "PID", "NOTE"], &rows),
            "ID           PID     NOTE\n\
             web          12345\n\
             database-1   7       x\n"
        );
        assert_eq!(format_table(&["ID", "PID"], &[]), "ID   PID\n");
    }

    #[test]
    fn container_table_shows_the_init_pid_and_process_count() {
        let process = |pid| Process {
            pid,
            ..Process::default()
        };
        let containers = vec![
            Container {
                id: "c1".to_owned(),
                bundle_path: "/b".to_owned(),
                status: "running".to_owned(),
                processes: vec![process(40), process(41)],
                ..Container::default()
            },
            Container {
                id: "c2".to_owned(),
                bundle_path: "/b2".to_owned(),
                status: "paused".to_owned(),
                ..Container::default()
            },
        ];
        assert_eq!(
            containers_table(&containers),
            "ID   PID   STATUS    PROCESSES   BUNDLE\n\
             c1   40    running   2           /b\n\
             c2   -     paused    0           /b2\n"
        );
        assert_eq!(
            containers_json(&containers)[0],
            json!({"id": "c1", "pid": 40, "status": "running", "processes": 2, "bundlePath": "/b"})
        );
        assert_eq!(containers_json(&containers)[1]["pid"], Value::Null);
    }

    #[test]
    fn memory_is_shown_in_binary_units() {
        assert_eq!(human_bytes(0), "0 B");
        assert_eq!(human_bytes(1023), "1023 B");
        assert_eq!(human_bytes(1024), "1.0 KiB");
        assert_eq!(human_bytes(16_777_216_000), "15.6 GiB");
        assert_eq!(human_bytes(u64::MAX), "16.0 EiB");
    }

    #[test]
    fn args_are_quoted_only_when_a_shell_needs_it() {
        let args: Vec<String> = ["sh", "-c", "echo it's; sleep 1", ""]
            .iter()
            .map(|word| (*word).to_owned())
            .collect();
        assert_eq!(shell_words(&args), r"sh -c 'echo it'\''s; sleep 1' ''");
    }

    #[test]
    fn users_show_groups() {
        let user = User {
            uid: 1000,
            gid: 100,
            additional_gids: vec![10, 20],
        };
        assert_eq!(user_text(Some(&user)), "1000:100+10,20");
        assert_eq!(user_text(None), "-");
    }

    #[test]
    fn times_are_rfc3339_utc() {
        assert_eq!(rfc3339(UNIX_EPOCH), "1970-01-01T00:00:00.000Z");
        let leap_day = UNIX_EPOCH + Duration::from_millis(951_827_696_789);
        assert_eq!(rfc3339(leap_day), "2000-02-29T12:34:56.789Z");
        let time = UNIX_EPOCH + Duration::from_secs(1_700_000_000);
        assert_eq!(rfc3339(time), "2023-11-14T22:13:20.000Z");
        let new_year = UNIX_EPOCH + Duration::from_secs(1_735_689_600);
        assert_eq!(rfc3339(new_year), "2025-01-01T00:00:00.000Z");
    }

    #[test]
    fn event_lines_show_the_fields_that_are_set() {
        let exit = Event {
            r#type: "exit".to_owned(),
            id: "c1".to_owned(),
            pid: 42,
            ..Event::default()
        };
        assert_eq!(
            event_line(&exit, UNIX_EPOCH),
            "1970-01-01T00:00:00.000Z  exit             c1  pid=42  status=0"
        );
        let start = Event {
            r#type: "start-container".to_owned(),
            id: "c1".to_owned(),
            pid: 42,
            bundle_path: "/b".to_owned(),
            ..Event::default()
        };
        assert_eq!(
            event_line(&start, UNIX_EPOCH),
            "1970-01-01T00:00:00.000Z  start-container  c1  pid=42  bundle=/b"
        );
        assert_eq!(event_json(&exit, UNIX_EPOCH)["process"], Value::Null);
        assert_eq!(event_json(&start, UNIX_EPOCH)["bundlePath"], "/b");
    }

    /// A writer whose reader has gone away.
    struct ClosedPipe;

    impl Write for ClosedPipe {
        fn write(&mut self, _: &[u8]) -> io::Result<usize> {
            Err(io::ErrorKind::BrokenPipe.into())
        }

        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn relay_copies_to_eof_and_drains_when_the_output_is_closed() {
        let data = vec![7u8; 200_000];
        let mut copied = Vec::new();
        relay(&mut data.as_slice(), &mut copied).unwrap();
        assert_eq!(copied, data);
        let mut input = data.as_slice();
        relay(&mut input, &mut ClosedPipe).unwrap();
        assert!(input.is_empty());
    }

    #[test]
    fn grpc_errors_print_message_and_canonical_code() {
        let error = Error::from(Status::not_found("no container \"x\""));
        assert_eq!(error.to_string(), "no container \"x\" (NOT_FOUND)");
        let error = Error::from(Status::new(Code::Unavailable, ""));
        assert!(error.to_string().ends_with("(UNAVAILABLE)"));
    }

    #[test]
    fn exec_takes_everything_after_the_id_as_the_command() {
        let cli = Cli::try_parse_from(["berth", "exec", "-t", "c1", "--", "ls", "-l"]).unwrap();
        let Command::Exec(exec) = cli.command else {
            panic!("not an exec");
        };
        assert!(exec.tty);
        assert_eq!(exec.args, ["ls", "-l"]);
        let cli = Cli::try_parse_from(["berth", "exec", "c1", "sh", "-c", "exit 3"]).unwrap();
        let Command::Exec(exec) = cli.command else {
            panic!("not an exec");
        };
        assert!(!exec.tty);
        assert_eq!(exec.args, ["sh", "-c", "exit 3"]);
        let cli = Cli::try_parse_from(["berth", "exec", "c1", "-e", "A=1", "--", "env"]).unwrap();
        let Command::Exec(exec) = cli.command else {
            panic!("not an exec");
        };
        assert_eq!(exec.env, ["A=1"]);
        assert_eq!(exec.args, ["env"]);
        assert!(Cli::try_parse_from(["berth", "exec", "c1"]).is_err());
    }
}
