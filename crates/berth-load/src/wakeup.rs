//! What one thread hand-off costs on this host, measured before the run: two threads pass a
//! token back and forth, each blocking until the other wakes it, and each counts its own CPU
//! time. Done twice: with the threads on two CPUs, and both on one.
//!
//! Why the report shows it: every hand-off berthd makes (to the blocking pool, the state writer,
//! the spawn helper, a runtime process's exit) is such a sleep and wake-up. On bare metal a round
//! trip costs a few microseconds either way. In a VM whose idle CPU halts, waking it exits to
//! the hypervisor, and a round trip across CPUs can cost ten times more than on one CPU; berthd's
//! CPU per create moves with it, so a reader needs this figure beside that one.
//!
//! Owns nothing berthd uses; only the report reads it.

use std::sync::mpsc::{Receiver, SyncSender, sync_channel};
use std::thread::{self, JoinHandle};

use rustix::thread::{CpuSet, sched_getaffinity, sched_setaffinity};
use rustix::time::{ClockId, clock_gettime};
use serde::Serialize;

/// Round trips timed, after as many again to warm up.
const ROUND_TRIPS: u32 = 2000;

/// CPU time per round trip (two sleeps and two wake-ups), in microseconds.
#[derive(Debug, Clone, Copy, PartialEq, Default, Serialize)]
pub struct WakeupCost {
    /// The two threads on two CPUs; `None` when this process may use only one.
    pub across_cpus_us: Option<f64>,
    pub one_cpu_us: f64,
}

/// Measures both placements, or says why it could not.
pub fn measure() -> Result<WakeupCost, String> {
    let cpus = allowed_cpus()?;
    let first = *cpus
        .first()
        .ok_or("no CPU in this process's affinity mask")?;
    let across_cpus_us = match cpus.get(1) {
        Some(&second) => Some(round_trip_us(first, second)?),
        None => None,
    };
    Ok(WakeupCost {
        across_cpus_us,
        one_cpu_us: round_trip_us(first, first)?,
    })
}

/// The CPUs this process may run on.
fn allowed_cpus() -> Result<Vec<usize>, String> {
    let allowed = sched_getaffinity(None).map_err(|e| format!("sched_getaffinity: {e}"))?;
    Ok((0..CpuSet::MAX_CPU)
        .filter(|&c| allowed.is_set(c))
        .collect())
}

/// CPU microseconds per round trip between a thread on `cpu_a` and one on `cpu_b`. Both are
/// threads of their own, so no caller's thread is left pinned.
fn round_trip_us(cpu_a: usize, cpu_b: usize) -> Result<f64, String> {
    let (to_b, at_b) = sync_channel::<()>(1);
    let (to_a, at_a) = sync_channel::<()>(1);
    let a = spawn_side("wakeup-a", cpu_a, Turn::AskFirst, to_b, at_a)?;
    let b = spawn_side("wakeup-b", cpu_b, Turn::AnswerFirst, to_a, at_b)?;
    let a = a.join().map_err(|_| "a measuring thread panicked")?;
    let b = b.join().map_err(|_| "a measuring thread panicked")?;
    let nanos = match (a, b) {
        (Ok(a), Ok(b)) => a + b,
        // One side stopping ends the other with OTHER_STOPPED: report the cause.
        (Err(e), Err(other)) if e == OTHER_STOPPED => return Err(other),
        (Err(e), _) | (_, Err(e)) => return Err(e),
    };
    Ok(nanos as f64 / 1000.0 / f64::from(ROUND_TRIPS))
}

const OTHER_STOPPED: &str = "the other measuring thread stopped";

#[derive(Clone, Copy)]
enum Turn {
    AskFirst,
    AnswerFirst,
}

/// One side of the round trips, on `cpu`: its CPU nanoseconds over the timed rounds.
fn spawn_side(
    name: &str,
    cpu: usize,
    turn: Turn,
    send: SyncSender<()>,
    receive: Receiver<()>,
) -> Result<JoinHandle<Result<u64, String>>, String> {
    let rounds = move |count: u32| -> Result<(), String> {
        for _ in 0..count {
            if let Turn::AskFirst = turn {
                send.send(()).map_err(|_| OTHER_STOPPED)?;
            }
            receive.recv().map_err(|_| OTHER_STOPPED)?;
            if let Turn::AnswerFirst = turn {
                send.send(()).map_err(|_| OTHER_STOPPED)?;
            }
        }
        Ok(())
    };
    thread::Builder::new()
        .name(name.into())
        .spawn(move || {
            pin(cpu)?;
            rounds(ROUND_TRIPS)?;
            let start = thread_cpu_nanos();
            rounds(ROUND_TRIPS)?;
            Ok(thread_cpu_nanos() - start)
        })
        .map_err(|e| format!("spawning a thread: {e}"))
}

/// Keeps the calling thread on `cpu` for the rest of its life.
fn pin(cpu: usize) -> Result<(), String> {
    let mut set = CpuSet::new();
    set.set(cpu);
    sched_setaffinity(None, &set).map_err(|e| format!("pinning a thread to CPU {cpu}: {e}"))
}

fn thread_cpu_nanos() -> u64 {
    let now = clock_gettime(ClockId::ThreadCPUTime);
    now.tv_sec as u64 * 1_000_000_000 + now.tv_nsec as u64
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_round_trip_costs_some_cpu_and_both_placements_are_measured() {
        let cost = measure().expect("the measure runs");
        assert!(cost.one_cpu_us > 0.0, "{cost:?}");
        let cpus = sched_getaffinity(None).expect("affinity").count();
        assert_eq!(cost.across_cpus_us.is_some(), cpus > 1, "{cost:?}");
        if let Some(across) = cost.across_cpus_us {
            assert!(across > 0.0, "{cost:?}");
        }
    }

    #[test]
    fn a_cpu_the_thread_may_not_use_is_named_in_the_error() {
        let usable = allowed_cpus().expect("affinity")[0];
        let unusable = CpuSet::MAX_CPU - 1;
        let e = round_trip_us(usable, unusable).expect_err("a CPU beyond the machine's");
        assert!(
            e.starts_with(&format!("pinning a thread to CPU {unusable}: ")),
            "{e}"
        );
    }
}
