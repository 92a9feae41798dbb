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

use std::sync::Arc;
use std::task::{Context, Poll};

use futures_util::future::BoxFuture;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tonic::body::Body;

use super::request_body::{Inspect, Inspected};

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
                match Charge::new(budget, self.size) {
                    Ok(charge) => {
                        http::Request::from_parts(parts, Body::new(Inspected::new(body, charge)))
                    }
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

/// What a request body holds of `budget` (of `size` bytes in all): what it received, and
/// [`ARRIVING_REQUEST_BYTES`] for its stream, until it is dropped.
struct Charge {
    budget: Arc<Semaphore>,
    size: usize,
    held: Option<OwnedSemaphorePermit>,
}

impl Charge {
    /// A body's charge, its stream's taken; refused when the budget has no room for that.
    fn new(budget: Arc<Semaphore>, size: usize) -> Result<Charge, tonic::Status> {
        let mut charge = Charge {
            budget,
            size,
            held: None,
        };
        charge.take(ARRIVING_REQUEST_BYTES)?;
        Ok(charge)
    }

    /// Takes `bytes` more from the budget, or says why not.
    fn take(&mut self, bytes: usize) -> Result<(), tonic::Status> {
        let over = || {
            tonic::Status::resource_exhausted(format!(
                "this client's requests still arriving would hold more than {} bytes in berthd, the most one uid may ({REQUESTS_PER_UID} of the largest request, and {ARRIVING_REQUEST_BYTES} bytes for each request arriving); send fewer requests at once or finish those begun",
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

impl Inspect for Charge {
    fn inspect(&mut self, data: &[u8]) -> Result<(), tonic::Status> {
        match data.len() {
            0 => Ok(()),
            bytes => self.take(bytes),
        }
    }
}

#[cfg(test)]
mod tests {
    use bytes::Bytes;
    use http_body_util::{BodyExt, StreamBody};
    use hyper::body::Frame;

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
        let charge = |budget: &Arc<Semaphore>| Charge::new(Arc::clone(budget), size);
        let mut first = Inspected::new(body(&[30, 30]), charge(&budget).unwrap());
        assert_eq!(
            budget.available_permits(),
            STREAM + 100,
            "its stream's charge"
        );
        first.frame().await.unwrap().unwrap();
        first.frame().await.unwrap().unwrap();
        assert_eq!(budget.available_permits(), STREAM + 40);
        let mut second = Inspected::new(body(&[30, 30]), charge(&budget).unwrap());
        second.frame().await.unwrap().unwrap();
        let over = second.frame().await.unwrap().unwrap_err();
        assert_eq!(over.code(), tonic::Code::ResourceExhausted);
        assert!(
            over.message().contains(&format!("more than {size} bytes")),
            "{over:?}"
        );
        // A third stream finds no room even for its own charge: refused before any frame.
        let third = charge(&budget).err();
        assert_eq!(
            third.map(|refused| refused.code()),
            Some(tonic::Code::ResourceExhausted)
        );
        drop((first, second));
        assert_eq!(budget.available_permits(), size, "all given back");
    }
}
