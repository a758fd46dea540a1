//! `sluice demo-backend`: a small HTTP/1.1 + h2c (and optionally TLS / mTLS) server for demos,
//! tests and benchmarks. It answers with its name and can be told to fail or to be slow.
//!
//! - `GET /healthz`: 200 `ok` (503 while failing)
//! - `POST /_demo/fail`, `POST /_demo/recover`: every answer becomes 503 / normal again
//! - `POST /_demo/health-fail`: `/healthz` answers 500 while other paths still work (until
//!   `/_demo/recover`)
//! - `POST /_demo/errors?status=N[&every=K]`: every answer (or one in K) has status N while
//!   `/healthz` stays healthy (a broken release that passes its health check), until
//!   `/_demo/recover`
//! - `GET /_demo/sleep?ms=N`: answers after N milliseconds
//! - `GET /_demo/headers`: the request's headers as JSON
//!
//! The control paths also work behind any prefix (`/api/_demo/sleep`).
//! - anything else: 200 with the body `NAME\n` and header `x-backend: NAME`
//!
//! Every answer carries `x-connection-id`, numbering the connections the backend accepted.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU16, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use tokio::net::TcpListener;

/// The demo backend's command line (`sluice demo-backend ...`).
#[derive(clap::Args)]
pub struct Options {
    #[arg(long)]
    pub listen: SocketAddr,
    #[arg(long)]
    pub name: String,
    /// Start failing (503 to everything) until POST /_demo/recover.
    #[arg(long)]
    pub fail: bool,
    /// Serve TLS with this certificate chain (PEM).
    #[arg(long, requires = "tls_key")]
    pub tls_cert: Option<PathBuf>,
    #[arg(long, requires = "tls_cert")]
    pub tls_key: Option<PathBuf>,
    /// Demand a client certificate signed by this CA (PEM).
    #[arg(long, requires = "tls_cert")]
    pub client_ca: Option<PathBuf>,
}

struct State {
    name: String,
    failing: AtomicBool,
    /// `/healthz` answers 500 while traffic is still served.
    sick: AtomicBool,
    /// Status of every ordinary answer while set (0: off).
    error_status: AtomicU16,
    /// One ordinary answer in this many gets `error_status`.
    error_every: AtomicU64,
    answered: AtomicU64,
    connections: AtomicU64,
}

pub fn run(opts: Options) -> Result<(), String> {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .map_err(|e| e.to_string())?;
    rt.block_on(serve(opts))
}

fn tls_acceptor(opts: &Options) -> Result<Option<tokio_rustls::TlsAcceptor>, String> {
    let (Some(cert), Some(key)) = (&opts.tls_cert, &opts.tls_key) else {
        return Ok(None);
    };
    let chain = crate::tls::load_certs(cert)?;
    let key = crate::tls::load_key(key)?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = rustls::ServerConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .map_err(|e| e.to_string())?;
    let builder = match &opts.client_ca {
        Some(ca) => {
            let mut roots = rustls::RootCertStore::empty();
            for c in crate::tls::load_certs(ca)? {
                roots.add(c).map_err(|e| e.to_string())?;
            }
            let verifier =
                rustls::server::WebPkiClientVerifier::builder_with_provider(roots.into(), provider)
                    .build()
                    .map_err(|e| e.to_string())?;
            builder.with_client_cert_verifier(verifier)
        }
        None => builder.with_no_client_auth(),
    };
    let mut cfg = builder
        .with_single_cert(chain, key)
        .map_err(|e| e.to_string())?;
    cfg.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(Some(tokio_rustls::TlsAcceptor::from(Arc::new(cfg))))
}

async fn serve(opts: Options) -> Result<(), String> {
    let acceptor = tls_acceptor(&opts)?;
    let listener = TcpListener::bind(opts.listen)
        .await
        .map_err(|e| format!("cannot listen on {}: {e}", opts.listen))?;
    let state = Arc::new(State {
        name: opts.name.clone(),
        failing: AtomicBool::new(opts.fail),
        sick: AtomicBool::new(false),
        error_status: AtomicU16::new(0),
        error_every: AtomicU64::new(1),
        answered: AtomicU64::new(0),
        connections: AtomicU64::new(0),
    });
    eprintln!("demo-backend {} listening on {}", opts.name, opts.listen);
    loop {
        let (tcp, _) = match listener.accept().await {
            Ok(c) => c,
            Err(e) => {
                eprintln!("accept: {e}");
                tokio::time::sleep(Duration::from_millis(10)).await;
                continue;
            }
        };
        let _ = tcp.set_nodelay(true);
        let state = state.clone();
        let acceptor = acceptor.clone();
        let conn = state.connections.fetch_add(1, Ordering::Relaxed) + 1;
        tokio::spawn(async move {
            let svc = service_fn(move |req| {
                let state = state.clone();
                async move {
                    let mut resp = handle(state, req).await?;
                    resp.headers_mut()
                        .insert("x-connection-id", hyper::header::HeaderValue::from(conn));
                    Ok::<_, Infallible>(resp)
                }
            });
            let builder = auto::Builder::new(TokioExecutor::new());
            let result = match acceptor {
                Some(a) => match a.accept(tcp).await {
                    Ok(tls) => builder.serve_connection(TokioIo::new(tls), svc).await,
                    Err(_) => return,
                },
                None => builder.serve_connection(TokioIo::new(tcp), svc).await,
            };
            drop(result);
        });
    }
}

fn text(status: StatusCode, name: &str, body: String) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(Bytes::from(body)));
    *r.status_mut() = status;
    if let Ok(v) = name.parse() {
        r.headers_mut().insert("x-backend", v);
    }
    r
}

async fn handle(
    state: Arc<State>,
    req: Request<Incoming>,
) -> Result<Response<Full<Bytes>>, Infallible> {
    // Control paths work under any prefix (routes forward the path unchanged).
    let full = req.uri().path();
    let path = match full.find("/_demo/") {
        Some(i) => full[i..].to_string(),
        None if full.ends_with("/healthz") => "/healthz".to_string(),
        None => full.to_string(),
    };
    let query = req.uri().query().unwrap_or("").to_string();
    let name = state.name.as_str();
    match path.as_str() {
        "/_demo/fail" => {
            state.failing.store(true, Ordering::SeqCst);
            return Ok(text(StatusCode::OK, name, "failing\n".into()));
        }
        "/_demo/recover" => {
            state.failing.store(false, Ordering::SeqCst);
            state.sick.store(false, Ordering::SeqCst);
            state.error_status.store(0, Ordering::SeqCst);
            return Ok(text(StatusCode::OK, name, "recovered\n".into()));
        }
        "/_demo/errors" => {
            let status = query
                .split('&')
                .find_map(|kv| kv.strip_prefix("status="))
                .and_then(|v| v.parse::<u16>().ok())
                .filter(|s| (400..600).contains(s))
                .unwrap_or(500);
            let every = query
                .split('&')
                .find_map(|kv| kv.strip_prefix("every="))
                .and_then(|v| v.parse::<u64>().ok())
                .unwrap_or(1)
                .max(1);
            state.error_every.store(every, Ordering::SeqCst);
            state.error_status.store(status, Ordering::SeqCst);
            return Ok(text(
                StatusCode::OK,
                name,
                format!("answering {status} to 1 in {every}\n"),
            ));
        }
        "/_demo/health-fail" => {
            state.sick.store(true, Ordering::SeqCst);
            return Ok(text(StatusCode::OK, name, "healthz now fails\n".into()));
        }
        _ => {}
    }
    if state.failing.load(Ordering::SeqCst) {
        return Ok(text(
            StatusCode::SERVICE_UNAVAILABLE,
            name,
            format!("{name} failing\n"),
        ));
    }
    match path.as_str() {
        "/healthz" if state.sick.load(Ordering::SeqCst) => Ok(text(
            StatusCode::INTERNAL_SERVER_ERROR,
            name,
            "unhealthy\n".into(),
        )),
        "/healthz" => Ok(text(StatusCode::OK, name, "ok\n".into())),
        "/_demo/sleep" => {
            let ms = query
                .split('&')
                .find_map(|kv| kv.strip_prefix("ms="))
                .and_then(|v| v.parse::<u64>().ok())
                .unwrap_or(1000)
                .min(120_000);
            tokio::time::sleep(Duration::from_millis(ms)).await;
            Ok(text(StatusCode::OK, name, format!("{name}\n")))
        }
        "/_demo/headers" => {
            let mut map = serde_json::Map::new();
            for (k, v) in req.headers() {
                map.insert(
                    k.as_str().to_string(),
                    serde_json::Value::String(String::from_utf8_lossy(v.as_bytes()).into_owned()),
                );
            }
            let body = serde_json::json!({
                "backend": name,
                "version": format!("{:?}", req.version()),
                "method": req.method().as_str(),
                "uri": req.uri().to_string(),
                "headers": map,
            });
            Ok(text(StatusCode::OK, name, body.to_string()))
        }
        _ => {
            // drain the body so keep-alive works for POSTs too
            let _ = req.into_body().collect().await;
            let n = state.answered.fetch_add(1, Ordering::SeqCst);
            let every = state.error_every.load(Ordering::SeqCst).max(1);
            let status = match state.error_status.load(Ordering::SeqCst) {
                s if s > 0 && n.is_multiple_of(every) => {
                    StatusCode::from_u16(s).unwrap_or(StatusCode::OK)
                }
                _ => StatusCode::OK,
            };
            Ok(text(status, name, format!("{name}\n")))
        }
    }
}
