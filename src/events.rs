//! The event bus: one publisher side, any number of subscribers, bounded memory.
//!
//! A ring of `--events-buffer` events ([`tokio::sync::broadcast`]): publishing never waits for a
//! subscriber, and a subscriber that falls more than the ring behind learns how many events it
//! missed instead of being silently skipped. Events are published in the order they happened for
//! each container, so every subscriber sees them in that order.
//!
//! The events of a restart (`live` for each adopted container, `exit` for each that ended while
//! berthd was down) happen before anyone can subscribe, so they are kept as a backlog that
//! every subscriber connecting within the replay window receives first.
//!
//! Does not own: when events happen (supervisor, stats) or their wire form (api).

use std::collections::VecDeque;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::sync::broadcast;

use crate::model::{Checkpoint, ProcessSpec};

#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum EventKind {
    StartContainer {
        bundle: String,
    },
    StartProcess {
        process: ProcessSpec,
    },
    Exit {
        status: u32,
    },
    Pause,
    Resume,
    /// A container adopted by a restarted or upgraded berthd.
    Live,
    /// The container's cgroup hit its memory limit and the OOM killer killed in it.
    Oom,
    Checkpoint {
        checkpoint: Checkpoint,
    },
}

impl EventKind {
    /// The event's `type` on the wire.
    pub fn name(&self) -> &'static str {
        match self {
            EventKind::StartContainer { .. } => "start-container",
            EventKind::StartProcess { .. } => "start-process",
            EventKind::Exit { .. } => "exit",
            EventKind::Pause => "pause",
            EventKind::Resume => "resume",
            EventKind::Live => "live",
            EventKind::Oom => "oom",
            EventKind::Checkpoint { .. } => "checkpoint",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Event {
    pub id: String,
    pub pid: u32,
    pub kind: EventKind,
}

pub struct EventBus {
    sender: broadcast::Sender<Arc<Event>>,
    recovery: Mutex<Option<Recovery>>,
    counts: Arc<Counts>,
}

#[derive(Debug, Default)]
struct Counts {
    published: AtomicU64,
    cut_off: AtomicU64,
}

/// What the bus did so far, for the metrics endpoint.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct EventCounts {
    pub published: u64,
    /// Subscribers told they fell behind, which ends their stream.
    pub cut_off: u64,
}

struct Recovery {
    until: Instant,
    events: Vec<Arc<Event>>,
}

/// Why a subscription ended early.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Lagged {
    Missed(u64),
}

pub(crate) struct Subscription {
    backlog: VecDeque<Arc<Event>>,
    receiver: broadcast::Receiver<Arc<Event>>,
    counts: Arc<Counts>,
}

impl Subscription {
    /// The next event, or how many were missed when this subscriber fell behind. `None` when the
    /// bus is gone (berthd is stopping).
    pub async fn next(&mut self) -> Option<Result<Arc<Event>, Lagged>> {
        if let Some(event) = self.backlog.pop_front() {
            return Some(Ok(event));
        }
        match self.receiver.recv().await {
            Ok(event) => Some(Ok(event)),
            Err(broadcast::error::RecvError::Lagged(missed)) => {
                self.counts.cut_off.fetch_add(1, Ordering::Relaxed);
                Some(Err(Lagged::Missed(missed)))
            }
            Err(broadcast::error::RecvError::Closed) => None,
        }
    }
}

impl EventBus {
    pub fn new(capacity: usize) -> Self {
        let (sender, _) = broadcast::channel(capacity.max(1));
        EventBus {
            sender,
            recovery: Mutex::new(None),
            counts: Arc::default(),
        }
    }

    /// Records an event of the restart itself, replayed to subscribers for `window` from now.
    pub(crate) fn record_recovery(&self, id: &str, pid: u32, kind: EventKind, window: Duration) {
        tracing::debug!(id, pid, kind = kind.name(), "recovery event");
        let event = Arc::new(Event {
            id: id.to_owned(),
            pid,
            kind,
        });
        let mut recovery = self.recovery.lock().expect("event lock poisoned");
        let recovery = recovery.get_or_insert_with(|| Recovery {
            until: Instant::now() + window,
            events: Vec::new(),
        });
        recovery.events.push(event);
    }

    pub(crate) fn publish(&self, id: &str, pid: u32, kind: EventKind) {
        tracing::debug!(id, pid, kind = kind.name(), "event");
        self.counts.published.fetch_add(1, Ordering::Relaxed);
        // No subscriber is not an error: the event simply has nobody to go to.
        let _ = self.sender.send(Arc::new(Event {
            id: id.to_owned(),
            pid,
            kind,
        }));
    }

    pub(crate) fn subscribe(&self) -> Subscription {
        let mut recovery = self.recovery.lock().expect("event lock poisoned");
        let backlog = match recovery.as_ref() {
            Some(r) if Instant::now() < r.until => r.events.iter().cloned().collect(),
            Some(_) => {
                *recovery = None;
                VecDeque::new()
            }
            None => VecDeque::new(),
        };
        Subscription {
            backlog,
            receiver: self.sender.subscribe(),
            counts: Arc::clone(&self.counts),
        }
    }

    pub(crate) fn counts(&self) -> EventCounts {
        EventCounts {
            published: self.counts.published.load(Ordering::Relaxed),
            cut_off: self.counts.cut_off.load(Ordering::Relaxed),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn subscribers_see_events_from_the_moment_they_subscribe_in_order() {
        let bus = EventBus::new(8);
        bus.publish("early", 1, EventKind::Pause);
        let mut sub = bus.subscribe();
        bus.publish("a", 2, EventKind::Pause);
        bus.publish("a", 2, EventKind::Resume);
        assert_eq!(sub.next().await.unwrap().unwrap().kind, EventKind::Pause);
        assert_eq!(sub.next().await.unwrap().unwrap().kind, EventKind::Resume);
    }

    #[tokio::test]
    async fn recovery_events_come_first_within_the_window_only() {
        let bus = EventBus::new(8);
        bus.record_recovery("a", 1, EventKind::Live, Duration::from_secs(60));
        bus.record_recovery(
            "b",
            2,
            EventKind::Exit { status: 255 },
            Duration::from_secs(60),
        );
        let mut sub = bus.subscribe();
        bus.publish("a", 1, EventKind::Pause);
        assert_eq!(sub.next().await.unwrap().unwrap().kind, EventKind::Live);
        assert_eq!(sub.next().await.unwrap().unwrap().id, "b");
        assert_eq!(sub.next().await.unwrap().unwrap().kind, EventKind::Pause);

        let late = EventBus::new(8);
        late.record_recovery("a", 1, EventKind::Live, Duration::ZERO);
        let mut sub = late.subscribe();
        late.publish("a", 1, EventKind::Resume);
        assert_eq!(sub.next().await.unwrap().unwrap().kind, EventKind::Resume);
    }

    #[tokio::test]
    async fn a_slow_subscriber_learns_how_many_it_missed_and_others_are_unaffected() {
        let bus = EventBus::new(4);
        let mut slow = bus.subscribe();
        let mut fast = bus.subscribe();
        for pid in 0..10 {
            bus.publish("a", pid, EventKind::Exit { status: 0 });
            assert_eq!(fast.next().await.unwrap().unwrap().pid, pid);
        }
        assert_eq!(slow.next().await.unwrap(), Err(Lagged::Missed(6)));
        assert_eq!(
            bus.counts(),
            EventCounts {
                published: 10,
                cut_off: 1
            }
        );
    }
}
