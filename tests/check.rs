//! `sluice check` and `sluice run` on broken configs: every problem named with file:line:col.

mod common;

use std::path::Path;
use std::process::Command;

use common::*;

/// A valid config; cases below edit one line of it.
fn base(dir: &Path) -> String {
    let ca = Ca::new(dir, "c");
    let (cert, key) = ca.issue(dir, "site", &["shop.test"]);
    // a second pair: its cert does not match site.key
    ca.issue(dir, "other", &["other.test"]);
    format!(
        r#"[server]
threads = 2
grace_period = "15s"
drain_delay = "2s"
access_log = "stdout"

[admin]
listen = "127.0.0.1:9900"

[tls]
min_version = "1.3"

[[tls.cert]]
hosts = ["shop.test"]
cert = "{cert}"
key = "{key}"

[[listener]]
listen = "0.0.0.0:8443"
tls = true
http2 = true

[client_ip]
trusted_proxies = []

[[pool]]
name = "a"
backends = ["127.0.0.1:9001"]

[[pool]]
name = "b"
backends = ["127.0.0.1:9002"]

[[route]]
name = "shop"
hosts = ["shop.test"]
path_prefix = "/"
blue = ["a"]
weights = {{ blue = 100, green = 0 }}
"#,
        cert = cert.file_name().and_then(|f| f.to_str()).expect("name"),
        key = key.file_name().and_then(|f| f.to_str()).expect("name"),
    )
}

fn check(dir: &Path, text: &str) -> (i32, String) {
    let path = dir.join("sluice.toml");
    std::fs::write(&path, text).expect("write");
    let out = Command::new(BIN)
        .args(["check", "-c"])
        .arg(&path)
        .output()
        .expect("run check");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn line_of(text: &str, needle: &str) -> usize {
    text.lines()
        .position(|l| l.contains(needle))
        .map(|i| i + 1)
        .unwrap_or_else(|| panic!("{needle} not in config"))
}

#[test]
fn valid_base_config_passes() {
    let dir = tempdir();
    let (code, err) = check(dir.path(), &base(dir.path()));
    assert_eq!(code, 0, "{err}");
}

#[test]
fn broken_configs_name_file_line_and_key() {
    let dir = tempdir();
    let good = base(dir.path());
    // (replace this, with this, the line to blame contains, the message contains)
    let cases: &[(&str, &str, &str, &str)] = &[
        (
            "threads = 2",
            "thread = 2",
            "thread = 2",
            "unknown key `server.thread`",
        ),
        (
            "threads = 2",
            "threads = \"two\"",
            "threads =",
            "`server.threads` must be a whole number",
        ),
        (
            "grace_period = \"15s\"",
            "grace_period = \"15 seconds\"",
            "grace_period",
            "bad duration",
        ),
        (
            "grace_period = \"15s\"",
            "grace_period = \"45s\"",
            "grace_period",
            "must be <= 30s",
        ),
        (
            "drain_delay = \"2s\"",
            "drain_delay = \"2\"",
            "drain_delay",
            "missing unit",
        ),
        (
            "blue = [\"a\"]",
            "blue = [\"nope\"]",
            "blue = [",
            "unknown pool \"nope\"",
        ),
        (
            "weights = { blue = 100, green = 0 }",
            "weights = { blue = 60, green = 30 }",
            "weights =",
            "must sum to 100",
        ),
        (
            "weights = { blue = 100, green = 0 }",
            "weights = { blue = 90, green = 10 }",
            "weights =",
            "has no green pools",
        ),
        (
            "blue = [\"a\"]",
            "blue = [\"a\"]\ngreen = [\"nope\"]",
            "green = [",
            "`route[0].green`: unknown pool \"nope\"",
        ),
        (
            "blue = [\"a\"]",
            "blue = [\"a\"]\noverride_header = \"x color\"",
            "override_header",
            "not a valid header name",
        ),
        (
            "blue = [\"a\"]",
            "blue = [\"a\"]\nsticky = \"session\"",
            "sticky",
            "must be \"cookie\", \"client_ip\" or \"none\"",
        ),
        (
            "weights = { blue = 100, green = 0 }",
            "weights = { blue = 100, green = 0 }\n[route.rollback]\nwindow = \"100ms\"",
            "window",
            "must be between 1s and 1h",
        ),
        (
            "weights = { blue = 100, green = 0 }",
            "weights = { blue = 100, green = 0 }\n[route.rollback]\nmax_error_rate = 5",
            "max_error_rate",
            "max_error_rate",
        ),
        (
            "weights = { blue = 100, green = 0 }",
            "weights = { blue = 100, green = 0 }\n[route.rollback]\nmin_request = 5",
            "min_request",
            "unknown key `route[0].rollback.min_request`",
        ),
        (
            "listen = \"127.0.0.1:9900\"",
            "listen = \"127.0.0.1:9900\"\nstate_file = \"\"",
            "state_file",
            "`admin.state_file` must be a file path",
        ),
        (
            "cert = \"site.crt\"",
            "cert = \"missing.crt\"",
            "cert = \"missing.crt\"",
            "`tls.cert[0].cert`: file",
        ),
        (
            "cert = \"site.crt\"",
            "cert = \"other.crt\"",
            "cert = \"other.crt\"",
            "do not form a usable pair",
        ),
        (
            "name = \"b\"",
            "name = \"a\"",
            "name = \"a\"\nbackends = [\"127.0.0.1:9002\"]",
            "duplicate pool name \"a\"",
        ),
        (
            "trusted_proxies = []",
            "trusted_proxies = [\"10.0.0.0/33\"]",
            "trusted_proxies",
            "\"10.0.0.0/33\" is not a CIDR",
        ),
        (
            "listen = \"0.0.0.0:8443\"",
            "listen = \"8443\"",
            "listen = \"8443\"",
            "is not an \"ip:port\" address",
        ),
        (
            "backends = [\"127.0.0.1:9001\"]",
            "backends = [\"127.0.0.1\"]",
            "backends = [\"127.0.0.1\"]",
            "`pool[0].backends`: \"127.0.0.1\" is not \"ip:port\"",
        ),
        (
            "backends = [\"127.0.0.1:9002\"]",
            "backends = []",
            "backends = []",
            "at least one backend",
        ),
        (
            "path_prefix = \"/\"",
            "path_prefix = \"api\"",
            "path_prefix",
            "must start with \"/\"",
        ),
        (
            "min_version = \"1.3\"",
            "min_version = \"1.1\"",
            "min_version",
            "must be \"1.2\" or \"1.3\"",
        ),
        (
            "[client_ip]",
            "[rate_limit]\nrequests = 0\n\n[client_ip]",
            "requests = 0",
            "`rate_limit.requests` = 0 is out of range",
        ),
        (
            "[client_ip]",
            "[rate_limit]\nscope = \"cluster\"\n\n[client_ip]",
            "scope = \"cluster\"",
            "needs a [cluster] table",
        ),
        (
            "[client_ip]",
            "[cluster]\nredis = \"redis+sentinel://h1:26379\"\n\n[client_ip]",
            "redis = ",
            "names no master",
        ),
        (
            "[client_ip]",
            "[cluster]\nredis = \"memcache://h1:1\"\n\n[client_ip]",
            "redis = ",
            "is not redis, rediss, redis+sentinel or redis+cluster",
        ),
        (
            "[client_ip]",
            "[cluster]\nredis = \"redis://h:1\"\ntimeout = \"20s\"\n\n[client_ip]",
            "timeout = ",
            "`cluster.timeout` must be between 1ms and 10s",
        ),
        ("[admin]", "[admn]", "[admn]", "unknown key `admn`"),
        (
            "[[pool]]\nname = \"a\"",
            "[[pool]]\nname = \"a\"\nhealth = { path = \"healthz\", interval = \"1s\" }",
            "health =",
            "`pool[0].health.path` must be a path starting with \"/\"",
        ),
        (
            "[[pool]]\nname = \"a\"",
            "[[pool]]\nname = \"a\"\neject = { consecutive_failures = 3, base_time = \"10s\", max_time = \"5s\" }",
            "eject =",
            "`pool[0].eject.max_time` must be at least `base_time`",
        ),
        (
            "hosts = [\"shop.test\"]\npath_prefix",
            "hosts = [\"shop test\"]\npath_prefix",
            "shop test",
            "is not a host name",
        ),
        ("[server]", "[server", "[server", "TOML syntax error"),
    ];
    assert!(cases.len() >= 10);
    for (from, to, blame, message) in cases {
        assert!(good.contains(from), "case {to}: base lacks {from}");
        let text = good.replacen(from, to, 1);
        let (code, err) = check(dir.path(), &text);
        assert_ne!(code, 0, "case {to}: must fail");
        assert!(!err.contains("panicked"), "case {to}: {err}");
        let line = line_of(&text, blame.lines().next().unwrap_or(blame));
        let line = if blame.contains('\n') {
            // the blamed line is the first line of a multi-line snippet
            text.find(blame)
                .map(|i| text[..i].lines().count() + 1)
                .unwrap_or(line)
        } else {
            line
        };
        let want = format!("sluice.toml:{line}:");
        let hit = err
            .lines()
            .find(|l| l.contains(message))
            .unwrap_or_else(|| panic!("case {to}: no `{message}` in:\n{err}"));
        assert!(hit.contains(&want), "case {to}: want {want} in `{hit}`");
    }
}

#[test]
fn every_problem_is_reported_in_one_run() {
    let dir = tempdir();
    let text = base(dir.path())
        .replacen("threads = 2", "threads = 0", 1)
        .replacen("blue = [\"a\"]", "blue = [\"x\"]", 1)
        .replacen(
            "access_log = \"stdout\"",
            "access_log = \"stdout\"\nbogus = 1",
            1,
        );
    let (code, err) = check(dir.path(), &text);
    assert_ne!(code, 0);
    assert!(
        err.contains("`server.threads` = 0 is out of range"),
        "{err}"
    );
    assert!(err.contains("unknown pool \"x\""), "{err}");
    assert!(err.contains("unknown key `server.bogus`"), "{err}");
    assert!(err.contains("3 problem(s) found"), "{err}");
}

#[test]
fn run_on_a_broken_config_exits_nonzero_with_the_same_message() {
    let dir = tempdir();
    let text = base(dir.path()).replacen("blue = [\"a\"]", "blue = [\"nope\"]", 1);
    let (_, check_err) = check(dir.path(), &text);
    let out = Command::new(BIN)
        .args(["run", "-c"])
        .arg(dir.path().join("sluice.toml"))
        .output()
        .expect("run");
    assert_ne!(out.status.code(), Some(0));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!err.contains("panicked"), "{err}");
    let msg = check_err.lines().next().expect("one message");
    assert!(err.contains(msg), "run says `{err}`, check said `{msg}`");
    // a missing file is an error too, not a panic
    let out = Command::new(BIN)
        .args(["run", "-c"])
        .arg(dir.path().join("nope.toml"))
        .output()
        .expect("run");
    assert_ne!(out.status.code(), Some(0));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("nope.toml:1:1: cannot read config file"),
        "{err}"
    );
}

#[test]
fn shipped_configs_are_valid() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    // the demo config needs the dev certificate that `make run` generates
    let certs = tempdir();
    let crt = certs.path().join("dev.crt");
    let key = certs.path().join("dev.key");
    let status = Command::new(BIN)
        .args(["gen-cert", "--cert"])
        .arg(&crt)
        .arg("--key")
        .arg(&key)
        .status()
        .expect("gen-cert");
    assert!(status.success());
    let mmdb = certs.path().join("demo-city.mmdb");
    let status = Command::new(BIN)
        .args(["geoip-build-demo", "--out"])
        .arg(&mmdb)
        .status()
        .expect("geoip-build-demo");
    assert!(status.success());
    let token = certs.path().join("admin.token");
    std::fs::write(&token, "t0ken\n").expect("token");
    for name in ["sluice.toml", "sluice.full.toml"] {
        let text = std::fs::read_to_string(root.join("config").join(name)).expect("read config");
        let text = text
            .replace("../state/admin.token", &token.display().to_string())
            .replace("../certs/dev.crt", &crt.display().to_string())
            .replace("../certs/dev.key", &key.display().to_string())
            .replace("../geoip/demo-city.mmdb", &mmdb.display().to_string());
        let dir = tempdir();
        let (code, err) = check(dir.path(), &text);
        assert_eq!(code, 0, "config/{name}: {err}");
    }
    // the contract's own example (kept beside this repository, not in it)
    let spec = root.join("../shared/spec/sluice.example.toml");
    if let Ok(text) = std::fs::read_to_string(&spec) {
        let dir = tempdir();
        std::fs::write(dir.path().join("admin.token"), "t0ken\n").expect("token");
        let text = text
            .replace("../certs/dev.crt", &crt.display().to_string())
            .replace("../certs/dev.key", &key.display().to_string())
            .replace("../geoip/demo-city.mmdb", &mmdb.display().to_string());
        let (code, err) = check(dir.path(), &text);
        // every key is understood; the ones of features still to come are refused as such
        let problems: Vec<&str> = err
            .lines()
            .filter(|l| !l.contains("is not supported yet") && !l.contains("problem(s) found"))
            .collect();
        assert!(
            code == 0 || problems.is_empty(),
            "{}: {err}",
            spec.display()
        );
    }
}

#[test]
fn version_flag() {
    let out = Command::new(BIN).arg("--version").output().expect("run");
    assert!(out.status.success());
    let text = String::from_utf8_lossy(&out.stdout);
    assert_eq!(text.trim(), format!("sluice {}", env!("CARGO_PKG_VERSION")));
}
