//! Snapshots: a whole working dir (with `.git`, so uncommitted work too) as
//! one tar.gz blob, and back.
//!
//! A snapshot holds plain files and directories only: packing leaves out
//! symbolic links and special files (someone may have put one on the
//! server's disk), naming each in the log, and unpacking skips any such
//! entry an older snapshot holds, reporting it, so a branch always opens.
//!
//! Unpacking treats the archive as untrusted input: every entry must have a
//! relative path that stays inside the destination, and the total size is
//! capped, so a crafted or corrupted snapshot can never write outside its
//! working dir or fill the disk.

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
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Unpacked {
    pub files: u64,
    pub dirs: u64,
    pub bytes: u64,
    /// Entries left out: neither a plain file nor a directory (a symbolic
    /// link, a device...), by path.
    pub skipped: Vec<String>,
}

/// Packs the plain files and directories of `dir` (paths relative to it)
/// into a tar.gz blob. Symbolic links and special files are left out (a
/// snapshot could not be opened with them) and named in a warning.
pub fn pack(dir: &Path) -> io::Result<Vec<u8>> {
    pack_within(dir, u64::MAX).map_err(|e| match e {
        SnapshotError::Io(err) => err,
        other => io::Error::other(other),
    })
}

/// [`pack`], refusing (`TooLarge`) a working dir whose files hold more
/// than `max_bytes`: a snapshot that [`unpack`] would refuse with the same
/// limit is never made.
pub fn pack_within(dir: &Path, max_bytes: u64) -> Result<Vec<u8>, SnapshotError> {
    let mut bytes = 0u64;
    let encoder = GzEncoder::new(Vec::new(), Compression::fast());
    let mut builder = tar::Builder::new(encoder);
    builder.follow_symlinks(false);
    builder.mode(tar::HeaderMode::Complete);
    let mut pending = vec![std::path::PathBuf::new()];
    while let Some(relative) = pending.pop() {
        let mut entries = std::fs::read_dir(dir.join(&relative))?.collect::<Result<Vec<_>, _>>()?;
        entries.sort_by_key(|entry| entry.file_name());
        for entry in entries {
            let path = relative.join(entry.file_name());
            let kind = entry.file_type()?;
            if kind.is_dir() {
                builder.append_dir(&path, entry.path())?;
                pending.push(path);
            } else if kind.is_file() {
                bytes = bytes.saturating_add(entry.metadata()?.len());
                if bytes > max_bytes {
                    return Err(SnapshotError::TooLarge { limit: max_bytes });
                }
                builder.append_path_with_name(entry.path(), &path)?;
            } else {
                tracing::warn!(path = %path.display(), "left out of the snapshot: not a plain file or directory (a symbolic link or special file)");
            }
        }
    }
    Ok(builder.into_inner()?.finish()?)
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
                done.skipped.push(shown);
                continue;
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
    fn unpack_refuses_absolute_paths_and_skips_links() {
        let dest = tempfile::tempdir().expect("dest");
        let absolute = archive_with("/tmp/evil.txt", tar::EntryType::Regular, b"x");
        assert!(matches!(
            unpack(&absolute, dest.path(), 1 << 20),
            Err(SnapshotError::UnsafeEntry { .. })
        ));
        for kind in [
            tar::EntryType::Symlink,
            tar::EntryType::Link,
            tar::EntryType::Fifo,
        ] {
            let link = archive_with("link", kind, b"");
            let done = unpack(&link, dest.path(), 1 << 20).expect("the rest unpacks");
            assert_eq!(done.skipped, vec!["link".to_string()], "{kind:?}");
            assert!(std::fs::symlink_metadata(dest.path().join("link")).is_err());
        }
    }

    #[test]
    fn pack_leaves_out_links_and_special_files() {
        let src = tempfile::tempdir().expect("src");
        std::fs::write(src.path().join("kept.txt"), b"kept").expect("file");
        std::os::unix::fs::symlink("/etc/passwd", src.path().join("link")).expect("link");
        let fifo = std::ffi::CString::new(src.path().join("fifo").as_os_str().as_encoded_bytes())
            .expect("path");
        // SAFETY: mkfifo(3) on a NUL-terminated path we own.
        assert_eq!(unsafe { libc::mkfifo(fifo.as_ptr(), 0o644) }, 0);
        let blob = pack(src.path()).expect("pack");
        let dest = tempfile::tempdir().expect("dest");
        let done = unpack(&blob, dest.path(), 1 << 20).expect("unpack");
        assert_eq!((done.files, done.skipped.len()), (1, 0));
        assert_eq!(
            std::fs::read(dest.path().join("kept.txt")).expect("kept"),
            b"kept"
        );
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
    fn a_working_dir_over_the_limit_is_never_packed() {
        let src = tempfile::tempdir().expect("src");
        std::fs::write(src.path().join("a"), [1u8; 600]).expect("file");
        std::fs::create_dir(src.path().join("d")).expect("dir");
        std::fs::write(src.path().join("d/b"), [2u8; 600]).expect("file");
        assert!(matches!(
            pack_within(src.path(), 1000),
            Err(SnapshotError::TooLarge { limit: 1000 })
        ));
        let blob = pack_within(src.path(), 1200).expect("within the limit");
        let dest = tempfile::tempdir().expect("dest");
        assert_eq!(
            unpack(&blob, dest.path(), 1200).expect("unpack").bytes,
            1200
        );
    }

    #[test]
    fn garbage_is_an_error_not_a_panic() {
        let dest = tempfile::tempdir().expect("dest");
        assert!(unpack(b"not a gzip stream", dest.path(), 1 << 20).is_err());
    }
}
