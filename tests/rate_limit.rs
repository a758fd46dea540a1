//! Rate limiting per client IP: exact quotas, independent buckets, honest client IPs behind
//! trusted proxies, exemptions, per-route overrides, and buckets that survive reloads.

mod common;

use std::net::{IpAddr, SocketAddr};
use std::time::{Duration, Instant};

use common::*;

fn config(listen: SocketAddr, backend: SocketAddr, rate_limit: &str, extra_routes: &str) -> String {
    format!(
        r#"[server]
threads = 2
drain_delay = "0s"
[admin]
listen = "{{admin}}"
[client_ip]
trusted_proxies = ["127.0.0.2/32"]
{rate_limit}
[[listener]]
listen = "{listen}"
[[pool]]
name = "p"
backends = ["{backend}"]
{extra_routes}
[[route]]
name = "all"
hosts = ["*"]
blue = ["p"]
"#
    )
}

/// A client whose connections come from `from` (a loopback address).
fn client_from(from: &str) -> reqwest::Client {
    let ip: IpAddr = from.parse().expect("ip");
    reqwest::Client::builder()
        .local_address(ip)
        .build()
        .expect("client")
}

async fn get(c: &reqwest::Client, url: &str, xff: Option<&str>) -> reqwest::Response {
    let mut r = c.get(url);
    if let Some(x) = xff {
        r = r.header("x-forwarded-for", x);
    }
    r.send().await.expect("request")
}

/// Sends `n` requests; returns how many were answered 200.
async fn ok_count(c: &reqwest::Client, url: &str, xff: Option<&str>, n: usize) -> usize {
    let mut ok = 0;
    for _ in 0..n {
        if get(c, url, xff).await.status() == 200 {
            ok += 1;
        }
    }
    ok
}

#[test]
fn exactly_n_pass_then_429_with_headers_then_the_window_refills() {
    let dir = tempdir();
    let b = Backend::start(dir.path(), "b1");
    let listen = free_addr();
    let s = Sluice::start(
        dir.path(),
        &config(
            listen,
            b.addr,
            "[rate_limit]\nrequests = 5\nper = \"2s\"",
            "",
        ),
    );
    let url = format!("http://{listen}/");
    runtime().block_on(async {
        let c = client_from("127.0.0.1");
        let start = Instant::now();
        assert_eq!(ok_count(&c, &url, None, 5).await, 5);
        let r = get(&c, &url, None).await;
        assert_eq!(r.status(), 429);
        let h = |n: &str| {
            r.headers()
                .get(n)
                .and_then(|v| v.to_str().ok())
                .map(String::from)
        };
        let retry: u64 = h("retry-after")
            .expect("Retry-After")
            .parse()
            .expect("seconds");
        assert!((1..=2).contains(&retry), "Retry-After {retry}");
        assert_eq!(h("ratelimit-policy").as_deref(), Some("\"sluice\";q=5;w=2"));
        assert_eq!(h("ratelimit"), Some(format!("\"sluice\";r=0;t={retry}")));
        assert_eq!(r.text().await.expect("body"), "rate limit exceeded\n");
        // after the window, the whole quota is back
        let window = Duration::from_secs(2);
        tokio::time::sleep(window.saturating_sub(start.elapsed()) + Duration::from_millis(100))
            .await;
        assert_eq!(ok_count(&c, &url, None, 5).await, 5);
        assert_eq!(get(&c, &url, None).await.status(), 429);
    });
    assert_eq!(
        s.metric(r#"sluice_rate_limited_total{route="all"}"#),
        Some(2.0)
    );
}

#[test]
fn clients_have_independent_buckets_and_spoofed_headers_do_not_help() {
    let dir = tempdir();
    let b = Backend::start(dir.path(), "b1");
    let listen = free_addr();
    let _s = Sluice::start(
        dir.path(),
        &config(
            listen,
            b.addr,
            "[rate_limit]\nrequests = 3\nper = \"1m\"",
            "",
        ),
    );
    let url = format!("http://{listen}/");
    runtime().block_on(async {
        // 127.0.0.3 is not a trusted proxy: its X-Forwarded-For is ignored for limiting
        let untrusted = client_from("127.0.0.3");
        for (i, spoof) in ["1.1.1.1", "2.2.2.2", "3.3.3.3"].iter().enumerate() {
            assert_eq!(
                get(&untrusted, &url, Some(spoof)).await.status(),
                200,
                "request {i}"
            );
        }
        assert_eq!(get(&untrusted, &url, Some("4.4.4.4")).await.status(), 429);
        // another address has its own bucket
        let other = client_from("127.0.0.4");
        assert_eq!(ok_count(&other, &url, None, 3).await, 3);
        assert_eq!(get(&other, &url, None).await.status(), 429);

        // 127.0.0.2 is a trusted proxy: the client is the rightmost untrusted hop
        let proxy = client_from("127.0.0.2");
        assert_eq!(
            ok_count(&proxy, &url, Some("6.6.6.6, 198.51.100.4"), 3).await,
            3
        );
        // changing the spoofable leftmost value does not escape the limit
        assert_eq!(
            get(&proxy, &url, Some("7.7.7.7, 198.51.100.4"))
                .await
                .status(),
            429
        );
        // a different real client behind the same proxy is not limited
        assert_eq!(
            get(&proxy, &url, Some("6.6.6.6, 198.51.100.5"))
                .await
                .status(),
            200
        );
        // and the backend hears of the real client in X-Forwarded-For
        let r = get(&proxy, &format!("{url}_demo/headers"), Some("198.51.100.6")).await;
        let v: serde_json::Value = r.json().await.expect("json");
        assert_eq!(v["headers"]["x-forwarded-for"], "198.51.100.6, 127.0.0.2");
    });
}

#[test]
fn exempt_addresses_and_unlimited_routes_are_never_limited() {
    let dir = tempdir();
    let b = Backend::start(dir.path(), "b1");
    let listen = free_addr();
    let routes = r#"
[[route]]
name = "open"
hosts = ["*"]
path_prefix = "/open"
blue = ["p"]
rate_limit = false
[[route]]
name = "tight"
hosts = ["*"]
path_prefix = "/tight"
blue = ["p"]
[route.rate_limit]
requests = 1
per = "1m"
"#;
    let _s = Sluice::start(
        dir.path(),
        &config(
            listen,
            b.addr,
            "[rate_limit]\nrequests = 2\nper = \"1m\"\nexempt = [\"127.0.0.5/32\"]",
            routes,
        ),
    );
    runtime().block_on(async {
        let exempt = client_from("127.0.0.5");
        assert_eq!(
            ok_count(&exempt, &format!("http://{listen}/"), None, 10).await,
            10
        );
        let c = client_from("127.0.0.6");
        assert_eq!(
            ok_count(&c, &format!("http://{listen}/open"), None, 10).await,
            10
        );
        // a route with its own quota, counted apart from the global one
        assert_eq!(
            get(&c, &format!("http://{listen}/tight"), None)
                .await
                .status(),
            200
        );
        assert_eq!(
            get(&c, &format!("http://{listen}/tight"), None)
                .await
                .status(),
            429
        );
        assert_eq!(ok_count(&c, &format!("http://{listen}/"), None, 3).await, 2);
    });
}

#[test]
fn buckets_survive_a_reload_unless_the_quota_changes() {
    let dir = tempdir();
    let b = Backend::start(dir.path(), "b1");
    let listen = free_addr();
    let s = Sluice::start(
        dir.path(),
        &config(
            listen,
            b.addr,
            "[rate_limit]\nrequests = 2\nper = \"1m\"",
            "",
        ),
    );
    let url = format!("http://{listen}/");
    let text = std::fs::read_to_string(&s.config).expect("read");
    let generation = || s.status()["config"]["generation"].as_u64().unwrap_or(0);
    runtime().block_on(async {
        let c = client_from("127.0.0.7");
        assert_eq!(ok_count(&c, &url, None, 3).await, 2);
        // an unrelated change: the bucket stays empty
        write_by_rename(
            &s.config,
            &text.replace("drain_delay = \"0s\"", "drain_delay = \"1s\""),
        );
        assert!(wait_until(Duration::from_secs(5), || generation() == 2));
        assert_eq!(get(&c, &url, None).await.status(), 429);
        // a new quota starts new buckets
        write_by_rename(&s.config, &text.replace("requests = 2", "requests = 4"));
        assert!(wait_until(Duration::from_secs(5), || generation() == 3));
        assert_eq!(ok_count(&c, &url, None, 5).await, 4);
    });
}

/// Sends `header` then a GET of `path` on a plain connection; `None` if the connection closed
/// without an answer.
fn get_after_header(listen: SocketAddr, header: &[u8], path: &str) -> Option<(u16, String)> {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(listen).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(8))).ok()?;
    s.write_all(header).ok()?;
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
    )
    .ok()?;
    let mut buf = String::new();
    let _ = s.read_to_string(&mut buf);
    let code = buf.split(' ').nth(1)?.parse().ok()?;
    Some((code, buf.split_once("\r\n\r\n")?.1.to_string()))
}

#[test]
fn proxy_protocol_sets_the_client_ip_on_plain_and_tls_listeners() {
    use sluice::proxy_protocol::encode_v2;
    let dir = tempdir();
    let b = Backend::start(dir.path(), "b1");
    let ca = Ca::new(dir.path(), "pp");
    let (cert, key) = ca.issue(dir.path(), "pp", &["pp.test"]);
    let plain = free_addr();
    let tls = free_addr();
    let text = config(plain, b.addr, "[rate_limit]\nrequests = 2\nper = \"1m\"", "")
        .replace("trusted_proxies = [\"127.0.0.2/32\"]", "proxy_protocol = true")
        .replace(
            "[[listener]]",
            &format!(
                "[tls]\n[[tls.cert]]\nhosts = [\"pp.test\"]\ncert = \"{}\"\nkey = \"{}\"\n[[listener]]\nlisten = \"{tls}\"\ntls = true\n[[listener]]",
                cert.display(),
                key.display()
            ),
        );
    let s = Sluice::start(dir.path(), &text);
    let dst: SocketAddr = plain;

    // v1: the backend and the limiter see the PROXY source, not 127.0.0.1
    let v1 = b"PROXY TCP4 198.51.100.9 10.0.0.1 5555 443\r\n";
    let (code, body) = get_after_header(plain, v1, "/_demo/headers").expect("answer");
    assert_eq!(code, 200);
    let v: serde_json::Value = serde_json::from_str(&body).expect("json");
    assert_eq!(v["headers"]["x-forwarded-for"], "198.51.100.9");
    assert_eq!(get_after_header(plain, v1, "/").map(|r| r.0), Some(200));
    assert_eq!(get_after_header(plain, v1, "/").map(|r| r.0), Some(429));
    // v2 with another source: its own bucket
    let v2 = encode_v2("198.51.100.10:7".parse().expect("addr"), dst);
    assert_eq!(get_after_header(plain, &v2, "/").map(|r| r.0), Some(200));
    let v6 = encode_v2("[2001:db8::5]:7".parse().expect("addr"), dst);
    let (_, body) = get_after_header(plain, &v6, "/_demo/headers").expect("answer");
    let v: serde_json::Value = serde_json::from_str(&body).expect("json");
    assert_eq!(v["headers"]["x-forwarded-for"], "2001:db8::5");

    // no header, or a garbled one: the connection is closed without an answer
    assert_eq!(get_after_header(plain, b"", "/"), None);
    assert_eq!(
        get_after_header(plain, b"PROXY TCP4 nonsense\r\n", "/"),
        None
    );

    // TLS listener: the header comes before the TLS handshake
    runtime().block_on(async {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let mut tcp = tokio::net::TcpStream::connect(tls).await.expect("connect");
        tcp.write_all(&encode_v2("203.0.113.77:1".parse().expect("addr"), tls))
            .await
            .expect("header");
        let name = rustls::pki_types::ServerName::try_from("pp.test").expect("name");
        let mut t = ca
            .connector(false)
            .connect(name, tcp)
            .await
            .expect("handshake after the PROXY header");
        t.write_all(b"GET /_demo/headers HTTP/1.1\r\nHost: pp.test\r\nConnection: close\r\n\r\n")
            .await
            .expect("write");
        let mut buf = Vec::new();
        let _ = t.read_to_end(&mut buf).await;
        let text = String::from_utf8_lossy(&buf);
        let body = text.split_once("\r\n\r\n").map(|b| b.1).unwrap_or("");
        let v: serde_json::Value = serde_json::from_str(body.trim()).expect("json");
        assert_eq!(v["headers"]["x-forwarded-for"], "203.0.113.77");
    });
    assert!(s.status()["config"]["last_error"].is_null());
}
