//! The event bus: one publisher side, any number of subscribers, bounded memory.
//!
//! A ring of `--events-buffer` events ([`tokio::sync::broadcast`]): publishing never waits for a
//! subscriber, and a subscriber that falls more than the ring behind learns how many events it
//! missed instead of being silently skipped. Events are published in the order they happened for
//! each container, so every subscriber sees them in that order.
//!
//! The ring keeps an event until every subscriber has taken it, and an added process's event
//! carries its spec (up to twice `--max-process-spec-bytes`): a ring of them behind one client
//! that stops reading would be hundreds of MB. So the bus also counts the bytes it publishes
//! ([`Event::published_bytes`]) and cuts off a subscriber that has not taken the last
//! [`MIN_BYTES_BEHIND`] of them (or four of the largest event, where that is more), even one
//! nothing polls, which lets the ring drop what only it held.
//!
//! The events of a restart (`live` for each adopted container, `exit` for each that ended while
//! berthd was down) happen before anyone can subscribe, so they are kept as a backlog that
//! every subscriber connecting within the replay window receives first; the exit of a container
//! the backlog calls `live` joins it.
//!
//! Does not own: when events happen (supervisor, stats) or their wire form (api).

use std::collections::HashMap;
use std::collections::VecDeque;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::sync::Notify;
use tokio::sync::broadcast::{self, error::TryRecvError};

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
    /// A container adopted by a restarted or upgraded berthd, from its bundle.
    Live {
        bundle: String,
    },
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
            EventKind::Live { .. } => "live",
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
    /// The bytes of every event the bus published up to this one, this one's included.
    pub published_bytes: u64,
}

/// How many bytes of published events a subscriber may leave untaken before it is cut off, at
/// least ([`EventBus::with_largest_event`] raises it).
const MIN_BYTES_BEHIND: u64 = 16 << 20;
/// The bus looks for subscribers too far behind each time this many more bytes are published.
const CHECK_STEP: u64 = 64 << 10;
/// What an event takes besides its strings.
const EVENT_BYTES: u64 = 64;

impl Event {
    /// What the event holds, roughly (about what it comes to on the wire).
    pub fn bytes(&self) -> u64 {
        self.id.len() as u64 + self.kind.bytes()
    }
}

impl EventKind {
    /// What the event holds, roughly: its strings, an added process's spec most of all.
    fn bytes(&self) -> u64 {
        EVENT_BYTES
            + match self {
                EventKind::StartContainer { bundle } | EventKind::Live { bundle } => {
                    bundle.len() as u64
                }
                EventKind::StartProcess { process } => {
                    (process.string_bytes() + 4 * process.additional_gids.len()) as u64
                }
                EventKind::Checkpoint { checkpoint } => checkpoint.name.len() as u64,
                EventKind::Exit { .. } | EventKind::Pause | EventKind::Resume | EventKind::Oom => 0,
            }
    }
}

pub struct EventBus {
    sender: broadcast::Sender<Arc<Event>>,
    recovery: Mutex<Option<Recovery>>,
    counts: Arc<Counts>,
    /// The bytes of every event published so far.
    published: AtomicU64,
    /// Every subscription's end of the ring, to cut off one that falls too far behind.
    subscribers: Arc<Subscribers>,
    /// Wakes the subscriptions waiting for an event (they wait here, not in the ring, so that
    /// none holds its end of the ring while it waits).
    published_one: Arc<Notify>,
    /// The bytes a subscription may leave untaken.
    bytes_behind: u64,
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
    /// It fell more than the ring behind: this many events are gone.
    Missed(u64),
    /// It left more of the published bytes untaken than the bus keeps for one: this many.
    Bytes(u64),
}

/// A subscription's end of the ring, shared with the bus. The bus drops the receiver of one that
/// falls too far behind even while nothing polls it (its client stopped reading, so the HTTP/2
/// stream takes nothing from it), which lets the ring free what only it held.
struct Receiving {
    /// `None` once the bus cut the subscription off.
    receiver: Mutex<Option<broadcast::Receiver<Arc<Event>>>>,
    /// The bus's published bytes up to the last event taken (or to the subscription).
    taken: AtomicU64,
    /// How far behind it was when cut off.
    cut_behind: AtomicU64,
}

pub(crate) struct Subscription {
    backlog: VecDeque<Arc<Event>>,
    receiving: Arc<Receiving>,
    counts: Arc<Counts>,
    published_one: Arc<Notify>,
    /// Where the bus finds it, left when it is dropped (what an ended subscription held goes
    /// with it, not at the bus's next look).
    subscribers: Arc<Subscribers>,
    key: u64,
}

/// Every live subscription's end of the ring, by a key of its own.
#[derive(Default)]
struct Subscribers(Mutex<SubscriberTable>);

#[derive(Default)]
struct SubscriberTable {
    next_key: u64,
    by_key: HashMap<u64, Arc<Receiving>>,
}

impl Subscribers {
    fn lock(&self) -> std::sync::MutexGuard<'_, SubscriberTable> {
        self.0.lock().unwrap_or_else(|e| e.into_inner())
    }
}

impl Drop for Subscription {
    fn drop(&mut self) {
        self.subscribers.lock().by_key.remove(&self.key);
    }
}

impl Subscription {
    /// The next event, or how it fell behind. `None` when the bus is gone (berthd is stopping).
    pub async fn next(&mut self) -> Option<Result<Arc<Event>, Lagged>> {
        if let Some(event) = self.backlog.pop_front() {
            return Some(Ok(event));
        }
        loop {
            // Registered before looking, so an event published in between still wakes it.
            let published = self.published_one.notified();
            tokio::pin!(published);
            published.as_mut().enable();
            {
                let mut receiver = self
                    .receiving
                    .receiver
                    .lock()
                    .unwrap_or_else(|e| e.into_inner());
                let Some(receiver) = receiver.as_mut() else {
                    let behind = self.receiving.cut_behind.load(Ordering::Relaxed);
                    return Some(Err(Lagged::Bytes(behind)));
                };
                match receiver.try_recv() {
                    Ok(event) => {
                        let taken = &self.receiving.taken;
                        taken.fetch_max(event.published_bytes, Ordering::Relaxed);
                        return Some(Ok(event));
                    }
                    Err(TryRecvError::Empty) => {}
                    Err(TryRecvError::Lagged(missed)) => {
                        self.counts.cut_off.fetch_add(1, Ordering::Relaxed);
                        return Some(Err(Lagged::Missed(missed)));
                    }
                    Err(TryRecvError::Closed) => return None,
                }
            }
            published.await;
        }
    }
}

impl Drop for EventBus {
    /// Closes the ring before waking the waiting subscriptions, so each finds it closed.
    fn drop(&mut self) {
        drop(std::mem::replace(&mut self.sender, broadcast::channel(1).0));
        self.published_one.notify_waiters();
    }
}

impl EventBus {
    pub fn new(capacity: usize) -> Self {
        let (sender, _) = broadcast::channel(capacity.max(1));
        EventBus {
            sender,
            recovery: Mutex::new(None),
            counts: Arc::default(),
            published: AtomicU64::new(0),
            subscribers: Arc::default(),
            published_one: Arc::new(Notify::new()),
            bytes_behind: MIN_BYTES_BEHIND,
        }
    }

    /// Lets a subscription leave four events of `bytes` untaken, where that is more than
    /// [`MIN_BYTES_BEHIND`]: one that keeps up must never be cut off for the size of one event.
    pub fn with_largest_event(mut self, bytes: u64) -> Self {
        self.bytes_behind = MIN_BYTES_BEHIND.max(bytes.saturating_mul(4));
        self
    }

    /// Records an event of the restart itself, replayed to subscribers for `window` from now.
    pub(crate) fn record_recovery(&self, id: &str, pid: u32, kind: EventKind, window: Duration) {
        tracing::debug!(id, pid, kind = kind.name(), "recovery event");
        let event = Arc::new(Event {
            id: id.to_owned(),
            pid,
            kind,
            published_bytes: 0,
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
        let bytes = id.len() as u64 + kind.bytes();
        let published = self.published.fetch_add(bytes, Ordering::Relaxed) + bytes;
        let event = Arc::new(Event {
            id: id.to_owned(),
            pid,
            kind,
            published_bytes: published,
        });
        // Held until the event is in the ring, so that a subscriber gets it from the backlog or
        // from the ring, never both.
        let _backlog = self.follow_up_recovery(&event);
        // No subscriber is not an error: the event simply has nobody to go to.
        let _ = self.sender.send(event);
        self.published_one.notify_waiters();
        if published / CHECK_STEP != (published - bytes) / CHECK_STEP {
            self.cut_off_laggards(published);
        }
    }

    /// The exit of a container the backlog says is `live` joins the backlog after it: a
    /// subscriber arriving later within the window must not be told that a container which has
    /// ended since is running.
    /// Returns the backlog's lock when it took the event.
    fn follow_up_recovery(
        &self,
        event: &Arc<Event>,
    ) -> Option<std::sync::MutexGuard<'_, Option<Recovery>>> {
        if !matches!(event.kind, EventKind::Exit { .. }) {
            return None;
        }
        let mut recovery = self.recovery.lock().expect("event lock poisoned");
        let backlog = recovery.as_mut()?;
        if Instant::now() >= backlog.until {
            *recovery = None;
            return None;
        }
        let was_live = backlog.events.iter().any(|e| {
            matches!(e.kind, EventKind::Live { .. }) && e.id == event.id && e.pid == event.pid
        });
        if !was_live {
            return None;
        }
        backlog.events.push(Arc::clone(event));
        Some(recovery)
    }

    /// Drops the ring's receiver of every subscription more than `bytes_behind` behind
    /// `published`.
    fn cut_off_laggards(&self, published: u64) {
        let subscribers = self.subscribers.lock();
        for receiving in subscribers.by_key.values() {
            let behind = published.saturating_sub(receiving.taken.load(Ordering::Relaxed));
            if behind <= self.bytes_behind {
                continue;
            }
            let mut receiver = receiving.receiver.lock().unwrap_or_else(|e| e.into_inner());
            // Again under its lock: it may have taken events in between.
            let behind = published.saturating_sub(receiving.taken.load(Ordering::Relaxed));
            if behind > self.bytes_behind && receiver.take().is_some() {
                receiving.cut_behind.store(behind, Ordering::Relaxed);
                self.counts.cut_off.fetch_add(1, Ordering::Relaxed);
            }
        }
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
        let receiving = Arc::new(Receiving {
            receiver: Mutex::new(Some(self.sender.subscribe())),
            taken: AtomicU64::new(self.published.load(Ordering::Relaxed)),
            cut_behind: AtomicU64::new(0),
        });
        let key = {
            let mut subscribers = self.subscribers.lock();
            let key = subscribers.next_key;
            subscribers.next_key += 1;
            subscribers.by_key.insert(key, Arc::clone(&receiving));
            key
        };
        Subscription {
            backlog,
            receiving,
            counts: Arc::clone(&self.counts),
            published_one: Arc::clone(&self.published_one),
            subscribers: Arc::clone(&self.subscribers),
            key,
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

    fn live() -> EventKind {
        EventKind::Live {
            bundle: "/b".into(),
        }
    }

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
        bus.record_recovery("a", 1, live(), Duration::from_secs(60));
        bus.record_recovery(
            "b",
            2,
            EventKind::Exit { status: 255 },
            Duration::from_secs(60),
        );
        let mut sub = bus.subscribe();
        bus.publish("a", 1, EventKind::Pause);
        assert_eq!(sub.next().await.unwrap().unwrap().kind, live());
        assert_eq!(sub.next().await.unwrap().unwrap().id, "b");
        assert_eq!(sub.next().await.unwrap().unwrap().kind, EventKind::Pause);

        let late = EventBus::new(8);
        late.record_recovery("a", 1, live(), Duration::ZERO);
        let mut sub = late.subscribe();
        late.publish("a", 1, EventKind::Resume);
        assert_eq!(sub.next().await.unwrap().unwrap().kind, EventKind::Resume);
    }

    /// A container replayed as `live` that exits within the window: a subscriber from before
    /// the exit gets it once, from the ring; one from after gets `live` and then the exit from
    /// the backlog, never `live` alone.
    #[tokio::test]
    async fn an_exit_within_the_window_follows_its_live_in_the_replay() {
        let bus = EventBus::new(8);
        bus.record_recovery("a", 1, live(), Duration::from_secs(60));
        bus.record_recovery("b", 2, live(), Duration::from_secs(60));
        let mut before = bus.subscribe();
        bus.publish("a", 1, EventKind::Exit { status: 3 });
        // Not a container the backlog names as live: not replayed.
        bus.publish("a", 9, EventKind::Exit { status: 0 });
        let mut after = bus.subscribe();
        bus.publish("b", 2, EventKind::Pause);
        let live = |id: &str, pid| (id.to_owned(), pid, "live");
        let exit = |id: &str, pid| (id.to_owned(), pid, "exit");
        let pause = |id: &str, pid| (id.to_owned(), pid, "pause");
        let expected = [
            vec![
                live("a", 1),
                live("b", 2),
                exit("a", 1),
                exit("a", 9),
                pause("b", 2),
            ],
            vec![live("a", 1), live("b", 2), exit("a", 1), pause("b", 2)],
        ];
        for (sub, expected) in [&mut before, &mut after].into_iter().zip(expected) {
            let mut seen = Vec::new();
            for _ in 0..expected.len() {
                let next = tokio::time::timeout(Duration::from_secs(5), sub.next()).await;
                let Ok(Some(Ok(event))) = next else {
                    panic!("after {seen:?}: {next:?}, expected {expected:?}");
                };
                seen.push((event.id.clone(), event.pid, event.kind.name()));
            }
            assert_eq!(seen, expected);
        }
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

    #[tokio::test]
    async fn a_subscriber_leaving_too_many_bytes_untaken_is_cut_off_and_the_ring_lets_go() {
        let bus = EventBus::new(1024);
        let mut idle = bus.subscribe();
        let mut reading = bus.subscribe();
        let big = ProcessSpec {
            args: vec!["true".into()],
            env: vec![format!("X={}", "x".repeat(1 << 20))],
            ..ProcessSpec::default()
        };
        let start = || EventKind::StartProcess {
            process: big.clone(),
        };
        bus.publish("a", 1, start());
        let first = Arc::downgrade(&reading.next().await.unwrap().unwrap());
        for pid in 2..=20 {
            bus.publish("a", pid, start());
            assert_eq!(reading.next().await.unwrap().unwrap().pid, pid);
        }
        // Only the idle subscriber kept the first event; cut off, it no longer does.
        assert!(
            first.upgrade().is_none(),
            "the ring still holds the first event"
        );
        match idle.next().await {
            Some(Err(Lagged::Bytes(behind))) => assert!(behind > MIN_BYTES_BEHIND, "{behind}"),
            other => panic!("{other:?}"),
        }
        assert_eq!(bus.counts().cut_off, 1);
        bus.publish("a", 21, EventKind::Exit { status: 0 });
        assert_eq!(reading.next().await.unwrap().unwrap().pid, 21);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_waiting_subscriber_wakes_for_each_event_and_when_the_bus_goes() {
        let bus = EventBus::new(128);
        let mut sub = bus.subscribe();
        let waiting = tokio::spawn(async move {
            let mut pids = Vec::new();
            while let Some(event) = sub.next().await {
                pids.push(event.unwrap().pid);
            }
            pids
        });
        for pid in 1..=100 {
            bus.publish("a", pid, EventKind::Pause);
            if pid % 10 == 0 {
                tokio::time::sleep(Duration::from_millis(1)).await;
            }
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
        drop(bus);
        let pids = tokio::time::timeout(Duration::from_secs(5), waiting)
            .await
            .expect("the subscriber ended with the bus")
            .unwrap();
        assert_eq!(pids, (1..=100).collect::<Vec<_>>());
    }
}
