//! PostgreSQL sources (`[[postgres_sources]]`): physical base backups on a schedule and
//! continuous WAL archiving, both sent through the agent's normal verified file pipeline under
//! the reserved root [`SNAPSHOTS_ROOT`](crate::config::SNAPSHOTS_ROOT):
//!
//! - `_snapshots/<name>/base/<UTC ts>.tar`: one tar of the data directory with the WAL needed
//!   to make it consistent and the backup manifest, as `pg_basebackup -Ft -D - -X fetch -c fast`
//!   writes it; received by the agent's own `BASE_BACKUP` client ([`crate::sources::postgres::wire`]) or, where
//!   that client cannot serve the server, by that command; streamed into `data_dir/spool/` (never whole in memory) while its
//!   blake3 is computed, then moved to `data_dir/snapshots/<name>/base/`;
//! - `_snapshots/<name>/base/<UTC ts>.tar.meta.json`: its sidecar ([`BaseBackupMeta`]);
//! - `_snapshots/<name>/wal/<segment>` and `<timeline>.history`: every completed WAL segment.
//!
//! WAL archiving runs `pg_receivewal --no-loop` as a supervised child (restarted with an
//! exponential backoff of 1 s to 30 s) writing into `data_dir/spool/pg-wal-<name>/`. A segment is
//! complete once pg_receivewal renamed it from `.partial` to its final name; it is then
//! hard-linked into `data_dir/snapshots/<name>/wal/` and queued; the pipeline removes that copy
//! once the coordinator acknowledged it. The spool keeps only the newest completed segment (so a
//! restarted pg_receivewal resumes where it stopped) and the `.partial` in progress, which is
//! never shipped. After an agent restart the newest completed segment is shipped once more (same
//! content, a second catalog version). pg_receivewal uses the physical replication slot
//! [`slot_name`] (created if missing), so the server keeps WAL the agent has not received yet. If
//! the server nevertheless lost a needed segment (slot dropped), the gap is logged as an error and
//! archiving restarts from the server's current position.
//!
//! The alternative is the server's own `archive_command` (e.g.
//! `archive_command = 'cp %p /var/lib/lifeboat/agent/snapshots/<name>/wal/%f'` with the agent
//! watching that directory as a `[[paths]]` root): archiving then survives agent downtime (the
//! server retries) but couples the database's availability to the archive target; the agent-run
//! `pg_receivewal` needs no change to the server beyond a replication connection.
//!
//! Client tools (`pg_basebackup`, `pg_receivewal`) run as the agent's own user because their
//! output goes into the agent's `data_dir`; `run_as` only applies to server-side commands
//! (`pg_ctl`, see [`crate::sources::postgres::role`]). The password, if any, is read from the environment variable
//! named by `password_env` and passed to the tools as `PGPASSWORD`; it is never logged.

pub mod role;
pub mod wire;

use std::collections::{BTreeMap, HashSet};
use std::io::Read;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use futures::future::BoxFuture;
use serde::{Deserialize, Serialize};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt};
use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;
use tokio::time::Instant;
use tracing::Instrument;

use crate::config::parse_cron;
pub use crate::config::postgres::{
    BaseBackupClient, PostgresSourceConfig, DEFAULT_BIN_DIR, DEFAULT_SCHEDULE,
};
use crate::config::Config;
pub use crate::snapshot::retention::is_segment;
use crate::snapshot::{snapshots_dir, spool_dir};
use crate::sources::{Database, DbHealth, Pipeline, SnapshotSource};

impl PostgresSourceConfig {
    /// The password from `password_env`, if configured.
    ///
    /// Errors: the variable is not set (or not UTF-8).
    pub fn password(&self) -> Result<Option<String>, String> {
        match &self.password_env {
            None => Ok(None),
            Some(var) => std::env::var(var)
                .map(Some)
                .map_err(|_| format!("password_env {var:?} is not set in the agent's environment")),
        }
    }

    /// A `tokio_postgres` configuration for SQL connections (5 s connect timeout).
    ///
    /// Errors: see [`PostgresSourceConfig::password`].
    pub fn pg_config(&self) -> Result<tokio_postgres::Config, String> {
        let mut c = tokio_postgres::Config::new();
        c.host(&self.host)
            .port(self.port)
            .user(&self.user)
            .dbname(&self.dbname)
            .application_name("lifeboat-agent")
            .connect_timeout(Duration::from_secs(5));
        if let Some(p) = self.password()? {
            c.password(p);
        }
        Ok(c)
    }

    /// A client tool of `bin_dir` (`pg_basebackup`, ...) with the connection arguments
    /// `-h -p -U -w` and `PGPASSWORD` set; `server_side` wraps it in `runuser -u run_as --`.
    ///
    /// Errors: see [`PostgresSourceConfig::password`].
    pub fn tool(
        &self,
        prog: &str,
        server_side: bool,
        connect: bool,
    ) -> Result<tokio::process::Command, String> {
        let bin = self.bin_dir.join(prog);
        let mut c = match (&self.run_as, server_side) {
            (Some(u), true) => {
                let mut c = tokio::process::Command::new("runuser");
                c.arg("-u").arg(u).arg("--").arg(bin);
                c
            }
            _ => tokio::process::Command::new(bin),
        };
        if connect {
            c.arg("-h")
                .arg(&self.host)
                .arg("-p")
                .arg(self.port.to_string())
                .arg("-U")
                .arg(&self.user)
                .arg("-w");
        }
        if let Some(p) = self.password()? {
            c.env("PGPASSWORD", p);
        }
        // A directory every user can read (runuser keeps the working directory).
        c.current_dir("/").stdin(Stdio::null()).kill_on_drop(true);
        die_with_parent(&mut c);
        Ok(c)
    }
}

/// Makes the child receive SIGTERM when the agent dies (`PR_SET_PDEATHSIG`, Linux), so that a
/// killed or crashed agent leaves no `pg_receivewal` streaming into its spool and holding the
/// replication slot (`kill_on_drop` covers only orderly drops). The signal follows the thread
/// that spawned the child: these children are spawned from async tasks, on runtime worker
/// threads, which live as long as the agent. A child whose parent already died before the
/// call exits at once.
fn die_with_parent(c: &mut tokio::process::Command) {
    let parent = std::process::id() as libc::pid_t;
    // SAFETY: the closure runs in the forked child before exec and calls only prctl, getppid
    // and _exit, which are async-signal-safe; it touches no memory of the parent.
    unsafe {
        c.pre_exec(move || {
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGTERM) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            if libc::getppid() != parent {
                libc::_exit(1);
            }
            Ok(())
        });
    }
}

/// Sidecar of a base backup (`<...>.tar.meta.json`), JSON.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BaseBackupMeta {
    /// Snapshot id: `<source>/base/<UTC ts>`.
    pub id: String,
    /// Source name.
    pub source: String,
    /// Always `"postgres"`.
    pub kind: String,
    /// When pg_basebackup started, ms since the Unix epoch (agent clock).
    pub start_ms: i64,
    /// When its output was complete, ms since the Unix epoch (agent clock). A restore to time T
    /// uses the newest backup with `end_ms < T`.
    pub end_ms: i64,
    /// Size of the tar, bytes.
    pub bytes: u64,
    /// blake3 of the tar, hex.
    pub blake3: String,
    /// Failover epoch the agent knew when taking it (0 if unknown).
    pub epoch: u64,
    /// `SHOW server_version` (or the tar's `PG_VERSION` if the query failed).
    pub server_version: String,
    /// `START WAL LOCATION` of the tar's `backup_label`, e.g. `0/2000028`.
    pub start_lsn: Option<String>,
    /// WAL file holding `start_lsn`, e.g. `000000010000000000000002`; a restore needs the
    /// archived segments from this one on.
    pub start_wal_file: Option<String>,
    /// `START TIMELINE` of the `backup_label`.
    pub start_timeline: Option<u32>,
}

/// Relative paths (below [`snapshots_dir`]) of base backups, sidecars and WAL files of `src`
/// left from an earlier run (not yet acknowledged), tar before its sidecar.
fn leftovers(src: &PostgresSourceConfig, data_dir: &Path) -> Vec<String> {
    let dir = snapshots_dir(data_dir);
    let mut out = Vec::new();
    for sub in ["base", "wal"] {
        let Ok(rd) = std::fs::read_dir(dir.join(&src.name).join(sub)) else {
            continue;
        };
        let mut names: Vec<String> = rd
            .filter_map(|e| e.ok())
            .filter(|e| e.file_type().is_ok_and(|t| t.is_file()))
            .filter_map(|e| e.file_name().into_string().ok())
            .filter(|n| !n.starts_with('.'))
            .collect();
        names.sort();
        out.extend(names.into_iter().map(|n| format!("{}/{sub}/{n}", src.name)));
    }
    out
}

/// A `[[postgres_sources]]` entry as a [`SnapshotSource`]: a base backup task and, with
/// `wal_archive`, a WAL task; each sends the relative path (below [`snapshots_dir`]) of every
/// finished file. Tasks end when `stop` asks for shutdown (running tools are killed).
impl SnapshotSource for PostgresSourceConfig {
    fn kind(&self) -> &'static str {
        "postgres"
    }

    fn name(&self) -> &str {
        &self.name
    }

    fn leftovers(&self, data_dir: &Path) -> Vec<String> {
        leftovers(self, data_dir)
    }

    fn spawn(&self, cfg: &Config, pipe: &Pipeline) -> Vec<JoinHandle<()>> {
        let span = tracing::info_span!("postgres_source", source = %self.name);
        let keep = crate::config::retention::resolve(&cfg.retention, &self.retention)
            .and_then(|p| p.keep_last);
        let mut out = vec![tokio::spawn(
            base_loop(
                self.clone(),
                keep,
                cfg.data_dir.clone(),
                pipe.tx.clone(),
                pipe.stop.clone(),
                pipe.uploader.clone(),
            )
            .instrument(span.clone()),
        )];
        if self.wal_archive {
            out.push(tokio::spawn(
                wal_loop(
                    self.clone(),
                    cfg.data_dir.clone(),
                    pipe.tx.clone(),
                    pipe.stop.clone(),
                )
                .instrument(span),
            ));
        }
        out
    }

    fn database(&self) -> Option<&dyn Database> {
        Some(self)
    }
}

/// Role orders: `pg_promote()` in the active region, fence or re-point elsewhere
/// ([`role::apply_role`]).
impl Database for PostgresSourceConfig {
    fn apply_role<'a>(
        &'a self,
        my_region: &'a str,
        active_region: &'a str,
        epoch: u64,
    ) -> BoxFuture<'a, anyhow::Result<String>> {
        Box::pin(role::apply_role(self, my_region, active_region, epoch))
    }

    fn health(&self) -> BoxFuture<'_, DbHealth> {
        Box::pin(role::health(self))
    }

    fn settle(
        &self,
        active: bool,
        ordered: bool,
        observed: DbHealth,
    ) -> (String, &'static [&'static str]) {
        // A fenced former primary is stopped: the probe cannot connect.
        let role = if !observed.healthy && !active && ordered {
            "stopped".to_string()
        } else {
            observed.role
        };
        (
            role,
            if active {
                &["primary"]
            } else {
                &["replica", "stopped"]
            },
        )
    }
}

/// Waits until the next base backup is due (`first` = the agent just started).
async fn until_due(src: &PostgresSourceConfig, first: bool) {
    if let Some(s) = src.base_backup_interval_s {
        if !first {
            tokio::time::sleep(Duration::from_secs(s)).await;
        }
        return;
    }
    let expr = src
        .base_backup_schedule
        .as_deref()
        .unwrap_or(DEFAULT_SCHEDULE);
    let Ok(cron) = parse_cron(expr) else {
        // Validated at load time.
        return std::future::pending().await;
    };
    let now = jiff::Zoned::now().with_time_zone(jiff::tz::TimeZone::UTC);
    match cron.find_next_occurrence(&now, false) {
        Ok(next) => {
            let wait = (next.timestamp().as_millisecond() - now.timestamp().as_millisecond()).max(0)
                as u64;
            tokio::time::sleep(Duration::from_millis(wait)).await;
        }
        Err(e) => {
            tracing::error!(schedule = expr, error = %e, "no next base backup time; base backups stop");
            std::future::pending::<()>().await;
        }
    }
}

async fn base_loop(
    src: PostgresSourceConfig,
    local_keep: Option<u32>,
    data_dir: PathBuf,
    tx: mpsc::UnboundedSender<String>,
    mut stop: watch::Receiver<Option<Instant>>,
    uploader: Option<crate::snapshot::preupload::Uploader>,
) {
    let mut first = true;
    loop {
        tokio::select! {
            _ = until_due(&src, first) => {}
            _ = stop.wait_for(|d| d.is_some()) => return,
        }
        if first && src.wal_archive {
            // The slot first: WAL after the backup is then kept for pg_receivewal.
            if let Err(e) = create_slot(&src, &slot_name(&src.name)).await {
                tracing::warn!(error = %e, "cannot create the replication slot before the base backup");
            }
        }
        first = false;
        let r = tokio::select! {
            r = take_base_backup(&src, &data_dir, 0, local_keep, uploader.as_ref()) => r,
            // Dropping the future kills pg_basebackup (kill_on_drop).
            _ = stop.wait_for(|d| d.is_some()) => return,
        };
        match r {
            Ok((rels, meta)) => {
                tracing::info!(snapshot = %meta.id, bytes = meta.bytes, start_lsn = ?meta.start_lsn, "postgres base backup taken");
                for rel in rels {
                    if tx.send(rel).is_err() {
                        return;
                    }
                }
            }
            Err(e) => {
                crate::metrics::snapshot_failed(&src.name);
                tracing::error!(source = %src.name, error = %e, "postgres base backup failed; nothing recorded");
            }
        }
    }
}

/// Takes one base backup of `src` into `data_dir/snapshots/<name>/base/` (tar plus sidecar, both
/// mode 0600), keeps a copy of the sidecar in [`meta_dir`] (retention reads the start WAL file of
/// acknowledged backups there), and deletes the oldest unacknowledged local backups so that at
/// most `local_keep` remain. Returns the two relative paths (tar first) and the sidecar.
///
/// With `uploader`, the tar's parts go to the region's leader while pg_basebackup writes them
/// (see [`crate::snapshot::preupload`]).
///
/// Errors: pg_basebackup cannot start or fails (its stderr is in the message), I/O errors.
pub async fn take_base_backup(
    src: &PostgresSourceConfig,
    data_dir: &Path,
    epoch: u64,
    local_keep: Option<u32>,
    uploader: Option<&crate::snapshot::preupload::Uploader>,
) -> Result<(Vec<String>, BaseBackupMeta), String> {
    let spool_dir = spool_dir(data_dir);
    tokio::fs::create_dir_all(&spool_dir)
        .await
        .map_err(|e| format!("cannot create {}: {e}", spool_dir.display()))?;
    let spool = spool_dir.join(format!("pg-{}.base.tmp", src.name));
    let start_ms = lifeboat_common::now_ms();
    let up = uploader.map_or_else(crate::snapshot::preupload::Preupload::disabled, |u| {
        u.start()
    });
    // The server's version is asked for while the backup runs (one round trip less after it).
    let (spooled, version) = tokio::join!(spool_basebackup(src, &spool, up), server_version(src));
    let (bytes, hash) = match spooled {
        Ok(r) => r,
        Err(e) => {
            let _ = tokio::fs::remove_file(&spool).await;
            return Err(e);
        }
    };
    let end_ms = lifeboat_common::now_ms();
    let label = {
        let spool = spool.clone();
        tokio::task::spawn_blocking(move || read_label(&spool))
            .await
            .map_err(|e| e.to_string())?
    };
    let (label, pg_version) = match label {
        Ok(l) => l,
        Err(e) => {
            let _ = tokio::fs::remove_file(&spool).await;
            return Err(format!("the base backup tar is unreadable: {e}"));
        }
    };
    let server_version = match version {
        Ok(v) => v,
        Err(e) => {
            tracing::warn!(error = %e, "cannot query server_version; using PG_VERSION");
            pg_version.unwrap_or_default()
        }
    };
    let base_dir = snapshots_dir(data_dir).join(&src.name).join("base");
    let (ts, _) = crate::snapshot::retention::unique_ts(&base_dir, end_ms);
    let id = format!("{}/base/{ts}", src.name);
    let meta = BaseBackupMeta {
        id: id.clone(),
        source: src.name.clone(),
        kind: "postgres".into(),
        start_ms,
        end_ms,
        bytes,
        blake3: hash.to_hex().to_string(),
        epoch,
        server_version,
        start_lsn: label.get("START WAL LOCATION").map(|v| v.0.clone()),
        start_wal_file: label.get("START WAL LOCATION").and_then(|v| v.1.clone()),
        start_timeline: label.get("START TIMELINE").and_then(|v| v.0.parse().ok()),
    };
    let tar_rel = format!("{id}.tar");
    let meta_rel = format!("{id}.tar.meta.json");
    let snaps = snapshots_dir(data_dir);
    let done = async {
        tokio::fs::create_dir_all(&base_dir).await?;
        enforce_retention(local_keep, &base_dir).await;
        tokio::fs::rename(&spool, snaps.join(&tar_rel)).await?;
        let json = serde_json::to_vec_pretty(&meta).map_err(std::io::Error::other)?;
        let tmp = spool_dir.join(format!("pg-{}.meta.tmp", src.name));
        let kept = meta_dir(data_dir, &src.name);
        tokio::fs::create_dir_all(&kept).await?;
        let tmp2 = spool_dir.join(format!("pg-{}.meta2.tmp", src.name));
        let (kept_meta, snap_meta) = (
            kept.join(format!("{ts}.tar.meta.json")),
            snaps.join(&meta_rel),
        );
        tokio::try_join!(
            write_atomic(&tmp, &kept_meta, &json),
            write_atomic(&tmp2, &snap_meta, &json)
        )
        .map(|_| ())
    }
    .await;
    if let Err(e) = done {
        let _ = tokio::fs::remove_file(&spool).await;
        return Err(format!("cannot store the base backup {id}: {e}"));
    }
    Ok((vec![tar_rel, meta_rel], meta))
}

/// Writes `bytes` to `tmp` (0600, fsync) and renames it to `dest`.
async fn write_atomic(tmp: &Path, dest: &Path, bytes: &[u8]) -> std::io::Result<()> {
    let mut f = tokio::fs::File::create(tmp).await?;
    f.set_permissions(std::fs::Permissions::from_mode(0o600))
        .await?;
    f.write_all(bytes).await?;
    f.sync_all().await?;
    drop(f);
    tokio::fs::rename(tmp, dest).await
}

/// Directory (under `data_dir`) keeping a copy of every base backup sidecar of source `name`
/// until retention expires that backup: `data_dir/pg-meta/<name>/<ts>.tar.meta.json`.
pub fn meta_dir(data_dir: &Path, name: &str) -> PathBuf {
    data_dir.join("pg-meta").join(name)
}

/// Deletes the oldest local (unacknowledged) base backups so that at most `keep - 1` remain
/// before a new one is added (`None`: no bound).
async fn enforce_retention(keep: Option<u32>, base_dir: &Path) {
    let Some(keep) = keep else {
        return;
    };
    let Ok(rd) = std::fs::read_dir(base_dir) else {
        return;
    };
    let mut tars: Vec<String> = rd
        .filter_map(|e| e.ok())
        .filter_map(|e| e.file_name().into_string().ok())
        .filter(|n| n.ends_with(".tar"))
        .collect();
    tars.sort();
    let excess = (tars.len() + 1).saturating_sub(keep as usize);
    for t in &tars[..excess.min(tars.len())] {
        tracing::warn!(backup = %t, keep_last = keep, "retention: deleting an unacknowledged local base backup");
        let _ = tokio::fs::remove_file(base_dir.join(t)).await;
        let _ = tokio::fs::remove_file(base_dir.join(format!("{t}.meta.json"))).await;
    }
}

async fn server_version(src: &PostgresSourceConfig) -> Result<String, String> {
    let client = connect(src).await?;
    let row = client
        .query_one("SHOW server_version", &[])
        .await
        .map_err(|e| e.to_string())?;
    row.try_get::<_, String>(0).map_err(|e| e.to_string())
}

/// Opens a SQL connection to `src` (the connection task runs in the background).
///
/// Errors: bad password configuration, connection or authentication failure (as text).
pub async fn connect(src: &PostgresSourceConfig) -> Result<tokio_postgres::Client, String> {
    let cfg = src.pg_config()?;
    let (client, conn) = cfg
        .connect(tokio_postgres::NoTls)
        .await
        .map_err(|e| format!("connect to {}:{}: {e}", src.host, src.port))?;
    tokio::spawn(async move {
        let _ = conn.await;
    });
    Ok(client)
}

/// Collects up to 8 KiB of a child's stderr.
fn collect_stderr(err: Option<tokio::process::ChildStderr>) -> tokio::task::JoinHandle<String> {
    tokio::spawn(async move {
        let mut out = Vec::new();
        if let Some(mut e) = err {
            let mut buf = [0u8; 4096];
            while let Ok(n) = e.read(&mut buf).await {
                if n == 0 {
                    break;
                }
                if out.len() < 8192 {
                    out.extend_from_slice(&buf[..n.min(8192 - out.len())]);
                }
            }
        }
        String::from_utf8_lossy(&out).trim().to_string()
    })
}

/// Receives a base backup tar into `spool` (mode 0600, fsync'd), hashing it: over the
/// replication protocol ([`crate::sources::postgres::wire`]) or from `pg_basebackup`'s stdout, per
/// `base_backup_client`. Returns the byte count and the blake3.
async fn spool_basebackup(
    src: &PostgresSourceConfig,
    spool: &Path,
    up: crate::snapshot::preupload::Preupload,
) -> Result<(u64, blake3::Hash), String> {
    let io = |what: &str, e: std::io::Error| format!("{what} {}: {e}", spool.display());
    let mut file = crate::snapshot::spool::SpoolFile::create(spool, up)
        .await
        .map_err(|e| io("cannot create", e))?;
    if src.base_backup_client == BaseBackupClient::Protocol {
        match crate::sources::postgres::wire::base_backup(src, &mut file).await {
            Ok(summary) => {
                tracing::debug!(
                    tar_bytes = summary.tar_bytes,
                    manifest_bytes = summary.manifest_bytes,
                    server_version = %summary.server_version,
                    "base backup received over the replication protocol"
                );
                return crate::snapshot::seal_spool(file, spool).await;
            }
            // Nothing was written yet: pg_basebackup writes the spool from its start.
            Err(crate::sources::postgres::wire::WireError::Unsupported(reason)) => {
                tracing::info!(%reason, "this base backup runs pg_basebackup");
            }
            Err(crate::sources::postgres::wire::WireError::Failed(e)) => return Err(e),
        }
    }
    let mut cmd = src.tool("pg_basebackup", false, true)?;
    cmd.args(["-Ft", "-D", "-", "-X", "fetch", "-c", "fast"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = cmd.spawn().map_err(|e| {
        format!(
            "cannot start {}: {e}",
            src.bin_dir.join("pg_basebackup").display()
        )
    })?;
    let stderr = collect_stderr(child.stderr.take());
    let Some(mut out) = child.stdout.take() else {
        return Err("no stdout pipe".into());
    };
    crate::snapshot::widen_pipe(&out);
    let mut buf = vec![0u8; 1024 * 1024];
    loop {
        let k = out
            .read(&mut buf)
            .await
            .map_err(|e| format!("cannot read pg_basebackup's output: {e}"))?;
        if k == 0 {
            break;
        }
        file.write(&buf[..k])
            .await
            .map_err(|e| io("cannot write", e))?;
    }
    let status = child
        .wait()
        .await
        .map_err(|e| format!("cannot wait for pg_basebackup: {e}"))?;
    let err = stderr.await.unwrap_or_default();
    if !status.success() {
        return Err(format!("pg_basebackup exited with {status}: {err}"));
    }
    crate::snapshot::seal_spool(file, spool).await
}

/// `backup_label` lines (`KEY: value (extra)` -> (value, Some(file)) for `(file X)`).
type Label = BTreeMap<String, (String, Option<String>)>;

/// Parses a `backup_label` file's text.
pub fn parse_label(text: &str) -> Label {
    let mut out = Label::new();
    for line in text.lines() {
        let Some((k, v)) = line.split_once(": ") else {
            continue;
        };
        let (v, extra) = match v.split_once(" (file ") {
            Some((v, rest)) => (v, Some(rest.trim_end_matches(')').to_string())),
            None => (v, None),
        };
        out.insert(k.trim().to_string(), (v.trim().to_string(), extra));
    }
    out
}

/// Reads `backup_label` (and `PG_VERSION` if it comes first) from a base backup tar, stopping at
/// `backup_label`.
fn read_label(path: &Path) -> std::io::Result<(Label, Option<String>)> {
    let f = std::io::BufReader::new(std::fs::File::open(path)?);
    let mut ar = tar::Archive::new(f);
    let mut version = None;
    for e in ar.entries()? {
        let e = e?;
        let name = e.path()?.to_string_lossy().into_owned();
        let name = name.trim_start_matches("./");
        if name == "PG_VERSION" || name == "backup_label" {
            let is_label = name == "backup_label";
            let mut text = String::new();
            e.take(64 * 1024).read_to_string(&mut text)?;
            if is_label {
                return Ok((parse_label(&text), version));
            }
            version = Some(text.trim().to_string());
        }
    }
    Err(std::io::Error::other("no backup_label in the tar"))
}

/// True for a timeline history file name (`XXXXXXXX.history`).
pub fn is_history(name: &str) -> bool {
    name.len() == 16
        && name.ends_with(".history")
        && name[..8]
            .bytes()
            .all(|b| b.is_ascii_digit() || (b'A'..=b'F').contains(&b))
}

/// Directory where pg_receivewal of source `name` writes.
pub fn wal_spool_dir(data_dir: &Path, name: &str) -> PathBuf {
    spool_dir(data_dir).join(format!("pg-wal-{name}"))
}

async fn wal_loop(
    src: PostgresSourceConfig,
    data_dir: PathBuf,
    tx: mpsc::UnboundedSender<String>,
    mut stop: watch::Receiver<Option<Instant>>,
) {
    let spool = wal_spool_dir(&data_dir, &src.name);
    let dest = snapshots_dir(&data_dir).join(&src.name).join("wal");
    for d in [&spool, &dest] {
        if let Err(e) = std::fs::create_dir_all(d) {
            tracing::error!(dir = %d.display(), error = %e, "cannot create the WAL directory; WAL archiving stops");
            return;
        }
    }
    let _ = std::fs::set_permissions(&spool, std::fs::Permissions::from_mode(0o700));
    let mut shipped = HashSet::new();
    let mut backoff = Duration::from_secs(1);
    loop {
        let started = Instant::now();
        let slot = slot_name(&src.name);
        if let Err(e) = create_slot(&src, &slot).await {
            tracing::error!(slot = %slot, error = %e, retry_in_ms = backoff.as_millis() as u64, "cannot create the replication slot");
            tokio::select! {
                _ = tokio::time::sleep(backoff) => {}
                _ = stop.wait_for(|d| d.is_some()) => return,
            }
            backoff = (backoff * 2).min(Duration::from_secs(30));
            continue;
        }
        release_slot(&src, &slot).await;
        let gap = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let cmd = src.tool("pg_receivewal", false, true).map(|mut c| {
            c.arg("-D")
                .arg(&spool)
                .arg(format!("--slot={slot}"))
                .arg("--no-loop")
                .stdout(Stdio::null())
                .stderr(Stdio::piped());
            c
        });
        let child = cmd.and_then(|mut c| {
            c.spawn()
                .map_err(|e| format!("cannot start pg_receivewal: {e}"))
        });
        match child {
            Ok(mut child) => {
                tracing::info!(spool = %spool.display(), "pg_receivewal started");
                if let Some(err) = child.stderr.take() {
                    let gap = gap.clone();
                    tokio::spawn(
                        async move {
                            let mut lines = tokio::io::BufReader::new(err).lines();
                            while let Ok(Some(l)) = lines.next_line().await {
                                if l.contains("has already been removed") {
                                    gap.store(true, std::sync::atomic::Ordering::Relaxed);
                                }
                                tracing::info!(line = %l, "pg_receivewal");
                            }
                        }
                        .in_current_span(),
                    );
                }
                let mut tick = tokio::time::interval(Duration::from_millis(300));
                let status = loop {
                    tokio::select! {
                        s = child.wait() => break Some(s),
                        _ = tick.tick() => ship_completed(&src, &spool, &dest, &mut shipped, &tx),
                        _ = stop.wait_for(|d| d.is_some()) => break None,
                    }
                };
                ship_completed(&src, &spool, &dest, &mut shipped, &tx);
                match status {
                    None => {
                        let _ = child.start_kill();
                        let _ = child.wait().await;
                        return;
                    }
                    Some(s) => {
                        tracing::warn!(status = ?s, retry_in_ms = backoff.as_millis() as u64, "pg_receivewal exited; restarting");
                        if gap.load(std::sync::atomic::Ordering::Relaxed) {
                            tracing::error!(spool = %spool.display(), "WAL GAP: the server no longer has the segment pg_receivewal needs; restarting from the server's current position (PITR across the gap needs a new base backup)");
                            clear_spool(&spool);
                        }
                    }
                }
            }
            Err(e) => {
                tracing::error!(error = %e, retry_in_ms = backoff.as_millis() as u64, "cannot run pg_receivewal")
            }
        }
        if started.elapsed() > Duration::from_secs(60) {
            backoff = Duration::from_secs(1);
        }
        tokio::select! {
            _ = tokio::time::sleep(backoff) => {}
            _ = stop.wait_for(|d| d.is_some()) => return,
        }
        backoff = (backoff * 2).min(Duration::from_secs(30));
    }
}

/// Replication slot used by pg_receivewal for source `name`: `lifeboat_` + the name in lower
/// case with every character outside `[a-z0-9_]` replaced by `_` (at most 63 bytes). The slot
/// makes the server keep WAL until the agent received it, so no segment is lost while the agent
/// is down or restarting; it also means WAL piles up on the server while the agent is down for
/// long (drop the slot with `SELECT pg_drop_replication_slot('lifeboat_<name>')` when a source is
/// removed).
pub fn slot_name(name: &str) -> String {
    let s: String = name
        .chars()
        .map(|c| {
            let c = c.to_ascii_lowercase();
            if c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_' {
                c
            } else {
                '_'
            }
        })
        .collect();
    let mut out = format!("lifeboat_{s}");
    out.truncate(63);
    out
}

/// Frees `slot` when another connection streams from it: a `pg_receivewal` left by an agent
/// killed before it could stop it (see [`die_with_parent`]) would otherwise hold the slot,
/// and every new `pg_receivewal` would fail with "replication slot is active". Its walsender
/// is ended with `pg_terminate_backend` (the slot belongs to this source, named after it).
/// Failures are logged; starting `pg_receivewal` then reports the real state.
async fn release_slot(src: &PostgresSourceConfig, slot: &str) {
    let client = match connect(src).await {
        Ok(c) => c,
        Err(e) => {
            tracing::debug!(error = %e, "cannot check whether the replication slot is free");
            return;
        }
    };
    let sql = "SELECT active_pid, pg_terminate_backend(active_pid) FROM pg_replication_slots \
               WHERE slot_name = $1 AND active AND active_pid IS NOT NULL";
    match client.query(sql, &[&slot]).await {
        Ok(rows) if rows.is_empty() => return,
        Ok(rows) => {
            for r in rows {
                let pid: Option<i32> = r.get(0);
                let ended: Option<bool> = r.get(1);
                tracing::warn!(slot, walsender_pid = ?pid, ended = ?ended, "the replication slot was held by another connection (a pg_receivewal left by an earlier agent?); ended it");
            }
        }
        Err(e) => {
            tracing::warn!(slot, error = %e, "cannot free the replication slot");
            return;
        }
    }
    // The slot is released once that backend has exited (up to 5 s).
    let check = "SELECT count(*) FROM pg_replication_slots WHERE slot_name = $1 AND active";
    for _ in 0..50 {
        match client.query_one(check, &[&slot]).await {
            Ok(r) if r.get::<_, i64>(0) == 0 => return,
            Ok(_) => tokio::time::sleep(Duration::from_millis(100)).await,
            Err(_) => return,
        }
    }
}

/// `pg_receivewal --create-slot --if-not-exists --slot=SLOT` (returns at once).
async fn create_slot(src: &PostgresSourceConfig, slot: &str) -> Result<(), String> {
    let mut c = src.tool("pg_receivewal", false, true)?;
    let out = c
        .arg(format!("--slot={slot}"))
        .args(["--create-slot", "--if-not-exists"])
        .output()
        .await
        .map_err(|e| format!("cannot run pg_receivewal --create-slot: {e}"))?;
    if !out.status.success() {
        return Err(format!(
            "pg_receivewal --create-slot exited with {}: {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        ));
    }
    Ok(())
}

/// Removes every segment (complete or `.partial`) from the WAL spool.
fn clear_spool(spool: &Path) {
    if let Ok(rd) = std::fs::read_dir(spool) {
        for e in rd.filter_map(|e| e.ok()) {
            let n = e.file_name().to_string_lossy().into_owned();
            if is_segment(n.trim_end_matches(".partial")) {
                let _ = std::fs::remove_file(e.path());
            }
        }
    }
}

/// Hard-links every completed, not yet shipped segment or history file of `spool` into `dest`,
/// queues it, and removes shipped segments from `spool` except the newest one.
fn ship_completed(
    src: &PostgresSourceConfig,
    spool: &Path,
    dest: &Path,
    shipped: &mut HashSet<String>,
    tx: &mpsc::UnboundedSender<String>,
) {
    let Ok(rd) = std::fs::read_dir(spool) else {
        return;
    };
    let mut names: Vec<String> = rd
        .filter_map(|e| e.ok())
        .filter_map(|e| e.file_name().into_string().ok())
        .filter(|n| is_segment(n) || is_history(n))
        .collect();
    // Segments in WAL order (timeline first, as in their names); history files are tiny.
    names.sort();
    for n in &names {
        if shipped.contains(n) {
            continue;
        }
        let to = dest.join(n);
        if !to.exists() {
            if let Err(e) = std::fs::hard_link(spool.join(n), &to) {
                tracing::warn!(file = %n, error = %e, "cannot link a WAL file for shipping; retrying");
                continue;
            }
        }
        tracing::debug!(file = %n, "WAL file completed");
        shipped.insert(n.clone());
        let _ = tx.send(format!("{}/wal/{n}", src.name));
    }
    let segs: Vec<&String> = names.iter().filter(|n| is_segment(n)).collect();
    if let Some((_newest, older)) = segs.split_last() {
        for n in older {
            if shipped.contains(*n) {
                let _ = std::fs::remove_file(spool.join(n));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::ConfigError;

    #[test]
    fn label_and_names() {
        let l = parse_label(
            "START WAL LOCATION: 0/2000028 (file 000000010000000000000002)\nCHECKPOINT LOCATION: 0/2000060\nSTART TIMELINE: 1\n",
        );
        assert_eq!(
            l["START WAL LOCATION"],
            ("0/2000028".into(), Some("000000010000000000000002".into()))
        );
        assert_eq!(l["START TIMELINE"].0, "1");
        assert!(is_segment("000000010000000000000002"));
        assert!(!is_segment("000000010000000000000002.partial"));
        assert!(!is_segment("00000001000000000000000g"));
        assert!(is_history("00000002.history"));
        assert_eq!(slot_name("Main-db.1"), "lifeboat_main_db_1");
        assert_eq!(slot_name(&"x".repeat(100)).len(), 63);
        assert!(!is_history("0000000X.history"));
    }

    fn cfg(body: &str) -> Result<Config, ConfigError> {
        Config::from_toml(&format!(
            "agent_id = \"a\"\ndata_dir = \"/d\"\ncoordinators = [\"h:1\"]\n[tls]\ninsecure = true\n[[postgres_sources]]\n{body}\n"
        ))
    }

    /// The commented `[[postgres_sources]]` example of deploy/examples/agent.toml parses.
    #[test]
    fn deploy_example_parses() {
        let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../deploy/examples/agent.toml");
        let text = std::fs::read_to_string(path).unwrap();
        let mut out = String::new();
        let mut inside = false;
        for line in text.lines() {
            if line == "# [[postgres_sources]]" {
                inside = true;
            } else if !line.starts_with("# ") {
                inside = false;
            }
            if inside {
                out.push_str(&line[2..]);
            } else {
                out.push_str(line);
            }
            out.push('\n');
        }
        // The block sits before [tls]; [tls] then closes it.
        let c = Config::from_toml(&out).unwrap();
        let s = &c.postgres_sources[0];
        assert_eq!(s.name, "main-db");
        assert_eq!(
            s.retention,
            Some(crate::config::retention::RetentionRef::Class(
                "standard".into()
            ))
        );
        assert_eq!(s.primary_by_region.len(), 2);
    }

    #[test]
    fn config_validation() {
        let c =
            cfg("name = \"db\"\nhost = \"127.0.0.1\"\nport = 5432\nuser = \"postgres\"").unwrap();
        let s = &c.postgres_sources[0];
        assert!(s.wal_archive);
        assert_eq!(s.bin_dir, PathBuf::from(DEFAULT_BIN_DIR));
        assert_eq!(s.dbname, "postgres");
        let ok = "name = \"db\"\nhost = \"h\"\nport = 1\nuser = \"u\"\n";
        assert!(cfg(&format!("{ok}base_backup_schedule = \"*/5 * * * *\"")).is_ok());
        assert!(cfg(&format!(
            "{ok}retention = {{ keep_last = 2 }}\nprimary_by_region = {{ eu = \"h:5432\" }}"
        ))
        .is_ok());
        for bad in [
            "name = \"a/b\"\nhost = \"h\"\nport = 1\nuser = \"u\"",
            "name = \"..\"\nhost = \"h\"\nport = 1\nuser = \"u\"",
            &format!("{ok}base_backup_schedule = \"not cron\""),
            &format!("{ok}base_backup_schedule = \"* * * * *\"\nbase_backup_interval_s = 5"),
            &format!("{ok}base_backup_interval_s = 0"),
            &format!("{ok}retention = {{ keep_last = 0 }}"),
            &format!("{ok}primary_by_region = {{ eu = \"nohost\" }}"),
            &format!("{ok}data_dir = \"relative\""),
            &format!("{ok}[[postgres_sources]]\n{ok}"),
        ] {
            let e = cfg(bad).unwrap_err();
            assert!(
                matches!(e, ConfigError::BadPostgresSource { .. }),
                "{bad}: {e}"
            );
        }
        // Unique across exec sources too.
        let e = Config::from_toml(&format!(
            "agent_id = \"a\"\ndata_dir = \"/d\"\ncoordinators = [\"h:1\"]\n[tls]\ninsecure = true\n[[exec_sources]]\nname = \"db\"\nsnapshot_command = [\"true\"]\n[[postgres_sources]]\n{ok}"
        ))
        .unwrap_err();
        assert!(e.to_string().contains("used twice"), "{e}");
    }
}
