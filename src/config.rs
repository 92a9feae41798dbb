//! berthd's flags. Every flag can also be given as an environment variable `BERTH_<NAME>`.
//!
//! Owns: parsing flags and the paths derived from them. Does not own: acting on them (the wiring
//! in `daemon` reads the config; nothing here knows the modules it configures).

use std::path::PathBuf;
use std::time::Duration;

use clap::{Parser, ValueEnum};

use crate::error::{Error, Result};

/// `--stats-backend`: how the stats sampler reads cgroup files.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum StatsBackend {
    /// One io_uring submission per tick.
    IoUring,
    /// One pread per file.
    Pread,
}

/// `--create-mode`: how CreateContainer runs the runtime.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum CreateMode {
    /// One runtime process per container: `run --detach`.
    Run,
    /// Two: `create`, then `start` once the init is tracked.
    CreateStart,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum LogFormat {
    Text,
    Json,
}

/// berthd: a container runtime daemon for dense hosts, serving the containerd v0.2 gRPC API.
#[derive(Debug, Clone, Parser)]
#[command(name = "berthd", version)]
pub struct Config {
    /// Unix socket to serve the API on; its parent is created with mode 0711.
    #[arg(long, env = "BERTH_LISTEN", default_value = "/run/berth/berth.sock")]
    pub listen: PathBuf,

    /// Group that owns the socket (mode 0660); a name or a numeric gid.
    #[arg(long, env = "BERTH_GROUP", default_value = "root")]
    pub group: String,

    /// Directory for per-container state files and the runtime's own state.
    #[arg(long, env = "BERTH_STATE_DIR", default_value = "/run/berth")]
    pub state_dir: PathBuf,

    /// OCI runtime: runc, crun or youki by name (looked up in PATH) or a path to the binary; or
    /// `builtin` for youki's libcontainer inside berthd's spawn helper (the `builtin` feature).
    #[arg(long, env = "BERTH_RUNTIME", default_value = "runc")]
    pub runtime: String,

    /// The CRIU binary runc checkpoints and restores with (runc's `--criu`); default: `criu` in
    /// PATH. crun and youki cannot take it.
    #[arg(long, env = "BERTH_CRIU")]
    pub criu: Option<PathBuf>,

    /// The API socket belongs to the service manager (socket activation): berthd never binds or
    /// removes it. Set by berthd itself when it was socket-activated, so an upgrade keeps it.
    #[arg(long, env = "BERTH_SOCKET_ACTIVATED", hide = true)]
    pub socket_activated: bool,

    /// Seconds a runtime command may run before it is killed and its request fails.
    #[arg(long, env = "BERTH_RUNTIME_TIMEOUT", default_value_t = 60, value_parser = clap::value_parser!(u64).range(1..))]
    pub runtime_timeout: u64,

    /// How CreateContainer runs the runtime: `run` (one `run --detach` process, the faster) or
    /// `create-start` (`create`, then `start` once the init is tracked). A restore always runs
    /// `restore`.
    #[arg(long, env = "BERTH_CREATE_MODE", value_enum, default_value_t = CreateMode::Run)]
    pub create_mode: CreateMode,

    /// The largest file a client names that berthd reads (a bundle's config.json), in bytes; a
    /// larger one is refused.
    #[arg(long, env = "BERTH_CLIENT_FILE_MAX_BYTES", default_value_t = 4 << 20, value_parser = clap::value_parser!(u64).range(1..))]
    pub client_file_max_bytes: u64,

    /// Seconds berthd waits for the file system to open or read a file a client names (a hung
    /// NFS or FUSE mount) before the request fails with DEADLINE_EXCEEDED.
    #[arg(long, env = "BERTH_CLIENT_FILE_TIMEOUT", default_value_t = 5, value_parser = clap::value_parser!(u64).range(1..))]
    pub client_file_timeout: u64,

    /// Machine id reported by State; defaults to the host name.
    #[arg(long, env = "BERTH_ID")]
    pub id: Option<String>,

    /// Events kept for subscribers that are behind; a subscriber further behind is cut off.
    #[arg(long, env = "BERTH_EVENTS_BUFFER", default_value_t = 1024, value_parser = clap::value_parser!(u64).range(1..=1_000_000))]
    pub events_buffer: u64,

    /// Seconds after start during which new Events subscribers first receive the restart's own
    /// events (`live` for adopted containers, `exit` for those that ended while berthd was down).
    #[arg(long, env = "BERTH_RECOVERY_REPLAY", default_value_t = 60)]
    pub recovery_replay: u64,

    /// How often GetStats samples: milliseconds (500, 500ms) or seconds (2s, 1.5s).
    #[arg(long, env = "BERTH_STATS_INTERVAL", default_value = "1s", value_parser = parse_interval)]
    pub stats_interval: Duration,

    /// How the stats sampler reads cgroup files; io-uring falls back to pread where the kernel
    /// refuses it.
    #[arg(long, env = "BERTH_STATS_BACKEND", value_enum, default_value_t = StatsBackend::IoUring)]
    pub stats_backend: StatsBackend,

    /// Serve Prometheus metrics at /metrics on this TCP address (127.0.0.1:9323) or unix socket
    /// path; off when not given.
    #[arg(long, env = "BERTH_METRICS_LISTEN")]
    pub metrics_listen: Option<String>,

    /// Metrics connections served at once; one more is closed at once. Every local user can
    /// reach a TCP address, so this keeps a flood of them from taking berthd's fds.
    #[arg(long, env = "BERTH_METRICS_MAX_CONNECTIONS", default_value_t = 16, value_parser = clap::value_parser!(u64).range(1..=4096))]
    pub metrics_max_connections: u64,

    /// Most bytes of args, env, cwd and additional gids (4 bytes each) one process may have
    /// (CreateContainer's bundle process, AddProcess); a larger one is refused with
    /// RESOURCE_EXHAUSTED naming this flag.
    #[arg(long, env = "BERTH_MAX_PROCESS_SPEC_BYTES", default_value_t = 256 * 1024, value_parser = clap::value_parser!(u64).range(1024..))]
    pub max_process_spec_bytes: u64,

    /// Most processes AddProcess may have running in one container at once; one more is
    /// refused with RESOURCE_EXHAUSTED naming this flag. A container's processes also stay
    /// within what its State can answer (two thirds of --max-message-bytes).
    #[arg(long, env = "BERTH_MAX_PROCESSES_PER_CONTAINER", default_value_t = 1024, value_parser = clap::value_parser!(u64).range(1..=1 << 20))]
    pub max_processes_per_container: u64,

    /// Creates, execs, checkpoints and updates one uid other than root's may have in flight at
    /// once; one more is RESOURCE_EXHAUSTED naming this flag. An operation counts until it
    /// ends, also when its client stopped waiting for it.
    #[arg(long, env = "BERTH_MAX_OPERATIONS_PER_UID", default_value_t = 64, value_parser = clap::value_parser!(u64).range(1..))]
    pub max_operations_per_uid: u64,

    /// Creates, execs, checkpoints and updates everyone may have in flight at once; one more
    /// is UNAVAILABLE naming this flag.
    #[arg(long, env = "BERTH_MAX_OPERATIONS", default_value_t = 1024, value_parser = clap::value_parser!(u64).range(1..))]
    pub max_operations: u64,

    /// Runtime commands (runc run, exec, delete, ...) running at once; more wait for a turn,
    /// given round robin over the uids asking, berthd's own clean-up and the deletes that
    /// creates of the same id wait for. A command still running after 2 s gives its turn up and
    /// runs on. Default: four per CPU, at most 64.
    #[arg(long, env = "BERTH_MAX_RUNTIME_PROCESSES", value_parser = clap::value_parser!(u64).range(1..=4096))]
    pub max_runtime_processes: Option<u64>,

    /// Largest gRPC message berthd decodes or encodes; State that would be larger is refused
    /// with RESOURCE_EXHAUSTED (ask for one container with StateRequest.id).
    #[arg(long, env = "BERTH_MAX_MESSAGE_BYTES", default_value_t = 4 * 1024 * 1024, value_parser = clap::value_parser!(u64).range(64 * 1024..=(1 << 30)))]
    pub max_message_bytes: u64,

    /// Client connections open at once; capped at a quarter of the open file limit so the
    /// rest stays for containers (one fd each, two or more with relayed stdio). Silent connections give way to new ones.
    #[arg(long, env = "BERTH_MAX_CONNECTIONS", default_value_t = 4096, value_parser = clap::value_parser!(u64).range(1..))]
    pub max_connections: u64,

    /// Client connections open at once from one uid other than root's (one more is closed at
    /// once), at most half of --max-connections as in effect: a client that holds connections
    /// open, silent or not, cannot take every place.
    #[arg(long, env = "BERTH_MAX_CONNECTIONS_PER_UID", default_value_t = 128, value_parser = clap::value_parser!(u64).range(1..))]
    pub max_connections_per_uid: u64,

    /// Events and GetStats streams one uid other than root's has open at once, over all its
    /// connections; one more is RESOURCE_EXHAUSTED naming this flag.
    #[arg(long, env = "BERTH_MAX_STREAMS_PER_UID", default_value_t = 4096, value_parser = clap::value_parser!(u64).range(1..))]
    pub max_streams_per_uid: u64,

    /// HTTP/2 streams (requests and subscriptions) open at once on one connection.
    #[arg(long, env = "BERTH_MAX_STREAMS_PER_CONNECTION", default_value_t = 256, value_parser = clap::value_parser!(u32).range(1..))]
    pub max_streams_per_connection: u32,

    /// How long a new connection may stay silent, or short of its whole HTTP/2 preface, before
    /// it is closed (500ms, 10s, ...).
    #[arg(long, env = "BERTH_HANDSHAKE_TIMEOUT", default_value = "10s", value_parser = parse_interval)]
    pub handshake_timeout: Duration,

    /// Interval of HTTP/2 keepalive pings on idle connections; a peer that does not answer
    /// within the same interval is disconnected.
    #[arg(long, env = "BERTH_KEEPALIVE", default_value = "60s", value_parser = parse_interval)]
    pub keepalive: Duration,
    /// Check that this binary can start with this configuration, and exit: loads the config,
    /// finds the runtime and the group, probes the kernel features berthd needs (pidfds,
    /// openat2) and opens the state dir read-only. An upgrade runs the new binary so first.
    #[arg(long, env = "BERTH_PREFLIGHT")]
    pub preflight: bool,

    /// Also serve one series set per running container (CPU, memory, network), from the stats
    /// sampler's snapshots: the sampler then reads every container's files each interval.
    #[arg(long, env = "BERTH_METRICS_CONTAINERS")]
    pub metrics_containers: bool,

    #[arg(long, env = "BERTH_LOG_FORMAT", value_enum, default_value_t = LogFormat::Text)]
    pub log_format: LogFormat,

    /// Log filter: a level (error, warn, info, debug, trace) or a tracing directive.
    #[arg(long, env = "BERTH_LOG_LEVEL", default_value = "info")]
    pub log_level: String,
}

impl Config {
    pub fn runtime_timeout(&self) -> Duration {
        Duration::from_secs(self.runtime_timeout)
    }

    pub fn runtime_root(&self) -> PathBuf {
        self.state_dir.join("runtime")
    }

    pub fn containers_dir(&self) -> PathBuf {
        self.state_dir.join("containers")
    }

    /// Refuses limits that contradict each other: a process as large as
    /// `--max-process-spec-bytes` allows must fit in a container's share of a message (two
    /// thirds), or its `start-process` event could not be sent and would end every Events
    /// stream.
    pub fn check_limits(&self) -> Result<()> {
        let fits = self.max_message_bytes / 3 * 2;
        if self.max_process_spec_bytes > fits {
            return Err(Error::InvalidArgument(format!(
                "--max-process-spec-bytes {} is more than two thirds of --max-message-bytes {} ({fits}): a process that large could not be sent in State or Events; lower the first or raise the second",
                self.max_process_spec_bytes, self.max_message_bytes
            )));
        }
        Ok(())
    }

    /// Scratch space for pid files, process specs and console sockets of requests in flight.
    pub fn scratch_dir(&self) -> PathBuf {
        self.state_dir.join("tmp")
    }
}

/// A sampling interval: `500`, `500ms`, `2s` or `1.5s`; at least 10 ms.
pub fn parse_interval(text: &str) -> std::result::Result<Duration, String> {
    let invalid = || {
        format!("{text:?} is not an interval: give milliseconds (500, 500ms) or seconds (2s, 1.5s)")
    };
    let interval = if let Some(ms) = text.strip_suffix("ms") {
        Duration::from_millis(ms.parse().map_err(|_| invalid())?)
    } else if let Some(secs) = text.strip_suffix('s') {
        let secs: f64 = secs.parse().map_err(|_| invalid())?;
        Duration::try_from_secs_f64(secs).map_err(|_| invalid())?
    } else {
        Duration::from_millis(text.parse().map_err(|_| invalid())?)
    };
    if interval < Duration::from_millis(10) {
        return Err(format!("{text:?} is shorter than the 10 ms minimum"));
    }
    Ok(interval)
}

/// Finds the runtime binary: a name is looked up in `PATH`, anything with a slash is taken as is.
pub fn resolve_runtime(runtime: &str, path_var: Option<&std::ffi::OsStr>) -> Result<PathBuf> {
    use crate::runtime::executable_file;
    if runtime.contains('/') {
        let path = PathBuf::from(runtime);
        return if executable_file(&path) {
            Ok(path)
        } else {
            Err(Error::NotFound(format!(
                "runtime {runtime} is not an executable file"
            )))
        };
    }
    path_var
        .into_iter()
        .flat_map(std::env::split_paths)
        .map(|dir| dir.join(runtime))
        .find(|p| executable_file(p))
        .ok_or_else(|| {
            Error::NotFound(format!(
                "runtime {runtime} not found in PATH; install it (apt-get install {runtime}) or pass --runtime /path/to/it"
            ))
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_process_spec_limit_past_what_a_message_holds_is_refused() {
        use clap::Parser;
        let parse = |args: &[&str]| Config::try_parse_from([&["berthd"], args].concat()).unwrap();
        assert!(parse(&[]).check_limits().is_ok());
        let config = parse(&["--max-message-bytes", "65536"]);
        let message = config.check_limits().unwrap_err().to_string();
        assert!(
            message.contains("--max-process-spec-bytes 262144"),
            "{message}"
        );
        assert!(
            parse(&[
                "--max-message-bytes",
                "65536",
                "--max-process-spec-bytes",
                "43690"
            ])
            .check_limits()
            .is_ok()
        );
    }

    #[test]
    fn every_flag_reads_an_environment_variable() {
        let cmd = <Config as clap::CommandFactory>::command();
        for arg in cmd.get_arguments() {
            let id = arg.get_id().as_str();
            if id == "help" || id == "version" {
                continue;
            }
            let env = arg.get_env().map(|e| e.to_string_lossy().into_owned());
            let expected = format!("BERTH_{}", id.to_uppercase());
            assert_eq!(env.as_deref(), Some(expected.as_str()), "flag {id}");
        }
    }

    #[test]
    fn stats_intervals_in_milliseconds_or_seconds() {
        assert_eq!(parse_interval("250"), Ok(Duration::from_millis(250)));
        assert_eq!(parse_interval("250ms"), Ok(Duration::from_millis(250)));
        assert_eq!(parse_interval("2s"), Ok(Duration::from_secs(2)));
        assert_eq!(parse_interval("1.5s"), Ok(Duration::from_millis(1500)));
        assert!(parse_interval("5ms").unwrap_err().contains("10 ms minimum"));
        assert!(parse_interval("-1s").is_err());
        assert!(
            parse_interval("1m")
                .unwrap_err()
                .contains("not an interval")
        );
        assert!(parse_interval("").is_err());
    }

    #[test]
    fn runtime_is_found_in_path_or_reported_missing() {
        let dir = tempfile::tempdir().unwrap();
        let bin = dir.path().join("fake-runc");
        std::fs::write(&bin, "#!/bin/sh\n").unwrap();
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&bin, std::fs::Permissions::from_mode(0o755)).unwrap();
        let path =
            std::env::join_paths([std::path::Path::new("/nonexistent"), dir.path()]).unwrap();
        assert_eq!(resolve_runtime("fake-runc", Some(&path)).unwrap(), bin);
        let err = resolve_runtime("no-such-runtime", Some(&path)).unwrap_err();
        assert!(err.to_string().contains("not found in PATH"), "{err}");
        assert!(resolve_runtime("/nonexistent/runc", None).is_err());
    }
}
