//! The catalog state machine in redb. Tables:
//!
//! | table | key | value |
//! |---|---|---|
//! | `catalog.versions` | (path, seq) | JSON [`FileVersion`] |
//! | `catalog.latest` | path | seq of the newest version |
//! | `catalog.by_seq` | seq | path (for "changes since seq" subscriptions) |
//! | `catalog.meta` | `last_applied`, `membership`, `next_seq`, `live_entries`, `live_bytes` | JSON |
//! | `catalog.snapshot` | `meta`, `data` | the current openraft snapshot |
//!
//! Applying entries is one redb write transaction per `apply` call. A snapshot is the JSON of
//! [`SnapshotData`]: every version plus the sequence counter; installing one replaces the tables.

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

use super::types::{sto_err, NodeId, Request, Response, StorageError, TypeConfig};

const VERSIONS: TableDefinition<(&str, u64), &[u8]> = TableDefinition::new("catalog.versions");
const LATEST: TableDefinition<&str, u64> = TableDefinition::new("catalog.latest");
const BY_SEQ: TableDefinition<u64, &str> = TableDefinition::new("catalog.by_seq");
const META: TableDefinition<&str, &[u8]> = TableDefinition::new("catalog.meta");
const SNAPSHOT: TableDefinition<&str, &[u8]> = TableDefinition::new("catalog.snapshot");

/// Serialized form of a catalog snapshot.
#[derive(Debug, Serialize, Deserialize)]
pub struct SnapshotData {
    /// Next sequence number to assign.
    pub next_seq: u64,
    /// Every version of every path.
    pub versions: Vec<FileVersion>,
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
}

/// Read access to the catalog, for the admin API and intake (any node; reads are local).
#[derive(Clone)]
pub struct Catalog {
    db: Arc<Database>,
}

fn json<T: Serialize>(v: &T) -> Result<Vec<u8>, StorageError> {
    serde_json::to_vec(v).map_err(|e| sto_err(true, e))
}

fn unjson<T: for<'a> Deserialize<'a>>(b: &[u8]) -> Result<T, StorageError> {
    serde_json::from_slice(b).map_err(|e| sto_err(false, e))
}

impl Catalog {
    /// Catalog view of `db`.
    pub fn new(db: Arc<Database>) -> Self {
        Catalog { db }
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
        tx.commit().map_err(|e| sto_err(true, e))?;
        Ok(StateMachineStore { db })
    }

    /// Read view of the same tables.
    pub fn catalog(&self) -> Catalog {
        Catalog::new(self.db.clone())
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
    }
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
            let t = tx.open_table(VERSIONS).map_err(|e| sto_err(false, e))?;
            let mut versions = Vec::new();
            for item in t.iter().map_err(|e| sto_err(false, e))? {
                let (_, v) = item.map_err(|e| sto_err(false, e))?;
                versions.push(unjson::<FileVersion>(v.value())?);
            }
            let data = json(&SnapshotData {
                next_seq: stats.next_seq,
                versions,
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
                    out.push(Response { seqs });
                }
            }
        }
        meta_put(&tx, "stats", &stats)?;
        if let Some(la) = last_applied {
            meta_put(&tx, "last_applied", &Some(la))?;
        }
        tx.commit().map_err(|e| sto_err(true, e))?;
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
        meta_put(&tx, "last_applied", &meta.last_log_id)?;
        meta_put(&tx, "membership", &meta.last_membership)?;
        {
            let mut s = tx.open_table(SNAPSHOT).map_err(|e| sto_err(true, e))?;
            s.insert("meta", json(meta)?.as_slice())
                .map_err(|e| sto_err(true, e))?;
            s.insert("data", bytes.as_slice())
                .map_err(|e| sto_err(true, e))?;
        }
        tx.commit().map_err(|e| sto_err(true, e))
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

    /// openraft's own storage conformance suite against our redb log and state machine.
    #[test]
    fn openraft_storage_suite() {
        openraft::testing::Suite::test_all(Builder).expect("openraft storage suite");
    }
}
