//! Local-directory blob store: `<root>/blobs/<2 hex>/<64 hex>`, written temp + fsync + rename +
//! directory fsync.

use std::path::{Path, PathBuf};

use super::{check_aux_name, keep_if_decodes, BlobStore, BlobStoreError, KeepExisting, ListedBlob};
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

/// Every `<2 hex>/<64 hex>` file under `root` (the `blobs` directory) with its mtime and size.
fn list_dir(root: &Path) -> Result<Vec<ListedBlob>, BlobStoreError> {
    let mut out = Vec::new();
    let top = match std::fs::read_dir(root) {
        Ok(d) => d,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(out),
        Err(e) => return Err(io(root, e)),
    };
    for sub in top {
        let sub = sub.map_err(|e| io(root, e))?;
        let name = sub.file_name();
        let Some(prefix) = name.to_str().filter(|n| n.len() == 2) else {
            continue;
        };
        let dir = sub.path();
        let entries = match std::fs::read_dir(&dir) {
            Ok(d) => d,
            Err(e) if e.kind() == std::io::ErrorKind::NotADirectory => continue,
            Err(e) => return Err(io(&dir, e)),
        };
        for ent in entries {
            let ent = ent.map_err(|e| io(&dir, e))?;
            let fname = ent.file_name();
            let Some(hash) = fname
                .to_str()
                .filter(|n| n.starts_with(prefix))
                .and_then(|n| BlobHash::from_hex(n).ok())
            else {
                continue;
            };
            let md = match ent.metadata() {
                Ok(m) if m.is_file() => m,
                Ok(_) => continue,
                // Deleted meanwhile.
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
                Err(e) => return Err(io(&ent.path(), e)),
            };
            let modified_ms = md
                .modified()
                .ok()
                .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
                .map(|d| d.as_millis() as i64)
                .unwrap_or(0);
            out.push(ListedBlob {
                hash,
                modified_ms,
                stored_bytes: md.len(),
            });
        }
    }
    Ok(out)
}

#[async_trait::async_trait]
impl BlobStore for LocalBlobStore {
    async fn put(&self, hash: &BlobHash, stored: Vec<u8>) -> Result<(), BlobStoreError> {
        self.put_keeping(hash, stored, keep_if_decodes()).await
    }

    async fn put_keeping(
        &self,
        hash: &BlobHash,
        stored: Vec<u8>,
        keep: KeepExisting,
    ) -> Result<(), BlobStoreError> {
        let path = self.path_of(hash);
        let hash = *hash;
        tokio::task::spawn_blocking(move || {
            if let Ok(existing) = std::fs::read(&path) {
                // Stored already, and it holds this blob: mark it as just written, so a garbage
                // collection pass counts it as young (its grace period protects parts uploaded
                // ahead of their commit). A file under this name that `keep` refuses (plain
                // store: does not decode to `hash`; written by a faulty or hostile peer, or
                // damaged) is replaced below.
                if keep(&hash, &existing) {
                    if let Ok(f) = std::fs::File::options().append(true).open(&path) {
                        let _ = f.set_modified(std::time::SystemTime::now());
                    }
                    return Ok(());
                }
                tracing::warn!(blob = %hash, path = %path.display(), "a stored file does not hold its blob; replacing it");
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

    async fn read_prefix(&self, hash: &BlobHash, len: usize) -> Result<Vec<u8>, BlobStoreError> {
        use tokio::io::AsyncReadExt;
        let path = self.path_of(hash);
        let f = match tokio::fs::File::open(&path).await {
            Ok(f) => f,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                return Err(BlobStoreError::NotFound(*hash))
            }
            Err(e) => return Err(io(&path, e)),
        };
        let mut out = Vec::with_capacity(len);
        f.take(len as u64)
            .read_to_end(&mut out)
            .await
            .map_err(|e| io(&path, e))?;
        Ok(out)
    }

    /// `<root>/<name>`, written temp + fsync + rename + directory fsync.
    async fn put_aux(&self, name: &str, data: Vec<u8>) -> Result<(), BlobStoreError> {
        check_aux_name(name)?;
        let path = self.root.join(name);
        tokio::task::spawn_blocking(move || {
            let dir = path.parent().expect("aux path has a parent");
            std::fs::create_dir_all(dir).map_err(|e| io(dir, e))?;
            write_atomic(&path, &data).map_err(|e| io(&path, e))
        })
        .await
        .map_err(|e| BlobStoreError::Config(format!("aux writer task failed: {e}")))?
    }

    async fn get_aux(&self, name: &str) -> Result<Option<Vec<u8>>, BlobStoreError> {
        check_aux_name(name)?;
        let path = self.root.join(name);
        match tokio::fs::read(&path).await {
            Ok(d) => Ok(Some(d)),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(io(&path, e)),
        }
    }

    async fn list_aux(&self, dir: &str) -> Result<Vec<String>, BlobStoreError> {
        check_aux_name(dir)?;
        let path = self.root.join(dir);
        let mut rd = match tokio::fs::read_dir(&path).await {
            Ok(d) => d,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(e) => return Err(io(&path, e)),
        };
        let mut out = Vec::new();
        while let Some(ent) = rd.next_entry().await.map_err(|e| io(&path, e))? {
            let Some(n) = ent.file_name().to_str().map(str::to_string) else {
                continue;
            };
            if !n.starts_with('.') && ent.file_type().await.is_ok_and(|t| t.is_file()) {
                out.push(format!("{dir}/{n}"));
            }
        }
        Ok(out)
    }

    async fn contains(&self, hash: &BlobHash) -> Result<bool, BlobStoreError> {
        Ok(tokio::fs::try_exists(self.path_of(hash))
            .await
            .unwrap_or(false))
    }

    async fn list(&self) -> Result<Vec<ListedBlob>, BlobStoreError> {
        let root = self.root.join("blobs");
        tokio::task::spawn_blocking(move || list_dir(&root))
            .await
            .map_err(|e| BlobStoreError::Config(format!("blob listing task failed: {e}")))?
    }

    async fn delete(&self, hash: &BlobHash) -> Result<(), BlobStoreError> {
        let path = self.path_of(hash);
        match tokio::fs::remove_file(&path).await {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(io(&path, e)),
        }
    }

    fn is_shared(&self) -> bool {
        false
    }

    fn describe(&self) -> String {
        format!("local directory {}", self.root.display())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `list` finds exactly the stored blobs (temporary files and stray names skipped) with
    /// their sizes; `delete` removes one and is idempotent.
    #[tokio::test]
    async fn list_and_delete() {
        let dir = tempfile::tempdir().unwrap();
        let store = LocalBlobStore::open(dir.path()).unwrap();
        let a = BlobHash::of(b"a");
        let b = BlobHash::of(b"b");
        store.put(&a, vec![1, 2, 3]).await.unwrap();
        store.put(&b, vec![4; 10]).await.unwrap();
        let pa = store.path_of(&a);
        std::fs::write(pa.parent().unwrap().join(".tmpXYZ"), b"x").unwrap();
        std::fs::write(dir.path().join("blobs").join("stray"), b"x").unwrap();
        let mut l = store.list().await.unwrap();
        l.sort_by_key(|x| x.stored_bytes);
        assert_eq!(l.len(), 2, "{l:?}");
        assert_eq!((l[0].hash, l[0].stored_bytes), (a, 3));
        assert_eq!((l[1].hash, l[1].stored_bytes), (b, 10));
        let now = crate::now_ms();
        assert!((now - l[0].modified_ms).abs() < 60_000);
        store.delete(&a).await.unwrap();
        store.delete(&a).await.unwrap();
        assert!(!store.contains(&a).await.unwrap());
        assert_eq!(store.list().await.unwrap().len(), 1);
    }
}
