//! Protected roots' health and the mass-deletion guard (issue 15).
//!
//! **Root identity.** The first time a protected root (or a replica directory) is seen as a
//! directory, its identity `(st_dev, st_ino)` is recorded in the agent's state (like Vector's
//! file-source fingerprints: the path alone does not say it is the same directory). A root that
//! is missing, not a directory, or a directory with another identity (a volume not mounted, an
//! empty mount point, a directory moved in) is **unhealthy**: nothing under it is planned (no
//! upsert, no tombstone), it is never recreated, `status.json` (`roots`) and the heartbeat's
//! checks (`root:<name>`, failing, so the region's health shows it) report it. When the
//! recorded directory is back, the root is healthy again and rescanned (unchanged files send
//! nothing). A replaced root whose state holds no entry adopts the new identity silently;
//! otherwise only `lifeboat-agent accept-deletions --root NAME` adopts it (audited).
//!
//! **Mass-deletion guard.** Deletions planned for a `[[paths]]` root are collected until the
//! work queue drains, then counted: more than `max_delete_files`, or (from [`SHARE_RULE_MIN`]
//! deletions on) more than `max_delete_share` of the root's acknowledged entries, and the whole
//! set is **held**: not pushed, reported in `status.json` under a hold id (blake3 of the root
//! name and the sorted paths) and in the `root:<name>` check's detail (still ok: nothing is
//! lost). `lifeboat-agent accept-deletions --root NAME` writes an acceptance for that hold id
//! ([`Acceptance`], `<data_dir>/accept-deletions/<root>.json`); the agent pushes the held set
//! only when its id matches (a set that changed meanwhile needs a new acceptance), logs the
//! acceptance (`audit`) and lists it in `status.json` (`accepted_deletions`). Snapshot-root
//! deletions (retention) are not guarded.

use std::io::Write;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::config::{Config, PathConfig};

/// The share rule applies only from this many deletions on (small roots can lose a few files).
pub const SHARE_RULE_MIN: u64 = 10;
/// Directory of acceptance files inside `data_dir`.
pub const ACCEPT_DIR: &str = "accept-deletions";
/// Paths listed as a sample of a held set in `status.json`.
pub const HELD_SAMPLE: usize = 5;

/// Thresholds of one root.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Limits {
    /// Largest share (0 < share <= 1) of the acknowledged entries one set may delete.
    pub share: f64,
    /// Largest number of deletions in one set.
    pub files: u64,
}

impl Limits {
    /// The thresholds of root `p` (its own, else the global ones of `cfg`).
    pub fn for_root(cfg: &Config, p: Option<&PathConfig>) -> Limits {
        Limits {
            share: p
                .and_then(|p| p.max_delete_share)
                .unwrap_or(cfg.max_delete_share),
            files: p
                .and_then(|p| p.max_delete_files)
                .unwrap_or(cfg.max_delete_files),
        }
    }

    /// Whether `deletions` out of `tracked` acknowledged entries must be held.
    pub fn exceeded(&self, deletions: u64, tracked: u64) -> bool {
        deletions > self.files
            || (deletions >= SHARE_RULE_MIN
                && deletions as f64 > self.share * tracked.max(deletions) as f64)
    }
}

/// Why a root (or replica directory) is unhealthy.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RootProblem {
    /// Nothing at the path.
    #[error("{0} is missing (volume not mounted? moved away?); nothing under it is sent or deleted, and it is not recreated: put the directory back")]
    Missing(PathBuf),
    /// Something other than a directory at the path.
    #[error("{0} is not a directory; nothing under it is sent or deleted: put the directory back")]
    NotADirectory(PathBuf),
    /// A directory with another identity than recorded.
    #[error("{path} is another directory than the one protected (device/inode {}/{} recorded, {}/{} found: an empty mount point?); nothing under it is sent or deleted: mount or put back the original, or adopt it with `lifeboat-agent accept-deletions --root NAME`", recorded.0, recorded.1, found.0, found.1)]
    Replaced {
        /// The root path.
        path: PathBuf,
        /// Recorded `(st_dev, st_ino)`.
        recorded: (u64, u64),
        /// Found `(st_dev, st_ino)`.
        found: (u64, u64),
    },
    /// `stat` failed otherwise.
    #[error("{path}: cannot stat: {error}")]
    Unreadable {
        /// The root path.
        path: PathBuf,
        /// The I/O error.
        error: String,
    },
}

impl RootProblem {
    /// Short kind for `status.json`: `missing`, `not_a_directory`, `replaced`, `unreadable`.
    pub fn kind(&self) -> &'static str {
        match self {
            RootProblem::Missing(_) => "missing",
            RootProblem::NotADirectory(_) => "not_a_directory",
            RootProblem::Replaced { .. } => "replaced",
            RootProblem::Unreadable { .. } => "unreadable",
        }
    }
}

/// The identity `(st_dev, st_ino)` of the directory at `path` (symlinks followed), checked
/// against `recorded`.
///
/// Errors: the [`RootProblem`].
pub fn check_dir(path: &Path, recorded: Option<(u64, u64)>) -> Result<(u64, u64), RootProblem> {
    let m = match std::fs::metadata(path) {
        Ok(m) => m,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            return Err(RootProblem::Missing(path.to_path_buf()))
        }
        Err(e) if e.raw_os_error() == Some(20) => {
            // ENOTDIR: a component is a file.
            return Err(RootProblem::Missing(path.to_path_buf()));
        }
        Err(e) => {
            return Err(RootProblem::Unreadable {
                path: path.to_path_buf(),
                error: e.to_string(),
            })
        }
    };
    if !m.is_dir() {
        return Err(RootProblem::NotADirectory(path.to_path_buf()));
    }
    let found = (m.dev(), m.ino());
    match recorded {
        Some(r) if r != found => Err(RootProblem::Replaced {
            path: path.to_path_buf(),
            recorded: r,
            found,
        }),
        _ => Ok(found),
    }
}

/// The hold id of deleting `paths` (sorted) under root `root`: 16 hex digits of a blake3.
pub fn hold_id<'a>(root: &str, paths: impl IntoIterator<Item = &'a String>) -> String {
    let mut h = blake3::Hasher::new();
    h.update(root.as_bytes());
    h.update(&[0]);
    let mut n = 0u64;
    for p in paths {
        h.update(p.as_bytes());
        h.update(&[0]);
        n += 1;
    }
    h.update(&n.to_le_bytes());
    h.finalize().to_hex()[..16].to_string()
}

/// An operator's acceptance, written by `lifeboat-agent accept-deletions`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Acceptance {
    /// Root name.
    pub root: String,
    /// Hold id of the held set it accepts (none: only `adopt`).
    #[serde(default)]
    pub hold: Option<String>,
    /// `(st_dev, st_ino)` of a replaced root to adopt as the root's identity.
    #[serde(default)]
    pub adopt: Option<(u64, u64)>,
    /// Who accepted (the `USER` of the command).
    pub by: String,
    /// When, ms since the Unix epoch.
    pub at_ms: i64,
}

/// Path of the acceptance file of root `root`.
pub fn acceptance_path(data_dir: &Path, root: &str) -> PathBuf {
    data_dir.join(ACCEPT_DIR).join(format!("{root}.json"))
}

/// Writes `a` atomically (temp + fsync + rename, directory fsync'd).
///
/// Errors: I/O errors.
pub fn write_acceptance(data_dir: &Path, a: &Acceptance) -> std::io::Result<()> {
    let dir = data_dir.join(ACCEPT_DIR);
    std::fs::create_dir_all(&dir)?;
    let dest = acceptance_path(data_dir, &a.root);
    let tmp = dir.join(format!(".{}.{}.tmp", a.root, std::process::id()));
    let body = serde_json::to_vec_pretty(a).map_err(std::io::Error::other)?;
    let mut f = std::fs::File::create(&tmp)?;
    f.write_all(&body)?;
    f.sync_all()?;
    drop(f);
    std::fs::rename(&tmp, &dest)?;
    std::fs::File::open(&dir)?.sync_all()
}

/// Reads the acceptance of root `root`: `None` when there is none.
///
/// Errors: I/O errors, `InvalidData` for a malformed file.
pub fn read_acceptance(data_dir: &Path, root: &str) -> std::io::Result<Option<Acceptance>> {
    match std::fs::read(acceptance_path(data_dir, root)) {
        Ok(b) => serde_json::from_slice(&b)
            .map(Some)
            .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidData, e)),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(e),
    }
}

/// Removes the acceptance of root `root` (used or stale); a missing one is fine.
pub fn remove_acceptance(data_dir: &Path, root: &str) {
    match std::fs::remove_file(acceptance_path(data_dir, root)) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => tracing::warn!(root, error = %e, "cannot remove the acceptance file"),
    }
}

/// A held set of deletions, as `status.json` shows it.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct HeldDeletions {
    /// The id `accept-deletions` names.
    pub hold: String,
    /// Deletions held.
    pub deletions: u64,
    /// Acknowledged entries under the root.
    pub tracked: u64,
    /// A few of the paths.
    pub sample: Vec<String>,
}

/// One protected root or replica directory in `status.json` (`roots`).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct RootStatus {
    /// Catalog root name.
    pub name: String,
    /// Directory.
    pub path: String,
    /// `source` (a `[[paths]]` root) or `replica`.
    pub kind: String,
    /// False while missing, not a directory or replaced.
    pub healthy: bool,
    /// [`RootProblem::kind`] (empty when healthy).
    #[serde(default)]
    pub problem_kind: String,
    /// What is wrong and what to do (empty when healthy).
    #[serde(default)]
    pub problem: String,
    /// Deletions held by the guard.
    #[serde(default)]
    pub held: Option<HeldDeletions>,
}

/// An accepted mass deletion (audit entry in `status.json`, `accepted_deletions`).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct AcceptedDeletions {
    /// Root name.
    pub root: String,
    /// Hold id accepted (empty for an adoption).
    pub hold: String,
    /// Deletions released.
    pub deletions: u64,
    /// Adopted identity, `"dev/ino"` (empty for a hold).
    #[serde(default)]
    pub adopted: String,
    /// Who accepted.
    pub by: String,
    /// When it was accepted, ms since the Unix epoch.
    pub at_ms: i64,
}

/// Checks the replica (or resolved source) directory `path` before applying to it: a directory
/// the state knows as populated (`populated`) is never recreated and must keep its recorded
/// identity (`key` in the state); an unpopulated one is created when `create`. Records the
/// identity when none is recorded.
///
/// Errors: the [`RootProblem`] (then nothing may be applied), or a state failure as
/// [`RootProblem::Unreadable`].
pub fn replica_dir_ready(
    state: &crate::files::state::StateDb,
    key: &str,
    path: &Path,
    populated: bool,
    create: bool,
) -> Result<(), RootProblem> {
    let unreadable = |e: String| RootProblem::Unreadable {
        path: path.to_path_buf(),
        error: e,
    };
    let recorded = state.root_id(key).map_err(|e| unreadable(e.to_string()))?;
    let res = match check_dir(path, recorded) {
        Err(RootProblem::Missing(_)) if create && !populated => {
            std::fs::create_dir_all(path).map_err(|e| unreadable(e.to_string()))?;
            check_dir(path, None)
        }
        Err(RootProblem::Replaced { found, .. }) if !populated => Ok(found),
        r => r,
    };
    let id = res?;
    if recorded != Some(id) {
        state
            .set_root_id(key, id)
            .map_err(|e| unreadable(e.to_string()))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn limits_hold_large_shares_and_counts() {
        let l = Limits {
            share: 0.5,
            files: 1000,
        };
        assert!(!l.exceeded(1, 2), "one of two files: below the share");
        assert!(!l.exceeded(9, 9), "below the share rule's minimum");
        assert!(l.exceeded(575, 576));
        assert!(!l.exceeded(288, 576));
        assert!(l.exceeded(289, 576));
        assert!(l.exceeded(1001, 1_000_000));
        assert!(!l.exceeded(1000, 1_000_000));
        assert!(l.exceeded(10, 0), "more than tracked counts as everything");
    }

    #[test]
    fn hold_id_names_the_exact_set() {
        let a = vec!["d/a".to_string(), "d/b".to_string()];
        let b = vec!["d/a".to_string()];
        assert_eq!(hold_id("d", &a), hold_id("d", &a.clone()));
        assert_ne!(hold_id("d", &a), hold_id("d", &b));
        assert_ne!(hold_id("d", &a), hold_id("e", &a));
        assert_eq!(hold_id("d", &a).len(), 16);
    }

    #[test]
    fn check_dir_tells_missing_replaced_and_file() {
        let d = tempfile::tempdir().unwrap();
        let root = d.path().join("r");
        assert!(matches!(
            check_dir(&root, None),
            Err(RootProblem::Missing(_))
        ));
        std::fs::create_dir(&root).unwrap();
        let id = check_dir(&root, None).unwrap();
        assert_eq!(check_dir(&root, Some(id)).unwrap(), id);
        std::fs::rename(&root, d.path().join("away")).unwrap();
        std::fs::create_dir(&root).unwrap();
        let e = check_dir(&root, Some(id)).unwrap_err();
        assert_eq!(e.kind(), "replaced");
        std::fs::remove_dir(&root).unwrap();
        std::fs::write(&root, b"x").unwrap();
        assert_eq!(
            check_dir(&root, Some(id)).unwrap_err().kind(),
            "not_a_directory"
        );
    }

    #[test]
    fn acceptance_round_trip() {
        let d = tempfile::tempdir().unwrap();
        assert_eq!(read_acceptance(d.path(), "data").unwrap(), None);
        let a = Acceptance {
            root: "data".into(),
            hold: Some("0123456789abcdef".into()),
            adopt: None,
            by: "op".into(),
            at_ms: 5,
        };
        write_acceptance(d.path(), &a).unwrap();
        assert_eq!(read_acceptance(d.path(), "data").unwrap(), Some(a));
        remove_acceptance(d.path(), "data");
        assert_eq!(read_acceptance(d.path(), "data").unwrap(), None);
    }

    #[test]
    fn populated_replica_dir_is_never_recreated() {
        let d = tempfile::tempdir().unwrap();
        let state = crate::files::state::StateDb::open(&d.path().join("state")).unwrap();
        let dir = d.path().join("rep");
        replica_dir_ready(&state, "/replica/x", &dir, false, true).unwrap();
        assert!(dir.is_dir(), "an unpopulated replica directory is created");
        // Moved away (kept, so a new directory cannot reuse its inode number).
        std::fs::rename(&dir, d.path().join("away")).unwrap();
        let e = replica_dir_ready(&state, "/replica/x", &dir, true, true).unwrap_err();
        assert_eq!(e.kind(), "missing");
        assert!(
            !dir.exists(),
            "a populated replica directory is not recreated"
        );
        std::fs::create_dir(&dir).unwrap();
        let e = replica_dir_ready(&state, "/replica/x", &dir, true, true).unwrap_err();
        assert_eq!(e.kind(), "replaced");
    }
}
