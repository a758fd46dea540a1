//! `make bench`'s reference: the bare pingora proxy of `sluice bench bare-proxy`, built against
//! the published pingora (no sluice patches). Same options as `sluice bench bare-proxy`.

use clap::Parser;

#[path = "../bare_proxy.rs"]
mod bare_proxy;

#[cfg(not(feature = "system-alloc"))]
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Parser)]
#[command(name = "bare-pingora", about = "the bare pingora proxy, published pingora")]
struct Cli {
    #[command(flatten)]
    options: bare_proxy::Options,
}

fn main() {
    let cli = Cli::parse();
    if let Err(e) = bare_proxy::run(cli.options) {
        eprintln!("error: {e}");
        std::process::exit(1);
    }
}
