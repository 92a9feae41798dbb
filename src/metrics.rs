//! The metrics endpoint (`--metrics-listen`): berth's own counters and gauges in the Prometheus
//! (OpenMetrics) text format, over HTTP/1 on a TCP address or a unix socket.
//!
//! Owns: the metric names, reading them from their owners at scrape time, and the tiny HTTP
//! server and its limits (connections at once, one request each, a deadline for each). Does not
//! own: the values (supervisor, stats hub, event bus keep them).

use std::collections::VecDeque;
use std::convert::Infallible;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use http_body_util::Full;
use hyper::body::Bytes;
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric};
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::registry::Registry;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use crate::container_metrics::{self, ContainerSeries};
use crate::error::{Error, Result};
use crate::stats::StatsHub;
use crate::supervisor::Supervisor;

const CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// How long one connection may take from its accept to its response written. A scrape takes
/// milliseconds (Prometheus gives up after 10 s by default); a client that sends nothing or reads
/// nothing loses its place after it.
const CONNECTION_DEADLINE: Duration = Duration::from_secs(10);

/// Reads every value from its owner when scraped, so nothing is counted twice.
struct Sources {
    supervisor: Arc<Supervisor>,
    stats: Arc<StatsHub>,
}

impl std::fmt::Debug for Sources {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("berth metric sources")
    }
}

fn gauge(encoder: &mut DescriptorEncoder, name: &str, help: &str, value: i64) -> std::fmt::Result {
    let metric = ConstGauge::new(value);
    metric.encode(encoder.encode_descriptor(name, help, None, metric.metric_type())?)
}

fn counter<N: prometheus_client::encoding::EncodeCounterValue>(
    encoder: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    value: N,
) -> std::fmt::Result {
    let metric = ConstCounter::new(value);
    metric.encode(encoder.encode_descriptor(name, help, None, metric.metric_type())?)
}

impl Collector for Sources {
    fn encode(&self, mut encoder: DescriptorEncoder) -> std::fmt::Result {
        let (containers, processes) = self.supervisor.counts();
        let (sampled, subscribers) = self.stats.tracked();
        let sampler = self.stats.counters();
        let events = self.supervisor.events().counts();
        let e = &mut encoder;
        gauge(
            e,
            "berth_containers",
            "Containers tracked",
            containers as i64,
        )?;
        gauge(
            e,
            "berth_processes",
            "Processes tracked: container inits and added processes",
            processes as i64,
        )?;
        gauge(
            e,
            "berth_stats_containers",
            "Containers with open stats files",
            sampled as i64,
        )?;
        gauge(
            e,
            "berth_stats_subscribers",
            "GetStats subscribers",
            subscribers as i64,
        )?;
        let load = |n: &std::sync::atomic::AtomicU64| n.load(Ordering::Relaxed);
        counter(
            e,
            "berth_sampler_batches",
            "Sampler ticks that read files, one read batch each",
            load(&sampler.batches),
        )?;
        counter(
            e,
            "berth_sampler_files_read",
            "Stats files read",
            load(&sampler.files_read),
        )?;
        counter(
            e,
            "berth_sampler_read_errors",
            "Stats files that could not be read or parsed",
            load(&sampler.read_errors),
        )?;
        counter(
            e,
            "berth_sampler_syscalls",
            "io_uring_enter calls, or preads, of the sampler",
            load(&sampler.syscalls),
        )?;
        counter(
            e,
            "berth_sampler_tick_seconds",
            "Time spent in sampler ticks",
            load(&sampler.tick_nanos_total) as f64 / 1e9,
        )?;
        let last = ConstGauge::new(load(&sampler.last_tick_nanos) as f64 / 1e9);
        last.encode(e.encode_descriptor(
            "berth_sampler_last_tick_seconds",
            "Duration of the latest sampler tick",
            None,
            last.metric_type(),
        )?)?;
        counter(
            e,
            "berth_events_published",
            "Events published",
            events.published,
        )?;
        counter(
            e,
            "berth_events_subscribers_cut_off",
            "Events subscribers cut off for falling behind",
            events.cut_off,
        )?;
        Ok(())
    }
}

pub struct Metrics {
    registry: Registry,
}

impl Metrics {
    /// With `per_container`, also one series set per running container
    /// (`--metrics-containers`).
    pub fn new(supervisor: Arc<Supervisor>, stats: Arc<StatsHub>, per_container: bool) -> Metrics {
        let mut registry = Registry::default();
        if per_container {
            let series = ContainerSeries::start(Arc::clone(&supervisor), Arc::clone(&stats));
            registry.register_collector(Box::new(container_metrics::Shared(series)));
        }
        registry.register_collector(Box::new(Sources { supervisor, stats }));
        crate::instruments::register(&mut registry);
        Metrics { registry }
    }

    fn render(&self) -> String {
        let mut text = String::new();
        prometheus_client::encoding::text::encode(&mut text, &self.registry)
            .expect("writing to a String cannot fail");
        text
    }
}

fn respond(metrics: &Metrics, request: &Request<hyper::body::Incoming>) -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(Bytes::new()));
    if !matches!(*request.method(), hyper::Method::GET | hyper::Method::HEAD) {
        *response.status_mut() = StatusCode::METHOD_NOT_ALLOWED;
        response.headers_mut().insert(
            hyper::header::ALLOW,
            hyper::header::HeaderValue::from_static("GET, HEAD"),
        );
        *response.body_mut() = Full::new(Bytes::from_static(b"method not allowed: GET /metrics\n"));
        return response;
    }
    if request.uri().path() != "/metrics" {
        *response.status_mut() = StatusCode::NOT_FOUND;
        *response.body_mut() = Full::new(Bytes::from_static(b"not found: try /metrics\n"));
        return response;
    }
    *response.body_mut() = Full::new(Bytes::from(metrics.render()));
    response.headers_mut().insert(
        hyper::header::CONTENT_TYPE,
        hyper::header::HeaderValue::from_static(CONTENT_TYPE),
    );
    response
}

/// The connections holding a place, oldest first: a new one takes the place of the oldest
/// that has not sent a whole request yet when every place is taken, so connections that stay
/// silent, or send a byte now and then, cannot keep a scraper out (a scraper sends its request
/// as soon as it connects).
#[derive(Default)]
struct Places {
    open: Mutex<VecDeque<Held>>,
}

/// A connection's place, shared with the task serving it.
struct Held {
    place: Arc<Mutex<Option<OwnedSemaphorePermit>>>,
    /// Its request's head has arrived whole.
    asked: Arc<AtomicBool>,
    task: tokio::task::AbortHandle,
}

impl Places {
    fn open(&self) -> std::sync::MutexGuard<'_, VecDeque<Held>> {
        lock(&self.open)
    }

    /// The place of the oldest connection that has not asked yet, which is closed.
    fn take_from_silent(&self) -> Option<OwnedSemaphorePermit> {
        let mut open = self.open();
        let silent = open
            .iter()
            .position(|held| !held.asked.load(Ordering::Relaxed) && lock(&held.place).is_some())?;
        let held = open.remove(silent)?;
        held.task.abort();
        lock(&held.place).take()
    }
}

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(|e| e.into_inner())
}

/// Serves an accepted connection if there is a place for it, or one a connection that has not
/// asked gives up; else closes it at once, so a flood costs berthd no fd beyond the places.
fn admit<S>(metrics: Arc<Metrics>, permits: &Arc<Semaphore>, places: &Arc<Places>, stream: S)
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let place = Arc::clone(permits)
        .try_acquire_owned()
        .ok()
        .or_else(|| places.take_from_silent());
    match place {
        Some(place) => serve_connection(metrics, stream, place, places),
        None => tracing::debug!("metrics connection closed: every place is taken"),
    }
}

/// Serves one request on `stream`, holding `place` until the connection is closed (or gives it
/// to a newer connection while it has not asked).
fn serve_connection<S>(
    metrics: Arc<Metrics>,
    stream: S,
    place: OwnedSemaphorePermit,
    places: &Places,
) where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let asked = Arc::new(AtomicBool::new(false));
    let asking = Arc::clone(&asked);
    // hyper calls the service once the request's head is whole.
    let service = hyper::service::service_fn(move |request| {
        asking.store(true, Ordering::Relaxed);
        let response = respond(&metrics, &request);
        async move { Ok::<_, Infallible>(response) }
    });
    let place = Arc::new(Mutex::new(Some(place)));
    let held = Arc::clone(&place);
    let task = tokio::spawn(async move {
        // One request a connection: its deadline then bounds all it may hold.
        let connection = hyper::server::conn::http1::Builder::new()
            .keep_alive(false)
            .serve_connection(TokioIo::new(stream), service);
        match tokio::time::timeout(CONNECTION_DEADLINE, connection).await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => tracing::debug!(error = %e, "metrics connection"),
            Err(_) => tracing::debug!("metrics connection closed at its deadline"),
        }
        drop(lock(&held).take());
    });
    let mut open = places.open();
    // Those that ended leave here, so the list holds no more than the places.
    open.retain(|held| lock(&held.place).is_some());
    open.push_back(Held {
        place,
        asked,
        task: task.abort_handle(),
    });
}

/// Where the endpoint listens: a path (anything with a `/`) is a unix socket, else a TCP
/// address.
pub enum Listener {
    Tcp(tokio::net::TcpListener),
    Unix(tokio::net::UnixListener),
}

impl Listener {
    pub async fn bind(addr: &str) -> Result<Listener> {
        if addr.contains('/') {
            // A socket file left by a berthd that died; the caller holds berthd's locks.
            crate::listener::remove_stale_socket(std::path::Path::new(addr))?;
            let listener = tokio::net::UnixListener::bind(addr).map_err(|e| Error::io(addr, e))?;
            return Ok(Listener::Unix(listener));
        }
        let socket_addr: std::net::SocketAddr = addr.parse().map_err(|_| {
            Error::InvalidArgument(format!(
                "--metrics-listen {addr:?} is neither host:port nor a socket path"
            ))
        })?;
        let listener = tokio::net::TcpListener::bind(socket_addr)
            .await
            .map_err(|e| Error::sys(format!("listen on {addr}"), e))?;
        Ok(Listener::Tcp(listener))
    }

    /// The TCP address actually bound (port 0 picks one).
    pub fn local_addr(&self) -> Option<std::net::SocketAddr> {
        match self {
            Listener::Tcp(listener) => listener.local_addr().ok(),
            Listener::Unix(_) => None,
        }
    }

    /// Serves `metrics` on at most `most` connections at once until `stopping` turns true.
    pub async fn serve(
        self,
        metrics: Arc<Metrics>,
        most: usize,
        mut stopping: tokio::sync::watch::Receiver<bool>,
    ) {
        let permits = Arc::new(Semaphore::new(most));
        let places = Arc::new(Places::default());
        loop {
            let accepted = tokio::select! {
                accepted = self.accept(&metrics, &permits, &places) => accepted,
                _ = stopping.wait_for(|stop| *stop) => return,
            };
            if let Err(e) = accepted {
                tracing::warn!(error = %e, "metrics endpoint accept failed");
                // Out of fds or similar: do not spin.
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }

    async fn accept(
        &self,
        metrics: &Arc<Metrics>,
        permits: &Arc<Semaphore>,
        places: &Arc<Places>,
    ) -> std::io::Result<()> {
        let metrics = Arc::clone(metrics);
        match self {
            Listener::Tcp(listener) => admit(metrics, permits, places, listener.accept().await?.0),
            Listener::Unix(listener) => admit(metrics, permits, places, listener.accept().await?.0),
        }
        Ok(())
    }
}
