//! How much the working copy holds: the bytes of its regular files,
//! `.git` included (the measure a snapshot is checked by when it is
//! unpacked), kept by [`Files`] so that a write or commit that would pass
//! `BRANCHD_MAX_WORKSPACE` is refused before it happens. Measuring walks
//! the disk (blocking); this module must never be asked to do it per op.

use std::io;
use std::path::Path;

use super::Files;
use crate::protocol::OpError;

/// Bytes of the regular files under `dir` (links are not followed, and
/// count nothing): the measure [`super::snapshot::unpack`] limits.
pub fn content_bytes(dir: &Path) -> io::Result<u64> {
    let mut total = 0u64;
    let mut pending = vec![dir.to_path_buf()];
    while let Some(next) = pending.pop() {
        for entry in std::fs::read_dir(next)? {
            let entry = entry?;
            let kind = entry.file_type()?;
            if kind.is_dir() {
                pending.push(entry.path());
            } else if kind.is_file() {
                total = total.saturating_add(entry.metadata()?.len());
            }
        }
    }
    Ok(total)
}

/// The size of the file at `on_disk` if a regular file is there (not a
/// link), else 0.
pub fn file_size(on_disk: &Path) -> u64 {
    std::fs::symlink_metadata(on_disk)
        .ok()
        .filter(|meta| meta.is_file())
        .map_or(0, |meta| meta.len())
}

impl Files {
    /// Bytes of file content in the working copy, `.git` included.
    pub fn used(&self) -> u64 {
        self.used
    }

    /// Takes the working copy's size as measured anew (after a commit,
    /// which grows `.git`). Blocking when measured here.
    pub fn measured(&mut self, used: u64) {
        self.used = used;
    }

    /// Measures the working copy again. Blocking.
    pub fn measure(&mut self) -> io::Result<()> {
        self.used = content_bytes(&self.root)?;
        Ok(())
    }

    /// `too_large` unless the working copy may grow by `more` bytes (and
    /// shrink by `less`) and stay within `BRANCHD_MAX_WORKSPACE`.
    pub fn check_room(&self, what: &str, more: u64, less: u64) -> Result<(), OpError> {
        let after = self.used.saturating_sub(less).saturating_add(more);
        if after <= self.limits.max_total {
            return Ok(());
        }
        Err(OpError::too_large(format!(
            "{what} would take the working copy to {after} bytes (history included); \
             BRANCHD_MAX_WORKSPACE allows {}: delete files, or ask an operator for more",
            self.limits.max_total
        )))
    }
}
