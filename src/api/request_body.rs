//! A request body looked at chunk by chunk as it arrives, by what bounds requests, which may
//! end it with an error: tonic then answers that error before any handler runs.
//!
//! Owns: the body wrapper. Does not own: what is looked for (request_budget, one_message).

use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::Bytes;
use hyper::body::{Frame, SizeHint};
use tonic::body::Body;

/// What looks at each chunk of a request's data as it arrives.
pub trait Inspect: Send + Unpin + 'static {
    /// Looks at the next chunk; an error ends the body with it.
    fn inspect(&mut self, data: &[u8]) -> Result<(), tonic::Status>;
}

/// `body`, each chunk of its data shown to `inspector` before it is passed on.
pub struct Inspected<I> {
    body: Body,
    inspector: I,
}

impl<I: Inspect> Inspected<I> {
    pub fn new(body: Body, inspector: I) -> Inspected<I> {
        Inspected { body, inspector }
    }
}

impl<I: Inspect> hyper::body::Body for Inspected<I> {
    type Data = Bytes;
    type Error = tonic::Status;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, tonic::Status>>> {
        let frame = std::task::ready!(Pin::new(&mut self.body).poll_frame(cx));
        if let Some(Ok(frame)) = &frame
            && let Some(data) = frame.data_ref()
            && let Err(refused) = self.inspector.inspect(data)
        {
            return Poll::Ready(Some(Err(refused)));
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
