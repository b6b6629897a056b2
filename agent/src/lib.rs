//! Lifeboat agent: watches protected directories and streams their changes — in bounded parts,
//! as rsync-style deltas where that is smaller, or as references to content the coordinator
//! already stores — to the regional coordinator leader, following leadership changes.
//!
//! Code map (each folder imports only the ones above it):
//! - [`config`]: the TOML config, every source's config struct, and their validation.
//! - [`files`]: the protected files: roots and filters, watching, the root and mass-deletion
//!   guard, the acknowledged state (redb), deltas and batch planning.
//! - [`push`]: the gRPC client to the region's coordinators, leader following.
//! - [`status`]: progress counters and `status.json`.
//! - [`snapshot`]: the pipeline every snapshot source shares: spool, pre-upload, retention.
//! - [`sources`]: the [`SnapshotSource`](sources::SnapshotSource) trait and one folder per source (`exec`, `redis`,
//!   `postgres`).
//! - [`roles`]: directory roles, the replica applier, database role orders.
//! - [`checks`]: `[[checks]]` health checks sent with each heartbeat.
//! - [`agent`]: the loop tying them together ([`Agent::run`], [`Agent::run_once`]).
//!
//! **Invariant**: the local state only advances when the coordinator acknowledged the change;
//! a batch that was not acknowledged is sent again whole.

#![warn(missing_docs)]

pub mod agent;
pub mod checks;
pub mod config;
pub mod files;
pub mod metrics;
pub mod push;
pub mod roles;
pub mod snapshot;
pub mod sources;
pub mod status;

pub use agent::{Agent, AgentError, Options};
pub use config::{Config, ConfigError, PathConfig, ReplicaConfig};
pub use status::Status;
