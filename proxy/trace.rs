//! Request tracing with OpenTelemetry (`[tracing]`): one server span per request and a child
//! span per upstream attempt, W3C `traceparent`/`tracestate` continued from the client (or a new
//! trace started), and the upstream request carrying the attempt span's context.
//!
//! Sampling is parent-based: a sampled incoming `traceparent` is always followed, a new trace is
//! recorded with probability `sample_ratio`. Ended spans go into a bounded queue (a full queue
//! drops them, counted in `sluice_trace_spans_dropped_total`); one thread of its own batches them
//! and exports them over OTLP/HTTP (protobuf). An exporter that cannot reach its collector
//! loses batches (counted the same way) but never slows a request: the request path only ever
//! tries to put a span in the queue.

use std::sync::mpsc::{sync_channel, Receiver, RecvTimeoutError, SyncSender, TrySendError};
use std::sync::Arc;
use std::time::{Duration, Instant};

use http::HeaderValue;
use opentelemetry::propagation::{Extractor, Injector, TextMapPropagator};
use opentelemetry::trace::{SpanKind, Status, TraceContextExt, Tracer as _};
use opentelemetry::{Context, KeyValue};
use opentelemetry_sdk::error::OTelSdkResult;
use opentelemetry_sdk::propagation::TraceContextPropagator;
use opentelemetry_sdk::trace::{
    Sampler, SdkTracer, SdkTracerProvider, SpanData, SpanExporter as _, SpanProcessor,
};
use pingora::http::RequestHeader;
use prometheus::IntCounter;

/// Ended spans waiting for export; past this many, new ones are dropped.
const QUEUE: usize = 8192;
/// Spans per export request.
const BATCH: usize = 512;
/// A batch is sent at least this often.
const FLUSH_EVERY: Duration = Duration::from_secs(1);
/// One export call gives up after this long.
const EXPORT_TIMEOUT: Duration = Duration::from_secs(5);

/// `[tracing]` as validated.
#[derive(Debug, Clone, PartialEq)]
pub struct Config {
    /// The collector's base URL; `/v1/traces` is appended.
    pub endpoint: String,
    pub sample_ratio: f64,
    pub service_name: String,
}

pub struct Tracing {
    /// Keeps its provider (and so the span processor) alive.
    tracer: SdkTracer,
    propagator: TraceContextPropagator,
    /// A new trace is recorded when its random id falls below this (`sample_ratio` of 2^64).
    threshold: u64,
}

impl Tracing {
    pub fn start(cfg: &Config, dropped: IntCounter) -> Result<Tracing, String> {
        let url = format!("{}/v1/traces", cfg.endpoint.trim_end_matches('/'));
        let (tx, rx) = sync_channel::<SpanData>(QUEUE);
        let exporter_dropped = dropped.clone();
        let resource = opentelemetry_sdk::Resource::builder_empty()
            .with_service_name(cfg.service_name.clone())
            .build();
        let thread_resource = resource.clone();
        std::thread::Builder::new()
            .name("trace-export".into())
            .spawn(move || export_loop(&url, rx, exporter_dropped, thread_resource))
            .map_err(|e| format!("cannot start the trace exporter thread: {e}"))?;
        let provider = SdkTracerProvider::builder()
            // the sampling decision is taken before the SDK is asked (start_request): what
            // reaches it is recorded
            .with_sampler(Sampler::AlwaysOn)
            .with_resource(resource)
            .with_span_processor(Queue { tx, dropped })
            .build();
        let tracer = opentelemetry::trace::TracerProvider::tracer(&provider, "sluice");
        Ok(Tracing {
            tracer,
            propagator: TraceContextPropagator::new(),
            threshold: (cfg.sample_ratio.clamp(0.0, 1.0) * u64::MAX as f64) as u64,
        })
    }

    /// Starts the server span of a request, continuing the client's trace if it sent one.
    /// Parent-based sampling: a sampled incoming trace is recorded, an unsampled one is not, a
    /// new one is with probability `sample_ratio`. A trace that is not recorded costs no SDK
    /// work: only its ids are kept, to pass the context on.
    pub fn start_request(&self, req: &RequestHeader) -> RequestTrace {
        let incoming = req.headers.get("traceparent").is_some();
        let parent = if incoming {
            self.propagator.extract(&Headers(req))
        } else {
            Context::new()
        };
        let remote = parent.span().span_context().clone();
        let record = if remote.is_valid() {
            remote.is_sampled()
        } else {
            fastrand::u64(..) < self.threshold || self.threshold == u64::MAX
        };
        if !record {
            let trace_id = if remote.is_valid() {
                u128::from_be_bytes(remote.trace_id().to_bytes())
            } else {
                loop {
                    let id = fastrand::u128(..);
                    if id != 0 {
                        break id;
                    }
                }
            };
            return RequestTrace::Light { trace_id };
        }
        let span = self
            .tracer
            .span_builder(req.method.as_str().to_string())
            .with_kind(SpanKind::Server)
            .start_with_context(&self.tracer, &parent);
        RequestTrace::Recorded(Recorded {
            server: parent.with_span(span),
            attempt: None,
            attempts: 0,
        })
    }

    /// Starts the span of one upstream attempt (ending an unfinished earlier one as failed).
    pub fn start_attempt(&self, t: &mut RequestTrace, method: &str, backend: std::net::SocketAddr) {
        let RequestTrace::Recorded(t) = t else {
            return;
        };
        t.end_attempt(Some("retried on another backend"));
        t.attempts += 1;
        let span = self
            .tracer
            .span_builder(format!("upstream {method}"))
            .with_kind(SpanKind::Client)
            .with_attributes([
                KeyValue::new("server.address", backend.ip().to_string()),
                KeyValue::new("server.port", i64::from(backend.port())),
                KeyValue::new("sluice.attempt", i64::from(t.attempts)),
            ])
            .start_with_context(&self.tracer, &t.server);
        t.attempt = Some(t.server.with_span(span));
    }

    /// Sets `traceparent` (and `tracestate`) of the upstream request to the attempt's span (a
    /// trace not recorded passes on its trace id, unsampled, with a new parent id).
    pub fn inject(&self, t: &RequestTrace, upstream: &mut RequestHeader) {
        match t {
            RequestTrace::Recorded(t) => {
                let cx = t.attempt.as_ref().unwrap_or(&t.server);
                upstream.remove_header("traceparent");
                upstream.remove_header("tracestate");
                self.propagator
                    .inject_context(cx, &mut HeadersMut(upstream));
            }
            RequestTrace::Light { trace_id } => {
                // the client's tracestate (if any) goes on untouched
                let tp = format!("00-{trace_id:032x}-{:016x}-00", fastrand::u64(1..));
                if let Ok(v) = HeaderValue::from_str(&tp) {
                    let _ = upstream.insert_header("traceparent", v);
                }
            }
        }
    }
}

/// The trace of one request: recorded (SDK spans), or only its id, passed on.
pub enum RequestTrace {
    Recorded(Recorded),
    Light { trace_id: u128 },
}

/// The spans of one recorded request.
pub struct Recorded {
    server: Context,
    attempt: Option<Context>,
    attempts: u8,
}

impl RequestTrace {
    /// The trace id (32 hex digits) for the access log.
    pub fn trace_id(&self) -> String {
        match self {
            RequestTrace::Recorded(r) => r.server.span().span_context().trace_id().to_string(),
            RequestTrace::Light { trace_id } => format!("{trace_id:032x}"),
        }
    }

    /// The attempt's answer.
    pub fn attempt_status(&self, status: u16) {
        let RequestTrace::Recorded(r) = self else {
            return;
        };
        if let Some(cx) = &r.attempt {
            let span = cx.span();
            span.set_attribute(KeyValue::new(
                "http.response.status_code",
                i64::from(status),
            ));
            if status >= 500 {
                span.set_status(Status::error(format!("backend answered {status}")));
            }
        }
    }

    /// Ends the server span with the request's attributes (built only when recorded).
    pub fn end(self, attrs: impl FnOnce() -> Vec<KeyValue>, status: u16, error: Option<&str>) {
        let RequestTrace::Recorded(mut r) = self else {
            return;
        };
        r.end_attempt(error);
        let span = r.server.span();
        span.set_attributes(attrs());
        if status >= 500 || status == 0 {
            span.set_status(Status::error(
                error.map_or_else(|| format!("answered {status}"), str::to_string),
            ));
        }
        span.end();
    }
}

impl Recorded {
    /// Ends the attempt span, failed when `error` says why.
    fn end_attempt(&mut self, error: Option<&str>) {
        if let Some(cx) = self.attempt.take() {
            let span = cx.span();
            if let Some(e) = error {
                span.set_attribute(KeyValue::new("error.type", e.to_string()));
                span.set_status(Status::error(e.to_string()));
            }
            span.end();
        }
    }
}

struct Headers<'a>(&'a RequestHeader);

impl Extractor for Headers<'_> {
    fn get(&self, key: &str) -> Option<&str> {
        self.0.headers.get(key).and_then(|v| v.to_str().ok())
    }
    fn keys(&self) -> Vec<&str> {
        self.0.headers.keys().map(|k| k.as_str()).collect()
    }
}

struct HeadersMut<'a>(&'a mut RequestHeader);

impl Injector for HeadersMut<'_> {
    fn set(&mut self, key: &str, value: String) {
        if let Ok(v) = HeaderValue::from_str(&value) {
            let _ = self.0.insert_header(key.to_string(), v);
        }
    }
}

/// Puts ended, sampled spans in the export queue; never waits.
#[derive(Debug)]
struct Queue {
    tx: SyncSender<SpanData>,
    dropped: IntCounter,
}

impl SpanProcessor for Queue {
    fn on_start(&self, _span: &mut opentelemetry_sdk::trace::Span, _cx: &Context) {}

    fn on_end(&self, span: SpanData) {
        if !span.span_context.is_sampled() {
            return;
        }
        match self.tx.try_send(span) {
            Ok(()) => {}
            Err(TrySendError::Full(_)) | Err(TrySendError::Disconnected(_)) => self.dropped.inc(),
        }
    }

    fn force_flush(&self) -> OTelSdkResult {
        Ok(())
    }

    fn shutdown_with_timeout(&self, _timeout: Duration) -> OTelSdkResult {
        Ok(())
    }
}

/// The exporter thread: batches of at most `BATCH` spans, at least every `FLUSH_EVERY`.
fn export_loop(
    url: &str,
    rx: Receiver<SpanData>,
    dropped: IntCounter,
    resource: opentelemetry_sdk::Resource,
) {
    use opentelemetry_otlp::{WithExportConfig, WithHttpConfig};
    let exporter = opentelemetry_otlp::SpanExporter::builder()
        .with_http()
        .with_protocol(opentelemetry_otlp::Protocol::HttpBinary)
        .with_endpoint(url.to_string())
        .with_timeout(EXPORT_TIMEOUT)
        .with_headers(Default::default())
        .build();
    let mut exporter = match exporter {
        Ok(e) => e,
        Err(e) => {
            log::error!("tracing disabled: cannot build the OTLP exporter for {url}: {e}");
            // drain, counting, so the request path keeps its promise of never waiting
            for _ in rx.iter() {
                dropped.inc();
            }
            return;
        }
    };
    exporter.set_resource(&resource);
    let mut batch = Vec::with_capacity(BATCH);
    let mut last = Instant::now();
    let mut warned = false;
    loop {
        let wait = FLUSH_EVERY.saturating_sub(last.elapsed());
        let closed = match rx.recv_timeout(wait) {
            Ok(s) => {
                batch.push(s);
                while batch.len() < BATCH {
                    match rx.try_recv() {
                        Ok(s) => batch.push(s),
                        Err(_) => break,
                    }
                }
                false
            }
            Err(RecvTimeoutError::Timeout) => false,
            Err(RecvTimeoutError::Disconnected) => true,
        };
        if !batch.is_empty() && (batch.len() >= BATCH || last.elapsed() >= FLUSH_EVERY || closed) {
            let n = batch.len() as u64;
            let sent = block_on(exporter.export(std::mem::take(&mut batch)));
            match sent {
                Ok(()) => warned = false,
                Err(e) => {
                    dropped.inc_by(n);
                    if !warned {
                        log::warn!(
                            "trace export to {url} failed ({e}); spans are dropped until it works"
                        );
                        warned = true;
                    }
                }
            }
            last = Instant::now();
        } else if batch.is_empty() {
            last = Instant::now();
        }
        if closed {
            return;
        }
    }
}

/// Runs a future to completion on this (non-async) thread.
fn block_on<F: std::future::Future>(f: F) -> F::Output {
    struct Unpark(std::thread::Thread);
    impl std::task::Wake for Unpark {
        fn wake(self: Arc<Self>) {
            self.0.unpark();
        }
    }
    let waker = std::task::Waker::from(Arc::new(Unpark(std::thread::current())));
    let mut cx = std::task::Context::from_waker(&waker);
    let mut f = std::pin::pin!(f);
    loop {
        match f.as_mut().poll(&mut cx) {
            std::task::Poll::Ready(v) => return v,
            std::task::Poll::Pending => std::thread::park(),
        }
    }
}
