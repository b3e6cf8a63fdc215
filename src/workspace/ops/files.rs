//! File ops: `list_tree`, `read_file`, `stat`, `write_file`,
//! `delete_path`, `rename_path`, `make_dir`.
//!
//! The changing ones check against the current versions, journal their
//! record, apply it with their `apply_*` function (the one replay calls
//! too) and tell the other sessions. The file work itself is
//! [`crate::workspace::files::Files`]'.

use serde::{Deserialize, Serialize};

use super::Ctx;
use crate::protocol::{EntryKind, Event, OpError, OpResult, Reply};
use crate::workspace::files::Files;
use crate::workspace::journal::Record;
use crate::workspace::paths::WorkPath;
use crate::workspace::state::{WorkspaceState, applied};

/// A path in a record: checked when it was recorded, so only parsed here.
fn recorded(raw: &str) -> Result<WorkPath, OpError> {
    WorkPath::parse(raw, usize::MAX)
}

pub(super) fn list_tree(ws: &mut WorkspaceState, path: Option<String>) -> OpResult {
    let under = ws.path_or_root(path.as_deref().unwrap_or(""))?;
    Ok(Reply::Tree {
        entries: ws.files.list(&under)?,
        truncated: false,
    })
}

pub(super) fn read_file(ws: &mut WorkspaceState, path: &str) -> OpResult {
    let path = ws.path(path)?;
    let (content, version) = ws.files.read(&path)?;
    Ok(Reply::File {
        path: path.to_string(),
        content,
        version,
    })
}

pub(super) fn stat(ws: &mut WorkspaceState, path: &str) -> OpResult {
    let entry = ws.files.stat(&ws.path(path)?)?;
    Ok(Reply::Stat {
        path: entry.path,
        kind: entry.kind,
        size: entry.size,
        version: entry.version,
    })
}

/// A file written with this content.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct WriteRecord {
    pub path: String,
    #[serde(with = "serde_bytes")]
    pub content: Vec<u8>,
}

impl Record for WriteRecord {
    const OP: &'static str = "write";
}

/// Writes the recorded content: the file's new version.
pub fn apply_write(files: &mut Files, record: &WriteRecord) -> Result<String, OpError> {
    files.apply_write(&recorded(&record.path)?, &record.content)
}

pub(super) async fn write_file(
    ws: &mut WorkspaceState,
    cx: &Ctx<'_>,
    path: &str,
    content: Vec<u8>,
    base_version: Option<String>,
    force: bool,
) -> OpResult {
    let path = ws.path(path)?;
    ws.files
        .check_write(&path, &content, base_version.as_deref(), force)?;
    let record = WriteRecord {
        path: path.to_string(),
        content,
    };
    ws.record(&record).await?;
    let version = applied(apply_write(&mut ws.files, &record));
    ws.broadcast(
        Some(&cx.who.id),
        Event::FileChanged {
            path: path.to_string(),
            kind: EntryKind::File,
            version: Some(version.clone()),
            by: cx.who.doer(),
        },
    );
    Ok(Reply::Written {
        path: path.to_string(),
        version,
    })
}

/// A file, or a directory with everything in it, deleted.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeleteRecord {
    pub path: String,
}

impl Record for DeleteRecord {
    const OP: &'static str = "delete";
}

/// Deletes the recorded path: what it was.
pub fn apply_delete(files: &mut Files, record: &DeleteRecord) -> Result<EntryKind, OpError> {
    files.apply_delete(&recorded(&record.path)?)
}

pub(super) async fn delete_path(
    ws: &mut WorkspaceState,
    cx: &Ctx<'_>,
    path: &str,
    base_version: Option<String>,
) -> OpResult {
    let path = ws.path(path)?;
    ws.files.check_delete(&path, base_version.as_deref())?;
    let record = DeleteRecord {
        path: path.to_string(),
    };
    ws.record(&record).await?;
    let kind = applied(apply_delete(&mut ws.files, &record));
    ws.broadcast(
        Some(&cx.who.id),
        Event::PathDeleted {
            path: record.path,
            kind,
            by: cx.who.doer(),
        },
    );
    Ok(Reply::Done {})
}

/// A file or directory moved.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RenameRecord {
    pub from: String,
    pub to: String,
}

impl Record for RenameRecord {
    const OP: &'static str = "rename";
}

pub fn apply_rename(files: &mut Files, record: &RenameRecord) -> Result<(), OpError> {
    files.apply_rename(&recorded(&record.from)?, &recorded(&record.to)?)
}

pub(super) async fn rename_path(
    ws: &mut WorkspaceState,
    cx: &Ctx<'_>,
    from: &str,
    to: &str,
) -> OpResult {
    let (from, to) = (ws.path(from)?, ws.path(to)?);
    ws.files.check_rename(&from, &to)?;
    let record = RenameRecord {
        from: from.to_string(),
        to: to.to_string(),
    };
    ws.record(&record).await?;
    applied(apply_rename(&mut ws.files, &record));
    ws.broadcast(
        Some(&cx.who.id),
        Event::PathRenamed {
            from: record.from,
            to: record.to,
            by: cx.who.doer(),
        },
    );
    Ok(Reply::Done {})
}

/// A directory (and its parents) made.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MakeDirRecord {
    pub path: String,
}

impl Record for MakeDirRecord {
    const OP: &'static str = "make_dir";
}

pub fn apply_make_dir(files: &mut Files, record: &MakeDirRecord) -> Result<(), OpError> {
    files.apply_make_dir(&recorded(&record.path)?)
}

/// Makes a directory; one that is already there is no change (nothing
/// journalled, no event).
pub(super) async fn make_dir(ws: &mut WorkspaceState, cx: &Ctx<'_>, path: &str) -> OpResult {
    let path = ws.path(path)?;
    if !ws.files.check_make_dir(&path)? {
        return Ok(Reply::Done {});
    }
    let record = MakeDirRecord {
        path: path.to_string(),
    };
    ws.record(&record).await?;
    applied(apply_make_dir(&mut ws.files, &record));
    ws.broadcast(
        Some(&cx.who.id),
        Event::FileChanged {
            path: record.path,
            kind: EntryKind::Dir,
            version: None,
            by: cx.who.doer(),
        },
    );
    Ok(Reply::Done {})
}
