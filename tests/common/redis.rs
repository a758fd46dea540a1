//! Real Redis servers (and Sentinels) for fleet-mode tests: Debian's `redis-server` on free
//! loopback ports, without persistence. Each one runs under a small shell watcher that kills
//! it (by PID) when the test process is gone, so a server shared by a whole test binary does
//! not outlive it.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use super::{free_port, wait_for_port};

pub struct Redis {
    pub addr: SocketAddr,
    dir: PathBuf,
    args: Vec<String>,
    tag: String,
    proc: Option<Child>,
}

fn bin(name: &str) -> String {
    ["/usr/bin/", "/usr/sbin/", "/usr/local/bin/"]
        .iter()
        .map(|d| format!("{d}{name}"))
        .find(|p| Path::new(p).exists())
        .unwrap_or_else(|| name.to_string())
}

impl Redis {
    /// A standalone server.
    pub fn start(dir: &Path) -> Redis {
        Self::with_args(dir, "redis", &[])
    }

    /// A replica of `master`.
    pub fn replica_of(dir: &Path, master: SocketAddr) -> Redis {
        let of = format!("{} {}", master.ip(), master.port());
        Self::with_args(dir, "replica", &["--replicaof", &of])
    }

    /// A server that speaks TLS only, requiring client certificates signed by `ca`.
    pub fn tls(dir: &Path, cert: &Path, key: &Path, ca: &Path) -> Redis {
        let port = free_port();
        let p = port.to_string();
        let (c, k, a) = (
            cert.display().to_string(),
            key.display().to_string(),
            ca.display().to_string(),
        );
        Self::on_port(
            dir,
            "tls",
            port,
            &[
                "--port",
                "0",
                "--tls-port",
                &p,
                "--tls-cert-file",
                &c,
                "--tls-key-file",
                &k,
                "--tls-ca-cert-file",
                &a,
                "--tls-auth-clients",
                "yes",
            ],
        )
    }

    /// A node of a Redis Cluster (joined by [`create_cluster`]).
    pub fn cluster_node(dir: &Path) -> Redis {
        let port = free_port();
        // The cluster bus port is the client port + 10000 unless named: name a free one.
        let bus = free_port().to_string();
        let conf = dir.join(format!("nodes-{port}.conf"));
        let conf = conf.display().to_string();
        Self::on_port(
            dir,
            "cluster",
            port,
            &[
                "--cluster-enabled",
                "yes",
                "--cluster-config-file",
                &conf,
                "--cluster-node-timeout",
                "2000",
                "--cluster-port",
                &bus,
            ],
        )
    }

    fn with_args(dir: &Path, tag: &str, extra: &[&str]) -> Redis {
        Self::on_port(dir, tag, free_port(), extra)
    }

    fn on_port(dir: &Path, tag: &str, port: u16, extra: &[&str]) -> Redis {
        let mut r = Redis {
            addr: SocketAddr::from(([127, 0, 0, 1], port)),
            dir: dir.to_path_buf(),
            args: extra.iter().map(|s| s.to_string()).collect(),
            tag: format!("{tag}-{port}"),
            proc: None,
        };
        r.resume();
        r
    }

    /// A Sentinel watching `master` (quorum 1, quick failure detection).
    pub fn sentinel(dir: &Path, name: &str, master: SocketAddr) -> Redis {
        let port = free_port();
        let conf = dir.join(format!("sentinel-{port}.conf"));
        std::fs::write(
            &conf,
            format!(
                "port {port}\nbind 127.0.0.1\ndir {dir}\n\
                 sentinel monitor {name} {} {} 1\n\
                 sentinel down-after-milliseconds {name} 500\n\
                 sentinel failover-timeout {name} 3000\n\
                 sentinel parallel-syncs {name} 1\n",
                master.ip(),
                master.port(),
                dir = dir.display()
            ),
        )
        .expect("sentinel conf");
        let mut r = Redis {
            addr: SocketAddr::from(([127, 0, 0, 1], port)),
            dir: dir.to_path_buf(),
            args: vec![conf.display().to_string(), "--sentinel".into()],
            tag: format!("sentinel-{port}"),
            proc: None,
        };
        r.resume();
        r
    }

    /// Starts (again, empty) on the same port.
    pub fn resume(&mut self) {
        let server = bin("redis-server");
        let mut cmdline = vec![server];
        let sentinel = self.args.iter().any(|a| a == "--sentinel");
        if sentinel {
            cmdline.extend(self.args.iter().cloned());
        } else {
            cmdline.extend(
                [
                    "--port",
                    &self.addr.port().to_string(),
                    "--bind",
                    "127.0.0.1",
                    "--save",
                    "",
                    "--appendonly",
                    "no",
                    "--dir",
                    &self.dir.display().to_string(),
                    "--dbfilename",
                    &format!("{}.rdb", self.tag),
                ]
                .iter()
                .map(|s| s.to_string()),
            );
            cmdline.extend(self.args.iter().cloned());
        }
        let quoted: Vec<String> = cmdline
            .iter()
            .map(|a| format!("'{}'", a.replace('\'', "'\\''")))
            .collect();
        // the watcher: redis runs as its child and dies when the test process is gone
        let script = format!(
            "{} & r=$!; trap 'kill -9 $r 2>/dev/null; exit 0' TERM; \
             while kill -0 {test} 2>/dev/null && kill -0 $r 2>/dev/null; do sleep 0.2; done; \
             kill $r 2>/dev/null",
            quoted.join(" "),
            test = std::process::id()
        );
        let log = self.dir.join(format!("{}.log", self.tag));
        let child = Command::new("sh")
            .arg("-c")
            .arg(script)
            .stdin(Stdio::null())
            .stdout(std::fs::File::create(&log).expect("log"))
            .stderr(Stdio::null())
            .spawn()
            .expect("redis-server (Debian package redis-server) must be installed");
        self.proc = Some(child);
        assert!(
            wait_for_port(self.addr, Duration::from_secs(10)),
            "{} did not start: {}",
            self.tag,
            std::fs::read_to_string(&log).unwrap_or_default()
        );
    }

    /// Kills the server (SIGTERM to the watcher, which kills redis by its PID and waits).
    pub fn stop(&mut self) {
        if let Some(mut c) = self.proc.take() {
            // SAFETY: kill(2) on the watcher we spawned and still own.
            unsafe {
                libc::kill(c.id() as i32, libc::SIGTERM);
            }
            let _ = c.wait();
            // the port closes when redis has exited
            let end = std::time::Instant::now() + Duration::from_secs(5);
            while std::time::Instant::now() < end && std::net::TcpStream::connect(self.addr).is_ok()
            {
                std::thread::sleep(Duration::from_millis(20));
            }
        }
    }

    /// One command through `redis-cli`: its output, trimmed.
    pub fn cli(&self, args: &[&str]) -> String {
        let out = Command::new(bin("redis-cli"))
            .args(["-h", "127.0.0.1", "-p", &self.addr.port().to_string()])
            .args(args)
            .output()
            .expect("redis-cli");
        String::from_utf8_lossy(&out.stdout).trim().to_string()
    }
}

/// Joins `nodes` (masters only) into one cluster and waits until it serves every slot.
pub fn create_cluster(nodes: &[Redis]) {
    let addrs: Vec<String> = nodes.iter().map(|n| n.addr.to_string()).collect();
    let out = Command::new(bin("redis-cli"))
        .arg("--cluster")
        .arg("create")
        .args(&addrs)
        .args(["--cluster-replicas", "0", "--cluster-yes"])
        .output()
        .expect("redis-cli --cluster create");
    assert!(
        out.status.success(),
        "cluster create: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        super::wait_until(Duration::from_secs(15), || nodes
            .iter()
            .all(|n| n.cli(&["CLUSTER", "INFO"]).contains("cluster_state:ok"))),
        "the cluster never became ok"
    );
}

impl Drop for Redis {
    fn drop(&mut self) {
        self.stop();
    }
}
