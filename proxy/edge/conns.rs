//! Open downstream connections: one count for the process and one per client address, taken at
//! accept (after the PROXY header, before TLS) and given back when the connection closes.
//!
//! The per-address counts live in a sharded table of plain `u128` keys (an IPv4 address, or an
//! IPv6 address cut to its prefix, as the rate limiter keys them), so a connection costs one
//! short lock on one shard when it opens and one when it closes; nothing on the request path.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};

use crate::client_ip::key;

const SHARDS: usize = 64;

/// Why a connection was refused (the `reason` label of `sluice_connections_refused_total`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    MaxConnections,
    PerIp,
}

impl Refusal {
    pub fn label(self) -> &'static str {
        match self {
            Refusal::MaxConnections => "max_connections",
            Refusal::PerIp => "per_ip",
        }
    }
}

struct Inner {
    total: AtomicU32,
    shards: [Mutex<HashMap<u128, u32>>; SHARDS],
}

impl Default for Inner {
    fn default() -> Self {
        Inner {
            total: AtomicU32::new(0),
            shards: std::array::from_fn(|_| Mutex::new(HashMap::new())),
        }
    }
}

/// The connection counts; clones share them.
#[derive(Clone, Default)]
pub struct Conns(Arc<Inner>);

fn shard_of(key: u128) -> usize {
    // fold the address so that neighbours land on different shards
    let h = (key as u64) ^ ((key >> 64) as u64);
    (h.wrapping_mul(0x9e37_79b9_7f4a_7c15) >> 58) as usize % SHARDS
}

/// One open connection; counted until dropped.
pub struct ConnGuard {
    conns: Conns,
    key: Option<u128>,
}

impl Drop for ConnGuard {
    fn drop(&mut self) {
        let inner = &self.conns.0;
        inner.total.fetch_sub(1, Ordering::Relaxed);
        if let Some(k) = self.key {
            let mut shard = inner.shards[shard_of(k)]
                .lock()
                .unwrap_or_else(|e| e.into_inner());
            if let Some(n) = shard.get_mut(&k) {
                *n -= 1;
                if *n == 0 {
                    shard.remove(&k);
                }
            }
        }
    }
}

impl Conns {
    /// Counts a new connection from `ip` unless that would pass `max_total` for the process or
    /// `max_per_ip` (0: no limit) for its address.
    pub fn acquire(
        &self,
        ip: Option<IpAddr>,
        v6_prefix: u8,
        max_total: u32,
        max_per_ip: u32,
    ) -> Result<ConnGuard, Refusal> {
        let inner = &self.0;
        if inner.total.fetch_add(1, Ordering::Relaxed) >= max_total {
            inner.total.fetch_sub(1, Ordering::Relaxed);
            return Err(Refusal::MaxConnections);
        }
        // from here on the guard gives the total back, whatever happens
        let mut guard = ConnGuard {
            conns: self.clone(),
            key: None,
        };
        if let Some(ip) = ip.filter(|_| max_per_ip > 0) {
            let k = key(ip, v6_prefix);
            let mut shard = inner.shards[shard_of(k)]
                .lock()
                .unwrap_or_else(|e| e.into_inner());
            let n = shard.entry(k).or_insert(0);
            if *n >= max_per_ip {
                return Err(Refusal::PerIp);
            }
            *n += 1;
            guard.key = Some(k);
        }
        Ok(guard)
    }

    /// Connections open now.
    pub fn total(&self) -> u32 {
        self.0.total.load(Ordering::Relaxed)
    }

    /// Connections open now from `ip`'s key (only tracked while a per-IP limit is set).
    pub fn of(&self, ip: IpAddr, v6_prefix: u8) -> u32 {
        let k = key(ip, v6_prefix);
        let shard = self.0.shards[shard_of(k)]
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        shard.get(&k).copied().unwrap_or(0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> Option<IpAddr> {
        Some(s.parse().expect("ip"))
    }

    #[test]
    fn per_ip_and_total_limits() {
        let c = Conns::default();
        let a: Vec<_> = (0..3)
            .map(|_| c.acquire(ip("192.0.2.1"), 64, 10, 3).expect("under"))
            .collect();
        assert_eq!(
            c.acquire(ip("192.0.2.1"), 64, 10, 3).err(),
            Some(Refusal::PerIp)
        );
        assert_eq!(c.total(), 3, "a refusal gives its count back");
        // another address is not affected; IPv6 neighbours in one /64 are one client
        let b = c.acquire(ip("2001:db8::1"), 64, 10, 1).expect("v6");
        assert_eq!(
            c.acquire(ip("2001:db8::ffff"), 64, 10, 1).err(),
            Some(Refusal::PerIp)
        );
        let _d = c
            .acquire(ip("2001:db8:0:1::1"), 64, 10, 1)
            .expect("other /64");
        drop(a);
        assert_eq!(c.of("192.0.2.1".parse().expect("ip"), 64), 0);
        let _e = c.acquire(ip("192.0.2.1"), 64, 10, 3).expect("given back");
        drop(b);
        // the process limit, and 0 = no per-IP limit
        let many: Vec<_> = (0..7)
            .map(|_| c.acquire(ip("198.51.100.1"), 64, 10, 0).expect("no per-ip"))
            .collect();
        assert_eq!(c.total(), 9);
        let _last = c.acquire(None, 64, 10, 0).expect("10th");
        assert_eq!(
            c.acquire(None, 64, 10, 0).err(),
            Some(Refusal::MaxConnections)
        );
        drop(many);
        assert_eq!(c.total(), 3);
    }
}
