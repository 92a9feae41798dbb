//! A test-side HPACK encoder (RFC 7541), so tests can send header blocks exactly as some client
//! would: literal or Huffman strings, with or without incremental indexing. Also compiled into the
//! unit tests of `src/edge`.

/// The length in bits of each symbol's Huffman code (RFC 7541 Appendix B); the code is canonical,
/// so the lengths alone give the codes.
const CODE_LENGTHS: [u8; 257] = [
    13, 23, 28, 28, 28, 28, 28, 28, 28, 24, 30, 28, 28, 30, 28, 28, 28, 28, 28, 28, 28, 28, 30, 28,
    28, 28, 28, 28, 28, 28, 28, 28, 6, 10, 10, 12, 13, 6, 8, 11, 10, 10, 8, 11, 8, 6, 6, 6, 5, 5,
    5, 6, 6, 6, 6, 6, 6, 6, 7, 8, 15, 6, 12, 10, 13, 6, 7, 7, 7, 7, 7, 7, 7, 7, 7, 7, 7, 7, 7, 7,
    7, 7, 7, 7, 7, 7, 7, 7, 8, 7, 8, 13, 19, 13, 14, 6, 15, 5, 6, 5, 6, 5, 6, 6, 6, 5, 7, 7, 6, 6,
    6, 5, 6, 7, 6, 5, 5, 6, 7, 7, 7, 7, 7, 15, 11, 14, 13, 28, 20, 22, 20, 20, 22, 22, 22, 23, 22,
    23, 23, 23, 23, 23, 24, 23, 24, 24, 22, 23, 24, 23, 23, 23, 23, 21, 22, 23, 22, 23, 23, 24, 22,
    21, 20, 22, 22, 23, 23, 21, 23, 22, 22, 24, 21, 22, 23, 23, 21, 21, 22, 21, 23, 22, 23, 23, 20,
    22, 22, 22, 23, 22, 22, 23, 26, 26, 20, 19, 22, 23, 22, 25, 26, 26, 26, 27, 27, 26, 24, 25, 19,
    21, 26, 27, 27, 26, 27, 24, 21, 21, 26, 26, 28, 27, 27, 27, 20, 24, 20, 21, 22, 21, 21, 23, 22,
    22, 25, 25, 24, 24, 26, 23, 26, 27, 26, 26, 27, 27, 27, 27, 27, 28, 27, 27, 27, 27, 27, 26, 30,
];

/// Each symbol's code, from the lengths: shorter codes first, then by symbol.
fn codes() -> [u32; 257] {
    let mut order: Vec<usize> = (0..257).collect();
    order.sort_by_key(|&s| (CODE_LENGTHS[s], s));
    let mut codes = [0u32; 257];
    let mut code = 0u32;
    let mut previous = CODE_LENGTHS[order[0]];
    for (k, &symbol) in order.iter().enumerate() {
        let length = CODE_LENGTHS[symbol];
        if k > 0 {
            code = (code + 1) << (length - previous);
        }
        previous = length;
        codes[symbol] = code;
    }
    codes
}

/// `s` Huffman-coded, padded with the EOS code's leading ones.
pub fn huffman(s: &[u8]) -> Vec<u8> {
    let codes = codes();
    let mut out = Vec::new();
    let (mut bits, mut pending) = (0u64, 0u32);
    for &b in s {
        let length = u32::from(CODE_LENGTHS[usize::from(b)]);
        bits = bits << length | u64::from(codes[usize::from(b)]);
        pending += length;
        while pending >= 8 {
            pending -= 8;
            out.push((bits >> pending) as u8);
        }
    }
    if pending > 0 {
        out.push((bits << (8 - pending)) as u8 | (0xff >> pending));
    }
    out
}

/// RFC 7541 §5.1.
pub fn integer(mut value: usize, prefix_bits: u8, flags: u8, out: &mut Vec<u8>) {
    let max = (1usize << prefix_bits) - 1;
    if value < max {
        out.push(flags | value as u8);
        return;
    }
    out.push(flags | max as u8);
    value -= max;
    while value >= 0x80 {
        out.push(0x80 | (value & 0x7f) as u8);
        value >>= 7;
    }
    out.push(value as u8);
}

/// A string literal (RFC 7541 §5.2), Huffman-coded or not.
pub fn string(s: &[u8], huffman_coded: bool, out: &mut Vec<u8>) {
    if huffman_coded {
        let coded = huffman(s);
        integer(coded.len(), 7, 0x80, out);
        out.extend_from_slice(&coded);
    } else {
        integer(s.len(), 7, 0x00, out);
        out.extend_from_slice(s);
    }
}

/// A literal header field whose name is static table entry `name_index` (RFC 7541 §6.2.1 when
/// `indexed`, else §6.2.2).
pub fn literal(
    name_index: usize,
    value: &[u8],
    indexed: bool,
    huffman_coded: bool,
    out: &mut Vec<u8>,
) {
    if indexed {
        integer(name_index, 6, 0x40, out);
    } else {
        integer(name_index, 4, 0x00, out);
    }
    string(value, huffman_coded, out);
}

#[test]
fn huffman_matches_rfc_7541_appendix_c4() {
    assert_eq!(
        huffman(b"www.example.com"),
        [
            0xf1, 0xe3, 0xc2, 0xe5, 0xf2, 0x3a, 0x6b, 0xa0, 0xab, 0x90, 0xf4, 0xff
        ]
    );
    assert_eq!(huffman(b"no-cache"), [0xa8, 0xeb, 0x10, 0x64, 0x9c, 0xbf]);
}
