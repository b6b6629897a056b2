//! Writing verified catalog versions into a directory ("root"): shared by `lifeboat restore` and
//! the agent's warm-standby replica applier.
//!
//! Safety rules 5 and 6 of docs/failover.md: every path goes through
//! [`crate::path::safe_join`] (no `..`, no absolute path, no existing symlink on the way, so
//! nothing is written through a link); every blob is decoded and its blake3 checked
//! ([`crate::blob::decode`]), and every rebuilt file's blake3 is compared with the catalog's;
//! files are written to a temp file in their directory, fsync'd, given their mode and mtime, then
//! renamed into place. Symlinks are created as links, never followed.

use std::io::Write;
use std::path::{Path, PathBuf};

use futures::StreamExt;
use lifeboat_proto::blob_service_client::BlobServiceClient;
use lifeboat_proto::FetchBlobsRequest;
use tonic::transport::Channel;

use crate::blob::{self, BlobHash};
use crate::catalog::FileVersion;
use crate::path::{safe_join, PathError};

/// Files a restore or a replica batch writes at the same time (each one fetch stream, one temp
/// file and one fsync, so most of a writer's time is spent waiting on the disk).
pub const WRITERS: usize = 12;

/// The blob client files are fetched with.
pub type BlobClient = BlobServiceClient<Channel>;

/// Why a version could not be written.
#[derive(Debug, thiserror::Error)]
pub enum ApplyError {
    /// The path was refused (bad path or a symlink component): retrying cannot help.
    #[error(transparent)]
    Path(#[from] PathError),
    /// A filesystem operation failed.
    #[error("{context}: {error}")]
    Io {
        /// What was being done, naming the path.
        context: String,
        /// Cause.
        error: std::io::Error,
    },
    /// A blob could not be fetched (RPC failure).
    #[error("{0}")]
    Fetch(String),
    /// A blob or the rebuilt file did not verify.
    #[error("{0}")]
    Corrupt(String),
}

fn io(context: impl FnOnce() -> String) -> impl FnOnce(std::io::Error) -> ApplyError {
    move |error| ApplyError::Io {
        context: context(),
        error,
    }
}

/// A time from ns since the Unix epoch (negative: before it).
pub fn mtime(ns: i64) -> std::time::SystemTime {
    if ns >= 0 {
        std::time::UNIX_EPOCH + std::time::Duration::from_nanos(ns as u64)
    } else {
        std::time::UNIX_EPOCH - std::time::Duration::from_nanos(ns.unsigned_abs())
    }
}

async fn fetch_part(
    client: &BlobClient,
    hash: &BlobHash,
    verify: bool,
) -> Result<Vec<u8>, ApplyError> {
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
        .map_err(|e| ApplyError::Fetch(format!("fetch blob {hash}: {}", e.message())))?
        .into_inner();
    let b = s
        .next()
        .await
        .ok_or_else(|| ApplyError::Fetch(format!("blob {hash}: empty reply")))?
        .map_err(|e| ApplyError::Fetch(format!("fetch blob {hash}: {}", e.message())))?;
    Ok(b.stored)
}

async fn decode_blocking(hash: BlobHash, stored: Vec<u8>) -> Result<Vec<u8>, ApplyError> {
    tokio::task::spawn_blocking(move || blob::decode(&hash, &stored, crate::PART_SIZE))
        .await
        .map_err(|e| ApplyError::Fetch(format!("decode task: {e}")))?
        .map_err(|e| ApplyError::Corrupt(e.to_string()))
}

/// Fetches and verifies one blob; on a verification failure asks the coordinator to verify and
/// repair from its peers once, then fails with a corruption error naming the blob.
///
/// Errors: [`ApplyError::Fetch`], [`ApplyError::Corrupt`].
pub async fn get_part(
    client: &BlobClient,
    hash: &BlobHash,
    path: &str,
) -> Result<Vec<u8>, ApplyError> {
    let stored = fetch_part(client, hash, false).await?;
    match decode_blocking(*hash, stored).await {
        Ok(raw) => Ok(raw),
        Err(first) => {
            let stored = fetch_part(client, hash, true).await.map_err(|e| {
                ApplyError::Fetch(format!(
                    "{path}: {first}; no intact copy on any coordinator ({e})"
                ))
            })?;
            blob::decode(hash, &stored, crate::PART_SIZE).map_err(|e| {
                ApplyError::Corrupt(format!("{path}: {e}; no intact copy found. Restore an older version (--at) or from another region"))
            })
        }
    }
}

/// Creates directory `rel` (and its parents) under `root`, replacing a non-directory in the way.
/// Returns its path. Safe to run concurrently for overlapping paths (a directory another call
/// created meanwhile is fine).
///
/// Errors: [`ApplyError::Path`] for a refused path, [`ApplyError::Io`].
pub fn mkdirs(root: &Path, rel: &str) -> Result<PathBuf, ApplyError> {
    let p = safe_join(root, rel, false)?;
    match std::fs::symlink_metadata(&p) {
        Ok(m) if m.is_dir() => {}
        Ok(_) => {
            // Another writer of the same batch may have replaced it already.
            std::fs::remove_file(&p)
                .or_else(|e| {
                    if e.kind() == std::io::ErrorKind::NotFound {
                        Ok(())
                    } else {
                        Err(e)
                    }
                })
                .map_err(io(|| format!("replace {} with a directory", p.display())))?;
            std::fs::create_dir(&p)
                .or_else(|e| if p.is_dir() { Ok(()) } else { Err(e) })
                .map_err(io(|| format!("create {}", p.display())))?;
        }
        Err(_) => {
            if let Some((parent, _)) = rel.rsplit_once('/') {
                mkdirs(root, parent)?;
            }
            std::fs::create_dir(&p)
                .or_else(|e| if p.is_dir() { Ok(()) } else { Err(e) })
                .map_err(io(|| format!("create {}", p.display())))?;
        }
    }
    Ok(p)
}

/// Writes file version `v` at `rel` under `root` (`rel` is `v`'s path, or that path with its root
/// name stripped): parents created, content fetched through `client` part by part (one request,
/// up to 4 parts decoded in parallel, a part that fails to decode fetched again with
/// verification), every part and the whole file verified, a temp file named `temp_prefix…` in
/// the destination directory fsync'd with mode and mtime set, then renamed into place
/// (`rename(2)` replaces a symlink entry itself, never its target). A directory in the way is
/// replaced only if `replace_dir`. Returns the content bytes written.
///
/// Errors: the first failure, naming the path.
pub async fn write_file(
    client: &BlobClient,
    root: &Path,
    rel: &str,
    v: &FileVersion,
    temp_prefix: &str,
    replace_dir: bool,
) -> Result<u64, ApplyError> {
    if let Some((parent, _)) = rel.rsplit_once('/') {
        mkdirs(root, parent)?;
    }
    let dest = safe_join(root, rel, true)?;
    let dir = dest
        .parent()
        .expect("joined path has a parent")
        .to_path_buf();
    let mut tmp = tempfile::Builder::new()
        .prefix(temp_prefix)
        .tempfile_in(&dir)
        .map_err(io(|| format!("create a temp file in {}", dir.display())))?;
    let mut hasher = blake3::Hasher::new();
    let hashes: Vec<String> = v.v.parts.iter().map(|p| p.hash.to_hex()).collect();
    let stream = if hashes.is_empty() {
        None
    } else {
        Some(
            client
                .clone()
                .fetch_blobs(FetchBlobsRequest { hashes })
                .await
                .map_err(|e| {
                    ApplyError::Fetch(format!("{}: fetch blobs: {}", v.v.path, e.message()))
                })?
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
            match decode_blocking(part.hash, stored).await {
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
            return Err(ApplyError::Corrupt(format!(
                "{}: part {} has {} bytes, catalog says {}",
                v.v.path,
                part.hash,
                raw.len(),
                part.size
            )));
        }
        hasher.update(&raw);
        tmp.write_all(&raw)
            .map_err(io(|| format!("write {}", tmp.path().display())))?;
        parts_done += 1;
    }
    if parts_done != v.v.parts.len() {
        return Err(ApplyError::Fetch(format!(
            "{}: the coordinator sent {parts_done} of {} parts",
            v.v.path,
            v.v.parts.len()
        )));
    }
    let got = BlobHash(*hasher.finalize().as_bytes());
    if Some(got) != v.v.blake3 {
        return Err(ApplyError::Corrupt(format!(
            "{}: restored content hashes to {got}, catalog says {}; the version is corrupted",
            v.v.path,
            v.v.blake3.map(|h| h.to_hex()).unwrap_or_default()
        )));
    }
    use std::os::unix::fs::PermissionsExt;
    let f = tmp.as_file();
    let ctx = || format!("finish {}", dest.display());
    f.set_permissions(std::fs::Permissions::from_mode(v.v.mode & 0o7777))
        .map_err(io(ctx))?;
    f.set_modified(mtime(v.v.mtime_ns)).map_err(io(ctx))?;
    f.sync_all().map_err(io(ctx))?;
    if replace_dir {
        remove_dir_in_way(&dest)?;
    }
    tmp.persist(&dest).map_err(|e| ApplyError::Io {
        context: format!("rename into {}", dest.display()),
        error: e.error,
    })?;
    Ok(v.v.size)
}

/// Removes a directory (recursively; symlinks inside are removed, never followed) at `p`.
fn remove_dir_in_way(p: &Path) -> Result<(), ApplyError> {
    match std::fs::symlink_metadata(p) {
        Ok(m) if m.is_dir() => {
            tracing::info!(path = %p.display(), "removing a directory in the way of a file or symlink");
            std::fs::remove_dir_all(p).map_err(io(|| format!("remove directory {}", p.display())))
        }
        _ => Ok(()),
    }
}

/// Creates symlink `rel` under `root` with `target` (verbatim, never resolved), replacing an
/// existing non-directory entry (the link itself, never its target), and gives the link itself
/// mtime `mtime_ns` (ns since the Unix epoch; `utimensat(AT_SYMLINK_NOFOLLOW)`, best effort: a
/// filesystem that cannot set it is logged, the link stays). A directory in the way is an error
/// unless `replace_dir`.
///
/// Errors: [`ApplyError`].
pub fn write_symlink(
    root: &Path,
    rel: &str,
    target: &str,
    mtime_ns: i64,
    replace_dir: bool,
) -> Result<(), ApplyError> {
    if let Some((parent, _)) = rel.rsplit_once('/') {
        mkdirs(root, parent)?;
    }
    let dest = safe_join(root, rel, true)?;
    if let Ok(m) = std::fs::symlink_metadata(&dest) {
        if m.is_dir() {
            if !replace_dir {
                return Err(ApplyError::Io {
                    context: rel.to_string(),
                    error: std::io::Error::other("a directory is in the way of a symlink"),
                });
            }
            remove_dir_in_way(&dest)?;
        } else {
            std::fs::remove_file(&dest).map_err(io(|| format!("remove {}", dest.display())))?;
        }
    }
    std::os::unix::fs::symlink(target, &dest)
        .map_err(io(|| format!("create symlink {}", dest.display())))?;
    set_symlink_mtime(&dest, mtime_ns);
    Ok(())
}

/// Sets the mtime of the symlink at `p` itself (never its target), keeping its atime; best
/// effort (logged).
fn set_symlink_mtime(p: &Path, mtime_ns: i64) {
    let res = std::fs::symlink_metadata(p).and_then(|md| {
        let atime = filetime::FileTime::from_last_access_time(&md);
        let m = filetime::FileTime::from_system_time(mtime(mtime_ns));
        filetime::set_symlink_file_times(p, atime, m)
    });
    if let Err(e) = res {
        tracing::warn!(path = %p.display(), error = %e, "cannot set the mtime of a symlink");
    }
}

/// Sets mode and mtime of directory `rel` under `root` (mtime best effort).
///
/// Errors: [`ApplyError`].
pub fn set_dir_meta(root: &Path, rel: &str, mode: u32, mtime_ns: i64) -> Result<(), ApplyError> {
    use std::os::unix::fs::PermissionsExt;
    let p = safe_join(root, rel, false)?;
    std::fs::set_permissions(&p, std::fs::Permissions::from_mode(mode & 0o7777))
        .map_err(io(|| format!("chmod {}", p.display())))?;
    if let Ok(f) = std::fs::File::open(&p) {
        let _ = f.set_modified(mtime(mtime_ns));
    }
    Ok(())
}

/// Sets mode and mtime of every directory `(rel, mode, mtime_ns)` of `dirs` under `root`
/// ([`set_dir_meta`]), deepest first. Meant to run after the entries inside them are written
/// (creating or renaming an entry sets its directory's mtime to "now").
///
/// Errors: the first [`ApplyError`] (later directories are left as they are).
pub fn set_dir_metas<'a>(
    root: &Path,
    dirs: impl IntoIterator<Item = (&'a str, u32, i64)>,
) -> Result<(), ApplyError> {
    let mut dirs: Vec<_> = dirs.into_iter().collect();
    dirs.sort_by_key(|(rel, _, _)| std::cmp::Reverse(rel.matches('/').count()));
    for (rel, mode, mtime_ns) in dirs {
        set_dir_meta(root, rel, mode, mtime_ns)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn symlinks_and_dirs_never_follow_links() {
        let d = tempfile::tempdir().unwrap();
        let outside = tempfile::tempdir().unwrap();
        let root = d.path();
        mkdirs(root, "a/b").unwrap();
        assert!(root.join("a/b").is_dir());
        write_symlink(root, "a/l", "../../x", 1_500_000_000_123_456_789, false).unwrap();
        assert_eq!(
            std::fs::read_link(root.join("a/l")).unwrap(),
            PathBuf::from("../../x")
        );
        // The link's own mtime, to the ns.
        use std::os::unix::fs::MetadataExt;
        let md = std::fs::symlink_metadata(root.join("a/l")).unwrap();
        assert_eq!((md.mtime(), md.mtime_nsec()), (1_500_000_000, 123_456_789));
        // Replaced, not followed.
        write_symlink(root, "a/l", "y", 0, false).unwrap();
        assert_eq!(
            std::fs::read_link(root.join("a/l")).unwrap(),
            PathBuf::from("y")
        );
        // A directory in the way only goes when allowed.
        assert!(write_symlink(root, "a/b", "z", 0, false).is_err());
        write_symlink(root, "a/b", "z", 0, true).unwrap();
        // A planted link to the outside is refused as a component.
        std::os::unix::fs::symlink(outside.path(), root.join("evil")).unwrap();
        assert!(matches!(
            mkdirs(root, "evil/sub"),
            Err(ApplyError::Path(PathError::SymlinkComponent { .. }))
        ));
        assert!(matches!(
            write_symlink(root, "evil/l", "t", 0, true),
            Err(ApplyError::Path(_))
        ));
        assert_eq!(std::fs::read_dir(outside.path()).unwrap().count(), 0);
        set_dir_metas(root, [("a", 0o750, 0), ("a/b2", 0o700, 7)]).unwrap_err();
        mkdirs(root, "a/b2").unwrap();
        set_dir_metas(root, [("a", 0o750, 0), ("a/b2", 0o700, 7)]).unwrap();
        // Deepest first: creating nothing, the parent keeps its mtime.
        assert_eq!(std::fs::metadata(root.join("a")).unwrap().mtime(), 0);
        assert_eq!(
            std::fs::metadata(root.join("a/b2")).unwrap().mtime_nsec(),
            7
        );
        use std::os::unix::fs::PermissionsExt;
        assert_eq!(
            std::fs::metadata(root.join("a"))
                .unwrap()
                .permissions()
                .mode()
                & 0o7777,
            0o750
        );
    }
}
