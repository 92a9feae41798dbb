//! `berth`: the command-line client of berthd. It speaks only the wire API (`proto/api.proto`)
//! and berthd's own Daemon service (`proto/daemon.proto`).

#![deny(unsafe_code)]

mod attach;
mod checkpoint;
mod daemon;
mod error;
mod events;
mod output;
mod stats;

use std::io::{self, IsTerminal};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::str::FromStr;
use std::time::SystemTime;

use berth_api::daemon_proto::daemon_client::DaemonClient;
use berth_api::proto::api_client::ApiClient;
use berth_api::proto::{
    AddProcessRequest, CreateContainerRequest, EventsRequest, Process, SignalRequest, StateRequest,
    StateResponse, UpdateContainerRequest, User,
};
use clap::{Args, Parser, Subcommand};
use nix::sys::signal::Signal;
use tonic::transport::Channel;

use crate::attach::{Attachment, RawTerminal, exit_code};
use crate::checkpoint::CheckpointCommand;
use crate::daemon::DaemonCommand;
use crate::error::{Error, io_error};
use crate::output::{
    containers_json, containers_table, event_json, event_line, print_json_pretty, state_json,
    state_text, write_stdout,
};
use crate::stats::StatsArgs;

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
    /// Show containers' CPU, memory, network and block I/O, refreshed at each sample
    ///
    /// CPU % is the CPU time used between two samples over the time between them: 100% is one
    /// full CPU. A container that exits leaves the table; berth ends when none is left.
    Stats(StatsArgs),
    /// Take, list and remove checkpoints (CRIU images in <bundle>/checkpoints/<name>)
    Checkpoint {
        #[command(subcommand)]
        command: CheckpointCommand,
    },
    /// Ask about berthd itself, or upgrade it in place
    Daemon {
        #[command(subcommand)]
        command: DaemonCommand,
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
    /// Restore the container from the checkpoint <bundle>/checkpoints/NAME instead of starting it
    #[arg(long, value_name = "NAME")]
    restore: Option<String>,
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
    let channel = berth_api::client::channel(&cli.address)
        .await
        .map_err(|source| Error::Connect {
            address: cli.address.clone(),
            source,
        })?;
    let mut client = ApiClient::new(channel.clone());
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
        Command::Stats(args) => stats::show(&mut client, args).await?,
        Command::Checkpoint { command } => checkpoint::execute(&mut client, command).await?,
        Command::Daemon { command } => {
            daemon::execute(DaemonClient::new(channel), &cli.address, command).await?
        }
    }
    Ok(ExitCode::SUCCESS)
}

async fn fetch_state(client: &mut ApiClient<Channel>) -> Result<StateResponse, Error> {
    Ok(client.state(StateRequest::default()).await?.into_inner())
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
    let checkpoint = args.restore.unwrap_or_default();
    if !args.attach {
        let request = CreateContainerRequest {
            id: args.id,
            bundle_path,
            stdin: optional_absolute_utf8(args.stdin.as_deref())?,
            stdout: optional_absolute_utf8(args.stdout.as_deref())?,
            stderr: optional_absolute_utf8(args.stderr.as_deref())?,
            console: optional_absolute_utf8(args.console.as_deref())?,
            checkpoint,
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
        checkpoint,
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

async fn watch_events(client: &mut ApiClient<Channel>, json: bool) -> Result<(), Error> {
    let mut events = client.events(EventsRequest {}).await?.into_inner();
    loop {
        let lost = match events.message().await {
            Ok(Some(event)) => {
                let received = SystemTime::now();
                let line = if json {
                    event_json(&event, received).to_string()
                } else {
                    event_line(&event, received)
                };
                write_stdout(&format!("{line}\n"))?;
                continue;
            }
            Ok(None) => None,
            Err(status) if events::berthd_went_away(&status) => Some(status),
            Err(status) => return Err(status.into()),
        };
        events::note_lost(lost.as_ref());
        match events::resubscribe(client).await? {
            Some(again) => events = again,
            None => return lost.map_or(Ok(()), |status| Err(status.into())),
        }
    }
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
        // Said here, before the container is looked up: berthd would refuse it the same way.
        return if number <= 64 {
            Ok(number)
        } else {
            Err(format!(
                "signal {number} is out of range: use a number from 1 to 64, or 0 to check that the process exists (see man 7 signal)"
            ))
        };
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn signals_parse_from_numbers_and_names_in_any_form() {
        assert_eq!(parse_signal("9"), Ok(9));
        assert_eq!(parse_signal("TERM"), Ok(15));
        assert_eq!(parse_signal("SIGTERM"), Ok(15));
        assert_eq!(parse_signal("kill"), Ok(9));
        assert_eq!(parse_signal("64"), Ok(64));
        assert_eq!(parse_signal("0"), Ok(0));
        assert!(parse_signal("65").unwrap_err().contains("out of range"));
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

    #[test]
    fn run_restores_with_or_without_attaching() {
        let cli = Cli::try_parse_from(["berth", "run", "c1", "/b", "--restore", "cp1", "--attach"])
            .unwrap();
        let Command::Run(run) = cli.command else {
            panic!("not a run");
        };
        assert_eq!(run.restore.as_deref(), Some("cp1"));
        assert!(run.attach);
    }
}
