use loona_hpack::{Decoder, Encoder};
use proptest::prelude::*;

use super::*;
use crate::edge::frames::{PADDED, PREFACE};

use crate::edge::test_hpack as hpack;

type Headers = Vec<(Vec<u8>, Vec<u8>)>;

fn frame(kind: u8, flags: u8, stream: u32, payload: &[u8], out: &mut Vec<u8>) {
    FrameHeader {
        length: payload.len(),
        kind,
        flags,
        stream,
    }
    .write(out);
    out.extend_from_slice(payload);
}

/// Feeds `wire` in pieces of `chunk` octets; the octets passed on, or the error.
fn run(wire: &[u8], chunk: usize) -> Result<Vec<u8>, String> {
    let mut rewriter = Rewriter::default();
    let mut input = BytesMut::new();
    let mut out = VecDeque::new();
    for piece in wire.chunks(chunk.max(1)) {
        input.extend_from_slice(piece);
        rewriter
            .feed(&mut input, &mut out)
            .map_err(|e| e.to_string())?;
    }
    Ok(out.iter().flat_map(|b| b.iter().copied()).collect())
}

/// What h2 would see: its frames (header blocks decoded, in order) after the preface.
#[derive(Debug, PartialEq)]
enum Seen {
    Frame {
        kind: u8,
        flags: u8,
        stream: u32,
        payload: Vec<u8>,
    },
    Block {
        stream: u32,
        end_stream: bool,
        headers: Headers,
    },
}

fn as_h2_sees(wire: &[u8]) -> Vec<Seen> {
    assert_eq!(&wire[..PREFACE.len()], PREFACE);
    let mut rest = &wire[PREFACE.len()..];
    let mut decoder = Decoder::new();
    let mut seen = Vec::new();
    let mut block: Option<(u32, bool, Vec<u8>)> = None;
    while let Some(header) = FrameHeader::parse(rest) {
        let payload = &rest[HEADER_LEN..HEADER_LEN + header.length];
        rest = &rest[HEADER_LEN + header.length..];
        let fragment = match header.kind {
            HEADERS => {
                let split = split_headers(header.flags, payload).unwrap();
                block = Some((header.stream, header.flags & END_STREAM != 0, Vec::new()));
                split.fragment
            }
            CONTINUATION => payload,
            kind => {
                seen.push(Seen::Frame {
                    kind,
                    flags: header.flags,
                    stream: header.stream,
                    payload: payload.to_vec(),
                });
                continue;
            }
        };
        let (_, _, gathered) = block.as_mut().unwrap();
        gathered.extend_from_slice(fragment);
        if header.flags & END_HEADERS != 0 {
            let (stream, end_stream, gathered) = block.take().unwrap();
            let headers = decoder.decode(&gathered).unwrap();
            seen.push(Seen::Block {
                stream,
                end_stream,
                headers,
            });
        }
    }
    assert!(rest.is_empty() && block.is_none());
    seen
}

fn request(authority: &[u8], huffman: bool) -> Vec<u8> {
    let mut block = vec![0x83, 0x86];
    hpack::literal(4, b"/types.API/State", true, huffman, &mut block);
    hpack::literal(1, authority, false, huffman, &mut block);
    hpack::literal(31, b"application/grpc", true, huffman, &mut block);
    block
}

fn expected(authority: &str) -> Headers {
    [
        (":method", "POST"),
        (":scheme", "http"),
        (":path", "/types.API/State"),
        (":authority", authority),
        ("content-type", "application/grpc"),
    ]
    .iter()
    .map(|(n, v)| (n.as_bytes().to_vec(), v.as_bytes().to_vec()))
    .collect()
}

#[test]
fn a_block_across_continuations_with_padding_and_priority_is_rewritten() {
    let block = request(b"/run/berth/berth.sock", true);
    let (a, rest) = block.split_at(3);
    let (b, c) = rest.split_at(10);
    let mut wire = PREFACE.to_vec();
    frame(0x4, 0, 0, &[], &mut wire);
    let mut headers = vec![4, 0, 0, 0, 0, 7];
    headers.extend_from_slice(a);
    headers.extend_from_slice(&[0; 4]);
    frame(HEADERS, PADDED | PRIORITY, 1, &headers, &mut wire);
    frame(CONTINUATION, 0, 1, b, &mut wire);
    frame(CONTINUATION, END_HEADERS, 1, c, &mut wire);
    frame(0x0, END_STREAM, 1, &[0, 0, 0, 0, 0], &mut wire);
    // The same request again, now referring to the client's dynamic table.
    frame(
        HEADERS,
        END_HEADERS,
        3,
        &[0x83, 0x86, 0xbf, 0x01, 0x01, b'/', 0xbe],
        &mut wire,
    );

    let all_at_once = run(&wire, wire.len()).unwrap();
    assert_eq!(run(&wire, 1).unwrap(), all_at_once, "byte by byte");
    let seen = as_h2_sees(&all_at_once);
    assert_eq!(
        seen,
        [
            Seen::Frame {
                kind: 0x4,
                flags: 0,
                stream: 0,
                payload: vec![]
            },
            Seen::Block {
                stream: 1,
                end_stream: false,
                headers: expected("localhost")
            },
            Seen::Frame {
                kind: 0x0,
                flags: END_STREAM,
                stream: 1,
                payload: vec![0; 5]
            },
            Seen::Block {
                stream: 3,
                end_stream: false,
                headers: expected("localhost")
            },
        ]
    );
    // The priority fields survive the rewrite.
    assert_eq!(&all_at_once[PREFACE.len() + 9 + 9..][..5], &[0, 0, 0, 0, 7]);
}

#[test]
fn a_good_authority_passes_byte_for_byte() {
    let mut wire = PREFACE.to_vec();
    frame(
        HEADERS,
        END_HEADERS,
        1,
        &request(b"localhost", true),
        &mut wire,
    );
    frame(0x0, END_STREAM, 1, &[0; 5], &mut wire);
    assert_eq!(run(&wire, 7).unwrap(), wire);
}

#[test]
fn a_large_rewritten_block_is_split_at_the_frame_size_limit() {
    let mut block = request(b"/run/berth/berth.sock", false);
    hpack::literal(58, &[b'a'; 40_000], false, false, &mut block);
    let mut wire = PREFACE.to_vec();
    let (a, b) = block.split_at(15_000);
    frame(HEADERS, END_STREAM, 1, a, &mut wire);
    let (b, c) = b.split_at(15_000);
    frame(CONTINUATION, 0, 1, b, &mut wire);
    frame(CONTINUATION, END_HEADERS, 1, c, &mut wire);
    let out = run(&wire, 4096).unwrap();
    let mut rest = &out[PREFACE.len()..];
    while let Some(header) = FrameHeader::parse(rest) {
        assert!(header.length <= DEFAULT_MAX_FRAME);
        rest = &rest[HEADER_LEN + header.length..];
    }
    let Seen::Block {
        end_stream,
        headers,
        ..
    } = &as_h2_sees(&out)[0]
    else {
        panic!()
    };
    assert!(end_stream);
    assert_eq!(headers[3].1, b"localhost");
    assert_eq!(headers[5].1.len(), 40_000);
}

/// Writes frames onto a connection's bytes.
type Writes = dyn Fn(&mut Vec<u8>);

#[test]
fn broken_framing_ends_the_connection() {
    let broken: [&Writes; 5] = [
        &|w| frame(CONTINUATION, END_HEADERS, 1, &[0x82], w),
        &|w| {
            frame(HEADERS, 0, 1, &[0x82], w);
            frame(0x0, 0, 1, &[], w);
        },
        &|w| {
            frame(HEADERS, 0, 1, &[0x82], w);
            frame(CONTINUATION, END_HEADERS, 3, &[0x82], w);
        },
        &|w| frame(HEADERS, END_HEADERS | PADDED, 1, &[9, 0x82], w),
        &|w| {
            frame(
                HEADERS,
                END_HEADERS,
                1,
                &[0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0x7f],
                w,
            )
        },
    ];
    for (i, write) in broken.iter().enumerate() {
        let mut wire = PREFACE.to_vec();
        write(&mut wire);
        assert!(run(&wire, 5).is_err(), "case {i}");
    }
    // A header frame above the frame size berthd allows ends the connection at its header,
    // before any of its payload is held.
    let mut wire = PREFACE.to_vec();
    wire.extend_from_slice(&[0x04, 0, 0, HEADERS, 0, 0, 0, 0, 1]);
    assert_eq!(
        run(&wire, 100).unwrap_err(),
        EdgeError::FrameTooLarge(0x40000).to_string()
    );
    // Frames of the allowed size that together pass the block limit.
    let mut wire = PREFACE.to_vec();
    frame(HEADERS, 0, 1, &[0x82; DEFAULT_MAX_FRAME], &mut wire);
    for _ in 0..4 {
        frame(CONTINUATION, 0, 1, &[0x82; DEFAULT_MAX_FRAME], &mut wire);
    }
    assert_eq!(
        run(&wire, 1000).unwrap_err(),
        EdgeError::BlockTooLarge.to_string()
    );
}

#[test]
fn a_client_that_is_not_http2_passes_untouched() {
    let wire = b"GET / HTTP/1.1\r\nHost: x\r\n\r\n\x00\x00\x01\x09\x00\x00\x00\x00\x01";
    assert_eq!(run(wire, 3).unwrap(), wire);
}

/// One frame of a generated connection.
#[derive(Debug, Clone)]
enum Gen {
    /// A request header block: authority choice, Huffman or not, indexed by the client's
    /// stateful encoder or not, split into this many frames.
    Request {
        authority: usize,
        huffman: bool,
        stateful: bool,
        pieces: usize,
        end_stream: bool,
    },
    /// Any other frame, passed as it is.
    Other {
        kind: u8,
        flags: u8,
        payload: Vec<u8>,
    },
    /// Octets that break the stream anywhere.
    Garbage(Vec<u8>),
}

const AUTHORITIES: [&str; 5] = [
    "localhost",
    "/run/berth/berth.sock",
    "%2Frun%2Fb.sock",
    "",
    "berth:1",
];

fn gen_frame() -> impl Strategy<Value = Gen> {
    prop_oneof![
        6 => (0..AUTHORITIES.len(), any::<bool>(), any::<bool>(), 1..4usize, any::<bool>()).prop_map(
            |(authority, huffman, stateful, pieces, end_stream)| Gen::Request {
                authority, huffman, stateful, pieces, end_stream
            }
        ),
        3 => (prop_oneof![Just(0u8), Just(3), Just(4), Just(6), Just(8), 10..255u8], any::<u8>(),
              proptest::collection::vec(any::<u8>(), 0..40))
            .prop_map(|(kind, flags, payload)| Gen::Other { kind, flags, payload }),
        1 => proptest::collection::vec(any::<u8>(), 1..20).prop_map(Gen::Garbage),
    ]
}

/// The wire for `frames`, and what h2 must see if nothing is garbage.
fn build(frames: &[Gen]) -> (Vec<u8>, Vec<Seen>) {
    let mut wire = PREFACE.to_vec();
    let mut seen = Vec::new();
    let mut client = Encoder::new();
    for (i, f) in frames.iter().enumerate() {
        let stream = 1 + 2 * i as u32;
        match f {
            Gen::Request {
                authority,
                huffman,
                stateful,
                pieces,
                end_stream,
            } => {
                let authority = AUTHORITIES[*authority];
                let mut headers = expected(authority);
                let block = if *stateful {
                    client.encode(headers.iter().map(|(n, v)| (&n[..], &v[..])))
                } else {
                    request(authority.as_bytes(), *huffman)
                };
                let size = block.len().div_ceil(*pieces);
                let chunks: Vec<&[u8]> = block.chunks(size).collect();
                for (k, chunk) in chunks.iter().enumerate() {
                    let last = if k + 1 == chunks.len() {
                        END_HEADERS
                    } else {
                        0
                    };
                    if k == 0 {
                        let es = if *end_stream { END_STREAM } else { 0 };
                        frame(HEADERS, es | last, stream, chunk, &mut wire);
                    } else {
                        frame(CONTINUATION, last, stream, chunk, &mut wire);
                    }
                }
                if http::uri::Authority::try_from(authority).is_err() {
                    headers[3].1 = b"localhost".to_vec();
                }
                seen.push(Seen::Block {
                    stream,
                    end_stream: *end_stream,
                    headers,
                });
            }
            Gen::Other {
                kind,
                flags,
                payload,
            } => {
                frame(*kind, *flags, stream, payload, &mut wire);
                seen.push(Seen::Frame {
                    kind: *kind,
                    flags: *flags,
                    stream,
                    payload: payload.clone(),
                });
            }
            Gen::Garbage(bytes) => wire.extend_from_slice(bytes),
        }
    }
    (wire, seen)
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    /// Valid connections come out as the same frames with the authority fixed, whatever the
    /// chunking; anything with garbage comes out the same way or as an error, never a panic.
    #[test]
    fn arbitrary_frames_are_rewritten_or_refused(
        frames in proptest::collection::vec(gen_frame(), 0..12),
        chunk in 1..64usize,
    ) {
        let (wire, expected) = build(&frames);
        let whole = run(&wire, wire.len());
        prop_assert_eq!(&run(&wire, chunk), &whole);
        if !frames.iter().any(|f| matches!(f, Gen::Garbage(_))) {
            prop_assert_eq!(as_h2_sees(&whole.unwrap()), expected);
        }
    }

    #[test]
    fn random_octets_never_panic(tail in proptest::collection::vec(any::<u8>(), 0..400), chunk in 1..64usize) {
        let mut wire = PREFACE.to_vec();
        wire.extend_from_slice(&tail);
        let _ = run(&wire, chunk);
    }
}
