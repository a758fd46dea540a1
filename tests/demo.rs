//! `make run` serves the demo: https://localhost:8443/ answers from the demo backends in turn.
//! Runs the real Makefile recipe (with the test build, PROFILE=dev) on the demo's fixed ports.

mod common;

use std::os::unix::process::CommandExt;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::*;

struct Group(std::process::Child);

impl Drop for Group {
    fn drop(&mut self) {
        // the whole process group: make, the backends and sluice
        // SAFETY: kill(2) on the process group we created.
        unsafe {
            libc::kill(-(self.0.id() as i32), libc::SIGTERM);
        }
        let end = Instant::now() + Duration::from_secs(15);
        while Instant::now() < end {
            if let Ok(Some(_)) = self.0.try_wait() {
                break;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        // SAFETY: as above.
        unsafe {
            libc::kill(-(self.0.id() as i32), libc::SIGKILL);
        }
        let _ = self.0.wait();
    }
}

#[test]
fn make_run_serves_the_demo() {
    let root = env!("CARGO_MANIFEST_DIR");
    for port in [8443u16, 8080, 9900, 9001, 9002, 9003] {
        assert!(
            std::net::TcpListener::bind(("0.0.0.0", port)).is_ok(),
            "port {port} is busy: stop whatever runs there (a `make run`?) and retry"
        );
    }
    let dir = tempdir();
    let log = dir.path().join("make-run.log");
    let mut cmd = Command::new("make");
    // Run it as a user's shell would: the variables cargo gives to tests (CARGO_*,
    // LD_LIBRARY_PATH) would change build-script fingerprints and force a rebuild.
    for (key, _) in std::env::vars_os() {
        let k = key.to_string_lossy();
        if (k.starts_with("CARGO") && k != "CARGO_HOME") || k == "LD_LIBRARY_PATH" {
            cmd.env_remove(&key);
        }
    }
    let child = cmd
        .args(["run", "PROFILE=dev"])
        .current_dir(root)
        .stdin(Stdio::null())
        .stdout(std::fs::File::create(&log).expect("log"))
        .stderr(std::fs::File::create(dir.path().join("make-run.err")).expect("log"))
        .process_group(0)
        .spawn()
        .expect("make run");
    let _group = Group(child);
    let read_log = || {
        format!(
            "{}{}",
            std::fs::read_to_string(&log).unwrap_or_default(),
            std::fs::read_to_string(dir.path().join("make-run.err")).unwrap_or_default()
        )
    };
    let admin = "127.0.0.1:9900".parse().expect("addr");
    let end = Instant::now() + Duration::from_secs(300);
    while http_get(admin, "/readyz").map(|r| r.0) != Some(200) {
        assert!(Instant::now() < end, "demo not ready: {}", read_log());
        std::thread::sleep(Duration::from_millis(100));
    }
    runtime().block_on(async {
        // like `curl -k https://localhost:8443/`
        let c = reqwest::Client::builder()
            .use_rustls_tls()
            .danger_accept_invalid_certs(true)
            .build()
            .expect("client");
        // (the color is pinned: a state file from an earlier demo may have shifted weights)
        let mut seen = Vec::new();
        for color in ["blue", "blue", "blue", "blue", "green"] {
            let r = c
                .get("https://localhost:8443/")
                .header("x-sluice-color", color)
                .send()
                .await
                .expect("request");
            assert_eq!(r.status(), 200);
            seen.push(r.text().await.expect("body").trim().to_string());
        }
        assert_eq!(
            seen,
            [
                "backend-1",
                "backend-2",
                "backend-1",
                "backend-2",
                "green-1"
            ]
        );
    });
}
