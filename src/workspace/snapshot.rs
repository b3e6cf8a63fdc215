//! Snapshots: a whole working dir (with `.git`, so uncommitted work too) as
//! one tar.gz blob, and back.
//!
//! Unpacking treats the archive as untrusted input: every entry must be a
//! plain file or directory with a relative path that stays inside the
//! destination, and the total size is capped, so a crafted or corrupted
//! snapshot can never write outside its working dir or fill the disk.

use std::io;
use std::path::{Component, Path};

use flate2::Compression;
use flate2::read::GzDecoder;
use flate2::write::GzEncoder;

/// Why an archive was refused or could not be unpacked.
#[derive(Debug, thiserror::Error)]
pub enum SnapshotError {
    #[error("archive entry {path:?} is not allowed: {reason}")]
    UnsafeEntry { path: String, reason: &'static str },
    #[error("archive unpacks to more than {limit} bytes")]
    TooLarge { limit: u64 },
    #[error("archive is unreadable: {0}")]
    Io(#[from] io::Error),
}

/// What unpacking produced.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Unpacked {
    pub files: u64,
    pub dirs: u64,
    pub bytes: u64,
}

/// Packs the contents of `dir` (paths relative to it) into a tar.gz blob.
/// Symbolic links are stored as links, never followed.
pub fn pack(dir: &Path) -> io::Result<Vec<u8>> {
    let encoder = GzEncoder::new(Vec::new(), Compression::fast());
    let mut builder = tar::Builder::new(encoder);
    builder.follow_symlinks(false);
    builder.mode(tar::HeaderMode::Complete);
    builder.append_dir_all(".", dir)?;
    builder.into_inner()?.finish()
}

/// Makes `into` (an existing, empty dir on the same file system) a copy
/// of `dir` as of now, by hard links: directories are made, files linked,
/// symbolic links re-created. Cheap (no file content is read), and the copy
/// keeps its content as long as files in `dir` are only ever replaced (a
/// new file renamed over the old one), never written in place: true of the
/// workspace's writes and of git. `.git/branchd/tmp` (writes being staged)
/// is left out.
pub fn link_tree(dir: &Path, into: &Path) -> io::Result<()> {
    let staging = Path::new(".git").join("branchd").join("tmp");
    let mut pending = vec![std::path::PathBuf::new()];
    while let Some(relative) = pending.pop() {
        for entry in std::fs::read_dir(dir.join(&relative))? {
            let entry = entry?;
            let path = relative.join(entry.file_name());
            if path == staging {
                continue;
            }
            let kind = entry.file_type()?;
            if kind.is_dir() {
                std::fs::create_dir(into.join(&path))?;
                pending.push(path);
            } else if kind.is_symlink() {
                let target = std::fs::read_link(entry.path())?;
                std::os::unix::fs::symlink(target, into.join(&path))?;
            } else {
                std::fs::hard_link(entry.path(), into.join(&path))?;
            }
        }
    }
    Ok(())
}

/// Unpacks a tar.gz blob into `dest` (which must exist), refusing links,
/// devices, absolute paths, `..` and more than `max_bytes` of file content.
pub fn unpack(data: &[u8], dest: &Path, max_bytes: u64) -> Result<Unpacked, SnapshotError> {
    let mut archive = tar::Archive::new(GzDecoder::new(data));
    archive.set_overwrite(true);
    archive.set_preserve_mtime(true);
    let mut done = Unpacked::default();
    for entry in archive.entries()? {
        let mut entry = entry?;
        let path = entry.path()?.into_owned();
        let shown = path.display().to_string();
        if !path
            .components()
            .all(|c| matches!(c, Component::Normal(_) | Component::CurDir))
        {
            return Err(SnapshotError::UnsafeEntry {
                path: shown,
                reason: "paths must be relative and stay inside the working dir",
            });
        }
        match entry.header().entry_type() {
            tar::EntryType::Directory => done.dirs += 1,
            tar::EntryType::Regular | tar::EntryType::Continuous => {
                done.files += 1;
                done.bytes += entry.header().size()?;
                if done.bytes > max_bytes {
                    return Err(SnapshotError::TooLarge { limit: max_bytes });
                }
            }
            _ => {
                return Err(SnapshotError::UnsafeEntry {
                    path: shown,
                    reason: "only regular files and directories are allowed",
                });
            }
        }
        if !entry.unpack_in(dest)? {
            return Err(SnapshotError::UnsafeEntry {
                path: shown,
                reason: "the entry would land outside the working dir",
            });
        }
    }
    Ok(done)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn archive_with(path: &str, entry_type: tar::EntryType, body: &[u8]) -> Vec<u8> {
        let mut builder = tar::Builder::new(GzEncoder::new(Vec::new(), Compression::fast()));
        let mut header = tar::Header::new_gnu();
        header.set_entry_type(entry_type);
        header.set_size(body.len() as u64);
        header.set_mode(0o644);
        // `set_path` refuses `..`, which is exactly what a hostile archive
        // carries: write the name bytes directly.
        let name = &mut header.as_old_mut().name;
        name[..path.len()].copy_from_slice(path.as_bytes());
        header.set_cksum();
        builder.append(&header, body).expect("append");
        builder.into_inner().expect("tar").finish().expect("gzip")
    }

    #[test]
    fn pack_then_unpack_restores_files_dirs_and_content() {
        let src = tempfile::tempdir().expect("src");
        std::fs::create_dir_all(src.path().join("a/b")).expect("dirs");
        std::fs::write(src.path().join("a/b/c.txt"), b"hello").expect("file");
        std::fs::write(src.path().join("top.txt"), b"top").expect("file");
        std::fs::create_dir(src.path().join("empty")).expect("empty dir");

        let blob = pack(src.path()).expect("pack");
        let dest = tempfile::tempdir().expect("dest");
        let done = unpack(&blob, dest.path(), 1 << 20).expect("unpack");

        assert_eq!(
            std::fs::read(dest.path().join("a/b/c.txt")).expect("c"),
            b"hello"
        );
        assert_eq!(
            std::fs::read(dest.path().join("top.txt")).expect("top"),
            b"top"
        );
        assert!(dest.path().join("empty").is_dir());
        assert_eq!(done.files, 2);
        assert_eq!(done.bytes, 8);
    }

    #[test]
    fn unpack_refuses_parent_dir_escape() {
        let blob = archive_with("../evil.txt", tar::EntryType::Regular, b"x");
        let dest = tempfile::tempdir().expect("dest");
        let err = unpack(&blob, dest.path(), 1 << 20).expect_err("must refuse");
        assert!(matches!(err, SnapshotError::UnsafeEntry { .. }), "{err}");
        assert!(
            !dest
                .path()
                .parent()
                .expect("parent")
                .join("evil.txt")
                .exists()
        );
    }

    #[test]
    fn unpack_refuses_absolute_paths_and_links() {
        let dest = tempfile::tempdir().expect("dest");
        let absolute = archive_with("/tmp/evil.txt", tar::EntryType::Regular, b"x");
        assert!(matches!(
            unpack(&absolute, dest.path(), 1 << 20),
            Err(SnapshotError::UnsafeEntry { .. })
        ));
        let link = archive_with("link", tar::EntryType::Symlink, b"");
        assert!(matches!(
            unpack(&link, dest.path(), 1 << 20),
            Err(SnapshotError::UnsafeEntry { .. })
        ));
    }

    #[test]
    fn unpack_refuses_archives_over_the_size_limit() {
        let blob = archive_with("big.bin", tar::EntryType::Regular, &[7u8; 4096]);
        let dest = tempfile::tempdir().expect("dest");
        assert!(matches!(
            unpack(&blob, dest.path(), 1024),
            Err(SnapshotError::TooLarge { limit: 1024 })
        ));
    }

    #[test]
    fn garbage_is_an_error_not_a_panic() {
        let dest = tempfile::tempdir().expect("dest");
        assert!(unpack(b"not a gzip stream", dest.path(), 1 << 20).is_err());
    }
}
