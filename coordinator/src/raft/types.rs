//! Raft type configuration: what a log entry carries (a [`Request`]) and what applying it returns.

use std::io::Cursor;

use lifeboat_common::catalog::NewVersion;
use serde::{Deserialize, Serialize};

/// Node ids are small integers from the config, unique across the whole deployment.
pub type NodeId = u64;

/// A command replicated through the regional Raft log.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Request {
    /// Commit a batch of file versions whose blobs are already durable. `commit_time_ms` is the
    /// leader's wall clock at proposal (ms since the Unix epoch), so every replica records the same
    /// time.
    CommitVersions {
        /// Versions in the order they were received.
        versions: Vec<NewVersion>,
        /// Commit time in ms since the Unix epoch.
        commit_time_ms: i64,
    },
}

/// Result of applying one log entry.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Response {
    /// Sequence numbers assigned to the committed versions, in request order (empty for
    /// membership and blank entries).
    pub seqs: Vec<u64>,
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
