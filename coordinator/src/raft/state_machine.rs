//! The catalog state machine in redb. Tables:
//!
//! | table | key | value |
//! |---|---|---|
//! | `catalog.versions` | (path, seq) | JSON [`FileVersion`] |
//! | `catalog.latest` | path | seq of the newest version |
//! | `catalog.by_seq` | seq | path (for "changes since seq" subscriptions) |
//! | `catalog.meta` | `last_applied`, `membership`, `stats` ([`CatalogStats`]), `replication` ([`ReplicationMeta`]) | JSON |
//! | `catalog.snapshot` | `meta`, `data` | the current openraft snapshot |
//!
//! Applying entries is one redb write transaction per `apply` call. A snapshot is the JSON of
//! [`SnapshotData`]: every version plus the sequence counter; installing one replaces the tables.
//!
//! A standby region's catalog also records how far it has copied the upstream (active) region's
//! catalog ([`ReplicationMeta`]), committed in the same transaction as the copied versions.

use std::io::Cursor;
use std::sync::Arc;

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

use super::types::{sto_err, NodeId, Request, Response, StorageError, TypeConfig};

const VERSIONS: TableDefinition<(&str, u64), &[u8]> = TableDefinition::new("catalog.versions");
const LATEST: TableDefinition<&str, u64> = TableDefinition::new("catalog.latest");
const BY_SEQ: TableDefinition<u64, &str> = TableDefinition::new("catalog.by_seq");
const META: TableDefinition<&str, &[u8]> = TableDefinition::new("catalog.meta");
const SNAPSHOT: TableDefinition<&str, &[u8]> = TableDefinition::new("catalog.snapshot");
/// Sequence number -> bytes of every non-tombstone version committed up to it (cumulative; the
/// difference between two sequence numbers is the content committed between them: lag in bytes).
const CUM_BYTES: TableDefinition<u64, u64> = TableDefinition::new("catalog.cum_bytes");

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
        Catalog {
            db,
            last_seq: Arc::new(watch::channel(last_seq).0),
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
        tx.commit().map_err(|e| sto_err(true, e))?;
        let catalog = Catalog::new(db.clone());
        Ok(StateMachineStore { db, catalog })
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
    Ok(())
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
            let data = json(&SnapshotData {
                next_seq: stats.next_seq,
                versions,
                replication,
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
                EntryPayload::Normal(Request::CommitVersions {
                    versions,
                    commit_time_ms,
                }) => {
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
                    });
                }
                EntryPayload::Normal(Request::ApplyReplicated {
                    versions,
                    upstream_region,
                    upstream_last_seq,
                    skip_through,
                }) => {
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
        tx.commit().map_err(|e| sto_err(true, e))?;
        self.publish_last_seq(stats.next_seq);
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
        let tx = self.db.begin_write().map_err(|e| sto_err(true, e))?;
        tx.delete_table(VERSIONS).map_err(|e| sto_err(true, e))?;
        tx.delete_table(LATEST).map_err(|e| sto_err(true, e))?;
        tx.delete_table(BY_SEQ).map_err(|e| sto_err(true, e))?;
        tx.delete_table(CUM_BYTES).map_err(|e| sto_err(true, e))?;
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
        self.publish_last_seq(stats.next_seq);
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

    fn entry(index: u64, req: Request) -> Entry<TypeConfig> {
        Entry {
            log_id: LogId::new(openraft::CommittedLeaderId::new(1, 1), index),
            payload: EntryPayload::Normal(req),
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
        let batch = |from: u64, to: u64| Request::ApplyReplicated {
            versions: (from..=to)
                .map(|s| upstream_version(s, &format!("data/d{s}"), 1000 + s as i64))
                .collect(),
            upstream_region: "eu-west".into(),
            upstream_last_seq: 10,
            skip_through: 0,
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
                Request::CommitVersions {
                    versions: vec![upstream_version(0, "data/local", 0).v],
                    commit_time_ms: 5000,
                },
            )])
            .await
            .unwrap();
        assert_eq!(out[0].seqs, vec![6]);

        // Snapshot into a fresh store: the replication progress comes along.
        let snap = sm
            .get_snapshot_builder()
            .await
            .build_snapshot()
            .await
            .unwrap();
        let dir2 = tempfile::tempdir().unwrap();
        let db2 = Arc::new(Database::create(dir2.path().join("t.redb")).unwrap());
        let mut sm2 = StateMachineStore::open(db2).unwrap();
        sm2.install_snapshot(&snap.meta, snap.snapshot)
            .await
            .unwrap();
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

    /// openraft's own storage conformance suite against our redb log and state machine.
    #[test]
    fn openraft_storage_suite() {
        openraft::testing::Suite::test_all(Builder).expect("openraft storage suite");
    }
}
