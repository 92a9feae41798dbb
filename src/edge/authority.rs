//! The header block rewrite: HPACK-decodes each block a client sends, with a dynamic table that
//! follows the client's encoder, and replaces an `:authority` that h2 would refuse with
//! `localhost`.
//!
//! Keeping h2's decoder in step is the subtle part. Until the first rewrite, every block goes on
//! unchanged, so h2's dynamic table stays a copy of the client's. A rewritten block cannot keep
//! that promise (a different value has a different size, and the table evicts by size), so from
//! the first rewrite on, every block on the connection is re-encoded as literals that never touch
//! the dynamic table: h2's table stops changing and is never referenced again, while this side
//! keeps decoding the client's references with the client's table.
//!
//! Owns: decoding (through `loona-hpack`), the rewrite decision, the literal re-encoding. Does not
//! own: the frames a block travels in ([`super::rewriter`]).

use loona_hpack::Decoder;

/// What an unusable `:authority` becomes: a valid authority, and what gRPC clients that dial a
/// unix socket by name send anyway.
pub const REPLACEMENT: &[u8] = b"localhost";
/// h2's SETTINGS_HEADER_TABLE_SIZE, which berthd's server leaves at the protocol default: a
/// client may not grow its table past it.
const H2_TABLE_SIZE: usize = 4096;

/// A header block the client sent is not valid HPACK, or the edge refuses it.
#[derive(Debug, thiserror::Error)]
#[error("malformed header block: {0}")]
pub struct HpackError(String);

/// One connection's header blocks, in order.
pub struct BlockRewriter {
    decoder: Decoder<'static>,
    /// Set by the first rewrite: from then on every block is re-encoded (see the module header).
    reencoding: bool,
    encoded: Vec<u8>,
}

impl Default for BlockRewriter {
    fn default() -> Self {
        let mut decoder = Decoder::new();
        decoder.set_max_allowed_table_size(H2_TABLE_SIZE);
        BlockRewriter {
            decoder,
            reencoding: false,
            encoded: Vec::new(),
        }
    }
}

impl BlockRewriter {
    /// Decodes one complete header block. Returns `None` when the block goes on as it came, or
    /// the block to send instead.
    pub fn rewrite(&mut self, block: &[u8]) -> Result<Option<&[u8]>, HpackError> {
        self.encoded.clear();
        let mut rewrote = false;
        let encoded = &mut self.encoded;
        self.decoder
            .decode_with_cb(block, |name, value| {
                if &*name == b":authority" && !acceptable(&value) {
                    rewrote = true;
                    encode_literal(&name, REPLACEMENT, encoded);
                } else {
                    encode_literal(&name, &value, encoded);
                }
            })
            .map_err(|e| HpackError(e.to_string()))?;
        self.reencoding |= rewrote;
        Ok(self.reencoding.then_some(&self.encoded[..]))
    }
}

/// Whether h2 takes `value` as the `:authority` (it parses it with the same function).
fn acceptable(value: &[u8]) -> bool {
    http::uri::Authority::try_from(value).is_ok()
}

/// Appends `name: value` as a literal header field without indexing (RFC 7541 §6.2.2), the name
/// by its static table index when it has one. No Huffman coding: the bytes only cross a local
/// socket.
fn encode_literal(name: &[u8], value: &[u8], out: &mut Vec<u8>) {
    match STATIC_NAMES.iter().position(|n| *n == name) {
        Some(i) => encode_integer(i + 1, 4, 0x00, out),
        None => {
            out.push(0x00);
            encode_string(name, out);
        }
    }
    encode_string(value, out);
}

fn encode_string(s: &[u8], out: &mut Vec<u8>) {
    encode_integer(s.len(), 7, 0x00, out);
    out.extend_from_slice(s);
}

/// RFC 7541 §5.1: `value` with an N-bit prefix, the first octet's other bits set to `flags`.
fn encode_integer(mut value: usize, prefix_bits: u8, flags: u8, out: &mut Vec<u8>) {
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

/// The names of RFC 7541's static table (Appendix A), each at its first index minus one.
const STATIC_NAMES: [&[u8]; 61] = [
    b":authority",
    b":method",
    b":method",
    b":path",
    b":path",
    b":scheme",
    b":scheme",
    b":status",
    b":status",
    b":status",
    b":status",
    b":status",
    b":status",
    b":status",
    b"accept-charset",
    b"accept-encoding",
    b"accept-language",
    b"accept-ranges",
    b"accept",
    b"access-control-allow-origin",
    b"age",
    b"allow",
    b"authorization",
    b"cache-control",
    b"content-disposition",
    b"content-encoding",
    b"content-language",
    b"content-length",
    b"content-location",
    b"content-range",
    b"content-type",
    b"cookie",
    b"date",
    b"etag",
    b"expect",
    b"expires",
    b"from",
    b"host",
    b"if-match",
    b"if-modified-since",
    b"if-none-match",
    b"if-range",
    b"if-unmodified-since",
    b"last-modified",
    b"link",
    b"location",
    b"max-forwards",
    b"proxy-authenticate",
    b"proxy-authorization",
    b"range",
    b"referer",
    b"refresh",
    b"retry-after",
    b"server",
    b"set-cookie",
    b"strict-transport-security",
    b"transfer-encoding",
    b"user-agent",
    b"vary",
    b"via",
    b"www-authenticate",
];

#[cfg(test)]
mod tests;
