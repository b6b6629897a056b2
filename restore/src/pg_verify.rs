//! `lifeboat verify snapshot <source>/base/<ts>`: a PostgreSQL base backup restored into a scratch
//! data directory and started as a throw-away server.
//!
//! The tar (already verified by blake3 against the catalog and its sidecar) is unpacked into
//! `SCRATCH/data` (owned by `postgres` when run as root, like `restore postgres`); recovery is
//! set up as `restore postgres` does, with `recovery_target = 'immediate'` (quick: the WAL the
//! `-X fetch` tar carries is enough to reach consistency) or, with `--full`, every archived WAL
//! segment from the backup's start on (the PITR path end to end). The scratch server listens on a
//! Unix socket inside its 0700 data directory only (no TCP), on a free port number, with its own
//! `hba_file` (trust for local connections), `ssl = off`, `archive_mode = off`,
//! `hot_standby = off` (so a primary's larger `max_connections` etc. do not block recovery) and
//! `fsync = off` (nothing here is kept). The checks then count the rows of every table of
//! `--database` and run the optional `--sql` query, compared with `--expect`. The server is
//! stopped (`pg_ctl stop -m immediate` also on every error path) and the scratch directory removed.

use std::collections::BTreeMap;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context};

use crate::pg_restore::{self, RecoveryGoal};
use crate::servers::{free_port, pg_command};

/// Options of a PostgreSQL verification.
#[derive(Debug, Clone)]
pub struct PgVerifyOpts {
    /// Database whose tables are counted and where `sql` runs.
    pub database: String,
    /// Role used for the checks (trust authentication on the scratch server).
    pub user: String,
    /// Optional query; its first column of the first row (text) is the result.
    pub sql: Option<String>,
    /// Expected result of `sql`.
    pub expect: Option<String>,
    /// Replay every archived WAL segment instead of stopping at consistency.
    pub full: bool,
    /// Directory of the PostgreSQL binaries.
    pub bin_dir: PathBuf,
    /// Owner of the scratch data directory (None: `postgres` when root, else the current user).
    pub owner: Option<String>,
    /// Longest wait for recovery, seconds.
    pub timeout: Duration,
}

/// What the scratch server showed.
#[derive(Debug, Clone, Default)]
pub struct PgVerifyOutcome {
    /// ms from the start of the verification until the data directory was ready to start.
    pub restore_ms: u64,
    /// ms from `pg_ctl start` until the server took connections out of recovery.
    pub start_ms: u64,
    /// Archived WAL files fetched (`--full`).
    pub wal_files: u64,
    /// `schema.table` → rows, for every table of the database (at most [`MAX_TABLES`]).
    pub tables: BTreeMap<String, i64>,
    /// Result of `--sql` (None: no query, or SQL NULL).
    pub sql_result: Option<String>,
    /// `SHOW server_version` of the scratch server.
    pub server_version: String,
}

/// Tables counted at most.
pub const MAX_TABLES: usize = 1000;

/// A started scratch server; stopped with `pg_ctl stop -m immediate` on drop.
struct Scratch {
    datadir: PathBuf,
    bin_dir: PathBuf,
    owner: Option<String>,
    port: u16,
    running: bool,
}

impl Drop for Scratch {
    fn drop(&mut self) {
        if self.running {
            let mut c = pg_command(&self.bin_dir, "pg_ctl", self.owner.as_deref());
            let _ = c
                .arg("-D")
                .arg(&self.datadir)
                .args(["-m", "immediate", "-w", "-t", "60", "stop"])
                .output();
        }
    }
}

/// Quotes an SQL identifier (`"` doubled).
pub fn quote_ident(s: &str) -> String {
    format!("\"{}\"", s.replace('"', "\"\""))
}

fn log_tail(log: &Path) -> String {
    std::fs::read_to_string(log)
        .map(|l| {
            let lines: Vec<&str> = l.lines().collect();
            lines[lines.len().saturating_sub(15)..].join("\n")
        })
        .unwrap_or_default()
}

/// Restores the verified base backup `tar` (sidecar `meta`) of `source` under `scratch` (a
/// directory the owner can traverse), starts it, runs the checks into `out` and stops it.
/// `checks` receives `(name, ok, detail)` for every step; an `Err` means a step could not run
/// (its check is already recorded as failed).
///
/// Errors: unpack, WAL fetch, start or recovery failures (the server log tail is in the error),
/// query failures.
#[allow(clippy::too_many_arguments)]
pub async fn verify(
    conn: &lifeboat_client::conn::ConnArgs,
    addr: &str,
    source: &str,
    tar: &Path,
    meta: &serde_json::Value,
    scratch: &Path,
    opts: &PgVerifyOpts,
    started: Instant,
    out: &mut PgVerifyOutcome,
    checks: &mut Vec<(String, bool, String)>,
) -> anyhow::Result<()> {
    let owner = pg_restore::resolve_owner(opts.owner.as_deref())?;
    if owner.is_some() {
        // The server's user must reach data/ and its config files (nothing here is listable).
        std::fs::set_permissions(scratch, std::fs::Permissions::from_mode(0o711))?;
    }
    let datadir = pg_restore::prepare_datadir(&scratch.join("data"))?;
    let unpacked = {
        let (t, d) = (tar.to_path_buf(), datadir.clone());
        tokio::task::spawn_blocking(move || pg_restore::unpack(&t, &d)).await?
    };
    checks.push((
        "unpack".into(),
        unpacked.is_ok(),
        match &unpacked {
            Ok(()) => format!("base backup unpacked into {}", datadir.display()),
            Err(e) => format!("{e:#}"),
        },
    ));
    unpacked?;
    let goal = if opts.full {
        let client = conn.blobs(addr)?;
        out.wal_files = pg_restore::fetch_wal(
            conn,
            &client,
            source,
            meta["start_wal_file"].as_str(),
            &datadir,
        )
        .await
        .context("fetch the archived WAL")?;
        RecoveryGoal::Latest
    } else {
        std::fs::create_dir_all(datadir.join("lifeboat_wal"))?;
        RecoveryGoal::Immediate
    };
    pg_restore::write_recovery_conf(&datadir, &goal)?;
    // A Debian cluster keeps postgresql.conf outside the data directory: the tar has none.
    let conf = datadir.join("postgresql.conf");
    if !conf.exists() {
        std::fs::write(&conf, "# written by lifeboat verify: the backup had none\n")?;
    }
    let hba = scratch.join("lifeboat_hba.conf");
    std::fs::write(&hba, "local all all trust\n")?;
    let ident = scratch.join("lifeboat_ident.conf");
    std::fs::write(&ident, "")?;
    if let Some((name, uid, gid)) = &owner {
        pg_restore::chown_tree(&datadir, *uid, *gid).with_context(|| format!("chown to {name}"))?;
        for f in [&hba, &ident] {
            std::os::unix::fs::lchown(f, Some(*uid), Some(*gid))?;
        }
    }
    out.restore_ms = started.elapsed().as_millis() as u64;

    let port = free_port()?;
    let log = scratch.join("postgres.log");
    std::fs::write(&log, "")?;
    std::fs::set_permissions(&log, std::fs::Permissions::from_mode(0o600))?;
    if let Some((_, uid, gid)) = &owner {
        std::os::unix::fs::lchown(&log, Some(*uid), Some(*gid))?;
    }
    let settings = format!(
        "-c port={port} -c listen_addresses='' -c unix_socket_directories='{d}' \
         -c hba_file='{hba}' -c ident_file='{ident}' -c ssl=off -c archive_mode=off \
         -c hot_standby=off -c fsync=off -c synchronous_standby_names='' \
         -c shared_buffers=32MB -c cluster_name=lifeboat-verify -c logging_collector=off",
        d = datadir.display(),
        hba = hba.display(),
        ident = ident.display(),
    );
    let owner_name = owner.as_ref().map(|o| o.0.clone());
    let t0 = Instant::now();
    let o = pg_restore::pg_tokio_command(&opts.bin_dir, "pg_ctl", owner_name.as_deref())
        .arg("-D")
        .arg(&datadir)
        .arg("-l")
        .arg(&log)
        .arg("-o")
        .arg(&settings)
        .args(["-W", "start"])
        .output()
        .await
        .with_context(|| format!("run {}", opts.bin_dir.join("pg_ctl").display()))?;
    let mut server = Scratch {
        datadir: datadir.clone(),
        bin_dir: opts.bin_dir.clone(),
        owner: owner_name.clone(),
        port,
        running: o.status.success(),
    };
    if !o.status.success() {
        let detail = format!(
            "pg_ctl start failed: {}{}",
            String::from_utf8_lossy(&o.stderr).trim(),
            log_tail(&log)
        );
        checks.push(("start".into(), false, detail.clone()));
        bail!("{detail}");
    }
    let client = match wait_ready(&server, &opts.user, &log, opts.timeout).await {
        Ok(c) => c,
        Err(e) => {
            checks.push(("start".into(), false, format!("{e:#}")));
            return Err(e);
        }
    };
    out.start_ms = t0.elapsed().as_millis() as u64;
    out.server_version = client
        .query_one("SHOW server_version", &[])
        .await
        .ok()
        .and_then(|r| r.try_get::<_, String>(0).ok())
        .unwrap_or_default();
    drop(client);
    checks.push((
        "start".into(),
        true,
        format!(
            "scratch PostgreSQL {} on port {port} (Unix socket only) recovered {} in {} ms",
            out.server_version,
            if opts.full {
                format!("through {} archived WAL files", out.wal_files)
            } else {
                "to consistency".to_string()
            },
            out.start_ms
        ),
    ));

    let db = connect(&server, &opts.user, &opts.database)
        .await
        .with_context(|| format!("connect to database {:?}", opts.database));
    let db = match db {
        Ok(c) => c,
        Err(e) => {
            checks.push(("row_counts".into(), false, format!("{e:#}")));
            return Err(e);
        }
    };
    match row_counts(&db).await {
        Ok(t) => {
            let rows: i64 = t.values().sum();
            let mut detail = format!(
                "database {}: {} tables, {rows} rows",
                opts.database,
                t.len()
            );
            let shown: Vec<String> = t.iter().take(20).map(|(k, v)| format!("{k}={v}")).collect();
            if !shown.is_empty() {
                detail += &format!(
                    " ({}{})",
                    shown.join(", "),
                    if t.len() > 20 { ", ..." } else { "" }
                );
            }
            checks.push(("row_counts".into(), true, detail));
            out.tables = t;
        }
        Err(e) => {
            checks.push(("row_counts".into(), false, format!("{e:#}")));
            return Err(e);
        }
    }
    if let Some(sql) = &opts.sql {
        match first_value(&db, sql).await {
            Ok(v) => {
                let shown = v.as_deref().unwrap_or("NULL");
                let (ok, detail) = match &opts.expect {
                    Some(want) => (
                        shown.trim() == want.trim(),
                        format!("{sql:?} returned {shown:?}, expected {want:?}"),
                    ),
                    None => (true, format!("{sql:?} returned {shown:?}")),
                };
                checks.push(("sql".into(), ok, detail));
                out.sql_result = v;
            }
            Err(e) => {
                checks.push(("sql".into(), false, format!("{sql:?} failed: {e:#}")));
            }
        }
    }
    drop(db);
    let stop = pg_restore::pg_tokio_command(&opts.bin_dir, "pg_ctl", owner_name.as_deref())
        .arg("-D")
        .arg(&datadir)
        .args(["-m", "fast", "-w", "-t", "120", "stop"])
        .output()
        .await;
    if stop.is_ok_and(|o| o.status.success()) {
        server.running = false;
    }
    Ok(())
}

async fn connect(s: &Scratch, user: &str, db: &str) -> anyhow::Result<tokio_postgres::Client> {
    let mut c = tokio_postgres::Config::new();
    c.host_path(&s.datadir)
        .port(s.port)
        .user(user)
        .dbname(db)
        .application_name("lifeboat-verify")
        .connect_timeout(Duration::from_secs(5));
    let (client, conn) = c.connect(tokio_postgres::NoTls).await?;
    tokio::spawn(async move {
        let _ = conn.await;
    });
    Ok(client)
}

/// Polls until the scratch server takes connections and is out of recovery; fails early when the
/// postmaster is gone (the log tail says why).
async fn wait_ready(
    s: &Scratch,
    user: &str,
    log: &Path,
    timeout: Duration,
) -> anyhow::Result<tokio_postgres::Client> {
    let deadline = Instant::now() + timeout;
    let mut last: String;
    loop {
        match connect(s, user, "postgres").await {
            Ok(c) => {
                let rec: bool = c
                    .query_one("SELECT pg_is_in_recovery()", &[])
                    .await?
                    .try_get(0)?;
                if !rec {
                    return Ok(c);
                }
                last = "still in recovery".into();
            }
            Err(e) => last = e.to_string(),
        }
        if !s.datadir.join("postmaster.pid").exists() {
            // Give a starting postmaster a moment to write its pid file.
            tokio::time::sleep(Duration::from_millis(500)).await;
            if !s.datadir.join("postmaster.pid").exists() {
                bail!(
                    "the scratch server exited during recovery: {}",
                    log_tail(log)
                );
            }
        }
        if Instant::now() > deadline {
            bail!(
                "recovery did not finish within {timeout:?} ({last}): {}",
                log_tail(log)
            );
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Row count of every ordinary or partitioned table (partitions counted through their parent)
/// outside the system schemas, as `schema.table` → rows.
///
/// Errors: query failures.
async fn row_counts(c: &tokio_postgres::Client) -> anyhow::Result<BTreeMap<String, i64>> {
    let rows = c
        .query(
            "SELECT n.nspname::text, c.relname::text FROM pg_class c \
             JOIN pg_namespace n ON n.oid = c.relnamespace \
             WHERE c.relkind IN ('r', 'p') AND NOT c.relispartition \
             AND n.nspname NOT IN ('pg_catalog', 'information_schema') \
             AND n.nspname NOT LIKE 'pg_toast%' ORDER BY 1, 2 LIMIT $1",
            &[&(MAX_TABLES as i64)],
        )
        .await
        .context("list tables")?;
    let mut out = BTreeMap::new();
    for r in rows {
        let (schema, table): (String, String) = (r.try_get(0)?, r.try_get(1)?);
        let q = format!(
            "SELECT count(*) FROM {}.{}",
            quote_ident(&schema),
            quote_ident(&table)
        );
        let n: i64 = c
            .query_one(&q, &[])
            .await
            .with_context(|| format!("count rows of {schema}.{table}"))?
            .try_get(0)?;
        out.insert(format!("{schema}.{table}"), n);
    }
    Ok(out)
}

/// First column of the first row of `sql` as text (simple query protocol), None for NULL or no
/// row.
///
/// Errors: the server's error.
async fn first_value(c: &tokio_postgres::Client, sql: &str) -> anyhow::Result<Option<String>> {
    for m in c.simple_query(sql).await? {
        if let tokio_postgres::SimpleQueryMessage::Row(r) = m {
            return Ok(r.get(0).map(str::to_string));
        }
    }
    Ok(None)
}

/// The source name of a base backup id `<source>/base/<ts>`.
///
/// Errors: not of that form.
pub fn source_of(id: &str) -> anyhow::Result<&str> {
    match id.split('/').collect::<Vec<_>>().as_slice() {
        [src, "base", _] => Ok(src),
        _ => Err(anyhow!(
            "{id:?} is not a PostgreSQL base backup id <source>/base/<UTC ts>"
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn idents_and_ids() {
        assert_eq!(quote_ident("a\"b"), "\"a\"\"b\"");
        assert_eq!(source_of("db/base/20261124T000000Z").unwrap(), "db");
        assert!(source_of("db/20261124T000000Z").is_err());
    }
}
