//! Changing the working copy: each change is checked first (nothing
//! touched; the workspace journals it only if the check passes) and then
//! applied, unchecked, by the live path and by replay alike. Every change
//! goes through here, which keeps versions, the content cache and the
//! size of the working copy exact; this module must never change a file
//! without updating them.

use std::io;

use super::usage::{content_bytes, file_size};
use super::{Files, io_error, version_of};
use crate::protocol::{EntryKind, OpError};
use crate::workspace::paths::WorkPath;

impl Files {
    /// Checks that a write may happen: `base` must be the file's current
    /// version (`None`: it must not exist) unless `force`; otherwise
    /// `conflict` with the current version. Nothing is changed.
    pub fn check_write(
        &mut self,
        path: &WorkPath,
        content: &[u8],
        base: Option<&str>,
        force: bool,
    ) -> Result<(), OpError> {
        if path.is_root() {
            return Err(OpError::bad_request("path is empty: name a file"));
        }
        if content.len() as u64 > self.limits.max_file {
            return Err(OpError::too_large(format!(
                "the content is {} bytes; the most a file may hold is {}",
                content.len(),
                self.limits.max_file
            )));
        }
        self.check_parents(path)?;
        let current = self.version(path)?;
        let replaced = file_size(&path.resolve(&self.root)?);
        self.check_room(&format!("writing {path:?}"), content.len() as u64, replaced)?;
        if current.is_none() {
            // A new file: git must be able to track its name.
            crate::workspace::repo::check_trackable(path)?;
        }
        if !force {
            match (base, current.as_deref()) {
                (None, Some(_)) => {
                    return Err(OpError::conflict(
                        format!(
                            "{path:?} already exists: send its version as base_version, or force"
                        ),
                        current,
                    ));
                }
                (Some(base), now) if now != Some(base) => {
                    let what = if now.is_some() {
                        "has changed"
                    } else {
                        "was deleted"
                    };
                    return Err(OpError::conflict(
                        format!("{path:?} {what} since version {base}: read it again and merge"),
                        current,
                    ));
                }
                _ => {}
            }
        }
        Ok(())
    }

    /// Writes a file, creating missing parent directories. Returns the new
    /// version. Unchecked: see [`Files::check_write`].
    pub fn apply_write(&mut self, path: &WorkPath, content: &[u8]) -> Result<String, OpError> {
        self.make_parents(path)?;
        let staged = self.tmp.join(format!("write-{}", self.next_tmp));
        self.next_tmp += 1;
        std::fs::write(&staged, content).map_err(|e| io_error("writing", path, e))?;
        // The last component is not checked for a link: rename replaces a
        // link there rather than following it.
        let target = path.resolve_parents(&self.root)?;
        let replaced = file_size(&target);
        std::fs::rename(&staged, target).map_err(|e| {
            let _ = std::fs::remove_file(&staged);
            io_error("writing", path, e)
        })?;
        self.used = self
            .used
            .saturating_sub(replaced)
            .saturating_add(content.len() as u64);
        let version = version_of(content);
        self.versions.insert(path.to_string(), version.clone());
        self.cache.insert(path.as_str(), content);
        Ok(version)
    }

    /// `bad_request` if a directory on the way to `path` is a file.
    fn check_parents(&mut self, path: &WorkPath) -> Result<(), OpError> {
        let mut parent = path.parent();
        while !parent.is_root() {
            let on_disk = parent.resolve(&self.root)?;
            if Self::kind_of(&on_disk).map_err(|e| io_error("checking", path, e))?
                == Some(EntryKind::File)
            {
                return Err(OpError::bad_request(format!(
                    "a parent of {path:?} is a file, not a directory"
                )));
            }
            parent = parent.parent();
        }
        Ok(())
    }

    fn make_parents(&mut self, path: &WorkPath) -> Result<(), OpError> {
        let parent = path.parent();
        if parent.is_root() {
            return Ok(());
        }
        let on_disk = parent.resolve(&self.root)?;
        std::fs::create_dir_all(&on_disk).map_err(|err| match err.kind() {
            io::ErrorKind::AlreadyExists | io::ErrorKind::NotADirectory => {
                OpError::bad_request(format!("a parent of {path:?} is a file, not a directory"))
            }
            _ => io_error("creating the directories of", path, err),
        })
    }

    /// Checks a delete of a file (if `base` is given, only at that version)
    /// or a directory and everything below it; returns what would be deleted.
    pub fn check_delete(
        &mut self,
        path: &WorkPath,
        base: Option<&str>,
    ) -> Result<EntryKind, OpError> {
        if path.is_root() {
            return Err(OpError::bad_request("the project root cannot be deleted"));
        }
        let on_disk = path.resolve(&self.root)?;
        match Self::kind_of(&on_disk).map_err(|e| io_error("deleting", path, e))? {
            None => Err(OpError::not_found(format!("{path:?} does not exist"))),
            Some(EntryKind::Dir) if base.is_some() => Err(OpError::bad_request(format!(
                "{path:?} is a directory: directories have no version"
            ))),
            Some(EntryKind::Dir) => Ok(EntryKind::Dir),
            Some(EntryKind::File) => {
                if let Some(base) = base {
                    let current = self.version(path)?;
                    if current.as_deref() != Some(base) {
                        return Err(OpError::conflict(
                            format!("{path:?} has changed since version {base}: read it again"),
                            current,
                        ));
                    }
                }
                Ok(EntryKind::File)
            }
        }
    }

    /// Deletes a file or a directory and everything below it. Unchecked.
    pub fn apply_delete(&mut self, path: &WorkPath) -> Result<EntryKind, OpError> {
        let on_disk = path.resolve(&self.root)?;
        match Self::kind_of(&on_disk).map_err(|e| io_error("deleting", path, e))? {
            None => Err(OpError::not_found(format!("{path:?} does not exist"))),
            Some(EntryKind::Dir) => {
                let gone = content_bytes(&on_disk).unwrap_or(0);
                std::fs::remove_dir_all(&on_disk).map_err(|e| io_error("deleting", path, e))?;
                self.used = self.used.saturating_sub(gone);
                self.forget(path);
                Ok(EntryKind::Dir)
            }
            Some(EntryKind::File) => {
                let gone = file_size(&on_disk);
                std::fs::remove_file(&on_disk).map_err(|e| io_error("deleting", path, e))?;
                self.used = self.used.saturating_sub(gone);
                self.versions.remove(path.as_str());
                self.cache.remove(path.as_str());
                Ok(EntryKind::File)
            }
        }
    }

    /// Checks a move of a file or directory (the target must not exist);
    /// returns what would move.
    pub fn check_rename(&mut self, from: &WorkPath, to: &WorkPath) -> Result<EntryKind, OpError> {
        if from.is_root() || to.is_root() {
            return Err(OpError::bad_request("the project root cannot be renamed"));
        }
        if from.contains(to) {
            return Err(OpError::bad_request(format!(
                "cannot move {from:?} into itself ({to:?})"
            )));
        }
        let source = from.resolve(&self.root)?;
        let target = to.resolve(&self.root)?;
        let kind = Self::kind_of(&source)
            .map_err(|e| io_error("renaming", from, e))?
            .ok_or_else(|| OpError::not_found(format!("{from:?} does not exist")))?;
        if Self::kind_of(&target)
            .map_err(|e| io_error("renaming", to, e))?
            .is_some()
        {
            let current = self.version(to).ok().flatten();
            return Err(OpError::conflict(format!("{to:?} already exists"), current));
        }
        self.check_parents(to)?;
        crate::workspace::repo::check_trackable(to)?;
        Ok(kind)
    }

    /// Moves a file or directory, creating the target's parents. Unchecked.
    pub fn apply_rename(&mut self, from: &WorkPath, to: &WorkPath) -> Result<(), OpError> {
        let source = from.resolve(&self.root)?;
        let target = to.resolve(&self.root)?;
        self.make_parents(to)?;
        std::fs::rename(&source, &target).map_err(|e| io_error("renaming", from, e))?;
        let moved: Vec<(String, String)> = self
            .versions
            .iter()
            .filter(|(p, _)| from.contains_str(p))
            .map(|(p, v)| (format!("{to}{}", &p[from.as_str().len()..]), v.clone()))
            .collect();
        // Kept contents are dropped, not moved: renames are rare, and the
        // next read at the new place keeps the file again.
        self.forget(from);
        self.versions.extend(moved);
        Ok(())
    }

    /// Checks a make-dir: whether it would create anything (`false`: the
    /// directory exists), `conflict` if a file is there.
    pub fn check_make_dir(&mut self, path: &WorkPath) -> Result<bool, OpError> {
        if path.is_root() {
            return Ok(false);
        }
        let on_disk = path.resolve(&self.root)?;
        match Self::kind_of(&on_disk).map_err(|e| io_error("creating", path, e))? {
            Some(EntryKind::Dir) => Ok(false),
            Some(EntryKind::File) => Err(OpError::conflict(
                format!("{path:?} is a file"),
                self.version(path)?,
            )),
            None => {
                self.check_parents(path)?;
                crate::workspace::repo::check_trackable(path)?;
                Ok(true)
            }
        }
    }

    /// Creates a directory and its parents; fine if it exists. Unchecked.
    pub fn apply_make_dir(&mut self, path: &WorkPath) -> Result<(), OpError> {
        let on_disk = path.resolve(&self.root)?;
        std::fs::create_dir_all(&on_disk).map_err(|e| io_error("creating", path, e))
    }
}
