//! The files of one working copy: listing, reading and versioned writes.
//! This module opens a working copy and reads it; changing it is
//! `changes.rs`, what it holds in bytes `usage.rs`, hot contents `cache.rs`.
//!
//! A file's version is its git blob id, so it is the same id git shows for
//! that content. Versions are cached per path and the cache is kept exact by
//! doing every change through [`Files`]; only the workspace actor owns one.
//! Writes land through a temp file in `.git/branchd/tmp` and a rename, so a
//! file is never seen half-written.
//!
//! The contents of small files recently read or written are kept too
//! ([`FileCache`]), within a share per working copy of the node's
//! [`CachePool`], so that a read of a hot file costs no system call. Same
//! rule as the versions: exact because every change goes through here;
//! this module must never serve a file that was changed behind its back.

use std::collections::HashMap;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use super::paths::WorkPath;
use crate::protocol::{EntryKind, OpError, TreeEntry};

mod cache;
mod changes;
mod usage;

use cache::FileCache;
pub use cache::{CACHE_PER_WORKSPACE, CachePool};
pub use usage::{content_bytes, file_size};

/// Size limits on what clients may write and read, and the memory that
/// keeps file contents.
#[derive(Debug, Clone)]
pub struct FileLimits {
    pub max_file: u64,
    pub max_read: u64,
    /// Most bytes of file content the working copy may hold, `.git`
    /// included (`BRANCHD_MAX_WORKSPACE`, the measure activation applies
    /// to a snapshot): a write past it is refused.
    pub max_total: u64,
    /// Shared by every working copy of the node.
    pub cache: Arc<CachePool>,
}

pub struct Files {
    root: PathBuf,
    tmp: PathBuf,
    limits: FileLimits,
    versions: HashMap<String, String>,
    cache: FileCache,
    next_tmp: u64,
    /// Bytes of every regular file under `root`, `.git` included: measured
    /// when opened and after each commit, kept up to date by writes and
    /// deletes.
    used: u64,
}

/// The version (git blob id) of some content: the SHA-1 of `blob <len>\0`
/// and the content, as git computes it. Plain SHA-1 rather than libgit2's
/// collision-detecting one: about three times faster, the same id for any
/// content that is not a crafted SHA-1 collision (a version only tells
/// edits apart; git itself still stores objects with its own hash).
pub fn version_of(content: &[u8]) -> String {
    use sha1::{Digest, Sha1};
    let mut hasher = Sha1::new();
    hasher.update(format!("blob {}\0", content.len()).as_bytes());
    hasher.update(content);
    hex::encode(hasher.finalize())
}

fn io_error(context: &str, path: &WorkPath, err: io::Error) -> OpError {
    match err.kind() {
        io::ErrorKind::NotFound => OpError::not_found(format!("{path:?} does not exist")),
        _ => OpError::internal(&format!("{context} {path}"), err),
    }
}

impl Files {
    /// Takes charge of the working copy at `root`, clearing temp files a
    /// previous owner may have left, and measures it.
    pub fn open(root: &Path, limits: FileLimits) -> io::Result<Files> {
        let mut files = Self::open_measured(root, limits, 0)?;
        files.measure()?;
        Ok(files)
    }

    /// [`Files::open`] for a working copy whose size is known: `used`
    /// bytes of file content (what unpacking its snapshot counted).
    pub fn open_measured(root: &Path, limits: FileLimits, used: u64) -> io::Result<Files> {
        let tmp = root.join(".git").join("branchd").join("tmp");
        if tmp.exists() {
            std::fs::remove_dir_all(&tmp)?;
        }
        std::fs::create_dir_all(&tmp)?;
        let pool = limits.cache.clone();
        Ok(Files {
            root: root.to_path_buf(),
            tmp,
            limits,
            versions: HashMap::new(),
            cache: FileCache::new(pool),
            next_tmp: 0,
            used,
        })
    }

    /// Forgets cached versions and contents of `path` and everything below it.
    pub fn forget(&mut self, path: &WorkPath) {
        self.versions.retain(|p, _| !path.contains_str(p));
        self.cache.forget(path);
    }

    /// Gives back the memory of kept file contents (the workspace has no
    /// client left); reads fill it again.
    pub fn release_cache(&mut self) {
        self.cache.clear();
    }

    /// Bytes of file contents kept in memory.
    pub fn cached_bytes(&self) -> usize {
        self.cache.used()
    }

    fn kind_of(on_disk: &Path) -> io::Result<Option<EntryKind>> {
        match std::fs::symlink_metadata(on_disk) {
            Ok(meta) if meta.is_dir() => Ok(Some(EntryKind::Dir)),
            Ok(meta) if meta.is_file() => Ok(Some(EntryKind::File)),
            Ok(_) => Ok(None), // links and specials are not part of the tree
            // A missing entry, or a "directory" on the way that is a file.
            Err(err)
                if matches!(
                    err.kind(),
                    io::ErrorKind::NotFound | io::ErrorKind::NotADirectory
                ) =>
            {
                Ok(None)
            }
            Err(err) => Err(err),
        }
    }

    fn cached_version(&mut self, path: &str, on_disk: &Path) -> io::Result<String> {
        if let Some(version) = self.versions.get(path) {
            return Ok(version.clone());
        }
        let version = version_of(&std::fs::read(on_disk)?);
        self.versions.insert(path.to_string(), version.clone());
        Ok(version)
    }

    /// The current version of a file; `None` if nothing is there, an error
    /// if a directory is.
    pub fn version(&mut self, path: &WorkPath) -> Result<Option<String>, OpError> {
        // A cached version is of a regular file that is there (the cache
        // is exact): nothing to ask the disk.
        if let Some(version) = self.versions.get(path.as_str()) {
            return Ok(Some(version.clone()));
        }
        let on_disk = path.resolve(&self.root)?;
        match Self::kind_of(&on_disk).map_err(|e| io_error("reading", path, e))? {
            None => Ok(None),
            Some(EntryKind::Dir) => Err(OpError::bad_request(format!("{path:?} is a directory"))),
            Some(EntryKind::File) => self
                .cached_version(path.as_str(), &on_disk)
                .map(Some)
                .map_err(|e| io_error("reading", path, e)),
        }
    }

    /// One path's kind, size and (for a file) version, without reading the
    /// content when its version is cached.
    pub fn stat(&mut self, path: &WorkPath) -> Result<TreeEntry, OpError> {
        let on_disk = path.resolve(&self.root)?;
        match Self::kind_of(&on_disk).map_err(|e| io_error("reading", path, e))? {
            None => Err(OpError::not_found(format!("{path:?} does not exist"))),
            Some(EntryKind::Dir) => Ok(TreeEntry {
                path: path.to_string(),
                kind: EntryKind::Dir,
                size: 0,
                version: None,
            }),
            Some(EntryKind::File) => {
                let size = std::fs::metadata(&on_disk)
                    .map_err(|e| io_error("reading", path, e))?
                    .len();
                let version = self
                    .cached_version(path.as_str(), &on_disk)
                    .map_err(|e| io_error("reading", path, e))?;
                Ok(TreeEntry {
                    path: path.to_string(),
                    kind: EntryKind::File,
                    size,
                    version: Some(version),
                })
            }
        }
    }

    /// Every file and directory below `under` (itself excluded), sorted by
    /// path; `.git` is never listed.
    pub fn list(&mut self, under: &WorkPath) -> Result<Vec<TreeEntry>, OpError> {
        let start = under.resolve(&self.root)?;
        let mut entries = Vec::new();
        match Self::kind_of(&start).map_err(|e| io_error("listing", under, e))? {
            None => return Err(OpError::not_found(format!("{under:?} does not exist"))),
            Some(EntryKind::File) => {
                let size = std::fs::metadata(&start)
                    .map_err(|e| io_error("listing", under, e))?
                    .len();
                let version = self
                    .cached_version(under.as_str(), &start)
                    .map_err(|e| io_error("listing", under, e))?;
                entries.push(TreeEntry {
                    path: under.to_string(),
                    kind: EntryKind::File,
                    size,
                    version: Some(version),
                });
                return Ok(entries);
            }
            Some(EntryKind::Dir) => {}
        }
        let mut pending = vec![(start, under.as_str().to_string())];
        while let Some((dir, prefix)) = pending.pop() {
            let read = std::fs::read_dir(&dir).map_err(|e| io_error("listing", under, e))?;
            for item in read {
                let item = item.map_err(|e| io_error("listing", under, e))?;
                let Some(name) = item.file_name().to_str().map(str::to_string) else {
                    continue; // names that are not UTF-8 cannot be named by clients
                };
                if name.eq_ignore_ascii_case(".git") {
                    continue; // clients can never name it, so it is never listed
                }
                let rel = if prefix.is_empty() {
                    name
                } else {
                    format!("{prefix}/{name}")
                };
                let meta = item.metadata().map_err(|e| io_error("listing", under, e))?;
                if meta.is_dir() {
                    entries.push(TreeEntry {
                        path: rel.clone(),
                        kind: EntryKind::Dir,
                        size: 0,
                        version: None,
                    });
                    pending.push((item.path(), rel));
                } else if meta.is_file() {
                    let version = self
                        .cached_version(&rel, &item.path())
                        .map_err(|e| io_error("listing", under, e))?;
                    entries.push(TreeEntry {
                        path: rel,
                        kind: EntryKind::File,
                        size: meta.len(),
                        version: Some(version),
                    });
                }
            }
        }
        entries.sort_by(|a, b| a.path.cmp(&b.path));
        Ok(entries)
    }

    /// A file's content and version.
    ///
    /// The hot path of the protocol, so it costs four system calls: the
    /// file is opened without following a symbolic link in its last
    /// component (the directories on the way are checked by
    /// [`WorkPath::resolve_parents`]), then inspected, read and closed
    /// through that one descriptor. The version comes from the cache.
    pub fn read(&mut self, path: &WorkPath) -> Result<(Vec<u8>, String), OpError> {
        use std::io::Read;
        use std::os::unix::fs::OpenOptionsExt;
        // A kept content is the file as it is: it was read from or written
        // to it through here, and nothing else changes it. Every entry is
        // far below `max_read`.
        if let (Some(content), Some(version)) = (
            self.cache.get(path.as_str()),
            self.versions.get(path.as_str()),
        ) {
            return Ok((content.clone(), version.clone()));
        }
        let on_disk = path.resolve_parents(&self.root)?;
        let not_found = || OpError::not_found(format!("{path:?} does not exist"));
        // O_NONBLOCK: opening a FIFO someone left in the tree must not hang.
        let opened = std::fs::OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK)
            .open(&on_disk);
        let mut file = match opened {
            Ok(file) => file,
            Err(err) if err.raw_os_error() == Some(libc::ELOOP) => {
                return Err(WorkPath::symlink_refused(path.as_str()));
            }
            Err(err)
                if matches!(
                    err.kind(),
                    io::ErrorKind::NotFound | io::ErrorKind::NotADirectory
                ) =>
            {
                return Err(not_found());
            }
            Err(err) => return Err(io_error("reading", path, err)),
        };
        let meta = file.metadata().map_err(|e| io_error("reading", path, e))?;
        if meta.is_dir() {
            return Err(OpError::bad_request(format!(
                "{path:?} is a directory: use list_tree"
            )));
        }
        if !meta.is_file() {
            return Err(not_found()); // specials are not part of the tree
        }
        let size = meta.len();
        if size > self.limits.max_read {
            return Err(OpError::too_large(format!(
                "{path:?} is {size} bytes; the most a read returns is {}",
                self.limits.max_read
            )));
        }
        // Only this actor changes the file, so its size is exact: one read
        // fills the buffer (a short read, from whatever cause, is finished
        // by `read_to_end`).
        let mut content = vec![0; usize::try_from(size).unwrap_or(0)];
        let filled = file
            .read(&mut content)
            .map_err(|e| io_error("reading", path, e))?;
        if filled < content.len() {
            content.truncate(filled);
            file.read_to_end(&mut content)
                .map_err(|e| io_error("reading", path, e))?;
        }
        let version = match self.versions.get(path.as_str()) {
            Some(version) => version.clone(),
            None => {
                let version = version_of(&content);
                self.versions.insert(path.to_string(), version.clone());
                version
            }
        };
        self.cache.insert(path.as_str(), &content);
        Ok((content, version))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use cache::CACHE_MAX_FILE;

    fn files_in(pool: &Arc<CachePool>) -> (tempfile::TempDir, Files) {
        let dir = tempfile::tempdir().expect("dir");
        std::fs::create_dir_all(dir.path().join(".git")).expect(".git");
        let limits = FileLimits {
            max_file: 1 << 30,
            max_read: 1 << 30,
            max_total: u64::MAX,
            cache: pool.clone(),
        };
        let files = Files::open(dir.path(), limits).expect("files");
        (dir, files)
    }

    fn files(pool_bytes: u64) -> (tempfile::TempDir, Files) {
        files_in(&CachePool::new(pool_bytes))
    }

    fn path(raw: &str) -> WorkPath {
        WorkPath::parse(raw, 1024).expect("path")
    }

    #[test]
    fn kept_contents_follow_every_change() {
        let (dir, mut files) = files(1 << 20);
        files.apply_write(&path("a/x.txt"), b"one").expect("write");
        assert_eq!(files.cached_bytes(), 3);
        assert_eq!(files.read(&path("a/x.txt")).expect("read").0, b"one");
        files.apply_write(&path("a/x.txt"), b"two!").expect("write");
        assert_eq!(files.read(&path("a/x.txt")).expect("read").0, b"two!");
        assert_eq!(files.cached_bytes(), 4);

        // A directory moved: its files are read at their new place, and
        // the old place is gone.
        files.apply_rename(&path("a"), &path("b")).expect("rename");
        let (content, version) = files.read(&path("b/x.txt")).expect("read");
        assert_eq!(
            (content.as_slice(), version),
            (&b"two!"[..], version_of(b"two!"))
        );
        assert_eq!(
            files.read(&path("a/x.txt")).expect_err("moved").code,
            crate::protocol::ErrorCode::NotFound
        );
        files.apply_delete(&path("b")).expect("delete");
        assert_eq!(files.cached_bytes(), 0);
        assert_eq!(
            files.read(&path("b/x.txt")).expect_err("deleted").code,
            crate::protocol::ErrorCode::NotFound
        );

        // A file read from disk is kept too, and released on request.
        std::fs::write(dir.path().join("y.txt"), b"from disk").expect("file");
        assert_eq!(files.read(&path("y.txt")).expect("read").0, b"from disk");
        assert_eq!(files.cached_bytes(), 9);
        files.release_cache();
        assert_eq!(files.cached_bytes(), 0);
        assert_eq!(files.read(&path("y.txt")).expect("read").0, b"from disk");
    }

    #[test]
    fn a_workspace_keeps_at_most_its_share_and_big_files_not_at_all() {
        let pool = CachePool::new(1 << 30);
        let (_dir, mut files) = files_in(&pool);
        let content = vec![7u8; CACHE_MAX_FILE];
        for i in 0..100 {
            files
                .apply_write(&path(&format!("f{i}")), &content)
                .expect("write");
            assert!(files.cached_bytes() <= CACHE_PER_WORKSPACE);
        }
        assert_eq!(files.cached_bytes(), CACHE_PER_WORKSPACE);
        assert_eq!(pool.used(), CACHE_PER_WORKSPACE);
        for i in 0..100 {
            assert_eq!(
                files.read(&path(&format!("f{i}"))).expect("read").0,
                content
            );
        }
        files.release_cache();
        files
            .apply_write(&path("big"), &vec![1u8; CACHE_MAX_FILE + 1])
            .expect("write");
        assert_eq!((files.cached_bytes(), pool.used()), (0, 0));
    }

    #[test]
    fn the_node_pool_is_shared_and_given_back_when_a_workspace_stops() {
        let pool = CachePool::new(10_000);
        let (_a_dir, mut a) = files_in(&pool);
        let (_b_dir, mut b) = files_in(&pool);
        for i in 0..9 {
            a.apply_write(&path(&format!("f{i}")), &[1u8; 1000])
                .expect("write");
        }
        assert_eq!(pool.used(), 9_000);
        // b gets the one kilobyte left, then makes room among its own
        // entries only: a keeps what it has.
        b.apply_write(&path("g0"), &[2u8; 1000]).expect("write");
        b.apply_write(&path("g1"), &[2u8; 1000]).expect("write");
        assert_eq!((a.cached_bytes(), b.cached_bytes()), (9_000, 1_000));
        assert_eq!(b.read(&path("g0")).expect("read").0, [2u8; 1000]);
        assert_eq!(b.read(&path("g1")).expect("read").0, [2u8; 1000]);
        assert!(pool.used() <= 10_000);
        drop(a);
        assert_eq!(pool.used(), b.cached_bytes());
        let (_c_dir, mut off) = files(0);
        off.apply_write(&path("small"), b"x").expect("write");
        assert_eq!(off.cached_bytes(), 0);
        assert_eq!(off.read(&path("small")).expect("read").0, b"x");
    }

    #[test]
    fn versions_are_git_blob_ids() {
        for content in [&b""[..], b"hello\n", &[0u8; 5000][..], "ünïcode".as_bytes()] {
            let git = git2::Oid::hash_object(git2::ObjectType::Blob, content).expect("hash");
            assert_eq!(version_of(content), git.to_string());
        }
    }
}
