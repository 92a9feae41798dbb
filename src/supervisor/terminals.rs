//! The pty relays berthd runs, by process, so that an upgrade can stop them and hand their
//! masters to the next image, and so that recovery can resume them there.
//! Does not own: the relay itself (stdio), passing descriptors across `execve` (upgrade).

use std::collections::HashMap;
use std::os::fd::OwnedFd;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use super::Supervisor;
use super::stdio::{self, Relay, RelayEnds};
use crate::error::Result;
use crate::upgrade::HandedTerminal;

/// One running relay and whose terminal it is.
struct Running {
    container: String,
    pid: u32,
    relay: Relay,
}

/// The running relays, by a number of their own (a pid may be reused once its process is gone).
#[derive(Default)]
pub(super) struct Terminals {
    next: AtomicU64,
    running: Arc<Mutex<HashMap<u64, Running>>>,
}

/// A relay [`Supervisor::relay_terminal`] started, to stop if the operation fails.
pub(super) struct RelayId(u64);

impl Supervisor {
    /// Relays `master`, the pty of process `pid` of container `id`, to `ends` until the
    /// process side closes.
    pub(super) fn relay_terminal(
        &self,
        id: &str,
        pid: u32,
        master: OwnedFd,
        ends: RelayEnds,
    ) -> Result<RelayId> {
        let number = self.terminals.next.fetch_add(1, Ordering::Relaxed);
        let ended = Arc::clone(&self.terminals.running);
        // Held while the relay starts, so a relay that ends at once cannot be forgotten before
        // it is remembered.
        let mut running = lock(&self.terminals.running);
        let relay = stdio::relay_terminal(master, ends, move || {
            lock(&ended).remove(&number);
        })?;
        running.insert(
            number,
            Running {
                container: id.to_owned(),
                pid,
                relay,
            },
        );
        Ok(RelayId(number))
    }

    /// Stops a relay and closes its master (the operation that started the process failed).
    pub(super) fn stop_relay(&self, relay: RelayId) {
        let running = lock(&self.terminals.running).remove(&relay.0);
        if let Some(running) = running {
            running.relay.stop();
        }
    }

    /// Stops every relay, each between two chunks, and leaves its master open with
    /// [`crate::upgrade`] for the next image: called once the server is down, before `execve`.
    /// The inits' stdio pipe relays stop too, and leave their pipes' and FIFOs' ends likewise.
    pub async fn hand_over_terminals(&self) {
        tokio::join!(self.hand_over_masters(), self.stop_pipe_relays());
    }

    async fn hand_over_masters(&self) {
        let running: Vec<Running> = lock(&self.terminals.running)
            .drain()
            .map(|(_, running)| running)
            .collect();
        // All at once: each may wait out its bound on a destination nobody reads.
        let stopped = running.into_iter().map(|running| async move {
            let master = running.relay.stop_for_handover().await;
            HandedTerminal {
                container: running.container,
                pid: running.pid,
                master,
            }
        });
        for terminal in futures_util::future::join_all(stopped).await {
            crate::upgrade::hand_over_terminal(terminal);
        }
    }
}

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}
