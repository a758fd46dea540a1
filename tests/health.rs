//! Health: active checks, passive ejection, retries, the floor, and 503 when all are down.

mod common;

use std::collections::HashMap;
use std::net::{SocketAddr, TcpListener};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use common::*;

/// One catch-all route over one pool with fast checks; `pool_extra` adds pool keys.
fn config(listen: SocketAddr, backends: &[SocketAddr], pool_extra: &str) -> String {
    let list = toml_addrs(backends);
    format!(
        r#"[server]
threads = 2
drain_delay = "0s"
access_log = "access.jsonl"
[admin]
listen = "{{admin}}"
[[listener]]
listen = "{listen}"
[[pool]]
name = "p"
backends = [{list}]
connect_timeout = "300ms"
read_timeout = "5s"
health = {{ path = "/healthz", interval = "200ms", timeout = "100ms", unhealthy_after = 2, healthy_after = 2 }}
eject = {{ consecutive_failures = 3, base_time = "2s", max_time = "30s" }}
{pool_extra}
[[route]]
name = "all"
hosts = ["*"]
blue = ["p"]
"#
    )
}

/// GET / over a new connection: (status, body, retry-after); status 0 when it failed.
fn fetch(listen: SocketAddr) -> (u16, String, Option<String>) {
    match request(listen, "GET", "/", &[]) {
        Some(r) => {
            let retry_after = r.header("retry-after").map(String::from);
            (r.code, r.body.trim().to_string(), retry_after)
        }
        None => (0, "request failed".into(), None),
    }
}

/// The /status entry of a backend.
fn backend_status(s: &Sluice, addr: SocketAddr) -> serde_json::Value {
    let st = s.status();
    st["pools"][0]["backends"]
        .as_array()
        .and_then(|bs| {
            bs.iter()
                .find(|b| b["address"] == addr.to_string())
                .cloned()
        })
        .unwrap_or_default()
}

fn state(s: &Sluice, addr: SocketAddr) -> String {
    backend_status(s, addr)["state"]
        .as_str()
        .unwrap_or("")
        .to_string()
}

fn wait_state(s: &Sluice, addr: SocketAddr, want: &str, timeout: Duration) -> Option<Duration> {
    let t = Instant::now();
    wait_until(timeout, || state(s, addr) == want).then(|| t.elapsed())
}

/// Client threads, each returning (status, body) of every request it made.
type Clients = Vec<std::thread::JoinHandle<Vec<(u16, String)>>>;

/// Runs `n` client threads looping GET / until the returned flag is set.
fn load(listen: SocketAddr, n: usize) -> (Arc<AtomicBool>, Clients) {
    let stop = Arc::new(AtomicBool::new(false));
    let threads = (0..n)
        .map(|_| {
            let stop = stop.clone();
            std::thread::spawn(move || {
                let mut out = Vec::new();
                while !stop.load(Ordering::SeqCst) {
                    let (c, b, _) = fetch(listen);
                    out.push((c, b));
                }
                out
            })
        })
        .collect();
    (stop, threads)
}

#[test]
fn a_killed_backend_costs_clients_nothing_and_comes_back() {
    let dir = tempdir();
    let b1 = Backend::start(dir.path(), "b1");
    let mut b2 = Backend::start(dir.path(), "b2");
    let b3 = Backend::start(dir.path(), "b3");
    let dead = b2.addr;
    let listen = free_addr();
    let s = Sluice::start(
        dir.path(),
        &config(listen, &[b1.addr, b2.addr, b3.addr], ""),
    );
    assert!(wait_state(&s, dead, "healthy", Duration::from_secs(3)).is_some());

    let (stop, threads) = load(listen, 3);
    std::thread::sleep(Duration::from_millis(700));
    b2.proc.signal(libc::SIGKILL);
    let ejected = wait_state(&s, dead, "ejected", Duration::from_secs(3));
    std::thread::sleep(Duration::from_millis(1000));
    stop.store(true, Ordering::SeqCst);
    let results: Vec<(u16, String)> = threads
        .into_iter()
        .flat_map(|t| t.join().expect("client"))
        .collect();
    let errors = results.iter().filter(|(c, _)| *c != 200).count();

    // attempts on the dead backend after the kill, from the access log (written in batches)
    let log_path = dir.path().join("access.jsonl");
    let logged = || std::fs::read_to_string(&log_path).map_or(0, |t| t.lines().count());
    assert!(wait_until(Duration::from_secs(3), || logged() >= results.len()));
    let access = std::fs::read_to_string(&log_path).unwrap_or_default();
    let failed_on_dead = access
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter_map(|v| v["failed_backends"].as_array().cloned())
        .flatten()
        .filter(|a| *a == dead.to_string())
        .count();
    println!(
        "scenario: backend killed -> ejected in {ejected:?}; client errors: {errors} of {}; failed attempts on the dead backend: {failed_on_dead}",
        results.len()
    );
    let ejected = ejected.expect("the dead backend was never ejected");
    assert!(
        ejected <= Duration::from_secs(1),
        "ejected after {ejected:?}"
    );
    assert!(results.len() > 50, "load ran: {}", results.len());
    assert_eq!(
        errors,
        0,
        "client errors: {:?}",
        results
            .iter()
            .filter(|(c, _)| *c != 200)
            .take(5)
            .collect::<Vec<_>>()
    );
    assert!(
        failed_on_dead <= 3,
        "{failed_on_dead} attempts on the dead backend (consecutive_failures = 3)"
    );
    let st = backend_status(&s, dead);
    assert_eq!(st["reason"], "passive");
    assert_eq!(st["healthy"], false);
    assert!(
        s.metric(&format!(
            r#"sluice_backend_ejections_total{{backend="{dead}",pool="p",reason="passive"}}"#
        )) >= Some(1.0)
    );
    assert_eq!(
        s.metric(&format!(
            r#"sluice_backend_healthy{{backend="{dead}",pool="p"}}"#
        )),
        Some(0.0)
    );

    // restarting it brings it back once its ejection (2 s) is over and a probe succeeds
    let first_until = st["ejected_until"]
        .as_str()
        .expect("ejected_until")
        .to_string();
    b2 = Backend::start_on(dir.path(), "b2", dead, None);
    assert!(
        wait_state(&s, dead, "healthy", Duration::from_secs(5)).is_some(),
        "{}",
        s.status()
    );
    assert!(
        wait_until(Duration::from_secs(3), || fetch(listen).1 == "b2"),
        "b2 gets traffic again"
    );

    // a second failure soon after doubles the ejection time
    b2.proc.signal(libc::SIGKILL);
    let t = SystemTime::now();
    assert!(wait_until(Duration::from_secs(3), || {
        fetch(listen);
        state(&s, dead) == "ejected"
    }));
    let until = backend_status(&s, dead)["ejected_until"]
        .as_str()
        .expect("until")
        .to_string();
    let until = humantime::parse_rfc3339(&until).expect("rfc3339");
    let second = until.duration_since(t).unwrap_or_default();
    assert!(
        second >= Duration::from_millis(3500),
        "second ejection lasts {second:?} (first until {first_until})"
    );
    assert!(
        second <= Duration::from_millis(4500),
        "second ejection lasts {second:?}"
    );
}

#[test]
fn failing_health_checks_take_a_backend_out_and_good_ones_bring_it_back() {
    let dir = tempdir();
    let b1 = Backend::start(dir.path(), "b1");
    let b2 = Backend::start(dir.path(), "b2");
    let listen = free_addr();
    let s = Sluice::start(dir.path(), &config(listen, &[b1.addr, b2.addr], ""));
    assert!(wait_state(&s, b1.addr, "healthy", Duration::from_secs(3)).is_some());
    // /healthz answers 500 while b1 still serves traffic
    assert_eq!(
        http_request(b1.addr, "POST", "/_demo/health-fail", &[]).map(|r| r.0),
        Some(200)
    );
    let out = wait_state(&s, b1.addr, "unhealthy", Duration::from_secs(3)).expect("taken out");
    // interval x unhealthy_after + timeout, plus jitter (10%) and the status polling
    println!("failing /healthz -> out of rotation: {out:?}");
    assert!(
        out <= Duration::from_millis(400 + 100 + 250),
        "took {out:?}"
    );
    assert_eq!(backend_status(&s, b1.addr)["reason"], "active");
    for _ in 0..10 {
        assert_eq!(fetch(listen).1, "b2");
    }
    assert_eq!(
        http_request(b1.addr, "POST", "/_demo/recover", &[]).map(|r| r.0),
        Some(200)
    );
    let back = wait_state(&s, b1.addr, "healthy", Duration::from_secs(3)).expect("back");
    println!("recovered /healthz -> back after {back:?} (healthy_after = 2)");
    assert!(
        back >= Duration::from_millis(150),
        "needs two good probes, took {back:?}"
    );
    let seen: Vec<String> = (0..10).map(|_| fetch(listen).1).collect();
    assert!(seen.iter().any(|b| b == "b1"), "{seen:?}");
    assert_eq!(
        s.metric(&format!(
            r#"sluice_backend_ejections_total{{backend="{}",pool="p",reason="active"}}"#,
            b1.addr
        )),
        Some(1.0)
    );
}

#[test]
fn a_hung_backend_is_timed_out_without_delaying_the_others() {
    let dir = tempdir();
    // accepts connections and never answers
    let hung = TcpListener::bind("127.0.0.1:0").expect("bind");
    let hung_addr = hung.local_addr().expect("addr");
    let held: Arc<Mutex<Vec<std::net::TcpStream>>> = Arc::default();
    {
        let held = held.clone();
        std::thread::spawn(move || {
            for c in hung.incoming().flatten() {
                held.lock().expect("lock").push(c);
            }
        });
    }
    let b1 = Backend::start(dir.path(), "b1");
    let b2 = Backend::start(dir.path(), "b2");
    let listen = free_addr();
    let s = Sluice::start(
        dir.path(),
        &config(listen, &[hung_addr, b1.addr, b2.addr], ""),
    );
    let t = Instant::now();
    assert!(wait_state(&s, b1.addr, "healthy", Duration::from_secs(3)).is_some());
    // b2 starts failing its checks: detected on its own schedule, the hung probes do not hold it up
    assert_eq!(
        http_request(b2.addr, "POST", "/_demo/health-fail", &[]).map(|r| r.0),
        Some(200)
    );
    let b2_out = wait_state(&s, b2.addr, "unhealthy", Duration::from_secs(3)).expect("b2 out");
    assert!(b2_out <= Duration::from_millis(750), "b2 took {b2_out:?}");
    assert!(wait_state(&s, hung_addr, "unhealthy", Duration::from_secs(3)).is_some());
    println!("hung backend out of rotation {:?} after start", t.elapsed());
    assert!(t.elapsed() <= Duration::from_secs(2));
    assert_eq!(state(&s, b1.addr), "healthy");
    for _ in 0..10 {
        assert_eq!(fetch(listen).1, "b1");
    }
}

#[test]
fn all_down_answers_503_with_retry_after_and_recovers() {
    let dir = tempdir();
    let mut b1 = Backend::start(dir.path(), "b1");
    let mut b2 = Backend::start(dir.path(), "b2");
    let listen = free_addr();
    let s = Sluice::start(dir.path(), &config(listen, &[b1.addr, b2.addr], ""));
    b1.proc.signal(libc::SIGKILL);
    b2.proc.signal(libc::SIGKILL);
    let _ = b1.proc.wait_exit(Duration::from_secs(2));
    let _ = b2.proc.wait_exit(Duration::from_secs(2));
    // the request that finds both dead is a 502; after that, the outage is known: 503 at once
    let (code, _, _) = fetch(listen);
    assert!(code == 502 || code == 503, "{code}");
    assert!(wait_until(Duration::from_secs(3), || fetch(listen).0 == 503));
    let t = Instant::now();
    let (code, body, retry_after) = fetch(listen);
    let took = t.elapsed();
    assert_eq!(code, 503);
    assert_eq!(body, "no healthy backend");
    let secs: u64 = retry_after
        .expect("Retry-After")
        .parse()
        .expect("whole seconds");
    assert!((1..=2).contains(&secs), "Retry-After: {secs}");
    assert!(took < Duration::from_millis(500), "503 took {took:?}");
    // one comes back: traffic resumes
    let _b1 = Backend::start_on(dir.path(), "b1", b1.addr, None);
    assert!(
        wait_until(Duration::from_secs(6), || fetch(listen).1 == "b1"),
        "{}",
        s.status()
    );
}

#[test]
fn the_floor_keeps_backends_in_rotation() {
    let dir = tempdir();
    let b1 = Backend::start(dir.path(), "b1");
    let b2 = Backend::start(dir.path(), "b2");
    let listen = free_addr();
    let s = Sluice::start(
        dir.path(),
        &config(listen, &[b1.addr, b2.addr], "min_healthy = 0.5"),
    );
    for b in [&b1, &b2] {
        assert_eq!(
            http_request(b.addr, "POST", "/_demo/health-fail", &[]).map(|r| r.0),
            Some(200)
        );
    }
    assert!(wait_state(&s, b1.addr, "unhealthy", Duration::from_secs(3)).is_some());
    assert!(wait_state(&s, b2.addr, "unhealthy", Duration::from_secs(3)).is_some());
    // both fail their checks but half the pool stays in rotation: no self-inflicted outage
    let mut seen = HashMap::new();
    for _ in 0..10 {
        let (code, body, _) = fetch(listen);
        assert_eq!(code, 200);
        *seen.entry(body).or_insert(0) += 1;
    }
    assert_eq!(
        seen.len(),
        1,
        "one backend kept (the least recently failed): {seen:?}"
    );
}

#[test]
fn health_state_survives_a_reload() {
    let dir = tempdir();
    let b1 = Backend::start(dir.path(), "b1");
    let b2 = Backend::start(dir.path(), "b2");
    let listen = free_addr();
    let s = Sluice::start(dir.path(), &config(listen, &[b1.addr, b2.addr], ""));
    // slow the checks down so a reset state would show: unhealthy needs 2 failures 5 s apart
    let text = std::fs::read_to_string(&s.config).expect("read");
    assert_eq!(
        http_request(b1.addr, "POST", "/_demo/health-fail", &[]).map(|r| r.0),
        Some(200)
    );
    assert!(wait_state(&s, b1.addr, "unhealthy", Duration::from_secs(3)).is_some());
    let slow = text
        .replace("interval = \"200ms\"", "interval = \"5s\"")
        .replace(
            "[[route]]",
            "[[route]]\nname = \"extra\"\nhosts = [\"extra.test\"]\nblue = [\"p\"]\n[[route]]",
        );
    write_by_rename(&s.config, &slow);
    assert!(wait_until(Duration::from_secs(5), || s.status()["config"]
        ["generation"]
        == 2));
    assert_eq!(
        state(&s, b1.addr),
        "unhealthy",
        "a reload must not reset health"
    );
    assert_eq!(state(&s, b2.addr), "healthy");
    for _ in 0..6 {
        assert_eq!(fetch(listen).1, "b2");
    }
}
