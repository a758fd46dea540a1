//! HTTP/2 error handling per RFC 9113 and RFC 7541, frame by frame over a raw connection: each
//! row sends something a conforming server must refuse and checks the error code it answers
//! with (GOAWAY for connection errors; RST_STREAM, or a GOAWAY, for stream errors). The same
//! areas as the h2spec suite: frame sizes, stream states and identifiers, flow-control windows,
//! SETTINGS values, HPACK, header field rules. (h2spec itself, run by hand against this build
//! over TLS, passed all 146 of its cases; see the issue note.)
//!
//! Frame-size errors of fixed-size frames and SETTINGS_INITIAL_WINDOW_SIZE over 2^31-1 are
//! answered by sluice's frame watch (the `h2` crate would say PROTOCOL_ERROR). Four rows show
//! where the `h2` crate still answers PROTOCOL_ERROR instead of the code the RFC names; each
//! says why.

mod common;

use std::time::Duration;

use common::h2raw::*;
use common::*;

const PROTOCOL_ERROR: u32 = 0x1;
const FLOW_CONTROL_ERROR: u32 = 0x3;
const FRAME_SIZE_ERROR: u32 = 0x6;

enum Want {
    /// A connection error with this code.
    Conn(u32),
    /// A stream error with this code (RST_STREAM on the stream, or GOAWAY).
    Stream(u32),
    /// A normal response.
    Ok,
}

fn settings(pairs: &[(u16, u32)]) -> Vec<u8> {
    let payload: Vec<u8> = pairs
        .iter()
        .flat_map(|(id, v)| id.to_be_bytes().into_iter().chain(v.to_be_bytes()))
        .collect();
    frame(SETTINGS, 0, 0, &payload)
}

fn post_block() -> Vec<u8> {
    let mut b = vec![0x83, 0x86, 0x84]; // :method POST, :scheme http, :path /
    b.extend([0x01, 0x01, b't']);
    b
}

fn rows() -> Vec<(&'static str, Vec<u8>, Want)> {
    let get = get_block("/");
    let with = |extra: &[u8]| {
        let mut b = get.clone();
        b.extend(extra);
        b
    };
    vec![
        (
            "a valid request",
            frame(HEADERS, END_STREAM | END_HEADERS, 1, &get),
            Want::Ok,
        ),
        // 4.2 frame size
        (
            "DATA larger than SETTINGS_MAX_FRAME_SIZE",
            [
                frame(HEADERS, END_HEADERS, 1, &post_block()),
                frame(DATA, END_STREAM, 1, &vec![0u8; 16_385]),
            ]
            .concat(),
            Want::Conn(FRAME_SIZE_ERROR),
        ),
        (
            "PING of 7 octets",
            frame(PING, 0, 0, &[0; 7]),
            Want::Conn(FRAME_SIZE_ERROR),
        ),
        (
            "SETTINGS ACK with a payload",
            frame(SETTINGS, 1, 0, &[0; 6]),
            Want::Conn(FRAME_SIZE_ERROR),
        ),
        (
            "SETTINGS length not a multiple of 6",
            frame(SETTINGS, 0, 0, &[0; 5]),
            Want::Conn(FRAME_SIZE_ERROR),
        ),
        (
            "RST_STREAM of 3 octets",
            [
                frame(HEADERS, END_HEADERS, 1, &post_block()),
                frame(RST_STREAM, 0, 1, &[0; 3]),
            ]
            .concat(),
            Want::Conn(FRAME_SIZE_ERROR),
        ),
        (
            "WINDOW_UPDATE of 3 octets",
            frame(WINDOW_UPDATE, 0, 0, &[0; 3]),
            Want::Conn(FRAME_SIZE_ERROR),
        ),
        // 5.1 stream states and identifiers
        (
            "HEADERS on stream 0",
            frame(HEADERS, END_STREAM | END_HEADERS, 0, &get),
            Want::Conn(PROTOCOL_ERROR),
        ),
        (
            "HEADERS on an even stream",
            frame(HEADERS, END_STREAM | END_HEADERS, 2, &get),
            Want::Conn(PROTOCOL_ERROR),
        ),
        (
            "DATA on an idle stream",
            frame(DATA, END_STREAM, 1, b"x"),
            Want::Conn(PROTOCOL_ERROR),
        ),
        (
            "DATA after END_STREAM",
            [
                frame(HEADERS, END_STREAM | END_HEADERS, 1, &get),
                frame(DATA, 0, 1, b"x"),
            ]
            .concat(),
            // RFC 9113 §5.1: STREAM_CLOSED; the h2 crate's stream state machine answers a
            // connection PROTOCOL_ERROR (h2spec accepts either, as a connection close)
            Want::Conn(PROTOCOL_ERROR),
        ),
        (
            "a stream id lower than one already used",
            [
                frame(HEADERS, END_STREAM | END_HEADERS, 5, &get),
                frame(HEADERS, END_STREAM | END_HEADERS, 3, &get),
            ]
            .concat(),
            Want::Conn(PROTOCOL_ERROR),
        ),
        (
            "PING on a stream",
            frame(PING, 0, 1, &[0; 8]),
            Want::Conn(PROTOCOL_ERROR),
        ),
        (
            "SETTINGS on a stream",
            frame(SETTINGS, 0, 1, &[]),
            Want::Conn(PROTOCOL_ERROR),
        ),
        (
            "RST_STREAM on stream 0",
            frame(RST_STREAM, 0, 0, &[0, 0, 0, 8]),
            Want::Conn(PROTOCOL_ERROR),
        ),
        (
            "RST_STREAM on an idle stream",
            frame(RST_STREAM, 0, 1, &[0, 0, 0, 8]),
            Want::Conn(PROTOCOL_ERROR),
        ),
        // 6.5 SETTINGS values
        (
            "SETTINGS_ENABLE_PUSH = 2",
            settings(&[(2, 2)]),
            Want::Conn(PROTOCOL_ERROR),
        ),
        (
            "SETTINGS_INITIAL_WINDOW_SIZE = 2^31",
            settings(&[(4, 1 << 31)]),
            Want::Conn(FLOW_CONTROL_ERROR),
        ),
        (
            "SETTINGS_MAX_FRAME_SIZE = 16383",
            settings(&[(5, 16_383)]),
            Want::Conn(PROTOCOL_ERROR),
        ),
        (
            "SETTINGS_MAX_FRAME_SIZE = 2^24",
            settings(&[(5, 1 << 24)]),
            Want::Conn(PROTOCOL_ERROR),
        ),
        // 6.9 flow control
        (
            "WINDOW_UPDATE of 0 on the connection",
            frame(WINDOW_UPDATE, 0, 0, &[0; 4]),
            Want::Conn(PROTOCOL_ERROR),
        ),
        (
            "a connection window over 2^31-1",
            [
                frame(WINDOW_UPDATE, 0, 0, &0x7fff_ffffu32.to_be_bytes()),
                frame(WINDOW_UPDATE, 0, 0, &0x7fff_ffffu32.to_be_bytes()),
            ]
            .concat(),
            Want::Conn(FLOW_CONTROL_ERROR),
        ),
        (
            "WINDOW_UPDATE of 0 on a stream",
            [
                frame(HEADERS, END_HEADERS, 1, &post_block()),
                frame(WINDOW_UPDATE, 0, 1, &[0; 4]),
            ]
            .concat(),
            Want::Stream(PROTOCOL_ERROR),
        ),
        (
            "DATA beyond the stream's window",
            [
                frame(HEADERS, END_HEADERS, 1, &post_block()),
                frame(DATA, 0, 1, &vec![0u8; 16_384]),
                frame(DATA, 0, 1, &vec![0u8; 16_384]),
                frame(DATA, 0, 1, &vec![0u8; 16_384]),
                frame(DATA, 0, 1, &vec![0u8; 16_384]),
                frame(DATA, 0, 1, &vec![0u8; 16_384]),
            ]
            .concat(),
            Want::Conn(FLOW_CONTROL_ERROR),
        ),
        // 6.10 CONTINUATION
        (
            "CONTINUATION without HEADERS",
            frame(CONTINUATION, END_HEADERS, 1, &get),
            Want::Conn(PROTOCOL_ERROR),
        ),
        (
            "a header block interrupted by PING",
            [
                frame(HEADERS, END_STREAM, 1, &get),
                frame(PING, 0, 0, &[0; 8]),
            ]
            .concat(),
            Want::Conn(PROTOCOL_ERROR),
        ),
        // RFC 7541 HPACK
        // RFC 7541 §2.3.3/§6.3 ask for COMPRESSION_ERROR; the h2 crate maps every HPACK
        // decoding error to PROTOCOL_ERROR (its framed_read.rs), and telling them apart would
        // take a second HPACK decoder in front of it
        (
            "an index beyond both tables",
            frame(HEADERS, END_STREAM | END_HEADERS, 1, &with(&[0xbf])),
            Want::Conn(PROTOCOL_ERROR),
        ),
        (
            "indexed field 0",
            frame(HEADERS, END_STREAM | END_HEADERS, 1, &with(&[0x80])),
            Want::Conn(PROTOCOL_ERROR),
        ),
        (
            "a table size update above SETTINGS_HEADER_TABLE_SIZE",
            frame(
                HEADERS,
                END_STREAM | END_HEADERS,
                1,
                &[&[0x3f, 0xe2, 0x1f][..], &get].concat(),
            ),
            Want::Conn(PROTOCOL_ERROR),
        ),
        // 8.2 header fields
        (
            "an uppercase field name",
            frame(
                HEADERS,
                END_STREAM | END_HEADERS,
                1,
                &with(&literal("X-Up", "v")),
            ),
            Want::Stream(PROTOCOL_ERROR),
        ),
        (
            "a connection-specific field",
            frame(
                HEADERS,
                END_STREAM | END_HEADERS,
                1,
                &with(&literal("connection", "keep-alive")),
            ),
            Want::Stream(PROTOCOL_ERROR),
        ),
        (
            "a pseudo-header after a regular field",
            frame(
                HEADERS,
                END_STREAM | END_HEADERS,
                1,
                &[
                    &[0x82, 0x86][..],
                    &literal("x", "y"),
                    &[0x84, 0x01, 0x01, b't'],
                ]
                .concat(),
            ),
            Want::Stream(PROTOCOL_ERROR),
        ),
        (
            "no :path",
            frame(
                HEADERS,
                END_STREAM | END_HEADERS,
                1,
                &[0x82, 0x86, 0x01, 0x01, b't'],
            ),
            Want::Stream(PROTOCOL_ERROR),
        ),
        (
            "an unknown pseudo-header",
            frame(
                HEADERS,
                END_STREAM | END_HEADERS,
                1,
                &with(&literal(":x", "y")),
            ),
            Want::Stream(PROTOCOL_ERROR),
        ),
        (
            "TE other than trailers",
            frame(
                HEADERS,
                END_STREAM | END_HEADERS,
                1,
                &with(&literal("te", "gzip")),
            ),
            Want::Stream(PROTOCOL_ERROR),
        ),
        (
            "content-length that the DATA contradicts",
            [
                frame(
                    HEADERS,
                    END_HEADERS,
                    1,
                    &[post_block(), literal("content-length", "3")].concat(),
                ),
                frame(DATA, END_STREAM, 1, b"toolong"),
            ]
            .concat(),
            Want::Stream(PROTOCOL_ERROR),
        ),
    ]
}

#[test]
fn errors_get_the_right_codes() {
    let dir = tempdir();
    let be = Backend::start(dir.path(), "backend");
    let plain = free_addr();
    let config = format!(
        r#"
[server]
access_log = "off"
[admin]
listen = "{{admin}}"
[[listener]]
listen = "{plain}"
http2 = true
[[pool]]
name = "p"
backends = ["{}"]
[[route]]
name = "all"
hosts = ["*"]
blue = ["p"]
"#,
        be.addr
    );
    let _s = Sluice::start(dir.path(), &config);
    let mut failures = Vec::new();
    for (name, bytes, want) in rows() {
        let mut c = Raw::open(plain, &[]);
        c.send(&bytes);
        let got = c.outcome(Duration::from_secs(3));
        let ok = match (&want, &got) {
            (Want::Conn(code), Outcome::Goaway(c)) => c == code,
            (Want::Stream(code), Outcome::Reset(_, c))
            | (Want::Stream(code), Outcome::Goaway(c)) => c == code,
            (Want::Ok, Outcome::Response(1, Some(200))) => true,
            _ => false,
        };
        if !ok {
            let want = match want {
                Want::Conn(c) => format!("GOAWAY {c:#x}"),
                Want::Stream(c) => format!("RST_STREAM/GOAWAY {c:#x}"),
                Want::Ok => "a response".into(),
            };
            failures.push(format!("{name}: got {got:?}, want {want}"));
        }
    }
    assert!(failures.is_empty(), "\n{}", failures.join("\n"));
}
