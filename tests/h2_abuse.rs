//! HTTP/2 abuse against the real binary over raw frames: rapid reset, CONTINUATION floods,
//! too many streams, PING and SETTINGS floods, zero-window stalls, slow headers. Each ends with
//! the abusive connection closed or its streams refused, sluice's memory bounded, and other
//! clients served.

mod common;

use std::io::Write;
use std::net::{SocketAddr, TcpStream};
use std::time::{Duration, Instant};

use common::h2raw::*;
use common::*;

struct Setup {
    sluice: Sluice,
    plain: SocketAddr,
    _backend: Backend,
    _dir: tempfile::TempDir,
}

fn start(limits: &str) -> Setup {
    let dir = tempdir();
    let backend = Backend::start(dir.path(), "b");
    let plain = free_addr();
    let config = format!(
        r#"
[server]
threads = 2
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
backends = ["{be}"]
[[route]]
name = "all"
hosts = ["*"]
blue = ["p"]
"#,
        be = backend.addr
    );
    let sluice = Sluice::start(dir.path(), &config);
    Setup {
        sluice,
        plain,
        _backend: backend,
        _dir: dir,
    }
}

impl Setup {
    /// A well-behaved h2 client is served.
    fn others_served(&self) {
        let rt = runtime();
        let client = reqwest::Client::builder()
            .http2_prior_knowledge()
            .timeout(Duration::from_secs(5))
            .build()
            .expect("client");
        let url = format!("http://{}/", self.plain);
        let r = rt.block_on(async { client.get(&url).send().await.map(|r| r.status().as_u16()) });
        assert_eq!(r.ok(), Some(200));
    }

    fn h2_hits(&self) -> f64 {
        self.sluice
            .metric("sluice_limit_hits_total{limit=\"h2\"}")
            .unwrap_or(0.0)
    }

    fn rss(&self) -> u64 {
        rss_kib(self.sluice.proc.pid())
    }
}

#[test]
fn rapid_reset_closes_the_connection() {
    let s = start("");
    let before = s.rss();
    let mut c = Raw::open(s.plain, &[]);
    let mut sent = 0u32;
    for i in 0..20_000u32 {
        let id = 1 + 2 * i;
        let mut b = frame(HEADERS, END_STREAM | END_HEADERS, id, &get_block("/"));
        b.extend(frame(RST_STREAM, 0, id, &8u32.to_be_bytes()));
        if !c.send(&b) {
            break;
        }
        sent += 1;
    }
    assert!(
        c.closed_within(Duration::from_secs(5)),
        "still open after {sent} resets"
    );
    assert!(sent < 20_000 || s.h2_hits() >= 1.0);
    assert!(s.h2_hits() >= 1.0);
    s.others_served();
    assert!(
        s.rss() < before + 64 * 1024,
        "RSS {} KiB -> {} KiB",
        before,
        s.rss()
    );
}

/// The variant the `h2` crate does not count: each stream is accepted (and proxied) before it
/// is reset. sluice's watch cuts the connection once most of its streams end reset.
#[test]
fn reset_after_accept_closes_the_connection() {
    let s = start("");
    let mut c = Raw::open(s.plain, &[]);
    let mut next = 1u32;
    let mut batches = 0;
    'outer: for _ in 0..100 {
        let ids: Vec<u32> = (0..10).map(|i| next + 2 * i).collect();
        next += 20;
        let mut b = Vec::new();
        for id in &ids {
            b.extend(frame(
                HEADERS,
                END_STREAM | END_HEADERS,
                *id,
                &get_block("/_demo/sleep?ms=500"),
            ));
        }
        if !c.send(&b) {
            break;
        }
        std::thread::sleep(Duration::from_millis(20));
        let mut r = Vec::new();
        for id in &ids {
            r.extend(frame(RST_STREAM, 0, *id, &8u32.to_be_bytes()));
        }
        if !c.send(&r) {
            break 'outer;
        }
        batches += 1;
    }
    assert!(
        c.closed_within(Duration::from_secs(5)),
        "open after {batches} batches"
    );
    assert!(batches < 30, "cut after {batches} batches of 10");
    assert!(s.h2_hits() >= 1.0);
    s.others_served();
}

#[test]
fn continuation_flood_closes_the_connection() {
    let s = start("");
    let before = s.rss();
    let mut c = Raw::open(s.plain, &[]);
    let mut b = frame(HEADERS, END_STREAM, 1, &[0x82]);
    // a header block that never ends: one byte of a literal value per frame
    b.extend(frame(CONTINUATION, 0, 1, &[0x01]));
    let mut sent = 0;
    if c.send(&b) {
        for _ in 0..200_000 {
            if !c.send(&frame(CONTINUATION, 0, 1, b"a")) {
                break;
            }
            sent += 1;
        }
    }
    assert!(
        c.closed_within(Duration::from_secs(5)),
        "open after {sent} frames"
    );
    assert!(s.h2_hits() >= 1.0);
    s.others_served();
    assert!(s.rss() < before + 64 * 1024);
}

#[test]
fn streams_over_the_limit_are_refused() {
    let s = start("h2_max_concurrent_streams = 10");
    let mut c = Raw::open(s.plain, &[]);
    let mut b = Vec::new();
    for i in 0..50u32 {
        b.extend(frame(
            HEADERS,
            END_STREAM | END_HEADERS,
            1 + 2 * i,
            &get_block("/_demo/sleep?ms=1500"),
        ));
    }
    assert!(c.send(&b));
    let mut refused = 0;
    let mut answered = 0;
    let end = Instant::now() + Duration::from_secs(8);
    while Instant::now() < end && refused + answered < 50 {
        let (frames, closed) = c.frames(Duration::from_millis(200));
        for f in frames {
            match f.kind {
                RST_STREAM if code(&f) == 7 => refused += 1, // REFUSED_STREAM
                HEADERS if f.stream > 0 => answered += 1,
                GOAWAY => refused += 50 - answered - refused,
                _ => {}
            }
        }
        if closed {
            break;
        }
    }
    assert!(answered <= 10, "{answered} answered");
    assert_eq!(
        refused + answered,
        50,
        "refused {refused}, answered {answered}"
    );
    assert!(s.h2_hits() >= 1.0);
    s.others_served();
}

#[test]
fn header_lists_over_max_header_bytes_are_refused() {
    let s = start("max_header_bytes = 8192");
    let mut c = Raw::open(s.plain, &[]);
    let block = [get_block("/"), long_literal("x-big", &"a".repeat(10_000))].concat();
    let (first, rest) = block.split_at(8000);
    let mut b = frame(HEADERS, END_STREAM, 1, first);
    b.extend(frame(CONTINUATION, END_HEADERS, 1, rest));
    assert!(c.send(&b));
    let got = c.outcome(Duration::from_secs(3));
    // the h2 crate answers 431 itself, or resets the stream: never a response from upstream
    assert!(
        matches!(
            got,
            Outcome::Reset(1, _)
                | Outcome::Goaway(_)
                | Outcome::Closed
                | Outcome::Response(1, Some(431))
        ),
        "{got:?}"
    );
    assert!(
        wait_until(Duration::from_secs(2), || s
            .sluice
            .metric("sluice_limit_hits_total{limit=\"header_bytes\"}")
            == Some(1.0)),
        "counted"
    );
    // under the limit is fine
    let mut c = Raw::open(s.plain, &[]);
    let block = [get_block("/"), long_literal("x-big", &"a".repeat(6_000))].concat();
    assert!(c.send(&frame(HEADERS, END_STREAM | END_HEADERS, 1, &block)));
    assert_eq!(
        c.outcome(Duration::from_secs(3)),
        Outcome::Response(1, Some(200))
    );
    s.others_served();
}

#[test]
fn ping_and_settings_floods_close_the_connection() {
    let s = start("");
    for (kind, payload) in [(PING, vec![0u8; 8]), (SETTINGS, vec![0, 3, 0, 0, 0, 100])] {
        let mut c = Raw::open(s.plain, &[]);
        let one = frame(kind, 0, 0, &payload);
        let burst: Vec<u8> = one.iter().copied().cycle().take(one.len() * 100).collect();
        let mut sent = 0;
        for _ in 0..200 {
            if !c.send(&burst) {
                break;
            }
            sent += 100;
        }
        assert!(
            c.closed_within(Duration::from_secs(5)),
            "frame type {kind}: still open after {sent}"
        );
    }
    assert!(s.h2_hits() >= 2.0);
    s.others_served();
}

#[test]
fn a_zero_window_does_not_hold_a_response_forever() {
    let s = start("send_timeout = \"2s\"");
    // SETTINGS_INITIAL_WINDOW_SIZE = 0: no DATA may be sent to this client
    let mut c = Raw::open(s.plain, &[(4, 0)]);
    assert!(c.send(&frame(
        HEADERS,
        END_STREAM | END_HEADERS,
        1,
        &get_block("/")
    )));
    let t0 = Instant::now();
    let mut reset_or_closed = None;
    while t0.elapsed() < Duration::from_secs(8) && reset_or_closed.is_none() {
        let (frames, closed) = c.frames(Duration::from_millis(100));
        if frames.iter().any(|f| f.kind == RST_STREAM && f.stream == 1) || closed {
            reset_or_closed = Some(t0.elapsed());
        }
        assert!(!frames.iter().any(|f| f.kind == DATA), "no window, no data");
    }
    let took = reset_or_closed.expect("the stalled stream is given up");
    assert!(took >= Duration::from_millis(1500), "{took:?}");
    s.others_served();
}

#[test]
fn slow_header_blocks_and_silent_prefaces_are_cut() {
    let s = start("header_timeout = \"2s\"");
    // a header block that is never finished
    let mut c = Raw::open(s.plain, &[]);
    assert!(c.send(&frame(HEADERS, END_STREAM, 1, &[0x82, 0x86])));
    let t0 = Instant::now();
    assert!(c.closed_within(Duration::from_secs(5)));
    assert!(
        t0.elapsed() >= Duration::from_millis(1500),
        "{:?}",
        t0.elapsed()
    );
    // the preface and nothing more
    let t0 = Instant::now();
    let mut c = TcpStream::connect(s.plain).expect("connect");
    c.write_all(PREFACE).expect("preface");
    assert!(closed_within(&mut c, Duration::from_secs(5)));
    let took = t0.elapsed();
    assert!(
        took >= Duration::from_millis(1500) && took < Duration::from_secs(4),
        "{took:?}"
    );
    assert!(
        s.sluice
            .metric("sluice_limit_hits_total{limit=\"header_timeout\"}")
            .unwrap_or(0.0)
            >= 2.0
    );
    s.others_served();
}
