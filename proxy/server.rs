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
use pingora::apps::{HttpServerOptions, ServerApp};
use pingora::listeners::tls::TlsSettings;
use pingora::listeners::PreTlsProcess;
use pingora::protocols::l4::socket::SocketAddr as PingoraAddr;
use pingora::protocols::l4::stream::Stream as L4Stream;
use pingora::protocols::SocketDigest;
use pingora::protocols::Stream;
use pingora::protocols::{GetSocketDigest, UniqueID};
use pingora::proxy::{http_proxy, HttpProxy};
use pingora::server::configuration::ServerConf;
use pingora::server::{RunArgs, Server, ShutdownSignal, ShutdownSignalWatch, ShutdownWatch};
use pingora::services::background::{background_service, BackgroundService};
use pingora::services::listening::Service;
use prometheus::IntGauge;

use crate::admin::Admin;
use crate::config::{self, Listener};
use crate::gateway::Gateway;
use crate::snapshot::find_listener;
use crate::state::Shared;
use crate::tls::{hello, SniResolver};

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

    // One proxy service (one worker pool of `threads`) serves every listener. h2c is a
    // per-service option in pingora, so plain listeners that differ on `http2` need a second one.
    let plain_h2c = listeners.iter().any(|l| !l.tls && l.http2);
    let plain_h1 = listeners.iter().any(|l| !l.tls && !l.http2);
    let groups: Vec<(bool, Vec<&Listener>)> = if plain_h2c && plain_h1 {
        let (h1, rest): (Vec<&Listener>, Vec<&Listener>) =
            listeners.iter().partition(|l| !l.tls && !l.http2);
        vec![(true, rest), (false, h1)]
    } else {
        vec![(plain_h2c, listeners.iter().collect())]
    };
    for (i, (h2c, group)) in groups.into_iter().enumerate() {
        let mut proxy = http_proxy(
            &conf,
            Gateway {
                shared: shared.clone(),
            },
        );
        if h2c {
            let mut opts = HttpServerOptions::default();
            opts.h2c = true;
            proxy.server_options = Some(opts);
        }
        let app = Counted {
            shared: shared.clone(),
            inner: Arc::new(proxy),
            gauges: group
                .iter()
                .map(|l| {
                    let label = l.listen.to_string();
                    let g = shared
                        .metrics
                        .downstream_connections
                        .with_label_values(&[&label]);
                    (l.listen, g)
                })
                .collect(),
        };
        let mut service = Service::new(format!("proxy-{i}"), app);
        service.threads = Some(threads);
        for l in group {
            add_endpoint(&mut service, l, &shared)?;
        }
        server.add_service(service);
    }

    let mut admin = Service::new(
        "admin".to_string(),
        pingora::apps::http_app::HttpServer::new_app(Admin {
            shared: shared.clone(),
        }),
    );
    admin.threads = Some(1);
    admin.add_tcp(&admin_addr.to_string());
    server.add_service(admin);

    server.add_service(background_service(
        "health checks",
        crate::health::Prober {
            shared: shared.clone(),
        },
    ));
    server.add_service(background_service(
        "shift controller",
        crate::traffic::Controller {
            shared: shared.clone(),
        },
    ));
    server.add_service(background_service(
        "rate limit upkeep",
        crate::rate_limit::Upkeep {
            shared: shared.clone(),
        },
    ));
    server.add_service(background_service(
        "config watcher",
        crate::watch::Watcher {
            shared: shared.clone(),
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

fn add_endpoint(
    service: &mut Service<Counted>,
    l: &Listener,
    shared: &Arc<Shared>,
) -> Result<(), String> {
    let addr = l.listen.to_string();
    if !l.tls {
        service.add_tcp(&addr);
        return Ok(());
    }
    // The paths are ignored once a resolver is set: certificates come from the snapshot.
    let mut settings = TlsSettings::intermediate("", "").map_err(|e| e.to_string())?;
    let s = shared.clone();
    settings.set_cert_resolver(Arc::new(SniResolver::new(move || {
        s.snapshot().certs.clone()
    })));
    if l.http2 {
        settings.enable_h2();
    }
    service.add_tls_with_settings(&addr, None, settings);
    service
        .endpoints()
        .set_pre_tls_callback(Arc::new(VersionFloor {
            shared: shared.clone(),
        }));
    Ok(())
}

/// Runs before rustls sees a TLS connection: reads the PROXY protocol header when
/// `proxy_protocol` is on, then enforces `tls.min_version = "1.3"` (pingora builds rustls with
/// TLS 1.2 and 1.3): the ClientHello is read, put back, and a client that does not offer TLS
/// 1.3 gets a `protocol_version` alert instead of a handshake.
struct VersionFloor {
    shared: Arc<Shared>,
}

/// Reads the PROXY header of a new connection and makes its source the connection's peer
/// address. `false`: no valid header, the connection must be closed.
async fn accept_proxy_header<S>(stream: &mut S) -> bool
where
    S: tokio::io::AsyncRead + Unpin + GetSocketDigest + UniqueID + ?Sized,
{
    match crate::proxy_protocol::read_header(stream).await {
        Ok(Some(addr)) => {
            let digest = SocketDigest::from_raw_fd(stream.id());
            let _ = digest.peer_addr.set(Some(PingoraAddr::Inet(addr)));
            stream.set_socket_digest(digest);
            true
        }
        Ok(None) => true,
        Err(e) => {
            log::debug!("closing connection: {e}");
            false
        }
    }
}

/// How long a client may take to send its ClientHello.
const HELLO_TIMEOUT: Duration = Duration::from_secs(10);

#[async_trait]
impl PreTlsProcess for VersionFloor {
    async fn process(&self, stream: &mut L4Stream) -> pingora::Result<()> {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let snap = self.shared.snapshot();
        if snap.config.client_ip.proxy_protocol && !accept_proxy_header(stream).await {
            return Err(pingora::Error::explain(
                pingora::ErrorType::ReadError,
                "no valid PROXY protocol header",
            ));
        }
        if !snap.certs.requires_tls13() {
            return Ok(());
        }
        drop(snap);
        let mut record = vec![0u8; hello::RECORD_HEADER];
        let read = async {
            stream.read_exact(&mut record).await?;
            if let Some(len) = hello::record_len(&record) {
                record.resize(hello::RECORD_HEADER + len, 0);
                stream
                    .read_exact(&mut record[hello::RECORD_HEADER..])
                    .await?;
            }
            Ok::<_, std::io::Error>(())
        };
        let outcome = tokio::time::timeout(HELLO_TIMEOUT, read).await;
        // Whatever was read goes back for rustls to read again.
        stream.rewind(&record);
        match outcome {
            Ok(Ok(())) => {}
            _ => {
                return Err(pingora::Error::explain(
                    pingora::ErrorType::ReadError,
                    "no ClientHello",
                ))
            }
        }
        if hello::offers_tls13(&record) == Some(false) {
            // fatal alert: protocol_version (70)
            let _ = stream
                .write_all(&[0x15, 0x03, 0x03, 0x00, 0x02, 0x02, 70])
                .await;
            let _ = stream.flush().await;
            log::debug!("refused a client that does not offer TLS 1.3");
            return Err(pingora::Error::explain(
                pingora::ErrorType::TLSHandshakeFailure,
                "client does not offer TLS 1.3 (tls.min_version = \"1.3\")",
            ));
        }
        Ok(())
    }
}

/// Wraps the proxy app to count open downstream connections per listener.
pub struct Counted {
    inner: Arc<HttpProxy<Gateway>>,
    gauges: Vec<(SocketAddr, IntGauge)>,
    shared: Arc<Shared>,
}

struct ConnGuard(IntGauge);
impl Drop for ConnGuard {
    fn drop(&mut self) {
        self.0.dec();
    }
}

#[async_trait]
impl ServerApp for Counted {
    async fn process_new(
        self: &Arc<Self>,
        mut session: Stream,
        shutdown: &ShutdownWatch,
    ) -> Option<Stream> {
        // TLS connections had their PROXY header read before the handshake
        let plain = session.get_ssl_digest().is_none();
        if plain
            && self.shared.snapshot().config.client_ip.proxy_protocol
            && !accept_proxy_header(&mut *session).await
        {
            return None;
        }
        let local = session
            .get_socket_digest()
            .and_then(|d| d.local_addr().and_then(|a| a.as_inet()).copied());
        let _guard = local
            .and_then(|a| find_listener(&self.gauges, a, |g| g.0))
            .map(|(_, g)| {
                g.inc();
                ConnGuard(g.clone())
            });
        self.inner.process_new(session, shutdown).await
    }

    async fn cleanup(&self) {
        self.inner.cleanup().await
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
