//! What the server pushes without being asked: [`Event`]s, the first of
//! which on every connection is the [`Welcome`].

use serde::{Deserialize, Serialize};

use super::{
    CompileOutput, CompileStats, Diagnostic, Doer, EntryKind, ErrorCode, LockInfo, OpError, Role,
    SessionId,
};

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
    /// Everyone in the workspace now: sent to a session when it joins.
    Presence {
        sessions: Vec<Doer>,
    },
    /// Who joined and who left since the last announcement: sent to every
    /// session, at most one every 100 ms per workspace.
    PresenceChanged {
        joined: Vec<Doer>,
        left: Vec<SessionId>,
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
        /// With `unavailable` on connect: how long to wait before trying
        /// again, when the server knows (see [`OpError::retry_after_ms`]).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        retry_after_ms: Option<u64>,
    },
}

impl Event {
    /// An `error` event with no retry hint.
    pub fn error(code: ErrorCode, message: impl Into<String>) -> Event {
        Event::Error {
            code,
            message: message.into(),
            retry_after_ms: None,
        }
    }

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

/// An error not tied to a request, told as an event.
impl From<OpError> for Event {
    fn from(err: OpError) -> Event {
        Event::Error {
            code: err.code,
            message: err.message,
            retry_after_ms: err.retry_after_ms,
        }
    }
}
