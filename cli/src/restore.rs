//! `lifeboat restore`: rebuilds every path under a prefix, as of a time, into a target directory.
//!
//! Safety rules (DESIGN.md section 5, rules 4 and 5): every path from the catalog is checked
//! ([`lifeboat_common::path::safe_join`]: no `..`, no absolute path, no existing symlink on the
//! way, so nothing is written through a link); every blob is decoded and its blake3 checked, and
//! every rebuilt file's blake3 is compared with the catalog's; files are written to a temp file in
//! their directory and renamed into place. Symlinks are created last, as links, never followed.
//! The writing itself is [`lifeboat_common::apply`], shared with the agent's replica applier.

use std::collections::HashMap;
use std::path::Path;
use std::sync::Arc;
use std::time::Instant;

use anyhow::{anyhow, Context};
use futures::StreamExt;
use lifeboat_common::apply::{self, mkdirs};
use lifeboat_common::catalog::{EntryKind, FileVersion};
use lifeboat_proto::ListVersionsRequest;

use crate::conn::ConnArgs;

/// What a restore did.
#[derive(Debug, Default, Clone, serde::Serialize)]
pub struct RestoreReport {
    /// Regular files written.
    pub files: u64,
    /// Directories created.
    pub dirs: u64,
    /// Symlinks created.
    pub symlinks: u64,
    /// Content bytes written.
    pub bytes: u64,
    /// Wall time, ms.
    pub elapsed_ms: u64,
    /// Content throughput, MB/s (10^6 bytes).
    pub mb_per_s: f64,
}

/// Lists versions under `prefix` as of `at_ms` (None = latest).
///
/// Errors: RPC failures, bad rows.
pub async fn list(
    conn: &ConnArgs,
    prefix: &str,
    at_ms: Option<i64>,
    all_versions: bool,
    include_deleted: bool,
) -> anyhow::Result<(Vec<FileVersion>, String)> {
    let (mut admin, addr) = conn.admin().await?;
    let mut s = admin
        .list_versions(ListVersionsRequest {
            prefix: prefix.to_string(),
            at_ms: at_ms.unwrap_or(0),
            all_versions,
            include_deleted,
        })
        .await
        .map_err(|e| anyhow!("list versions: {}", e.message()))?
        .into_inner();
    let mut out = Vec::new();
    while let Some(row) = s.next().await {
        let row = row.map_err(|e| anyhow!("list versions: {}", e.message()))?;
        out.push(
            FileVersion::from_pb(&row)
                .with_context(|| format!("bad catalog row for {:?}", row.path))?,
        );
    }
    Ok((out, addr))
}

/// Restores `versions` into `to` through coordinator `addr`. `progress` shows a bar.
///
/// Errors: the first failure (path refused, blob corrupted, I/O), naming the path.
pub async fn restore(
    conn: &ConnArgs,
    addr: &str,
    versions: Vec<FileVersion>,
    to: &Path,
    progress: bool,
) -> anyhow::Result<RestoreReport> {
    let started = Instant::now();
    std::fs::create_dir_all(to).with_context(|| format!("create target {}", to.display()))?;
    let root = to.canonicalize()?;
    let mut report = RestoreReport::default();
    let total: u64 = versions
        .iter()
        .filter(|v| v.v.kind == EntryKind::File)
        .map(|v| v.v.size)
        .sum();
    let bar = if progress {
        let b = indicatif::ProgressBar::new(total);
        b.set_style(
            indicatif::ProgressStyle::with_template(
                "{spinner} restoring [{bar:40}] {bytes}/{total_bytes} {bytes_per_sec} eta {eta}",
            )
            .expect("template")
            .progress_chars("=> "),
        );
        b
    } else {
        indicatif::ProgressBar::hidden()
    };
    let mut dirs = Vec::new();
    let mut files = Vec::new();
    let mut links = Vec::new();
    for v in versions {
        match v.v.kind {
            EntryKind::Dir => dirs.push(v),
            EntryKind::File => files.push(v),
            EntryKind::Symlink => links.push(v),
        }
    }
    dirs.sort_by(|a, b| a.v.path.cmp(&b.v.path));
    for d in &dirs {
        mkdirs(&root, &d.v.path)?;
        report.dirs += 1;
    }
    let client = conn.blobs(addr)?;
    let root = Arc::new(root);
    let mut results = futures::stream::iter(files.into_iter().map(|v| {
        let (client, root) = (client.clone(), root.clone());
        async move {
            apply::write_file(&client, &root, &v.v.path, &v, ".lifeboat-restore-", false).await
        }
    }))
    .buffer_unordered(12);
    while let Some(r) = results.next().await {
        let n = r?;
        report.files += 1;
        report.bytes += n;
        bar.inc(n);
    }
    bar.finish_and_clear();
    for l in &links {
        let target = l.v.symlink_target.clone().unwrap_or_default();
        apply::write_symlink(&root, &l.v.path, &target, false)?;
        report.symlinks += 1;
    }
    // Directory modes and mtimes last, deepest first (writing inside changes a dir's mtime).
    let mut by_depth: HashMap<usize, Vec<&FileVersion>> = HashMap::new();
    for d in &dirs {
        by_depth
            .entry(d.v.path.matches('/').count())
            .or_default()
            .push(d);
    }
    let mut depths: Vec<_> = by_depth.keys().copied().collect();
    depths.sort_unstable_by(|a, b| b.cmp(a));
    for depth in depths {
        for d in &by_depth[&depth] {
            apply::set_dir_meta(&root, &d.v.path, d.v.mode, d.v.mtime_ns)?;
        }
    }
    report.elapsed_ms = started.elapsed().as_millis() as u64;
    report.mb_per_s = report.bytes as f64 / 1e6 / started.elapsed().as_secs_f64().max(1e-9);
    Ok(report)
}

/// Where `lifeboat restore-snapshot` puts the snapshot.
#[derive(Debug, Clone)]
pub enum SnapshotTarget {
    /// Write it to this file (temp + fsync + rename).
    File(std::path::PathBuf),
    /// Pipe it into this command's stdin (argv, no shell).
    Exec(Vec<String>),
}

/// What `lifeboat restore-snapshot` restored.
#[derive(Debug, Clone, serde::Serialize)]
pub struct SnapshotReport {
    /// Exec source name.
    pub source: String,
    /// Catalog path of the snapshot (`_snapshots/<source>/<timestamp>.snap`).
    pub snapshot: String,
    /// Content bytes.
    pub bytes: u64,
    /// blake3 of the content (verified).
    pub blake3: String,
    /// When the agent took it (RFC 3339, from the snapshot's name).
    pub taken_at: String,
}

/// `20261124T012233Z` → `2026-11-24T01:22:33Z`; `20261124T012233.123Z` →
/// `2026-11-24T01:22:33.123Z`.
fn taken_at(stem: &str) -> Option<String> {
    let b = stem.as_bytes();
    let frac = match b.len() {
        16 => "",
        20 if b[15] == b'.' && b[16..19].iter().all(u8::is_ascii_digit) => &stem[15..19],
        _ => return None,
    };
    let ok = b[8] == b'T'
        && b[b.len() - 1] == b'Z'
        && b[..8].iter().chain(&b[9..15]).all(u8::is_ascii_digit);
    ok.then(|| {
        format!(
            "{}-{}-{}T{}:{}:{}{frac}Z",
            &stem[..4],
            &stem[4..6],
            &stem[6..8],
            &stem[9..11],
            &stem[11..13],
            &stem[13..15]
        )
    })
}

/// Restores the newest snapshot of exec source `source` committed at or before `at_ms` (None =
/// latest) into `target`; `at` is only used in messages.
///
/// Errors: no such snapshot, RPC or verification failures, I/O, or the restore command failing
/// (named in the error).
pub async fn restore_snapshot(
    conn: &ConnArgs,
    source: &str,
    at_ms: Option<i64>,
    at: &str,
    target: SnapshotTarget,
) -> anyhow::Result<SnapshotReport> {
    lifeboat_common::path::validate_rel_path(source)
        .ok()
        .filter(|_| !source.contains('/'))
        .ok_or_else(|| anyhow!("--source {source:?} must be one path component"))?;
    let prefix = format!("_snapshots/{source}/");
    let (rows, addr) = list(conn, &prefix, at_ms, false, false).await?;
    let v = rows
        .into_iter()
        .filter(|v| {
            v.v.kind == EntryKind::File
                && !v.v.deleted
                && v.v.path.starts_with(&prefix)
                && v.v.path.ends_with(".snap")
        })
        .max_by(|a, b| (&a.v.path, a.seq).cmp(&(&b.v.path, b.seq)))
        .ok_or_else(|| {
            anyhow!(
                "no snapshot of exec source {source:?} as of {at} (see `lifeboat ls _snapshots`)"
            )
        })?;
    let name = v.v.path[prefix.len()..].to_string();
    let client = conn.blobs(&addr)?;
    let written = match &target {
        SnapshotTarget::File(path) => {
            let file_name = path
                .file_name()
                .and_then(|n| n.to_str())
                .ok_or_else(|| anyhow!("--to-file {}: needs a UTF-8 file name", path.display()))?;
            let dir = match path.parent() {
                Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
                _ => std::path::PathBuf::from("."),
            };
            let root = dir
                .canonicalize()
                .with_context(|| format!("--to-file: directory {}", dir.display()))?;
            apply::write_file(&client, &root, file_name, &v, ".lifeboat-restore-", false).await?
        }
        SnapshotTarget::Exec(argv) => {
            let tmp = tempfile::tempdir().context("create a temp directory")?;
            let root = tmp.path().canonicalize()?;
            let n = apply::write_file(&client, &root, "snapshot", &v, ".lifeboat-restore-", false)
                .await?;
            let input =
                std::fs::File::open(root.join("snapshot")).context("open the restored snapshot")?;
            let status = tokio::process::Command::new(&argv[0])
                .args(&argv[1..])
                .stdin(std::process::Stdio::from(input))
                .status()
                .await
                .with_context(|| format!("cannot start restore command {argv:?}"))?;
            if !status.success() {
                anyhow::bail!("restore command {argv:?} failed: {status}");
            }
            n
        }
    };
    Ok(SnapshotReport {
        source: source.to_string(),
        snapshot: v.v.path.clone(),
        bytes: written,
        blake3: v.v.blake3.map(|h| h.to_hex()).unwrap_or_default(),
        taken_at: taken_at(name.trim_end_matches(".snap")).unwrap_or_else(|| {
            jiff::Timestamp::from_millisecond(v.commit_time_ms)
                .map(|t| t.to_string())
                .unwrap_or_default()
        }),
    })
}
