//! File content in bounded parts: reading one part at a time, hashing (per part and whole file,
//! blake3), fast_rsync signatures, and the choice of how each part travels: `reuse` (no bytes),
//! `delta` (against the previous acknowledged part) or `full`.
//!
//! A file is never held whole in memory: [`plan_file`] reads one part into a reusable buffer of
//! `part_size` bytes; the sender reads each part again when it is streamed ([`read_part`]) and
//! checks its hash against the plan, unless the plan kept the payload (small payloads within a
//! per-batch budget).

use std::fs::File;
use std::io::{Read, Seek, SeekFrom};
use std::os::unix::fs::MetadataExt;
use std::path::Path;

use fast_rsync::{Signature, SignatureOptions};
use lifeboat_common::blob::BlobHash;
use lifeboat_common::catalog::PartRef;

/// Block size of part signatures, in bytes.
pub const SIG_BLOCK_SIZE: u32 = 4096;
/// Bytes of the MD4 block hash kept in signatures.
pub const SIG_HASH_SIZE: u32 = 8;
/// How many times a file whose size or mtime changed while it was read is read again.
pub const READ_RETRIES: usize = 3;

/// How one part travels.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Body {
    /// The coordinator already stores blob `hash`: no bytes.
    Reuse,
    /// An rsync delta against blob `base` (whose serialized signature is `base_sig`).
    Delta {
        /// Hash of the previous acknowledged part at the same index.
        base: BlobHash,
        /// Serialized fast_rsync signature of `base`.
        base_sig: Vec<u8>,
        /// Delta length in bytes at planning time.
        len: u64,
    },
    /// The whole part.
    Full,
}

/// The plan of one part of a file version.
#[derive(Debug, Clone)]
pub struct PartPlan {
    /// Index in the file (0-based).
    pub index: u32,
    /// blake3 of the part's content.
    pub hash: BlobHash,
    /// Content bytes.
    pub size: u64,
    /// How it travels.
    pub body: Body,
    /// The payload (full content or delta bytes) kept from planning, when within budget.
    pub retained: Option<Vec<u8>>,
    /// Serialized fast_rsync signature of the new content (stored after the acknowledgement);
    /// empty when not computed (see [`plan_file`]).
    pub signature: Vec<u8>,
}

impl PartPlan {
    /// Payload bytes this part puts on the wire (0 for reuse).
    pub fn payload_bytes(&self) -> u64 {
        match &self.body {
            Body::Reuse => 0,
            Body::Delta { len, .. } => *len,
            Body::Full => self.size,
        }
    }

    /// The part reference recorded in the state after the acknowledgement.
    pub fn part_ref(&self) -> PartRef {
        PartRef {
            hash: self.hash,
            size: self.size,
        }
    }
}

/// What the state knows about the previous acknowledged version of a path.
pub trait Known {
    /// Part `index` of the previous acknowledged version.
    fn old_part(&self, index: usize) -> Option<PartRef>;
    /// Serialized signature of part `index` of the previous acknowledged version.
    fn old_signature(&self, index: usize) -> Option<Vec<u8>>;
    /// Whether any acknowledged part had this hash (the coordinator stores that blob).
    fn is_acked(&self, hash: &BlobHash) -> bool;
    /// The part hashes recorded while the file with metadata `meta` was spooled, if any
    /// (single use; see [`crate::files::spool_digest`]).
    fn spool_digest(
        &self,
        _meta: &std::fs::Metadata,
    ) -> Option<crate::files::spool_digest::SpoolDigest> {
        None
    }
}

/// Nothing known: every part is sent full.
pub struct NothingKnown;

impl Known for NothingKnown {
    fn old_part(&self, _: usize) -> Option<PartRef> {
        None
    }
    fn old_signature(&self, _: usize) -> Option<Vec<u8>> {
        None
    }
    fn is_acked(&self, _: &BlobHash) -> bool {
        false
    }
}

/// Serialized signature of `data` (block 4096 bytes, 8-byte MD4 prefix).
pub fn signature(data: &[u8]) -> Vec<u8> {
    Signature::calculate(
        data,
        SignatureOptions {
            block_size: SIG_BLOCK_SIZE,
            crypto_hash_size: SIG_HASH_SIZE,
        },
    )
    .into_serialized()
}

/// A fast_rsync delta turning the content behind `base_sig` into `data`; `None` if the stored
/// signature is unusable.
pub fn delta(base_sig: &[u8], data: &[u8]) -> Option<Vec<u8>> {
    let sig = Signature::deserialize(base_sig.to_vec()).ok()?;
    let mut out = Vec::new();
    fast_rsync::diff(&sig.index(), data, &mut out).ok()?;
    Some(out)
}

/// Chooses how part `index` with content `data` (hash `hash`) travels:
/// 1. same hash as the previous version's part `index` → `reuse`;
/// 2. hash of any acknowledged part → `reuse`;
/// 3. previous part `index` with a stored signature and a delta shorter than `data` → `delta`;
/// 4. otherwise `full`.
///
/// Returns the body and, for `delta`, the delta bytes.
pub fn choose(
    index: usize,
    data: &[u8],
    hash: &BlobHash,
    known: &dyn Known,
) -> (Body, Option<Vec<u8>>) {
    let old = known.old_part(index);
    if old.as_ref().is_some_and(|o| &o.hash == hash) || known.is_acked(hash) {
        return (Body::Reuse, None);
    }
    if let Some(old) = old {
        if let Some(sig) = known.old_signature(index) {
            if let Some(d) = delta(&sig, data) {
                if d.len() < data.len() {
                    return (
                        Body::Delta {
                            base: old.hash,
                            base_sig: sig,
                            len: d.len() as u64,
                        },
                        Some(d),
                    );
                }
            }
        }
    }
    (Body::Full, None)
}

/// A file read and planned part by part.
#[derive(Debug, Clone)]
pub struct FilePlan {
    /// Bytes read (the size sent).
    pub size: u64,
    /// Modification time before reading, ns since the Unix epoch.
    pub mtime_ns: i64,
    /// `st_mode & 0o7777`.
    pub mode: u32,
    /// blake3 of everything read.
    pub blake3: BlobHash,
    /// The parts in order.
    pub parts: Vec<PartPlan>,
}

impl FilePlan {
    /// Payload bytes of all parts.
    pub fn payload_bytes(&self) -> u64 {
        self.parts.iter().map(|p| p.payload_bytes()).sum()
    }
}

/// The plan of a spooled file from the part hashes recorded while it was written, without
/// reading it: parts already stored (acknowledged, or equal to an earlier part) are `reuse`,
/// the others `full` (read from disk when sent, and checked against their hash then). `None`
/// when the digest does not fit `meta` or `part_size`.
fn plan_from_digest(
    meta: &std::fs::Metadata,
    d: crate::files::spool_digest::SpoolDigest,
    part_size: usize,
    known: &dyn Known,
) -> Option<FilePlan> {
    if d.part_size != part_size || d.size != meta.len() || !d.well_formed() {
        return None;
    }
    let mut seen = std::collections::HashSet::new();
    let parts = d
        .parts
        .iter()
        .enumerate()
        .map(|(i, (hash, size))| {
            let body = if seen.contains(hash) || known.is_acked(hash) {
                Body::Reuse
            } else {
                Body::Full
            };
            seen.insert(*hash);
            PartPlan {
                index: i as u32,
                hash: *hash,
                size: *size,
                body,
                retained: None,
                signature: Vec::new(),
            }
        })
        .collect();
    Some(FilePlan {
        size: d.size,
        mtime_ns: crate::files::scan::mtime_ns(meta),
        mode: meta.mode() & 0o7777,
        blake3: d.blake3,
        parts,
    })
}

/// Reads into `buf` until it is full or the file ends; returns the bytes read.
fn read_full(f: &mut File, buf: &mut [u8]) -> std::io::Result<usize> {
    let mut n = 0;
    while n < buf.len() {
        match f.read(&mut buf[n..]) {
            Ok(0) => break,
            Ok(k) => n += k,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(n)
}

/// Reads `path` one part of `part_size` bytes at a time, hashing each part and the whole file,
/// computing signatures and choosing each part's [`Body`] against `known` (a part equal to an
/// earlier part of the same file is `reuse`: the coordinator stores it by then). Payloads are kept in
/// [`PartPlan::retained`] while `retain_budget` (bytes) allows; `force_full` sends every part
/// whole; without `signatures` every [`PartPlan::signature`] is empty (files never changed in
/// place, such as snapshots, need none). If the size or mtime changed while reading, the file is read again (up to
/// [`READ_RETRIES`] times), then what was read last is used. `scratch` is the part buffer,
/// grown to `part_size` once and reused across files.
///
/// Errors: I/O errors (the caller decides whether the path vanished); `InvalidInput` if the path
/// is no longer a regular file.
pub fn plan_file(
    path: &Path,
    part_size: usize,
    known: &dyn Known,
    retain_budget: &mut u64,
    force_full: bool,
    signatures: bool,
    scratch: &mut Vec<u8>,
) -> std::io::Result<FilePlan> {
    if scratch.len() != part_size {
        scratch.resize(part_size, 0);
    }
    let buf = scratch.as_mut_slice();
    let mut attempt = 0;
    loop {
        let mut budget = *retain_budget;
        let mut f = File::open(path)?;
        let before = f.metadata()?;
        if !before.is_file() {
            return Err(std::io::Error::new(
                std::io::ErrorKind::InvalidInput,
                "no longer a regular file",
            ));
        }
        if !signatures && !force_full {
            if let Some(plan) = known
                .spool_digest(&before)
                .and_then(|d| plan_from_digest(&before, d, part_size, known))
            {
                return Ok(plan);
            }
        }
        let mut whole = blake3::Hasher::new();
        let mut parts: Vec<PartPlan> = Vec::new();
        // Hashes of earlier parts of this file: an equal later part is sent as `reuse`.
        let mut seen = std::collections::HashSet::new();
        let mut total = 0u64;
        loop {
            let n = read_full(&mut f, buf)?;
            if n == 0 {
                break;
            }
            let data = &buf[..n];
            whole.update(data);
            let hash = BlobHash::of(data);
            let index = parts.len();
            let (body, delta_bytes) = if force_full {
                (Body::Full, None)
            } else if seen.contains(&hash) {
                (Body::Reuse, None)
            } else {
                choose(index, data, &hash, known)
            };
            seen.insert(hash);
            let retained = match (&body, delta_bytes) {
                (Body::Full, _) if budget >= n as u64 => {
                    budget -= n as u64;
                    Some(data.to_vec())
                }
                (Body::Delta { .. }, Some(d)) if budget >= d.len() as u64 => {
                    budget -= d.len() as u64;
                    Some(d)
                }
                _ => None,
            };
            parts.push(PartPlan {
                index: index as u32,
                hash,
                size: n as u64,
                body,
                retained,
                signature: if signatures {
                    signature(data)
                } else {
                    Vec::new()
                },
            });
            total += n as u64;
            if n < part_size {
                break;
            }
        }
        let after = f.metadata()?;
        let stable = after.len() == before.len()
            && after.mtime() == before.mtime()
            && after.mtime_nsec() == before.mtime_nsec()
            && total == after.len();
        if stable || attempt >= READ_RETRIES {
            if !stable {
                tracing::warn!(path = %path.display(), "file kept changing while read; sending what was read");
            }
            *retain_budget = budget;
            return Ok(FilePlan {
                size: total,
                mtime_ns: crate::files::scan::mtime_ns(&before),
                mode: before.mode() & 0o7777,
                blake3: BlobHash(*whole.finalize().as_bytes()),
                parts,
            });
        }
        attempt += 1;
        tracing::debug!(path = %path.display(), attempt, "file changed while read; reading again");
    }
}

/// Reads part `index` (`size` bytes at offset `index * part_size`) of `path` and checks that it
/// still hashes to `hash`.
///
/// Errors: I/O errors; `InvalidData` when the content changed since it was planned.
pub fn read_part(
    path: &Path,
    index: u32,
    part_size: usize,
    size: u64,
    hash: &BlobHash,
) -> std::io::Result<Vec<u8>> {
    let mut f = File::open(path)?;
    f.seek(SeekFrom::Start(index as u64 * part_size as u64))?;
    let mut buf = vec![0u8; size as usize];
    let n = read_full(&mut f, &mut buf)?;
    if n as u64 != size || &BlobHash::of(&buf) != hash {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            "content changed since it was planned",
        ));
    }
    Ok(buf)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashSet;

    /// A previous version given as part contents.
    struct Prev {
        parts: Vec<Vec<u8>>,
        sigs: bool,
        acked: HashSet<BlobHash>,
    }
    impl Known for Prev {
        fn old_part(&self, i: usize) -> Option<PartRef> {
            self.parts.get(i).map(|p| PartRef {
                hash: BlobHash::of(p),
                size: p.len() as u64,
            })
        }
        fn old_signature(&self, i: usize) -> Option<Vec<u8>> {
            self.sigs
                .then(|| self.parts.get(i).map(|p| signature(p)))
                .flatten()
        }
        fn is_acked(&self, h: &BlobHash) -> bool {
            self.acked.contains(h) || self.parts.iter().any(|p| &BlobHash::of(p) == h)
        }
    }

    fn pseudo_random(n: usize, seed: u64) -> Vec<u8> {
        let mut x = seed.wrapping_mul(0x9E3779B97F4A7C15) | 1;
        (0..n)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                x as u8
            })
            .collect()
    }

    #[test]
    fn choice_reuse_delta_full() {
        let a = pseudo_random(64 * 1024, 1);
        let b = pseudo_random(64 * 1024, 2);
        let other = pseudo_random(64 * 1024, 3);
        let prev = Prev {
            parts: vec![a.clone(), b.clone()],
            sigs: true,
            acked: HashSet::from([BlobHash::of(&other)]),
        };
        // Same content at the same index: reuse.
        assert_eq!(choose(0, &a, &BlobHash::of(&a), &prev).0, Body::Reuse);
        // Content of another acknowledged part (moved data): reuse.
        assert_eq!(choose(0, &b, &BlobHash::of(&b), &prev).0, Body::Reuse);
        assert_eq!(
            choose(5, &other, &BlobHash::of(&other), &prev).0,
            Body::Reuse
        );
        // A small edit: delta against the old part at that index.
        let mut a2 = a.clone();
        a2[30_000] ^= 0xff;
        let (body, d) = choose(0, &a2, &BlobHash::of(&a2), &prev);
        match &body {
            Body::Delta { base, len, .. } => {
                assert_eq!(base, &BlobHash::of(&a));
                assert!(*len < 10_000, "delta of {len} bytes");
                let mut out = Vec::new();
                fast_rsync::apply(&a, d.as_ref().unwrap(), &mut out).unwrap();
                assert_eq!(out, a2);
            }
            other => panic!("expected delta, got {other:?}"),
        }
        // Unrelated content: the delta is not smaller, so full.
        let fresh = pseudo_random(64 * 1024, 9);
        assert_eq!(
            choose(1, &fresh, &BlobHash::of(&fresh), &prev).0,
            Body::Full
        );
        // No old part at that index: full.
        assert_eq!(choose(7, &a2, &BlobHash::of(&a2), &prev).0, Body::Full);
        // No signature stored: full.
        let nosig = Prev {
            sigs: false,
            ..prev
        };
        assert_eq!(choose(0, &a2, &BlobHash::of(&a2), &nosig).0, Body::Full);
    }

    #[test]
    fn splits_into_bounded_parts() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("f");
        let part = 16 * 1024;
        let data = pseudo_random(part * 2 + 1234, 4);
        std::fs::write(&p, &data).unwrap();
        let mut budget = 0;
        let plan = plan_file(
            &p,
            part,
            &NothingKnown,
            &mut budget,
            false,
            true,
            &mut Vec::new(),
        )
        .unwrap();
        assert_eq!(plan.size, data.len() as u64);
        assert_eq!(plan.blake3, BlobHash::of(&data));
        let sizes: Vec<u64> = plan.parts.iter().map(|p| p.size).collect();
        assert_eq!(sizes, vec![part as u64, part as u64, 1234]);
        for (i, pp) in plan.parts.iter().enumerate() {
            let chunk = &data[i * part..(i * part + pp.size as usize)];
            assert_eq!(pp.hash, BlobHash::of(chunk));
            assert_eq!(pp.body, Body::Full);
            assert!(pp.retained.is_none());
            assert_eq!(
                read_part(&p, pp.index, part, pp.size, &pp.hash).unwrap(),
                chunk
            );
        }
        assert_eq!(plan.payload_bytes(), data.len() as u64);

        // An exact multiple of the part size has no empty trailing part; an empty file none.
        std::fs::write(&p, &data[..part * 2]).unwrap();
        let plan = plan_file(
            &p,
            part,
            &NothingKnown,
            &mut budget,
            false,
            true,
            &mut Vec::new(),
        )
        .unwrap();
        assert_eq!(plan.parts.len(), 2);
        std::fs::write(&p, b"").unwrap();
        let plan = plan_file(
            &p,
            part,
            &NothingKnown,
            &mut budget,
            false,
            true,
            &mut Vec::new(),
        )
        .unwrap();
        assert!(plan.parts.is_empty());
        assert_eq!(plan.blake3, BlobHash::of(b""));

        // Payloads are kept within the budget only.
        std::fs::write(&p, &data).unwrap();
        let mut budget = part as u64 + 1300;
        let plan = plan_file(
            &p,
            part,
            &NothingKnown,
            &mut budget,
            false,
            true,
            &mut Vec::new(),
        )
        .unwrap();
        let kept: Vec<bool> = plan.parts.iter().map(|p| p.retained.is_some()).collect();
        assert_eq!(kept, vec![true, false, true]);
        assert_eq!(budget, 1300 - 1234);

        // A changed file is detected when the part is read again.
        let mut changed = data.clone();
        changed[5] ^= 1;
        std::fs::write(&p, &changed).unwrap();
        let e = read_part(&p, 0, part, plan.parts[0].size, &plan.parts[0].hash).unwrap_err();
        assert_eq!(e.kind(), std::io::ErrorKind::InvalidData);
    }

    #[test]
    fn plan_against_previous_version() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("f");
        let part = 32 * 1024;
        let data = pseudo_random(part * 3, 5);
        let prev = Prev {
            parts: data.chunks(part).map(|c| c.to_vec()).collect(),
            sigs: true,
            acked: HashSet::new(),
        };
        let mut edited = data.clone();
        edited[part + 100] ^= 0x55;
        std::fs::write(&p, &edited).unwrap();
        let mut budget = u64::MAX;
        let plan = plan_file(&p, part, &prev, &mut budget, false, true, &mut Vec::new()).unwrap();
        let kinds: Vec<&str> = plan
            .parts
            .iter()
            .map(|p| match p.body {
                Body::Reuse => "reuse",
                Body::Delta { .. } => "delta",
                Body::Full => "full",
            })
            .collect();
        assert_eq!(kinds, vec!["reuse", "delta", "reuse"]);
        assert!(plan.payload_bytes() < 8 * 1024, "{}", plan.payload_bytes());
        // force_full ignores what is known.
        let plan = plan_file(&p, part, &prev, &mut budget, true, true, &mut Vec::new()).unwrap();
        assert!(plan.parts.iter().all(|p| p.body == Body::Full));
    }

    /// Knows one spooled file's digest (single use) and one stored blob.
    struct Spooled {
        digests: crate::files::spool_digest::SpoolDigests,
        acked: BlobHash,
    }
    impl Known for Spooled {
        fn old_part(&self, _: usize) -> Option<PartRef> {
            None
        }
        fn old_signature(&self, _: usize) -> Option<Vec<u8>> {
            None
        }
        fn is_acked(&self, h: &BlobHash) -> bool {
            *h == self.acked
        }
        fn spool_digest(
            &self,
            meta: &std::fs::Metadata,
        ) -> Option<crate::files::spool_digest::SpoolDigest> {
            self.digests.take(meta)
        }
    }

    #[test]
    fn spooled_file_is_planned_from_its_digest_without_reading() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("snap");
        let part = 4096;
        let data = pseudo_random(part * 2 + 100, 9);
        std::fs::write(&p, &data).unwrap();
        let chunks: Vec<&[u8]> = data.chunks(part).collect();
        let stored = BlobHash::of(chunks[0]);
        // Hashes recorded while spooling; a made-up whole-file hash shows the file is not read.
        let marker = BlobHash::of(b"recorded, not computed");
        let k = Spooled {
            digests: Default::default(),
            acked: stored,
        };
        let record = || {
            k.digests.record(
                &std::fs::metadata(&p).unwrap(),
                crate::files::spool_digest::SpoolDigest {
                    size: 0,
                    mtime: (0, 0),
                    part_size: part,
                    blake3: marker,
                    parts: chunks
                        .iter()
                        .map(|c| (BlobHash::of(c), c.len() as u64))
                        .collect(),
                },
            )
        };
        record();
        let mut budget = u64::MAX;
        let plan = plan_file(&p, part, &k, &mut budget, false, false, &mut Vec::new()).unwrap();
        assert_eq!(plan.blake3, marker);
        assert_eq!(plan.size, data.len() as u64);
        let bodies: Vec<&Body> = plan.parts.iter().map(|p| &p.body).collect();
        assert_eq!(bodies, vec![&Body::Reuse, &Body::Full, &Body::Full]);
        assert!(plan.parts.iter().all(|p| p.retained.is_none()));
        for (pp, c) in plan.parts.iter().zip(&chunks) {
            assert_eq!(pp.hash, BlobHash::of(c));
            // A part sent whole is read then and checked against the recorded hash.
            assert_eq!(
                read_part(&p, pp.index, part, pp.size, &pp.hash).unwrap(),
                c.to_vec()
            );
        }
        // Single use: the next plan reads the file.
        let plan = plan_file(&p, part, &k, &mut budget, false, false, &mut Vec::new()).unwrap();
        assert_eq!(plan.blake3, BlobHash::of(&data));

        // Files with signatures (not snapshots) never use a digest.
        record();
        let plan = plan_file(&p, part, &k, &mut budget, false, true, &mut Vec::new()).unwrap();
        assert_eq!(plan.blake3, BlobHash::of(&data));
        // A digest cut with another part size is not used either.
        let plan = plan_file(&p, part * 2, &k, &mut budget, false, false, &mut Vec::new()).unwrap();
        assert_eq!(plan.blake3, BlobHash::of(&data));
    }
}
