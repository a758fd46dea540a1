//! PROXY protocol v1 and v2 (haproxy.org/download/2.9/doc/proxy-protocol.txt): an L4 load
//! balancer in front of sluice says who the client is before the connection's first byte.
//!
//! Exactly the header's bytes are read, so nothing has to be put back. A connection without a
//! valid header is refused. `LOCAL` (v2) and `UNKNOWN` (v1) keep the real peer address.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncReadExt};

/// How long a client may take to send the header.
pub const TIMEOUT: Duration = Duration::from_secs(5);

const V2_SIGNATURE: [u8; 12] = *b"\r\n\r\n\0\r\nQUIT\n";
/// The longest v1 header, CRLF included.
const V1_MAX: usize = 107;

/// Reads one PROXY header: `Ok(Some(source))`, `Ok(None)` when it names no address (LOCAL,
/// UNKNOWN, or a family other than TCP over IPv4/IPv6), `Err` when there is no valid header.
pub async fn read_header<S: AsyncRead + Unpin + ?Sized>(
    s: &mut S,
) -> Result<Option<SocketAddr>, String> {
    match tokio::time::timeout(TIMEOUT, read_inner(s)).await {
        Ok(r) => r,
        Err(_) => Err("no PROXY protocol header in time".into()),
    }
}

async fn read_inner<S: AsyncRead + Unpin + ?Sized>(
    s: &mut S,
) -> Result<Option<SocketAddr>, String> {
    let io = |e: std::io::Error| format!("reading the PROXY protocol header: {e}");
    let mut start = [0u8; 12];
    s.read_exact(&mut start).await.map_err(io)?;
    if start == V2_SIGNATURE {
        let mut head = [0u8; 4];
        s.read_exact(&mut head).await.map_err(io)?;
        let len = usize::from(u16::from_be_bytes([head[2], head[3]]));
        let mut body = vec![0u8; len];
        s.read_exact(&mut body).await.map_err(io)?;
        return parse_v2(head[0], head[1], &body);
    }
    if !start.starts_with(b"PROXY ") {
        return Err("connection does not start with a PROXY protocol header".into());
    }
    let mut line = start.to_vec();
    while !line.ends_with(b"\r\n") {
        if line.len() >= V1_MAX {
            return Err("PROXY protocol v1 header too long".into());
        }
        let mut b = [0u8; 1];
        s.read_exact(&mut b).await.map_err(io)?;
        line.push(b[0]);
    }
    parse_v1(&line)
}

pub fn parse_v1(line: &[u8]) -> Result<Option<SocketAddr>, String> {
    let text = std::str::from_utf8(line)
        .ok()
        .and_then(|t| t.strip_suffix("\r\n"))
        .ok_or("PROXY protocol v1 header is not text ending in CRLF")?;
    let parts: Vec<&str> = text.split(' ').collect();
    let bad = || format!("bad PROXY protocol v1 header: {text:?}");
    match parts.as_slice() {
        ["PROXY", "UNKNOWN", ..] => Ok(None),
        ["PROXY", fam @ ("TCP4" | "TCP6"), src, _dst, sport, _dport] => {
            let ip: IpAddr = src.parse().map_err(|_| bad())?;
            let port: u16 = sport.parse().map_err(|_| bad())?;
            if (*fam == "TCP4") != ip.is_ipv4() {
                return Err(bad());
            }
            Ok(Some(SocketAddr::new(ip, port)))
        }
        _ => Err(bad()),
    }
}

pub fn parse_v2(ver_cmd: u8, family: u8, body: &[u8]) -> Result<Option<SocketAddr>, String> {
    if ver_cmd >> 4 != 2 {
        return Err(format!(
            "PROXY protocol v2: unsupported version {}",
            ver_cmd >> 4
        ));
    }
    match ver_cmd & 0x0f {
        0 => return Ok(None), // LOCAL: a health check from the balancer itself
        1 => {}
        c => return Err(format!("PROXY protocol v2: unknown command {c}")),
    }
    let short = || "PROXY protocol v2: address block too short".to_string();
    match family {
        // TCP over IPv4
        0x11 => {
            let b = body.get(..12).ok_or_else(short)?;
            let ip = Ipv4Addr::new(b[0], b[1], b[2], b[3]);
            let port = u16::from_be_bytes([b[8], b[9]]);
            Ok(Some(SocketAddr::new(ip.into(), port)))
        }
        // TCP over IPv6
        0x21 => {
            let b = body.get(..36).ok_or_else(short)?;
            let mut octets = [0u8; 16];
            octets.copy_from_slice(&b[..16]);
            let port = u16::from_be_bytes([b[32], b[33]]);
            Ok(Some(SocketAddr::new(Ipv6Addr::from(octets).into(), port)))
        }
        // UNSPEC, UDP, unix sockets: no TCP client address to use
        _ => Ok(None),
    }
}

/// A v2 header for `src` -> `dst` (used by tests and the readiness probe's counterpart).
pub fn encode_v2(src: SocketAddr, dst: SocketAddr) -> Vec<u8> {
    let mut out = V2_SIGNATURE.to_vec();
    out.push(0x21);
    match (src, dst) {
        (SocketAddr::V4(s), SocketAddr::V4(d)) => {
            out.push(0x11);
            out.extend_from_slice(&12u16.to_be_bytes());
            out.extend_from_slice(&s.ip().octets());
            out.extend_from_slice(&d.ip().octets());
            out.extend_from_slice(&s.port().to_be_bytes());
            out.extend_from_slice(&d.port().to_be_bytes());
        }
        _ => {
            let v6 = |a: SocketAddr| match a.ip() {
                IpAddr::V4(v4) => v4.to_ipv6_mapped(),
                IpAddr::V6(v6) => v6,
            };
            out.push(0x21);
            out.extend_from_slice(&36u16.to_be_bytes());
            out.extend_from_slice(&v6(src).octets());
            out.extend_from_slice(&v6(dst).octets());
            out.extend_from_slice(&src.port().to_be_bytes());
            out.extend_from_slice(&dst.port().to_be_bytes());
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    async fn read(bytes: &[u8]) -> Result<Option<SocketAddr>, String> {
        let mut s = bytes;
        read_header(&mut s).await
    }

    #[tokio::test]
    async fn v1_and_v2() {
        let a: SocketAddr = "198.51.100.7:4242".parse().expect("addr");
        let d: SocketAddr = "10.0.0.1:443".parse().expect("addr");
        assert_eq!(
            read(b"PROXY TCP4 198.51.100.7 10.0.0.1 4242 443\r\nGET").await,
            Ok(Some(a))
        );
        assert_eq!(
            read(b"PROXY TCP6 2001:db8::1 2001:db8::2 5 443\r\n").await,
            Ok(Some("[2001:db8::1]:5".parse().expect("addr")))
        );
        assert_eq!(read(b"PROXY UNKNOWN\r\n").await, Ok(None));
        assert_eq!(read(&encode_v2(a, d)).await, Ok(Some(a)));
        let six: SocketAddr = "[2001:db8::7]:9".parse().expect("addr");
        assert_eq!(read(&encode_v2(six, d)).await, Ok(Some(six)));
        // LOCAL keeps the real peer
        let mut local = encode_v2(a, d);
        local[12] = 0x20;
        assert_eq!(read(&local).await, Ok(None));
    }

    #[tokio::test]
    async fn garbage_is_refused() {
        for bad in [
            &b"GET / HTTP/1.1\r\nHost: x\r\n\r\n"[..],
            b"PROXY TCP4 1.2.3.4 5.6.7.8 x 443\r\n",
            b"PROXY TCP4 2001:db8::1 5.6.7.8 1 443\r\n",
            b"PROXY TCP4 1.2.3.4\r\n",
            b"PROXY",
            b"",
        ] {
            assert!(
                read(bad).await.is_err(),
                "{:?}",
                String::from_utf8_lossy(bad)
            );
        }
        let long = format!("PROXY TCP4 {}\r\n", "1".repeat(200));
        assert!(read(long.as_bytes()).await.is_err());
        let mut v3 = encode_v2(
            "1.2.3.4:1".parse().expect("a"),
            "5.6.7.8:2".parse().expect("a"),
        );
        v3[12] = 0x31;
        assert!(read(&v3).await.is_err());
        let mut short = encode_v2(
            "1.2.3.4:1".parse().expect("a"),
            "5.6.7.8:2".parse().expect("a"),
        );
        short.truncate(20);
        short[15] = 4;
        assert!(read(&short).await.is_err());
    }
}
