//! The per-request decisions of sluice's request path, each next to a reference measured in
//! the same run (a `HashMap` lookup): route match, color pick, backend pick, metrics record,
//! snapshot load. The geo decision and the rate-limit check have their own benches (`geo`,
//! `limiter`).
//!
//! The backend pick is measured on a pool of `ip:port` backends and on a pool of the same size
//! given by DNS name (members from the resolver's answer): the request path is the same code,
//! and the ratio between the two shows it.
//!
//! `cargo bench --bench decisions`

use std::collections::HashMap;
use std::hint::black_box;
use std::net::IpAddr;
use std::sync::Arc;

use arc_swap::ArcSwap;
use criterion::{criterion_group, criterion_main, Criterion};
use http::HeaderMap;
use sluice::config::Sticky;
use sluice::config::Target;
use sluice::discovery::{Discovery, Member};
use sluice::health;
use sluice::metrics::{code_class, Metrics};
use sluice::snapshot::{Registries, Snapshot};
use sluice::traffic::{sticky, Traffic};

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

const CONFIG: &str = r#"
[admin]
listen = "127.0.0.1:1"
[[listener]]
listen = "127.0.0.1:2"
[[pool]]
name = "blue"
backends = ["127.0.0.1:10", "127.0.0.1:11", "127.0.0.1:12", "127.0.0.1:13"]
[[pool]]
name = "green"
backends = ["127.0.0.1:20", "127.0.0.1:21"]
[[pool]]
name = "api"
backends = ["127.0.0.1:30"]
[[pool]]
name = "named"
backends = ["app.test:80"]
[[route]]
name = "api"
hosts = ["*.example.com"]
path_prefix = "/api"
blue = ["api"]
[[route]]
name = "static"
hosts = ["shop.example.com"]
path_prefix = "/static"
blue = ["api"]
[[route]]
name = "shop"
hosts = ["shop.example.com", "localhost"]
blue = ["blue"]
green = ["green"]
weights = { blue = 90, green = 10 }
[[route]]
name = "any"
hosts = ["*"]
blue = ["blue"]
[[route]]
name = "by-name"
hosts = ["named.test"]
blue = ["named"]
"#;

fn decisions(c: &mut Criterion) {
    let dir = tempfile::tempdir().expect("tempdir");
    let config =
        sluice::config::parse(&dir.path().join("sluice.toml"), CONFIG).expect("bench config");
    let metrics = Metrics::new().expect("metrics");
    let health = health::Registry::default();
    let limits = sluice::rate_limit::Registry::default();
    let traffic = Traffic::new(
        None,
        metrics.route_weight.clone(),
        metrics.shift_rollbacks.clone(),
    );
    traffic.apply_config(&config);
    // the named pool's members, as a resolver would have answered
    let discovery = Discovery::new(metrics.dns_resolutions.clone());
    let target = Target::Name {
        host: "app.test".into(),
        port: 80,
    };
    let answer = (1..=4)
        .map(|i| Member {
            address: format!("10.0.0.{i}:80").parse().expect("addr"),
            weight: 1,
            host: Some("app.test".into()),
            late: false,
        })
        .collect();
    discovery.record("named", &target, Ok(answer));
    let snap = Arc::new(Snapshot::build(
        Arc::new(config),
        1,
        &Registries {
            metrics: &metrics,
            health: &health,
            limits: &limits,
            traffic: &traffic,
            discovery: &discovery,
        },
    ));
    let swap = ArcSwap::from(snap.clone());
    let reference: HashMap<u128, u64> = (0..100_000u128).map(|i| (i, 0)).collect();

    let mut g = c.benchmark_group("request decisions");
    let mut i = 0usize;
    g.bench_function("reference: HashMap<u128, u64> lookup", |b| {
        b.iter(|| {
            i = (i + 1) % 100_000;
            black_box(reference.get(&black_box(i as u128)))
        })
    });
    g.bench_function("snapshot load (ArcSwap::load_full)", |b| {
        b.iter(|| black_box(swap.load_full()))
    });
    let requests = [
        ("shop.example.com", "/static/app.js"),
        ("shop.example.com", "/cart/42"),
        ("eu.example.com", "/api/v1/items"),
        ("other.test", "/"),
    ];
    let mut i = 0usize;
    g.bench_function("route match (4 routes, host + path)", |b| {
        b.iter(|| {
            i = (i + 1) % requests.len();
            let (host, path) = requests[i];
            black_box(snap.router.route(black_box(host), black_box(path)))
        })
    });
    let mut with_cookie = HeaderMap::new();
    with_cookie.insert(
        http::header::COOKIE,
        format!("theme=dark; {}={}", sticky::COOKIE, sticky::new_id())
            .parse()
            .expect("header"),
    );
    let ip: IpAddr = "203.0.113.7".parse().expect("ip");
    g.bench_function("color pick: sticky cookie (known client)", |b| {
        b.iter(|| {
            black_box(sticky::choose(
                Sticky::Cookie,
                black_box(10),
                &with_cookie,
                Some(ip),
                true,
            ))
        })
    });
    g.bench_function("color pick: client_ip", |b| {
        b.iter(|| {
            black_box(sticky::choose(
                Sticky::ClientIp,
                black_box(10),
                &with_cookie,
                Some(ip),
                true,
            ))
        })
    });
    let empty = HeaderMap::new();
    g.bench_function(
        "color pick: sticky cookie (new client: id + Set-Cookie)",
        |b| b.iter(|| black_box(sticky::choose(Sticky::Cookie, 10, &empty, Some(ip), true))),
    );
    let clock = health.clock();
    let pool = &snap.pools[0];
    g.bench_function("backend pick (4 backends, smooth WRR + health)", |b| {
        b.iter(|| black_box(pool.pick(black_box(0), &clock).ok()))
    });
    let named = &snap.pools[3];
    assert_eq!(named.backends.len(), 4, "the named pool has its members");
    g.bench_function("backend pick (4 members of a DNS name)", |b| {
        b.iter(|| black_box(named.pick(black_box(0), &clock).ok()))
    });
    let route = &snap.routes[2];
    let mut status = 200u16;
    g.bench_function("metrics record (counter + histogram + color window)", |b| {
        b.iter(|| {
            status = if status == 200 { 503 } else { 200 };
            route.colors[0].requests[0][code_class(status)].inc();
            route.duration.observe(black_box(0.0012));
            route
                .control
                .record(sluice::traffic::Color::Blue, status >= 500);
        })
    });
    // tracing at sample_ratio 0.01 for a request whose trace is not recorded (99 of 100):
    // start, one attempt, the upstream traceparent, end. The collector address is never
    // reached here (nothing is recorded).
    let tracing = sluice::trace::Tracing::start(
        &sluice::trace::Config {
            endpoint: "http://127.0.0.1:9".into(),
            sample_ratio: 0.0,
            service_name: "bench".into(),
        },
        prometheus::IntCounter::new("d", "d").expect("counter"),
    )
    .expect("tracing");
    let req = pingora::http::RequestHeader::build("GET", b"/", None).expect("request");
    let backend: std::net::SocketAddr = "10.0.0.1:8080".parse().expect("addr");
    g.bench_function(
        "tracing: a request not recorded (start, attempt, traceparent, end)",
        |b| {
            b.iter(|| {
                let mut up = req.clone();
                let mut t = tracing.start_request(black_box(&req));
                tracing.start_attempt(&mut t, "GET", backend);
                tracing.inject(&t, &mut up);
                t.end(Vec::new, 200, None);
                black_box(up)
            })
        },
    );
    g.bench_function("reference: cloning the upstream request header", |b| {
        b.iter(|| black_box(req.clone()))
    });
    g.finish();
}

criterion_group!(benches, decisions);
criterion_main!(benches);
