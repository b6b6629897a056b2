//! `lifeboat-agent --config FILE [--once]`: the Lifeboat agent binary.

/// jemalloc instead of glibc's allocator: it keeps freed memory for reuse (dirty pages decay
/// over seconds), so the 4 MiB part buffers allocated per part do not fault in fresh zeroed
/// pages each time, as glibc's `mmap`-backed large allocations do.
#[global_allocator]
static GLOBAL: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

use std::path::PathBuf;

use anyhow::Context;
use clap::Parser;
use lifeboat_agent::{Agent, Config};

/// Lifeboat agent: watches protected paths and streams their changes to the regional coordinator
/// leader.
#[derive(Debug, Parser)]
#[command(name = "lifeboat-agent", version)]
struct Args {
    /// TOML config file.
    #[arg(long, env = "LIFEBOAT_AGENT_CONFIG")]
    config: PathBuf,
    /// Scan once, push everything until acknowledged, write status.json and exit.
    #[arg(long)]
    once: bool,
}

fn init_tracing() {
    use tracing_subscriber::EnvFilter;
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let json = std::env::var("LIFEBOAT_LOG_JSON").is_ok_and(|v| v == "1" || v == "true");
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    if json {
        builder.json().init();
    } else {
        builder.init();
    }
}

async fn shutdown_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    match signal(SignalKind::terminate()) {
        Ok(mut term) => {
            tokio::select! {
                _ = term.recv() => {}
                _ = tokio::signal::ctrl_c() => {}
            }
        }
        Err(_) => {
            let _ = tokio::signal::ctrl_c().await;
        }
    }
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    init_tracing();
    let args = Args::parse();
    let cfg = Config::load(&args.config)?;
    let agent = Agent::new(cfg).context("cannot start the agent")?;
    let status = if args.once {
        agent.run_once().await?
    } else {
        agent.run(shutdown_signal()).await?
    };
    tracing::info!(
        changes_acked = status.changes_acked,
        bytes_sent = status.bytes_sent,
        idle = status.idle,
        "exiting"
    );
    Ok(())
}
