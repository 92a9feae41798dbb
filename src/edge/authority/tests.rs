use loona_hpack::{Decoder, Encoder};

use super::*;

use crate::edge::test_hpack as hpack;

type Headers = Vec<(Vec<u8>, Vec<u8>)>;

/// Both ends of the rewrite: the edge, and a decoder standing in for h2's, fed what the edge
/// passes on.
struct Link {
    edge: BlockRewriter,
    h2: Decoder<'static>,
}

impl Link {
    fn new() -> Self {
        Link {
            edge: BlockRewriter::default(),
            h2: Decoder::new(),
        }
    }

    /// What h2 decodes from the block the client sent.
    fn send(&mut self, block: &[u8]) -> Headers {
        let passed = match self.edge.rewrite(block).expect("valid block") {
            Some(rewritten) => rewritten.to_vec(),
            None => block.to_vec(),
        };
        self.h2
            .decode(&passed)
            .expect("h2 decodes what the edge passes on")
    }
}

fn headers(list: &[(&str, &str)]) -> Headers {
    list.iter()
        .map(|(n, v)| (n.as_bytes().to_vec(), v.as_bytes().to_vec()))
        .collect()
}

fn hex(s: &str) -> Vec<u8> {
    let s: String = s.split_whitespace().collect();
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&s[i..i + 2], 16).unwrap())
        .collect()
}

#[test]
fn rfc_7541_c4_requests_pass_unchanged_and_keep_the_table() {
    let mut link = Link::new();
    let blocks = [
        "8286 8441 8cf1 e3c2 e5f2 3a6b a0ab 90f4 ff",
        "8286 84be 5886 a8eb 1064 9cbf",
        "8287 85bf 4088 25a8 49e9 5ba9 7d7f 8925 a849 e95b b8e8 b4bf",
    ];
    for block in blocks {
        assert_eq!(link.edge.rewrite(&hex(block)).unwrap(), None, "{block}");
    }
    // The third request's references resolve against the table the first two built.
    let mut h2 = Decoder::new();
    for block in &blocks[..2] {
        h2.decode(&hex(block)).unwrap();
    }
    assert_eq!(
        h2.decode(&hex(blocks[2])).unwrap(),
        headers(&[
            (":method", "GET"),
            (":scheme", "https"),
            (":path", "/index.html"),
            (":authority", "www.example.com"),
            ("custom-key", "custom-value"),
        ])
    );
}

#[test]
fn a_socket_path_authority_becomes_localhost_however_it_is_encoded() {
    for authority in [
        "/run/berth/berth.sock",
        "%2Frun%2Fberth%2Fberth.sock",
        "",
        "a b",
    ] {
        for (indexed, huffman) in [(false, false), (false, true), (true, false), (true, true)] {
            let mut link = Link::new();
            let mut block = hex("8286 84");
            hpack::literal(1, authority.as_bytes(), indexed, huffman, &mut block);
            let expected = headers(&[
                (":method", "GET"),
                (":scheme", "http"),
                (":path", "/"),
                (":authority", "localhost"),
            ]);
            assert_eq!(
                link.send(&block),
                expected,
                "{authority:?} {indexed} {huffman}"
            );
            if indexed {
                // A later request that refers to the client's table entry for the path.
                assert_eq!(link.send(&hex("8286 84be")), expected);
            }
        }
    }
}

/// The client's encoder indexes every new header; values change so its table evicts. Requests
/// with a good authority come first (passed unchanged), then bad ones, then good ones again.
#[test]
fn h2_decodes_every_request_of_a_connection_after_rewrites() {
    let mut link = Link::new();
    let mut client = Encoder::new();
    for round in 0..60 {
        let authority = match round {
            0..10 => "localhost".to_owned(),
            10..40 => "/run/berth/berth.sock".to_owned(),
            _ => format!("host-{}", round % 7),
        };
        let path = format!("/types.API/Call{}", round % 13);
        let timeout = format!("{}m", round * 37);
        let padding = "x".repeat(round * 17 % 400);
        let sent = headers(&[
            (":method", "POST"),
            (":scheme", "http"),
            (":path", &path),
            (":authority", &authority),
            ("content-type", "application/grpc"),
            ("grpc-timeout", &timeout),
            ("x-padding", &padding),
        ]);
        let block = client.encode(sent.iter().map(|(n, v)| (&n[..], &v[..])));
        let mut expected = sent.clone();
        if authority.starts_with('/') {
            expected[3].1 = b"localhost".to_vec();
        }
        assert_eq!(link.send(&block), expected, "round {round}");
    }
}

#[test]
fn malformed_blocks_are_errors() {
    for block in [
        "ff",
        "80",
        "bf",
        "3fe1ff",
        "41ff",
        "4185f1e3c2e5f2",
        "3fe21f",
    ] {
        assert!(
            BlockRewriter::default().rewrite(&hex(block)).is_err(),
            "{block}"
        );
    }
}

#[test]
fn integers_encode_as_in_rfc_7541_c1() {
    let mut out = Vec::new();
    encode_integer(10, 5, 0, &mut out);
    encode_integer(1337, 5, 0, &mut out);
    encode_integer(42, 8, 0, &mut out);
    assert_eq!(out, [10, 31, 154, 10, 42]);
}

/// One 4,000-octet entry indexed, then `references` references to it.
fn bomb(references: usize) -> Vec<u8> {
    let mut block = Vec::new();
    hpack::literal(58, &[b'a'; 4000], true, false, &mut block);
    block.resize(block.len() + references, 0x80 | 62);
    block
}

#[test]
fn a_block_that_decodes_past_four_times_the_header_list_size_is_an_error() {
    // 4,042 octets decoded a field (name, value and 32): 16 fields are within 64 KiB, 17 are not.
    let within = bomb(15);
    let mut edge = BlockRewriter::default();
    assert_eq!(edge.rewrite(&within).unwrap(), None);
    assert!(
        edge.encoded.capacity() <= KEPT_ENCODED,
        "{}",
        edge.encoded.capacity()
    );
    let mut edge = BlockRewriter::default();
    let error = edge.rewrite(&bomb(16)).unwrap_err();
    assert_eq!(
        error.to_string(),
        "malformed header block: header list larger than the server takes"
    );
    // 200 KB that decode to 808 MB: refused having encoded no more than the limit.
    let mut edge = BlockRewriter::default();
    assert!(edge.rewrite(&bomb(200_000)).is_err());
    assert!(
        edge.encoded.capacity() <= 2 * MAX_DECODED,
        "{}",
        edge.encoded.capacity()
    );
}

#[test]
fn a_large_block_after_a_rewrite_is_reencoded_whole() {
    let mut link = Link::new();
    let mut first = vec![0x82, 0x86];
    hpack::literal(1, b"/run/berth/berth.sock", false, false, &mut first);
    assert_eq!(
        link.send(&first)[2],
        (b":authority".to_vec(), b"localhost".to_vec())
    );
    // Over h2's header list size (h2 refuses that stream), within four times it.
    let sent = link.send(&bomb(10));
    assert_eq!(sent.len(), 11);
    assert!(
        sent.iter()
            .all(|(n, v)| n == b"user-agent" && v.len() == 4000)
    );
    assert!(link.edge.encoded.capacity() <= KEPT_ENCODED);
}
