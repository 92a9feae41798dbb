//! Which requests are gRPC's: those whose `content-type` is `application/grpc`, alone or with a
//! `+subtype` or `;parameters`, as the gRPC over HTTP/2 spec has it. tonic serves any request on
//! a method's path whatever its content-type (a `text/plain` POST got a gRPC answer with status
//! 200). The spec asks a server to answer anything else with HTTP 415 (Unsupported Media Type), so
//! that an HTTP/2 client that is not gRPC's cannot read the answer's 200 as a success; berthd
//! does, with `grpc-status` INTERNAL and a message in the same header block for gRPC clients
//! that sent a wrong content-type by mistake (grpc-go answers the same).
//!
//! A gRPC request's method is POST. tonic serves any (a GET or PUT CreateContainer made a
//! container); berthd answers another with HTTP 405 (Method Not Allowed) and `grpc-status`
//! INTERNAL, as grpc-go does.
//!
//! A request's `grpc-timeout`, when it has one, is 1 to 8 digits and a unit (`H`, `M`, `S`, `m`,
//! `u`, `n`); tonic ignores one that is not, serving the call with no deadline, where grpc-go
//! refuses it. berthd refuses it as malformed input, INVALID_ARGUMENT, as it does a request that
//! does not decode.
//!
//! Owns: those checks and their answers. Does not own: the status text of any other error
//! (grpc_message, crate::error).

use std::task::{Context, Poll};
use std::time::Duration;

use futures_util::future::{Either, Ready, ready};
use http::header::{CONTENT_TYPE, HeaderValue};
use tonic::body::Body;

const GRPC: &[u8] = b"application/grpc";
const REFUSAL: &str = "a grpc request's content-type must be application/grpc (or application/grpc+proto); this request's was not";

/// Whether `content_type` names gRPC: `application/grpc` and nothing else, or followed by a
/// `+subtype` or `;parameters` (the type compared without regard to case, as HTTP's are).
pub fn is_grpc(content_type: &[u8]) -> bool {
    content_type.len() >= GRPC.len()
        && content_type[..GRPC.len()].eq_ignore_ascii_case(GRPC)
        && matches!(content_type.get(GRPC.len()), None | Some(b'+' | b';'))
}

/// The time a `grpc-timeout` gives, if `value` is one as the spec has it: 1 to 8 ASCII digits,
/// then one unit.
pub fn grpc_timeout(value: &[u8]) -> Option<Duration> {
    let (unit, digits) = value.split_last()?;
    if !(1..=8).contains(&digits.len()) || !digits.iter().all(u8::is_ascii_digit) {
        return None;
    }
    let count = digits
        .iter()
        .fold(0u64, |n, digit| n * 10 + u64::from(digit - b'0'));
    match unit {
        b'H' => Some(Duration::from_secs(count * 3600)),
        b'M' => Some(Duration::from_secs(count * 60)),
        b'S' => Some(Duration::from_secs(count)),
        b'm' => Some(Duration::from_millis(count)),
        b'u' => Some(Duration::from_micros(count)),
        b'n' => Some(Duration::from_nanos(count)),
        _ => None,
    }
}

const NOT_POST: &str = "a grpc request's method must be POST; this request's was not";

const MALFORMED_TIMEOUT: &str = "malformed grpc-timeout: give 1 to 8 digits and a unit (H, M, S, m, u or n), as 100m for 100 milliseconds";

/// Answers requests that are not gRPC's with 415, those whose method is not POST with 405,
/// and those with a malformed `grpc-timeout` with INVALID_ARGUMENT, before they reach the
/// services.
#[derive(Clone, Copy, Debug)]
pub struct GrpcOnlyLayer;

impl<S> tower::Layer<S> for GrpcOnlyLayer {
    type Service = GrpcOnly<S>;

    fn layer(&self, inner: S) -> Self::Service {
        GrpcOnly { inner }
    }
}

#[derive(Clone, Debug)]
pub struct GrpcOnly<S> {
    inner: S,
}

impl<S> tower::Service<http::Request<Body>> for GrpcOnly<S>
where
    S: tower::Service<http::Request<Body>, Response = http::Response<Body>>,
{
    type Response = http::Response<Body>;
    type Error = S::Error;
    type Future = Either<Ready<Result<http::Response<Body>, S::Error>>, S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: http::Request<Body>) -> Self::Future {
        let grpc = request
            .headers()
            .get(CONTENT_TYPE)
            .is_some_and(|value| is_grpc(value.as_bytes()));
        if !grpc {
            return Either::Left(ready(Ok(refusal(
                http::StatusCode::UNSUPPORTED_MEDIA_TYPE,
                tonic::Code::Internal,
                REFUSAL,
            ))));
        }
        if request.method() != http::Method::POST {
            return Either::Left(ready(Ok(refusal(
                http::StatusCode::METHOD_NOT_ALLOWED,
                tonic::Code::Internal,
                NOT_POST,
            ))));
        }
        let timeout = request.headers().get("grpc-timeout");
        if timeout.is_some_and(|value| grpc_timeout(value.as_bytes()).is_none()) {
            let refused = refusal(
                http::StatusCode::OK,
                tonic::Code::InvalidArgument,
                MALFORMED_TIMEOUT,
            );
            return Either::Left(ready(Ok(refused)));
        }
        Either::Right(self.inner.call(request))
    }
}

/// An answer with HTTP `status` that ends the stream with its headers, carrying gRPC `code` and
/// `message` (printable ASCII, sent as it is) for a gRPC client to show.
fn refusal(
    status: http::StatusCode,
    code: tonic::Code,
    message: &'static str,
) -> http::Response<Body> {
    let mut response = http::Response::new(Body::empty());
    *response.status_mut() = status;
    let headers = response.headers_mut();
    headers.insert(CONTENT_TYPE, HeaderValue::from_static("application/grpc"));
    headers.insert("grpc-status", HeaderValue::from(code as i32));
    headers.insert("grpc-message", HeaderValue::from_static(message));
    response
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grpc_with_or_without_a_subtype_or_parameters_is_grpc() {
        for value in [
            &b"application/grpc"[..],
            b"application/grpc+proto",
            b"application/grpc+json",
            b"application/grpc;charset=utf-8",
            b"Application/GRPC",
        ] {
            assert!(is_grpc(value), "{}", String::from_utf8_lossy(value));
        }
    }

    #[test]
    fn a_grpc_timeout_is_one_to_eight_digits_and_a_unit() {
        for (value, time) in [
            (&b"1S"[..], Duration::from_secs(1)),
            (b"100m", Duration::from_millis(100)),
            (b"99999999n", Duration::from_nanos(99_999_999)),
            (b"0H", Duration::ZERO),
            (b"5M", Duration::from_secs(300)),
            (b"30u", Duration::from_micros(30)),
            (b"99999999H", Duration::from_secs(99_999_999 * 3600)),
            (b"00000007S", Duration::from_secs(7)),
        ] {
            let text = String::from_utf8_lossy(value);
            assert_eq!(grpc_timeout(value), Some(time), "{text}");
        }
        for value in [
            &b""[..],
            b"S",
            b"-1S",
            b"1X",
            b"1.5S",
            b" 1S",
            b"1S ",
            b"100000000S",
            b"1s",
            b"\xff1S",
        ] {
            assert_eq!(
                grpc_timeout(value),
                None,
                "{}",
                String::from_utf8_lossy(value)
            );
        }
    }

    proptest::proptest! {
        #[test]
        fn any_bytes_are_a_timeout_only_in_the_spec_s_form(value in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..12)) {
            let text = String::from_utf8_lossy(&value);
            let spec = value.len() >= 2
                && value.len() <= 9
                && text.chars().last().is_some_and(|unit| "HMSmun".contains(unit))
                && text[..text.len() - 1].chars().all(|c| c.is_ascii_digit())
                && !text.contains('\u{fffd}');
            proptest::prop_assert_eq!(grpc_timeout(&value).is_some(), spec);
        }

        #[test]
        fn every_timeout_in_the_spec_s_form_is_taken(digits in "[0-9]{1,8}", unit in "[HMSmun]") {
            let value = format!("{digits}{unit}");
            let count: u64 = digits.parse().unwrap();
            let nanos = u128::from(count) * match unit.as_str() {
                "H" => 3_600_000_000_000,
                "M" => 60_000_000_000,
                "S" => 1_000_000_000,
                "m" => 1_000_000,
                "u" => 1_000,
                _ => 1,
            };
            let time = grpc_timeout(value.as_bytes());
            proptest::prop_assert_eq!(time.map(|t| t.as_nanos()), Some(nanos));
        }
    }

    #[test]
    fn anything_else_is_not() {
        for value in [
            &b""[..],
            b"application/grpcx",
            b"application/grp",
            b"application/json",
            b"text/plain",
            b"application/grpc-web",
            b" application/grpc",
        ] {
            assert!(!is_grpc(value), "{}", String::from_utf8_lossy(value));
        }
    }

    #[tokio::test]
    async fn a_request_that_is_not_grpc_never_reaches_the_service() {
        use tower::{Layer, ServiceExt};
        let reached = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let service = {
            let reached = std::sync::Arc::clone(&reached);
            tower::service_fn(move |_: http::Request<Body>| {
                reached.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                ready(Ok::<_, std::convert::Infallible>(http::Response::new(
                    Body::empty(),
                )))
            })
        };
        let service = GrpcOnlyLayer.layer(service);
        let request = |content_type: Option<&'static str>| {
            let mut request = http::Request::new(Body::empty());
            *request.method_mut() = http::Method::POST;
            if let Some(value) = content_type {
                request
                    .headers_mut()
                    .insert(CONTENT_TYPE, HeaderValue::from_static(value));
            }
            request
        };
        for refused in [None, Some("text/plain")] {
            let answer = service.clone().oneshot(request(refused)).await.unwrap();
            assert_eq!(answer.status(), 415, "{refused:?}");
            assert_eq!(answer.headers()["grpc-status"], "13");
        }
        for method in [http::Method::GET, http::Method::PUT] {
            let mut not_post = request(Some("application/grpc"));
            *not_post.method_mut() = method.clone();
            let answer = service.clone().oneshot(not_post).await.unwrap();
            assert_eq!(answer.status(), 405, "{method}");
            assert_eq!(answer.headers()["grpc-status"], "13");
        }
        assert_eq!(reached.load(std::sync::atomic::Ordering::Relaxed), 0);
        let answer = service
            .oneshot(request(Some("application/grpc")))
            .await
            .unwrap();
        assert_eq!(answer.status(), 200);
        assert_eq!(reached.load(std::sync::atomic::Ordering::Relaxed), 1);
    }
}
