//! Raft type configuration: what a log entry carries (a [`Request`]: a [`CatalogCommand`] of a
//! region's group or a [`ControlCommand`] of the global group) and what applying it returns.

use std::io::Cursor;

use lifeboat_common::blob::BlobHash;
use lifeboat_common::catalog::{FileVersion, NewVersion};
use serde::{Deserialize, Serialize};

use crate::control::record::ControlCommand;

/// Node ids are small integers from the config, unique across the whole deployment.
pub type NodeId = u64;

/// What a log entry carries. Both groups share one storage format (this type), but each
/// proposes only its own kind: [`super::RegionRaft::client_write`] takes a [`CatalogCommand`],
/// `control::runtime::GlobalRaft::client_write` a [`ControlCommand`].
///
/// Serialized exactly as before the split: a control command as `{"Control": ...}`, a catalog
/// command untagged (`{"CommitVersions": ...}`), so logs written earlier still load.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Request {
    /// A command of the global group's control record (the regional state machine ignores it).
    Control(ControlCommand),
    /// A command of a region's catalog (the global state machine ignores it).
    #[serde(untagged)]
    Catalog(CatalogCommand),
}

impl From<CatalogCommand> for Request {
    fn from(c: CatalogCommand) -> Self {
        Request::Catalog(c)
    }
}

impl From<ControlCommand> for Request {
    fn from(c: ControlCommand) -> Self {
        Request::Control(c)
    }
}

/// A command replicated through a region's Raft log (its catalog).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum CatalogCommand {
    /// Commit a batch of file versions whose blobs are already durable. `commit_time_ms` is the
    /// leader's wall clock at proposal (ms since the Unix epoch), so every replica records the same
    /// time.
    CommitVersions {
        /// Versions in the order they were received.
        versions: Vec<NewVersion>,
        /// Commit time in ms since the Unix epoch.
        commit_time_ms: i64,
        /// Parts whose blob garbage collection had condemned (`catalog.condemned`) and that the
        /// leader stored again, durably on a majority, after it applied that condemnation.
        /// Applying the entry removes them from `catalog.condemned`. A part that is condemned
        /// and not listed here makes the whole entry rejected ([`Response::rejected`]).
        #[serde(default)]
        restored: Vec<BlobHash>,
    },
    /// Versions copied from the upstream (active) region by a standby region's leader, whose
    /// blobs are already durable here. Each version gets a new local sequence number but keeps
    /// its `commit_time_ms`, `epoch` and `region` (so point-in-time restore in the standby uses
    /// the original commit times). `versions[i].seq` is the upstream sequence number: the state
    /// machine skips versions at or below the committed `upstream_seq` (an entry proposed by a
    /// deposed leader and one proposed again by its successor may both commit) and records the
    /// highest one applied, in the same transaction.
    ApplyReplicated {
        /// Upstream versions in upstream sequence order.
        versions: Vec<FileVersion>,
        /// Region name of the upstream coordinator that served them.
        upstream_region: String,
        /// Newest upstream sequence number known when the batch was cut (for lag reports).
        upstream_last_seq: u64,
        /// Upstream rows up to this sequence number were examined (some may have been left
        /// out, e.g. versions that originated in this region and came back after a failover):
        /// `upstream_seq` advances to at least this value.
        #[serde(default)]
        skip_through: u64,
        /// Parts that were condemned here and that the standby leader copied again: applying
        /// the entry removes them from `catalog.condemned`.
        #[serde(default)]
        restored: Vec<BlobHash>,
    },
    /// History pruning by garbage collection: removes every version that is not the newest of
    /// its path and whose next newer version of the same path was committed at or before
    /// `cutoff_ms` (ms since the Unix epoch). The newest version of a path, a tombstone
    /// included, is always kept. Deterministic (no clock read at apply).
    PruneHistory {
        /// Versions superseded at or before this commit time are removed.
        cutoff_ms: i64,
    },
    /// Garbage collection of blobs: each hash no version references any more is recorded in
    /// `catalog.condemned`, and after the transaction every node deletes it from its own blob
    /// store (a shared store: the leader's garbage collection pass does). Hashes still
    /// referenced are skipped.
    ForgetBlobs {
        /// Candidate blobs (unreferenced and older than the grace period when proposed).
        hashes: Vec<BlobHash>,
    },
}

/// Result of applying one log entry.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Response {
    /// Sequence numbers assigned to the committed versions, in request order (empty for
    /// membership and blank entries).
    pub seqs: Vec<u64>,
    /// For [`Request::Control`]: whether the command was applied (a compare-and-set on the
    /// epoch may refuse a stale decision).
    #[serde(default)]
    pub accepted: bool,
    /// For [`CatalogCommand::CommitVersions`]: condemned parts that `restored` did not list; non-empty
    /// means nothing of the entry was applied (`seqs` is empty).
    #[serde(default)]
    pub rejected: Vec<BlobHash>,
    /// For [`CatalogCommand::PruneHistory`]: versions removed.
    #[serde(default)]
    pub pruned: u64,
    /// For [`CatalogCommand::ForgetBlobs`]: hashes condemned (the others were referenced).
    #[serde(default)]
    pub condemned: Vec<BlobHash>,
}

openraft::declare_raft_types!(
    /// openraft type configuration of Lifeboat's Raft groups.
    pub TypeConfig:
        D = Request,
        R = Response,
        NodeId = NodeId,
        Node = openraft::BasicNode,
        Entry = openraft::Entry<TypeConfig>,
        SnapshotData = Cursor<Vec<u8>>,
        AsyncRuntime = openraft::TokioRuntime,
);

/// Shorthand for openraft's storage error with our node id.
pub type StorageError = openraft::StorageError<NodeId>;

/// Wraps a redb or serde failure as an openraft storage error (read or write, on the store).
pub fn sto_err(write: bool, e: impl std::error::Error + 'static) -> StorageError {
    use openraft::{ErrorSubject, ErrorVerb, StorageIOError};
    let verb = if write {
        ErrorVerb::Write
    } else {
        ErrorVerb::Read
    };
    StorageIOError::new(ErrorSubject::Store, verb, openraft::AnyError::new(&e)).into()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn entries_keep_the_format_written_before_the_split() {
        let prune = Request::from(CatalogCommand::PruneHistory { cutoff_ms: 5 });
        let json = serde_json::to_string(&prune).unwrap();
        assert_eq!(json, r#"{"PruneHistory":{"cutoff_ms":5}}"#);
        assert_eq!(serde_json::from_str::<Request>(&json).unwrap(), prune);
        let audit = Request::from(ControlCommand::Audit {
            entries: Vec::new(),
        });
        let json = serde_json::to_string(&audit).unwrap();
        assert_eq!(json, r#"{"Control":{"Audit":{"entries":[]}}}"#);
        assert_eq!(serde_json::from_str::<Request>(&json).unwrap(), audit);
        assert!(serde_json::from_str::<Request>(r#"{"Bogus":{}}"#).is_err());
    }
}
