//! Accepting API connections within limits: at most `--max-connections` at once (each holds a
//! [`ConnectionPermit`] until it closes), at most `--max-connections-per-uid` of them from one
//! non-root uid (one more is closed at once), a connection that sends nothing within
//! `--handshake-timeout` is closed, and when the limit is reached a connection still waiting to
//! speak gives its place to a new one, so idle sockets can never lock out a client that talks.
//! A connection that has spoken holds its place until it closes: the edge closes one whose
//! HTTP/2 preface is not whole within `--handshake-timeout`, h2's keepalive one that stops
//! answering pings, and the per-uid limit, at most half of the connections in effect, keeps one
//! client's connections from taking every place meanwhile. Two uids can still take them all, so
//! uid 0 has [`ROOT_PLACES`] of its own beyond the limit: the operator always gets in.
//! When every place is held, root takes one of its own if one is free; otherwise a connection
//! still silent gives way (root's own places only to root's next). When every place is held by
//! connections that have spoken, a new one from a uid other than 0 is closed at once (waiting
//! for a place, it would hold up the accept loop, and so root, for as long as the others keep
//! theirs); one from uid 0 past its own places waits (beyond the limit by one) for a place of
//! either kind. Accept errors (EMFILE, ENFILE, ENOMEM) back off instead of spinning.
//!
//! Owns: the accept loop and its limits, and clearing a stale socket file before a bind.
//! [`accept`] yields each connection's [`ApiSocket`] with its permit, so whatever wraps a stream
//! (an `:authority` rewriter) composes between it and [`Limited`], which holds the permit for
//! the connection's life.
//! Does not own: HTTP/2 (tonic and h2: streams per connection, keepalive, message sizes).

use std::collections::{HashMap, VecDeque};
use std::io;
use std::os::fd::OwnedFd;
use std::path::Path;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use rustix::net::SocketFlags;
use tokio::io::unix::AsyncFd;
use tokio::io::{AsyncRead, AsyncWrite, Interest, ReadBuf};
use tokio::sync::{OwnedSemaphorePermit, Semaphore, mpsc, oneshot};
use tokio_stream::wrappers::ReceiverStream;

use crate::error::{Error, Result};
use crate::model::AnswerBytes;

#[allow(unsafe_code)]
mod peer_groups;
mod socket;

pub use socket::ApiSocket;

/// The first wait after a failed accept; doubled up to [`MAX_BACKOFF`] while accept keeps failing.
const FIRST_BACKOFF: Duration = Duration::from_millis(10);
const MAX_BACKOFF: Duration = Duration::from_secs(1);
/// How often the refusals of one uid's connections over its limit are logged.
const REFUSAL_LOG_EVERY: Duration = Duration::from_secs(60);
/// Places for uid 0's connections beyond `--max-connections`, taken once those are all held. A
/// few, as databases keep for their superuser: berth's CLI under sudo, an operator's agent.
pub const ROOT_PLACES: usize = 4;

#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// Connections open at once.
    pub max_connections: usize,
    /// Connections open at once from one uid other than 0.
    pub max_per_uid: usize,
    /// Places only uid 0 takes, once `max_connections` are held.
    pub root_places: usize,
    /// How long a new connection may stay silent before it is closed.
    pub handshake_timeout: Duration,
    /// Bytes of requests still arriving that one uid's connections may hold at once (each of
    /// uid 0's connections this much of its own).
    pub request_bytes_per_uid: usize,
    /// Bytes of answers and stream messages made ahead of one uid's reading, as for requests.
    pub answer_bytes_per_uid: usize,
}

impl Limits {
    /// `max_connections` capped at a quarter of the open file limit (a connection holds one
    /// descriptor, two while a write waits for space): the rest is kept for containers (a pidfd
    /// each), stats files and runtime commands. `max_per_uid` capped at half of what that leaves
    /// ([`per_uid_cap`]).
    pub fn within_fd_limit(
        max_connections: u64,
        max_per_uid: u64,
        handshake_timeout: Duration,
        request_bytes_per_uid: usize,
        answer_bytes_per_uid: usize,
    ) -> Limits {
        let cap = crate::fd_limit::quarter();
        if max_connections > cap {
            tracing::warn!(
                max_connections,
                cap,
                "--max-connections lowered to a quarter of the open file limit"
            );
        }
        let max_connections = max_connections.min(cap);
        let per_uid_cap = per_uid_cap(max_connections);
        if max_per_uid > per_uid_cap {
            tracing::warn!(
                max_connections_per_uid = max_per_uid,
                cap = per_uid_cap,
                max_connections,
                "--max-connections-per-uid lowered to half of the connections allowed at once, so one uid cannot take every place"
            );
        }
        Limits {
            max_connections: max_connections as usize,
            max_per_uid: usize::try_from(max_per_uid.min(per_uid_cap)).unwrap_or(usize::MAX),
            root_places: ROOT_PLACES,
            handshake_timeout,
            request_bytes_per_uid: request_bytes_per_uid.min(Semaphore::MAX_PERMITS),
            answer_bytes_per_uid,
        }
    }
}

/// The most connections one uid other than 0 may hold out of `max_connections`: half, at least
/// one. A connection that has spoken keeps its place until it closes, so one uid holding more
/// could leave too few for everyone else (root included, whose connection would wait for one).
fn per_uid_cap(max_connections: u64) -> u64 {
    (max_connections / 2).max(1)
}

/// A connection's place under `max_connections` and its uid's, given back when dropped.
pub struct ConnectionPermit {
    _place: OwnedSemaphorePermit,
    _uid_place: Option<UidPlace>,
}

/// A uid's open connections (0 is not counted) and the budgets they share.
#[derive(Default)]
struct UidConnections {
    open: usize,
    budgets: Option<Budgets>,
}

/// What a uid's connections share (each of uid 0's has its own): the bytes of its requests
/// still arriving, and of answers made ahead of its reading.
#[derive(Clone)]
pub struct Budgets {
    pub request_bytes: Arc<Semaphore>,
    pub answer_bytes: Arc<AnswerBytes>,
}

type ByUid = Arc<Mutex<HashMap<u32, UidConnections>>>;

/// One of a uid's places under `max_per_uid`.
struct UidPlace {
    uid: u32,
    by_uid: ByUid,
}

impl UidPlace {
    /// A place for a connection from `uid` (`None` for uid 0) with the budgets it shares, or
    /// `Err` with how many it has open when that is `limits.max_per_uid`.
    fn take(
        by_uid: &ByUid,
        uid: u32,
        limits: &Limits,
    ) -> Result<(Option<UidPlace>, Budgets), usize> {
        let budget = || Budgets {
            request_bytes: Arc::new(Semaphore::new(limits.request_bytes_per_uid)),
            answer_bytes: Arc::new(AnswerBytes::new(limits.answer_bytes_per_uid)),
        };
        if uid == 0 {
            return Ok((None, budget()));
        }
        let mut by_uid_now = by_uid.lock().expect("connections by uid lock poisoned");
        let connections = by_uid_now.entry(uid).or_default();
        if connections.open >= limits.max_per_uid {
            return Err(connections.open);
        }
        connections.open += 1;
        let shared = connections.budgets.get_or_insert_with(budget).clone();
        let place = UidPlace {
            uid,
            by_uid: Arc::clone(by_uid),
        };
        Ok((Some(place), shared))
    }
}

impl Drop for UidPlace {
    fn drop(&mut self) {
        let mut by_uid = self.by_uid.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(connections) = by_uid.get_mut(&self.uid) {
            connections.open -= 1;
            if connections.open == 0 {
                by_uid.remove(&self.uid);
            }
        }
    }
}

/// An accepted connection that has spoken, with its permit.
pub struct Accepted {
    pub socket: ApiSocket,
    pub permit: ConnectionPermit,
}

/// Which semaphore a connection's place came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Pool {
    /// One of `--max-connections`.
    Shared,
    /// One of uid 0's own, beyond them.
    Root,
}

/// A connection accepted but still silent, which can be told to give up its place.
struct SilentConnection {
    key: u64,
    pool: Pool,
    evict: oneshot::Sender<()>,
}

/// Connections accepted but still silent, oldest first.
#[derive(Default)]
struct Silent {
    next: u64,
    waiting: VecDeque<SilentConnection>,
}

impl Silent {
    /// Tells the oldest silent connection whose place a new one from uid 0 (`for_root`) or from
    /// another uid may take to give it up, and returns the pool that place goes back to. Root's
    /// own places go only to root: a place waited for in the other pool would never come.
    fn evict_oldest(&mut self, for_root: bool) -> Option<Pool> {
        let at = self
            .waiting
            .iter()
            .position(|c| for_root || c.pool == Pool::Shared)?;
        let connection = self.waiting.remove(at)?;
        let _ = connection.evict.send(());
        Some(connection.pool)
    }
}

/// Accepts connections on `listener`, a listening unix socket, within `limits` until the
/// returned stream is dropped. Must be called inside the tokio runtime.
pub fn accept(
    listener: OwnedFd,
    limits: Limits,
) -> io::Result<ReceiverStream<io::Result<Accepted>>> {
    rustix::io::ioctl_fionbio(&listener, true)?;
    let listener = crate::reactor::register(listener, Interest::READABLE)?;
    let (tx, rx) = mpsc::channel(64);
    tokio::spawn(accept_loop(listener, limits, tx));
    Ok(ReceiverStream::new(rx))
}

/// The next connection, non-blocking and close-on-exec, as an [`ApiSocket`].
async fn accept_one(listener: &AsyncFd<OwnedFd>) -> io::Result<ApiSocket> {
    let flags = SocketFlags::NONBLOCK | SocketFlags::CLOEXEC;
    loop {
        let mut ready = listener.readable().await?;
        if let Ok(accepted) = ready.try_io(|l| Ok(rustix::net::accept_with(l, flags)?)) {
            return ApiSocket::new(accepted?);
        }
    }
}

async fn accept_loop(
    listener: AsyncFd<OwnedFd>,
    limits: Limits,
    accepted: mpsc::Sender<io::Result<Accepted>>,
) {
    let places = Arc::new(Semaphore::new(limits.max_connections.max(1)));
    let root_places = Arc::new(Semaphore::new(limits.root_places));
    let by_uid = ByUid::default();
    // When each uid was last told about in the log, so that a flood logs a line a minute.
    let mut warned: HashMap<u32, Instant> = HashMap::new();
    let mut warned_full: Option<Instant> = None;
    let silent = Arc::new(Mutex::new(Silent::default()));
    let mut backoff = FIRST_BACKOFF;
    loop {
        let socket = tokio::select! {
            result = accept_one(&listener) => result,
            () = accepted.closed() => return,
        };
        let mut socket = match socket {
            Ok(socket) => {
                backoff = FIRST_BACKOFF;
                socket
            }
            Err(e) => {
                // Out of fds or memory: accepting again at once would fail again at once.
                tracing::warn!(error = %e, backoff_ms = backoff.as_millis() as u64, "accept failed; backing off");
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(MAX_BACKOFF);
                continue;
            }
        };
        // A peer whose credentials could not be read counts as one uid of its own; its
        // requests are refused anyway.
        let uid = socket.peer_uid().unwrap_or(u32::MAX);
        let uid_place = match UidPlace::take(&by_uid, uid, &limits) {
            Ok((place, budgets)) => {
                socket.set_budgets(budgets);
                place
            }
            Err(open) => {
                let now = Instant::now();
                if warned
                    .get(&uid)
                    .is_none_or(|at| now - *at >= REFUSAL_LOG_EVERY)
                {
                    warned.retain(|_, at| now - *at < REFUSAL_LOG_EVERY);
                    warned.insert(uid, now);
                    tracing::warn!(
                        uid,
                        open,
                        "closing connections over --max-connections-per-uid (logged once a minute per uid)"
                    );
                }
                continue;
            }
        };
        let free = match Arc::clone(&places).try_acquire_owned() {
            Ok(permit) => Some((permit, Pool::Shared)),
            Err(_) if uid == 0 => Arc::clone(&root_places)
                .try_acquire_owned()
                .ok()
                .map(|permit| (permit, Pool::Root)),
            Err(_) => None,
        };
        let (permit, pool) = match free {
            Some(place) => place,
            None => {
                // Full: the oldest silent connection makes room for this one; if none is silent,
                // root waits until a connection closes (new ones queue in the socket's backlog);
                // another uid's is closed.
                let evicted = silent
                    .lock()
                    .expect("silent lock poisoned")
                    .evict_oldest(uid == 0);
                if evicted.is_none() && uid != 0 {
                    let now = Instant::now();
                    if warned_full.is_none_or(|at| now - at >= REFUSAL_LOG_EVERY) {
                        warned_full = Some(now);
                        tracing::warn!(
                            uid,
                            max_connections = limits.max_connections,
                            "every connection place is held by connections that have spoken: closing new ones from uids other than 0 (logged once a minute)"
                        );
                    }
                    continue;
                }
                let shared = async { (Arc::clone(&places).acquire_owned().await, Pool::Shared) };
                let root = async { (Arc::clone(&root_places).acquire_owned().await, Pool::Root) };
                let place = tokio::select! {
                    place = shared, if evicted != Some(Pool::Root) => place,
                    place = root, if evicted != Some(Pool::Shared) => place,
                    () = accepted.closed() => return,
                };
                match place {
                    (Ok(permit), pool) => (permit, pool),
                    (Err(_), _) => return,
                }
            }
        };
        let (evict, evicted) = oneshot::channel();
        let key = {
            let mut silent = silent.lock().expect("silent lock poisoned");
            let key = silent.next;
            silent.next += 1;
            silent
                .waiting
                .push_back(SilentConnection { key, pool, evict });
            key
        };
        let silent = Arc::clone(&silent);
        let accepted = accepted.clone();
        tokio::spawn(async move {
            let spoke = tokio::select! {
                spoke = socket.first_bytes() => spoke,
                _ = evicted => false,
                () = tokio::time::sleep(limits.handshake_timeout) => false,
            };
            // Still listed unless the accept loop took it to give way, which it then does even
            // if its first bytes came meanwhile: the loop is waiting for its place.
            let listed = {
                let mut silent = silent.lock().expect("silent lock poisoned");
                let before = silent.waiting.len();
                silent.waiting.retain(|c| c.key != key);
                silent.waiting.len() < before
            };
            if spoke && listed {
                let permit = ConnectionPermit {
                    _place: permit,
                    _uid_place: uid_place,
                };
                let _ = accepted.send(Ok(Accepted { socket, permit })).await;
            }
        });
    }
}

/// Removes the socket file a berthd that died left at `path` (the caller holds the lock that
/// makes it stale), so a listener can be bound there. Anything else at `path` (a file given by
/// mistake, a directory, a link) is left alone and refused.
pub fn remove_stale_socket(path: &Path) -> Result<()> {
    use std::os::unix::fs::FileTypeExt;
    match std::fs::symlink_metadata(path) {
        Ok(meta) if meta.file_type().is_socket() => {
            std::fs::remove_file(path).map_err(|e| Error::io(path, e))
        }
        Ok(_) => Err(Error::FailedPrecondition(format!(
            "{} exists and is not a socket: refusing to replace it with berthd's (remove it or listen elsewhere)",
            path.display()
        ))),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(Error::io(path, e)),
    }
}

/// A connection's stream holding its [`ConnectionPermit`] for as long as it is open.
pub struct Limited<S> {
    stream: S,
    _permit: ConnectionPermit,
}

impl<S> Limited<S> {
    pub fn new(stream: S, permit: ConnectionPermit) -> Self {
        Limited {
            stream,
            _permit: permit,
        }
    }
}

/// A connection's end frees what it held (h2's buffers and streams, its tasks): have the heap
/// give it back to the kernel.
impl<S> Drop for Limited<S> {
    fn drop(&mut self) {
        crate::heap::release_soon();
    }
}

impl<S: tonic::transport::server::Connected> tonic::transport::server::Connected for Limited<S> {
    type ConnectInfo = S::ConnectInfo;

    fn connect_info(&self) -> Self::ConnectInfo {
        self.stream.connect_info()
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for Limited<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_read(cx, buf)
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Limited<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.stream).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.stream).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.stream.is_write_vectored()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::AsyncWriteExt;
    use tokio::net::UnixStream;
    use tokio_stream::StreamExt;

    fn bound(dir: &tempfile::TempDir) -> (OwnedFd, std::path::PathBuf) {
        let path = dir.path().join("s.sock");
        let listener = std::os::unix::net::UnixListener::bind(&path).unwrap();
        (listener.into(), path)
    }

    async fn next(incoming: &mut ReceiverStream<io::Result<Accepted>>) -> Option<Accepted> {
        let accepted = tokio::time::timeout(Duration::from_secs(2), incoming.next()).await;
        accepted.ok().flatten().map(|a| a.unwrap())
    }

    #[tokio::test]
    async fn silent_connections_give_way_and_time_out() {
        let dir = tempfile::tempdir().unwrap();
        let (listener, path) = bound(&dir);
        let limits = Limits {
            max_connections: 2,
            max_per_uid: 2,
            root_places: 0,
            handshake_timeout: Duration::from_millis(300),
            request_bytes_per_uid: 1 << 20,
            answer_bytes_per_uid: 1 << 20,
        };
        let mut incoming = accept(listener, limits).unwrap();
        // Two silent connections fill the table; a third that talks still gets in.
        let mut silent = Vec::new();
        for _ in 0..2 {
            silent.push(UnixStream::connect(&path).await.unwrap());
        }
        let mut talker = UnixStream::connect(&path).await.unwrap();
        talker.write_all(b"PRI").await.unwrap();
        let first = next(&mut incoming).await.expect("the talking connection");
        drop(first);
        // The silent ones are closed by berthd: reading them ends.
        for mut stream in silent {
            assert!(closed(&mut stream).await, "still open");
        }
    }

    /// Whether a connection to `stream`'s peer was closed by the accept loop.
    async fn closed(stream: &mut UnixStream) -> bool {
        let mut buf = [0u8; 1];
        let read = tokio::time::timeout(
            Duration::from_secs(2),
            tokio::io::AsyncReadExt::read(stream, &mut buf),
        );
        matches!(read.await, Ok(Ok(0)) | Ok(Err(_)))
    }

    /// A connection that has spoken holds its place until dropped. Past every place (and, for
    /// root, past its own), root's next waits for one; another uid's is closed at once, as the
    /// accept loop must not wait on it with root's connections behind. This test's uid decides
    /// which it sees.
    #[tokio::test]
    async fn a_talking_connection_holds_its_place_until_dropped() {
        let dir = tempfile::tempdir().unwrap();
        let (listener, path) = bound(&dir);
        let limits = Limits {
            max_connections: 1,
            max_per_uid: 1,
            root_places: 1,
            handshake_timeout: Duration::from_secs(10),
            request_bytes_per_uid: 1 << 20,
            answer_bytes_per_uid: 1 << 20,
        };
        let root = rustix::process::getuid().is_root();
        let mut incoming = accept(listener, limits).unwrap();
        let mut a = UnixStream::connect(&path).await.unwrap();
        a.write_all(b"a").await.unwrap();
        let held = next(&mut incoming).await.expect("first connection");
        let mut b = UnixStream::connect(&path).await.unwrap();
        b.write_all(b"b").await.unwrap();
        if !root {
            assert!(next(&mut incoming).await.is_none(), "over the limit");
            assert!(closed(&mut b).await, "another uid's is closed at once");
            return;
        }
        let own = next(&mut incoming).await.expect("root's own place");
        let mut c = UnixStream::connect(&path).await.unwrap();
        c.write_all(b"c").await.unwrap();
        assert!(next(&mut incoming).await.is_none(), "over root's places");
        drop(held);
        assert!(
            next(&mut incoming).await.is_some(),
            "its place was given back"
        );
        drop(own);
    }

    /// With every shared place held, root's connections arriving together take root's own
    /// places, and once those are taken, a newer one takes the place of root's oldest still
    /// silent. Waiting for a shared place instead, the accept loop stopped until one was given
    /// back, with root's own places free. Runs as root only (the uid decides the pool).
    #[tokio::test]
    async fn roots_connections_arriving_together_take_roots_own_places() {
        if !rustix::process::getuid().is_root() {
            return;
        }
        let dir = tempfile::tempdir().unwrap();
        let (listener, path) = bound(&dir);
        let limits = Limits {
            max_connections: 1,
            max_per_uid: 1,
            root_places: 2,
            handshake_timeout: Duration::from_secs(10),
            request_bytes_per_uid: 1 << 20,
            answer_bytes_per_uid: 1 << 20,
        };
        let mut incoming = accept(listener, limits).unwrap();
        let mut member = UnixStream::connect(&path).await.unwrap();
        member.write_all(b"m").await.unwrap();
        let _held = next(&mut incoming).await.expect("the shared place");
        let mut oldest = UnixStream::connect(&path).await.unwrap();
        let mut burst = Vec::new();
        for _ in 0..2 {
            burst.push(UnixStream::connect(&path).await.unwrap());
        }
        for stream in &mut burst {
            stream.write_all(b"r").await.unwrap();
        }
        for n in 0..2 {
            assert!(
                next(&mut incoming).await.is_some(),
                "root's connection {n} got no place"
            );
        }
        assert!(closed(&mut oldest).await, "the oldest silent one stayed");
    }

    #[test]
    fn a_uid_has_at_most_its_places_and_root_is_not_counted() {
        let by_uid = ByUid::default();
        let limits = Limits {
            max_connections: 10,
            max_per_uid: 2,
            root_places: 0,
            handshake_timeout: Duration::from_secs(1),
            request_bytes_per_uid: 100,
            answer_bytes_per_uid: 200,
        };
        let shared = |a: &Budgets, b: &Budgets| {
            let requests = Arc::ptr_eq(&a.request_bytes, &b.request_bytes);
            assert_eq!(requests, Arc::ptr_eq(&a.answer_bytes, &b.answer_bytes));
            requests
        };
        let (first, first_budget) = UidPlace::take(&by_uid, 1000, &limits).unwrap();
        let (second, second_budget) = UidPlace::take(&by_uid, 1000, &limits).unwrap();
        assert!(first.is_some() && second.is_some());
        assert!(
            shared(&first_budget, &second_budget),
            "a uid's connections share one budget for their requests and one for their answers"
        );
        assert_eq!(first_budget.request_bytes.available_permits(), 100);
        assert_eq!(UidPlace::take(&by_uid, 1000, &limits).err(), Some(2));
        let (other, other_budget) = UidPlace::take(&by_uid, 1001, &limits).unwrap();
        assert!(other.is_some() && !shared(&first_budget, &other_budget));
        let mut root_budgets: Vec<Budgets> = Vec::new();
        for _ in 0..5 {
            let (place, budget) = UidPlace::take(&by_uid, 0, &limits).unwrap();
            assert!(place.is_none());
            assert!(
                root_budgets.iter().all(|b| !shared(b, &budget)),
                "each of root's its own"
            );
            root_budgets.push(budget);
        }
        drop(first);
        let (third, _) = UidPlace::take(&by_uid, 1000, &limits).unwrap();
        drop((second, third, other));
        assert!(
            by_uid.lock().unwrap().is_empty(),
            "uids without connections are forgotten"
        );
    }

    #[test]
    fn one_uid_gets_at_most_half_of_the_connections_in_effect() {
        let limits = |total, per_uid| Limits::within_fd_limit(total, per_uid, Duration::ZERO, 1, 1);
        assert_eq!(limits(20, 128).max_per_uid, 10);
        assert_eq!(limits(20, 8).max_per_uid, 8, "a lower flag stands");
        assert_eq!(limits(21, 128).max_per_uid, 10);
        assert_eq!(limits(1, 128).max_per_uid, 1, "at least one");
        // Lowered to a quarter of the open file limit (75 at a limit of 300), the total
        // still leaves half for others.
        let lowered = limits(u64::MAX, u64::MAX);
        assert_eq!(
            lowered.max_per_uid,
            (lowered.max_connections / 2).max(1),
            "half of the lowered total"
        );
    }

    #[test]
    fn the_connection_limit_keeps_most_fds_for_containers() {
        let soft = rustix::process::getrlimit(rustix::process::Resource::Nofile)
            .current
            .unwrap();
        let limits = Limits::within_fd_limit(u64::MAX, 1, Duration::from_secs(1), 1, 1);
        assert_eq!(limits.max_connections as u64, (soft / 4).max(1));
        assert_eq!(
            Limits::within_fd_limit(1, 1, Duration::ZERO, 1, 1).max_connections,
            1
        );
    }
}
