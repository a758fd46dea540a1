//! TLS load that wrk and h2load do not make, for `make bench`, built into the `sluice` binary as
//! `sluice bench handshakes` and `sluice bench idle`:
//! - `handshakes`: new TLS 1.3 connections as fast as the server takes them (full handshake, no
//!   resumption, one HTTP/1.1 request each, then close);
//! - `idle`: opens N keep-alive TLS connections, makes one request on each, prints `ready N` and
//!   holds them until stdin closes (the caller reads the server's memory meanwhile).

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{DigitallySignedStruct, SignatureScheme};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;

#[derive(clap::Args)]
pub struct HandshakeOptions {
    #[arg(long)]
    pub target: SocketAddr,
    #[arg(long, default_value_t = 5)]
    pub seconds: u64,
    /// Handshakes in flight at once.
    #[arg(long, default_value_t = 32)]
    pub concurrency: usize,
}

#[derive(clap::Args)]
pub struct IdleOptions {
    #[arg(long)]
    pub target: SocketAddr,
    #[arg(long, default_value_t = 10_000)]
    pub connections: usize,
    /// Handshakes in flight at once while opening.
    #[arg(long, default_value_t = 64)]
    pub concurrency: usize,
    /// Plain TCP (HTTP/1.1 without TLS) instead of TLS.
    #[arg(long)]
    pub plain: bool,
}

/// The benchmark measures the server: the client skips certificate checks (it still does the
/// full TLS 1.3 key exchange and checks the handshake signature's form).
#[derive(Debug)]
struct AnyCert(Arc<rustls::crypto::CryptoProvider>);

impl ServerCertVerifier for AnyCert {
    fn verify_server_cert(
        &self,
        _: &CertificateDer<'_>,
        _: &[CertificateDer<'_>],
        _: &ServerName<'_>,
        _: &[u8],
        _: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }
    fn verify_tls12_signature(
        &self,
        _: &[u8],
        _: &CertificateDer<'_>,
        _: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        Ok(HandshakeSignatureValid::assertion())
    }
    fn verify_tls13_signature(
        &self,
        _: &[u8],
        _: &CertificateDer<'_>,
        _: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        Ok(HandshakeSignatureValid::assertion())
    }
    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

fn connector() -> Result<TlsConnector, String> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut cfg = rustls::ClientConfig::builder_with_provider(provider.clone())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(|e| e.to_string())?
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(AnyCert(provider)))
        .with_no_client_auth();
    cfg.alpn_protocols = vec![b"http/1.1".to_vec()];
    cfg.resumption = rustls::client::Resumption::disabled();
    Ok(TlsConnector::from(Arc::new(cfg)))
}

fn runtime() -> Result<tokio::runtime::Runtime, String> {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| e.to_string())
}

/// One connection: handshake, one request; returns the open stream after a complete response.
async fn open(
    c: &TlsConnector,
    target: SocketAddr,
    close: bool,
) -> Result<tokio_rustls::client::TlsStream<TcpStream>, String> {
    let tcp = TcpStream::connect(target)
        .await
        .map_err(|e| e.to_string())?;
    let _ = tcp.set_nodelay(true);
    let name = ServerName::try_from("localhost").map_err(|e| e.to_string())?;
    let mut tls = c.connect(name, tcp).await.map_err(|e| e.to_string())?;
    let req = if close {
        "GET / HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n"
    } else {
        "GET / HTTP/1.1\r\nHost: localhost\r\n\r\n"
    };
    tls.write_all(req.as_bytes())
        .await
        .map_err(|e| e.to_string())?;
    read_response(&mut tls).await?;
    Ok(tls)
}

/// One plain connection with one request answered.
async fn open_plain(target: SocketAddr) -> Result<TcpStream, String> {
    let mut tcp = TcpStream::connect(target)
        .await
        .map_err(|e| e.to_string())?;
    let _ = tcp.set_nodelay(true);
    tcp.write_all(b"GET / HTTP/1.1\r\nHost: localhost\r\n\r\n")
        .await
        .map_err(|e| e.to_string())?;
    read_response(&mut tcp).await?;
    Ok(tcp)
}

/// Reads one response with a Content-Length body; Err unless it is a 200.
async fn read_response<S: tokio::io::AsyncRead + Unpin>(s: &mut S) -> Result<(), String> {
    let mut buf = Vec::with_capacity(1024);
    let mut chunk = [0u8; 4096];
    loop {
        let n = s.read(&mut chunk).await.map_err(|e| e.to_string())?;
        if n == 0 {
            return Err("closed before a full response".into());
        }
        buf.extend_from_slice(&chunk[..n]);
        let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") else {
            continue;
        };
        let head = String::from_utf8_lossy(&buf[..end]).to_ascii_lowercase();
        if !head.starts_with("http/1.1 200") {
            return Err(head.lines().next().unwrap_or("").to_string());
        }
        let len = head
            .lines()
            .find_map(|l| l.strip_prefix("content-length:"))
            .and_then(|v| v.trim().parse::<usize>().ok())
            .ok_or("no content-length")?;
        if buf.len() >= end + 4 + len {
            return Ok(());
        }
    }
}

pub fn handshakes(o: HandshakeOptions) -> Result<(), String> {
    let c = connector()?;
    runtime()?.block_on(async move {
        let end = Instant::now() + Duration::from_secs(o.seconds);
        let mut tasks = Vec::new();
        for _ in 0..o.concurrency {
            let c = c.clone();
            tasks.push(tokio::spawn(async move {
                let (mut ok, mut errors, mut lat) = (0u64, 0u64, Vec::new());
                while Instant::now() < end {
                    let t = Instant::now();
                    match open(&c, o.target, true).await {
                        Ok(_) => {
                            ok += 1;
                            lat.push(t.elapsed().as_micros() as u64);
                        }
                        Err(_) => errors += 1,
                    }
                }
                (ok, errors, lat)
            }));
        }
        let (mut ok, mut errors, mut lat) = (0, 0, Vec::new());
        for t in tasks {
            let (a, b, l) = t.await.map_err(|e| e.to_string())?;
            ok += a;
            errors += b;
            lat.extend(l);
        }
        lat.sort_unstable();
        let pct = |p: f64| {
            lat.get(((lat.len() as f64 * p) as usize).min(lat.len().saturating_sub(1)))
                .map_or(0.0, |us| *us as f64 / 1000.0)
        };
        println!(
            "{{\"connections\": {ok}, \"errors\": {errors}, \"per_sec\": {:.1}, \"p50_ms\": {:.3}, \"p99_ms\": {:.3}}}",
            ok as f64 / o.seconds as f64,
            pct(0.5),
            pct(0.99)
        );
        Ok(())
    })
}

/// A connection held open by `idle`.
#[allow(dead_code)]
enum Held {
    Plain(TcpStream),
    Tls(Box<tokio_rustls::client::TlsStream<TcpStream>>),
}

pub fn idle(o: IdleOptions) -> Result<(), String> {
    let c = connector()?;
    runtime()?.block_on(async move {
        let sem = Arc::new(tokio::sync::Semaphore::new(o.concurrency));
        let mut tasks = Vec::new();
        for _ in 0..o.connections {
            let (c, sem) = (c.clone(), sem.clone());
            tasks.push(tokio::spawn(async move {
                let _permit = sem.acquire_owned().await.map_err(|e| e.to_string())?;
                if o.plain {
                    open_plain(o.target).await.map(Held::Plain)
                } else {
                    open(&c, o.target, false)
                        .await
                        .map(|s| Held::Tls(Box::new(s)))
                }
            }));
        }
        let mut open_conns = Vec::new();
        let mut errors = 0;
        for t in tasks {
            match t.await.map_err(|e| e.to_string())? {
                Ok(s) => open_conns.push(s),
                Err(_) => errors += 1,
            }
        }
        println!("ready {} errors {errors}", open_conns.len());
        // hold until the caller closes stdin
        let mut stdin = tokio::io::stdin();
        let mut sink = [0u8; 64];
        while stdin.read(&mut sink).await.is_ok_and(|n| n > 0) {}
        drop(open_conns);
        Ok(())
    })
}
