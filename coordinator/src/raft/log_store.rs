//! Raft log and vote in redb. Tables (`<group>` is the Raft group name, e.g. `region`):
//! `<group>.log` (u64 index -> JSON of `openraft::Entry`), `<group>.raft_meta` (`vote`,
//! `committed`, `last_purged` -> JSON). Every append commits a redb transaction with
//! `Durability::Immediate` (fsync) before openraft is told the entries are flushed.

use std::fmt::Debug;
use std::ops::{Bound, RangeBounds};
use std::sync::Arc;

use openraft::storage::{LogFlushed, RaftLogStorage};
use openraft::{Entry, LogId, LogState, OptionalSend, RaftLogReader, Vote};
use redb::{Database, ReadableDatabase, ReadableTable, TableDefinition};

use super::types::{sto_err, NodeId, StorageError, TypeConfig};

/// Raft log storage of one group in a shared redb database.
#[derive(Clone)]
pub struct LogStore {
    db: Arc<Database>,
    log: TableDefinition<'static, u64, &'static [u8]>,
    meta: TableDefinition<'static, &'static str, &'static [u8]>,
}

impl LogStore {
    /// Opens the log of `group` in `db`, creating its tables.
    ///
    /// Errors: redb failures as [`StorageError`].
    pub fn open(db: Arc<Database>, group: &str) -> Result<Self, StorageError> {
        let log_name: &'static str = Box::leak(format!("{group}.log").into_boxed_str());
        let meta_name: &'static str = Box::leak(format!("{group}.raft_meta").into_boxed_str());
        let s = LogStore {
            db,
            log: TableDefinition::new(log_name),
            meta: TableDefinition::new(meta_name),
        };
        let tx = s.db.begin_write().map_err(|e| sto_err(true, e))?;
        tx.open_table(s.log).map_err(|e| sto_err(true, e))?;
        tx.open_table(s.meta).map_err(|e| sto_err(true, e))?;
        tx.commit().map_err(|e| sto_err(true, e))?;
        Ok(s)
    }

    fn get_meta<T: serde::de::DeserializeOwned>(
        &self,
        key: &str,
    ) -> Result<Option<T>, StorageError> {
        let tx = self.db.begin_read().map_err(|e| sto_err(false, e))?;
        let t = tx.open_table(self.meta).map_err(|e| sto_err(false, e))?;
        match t.get(key).map_err(|e| sto_err(false, e))? {
            Some(v) => Ok(Some(
                serde_json::from_slice(v.value()).map_err(|e| sto_err(false, e))?,
            )),
            None => Ok(None),
        }
    }

    fn put_meta<T: serde::Serialize>(&self, key: &str, v: &T) -> Result<(), StorageError> {
        let data = serde_json::to_vec(v).map_err(|e| sto_err(true, e))?;
        let tx = self.db.begin_write().map_err(|e| sto_err(true, e))?;
        {
            let mut t = tx.open_table(self.meta).map_err(|e| sto_err(true, e))?;
            t.insert(key, data.as_slice())
                .map_err(|e| sto_err(true, e))?;
        }
        tx.commit().map_err(|e| sto_err(true, e))
    }
}

fn bounds(range: &impl RangeBounds<u64>) -> (u64, Option<u64>) {
    let start = match range.start_bound() {
        Bound::Included(s) => *s,
        Bound::Excluded(s) => s + 1,
        Bound::Unbounded => 0,
    };
    let end = match range.end_bound() {
        Bound::Included(e) => Some(e + 1),
        Bound::Excluded(e) => Some(*e),
        Bound::Unbounded => None,
    };
    (start, end)
}

impl RaftLogReader<TypeConfig> for LogStore {
    async fn try_get_log_entries<RB: RangeBounds<u64> + Clone + Debug + OptionalSend>(
        &mut self,
        range: RB,
    ) -> Result<Vec<Entry<TypeConfig>>, StorageError> {
        let (start, end) = bounds(&range);
        let tx = self.db.begin_read().map_err(|e| sto_err(false, e))?;
        let t = tx.open_table(self.log).map_err(|e| sto_err(false, e))?;
        let iter = match end {
            Some(end) if end <= start => return Ok(vec![]),
            Some(end) => t.range(start..end),
            None => t.range(start..),
        }
        .map_err(|e| sto_err(false, e))?;
        let mut out = Vec::new();
        for item in iter {
            let (_, v) = item.map_err(|e| sto_err(false, e))?;
            out.push(serde_json::from_slice(v.value()).map_err(|e| sto_err(false, e))?);
        }
        Ok(out)
    }
}

impl RaftLogStorage<TypeConfig> for LogStore {
    type LogReader = Self;

    async fn get_log_state(&mut self) -> Result<LogState<TypeConfig>, StorageError> {
        let last_purged: Option<LogId<NodeId>> = self.get_meta("last_purged")?;
        let tx = self.db.begin_read().map_err(|e| sto_err(false, e))?;
        let t = tx.open_table(self.log).map_err(|e| sto_err(false, e))?;
        let last = match t.last().map_err(|e| sto_err(false, e))? {
            Some((_, v)) => {
                let e: Entry<TypeConfig> =
                    serde_json::from_slice(v.value()).map_err(|e| sto_err(false, e))?;
                Some(e.log_id)
            }
            None => last_purged,
        };
        Ok(LogState {
            last_purged_log_id: last_purged,
            last_log_id: last,
        })
    }

    async fn get_log_reader(&mut self) -> Self::LogReader {
        self.clone()
    }

    async fn save_vote(&mut self, vote: &Vote<NodeId>) -> Result<(), StorageError> {
        self.put_meta("vote", vote)
    }

    async fn read_vote(&mut self) -> Result<Option<Vote<NodeId>>, StorageError> {
        self.get_meta("vote")
    }

    async fn save_committed(
        &mut self,
        committed: Option<LogId<NodeId>>,
    ) -> Result<(), StorageError> {
        self.put_meta("committed", &committed)
    }

    async fn read_committed(&mut self) -> Result<Option<LogId<NodeId>>, StorageError> {
        Ok(self
            .get_meta::<Option<LogId<NodeId>>>("committed")?
            .flatten())
    }

    async fn append<I>(
        &mut self,
        entries: I,
        callback: LogFlushed<TypeConfig>,
    ) -> Result<(), StorageError>
    where
        I: IntoIterator<Item = Entry<TypeConfig>> + OptionalSend,
        I::IntoIter: OptionalSend,
    {
        let last_purged: Option<LogId<NodeId>> = self.get_meta("last_purged")?;
        let tx = self.db.begin_write().map_err(|e| sto_err(true, e))?;
        {
            let mut t = tx.open_table(self.log).map_err(|e| sto_err(true, e))?;
            // The next index must follow the last one held (or purged): a gap would leave a log
            // that no longer loads. Refused before anything is written (the transaction is
            // dropped, not committed).
            let mut next = match t.last().map_err(|e| sto_err(true, e))? {
                Some((k, _)) => Some(k.value() + 1),
                None => last_purged.map(|p| p.index + 1),
            };
            for e in entries {
                if let Some(n) = next {
                    if e.log_id.index > n {
                        return Err(sto_err(
                            true,
                            std::io::Error::other(format!(
                                "append at log index {} would leave a gap after {}",
                                e.log_id.index,
                                n - 1
                            )),
                        ));
                    }
                }
                next = Some(e.log_id.index + 1);
                let data = serde_json::to_vec(&e).map_err(|e| sto_err(true, e))?;
                t.insert(e.log_id.index, data.as_slice())
                    .map_err(|e| sto_err(true, e))?;
            }
        }
        tx.commit().map_err(|e| sto_err(true, e))?;
        callback.log_io_completed(Ok(()));
        Ok(())
    }

    async fn truncate(&mut self, log_id: LogId<NodeId>) -> Result<(), StorageError> {
        let tx = self.db.begin_write().map_err(|e| sto_err(true, e))?;
        {
            let mut t = tx.open_table(self.log).map_err(|e| sto_err(true, e))?;
            t.retain_in(log_id.index.., |_, _| false)
                .map_err(|e| sto_err(true, e))?;
        }
        tx.commit().map_err(|e| sto_err(true, e))
    }

    async fn purge(&mut self, log_id: LogId<NodeId>) -> Result<(), StorageError> {
        let data = serde_json::to_vec(&Some(log_id)).map_err(|e| sto_err(true, e))?;
        let tx = self.db.begin_write().map_err(|e| sto_err(true, e))?;
        {
            let mut m = tx.open_table(self.meta).map_err(|e| sto_err(true, e))?;
            m.insert("last_purged", data.as_slice())
                .map_err(|e| sto_err(true, e))?;
            let mut t = tx.open_table(self.log).map_err(|e| sto_err(true, e))?;
            t.retain_in(..=log_id.index, |_, _| false)
                .map_err(|e| sto_err(true, e))?;
        }
        tx.commit().map_err(|e| sto_err(true, e))
    }
}
