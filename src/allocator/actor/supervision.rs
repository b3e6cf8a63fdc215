//! Supervision: what happens when a workspace actor crashes or stops on its
//! own. A crash is a restart from the last saved state while the
//! [`RestartPolicy`](crate::allocator::RestartPolicy) admits it, and a
//! failed key (its sessions told and dropped) once it does not.
//!
//! A failed key is recorded in the database too (`Store::mark_failed`), so
//! that no other node activates it until the window ends or an operator
//! resets it: a crash-looping workspace must not move from node to node.
//!
//! It must never let a child's end take the allocator down, and never
//! release a failed key's claim from here (see [`AllocatorState::fail`]).

use std::time::Instant;

use ractor::{ActorId, ActorRef};

use super::entry::Phase;
use super::{AllocatorMsg, AllocatorState, publish};
use crate::allocator::RegisterError;
use crate::protocol::{ErrorCode, Event, OpError};
use crate::storage::WorkspaceKey;

impl AllocatorState {
    /// Marks a key failed until `until`: its sessions are told and dropped.
    pub(super) fn fail(&mut self, key: &WorkspaceKey, reason: String, until: Instant) {
        let Some(entry) = self.entries.get_mut(key) else {
            return;
        };
        tracing::error!(workspace = %key, %reason, "workspace marked failed");
        entry.tell(&Event::error(
            ErrorCode::Unavailable,
            format!("workspace {key} failed and is stopped: {reason}"),
        ));
        entry.sessions.clear();
        for waiter in entry.waiters.drain(..) {
            let _ = waiter.send(Err(RegisterError::Failed {
                key: key.clone(),
                reason: reason.clone(),
                retry_in: None,
            }));
        }
        // The claim stays with this node (released by a drain, or reused
        // when the key is reset): releasing it from a task here could land
        // after a reset had claimed the key again.
        let for_ms = until.saturating_duration_since(Instant::now()).as_millis() as i64;
        let (store, tag, failed, why) = (
            self.store.clone(),
            self.settings.server_tag.clone(),
            key.clone(),
            reason.clone(),
        );
        self.work.spawn(async move {
            if let Err(err) = store.mark_failed(&failed, &why, &tag, for_ms).await {
                tracing::warn!(workspace = %failed, error = %err, "recording the failure for the cluster failed; other nodes may still activate it");
            }
        });
        entry.phase = Phase::Failed { reason, until };
        publish(&self.registry, key, None);
    }

    /// An operator's reset of a failed key: forgets it, so the next
    /// register starts it afresh. Whether the key was failed.
    pub(super) fn reset(&mut self, key: &WorkspaceKey) -> bool {
        let failed = matches!(
            self.entries.get(key).map(|e| &e.phase),
            Some(Phase::Failed { .. })
        );
        if failed {
            self.entries.remove(key);
            tracing::info!(workspace = %key, "failed workspace reset by an operator");
        }
        failed
    }

    pub(super) fn crashed(
        &mut self,
        myself: &ActorRef<AllocatorMsg>,
        actor: ActorId,
        reason: String,
    ) {
        let Some(key) = self.by_actor.remove(&actor) else {
            return;
        };
        publish(&self.registry, &key, None);
        let policy = self.settings.restart;
        let Some(entry) = self.entries.get_mut(&key) else {
            return;
        };
        if let Phase::Stopping { kill_reply, .. } = &mut entry.phase
            && let Some(reply) = kill_reply.take()
        {
            let _ = reply.send(Err(OpError::internal("saving before the stop", &reason)));
        }
        if self.draining {
            // Shutting down: nothing to restart for.
            self.entries.remove(&key);
            return;
        }
        match policy.admit(&mut entry.history, Instant::now()) {
            Ok(()) => {
                entry.restarts += 1;
                self.stats.restarts += 1;
                tracing::warn!(workspace = %key, %reason, restarts = entry.restarts, "workspace crashed; restarting it from its last saved state");
                // Clients learn that it happened, not the internals (those are logged).
                let told = "the workspace crashed and was restarted; nothing acknowledged was lost"
                    .to_string();
                self.activate(myself, &key, Some(told));
            }
            Err(until) => {
                tracing::error!(workspace = %key, %reason, "workspace crashed again");
                self.fail(&key, "it crashed too often".to_string(), until)
            }
        }
    }

    pub(super) fn terminated(&mut self, actor: ActorId) {
        let Some(key) = self.by_actor.remove(&actor) else {
            return;
        };
        let unexpected = self
            .entries
            .get(&key)
            .is_some_and(|e| matches!(&e.phase, Phase::Active(w) if w.actor().get_id() == actor));
        if unexpected {
            tracing::warn!(workspace = %key, "workspace stopped on its own; forgetting it");
            self.entries.remove(&key);
            publish(&self.registry, &key, None);
        }
    }
}
