//! Database snapshots: `lifeboat restore redis` and `lifeboat verify snapshot`.
//!
//! A database snapshot is a pair of catalog files written by an agent's database source:
//! `_snapshots/<id>.<ext>` (the dump) and `_snapshots/<id>.<ext>.meta.json` (its sidecar, with
//! at least `kind`, `bytes` and `blake3`). The snapshot id is `<source>/<UTC ts>`, e.g.
//! `cache/20261124T012233Z`. Every use downloads both through the verified blob path (each part
//! and the whole file checked against the catalog's blake3), then also checks the dump's blake3
//! and size against the sidecar. `verify snapshot` dispatches on the sidecar's `kind` (`redis`
//! today; another kind adds one match arm).
//!
//! Redis: the RDB is loaded by a scratch `redis-server` (free port on 127.0.0.1, temp dir,
//! `--save '' --appendonly no`), killed when done even on error. `restore redis --to` copies
//! every key of every database from it to the target with `DUMP` + `RESTORE … REPLACE`, keeping
//! the remaining TTL (`PTTL`). The target is reached before the download (a `PING`), in
//! plaintext or, with `--tls`, over TLS through the connection code the agent's Redis sources
//! use ([`lifeboat_common::redis_conn`]).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context};
use clap::Args;
use lifeboat_common::apply;
use lifeboat_common::catalog::{EntryKind, FileVersion};
use lifeboat_common::redis_conn::{self, RedisTls};

use crate::files::list;
use crate::servers::RedisServer;
use lifeboat_client::conn::ConnArgs;

/// `lifeboat restore redis` arguments (exactly one of `--file` and `--to`).
#[derive(Args, Debug, Clone)]
#[command(group(clap::ArgGroup::new("target").required(true).args(["file", "to"])))]
pub struct RedisRestoreArgs {
    /// Snapshot id `<source>/<UTC ts>` (see `lifeboat ls _snapshots`).
    #[arg(long)]
    pub snapshot: String,
    /// Write the verified RDB to this file (temp + fsync + rename).
    #[arg(long)]
    pub file: Option<PathBuf>,
    /// Load it into the running Redis at HOST:PORT: every key copied with DUMP + RESTORE …
    /// REPLACE (keys not in the snapshot are left alone).
    #[arg(long)]
    pub to: Option<String>,
    /// Environment variable holding the target Redis password (with --to).
    #[arg(long, requires = "to")]
    pub password_env: Option<String>,
    /// Connect to the --to Redis over TLS (rustls, TLS 1.2 or 1.3), as the agent's
    /// `[[redis_sources]]` `tls = true` does. Needs --tls-ca-file. (The coordinators' TLS is
    /// --tls-dir / --ca / --cert / --key.)
    #[arg(long)]
    pub tls: bool,
    /// With --tls: PEM file of the CA(s) that sign the target's server certificate (the system
    /// roots are not used).
    #[arg(long, value_name = "PATH")]
    pub tls_ca_file: Option<PathBuf>,
    /// With --tls: PEM client certificate, for a target with `tls-auth-clients yes` (give
    /// --tls-key-file too).
    #[arg(long, value_name = "PATH")]
    pub tls_cert_file: Option<PathBuf>,
    /// With --tls: PEM private key of --tls-cert-file (read only to build the TLS session; its
    /// content is never logged or printed).
    #[arg(long, value_name = "PATH")]
    pub tls_key_file: Option<PathBuf>,
    /// With --tls: the name the target's certificate must carry (DNS name or IP). Default: the
    /// host of --to.
    #[arg(long, value_name = "NAME")]
    pub tls_server_name: Option<String>,
    /// The `redis-server` binary used to load the snapshot (with --to).
    #[arg(long, default_value = "redis-server")]
    pub redis_server: PathBuf,
    #[command(flatten)]
    #[allow(missing_docs)]
    pub conn: ConnArgs,
}

/// `lifeboat verify snapshot` arguments.
#[derive(Args, Debug, Clone)]
pub struct VerifyArgs {
    /// Snapshot id: `<source>/<UTC ts>` (Redis, exec) or `<source>/base/<UTC ts>` (a PostgreSQL
    /// base backup); see `lifeboat ls _snapshots`.
    pub id: String,
    /// The `redis-server` binary used to load Redis snapshots.
    #[arg(long, default_value = "redis-server")]
    pub redis_server: PathBuf,
    /// Redis: the number of keys (all databases) the snapshot must hold (default: the count the
    /// sidecar recorded).
    #[arg(long)]
    pub expect_keys: Option<u64>,
    /// PostgreSQL: database whose tables are counted and where --sql runs.
    #[arg(long, default_value = "postgres")]
    pub database: String,
    /// PostgreSQL: role for the checks (the scratch server trusts local connections).
    #[arg(long, default_value = "postgres")]
    pub user: String,
    /// PostgreSQL: a query to run on the restored database; its first column of the first row
    /// (as text) is reported.
    #[arg(long)]
    pub sql: Option<String>,
    /// PostgreSQL: the value --sql must return (compared as text, surrounding spaces ignored).
    #[arg(long, requires = "sql")]
    pub expect: Option<String>,
    /// PostgreSQL: replay every archived WAL segment from the backup's start on (the whole PITR
    /// path) instead of stopping as soon as the backup is consistent.
    #[arg(long)]
    pub full: bool,
    /// PostgreSQL binaries.
    #[arg(long, default_value = "/usr/lib/postgresql/15/bin")]
    pub bin_dir: PathBuf,
    /// PostgreSQL: OS user running the scratch server (default: `postgres` when run as root).
    #[arg(long)]
    pub owner: Option<String>,
    /// Directory for the scratch data (default: the system temp dir); removed afterwards.
    #[arg(long)]
    pub scratch_dir: Option<PathBuf>,
    /// Longest wait for a scratch server to load or recover, seconds.
    #[arg(long, default_value_t = 1800)]
    pub timeout_s: u64,
    /// Exec snapshots: pipe the snapshot into the command given after `--` (its restore
    /// command); the check passes when it exits 0.
    #[arg(long)]
    pub exec: bool,
    /// The restore command and its arguments (after `--`, with --exec).
    #[arg(last = true)]
    pub command: Vec<String>,
    #[command(flatten)]
    #[allow(missing_docs)]
    pub conn: ConnArgs,
}

/// What `restore redis` did.
#[derive(Debug, Clone, serde::Serialize)]
pub struct RedisRestoreReport {
    /// Snapshot id.
    pub snapshot: String,
    /// RDB bytes (verified).
    pub bytes: u64,
    /// blake3 of the RDB, hex (verified against the catalog and the sidecar).
    pub blake3: String,
    /// `file` or `redis`.
    pub target: String,
    /// File written or `host:port` loaded.
    pub to: String,
    /// Keys copied (with --to; 0 with --file).
    pub keys_copied: u64,
    /// Wall time, ms.
    pub duration_ms: u64,
}

/// One check of `verify snapshot`.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Check {
    /// Check name: `download`, `blake3`; Redis `header`, `load`, `keys`; PostgreSQL `unpack`,
    /// `start`, `row_counts`, `sql`; exec `restore_command`.
    pub name: String,
    /// Passed?
    pub ok: bool,
    /// What was seen.
    pub detail: String,
}

/// The report of `verify snapshot`.
#[derive(Debug, Clone, serde::Serialize)]
pub struct VerifyReport {
    /// Snapshot id.
    pub snapshot: String,
    /// Sidecar `kind`: `redis`, `postgres`, `exec` (empty when the sidecar could not be read).
    pub kind: String,
    /// Every check passed.
    pub ok: bool,
    /// `ok` or `failed`.
    pub verdict: String,
    /// The dump's blake3 matched the catalog (every blob and the whole file) and the sidecar.
    pub blake3_ok: bool,
    /// The dump's blake3, hex (empty when it could not be checked).
    pub blake3: String,
    /// Keys the scratch server holds after loading (Redis).
    pub keys: Option<u64>,
    /// Keys expected: `--expect-keys`, else the count the sidecar recorded (Redis).
    pub expected_keys: Option<u64>,
    /// Dump bytes.
    pub bytes: u64,
    /// ms until the scratch copy was ready to start (download, verify, unpack).
    pub restore_ms: Option<u64>,
    /// ms from starting the scratch server until it answered (Redis: loaded; PostgreSQL: out of
    /// recovery).
    pub start_ms: Option<u64>,
    /// PostgreSQL: rows per `schema.table` of `--database`.
    pub tables: Option<BTreeMap<String, i64>>,
    /// PostgreSQL: archived WAL files replayed (`--full`).
    pub wal_files: Option<u64>,
    /// PostgreSQL: result of `--sql` (None for no query or SQL NULL).
    pub sql_result: Option<String>,
    /// Wall time, ms.
    pub duration_ms: u64,
    /// The checks run, in order.
    pub checks: Vec<Check>,
    /// The first error, if any.
    pub error: Option<String>,
}

/// A snapshot id split into (directory below `_snapshots/`, timestamp): `<source>/<ts>` →
/// (`<source>`, `<ts>`), `<source>/base/<ts>` (a PostgreSQL base backup) → (`<source>/base`,
/// `<ts>`).
///
/// Errors: not one of those forms with safe path components.
pub fn parse_id(id: &str) -> anyhow::Result<(String, String)> {
    let usage = || {
        anyhow!("snapshot id {id:?}: expected <source>/<UTC ts> or <source>/base/<UTC ts>, e.g. cache/20261124T012233.123Z")
    };
    let parts: Vec<&str> = id.split('/').collect();
    let (dir, ts) = match parts.as_slice() {
        [src, ts] => (src.to_string(), *ts),
        [src, "base", ts] => (format!("{src}/base"), *ts),
        _ => return Err(usage()),
    };
    for part in &parts {
        if part.is_empty() || *part == "." || *part == ".." {
            return Err(usage());
        }
        lifeboat_common::path::validate_rel_path(part)
            .map_err(|e| anyhow!("snapshot id {id:?}: {e}"))?;
    }
    Ok((dir, ts.to_string()))
}

/// A downloaded, verified snapshot.
#[derive(Debug)]
pub struct Fetched {
    /// The sidecar as JSON.
    pub meta: serde_json::Value,
    /// The dump file.
    pub path: PathBuf,
    /// Its size.
    pub bytes: u64,
    /// Its blake3 hex.
    pub blake3: String,
    /// The coordinator that answered (for further blob fetches).
    pub addr: String,
}

/// Finds snapshot `id` in the catalog (any dump extension with a `.meta.json` sidecar), and
/// downloads the sidecar and the dump into `dir` (the dump as `dump_name`). Verifies the dump
/// against the catalog (blob path) and the sidecar (`bytes`, `blake3`).
///
/// Errors: no such snapshot, a corrupted blob on every coordinator (the error says
/// `corrupted`), a blake3/size mismatch with the sidecar, RPC or I/O errors.
pub async fn fetch(
    conn: &ConnArgs,
    id: &str,
    dir: &Path,
    dump_name: &str,
) -> anyhow::Result<Fetched> {
    let (sub, ts) = parse_id(id)?;
    let prefix = format!("_snapshots/{sub}/{ts}.");
    // Catalog listings match whole path components: list the snapshot's directory.
    let (rows, addr) = list(conn, &format!("_snapshots/{sub}"), None, false, false).await?;
    let live = |v: &&FileVersion| {
        v.v.kind == EntryKind::File && !v.v.deleted && v.v.path.starts_with(&prefix)
    };
    let client = conn.blobs(&addr)?;
    let root = dir.canonicalize()?;
    let meta_v = rows.iter().filter(live).find(|v| {
        v.v.path.ends_with(".meta.json") && v.v.path[prefix.len()..].matches('.').count() == 2
    });
    let Some(meta_v) = meta_v else {
        // An exec snapshot taken before exec sidecars existed: the catalog's hash only.
        let snap = format!("{prefix}snap");
        let v = rows.iter().filter(live).find(|v| v.v.path == snap).ok_or_else(|| {
            anyhow!("no snapshot {id:?}: no sidecar {prefix}<ext>.meta.json in the catalog (see `lifeboat ls _snapshots`)")
        })?;
        let bytes = apply::write_file(&client, &root, dump_name, v, ".lifeboat-restore-", false)
            .await
            .with_context(|| format!("snapshot {id}: {snap}"))?;
        let path = root.join(dump_name);
        let blake3 = hash_file(&path)?;
        let meta =
            serde_json::json!({ "id": id, "kind": "exec", "bytes": bytes, "blake3": blake3 });
        return Ok(Fetched {
            meta,
            path,
            bytes,
            blake3,
            addr,
        });
    };
    let dump_path = meta_v.v.path.trim_end_matches(".meta.json").to_string();
    let dump_v = rows
        .iter()
        .filter(live)
        .find(|v| v.v.path == dump_path)
        .ok_or_else(|| {
            anyhow!("snapshot {id:?}: sidecar present but {dump_path} is missing from the catalog")
        })?;
    apply::write_file(
        &client,
        &root,
        "meta.json",
        meta_v,
        ".lifeboat-restore-",
        false,
    )
    .await
    .with_context(|| format!("snapshot {id}: sidecar {}", meta_v.v.path))?;
    let meta: serde_json::Value =
        serde_json::from_slice(&std::fs::read(root.join("meta.json"))?)
            .with_context(|| format!("snapshot {id}: sidecar {} is not JSON", meta_v.v.path))?;
    let bytes = apply::write_file(
        &client,
        &root,
        dump_name,
        dump_v,
        ".lifeboat-restore-",
        false,
    )
    .await
    .with_context(|| format!("snapshot {id}: {dump_path}"))?;
    let path = root.join(dump_name);
    let hash = hash_file(&path)?;
    let want = meta["blake3"].as_str().unwrap_or_default();
    if hash != want {
        let _ = std::fs::remove_file(&path);
        bail!("snapshot {id}: corrupted: blake3 of {dump_path} is {hash}, the sidecar says {want:?}; refusing to use it");
    }
    if meta["bytes"].as_u64() != Some(bytes) {
        let _ = std::fs::remove_file(&path);
        bail!(
            "snapshot {id}: corrupted: {dump_path} has {bytes} bytes, the sidecar says {}",
            meta["bytes"]
        );
    }
    Ok(Fetched {
        meta,
        path,
        bytes,
        blake3: hash,
        addr,
    })
}

fn hash_file(path: &Path) -> anyhow::Result<String> {
    let mut h = blake3::Hasher::new();
    h.update_reader(
        std::fs::File::open(path).with_context(|| format!("open {}", path.display()))?,
    )?;
    Ok(h.finalize().to_hex().to_string())
}

fn check_rdb_header(path: &Path) -> anyhow::Result<()> {
    let mut head = [0u8; 5];
    std::io::Read::read_exact(&mut std::fs::File::open(path)?, &mut head)
        .context("RDB shorter than its header")?;
    if &head != b"REDIS" {
        bail!(
            "not an RDB file: header {:?}",
            String::from_utf8_lossy(&head)
        );
    }
    Ok(())
}

/// A scratch `redis-server` ([`RedisServer`]) in a temp dir, loading `dump.rdb` from it;
/// killed (and reaped) on drop.
pub struct ScratchRedis {
    server: RedisServer,
    /// Its port.
    pub port: u16,
}

impl ScratchRedis {
    /// Starts `bin` in `dir` (which must hold `dump.rdb`) and waits until the dataset is loaded
    /// (PING answers PONG, up to `timeout`).
    ///
    /// Errors: the server cannot start, exits (e.g. it refused the RDB: the log tail is in the
    /// error), or does not answer in time.
    pub async fn start(bin: &Path, dir: &Path, timeout: Duration) -> anyhow::Result<ScratchRedis> {
        let extra = [
            "--dbfilename",
            "dump.rdb",
            "--daemonize",
            "no",
            "--protected-mode",
            "yes",
        ];
        let mut server = RedisServer::spawn(bin, dir, &extra)?;
        server
            .wait_ready(timeout)
            .await
            .context("scratch redis-server loading the snapshot")?;
        Ok(ScratchRedis {
            port: server.port,
            server,
        })
    }

    /// Keys per database (`INFO keyspace`).
    ///
    /// Errors: connection or command failures.
    pub async fn keyspace(&self) -> anyhow::Result<BTreeMap<i64, u64>> {
        let mut c = redis_conn(&self.server.addr(), None, 0, None).await?;
        keyspace(&mut c).await
    }
}

async fn keyspace(c: &mut redis::aio::MultiplexedConnection) -> anyhow::Result<BTreeMap<i64, u64>> {
    let text: String = redis::cmd("INFO").arg("keyspace").query_async(c).await?;
    let mut out = BTreeMap::new();
    for l in text.lines() {
        let Some((db, rest)) = l.trim_end().split_once(':') else {
            continue;
        };
        let Some(n) = db.strip_prefix("db").and_then(|n| n.parse::<i64>().ok()) else {
            continue;
        };
        let keys = rest
            .split(',')
            .find_map(|kv| kv.strip_prefix("keys="))
            .and_then(|k| k.parse::<u64>().ok())
            .unwrap_or(0);
        out.insert(n, keys);
    }
    Ok(out)
}

impl RedisRestoreArgs {
    /// The TLS settings towards --to (`None` without --tls).
    ///
    /// Errors: --tls or a --tls-* option without --to, --tls without --tls-ca-file, a --tls-*
    /// option without --tls, only one of --tls-cert-file / --tls-key-file, an invalid
    /// --tls-server-name.
    pub fn target_tls(&self) -> anyhow::Result<Option<RedisTls>> {
        let any = self.tls_ca_file.is_some()
            || self.tls_cert_file.is_some()
            || self.tls_key_file.is_some()
            || self.tls_server_name.is_some();
        if (self.tls || any) && self.to.is_none() {
            bail!("--tls and --tls-* apply to the Redis at --to (they are not the coordinators' TLS: see --tls-dir)");
        }
        if !self.tls {
            if any {
                bail!("--tls-ca-file, --tls-cert-file, --tls-key-file and --tls-server-name need --tls");
            }
            return Ok(None);
        }
        let Some(ca_file) = self.tls_ca_file.clone() else {
            bail!("--tls needs --tls-ca-file PATH: the PEM of the CA that signs the certificate of the Redis at --to");
        };
        if self.tls_cert_file.is_some() != self.tls_key_file.is_some() {
            bail!("give both --tls-cert-file and --tls-key-file, or neither");
        }
        if let Some(n) = &self.tls_server_name {
            redis_conn::check_server_name(n)
                .map_err(|e| anyhow!("--tls-server-name {n:?}: {e}"))?;
        }
        Ok(Some(RedisTls {
            ca_file,
            cert_file: self.tls_cert_file.clone(),
            key_file: self.tls_key_file.clone(),
            server_name: self.tls_server_name.clone(),
        }))
    }
}

/// The Redis `restore redis --to` loads into: `host:port`, password, TLS settings.
#[derive(Clone)]
pub struct RedisTarget {
    /// `host:port`.
    pub addr: String,
    /// Password for `AUTH` (never printed: `Debug` only shows whether one is set).
    pub password: Option<String>,
    /// TLS settings (`None`: plaintext).
    pub tls: Option<RedisTls>,
}

impl std::fmt::Debug for RedisTarget {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedisTarget")
            .field("addr", &self.addr)
            .field("password", &self.password.as_ref().map(|_| "<redacted>"))
            .field("tls", &self.tls)
            .finish()
    }
}

impl RedisTarget {
    /// A connection to database `db` of the target (see [`redis_conn`]).
    ///
    /// Errors: connection, TLS or authentication failures; the message of a failed plaintext
    /// attempt says how to ask for TLS.
    pub async fn conn(&self, db: i64) -> anyhow::Result<redis::aio::MultiplexedConnection> {
        let c = redis_conn(&self.addr, self.password.clone(), db, self.tls.as_ref()).await;
        if self.tls.is_none() {
            c.context(format!(
                "target {} (plaintext; if it only accepts TLS, give --tls --tls-ca-file PATH)",
                self.addr
            ))
        } else {
            c.with_context(|| format!("target {} (TLS)", self.addr))
        }
    }
}

/// A multiplexed connection to `addr` (`host:port`) selecting database `db`, over TLS when
/// `tls` is given (the shared [`lifeboat_common::redis_conn::connect`]: 5 s to connect, 5 s for
/// the TLS handshake, 30 s for the setup commands, 60 s per command).
///
/// Errors: bad address, connection, TLS handshake or authentication failures.
pub async fn redis_conn(
    addr: &str,
    password: Option<String>,
    db: i64,
    tls: Option<&RedisTls>,
) -> anyhow::Result<redis::aio::MultiplexedConnection> {
    let info = redis::RedisConnectionInfo {
        db,
        password,
        ..Default::default()
    };
    Ok(redis_conn::connect(addr, tls, &info, Duration::from_secs(60)).await?)
}

/// Copies every key of every database of `from` to `to` (DUMP + PTTL, RESTORE … REPLACE),
/// 1000 keys per round trip. Returns the keys copied (keys that expired meanwhile are skipped).
///
/// Errors: connection or command failures on either side (e.g. a read-only replica target).
pub async fn copy_keys(from: &ScratchRedis, to: &RedisTarget) -> anyhow::Result<u64> {
    let src_addr = format!("127.0.0.1:{}", from.port);
    let to_addr = &to.addr;
    let mut copied = 0u64;
    for db in from.keyspace().await?.keys() {
        let mut src = redis_conn(&src_addr, None, *db, None).await?;
        let mut dst = to.conn(*db).await?;
        let mut cursor: u64 = 0;
        loop {
            let (next, keys): (u64, Vec<Vec<u8>>) = redis::cmd("SCAN")
                .arg(cursor)
                .arg("COUNT")
                .arg(1000)
                .query_async(&mut src)
                .await?;
            if !keys.is_empty() {
                let mut p = redis::pipe();
                for k in &keys {
                    p.cmd("DUMP").arg(k).cmd("PTTL").arg(k);
                }
                let vals: Vec<redis::Value> = p.query_async(&mut src).await?;
                let mut put = redis::pipe();
                let mut n = 0u64;
                for (k, pair) in keys.iter().zip(vals.chunks(2)) {
                    let (redis::Value::BulkString(dump), Some(ttl)) = (&pair[0], pair.get(1))
                    else {
                        continue; // expired or deleted meanwhile
                    };
                    let ttl: i64 = redis::from_redis_value(ttl)?;
                    if ttl == -2 {
                        continue;
                    }
                    put.cmd("RESTORE")
                        .arg(k)
                        .arg(ttl.max(0))
                        .arg(dump.as_slice())
                        .arg("REPLACE")
                        .ignore();
                    n += 1;
                }
                if n > 0 {
                    put.query_async::<()>(&mut dst)
                        .await
                        .with_context(|| format!("RESTORE into {to_addr} (db {db})"))?;
                    copied += n;
                }
            }
            cursor = next;
            if cursor == 0 {
                break;
            }
        }
    }
    Ok(copied)
}

/// `lifeboat restore redis`: fetches and verifies snapshot `args.snapshot`, then writes it to
/// `--file` or loads it into `--to`.
///
/// Errors: see [`fetch`]; not an RDB; the scratch server refusing it; the target refusing keys.
pub async fn restore_redis(args: &RedisRestoreArgs) -> anyhow::Result<RedisRestoreReport> {
    let started = Instant::now();
    let id = &args.snapshot;
    let password = match &args.password_env {
        Some(var) => {
            Some(std::env::var(var).map_err(|_| anyhow!("--password-env {var}: not set"))?)
        }
        None => None,
    };
    let tls = args.target_tls()?;
    // Reach the target before downloading the snapshot: a wrong address, password or TLS
    // setting fails in seconds, not after the transfer.
    let target = match &args.to {
        Some(addr) => {
            let t = RedisTarget {
                addr: addr.clone(),
                password,
                tls,
            };
            let mut c = t.conn(0).await?;
            let _: String = redis::cmd("PING")
                .query_async(&mut c)
                .await
                .with_context(|| format!("target {addr}: PING"))?;
            Some(t)
        }
        None => None,
    };
    let tmp = tempfile::Builder::new()
        .prefix("lifeboat-redis-")
        .tempdir()
        .context("create a temp directory")?;
    let f = fetch(&args.conn, id, tmp.path(), "dump.rdb").await?;
    if f.meta["kind"] != "redis" {
        bail!("snapshot {id} is of kind {}, not redis", f.meta["kind"]);
    }
    check_rdb_header(&f.path).with_context(|| format!("snapshot {id}"))?;
    let (target, to, keys_copied) = if let Some(file) = &args.file {
        place_file(&f.path, file)?;
        ("file", file.display().to_string(), 0)
    } else {
        let to = target.ok_or_else(|| anyhow!("give --file PATH or --to HOST:PORT"))?;
        let scratch = ScratchRedis::start(&args.redis_server, tmp.path(), Duration::from_secs(600))
            .await
            .with_context(|| format!("snapshot {id}"))?;
        let n = copy_keys(&scratch, &to).await?;
        drop(scratch);
        ("redis", to.addr, n)
    };
    Ok(RedisRestoreReport {
        snapshot: id.clone(),
        bytes: f.bytes,
        blake3: f.blake3,
        target: target.into(),
        to,
        keys_copied,
        duration_ms: started.elapsed().as_millis() as u64,
    })
}

/// Copies `from` to `dest` atomically: temp file next to `dest`, fsync, rename, fsync of the dir.
fn place_file(from: &Path, dest: &Path) -> anyhow::Result<()> {
    let dir = match dest.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    };
    let mut tmp = tempfile::Builder::new()
        .prefix(".lifeboat-restore-")
        .tempfile_in(&dir)
        .with_context(|| format!("--file: directory {}", dir.display()))?;
    std::io::copy(&mut std::fs::File::open(from)?, tmp.as_file_mut())?;
    tmp.as_file().sync_all()?;
    tmp.persist(dest)
        .map_err(|e| anyhow!("--file {}: {}", dest.display(), e.error))?;
    std::fs::File::open(&dir)?.sync_all()?;
    Ok(())
}

/// `lifeboat verify snapshot`: downloads snapshot `args.id`, checks it, and (per sidecar `kind`)
/// restores it into a scratch server. Never fails: problems are in the report (`ok = false`).
///
/// Every kind: `download` + `blake3` (each blob and the whole dump against the catalog, the dump
/// against the sidecar's `blake3` and `bytes`; a corrupted snapshot fails here).
///
/// Redis checks: `header` (`REDIS`), `load` (a scratch `redis-server` loads it), `keys` (keys
/// loaded, all databases, equal `--expect-keys` or else the sidecar's `keys`, which the agent read
/// from `INFO keyspace` just before requesting the RDB: a Redis taking writes at that moment can
/// make this check fail although the RDB itself is sound; the detail shows both).
///
/// PostgreSQL checks (see [`crate::pg_verify`]): `unpack`, `start` (recovered to consistency, or
/// through the archived WAL with `--full`), `row_counts` (every table of `--database`), `sql`
/// (`--sql`, compared with `--expect`).
///
/// Exec checks: with `--exec -- CMD`, `restore_command` (the snapshot piped into CMD exits 0).
pub async fn verify(args: &VerifyArgs) -> VerifyReport {
    let started = Instant::now();
    let mut r = VerifyReport {
        snapshot: args.id.clone(),
        kind: String::new(),
        ok: false,
        verdict: "failed".into(),
        blake3_ok: false,
        blake3: String::new(),
        keys: None,
        expected_keys: None,
        bytes: 0,
        restore_ms: None,
        start_ms: None,
        tables: None,
        wal_files: None,
        sql_result: None,
        duration_ms: 0,
        checks: Vec::new(),
        error: None,
    };
    if let Err(e) = verify_inner(args, &mut r, started).await {
        r.error = Some(format!("{e:#}"));
    }
    r.ok = r.error.is_none() && !r.checks.is_empty() && r.checks.iter().all(|c| c.ok);
    r.verdict = if r.ok { "ok" } else { "failed" }.into();
    r.duration_ms = started.elapsed().as_millis() as u64;
    r
}

fn check(r: &mut VerifyReport, name: &str, ok: bool, detail: String) {
    r.checks.push(Check {
        name: name.into(),
        ok,
        detail,
    });
}

async fn verify_inner(
    args: &VerifyArgs,
    r: &mut VerifyReport,
    started: Instant,
) -> anyhow::Result<()> {
    if args.exec == args.command.is_empty() {
        bail!(
            "give --exec together with the restore command after `--` (e.g. --exec -- psql -f -)"
        );
    }
    let mut b = tempfile::Builder::new();
    b.prefix("lifeboat-verify-");
    let tmp = match &args.scratch_dir {
        Some(d) => b.tempdir_in(d),
        None => b.tempdir(),
    }
    .context("create a scratch directory")?;
    let dl = tmp.path().join("download");
    std::fs::create_dir(&dl)?;
    let f = match fetch(&args.conn, &args.id, &dl, "dump").await {
        Ok(f) => f,
        Err(e) => {
            check(r, "download", false, format!("{e:#}"));
            return Err(e);
        }
    };
    r.bytes = f.bytes;
    r.blake3_ok = true;
    r.blake3 = f.blake3.clone();
    r.kind = f.meta["kind"].as_str().unwrap_or_default().to_string();
    check(
        r,
        "blake3",
        true,
        format!(
            "{} bytes, blake3 {} (catalog and sidecar agree)",
            f.bytes, f.blake3
        ),
    );
    match r.kind.as_str() {
        "redis" => verify_redis(args, &f, tmp.path(), r, started).await,
        "postgres" => verify_postgres(args, &f, tmp.path(), r, started).await,
        "exec" => verify_exec(args, &f, r, started).await,
        other => bail!("snapshot {}: verify does not know kind {other:?}", args.id),
    }
}

async fn verify_postgres(
    args: &VerifyArgs,
    f: &Fetched,
    scratch: &Path,
    r: &mut VerifyReport,
    started: Instant,
) -> anyhow::Result<()> {
    let source = crate::pg_verify::source_of(&args.id)?;
    let opts = crate::pg_verify::PgVerifyOpts {
        database: args.database.clone(),
        user: args.user.clone(),
        sql: args.sql.clone(),
        expect: args.expect.clone(),
        full: args.full,
        bin_dir: args.bin_dir.clone(),
        owner: args.owner.clone(),
        timeout: Duration::from_secs(args.timeout_s),
    };
    let mut out = crate::pg_verify::PgVerifyOutcome::default();
    let mut checks = Vec::new();
    let res = crate::pg_verify::verify(
        &args.conn,
        &f.addr,
        source,
        &f.path,
        &f.meta,
        scratch,
        &opts,
        started,
        &mut out,
        &mut checks,
    )
    .await;
    for (name, ok, detail) in checks {
        check(r, &name, ok, detail);
    }
    if out.restore_ms > 0 {
        r.restore_ms = Some(out.restore_ms);
    }
    if out.start_ms > 0 {
        r.start_ms = Some(out.start_ms);
        r.tables = Some(out.tables);
        r.sql_result = out.sql_result;
    }
    if args.full {
        r.wal_files = Some(out.wal_files);
    }
    res
}

async fn verify_exec(
    args: &VerifyArgs,
    f: &Fetched,
    r: &mut VerifyReport,
    started: Instant,
) -> anyhow::Result<()> {
    r.restore_ms = Some(started.elapsed().as_millis() as u64);
    if !args.exec {
        return Ok(());
    }
    let argv = &args.command;
    if argv.is_empty() {
        bail!("--exec needs the restore command after `--`");
    }
    let t0 = Instant::now();
    let input = std::fs::File::open(&f.path).context("open the downloaded snapshot")?;
    let status = tokio::process::Command::new(&argv[0])
        .args(&argv[1..])
        .stdin(Stdio::from(input))
        .status()
        .await;
    r.start_ms = Some(t0.elapsed().as_millis() as u64);
    match status {
        Ok(s) => check(
            r,
            "restore_command",
            s.success(),
            format!("{argv:?} with the snapshot on stdin: {s}"),
        ),
        Err(e) => check(
            r,
            "restore_command",
            false,
            format!("cannot start {argv:?}: {e}"),
        ),
    }
    Ok(())
}

async fn verify_redis(
    args: &VerifyArgs,
    f: &Fetched,
    dir: &Path,
    r: &mut VerifyReport,
    started: Instant,
) -> anyhow::Result<()> {
    let header = check_rdb_header(&f.path);
    check(
        r,
        "header",
        header.is_ok(),
        match &header {
            Ok(()) => "starts with REDIS".into(),
            Err(e) => e.to_string(),
        },
    );
    header?;
    std::fs::rename(&f.path, dir.join("dump.rdb"))?;
    r.restore_ms = Some(started.elapsed().as_millis() as u64);
    let t0 = Instant::now();
    let timeout = Duration::from_secs(args.timeout_s);
    let scratch = match ScratchRedis::start(&args.redis_server, dir, timeout).await {
        Ok(s) => s,
        Err(e) => {
            check(r, "load", false, format!("{e:#}"));
            return Err(e);
        }
    };
    r.start_ms = Some(t0.elapsed().as_millis() as u64);
    check(
        r,
        "load",
        true,
        format!("a scratch redis-server on port {} loaded it", scratch.port),
    );
    let keys: u64 = scratch.keyspace().await?.values().sum();
    let mut c = redis_conn(&format!("127.0.0.1:{}", scratch.port), None, 0, None).await?;
    let dbsize: u64 = redis::cmd("DBSIZE").query_async(&mut c).await?;
    drop(scratch);
    r.keys = Some(keys);
    let recorded = f.meta["keys"].as_u64();
    r.expected_keys = args.expect_keys.or(recorded);
    let ok = r.expected_keys.is_none_or(|k| k == keys);
    let want = match (args.expect_keys, recorded) {
        (Some(k), Some(s)) => format!("--expect-keys {k} (sidecar recorded {s})"),
        (Some(k), None) => format!("--expect-keys {k}"),
        (None, Some(s)) => format!("sidecar recorded {s}"),
        (None, None) => "sidecar has no key count".into(),
    };
    check(
        r,
        "keys",
        ok,
        format!("{keys} keys loaded (db0 DBSIZE {dbsize}), {want}"),
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Parser)]
    struct Cmd {
        #[command(flatten)]
        args: RedisRestoreArgs,
    }

    fn parse(extra: &[&str]) -> Result<RedisRestoreArgs, clap::Error> {
        let mut argv = vec!["restore", "--snapshot", "c/20261124T012233Z"];
        argv.extend_from_slice(extra);
        Cmd::try_parse_from(argv).map(|c| c.args)
    }

    #[test]
    fn target_tls_options() {
        let to = ["--to", "127.0.0.1:6380"];
        let args = parse(&to).unwrap();
        assert_eq!(args.target_tls().unwrap(), None);
        let full = parse(
            &[
                &to[..],
                &[
                    "--tls",
                    "--tls-ca-file",
                    "/ca.pem",
                    "--tls-cert-file",
                    "/c.pem",
                    "--tls-key-file",
                    "/c.key",
                    "--tls-server-name",
                    "redis.example.org",
                ],
            ]
            .concat(),
        )
        .unwrap();
        let tls = full.target_tls().unwrap().expect("tls");
        assert_eq!(tls.ca_file, PathBuf::from("/ca.pem"));
        assert_eq!(tls.key_file, Some(PathBuf::from("/c.key")));
        assert_eq!(tls.server_name.as_deref(), Some("redis.example.org"));
        for (extra, why) in [
            (&["--tls"][..], "--tls needs --tls-ca-file"),
            (&["--tls-ca-file", "/ca.pem"][..], "need --tls"),
            (
                &["--tls", "--tls-ca-file", "/ca.pem", "--tls-key-file", "/k"][..],
                "both --tls-cert-file and --tls-key-file",
            ),
            (
                &[
                    "--tls",
                    "--tls-ca-file",
                    "/ca.pem",
                    "--tls-server-name",
                    "a b",
                ][..],
                "--tls-server-name",
            ),
        ] {
            let e = parse(&[&to[..], extra].concat())
                .unwrap()
                .target_tls()
                .unwrap_err()
                .to_string();
            assert!(e.contains(why), "{extra:?}: {e}");
        }
        // TLS options only make sense with --to.
        let e = parse(&["--file", "/x.rdb", "--tls", "--tls-ca-file", "/ca.pem"])
            .unwrap()
            .target_tls()
            .unwrap_err();
        assert!(e.to_string().contains("apply to the Redis at --to"), "{e}");
        // The target's password is never printed.
        let t = RedisTarget {
            addr: "h:1".into(),
            password: Some("hunter2".into()),
            tls: None,
        };
        assert!(!format!("{t:?}").contains("hunter2"));
    }

    #[test]
    fn ids() {
        assert_eq!(
            parse_id("cache/20261124T012233Z").unwrap(),
            ("cache".into(), "20261124T012233Z".into())
        );
        assert_eq!(
            parse_id("db/base/20261124T012233.123Z").unwrap(),
            ("db/base".into(), "20261124T012233.123Z".into())
        );
        for bad in [
            "cache", "a/b/c", "../x", "a/..", "/x", "a/", "a/base/", "a//b",
        ] {
            assert!(parse_id(bad).is_err(), "{bad}");
        }
    }
}
