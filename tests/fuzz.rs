//! Property tests of everything that parses client or operator input: the PROXY protocol
//! header, the config reader, the admin API bodies, the client-IP resolver, strict HTTP/1.1
//! heads, chunked framing and the h2 frame scanner. For every generated input: no panic, and
//! no allocation beyond a bound proportional to the input (a counting allocator watches).
//!
//! `make test` runs a few thousand cases of each; `PROPTEST_CASES=100000 cargo test --test
//! fuzz` runs more.

use std::alloc::{GlobalAlloc, Layout, System};
use std::net::IpAddr;
use std::path::Path;
use std::sync::atomic::{AtomicUsize, Ordering};

use proptest::prelude::*;

/// Counts live heap bytes and their peak (per thread would be exact; the tests here run their
/// cases on one thread each, and the bound allows for the others' noise).
struct Counting;

static LIVE: AtomicUsize = AtomicUsize::new(0);
static PEAK: AtomicUsize = AtomicUsize::new(0);

unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, l: Layout) -> *mut u8 {
        let p = System.alloc(l);
        if !p.is_null() {
            let now = LIVE.fetch_add(l.size(), Ordering::Relaxed) + l.size();
            PEAK.fetch_max(now, Ordering::Relaxed);
        }
        p
    }
    unsafe fn dealloc(&self, p: *mut u8, l: Layout) {
        System.dealloc(p, l);
        LIVE.fetch_sub(l.size(), Ordering::Relaxed);
    }
}

#[global_allocator]
static A: Counting = Counting;

/// Runs `f` and checks it allocated at most `bound` bytes more than were live before (with
/// 16 MiB of slack for the other test threads of this binary).
fn bounded<T>(bound: usize, f: impl FnOnce() -> T) -> T {
    let base = LIVE.load(Ordering::Relaxed);
    PEAK.store(base, Ordering::Relaxed);
    let out = f();
    let grew = PEAK.load(Ordering::Relaxed).saturating_sub(base);
    assert!(
        grew <= bound + 16 * 1024 * 1024,
        "allocated {grew} bytes (bound {bound})"
    );
    out
}

fn cases() -> ProptestConfig {
    let n = std::env::var("PROPTEST_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(3000);
    ProptestConfig {
        cases: n,
        failure_persistence: None,
        ..ProptestConfig::default()
    }
}

fn block_on<F: std::future::Future>(f: F) -> F::Output {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime")
        .block_on(f)
}

/// The reference config with a mutation: bytes changed, a slice cut out, text inserted.
fn mutated_config() -> impl Strategy<Value = String> {
    let base = include_str!("../config/sluice.full.toml");
    (
        0..base.len(),
        0..64usize,
        prop::sample::select(vec![
            "",
            "=",
            "[",
            "]]",
            "\"",
            "1",
            "-1",
            "1e400",
            "\"1h\"",
            "\"-5s\"",
            "[[pool]]\n",
            "[limits]\n",
            "max_connections = 0\n",
            "x = { a = [",
            "\u{0}",
            "é",
            "\n\n",
            "backends = [\"::1\"]",
            "hosts = [\"*.\"]",
            "weights = { blue = 200 }",
            "path_prefix = \"\"",
            "threads = 99999999999999999999",
        ]),
    )
        .prop_map(move |(at, cut, insert)| {
            let mut at = at;
            while !base.is_char_boundary(at) {
                at -= 1;
            }
            let mut end = (at + cut).min(base.len());
            while !base.is_char_boundary(end) {
                end -= 1;
            }
            format!("{}{}{}", &base[..at], insert, &base[end..])
        })
}

proptest! {
    #![proptest_config(cases())]

    #[test]
    fn proxy_protocol_headers(
        v1 in "PROXY [ -~]{0,120}\r\n[ -~]{0,8}",
        v2 in proptest::collection::vec(any::<u8>(), 0..600),
        raw in proptest::collection::vec(any::<u8>(), 0..200),
    ) {
        let mut sig = b"\r\n\r\n\0\r\nQUIT\n".to_vec();
        sig.extend(&v2);
        for input in [v1.as_bytes(), &sig[..], &raw[..]] {
            // a v2 header may announce up to 64 KiB, and is read whole
            bounded(70_000 + 8 * input.len(), || {
                let mut s = input;
                let _ = block_on(sluice::proxy_protocol::read_header(&mut s));
            });
            if input.len() >= 2 {
                let _ = sluice::proxy_protocol::parse_v2(input[0], input[1], &input[2..]);
            }
            let _ = sluice::proxy_protocol::parse_v1(input);
        }
    }

    #[test]
    fn config_reader(text in mutated_config(), junk in "[ -~\n\t]{0,400}") {
        let dir = Path::new("/nonexistent-sluice-fuzz/sluice.toml");
        for t in [&text, &junk] {
            bounded(64 * t.len() + 1024 * 1024, || {
                if let Err(diags) = sluice::config::parse(dir, t) {
                    for d in diags {
                        // every problem points into the file
                        assert!(d.line >= 1 && d.line <= t.lines().count() + 1, "{d}");
                    }
                }
            });
        }
    }

    #[test]
    fn admin_bodies(
        body in proptest::collection::vec(any::<u8>(), 0..300),
        json in r#"\{("(blue|green|to|step|every|x)": ?(-?[0-9]{1,25}(\.[0-9])?|"[a-z0-9]{0,6}"|null|\[\]|\{\}|true),? ?){0,5}\}"#,
    ) {
        for b in [&body[..], json.as_bytes()] {
            bounded(64 * b.len() + 64 * 1024, || {
                if let Ok(w) = sluice::admin::parse_weights(b) {
                    assert_eq!(u16::from(w.blue) + u16::from(w.green), 100);
                }
                if let Ok((_, step, every)) = sluice::admin::parse_shift(b) {
                    assert!((1..=100).contains(&step));
                    assert!(every >= std::time::Duration::from_millis(100));
                }
            });
        }
    }

    #[test]
    fn client_ip_resolver(
        peer in any::<[u8; 4]>(),
        hops in proptest::collection::vec("([0-9]{1,3}\\.){3}[0-9]{1,3}(:[0-9]{1,5})?|\\[[0-9a-f:]{2,20}\\](:[0-9]{1,5})?|[ -~]{0,12}", 0..12),
    ) {
        let trusted: Vec<ipnet::IpNet> = vec!["10.0.0.0/8".parse().expect("net"), "::1/128".parse().expect("net")];
        let header = hops.join(", ");
        let peer = IpAddr::from(peer);
        let ip = bounded(4096 + 64 * header.len(), || {
            sluice::client_ip::resolve(peer, std::iter::once(header.as_str()), &trusted)
        });
        // the answer is the peer or an address the header carried
        if ip != peer.to_canonical() {
            prop_assert!(header.contains(&ip.to_string()) || matches!(ip, IpAddr::V6(_)));
        }
    }

    #[test]
    fn http1_heads(
        head in proptest::collection::vec(prop::sample::select(vec![
            &b"GET"[..], b" ", b"/", b"a", b"HTTP/1.1", b"HTTP/1.0", b"\r\n", b"\n", b"\r",
            b"Host: t", b"Host:", b":", b"Content-Length: 5", b"Transfer-Encoding: chunked",
            b"\x00", b"\t", b"\xff", b"http://t/", b"#", b"X: y", b"0",
        ]), 0..40),
    ) {
        let head: Vec<u8> = head.concat();
        bounded(64 * head.len() + 4096, || {
            let _ = sluice::edge::http1::head_end(&head, 0);
            if let Ok(h) = sluice::edge::http1::check(&head) {
                // never both framings
                assert!(!(h.chunked && h.content_length.is_some()));
            }
        });
    }

    #[test]
    fn chunked_bodies(body in proptest::collection::vec(prop::sample::select(vec![
        &b"5"[..], b"0", b"f", b";", b"a=b", b"\r\n", b"\n", b"\r", b"hello", b"\"q\"", b"T: v",
        b"ffffffffffffffffff", b" ",
    ]), 0..40)) {
        let body: Vec<u8> = body.concat();
        bounded(4096, || {
            let mut f = sluice::edge::chunked::Framing::default();
            if let Ok(n) = f.feed(&body) {
                assert!(n <= body.len());
            }
        });
    }

    #[test]
    fn h2_frame_scanner(bytes in proptest::collection::vec(any::<u8>(), 0..2000), cut in 0..2000usize) {
        bounded(4096, || {
            let mut whole = Vec::new();
            let mut s = sluice::edge::h2::Scanner::new(24);
            s.feed(&bytes, &mut |e| whole.push(e));
            let mut split = Vec::new();
            let mut s = sluice::edge::h2::Scanner::new(24);
            let cut = cut.min(bytes.len());
            s.feed(&bytes[..cut], &mut |e| split.push(e));
            s.feed(&bytes[cut..], &mut |e| split.push(e));
            assert_eq!(whole, split);
        });
    }
}
