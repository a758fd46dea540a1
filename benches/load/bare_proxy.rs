//! The framework floor for `make bench`: the smallest useful pingora proxy (every request to one
//! upstream over a keep-alive pool, nothing else), built into the `sluice` binary as
//! `sluice bench bare-proxy` so that it has exactly sluice's compiler settings and allocator.

use std::net::SocketAddr;
use std::path::PathBuf;

use async_trait::async_trait;
use pingora::listeners::tls::TlsSettings;
use pingora::prelude::*;
use pingora::server::configuration::ServerConf;
use pingora::upstreams::peer::HttpPeer;

#[derive(clap::Args)]
pub struct Options {
    /// Plain HTTP/1.1 listener.
    #[arg(long)]
    pub listen: SocketAddr,
    /// TLS listener (ALPN h2 + http/1.1), with --cert and --key.
    #[arg(long, requires_all = ["cert", "key"])]
    pub tls_listen: Option<SocketAddr>,
    #[arg(long)]
    pub cert: Option<PathBuf>,
    #[arg(long)]
    pub key: Option<PathBuf>,
    /// The one upstream (plain HTTP/1.1).
    #[arg(long)]
    pub upstream: SocketAddr,
    #[arg(long, default_value_t = 1)]
    pub threads: usize,
}

struct Bare {
    upstream: SocketAddr,
}

#[async_trait]
impl ProxyHttp for Bare {
    type CTX = ();
    fn new_ctx(&self) {}

    async fn upstream_peer(&self, _session: &mut Session, _ctx: &mut ()) -> Result<Box<HttpPeer>> {
        Ok(Box::new(HttpPeer::new(self.upstream, false, String::new())))
    }
}

pub fn run(o: Options) -> Result<(), String> {
    let conf = ServerConf {
        threads: o.threads,
        grace_period_seconds: Some(0),
        graceful_shutdown_timeout_seconds: Some(1),
        // the idle upstream pool sluice keeps (server::UPSTREAM_POOL_PER_THREAD) and nginx is
        // given in make bench: with pingora's 128, h2's 640 streams in flight would churn
        // upstream connections here and not there
        upstream_keepalive_pool_size: 1024,
        pid_file: std::env::temp_dir()
            .join(format!("sluice-bare-{}.pid", std::process::id()))
            .display()
            .to_string(),
        upgrade_sock: std::env::temp_dir()
            .join(format!("sluice-bare-{}.sock", std::process::id()))
            .display()
            .to_string(),
        ..ServerConf::default()
    };
    let mut server = Server::new_with_opt_and_conf(None, conf);
    server.bootstrap();
    let mut proxy = http_proxy_service(
        &server.configuration,
        Bare {
            upstream: o.upstream,
        },
    );
    proxy.threads = Some(o.threads);
    proxy.add_tcp(&o.listen.to_string());
    if let (Some(addr), Some(cert), Some(key)) = (o.tls_listen, &o.cert, &o.key) {
        let (cert, key) = (cert.display().to_string(), key.display().to_string());
        // pingora panics on unreadable files: check first
        for f in [&cert, &key] {
            std::fs::metadata(f).map_err(|e| format!("{f}: {e}"))?;
        }
        let mut tls = TlsSettings::intermediate(&cert, &key).map_err(|e| e.to_string())?;
        tls.enable_h2();
        proxy.add_tls_with_settings(&addr.to_string(), None, tls);
    }
    server.add_service(proxy);
    eprintln!("bare pingora proxy on {} -> {}", o.listen, o.upstream);
    server.run_forever()
}
