//! Part hashes of snapshot spools, kept from the moment they were written.
//!
//! A snapshot (RDB, base-backup tar, exec dump) is hashed while it is spooled: the whole-file
//! blake3 for its sidecar, and every whole part by the pre-upload ([`crate::snapshot::preupload`]), which
//! also has the leader store each part. Planning the finished file for `PushChanges` used to
//! read it back and hash it twice more (each part, and the whole file). When the pre-upload
//! covered every part, the agent records a [`SpoolDigest`] here instead, keyed by the file's
//! device and inode (a rename into the snapshots directory keeps both, and the size and mtime),
//! and [`crate::files::delta::plan_file`] builds the plan from it without reading the file.
//!
//! In memory only and single-use ([`SpoolDigests::take`] removes the entry): after a restart, a
//! cancelled batch or any change to the file (size or mtime differ) the file is read as usual.
//! Whatever the plan says is still checked where it matters: a part sent whole is read from
//! disk and must hash to its planned hash, and the leader checks the whole-file blake3 against
//! the parts' chaining values.

use std::collections::HashMap;
use std::os::unix::fs::MetadataExt;
use std::sync::{Arc, Mutex};

use lifeboat_common::blob::BlobHash;

/// Entries kept at most (one per snapshot not yet planned; the oldest goes first).
pub const CAPACITY: usize = 64;

/// What is known of a spooled file's content without reading it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SpoolDigest {
    /// File size in bytes when recorded.
    pub size: u64,
    /// Modification time when recorded (seconds, nanoseconds).
    pub mtime: (i64, i64),
    /// Part size in bytes the parts were cut with (from byte 0).
    pub part_size: usize,
    /// blake3 of the whole file.
    pub blake3: BlobHash,
    /// Every part's blake3 and size in bytes, in order.
    pub parts: Vec<(BlobHash, u64)>,
}

impl SpoolDigest {
    /// Whether the parts cut a file of `size` bytes into `part_size` parts exactly (all whole
    /// but the last, which is not empty).
    pub fn well_formed(&self) -> bool {
        if self.part_size == 0 {
            return false;
        }
        let n = self.size.div_ceil(self.part_size as u64);
        self.parts.len() as u64 == n
            && self.parts.iter().enumerate().all(|(i, (_, s))| {
                if i + 1 < self.parts.len() {
                    *s == self.part_size as u64
                } else {
                    *s > 0 && *s <= self.part_size as u64
                }
            })
            && self.parts.iter().map(|(_, s)| s).sum::<u64>() == self.size
    }
}

/// The table of [`SpoolDigest`]s by (device, inode); cheap to clone (shared).
#[derive(Debug, Clone, Default)]
pub struct SpoolDigests {
    inner: Arc<Mutex<Table>>,
}

#[derive(Debug, Default)]
struct Table {
    map: HashMap<(u64, u64), SpoolDigest>,
    order: std::collections::VecDeque<(u64, u64)>,
}

impl SpoolDigests {
    /// Records `digest` for the file whose metadata is `meta` (taken after its last write);
    /// ignored unless [`SpoolDigest::well_formed`] and matching `meta`'s size.
    pub fn record(&self, meta: &std::fs::Metadata, mut digest: SpoolDigest) {
        digest.size = meta.len();
        digest.mtime = (meta.mtime(), meta.mtime_nsec());
        if !digest.well_formed() {
            return;
        }
        let key = (meta.dev(), meta.ino());
        let mut t = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        if t.map.insert(key, digest).is_none() {
            t.order.push_back(key);
        }
        while t.order.len() > CAPACITY {
            if let Some(old) = t.order.pop_front() {
                t.map.remove(&old);
            }
        }
    }

    /// Removes and returns the digest of the file whose metadata is `meta`, if one was recorded
    /// for the same inode with the same size and mtime.
    pub fn take(&self, meta: &std::fs::Metadata) -> Option<SpoolDigest> {
        let key = (meta.dev(), meta.ino());
        let mut t = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        let d = t.map.remove(&key)?;
        t.order.retain(|k| *k != key);
        (d.size == meta.len() && d.mtime == (meta.mtime(), meta.mtime_nsec())).then_some(d)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn digest(parts: &[u64], part_size: usize) -> SpoolDigest {
        SpoolDigest {
            size: parts.iter().sum(),
            mtime: (0, 0),
            part_size,
            blake3: BlobHash::of(b"x"),
            parts: parts
                .iter()
                .map(|&s| (BlobHash::of(&[s as u8]), s))
                .collect(),
        }
    }

    #[test]
    fn shapes() {
        assert!(digest(&[4, 4, 1], 4).well_formed());
        assert!(digest(&[4], 4).well_formed());
        assert!(!digest(&[4, 3, 1], 4).well_formed());
        assert!(!digest(&[4, 0], 4).well_formed());
        assert!(!digest(&[5], 4).well_formed());
        assert!(!digest(&[4, 4], 0).well_formed());
        let mut d = digest(&[4, 4], 4);
        d.size = 9;
        assert!(!d.well_formed());
    }

    #[test]
    fn taken_once_and_only_while_unchanged() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("f");
        std::fs::write(&p, b"abcdefghij").unwrap();
        let t = SpoolDigests::default();
        let meta = std::fs::metadata(&p).unwrap();
        t.record(&meta, digest(&[4, 4, 2], 4));
        // A rename keeps the inode, size and mtime.
        let q = dir.path().join("g");
        std::fs::rename(&p, &q).unwrap();
        let got = t.take(&std::fs::metadata(&q).unwrap()).expect("recorded");
        assert_eq!(got.parts.len(), 3);
        assert!(
            t.take(&std::fs::metadata(&q).unwrap()).is_none(),
            "single use"
        );

        // A write after recording: not used.
        t.record(&std::fs::metadata(&q).unwrap(), digest(&[4, 4, 2], 4));
        std::fs::write(&q, b"abcdefghijk").unwrap();
        assert!(t.take(&std::fs::metadata(&q).unwrap()).is_none());

        // A digest not matching the file's size is not recorded.
        t.record(&std::fs::metadata(&q).unwrap(), digest(&[4, 4, 2], 4));
        assert!(t.take(&std::fs::metadata(&q).unwrap()).is_none());
    }
}
