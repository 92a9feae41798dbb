//! An accepted API connection's socket, registered with the reactor for reading only.
//!
//! tokio's `UnixStream` registers for writing as well, and a socket registered for writing wakes
//! the reactor each time the client reads a response (the kernel signals the space it freed): a
//! wake-up of an idle worker per response and per streamed event, for nothing. Here writes go
//! straight to the socket; only one that finds it full waits for space, on a second descriptor
//! of the socket registered for writing while it waits.
//!
//! Owns: the socket's reads, writes and readiness, and its peer's credentials as read at
//! accept. Does not own: accepting ([`super`]), what is read or written (h2, the edge).

use std::io;
use std::os::fd::{AsFd, OwnedFd};
use std::pin::Pin;
use std::task::{Context, Poll, ready};

use rustix::net::{SendAncillaryBuffer, SendFlags};
use tokio::io::unix::AsyncFd;
use tokio::io::{AsyncRead, AsyncWrite, Interest, ReadBuf};

/// What `SO_PEERCRED` said of a connection's peer when it was accepted; `None` when it could not
/// be read. tonic attaches it to every request of the connection.
#[derive(Debug, Clone, Copy)]
pub struct PeerCredentials(pub Option<nix::sys::socket::UnixCredentials>);

pub struct ApiSocket {
    socket: AsyncFd<OwnedFd>,
    /// While a write waits for space: a duplicate of the socket registered for writing, dropped
    /// (and so deregistered) once that write is through.
    space: Option<AsyncFd<OwnedFd>>,
    credentials: PeerCredentials,
}

impl ApiSocket {
    /// Takes an accepted, non-blocking socket. Must be called inside the tokio runtime.
    pub fn new(socket: OwnedFd) -> io::Result<Self> {
        // nix, not rustix: the kernel gives pid 0 for a peer outside berthd's pid namespace, which
        // rustix's `UCred` (a non-zero pid) cannot hold.
        let credentials =
            nix::sys::socket::getsockopt(&socket, nix::sys::socket::sockopt::PeerCredentials);
        let credentials = PeerCredentials(credentials.ok());
        Ok(ApiSocket {
            socket: crate::reactor::register(socket, Interest::READABLE)?,
            space: None,
            credentials,
        })
    }

    /// Waits until the peer has sent something; false when it closed first or failed. Readiness
    /// alone is not proof (tokio may report it spuriously), so the data is peeked at.
    pub async fn first_bytes(&self) -> bool {
        let flags = rustix::net::RecvFlags::PEEK | rustix::net::RecvFlags::DONTWAIT;
        loop {
            let Ok(mut ready) = self.socket.readable().await else {
                return false;
            };
            match ready.try_io(|s| Ok(rustix::net::recv(s, &mut [0u8; 1], flags)?.0)) {
                Ok(peeked) => return peeked.is_ok_and(|n| n > 0),
                Err(_would_block) => continue,
            }
        }
    }

    /// Sends with `send`, straight to the socket unless a write is already waiting for space.
    fn poll_send(
        &mut self,
        cx: &mut Context<'_>,
        send: impl Fn(&OwnedFd) -> rustix::io::Result<usize>,
    ) -> Poll<io::Result<usize>> {
        let space = if let Some(space) = &self.space {
            space
        } else {
            match send(self.socket.get_ref()) {
                Err(rustix::io::Errno::AGAIN) => {}
                sent => return Poll::Ready(sent.map_err(io::Error::from)),
            }
            let duplicate =
                crate::reactor::register_duplicate(self.socket.as_fd(), Interest::WRITABLE)?;
            &*self.space.insert(duplicate)
        };
        let sent = loop {
            let mut ready = ready!(space.poll_write_ready(cx))?;
            if let Ok(sent) = ready.try_io(|s| Ok(send(s.get_ref())?)) {
                break sent;
            }
        };
        self.space = None;
        Poll::Ready(sent)
    }
}

impl AsyncRead for ApiSocket {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        loop {
            let mut ready = ready!(self.socket.poll_read_ready(cx))?;
            let unfilled = buf.initialize_unfilled();
            let wanted = unfilled.len();
            if let Ok(read) = ready.try_io(|s| Ok(rustix::io::read(s, &mut *unfilled)?)) {
                let read = read?;
                if 0 < read && read < wanted {
                    // A short read emptied the socket: the next read waits for new data instead
                    // of finding out with EAGAIN (data that came meanwhile is a new edge).
                    ready.clear_ready();
                }
                buf.advance(read);
                return Poll::Ready(Ok(()));
            }
        }
    }
}

impl AsyncWrite for ApiSocket {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        // NOSIGNAL: a client gone mid-response is an error for this connection, not a signal.
        self.get_mut()
            .poll_send(cx, |s| rustix::net::send(s, buf, SendFlags::NOSIGNAL))
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        self.get_mut().poll_send(cx, |s| {
            let mut no_control = SendAncillaryBuffer::default();
            rustix::net::sendmsg(s, bufs, &mut no_control, SendFlags::NOSIGNAL)
        })
    }

    fn is_write_vectored(&self) -> bool {
        true
    }

    fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
        let shutdown = rustix::net::shutdown(self.socket.get_ref(), rustix::net::Shutdown::Write);
        Poll::Ready(shutdown.map_err(io::Error::from))
    }
}

impl tonic::transport::server::Connected for ApiSocket {
    type ConnectInfo = PeerCredentials;

    fn connect_info(&self) -> PeerCredentials {
        self.credentials
    }
}

impl AsFd for ApiSocket {
    fn as_fd(&self) -> std::os::fd::BorrowedFd<'_> {
        self.socket.as_fd()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tonic::transport::server::Connected;

    /// berthd's end as an [`ApiSocket`], the client's as a tokio stream.
    fn pair() -> (ApiSocket, tokio::net::UnixStream) {
        let (server, client) = std::os::unix::net::UnixStream::pair().unwrap();
        server.set_nonblocking(true).unwrap();
        client.set_nonblocking(true).unwrap();
        let server = ApiSocket::new(server.into()).unwrap();
        (server, tokio::net::UnixStream::from_std(client).unwrap())
    }

    #[tokio::test]
    async fn a_write_larger_than_the_socket_waits_for_space_then_deregisters_it() {
        let (mut server, mut client) = pair();
        let sent: Vec<u8> = (0..4 << 20).map(|i| (i % 251) as u8).collect();
        let expected = sent.clone();
        let writer = tokio::spawn(async move {
            server.write_all(&sent).await.unwrap();
            server.flush().await.unwrap();
            server
        });
        let mut received = vec![0u8; expected.len()];
        let read = tokio::time::timeout(Duration::from_secs(30), client.read_exact(&mut received));
        read.await.expect("the write stalled").unwrap();
        assert!(received == expected, "the bytes arrived changed");
        let server = writer.await.unwrap();
        assert!(
            server.space.is_none(),
            "the write descriptor outlived the wait"
        );
    }

    #[tokio::test]
    async fn reads_see_what_the_client_wrote_and_its_end() {
        let (mut server, mut client) = pair();
        client.write_all(b"hello").await.unwrap();
        assert!(server.first_bytes().await);
        let mut received = Vec::new();
        client.shutdown().await.unwrap();
        server.read_to_end(&mut received).await.unwrap();
        assert_eq!(received, b"hello", "the peeked byte must still be read");
    }

    #[tokio::test]
    async fn a_peer_that_closes_without_a_word_never_spoke() {
        let (server, client) = pair();
        drop(client);
        assert!(!server.first_bytes().await);
    }

    #[tokio::test]
    async fn the_peer_credentials_are_the_connecting_process() {
        let (server, _client) = pair();
        let credentials = server.connect_info().0.expect("SO_PEERCRED");
        assert_eq!(credentials.pid(), std::process::id() as i32);
        assert_eq!(credentials.uid(), rustix::process::getuid().as_raw());
    }
}
