//! Lifeboat coordinator: a regional openraft group whose state machine is the file catalog, the
//! intake of agents' changes (blob durable, then Raft commit, then ack), blob replication between
//! coordinators, the admin API, and cross-region replication (a standby region's leader copies the
//! active region's catalog and blobs).

#![warn(missing_docs)]

pub mod admin;
pub mod authz;
pub mod blobs;
pub mod config;
pub mod control;
pub mod health;
pub mod intake;
pub mod leader;
pub mod metrics;
pub mod node;
pub mod raft;
pub mod tls_reload;
pub mod xregion;
