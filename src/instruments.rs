//! Process-wide instruments the metrics endpoint exposes: per-RPC request counts by gRPC code
//! and latency histograms (recorded by [`RpcMetricsLayer`], a tower layer on the API server),
//! and runtime command durations and waits for a turn by operation (recorded by the runtime).
//!
//! Owns: these instruments, their names and buckets, and the layer. Does not own: serving
//! them (`metrics`), or what is timed. Names follow Prometheus conventions and
//! go-grpc-prometheus's labels (`grpc_service`, `grpc_method`, `grpc_code`).

use std::sync::OnceLock;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use futures_util::future::BoxFuture;
use prometheus_client::encoding::{EncodeLabelSet, EncodeLabelValue, LabelValueEncoder};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::{Family, MetricConstructor};
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;
use tonic::codegen::http;

// Labels borrow static names (the protos' methods, the runtime's operations) and keep the
// code as a number: recording a request allocates nothing. Names are spelled out when scraped.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct Handled {
    grpc_service: &'static str,
    grpc_method: &'static str,
    grpc_code: GrpcCode,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct Method {
    grpc_service: &'static str,
    grpc_method: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RuntimeOperation {
    operation: &'static str,
}

/// A gRPC code as go-grpc-prometheus names it (`OK`, `NotFound`, ...).
#[derive(Clone, Copy, Debug, Hash, PartialEq, Eq)]
struct GrpcCode(tonic::Code);

impl EncodeLabelValue for GrpcCode {
    fn encode(&self, encoder: &mut LabelValueEncoder) -> std::fmt::Result {
        use std::fmt::Write;
        match self.0 {
            tonic::Code::Ok => encoder.write_str("OK"),
            other => write!(encoder, "{other:?}"),
        }
    }
}

/// Histogram buckets, in seconds, doubling from `start`.
#[derive(Clone, Copy)]
struct Buckets {
    start: f64,
    count: u16,
}

impl MetricConstructor<Histogram> for Buckets {
    fn new_metric(&self) -> Histogram {
        Histogram::new(exponential_buckets(self.start, 2.0, self.count))
    }
}

struct Instruments {
    handled: Family<Handled, Counter>,
    handling: Family<Method, Histogram, Buckets>,
    runtime: Family<RuntimeOperation, Histogram, Buckets>,
    runtime_turn_wait: Family<RuntimeOperation, Histogram, Buckets>,
}

fn instruments() -> &'static Instruments {
    static INSTRUMENTS: OnceLock<Instruments> = OnceLock::new();
    INSTRUMENTS.get_or_init(|| Instruments {
        handled: Family::default(),
        // 1 ms to 33 s.
        handling: Family::new_with_constructor(Buckets {
            start: 0.001,
            count: 16,
        }),
        // 5 ms to 82 s: runtime commands take tens of milliseconds at best.
        runtime: Family::new_with_constructor(Buckets {
            start: 0.005,
            count: 15,
        }),
        // 1 ms to 33 s: most commands find a turn free and wait for none.
        runtime_turn_wait: Family::new_with_constructor(Buckets {
            start: 0.001,
            count: 16,
        }),
    })
}

/// Adds the instruments to `registry` (they keep counting across registries).
pub fn register(registry: &mut Registry) {
    let i = instruments();
    registry.register(
        "berth_grpc_server_handled",
        "RPCs completed, by method and gRPC status code (streams: once their response starts)",
        i.handled.clone(),
    );
    registry.register(
        "berth_grpc_server_handling_seconds",
        "Time until an RPC's response started (the whole of a unary call)",
        i.handling.clone(),
    );
    registry.register(
        "berth_runtime_command_duration_seconds",
        "Time runtime commands (runc create, start, exec, checkpoint, ...) took, by operation",
        i.runtime.clone(),
    );
    registry.register(
        "berth_runtime_turn_wait_seconds",
        "Time runtime commands waited for a turn (--max-runtime-processes run at once), by operation",
        i.runtime_turn_wait.clone(),
    );
}

/// Records how long one runtime command of `operation` took.
pub fn runtime_command(operation: &'static str, took: Duration) {
    observe_runtime(&instruments().runtime, operation, took);
}

/// Records how long one runtime command of `operation` waited for its turn
/// (`--max-runtime-processes`).
pub fn runtime_turn_wait(operation: &'static str, waited: Duration) {
    observe_runtime(&instruments().runtime_turn_wait, operation, waited);
}

fn observe_runtime(
    family: &Family<RuntimeOperation, Histogram, Buckets>,
    operation: &'static str,
    time: Duration,
) {
    family
        .get_or_create(&RuntimeOperation { operation })
        .observe(time.as_secs_f64());
}

/// `/types.API/CreateContainer` → (`types.API`, `CreateContainer`). Any path that is not one
/// of the protos' RPCs is `unknown`: a client chooses the path, and a series per made-up path
/// would hold memory for as long as berthd runs.
fn split_path(path: &str) -> (&'static str, &'static str) {
    berth_api::METHODS
        .iter()
        .find(|known| **known == path)
        .and_then(|known| known.trim_start_matches('/').split_once('/'))
        .unwrap_or(("unknown", "unknown"))
}

/// The gRPC code a response carries in its headers (a call that failed before its first
/// message); a response without one has started normally, and its code comes in the trailers.
fn code_of<B>(response: &http::Response<B>) -> GrpcCode {
    let code = response
        .headers()
        .get("grpc-status")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<i32>().ok())
        .map_or(tonic::Code::Ok, tonic::Code::from_i32);
    GrpcCode(code)
}

fn record(
    (grpc_service, grpc_method): (&'static str, &'static str),
    code: GrpcCode,
    took: Duration,
) {
    let i = instruments();
    i.handling
        .get_or_create(&Method {
            grpc_service,
            grpc_method,
        })
        .observe(took.as_secs_f64());
    i.handled
        .get_or_create(&Handled {
            grpc_service,
            grpc_method,
            grpc_code: code,
        })
        .inc();
}

/// The tower layer that counts and times every RPC of the server it wraps.
#[derive(Clone, Copy, Debug, Default)]
pub struct RpcMetricsLayer;

impl<S> tower::Layer<S> for RpcMetricsLayer {
    type Service = RpcMetrics<S>;

    fn layer(&self, inner: S) -> Self::Service {
        RpcMetrics { inner }
    }
}

#[derive(Clone, Debug)]
pub struct RpcMetrics<S> {
    inner: S,
}

impl<S, B, R> tower::Service<http::Request<B>> for RpcMetrics<S>
where
    S: tower::Service<http::Request<B>, Response = http::Response<R>>,
    S::Future: Send + 'static,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = BoxFuture<'static, Result<S::Response, S::Error>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: http::Request<B>) -> Self::Future {
        let method = split_path(request.uri().path());
        let started = Instant::now();
        let response = self.inner.call(request);
        Box::pin(async move {
            let response = response.await;
            let code = match &response {
                Ok(response) => code_of(response),
                Err(_) => GrpcCode(tonic::Code::Unknown),
            };
            record(method, code, started.elapsed());
            response
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_and_codes() {
        assert_eq!(
            split_path("/types.API/CreateContainer"),
            ("types.API", "CreateContainer")
        );
        assert_eq!(
            split_path("/berth.daemon.Daemon/Upgrade"),
            ("berth.daemon.Daemon", "Upgrade")
        );
        for made_up in ["/types.API/Nope", "/x/State", "/types.API/State/", "", "/"] {
            assert_eq!(split_path(made_up), ("unknown", "unknown"), "{made_up:?}");
        }
        let failed = http::Response::builder()
            .header("grpc-status", "5")
            .body(())
            .unwrap();
        assert_eq!(code_of(&failed), GrpcCode(tonic::Code::NotFound));
        assert_eq!(code_of(&http::Response::new(())), GrpcCode(tonic::Code::Ok));
    }

    #[test]
    fn codes_are_named_as_go_grpc_prometheus_names_them() {
        let family = Family::<Handled, Counter>::default();
        for code in [tonic::Code::Ok, tonic::Code::NotFound] {
            family
                .get_or_create(&Handled {
                    grpc_service: "types.API",
                    grpc_method: "State",
                    grpc_code: GrpcCode(code),
                })
                .inc();
        }
        let mut registry = Registry::default();
        registry.register("handled", "", family);
        let mut text = String::new();
        prometheus_client::encoding::text::encode(&mut text, &registry).unwrap();
        for code in ["OK", "NotFound"] {
            let series = format!(
                "handled_total{{grpc_service=\"types.API\",grpc_method=\"State\",grpc_code=\"{code}\"}} 1"
            );
            assert!(text.contains(&series), "no {series} in:\n{text}");
        }
    }
}
