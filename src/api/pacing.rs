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
//! uid's reading, Events messages and paced answers alike, also holds its bytes of the uid's
//! budget ([`AnswerBytes`], [`answer_bytes_per_uid`]) from before it is made until h2 lets go
//! of the data it went into ([`MadeAhead`]): written to the socket, or dropped with its stream
//! or connection. A paced answer, whose size is known only once made, waits for its bytes in the
//! uid's turn for its method ([`answer_turn`]), so one at a time waits with its answer made.
//! GetStats messages, small and of a size no client chooses, are not counted.
//!
//! Owns: when an answer or a stream's next message is made. Does not own: the socket's room, the
//! places and the byte count (listener, which publishes them with the connection), what is
//! answered (service).

use std::sync::Arc;
use std::task::{Context, Poll};

use bytes::Bytes;
use futures_util::StreamExt;
use futures_util::future::BoxFuture;
use http_body_util::{BodyExt, BodyStream, StreamBody};
use hyper::body::Body as _;
use tonic::Request;
use tonic::body::Body;

#[cfg(doc)]
use crate::model::ANSWERS_AHEAD;
use crate::model::{AnswerBytes, AnswerQueue, ConnectionInfo, Hold, SentBytes, SocketRoom};

/// The methods whose answers grow with what berthd holds (every container, every checkpoint).
const PACED: [&str; 2] = ["/types.API/State", "/types.API/ListCheckpoint"];

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

/// The budget for messages made ahead of the reading of `request`'s uid; none for a request
/// that did not come through the listener (in-process tests).
pub fn answer_budget<T>(request: &Request<T>) -> Option<Arc<AnswerBytes>> {
    request
        .extensions()
        .get::<ConnectionInfo>()
        .map(|connection| Arc::clone(&connection.answer_bytes))
}

/// The uid's turn to make an answer of `queue` and wait for its bytes: taken once the request is
/// in (never across the request's arrival, which the client controls), let go of once the
/// answer holds its bytes.
pub async fn answer_turn(
    budget: &Option<Arc<AnswerBytes>>,
    queue: AnswerQueue,
) -> Option<tokio::sync::OwnedMutexGuard<()>> {
    match budget {
        Some(budget) => Some(budget.making(queue).await),
        None => None,
    }
}

/// `answer`, made in `turn`, once it holds its bytes of `budget` (the turn ends then), with the
/// hold in its extensions for [`AnswerPacingLayer`] to give to its data.
pub async fn held_answer<T: prost::Message>(
    answer: T,
    budget: &Option<Arc<AnswerBytes>>,
    turn: Option<tokio::sync::OwnedMutexGuard<()>>,
) -> tonic::Response<T> {
    let made = MadeAhead::default();
    made.hold(budget, answer.encoded_len()).await;
    drop(turn);
    let mut answer = tonic::Response::new(answer);
    answer.extensions_mut().insert(made);
    answer
}

/// The holds of messages made for one response, each given to the data the message went into
/// ([`AnswerPacingLayer`] takes it from the response's extensions): h2 drops that data once it
/// has written it, or with its stream or connection, and the bytes go back to the budget then.
#[derive(Clone, Debug, Default)]
pub struct MadeAhead(Arc<std::sync::Mutex<Vec<Hold>>>);

impl MadeAhead {
    /// Waits for `bytes` of `budget` for a message about to be made for this response.
    pub async fn hold(&self, budget: &Option<Arc<AnswerBytes>>, bytes: usize) {
        if let Some(budget) = budget {
            let hold = budget.take(bytes).await;
            self.holds().push(hold);
        }
    }

    fn holds(&self) -> std::sync::MutexGuard<'_, Vec<Hold>> {
        self.0.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// `body`, each of its data carrying the holds of the messages made before it: all of them
    /// went into it or into data before it.
    fn given_to(self, body: Body) -> Body {
        Body::new(body.map_frame(move |frame| {
            frame.map_data(|data| {
                let holds = std::mem::take(&mut *self.holds());
                if holds.is_empty() {
                    data
                } else {
                    Bytes::from_owner(HeldData {
                        data,
                        _holds: holds,
                    })
                }
            })
        }))
    }
}

/// Data h2 has yet to write, and the holds of the messages in it.
struct HeldData {
    data: Bytes,
    _holds: Vec<Hold>,
}

impl AsRef<[u8]> for HeldData {
    fn as_ref(&self) -> &[u8] {
        &self.data
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
            let answer = self.inner.call(request);
            return Box::pin(async move { Ok(with_holds(answer.await?)) });
        };
        // The service made ready is the one called, later: a clone takes its place.
        let ready = self.inner.clone();
        let mut inner = std::mem::replace(&mut self.inner, ready);
        Box::pin(async move {
            let places = Arc::clone(&connection.answers);
            let Ok(place) = places.acquire_owned().await else {
                return Ok(with_holds(inner.call(request).await?));
            };
            let (parts, body) = with_holds(inner.call(request).await?).into_parts();
            // An answer with no body (an error, whose status is in its headers) has nothing to
            // pace, and wrapped it would no longer say it has ended: hyper would send its headers
            // without END_STREAM and then an empty DATA frame, which grpc-go takes for a stream
            // ended without trailers (INTERNAL instead of the error's code).
            let body = if body.is_end_stream() {
                body
            } else {
                held_until_sent(body, place, connection.sent)
            };
            Ok(http::Response::from_parts(parts, body))
        })
    }
}

/// `answer` with the holds its service left in its extensions ([`MadeAhead`]) given to its data.
/// An answer with no body keeps it (see above) and lets its holds go.
fn with_holds(answer: http::Response<Body>) -> http::Response<Body> {
    let (mut parts, body) = answer.into_parts();
    let body = match parts.extensions.remove::<MadeAhead>() {
        Some(made) if !body.is_end_stream() => made.given_to(body),
        _ => body,
    };
    http::Response::from_parts(parts, body)
}

/// `body`, holding `place` until the socket has taken as many bytes as it had taken when the
/// answer's last data was made, plus that data: the answer's end (its trailers) waits for that.
/// A body dropped first (the stream reset, the connection gone) gives the place back with it.
fn held_until_sent(
    body: Body,
    place: tokio::sync::OwnedSemaphorePermit,
    sent: Arc<SentBytes>,
) -> Body {
    struct Answer {
        frames: BodyStream<Body>,
        place: Option<tokio::sync::OwnedSemaphorePermit>,
        sent: Arc<SentBytes>,
        made: u64,
        mark: u64,
    }
    let answer = Answer {
        frames: BodyStream::new(body),
        place: Some(place),
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

    use super::*;

    const PATIENCE: Duration = Duration::from_millis(200);

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
        let mut body = held_until_sent(answer(64 * 1024), place, Arc::clone(&sent));
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
        sent.add(1);
        let end = tokio::time::timeout(PATIENCE, end)
            .await
            .expect("not ended once taken");
        assert_eq!(end.unwrap(), Some(true));
        assert_eq!(places.available_permits(), 1);
    }

    #[tokio::test]
    async fn a_messages_bytes_come_back_when_the_data_it_went_into_is_dropped() {
        let budget = Some(Arc::new(AnswerBytes::new(100)));
        let made = MadeAhead::default();
        made.hold(&budget, 60).await;
        let mut body = made.clone().given_to(answer(10));
        let held = |budget: &Option<Arc<AnswerBytes>>| budget.as_ref().unwrap().held();
        assert_eq!(held(&budget), 60, "held before its data is made");
        let data = body.frame().await.unwrap().unwrap().into_data().unwrap();
        drop(body);
        assert_eq!(
            held(&budget),
            60,
            "given back while its data was still held"
        );
        let copy = data.slice(2..4);
        drop(data);
        assert_eq!(
            held(&budget),
            60,
            "given back while a piece of its data was still held"
        );
        drop(copy);
        assert_eq!(held(&budget), 0);
        // A message larger than the budget waits for all of it, and none is lost on the way.
        made.hold(&budget, 1000).await;
        assert_eq!(held(&budget), 100);
        drop(made);
        assert_eq!(
            held(&budget),
            0,
            "holds given to no data go with the response"
        );
    }

    #[tokio::test]
    async fn a_small_answer_gives_its_place_back_once_made() {
        let sent = Arc::new(SentBytes::default());
        let places = Arc::new(tokio::sync::Semaphore::new(1));
        let place = Arc::clone(&places).try_acquire_owned().unwrap();
        let body = held_until_sent(answer(100), place, sent);
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
        let mut body = held_until_sent(answer(64 * 1024), place, Arc::clone(&sent));
        body.frame().await.unwrap().unwrap();
        assert!(tokio::time::timeout(PATIENCE, body.frame()).await.is_err());
        assert_eq!(places.available_permits(), 0);
        drop(body);
        assert_eq!(places.available_permits(), 1);
        assert_eq!(sent.waiters(), 0);
    }
}
