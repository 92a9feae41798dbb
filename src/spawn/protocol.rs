//! What berthd and the spawn helper say to each other: one JSON message per `SOCK_SEQPACKET`
//! datagram, stdio descriptors attached with `SCM_RIGHTS` in stdin, stdout, stderr order.

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use crate::runtime::builtin::BuiltinCall;

/// Largest message either side sends; captured output is cut to fit.
pub(crate) const MAX_MESSAGE: usize = 128 * 1024;
/// Captured stdout or stderr kept per command: plenty for `state` JSON and error text.
pub(crate) const CAPTURE_LIMIT: usize = 16 * 1024;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) enum StdioSpec {
    /// `/dev/null`.
    Null,
    /// The next descriptor attached to the request.
    Passed,
    /// A pipe whose contents come back in the response.
    Capture,
}

/// What the helper runs for a request.
#[derive(Debug, Serialize, Deserialize)]
pub(crate) enum Command {
    /// A program, forked and exec'd.
    Exec { argv: Vec<String> },
    /// A built-in runtime operation, carried out in a forked child that exits when it is done.
    Builtin(BuiltinCall),
}

#[derive(Debug, Serialize, Deserialize)]
pub(crate) struct Request {
    pub id: u64,
    pub command: Command,
    pub stdio: [StdioSpec; 3],
    pub timeout_ms: u64,
    /// The command's log file, emptied by the helper once the command has exited 0.
    pub log: Option<PathBuf>,
    /// Killed with its process group once berthd is gone (see `SpawnOptions`).
    pub kill_if_abandoned: bool,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Outcome {
    /// The command ended; the raw wait status is decoded by `wait_status::exit_code`.
    Exited { wait_status: i32 },
    /// The command outlived its timeout and was killed.
    TimedOut,
    /// The command could not be started at all.
    SpawnFailed { error: String },
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Response {
    pub id: u64,
    pub pid: i32,
    pub outcome: Outcome,
    pub stdout: String,
    pub stderr: String,
}
