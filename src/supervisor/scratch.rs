//! Request scratch files in the scratch directory: pid files, process JSON, console sockets and
//! CRIU work directories, each removed when its request ends, however it ends. An exec's pid
//! file is kept apart, named for its container, so that one a berthd left behind when it died
//! tells the next which process that exec started (recovery).
//!
//! Owns: naming scratch files, removing them, reading a runtime's pid file. Does not own: what
//! goes in them (the operations that make them).

use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;

use super::Supervisor;
use crate::error::{Error, Result};

/// Removes request scratch files however the request ends.
pub(super) struct ScratchFiles(pub(super) Vec<PathBuf>);

impl Drop for ScratchFiles {
    fn drop(&mut self) {
        for path in &self.0 {
            let _ = std::fs::remove_file(path);
        }
    }
}

/// A scratch directory (CRIU's work directory) removed with what is in it when dropped.
pub(super) struct ScratchDir(PathBuf);

impl ScratchDir {
    pub(super) fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for ScratchDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Removes what is in the scratch directory: scratch files belong to requests in flight, and
/// any found at start are from a berthd that died. Its runtime commands may still be running and
/// adding pid files and logs while the directory is emptied: what is still there after a few
/// tries is left to the next start (this run's names are never theirs, see
/// `procfs::first_scratch_number`), not a reason to stay down.
pub(super) fn empty_scratch_dir(scratch: &Path) {
    let mut last = None;
    for _ in 0..3 {
        match std::fs::remove_dir_all(scratch) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => last = Some(e),
            _ => return,
        }
    }
    if let Some(e) = last {
        tracing::warn!(dir = %scratch.display(), error = %e, "scratch files of a berthd that died stay until the next start");
    }
}

impl Supervisor {
    /// A fresh path in the scratch directory, ending in `suffix`.
    pub(super) fn scratch_path(&self, suffix: &str) -> PathBuf {
        let n = self.next_scratch.fetch_add(1, Ordering::Relaxed);
        self.scratch.join(format!("{n}{suffix}"))
    }

    /// A fresh path for the pid file of an exec in container `id`: `<id>.<n>.pid` in the
    /// directory of exec pid files, which a start does not empty ([`exec_pid_file_container`]).
    pub(super) fn exec_pid_path(&self, id: &str) -> PathBuf {
        let n = self.next_scratch.fetch_add(1, Ordering::Relaxed);
        self.exec_pids.join(format!("{id}.{n}.pid"))
    }

    pub(super) fn scratch_dir(&self, suffix: &str) -> Result<ScratchDir> {
        let path = self.scratch_path(suffix);
        std::fs::create_dir(&path).map_err(|e| Error::io(&path, e))?;
        Ok(ScratchDir(path))
    }
}

/// The container an exec pid file's name (from [`Supervisor::exec_pid_path`]) is for.
pub(super) fn exec_pid_file_container(name: &str) -> Option<&str> {
    let (id, n) = name.strip_suffix(".pid")?.rsplit_once('.')?;
    n.parse::<u64>().ok()?;
    Some(id)
}

/// The pid a runtime wrote to its `--pid-file`, which must exist once the runtime has finished.
pub(super) fn read_pid_file(path: &Path) -> Result<i32> {
    match crate::reaper::read_pid_file(path) {
        Ok(Some(pid)) => Ok(pid),
        // The runtime said it succeeded: the missing file is its fault, not the request's.
        Ok(None) => Err(Error::Internal(format!(
            "the runtime finished without writing its pid file {}",
            path.display()
        ))),
        Err(e) if e.kind() == std::io::ErrorKind::InvalidData => {
            Err(Error::Internal(format!("{}: {e}", path.display())))
        }
        Err(e) => Err(Error::io(path, e)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_exec_pid_file_names_its_container() {
        assert_eq!(exec_pid_file_container("web.3.pid"), Some("web"));
        assert_eq!(exec_pid_file_container("a.b-c.17.pid"), Some("a.b-c"));
        assert_eq!(exec_pid_file_container("web.pid"), None);
        assert_eq!(exec_pid_file_container("web.x.pid"), None);
        assert_eq!(exec_pid_file_container("web.3.pid.tmp"), None);
    }
}
