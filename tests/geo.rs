//! Geo-routing: each client to the nearest healthy data center, by a MaxMind DB that sluice
//! reloads when the file is replaced.

mod common;

use std::collections::HashSet;
use std::net::SocketAddr;
use std::time::Duration;

use common::*;
use sluice::geo::{write_db, DemoEntry, DEMO};

struct Setup {
    listen: SocketAddr,
    db: std::path::PathBuf,
    s: Sluice,
    eu: Vec<Backend>,
    us: Backend,
}

fn setup(dir: &std::path::Path, with_geoip: bool) -> Setup {
    let db = dir.join("city.mmdb");
    write_db(&db, DEMO).expect("demo db");
    let eu = vec![Backend::start(dir, "eu-1"), Backend::start(dir, "eu-2")];
    let us = Backend::start(dir, "us-1");
    let listen = free_addr();
    let geoip = if with_geoip {
        format!(
            "[geoip]\ndatabase = \"{}\"\ndebug_header = \"x-sluice-region\"\n",
            db.display()
        )
    } else {
        String::new()
    };
    let config = format!(
        r#"[server]
threads = 2
drain_delay = "0s"
access_log = "access.jsonl"
[admin]
listen = "{{admin}}"
[client_ip]
trusted_proxies = ["127.0.0.1/32"]
{geoip}
[[listener]]
listen = "{listen}"
[[region]]
name = "eu-west"
location = [53.34, -6.27]
countries = ["IE", "GB"]
[[region]]
name = "us-east"
location = [39.04, -77.49]
countries = ["IS"]
[[pool]]
name = "eu"
region = "eu-west"
backends = [{}]
health = {{ path = "/healthz", interval = "200ms", timeout = "100ms", unhealthy_after = 2, healthy_after = 2 }}
eject = {{ consecutive_failures = 3, base_time = "1s", max_time = "10s" }}
[[pool]]
name = "us"
region = "us-east"
backends = ["{}"]
[[route]]
name = "shop"
hosts = ["*"]
blue = ["eu", "us"]
"#,
        toml_addrs(&[eu[0].addr, eu[1].addr]),
        us.addr
    );
    let s = Sluice::start(dir, &config);
    Setup {
        listen,
        db,
        s,
        eu,
        us,
    }
}

/// The backend and region header answering a client at `client` (told by the trusted proxy
/// 127.0.0.1 in X-Forwarded-For).
fn serve(listen: SocketAddr, client: &str) -> (u16, String, Option<String>) {
    match request(listen, "GET", "/", &[("X-Forwarded-For", client)]) {
        Some(r) => {
            let region = r.header("x-sluice-region").map(String::from);
            (r.code, r.body.trim().to_string(), region)
        }
        None => (0, "request failed".into(), None),
    }
}

fn region_of(listen: SocketAddr, client: &str) -> String {
    let (code, body, _) = serve(listen, client);
    assert_eq!(code, 200, "{client}: {body}");
    if body.starts_with("eu-") {
        "eu-west".into()
    } else {
        "us-east".into()
    }
}

#[test]
fn clients_go_to_the_nearest_region_and_pins_win() {
    let dir = tempdir();
    let t = setup(dir.path(), true);
    let l = t.listen;
    assert_eq!(region_of(l, "203.0.113.5"), "eu-west", "Dublin");
    assert_eq!(region_of(l, "198.51.100.5"), "us-east", "New York");
    assert_eq!(
        region_of(l, "192.0.2.5"),
        "eu-west",
        "Frankfurt: no pin, nearest"
    );
    assert_eq!(
        region_of(l, "192.0.2.20"),
        "us-east",
        "Reykjavik: IS pinned to us-east"
    );
    assert_eq!(region_of(l, "198.51.100.20"), "us-east", "San Francisco");
    assert_eq!(
        region_of(l, "203.0.113.33"),
        "eu-west",
        "France, country only"
    );
    assert_eq!(
        region_of(l, "10.9.9.9"),
        "eu-west",
        "unknown: first pool listed"
    );
    assert_eq!(region_of(l, "2001:db8:1::5"), "us-east", "IPv6 New York");
    // Dublin keeps round-robin inside its pool
    let seen: HashSet<String> = (0..4).map(|_| serve(l, "203.0.113.5").1).collect();
    assert_eq!(
        seen,
        ["eu-1", "eu-2"].iter().map(|s| s.to_string()).collect()
    );
    // debugging header and metrics
    assert_eq!(serve(l, "198.51.100.5").2.as_deref(), Some("us-east"));
    let us =
        t.s.metric(r#"sluice_geo_decisions_total{region="us-east",route="shop"}"#);
    assert!(us >= Some(4.0), "{us:?}");
}

#[test]
fn a_dead_region_fails_over_to_the_next_nearest_and_comes_back() {
    let dir = tempdir();
    let mut t = setup(dir.path(), true);
    let l = t.listen;
    assert_eq!(region_of(l, "203.0.113.5"), "eu-west");
    for b in &t.eu {
        b.proc.signal(libc::SIGKILL);
    }
    // every request of the Dublin client succeeds, served from us-east
    for i in 0..30 {
        let (code, body, _) = serve(l, "203.0.113.5");
        assert_eq!(code, 200, "request {i}: {body}");
        assert_eq!(body, "us-1", "request {i}");
    }
    let eu_addr = t.eu[0].addr;
    t.eu[0] = Backend::start_on(dir.path(), "eu-1", eu_addr, None);
    assert!(
        wait_until(Duration::from_secs(8), || serve(l, "203.0.113.5").1
            == "eu-1"),
        "Dublin returns to eu-west: {}",
        t.s.status()
    );
    drop(t.us);
}

#[test]
fn without_a_database_the_first_pool_serves() {
    let dir = tempdir();
    let t = setup(dir.path(), false);
    assert_eq!(region_of(t.listen, "198.51.100.5"), "eu-west");
    assert_eq!(region_of(t.listen, "10.0.0.1"), "eu-west");
}

#[test]
fn a_replaced_database_applies_and_a_corrupt_one_is_refused() {
    let dir = tempdir();
    let t = setup(dir.path(), true);
    let l = t.listen;
    assert_eq!(region_of(l, "203.0.113.5"), "eu-west");
    // a new database places the 203.0.113.0/28 clients in New York
    let moved = [DemoEntry {
        network: "203.0.113.0/28",
        city: "New York",
        country: "US",
        continent: "NA",
        location: Some((40.71, -74.01)),
    }];
    let staged = dir.path().join("staged.mmdb");
    write_db(&staged, &moved).expect("db");
    std::fs::rename(&staged, &t.db).expect("replace");
    assert!(
        wait_until(Duration::from_secs(5), || region_of(l, "203.0.113.5")
            == "us-east"),
        "{}",
        t.s.status()
    );
    // a corrupt file is refused; the reader in service stays
    write_by_rename(&t.db, "this is not a MaxMind DB");
    assert!(wait_until(Duration::from_secs(5), || {
        t.s.status()["config"]["last_error"]
            .as_str()
            .is_some_and(|e| {
                e.contains("geoip.database") && e.contains("not a readable MaxMind DB")
            })
    }));
    assert_eq!(region_of(l, "203.0.113.5"), "us-east");
    assert_eq!(
        region_of(l, "198.51.100.5"),
        "eu-west",
        "New York is unknown to the new db"
    );
}
