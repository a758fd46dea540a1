//! Memory of the rate limiter after 1,000,000 distinct client IPs each made one request, and
//! after the window passed and the periodic shrink ran. Reports resident memory (RSS).
//!
//! `cargo bench --bench limiter_memory` (under `cargo test` it runs with 10,000 clients, as a
//! check that it works).

use std::net::{IpAddr, Ipv4Addr};
use std::time::{Duration, Instant};

use sluice::rate_limit::{Limit, Registry};

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn rss_mib() -> f64 {
    let statm = std::fs::read_to_string("/proc/self/statm").unwrap_or_default();
    let pages: f64 = statm
        .split_whitespace()
        .nth(1)
        .and_then(|p| p.parse().ok())
        .unwrap_or(0.0);
    pages * 4096.0 / (1024.0 * 1024.0)
}

fn main() {
    let full = std::env::args().any(|a| a == "--bench");
    let clients: u32 = if full { 1_000_000 } else { 10_000 };
    let window = Duration::from_secs(2);
    let reg = Registry::default();
    let limit = Limit {
        requests: 1000,
        per: window,
        burst: 1000,
    };
    let l = reg.get("", limit, 64).expect("limiter");
    let before = rss_mib();
    let t = Instant::now();
    for i in 0..clients {
        let ip = IpAddr::from(Ipv4Addr::from(0x0b00_0000 + i));
        assert!(matches!(
            l.verdict(ip),
            sluice::rate_limit::Verdict::Allowed
        ));
    }
    let took = t.elapsed();
    let after = rss_mib();
    assert_eq!(l.len(), clients as usize);
    std::thread::sleep(window + Duration::from_millis(200));
    let t = Instant::now();
    reg.shrink_all();
    let shrink_took = t.elapsed();
    let shrunk = rss_mib();
    // the allocator keeps freed pages for reuse; ask it to hand them back, as upkeep does
    sluice::rate_limit::release_free_memory();
    std::thread::sleep(Duration::from_millis(200));
    let released = rss_mib();
    println!("rate limiter memory, {clients} distinct clients, one request each:");
    println!(
        "  RSS before: {before:.1} MiB; after: {after:.1} MiB (+{:.1} MiB, {:.0} bytes per client)",
        after - before,
        (after - before) * 1024.0 * 1024.0 / f64::from(clients)
    );
    println!(
        "  inserting took {took:?} ({:.0} ns per new client)",
        took.as_nanos() as f64 / f64::from(clients)
    );
    println!("  after the window and the periodic shrink ({shrink_took:?}): {} buckets, RSS {shrunk:.1} MiB; {released:.1} MiB once the allocator released free pages", l.len());
    assert!(l.is_empty(), "idle buckets must be dropped");
    if full {
        assert!(after - before < 200.0, "over the 200 MB target");
    }
}
