//! Shared domain types of Lifeboat: wire-checked relative paths, catalog entries, the stored blob
//! encoding, the blob store trait with its backends, mutual-TLS helpers, Redis connections (plain or TLS) and stable error codes.
//!
//! Library code here returns typed errors (`thiserror`); binaries wrap them with `anyhow`.

#![warn(missing_docs)]

pub mod apply;
pub mod authz;
pub mod blob;
pub mod blob_envelope;
pub mod blobstore;
pub mod catalog;
pub mod keys;
pub mod metrics;
pub mod path;
pub mod redis_conn;
pub mod tls;
pub mod treehash;
pub mod wire_error;

/// gRPC metadata header in which a follower names the current leader's address.
pub const LEADER_HEADER: &str = "x-lifeboat-leader";

/// Largest content of one file part, in bytes (4 MiB). Files are cut into parts of this size so
/// that no file is ever held whole in memory and deltas stay bounded.
pub const PART_SIZE: usize = 4 * 1024 * 1024;

/// Largest gRPC message either side accepts, in bytes (a part plus delta overhead and headers).
pub const MAX_MESSAGE_BYTES: usize = 16 * 1024 * 1024;

/// Current wall-clock time in milliseconds since the Unix epoch.
pub fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}
