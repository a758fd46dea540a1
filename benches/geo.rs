//! The per-request geo decision (database lookup + ordering a route's pools), next to a plain
//! `HashMap` lookup measured in the same run as the reference.
//!
//! `cargo bench --bench geo`

use std::collections::HashMap;
use std::hint::black_box;
use std::net::IpAddr;

use criterion::{criterion_group, criterion_main, Criterion};
use sluice::geo::{order, write_db, GeoDb, Site, DEMO};

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn geo(c: &mut Criterion) {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("demo.mmdb");
    write_db(&path, DEMO).expect("db");
    let db = GeoDb::open(&path).expect("open");
    let sites = [
        Some(Site {
            location: (53.34, -6.27),
            countries: vec![*b"IE", *b"GB"],
        }),
        Some(Site {
            location: (39.04, -77.49),
            countries: vec![*b"IS"],
        }),
        Some(Site {
            location: (1.35, 103.82),
            countries: vec![],
        }),
    ];
    let clients: Vec<IpAddr> = ["203.0.113.5", "198.51.100.5", "192.0.2.5", "10.1.2.3"]
        .iter()
        .map(|s| s.parse().expect("ip"))
        .collect();
    let reference: HashMap<u128, u64> = (0..100_000u128).map(|i| (i, 0)).collect();

    let mut g = c.benchmark_group("geo decision");
    let mut i = 0usize;
    g.bench_function("reference: HashMap<u128, u64> lookup", |b| {
        b.iter(|| {
            i = (i + 1) % 100_000;
            black_box(reference.get(&black_box(i as u128)))
        })
    });
    let mut i = 0usize;
    g.bench_function("lookup + order 3 pools", |b| {
        b.iter(|| {
            i = (i + 1) % clients.len();
            let place = db.lookup(black_box(clients[i]));
            black_box(order(&sites, place.as_ref()))
        })
    });
    g.finish();
}

criterion_group!(benches, geo);
criterion_main!(benches);
