//! Shared shapes of the database hooks (PostgreSQL in [`crate::pg_source`] /
//! [`crate::pg_role`]): the health probe's answer.

/// What a database health probe found.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct DbHealth {
    /// True when the server answered the probe.
    pub healthy: bool,
    /// `"primary"` (writable), `"replica"` (in recovery / following), or `"unknown"` when the
    /// server could not be reached.
    pub role: String,
    /// One human-readable line (server version, LSNs, or the connection error).
    pub detail: String,
    /// For a replica: bytes received but not yet replayed; `None` for a primary or when unknown.
    pub lag_bytes: Option<u64>,
}
