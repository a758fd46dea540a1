//! `sluice bench flood`: how fast the admin probes answer while the proxy listener is flooded.
//! First `--seconds` of probes with nothing else going on (the reference), then the same with
//! `--connections` idle connections and `--slow` slowloris clients (one byte of a request head
//! every 500 ms) held on `--target`. Prints one JSON object.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

#[derive(clap::Args)]
pub struct FloodOptions {
    /// The proxy listener to flood.
    #[arg(long)]
    pub target: SocketAddr,
    /// The admin listener whose /healthz is timed.
    #[arg(long)]
    pub admin: SocketAddr,
    #[arg(long, default_value_t = 5000)]
    pub connections: usize,
    #[arg(long, default_value_t = 500)]
    pub slow: usize,
    #[arg(long, default_value_t = 5)]
    pub seconds: u64,
}

/// One GET /healthz on a new connection: how long until the whole answer, if it was a 200.
async fn probe(admin: SocketAddr) -> Option<Duration> {
    let t = Instant::now();
    let mut s = TcpStream::connect(admin).await.ok()?;
    s.write_all(b"GET /healthz HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n")
        .await
        .ok()?;
    let mut out = Vec::new();
    s.read_to_end(&mut out).await.ok()?;
    out.starts_with(b"HTTP/1.1 200").then(|| t.elapsed())
}

/// Probes every 20 ms for `secs`: (sorted latencies in ms, failures).
async fn probes(admin: SocketAddr, secs: u64) -> (Vec<f64>, usize) {
    let end = Instant::now() + Duration::from_secs(secs);
    let (mut lat, mut failed) = (Vec::new(), 0);
    while Instant::now() < end {
        match tokio::time::timeout(Duration::from_secs(5), probe(admin)).await {
            Ok(Some(d)) => lat.push(d.as_secs_f64() * 1000.0),
            _ => failed += 1,
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    lat.sort_by(|a, b| a.total_cmp(b));
    (lat, failed)
}

fn pct(v: &[f64], p: f64) -> f64 {
    v.get(((v.len() as f64 * p) as usize).min(v.len().saturating_sub(1)))
        .copied()
        .unwrap_or(0.0)
}

pub fn flood(o: FloodOptions) -> Result<(), String> {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .map_err(|e| e.to_string())?;
    rt.block_on(async move {
        let (quiet, quiet_failed) = probes(o.admin, o.seconds).await;
        let mut idle = Vec::with_capacity(o.connections);
        for _ in 0..o.connections {
            if let Ok(s) = TcpStream::connect(o.target).await {
                idle.push(s);
            }
        }
        let mut slow = Vec::new();
        for _ in 0..o.slow {
            let target = o.target;
            slow.push(tokio::spawn(async move {
                let Ok(mut s) = TcpStream::connect(target).await else {
                    return;
                };
                let head = b"GET / HTTP/1.1\r\nHost: t\r\nX-Slow: ";
                for i in 0.. {
                    let b = head.get(i).copied().unwrap_or(b'a');
                    if s.write_all(&[b]).await.is_err() {
                        return;
                    }
                    tokio::time::sleep(Duration::from_millis(500)).await;
                }
            }));
        }
        let (flooded, flooded_failed) = probes(o.admin, o.seconds).await;
        for t in slow {
            t.abort();
        }
        println!(
            "{{\"held\": {}, \"quiet_p50_ms\": {:.3}, \"quiet_p99_ms\": {:.3}, \"quiet_failed\": {quiet_failed}, \"flood_p50_ms\": {:.3}, \"flood_p99_ms\": {:.3}, \"flood_max_ms\": {:.3}, \"flood_failed\": {flooded_failed}}}",
            idle.len(),
            pct(&quiet, 0.5),
            pct(&quiet, 0.99),
            pct(&flooded, 0.5),
            pct(&flooded, 0.99),
            flooded.last().copied().unwrap_or(0.0),
        );
        Ok(())
    })
}
