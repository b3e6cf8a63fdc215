//! Wire types shared by every boundary of branchd: the HTTP API today, the
//! WebSocket protocol and cluster messages as they land.
//!
//! Everything here is plain data with serde derives. It must never depend on
//! a transport (axum, ractor) or on storage, so that the server, the tests and
//! the bench client can all use it as it is.

use serde::{Deserialize, Serialize};

use crate::compile::shape::{Aabb, Shape};

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
    pub lock: Option<Box<LockInfo>>,
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

/// The protocol version this server speaks, announced in `welcome`.
pub const PROTOCOL_VERSION: u32 = 1;

/// A project member's role. Ordered: each role can do what the ones before it can.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    Viewer,
    Editor,
    Owner,
}

impl Role {
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Viewer => "viewer",
            Role::Editor => "editor",
            Role::Owner => "owner",
        }
    }

    pub fn parse(s: &str) -> Option<Role> {
        match s {
            "viewer" => Some(Role::Viewer),
            "editor" => Some(Role::Editor),
            "owner" => Some(Role::Owner),
            _ => None,
        }
    }
}

/// The first frame on every connection: `{event: "welcome", ...}`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Welcome {
    pub protocol: u32,
    pub session: SessionId,
    /// The server tag of the node this socket is on.
    pub node: String,
    /// The server tag of the node that owns the workspace.
    pub owner: String,
    pub project: i64,
    pub branch: String,
    pub role: Role,
    /// The checked-out commit.
    pub head: String,
    /// Who holds the edit lock, if anyone does.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lock: Option<LockInfo>,
}

/// A push from the server: `{event: "file_changed", ...}`. Workspace events
/// go to every session of the workspace except the one that caused them
/// (`presence`, `restarted`, expiries and releases go to all).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "event", rename_all = "snake_case")]
pub enum Event {
    /// The first frame on every connection.
    Welcome(Welcome),
    /// A file was written (`kind: file`, with its new version) or a
    /// directory created (`kind: dir`).
    FileChanged {
        path: String,
        kind: EntryKind,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        version: Option<String>,
        by: Doer,
    },
    /// A file, or a directory and everything in it, was deleted.
    PathDeleted {
        path: String,
        kind: EntryKind,
        by: Doer,
    },
    PathRenamed {
        from: String,
        to: String,
        by: Doer,
    },
    /// The edit lock was taken or renewed (`holder`, `user`, `expires_at`
    /// set), or ended (all absent). `by` is absent when it expired or its
    /// holder left.
    LockChanged {
        #[serde(default, skip_serializing_if = "Option::is_none")]
        holder: Option<SessionId>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        user: Option<String>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        expires_at: Option<i64>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        by: Option<Doer>,
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
    /// Another session compiled `entry`: the same fields as its reply.
    Compiled {
        entry: String,
        ok: bool,
        diagnostics: Vec<Diagnostic>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        output: Option<CompileOutput>,
        stats: CompileStats,
        by: Doer,
    },
    /// Who is in the workspace now; sent to everyone on every join and leave.
    Presence {
        sessions: Vec<Doer>,
    },
    /// The workspace was restarted after a crash, from its last durable
    /// state; the session stays attached. Re-read what is on screen.
    Restarted {
        reason: String,
    },
    /// The node is going away: connect again (another node will serve).
    Reconnect {
        reason: String,
    },
    /// An error not tied to a request (a frame without a usable `id`), or
    /// the reason the server is about to close the connection.
    Error {
        code: ErrorCode,
        message: String,
    },
}

impl Event {
    /// `lock_changed` for a lock's new state (`None`: unlocked).
    pub fn lock_changed(lock: Option<&LockInfo>, by: Option<Doer>) -> Event {
        Event::LockChanged {
            holder: lock.map(|l| l.holder.clone()),
            user: lock.map(|l| l.user.clone()),
            expires_at: lock.map(|l| l.expires_at),
            by,
        }
    }
}

impl Reply {
    /// The name of the variant that answers `op` (its wire name).
    fn variant_for(op: &str) -> Option<&'static str> {
        Some(match op {
            "list_tree" => "tree",
            "read_file" => "file",
            "write_file" => "written",
            "delete_path" | "rename_path" | "make_dir" | "unlock" => "done",
            "lock" => "lock_taken",
            "save" => "saved",
            "git_status" => "status",
            "git_diff" => "diff",
            "git_commit" => "committed",
            "git_log" => "log",
            "git_branches" => "branches",
            "git_create_branch" => "branch_created",
            "compile" => "compiled",
            _ => return None,
        })
    }

    /// The reply's `ok` map as sent on the wire (the variant's fields),
    /// encoded: the variant's encoding without its outer `{name: ...}`.
    pub fn to_wire(&self) -> Result<Vec<u8>, WireError> {
        let tagged = rmp_serde::to_vec_named(self).map_err(|e| WireError(e.to_string()))?;
        let mut rest: &[u8] = &tagged;
        let entries = rmp::decode::read_map_len(&mut rest).map_err(|e| WireError(e.to_string()))?;
        let name_len =
            rmp::decode::read_str_len(&mut rest).map_err(|e| WireError(e.to_string()))?;
        if entries != 1 || rest.len() < name_len as usize {
            return Err(WireError("a reply must encode as {variant: fields}".into()));
        }
        Ok(rest[name_len as usize..].to_vec())
    }

    /// Reads the `ok` map of a reply to `op` (its wire name).
    pub fn from_wire(op: &str, ok: &rmpv::Value) -> Result<Reply, WireError> {
        let variant = Self::variant_for(op)
            .ok_or_else(|| WireError(format!("{op:?} has no workspace reply")))?;
        let mut tagged = Vec::new();
        rmp::encode::write_map_len(&mut tagged, 1).map_err(|e| WireError(e.to_string()))?;
        rmp::encode::write_str(&mut tagged, variant).map_err(|e| WireError(e.to_string()))?;
        rmpv::encode::write_value(&mut tagged, ok).map_err(|e| WireError(e.to_string()))?;
        rmp_serde::from_slice(&tagged).map_err(|e| WireError(e.to_string()))
    }
}

/// A value that does not have the shape the protocol gives it.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("wire format: {0}")]
pub struct WireError(pub String);

/// Encodes a `ping` request frame, `{id, op: "ping"}` (not an [`Op`]:
/// the connection answers it without a workspace).
pub fn ping_frame(id: u64) -> Vec<u8> {
    let mut frame = Vec::with_capacity(16);
    // Writing to a Vec cannot fail.
    let _ = rmp::encode::write_map_len(&mut frame, 2);
    let _ = rmp::encode::write_str(&mut frame, "id");
    let _ = rmp::encode::write_uint(&mut frame, id);
    let _ = rmp::encode::write_str(&mut frame, "op");
    let _ = rmp::encode::write_str(&mut frame, "ping");
    frame
}

/// Encodes a request frame: `op`'s named map with `id` added first.
pub fn request_frame(id: u64, op: &Op) -> Result<Vec<u8>, WireError> {
    let encoded = rmp_serde::to_vec_named(op).map_err(|e| WireError(e.to_string()))?;
    let mut rest: &[u8] = &encoded;
    let entries = rmp::decode::read_map_len(&mut rest).map_err(|e| WireError(e.to_string()))?;
    let mut frame = Vec::with_capacity(encoded.len() + 16);
    rmp::encode::write_map_len(&mut frame, entries + 1).map_err(|e| WireError(e.to_string()))?;
    rmp::encode::write_str(&mut frame, "id").map_err(|e| WireError(e.to_string()))?;
    rmp::encode::write_uint(&mut frame, id).map_err(|e| WireError(e.to_string()))?;
    frame.extend_from_slice(rest);
    Ok(frame)
}

/// Encodes a successful reply frame `{id, ok}` around an encoded `ok` value.
pub fn ok_frame(id: u64, ok: &[u8]) -> Vec<u8> {
    let mut frame = Vec::with_capacity(ok.len() + 16);
    // Writing to a Vec cannot fail.
    let _ = rmp::encode::write_map_len(&mut frame, 2);
    let _ = rmp::encode::write_str(&mut frame, "id");
    let _ = rmp::encode::write_uint(&mut frame, id);
    let _ = rmp::encode::write_str(&mut frame, "ok");
    frame.extend_from_slice(ok);
    frame
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
        round_trip(&Event::lock_changed(
            None,
            Some(Doer {
                session: "s".into(),
                user: "u".into(),
            }),
        ));
        round_trip(&OpError::conflict("stale", Some("abc".into())));
    }

    #[test]
    fn replies_travel_as_their_fields_and_requests_carry_an_id() {
        let reply = Reply::Written {
            path: "a".into(),
            version: "v".into(),
        };
        let ok = reply.to_wire().expect("to wire");
        let value: rmpv::Value = rmp_serde::from_slice(&ok).expect("a map");
        assert_eq!(
            value,
            rmpv::Value::Map(vec![
                ("path".into(), "a".into()),
                ("version".into(), "v".into())
            ])
        );
        assert_eq!(Reply::from_wire("write_file", &value).expect("back"), reply);
        let frame: rmpv::Value = rmp_serde::from_slice(&ok_frame(7, &ok)).expect("frame");
        assert_eq!(frame["id"], rmpv::Value::from(7));
        assert_eq!(frame["ok"], value);

        let request = request_frame(9, &Op::ReadFile { path: "x".into() }).expect("request");
        let value: rmpv::Value = rmp_serde::from_slice(&request).expect("map");
        assert_eq!(value["id"], rmpv::Value::from(9));
        assert_eq!(value["op"], rmpv::Value::from("read_file"));
        assert_eq!(value["path"], rmpv::Value::from("x"));
    }

    #[test]
    fn a_compile_reply_is_its_documented_map() {
        let reply = Reply::Compiled {
            ok: true,
            diagnostics: vec![],
            output: Some(CompileOutput {
                tree: Shape::Sphere { radius: 1.0 },
                bbox: Shape::Sphere { radius: 1.0 }.bounding_box(),
            }),
            stats: CompileStats {
                files_total: 3,
                files_compiled: 1,
                files_cached: 2,
                millis: 4,
            },
        };
        let value: rmpv::Value =
            rmp_serde::from_slice(&reply.to_wire().expect("to wire")).expect("map");
        assert_eq!(value["ok"], rmpv::Value::from(true));
        assert_eq!(value["output"]["tree"]["kind"], rmpv::Value::from("sphere"));
        assert_eq!(value["output"]["bbox"]["min"][0], rmpv::Value::from(-1.0));
        assert_eq!(value["stats"]["files_cached"], rmpv::Value::from(2));
        assert_eq!(Reply::from_wire("compile", &value).expect("back"), reply);

        let failed = Diagnostic {
            file: "a.rhai".into(),
            line: 2,
            column: 5,
            message: "oops".into(),
            kind: DiagnosticKind::Syntax,
        };
        let bytes = rmp_serde::to_vec_named(&failed).expect("encode");
        let value: rmpv::Value = rmp_serde::from_slice(&bytes).expect("map");
        assert_eq!(value["kind"], rmpv::Value::from("syntax"));
        assert_eq!(value["line"], rmpv::Value::from(2));
    }

    #[test]
    fn welcome_is_one_flat_map_tagged_by_event() {
        let welcome = Event::Welcome(Welcome {
            protocol: PROTOCOL_VERSION,
            session: "s".into(),
            node: "n".into(),
            owner: "n".into(),
            project: 1,
            branch: "main".into(),
            role: Role::Editor,
            head: "h".into(),
            lock: None,
        });
        let bytes = round_trip(&welcome);
        let value: rmpv::Value = rmp_serde::from_slice(&bytes).expect("map");
        assert_eq!(value["event"], rmpv::Value::from("welcome"));
        assert_eq!(value["protocol"], rmpv::Value::from(1));
        assert_eq!(value["role"], rmpv::Value::from("editor"));
        assert!(
            value
                .as_map()
                .is_some_and(|m| m.iter().all(|(k, _)| k.as_str() != Some("lock")))
        );
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
