//! Giving keys up: a drain on shutdown (no more registers; every active
//! workspace handed over for saving) and a disown when another node has
//! taken keys over (their actors stopped without saving).
//!
//! It must never save a disowned workspace (the fence would refuse it) and
//! never wait for the saves of a drain: the caller does that.

use super::entry::Phase;
use super::{AllocatorState, publish};
use crate::allocator::RegisterError;
use crate::protocol::Event;
use crate::storage::WorkspaceKey;
use crate::workspace::Workspace;

impl AllocatorState {
    pub(super) fn disown(&mut self, keys: Vec<WorkspaceKey>) {
        for key in keys {
            let Some(entry) = self.entries.remove(&key) else {
                continue;
            };
            publish(&self.registry, &key, None);
            tracing::warn!(workspace = %key, "another node took this workspace over; dropping the stale actor");
            entry.tell(&Event::Reconnect {
                reason: format!("workspace {key} moved to another node; connect again"),
            });
            for waiter in entry.waiters {
                let _ = waiter.send(Err(RegisterError::Moved { key: key.clone() }));
            }
            let stale = match entry.phase {
                Phase::Active(workspace) | Phase::Stopping { workspace, .. } => Some(workspace),
                Phase::Activating { .. } | Phase::Failed { .. } => None,
            };
            if let Some(workspace) = stale {
                self.by_actor.remove(&workspace.actor().get_id());
                workspace.actor().stop(Some("ownership lost".into()));
            }
        }
    }

    pub(super) fn drain(&mut self) -> Vec<(WorkspaceKey, Workspace)> {
        self.draining = true;
        let mut live = Vec::new();
        for (key, entry) in self.entries.iter_mut() {
            for waiter in entry.waiters.drain(..) {
                let _ = waiter.send(Err(RegisterError::Draining));
            }
            if let Phase::Active(workspace) = &entry.phase {
                live.push((key.clone(), workspace.clone()));
                entry.phase = Phase::Stopping {
                    workspace: workspace.clone(),
                    kill_reply: None,
                    collected: false,
                };
            }
            entry.generation = u64::MAX;
        }
        let keys: Vec<WorkspaceKey> = self.entries.keys().cloned().collect();
        for key in keys {
            publish(&self.registry, &key, None);
        }
        live
    }
}
