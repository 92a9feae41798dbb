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
//! Owns: the rewrite decision and the literal re-encoding. Does not own: decoding
//! ([`super::hpack`]) or the frames a block travels in ([`super::rewriter`]).

pub use super::hpack::HpackError;
use super::hpack::{ENTRY_OVERHEAD, HpackDecoder, STATIC_TABLE};

/// What an unusable `:authority` becomes: a valid authority, and what gRPC clients that dial a
/// unix socket by name send anyway.
pub const REPLACEMENT: &[u8] = b"localhost";
/// h2's SETTINGS_HEADER_TABLE_SIZE, which berthd's server leaves at the protocol default: a
/// client may not grow its table past it.
const H2_TABLE_SIZE: usize = 4096;
/// The SETTINGS_MAX_HEADER_LIST_SIZE berthd's HTTP/2 server announces (hyper's default, set
/// explicitly so that the edge's limit below follows it).
pub const MAX_HEADER_LIST_SIZE: u32 = 16 * 1024;
/// The decoded size (RFC 7541 §4.1: each field's name and value plus 32) past which a block ends
/// the connection. A block of 64 KiB (the most the edge gathers) can decode to a quarter of a
/// gigabyte by referring to one large table entry over and over; h2 closes the connection of a block past four times its header
/// list size, and the edge, which decodes first, stops at the same point. Between the two sizes
/// h2 refuses the stream only, so the edge passes such a block on (re-encoded where it must be).
const MAX_DECODED: usize = 4 * MAX_HEADER_LIST_SIZE as usize;
/// The encoding buffer kept between blocks that pass unchanged; a larger one (up to
/// [`MAX_DECODED`]) is given back at its block's end, so an idle connection holds little.
const KEPT_ENCODED: usize = 4 * 1024;

/// One connection's header blocks, in order.
pub struct BlockRewriter {
    decoder: HpackDecoder,
    /// Set by the first rewrite: from then on every block is re-encoded (see the module header).
    reencoding: bool,
    /// The block being encoded: handed over when it is sent instead of the client's.
    encoded: Vec<u8>,
}

impl Default for BlockRewriter {
    fn default() -> Self {
        BlockRewriter {
            decoder: HpackDecoder::new(H2_TABLE_SIZE),
            reencoding: false,
            encoded: Vec::new(),
        }
    }
}

impl BlockRewriter {
    /// Decodes one complete header block. Returns `None` when the block goes on as it came, or
    /// the block to send instead.
    pub fn rewrite(&mut self, block: &[u8]) -> Result<Option<Vec<u8>>, HpackError> {
        self.encoded.clear();
        let mut rewrote = false;
        let mut decoded = 0usize;
        let encoded = &mut self.encoded;
        // Decoding stops at the limit: a block of 2-byte fields that each copy a 4 KB name into
        // the table anew would otherwise cost a hundred MB of copying before it is refused.
        self.decoder.decode(block, |name, value| {
            decoded = decoded.saturating_add(name.len() + value.len() + ENTRY_OVERHEAD);
            if decoded > MAX_DECODED {
                return Err(HpackError("header list larger than the server takes"));
            }
            if name == b":authority" && !acceptable(value) {
                rewrote = true;
                encode(name, REPLACEMENT, encoded);
            } else {
                encode(name, value, encoded);
            }
            Ok(())
        })?;
        self.reencoding |= rewrote;
        if self.reencoding {
            return Ok(Some(std::mem::take(&mut self.encoded)));
        }
        self.encoded.clear();
        self.encoded.shrink_to(KEPT_ENCODED);
        Ok(None)
    }
}

/// Whether h2 takes `value` as the `:authority` (it parses it with the same function).
fn acceptable(value: &[u8]) -> bool {
    http::uri::Authority::try_from(value).is_ok()
}

/// Appends `name: value` without touching the dynamic table: as its static table index if the
/// static table has it (RFC 7541 §6.1), else as a literal without indexing (§6.2.2), the name by
/// its static table index when it has one. No Huffman coding: the bytes only cross a local socket.
fn encode(name: &[u8], value: &[u8], out: &mut Vec<u8>) {
    if let Some(i) = STATIC_TABLE
        .iter()
        .position(|entry| *entry == (name, value))
    {
        return encode_integer(i + 1, 7, 0x80, out);
    }
    match STATIC_TABLE.iter().position(|(n, _)| *n == name) {
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

#[cfg(test)]
mod tests;
