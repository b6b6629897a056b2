//! The catalog state machine in redb. Tables:
//!
//! | table | key | value |
//! |---|---|---|
//! | `catalog.versions` | (path, seq) | JSON [`FileVersion`] |
//! | `catalog.latest` | path | seq of the newest version |
//! | `catalog.by_seq` | seq | path (for "changes since seq" subscriptions) |
//! | `catalog.meta` | `last_applied`, `membership`, `stats` ([`CatalogStats`]), `replication` ([`ReplicationMeta`]) | JSON |
//! | `catalog.snapshot` | `meta`, `data` | the current openraft snapshot |
//! | `catalog.refs` | blob hash | parts of stored versions that reference it (absent = 0) |
//! | `catalog.condemned` | blob hash | log index of the `ForgetBlobs` that condemned it |
//!
//! Garbage collection (`crate::blobs::gc`): `PruneHistory` removes superseded versions (never the newest
//! of a path), `ForgetBlobs` records unreferenced blobs in `catalog.condemned` and, after the
//! transaction, deletes them from this node's blob store (local stores; a shared store is
//! cleaned by the leader's pass). A `CommitVersions` referencing a condemned blob it does not
//! list as `restored` is rejected whole.
//!
//! Applying entries is one redb write transaction per `apply` call. A snapshot is the JSON of
//! [`SnapshotData`]: every version plus the sequence counter; installing one replaces the tables.
//!
//! A standby region's catalog also records how far it has copied the upstream (active) region's
//! catalog ([`ReplicationMeta`]), committed in the same transaction as the copied versions.

use std::io::Cursor;
use std::sync::Arc;

use lifeboat_common::blob::BlobHash;
use lifeboat_common::blobstore::BlobStore;
use lifeboat_common::catalog::FileVersion;
use openraft::storage::{RaftStateMachine, Snapshot};
use openraft::{
    BasicNode, Entry, EntryPayload, LogId, OptionalSend, RaftSnapshotBuilder, SnapshotMeta,
    StoredMembership,
};
use redb::{
    Database, ReadableDatabase, ReadableTable, ReadableTableMetadata, TableDefinition,
    WriteTransaction,
};
use serde::{Deserialize, Serialize};
use tokio::sync::watch;

use super::types::{sto_err, CatalogCommand, NodeId, Request, Response, StorageError, TypeConfig};

const VERSIONS: TableDefinition<(&str, u64), &[u8]> = TableDefinition::new("catalog.versions");
const LATEST: TableDefinition<&str, u64> = TableDefinition::new("catalog.latest");
const BY_SEQ: TableDefinition<u64, &str> = TableDefinition::new("catalog.by_seq");
const META: TableDefinition<&str, &[u8]> = TableDefinition::new("catalog.meta");
const SNAPSHOT: TableDefinition<&str, &[u8]> = TableDefinition::new("catalog.snapshot");
/// Sequence number -> bytes of every non-tombstone version committed up to it (cumulative; the
/// difference between two sequence numbers is the content committed between them: lag in bytes).
const CUM_BYTES: TableDefinition<u64, u64> = TableDefinition::new("catalog.cum_bytes");
/// Blob hash -> number of (version, part) references from stored versions.
const REFS: TableDefinition<&[u8], u64> = TableDefinition::new("catalog.refs");
/// Blob hash -> log index of the `ForgetBlobs` entry that condemned it.
const CONDEMNED: TableDefinition<&[u8], u64> = TableDefinition::new("catalog.condemned");

/// Garbage collection state in `catalog.meta` (`gc`).
#[derive(Debug, Default, Clone, Copy, Serialize, Deserialize)]
pub struct GcMeta {
    /// Log index of the newest applied `ForgetBlobs` entry (0 = none). A blob copied to a
    /// follower must wait until the follower applied at least this index, so that no deletion
    /// decided before the copy runs after it.
    pub forget_index: u64,
    /// Versions removed by `PruneHistory` so far.
    pub pruned_versions: u64,
}

/// Serialized form of a catalog snapshot.
#[derive(Debug, Serialize, Deserialize)]
pub struct SnapshotData {
    /// Next sequence number to assign.
    pub next_seq: u64,
    /// Every version of every path.
    pub versions: Vec<FileVersion>,
    /// Cross-region replication progress (absent in snapshots of older versions: zero).
    #[serde(default)]
    pub replication: ReplicationMeta,
    /// Condemned blobs with the log index that condemned them (absent in older snapshots).
    #[serde(default)]
    pub condemned: Vec<(BlobHash, u64)>,
    /// Garbage collection counters (absent in older snapshots).
    #[serde(default)]
    pub gc: GcMeta,
}

/// How far a standby's catalog has copied the upstream region's catalog (all zero on a source).
#[derive(Debug, Default, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReplicationMeta {
    /// Highest upstream sequence number applied here (0 = nothing copied yet).
    pub upstream_seq: u64,
    /// Newest upstream sequence number known when the last replicated batch was cut.
    pub upstream_last_seq: u64,
    /// Region name of the upstream that served the last replicated batch.
    #[serde(default)]
    pub upstream_region: String,
    /// Progress kept for upstream regions this region copied before (after a failover the
    /// upstream changes; each region's catalog has its own sequence numbers).
    #[serde(default)]
    pub by_region: std::collections::BTreeMap<String, u64>,
}

/// Live-entry counters kept up to date by `apply`.
#[derive(Debug, Default, Clone, Copy, Serialize, Deserialize)]
pub struct CatalogStats {
    /// Paths whose newest version is not a tombstone.
    pub live_entries: u64,
    /// Sum of their sizes, bytes.
    pub live_bytes: u64,
    /// Versions stored (including tombstones).
    pub versions: u64,
    /// Next sequence number to assign (= number of versions ever committed + 1).
    pub next_seq: u64,
    /// Sizes of every non-tombstone version ever committed, bytes (monotonic; see
    /// [`Catalog::cum_bytes_through`]).
    #[serde(default)]
    pub committed_bytes: u64,
}

/// Read access to the catalog, for the admin API, intake and replication (any node; reads are
/// local).
#[derive(Clone)]
pub struct Catalog {
    db: Arc<Database>,
    /// Newest local sequence number, published after every applied transaction.
    last_seq: Arc<watch::Sender<u64>>,
    /// Log index applied here, published after every applied transaction and the blob
    /// deletions it decided (node-local; 0 until the first apply after start).
    applied_index: Arc<watch::Sender<u64>>,
}

fn json<T: Serialize>(v: &T) -> Result<Vec<u8>, StorageError> {
    serde_json::to_vec(v).map_err(|e| sto_err(true, e))
}

fn unjson<T: for<'a> Deserialize<'a>>(b: &[u8]) -> Result<T, StorageError> {
    serde_json::from_slice(b).map_err(|e| sto_err(false, e))
}

impl Catalog {
    /// Catalog view of `db`. Its [`Catalog::watch_last_seq`] is only notified when it comes
    /// from [`StateMachineStore::catalog`].
    pub fn new(db: Arc<Database>) -> Self {
        let last_seq = Catalog::read_last_seq(&db).unwrap_or(0);
        let applied = Catalog::read_applied_index(&db).unwrap_or(0);
        Catalog {
            db,
            last_seq: Arc::new(watch::channel(last_seq).0),
            applied_index: Arc::new(watch::channel(applied).0),
        }
    }

    fn read_stats(db: &Database) -> Result<CatalogStats, StorageError> {
        let tx = db.begin_read().map_err(|e| sto_err(false, e))?;
        let m = tx.open_table(META).map_err(|e| sto_err(false, e))?;
        match m.get("stats").map_err(|e| sto_err(false, e))? {
            Some(v) => unjson(v.value()),
            None => Ok(CatalogStats::default()),
        }
    }

    fn read_applied_index(db: &Database) -> Result<u64, StorageError> {
        let tx = db.begin_read().map_err(|e| sto_err(false, e))?;
        let m = tx.open_table(META).map_err(|e| sto_err(false, e))?;
        let la: Option<LogId<NodeId>> =
            match m.get("last_applied").map_err(|e| sto_err(false, e))? {
                Some(v) => unjson(v.value())?,
                None => None,
            };
        Ok(la.map(|l| l.index).unwrap_or(0))
    }

    /// Garbage collection state ([`GcMeta`]).
    ///
    /// Errors: storage failures.
    pub fn gc_meta(&self) -> Result<GcMeta, StorageError> {
        let tx = self.db.begin_read().map_err(|e| sto_err(false, e))?;
        let m = tx.open_table(META).map_err(|e| sto_err(false, e))?;
        match m.get("gc").map_err(|e| sto_err(false, e))? {
            Some(v) => unjson(v.value()),
            None => Ok(GcMeta::default()),
        }
    }

    /// Waits until this node has applied log index `index` (and the blob deletions of the
    /// entries up to it), at most `timeout`. Returns whether it has.
    pub async fn wait_applied(&self, index: u64, timeout: std::time::Duration) -> bool {
        let mut rx = self.applied_index.subscribe();
        tokio::time::timeout(timeout, rx.wait_for(|&i| i >= index))
            .await
            .is_ok_and(|r| r.is_ok())
    }

    /// How many parts of stored versions reference `hash` (0 = none).
    ///
    /// Errors: storage failures.
    pub fn refcount(&self, hash: &BlobHash) -> Result<u64, StorageError> {
        Ok(self.refcounts(std::slice::from_ref(hash))?[0])
    }

    /// [`Catalog::refcount`] of each hash, in one read transaction.
    ///
    /// Errors: storage failures.
    pub fn refcounts(&self, hashes: &[BlobHash]) -> Result<Vec<u64>, StorageError> {
        let tx = self.db.begin_read().map_err(|e| sto_err(false, e))?;
        let t = tx.open_table(REFS).map_err(|e| sto_err(false, e))?;
        hashes
            .iter()
            .map(|h| {
                Ok(t.get(h.0.as_slice())
                    .map_err(|e| sto_err(false, e))?
                    .map(|g| g.value())
                    .unwrap_or(0))
            })
            .collect()
    }

    /// Log index this node has applied (its catalog's `last_applied`).
    pub fn applied_index(&self) -> u64 {
        *self.applied_index.borrow()
    }

    /// Up to `limit` referenced blob hashes (`catalog.refs`, count > 0) in key order, starting
    /// after `after` (`None`: from the first). An empty page means the end. Pages let a scan
    /// walk every committed blob with bounded memory and resume where it stopped.
    ///
    /// Errors: storage failures.
    pub fn referenced_page(
        &self,
        after: Option<&BlobHash>,
        limit: usize,
    ) -> Result<Vec<BlobHash>, StorageError> {
        let tx = self.db.begin_read().map_err(|e| sto_err(false, e))?;
        let t = tx.open_table(REFS).map_err(|e| sto_err(false, e))?;
        let mut out = Vec::with_capacity(limit.min(4096));
        let iter = match after {
            Some(h) => t.range::<&[u8]>(h.0.as_slice()..),
            None => t.range::<&[u8]>(..),
        }
        .map_err(|e| sto_err(false, e))?;
        for item in iter {
            let (k, v) = item.map_err(|e| sto_err(false, e))?;
            let key = k.value();
            if after.is_some_and(|a| a.0.as_slice() == key) || v.value() == 0 {
                continue;
            }
            let h: [u8; 32] = key
                .try_into()
                .map_err(|_| sto_err(false, std::io::Error::other("bad key in catalog.refs")))?;
            out.push(BlobHash(h));
            if out.len() >= limit {
                break;
            }
        }
        Ok(out)
    }

    /// The hashes of `hashes` that garbage collection condemned (and no commit restored since).
    ///
    /// Errors: storage failures.
    pub fn condemned_among(&self, hashes: &[BlobHash]) -> Result<Vec<BlobHash>, StorageError> {
        let tx = self.db.begin_read().map_err(|e| sto_err(false, e))?;
        let t = tx.open_table(CONDEMNED).map_err(|e| sto_err(false, e))?;
        if t.is_empty().map_err(|e| sto_err(false, e))? {
            return Ok(Vec::new());
        }
        let mut out = Vec::new();
        for h in hashes {
            if t.get(h.0.as_slice())
                .map_err(|e| sto_err(false, e))?
                .is_some()
            {
                out.push(*h);
            }
        }
        Ok(out)
    }

    /// What `PruneHistory { cutoff_ms }` would remove now: the versions, for a dry run.
    ///
    /// Errors: storage failures.
    pub fn prunable(&self, cutoff_ms: i64) -> Result<Vec<FileVersion>, StorageError> {
        let tx = self.db.begin_read().map_err(|e| sto_err(false, e))?;
        let t = tx.open_table(VERSIONS).map_err(|e| sto_err(false, e))?;
        prunable_versions(&t, cutoff_ms)
    }

    fn read_last_seq(db: &Database) -> Result<u64, StorageError> {
        Ok(Catalog::read_stats(db)?.next_seq.saturating_sub(1))
    }

    /// Newest sequence number and the cumulative committed bytes through it (one read).
    ///
    /// Errors: storage failures.
    pub fn last_seq_and_bytes(&self) -> Result<(u64, u64), StorageError> {
        let s = Catalog::read_stats(&self.db)?;
        Ok((s.next_seq.saturating_sub(1), s.committed_bytes))
    }

    /// Newest sequence number committed in this catalog (0 when empty).
    ///
    /// Errors: storage failures.
    pub fn last_seq(&self) -> Result<u64, StorageError> {
        Catalog::read_last_seq(&self.db)
    }

    /// A receiver that changes whenever the state machine applies entries (value: the newest
    /// sequence number). Lets subscribers wait for new versions instead of polling.
    pub fn watch_last_seq(&self) -> watch::Receiver<u64> {
        self.last_seq.subscribe()
    }

    /// Committed versions with sequence numbers `>= from_seq`, in sequence order, at most
    /// `max_rows` of them (the `catalog.by_seq` index, then `catalog.versions`).
    ///
    /// Errors: storage failures.
    pub fn changes_since(
        &self,
        from_seq: u64,
        max_rows: usize,
    ) -> Result<Vec<FileVersion>, StorageError> {
        let tx = self.db.begin_read().map_err(|e| sto_err(false, e))?;
        let by_seq = tx.open_table(BY_SEQ).map_err(|e| sto_err(false, e))?;
        let versions = tx.open_table(VERSIONS).map_err(|e| sto_err(false, e))?;
        let mut out = Vec::new();
        for item in by_seq.range(from_seq..).map_err(|e| sto_err(false, e))? {
            if out.len() >= max_rows {
                break;
            }
            let (k, v) = item.map_err(|e| sto_err(false, e))?;
            let (seq, path) = (k.value(), v.value());
            if let Some(row) = versions.get((path, seq)).map_err(|e| sto_err(false, e))? {
                out.push(unjson(row.value())?);
            }
        }
        Ok(out)
    }

    /// Cross-region replication progress (all zero unless this region is a standby).
    ///
    /// Errors: storage failures.
    pub fn replication(&self) -> Result<ReplicationMeta, StorageError> {
        let tx = self.db.begin_read().map_err(|e| sto_err(false, e))?;
        let m = tx.open_table(META).map_err(|e| sto_err(false, e))?;
        match m.get("replication").map_err(|e| sto_err(false, e))? {
            Some(v) => unjson(v.value()),
            None => Ok(ReplicationMeta::default()),
        }
    }

    /// Highest upstream sequence number committed in this (standby) catalog; 0 when none.
    ///
    /// Errors: storage failures.
    pub fn upstream_seq(&self) -> Result<u64, StorageError> {
        Ok(self.replication()?.upstream_seq)
    }

    /// Highest sequence number of `region`'s catalog applied here (0 if never copied).
    ///
    /// Errors: storage failures.
    pub fn upstream_seq_of(&self, region: &str) -> Result<u64, StorageError> {
        let r = self.replication()?;
        Ok(if r.upstream_region == region {
            r.upstream_seq
        } else {
            r.by_region.get(region).copied().unwrap_or(0)
        })
    }

    /// Newest version of each path under `prefix` (a path prefix on '/' boundaries, or "" for
    /// all) whose commit time is <= `at_ms` (`None` = latest). With `all_versions`, every version
    /// up to `at_ms` instead. Tombstones only with `include_deleted`.
    ///
    /// Errors: storage failures.
    pub fn list(
        &self,
        prefix: &str,
        at_ms: Option<i64>,
        all_versions: bool,
        include_deleted: bool,
    ) -> Result<Vec<FileVersion>, StorageError> {
        let tx = self.db.begin_read().map_err(|e| sto_err(false, e))?;
        let t = tx.open_table(VERSIONS).map_err(|e| sto_err(false, e))?;
        let mut out = Vec::new();
        let mut cur_path: Option<String> = None;
        let mut best: Option<FileVersion> = None;
        let flush = |best: &mut Option<FileVersion>, out: &mut Vec<FileVersion>| {
            if let Some(b) = best.take() {
                if include_deleted || !b.v.deleted {
                    out.push(b);
                }
            }
        };
        for item in t.range((prefix, 0u64)..).map_err(|e| sto_err(false, e))? {
            let (k, v) = item.map_err(|e| sto_err(false, e))?;
            let (path, _seq) = k.value();
            if !path.starts_with(prefix) {
                break;
            }
            if !prefix.is_empty()
                && path.len() > prefix.len()
                && !prefix.ends_with('/')
                && path.as_bytes()[prefix.len()] != b'/'
            {
                continue;
            }
            let fv: FileVersion = unjson(v.value())?;
            if let Some(at) = at_ms {
                if fv.commit_time_ms > at {
                    continue;
                }
            }
            if all_versions {
                if include_deleted || !fv.v.deleted {
                    out.push(fv);
                }
                continue;
            }
            if cur_path.as_deref() != Some(path) {
                flush(&mut best, &mut out);
                cur_path = Some(path.to_string());
            }
            best = Some(fv);
        }
        flush(&mut best, &mut out);
        Ok(out)
    }

    /// Newest version of exactly `path`, if any (tombstones included).
    ///
    /// Errors: storage failures.
    pub fn latest(&self, path: &str) -> Result<Option<FileVersion>, StorageError> {
        let tx = self.db.begin_read().map_err(|e| sto_err(false, e))?;
        let l = tx.open_table(LATEST).map_err(|e| sto_err(false, e))?;
        let Some(seq) = l
            .get(path)
            .map_err(|e| sto_err(false, e))?
            .map(|g| g.value())
        else {
            return Ok(None);
        };
        let t = tx.open_table(VERSIONS).map_err(|e| sto_err(false, e))?;
        match t.get((path, seq)).map_err(|e| sto_err(false, e))? {
            Some(v) => Ok(Some(unjson(v.value())?)),
            None => Ok(None),
        }
    }

    /// Bytes of every non-tombstone version committed up to and including `seq` (0 for seq 0
    /// or a sequence number not in this catalog). `cum(b) - cum(a)` is the content committed in
    /// `(a, b]`.
    ///
    /// Errors: storage failures.
    pub fn cum_bytes_through(&self, seq: u64) -> Result<u64, StorageError> {
        if seq == 0 {
            return Ok(0);
        }
        let tx = self.db.begin_read().map_err(|e| sto_err(false, e))?;
        let t = tx.open_table(CUM_BYTES).map_err(|e| sto_err(false, e))?;
        let v = t
            .get(seq)
            .map_err(|e| sto_err(false, e))?
            .map(|g| g.value());
        Ok(v.unwrap_or(0))
    }

    /// Counters of the catalog.
    ///
    /// Errors: storage failures.
    pub fn stats(&self) -> Result<CatalogStats, StorageError> {
        let tx = self.db.begin_read().map_err(|e| sto_err(false, e))?;
        let m = tx.open_table(META).map_err(|e| sto_err(false, e))?;
        let mut s: CatalogStats = match m.get("stats").map_err(|e| sto_err(false, e))? {
            Some(v) => unjson(v.value())?,
            None => CatalogStats::default(),
        };
        s.versions = tx
            .open_table(VERSIONS)
            .map_err(|e| sto_err(false, e))?
            .len()
            .map_err(|e| sto_err(false, e))?;
        Ok(s)
    }
}

/// The openraft state machine over the catalog tables.
#[derive(Clone)]
pub struct StateMachineStore {
    db: Arc<Database>,
    catalog: Catalog,
    /// This node's blob store when it is local (not shared): `ForgetBlobs` deletes from it.
    local_blobs: Option<Arc<dyn BlobStore>>,
}

impl StateMachineStore {
    /// Opens the state machine in `db`, creating its tables.
    ///
    /// Errors: redb failures.
    pub fn open(db: Arc<Database>) -> Result<Self, StorageError> {
        let tx = db.begin_write().map_err(|e| sto_err(true, e))?;
        tx.open_table(VERSIONS).map_err(|e| sto_err(true, e))?;
        tx.open_table(LATEST).map_err(|e| sto_err(true, e))?;
        tx.open_table(BY_SEQ).map_err(|e| sto_err(true, e))?;
        tx.open_table(META).map_err(|e| sto_err(true, e))?;
        tx.open_table(SNAPSHOT).map_err(|e| sto_err(true, e))?;
        tx.open_table(CUM_BYTES).map_err(|e| sto_err(true, e))?;
        tx.open_table(CONDEMNED).map_err(|e| sto_err(true, e))?;
        build_refs_once(&tx)?;
        tx.commit().map_err(|e| sto_err(true, e))?;
        let catalog = Catalog::new(db.clone());
        Ok(StateMachineStore {
            db,
            catalog,
            local_blobs: None,
        })
    }

    /// Lets `ForgetBlobs` delete condemned blobs from `store` after applying (ignored for a
    /// shared store: there the leader's garbage collection pass deletes).
    pub fn with_blob_store(mut self, store: Arc<dyn BlobStore>) -> Self {
        self.local_blobs = (!store.is_shared()).then_some(store);
        self
    }

    /// Deletes `hashes` from the local blob store (errors are logged: a blob left behind only
    /// costs space).
    async fn delete_blobs(&self, hashes: &[BlobHash]) {
        let Some(store) = &self.local_blobs else {
            return;
        };
        let mut failed = 0usize;
        for h in hashes {
            if let Err(e) = store.delete(h).await {
                failed += 1;
                tracing::warn!(blob = %h, error = %e, "garbage collection could not delete a condemned blob");
            }
        }
        if !hashes.is_empty() {
            tracing::info!(
                deleted = hashes.len() - failed,
                failed,
                "condemned blobs deleted from the local store"
            );
        }
    }

    /// Read view of the same tables (its sequence watch is notified by `apply`).
    pub fn catalog(&self) -> Catalog {
        self.catalog.clone()
    }

    fn publish_last_seq(&self, next_seq: u64) {
        self.catalog
            .last_seq
            .send_replace(next_seq.saturating_sub(1));
    }

    fn publish_applied(&self, index: u64) {
        self.catalog.applied_index.send_if_modified(|i| {
            let newer = index > *i;
            *i = (*i).max(index);
            newer
        });
    }
}

fn meta_get<T: for<'a> Deserialize<'a>>(
    tx: &WriteTransaction,
    key: &str,
) -> Result<Option<T>, StorageError> {
    let m = tx.open_table(META).map_err(|e| sto_err(false, e))?;
    let r = match m.get(key).map_err(|e| sto_err(false, e))? {
        Some(v) => Some(unjson(v.value())?),
        None => None,
    };
    Ok(r)
}

fn meta_put<T: Serialize>(tx: &WriteTransaction, key: &str, v: &T) -> Result<(), StorageError> {
    let data = json(v)?;
    let mut m = tx.open_table(META).map_err(|e| sto_err(true, e))?;
    m.insert(key, data.as_slice())
        .map_err(|e| sto_err(true, e))?;
    Ok(())
}

/// Inserts one committed version and updates `latest`, `by_seq` and the counters.
fn insert_version(
    tx: &WriteTransaction,
    fv: &FileVersion,
    stats: &mut CatalogStats,
) -> Result<(), StorageError> {
    let mut latest = tx.open_table(LATEST).map_err(|e| sto_err(true, e))?;
    let mut versions = tx.open_table(VERSIONS).map_err(|e| sto_err(true, e))?;
    let prev_seq = latest
        .get(fv.v.path.as_str())
        .map_err(|e| sto_err(true, e))?
        .map(|g| g.value());
    if let Some(ps) = prev_seq {
        if let Some(pv) = versions
            .get((fv.v.path.as_str(), ps))
            .map_err(|e| sto_err(true, e))?
        {
            let prev: FileVersion = unjson(pv.value())?;
            if !prev.v.deleted {
                stats.live_entries = stats.live_entries.saturating_sub(1);
                stats.live_bytes = stats.live_bytes.saturating_sub(prev.v.size);
            }
        }
    }
    if !fv.v.deleted {
        stats.live_entries += 1;
        stats.live_bytes += fv.v.size;
        stats.committed_bytes += fv.v.size;
    }
    tx.open_table(CUM_BYTES)
        .map_err(|e| sto_err(true, e))?
        .insert(fv.seq, stats.committed_bytes)
        .map_err(|e| sto_err(true, e))?;
    let data = json(fv)?;
    versions
        .insert((fv.v.path.as_str(), fv.seq), data.as_slice())
        .map_err(|e| sto_err(true, e))?;
    latest
        .insert(fv.v.path.as_str(), fv.seq)
        .map_err(|e| sto_err(true, e))?;
    let mut by_seq = tx.open_table(BY_SEQ).map_err(|e| sto_err(true, e))?;
    by_seq
        .insert(fv.seq, fv.v.path.as_str())
        .map_err(|e| sto_err(true, e))?;
    add_refs(tx, fv, 1)
}

/// Adds `delta` (+1 or -1) to the reference count of every part of `fv` (a count reaching 0 is
/// removed).
fn add_refs(tx: &WriteTransaction, fv: &FileVersion, delta: i64) -> Result<(), StorageError> {
    if fv.v.parts.is_empty() {
        return Ok(());
    }
    let mut refs = tx.open_table(REFS).map_err(|e| sto_err(true, e))?;
    for p in &fv.v.parts {
        let key = p.hash.0.as_slice();
        let cur = refs
            .get(key)
            .map_err(|e| sto_err(true, e))?
            .map(|g| g.value())
            .unwrap_or(0);
        let new = (cur as i64 + delta).max(0) as u64;
        if new == 0 {
            refs.remove(key).map_err(|e| sto_err(true, e))?;
        } else {
            refs.insert(key, new).map_err(|e| sto_err(true, e))?;
        }
    }
    Ok(())
}

/// Builds `catalog.refs` from the stored versions once (catalogs written before garbage
/// collection existed); later `insert_version` and pruning keep it current.
fn build_refs_once(tx: &WriteTransaction) -> Result<(), StorageError> {
    if meta_get::<bool>(tx, "refs_built")?.unwrap_or(false) {
        tx.open_table(REFS).map_err(|e| sto_err(true, e))?;
        return Ok(());
    }
    tx.delete_table(REFS).map_err(|e| sto_err(true, e))?;
    let mut counts: std::collections::HashMap<BlobHash, u64> = Default::default();
    {
        let t = tx.open_table(VERSIONS).map_err(|e| sto_err(true, e))?;
        for item in t.iter().map_err(|e| sto_err(false, e))? {
            let (_, v) = item.map_err(|e| sto_err(false, e))?;
            let fv: FileVersion = unjson(v.value())?;
            for p in &fv.v.parts {
                *counts.entry(p.hash).or_default() += 1;
            }
        }
    }
    let mut refs = tx.open_table(REFS).map_err(|e| sto_err(true, e))?;
    for (h, n) in counts {
        refs.insert(h.0.as_slice(), n)
            .map_err(|e| sto_err(true, e))?;
    }
    drop(refs);
    meta_put(tx, "refs_built", &true)
}

/// Versions `PruneHistory { cutoff_ms }` removes from `t`: every version that has a newer
/// version of the same path committed at or before `cutoff_ms`. Only paths with two or more
/// versions are decoded.
fn prunable_versions(
    t: &impl ReadableTable<(&'static str, u64), &'static [u8]>,
    cutoff_ms: i64,
) -> Result<Vec<FileVersion>, StorageError> {
    let mut out = Vec::new();
    let mut group: Vec<(String, u64)> = Vec::new();
    let mut flush = |group: &mut Vec<(String, u64)>| -> Result<(), StorageError> {
        if group.len() >= 2 {
            // Newest first: a version is prunable when its successor was committed by the
            // cutoff.
            let mut successor_time: Option<i64> = None;
            for (path, seq) in group.iter().rev() {
                let Some(row) = t
                    .get((path.as_str(), *seq))
                    .map_err(|e| sto_err(false, e))?
                else {
                    continue;
                };
                let fv: FileVersion = unjson(row.value())?;
                let t_commit = fv.commit_time_ms;
                if successor_time.is_some_and(|st| st <= cutoff_ms) {
                    out.push(fv);
                }
                successor_time = Some(t_commit);
            }
        }
        group.clear();
        Ok(())
    };
    for item in t.iter().map_err(|e| sto_err(false, e))? {
        let (k, _) = item.map_err(|e| sto_err(false, e))?;
        let (path, seq) = k.value();
        if group.last().is_some_and(|(p, _)| p != path) {
            flush(&mut group)?;
        }
        group.push((path.to_string(), seq));
    }
    flush(&mut group)?;
    out.sort_by_key(|v| v.seq);
    Ok(out)
}

/// Applies `PruneHistory`: removes the prunable versions from `catalog.versions` and
/// `catalog.by_seq` and their references. Returns how many were removed.
fn prune_history(tx: &WriteTransaction, cutoff_ms: i64) -> Result<u64, StorageError> {
    let doomed = {
        let t = tx.open_table(VERSIONS).map_err(|e| sto_err(true, e))?;
        prunable_versions(&t, cutoff_ms)?
    };
    if doomed.is_empty() {
        return Ok(0);
    }
    {
        let mut versions = tx.open_table(VERSIONS).map_err(|e| sto_err(true, e))?;
        let mut by_seq = tx.open_table(BY_SEQ).map_err(|e| sto_err(true, e))?;
        for fv in &doomed {
            versions
                .remove((fv.v.path.as_str(), fv.seq))
                .map_err(|e| sto_err(true, e))?;
            by_seq.remove(fv.seq).map_err(|e| sto_err(true, e))?;
        }
    }
    for fv in &doomed {
        add_refs(tx, fv, -1)?;
    }
    Ok(doomed.len() as u64)
}

/// The condemned parts of `versions` that `restored` does not list (each once).
fn condemned_parts(
    tx: &WriteTransaction,
    versions: &[lifeboat_common::catalog::NewVersion],
    restored: &[BlobHash],
) -> Result<Vec<BlobHash>, StorageError> {
    let c = tx.open_table(CONDEMNED).map_err(|e| sto_err(false, e))?;
    if c.is_empty().map_err(|e| sto_err(false, e))? {
        return Ok(Vec::new());
    }
    let mut out: Vec<BlobHash> = Vec::new();
    for p in versions.iter().flat_map(|v| v.parts.iter()) {
        if restored.contains(&p.hash) || out.contains(&p.hash) {
            continue;
        }
        if c.get(p.hash.0.as_slice())
            .map_err(|e| sto_err(false, e))?
            .is_some()
        {
            out.push(p.hash);
        }
    }
    Ok(out)
}

/// Removes `hashes` from `catalog.condemned` (stored again).
fn uncondemn(tx: &WriteTransaction, hashes: &[BlobHash]) -> Result<(), StorageError> {
    if hashes.is_empty() {
        return Ok(());
    }
    let mut c = tx.open_table(CONDEMNED).map_err(|e| sto_err(true, e))?;
    for h in hashes {
        c.remove(h.0.as_slice()).map_err(|e| sto_err(true, e))?;
    }
    Ok(())
}

/// Records every unreferenced hash of `hashes` as condemned at log index `index`; returns them
/// (referenced ones, and repeats, are skipped).
fn condemn(
    tx: &WriteTransaction,
    hashes: &[BlobHash],
    index: u64,
) -> Result<Vec<BlobHash>, StorageError> {
    let refs = tx.open_table(REFS).map_err(|e| sto_err(false, e))?;
    let mut c = tx.open_table(CONDEMNED).map_err(|e| sto_err(true, e))?;
    let mut out = Vec::new();
    let mut seen = std::collections::HashSet::new();
    for h in hashes {
        if !seen.insert(*h) {
            continue;
        }
        let key = h.0.as_slice();
        if refs.get(key).map_err(|e| sto_err(false, e))?.is_some() {
            continue;
        }
        c.insert(key, index).map_err(|e| sto_err(true, e))?;
        out.push(*h);
    }
    Ok(out)
}

impl RaftSnapshotBuilder<TypeConfig> for StateMachineStore {
    async fn build_snapshot(&mut self) -> Result<Snapshot<TypeConfig>, StorageError> {
        let (data, last_applied, membership) = {
            let tx = self.db.begin_read().map_err(|e| sto_err(false, e))?;
            let m = tx.open_table(META).map_err(|e| sto_err(false, e))?;
            let get = |k: &str| -> Result<Option<Vec<u8>>, StorageError> {
                Ok(m.get(k)
                    .map_err(|e| sto_err(false, e))?
                    .map(|v| v.value().to_vec()))
            };
            let last_applied: Option<LogId<NodeId>> = match get("last_applied")? {
                Some(b) => unjson(&b)?,
                None => None,
            };
            let membership: StoredMembership<NodeId, BasicNode> = match get("membership")? {
                Some(b) => unjson(&b)?,
                None => StoredMembership::default(),
            };
            let stats: CatalogStats = match get("stats")? {
                Some(b) => unjson(&b)?,
                None => CatalogStats::default(),
            };
            let replication: ReplicationMeta = match get("replication")? {
                Some(b) => unjson(&b)?,
                None => ReplicationMeta::default(),
            };
            let t = tx.open_table(VERSIONS).map_err(|e| sto_err(false, e))?;
            let mut versions = Vec::new();
            for item in t.iter().map_err(|e| sto_err(false, e))? {
                let (_, v) = item.map_err(|e| sto_err(false, e))?;
                versions.push(unjson::<FileVersion>(v.value())?);
            }
            let gc: GcMeta = match get("gc")? {
                Some(b) => unjson(&b)?,
                None => GcMeta::default(),
            };
            let mut condemned = Vec::new();
            let c = tx.open_table(CONDEMNED).map_err(|e| sto_err(false, e))?;
            for item in c.iter().map_err(|e| sto_err(false, e))? {
                let (k, v) = item.map_err(|e| sto_err(false, e))?;
                let h: [u8; 32] = k.value().try_into().map_err(|_| {
                    sto_err(false, std::io::Error::other("bad key in catalog.condemned"))
                })?;
                condemned.push((BlobHash(h), v.value()));
            }
            let data = json(&SnapshotData {
                next_seq: stats.next_seq,
                versions,
                replication,
                condemned,
                gc,
            })?;
            (data, last_applied, membership)
        };
        let snapshot_id = format!(
            "{}-{}-{}",
            last_applied
                .map(|l| l.leader_id.to_string())
                .unwrap_or_default(),
            last_applied.map(|l| l.index).unwrap_or(0),
            lifeboat_common::now_ms()
        );
        let meta = SnapshotMeta {
            last_log_id: last_applied,
            last_membership: membership,
            snapshot_id,
        };
        let tx = self.db.begin_write().map_err(|e| sto_err(true, e))?;
        {
            let mut s = tx.open_table(SNAPSHOT).map_err(|e| sto_err(true, e))?;
            s.insert("meta", json(&meta)?.as_slice())
                .map_err(|e| sto_err(true, e))?;
            s.insert("data", data.as_slice())
                .map_err(|e| sto_err(true, e))?;
        }
        tx.commit().map_err(|e| sto_err(true, e))?;
        Ok(Snapshot {
            meta,
            snapshot: Box::new(Cursor::new(data)),
        })
    }
}

impl RaftStateMachine<TypeConfig> for StateMachineStore {
    type SnapshotBuilder = Self;

    async fn applied_state(
        &mut self,
    ) -> Result<(Option<LogId<NodeId>>, StoredMembership<NodeId, BasicNode>), StorageError> {
        let tx = self.db.begin_read().map_err(|e| sto_err(false, e))?;
        let m = tx.open_table(META).map_err(|e| sto_err(false, e))?;
        let la = match m.get("last_applied").map_err(|e| sto_err(false, e))? {
            Some(v) => unjson(v.value())?,
            None => None,
        };
        let mem = match m.get("membership").map_err(|e| sto_err(false, e))? {
            Some(v) => unjson(v.value())?,
            None => StoredMembership::default(),
        };
        Ok((la, mem))
    }

    async fn apply<I>(&mut self, entries: I) -> Result<Vec<Response>, StorageError>
    where
        I: IntoIterator<Item = Entry<TypeConfig>> + OptionalSend,
        I::IntoIter: OptionalSend,
    {
        let tx = self.db.begin_write().map_err(|e| sto_err(true, e))?;
        let mut stats: CatalogStats = meta_get(&tx, "stats")?.unwrap_or_default();
        if stats.next_seq == 0 {
            stats.next_seq = 1;
        }
        let mut repl: Option<ReplicationMeta> = None;
        let mut out = Vec::new();
        let mut to_delete: Vec<BlobHash> = Vec::new();
        let mut last_applied = None;
        for entry in entries {
            last_applied = Some(entry.log_id);
            match entry.payload {
                EntryPayload::Blank => out.push(Response::default()),
                EntryPayload::Membership(m) => {
                    meta_put(
                        &tx,
                        "membership",
                        &StoredMembership::new(Some(entry.log_id), m),
                    )?;
                    out.push(Response::default());
                }
                EntryPayload::Normal(Request::Catalog(CatalogCommand::CommitVersions {
                    versions,
                    commit_time_ms,
                    restored,
                })) => {
                    let rejected = condemned_parts(&tx, &versions, &restored)?;
                    if !rejected.is_empty() {
                        tracing::warn!(
                            index = entry.log_id.index,
                            blobs = rejected.len(),
                            "commit rejected: it references blobs garbage collection condemned"
                        );
                        out.push(Response {
                            rejected,
                            ..Default::default()
                        });
                        continue;
                    }
                    if !restored.is_empty() {
                        tracing::info!(
                            index = entry.log_id.index,
                            blobs = restored.len(),
                            first = %restored[0],
                            "commit restores blobs garbage collection had condemned"
                        );
                    }
                    uncondemn(&tx, &restored)?;
                    let mut seqs = Vec::with_capacity(versions.len());
                    for v in versions {
                        let fv = FileVersion {
                            seq: stats.next_seq,
                            commit_time_ms,
                            v,
                        };
                        stats.next_seq += 1;
                        insert_version(&tx, &fv, &mut stats)?;
                        seqs.push(fv.seq);
                    }
                    out.push(Response {
                        seqs,
                        accepted: true,
                        ..Default::default()
                    });
                }
                EntryPayload::Normal(Request::Catalog(CatalogCommand::ApplyReplicated {
                    versions,
                    upstream_region,
                    upstream_last_seq,
                    skip_through,
                    restored,
                })) => {
                    uncondemn(&tx, &restored)?;
                    if repl.is_none() {
                        repl = Some(meta_get(&tx, "replication")?.unwrap_or_default());
                    }
                    let r = repl.as_mut().expect("set above");
                    if !r.upstream_region.is_empty() && r.upstream_region != upstream_region {
                        // A new upstream (after a failover): park the old one's progress.
                        let old = std::mem::take(&mut r.upstream_region);
                        r.by_region.insert(old, r.upstream_seq);
                        r.upstream_seq = r.by_region.remove(&upstream_region).unwrap_or(0);
                        r.upstream_last_seq = r.upstream_seq;
                    }
                    let mut seqs = Vec::with_capacity(versions.len());
                    for up in versions {
                        // Already applied (the same rows proposed again after a leader change).
                        if up.seq <= r.upstream_seq {
                            continue;
                        }
                        r.upstream_seq = up.seq;
                        let fv = FileVersion {
                            seq: stats.next_seq,
                            commit_time_ms: up.commit_time_ms,
                            v: up.v,
                        };
                        stats.next_seq += 1;
                        insert_version(&tx, &fv, &mut stats)?;
                        seqs.push(fv.seq);
                    }
                    r.upstream_seq = r.upstream_seq.max(skip_through);
                    r.upstream_last_seq = upstream_last_seq.max(r.upstream_seq);
                    r.upstream_region = upstream_region;
                    out.push(Response {
                        seqs,
                        accepted: true,
                        ..Default::default()
                    });
                }
                EntryPayload::Normal(Request::Catalog(CatalogCommand::PruneHistory {
                    cutoff_ms,
                })) => {
                    let pruned = prune_history(&tx, cutoff_ms)?;
                    if pruned > 0 {
                        let mut g: GcMeta = meta_get(&tx, "gc")?.unwrap_or_default();
                        g.pruned_versions += pruned;
                        meta_put(&tx, "gc", &g)?;
                    }
                    out.push(Response {
                        pruned,
                        accepted: true,
                        ..Default::default()
                    });
                }
                EntryPayload::Normal(Request::Catalog(CatalogCommand::ForgetBlobs { hashes })) => {
                    let condemned = condemn(&tx, &hashes, entry.log_id.index)?;
                    let mut g: GcMeta = meta_get(&tx, "gc")?.unwrap_or_default();
                    g.forget_index = entry.log_id.index;
                    meta_put(&tx, "gc", &g)?;
                    tracing::info!(
                        index = entry.log_id.index,
                        proposed = hashes.len(),
                        condemned = condemned.len(),
                        "blobs condemned by garbage collection"
                    );
                    to_delete.extend_from_slice(&condemned);
                    out.push(Response {
                        condemned,
                        accepted: true,
                        ..Default::default()
                    });
                }
                EntryPayload::Normal(Request::Control(_)) => out.push(Response::default()),
            }
        }
        meta_put(&tx, "stats", &stats)?;
        if let Some(r) = &repl {
            meta_put(&tx, "replication", r)?;
        }
        if let Some(la) = last_applied {
            meta_put(&tx, "last_applied", &Some(la))?;
        }
        // A blob condemned and restored by later entries of the same call stays.
        if !to_delete.is_empty() {
            let still: std::collections::HashSet<BlobHash> = {
                let c = tx.open_table(CONDEMNED).map_err(|e| sto_err(false, e))?;
                let mut still = std::collections::HashSet::new();
                for h in &to_delete {
                    if c.get(h.0.as_slice())
                        .map_err(|e| sto_err(false, e))?
                        .is_some()
                    {
                        still.insert(*h);
                    }
                }
                still
            };
            to_delete.retain(|h| still.contains(h));
        }
        tx.commit().map_err(|e| sto_err(true, e))?;
        // Only once the condemnation is durable: delete (a crash in between leaves the blobs
        // behind, which costs space only).
        self.delete_blobs(&to_delete).await;
        self.publish_last_seq(stats.next_seq);
        if let Some(la) = last_applied {
            self.publish_applied(la.index);
        }
        Ok(out)
    }

    async fn get_snapshot_builder(&mut self) -> Self::SnapshotBuilder {
        self.clone()
    }

    async fn begin_receiving_snapshot(&mut self) -> Result<Box<Cursor<Vec<u8>>>, StorageError> {
        Ok(Box::new(Cursor::new(Vec::new())))
    }

    async fn install_snapshot(
        &mut self,
        meta: &SnapshotMeta<NodeId, BasicNode>,
        snapshot: Box<Cursor<Vec<u8>>>,
    ) -> Result<(), StorageError> {
        let bytes = snapshot.into_inner();
        let data: SnapshotData = unjson(&bytes)?;
        let applied_before = Catalog::read_applied_index(&self.db)?;
        let tx = self.db.begin_write().map_err(|e| sto_err(true, e))?;
        tx.delete_table(VERSIONS).map_err(|e| sto_err(true, e))?;
        tx.delete_table(LATEST).map_err(|e| sto_err(true, e))?;
        tx.delete_table(BY_SEQ).map_err(|e| sto_err(true, e))?;
        tx.delete_table(CUM_BYTES).map_err(|e| sto_err(true, e))?;
        tx.delete_table(REFS).map_err(|e| sto_err(true, e))?;
        tx.delete_table(CONDEMNED).map_err(|e| sto_err(true, e))?;
        {
            let mut c = tx.open_table(CONDEMNED).map_err(|e| sto_err(true, e))?;
            for (h, index) in &data.condemned {
                c.insert(h.0.as_slice(), *index)
                    .map_err(|e| sto_err(true, e))?;
            }
        }
        let mut stats = CatalogStats {
            next_seq: data.next_seq.max(1),
            ..Default::default()
        };
        let mut versions = data.versions;
        versions.sort_by_key(|v| v.seq);
        for fv in &versions {
            lifeboat_common::path::validate_rel_path(&fv.v.path).map_err(|e| sto_err(false, e))?;
            insert_version(&tx, fv, &mut stats)?;
        }
        meta_put(&tx, "stats", &stats)?;
        meta_put(&tx, "replication", &data.replication)?;
        meta_put(&tx, "gc", &data.gc)?;
        meta_put(&tx, "refs_built", &true)?;
        meta_put(&tx, "last_applied", &meta.last_log_id)?;
        meta_put(&tx, "membership", &meta.last_membership)?;
        {
            let mut s = tx.open_table(SNAPSHOT).map_err(|e| sto_err(true, e))?;
            s.insert("meta", json(meta)?.as_slice())
                .map_err(|e| sto_err(true, e))?;
            s.insert("data", bytes.as_slice())
                .map_err(|e| sto_err(true, e))?;
        }
        tx.commit().map_err(|e| sto_err(true, e))?;
        // Condemnations this node skips by installing the snapshot: delete those blobs too.
        // Only those condemned after what it had applied: it deleted the older ones when it
        // applied them, and a copy it holds of one of those may be a restored blob whose
        // restoring commit comes after the snapshot.
        let condemned: Vec<BlobHash> = data
            .condemned
            .iter()
            .filter(|(_, index)| *index > applied_before)
            .map(|(h, _)| *h)
            .collect();
        self.delete_blobs(&condemned).await;
        self.publish_last_seq(stats.next_seq);
        if let Some(la) = meta.last_log_id {
            self.publish_applied(la.index);
        }
        Ok(())
    }

    async fn get_current_snapshot(&mut self) -> Result<Option<Snapshot<TypeConfig>>, StorageError> {
        let tx = self.db.begin_read().map_err(|e| sto_err(false, e))?;
        let s = tx.open_table(SNAPSHOT).map_err(|e| sto_err(false, e))?;
        let meta = s
            .get("meta")
            .map_err(|e| sto_err(false, e))?
            .map(|v| v.value().to_vec());
        let data = s
            .get("data")
            .map_err(|e| sto_err(false, e))?
            .map(|v| v.value().to_vec());
        match (meta, data) {
            (Some(m), Some(d)) => Ok(Some(Snapshot {
                meta: unjson(&m)?,
                snapshot: Box::new(Cursor::new(d)),
            })),
            _ => Ok(None),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::raft::LogStore;

    struct Builder;

    impl openraft::testing::StoreBuilder<TypeConfig, LogStore, StateMachineStore, tempfile::TempDir>
        for Builder
    {
        async fn build(
            &self,
        ) -> Result<(tempfile::TempDir, LogStore, StateMachineStore), StorageError> {
            let dir = tempfile::tempdir().expect("tempdir");
            let db = Arc::new(Database::create(dir.path().join("t.redb")).expect("redb"));
            Ok((
                dir,
                LogStore::open(db.clone(), "region")?,
                StateMachineStore::open(db)?,
            ))
        }
    }

    fn upstream_version(seq: u64, path: &str, commit_time_ms: i64) -> FileVersion {
        FileVersion {
            seq,
            commit_time_ms,
            v: lifeboat_common::catalog::NewVersion {
                path: path.into(),
                kind: lifeboat_common::catalog::EntryKind::Dir,
                deleted: false,
                size: 0,
                mode: 0o755,
                mtime_ns: 0,
                blake3: None,
                parts: vec![],
                symlink_target: None,
                epoch: 7,
                region: "eu-west".into(),
                agent_id: String::new(),
                rename_from: None,
            },
        }
    }

    /// Builds a snapshot of `sm` and installs it into a new store (in a new temp dir).
    async fn snapshot_into_fresh_store(
        sm: &mut StateMachineStore,
    ) -> (tempfile::TempDir, StateMachineStore) {
        let snap = sm
            .get_snapshot_builder()
            .await
            .build_snapshot()
            .await
            .unwrap();
        let dir = tempfile::tempdir().unwrap();
        let db = Arc::new(Database::create(dir.path().join("t.redb")).unwrap());
        let mut fresh = StateMachineStore::open(db).unwrap();
        fresh
            .install_snapshot(&snap.meta, snap.snapshot)
            .await
            .unwrap();
        (dir, fresh)
    }

    fn entry(index: u64, req: impl Into<Request>) -> Entry<TypeConfig> {
        Entry {
            log_id: LogId::new(openraft::CommittedLeaderId::new(1, 1), index),
            payload: EntryPayload::Normal(req.into()),
        }
    }

    /// Replicated versions get local sequence numbers but keep their commit time, epoch and
    /// region; a batch proposed twice (two leaders) is applied once; the progress survives a
    /// snapshot.
    #[tokio::test]
    async fn replicated_versions_are_applied_once_with_original_times() {
        let dir = tempfile::tempdir().unwrap();
        let db = Arc::new(Database::create(dir.path().join("t.redb")).unwrap());
        let mut sm = StateMachineStore::open(db).unwrap();
        let cat = sm.catalog();
        let mut seq_rx = cat.watch_last_seq();
        let batch = |from: u64, to: u64| CatalogCommand::ApplyReplicated {
            versions: (from..=to)
                .map(|s| upstream_version(s, &format!("data/d{s}"), 1000 + s as i64))
                .collect(),
            upstream_region: "eu-west".into(),
            upstream_last_seq: 10,
            skip_through: 0,
            restored: vec![],
        };
        let out = sm
            .apply([entry(1, batch(1, 3)), entry(2, batch(2, 5))])
            .await
            .unwrap();
        assert_eq!(out[0].seqs, vec![1, 2, 3]);
        assert_eq!(out[1].seqs, vec![4, 5], "rows 2 and 3 were applied already");
        assert!(seq_rx.has_changed().unwrap());
        assert_eq!(*seq_rx.borrow_and_update(), 5);
        assert_eq!(cat.upstream_seq().unwrap(), 5);
        let r = cat.replication().unwrap();
        assert_eq!(
            (r.upstream_last_seq, r.upstream_region.as_str()),
            (10, "eu-west")
        );
        let v = cat.latest("data/d4").unwrap().unwrap();
        assert_eq!((v.seq, v.commit_time_ms, v.v.epoch), (4, 1004, 7));
        assert_eq!(v.v.region, "eu-west");
        let rows = cat.changes_since(2, 2).unwrap();
        assert_eq!(rows.iter().map(|v| v.seq).collect::<Vec<_>>(), vec![2, 3]);
        assert_eq!(cat.last_seq().unwrap(), 5);
        // A local commit after replicated ones continues the local sequence.
        let out = sm
            .apply([entry(
                3,
                CatalogCommand::CommitVersions {
                    versions: vec![upstream_version(0, "data/local", 0).v],
                    commit_time_ms: 5000,
                    restored: vec![],
                },
            )])
            .await
            .unwrap();
        assert_eq!(out[0].seqs, vec![6]);

        // Snapshot into a fresh store: the replication progress comes along.
        let (_dir2, mut sm2) = snapshot_into_fresh_store(&mut sm).await;
        let cat2 = sm2.catalog();
        assert_eq!(cat2.replication().unwrap(), r);
        assert_eq!(cat2.last_seq().unwrap(), 6);
        assert_eq!(*cat2.watch_last_seq().borrow(), 6);
        let out = sm2.apply([entry(9, batch(4, 6))]).await.unwrap();
        assert_eq!(out[0].seqs, vec![7], "only upstream row 6 is new");

        // Snapshots written before replication existed still load.
        let old = serde_json::json!({"next_seq": 1, "versions": []});
        let d: SnapshotData = serde_json::from_value(old).unwrap();
        assert_eq!(d.replication, ReplicationMeta::default());
    }

    fn file(path: &str, parts: &[BlobHash]) -> lifeboat_common::catalog::NewVersion {
        let mut v = upstream_version(0, path, 0).v;
        v.kind = lifeboat_common::catalog::EntryKind::File;
        v.size = parts.len() as u64;
        v.parts = parts
            .iter()
            .map(|h| lifeboat_common::catalog::PartRef { hash: *h, size: 1 })
            .collect();
        v
    }

    fn tombstone(path: &str) -> lifeboat_common::catalog::NewVersion {
        let mut v = file(path, &[]);
        v.deleted = true;
        v
    }

    fn commit(
        versions: Vec<lifeboat_common::catalog::NewVersion>,
        t: i64,
        restored: Vec<BlobHash>,
    ) -> CatalogCommand {
        CatalogCommand::CommitVersions {
            versions,
            commit_time_ms: t,
            restored,
        }
    }

    /// Pruning removes superseded versions whose successor was committed by the cutoff, keeps
    /// the newest version of every path (a tombstone too) and versions superseded later, and
    /// updates references; `changes_since` skips the removed sequence numbers. `ForgetBlobs`
    /// condemns only unreferenced blobs and deletes them from the local store after applying;
    /// a commit referencing a condemned blob is rejected whole unless `restored` lists it,
    /// which clears it. A snapshot carries the condemned set and rebuilds the references.
    #[tokio::test]
    async fn gc_rules_prune_forget_reject_restore() {
        let dir = tempfile::tempdir().unwrap();
        let db = Arc::new(Database::create(dir.path().join("t.redb")).unwrap());
        let store: Arc<dyn BlobStore> = Arc::new(
            lifeboat_common::blobstore::LocalBlobStore::open(dir.path().join("blobs")).unwrap(),
        );
        let mut sm = StateMachineStore::open(db)
            .unwrap()
            .with_blob_store(store.clone());
        let cat = sm.catalog();
        let [h1, h2, h3, h4] = [b"1", b"2", b"3", b"4"].map(|b| BlobHash::of(b));
        for h in [h1, h2, h3, h4] {
            store.put(&h, vec![0]).await.unwrap();
        }
        // a: 1 (t 100) -> 2 (t 200) -> 3 tombstone (t 300); b: 4 alone; c: 5 (t 100) -> 6 (t 1000).
        sm.apply([
            entry(
                1,
                commit(
                    vec![file("a", &[h1]), file("b", &[h1]), file("c", &[h1])],
                    100,
                    vec![],
                ),
            ),
            entry(2, commit(vec![file("a", &[h2, h2])], 200, vec![])),
            entry(3, commit(vec![tombstone("a")], 300, vec![])),
            entry(4, commit(vec![file("c", &[h3])], 1000, vec![])),
        ])
        .await
        .unwrap();
        assert_eq!(cat.refcounts(&[h1, h2, h3, h4]).unwrap(), vec![3, 2, 1, 0]);
        assert_eq!(cat.prunable(500).unwrap().len(), 2);
        let out = sm
            .apply([entry(5, CatalogCommand::PruneHistory { cutoff_ms: 500 })])
            .await
            .unwrap();
        assert_eq!(out[0].pruned, 2);
        let seqs = |c: &Catalog| {
            c.changes_since(0, 100)
                .unwrap()
                .iter()
                .map(|v| v.seq)
                .collect::<Vec<_>>()
        };
        // seq 1 = a@100, 4 = a@200 pruned; the tombstone (5), b (2) and both c (3, 6) stay.
        assert_eq!(seqs(&cat), vec![2, 3, 5, 6]);
        assert!(cat.latest("a").unwrap().unwrap().v.deleted);
        assert_eq!(cat.refcounts(&[h1, h2, h3, h4]).unwrap(), vec![2, 0, 1, 0]);
        assert_eq!(cat.gc_meta().unwrap().pruned_versions, 2);
        // Pruning again removes nothing; a later cutoff also takes c@100.
        let out = sm
            .apply([
                entry(6, CatalogCommand::PruneHistory { cutoff_ms: 500 }),
                entry(7, CatalogCommand::PruneHistory { cutoff_ms: 1000 }),
            ])
            .await
            .unwrap();
        assert_eq!((out[0].pruned, out[1].pruned), (0, 1));
        assert_eq!(seqs(&cat), vec![2, 5, 6]);

        // h1 is still referenced by b: skipped. h2 and h4 are condemned and deleted.
        let out = sm
            .apply([entry(
                8,
                CatalogCommand::ForgetBlobs {
                    hashes: vec![h1, h2, h4, h2],
                },
            )])
            .await
            .unwrap();
        assert_eq!(out[0].condemned, vec![h2, h4]);
        assert!(store.contains(&h1).await.unwrap());
        assert!(!store.contains(&h2).await.unwrap());
        assert!(!store.contains(&h4).await.unwrap());
        assert_eq!(
            cat.condemned_among(&[h1, h2, h3, h4]).unwrap(),
            vec![h2, h4]
        );
        assert_eq!(cat.gc_meta().unwrap().forget_index, 8);
        assert!(cat.wait_applied(8, std::time::Duration::from_secs(1)).await);

        // A commit reusing h2 without `restored` is rejected whole.
        let last = cat.last_seq().unwrap();
        let out = sm
            .apply([entry(
                9,
                commit(vec![file("d", &[h1]), file("e", &[h2])], 2000, vec![]),
            )])
            .await
            .unwrap();
        assert_eq!(out[0].rejected, vec![h2]);
        assert!(out[0].seqs.is_empty());
        assert_eq!(cat.last_seq().unwrap(), last);
        assert!(cat.latest("d").unwrap().is_none());
        // Listed as restored: committed, and h2 is no longer condemned (h4 still is).
        let out = sm
            .apply([entry(10, commit(vec![file("e", &[h2])], 2001, vec![h2]))])
            .await
            .unwrap();
        assert!(out[0].rejected.is_empty());
        assert_eq!(out[0].seqs.len(), 1);
        assert_eq!(cat.condemned_among(&[h2, h4]).unwrap(), vec![h4]);
        assert_eq!(cat.refcount(&h2).unwrap(), 1);
        // Condemned and restored within one apply call (a follower catching up): the blob the
        // restoring commit needs is not deleted afterwards.
        let h5 = BlobHash::of(b"5");
        store.put(&h5, vec![0]).await.unwrap();
        let out = sm
            .apply([
                entry(11, CatalogCommand::ForgetBlobs { hashes: vec![h5] }),
                entry(12, commit(vec![file("g", &[h5])], 2002, vec![h5])),
            ])
            .await
            .unwrap();
        assert_eq!(out[0].condemned, vec![h5]);
        assert_eq!(out[1].seqs.len(), 1);
        assert!(store.contains(&h5).await.unwrap(), "restored blob deleted");
        assert!(cat.condemned_among(&[h5]).unwrap().is_empty());

        // Snapshot into a fresh store: condemned set and references come along.
        let (_dir2, mut sm2) = snapshot_into_fresh_store(&mut sm).await;
        let cat2 = sm2.catalog();
        assert_eq!(cat2.condemned_among(&[h1, h2, h3, h4]).unwrap(), vec![h4]);
        assert_eq!(
            cat2.refcounts(&[h1, h2, h3, h4, h5]).unwrap(),
            vec![1, 1, 1, 0, 1]
        );
        assert_eq!(cat2.gc_meta().unwrap().forget_index, 11);
        let out = sm2
            .apply([entry(13, commit(vec![file("f", &[h4])], 3000, vec![]))])
            .await
            .unwrap();
        assert_eq!(out[0].rejected, vec![h4]);
    }

    /// A catalog written before `catalog.refs` existed gets its references counted at open.
    #[tokio::test]
    async fn refs_are_built_for_old_catalogs() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("t.redb");
        let h = BlobHash::of(b"x");
        {
            let db = Arc::new(Database::create(&path).unwrap());
            let mut sm = StateMachineStore::open(db.clone()).unwrap();
            sm.apply([entry(
                1,
                commit(vec![file("a", &[h]), file("b", &[h])], 1, vec![]),
            )])
            .await
            .unwrap();
            // Simulate the old layout: no references, no marker.
            let tx = db.begin_write().unwrap();
            tx.delete_table(REFS).unwrap();
            tx.open_table(META).unwrap().remove("refs_built").unwrap();
            tx.commit().unwrap();
        }
        let db = Arc::new(Database::create(&path).unwrap());
        let sm = StateMachineStore::open(db).unwrap();
        assert_eq!(sm.catalog().refcount(&h).unwrap(), 2);
    }

    /// openraft's own storage conformance suite against our redb log and state machine.
    #[test]
    fn openraft_storage_suite() {
        openraft::testing::Suite::test_all(Builder).expect("openraft storage suite");
    }
}
