//! Blob stores: where file parts live, content-addressed by blake3 (`blobs/<2 hex>/<64 hex>`), in
//! the stored encoding of [`crate::blob`]. Two backends: a local directory (the default) and any
//! S3-compatible server through aws-sdk-s3.

mod local;
pub mod s3;

pub use local::LocalBlobStore;
pub use s3::{S3BlobStore, S3Config};

use crate::blob::BlobHash;

/// Errors of blob stores.
#[derive(Debug, thiserror::Error)]
pub enum BlobStoreError {
    /// The blob is not in this store.
    #[error("blob {0} not found in the blob store")]
    NotFound(BlobHash),
    /// Local I/O failed.
    #[error("blob store I/O error at {path}: {source}")]
    Io {
        /// Path involved.
        path: String,
        /// Cause.
        source: std::io::Error,
    },
    /// The S3 server refused or failed a request.
    #[error("S3 error ({op} {key}): {message}")]
    S3 {
        /// Operation (PutObject, GetObject, HeadObject...).
        op: &'static str,
        /// Object key.
        key: String,
        /// Service message (never contains credentials).
        message: String,
    },
    /// Bad configuration.
    #[error("blob store configuration: {0}")]
    Config(String),
}

/// One blob found by [`BlobStore::list`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ListedBlob {
    /// Its hash (from the file or object name).
    pub hash: BlobHash,
    /// Last modification: file mtime (local) or `LastModified` (S3), ms since the Unix epoch.
    pub modified_ms: i64,
    /// Stored bytes (the encoded form, what deleting it frees).
    pub stored_bytes: u64,
}

/// A content-addressed store of encoded blobs.
///
/// `put` returns only when the blob is durable: fsync'd (file and directory) for the local
/// backend, confirmed by the server for S3. Callers verify what they store with
/// [`crate::blob::decode`]; a `put` over an existing local file keeps it only if it decodes to
/// `hash` (S3 always overwrites).
#[async_trait::async_trait]
pub trait BlobStore: Send + Sync + 'static {
    /// Stores `stored` (encoded bytes) under `hash`, durably. Idempotent.
    async fn put(&self, hash: &BlobHash, stored: Vec<u8>) -> Result<(), BlobStoreError>;
    /// Stores `stored` under `hash` durably even if a (corrupted) copy exists: used to repair a
    /// blob from a verified peer copy. The default is [`BlobStore::put`] (right for stores whose
    /// `put` always overwrites, like S3).
    async fn replace(&self, hash: &BlobHash, stored: Vec<u8>) -> Result<(), BlobStoreError> {
        self.put(hash, stored).await
    }
    /// Returns the stored bytes. Errors: [`BlobStoreError::NotFound`] when absent.
    async fn get(&self, hash: &BlobHash) -> Result<Vec<u8>, BlobStoreError>;
    /// Whether the blob is present.
    async fn contains(&self, hash: &BlobHash) -> Result<bool, BlobStoreError>;
    /// Every blob in the store (names that are not blob keys, such as temporary files, are
    /// skipped), in no particular order. S3 lists page by page (ListObjectsV2, 1000 keys a page).
    ///
    /// Errors: I/O or S3 failures.
    async fn list(&self) -> Result<Vec<ListedBlob>, BlobStoreError>;
    /// Removes the blob. Idempotent: a missing blob is not an error.
    ///
    /// Errors: I/O or S3 failures.
    async fn delete(&self, hash: &BlobHash) -> Result<(), BlobStoreError>;
    /// True when every coordinator of the region sees the same store (S3): the leader then does
    /// not copy blobs to followers itself.
    fn is_shared(&self) -> bool;
    /// Human-readable location, without secrets.
    fn describe(&self) -> String;
}
