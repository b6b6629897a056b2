//! Blob stores: where file parts live, content-addressed by blake3 (`blobs/<2 hex>/<64 hex>`), in
//! the stored encoding of [`crate::blob`]. Two backends: a local directory (the default) and any
//! S3-compatible server through aws-sdk-s3.

pub mod encrypted;
mod local;
pub mod s3;

pub use encrypted::{EncryptedStore, KeyUsage};
pub use local::{write_atomic, LocalBlobStore};
pub use s3::{S3BlobStore, S3Config};

use std::sync::Arc;

use crate::blob::BlobHash;
use crate::blob_envelope::EnvelopeError;
use crate::keys::KeyError;

/// Whether an existing stored copy of a blob may be kept by [`BlobStore::put_keeping`]:
/// called with the blob's hash and the stored bytes found under its name.
pub type KeepExisting = Arc<dyn Fn(&BlobHash, &[u8]) -> bool + Send + Sync>;

/// The check of a plain store: the stored bytes decode ([`crate::blob::decode`]) to `hash`.
pub fn keep_if_decodes() -> KeepExisting {
    Arc::new(|hash, stored| crate::blob::decode(hash, stored, crate::PART_SIZE).is_ok())
}

/// Checks an auxiliary file name (`keys/<id>`): relative, `/`-separated parts of ASCII
/// letters, digits, `-`, `_` and `.`, none empty or starting with `.`.
///
/// Errors: [`BlobStoreError::Config`].
pub fn check_aux_name(name: &str) -> Result<(), BlobStoreError> {
    let ok = !name.is_empty()
        && name.split('/').all(|p| {
            !p.is_empty()
                && !p.starts_with('.')
                && p.bytes()
                    .all(|c| c.is_ascii_alphanumeric() || matches!(c, b'-' | b'_' | b'.'))
        });
    if ok {
        Ok(())
    } else {
        Err(BlobStoreError::Config(format!(
            "bad auxiliary file name {name:?}"
        )))
    }
}

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
    /// An encrypted blob failed to open (tampered, unknown key) or to seal.
    #[error(transparent)]
    Envelope(#[from] EnvelopeError),
    /// A data key could not be loaded, opened or created.
    #[error(transparent)]
    Key(#[from] KeyError),
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
    /// Stores `stored` under `hash` like [`BlobStore::put`], but a local store keeps an existing
    /// copy only when `keep` accepts its bytes (replacing it otherwise). The default ignores
    /// `keep` and puts (right for stores whose `put` always overwrites, like S3).
    async fn put_keeping(
        &self,
        hash: &BlobHash,
        stored: Vec<u8>,
        keep: KeepExisting,
    ) -> Result<(), BlobStoreError> {
        let _ = keep;
        self.put(hash, stored).await
    }
    /// The first `len` stored bytes of the blob (fewer when it is shorter): enough to read an
    /// envelope's key id without fetching the whole blob. The default reads it all.
    ///
    /// Errors: as [`BlobStore::get`].
    async fn read_prefix(&self, hash: &BlobHash, len: usize) -> Result<Vec<u8>, BlobStoreError> {
        let mut b = self.get(hash).await?;
        b.truncate(len);
        Ok(b)
    }
    /// Writes the auxiliary file `name` (such as `keys/<id>`, checked by [`check_aux_name`])
    /// next to the `blobs/` folder, durably; never listed as a blob. The default refuses.
    ///
    /// Errors: [`BlobStoreError::Config`] for a bad name or a store without auxiliary files;
    /// I/O or S3 failures.
    async fn put_aux(&self, name: &str, data: Vec<u8>) -> Result<(), BlobStoreError> {
        let _ = data;
        Err(BlobStoreError::Config(format!(
            "{} cannot hold auxiliary file {name}",
            self.describe()
        )))
    }
    /// Reads the auxiliary file `name`; `None` when absent. The default has none.
    ///
    /// Errors: [`BlobStoreError::Config`] for a bad name; I/O or S3 failures.
    async fn get_aux(&self, name: &str) -> Result<Option<Vec<u8>>, BlobStoreError> {
        check_aux_name(name)?;
        Ok(None)
    }
    /// Names (`<dir>/<file>`) of the auxiliary files directly in folder `dir`, unordered;
    /// hidden and temporary names (starting with `.`) skipped. The default has none.
    ///
    /// Errors: [`BlobStoreError::Config`] for a bad name; I/O or S3 failures.
    async fn list_aux(&self, dir: &str) -> Result<Vec<String>, BlobStoreError> {
        check_aux_name(dir)?;
        Ok(Vec::new())
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
