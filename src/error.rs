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

    /// A runtime's failure, its message [`bounded`]: runc quotes a client's args, env and cwd
    /// whole in what it says.
    pub fn runtime(op: impl Into<String>, message: &str) -> Self {
        Error::Runtime {
            op: op.into(),
            message: bounded(message),
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

/// How much of a client's input a message quotes.
const QUOTED_CHARS: usize = 200;

/// `text` quoted for a message: in full when short, else its first 200 characters and its size,
/// so an error never echoes a client's oversized input back at it.
pub fn quote(text: &str) -> String {
    match text.char_indices().nth(QUOTED_CHARS) {
        None => format!("{text:?}"),
        Some((end, _)) => format!("{:?}… ({} bytes)", &text[..end], text.len()),
    }
}

/// `text`, another program's message that may hold a client's input whole, bounded for a
/// message as [`quote`] bounds a quote: in full when short, else 200 characters, its first and
/// last 100, around how many bytes were cut (the reason a runtime gives comes after what it
/// quotes, as in `exec: "…": executable file not found in $PATH`).
pub fn bounded(text: &str) -> String {
    const END: usize = QUOTED_CHARS / 2;
    let Some((head_end, _)) = text.char_indices().nth(END) else {
        return text.to_owned();
    };
    // Cut only where it saves more than the note of the cut takes.
    match text.char_indices().nth_back(END - 1) {
        Some((tail_start, _)) if tail_start > head_end + 32 => format!(
            "{}… ({} bytes cut) …{}",
            &text[..head_end],
            tail_start - head_end,
            &text[tail_start..]
        ),
        _ => text.to_owned(),
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
            // The runtime refused the client's bundle or request (a missing binary, a container
            // in the wrong state, CRIU unable to dump): its text says why, berthd is fine.
            Error::Runtime { .. } => Code::FailedPrecondition,
            Error::Io { source, .. } | Error::Sys { source, .. } => match source.kind() {
                _ if is_exhaustion(source) => Code::ResourceExhausted,
                _ if is_gone_mount(source) => Code::FailedPrecondition,
                std::io::ErrorKind::NotFound => Code::NotFound,
                std::io::ErrorKind::PermissionDenied => Code::PermissionDenied,
                // A file on a read-only mount, or one being executed, opened for writing (a
                // client's stdout): the state of the file, never a fault of berthd's.
                std::io::ErrorKind::ReadOnlyFilesystem | std::io::ErrorKind::ExecutableFileBusy => {
                    Code::FailedPrecondition
                }
                _ => Code::Internal,
            },
            Error::Internal(_) => Code::Internal,
        };
        tonic::Status::new(code, err.to_string())
    }
}

/// A limit of the host's or the caller's ran out: a full disk or quota (a checkpoint in the
/// client's bundle), no descriptor left, no memory. Retried later, or with less, it may pass.
fn is_exhaustion(source: &std::io::Error) -> bool {
    matches!(
        source.raw_os_error(),
        Some(libc::ENOSPC | libc::EDQUOT | libc::EMFILE | libc::ENFILE | libc::ENOMEM)
    )
}

/// The file named is on a mount that is gone (a FUSE daemon that exited, an NFS handle gone
/// stale): the state of the client's file, not a fault of berthd's.
fn is_gone_mount(source: &std::io::Error) -> bool {
    matches!(source.raw_os_error(), Some(libc::ENOTCONN | libc::ESTALE))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exhausted_limits_and_gone_mounts_are_not_internal() {
        let code = |errno| {
            tonic::Status::from(Error::io(
                "/b/checkpoints/c",
                std::io::Error::from_raw_os_error(errno),
            ))
            .code()
        };
        for errno in [
            libc::ENOSPC,
            libc::EDQUOT,
            libc::EMFILE,
            libc::ENFILE,
            libc::ENOMEM,
        ] {
            assert_eq!(code(errno), tonic::Code::ResourceExhausted, "errno {errno}");
        }
        for errno in [libc::ENOTCONN, libc::ESTALE, libc::EROFS] {
            assert_eq!(
                code(errno),
                tonic::Code::FailedPrecondition,
                "errno {errno}"
            );
        }
        assert_eq!(code(libc::EIO), tonic::Code::Internal);
    }

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
    fn every_kind_maps_to_its_code() {
        use tonic::Code;
        let io = |kind| Error::io("/p", std::io::Error::from(kind));
        let cases = [
            (Error::InvalidArgument("x".into()), Code::InvalidArgument),
            (Error::NotFound("x".into()), Code::NotFound),
            (Error::AlreadyExists("x".into()), Code::AlreadyExists),
            (
                Error::FailedPrecondition("x".into()),
                Code::FailedPrecondition,
            ),
            (Error::Unavailable("x".into()), Code::Unavailable),
            (
                Error::ResourceExhausted("x".into()),
                Code::ResourceExhausted,
            ),
            (
                Error::Runtime {
                    op: "runc create".into(),
                    message: "exec: \"/nope\": no such file or directory".into(),
                },
                Code::FailedPrecondition,
            ),
            (io(std::io::ErrorKind::NotFound), Code::NotFound),
            (
                io(std::io::ErrorKind::PermissionDenied),
                Code::PermissionDenied,
            ),
            (
                Error::io("/p", std::io::Error::from_raw_os_error(libc::EROFS)),
                Code::FailedPrecondition,
            ),
            (
                Error::sys("open", std::io::Error::from_raw_os_error(libc::ETXTBSY)),
                Code::FailedPrecondition,
            ),
            (io(std::io::ErrorKind::Other), Code::Internal),
            (Error::Internal("x".into()), Code::Internal),
            (Error::PermissionDenied("x".into()), Code::PermissionDenied),
            (
                Error::DeadlineExceeded {
                    what: "reading config /b/config.json".into(),
                    bound: std::time::Duration::from_millis(1500),
                },
                Code::DeadlineExceeded,
            ),
        ];
        for (err, code) in cases {
            let what = format!("{err:?}");
            assert_eq!(tonic::Status::from(err).code(), code, "{what}");
        }
    }

    #[test]
    fn quotes_keep_short_input_and_cut_long_input() {
        assert_eq!(quote("paused!"), "\"paused!\"");
        let long = "é".repeat(50_000);
        let quoted = quote(&long);
        assert_eq!(quoted.chars().filter(|&c| c == 'é').count(), 200);
        assert!(quoted.ends_with("… (100000 bytes)"), "{quoted}");
    }

    #[test]
    fn bounded_messages_keep_short_text_and_both_ends_of_long_text() {
        let short = "container \"a\" does not exist";
        assert_eq!(bounded(short), short);
        let at_most = "x".repeat(QUOTED_CHARS);
        assert_eq!(bounded(&at_most), at_most);
        let (prefix, suffix) = ("exec: \"", "\": executable file not found in $PATH");
        let message = format!("{prefix}{}{suffix}", "é".repeat(100_000));
        let head = format!("{prefix}{}", "é".repeat(QUOTED_CHARS / 2 - prefix.len()));
        let tail = format!("{}{suffix}", "é".repeat(QUOTED_CHARS / 2 - suffix.len()));
        let cut = message.len() - head.len() - tail.len();
        assert_eq!(
            bounded(&message),
            format!("{head}… ({cut} bytes cut) …{tail}")
        );
        let status = tonic::Status::from(Error::runtime("runc exec", &message));
        assert!(status.message().len() < 1024, "{}", status.message().len());
    }

    #[test]
    fn a_deadline_names_what_was_left_and_its_bound() {
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
