//! `grpc-message` as every client can read it: tonic percent-encodes spaces and some printable
//! characters, which the gRPC spec allows but does not ask for; clients that never decode the
//! header (the 2016 Go client of this API) show `process%20not%20found`, or worse, feed it to
//! printf. This layer re-encodes the header, in a response's headers (errors before any message)
//! and trailers (errors in a stream), so only `%` and octets outside 0x20–0x7E are encoded, as
//! the spec's "Percent-Encoded" rule has it. Decoding clients get the same text either way.
//!
//! Owns: that re-encoding. Does not own: the text itself (crate::error) or its status code.

use http::header::{HeaderMap, HeaderValue};
use http_body_util::BodyExt;
use percent_encoding::{AsciiSet, CONTROLS, percent_decode, percent_encode};
use tonic::body::Body;

/// What the spec requires encoded: controls (and, always, non-ASCII octets) and `%` itself.
const ENCODED: &AsciiSet = &CONTROLS.add(b'%');
const GRPC_MESSAGE: &str = "grpc-message";

/// For `tower::util::MapResponseLayer` on the server.
pub fn readable_grpc_message(response: http::Response<Body>) -> http::Response<Body> {
    let (mut parts, body) = response.into_parts();
    reencode(&mut parts.headers);
    let body = body.map_frame(|mut frame| {
        if let Some(trailers) = frame.trailers_mut() {
            reencode(trailers);
        }
        frame
    });
    http::Response::from_parts(parts, Body::new(body))
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
