//! Encryption at rest as a [`BlobStore`] decorator: [`EncryptedStore`] seals every blob it
//! stores into the `LBE1` envelope ([`crate::blob_envelope`]) under the repository's current
//! data key and opens it again on `get`, so everything above the store (intake, peer copies,
//! repair, replication, restores) keeps handling the plain `LBB1` form.
//!
//! The repository's data keys live in it as `keys/<16 hex>` files ([`crate::keys::KeyFile`],
//! restic-style), wrapped by the master key; a blob listing never sees them (it reads
//! `blobs/` only). The newest key is the current one for new writes; older keys stay for
//! reading. Several coordinators opening one shared (S3) repository at once may each create a
//! key: every blob names its key id, and a key id not loaded yet is looked up again in the store
//! before a blob counts as unreadable. Blobs in the plain `LBB1` form (written before encryption
//! was turned on) are still read.

use std::collections::BTreeMap;
use std::sync::{Arc, RwLock};

use super::{BlobStore, BlobStoreError, KeepExisting, ListedBlob};
use crate::blob::BlobHash;
use crate::blob_envelope::{self, EnvelopeError};
use crate::keys::{KeyError, KeyFile, KeyId, SecretKey, KEYS_DIR};

/// The data keys loaded from a repository, and the one new writes use.
#[derive(Debug, Default)]
struct Ring {
    /// Every data key: its key and creation time (ms since the Unix epoch).
    keys: BTreeMap<KeyId, (SecretKey, i64)>,
    /// The key new blobs are sealed with.
    current: Option<KeyId>,
}

impl Ring {
    fn newest(&self) -> Option<KeyId> {
        self.keys
            .iter()
            .max_by_key(|(id, (_, created))| (*created, **id))
            .map(|(id, _)| *id)
    }
    fn key(&self, id: &KeyId) -> Option<SecretKey> {
        self.keys.get(id).map(|(k, _)| k.clone())
    }
}

/// One data key of a repository, as `lifeboat keys status` shows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyUsage {
    /// The key id.
    pub key_id: KeyId,
    /// Creation time, ms since the Unix epoch.
    pub created_ms: i64,
    /// Whether new blobs are sealed with it.
    pub current: bool,
    /// Blobs of the store's listing sealed with it (read from each blob's header).
    pub blobs: u64,
}

/// The key usage of a whole repository ([`EncryptedStore::usage`]).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct UsageReport {
    /// Every data key, oldest first.
    pub keys: Vec<KeyUsage>,
    /// Blobs still in the plain `LBB1` form.
    pub plaintext_blobs: u64,
    /// Blobs naming a key the repository does not hold, or unreadable headers.
    pub unknown_blobs: u64,
}

/// A [`BlobStore`] that encrypts at rest on top of another one (local directory or S3).
///
/// `Debug` shows the inner store and key ids, never key material.
pub struct EncryptedStore {
    inner: Arc<dyn BlobStore>,
    master: SecretKey,
    ring: Arc<RwLock<Ring>>,
    /// Who creates keys (written into key files), e.g. `coordinator 2 (eu)`.
    host: String,
}

impl std::fmt::Debug for EncryptedStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let ring = self.ring.read().expect("key ring lock");
        f.debug_struct("EncryptedStore")
            .field("inner", &self.inner.describe())
            .field("keys", &ring.keys.keys().collect::<Vec<_>>())
            .field("current", &ring.current)
            .field("master", &self.master)
            .finish()
    }
}

/// Whether `store` holds any data key file (it is, or was, an encrypted repository).
///
/// Errors: I/O or S3 failures listing `keys/`.
pub async fn holds_data_keys(store: &dyn BlobStore) -> Result<bool, BlobStoreError> {
    Ok(!store.list_aux(KEYS_DIR).await?.is_empty())
}

impl EncryptedStore {
    /// Opens the repository `inner` with `master`: loads and unwraps every data key file, and
    /// creates the first data key when there is none (a new repository). `host` is recorded in
    /// the key files it creates.
    ///
    /// Errors: [`BlobStoreError::Key`] with [`KeyError::WrongMasterKey`] ("master key does not
    /// open data key K in <store>: wrong key?") when `master` does not open a key file, or
    /// [`KeyError::BadKeyFile`]; I/O or S3 failures.
    pub async fn open(
        inner: Arc<dyn BlobStore>,
        master: SecretKey,
        host: &str,
    ) -> Result<Self, BlobStoreError> {
        let store = EncryptedStore {
            inner,
            master,
            ring: Arc::new(RwLock::new(Ring::default())),
            host: host.to_string(),
        };
        store.reload().await?;
        let current = store.ring.read().expect("key ring lock").newest();
        match current {
            Some(id) => store.ring.write().expect("key ring lock").current = Some(id),
            None => {
                let id = store.rotate().await?;
                tracing::info!(key_id = %id, store = %store.inner.describe(), "created the first data key of a new encrypted repository");
            }
        }
        Ok(store)
    }

    /// Reads every key file of the repository into the ring (keys already loaded are kept).
    async fn reload(&self) -> Result<(), BlobStoreError> {
        let desc = self.inner.describe();
        let names = self.inner.list_aux(KEYS_DIR).await?;
        let known: Vec<KeyId> = self
            .ring
            .read()
            .expect("key ring lock")
            .keys
            .keys()
            .copied()
            .collect();
        let mut found = Vec::new();
        for name in names {
            let Some(id) = name
                .strip_prefix(KEYS_DIR)
                .and_then(|n| n.strip_prefix('/'))
                .and_then(KeyId::from_hex)
            else {
                continue;
            };
            if known.contains(&id) {
                continue;
            }
            let Some(bytes) = self.inner.get_aux(&name).await? else {
                continue;
            };
            let kf = KeyFile::parse(&bytes, &name, &desc)?;
            let (got, key) = kf.unwrap_key(&self.master, &desc)?;
            if got != id {
                return Err(KeyError::BadKeyFile {
                    name,
                    store: desc,
                    reason: format!("holds key {got}"),
                }
                .into());
            }
            found.push((id, key, kf.created_ms));
        }
        let mut ring = self.ring.write().expect("key ring lock");
        for (id, key, created) in found {
            ring.keys.insert(id, (key, created));
        }
        Ok(())
    }

    /// Starts a new data key: random 256 bits under a random id, wrapped by the master key and
    /// written to `keys/<id>` before it becomes current. Blobs sealed with older keys stay
    /// readable. Returns the new id.
    ///
    /// Errors: random generator, I/O or S3 failures (the current key is then unchanged).
    pub async fn rotate(&self) -> Result<KeyId, BlobStoreError> {
        let id = KeyId::generate()?;
        let key = SecretKey::generate()?;
        let kf = KeyFile::wrap(&self.master, id, &key, &self.host)?;
        self.inner.put_aux(&id.file_name(), kf.to_json()).await?;
        let mut ring = self.ring.write().expect("key ring lock");
        ring.keys.insert(id, (key, kf.created_ms));
        ring.current = Some(id);
        Ok(id)
    }

    /// The key new blobs are sealed with.
    pub fn current_key(&self) -> KeyId {
        self.ring
            .read()
            .expect("key ring lock")
            .current
            .expect("an open store has a current key")
    }

    /// The store underneath (blobs in their stored, encrypted form).
    pub fn inner(&self) -> &Arc<dyn BlobStore> {
        &self.inner
    }

    /// Every data key with the number of listed blobs sealed with it (each blob's 12-byte
    /// header is read: one small read or ranged GET per blob).
    ///
    /// Errors: I/O or S3 failures listing the store or reading keys.
    pub async fn usage(&self) -> Result<UsageReport, BlobStoreError> {
        self.reload().await?;
        let listed = self.inner.list().await?;
        let mut counts: BTreeMap<KeyId, u64> = BTreeMap::new();
        let mut report = UsageReport::default();
        for b in listed {
            let head = match self.inner.read_prefix(&b.hash, 12).await {
                Ok(h) => h,
                Err(BlobStoreError::NotFound(_)) => continue,
                Err(e) => return Err(e),
            };
            match blob_envelope::key_id_of(&head) {
                Some(id) => *counts.entry(id).or_default() += 1,
                None if head.starts_with(crate::blob::MAGIC) => report.plaintext_blobs += 1,
                None => report.unknown_blobs += 1,
            }
        }
        let ring = self.ring.read().expect("key ring lock");
        let mut keys: Vec<KeyUsage> = ring
            .keys
            .iter()
            .map(|(id, (_, created))| KeyUsage {
                key_id: *id,
                created_ms: *created,
                current: ring.current == Some(*id),
                blobs: counts.remove(id).unwrap_or(0),
            })
            .collect();
        keys.sort_by_key(|k| (k.created_ms, k.key_id));
        report.unknown_blobs += counts.values().sum::<u64>();
        report.keys = keys;
        Ok(report)
    }

    /// Seals `stored` (LBB1) of `hash` under the current key, off the async threads.
    async fn seal(&self, hash: &BlobHash, stored: Vec<u8>) -> Result<Vec<u8>, BlobStoreError> {
        let (id, key) = {
            let ring = self.ring.read().expect("key ring lock");
            let id = ring.current.expect("an open store has a current key");
            (id, ring.key(&id).expect("the current key is loaded"))
        };
        let h = *hash;
        tokio::task::spawn_blocking(move || blob_envelope::seal(id, &key, &h, &stored))
            .await
            .map_err(|e| BlobStoreError::Config(format!("blob sealing task failed: {e}")))?
            .map_err(BlobStoreError::from)
    }

    /// Opens the envelope `stored` of `hash` with the loaded keys, off the async threads.
    async fn open_blocking(
        &self,
        hash: &BlobHash,
        stored: Arc<Vec<u8>>,
    ) -> Result<Result<Vec<u8>, EnvelopeError>, BlobStoreError> {
        let ring = self.ring.clone();
        let h = *hash;
        tokio::task::spawn_blocking(move || {
            blob_envelope::open(&h, &stored, |id| {
                ring.read().expect("key ring lock").key(id)
            })
        })
        .await
        .map_err(|e| BlobStoreError::Config(format!("blob opening task failed: {e}")))
    }
}

#[async_trait::async_trait]
impl BlobStore for EncryptedStore {
    /// Seals and stores; an existing copy is kept only if it is an envelope that opens and
    /// decodes to `hash` (a plain LBB1 copy is replaced by the sealed one).
    async fn put(&self, hash: &BlobHash, stored: Vec<u8>) -> Result<(), BlobStoreError> {
        let sealed = self.seal(hash, stored).await?;
        let ring = self.ring.clone();
        let keep: KeepExisting = Arc::new(move |h, existing| {
            blob_envelope::is_sealed(existing)
                && blob_envelope::open(h, existing, |id| {
                    ring.read().expect("key ring lock").key(id)
                })
                .is_ok_and(|plain| crate::blob::decode(h, &plain, crate::PART_SIZE).is_ok())
        });
        self.inner.put_keeping(hash, sealed, keep).await
    }

    async fn replace(&self, hash: &BlobHash, stored: Vec<u8>) -> Result<(), BlobStoreError> {
        let sealed = self.seal(hash, stored).await?;
        self.inner.replace(hash, sealed).await
    }

    /// Reads and opens (a plain LBB1 blob is returned as it is). Errors: as the inner store's,
    /// plus [`BlobStoreError::Envelope`] (tampered, or a key id the repository does not hold
    /// even after re-reading `keys/`).
    async fn get(&self, hash: &BlobHash) -> Result<Vec<u8>, BlobStoreError> {
        let stored = self.inner.get(hash).await?;
        if !blob_envelope::is_sealed(&stored) {
            return Ok(stored);
        }
        let stored = Arc::new(stored);
        match self.open_blocking(hash, stored.clone()).await? {
            Err(EnvelopeError::UnknownKey { .. }) => {
                // Another coordinator of a shared store may have created it since we loaded.
                self.reload().await?;
                Ok(self.open_blocking(hash, stored).await??)
            }
            r => Ok(r?),
        }
    }

    async fn contains(&self, hash: &BlobHash) -> Result<bool, BlobStoreError> {
        self.inner.contains(hash).await
    }

    async fn list(&self) -> Result<Vec<ListedBlob>, BlobStoreError> {
        self.inner.list().await
    }

    async fn delete(&self, hash: &BlobHash) -> Result<(), BlobStoreError> {
        self.inner.delete(hash).await
    }

    async fn read_prefix(&self, hash: &BlobHash, len: usize) -> Result<Vec<u8>, BlobStoreError> {
        self.inner.read_prefix(hash, len).await
    }

    async fn put_aux(&self, name: &str, data: Vec<u8>) -> Result<(), BlobStoreError> {
        self.inner.put_aux(name, data).await
    }

    async fn get_aux(&self, name: &str) -> Result<Option<Vec<u8>>, BlobStoreError> {
        self.inner.get_aux(name).await
    }

    async fn list_aux(&self, dir: &str) -> Result<Vec<String>, BlobStoreError> {
        self.inner.list_aux(dir).await
    }

    fn is_shared(&self) -> bool {
        self.inner.is_shared()
    }

    fn describe(&self) -> String {
        format!("{} (encrypted at rest)", self.inner.describe())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::blob;
    use crate::blobstore::LocalBlobStore;

    fn part(text: &str) -> (Vec<u8>, BlobHash, Vec<u8>) {
        let raw = text.repeat(300).into_bytes();
        let h = BlobHash::of(&raw);
        let enc = blob::encode(&raw);
        (raw, h, enc)
    }

    /// Round trip through a local directory: no plaintext on disk, keys listed apart from blobs,
    /// v1 blobs still read, rotation keeps old blobs readable, a wrong master key is refused
    /// at open with the clear error, a flipped byte gives the typed error naming the blob.
    #[tokio::test]
    async fn local_round_trip_rotation_and_refusals() {
        let dir = tempfile::tempdir().unwrap();
        let local: Arc<dyn BlobStore> = Arc::new(LocalBlobStore::open(dir.path()).unwrap());
        // A v1 blob written before encryption was on.
        let (raw0, h0, enc0) = part("old plaintext blob MARKER-V1 ");
        local.put(&h0, enc0.clone()).await.unwrap();
        let master = SecretKey::generate().unwrap();
        let store = EncryptedStore::open(local.clone(), master.clone(), "t")
            .await
            .unwrap();
        let k1 = store.current_key();
        let (raw1, h1, enc1) = part("MARKER-SECRET-CONTENT ");
        store.put(&h1, enc1.clone()).await.unwrap();
        let on_disk = std::fs::read(dir.path().join(h1.key())).unwrap();
        assert_eq!(blob_envelope::key_id_of(&on_disk), Some(k1));
        assert!(!on_disk.windows(8).any(|w| w == b"MARKER-S"));
        assert_eq!(
            blob::decode(&h1, &store.get(&h1).await.unwrap(), crate::PART_SIZE).unwrap(),
            raw1
        );
        assert_eq!(
            blob::decode(&h0, &store.get(&h0).await.unwrap(), crate::PART_SIZE).unwrap(),
            raw0
        );
        assert_eq!(
            store.list().await.unwrap().len(),
            2,
            "key files are not blobs"
        );
        // Re-put keeps the sealed copy (same bytes), and replaces a plaintext one by a sealed one.
        store.put(&h1, enc1.clone()).await.unwrap();
        assert_eq!(std::fs::read(dir.path().join(h1.key())).unwrap(), on_disk);
        store.put(&h0, enc0.clone()).await.unwrap();
        assert!(blob_envelope::is_sealed(
            &std::fs::read(dir.path().join(h0.key())).unwrap()
        ));

        let k2 = store.rotate().await.unwrap();
        assert_ne!(k1, k2);
        let (_, h2, enc2) = part("after rotation ");
        store.put(&h2, enc2).await.unwrap();
        let u = store.usage().await.unwrap();
        assert_eq!(u.keys.len(), 2);
        assert_eq!(
            (u.keys[0].key_id, u.keys[0].blobs, u.keys[0].current),
            (k1, 2, false)
        );
        assert_eq!(
            (u.keys[1].key_id, u.keys[1].blobs, u.keys[1].current),
            (k2, 1, true)
        );

        // Reopened: the newest key is current, old blobs read.
        let again = EncryptedStore::open(local.clone(), master.clone(), "t")
            .await
            .unwrap();
        assert_eq!(again.current_key(), k2);
        assert!(again.get(&h1).await.is_ok());
        assert!(format!("{again:?}").contains("[redacted]"));

        // Wrong master key.
        let e = EncryptedStore::open(local.clone(), SecretKey::generate().unwrap(), "t")
            .await
            .unwrap_err();
        let msg = e.to_string();
        assert!(
            msg.starts_with("master key does not open data key "),
            "{msg}"
        );
        assert!(msg.ends_with(": wrong key?"), "{msg}");

        // Tamper: flip one byte of the sealed file.
        let p = dir.path().join(h1.key());
        let mut b = std::fs::read(&p).unwrap();
        let n = b.len();
        b[n / 2] ^= 1;
        std::fs::write(&p, &b).unwrap();
        match again.get(&h1).await {
            Err(BlobStoreError::Envelope(EnvelopeError::Tampered { hash, key_id })) => {
                assert_eq!((hash, key_id), (h1, k1));
            }
            other => panic!("{other:?}"),
        }
        // A put over the damaged copy replaces it.
        again.put(&h1, enc1).await.unwrap();
        assert!(again.get(&h1).await.is_ok());
        assert!(holds_data_keys(local.as_ref()).await.unwrap());
    }

    /// The cost at the store layer: put (fsync'd) + get of 4 MiB parts through a plain local
    /// directory and through the encrypted decorator, printed (release: `cargo test --release
    /// -p lifeboat-common store_throughput -- --nocapture`).
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn store_throughput_plain_vs_encrypted() {
        let parts: Vec<(BlobHash, Vec<u8>)> = (0..24u64)
            .map(|n| {
                let mut x = n.wrapping_mul(0x9e3779b97f4a7c15) | 1;
                let raw: Vec<u8> = (0..4 << 20)
                    .map(|_| {
                        x ^= x << 13;
                        x ^= x >> 7;
                        x ^= x << 17;
                        (x % 16) as u8
                    })
                    .collect();
                (BlobHash::of(&raw), blob::encode(&raw))
            })
            .collect();
        let bytes: usize = parts.iter().map(|(_, e)| e.len()).sum();
        let mut results = Vec::new();
        for encrypted in [false, true] {
            let dir = tempfile::tempdir().unwrap();
            let local: Arc<dyn BlobStore> = Arc::new(LocalBlobStore::open(dir.path()).unwrap());
            let store: Arc<dyn BlobStore> = if encrypted {
                Arc::new(
                    EncryptedStore::open(local, SecretKey::generate().unwrap(), "t")
                        .await
                        .unwrap(),
                )
            } else {
                local
            };
            let t = std::time::Instant::now();
            for (h, e) in &parts {
                store.put(h, e.clone()).await.unwrap();
            }
            let put = t.elapsed().as_secs_f64();
            let t = std::time::Instant::now();
            for (h, e) in &parts {
                assert_eq!(store.get(h).await.unwrap().len(), e.len());
            }
            let get = t.elapsed().as_secs_f64();
            results.push((bytes as f64 / 1e6 / put, bytes as f64 / 1e6 / get));
        }
        println!(
            "store: put+fsync plain {:.0} MB/s, encrypted {:.0} MB/s; get plain {:.0} MB/s, encrypted {:.0} MB/s ({} MB of stored parts)",
            results[0].0,
            results[1].0,
            results[0].1,
            results[1].1,
            bytes / 1_000_000
        );
    }
}
