//! `lifeboat-coordinator --config FILE`: runs one coordinator until SIGTERM or Ctrl-C.

/// jemalloc instead of glibc's allocator: it keeps freed memory for reuse (dirty pages decay
/// over seconds), so the 4 MiB part buffers allocated per part do not fault in fresh zeroed
/// pages each time, as glibc's `mmap`-backed large allocations do.
#[global_allocator]
static GLOBAL: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

use std::path::PathBuf;

use anyhow::Context;
use clap::Parser;

/// Lifeboat coordinator: a member of a region's Raft group holding the file catalog.
#[derive(Parser, Debug)]
#[command(
    version,
    about,
    long_about = "Runs one Lifeboat coordinator: a member of its region's Raft group (openraft, redb storage) that accepts file changes from agents, stores their blobs, commits the catalog through Raft, and serves the admin API. See deploy/examples/coordinator.toml for every option."
)]
struct Args {
    /// Path of the TOML config file.
    #[arg(long, short)]
    config: PathBuf,
}

fn init_tracing() {
    use tracing_subscriber::EnvFilter;
    let filter = EnvFilter::try_from_env("LIFEBOAT_LOG")
        .unwrap_or_else(|_| EnvFilter::new("info,openraft=warn"));
    if std::env::var("LIFEBOAT_LOG_JSON").is_ok_and(|v| v == "1") {
        tracing_subscriber::fmt()
            .with_env_filter(filter)
            .json()
            .init();
    } else {
        tracing_subscriber::fmt().with_env_filter(filter).init();
    }
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    init_tracing();
    let args = Args::parse();
    let cfg = lifeboat_coordinator::config::CoordinatorConfig::load(&args.config)
        .with_context(|| format!("loading {}", args.config.display()))?;
    let shutdown = async {
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
            .expect("SIGTERM handler");
        tokio::select! {
            _ = tokio::signal::ctrl_c() => {},
            _ = term.recv() => {},
        }
        tracing::info!("shutting down");
    };
    lifeboat_coordinator::node::run(cfg, shutdown).await
}
