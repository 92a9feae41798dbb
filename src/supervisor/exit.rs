//! What happens when a container's processes exit: the exit is published first, the clean-up
//! follows.
//!
//! When an init exits: its container is hidden (State no longer lists it, lookups say it has
//! exited) and its state file removal is queued; an OOM kill the cgroup counted and nobody
//! reported yet is published; then `exit`, as soon as the pidfd fired and the status is
//! collected. Only then the stats registration goes and the runtime deletes its state, with at
//! most [`concurrent_deletes`] deletes at a time so a burst of exits neither queues each exit
//! behind another's delete nor forks a runtime process per exit at once. The deletes run at
//! berthd's own CPU priority: run 10 nicer, they made the teardown slower and the exits no
//! sooner (untraced; most likely a nicer delete holds the kernel's cgroup locks longer). The id
//! stays taken until the delete is done: a create of it waits for that (registry), so nothing
//! keyed by the id is removed from under a new container of the same id.
//!
//! When an added process exits: it leaves its container's processes, its `exit` is published,
//! then the state file is rewritten without it.
//!
//! Owns: watching inits and added processes, the order of exit and clean-up, the bound on
//! concurrent deletes. Does not own: collecting the status (reaper), OOM counting (stats), the
//! id's slot (registry).

use std::sync::Arc;

use super::Supervisor;
use super::registry::{Container, Process};
use crate::events::EventKind;
use crate::runtime::Operation;

/// How many runtime deletes after exits run at once: enough to keep the CPUs busy while each
/// waits on the kernel (cgroup removal), few enough that a thousand exits do not start a
/// thousand runtime processes at once.
pub(super) fn concurrent_deletes() -> usize {
    let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
    (4 * cpus).clamp(4, 64)
}

impl Supervisor {
    /// Publishes the init's exit once it exits, then cleans up after the container.
    pub(super) fn watch_init(self: &Arc<Self>, container: Arc<Container>) {
        let supervisor = Arc::clone(self);
        tokio::spawn(async move {
            let status = container.init.tracked.wait().await;
            supervisor.init_exited(&container, status).await;
        });
    }

    async fn init_exited(&self, container: &Container, status: u32) {
        let id = &container.id;
        let pid = container.init.pid();
        tracing::info!(id = %id, pid, status, "container exited");
        // A stop or upgrade waits for the clean-up as for an operation: cut off by the exit or
        // execve it would leave a record behind, and a restart would report this exit again.
        let _cleanup = self.cleanup_ticket();
        // What the container wrote before it exited reaches the client before its exit event.
        self.finish_pipe_relay(id).await;
        let Some(exited) = self.retire(container) else {
            tracing::error!(id = %id, pid, "an exited container no longer holds its id; its runtime state is left alone");
            self.events.publish(id, pid, EventKind::Exit { status });
            return;
        };
        // The record goes first: once the exit is published, a restart has nothing to adopt.
        self.remove_record(container);
        // Reads the OOM counter a last time, so an OOM kill is published before the exit; and
        // ends GetStats streams, whose container is gone.
        self.stats.unregister(id);
        self.events.publish(id, pid, EventKind::Exit { status });
        {
            let _turn = self.deletes.acquire().await;
            if let Err(e) = self.runtime.run(Operation::Delete { id }).await {
                tracing::error!(id = %id, error = %e, "could not delete the container from the runtime");
            }
        }
        drop(exited);
    }

    /// Publishes an added process's exit once it exits, and forgets it.
    pub(super) fn watch_process(
        self: &Arc<Self>,
        container: Arc<Container>,
        process: Arc<Process>,
    ) {
        let supervisor = Arc::clone(self);
        tokio::spawn(async move {
            let status = process.tracked.wait().await;
            container.lock().added.retain(|p| !Arc::ptr_eq(p, &process));
            supervisor
                .events
                .publish(&container.id, process.pid(), EventKind::Exit { status });
            // Skipped by `save` once the init's exit has removed the record.
            supervisor.save(&container);
        });
    }
}
