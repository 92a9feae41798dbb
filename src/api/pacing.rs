//! How far berthd makes answers ahead of a client that does not read them. h2 takes a stream's
//! messages as far as the client's flow-control windows allow (an answer whole, once its stream
//! has any window), and an answer h2 has not taken waits whole in its response body. So a client
//! that asked many times, or announced large windows, and then stopped reading would have berthd
//! hold an answer a stream.
//!
//! Streams (Events, GetStats) take their next message only while the connection's socket has
//! room ([`socket_has_room`]). Answers whose size is the daemon's to decide (State,
//! ListCheckpoint) are made at most [`ANSWERS_AHEAD`] at a time on a connection
//! ([`AnswerPacingLayer`]): each holds its place until the socket has taken as many bytes as
//! there were up to the answer's end, or until the stream or the connection ended first (hyper
//! drops the body). Room alone says nothing of a burst of calls that all found it before the
//! first answer was written; a place freed when h2 took the answer would be freed at once.
//!
//! Room on the socket bounds nothing for a client that gives its streams no flow-control window:
//! the socket never fills while h2 holds a message on each stream. So what is made ahead of one
//! uid's reading, Events messages and paced answers alike, is also held to the uid's budget
//! ([`AnswerBytes`], [`answer_bytes_per_uid`]): a message is made only while the budget has room
//! ([`made_ahead`]); a paced answer, whose size is known only once made, is made in the uid's
//! turn (one queue per method) and counted before the next is ([`AnswerPacingLayer`]). GetStats
//! messages, small and of a size no client chooses, are not counted.
//!
//! Owns: when an answer or a stream's next message is made. Does not own: the socket's room, the
//! places and the byte count (listener, which publishes them with the connection), what is
//! answered (service).

use std::sync::Arc;
use std::task::{Context, Poll};

use bytes::Bytes;
use futures_util::StreamExt;
use futures_util::future::BoxFuture;
use http_body_util::{BodyStream, StreamBody};
use hyper::body::Body as _;
use tonic::Request;
use tonic::body::Body;

#[cfg(doc)]
use crate::model::ANSWERS_AHEAD;
use crate::model::{AnswerBytes, ConnectionInfo, Hold, SentBytes, SocketRoom};

/// The methods whose answers grow with what berthd holds (every container, every checkpoint),
/// each made in its own queue of a uid's turns.
const PACED: [&str; crate::model::MAKING_QUEUES] =
    ["/types.API/State", "/types.API/ListCheckpoint"];

/// An answer this small gives its place back once made: waiting for the socket would cost more
/// than it holds.
const HELD_FROM: u64 = 16 * 1024;

/// How many bytes of answers and stream messages made ahead of its reading one uid may have
/// berthd hold ([`AnswerBytes`]): as many as [`ANSWERS_AHEAD`] of the largest answers.
pub fn answer_bytes_per_uid(max_message_bytes: usize) -> usize {
    max_message_bytes.saturating_mul(crate::model::ANSWERS_AHEAD)
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

/// A stream's share of its uid's budget for messages made ahead of its reading.
pub struct MessageBudget {
    sent: Arc<SentBytes>,
    answer_bytes: Arc<AnswerBytes>,
}

/// The budget of streams on `request`'s connection; none for a request that did not come
/// through the listener (in-process tests).
pub fn message_budget<T>(request: &Request<T>) -> Option<MessageBudget> {
    request
        .extensions()
        .get::<ConnectionInfo>()
        .map(|connection| MessageBudget {
            sent: Arc::clone(&connection.sent),
            answer_bytes: Arc::clone(&connection.answer_bytes),
        })
}

/// Waits until the uid's budget has room, then counts a message that holds `bytes` and comes to
/// `sent_at_least` on the wire until the socket has taken that many bytes more, or the
/// connection ends. Room on the socket alone is no bound: a client that gives its streams no
/// window has h2 hold one message a stream, and the socket never fills. The mark must be no
/// later than the message's own end: one never reached would keep its bytes from an idle
/// connection until more was sent, and a uid's streams could all wait on one another.
pub async fn made_ahead(budget: &Option<MessageBudget>, bytes: usize, sent_at_least: usize) {
    if let Some(budget) = budget {
        let hold = budget.answer_bytes.take(bytes).await;
        let mark = budget.sent.count().saturating_add(sent_at_least as u64);
        budget.sent.release_at(mark, hold);
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
        let queue = PACED.iter().position(|path| *path == request.uri().path());
        let Some((connection, queue)) = connection.zip(queue) else {
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
            let turn = connection.answer_bytes.making(queue).await;
            let (parts, body) = inner.call(request).await?.into_parts();
            // An answer with no body (an error, whose status is in its headers) has nothing to
            // pace, and wrapped it would no longer say it has ended: hyper would send its headers
            // without END_STREAM and then an empty DATA frame, which grpc-go takes for a stream
            // ended without trailers (INTERNAL instead of the error's code).
            if body.is_end_stream() {
                return Ok(http::Response::from_parts(parts, body));
            }
            // Made here, in the turn, rather than when h2 first has window for it: its size
            // counts before the uid's next answer is made.
            let mut frames = BodyStream::new(body);
            let first = frames.next().await;
            let made = match &first {
                Some(Ok(frame)) => frame.data_ref().map_or(0, Bytes::len),
                _ => 0,
            };
            let hold = turn.made(made);
            let body = Body::new(StreamBody::new(
                futures_util::stream::iter(first).chain(frames),
            ));
            let body = held_until_sent(body, place, hold, connection.sent);
            Ok(http::Response::from_parts(parts, body))
        })
    }
}

/// `body`, holding `place` and `hold` until the socket has taken as many bytes as it had taken
/// when the answer's last data was made, plus that data: the answer's end (its trailers) waits
/// for that. A body dropped first (the stream reset, the connection gone) gives both back with
/// it.
fn held_until_sent(
    body: Body,
    place: tokio::sync::OwnedSemaphorePermit,
    hold: Hold,
    sent: Arc<SentBytes>,
) -> Body {
    struct Answer {
        frames: BodyStream<Body>,
        place: Option<(tokio::sync::OwnedSemaphorePermit, Hold)>,
        sent: Arc<SentBytes>,
        made: u64,
        mark: u64,
    }
    let answer = Answer {
        frames: BodyStream::new(body),
        place: Some((place, hold)),
        sent,
        made: 0,
        mark: 0,
    };
    let frames = futures_util::stream::unfold(answer, |mut answer| async move {
        let next = answer.frames.next().await;
        let data = match &next {
            Some(Ok(frame)) => frame.data_ref().map_or(0, |data| data.len() as u64),
            _ => 0,
        };
        if data > 0 {
            answer.made += data;
            answer.mark = answer.mark.max(answer.sent.count() + data);
        } else if let Some(place) = answer.place.take() {
            if answer.made >= HELD_FROM {
                answer.sent.reaches(answer.mark).await;
            }
            drop(place);
        }
        Some((next?, answer))
    });
    Body::new(StreamBody::new(frames))
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use http_body_util::BodyExt;

    use super::*;

    const PATIENCE: Duration = Duration::from_millis(200);

    /// A hold of `bytes` in a budget of its own, and the budget.
    async fn hold(bytes: usize) -> (Hold, Arc<AnswerBytes>) {
        let budget = Arc::new(AnswerBytes::new(1 << 20));
        (budget.take(bytes).await, budget)
    }

    /// An answer of `len` bytes of data and then trailers, as tonic makes a unary one.
    fn answer(len: usize) -> Body {
        let frames = [
            hyper::body::Frame::data(Bytes::from(vec![0u8; len])),
            hyper::body::Frame::trailers(http::HeaderMap::new()),
        ];
        let frames = futures_util::stream::iter(frames.map(Ok::<_, tonic::Status>));
        Body::new(StreamBody::new(frames))
    }

    #[tokio::test]
    async fn a_large_answer_keeps_its_place_until_the_socket_took_it() {
        let sent = Arc::new(SentBytes::default());
        sent.add(1000);
        let places = Arc::new(tokio::sync::Semaphore::new(1));
        let place = Arc::clone(&places).try_acquire_owned().unwrap();
        let (hold, budget) = hold(64 * 1024).await;
        let mut body = held_until_sent(answer(64 * 1024), place, hold, Arc::clone(&sent));
        let data = body.frame().await.unwrap().unwrap();
        assert_eq!(data.data_ref().map(Bytes::len), Some(64 * 1024));
        let end = tokio::spawn(async move { body.frame().await.map(|f| f.unwrap().is_trailers()) });
        sent.add(64 * 1024 - 1);
        tokio::time::sleep(PATIENCE).await;
        assert!(
            !end.is_finished(),
            "the answer ended before the socket took it"
        );
        assert_eq!(places.available_permits(), 0);
        assert_eq!(budget.held(), 64 * 1024);
        sent.add(1);
        let end = tokio::time::timeout(PATIENCE, end)
            .await
            .expect("not ended once taken");
        assert_eq!(end.unwrap(), Some(true));
        assert_eq!(places.available_permits(), 1);
        assert_eq!(budget.held(), 0);
    }

    #[tokio::test]
    async fn a_small_answer_gives_its_place_back_once_made() {
        let sent = Arc::new(SentBytes::default());
        let places = Arc::new(tokio::sync::Semaphore::new(1));
        let place = Arc::clone(&places).try_acquire_owned().unwrap();
        let (hold, _budget) = hold(100).await;
        let body = held_until_sent(answer(100), place, hold, sent);
        let collected = tokio::time::timeout(PATIENCE, body.collect()).await;
        assert!(
            collected
                .expect("a small answer waited for the socket")
                .is_ok()
        );
        assert_eq!(places.available_permits(), 1);
    }

    #[tokio::test]
    async fn an_answer_dropped_before_the_socket_took_it_gives_its_place_back() {
        let sent = Arc::new(SentBytes::default());
        let places = Arc::new(tokio::sync::Semaphore::new(1));
        let place = Arc::clone(&places).try_acquire_owned().unwrap();
        let (hold, budget) = hold(64 * 1024).await;
        let mut body = held_until_sent(answer(64 * 1024), place, hold, Arc::clone(&sent));
        body.frame().await.unwrap().unwrap();
        assert!(tokio::time::timeout(PATIENCE, body.frame()).await.is_err());
        assert_eq!(places.available_permits(), 0);
        drop(body);
        assert_eq!(places.available_permits(), 1);
        assert_eq!(budget.held(), 0);
        assert_eq!(sent.waiters(), 0);
    }
}
