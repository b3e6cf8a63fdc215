//! A key's record in the allocator: the phase it is in, the sessions
//! registered on it, the callers waiting for its actor, its fence and its
//! restart history.
//!
//! Plain data with no behaviour beyond telling its sessions: it must never
//! start, stop or message an actor (the allocator does that).

use std::collections::{HashMap, VecDeque};
use std::time::Instant;

use ractor::RpcReplyPort;

use super::RegisterError;
use crate::protocol::{Event, OpError, SessionId};
use crate::storage::Fence;
use crate::workspace::{EventSink, SessionInfo, Workspace};

pub(super) enum Phase {
    /// Claiming and unpacking. `restart` holds the crash reason when this
    /// activation replaces a crashed actor.
    Activating {
        restart: Option<String>,
    },
    Active(Workspace),
    /// Saving, then stopping (garbage collection, kill or drain).
    Stopping {
        workspace: Workspace,
        kill_reply: Option<RpcReplyPort<Result<(), OpError>>>,
        collected: bool,
    },
    Failed {
        reason: String,
        until: Instant,
    },
}

/// A session registered on a key of this node: counted against garbage
/// collection, and attached again to the key's actor after a restart.
pub(super) struct RegisteredSession {
    pub(super) info: SessionInfo,
    pub(super) events: EventSink,
}

pub(super) struct Entry {
    pub(super) phase: Phase,
    pub(super) generation: u64,
    pub(super) waiters: Vec<RpcReplyPort<Result<Workspace, RegisterError>>>,
    pub(super) sessions: HashMap<SessionId, RegisteredSession>,
    pub(super) fence: Option<Fence>,
    pub(super) zeroed_at: Option<Instant>,
    pub(super) history: VecDeque<Instant>,
    pub(super) restarts: u32,
}

impl Entry {
    pub(super) fn new() -> Entry {
        Entry {
            phase: Phase::Activating { restart: None },
            generation: 0,
            waiters: Vec::new(),
            sessions: HashMap::new(),
            fence: None,
            zeroed_at: None,
            history: VecDeque::new(),
            restarts: 0,
        }
    }

    pub(super) fn tell(&self, event: &Event) {
        for (id, attached) in &self.sessions {
            attached.events.send_to(id, event);
        }
    }
}
