//! The edge's cost per request: 100 gRPC requests (a HEADERS block like a C-core client's first
//! request: every field a Huffman-coded literal, nothing from the dynamic table, so all of it is
//! decoded; and a small DATA frame) through one connection's rewriter. Once with `localhost` as
//! the `:authority` (decoded, passed unchanged), once with the socket path (decoded, rewritten,
//! re-encoded). Criterion's "thrpt" line is requests per second; time / 100 is one request.
//! And what a hostile block costs before it is refused: a 64 KB block that indexes one 4 KB name
//! and then 30,000 two-byte fields that each index that name anew.

use std::collections::VecDeque;
use std::hint::black_box;

use berth::edge::Rewriter;
use bytes::BytesMut;
use criterion::{Criterion, Throughput, criterion_group, criterion_main};

#[path = "../tests/it/common/hpack.rs"]
#[allow(dead_code)]
mod hpack;

const REQUESTS: u32 = 100;
const PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

fn frame(kind: u8, flags: u8, stream: u32, payload: &[u8], out: &mut Vec<u8>) {
    out.extend_from_slice(&(payload.len() as u32).to_be_bytes()[1..]);
    out.push(kind);
    out.push(flags);
    out.extend_from_slice(&stream.to_be_bytes());
    out.extend_from_slice(payload);
}

/// A connection's client side: preface, SETTINGS, then [`REQUESTS`] unary calls.
fn connection(authority: &str) -> Vec<u8> {
    let mut wire = PREFACE.to_vec();
    frame(0x4, 0, 0, &[], &mut wire);
    for request in 0..REQUESTS {
        let mut block = vec![0x83, 0x86];
        hpack::literal(4, b"/types.API/State", false, true, &mut block);
        hpack::literal(1, authority.as_bytes(), false, true, &mut block);
        hpack::literal(31, b"application/grpc", false, true, &mut block);
        block.push(0x00);
        hpack::string(b"te", true, &mut block);
        hpack::string(b"trailers", true, &mut block);
        hpack::literal(
            58,
            b"grpc-python/1.85.0 grpc-c/50.0.0 (linux; chttp2)",
            false,
            true,
            &mut block,
        );
        block.push(0x00);
        hpack::string(b"grpc-timeout", true, &mut block);
        hpack::string(format!("{}m", 1000 + request).as_bytes(), true, &mut block);
        let stream = 1 + 2 * request;
        frame(0x1, 0x4, stream, &block, &mut wire);
        frame(0x0, 0x1, stream, &[0, 0, 0, 0, 0], &mut wire);
    }
    wire
}

/// A connection whose first header block is the name-copying one (see the header), in 16 KiB
/// frames.
fn name_copy_block() -> Vec<u8> {
    let mut block = vec![0x40];
    hpack::string(&[b'n'; 4000], false, &mut block);
    hpack::string(b"", false, &mut block);
    for _ in 0..30_000 {
        block.extend_from_slice(&[0x40 | 62, 0x00]);
    }
    let mut wire = PREFACE.to_vec();
    frame(0x4, 0, 0, &[], &mut wire);
    let pieces: Vec<&[u8]> = block.chunks(16 * 1024).collect();
    for (i, piece) in pieces.iter().enumerate() {
        let kind = if i == 0 { 0x1 } else { 0x9 };
        let end_headers = if i + 1 == pieces.len() { 0x4 } else { 0 };
        frame(kind, end_headers, 1, piece, &mut wire);
    }
    wire
}

fn refused_by_the_edge(wire: &[u8]) -> bool {
    let mut rewriter = Rewriter::default();
    let mut input = BytesMut::from(wire);
    let mut out = VecDeque::new();
    rewriter.feed(&mut input, &mut out).is_err()
}

fn through_the_edge(wire: &[u8]) -> usize {
    let mut rewriter = Rewriter::default();
    let mut input = BytesMut::from(wire);
    let mut out = VecDeque::new();
    rewriter
        .feed(&mut input, &mut out)
        .expect("valid connection");
    out.iter().map(|b| b.len()).sum()
}

fn bench(c: &mut Criterion) {
    let mut group = c.benchmark_group("edge");
    group.throughput(Throughput::Elements(u64::from(REQUESTS)));
    for (name, authority) in [
        ("localhost_passed", "localhost"),
        ("socket_path_rewritten", "/run/berth/berth.sock"),
    ] {
        let wire = connection(authority);
        group.bench_function(name, |b| b.iter(|| through_the_edge(black_box(&wire))));
    }
    group.finish();
    let hostile = name_copy_block();
    assert!(refused_by_the_edge(&hostile), "the hostile block was taken");
    c.bench_function("edge/name_copy_block_refused", |b| {
        b.iter(|| refused_by_the_edge(black_box(&hostile)))
    });
}

criterion_group!(benches, bench);
criterion_main!(benches);
