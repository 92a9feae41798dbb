//! One error type for the daemon and the one mapping of it onto gRPC status codes.

use std::path::{Path, PathBuf};

/// Everything that can go wrong in berthd. Messages are lowercase, without a trailing period,
/// and say what a person can do about it.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{0}")]
    InvalidArgument(String),
    #[error("{0}")]
    NotFound(String),
    #[error("{0}")]
    AlreadyExists(String),
    #[error("{0}")]
    FailedPrecondition(String),
    #[error("{0}")]
    Unavailable(String),
    /// The peer may not do this (its credentials, or its access to a path it named).
    #[error("{0}")]
    PermissionDenied(String),
    /// A limit was reached; the message names it.
    #[error("{0}")]
    ResourceExhausted(String),
    /// Something berthd waited for (a read, a pre-flight) did not finish in time and was left.
    #[error("{what} did not finish within {bound:?}")]
    DeadlineExceeded {
        what: String,
        bound: std::time::Duration,
    },
    #[error("{what} did not finish within {secs} s and was killed")]
    Timeout { what: String, secs: u64 },
    #[error("{op} failed: {message}")]
    Runtime { op: String, message: String },
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{what}: {source}")]
    Sys {
        what: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{0}")]
    Internal(String),
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    /// An I/O error on `path`, keeping the path so the message says which file.
    pub fn io(path: impl AsRef<Path>, source: std::io::Error) -> Self {
        Error::Io {
            path: path.as_ref().to_owned(),
            source,
        }
    }

    /// A failed system call that has no path, named by what it was doing.
    pub fn sys(what: impl Into<String>, source: impl Into<std::io::Error>) -> Self {
        Error::Sys {
            what: what.into(),
            source: source.into(),
        }
    }
}

impl From<Error> for tonic::Status {
    fn from(err: Error) -> Self {
        use tonic::Code;
        let code = match &err {
            Error::InvalidArgument(_) => Code::InvalidArgument,
            Error::NotFound(_) => Code::NotFound,
            Error::AlreadyExists(_) => Code::AlreadyExists,
            Error::FailedPrecondition(_) => Code::FailedPrecondition,
            Error::Unavailable(_) => Code::Unavailable,
            Error::PermissionDenied(_) => Code::PermissionDenied,
            Error::ResourceExhausted(_) => Code::ResourceExhausted,
            Error::DeadlineExceeded { .. } => Code::DeadlineExceeded,
            Error::Timeout { .. } => Code::DeadlineExceeded,
            Error::Runtime { .. } => Code::Internal,
            Error::Io { source, .. } | Error::Sys { source, .. } => match source.kind() {
                std::io::ErrorKind::NotFound => Code::NotFound,
                std::io::ErrorKind::PermissionDenied => Code::PermissionDenied,
                _ => Code::Internal,
            },
            Error::Internal(_) => Code::Internal,
        };
        tonic::Status::new(code, err.to_string())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn io_errors_name_the_path_and_map_by_kind() {
        let err = Error::io(
            "/nope/config.json",
            std::io::Error::from(std::io::ErrorKind::NotFound),
        );
        let status = tonic::Status::from(err);
        assert_eq!(status.code(), tonic::Code::NotFound);
        assert!(status.message().starts_with("/nope/config.json: "));
    }

    #[test]
    fn refusals_and_limits_have_their_own_codes() {
        let cases = [
            (
                Error::PermissionDenied("no".into()),
                tonic::Code::PermissionDenied,
            ),
            (
                Error::ResourceExhausted("full".into()),
                tonic::Code::ResourceExhausted,
            ),
            (
                Error::DeadlineExceeded {
                    what: "reading config /b/config.json".into(),
                    bound: std::time::Duration::from_millis(1500),
                },
                tonic::Code::DeadlineExceeded,
            ),
        ];
        for (err, code) in cases {
            assert_eq!(tonic::Status::from(err).code(), code);
        }
        let status = tonic::Status::from(Error::DeadlineExceeded {
            what: "reading config /b/config.json".into(),
            bound: std::time::Duration::from_secs(5),
        });
        assert_eq!(
            status.message(),
            "reading config /b/config.json did not finish within 5s"
        );
    }

    #[test]
    fn timeouts_are_deadline_exceeded() {
        let status = tonic::Status::from(Error::Timeout {
            what: "runc start".into(),
            secs: 2,
        });
        assert_eq!(status.code(), tonic::Code::DeadlineExceeded);
        assert_eq!(
            status.message(),
            "runc start did not finish within 2 s and was killed"
        );
    }
}
