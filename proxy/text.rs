//! Text written on the request path (access log lines, `X-Forwarded-For`) straight into a byte
//! buffer. `fmt` is general and slow for this: a `Display` of an `IpAddr` costs about 1,500
//! instructions under callgrind, `serde_json` about 470 per access-log field; these cost a few
//! dozen. IPv6 addresses still go through `Display` (their compression rules are not worth a
//! copy), so every output is the one `Display` / `serde_json` would give.

use std::io::Write as _;
use std::net::{IpAddr, SocketAddr};

/// Appends `n` in decimal.
pub fn push_u64(out: &mut Vec<u8>, n: u64) {
    // most numbers here are octets, ports, statuses and small sizes
    if n < 10 {
        out.push(b'0' + n as u8);
        return;
    }
    if n < 100 {
        out.extend_from_slice(&[b'0' + (n / 10) as u8, b'0' + (n % 10) as u8]);
        return;
    }
    let mut buf = [0u8; 20];
    let mut i = buf.len();
    let mut n = n;
    while n > 0 {
        i -= 1;
        buf[i] = b'0' + (n % 10) as u8;
        n /= 10;
    }
    out.extend_from_slice(&buf[i..]);
}

/// Appends `.` and `n` (below 1000) as three digits: the fraction of milliseconds or seconds.
pub fn push_frac3(out: &mut Vec<u8>, n: u32) {
    let n = n.min(999);
    out.extend_from_slice(&[
        b'.',
        b'0' + (n / 100) as u8,
        b'0' + (n / 10 % 10) as u8,
        b'0' + (n % 10) as u8,
    ]);
}

/// Appends `ip` as `Display` writes it.
pub fn push_ip(out: &mut Vec<u8>, ip: IpAddr) {
    match ip {
        IpAddr::V4(v4) => {
            for (i, o) in v4.octets().into_iter().enumerate() {
                if i > 0 {
                    out.push(b'.');
                }
                push_u64(out, u64::from(o));
            }
        }
        // writing to a Vec cannot fail
        IpAddr::V6(v6) => drop(write!(out, "{v6}")),
    }
}

/// Appends `addr` as `Display` writes it (`ip:port`, `[ip]:port` for IPv6).
pub fn push_socket_addr(out: &mut Vec<u8>, addr: SocketAddr) {
    match addr {
        SocketAddr::V4(a) => {
            push_ip(out, IpAddr::V4(*a.ip()));
            out.push(b':');
            push_u64(out, u64::from(a.port()));
        }
        SocketAddr::V6(a) => drop(write!(out, "{a}")),
    }
}

/// What a byte becomes in a JSON string: 0 itself, `u` a `\u00XX` escape, else `\` and this.
const JSON_ESCAPE: [u8; 256] = {
    let mut t = [0u8; 256];
    let mut c = 0;
    while c < 0x20 {
        t[c] = b'u';
        c += 1;
    }
    t[b'\n' as usize] = b'n';
    t[b'\r' as usize] = b'r';
    t[b'\t' as usize] = b't';
    t[0x08] = b'b';
    t[0x0c] = b'f';
    t[b'"' as usize] = b'"';
    t[b'\\' as usize] = b'\\';
    t
};

/// Appends `s` as a JSON string, quotes included, escaped as `serde_json` escapes it: `"`, `\`
/// and control characters below 0x20; everything else (UTF-8 included) as it is.
pub fn push_json_str(out: &mut Vec<u8>, s: &str) {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    let b = s.as_bytes();
    out.reserve(b.len() + 2);
    out.push(b'"');
    let mut start = 0;
    for (i, &c) in b.iter().enumerate() {
        let esc = JSON_ESCAPE[usize::from(c)];
        if esc == 0 {
            continue;
        }
        out.extend_from_slice(&b[start..i]);
        if esc == b'u' {
            out.extend_from_slice(&[
                b'\\',
                b'u',
                b'0',
                b'0',
                HEX[usize::from(c >> 4)],
                HEX[usize::from(c & 0xf)],
            ]);
        } else {
            out.extend_from_slice(&[b'\\', esc]);
        }
        start = i + 1;
    }
    out.extend_from_slice(&b[start..]);
    out.push(b'"');
}

/// Appends `v` written by `write` inside quotes (a JSON string that needs no escapes: an
/// address), or `null`.
pub fn push_json_quoted_or_null<T>(out: &mut Vec<u8>, v: Option<T>, write: fn(&mut Vec<u8>, T)) {
    match v {
        Some(v) => {
            out.push(b'"');
            write(out, v);
            out.push(b'"');
        }
        None => out.extend_from_slice(b"null"),
    }
}

/// Appends a JSON string or `null`.
pub fn push_json_opt(out: &mut Vec<u8>, s: Option<&str>) {
    match s {
        Some(s) => push_json_str(out, s),
        None => out.extend_from_slice(b"null"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn text(f: impl FnOnce(&mut Vec<u8>)) -> String {
        let mut v = Vec::new();
        f(&mut v);
        String::from_utf8(v).expect("utf-8")
    }

    #[test]
    fn numbers_and_addresses_read_as_display_writes_them() {
        for n in [0u64, 7, 10, 255, 65535, 1_000_000, u64::MAX] {
            assert_eq!(text(|o| push_u64(o, n)), n.to_string());
        }
        for ip in [
            "0.0.0.0",
            "10.1.20.255",
            "255.255.255.255",
            "127.0.0.1",
            "::1",
            "2001:db8::8a2e:370:7334",
            "::ffff:192.0.2.1",
        ] {
            let ip: IpAddr = ip.parse().expect("ip");
            assert_eq!(text(|o| push_ip(o, ip)), ip.to_string());
            for port in [0u16, 80, 65535] {
                let a = SocketAddr::new(ip, port);
                assert_eq!(text(|o| push_socket_addr(o, a)), a.to_string());
            }
        }
    }

    #[test]
    fn json_strings_are_escaped_as_serde_json_escapes_them() {
        let mut hostile: String = (0u8..0x80).map(char::from).collect();
        hostile.push_str("\"quoted\" \\back\\ é ☃ 𝄞 \u{7f}\u{2028}");
        for s in ["", "plain", "/a b/c?d=e", "\"", "\\", &hostile] {
            let ours = text(|o| push_json_str(o, s));
            assert_eq!(ours, serde_json::to_string(s).expect("json"), "{s:?}");
            let back: String = serde_json::from_str(&ours).expect("parses");
            assert_eq!(back, s);
        }
        assert_eq!(text(|o| push_json_opt(o, None)), "null");
        let ip: IpAddr = "10.0.0.1".parse().expect("ip");
        assert_eq!(
            text(|o| push_json_quoted_or_null(o, Some(ip), push_ip)),
            "\"10.0.0.1\""
        );
        assert_eq!(
            text(|o| push_json_quoted_or_null(o, None::<IpAddr>, push_ip)),
            "null"
        );
        for (n, t) in [(0, ".000"), (7, ".007"), (45, ".045"), (999, ".999")] {
            assert_eq!(text(|o| push_frac3(o, n)), t);
        }
    }
}
