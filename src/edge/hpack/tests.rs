use loona_hpack::Decoder as Reference;
use proptest::prelude::*;

use super::*;

use crate::edge::test_hpack as encode;

type Headers = Vec<(Vec<u8>, Vec<u8>)>;

fn decode(decoder: &mut HpackDecoder, block: &[u8]) -> Result<Headers, HpackError> {
    let mut out = Vec::new();
    decoder.decode(block, |n, v| {
        out.push((n.to_vec(), v.to_vec()));
        Ok(())
    })?;
    Ok(out)
}

fn hex(s: &str) -> Vec<u8> {
    let s: String = s.split_whitespace().collect();
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&s[i..i + 2], 16).unwrap())
        .collect()
}

/// RFC 7541 C.3 (literals) and C.4 (Huffman): three requests on one connection.
#[test]
fn rfc_7541_appendix_c3_and_c4() {
    let requests = [
        [
            "8286 8441 0f77 7777 2e65 7861 6d70 6c65 2e63 6f6d",
            "8286 84be 5808 6e6f 2d63 6163 6865",
            "8287 85bf 400a 6375 7374 6f6d 2d6b 6579 0c63 7573 746f 6d2d 7661 6c75 65",
        ],
        [
            "8286 8441 8cf1 e3c2 e5f2 3a6b a0ab 90f4 ff",
            "8286 84be 5886 a8eb 1064 9cbf",
            "8287 85bf 4088 25a8 49e9 5ba9 7d7f 8925 a849 e95b b8e8 b4bf",
        ],
    ];
    let expected = |pairs: &[(&str, &str)]| -> Headers {
        pairs
            .iter()
            .map(|(n, v)| (n.as_bytes().to_vec(), v.as_bytes().to_vec()))
            .collect()
    };
    let first = [
        (":method", "GET"),
        (":scheme", "http"),
        (":path", "/"),
        (":authority", "www.example.com"),
    ];
    for blocks in requests {
        let mut decoder = HpackDecoder::new(4096);
        assert_eq!(
            decode(&mut decoder, &hex(blocks[0])).unwrap(),
            expected(&first)
        );
        let mut second = first.to_vec();
        second.push(("cache-control", "no-cache"));
        assert_eq!(
            decode(&mut decoder, &hex(blocks[1])).unwrap(),
            expected(&second)
        );
        let third = [
            (":method", "GET"),
            (":scheme", "https"),
            (":path", "/index.html"),
            (":authority", "www.example.com"),
            ("custom-key", "custom-value"),
        ];
        assert_eq!(
            decode(&mut decoder, &hex(blocks[2])).unwrap(),
            expected(&third)
        );
        // 57 + 53 + 54 octets, as the RFC's table after the third request.
        assert_eq!(decoder.size, 164);
    }
}

#[test]
fn malformed_blocks_are_refused() {
    for (block, why) in [
        ("80", "index 0"),
        ("be", "index beyond the dynamic table"),
        ("ff", "integer cut short"),
        ("ffffffffff7f", "integer too large"),
        ("0f", "integer cut short"),
        ("4005", "string longer than the block"),
        ("82 3f e1 1f", "table size update after a header field"),
        ("3f e2 1f", "table size update above the allowed size"),
        ("41 81 00", "invalid Huffman padding"),
        ("41 84 ff ff ff ff", "EOS in a Huffman-coded string"),
    ] {
        let mut decoder = HpackDecoder::new(4096);
        assert_eq!(
            decode(&mut decoder, &hex(block)),
            Err(HpackError(why)),
            "{block}"
        );
    }
}

#[test]
fn a_smaller_table_evicts_the_oldest_entries() {
    let mut decoder = HpackDecoder::new(4096);
    let mut block = Vec::new();
    encode::literal(58, &[b'a'; 50], true, false, &mut block);
    encode::literal(58, &[b'b'; 50], true, true, &mut block);
    decode(&mut decoder, &block).unwrap();
    assert_eq!(decoder.table.len(), 2);
    // Down to room for one entry of 10 + 50 + 32 octets.
    decode(&mut decoder, &hex("3f 3d 82")).unwrap();
    assert_eq!(decoder.table.len(), 1);
    assert_eq!(&decoder.table[0].1[..], &[b'b'; 50]);
}

proptest! {
    /// Blocks as various clients encode them decode as loona-hpack (an independent decoder)
    /// decodes them, across several blocks on one connection; random octets never panic.
    #[test]
    fn decodes_as_an_independent_decoder_does(
        blocks in proptest::collection::vec(
            proptest::collection::vec((0..61usize, ".{0,40}", any::<bool>(), any::<bool>(), any::<bool>()), 0..8),
            1..6,
        ),
        noise in proptest::collection::vec(any::<u8>(), 0..64),
    ) {
        let mut mine = HpackDecoder::new(4096);
        let mut reference = Reference::new();
        let mut indexed_any = false;
        for fields in &blocks {
            let mut block = Vec::new();
            for (name, value, indexed, huffman, by_index) in fields {
                if *by_index && indexed_any {
                    // Refer to the newest dynamic entry.
                    block.push(0x80 | 62);
                } else {
                    encode::literal(name + 1, value.as_bytes(), *indexed, *huffman, &mut block);
                    indexed_any |= *indexed;
                }
            }
            let theirs = reference.decode(&block).map_err(|e| format!("{e:?}"));
            let ours = decode(&mut mine, &block).map_err(|e| e.to_string());
            prop_assert_eq!(ours.is_ok(), theirs.is_ok(), "{:?} {:?}", ours, theirs);
            if let (Ok(ours), Ok(theirs)) = (ours, theirs) {
                prop_assert_eq!(ours, theirs);
            }
        }
        let _ = decode(&mut mine, &noise);
    }
}

/// A field's error ends the block's decoding at that field: a block of 2-byte fields that each
/// index a 4 KB name anew is not copied through to its end.
#[test]
fn an_error_from_a_field_stops_the_decoding_there() {
    let mut block = Vec::new();
    // A new 4 KB name, indexed, with an empty value.
    block.push(0x40);
    encode::string(&[b'n'; 4000], false, &mut block);
    encode::string(b"", false, &mut block);
    for _ in 0..30_000 {
        // Literal with incremental indexing, the name the table's newest entry, an empty value.
        block.extend_from_slice(&[0x40 | 62, 0x00]);
    }
    let mut decoder = HpackDecoder::new(4096);
    let mut seen = 0;
    let error = decoder.decode(&block, |_, _| {
        seen += 1;
        if seen > 10 {
            return Err(HpackError("enough"));
        }
        Ok(())
    });
    assert_eq!(error, Err(HpackError("enough")));
    assert_eq!(seen, 11, "fields decoded after the one that failed");
}
