//! Protected roots, include/exclude filters, and what one filesystem entry looks like (`lstat`,
//! never following symlinks). Walking itself is done lazily by the batch planner
//! ([`crate::files::batch`]), one directory listing at a time.

use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use globset::{GlobBuilder, GlobSet, GlobSetBuilder};
use lifeboat_common::catalog::EntryKind;

use crate::config::{ConfigError, PathConfig};
use crate::files::state::EntryState;

/// Include/exclude globs of one root, matched against `/`-separated paths relative to the root.
#[derive(Debug, Clone)]
pub struct Filter {
    include: GlobSet,
    exclude: GlobSet,
}

impl Filter {
    /// Compiles the globs of a root.
    ///
    /// Errors: [`ConfigError::BadGlob`].
    pub fn new(p: &PathConfig) -> Result<Filter, ConfigError> {
        Ok(Filter {
            include: crate::config::glob_set(&p.name, &p.include)?,
            exclude: crate::config::glob_set(&p.name, &p.exclude)?,
        })
    }

    /// A filter including everything and excluding nothing.
    pub fn default_all() -> Filter {
        let mut inc = GlobSetBuilder::new();
        if let Ok(g) = GlobBuilder::new("**").literal_separator(true).build() {
            inc.add(g);
        }
        Filter {
            include: inc.build().unwrap_or_else(|_| GlobSet::empty()),
            exclude: GlobSet::empty(),
        }
    }

    /// Whether `rel` or one of its ancestor directories matches an exclude glob. The root (`""`)
    /// is never excluded.
    pub fn is_excluded(&self, rel: &str) -> bool {
        if rel.is_empty() || self.exclude.is_empty() {
            return false;
        }
        let ancestor_excluded = rel
            .char_indices()
            .any(|(i, c)| c == '/' && self.exclude.is_match(&rel[..i]));
        ancestor_excluded || self.exclude.is_match(rel)
    }

    /// Whether the entry at `rel` is replicated: the root always; otherwise not excluded (itself or
    /// an ancestor) and matched by an include glob. Directories that are not included are still
    /// descended into unless excluded.
    pub fn includes(&self, rel: &str) -> bool {
        rel.is_empty() || (!self.is_excluded(rel) && self.include.is_match(rel))
    }
}

/// One protected directory with its compiled filter.
#[derive(Debug, Clone)]
pub struct Root {
    /// Root name (first component of every wire path of this root).
    pub name: String,
    /// The directory (canonicalized when it existed at start).
    pub path: PathBuf,
    /// Include/exclude globs.
    pub filter: Filter,
}

/// All protected roots plus the agent's own data directory, which is never replicated.
#[derive(Debug, Clone)]
pub struct Roots {
    /// The roots, in config order.
    pub roots: Vec<Root>,
    /// The agent's `data_dir` (canonicalized), ignored wherever it appears.
    pub data_dir: PathBuf,
}

/// Why a filesystem path has no wire path.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Unmapped {
    /// Not under any root (or inside the agent's data dir).
    Outside,
    /// Under a root, but the name is not valid UTF-8 or not a valid relative path.
    BadName(String),
}

impl Roots {
    /// Builds the roots of a validated config, canonicalizing existing root paths.
    ///
    /// Errors: [`ConfigError::BadGlob`].
    pub fn new(paths: &[PathConfig], data_dir: &Path) -> Result<Roots, ConfigError> {
        let mut roots = Vec::new();
        for p in paths {
            roots.push(Root {
                name: p.name.clone(),
                path: std::fs::canonicalize(&p.path).unwrap_or_else(|_| p.path.clone()),
                filter: Filter::new(p)?,
            });
        }
        Ok(Roots {
            roots,
            data_dir: std::fs::canonicalize(data_dir).unwrap_or_else(|_| data_dir.to_path_buf()),
        })
    }

    /// Wire path of `rel` in root `idx`: `"<name>"` for the root, else `"<name>/<rel>"`.
    pub fn wire_path(&self, idx: usize, rel: &str) -> String {
        let name = &self.roots[idx].name;
        if rel.is_empty() {
            name.clone()
        } else {
            format!("{name}/{rel}")
        }
    }

    /// Filesystem path of `rel` in root `idx`.
    pub fn fs_path(&self, idx: usize, rel: &str) -> PathBuf {
        if rel.is_empty() {
            self.roots[idx].path.clone()
        } else {
            self.roots[idx].path.join(rel)
        }
    }

    /// Splits a wire path into (root index, relative path).
    pub fn from_wire(&self, wire: &str) -> Option<(usize, String)> {
        let (name, rel) = match wire.split_once('/') {
            Some((n, r)) => (n, r),
            None => (wire, ""),
        };
        let idx = self.roots.iter().position(|r| r.name == name)?;
        Some((idx, rel.to_string()))
    }

    /// Whether `p` is the agent's data dir or inside it.
    pub fn is_own(&self, p: &Path) -> bool {
        p.starts_with(&self.data_dir)
    }

    /// Maps a filesystem path to (root index, relative path). The relative path is checked with
    /// [`lifeboat_common::path::validate_rel_path`].
    pub fn locate(&self, p: &Path) -> Result<(usize, String), Unmapped> {
        if self.is_own(p) {
            return Err(Unmapped::Outside);
        }
        for (i, r) in self.roots.iter().enumerate() {
            if let Ok(rest) = p.strip_prefix(&r.path) {
                let Some(rel) = rest.to_str() else {
                    return Err(Unmapped::BadName(p.to_string_lossy().into_owned()));
                };
                if rel.is_empty() {
                    return Ok((i, String::new()));
                }
                if lifeboat_common::path::validate_rel_path(rel).is_err() {
                    return Err(Unmapped::BadName(p.to_string_lossy().into_owned()));
                }
                return Ok((i, rel.to_string()));
            }
        }
        Err(Unmapped::Outside)
    }
}

/// Metadata of one entry as replicated (from `lstat`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EntryMeta {
    /// File, directory or symlink.
    pub kind: EntryKind,
    /// Content bytes for files; 0 for directories and symlinks.
    pub size: u64,
    /// `st_mode & 0o7777`.
    pub mode: u32,
    /// Modification time, ns since the Unix epoch.
    pub mtime_ns: i64,
    /// Link text for symlinks (never followed).
    pub symlink_target: Option<String>,
}

/// What `lstat` found at a path.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Found {
    /// Nothing there.
    Missing,
    /// Something that is not replicated (fifo, socket, device, non-UTF-8 link target).
    Unsupported(&'static str),
    /// A replicated entry.
    Entry(EntryMeta),
}

/// Modification time of `md`, ns since the Unix epoch.
pub fn mtime_ns(md: &std::fs::Metadata) -> i64 {
    md.mtime()
        .saturating_mul(1_000_000_000)
        .saturating_add(md.mtime_nsec())
}

/// `lstat`s `path` (never following a symlink) and reads the link text of symlinks.
///
/// Errors: I/O errors other than "not found" (a vanished path is [`Found::Missing`]).
pub fn lstat(path: &Path) -> std::io::Result<Found> {
    let md = match std::fs::symlink_metadata(path) {
        Ok(m) => m,
        Err(e) if is_gone(&e) => return Ok(Found::Missing),
        Err(e) => return Err(e),
    };
    let ft = md.file_type();
    let (kind, size, target) = if ft.is_dir() {
        (EntryKind::Dir, 0, None)
    } else if ft.is_file() {
        (EntryKind::File, md.len(), None)
    } else if ft.is_symlink() {
        let t = match std::fs::read_link(path) {
            Ok(t) => t,
            Err(e) if is_gone(&e) => return Ok(Found::Missing),
            Err(e) => return Err(e),
        };
        match t.into_os_string().into_string() {
            Ok(s) => (EntryKind::Symlink, 0, Some(s)),
            Err(_) => return Ok(Found::Unsupported("symlink target is not valid UTF-8")),
        }
    } else {
        return Ok(Found::Unsupported(
            "not a regular file, directory or symlink",
        ));
    };
    Ok(Found::Entry(EntryMeta {
        kind,
        size,
        mode: md.mode() & 0o7777,
        mtime_ns: mtime_ns(&md),
        symlink_target: target,
    }))
}

/// Whether an I/O error means the path is gone (not found, or a component is no longer a dir).
pub fn is_gone(e: &std::io::Error) -> bool {
    matches!(
        e.kind(),
        std::io::ErrorKind::NotFound | std::io::ErrorKind::NotADirectory
    )
}

/// Whether the entry on disk matches the acknowledged state (kind, size, mtime, mode, link text):
/// then nothing needs to be sent.
pub fn unchanged(meta: &EntryMeta, st: &EntryState) -> bool {
    meta.kind == st.kind
        && meta.size == st.size
        && meta.mtime_ns == st.mtime_ns
        && meta.mode == st.mode
        && meta.symlink_target == st.symlink_target
}

/// Names in directory `dir`, sorted; names that are not valid UTF-8 are returned in `bad`.
///
/// Errors: I/O errors of `read_dir`.
pub fn list_dir(dir: &Path) -> std::io::Result<(Vec<String>, Vec<PathBuf>)> {
    let mut names = Vec::new();
    let mut bad = Vec::new();
    for e in std::fs::read_dir(dir)? {
        let e = e?;
        match e.file_name().into_string() {
            Ok(n) => names.push(n),
            Err(_) => bad.push(e.path()),
        }
    }
    names.sort();
    Ok((names, bad))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn filter(include: &[&str], exclude: &[&str]) -> Filter {
        Filter::new(&PathConfig {
            name: "r".into(),
            path: "/x".into(),
            include: include.iter().map(|s| s.to_string()).collect(),
            exclude: exclude.iter().map(|s| s.to_string()).collect(),
            follow_active: true,
            max_delete_share: None,
            max_delete_files: None,
        })
        .unwrap()
    }

    #[test]
    fn include_exclude_globs() {
        let f = filter(&["**"], &["*.tmp", "build", "cache/**"]);
        assert!(f.includes(""));
        assert!(f.includes("a.txt"));
        assert!(f.includes("dir/a.txt"));
        assert!(!f.includes("a.tmp"));
        // `*` does not cross '/'.
        assert!(f.includes("dir/a.tmp"));
        // An excluded directory excludes everything below it.
        assert!(!f.includes("build"));
        assert!(!f.includes("build/x/y.rs"));
        assert!(f.includes("cache"));
        assert!(!f.includes("cache/a"));
        assert!(!f.includes("cache/a/b"));
        assert!(f.includes("builder/x"));

        let f = filter(&["**/*.txt", "docs/**"], &["**/secret*"]);
        assert!(f.includes("a.txt"));
        assert!(f.includes("x/y/a.txt"));
        assert!(!f.includes("a.md"));
        assert!(f.includes("docs/a.md"));
        assert!(!f.includes("x/secret.txt"));
        assert!(!f.includes("secrets/a.txt"));
        assert!(f.is_excluded("secrets"));
        assert!(!f.is_excluded("x"));
    }

    #[test]
    fn locate_and_wire_paths() {
        let d = tempfile::tempdir().unwrap();
        let root = d.path().join("root");
        std::fs::create_dir(&root).unwrap();
        let data = root.join(".agent");
        std::fs::create_dir(&data).unwrap();
        let roots = Roots::new(
            &[PathConfig {
                name: "data".into(),
                path: root.clone(),
                include: vec!["**".into()],
                exclude: vec![],
                follow_active: true,
                max_delete_share: None,
                max_delete_files: None,
            }],
            &data,
        )
        .unwrap();
        let root = roots.roots[0].path.clone();
        assert_eq!(roots.locate(&root), Ok((0, String::new())));
        assert_eq!(roots.locate(&root.join("a/b")), Ok((0, "a/b".into())));
        assert_eq!(
            roots.locate(&d.path().join("other")),
            Err(Unmapped::Outside)
        );
        assert_eq!(
            roots.locate(&roots.data_dir.join("status.json")),
            Err(Unmapped::Outside)
        );
        assert!(matches!(
            roots.locate(&root.join("a\\b")),
            Err(Unmapped::BadName(_))
        ));
        assert_eq!(roots.wire_path(0, ""), "data");
        assert_eq!(roots.wire_path(0, "a/b"), "data/a/b");
        assert_eq!(roots.from_wire("data/a/b"), Some((0, "a/b".into())));
        assert_eq!(roots.from_wire("data"), Some((0, String::new())));
        assert_eq!(roots.from_wire("nope/a"), None);
    }

    #[test]
    fn lstat_kinds() {
        let d = tempfile::tempdir().unwrap();
        let f = d.path().join("f");
        std::fs::write(&f, b"12345").unwrap();
        std::os::unix::fs::symlink("f", d.path().join("l")).unwrap();
        std::os::unix::fs::symlink("/nonexistent/target", d.path().join("dangling")).unwrap();
        let Found::Entry(m) = lstat(&f).unwrap() else {
            panic!()
        };
        assert_eq!((m.kind, m.size), (EntryKind::File, 5));
        let Found::Entry(m) = lstat(&d.path().join("l")).unwrap() else {
            panic!()
        };
        assert_eq!(m.kind, EntryKind::Symlink);
        assert_eq!(m.symlink_target.as_deref(), Some("f"));
        let Found::Entry(m) = lstat(&d.path().join("dangling")).unwrap() else {
            panic!()
        };
        assert_eq!(m.symlink_target.as_deref(), Some("/nonexistent/target"));
        let Found::Entry(m) = lstat(d.path()).unwrap() else {
            panic!()
        };
        assert_eq!(m.kind, EntryKind::Dir);
        assert_eq!(lstat(&d.path().join("missing")).unwrap(), Found::Missing);
        assert_eq!(lstat(&f.join("below-a-file")).unwrap(), Found::Missing);
    }
}
