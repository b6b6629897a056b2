//! The agent's durable state in one redb file (`<data_dir>/agent.redb`): what was last
//! acknowledged for every path, the fast_rsync signature of every acknowledged part, the set of
//! part hashes the coordinator acknowledged (so identical content is sent as `reuse`), and a few
//! counters (highest epoch seen, next change id).
//!
//! **Invariant**: the state only advances when a `PushReply` acknowledged the change, and every
//! acknowledged batch is recorded in ONE write transaction ([`StateDb::commit`]).

use std::ops::Bound;
use std::path::{Path, PathBuf};

use lifeboat_common::blob::BlobHash;
use lifeboat_common::catalog::{EntryKind, PartRef};
use redb::{
    Database, ReadOnlyTable, ReadableDatabase, ReadableTable, ReadableTableMetadata,
    TableDefinition,
};
use serde::{Deserialize, Serialize};

/// Wire path → serialized [`EntryState`] (JSON).
const ENTRIES: TableDefinition<&str, &[u8]> = TableDefinition::new("entries");
/// (wire path, part index) → serialized fast_rsync signature of that acknowledged part.
const SIGNATURES: TableDefinition<(&str, u32), &[u8]> = TableDefinition::new("signatures");
/// blake3 of an acknowledged part (32 bytes) → nothing: the coordinator stores that blob.
const ACKED_BLOBS: TableDefinition<&[u8], ()> = TableDefinition::new("acked_blobs");
/// Counters: `epoch`, `next_change_id`.
const META: TableDefinition<&str, u64> = TableDefinition::new("meta");

/// Replica name → last catalog sequence number applied to that replica (warm standby).
const REPLICA_SEQ: TableDefinition<&str, u64> = TableDefinition::new("replica_seq");
/// (replica name, relative path) → nothing: a directory tombstone applied while the directory
/// was not empty yet; removed once it is.
const REPLICA_RMDIR: TableDefinition<(&str, &str), ()> = TableDefinition::new("replica_rmdir");

/// (replica name, relative path, `""` for the replica directory itself) → `(mode, mtime_ns)` of
/// the newest directory row applied there: set again once entries inside are written (which
/// moves a directory's mtime to "now").
const REPLICA_DIRS: TableDefinition<(&str, &str), (u32, i64)> =
    TableDefinition::new("replica_dirs");

/// Catalog root name → serialized [`DirRole`] (JSON): the role a `follow_active` directory took
/// under which epoch (see `crate::roles`).
const ROLES: TableDefinition<&str, &[u8]> = TableDefinition::new("roles");

/// Directory key (a protected root's name, or `"/replica/<name>"` for a replica) → the
/// identity `(st_dev, st_ino)` of the directory it was first seen as (see `crate::files::guard`): a
/// directory at the same path with another identity (an empty mount point, a directory moved
/// in) is not the one whose entries the state holds.
const ROOT_IDS: TableDefinition<&str, (u64, u64)> = TableDefinition::new("root_ids");

const META_EPOCH: &str = "epoch";
const META_NEXT_CHANGE_ID: &str = "next_change_id";

/// File name of the state database inside `data_dir`.
pub const STATE_FILE: &str = "agent.redb";

/// Errors of the state database.
#[derive(Debug, thiserror::Error)]
pub enum StateError {
    /// redb failed (I/O, corruption, lock held by another agent process).
    #[error("state database {path}: {error}")]
    Db {
        /// The database file.
        path: PathBuf,
        /// Cause.
        error: Box<redb::Error>,
    },
    /// A stored row could not be decoded.
    #[error("state database: corrupted entry for {path:?}: {reason}")]
    Corrupted {
        /// Wire path of the row.
        path: String,
        /// What was wrong.
        reason: String,
    },
}

/// What was last acknowledged for one path.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct EntryState {
    /// File, directory or symlink.
    pub kind: EntryKind,
    /// Content size in bytes (0 for dirs and symlinks).
    pub size: u64,
    /// Permission bits (`st_mode & 0o7777`).
    pub mode: u32,
    /// Modification time, ns since the Unix epoch.
    pub mtime_ns: i64,
    /// blake3 of the whole content (files only).
    pub blake3: Option<BlobHash>,
    /// Content parts in order (files only).
    pub parts: Vec<PartRef>,
    /// Link text (symlinks only).
    pub symlink_target: Option<String>,
    /// Catalog sequence number from the acknowledgement.
    pub seq: u64,
}

/// The role of one directory (a `[[paths]]` or `[[replicas]]` entry that follows the active
/// region), persisted so a restart resumes in it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct DirRole {
    /// Watched and pushed (`true`), or kept as a replica of the catalog (`false`).
    pub source: bool,
    /// Epoch of the control record that ordered this role.
    pub epoch: u64,
}

/// One acknowledged change, as recorded by [`StateDb::commit`].
#[derive(Debug, Clone)]
pub enum AckedChange {
    /// The path now has this version; `signatures[i]` is the signature of part `i`.
    Upsert {
        /// Wire path.
        path: String,
        /// The acknowledged version.
        entry: EntryState,
        /// Serialized fast_rsync signature per part (same length as `entry.parts`).
        signatures: Vec<Vec<u8>>,
    },
    /// The path was deleted (tombstone acknowledged).
    Delete {
        /// Wire path.
        path: String,
    },
}

/// The state database. Cheap to share behind an `Arc`; all methods are blocking (call them from
/// `spawn_blocking` in async code).
pub struct StateDb {
    db: Database,
    path: PathBuf,
    /// Part hashes of snapshot spools (in memory; see [`crate::files::spool_digest`]).
    digests: crate::files::spool_digest::SpoolDigests,
}

impl std::fmt::Debug for StateDb {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StateDb").field("path", &self.path).finish()
    }
}

/// A consistent read view of the state (one redb read transaction).
pub struct StateReader {
    entries: ReadOnlyTable<&'static str, &'static [u8]>,
    sigs: ReadOnlyTable<(&'static str, u32), &'static [u8]>,
    blobs: ReadOnlyTable<&'static [u8], ()>,
    digests: crate::files::spool_digest::SpoolDigests,
}

fn decode_entry(path: &str, bytes: &[u8]) -> Result<EntryState, StateError> {
    serde_json::from_slice(bytes).map_err(|e| StateError::Corrupted {
        path: path.to_string(),
        reason: e.to_string(),
    })
}

/// Exclusive upper bound of all keys starting with `prefix` (which ends in `/`): `/` + 1 is `0`.
fn prefix_end(prefix: &str) -> String {
    let mut end = prefix.to_string();
    if end.pop() == Some('/') {
        end.push('0');
    } else {
        end = format!("{prefix}\u{10FFFF}");
    }
    end
}

/// Records acknowledged changes (entries, signatures, acked part hashes; removals) in `txn`.
fn record_acked(txn: &redb::WriteTransaction, changes: &[AckedChange]) -> Result<(), redb::Error> {
    let mut entries = txn.open_table(ENTRIES)?;
    let mut sigs = txn.open_table(SIGNATURES)?;
    let mut blobs = txn.open_table(ACKED_BLOBS)?;
    for c in changes {
        match c {
            AckedChange::Upsert {
                path,
                entry,
                signatures,
            } => {
                let bytes = serde_json::to_vec(entry)
                    .map_err(|e| redb::Error::Io(std::io::Error::other(e)))?;
                entries.insert(path.as_str(), bytes.as_slice())?;
                sigs.retain_in((path.as_str(), 0u32)..=(path.as_str(), u32::MAX), |_, _| {
                    false
                })?;
                for (i, s) in signatures.iter().enumerate() {
                    // Empty: not computed (snapshot files are never changed in place).
                    if !s.is_empty() {
                        sigs.insert((path.as_str(), i as u32), s.as_slice())?;
                    }
                }
                for p in &entry.parts {
                    blobs.insert(p.hash.0.as_slice(), ())?;
                }
            }
            AckedChange::Delete { path } => {
                entries.remove(path.as_str())?;
                sigs.retain_in((path.as_str(), 0u32)..=(path.as_str(), u32::MAX), |_, _| {
                    false
                })?;
            }
        }
    }
    Ok(())
}

impl StateDb {
    /// Opens (creating if needed) `<data_dir>/agent.redb`, creating `data_dir` too.
    ///
    /// Errors: [`StateError::Db`] (for instance when another agent holds the file).
    pub fn open(data_dir: &Path) -> Result<StateDb, StateError> {
        let path = data_dir.join(STATE_FILE);
        let err = |e: redb::Error| StateError::Db {
            path: path.clone(),
            error: Box::new(e),
        };
        std::fs::create_dir_all(data_dir).map_err(|e| err(e.into()))?;
        let db = Database::create(&path).map_err(|e| err(e.into()))?;
        let me = StateDb {
            db,
            path,
            digests: Default::default(),
        };
        // Create every table so read transactions can open them.
        me.write(|txn| {
            txn.open_table(ENTRIES)?;
            txn.open_table(SIGNATURES)?;
            txn.open_table(ACKED_BLOBS)?;
            txn.open_table(META)?;
            txn.open_table(REPLICA_SEQ)?;
            txn.open_table(REPLICA_RMDIR)?;
            txn.open_table(REPLICA_DIRS)?;
            txn.open_table(ROLES)?;
            txn.open_table(ROOT_IDS)?;
            Ok(())
        })?;
        Ok(me)
    }

    fn err(&self, e: impl Into<redb::Error>) -> StateError {
        StateError::Db {
            path: self.path.clone(),
            error: Box::new(e.into()),
        }
    }

    fn write(
        &self,
        f: impl FnOnce(&redb::WriteTransaction) -> Result<(), redb::Error>,
    ) -> Result<(), StateError> {
        let txn = self.db.begin_write().map_err(|e| self.err(e))?;
        f(&txn).map_err(|e| self.err(e))?;
        txn.commit().map_err(|e| self.err(e))
    }

    /// A consistent read view.
    ///
    /// Errors: [`StateError::Db`].
    pub fn reader(&self) -> Result<StateReader, StateError> {
        let txn = self.db.begin_read().map_err(|e| self.err(e))?;
        Ok(StateReader {
            entries: txn.open_table(ENTRIES).map_err(|e| self.err(e))?,
            sigs: txn.open_table(SIGNATURES).map_err(|e| self.err(e))?,
            blobs: txn.open_table(ACKED_BLOBS).map_err(|e| self.err(e))?,
            digests: self.digests.clone(),
        })
    }

    /// Part hashes of snapshot spools written by this process (see [`crate::files::spool_digest`]).
    pub fn spool_digests(&self) -> &crate::files::spool_digest::SpoolDigests {
        &self.digests
    }

    fn meta(&self, key: &str) -> Result<u64, StateError> {
        let txn = self.db.begin_read().map_err(|e| self.err(e))?;
        let t = txn.open_table(META).map_err(|e| self.err(e))?;
        Ok(t.get(key)
            .map_err(|e| self.err(e))?
            .map(|v| v.value())
            .unwrap_or(0))
    }

    /// Highest epoch seen (0 on a fresh database).
    ///
    /// Errors: [`StateError::Db`].
    pub fn epoch(&self) -> Result<u64, StateError> {
        self.meta(META_EPOCH)
    }

    /// Persists `epoch` if it is higher than the stored one.
    ///
    /// Errors: [`StateError::Db`].
    pub fn raise_epoch(&self, epoch: u64) -> Result<(), StateError> {
        self.write(|txn| {
            let mut t = txn.open_table(META)?;
            let cur = t.get(META_EPOCH)?.map(|v| v.value()).unwrap_or(0);
            if epoch > cur {
                t.insert(META_EPOCH, epoch)?;
            }
            Ok(())
        })
    }

    /// The next change id recorded by the last commit (0 on a fresh database).
    ///
    /// Errors: [`StateError::Db`].
    pub fn next_change_id(&self) -> Result<u64, StateError> {
        self.meta(META_NEXT_CHANGE_ID)
    }

    /// Number of paths with acknowledged state.
    ///
    /// Errors: [`StateError::Db`].
    pub fn count(&self) -> Result<u64, StateError> {
        let txn = self.db.begin_read().map_err(|e| self.err(e))?;
        let t = txn.open_table(ENTRIES).map_err(|e| self.err(e))?;
        t.len().map_err(|e| self.err(e))
    }

    /// Records an acknowledged batch in one write transaction: entries, signatures and acked part
    /// hashes of upserts; removal (with signatures) of deleted paths; the epoch (raised only) and
    /// the next change id.
    ///
    /// Errors: [`StateError::Db`]; nothing is recorded then.
    pub fn commit(
        &self,
        changes: &[AckedChange],
        epoch: u64,
        next_change_id: u64,
    ) -> Result<(), StateError> {
        self.write(|txn| {
            record_acked(txn, changes)?;
            let mut meta = txn.open_table(META)?;
            let cur = meta.get(META_EPOCH)?.map(|v| v.value()).unwrap_or(0);
            if epoch > cur {
                meta.insert(META_EPOCH, epoch)?;
            }
            let cur = meta
                .get(META_NEXT_CHANGE_ID)?
                .map(|v| v.value())
                .unwrap_or(0);
            if next_change_id > cur {
                meta.insert(META_NEXT_CHANGE_ID, next_change_id)?;
            }
            Ok(())
        })
    }

    /// The recorded identity `(st_dev, st_ino)` of directory `key` (see [`StateDb::set_root_id`]).
    ///
    /// Errors: [`StateError::Db`].
    pub fn root_id(&self, key: &str) -> Result<Option<(u64, u64)>, StateError> {
        let txn = self.db.begin_read().map_err(|e| self.err(e))?;
        let t = txn.open_table(ROOT_IDS).map_err(|e| self.err(e))?;
        Ok(t.get(key).map_err(|e| self.err(e))?.map(|v| v.value()))
    }

    /// Records `id = (st_dev, st_ino)` as the identity of directory `key` (a protected root's
    /// name, or `"/replica/<name>"`).
    ///
    /// Errors: [`StateError::Db`].
    pub fn set_root_id(&self, key: &str, id: (u64, u64)) -> Result<(), StateError> {
        self.write(|txn| {
            txn.open_table(ROOT_IDS)?.insert(key, id)?;
            Ok(())
        })
    }

    /// Number of acknowledged entries whose wire path starts with `prefix` (ending in `/`).
    ///
    /// Errors: [`StateError::Db`].
    pub fn count_under(&self, prefix: &str) -> Result<u64, StateError> {
        let txn = self.db.begin_read().map_err(|e| self.err(e))?;
        let t = txn.open_table(ENTRIES).map_err(|e| self.err(e))?;
        let end = prefix_end(prefix);
        let mut n = 0;
        for r in t
            .range::<&str>(prefix..end.as_str())
            .map_err(|e| self.err(e))?
        {
            r.map_err(|e| self.err(e))?;
            n += 1;
        }
        Ok(n)
    }

    /// Last catalog sequence number applied to replica `name` (0: none).
    ///
    /// Errors: [`StateError::Db`].
    pub fn replica_seq(&self, name: &str) -> Result<u64, StateError> {
        let txn = self.db.begin_read().map_err(|e| self.err(e))?;
        let t = txn.open_table(REPLICA_SEQ).map_err(|e| self.err(e))?;
        Ok(t.get(name)
            .map_err(|e| self.err(e))?
            .map(|v| v.value())
            .unwrap_or(0))
    }

    /// Directories of replica `name` whose tombstone is applied but which were not empty yet.
    ///
    /// Errors: [`StateError::Db`].
    pub fn replica_pending_rmdirs(&self, name: &str) -> Result<Vec<String>, StateError> {
        let txn = self.db.begin_read().map_err(|e| self.err(e))?;
        let t = txn.open_table(REPLICA_RMDIR).map_err(|e| self.err(e))?;
        let mut out = Vec::new();
        for r in t
            .range((name, "")..(name, "\u{10FFFF}"))
            .map_err(|e| self.err(e))?
        {
            let (k, _) = r.map_err(|e| self.err(e))?;
            out.push(k.value().1.to_string());
        }
        Ok(out)
    }

    /// `(mode, mtime_ns)` of the newest directory row replica `name` applied at each of `rels`
    /// (relative paths, `""` for the replica directory itself), in order; `None` where no
    /// directory row is recorded (never seen, or removed or replaced since).
    ///
    /// Errors: [`StateError::Db`].
    pub fn replica_dir_metas(
        &self,
        name: &str,
        rels: &[String],
    ) -> Result<Vec<Option<(u32, i64)>>, StateError> {
        let txn = self.db.begin_read().map_err(|e| self.err(e))?;
        let t = txn.open_table(REPLICA_DIRS).map_err(|e| self.err(e))?;
        rels.iter()
            .map(|r| {
                Ok(t.get((name, r.as_str()))
                    .map_err(|e| self.err(e))?
                    .map(|v| v.value()))
            })
            .collect()
    }

    /// Records, in one write transaction, that replica `name` applied everything up to `seq`
    /// (durably), with its pending directory removals now exactly `pending_rmdirs`, the
    /// versions it applied as acknowledged state (`acked`, so a directory that becomes a source
    /// sends only what changes afterwards), and its directory rows (`dirs`: relative path →
    /// `Some((mode, mtime_ns))` of a directory row applied there, `None` where a tombstone or a
    /// non-directory row was applied; see [`StateDb::replica_dir_metas`]).
    ///
    /// Errors: [`StateError::Db`]; nothing is recorded then.
    pub fn replica_commit(
        &self,
        name: &str,
        seq: u64,
        pending_rmdirs: &[String],
        acked: &[AckedChange],
        dirs: &[(String, Option<(u32, i64)>)],
    ) -> Result<(), StateError> {
        self.write(|txn| {
            record_acked(txn, acked)?;
            let mut seqs = txn.open_table(REPLICA_SEQ)?;
            seqs.insert(name, seq)?;
            let mut rm = txn.open_table(REPLICA_RMDIR)?;
            rm.retain_in((name, "")..(name, "\u{10FFFF}"), |_, _| false)?;
            for p in pending_rmdirs {
                rm.insert((name, p.as_str()), ())?;
            }
            let mut dt = txn.open_table(REPLICA_DIRS)?;
            for (rel, meta) in dirs {
                match meta {
                    Some(m) => {
                        dt.insert((name, rel.as_str()), *m)?;
                    }
                    None => {
                        dt.remove((name, rel.as_str()))?;
                    }
                }
            }
            Ok(())
        })
    }

    /// Roles of the directories that follow the active region, by catalog root name.
    ///
    /// Errors: [`StateError`].
    pub fn roles(&self) -> Result<std::collections::BTreeMap<String, DirRole>, StateError> {
        let txn = self.db.begin_read().map_err(|e| self.err(e))?;
        let t = txn.open_table(ROLES).map_err(|e| self.err(e))?;
        let mut out = std::collections::BTreeMap::new();
        for r in t.iter().map_err(|e| self.err(e))? {
            let (k, v) = r.map_err(|e| self.err(e))?;
            let role: DirRole =
                serde_json::from_slice(v.value()).map_err(|e| StateError::Corrupted {
                    path: k.value().to_string(),
                    reason: e.to_string(),
                })?;
            out.insert(k.value().to_string(), role);
        }
        Ok(out)
    }

    /// Records `roles` (and raises the epoch to theirs) in one write transaction.
    ///
    /// Errors: [`StateError::Db`]; nothing is recorded then.
    pub fn set_roles(&self, roles: &[(String, DirRole)]) -> Result<(), StateError> {
        self.write(|txn| {
            let mut t = txn.open_table(ROLES)?;
            let mut meta = txn.open_table(META)?;
            for (name, role) in roles {
                let bytes = serde_json::to_vec(role)
                    .map_err(|e| redb::Error::Io(std::io::Error::other(e)))?;
                t.insert(name.as_str(), bytes.as_slice())?;
                let cur = meta.get(META_EPOCH)?.map(|v| v.value()).unwrap_or(0);
                if role.epoch > cur {
                    meta.insert(META_EPOCH, role.epoch)?;
                }
            }
            Ok(())
        })
    }

    /// Records part hashes a coordinator confirmed stored durably outside a batch (`PutParts`,
    /// see `crate::snapshot::preupload`): later batches send such parts as `reuse`.
    ///
    /// Errors: [`StateError::Db`].
    pub fn record_stored_blobs(&self, hashes: &[BlobHash]) -> Result<(), StateError> {
        self.write(|txn| {
            let mut blobs = txn.open_table(ACKED_BLOBS)?;
            for h in hashes {
                blobs.insert(h.0.as_slice(), ())?;
            }
            Ok(())
        })
    }

    /// Forgets every acknowledged part hash (used when the coordinator reports a missing base, so
    /// nothing is assumed stored any more until acknowledged again).
    ///
    /// Errors: [`StateError::Db`].
    pub fn forget_acked_blobs(&self, hashes: &[BlobHash]) -> Result<(), StateError> {
        self.write(|txn| {
            let mut blobs = txn.open_table(ACKED_BLOBS)?;
            for h in hashes {
                blobs.remove(h.0.as_slice())?;
            }
            Ok(())
        })
    }
}

impl StateReader {
    /// Removes and returns the recorded part hashes of the spooled file with metadata `meta`
    /// (same inode, size and mtime), if any (see [`crate::files::spool_digest`]).
    pub fn take_spool_digest(
        &self,
        meta: &std::fs::Metadata,
    ) -> Option<crate::files::spool_digest::SpoolDigest> {
        self.digests.take(meta)
    }

    /// The acknowledged state of a wire path.
    ///
    /// Errors: [`StateError`] on I/O or a corrupted row.
    pub fn get(&self, path: &str) -> Result<Option<EntryState>, StateError> {
        let v = self.entries.get(path).map_err(|e| StateError::Db {
            path: PathBuf::from(STATE_FILE),
            error: Box::new(e.into()),
        })?;
        v.map(|v| decode_entry(path, v.value())).transpose()
    }

    /// The serialized signature of part `index` of the acknowledged version of `path`.
    ///
    /// Errors: [`StateError::Db`].
    pub fn signature(&self, path: &str, index: u32) -> Result<Option<Vec<u8>>, StateError> {
        let v = self.sigs.get((path, index)).map_err(|e| StateError::Db {
            path: PathBuf::from(STATE_FILE),
            error: Box::new(e.into()),
        })?;
        Ok(v.map(|v| v.value().to_vec()))
    }

    /// Whether the coordinator acknowledged a part with this hash.
    ///
    /// Errors: [`StateError::Db`].
    pub fn is_acked_blob(&self, hash: &BlobHash) -> Result<bool, StateError> {
        let v = self
            .blobs
            .get(hash.0.as_slice())
            .map_err(|e| StateError::Db {
                path: PathBuf::from(STATE_FILE),
                error: Box::new(e.into()),
            })?;
        Ok(v.is_some())
    }

    /// Up to `limit` wire paths (with their kind) that start with `prefix` (which must end in
    /// `/`), in key order, strictly after `after` when given.
    ///
    /// Errors: [`StateError`].
    pub fn paths_under(
        &self,
        prefix: &str,
        after: Option<&str>,
        limit: usize,
    ) -> Result<Vec<(String, EntryKind)>, StateError> {
        let end = prefix_end(prefix);
        let start = match after {
            Some(a) => Bound::Excluded(a),
            None => Bound::Included(prefix),
        };
        let range = self
            .entries
            .range::<&str>((start, Bound::Excluded(end.as_str())))
            .map_err(|e| StateError::Db {
                path: PathBuf::from(STATE_FILE),
                error: Box::new(e.into()),
            })?;
        let mut out = Vec::new();
        for item in range {
            let (k, v) = item.map_err(|e| StateError::Db {
                path: PathBuf::from(STATE_FILE),
                error: Box::new(e.into()),
            })?;
            let path = k.value().to_string();
            let e = decode_entry(&path, v.value())?;
            out.push((path, e.kind));
            if out.len() >= limit {
                break;
            }
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn file_entry(parts: &[&[u8]], seq: u64) -> EntryState {
        let mut h = blake3::Hasher::new();
        for p in parts {
            h.update(p);
        }
        EntryState {
            kind: EntryKind::File,
            size: parts.iter().map(|p| p.len() as u64).sum(),
            mode: 0o644,
            mtime_ns: 1_700_000_000_123_456_789,
            blake3: Some(BlobHash(*h.finalize().as_bytes())),
            parts: parts
                .iter()
                .map(|p| PartRef {
                    hash: BlobHash::of(p),
                    size: p.len() as u64,
                })
                .collect(),
            symlink_target: None,
            seq,
        }
    }

    #[test]
    fn state_round_trip() {
        let dir = tempfile::tempdir().unwrap();
        let e = file_entry(&[b"hello", b"world"], 7);
        let link = EntryState {
            kind: EntryKind::Symlink,
            size: 0,
            mode: 0o777,
            mtime_ns: 5,
            blake3: None,
            parts: vec![],
            symlink_target: Some("../x".into()),
            seq: 8,
        };
        {
            let db = StateDb::open(dir.path()).unwrap();
            assert_eq!(db.epoch().unwrap(), 0);
            db.commit(
                &[
                    AckedChange::Upsert {
                        path: "data/a".into(),
                        entry: e.clone(),
                        signatures: vec![b"sig0".to_vec(), b"sig1".to_vec()],
                    },
                    AckedChange::Upsert {
                        path: "data/l".into(),
                        entry: link.clone(),
                        signatures: vec![],
                    },
                    AckedChange::Upsert {
                        path: "data/sub".into(),
                        entry: EntryState {
                            kind: EntryKind::Dir,
                            ..link.clone()
                        },
                        signatures: vec![],
                    },
                    AckedChange::Upsert {
                        path: "data/sub/f".into(),
                        entry: file_entry(&[b"x"], 9),
                        signatures: vec![b"s".to_vec()],
                    },
                ],
                3,
                100,
            )
            .unwrap();
        }
        // Reopen: everything persisted.
        let db = StateDb::open(dir.path()).unwrap();
        assert_eq!(db.epoch().unwrap(), 3);
        assert_eq!(db.next_change_id().unwrap(), 100);
        assert_eq!(db.count().unwrap(), 4);
        let r = db.reader().unwrap();
        assert_eq!(r.get("data/a").unwrap().unwrap(), e);
        assert_eq!(r.get("data/l").unwrap().unwrap(), link);
        assert_eq!(r.signature("data/a", 1).unwrap().unwrap(), b"sig1");
        assert!(r.signature("data/a", 2).unwrap().is_none());
        assert!(r.is_acked_blob(&BlobHash::of(b"world")).unwrap());
        assert!(!r.is_acked_blob(&BlobHash::of(b"other")).unwrap());
        let under: Vec<String> = r
            .paths_under("data/", None, 100)
            .unwrap()
            .into_iter()
            .map(|(p, _)| p)
            .collect();
        assert_eq!(under, vec!["data/a", "data/l", "data/sub", "data/sub/f"]);
        let sub = r.paths_under("data/sub/", None, 100).unwrap();
        assert_eq!(sub, vec![("data/sub/f".to_string(), EntryKind::File)]);
        let page = r.paths_under("data/", Some("data/l"), 1).unwrap();
        assert_eq!(page[0].0, "data/sub");
        drop(r);

        // Delete removes the entry and its signatures; epoch never goes down.
        db.commit(
            &[AckedChange::Delete {
                path: "data/a".into(),
            }],
            1,
            50,
        )
        .unwrap();
        let r = db.reader().unwrap();
        assert!(r.get("data/a").unwrap().is_none());
        assert!(r.signature("data/a", 0).unwrap().is_none());
        assert_eq!(db.epoch().unwrap(), 3);
        assert_eq!(db.next_change_id().unwrap(), 100);
        db.raise_epoch(9).unwrap();
        assert_eq!(db.epoch().unwrap(), 9);
        db.forget_acked_blobs(&[BlobHash::of(b"world")]).unwrap();
        assert!(!db
            .reader()
            .unwrap()
            .is_acked_blob(&BlobHash::of(b"world"))
            .unwrap());
    }

    #[test]
    fn replica_progress_persists() {
        let dir = tempfile::tempdir().unwrap();
        {
            let db = StateDb::open(dir.path()).unwrap();
            assert_eq!(db.replica_seq("data").unwrap(), 0);
            db.replica_commit(
                "data",
                42,
                &["d/e".into(), "d".into()],
                &[],
                &[
                    ("d".into(), Some((0o755, 5))),
                    ("".into(), Some((0o700, -1))),
                ],
            )
            .unwrap();
            db.replica_commit(
                "other",
                7,
                &["x".into()],
                &[],
                &[("d".into(), Some((0o700, 9)))],
            )
            .unwrap();
        }
        let db = StateDb::open(dir.path()).unwrap();
        assert_eq!(db.replica_seq("data").unwrap(), 42);
        assert_eq!(db.replica_seq("other").unwrap(), 7);
        assert_eq!(db.replica_pending_rmdirs("data").unwrap(), vec!["d", "d/e"]);
        let rels = ["d".to_string(), String::new(), "e".into()];
        assert_eq!(
            db.replica_dir_metas("data", &rels).unwrap(),
            vec![Some((0o755, 5)), Some((0o700, -1)), None]
        );
        db.replica_commit("data", 50, &[], &[], &[("d".into(), None)])
            .unwrap();
        assert_eq!(
            db.replica_dir_metas("data", &rels).unwrap(),
            vec![None, Some((0o700, -1)), None]
        );
        assert_eq!(
            db.replica_dir_metas("other", &rels[..1]).unwrap(),
            vec![Some((0o700, 9))]
        );
        assert!(db.replica_pending_rmdirs("data").unwrap().is_empty());
        assert_eq!(db.replica_pending_rmdirs("other").unwrap(), vec!["x"]);
    }

    #[test]
    fn roles_and_replica_acks_persist() {
        let dir = tempfile::tempdir().unwrap();
        {
            let db = StateDb::open(dir.path()).unwrap();
            assert!(db.roles().unwrap().is_empty());
            db.set_roles(&[(
                "data".into(),
                DirRole {
                    source: false,
                    epoch: 4,
                },
            )])
            .unwrap();
            // A replica's applied version counts as acknowledged (parts known, no signature).
            db.replica_commit(
                "data",
                9,
                &[],
                &[AckedChange::Upsert {
                    path: "data/f".into(),
                    entry: file_entry(&[b"abc"], 9),
                    signatures: vec![],
                }],
                &[],
            )
            .unwrap();
        }
        let db = StateDb::open(dir.path()).unwrap();
        let roles = db.roles().unwrap();
        assert_eq!(
            roles.get("data"),
            Some(&DirRole {
                source: false,
                epoch: 4
            })
        );
        assert_eq!(db.epoch().unwrap(), 4, "a role's epoch raises the epoch");
        assert_eq!(db.replica_seq("data").unwrap(), 9);
        let r = db.reader().unwrap();
        assert_eq!(r.get("data/f").unwrap().unwrap().seq, 9);
        assert!(r.is_acked_blob(&BlobHash::of(b"abc")).unwrap());
        assert!(r.signature("data/f", 0).unwrap().is_none());
    }
}
