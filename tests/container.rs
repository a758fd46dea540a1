//! The container: an image of the runtime stage (the binary and the shared libraries it links,
//! on an empty base, so no registry is needed) starts with a read-only root filesystem as a
//! non-root user, answers /healthz, and stops gracefully on SIGTERM (`docker stop`) within its
//! grace period. Skipped, saying so, where no Docker daemon answers; the full multi-stage
//! `Dockerfile` needs its base images from a registry.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::{Duration, Instant};

use common::*;

fn docker(args: &[&str]) -> Output {
    Command::new("docker")
        .args(args)
        .output()
        .expect("run docker")
}

fn docker_ok(args: &[&str]) -> String {
    let out = docker(args);
    assert!(
        out.status.success(),
        "docker {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

fn daemon_answers() -> bool {
    Command::new("docker")
        .args(["info", "--format", "{{.ServerVersion}}"])
        .output()
        .is_ok_and(|o| o.status.success())
}

/// Copies `file` into `root` at the same absolute path.
fn copy_in(root: &Path, file: &Path) {
    let dest = root.join(file.strip_prefix("/").unwrap_or(file));
    std::fs::create_dir_all(dest.parent().expect("parent")).expect("mkdir");
    std::fs::copy(file, &dest).expect("copy");
}

#[test]
fn runtime_image_starts_answers_and_stops_gracefully() {
    if !daemon_answers() {
        eprintln!("SKIPPED: no Docker daemon answers here (docker info failed)");
        return;
    }
    let dir = tempdir();
    let root = dir.path().join("rootfs");
    // prefer the optimised binary (the one an image ships) when it is built
    let release = Path::new(env!("CARGO_MANIFEST_DIR")).join("target/release/sluice");
    let bin = if release.is_file() {
        release
    } else {
        PathBuf::from(BIN)
    };
    let dest = root.join("usr/local/bin/sluice");
    std::fs::create_dir_all(dest.parent().expect("parent")).expect("mkdir");
    std::fs::copy(&bin, &dest).expect("copy binary");
    // the shared libraries the binary links, as `ldd` finds them
    let ldd = Command::new("ldd").arg(&bin).output().expect("ldd");
    for line in String::from_utf8_lossy(&ldd.stdout).lines() {
        let path = line
            .split_whitespace()
            .find(|w| w.starts_with('/'))
            .map(PathBuf::from);
        if let Some(p) = path.filter(|p| p.is_file()) {
            copy_in(&root, &p);
        }
    }
    std::fs::create_dir_all(root.join("etc/sluice")).expect("etc");
    std::fs::write(
        root.join("etc/sluice/sluice.toml"),
        r#"[server]
threads = 1
grace_period = "3s"
drain_delay = "1s"
[admin]
listen = "0.0.0.0:9900"
[[listener]]
listen = "0.0.0.0:8080"
[[pool]]
name = "p"
backends = ["127.0.0.1:9"]
[[route]]
name = "all"
hosts = ["*"]
blue = ["p"]
"#,
    )
    .expect("config");
    std::fs::write(
        dir.path().join("Dockerfile"),
        r#"FROM scratch
COPY rootfs/ /
USER 65532:65532
EXPOSE 8080 9900
HEALTHCHECK --interval=2s CMD ["/usr/local/bin/sluice", "probe", "127.0.0.1:9900", "/healthz"]
ENTRYPOINT ["/usr/local/bin/sluice"]
CMD ["run", "-c", "/etc/sluice/sluice.toml"]
"#,
    )
    .expect("dockerfile");
    let tag = format!("sluice-test:{}", std::process::id());
    let context = dir.path().display().to_string();
    docker_ok(&["build", "-q", "-t", &tag, &context]);
    let size: u64 = docker_ok(&["image", "inspect", "--format", "{{.Size}}", &tag])
        .parse()
        .expect("size");
    eprintln!(
        "runtime image from {}: {:.1} MB",
        bin.display(),
        size as f64 / 1e6
    );
    let admin = free_addr();
    let publish = format!("{admin}:9900");
    let id = docker_ok(&["run", "-d", "--read-only", "-p", &publish, &tag]);
    let cleanup = || {
        let _ = docker(&["rm", "-f", &id]);
        let _ = docker(&["rmi", "-f", &tag]);
    };
    let up = wait_until(Duration::from_secs(30), || {
        http_get(admin, "/healthz").map(|r| r.0) == Some(200)
    });
    if !up {
        let logs = docker(&["logs", &id]);
        cleanup();
        panic!(
            "container never answered /healthz: {}",
            String::from_utf8_lossy(&logs.stderr)
        );
    }
    // the image's HEALTHCHECK (`sluice probe` against /healthz, every 2 s) reports healthy
    let healthy = wait_until(Duration::from_secs(20), || {
        docker(&["inspect", "--format", "{{.State.Health.Status}}", &id])
            .stdout
            .starts_with(b"healthy")
    });
    let user = docker_ok(&["inspect", "--format", "{{.Config.User}}", &id]);
    let t = Instant::now();
    docker_ok(&["stop", "-t", "20", &id]);
    let stopped_in = t.elapsed();
    let code = docker_ok(&["inspect", "--format", "{{.State.ExitCode}}", &id]);
    cleanup();
    assert!(healthy, "the HEALTHCHECK never reported healthy");
    assert_eq!(user, "65532:65532");
    assert_eq!(code, "0", "sluice did not exit cleanly on SIGTERM");
    // drain 1 s + nothing in flight: well before the 20 s after which docker kills
    assert!(
        stopped_in < Duration::from_secs(10),
        "stopping took {stopped_in:?}"
    );
}
