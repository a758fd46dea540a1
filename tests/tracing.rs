//! OpenTelemetry tracing against a real OTLP/HTTP receiver started by the test (protobuf
//! decoded with the OpenTelemetry proto types): one server span and one attempt span per
//! request with the right attributes and parents; the backend sees the attempt's
//! `traceparent`; a sampled client trace is followed even at `sample_ratio = 0`; with the
//! collector gone, no request fails and the drop counter rises.

mod common;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::*;
use opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest;
use opentelemetry_proto::tonic::common::v1::any_value::Value as Any;
use opentelemetry_proto::tonic::trace::v1::span::SpanKind;
use opentelemetry_proto::tonic::trace::v1::Span;
use prost::Message;

/// A minimal OTLP/HTTP collector: POST /v1/traces with a protobuf body.
struct Collector {
    addr: SocketAddr,
    spans: Arc<Mutex<Vec<Span>>>,
    service_names: Arc<Mutex<Vec<String>>>,
}

impl Collector {
    fn start() -> Collector {
        let l = TcpListener::bind("127.0.0.1:0").expect("bind");
        let addr = l.local_addr().expect("addr");
        let spans = Arc::new(Mutex::new(Vec::new()));
        let names = Arc::new(Mutex::new(Vec::new()));
        let (sp, nm) = (spans.clone(), names.clone());
        std::thread::spawn(move || {
            for c in l.incoming().flatten() {
                let (sp, nm) = (sp.clone(), nm.clone());
                std::thread::spawn(move || serve(c, &sp, &nm));
            }
        });
        Collector {
            addr,
            spans,
            service_names: names,
        }
    }

    fn spans(&self) -> Vec<Span> {
        self.spans.lock().expect("lock").clone()
    }
}

/// HTTP/1.1 requests on one connection (the exporter keeps it alive).
fn serve(mut c: std::net::TcpStream, spans: &Mutex<Vec<Span>>, names: &Mutex<Vec<String>>) {
    let mut buf = Vec::new();
    let mut chunk = [0u8; 65536];
    loop {
        let head_end = loop {
            if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                break i + 4;
            }
            match c.read(&mut chunk) {
                Ok(0) | Err(_) => return,
                Ok(n) => buf.extend_from_slice(&chunk[..n]),
            }
        };
        let head = String::from_utf8_lossy(&buf[..head_end]).to_string();
        let len: usize = head_header(&head, "content-length")
            .and_then(|v| v.parse().ok())
            .unwrap_or(0);
        while buf.len() < head_end + len {
            match c.read(&mut chunk) {
                Ok(0) | Err(_) => return,
                Ok(n) => buf.extend_from_slice(&chunk[..n]),
            }
        }
        let body: Vec<u8> = buf[head_end..head_end + len].to_vec();
        buf.drain(..head_end + len);
        assert!(head.starts_with("POST /v1/traces "), "{head}");
        assert!(
            head.to_ascii_lowercase().contains("application/x-protobuf"),
            "{head}"
        );
        let req = ExportTraceServiceRequest::decode(body.as_slice()).expect("OTLP protobuf");
        for rs in req.resource_spans {
            if let Some(r) = &rs.resource {
                for kv in &r.attributes {
                    if kv.key == "service.name" {
                        if let Some(Any::StringValue(s)) =
                            kv.value.as_ref().and_then(|v| v.value.clone())
                        {
                            names.lock().expect("lock").push(s);
                        }
                    }
                }
            }
            for ss in rs.scope_spans {
                spans.lock().expect("lock").extend(ss.spans);
            }
        }
        let _ = c.write_all(
            b"HTTP/1.1 200 OK\r\ncontent-type: application/x-protobuf\r\ncontent-length: 0\r\n\r\n",
        );
    }
}

fn attr(s: &Span, key: &str) -> Option<String> {
    s.attributes.iter().find(|kv| kv.key == key).and_then(|kv| {
        match kv.value.as_ref()?.value.as_ref()? {
            Any::StringValue(v) => Some(v.clone()),
            Any::IntValue(v) => Some(v.to_string()),
            Any::BoolValue(v) => Some(v.to_string()),
            Any::DoubleValue(v) => Some(v.to_string()),
            _ => None,
        }
    })
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

fn start(
    dir: &std::path::Path,
    endpoint: &str,
    ratio: &str,
) -> (Sluice, SocketAddr, Backend, Backend) {
    let blue = Backend::start(dir, "blue");
    let green = Backend::start(dir, "green");
    let listen = free_addr();
    let config = format!(
        r#"
[server]
access_log = "access.jsonl"
[admin]
listen = "{{admin}}"
[tracing]
otlp_endpoint = "{endpoint}"
sample_ratio = {ratio}
service_name = "sluice-test"
[[listener]]
listen = "{listen}"
{shop}"#,
        shop = shop_pools_and_route(blue.addr, green.addr, (100, 0))
    );
    (Sluice::start(dir, &config), listen, blue, green)
}

#[test]
fn every_request_is_a_server_span_with_an_attempt_span_the_backend_continues() {
    let collector = Collector::start();
    let dir = tempdir();
    let (s, listen, blue, _green) = start(dir.path(), &format!("http://{}", collector.addr), "1.0");
    let r = request(listen, "GET", "/_demo/headers", &[]).expect("answer");
    assert_eq!(r.code, 200, "{}", r.body);
    let seen: serde_json::Value = serde_json::from_str(&r.body).expect("json");
    let tp = seen["headers"]["traceparent"]
        .as_str()
        .expect("the backend got a traceparent")
        .to_string();
    let parts: Vec<&str> = tp.split('-').collect();
    assert_eq!(parts.len(), 4, "{tp}");
    assert!(wait_until(Duration::from_secs(5), || collector
        .spans()
        .len()
        >= 2));
    let spans = collector.spans();
    assert_eq!(spans.len(), 2, "{spans:#?}");
    let server = spans
        .iter()
        .find(|s| s.kind == SpanKind::Server as i32)
        .expect("server span");
    let attempt = spans
        .iter()
        .find(|s| s.kind == SpanKind::Client as i32)
        .expect("attempt span");
    assert_eq!(server.trace_id, attempt.trace_id);
    assert!(
        server.parent_span_id.is_empty(),
        "a new trace starts at the server span"
    );
    assert_eq!(
        attempt.parent_span_id, server.span_id,
        "the attempt is the server span's child"
    );
    // the backend saw the attempt span as its parent
    assert_eq!(parts[1], hex(&attempt.trace_id));
    assert_eq!(parts[2], hex(&attempt.span_id));
    assert_eq!(parts[3], "01");
    for (k, v) in [
        ("sluice.route", "shop"),
        ("sluice.color", "blue"),
        ("sluice.pool", "blue"),
        ("http.response.status_code", "200"),
        ("http.request.method", "GET"),
        ("client.address", "127.0.0.1"),
        ("sluice.retries", "0"),
    ] {
        assert_eq!(attr(server, k).as_deref(), Some(v), "{k}: {server:#?}");
    }
    assert_eq!(attr(server, "sluice.backend"), Some(blue.addr.to_string()));
    assert_eq!(
        attr(attempt, "server.address").as_deref(),
        Some("127.0.0.1")
    );
    assert_eq!(
        attr(attempt, "server.port"),
        Some(blue.addr.port().to_string())
    );
    assert_eq!(
        attr(attempt, "http.response.status_code").as_deref(),
        Some("200")
    );
    assert!(collector
        .service_names
        .lock()
        .expect("lock")
        .iter()
        .all(|n| n == "sluice-test"));
    // the trace id is in the access log line
    let want = hex(&server.trace_id);
    assert!(wait_until(Duration::from_secs(3), || {
        std::fs::read_to_string(dir.path().join("access.jsonl"))
            .unwrap_or_default()
            .contains(&format!("\"trace_id\":\"{want}\""))
    }));
    drop(s);
}

#[test]
fn a_sampled_client_trace_is_followed_even_at_ratio_0() {
    let collector = Collector::start();
    let dir = tempdir();
    let (s, listen, _blue, _green) = start(dir.path(), &format!("http://{}", collector.addr), "0");
    // a request without a trace: not recorded at ratio 0 (but still carries a context)
    let r = request(listen, "GET", "/_demo/headers", &[]).expect("answer");
    let seen: serde_json::Value = serde_json::from_str(&r.body).expect("json");
    assert!(seen["headers"]["traceparent"]
        .as_str()
        .is_some_and(|t| t.ends_with("-00")));
    // a sampled one from the client: followed
    let trace = "4bf92f3577b34da6a3ce929d0e0e4736";
    let parent = "00f067aa0ba902b7";
    let tp = format!("00-{trace}-{parent}-01");
    let r = request(
        listen,
        "GET",
        "/_demo/headers",
        &[("traceparent", &tp), ("tracestate", "vendor=abc")],
    )
    .expect("answer");
    let seen: serde_json::Value = serde_json::from_str(&r.body).expect("json");
    let upstream = seen["headers"]["traceparent"]
        .as_str()
        .expect("traceparent")
        .to_string();
    assert!(upstream.starts_with(&format!("00-{trace}-")), "{upstream}");
    assert!(
        !upstream.contains(parent),
        "the backend's parent is sluice's attempt span"
    );
    assert_eq!(seen["headers"]["tracestate"], "vendor=abc");
    assert!(wait_until(Duration::from_secs(5), || collector
        .spans()
        .len()
        >= 2));
    std::thread::sleep(Duration::from_millis(1200));
    let spans = collector.spans();
    assert_eq!(
        spans.len(),
        2,
        "only the client's sampled trace: {spans:#?}"
    );
    let server = spans
        .iter()
        .find(|s| s.kind == SpanKind::Server as i32)
        .expect("server");
    assert_eq!(hex(&server.trace_id), trace);
    assert_eq!(hex(&server.parent_span_id), parent);
    drop(s);
}

#[test]
fn with_the_collector_gone_requests_go_on_and_drops_are_counted() {
    // a port nobody listens on
    let gone = free_addr();
    let dir = tempdir();
    let (s, listen, _blue, _green) = start(dir.path(), &format!("http://{gone}"), "1.0");
    let mut failed = 0;
    for _ in 0..300 {
        if request(listen, "GET", "/", &[]).map(|r| r.code) != Some(200) {
            failed += 1;
        }
    }
    assert_eq!(failed, 0);
    assert!(
        wait_until(Duration::from_secs(10), || s
            .metric("sluice_trace_spans_dropped_total")
            .is_some_and(|n| n >= 600.0)),
        "drops: {:?}",
        s.metric("sluice_trace_spans_dropped_total")
    );
}
