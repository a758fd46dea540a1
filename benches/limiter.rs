//! Cost of the rate-limit check on the request path, next to a plain `HashMap` lookup of the
//! same key measured in the same run (the reference the ratio is taken against).
//!
//! `cargo bench --bench limiter`

use std::collections::HashMap;
use std::hint::black_box;
use std::net::{IpAddr, Ipv4Addr};
use std::time::Duration;

use criterion::{criterion_group, criterion_main, Criterion};
use sluice::rate_limit::{Limit, Registry};

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
    for ip in &ips {
        let _ = l.check(*ip);
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
            black_box(l.check(black_box(ips[i])))
        })
    });
    g.bench_function("limiter.check, one hot client", |b| {
        b.iter(|| black_box(l.check(black_box(ips[0]))))
    });
    g.finish();
}

criterion_group!(benches, limiter);
criterion_main!(benches);
