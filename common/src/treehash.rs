//! The blake3 of a whole file from the chaining values of its parts.
//!
//! BLAKE3 hashes an input as a binary tree of 1 KiB chunks (the BLAKE3 paper, section 2.1: the
//! left subtree of every node holds the largest power-of-two number of chunks that leaves at
//! least one byte for the right). A file cut into parts of a power-of-two size (every part but
//! the last full) therefore has each part as a complete subtree, and its hash is the merge of
//! the parts' *chaining values* (non-root hashes at their offsets) in that tree shape. This is
//! what lets a coordinator check the whole-file hash of a file whose parts it verified earlier
//! (`PutParts`) without reading them back. Built on `blake3::hazmat`; tested against
//! `blake3::hash` for many sizes.

pub use blake3::hazmat::ChainingValue;
use blake3::hazmat::{
    left_subtree_len, merge_subtrees_non_root, merge_subtrees_root, HasherExt, Mode,
};

/// The chaining value of `data` as the part starting at byte `offset` of a larger file.
/// `offset` must be a multiple of the part size, itself a power of two of at least 1024 bytes,
/// and `data` at most one part long and not empty (the caller's framing guarantees all three).
///
/// Only meaningful for files of two or more parts: a one-part file's hash is the part's own
/// root hash.
pub fn part_cv(offset: u64, data: &[u8]) -> ChainingValue {
    let mut h = blake3::Hasher::new();
    h.set_input_offset(offset);
    h.update(data);
    h.finalize_non_root()
}

/// The blake3 of a file of two or more parts from their chaining values ([`part_cv`]):
/// `parts[i] = (bytes, cv)`, every part but the last exactly `part_size` bytes. `None` if the
/// shape is not one [`part_cv`] values can form (fewer than two parts, a part size that is not a
/// power of two of at least 1024, a wrong part length).
pub fn file_hash(part_size: u64, parts: &[(u64, ChainingValue)]) -> Option<blake3::Hash> {
    if parts.len() < 2 || part_size < blake3::CHUNK_LEN as u64 || !part_size.is_power_of_two() {
        return None;
    }
    let (last, full) = parts.split_last()?;
    if full.iter().any(|(n, _)| *n != part_size) || last.0 == 0 || last.0 > part_size {
        return None;
    }
    let total = part_size * full.len() as u64 + last.0;
    let (l, r) = split(part_size, parts.len(), total)?;
    let left = subtree(part_size, &parts[..l], l as u64 * part_size)?;
    let right = subtree(part_size, &parts[l..], total - l as u64 * part_size)?;
    debug_assert_eq!(r, parts.len() - l);
    Some(merge_subtrees_root(&left, &right, Mode::Hash))
}

/// Parts in the left subtree of a node over `n` parts (`total` bytes), and in the right.
fn split(part_size: u64, n: usize, total: u64) -> Option<(usize, usize)> {
    let left_bytes = left_subtree_len(total);
    if !left_bytes.is_multiple_of(part_size) {
        return None;
    }
    let l = usize::try_from(left_bytes / part_size).ok()?;
    (l >= 1 && l < n).then_some((l, n - l))
}

/// The chaining value of the subtree over `parts` (`total` bytes).
fn subtree(part_size: u64, parts: &[(u64, ChainingValue)], total: u64) -> Option<ChainingValue> {
    if parts.len() == 1 {
        return Some(parts[0].1);
    }
    let (l, _) = split(part_size, parts.len(), total)?;
    let left = subtree(part_size, &parts[..l], l as u64 * part_size)?;
    let right = subtree(part_size, &parts[l..], total - l as u64 * part_size)?;
    Some(merge_subtrees_non_root(&left, &right, Mode::Hash))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cvs(data: &[u8], part: usize) -> Vec<(u64, ChainingValue)> {
        data.chunks(part)
            .enumerate()
            .map(|(i, c)| (c.len() as u64, part_cv((i * part) as u64, c)))
            .collect()
    }

    #[test]
    fn equals_blake3_of_the_whole_for_many_sizes() {
        let data: Vec<u8> = (0..9 * 4096 + 77).map(|i| (i * 7 % 251) as u8).collect();
        for part in [1024usize, 2048, 4096] {
            // Every length from 2 parts (plus one byte) to 9+ parts, in steps that hit full and
            // short last parts.
            let mut len = part + 1;
            while len <= data.len() {
                let d = &data[..len];
                assert_eq!(
                    file_hash(part as u64, &cvs(d, part)),
                    Some(blake3::hash(d)),
                    "part {part}, len {len}"
                );
                len += if len % part == 0 { 1 } else { 333 };
            }
            // Exactly n full parts.
            for n in 2..=9 {
                let d = &data[..n * part];
                assert_eq!(file_hash(part as u64, &cvs(d, part)), Some(blake3::hash(d)));
            }
        }
    }

    #[test]
    fn four_mib_parts() {
        let part = crate::PART_SIZE;
        let data: Vec<u8> = (0..5 * part + 12345).map(|i| (i % 253) as u8).collect();
        assert_eq!(
            file_hash(part as u64, &cvs(&data, part)),
            Some(blake3::hash(&data))
        );
    }

    #[test]
    fn refuses_bad_shapes() {
        let data = vec![1u8; 5000];
        let good = cvs(&data, 1024);
        assert_eq!(file_hash(1024, &good[..1]), None);
        assert_eq!(file_hash(1000, &good), None);
        let mut short_middle = good.clone();
        short_middle[1].0 = 1000;
        assert_eq!(file_hash(1024, &short_middle), None);
        // A part out of place gives a different hash, never the right one.
        let mut swapped = good.clone();
        swapped.swap(0, 1);
        assert_ne!(file_hash(1024, &swapped), Some(blake3::hash(&data)));
    }
}
