//! HTTP/2 framing as far as the edge needs it (RFC 9113 §4.1, §6.2, §6.10): the connection
//! preface, the 9-octet frame header, and the parts of a HEADERS payload around its header block
//! fragment. Pure functions over byte slices.
//!
//! Owns: parsing and writing frame headers, splitting a HEADERS payload. Does not own: what the
//! frames mean (h2 does), or the header block inside them ([`super::authority`]).

/// What every HTTP/2 client sends first (RFC 9113 §3.4).
pub const PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
/// The length of a frame header.
pub const HEADER_LEN: usize = 9;
/// The largest frame payload a peer may send before the receiver raises SETTINGS_MAX_FRAME_SIZE;
/// berthd's server never raises it, so frames the edge writes stay within it.
pub const DEFAULT_MAX_FRAME: usize = 16_384;

pub const HEADERS: u8 = 0x1;
pub const CONTINUATION: u8 = 0x9;

pub const END_STREAM: u8 = 0x1;
pub const END_HEADERS: u8 = 0x4;
pub const PADDED: u8 = 0x8;
pub const PRIORITY: u8 = 0x20;

/// A frame header as it came off the wire.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FrameHeader {
    pub length: usize,
    pub kind: u8,
    pub flags: u8,
    /// The stream identifier, without the reserved bit.
    pub stream: u32,
}

impl FrameHeader {
    /// Parses the first [`HEADER_LEN`] octets of `buf`, or `None` if there are fewer.
    pub fn parse(buf: &[u8]) -> Option<FrameHeader> {
        let h: &[u8; HEADER_LEN] = buf.get(..HEADER_LEN)?.try_into().ok()?;
        Some(FrameHeader {
            length: usize::from(h[0]) << 16 | usize::from(h[1]) << 8 | usize::from(h[2]),
            kind: h[3],
            flags: h[4],
            stream: u32::from_be_bytes([h[5], h[6], h[7], h[8]]) & 0x7fff_ffff,
        })
    }

    /// Appends the header's 9 octets to `out`. `length` must fit in 24 bits.
    pub fn write(&self, out: &mut Vec<u8>) {
        debug_assert!(self.length < 1 << 24);
        let length = (self.length as u32).to_be_bytes();
        out.extend_from_slice(&length[1..]);
        out.push(self.kind);
        out.push(self.flags);
        out.extend_from_slice(&self.stream.to_be_bytes());
    }
}

/// A HEADERS payload split around its header block fragment.
#[derive(Debug, PartialEq, Eq)]
pub struct HeadersPayload<'a> {
    /// The stream dependency and weight, when the PRIORITY flag is set.
    pub priority: Option<&'a [u8]>,
    pub fragment: &'a [u8],
}

/// Splits a HEADERS payload with `flags`, dropping its padding; `None` if the padding or priority
/// fields do not fit, which RFC 9113 §6.2 makes a connection error.
pub fn split_headers(flags: u8, payload: &[u8]) -> Option<HeadersPayload<'_>> {
    let mut rest = payload;
    let mut padding = 0;
    if flags & PADDED != 0 {
        let (&pad, tail) = rest.split_first()?;
        padding = usize::from(pad);
        rest = tail;
    }
    let mut priority = None;
    if flags & PRIORITY != 0 {
        let (fields, tail) = rest.split_at_checked(5)?;
        priority = Some(fields);
        rest = tail;
    }
    let fragment = rest.get(..rest.len().checked_sub(padding)?)?;
    Some(HeadersPayload { priority, fragment })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_frame_header_round_trips_and_drops_the_reserved_bit() {
        let wire = [0x00, 0x40, 0x01, HEADERS, END_HEADERS, 0x80, 0, 0, 3];
        let header = FrameHeader::parse(&wire).unwrap();
        assert_eq!(
            header,
            FrameHeader {
                length: 0x4001,
                kind: HEADERS,
                flags: END_HEADERS,
                stream: 3
            }
        );
        let mut out = Vec::new();
        header.write(&mut out);
        assert_eq!(out, [0x00, 0x40, 0x01, HEADERS, END_HEADERS, 0, 0, 0, 3]);
        assert_eq!(FrameHeader::parse(&wire[..8]), None);
    }

    #[test]
    fn a_headers_payload_loses_its_padding_and_keeps_its_priority() {
        let payload = [2, 1, 2, 3, 4, 5, b'a', b'b', 0, 0];
        let split = split_headers(PADDED | PRIORITY, &payload).unwrap();
        assert_eq!(split.priority, Some(&[1, 2, 3, 4, 5][..]));
        assert_eq!(split.fragment, b"ab");
        assert_eq!(split_headers(0, b"ab").unwrap().fragment, b"ab");
        assert_eq!(split_headers(PADDED, &[3, b'a', 0]), None);
        assert_eq!(split_headers(PRIORITY, &[1, 2]), None);
        assert_eq!(split_headers(PADDED, &[]), None);
    }
}
