//! Per-client-IP rate limiting: governor's keyed GCRA limiter, one per distinct quota and scope.
//!
//! Limiters live in a registry keyed by scope (global or a route) and quota, outside any
//! snapshot, so buckets survive reloads unless their quota changed. Keys are plain `u128`s (an
//! IPv4 address, or an IPv6 address cut to its prefix), so a check allocates nothing.

use std::collections::HashMap;
use std::net::IpAddr;
use std::num::NonZeroU32;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use governor::clock::{Clock, DefaultClock};
use governor::middleware::StateInformationMiddleware;
use governor::state::keyed::DefaultKeyedStateStore;
pub use governor::Quota;
use governor::RateLimiter;

/// A quota as configured: `requests` per `per`, at most `burst` at once.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Limit {
    pub requests: u32,
    pub per: Duration,
    pub burst: u32,
}

impl Limit {
    pub fn quota(&self) -> Option<Quota> {
        let interval = self.per / self.requests.max(1);
        let burst = NonZeroU32::new(self.burst)?;
        Quota::with_period(interval.max(Duration::from_nanos(1))).map(|q| q.allow_burst(burst))
    }

    /// `RateLimit-Policy` value (draft-ietf-httpapi-ratelimit-headers): quota and window.
    pub fn policy_header(&self) -> String {
        format!(
            "\"sluice\";q={};w={}",
            self.requests,
            self.per.as_secs().max(1)
        )
    }
}

type Keyed =
    RateLimiter<u128, DefaultKeyedStateStore<u128>, DefaultClock, StateInformationMiddleware>;

/// What a counter says about one request.
pub enum Verdict {
    Allowed,
    Denied(Denied),
    /// Only the shared store can say (`sync = "0s"`): ask it with [`Counts::ask`].
    AskStore,
}

/// Where a limiter's counts live: this process alone ([`LocalCounts`]) or shared by the fleet
/// (`crate::cluster::limits::FleetCounts`). `check` runs on the request path and never waits.
#[async_trait::async_trait]
pub trait Counts: Send + Sync {
    fn check(&self, key: u128) -> Verdict;
    /// The exact answer of the shared store, for [`Verdict::AskStore`].
    async fn ask(&self, key: u128) -> Result<(), Denied> {
        let _ = key;
        Ok(())
    }
    /// Forgets clients idle for a whole window.
    fn shrink(&self);
    /// Clients tracked.
    fn len(&self) -> usize;
    fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// GCRA buckets of this process (governor).
pub struct LocalCounts {
    inner: Keyed,
    clock: DefaultClock,
}

impl LocalCounts {
    pub fn new(limit: Limit) -> Option<LocalCounts> {
        let clock = DefaultClock::default();
        let inner = RateLimiter::dashmap_with_clock(limit.quota()?, clock.clone())
            .with_middleware::<StateInformationMiddleware>();
        Some(LocalCounts { inner, clock })
    }

    pub fn check_key(&self, key: u128) -> Result<(), Denied> {
        match self.inner.check_key(&key) {
            Ok(_) => Ok(()),
            Err(not_until) => Err(Denied::after(not_until.wait_time_from(self.clock.now()))),
        }
    }
}

impl Counts for LocalCounts {
    fn check(&self, key: u128) -> Verdict {
        match self.check_key(key) {
            Ok(()) => Verdict::Allowed,
            Err(d) => Verdict::Denied(d),
        }
    }
    fn shrink(&self) {
        self.inner.retain_recent();
        self.inner.shrink_to_fit();
    }
    fn len(&self) -> usize {
        self.inner.len()
    }
}

/// Makes the counts of a limiter: local ones, or the fleet's when `[rate_limit] scope =
/// "cluster"` (set up by fleet mode at start).
pub type CountsFactory = dyn Fn(&str, Limit, u8) -> Option<Arc<dyn Counts>> + Send + Sync;

pub struct Limiter {
    pub limit: Limit,
    ipv6_prefix: u8,
    counts: Arc<dyn Counts>,
    /// `RateLimit-Policy` header value, made once.
    pub policy: String,
}

/// The outcome of a check that said no.
#[derive(Debug, PartialEq, Eq)]
pub struct Denied {
    /// Whole seconds until the next request would pass (at least 1).
    pub retry_after: u64,
}

impl Denied {
    pub fn after(wait: Duration) -> Denied {
        let secs = wait.as_secs() + u64::from(wait.subsec_nanos() > 0);
        Denied {
            retry_after: secs.max(1),
        }
    }
}

impl Limiter {
    fn new(limit: Limit, ipv6_prefix: u8, counts: Arc<dyn Counts>) -> Limiter {
        Limiter {
            limit,
            ipv6_prefix,
            counts,
            policy: limit.policy_header(),
        }
    }

    /// The bucket a client address falls in.
    pub fn key(&self, ip: IpAddr) -> u128 {
        crate::client_ip::key(ip, self.ipv6_prefix)
    }

    /// Counts one request from `ip`; `Err` when it is over the quota. Waits only when the
    /// config asks for an exact fleet-wide count (`sync = "0s"`).
    pub async fn check(&self, ip: IpAddr) -> Result<(), Denied> {
        let key = self.key(ip);
        match self.counts.check(key) {
            Verdict::Allowed => Ok(()),
            Verdict::Denied(d) => Err(d),
            Verdict::AskStore => self.counts.ask(key).await,
        }
    }

    /// The non-waiting part of [`Limiter::check`] (benchmarks, tests).
    pub fn verdict(&self, ip: IpAddr) -> Verdict {
        self.counts.check(self.key(ip))
    }

    /// Drops buckets that are full again (clients idle for a whole window): memory stays
    /// bounded by the clients active in the last window.
    pub fn shrink(&self) {
        self.counts.shrink();
    }

    pub fn len(&self) -> usize {
        self.counts.len()
    }

    pub fn is_empty(&self) -> bool {
        self.counts.len() == 0
    }
}

/// Every limiter in use, by scope (`""` for `[rate_limit]`, else a route name) and quota.
#[derive(Default)]
pub struct Registry {
    map: Mutex<HashMap<(String, Limit, u8), Arc<Limiter>>>,
    /// Fleet mode's counts, when `[rate_limit] scope = "cluster"`.
    shared: Mutex<Option<Arc<CountsFactory>>>,
}

impl Registry {
    /// The limiter for a scope and quota: the same one (with its buckets) as long as neither
    /// changes.
    pub fn get(&self, scope: &str, limit: Limit, ipv6_prefix: u8) -> Option<Arc<Limiter>> {
        let mut map = self.map.lock().unwrap_or_else(|e| e.into_inner());
        let key = (scope.to_string(), limit, ipv6_prefix);
        if let Some(l) = map.get(&key) {
            return Some(l.clone());
        }
        let shared = self
            .shared
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        let counts: Arc<dyn Counts> = match shared {
            Some(make) => make(scope, limit, ipv6_prefix)?,
            None => Arc::new(LocalCounts::new(limit)?),
        };
        let l = Arc::new(Limiter::new(limit, ipv6_prefix, counts));
        map.insert(key, l.clone());
        Some(l)
    }

    /// From now on, limiters count through `make` (fleet mode); limiters made before are
    /// forgotten, so the next snapshot gets fleet-wide ones.
    pub fn share_through(&self, make: Arc<CountsFactory>) {
        *self.shared.lock().unwrap_or_else(|e| e.into_inner()) = Some(make);
        self.map.lock().unwrap_or_else(|e| e.into_inner()).clear();
    }

    /// Forgets limiters no snapshot uses any more.
    pub fn retain(&self, in_use: &[Arc<Limiter>]) {
        let mut map = self.map.lock().unwrap_or_else(|e| e.into_inner());
        map.retain(|_, l| in_use.iter().any(|u| Arc::ptr_eq(u, l)));
    }

    /// Shrinks every limiter (run periodically); returns how many buckets were dropped.
    pub fn shrink_all(&self) -> usize {
        let all: Vec<Arc<Limiter>> = {
            let map = self.map.lock().unwrap_or_else(|e| e.into_inner());
            map.values().cloned().collect()
        };
        let mut dropped = 0;
        for l in all {
            let before = l.len();
            l.shrink();
            dropped += before.saturating_sub(l.len());
        }
        dropped
    }
}

/// Asks the allocator (mimalloc, the binary's global allocator) to return free pages to the
/// system, so memory freed by shrinking shows up as lower RSS.
pub fn release_free_memory() {
    // SAFETY: mi_collect only walks mimalloc's own free lists; it is safe to call from any
    // thread at any time, and harmless when mimalloc is not the global allocator.
    unsafe { libmimalloc_sys::mi_collect(true) }
}

/// Drops idle buckets every few seconds so memory follows the clients of the last window.
pub struct Upkeep {
    /// Shrinks every limiter; returns how many buckets were dropped.
    pub shrink_all: Arc<dyn Fn() -> usize + Send + Sync>,
}

#[async_trait::async_trait]
impl pingora::services::background::BackgroundService for Upkeep {
    async fn start(&self, mut shutdown: pingora::server::ShutdownWatch) {
        loop {
            tokio::select! {
                _ = shutdown.changed() => return,
                _ = tokio::time::sleep(Duration::from_secs(5)) => {}
            }
            if (self.shrink_all)() > 0 {
                release_free_memory();
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn check(l: &Limiter, ip: IpAddr) -> Result<(), Denied> {
        match l.verdict(ip) {
            Verdict::Allowed => Ok(()),
            Verdict::Denied(d) => Err(d),
            Verdict::AskStore => Err(Denied { retry_after: 0 }),
        }
    }

    fn limit(requests: u32, per_ms: u64) -> Limit {
        Limit {
            requests,
            per: Duration::from_millis(per_ms),
            burst: requests,
        }
    }

    #[test]
    fn exactly_n_then_denied_then_again() {
        let reg = Registry::default();
        let l = reg.get("", limit(5, 300), 64).expect("limiter");
        let a: IpAddr = "192.0.2.1".parse().expect("ip");
        for _ in 0..5 {
            assert_eq!(check(&l, a), Ok(()));
        }
        assert_eq!(check(&l, a), Err(Denied { retry_after: 1 }));
        // another client has its own bucket
        assert_eq!(check(&l, "192.0.2.2".parse().expect("ip")), Ok(()));
        std::thread::sleep(Duration::from_millis(320));
        for _ in 0..5 {
            assert_eq!(check(&l, a), Ok(()));
        }
    }

    #[test]
    fn ipv6_clients_share_their_prefix() {
        let reg = Registry::default();
        let l = reg.get("", limit(2, 60_000), 64).expect("limiter");
        let x: IpAddr = "2001:db8:1:2::1".parse().expect("ip");
        let y: IpAddr = "2001:db8:1:2:ffff::9".parse().expect("ip");
        let other: IpAddr = "2001:db8:1:3::1".parse().expect("ip");
        assert_eq!(l.key(x), l.key(y));
        assert_ne!(l.key(x), l.key(other));
        assert!(check(&l, x).is_ok());
        assert!(check(&l, y).is_ok());
        assert!(
            check(&l, x).is_err(),
            "rotating inside the /64 does not escape"
        );
        assert!(check(&l, other).is_ok());
        // IPv4 and its mapped form are one client
        let v4: IpAddr = "192.0.2.9".parse().expect("ip");
        let mapped: IpAddr = "::ffff:192.0.2.9".parse().expect("ip");
        assert_eq!(l.key(v4), l.key(mapped));
    }

    #[test]
    fn buckets_survive_unless_the_quota_changes() {
        let reg = Registry::default();
        let a = reg.get("", limit(2, 60_000), 64).expect("limiter");
        let b = reg.get("", limit(2, 60_000), 64).expect("limiter");
        assert!(Arc::ptr_eq(&a, &b));
        let c = reg.get("", limit(3, 60_000), 64).expect("limiter");
        assert!(!Arc::ptr_eq(&a, &c));
        let d = reg.get("route-x", limit(2, 60_000), 64).expect("limiter");
        assert!(!Arc::ptr_eq(&a, &d));
        reg.retain(std::slice::from_ref(&c));
        assert!(!Arc::ptr_eq(
            &a,
            &reg.get("", limit(2, 60_000), 64).expect("limiter")
        ));
    }

    #[test]
    fn idle_buckets_are_dropped() {
        let reg = Registry::default();
        let l = reg.get("", limit(10, 50), 64).expect("limiter");
        for i in 0..1000u32 {
            let ip = IpAddr::from(std::net::Ipv4Addr::from(0x0a00_0000 + i));
            assert!(check(&l, ip).is_ok());
        }
        assert_eq!(l.len(), 1000);
        std::thread::sleep(Duration::from_millis(80));
        l.shrink();
        assert!(l.is_empty());
    }

    #[test]
    fn policy_header() {
        assert_eq!(
            limit(1000, 60_000).policy_header(),
            "\"sluice\";q=1000;w=60"
        );
    }
}
