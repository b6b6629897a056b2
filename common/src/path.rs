//! Relative paths that crossed the network. Every path from the wire is checked here before it
//! touches a filesystem: no absolute paths, no `..` or `.` components, no empty components, no NUL,
//! no backslashes. Symlink escapes are checked where paths are joined to a real directory (see
//! [`safe_join`]).

use std::path::{Component, Path, PathBuf};

/// Why a path was refused.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum PathError {
    /// The path was empty.
    #[error("empty path")]
    Empty,
    /// The path started with `/`.
    #[error("absolute path {0:?} refused: paths must be relative to the protected root")]
    Absolute(String),
    /// A component was `..`.
    #[error("path {0:?} refused: contains a '..' component")]
    ParentDir(String),
    /// A component was `.`, empty (`a//b`) or the path ended with `/`.
    #[error("path {0:?} refused: empty or '.' component")]
    BadComponent(String),
    /// NUL byte or backslash.
    #[error("path {0:?} refused: contains NUL or backslash")]
    BadChar(String),
    /// Longer than 4096 bytes.
    #[error("path of {0} bytes refused: longer than 4096 bytes")]
    TooLong(usize),
    /// An existing component of the destination is a symlink (would write through it).
    #[error(
        "path {path:?} refused: component {component:?} is a symlink; refusing to write through it"
    )]
    SymlinkComponent {
        /// The checked path.
        path: String,
        /// The offending component on disk.
        component: PathBuf,
    },
}

/// Checks a `/`-separated relative path from the network.
///
/// Errors: [`PathError`] naming the rule broken.
pub fn validate_rel_path(p: &str) -> Result<(), PathError> {
    if p.is_empty() {
        return Err(PathError::Empty);
    }
    if p.len() > 4096 {
        return Err(PathError::TooLong(p.len()));
    }
    if p.contains('\0') || p.contains('\\') {
        return Err(PathError::BadChar(p.to_string()));
    }
    if p.starts_with('/') {
        return Err(PathError::Absolute(p.to_string()));
    }
    for c in p.split('/') {
        match c {
            ".." => return Err(PathError::ParentDir(p.to_string())),
            "" | "." => return Err(PathError::BadComponent(p.to_string())),
            _ => {}
        }
    }
    Ok(())
}

/// Joins a checked relative path onto `root`, refusing any existing intermediate component that is
/// a symlink (so nothing is written through a link, even one placed by an attacker). The final
/// component may not exist yet; if it exists and is a symlink, it is refused too unless
/// `allow_final_symlink` (used when replacing a symlink entry by unlinking it).
///
/// Errors: [`PathError`] for a bad path or a symlink component.
pub fn safe_join(root: &Path, rel: &str, allow_final_symlink: bool) -> Result<PathBuf, PathError> {
    validate_rel_path(rel)?;
    let rel_path = Path::new(rel);
    let mut cur = root.to_path_buf();
    let comps: Vec<Component> = rel_path.components().collect();
    for (i, c) in comps.iter().enumerate() {
        match c {
            Component::Normal(n) => cur.push(n),
            _ => return Err(PathError::BadComponent(rel.to_string())),
        }
        let last = i + 1 == comps.len();
        match std::fs::symlink_metadata(&cur) {
            Ok(m) if m.file_type().is_symlink() && !(last && allow_final_symlink) => {
                return Err(PathError::SymlinkComponent {
                    path: rel.to_string(),
                    component: cur,
                });
            }
            _ => {}
        }
    }
    Ok(cur)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn refuses_escapes() {
        assert!(matches!(
            validate_rel_path("../etc/passwd"),
            Err(PathError::ParentDir(_))
        ));
        assert!(matches!(
            validate_rel_path("a/../../b"),
            Err(PathError::ParentDir(_))
        ));
        assert!(matches!(
            validate_rel_path("/etc/passwd"),
            Err(PathError::Absolute(_))
        ));
        assert!(matches!(
            validate_rel_path("a//b"),
            Err(PathError::BadComponent(_))
        ));
        assert!(matches!(
            validate_rel_path("./a"),
            Err(PathError::BadComponent(_))
        ));
        assert!(matches!(
            validate_rel_path("a\\..\\b"),
            Err(PathError::BadChar(_))
        ));
        assert!(matches!(validate_rel_path(""), Err(PathError::Empty)));
        assert!(validate_rel_path("dir/file.txt").is_ok());
        assert!(validate_rel_path("..hidden/x..y").is_ok());
    }

    #[test]
    fn refuses_symlink_components() {
        let d = tempfile::tempdir().unwrap();
        let outside = tempfile::tempdir().unwrap();
        std::os::unix::fs::symlink(outside.path(), d.path().join("link")).unwrap();
        let err = safe_join(d.path(), "link/file", false).unwrap_err();
        assert!(matches!(err, PathError::SymlinkComponent { .. }), "{err}");
        assert!(safe_join(d.path(), "link", false).is_err());
        assert_eq!(
            safe_join(d.path(), "link", true).unwrap(),
            d.path().join("link")
        );
        assert_eq!(
            safe_join(d.path(), "a/b", false).unwrap(),
            d.path().join("a/b")
        );
    }
}
