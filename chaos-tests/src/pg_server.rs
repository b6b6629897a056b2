//! A real PostgreSQL 15 server for tests, run as the OS user `postgres` (the tests run as root):
//! the lab's [`PgServer`] with the binaries in [`BIN`] (initdb with trust authentication, a free
//! 127.0.0.1 port, stopped (immediate) on drop), plus small helpers shared by the PostgreSQL
//! tests.

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use lifeboat_agent::sources::postgres::PostgresSourceConfig;
pub use lifeboat_lab::dbservers::{chown_to_server_user, PgServer as Pg};
pub use lifeboat_restore::servers::run_checked;

use crate::{catalog_paths, Cluster};

/// Directory of the PostgreSQL 15 binaries.
pub const BIN: &str = "/usr/lib/postgresql/15/bin";

/// A PostgreSQL binary of [`BIN`] run as the OS user `postgres` (`runuser`).
pub fn as_postgres(prog: &str) -> Command {
    lifeboat_restore::servers::pg_command(Path::new(BIN), prog, Some("postgres"))
}

/// The tests' constructors of [`Pg`] (binaries in [`BIN`]) and its agent source config.
pub trait PgTest: Sized {
    /// initdb (trust auth) in `data` (inside a [`Pg::workdir`]) + start.
    ///
    /// Errors: initdb or start failures.
    fn init(data: &Path) -> anyhow::Result<Self>;

    /// Starts an existing data directory (e.g. a restored one) on a free port (socket in the
    /// data dir's parent).
    ///
    /// Errors: pg_ctl start failing (the server log is in the error).
    fn start(data: &Path) -> anyhow::Result<Self>;

    /// `[[postgres_sources]]` entry `name` for this server (run as `postgres`, hourly base
    /// backups).
    fn source(&self, name: &str) -> PostgresSourceConfig;
}

impl PgTest for Pg {
    fn init(data: &Path) -> anyhow::Result<Pg> {
        Pg::init_primary(Path::new(BIN), data, "primary")
    }

    fn start(data: &Path) -> anyhow::Result<Pg> {
        Pg::start_existing(Path::new(BIN), data, "restored")
    }

    fn source(&self, name: &str) -> PostgresSourceConfig {
        serde_json::from_value(serde_json::json!({
            "name": name,
            "host": "127.0.0.1",
            "port": self.port,
            "user": "postgres",
            "data_dir": self.data,
            "run_as": "postgres",
            "base_backup_interval_s": 3600,
        }))
        .expect("source config")
    }
}

/// Polls `f` every 200 ms until it returns true, for up to `secs` seconds.
///
/// Errors: timeout (with the last error of `f`, if any).
pub async fn wait_for(
    what: &str,
    secs: u64,
    mut f: impl FnMut() -> anyhow::Result<bool>,
) -> anyhow::Result<()> {
    let deadline = Instant::now() + Duration::from_secs(secs);
    loop {
        match f() {
            Ok(true) => return Ok(()),
            Ok(false) => {}
            Err(e) if Instant::now() >= deadline => return Err(e.context(what.to_string())),
            Err(_) => {}
        }
        anyhow::ensure!(
            Instant::now() < deadline,
            "timed out after {secs} s: {what}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Switches `pg` to a new WAL segment and waits (up to `secs`) until the completed one is in
/// `cluster`'s catalog under `_snapshots/<source>/wal/`, then until the agent with data dir
/// `data` is idle. Returns the segment's file name.
///
/// Errors: query failures, timeouts.
pub async fn switch_wal_and_wait(
    pg: &Pg,
    cluster: &Cluster,
    source: &str,
    data: &Path,
    secs: u64,
) -> anyhow::Result<String> {
    let seg = pg.psql("SELECT pg_walfile_name(pg_current_wal_lsn())")?;
    pg.psql("SELECT pg_switch_wal()")?;
    let prefix = format!("_snapshots/{source}/wal");
    let want = format!("{prefix}/{seg}");
    wait_for(&format!("{want} in the catalog"), secs, || {
        Ok(catalog_paths(cluster, &prefix).contains(&want))
    })
    .await?;
    crate::settle(data).await?;
    Ok(seg)
}
