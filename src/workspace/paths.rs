//! Client-named paths inside a working copy.
//!
//! A [`WorkPath`] is relative, `/`-separated and normalised (no empty, `.`
//! or `..` segments), never names `.git` or anything in it, holds no NUL
//! byte and no name longer than [`MAX_SEGMENT`] bytes. [`WorkPath::resolve`]
//! also refuses any path that would pass through a symbolic link, so
//! nothing a client names can reach outside the root.

use std::path::{Path, PathBuf};

use crate::protocol::OpError;

/// The longest file or directory name, in bytes (what Linux file systems
/// take: a longer one would fail on disk as `internal`).
pub const MAX_SEGMENT: usize = 255;

#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct WorkPath(String);

/// Shown as the quoted path, as clients wrote it (messages use `{path:?}`).
impl std::fmt::Debug for WorkPath {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{:?}", self.0)
    }
}

impl WorkPath {
    /// The working copy's root (only for listing).
    pub fn root() -> WorkPath {
        WorkPath(String::new())
    }

    /// Validates and normalises a path a client sent.
    pub fn parse(raw: &str, max_len: usize) -> Result<WorkPath, OpError> {
        if raw.len() > max_len {
            return Err(OpError::too_large(format!(
                "path is {} bytes long; the limit is {max_len}",
                raw.len()
            )));
        }
        if raw.contains('\0') {
            return Err(OpError::bad_request("path contains a NUL byte"));
        }
        if raw.contains('\\') {
            return Err(OpError::bad_request(format!(
                "path {raw:?} contains a backslash: separate directories with '/'"
            )));
        }
        if raw.starts_with('/') {
            return Err(OpError::bad_request(format!(
                "path {raw:?} is absolute: name it relative to the project root"
            )));
        }
        let mut segments = Vec::new();
        for segment in raw.split('/') {
            match segment {
                "" | "." => continue,
                ".." => {
                    return Err(OpError::bad_request(format!(
                        "path {raw:?} contains '..': paths must stay inside the project"
                    )));
                }
                s if s.eq_ignore_ascii_case(".git") => {
                    return Err(OpError::bad_request(format!(
                        "path {raw:?} is inside .git, which clients cannot touch"
                    )));
                }
                s if s.len() > MAX_SEGMENT => {
                    return Err(OpError::bad_request(format!(
                        "a name in path {raw:?} is {} bytes long; each file or directory name may have at most {MAX_SEGMENT} bytes",
                        s.len()
                    )));
                }
                s => segments.push(s),
            }
        }
        Ok(WorkPath(segments.join("/")))
    }

    /// Like [`WorkPath::parse`], but the root itself is refused.
    pub fn parse_non_root(raw: &str, max_len: usize) -> Result<WorkPath, OpError> {
        let path = Self::parse(raw, max_len)?;
        if path.is_root() {
            return Err(OpError::bad_request(
                "path is empty: name a file or directory",
            ));
        }
        Ok(path)
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }

    pub fn is_root(&self) -> bool {
        self.0.is_empty()
    }

    /// The containing directory (the root for a top-level entry).
    pub fn parent(&self) -> WorkPath {
        match self.0.rsplit_once('/') {
            Some((parent, _)) => WorkPath(parent.to_string()),
            None => WorkPath::root(),
        }
    }

    /// True if `other` is this path or lies below it.
    pub fn contains(&self, other: &WorkPath) -> bool {
        self.contains_str(&other.0)
    }

    /// [`WorkPath::contains`] for a path kept as a string (a cache key).
    pub fn contains_str(&self, other: &str) -> bool {
        self.is_root()
            || other == self.0
            || (other.starts_with(&self.0) && other.as_bytes().get(self.0.len()) == Some(&b'/'))
    }

    /// The path on disk below `root`, refusing any that passes through a
    /// symbolic link (checked on every existing component).
    pub fn resolve(&self, root: &Path) -> Result<PathBuf, OpError> {
        self.resolve_checking(root, self.0.split('/').count())
    }

    /// Like [`WorkPath::resolve`], but the last component is left
    /// unchecked: for a caller that opens it with `O_NOFOLLOW`, which
    /// refuses a link there by itself (one system call fewer).
    pub fn resolve_parents(&self, root: &Path) -> Result<PathBuf, OpError> {
        self.resolve_checking(root, self.0.split('/').count().saturating_sub(1))
    }

    fn resolve_checking(&self, root: &Path, components: usize) -> Result<PathBuf, OpError> {
        let mut on_disk = root.to_path_buf();
        for segment in self.0.split('/').filter(|s| !s.is_empty()).take(components) {
            on_disk.push(segment);
            match std::fs::symlink_metadata(&on_disk) {
                Ok(meta) if meta.file_type().is_symlink() => {
                    return Err(Self::symlink_refused(&self.0));
                }
                Ok(_) => {}
                Err(_) => break, // the rest does not exist yet: nothing to follow
            }
        }
        Ok(root.join(&self.0))
    }

    /// The error for a path that reaches a symbolic link.
    pub fn symlink_refused(path: &str) -> OpError {
        OpError::bad_request(format!(
            "path {path:?} passes through a symbolic link, which is not allowed"
        ))
    }
}

impl std::fmt::Display for WorkPath {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::ErrorCode;

    fn refused(raw: &str) -> ErrorCode {
        WorkPath::parse(raw, 1024).expect_err(raw).code
    }

    #[test]
    fn paths_are_normalised() {
        let ok = |raw: &str| WorkPath::parse(raw, 1024).expect(raw).as_str().to_string();
        assert_eq!(ok("a/b.txt"), "a/b.txt");
        assert_eq!(ok("./a//b/./c/"), "a/b/c");
        assert_eq!(ok(""), "");
        assert_eq!(ok("dir.git/x"), "dir.git/x");
        assert_eq!(ok("ünïcode/ファイル"), "ünïcode/ファイル");
    }

    #[test]
    fn escapes_and_git_internals_are_refused() {
        for raw in [
            "../x",
            "a/../../x",
            "a/..",
            "/etc/passwd",
            ".git/config",
            "a/.GIT/x",
            ".git",
            "a\0b",
            "a\\b",
        ] {
            assert_eq!(refused(raw), ErrorCode::BadRequest, "{raw:?}");
        }
        assert_eq!(refused(&"x".repeat(2000)), ErrorCode::TooLarge);
        assert_eq!(
            refused(&format!("a/{}", "n".repeat(256))),
            ErrorCode::BadRequest
        );
        let longest = format!("a/{}", "n".repeat(MAX_SEGMENT));
        assert!(WorkPath::parse(&longest, 1024).is_ok(), "255 bytes is fine");
        assert!(WorkPath::parse_non_root("./", 1024).is_err());
    }

    #[test]
    fn containment_respects_segment_boundaries() {
        let a = WorkPath::parse("a", 100).expect("a");
        assert!(a.contains(&WorkPath::parse("a/b", 100).expect("a/b")));
        assert!(a.contains(&a));
        assert!(!a.contains(&WorkPath::parse("ab", 100).expect("ab")));
        assert!(WorkPath::root().contains(&a));
        assert_eq!(
            WorkPath::parse("a/b/c", 100).expect("p").parent().as_str(),
            "a/b"
        );
    }

    #[test]
    fn symlinks_on_the_way_are_refused() {
        let root = tempfile::tempdir().expect("root");
        let outside = tempfile::tempdir().expect("outside");
        std::os::unix::fs::symlink(outside.path(), root.path().join("link")).expect("symlink");
        std::fs::create_dir(root.path().join("real")).expect("dir");
        let through = WorkPath::parse("link/secret", 100).expect("parse");
        assert_eq!(
            through.resolve(root.path()).expect_err("symlink").code,
            ErrorCode::BadRequest
        );
        let fine = WorkPath::parse("real/new/file", 100).expect("parse");
        assert_eq!(
            fine.resolve(root.path()).expect("resolves"),
            root.path().join("real/new/file")
        );
    }
}
