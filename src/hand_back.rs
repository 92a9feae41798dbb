//! Handing a result from a thread outside tokio's workers (the state file writer, the blocking
//! pool) back to the task that waits for it, through one eventfd the reactor polls.
//!
//! Why not a bare oneshot: a task woken from such a thread is queued for the workers and an idle
//! worker is unparked for it; that worker, once it stops searching, unparks another, which finds
//! nothing and parks again: three or four context switches a hand-off. A readiness event is
//! taken by the worker that is polling the reactor, which runs the woken task itself. On a
//! create (two hand-offs: the bundle read, the state file) this took berthd from about 12.5 to
//! 9.3 context switches (perf stat, C=1).
//!
//! Owns: the eventfd, the queue of finished results and the task that delivers them. Does not
//! own: the work, which callers run where they like.

use std::sync::{Arc, Mutex};

use tokio::sync::oneshot;

use crate::error::{Error, Result};
use crate::reactor::Eventfd;

type Delivery = Box<dyn FnOnce() + Send>;

struct Shared {
    /// Results sent and not yet delivered, each as the send to its receiver.
    finished: Mutex<Vec<Delivery>>,
    /// Written when `finished` stops being empty; the delivering task reads it.
    eventfd: Eventfd,
}

/// Where the channels' results come back; cheap to clone.
#[derive(Clone)]
pub struct HandBack {
    shared: Arc<Shared>,
}

impl std::fmt::Debug for HandBack {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HandBack").finish_non_exhaustive()
    }
}

impl HandBack {
    /// Starts the task that delivers results. Must be called inside the tokio runtime; the task
    /// ends with it.
    pub fn start() -> Result<Self> {
        let eventfd = Eventfd::new().map_err(|e| Error::sys("create the hand-back eventfd", e))?;
        let shared = Arc::new(Shared {
            finished: Mutex::default(),
            eventfd,
        });
        tokio::spawn(deliver(Arc::clone(&shared)));
        Ok(HandBack { shared })
    }

    /// A channel whose sender may be used from any thread; the receiver is awaited in a task.
    /// The receiver fails if the sender is dropped unsent (a panic in the work).
    pub fn channel<T: Send + 'static>(&self) -> (Sender<T>, oneshot::Receiver<T>) {
        let (to, from) = oneshot::channel();
        let sender = Sender {
            to,
            shared: Arc::clone(&self.shared),
        };
        (sender, from)
    }
}

/// The sending half of a [`HandBack::channel`].
pub struct Sender<T> {
    to: oneshot::Sender<T>,
    shared: Arc<Shared>,
}

impl<T: Send + 'static> Sender<T> {
    /// Hands `value` to the receiver; callable from any thread, delivered on the reactor. A
    /// value nobody waits for any more (a timeout) is dropped here or on the blocking pool,
    /// never on a worker: it may hold a descriptor on the client's file system, whose close can
    /// block.
    pub fn send(self, value: T) {
        let Sender { to, shared } = self;
        if to.is_closed() {
            return;
        }
        let first = {
            let mut finished = shared.finished.lock().unwrap_or_else(|e| e.into_inner());
            finished.push(Box::new(move || {
                if let Err(unwanted) = to.send(value) {
                    drop(tokio::task::spawn_blocking(move || drop(unwanted)));
                }
            }));
            finished.len() == 1
        };
        // A queue that was not empty has its wake-up written already, and the delivering task
        // reads the eventfd before it takes the queue, so nothing waits for a later send.
        if first && let Err(e) = shared.eventfd.signal() {
            tracing::error!(error = %e, "could not wake the hand-back task");
        }
    }
}

async fn deliver(shared: Arc<Shared>) {
    loop {
        if let Err(e) = shared.eventfd.wait().await {
            tracing::error!(error = %e, "waiting on the hand-back eventfd failed; results stop");
            return;
        }
        let finished =
            std::mem::take(&mut *shared.finished.lock().unwrap_or_else(|e| e.into_inner()));
        for delivery in finished {
            delivery();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn results_sent_from_many_threads_at_once_all_arrive() {
        let hand_back = HandBack::start().unwrap();
        let (threads, each) = (8, 2000);
        let mut receivers = Vec::new();
        let mut senders = Vec::new();
        for _ in 0..threads {
            let (mut to, mut from) = (Vec::new(), Vec::new());
            for n in 0..each {
                let (sender, receiver) = hand_back.channel::<u32>();
                to.push((n, sender));
                from.push((n, receiver));
            }
            senders.push(to);
            receivers.extend(from);
        }
        let sending: Vec<_> = senders
            .into_iter()
            .map(|to| {
                std::thread::spawn(move || {
                    for (n, sender) in to {
                        sender.send(n);
                    }
                })
            })
            .collect();
        let all = async {
            for (n, receiver) in receivers {
                assert_eq!(receiver.await.unwrap(), n);
            }
        };
        tokio::time::timeout(Duration::from_secs(30), all)
            .await
            .expect("every result sent arrives");
        for thread in sending {
            thread.join().unwrap();
        }
        assert!(hand_back.shared.finished.lock().unwrap().is_empty());
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_value_nobody_waits_for_is_dropped_off_the_workers() {
        struct Dropped(std::sync::mpsc::Sender<Option<String>>);
        impl Drop for Dropped {
            fn drop(&mut self) {
                let _ = self
                    .0
                    .send(std::thread::current().name().map(str::to_owned));
            }
        }
        let hand_back = HandBack::start().unwrap();
        let (sender, receiver) = hand_back.channel::<Dropped>();
        drop(receiver);
        let (dropped_on, thread_name) = std::sync::mpsc::channel();
        std::thread::Builder::new()
            .name("sending".into())
            .spawn(move || sender.send(Dropped(dropped_on)))
            .unwrap()
            .join()
            .unwrap();
        let name = thread_name.recv_timeout(Duration::from_secs(10)).unwrap();
        assert_eq!(name.as_deref(), Some("sending"));
    }

    #[tokio::test]
    async fn a_sender_dropped_unsent_fails_its_receiver() {
        let hand_back = HandBack::start().unwrap();
        let (sender, receiver) = hand_back.channel::<u32>();
        std::thread::spawn(move || drop(sender)).join().unwrap();
        assert!(receiver.await.is_err());
    }
}
