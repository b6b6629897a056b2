//! The regional Raft group: openraft 0.9 (`storage-v2`) with its log, vote and state machine in
//! one redb file per process, and its RPCs over tonic.

// openraft fixes the error type of its storage traits (`StorageError`, 224 bytes); boxing it in
// our helpers would only add conversions at every trait boundary.
#![allow(clippy::result_large_err)]

pub mod log_store;
pub mod network;
pub mod state_machine;
pub mod types;

pub use log_store::LogStore;
pub use state_machine::{Catalog, ReplicationMeta, StateMachineStore};
pub use types::{CatalogCommand, NodeId, Request, Response, TypeConfig};

/// An openraft handle of either group, for what does not depend on the group (membership,
/// metrics, health, the Raft RPC server). Proposals go through [`RegionRaft`] or
/// `control::runtime::GlobalRaft`.
pub type RaftHandle = openraft::Raft<TypeConfig>;

/// The error of a proposal (`client_write`) to either group.
pub type WriteError = openraft::error::RaftError<
    NodeId,
    openraft::error::ClientWriteError<NodeId, openraft::BasicNode>,
>;

/// The openraft handle of a region's group (its catalog). Everything of `openraft::Raft` is
/// reachable through `Deref`, except that [`RegionRaft::client_write`] takes only a
/// [`CatalogCommand`]: a control command cannot be proposed to a regional group.
#[derive(Clone)]
pub struct RegionRaft(pub openraft::Raft<TypeConfig>);

impl RegionRaft {
    /// Proposes `cmd` and waits until it is committed and applied here.
    ///
    /// Errors: not the leader (with the leader, if known), or the group cannot commit.
    pub async fn client_write(
        &self,
        cmd: CatalogCommand,
    ) -> Result<openraft::raft::ClientWriteResponse<TypeConfig>, WriteError> {
        self.0.client_write(Request::Catalog(cmd)).await
    }
}

impl std::ops::Deref for RegionRaft {
    type Target = openraft::Raft<TypeConfig>;
    fn deref(&self) -> &Self::Target {
        &self.0
    }
}
