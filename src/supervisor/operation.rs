//! Operations the supervisor owns rather than the request that asked for them: create (and
//! restore), exec, checkpoint and update each run as a task of their own, so a client that goes
//! away or whose deadline passes never cuts one in half; the request only waits for the result.
//! A stop or upgrade refuses new operations and waits, within a bound, for those in flight.
//!
//! An operation counts until it ends, not until its request does, so a client that asks and
//! goes away at once could otherwise start them without end: one uid other than root's has at
//! most [`OperationLimits::per_uid`] in flight, everyone [`OperationLimits::total`].
//!
//! Owns: the count of operations (and of clean-ups after exits) in flight, their limits,
//! draining them, and
//! [`Undo`], the record of what a create or exec has done so far and how to take exactly that
//! back.
//! Does not own: the steps of each operation (create, exec, checkpoint, update).

use std::future::Future;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::Notify;
use tracing::Instrument;

use super::Supervisor;
use super::registry::Reservation;
use super::terminals::RelayId;
use super::uid_counts::{Full, UidCounts};
use crate::error::{Error, Result};
use crate::reaper::TrackedProcess;
use crate::runtime::Asker;

/// How many operations berthd runs at once (`--max-operations-per-uid`, `--max-operations`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OperationLimits {
    /// In flight for one uid other than root's.
    pub per_uid: usize,
    /// In flight for everyone.
    pub total: usize,
}

/// Operations in flight, and whether new ones are still taken.
pub(crate) struct InFlight {
    state: Mutex<Counts>,
    idle: Notify,
    limits: OperationLimits,
}

#[derive(Default)]
struct Counts {
    /// Operations and clean-ups, which a drain waits for.
    running: usize,
    /// Operations clients asked for, by uid.
    asked: UidCounts,
    draining: bool,
}

/// One operation (or clean-up after an exit) in flight; counted until dropped.
pub(super) struct Ticket {
    in_flight: Arc<InFlight>,
    /// Whose operation this is; none for a clean-up.
    uid: Option<u32>,
}

impl Drop for Ticket {
    fn drop(&mut self) {
        let mut counts = self.in_flight.lock();
        counts.running -= 1;
        if let Some(uid) = self.uid {
            counts.asked.remove(uid);
        }
        if counts.running == 0 {
            self.in_flight.idle.notify_waiters();
        }
    }
}

impl InFlight {
    pub(crate) fn new(limits: OperationLimits) -> InFlight {
        InFlight {
            state: Mutex::default(),
            idle: Notify::new(),
            limits,
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Counts> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// A place for one more operation of `uid`'s, or why not.
    fn begin(self: &Arc<Self>, uid: u32) -> Result<Ticket> {
        let mut counts = self.lock();
        if counts.draining {
            return Err(Error::Unavailable(
                "berthd is stopping or upgrading; retry on the same socket in a moment".into(),
            ));
        }
        match counts
            .asked
            .add(uid, self.limits.per_uid, self.limits.total)
        {
            Ok(()) => {}
            Err(Full::Uid(theirs)) => {
                return Err(Error::ResourceExhausted(format!(
                    "uid {uid} has {theirs} creates, execs, checkpoints and updates in flight, its most (--max-operations-per-uid); retry once one ends"
                )));
            }
            Err(Full::Total(total)) => {
                return Err(Error::Unavailable(format!(
                    "{total} creates, execs, checkpoints and updates are in flight, berthd's most (--max-operations); retry once some end"
                )));
            }
        }
        counts.running += 1;
        Ok(Ticket {
            in_flight: Arc::clone(self),
            uid: Some(uid),
        })
    }

    /// Counts a clean-up after an exit, even while draining: an exit is never refused.
    fn begin_cleanup(self: &Arc<Self>) -> Ticket {
        self.lock().running += 1;
        Ticket {
            in_flight: Arc::clone(self),
            uid: None,
        }
    }

    /// Refuses new operations from now on and waits up to `bound` for those in flight; returns
    /// how many were still running when the bound passed.
    async fn drain(&self, bound: Duration) -> usize {
        let wait = async {
            loop {
                let idle = self.idle.notified();
                if self.lock().running == 0 {
                    return;
                }
                idle.await;
            }
        };
        self.lock().draining = true;
        let _ = tokio::time::timeout(bound, wait).await;
        self.lock().running
    }
}

impl Supervisor {
    /// Runs `operation`, asked for by `uid`, as a task of its own, in the caller's tracing
    /// span, and waits for its result. Dropping the returned future (the client left) does not
    /// stop the operation, which keeps its place in the uid's count until it ends.
    pub(super) async fn owned<T: Send + 'static>(
        &self,
        uid: u32,
        operation: impl Future<Output = Result<T>> + Send + 'static,
    ) -> Result<T> {
        let ticket = self.in_flight.begin(uid)?;
        let task = tokio::spawn(
            async move {
                let _ticket = ticket;
                operation.await
            }
            .instrument(tracing::Span::current()),
        );
        task.await
            .map_err(|e| Error::Internal(format!("an operation's task ended abnormally: {e}")))?
    }

    /// Counts the clean-up after an exit as in flight until the ticket is dropped, so a stop or
    /// upgrade waits for it.
    pub(super) fn cleanup_ticket(&self) -> Ticket {
        self.in_flight.begin_cleanup()
    }

    /// Refuses new create, exec, checkpoint and update operations and waits up to `bound` for
    /// those in flight and for clean-ups after exits (none held back for a lull any more), then
    /// for the state files asked for so far.
    /// Returns how many were abandoned (a restart cleans up what they left).
    pub async fn drain_operations(&self, bound: Duration) -> usize {
        self.cleanup_pacing.release_all();
        let abandoned = self.in_flight.drain(bound).await;
        self.store.flush().await;
        abandoned
    }

    /// Collects no exit from now on (the Events streams end next: an exit collected after
    /// them would reach no one while its record went), then waits up to `bound` for the
    /// clean-ups of those already collected, and their state files. Returns how many were
    /// still running.
    pub async fn stop_collecting_exits(&self, bound: Duration) -> usize {
        self.reaper.stop_collecting();
        let abandoned = self.in_flight.drain(bound).await;
        self.store.flush().await;
        abandoned
    }
}

/// What a create or exec has done so far, undone in reverse by [`Undo::undo`] when it fails.
/// Each step records itself just before it acts, so a step that fails halfway is undone too.
/// The state file is not among the steps: it is written only once nothing can fail any more.
/// Dropped without `keep` or `undo` (the runtime shutting down mid-operation), it still frees
/// the id and stops tracking; a restart removes the runtime state as a leftover.
pub(super) struct Undo<'a> {
    supervisor: &'a Supervisor,
    id: &'a str,
    /// Whose operation it is: its runtime delete takes that uid's runtime turn.
    asker: Asker,
    reservation: Option<Reservation<'a>>,
    /// Set once the runtime may hold state, with the bundle's `cgroupsPath` and when (in clock
    /// ticks since boot, as process start times count) the runtime was about to run.
    runtime_state: Option<(Option<PathBuf>, u64)>,
    started_pid: Option<i32>,
    process: Option<TrackedProcess>,
    relay: Option<RelayId>,
    pipe_relay: bool,
}

impl<'a> Undo<'a> {
    pub(super) fn new(supervisor: &'a Supervisor, id: &'a str, asker: Asker) -> Self {
        Undo {
            supervisor,
            id,
            asker,
            reservation: None,
            runtime_state: None,
            started_pid: None,
            process: None,
            relay: None,
            pipe_relay: false,
        }
    }

    /// Whose operation it is.
    pub(super) fn asker(&self) -> Asker {
        self.asker
    }

    /// The id is taken: free it.
    pub(super) fn reserved(&mut self, reservation: Reservation<'a>) {
        self.reservation = Some(reservation);
    }

    /// The runtime may hold state for the container from here on: delete it, and the cgroups
    /// a runtime killed at its timeout leaves behind (`cgroups_path` as the bundle gives it).
    pub(super) fn runtime_state(&mut self, cgroups_path: Option<PathBuf>) {
        let now = crate::procfs::ticks_since_boot(std::time::SystemTime::now()).unwrap_or(0);
        // A tick early: start times are whole ticks, and this moment may round up.
        self.runtime_state = Some((cgroups_path, now.saturating_sub(1)));
    }

    /// The runtime started process `pid` (a child of berthd): kill and reap it.
    pub(super) fn started(&mut self, pid: i32) {
        self.started_pid = Some(pid);
    }

    /// The started process is tracked: kill it through its pidfd and reap it.
    pub(super) fn tracked(&mut self, process: TrackedProcess) -> &TrackedProcess {
        self.process.insert(process)
    }

    /// A pty relay runs: stop it.
    pub(super) fn relay(&mut self, relay: RelayId) {
        self.relay = Some(relay);
    }

    /// The init's stdio pipes are relayed: stop their relay.
    pub(super) fn pipe_relay(&mut self) {
        self.pipe_relay = true;
    }

    /// The operation succeeded: hands over the tracked process and the reservation, and undoes
    /// nothing.
    pub(super) fn keep(mut self) -> (Option<TrackedProcess>, Option<Reservation<'a>>) {
        (self.process.take(), self.reservation.take())
    }

    /// Undoes what was recorded, last step first, and returns `err`.
    pub(super) async fn undo(mut self, err: Error) -> Error {
        let id = self.id;
        tracing::debug!(id, error = %err, "undoing a failed operation");
        if let Some(relay) = self.relay.take() {
            self.supervisor.stop_relay(relay);
        }
        if self.pipe_relay {
            self.supervisor.abort_pipe_relay(id);
        }
        let process = match (self.process.take(), self.started_pid) {
            (Some(process), _) => Some(process),
            // Not tracked yet: track it now so it is reaped, not left to the orphan sweep.
            (None, Some(pid)) => match self.supervisor.reaper.track(pid) {
                Ok(process) => Some(process),
                Err(e) => {
                    tracing::warn!(id, pid, error = %e, "started process of a failed operation not tracked");
                    None
                }
            },
            (None, None) => None,
        };
        if let Some(process) = &process
            && let Err(e) = process.signal(libc::SIGKILL)
        {
            tracing::debug!(id, pid = process.pid(), error = %e, "kill after a failed operation");
        }
        let runtime_state = self.runtime_state.take();
        if runtime_state.is_some() {
            self.supervisor.delete_from_runtime(id, self.asker).await;
        }
        if let Some(process) = process {
            process.wait().await;
        }
        // Only a runtime killed at its timeout leaves its cgroups: one that failed removed them
        // on its way out, and what is there now may be another's.
        if let (Some((cgroups_path, since)), Error::Timeout { .. }) = (runtime_state, &err) {
            self.supervisor
                .remove_left_cgroups(id, cgroups_path.as_deref(), since)
                .await;
        }
        drop(self.reservation.take());
        err
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn in_flight(per_uid: usize, total: usize) -> Arc<InFlight> {
        Arc::new(InFlight::new(OperationLimits { per_uid, total }))
    }

    #[tokio::test]
    async fn draining_waits_for_operations_in_flight_within_its_bound() {
        let in_flight = in_flight(8, 8);
        let ticket = in_flight.begin(0).unwrap();
        assert_eq!(in_flight.drain(Duration::from_millis(50)).await, 1);
        assert!(matches!(in_flight.begin(0), Err(Error::Unavailable(_))));
        let finishing = tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(50)).await;
            drop(ticket);
        });
        assert_eq!(in_flight.drain(Duration::from_secs(5)).await, 0);
        finishing.await.unwrap();
    }

    #[test]
    fn operations_hold_their_uids_place_until_they_end() {
        let in_flight = in_flight(2, 4);
        let member = [
            in_flight.begin(1000).unwrap(),
            in_flight.begin(1000).unwrap(),
        ];
        let Err(Error::ResourceExhausted(message)) = in_flight.begin(1000) else {
            panic!("a third operation of one uid was taken");
        };
        assert!(message.contains("--max-operations-per-uid"), "{message}");
        // Clean-ups after exits are never refused and take no client's place.
        let cleanup = in_flight.begin_cleanup();
        let other = in_flight.begin(1001).unwrap();
        // Root has no limit of its own, only everyone's.
        let root = in_flight.begin(0).unwrap();
        let Err(Error::Unavailable(message)) = in_flight.begin(0) else {
            panic!("an operation past everyone's limit was taken");
        };
        assert!(message.contains("--max-operations"), "{message}");
        let [first, _second] = member;
        drop(first);
        let again = in_flight.begin(1000).unwrap();
        drop((again, other, root, cleanup));
        assert_eq!(in_flight.lock().running, 1);
        assert_eq!(in_flight.lock().asked.of(1001), 0);
    }
}
