//! Saving and stopping a key's actor: garbage collection of workspaces left
//! without sessions for the grace period, and an operator's kill. The save
//! and the stop run in a task that reports back with
//! [`AllocatorMsg::Stopped`].
//!
//! It must never throw unsaved work away: when the save fails, the actor
//! stays active and keeps serving.

use std::time::Instant;

use ractor::{ActorRef, RpcReplyPort};

use super::entry::Phase;
use super::{AllocatorMsg, AllocatorState, publish};
use crate::protocol::{ErrorCode, OpError};
use crate::storage::WorkspaceKey;

impl AllocatorState {
    /// Saves then stops a key's actor in a task.
    pub(super) fn begin_stop(
        &mut self,
        myself: &ActorRef<AllocatorMsg>,
        key: &WorkspaceKey,
        kill_reply: Option<RpcReplyPort<Result<(), OpError>>>,
        collected: bool,
    ) {
        self.next_generation += 1;
        let generation = self.next_generation;
        let Some(entry) = self.entries.get_mut(key) else {
            return;
        };
        let Phase::Active(workspace) = &entry.phase else {
            if let Some(reply) = kill_reply {
                let _ = reply.send(Err(OpError::new(
                    ErrorCode::Unavailable,
                    format!("workspace {key} is not active"),
                )));
            }
            return;
        };
        let workspace = workspace.clone();
        entry.generation = generation;
        entry.phase = Phase::Stopping {
            workspace: workspace.clone(),
            kill_reply,
            collected,
        };
        let fence = entry.fence.clone();
        publish(&self.registry, key, None);
        let (store, key, myself) = (self.store.clone(), key.clone(), myself.clone());
        self.work.spawn(async move {
            let result = match workspace.save().await {
                Err(err) => Err(err),
                Ok(_) => {
                    workspace.stop().await;
                    if let Some(fence) = fence
                        && let Err(err) = store.release_claim(&key, &fence).await
                    {
                        tracing::warn!(workspace = %key, error = %err, "releasing the claim failed; it lapses with the lease");
                    }
                    Ok(())
                }
            };
            let _ = myself.cast(AllocatorMsg::Stopped {
                key,
                generation,
                result,
            });
        });
    }

    pub(super) fn stopped(
        &mut self,
        myself: &ActorRef<AllocatorMsg>,
        key: WorkspaceKey,
        generation: u64,
        result: Result<(), OpError>,
    ) {
        let Some(entry) = self.entries.get_mut(&key) else {
            return;
        };
        if entry.generation != generation {
            return;
        }
        let Phase::Stopping {
            workspace,
            kill_reply,
            collected,
        } = std::mem::replace(&mut entry.phase, Phase::Activating { restart: None })
        else {
            return;
        };
        match result {
            Err(err) => {
                // Unsaved work must not be thrown away: keep serving.
                tracing::error!(workspace = %key, error = %err.message, "saving before the stop failed; keeping the workspace");
                entry.phase = Phase::Active(workspace.clone());
                for waiter in entry.waiters.drain(..) {
                    let _ = waiter.send(Ok(workspace.clone()));
                }
                publish(&self.registry, &key, Some(&workspace));
                if let Some(reply) = kill_reply {
                    let _ = reply.send(Err(err));
                }
            }
            Ok(()) => {
                if collected {
                    self.stats.collected += 1;
                    tracing::info!(workspace = %key, "idle workspace collected");
                }
                if let Some(reply) = kill_reply {
                    let _ = reply.send(Ok(()));
                }
                entry.fence = None;
                if entry.sessions.is_empty() && entry.waiters.is_empty() {
                    self.entries.remove(&key);
                } else {
                    // Someone registered while it stopped: start it afresh.
                    self.activate(myself, &key, None);
                }
            }
        }
    }

    pub(super) fn kill(
        &mut self,
        myself: &ActorRef<AllocatorMsg>,
        key: WorkspaceKey,
        reply: RpcReplyPort<Result<(), OpError>>,
    ) {
        if let Some(entry) = self.entries.get_mut(&key) {
            // Its sessions' event streams end with the actor: they reconnect.
            entry.sessions.clear();
        }
        self.begin_stop(myself, &key, Some(reply), false);
    }

    /// Stops every active workspace that has had no session for the grace period.
    pub(super) fn collect(&mut self, myself: &ActorRef<AllocatorMsg>) {
        if self.draining {
            return;
        }
        let grace = self.settings.idle_grace;
        let now = Instant::now();
        let idle: Vec<WorkspaceKey> = self
            .entries
            .iter()
            .filter(|(_, e)| {
                matches!(e.phase, Phase::Active(_))
                    && e.sessions.is_empty()
                    && e.waiters.is_empty()
                    && e.zeroed_at
                        .is_some_and(|at| now.duration_since(at) >= grace)
            })
            .map(|(key, _)| key.clone())
            .collect();
        for key in idle {
            self.begin_stop(myself, &key, None, true);
        }
    }
}
