//! A status as every client can read it on the wire.
//!
//! `grpc-message`: tonic percent-encodes spaces and some printable characters, which the gRPC
//! spec allows but does not ask for; clients that never decode the header (the 2016 Go client of
//! this API) show `process%20not%20found`, or worse, feed it to printf. This layer re-encodes the
//! header, in a response's headers (errors before any message) and trailers (errors in a stream),
//! so only `%` and octets outside 0x20–0x7E are encoded, as the spec's "Percent-Encoded" rule has
//! it. Decoding clients get the same text either way.
//!
//! `grpc-status` of a message over its limit ([`MessageLimits`]): tonic answers OUT_OF_RANGE
//! ("Error, decoded message length too large: …"), where gRPC's table of status codes, grpc-go
//! and berthd's other limits say RESOURCE_EXHAUSTED, naming the limit. berthd never answers
//! OUT_OF_RANGE itself, so the code alone tells which responses these are.
//!
//! A unary request whose body holds no whole message (none at all, or a length prefix promising
//! more bytes than came): tonic answers INTERNAL with its own capitalised text, which is
//! malformed input like any other bytes that do not decode as the request, so INVALID_ARGUMENT
//! saying what was wrong. (A compressed-flag without `grpc-encoding` stays INTERNAL: gRPC's
//! compression spec requires it.)
//!
//! Owns: that re-encoding and those codes. Does not own: any other status or text
//! (crate::error).

use http::header::{HeaderMap, HeaderValue};
use http_body_util::BodyExt;
use percent_encoding::{AsciiSet, CONTROLS, percent_decode, percent_encode};
use tonic::body::Body;

/// What the spec requires encoded: controls (and, always, non-ASCII octets) and `%` itself.
const ENCODED: &AsciiSet = &CONTROLS.add(b'%');
const GRPC_MESSAGE: &str = "grpc-message";
const GRPC_STATUS: &str = "grpc-status";

/// What tonic holds messages to. A response may be as large as `--max-message-bytes` (State of
/// many containers); a request is never larger than an AddProcess whose spec is as large as
/// `--max-process-spec-bytes` lets it be (encoded, at most about half again its bytes), and tonic
/// holds a request's bytes until the whole message is in: a client that announces messages it
/// never finishes holds this much per stream, not `--max-message-bytes`.
#[derive(Debug, Clone, Copy)]
pub struct MessageLimits {
    pub message_bytes: usize,
    pub request_bytes: usize,
}

impl MessageLimits {
    /// Room in a request for what is not the process's spec (ids, paths, the user).
    const REQUEST_OVERHEAD: usize = 64 * 1024;

    pub fn new(message_bytes: usize, process_spec_bytes: usize) -> MessageLimits {
        let request_bytes = process_spec_bytes
            .saturating_mul(2)
            .saturating_add(MessageLimits::REQUEST_OVERHEAD)
            .min(message_bytes);
        MessageLimits {
            message_bytes,
            request_bytes,
        }
    }

    /// The limit a request is over, named as a person can change it.
    fn request_limit(&self) -> String {
        if self.request_bytes < self.message_bytes {
            format!(
                "the largest request berthd takes ({}: twice --max-process-spec-bytes and 64 KiB)",
                self.request_bytes
            )
        } else {
            format!("--max-message-bytes ({})", self.message_bytes)
        }
    }
}

/// For `tower::util::MapResponseLayer` on the server, with the server's limits.
pub fn status_on_the_wire(
    limits: MessageLimits,
) -> impl Fn(http::Response<Body>) -> http::Response<Body> + Clone {
    move |response| {
        let (mut parts, body) = response.into_parts();
        fix(&mut parts.headers, &limits);
        let body = body.map_frame(move |mut frame| {
            if let Some(trailers) = frame.trailers_mut() {
                fix(trailers, &limits);
            }
            frame
        });
        http::Response::from_parts(parts, Body::new(body))
    }
}

fn fix(headers: &mut HeaderMap, limits: &MessageLimits) {
    over_size_is_resource_exhausted(headers, limits);
    no_whole_message_is_invalid_argument(headers);
    bad_compressed_flag_is_invalid_argument(headers);
    unimplemented_says_what(headers);
    reencode(headers);
}

/// tonic's text for a message whose compressed-flag is neither 0 nor 1 ("…, while sending
/// request", from a server), up to the flag.
const BAD_FLAG: &[u8] = b"protocol error: received message with invalid compression flag: ";

/// A compressed-flag other than 0 and 1 is malformed input: INVALID_ARGUMENT, saying which
/// flags are. (A flag of 1 with no `grpc-encoding` stays INTERNAL, as gRPC's compression spec
/// requires.)
fn bad_compressed_flag_is_invalid_argument(headers: &mut HeaderMap) {
    if !has_status(headers, b"13") {
        return;
    }
    let said = message(headers);
    let Some(rest) = said.strip_prefix(BAD_FLAG) else {
        return;
    };
    let flag: String = rest
        .iter()
        .take_while(|b| b.is_ascii_digit())
        .map(|&b| char::from(b))
        .collect();
    let text = format!(
        "the request's message has compressed-flag {flag}: it must be 0, or 1 with a grpc-encoding header"
    );
    if let Ok(value) = HeaderValue::try_from(text) {
        headers.insert(GRPC_STATUS, HeaderValue::from_static("3"));
        headers.insert(GRPC_MESSAGE, value);
    }
}

/// tonic's UNIMPLEMENTED says nothing for a method no service has, and, capitalised, only that
/// a request's compression "isn't supported": each says what to do instead. (berthd takes no
/// compressed request: see the services' setup in crate::daemon.)
fn unimplemented_says_what(headers: &mut HeaderMap) {
    if !has_status(headers, b"12") {
        return;
    }
    let said = message(headers);
    let text = if said.is_empty() {
        "no such method: berthd serves types.API (proto/api.proto) and berth.daemon.Daemon (proto/daemon.proto)".to_owned()
    } else if let Some(rest) = said.strip_prefix(b"Content is compressed with `".as_slice()) {
        let encoding = rest
            .strip_suffix(b"` which isn't supported".as_slice())
            .unwrap_or(rest);
        format!(
            "compressed requests ({}) are not taken: send them uncompressed (grpc's default)",
            crate::error::quote(&String::from_utf8_lossy(encoding))
        )
    } else {
        return;
    };
    if let Ok(value) = HeaderValue::try_from(text) {
        headers.insert(GRPC_MESSAGE, value);
    }
}

/// tonic's texts for a request body without a whole message (`tonic::server::Grpc` and
/// `tonic::codec::decode`), and what berthd says instead.
const NO_WHOLE_MESSAGE: [(&str, &str); 2] = [
    (
        "Missing request message.",
        "the request has no message: a unary call sends exactly one",
    ),
    (
        "Unexpected EOF decoding stream.",
        "the request's message is cut short: its length prefix counts more bytes than the body holds",
    ),
];

/// Whether `headers` carry `grpc-status` `code`.
fn has_status(headers: &HeaderMap, code: &[u8]) -> bool {
    headers.get(GRPC_STATUS).map(HeaderValue::as_bytes) == Some(code)
}

/// The `grpc-message` of `headers`, decoded.
fn message(headers: &HeaderMap) -> Vec<u8> {
    headers
        .get(GRPC_MESSAGE)
        .map(|value| percent_decode(value.as_bytes()).collect())
        .unwrap_or_default()
}

fn no_whole_message_is_invalid_argument(headers: &mut HeaderMap) {
    if !has_status(headers, b"13") {
        return;
    }
    let said = message(headers);
    let Some((_, text)) = NO_WHOLE_MESSAGE
        .iter()
        .find(|(tonics, _)| tonics.as_bytes() == said)
    else {
        return;
    };
    headers.insert(GRPC_STATUS, HeaderValue::from_static("3"));
    headers.insert(GRPC_MESSAGE, HeaderValue::from_static(text));
}

fn over_size_is_resource_exhausted(headers: &mut HeaderMap, limits: &MessageLimits) {
    if !has_status(headers, b"11") {
        return;
    }
    let said = message(headers);
    let said = String::from_utf8_lossy(&said);
    let (what, limit) = if said.contains("decoded") {
        ("request", limits.request_limit())
    } else if said.contains("encoded") {
        (
            "response",
            format!("--max-message-bytes ({})", limits.message_bytes),
        )
    } else {
        (
            "message",
            format!("--max-message-bytes ({})", limits.message_bytes),
        )
    };
    let size = said
        .split_once("found ")
        .and_then(|(_, rest)| rest.split_once(' '))
        .and_then(|(number, _)| number.parse::<u64>().ok());
    let text = match size {
        Some(bytes) => format!("{what} of {bytes} bytes is over {limit}"),
        None => format!("{what} over {limit}"),
    };
    headers.insert(GRPC_STATUS, HeaderValue::from_static("8"));
    if let Ok(value) = HeaderValue::from_str(&text) {
        headers.insert(GRPC_MESSAGE, value);
    }
}

fn reencode(headers: &mut HeaderMap) {
    let Some(value) = headers.get(GRPC_MESSAGE) else {
        return;
    };
    let text: Vec<u8> = percent_decode(value.as_bytes()).collect();
    let encoded = percent_encode(&text, ENCODED).to_string();
    if let Ok(value) = HeaderValue::from_str(&encoded) {
        headers.insert(GRPC_MESSAGE, value);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn roundtrip(message: &str) -> String {
        let mut headers = tonic::Status::not_found(message)
            .into_http::<Body>()
            .into_parts()
            .0
            .headers;
        reencode(&mut headers);
        headers[GRPC_MESSAGE].to_str().unwrap().to_owned()
    }

    fn over_size(status: tonic::Status) -> (tonic::Code, String) {
        over_limits(status, MessageLimits::new(4_194_304, 4_194_304))
    }

    fn over_limits(status: tonic::Status, limits: MessageLimits) -> (tonic::Code, String) {
        let mut headers = status.into_http::<Body>().into_parts().0.headers;
        fix(&mut headers, &limits);
        let code = tonic::Code::from_bytes(headers[GRPC_STATUS].as_bytes());
        (code, headers[GRPC_MESSAGE].to_str().unwrap().to_owned())
    }

    #[test]
    fn a_compressed_flag_other_than_0_and_1_is_invalid_argument() {
        let limits = MessageLimits::new(4_194_304, 4_194_304);
        let tonics = tonic::Status::internal(
            "protocol error: received message with invalid compression flag: 2 (valid flags are 0 and 1), while sending request",
        );
        let (code, text) = over_limits(tonics, limits);
        assert_eq!(code, tonic::Code::InvalidArgument);
        assert!(
            text.contains("compressed-flag 2") && text.contains("must be 0"),
            "{text}"
        );
        let no_encoding = tonic::Status::internal(
            "protocol error: received message with compressed-flag but no grpc-encoding was specified",
        );
        assert_eq!(over_limits(no_encoding, limits).0, tonic::Code::Internal);
    }

    #[test]
    fn unimplemented_says_which_services_and_compressions_berthd_takes() {
        let limits = MessageLimits::new(4_194_304, 4_194_304);
        let (code, text) = over_limits(tonic::Status::unimplemented(""), limits);
        assert_eq!(code, tonic::Code::Unimplemented);
        assert!(
            text.starts_with("no such method") && text.contains("types.API"),
            "{text}"
        );
        let zstd =
            tonic::Status::unimplemented("Content is compressed with `zstd` which isn't supported");
        let (code, text) = over_limits(zstd, limits);
        assert_eq!(code, tonic::Code::Unimplemented);
        let text = percent_decode(text.as_bytes())
            .decode_utf8_lossy()
            .into_owned();
        assert!(
            text.contains("zstd") && text.contains("uncompressed"),
            "{text}"
        );
        let other = tonic::Status::unimplemented("something else");
        assert_eq!(over_limits(other, limits).1, "something else");
    }

    #[test]
    fn a_request_without_a_whole_message_is_invalid_argument() {
        let missing = tonic::Status::internal("Missing request message.");
        assert_eq!(
            over_size(missing),
            (
                tonic::Code::InvalidArgument,
                "the request has no message: a unary call sends exactly one".to_owned()
            )
        );
        let cut = tonic::Status::internal("Unexpected EOF decoding stream.");
        assert_eq!(over_size(cut).0, tonic::Code::InvalidArgument);
        let compressed = tonic::Status::internal(
            "protocol error: received message with compressed-flag but no grpc-encoding was specified",
        );
        assert_eq!(over_size(compressed).0, tonic::Code::Internal);
        let own = tonic::Status::internal("Missing request message. (berthd)");
        assert_eq!(over_size(own).0, tonic::Code::Internal);
    }

    #[test]
    fn a_message_over_the_limit_is_resource_exhausted_naming_the_flag() {
        // tonic's own texts (tonic::codec::decode and encode).
        let decoded = tonic::Status::out_of_range(
            "Error, decoded message length too large: found 5015011 bytes, the limit is: 4194304 bytes",
        );
        assert_eq!(
            over_size(decoded),
            (
                tonic::Code::ResourceExhausted,
                "request of 5015011 bytes is over --max-message-bytes (4194304)".to_owned()
            )
        );
        let encoded = tonic::Status::out_of_range(
            "Error, encoded message length too large: found 4194305 bytes, the limit is: 4194304 bytes",
        );
        assert_eq!(
            over_size(encoded).1,
            "response of 4194305 bytes is over --max-message-bytes (4194304)"
        );
        let unknown = tonic::Status::out_of_range("something else");
        assert_eq!(
            over_size(unknown),
            (
                tonic::Code::ResourceExhausted,
                "message over --max-message-bytes (4194304)".to_owned()
            )
        );
        // With the default spec limit, a request is held to less than a response.
        let limits = MessageLimits::new(4_194_304, 262_144);
        assert_eq!(limits.request_bytes, 589_824);
        let decoded = tonic::Status::out_of_range(
            "Error, decoded message length too large: found 600000 bytes, the limit is: 589824 bytes",
        );
        assert_eq!(
            over_limits(decoded, limits).1,
            "request of 600000 bytes is over the largest request berthd takes (589824: twice --max-process-spec-bytes and 64 KiB)"
        );
        let other = tonic::Status::not_found("container a not found");
        assert_eq!(
            over_size(other),
            (tonic::Code::NotFound, "container a not found".to_owned())
        );
    }

    #[test]
    fn only_percent_and_octets_outside_printable_ascii_are_encoded() {
        assert_eq!(
            roundtrip("process 42 is not part of container \"a\" {x} <y> #1?"),
            "process 42 is not part of container \"a\" {x} <y> #1?"
        );
        assert_eq!(roundtrip("100% sure\nnext"), "100%25 sure%0Anext");
        assert_eq!(roundtrip("café"), "caf%C3%A9");
    }
}
