//! Strict HTTP/1.1 at the edge (RFC 9112): malformed and ambiguous requests over raw sockets.
//! For each row: what the client gets and exactly what bytes the backend receives (nothing,
//! for a refused request). The `nginx` column is what nginx 1.22.1 (Debian 12, default
//! `proxy_pass` setup) answered for the same bytes, measured with the same rows.
//!
//! A chunked body reaches the backend re-framed by pingora (chunk extensions dropped, the
//! `Transfer-Encoding` field written last as `chunked`): the backend never parses the client's
//! framing, and the client's framing has passed the strict check first.

mod common;

use std::io::Write;
use std::net::TcpStream;
use std::time::Duration;

use common::*;

struct Row {
    name: &'static str,
    request: &'static [u8],
    /// Status sluice answers.
    status: u16,
    /// Exactly what the backend receives, `{xff}` standing for sluice's added headers; "" for
    /// nothing at all.
    backend: &'static str,
    nginx: &'static str,
}

/// The headers sluice adds to a request from 127.0.0.1 carrying `x-request-id: r`.
const ADDED: &str =
    "x-forwarded-for: 127.0.0.1\r\nx-forwarded-proto: http\r\nx-forwarded-host: t\r\n";

const ROWS: &[Row] = &[
    Row {
        name: "valid",
        request: b"GET / HTTP/1.1\r\nHost: t\r\nx-request-id: r\r\n\r\n",
        status: 200,
        backend: "GET / HTTP/1.1\r\nHost: t\r\nx-request-id: r\r\n{added}\r\n",
        nginx: "200",
    },
    Row {
        name: "content_length_and_transfer_encoding",
        request: b"POST / HTTP/1.1\r\nHost: t\r\nContent-Length: 6\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\nG",
        status: 400,
        backend: "",
        nginx: "400",
    },
    Row {
        name: "transfer_encoding_space_before_colon",
        request: b"POST / HTTP/1.1\r\nHost: t\r\nTransfer-Encoding : chunked\r\n\r\n0\r\n\r\n",
        status: 400,
        backend: "",
        nginx: "400",
    },
    Row {
        name: "transfer_encoding_xchunked",
        request: b"POST / HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: xchunked\r\n\r\n0\r\n\r\n",
        status: 400,
        backend: "",
        nginx: "501",
    },
    Row {
        name: "transfer_encoding_chunked_identity",
        request: b"POST / HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked, identity\r\n\r\n0\r\n\r\n",
        status: 400,
        backend: "",
        nginx: "501",
    },
    Row {
        name: "transfer_encoding_gzip_chunked",
        request: b"POST / HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: gzip, chunked\r\n\r\n0\r\n\r\n",
        status: 400,
        backend: "",
        nginx: "501",
    },
    Row {
        name: "transfer_encoding_twice",
        request: b"POST / HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
        status: 400,
        backend: "",
        nginx: "400",
    },
    Row {
        name: "transfer_encoding_vertical_tab",
        request: b"POST / HTTP/1.1\r\nHost: t\r\nTransfer-Encoding:\x0bchunked\r\n\r\n0\r\n\r\n",
        status: 400,
        backend: "",
        nginx: "501",
    },
    Row {
        name: "transfer_encoding_in_http10",
        request: b"POST / HTTP/1.0\r\nHost: t\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
        status: 400,
        backend: "",
        nginx: "400",
    },
    Row {
        name: "transfer_encoding_uppercase_and_tab",
        request: b"POST / HTTP/1.1\r\nHost: t\r\nx-request-id: r\r\nTransfer-Encoding:\tCHUNKED\r\n\r\n5\r\nhello\r\n0\r\n\r\n",
        status: 200,
        backend: "POST / HTTP/1.1\r\nHost: t\r\nx-request-id: r\r\n{added}Transfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n",
        nginx: "200",
    },
    Row {
        name: "content_length_twice_same",
        request: b"POST / HTTP/1.1\r\nHost: t\r\nContent-Length: 5\r\nContent-Length: 5\r\n\r\nhello",
        status: 400,
        backend: "",
        nginx: "400",
    },
    Row {
        name: "content_length_twice_different",
        request: b"POST / HTTP/1.1\r\nHost: t\r\nContent-Length: 5\r\nContent-Length: 6\r\n\r\nhello!",
        status: 400,
        backend: "",
        nginx: "400",
    },
    Row {
        name: "content_length_list",
        request: b"POST / HTTP/1.1\r\nHost: t\r\nContent-Length: 5, 5\r\n\r\nhello",
        status: 400,
        backend: "",
        nginx: "400",
    },
    Row {
        name: "content_length_plus_sign",
        request: b"POST / HTTP/1.1\r\nHost: t\r\nContent-Length: +5\r\n\r\nhello",
        status: 400,
        backend: "",
        nginx: "400",
    },
    Row {
        name: "content_length_hex",
        request: b"POST / HTTP/1.1\r\nHost: t\r\nContent-Length: 0x5\r\n\r\nhello",
        status: 400,
        backend: "",
        nginx: "400",
    },
    Row {
        name: "content_length_valid",
        request: b"POST / HTTP/1.1\r\nHost: t\r\nx-request-id: r\r\nContent-Length: 5\r\n\r\nhello",
        status: 200,
        backend: "POST / HTTP/1.1\r\nHost: t\r\nx-request-id: r\r\nContent-Length: 5\r\n{added}\r\nhello",
        nginx: "200",
    },
    Row {
        name: "bare_lf_after_request_line",
        request: b"GET / HTTP/1.1\nHost: t\r\n\r\n",
        status: 400,
        backend: "",
        nginx: "200",
    },
    Row {
        name: "bare_lf_after_header",
        request: b"GET / HTTP/1.1\r\nHost: t\nX: y\r\n\r\n",
        status: 400,
        backend: "",
        nginx: "200",
    },
    Row {
        name: "bare_lf_everywhere",
        request: b"GET / HTTP/1.1\nHost: t\n\n",
        status: 400,
        backend: "",
        nginx: "200",
    },
    Row {
        name: "bare_cr_in_value",
        request: b"GET / HTTP/1.1\r\nHost: t\r\nX: a\rb\r\n\r\n",
        status: 400,
        backend: "",
        nginx: "400",
    },
    Row {
        name: "nul_in_value",
        request: b"GET / HTTP/1.1\r\nHost: t\r\nX: a\x00b\r\n\r\n",
        status: 400,
        backend: "",
        nginx: "400",
    },
    Row {
        name: "obsolete_line_folding",
        request: b"GET / HTTP/1.1\r\nHost: t\r\nX: a\r\n b\r\n\r\n",
        status: 400,
        backend: "",
        nginx: "400",
    },
    Row {
        name: "space_before_colon",
        request: b"GET / HTTP/1.1\r\nHost : t\r\n\r\n",
        status: 400,
        backend: "",
        nginx: "400",
    },
    Row {
        name: "header_without_colon",
        request: b"GET / HTTP/1.1\r\nHost: t\r\nNoColon\r\n\r\n",
        status: 400,
        backend: "",
        nginx: "200 (line dropped)",
    },
    Row {
        name: "empty_header_name",
        request: b"GET / HTTP/1.1\r\nHost: t\r\n: x\r\n\r\n",
        status: 400,
        backend: "",
        nginx: "400",
    },
    Row {
        name: "chunk_extension",
        request: b"POST / HTTP/1.1\r\nHost: t\r\nx-request-id: r\r\nTransfer-Encoding: chunked\r\n\r\n5;a=b\r\nhello\r\n0\r\n\r\n",
        status: 200,
        backend: "POST / HTTP/1.1\r\nHost: t\r\nx-request-id: r\r\n{added}Transfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n",
        nginx: "200",
    },
    Row {
        name: "chunk_extension_bare_lf",
        request: b"POST / HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\n\r\n5;a=b\nhello\r\n0\r\n\r\n",
        status: 400,
        backend: "",
        nginx: "200",
    },
    Row {
        name: "chunk_size_overflow",
        request: b"POST / HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\n\r\nfffffffffffffffff1\r\nhello\r\n0\r\n\r\n",
        status: 400,
        backend: "",
        nginx: "400",
    },
    Row {
        name: "chunk_size_garbage",
        request: b"POST / HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\nhello\r\n0\r\n\r\n",
        status: 400,
        backend: "",
        nginx: "400",
    },
    Row {
        name: "chunk_data_longer_than_size",
        request: b"POST / HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhelloXX0\r\n\r\n",
        status: 400,
        backend: "",
        nginx: "400",
    },
    Row {
        name: "target_with_space",
        request: b"GET /a b HTTP/1.1\r\nHost: t\r\n\r\n",
        status: 400,
        backend: "",
        nginx: "400",
    },
    Row {
        name: "target_control_character",
        request: b"GET /a\x01 HTTP/1.1\r\nHost: t\r\n\r\n",
        status: 400,
        backend: "",
        nginx: "400",
    },
    Row {
        name: "target_raw_utf8",
        request: b"GET /\xc3\xa9 HTTP/1.1\r\nHost: t\r\n\r\n",
        status: 400,
        backend: "",
        nginx: "200",
    },
    Row {
        name: "target_fragment",
        request: b"GET /a#b HTTP/1.1\r\nHost: t\r\n\r\n",
        status: 400,
        backend: "",
        nginx: "200 (fragment dropped)",
    },
    Row {
        name: "target_braces",
        request: b"GET /{a} HTTP/1.1\r\nHost: t\r\n\r\n",
        status: 400,
        backend: "",
        nginx: "200",
    },
    Row {
        name: "target_not_a_path",
        request: b"GET a HTTP/1.1\r\nHost: t\r\n\r\n",
        status: 400,
        backend: "",
        nginx: "400",
    },
    Row {
        name: "duplicate_host",
        request: b"GET / HTTP/1.1\r\nHost: t\r\nHost: t\r\n\r\n",
        status: 400,
        backend: "",
        nginx: "400",
    },
    Row {
        name: "missing_host",
        request: b"GET / HTTP/1.1\r\n\r\n",
        status: 400,
        backend: "",
        nginx: "400",
    },
    Row {
        name: "host_with_space",
        request: b"GET / HTTP/1.1\r\nHost: a b\r\n\r\n",
        status: 400,
        backend: "",
        nginx: "400",
    },
    Row {
        name: "absolute_form_other_host",
        request: b"GET http://other/x HTTP/1.1\r\nHost: t\r\n\r\n",
        status: 400,
        backend: "",
        nginx: "200 (served as host \"other\")",
    },
    Row {
        name: "absolute_form_same_host",
        request: b"GET http://t/x HTTP/1.1\r\nHost: t\r\nx-request-id: r\r\n\r\n",
        status: 200,
        backend: "GET http://t/x HTTP/1.1\r\nHost: t\r\nx-request-id: r\r\n{added}\r\n",
        nginx: "200",
    },
    Row {
        name: "upgrade_h2c_is_not_passed_on",
        request: b"GET / HTTP/1.1\r\nHost: t\r\nx-request-id: r\r\nConnection: Upgrade, HTTP2-Settings\r\nUpgrade: h2c\r\nHTTP2-Settings: AAMAAABkAARAAAAAAAIAAAAA\r\n\r\n",
        status: 200,
        backend: "GET / HTTP/1.1\r\nHost: t\r\nx-request-id: r\r\n{added}\r\n",
        nginx: "200 (Upgrade not passed on)",
    },
    Row {
        name: "hop_by_hop_fields_are_not_passed_on",
        request: b"GET / HTTP/1.1\r\nHost: t\r\nx-request-id: r\r\nConnection: keep-alive, x-private\r\nx-private: 1\r\nKeep-Alive: timeout=5\r\nProxy-Connection: keep-alive\r\nProxy-Authorization: Basic YTpi\r\nTE: trailers\r\nTrailer: x-t\r\nx-kept: 1\r\n\r\n",
        status: 200,
        backend: "GET / HTTP/1.1\r\nHost: t\r\nx-request-id: r\r\nx-kept: 1\r\n{added}\r\n",
        nginx: "200 (passes on x-private, Proxy-Connection, Proxy-Authorization and Trailer)",
    },
    Row {
        name: "request_line_garbage",
        request: b"GARBAGE\r\n\r\n",
        status: 400,
        backend: "",
        nginx: "400",
    },
    Row {
        name: "request_line_double_space",
        request: b"GET  / HTTP/1.1\r\nHost: t\r\n\r\n",
        status: 400,
        backend: "",
        nginx: "200",
    },
    Row {
        name: "request_line_trailing_space",
        request: b"GET / HTTP/1.1 \r\nHost: t\r\n\r\n",
        status: 400,
        backend: "",
        nginx: "200",
    },
    Row {
        name: "lowercase_version",
        request: b"GET / http/1.1\r\nHost: t\r\n\r\n",
        status: 400,
        backend: "",
        nginx: "400",
    },
    Row {
        name: "http2_version_in_http1",
        request: b"GET / HTTP/2.0\r\nHost: t\r\n\r\n",
        status: 505,
        backend: "",
        nginx: "505",
    },
    Row {
        name: "http09_request",
        request: b"GET /\r\n\r\n",
        status: 400,
        backend: "",
        nginx: "HTTP/0.9 answer (no status line)",
    },
    Row {
        name: "leading_empty_line_ignored",
        request: b"\r\nGET / HTTP/1.1\r\nHost: t\r\nx-request-id: r\r\n\r\n",
        status: 200,
        backend: "GET / HTTP/1.1\r\nHost: t\r\nx-request-id: r\r\n{added}\r\n",
        nginx: "200",
    },
    Row {
        name: "connect_method",
        request: b"CONNECT t:443 HTTP/1.1\r\nHost: t:443\r\n\r\n",
        status: 405,
        backend: "",
        nginx: "400",
    },
];

#[test]
fn malformed_and_ambiguous_requests() {
    let dir = tempdir();
    let rb = RawBackend::start();
    let plain = free_addr();
    let config = format!(
        r#"
[server]
access_log = "off"
[admin]
listen = "{{admin}}"
[[listener]]
listen = "{plain}"
[[pool]]
name = "p"
backends = ["{be}"]
[[route]]
name = "all"
hosts = ["*"]
blue = ["p"]
"#,
        be = rb.addr
    );
    let _sluice = Sluice::start(dir.path(), &config);
    let mut failures = Vec::new();
    for row in ROWS {
        rb.clear();
        let before = rb.requests();
        let mut s = TcpStream::connect(plain).expect("connect");
        s.write_all(row.request).expect("write");
        let got = read_response(&mut s).map(|r| r.0);
        if row.status == 200 {
            wait_until(Duration::from_secs(2), || rb.requests() > before);
        } else {
            // give a wrongly forwarded request time to arrive
            std::thread::sleep(Duration::from_millis(50));
        }
        let received = String::from_utf8_lossy(&rb.received()).to_string();
        // rows that reach the backend carry their own request id (sluice keeps it)
        let expected = row.backend.replace("{added}", ADDED);
        if got != Some(row.status) || received != expected {
            failures.push(format!(
                "{}: client got {:?} (want {}), backend got {:?} (want {:?}); nginx: {}",
                row.name, got, row.status, received, expected, row.nginx
            ));
        }
    }
    assert!(failures.is_empty(), "\n{}", failures.join("\n"));
}
