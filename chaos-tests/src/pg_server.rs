//! A real PostgreSQL 15 server for tests, run as the OS user `postgres` (the tests run as root):
//! initdb with trust authentication, started on a free 127.0.0.1 port, stopped (immediate) on
//! drop; plus small helpers shared by the PostgreSQL tests.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use lifeboat_agent::sources::postgres::PostgresSourceConfig;
// `free_port` never hands out a port twice in this process: tests run in parallel.
use lifeboat_cli::harness::free_port;

use crate::{catalog_paths, Cluster};

/// Directory of the PostgreSQL 15 binaries.
pub const BIN: &str = "/usr/lib/postgresql/15/bin";

/// A PostgreSQL binary run as the OS user `postgres` (`runuser`).
pub fn as_postgres(prog: &str) -> Command {
    let mut c = Command::new("runuser");
    c.args(["-u", "postgres", "--"])
        .arg(Path::new(BIN).join(prog))
        .current_dir("/");
    c
}

/// Runs `c`; its trimmed stdout, or an error with its output.
///
/// Errors: the command fails or cannot start.
pub fn check(mut c: Command, what: &str) -> anyhow::Result<String> {
    let out = c.output().with_context(|| format!("run {what}"))?;
    if !out.status.success() {
        bail!(
            "{what} failed ({}): {}{}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
}

/// `chown -R postgres:postgres p`.
///
/// Errors: chown failing.
pub fn chown_postgres(p: &Path) -> anyhow::Result<()> {
    check(
        {
            let mut c = Command::new("chown");
            c.args(["-R", "postgres:postgres"]).arg(p);
            c
        },
        "chown",
    )
    .map(|_| ())
}

/// A PostgreSQL server on 127.0.0.1:`port`, data in `data`; stopped (immediate) on drop.
pub struct Pg {
    /// Data directory.
    pub data: PathBuf,
    /// TCP port on 127.0.0.1.
    pub port: u16,
}

impl Pg {
    /// initdb (trust auth) + start.
    ///
    /// Errors: initdb or start failures.
    pub fn init(data: &Path) -> anyhow::Result<Pg> {
        std::fs::create_dir_all(data.parent().unwrap())?;
        let mut c = as_postgres("initdb");
        c.arg("-D")
            .arg(data)
            .args(["-U", "postgres", "--auth=trust", "--no-sync"]);
        check(c, "initdb")?;
        Pg::start(data)
    }

    /// Starts an existing data directory on a free port (socket in the data dir's parent).
    ///
    /// Errors: pg_ctl start failing (the server log is in the error).
    pub fn start(data: &Path) -> anyhow::Result<Pg> {
        let port = free_port();
        let sock = data.parent().unwrap();
        let mut c = as_postgres("pg_ctl");
        c.arg("-D")
            .arg(data)
            .arg("-l")
            .arg(data.with_extension("log"))
            .arg("-o")
            .arg(format!(
                "-c port={port} -c listen_addresses=127.0.0.1 -c unix_socket_directories={} -c archive_mode=off",
                sock.display()
            ))
            .args(["-w", "-t", "120", "start"]);
        let pg = Pg {
            data: data.to_path_buf(),
            port,
        };
        if let Err(e) = check(c, "pg_ctl start") {
            let log = std::fs::read_to_string(data.with_extension("log")).unwrap_or_default();
            bail!("{e}\nserver log:\n{log}");
        }
        Ok(pg)
    }

    /// Runs `sql` with psql (unaligned, tuples only); its output.
    ///
    /// Errors: the query failing.
    pub fn psql(&self, sql: &str) -> anyhow::Result<String> {
        let mut c = Command::new(Path::new(BIN).join("psql"));
        c.args([
            "-h",
            "127.0.0.1",
            "-U",
            "postgres",
            "-d",
            "postgres",
            "-X",
            "-A",
            "-t",
        ])
        .args(["-v", "ON_ERROR_STOP=1", "-p"])
        .arg(self.port.to_string())
        .arg("-c")
        .arg(sql);
        check(c, &format!("psql {sql:?}"))
    }

    /// `pg_is_in_recovery()`.
    ///
    /// Errors: the query failing.
    pub fn in_recovery(&self) -> anyhow::Result<bool> {
        Ok(self.psql("SELECT pg_is_in_recovery()")? == "t")
    }

    /// `[[postgres_sources]]` entry for this server.
    pub fn source(&self, name: &str) -> PostgresSourceConfig {
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

impl Drop for Pg {
    fn drop(&mut self) {
        let mut c = as_postgres("pg_ctl");
        c.arg("-D")
            .arg(&self.data)
            .args(["-m", "immediate", "-w", "stop"]);
        let _ = c.output();
    }
}

/// A scratch directory the `postgres` user can traverse, owned by it.
///
/// Errors: I/O or chown failures.
pub fn pg_dir(scratch: &Path) -> anyhow::Result<PathBuf> {
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(scratch, std::fs::Permissions::from_mode(0o711))?;
    let d = scratch.join("pg");
    std::fs::create_dir_all(&d)?;
    chown_postgres(&d)?;
    Ok(d)
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
