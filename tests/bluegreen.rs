//! Blue-green traffic end to end: weights, sticky colors, the admin API's auth, errors and audit
//! log, persistence across restarts, gradual shifts and automatic rollback. Real sluice, real
//! demo backends (blue-1, blue-2, green-1, green-2), real sockets.

mod common;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::*;
use serde_json::Value;
use sha2::{Digest, Sha256};

const TOKEN: &str = "tok-5f1c9e0a7d2b44e1";

struct Setup {
    dir: tempfile::TempDir,
    blue: Vec<Backend>,
    green: Vec<Backend>,
    sluice: Sluice,
    listen: SocketAddr,
}

fn config(s: &Setup, weights: (u8, u8), sticky: &str) -> String {
    config_for(
        s.listen,
        &s.blue.iter().map(|b| b.addr).collect::<Vec<_>>(),
        &s.green.iter().map(|b| b.addr).collect::<Vec<_>>(),
        weights,
        sticky,
    )
}

fn config_for(
    listen: SocketAddr,
    blue: &[SocketAddr],
    green: &[SocketAddr],
    weights: (u8, u8),
    sticky: &str,
) -> String {
    format!(
        r#"[server]
threads = 2
grace_period = "1s"
drain_delay = "0s"

[admin]
listen = "{{admin}}"
token_file = "admin.token"
state_file = "state/runtime.json"
audit_log = "state/audit.jsonl"

[[listener]]
listen = "{listen}"

[[pool]]
name = "blue"
backends = [{blue}]
health = {{ path = "/healthz", interval = "200ms", timeout = "200ms", unhealthy_after = 2, healthy_after = 1 }}

[[pool]]
name = "green"
backends = [{green}]
health = {{ path = "/healthz", interval = "200ms", timeout = "200ms", unhealthy_after = 2, healthy_after = 1 }}

[[route]]
name = "shop"
hosts = ["*"]
blue = ["blue"]
green = ["green"]
weights = {{ blue = {}, green = {} }}
sticky = "{sticky}"
override_header = "x-sluice-color"

[route.rollback]
max_error_rate = 0.05
window = "10s"
min_requests = 20
"#,
        weights.0,
        weights.1,
        blue = toml_addrs(blue),
        green = toml_addrs(green),
    )
}

fn start(weights: (u8, u8), sticky: &str) -> Setup {
    let dir = tempdir();
    std::fs::write(
        dir.path().join("admin.token"),
        format!("other-token\n{TOKEN}\n"),
    )
    .expect("token file");
    let blue: Vec<Backend> = (1..=2)
        .map(|i| Backend::start(dir.path(), &format!("blue-{i}")))
        .collect();
    let green: Vec<Backend> = (1..=2)
        .map(|i| Backend::start(dir.path(), &format!("green-{i}")))
        .collect();
    let listen = free_addr();
    let text = config_for(
        listen,
        &blue.iter().map(|b| b.addr).collect::<Vec<_>>(),
        &green.iter().map(|b| b.addr).collect::<Vec<_>>(),
        weights,
        sticky,
    );
    let sluice = Sluice::start(dir.path(), &text);
    assert!(wait_for_port(listen, Duration::from_secs(10)));
    Setup {
        dir,
        blue,
        green,
        sluice,
        listen,
    }
}

impl Setup {
    /// An admin call: (status, JSON body).
    fn admin(&self, method: &str, path: &str, token: Option<&str>, body: &[u8]) -> (u16, Value) {
        let auth = token.map(|t| format!("Bearer {t}"));
        let mut headers = vec![("content-type", "application/json")];
        if let Some(a) = &auth {
            headers.push(("authorization", a.as_str()));
        }
        let r = request_with_body(self.sluice.admin, method, path, &headers, body)
            .expect("admin answered");
        let v = serde_json::from_str(&r.body).unwrap_or(Value::Null);
        (r.code, v)
    }

    fn put_weights(&self, blue: u8, green: u8) -> Value {
        let (code, v) = self.admin(
            "PUT",
            "/routes/shop/weights",
            Some(TOKEN),
            format!(r#"{{"blue": {blue}, "green": {green}}}"#).as_bytes(),
        );
        assert_eq!(code, 200, "{v}");
        v
    }

    /// Starts a shift (202 expected); returns the route.
    fn shift(&self, to: &str, step: u8, every: &str) -> Value {
        let body = format!(r#"{{"to": "{to}", "step": {step}, "every": "{every}"}}"#);
        let (code, v) = self.admin("POST", "/routes/shop/shift", Some(TOKEN), body.as_bytes());
        assert_eq!(code, 202, "{v}");
        v
    }

    /// Waits (up to 10 s) until the route's shift is in `state`.
    fn wait_shift(&self, state: &str) {
        assert!(
            wait_until(Duration::from_secs(10), || self.route()["shift"]["state"]
                == state),
            "shift never {state}: {}",
            self.route()
        );
    }

    fn route(&self) -> Value {
        let (code, body) = self.sluice.admin_get("/routes/shop").expect("route");
        assert_eq!(code, 200, "{body}");
        serde_json::from_str(&body).expect("route json")
    }

    fn audit(&self) -> Vec<Value> {
        std::fs::read_to_string(self.dir.path().join("state/audit.jsonl"))
            .unwrap_or_default()
            .lines()
            .map(|l| serde_json::from_str(l).expect("audit line is JSON"))
            .collect()
    }

    fn state_file(&self) -> PathBuf {
        self.dir.path().join("state/runtime.json")
    }

    fn url(&self) -> String {
        format!("http://{}/", self.listen)
    }

    /// Restarts sluice on the same config (the old process must be gone).
    fn restart(&mut self) {
        let admin = self.sluice.admin;
        let config = self.sluice.config.clone();
        let _ = self.sluice.proc.child.kill();
        let _ = self.sluice.proc.child.wait();
        self.sluice = Sluice::start_file(self.dir.path(), &config, admin);
    }
}

/// A GET through sluice: (status, color of the backend that answered, Set-Cookie).
async fn get(
    client: &reqwest::Client,
    url: &str,
    headers: &[(&str, &str)],
) -> (u16, String, Option<String>) {
    let mut req = client.get(url);
    for (k, v) in headers {
        req = req.header(*k, *v);
    }
    let resp = req.send().await.expect("request through sluice");
    let status = resp.status().as_u16();
    let backend = resp
        .headers()
        .get("x-backend")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .to_string();
    let cookie = resp
        .headers()
        .get("set-cookie")
        .and_then(|v| v.to_str().ok())
        .map(String::from);
    let _ = resp.bytes().await;
    let color = backend.split('-').next().unwrap_or("").to_string();
    (status, color, cookie)
}

fn pooled_client() -> reqwest::Client {
    reqwest::Client::builder()
        .timeout(Duration::from_secs(10))
        .build()
        .expect("client")
}

/// `n` requests over `tasks` keep-alive clients: how many went to each color (all must be 200).
fn split(s: &Setup, n: usize, tasks: usize) -> HashMap<String, usize> {
    let rt = runtime();
    let url = s.url();
    rt.block_on(async {
        let mut handles = Vec::new();
        for _ in 0..tasks {
            let url = url.clone();
            handles.push(tokio::spawn(async move {
                let client = pooled_client();
                let mut seen = HashMap::new();
                for _ in 0..n / tasks {
                    let (code, color, _) = get(&client, &url, &[]).await;
                    assert_eq!(code, 200, "request failed");
                    *seen.entry(color).or_insert(0) += 1;
                }
                seen
            }));
        }
        let mut total = HashMap::new();
        for h in handles {
            for (k, v) in h.await.expect("task") {
                *total.entry(k).or_insert(0) += v;
            }
        }
        total
    })
}

#[test]
fn weights_split_requests_without_stickiness() {
    let s = start((70, 30), "none");
    let seen = split(&s, 2000, 4);
    let green = seen.get("green").copied().unwrap_or(0);
    let blue = seen.get("blue").copied().unwrap_or(0);
    assert_eq!(green + blue, 2000, "{seen:?}");
    eprintln!("70/30, sticky none: green served {green} of 2000");
    // 30% ± 3 points
    assert!((540..=660).contains(&green), "green got {green} of 2000");
    assert_eq!(
        s.sluice
            .metric(r#"sluice_route_weight{color="green",route="shop"}"#),
        Some(30.0)
    );
    let served = |color: &str| {
        ["2xx"]
            .iter()
            .filter_map(|c| {
                s.sluice.metric(&format!(
                    r#"sluice_requests_total{{code="{c}",color="{color}",pool="{color}",route="shop"}}"#
                ))
            })
            .sum::<f64>()
    };
    // a request is counted in the logging hook, just after its answer went out: the client can
    // hold the last answer before that count is made, so wait for it (then compare exactly)
    wait_until(Duration::from_secs(5), || {
        served("green") as usize == green && served("blue") as usize == blue
    });
    assert_eq!(served("green") as usize, green);
    assert_eq!(served("blue") as usize, blue);
    // the override header wins over the weights
    let rt = runtime();
    rt.block_on(async {
        let client = pooled_client();
        for _ in 0..20 {
            let (code, color, _) = get(&client, &s.url(), &[("x-sluice-color", "green")]).await;
            assert_eq!((code, color.as_str()), (200, "green"));
        }
    });
}

#[test]
fn sticky_cookie_keeps_clients_and_raising_green_only_moves_blue_clients() {
    let s = start((100, 0), "cookie");
    s.put_weights(90, 10);
    let rt = runtime();
    let url = s.url();
    rt.block_on(async {
        let client = pooled_client();
        // 300 new clients, each with the id sluice hands out
        let mut clients = Vec::new();
        for _ in 0..300 {
            let (code, color, cookie) = get(&client, &url, &[]).await;
            assert_eq!(code, 200);
            let cookie = cookie.expect("a new client gets an id cookie");
            assert!(
                cookie.contains("HttpOnly") && cookie.contains("Max-Age="),
                "{cookie}"
            );
            let id = cookie.split(';').next().expect("cookie pair").to_string();
            clients.push((id, color));
        }
        let green_before = clients.iter().filter(|(_, c)| c == "green").count();
        assert!(
            (10..=60).contains(&green_before),
            "{green_before} of 300 green at 10%"
        );
        // a client keeps its color across 50 requests (one of each color)
        for want in ["green", "blue"] {
            let (id, _) = clients
                .iter()
                .find(|(_, c)| c == want)
                .expect("a client of each color");
            for _ in 0..50 {
                let (code, color, cookie) = get(&client, &url, &[("cookie", id)]).await;
                assert_eq!((code, color.as_str()), (200, want));
                assert!(cookie.is_none(), "a known client gets no new id");
            }
        }
        s.put_weights(50, 50);
        let mut moved = 0;
        for (id, before) in &clients {
            let (code, after, _) = get(&client, &url, &[("cookie", id)]).await;
            assert_eq!(code, 200);
            if before == "green" {
                assert_eq!(after, "green", "a green client went back to blue");
            } else if after == "green" {
                moved += 1;
            }
        }
        let green_after = green_before + moved;
        eprintln!(
            "cookie clients: {green_before} of 300 green at 10%, {green_after} at 50% ({moved} moved blue -> green, none back)"
        );
        assert!(moved > 0, "raising green moved no client");
        assert!(
            (105..=195).contains(&green_after),
            "{green_after} of 300 green at 50%"
        );
    });
}

#[test]
fn admin_calls_are_authenticated_validated_and_audited() {
    let s = start((100, 0), "none");
    let weights = "/routes/shop/weights";
    let good = br#"{"blue": 80, "green": 20}"#;
    let calls = std::cell::Cell::new(0);
    let call = |method: &str, path: &str, token: Option<&str>, body: &[u8]| {
        calls.set(calls.get() + 1);
        s.admin(method, path, token, body)
    };
    assert_eq!(call("PUT", weights, None, good).0, 401);
    assert_eq!(call("PUT", weights, Some("wrong-token"), good).0, 403);
    for (body, code, why) in [
        (&br#"{"blue": 80, "green": 30}"#[..], 400, "sum to 100"),
        (br#"{"blue": 110, "green": -10}"#, 400, "whole number"),
        (br#"{"blue": 80.5, "green": 19.5}"#, 400, "whole number"),
        (
            br#"{"blue": 80, "purple": 20}"#,
            400,
            "unknown color \"purple\"",
        ),
        (b"blue=80&green=20", 400, "not JSON"),
    ] {
        let (c, v) = call("PUT", weights, Some(TOKEN), body);
        assert_eq!(c, code, "{}", String::from_utf8_lossy(body));
        let e = v["error"].as_str().unwrap_or("");
        assert!(e.contains(why), "{e}");
    }
    let big = vec![b' '; 1 << 20];
    let (c, v) = call("PUT", weights, Some(TOKEN), &big);
    assert_eq!(c, 413, "{v}");
    assert!(v["error"].as_str().unwrap_or("").contains("64 KiB"), "{v}");
    let (c, v) = call("PUT", "/routes/nope/weights", Some(TOKEN), good);
    assert_eq!((c, v["error"].as_str().is_some()), (404, true));
    let (c, _) = call("POST", weights, Some(TOKEN), good);
    assert_eq!(c, 405);
    // the scheme is case-insensitive (RFC 9110 §11.1)
    calls.set(calls.get() + 1);
    let lower = format!("bearer {TOKEN}");
    let r = request_with_body(
        s.sluice.admin,
        "PUT",
        weights,
        &[("authorization", &lower)],
        good,
    )
    .expect("admin answered");
    assert_eq!(r.code, 200, "{}", r.body);
    // a good call, then shift conflicts
    let (c, v) = call("PUT", weights, Some(TOKEN), good);
    assert_eq!(c, 200, "{v}");
    assert_eq!(v["weights"]["green"], 20);
    assert_eq!(v["source"], "admin");
    let shift = br#"{"to": "green", "step": 10, "every": "1h"}"#;
    let (c, v) = call("POST", "/routes/shop/shift", Some(TOKEN), shift);
    assert_eq!(c, 202, "{v}");
    assert_eq!(
        (v["weights"]["green"].as_u64(), v["shift"]["state"].as_str()),
        (Some(30), Some("running"))
    );
    assert_eq!(
        call("POST", "/routes/shop/shift", Some(TOKEN), shift).0,
        409
    );
    let (c, v) = call("DELETE", "/routes/shop/shift", Some(TOKEN), b"");
    assert_eq!((c, v["shift"]["state"].as_str()), (200, Some("stopped")));
    let (c, _) = call(
        "POST",
        "/routes/shop/shift",
        Some(TOKEN),
        br#"{"to": "teal", "step": 10, "every": "1s"}"#,
    );
    assert_eq!(c, 400);
    let (c, v) = call("POST", "/reload", Some(TOKEN), b"");
    assert_eq!((c, v["generation"].as_u64()), (200, Some(2)));

    // every call is in the audit log, in order, with its status; the token only as a fingerprint
    let audit = s.audit();
    let statuses: Vec<u64> = audit.iter().filter_map(|l| l["status"].as_u64()).collect();
    assert_eq!(
        statuses,
        vec![401, 403, 400, 400, 400, 400, 400, 413, 404, 405, 200, 200, 202, 409, 200, 400, 200],
        "{audit:#?}"
    );
    assert_eq!(audit.len(), calls.get());
    let fp = &format!("{:x}", Sha256::digest(TOKEN.as_bytes()))[..8];
    assert_eq!(audit[2]["token"], fp);
    assert_eq!(audit[0]["token"], Value::Null);
    assert_eq!(audit[2]["path"], weights);
    assert_eq!(audit[2]["method"], "PUT");
    assert!(audit[2]["remote"]
        .as_str()
        .unwrap_or("")
        .starts_with("127.0.0.1:"));
    assert_eq!(audit[10]["before"]["weights"]["green"], 0);
    assert_eq!(audit[10]["after"]["weights"]["green"], 20);
    assert!(audit.iter().all(|l| l["ts"].as_str().is_some()));

    // ten failed attempts within a minute lock the address out, even with the right token
    // (2 failures so far: the 401 and the 403; 8 more)
    for _ in 0..8 {
        assert_eq!(call("PUT", weights, Some("guess"), good).0, 403);
    }
    let (c, v) = call("PUT", weights, Some(TOKEN), good);
    assert_eq!(c, 429, "{v}");
    assert_eq!(
        s.audit().last().map(|l| l["status"].clone()),
        Some(Value::from(429))
    );
    // reading stays open
    assert_eq!(s.sluice.admin_get("/routes/shop").map(|r| r.0), Some(200));

    // the token never appears in any log
    let logs = [
        s.sluice.stdout(),
        s.sluice.proc.stderr(),
        std::fs::read_to_string(s.dir.path().join("state/audit.jsonl")).unwrap_or_default(),
        std::fs::read_to_string(s.state_file()).unwrap_or_default(),
    ];
    for l in &logs {
        assert!(!l.contains(TOKEN), "token leaked: {l}");
    }
}

#[test]
fn admin_weights_survive_restarts_and_reloads_until_the_file_changes() {
    let mut s = start((100, 0), "none");
    s.put_weights(70, 30);
    s.sluice.proc.signal(libc::SIGKILL);
    s.restart();
    let r = s.route();
    assert_eq!(
        (r["weights"]["green"].as_u64(), r["source"].as_str()),
        (Some(30), Some("admin"))
    );
    let seen = split(&s, 400, 2);
    let green = seen.get("green").copied().unwrap_or(0);
    assert!((80..=160).contains(&green), "{seen:?}");
    // a reload of the unchanged config keeps them
    let (c, _) = s.admin("POST", "/reload", Some(TOKEN), b"");
    assert_eq!(c, 200);
    assert_eq!(s.route()["source"], "admin");
    // a running shift survives a kill too
    s.shift("green", 10, "1h");
    s.sluice.proc.signal(libc::SIGKILL);
    s.restart();
    let r = s.route();
    assert_eq!(r["weights"]["green"], 40);
    assert_eq!(r["shift"]["state"], "running");
    assert_eq!(r["source"], "admin");
    // editing this route's weights in the file wins
    let text = config(&s, (80, 20), "none").replace("{admin}", &s.sluice.admin.to_string());
    write_by_rename(&s.sluice.config, &text);
    assert!(
        wait_until(Duration::from_secs(5), || s.route()["source"] == "config"),
        "{}",
        s.route()
    );
    let r = s.route();
    assert_eq!(r["weights"]["green"], 20);
    assert_eq!(r["shift"]["state"], "stopped");
    s.restart();
    let r = s.route();
    assert_eq!(
        (r["weights"]["green"].as_u64(), r["source"].as_str()),
        (Some(20), Some("config"))
    );
}

#[test]
fn a_corrupt_state_file_is_reported_and_kept_aside() {
    let dir = tempdir();
    std::fs::write(dir.path().join("admin.token"), format!("{TOKEN}\n")).expect("token");
    std::fs::create_dir_all(dir.path().join("state")).expect("dir");
    std::fs::write(
        dir.path().join("state/runtime.json"),
        "{\"version\": 1, \"rou",
    )
    .expect("state");
    let b = Backend::start(dir.path(), "blue-1");
    let g = Backend::start(dir.path(), "green-1");
    let listen = free_addr();
    let sluice = Sluice::start(
        dir.path(),
        &config_for(listen, &[b.addr], &[g.addr], (90, 10), "none"),
    );
    let status = sluice.status();
    let err = status["config"]["state_file_error"].as_str().unwrap_or("");
    assert!(err.contains("runtime.json"), "{status}");
    let kept = std::fs::read_dir(dir.path().join("state"))
        .expect("state dir")
        .filter_map(|e| e.ok())
        .find(|e| e.file_name().to_string_lossy().contains("corrupt"))
        .expect("the corrupt file is kept");
    assert_eq!(
        std::fs::read_to_string(kept.path()).expect("kept"),
        "{\"version\": 1, \"rou"
    );
    let (code, body) = http_get(sluice.admin, "/routes/shop").expect("route");
    assert_eq!(code, 200);
    assert!(body.contains("\"green\":10"), "{body}");
    assert_eq!(http_get(listen, "/").map(|r| r.0), Some(200));
}

#[test]
fn a_shift_completes_and_one_towards_a_failing_green_is_rolled_back() {
    let s = start((100, 0), "none");
    let v = s.shift("green", 25, "1s");
    assert_eq!(v["weights"]["green"], 25);
    s.wait_shift("done");
    let r = s.route();
    assert_eq!(r["weights"]["green"], 100);
    assert_eq!(
        s.sluice
            .metric(r#"sluice_route_weight{color="green",route="shop"}"#),
        Some(100.0)
    );
    let seen = split(&s, 40, 2);
    assert_eq!(seen.get("green"), Some(&40), "{seen:?}");

    // green now answers 500 to everything but its health check
    s.put_weights(100, 0);
    for g in &s.green {
        assert_eq!(
            http_request(g.addr, "POST", "/_demo/errors?status=500", &[]).map(|r| r.0),
            Some(200)
        );
    }
    let stop = Arc::new(AtomicBool::new(false));
    let green_errors = Arc::new(AtomicU64::new(0));
    let tripped_at: Arc<Mutex<Option<Instant>>> = Arc::new(Mutex::new(None));
    let load = {
        let (stop, green_errors, tripped_at, url) = (
            stop.clone(),
            green_errors.clone(),
            tripped_at.clone(),
            s.url(),
        );
        std::thread::spawn(move || {
            runtime().block_on(async {
                let client = pooled_client();
                while !stop.load(Ordering::SeqCst) {
                    let (code, color, _) = get(&client, &url, &[]).await;
                    if color == "green" && code == 500 {
                        // every green answer fails: the rule (20 requests, > 5%) trips with
                        // the 20th
                        if green_errors.fetch_add(1, Ordering::SeqCst) + 1 == 20 {
                            *tripped_at.lock().expect("lock") = Some(Instant::now());
                        }
                    } else {
                        assert_eq!(code, 200, "{color}");
                    }
                }
            })
        })
    };
    s.shift("green", 25, "1s");
    s.wait_shift("rolled_back");
    let rolled_back_at = Instant::now();
    let tripped = tripped_at.lock().expect("lock").expect("the rule tripped");
    let delay = rolled_back_at.saturating_duration_since(tripped);
    eprintln!("rolled back {delay:?} after the rule tripped (client side)");
    assert!(
        delay < Duration::from_secs(1),
        "rolled back {delay:?} after the rule tripped"
    );
    stop.store(true, Ordering::SeqCst);
    load.join().expect("load thread");

    let r = s.route();
    assert_eq!(r["weights"]["green"], 0, "{r}");
    assert_eq!(r["source"], "admin");
    let reason = r["shift"]["reason"].as_str().unwrap_or("").to_string();
    assert!(reason.contains("error rate"), "{reason}");
    let seen = split(&s, 40, 2);
    assert_eq!(
        seen.get("blue"),
        Some(&40),
        "traffic back on blue: {seen:?}"
    );
    assert_eq!(
        s.sluice
            .metric(r#"sluice_shift_rollbacks_total{route="shop"}"#),
        Some(1.0)
    );
    let audit = s.audit();
    let rollback = audit
        .iter()
        .find(|l| l["method"] == "ROLLBACK")
        .expect("the rollback is audited");
    assert_eq!(rollback["reason"].as_str(), Some(reason.as_str()));
    assert_eq!(rollback["after"]["weights"]["green"], 0);
    assert!(
        s.sluice.proc.stderr().contains("rolled back") || s.sluice.stdout().contains("rolled back")
    );

    // a green without any healthy backend rolls back too, and its clients never see an error
    for g in &s.green {
        let _ = http_request(g.addr, "POST", "/_demo/recover", &[]);
    }
    s.shift("green", 50, "1h");
    for g in &s.green {
        g.proc.signal(libc::SIGKILL);
    }
    let rt = runtime();
    rt.block_on(async {
        let client = pooled_client();
        let end = Instant::now() + Duration::from_secs(10);
        while s.route()["shift"]["state"] != "rolled_back" && Instant::now() < end {
            for _ in 0..10 {
                let (code, color, _) = get(&client, &s.url(), &[]).await;
                assert_eq!((code, color.as_str()), (200, "blue"));
            }
        }
    });
    let r = s.route();
    assert_eq!(r["shift"]["state"], "rolled_back", "{r}");
    assert!(
        r["shift"]["reason"]
            .as_str()
            .unwrap_or("")
            .contains("no healthy backend"),
        "{r}"
    );
    assert_eq!(r["weights"]["green"], 0);
    assert_eq!(
        s.sluice
            .metric(r#"sluice_shift_rollbacks_total{route="shop"}"#),
        Some(2.0)
    );
}

#[test]
fn no_request_fails_while_weights_change_every_100ms() {
    let s = start((50, 50), "cookie");
    let stop = Arc::new(AtomicBool::new(false));
    // weight changes made so far: requests go on for 3 s and until there were 20 of them (a
    // busy machine answers the admin slower than every 100 ms), at most 30 s
    let made = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let changer = {
        let stop = stop.clone();
        let made = made.clone();
        let admin = s.sluice.admin;
        std::thread::spawn(move || {
            let mut changes = 0;
            while !stop.load(Ordering::SeqCst) {
                let green = fastrand::u8(0..=100);
                let body = format!(r#"{{"blue": {}, "green": {green}}}"#, 100 - green);
                let auth = format!("Bearer {TOKEN}");
                let r = request_with_body(
                    admin,
                    "PUT",
                    "/routes/shop/weights",
                    &[("authorization", &auth)],
                    body.as_bytes(),
                )
                .expect("admin");
                assert_eq!(r.code, 200, "{}", r.body);
                changes += 1;
                made.store(changes, Ordering::SeqCst);
                std::thread::sleep(Duration::from_millis(100));
            }
            changes
        })
    };
    let rt = runtime();
    let url = s.url();
    let (ok, colors) = rt.block_on(async {
        let mut handles = Vec::new();
        for _ in 0..4 {
            let url = url.clone();
            let made = made.clone();
            handles.push(tokio::spawn(async move {
                let client = pooled_client();
                let start = Instant::now();
                let (mut ok, mut colors) = (0, HashMap::new());
                while start.elapsed() < Duration::from_secs(3)
                    || (made.load(Ordering::SeqCst) < 20
                        && start.elapsed() < Duration::from_secs(30))
                {
                    // a new client each time: cookies would pin the color
                    let (code, color, _) = get(&client, &url, &[]).await;
                    assert_eq!(code, 200, "a request failed during weight changes");
                    assert!(color == "blue" || color == "green", "{color}");
                    ok += 1;
                    *colors.entry(color).or_insert(0) += 1;
                }
                (ok, colors)
            }));
        }
        let mut ok = 0;
        let mut colors: HashMap<String, usize> = HashMap::new();
        for h in handles {
            let (n, c) = h.await.expect("task");
            ok += n;
            for (k, v) in c {
                *colors.entry(k).or_insert(0) += v;
            }
        }
        (ok, colors)
    });
    stop.store(true, Ordering::SeqCst);
    let changes = changer.join().expect("changer");
    assert!(changes >= 20, "only {changes} weight changes");
    assert!(ok >= 200, "only {ok} requests");
    assert_eq!(colors.len(), 2, "{colors:?}");
    assert_eq!(s.audit().len(), changes);
}
