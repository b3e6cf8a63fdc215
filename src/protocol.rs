//! Wire types shared by every boundary of branchd: the HTTP API today, the
//! WebSocket protocol and cluster messages as they land.
//!
//! Everything here is plain data with serde derives. It must never depend on
//! a transport (axum, ractor) or on storage, so that the server, the tests and
//! the bench client can all use it as it is.

use serde::{Deserialize, Serialize};

/// The closed set of error codes a client can receive, over HTTP (with the
/// status in [`ErrorCode::http_status`]) and over WebSocket alike.
/// `docs/protocol.md` documents each; new codes are only ever added.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ErrorCode {
    /// No credentials, or credentials that are wrong, expired or revoked.
    Unauthorized,
    /// Authenticated, but the role does not allow the operation.
    Forbidden,
    /// The named project, branch, path or route does not exist.
    NotFound,
    /// The request is malformed or names something invalid; the message says what.
    BadRequest,
    /// The request is stale or clashes with existing state (duplicate name,
    /// outdated file version, last owner).
    Conflict,
    /// Another session holds the workspace's edit lock.
    Locked,
    /// A request, frame, file or archive exceeds a size limit.
    TooLarge,
    /// The operation is not supported (yet) by this server.
    Unsupported,
    /// The service cannot serve this now (database down, draining, lost
    /// ownership); retry or reconnect.
    Unavailable,
    /// A bug or an unexpected failure on the server; details are in its log.
    Internal,
}

impl ErrorCode {
    pub fn as_str(self) -> &'static str {
        match self {
            ErrorCode::Unauthorized => "unauthorized",
            ErrorCode::Forbidden => "forbidden",
            ErrorCode::NotFound => "not_found",
            ErrorCode::BadRequest => "bad_request",
            ErrorCode::Conflict => "conflict",
            ErrorCode::Locked => "locked",
            ErrorCode::TooLarge => "too_large",
            ErrorCode::Unsupported => "unsupported",
            ErrorCode::Unavailable => "unavailable",
            ErrorCode::Internal => "internal",
        }
    }

    /// The HTTP status that carries this code.
    pub fn http_status(self) -> u16 {
        match self {
            ErrorCode::Unauthorized => 401,
            ErrorCode::Forbidden => 403,
            ErrorCode::NotFound => 404,
            ErrorCode::BadRequest => 400,
            ErrorCode::Conflict => 409,
            ErrorCode::Locked => 423,
            ErrorCode::TooLarge => 413,
            ErrorCode::Unsupported => 501,
            ErrorCode::Unavailable => 503,
            ErrorCode::Internal => 500,
        }
    }
}

/// The body of every error: a code from the closed set and a message that
/// says what to fix.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ErrorBody {
    pub code: ErrorCode,
    pub message: String,
}

/// Identifies one connected client (one WebSocket) for as long as it is connected.
pub type SessionId = String;

/// A workspace operation, as a client names it: `{op: "write_file", ...}`.
/// The same type travels from the WebSocket gateway to the workspace actor.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case")]
pub enum Op {
    /// Every file and directory below `path` (default: the root), `.git` excluded.
    ListTree {
        #[serde(default)]
        path: Option<String>,
    },
    ReadFile {
        path: String,
    },
    /// Creates or replaces a file. `base_version`: the version the content
    /// was based on; absent means "create, the file must not exist".
    /// `force` skips the check.
    WriteFile {
        path: String,
        #[serde(with = "serde_bytes")]
        content: Vec<u8>,
        #[serde(default)]
        base_version: Option<String>,
        #[serde(default)]
        force: bool,
    },
    /// Deletes a file (checked against `base_version` when given) or a
    /// directory with everything in it.
    DeletePath {
        path: String,
        #[serde(default)]
        base_version: Option<String>,
    },
    RenamePath {
        from: String,
        to: String,
    },
    MakeDir {
        path: String,
    },
    /// Takes or renews the exclusive edit lock for `ttl_ms` (default 30 s).
    Lock {
        #[serde(default)]
        ttl_ms: Option<u64>,
    },
    Unlock,
    /// Stores the working copy as a new snapshot version, if it changed.
    Save,
    Compile {
        entry: String,
    },
    GitStatus,
    GitDiff {
        #[serde(default)]
        path: Option<String>,
    },
    /// Commits every change, or only `paths`.
    GitCommit {
        message: String,
        #[serde(default)]
        paths: Option<Vec<String>>,
    },
    GitLog {
        #[serde(default)]
        limit: Option<u32>,
    },
    GitBranches,
    /// Creates branch `name` from this branch's HEAD as a new workspace.
    GitCreateBranch {
        name: String,
    },
}

impl Op {
    /// The op's name on the wire.
    pub fn name(&self) -> &'static str {
        match self {
            Op::ListTree { .. } => "list_tree",
            Op::ReadFile { .. } => "read_file",
            Op::WriteFile { .. } => "write_file",
            Op::DeletePath { .. } => "delete_path",
            Op::RenamePath { .. } => "rename_path",
            Op::MakeDir { .. } => "make_dir",
            Op::Lock { .. } => "lock",
            Op::Unlock => "unlock",
            Op::Save => "save",
            Op::Compile { .. } => "compile",
            Op::GitStatus => "git_status",
            Op::GitDiff { .. } => "git_diff",
            Op::GitCommit { .. } => "git_commit",
            Op::GitLog { .. } => "git_log",
            Op::GitBranches => "git_branches",
            Op::GitCreateBranch { .. } => "git_create_branch",
        }
    }
}

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
/// reply on the wire.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
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
}

/// A failed op: a code from the closed set, a message saying what to fix,
/// and, where they apply, the facts a client needs to recover.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
#[error("{code:?}: {message}")]
pub struct OpError {
    pub code: ErrorCode,
    pub message: String,
    /// For `conflict` on a file: its current version (absent if it does not exist).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub current_version: Option<String>,
    /// For `locked`: who holds the lock and until when.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lock: Option<LockInfo>,
}

impl OpError {
    pub fn new(code: ErrorCode, message: impl Into<String>) -> Self {
        OpError {
            code,
            message: message.into(),
            current_version: None,
            lock: None,
        }
    }

    pub fn bad_request(message: impl Into<String>) -> Self {
        Self::new(ErrorCode::BadRequest, message)
    }

    pub fn not_found(message: impl Into<String>) -> Self {
        Self::new(ErrorCode::NotFound, message)
    }

    pub fn conflict(message: impl Into<String>, current_version: Option<String>) -> Self {
        OpError {
            current_version,
            ..Self::new(ErrorCode::Conflict, message)
        }
    }

    pub fn forbidden(message: impl Into<String>) -> Self {
        Self::new(ErrorCode::Forbidden, message)
    }

    pub fn too_large(message: impl Into<String>) -> Self {
        Self::new(ErrorCode::TooLarge, message)
    }

    /// An unexpected failure: logged here in full, reported without internals.
    pub fn internal(context: &str, err: impl std::fmt::Display) -> Self {
        tracing::error!(error = %err, "{context}");
        Self::new(
            ErrorCode::Internal,
            format!("{context} failed on the server; the server log has details"),
        )
    }
}

pub type OpResult = Result<Reply, OpError>;

/// What happened in a workspace, pushed to every other session attached to
/// it: `{event: "file_changed", ...}`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "event", rename_all = "snake_case")]
pub enum Event {
    /// A file or directory was written, created or deleted. `version` is
    /// the file's new version; absent for deletions and directories.
    FileChanged {
        path: String,
        kind: EntryKind,
        deleted: bool,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        version: Option<String>,
        by: Doer,
    },
    PathRenamed {
        from: String,
        to: String,
        by: Doer,
    },
    Committed {
        commit: String,
        message: String,
        by: Doer,
    },
    Saved {
        snapshot_version: i64,
        by: Doer,
    },
    BranchCreated {
        branch: String,
        head: String,
        by: Doer,
    },
    /// The workspace's actor failed and was restarted from the last saved
    /// state; the session stays attached. Re-read what is on screen.
    WorkspaceRestarted {
        reason: String,
    },
    /// The workspace failed too often and is stopped; the session is
    /// detached. Reconnecting answers `unavailable` until it is reset.
    WorkspaceFailed {
        reason: String,
    },
    /// The edit lock was taken, renewed, released or expired; `lock` is the
    /// new state (absent: unlocked).
    LockChanged {
        #[serde(default, skip_serializing_if = "Option::is_none")]
        lock: Option<LockInfo>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        by: Option<Doer>,
    },
}

#[cfg(test)]
mod tests {
    use super::*;

    fn round_trip<T: Serialize + serde::de::DeserializeOwned + PartialEq + std::fmt::Debug>(
        value: &T,
    ) -> Vec<u8> {
        let bytes = rmp_serde::to_vec_named(value).expect("encode");
        let back: T = rmp_serde::from_slice(&bytes).expect("decode");
        assert_eq!(&back, value);
        bytes
    }

    #[test]
    fn ops_replies_and_events_travel_as_messagepack_maps_with_binary_content() {
        let content = vec![0u8, 159, 146, 150, 255];
        let op = Op::WriteFile {
            path: "a.bin".into(),
            content: content.clone(),
            base_version: None,
            force: false,
        };
        let bytes = round_trip(&op);
        // A map with the tag and named fields; the content as a bin, not an array.
        assert!(bytes.windows(10).any(|w| w == b"write_file"));
        assert!(
            bytes
                .windows(2 + content.len())
                .any(|w| w[0] == 0xc4 && w[1] == 5 && w[2..] == content[..])
        );

        round_trip(&Op::GitLog { limit: Some(5) });
        round_trip(&Op::Unlock);
        round_trip(&Reply::File {
            path: "a.bin".into(),
            content,
            version: "v".into(),
        });
        round_trip(&Event::LockChanged {
            lock: None,
            by: Some(Doer {
                session: "s".into(),
                user: "u".into(),
            }),
        });
        round_trip(&OpError::conflict("stale", Some("abc".into())));
    }

    #[test]
    fn optional_arguments_may_be_left_out() {
        #[derive(Serialize)]
        struct Minimal<'a> {
            op: &'a str,
            path: &'a str,
        }
        let bytes = rmp_serde::to_vec_named(&Minimal {
            op: "delete_path",
            path: "x",
        })
        .expect("encode");
        let op: Op = rmp_serde::from_slice(&bytes).expect("decode");
        assert_eq!(
            op,
            Op::DeletePath {
                path: "x".into(),
                base_version: None
            }
        );
    }
}
