//! The state directory: one small JSON file per container with what a restarted berthd needs to
//! find it again. Writes are atomic: a temp file, then a rename over the record. No fsync: the
//! records must survive a crash of berthd, which the rename already guarantees, not of the
//! machine, which takes the containers with it (DESIGN "State on disk"). The directory is 0700
//! and every record 0600: records hold each process's environment.
//!
//! Writes and removals are done by one thread of the store's own, never on a reactor thread, in
//! the order they were asked for: a later write of a record is never overtaken by an earlier
//! one, and a removal after a write wins. A write asked while an earlier one of the same record
//! still waits replaces what that one writes, so the queue holds at most one record per
//! container however fast its processes come and go. [`Store::flush`], or a write with
//! [`Store::write_flushed`], waits for what was asked before it (a create answers once its
//! record is on disk; a stop or upgrade leaves nothing queued). A write that fails is logged and
//! kept by id until a later write of that record succeeds ([`Store::take_failure`]), for the
//! create or exec that waited on it.
//! Does not own: what goes in a record or when it is written, or what a failed write costs the
//! container (supervisor).

use std::collections::HashMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::{Arc, Mutex, mpsc};
use std::task::{Context, Poll};

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::hand_back::{self, HandBack};
use crate::model::ProcessSpec;

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct ProcessRecord {
    pub pid: u32,
    /// Start time in clock ticks since boot (field 22 of /proc/<pid>/stat): with the pid, it
    /// tells the process from a later one that reused its pid.
    pub start_time: u64,
    pub spec: ProcessSpec,
    /// Where an added process's terminal is relayed (the init's goes to its container's paths),
    /// so an upgrade can resume the relay. Absent in records written before it was recorded.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub terminal: Option<TerminalPaths>,
}

/// The client's paths a pty master is relayed to.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct TerminalPaths {
    pub stdin: String,
    pub stdout: String,
    pub console: String,
    /// Who named them (see [`ContainerRecord::named_by`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub named_by: Option<NamedBy>,
}

/// The client who named stdio paths, as its request's peer was admitted: a restarted or
/// upgraded berthd opens the paths again as that client may, never as root.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct NamedBy {
    pub uid: u32,
    pub gid: u32,
    pub groups: Vec<u32>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct ContainerRecord {
    pub id: String,
    pub bundle: PathBuf,
    pub runtime: PathBuf,
    pub stdin: String,
    pub stdout: String,
    pub stderr: String,
    pub console: String,
    pub init: ProcessRecord,
    pub processes: Vec<ProcessRecord>,
    /// Processes (by pid) whose terminal is no longer relayed: their pty master did not survive
    /// a restart of berthd. Absent in records written before it was recorded.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub lost_terminals: Vec<u32>,
    /// The inode of the pipe berthd relays the init's stdin, stdout and stderr through (0: not
    /// a pipe), to take them up again from `/proc/<pid>/fd`. Absent in records before pipes.
    #[serde(default, skip_serializing_if = "no_pipes")]
    pub pipes: [u64; 3],
    /// Who named the init's stdio paths. Absent in records written before it was recorded,
    /// whose paths are opened again as root.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub named_by: Option<NamedBy>,
}

fn no_pipes(pipes: &[u64; 3]) -> bool {
    *pipes == [0; 3]
}

/// A record waiting for the writer. A later write of the same container while it waits puts
/// its record here instead of queuing another.
type Waiting = Arc<Mutex<Option<Box<ContainerRecord>>>>;

/// Each container's write still waiting in the queue, by id.
type WaitingWrites = Arc<Mutex<HashMap<String, Waiting>>>;

/// Why the last write of a container's state file failed, by id, until one succeeds or the
/// file is removed.
type FailedWrites = Arc<Mutex<HashMap<String, Error>>>;

/// What the writer thread is asked to do, in order.
enum Job {
    /// With a sender when the write is flushed too: answered once it and every job before it
    /// are done, in the same wake-up of the writer.
    Write(Waiting, Option<hand_back::Sender<()>>),
    Remove(String),
    /// Answered once every job before it is done.
    Flush(hand_back::Sender<()>),
}

pub struct Store {
    dir: PathBuf,
    /// The writer thread's queue; the thread ends once the store is dropped and its queue done.
    jobs: mpsc::Sender<Job>,
    waiting: WaitingWrites,
    failed: FailedWrites,
    /// How the writer answers a flush: through the reactor, not by waking a worker itself.
    hand_back: HandBack,
}

impl Store {
    pub fn open(dir: PathBuf, hand_back: HandBack) -> Result<Self> {
        use std::os::unix::fs::PermissionsExt;
        std::fs::create_dir_all(&dir).map_err(|e| Error::io(&dir, e))?;
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o700))
            .map_err(|e| Error::io(&dir, e))?;
        let (jobs, queue) = mpsc::channel();
        let waiting = WaitingWrites::default();
        let failed = FailedWrites::default();
        let (writer_dir, writer_waiting, writer_failed) =
            (dir.clone(), Arc::clone(&waiting), Arc::clone(&failed));
        std::thread::Builder::new()
            .name("berth-store".into())
            .spawn(move || write_in_order(&writer_dir, &writer_waiting, &writer_failed, queue))
            .map_err(|e| Error::sys("start the state file writer thread", e))?;
        Ok(Store {
            dir,
            jobs,
            waiting,
            failed,
            hand_back,
        })
    }

    /// Writes `record` over the container's state file, after every write and removal asked
    /// before. A failure is logged by the writer; the container carries on.
    pub(crate) fn write(&self, record: ContainerRecord) {
        self.queue_write(record, None);
    }

    /// Writes `record` as [`Store::write`] does; the returned future resolves once it, and every
    /// write and removal asked before it, is done. One job, so the writer wakes once for both.
    pub(crate) fn write_flushed(&self, record: ContainerRecord) -> Flushed {
        let (done, flushed) = self.hand_back.channel();
        self.queue_write(record, Some(done));
        Flushed(flushed)
    }

    /// Queues a write of `record`, or gives it to the write of that container still waiting.
    /// Jobs are sent under the lock of the waiting writes, so the queue's order is the order in
    /// which writes and removals took it.
    fn queue_write(&self, record: ContainerRecord, flushed: Option<hand_back::Sender<()>>) {
        let mut waiting = lock(&self.waiting);
        if let Some(write) = waiting.get(&record.id) {
            *lock(write) = Some(Box::new(record));
            if let Some(done) = flushed {
                self.send(Job::Flush(done));
            }
            return;
        }
        let write = Arc::new(Mutex::new(None));
        let id = record.id.clone();
        *lock(&write) = Some(Box::new(record));
        waiting.insert(id, Arc::clone(&write));
        self.send(Job::Write(write, flushed));
    }

    /// Removes container `id`'s state file, after every write and removal asked before. A write
    /// asked after this one is queued after it, never given to one queued before.
    pub(crate) fn remove(&self, id: &str) {
        let mut waiting = lock(&self.waiting);
        waiting.remove(id);
        self.send(Job::Remove(id.to_owned()));
    }

    /// Why the last write of container `id`'s state file failed, if it did: ask once a flush
    /// after that write has resolved. Taken: a second call says nothing of the same failure.
    pub(crate) fn take_failure(&self, id: &str) -> Option<Error> {
        lock(&self.failed).remove(id)
    }

    /// Resolves once every write and removal asked before this call is done. Asked at once,
    /// awaited when the caller needs it.
    pub(crate) fn flush(&self) -> Flushed {
        let (done, flushed) = self.hand_back.channel();
        self.send(Job::Flush(done));
        Flushed(flushed)
    }

    /// Every record in the directory. A file that cannot be read or parsed (torn by a crash,
    /// edited by hand) is logged by name and skipped, never deleted; temp files of writes that
    /// never finished are removed.
    pub(crate) fn load_all(&self) -> Result<Vec<ContainerRecord>> {
        let entries = std::fs::read_dir(&self.dir).map_err(|e| Error::io(&self.dir, e))?;
        let mut records = Vec::new();
        for entry in entries {
            let entry = entry.map_err(|e| Error::io(&self.dir, e))?;
            let path = entry.path();
            let name = entry.file_name().to_string_lossy().into_owned();
            if name.starts_with('.') && name.ends_with(".tmp") {
                let _ = std::fs::remove_file(&path);
                continue;
            }
            if !name.ends_with(".json") {
                continue;
            }
            let parsed = read_state_file(&path, MAX_RECORD_BYTES)
                .map_err(|e| e.to_string())
                .and_then(|bytes| {
                    serde_json::from_slice::<ContainerRecord>(&bytes).map_err(|e| e.to_string())
                });
            match parsed {
                Ok(record) if name == format!("{}.json", record.id) => records.push(record),
                Ok(record) => tracing::error!(
                    file = %path.display(),
                    id = %record.id,
                    "state file name does not match its container id; skipped"
                ),
                Err(e) => tracing::error!(
                    file = %path.display(),
                    error = %e,
                    "corrupt state file skipped; remove it once the container is dealt with"
                ),
            }
        }
        records.sort_by(|a, b| a.id.cmp(&b.id));
        Ok(records)
    }

    fn send(&self, job: Job) {
        if self.jobs.send(job).is_err() {
            tracing::error!("the state file writer thread is gone; state files are no longer kept");
        }
    }
}

/// Resolves once the writer has done every job up to the one that made it.
pub(crate) struct Flushed(tokio::sync::oneshot::Receiver<()>);

impl Future for Flushed {
    type Output = ();

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        // An error means the writer is gone, and with it anything left to wait for.
        Pin::new(&mut self.0).poll(cx).map(|_| ())
    }
}

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex.lock().expect("state file queue lock poisoned")
}

/// The writer thread: does each job in the order it was queued.
fn write_in_order(
    dir: &Path,
    waiting: &WaitingWrites,
    failed: &FailedWrites,
    queue: mpsc::Receiver<Job>,
) {
    for job in queue {
        match job {
            Job::Write(write, flushed) => {
                let record = {
                    let mut waiting = lock(waiting);
                    let record = lock(&write).take();
                    if let Some(record) = &record
                        && waiting
                            .get(&record.id)
                            .is_some_and(|w| Arc::ptr_eq(w, &write))
                    {
                        waiting.remove(&record.id);
                    }
                    record
                };
                if let Some(record) = record {
                    match write_record(dir, &record) {
                        Ok(()) => {
                            lock(failed).remove(&record.id);
                        }
                        Err(e) => {
                            tracing::error!(id = %record.id, error = %e, "could not write the state file");
                            lock(failed).insert(record.id, e);
                        }
                    }
                }
                if let Some(done) = flushed {
                    done.send(());
                }
            }
            Job::Remove(id) => {
                lock(failed).remove(&id);
                if let Err(e) = remove_record(dir, &id) {
                    tracing::error!(id = %id, error = %e, "could not remove the state file");
                }
            }
            Job::Flush(done) => done.send(()),
        }
    }
}

/// The most bytes a state file may hold: far more than any record (a container's process
/// specs, each within a request's size), far less than would hurt to read.
const MAX_RECORD_BYTES: u64 = 64 << 20;

/// The bytes of a file in berthd's state directory (a record, a held checkpoint entry), if it
/// is a regular file of at most `limit` bytes. Opened without following a link and without
/// blocking, so a link or a FIFO put in its place is refused rather than followed or waited on
/// for ever.
pub(crate) fn read_state_file(path: &Path, limit: u64) -> Result<Vec<u8>> {
    use std::io::Read;
    use std::os::unix::fs::{FileTypeExt, OpenOptionsExt};
    let refused = |what: String| Error::Internal(format!("{}: {what}", path.display()));
    let file = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK)
        .open(path)
        .map_err(|e| match e.raw_os_error() {
            Some(libc::ELOOP) => refused("a symbolic link, not a state file".to_owned()),
            _ => Error::io(path, e),
        })?;
    let meta = file.metadata().map_err(|e| Error::io(path, e))?;
    let kind = meta.file_type();
    if !kind.is_file() {
        let what = if kind.is_fifo() {
            "a FIFO"
        } else {
            "not a regular file"
        };
        return Err(refused(format!("{what}, not a state file")));
    }
    if meta.len() > limit {
        return Err(refused(format!(
            "{} bytes, more than a state file holds ({limit})",
            meta.len()
        )));
    }
    let mut bytes = Vec::with_capacity(meta.len() as usize);
    file.take(limit + 1)
        .read_to_end(&mut bytes)
        .map_err(|e| Error::io(path, e))?;
    if bytes.len() as u64 > limit {
        return Err(refused(format!(
            "more than {limit} bytes, more than a state file holds"
        )));
    }
    Ok(bytes)
}

fn record_path(dir: &Path, id: &str) -> PathBuf {
    dir.join(format!("{id}.json"))
}

fn write_record(dir: &Path, record: &ContainerRecord) -> Result<()> {
    let path = record_path(dir, &record.id);
    let tmp = dir.join(format!(".{}.json.tmp", record.id));
    let bytes = serde_json::to_vec(record)
        .map_err(|e| Error::Internal(format!("encode state of {}: {e}", record.id)))?;
    write_atomically(&tmp, &path, &bytes)
}

/// Writes `bytes` to `path` whole or not at all: into `tmp`, a new file readable by root alone,
/// then renamed over `path`.
pub(crate) fn write_atomically(tmp: &Path, path: &Path, bytes: &[u8]) -> Result<()> {
    let mut file = create_private(tmp).map_err(|e| Error::io(tmp, e))?;
    if let Err(e) = file.write_all(bytes) {
        // A full disk: nothing half written is left to the next start.
        let _ = std::fs::remove_file(tmp);
        return Err(Error::io(tmp, e));
    }
    std::fs::rename(tmp, path).map_err(|e| Error::io(path, e))
}

/// A new file at `path`, readable by root alone (records hold environments). `O_EXCL` follows
/// no link; a file already there (left by a write that failed) is replaced, as through
/// `O_CREAT` it would keep its mode.
fn create_private(path: &Path) -> std::io::Result<std::fs::File> {
    use std::os::unix::fs::OpenOptionsExt;
    let create = || {
        std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(path)
    };
    match create() {
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
            std::fs::remove_file(path)?;
            create()
        }
        created => created,
    }
}

fn remove_record(dir: &Path, id: &str) -> Result<()> {
    let path = record_path(dir, id);
    match std::fs::remove_file(&path) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(Error::io(&path, e)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(id: &str, pid: u32) -> ContainerRecord {
        ContainerRecord {
            id: id.into(),
            bundle: "/b".into(),
            runtime: "/usr/sbin/runc".into(),
            stdin: String::new(),
            stdout: "/tmp/out".into(),
            stderr: String::new(),
            console: String::new(),
            init: ProcessRecord {
                pid,
                start_time: 99,
                spec: ProcessSpec::default(),
                terminal: None,
            },
            processes: vec![],
            lost_terminals: vec![10],
            pipes: [0, 4242, 0],
            named_by: Some(NamedBy {
                uid: 65534,
                gid: 65534,
                groups: vec![100],
            }),
        }
    }

    #[tokio::test]
    async fn records_are_written_atomically_and_removed() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path().join("containers"), HandBack::start().unwrap()).unwrap();
        let record = record("a", 10);
        use std::os::unix::fs::PermissionsExt;
        // Left by a write that failed, readable by all: replaced, not written through.
        let stale = dir.path().join("containers/.a.json.tmp");
        std::fs::write(&stale, "{").unwrap();
        std::fs::set_permissions(&stale, std::fs::Permissions::from_mode(0o644)).unwrap();
        store.write_flushed(record.clone()).await;
        let path = dir.path().join("containers/a.json");
        let mode = |p: &std::path::Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode(&path), 0o600, "records hold environments");
        assert_eq!(mode(&dir.path().join("containers")), 0o700);
        let read: ContainerRecord = serde_json::from_slice(&std::fs::read(&path).unwrap()).unwrap();
        assert_eq!(read, record);
        let leftovers: Vec<_> = std::fs::read_dir(dir.path().join("containers"))
            .unwrap()
            .collect();
        assert_eq!(leftovers.len(), 1, "no temp file is left beside the record");
        std::fs::write(dir.path().join("containers/torn.json"), "{\"id\": \"to").unwrap();
        std::fs::write(dir.path().join("containers/.b.json.tmp"), "{").unwrap();
        assert_eq!(store.load_all().unwrap(), vec![record]);
        assert!(
            dir.path().join("containers/torn.json").exists(),
            "corrupt files are kept"
        );
        assert!(!dir.path().join("containers/.b.json.tmp").exists());
        store.remove("a");
        store.flush().await;
        assert!(!path.exists());
        store.remove("a");
        store.flush().await;
    }

    /// What is not a record is skipped without being followed, waited on or read whole: a
    /// FIFO (read, it blocked berthd's start for ever), a link to a valid record elsewhere, a
    /// file far larger than any record.
    #[tokio::test]
    async fn only_regular_files_of_a_records_size_are_loaded() {
        let dir = tempfile::tempdir().unwrap();
        let containers = dir.path().join("containers");
        let store = Store::open(containers.clone(), HandBack::start().unwrap()).unwrap();
        store.write_flushed(record("a", 10)).await;
        let elsewhere = dir.path().join("b.json");
        std::fs::write(&elsewhere, serde_json::to_vec(&record("b", 11)).unwrap()).unwrap();
        std::os::unix::fs::symlink(&elsewhere, containers.join("b.json")).unwrap();
        rustix::fs::mknodat(
            rustix::fs::CWD,
            containers.join("c.json"),
            rustix::fs::FileType::Fifo,
            rustix::fs::Mode::from_raw_mode(0o600),
            0,
        )
        .unwrap();
        let huge = std::fs::File::create(containers.join("d.json")).unwrap();
        huge.set_len(MAX_RECORD_BYTES + 1).unwrap();
        // On a thread of its own, which a wait on the FIFO would leave behind, not hang on.
        let (loaded, loading) = std::sync::mpsc::channel();
        std::thread::spawn(move || loaded.send(store.load_all().unwrap()));
        let loaded = loading
            .recv_timeout(std::time::Duration::from_secs(10))
            .expect("loading waited on the FIFO");
        assert_eq!(loaded, vec![record("a", 10)]);
        for name in ["b.json", "c.json", "d.json"] {
            assert!(
                containers.join(name).symlink_metadata().is_ok(),
                "{name} kept"
            );
        }
    }

    #[tokio::test]
    async fn writes_and_removals_land_in_the_order_they_were_asked_for() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path().join("containers"), HandBack::start().unwrap()).unwrap();
        // Many writes of one record: the last asked for is the one on disk.
        for pid in 1..=200 {
            store.write(record("a", pid));
        }
        // A removal after a write wins, and a write after the removal brings the record back.
        store.write(record("b", 1));
        store.remove("b");
        store.write(record("c", 1));
        store.remove("c");
        store.write(record("c", 2));
        // A flushed write waits for every job before it too.
        store.write_flushed(record("d", 1)).await;
        let loaded = store.load_all().unwrap();
        let pids: Vec<(&str, u32)> = loaded.iter().map(|r| (r.id.as_str(), r.init.pid)).collect();
        assert_eq!(pids, [("a", 200), ("c", 2), ("d", 1)]);
    }

    #[tokio::test]
    async fn a_write_while_one_of_the_same_record_waits_replaces_it_in_the_queue() {
        let dir = tempfile::tempdir().unwrap();
        let containers = dir.path().join("containers");
        std::fs::create_dir(&containers).unwrap();
        // A store whose writer has not started: the queue is what it would be behind a slow one.
        let (jobs, queue) = mpsc::channel();
        let store = Store {
            dir: containers.clone(),
            jobs,
            waiting: WaitingWrites::default(),
            failed: FailedWrites::default(),
            hand_back: HandBack::start().unwrap(),
        };
        for pid in 1..=1000 {
            store.write(record("a", pid));
        }
        store.write(record("b", 1));
        store.remove("b");
        store.write(record("b", 2));
        drop(store.write_flushed(record("a", 1001)));
        let waiting = Arc::clone(&store.waiting);
        drop(store);
        let jobs: Vec<Job> = queue.into_iter().collect();
        let kinds: Vec<&str> = jobs
            .iter()
            .map(|job| match job {
                Job::Write(..) => "write",
                Job::Remove(_) => "remove",
                Job::Flush(_) => "flush",
            })
            .collect();
        assert_eq!(kinds, ["write", "write", "remove", "write", "flush"]);
        let (replay, queue) = mpsc::channel();
        for job in jobs {
            replay.send(job).unwrap();
        }
        drop(replay);
        write_in_order(&containers, &waiting, &FailedWrites::default(), queue);
        assert!(lock(&waiting).is_empty());
        let store = Store::open(containers, HandBack::start().unwrap()).unwrap();
        let loaded = store.load_all().unwrap();
        let pids: Vec<(&str, u32)> = loaded.iter().map(|r| (r.id.as_str(), r.init.pid)).collect();
        assert_eq!(pids, [("a", 1001), ("b", 2)]);
    }

    #[tokio::test]
    async fn a_failed_write_is_told_once_until_a_write_of_the_same_record_succeeds() {
        let dir = tempfile::tempdir().unwrap();
        let containers = dir.path().join("containers");
        let store = Store::open(containers.clone(), HandBack::start().unwrap()).unwrap();
        // The temp file's name taken by a directory: the write cannot create it.
        std::fs::create_dir(containers.join(".a.json.tmp")).unwrap();
        store.write_flushed(record("a", 1)).await;
        store.write_flushed(record("b", 1)).await;
        assert!(store.take_failure("b").is_none());
        let failure = store.take_failure("a").expect("the write of a failed");
        assert!(failure.to_string().contains(".a.json.tmp"), "{failure}");
        assert!(store.take_failure("a").is_none(), "told once");
        // Failed again, then written: the failure is no longer told.
        store.write_flushed(record("a", 2)).await;
        std::fs::remove_dir(containers.join(".a.json.tmp")).unwrap();
        store.write_flushed(record("a", 3)).await;
        assert!(store.take_failure("a").is_none(), "a later write succeeded");
        assert_eq!(store.load_all().unwrap()[0].init.pid, 3);
    }

    #[test]
    fn records_written_before_lost_terminals_were_recorded_still_load() {
        let old = r#"{"id":"a","bundle":"/b","runtime":"/r","stdin":"","stdout":"","stderr":"",
            "console":"","init":{"pid":10,"start_time":99,"spec":{"args":[],"env":[],"cwd":"/",
            "uid":0,"gid":0,"additional_gids":[],"terminal":true}},"processes":[]}"#;
        let record: ContainerRecord = serde_json::from_str(old).unwrap();
        assert!(record.lost_terminals.is_empty());
        let written = serde_json::to_string(&record).unwrap();
        assert!(!written.contains("lost_terminals"), "{written}");
    }
}
