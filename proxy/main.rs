use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

// Load-test tools for `make bench` (benches/load/), built into the binary so that the framework
// floor has exactly sluice's build settings and allocator.
#[path = "../benches/load/bare_proxy.rs"]
mod bare_proxy;
#[path = "../benches/load/flood.rs"]
mod flood;
#[path = "../benches/load/tls_client.rs"]
mod tls_client;

// `--features system-alloc` keeps the system allocator, for heap profilers (valgrind massif,
// heaptrack) that follow malloc.
#[cfg(not(feature = "system-alloc"))]
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Parser)]
#[command(
    name = "sluice",
    version,
    about = "Layer-7 reverse proxy and edge gateway"
)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Run the gateway.
    Run {
        #[arg(short, long, default_value = "config/sluice.toml")]
        config: PathBuf,
    },
    /// Validate a config file and exit (0 if valid; otherwise every problem as file:line:col).
    Check {
        #[arg(short, long, default_value = "config/sluice.toml")]
        config: PathBuf,
    },
    /// A small HTTP/1.1 + h2c demo backend that answers with its name.
    DemoBackend(sluice::demo_backend::Options),
    /// Write the demo geo database (MaxMind DB format; documentation ranges and loopback
    /// test addresses placed in a few cities).
    GeoipBuildDemo {
        #[arg(long, default_value = "geoip/demo-city.mmdb")]
        out: PathBuf,
    },
    /// GET http://ADDR/PATH; exit 0 on a 200 answer (a container HEALTHCHECK without a shell).
    Probe {
        #[arg(default_value = "127.0.0.1:9900")]
        addr: std::net::SocketAddr,
        #[arg(default_value = "/healthz")]
        path: String,
    },
    /// Benchmark tools used by `make bench` (benches/load/run.sh).
    #[command(subcommand)]
    Bench(BenchCmd),
    /// Write a self-signed development certificate (kept if it already exists).
    GenCert {
        #[arg(long, default_value = "certs/dev.crt")]
        cert: PathBuf,
        #[arg(long, default_value = "certs/dev.key")]
        key: PathBuf,
        /// Host names and addresses the certificate is valid for.
        #[arg(
            long,
            value_delimiter = ',',
            default_value = "localhost,127.0.0.1,shop.example.com,*.example.com"
        )]
        hosts: Vec<String>,
    },
}

#[derive(Subcommand)]
enum BenchCmd {
    /// The framework floor: a bare pingora proxy to one upstream.
    BareProxy(bare_proxy::Options),
    /// New TLS 1.3 connections per second against a server (JSON result on stdout).
    Handshakes(tls_client::HandshakeOptions),
    /// Hold N idle keep-alive connections (TLS, or plain with --plain) open until stdin closes.
    Idle(tls_client::IdleOptions),
    /// Time the admin /healthz quiet, then with the proxy listener flooded (JSON on stdout).
    Flood(flood::FloodOptions),
}

fn main() -> ExitCode {
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("info"))
        .target(env_logger::Target::Stderr)
        .init();
    let cli = Cli::parse();
    let result = match cli.cmd {
        Cmd::Run { config } => sluice::server::run(&config),
        Cmd::Check { config } => match sluice::config::load(&config) {
            Ok(cfg) => {
                // backends given by name: a name that does not resolve (yet) is worth a
                // warning, not a failure (its pool serves once it does)
                for w in sluice::discovery::check_names(&cfg) {
                    eprintln!("{}: warning: {w}", config.display());
                }
                println!("{}: ok", config.display());
                Ok(())
            }
            Err(errs) => {
                for e in &errs {
                    eprintln!("{e}");
                }
                Err(format!("{} problem(s) found", errs.len()))
            }
        },
        Cmd::DemoBackend(opts) => sluice::demo_backend::run(opts),
        Cmd::Probe { addr, path } => probe(addr, &path),
        Cmd::Bench(BenchCmd::BareProxy(o)) => bare_proxy::run(o),
        Cmd::Bench(BenchCmd::Handshakes(o)) => tls_client::handshakes(o),
        Cmd::Bench(BenchCmd::Idle(o)) => tls_client::idle(o),
        Cmd::Bench(BenchCmd::Flood(o)) => flood::flood(o),
        Cmd::GenCert { cert, key, hosts } => gen_cert(&cert, &key, &hosts),
        Cmd::GeoipBuildDemo { out } => {
            if let Some(dir) = out.parent().filter(|d| !d.as_os_str().is_empty()) {
                let _ = std::fs::create_dir_all(dir);
            }
            sluice::geo::write_db(&out, sluice::geo::DEMO).map(|()| {
                println!("wrote {}", out.display());
            })
        }
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("sluice: {e}");
            ExitCode::from(1)
        }
    }
}

fn probe(addr: std::net::SocketAddr, path: &str) -> Result<(), String> {
    use std::io::{Read, Write};
    let t = std::time::Duration::from_secs(2);
    let mut s =
        std::net::TcpStream::connect_timeout(&addr, t).map_err(|e| format!("{addr}: {e}"))?;
    let _ = s.set_read_timeout(Some(t));
    let _ = s.set_write_timeout(Some(t));
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
    )
    .map_err(|e| format!("{addr}: {e}"))?;
    let mut head = [0u8; 12];
    s.read_exact(&mut head)
        .map_err(|e| format!("{addr}: {e}"))?;
    if head.starts_with(b"HTTP/1.1 200") {
        Ok(())
    } else {
        Err(format!("{addr}{path}: {}", String::from_utf8_lossy(&head)))
    }
}

fn gen_cert(cert: &PathBuf, key: &PathBuf, hosts: &[String]) -> Result<(), String> {
    if cert.exists() && key.exists() {
        println!("{} exists; kept", cert.display());
        return Ok(());
    }
    let (c, k) = sluice::tls::generate_self_signed(hosts)?;
    for p in [cert, key] {
        if let Some(dir) = p.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir).map_err(|e| format!("{}: {e}", dir.display()))?;
        }
    }
    std::fs::write(cert, c).map_err(|e| format!("{}: {e}", cert.display()))?;
    std::fs::write(key, k).map_err(|e| format!("{}: {e}", key.display()))?;
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let _ = std::fs::set_permissions(key, std::fs::Permissions::from_mode(0o600));
    }
    println!("wrote {} and {}", cert.display(), key.display());
    Ok(())
}
