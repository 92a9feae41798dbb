//! The connection's edge: each accepted stream is wrapped in an [`Edge`] before h2 reads it, so a
//! client that sends its socket path (or anything else h2 refuses) as `:authority` is served like
//! one that sends `localhost` (hyperium/h2#442). Only the client-to-server direction changes;
//! what berthd writes goes to the socket untouched.
//!
//! Owns: the wrapper and its buffering. Does not own: framing and the rewrite ([`rewriter`],
//! [`authority`], [`hpack`], [`frames`]), accepting connections, or HTTP/2 itself (h2).

mod authority;
mod frames;
mod hpack;
mod rewriter;

use std::collections::VecDeque;
use std::future::Future;
use std::io;
use std::pin::Pin;
use std::task::{Context, Poll, ready};
use std::time::Duration;

use bytes::{Buf, Bytes, BytesMut};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tonic::transport::server::Connected;

pub use authority::MAX_HEADER_LIST_SIZE;
pub use rewriter::{EdgeError, Rewriter};

/// How much one read from the socket takes at most.
const READ_CHUNK: usize = 16 * 1024;

/// An accepted stream whose incoming HTTP/2 header blocks carry an `:authority` h2 accepts.
/// A client that breaks HTTP/2 in a way the edge cannot follow gets its connection closed.
pub struct Edge<S> {
    inner: S,
    rewriter: Rewriter,
    /// Read from the socket, not yet through the rewriter.
    input: BytesMut,
    /// Through the rewriter, not yet read by h2.
    output: VecDeque<Bytes>,
    scratch: Box<[u8]>,
    state: ReadState,
    /// Until the client's preface is through: h2's keepalive starts only after it, so a client
    /// that sent part of it would otherwise hold its connection for as long as it likes.
    preface_deadline: Option<Pin<Box<tokio::time::Sleep>>>,
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum ReadState {
    Open,
    Eof,
    Failed,
}

impl<S> Edge<S> {
    /// Wraps `inner`, whose client must have sent the whole HTTP/2 preface within
    /// `preface_within`. Must be called inside the tokio runtime.
    pub fn new(inner: S, preface_within: Duration) -> Self {
        Edge {
            inner,
            rewriter: Rewriter::default(),
            input: BytesMut::new(),
            output: VecDeque::new(),
            scratch: vec![0; READ_CHUNK].into_boxed_slice(),
            state: ReadState::Open,
            preface_deadline: Some(Box::pin(tokio::time::sleep(preface_within))),
        }
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for Edge<S> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        loop {
            if let Some(chunk) = this.output.front_mut() {
                let n = chunk.len().min(buf.remaining());
                buf.put_slice(&chunk[..n]);
                chunk.advance(n);
                if chunk.is_empty() {
                    this.output.pop_front();
                }
                return Poll::Ready(Ok(()));
            }
            match this.state {
                ReadState::Open => {}
                ReadState::Eof => return Poll::Ready(Ok(())),
                ReadState::Failed => return Poll::Ready(Err(closed())),
            }
            if let Some(deadline) = &mut this.preface_deadline {
                if this.rewriter.past_preface() {
                    this.preface_deadline = None;
                } else if deadline.as_mut().poll(cx).is_ready() {
                    tracing::debug!(
                        "closing a client connection that sent no whole HTTP/2 preface within --handshake-timeout"
                    );
                    this.state = ReadState::Failed;
                    return Poll::Ready(Err(closed()));
                }
            }
            let mut read = ReadBuf::new(&mut this.scratch);
            ready!(Pin::new(&mut this.inner).poll_read(cx, &mut read))?;
            if read.filled().is_empty() {
                // A header block cut short stays behind: h2 sees the stream end mid-frame.
                this.state = ReadState::Eof;
                continue;
            }
            this.input.extend_from_slice(read.filled());
            if let Err(e) = this.rewriter.feed(&mut this.input, &mut this.output) {
                // Debug, not warn: a client could have berthd log a line per connection.
                tracing::debug!(error = %e, "closing a client connection that broke HTTP/2");
                this.state = ReadState::Failed;
                this.output.clear();
                return Poll::Ready(Err(closed()));
            }
        }
    }
}

fn closed() -> io::Error {
    io::Error::new(
        io::ErrorKind::InvalidData,
        "connection closed by berthd's edge",
    )
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Edge<S> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_shutdown(cx)
    }
}

/// Peer credentials and addresses are the inner stream's.
impl<S: Connected> Connected for Edge<S> {
    type ConnectInfo = S::ConnectInfo;

    fn connect_info(&self) -> Self::ConnectInfo {
        self.inner.connect_info()
    }
}

/// The tests' HPACK encoder, shared with the integration tests.
#[cfg(test)]
#[path = "../../tests/it/common/hpack.rs"]
mod test_hpack;
#[cfg(test)]
mod tests;
