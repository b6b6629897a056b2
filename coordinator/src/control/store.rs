//! The global group's state machine in redb: table `global.sm` holds `state` (JSON of
//! [`ControlState`]), `last_applied`, `membership`, and the current snapshot (`snap_meta`,
//! `snap_data`). The state is small (a record, a policy, at most
//! [`AUDIT_KEEP`](super::record::AUDIT_KEEP) audit entries), so every `apply` rewrites it in one
//! redb transaction, and a snapshot is its JSON. The applied state is also published on a
//! `watch` channel that the runtime reads.

// openraft fixes the storage error type (see crate::raft).
#![allow(clippy::result_large_err)]

use std::io::Cursor;
use std::sync::Arc;

use openraft::storage::{RaftStateMachine, Snapshot};
use openraft::{
    BasicNode, Entry, EntryPayload, LogId, OptionalSend, RaftSnapshotBuilder, SnapshotMeta,
    StoredMembership,
};
use redb::{Database, ReadableDatabase, TableDefinition};
use serde::{Deserialize, Serialize};
use tokio::sync::watch;

use super::record::ControlState;
use crate::raft::types::{sto_err, NodeId, Request, Response, StorageError, TypeConfig};

const SM: TableDefinition<&str, &[u8]> = TableDefinition::new("global.sm");

#[derive(Serialize, Deserialize)]
struct SnapshotData {
    state: ControlState,
}

/// State machine of the global group (cheap to clone).
#[derive(Clone)]
pub struct ControlStore {
    db: Arc<Database>,
    tx: Arc<watch::Sender<ControlState>>,
}

fn get<T: for<'a> Deserialize<'a>>(db: &Database, key: &str) -> Result<Option<T>, StorageError> {
    let tx = db.begin_read().map_err(|e| sto_err(false, e))?;
    let t = match tx.open_table(SM) {
        Ok(t) => t,
        Err(redb::TableError::TableDoesNotExist(_)) => return Ok(None),
        Err(e) => return Err(sto_err(false, e)),
    };
    match t.get(key).map_err(|e| sto_err(false, e))? {
        Some(v) => Ok(Some(
            serde_json::from_slice(v.value()).map_err(|e| sto_err(false, e))?,
        )),
        None => Ok(None),
    }
}

fn put_all(db: &Database, kv: &[(&str, Vec<u8>)]) -> Result<(), StorageError> {
    let tx = db.begin_write().map_err(|e| sto_err(true, e))?;
    {
        let mut t = tx.open_table(SM).map_err(|e| sto_err(true, e))?;
        for (k, v) in kv {
            t.insert(*k, v.as_slice()).map_err(|e| sto_err(true, e))?;
        }
    }
    tx.commit().map_err(|e| sto_err(true, e))
}

fn json<T: Serialize>(v: &T) -> Result<Vec<u8>, StorageError> {
    serde_json::to_vec(v).map_err(|e| sto_err(true, e))
}

impl ControlStore {
    /// Opens (or creates) the global state machine in `db`.
    ///
    /// Errors: redb or JSON failures as [`StorageError`].
    pub fn open(db: Arc<Database>) -> Result<Self, StorageError> {
        let state: ControlState = get(&db, "state")?.unwrap_or_default();
        Ok(ControlStore {
            db,
            tx: Arc::new(watch::channel(state).0),
        })
    }

    /// The applied state, updated after every apply or snapshot install.
    pub fn watch(&self) -> watch::Receiver<ControlState> {
        self.tx.subscribe()
    }

    /// A copy of the applied state.
    pub fn state(&self) -> ControlState {
        self.tx.borrow().clone()
    }
}

impl RaftSnapshotBuilder<TypeConfig> for ControlStore {
    async fn build_snapshot(&mut self) -> Result<Snapshot<TypeConfig>, StorageError> {
        let last_applied: Option<LogId<NodeId>> = get(&self.db, "last_applied")?.flatten();
        let membership: StoredMembership<NodeId, BasicNode> =
            get(&self.db, "membership")?.unwrap_or_default();
        let data = json(&SnapshotData {
            state: self.state(),
        })?;
        let id = match last_applied {
            Some(l) => format!("global-{}-{}", l.leader_id.term, l.index),
            None => "global-empty".to_string(),
        };
        let meta = SnapshotMeta {
            last_log_id: last_applied,
            last_membership: membership,
            snapshot_id: id,
        };
        put_all(
            &self.db,
            &[("snap_meta", json(&meta)?), ("snap_data", data.clone())],
        )?;
        Ok(Snapshot {
            meta,
            snapshot: Box::new(Cursor::new(data)),
        })
    }
}

impl RaftStateMachine<TypeConfig> for ControlStore {
    type SnapshotBuilder = Self;

    async fn applied_state(
        &mut self,
    ) -> Result<(Option<LogId<NodeId>>, StoredMembership<NodeId, BasicNode>), StorageError> {
        Ok((
            get(&self.db, "last_applied")?.flatten(),
            get(&self.db, "membership")?.unwrap_or_default(),
        ))
    }

    async fn apply<I>(&mut self, entries: I) -> Result<Vec<Response>, StorageError>
    where
        I: IntoIterator<Item = Entry<TypeConfig>> + OptionalSend,
        I::IntoIter: OptionalSend,
    {
        let mut state = self.state();
        let mut membership: Option<StoredMembership<NodeId, BasicNode>> = None;
        let mut last = None;
        let mut out = Vec::new();
        for e in entries {
            last = Some(e.log_id);
            match e.payload {
                EntryPayload::Blank => out.push(Response::default()),
                EntryPayload::Membership(m) => {
                    membership = Some(StoredMembership::new(Some(e.log_id), m));
                    out.push(Response::default());
                }
                EntryPayload::Normal(Request::Control(cmd)) => {
                    let accepted = state.apply(cmd);
                    out.push(Response {
                        accepted,
                        ..Default::default()
                    });
                }
                // Catalog commands never reach the global group; ignore them if they do.
                EntryPayload::Normal(_) => out.push(Response::default()),
            }
        }
        let mut kv = vec![("state", json(&state)?)];
        if let Some(l) = last {
            kv.push(("last_applied", json(&Some(l))?));
        }
        if let Some(m) = &membership {
            kv.push(("membership", json(m)?));
        }
        put_all(&self.db, &kv)?;
        self.tx.send_replace(state);
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
        let data: SnapshotData = serde_json::from_slice(&bytes).map_err(|e| sto_err(false, e))?;
        put_all(
            &self.db,
            &[
                ("state", json(&data.state)?),
                ("last_applied", json(&meta.last_log_id)?),
                ("membership", json(&meta.last_membership)?),
                ("snap_meta", json(meta)?),
                ("snap_data", bytes),
            ],
        )?;
        self.tx.send_replace(data.state);
        Ok(())
    }

    async fn get_current_snapshot(&mut self) -> Result<Option<Snapshot<TypeConfig>>, StorageError> {
        let meta: Option<SnapshotMeta<NodeId, BasicNode>> = get(&self.db, "snap_meta")?;
        let tx = self.db.begin_read().map_err(|e| sto_err(false, e))?;
        let data = match tx.open_table(SM) {
            Ok(t) => t
                .get("snap_data")
                .map_err(|e| sto_err(false, e))?
                .map(|v| v.value().to_vec()),
            Err(_) => None,
        };
        Ok(match (meta, data) {
            (Some(meta), Some(d)) => Some(Snapshot {
                meta,
                snapshot: Box::new(Cursor::new(d)),
            }),
            _ => None,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::raft::LogStore;

    struct Builder;

    impl openraft::testing::StoreBuilder<TypeConfig, LogStore, ControlStore, tempfile::TempDir>
        for Builder
    {
        async fn build(&self) -> Result<(tempfile::TempDir, LogStore, ControlStore), StorageError> {
            let dir = tempfile::tempdir().expect("tempdir");
            let db = Arc::new(Database::create(dir.path().join("g.redb")).expect("redb"));
            Ok((
                dir,
                LogStore::open(db.clone(), "global")?,
                ControlStore::open(db)?,
            ))
        }
    }

    #[test]
    fn openraft_storage_suite() {
        openraft::testing::Suite::test_all(Builder).expect("openraft storage suite");
    }
}
