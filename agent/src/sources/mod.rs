//! Types shared by the database sources (`[[redis_sources]]`, `[[postgres_sources]]`): the health probe
//! answer the failover side reads.

pub mod exec;
pub mod postgres;
pub mod redis;

use serde::{Deserialize, Serialize};

/// What a database health probe found (`redis_source::health`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DbHealth {
    /// `true` when the database answered the probe (connection and PING succeeded); `false` on a
    /// connection, authentication or protocol error.
    pub healthy: bool,
    /// `"primary"` (takes writes), `"replica"` (follows a primary), or `"unknown"` when the
    /// probe failed.
    pub role: String,
    /// One human-readable line: offsets, the primary followed, link state, or the error.
    pub detail: String,
    /// For a replica: bytes of the replication stream it has not applied yet (primary's offset
    /// minus the replica's), when known. `None` for a primary or when unknown.
    pub lag_bytes: Option<u64>,
}
