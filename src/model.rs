//! The records several layers share: what a process runs, how a checkpoint was taken, and who is
//! at the other end of an API connection.
//!
//! Owns: the plain data that the supervisor builds and the event bus, the store and the API
//! carry, and the byte counts an API connection's socket shares with the api ([`SentBytes`],
//! [`AnswerBytes`]), whose counting and waiting sides stay together here. Does not own: how the
//! records are made (supervisor), stored (store) or put on the wire (api); nothing else here
//! does any work.

use serde::{Deserialize, Serialize};

/// What a process runs and as whom, as State and events report it.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ProcessSpec {
    pub args: Vec<String>,
    pub env: Vec<String>,
    pub cwd: String,
    pub uid: u32,
    pub gid: u32,
    pub additional_gids: Vec<u32>,
    pub terminal: bool,
}

impl ProcessSpec {
    /// The bytes of its args, env and cwd, without their NULs.
    pub fn string_bytes(&self) -> usize {
        self.args
            .iter()
            .chain(&self.env)
            .map(String::len)
            .sum::<usize>()
            + self.cwd.len()
    }
}

/// A checkpoint as the API describes it.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Checkpoint {
    pub name: String,
    /// The container stopped after the dump.
    pub exit: bool,
    pub tcp: bool,
    pub unix_sockets: bool,
    pub shell: bool,
}

/// What the listener knows of an API connection; tonic attaches it to every request of the
/// connection.
#[derive(Debug, Clone)]
pub struct ConnectionInfo {
    /// For the api's gate.
    pub credentials: PeerCredentials,
    /// For the api's streams, which take their next message only while the socket has room.
    pub room: SocketRoom,
    /// The places of the answers made but not yet taken by the socket, [`ANSWERS_AHEAD`] of
    /// them.
    pub answers: std::sync::Arc<tokio::sync::Semaphore>,
    /// What the socket has taken, for answers that wait until it took them.
    pub sent: std::sync::Arc<SentBytes>,
    /// Bytes of requests still arriving that this connection's uid may hold in berthd, shared by
    /// all of the uid's connections (each of root's has its own): `api::request_budget`.
    pub request_bytes: std::sync::Arc<tokio::sync::Semaphore>,
    /// Bytes of answers and stream messages made for this connection's uid and not yet taken by
    /// its sockets, shared as `request_bytes` is: `api::pacing`.
    pub answer_bytes: std::sync::Arc<AnswerBytes>,
}

/// What answers and stream messages made ahead of a uid's reading hold in berthd: each is
/// counted from when it is made until its connection's socket has taken as many bytes ([`Hold`],
/// [`SentBytes::release_at`]) or it is dropped. A new one is made only while the count is under
/// the budget, so it goes past by one message at most.
#[derive(Debug)]
pub struct AnswerBytes {
    held: std::sync::atomic::AtomicUsize,
    most: usize,
    freed: tokio::sync::Notify,
    /// Answers whose size is known only once made take turns, in one queue for each method that
    /// makes them (a ListCheckpoint waiting for a dump holds up no State): the budget is checked
    /// before each and its size counted before the next.
    making: [std::sync::Arc<tokio::sync::Mutex<()>>; MAKING_QUEUES],
}

/// The queues of [`AnswerBytes::making`]: one for each method whose answers are made in turns.
pub const MAKING_QUEUES: usize = 2;

impl AnswerBytes {
    pub fn new(most: usize) -> AnswerBytes {
        AnswerBytes {
            held: std::sync::atomic::AtomicUsize::new(0),
            most,
            freed: tokio::sync::Notify::new(),
            making: Default::default(),
        }
    }

    /// Waits until what is held is under the budget, then holds `bytes` more.
    pub async fn take(self: &std::sync::Arc<Self>, bytes: usize) -> Hold {
        use std::sync::atomic::Ordering::SeqCst;
        loop {
            let freed = self.freed.notified();
            tokio::pin!(freed);
            freed.as_mut().enable();
            let under = |held: usize| (held < self.most).then(|| held.saturating_add(bytes));
            if self.held.fetch_update(SeqCst, SeqCst, under).is_ok() {
                return Hold {
                    budget: std::sync::Arc::clone(self),
                    bytes,
                };
            }
            freed.await;
        }
    }

    /// A turn in `queue` (below [`MAKING_QUEUES`]) to make an answer whose size is not known
    /// yet, once what is held is under the budget; count it with [`MakingTurn::made`] before the
    /// turn ends.
    pub async fn making(self: &std::sync::Arc<Self>, queue: usize) -> MakingTurn {
        let queue = &self.making[queue.min(MAKING_QUEUES - 1)];
        let turn = std::sync::Arc::clone(queue).lock_owned().await;
        drop(self.take(0).await);
        MakingTurn {
            budget: std::sync::Arc::clone(self),
            _turn: turn,
        }
    }

    /// The bytes held now.
    #[cfg(test)]
    pub fn held(&self) -> usize {
        self.held.load(std::sync::atomic::Ordering::SeqCst)
    }

    fn give_back(&self, bytes: usize) {
        if bytes > 0 {
            self.held
                .fetch_sub(bytes, std::sync::atomic::Ordering::SeqCst);
            self.freed.notify_waiters();
        }
    }
}

/// A turn of [`AnswerBytes::making`].
pub struct MakingTurn {
    budget: std::sync::Arc<AnswerBytes>,
    _turn: tokio::sync::OwnedMutexGuard<()>,
}

impl MakingTurn {
    /// Holds the `bytes` the answer made in this turn came to, and ends the turn.
    pub fn made(self, bytes: usize) -> Hold {
        self.budget
            .held
            .fetch_add(bytes, std::sync::atomic::Ordering::SeqCst);
        Hold {
            budget: std::sync::Arc::clone(&self.budget),
            bytes,
        }
    }
}

/// Bytes counted in an [`AnswerBytes`], given back when dropped.
#[derive(Debug)]
pub struct Hold {
    budget: std::sync::Arc<AnswerBytes>,
    bytes: usize,
}

impl Drop for Hold {
    fn drop(&mut self) {
        self.budget.give_back(self.bytes);
    }
}

/// The bytes an API connection's socket has taken, all told: the socket counts them
/// ([`SentBytes::add`]), answers wait for a count ([`SentBytes::reaches`]).
#[derive(Debug, Default)]
pub struct SentBytes {
    count: std::sync::atomic::AtomicU64,
    /// Tasks waiting in `progress`: the socket wakes them only when there are any.
    waiting: std::sync::atomic::AtomicUsize,
    progress: tokio::sync::Notify,
    /// Holds given back once the count reaches their marks ([`SentBytes::release_at`]); the
    /// rest go with the connection.
    releases: std::sync::Mutex<std::collections::BinaryHeap<Release>>,
    /// How many `releases` holds: the socket looks at them only when there are any.
    pending: std::sync::atomic::AtomicUsize,
}

/// A hold due back once the socket has taken `mark` bytes; the heap's greatest is the earliest.
#[derive(Debug)]
struct Release {
    mark: u64,
    _hold: Hold,
}

impl PartialEq for Release {
    fn eq(&self, other: &Self) -> bool {
        self.mark == other.mark
    }
}

impl Eq for Release {}

impl PartialOrd for Release {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}

impl Ord for Release {
    fn cmp(&self, other: &Self) -> std::cmp::Ordering {
        other.mark.cmp(&self.mark)
    }
}

impl SentBytes {
    /// The bytes taken so far.
    pub fn count(&self) -> u64 {
        self.count.load(std::sync::atomic::Ordering::SeqCst)
    }

    /// Counts `bytes` the socket took, and wakes whoever waits.
    pub fn add(&self, bytes: usize) {
        use std::sync::atomic::Ordering::SeqCst;
        // SeqCst with `reaches`: a waiter either sees this count or is counted in `waiting`
        // (its wake-up enabled) and woken.
        self.count.fetch_add(bytes as u64, SeqCst);
        if self.waiting.load(SeqCst) > 0 {
            self.progress.notify_waiters();
        }
        if self.pending.load(SeqCst) > 0 {
            self.release_reached();
        }
    }

    /// Gives `hold` back once the socket has taken `mark` bytes, all told (at once if it has),
    /// or when the connection ends.
    pub fn release_at(&self, mark: u64, hold: Hold) {
        if self.count() >= mark {
            return;
        }
        {
            let mut releases = self.releases();
            releases.push(Release { mark, _hold: hold });
            self.pending
                .store(releases.len(), std::sync::atomic::Ordering::SeqCst);
        }
        // SeqCst with `add`: a count that reached the mark meanwhile either saw this one pending
        // or is seen here.
        self.release_reached();
    }

    fn release_reached(&self) {
        let count = self.count();
        let mut due = Vec::new();
        {
            let mut releases = self.releases();
            while releases.peek().is_some_and(|release| release.mark <= count) {
                due.extend(releases.pop());
            }
            self.pending
                .store(releases.len(), std::sync::atomic::Ordering::SeqCst);
        }
        // Given back outside the lock: each wakes who waits for the budget.
        drop(due);
    }

    fn releases(&self) -> std::sync::MutexGuard<'_, std::collections::BinaryHeap<Release>> {
        self.releases.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Waits until the socket has taken `mark` bytes, all told.
    pub async fn reaches(&self, mark: u64) {
        use std::sync::atomic::Ordering::SeqCst;
        if self.count() >= mark {
            return;
        }
        self.waiting.fetch_add(1, SeqCst);
        let _counted = Waiting(self);
        loop {
            let progress = self.progress.notified();
            tokio::pin!(progress);
            progress.as_mut().enable();
            if self.count() >= mark {
                return;
            }
            progress.await;
        }
    }

    /// Tasks waiting in [`SentBytes::reaches`].
    #[cfg(test)]
    pub fn waiters(&self) -> usize {
        self.waiting.load(std::sync::atomic::Ordering::SeqCst)
    }
}

/// A waiter counted in [`SentBytes`]'s `waiting` until dropped.
struct Waiting<'a>(&'a SentBytes);

impl Drop for Waiting<'_> {
    fn drop(&mut self) {
        self.0
            .waiting
            .fetch_sub(1, std::sync::atomic::Ordering::SeqCst);
    }
}

/// Answers whose size is the daemon's to decide (State, ListCheckpoint) made but not yet taken by
/// the socket, at most, on one connection.
pub const ANSWERS_AHEAD: usize = 4;

/// What `SO_PEERCRED` said of an API connection's peer when the listener accepted it (`None` when
/// it could not be read), and `SO_PEERGROUPS` its supplementary groups (`None` where the kernel
/// gives none: they are then read from `/proc`).
#[derive(Debug, Clone)]
pub struct PeerCredentials(
    pub Option<nix::sys::socket::UnixCredentials>,
    pub Option<std::sync::Arc<[u32]>>,
);

/// Whether an API connection's socket takes what is written to it: false from a write that found
/// it full until a write goes through whole. Closed when the connection is.
#[derive(Debug, Clone)]
pub struct SocketRoom(pub tokio::sync::watch::Receiver<bool>);

#[cfg(test)]
mod tests {
    use std::sync::Arc;
    use std::time::Duration;

    use super::*;

    const PATIENCE: Duration = Duration::from_millis(200);

    #[tokio::test]
    async fn a_message_is_made_only_while_the_budget_has_room_and_may_go_past_it_by_one() {
        let budget = Arc::new(AnswerBytes::new(100));
        let first = budget.take(60).await;
        let second = budget.take(60).await;
        assert_eq!(budget.held(), 120, "the second went past by one message");
        let third = tokio::spawn({
            let budget = Arc::clone(&budget);
            async move { budget.take(10).await }
        });
        tokio::time::sleep(PATIENCE).await;
        assert!(!third.is_finished(), "made over the budget");
        drop(first);
        let third = tokio::time::timeout(PATIENCE, third)
            .await
            .expect("not made once there was room")
            .unwrap();
        assert_eq!(budget.held(), 70);
        drop((second, third));
        assert_eq!(budget.held(), 0);
    }

    #[tokio::test]
    async fn answers_of_unknown_size_take_turns_and_count_what_they_made() {
        let budget = Arc::new(AnswerBytes::new(100));
        let turn = budget.making(0).await;
        let next = tokio::spawn({
            let budget = Arc::clone(&budget);
            async move { budget.making(0).await.made(5) }
        });
        tokio::time::sleep(PATIENCE).await;
        assert!(!next.is_finished(), "two answers made at once");
        // Another queue's turn is not held up by this one's.
        let other = tokio::time::timeout(PATIENCE, budget.making(1))
            .await
            .expect("held up by another queue's turn")
            .made(0);
        let big = turn.made(150);
        tokio::time::sleep(PATIENCE).await;
        assert!(!next.is_finished(), "made over the budget");
        drop(other);
        drop(big);
        let next = tokio::time::timeout(PATIENCE, next)
            .await
            .expect("not made once there was room")
            .unwrap();
        assert_eq!(budget.held(), 5);
        drop(next);
        assert_eq!(budget.held(), 0);
    }

    #[tokio::test]
    async fn a_hold_comes_back_when_the_socket_reaches_its_mark_or_with_the_connection() {
        let budget = Arc::new(AnswerBytes::new(1000));
        let sent = SentBytes::default();
        sent.add(10);
        sent.release_at(20, budget.take(100).await);
        sent.release_at(40, budget.take(200).await);
        sent.release_at(10, budget.take(400).await);
        assert_eq!(
            budget.held(),
            300,
            "one already reached was given back at once"
        );
        sent.add(15);
        assert_eq!(budget.held(), 200, "only the first mark was reached");
        sent.release_at(1000, budget.take(1).await);
        drop(sent);
        assert_eq!(budget.held(), 0, "the rest went with the connection");
    }
}
