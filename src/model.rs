//! The records several layers share: what a process runs, how a checkpoint was taken, and who is
//! at the other end of an API connection.
//!
//! Owns: the plain data that the supervisor builds and the event bus, the store and the API
//! carry. Does not own: how the records are made (supervisor), stored (store) or put on the
//! wire (api); nothing here does any work.

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
    /// The places of the answers made but not yet handed to h2, [`ANSWERS_AHEAD`] of them.
    pub answers: std::sync::Arc<tokio::sync::Semaphore>,
    /// What the socket has taken, for answers that wait until it took them.
    pub sent: std::sync::Arc<SentBytes>,
}

/// The bytes an API connection's socket has taken, all told, and a wake-up for whoever waits
/// for more.
#[derive(Debug, Default)]
pub struct SentBytes {
    pub count: std::sync::atomic::AtomicU64,
    /// Tasks waiting in `progress`: the socket wakes them only when there are any.
    pub waiting: std::sync::atomic::AtomicUsize,
    pub progress: tokio::sync::Notify,
}

/// Answers whose size is the daemon's to decide (State, ListCheckpoint) made but not yet handed
/// to h2, at most, on one connection.
pub const ANSWERS_AHEAD: usize = 4;

/// What `SO_PEERCRED` said of an API connection's peer when the listener accepted it; `None` when
/// it could not be read.
#[derive(Debug, Clone, Copy)]
pub struct PeerCredentials(pub Option<nix::sys::socket::UnixCredentials>);

/// Whether an API connection's socket takes what is written to it: false from a write that found
/// it full until a write goes through whole. Closed when the connection is.
#[derive(Debug, Clone)]
pub struct SocketRoom(pub tokio::sync::watch::Receiver<bool>);
