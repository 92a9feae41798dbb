//! Checkpoints through the runtime and CRIU, kept where this API's clients expect them:
//! `<bundle>/checkpoints/<name>`, with a small metadata file beside the images recording the
//! flags and the time so List answers truthfully. One lock per bundle keeps two containers
//! that share a bundle from racing on the same directory.
//! Does not own: the Checkpoint record (model), the argv (runtime), restoring (create).

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};

use super::Supervisor;
use crate::error::{Error, Result};
use crate::events::EventKind;
use crate::model::Checkpoint;
use crate::runtime::{CriuOptions, Operation};

/// The file beside the images that records how a checkpoint was taken.
const METADATA: &str = "berth-checkpoint.json";

/// The CRIU options a checkpoint is dumped and restored with.
fn criu_options(checkpoint: &Checkpoint) -> CriuOptions {
    CriuOptions {
        leave_running: !checkpoint.exit,
        tcp_established: checkpoint.tcp,
        external_unix_sockets: checkpoint.unix_sockets,
        shell_job: checkpoint.shell,
    }
}

#[derive(Debug, Serialize, Deserialize)]
struct Metadata {
    #[serde(flatten)]
    checkpoint: Checkpoint,
    /// Seconds since the epoch.
    created: u64,
}

/// `^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$`: a plain directory name under `checkpoints/`.
pub fn validate_name(name: &str) -> Result<()> {
    if super::validate::plain_name(name, 128) {
        Ok(())
    } else if name.is_empty() {
        Err(Error::InvalidArgument(
            "checkpoint name is empty: give the checkpoint's name".into(),
        ))
    } else {
        Err(Error::InvalidArgument(format!(
            "invalid checkpoint name {name:?}: use 1 to 128 letters, digits, '_', '.' or '-', starting with a letter or digit"
        )))
    }
}

fn checkpoints_dir(bundle: &Path) -> PathBuf {
    bundle.join("checkpoints")
}

/// Reads how the checkpoint in `dir` was taken. A directory made by hand or by another tool has
/// no metadata: it is listed with its name and no flags.
fn read_checkpoint(dir: &Path, name: &str) -> Checkpoint {
    std::fs::read(dir.join(METADATA))
        .ok()
        .and_then(|bytes| serde_json::from_slice::<Metadata>(&bytes).ok())
        .map(|m| Checkpoint {
            name: name.to_owned(),
            ..m.checkpoint
        })
        .unwrap_or_else(|| Checkpoint {
            name: name.to_owned(),
            ..Checkpoint::default()
        })
}

/// The checkpoints of a bundle, by name.
pub fn list(bundle: &Path) -> Result<Vec<Checkpoint>> {
    let dir = checkpoints_dir(bundle);
    let entries = match std::fs::read_dir(&dir) {
        Ok(entries) => entries,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(Error::io(&dir, e)),
    };
    let mut checkpoints = Vec::new();
    for entry in entries {
        let entry = entry.map_err(|e| Error::io(&dir, e))?;
        let name = entry.file_name().to_string_lossy().into_owned();
        if entry.file_type().is_ok_and(|t| t.is_dir()) && validate_name(&name).is_ok() {
            checkpoints.push(read_checkpoint(&entry.path(), &name));
        }
    }
    checkpoints.sort_by(|a, b| a.name.cmp(&b.name));
    Ok(checkpoints)
}

/// The image directory and CRIU options to restore `name` of `bundle` with.
pub fn for_restore(bundle: &Path, name: &str) -> Result<(PathBuf, CriuOptions)> {
    validate_name(name)?;
    let dir = checkpoints_dir(bundle).join(name);
    if !dir.is_dir() {
        return Err(Error::NotFound(format!(
            "checkpoint {name} does not exist in {}",
            checkpoints_dir(bundle).display()
        )));
    }
    let checkpoint = read_checkpoint(&dir, name);
    Ok((dir, criu_options(&checkpoint)))
}

/// The lines of a CRIU log in `work` that say why a dump or restore failed: its last errors, or
/// its last lines when it logged no error.
pub fn criu_log_tail(work: &Path, log: &str) -> Option<String> {
    const LINES: usize = 8;
    let text = std::fs::read_to_string(work.join(log)).ok()?;
    let errors: Vec<&str> = text.lines().filter(|l| l.contains("Error (")).collect();
    let lines: Vec<&str> = if errors.is_empty() {
        text.lines().filter(|l| !l.trim().is_empty()).collect()
    } else {
        errors
    };
    let tail = lines[lines.len().saturating_sub(LINES)..].join("\n");
    (!tail.is_empty()).then_some(tail)
}

/// One lock per bundle directory, dropped from the table once nobody holds or waits for it.
#[derive(Default)]
pub struct BundleLocks {
    locks: std::sync::Mutex<HashMap<PathBuf, Arc<tokio::sync::Mutex<()>>>>,
}

impl BundleLocks {
    pub async fn lock(&self, bundle: &Path) -> tokio::sync::OwnedMutexGuard<()> {
        let lock = {
            let mut locks = self.locks.lock().expect("bundle locks poisoned");
            locks.retain(|_, lock| Arc::strong_count(lock) > 1);
            Arc::clone(locks.entry(bundle.to_owned()).or_default())
        };
        lock.lock_owned().await
    }
}

impl Supervisor {
    /// Ok when CRIU passed `criu check` here; else FAILED_PRECONDITION with its message.
    pub(crate) async fn criu_ready(&self) -> Result<()> {
        self.runtime.criu_ready().await
    }

    /// Dumps container `id` into `<bundle>/checkpoints/<name>`. On failure the partial directory
    /// is removed and the container keeps running.
    pub(crate) async fn checkpoint(&self, id: &str, checkpoint: Checkpoint) -> Result<()> {
        let container = self.container(id)?;
        validate_name(&checkpoint.name)?;
        let _bundle = self.checkpoint_locks.lock(&container.bundle).await;
        let _operations = container.operations.lock().await;
        let parent = checkpoints_dir(&container.bundle);
        std::fs::create_dir_all(&parent).map_err(|e| Error::io(&parent, e))?;
        let image = parent.join(&checkpoint.name);
        match std::fs::create_dir(&image) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
                return Err(Error::AlreadyExists(format!(
                    "checkpoint {} already exists in {}",
                    checkpoint.name,
                    parent.display()
                )));
            }
            Err(e) => return Err(Error::io(&image, e)),
        }
        let work = self.scratch_dir(".criu")?;
        let dumped = match self.criu_ready().await {
            Ok(()) => {
                self.runtime
                    .run(Operation::Checkpoint {
                        id,
                        image: &image,
                        work: work.path(),
                        options: criu_options(&checkpoint),
                    })
                    .await
            }
            Err(e) => Err(e),
        };
        if let Err(e) = dumped {
            let _ = std::fs::remove_dir_all(&image);
            return Err(with_criu_log(e, work.path(), "dump.log"));
        }
        let metadata = Metadata {
            checkpoint: checkpoint.clone(),
            created: SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map_or(0, |d| d.as_secs()),
        };
        let path = image.join(METADATA);
        let bytes = serde_json::to_vec_pretty(&metadata)
            .map_err(|e| Error::Internal(format!("encode checkpoint metadata: {e}")))?;
        std::fs::write(&path, bytes).map_err(|e| Error::io(&path, e))?;
        self.events.publish(
            id,
            container.init.pid(),
            EventKind::Checkpoint { checkpoint },
        );
        Ok(())
    }

    /// The checkpoints in container `id`'s bundle.
    pub(crate) fn list_checkpoints(&self, id: &str) -> Result<Vec<Checkpoint>> {
        list(&self.container(id)?.bundle)
    }

    /// Removes checkpoint `name` from container `id`'s bundle.
    pub(crate) async fn delete_checkpoint(&self, id: &str, name: &str) -> Result<()> {
        let container = self.container(id)?;
        validate_name(name)?;
        let _bundle = self.checkpoint_locks.lock(&container.bundle).await;
        let dir = checkpoints_dir(&container.bundle).join(name);
        match std::fs::remove_dir_all(&dir) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Err(Error::NotFound(format!(
                "checkpoint {name} does not exist in {}",
                checkpoints_dir(&container.bundle).display()
            ))),
            Err(e) => Err(Error::io(&dir, e)),
        }
    }
}

/// Adds the tail of CRIU's log to a runtime failure: runc's own message rarely says why.
pub fn with_criu_log(err: Error, work: &Path, log: &str) -> Error {
    match (err, criu_log_tail(work, log)) {
        (Error::Runtime { op, message }, Some(tail)) => Error::Runtime {
            op,
            message: format!("{message}; criu {log}:\n{tail}"),
        },
        (err, _) => err,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names() {
        for ok in ["a", "c1", "before-upgrade_2.0", &"x".repeat(128)] {
            assert!(validate_name(ok).is_ok(), "{ok}");
        }
        for bad in ["", "-a", ".", "..", "a/b", "a b", &"x".repeat(129)] {
            assert!(
                matches!(validate_name(bad), Err(Error::InvalidArgument(_))),
                "{bad}"
            );
        }
    }

    #[test]
    fn metadata_round_trips_and_hand_made_directories_are_listed() {
        let bundle = tempfile::tempdir().unwrap();
        let dir = checkpoints_dir(bundle.path());
        std::fs::create_dir_all(dir.join("taken")).unwrap();
        std::fs::create_dir_all(dir.join("by-hand")).unwrap();
        std::fs::create_dir_all(dir.join("-invalid")).unwrap();
        std::fs::write(dir.join("stray-file"), "").unwrap();
        let taken = Checkpoint {
            name: "taken".into(),
            exit: true,
            tcp: true,
            unix_sockets: false,
            shell: true,
        };
        let metadata = Metadata {
            checkpoint: taken.clone(),
            created: 1,
        };
        std::fs::write(
            dir.join("taken").join(METADATA),
            serde_json::to_vec(&metadata).unwrap(),
        )
        .unwrap();
        let listed = list(bundle.path()).unwrap();
        assert_eq!(
            listed,
            [
                Checkpoint {
                    name: "by-hand".into(),
                    ..Checkpoint::default()
                },
                taken
            ]
        );
        let (image, options) = for_restore(bundle.path(), "taken").unwrap();
        assert_eq!(image, dir.join("taken"));
        assert!(options.tcp_established && options.shell_job && !options.external_unix_sockets);
        assert!(matches!(
            for_restore(bundle.path(), "missing"),
            Err(Error::NotFound(_))
        ));
        assert!(list(&bundle.path().join("nowhere")).unwrap().is_empty());
    }

    #[test]
    fn criu_log_tail_keeps_the_last_lines() {
        let work = tempfile::tempdir().unwrap();
        let log: String = (1..=20).map(|n| format!("line {n}\n")).collect();
        std::fs::write(work.path().join("dump.log"), log).unwrap();
        let tail = criu_log_tail(work.path(), "dump.log").unwrap();
        assert!(
            tail.starts_with("line 13") && tail.ends_with("line 20"),
            "{tail}"
        );
        let err = with_criu_log(
            Error::Runtime {
                op: "runc checkpoint".into(),
                message: "criu failed".into(),
            },
            work.path(),
            "dump.log",
        );
        assert!(err.to_string().contains("line 20"));
        assert!(criu_log_tail(work.path(), "restore.log").is_none());
        std::fs::write(
            work.path().join("restore.log"),
            "(0.1) ok\n(0.2) Error (criu/vdso.c:381): vdso: bad\n(0.3) noise after\n",
        )
        .unwrap();
        assert_eq!(
            criu_log_tail(work.path(), "restore.log").unwrap(),
            "(0.2) Error (criu/vdso.c:381): vdso: bad"
        );
    }

    #[tokio::test]
    async fn checkpoints_of_one_bundle_take_turns() {
        let locks = BundleLocks::default();
        let first = locks.lock(Path::new("/b")).await;
        let waiting = tokio::time::timeout(
            std::time::Duration::from_millis(50),
            locks.lock(Path::new("/b")),
        );
        assert!(waiting.await.is_err(), "the same bundle waits");
        let other = locks.lock(Path::new("/other")).await;
        drop((first, other));
        let _again = locks.lock(Path::new("/b")).await;
        assert_eq!(
            locks.locks.lock().unwrap().len(),
            1,
            "unused locks are dropped"
        );
    }
}
