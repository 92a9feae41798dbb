//! How far berthd makes answers ahead of a client that does not read them. h2 takes a stream's
//! answer as far as the client's flow-control window allows, up to hyper's send buffer of 400 KB
//! a stream (which tonic does not let berthd lower), and an answer h2 has not taken waits whole
//! in its response body. So a client that asked many times, or announced large windows, and then
//! stopped reading would have berthd hold an answer a stream.
//!
//! Streams (Events, GetStats) take their next message only while the connection's socket has
//! room ([`socket_has_room`]). Answers whose size is the daemon's to decide (State,
//! ListCheckpoint) are made at most [`ANSWERS_AHEAD`] at a time on a connection, each holding
//! its place until hyper has handed it to h2 or the stream ended, and only while the answers
//! made on the connection are at most [`BACKLOG`] bytes ahead of what its socket took
//! ([`AnswerPacingLayer`]). Room alone says nothing of a burst of calls that all found it before
//! the first answer was written; places alone say nothing once h2 takes answers whole.
//!
//! Owns: when an answer or a stream's next message is made. Does not own: the socket's room,
//! the places and the byte counts (listener, which publishes them with the connection), what is
//! answered (service).

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use futures_util::future::BoxFuture;
use http_body_util::BodyExt;
use tonic::Request;
use tonic::body::Body;

#[cfg(doc)]
use crate::model::ANSWERS_AHEAD;
use crate::model::{ConnectionInfo, SocketRoom};

/// The methods whose answers grow with what berthd holds (every container, every checkpoint).
const PACED: [&str; 2] = ["/types.API/State", "/types.API/ListCheckpoint"];

/// How far the answers made on a connection may run ahead of what its socket took.
const BACKLOG: u64 = 1 << 20;

/// How often an answer waiting on the backlog looks again.
const BACKLOG_LOOK: Duration = Duration::from_millis(5);

/// A backlog this long unchanged while the socket has room is not in h2's queue: h2 writes what
/// it can as soon as it can, so what is left was dropped with streams the client reset.
const STALE: Duration = Duration::from_millis(50);

/// Waits until the answers made on the connection are at most [`BACKLOG`] ahead of what its
/// socket took, or what is counted ahead was dropped.
async fn backlog_shrinks(connection: &ConnectionInfo) {
    let (made, sent) = (&connection.made, &connection.sent);
    // What the socket took beyond the answers (headers, streams, other calls) is no credit.
    made.fetch_max(sent.load(Ordering::Relaxed), Ordering::Relaxed);
    let backlog = || {
        made.load(Ordering::Relaxed)
            .saturating_sub(sent.load(Ordering::Relaxed))
    };
    let mut last_sent = sent.load(Ordering::Relaxed);
    let mut unchanged = Duration::ZERO;
    while backlog() > BACKLOG {
        tokio::time::sleep(BACKLOG_LOOK).await;
        let now_sent = sent.load(Ordering::Relaxed);
        let has_room = *connection.room.0.borrow();
        if now_sent != last_sent || !has_room {
            (last_sent, unchanged) = (now_sent, Duration::ZERO);
            continue;
        }
        unchanged += BACKLOG_LOOK;
        if unchanged >= STALE {
            made.fetch_min(now_sent, Ordering::Relaxed);
            return;
        }
    }
}

/// Counts an answer's bytes as it is made.
fn count_made(made: &AtomicU64, bytes: usize) {
    made.fetch_add(bytes as u64, Ordering::Relaxed);
}

/// The room on the socket of `request`'s connection; none for a request that did not come
/// through the listener (in-process tests).
pub fn socket_room<T>(request: &Request<T>) -> Option<SocketRoom> {
    request
        .extensions()
        .get::<ConnectionInfo>()
        .map(|connection| connection.room.clone())
}

/// Waits until the socket has room: a stream takes its next message only as its client reads,
/// not as far as h2 would buffer for it.
pub async fn socket_has_room(room: &mut Option<SocketRoom>) {
    if let Some(SocketRoom(room)) = room {
        // An error is the connection gone, and the request with it.
        let _ = room.wait_for(|room| *room).await;
    }
}

/// Paces the answers of [`PACED`] methods on each connection.
#[derive(Clone, Copy, Debug)]
pub struct AnswerPacingLayer;

impl<S> tower::Layer<S> for AnswerPacingLayer {
    type Service = AnswerPacing<S>;

    fn layer(&self, inner: S) -> Self::Service {
        AnswerPacing { inner }
    }
}

#[derive(Clone, Debug)]
pub struct AnswerPacing<S> {
    inner: S,
}

impl<S, B> tower::Service<http::Request<B>> for AnswerPacing<S>
where
    S: tower::Service<http::Request<B>, Response = http::Response<Body>> + Clone + Send + 'static,
    S::Future: Send + 'static,
    B: Send + 'static,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = BoxFuture<'static, Result<S::Response, S::Error>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: http::Request<B>) -> Self::Future {
        let connection = request.extensions().get::<ConnectionInfo>().cloned();
        let paced = PACED.contains(&request.uri().path());
        let Some(connection) = connection.filter(|_| paced) else {
            return Box::pin(self.inner.call(request));
        };
        // The service made ready is the one called, later: a clone takes its place.
        let ready = self.inner.clone();
        let mut inner = std::mem::replace(&mut self.inner, ready);
        Box::pin(async move {
            let places = Arc::clone(&connection.answers);
            let Ok(place) = places.acquire_owned().await else {
                return inner.call(request).await;
            };
            backlog_shrinks(&connection).await;
            let (parts, body) = inner.call(request).await?.into_parts();
            // The place goes with the answer: hyper drops the body once h2 has taken all of it,
            // or when the stream ends first.
            let made = connection.made;
            let body = body.map_frame(move |frame| {
                let _place = &place;
                if let Some(data) = frame.data_ref() {
                    count_made(&made, data.len());
                }
                frame
            });
            Ok(http::Response::from_parts(parts, Body::new(body)))
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::PeerCredentials;

    fn connection(room: bool) -> (ConnectionInfo, tokio::sync::watch::Sender<bool>) {
        let (tell, room) = tokio::sync::watch::channel(room);
        let connection = ConnectionInfo {
            credentials: PeerCredentials(None),
            room: SocketRoom(room),
            answers: Arc::new(tokio::sync::Semaphore::new(crate::model::ANSWERS_AHEAD)),
            sent: Arc::default(),
            made: Arc::default(),
        };
        (connection, tell)
    }

    #[tokio::test]
    async fn an_answer_waits_while_the_backlog_is_over_its_bound_and_the_socket_full() {
        let (connection, _room) = connection(false);
        connection.made.store(BACKLOG + 1, Ordering::Relaxed);
        let waiting = tokio::spawn({
            let connection = connection.clone();
            async move { backlog_shrinks(&connection).await }
        });
        tokio::time::sleep(4 * STALE).await;
        assert!(!waiting.is_finished(), "made with the socket full");
        // The client read one byte: the backlog is at its bound.
        connection.sent.store(1, Ordering::Relaxed);
        tokio::time::timeout(4 * STALE, waiting)
            .await
            .expect("still waiting with the backlog at its bound")
            .unwrap();
    }

    #[tokio::test]
    async fn bytes_sent_besides_the_answers_are_no_credit() {
        let (connection, _room) = connection(false);
        connection.sent.store(10 * BACKLOG, Ordering::Relaxed);
        backlog_shrinks(&connection).await;
        count_made(&connection.made, BACKLOG as usize + 1);
        let waited = tokio::time::timeout(4 * STALE, backlog_shrinks(&connection)).await;
        assert!(
            waited.is_err(),
            "earlier bytes sent let an answer past the bound"
        );
    }

    #[tokio::test]
    async fn a_backlog_the_socket_has_room_for_and_does_not_send_was_dropped() {
        let (connection, _room) = connection(true);
        connection.made.store(3 * BACKLOG, Ordering::Relaxed);
        tokio::time::timeout(20 * STALE, backlog_shrinks(&connection))
            .await
            .expect("a dropped backlog kept the answer waiting");
        assert_eq!(connection.made.load(Ordering::Relaxed), 0);
    }
}
