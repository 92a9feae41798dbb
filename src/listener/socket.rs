//! An accepted API connection's socket, registered with the reactor for reading only.
//!
//! tokio's `UnixStream` registers for writing as well, and a socket registered for writing wakes
//! the reactor each time the client reads a response (the kernel signals the space it freed): a
//! wake-up of an idle worker per response and per streamed event, for nothing. Here writes go
//! straight to the socket; only one that finds it full waits for space, on a second descriptor
//! of the socket registered for writing, kept until a write goes through whole. Where no
//! descriptor can be had for that (the open file limit, the epoll watch limit), the send is
//! retried after a pause instead of failing the connection.
//!
//! Whether the socket has room ([`SocketRoom`]), and how many bytes it took ([`SentBytes`]), are
//! published with the connection ([`ConnectionInfo`]): the api makes answers and stream messages
//! only as the client reads them (`api::pacing`), since h2 would take them as far as the
//! client's flow-control windows allow.
//!
//! Owns: the socket's reads, writes and readiness, and its peer's credentials as read at
//! accept. Does not own: accepting ([`super`]), what is read or written (h2, the edge).

use std::future::Future;
use std::io;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::pin::Pin;
use std::task::{Context, Poll, ready};
use std::time::Duration;

use rustix::net::{SendAncillaryBuffer, SendFlags};
use tokio::io::unix::AsyncFd;
use tokio::io::{AsyncRead, AsyncWrite, Interest, ReadBuf};

use crate::model::{
    ANSWERS_AHEAD, AnswerBytes, ConnectionInfo, PeerCredentials, SentBytes, SocketRoom,
};

/// How long a write waits before it tries again when it found the socket full and could not
/// register a descriptor to wait for space on.
const SEND_RETRY: Duration = Duration::from_millis(5);

/// At most this many slices go to one `sendmsg` (the kernel's `UIO_MAXIOV`; more fail with
/// `EMSGSIZE`).
const MAX_SLICES: usize = 1024;

pub struct ApiSocket {
    socket: AsyncFd<OwnedFd>,
    /// How the write in progress waits for space; `None` while writes go straight through.
    waiting: Option<SpaceWait>,
    credentials: PeerCredentials,
    /// False from a send that found the socket full until one goes through whole.
    room: tokio::sync::watch::Sender<bool>,
    /// The connection's places for answers made ahead of the client ([`ConnectionInfo`]).
    answers: std::sync::Arc<tokio::sync::Semaphore>,
    /// Bytes sent, all told ([`ConnectionInfo`]).
    sent: std::sync::Arc<SentBytes>,
    /// The peer's budget for requests still arriving ([`ConnectionInfo`]), set once its uid's
    /// place is taken.
    request_bytes: std::sync::Arc<tokio::sync::Semaphore>,
    /// The peer's budget for answers made ahead of its reading ([`ConnectionInfo`]), set with
    /// `request_bytes`.
    answer_bytes: std::sync::Arc<AnswerBytes>,
}

enum SpaceWait {
    /// A duplicate of the socket registered for writing.
    Writable(AsyncFd<OwnedFd>),
    /// No descriptor could be registered: try the send again after [`SEND_RETRY`].
    Pause(Pin<Box<tokio::time::Sleep>>),
}

impl SpaceWait {
    fn start(socket: BorrowedFd<'_>) -> SpaceWait {
        match crate::reactor::register_duplicate(socket, Interest::WRITABLE) {
            Ok(duplicate) => SpaceWait::Writable(duplicate),
            Err(e) => {
                tracing::debug!(error = %e, "no descriptor to wait for space on; retrying the send shortly");
                SpaceWait::Pause(Box::pin(tokio::time::sleep(SEND_RETRY)))
            }
        }
    }
}

impl ApiSocket {
    /// Takes an accepted, non-blocking socket. Must be called inside the tokio runtime.
    pub fn new(socket: OwnedFd) -> io::Result<Self> {
        // nix, not rustix: the kernel gives pid 0 for a peer outside berthd's pid namespace, which
        // rustix's `UCred` (a non-zero pid) cannot hold.
        let credentials =
            nix::sys::socket::getsockopt(&socket, nix::sys::socket::sockopt::PeerCredentials);
        let groups = match super::peer_groups::of(socket.as_fd()) {
            Ok(groups) => Some(groups.into()),
            Err(e) => {
                tracing::debug!(error = %e, "no SO_PEERGROUPS; the peer's groups come from /proc");
                None
            }
        };
        let credentials = match credentials {
            Ok(credentials) => PeerCredentials(Some(credentials), groups),
            Err(e) => {
                tracing::warn!(error = %e, "could not read a connection's peer credentials; its requests will be refused");
                PeerCredentials(None, None)
            }
        };
        Ok(ApiSocket {
            socket: crate::reactor::register(socket, Interest::READABLE)?,
            waiting: None,
            credentials,
            room: tokio::sync::watch::Sender::new(true),
            answers: std::sync::Arc::new(tokio::sync::Semaphore::new(ANSWERS_AHEAD)),
            sent: std::sync::Arc::default(),
            request_bytes: std::sync::Arc::new(tokio::sync::Semaphore::new(0)),
            answer_bytes: std::sync::Arc::new(AnswerBytes::new(0)),
        })
    }

    /// Gives the connection its peer's budgets.
    pub fn set_budgets(&mut self, budgets: super::Budgets) {
        self.request_bytes = budgets.request_bytes;
        self.answer_bytes = budgets.answer_bytes;
    }

    /// The peer's uid, as `SO_PEERCRED` gave it at accept.
    pub fn peer_uid(&self) -> Option<u32> {
        self.credentials.0.map(|c| c.uid())
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

    /// Tells the connection's streams whether the socket has room, if that changed.
    fn tell_room(&self, has_room: bool) {
        self.room
            .send_if_modified(|room| std::mem::replace(room, has_room) != has_room);
    }

    /// Sends `len` bytes with `send`: straight to the socket unless a write is waiting for space.
    fn poll_send(
        &mut self,
        cx: &mut Context<'_>,
        len: usize,
        send: impl Fn(&OwnedFd) -> rustix::io::Result<usize>,
    ) -> Poll<io::Result<usize>> {
        loop {
            match &mut self.waiting {
                None => match send(self.socket.get_ref()) {
                    Err(rustix::io::Errno::AGAIN) => {
                        self.tell_room(false);
                        self.waiting = Some(SpaceWait::start(self.socket.as_fd()));
                    }
                    sent => {
                        if let Ok(n) = sent {
                            self.sent.add(n);
                            if n == len {
                                self.tell_room(true);
                            }
                        }
                        return Poll::Ready(sent.map_err(io::Error::from));
                    }
                },
                Some(SpaceWait::Writable(space)) => {
                    let mut ready = ready!(space.poll_write_ready(cx))?;
                    let Ok(sent) = ready.try_io(|s| Ok(send(s.get_ref())?)) else {
                        continue;
                    };
                    if let Ok(n) = sent {
                        self.sent.add(n);
                    }
                    match sent {
                        // Filled again: the next write waits for space at once.
                        Ok(n) if n < len => ready.clear_ready(),
                        Ok(_) => {
                            self.waiting = None;
                            self.tell_room(true);
                        }
                        Err(_) => {}
                    }
                    return Poll::Ready(sent);
                }
                Some(SpaceWait::Pause(pause)) => {
                    // Then the send is tried again as a first one is.
                    ready!(pause.as_mut().poll(cx));
                    self.waiting = None;
                }
            }
        }
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
        self.get_mut().poll_send(cx, buf.len(), |s| {
            rustix::net::send(s, buf, SendFlags::NOSIGNAL)
        })
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let bufs = &bufs[..bufs.len().min(MAX_SLICES)];
        let len = bufs.iter().map(|b| b.len()).sum();
        self.get_mut().poll_send(cx, len, |s| {
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
    type ConnectInfo = ConnectionInfo;

    fn connect_info(&self) -> ConnectionInfo {
        ConnectionInfo {
            credentials: self.credentials.clone(),
            room: SocketRoom(self.room.subscribe()),
            answers: std::sync::Arc::clone(&self.answers),
            sent: std::sync::Arc::clone(&self.sent),
            request_bytes: std::sync::Arc::clone(&self.request_bytes),
            answer_bytes: std::sync::Arc::clone(&self.answer_bytes),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::task::{Wake, Waker};
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tonic::transport::server::Connected;

    const LIMIT: Duration = Duration::from_secs(30);

    /// berthd's end as an [`ApiSocket`] with a small send buffer (so writes fill it), the
    /// client's as a tokio stream.
    fn pair() -> (ApiSocket, tokio::net::UnixStream) {
        let (server, client) = std::os::unix::net::UnixStream::pair().unwrap();
        rustix::net::sockopt::set_socket_send_buffer_size(&server, 4096).unwrap();
        server.set_nonblocking(true).unwrap();
        client.set_nonblocking(true).unwrap();
        let server = ApiSocket::new(server.into()).unwrap();
        (server, tokio::net::UnixStream::from_std(client).unwrap())
    }

    /// Counts its wake-ups.
    #[derive(Default)]
    struct Wakes(AtomicUsize);

    impl Wake for Wakes {
        fn wake(self: Arc<Self>) {
            self.0.fetch_add(1, Ordering::SeqCst);
        }
    }

    #[tokio::test]
    async fn a_write_to_a_full_socket_waits_is_woken_by_space_and_then_goes_straight_through() {
        let (mut server, mut client) = pair();
        let wakes = Arc::new(Wakes::default());
        let waker = Waker::from(Arc::clone(&wakes));
        let mut cx = Context::from_waker(&waker);
        let chunk = vec![7u8; 64 << 10];
        let written = fill(&mut server);
        assert!(matches!(server.waiting, Some(SpaceWait::Writable(_))));
        // Nothing freed: polling again neither spins nor wakes.
        assert!(
            Pin::new(&mut server)
                .poll_write(&mut cx, &chunk)
                .is_pending()
        );
        assert_eq!(
            wakes.0.load(Ordering::SeqCst),
            0,
            "woken with the socket still full"
        );

        let mut received = vec![0u8; written];
        let drained = tokio::time::timeout(LIMIT, client.read_exact(&mut received));
        drained.await.expect("the client could not drain").unwrap();
        let woken = async {
            while wakes.0.load(Ordering::SeqCst) == 0 {
                tokio::time::sleep(Duration::from_millis(1)).await;
            }
        };
        tokio::time::timeout(LIMIT, woken)
            .await
            .expect("the freed space never woke the write");
        let Poll::Ready(sent) = Pin::new(&mut server).poll_write(&mut cx, b"after") else {
            panic!("still waiting with the socket drained")
        };
        assert_eq!(sent.unwrap(), 5);
        assert!(
            server.waiting.is_none(),
            "the write descriptor outlived the wait"
        );
    }

    #[tokio::test]
    async fn the_connection_is_told_what_was_sent_when_the_socket_fills_and_when_it_has_room_again()
    {
        let (mut server, mut client) = pair();
        let connection = server.connect_info();
        let SocketRoom(mut room) = connection.room;
        assert!(*room.borrow_and_update());
        let written = fill(&mut server);
        let sent_all = || connection.sent.count();
        assert_eq!(sent_all(), written as u64);
        assert!(room.has_changed().unwrap(), "not told the socket is full");
        assert!(!*room.borrow_and_update());
        let mut received = vec![0u8; written];
        client.read_exact(&mut received).await.unwrap();
        let sent = tokio::time::timeout(LIMIT, server.write(b"after")).await;
        assert_eq!(sent.expect("the write never went").unwrap(), 5);
        assert_eq!(sent_all(), written as u64 + 5);
        assert!(room.has_changed().unwrap(), "not told of the room");
        assert!(*room.borrow_and_update());
        drop(server);
        assert!(
            room.changed().await.is_err(),
            "the connection's end is not told"
        );
    }

    /// Writes until the socket is full; returns how much went in.
    fn fill(server: &mut ApiSocket) -> usize {
        let mut cx = Context::from_waker(Waker::noop());
        let chunk = vec![7u8; 64 << 10];
        let mut written = 0;
        while let Poll::Ready(sent) = Pin::new(&mut *server).poll_write(&mut cx, &chunk) {
            written += sent.unwrap();
            assert!(written < 64 << 20, "the socket never filled");
        }
        written
    }

    #[tokio::test]
    async fn without_a_descriptor_to_wait_on_a_write_is_tried_again_after_a_pause() {
        let (mut server, mut client) = pair();
        let written = fill(&mut server);
        // As when registering the duplicate failed (no descriptor left).
        server.waiting = Some(SpaceWait::Pause(Box::pin(tokio::time::sleep(SEND_RETRY))));
        let mut received = vec![0u8; written];
        client.read_exact(&mut received).await.unwrap();
        let sent = tokio::time::timeout(LIMIT, server.write(b"after")).await;
        assert_eq!(sent.expect("the paused write never went").unwrap(), 5);
        assert!(
            server.waiting.is_none(),
            "still waiting after the write went"
        );
    }

    #[tokio::test]
    async fn vectored_writes_larger_than_the_socket_arrive_whole_and_in_order() {
        let (mut server, mut client) = pair();
        let first: Vec<u8> = (0..300_000).map(|i| (i % 251) as u8).collect();
        let second: Vec<u8> = (0..500_000).map(|i| (i % 241) as u8).collect();
        let expected = [first.as_slice(), second.as_slice()].concat();
        let writer = tokio::spawn(async move {
            let mut slices = [
                io::IoSlice::new(&first),
                io::IoSlice::new(&[]),
                io::IoSlice::new(&second),
            ];
            let mut slices = &mut slices[..];
            while !slices.is_empty() {
                let sent = server.write_vectored(slices).await.unwrap();
                assert!(sent > 0, "a vectored write sent nothing");
                io::IoSlice::advance_slices(&mut slices, sent);
            }
            server
        });
        let mut received = vec![0u8; expected.len()];
        let read = tokio::time::timeout(LIMIT, client.read_exact(&mut received));
        read.await.expect("the write stalled").unwrap();
        assert!(received == expected, "the bytes arrived changed");
        let server = writer.await.unwrap();
        assert!(
            server.waiting.is_none(),
            "the write descriptor outlived the wait"
        );
    }

    #[tokio::test]
    async fn reads_in_pieces_see_all_a_silent_client_wrote() {
        let (mut server, mut client) = pair();
        let sent: Vec<u8> = (0..64).collect();
        client.write_all(&sent).await.unwrap();
        assert!(server.first_bytes().await);
        // The client stays open and silent: each read must find what is left without new data.
        let mut received = Vec::new();
        for _ in 0..4 {
            let mut piece = [0u8; 16];
            let read = tokio::time::timeout(LIMIT, server.read_exact(&mut piece));
            read.await
                .expect("a read waited for data already there")
                .unwrap();
            received.extend_from_slice(&piece);
        }
        assert_eq!(received, sent, "the peeked byte must still be read");
    }

    /// `writer` sends `bytes` and shuts down; `reader` must read them and then the end.
    async fn sent_then_ended(
        mut writer: impl AsyncWriteExt + Unpin,
        mut reader: impl AsyncReadExt + Unpin,
        bytes: &[u8],
    ) {
        writer.write_all(bytes).await.unwrap();
        writer.shutdown().await.unwrap();
        let mut received = Vec::new();
        let read = tokio::time::timeout(LIMIT, reader.read_to_end(&mut received));
        read.await.expect("the end of stream was lost").unwrap();
        assert_eq!(received, bytes);
    }

    #[tokio::test]
    async fn a_short_read_still_sees_the_end_that_came_with_the_data() {
        let (server, client) = pair();
        sent_then_ended(client, server, b"hello").await;
    }

    #[tokio::test]
    async fn shutdown_ends_the_clients_reading() {
        let (server, client) = pair();
        sent_then_ended(server, client, b"bye").await;
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
        let credentials = server.connect_info().credentials.0.expect("SO_PEERCRED");
        assert_eq!(credentials.pid(), std::process::id() as i32);
        assert_eq!(credentials.uid(), rustix::process::getuid().as_raw());
    }
}
