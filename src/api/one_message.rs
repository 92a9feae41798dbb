//! One message per request. Every method of this API takes a single request message (none
//! streams from the client), and tonic reads a request to its end before its handler runs,
//! decoding a second message or more and dropping them: a request with two was served with the
//! first. grpc-java and grpc-go refuse such a request, and so does berthd, INVALID_ARGUMENT, as
//! soon as a second message begins and before any handler sees the first. (A method added later
//! that streams from the client would have to be exempted by path here.)
//!
//! Owns: counting the messages of a request body by gRPC's framing (a flag byte, a four-byte
//! big-endian length, that many bytes). Does not own: the size of a message (tonic's limit,
//! grpc_message) or what the request holds while it arrives (request_budget).

use std::task::{Context, Poll};

use tonic::body::Body;

use super::request_body::{Inspect, Inspected};

/// gRPC's prefix of a message: the compressed flag and the length.
const PREFIX: usize = 5;

/// Where a request body's bytes are in gRPC's framing, fed the body's data as it arrives.
#[derive(Debug, Default)]
pub struct Framing {
    /// Messages whose first byte has arrived.
    begun: u32,
    position: Position,
}

#[derive(Debug)]
enum Position {
    /// `seen` bytes of a prefix have arrived, the length's among them in `length`.
    Prefix { seen: usize, length: [u8; 4] },
    /// `left` bytes of the message are still to come.
    Message { left: u32 },
}

impl Default for Position {
    fn default() -> Position {
        Position::Prefix {
            seen: 0,
            length: [0; 4],
        }
    }
}

/// A request body's second message began.
#[derive(Debug, PartialEq, Eq)]
pub struct SecondMessage;

impl Framing {
    /// Takes the next bytes of the body; refuses them if a second message begins in them.
    pub fn feed(&mut self, mut data: &[u8]) -> Result<(), SecondMessage> {
        while !data.is_empty() {
            match &mut self.position {
                Position::Prefix { seen, length } => {
                    if *seen == 0 {
                        self.begun += 1;
                        if self.begun > 1 {
                            return Err(SecondMessage);
                        }
                    }
                    let taken = (PREFIX - *seen).min(data.len());
                    for (at, &byte) in (*seen..).zip(&data[..taken]) {
                        // Byte 0 is the compressed flag, which tonic checks.
                        if at > 0 {
                            length[at - 1] = byte;
                        }
                    }
                    *seen += taken;
                    data = &data[taken..];
                    if *seen == PREFIX {
                        self.position = match u32::from_be_bytes(*length) {
                            0 => Position::default(),
                            left => Position::Message { left },
                        };
                    }
                }
                Position::Message { left } => {
                    let taken = usize::try_from(*left).unwrap_or(usize::MAX).min(data.len());
                    // `taken` is at most `left`, a u32.
                    *left -= taken as u32;
                    data = &data[taken..];
                    if *left == 0 {
                        self.position = Position::default();
                    }
                }
            }
        }
        Ok(())
    }
}

/// Refuses every request body with a second message.
#[derive(Clone, Copy, Debug)]
pub struct OneMessageLayer;

impl<S> tower::Layer<S> for OneMessageLayer {
    type Service = OneMessage<S>;

    fn layer(&self, inner: S) -> Self::Service {
        OneMessage { inner }
    }
}

#[derive(Clone, Debug)]
pub struct OneMessage<S> {
    inner: S,
}

impl<S> tower::Service<http::Request<Body>> for OneMessage<S>
where
    S: tower::Service<http::Request<Body>>,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = S::Future;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: http::Request<Body>) -> Self::Future {
        self.inner
            .call(request.map(|body| Body::new(Inspected::new(body, Framing::default()))))
    }
}

impl Inspect for Framing {
    fn inspect(&mut self, data: &[u8]) -> Result<(), tonic::Status> {
        self.feed(data).map_err(|SecondMessage| {
            tonic::Status::invalid_argument(
                "a request holds one message and a second one followed it: no method of this API streams from the client",
            )
        })
    }
}

#[cfg(test)]
mod tests {
    use bytes::Bytes;
    use http_body_util::{BodyExt, StreamBody};
    use hyper::body::Frame;
    use proptest::prelude::*;

    use super::*;

    /// `messages` framed as gRPC frames them, each of the given length.
    fn framed(messages: &[usize]) -> Vec<u8> {
        let mut body = Vec::new();
        for &len in messages {
            body.push(0);
            body.extend_from_slice(&(len as u32).to_be_bytes());
            body.extend(std::iter::repeat_n(0xab, len));
        }
        body
    }

    #[test]
    fn one_message_passes_and_a_second_is_refused_at_its_first_byte() {
        let mut framing = Framing::default();
        assert_eq!(framing.feed(&framed(&[3])), Ok(()));
        assert_eq!(framing.feed(&[0]), Err(SecondMessage));

        let mut framing = Framing::default();
        assert_eq!(framing.feed(&framed(&[0, 0])), Err(SecondMessage));

        // The length is big-endian: 0x0100 bytes, of which the first 0xff leave the message open.
        let mut framing = Framing::default();
        assert_eq!(framing.feed(&[1, 0, 0, 1, 0]), Ok(()));
        assert_eq!(framing.feed(&[0; 0xff]), Ok(()));
        assert_eq!(framing.feed(&[0]), Ok(()), "the message's last byte");
        assert_eq!(framing.feed(&[0]), Err(SecondMessage));

        // A length of u32::MAX is counted down without overflow.
        let mut framing = Framing::default();
        assert_eq!(framing.feed(&[0, 0xff, 0xff, 0xff, 0xff, 7, 7]), Ok(()));
    }

    proptest! {
        #[test]
        fn any_split_of_a_body_gives_what_the_whole_body_gives(
            body in proptest::collection::vec(any::<u8>(), 0..64),
            cuts in proptest::collection::vec(0usize..64, 0..8),
        ) {
            let whole = Framing::default().feed(&body);
            let mut cuts: Vec<usize> = cuts.into_iter().filter(|&at| at <= body.len()).collect();
            cuts.sort_unstable();
            let mut framing = Framing::default();
            let mut from = 0;
            let mut pieces = Ok(());
            for at in cuts.into_iter().chain([body.len()]) {
                pieces = framing.feed(&body[from..at]);
                from = at;
                if pieces.is_err() {
                    break;
                }
            }
            prop_assert_eq!(pieces, whole);
        }

        #[test]
        fn a_body_of_framed_messages_is_refused_exactly_when_it_has_two(
            lengths in proptest::collection::vec(0usize..40, 0..4),
            piece in 1usize..9,
        ) {
            let body = framed(&lengths);
            let mut framing = Framing::default();
            let fed: Result<(), SecondMessage> =
                body.chunks(piece).try_for_each(|chunk| framing.feed(chunk));
            prop_assert_eq!(fed.is_err(), lengths.len() > 1);
        }
    }

    #[tokio::test]
    async fn a_body_ends_in_invalid_argument_where_its_second_message_begins() {
        let frames: Vec<Result<Frame<Bytes>, tonic::Status>> = [framed(&[2]), framed(&[1])]
            .into_iter()
            .map(|data| Ok(Frame::data(Bytes::from(data))))
            .collect();
        let mut body = Inspected::new(
            Body::new(StreamBody::new(futures_util::stream::iter(frames))),
            Framing::default(),
        );
        assert!(body.frame().await.unwrap().is_ok(), "the first message");
        let refused = body.frame().await.unwrap().unwrap_err();
        assert_eq!(refused.code(), tonic::Code::InvalidArgument);
        assert!(refused.message().contains("second"), "{refused:?}");
    }
}
