//! The runtime commands' log files (`--log`), kept and reused rather than made and removed per
//! command.
//!
//! A command writes its log to a file no other running command has; once the command has ended, the
//! file is empty again (the spawner empties a success's, [`take_text`] a failure's once read) and
//! goes to the next command. A file made and removed per command cost an inode allocated and freed
//! per command in the state directory; where that is an ext4 without a journal (this project's
//! benchmark VM: `/run` is such a disk) each allocation first skips every inode freed in the last
//! seconds whose inode table block is still unwritten, so a burst of commands slowed the runtime's
//! own allocations too. `berth-load --n 300 --concurrency 8`, work dir on that disk, the two builds
//! alternated: teardown 196 → 215 containers a second (five pairs, each faster), then 153 → 180
//! (eight runs, ABBA order), creates 47 → 49. On a tmpfs, where `scripts/load` runs, the same
//! within the noise (174 and 173, eight runs, ABBA).
//!
//! Owns: naming the files, which of them are free, reading and emptying a failed command's log.
//! Does not own: running the commands, or emptying a success's log (the spawner's).

use std::io::{Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};

/// The most of a failed command's log that is read: its end, where the runtime's last error is.
/// A hook's output quoted in a runtime's error has no bound of its own.
const MOST_READ: u64 = 64 << 10;

/// The log files in one directory: those free, and how many were named.
pub(super) struct LogFiles {
    dir: PathBuf,
    free: Mutex<Vec<PathBuf>>,
    named: AtomicU64,
}

impl LogFiles {
    /// Log files in `dir`, numbered from `first` on.
    pub(super) fn new(dir: PathBuf, first: u64) -> LogFiles {
        LogFiles {
            dir,
            free: Mutex::new(Vec::new()),
            named: AtomicU64::new(first),
        }
    }

    /// A log file no running command has: a free one, or a new name (the command makes the
    /// file). Given back once its command has ended and it is empty; one never given back (its
    /// command's end unknown) stays out of use until the next start empties the directory.
    pub(super) fn take(&self) -> PathBuf {
        if let Some(log) = self.free.lock().expect("log files lock").pop() {
            return log;
        }
        let n = self.named.fetch_add(1, Ordering::Relaxed) + 1;
        self.dir.join(format!("runtime-{n}.log"))
    }

    /// Gives back `log`, whose command has ended and whose log is empty again.
    pub(super) fn give_back(&self, log: PathBuf) {
        self.free.lock().expect("log files lock").push(log);
    }
}

/// What a failed command wrote to `log` (its last [`MOST_READ`] bytes), and whether the file is
/// empty again for the next command; off the reactor.
pub(super) async fn take_text(log: PathBuf) -> (String, bool) {
    let take = move || {
        let Ok(mut file) = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(&log)
        else {
            // Never made (the command failed before it opened its log): nothing to empty.
            return (String::new(), !log.exists());
        };
        let text = read_end(&mut file).unwrap_or_default();
        (text, file.set_len(0).is_ok())
    };
    tokio::task::spawn_blocking(take)
        .await
        .unwrap_or_else(|_| (String::new(), false))
}

fn read_end(file: &mut std::fs::File) -> std::io::Result<String> {
    let len = file.metadata()?.len();
    file.seek(SeekFrom::Start(len.saturating_sub(MOST_READ)))?;
    let mut bytes = Vec::new();
    file.take(MOST_READ).read_to_end(&mut bytes)?;
    Ok(String::from_utf8_lossy(&bytes).into_owned())
}

/// Empties `log` if its command wrote to it; a stat first, as truncating an empty file would
/// still dirty its inode. For the spawner, after a command that succeeded.
pub(crate) fn empty_if_written(log: &Path) {
    if std::fs::metadata(log).is_ok_and(|m| m.len() > 0) {
        let _ = std::fs::OpenOptions::new()
            .write(true)
            .open(log)
            .and_then(|f| f.set_len(0));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_log_in_use_is_not_handed_out_again_and_one_given_back_is() {
        let logs = LogFiles::new(PathBuf::from("/state/tmp"), 0);
        let first = logs.take();
        let second = logs.take();
        assert_ne!(first, second);
        assert!(first.starts_with("/state/tmp"), "{first:?}");
        logs.give_back(first.clone());
        assert_eq!(logs.take(), first);
        assert_ne!(logs.take(), second, "second is still in use");
    }

    #[tokio::test]
    async fn a_failed_commands_log_is_read_from_its_end_and_emptied() {
        let dir = tempfile::tempdir().unwrap();
        let log = dir.path().join("runtime-1.log");
        let filler = "x".repeat(usize::try_from(MOST_READ).unwrap());
        std::fs::write(&log, format!("{filler}\nthe last error\n")).unwrap();
        let (text, emptied) = take_text(log.clone()).await;
        assert!(text.ends_with("\nthe last error\n"), "{}", &text[..40]);
        assert_eq!(text.len() as u64, MOST_READ);
        assert!(emptied);
        assert_eq!(std::fs::metadata(&log).unwrap().len(), 0);

        let never_made = dir.path().join("runtime-2.log");
        assert_eq!(take_text(never_made).await, (String::new(), true));
    }

    #[test]
    fn a_success_written_to_is_emptied_and_an_empty_one_left_alone() {
        let dir = tempfile::tempdir().unwrap();
        let log = dir.path().join("runtime-1.log");
        std::fs::write(&log, "a warning\n").unwrap();
        empty_if_written(&log);
        assert_eq!(std::fs::metadata(&log).unwrap().len(), 0);
        let before = std::fs::metadata(&log).unwrap().modified().unwrap();
        std::thread::sleep(std::time::Duration::from_millis(20));
        empty_if_written(&log);
        let after = std::fs::metadata(&log).unwrap().modified().unwrap();
        assert_eq!(before, after, "an empty log is not truncated again");
        empty_if_written(&dir.path().join("never-made.log"));
    }
}
