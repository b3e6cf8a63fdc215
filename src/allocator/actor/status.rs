//! What the allocator reports from its own bookkeeping: one
//! [`WorkspaceStatus`] per key for operators, and the keys it holds (with
//! their epochs) for the heartbeat to check against the database.
//!
//! It must never change an entry: it only reports.

use std::time::{Instant, SystemTime, UNIX_EPOCH};

use super::AllocatorState;
use super::entry::Phase;
use crate::allocator::WorkspaceStatus;
use crate::protocol::SessionId;
use crate::storage::WorkspaceKey;
use crate::workspace::Workspace;

fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

impl AllocatorState {
    pub(super) fn entries(&self) -> Vec<(WorkspaceStatus, Option<Workspace>)> {
        let now = Instant::now();
        let wall = now_ms();
        let grace = self.settings.idle_grace;
        self.entries
            .iter()
            .map(|(key, entry)| {
                let mut sessions: Vec<SessionId> = entry.sessions.keys().cloned().collect();
                sessions.sort();
                let (state, workspace, failure) = match &entry.phase {
                    Phase::Activating { .. } => ("activating", None, None),
                    Phase::Active(w) => ("active", Some(w.clone()), None),
                    Phase::Stopping { .. } => ("stopping", None, None),
                    Phase::Failed { reason, .. } => ("failed", None, Some(reason.clone())),
                };
                let gc_deadline = match (&entry.phase, entry.zeroed_at) {
                    (Phase::Active(_), Some(at)) if entry.sessions.is_empty() => {
                        let left = (at + grace).saturating_duration_since(now);
                        Some(wall + left.as_millis() as i64)
                    }
                    _ => None,
                };
                let status = WorkspaceStatus {
                    key: key.clone(),
                    state,
                    ref_count: sessions.len(),
                    sessions,
                    lock: None,
                    dirty: false,
                    last_activity: None,
                    file_cache_bytes: 0,
                    restarts: entry.restarts,
                    gc_deadline,
                    failure,
                };
                (status, workspace)
            })
            .collect()
    }

    /// The keys this node has an active actor for, with the epoch of the
    /// claim the actor writes under.
    pub(super) fn held(&self) -> Vec<(WorkspaceKey, i64)> {
        self.entries
            .iter()
            // Not stopping ones: they release their claim on the way out,
            // and are not serving anyone any more.
            .filter(|(_, e)| matches!(e.phase, Phase::Active(_)))
            .filter_map(|(key, e)| e.fence.as_ref().map(|f| (key.clone(), f.epoch)))
            .collect()
    }
}
