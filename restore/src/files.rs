//! `lifeboat restore`: rebuilds every path under a prefix, as of a time, into a target directory.
//!
//! Safety rules (DESIGN.md section 5, rules 4 and 5): every path from the catalog is checked
//! ([`lifeboat_common::path::safe_join`]: no `..`, no absolute path, no existing symlink on the
//! way, so nothing is written through a link); every blob is decoded and its blake3 checked, and
//! every rebuilt file's blake3 is compared with the catalog's; files are written to a temp file in
//! their directory and renamed into place. Symlinks are created last, as links, never followed.
//! The writing itself is [`lifeboat_common::apply`], shared with the agent's replica applier.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use anyhow::{anyhow, Context};
use futures::StreamExt;
use lifeboat_common::apply::{self, mkdirs};
use lifeboat_common::catalog::{EntryKind, FileVersion};
use lifeboat_proto::ListVersionsRequest;

use lifeboat_client::conn::ConnArgs;

/// What a restore does with a local file or symlink already at a path it restores.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Overwrite {
    /// Refuse the whole restore, up front, when any local file would be replaced (nothing is
    /// written). Local files equal to the version (content, mode, mtime) are left as they are.
    #[default]
    Never,
    /// Replace only local entries whose mtime is older than the version's; keep the others.
    Older,
    /// Replace every local entry in the way (a local directory in the way stays an error).
    Always,
}

/// Options of [`restore_with`].
#[derive(Clone, Copy, Debug, Default)]
pub struct RestoreOpts {
    /// Policy for local entries in the way.
    pub overwrite: Overwrite,
    /// Compute and return the plan ([`RestoreReport::plan`]), write nothing.
    pub dry_run: bool,
}

/// What a restore would do with each path (catalog paths, sorted).
#[derive(Debug, Default, Clone, serde::Serialize)]
pub struct RestorePlan {
    /// Paths with nothing local in the way: written.
    pub write: Vec<String>,
    /// Local entries that are replaced (under `older` or `always`), or that make a `never`
    /// restore refuse.
    pub overwrite: Vec<String>,
    /// Local entries kept because they are not older than the version (`older`).
    pub skip_newer: Vec<String>,
    /// Local entries already equal to the version (content, mode and mtime): left alone.
    pub unchanged: Vec<String>,
    /// Local entries that no policy replaces (a directory where a file or symlink goes, or a
    /// non-directory where a directory goes under `never`/`older`).
    pub blocked: Vec<String>,
}

/// How many paths an error message names before "and N more".
const LIST_FIRST: usize = 10;

fn first_paths(paths: &[String]) -> String {
    let mut s = paths
        .iter()
        .take(LIST_FIRST)
        .map(|p| p.as_str())
        .collect::<Vec<_>>()
        .join(", ");
    if paths.len() > LIST_FIRST {
        s.push_str(&format!(" and {} more", paths.len() - LIST_FIRST));
    }
    s
}

/// What to do with one path.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Action {
    Write,
    Overwrite,
    SkipNewer,
    Unchanged,
    Blocked,
}

fn mtime_ns(md: &std::fs::Metadata) -> i64 {
    use std::os::unix::fs::MetadataExt;
    md.mtime()
        .saturating_mul(1_000_000_000)
        .saturating_add(md.mtime_nsec())
}

/// blake3 of a local file, streamed (never held whole in memory).
fn hash_file(p: &Path) -> std::io::Result<lifeboat_common::blob::BlobHash> {
    let mut h = blake3::Hasher::new();
    h.update_reader(std::fs::File::open(p)?)?;
    Ok(lifeboat_common::blob::BlobHash(*h.finalize().as_bytes()))
}

/// Decides what a restore of `v` does with the local entry at `dest` (lstat, never followed).
fn classify(dest: &Path, v: &FileVersion, policy: Overwrite) -> anyhow::Result<Action> {
    use std::os::unix::fs::PermissionsExt;
    let md = match std::fs::symlink_metadata(dest) {
        Ok(md) => md,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Action::Write),
        Err(e) => return Err(e).with_context(|| format!("inspect {}", dest.display())),
    };
    let ft = md.file_type();
    match v.v.kind {
        EntryKind::Dir if ft.is_dir() => return Ok(Action::Write),
        EntryKind::Dir => {
            return Ok(if policy == Overwrite::Always {
                Action::Overwrite
            } else {
                Action::Blocked
            })
        }
        _ if ft.is_dir() => return Ok(Action::Blocked),
        EntryKind::File if ft.is_file() && policy != Overwrite::Always => {
            let same = md.len() == v.v.size
                && md.permissions().mode() & 0o7777 == v.v.mode & 0o7777
                && mtime_ns(&md) == v.v.mtime_ns
                && v.v.blake3.is_some()
                && hash_file(dest).ok() == v.v.blake3;
            if same {
                return Ok(Action::Unchanged);
            }
        }
        EntryKind::Symlink if ft.is_symlink() => {
            let want = v.v.symlink_target.clone().unwrap_or_default();
            if std::fs::read_link(dest).is_ok_and(|t| t.as_os_str() == want.as_str()) {
                return Ok(Action::Unchanged);
            }
        }
        _ => {}
    }
    Ok(match policy {
        Overwrite::Always | Overwrite::Never => Action::Overwrite,
        Overwrite::Older if mtime_ns(&md) < v.v.mtime_ns => Action::Overwrite,
        Overwrite::Older => Action::SkipNewer,
    })
}

/// Plans a restore of `versions` into `to` under `policy`, reading only (lstat, and blake3 of
/// local files of the version's size). A `to` that does not exist means every path is written.
///
/// Errors: a path refused by [`lifeboat_common::path::safe_join`] (a symlink on the way), I/O.
pub fn plan(to: &Path, versions: &[FileVersion], policy: Overwrite) -> anyhow::Result<RestorePlan> {
    let mut p = RestorePlan::default();
    let root = match to.canonicalize() {
        Ok(r) => r,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            p.write = versions.iter().map(|v| v.v.path.clone()).collect();
            p.write.sort();
            return Ok(p);
        }
        Err(e) => return Err(e).with_context(|| format!("target {}", to.display())),
    };
    for v in versions {
        let dest = lifeboat_common::path::safe_join(&root, &v.v.path, true)
            .with_context(|| format!("restore {:?} into {}", v.v.path, to.display()))?;
        let list = match classify(&dest, v, policy)? {
            Action::Write => &mut p.write,
            Action::Overwrite => &mut p.overwrite,
            Action::SkipNewer => &mut p.skip_newer,
            Action::Unchanged => &mut p.unchanged,
            Action::Blocked => &mut p.blocked,
        };
        list.push(v.v.path.clone());
    }
    for l in [
        &mut p.write,
        &mut p.overwrite,
        &mut p.skip_newer,
        &mut p.unchanged,
        &mut p.blocked,
    ] {
        l.sort();
    }
    Ok(p)
}

/// Checks a plan against its policy: `never` refuses any overwrite, every policy refuses a
/// blocked path. The error lists the count and the first paths, and says what to do.
///
/// Errors: the refusal (nothing has been written when it is returned).
pub fn check_plan(plan: &RestorePlan, to: &Path, policy: Overwrite) -> anyhow::Result<()> {
    if !plan.blocked.is_empty() {
        anyhow::bail!(
            "refusing to restore into {}: {} local entries are in the way and would have to be removed (a directory where a file or symlink goes, or a file where a directory goes): {}; nothing was written. Move them away{}",
            to.display(),
            plan.blocked.len(),
            first_paths(&plan.blocked),
            if policy == Overwrite::Always { "" } else { ", or use --overwrite always for files where directories go" }
        );
    }
    if policy == Overwrite::Never && !plan.overwrite.is_empty() {
        anyhow::bail!(
            "refusing to overwrite {} local files in {}: {}; nothing was written. Restore into an empty directory, or pass --overwrite older (replace only files older than the restored version) or --overwrite always; --dry-run shows the plan",
            plan.overwrite.len(),
            to.display(),
            first_paths(&plan.overwrite)
        );
    }
    Ok(())
}

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
    /// Local files and symlinks replaced.
    pub overwritten: u64,
    /// Local files and symlinks kept because they were newer (`--overwrite older`).
    pub skipped_newer: u64,
    /// Local files and symlinks already equal to the version, left alone.
    pub unchanged: u64,
    /// With `dry_run`: the plan (nothing was written).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub plan: Option<RestorePlan>,
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

/// Restores `versions` into `to` through coordinator `addr`, replacing whatever is in the way
/// ([`Overwrite::Always`]): for callers that restore into a directory of their own (demo, bench,
/// tests). `progress` shows a bar. The `lifeboat restore` command uses [`restore_with`].
///
/// Errors: the first failure (path refused, blob corrupted, I/O), naming the path.
pub async fn restore(
    conn: &ConnArgs,
    addr: &str,
    versions: Vec<FileVersion>,
    to: &Path,
    progress: bool,
) -> anyhow::Result<RestoreReport> {
    let opts = RestoreOpts {
        overwrite: Overwrite::Always,
        dry_run: false,
    };
    restore_with(conn, addr, versions, to, progress, opts).await
}

/// Restores `versions` into `to` through coordinator `addr` under `opts`: first plans every
/// path against what is on disk ([`plan`]); `never` refuses up front when anything would be
/// overwritten, `older` leaves local entries that are not older than the version, entries equal
/// to the version are left alone; with `dry_run` returns the plan and writes nothing (not even
/// `to`). `progress` shows a bar.
///
/// Errors: the refusal ([`check_plan`]), or the first failure (path refused, blob corrupted,
/// I/O), naming the path.
pub async fn restore_with(
    conn: &ConnArgs,
    addr: &str,
    versions: Vec<FileVersion>,
    to: &Path,
    progress: bool,
    opts: RestoreOpts,
) -> anyhow::Result<RestoreReport> {
    let started = Instant::now();
    let plan = plan(to, &versions, opts.overwrite)?;
    if opts.dry_run {
        return Ok(RestoreReport {
            overwritten: plan.overwrite.len() as u64,
            skipped_newer: plan.skip_newer.len() as u64,
            unchanged: plan.unchanged.len() as u64,
            plan: Some(plan),
            ..Default::default()
        });
    }
    check_plan(&plan, to, opts.overwrite)?;
    let keep: std::collections::HashSet<&str> = plan
        .skip_newer
        .iter()
        .chain(&plan.unchanged)
        .map(|s| s.as_str())
        .collect();
    let versions: Vec<FileVersion> = versions
        .into_iter()
        .filter(|v| v.v.kind == EntryKind::Dir || !keep.contains(v.v.path.as_str()))
        .collect();
    std::fs::create_dir_all(to).with_context(|| format!("create target {}", to.display()))?;
    let root = to.canonicalize()?;
    let mut report = RestoreReport {
        overwritten: plan.overwrite.len() as u64,
        skipped_newer: plan.skip_newer.len() as u64,
        unchanged: plan.unchanged.len() as u64,
        ..Default::default()
    };
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
    .buffer_unordered(apply::WRITERS);
    while let Some(r) = results.next().await {
        let n = r?;
        report.files += 1;
        report.bytes += n;
        bar.inc(n);
    }
    bar.finish_and_clear();
    for l in &links {
        let target = l.v.symlink_target.clone().unwrap_or_default();
        apply::write_symlink(&root, &l.v.path, &target, l.v.mtime_ns, false)?;
        report.symlinks += 1;
    }
    // Directory modes and mtimes last, deepest first (writing inside changes a dir's mtime).
    apply::set_dir_metas(
        &root,
        dirs.iter()
            .map(|d| (d.v.path.as_str(), d.v.mode, d.v.mtime_ns)),
    )?;
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
    /// What happened to the target: `written`, `overwritten`, `kept-newer` (`--overwrite
    /// older` and the local file is not older), `unchanged` (already equal), `piped` (--exec);
    /// prefixed `would-be-` with `--dry-run` (nothing written, nothing run).
    pub action: String,
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
/// latest) into `target`; `at` is only used in messages. An existing target file is handled by
/// `opts.overwrite` (`never`: refused unless already equal); `opts.dry_run` reports what would
/// happen and writes (or runs) nothing.
///
/// Errors: no such snapshot, the refusal, RPC or verification failures, I/O, or the restore
/// command failing (named in the error).
pub async fn restore_snapshot(
    conn: &ConnArgs,
    source: &str,
    at_ms: Option<i64>,
    at: &str,
    target: SnapshotTarget,
    opts: RestoreOpts,
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
    let (written, action) = match &target {
        SnapshotTarget::File(path) => {
            let file_name = path
                .file_name()
                .and_then(|n| n.to_str())
                .ok_or_else(|| anyhow!("--to-file {}: needs a UTF-8 file name", path.display()))?;
            let dir = match path.parent() {
                Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
                _ => PathBuf::from("."),
            };
            let root = dir
                .canonicalize()
                .with_context(|| format!("--to-file: directory {}", dir.display()))?;
            let dest = lifeboat_common::path::safe_join(&root, file_name, true)
                .with_context(|| format!("--to-file {}", path.display()))?;
            let action = classify(&dest, &v, opts.overwrite)?;
            let what = match action {
                Action::Write => "written",
                Action::Overwrite if opts.overwrite == Overwrite::Never && !opts.dry_run => {
                    anyhow::bail!("refusing to overwrite {}: it exists and differs from snapshot {}; nothing was written. Pass --overwrite older or --overwrite always, or choose another --to-file", path.display(), v.v.path)
                }
                Action::Overwrite if opts.overwrite == Overwrite::Never => "refused",
                Action::Overwrite => "overwritten",
                Action::SkipNewer => "kept-newer",
                Action::Unchanged => "unchanged",
                Action::Blocked => anyhow::bail!(
                    "--to-file {}: a directory is in the way; nothing was written",
                    path.display()
                ),
            };
            let n = if opts.dry_run || matches!(action, Action::SkipNewer | Action::Unchanged) {
                0
            } else {
                apply::write_file(&client, &root, file_name, &v, ".lifeboat-restore-", false)
                    .await?
            };
            (n, what)
        }
        SnapshotTarget::Exec(_) if opts.dry_run => (0, "piped"),
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
            (n, "piped")
        }
    };
    let action = if opts.dry_run {
        format!("would-be-{action}")
    } else {
        action.to_string()
    };
    Ok(SnapshotReport {
        source: source.to_string(),
        snapshot: v.v.path.clone(),
        bytes: if opts.dry_run { v.v.size } else { written },
        blake3: v.v.blake3.map(|h| h.to_hex()).unwrap_or_default(),
        taken_at: taken_at(name.trim_end_matches(".snap")).unwrap_or_else(|| {
            jiff::Timestamp::from_millisecond(v.commit_time_ms)
                .map(|t| t.to_string())
                .unwrap_or_default()
        }),
        action,
    })
}
