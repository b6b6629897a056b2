//! `lifeboat restore postgres`: point-in-time recovery of a `[[postgres_sources]]` source from
//! its base backups (`_snapshots/<source>/base/<ts>.tar` + `.tar.meta.json`) and archived WAL
//! (`_snapshots/<source>/wal/<segment>`).
//!
//! Steps: pick the newest base backup whose sidecar's `end_ms` is before `--at`; fetch it (every
//! blob verified by blake3 as in any restore) and check the whole tar's blake3 and size against
//! the sidecar; unpack it into DATADIR (which must not exist or be empty; `..`, absolute paths and
//! links in the tar are refused); fetch every archived WAL segment from the backup's start
//! segment on, plus the timeline history files, into `DATADIR/lifeboat_wal/`; append
//! `restore_command`, `recovery_target_time` and `recovery_target_action = 'promote'` to
//! `postgresql.auto.conf`; create `recovery.signal`; chown everything to the owner and chmod
//! DATADIR 0700. Starting the server then replays WAL up to `--at` and promotes it.
//! `--start-check` does that once (on a free port, no TCP listener, archiving off), waits until
//! `pg_controldata` reports `in production`, and stops the server again.

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context};
use futures::StreamExt;
use lifeboat_common::apply;
use lifeboat_common::catalog::{EntryKind, FileVersion};

use crate::files::list;
use crate::servers::{free_port, pg_command};
use lifeboat_client::conn::ConnArgs;

/// Options of `lifeboat restore postgres`.
#[derive(Debug, Clone)]
pub struct PgRestoreOpts {
    /// `[[postgres_sources]]` name.
    pub source: String,
    /// RFC 3339 target time, or `latest` (replay every archived WAL segment).
    pub at: String,
    /// Data directory to create (must not exist or be empty).
    pub to: PathBuf,
    /// OS user owning the restored files; None = `postgres` when running as root and that user
    /// exists, else the current user (no chown).
    pub owner: Option<String>,
    /// Start the server once to check that recovery completes, then stop it.
    pub start_check: bool,
    /// Directory of the PostgreSQL binaries (for `--start-check`).
    pub bin_dir: PathBuf,
}

/// What `lifeboat restore postgres` did.
#[derive(Debug, Clone, serde::Serialize)]
pub struct PgRestoreReport {
    /// Source name.
    pub source: String,
    /// Catalog path of the base backup tar used.
    pub base_backup: String,
    /// Its size, bytes (blake3 verified against the sidecar).
    pub base_bytes: u64,
    /// When the base backup ended (RFC 3339).
    pub base_end: String,
    /// WAL segments and history files restored into `lifeboat_wal/`.
    pub wal_files: u64,
    /// The data directory.
    pub data_dir: String,
    /// The `recovery_target_time` written (None for `latest`).
    pub recovery_target_time: Option<String>,
    /// Owner of the files (None: not changed).
    pub owner: Option<String>,
    /// Wall time of the restore (fetch + unpack + WAL), ms.
    pub elapsed_ms: u64,
    /// With `--start-check`: ms from starting the server until recovery completed.
    pub start_check_ms: Option<u64>,
}

#[derive(Debug, serde::Deserialize)]
struct Meta {
    end_ms: i64,
    bytes: u64,
    blake3: String,
    start_wal_file: Option<String>,
}

fn is_hex_upper(s: &str) -> bool {
    s.bytes()
        .all(|b| b.is_ascii_digit() || (b'A'..=b'F').contains(&b))
}

/// Restores `opts.source` as of `opts.at` into `opts.to` (see the module docs).
///
/// Errors: no base backup before `--at`, a corrupted blob or a tar that does not match its
/// sidecar, an unsafe tar entry, a non-empty DATADIR, an unknown owner, I/O, or (with
/// `--start-check`) a server that does not finish recovery.
pub async fn restore_postgres(
    conn: &ConnArgs,
    opts: &PgRestoreOpts,
) -> anyhow::Result<PgRestoreReport> {
    let started = Instant::now();
    let source = &opts.source;
    lifeboat_common::path::validate_rel_path(source)
        .ok()
        .filter(|_| !source.contains('/'))
        .ok_or_else(|| anyhow!("--source {source:?} must be one path component"))?;
    let at: Option<jiff::Timestamp> = if opts.at == "latest" {
        None
    } else {
        Some(opts.at.parse().map_err(|e| {
            anyhow!(
                "--at {:?}: expected `latest` or an RFC 3339 time ({e})",
                opts.at
            )
        })?)
    };
    let owner = resolve_owner(opts.owner.as_deref())?;
    let datadir = prepare_datadir(&opts.to)?;

    let prefix = format!("_snapshots/{source}/base/");
    let (rows, addr) = list(conn, &prefix, None, false, false).await?;
    let client = conn.blobs(&addr)?;
    let parent = datadir.parent().unwrap_or(Path::new("/")).to_path_buf();
    let work = tempfile::Builder::new()
        .prefix(".lifeboat-pg-restore-")
        .tempdir_in(&parent)
        .with_context(|| format!("create a work directory in {}", parent.display()))?;
    let work_root = work.path().canonicalize()?;
    let live = |v: &FileVersion| v.v.kind == EntryKind::File && !v.v.deleted;
    let mut best: Option<(Meta, FileVersion)> = None;
    for m in rows
        .iter()
        .filter(|v| live(v) && v.v.path.ends_with(".tar.meta.json"))
    {
        let tar_path = m.v.path.trim_end_matches(".meta.json");
        let Some(tar) = rows.iter().find(|v| live(v) && v.v.path == tar_path) else {
            continue;
        };
        apply::write_file(
            &client,
            &work_root,
            "meta.json",
            m,
            ".lifeboat-restore-",
            false,
        )
        .await?;
        let meta: Meta = serde_json::from_slice(&std::fs::read(work_root.join("meta.json"))?)
            .with_context(|| format!("bad sidecar {}", m.v.path))?;
        let before = at.is_none_or(|t| meta.end_ms < t.as_millisecond());
        if before && best.as_ref().is_none_or(|(b, _)| meta.end_ms > b.end_ms) {
            best = Some((meta, tar.clone()));
        }
    }
    let (meta, tar) = best.ok_or_else(|| {
        anyhow!(
            "no base backup of postgres source {source:?} ended before {} (see `lifeboat ls {prefix}`)",
            opts.at
        )
    })?;

    // The tar: every blob verified on the way, then the whole file against the sidecar.
    let n = apply::write_file(
        &client,
        &work_root,
        "base.tar",
        &tar,
        ".lifeboat-restore-",
        false,
    )
    .await?;
    let tar_file = work_root.join("base.tar");
    let hash = {
        let f = tar_file.clone();
        tokio::task::spawn_blocking(move || hash_file(&f)).await??
    };
    if n != meta.bytes || hash != meta.blake3 {
        bail!(
            "base backup {} does not match its sidecar: {n} bytes, blake3 {hash}; expected {} bytes, blake3 {}",
            tar.v.path,
            meta.bytes,
            meta.blake3
        );
    }
    {
        let (f, d) = (tar_file.clone(), datadir.clone());
        tokio::task::spawn_blocking(move || unpack(&f, &d))
            .await?
            .with_context(|| format!("unpack {}", tar.v.path))?;
    }
    drop(work);

    let wal_files = fetch_wal(
        conn,
        &client,
        source,
        meta.start_wal_file.as_deref(),
        &datadir,
    )
    .await?;

    let target = at.map(|t| {
        t.to_zoned(jiff::tz::TimeZone::UTC)
            .strftime("%Y-%m-%d %H:%M:%S%.6f+00")
            .to_string()
    });
    let goal = match &target {
        Some(t) => RecoveryGoal::Time(t.clone()),
        None => RecoveryGoal::Latest,
    };
    write_recovery_conf(&datadir, &goal)?;
    if let Some((name, uid, gid)) = &owner {
        chown_tree(&datadir, *uid, *gid).with_context(|| format!("chown to {name}"))?;
    }
    std::fs::set_permissions(&datadir, std::fs::Permissions::from_mode(0o700))?;
    let elapsed_ms = started.elapsed().as_millis() as u64;
    let start_check_ms = if opts.start_check {
        Some(
            start_check(
                &datadir,
                &opts.bin_dir,
                owner.as_ref().map(|o| o.0.as_str()),
            )
            .await?,
        )
    } else {
        None
    };
    Ok(PgRestoreReport {
        source: source.clone(),
        base_backup: tar.v.path.clone(),
        base_bytes: n,
        base_end: jiff::Timestamp::from_millisecond(meta.end_ms)
            .map(|t| t.to_string())
            .unwrap_or_default(),
        wal_files,
        data_dir: datadir.display().to_string(),
        recovery_target_time: target,
        owner: owner.map(|o| o.0),
        elapsed_ms,
        start_check_ms,
    })
}

/// Fetches every archived WAL segment of `source` from `start_wal_file`'s segment number on (all
/// timelines; every segment when None), and every timeline history file, into
/// `DATADIR/lifeboat_wal/` (each blob and file verified by blake3). Returns the files fetched.
///
/// Errors: RPC, verification or I/O failures.
pub async fn fetch_wal(
    conn: &ConnArgs,
    client: &lifeboat_proto::blob_service_client::BlobServiceClient<tonic::transport::Channel>,
    source: &str,
    start_wal_file: Option<&str>,
    datadir: &Path,
) -> anyhow::Result<u64> {
    let live = |v: &FileVersion| v.v.kind == EntryKind::File && !v.v.deleted;
    let start_seg = start_wal_file
        .filter(|f| f.len() == 24 && is_hex_upper(f))
        .map(|f| f[8..].to_string());
    let wal_prefix = format!("_snapshots/{source}/wal/");
    let (wal_rows, _) = list(conn, &wal_prefix, None, false, false).await?;
    let wanted: Vec<FileVersion> = wal_rows
        .into_iter()
        .filter(|v| live(v))
        .filter(|v| {
            let name = &v.v.path[wal_prefix.len().min(v.v.path.len())..];
            let seg = name.len() == 24 && is_hex_upper(name);
            let hist = name.len() == 16 && name.ends_with(".history") && is_hex_upper(&name[..8]);
            hist || (seg && start_seg.as_deref().is_none_or(|s| &name[8..] >= s))
        })
        .collect();
    let wal_files = wanted.len() as u64;
    let mut fetches = futures::stream::iter(wanted.into_iter().map(|v| {
        let (client, root) = (client.clone(), datadir.to_path_buf());
        async move {
            let name = v.v.path.rsplit('/').next().unwrap_or_default().to_string();
            apply::write_file(
                &client,
                &root,
                &format!("lifeboat_wal/{name}"),
                &v,
                ".lifeboat-restore-",
                false,
            )
            .await
        }
    }))
    .buffer_unordered(8);
    while let Some(r) = fetches.next().await {
        r?;
    }
    std::fs::create_dir_all(datadir.join("lifeboat_wal"))?;
    Ok(wal_files)
}

/// Where recovery of a restored data directory stops.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RecoveryGoal {
    /// `recovery_target_time` (a PostgreSQL timestamp literal).
    Time(String),
    /// Replay every WAL file `restore_command` finds, then promote.
    Latest,
    /// `recovery_target = 'immediate'`: stop as soon as the backup is consistent (the WAL inside
    /// a `-X fetch` base backup is enough), then promote.
    Immediate,
}

/// Creates DATADIR (0700) or checks that it is an empty directory; returns its canonical path.
/// Refuses paths with characters that would need quoting in `restore_command`.
pub(crate) fn prepare_datadir(to: &Path) -> anyhow::Result<PathBuf> {
    let s = to.to_str().ok_or_else(|| anyhow!("--to must be UTF-8"))?;
    if s.chars()
        .any(|c| !(c.is_ascii_alphanumeric() || "/._-+@,:".contains(c)))
    {
        bail!("--to {s:?}: use only letters, digits and / . _ - + @ , : (it goes into restore_command)");
    }
    match std::fs::read_dir(to) {
        Ok(mut rd) => {
            if rd.next().is_some() {
                bail!("--to {}: directory is not empty", to.display());
            }
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            std::fs::create_dir_all(to).with_context(|| format!("create {}", to.display()))?;
        }
        Err(e) => return Err(e).with_context(|| format!("--to {}", to.display())),
    }
    std::fs::set_permissions(to, std::fs::Permissions::from_mode(0o700))?;
    Ok(to.canonicalize()?)
}

/// `(name, uid, gid)` of the owner to chown to, or None (keep the current user).
pub(crate) fn resolve_owner(owner: Option<&str>) -> anyhow::Result<Option<(String, u32, u32)>> {
    match owner {
        Some(name) => lookup_user(name)
            .map(|(u, g)| Some((name.to_string(), u, g)))
            .ok_or_else(|| anyhow!("--owner {name:?}: no such user")),
        // SAFETY: geteuid has no preconditions.
        None if unsafe { libc::geteuid() } == 0 => {
            Ok(lookup_user("postgres").map(|(u, g)| ("postgres".to_string(), u, g)))
        }
        None => Ok(None),
    }
}

fn lookup_user(name: &str) -> Option<(u32, u32)> {
    let c = std::ffi::CString::new(name).ok()?;
    // SAFETY: getpwnam reads a NUL-terminated string; the result is copied out at once (the CLI
    // does not call getpw* from other threads).
    unsafe {
        let pw = libc::getpwnam(c.as_ptr());
        if pw.is_null() {
            None
        } else {
            Some(((*pw).pw_uid, (*pw).pw_gid))
        }
    }
}

fn hash_file(path: &Path) -> anyhow::Result<String> {
    Ok(lifeboat_common::blob::BlobHash::of_file(path)?.to_hex())
}

/// Unpacks `tar` into `dest`, refusing absolute paths, `..`, links and special files.
pub(crate) fn unpack(tar: &Path, dest: &Path) -> anyhow::Result<()> {
    let mut ar = tar::Archive::new(std::io::BufReader::new(std::fs::File::open(tar)?));
    ar.set_preserve_permissions(false);
    ar.set_unpack_xattrs(false);
    ar.set_overwrite(false);
    for e in ar.entries()? {
        let mut e = e?;
        let path = e.path()?.into_owned();
        for c in path.components() {
            match c {
                std::path::Component::Normal(_) | std::path::Component::CurDir => {}
                _ => bail!("unsafe entry {path:?} in the base backup tar"),
            }
        }
        match e.header().entry_type() {
            tar::EntryType::Regular | tar::EntryType::Directory | tar::EntryType::Continuous => {}
            tar::EntryType::XHeader | tar::EntryType::XGlobalHeader => continue,
            t => bail!(
                "entry {path:?} of the base backup tar has type {t:?}; only files and directories are restored (tablespaces are not supported)"
            ),
        }
        if !e.unpack_in(dest)? {
            bail!("unsafe entry {path:?} in the base backup tar");
        }
    }
    Ok(())
}

/// Appends the recovery settings for `goal` to `postgresql.auto.conf` (temp + fsync + rename)
/// and creates `recovery.signal` (removing a `standby.signal`).
pub(crate) fn write_recovery_conf(datadir: &Path, goal: &RecoveryGoal) -> anyhow::Result<()> {
    let conf = datadir.join("postgresql.auto.conf");
    let mut text = std::fs::read_to_string(&conf).unwrap_or_default();
    if !text.is_empty() && !text.ends_with('\n') {
        text.push('\n');
    }
    text.push_str("# Added by `lifeboat restore postgres`.\n");
    text.push_str(&format!(
        "restore_command = 'cp {}/lifeboat_wal/%f %p'\n",
        datadir.display()
    ));
    match goal {
        RecoveryGoal::Time(t) => text.push_str(&format!("recovery_target_time = '{t}'\n")),
        RecoveryGoal::Immediate => text.push_str("recovery_target = 'immediate'\n"),
        RecoveryGoal::Latest => {}
    }
    text.push_str("recovery_target_action = 'promote'\n");
    write_atomic(&conf, text.as_bytes())?;
    write_atomic(&datadir.join("recovery.signal"), b"")?;
    let _ = std::fs::remove_file(datadir.join("standby.signal"));
    Ok(())
}

fn write_atomic(path: &Path, bytes: &[u8]) -> anyhow::Result<()> {
    use std::io::Write;
    let dir = path.parent().unwrap_or(Path::new("."));
    let mut t = tempfile::Builder::new()
        .prefix(".lifeboat-restore-")
        .tempfile_in(dir)?;
    t.write_all(bytes)?;
    t.as_file().sync_all()?;
    t.as_file()
        .set_permissions(std::fs::Permissions::from_mode(0o600))?;
    t.persist(path)
        .map_err(|e| anyhow!("write {}: {}", path.display(), e.error))?;
    Ok(())
}

pub(crate) fn chown_tree(dir: &Path, uid: u32, gid: u32) -> std::io::Result<()> {
    std::os::unix::fs::lchown(dir, Some(uid), Some(gid))?;
    for e in std::fs::read_dir(dir)? {
        let e = e?;
        if e.file_type()?.is_dir() {
            chown_tree(&e.path(), uid, gid)?;
        } else {
            std::os::unix::fs::lchown(e.path(), Some(uid), Some(gid))?;
        }
    }
    Ok(())
}

/// [`pg_command`] for tokio.
pub(crate) fn pg_tokio_command(
    bin_dir: &Path,
    prog: &str,
    owner: Option<&str>,
) -> tokio::process::Command {
    tokio::process::Command::from(pg_command(bin_dir, prog, owner))
}

/// Starts the restored server (free port, Unix socket in DATADIR only, archiving off), waits up
/// to 30 min for `pg_controldata` to report `in production`, stops it. Returns the wait in ms.
async fn start_check(datadir: &Path, bin_dir: &Path, owner: Option<&str>) -> anyhow::Result<u64> {
    let port = free_port()?;
    let log = datadir.join("lifeboat_start_check.log");
    let opts = format!(
        "-c port={port} -c listen_addresses='' -c unix_socket_directories='{}' -c archive_mode=off",
        datadir.display()
    );
    let started = Instant::now();
    let out = pg_tokio_command(bin_dir, "pg_ctl", owner)
        .arg("-D")
        .arg(datadir)
        .arg("-l")
        .arg(&log)
        .arg("-o")
        .arg(&opts)
        .args(["-w", "-t", "1800", "start"])
        .output()
        .await
        .context("run pg_ctl start")?;
    let log_tail = || {
        std::fs::read_to_string(&log)
            .map(|l| l.lines().rev().take(15).collect::<Vec<_>>().join("\n"))
            .unwrap_or_default()
    };
    if !out.status.success() {
        bail!("--start-check: pg_ctl start failed: {}", log_tail());
    }
    let result = async {
        loop {
            let o = pg_tokio_command(bin_dir, "pg_controldata", None)
                .arg(datadir)
                .output()
                .await
                .context("run pg_controldata")?;
            let text = String::from_utf8_lossy(&o.stdout);
            if text
                .lines()
                .any(|l| l.starts_with("Database cluster state:") && l.ends_with("in production"))
            {
                return Ok(started.elapsed().as_millis() as u64);
            }
            if started.elapsed() > Duration::from_secs(1800) {
                bail!(
                    "--start-check: recovery did not finish in 30 min: {}",
                    log_tail()
                );
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }
    .await;
    let stop = pg_tokio_command(bin_dir, "pg_ctl", owner)
        .arg("-D")
        .arg(datadir)
        .args(["-m", "fast", "-w", "stop"])
        .output()
        .await;
    let ms = result?;
    match stop {
        Ok(o) if o.status.success() => {}
        _ => bail!("--start-check: recovery finished but pg_ctl stop failed"),
    }
    let _ = std::fs::remove_file(&log);
    Ok(ms)
}
