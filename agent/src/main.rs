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
    /// TOML config file (required; accepted before or after a subcommand).
    #[arg(long, env = "LIFEBOAT_AGENT_CONFIG", global = true)]
    config: Option<PathBuf>,
    /// Scan once, push everything until acknowledged, write status.json and exit.
    #[arg(long)]
    once: bool,
    #[command(subcommand)]
    cmd: Option<Cmd>,
}

#[derive(Debug, clap::Subcommand)]
enum Cmd {
    /// Accept the mass deletion the agent holds for one root (or adopt a replaced root).
    ///
    /// The agent holds (does not push) a set of deletions that removes more than
    /// `max_delete_files` entries or more than `max_delete_share` of a root's acknowledged
    /// entries, and reports it in status.json (`roots[].held.hold`). This command reads that
    /// hold id from status.json and writes an acceptance into `<data_dir>/accept-deletions/`;
    /// the running agent (or the next start) pushes exactly that set, logs it with
    /// `audit="accept-deletions"` and lists it in status.json (`accepted_deletions`). If the set
    /// changed meanwhile, the acceptance is ignored: look again and repeat. For a root that is
    /// another directory than the one recorded (`problem_kind = "replaced"`, e.g. a new volume),
    /// it adopts the directory now at the path; the deletions that follow are held again and need
    /// their own acceptance.
    AcceptDeletions {
        /// Root name (`[[paths]] name`).
        #[arg(long)]
        root: String,
        /// Hold id to accept (default: the one status.json shows for the root).
        #[arg(long)]
        hold: Option<String>,
    },
}

/// Writes the acceptance for `root` (see [`Cmd::AcceptDeletions`]).
fn accept_deletions(cfg: &Config, root: &str, hold: Option<String>) -> anyhow::Result<()> {
    use lifeboat_agent::files::guard;
    let p = cfg
        .paths
        .iter()
        .find(|p| p.name == root)
        .ok_or_else(|| anyhow::anyhow!("no [[paths]] root named {root:?} in the config"))?;
    let status = lifeboat_agent::status::read(&cfg.data_dir).ok();
    let entry = status.as_ref().and_then(|s| {
        s.roots
            .iter()
            .find(|r| r.name == root && r.kind == "source")
    });
    let mut a = guard::Acceptance {
        root: root.to_string(),
        hold: None,
        adopt: None,
        by: std::env::var("USER").unwrap_or_else(|_| "unknown".into()),
        at_ms: lifeboat_common::now_ms(),
    };
    if entry.is_some_and(|r| r.problem_kind == "replaced") {
        let id = guard::check_dir(&p.path, None).map_err(|e| anyhow::anyhow!("{e}"))?;
        a.adopt = Some(id);
        println!(
            "adopting {} (device/inode {}/{}) as root {root}",
            p.path.display(),
            id.0,
            id.1
        );
    } else {
        let shown = entry.and_then(|r| r.held.as_ref());
        a.hold = match (hold, shown) {
            (Some(h), _) => Some(h),
            (None, Some(h)) => Some(h.hold.clone()),
            (None, None) => anyhow::bail!(
                "the agent's status ({}) shows no held deletions for root {root}: nothing to accept",
                lifeboat_agent::status::path(&cfg.data_dir).display()
            ),
        };
        if let Some(h) = shown {
            println!(
                "accepting {} deletions of {} entries under root {root} (hold {}), e.g. {:?}",
                h.deletions, h.tracked, h.hold, h.sample
            );
        }
    }
    guard::write_acceptance(&cfg.data_dir, &a)?;
    println!(
        "written {}; the agent acts on it within {} s (audited in its log and status.json)",
        guard::acceptance_path(&cfg.data_dir, root).display(),
        lifeboat_agent::agent::ROOT_CHECK.as_secs()
    );
    Ok(())
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
    // Not `required` in clap: a required global argument is checked before the subcommand's
    // own arguments are read, so `accept-deletions --config FILE` would be refused.
    let Some(config) = args.config else {
        anyhow::bail!("--config FILE (or LIFEBOAT_AGENT_CONFIG) is required");
    };
    let cfg = Config::load(&config)?;
    if let Some(Cmd::AcceptDeletions { root, hold }) = args.cmd {
        return accept_deletions(&cfg, &root, hold);
    }
    let agent = Agent::new(cfg.clone()).context("cannot start the agent")?;
    let status = if args.once {
        agent.run_once().await?
    } else {
        let _metrics = lifeboat_agent::metrics::start(&cfg, agent.progress())
            .await
            .context("metrics")?;
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
