//! Lifeboat coordinator: a regional openraft group whose state machine is the file catalog, the
//! intake of agents' changes (blob durable, then Raft commit, then ack), blob replication between
//! coordinators, and the admin API.

pub mod admin;
pub mod blobs;
pub mod config;
pub mod intake;
pub mod leader;
pub mod node;
pub mod raft;
