//! Which color a request goes to. Every client has a bucket 0–99 (from its cookie, its IP, or
//! drawn per request); it goes green iff its bucket is below the green weight. Raising the green
//! weight therefore only ever moves clients from blue to green.

use std::net::IpAddr;

use http::HeaderMap;

use super::Color;
use crate::config::Sticky;

/// The cookie that carries a client's random id (`sticky = "cookie"`).
pub const COOKIE: &str = "sluice_client";
/// A year: the id outlives any deploy.
const COOKIE_MAX_AGE: u32 = 365 * 24 * 3600;

/// The color of a client in `bucket` when green has `green_weight` percent.
pub fn color_of(bucket: u8, green_weight: u8) -> Color {
    if bucket < green_weight {
        Color::Green
    } else {
        Color::Blue
    }
}

/// The bucket of a client id or address. The same on every sluice replica and across
/// restarts (no per-process seed), and the same on every route, so a client is on the same
/// color for all routes that share weights.
pub fn bucket(key: &[u8]) -> u8 {
    // FNV-1a, then a splitmix64 finalizer so that neighbouring keys spread evenly
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in key {
        h ^= u64::from(*b);
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    h ^= h >> 30;
    h = h.wrapping_mul(0xbf58_476d_1ce4_e5b9);
    h ^= h >> 27;
    h = h.wrapping_mul(0x94d0_49bb_1331_11eb);
    h ^= h >> 31;
    (h % 100) as u8
}

pub fn ip_bucket(ip: IpAddr) -> u8 {
    match ip {
        IpAddr::V4(v4) => bucket(&v4.octets()),
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => bucket(&v4.octets()),
            None => bucket(&v6.octets()),
        },
    }
}

/// The client id from the request's cookies, if it carries a well-formed one.
pub fn cookie_id(headers: &HeaderMap) -> Option<&str> {
    headers
        .get_all(http::header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|kv| kv.trim().split_once('='))
        .find(|(k, _)| *k == COOKIE)
        .map(|(_, v)| v.trim())
        .filter(|v| v.len() == 32 && v.bytes().all(|b| b.is_ascii_hexdigit()))
}

/// A new random client id.
pub fn new_id() -> String {
    format!("{:032x}", fastrand::u128(..))
}

/// The `Set-Cookie` value that gives a client its id.
pub fn set_cookie(id: &str, secure: bool) -> String {
    format!(
        "{COOKIE}={id}; Path=/; Max-Age={COOKIE_MAX_AGE}; HttpOnly; SameSite=Lax{}",
        if secure { "; Secure" } else { "" }
    )
}

/// The color of a request to a route with green pools, when no override applies: by the
/// client's bucket (its cookie, its address, or drawn per request) against the green weight.
/// Also the `Set-Cookie` to send when the client has no id yet.
pub fn choose(
    sticky: Sticky,
    green_weight: u8,
    headers: &HeaderMap,
    client_ip: Option<IpAddr>,
    tls: bool,
) -> (Color, Option<String>) {
    match sticky {
        Sticky::None => (color_of(fastrand::u8(0..100), green_weight), None),
        Sticky::ClientIp => {
            let b = client_ip.map_or_else(|| fastrand::u8(0..100), ip_bucket);
            (color_of(b, green_weight), None)
        }
        Sticky::Cookie => match cookie_id(headers) {
            Some(id) => (color_of(bucket(id.as_bytes()), green_weight), None),
            None => {
                let id = new_id();
                let color = color_of(bucket(id.as_bytes()), green_weight);
                (color, Some(set_cookie(&id, tls)))
            }
        },
    }
}

/// The color a request asks for in the override header (`blue`/`green`, any case).
pub fn override_color(headers: &HeaderMap, header: &str) -> Option<Color> {
    headers
        .get(header)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| Color::parse(v.trim()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buckets_are_even_and_stable() {
        let mut counts = [0u32; 100];
        for i in 0..100_000u32 {
            counts[usize::from(bucket(&i.to_be_bytes()))] += 1;
        }
        // 1000 expected per bucket
        assert!(counts.iter().all(|c| (850..1150).contains(c)), "{counts:?}");
        assert_eq!(bucket(b"abc"), bucket(b"abc"));
        let ip: IpAddr = "10.1.2.3".parse().expect("ip");
        let mapped: IpAddr = "::ffff:10.1.2.3".parse().expect("ip");
        assert_eq!(ip_bucket(ip), ip_bucket(mapped));
    }

    #[test]
    fn raising_green_only_moves_clients_to_green() {
        for b in 0..100u8 {
            for w in 0..100u8 {
                if color_of(b, w) == Color::Green {
                    assert_eq!(color_of(b, w + 1), Color::Green);
                }
            }
        }
        assert_eq!(color_of(0, 0), Color::Blue);
        assert_eq!(color_of(99, 100), Color::Green);
    }

    #[test]
    fn cookies() {
        let mut h = HeaderMap::new();
        let id = new_id();
        assert_eq!(id.len(), 32);
        h.append(
            http::header::COOKIE,
            format!("a=1; {COOKIE}={id}; b=2").parse().expect("hv"),
        );
        assert_eq!(cookie_id(&h), Some(id.as_str()));
        let mut bad = HeaderMap::new();
        bad.append(
            http::header::COOKIE,
            format!("{COOKIE}=not-an-id").parse().expect("hv"),
        );
        assert_eq!(cookie_id(&bad), None);
        assert!(set_cookie(&id, true).ends_with("; Secure"));
        assert!(!set_cookie(&id, false).contains("Secure"));
        h.insert("x-color", "GREEN".parse().expect("hv"));
        assert_eq!(override_color(&h, "x-color"), Some(Color::Green));
        h.insert("x-color", "purple".parse().expect("hv"));
        assert_eq!(override_color(&h, "x-color"), None);
    }
}
