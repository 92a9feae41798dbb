//! What one uid's requests may hold in berthd while they arrive. tonic keeps a request's bytes
//! until its whole message is in, and h2 lets the client go on sending as tonic takes them: a
//! client that announces messages as large as a request may be and never finishes them would
//! hold that much on every stream of every connection it may open. So each request body holds
//! what it has received from its uid's budget ([`crate::model::ConnectionInfo`]'s
//! `request_bytes`, shared by the uid's connections, one of its own for each of root's) until
//! tonic drops it, its message decoded; a request that would take the budget past its size
//! fails with RESOURCE_EXHAUSTED instead of waiting, since requests that each wait for the
//! others' bytes would wait for good.
//!
//! Owns: that accounting and the budget's size. Does not own: handing budgets to connections
//! (listener), the request's size limit (grpc_message).

use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use bytes::Bytes;
use futures_util::future::BoxFuture;
use hyper::body::{Frame, SizeHint};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tonic::body::Body;

use crate::model::ConnectionInfo;

/// Largest requests one uid may have arriving at once.
const REQUESTS_PER_UID: usize = 16;

/// What a request still arriving holds beside its bytes, and is charged from its first frame
/// until tonic drops its body: h2's and tonic's state for its stream, about 3.6 KB measured (a
/// member's 32768 streams that sent their headers and never their message took berthd from 12
/// to 118 MB, and held it for as long as their connections answered pings).
const ARRIVING_REQUEST_BYTES: usize = 4096;

/// A uid's budget when a request may be `request_bytes` long.
pub fn per_uid(request_bytes: usize) -> usize {
    request_bytes
        .saturating_add(ARRIVING_REQUEST_BYTES)
        .saturating_mul(REQUESTS_PER_UID)
}

/// Holds every request body to its connection's budget, of `size` bytes (for messages).
#[derive(Clone, Copy, Debug)]
pub struct RequestBudgetLayer {
    pub size: usize,
}

impl<S> tower::Layer<S> for RequestBudgetLayer {
    type Service = RequestBudget<S>;

    fn layer(&self, inner: S) -> Self::Service {
        RequestBudget {
            inner,
            size: self.size,
        }
    }
}

#[derive(Clone, Debug)]
pub struct RequestBudget<S> {
    inner: S,
    size: usize,
}

impl<S> tower::Service<http::Request<Body>> for RequestBudget<S>
where
    S: tower::Service<http::Request<Body>, Response = http::Response<Body>> + Send + 'static,
    S::Future: Send + 'static,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = BoxFuture<'static, Result<S::Response, S::Error>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: http::Request<Body>) -> Self::Future {
        let budget = request
            .extensions()
            .get::<ConnectionInfo>()
            .map(|connection| Arc::clone(&connection.request_bytes));
        let request = match budget {
            Some(budget) => {
                let (parts, body) = request.into_parts();
                match Budgeted::new(body, budget, self.size) {
                    Ok(body) => http::Request::from_parts(parts, Body::new(body)),
                    // At once, before any layer within holds the stream waiting for its turn.
                    Err(refused) => return Box::pin(async move { Ok(refused.into_http()) }),
                }
            }
            // In-process tests, not through the listener.
            None => request,
        };
        Box::pin(self.inner.call(request))
    }
}

/// A request body that holds what it received from `budget` (of `size` bytes in all), and
/// [`ARRIVING_REQUEST_BYTES`] for its stream, until it is dropped.
struct Budgeted {
    body: Body,
    budget: Arc<Semaphore>,
    size: usize,
    held: Option<OwnedSemaphorePermit>,
}

impl Budgeted {
    /// The body, charged for its stream; refused when the budget has no room for that.
    fn new(body: Body, budget: Arc<Semaphore>, size: usize) -> Result<Budgeted, tonic::Status> {
        let mut budgeted = Budgeted {
            body,
            budget,
            size,
            held: None,
        };
        budgeted.take(ARRIVING_REQUEST_BYTES)?;
        Ok(budgeted)
    }

    /// Takes `bytes` more from the budget, or says why not.
    fn take(&mut self, bytes: usize) -> Result<(), tonic::Status> {
        let over = || {
            tonic::Status::resource_exhausted(format!(
                "this client's requests still arriving would hold more than {} bytes in berthd, the most one uid may ({REQUESTS_PER_UID} of the largest request); send fewer large requests at once or finish those begun",
                self.size
            ))
        };
        let bytes = u32::try_from(bytes).map_err(|_| over())?;
        let taken = Arc::clone(&self.budget)
            .try_acquire_many_owned(bytes)
            .map_err(|_| over())?;
        match &mut self.held {
            Some(held) => held.merge(taken),
            None => self.held = Some(taken),
        }
        Ok(())
    }
}

impl hyper::body::Body for Budgeted {
    type Data = Bytes;
    type Error = tonic::Status;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, tonic::Status>>> {
        let frame = std::task::ready!(Pin::new(&mut self.body).poll_frame(cx));
        if let Some(Ok(frame)) = &frame
            && let Some(data) = frame.data_ref()
            && !data.is_empty()
            && let Err(over) = self.take(data.len())
        {
            return Poll::Ready(Some(Err(over)));
        }
        Poll::Ready(frame)
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.body.size_hint()
    }
}

#[cfg(test)]
mod tests {
    use http_body_util::{BodyExt, StreamBody};

    use super::*;

    fn body(chunks: &[usize]) -> Body {
        let frames: Vec<Result<Frame<Bytes>, tonic::Status>> = chunks
            .iter()
            .map(|&len| Ok(Frame::data(Bytes::from(vec![0u8; len]))))
            .collect();
        Body::new(StreamBody::new(futures_util::stream::iter(frames)))
    }

    #[tokio::test]
    async fn a_request_holds_what_it_received_until_dropped_and_none_passes_the_budget() {
        const STREAM: usize = ARRIVING_REQUEST_BYTES;
        let size = 2 * STREAM + 100;
        let budget = Arc::new(Semaphore::new(size));
        let mut first = Budgeted::new(body(&[30, 30]), Arc::clone(&budget), size).unwrap();
        assert_eq!(
            budget.available_permits(),
            STREAM + 100,
            "its stream's charge"
        );
        first.frame().await.unwrap().unwrap();
        first.frame().await.unwrap().unwrap();
        assert_eq!(budget.available_permits(), STREAM + 40);
        let mut second = Budgeted::new(body(&[30, 30]), Arc::clone(&budget), size).unwrap();
        second.frame().await.unwrap().unwrap();
        let over = second.frame().await.unwrap().unwrap_err();
        assert_eq!(over.code(), tonic::Code::ResourceExhausted);
        assert!(
            over.message().contains(&format!("more than {size} bytes")),
            "{over:?}"
        );
        // A third stream finds no room even for its own charge: refused before any frame.
        let third = Budgeted::new(body(&[1]), Arc::clone(&budget), size).err();
        assert_eq!(
            third.map(|refused| refused.code()),
            Some(tonic::Code::ResourceExhausted)
        );
        drop((first, second));
        assert_eq!(budget.available_permits(), size, "all given back");
    }
}
