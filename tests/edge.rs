//! Hostile clients against the real binary: connection floods, slowloris, idle keep-alive,
//! oversized heads and bodies. Every limit is shown cutting the client off and being counted.

mod common;

use std::io::Write;
use std::net::{IpAddr, SocketAddr, TcpStream};
use std::time::{Duration, Instant};

use common::*;

/// sluice with one plain listener in front of `backend`, `[limits]` as given, and a second
/// route `/small` with its own body limit.
fn start(dir: &std::path::Path, backend: SocketAddr, limits: &str) -> (Sluice, SocketAddr) {
    let plain = free_addr();
    let config = format!(
        r#"
[server]
threads = 2
grace_period = "2s"
drain_delay = "100ms"
access_log = "off"

[admin]
listen = "{{admin}}"

[limits]
{limits}

[[listener]]
listen = "{plain}"
http2 = true

[[pool]]
name = "p"
backends = ["{backend}"]

[[route]]
name = "small"
hosts = ["*"]
path_prefix = "/small"
blue = ["p"]
[route.limits]
max_body_bytes = 100

[[route]]
name = "all"
hosts = ["*"]
blue = ["p"]
"#
    );
    (Sluice::start(dir, &config), plain)
}

fn get(s: &mut TcpStream, path: &str) -> Option<(u16, String, Vec<u8>)> {
    s.write_all(format!("GET {path} HTTP/1.1\r\nHost: t\r\n\r\n").as_bytes())
        .ok()?;
    read_response(s)
}

fn metric(s: &Sluice, sample: &str) -> f64 {
    s.metric(sample).unwrap_or(-1.0)
}

#[test]
fn connection_limits_per_ip_and_for_the_process() {
    raise_fd_limit();
    let dir = tempdir();
    let be = Backend::start(dir.path(), "b");
    let (sluice, plain) = start(
        dir.path(),
        be.addr,
        "max_connections_per_ip = 100\nmax_connections = 100000",
    );
    let lo: IpAddr = "127.0.0.1".parse().expect("ip");
    let other: IpAddr = "127.0.0.2".parse().expect("ip");
    let mut conns: Vec<TcpStream> = (0..1000)
        .map(|_| connect_from(lo, plain).expect("connect"))
        .collect();
    // the first 100 are served; the other 900 were closed at accept, without a byte
    let mut served = Vec::new();
    let mut closed = 0;
    for (i, c) in conns.iter_mut().enumerate() {
        match get(c, "/") {
            Some((200, _, _)) => served.push(i),
            None => closed += 1,
            Some((code, _, _)) => panic!("connection {i}: {code}"),
        }
    }
    assert_eq!(served.len(), 100, "served: {served:?}");
    assert_eq!(closed, 900);
    let label =
        format!("sluice_connections_refused_total{{listener=\"{plain}\",reason=\"per_ip\"}}");
    assert_eq!(metric(&sluice, &label), 900.0);
    // another address is not affected
    let mut o = connect_from(other, plain).expect("connect");
    assert_eq!(get(&mut o, "/").map(|r| r.0), Some(200));
    // the 100 stay usable (keep-alive) while the flood goes on
    assert_eq!(get(&mut conns[served[0]], "/").map(|r| r.0), Some(200));

    // the limits apply live: per-IP off, the process capped at 150 open connections
    let text = std::fs::read_to_string(&sluice.config).expect("config");
    std::fs::write(
        &sluice.config,
        text.replace(
            "max_connections_per_ip = 100\nmax_connections = 100000",
            "max_connections_per_ip = 0\nmax_connections = 150",
        ),
    )
    .expect("write");
    sluice.proc.signal(libc::SIGHUP);
    assert!(
        wait_until(Duration::from_secs(5), || {
            sluice.status()["limits"]["max_connections"] == 150
        }),
        "{}\n{}",
        sluice.status(),
        sluice.proc.stderr()
    );
    // 100 + 1 (127.0.0.2) open: 49 more fit. All 60 stay open until counted: a connection
    // dropped after its answer frees a slot for one sluice has not accepted yet (it accepts
    // the queued connections while the answers are read), which let a 50th in.
    let mut more: Vec<TcpStream> = (0..60)
        .map(|_| connect_from(lo, plain).expect("connect"))
        .collect();
    let ok = more
        .iter_mut()
        .map(|c| get(c, "/").is_some())
        .filter(|ok| *ok)
        .count();
    assert_eq!(ok, 49);
    let label = format!(
        "sluice_connections_refused_total{{listener=\"{plain}\",reason=\"max_connections\"}}"
    );
    assert_eq!(metric(&sluice, &label), 11.0);
    assert!(sluice.status()["connections"]["open"].as_u64() >= Some(100));
    drop(more);
}

/// Sends `bytes` one at a time, one per `every`, from another thread, until the peer closes;
/// returns how long after the call the peer closed (read EOF) and what it answered.
fn trickle(s: &TcpStream, bytes: &'static [u8], every: Duration) -> (Duration, Vec<u8>) {
    let t0 = Instant::now();
    let mut w = s.try_clone().expect("clone");
    let writer = std::thread::spawn(move || {
        for b in bytes {
            if w.write_all(&[*b]).is_err() {
                return;
            }
            std::thread::sleep(every);
        }
    });
    let mut out = Vec::new();
    let mut r = s.try_clone().expect("clone");
    r.set_read_timeout(Some(Duration::from_secs(20)))
        .expect("timeout");
    let _ = std::io::Read::read_to_end(&mut r, &mut out);
    let took = t0.elapsed();
    let _ = writer.join();
    (took, out)
}

#[test]
fn slowloris_is_cut_at_header_timeout() {
    let dir = tempdir();
    let be = Backend::start(dir.path(), "b");
    let (sluice, plain) = start(
        dir.path(),
        be.addr,
        "header_timeout = \"2s\"\nkeepalive_timeout = \"30s\"",
    );
    let head: &'static [u8] =
        b"GET / HTTP/1.1\r\nHost: t\r\nX-Slow: aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa\r\n\r\n";
    // one byte per second; the first request: the deadline runs from accept
    let s = TcpStream::connect(plain).expect("connect");
    let (took, answer) = trickle(&s, head, Duration::from_secs(1));
    assert!(
        took >= Duration::from_millis(1500) && took <= Duration::from_millis(3200),
        "cut after {took:?}"
    );
    assert!(
        answer.starts_with(b"HTTP/1.1 408"),
        "{}",
        String::from_utf8_lossy(&answer)
    );

    // a later request on a kept-alive connection: from its first byte, not from the last
    // request (the connection idled 1.5 s first)
    let mut s = TcpStream::connect(plain).expect("connect");
    assert_eq!(get(&mut s, "/").map(|r| r.0), Some(200));
    std::thread::sleep(Duration::from_millis(1500));
    let (took, answer) = trickle(&s, head, Duration::from_secs(1));
    assert!(
        took >= Duration::from_millis(1900) && took <= Duration::from_millis(3000),
        "cut after {took:?}"
    );
    assert!(answer.starts_with(b"HTTP/1.1 408"));

    // a connection that never sends anything: closed at header_timeout, quietly
    let t2 = Instant::now();
    let mut s = TcpStream::connect(plain).expect("connect");
    assert!(closed_within(&mut s, Duration::from_secs(4)));
    let took = t2.elapsed();
    assert!(took >= Duration::from_millis(1800), "{took:?}");
    assert!(metric(&sluice, "sluice_limit_hits_total{limit=\"header_timeout\"}") >= 3.0);
    // nothing reached the backend but the one complete request
    assert_eq!(
        metric(
            &sluice,
            "sluice_requests_total{code=\"2xx\",color=\"blue\",pool=\"p\",route=\"all\"}"
        ),
        1.0
    );
}

/// A client quiet for longer than the edge's quiet time (20 ms: an idle connection then gives
/// back its head buffer and waits for one byte without it) is still served every request whole,
/// not a byte lost or doubled: a first head and a kept-alive connection's next head split by
/// pauses, a body after a pause, a request with another pipelined behind it after a pause.
#[test]
fn requests_after_a_quiet_pause_are_served_whole() {
    let dir = tempdir();
    let be = Backend::start(dir.path(), "b");
    let (_sluice, plain) = start(dir.path(), be.addr, "");
    let pause = || std::thread::sleep(Duration::from_millis(60));
    let send_slowly = |s: &mut TcpStream, pieces: &[&[u8]]| {
        for piece in pieces {
            pause();
            s.write_all(piece).expect("write");
        }
    };
    let echoed = |r: Option<(u16, String, Vec<u8>)>| -> serde_json::Value {
        let (code, _, body) = r.expect("an answer");
        assert_eq!(code, 200, "{}", String::from_utf8_lossy(&body));
        serde_json::from_slice(&body).expect("json")
    };
    let mut s = TcpStream::connect(plain).expect("connect");
    for n in 1..=3 {
        let line = format!("ET /_demo/headers?n={n} HTTP/1.1\r\nHo");
        send_slowly(
            &mut s,
            &[b"G", line.as_bytes(), b"st: t\r\nX-Piece: ", b"abc\r\n\r\n"],
        );
        let r = echoed(read_response(&mut s));
        assert_eq!(r["method"], "GET");
        assert_eq!(r["uri"], format!("/_demo/headers?n={n}"));
        assert_eq!(r["headers"]["x-piece"], "abc");
    }

    let mut s = TcpStream::connect(plain).expect("connect");
    send_slowly(
        &mut s,
        &[
            b"POST /_demo/headers HTTP/1.1\r\nHost: t\r\nContent-Length: 5\r\n\r\n",
            b"hello",
        ],
    );
    let r = echoed(read_response(&mut s));
    assert_eq!(r["method"], "POST");
    assert_eq!(r["headers"]["content-length"], "5");

    // pingora serves the first of pipelined requests and then closes (its pipelining is off:
    // RFC 9112 §9.3.2 lets the client retry the rest on a new connection)
    let mut s = TcpStream::connect(plain).expect("connect");
    assert_eq!(get(&mut s, "/").map(|r| r.0), Some(200));
    send_slowly(
        &mut s,
        &[b"GET /_demo/headers?n=4 HTTP/1.1\r\nHost: t\r\n\r\nGET /_demo/headers?n=5 HTTP/1.1\r\nHost: t\r\n\r\n"],
    );
    let r = echoed(read_response(&mut s));
    assert_eq!(r["uri"], "/_demo/headers?n=4");
}

#[test]
fn idle_keepalive_connections_are_closed() {
    let dir = tempdir();
    let be = Backend::start(dir.path(), "b");
    let (sluice, plain) = start(
        dir.path(),
        be.addr,
        "keepalive_timeout = \"2s\"\nkeepalive_requests = 3",
    );
    let mut s = TcpStream::connect(plain).expect("connect");
    assert_eq!(get(&mut s, "/").map(|r| r.0), Some(200));
    let t0 = Instant::now();
    assert!(closed_within(&mut s, Duration::from_secs(5)));
    let took = t0.elapsed();
    assert!(
        took >= Duration::from_millis(1800) && took <= Duration::from_millis(3000),
        "closed after {took:?}"
    );
    assert_eq!(
        metric(
            &sluice,
            "sluice_limit_hits_total{limit=\"keepalive_timeout\"}"
        ),
        1.0
    );
    // keepalive_requests: the third answer says close, and the connection closes
    let mut s = TcpStream::connect(plain).expect("connect");
    for i in 1..=3 {
        let (code, head, _) = get(&mut s, "/").expect("answer");
        assert_eq!(code, 200);
        let closes = head.to_ascii_lowercase().contains("connection: close");
        assert_eq!(closes, i == 3, "request {i}: {head}");
    }
    assert!(closed_within(&mut s, Duration::from_secs(1)));
}

/// Header names go on lower-case both ways (pingora parses the heads without their case), a
/// few standard ones title-cased; values and the request target are kept as they came.
#[test]
fn header_names_go_on_lower_case_both_ways() {
    let dir = tempdir();
    let rb = RawBackend::start();
    let (_sluice, plain) = start(dir.path(), rb.addr, "");
    let mut s = TcpStream::connect(plain).expect("connect");
    for _ in 0..2 {
        rb.clear();
        s.write_all(b"GET /A/b?C=D HTTP/1.1\r\nHOST: t\r\nX-Client-Thing: Mixed Case\r\nx-client-THING: 2\r\n\r\n")
            .expect("write");
        let (code, head, body) = read_response(&mut s).expect("answer");
        assert_eq!((code, &body[..]), (200, &b"ok\n"[..]), "{head}");
        assert!(head.contains("\r\nx-raw-backend: Yes\r\n"), "{head}");
        assert!(!head.contains("X-Raw-Backend"), "{head}");
        let got = String::from_utf8_lossy(&rb.received()).to_string();
        assert!(got.starts_with("GET /A/b?C=D HTTP/1.1\r\n"), "{got}");
        assert!(
            got.contains("\r\nx-client-thing: Mixed Case\r\nx-client-thing: 2\r\n"),
            "{got}"
        );
        assert!(got.contains("\r\nHost: t\r\n"), "{got}");
        assert!(
            !got.contains("X-Client-Thing") && !got.contains("HOST"),
            "{got}"
        );
    }
}

#[test]
fn oversized_heads_get_431_and_bodies_413() {
    let dir = tempdir();
    let rb = RawBackend::start();
    let (sluice, plain) = start(
        dir.path(),
        rb.addr,
        "max_header_bytes = 8192\nmax_body_bytes = 1048576",
    );
    // a 200 KB header: 431, and the backend sees nothing
    let mut s = TcpStream::connect(plain).expect("connect");
    let big = format!(
        "GET / HTTP/1.1\r\nHost: t\r\nX-Big: {}\r\n\r\n",
        "a".repeat(200_000)
    );
    let _ = s.write_all(big.as_bytes());
    assert_eq!(read_response(&mut s).map(|r| r.0), Some(431));
    // just under the limit passes
    let mut s = TcpStream::connect(plain).expect("connect");
    let fits = format!(
        "GET / HTTP/1.1\r\nHost: t\r\nX-Big: {}\r\n\r\n",
        "a".repeat(8000)
    );
    s.write_all(fits.as_bytes()).expect("write");
    assert_eq!(read_response(&mut s).map(|r| r.0), Some(200));
    let answered_before = rb.requests();
    assert_eq!(answered_before, 1);
    assert!(!String::from_utf8_lossy(&rb.received()).contains(&"a".repeat(8001)));
    rb.clear();

    // Content-Length over max_body_bytes: 413 before a byte of the body is read
    let mut s = TcpStream::connect(plain).expect("connect");
    s.write_all(b"POST /up HTTP/1.1\r\nHost: t\r\nContent-Length: 20000000\r\n\r\n")
        .expect("write");
    let (code, head, _) = read_response(&mut s).expect("answer");
    assert_eq!(code, 413);
    assert!(head.to_ascii_lowercase().contains("connection: close"));
    assert!(closed_within(&mut s, Duration::from_secs(2)));
    // a chunked body crossing it: 413 as it crosses; the backend never gets a whole request
    let mut s = TcpStream::connect(plain).expect("connect");
    s.write_all(b"POST /up HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\n\r\n")
        .expect("write");
    let chunk = format!("{:x}\r\n{}\r\n", 65536, "b".repeat(65536));
    let mut sent = 0;
    let mut answered = None;
    s.set_read_timeout(Some(Duration::from_millis(1)))
        .expect("timeout");
    while sent < 4 * 1024 * 1024 {
        if s.write_all(chunk.as_bytes()).is_err() {
            break;
        }
        sent += 65536;
        if sent > 1024 * 1024 + 65536 {
            s.set_read_timeout(Some(Duration::from_secs(5)))
                .expect("timeout");
            answered = read_response(&mut s).map(|r| r.0);
            break;
        }
    }
    assert_eq!(answered, Some(413));
    assert!(sent < 2 * 1024 * 1024, "sluice read {sent} bytes");
    assert_eq!(
        rb.requests(),
        answered_before,
        "the backend never got a whole request"
    );
    assert!(rb.received().len() < 1024 * 1024 + 100_000);
    // a route's own limit
    let post = |path: &str, n: usize| {
        let mut s = TcpStream::connect(plain).expect("connect");
        let req = format!(
            "POST {path} HTTP/1.1\r\nHost: t\r\nContent-Length: {n}\r\n\r\n{}",
            "c".repeat(n)
        );
        s.write_all(req.as_bytes()).expect("write");
        read_response(&mut s).map(|r| r.0)
    };
    assert_eq!(post("/small", 100), Some(200));
    assert_eq!(post("/small", 101), Some(413));
    assert_eq!(post("/other", 101), Some(200));
    assert!(metric(&sluice, "sluice_limit_hits_total{limit=\"header_bytes\"}") >= 1.0);
    assert_eq!(
        metric(&sluice, "sluice_limit_hits_total{limit=\"body_bytes\"}"),
        3.0
    );
    // the limits in force are in /status
    let st = sluice.status();
    assert_eq!(st["limits"]["max_header_bytes"], 8192);
    assert_eq!(st["limits"]["max_body_bytes"], 1048576);
}

#[test]
fn h2_bodies_over_the_limit_get_413() {
    let dir = tempdir();
    let be = Backend::start(dir.path(), "b");
    let (_sluice, plain) = start(dir.path(), be.addr, "max_body_bytes = 1000");
    let rt = runtime();
    let client = reqwest::Client::builder()
        .http2_prior_knowledge()
        .build()
        .expect("client");
    let url = format!("http://{plain}/x");
    rt.block_on(async {
        let ok = client
            .post(&url)
            .body(vec![1u8; 1000])
            .send()
            .await
            .expect("send");
        assert_eq!(ok.status().as_u16(), 200);
        assert_eq!(ok.version(), reqwest::Version::HTTP_2);
        let too = client
            .post(&url)
            .body(vec![1u8; 1001])
            .send()
            .await
            .expect("send");
        assert_eq!(too.status().as_u16(), 413);
        // a streamed body without a length (h2 DATA frames): 413 once it crosses
        let tcp = tokio::net::TcpStream::connect(plain)
            .await
            .expect("connect");
        let (mut h2, conn) = h2::client::handshake(tcp).await.expect("h2");
        tokio::spawn(conn);
        let req = http::Request::post(format!("http://{plain}/x"))
            .body(())
            .expect("req");
        let (resp, mut body) = h2.send_request(req, false).expect("send");
        for _ in 0..10 {
            if body
                .send_data(bytes::Bytes::from(vec![2u8; 300]), false)
                .is_err()
            {
                break;
            }
        }
        let _ = body.send_data(bytes::Bytes::new(), true);
        let resp = resp.await.expect("response");
        assert_eq!(resp.status().as_u16(), 413);
    });
}

#[test]
fn admin_answers_under_a_connection_flood() {
    raise_fd_limit();
    let dir = tempdir();
    let be = Backend::start(dir.path(), "b");
    let (sluice, plain) = start(
        dir.path(),
        be.addr,
        "max_connections_per_ip = 0\nheader_timeout = \"30s\"",
    );
    // 3,000 idle connections and 300 slowloris clients on the proxy listener...
    let idle: Vec<TcpStream> = (0..3000)
        .filter_map(|_| TcpStream::connect(plain).ok())
        .collect();
    assert!(idle.len() > 2900);
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let slow = {
        let stop = stop.clone();
        std::thread::spawn(move || {
            let mut conns: Vec<TcpStream> = (0..300)
                .filter_map(|_| TcpStream::connect(plain).ok())
                .collect();
            let head = b"GET / HTTP/1.1\r\nHost: t\r\nX-Slow: ";
            let mut i = 0;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                for c in conns.iter_mut() {
                    let b = head.get(i).copied().unwrap_or(b'a');
                    let _ = c.write_all(&[b]);
                }
                i += 1;
                std::thread::sleep(Duration::from_millis(100));
            }
        })
    };
    // ...while the probes are asked every 50 ms for 3 s
    let mut worst = Duration::ZERO;
    let mut answers = 0;
    let end = Instant::now() + Duration::from_secs(3);
    while Instant::now() < end {
        for path in ["/healthz", "/readyz"] {
            let t = Instant::now();
            let r = sluice.admin_get(path).map(|r| r.0);
            worst = worst.max(t.elapsed());
            assert_eq!(r, Some(200), "{path}");
            answers += 1;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let _ = slow.join();
    println!("{answers} probe answers under the flood, slowest {worst:?}");
    assert!(worst < Duration::from_secs(1), "slowest probe {worst:?}");
    assert!(sluice.status()["connections"]["open"].as_u64() >= Some(3000));
    drop(idle);
}
