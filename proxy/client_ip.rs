//! Which address a request comes from. The TCP peer (or the PROXY protocol source), unless that
//! peer is a trusted proxy: then `X-Forwarded-For` is read right to left, skipping trusted
//! addresses, and the first untrusted one is the client. A value the client wrote itself (the
//! leftmost ones) never wins over what a trusted proxy appended.

use std::net::IpAddr;

use ipnet::IpNet;

/// The key a client is counted by (rate limits, connection limits): an IPv4 address (or an
/// IPv4-mapped IPv6 one) whole, an IPv6 address cut to its first `v6_prefix` bits.
pub fn key(ip: IpAddr, v6_prefix: u8) -> u128 {
    match ip.to_canonical() {
        IpAddr::V4(v4) => u128::from(v4.to_ipv6_mapped()),
        IpAddr::V6(v6) => {
            let bits = u32::from(v6_prefix.min(128));
            let mask = if bits == 0 {
                0
            } else {
                u128::MAX << (128 - bits)
            };
            u128::from(v6) & mask
        }
    }
}

pub fn is_in(ip: IpAddr, nets: &[IpNet]) -> bool {
    let ip = ip.to_canonical();
    nets.iter().any(|n| n.contains(&ip))
}

/// One `X-Forwarded-For` element: an address, optionally with a port (`1.2.3.4:5`, `[::1]:5`).
fn parse_hop(s: &str) -> Option<IpAddr> {
    let s = s.trim();
    if let Ok(ip) = s.parse::<IpAddr>() {
        return Some(ip);
    }
    if let Ok(sa) = s.parse::<std::net::SocketAddr>() {
        return Some(sa.ip());
    }
    s.strip_prefix('[')
        .and_then(|r| r.split_once(']'))
        .and_then(|(ip, _)| ip.parse().ok())
}

/// The client address of a request from `peer` carrying these `X-Forwarded-For` values (in
/// header order).
pub fn resolve<'a>(
    peer: IpAddr,
    xff: impl DoubleEndedIterator<Item = &'a str>,
    trusted: &[IpNet],
) -> IpAddr {
    let peer = peer.to_canonical();
    if trusted.is_empty() || !is_in(peer, trusted) {
        return peer;
    }
    let mut client = peer;
    for header in xff.rev() {
        for hop in header.rsplit(',') {
            match parse_hop(hop) {
                // garbage in the chain: nothing left of it can be believed
                None => return client,
                Some(ip) => {
                    let ip = ip.to_canonical();
                    client = ip;
                    if !is_in(ip, trusted) {
                        return ip;
                    }
                }
            }
        }
    }
    client
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().expect("ip")
    }

    #[test]
    fn right_to_left_through_trusted_proxies() {
        let trusted: Vec<IpNet> = vec!["10.0.0.0/8".parse().expect("net")];
        let r = |peer: &str, xff: &[&str]| resolve(ip(peer), xff.iter().copied(), &trusted);
        // untrusted peer: the header is ignored
        assert_eq!(r("203.0.113.7", &["1.1.1.1"]), ip("203.0.113.7"));
        // trusted peer: the rightmost untrusted hop, not the spoofable leftmost one
        assert_eq!(
            r("10.0.0.2", &["6.6.6.6, 198.51.100.4"]),
            ip("198.51.100.4")
        );
        assert_eq!(
            r("10.0.0.2", &["6.6.6.6, 198.51.100.4, 10.0.0.9"]),
            ip("198.51.100.4")
        );
        // several headers read as one list
        assert_eq!(
            r("10.0.0.2", &["6.6.6.6", "198.51.100.4"]),
            ip("198.51.100.4")
        );
        // all trusted: the leftmost
        assert_eq!(r("10.0.0.2", &["10.0.0.3, 10.0.0.4"]), ip("10.0.0.3"));
        // no header
        assert_eq!(r("10.0.0.2", &[]), ip("10.0.0.2"));
        // ports and brackets
        assert_eq!(r("10.0.0.2", &["198.51.100.4:5555"]), ip("198.51.100.4"));
        assert_eq!(r("10.0.0.2", &["[2001:db8::1]:443"]), ip("2001:db8::1"));
        // garbage stops the walk at the last address we could read
        assert_eq!(
            r("10.0.0.2", &["198.51.100.4, garbage, 10.0.0.5"]),
            ip("10.0.0.5")
        );
        // IPv4-mapped IPv6 peers count as IPv4
        assert_eq!(r("::ffff:10.0.0.2", &["198.51.100.4"]), ip("198.51.100.4"));
    }
}
