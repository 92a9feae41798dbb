//! The built-in runtime's side of a typed operation: `--runtime builtin` turns an [`Operation`]
//! into a [`BuiltinCall`] that the spawn helper carries out with youki's libcontainer in a child
//! of its own, where runc's path turns it into argv.
//!
//! Owns: which operations the built-in runtime takes (everything but checkpoint and restore,
//! which need CRIU through a runtime binary), the owned, serialisable form they travel in, and
//! where a container's cgroup goes (as runc's cgroupfs driver puts it). Does not own: running
//! them (the spawn helper), or what they mean to the supervisor.

use std::path::{Component, Path, PathBuf};

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
    /// Beside the root: per container, the private copy of its spec that libcontainer runs
    /// (`<bundles>/<id>/config.json`) and the bundle it came from.
    pub bundles: PathBuf,
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
            bundles: root.with_extension("bundles"),
            log: owned(log),
            op,
        })
    }
}

/// The cgroup runc's cgroupfs driver gives container `id`: `cgroups_path` cleaned (no `..`
/// climbs out of where it starts), kept when absolute; a relative one, or `<id>` when there is
/// none, beneath `own`, the cgroup of the process creating the container (berthd's).
pub fn cgroup_placement(cgroups_path: Option<&Path>, id: &str, own: &Path) -> PathBuf {
    let inner = cgroups_path.unwrap_or(Path::new(id));
    let mut cleaned = PathBuf::new();
    for component in inner.components() {
        match component {
            Component::Normal(part) => cleaned.push(part),
            Component::ParentDir => {
                cleaned.pop();
            }
            Component::RootDir | Component::CurDir | Component::Prefix(_) => {}
        }
    }
    if inner.is_absolute() {
        Path::new("/").join(cleaned)
    } else {
        own.join(cleaned)
    }
}

/// The cgroup of the process whose `/proc/<pid>/cgroup` is `proc_cgroup`, as one path for every
/// controller (libcontainer takes one): its memory controller's on cgroup v1, else its unified
/// cgroup, whose parent is taken for a `.scope` (which holds processes, so cannot have
/// children with controllers; runc does the same).
pub fn own_cgroup(proc_cgroup: &[u8]) -> Result<PathBuf> {
    let (mut memory, mut unified) = (None, None);
    crate::stats::parse::proc_cgroup(proc_cgroup, |line| {
        if line.controllers.split(',').any(|c| c == "memory") {
            memory = Some(PathBuf::from(line.path));
        } else if line.hierarchy == 0 && line.controllers.is_empty() {
            unified = Some(PathBuf::from(line.path));
        }
    })?;
    if let Some(memory) = memory {
        return Ok(memory);
    }
    let unified = unified.ok_or_else(|| {
        Error::NotFound("/proc/self/cgroup names neither a memory nor a unified cgroup".into())
    })?;
    match unified.parent() {
        Some(parent) if unified.extension().is_some_and(|e| e == "scope") => {
            Ok(parent.to_path_buf())
        }
        _ => Ok(unified),
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
        assert_eq!(call.bundles, Path::new("/r.bundles"));
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

    #[test]
    fn a_cgroup_goes_where_runc_puts_it() {
        let own = Path::new("/system.slice/berthd.service");
        let placed = |path: Option<&str>| cgroup_placement(path.map(Path::new), "web", own);
        assert_eq!(placed(None), Path::new("/system.slice/berthd.service/web"));
        assert_eq!(placed(Some("pods/a")), own.join("pods/a"));
        assert_eq!(placed(Some("/pods/a")), Path::new("/pods/a"));
        assert_eq!(placed(Some("/a/../../etc")), Path::new("/etc"));
        assert_eq!(placed(Some("../../x")), own.join("x"));
        assert_eq!(placed(Some("./a//b/.")), own.join("a/b"));
        assert_eq!(placed(Some("/")), Path::new("/"));
    }

    #[test]
    fn the_own_cgroup_is_memorys_on_v1_else_the_unified_one() {
        let hybrid = b"12:pids:/p\n5:cpu,cpuacct:/c\n4:memory:/system.slice/b.service\n0::/u\n";
        assert_eq!(
            own_cgroup(hybrid).unwrap(),
            Path::new("/system.slice/b.service")
        );
        assert_eq!(own_cgroup(b"0::/\n").unwrap(), Path::new("/"));
        assert_eq!(own_cgroup(b"0::/a/b\n").unwrap(), Path::new("/a/b"));
        assert_eq!(
            own_cgroup(b"0::/user.slice/session-3.scope\n").unwrap(),
            Path::new("/user.slice")
        );
        assert!(own_cgroup(b"3:cpu:/c\n").is_err());
        assert!(own_cgroup(b"garbage").is_err());
    }
}
