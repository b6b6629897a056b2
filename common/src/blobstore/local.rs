//! Local-directory blob store: `<root>/blobs/<2 hex>/<64 hex>`, written temp + fsync + rename +
//! directory fsync.

use std::path::{Path, PathBuf};

use super::{BlobStore, BlobStoreError};
use crate::blob::BlobHash;

/// Blob store in a local directory (the default backend).
#[derive(Debug, Clone)]
pub struct LocalBlobStore {
    root: PathBuf,
}

impl LocalBlobStore {
    /// Opens (creating if needed) a store rooted at `root`.
    ///
    /// Errors: [`BlobStoreError::Io`] if the directory cannot be created.
    pub fn open(root: impl Into<PathBuf>) -> Result<Self, BlobStoreError> {
        let root = root.into();
        std::fs::create_dir_all(root.join("blobs")).map_err(|e| io(&root, e))?;
        Ok(LocalBlobStore { root })
    }

    /// Path of a blob's file (exists or not).
    pub fn path_of(&self, hash: &BlobHash) -> PathBuf {
        self.root.join(hash.key())
    }
}

fn io(p: &Path, source: std::io::Error) -> BlobStoreError {
    BlobStoreError::Io {
        path: p.display().to_string(),
        source,
    }
}

/// Writes `data` to `path` atomically: temp file in the same directory, fsync, rename, fsync dir.
///
/// Errors: the underlying I/O error.
pub fn write_atomic(path: &Path, data: &[u8]) -> std::io::Result<()> {
    use std::io::Write;
    let dir = path.parent().unwrap_or(Path::new("."));
    let mut tmp = tempfile::NamedTempFile::new_in(dir)?;
    tmp.write_all(data)?;
    tmp.as_file().sync_all()?;
    tmp.persist(path).map_err(|e| e.error)?;
    std::fs::File::open(dir)?.sync_all()?;
    Ok(())
}

#[async_trait::async_trait]
impl BlobStore for LocalBlobStore {
    async fn put(&self, hash: &BlobHash, stored: Vec<u8>) -> Result<(), BlobStoreError> {
        let path = self.path_of(hash);
        tokio::task::spawn_blocking(move || {
            if path.exists() {
                return Ok(());
            }
            let dir = path.parent().expect("blob path has a parent");
            if !dir.exists() {
                std::fs::create_dir_all(dir).map_err(|e| io(dir, e))?;
                if let Some(pp) = dir.parent() {
                    std::fs::File::open(pp)
                        .and_then(|f| f.sync_all())
                        .map_err(|e| io(pp, e))?;
                }
            }
            write_atomic(&path, &stored).map_err(|e| io(&path, e))
        })
        .await
        .map_err(|e| BlobStoreError::Config(format!("blob writer task failed: {e}")))?
    }

    async fn replace(&self, hash: &BlobHash, stored: Vec<u8>) -> Result<(), BlobStoreError> {
        let path = self.path_of(hash);
        tokio::task::spawn_blocking(move || {
            let dir = path.parent().expect("blob path has a parent");
            std::fs::create_dir_all(dir).map_err(|e| io(dir, e))?;
            write_atomic(&path, &stored).map_err(|e| io(&path, e))
        })
        .await
        .map_err(|e| BlobStoreError::Config(format!("blob writer task failed: {e}")))?
    }

    async fn get(&self, hash: &BlobHash) -> Result<Vec<u8>, BlobStoreError> {
        let path = self.path_of(hash);
        match tokio::fs::read(&path).await {
            Ok(d) => Ok(d),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                Err(BlobStoreError::NotFound(*hash))
            }
            Err(e) => Err(io(&path, e)),
        }
    }

    async fn contains(&self, hash: &BlobHash) -> Result<bool, BlobStoreError> {
        Ok(tokio::fs::try_exists(self.path_of(hash))
            .await
            .unwrap_or(false))
    }

    fn is_shared(&self) -> bool {
        false
    }

    fn describe(&self) -> String {
        format!("local directory {}", self.root.display())
    }
}
