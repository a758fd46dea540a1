//! Backends by DNS name against a real DNS server (dnsmasq on a loopback port, records changed
//! by the test) and real backends on 127.0.0.x: even spread, members joining and leaving under
//! load, a rolling replacement, the DNS server going away and coming back, SRV ports and
//! weights, and a dead member ejected like any backend.

mod common;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::*;

/// sluice with one plain listener and pool `app` = `backends`, resolving through `dns`.
fn start(
    dir: &std::path::Path,
    dns: &Dns,
    backends: &str,
    pool_extra: &str,
) -> (Sluice, SocketAddr) {
    let plain = free_addr();
    let config = format!(
        r#"
[server]
threads = 2
access_log = "stdout"
[admin]
listen = "{{admin}}"
[resolver]
nameservers = ["{dns}"]
interval = "1s"
[[listener]]
listen = "{plain}"
[[pool]]
name = "app"
backends = [{backends}]
health = {{ path = "/healthz", interval = "300ms", timeout = "250ms", unhealthy_after = 2, healthy_after = 1 }}
{pool_extra}
[[route]]
name = "all"
hosts = ["*"]
blue = ["app"]
"#,
        dns = dns.addr
    );
    (Sluice::start(dir, &config), plain)
}

fn backend(dir: &std::path::Path, ip: &str, port: u16) -> Backend {
    let addr = SocketAddr::new(ip.parse().expect("ip"), port);
    Backend::start_on(dir, ip, addr, None)
}

/// Who answered `n` requests (by the demo backend's name), and how many failed.
fn spread(plain: SocketAddr, n: usize) -> (HashMap<String, usize>, usize) {
    let mut seen = HashMap::new();
    let mut failed = 0;
    for _ in 0..n {
        match request(plain, "GET", "/", &[]) {
            Some(r) if r.code == 200 => *seen.entry(r.body.trim().to_string()).or_insert(0) += 1,
            _ => failed += 1,
        }
    }
    (seen, failed)
}

/// Requests in a loop on 3 threads until stopped: (answers by backend, failures).
struct Load {
    stop: Arc<AtomicBool>,
    seen: Arc<Mutex<HashMap<String, usize>>>,
    failed: Arc<AtomicUsize>,
    threads: Vec<std::thread::JoinHandle<()>>,
}

impl Load {
    fn start(plain: SocketAddr) -> Load {
        let stop = Arc::new(AtomicBool::new(false));
        let seen = Arc::new(Mutex::new(HashMap::new()));
        let failed = Arc::new(AtomicUsize::new(0));
        let threads = (0..3)
            .map(|_| {
                let (stop, seen, failed) = (stop.clone(), seen.clone(), failed.clone());
                std::thread::spawn(move || {
                    while !stop.load(Ordering::Relaxed) {
                        match request(plain, "GET", "/", &[]) {
                            Some(r) if r.code == 200 => {
                                *seen
                                    .lock()
                                    .expect("lock")
                                    .entry(r.body.trim().to_string())
                                    .or_insert(0) += 1
                            }
                            other => {
                                eprintln!("failed: {:?}", other.map(|r| (r.code, r.body)));
                                failed.fetch_add(1, Ordering::Relaxed);
                            }
                        }
                    }
                })
            })
            .collect();
        Load {
            stop,
            seen,
            failed,
            threads,
        }
    }

    fn answered_by(&self, name: &str) -> usize {
        self.seen
            .lock()
            .expect("lock")
            .get(name)
            .copied()
            .unwrap_or(0)
    }

    fn finish(self) -> (HashMap<String, usize>, usize) {
        self.stop.store(true, Ordering::Relaxed);
        for t in self.threads {
            let _ = t.join();
        }
        let seen = self.seen.lock().expect("lock").clone();
        (seen, self.failed.load(Ordering::Relaxed))
    }
}

/// Waits until `pred` holds of the requests answered from now on; returns how long it took.
fn within(load: &Load, limit: Duration, pred: impl Fn(&Load) -> bool) -> Option<Duration> {
    let t = Instant::now();
    wait_until(limit, || pred(load)).then(|| t.elapsed())
}

#[test]
fn a_name_spreads_requests_over_its_addresses() {
    let dir = tempdir();
    let ips = ["127.0.0.2", "127.0.0.3", "127.0.0.4"];
    let port = free_port_on(&ips);
    let _b: Vec<Backend> = ips.iter().map(|ip| backend(dir.path(), ip, port)).collect();
    let dns = Dns::start(dir.path(), &[]);
    dns.set("app.test", &ips);
    let (sluice, plain) = start(dir.path(), &dns, &format!("\"app.test:{port}\""), "");
    let (seen, failed) = spread(plain, 300);
    assert_eq!(failed, 0);
    for ip in ips {
        assert_eq!(seen.get(ip).copied(), Some(100), "{seen:?}");
    }
    let st = sluice.status();
    let pool = &st["pools"][0];
    assert_eq!(pool["members"], 3);
    assert_eq!(pool["names"][0]["name"], format!("app.test:{port}"));
    assert!(pool["names"][0]["last_resolved"].is_string());
    assert_eq!(pool["backends"][0]["name"], "app.test");
    assert_eq!(
        sluice.metric("sluice_pool_members{pool=\"app\"}"),
        Some(3.0)
    );
    assert!(sluice.metric("sluice_dns_resolutions_total{pool=\"app\",result=\"ok\"}") >= Some(1.0));
}

#[test]
fn members_join_leave_and_roll_under_load_without_a_failed_request() {
    let dir = tempdir();
    let old = ["127.0.0.2", "127.0.0.3", "127.0.0.4"];
    let new = ["127.0.0.5", "127.0.0.6", "127.0.0.7"];
    let all: Vec<&str> = old.iter().chain(&new).copied().collect();
    let port = free_port_on(&all);
    let mut backends: HashMap<&str, Backend> = old
        .iter()
        .map(|ip| (*ip, backend(dir.path(), ip, port)))
        .collect();
    let dns = Dns::start(dir.path(), &[]);
    dns.set("app.test", &old[..2]);
    let (sluice, plain) = start(dir.path(), &dns, &format!("\"app.test:{port}\""), "");
    let load = Load::start(plain);
    assert!(within(&load, Duration::from_secs(3), |l| l.answered_by(old[1]) > 0).is_some());

    // a record added: in rotation within interval (1 s) + 1 s (after its first good probe)
    dns.set("app.test", &old);
    let joined = within(&load, Duration::from_secs(4), |l| l.answered_by(old[2]) > 0);
    println!("joined after {joined:?}");
    assert!(
        joined.is_some_and(|d| d <= Duration::from_secs(2)),
        "{joined:?}"
    );

    // a record removed: out of rotation within the same bound
    dns.set("app.test", &old[1..]);
    let removed_at = Instant::now();
    assert!(wait_until(Duration::from_secs(3), || sluice.status()
        ["pools"][0]["members"]
        == 2));
    // requests already in flight on it complete (they picked it before the swap)
    std::thread::sleep(Duration::from_millis(100));
    let before = load.answered_by(old[0]);
    std::thread::sleep(Duration::from_millis(300));
    let left = removed_at.elapsed();
    assert_eq!(
        load.answered_by(old[0]),
        before,
        "removed, yet still served"
    );
    println!("left within {left:?}");
    assert!(left <= Duration::from_secs(2), "{left:?}");

    // rolling replacement, one address at a time; an old process stops once its record is
    // gone and sluice no longer lists it
    let mut current: Vec<&str> = old[1..].to_vec();
    current.insert(0, old[0]);
    dns.set("app.test", &current);
    for (o, n) in old.iter().zip(&new) {
        backends.insert(n, backend(dir.path(), n, port));
        current.push(n);
        dns.set("app.test", &current);
        assert!(
            within(&load, Duration::from_secs(4), |l| l.answered_by(n) > 0).is_some(),
            "{n} never served"
        );
        current.retain(|ip| ip != o);
        dns.set("app.test", &current);
        assert!(wait_until(Duration::from_secs(4), || {
            let st = sluice.status();
            !st["pools"][0]["backends"]
                .as_array()
                .is_some_and(|b| b.iter().any(|b| b["address"] == format!("{o}:{port}")))
        }));
        // let requests in flight on it finish, then the pod goes
        std::thread::sleep(Duration::from_millis(200));
        drop(backends.remove(o));
    }
    std::thread::sleep(Duration::from_millis(500));
    let (seen, failed) = load.finish();
    println!("served: {seen:?}");
    assert_eq!(
        failed, 0,
        "failed requests during membership changes: {seen:?}"
    );
    for n in new {
        assert!(seen.get(n).copied().unwrap_or(0) > 0);
    }
}

#[test]
fn the_dns_server_going_away_changes_nothing_until_it_is_back() {
    let dir = tempdir();
    let ips = ["127.0.0.2", "127.0.0.3", "127.0.0.4"];
    let port = free_port_on(&ips);
    let _b: Vec<Backend> = ips.iter().map(|ip| backend(dir.path(), ip, port)).collect();
    let mut dns = Dns::start(dir.path(), &[]);
    dns.set("app.test", &ips[..2]);
    let (sluice, plain) = start(dir.path(), &dns, &format!("\"app.test:{port}\""), "");
    let load = Load::start(plain);
    dns.stop();
    // the last good members keep serving; the failure shows
    assert!(wait_until(Duration::from_secs(6), || {
        sluice.status()["pools"][0]["names"][0]["last_error"].is_string()
    }));
    assert!(wait_until(Duration::from_secs(3), || sluice
        .metric("sluice_dns_resolutions_total{pool=\"app\",result=\"error\"}")
        .unwrap_or(0.0)
        >= 1.0));
    assert_eq!(sluice.status()["pools"][0]["members"], 2);
    let served = (load.answered_by(ips[0]), load.answered_by(ips[1]));
    std::thread::sleep(Duration::from_millis(500));
    assert!(load.answered_by(ips[0]) > served.0 && load.answered_by(ips[1]) > served.1);
    // back, with a change: it applies
    dns.set("app.test", &ips);
    dns.resume();
    assert!(within(&load, Duration::from_secs(5), |l| l.answered_by(ips[2]) > 0).is_some());
    assert!(wait_until(Duration::from_secs(3), || sluice.status()
        ["pools"][0]["names"][0]["last_error"]
        .is_null()));
    let (_, failed) = load.finish();
    assert_eq!(failed, 0);
}

#[test]
fn srv_records_give_ports_and_weights() {
    let dir = tempdir();
    let ips = ["127.0.0.2", "127.0.0.3"];
    let (p1, p2) = (free_port_on(&ips[..1]), free_port_on(&ips[1..]));
    let _a = backend(dir.path(), ips[0], p1);
    let _b = backend(dir.path(), ips[1], p2);
    // weights 1 and 3; a lower-priority (higher number) target is not used
    let dns = Dns::start(
        dir.path(),
        &[
            &format!("_app._tcp.test,one.test,{p1},0,1"),
            &format!("_app._tcp.test,two.test,{p2},0,3"),
            &format!("_app._tcp.test,spare.test,{p1},10,100"),
        ],
    );
    dns.set("one.test", &ips[..1]);
    dns.set("two.test", &ips[1..]);
    dns.set("spare.test", &["127.0.0.9"]);
    let (sluice, plain) = start(dir.path(), &dns, "\"_app._tcp.test\"", "");
    let (seen, failed) = spread(plain, 400);
    assert_eq!(failed, 0);
    assert_eq!(seen.get(ips[0]).copied(), Some(100), "{seen:?}");
    assert_eq!(seen.get(ips[1]).copied(), Some(300), "{seen:?}");
    let backends = sluice.status()["pools"][0]["backends"].clone();
    let b = backends.as_array().expect("backends");
    assert_eq!(b.len(), 2);
    assert!(b.iter().any(|b| b["address"] == format!("{}:{p2}", ips[1])
        && b["weight"] == 3
        && b["name"] == "two.test"));
}

#[test]
fn a_dead_member_still_listed_is_ejected_like_any_backend() {
    let dir = tempdir();
    let ips = ["127.0.0.2", "127.0.0.3"];
    let port = free_port_on(&ips);
    let live = backend(dir.path(), ips[0], port);
    let mut dead = backend(dir.path(), ips[1], port);
    let dns = Dns::start(dir.path(), &[]);
    dns.set("app.test", &ips);
    let (sluice, plain) = start(dir.path(), &dns, &format!("\"app.test:{port}\""), "");
    let load = Load::start(plain);
    assert!(within(&load, Duration::from_secs(3), |l| l.answered_by(ips[1]) > 0).is_some());
    // the pod dies; its record stays
    let _ = dead.proc.child.kill();
    let _ = dead.proc.child.wait();
    let t = Instant::now();
    assert!(wait_until(Duration::from_secs(3), || {
        sluice.status()["pools"][0]["backends"]
            .as_array()
            .is_some_and(|b| {
                b.iter()
                    .any(|b| b["address"] == format!("{}:{port}", ips[1]) && b["healthy"] == false)
            })
    }));
    println!("dead member out of rotation after {:?}", t.elapsed());
    std::thread::sleep(Duration::from_millis(500));
    let (seen, failed) = load.finish();
    let out = sluice.stdout();
    let bad: Vec<&str> = out
        .lines()
        .filter(|l| !l.contains("\"status\":200"))
        .take(5)
        .collect();
    assert_eq!(failed, 0, "{seen:?} {bad:#?}");
    // both kinds of ejection count for it, as for an IP backend
    let b = format!("{}:{port}", ips[1]);
    assert!(
        sluice.metric(&format!(
            "sluice_backend_ejections_total{{backend=\"{b}\",pool=\"app\",reason=\"passive\"}}"
        )) >= Some(1.0)
    );
    assert!(wait_until(Duration::from_secs(3), || sluice.metric(
        &format!(
            "sluice_backend_ejections_total{{backend=\"{b}\",pool=\"app\",reason=\"active\"}}"
        )
    ) >= Some(1.0)));
    drop(live);
}

#[test]
fn a_name_that_does_not_resolve_yet_serves_503_until_it_does() {
    let dir = tempdir();
    let ips = ["127.0.0.2"];
    let port = free_port_on(&ips);
    let _b = backend(dir.path(), ips[0], port);
    let dns = Dns::start(dir.path(), &[]);
    let (sluice, plain) = start(dir.path(), &dns, &format!("\"app.test:{port}\""), "");
    let r = request(plain, "GET", "/", &[]).expect("answer");
    assert_eq!(r.code, 503);
    assert!(r.header("retry-after").is_some());
    assert_eq!(sluice.status()["pools"][0]["members"], 0);
    assert!(sluice.status()["pools"][0]["names"][0]["last_error"].is_string());
    dns.set("app.test", &ips);
    assert!(wait_until(Duration::from_secs(4), || {
        request(plain, "GET", "/", &[]).is_some_and(|r| r.code == 200)
    }));
    // `sluice check` warns about such a name, and passes
    let cfg = std::fs::read_to_string(&sluice.config).expect("config");
    let other = dir.path().join("check.toml");
    std::fs::write(&other, cfg.replace("app.test:", "nowhere.test:")).expect("write");
    let out = std::process::Command::new(BIN)
        .args(["check", "-c"])
        .arg(&other)
        .output()
        .expect("check");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{err}");
    assert!(
        err.contains("warning") && err.contains("nowhere.test"),
        "{err}"
    );
}

#[test]
fn tls_to_a_named_backend_verifies_that_name() {
    let dir = tempdir();
    let ca = Ca::new(dir.path(), "upstream");
    let (good_c, good_k) = ca.issue(dir.path(), "good", &["app.test"]);
    let (bad_c, bad_k) = ca.issue(dir.path(), "bad", &["other.test"]);
    let ips = ["127.0.0.2", "127.0.0.3"];
    let port = free_port_on(&ips);
    fn tls<'a>(c: &'a std::path::Path, k: &'a std::path::Path) -> BackendTls<'a> {
        BackendTls {
            cert: c,
            key: k,
            client_ca: None,
        }
    }
    let _good = Backend::start_on(
        dir.path(),
        "good",
        SocketAddr::new(ips[0].parse().expect("ip"), port),
        Some(tls(&good_c, &good_k)),
    );
    let _bad = Backend::start_on(
        dir.path(),
        "bad",
        SocketAddr::new(ips[1].parse().expect("ip"), port),
        Some(tls(&bad_c, &bad_k)),
    );
    let dns = Dns::start(dir.path(), &[]);
    dns.set("app.test", &ips[..1]);
    dns.set("bad.test", &ips[1..]);
    let tls_line = format!("tls = {{ ca = \"{}\" }}", ca.pem_path.display());
    let (_s, plain) = start(dir.path(), &dns, &format!("\"app.test:{port}\""), &tls_line);
    let r = request(plain, "GET", "/", &[]).expect("answer");
    assert_eq!((r.code, r.body.trim()), (200, "good"));
    // a certificate for another name is refused
    let dir2 = tempdir();
    let (_s2, plain2) = start(
        dir2.path(),
        &dns,
        &format!("\"bad.test:{port}\""),
        &tls_line,
    );
    let r = request(plain2, "GET", "/", &[]).expect("answer");
    assert_eq!(r.code, 502, "{}", r.body);
}
