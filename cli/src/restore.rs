//! `lifeboat restore`: rebuilds every path under a prefix, as of a time, into a target directory.
//!
//! Safety rules (DESIGN.md section 5, rules 4 and 5): every path from the catalog is checked
//! ([`lifeboat_common::path::safe_join`]: no `..`, no absolute path, no existing symlink on the
//! way, so nothing is written through a link); every blob is decoded and its blake3 checked, and
//! every rebuilt file's blake3 is compared with the catalog's; files are written to a temp file in
//! their directory and renamed into place. Symlinks are created last, as links, never followed.

use std::collections::HashMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use anyhow::{anyhow, bail, Context};
use futures::StreamExt;
use lifeboat_common::blob::{self, BlobHash};
use lifeboat_common::catalog::{EntryKind, FileVersion};
use lifeboat_common::path::safe_join;
use lifeboat_proto::{FetchBlobsRequest, ListVersionsRequest};

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

type BlobClient = lifeboat_proto::blob_service_client::BlobServiceClient<tonic::transport::Channel>;

async fn fetch_part(client: &BlobClient, hash: &BlobHash, verify: bool) -> anyhow::Result<Vec<u8>> {
    let mut c = client.clone();
    let mut req = tonic::Request::new(FetchBlobsRequest {
        hashes: vec![hash.to_hex()],
    });
    if verify {
        req.metadata_mut()
            .insert("x-lifeboat-verify", "1".parse().expect("ascii"));
    }
    let mut s = c
        .fetch_blobs(req)
        .await
        .map_err(|e| anyhow!("fetch blob {hash}: {}", e.message()))?
        .into_inner();
    let b = s
        .next()
        .await
        .ok_or_else(|| anyhow!("blob {hash}: empty reply"))?
        .map_err(|e| anyhow!("fetch blob {hash}: {}", e.message()))?;
    Ok(b.stored)
}

/// Fetches and verifies one blob; on a verification failure asks the coordinator to verify and
/// repair from its peers once, then fails with a corruption error naming the blob.
async fn get_part(client: &BlobClient, hash: &BlobHash, path: &str) -> anyhow::Result<Vec<u8>> {
    let stored = fetch_part(client, hash, false).await?;
    let h = *hash;
    match tokio::task::spawn_blocking(move || blob::decode(&h, &stored, lifeboat_common::PART_SIZE))
        .await?
    {
        Ok(raw) => Ok(raw),
        Err(first) => {
            let stored = fetch_part(client, hash, true)
                .await
                .map_err(|e| anyhow!("{path}: {first}; no intact copy on any coordinator ({e})"))?;
            blob::decode(hash, &stored, lifeboat_common::PART_SIZE)
                .map_err(|e| anyhow!("{path}: {e}; no intact copy found. Restore an older version (--at) or from another region"))
        }
    }
}

fn mkdirs(root: &Path, rel: &str) -> anyhow::Result<PathBuf> {
    let p = safe_join(root, rel, false)?;
    match std::fs::symlink_metadata(&p) {
        Ok(m) if m.is_dir() => {}
        Ok(_) => {
            std::fs::remove_file(&p)
                .with_context(|| format!("replace {} with a directory", p.display()))?;
            std::fs::create_dir(&p)?;
        }
        Err(_) => {
            if let Some((parent, _)) = rel.rsplit_once('/') {
                mkdirs(root, parent)?;
            }
            std::fs::create_dir(&p)
                .or_else(|e| if p.is_dir() { Ok(()) } else { Err(e) })
                .with_context(|| format!("create {}", p.display()))?;
        }
    }
    Ok(p)
}

async fn restore_file(client: &BlobClient, root: &Path, v: &FileVersion) -> anyhow::Result<u64> {
    if let Some((parent, _)) = v.v.path.rsplit_once('/') {
        mkdirs(root, parent)?;
    }
    let dest = safe_join(root, &v.v.path, true)?;
    let dir = dest
        .parent()
        .expect("joined path has a parent")
        .to_path_buf();
    let mut tmp = tempfile::Builder::new()
        .prefix(".lifeboat-restore-")
        .tempfile_in(&dir)?;
    let mut hasher = blake3::Hasher::new();
    // One request streams every part in order; up to 4 parts decode in parallel while the
    // previous ones are written. A part that fails to decode is fetched again with verification
    // (and repair) on the coordinator.
    let hashes: Vec<String> = v.v.parts.iter().map(|p| p.hash.to_hex()).collect();
    let stream = if hashes.is_empty() {
        None
    } else {
        Some(
            client
                .clone()
                .fetch_blobs(FetchBlobsRequest { hashes })
                .await
                .map_err(|e| anyhow!("{}: fetch blobs: {}", v.v.path, e.message()))?
                .into_inner(),
        )
    };
    let decoded = futures::stream::iter(stream)
        .flatten()
        .zip(futures::stream::iter(v.v.parts.iter().cloned()))
        .map(|(item, part)| async move {
            let stored = match item {
                Ok(b) => b.stored,
                Err(_) => {
                    return get_part(client, &part.hash, &v.v.path)
                        .await
                        .map(|raw| (part, raw))
                }
            };
            let h = part.hash;
            match tokio::task::spawn_blocking(move || {
                blob::decode(&h, &stored, lifeboat_common::PART_SIZE)
            })
            .await?
            {
                Ok(raw) => Ok((part, raw)),
                Err(_) => get_part(client, &part.hash, &v.v.path)
                    .await
                    .map(|raw| (part, raw)),
            }
        })
        .buffered(4);
    futures::pin_mut!(decoded);
    let mut parts_done = 0;
    while let Some(r) = decoded.next().await {
        let (part, raw) = r?;
        if raw.len() as u64 != part.size {
            bail!(
                "{}: part {} has {} bytes, catalog says {}",
                v.v.path,
                part.hash,
                raw.len(),
                part.size
            );
        }
        hasher.update(&raw);
        tmp.write_all(&raw)?;
        parts_done += 1;
    }
    if parts_done != v.v.parts.len() {
        bail!(
            "{}: the coordinator sent {parts_done} of {} parts",
            v.v.path,
            v.v.parts.len()
        );
    }
    let got = BlobHash(*hasher.finalize().as_bytes());
    if Some(got) != v.v.blake3 {
        bail!(
            "{}: restored content hashes to {got}, catalog says {}; the version is corrupted",
            v.v.path,
            v.v.blake3.map(|h| h.to_hex()).unwrap_or_default()
        );
    }
    use std::os::unix::fs::PermissionsExt;
    let f = tmp.as_file();
    f.set_permissions(std::fs::Permissions::from_mode(v.v.mode & 0o7777))?;
    f.set_modified(mtime(v.v.mtime_ns))?;
    f.sync_all()?;
    // rename(2) replaces a symlink entry itself, never its target.
    tmp.persist(&dest)
        .map_err(|e| anyhow!("rename into {}: {}", dest.display(), e.error))?;
    Ok(v.v.size)
}

fn mtime(ns: i64) -> std::time::SystemTime {
    if ns >= 0 {
        std::time::UNIX_EPOCH + std::time::Duration::from_nanos(ns as u64)
    } else {
        std::time::UNIX_EPOCH - std::time::Duration::from_nanos(ns.unsigned_abs())
    }
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
        async move { restore_file(&client, &root, &v).await }
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
        if let Some((parent, _)) = l.v.path.rsplit_once('/') {
            mkdirs(&root, parent)?;
        }
        let dest = safe_join(&root, &l.v.path, true)?;
        if let Ok(m) = std::fs::symlink_metadata(&dest) {
            if m.is_dir() {
                bail!("{}: a directory is in the way of a symlink", l.v.path);
            }
            std::fs::remove_file(&dest)?;
        }
        std::os::unix::fs::symlink(&target, &dest)
            .with_context(|| format!("create symlink {}", dest.display()))?;
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
            use std::os::unix::fs::PermissionsExt;
            let p = safe_join(&root, &d.v.path, false)?;
            std::fs::set_permissions(&p, std::fs::Permissions::from_mode(d.v.mode & 0o7777))?;
            if let Ok(f) = std::fs::File::open(&p) {
                let _ = f.set_modified(mtime(d.v.mtime_ns));
            }
        }
    }
    report.elapsed_ms = started.elapsed().as_millis() as u64;
    report.mb_per_s = report.bytes as f64 / 1e6 / started.elapsed().as_secs_f64().max(1e-9);
    Ok(report)
}
