//! The config file contract (`shared/spec/sluice.example.toml`) read into one validated `Config`.
//!
//! Reading walks toml's spanned tree by hand so that *every* problem is reported at once, each as
//! `file:line:col: message`, the way `nginx -t` does. Unknown keys are errors, never ignored.

pub mod reader;

use std::collections::{HashMap, HashSet};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use ipnet::IpNet;
use sha2::{Digest, Sha256};
use toml::de::DeTable;

pub use reader::Diagnostic;
use reader::{At, Diagnostics, Span, Table};

pub use crate::rate_limit::Limit;
use crate::tls::{self, ServerCert, UpstreamTlsMaterial};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TlsVersion {
    V12,
    V13,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AccessLog {
    Stdout,
    Off,
    File(PathBuf),
}

#[derive(Debug, Clone)]
pub struct Server {
    pub threads: usize,
    pub grace_period: Duration,
    pub drain_delay: Duration,
    pub access_log: AccessLog,
}

#[derive(Clone)]
pub struct Admin {
    pub listen: SocketAddr,
    /// Bearer tokens from `token_file`; `None` when there is no token file (every mutating
    /// call is then refused).
    pub tokens: Option<Vec<String>>,
    /// Where admin weights and shifts are kept across restarts; `None`: they are not.
    pub state_file: Option<PathBuf>,
    /// One JSON line per mutating admin call; `None`: no audit trail.
    pub audit_log: Option<PathBuf>,
    /// Kinds of change (`"weights"`, `"shift"`) that wait for a second, different token.
    pub require_approval: Vec<String>,
    /// A pending change not approved by then expires.
    pub approval_timeout: Duration,
}

#[derive(Clone)]
pub struct CertEntry {
    pub hosts: Vec<String>,
    pub cert_path: PathBuf,
    pub key_path: PathBuf,
    pub loaded: ServerCert,
}

#[derive(Clone)]
pub struct Tls {
    pub min_version: TlsVersion,
    pub hsts: String,
    pub certs: Vec<CertEntry>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Listener {
    pub listen: SocketAddr,
    pub tls: bool,
    pub http2: bool,
    pub redirect_https: Option<u16>,
}

/// `[limits]`: what clients may hold. Every default is in force without the table.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Limits {
    /// Open downstream connections, all listeners together.
    pub max_connections: u32,
    /// Per client IP (IPv6 by `rate_limit.ipv6_prefix`); 0 = no limit.
    pub max_connections_per_ip: u32,
    /// The whole request head must arrive within this.
    pub header_timeout: Duration,
    /// Idle time allowed between requests on one connection.
    pub keepalive_timeout: Duration,
    /// Requests on one HTTP/1.1 connection before it is closed gracefully.
    pub keepalive_requests: u32,
    /// Request line + headers (and an h2 header list); larger gets 431.
    pub max_header_bytes: usize,
    /// Request body; larger gets 413. `[route.limits]` may override it.
    pub max_body_bytes: u64,
    pub h2_max_concurrent_streams: u32,
    /// A response that cannot be written for this long (a client that stopped reading, an h2
    /// flow-control window left at zero) is abandoned. Added to the contract.
    pub send_timeout: Duration,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_connections: 100_000,
            max_connections_per_ip: 256,
            header_timeout: Duration::from_secs(10),
            keepalive_timeout: Duration::from_secs(60),
            keepalive_requests: 10_000,
            max_header_bytes: 32 * 1024,
            max_body_bytes: 10 * 1024 * 1024,
            h2_max_concurrent_streams: 128,
            send_timeout: Duration::from_secs(60),
        }
    }
}

#[derive(Debug, Clone)]
pub struct ClientIp {
    pub trusted_proxies: Vec<IpNet>,
    pub proxy_protocol: bool,
}

/// `[geoip]`: the database, opened when the config loads.
#[derive(Clone)]
pub struct GeoIp {
    pub path: PathBuf,
    pub db: std::sync::Arc<crate::geo::GeoDb>,
    /// Response header that names the region chosen (for debugging); off when `None`.
    pub debug_header: Option<String>,
}

/// `[rate_limit]`: a quota per client IP for every route that does not override it.
#[derive(Debug, Clone)]
pub struct RateLimit {
    pub limit: Limit,
    pub ipv6_prefix: u8,
    pub exempt: Vec<IpNet>,
    /// `scope = "cluster"`: counts are shared through `[cluster]`, exchanged every `sync`
    /// (`Duration::ZERO`: one Redis call per request). `None`: each replica counts alone.
    pub cluster_sync: Option<Duration>,
}

/// `[cluster]`: fleet mode through Redis.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Cluster {
    pub redis: RedisTarget,
    pub password_file: Option<PathBuf>,
    pub tls: Option<RedisTls>,
    /// This replica's name in `/status`, the audit log and the lease.
    pub instance: String,
    pub key_prefix: String,
    /// Per Redis command.
    pub timeout: Duration,
}

/// Where Redis is, from `cluster.redis`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RedisTarget {
    /// `redis://` or `rediss://` (the URL as given).
    Single { url: String },
    /// `redis+sentinel://h1:26379,h2:26379/mymaster[/db]`: the master is asked of the sentinels.
    Sentinel {
        sentinels: Vec<String>,
        master: String,
        db: i64,
        tls: bool,
    },
    /// `redis+cluster://h1:6379,h2:6379`.
    Cluster { nodes: Vec<String>, tls: bool },
}

/// `cluster.tls`: files of a `rediss://` connection.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RedisTls {
    pub ca: Option<PathBuf>,
    pub cert: Option<PathBuf>,
    pub key: Option<PathBuf>,
}

/// A route's rate limit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RouteLimit {
    /// `[rate_limit]` applies (if there is one).
    Inherit,
    /// `rate_limit = false`: never limited.
    Off,
    /// `[route.rate_limit]`: its own quota.
    Own(Limit),
}

#[derive(Debug, Clone)]
pub struct Region {
    pub name: String,
    pub location: (f64, f64),
    pub countries: Vec<String>,
}

/// Where a backend entry points.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Target {
    /// `ip:port`: one backend.
    Addr(SocketAddr),
    /// `name:port`: every A and AAAA record of `name`, re-resolved per `[resolver]`.
    Name { host: String, port: u16 },
    /// `_service._proto.name`: every SRV target (address, port, weight).
    Srv(String),
}

impl Target {
    pub fn is_name(&self) -> bool {
        !matches!(self, Target::Addr(_))
    }
}

impl std::fmt::Display for Target {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Target::Addr(a) => write!(f, "{a}"),
            Target::Name { host, port } => write!(f, "{host}:{port}"),
            Target::Srv(n) => f.write_str(n),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Backend {
    pub target: Target,
    pub weight: u32,
}

/// `[resolver]`: how backends given by name are resolved.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Resolver {
    /// Name servers to ask; empty: the system's (`/etc/resolv.conf`, with its search domains
    /// and ndots).
    pub nameservers: Vec<SocketAddr>,
    /// Names are re-resolved at least this often (sooner when their TTL runs out).
    pub interval: Duration,
}

impl Default for Resolver {
    fn default() -> Self {
        Resolver {
            nameservers: Vec::new(),
            interval: Duration::from_secs(5),
        }
    }
}

#[derive(Clone)]
pub struct Pool {
    pub name: String,
    pub region: Option<String>,
    pub backends: Vec<Backend>,
    pub connect_timeout: Duration,
    pub read_timeout: Duration,
    pub tls: Option<UpstreamTlsMaterial>,
    pub http2: bool,
    pub health: HealthCheck,
    pub eject: Eject,
    /// Share of backends kept in rotation even when failing (0.0 ..= 1.0).
    pub min_healthy: f64,
}

/// Active checks: an HTTP GET of `path` (any 2xx/3xx is healthy), or a TCP connect when the
/// pool has no `health` table (`path` is `None`).
#[derive(Debug, Clone, PartialEq)]
pub struct HealthCheck {
    pub path: Option<String>,
    pub interval: Duration,
    pub timeout: Duration,
    pub unhealthy_after: u32,
    pub healthy_after: u32,
}

impl Default for HealthCheck {
    fn default() -> Self {
        HealthCheck {
            path: None,
            interval: Duration::from_secs(1),
            timeout: Duration::from_millis(500),
            unhealthy_after: 2,
            healthy_after: 2,
        }
    }
}

/// Passive ejection on live traffic.
#[derive(Debug, Clone, PartialEq)]
pub struct Eject {
    pub consecutive_failures: u32,
    pub base_time: Duration,
    pub max_time: Duration,
}

impl Default for Eject {
    fn default() -> Self {
        Eject {
            consecutive_failures: 3,
            base_time: Duration::from_secs(5),
            max_time: Duration::from_secs(60),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Sticky {
    Cookie,
    ClientIp,
    None,
}

/// `[route.rollback]`: when a running shift is undone because its target color fails.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Rollback {
    /// Failed share (5xx and failed connections) of the color's requests in `window`.
    pub max_error_rate: f64,
    pub window: Duration,
    /// Below this many requests in the window nothing is judged.
    pub min_requests: u32,
}

impl Default for Rollback {
    fn default() -> Self {
        Rollback {
            max_error_rate: 0.05,
            window: Duration::from_secs(30),
            min_requests: 20,
        }
    }
}

#[derive(Debug, Clone)]
pub struct Route {
    pub name: String,
    pub hosts: Vec<String>,
    pub path_prefix: String,
    /// Indexes into `Config::pools`.
    pub blue: Vec<usize>,
    pub green: Vec<usize>,
    pub weights: (u8, u8),
    pub sticky: Sticky,
    /// Lower-case header name; a request carrying `blue`/`green` there goes to that color.
    pub override_header: Option<String>,
    /// The error-rate rule of shifts; `None` (`rollback = false`): only a color without any
    /// healthy backend rolls a shift back.
    pub rollback: Option<Rollback>,
    pub rate_limit: RouteLimit,
    /// `[route.limits] max_body_bytes`; `None`: `[limits]`'s.
    pub max_body_bytes: Option<u64>,
}

/// A validated config: everything the runtime snapshot is built from.
#[derive(Clone)]
pub struct Config {
    pub path: PathBuf,
    pub sha256: String,
    pub server: Server,
    pub admin: Admin,
    pub tls: Option<Tls>,
    pub listeners: Vec<Listener>,
    pub limits: Limits,
    pub resolver: Resolver,
    pub client_ip: ClientIp,
    pub rate_limit: Option<RateLimit>,
    pub cluster: Option<Cluster>,
    pub tracing: Option<crate::trace::Config>,
    pub geoip: Option<GeoIp>,
    pub regions: Vec<Region>,
    pub pools: Vec<Pool>,
    pub routes: Vec<Route>,
    /// Every file this config reads besides itself (certificates, keys, CAs, tokens): a change
    /// to any of them is a reason to reload.
    pub files: Vec<PathBuf>,
}

impl std::fmt::Debug for Config {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Config")
            .field("path", &self.path)
            .field("sha256", &self.sha256)
            .field("listeners", &self.listeners)
            .field("routes", &self.routes)
            .finish_non_exhaustive()
    }
}

/// Reads and validates a config file. Errors list every problem found.
pub fn load(path: &Path) -> Result<Config, Vec<Diagnostic>> {
    let src = std::fs::read_to_string(path).map_err(|e| {
        vec![Diagnostic {
            file: path.to_path_buf(),
            line: 1,
            col: 1,
            message: format!("cannot read config file: {e}"),
        }]
    })?;
    parse(path, &src)
}

/// Validates config text as if it had been read from `path` (relative paths resolve against
/// the directory of `path`).
pub fn parse(path: &Path, src: &str) -> Result<Config, Vec<Diagnostic>> {
    let mut d = Diagnostics::new(path, src);
    let root = match DeTable::parse(src) {
        Ok(t) => t,
        Err(e) => {
            let span = e.span().unwrap_or(0..0);
            d.error(&span, format!("TOML syntax error: {}", e.message().trim()));
            return Err(d.list);
        }
    };
    let base = path
        .parent()
        .map(Path::to_path_buf)
        .unwrap_or_else(|| PathBuf::from("."));
    let root = Table::new(root.get_ref(), root.span(), "");
    let cfg = Builder {
        base,
        d: &mut d,
        files: Vec::new(),
    }
    .build(&root);
    match cfg {
        Some(mut cfg) if d.is_empty() => {
            cfg.path = path.to_path_buf();
            cfg.sha256 = hex(&Sha256::digest(src.as_bytes()));
            Ok(cfg)
        }
        _ => {
            let mut list = d.list;
            list.sort_by_key(|e| (e.line, e.col));
            Err(list)
        }
    }
}

pub fn hex(bytes: &[u8]) -> String {
    use std::fmt::Write;
    bytes.iter().fold(String::new(), |mut s, b| {
        let _ = write!(s, "{b:02x}");
        s
    })
}

struct Builder<'d, 's> {
    base: PathBuf,
    d: &'d mut Diagnostics<'s>,
    files: Vec<PathBuf>,
}

impl Builder<'_, '_> {
    fn path(&self, p: &str) -> PathBuf {
        let p = Path::new(p);
        if p.is_absolute() {
            p.to_path_buf()
        } else {
            self.base.join(p)
        }
    }

    fn build(&mut self, root: &Table) -> Option<Config> {
        root.check_keys(
            self.d,
            &[
                "server",
                "admin",
                "tls",
                "listener",
                "limits",
                "client_ip",
                "rate_limit",
                "geoip",
                "resolver",
                "cluster",
                "tracing",
                "region",
                "pool",
                "route",
            ],
        );

        let server = self.server(root);
        let admin = self.admin(root);
        let tls = self.tls(root);
        let listeners = self.listeners(root, tls.is_some());
        let tracing = root.table(self.d, "tracing").and_then(|t| self.tracing(&t));
        let cluster = root.table(self.d, "cluster").and_then(|t| self.cluster(&t));
        let limits = self.limits(root);
        let resolver = self.resolver(root);
        let client_ip = self.client_ip(root);
        let rate_limit = root
            .table(self.d, "rate_limit")
            .map(|t| self.rate_limit(&t, cluster.is_some()));
        let geoip = root.table(self.d, "geoip").and_then(|t| self.geoip(&t));
        let regions = self.regions(root);
        let pools = self.pools(root, &regions);
        let routes = self.routes(root, &pools);
        Some(Config {
            path: PathBuf::new(),
            sha256: String::new(),
            server: server?,
            admin: admin?,
            tls,
            listeners,
            limits,
            resolver,
            client_ip,
            rate_limit,
            cluster,
            tracing,
            geoip,
            regions,
            pools,
            routes,
            files: std::mem::take(&mut self.files),
        })
    }

    fn server(&mut self, root: &Table) -> Option<Server> {
        let default_threads = std::thread::available_parallelism().map_or(1, |n| n.get());
        let mut s = Server {
            threads: default_threads,
            grace_period: Duration::from_secs(15),
            drain_delay: Duration::from_secs(2),
            access_log: AccessLog::Stdout,
        };
        let Some(t) = root.table(self.d, "server") else {
            return (!root.has("server")).then_some(s);
        };
        t.check_keys(
            self.d,
            &["threads", "grace_period", "drain_delay", "access_log"],
        );
        if let Some(n) = t.integer(self.d, "threads", 1, 1024) {
            s.threads = n.value as usize;
        }
        if let Some(g) = t.duration(self.d, "grace_period") {
            if g.value > Duration::from_secs(30) {
                self.d
                    .error(&g.span, "`server.grace_period` must be <= 30s");
            }
            s.grace_period = g.value;
        }
        if let Some(g) = t.duration(self.d, "drain_delay") {
            if g.value > Duration::from_secs(60) {
                self.d.error(&g.span, "`server.drain_delay` must be <= 60s");
            }
            s.drain_delay = g.value;
        }
        if let Some(a) = t.string(self.d, "access_log") {
            s.access_log = match a.value.as_str() {
                "stdout" => AccessLog::Stdout,
                "off" => AccessLog::Off,
                "" => {
                    self.d.error(
                        &a.span,
                        "`server.access_log` must be \"stdout\", \"off\" or a file path",
                    );
                    AccessLog::Off
                }
                p => AccessLog::File(self.path(p)),
            };
        }
        Some(s)
    }

    fn socket_addr(&mut self, a: &At<String>, key: &str) -> Option<SocketAddr> {
        match a.value.parse::<SocketAddr>() {
            Ok(s) => Some(s),
            Err(_) => {
                self.d.error(
                    &a.span,
                    format!(
                        "`{key}` = \"{}\" is not an \"ip:port\" address (\"[::]:8443\" for IPv6)",
                        a.value
                    ),
                );
                None
            }
        }
    }

    fn admin(&mut self, root: &Table) -> Option<Admin> {
        let mut admin = Admin {
            listen: SocketAddr::from(([127, 0, 0, 1], 9900)),
            tokens: None,
            state_file: None,
            audit_log: None,
            require_approval: Vec::new(),
            approval_timeout: Duration::from_secs(15 * 60),
        };
        let Some(t) = root.table(self.d, "admin") else {
            return (!root.has("admin")).then_some(admin);
        };
        t.check_keys(
            self.d,
            &[
                "listen",
                "token_file",
                "state_file",
                "audit_log",
                "require_approval",
                "approval_timeout",
            ],
        );
        if let Some(list) = t.strings(self.d, "require_approval") {
            for k in list.value {
                if k.value != "weights" && k.value != "shift" {
                    self.d.error(
                        &k.span,
                        format!(
                            "`admin.require_approval`: \"{}\" is not \"weights\" or \"shift\"",
                            k.value
                        ),
                    );
                } else if !admin.require_approval.contains(&k.value) {
                    admin.require_approval.push(k.value);
                }
            }
        }
        if let Some(d) = t.duration(self.d, "approval_timeout") {
            if d.value < Duration::from_secs(1) || d.value > Duration::from_secs(7 * 24 * 3600) {
                self.d.error(
                    &d.span,
                    "`admin.approval_timeout` must be between 1s and 7 days",
                );
            } else {
                admin.approval_timeout = d.value;
            }
        }
        for key in ["state_file", "audit_log"] {
            // written by sluice (the directory is created when missing): need not exist yet
            let Some(f) = t.string(self.d, key) else {
                continue;
            };
            if f.value.is_empty() || f.value.ends_with('/') {
                self.d
                    .error(&f.span, format!("`admin.{key}` must be a file path"));
                continue;
            }
            let p = Some(self.path(&f.value));
            if key == "state_file" {
                admin.state_file = p;
            } else {
                admin.audit_log = p;
            }
        }
        if admin.state_file.is_some() && admin.state_file == admin.audit_log {
            self.d.error(
                &t.span,
                "`admin.state_file` and `admin.audit_log` must be different files",
            );
        }
        if let Some(f) = t.string(self.d, "token_file") {
            let p = self.path(&f.value);
            if self.file_exists(&p, &f.span, "admin.token_file") {
                match std::fs::read_to_string(&p) {
                    // one token per line; blank lines and surrounding spaces are not tokens
                    Ok(text) => {
                        admin.tokens = Some(
                            text.lines()
                                .map(str::trim)
                                .filter(|l| !l.is_empty())
                                .map(String::from)
                                .collect(),
                        )
                    }
                    Err(e) => self.d.error(
                        &f.span,
                        format!("`admin.token_file`: cannot read {}: {e}", p.display()),
                    ),
                }
            }
        }
        if let Some(l) = t.string(self.d, "listen") {
            admin.listen = self.socket_addr(&l, "admin.listen")?;
        }
        Some(admin)
    }

    fn tls(&mut self, root: &Table) -> Option<Tls> {
        let t = root.table(self.d, "tls")?;
        t.check_keys(self.d, &["min_version", "hsts", "cert"]);
        let mut tls = Tls {
            min_version: TlsVersion::V13,
            hsts: "max-age=31536000".to_string(),
            certs: Vec::new(),
        };
        if let Some(v) = t.string(self.d, "min_version") {
            tls.min_version = match v.value.as_str() {
                "1.2" => TlsVersion::V12,
                "1.3" => TlsVersion::V13,
                _ => {
                    self.d
                        .error(&v.span, "`tls.min_version` must be \"1.2\" or \"1.3\"");
                    TlsVersion::V13
                }
            };
        }
        if let Some(h) = t.string(self.d, "hsts") {
            if http::HeaderValue::from_str(&h.value).is_err() {
                self.d.error(
                    &h.span,
                    "`tls.hsts` must be a header value (visible ASCII characters)",
                );
            }
            tls.hsts = h.value;
        }
        let certs = t.tables(self.d, "cert");
        if certs.is_empty() {
            self.d.error(
                &t.span,
                "[tls] needs at least one [[tls.cert]] with hosts, cert and key",
            );
        }
        for c in certs {
            c.check_keys(self.d, &["hosts", "cert", "key"]);
            let hosts = self.host_patterns(&c, "hosts");
            let cert = self.required_string(&c, "cert");
            let key = self.required_string(&c, "key");
            let (Some(cert), Some(key)) = (cert, key) else {
                continue;
            };
            let cert_path = self.path(&cert.value);
            let key_path = self.path(&key.value);
            if !self.file_exists(&cert_path, &cert.span, &format!("{}.cert", c.path))
                || !self.file_exists(&key_path, &key.span, &format!("{}.key", c.path))
            {
                continue;
            }
            match tls::load_server_cert(&cert_path, &key_path) {
                Ok(loaded) => tls.certs.push(CertEntry {
                    hosts,
                    cert_path,
                    key_path,
                    loaded,
                }),
                Err(e) => self.d.error(&cert.span, e),
            }
        }
        Some(tls)
    }

    /// Checks a referenced file exists and records it as a dependency of the config.
    fn file_exists(&mut self, p: &Path, span: &Span, key: &str) -> bool {
        if p.is_file() {
            self.files.push(p.to_path_buf());
            return true;
        }
        self.d.error(
            span,
            format!("`{key}`: file {} does not exist", p.display()),
        );
        false
    }

    fn required_string(&mut self, t: &Table, key: &str) -> Option<At<String>> {
        if !t.has(key) {
            self.d
                .error(&t.span, format!("`{}` is missing key `{key}`", t.path));
            return None;
        }
        let s = t.string(self.d, key)?;
        if s.value.is_empty() {
            self.d
                .error(&s.span, format!("`{}.{key}` must not be empty", t.path));
            return None;
        }
        Some(s)
    }

    /// Host names as used by certs and routes: exact, `*.suffix` or `*`.
    fn host_patterns(&mut self, t: &Table, key: &str) -> Vec<String> {
        let Some(hosts) = t.strings(self.d, key) else {
            self.d
                .error(&t.span, format!("`{}` is missing key `{key}`", t.path));
            return Vec::new();
        };
        if hosts.value.is_empty() {
            self.d
                .error(&hosts.span, format!("`{}.{key}` must not be empty", t.path));
        }
        let mut out = Vec::new();
        for h in hosts.value {
            let v = h.value.to_ascii_lowercase();
            let name = v.strip_prefix("*.").unwrap_or(&v);
            let ok = v == "*"
                || (!name.is_empty()
                    && name.split('.').all(|l| {
                        !l.is_empty() && l.chars().all(|c| c.is_ascii_alphanumeric() || c == '-')
                    }));
            if !ok {
                self.d.error(
                    &h.span,
                    format!(
                        "`{}.{key}`: \"{}\" is not a host name, \"*.suffix\" or \"*\"",
                        t.path, h.value
                    ),
                );
            } else if out.contains(&v) {
                self.d.error(
                    &h.span,
                    format!("`{}.{key}`: duplicate host \"{}\"", t.path, h.value),
                );
            } else {
                out.push(v);
            }
        }
        out
    }

    fn listeners(&mut self, root: &Table, have_tls: bool) -> Vec<Listener> {
        let list = root.tables(self.d, "listener");
        if list.is_empty() {
            self.d
                .error(&root.span, "at least one [[listener]] is required");
        }
        let mut out: Vec<Listener> = Vec::new();
        for t in list {
            t.check_keys(self.d, &["listen", "tls", "http2", "redirect_https"]);
            let Some(listen) = self.required_string(&t, "listen") else {
                continue;
            };
            let Some(addr) = self.socket_addr(&listen, "listener.listen") else {
                continue;
            };
            if out.iter().any(|l| l.listen == addr) {
                self.d
                    .error(&listen.span, format!("duplicate listener address {addr}"));
                continue;
            }
            let tls = t.boolean(self.d, "tls").is_some_and(|b| b.value);
            if tls && !have_tls {
                self.d.error(
                    &t.span,
                    "a listener with `tls = true` needs a [tls] section with [[tls.cert]]",
                );
            }
            let http2 = t.boolean(self.d, "http2").is_some_and(|b| b.value);
            let redirect = t
                .integer(self.d, "redirect_https", 1, 65535)
                .map(|p| p.value as u16);
            if redirect.is_some() && tls {
                if let Some(span) = t.key_span("redirect_https") {
                    self.d.error(
                        &span,
                        "`redirect_https` only makes sense on a listener with `tls = false`",
                    );
                }
            }
            out.push(Listener {
                listen: addr,
                tls,
                http2,
                redirect_https: redirect,
            });
        }
        out
    }

    fn limits(&mut self, root: &Table) -> Limits {
        let mut l = Limits::default();
        let Some(t) = root.table(self.d, "limits") else {
            return l;
        };
        t.check_keys(
            self.d,
            &[
                "max_connections",
                "max_connections_per_ip",
                "header_timeout",
                "keepalive_timeout",
                "keepalive_requests",
                "max_header_bytes",
                "max_body_bytes",
                "h2_max_concurrent_streams",
                "send_timeout",
            ],
        );
        if let Some(n) = t.integer(self.d, "max_connections", 1, 10_000_000) {
            l.max_connections = n.value as u32;
        }
        if let Some(n) = t.integer(self.d, "max_connections_per_ip", 0, 10_000_000) {
            l.max_connections_per_ip = n.value as u32;
        }
        if let Some(n) = t.integer(self.d, "keepalive_requests", 1, 1_000_000_000) {
            l.keepalive_requests = n.value as u32;
        }
        // pingora refuses heads over 1 MiB whatever is set here
        if let Some(n) = t.integer(self.d, "max_header_bytes", 1024, 1024 * 1024) {
            l.max_header_bytes = n.value as usize;
        }
        if let Some(n) = t.integer(self.d, "max_body_bytes", 0, i64::MAX) {
            l.max_body_bytes = n.value as u64;
        }
        if let Some(n) = t.integer(self.d, "h2_max_concurrent_streams", 1, 10_000) {
            l.h2_max_concurrent_streams = n.value as u32;
        }
        for key in ["header_timeout", "keepalive_timeout", "send_timeout"] {
            let Some(d) = t.duration(self.d, key) else {
                continue;
            };
            if d.value < Duration::from_millis(100) || d.value > Duration::from_secs(3600) {
                self.d.error(
                    &d.span,
                    format!("`limits.{key}` must be between 100ms and 1h"),
                );
                continue;
            }
            match key {
                "header_timeout" => l.header_timeout = d.value,
                "keepalive_timeout" => l.keepalive_timeout = d.value,
                _ => l.send_timeout = d.value,
            }
        }
        l
    }

    fn resolver(&mut self, root: &Table) -> Resolver {
        let mut r = Resolver::default();
        let Some(t) = root.table(self.d, "resolver") else {
            return r;
        };
        t.check_keys(self.d, &["nameservers", "interval"]);
        if let Some(list) = t.strings(self.d, "nameservers") {
            for s in list.value {
                // "ip" (port 53) or "ip:port"
                let parsed = s.value.parse::<SocketAddr>().or_else(|_| {
                    s.value
                        .parse::<std::net::IpAddr>()
                        .map(|ip| SocketAddr::new(ip, 53))
                });
                match parsed {
                    Ok(a) => r.nameservers.push(a),
                    Err(_) => self.d.error(
                        &s.span,
                        format!(
                            "`resolver.nameservers`: \"{}\" is not an \"ip\" or \"ip:port\" address",
                            s.value
                        ),
                    ),
                }
            }
        }
        if let Some(d) = t.duration(self.d, "interval") {
            if d.value < Duration::from_millis(100) || d.value > Duration::from_secs(3600) {
                self.d
                    .error(&d.span, "`resolver.interval` must be between 100ms and 1h");
            } else {
                r.interval = d.value;
            }
        }
        r
    }

    /// `[tracing]`: where spans go and how many traces are recorded.
    fn tracing(&mut self, t: &Table) -> Option<crate::trace::Config> {
        t.check_keys(self.d, &["otlp_endpoint", "sample_ratio", "service_name"]);
        let endpoint = match t.string(self.d, "otlp_endpoint") {
            Some(e) => {
                let ok = (e.value.starts_with("http://") || e.value.starts_with("https://"))
                    && e.value
                        .parse::<http::Uri>()
                        .is_ok_and(|u| u.host().is_some());
                if !ok {
                    self.d.error(
                        &e.span,
                        format!(
                            "`tracing.otlp_endpoint`: \"{}\" is not an http:// or https:// URL",
                            e.value
                        ),
                    );
                    return None;
                }
                e.value
            }
            None => "http://127.0.0.1:4318".to_string(),
        };
        let sample_ratio = match t.raw("sample_ratio") {
            Some(v) => match v.get_ref() {
                toml::de::DeValue::Float(f) => f.as_str().parse::<f64>().ok(),
                toml::de::DeValue::Integer(i) => i.as_str().parse::<f64>().ok(),
                _ => None,
            }
            .filter(|r| (0.0..=1.0).contains(r))
            .or_else(|| {
                self.d.error(
                    &v.span(),
                    "`tracing.sample_ratio` must be a number from 0 to 1",
                );
                None
            })?,
            None => 0.01,
        };
        let service_name = t
            .string(self.d, "service_name")
            .map_or_else(|| "sluice".to_string(), |s| s.value);
        Some(crate::trace::Config {
            endpoint,
            sample_ratio,
            service_name,
        })
    }

    /// `[cluster]`: the Redis fleet mode shares state through.
    fn cluster(&mut self, t: &Table) -> Option<Cluster> {
        t.check_keys(
            self.d,
            &[
                "redis",
                "password_file",
                "tls",
                "instance",
                "key_prefix",
                "timeout",
            ],
        );
        // SLUICE_CLUSTER_REDIS (set from a Secret in Kubernetes) stands in for `redis`, so
        // that a URL with credentials need not live in a ConfigMap
        let from_env = std::env::var(REDIS_ENV).ok().filter(|v| !v.is_empty());
        let redis = match (t.string(self.d, "redis"), from_env) {
            (r, Some(url)) => match redis_target(&url) {
                Ok(target) => Some(target),
                Err(e) => {
                    let span = r.map_or(t.span.clone(), |r| r.span);
                    self.d
                        .error(&span, format!("`cluster.redis` (from {REDIS_ENV}): {e}"));
                    None
                }
            },
            (Some(r), None) => match redis_target(&r.value) {
                Ok(target) => Some(target),
                Err(e) => {
                    self.d.error(&r.span, format!("`cluster.redis`: {e}"));
                    None
                }
            },
            (None, None) => {
                self.d.error(
                    &t.span,
                    format!(
                        "`cluster.redis` is required (or the environment variable {REDIS_ENV})"
                    ),
                );
                None
            }
        };
        let password_file = t.string(self.d, "password_file").and_then(|f| {
            let p = self.path(&f.value);
            self.file_exists(&p, &f.span, "cluster.password_file")
                .then_some(p)
        });
        let tls = t.table(self.d, "tls").map(|tt| {
            tt.check_keys(self.d, &["ca", "cert", "key"]);
            let mut file = |key: &str| -> Option<PathBuf> {
                let s = tt.string(self.d, key)?;
                let p = self.path(&s.value);
                self.file_exists(&p, &s.span, &format!("cluster.tls.{key}"))
                    .then_some(p)
            };
            let tls = RedisTls {
                ca: file("ca"),
                cert: file("cert"),
                key: file("key"),
            };
            if tls.cert.is_some() != tls.key.is_some() {
                self.d.error(
                    &tt.span,
                    "`cluster.tls` needs both `cert` and `key` for a client certificate",
                );
            }
            tls
        });
        let instance = match t.string(self.d, "instance") {
            Some(i) if !i.value.is_empty() => {
                if i.value.len() > 128 || i.value.chars().any(|c| c.is_control()) {
                    self.d.error(
                        &i.span,
                        "`cluster.instance` must be at most 128 printable characters",
                    );
                }
                i.value
            }
            _ => host_name(),
        };
        let key_prefix = t
            .string(self.d, "key_prefix")
            .map_or_else(|| "sluice:".to_string(), |k| k.value);
        let timeout = t
            .duration(self.d, "timeout")
            .map_or(Duration::from_millis(100), |d| {
                if d.value < Duration::from_millis(1) || d.value > Duration::from_secs(10) {
                    self.d
                        .error(&d.span, "`cluster.timeout` must be between 1ms and 10s");
                }
                d.value
            });
        Some(Cluster {
            redis: redis?,
            password_file,
            tls,
            instance,
            key_prefix,
            timeout,
        })
    }

    /// `[route.limits]`: a route's own `max_body_bytes`.
    fn route_body_limit(&mut self, t: &Table) -> Option<u64> {
        let lt = t.table(self.d, "limits")?;
        lt.check_keys(self.d, &["max_body_bytes"]);
        lt.integer(self.d, "max_body_bytes", 0, i64::MAX)
            .map(|n| n.value as u64)
    }

    fn client_ip(&mut self, root: &Table) -> ClientIp {
        let mut c = ClientIp {
            trusted_proxies: Vec::new(),
            proxy_protocol: false,
        };
        let Some(t) = root.table(self.d, "client_ip") else {
            return c;
        };
        t.check_keys(self.d, &["trusted_proxies", "proxy_protocol"]);
        if let Some(list) = t.strings(self.d, "trusted_proxies") {
            c.trusted_proxies = self.cidrs(&list, "client_ip.trusted_proxies");
        }
        if let Some(p) = t.boolean(self.d, "proxy_protocol") {
            c.proxy_protocol = p.value;
        }
        c
    }

    /// `requests`, `per` and `burst` of `[rate_limit]` or `[route.rate_limit]`.
    fn limit(&mut self, t: &Table) -> Limit {
        let requests = t
            .integer(self.d, "requests", 1, 1_000_000_000)
            .map_or(1000, |n| n.value as u32);
        let per = t
            .duration(self.d, "per")
            .map_or(Duration::from_secs(60), |d| d.value);
        if per < Duration::from_millis(1) {
            if let Some(span) = t.raw("per").map(|v| v.span()) {
                self.d
                    .error(&span, format!("`{}.per` must be at least 1ms", t.path));
            }
        }
        let burst = t
            .integer(self.d, "burst", 1, 1_000_000_000)
            .map_or(requests, |n| n.value as u32);
        Limit {
            requests,
            per: per.max(Duration::from_millis(1)),
            burst,
        }
    }

    fn rate_limit(&mut self, t: &Table, has_cluster: bool) -> RateLimit {
        t.check_keys(
            self.d,
            &[
                "requests",
                "per",
                "burst",
                "ipv6_prefix",
                "exempt",
                "scope",
                "sync",
            ],
        );
        let sync = t
            .duration(self.d, "sync")
            .map_or(Duration::from_millis(200), |d| {
                if d.value > Duration::from_secs(10) {
                    self.d
                        .error(&d.span, "`rate_limit.sync` must be at most 10s");
                }
                d.value.min(Duration::from_secs(10))
            });
        let cluster_sync = match t.string(self.d, "scope") {
            Some(sc) if sc.value == "cluster" => {
                if !has_cluster {
                    self.d.error(
                        &sc.span,
                        "`rate_limit.scope = \"cluster\"` needs a [cluster] table (the Redis the counts are shared through)",
                    );
                }
                Some(sync)
            }
            Some(sc) if sc.value != "local" => {
                self.d.error(
                    &sc.span,
                    "`rate_limit.scope` must be \"local\" or \"cluster\"",
                );
                None
            }
            _ => None,
        };
        let limit = self.limit(t);
        let ipv6_prefix = t
            .integer(self.d, "ipv6_prefix", 1, 128)
            .map_or(64, |n| n.value as u8);
        let exempt = t
            .strings(self.d, "exempt")
            .map(|l| self.cidrs(&l, "rate_limit.exempt"))
            .unwrap_or_default();
        RateLimit {
            limit,
            ipv6_prefix,
            exempt,
            cluster_sync,
        }
    }

    fn geoip(&mut self, t: &Table) -> Option<GeoIp> {
        t.check_keys(self.d, &["database", "debug_header"]);
        let debug_header = t.string(self.d, "debug_header").and_then(|h| {
            let ok = !h.value.is_empty()
                && h.value
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_');
            if !ok {
                self.d.error(
                    &h.span,
                    "`geoip.debug_header` must be a header name (letters, digits, '-')",
                );
            }
            ok.then(|| h.value.to_ascii_lowercase())
        });
        let db = self.required_string(t, "database")?;
        let path = self.path(&db.value);
        if !self.file_exists(&path, &db.span, "geoip.database") {
            return None;
        }
        match crate::geo::GeoDb::open(&path) {
            Ok(g) => Some(GeoIp {
                path,
                db: std::sync::Arc::new(g),
                debug_header,
            }),
            Err(e) => {
                self.d.error(&db.span, format!("`geoip.database`: {e}"));
                None
            }
        }
    }

    fn route_limit(&mut self, t: &Table) -> RouteLimit {
        let Some(v) = t.raw("rate_limit") else {
            return RouteLimit::Inherit;
        };
        if let Some(b) = v.get_ref().as_bool() {
            return if b {
                RouteLimit::Inherit
            } else {
                RouteLimit::Off
            };
        }
        match t.table(self.d, "rate_limit") {
            Some(rt) => {
                rt.check_keys(self.d, &["requests", "per", "burst"]);
                RouteLimit::Own(self.limit(&rt))
            }
            None => RouteLimit::Inherit,
        }
    }

    fn cidrs(&mut self, list: &At<Vec<At<String>>>, key: &str) -> Vec<IpNet> {
        let mut out = Vec::new();
        for s in &list.value {
            let parsed = s
                .value
                .parse::<IpNet>()
                .or_else(|_| s.value.parse::<std::net::IpAddr>().map(IpNet::from));
            match parsed {
                Ok(n) => out.push(n),
                Err(_) => self.d.error(
                    &s.span,
                    format!("`{key}`: \"{}\" is not a CIDR or IP address", s.value),
                ),
            }
        }
        out
    }

    fn unique_name(&mut self, t: &Table, seen: &mut HashSet<String>, kind: &str) -> Option<String> {
        let name = self.required_string(t, "name")?;
        if !seen.insert(name.value.clone()) {
            self.d.error(
                &name.span,
                format!("duplicate {kind} name \"{}\"", name.value),
            );
            return None;
        }
        Some(name.value)
    }

    fn regions(&mut self, root: &Table) -> Vec<Region> {
        let mut seen = HashSet::new();
        let mut out = Vec::new();
        for t in root.tables(self.d, "region") {
            t.check_keys(self.d, &["name", "location", "countries"]);
            let name = self.unique_name(&t, &mut seen, "region");
            let location = match t.array(self.d, "location") {
                Some(a) => {
                    let nums: Vec<f64> = a
                        .value
                        .iter()
                        .filter_map(|v| reader::as_f64(v.get_ref()))
                        .collect();
                    match nums.as_slice() {
                        [lat, lon]
                            if (-90.0..=90.0).contains(lat) && (-180.0..=180.0).contains(lon) =>
                        {
                            Some((*lat, *lon))
                        }
                        _ => {
                            self.d.error(
                                &a.span,
                                format!(
                                    "`{}.location` must be [latitude, longitude] in degrees",
                                    t.path
                                ),
                            );
                            None
                        }
                    }
                }
                None => {
                    self.d
                        .error(&t.span, format!("`{}` is missing key `location`", t.path));
                    None
                }
            };
            let mut countries = Vec::new();
            if let Some(list) = t.strings(self.d, "countries") {
                for c in list.value {
                    if c.value.len() == 2 && c.value.chars().all(|ch| ch.is_ascii_uppercase()) {
                        countries.push(c.value);
                    } else {
                        self.d.error(
                            &c.span,
                            format!(
                                "`{}.countries`: \"{}\" is not an ISO 3166 two-letter code (e.g. \"IE\")",
                                t.path, c.value
                            ),
                        );
                    }
                }
            }
            if let (Some(name), Some(location)) = (name, location) {
                out.push(Region {
                    name,
                    location,
                    countries,
                });
            }
        }
        out
    }

    fn pools(&mut self, root: &Table, regions: &[Region]) -> Vec<Pool> {
        let mut seen = HashSet::new();
        let mut out = Vec::new();
        for t in root.tables(self.d, "pool") {
            t.check_keys(
                self.d,
                &[
                    "name",
                    "region",
                    "backends",
                    "health",
                    "eject",
                    "min_healthy",
                    "connect_timeout",
                    "read_timeout",
                    "tls",
                    "http2",
                ],
            );
            let health = t
                .table(self.d, "health")
                .map_or_else(HealthCheck::default, |h| self.health(&h));
            let eject = t
                .table(self.d, "eject")
                .map_or_else(Eject::default, |e| self.eject(&e));
            let min_healthy = t
                .float(self.d, "min_healthy", 0.0, 1.0)
                .map_or(0.0, |m| m.value);
            let name = self.unique_name(&t, &mut seen, "pool");
            let region = t.string(self.d, "region").and_then(|r| {
                if regions.iter().any(|g| g.name == r.value) {
                    Some(r.value)
                } else {
                    self.d.error(
                        &r.span,
                        format!("`{}.region`: unknown region \"{}\"", t.path, r.value),
                    );
                    None
                }
            });
            let backends = self.backends(&t);
            let connect_timeout = t
                .duration(self.d, "connect_timeout")
                .map_or(Duration::from_secs(1), |d| d.value);
            let read_timeout = t
                .duration(self.d, "read_timeout")
                .map_or(Duration::from_secs(30), |d| d.value);
            for (v, key) in [
                (connect_timeout, "connect_timeout"),
                (read_timeout, "read_timeout"),
            ] {
                if v.is_zero() {
                    if let Some(span) = t.raw(key).map(|r| r.span()) {
                        self.d
                            .error(&span, format!("`{}.{key}` must be above zero", t.path));
                    }
                }
            }
            let tls = t.table(self.d, "tls").and_then(|tt| self.pool_tls(&tt));
            let http2 = t.boolean(self.d, "http2").is_some_and(|b| b.value);
            if let Some(name) = name {
                out.push(Pool {
                    name,
                    region,
                    backends,
                    connect_timeout,
                    read_timeout,
                    tls,
                    http2,
                    health,
                    eject,
                    min_healthy,
                });
            }
        }
        out
    }

    fn positive(&mut self, t: &Table, key: &str) -> Option<Duration> {
        let d = t.duration(self.d, key)?;
        if d.value.is_zero() {
            self.d
                .error(&d.span, format!("`{}.{key}` must be above zero", t.path));
            return None;
        }
        Some(d.value)
    }

    fn health(&mut self, t: &Table) -> HealthCheck {
        t.check_keys(
            self.d,
            &[
                "path",
                "interval",
                "timeout",
                "unhealthy_after",
                "healthy_after",
            ],
        );
        let mut h = HealthCheck::default();
        match t.string(self.d, "path") {
            Some(p) if p.value.starts_with('/') && !p.value.contains(char::is_whitespace) => {
                h.path = Some(p.value)
            }
            Some(p) => self.d.error(
                &p.span,
                format!("`{}.path` must be a path starting with \"/\"", t.path),
            ),
            None => self
                .d
                .error(&t.span, format!("`{}` is missing key `path`", t.path)),
        }
        if let Some(v) = self.positive(t, "interval") {
            h.interval = v;
        }
        if let Some(v) = self.positive(t, "timeout") {
            h.timeout = v;
        }
        if h.timeout > h.interval {
            if let Some(span) = t.raw("timeout").map(|v| v.span()) {
                self.d.error(
                    &span,
                    format!("`{}.timeout` must not exceed `interval`", t.path),
                );
            }
        }
        if let Some(n) = t.integer(self.d, "unhealthy_after", 1, 100) {
            h.unhealthy_after = n.value as u32;
        }
        if let Some(n) = t.integer(self.d, "healthy_after", 1, 100) {
            h.healthy_after = n.value as u32;
        }
        h
    }

    fn eject(&mut self, t: &Table) -> Eject {
        t.check_keys(self.d, &["consecutive_failures", "base_time", "max_time"]);
        let mut e = Eject::default();
        if let Some(n) = t.integer(self.d, "consecutive_failures", 1, 1000) {
            e.consecutive_failures = n.value as u32;
        }
        if let Some(v) = self.positive(t, "base_time") {
            e.base_time = v;
        }
        if let Some(v) = self.positive(t, "max_time") {
            e.max_time = v;
        }
        if e.max_time < e.base_time {
            if let Some(span) = t.raw("max_time").map(|v| v.span()) {
                self.d.error(
                    &span,
                    format!("`{}.max_time` must be at least `base_time`", t.path),
                );
            }
        }
        e
    }

    fn backends(&mut self, t: &Table) -> Vec<Backend> {
        let Some(arr) = t.array(self.d, "backends") else {
            if !t.has("backends") {
                self.d
                    .error(&t.span, format!("`{}` is missing key `backends`", t.path));
            }
            return Vec::new();
        };
        if arr.value.is_empty() {
            self.d.error(
                &arr.span,
                format!("`{}.backends` must list at least one backend", t.path),
            );
        }
        let mut out: Vec<Backend> = Vec::new();
        for item in arr.value {
            // "ip:port", "name:port", "_service._proto.name", or { address = ..., weight = N }
            let (addr, weight) = if let Some(s) = item.get_ref().as_str() {
                (At::new(s.to_string(), item.span()), 1)
            } else if let Some(bt) = item.get_ref().as_table() {
                let bt = Table::new(bt, item.span(), format!("{}.backends[]", t.path));
                bt.check_keys(self.d, &["address", "weight"]);
                let Some(a) = self.required_string(&bt, "address") else {
                    continue;
                };
                let w = bt.integer(self.d, "weight", 1, 1000).map_or(1, |w| w.value);
                (a, w as u32)
            } else {
                self.d.error(
                    &item.span(),
                    format!(
                        "`{}.backends` entries must be \"ip:port\", \"name:port\", \"_service._proto.name\" or {{ address = \"...\", weight = N }}",
                        t.path
                    ),
                );
                continue;
            };
            let Some(target) = self.target(&addr, &t.path) else {
                continue;
            };
            if out.iter().any(|b| b.target == target) {
                self.d.error(
                    &addr.span,
                    format!("`{}.backends`: duplicate backend {target}", t.path),
                );
                continue;
            }
            if matches!(target, Target::Srv(_)) && weight != 1 {
                self.d.error(
                    &addr.span,
                    format!(
                        "`{}.backends`: an SRV name takes its weights from its records",
                        t.path
                    ),
                );
            }
            out.push(Backend { target, weight });
        }
        out
    }

    /// A backend address: `ip:port`, `name:port` or `_service._proto.name`.
    fn target(&mut self, a: &At<String>, path: &str) -> Option<Target> {
        if let Ok(addr) = a.value.parse::<SocketAddr>() {
            return Some(Target::Addr(addr));
        }
        let dns_name = |n: &str| {
            !n.is_empty()
                && n.len() <= 253
                && n.trim_end_matches('.').split('.').all(|l| {
                    !l.is_empty()
                        && l.len() <= 63
                        && l.bytes()
                            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
                })
        };
        if a.value.starts_with('_') && !a.value.contains(':') && dns_name(&a.value) {
            let labels: Vec<&str> = a.value.split('.').collect();
            if labels.len() >= 3 && labels[1].starts_with('_') {
                return Some(Target::Srv(a.value.clone()));
            }
        }
        if let Some((host, port)) = a.value.rsplit_once(':') {
            if let (true, Ok(port)) = (
                dns_name(host)
                    && !host.starts_with('_')
                    && host.parse::<std::net::IpAddr>().is_err(),
                port.parse::<u16>(),
            ) {
                if port > 0 {
                    return Some(Target::Name {
                        host: host.to_ascii_lowercase(),
                        port,
                    });
                }
            }
        }
        self.d.error(
            &a.span,
            format!(
                "`{path}.backends`: \"{}\" is not \"ip:port\" (\"[::1]:80\" for IPv6), \"name:port\" or \"_service._proto.name\"",
                a.value
            ),
        );
        None
    }

    fn pool_tls(&mut self, t: &Table) -> Option<UpstreamTlsMaterial> {
        t.check_keys(self.d, &["sni", "ca", "cert", "key"]);
        let sni = t.string(self.d, "sni").map(|s| s.value);
        let file = |this: &mut Self, key: &str| -> Option<PathBuf> {
            let s = t.string(this.d, key)?;
            let p = this.path(&s.value);
            this.file_exists(&p, &s.span, &format!("{}.{key}", t.path))
                .then_some(p)
        };
        let ca = file(self, "ca");
        let cert = file(self, "cert");
        let key = file(self, "key");
        if cert.is_some() != key.is_some() {
            self.d.error(
                &t.span,
                format!(
                    "`{}` needs both `cert` and `key` for a client certificate",
                    t.path
                ),
            );
            return None;
        }
        match tls::load_upstream_material(sni, ca.as_deref(), cert.as_deref().zip(key.as_deref())) {
            Ok(m) => Some(m),
            Err(e) => {
                self.d.error(&t.span, format!("`{}`: {e}", t.path));
                None
            }
        }
    }

    fn routes(&mut self, root: &Table, pools: &[Pool]) -> Vec<Route> {
        let index: HashMap<&str, usize> = pools
            .iter()
            .enumerate()
            .map(|(i, p)| (p.name.as_str(), i))
            .collect();
        let mut seen = HashSet::new();
        let mut claimed: HashMap<(String, String), String> = HashMap::new();
        let mut out = Vec::new();
        for t in root.tables(self.d, "route") {
            t.check_keys(
                self.d,
                &[
                    "name",
                    "hosts",
                    "path_prefix",
                    "blue",
                    "green",
                    "weights",
                    "sticky",
                    "override_header",
                    "rollback",
                    "rate_limit",
                    "limits",
                ],
            );
            let name = self.unique_name(&t, &mut seen, "route");
            let max_body_bytes = self.route_body_limit(&t);
            let rate_limit = self.route_limit(&t);
            let hosts = self.host_patterns(&t, "hosts");
            let path_prefix = match t.string(self.d, "path_prefix") {
                Some(p) if p.value.starts_with('/') => p.value,
                Some(p) => {
                    self.d.error(
                        &p.span,
                        format!("`{}.path_prefix` must start with \"/\"", t.path),
                    );
                    "/".to_string()
                }
                None => "/".to_string(),
            };
            let color = |this: &mut Self, key: &str| -> Vec<usize> {
                let Some(list) = t.strings(this.d, key) else {
                    return Vec::new();
                };
                let mut v = Vec::new();
                for p in list.value {
                    match index.get(p.value.as_str()) {
                        Some(i) if !v.contains(i) => v.push(*i),
                        Some(_) => this.d.error(
                            &p.span,
                            format!("`{}.{key}`: pool \"{}\" listed twice", t.path, p.value),
                        ),
                        None => this.d.error(
                            &p.span,
                            format!("`{}.{key}`: unknown pool \"{}\"", t.path, p.value),
                        ),
                    }
                }
                v
            };
            let blue = color(self, "blue");
            if !t.has("blue") {
                self.d
                    .error(&t.span, format!("`{}` is missing key `blue`", t.path));
            }
            let green = color(self, "green");
            if let Some(both) = blue.iter().find(|p| green.contains(p)) {
                self.d.error(
                    &t.span,
                    format!(
                        "`{}`: pool \"{}\" is both blue and green",
                        t.path, pools[*both].name
                    ),
                );
            }
            for (key, list) in [("blue", &blue), ("green", &green)] {
                if list.len() > crate::geo::MAX_POOLS {
                    self.d.error(
                        &t.span,
                        format!(
                            "`{}.{key}`: at most {} pools per color",
                            t.path,
                            crate::geo::MAX_POOLS
                        ),
                    );
                }
            }
            let override_header = self.override_header(&t);
            let rollback = self.rollback(&t);
            let weights = self.weights(&t, !green.is_empty());
            let sticky = match t.string(self.d, "sticky") {
                None => Sticky::Cookie,
                Some(s) => match s.value.as_str() {
                    "cookie" => Sticky::Cookie,
                    "client_ip" => Sticky::ClientIp,
                    "none" => Sticky::None,
                    _ => {
                        self.d.error(
                            &s.span,
                            format!(
                                "`{}.sticky` must be \"cookie\", \"client_ip\" or \"none\"",
                                t.path
                            ),
                        );
                        Sticky::None
                    }
                },
            };
            if let Some(name) = &name {
                for h in &hosts {
                    if let Some(other) =
                        claimed.insert((h.clone(), path_prefix.clone()), name.clone())
                    {
                        let span = t
                            .raw("path_prefix")
                            .or(t.raw("hosts"))
                            .map_or(t.span.clone(), |v| v.span());
                        self.d.error(
                            &span,
                            format!(
                                "route \"{name}\" has the same host \"{h}\" and path_prefix \"{path_prefix}\" as route \"{other}\""
                            ),
                        );
                    }
                }
            }
            if let Some(name) = name {
                out.push(Route {
                    name,
                    hosts,
                    path_prefix,
                    blue,
                    green,
                    weights,
                    sticky,
                    override_header,
                    rollback,
                    rate_limit,
                    max_body_bytes,
                });
            }
        }
        out
    }

    fn override_header(&mut self, t: &Table) -> Option<String> {
        let h = t.string(self.d, "override_header")?;
        let name = h.value.to_ascii_lowercase();
        if http::HeaderName::from_bytes(name.as_bytes()).is_err() {
            self.d.error(
                &h.span,
                format!(
                    "`{}.override_header`: \"{}\" is not a valid header name",
                    t.path, h.value
                ),
            );
            return None;
        }
        Some(name)
    }

    fn rollback(&mut self, t: &Table) -> Option<Rollback> {
        let mut r = Rollback::default();
        let Some(v) = t.raw("rollback") else {
            return Some(r);
        };
        if let Some(b) = v.get_ref().as_bool() {
            return b.then_some(r);
        }
        let rt = t.table(self.d, "rollback")?;
        rt.check_keys(self.d, &["max_error_rate", "window", "min_requests"]);
        if let Some(x) = rt.float(self.d, "max_error_rate", 0.0, 1.0) {
            r.max_error_rate = x.value;
        }
        if let Some(w) = rt.duration(self.d, "window") {
            if w.value < Duration::from_secs(1) || w.value > Duration::from_secs(3600) {
                self.d.error(
                    &w.span,
                    format!("`{}.window` must be between 1s and 1h", rt.path),
                );
            } else {
                r.window = w.value;
            }
        }
        if let Some(n) = rt.integer(self.d, "min_requests", 1, 1_000_000) {
            r.min_requests = n.value as u32;
        }
        Some(r)
    }

    fn weights(&mut self, t: &Table, has_green: bool) -> (u8, u8) {
        let Some(w) = t.table(self.d, "weights") else {
            return (100, 0);
        };
        w.check_keys(self.d, &["blue", "green"]);
        let blue = w.integer(self.d, "blue", 0, 100).map(|v| v.value);
        let green = w.integer(self.d, "green", 0, 100).map(|v| v.value);
        let (Some(blue), Some(green)) = (blue, green) else {
            if !(w.has("blue") && w.has("green")) {
                self.d.error(
                    &w.span,
                    format!("`{}.weights` needs both `blue` and `green`", t.path),
                );
            }
            return (100, 0);
        };
        if blue + green != 100 {
            self.d.error(
                &w.span,
                format!(
                    "`{}.weights` must sum to 100 (blue {blue} + green {green} = {})",
                    t.path,
                    blue + green
                ),
            );
            return (100, 0);
        }
        if green > 0 && !has_green {
            self.d.error(
                &w.span,
                format!(
                    "`{}.weights.green` is {green} but the route has no green pools",
                    t.path
                ),
            );
        }
        (blue as u8, green as u8)
    }
}

/// Environment variable that, when set, replaces `cluster.redis`.
pub const REDIS_ENV: &str = "SLUICE_CLUSTER_REDIS";

/// The machine's host name (a pod's name in Kubernetes).
pub fn host_name() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .ok()
        .map(|h| h.trim().to_string())
        .filter(|h| !h.is_empty())
        .or_else(|| std::env::var("HOSTNAME").ok())
        .unwrap_or_else(|| format!("sluice-{}", std::process::id()))
}

/// Parses `cluster.redis`.
fn redis_target(url: &str) -> Result<RedisTarget, String> {
    let (scheme, rest) = url
        .split_once("://")
        .ok_or_else(|| format!("\"{url}\" is not a URL (redis://host:port/db)"))?;
    let hosts = |list: &str| -> Result<Vec<String>, String> {
        let hosts: Vec<String> = list
            .split(',')
            .map(|h| h.trim().to_string())
            .filter(|h| !h.is_empty())
            .collect();
        if hosts.is_empty() {
            return Err(format!("\"{url}\" names no host"));
        }
        for h in &hosts {
            match h.rsplit_once(':') {
                Some((_, port)) if port.parse::<u16>().is_ok() => {}
                _ => return Err(format!("\"{h}\" in \"{url}\" is not host:port")),
            }
        }
        Ok(hosts)
    };
    match scheme {
        "redis" | "rediss" => {
            redis::parse_redis_url(url).ok_or_else(|| format!("\"{url}\" is not a Redis URL"))?;
            Ok(RedisTarget::Single {
                url: url.to_string(),
            })
        }
        "redis+sentinel" | "rediss+sentinel" => {
            let mut parts = rest.splitn(3, '/');
            let sentinels = hosts(parts.next().unwrap_or(""))?;
            let master = parts
                .next()
                .filter(|m| !m.is_empty())
                .ok_or_else(|| {
                    format!(
                        "\"{url}\" names no master (redis+sentinel://h1:26379,h2:26379/mymaster)"
                    )
                })?
                .to_string();
            let db = match parts.next() {
                None | Some("") => 0,
                Some(d) => d
                    .parse()
                    .map_err(|_| format!("\"{d}\" in \"{url}\" is not a database number"))?,
            };
            Ok(RedisTarget::Sentinel {
                sentinels,
                master,
                db,
                tls: scheme.starts_with("rediss"),
            })
        }
        "redis+cluster" | "rediss+cluster" => Ok(RedisTarget::Cluster {
            nodes: hosts(rest.trim_end_matches('/'))?,
            tls: scheme.starts_with("rediss"),
        }),
        _ => Err(format!(
            "\"{scheme}\" is not redis, rediss, redis+sentinel or redis+cluster"
        )),
    }
}
