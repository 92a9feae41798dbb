//! The client-to-server byte stream of one connection, rewritten without I/O: bytes in, bytes
//! out. Every frame but a header block passes through as it arrives, payload included, without
//! waiting for the whole frame; a header block (a HEADERS frame and its CONTINUATIONs) is gathered
//! up to [`MAX_HEADER_BLOCK`] octets and handed to [`BlockRewriter`].
//!
//! Owns: the preface, frame boundaries, gathering and re-framing header blocks, and the errors
//! that end the connection. Does not own: the HPACK rewrite ([`super::authority`]) or the socket
//! ([`super::Edge`]).

use std::collections::VecDeque;

use bytes::{Bytes, BytesMut};

use super::authority::{BlockRewriter, HpackError};
use super::frames::{
    CONTINUATION, DEFAULT_MAX_FRAME, END_HEADERS, END_STREAM, FrameHeader, HEADER_LEN, HEADERS,
    PREFACE, PRIORITY, split_headers,
};

/// The most octets of HEADERS and CONTINUATION frames one header block may take, and what
/// bounds a connection's memory here: the decoded size past which h2 closes the connection
/// ([`super::authority`]), which a block an encoder made no larger than need be cannot reach
/// below it (a field decodes to its name and value plus 32 octets). gRPC clients send 8 to
/// 16 KiB of metadata at most.
pub const MAX_HEADER_BLOCK: usize = 64 * 1024;

/// Why the edge ends a connection: the client broke HTTP/2 in a way that leaves its header
/// compression state unknowable.
#[derive(Debug, thiserror::Error)]
pub enum EdgeError {
    #[error("{0}")]
    Hpack(#[from] HpackError),
    #[error("header block larger than {MAX_HEADER_BLOCK} octets")]
    BlockTooLarge,
    #[error("header frame of {0} octets, above the {DEFAULT_MAX_FRAME} octets the server allows")]
    FrameTooLarge(usize),
    #[error("frame of type {kind:#x} on stream {stream} inside a header block")]
    InterruptedBlock { kind: u8, stream: u32 },
    #[error("CONTINUATION frame on stream {0} without a header block")]
    StrayContinuation(u32),
    #[error("HEADERS frame with padding or priority longer than the frame")]
    BadHeadersFrame,
}

enum State {
    /// Matched this many octets of [`PREFACE`].
    Preface(usize),
    /// Expecting a frame header.
    Header,
    /// This many payload octets of a frame that passes as it is remain.
    Passthrough(usize),
    /// Gathering a HEADERS or CONTINUATION payload, of which this many octets remain.
    Gather {
        frame: FrameHeader,
        remaining: usize,
    },
    /// Not HTTP/2 with prior knowledge: everything passes, h2 refuses it itself.
    Opaque,
}

/// A header block being gathered.
struct OpenBlock {
    headers: FrameHeader,
    priority: Option<[u8; 5]>,
    /// Every octet of the block's frames as they came, to pass on when nothing changes.
    original: Vec<u8>,
    /// Where the payload of the frame being gathered starts in `original`.
    payload_start: usize,
    /// The header block fragments, concatenated.
    fragment: Vec<u8>,
}

/// One connection's client-to-server direction.
pub struct Rewriter {
    state: State,
    open: Option<OpenBlock>,
    blocks: BlockRewriter,
}

impl Default for Rewriter {
    fn default() -> Self {
        Rewriter {
            state: State::Preface(0),
            open: None,
            blocks: BlockRewriter::default(),
        }
    }
}

impl Rewriter {
    /// Whether the client's connection preface is behind (or what came was not HTTP/2, which h2
    /// refuses itself).
    pub fn past_preface(&self) -> bool {
        !matches!(self.state, State::Preface(_))
    }

    /// Consumes what it can of `input` and appends the octets to pass on to `out`. What stays in
    /// `input` is an incomplete frame header. After an error the connection must end.
    pub fn feed(
        &mut self,
        input: &mut BytesMut,
        out: &mut VecDeque<Bytes>,
    ) -> Result<(), EdgeError> {
        loop {
            match self.state {
                State::Opaque => {
                    if !input.is_empty() {
                        out.push_back(input.split().freeze());
                    }
                    return Ok(());
                }
                State::Preface(matched) => {
                    let take = input.len().min(PREFACE.len() - matched);
                    if take == 0 {
                        return Ok(());
                    }
                    self.state = if input[..take] != PREFACE[matched..matched + take] {
                        State::Opaque
                    } else if matched + take == PREFACE.len() {
                        State::Header
                    } else {
                        State::Preface(matched + take)
                    };
                    out.push_back(input.split_to(take).freeze());
                }
                State::Header => {
                    let Some(frame) = FrameHeader::parse(input) else {
                        return Ok(());
                    };
                    self.state = self.open_frame(frame, input, out)?;
                }
                State::Passthrough(remaining) => {
                    if remaining == 0 {
                        self.state = State::Header;
                        continue;
                    }
                    let take = input.len().min(remaining);
                    if take == 0 {
                        return Ok(());
                    }
                    out.push_back(input.split_to(take).freeze());
                    self.state = State::Passthrough(remaining - take);
                }
                State::Gather { frame, remaining } => {
                    let block = self.open.as_mut().expect("a block is open while gathering");
                    let take = input.len().min(remaining);
                    block.original.extend_from_slice(&input.split_to(take));
                    if take < remaining {
                        self.state = State::Gather {
                            frame,
                            remaining: remaining - take,
                        };
                        return Ok(());
                    }
                    self.state = State::Header;
                    self.close_frame(frame, out)?;
                }
            }
        }
    }

    /// Starts the frame whose header is at the front of `input` and says what comes next.
    fn open_frame(
        &mut self,
        frame: FrameHeader,
        input: &mut BytesMut,
        out: &mut VecDeque<Bytes>,
    ) -> Result<State, EdgeError> {
        if matches!(frame.kind, HEADERS | CONTINUATION) && frame.length > DEFAULT_MAX_FRAME {
            // h2 refuses it too (FRAME_SIZE_ERROR): gathered, it would only take memory.
            return Err(EdgeError::FrameTooLarge(frame.length));
        }
        let raw = input.split_to(HEADER_LEN);
        match (&mut self.open, frame.kind) {
            (Some(block), CONTINUATION) if block.headers.stream == frame.stream => {
                if block.original.len() + HEADER_LEN + frame.length > MAX_HEADER_BLOCK {
                    return Err(EdgeError::BlockTooLarge);
                }
                block.original.extend_from_slice(&raw);
                block.payload_start = block.original.len();
            }
            (Some(_), kind) => {
                return Err(EdgeError::InterruptedBlock {
                    kind,
                    stream: frame.stream,
                });
            }
            (None, HEADERS) => {
                if HEADER_LEN + frame.length > MAX_HEADER_BLOCK {
                    return Err(EdgeError::BlockTooLarge);
                }
                // Grown as the payload arrives: a frame header announces what may never come.
                let original = raw.to_vec();
                self.open = Some(OpenBlock {
                    headers: frame,
                    priority: None,
                    original,
                    payload_start: HEADER_LEN,
                    fragment: Vec::new(),
                });
            }
            (None, CONTINUATION) => return Err(EdgeError::StrayContinuation(frame.stream)),
            (None, _) => {
                out.push_back(raw.freeze());
                return Ok(State::Passthrough(frame.length));
            }
        }
        Ok(State::Gather {
            frame,
            remaining: frame.length,
        })
    }

    /// Takes the fragment of the frame just gathered and, at the block's end, passes it on.
    fn close_frame(
        &mut self,
        frame: FrameHeader,
        out: &mut VecDeque<Bytes>,
    ) -> Result<(), EdgeError> {
        let block = self.open.as_mut().expect("a block is open while gathering");
        let payload = &block.original[block.payload_start..];
        if frame.kind == HEADERS {
            let split = split_headers(frame.flags, payload).ok_or(EdgeError::BadHeadersFrame)?;
            block.priority = split.priority.map(|p| p.try_into().expect("five octets"));
            block.fragment.extend_from_slice(split.fragment);
        } else {
            block.fragment.extend_from_slice(payload);
        }
        if frame.flags & END_HEADERS == 0 {
            return Ok(());
        }
        let block = self.open.take().expect("a block is open while gathering");
        match self.blocks.rewrite(&block.fragment)? {
            None => out.push_back(Bytes::from(block.original)),
            Some(rewritten) => out.push_back(Bytes::from(reframe(&block, &rewritten))),
        }
        Ok(())
    }
}

/// The block's frames again around a new fragment: a HEADERS frame (its END_STREAM and priority
/// kept, its padding dropped) and as many CONTINUATION frames as the frame size limit needs.
fn reframe(block: &OpenBlock, fragment: &[u8]) -> Vec<u8> {
    let priority = block.priority.as_ref().map_or(&[][..], |p| &p[..]);
    let mut out = Vec::with_capacity(fragment.len() + priority.len() + 2 * HEADER_LEN);
    let first = fragment.len().min(DEFAULT_MAX_FRAME - priority.len());
    let (head, mut rest) = fragment.split_at(first);
    let mut flags = block.headers.flags & (END_STREAM | PRIORITY);
    if rest.is_empty() {
        flags |= END_HEADERS;
    }
    FrameHeader {
        length: priority.len() + head.len(),
        kind: HEADERS,
        flags,
        stream: block.headers.stream,
    }
    .write(&mut out);
    out.extend_from_slice(priority);
    out.extend_from_slice(head);
    while !rest.is_empty() {
        let (chunk, tail) = rest.split_at(rest.len().min(DEFAULT_MAX_FRAME));
        rest = tail;
        FrameHeader {
            length: chunk.len(),
            kind: CONTINUATION,
            flags: if rest.is_empty() { END_HEADERS } else { 0 },
            stream: block.headers.stream,
        }
        .write(&mut out);
        out.extend_from_slice(chunk);
    }
    out
}

#[cfg(test)]
mod tests;
