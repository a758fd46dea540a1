//! Cost of the rate-limit check on the request path, next to a plain `HashMap` lookup of the
//! same key measured in the same run (the reference the ratio is taken against), and the
//! check of fleet-wide counts (`scope = "cluster"`) next to the local one: the request path
//! of both never waits for Redis, so no Redis is needed here (the counts are marked as
//! exchanging; the exchange itself runs off the request path).
//!
//! `cargo bench --bench limiter`

use std::collections::HashMap;
use std::hint::black_box;
use std::net::{IpAddr, Ipv4Addr};
use std::time::Duration;

use criterion::{criterion_group, criterion_main, Criterion};
use sluice::rate_limit::{Limit, Registry, Verdict};

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn limiter(c: &mut Criterion) {
    let reg = Registry::default();
    let high = Limit {
        requests: u32::MAX / 2,
        per: Duration::from_secs(1),
        burst: u32::MAX / 2,
    };
    let l = reg.get("", high, 64).expect("limiter");
    let ips: Vec<IpAddr> = (0..100_000u32)
        .map(|i| IpAddr::from(Ipv4Addr::from(0x0a00_0000 + i)))
        .collect();
    let cluster = cluster_counts(high);
    for ip in &ips {
        let _ = l.verdict(*ip);
        let _ = cluster.check(l.key(*ip));
    }
    let reference: HashMap<u128, u64> = ips.iter().map(|ip| (l.key(*ip), 0)).collect();

    let mut g = c.benchmark_group("rate limit check");
    let mut i = 0usize;
    g.bench_function("reference: HashMap<u128, u64> lookup", |b| {
        b.iter(|| {
            i = (i + 1) % ips.len();
            black_box(reference.get(&l.key(black_box(ips[i]))))
        })
    });
    let mut i = 0usize;
    g.bench_function("limiter.check, 100k known clients", |b| {
        b.iter(|| {
            i = (i + 1) % ips.len();
            black_box(allowed(l.verdict(black_box(ips[i]))))
        })
    });
    let mut i = 0usize;
    g.bench_function("scope = cluster: check, 100k known clients", |b| {
        b.iter(|| {
            i = (i + 1) % ips.len();
            black_box(allowed(cluster.check(l.key(black_box(ips[i])))))
        })
    });
    g.bench_function("limiter.check, one hot client", |b| {
        b.iter(|| black_box(allowed(l.verdict(black_box(ips[0])))))
    });
    g.bench_function("scope = cluster: check, one hot client", |b| {
        b.iter(|| black_box(allowed(cluster.check(l.key(black_box(ips[0]))))))
    });
    g.finish();
}

fn allowed(v: Verdict) -> bool {
    matches!(v, Verdict::Allowed)
}

/// Fleet-wide counts as the request path sees them while the store answers.
fn cluster_counts(limit: Limit) -> std::sync::Arc<dyn sluice::rate_limit::Counts> {
    let cfg = sluice::config::Cluster {
        redis: sluice::config::RedisTarget::Single {
            url: "redis://127.0.0.1:1/0".into(),
        },
        password_file: None,
        tls: None,
        instance: "bench".into(),
        key_prefix: "bench:".into(),
        timeout: Duration::from_millis(100),
    };
    let gauge = prometheus::IntGauge::new("up", "up").expect("gauge");
    let store = std::sync::Arc::new(sluice::cluster::Store::new(cfg, gauge));
    let live = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(3));
    let hist = prometheus::Histogram::with_opts(prometheus::HistogramOpts::new("s", "s"))
        .expect("histogram");
    let ex = sluice::cluster::limits::Exchange::new(store, live, hist);
    ex.assume_reachable();
    ex.counts("", limit, Duration::from_millis(200))
        .expect("counts")
}

criterion_group!(benches, limiter);
criterion_main!(benches);
