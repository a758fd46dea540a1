//! Bearer-token checks for the admin API's mutating calls. Tokens are compared in constant time
//! (no early exit on the first differing byte, every configured token is compared), and an
//! address that fails too often is locked out for a while.

use std::collections::{HashMap, VecDeque};
use std::net::IpAddr;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use http::StatusCode;

/// This many failed attempts from one address within `LOCKOUT_WINDOW`...
pub const MAX_FAILURES: u32 = 10;
pub const LOCKOUT_WINDOW: Duration = Duration::from_secs(60);
/// ...lock it out for this long.
pub const LOCKOUT: Duration = Duration::from_secs(60);
/// Addresses remembered at most (an attacker with many addresses cannot grow the table
/// without bound; stale entries go first).
const MAX_TRACKED: usize = 10_000;

struct Attempts {
    /// The latest failures (at most `MAX_FAILURES`), oldest first.
    recent: VecDeque<Instant>,
    locked_until: Option<Instant>,
}

/// Failed attempts per client address, over a sliding minute.
#[derive(Default)]
pub struct Lockout {
    by_addr: Mutex<HashMap<IpAddr, Attempts>>,
}

impl Lockout {
    /// `Some(seconds left)` while `ip` is locked out.
    pub fn locked(&self, ip: IpAddr, now: Instant) -> Option<u64> {
        let map = self.by_addr.lock().unwrap_or_else(|e| e.into_inner());
        let until = map.get(&ip)?.locked_until.filter(|u| *u > now)?;
        Some((until - now).as_secs_f64().ceil() as u64)
    }

    /// Counts a failed attempt; true when it locks the address out.
    pub fn failed(&self, ip: IpAddr, now: Instant) -> bool {
        let mut map = self.by_addr.lock().unwrap_or_else(|e| e.into_inner());
        let live = |a: &Attempts| {
            a.locked_until.is_some_and(|u| u > now)
                || a.recent.back().is_some_and(|t| now - *t < LOCKOUT_WINDOW)
        };
        if map.len() >= MAX_TRACKED && !map.contains_key(&ip) {
            map.retain(|_, a| live(a));
            if map.len() >= MAX_TRACKED {
                return false;
            }
        }
        let a = map.entry(ip).or_insert(Attempts {
            recent: VecDeque::new(),
            locked_until: None,
        });
        if a.locked_until.is_some_and(|u| u <= now) {
            a.locked_until = None;
        }
        while a.recent.front().is_some_and(|t| now - *t >= LOCKOUT_WINDOW) {
            a.recent.pop_front();
        }
        a.recent.push_back(now);
        if a.recent.len() >= MAX_FAILURES as usize && a.locked_until.is_none() {
            a.recent.clear();
            a.locked_until = Some(now + LOCKOUT);
            return true;
        }
        while a.recent.len() >= MAX_FAILURES as usize {
            a.recent.pop_front();
        }
        false
    }
}

/// Why a call was refused: status and a reason for the `{"error": …}` body.
pub type Refusal = (StatusCode, &'static str);

/// The token of an `Authorization` header with the Bearer scheme, which is case-insensitive
/// (RFC 9110 §11.1): `Bearer t`, `bearer t`, `BEARER  t`.
pub fn bearer(header: &str) -> Option<&str> {
    let header = header.trim_start_matches([' ', '\t']);
    let split = header.find([' ', '\t'])?;
    let (scheme, rest) = header.split_at(split);
    let token = rest.trim_matches([' ', '\t']);
    (scheme.eq_ignore_ascii_case("bearer") && !token.is_empty()).then_some(token)
}

/// The token of an accepted `Authorization: Bearer <token>` header.
pub fn check<'a>(tokens: Option<&[String]>, header: Option<&'a str>) -> Result<&'a str, Refusal> {
    let token = header.and_then(bearer).ok_or((
        StatusCode::UNAUTHORIZED,
        "missing or malformed Authorization header (want: Bearer <token>)",
    ))?;
    let Some(tokens) = tokens else {
        return Err((
            StatusCode::FORBIDDEN,
            "no admin.token_file is configured: mutating calls are refused",
        ));
    };
    let mut ok = false;
    for t in tokens {
        ok |= ct_eq(t.as_bytes(), token.as_bytes());
    }
    if ok {
        Ok(token)
    } else {
        Err((StatusCode::FORBIDDEN, "token not accepted"))
    }
}

/// Constant-time equality for equal lengths; lengths are not secret.
pub fn ct_eq(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ten_failures_in_a_minute_lock_an_address_out_for_a_minute() {
        let l = Lockout::default();
        let ip: IpAddr = "10.0.0.1".parse().expect("ip");
        let other: IpAddr = "10.0.0.2".parse().expect("ip");
        let t0 = Instant::now();
        for i in 0..9 {
            assert!(!l.failed(ip, t0 + Duration::from_secs(i)));
        }
        assert_eq!(l.locked(ip, t0 + Duration::from_secs(9)), None);
        assert!(l.failed(ip, t0 + Duration::from_secs(10)));
        assert_eq!(l.locked(ip, t0 + Duration::from_secs(11)), Some(59));
        assert_eq!(l.locked(other, t0 + Duration::from_secs(11)), None);
        assert_eq!(l.locked(ip, t0 + Duration::from_secs(70)), None);
        // failures spread over more than a minute never lock; ten within any minute do
        let t1 = t0 + Duration::from_secs(100);
        for i in 0..30 {
            assert!(!l.failed(other, t1 + Duration::from_secs(i * 7)));
        }
        let t2 = t1 + Duration::from_secs(1000);
        for i in 0..9 {
            assert!(!l.failed(other, t2 + Duration::from_secs(50 + i)));
        }
        assert!(l.failed(other, t2 + Duration::from_secs(61)));
    }

    #[test]
    fn bearer_tokens() {
        let toks = vec!["s3cret".to_string(), "other".to_string()];
        assert_eq!(check(Some(&toks), Some("Bearer s3cret")), Ok("s3cret"));
        assert_eq!(check(Some(&toks), Some("Bearer other")), Ok("other"));
        // the scheme in any case, any run of blanks after it
        for h in [
            "bearer s3cret",
            "BEARER s3cret",
            "BeArEr \ts3cret",
            "Bearer   s3cret  ",
        ] {
            assert_eq!(check(Some(&toks), Some(h)), Ok("s3cret"), "{h}");
        }
        assert_eq!(
            check(Some(&toks), Some("Bearers3cret")).map_err(|e| e.0),
            Err(StatusCode::UNAUTHORIZED)
        );
        assert_eq!(
            check(Some(&toks), Some("Bearer s3cre")).map_err(|e| e.0),
            Err(StatusCode::FORBIDDEN)
        );
        assert_eq!(
            check(Some(&toks), Some("Basic s3cret")).map_err(|e| e.0),
            Err(StatusCode::UNAUTHORIZED)
        );
        assert_eq!(
            check(Some(&toks), Some("Bearer ")).map_err(|e| e.0),
            Err(StatusCode::UNAUTHORIZED)
        );
        assert_eq!(
            check(Some(&toks), None).map_err(|e| e.0),
            Err(StatusCode::UNAUTHORIZED)
        );
        assert_eq!(
            check(None, Some("Bearer s3cret")).map_err(|e| e.0),
            Err(StatusCode::FORBIDDEN)
        );
        assert_eq!(
            check(Some(&[]), Some("Bearer s3cret")).map_err(|e| e.0),
            Err(StatusCode::FORBIDDEN)
        );
    }
}
