//! Acceptance tests for the core gateway: real `sluice`, real backends, real TLS, h2 and h2c.

mod common;

use std::collections::HashMap;
use std::net::SocketAddr;

use common::*;
use reqwest::Version;

/// A gateway with a plain listener (h1 + h2c) and a TLS listener (h2 + h1) in front of `pools`
/// (name, backends) with one catch-all route on the first pool, unless `routes` is given.
struct Setup {
    plain: SocketAddr,
    tls: SocketAddr,
    ca: Ca,
    sluice: Sluice,
}

fn gateway(dir: &std::path::Path, body: &str) -> Setup {
    let ca = Ca::new(dir, "front");
    let (cert, key) = ca.issue(dir, "front", &["localhost", "shop.test", "api.test"]);
    let plain = free_addr();
    let tls = free_addr();
    let config = format!(
        r#"
[server]
threads = 2
grace_period = "5s"
drain_delay = "100ms"
access_log = "stdout"

[admin]
listen = "{{admin}}"

[tls]
min_version = "1.3"
hsts = "max-age=63072000"

[[tls.cert]]
hosts = ["localhost", "shop.test", "api.test"]
cert = "{cert}"
key = "{key}"

[[listener]]
listen = "{plain}"
tls = false
http2 = true

[[listener]]
listen = "{tls}"
tls = true
http2 = true
{body}
"#,
        cert = cert.display(),
        key = key.display(),
    );
    let sluice = Sluice::start(dir, &config);
    Setup {
        plain,
        tls,
        ca,
        sluice,
    }
}

impl Setup {
    /// A client that reaches the TLS listener as `shop.test` and trusts the test CA.
    fn tls_client(&self, http1_only: bool) -> reqwest::Client {
        let mut b = reqwest::Client::builder()
            .use_rustls_tls()
            .add_root_certificate(self.ca.reqwest_cert())
            .resolve("shop.test", self.tls);
        if http1_only {
            b = b.http1_only();
        }
        b.build().expect("client")
    }

    fn tls_url(&self, path: &str) -> String {
        format!("https://shop.test:{}{path}", self.tls.port())
    }
}

fn one_pool(backends: &[SocketAddr], extra: &str) -> String {
    format!(
        r#"
[[pool]]
name = "p"
backends = [{}]
connect_timeout = "500ms"
read_timeout = "5s"
{extra}

[[route]]
name = "all"
hosts = ["*"]
path_prefix = "/"
blue = ["p"]
"#,
        toml_addrs(backends)
    )
}

async fn get_text(c: &reqwest::Client, url: &str) -> (u16, Version, String) {
    let r = c.get(url).send().await.expect("request");
    let (s, v) = (r.status().as_u16(), r.version());
    (s, v, r.text().await.expect("body"))
}

#[test]
fn http1_round_robin_is_exactly_even() {
    let dir = tempdir();
    let b1 = Backend::start(dir.path(), "b1");
    let b2 = Backend::start(dir.path(), "b2");
    let s = gateway(dir.path(), &one_pool(&[b1.addr, b2.addr], ""));
    runtime().block_on(async {
        let c = client(None);
        let mut counts: HashMap<String, usize> = HashMap::new();
        for _ in 0..100 {
            let (code, v, body) = get_text(&c, &format!("http://{}/", s.plain)).await;
            assert_eq!(code, 200);
            assert_eq!(v, Version::HTTP_11);
            *counts.entry(body.trim().to_string()).or_default() += 1;
        }
        assert_eq!(counts.get("b1"), Some(&50), "{counts:?}");
        assert_eq!(counts.get("b2"), Some(&50), "{counts:?}");
    });
}

#[test]
fn h2_over_tls_with_alpn_and_hsts() {
    let dir = tempdir();
    let b1 = Backend::start(dir.path(), "b1");
    let s = gateway(dir.path(), &one_pool(&[b1.addr], ""));
    runtime().block_on(async {
        let r = s
            .tls_client(false)
            .get(s.tls_url("/"))
            .send()
            .await
            .expect("h2 request");
        assert_eq!(r.version(), Version::HTTP_2, "ALPN must pick h2");
        assert_eq!(r.status(), 200);
        assert_eq!(
            r.headers()
                .get("strict-transport-security")
                .and_then(|v| v.to_str().ok()),
            Some("max-age=63072000")
        );
        assert_eq!(r.text().await.expect("body"), "b1\n");
        // an HTTP/1.1-only client negotiates http/1.1 through ALPN on the same listener
        let r = s
            .tls_client(true)
            .get(s.tls_url("/"))
            .send()
            .await
            .expect("h1 request");
        assert_eq!(r.version(), Version::HTTP_11);
        assert_eq!(r.status(), 200);
        // the plain listener sends no HSTS
        let r = client(None)
            .get(format!("http://{}/", s.plain))
            .send()
            .await
            .expect("plain");
        assert!(r.headers().get("strict-transport-security").is_none());
    });
}

#[test]
fn h2c_prior_knowledge() {
    let dir = tempdir();
    let b1 = Backend::start(dir.path(), "b1");
    let s = gateway(dir.path(), &one_pool(&[b1.addr], ""));
    runtime().block_on(async {
        let c = reqwest::Client::builder()
            .http2_prior_knowledge()
            .build()
            .expect("client");
        let (code, v, body) = get_text(&c, &format!("http://{}/", s.plain)).await;
        assert_eq!((code, v, body.as_str()), (200, Version::HTTP_2, "b1\n"));
    });
}

/// An HTTP/1.1 backend's answer carries every connection-specific field; an h2 client gets it
/// without them (RFC 9113 section 8.2.2: the `h2` crate refuses to send a response that has
/// one, so a field left in fails the request), with its body whole. pingora-core patch 0006
/// finds them in one pass instead of five removals by name.
#[test]
fn h2_answers_lose_the_h1_connection_fields() {
    let backend = RawBackend::answering(
        b"HTTP/1.1 200 OK\r\nConnection: keep-alive\r\nKeep-Alive: timeout=5\r\n\
          Proxy-Connection: keep-alive\r\nUpgrade: h2c\r\nTransfer-Encoding: chunked\r\n\
          x-kept: yes\r\n\r\n5\r\nhello\r\n0\r\n\r\n",
    );
    let dir = tempdir();
    let s = gateway(dir.path(), &one_pool(&[backend.addr], ""));
    runtime().block_on(async {
        let c = reqwest::Client::builder()
            .http2_prior_knowledge()
            .build()
            .expect("client");
        for _ in 0..3 {
            let r = c
                .get(format!("http://{}/", s.plain))
                .send()
                .await
                .expect("request");
            assert_eq!((r.status().as_u16(), r.version()), (200, Version::HTTP_2));
            for name in [
                "connection",
                "keep-alive",
                "proxy-connection",
                "upgrade",
                "transfer-encoding",
            ] {
                assert!(r.headers().get(name).is_none(), "{name} reached the client");
            }
            assert_eq!(
                r.headers().get("x-kept").map(|v| v.as_bytes()),
                Some(&b"yes"[..])
            );
            assert_eq!(r.text().await.expect("body"), "hello");
        }
    });
}

/// A backend that takes connections, reads one request on each and never answers; each
/// connection's request is reported on `got`, then whether sluice closed that connection
/// within 3 s on `closed`.
fn silent_backend() -> (
    SocketAddr,
    std::sync::mpsc::Receiver<()>,
    std::sync::mpsc::Receiver<bool>,
) {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let addr = listener.local_addr().expect("addr");
    let (got_tx, got) = std::sync::mpsc::channel();
    let (closed_tx, closed) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for conn in listener.incoming() {
            let Ok(mut conn) = conn else { return };
            let (got_tx, closed_tx) = (got_tx.clone(), closed_tx.clone());
            std::thread::spawn(move || {
                if read_request(&mut conn).is_none() {
                    return;
                }
                let _ = got_tx.send(());
                let _ = closed_tx.send(closed_within(&mut conn, std::time::Duration::from_secs(3)));
            });
        }
    });
    (addr, got, closed)
}

/// A client that goes away while its request (without a body) waits for a slow backend makes
/// sluice drop the upstream request at once, not after the pool's 30 s read timeout: over
/// HTTP/1.1 the client closes its connection, over h2 it resets the stream. (pingora-proxy
/// patch 0003 answers such requests without the duplex loops; it keeps watching the client.)
#[test]
fn a_client_that_goes_away_ends_its_upstream_request() {
    use std::io::Write;
    let dir = tempdir();
    let (backend, got, closed) = silent_backend();
    let pool =
        one_pool(&[backend], "").replace(r#"read_timeout = "5s""#, r#"read_timeout = "30s""#);
    let s = gateway(dir.path(), &pool);
    let wait = std::time::Duration::from_secs(10);

    let mut c = std::net::TcpStream::connect(s.plain).expect("connect");
    c.write_all(b"GET /slow HTTP/1.1\r\nHost: test\r\n\r\n")
        .expect("write");
    got.recv_timeout(wait)
        .expect("the request reached the backend");
    drop(c);
    assert_eq!(
        closed.recv_timeout(wait),
        Ok(true),
        "HTTP/1.1: the upstream connection outlived its client by 3 s"
    );

    runtime().block_on(async {
        let h2 = reqwest::Client::builder()
            .http2_prior_knowledge()
            .build()
            .expect("client");
        let url = format!("http://{}/slow", s.plain);
        let client = h2.clone();
        let request = tokio::spawn(async move { client.get(url).send().await.map(|r| r.status()) });
        tokio::task::spawn_blocking(move || got.recv_timeout(wait))
            .await
            .expect("join")
            .expect("the h2 request reached the backend");
        // dropping the request's future resets its stream; the connection stays open
        request.abort();
        let closed = tokio::task::spawn_blocking(move || closed.recv_timeout(wait))
            .await
            .expect("join");
        assert_eq!(
            closed,
            Ok(true),
            "h2: the upstream connection outlived its client's stream by 3 s"
        );
        drop(h2);
    });
}

/// Over TLS, a client quiet for longer than the edge's quiet time (20 ms: the connection then
/// frees its head buffer and waits for one byte of plaintext without it) is served whole
/// requests, twice on one kept-alive connection, each head split by pauses.
#[test]
fn a_quiet_tls_client_is_served_whole_requests() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let dir = tempdir();
    let b1 = Backend::start(dir.path(), "b1");
    let s = gateway(dir.path(), &one_pool(&[b1.addr], ""));
    runtime().block_on(async {
        let tcp = tokio::net::TcpStream::connect(s.tls)
            .await
            .expect("connect");
        let name = rustls::pki_types::ServerName::try_from("shop.test").expect("name");
        let mut tls = s.ca.connector(false).connect(name, tcp).await.expect("tls");
        for n in 1..=2 {
            let line = format!("ET /_demo/headers?n={n} HTTP/1.1\r\nHo");
            for piece in [&b"G"[..], line.as_bytes(), b"st: shop.test\r\n\r\n"] {
                tokio::time::sleep(std::time::Duration::from_millis(60)).await;
                tls.write_all(piece).await.expect("write");
            }
            // one response: its head, then content-length bytes of body
            let mut got = Vec::new();
            let mut buf = [0u8; 4096];
            let mut body_at = None;
            loop {
                if let Some((end, len)) = body_at {
                    if got.len() >= end + len {
                        break;
                    }
                } else if let Some(p) = got.windows(4).position(|w| w == b"\r\n\r\n") {
                    let head = String::from_utf8_lossy(&got[..p]).to_string();
                    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
                    let len: usize = head_header(&head, "content-length")
                        .and_then(|v| v.parse().ok())
                        .expect("content-length");
                    body_at = Some((p + 4, len));
                    continue;
                }
                let read =
                    tokio::time::timeout(std::time::Duration::from_secs(10), tls.read(&mut buf))
                        .await
                        .expect("an answer in time")
                        .expect("read");
                assert!(read > 0, "closed: {}", String::from_utf8_lossy(&got));
                got.extend_from_slice(&buf[..read]);
            }
            let (end, len) = body_at.expect("a response");
            let echoed: serde_json::Value =
                serde_json::from_slice(&got[end..end + len]).expect("json");
            assert_eq!(echoed["method"], "GET");
            assert_eq!(echoed["uri"], format!("/_demo/headers?n={n}"));
        }
    });
}

/// Connects with the given SNI and returns the leaf certificate the server presented.
async fn presented_cert(
    addr: SocketAddr,
    sni: &str,
    ca: &Ca,
    tls12_only: bool,
) -> Result<Vec<u8>, String> {
    let connector = ca.connector(tls12_only);
    let tcp = tokio::net::TcpStream::connect(addr)
        .await
        .map_err(|e| e.to_string())?;
    let name =
        rustls::pki_types::ServerName::try_from(sni.to_string()).map_err(|e| e.to_string())?;
    let tls = connector
        .connect(name, tcp)
        .await
        .map_err(|e| e.to_string())?;
    let (_, conn) = tls.get_ref();
    let certs = conn.peer_certificates().ok_or("no peer certificate")?;
    Ok(certs[0].to_vec())
}

fn two_cert_gateway(
    dir: &std::path::Path,
    min_version: &str,
) -> (SocketAddr, Ca, Vec<u8>, Vec<u8>, Sluice, Backend) {
    let b1 = Backend::start(dir, "b1");
    let ca = Ca::new(dir, "sni");
    let (a_cert, a_key) = ca.issue(dir, "alpha", &["alpha.test"]);
    let (w_cert, w_key) = ca.issue(dir, "wild", &["*.wild.test"]);
    let tls = free_addr();
    let config = format!(
        r#"
[admin]
listen = "{{admin}}"
[tls]
min_version = "{min_version}"
[[tls.cert]]
hosts = ["alpha.test"]
cert = "{ac}"
key = "{ak}"
[[tls.cert]]
hosts = ["*.wild.test"]
cert = "{wc}"
key = "{wk}"
[[listener]]
listen = "{tls}"
tls = true
http2 = true
{pool}
"#,
        ac = a_cert.display(),
        ak = a_key.display(),
        wc = w_cert.display(),
        wk = w_key.display(),
        pool = one_pool(&[b1.addr], ""),
    );
    let s = Sluice::start(dir, &config);
    let der = |p: &std::path::Path| {
        let pem = std::fs::read(p).expect("read");
        let first = rustls_pemfile::certs(&mut pem.as_slice())
            .next()
            .expect("one cert")
            .expect("pem");
        first.to_vec()
    };
    (tls, ca, der(&a_cert), der(&w_cert), s, b1)
}

#[test]
fn sni_selects_exact_wildcard_and_default_certificates() {
    let dir = tempdir();
    let (tls, ca, alpha, wild, _s, _b) = two_cert_gateway(dir.path(), "1.3");
    runtime().block_on(async {
        assert_eq!(
            presented_cert(tls, "alpha.test", &ca, false).await,
            Ok(alpha.clone())
        );
        assert_eq!(
            presented_cert(tls, "x.wild.test", &ca, false).await,
            Ok(wild.clone())
        );
        // an unknown name gets the first certificate, which then fails the client's name check
        let err = presented_cert(tls, "other.test", &ca, false).await;
        assert!(
            err.is_err(),
            "default cert must not be valid for other.test"
        );
    });
}

#[test]
fn tls12_only_client_is_refused_when_min_version_is_13() {
    let dir = tempdir();
    let (tls, ca, alpha, _w, s, _b) = two_cert_gateway(dir.path(), "1.3");
    runtime().block_on(async {
        let r = presented_cert(tls, "alpha.test", &ca, true).await;
        assert!(r.is_err(), "TLS 1.2-only handshake must fail, got {r:?}");
        assert_eq!(
            presented_cert(tls, "alpha.test", &ca, false).await,
            Ok(alpha)
        );
    });
    drop(s);
    // with min_version = "1.2" the same client gets in: the refusal above is the floor's doing
    let dir2 = tempdir();
    let (tls, ca, alpha, _w, _s, _b) = two_cert_gateway(dir2.path(), "1.2");
    runtime().block_on(async {
        assert_eq!(
            presented_cert(tls, "alpha.test", &ca, true).await,
            Ok(alpha)
        );
    });
}

#[test]
fn host_and_longest_path_prefix_routing() {
    let dir = tempdir();
    let shop = Backend::start(dir.path(), "shop");
    let api = Backend::start(dir.path(), "api");
    let v2 = Backend::start(dir.path(), "api-v2");
    let wild = Backend::start(dir.path(), "wild");
    let body = format!(
        r#"
[[pool]]
name = "shop"
backends = ["{}"]
[[pool]]
name = "api"
backends = ["{}"]
[[pool]]
name = "v2"
backends = ["{}"]
[[pool]]
name = "wild"
backends = ["{}"]
[[route]]
name = "shop"
hosts = ["shop.test"]
blue = ["shop"]
[[route]]
name = "api"
hosts = ["api.test", "shop.test"]
path_prefix = "/api"
blue = ["api"]
[[route]]
name = "api-v2"
hosts = ["api.test"]
path_prefix = "/api/v2"
blue = ["v2"]
[[route]]
name = "wild"
hosts = ["*.example.test"]
path_prefix = "/"
blue = ["wild"]
"#,
        shop.addr, api.addr, v2.addr, wild.addr
    );
    let s = gateway(dir.path(), &body);
    runtime().block_on(async {
        let c = client(None);
        let cases = [
            ("shop.test", "/", 200, "shop"),
            ("shop.test", "/cart", 200, "shop"),
            ("shop.test", "/api/x", 200, "api"),
            ("shop.test", "/apix", 200, "shop"),
            ("api.test", "/api", 200, "api"),
            ("api.test", "/api/v2/users", 200, "api-v2"),
            ("a.example.test", "/", 200, "wild"),
            ("SHOP.TEST:80", "/", 200, "shop"),
            ("api.test", "/", 404, ""),
            ("unknown.test", "/", 404, ""),
        ];
        for (host, path, code, want) in cases {
            let r = c
                .get(format!("http://{}{path}", s.plain))
                .header("host", host)
                .send()
                .await
                .expect("request");
            assert_eq!(r.status().as_u16(), code, "{host}{path}");
            let body = r.text().await.expect("body");
            if code == 200 {
                assert_eq!(body.trim(), want, "{host}{path}");
            } else {
                assert!(body.contains("no route"), "{body}");
            }
        }
    });
}

#[test]
fn errors_502_when_unreachable_and_504_on_timeout() {
    let dir = tempdir();
    let slow = Backend::start(dir.path(), "slow");
    let dead = free_addr();
    let body = format!(
        r#"
[[pool]]
name = "dead"
backends = ["{dead}"]
connect_timeout = "300ms"
[[pool]]
name = "slow"
backends = ["{}"]
read_timeout = "300ms"
[[route]]
name = "dead"
hosts = ["*"]
path_prefix = "/dead"
blue = ["dead"]
[[route]]
name = "slow"
hosts = ["*"]
path_prefix = "/"
blue = ["slow"]
"#,
        slow.addr
    );
    let s = gateway(dir.path(), &body);
    runtime().block_on(async {
        let c = client(None);
        let (code, _, body) = get_text(&c, &format!("http://{}/dead", s.plain)).await;
        assert_eq!(code, 502);
        assert!(body.contains("no backend reachable"), "{body}");
        let (code, _, body) =
            get_text(&c, &format!("http://{}/_demo/sleep?ms=3000", s.plain)).await;
        assert_eq!(code, 504);
        assert!(body.contains("timed out"), "{body}");
        let (code, _, _) = get_text(&c, &format!("http://{}/_demo/sleep?ms=10", s.plain)).await;
        assert_eq!(code, 200);
    });
}

#[test]
fn forwarded_headers_reach_the_backend() {
    let dir = tempdir();
    let b1 = Backend::start(dir.path(), "b1");
    let s = gateway(dir.path(), &one_pool(&[b1.addr], ""));
    runtime().block_on(async {
        let c = s.tls_client(false);
        let tp = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
        let r = c
            .get(s.tls_url("/_demo/headers"))
            .header("x-forwarded-for", "203.0.113.9")
            .header("x-request-id", "req-42")
            .header("traceparent", tp)
            .send()
            .await
            .expect("request");
        assert_eq!(
            r.headers()
                .get("x-request-id")
                .and_then(|v| v.to_str().ok()),
            Some("req-42")
        );
        let v: serde_json::Value = r.json().await.expect("json");
        let h = &v["headers"];
        assert_eq!(h["x-forwarded-for"], "203.0.113.9, 127.0.0.1");
        assert_eq!(h["x-forwarded-proto"], "https");
        assert_eq!(h["x-forwarded-host"], format!("shop.test:{}", s.tls.port()));
        assert_eq!(h["x-request-id"], "req-42");
        assert_eq!(h["traceparent"], tp);
        assert_eq!(h["host"], format!("shop.test:{}", s.tls.port()));

        // without a request id one is generated, sent upstream and returned
        let r = client(None)
            .get(format!("http://{}/_demo/headers", s.plain))
            .send()
            .await
            .expect("request");
        let returned = r
            .headers()
            .get("x-request-id")
            .and_then(|v| v.to_str().ok())
            .map(String::from);
        let v: serde_json::Value = r.json().await.expect("json");
        let sent = v["headers"]["x-request-id"].as_str().map(String::from);
        assert_eq!(sent.as_ref().map(|s| s.len()), Some(32));
        assert_eq!(sent, returned);
        assert_eq!(v["headers"]["x-forwarded-proto"], "http");
        assert_eq!(v["headers"]["x-forwarded-for"], "127.0.0.1");
    });
}

#[test]
fn one_retry_on_another_backend_when_connect_fails() {
    let dir = tempdir();
    let live = Backend::start(dir.path(), "live");
    let dead = free_addr();
    let s = gateway(dir.path(), &one_pool(&[dead, live.addr], ""));
    runtime().block_on(async {
        let c = client(None);
        for i in 0..20 {
            // POST too: nothing reached the dead backend, so a retry is safe for any method
            let r = if i % 2 == 0 {
                c.get(format!("http://{}/", s.plain)).send().await
            } else {
                c.post(format!("http://{}/", s.plain))
                    .body("x=1")
                    .send()
                    .await
            }
            .expect("request");
            assert_eq!(r.status(), 200, "request {i}");
            assert_eq!(r.text().await.expect("body"), "live\n");
        }
    });
    let log = s.sluice.wait_stdout(|o| o.lines().count() >= 20);
    assert_eq!(log.lines().count(), 20, "{log}");
    assert!(
        log.contains("\"retries\":1"),
        "access log shows the retries: {log}"
    );
}

#[test]
fn redirect_https_answers_308() {
    let dir = tempdir();
    let b1 = Backend::start(dir.path(), "b1");
    let redirect = free_addr();
    let extra = format!(
        "{}\n[[listener]]\nlisten = \"{redirect}\"\ntls = false\nredirect_https = 8443\n",
        one_pool(&[b1.addr], "")
    );
    let s = gateway(dir.path(), &extra);
    runtime().block_on(async {
        let r = client(None)
            .get(format!("http://{redirect}/a/b?c=d"))
            .header("host", "shop.test")
            .send()
            .await
            .expect("request");
        assert_eq!(r.status(), 308);
        assert_eq!(
            r.headers().get("location").and_then(|v| v.to_str().ok()),
            Some("https://shop.test:8443/a/b?c=d")
        );
        // the other plain listener still proxies
        let (code, _, _) = get_text(&client(None), &format!("http://{}/", s.plain)).await;
        assert_eq!(code, 200);
    });
}

#[test]
fn upstream_mtls_and_h2() {
    let dir = tempdir();
    let ca = Ca::new(dir.path(), "internal");
    let (srv_cert, srv_key) = ca.issue(dir.path(), "backend", &["backend.internal"]);
    let (cli_cert, cli_key) = ca.issue(dir.path(), "client", &["sluice.internal"]);
    let secure = Backend::start_with(
        dir.path(),
        "secure",
        Some(BackendTls {
            cert: &srv_cert,
            key: &srv_key,
            client_ca: Some(&ca.pem_path),
        }),
    );
    let h2c = Backend::start(dir.path(), "h2c");
    let tls_only = Backend::start_with(
        dir.path(),
        "tls-only",
        Some(BackendTls {
            cert: &srv_cert,
            key: &srv_key,
            client_ca: None,
        }),
    );
    let body = format!(
        r#"
[[pool]]
name = "tls1"
backends = ["{tls_only}"]
tls = {{ sni = "backend.internal", ca = "{ca}" }}
[[route]]
name = "tls1"
hosts = ["*"]
path_prefix = "/tls1"
blue = ["tls1"]
[[pool]]
name = "mtls"
backends = ["{secure}"]
http2 = true
tls = {{ sni = "backend.internal", ca = "{ca}", cert = "{cc}", key = "{ck}" }}
[[pool]]
name = "nocert"
backends = ["{secure}"]
tls = {{ sni = "backend.internal", ca = "{ca}" }}
[[pool]]
name = "wrongname"
backends = ["{secure}"]
tls = {{ sni = "other.internal", ca = "{ca}", cert = "{cc}", key = "{ck}" }}
[[pool]]
name = "h2c"
backends = ["{h2c}"]
http2 = true
[[route]]
name = "mtls"
hosts = ["*"]
path_prefix = "/mtls"
blue = ["mtls"]
[[route]]
name = "nocert"
hosts = ["*"]
path_prefix = "/nocert"
blue = ["nocert"]
[[route]]
name = "wrongname"
hosts = ["*"]
path_prefix = "/wrongname"
blue = ["wrongname"]
[[route]]
name = "h2c"
hosts = ["*"]
path_prefix = "/"
blue = ["h2c"]
"#,
        secure = secure.addr,
        h2c = h2c.addr,
        tls_only = tls_only.addr,
        ca = ca.pem_path.display(),
        cc = cli_cert.display(),
        ck = cli_key.display(),
    );
    let s = gateway(dir.path(), &body);
    runtime().block_on(async {
        let c = client(None);
        let (code, _, body) = get_text(&c, &format!("http://{}/mtls/_demo/headers", s.plain)).await;
        assert_eq!(code, 200, "{body}");
        let v: serde_json::Value = serde_json::from_str(&body).expect("json");
        assert_eq!(v["backend"], "secure");
        assert_eq!(v["version"], "HTTP/2.0", "h2 over TLS to the backend");
        // HTTP/1.1 over TLS, server certificate verified against the pool's CA
        let (code, _, body) = get_text(&c, &format!("http://{}/tls1/_demo/headers", s.plain)).await;
        assert_eq!(code, 200, "{body}");
        let v: serde_json::Value = serde_json::from_str(&body).expect("json");
        assert_eq!(v["backend"], "tls-only");
        assert_eq!(v["version"], "HTTP/1.1");
        // the backend demands a client certificate: without one the connection fails
        let (code, _, _) = get_text(&c, &format!("http://{}/nocert", s.plain)).await;
        assert_eq!(code, 502);
        // certificate verification is real: a name the backend's cert does not carry fails
        let (code, _, _) = get_text(&c, &format!("http://{}/wrongname", s.plain)).await;
        assert_eq!(code, 502);
        let (code, _, body) = get_text(&c, &format!("http://{}/_demo/headers", s.plain)).await;
        assert_eq!(code, 200);
        let v: serde_json::Value = serde_json::from_str(&body).expect("json");
        assert_eq!(v["version"], "HTTP/2.0", "h2c to the backend");
    });
}

#[test]
fn admin_probes_metrics_and_status() {
    let dir = tempdir();
    let b1 = Backend::start(dir.path(), "b1");
    let s = gateway(dir.path(), &one_pool(&[b1.addr], ""));
    runtime().block_on(async {
        let c = client(None);
        for _ in 0..3 {
            get_text(&c, &format!("http://{}/", s.plain)).await;
        }
    });
    let sl = &s.sluice;
    assert_eq!(sl.admin_get("/healthz").map(|r| r.0), Some(200));
    assert_eq!(sl.admin_get("/readyz").map(|r| r.0), Some(200));
    let (code, metrics) = sl.admin_get("/metrics").expect("metrics");
    assert_eq!(code, 200);
    assert!(
        metrics
            .contains(r#"sluice_requests_total{code="2xx",color="blue",pool="p",route="all"} 3"#),
        "{metrics}"
    );
    assert!(
        metrics.contains(r#"sluice_request_duration_seconds_count{route="all"} 3"#),
        "{metrics}"
    );
    assert!(
        metrics.contains("sluice_downstream_connections{listener="),
        "{metrics}"
    );
    assert!(metrics.contains("sluice_config_generation 1"), "{metrics}");
    assert!(
        metrics.contains(r#"sluice_route_weight{color="blue",route="all"} 100"#),
        "{metrics}"
    );
    assert!(
        metrics.contains(r#"sluice_route_weight{color="green",route="all"} 0"#),
        "{metrics}"
    );
    let (code, status) = sl.admin_get("/status").expect("status");
    assert_eq!(code, 200);
    let v: serde_json::Value = serde_json::from_str(&status).expect("json");
    assert_eq!(v["config"]["generation"], 1);
    assert_eq!(v["config"]["sha256"].as_str().map(str::len), Some(64));
    assert!(v["config"]["last_error"].is_null());
    assert_eq!(v["pools"][0]["name"], "p");
    assert_eq!(v["pools"][0]["backends"][0]["address"], b1.addr.to_string());
    assert_eq!(v["routes"][0]["name"], "all");
    assert_eq!(sl.admin_get("/routes/all").map(|r| r.0), Some(200));
    assert_eq!(sl.admin_get("/routes/nope").map(|r| r.0), Some(404));
    assert_eq!(sl.admin_get("/nope").map(|r| r.0), Some(404));
    // access log: one JSON object per request with the contract's fields
    let end = std::time::Instant::now() + std::time::Duration::from_secs(3);
    let lines = loop {
        let out = sl.stdout();
        let lines: Vec<serde_json::Value> = out
            .lines()
            .filter_map(|l| serde_json::from_str(l).ok())
            .collect();
        if lines.len() >= 3 || std::time::Instant::now() > end {
            break lines;
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
    };
    assert_eq!(lines.len(), 3);
    for key in [
        "time",
        "client",
        "method",
        "host",
        "path",
        "status",
        "bytes",
        "duration_ms",
        "route",
        "backend",
        "request_id",
    ] {
        assert!(
            !lines[0][key].is_null(),
            "access log lacks {key}: {}",
            lines[0]
        );
    }
    assert_eq!(lines[0]["status"], 200);
    assert_eq!(lines[0]["backend"], b1.addr.to_string());
}

#[test]
fn upstream_connections_are_kept_alive() {
    let dir = tempdir();
    let b1 = Backend::start(dir.path(), "b1");
    let s = gateway(dir.path(), &one_pool(&[b1.addr], ""));
    runtime().block_on(async {
        let mut ids = std::collections::HashSet::new();
        for _ in 0..30 {
            // a new client connection each time: only the upstream side can reuse
            let r = client(None)
                .get(format!("http://{}/", s.plain))
                .send()
                .await
                .expect("request");
            assert_eq!(r.status(), 200);
            let id = r
                .headers()
                .get("x-connection-id")
                .cloned()
                .expect("connection id");
            ids.insert(id);
        }
        // Each worker thread runs its own runtime: a request may start on one before the
        // other has put the previous connection back, so the pool can grow to a few; without
        // keep-alive it would be 30.
        assert!(
            ids.len() <= 5,
            "30 requests used {} upstream connections",
            ids.len()
        );
    });
}

/// A backend's word on its connection is kept after pingora's HTTP/1 client hands the
/// response head to the hooks (pingora patch 0007 keeps only the fields reuse needs): an upstream
/// connection answered with `Connection: close`, or in HTTP/1.0 without keep-alive, is not used
/// again, while a plain HTTP/1.1 answer's is. The backend leaves every connection open, so a
/// reuse shows as the next request arriving on the same connection. One client connection
/// throughout (sluice keeps its upstream connection for it between requests).
#[test]
fn a_backends_connection_close_survives_the_head_hand_over() {
    use std::io::Write;
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let addr = listener.local_addr().expect("addr");
    // (connection number, request path) in arrival order
    let seen = std::sync::Arc::new(std::sync::Mutex::new(Vec::<(usize, String)>::new()));
    let log = seen.clone();
    std::thread::spawn(move || {
        for (n, conn) in listener.incoming().enumerate() {
            let Ok(mut conn) = conn else { return };
            let log = log.clone();
            std::thread::spawn(move || {
                while let Some(head) = read_request(&mut conn) {
                    let head = String::from_utf8_lossy(&head).into_owned();
                    let path = head.split(' ').nth(1).unwrap_or("").to_string();
                    let answer: &[u8] = match path.as_str() {
                        "/close" => {
                            b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\nconnection: close\r\n\r\nok"
                        }
                        "/h10" => b"HTTP/1.0 200 OK\r\ncontent-length: 2\r\n\r\nok",
                        _ => b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok",
                    };
                    log.lock().expect("log").push((n, path));
                    if conn.write_all(answer).is_err() {
                        return;
                    }
                }
            });
        }
    });
    let dir = tempdir();
    let s = gateway(dir.path(), &one_pool(&[addr], ""));
    let mut c = std::net::TcpStream::connect(s.plain).expect("connect");
    let paths = [
        "/keep",
        "/kept",
        "/close",
        "/after-close",
        "/h10",
        "/after-h10",
    ];
    for path in paths {
        c.write_all(format!("GET {path} HTTP/1.1\r\nHost: test\r\n\r\n").as_bytes())
            .expect("write");
        let (code, head, body) = read_response(&mut c).expect("a response");
        assert_eq!((code, body.as_slice()), (200, &b"ok"[..]), "{path}: {head}");
    }
    let seen = seen.lock().expect("log").clone();
    let conn_of = |path: &str| {
        seen.iter()
            .find(|(_, p)| p == path)
            .map(|(n, _)| *n)
            .unwrap_or_else(|| panic!("{path} never reached the backend: {seen:?}"))
    };
    assert_eq!(
        conn_of("/keep"),
        conn_of("/kept"),
        "a plain HTTP/1.1 answer's connection was not reused: {seen:?}"
    );
    assert_ne!(
        conn_of("/close"),
        conn_of("/after-close"),
        "a connection answered with `Connection: close` was reused: {seen:?}"
    );
    assert_ne!(
        conn_of("/h10"),
        conn_of("/after-h10"),
        "a connection answered in HTTP/1.0 without keep-alive was reused: {seen:?}"
    );
}

/// Over h2, pingora's server hands each response head to h2 instead of a copy and keeps only
/// its status (pingora patch 0009): the client still gets the backend's status, fields and body,
/// and the access log and metrics the status that was sent. The backend answers 203, not the
/// 200 a lost status would read as.
#[test]
fn h2_answers_handed_over_keep_status_fields_and_log() {
    let backend = RawBackend::answering(
        b"HTTP/1.1 203 Non-Authoritative Information\r\ncontent-length: 2\r\nx-custom: yes\r\n\r\nok",
    );
    let dir = tempdir();
    let s = gateway(dir.path(), &one_pool(&[backend.addr], ""));
    let h2 = s.tls_client(false);
    runtime().block_on(async {
        for _ in 0..2 {
            let r = h2
                .get(s.tls_url("/handed"))
                .send()
                .await
                .expect("h2 request");
            assert_eq!(r.version(), Version::HTTP_2);
            assert_eq!(r.status(), 203);
            assert_eq!(
                r.headers().get("x-custom").map(|v| v.as_bytes()),
                Some(&b"yes"[..])
            );
            assert!(r.headers().get("x-request-id").is_some());
            assert!(r.headers().get("date").is_some());
            assert_eq!(r.text().await.expect("body"), "ok");
        }
    });
    let handed = |out: &str| -> Vec<serde_json::Value> {
        out.lines()
            .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
            .filter(|v| v["path"] == "/handed")
            .collect()
    };
    let lines = handed(&s.sluice.wait_stdout(|out| handed(out).len() >= 2));
    assert_eq!(lines.len(), 2, "{lines:?}");
    for l in &lines {
        assert_eq!(l["status"], 203, "{l}");
        assert_eq!(l["protocol"], "HTTP/2", "{l}");
    }
    let (_, metrics) = s.sluice.admin_get("/metrics").expect("metrics");
    assert!(
        metrics
            .contains(r#"sluice_requests_total{code="2xx",color="blue",pool="p",route="all"} 2"#),
        "{metrics}"
    );
}

/// One keep-alive GET on `s`: the backend's `x-connection-id`.
fn upstream_connection_of(s: &mut std::net::TcpStream) -> String {
    use std::io::Write;
    s.write_all(b"GET / HTTP/1.1\r\nHost: test\r\n\r\n")
        .expect("write");
    let (code, head, _) = read_response(s).expect("a response");
    assert_eq!(code, 200, "{head}");
    head_header(&head, "x-connection-id")
        .expect("x-connection-id")
        .to_string()
}

#[test]
fn pooled_upstream_connections_pass_between_client_connections_intact() {
    let dir = tempdir();
    let b1 = Backend::start(dir.path(), "b1");
    let s = gateway(dir.path(), &one_pool(&[b1.addr], ""));
    let connect = || std::net::TcpStream::connect(s.plain).expect("connect");
    let (mut a, mut b) = (connect(), connect());
    // Two client connections taking turns, each quiet long enough between its requests to give
    // its upstream connection to the shared pool (pingora patch 0004): each request takes from
    // the shared pool the upstream connection the other one's request put back, often on the
    // other worker thread. Published pingora lost such a connection now and then ("failed to
    // acquire reusable stream", a new upstream connection instead; cloudflare/pingora#998):
    // pingora patch 0002.
    let mut seen = std::collections::HashSet::new();
    let quiet = std::time::Duration::from_millis(30);
    for _ in 0..60 {
        seen.insert(upstream_connection_of(&mut a));
        std::thread::sleep(quiet);
        seen.insert(upstream_connection_of(&mut b));
        std::thread::sleep(quiet);
    }
    let log = s.sluice.proc.stderr();
    assert!(
        !log.contains("failed to acquire reusable stream"),
        "a pooled connection was lost ({} upstream connections for 120 requests): {log}",
        seen.len()
    );
    // one connection in turns, or two when a request came before the other's was back
    assert!(seen.len() <= 4, "120 requests used upstream {seen:?}");
}

/// A busy client connection keeps the upstream connection it used (pingora patch 0004): two
/// taking turns without a pause use one each (through the shared pool they would pass one
/// between them); once quiet, both go to the shared pool, where a third client finds them.
#[test]
fn busy_client_connections_keep_their_upstream_connection_until_quiet() {
    let dir = tempdir();
    let b1 = Backend::start(dir.path(), "b1");
    let s = gateway(dir.path(), &one_pool(&[b1.addr], ""));
    let connect = || std::net::TcpStream::connect(s.plain).expect("connect");
    let (mut a, mut b) = (connect(), connect());
    let (mut of_a, mut of_b) = (Vec::new(), Vec::new());
    for _ in 0..50 {
        of_a.push(upstream_connection_of(&mut a));
        of_b.push(upstream_connection_of(&mut b));
    }
    // the id a client's requests used most, and how many used it (a busy machine may stall
    // both clients past the quiet time now and then, and they may swap connections)
    let most = |ids: &[String]| {
        let mut n = std::collections::HashMap::new();
        for id in ids {
            *n.entry(id.clone()).or_insert(0) += 1;
        }
        n.into_iter().max_by_key(|(_, c)| *c).expect("ids")
    };
    let (ka, na) = most(&of_a);
    let (kb, nb) = most(&of_b);
    assert_ne!(ka, kb, "a: {of_a:?}\nb: {of_b:?}");
    assert!(na >= 45 && nb >= 45, "a: {of_a:?}\nb: {of_b:?}");
    // both quiet now: their connections are in the shared pool, and a new client gets one
    std::thread::sleep(std::time::Duration::from_millis(200));
    let third = upstream_connection_of(&mut connect());
    assert!(
        third == ka || third == kb,
        "{third} is neither {ka} nor {kb}"
    );
}

/// An idle h2 client connection holds no upstream connection: after its streams are done, while
/// it stays open, as many plain clients at once as it used upstream connections all find them in
/// the shared pool and open none. (A guard for any scheme that lets h2 streams keep upstream
/// connections between them, as a pingora patch tried and reverted in 8fafb6a did: it failed
/// when that patch never gave them back.)
#[test]
fn an_idle_h2_connection_gives_its_upstream_connections_back() {
    let dir = tempdir();
    let b1 = Backend::start(dir.path(), "b1");
    let s = gateway(dir.path(), &one_pool(&[b1.addr], ""));
    let h2 = s.tls_client(false);
    // the runtime lives on, and with it the h2 connection
    let rt = runtime();
    let used: std::collections::HashSet<String> = rt.block_on(async {
        let mut used = std::collections::HashSet::new();
        for _ in 0..3 {
            // four streams at once, each holding an upstream connection for 100 ms
            let answers = futures_util::future::join_all(
                (0..4).map(|_| h2.get(s.tls_url("/_demo/sleep?ms=100")).send()),
            )
            .await;
            for r in answers {
                let r = r.expect("h2 request");
                assert_eq!(r.version(), Version::HTTP_2);
                assert_eq!(r.status(), 200);
                used.insert(
                    r.headers()["x-connection-id"]
                        .to_str()
                        .expect("id")
                        .to_string(),
                );
            }
        }
        used
    });
    assert!(used.len() >= 4, "{used:?}");
    // the h2 connection stays open (`h2` and `rt` live on) with nothing in progress
    std::thread::sleep(std::time::Duration::from_millis(200));
    // as many plain clients at once as there are upstream connections: each finds one in the
    // shared pool only if the h2 connection kept none
    let plain = s.plain;
    let ids: Vec<String> = (0..used.len())
        .map(|_| {
            std::thread::spawn(move || {
                use std::io::Write;
                let mut c = std::net::TcpStream::connect(plain).expect("connect");
                c.write_all(b"GET /_demo/sleep?ms=300 HTTP/1.1\r\nHost: test\r\n\r\n")
                    .expect("write");
                let (code, head, _) = read_response(&mut c).expect("a response");
                assert_eq!(code, 200, "{head}");
                head_header(&head, "x-connection-id")
                    .expect("x-connection-id")
                    .to_string()
            })
        })
        .collect::<Vec<_>>()
        .into_iter()
        .map(|t| t.join().expect("client"))
        .collect();
    for id in &ids {
        assert!(
            used.contains(id),
            "{id} is new: {ids:?}; the h2 connection used {used:?}"
        );
    }
    drop((h2, rt));
}

#[test]
fn access_log_to_a_file() {
    let dir = tempdir();
    let b1 = Backend::start(dir.path(), "b1");
    let log = dir.path().join("access.jsonl");
    let listen = free_addr();
    let config = format!(
        "[server]\naccess_log = \"access.jsonl\"\n[admin]\nlisten = \"{{admin}}\"\n[[listener]]\nlisten = \"{listen}\"\n{}",
        one_pool(&[b1.addr], "")
    );
    let _s = Sluice::start(dir.path(), &config);
    runtime().block_on(async {
        let r = client(None)
            .get(format!("http://{listen}/some/path?q=1"))
            .send()
            .await
            .expect("request");
        assert_eq!(r.status(), 200);
    });
    let end = std::time::Instant::now() + std::time::Duration::from_secs(5);
    let text = loop {
        let t = std::fs::read_to_string(&log).unwrap_or_default();
        if !t.is_empty() || std::time::Instant::now() > end {
            break t;
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
    };
    let v: serde_json::Value =
        serde_json::from_str(text.lines().next().expect("a line")).expect("json");
    assert_eq!(v["path"], "/some/path");
    assert_eq!(v["method"], "GET");
    assert_eq!(v["status"], 200);
    assert_eq!(v["route"], "all");
    assert_eq!(v["client"], "127.0.0.1");
}

#[test]
fn sticky_colors_over_tls_h2_and_h2c() {
    let dir = tempdir();
    let blue = Backend::start(dir.path(), "blue");
    let green = Backend::start(dir.path(), "green");
    let s = gateway(
        dir.path(),
        &format!(
            r#"
[[pool]]
name = "blue"
backends = ["{}"]

[[pool]]
name = "green"
backends = ["{}"]

[[route]]
name = "shop"
hosts = ["*"]
blue = ["blue"]
green = ["green"]
weights = {{ blue = 50, green = 50 }}
sticky = "cookie"
"#,
            blue.addr, green.addr
        ),
    );
    runtime().block_on(async {
        let h2c = reqwest::Client::builder()
            .http2_prior_knowledge()
            .build()
            .expect("client");
        for (c, url, secure) in [
            (s.tls_client(false), s.tls_url("/"), true),
            (h2c, format!("http://{}/", s.plain), false),
        ] {
            let mut colors = HashMap::new();
            for _ in 0..20 {
                let r = c.get(&url).send().await.expect("request");
                assert_eq!(r.version(), Version::HTTP_2);
                let cookie = r
                    .headers()
                    .get("set-cookie")
                    .and_then(|v| v.to_str().ok())
                    .expect("an id cookie")
                    .to_string();
                assert_eq!(cookie.contains("; Secure"), secure, "{cookie}");
                let first = r.text().await.expect("body");
                let pair = cookie.split(';').next().expect("pair").to_string();
                for _ in 0..5 {
                    let r = c
                        .get(&url)
                        .header("cookie", &pair)
                        .send()
                        .await
                        .expect("request");
                    assert!(r.headers().get("set-cookie").is_none());
                    assert_eq!(r.text().await.expect("body"), first, "color changed");
                }
                *colors.entry(first).or_insert(0) += 1;
            }
            assert_eq!(
                colors.len(),
                2,
                "20 clients at 50/50 all one color: {colors:?}"
            );
        }
    });
}

#[test]
fn access_log_rotated_under_load_every_request_once() {
    let dir = tempdir();
    let b1 = Backend::start(dir.path(), "b1");
    let log = dir.path().join("access.jsonl");
    let listen = free_addr();
    let config = format!(
        "[server]\naccess_log = \"access.jsonl\"\n[admin]\nlisten = \"{{admin}}\"\n[[listener]]\nlisten = \"{listen}\"\n{}",
        one_pool(&[b1.addr], "")
    );
    let s = Sluice::start(dir.path(), &config);
    let stop = std::sync::atomic::AtomicBool::new(false);
    let sent = std::sync::Mutex::new(Vec::new());
    std::thread::scope(|sc| {
        for t in 0..3 {
            let (stop, sent) = (&stop, &sent);
            sc.spawn(move || {
                let mut i = 0;
                while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                    let id = format!("rot-{t}-{i}");
                    let r = request(listen, "GET", "/", &[("x-request-id", &id)]);
                    assert_eq!(r.map(|r| r.code), Some(200));
                    sent.lock().expect("lock").push(id);
                    i += 1;
                }
            });
        }
        let pause = std::time::Duration::from_millis(400);
        std::thread::sleep(pause);
        // logrotate's way: rename, then SIGUSR1
        std::fs::rename(&log, dir.path().join("access.jsonl.1")).expect("rename");
        std::thread::sleep(pause);
        s.proc.signal(libc::SIGUSR1);
        std::thread::sleep(pause);
        // renamed without a signal: noticed within a second
        std::fs::rename(&log, dir.path().join("access.jsonl.2")).expect("rename");
        std::thread::sleep(std::time::Duration::from_millis(1500));
        stop.store(true, std::sync::atomic::Ordering::Relaxed);
    });
    let sent = sent.into_inner().expect("sent");
    assert!(sent.len() > 100, "{}", sent.len());
    let mut seen: std::collections::HashMap<String, usize> = std::collections::HashMap::new();
    let mut per_file = Vec::new();
    let end = std::time::Instant::now() + std::time::Duration::from_secs(5);
    loop {
        seen.clear();
        per_file.clear();
        for f in ["access.jsonl.1", "access.jsonl.2", "access.jsonl"] {
            let text = std::fs::read_to_string(dir.path().join(f)).unwrap_or_default();
            per_file.push(text.lines().count());
            for l in text.lines() {
                let v: serde_json::Value = serde_json::from_str(l).expect("json line");
                if let Some(id) = v["request_id"].as_str() {
                    *seen.entry(id.to_string()).or_default() += 1;
                }
            }
        }
        if seen.len() >= sent.len() || std::time::Instant::now() > end {
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    eprintln!(
        "access log rotation: {} requests, lines per file {per_file:?}",
        sent.len()
    );
    assert!(
        per_file.iter().all(|n| *n > 0),
        "every file got lines: {per_file:?}"
    );
    for id in &sent {
        assert_eq!(seen.get(id), Some(&1), "request {id}");
    }
    assert_eq!(seen.len(), sent.len());
}

/// More requests in flight at once than pingora's default idle pool (128), each on its own
/// client connection: once answered, their upstream connections are all kept, so a second
/// burst like the first reuses them instead of opening new ones (the demo backend numbers the
/// connections it accepts in `x-connection-id`).
#[test]
fn a_burst_of_requests_keeps_its_upstream_connections_for_the_next() {
    const BURST: usize = 240; // under the default 256 connections per client IP
    let dir = tempdir();
    let backend = Backend::start(dir.path(), "b1");
    let listen = free_addr();
    let config = format!(
        "[server]\nthreads = 1\n[admin]\nlisten = \"{{admin}}\"\n[[listener]]\nlisten = \"{listen}\"\n{}",
        one_pool(&[backend.addr], "")
    );
    let _s = Sluice::start(dir.path(), &config);
    let rt = runtime();
    let c = client(None);
    let burst = || {
        let c = c.clone();
        rt.block_on(async move {
            let all = (0..BURST).map(|_| {
                let c = c.clone();
                tokio::spawn(async move {
                    let r = c
                        .get(format!("http://{listen}/_demo/sleep?ms=500"))
                        .send()
                        .await
                        .expect("request");
                    assert_eq!(r.status(), 200);
                    r.headers()
                        .get("x-connection-id")
                        .and_then(|v| v.to_str().ok())
                        .and_then(|v| v.parse::<u64>().ok())
                        .expect("x-connection-id")
                })
            });
            let mut ids = std::collections::HashSet::new();
            for t in all.collect::<Vec<_>>() {
                ids.insert(t.await.expect("join"));
            }
            ids
        })
    };
    let first = burst();
    assert!(
        first.len() > 128,
        "the first burst was not concurrent enough: {} upstream connections",
        first.len()
    );
    let second = burst();
    let new = second.difference(&first).count();
    assert!(
        new <= BURST / 10,
        "the second burst opened {new} new upstream connections (the first used {})",
        first.len()
    );
}

/// An upstream connection an h2 stream released goes to the shared pool's idle watch once quiet
/// (pingora patch 0005 first keeps it on the connector's stack, unwatched, for the next request):
/// a backend that half-closes its idle keep-alive connection 300 ms after answering sees sluice
/// close its side, while the h2 client stays connected. Fails when the stack is never swept.
#[test]
fn an_upstream_connection_h2_released_is_watched_once_quiet() {
    use std::io::{Read, Write};
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let addr = listener.local_addr().expect("addr");
    let (tx, rx) = std::sync::mpsc::channel::<bool>();
    std::thread::spawn(move || {
        for conn in listener.incoming() {
            let Ok(mut conn) = conn else { return };
            let tx = tx.clone();
            std::thread::spawn(move || {
                let Some(head) = read_request(&mut conn) else {
                    return;
                };
                if !head.starts_with(b"GET /watched ") {
                    // anything else (a health check) gets its answer and the close
                    let _ = conn.write_all(
                        b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\nconnection: close\r\n\r\n",
                    );
                    return;
                }
                conn.write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok")
                    .expect("answer");
                std::thread::sleep(std::time::Duration::from_millis(300));
                conn.shutdown(std::net::Shutdown::Write)
                    .expect("half-close");
                conn.set_read_timeout(Some(std::time::Duration::from_secs(5)))
                    .expect("timeout");
                // sluice's side closes (0) once its idle watch sees the half-close
                let _ = tx.send(matches!(conn.read(&mut [0u8; 1024]), Ok(0)));
            });
        }
    });
    let dir = tempdir();
    let s = gateway(dir.path(), &one_pool(&[addr], ""));
    let h2 = s.tls_client(false);
    let rt = runtime();
    rt.block_on(async {
        let r = h2
            .get(s.tls_url("/watched"))
            .send()
            .await
            .expect("h2 request");
        assert_eq!(r.version(), Version::HTTP_2);
        assert_eq!(r.status(), 200);
        assert_eq!(r.text().await.expect("body"), "ok");
    });
    // the h2 connection stays open (`h2` and `rt` live on) while the backend waits
    let closed = rx
        .recv_timeout(std::time::Duration::from_secs(10))
        .expect("the backend saw the request");
    assert!(
        closed,
        "sluice kept the half-closed upstream connection open"
    );
}
