//! Keys of encryption at rest: the operator's **master key** (32 bytes from a file, an
//! environment variable or a command) and the repository's **data keys** (random 256-bit AES
//! keys, one per repository and rotation, stored in the repository wrapped by the master key).
//!
//! The scheme follows restic's key files (`keys/<id>` JSON objects next to the data, each
//! holding the repository key encrypted under a key the operator holds; see restic's
//! `doc/design.rst`, "Keys, Encryption and MAC"), with two differences: the wrapping key is the
//! master key itself (no password KDF: it is already 256 random bits), and the cipher is
//! AES-256-GCM with the key file's version and id as associated data.
//!
//! A data key file (`keys/<16 hex>`) is JSON:
//!
//! ```text
//! {"version":1,"id":"<16 hex>","created_ms":<i64>,"host":"<who created it>",
//!  "algorithm":"aes-256-gcm","nonce":"<24 hex>","data":"<96 hex: 32-byte key + 16-byte tag>"}
//! ```
//!
//! The AAD of `data` is `b"lifeboat-data-key-v1"` followed by the 8 bytes of the id, so a key
//! file renamed to another id does not open. Key material never appears in `Debug`, `Display`
//! or errors: [`SecretKey`] prints `[redacted]` and is zeroized on drop.

use std::fmt;
use std::path::{Path, PathBuf};

use aes_gcm::aead::{Aead, KeyInit, Payload};
use aes_gcm::{Aes256Gcm, Nonce};
use rand::TryRngCore;
use zeroize::Zeroizing;

/// Length of every key (master and data): 32 bytes, AES-256.
pub const KEY_LEN: usize = 32;
/// Length of an AES-GCM nonce: 12 bytes (96 bits).
pub const NONCE_LEN: usize = 12;
/// Length of a [`KeyId`]: 8 bytes.
pub const KEY_ID_LEN: usize = 8;
/// Folder of the data key files in a repository (`keys/<16 hex>`).
pub const KEYS_DIR: &str = "keys";
/// Domain separator, the start of the AAD of a wrapped data key.
const WRAP_AAD: &[u8] = b"lifeboat-data-key-v1";

/// Errors of key handling. None of them contains key material.
#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    /// The master key could not be read from its configured source.
    #[error("master key from {source_name}: {reason}")]
    MasterKey {
        /// Where it was read from (`file PATH`, `env VAR`, `command NAME`), never the key.
        source_name: String,
        /// What was wrong.
        reason: String,
    },
    /// The master key does not open a data key of the repository (GCM tag mismatch).
    #[error("master key does not open data key {key_id} in {store}: wrong key?")]
    WrongMasterKey {
        /// The data key's id.
        key_id: KeyId,
        /// The repository (blob store description).
        store: String,
    },
    /// A data key file is not in the expected format.
    #[error("data key file {name} in {store} is malformed: {reason}")]
    BadKeyFile {
        /// Its name (`keys/<id>`).
        name: String,
        /// The repository.
        store: String,
        /// What was wrong.
        reason: String,
    },
    /// The operating system's random generator failed.
    #[error("random generator failed: {0}")]
    Random(String),
}

/// A 256-bit secret key (master or data key). `Debug` prints `[redacted]`; the bytes are
/// zeroized when dropped.
#[derive(Clone)]
pub struct SecretKey(Zeroizing<[u8; KEY_LEN]>);

impl SecretKey {
    /// Wraps 32 key bytes.
    pub fn from_bytes(b: [u8; KEY_LEN]) -> Self {
        SecretKey(Zeroizing::new(b))
    }
    /// A fresh key from the operating system's random generator (`OsRng`).
    ///
    /// Errors: [`KeyError::Random`].
    pub fn generate() -> Result<Self, KeyError> {
        let mut k = Zeroizing::new([0u8; KEY_LEN]);
        random_fill(&mut k[..])?;
        Ok(SecretKey(k))
    }
    /// Parses a key file's or variable's text: 64 hex characters (surrounding whitespace
    /// ignored) or exactly 32 raw bytes.
    ///
    /// Errors: a message (without the key) when it is neither.
    pub fn parse(text: &[u8]) -> Result<Self, String> {
        let trimmed = trim_ascii(text);
        let mut out = Zeroizing::new([0u8; KEY_LEN]);
        if trimmed.len() == 2 * KEY_LEN && hex::decode_to_slice(trimmed, &mut out[..]).is_ok() {
            return Ok(SecretKey(out));
        }
        if text.len() == KEY_LEN {
            out.copy_from_slice(text);
            return Ok(SecretKey(out));
        }
        Err(format!(
            "expected 64 hex characters or 32 raw bytes, got {} bytes",
            text.len()
        ))
    }
    /// The key bytes (for the cipher only).
    pub fn bytes(&self) -> &[u8; KEY_LEN] {
        &self.0
    }
    /// The AES-256-GCM cipher of this key.
    pub fn cipher(&self) -> Aes256Gcm {
        Aes256Gcm::new_from_slice(&self.0[..]).expect("32-byte key")
    }
}

impl fmt::Debug for SecretKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("SecretKey([redacted])")
    }
}

fn trim_ascii(b: &[u8]) -> &[u8] {
    let start = b
        .iter()
        .position(|c| !c.is_ascii_whitespace())
        .unwrap_or(b.len());
    let end = b
        .iter()
        .rposition(|c| !c.is_ascii_whitespace())
        .map_or(start, |e| e + 1);
    &b[start..end]
}

/// Fills `buf` from the operating system's random generator.
///
/// Errors: [`KeyError::Random`].
pub fn random_fill(buf: &mut [u8]) -> Result<(), KeyError> {
    rand::rngs::OsRng
        .try_fill_bytes(buf)
        .map_err(|e| KeyError::Random(e.to_string()))
}

/// Identifier of a data key: 8 random bytes, shown as 16 lowercase hex characters. Every
/// encrypted blob names the key it was sealed with.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct KeyId(pub [u8; KEY_ID_LEN]);

impl KeyId {
    /// A fresh random id.
    ///
    /// Errors: [`KeyError::Random`].
    pub fn generate() -> Result<Self, KeyError> {
        let mut b = [0u8; KEY_ID_LEN];
        random_fill(&mut b)?;
        Ok(KeyId(b))
    }
    /// Parses 16 hex characters; `None` otherwise.
    pub fn from_hex(s: &str) -> Option<Self> {
        let mut b = [0u8; KEY_ID_LEN];
        (s.len() == 2 * KEY_ID_LEN)
            .then(|| hex::decode_to_slice(s, &mut b).ok())
            .flatten()
            .map(|_| KeyId(b))
    }
    /// Name of its key file in a repository: `keys/<16 hex>`.
    pub fn file_name(&self) -> String {
        format!("{KEYS_DIR}/{self}")
    }
}

impl fmt::Display for KeyId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&hex::encode(self.0))
    }
}
impl fmt::Debug for KeyId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "KeyId({self})")
    }
}

/// Where the master key comes from (`[encryption]` in the coordinator's config: exactly one).
#[derive(Clone, PartialEq, Eq)]
pub enum MasterKeySource {
    /// A file of 64 hex characters or 32 raw bytes (`lifeboat keys init --out PATH`).
    File(PathBuf),
    /// An environment variable holding 64 hex characters.
    Env(String),
    /// A command (program and arguments, no shell) whose standard output is the key, KMS-style.
    Command(Vec<String>),
}

impl fmt::Debug for MasterKeySource {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.describe())
    }
}

impl MasterKeySource {
    /// Where the key comes from, for messages (`file PATH`, `env VAR`, `command PROGRAM`).
    pub fn describe(&self) -> String {
        match self {
            MasterKeySource::File(p) => format!("file {}", p.display()),
            MasterKeySource::Env(v) => format!("env {v}"),
            MasterKeySource::Command(c) => {
                format!("command {}", c.first().map(String::as_str).unwrap_or(""))
            }
        }
    }

    /// Reads the key. A command runs with no standard input; it must exit 0 within 30 s.
    ///
    /// Errors: [`KeyError::MasterKey`] naming the source (never the key) when it cannot be
    /// read or does not hold a 256-bit key.
    pub fn load(&self) -> Result<SecretKey, KeyError> {
        let err = |reason: String| KeyError::MasterKey {
            source_name: self.describe(),
            reason,
        };
        let text: Zeroizing<Vec<u8>> = match self {
            MasterKeySource::File(p) => {
                Zeroizing::new(std::fs::read(p).map_err(|e| err(e.to_string()))?)
            }
            MasterKeySource::Env(v) => Zeroizing::new(
                std::env::var(v)
                    .map_err(|e| err(format!("{e}")))?
                    .into_bytes(),
            ),
            MasterKeySource::Command(c) => {
                let (prog, args) = c.split_first().ok_or_else(|| err("empty command".into()))?;
                let out = std::process::Command::new(prog)
                    .args(args)
                    .stdin(std::process::Stdio::null())
                    .stderr(std::process::Stdio::inherit())
                    .output()
                    .map_err(|e| err(format!("cannot run: {e}")))?;
                if !out.status.success() {
                    return Err(err(format!("exited with {}", out.status)));
                }
                Zeroizing::new(out.stdout)
            }
        };
        SecretKey::parse(&text).map_err(err)
    }
}

/// Writes a new random master key to `path` as 64 hex characters and a newline, created with
/// mode 0600 and never over an existing file.
///
/// Errors: the I/O error (`AlreadyExists` when `path` exists), or a random generator failure
/// as `Other`.
pub fn write_new_master_key(path: &Path) -> std::io::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let key = SecretKey::generate().map_err(std::io::Error::other)?;
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)?;
    let mut text = Zeroizing::new(hex::encode(key.bytes()).into_bytes());
    text.push(b'\n');
    f.write_all(&text)?;
    f.sync_all()
}

/// A data key file as stored in the repository (see the module docs for the format).
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KeyFile {
    /// Format version: 1.
    pub version: u32,
    /// The data key's id (16 hex).
    pub id: String,
    /// Creation time, ms since the Unix epoch: the newest key is the current one.
    pub created_ms: i64,
    /// Who created it (coordinator description), informative.
    pub host: String,
    /// `aes-256-gcm`.
    pub algorithm: String,
    /// Wrapping nonce (24 hex).
    pub nonce: String,
    /// Wrapped key: ciphertext and tag (96 hex).
    pub data: String,
}

fn wrap_aad(id: &KeyId) -> Vec<u8> {
    let mut aad = WRAP_AAD.to_vec();
    aad.extend_from_slice(&id.0);
    aad
}

impl KeyFile {
    /// Wraps `key` (id `id`) under `master`, with a fresh random nonce.
    ///
    /// Errors: [`KeyError::Random`].
    pub fn wrap(
        master: &SecretKey,
        id: KeyId,
        key: &SecretKey,
        host: &str,
    ) -> Result<Self, KeyError> {
        let mut nonce = [0u8; NONCE_LEN];
        random_fill(&mut nonce)?;
        let data = master
            .cipher()
            .encrypt(
                Nonce::from_slice(&nonce),
                Payload {
                    msg: key.bytes(),
                    aad: &wrap_aad(&id),
                },
            )
            .map_err(|_| KeyError::Random("AES-GCM refused to encrypt".into()))?;
        Ok(KeyFile {
            version: 1,
            id: id.to_string(),
            created_ms: crate::now_ms(),
            host: host.to_string(),
            algorithm: "aes-256-gcm".into(),
            nonce: hex::encode(nonce),
            data: hex::encode(data),
        })
    }

    /// The same data key (same id and creation time) wrapped under `new` instead of `old`, with a
    /// fresh nonce: how a master key is replaced (`lifeboat keys rewrap`); blobs are untouched.
    ///
    /// Errors: as [`KeyFile::unwrap_key`] with `old` ([`KeyError::WrongMasterKey`] when `old`
    /// does not open it), or [`KeyError::Random`].
    pub fn rewrap(&self, old: &SecretKey, new: &SecretKey, store: &str) -> Result<Self, KeyError> {
        let (id, key) = self.unwrap_key(old, store)?;
        let mut kf = KeyFile::wrap(new, id, &key, &self.host)?;
        kf.created_ms = self.created_ms;
        Ok(kf)
    }

    /// Parses the JSON of the key file stored as `name` in `store`.
    ///
    /// Errors: [`KeyError::BadKeyFile`].
    pub fn parse(bytes: &[u8], name: &str, store: &str) -> Result<Self, KeyError> {
        serde_json::from_slice(bytes).map_err(|e| KeyError::BadKeyFile {
            name: name.into(),
            store: store.into(),
            reason: e.to_string(),
        })
    }

    /// The serialized form (JSON).
    pub fn to_json(&self) -> Vec<u8> {
        serde_json::to_vec_pretty(self).expect("key file serializes")
    }

    /// Unwraps the data key with `master`; `store` names the repository in errors.
    ///
    /// Errors: [`KeyError::BadKeyFile`] for a malformed file, [`KeyError::WrongMasterKey`] when
    /// `master` does not open it (or the file was altered or renamed).
    pub fn unwrap_key(
        &self,
        master: &SecretKey,
        store: &str,
    ) -> Result<(KeyId, SecretKey), KeyError> {
        let bad = |reason: &str| KeyError::BadKeyFile {
            name: format!("{KEYS_DIR}/{}", self.id),
            store: store.into(),
            reason: reason.into(),
        };
        if self.version != 1 || self.algorithm != "aes-256-gcm" {
            return Err(bad("unknown version or algorithm"));
        }
        let id = KeyId::from_hex(&self.id).ok_or_else(|| bad("id is not 16 hex characters"))?;
        let mut nonce = [0u8; NONCE_LEN];
        hex::decode_to_slice(&self.nonce, &mut nonce).map_err(|_| bad("bad nonce"))?;
        let data = hex::decode(&self.data).map_err(|_| bad("bad data"))?;
        let plain = Zeroizing::new(
            master
                .cipher()
                .decrypt(
                    Nonce::from_slice(&nonce),
                    Payload {
                        msg: &data,
                        aad: &wrap_aad(&id),
                    },
                )
                .map_err(|_| KeyError::WrongMasterKey {
                    key_id: id,
                    store: store.into(),
                })?,
        );
        let bytes: [u8; KEY_LEN] = plain[..]
            .try_into()
            .map_err(|_| bad("wrapped key is not 32 bytes"))?;
        Ok((id, SecretKey::from_bytes(bytes)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn secret_key_parse_and_redacted_debug() {
        let k = SecretKey::generate().unwrap();
        let hex_text = format!("  {}\n", hex::encode(k.bytes()));
        assert_eq!(
            SecretKey::parse(hex_text.as_bytes()).unwrap().bytes(),
            k.bytes()
        );
        assert_eq!(SecretKey::parse(k.bytes()).unwrap().bytes(), k.bytes());
        assert!(SecretKey::parse(b"short").is_err());
        let dbg = format!("{k:?}");
        assert_eq!(dbg, "SecretKey([redacted])");
        assert!(!dbg.contains(&hex::encode(k.bytes())[..8]));
    }

    #[test]
    fn key_file_wraps_and_refuses_wrong_master_or_rename() {
        let master = SecretKey::generate().unwrap();
        let dk = SecretKey::generate().unwrap();
        let id = KeyId::generate().unwrap();
        let kf = KeyFile::wrap(&master, id, &dk, "test").unwrap();
        let back = KeyFile::parse(&kf.to_json(), "keys/x", "store").unwrap();
        let (id2, dk2) = back.unwrap_key(&master, "store").unwrap();
        assert_eq!((id2, dk2.bytes()), (id, dk.bytes()));
        let wrong = SecretKey::generate().unwrap();
        let e = back.unwrap_key(&wrong, "local directory /x").unwrap_err();
        assert_eq!(
            e.to_string(),
            format!("master key does not open data key {id} in local directory /x: wrong key?")
        );
        let mut renamed = back.clone();
        renamed.id = KeyId::generate().unwrap().to_string();
        assert!(matches!(
            renamed.unwrap_key(&master, "s"),
            Err(KeyError::WrongMasterKey { .. })
        ));
        assert!(!kf.data.contains(&hex::encode(dk.bytes())));
        let new_master = SecretKey::generate().unwrap();
        let re = kf.rewrap(&master, &new_master, "s").unwrap();
        assert_eq!(
            (re.id.as_str(), re.created_ms),
            (kf.id.as_str(), kf.created_ms)
        );
        assert_eq!(
            re.unwrap_key(&new_master, "s").unwrap().1.bytes(),
            dk.bytes()
        );
        assert!(re.unwrap_key(&master, "s").is_err());
        assert!(kf.rewrap(&wrong, &new_master, "s").is_err());
    }

    #[test]
    fn master_key_sources() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("master.key");
        write_new_master_key(&p).unwrap();
        use std::os::unix::fs::PermissionsExt;
        assert_eq!(
            std::fs::metadata(&p).unwrap().permissions().mode() & 0o777,
            0o600
        );
        assert!(write_new_master_key(&p).is_err(), "never overwrites");
        let k = MasterKeySource::File(p.clone()).load().unwrap();
        let cmd = MasterKeySource::Command(vec!["cat".into(), p.display().to_string()]);
        assert_eq!(cmd.load().unwrap().bytes(), k.bytes());
        let e = MasterKeySource::Env("LIFEBOAT_TEST_NO_SUCH_VAR".into())
            .load()
            .unwrap_err();
        assert!(e
            .to_string()
            .starts_with("master key from env LIFEBOAT_TEST_NO_SUCH_VAR"));
        let e = MasterKeySource::Command(vec!["false".into()])
            .load()
            .unwrap_err();
        assert!(e.to_string().contains("command false"), "{e}");
    }
}
