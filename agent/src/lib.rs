//! Lifeboat agent: watches protected directories and streams their changes — in bounded parts,
//! as rsync-style deltas where that is smaller, or as references to content the coordinator
//! already stores — to the regional coordinator leader, following leadership changes.
//!
//! Code map:
//! - [`config`]: the TOML config and its validation.
//! - [`state`]: the redb state (acknowledged entries, part signatures, acknowledged blobs, epoch).
//! - [`scan`]: roots, include/exclude filters, `lstat` of one entry.
//! - [`watch`]: notify + debouncer, forwarded into a tokio channel.
//! - [`delta`]: reading files part by part, hashing, reuse/delta/full choice.
//! - [`batch`]: the work queue and the batch planner.
//! - [`push`]: the gRPC client, the lazy part stream, leader following.
//! - [`redis_source`]: `[[redis_sources]]`: RDB snapshots, `apply_role`, `health`.
//! - [`replica`]: warm standby: applies the region's catalog to `[[replicas]]` directories.
//! - [`retention`]: retention classes (restic `forget` rules) and catalog expiry of snapshots.
//! - [`roles`]: directory roles follow the active region (promotion, demotion with conflicts).
//! - [`pg_source`]: `[[postgres_sources]]`: base backups and WAL archiving through the pipeline.
//! - [`pg_wire`]: the agent's own `BASE_BACKUP` client (replication protocol, no pg_basebackup).
//! - [`pg_role`] and [`db`]: PostgreSQL promotion/fencing ([`pg_role::apply_role`]) and health.
//! - [`status`]: progress counters and `status.json`.
//! - [`agent`]: the loop tying them together ([`Agent::run`], [`Agent::run_once`]).
//!
//! **Invariant**: the local state only advances when the coordinator acknowledged the change;
//! a batch that was not acknowledged is sent again whole.

#![warn(missing_docs)]

pub mod agent;
pub mod batch;
pub mod checks;
pub mod config;
pub mod db;
pub mod db_roles;
pub mod delta;
pub mod exec;
pub mod guard;
pub mod pg_role;
pub mod pg_source;
pub mod pg_wire;
pub mod preupload;
pub mod push;
pub mod redis_source;
pub mod replica;
pub mod retention;
pub mod roles;
pub mod scan;
pub mod spool;
pub mod spool_digest;
pub mod state;
pub mod status;
pub mod watch;

pub use agent::{Agent, AgentError, Options};
pub use config::{Config, ConfigError, PathConfig, ReplicaConfig};
pub use status::Status;
