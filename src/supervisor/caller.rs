//! The caller of a request, as the supervisor checks what it names: the peer of its connection
//! and berthd's state directory, which no client may name. Every file a client names is
//! opened or read through here, with client_fs and off the reactor, bounded in size and time.
//!
//! A trip given up at its time limit goes on in its blocking thread (a path on a mount that
//! does not answer can hold it for good), so the trips still running are counted ([`Trips`]):
//! one uid's past [`MAX_TRIPS_PER_UID`], or everyone's past [`MAX_TRIPS`], are not started, and
//! tokio's blocking threads stay for berthd's own work.
//!
//! Owns: which client_fs call each kind of client path takes, and the bounds. Does not own:
//! reading the peer off a connection (api) or resolving paths (client_fs).

use std::ffi::OsString;
use std::os::fd::OwnedFd;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use rustix::fs::{Mode, OFlags};

use super::uid_counts::{Full, UidCounts};
use crate::client_fs::{self, Access, Peer, shown};
use crate::error::{Error, Result};
use crate::hand_back::HandBack;

/// Bounds on the files a client names that berthd reads (`config.json`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ClientFileLimits {
    /// The largest such file berthd reads, in bytes.
    pub max_bytes: u64,
    /// How long berthd waits for the file system to open or read one.
    pub timeout: Duration,
}

/// Trips off the reactor one uid other than root's may have running at once.
const MAX_TRIPS_PER_UID: usize = 32;
/// Trips off the reactor everyone may have running at once: half of tokio's blocking threads.
const MAX_TRIPS: usize = 256;

/// The trips off the reactor for client paths still running, by uid, stuck ones included.
#[derive(Debug, Default)]
pub struct Trips {
    running: Mutex<UidCounts>,
}

impl Trips {
    /// A place for one more trip of `uid`'s, or why not.
    fn take(self: &Arc<Self>, uid: u32) -> Result<Trip> {
        let mut running = self.running.lock().unwrap_or_else(|e| e.into_inner());
        match running.add(uid, MAX_TRIPS_PER_UID, MAX_TRIPS) {
            Ok(()) => Ok(Trip {
                trips: Arc::clone(self),
                uid,
            }),
            Err(Full::Uid(mine)) => Err(Error::ResourceExhausted(format!(
                "{mine} file system operations on paths uid {uid} named are still running (a mount that does not answer?); berthd starts no more for it until they end"
            ))),
            Err(Full::Total(total)) => Err(Error::Unavailable(format!(
                "{total} file system operations on paths clients named are still running (a mount that does not answer?); retry once they end"
            ))),
        }
    }
}

/// One trip's place, given back when the work ends (not when its request gives up on it).
struct Trip {
    trips: Arc<Trips>,
    uid: u32,
}

impl Drop for Trip {
    fn drop(&mut self) {
        let mut running = self.trips.running.lock().unwrap_or_else(|e| e.into_inner());
        running.remove(self.uid);
    }
}

/// Who asks, and what they may not name.
#[derive(Debug, Clone)]
pub struct Caller {
    pub peer: Peer,
    state_dir: PathBuf,
    limits: ClientFileLimits,
    /// How work done off the reactor comes back to the request.
    hand_back: HandBack,
    trips: Arc<Trips>,
}

impl Caller {
    pub fn new(
        peer: Peer,
        state_dir: PathBuf,
        limits: ClientFileLimits,
        hand_back: HandBack,
        trips: Arc<Trips>,
    ) -> Self {
        Caller {
            peer,
            state_dir,
            limits,
            hand_back,
            trips,
        }
    }

    /// berthd itself (uid 0), for tests of what a root caller may do. Inside the tokio runtime.
    #[cfg(test)]
    pub fn berthd(state_dir: PathBuf) -> Self {
        let limits = ClientFileLimits {
            max_bytes: 1 << 20,
            timeout: Duration::from_secs(5),
        };
        Caller::new(
            Peer::root(),
            state_dir,
            limits,
            HandBack::start().unwrap(),
            Arc::default(),
        )
    }

    /// A stdio or console path (`what` names it), or `/dev/null` when it is empty: a FIFO,
    /// `/dev/null` or a regular file the peer may use with `access`, never under the state dir.
    /// Blocks on the file system: call it off the reactor.
    pub fn open_stdio(&self, what: &str, path: &str, access: Access) -> Result<OwnedFd> {
        if path.is_empty() {
            let flags = match access {
                Access::Read => OFlags::RDONLY,
                Access::Write => OFlags::WRONLY,
            };
            return rustix::fs::open("/dev/null", flags | OFlags::CLOEXEC, Mode::empty())
                .map_err(|e| Error::io("/dev/null", e.into()));
        }
        client_fs::open_stdio(
            what,
            Path::new(path),
            access,
            &self.peer,
            &[&self.state_dir],
        )
    }

    /// The console path of a process with a terminal (see [`client_fs::open_console`]).
    pub fn open_console(&self, path: &str) -> Result<client_fs::Console> {
        client_fs::open_console(Path::new(path), &self.peer, &[&self.state_dir])
    }

    /// The console path of a process without a terminal (see [`client_fs::check_console`]).
    pub fn check_console(&self, path: &str) -> Result<()> {
        client_fs::check_console(Path::new(path), &self.peer, &[&self.state_dir])
    }

    /// A stdio path a terminal replaces (see [`client_fs::check_stdio`]).
    pub fn check_stdio(&self, what: &str, path: &str, access: Access) -> Result<()> {
        client_fs::check_stdio(
            what,
            Path::new(path),
            access,
            &self.peer,
            &[&self.state_dir],
        )
    }

    /// A bundle directory the client named, checked as [`Caller::open_dir`] checks it, and the
    /// regular file `config.json` in it, of at most the size limit, with the names beside it
    /// (at most [`BUNDLE_NAMES`]; none where they cannot be listed), all in one trip off the
    /// reactor within the time limit; `Ok(None)` when the directory is there and the file is
    /// not. The runtime's copy of the spec mirrors the names (`RuntimeBinary::write_config`).
    pub async fn read_bundle(&self, dir: &Path) -> Result<Option<(Vec<u8>, Vec<OsString>)>> {
        let label = Doing {
            verb: "reading",
            what: "bundle",
            dir,
            name: Some("config.json"),
        };
        let dir = dir.to_owned();
        let limit = self.limits.max_bytes;
        let (peer, state_dir) = (self.peer.clone(), self.state_dir.clone());
        self.off_reactor(label, move || {
            // One walk when both are there: reading the file checks every directory on the way
            // as opening the directory would. Only a failure looks at the directory on its own,
            // so a directory that is missing or refused is reported as such.
            let file = dir.join("config.json");
            let bytes =
                match client_fs::read_regular("config.json", &file, limit, &peer, &[&state_dir]) {
                    Ok(bytes) => bytes,
                    Err(e) => {
                        client_fs::open_dir("bundle", &dir, &peer, &[&state_dir])?;
                        return match e {
                            Error::NotFound(_) => Ok(None),
                            e => Err(e),
                        };
                    }
                };
            let names = client_fs::open_dir("bundle", &dir, &peer, &[&state_dir])
                .map(|fd| names_beside_the_config(&fd))
                .unwrap_or_default();
            Ok(Some((bytes, names)))
        })
        .await
    }

    /// A directory the client named (a bundle), opened off the reactor within the time limit.
    pub async fn open_dir(&self, what: &str, path: &Path) -> Result<OwnedFd> {
        let (what_owned, path_owned) = (what.to_owned(), path.to_owned());
        let peer = self.peer.clone();
        let state_dir = self.state_dir.clone();
        let label = Doing {
            verb: "opening",
            what,
            dir: path,
            name: None,
        };
        self.off_reactor(label, move || {
            client_fs::open_dir(&what_owned, &path_owned, &peer, &[&state_dir])
        })
        .await
    }

    /// Runs `work` (which blocks on the file system) on tokio's blocking pool, given up after
    /// the time limit. The work cannot be cancelled: it finishes in the background. Its result
    /// comes back through the hand-back, not the pool's join handle (see hand_back).
    pub async fn off_reactor<T: Send + 'static>(
        &self,
        what: impl std::fmt::Display,
        work: impl FnOnce() -> Result<T> + Send + 'static,
    ) -> Result<T> {
        let trip = self.trips.take(self.peer.uid)?;
        let (result, done) = self.hand_back.channel();
        drop(tokio::task::spawn_blocking(move || {
            result.send(work());
            drop(trip);
        }));
        match tokio::time::timeout(self.limits.timeout, done).await {
            Ok(Ok(result)) => result,
            Ok(Err(_unsent)) => Err(Error::Internal(format!(
                "{what} failed: the work ended without a result"
            ))),
            Err(_elapsed) => Err(Error::DeadlineExceeded {
                what: what.to_string(),
                bound: self.limits.timeout,
            }),
        }
    }
}

/// The most names beside a bundle's `config.json` that the runtime's copy of the spec mirrors.
pub const BUNDLE_NAMES: usize = 256;

/// The names in the bundle directory `dir` but `config.json`, `.` and `..`: at most
/// [`BUNDLE_NAMES`], whatever the listing reached before an error.
fn names_beside_the_config(dir: &OwnedFd) -> Vec<OsString> {
    use std::os::unix::ffi::OsStrExt;
    let Ok(entries) = rustix::fs::Dir::read_from(dir) else {
        return Vec::new();
    };
    entries
        .map_while(|entry| entry.ok())
        .map(|entry| std::ffi::OsStr::from_bytes(entry.file_name().to_bytes()).to_owned())
        .filter(|name| !matches!(name.as_bytes(), b"." | b".." | b"config.json"))
        .take(BUNDLE_NAMES)
        .collect()
}

/// What a trip off the reactor does, for its error messages, formatted only when one is made:
/// formatting the path on every trip was 1% of berthd's CPU a create at C=1.
struct Doing<'a> {
    verb: &'static str,
    what: &'a str,
    dir: &'a Path,
    /// The file in `dir`, when the trip is for a file.
    name: Option<&'a str>,
}

impl std::fmt::Display for Doing<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let path = match self.name {
            Some(name) => shown(&self.dir.join(name)),
            None => shown(self.dir),
        };
        write!(f, "{} {} {path}", self.verb, self.what)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_client_file_is_read_off_the_reactor() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("config.json");
        std::fs::write(&file, "{}").unwrap();
        let state = tempfile::tempdir().unwrap();
        let caller = Caller::berthd(state.path().to_owned());
        std::fs::create_dir(dir.path().join("rootfs")).unwrap();
        std::fs::write(dir.path().join("hook.sh"), "").unwrap();
        let mut read = caller.read_bundle(dir.path()).await.unwrap().unwrap();
        read.1.sort();
        let names: Vec<OsString> = vec!["hook.sh".into(), "rootfs".into()];
        assert_eq!(read, (b"{}".to_vec(), names));
        // A bundle crowded with names (one not UTF-8) gives the copy no more than its bound.
        use std::os::unix::ffi::OsStrExt;
        std::fs::write(dir.path().join(std::ffi::OsStr::from_bytes(b"\xff")), "").unwrap();
        for i in 0..BUNDLE_NAMES {
            std::fs::write(dir.path().join(format!("n{i}")), "").unwrap();
        }
        let (_, names) = caller.read_bundle(dir.path()).await.unwrap().unwrap();
        assert_eq!(names.len(), BUNDLE_NAMES);
        assert!(!names.iter().any(|n| n == "config.json"));
        std::fs::remove_file(&file).unwrap();
        assert_eq!(caller.read_bundle(dir.path()).await.unwrap(), None);
        let no_dir = caller.read_bundle(&file.join("x")).await;
        assert!(no_dir.is_err());
    }

    #[tokio::test(flavor = "multi_thread")]
    async fn trips_stuck_past_their_time_limit_hold_their_place_until_they_end() {
        let limits = ClientFileLimits {
            max_bytes: 1 << 20,
            timeout: Duration::from_millis(20),
        };
        let trips = Arc::<Trips>::default();
        let hand_back = HandBack::start().unwrap();
        let as_uid = |uid: u32| {
            let peer = Peer {
                pid: 0,
                uid,
                gid: uid,
                groups: Vec::new(),
            };
            Caller::new(
                peer,
                "/state".into(),
                limits,
                hand_back.clone(),
                Arc::clone(&trips),
            )
        };
        let (member, other) = (as_uid(65534), as_uid(1000));
        // A mount that does not answer: each trip waits until the test lets them all go.
        let (release, stuck) = std::sync::mpsc::channel::<()>();
        let stuck = Arc::new(Mutex::new(stuck));
        for _ in 0..MAX_TRIPS_PER_UID {
            let stuck = Arc::clone(&stuck);
            let trip = member.off_reactor("reading a hung mount", move || {
                let _ = stuck.lock().unwrap().recv();
                Ok(())
            });
            assert!(matches!(trip.await, Err(Error::DeadlineExceeded { .. })));
        }
        let refused = member.off_reactor("one more", || Ok(())).await;
        assert!(
            matches!(&refused, Err(Error::ResourceExhausted(m)) if m.contains("uid 65534")),
            "{refused:?}"
        );
        other
            .off_reactor("another uid's", || Ok(()))
            .await
            .expect("another uid's trip runs");
        drop(release);
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        loop {
            match member
                .off_reactor("after the mount answers", || Ok(()))
                .await
            {
                Ok(()) => break,
                Err(e) if std::time::Instant::now() < deadline => {
                    drop(e);
                    tokio::time::sleep(Duration::from_millis(10)).await;
                }
                Err(e) => panic!("the places were not given back: {e}"),
            }
        }
    }

    #[tokio::test]
    async fn a_trip_past_the_time_limit_says_what_it_was_doing() {
        let limits = ClientFileLimits {
            max_bytes: 1 << 20,
            timeout: Duration::from_millis(20),
        };
        let hand_back = HandBack::start().unwrap();
        let caller = Caller::new(
            Peer::root(),
            "/state".into(),
            limits,
            hand_back,
            Arc::default(),
        );
        let label = Doing {
            verb: "reading",
            what: "bundle",
            dir: Path::new("/b"),
            name: Some("config.json"),
        };
        let late = caller.off_reactor(label, || {
            std::thread::sleep(Duration::from_millis(300));
            Ok(())
        });
        assert_eq!(
            late.await.unwrap_err().to_string(),
            "reading bundle /b/config.json did not finish within 20ms"
        );
    }
}
