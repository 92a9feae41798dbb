//! Turns for runtime processes: at most `--max-runtime-processes` runtime commands run at once.
//!
//! A burst of creates from one client would otherwise start a runc per create at once. On two
//! CPUs, 400 creates asked 200 at a time (`scripts/load --concurrency 200`), unbounded and in
//! turns of 8: create p99 7.5–8.5 s and 3.5–3.8 s, host memory at its peak 1.23 and 0.74 GB,
//! 47–51 and 52–58 containers a second.
//!
//! Waiting commands get turns round robin over who asked (each uid, berthd's own clean-up, and
//! the clean-ups that creates of the same id wait for), in order within each, so one uid's
//! burst does not hold back another's command by more than one turn. A command still running
//! after [`LEASE`] gives its turn up and runs on: a runtime waiting on something (a hook that
//! sleeps, a mount that does not answer) must not hold back everyone's commands until its
//! timeout.
//!
//! Owns: how many commands hold a turn, who gets the next, the lease. Does not own: running
//! the commands (the runtime), or who is asking (the supervisor says).

use std::collections::{HashMap, VecDeque};
use std::future::Future;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::oneshot;

/// How long a command keeps its turn: far above what a runtime command takes when only the
/// turns run (runc run of a small bundle: ~25 ms alone, ~120 ms eight at once on two CPUs),
/// short enough that commands stuck on something hold the others back briefly.
pub(crate) const LEASE: Duration = Duration::from_secs(2);

/// Who asks for a runtime command: a client's uid, or berthd itself (deletes after exits,
/// recovery), apart from the deletes that creates wait for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub(crate) enum Asker {
    Uid(u32),
    Berthd,
    /// berthd's delete after an exit that a create of the same id waits for: a queue of its
    /// own, so that it is not behind a burst's other deletes while the create's wait runs out.
    AwaitedCleanup,
}

/// The turns, shared by every runtime command.
pub(crate) struct Turns {
    state: Arc<Mutex<State>>,
}

struct State {
    /// Turns held now.
    held: usize,
    /// The most that may be held (`--max-runtime-processes`).
    most: usize,
    /// The askers with commands waiting, in the order they get the next turns.
    rotation: VecDeque<Asker>,
    waiting: HashMap<Asker, VecDeque<oneshot::Sender<Turn>>>,
}

/// One turn; given back when dropped.
pub(crate) struct Turn {
    state: Option<Arc<Mutex<State>>>,
}

impl Turns {
    /// `most` turns (at least one).
    pub(crate) fn new(most: usize) -> Turns {
        Turns {
            state: Arc::new(Mutex::new(State {
                held: 0,
                most: most.max(1),
                rotation: VecDeque::new(),
                waiting: HashMap::new(),
            })),
        }
    }

    /// The default, four per CPU: enough to keep the CPUs busy while each command waits on the
    /// kernel (cgroup removal, the runtime's handshakes with its init), few enough that a
    /// thousand exits or creates do not start a thousand runtime processes at once. More kept
    /// no more CPU busy (runc run by hand, two CPUs: 57, 64, 66, 66 and 61 a second with 2, 4,
    /// 8, 16 and 32 at once).
    pub(crate) fn per_cpu(cpus: usize) -> usize {
        (4 * cpus).clamp(4, 64)
    }

    /// Waits for a turn for `asker`.
    pub(crate) async fn take(&self, asker: Asker) -> Turn {
        let granted = {
            let mut guard = lock(&self.state);
            let state = &mut *guard;
            if state.held < state.most && state.rotation.is_empty() {
                state.held += 1;
                return Turn {
                    state: Some(Arc::clone(&self.state)),
                };
            }
            let (grant, granted) = oneshot::channel();
            let queue = state.waiting.entry(asker).or_default();
            if queue.is_empty() {
                state.rotation.push_back(asker);
            }
            queue.push_back(grant);
            granted
        };
        // Sent with the turn in it, so a waiter dropped after the grant gives the turn back
        // when the channel drops it. A waiter's sender goes only with a turn given out (held
        // is `most` while any waits); were it gone, the command would run without a turn.
        granted.await.unwrap_or(Turn { state: None })
    }

    /// Runs `command` in `turn`, giving the turn up once the command ends or after [`LEASE`],
    /// whichever comes first.
    pub(crate) async fn hold<T>(turn: Turn, command: impl Future<Output = T>) -> T {
        tokio::pin!(command);
        tokio::select! {
            done = &mut command => done,
            () = tokio::time::sleep(LEASE) => {
                drop(turn);
                command.await
            }
        }
    }
}

impl Drop for Turn {
    fn drop(&mut self) {
        let Some(state) = self.state.take() else {
            return;
        };
        let mut guard = lock(&state);
        guard.held -= 1;
        // The next waiter still waiting gets it; one that went away is passed over.
        while let Some(asker) = guard.rotation.pop_front() {
            let Some(queue) = guard.waiting.get_mut(&asker) else {
                continue;
            };
            let next = queue.pop_front();
            if queue.is_empty() {
                guard.waiting.remove(&asker);
            } else {
                guard.rotation.push_back(asker);
            }
            let Some(grant) = next else { continue };
            let turn = Turn {
                state: Some(Arc::clone(&state)),
            };
            match grant.send(turn) {
                Ok(()) => {
                    guard.held += 1;
                    return;
                }
                // Not counted, so it must not give back: disarmed before it drops.
                Err(mut unsent) => unsent.state = None,
            }
        }
    }
}

fn lock(state: &Mutex<State>) -> std::sync::MutexGuard<'_, State> {
    state.lock().expect("runtime turns lock poisoned")
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Whether `take` has a turn yet, polled once.
    fn ready(take: &mut std::pin::Pin<Box<impl Future<Output = Turn>>>) -> Option<Turn> {
        let waker = futures_util::task::noop_waker();
        let mut cx = std::task::Context::from_waker(&waker);
        match take.as_mut().poll(&mut cx) {
            std::task::Poll::Ready(turn) => Some(turn),
            std::task::Poll::Pending => None,
        }
    }

    #[tokio::test]
    async fn no_more_than_most_are_held_and_a_waiter_gets_the_first_given_back() {
        let turns = Turns::new(2);
        let first = turns.take(Asker::Uid(0)).await;
        let _second = turns.take(Asker::Uid(0)).await;
        let mut third = Box::pin(turns.take(Asker::Uid(0)));
        assert!(ready(&mut third).is_none(), "a third turn out of two");
        drop(first);
        assert!(
            ready(&mut third).is_some(),
            "the turn given back went to the waiter"
        );
    }

    #[tokio::test]
    async fn waiting_askers_take_turns_round_robin_in_order_within_each() {
        let turns = Turns::new(1);
        let held = turns.take(Asker::Uid(1)).await;
        let mut burst: Vec<_> = (0..3)
            .map(|_| Box::pin(turns.take(Asker::Uid(1))))
            .collect();
        let mut other = Box::pin(turns.take(Asker::Uid(2)));
        let mut cleanup = Box::pin(turns.take(Asker::Berthd));
        for take in &mut burst {
            assert!(ready(take).is_none());
        }
        assert!(ready(&mut other).is_none() && ready(&mut cleanup).is_none());
        drop(held);
        let turn = ready(&mut burst[0]).expect("uid 1's first waiter is first");
        drop(turn);
        let turn = ready(&mut other).expect("then uid 2's, ahead of uid 1's second");
        assert!(ready(&mut burst[1]).is_none());
        drop(turn);
        let turn = ready(&mut cleanup).expect("then berthd's");
        drop(turn);
        let turn = ready(&mut burst[1]).expect("then uid 1's second");
        assert!(ready(&mut burst[2]).is_none());
        drop(turn);
        assert!(ready(&mut burst[2]).is_some());
    }

    #[tokio::test]
    async fn a_waiter_that_went_away_does_not_keep_a_turn() {
        let turns = Turns::new(1);
        let held = turns.take(Asker::Uid(1)).await;
        let mut gone = Box::pin(turns.take(Asker::Uid(2)));
        assert!(ready(&mut gone).is_none());
        let mut granted_then_gone = Box::pin(turns.take(Asker::Uid(3)));
        assert!(ready(&mut granted_then_gone).is_none());
        let mut last = Box::pin(turns.take(Asker::Uid(4)));
        assert!(ready(&mut last).is_none());
        drop(gone);
        // uid 2's waiter is passed over: uid 3's is granted, and goes before it looks.
        drop(held);
        drop(granted_then_gone);
        let turn = ready(&mut last);
        assert!(turn.is_some(), "the turn went on to the last waiter");
        assert_eq!(lock(&turns.state).held, 1);
        drop(turn);
        assert_eq!(lock(&turns.state).held, 0);
    }

    #[tokio::test(start_paused = true)]
    async fn a_command_still_running_after_the_lease_gives_its_turn_up_and_runs_on() {
        let turns = Turns::new(1);
        let turn = turns.take(Asker::Uid(1)).await;
        let (finish, finished) = oneshot::channel::<()>();
        let command = tokio::spawn(Turns::hold(turn, async move {
            finished.await.ok();
            "done"
        }));
        let started = tokio::time::Instant::now();
        let next = turns.take(Asker::Uid(2)).await;
        assert_eq!(
            started.elapsed(),
            LEASE,
            "the next turn came with the lease's end"
        );
        assert!(!command.is_finished(), "the command runs on");
        finish.send(()).unwrap();
        assert_eq!(command.await.unwrap(), "done");
        drop(next);
        assert_eq!(lock(&turns.state).held, 0);
    }

    #[tokio::test]
    async fn a_command_that_ends_within_the_lease_gives_its_turn_back_at_once() {
        let turns = Turns::new(1);
        let turn = turns.take(Asker::Uid(1)).await;
        assert_eq!(Turns::hold(turn, async { 7 }).await, 7);
        assert_eq!(lock(&turns.state).held, 0);
    }
}
