//! The CLI's one error type and how gRPC statuses and connection failures read in it.

use std::io;
use std::path::PathBuf;
use std::time::Duration;

use tonic::{Code, Status};

#[derive(Debug, thiserror::Error)]
pub enum Error {
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
    #[error("{} ({})", rpc_message(.0), code_name(.0.code()))]
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
    #[error(
        "process {pid} of {id} exited while berthd was away (an upgrade or restart), and its exit status is not known"
    )]
    ExitUnknown { id: String, pid: u32 },
    #[error("detached from process {pid} of {id}, which keeps running")]
    Detached { id: String, pid: u32 },
    #[error(
        "lost the stats stream of {id}: {} ({})",
        status_message(.status),
        code_name(.status.code())
    )]
    StatsLost { id: String, status: Status },
    #[error(
        "berthd refused the upgrade and keeps serving: {} ({})",
        status_message(.0),
        code_name(.0.code())
    )]
    UpgradeRefused(Status),
    #[error(
        "berthd {pid} accepted the upgrade but no new image answered within {}s (last: {last})",
        .waited.as_secs()
    )]
    UpgradeUnseen {
        pid: u32,
        waited: Duration,
        last: String,
    },
    /// Our stdout was closed by its reader (`berth events | head`): not worth a message.
    #[error("stdout is closed")]
    StdoutClosed,
}

pub fn io_error(context: impl Into<String>) -> impl FnOnce(io::Error) -> Error {
    let context = context.into();
    move |source| Error::Io { context, source }
}

pub fn status_message(status: &Status) -> &str {
    if status.message().is_empty() {
        status.code().description()
    } else {
        status.message()
    }
}

/// What berthd answered, or, where the connection to it broke mid-call (tonic says only
/// "transport error"), that.
fn rpc_message(status: &Status) -> String {
    if status.code() == Code::Unknown && status.message().starts_with("transport error") {
        return format!(
            "lost the connection to berthd mid-call, so whether it was carried out is not known (did berthd stop or restart?): {}",
            root_cause(status)
        );
    }
    status_message(status).to_owned()
}

/// The canonical gRPC name of a status code, as other gRPC tools print it.
pub fn code_name(code: Code) -> &'static str {
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
pub fn root_cause(error: &(dyn std::error::Error + 'static)) -> String {
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grpc_errors_print_message_and_canonical_code() {
        let error = Error::from(Status::not_found("no container \"x\""));
        assert_eq!(error.to_string(), "no container \"x\" (NOT_FOUND)");
        let error = Error::from(Status::new(Code::Unavailable, ""));
        assert!(error.to_string().ends_with("(UNAVAILABLE)"));
        let error = Error::from(Status::unknown("transport error"));
        assert!(
            error
                .to_string()
                .starts_with("lost the connection to berthd mid-call"),
            "{error}"
        );
    }
}
