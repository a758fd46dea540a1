//! Graceful shutdown under load: SIGTERM flips /readyz at once, listeners keep serving for
//! drain_delay, a request in flight completes, and the process exits 0 within
//! drain_delay + grace_period.

mod common;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::*;

/// One plain listener on `listen` and one pool of `backend` under a catch-all route, with the
/// `[server]` keys `server`.
fn config(server: &str, listen: std::net::SocketAddr, backend: std::net::SocketAddr) -> String {
    format!(
        r#"
[server]
{server}
[admin]
listen = "{{admin}}"
[[listener]]
listen = "{listen}"
[[pool]]
name = "p"
backends = ["{backend}"]
[[route]]
name = "all"
hosts = ["*"]
blue = ["p"]
"#
    )
}

#[test]
fn sigterm_drains_then_finishes_in_flight_requests_and_exits_zero() {
    let dir = tempdir();
    let backend = Backend::start(dir.path(), "b1");
    let listen = free_addr();
    let config = config(
        "threads = 2\ngrace_period = \"6s\"\ndrain_delay = \"1s\"",
        listen,
        backend.addr,
    );
    let mut s = Sluice::start(dir.path(), &config);
    let rt = runtime();

    // load: 4 clients looping; each result is kept with the time it started
    let stop = Arc::new(AtomicBool::new(false));
    let results: Arc<Mutex<Vec<(Instant, bool)>>> = Arc::default();
    let mut load = Vec::new();
    for _ in 0..4 {
        let (stop, results) = (stop.clone(), results.clone());
        load.push(rt.spawn(async move {
            let c = client(None);
            while !stop.load(Ordering::SeqCst) {
                let t = Instant::now();
                let ok = matches!(
                    c.get(format!("http://{listen}/")).send().await,
                    Ok(r) if r.status() == 200
                );
                results.lock().expect("lock").push((t, ok));
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        }));
    }
    // a request that takes 2 s, in flight when SIGTERM arrives
    let slow = rt.spawn(async move {
        client(None)
            .get(format!("http://{listen}/_demo/sleep?ms=2000"))
            .send()
            .await
            .map(|r| r.status().as_u16())
    });
    std::thread::sleep(Duration::from_millis(300));
    let sent = Instant::now();
    s.proc.signal(libc::SIGTERM);

    // /readyz answers 503 at once (well inside the 1 s drain delay)
    let mut flipped = None;
    while sent.elapsed() < Duration::from_millis(800) {
        if s.admin_get("/readyz").map(|r| r.0) == Some(503) {
            flipped = Some(sent.elapsed());
            break;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    assert!(
        flipped.is_some(),
        "/readyz did not flip to 503 during the drain delay"
    );

    let slow_status = rt.block_on(slow).expect("join");
    assert_eq!(
        slow_status.ok(),
        Some(200),
        "the in-flight request must complete"
    );

    let code = s
        .proc
        .wait_exit(Duration::from_secs(7) + Duration::from_millis(500));
    let elapsed = sent.elapsed();
    assert_eq!(code, Some(0), "exit code; stderr: {}", s.proc.stderr());
    assert!(elapsed < Duration::from_secs(7), "exited after {elapsed:?}");

    stop.store(true, Ordering::SeqCst);
    for l in load {
        let _ = rt.block_on(l);
    }
    // every request started before the drain delay ran out was served
    let results = results.lock().expect("lock");
    let during_drain: Vec<_> = results
        .iter()
        .filter(|(t, _)| *t < sent + Duration::from_millis(900))
        .collect();
    assert!(during_drain.len() > 20, "load ran: {}", during_drain.len());
    let failed = during_drain.iter().filter(|(_, ok)| !ok).count();
    assert_eq!(
        failed,
        0,
        "{failed} of {} requests failed before the drain delay ended",
        during_drain.len()
    );
    assert!(
        results
            .iter()
            .any(|(t, ok)| *t > sent && *t < sent + Duration::from_millis(900) && *ok),
        "listeners must keep serving during the drain delay"
    );
}

/// A keep-alive connection waiting for its next request is closed when the drain delay ends,
/// while a request in flight still runs: idle clients do not hold the process until it exits.
/// One connection has been quiet for a while, the other made a request just before SIGTERM
/// (so it is still in its first moments of waiting when the shutdown begins).
#[test]
fn idle_keep_alive_connections_are_closed_when_the_drain_ends() {
    use std::io::{Read, Write};
    use std::net::TcpStream;

    let dir = tempdir();
    let backend = Backend::start(dir.path(), "b1");
    let listen = free_addr();
    let config = config(
        "threads = 1\ngrace_period = \"8s\"\ndrain_delay = \"0s\"",
        listen,
        backend.addr,
    );
    let mut s = Sluice::start(dir.path(), &config);
    // one request and its whole answer (common's reader: status, head, content-length body)
    let request = |c: &mut TcpStream| {
        c.write_all(b"GET / HTTP/1.1\r\nhost: x\r\n\r\n")
            .expect("write");
        let (code, head, body) = read_response(c).expect("an answer before the close");
        assert_eq!((code, body.as_slice()), (200, &b"b1\n"[..]), "{head}");
    };
    let mut quiet = TcpStream::connect(listen).expect("connect");
    request(&mut quiet);
    request(&mut quiet);
    let mut busy = TcpStream::connect(listen).expect("connect");
    request(&mut busy);
    let slow = std::thread::spawn(move || {
        let mut c = TcpStream::connect(listen).expect("connect");
        c.write_all(b"GET /_demo/sleep?ms=5000 HTTP/1.1\r\nhost: x\r\n\r\n")
            .expect("write");
        read_response(&mut c)
    });
    // the slow request is in flight before the shutdown begins
    assert!(
        wait_until(Duration::from_secs(5), || s.status()["inflight"].as_u64()
            == Some(1)),
        "the slow request did not arrive"
    );
    request(&mut busy);
    let sent = Instant::now();
    s.proc.signal(libc::SIGTERM);

    for (name, c) in [("quiet", &mut quiet), ("busy", &mut busy)] {
        c.set_read_timeout(Some(Duration::from_secs(3)))
            .expect("timeout");
        let mut buf = [0u8; 64];
        let n = c.read(&mut buf);
        assert!(
            matches!(n, Ok(0))
                || n.as_ref()
                    .is_err_and(|e| e.kind() == std::io::ErrorKind::ConnectionReset),
            "the {name} connection was not closed: {n:?} after {:?}",
            sent.elapsed()
        );
    }
    assert!(
        sent.elapsed() < Duration::from_secs(3),
        "idle connections closed only after {:?}",
        sent.elapsed()
    );
    assert_eq!(s.proc.child.try_wait().ok().flatten(), None, "exited early");
    // the request in flight completes, then the process exits
    let slow = slow.join().expect("join");
    assert_eq!(slow.map(|r| r.0), Some(200), "the request in flight");
    assert_eq!(s.proc.wait_exit(Duration::from_secs(10)), Some(0));
}
