//! The catalog: for every path, its versions. The regional Raft state machine holds these; the
//! wire form is `lifeboat.v1.VersionRow`. Conversions between the two live here.

use serde::{Deserialize, Serialize};

use crate::blob::{BlobError, BlobHash};
use lifeboat_proto as pb;

/// What a catalog entry describes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum EntryKind {
    /// A regular file; content in `parts`.
    File,
    /// A directory (replicated so that empty directories, modes and mtimes are restored).
    Dir,
    /// A symbolic link; target in `symlink_target`. Never followed.
    Symlink,
}

impl EntryKind {
    /// Wire enum value.
    pub fn to_pb(self) -> i32 {
        match self {
            EntryKind::File => pb::EntryKind::File as i32,
            EntryKind::Dir => pb::EntryKind::Dir as i32,
            EntryKind::Symlink => pb::EntryKind::Symlink as i32,
        }
    }
    /// From the wire enum value; `None` for unknown or unspecified values.
    pub fn from_pb(v: i32) -> Option<Self> {
        match pb::EntryKind::try_from(v).ok()? {
            pb::EntryKind::File => Some(EntryKind::File),
            pb::EntryKind::Dir => Some(EntryKind::Dir),
            pb::EntryKind::Symlink => Some(EntryKind::Symlink),
            pb::EntryKind::Unspecified => None,
        }
    }
}

/// One part of a file version: a blob and its content size in bytes.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PartRef {
    /// blake3 of the part's raw content (the blob key).
    pub hash: BlobHash,
    /// Bytes of content.
    pub size: u64,
}

/// A version to commit, as proposed by the leader (no sequence number yet).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NewVersion {
    /// Checked relative path ('/'-separated), prefixed by the watched root name.
    pub path: String,
    /// File, directory or symlink.
    pub kind: EntryKind,
    /// Tombstone: the path was deleted.
    pub deleted: bool,
    /// Content size in bytes.
    pub size: u64,
    /// Permission bits (`st_mode & 0o7777`).
    pub mode: u32,
    /// Modification time, ns since the Unix epoch.
    pub mtime_ns: i64,
    /// blake3 of the whole content (files only).
    pub blake3: Option<BlobHash>,
    /// Content parts in order (files only).
    pub parts: Vec<PartRef>,
    /// Link target (symlinks only), stored verbatim, never resolved.
    pub symlink_target: Option<String>,
    /// Fencing token the change was written under.
    pub epoch: u64,
    /// Region that took the write.
    pub region: String,
    /// Agent that sent the change.
    pub agent_id: String,
    /// Source path when this version is the target of a rename.
    pub rename_from: Option<String>,
}

/// Catalog root of conflicts after a failover: a change a fenced region made that the active
/// region lacks is committed in the active region at [`conflict_path`] (never applied to
/// replicas; listed by `lifeboat conflicts`, settled by `lifeboat resolve`).
pub const CONFLICTS_ROOT: &str = "_conflicts";

/// `agent_id` of the versions `lifeboat resolve` commits: the active region's source agents
/// write them into their directories.
pub const RESOLVE_AGENT_ID: &str = "lifeboat-resolve";

/// `_conflicts/<from region>/e<epoch>/<original path>`: where the active region keeps a fenced
/// region's version of `path` (`epoch`: the epoch under which it was handed over).
pub fn conflict_path(from_region: &str, epoch: u64, path: &str) -> String {
    format!("{CONFLICTS_ROOT}/{from_region}/e{epoch}/{path}")
}

/// The parts of a [`conflict_path`]: `(from region, epoch, original path)`; `None` for any
/// other path.
pub fn parse_conflict_path(p: &str) -> Option<(String, u64, String)> {
    let rest = p.strip_prefix(CONFLICTS_ROOT)?.strip_prefix('/')?;
    let (region, rest) = rest.split_once('/')?;
    let (epoch, path) = rest.split_once('/')?;
    let epoch = epoch.strip_prefix('e')?.parse().ok()?;
    (!region.is_empty() && !path.is_empty()).then(|| (region.to_string(), epoch, path.to_string()))
}

/// A committed version: a [`NewVersion`] plus its catalog sequence number and commit time.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FileVersion {
    /// Catalog sequence number, unique and increasing in the region's catalog.
    pub seq: u64,
    /// Commit time chosen by the leader, ms since the Unix epoch.
    pub commit_time_ms: i64,
    /// The version itself.
    #[serde(flatten)]
    pub v: NewVersion,
}

impl FileVersion {
    /// Wire form.
    pub fn to_pb(&self) -> pb::VersionRow {
        pb::VersionRow {
            seq: self.seq,
            path: self.v.path.clone(),
            kind: self.v.kind.to_pb(),
            deleted: self.v.deleted,
            size: self.v.size,
            mode: self.v.mode,
            mtime_ns: self.v.mtime_ns,
            blake3: self.v.blake3.map(|h| h.to_hex()).unwrap_or_default(),
            symlink_target: self.v.symlink_target.clone().unwrap_or_default(),
            parts: self
                .v
                .parts
                .iter()
                .map(|p| pb::PartRef {
                    hash: p.hash.to_hex(),
                    size: p.size,
                })
                .collect(),
            commit_time_ms: self.commit_time_ms,
            epoch: self.v.epoch,
            region: self.v.region.clone(),
            agent_id: self.v.agent_id.clone(),
            rename_from: self.v.rename_from.clone().unwrap_or_default(),
        }
    }

    /// From the wire form, checking the path, kind and hashes.
    ///
    /// Errors: [`CatalogError`] naming the bad field.
    pub fn from_pb(r: &pb::VersionRow) -> Result<Self, CatalogError> {
        crate::path::validate_rel_path(&r.path)?;
        let kind = EntryKind::from_pb(r.kind).ok_or(CatalogError::BadKind(r.kind))?;
        let blake3 = if r.blake3.is_empty() {
            None
        } else {
            Some(BlobHash::from_hex(&r.blake3)?)
        };
        let mut parts = Vec::with_capacity(r.parts.len());
        for p in &r.parts {
            parts.push(PartRef {
                hash: BlobHash::from_hex(&p.hash)?,
                size: p.size,
            });
        }
        let psum: u64 = parts.iter().map(|p| p.size).sum();
        if kind == EntryKind::File && !r.deleted && psum != r.size {
            return Err(CatalogError::SizeMismatch {
                path: r.path.clone(),
                size: r.size,
                parts: psum,
            });
        }
        Ok(FileVersion {
            seq: r.seq,
            commit_time_ms: r.commit_time_ms,
            v: NewVersion {
                path: r.path.clone(),
                kind,
                deleted: r.deleted,
                size: r.size,
                mode: r.mode,
                mtime_ns: r.mtime_ns,
                blake3,
                parts,
                symlink_target: (!r.symlink_target.is_empty()).then(|| r.symlink_target.clone()),
                epoch: r.epoch,
                region: r.region.clone(),
                agent_id: r.agent_id.clone(),
                rename_from: (!r.rename_from.is_empty()).then(|| r.rename_from.clone()),
            },
        })
    }
}

/// Errors decoding catalog rows.
#[derive(Debug, thiserror::Error)]
pub enum CatalogError {
    /// Bad path.
    #[error(transparent)]
    Path(#[from] crate::path::PathError),
    /// Bad hash.
    #[error(transparent)]
    Blob(#[from] BlobError),
    /// Unknown entry kind.
    #[error("unknown entry kind {0}")]
    BadKind(i32),
    /// Parts do not add up to the size.
    #[error("version of {path:?}: size {size} but parts add up to {parts}")]
    SizeMismatch {
        /// Path.
        path: String,
        /// Declared size.
        size: u64,
        /// Sum of part sizes.
        parts: u64,
    },
}

#[cfg(test)]
mod conflict_tests {
    use super::*;

    #[test]
    fn conflict_paths_round_trip() {
        let p = conflict_path("a", 2, "data/dir/x.txt");
        assert_eq!(p, "_conflicts/a/e2/data/dir/x.txt");
        assert_eq!(
            parse_conflict_path(&p),
            Some(("a".into(), 2, "data/dir/x.txt".into()))
        );
        assert_eq!(parse_conflict_path("data/x"), None);
        assert_eq!(parse_conflict_path("_conflicts/a/2/data"), None);
        assert_eq!(parse_conflict_path("_conflicts/a/e2"), None);
    }
}
