//! The records several layers share: what a process runs, how a checkpoint was taken, and who is
//! at the other end of an API connection.
//!
//! Owns: the plain data that the supervisor builds and the event bus, the store and the API
//! carry, the byte count an API connection's socket shares with the api ([`SentBytes`]) and the
//! budget a uid's answers hold until h2 lets go of their data ([`AnswerBytes`]), whose counting
//! and waiting sides stay together here. Does not own: how the records are made (supervisor),
//! stored (store) or put on the wire (api); nothing else here does any work.

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
    /// Bytes of answers and stream messages made for this connection's uid whose data h2 still
    /// holds, shared as `request_bytes` is: `api::pacing`.
    pub answer_bytes: std::sync::Arc<AnswerBytes>,
}

/// What answers and stream messages made ahead of a uid's reading hold in berthd, at most: each
/// holds its bytes of the budget ([`Hold`]) from before it is made until h2 has let go of the
/// data it was encoded into (written to the socket, or dropped with its stream or connection).
/// Holds are given in the order asked for.
#[derive(Debug)]
pub struct AnswerBytes {
    bytes: std::sync::Arc<tokio::sync::Semaphore>,
    most: u32,
    /// Answers whose size is known only once made take turns, in one queue for each method that
    /// makes them ([`AnswerQueue`]): each waits for its bytes with the answer made, so one at a
    /// time holds one.
    making: [std::sync::Arc<tokio::sync::Mutex<()>>; 2],
}

/// The methods whose answers are made in a uid's turns, each in its own queue.
#[derive(Clone, Copy, Debug)]
pub enum AnswerQueue {
    State = 0,
    ListCheckpoint = 1,
}

impl AnswerBytes {
    pub fn new(most: usize) -> AnswerBytes {
        // A hold takes at most u32::MAX permits at once: the budget is no larger.
        let most = most
            .min(tokio::sync::Semaphore::MAX_PERMITS)
            .min(u32::MAX as usize);
        AnswerBytes {
            bytes: std::sync::Arc::new(tokio::sync::Semaphore::new(most)),
            most: most as u32,
            making: Default::default(),
        }
    }

    /// Waits for `bytes` of the budget (all of it, for a message larger than the budget).
    pub async fn take(&self, bytes: usize) -> Hold {
        let bytes = u32::try_from(bytes).unwrap_or(u32::MAX).min(self.most);
        // The semaphore is never closed.
        Hold {
            _bytes: std::sync::Arc::clone(&self.bytes)
                .acquire_many_owned(bytes)
                .await
                .ok(),
        }
    }

    /// A turn in `queue` to make an answer and wait for its bytes.
    pub async fn making(&self, queue: AnswerQueue) -> tokio::sync::OwnedMutexGuard<()> {
        std::sync::Arc::clone(&self.making[queue as usize])
            .lock_owned()
            .await
    }

    /// The bytes held now.
    #[cfg(test)]
    pub fn held(&self) -> usize {
        self.most as usize - self.bytes.available_permits()
    }
}

/// Bytes of an [`AnswerBytes`], given back when dropped.
#[derive(Debug)]
pub struct Hold {
    _bytes: Option<tokio::sync::OwnedSemaphorePermit>,
}

/// The bytes an API connection's socket has taken, all told: the socket counts them
/// ([`SentBytes::add`]), answers wait for a count ([`SentBytes::reaches`]).
#[derive(Debug, Default)]
pub struct SentBytes {
    count: std::sync::atomic::AtomicU64,
    /// Tasks waiting in `progress`: the socket wakes them only when there are any.
    waiting: std::sync::atomic::AtomicUsize,
    progress: tokio::sync::Notify,
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
    async fn bytes_are_held_within_the_budget_in_the_order_asked_for() {
        let budget = Arc::new(AnswerBytes::new(100));
        let first = budget.take(60).await;
        let waiting = |bytes| {
            let budget = Arc::clone(&budget);
            tokio::spawn(async move { budget.take(bytes).await })
        };
        let second = waiting(60);
        tokio::time::sleep(PATIENCE).await;
        let third = waiting(10);
        tokio::time::sleep(PATIENCE).await;
        assert!(!second.is_finished(), "held past the budget");
        assert!(!third.is_finished(), "went ahead of one asked for before");
        drop(first);
        let second = tokio::time::timeout(PATIENCE, second)
            .await
            .unwrap()
            .unwrap();
        let third = tokio::time::timeout(PATIENCE, third)
            .await
            .unwrap()
            .unwrap();
        assert_eq!(budget.held(), 70);
        drop((second, third));
        // A message larger than the budget holds all of it.
        let whole = budget.take(1000).await;
        assert_eq!(budget.held(), 100);
        drop(whole);
        assert_eq!(budget.held(), 0);
    }

    #[tokio::test]
    async fn answers_take_turns_in_their_own_queue_only() {
        let budget = Arc::new(AnswerBytes::new(100));
        let turn = budget.making(AnswerQueue::State).await;
        let next = tokio::spawn({
            let budget = Arc::clone(&budget);
            async move { drop(budget.making(AnswerQueue::State).await) }
        });
        tokio::time::sleep(PATIENCE).await;
        assert!(!next.is_finished(), "two turns of one queue at once");
        tokio::time::timeout(PATIENCE, budget.making(AnswerQueue::ListCheckpoint))
            .await
            .expect("held up by another queue's turn");
        drop(turn);
        tokio::time::timeout(PATIENCE, next)
            .await
            .expect("the next turn did not come")
            .unwrap();
    }
}
