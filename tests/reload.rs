//! Hot reload: config, certificates and their files change on disk; sluice picks them up by
//! itself (or on SIGHUP / POST /reload) without a restart or a failed request.

mod common;

use std::collections::HashSet;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::*;

/// A plain listener config with one catch-all route over `backends`, plus `extra` TOML.
fn config(listen: SocketAddr, backends: &[SocketAddr], extra: &str) -> String {
    let list = toml_addrs(backends);
    format!(
        r#"[server]
threads = 2
drain_delay = "0s"
access_log = "off"
[admin]
listen = "{{admin}}"
[[listener]]
listen = "{listen}"
[[pool]]
name = "p"
backends = [{list}]
[[route]]
name = "all"
hosts = ["*"]
blue = ["p"]
{extra}
"#
    )
}

/// (status, trimmed body) of GET `path` with `Host: host` through `listen`.
fn fetch(listen: SocketAddr, host: &str, path: &str) -> Option<(u16, String)> {
    request(listen, "GET", path, &[("Host", host)]).map(|r| (r.code, r.body.trim().to_string()))
}

fn generation(s: &Sluice) -> u64 {
    s.status()["config"]["generation"].as_u64().unwrap_or(0)
}

#[test]
fn twenty_rewrites_under_load_fail_no_request() {
    let dir = tempdir();
    let b: Vec<Backend> = (1..=4)
        .map(|i| Backend::start(dir.path(), &format!("b{i}")))
        .collect();
    let listen = free_addr();
    // variant i: route "all" over a rotating set of backends; odd variants add a host route
    // and change paths, even ones remove it
    let variant = |i: usize| -> (String, Vec<String>) {
        let set: Vec<&Backend> = match i % 3 {
            0 => vec![&b[0], &b[1]],
            1 => vec![&b[1], &b[2], &b[3]],
            _ => vec![&b[3]],
        };
        let extra = if i % 2 == 1 {
            format!(
                "[[pool]]\nname = \"q\"\nbackends = [\"{}\"]\n[[route]]\nname = \"host{i}\"\nhosts = [\"h{i}.test\"]\npath_prefix = \"/p{i}\"\nblue = [\"q\"]\n",
                b[0].addr
            )
        } else {
            String::new()
        };
        let addrs: Vec<SocketAddr> = set.iter().map(|x| x.addr).collect();
        (
            config(listen, &addrs, &extra),
            set.iter().map(|x| x.name.clone()).collect(),
        )
    };
    let (first, _) = variant(0);
    let s = Sluice::start(dir.path(), &first);
    let admin = s.admin.to_string();
    let path = s.config.clone();

    let stop = Arc::new(AtomicBool::new(false));
    let seen: Arc<Mutex<Vec<(u16, String)>>> = Arc::default();
    let mut clients = Vec::new();
    for _ in 0..4 {
        let (stop, seen) = (stop.clone(), seen.clone());
        clients.push(std::thread::spawn(move || {
            let mut n = 0;
            while !stop.load(Ordering::SeqCst) {
                let r = fetch(listen, "shop.test", "/").unwrap_or((0, "connection error".into()));
                seen.lock().expect("lock").push(r);
                n += 1;
            }
            n
        }));
    }
    let started = Instant::now();
    for i in 1..=20 {
        let (text, _) = variant(i);
        let text = text.replace("{admin}", &admin);
        if i % 2 == 0 {
            write_by_rename(&path, &text);
        } else {
            std::fs::write(&path, &text).expect("write in place");
        }
        let want = 1 + i as u64;
        assert!(
            wait_until(Duration::from_secs(5), || generation(&s) >= want),
            "rewrite {i} was not applied: {}",
            s.status()
        );
        std::thread::sleep(Duration::from_millis(150));
    }
    // keep the load on for at least 8 s in all
    while started.elapsed() < Duration::from_secs(8) {
        std::thread::sleep(Duration::from_millis(50));
    }
    stop.store(true, Ordering::SeqCst);
    let total: usize = clients.into_iter().map(|c| c.join().expect("client")).sum();

    let seen = seen.lock().expect("lock");
    let names: HashSet<&str> = b.iter().map(|x| x.name.as_str()).collect();
    let bad: Vec<_> = seen
        .iter()
        .filter(|(code, body)| *code != 200 || !names.contains(body.as_str()))
        .collect();
    assert!(total > 200, "load ran: {total} requests");
    assert!(
        bad.is_empty(),
        "{} of {total} requests failed: {:?}",
        bad.len(),
        &bad[..bad.len().min(5)]
    );
    assert_eq!(generation(&s), 21, "each rewrite is one reload");
    assert_eq!(
        s.metric(r#"sluice_config_reloads_total{result="error"}"#),
        Some(0.0),
        "no reload failed (the series is exported from the start)"
    );
    // the last variant serves exactly its backends: removed ones get no new requests
    let (_, last) = variant(20);
    let mut got = HashSet::new();
    for _ in 0..20 {
        let (code, body) = fetch(listen, "shop.test", "/").expect("request");
        assert_eq!(code, 200);
        got.insert(body);
    }
    assert_eq!(got, last.into_iter().collect::<HashSet<_>>());
}

#[test]
fn symlink_swap_rename_and_in_place_writes_are_picked_up() {
    let dir = tempdir();
    let b1 = Backend::start(dir.path(), "b1");
    let b2 = Backend::start(dir.path(), "b2");
    let b3 = Backend::start(dir.path(), "b3");
    let listen = free_addr();
    // Kubernetes ConfigMap layout: sluice.toml -> ..data/sluice.toml, ..data -> ..v1
    let cm = dir.path().join("configmap");
    std::fs::create_dir_all(cm.join("..v1")).expect("mkdir");
    let admin = free_addr();
    let text = |b: &Backend| config(listen, &[b.addr], "").replace("{admin}", &admin.to_string());
    std::fs::write(cm.join("..v1/sluice.toml"), text(&b1)).expect("write");
    std::os::unix::fs::symlink("..v1", cm.join("..data")).expect("symlink");
    std::os::unix::fs::symlink("..data/sluice.toml", cm.join("sluice.toml")).expect("symlink");
    // start on the ConfigMap path (Sluice::start writes its own file, so start by hand)
    let s = Sluice::start_file(dir.path(), &cm.join("sluice.toml"), admin);
    assert_eq!(fetch(listen, "x", "/").map(|r| r.1).as_deref(), Some("b1"));

    let served = |want: &str| {
        let t = Instant::now();
        let ok = wait_until(Duration::from_secs(5), || {
            fetch(listen, "x", "/").map(|r| r.1).as_deref() == Some(want)
        });
        assert!(ok, "{want} never served: {}", s.status());
        t.elapsed()
    };

    // 1. ConfigMap update: a new version directory, then an atomic swap of ..data
    std::fs::create_dir_all(cm.join("..v2")).expect("mkdir");
    std::fs::write(cm.join("..v2/sluice.toml"), text(&b2)).expect("write");
    std::os::unix::fs::symlink("..v2", cm.join("..data_tmp")).expect("symlink");
    std::fs::rename(cm.join("..data_tmp"), cm.join("..data")).expect("swap");
    let t_swap = served("b2");

    // 2. editor style: write a temp file and rename it over the config
    write_by_rename(&cm.join("sluice.toml"), &text(&b3));
    let t_rename = served("b3");

    // 3. in place: truncate, write half a file, pause, write the rest. The half file is not
    //    valid, so it is refused and b3 keeps serving; the complete file then applies.
    let full = text(&b1);
    let cut = full.find("backends = [").expect("cut point") + 16;
    {
        use std::io::Write;
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .truncate(true)
            .open(cm.join("sluice.toml"))
            .expect("open");
        f.write_all(&full.as_bytes()[..cut]).expect("write half");
        f.flush().expect("flush");
        assert!(wait_until(Duration::from_secs(5), || s.status()["config"]
            ["last_error"]
            .is_string()));
        assert_eq!(
            fetch(listen, "x", "/").map(|r| r.1).as_deref(),
            Some("b3"),
            "half a file must not be served"
        );
        let written = Instant::now();
        f.write_all(&full.as_bytes()[cut..]).expect("write rest");
        f.flush().expect("flush");
        drop(f);
        served("b1");
        println!("in-place write -> serving: {:?}", written.elapsed());
    }
    assert!(
        s.status()["config"]["last_error"].is_null(),
        "{}",
        s.status()
    );
    println!("ConfigMap swap -> serving: {t_swap:?}; rename -> serving: {t_rename:?}");
    assert_eq!(s.metric("sluice_config_last_reload_success"), Some(1.0));
}

/// The real file behind a chain of symlinks is watched too, hop by hop, and the chain is
/// followed again after every change: `sluice.toml -> ..data/sluice.toml`, `..data -> ..v2`,
/// then edits of `..v2/sluice.toml` itself.
#[test]
fn edits_behind_every_symlink_hop_are_picked_up() {
    let dir = tempdir();
    let b1 = Backend::start(dir.path(), "b1");
    let b2 = Backend::start(dir.path(), "b2");
    let b3 = Backend::start(dir.path(), "b3");
    let listen = free_addr();
    let cm = dir.path().join("configmap");
    std::fs::create_dir_all(cm.join("..v1")).expect("mkdir");
    let admin = free_addr();
    let text = |b: &Backend| config(listen, &[b.addr], "").replace("{admin}", &admin.to_string());
    std::fs::write(cm.join("..v1/sluice.toml"), text(&b1)).expect("write");
    std::os::unix::fs::symlink("..v1", cm.join("..data")).expect("symlink");
    std::os::unix::fs::symlink("..data/sluice.toml", cm.join("sluice.toml")).expect("symlink");
    let s = Sluice::start_file(dir.path(), &cm.join("sluice.toml"), admin);
    let served = |want: &str| {
        assert!(
            wait_until(Duration::from_secs(5), || {
                fetch(listen, "x", "/").map(|r| r.1).as_deref() == Some(want)
            }),
            "{want} never served: {}",
            s.status()
        );
    };
    served("b1");
    // a ConfigMap swap to ..v2
    std::fs::create_dir_all(cm.join("..v2")).expect("mkdir");
    std::fs::write(cm.join("..v2/sluice.toml"), text(&b2)).expect("write");
    std::os::unix::fs::symlink("..v2", cm.join("..data_tmp")).expect("symlink");
    std::fs::rename(cm.join("..data_tmp"), cm.join("..data")).expect("swap");
    served("b2");
    // the file behind the hops, replaced by rename
    write_by_rename(&cm.join("..v2/sluice.toml"), &text(&b3));
    served("b3");
    // ... written in place
    std::fs::write(cm.join("..v2/sluice.toml"), text(&b1)).expect("write");
    served("b1");
    // ... and broken: reported, the old config keeps serving
    std::fs::write(cm.join("..v2/sluice.toml"), "[[route]").expect("write");
    assert!(
        wait_until(Duration::from_secs(5), || s.status()["config"]
            ["last_error"]
            .as_str()
            .is_some_and(|e| e.contains("TOML syntax error"))),
        "{}",
        s.status()
    );
    assert_eq!(fetch(listen, "x", "/").map(|r| r.1).as_deref(), Some("b1"));
}

#[test]
fn invalid_configs_are_refused_while_the_old_one_serves() {
    let dir = tempdir();
    let b1 = Backend::start(dir.path(), "b1");
    let b2 = Backend::start(dir.path(), "b2");
    let listen = free_addr();
    let s = Sluice::start(dir.path(), &config(listen, &[b1.addr], ""));
    let admin = s.admin.to_string();
    let good = config(listen, &[b1.addr], "").replace("{admin}", &admin);
    let cases: Vec<(String, &str, &str)> = vec![
        (good.replace("[[route]]", "[[route]"), "TOML syntax error", "[[route]"),
        (good.replace("blue = [\"p\"]", "blue = [\"nope\"]"), "unknown pool \"nope\"", "blue = [\"nope\"]"),
        (good.replace("threads = 2", "threads = 2\ntreads = 3"), "unknown key `server.treads`", "treads"),
        (
            good.replace("blue = [\"p\"]", "blue = [\"p\"]\nweights = { blue = 90, green = 20 }"),
            "must sum to 100",
            "weights",
        ),
        (
            good.replace("[[listener]]", "[tls]\n[[tls.cert]]\nhosts = [\"a.test\"]\ncert = \"missing.crt\"\nkey = \"missing.key\"\n[[listener]]"),
            "does not exist",
            "cert = \"missing.crt\"",
        ),
    ];
    let mut errors = 0.0;
    for (text, message, blame) in &cases {
        let gen_before = generation(&s);
        write_by_rename(&s.config, text);
        errors += 1.0;
        let line = text.lines().position(|l| l.contains(blame)).expect("blame") + 1;
        let want = format!("sluice.toml:{line}:");
        assert!(
            wait_until(Duration::from_secs(5), || {
                s.metric(r#"sluice_config_reloads_total{result="error"}"#) == Some(errors)
            }),
            "{message}: not counted: {}",
            s.status()
        );
        let st = s.status();
        let err = st["config"]["last_error"]
            .as_str()
            .unwrap_or("")
            .to_string();
        assert!(
            err.contains(message) && err.contains(&want),
            "{message} at {want}: {err}"
        );
        assert_eq!(s.metric("sluice_config_last_reload_success"), Some(0.0));
        assert_eq!(
            generation(&s),
            gen_before,
            "the old config keeps its generation"
        );
        assert_eq!(
            fetch(listen, "x", "/").map(|r| r.1).as_deref(),
            Some("b1"),
            "old config serves"
        );
        // fixing the file recovers
        write_by_rename(
            &s.config,
            &good.replace(&b1.addr.to_string(), &b2.addr.to_string()),
        );
        assert!(wait_until(Duration::from_secs(5), || {
            fetch(listen, "x", "/").map(|r| r.1).as_deref() == Some("b2")
        }));
        assert!(s.status()["config"]["last_error"].is_null());
        assert_eq!(s.metric("sluice_config_last_reload_success"), Some(1.0));
        write_by_rename(&s.config, &good);
        assert!(wait_until(Duration::from_secs(5), || {
            fetch(listen, "x", "/").map(|r| r.1).as_deref() == Some("b1")
        }));
    }
}

/// The serial number of the certificate `addr` presents for `sni`.
async fn served_serial(addr: SocketAddr, sni: &str, ca: &Ca) -> Option<String> {
    let tcp = tokio::net::TcpStream::connect(addr).await.ok()?;
    let name = rustls::pki_types::ServerName::try_from(sni.to_string()).ok()?;
    let tls = ca.connector(false).connect(name, tcp).await.ok()?;
    let der = tls.get_ref().1.peer_certificates()?.first()?.to_vec();
    let (_, cert) = x509_parser::parse_x509_certificate(&der).ok()?;
    Some(cert.raw_serial_as_string())
}

fn serial_of(path: &Path) -> String {
    let pem = std::fs::read(path).expect("read");
    let der = rustls_pemfile::certs(&mut pem.as_slice())
        .next()
        .expect("cert")
        .expect("pem");
    let (_, cert) = x509_parser::parse_x509_certificate(&der).expect("x509");
    cert.raw_serial_as_string()
}

#[test]
fn rotated_certificates_serve_new_handshakes_and_broken_pairs_are_refused() {
    let dir = tempdir();
    let b1 = Backend::start(dir.path(), "b1");
    let ca = Ca::new(dir.path(), "rot");
    let (c1, k1) = ca.issue(dir.path(), "one", &["site.test"]);
    let (c2, k2) = ca.issue(dir.path(), "two", &["site.test"]);
    let (c3, _) = ca.issue(dir.path(), "three", &["site.test"]);
    let live_c = dir.path().join("live.crt");
    let live_k = dir.path().join("live.key");
    std::fs::copy(&c1, &live_c).expect("copy");
    std::fs::copy(&k1, &live_k).expect("copy");
    let tls = free_addr();
    let text = format!(
        "[admin]\nlisten = \"{{admin}}\"\n[tls]\n[[tls.cert]]\nhosts = [\"site.test\"]\ncert = \"{}\"\nkey = \"{}\"\n[[listener]]\nlisten = \"{tls}\"\ntls = true\n[[pool]]\nname = \"p\"\nbackends = [\"{}\"]\n[[route]]\nname = \"all\"\nhosts = [\"*\"]\nblue = [\"p\"]\n",
        live_c.display(),
        live_k.display(),
        b1.addr
    );
    let s = Sluice::start(dir.path(), &text);
    let rt = runtime();
    let serial = || rt.block_on(served_serial(tls, "site.test", &ca));
    assert_eq!(serial(), Some(serial_of(&c1)));

    // rotate: both files replaced (as cert-manager or a Secret update does)
    let t = Instant::now();
    write_by_rename(&live_c, &std::fs::read_to_string(&c2).expect("read"));
    write_by_rename(&live_k, &std::fs::read_to_string(&k2).expect("read"));
    assert!(
        wait_until(Duration::from_secs(5), || serial() == Some(serial_of(&c2))),
        "new certificate not served: {}\n{}",
        s.status(),
        s.proc.stderr()
    );
    println!("certificate rotation -> new handshakes: {:?}", t.elapsed());
    assert_eq!(s.proc.child.id(), s.proc.child.id(), "same process");

    // a certificate that does not match the key is refused; the old pair keeps serving
    write_by_rename(&live_c, &std::fs::read_to_string(&c3).expect("read"));
    assert!(wait_until(Duration::from_secs(5), || {
        s.status()["config"]["last_error"]
            .as_str()
            .is_some_and(|e| e.contains("do not form a usable pair"))
    }));
    assert_eq!(serial(), Some(serial_of(&c2)));
    assert_eq!(s.metric("sluice_config_last_reload_success"), Some(0.0));
}

#[test]
fn reload_endpoint_needs_a_token_and_sighup_reloads() {
    let dir = tempdir();
    let b1 = Backend::start(dir.path(), "b1");
    let b2 = Backend::start(dir.path(), "b2");
    let listen = free_addr();
    std::fs::write(
        dir.path().join("admin.token"),
        "first-token\n\n  s3cret-token  \n",
    )
    .expect("token");
    let with_token = |b: &Backend| {
        config(listen, &[b.addr], "").replace(
            "listen = \"{admin}\"",
            "listen = \"{admin}\"\ntoken_file = \"admin.token\"",
        )
    };
    let s = Sluice::start(dir.path(), &with_token(&b1));
    let admin = s.admin;
    let post = |auth: Option<&str>| {
        let h = auth.map(|a| vec![("Authorization", a)]).unwrap_or_default();
        http_request(admin, "POST", "/reload", &h).expect("reload")
    };
    assert_eq!(post(None).0, 401);
    assert_eq!(post(Some("Basic czNjcmV0")).0, 401);
    assert_eq!(post(Some("Bearer wrong")).0, 403);
    assert_eq!(http_get(admin, "/reload").map(|r| r.0), Some(405));
    let (code, body) = post(Some("Bearer s3cret-token"));
    assert_eq!(code, 200, "{body}");
    let v: serde_json::Value = serde_json::from_str(&body).expect("json");
    assert_eq!(v["generation"], 2);

    // a broken file: 422 with the message, the old config still serving
    let text = with_token(&b2).replace("{admin}", &admin.to_string());
    std::fs::write(&s.config, text.replace("blue = [\"p\"]", "blue = [\"q\"]")).expect("write");
    let (code, body) = post(Some("Bearer first-token"));
    assert_eq!(code, 422, "{body}");
    assert!(body.contains("unknown pool \\\"q\\\""), "{body}");
    assert_eq!(fetch(listen, "x", "/").map(|r| r.1).as_deref(), Some("b1"));

    // SIGHUP reloads too
    std::fs::write(&s.config, &text).expect("write");
    s.proc.signal(libc::SIGHUP);
    assert!(wait_until(Duration::from_secs(5), || {
        fetch(listen, "x", "/").map(|r| r.1).as_deref() == Some("b2")
    }));
    assert!(s.status()["config"]["last_error"].is_null());

    // without a token file every mutating call is refused
    std::fs::write(
        &s.config,
        config(listen, &[b2.addr], "").replace("{admin}", &admin.to_string()),
    )
    .expect("write");
    assert!(wait_until(Duration::from_secs(5), || post(Some(
        "Bearer s3cret-token"
    ))
    .0 == 403));
}

#[test]
fn listener_changes_are_reported_as_needing_a_restart() {
    let dir = tempdir();
    let b1 = Backend::start(dir.path(), "b1");
    let b2 = Backend::start(dir.path(), "b2");
    let listen = free_addr();
    let extra_listener = free_addr();
    let s = Sluice::start(dir.path(), &config(listen, &[b1.addr], ""));
    let text = config(listen, &[b2.addr], "")
        .replace("{admin}", &s.admin.to_string())
        .replace(
            "[[pool]]",
            &format!("[[listener]]\nlisten = \"{extra_listener}\"\n[[pool]]"),
        );
    write_by_rename(&s.config, &text);
    // the rest of the config applies now
    assert!(wait_until(Duration::from_secs(5), || {
        fetch(listen, "x", "/").map(|r| r.1).as_deref() == Some("b2")
    }));
    let st = s.status();
    let why = st["config"]["restart_required"].as_str().unwrap_or("");
    assert!(
        why.contains(&format!("listener {extra_listener} added")),
        "{st}"
    );
    assert!(
        s.proc.stderr().contains("restart required"),
        "{}",
        s.proc.stderr()
    );
    assert!(
        fetch(extra_listener, "x", "/").is_none(),
        "not half-applied"
    );
}
