//! What a workspace actor is told, and how it answers: its messages, the
//! [`Responder`] an op's result goes to, and the plain data it hands out
//! (who a session is, what an attaching session learns, the workspace's
//! state for operators). Nothing here does any work.

use std::path::PathBuf;

use ractor::RpcReplyPort;
use serde::{Deserialize, Serialize};

use super::events::EventSink;
use crate::compile::Compiled;
use crate::protocol::{Doer, ErrorCode, LockInfo, Op, OpError, OpResult, SessionId};
use crate::storage::{Role, WorkspaceKey};

/// A session as a workspace sees it: who, and with which role.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SessionInfo {
    pub id: SessionId,
    pub user_id: i64,
    pub username: String,
    pub display_name: String,
    pub email: String,
    pub role: Role,
}

impl SessionInfo {
    /// The session as events name it.
    pub fn doer(&self) -> Doer {
        Doer {
            session: self.id.clone(),
            user: self.username.clone(),
        }
    }
}

/// What an attaching session learns from the workspace (the gateway adds
/// the rest of the protocol's `welcome`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AttachInfo {
    pub branch: String,
    pub head: String,
    pub lock: Option<LockInfo>,
}

/// A workspace's state, for operators and tests.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct WorkspaceInfo {
    pub key: WorkspaceKey,
    pub dir: PathBuf,
    pub sessions: Vec<SessionId>,
    pub lock: Option<LockInfo>,
    /// Changed since the last save.
    pub dirty: bool,
    pub snapshot_version: i64,
    /// When a session last did something (ms since the epoch).
    pub last_activity: i64,
    /// Bytes of file contents kept in memory (`BRANCHD_FILE_CACHE`).
    pub file_cache_bytes: u64,
}

#[derive(ractor_cluster::RactorMessage)]
pub enum WorkspaceMsg {
    /// Adds a session; its events go to `events`.
    /// Attaching again replaces the session's event sink (the allocator
    /// re-attaches sessions after a restart, with no reply port).
    Attach {
        session: SessionInfo,
        events: EventSink,
        reply: Option<RpcReplyPort<Result<AttachInfo, OpError>>>,
    },
    /// Removes a session (releasing its lock).
    Detach {
        session: SessionId,
    },
    /// One operation by an attached session.
    Op {
        session: SessionId,
        op: Op,
        reply: Responder,
    },
    Info {
        reply: RpcReplyPort<WorkspaceInfo>,
    },
    /// Saves on behalf of the node (garbage collection, kill, drain):
    /// the new snapshot version and whether one was written.
    Save {
        reply: RpcReplyPort<Result<(i64, bool), OpError>>,
    },
    /// The lock taken at `generation` may have run out.
    LockExpired {
        generation: u64,
    },
    /// Time to check whether unsaved changes are due for saving.
    AutosaveTick,
    /// Time to tell everyone who joined and left (see `super::presence`).
    PresenceTick,
    /// A compile that `by` asked for finished (its reply is already
    /// sent): tell the other sessions.
    Compiled {
        entry: String,
        compiled: Compiled,
        by: Doer,
    },
    /// A save running in the background finished: the new snapshot
    /// version, or why it failed.
    SaveDone {
        result: Result<i64, OpError>,
    },
    /// Makes the actor panic, to test what survives one. Exists only in
    /// test builds; no client message can produce it.
    #[cfg(any(test, feature = "fault-injection"))]
    Panic,
}

/// Where an op's result goes. A reply port for callers that wait; a
/// connection passes a closure that queues the reply for its socket, so the
/// result reaches the socket without an extra task in between.
///
/// A responder dropped unanswered (the actor died, or the message never
/// arrived) answers `unavailable`, so no caller waits forever.
pub struct Responder(Option<Box<dyn FnOnce(OpResult) + Send>>);

impl Responder {
    pub fn new(deliver: impl FnOnce(OpResult) + Send + 'static) -> Responder {
        Responder(Some(Box::new(deliver)))
    }

    /// A responder that hands `change(result)` to this one.
    pub fn map(mut self, change: impl FnOnce(OpResult) -> OpResult + Send + 'static) -> Responder {
        let deliver = self.0.take();
        Responder::new(move |result| {
            if let Some(deliver) = deliver {
                deliver(change(result));
            }
        })
    }

    pub fn send(mut self, result: OpResult) {
        if let Some(deliver) = self.0.take() {
            deliver(result);
        }
    }
}

impl Drop for Responder {
    fn drop(&mut self) {
        if let Some(deliver) = self.0.take() {
            deliver(Err(OpError::new(
                ErrorCode::Unavailable,
                "the workspace stopped before answering; retry",
            )));
        }
    }
}

impl From<RpcReplyPort<OpResult>> for Responder {
    fn from(port: RpcReplyPort<OpResult>) -> Responder {
        Responder::new(move |result| {
            let _ = port.send(result);
        })
    }
}
