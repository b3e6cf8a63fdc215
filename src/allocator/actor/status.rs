//! What operators see of the allocator: one [`WorkspaceStatus`] per key,
//! from the allocator's own bookkeeping.
//!
//! It must never change an entry: it only reports.

use std::time::{Instant, SystemTime, UNIX_EPOCH};

use super::AllocatorState;
use super::entry::Phase;
use crate::allocator::WorkspaceStatus;
use crate::protocol::SessionId;
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
}
