//! Test harness: real `sluice` processes and real demo backends on free loopback ports,
//! readiness waits instead of sleeps, and processes killed by PID when a test ends.
#![allow(dead_code)]

pub mod h2raw;
pub mod redis;

use std::io::Read;
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

pub const BIN: &str = env!("CARGO_BIN_EXE_sluice");

/// Test ports come from below the kernel's ephemeral range (32768-60999 by default), so neither
/// another test's `bind(0)` nor an outgoing connection's local port can take one between the
/// moment it is picked and the moment a server binds it; and no port is handed out twice by
/// one test binary (its tests run in parallel threads). The start is spread by PID, for test
/// binaries that run side by side.
const PORT_FIRST: u32 = 20_000;
const PORT_COUNT: u32 = 12_000;
static PORT_NEXT: std::sync::OnceLock<std::sync::atomic::AtomicU32> = std::sync::OnceLock::new();

/// A port nothing in this test binary has been given and that was free on 127.0.0.1 (TCP)
/// a moment ago.
pub fn free_port() -> u16 {
    port_where(|port| TcpListener::bind(("127.0.0.1", port)).is_ok())
}

/// The next port of this binary's sequence for which `free` holds.
fn port_where(free: impl Fn(u16) -> bool) -> u16 {
    let next = PORT_NEXT.get_or_init(|| {
        std::sync::atomic::AtomicU32::new(std::process::id().wrapping_mul(97) % PORT_COUNT)
    });
    for _ in 0..PORT_COUNT {
        let n = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let port = (PORT_FIRST + n % PORT_COUNT) as u16;
        if free(port) {
            return port;
        }
    }
    panic!("no free port in {PORT_FIRST}..{}", PORT_FIRST + PORT_COUNT)
}

pub fn free_addr() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], free_port()))
}

pub fn wait_for_port(addr: SocketAddr, timeout: Duration) -> bool {
    let end = Instant::now() + timeout;
    while Instant::now() < end {
        if TcpStream::connect_timeout(&addr, Duration::from_millis(100)).is_ok() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    false
}

/// A child process killed (SIGKILL) by PID on drop.
pub struct Proc {
    pub child: Child,
    pub stderr_path: PathBuf,
}

impl Proc {
    pub fn pid(&self) -> i32 {
        self.child.id() as i32
    }
    pub fn signal(&self, sig: i32) {
        // SAFETY: kill(2) on a PID we spawned and still own.
        unsafe {
            libc::kill(self.pid(), sig);
        }
    }
    /// Waits up to `timeout` for the process to exit; returns its exit code.
    pub fn wait_exit(&mut self, timeout: Duration) -> Option<i32> {
        let end = Instant::now() + timeout;
        while Instant::now() < end {
            if let Ok(Some(status)) = self.child.try_wait() {
                return status.code();
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        None
    }
    pub fn stderr(&self) -> String {
        std::fs::read_to_string(&self.stderr_path).unwrap_or_default()
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn spawn(args: &[&str], dir: &Path, tag: &str) -> Proc {
    let stderr_path = dir.join(format!("{tag}.stderr"));
    let stdout_path = dir.join(format!("{tag}.stdout"));
    let child = Command::new(BIN)
        .args(args)
        .stdin(Stdio::null())
        .stdout(std::fs::File::create(&stdout_path).expect("stdout file"))
        .stderr(std::fs::File::create(&stderr_path).expect("stderr file"))
        .spawn()
        .expect("spawn sluice");
    Proc { child, stderr_path }
}

/// A running demo backend.
pub struct Backend {
    pub addr: SocketAddr,
    pub name: String,
    pub proc: Proc,
}

pub struct BackendTls<'a> {
    pub cert: &'a Path,
    pub key: &'a Path,
    pub client_ca: Option<&'a Path>,
}

impl Backend {
    pub fn start(dir: &Path, name: &str) -> Backend {
        Self::start_with(dir, name, None)
    }

    pub fn start_with(dir: &Path, name: &str, tls: Option<BackendTls>) -> Backend {
        Self::start_on(dir, name, free_addr(), tls)
    }

    /// Starts (or restarts) a backend on a given address.
    pub fn start_on(dir: &Path, name: &str, addr: SocketAddr, tls: Option<BackendTls>) -> Backend {
        let listen = addr.to_string();
        let mut args = vec!["demo-backend", "--listen", &listen, "--name", name];
        let (c, k, ca);
        if let Some(t) = &tls {
            c = t.cert.display().to_string();
            k = t.key.display().to_string();
            args.extend(["--tls-cert", &c, "--tls-key", &k]);
            if let Some(p) = t.client_ca {
                ca = p.display().to_string();
                args.extend(["--client-ca", &ca]);
            }
        }
        let proc = spawn(&args, dir, &format!("backend-{name}-{}", addr.port()));
        assert!(
            wait_for_port(addr, Duration::from_secs(10)),
            "backend {name} did not start: {}",
            proc.stderr()
        );
        Backend {
            addr,
            name: name.to_string(),
            proc,
        }
    }
}

/// A running gateway with its temp dir, admin address and listener addresses.
pub struct Sluice {
    pub proc: Proc,
    pub admin: SocketAddr,
    pub dir: PathBuf,
    pub config: PathBuf,
}

impl Sluice {
    /// Writes `config` (with `{admin}` replaced by a free admin address) to `dir/sluice.toml`,
    /// starts the gateway and waits until `/readyz` says 200.
    pub fn start(dir: &Path, config: &str) -> Sluice {
        let admin = free_addr();
        let text = config.replace("{admin}", &admin.to_string());
        let path = dir.join("sluice.toml");
        std::fs::write(&path, text).expect("write config");
        Self::start_file(dir, &path, admin)
    }

    /// Starts sluice on an existing config file whose admin listener is `admin`.
    pub fn start_file(dir: &Path, path: &Path, admin: SocketAddr) -> Sluice {
        let proc = spawn(&["run", "-c", &path.display().to_string()], dir, "sluice");
        let mut s = Sluice {
            proc,
            admin,
            dir: dir.to_path_buf(),
            config: path.to_path_buf(),
        };
        let end = Instant::now() + Duration::from_secs(20);
        loop {
            // The body too: a 200 from anything else on the port is not this sluice.
            if s.admin_get("/readyz") == Some((200, "ready\n".to_string())) {
                break;
            }
            if let Ok(Some(status)) = s.proc.child.try_wait() {
                panic!("sluice exited with {status}: {}", s.proc.stderr());
            }
            assert!(
                Instant::now() < end,
                "sluice not ready: {}",
                s.proc.stderr()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        s
    }

    /// A minimal blocking HTTP/1.1 GET against the admin listener: (status, body).
    pub fn admin_get(&self, path: &str) -> Option<(u16, String)> {
        http_get(self.admin, path)
    }

    pub fn status(&self) -> serde_json::Value {
        let (code, body) = self.admin_get("/status").expect("status");
        assert_eq!(code, 200);
        serde_json::from_str(&body).expect("status json")
    }

    /// The value of one sample line of /metrics, e.g. `sluice_config_generation` or
    /// `sluice_config_reloads_total{result="ok"}`.
    pub fn metric(&self, sample: &str) -> Option<f64> {
        let (_, body) = self.admin_get("/metrics")?;
        body.lines()
            .find_map(|l| l.strip_prefix(sample)?.strip_prefix(' '))
            .and_then(|v| v.trim().parse().ok())
    }

    pub fn stdout(&self) -> String {
        std::fs::read_to_string(self.dir.join("sluice.stdout")).unwrap_or_default()
    }

    /// Waits (up to 5 s) until stdout satisfies `pred`; returns stdout either way.
    pub fn wait_stdout(&self, pred: impl Fn(&str) -> bool) -> String {
        let end = Instant::now() + Duration::from_secs(5);
        loop {
            let out = self.stdout();
            if pred(&out) || Instant::now() > end {
                return out;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

/// An HTTP/1.1 answer.
pub struct Reply {
    pub code: u16,
    pub headers: Vec<(String, String)>,
    pub body: String,
}

impl Reply {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }
}

/// A blocking HTTP/1.1 request without a body on a new connection (`Connection: close`).
/// `Host` defaults to `test` unless `headers` has one.
pub fn request(
    addr: SocketAddr,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
) -> Option<Reply> {
    request_with_body(addr, method, path, headers, b"")
}

/// `request` with a body (sent with its `Content-Length`).
pub fn request_with_body(
    addr: SocketAddr,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &[u8],
) -> Option<Reply> {
    use std::io::Write;
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_millis(500)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(10))).ok()?;
    let mut req = format!(
        "{method} {path} HTTP/1.1\r\nConnection: close\r\nContent-Length: {}\r\n",
        body.len()
    );
    if !headers.iter().any(|(k, _)| k.eq_ignore_ascii_case("host")) {
        req.push_str("Host: test\r\n");
    }
    for (k, v) in headers {
        req.push_str(&format!("{k}: {v}\r\n"));
    }
    req.push_str("\r\n");
    s.write_all(req.as_bytes()).ok()?;
    s.write_all(body).ok()?;
    let mut buf = String::new();
    s.read_to_string(&mut buf).ok()?;
    let (head, body) = buf.split_once("\r\n\r\n")?;
    let mut lines = head.lines();
    let code = lines.next()?.split(' ').nth(1)?.parse().ok()?;
    let headers = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_string(), v.trim().to_string()))
        .collect();
    Some(Reply {
        code,
        headers,
        body: body.to_string(),
    })
}

/// GET `path`: (status, body).
pub fn http_get(addr: SocketAddr, path: &str) -> Option<(u16, String)> {
    http_request(addr, "GET", path, &[])
}

/// (status, body) of `request`.
pub fn http_request(
    addr: SocketAddr,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
) -> Option<(u16, String)> {
    request(addr, method, path, headers).map(|r| (r.code, r.body))
}

/// Config text: pools `blue` and `green` of one backend each, and route `shop` (every host)
/// over them at `weights`; keys of `[[route]]` may follow.
pub fn shop_pools_and_route(blue: SocketAddr, green: SocketAddr, weights: (u8, u8)) -> String {
    format!(
        r#"[[pool]]
name = "blue"
backends = ["{blue}"]
[[pool]]
name = "green"
backends = ["{green}"]
[[route]]
name = "shop"
hosts = ["*"]
blue = ["blue"]
green = ["green"]
weights = {{ blue = {}, green = {} }}
"#,
        weights.0, weights.1
    )
}

/// `"a", "b"` for a TOML array of addresses.
pub fn toml_addrs(addrs: &[SocketAddr]) -> String {
    addrs
        .iter()
        .map(|a| format!("\"{a}\""))
        .collect::<Vec<_>>()
        .join(", ")
}

/// A test CA and certificates it signs, written as PEM files.
pub struct Ca {
    pub cert: rcgen::Certificate,
    pub key: rcgen::KeyPair,
    pub pem_path: PathBuf,
}

impl Ca {
    pub fn new(dir: &Path, name: &str) -> Ca {
        let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).expect("params");
        params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, format!("sluice test CA {name}"));
        let key = rcgen::KeyPair::generate().expect("key");
        let cert = params.self_signed(&key).expect("ca");
        let pem_path = dir.join(format!("{name}-ca.pem"));
        std::fs::write(&pem_path, cert.pem()).expect("write ca");
        Ca {
            cert,
            key,
            pem_path,
        }
    }

    /// Issues a leaf for `names`; returns (cert path, key path).
    pub fn issue(&self, dir: &Path, file: &str, names: &[&str]) -> (PathBuf, PathBuf) {
        let params =
            rcgen::CertificateParams::new(names.iter().map(|s| s.to_string()).collect::<Vec<_>>())
                .expect("params");
        let key = rcgen::KeyPair::generate().expect("key");
        let cert = params.signed_by(&key, &self.cert, &self.key).expect("sign");
        let (cp, kp) = (
            dir.join(format!("{file}.crt")),
            dir.join(format!("{file}.key")),
        );
        std::fs::write(&cp, cert.pem()).expect("write");
        std::fs::write(&kp, key.serialize_pem()).expect("write");
        (cp, kp)
    }

    /// A TLS connector that trusts only this CA (TLS 1.3 and 1.2, or 1.2 alone).
    pub fn connector(&self, tls12_only: bool) -> tokio_rustls::TlsConnector {
        let mut roots = rustls::RootCertStore::empty();
        roots
            .add(rustls::pki_types::CertificateDer::from(
                self.cert.der().to_vec(),
            ))
            .expect("CA root");
        let versions: &[&rustls::SupportedProtocolVersion] = if tls12_only {
            &[&rustls::version::TLS12]
        } else {
            &[&rustls::version::TLS13, &rustls::version::TLS12]
        };
        let cfg = rustls::ClientConfig::builder_with_provider(std::sync::Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_protocol_versions(versions)
        .expect("versions")
        .with_root_certificates(roots)
        .with_no_client_auth();
        tokio_rustls::TlsConnector::from(std::sync::Arc::new(cfg))
    }

    pub fn reqwest_cert(&self) -> reqwest::Certificate {
        reqwest::Certificate::from_pem(self.cert.pem().as_bytes()).expect("ca pem")
    }
}

pub fn tempdir() -> tempfile::TempDir {
    tempfile::Builder::new()
        .prefix("sluice-test-")
        .tempdir()
        .expect("tempdir")
}

/// A reqwest client that never pools connections (each request is its own connection),
/// trusting `ca` when given.
pub fn client(ca: Option<&Ca>) -> reqwest::Client {
    let mut b = reqwest::Client::builder()
        .use_rustls_tls()
        .timeout(Duration::from_secs(20))
        .redirect(reqwest::redirect::Policy::none());
    if let Some(ca) = ca {
        b = b.add_root_certificate(ca.reqwest_cert());
    }
    b.build().expect("client")
}

pub fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime")
}

/// Polls `pred` every 10 ms for up to `timeout`; true once it held.
pub fn wait_until(timeout: Duration, mut pred: impl FnMut() -> bool) -> bool {
    let end = Instant::now() + timeout;
    loop {
        if pred() {
            return true;
        }
        if Instant::now() > end {
            return false;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// Replaces `path` the way editors do: write a temp file beside it, then rename over it.
pub fn write_by_rename(path: &Path, text: &str) {
    let tmp = path.with_extension("tmp~");
    std::fs::write(&tmp, text).expect("write temp");
    std::fs::rename(&tmp, path).expect("rename");
}

/// A backend that records every byte it receives (all connections, in arrival order) and
/// answers each complete request `200 ok` (with an `X-Raw-Backend: Yes` header), or with the
/// bytes given to [`RawBackend::answering`]. For asserting exactly what sluice forwards, or how
/// it passes on an answer of a given shape.
pub struct RawBackend {
    pub addr: SocketAddr,
    received: std::sync::Arc<std::sync::Mutex<Vec<u8>>>,
    requests: std::sync::Arc<std::sync::atomic::AtomicUsize>,
}

impl RawBackend {
    pub fn start() -> RawBackend {
        Self::answering(
            b"HTTP/1.1 200 OK\r\ncontent-length: 3\r\ncontent-type: text/plain\r\nX-Raw-Backend: Yes\r\n\r\nok\n",
        )
    }

    /// As [`RawBackend::start`], answering every complete request with `answer` as it is.
    pub fn answering(answer: &'static [u8]) -> RawBackend {
        use std::sync::atomic::Ordering;
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
        let addr = listener.local_addr().expect("addr");
        let received = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let requests = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let (rx, rq) = (received.clone(), requests.clone());
        std::thread::spawn(move || {
            for conn in listener.incoming() {
                let Ok(mut conn) = conn else { return };
                let (rx, rq) = (rx.clone(), rq.clone());
                std::thread::spawn(move || {
                    use std::io::Write;
                    let mut pending: Vec<u8> = Vec::new();
                    let mut buf = [0u8; 16384];
                    loop {
                        let n = match conn.read(&mut buf) {
                            Ok(0) | Err(_) => return,
                            Ok(n) => n,
                        };
                        rx.lock().expect("lock").extend_from_slice(&buf[..n]);
                        pending.extend_from_slice(&buf[..n]);
                        while let Some(len) = complete_request(&pending) {
                            pending.drain(..len);
                            rq.fetch_add(1, Ordering::SeqCst);
                            let _ = conn.write_all(answer);
                        }
                    }
                });
            }
        });
        RawBackend {
            addr,
            received,
            requests,
        }
    }

    /// Everything received so far.
    pub fn received(&self) -> Vec<u8> {
        self.received.lock().expect("lock").clone()
    }

    /// Complete requests answered so far.
    pub fn requests(&self) -> usize {
        self.requests.load(std::sync::atomic::Ordering::SeqCst)
    }

    pub fn clear(&self) {
        self.received.lock().expect("lock").clear();
    }
}

/// Reads from `conn` until it holds a complete request (see [`complete_request`]) and returns
/// what was read; `None` when the connection ends or fails first.
pub fn read_request(conn: &mut TcpStream) -> Option<Vec<u8>> {
    let mut head = Vec::new();
    let mut buf = [0u8; 4096];
    while complete_request(&head).is_none() {
        match conn.read(&mut buf) {
            Ok(0) | Err(_) => return None,
            Ok(n) => head.extend_from_slice(&buf[..n]),
        }
    }
    Some(head)
}

/// The length of the first complete request in `b` (head, then a Content-Length or chunked
/// body), if it is complete.
pub fn complete_request(b: &[u8]) -> Option<usize> {
    let end = b.windows(4).position(|w| w == b"\r\n\r\n")? + 4;
    let head = String::from_utf8_lossy(&b[..end]).to_ascii_lowercase();
    let field = |name: &str| {
        head.lines().find_map(|l| {
            l.strip_prefix(&format!("{name}:"))
                .map(|v| v.trim().to_string())
        })
    };
    if field("transfer-encoding").is_some_and(|v| v.contains("chunked")) {
        let mut at = end;
        loop {
            let line_end = b[at..].windows(2).position(|w| w == b"\r\n")? + at;
            let size_text = String::from_utf8_lossy(&b[at..line_end]);
            let size = usize::from_str_radix(size_text.split(';').next()?.trim(), 16).ok()?;
            at = line_end + 2;
            if size == 0 {
                // trailers end with an empty line
                let t = b[at..].windows(2).position(|w| w == b"\r\n")?;
                if t == 0 {
                    return Some(at + 2);
                }
                let rest = b[at..].windows(4).position(|w| w == b"\r\n\r\n")?;
                return Some(at + rest + 4);
            }
            if b.len() < at + size + 2 {
                return None;
            }
            at += size + 2;
        }
    }
    let len: usize = field("content-length")
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    (b.len() >= end + len).then_some(end + len)
}

/// The value of header `name` (any case) in an HTTP/1.x head, trimmed.
pub fn head_header<'a>(head: &'a str, name: &str) -> Option<&'a str> {
    head.lines().find_map(|l| {
        let (k, v) = l.split_once(':')?;
        k.eq_ignore_ascii_case(name).then(|| v.trim())
    })
}

/// One HTTP/1.1 response read from `s`: (status, head, body); `None` when the connection
/// closed (or timed out) before a whole response arrived.
pub fn read_response(s: &mut TcpStream) -> Option<(u16, String, Vec<u8>)> {
    let _ = s.set_read_timeout(Some(Duration::from_secs(10)));
    let mut got = Vec::new();
    let mut buf = [0u8; 8192];
    let end = loop {
        if let Some(p) = got.windows(4).position(|w| w == b"\r\n\r\n") {
            break p + 4;
        }
        match s.read(&mut buf) {
            Ok(0) | Err(_) => return None,
            Ok(n) => got.extend_from_slice(&buf[..n]),
        }
    };
    let head = String::from_utf8_lossy(&got[..end]).to_string();
    let code = head.split(' ').nth(1)?.parse().ok()?;
    let len: usize = head_header(&head, "content-length")
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    while got.len() < end + len {
        match s.read(&mut buf) {
            Ok(0) | Err(_) => return None,
            Ok(n) => got.extend_from_slice(&buf[..n]),
        }
    }
    Some((code, head, got[end..end + len].to_vec()))
}

/// Whether the peer closed `s` (EOF or reset) within `timeout`, reading and dropping anything.
pub fn closed_within(s: &mut TcpStream, timeout: Duration) -> bool {
    let end = Instant::now() + timeout;
    let mut buf = [0u8; 4096];
    while Instant::now() < end {
        let _ = s.set_read_timeout(Some((end - Instant::now()).max(Duration::from_millis(1))));
        match s.read(&mut buf) {
            Ok(0) => return true,
            Ok(_) => {}
            Err(e)
                if e.kind() == std::io::ErrorKind::WouldBlock
                    || e.kind() == std::io::ErrorKind::TimedOut => {}
            Err(_) => return true,
        }
    }
    false
}

/// Raises this process's open-files limit to its hard limit (tests that hold many sockets).
pub fn raise_fd_limit() {
    // SAFETY: getrlimit/setrlimit on our own process with a valid struct.
    unsafe {
        let mut r = libc::rlimit {
            rlim_cur: 0,
            rlim_max: 0,
        };
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut r) == 0 {
            r.rlim_cur = r.rlim_max;
            libc::setrlimit(libc::RLIMIT_NOFILE, &r);
        }
    }
}

/// Resident memory of a process in KiB.
pub fn rss_kib(pid: i32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("VmRSS:"))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        })
        .unwrap_or(0)
}

/// A TCP connection from a chosen local address (127.0.0.x are all loopback on Linux).
pub fn connect_from(local: std::net::IpAddr, to: SocketAddr) -> std::io::Result<TcpStream> {
    let sock = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None)?;
    sock.bind(&SocketAddr::new(local, 0).into())?;
    sock.connect_timeout(&to.into(), Duration::from_secs(2))?;
    Ok(sock.into())
}

/// A real DNS server for the tests: dnsmasq on a free loopback port, answering for `*.test`
/// from files the test writes (re-read by dnsmasq as they change) and the SRV records given at
/// start. Killed by PID on drop; `stop` and `start` keep its port and records.
pub struct Dns {
    pub addr: SocketAddr,
    dir: PathBuf,
    srv: Vec<String>,
    proc: Option<Child>,
}

impl Dns {
    /// `srv`: dnsmasq `--srv-host` values (`_app._tcp.test,target,port,priority,weight`).
    pub fn start(dir: &Path, srv: &[&str]) -> Dns {
        let port = free_udp_port();
        let hosts = dir.join("dns-hosts");
        std::fs::create_dir_all(&hosts).expect("hosts dir");
        // dnsmasq may read them as another user
        use std::os::unix::fs::PermissionsExt;
        for d in [dir, hosts.as_path()] {
            let _ = std::fs::set_permissions(d, std::fs::Permissions::from_mode(0o755));
        }
        let mut dns = Dns {
            addr: SocketAddr::from(([127, 0, 0, 1], port)),
            dir: hosts,
            srv: srv.iter().map(|s| s.to_string()).collect(),
            proc: None,
        };
        dns.resume();
        dns
    }

    /// Starts (again) on the same port.
    pub fn resume(&mut self) {
        // /usr/sbin is not on every user's PATH
        let bin = ["/usr/sbin/dnsmasq", "/usr/bin/dnsmasq"]
            .into_iter()
            .find(|p| Path::new(p).exists())
            .unwrap_or("dnsmasq");
        let mut cmd = Command::new(bin);
        cmd.args([
            "--no-daemon",
            "--conf-file=/dev/null",
            "--pid-file=",
            "--bind-interfaces",
            "--listen-address=127.0.0.1",
            "--no-resolv",
            "--no-hosts",
            "--local=/test/",
            "--local-ttl=1",
            "--log-facility=-",
        ])
        .arg(format!("--port={}", self.addr.port()))
        .arg(format!("--hostsdir={}", self.dir.display()))
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(self.dir.with_extension("log")).expect("log"));
        // as root, dnsmasq would switch to "nobody" after binding
        // SAFETY: geteuid has no preconditions.
        if unsafe { libc::geteuid() } == 0 {
            cmd.arg("--user=root");
        }
        for s in &self.srv {
            cmd.arg(format!("--srv-host={s}"));
        }
        let child = cmd.spawn().expect("dnsmasq (make test installs it)");
        self.proc = Some(child);
        let ok = wait_until(Duration::from_secs(10), || {
            std::fs::read_to_string(self.dir.with_extension("log"))
                .is_ok_and(|l| l.contains("started"))
        });
        assert!(
            ok,
            "dnsmasq did not start: {:?}",
            std::fs::read_to_string(self.dir.with_extension("log"))
        );
    }

    /// Kills it (SIGKILL, by PID).
    pub fn stop(&mut self) {
        if let Some(mut c) = self.proc.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// `name` answers with these addresses (A and AAAA); none: the name goes away.
    pub fn set(&self, name: &str, ips: &[&str]) {
        let path = self.dir.join(name);
        if ips.is_empty() {
            // an empty file (dnsmasq forgets what a changed file no longer says)
            std::fs::write(&path, "").expect("hosts file");
            return;
        }
        let text: String = ips.iter().map(|ip| format!("{ip} {name}\n")).collect();
        let tmp = self.dir.join(format!(".{name}.tmp"));
        std::fs::write(&tmp, text).expect("hosts file");
        use std::os::unix::fs::PermissionsExt;
        let _ = std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(0o644));
        std::fs::rename(&tmp, &path).expect("rename");
    }
}

impl Drop for Dns {
    fn drop(&mut self) {
        self.stop();
    }
}

/// A port free for UDP and TCP (dnsmasq listens on both) a moment ago.
pub fn free_udp_port() -> u16 {
    port_where(|port| {
        std::net::UdpSocket::bind(("127.0.0.1", port)).is_ok()
            && TcpListener::bind(("127.0.0.1", port)).is_ok()
    })
}

/// A port free on every one of `ips` (loopback addresses) a moment ago.
pub fn free_port_on(ips: &[&str]) -> u16 {
    port_where(|port| {
        ips.iter().all(|ip| {
            TcpListener::bind((ip.parse::<std::net::IpAddr>().expect("ip"), port)).is_ok()
        })
    })
}

/// The metric families a running sluice exports with every feature that has metrics on: fleet
/// mode (a real Redis), a backend by DNS name, blue-green, a rate limit, health checks.
pub fn running_metric_names() -> Vec<String> {
    let dir = tempdir();
    let redis = redis::Redis::start(dir.path());
    let blue = Backend::start(dir.path(), "blue");
    let green = Backend::start(dir.path(), "green");
    let listen = free_addr();
    let s = Sluice::start(
        dir.path(),
        &format!(
            r#"[admin]
listen = "{{admin}}"
[cluster]
redis = "redis://{redis}/0"
key_prefix = "metrics:"
[[listener]]
listen = "{listen}"
[rate_limit]
requests = 100
per = "1m"
scope = "cluster"
[[pool]]
name = "blue"
backends = ["{blue}"]
health = {{ path = "/healthz", interval = "200ms" }}
[[pool]]
name = "green"
backends = ["localhost:{green_port}"]
[[route]]
name = "shop"
hosts = ["*"]
blue = ["blue"]
green = ["green"]
"#,
            redis = redis.addr,
            blue = blue.addr,
            green_port = green.addr.port(),
        ),
    );
    assert_eq!(http_get(listen, "/").map(|r| r.0), Some(200));
    assert!(wait_until(Duration::from_secs(5), || s
        .metric("sluice_cluster_store_up")
        == Some(1.0)));
    let (_, body) = s.admin_get("/metrics").expect("metrics");
    let mut names: Vec<String> = body
        .lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(|l| l.split(['{', ' ']).next())
        .map(metric_family)
        .collect();
    names.sort();
    names.dedup();
    names
}

/// The metric family of a sample name (a histogram's `_bucket`, `_sum` and `_count` series
/// belong to it).
pub fn metric_family(sample: &str) -> String {
    sample
        .trim_end_matches("_bucket")
        .trim_end_matches("_sum")
        .trim_end_matches("_count")
        .to_string()
}

/// The `sluice_*` metric families an expression names.
pub fn metrics_in(expr: &str) -> Vec<String> {
    expr.split(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
        .filter(|w| w.starts_with("sluice_"))
        .map(metric_family)
        .collect()
}
