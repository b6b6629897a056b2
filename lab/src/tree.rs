//! Demo trees: generation of a realistic directory (text, binary, nested dirs, a symlink, varied
//! modes, one large file), mutations while replicating (create, edit, rename, delete, chmod), and a
//! byte-for-byte comparison of two trees (content by blake3, mode, symlink target).

use std::collections::BTreeMap;
use std::io::Write;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use anyhow::Context;
use rand::rngs::StdRng;
use rand::{Rng, RngCore, SeedableRng};

/// What [`generate`] made.
#[derive(Debug, Default, Clone, serde::Serialize)]
pub struct TreeStats {
    /// Regular files.
    pub files: u64,
    /// Bytes of regular files.
    pub bytes: u64,
}

const WORDS: &[&str] = &[
    "lifeboat", "region", "epoch", "lease", "witness", "quorum", "replica", "snapshot", "restore",
    "failover", "delta", "blob", "catalog", "fsync", "raft",
];

fn text(rng: &mut StdRng, size: usize) -> Vec<u8> {
    let mut out = Vec::with_capacity(size + 16);
    while out.len() < size {
        let w = WORDS[rng.random_range(0..WORDS.len())];
        out.extend_from_slice(w.as_bytes());
        out.push(if rng.random_range(0..12) == 0 {
            b'\n'
        } else {
            b' '
        });
    }
    out.truncate(size);
    out
}

fn binary(rng: &mut StdRng, size: usize) -> Vec<u8> {
    let mut v = vec![0u8; size];
    rng.fill_bytes(&mut v);
    v
}

/// Writes a large file of `size` bytes (half random, half text-like so it compresses partly)
/// in 1 MiB pieces, never whole in memory.
///
/// Errors: I/O.
pub fn write_large(path: &Path, size: u64, seed: u64) -> anyhow::Result<()> {
    let mut rng = StdRng::seed_from_u64(seed);
    let mut f = std::io::BufWriter::new(std::fs::File::create(path)?);
    let mut left = size;
    let mut i = 0u64;
    while left > 0 {
        let n = left.min(1 << 20) as usize;
        let chunk = if i.is_multiple_of(2) {
            binary(&mut rng, n)
        } else {
            text(&mut rng, n)
        };
        f.write_all(&chunk)?;
        left -= n as u64;
        i += 1;
    }
    f.into_inner()?.sync_all()?;
    Ok(())
}

/// Generates about `files` files under `root` (nested 3 levels), plus one file of `large_bytes`
/// (skipped when 0), a symlink, an empty directory and a few non-default modes. Deterministic
/// for a `seed`.
///
/// Errors: I/O.
pub fn generate(
    root: &Path,
    files: usize,
    large_bytes: u64,
    seed: u64,
) -> anyhow::Result<TreeStats> {
    let mut rng = StdRng::seed_from_u64(seed);
    let mut st = TreeStats::default();
    std::fs::create_dir_all(root)?;
    for i in 0..files {
        let dir = root.join(format!("d{:02}/s{:02}", i % 20, (i / 20) % 10));
        std::fs::create_dir_all(&dir)?;
        let (name, data) = match rng.random_range(0..10) {
            0 => (format!("blob{i}.bin"), {
                let n = rng.random_range(64 * 1024..1024 * 1024);
                binary(&mut rng, n)
            }),
            1..=2 => (format!("log{i}.log"), {
                let n = rng.random_range(16 * 1024..256 * 1024);
                text(&mut rng, n)
            }),
            _ => (format!("f{i}.txt"), {
                let n = rng.random_range(0..24 * 1024);
                text(&mut rng, n)
            }),
        };
        let p = dir.join(name);
        std::fs::write(&p, &data)?;
        if i % 97 == 0 {
            std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o600))?;
        } else if i % 89 == 0 {
            std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o755))?;
        }
        st.files += 1;
        st.bytes += data.len() as u64;
    }
    if large_bytes > 0 {
        std::fs::create_dir_all(root.join("big"))?;
        write_large(&root.join("big/large.bin"), large_bytes, seed ^ 0x5eed)?;
        st.files += 1;
        st.bytes += large_bytes;
    }
    std::fs::create_dir_all(root.join("empty-dir"))?;
    let _ = std::os::unix::fs::symlink("d00/s00", root.join("link-to-d00"));
    let _ = std::os::unix::fs::symlink("/etc/hostname", root.join("absolute-link"));
    Ok(st)
}

fn list_files(root: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let mut stack = vec![root.to_path_buf()];
    while let Some(d) = stack.pop() {
        let Ok(rd) = std::fs::read_dir(&d) else {
            continue;
        };
        for e in rd.flatten() {
            let Ok(ft) = e.file_type() else { continue };
            if ft.is_dir() {
                stack.push(e.path());
            } else if ft.is_file() {
                out.push(e.path());
            }
        }
    }
    out.sort();
    out
}

/// Counts of what [`mutate`] did.
#[derive(Debug, Default, Clone, serde::Serialize)]
pub struct Mutations {
    /// Files created.
    pub created: u64,
    /// Files edited (append or in-place overwrite).
    pub edited: u64,
    /// Files renamed.
    pub renamed: u64,
    /// Files deleted.
    pub deleted: u64,
    /// Mode changes.
    pub chmods: u64,
}

/// Applies `n` random mutations under `root` (never touching files larger than 8 MiB except by
/// an in-place edit of 1 MiB, so the large file gets a delta).
///
/// Errors: I/O.
pub fn mutate(root: &Path, n: usize, seed: u64) -> anyhow::Result<Mutations> {
    let mut rng = StdRng::seed_from_u64(seed);
    let mut m = Mutations::default();
    let mut files = list_files(root);
    for k in 0..n {
        if files.is_empty() {
            break;
        }
        let idx = rng.random_range(0..files.len());
        let p = files[idx].clone();
        let big = std::fs::metadata(&p)
            .map(|m| m.len() > 8 << 20)
            .unwrap_or(false);
        match rng.random_range(0..10) {
            0..=2 => {
                let dir = root.join(format!("new/n{:02}", k % 7));
                std::fs::create_dir_all(&dir)?;
                let np = dir.join(format!("created-{seed}-{k}.txt"));
                std::fs::write(&np, {
                    let n = rng.random_range(0..64 * 1024);
                    text(&mut rng, n)
                })?;
                files.push(np);
                m.created += 1;
            }
            3..=5 => {
                use std::io::{Seek, SeekFrom};
                let mut f = std::fs::OpenOptions::new()
                    .write(true)
                    .open(&p)
                    .with_context(|| format!("edit {}", p.display()))?;
                let len = f.metadata()?.len();
                if big || rng.random_bool(0.5) {
                    let at = if len > 0 { rng.random_range(0..len) } else { 0 };
                    f.seek(SeekFrom::Start(at))?;
                    let n = if big {
                        1 << 20
                    } else {
                        rng.random_range(1..4096)
                    };
                    f.write_all(&binary(&mut rng, n))?;
                } else {
                    f.seek(SeekFrom::End(0))?;
                    f.write_all(&{
                        let n = rng.random_range(1..8192);
                        text(&mut rng, n)
                    })?;
                }
                m.edited += 1;
            }
            6 if !big => {
                let np = p.with_file_name(format!(
                    "renamed-{seed}-{k}-{}",
                    p.file_name().unwrap().to_string_lossy()
                ));
                std::fs::rename(&p, &np)?;
                files[idx] = np;
                m.renamed += 1;
            }
            7 if !big => {
                std::fs::remove_file(&p)?;
                files.swap_remove(idx);
                m.deleted += 1;
            }
            _ => {
                let mode = if rng.random_bool(0.5) { 0o640 } else { 0o700 };
                std::fs::set_permissions(&p, std::fs::Permissions::from_mode(mode))?;
                m.chmods += 1;
            }
        }
    }
    Ok(m)
}

#[derive(Debug, PartialEq, Eq)]
enum Node {
    File { hash: [u8; 32], mode: u32 },
    Dir { mode: u32 },
    Link(PathBuf),
}

fn hash_file(p: &Path) -> anyhow::Result<[u8; 32]> {
    let mut h = blake3::Hasher::new();
    h.update_reader(std::fs::File::open(p)?)?;
    Ok(*h.finalize().as_bytes())
}

fn snapshot(root: &Path) -> anyhow::Result<BTreeMap<String, Node>> {
    let mut out = BTreeMap::new();
    let mut stack = vec![root.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).with_context(|| format!("read {}", d.display()))? {
            let e = e?;
            let p = e.path();
            let rel = p.strip_prefix(root)?.to_string_lossy().to_string();
            let md = std::fs::symlink_metadata(&p)?;
            let mode = md.permissions().mode() & 0o7777;
            if md.file_type().is_symlink() {
                out.insert(rel, Node::Link(std::fs::read_link(&p)?));
            } else if md.is_dir() {
                out.insert(rel, Node::Dir { mode });
                stack.push(p);
            } else if md.is_file() {
                out.insert(
                    rel,
                    Node::File {
                        hash: hash_file(&p)?,
                        mode,
                    },
                );
            }
        }
    }
    Ok(out)
}

/// Result of comparing two trees.
#[derive(Debug, Default, Clone, serde::Serialize)]
pub struct Comparison {
    /// Regular files compared.
    pub files: u64,
    /// Paths that differ, with the reason (at most 20 listed).
    pub differences: Vec<String>,
    /// Total number of differing paths.
    pub different: u64,
}

impl Comparison {
    /// True when the trees are equal.
    pub fn equal(&self) -> bool {
        self.different == 0
    }
}

/// Compares `a` and `b`: same paths, same kinds, same content (blake3), same modes, same symlink
/// targets.
///
/// Errors: I/O while walking.
pub fn compare(a: &Path, b: &Path) -> anyhow::Result<Comparison> {
    let sa = snapshot(a)?;
    let sb = snapshot(b)?;
    let mut c = Comparison::default();
    let note = |c: &mut Comparison, s: String| {
        c.different += 1;
        if c.differences.len() < 20 {
            c.differences.push(s);
        }
    };
    for (k, va) in &sa {
        if matches!(va, Node::File { .. }) {
            c.files += 1;
        }
        match sb.get(k) {
            None => note(&mut c, format!("{k}: missing in {}", b.display())),
            Some(vb) if vb != va => note(&mut c, format!("{k}: differs ({va:?} vs {vb:?})")),
            _ => {}
        }
    }
    for k in sb.keys() {
        if !sa.contains_key(k) {
            note(&mut c, format!("{k}: only in {}", b.display()));
        }
    }
    Ok(c)
}
