//! Process wiring: pingora services for each listener and the admin API, readiness, and the
//! graceful shutdown sequence.
//!
//! SIGTERM (or SIGQUIT): `/readyz` answers 503 at once; listeners keep serving for
//! `drain_delay`; then they stop accepting and in-flight requests get up to `grace_period`;
//! the process exits 0 as soon as none is left (pingora alone would always sleep the whole
//! grace period). SIGINT: fast shutdown.

use std::net::{SocketAddr, TcpListener};
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use pingora::apps::ServerApp;
use pingora::listeners::{L4BufferSettings, ListenerConfig, DEFAULT_L4_WRITE_BUFFER_SIZE};
use pingora::protocols::Stream;
use pingora::server::configuration::ServerConf;
use pingora::server::{RunArgs, Server, ShutdownSignal, ShutdownSignalWatch, ShutdownWatch};
use pingora::services::background::{background_service, BackgroundService};
use pingora::services::listening::Service;

use crate::admin::Admin;
use crate::config::{self, Listener};
use crate::state::Shared;

/// Idle upstream connections kept for reuse, per worker thread (pingora's pool holds this
/// many times `threads`, across all backends; each is closed after `UPSTREAM_IDLE` in
/// `snapshot`). pingora's default is 128: with more requests than that in flight at once (an
/// h2 client's streams count one each), every one answered beyond it closed its connection
/// and the next burst opened new ones. Measured in make bench's TLS h2 scenario (640 streams):
/// 210-450 new upstream connections per 1000 requests with 128, 3-7 with 1024.
pub const UPSTREAM_POOL_PER_THREAD: usize = 1024;

pub fn run(config_path: &Path) -> Result<(), String> {
    let cfg = config::load(config_path).map_err(|errs| {
        errs.iter()
            .map(|e| e.to_string())
            .collect::<Vec<_>>()
            .join("\n")
    })?;
    // Binding problems are reported here, clearly, instead of as a panic inside pingora.
    for addr in cfg
        .listeners
        .iter()
        .map(|l| l.listen)
        .chain(std::iter::once(cfg.admin.listen))
    {
        TcpListener::bind(addr).map_err(|e| format!("cannot listen on {addr}: {e}"))?;
    }
    let threads = cfg.server.threads;
    let grace = cfg.server.grace_period;
    let listeners = cfg.listeners.clone();
    let admin_addr = cfg.admin.listen;
    let shared = Shared::new(cfg, config_path.to_path_buf())?;

    let conf = ServerConf {
        threads,
        // One single-threaded runtime per worker thread, each connection on one of them
        // (pingora's no-steal mode): no cross-thread wake-ups on the request path. Measured in
        // benches/results (make bench); SLUICE_WORK_STEALING=1 turns stealing back on.
        work_stealing: std::env::var_os("SLUICE_WORK_STEALING").is_some_and(|v| v == "1"),
        grace_period_seconds: Some(grace.as_secs() + u64::from(grace.subsec_nanos() > 0)),
        graceful_shutdown_timeout_seconds: Some(1),
        upstream_keepalive_pool_size: UPSTREAM_POOL_PER_THREAD,
        // nothing is ever upgraded in place: keep pingora's files out of shared paths
        pid_file: std::env::temp_dir()
            .join(format!("sluice-{}.pid", std::process::id()))
            .display()
            .to_string(),
        upgrade_sock: std::env::temp_dir()
            .join(format!("sluice-{}.sock", std::process::id()))
            .display()
            .to_string(),
        ..ServerConf::default()
    };
    let mut server = Server::new_with_opt_and_conf(None, conf);
    server.bootstrap();
    let conf = server.configuration.clone();

    // One service (one worker pool of `threads`) serves every listener. pingora accepts plain
    // TCP with no read buffer of its own; the edge app does PROXY protocol, connection limits,
    // TLS, and HTTP/1 request heads itself before pingora's proxy takes a request.
    let edge = Arc::new(crate::edge::Edge::new(
        shared.clone(),
        conf.clone(),
        &listeners,
    )?);
    let mut service = Service::new("proxy".to_string(), EdgeApp(edge.clone()));
    service.threads = Some(threads);
    for l in &listeners {
        service.add_listener(ListenerConfig::tcp(l.listen.to_string()).l4_buffer(
            L4BufferSettings::new(L4_READ_BUFFER, DEFAULT_L4_WRITE_BUFFER_SIZE),
        ));
    }
    server.add_service(service);

    let mut admin = Service::new(
        "admin".to_string(),
        pingora::apps::http_app::HttpServer::new_app(Admin {
            shared: shared.clone(),
        }),
    );
    admin.threads = Some(1);
    admin.add_tcp(&admin_addr.to_string());
    server.add_service(admin);

    let current: Arc<dyn Fn() -> Arc<crate::snapshot::Snapshot> + Send + Sync> = {
        let s = shared.clone();
        Arc::new(move || s.snapshot())
    };
    server.add_service(background_service(
        "health checks",
        crate::health::Prober {
            current: current.clone(),
        },
    ));
    server.add_service(background_service(
        "dns discovery",
        crate::discovery::Resolve {
            discovery: shared.discovery.clone(),
            config: {
                let s = shared.clone();
                Arc::new(move || s.snapshot().config.clone())
            },
            rebuild: {
                let s = shared.clone();
                Arc::new(move || s.refresh_members())
            },
        },
    ));
    match (&shared.fleet, &shared.exchange) {
        // fleet mode: the lease holder runs shifts and rollback on the fleet's counts
        (Some(fleet), Some(exchange)) => {
            server.add_service(background_service(
                "fleet",
                crate::cluster::Service {
                    fleet: fleet.clone(),
                    current: current.clone(),
                    audit: shared.audit.clone(),
                    limits: exchange.clone(),
                },
            ));
        }
        _ => {
            server.add_service(background_service(
                "shift controller",
                crate::traffic::Controller {
                    traffic: shared.traffic.clone(),
                    audit: shared.audit.clone(),
                    current: current.clone(),
                },
            ));
        }
    }
    server.add_service(background_service(
        "rate limit upkeep",
        crate::rate_limit::Upkeep {
            shrink_all: {
                let s = shared.clone();
                Arc::new(move || s.limits.shrink_all())
            },
        },
    ));
    server.add_service(background_service(
        "config watcher",
        crate::watch::Watcher {
            shared: shared.clone(),
        },
    ));
    server.add_service(background_service(
        "status history",
        crate::history::Sampler {
            history: shared.history.clone(),
            current: current.clone(),
        },
    ));
    server.add_service(background_service(
        "approval expiry",
        crate::approvals::Expiry {
            store: shared.approvals.clone(),
            audit: shared.audit.clone(),
        },
    ));
    server.add_service(background_service(
        "access log reopen",
        ReopenOnUsr1 {
            reopen: {
                let s = shared.clone();
                Arc::new(move || s.access_log.reopen())
            },
        },
    ));
    server.add_service(background_service(
        "readiness",
        Readiness {
            shared: shared.clone(),
            listeners: listeners.clone(),
        },
    ));

    log::info!(
        "sluice {} serving {} listener(s), admin on {admin_addr}",
        env!("CARGO_PKG_VERSION"),
        listeners.len()
    );
    server.run(RunArgs {
        shutdown_signal: Box::new(Signals { shared }),
    });
    Ok(())
}

/// pingora's L4 read buffer per connection (its default is 64 KiB): none. HTTP/1 heads are read
/// straight into the request buffer, and rustls reads records into its own.
const L4_READ_BUFFER: usize = 0;

/// The service's app: the edge, shared with whoever needs its counts.
pub struct EdgeApp(Arc<crate::edge::Edge>);

#[async_trait]
impl ServerApp for EdgeApp {
    async fn process_new(
        self: &Arc<Self>,
        session: Stream,
        shutdown: &ShutdownWatch,
    ) -> Option<Stream> {
        self.0.process_new(session, shutdown).await
    }

    async fn cleanup(&self) {
        self.0.cleanup().await
    }
}

/// SIGUSR1 opens the access log file again (after logrotate renamed it), as nginx does.
struct ReopenOnUsr1 {
    reopen: Arc<dyn Fn() + Send + Sync>,
}

#[async_trait]
impl BackgroundService for ReopenOnUsr1 {
    async fn start(&self, mut shutdown: ShutdownWatch) {
        use tokio::signal::unix::{signal, SignalKind};
        let Ok(mut usr1) = signal(SignalKind::user_defined1()) else {
            log::error!("cannot install the SIGUSR1 handler: the access log reopens only when its path changes");
            return;
        };
        loop {
            tokio::select! {
                _ = shutdown.changed() => return,
                got = usr1.recv() => {
                    if got.is_none() {
                        return;
                    }
                    log::info!("SIGUSR1: reopening the access log");
                    (self.reopen)();
                }
            }
        }
    }
}

/// Marks the process ready once every listener accepts connections.
struct Readiness {
    shared: Arc<Shared>,
    listeners: Vec<Listener>,
}

/// Connects to a listener; a TLS one must also complete a handshake. With PROXY protocol on,
/// the probe introduces itself as `UNKNOWN` (its own address stands).
async fn probe(addr: SocketAddr, tls: bool, proxy_protocol: bool) -> bool {
    use tokio::io::AsyncWriteExt;
    let Ok(mut tcp) = tokio::net::TcpStream::connect(addr).await else {
        return false;
    };
    if proxy_protocol && tcp.write_all(b"PROXY UNKNOWN\r\n").await.is_err() {
        return false;
    }
    if !tls {
        return true;
    }
    let connector = tokio_rustls::TlsConnector::from(crate::tls::probe_client_config());
    let name = rustls::pki_types::ServerName::from(addr.ip());
    connector.connect(name, tcp).await.is_ok()
}

#[async_trait]
impl BackgroundService for Readiness {
    async fn start(&self, _shutdown: ShutdownWatch) {
        for l in &self.listeners {
            let addr = l.listen;
            let target = match addr.ip().is_unspecified() {
                true if addr.is_ipv4() => SocketAddr::from(([127, 0, 0, 1], addr.port())),
                true => SocketAddr::from((std::net::Ipv6Addr::LOCALHOST, addr.port())),
                false => addr,
            };
            let pp = self.shared.snapshot().config.client_ip.proxy_protocol;
            while !probe(target, l.tls, pp).await {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
        self.shared.lifecycle.set_ready();
        log::info!("ready");
    }
}

struct Signals {
    shared: Arc<Shared>,
}

#[async_trait]
impl ShutdownSignalWatch for Signals {
    async fn recv(&self) -> ShutdownSignal {
        use tokio::signal::unix::{signal, SignalKind};
        let (Ok(mut term), Ok(mut quit), Ok(mut int)) = (
            signal(SignalKind::terminate()),
            signal(SignalKind::quit()),
            signal(SignalKind::interrupt()),
        ) else {
            log::error!("cannot install signal handlers; shutting down");
            return ShutdownSignal::FastShutdown;
        };
        tokio::select! {
            _ = term.recv() => {}
            _ = quit.recv() => {}
            _ = int.recv() => {
                log::info!("SIGINT: fast shutdown");
                self.shared.access_log.flush();
                return ShutdownSignal::FastShutdown;
            }
        }
        let snap = self.shared.snapshot();
        let drain = snap.config.server.drain_delay;
        let grace = snap.config.server.grace_period;
        drop(snap);
        log::info!(
            "shutting down: draining for {drain:?}, then up to {grace:?} for requests in flight"
        );
        self.shared.lifecycle.start_draining();
        tokio::time::sleep(drain).await;
        let shared = self.shared.clone();
        // pingora stops accepting once we return, then sleeps the whole grace period; exit as
        // soon as nothing is in flight instead.
        let spawned = std::thread::Builder::new()
            .name("shutdown".into())
            .spawn(move || {
                let deadline = Instant::now() + grace;
                std::thread::sleep(Duration::from_millis(50));
                while shared.lifecycle.inflight() > 0 && Instant::now() < deadline {
                    std::thread::sleep(Duration::from_millis(10));
                }
                let left = shared.lifecycle.inflight();
                if left > 0 {
                    log::warn!("grace period over with {left} request(s) in flight");
                }
                shared.access_log.flush();
                log::info!("exiting");
                std::process::exit(0);
            });
        if let Err(e) = spawned {
            log::error!("cannot start shutdown thread: {e}");
        }
        ShutdownSignal::GracefulTerminate
    }
}
