//! Redis sources (`[[redis_sources]]`): point-in-time RDB snapshots taken over the replication
//! protocol, plus the role reconciler ([`apply_role`]) and health probe ([`health`]) the failover
//! side calls.
//!
//! **Snapshots.** Like `redis-cli --rdb`: connect, `AUTH` if a password is configured,
//! `REPLCONF rdb-only 1` (Redis ≥ 7; ignored when refused), `REPLCONF capa eof` (so a primary with
//! `repl-diskless-sync` streams the RDB from its fork instead of writing it to disk first), `SYNC`, then read the RDB payload in
//! either form the primary sends (`$<len>\r\n<len bytes>` or the diskless
//! `$EOF:<40-byte mark>\r\n<bytes><mark>`), streamed into `data_dir/spool/<name>.rdb.tmp`
//! (never whole in memory) while hashing it with blake3. The payload must start with `REDIS`.
//! The finished file is moved to `data_dir/snapshots/<name>/<UTC ts>.rdb` and a JSON sidecar
//! ([`SnapshotMeta`]) is written next to it as `<UTC ts>.rdb.meta.json`; both travel through the
//! regular file pipeline under the reserved root `_snapshots/` and are removed locally once the
//! coordinators acknowledge them (as exec snapshots are, see `crate::sources::exec`).
//!
//! **Snapshot id**: `<name>/<UTC ts>` (e.g. `cache/20261124T012233.123Z`, millisecond
//! precision, moved forward by 1 ms if taken: unique per source): the catalog holds it as
//! `_snapshots/<id>.rdb` and `_snapshots/<id>.rdb.meta.json`.

use std::collections::BTreeMap;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use futures::future::BoxFuture;
use lifeboat_common::redis_conn::{self, RedisConnError, RedisTls};
use serde::{Deserialize, Serialize};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;
use tokio::time::Instant;
use tracing::Instrument;

pub use crate::config::redis::{defaults, RedisSourceConfig};
use crate::config::Config;
use crate::snapshot::{snapshots_dir, spool_dir};
use crate::sources::{Database, DbHealth, Pipeline, SnapshotSource};

/// The JSON sidecar `_snapshots/<id>.rdb.meta.json` of a Redis snapshot.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SnapshotMeta {
    /// Snapshot id `<source>/<UTC ts>`.
    pub id: String,
    /// Source name.
    pub source: String,
    /// `"redis"`.
    pub kind: String,
    /// When the snapshot started / ended, ms since the Unix epoch.
    pub start_ms: i64,
    /// See `start_ms`.
    pub end_ms: i64,
    /// RDB size in bytes.
    pub bytes: u64,
    /// blake3 of the RDB, hex.
    pub blake3: String,
    /// Control epoch the agent had seen (0 if unknown).
    pub epoch: u64,
    /// `redis_version` from `INFO server`.
    pub redis_version: String,
    /// Keys in all databases (`INFO keyspace`) just before the RDB was requested.
    pub keys: u64,
}

/// Why a Redis operation failed.
#[derive(Debug, thiserror::Error)]
pub enum RedisSourceError {
    /// A command or connection failed.
    #[error("redis {addr}: {msg}")]
    Redis {
        /// Server.
        addr: String,
        /// What failed.
        msg: String,
    },
    /// The replication stream was not a valid RDB transfer.
    #[error("redis {addr}: bad RDB transfer: {msg}")]
    Protocol {
        /// Server.
        addr: String,
        /// What was wrong.
        msg: String,
    },
    /// The password could not be read.
    #[error("redis source {name}: {msg}")]
    Password {
        /// Source.
        name: String,
        /// Cause (never the password).
        msg: String,
    },
    /// Local file errors.
    #[error("{0}")]
    Io(String),
    /// TLS setup or handshake failed (a server certificate not signed by `tls_ca_file`, a name
    /// mismatch, unreadable PEM files).
    #[error("redis {addr}: TLS: {msg}")]
    Tls {
        /// Server.
        addr: String,
        /// What failed.
        msg: String,
    },
    /// `apply_role` cannot decide (e.g. no primary for the active region).
    #[error("redis source {name}: {msg}")]
    Role {
        /// Source.
        name: String,
        /// Cause.
        msg: String,
    },
}

/// A password; `Debug` prints `<redacted>`.
#[derive(Clone)]
struct Secret(String);

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("<redacted>")
    }
}

pub use lifeboat_common::redis_conn::{split_addr, RedisIo};

fn password(src: &RedisSourceConfig) -> Result<Option<Secret>, RedisSourceError> {
    let err = |msg: String| RedisSourceError::Password {
        name: src.name.clone(),
        msg,
    };
    if let Some(var) = &src.password_env {
        return std::env::var(var)
            .map(|p| Some(Secret(p)))
            .map_err(|_| err(format!("password_env {var} is not set")));
    }
    if let Some(f) = &src.password_file {
        let s = std::fs::read_to_string(f)
            .map_err(|e| err(format!("password_file {}: {e}", f.display())))?;
        return Ok(Some(Secret(s.trim_end_matches(['\r', '\n']).to_string())));
    }
    Ok(None)
}

fn redis_err(addr: &str) -> impl Fn(redis::RedisError) -> RedisSourceError + '_ {
    move |e| RedisSourceError::Redis {
        addr: addr.to_string(),
        msg: e.to_string(),
    }
}

impl From<RedisConnError> for RedisSourceError {
    fn from(e: RedisConnError) -> Self {
        match e {
            RedisConnError::Connect { addr, msg } => RedisSourceError::Redis { addr, msg },
            RedisConnError::Tls { addr, msg } => RedisSourceError::Tls { addr, msg },
        }
    }
}

impl RedisSourceConfig {
    /// The TLS settings of this source (`None` without `tls = true`).
    ///
    /// Errors: [`RedisSourceError::Tls`] when `tls = true` lacks `tls_ca_file` (refused by
    /// `Config::validate` already; checked again for configs built without it).
    pub fn tls_settings(&self) -> Result<Option<RedisTls>, RedisSourceError> {
        if !self.tls {
            return Ok(None);
        }
        let ca_file = self
            .tls_ca_file
            .clone()
            .ok_or_else(|| RedisSourceError::Tls {
                addr: self.addr.clone(),
                msg: "tls_ca_file is not set".into(),
            })?;
        Ok(Some(RedisTls {
            ca_file,
            cert_file: self.tls_cert_file.clone(),
            key_file: self.tls_key_file.clone(),
            server_name: self.tls_server_name.clone(),
        }))
    }
}

/// Opens a byte stream to `addr` with the source's TLS settings (see
/// [`lifeboat_common::redis_conn::open_stream`]: 5 s to connect, 5 s more for a TLS handshake).
///
/// Errors: connection refused or timed out, a failed TLS handshake (the message says why, e.g.
/// an unknown issuer when `tls_ca_file` did not sign the server's certificate).
async fn open_stream(
    src: &RedisSourceConfig,
    addr: &str,
) -> Result<Box<dyn RedisIo>, RedisSourceError> {
    Ok(redis_conn::open_stream(addr, src.tls_settings()?.as_ref()).await?)
}

/// Connects to `addr` with the source's credentials and TLS settings (5 s connect, 30 s setup
/// and response timeouts).
async fn connect(
    src: &RedisSourceConfig,
    addr: &str,
) -> Result<redis::aio::MultiplexedConnection, RedisSourceError> {
    let tls = src.tls_settings()?;
    let info = redis::RedisConnectionInfo {
        username: src.username.clone(),
        password: password(src)?.map(|s| s.0),
        ..Default::default()
    };
    Ok(redis_conn::connect(addr, tls.as_ref(), &info, Duration::from_secs(30)).await?)
}

/// `INFO <section>` as a map of `field → value`.
async fn info(
    con: &mut redis::aio::MultiplexedConnection,
    addr: &str,
    section: &str,
) -> Result<BTreeMap<String, String>, RedisSourceError> {
    let text: String = redis::cmd("INFO")
        .arg(section)
        .query_async(con)
        .await
        .map_err(redis_err(addr))?;
    Ok(parse_info(&text))
}

/// Parses `INFO` text (`field:value` lines; `#` comments ignored).
pub fn parse_info(text: &str) -> BTreeMap<String, String> {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(|l| l.trim_end().split_once(':'))
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

/// Sum of `keys=N` over the `dbN:keys=...,expires=...` lines of `INFO keyspace`.
pub fn keyspace_keys(info: &BTreeMap<String, String>) -> u64 {
    info.iter()
        .filter(|(k, _)| k.starts_with("db"))
        .filter_map(|(_, v)| {
            v.split(',')
                .find_map(|kv| kv.strip_prefix("keys="))
                .and_then(|n| n.parse::<u64>().ok())
        })
        .sum()
}

/// Finished local snapshots and sidecars of `src` left from an earlier run, as paths relative to
/// `snapshots_dir` (`<source>/<ts>.rdb`, `<source>/<ts>.rdb.meta.json`), oldest first. An RDB
/// whose sidecar is missing (the agent stopped between the two renames) is deleted, not listed.
fn leftovers(src: &RedisSourceConfig, data_dir: &Path) -> Vec<String> {
    let d = snapshots_dir(data_dir).join(&src.name);
    let Ok(rd) = std::fs::read_dir(&d) else {
        return Vec::new();
    };
    let mut names: Vec<String> = rd
        .filter_map(|e| e.ok())
        .filter(|e| e.file_type().is_ok_and(|t| t.is_file()))
        .filter_map(|e| e.file_name().into_string().ok())
        .filter(|n| n.ends_with(".rdb") || n.ends_with(".rdb.meta.json"))
        .collect();
    names.sort();
    let mut out = Vec::new();
    for n in names {
        if n.ends_with(".rdb") && !d.join(format!("{n}.meta.json")).exists() {
            let _ = std::fs::remove_file(d.join(&n));
            continue;
        }
        out.push(format!("{}/{n}", src.name));
    }
    out
}

/// A `[[redis_sources]]` entry as a [`SnapshotSource`]: one task that sends, for every snapshot
/// taken, the relative paths of the RDB and then of its sidecar. The epoch in `progress` is read
/// when a snapshot starts (recorded in the sidecar). The task ends when `stop` asks for shutdown.
impl SnapshotSource for RedisSourceConfig {
    fn kind(&self) -> &'static str {
        "redis"
    }

    fn name(&self) -> &str {
        &self.name
    }

    fn leftovers(&self, data_dir: &Path) -> Vec<String> {
        leftovers(self, data_dir)
    }

    fn spawn(&self, cfg: &Config, pipe: &Pipeline) -> Vec<JoinHandle<()>> {
        let span = tracing::info_span!("redis_source", source = %self.name);
        let keep = crate::config::retention::resolve(&cfg.retention, &self.retention)
            .and_then(|p| p.keep_last)
            .map_or(defaults::KEEP_LAST, |k| k as usize);
        vec![tokio::spawn(
            source_loop(
                self.clone(),
                keep,
                cfg.data_dir.clone(),
                pipe.progress.clone(),
                pipe.tx.clone(),
                pipe.stop.clone(),
                pipe.uploader.clone(),
            )
            .instrument(span),
        )]
    }

    fn database(&self) -> Option<&dyn Database> {
        Some(self)
    }
}

/// Role orders: promote with `REPLICAOF NO ONE` or follow the active region's primary
/// ([`apply_role`]); the fencing of `min_replicas_to_write` ([`arm_min_replicas`]).
impl Database for RedisSourceConfig {
    fn apply_role<'a>(
        &'a self,
        my_region: &'a str,
        active_region: &'a str,
        epoch: u64,
    ) -> BoxFuture<'a, anyhow::Result<String>> {
        Box::pin(apply_role(self, my_region, active_region, epoch))
    }

    fn health(&self) -> BoxFuture<'_, DbHealth> {
        Box::pin(health(self))
    }

    fn settle(
        &self,
        active: bool,
        _ordered: bool,
        observed: DbHealth,
    ) -> (String, &'static [&'static str]) {
        (
            observed.role,
            if active { &["primary"] } else { &["replica"] },
        )
    }

    fn fences(&self) -> bool {
        self.min_replicas_to_write != 0
    }

    fn arm_fencing(&self) -> BoxFuture<'_, anyhow::Result<Option<String>>> {
        Box::pin(arm_min_replicas(self))
    }
}

/// Time until the next snapshot: `interval_s` (zero the first time) or the next cron match.
fn next_delay(src: &RedisSourceConfig, first: bool) -> Duration {
    crate::snapshot::next_delay(src.interval_s, src.schedule.as_deref(), first)
}

async fn source_loop(
    src: RedisSourceConfig,
    local_keep: usize,
    data_dir: PathBuf,
    progress: std::sync::Arc<crate::status::Progress>,
    tx: mpsc::UnboundedSender<String>,
    mut stop: watch::Receiver<Option<Instant>>,
    uploader: Option<crate::snapshot::preupload::Uploader>,
) {
    let mut first = true;
    loop {
        let delay = next_delay(&src, first);
        first = false;
        tokio::select! {
            _ = tokio::time::sleep(delay) => {}
            _ = stop.wait_for(|d| d.is_some()) => return,
        }
        let e = progress.epoch.load(std::sync::atomic::Ordering::Relaxed);
        let r = tokio::select! {
            r = take_snapshot_with(&src, &data_dir, e, uploader.as_ref()) => r,
            _ = stop.wait_for(|d| d.is_some()) => return,
        };
        match r {
            Ok(meta) => {
                tracing::info!(snapshot = %meta.id, bytes = meta.bytes, keys = meta.keys, "redis snapshot taken");
                let rdb = format!("{}.rdb", meta.id);
                let side = format!("{rdb}.meta.json");
                if tx.send(rdb).is_err() || tx.send(side).is_err() {
                    return;
                }
                prune_local(&src, &data_dir, local_keep);
            }
            Err(e) => {
                crate::metrics::snapshot_failed(&src.name);
                tracing::error!(source = %src.name, addr = %src.addr, error = %e, "redis snapshot failed; no snapshot recorded");
            }
        }
    }
}

/// Deletes unacknowledged local snapshots of `src` beyond the newest `keep`.
fn prune_local(src: &RedisSourceConfig, data_dir: &Path, keep: usize) {
    let d = snapshots_dir(data_dir).join(&src.name);
    let Ok(rd) = std::fs::read_dir(&d) else {
        return;
    };
    let mut rdbs: Vec<String> = rd
        .filter_map(|e| e.ok())
        .filter_map(|e| e.file_name().into_string().ok())
        .filter(|n| n.ends_with(".rdb"))
        .collect();
    rdbs.sort();
    let excess = rdbs.len().saturating_sub(keep.max(1));
    for n in &rdbs[..excess] {
        tracing::info!(source = %src.name, snapshot = %n, "retention: deleting an unacknowledged local snapshot");
        let _ = std::fs::remove_file(d.join(format!("{n}.meta.json")));
        let _ = std::fs::remove_file(d.join(n));
    }
}

/// Takes one snapshot of `src` now: `INFO` (version, key count), the RDB over the replication
/// protocol into the spool, then the RDB and its sidecar into `data_dir/snapshots/<name>/`.
/// `epoch` is recorded in the sidecar. Returns the sidecar.
///
/// Errors: connection, authentication, protocol (not an RDB, short stream), timeout
/// (`timeout_secs`), or local I/O; the spool file is removed and nothing is recorded.
pub async fn take_snapshot(
    src: &RedisSourceConfig,
    data_dir: &Path,
    epoch: u64,
) -> Result<SnapshotMeta, RedisSourceError> {
    take_snapshot_with(src, data_dir, epoch, None).await
}

/// [`take_snapshot`], uploading the RDB's parts to the region's leader while they arrive when
/// `uploader` is given (see [`crate::snapshot::preupload`]; a failed upload only costs time later).
///
/// Errors: as [`take_snapshot`].
pub async fn take_snapshot_with(
    src: &RedisSourceConfig,
    data_dir: &Path,
    epoch: u64,
    uploader: Option<&crate::snapshot::preupload::Uploader>,
) -> Result<SnapshotMeta, RedisSourceError> {
    let start_ms = lifeboat_common::now_ms();
    let io = |what: String| move |e: std::io::Error| RedisSourceError::Io(format!("{what}: {e}"));
    let spool_dir = spool_dir(data_dir);
    tokio::fs::create_dir_all(&spool_dir)
        .await
        .map_err(io(format!("cannot create {}", spool_dir.display())))?;
    let spool = spool_dir.join(format!("{}.rdb.tmp", src.name));
    let limit = Duration::from_secs(src.timeout_secs);
    let fetched = tokio::time::timeout(limit, async {
        let mut con = connect(src, &src.addr).await?;
        let server = info(&mut con, &src.addr, "server").await?;
        let keys = keyspace_keys(&info(&mut con, &src.addr, "keyspace").await?);
        drop(con);
        let up = uploader.map_or_else(crate::snapshot::preupload::Preupload::disabled, |u| {
            u.start()
        });
        let (bytes, hash) = fetch_rdb(src, &spool, up).await?;
        Ok::<_, RedisSourceError>((server, keys, bytes, hash))
    })
    .await
    .unwrap_or_else(|_| {
        Err(RedisSourceError::Redis {
            addr: src.addr.clone(),
            msg: format!(
                "snapshot timed out after {} s (timeout_secs)",
                src.timeout_secs
            ),
        })
    });
    let (server, keys, bytes, hash) = match fetched {
        Ok(r) => r,
        Err(e) => {
            let _ = tokio::fs::remove_file(&spool).await;
            return Err(e);
        }
    };
    let dir = snapshots_dir(data_dir).join(&src.name);
    let (ts, _) = crate::snapshot::retention::unique_ts(&dir, start_ms);
    let id = format!("{}/{ts}", src.name);
    let meta = SnapshotMeta {
        id: id.clone(),
        source: src.name.clone(),
        kind: "redis".into(),
        start_ms,
        end_ms: lifeboat_common::now_ms(),
        bytes,
        blake3: hash.to_hex().to_string(),
        epoch,
        redis_version: server.get("redis_version").cloned().unwrap_or_default(),
        keys,
    };
    let rdb = dir.join(format!("{ts}.rdb"));
    let side = dir.join(format!("{ts}.rdb.meta.json"));
    let placed = async {
        tokio::fs::create_dir_all(&dir)
            .await
            .map_err(io(format!("cannot create {}", dir.display())))?;
        tokio::fs::rename(&spool, &rdb)
            .await
            .map_err(io(format!("cannot move the RDB to {}", rdb.display())))?;
        let json = serde_json::to_vec_pretty(&meta)
            .map_err(|e| RedisSourceError::Io(format!("sidecar: {e}")))?;
        write_atomic(&side, &json)
            .await
            .map_err(io(format!("cannot write {}", side.display())))?;
        Ok::<_, RedisSourceError>(())
    }
    .await;
    if let Err(e) = placed {
        let _ = tokio::fs::remove_file(&spool).await;
        let _ = tokio::fs::remove_file(&rdb).await;
        return Err(e);
    }
    Ok(meta)
}

/// Writes `data` to `path` via a temp file in the same directory (mode 0600, fsync, rename).
async fn write_atomic(path: &Path, data: &[u8]) -> std::io::Result<()> {
    let tmp = path.with_extension("tmp");
    let mut f = tokio::fs::File::create(&tmp).await?;
    f.set_permissions(std::fs::Permissions::from_mode(0o600))
        .await?;
    f.write_all(data).await?;
    f.sync_all().await?;
    drop(f);
    tokio::fs::rename(&tmp, path).await
}

/// Reads one `\r\n`-terminated line (without the terminator), at most 1 KiB.
async fn read_line<R: tokio::io::AsyncBufRead + Unpin>(
    r: &mut R,
    addr: &str,
) -> Result<String, RedisSourceError> {
    let mut buf = Vec::new();
    let n = (&mut *r)
        .take(1024)
        .read_until(b'\n', &mut buf)
        .await
        .map_err(|e| RedisSourceError::Redis {
            addr: addr.to_string(),
            msg: format!("read: {e}"),
        })?;
    if n == 0 || !buf.ends_with(b"\n") {
        return Err(RedisSourceError::Protocol {
            addr: addr.to_string(),
            msg: "connection closed or line too long".into(),
        });
    }
    while buf.last().is_some_and(|b| *b == b'\n' || *b == b'\r') {
        buf.pop();
    }
    Ok(String::from_utf8_lossy(&buf).into_owned())
}

/// RESP array of bulk strings.
fn resp(args: &[&[u8]]) -> Vec<u8> {
    let mut out = format!("*{}\r\n", args.len()).into_bytes();
    for a in args {
        out.extend_from_slice(format!("${}\r\n", a.len()).as_bytes());
        out.extend_from_slice(a);
        out.extend_from_slice(b"\r\n");
    }
    out
}

/// The replication-protocol transfer: returns (bytes, blake3) of the RDB written to `spool`
/// (mode 0600, fsync'd).
async fn fetch_rdb(
    src: &RedisSourceConfig,
    spool: &Path,
    up: crate::snapshot::preupload::Preupload,
) -> Result<(u64, blake3::Hash), RedisSourceError> {
    let addr = src.addr.as_str();
    let proto = |msg: String| RedisSourceError::Protocol {
        addr: addr.to_string(),
        msg,
    };
    let net = |e: std::io::Error| RedisSourceError::Redis {
        addr: addr.to_string(),
        msg: e.to_string(),
    };
    let sock = open_stream(src, addr).await?;
    let mut r = BufReader::with_capacity(64 * 1024, sock);
    if let Some(pw) = password(src)? {
        let cmd = match &src.username {
            Some(u) => resp(&[b"AUTH", u.as_bytes(), pw.0.as_bytes()]),
            None => resp(&[b"AUTH", pw.0.as_bytes()]),
        };
        r.get_mut().write_all(&cmd).await.map_err(net)?;
        let line = read_line(&mut r, addr).await?;
        if !line.starts_with("+OK") {
            return Err(RedisSourceError::Redis {
                addr: addr.to_string(),
                msg: format!("AUTH refused: {line}"),
            });
        }
    }
    r.get_mut()
        .write_all(&resp(&[b"REPLCONF", b"rdb-only", b"1"]))
        .await
        .map_err(net)?;
    // `-ERR` on servers before 7.0: they stream commands after the RDB, which we never read.
    let _ = read_line(&mut r, addr).await?;
    // Without `capa eof` the primary cannot send the diskless `$EOF:` form and writes the whole
    // RDB to its disk before sending a byte (`repl-diskless-sync` is ignored): measured 6.5 s
    // instead of 4.8 s for a 188 MB RDB, and a `dump.rdb` left in the server's directory.
    r.get_mut()
        .write_all(&resp(&[b"REPLCONF", b"capa", b"eof"]))
        .await
        .map_err(net)?;
    let _ = read_line(&mut r, addr).await?;
    r.get_mut()
        .write_all(&resp(&[b"SYNC"]))
        .await
        .map_err(net)?;
    // The primary sends bare newlines as keepalives while it prepares the RDB.
    let header = loop {
        let line = read_line(&mut r, addr).await?;
        if line.is_empty() {
            continue;
        }
        break line;
    };
    let Some(spec) = header.strip_prefix('$') else {
        return Err(proto(format!(
            "expected `$<len>` or `$EOF:<mark>`, got {header:?}"
        )));
    };
    let file = crate::snapshot::spool::SpoolFile::create(spool, up)
        .await
        .map_err(|e| RedisSourceError::Io(format!("cannot create {}: {e}", spool.display())))?;
    let mut sink = RdbSink {
        file,
        bytes: 0,
        head: Vec::with_capacity(5),
    };
    let mut buf = vec![0u8; 1024 * 1024];
    if let Some(mark) = spec.strip_prefix("EOF:") {
        let mark = mark.as_bytes();
        if mark.len() != 40 {
            return Err(proto(format!(
                "EOF mark of {} bytes, expected 40",
                mark.len()
            )));
        }
        // Everything but the last 40 bytes seen is RDB; the stream ends with the mark.
        let mut tail: Vec<u8> = Vec::with_capacity(80);
        loop {
            let n = r.read(&mut buf).await.map_err(net)?;
            if n == 0 {
                return Err(proto("stream ended before the EOF mark".into()));
            }
            if n >= 40 {
                sink.write(&tail, spool).await?;
                sink.write(&buf[..n - 40], spool).await?;
                tail.clear();
                tail.extend_from_slice(&buf[n - 40..n]);
            } else {
                tail.extend_from_slice(&buf[..n]);
                if tail.len() > 40 {
                    let body = tail.len() - 40;
                    sink.write(&tail[..body], spool).await?;
                    tail.drain(..body);
                }
            }
            if tail == mark {
                break;
            }
        }
    } else {
        let len: u64 = spec
            .parse()
            .map_err(|_| proto(format!("bad length in {header:?}")))?;
        let mut left = len;
        while left > 0 {
            let want = buf.len().min(usize::try_from(left).unwrap_or(usize::MAX));
            let n = r.read(&mut buf[..want]).await.map_err(net)?;
            if n == 0 {
                return Err(proto(format!(
                    "stream ended after {} of {len} bytes",
                    len - left
                )));
            }
            sink.write(&buf[..n], spool).await?;
            left -= n as u64;
        }
    }
    if sink.head != b"REDIS" {
        return Err(proto(format!(
            "payload does not start with REDIS (got {:?})",
            String::from_utf8_lossy(&sink.head)
        )));
    }
    crate::snapshot::seal_spool(sink.file, spool)
        .await
        .map_err(RedisSourceError::Io)
}

struct RdbSink {
    file: crate::snapshot::spool::SpoolFile,
    bytes: u64,
    head: Vec<u8>,
}

impl RdbSink {
    async fn write(&mut self, data: &[u8], spool: &Path) -> Result<(), RedisSourceError> {
        if data.is_empty() {
            return Ok(());
        }
        if self.head.len() < 5 {
            let take = (5 - self.head.len()).min(data.len());
            self.head.extend_from_slice(&data[..take]);
        }
        self.bytes += data.len() as u64;
        self.file
            .write(data)
            .await
            .map_err(|e| RedisSourceError::Io(format!("cannot write {}: {e}", spool.display())))
    }
}

/// Reconciles the role of `src`'s Redis with the control record (idempotent; the failover side
/// calls it on every epoch change). `my_region == active_region`: make it a writable primary
/// (`REPLICAOF NO ONE` unless it already is one). Otherwise: make it a replica of
/// `primary_by_region[active_region]` (`REPLICAOF host port` unless it already follows that
/// address). With `min_replicas_to_write = N > 0`: a promotion also disarms the new primary
/// (`CONFIG SET min-replicas-to-write 0`); a primary that already was one is armed when N
/// replicas are connected ([`arm_min_replicas`]). Returns one line for the audit log, e.g.
/// `"cache: epoch 7: promoted 10.0.1.5:6379 (REPLICAOF NO ONE)"`.
///
/// Errors: connection/command failures; no `primary_by_region` entry for `active_region`, or
/// that entry naming this Redis itself while it should follow.
pub async fn apply_role(
    src: &RedisSourceConfig,
    my_region: &str,
    active_region: &str,
    epoch: u64,
) -> anyhow::Result<String> {
    let addr = src.addr.as_str();
    let mut con = connect(src, addr).await?;
    let repl = info(&mut con, addr, "replication").await?;
    let role = repl.get("role").map(String::as_str).unwrap_or("");
    let mut did = if my_region == active_region {
        if role == "master" {
            format!("{addr} already primary")
        } else {
            let _: () = redis::cmd("REPLICAOF")
                .arg("NO")
                .arg("ONE")
                .query_async(&mut con)
                .await
                .map_err(redis_err(addr))?;
            let mut did = format!("promoted {addr} (REPLICAOF NO ONE; was {role})");
            if src.min_replicas_to_write > 0 {
                set_min_replicas(&mut con, addr, 0, src.min_replicas_max_lag_s).await?;
                did += &format!(
                    "; min-replicas-to-write 0 until {} replica(s) follow",
                    src.min_replicas_to_write
                );
            }
            did
        }
    } else {
        let target =
            src.primary_by_region
                .get(active_region)
                .ok_or_else(|| RedisSourceError::Role {
                    name: src.name.clone(),
                    msg: format!("no primary_by_region entry for active region {active_region:?}"),
                })?;
        if target == &src.addr {
            return Err(RedisSourceError::Role {
                name: src.name.clone(),
                msg: format!(
                    "primary_by_region.{active_region} is this Redis ({target}) but region {my_region:?} is not active"
                ),
            }
            .into());
        }
        let (host, port) = split_addr(target).map_err(|msg| RedisSourceError::Role {
            name: src.name.clone(),
            msg,
        })?;
        let following = role == "slave"
            && repl.get("master_host").is_some_and(|h| *h == host)
            && repl
                .get("master_port")
                .is_some_and(|p| *p == port.to_string());
        if following {
            format!("{addr} already replica of {target}")
        } else {
            let _: () = redis::cmd("REPLICAOF")
                .arg(&host)
                .arg(port)
                .query_async(&mut con)
                .await
                .map_err(redis_err(addr))?;
            format!("{addr} now replica of {target} (REPLICAOF; was {role})")
        }
    };
    if my_region == active_region && role == "master" {
        if let Some(armed) = arm_with(src, &mut con, addr).await? {
            did += &format!("; {armed}");
        }
    }
    Ok(format!("{}: epoch {epoch}: {did}", src.name))
}

/// `CONFIG SET min-replicas-to-write n min-replicas-max-lag lag_s`.
async fn set_min_replicas(
    con: &mut redis::aio::MultiplexedConnection,
    addr: &str,
    n: u32,
    lag_s: u64,
) -> Result<(), RedisSourceError> {
    redis::cmd("CONFIG")
        .arg("SET")
        .arg("min-replicas-to-write")
        .arg(n)
        .arg("min-replicas-max-lag")
        .arg(lag_s)
        .query_async(con)
        .await
        .map_err(redis_err(addr))
}

/// Arms the fencing of a primary (see [`RedisSourceConfig`]): when `min_replicas_to_write = N >
/// 0`, the server is a primary with at least N connected replicas and its
/// `min-replicas-to-write` is below N, sets `min-replicas-to-write N` and
/// `min-replicas-max-lag`. Never lowers the setting. Returns what was done (`None`: nothing to
/// do). The agent calls it on every heartbeat while its region is active.
///
/// Errors: connection or command failures.
pub async fn arm_min_replicas(src: &RedisSourceConfig) -> anyhow::Result<Option<String>> {
    if src.min_replicas_to_write == 0 {
        return Ok(None);
    }
    let mut con = connect(src, &src.addr).await?;
    Ok(arm_with(src, &mut con, &src.addr).await?)
}

async fn arm_with(
    src: &RedisSourceConfig,
    con: &mut redis::aio::MultiplexedConnection,
    addr: &str,
) -> Result<Option<String>, RedisSourceError> {
    let n = src.min_replicas_to_write;
    if n == 0 {
        return Ok(None);
    }
    let repl = info(con, addr, "replication").await?;
    if repl.get("role").map(String::as_str) != Some("master") {
        return Ok(None);
    }
    let connected: u32 = repl
        .get("connected_slaves")
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    let current: Vec<String> = redis::cmd("CONFIG")
        .arg("GET")
        .arg("min-replicas-to-write")
        .query_async(con)
        .await
        .map_err(redis_err(addr))?;
    let current: u32 = current.get(1).and_then(|v| v.parse().ok()).unwrap_or(0);
    if connected < n || current >= n {
        return Ok(None);
    }
    set_min_replicas(con, addr, n, src.min_replicas_max_lag_s).await?;
    Ok(Some(format!(
        "armed: min-replicas-to-write {n}, min-replicas-max-lag {} ({connected} replica(s) connected)",
        src.min_replicas_max_lag_s
    )))
}

/// Probes `src`'s Redis: `PING`, then `INFO replication`. A primary reports its
/// `master_repl_offset`; a replica reports the primary it follows, the link state and
/// `lag_bytes` = the primary's `master_repl_offset` − the replica's `slave_repl_offset` (the
/// primary is asked with the same credentials; when it cannot be reached, the replica's own
/// `slave_read_repl_offset` − `slave_repl_offset` is used and the detail says so).
/// `healthy` is false on any connection or command error (role `"unknown"`).
pub async fn health(src: &RedisSourceConfig) -> DbHealth {
    match probe(src).await {
        Ok(h) => h,
        Err(e) => DbHealth {
            healthy: false,
            role: "unknown".into(),
            detail: e.to_string(),
            lag_bytes: None,
        },
    }
}

async fn probe(src: &RedisSourceConfig) -> Result<DbHealth, RedisSourceError> {
    let addr = src.addr.as_str();
    let mut con = connect(src, addr).await?;
    let pong: String = redis::cmd("PING")
        .query_async(&mut con)
        .await
        .map_err(redis_err(addr))?;
    if pong != "PONG" {
        return Err(RedisSourceError::Redis {
            addr: addr.to_string(),
            msg: format!("PING answered {pong:?}"),
        });
    }
    let repl = info(&mut con, addr, "replication").await?;
    let num = |m: &BTreeMap<String, String>, k: &str| m.get(k).and_then(|v| v.parse::<u64>().ok());
    let offset = num(&repl, "master_repl_offset").unwrap_or(0);
    if repl.get("role").map(String::as_str) != Some("slave") {
        return Ok(DbHealth {
            healthy: true,
            role: "primary".into(),
            detail: format!(
                "{addr} primary, master_repl_offset {offset}, {} connected replicas",
                repl.get("connected_slaves")
                    .map(String::as_str)
                    .unwrap_or("0")
            ),
            lag_bytes: None,
        });
    }
    let host = repl.get("master_host").cloned().unwrap_or_default();
    let port = repl.get("master_port").cloned().unwrap_or_default();
    let link = repl.get("master_link_status").cloned().unwrap_or_default();
    let applied = num(&repl, "slave_repl_offset").unwrap_or(offset);
    let primary = format!("{host}:{port}");
    let upstream = match tokio::time::timeout(Duration::from_secs(3), async {
        let mut c = connect(src, &primary).await?;
        info(&mut c, &primary, "replication").await
    })
    .await
    {
        Ok(Ok(m)) => num(&m, "master_repl_offset"),
        _ => None,
    };
    let (lag, how) = match upstream {
        Some(p) => (p.saturating_sub(applied), "primary offset"),
        None => (
            num(&repl, "slave_read_repl_offset")
                .unwrap_or(applied)
                .saturating_sub(applied),
            "primary unreachable; read offset",
        ),
    };
    Ok(DbHealth {
        healthy: true,
        role: "replica".into(),
        detail: format!(
            "{addr} replica of {primary}, link {link}, slave_repl_offset {applied}, lag {lag} bytes ({how})"
        ),
        lag_bytes: Some(lag),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::ConfigError;

    #[test]
    fn info_and_keyspace() {
        let m = parse_info(
            "# Keyspace\r\ndb0:keys=10,expires=2,avg_ttl=0\r\ndb3:keys=5,expires=0,avg_ttl=0\r\n",
        );
        assert_eq!(keyspace_keys(&m), 15);
        assert_eq!(split_addr("h:1").unwrap(), ("h".to_string(), 1));
        assert!(split_addr("h").is_err());
        assert!(split_addr(":1").is_err());
        assert!(split_addr("h:0").is_err());
        assert_eq!(resp(&[b"SYNC"]), b"*1\r\n$4\r\nSYNC\r\n");
    }

    const BASE: &str =
        "agent_id = \"a\"\ndata_dir = \"/d\"\ncoordinators = [\"h:1\"]\n[tls]\ninsecure = true\n";

    fn with(body: &str) -> Result<Config, ConfigError> {
        Config::from_toml(&format!("{BASE}\n[[redis_sources]]\n{body}\n"))
    }

    #[test]
    fn config_parses_and_validates() {
        let c = with("name = \"cache\"\naddr = \"127.0.0.1:6379\"\nschedule = \"*/5 * * * *\"\nprimary_by_region = { eu = \"10.0.0.1:6379\" }").unwrap();
        let s = &c.redis_sources[0];
        assert!(s.retention.is_none());
        assert_eq!(s.timeout_secs, defaults::TIMEOUT_SECS);
        assert!(s.min_replicas_to_write == 0 && !s.tls);
        assert_eq!(s.primary_by_region["eu"], "10.0.0.1:6379");
        assert!(next_delay(s, true) <= Duration::from_secs(300));
        let ok = with("name = \"c\"\naddr = \"h:1\"\ninterval_s = 5").unwrap();
        assert_eq!(next_delay(&ok.redis_sources[0], true), Duration::ZERO);
        assert_eq!(
            next_delay(&ok.redis_sources[0], false),
            Duration::from_secs(5)
        );
        for (body, why) in [
            ("name = \"a/b\"\naddr = \"h:1\"\ninterval_s = 5", "path component"),
            ("name = \"..\"\naddr = \"h:1\"\ninterval_s = 5", "name"),
            ("name = \"c\"\naddr = \"h\"\ninterval_s = 5", "addr"),
            ("name = \"c\"\naddr = \"h:1\"", "exactly one"),
            ("name = \"c\"\naddr = \"h:1\"\ninterval_s = 5\nschedule = \"* * * * *\"", "exactly one"),
            ("name = \"c\"\naddr = \"h:1\"\ninterval_s = 0", "at least 1"),
            ("name = \"c\"\naddr = \"h:1\"\nschedule = \"not cron\"", "schedule"),
            ("name = \"c\"\naddr = \"h:1\"\ninterval_s = 5\ntls = true", "needs tls_ca_file"),
            ("name = \"c\"\naddr = \"h:1\"\ninterval_s = 5\ntls_ca_file = \"/ca.pem\"", "need tls = true"),
            ("name = \"c\"\naddr = \"h:1\"\ninterval_s = 5\ntls = true\ntls_ca_file = \"/ca.pem\"\ntls_cert_file = \"/c.pem\"", "both"),
            ("name = \"c\"\naddr = \"h:1\"\ninterval_s = 5\npassword_env = \"P\"\npassword_file = \"/p\"", "at most one"),
            ("name = \"c\"\naddr = \"h:1\"\ninterval_s = 5\nretention = { keep_last = 0 }", "keep something"),
            ("name = \"c\"\naddr = \"h:1\"\ninterval_s = 5\nretention = \"nope\"", "no [retention.nope]"),
            ("name = \"c\"\naddr = \"h:1\"\ninterval_s = 5\nprimary_by_region = { eu = \"x\" }", "primary_by_region.eu"),
            ("name = \"c\"\naddr = \"h:1\"\ninterval_s = 5\n[[redis_sources]]\nname = \"c\"\naddr = \"h:2\"\ninterval_s = 5", "twice"),
        ] {
            let e = with(body).unwrap_err();
            assert!(matches!(e, ConfigError::BadRedisSource { .. }), "{body}: {e}");
            assert!(e.to_string().contains(why), "{body}: {e}");
        }
        // Names are unique across exec and redis sources.
        let e = Config::from_toml(&format!(
            "{BASE}\n[[exec_sources]]\nname = \"c\"\nsnapshot_command = [\"true\"]\n[[redis_sources]]\nname = \"c\"\naddr = \"h:1\"\ninterval_s = 5\n"
        ))
        .unwrap_err();
        assert!(e.to_string().contains("twice"), "{e}");
    }

    #[test]
    fn example_config_redis_block_is_valid() {
        let text = include_str!(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../deploy/examples/agent.toml"
        ));
        let mut out = String::new();
        let mut inside = false;
        for line in text.lines() {
            if line == "# [[redis_sources]]" {
                inside = true;
            }
            if inside && line.starts_with("# ") {
                out += &line[2..];
            } else {
                inside = false;
                out += line;
            }
            out.push('\n');
        }
        let c = Config::from_toml(&out).expect("example with [[redis_sources]] uncommented");
        assert_eq!(c.redis_sources.len(), 1);
        assert_eq!(c.redis_sources[0].schedule.as_deref(), Some("*/5 * * * *"));
        assert_eq!(c.redis_sources[0].primary_by_region.len(), 2);
    }

    #[test]
    fn secret_debug_is_redacted() {
        assert_eq!(format!("{:?}", Secret("hunter2".into())), "<redacted>");
    }
}
