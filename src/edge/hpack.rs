//! An HPACK decoder (RFC 7541) for the edge: the dynamic table, the field representations and
//! Huffman-coded strings. Written here rather than taken from a crate: the maintained
//! stand-alone one (`loona-hpack`) rebuilds a hash map of the whole Huffman code for every
//! Huffman-coded string, about 30 µs each, which made the edge cost 200 µs per request; this
//! one decodes the canonical code with a few operations per bit.
//!
//! Owns: decoding, and its limits (integers, the table size h2 allows). Does not own: what is
//! done with the fields ([`super::authority`]).

use std::collections::VecDeque;
use std::sync::LazyLock;

/// A header block that is not valid HPACK, or that h2 would refuse the same way.
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
#[error("malformed header block: {0}")]
pub struct HpackError(pub &'static str);

/// RFC 7541 §4.1: an entry's size is its name and value plus 32.
pub const ENTRY_OVERHEAD: usize = 32;

/// A dynamic table entry: name and value.
type Entry = (Box<[u8]>, Box<[u8]>);

/// The decoder of one connection's header blocks, its dynamic table following the client's.
pub struct HpackDecoder {
    /// Newest first.
    table: VecDeque<Entry>,
    size: usize,
    max_size: usize,
    /// The largest table size the client may choose (the server's SETTINGS_HEADER_TABLE_SIZE).
    allowed: usize,
}

impl HpackDecoder {
    pub fn new(allowed: usize) -> Self {
        HpackDecoder {
            table: VecDeque::new(),
            size: 0,
            max_size: allowed,
            allowed,
        }
    }

    /// Decodes one complete header block, calling `field` with each name and value in order;
    /// an error from `field` ends the decoding there (the block is refused, so the table need
    /// not follow the rest of it).
    pub fn decode(
        &mut self,
        block: &[u8],
        mut field: impl FnMut(&[u8], &[u8]) -> Result<(), HpackError>,
    ) -> Result<(), HpackError> {
        let mut rest = block;
        let mut fields_seen = false;
        while let Some(&first) = rest.first() {
            if first & 0x80 != 0 {
                let index = integer(&mut rest, 7)?;
                let (name, value) = self.entry(index)?;
                field(name, value)?;
            } else if first & 0xe0 == 0x20 {
                if fields_seen {
                    return Err(HpackError("table size update after a header field"));
                }
                let size = integer(&mut rest, 5)?;
                if size > self.allowed {
                    return Err(HpackError("table size update above the allowed size"));
                }
                self.max_size = size;
                self.evict(0);
                continue;
            } else {
                let indexing = first & 0xc0 == 0x40;
                let index = integer(&mut rest, if indexing { 6 } else { 4 })?;
                // Borrowed from the block or the table: copied only if the field is indexed.
                let name = match index {
                    0 => self.string(&mut rest)?,
                    i => Cow::Borrowed(self.entry(i)?.0),
                };
                let value = self.string(&mut rest)?;
                field(&name, &value)?;
                if indexing {
                    let (name, value) = (name.into_owned(), value.into_owned());
                    self.insert(name, value);
                }
            }
            fields_seen = true;
        }
        Ok(())
    }

    fn entry(&self, index: usize) -> Result<(&[u8], &[u8]), HpackError> {
        match index {
            0 => Err(HpackError("index 0")),
            1..=61 => Ok(STATIC_TABLE[index - 1]),
            _ => self
                .table
                .get(index - 62)
                .map(|(n, v)| (&n[..], &v[..]))
                .ok_or(HpackError("index beyond the dynamic table")),
        }
    }

    fn insert(&mut self, name: Vec<u8>, value: Vec<u8>) {
        let size = name.len() + value.len() + ENTRY_OVERHEAD;
        self.evict(size);
        if size <= self.max_size {
            self.size += size;
            self.table.push_front((name.into(), value.into()));
        }
    }

    /// Evicts the oldest entries until `room` more octets fit (or the table is empty).
    fn evict(&mut self, room: usize) {
        while self.size + room > self.max_size {
            let Some((name, value)) = self.table.pop_back() else {
                break;
            };
            self.size -= name.len() + value.len() + ENTRY_OVERHEAD;
        }
    }

    /// A string literal (§5.2), Huffman-decoded if coded.
    fn string<'a>(&self, rest: &mut &'a [u8]) -> Result<Cow<'a>, HpackError> {
        let coded = rest.first().is_some_and(|b| b & 0x80 != 0);
        let len = integer(rest, 7)?;
        let (raw, tail) = rest
            .split_at_checked(len)
            .ok_or(HpackError("string longer than the block"))?;
        *rest = tail;
        if !coded {
            return Ok(Cow::Borrowed(raw));
        }
        // The shortest code is 5 bits.
        let mut decoded = Vec::with_capacity(raw.len() * 8 / 5);
        huffman_decode(raw, &mut decoded)?;
        Ok(Cow::Owned(decoded))
    }
}

/// A decoded string: borrowed from the block, or Huffman-decoded.
enum Cow<'a> {
    Borrowed(&'a [u8]),
    Owned(Vec<u8>),
}

impl Cow<'_> {
    fn into_owned(self) -> Vec<u8> {
        match self {
            Cow::Borrowed(b) => b.to_vec(),
            Cow::Owned(v) => v,
        }
    }
}

impl std::ops::Deref for Cow<'_> {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        match self {
            Cow::Borrowed(b) => b,
            Cow::Owned(v) => v,
        }
    }
}

/// An integer with an N-bit prefix (§5.1), at most what fits in 28 bits: no block has a
/// string or table index that large.
fn integer(rest: &mut &[u8], prefix_bits: u8) -> Result<usize, HpackError> {
    const TRUNCATED: HpackError = HpackError("integer cut short");
    let (&first, mut tail) = rest.split_first().ok_or(TRUNCATED)?;
    let max = (1usize << prefix_bits) - 1;
    let mut value = usize::from(first) & max;
    if value == max {
        let mut shift = 0;
        loop {
            let (&b, next) = tail.split_first().ok_or(TRUNCATED)?;
            tail = next;
            if shift > 21 {
                return Err(HpackError("integer too large"));
            }
            value += usize::from(b & 0x7f) << shift;
            shift += 7;
            if b & 0x80 == 0 {
                break;
            }
        }
    }
    *rest = tail;
    Ok(value)
}

/// The Huffman code (Appendix B) as a canonical code: per code length, the first code, and
/// where its symbols start in the symbols sorted by (length, symbol).
struct Canonical {
    first_code: [u32; 31],
    first_slot: [usize; 31],
    count: [u32; 31],
    symbols: [u16; 257],
}

static CANONICAL: LazyLock<Canonical> = LazyLock::new(|| {
    let mut symbols: [u16; 257] = std::array::from_fn(|s| s as u16);
    symbols.sort_by_key(|&s| (CODE_LENGTHS[usize::from(s)], s));
    let mut count = [0u32; 31];
    for &length in &CODE_LENGTHS {
        count[usize::from(length)] += 1;
    }
    let (mut first_code, mut first_slot) = ([0u32; 31], [0usize; 31]);
    let (mut code, mut slot) = (0u32, 0usize);
    for length in 1..31 {
        first_code[length] = code;
        first_slot[length] = slot;
        code = (code + count[length]) << 1;
        slot += count[length] as usize;
    }
    Canonical {
        first_code,
        first_slot,
        count,
        symbols,
    }
});

/// Appends the Huffman-decoded `coded` to `out` (§5.2: EOS is an error, and the padding is at
/// most 7 bits, all ones).
fn huffman_decode(coded: &[u8], out: &mut Vec<u8>) -> Result<(), HpackError> {
    let canonical = &*CANONICAL;
    let (mut code, mut length) = (0u32, 0usize);
    for &byte in coded {
        for bit in (0..8).rev() {
            code = code << 1 | u32::from(byte >> bit & 1);
            length += 1;
            let offset = code.wrapping_sub(canonical.first_code[length]);
            if offset < canonical.count[length] {
                let symbol = canonical.symbols[canonical.first_slot[length] + offset as usize];
                if symbol == 256 {
                    return Err(HpackError("EOS in a Huffman-coded string"));
                }
                out.push(symbol as u8);
                (code, length) = (0, 0);
            } else if length == 30 {
                return Err(HpackError("invalid Huffman code"));
            }
        }
    }
    if length > 7 || code != (1 << length) - 1 {
        return Err(HpackError("invalid Huffman padding"));
    }
    Ok(())
}

/// The length in bits of each symbol's Huffman code (Appendix B); symbol 256 is EOS.
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

/// RFC 7541 Appendix A.
pub const STATIC_TABLE: [(&[u8], &[u8]); 61] = [
    (b":authority", b""),
    (b":method", b"GET"),
    (b":method", b"POST"),
    (b":path", b"/"),
    (b":path", b"/index.html"),
    (b":scheme", b"http"),
    (b":scheme", b"https"),
    (b":status", b"200"),
    (b":status", b"204"),
    (b":status", b"206"),
    (b":status", b"304"),
    (b":status", b"400"),
    (b":status", b"404"),
    (b":status", b"500"),
    (b"accept-charset", b""),
    (b"accept-encoding", b"gzip, deflate"),
    (b"accept-language", b""),
    (b"accept-ranges", b""),
    (b"accept", b""),
    (b"access-control-allow-origin", b""),
    (b"age", b""),
    (b"allow", b""),
    (b"authorization", b""),
    (b"cache-control", b""),
    (b"content-disposition", b""),
    (b"content-encoding", b""),
    (b"content-language", b""),
    (b"content-length", b""),
    (b"content-location", b""),
    (b"content-range", b""),
    (b"content-type", b""),
    (b"cookie", b""),
    (b"date", b""),
    (b"etag", b""),
    (b"expect", b""),
    (b"expires", b""),
    (b"from", b""),
    (b"host", b""),
    (b"if-match", b""),
    (b"if-modified-since", b""),
    (b"if-none-match", b""),
    (b"if-range", b""),
    (b"if-unmodified-since", b""),
    (b"last-modified", b""),
    (b"link", b""),
    (b"location", b""),
    (b"max-forwards", b""),
    (b"proxy-authenticate", b""),
    (b"proxy-authorization", b""),
    (b"range", b""),
    (b"referer", b""),
    (b"refresh", b""),
    (b"retry-after", b""),
    (b"server", b""),
    (b"set-cookie", b""),
    (b"strict-transport-security", b""),
    (b"transfer-encoding", b""),
    (b"user-agent", b""),
    (b"vary", b""),
    (b"via", b""),
    (b"www-authenticate", b""),
];

#[cfg(test)]
mod tests;
