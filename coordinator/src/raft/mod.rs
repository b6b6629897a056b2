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
pub use types::{NodeId, Request, Response, TypeConfig};

/// The openraft handle of the regional group.
pub type RegionRaft = openraft::Raft<TypeConfig>;
