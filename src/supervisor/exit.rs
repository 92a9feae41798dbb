//! What happens when a container's processes exit: the exit is published first, the clean-up
//! follows.
//!
//! When an init exits: its container is hidden (State no longer lists it, lookups say it has
//! exited), an operation on it under way ends (its event comes before the exit), added
//! processes that outlive it (in a container without a pid namespace of its own) are killed and
//! their exits published, and its state file removal is queued; an OOM kill the cgroup counted and nobody reported yet is published;
//! then `exit`, as soon as the pidfd fired and the status is collected. Only then the stats
//! registration goes and the runtime deletes its state.
//!
//! berthd holds each init's mount and network namespaces from registration until its delete
//! may start, and lets go of them before the delete takes its turn ([`HeldNamespaces`]). Without
//! that, the init is their last holder, and the kernel tears them down in its exit, before the
//! pidfd fires: the container's mounts are unmounted and its network namespace's removal queued. Held, that work runs where berthd lets go: on blocking
//! threads, one per CPU at a time (a release stuck in the kernel gives its turn up after
//! [`RELEASE_TURN`]), once the delete may start and before it does. Before, because removing
//! a cgroup (memcg offline, in a kernel worker after the runtime's rmdir) walks the LRU lists of
//! every superblock alive, and a held mount namespace keeps its container's alive: with each
//! release inside its delete's turn, the deletes of a burst paid for the mounts of every
//! container not yet deleted. At most a quarter of berthd's open file limit goes to them
//! ([`NamespaceBudget`]); the inits past it are not held. runc containers killed back to back,
//! no daemon, 300 each: kill to reaped p50 0.28 → 0.15 ms, p99 5.6 and 6.1 → 2.0 and 1.6 ms.
//! `scripts/load --no-direct`, N=1000, teardown with the releases moved out of the delete
//! turns: C=8 202–225 → 255–294 per s, C=1 226 and 235 → 290 and 304 per s.
//!
//! The deletes of exits that come close together wait for a lull in the exits
//! ([`CleanupPacing`]); a lone exit's delete starts at once. A runtime delete running beside a
//! burst of exits delays them, and no less when it runs 10 nicer or as `SCHED_IDLE`, so the
//! cost is most likely the kernel's removal of the container's cgroups rather than the runtime's
//! own CPU (untraced). Measured with `scripts/load`, N=300, the teardown timed through the
//! deletes: exit p99 at C=1 6.8 and 8.5 ms with deletes right after each exit, 3.9 and 4.6 ms
//! with deletes held for a lull; the teardown the same within the noise. The deletes take
//! runtime turns as every runtime command does (`--max-runtime-processes`, four per CPU), as
//! berthd's own asker, so a burst of exits does not start a runtime process per exit at once;
//! they run at berthd's own CPU priority (10 nicer made the teardown slower).
//! The id stays taken until the delete is done: a create of it waits for that (registry) and
//! lets that one delete go at once, its namespaces let go of beside it rather than in a turn and
//! its runtime turn taken in a queue of its own rather than behind a burst's other deletes
//! (without it, with one turn and one-second deletes, a create of the last of ten exited ids
//! gave up after its 5 s wait), so nothing keyed by the id is removed from under a new
//! container of the same id.
//!
//! When an added process exits: it leaves its container's processes, its `exit` is published,
//! then the state file is rewritten without it.
//!
//! Owns: watching inits and added processes, the order of exit and clean-up, when the deletes
//! start and in which queue of runtime turns, which namespaces are held and when and how many at
//! once they are let go of. Does not own: collecting the status (reaper), OOM counting (stats),
//! the id's slot (registry), how many runtime commands run at once (runtime).

use std::collections::VecDeque;
use std::os::fd::OwnedFd;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::oneshot;
use tokio::time::Instant;

use super::Supervisor;
use super::registry::{Container, Process};
use crate::events::EventKind;
use crate::reaper::{Namespace, TrackedProcess};
use crate::runtime::{Asker, Operation, SpawnStdio};

/// The longest a release keeps its turn: one stuck in the kernel (a mount whose teardown waits
/// on a server that is gone) would otherwise hold every later delete back. It goes on in its
/// blocking thread; the turn goes to the next.
const RELEASE_TURN: Duration = Duration::from_secs(2);

/// The longest an init's `exit` waits for those of the added processes killed with it: one
/// stuck in the kernel must not hold back the container's end.
const ADDED_EXITS_WAIT: Duration = Duration::from_secs(2);

impl Supervisor {
    /// Publishes the init's exit once it exits, then cleans up after the container.
    pub(super) fn watch_init(self: &Arc<Self>, container: Arc<Container>) {
        let supervisor = Arc::clone(self);
        let namespaces = HeldNamespaces::of(&container.init.tracked, &self.namespace_budget);
        tokio::spawn(async move {
            // A stop or upgrade waits for the clean-up as for an operation: cut off by the exit
            // or execve it would leave a record behind, and a restart would report this exit
            // again. Once berthd stops collecting exits the init is left to the next image or
            // start, which report its exit.
            let collected = container
                .init
                .tracked
                .wait_collected(|| supervisor.cleanup_ticket())
                .await;
            match collected {
                Some((status, cleanup)) => {
                    supervisor.init_exited(&container, status, namespaces).await;
                    drop(cleanup);
                }
                // Off the reactor, as always: the last close runs the namespaces' teardown.
                None => namespaces.release().await,
            }
        });
    }

    async fn init_exited(&self, container: &Container, status: u32, namespaces: HeldNamespaces) {
        let id = &container.id;
        let pid = container.init.pid();
        tracing::info!(id = %id, pid, status, "container exited");
        // What the container wrote before it exited reaches the client before its exit event.
        self.finish_pipe_relay(id).await;
        let Some(exited) = self.retire(container) else {
            tracing::error!(id = %id, pid, "an exited container no longer holds its id; its runtime state is left alone");
            self.events.publish(id, pid, EventKind::Exit { status });
            namespaces.release().await;
            return;
        };
        // An operation under way when the init exited (a resume that thawed it into a pending
        // kill, a dump that ended it) publishes its event first: `exit` is the container's last.
        drop(container.operations.lock().await);
        self.end_added_processes(container).await;
        // The record goes first: once the exit is published, a restart has nothing to adopt.
        self.remove_record(container);
        // Reads the OOM counter a last time, so an OOM kill is published before the exit; and
        // ends GetStats streams, whose container is gone.
        self.stats.unregister(id);
        self.events.publish(id, pid, EventKind::Exit { status });
        let wanted = tokio::select! {
            () = self.cleanup_pacing.lull() => false,
            () = exited.wanted() => true,
        };
        if wanted {
            // A create waits for this delete: one container's mounts cost its cgroup removal
            // little, and a turn behind a burst's releases would cost the create its wait.
            tokio::spawn(namespaces.release());
        } else {
            // Before the delete: the cgroup removal it starts walks every live superblock.
            namespaces.release().await;
        }
        // In berthd's own runtime turns, shared round robin with the clients' commands; once a
        // create of the id waits for it, in a queue of its own, so that it is not behind a
        // burst's other deletes while the create's wait for the id runs out.
        let delete = Operation::Delete { id };
        let turn = if wanted {
            self.runtime.turn(&delete, Asker::AwaitedCleanup).await
        } else {
            tokio::select! {
                turn = self.runtime.turn(&delete, Asker::Berthd) => turn,
                () = exited.wanted() => self.runtime.turn(&delete, Asker::AwaitedCleanup).await,
            }
        };
        let captured = SpawnStdio::captured();
        if let Err(e) = self.runtime.run_in_turn(turn, delete, captured).await {
            tracing::error!(id = %id, error = %e, "could not delete the container from the runtime");
        }
        drop(exited);
    }

    /// Kills the added processes still running after the init's exit and waits for their `exit`
    /// events (at most [`ADDED_EXITS_WAIT`]), so that the init's `exit` is the container's last.
    /// Only a container without a pid namespace of its own has any: the kernel kills the rest
    /// with the init. The runtime's delete would kill them too, after the init's `exit`.
    async fn end_added_processes(&self, container: &Container) {
        let added = container.lock().added.clone();
        if added.is_empty() {
            return;
        }
        for process in &added {
            // An error is an exit already under way: its event still comes.
            let _ = process.tracked.signal(libc::SIGKILL);
        }
        let published = async {
            for process in &added {
                process.exit_published.notified().await;
            }
        };
        if tokio::time::timeout(ADDED_EXITS_WAIT, published)
            .await
            .is_err()
        {
            tracing::warn!(id = %container.id, secs = ADDED_EXITS_WAIT.as_secs(), "added processes killed with their init did not exit in time; the init's exit is published before theirs");
        }
    }

    /// Publishes an added process's exit once it exits, and forgets it.
    pub(super) fn watch_process(
        self: &Arc<Self>,
        container: Arc<Container>,
        process: Arc<Process>,
    ) {
        let supervisor = Arc::clone(self);
        tokio::spawn(async move {
            let collected = process
                .tracked
                .wait_collected(|| supervisor.cleanup_ticket())
                .await;
            let Some((status, _cleanup)) = collected else {
                return;
            };
            container.lock().added.retain(|p| !Arc::ptr_eq(p, &process));
            supervisor
                .events
                .publish(&container.id, process.pid(), EventKind::Exit { status });
            process.exit_published.notify_one();
            // Skipped by `save` once the init's exit has removed the record.
            supervisor.save(&container);
        });
    }
}

/// The namespaces of an init that berthd holds so they outlive it (see the module's header).
pub(super) struct HeldNamespaces {
    fds: Vec<OwnedFd>,
    budget: Arc<NamespaceBudget>,
}

impl HeldNamespaces {
    /// The kinds whose teardown the kernel does in the last holder's exit, at a cost measured.
    const KINDS: [Namespace; 2] = [Namespace::Mount, Namespace::Network];

    /// The namespaces of `init` it does not share with berthd, if the budget has room for them;
    /// none once it has exited.
    fn of(init: &TrackedProcess, budget: &Arc<NamespaceBudget>) -> HeldNamespaces {
        let fds = if budget.take(Self::KINDS.len()) {
            let fds = init.open_namespaces(&Self::KINDS);
            budget.give_back(Self::KINDS.len() - fds.len());
            fds
        } else {
            Vec::new()
        };
        HeldNamespaces {
            fds,
            budget: Arc::clone(budget),
        }
    }

    /// Lets go of them on a blocking thread, in one of the budget's turns (at most
    /// [`RELEASE_TURN`]): the last close runs the teardown.
    async fn release(self) {
        if self.fds.is_empty() {
            return;
        }
        let budget = Arc::clone(&self.budget);
        let _turn = budget.releases.acquire().await;
        let closing = tokio::task::spawn_blocking(move || drop(self));
        match tokio::time::timeout(RELEASE_TURN, closing).await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => {
                tracing::warn!(error = %e, "releasing an exited container's namespaces failed")
            }
            Err(_) => tracing::warn!(
                secs = RELEASE_TURN.as_secs(),
                "an exited container's namespaces are still being torn down; the next release goes ahead"
            ),
        }
    }
}

impl Drop for HeldNamespaces {
    fn drop(&mut self) {
        self.budget.give_back(self.fds.len());
    }
}

/// How many namespace fds berthd holds, and the most it may: a quarter of its open file limit,
/// as for connections ([`crate::fd_limit::quarter`]). Holding them is a speed-up; it must never
/// cost a create its pidfd, and where berthd cannot raise its hard limit (no
/// `CAP_SYS_RESOURCE`) three fds a container would cut how many containers fit by two thirds.
/// Also the turns in which held namespaces are let go of.
pub(super) struct NamespaceBudget {
    held: AtomicUsize,
    most: usize,
    /// Turns for letting go, one per CPU: a burst's releases all start at its lull, and the
    /// teardowns are the kernel's CPU work, not waits worth more threads.
    releases: tokio::sync::Semaphore,
}

impl NamespaceBudget {
    /// A quarter of the open file limit, released in one turn per CPU of `cpus`.
    pub(super) fn of_fd_limit(cpus: usize) -> Arc<NamespaceBudget> {
        let quarter = crate::fd_limit::quarter();
        Arc::new(NamespaceBudget::new(
            usize::try_from(quarter).unwrap_or(usize::MAX),
            cpus,
        ))
    }

    fn new(most: usize, cpus: usize) -> NamespaceBudget {
        NamespaceBudget {
            held: AtomicUsize::new(0),
            most,
            releases: tokio::sync::Semaphore::new(cpus),
        }
    }

    /// Takes `n` fds' worth, if the budget has room for them.
    fn take(&self, n: usize) -> bool {
        self.held
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |held| {
                held.checked_add(n).filter(|&after| after <= self.most)
            })
            .is_ok()
    }

    fn give_back(&self, n: usize) {
        self.held.fetch_sub(n, Ordering::Relaxed);
    }
}

/// How long no init may exit before the deletes held back start; an exit this long after the
/// one before it is not held at all.
const LULL: Duration = Duration::from_millis(50);
/// The longest a delete is held back: under exits that never pause, runtime state lags the
/// exits by at most this.
const MAX_HOLD: Duration = Duration::from_secs(2);

/// Holds the runtime delete after an exit that follows another within [`LULL`] until no init
/// has exited for [`LULL`], or for at most [`MAX_HOLD`]; a lone exit's delete starts at once.
/// One pacer task, alive while deletes are held (started by the first held, ending when none
/// is left), lets them go in order. A create waiting for the id does not wait for this (exit).
#[derive(Default)]
pub(super) struct CleanupPacing {
    state: Mutex<Pacing>,
}

#[derive(Default)]
struct Pacing {
    last_exit: Option<Instant>,
    /// In the order of their exits, so the front is the first whose [`MAX_HOLD`] ends.
    held: VecDeque<HeldDelete>,
    /// Set once berthd stops or upgrades: no delete is held from then on.
    stopping: bool,
}

struct HeldDelete {
    since: Instant,
    release: oneshot::Sender<()>,
}

impl CleanupPacing {
    fn lock(&self) -> std::sync::MutexGuard<'_, Pacing> {
        self.state.lock().expect("cleanup pacing lock poisoned")
    }

    /// Counts an exit and returns once its delete may start.
    pub(super) async fn lull(self: &Arc<Self>) {
        let (release, released) = oneshot::channel();
        let now = Instant::now();
        let start_pacer = {
            let mut pacing = self.lock();
            let lone = pacing.last_exit.is_none_or(|at| now >= at + LULL);
            pacing.last_exit = Some(now);
            if pacing.stopping || lone {
                return;
            }
            pacing.held.push_back(HeldDelete {
                since: now,
                release,
            });
            pacing.held.len() == 1
        };
        if start_pacer {
            let pacing = Arc::clone(self);
            tokio::spawn(async move { pacing.pace().await });
        }
        // An error is the pacing dropped with the runtime: the delete goes ahead.
        let _ = released.await;
    }

    async fn pace(&self) {
        loop {
            let next = {
                let mut pacing = self.lock();
                let now = Instant::now();
                let lull = pacing.last_exit.is_none_or(|at| now >= at + LULL);
                while let Some(front) = pacing.held.front() {
                    if !lull && now < front.since + MAX_HOLD {
                        break;
                    }
                    if let Some(held) = pacing.held.pop_front() {
                        let _ = held.release.send(());
                    }
                }
                match (pacing.held.front(), pacing.last_exit) {
                    (Some(front), Some(at)) => (at + LULL).min(front.since + MAX_HOLD),
                    _ => return,
                }
            };
            tokio::time::sleep_until(next).await;
        }
    }

    /// Lets every held delete start now, and holds none from now on: berthd is stopping or
    /// upgrading.
    pub(super) fn release_all(&self) {
        let mut pacing = self.lock();
        pacing.stopping = true;
        for held in pacing.held.drain(..) {
            let _ = held.release.send(());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Counts an exit now; the task ends when its delete may start, with that time.
    fn exit(pacing: &Arc<CleanupPacing>) -> tokio::task::JoinHandle<Instant> {
        let pacing = Arc::clone(pacing);
        tokio::spawn(async move {
            pacing.lull().await;
            Instant::now()
        })
    }

    /// Lets spawned tasks run up to their next wait, without moving the paused clock.
    async fn settle() {
        for _ in 0..10 {
            tokio::task::yield_now().await;
        }
    }

    fn about(elapsed: Duration, expected: Duration) -> bool {
        elapsed >= expected && elapsed <= expected + Duration::from_millis(2)
    }

    #[tokio::test(start_paused = true)]
    async fn a_lone_exits_delete_starts_at_once_and_one_close_behind_waits_for_the_lull() {
        let pacing = Arc::default();
        let start = Instant::now();
        let lone = exit(&pacing);
        settle().await;
        assert!(lone.is_finished());
        tokio::time::sleep(LULL / 5).await;
        let close = exit(&pacing).await.unwrap();
        let expected = LULL / 5 + LULL;
        assert!(about(close - start, expected), "{:?}", close - start);
        tokio::time::sleep(LULL).await;
        let lone_again = exit(&pacing);
        settle().await;
        assert!(lone_again.is_finished(), "a lull has passed: not held");
    }

    #[tokio::test(start_paused = true)]
    async fn exits_that_keep_coming_hold_each_delete_at_most_max_hold() {
        let pacing = Arc::default();
        let start = Instant::now();
        let mut exits = Vec::new();
        let every = LULL / 5;
        let burst = MAX_HOLD + MAX_HOLD / 2;
        while start.elapsed() < burst {
            exits.push((start.elapsed(), exit(&pacing)));
            tokio::time::sleep(every).await;
        }
        let last_exit = exits.last().unwrap().0;
        for (n, (exited, task)) in exits.into_iter().enumerate() {
            let started = task.await.unwrap() - start;
            // The first is lone; the others are held until the burst pauses or their own hold
            // ends, whichever is first.
            let expected = if n == 0 {
                exited
            } else {
                (last_exit + LULL).min(exited + MAX_HOLD)
            };
            assert!(
                about(started, expected),
                "exited at {exited:?}: started at {started:?}, expected {expected:?}"
            );
        }
    }

    #[test]
    fn namespaces_are_held_within_the_budget_and_give_it_back_when_let_go() {
        let budget = Arc::new(NamespaceBudget::new(3, 2));
        assert!(budget.take(2));
        assert!(!budget.take(2), "3 fds at most");
        budget.give_back(1);
        let held = HeldNamespaces {
            fds: vec![own_net_namespace()],
            budget: Arc::clone(&budget),
        };
        assert!(!budget.take(3), "one is held");
        drop(held);
        assert!(budget.take(3), "the held fd's place is free again");
    }

    fn own_net_namespace() -> OwnedFd {
        rustix::fs::open(
            "/proc/self/ns/net",
            rustix::fs::OFlags::RDONLY | rustix::fs::OFlags::CLOEXEC,
            rustix::fs::Mode::empty(),
        )
        .unwrap()
    }

    #[tokio::test]
    async fn a_release_waits_for_a_turn_and_one_of_nothing_takes_none() {
        let budget = Arc::new(NamespaceBudget::new(8, 2));
        let turns = budget.releases.available_permits();
        let every_turn = budget.releases.acquire_many(turns as u32).await.unwrap();
        let nothing = HeldNamespaces {
            fds: Vec::new(),
            budget: Arc::clone(&budget),
        };
        tokio::time::timeout(Duration::from_secs(5), nothing.release())
            .await
            .expect("nothing held: no turn needed");
        assert!(budget.take(1));
        let held = HeldNamespaces {
            fds: vec![own_net_namespace()],
            budget: Arc::clone(&budget),
        };
        let releasing = tokio::spawn(held.release());
        tokio::time::sleep(Duration::from_millis(100)).await;
        assert!(!releasing.is_finished(), "every turn is taken");
        assert_eq!(budget.held.load(Ordering::Relaxed), 1);
        drop(every_turn);
        releasing.await.unwrap();
        assert_eq!(budget.held.load(Ordering::Relaxed), 0);
        assert_eq!(budget.releases.available_permits(), turns);
    }

    #[tokio::test(start_paused = true)]
    async fn stopping_lets_every_held_delete_go_and_holds_none_after() {
        let pacing = Arc::default();
        let (lone, a, b) = (exit(&pacing), exit(&pacing), exit(&pacing));
        settle().await;
        assert!(lone.is_finished() && !a.is_finished() && !b.is_finished());
        pacing.release_all();
        settle().await;
        assert!(a.is_finished() && b.is_finished());
        let c = exit(&pacing);
        settle().await;
        assert!(c.is_finished(), "no delete is held once berthd stops");
    }
}
