//! Strict HTTP/1.1 request heads (RFC 9112) at the edge.
//!
//! sluice reads each request head whole before pingora parses it, and checks it here first: a
//! head that another parser (a backend, a cache, a second proxy) could read differently is
//! refused, never normalised and forwarded. What passes is exactly what RFC 9112's grammar
//! allows, minus what no honest client sends: bare CR or LF, obs-fold, whitespace before a
//! colon, control characters, duplicate or non-numeric `Content-Length`, any
//! `Transfer-Encoding` but a single `chunked`, both framings at once, a missing or repeated
//! `Host`, an absolute-form target naming another host than `Host`, and request-line garbage.

/// A refused head: the status to answer and why (the body of the answer).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Reject {
    pub status: u16,
    pub reason: &'static str,
}

const fn bad(reason: &'static str) -> Reject {
    Reject {
        status: 400,
        reason,
    }
}

/// More header fields than this: 431 (pingora's parser stops at 256).
pub const MAX_FIELDS: usize = 256;

/// Where the head in `buf` ends (just past its empty line), if it is complete. `from` is where
/// the previous call stopped looking (a multiple of nothing: any earlier offset is fine). The
/// end is the first `LF CRLF` or `LF LF`, so a head with bare LFs ends where a lenient parser
/// would end it, and `check` then refuses it.
pub fn head_end(buf: &[u8], from: usize) -> Option<usize> {
    let mut i = from.saturating_sub(2);
    while let Some(off) = memchr::memchr(b'\n', buf.get(i..)?) {
        let nl = i + off;
        match (buf.get(nl + 1), buf.get(nl + 2)) {
            (Some(b'\n'), _) => return Some(nl + 2),
            (Some(b'\r'), Some(b'\n')) => return Some(nl + 3),
            _ => {}
        }
        i = nl + 1;
    }
    None
}

/// How many bytes of empty lines (CRLF) precede the request line: RFC 9112 §2.2 lets a server
/// ignore them (old clients sent one after a POST body).
pub fn leading_empty_lines(buf: &[u8]) -> usize {
    let mut n = 0;
    while buf.get(n..n + 2) == Some(b"\r\n") {
        n += 2;
    }
    n
}

/// A 256-entry table: alphanumerics and `extra`. Every byte of a head is looked up in one of
/// these (a `contains` on the list of specials per byte cost ~40% of `check`).
const fn byte_class(extra: &[u8]) -> [bool; 256] {
    let mut t = [false; 256];
    let mut b = 0;
    while b < 256 {
        t[b] = (b as u8).is_ascii_alphanumeric();
        b += 1;
    }
    let mut i = 0;
    while i < extra.len() {
        t[extra[i] as usize] = true;
        i += 1;
    }
    t
}

const TCHAR: [bool; 256] = byte_class(b"!#$%&'*+-.^_`|~");
/// A reg-name or IPv4 address byte: unreserved, pct-encoded, sub-delims.
const HOST_BYTE: [bool; 256] = byte_class(b"-._~%!$&'()*+,;=");
/// Visible ASCII except `#` (a fragment is never sent) and the characters RFC 3986 leaves out
/// that pingora's parser would percent-encode on the way (a rewrite).
const TARGET_BYTE: [bool; 256] = byte_class(b"!$%&'()*+,-./:;=?@[]_~");

fn is_tchar(b: u8) -> bool {
    TCHAR[usize::from(b)]
}

/// A field value byte: visible ASCII, SP, HTAB, or obs-text.
fn is_value_byte(b: u8) -> bool {
    b == b'\t' || (0x20..=0x7e).contains(&b) || b >= 0x80
}

/// A request-target byte ([`TARGET_BYTE`]).
fn is_target_byte(b: u8) -> bool {
    TARGET_BYTE[usize::from(b)]
}

fn trim_ows(mut v: &[u8]) -> &[u8] {
    while let [b' ' | b'\t', rest @ ..] = v {
        v = rest;
    }
    while let [rest @ .., b' ' | b'\t'] = v {
        v = rest;
    }
    v
}

/// `host [":" port]` as a Host value or an absolute-form authority: a reg-name or IPv4 address
/// (unreserved, pct-encoded, sub-delims) or an IP-literal, and an optional decimal port.
fn valid_authority(a: &[u8]) -> bool {
    let (host, port) = if let Some(rest) = a.strip_prefix(b"[") {
        let Some(close) = rest.iter().position(|b| *b == b']') else {
            return false;
        };
        let lit = &rest[..close];
        if lit.is_empty()
            || !lit
                .iter()
                .all(|b| b.is_ascii_hexdigit() || b":.".contains(b))
        {
            return false;
        }
        match &rest[close + 1..] {
            [] => (&a[..0], None),
            [b':', port @ ..] => (&a[..0], Some(port)),
            _ => return false,
        }
    } else {
        match a.iter().rposition(|b| *b == b':') {
            Some(i) => (&a[..i], Some(&a[i + 1..])),
            None => (a, None),
        }
    };
    let host_ok = host.iter().all(|b| HOST_BYTE[usize::from(*b)]);
    let port_ok = port.is_none_or(|p| p.len() <= 5 && p.iter().all(u8::is_ascii_digit));
    host_ok && port_ok
}

/// The authority of an absolute-form target (`http://authority/...`), if `target` is one.
fn absolute_authority(target: &[u8]) -> Option<Result<&[u8], Reject>> {
    let colon = target.iter().position(|b| *b == b':')?;
    let scheme = &target[..colon];
    if scheme.is_empty() || !target[colon..].starts_with(b"://") {
        return None;
    }
    if !scheme.eq_ignore_ascii_case(b"http") && !scheme.eq_ignore_ascii_case(b"https") {
        return Some(Err(bad(
            "absolute-form target with a scheme other than http(s)",
        )));
    }
    let rest = &target[colon + 3..];
    let end = rest
        .iter()
        .position(|b| *b == b'/' || *b == b'?')
        .unwrap_or(rest.len());
    let authority = &rest[..end];
    if authority.is_empty() || authority.contains(&b'@') || !valid_authority(authority) {
        return Some(Err(bad("bad authority in the absolute-form target")));
    }
    Some(Ok(authority))
}

/// The lines of a head, each checked to end in CRLF with no CR or LF inside.
struct Lines<'a> {
    rest: &'a [u8],
}

impl<'a> Iterator for Lines<'a> {
    type Item = Result<&'a [u8], Reject>;

    fn next(&mut self) -> Option<Self::Item> {
        if self.rest.is_empty() {
            return None;
        }
        let Some(nl) = memchr::memchr(b'\n', self.rest) else {
            self.rest = &[];
            return Some(Err(bad("the head does not end with an empty line")));
        };
        if nl == 0 || self.rest[nl - 1] != b'\r' {
            self.rest = &[];
            return Some(Err(bad("bare LF (lines must end with CRLF)")));
        }
        let line = &self.rest[..nl - 1];
        self.rest = &self.rest[nl + 1..];
        if memchr::memchr(b'\r', line).is_some() {
            self.rest = &[];
            return Some(Err(bad("bare CR")));
        }
        Some(Ok(line))
    }
}

/// What `check` learned about a head that passed.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Head {
    /// `Content-Length`, if present.
    pub content_length: Option<u64>,
    pub chunked: bool,
}

/// Checks a complete request head (request line, fields and the empty line; no leading empty
/// lines). `Err` is the answer to send before closing the connection.
pub fn check(head: &[u8]) -> Result<Head, Reject> {
    // every line ends in CRLF; CR and LF appear nowhere else
    // every line ends in CRLF; CR and LF appear nowhere else; the last line is empty
    if !head.ends_with(b"\r\n\r\n") {
        return Err(bad(if head.ends_with(b"\n\n") {
            "bare LF (lines must end with CRLF)"
        } else {
            "the head does not end with an empty line"
        }));
    }
    let mut lines = Lines { rest: head };
    let request_line = match lines.next() {
        Some(Ok(l)) if !l.is_empty() => l,
        Some(Err(r)) => return Err(r),
        _ => return Err(bad("no request line")),
    };

    // method SP request-target SP HTTP-version
    let mut parts = request_line.split(|b| *b == b' ');
    let (Some(method), Some(target), Some(version), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Err(bad(
            "the request line is not: method, target, version, one space apart",
        ));
    };
    if method.is_empty() || !method.iter().all(|b| is_tchar(*b)) {
        return Err(bad("bad method"));
    }
    if target.is_empty() || !target.iter().all(|b| is_target_byte(*b)) {
        return Err(bad("bad character in the request target"));
    }
    let http10 = match version {
        b"HTTP/1.1" => false,
        b"HTTP/1.0" => true,
        [b'H', b'T', b'T', b'P', b'/', d1, b'.', d2]
            if d1.is_ascii_digit() && d2.is_ascii_digit() =>
        {
            return Err(Reject {
                status: 505,
                reason: "HTTP version not supported",
            })
        }
        _ => return Err(bad("bad HTTP version")),
    };
    let absolute = match target {
        [b'/', ..] => None,
        b"*" if method == b"OPTIONS" => None,
        _ if method == b"CONNECT" => None, // authority-form; answered 405 later
        _ => match absolute_authority(target) {
            Some(Ok(a)) => Some(a),
            Some(Err(r)) => return Err(r),
            None => return Err(bad("bad request target")),
        },
    };

    let mut host: Option<&[u8]> = None;
    let mut content_length: Option<&[u8]> = None;
    let mut transfer_encoding: Option<&[u8]> = None;
    let mut count = 0;
    for f in lines {
        let f = f?;
        if f.is_empty() {
            break; // the end of the head (`ends_with` above: nothing follows)
        }
        count += 1;
        if count > MAX_FIELDS {
            return Err(Reject {
                status: 431,
                reason: "too many header fields",
            });
        }
        if matches!(f.first(), Some(b' ' | b'\t')) {
            return Err(bad("obsolete line folding"));
        }
        let Some(colon) = f.iter().position(|b| *b == b':') else {
            return Err(bad("a header line without a colon"));
        };
        let (name, value) = (&f[..colon], &f[colon + 1..]);
        if name.is_empty() || !name.iter().all(|b| is_tchar(*b)) {
            return Err(bad("bad header name (or whitespace before the colon)"));
        }
        if !value.iter().all(|b| is_value_byte(*b)) {
            return Err(bad("control character in a header value"));
        }
        let value = trim_ows(value);
        let slot = if name.eq_ignore_ascii_case(b"host") {
            &mut host
        } else if name.eq_ignore_ascii_case(b"content-length") {
            &mut content_length
        } else if name.eq_ignore_ascii_case(b"transfer-encoding") {
            &mut transfer_encoding
        } else {
            continue;
        };
        if slot.replace(value).is_some() {
            return Err(bad(
                "Host, Content-Length or Transfer-Encoding sent more than once",
            ));
        }
    }

    match (host, absolute) {
        (None, _) if !http10 => return Err(bad("no Host header")),
        (Some(h), _) if !h.is_empty() && !valid_authority(h) => return Err(bad("bad Host header")),
        (Some(h), Some(a)) if !h.eq_ignore_ascii_case(a) => {
            return Err(bad("the absolute-form target names another host than Host"))
        }
        (None, Some(_)) => {}
        _ => {}
    }
    let content_length = match content_length {
        None => None,
        Some(v) if !v.is_empty() && v.len() <= 19 && v.iter().all(u8::is_ascii_digit) => {
            // at most 19 digits: always fits
            Some(v.iter().fold(0u64, |n, d| n * 10 + u64::from(d - b'0')))
        }
        Some(_) => return Err(bad("Content-Length is not a number")),
    };
    let chunked = match transfer_encoding {
        None => false,
        Some(_) if http10 => return Err(bad("Transfer-Encoding in an HTTP/1.0 request")),
        Some(v) if v.eq_ignore_ascii_case(b"chunked") => true,
        Some(_) => return Err(bad("Transfer-Encoding other than a single \"chunked\"")),
    };
    if chunked && content_length.is_some() {
        return Err(bad("both Content-Length and Transfer-Encoding"));
    }
    Ok(Head {
        content_length,
        chunked,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn byte_tables_are_the_grammar() {
        for b in 0..=255u8 {
            let tchar = b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b);
            let target = (0x21..=0x7e).contains(&b) && !b"#\"<>\\^`{|}".contains(&b);
            let host = b.is_ascii_alphanumeric() || b"-._~%!$&'()*+,;=".contains(&b);
            assert_eq!(is_tchar(b), tchar, "tchar {b}");
            assert_eq!(is_target_byte(b), target, "target {b}");
            assert_eq!(HOST_BYTE[usize::from(b)], host, "host {b}");
        }
    }

    #[test]
    fn head_ends() {
        let h = b"GET / HTTP/1.1\r\nHost: a\r\n\r\nbody";
        assert_eq!(head_end(h, 0), Some(h.len() - 4));
        assert_eq!(head_end(b"GET / HTTP/1.1\nHost: a\n\nx", 0), Some(24));
        assert_eq!(head_end(b"GET / HTTP/1.1\r\nHost: a\r\n", 0), None);
        // a split anywhere finds the same end
        for cut in 0..h.len() {
            let first = head_end(&h[..cut], 0);
            if first.is_none() {
                assert_eq!(head_end(h, cut), Some(h.len() - 4), "cut {cut}");
            }
        }
        assert_eq!(leading_empty_lines(b"\r\n\r\nGET"), 4);
        assert_eq!(leading_empty_lines(b"GET"), 0);
    }

    fn status(head: &str) -> u16 {
        match check(head.as_bytes()) {
            Ok(_) => 200,
            Err(r) => r.status,
        }
    }

    #[test]
    fn strict_heads() {
        assert_eq!(status("GET / HTTP/1.1\r\nHost: a\r\n\r\n"), 200);
        assert_eq!(status("GET /x?y=1 HTTP/1.0\r\n\r\n"), 200);
        assert_eq!(
            check(b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 05\r\n\r\n")
                .map(|h| h.content_length),
            Ok(Some(5))
        );
        assert_eq!(
            status("GET http://a:80/x HTTP/1.1\r\nHost: a:80\r\n\r\n"),
            200
        );
        assert_eq!(status("OPTIONS * HTTP/1.1\r\nHost: a\r\n\r\n"), 200);
        assert_eq!(
            status("GET / HTTP/1.1\r\nHost: [::1]:8080\r\nX:\t v \r\n\r\n"),
            200
        );
        for bad in [
            "GET / HTTP/1.1\nHost: a\r\n\r\n",
            "GET / HTTP/1.1\r\nHost: a\rX: y\r\n\r\n",
            "GET  / HTTP/1.1\r\nHost: a\r\n\r\n",
            "GET / HTTP/1.1 \r\nHost: a\r\n\r\n",
            "GET /a b HTTP/1.1\r\nHost: a\r\n\r\n",
            "GET /a#b HTTP/1.1\r\nHost: a\r\n\r\n",
            "GET /{x} HTTP/1.1\r\nHost: a\r\n\r\n",
            "G(T / HTTP/1.1\r\nHost: a\r\n\r\n",
            "GET / http/1.1\r\nHost: a\r\n\r\n",
            "GET / HTTP/1.1\r\n\r\n",
            "GET / HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n",
            "GET / HTTP/1.1\r\nHost: a b\r\n\r\n",
            "GET http://b/ HTTP/1.1\r\nHost: a\r\n\r\n",
            "GET ftp://a/ HTTP/1.1\r\nHost: a\r\n\r\n",
            "GET x HTTP/1.1\r\nHost: a\r\n\r\n",
            "GET / HTTP/1.1\r\nHost : a\r\n\r\n",
            "GET / HTTP/1.1\r\nHost: a\r\n folded\r\n\r\n",
            "GET / HTTP/1.1\r\nHost: a\r\nX: \x01\r\n\r\n",
            "GET / HTTP/1.1\r\nHost: a\r\nNoColon\r\n\r\n",
            "POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 1\r\nContent-Length: 1\r\n\r\n",
            "POST / HTTP/1.1\r\nHost: a\r\nContent-Length: +1\r\n\r\n",
            "POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 1, 1\r\n\r\n",
            "POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\nContent-Length: 3\r\n\r\n",
            "POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: xchunked\r\n\r\n",
            "POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: gzip, chunked\r\n\r\n",
            "POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\nTransfer-Encoding: chunked\r\n\r\n",
            "POST / HTTP/1.0\r\nTransfer-Encoding: chunked\r\n\r\n",
            "GET / HTTP/1.1\r\nHost: a\r\n",
        ] {
            assert_eq!(status(bad), 400, "{bad:?}");
        }
        assert_eq!(status("GET / HTTP/2.0\r\nHost: a\r\n\r\n"), 505);
        let many = format!(
            "GET / HTTP/1.1\r\nHost: a\r\n{}\r\n",
            "X: y\r\n".repeat(300)
        );
        assert_eq!(status(&many), 431);
        // chunked alone, in any case, is fine
        assert_eq!(
            check(b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: Chunked\r\n\r\n")
                .map(|h| h.chunked),
            Ok(true)
        );
    }
}
