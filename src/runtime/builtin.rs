//! The built-in runtime's side of a typed operation: `--runtime builtin` turns an [`Operation`]
//! into a [`BuiltinCall`] that the spawn helper carries out with youki's libcontainer in a child
//! of its own, where runc's path turns it into argv.
//!
//! Owns: which operations the built-in runtime takes (everything but checkpoint and restore,
//! which need CRIU through a runtime binary) and the owned, serialisable form they travel in.
//! Does not own: running them (the spawn helper), or what they mean to the supervisor.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use super::Operation;
use crate::error::{Error, Result};

/// What `--runtime` says to select the built-in runtime instead of a binary.
pub const BUILTIN: &str = "builtin";

/// One operation for the built-in runtime, with where it keeps its state and writes its error.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BuiltinCall {
    /// libcontainer's root: one directory per container, as runc's `--root`.
    pub root: PathBuf,
    /// Where a failure is written as one JSON line, as runc's `--log --log-format json`.
    pub log: PathBuf,
    pub op: BuiltinOp,
}

/// The operations the built-in runtime carries out; the fields of [`Operation`]'s, owned.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum BuiltinOp {
    Create {
        id: String,
        bundle: PathBuf,
        pid_file: PathBuf,
        console_socket: Option<PathBuf>,
    },
    Start {
        id: String,
    },
    /// Create then start, in one child: runc's `run --detach`.
    Run {
        id: String,
        bundle: PathBuf,
        pid_file: PathBuf,
        console_socket: Option<PathBuf>,
    },
    Exec {
        id: String,
        process: PathBuf,
        pid_file: PathBuf,
        console_socket: Option<PathBuf>,
    },
    Pause {
        id: String,
    },
    Resume {
        id: String,
    },
    Delete {
        id: String,
    },
    /// Every container under the root, as `runc list --format json` prints them, to stdout.
    List,
}

/// The refusal for what only a runtime binary can do.
pub(crate) fn needs_binary() -> Error {
    Error::FailedPrecondition(
        "checkpoint and restore need CRIU through a runtime binary, which the built-in runtime does not use; start berthd with --runtime runc"
            .into(),
    )
}

impl BuiltinCall {
    pub(crate) fn new(op: &Operation<'_>, root: &Path, log: &Path) -> Result<Self> {
        let owned = |p: &Path| p.to_path_buf();
        let op = match *op {
            Operation::Create {
                id,
                bundle,
                pid_file,
                console_socket,
            } => BuiltinOp::Create {
                id: id.into(),
                bundle: owned(bundle),
                pid_file: owned(pid_file),
                console_socket: console_socket.map(owned),
            },
            Operation::Start { id } => BuiltinOp::Start { id: id.into() },
            Operation::Run {
                id,
                bundle,
                pid_file,
                console_socket,
            } => BuiltinOp::Run {
                id: id.into(),
                bundle: owned(bundle),
                pid_file: owned(pid_file),
                console_socket: console_socket.map(owned),
            },
            Operation::Exec {
                id,
                process,
                pid_file,
                console_socket,
            } => BuiltinOp::Exec {
                id: id.into(),
                process: owned(process),
                pid_file: owned(pid_file),
                console_socket: console_socket.map(owned),
            },
            Operation::Pause { id } => BuiltinOp::Pause { id: id.into() },
            Operation::Resume { id } => BuiltinOp::Resume { id: id.into() },
            Operation::Delete { id } => BuiltinOp::Delete { id: id.into() },
            Operation::List => BuiltinOp::List,
            Operation::Checkpoint { .. } => return Err(needs_binary()),
            Operation::Restore { .. } => return Err(needs_binary()),
        };
        Ok(BuiltinCall {
            root: owned(root),
            log: owned(log),
            op,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::runtime::CriuOptions;

    #[test]
    fn operations_become_owned_calls() {
        let create = Operation::Create {
            id: "web",
            bundle: Path::new("/b"),
            pid_file: Path::new("/p"),
            console_socket: Some(Path::new("/c.sock")),
        };
        let call = BuiltinCall::new(&create, Path::new("/r"), Path::new("/l")).unwrap();
        assert_eq!(
            call.op,
            BuiltinOp::Create {
                id: "web".into(),
                bundle: "/b".into(),
                pid_file: "/p".into(),
                console_socket: Some("/c.sock".into()),
            }
        );
        assert_eq!(call.root, Path::new("/r"));
        let json = serde_json::to_string(&call).unwrap();
        assert_eq!(serde_json::from_str::<BuiltinCall>(&json).unwrap(), call);
    }

    #[test]
    fn checkpoint_and_restore_name_runc() {
        let checkpoint = Operation::Checkpoint {
            id: "a",
            image: Path::new("/i"),
            work: Path::new("/w"),
            options: CriuOptions::default(),
        };
        let err = BuiltinCall::new(&checkpoint, Path::new("/r"), Path::new("/l")).unwrap_err();
        assert!(err.to_string().contains("--runtime runc"), "{err}");
        assert_eq!(
            tonic::Status::from(err).code(),
            tonic::Code::FailedPrecondition
        );
    }
}
