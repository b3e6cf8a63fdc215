//! What a successful op answers: [`Reply`], one variant per kind of
//! answer, and the plain data types inside replies and events.

use serde::{Deserialize, Serialize};

use super::SessionId;
use crate::compile::shape::{Aabb, Shape};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum EntryKind {
    File,
    Dir,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TreeEntry {
    pub path: String,
    pub kind: EntryKind,
    /// Bytes for a file, 0 for a directory.
    pub size: u64,
    /// The file's version (its git blob id); absent for a directory.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub version: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FileChange {
    pub path: String,
    /// `modified`, `added`, `deleted`, `renamed`, `typechange` or `untracked`.
    pub status: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CommitInfo {
    pub id: String,
    pub message: String,
    pub author: String,
    pub email: String,
    /// Commit time, ms since the Unix epoch.
    pub time: i64,
}

/// Who holds the edit lock, and until when (ms since the Unix epoch).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LockInfo {
    pub holder: SessionId,
    pub user: String,
    pub expires_at: i64,
}

/// Who did something, as events report it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Doer {
    pub session: SessionId,
    pub user: String,
}

/// A successful op's result. Each variant's fields are the `ok` map of the
/// reply on the wire. (`PartialEq` only: compile output holds floats.)
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Reply {
    Tree {
        entries: Vec<TreeEntry>,
    },
    File {
        path: String,
        #[serde(with = "serde_bytes")]
        content: Vec<u8>,
        version: String,
    },
    Written {
        path: String,
        version: String,
    },
    /// One path's kind and size, and its version when it is a file.
    Stat {
        path: String,
        kind: EntryKind,
        size: u64,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        version: Option<String>,
    },
    Done {},
    /// The caller holds the edit lock until `expires_at` (ms since the epoch).
    LockTaken {
        holder: SessionId,
        user: String,
        expires_at: i64,
    },
    Saved {
        snapshot_version: i64,
        /// False when nothing had changed since the last save.
        saved: bool,
    },
    Status {
        branch: String,
        head: String,
        changes: Vec<FileChange>,
    },
    Diff {
        diff: String,
    },
    Committed {
        commit: String,
    },
    Log {
        commits: Vec<CommitInfo>,
    },
    Branches {
        branches: Vec<String>,
    },
    BranchCreated {
        branch: String,
        head: String,
        snapshot_version: i64,
    },
    /// A compile ran. `ok` is false when it produced diagnostics (then
    /// `output` is absent): a failed compile is still a successful op.
    Compiled {
        ok: bool,
        diagnostics: Vec<Diagnostic>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        output: Option<CompileOutput>,
        stats: CompileStats,
    },
}

/// What kind of problem a [`Diagnostic`] reports.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DiagnosticKind {
    /// The file does not parse.
    Syntax,
    /// An import names a file that is missing, outside the project, or not
    /// a source file.
    Import,
    /// Files import each other in a circle.
    Cycle,
    /// The script failed while running (a type error, a missing variable,
    /// a bad argument to a built-in, an entry that returns no shape).
    Runtime,
    /// The compile hit one of the node's limits (operations, call depth,
    /// sizes, modules, shape size, wall time).
    Limit,
}

/// One problem found by a compile, at a place in a file. `line` and
/// `column` count from 1; 0 means the problem is not tied to a place
/// (the file as a whole).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Diagnostic {
    pub file: String,
    pub line: u32,
    pub column: u32,
    pub message: String,
    pub kind: DiagnosticKind,
}

/// The result of a successful compile: the entry point's CSG tree and its
/// axis-aligned bounding box (absent when the shape is certainly empty).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CompileOutput {
    pub tree: Shape,
    #[serde(default)]
    pub bbox: Option<Aabb>,
}

/// How much work a compile did. `files_total` counts the entry and every
/// file it imports, directly or not; each was either compiled again
/// (parsed or evaluated: `files_compiled`) or served from the cache
/// (`files_cached`). `millis` is the time the compile ran, not counting any
/// wait for a free compile slot.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct CompileStats {
    pub files_total: u32,
    pub files_compiled: u32,
    pub files_cached: u32,
    pub millis: u64,
}
