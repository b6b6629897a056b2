//! The encrypted stored form of a blob (`LBE1`), used only at rest, inside the blob store
//! (see [`crate::blobstore::EncryptedStore`]); peers and agents still exchange the plain stored
//! form of [`crate::blob`] (`LBB1`) over mutual TLS.
//!
//! ```text
//! offset  0: magic   b"LBE1"
//! offset  4: key id  8 bytes (the repository data key that sealed it, crate::keys::KeyId)
//! offset 12: nonce   12 random bytes (OsRng), AES-GCM's 96-bit nonce
//! offset 24: AES-256-GCM ciphertext of the LBB1 bytes, then its 16-byte tag
//! ```
//!
//! The associated data is the 24-byte header followed by the blob's 32-byte content hash, so a
//! changed magic, key id, nonce or body byte, and a file moved under another blob's name, all
//! fail the tag check ([`EnvelopeError::Tampered`]). Random 96-bit nonces keep the chance of a
//! repeat under one key below 2^-32 for 2^32 blobs (NIST SP 800-38D, 8.3); a rotation starts a
//! new key long before that.

use aes_gcm::aead::{Aead, Payload};
use aes_gcm::Nonce;

use crate::blob::BlobHash;
use crate::keys::{random_fill, KeyError, KeyId, SecretKey, KEY_ID_LEN, NONCE_LEN};

/// Magic prefix of an encrypted blob.
pub const MAGIC: &[u8; 4] = b"LBE1";
/// Header length: magic, key id, nonce (24 bytes).
pub const HEADER_LEN: usize = 4 + KEY_ID_LEN + NONCE_LEN;
/// Length of the GCM tag at the end (16 bytes).
pub const TAG_LEN: usize = 16;

/// Errors of opening an encrypted blob. Each names the blob; none contains key material.
#[derive(Debug, thiserror::Error)]
pub enum EnvelopeError {
    /// Shorter than a header and a tag, or not starting with `LBE1`.
    #[error("encrypted blob {hash} is truncated or not an LBE1 envelope ({len} bytes)")]
    Malformed {
        /// The blob's hash (its name in the store).
        hash: BlobHash,
        /// Its stored length.
        len: usize,
    },
    /// The authentication tag does not match: a header or body byte changed, or the file
    /// belongs to another blob.
    #[error("encrypted blob {hash} (key {key_id}) is corrupted: it failed authentication (tampered with, damaged or stored under the wrong name)")]
    Tampered {
        /// The blob's hash.
        hash: BlobHash,
        /// The key id its header names.
        key_id: KeyId,
    },
    /// The header names a data key the repository does not hold (or the master key cannot open).
    #[error("encrypted blob {hash} names data key {key_id}, which this repository does not hold")]
    UnknownKey {
        /// The blob's hash.
        hash: BlobHash,
        /// The key id its header names.
        key_id: KeyId,
    },
    /// The random generator failed while sealing.
    #[error(transparent)]
    Key(#[from] KeyError),
}

/// Whether `stored` is an encrypted envelope (starts with `LBE1`).
pub fn is_sealed(stored: &[u8]) -> bool {
    stored.len() >= 4 && &stored[..4] == MAGIC
}

/// The key id named by an envelope's header; `None` when `stored` is not an envelope.
pub fn key_id_of(stored: &[u8]) -> Option<KeyId> {
    (is_sealed(stored) && stored.len() >= 4 + KEY_ID_LEN).then(|| {
        let mut id = [0u8; KEY_ID_LEN];
        id.copy_from_slice(&stored[4..4 + KEY_ID_LEN]);
        KeyId(id)
    })
}

fn aad(header: &[u8], hash: &BlobHash) -> Vec<u8> {
    let mut a = Vec::with_capacity(HEADER_LEN + 32);
    a.extend_from_slice(header);
    a.extend_from_slice(&hash.0);
    a
}

/// Seals `plain` (the LBB1 bytes of blob `hash`) under data key `key` (id `key_id`) with a fresh
/// random nonce. Output: `HEADER_LEN + plain.len() + TAG_LEN` bytes.
///
/// Errors: [`EnvelopeError::Key`] when the random generator fails.
pub fn seal(
    key_id: KeyId,
    key: &SecretKey,
    hash: &BlobHash,
    plain: &[u8],
) -> Result<Vec<u8>, EnvelopeError> {
    let mut header = [0u8; HEADER_LEN];
    header[..4].copy_from_slice(MAGIC);
    header[4..4 + KEY_ID_LEN].copy_from_slice(&key_id.0);
    random_fill(&mut header[4 + KEY_ID_LEN..])?;
    let nonce = Nonce::from_slice(&header[4 + KEY_ID_LEN..]);
    let ct = key
        .cipher()
        .encrypt(
            nonce,
            Payload {
                msg: plain,
                aad: &aad(&header, hash),
            },
        )
        .map_err(|_| KeyError::Random("AES-GCM refused to encrypt".into()))?;
    let mut out = Vec::with_capacity(HEADER_LEN + ct.len());
    out.extend_from_slice(&header);
    out.extend_from_slice(&ct);
    Ok(out)
}

/// Opens the envelope `stored` of blob `hash`, finding its data key with `key_of`; returns the
/// LBB1 bytes (which the caller still decodes and hash-checks with [`crate::blob::decode`]).
///
/// Errors: [`EnvelopeError::Malformed`], [`EnvelopeError::UnknownKey`] (`key_of` gave `None`),
/// [`EnvelopeError::Tampered`] (tag mismatch).
pub fn open(
    hash: &BlobHash,
    stored: &[u8],
    key_of: impl FnOnce(&KeyId) -> Option<SecretKey>,
) -> Result<Vec<u8>, EnvelopeError> {
    let Some(key_id) = key_id_of(stored).filter(|_| stored.len() >= HEADER_LEN + TAG_LEN) else {
        return Err(EnvelopeError::Malformed {
            hash: *hash,
            len: stored.len(),
        });
    };
    let key = key_of(&key_id).ok_or(EnvelopeError::UnknownKey {
        hash: *hash,
        key_id,
    })?;
    let (header, body) = stored.split_at(HEADER_LEN);
    key.cipher()
        .decrypt(
            Nonce::from_slice(&header[4 + KEY_ID_LEN..]),
            Payload {
                msg: body,
                aad: &aad(header, hash),
            },
        )
        .map_err(|_| EnvelopeError::Tampered {
            hash: *hash,
            key_id,
        })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::blob;

    fn sample() -> (Vec<u8>, BlobHash, Vec<u8>) {
        let raw = b"a distinctive plaintext line\n".repeat(200);
        let h = BlobHash::of(&raw);
        (raw.clone(), h, blob::encode(&raw))
    }

    #[test]
    fn round_trip_and_v1_detected() {
        let (raw, h, lbb1) = sample();
        let (id, k) = (KeyId::generate().unwrap(), SecretKey::generate().unwrap());
        let sealed = seal(id, &k, &h, &lbb1).unwrap();
        assert_eq!(sealed.len(), HEADER_LEN + lbb1.len() + TAG_LEN);
        assert!(is_sealed(&sealed) && !is_sealed(&lbb1));
        assert_eq!(key_id_of(&sealed), Some(id));
        let opened = open(&h, &sealed, |i| (*i == id).then(|| k.clone())).unwrap();
        assert_eq!(blob::decode(&h, &opened, crate::PART_SIZE).unwrap(), raw);
        // Two seals of the same blob differ (random nonce).
        assert_ne!(seal(id, &k, &h, &lbb1).unwrap(), sealed);
    }

    /// Every byte of the header (magic excepted: it is no longer an envelope), a body byte and
    /// the tag: each change is refused with the typed error naming the blob and key id.
    #[test]
    fn tamper_of_every_part_detected() {
        let (_, h, lbb1) = sample();
        let (id, k) = (KeyId::generate().unwrap(), SecretKey::generate().unwrap());
        let sealed = seal(id, &k, &h, &lbb1).unwrap();
        let any_key = |_: &KeyId| Some(k.clone());
        for at in (4..HEADER_LEN).chain([HEADER_LEN, sealed.len() / 2, sealed.len() - 1]) {
            let mut bad = sealed.clone();
            bad[at] ^= 0x01;
            match open(&h, &bad, any_key) {
                Err(EnvelopeError::Tampered { hash, key_id }) => {
                    assert_eq!(hash, h);
                    assert_eq!(key_id, key_id_of(&bad).unwrap());
                    let msg = EnvelopeError::Tampered { hash, key_id }.to_string();
                    assert!(msg.contains(&h.to_hex()) && msg.contains(&key_id.to_string()));
                }
                other => panic!("byte {at}: {other:?}"),
            }
        }
        // Magic changed: not an envelope at all.
        let mut bad = sealed.clone();
        bad[0] ^= 1;
        assert!(matches!(
            open(&h, &bad, any_key),
            Err(EnvelopeError::Malformed { .. })
        ));
        // Truncated.
        assert!(matches!(
            open(&h, &sealed[..HEADER_LEN + 3], any_key),
            Err(EnvelopeError::Malformed { .. })
        ));
        // Stored under another blob's name.
        let other = BlobHash::of(b"other");
        assert!(matches!(
            open(&other, &sealed, any_key),
            Err(EnvelopeError::Tampered { hash, .. }) if hash == other
        ));
    }

    #[test]
    fn wrong_or_unknown_key_refused() {
        let (_, h, lbb1) = sample();
        let (id, k) = (KeyId::generate().unwrap(), SecretKey::generate().unwrap());
        let sealed = seal(id, &k, &h, &lbb1).unwrap();
        let wrong = SecretKey::generate().unwrap();
        assert!(matches!(
            open(&h, &sealed, |_| Some(wrong.clone())),
            Err(EnvelopeError::Tampered { .. })
        ));
        let e = open(&h, &sealed, |_| None).unwrap_err();
        assert!(matches!(e, EnvelopeError::UnknownKey { key_id, .. } if key_id == id));
    }

    /// Encrypt + decrypt throughput of 4 MiB parts, printed (release: `cargo test --release
    /// -p lifeboat-common envelope_throughput -- --nocapture`).
    #[test]
    fn envelope_throughput() {
        let part: Vec<u8> = (0..4 << 20)
            .map(|i: u32| (i.wrapping_mul(2654435761) >> 13) as u8)
            .collect();
        let h = BlobHash::of(&part);
        let (id, k) = (KeyId::generate().unwrap(), SecretKey::generate().unwrap());
        let rounds = 16;
        let t = std::time::Instant::now();
        for _ in 0..rounds {
            let s = seal(id, &k, &h, &part).unwrap();
            let o = open(&h, &s, |_| Some(k.clone())).unwrap();
            assert_eq!(o.len(), part.len());
        }
        let mb = (rounds * part.len()) as f64 / 1e6;
        println!(
            "envelope: seal+open of {rounds} x 4 MiB: {:.0} MB/s",
            mb / t.elapsed().as_secs_f64()
        );
    }
}
