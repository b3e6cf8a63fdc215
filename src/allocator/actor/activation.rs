//! Registers and activation: a session registers on a key, the key's actor
//! is claimed and started in a task, and the task's report makes it active
//! and answers the callers waiting for it.
//!
//! It must never claim or unpack in the allocator's own turn: that runs in
//! the spawned task, which reports back with [`AllocatorMsg::Activated`].

use std::sync::Arc;
use std::time::{Duration, Instant};

use ractor::{ActorCell, ActorRef, RpcReplyPort};

use super::entry::{Entry, Phase, RegisteredSession};
use super::{AllocatorMsg, AllocatorState, publish};
use crate::allocator::{AllocatorSettings, RegisterError};
use crate::protocol::{Event, OpError, SessionId};
use crate::storage::{ClaimOutcome, Fence, Store, WorkspaceKey};
use crate::workspace::{EventSink, SessionInfo, Workspace, WorkspaceArgs, WorkspaceSettings};

/// Claims the key (unless a fence is already held) and starts its actor.
/// A key failed on any node (see `failed_workspaces`) is refused before it
/// is claimed.
async fn activation(
    store: Arc<dyn Store>,
    settings: Arc<AllocatorSettings>,
    workspaces: WorkspaceSettings,
    key: WorkspaceKey,
    fence: Option<Fence>,
    supervisor: ActorCell,
) -> Result<(Workspace, Fence), RegisterError> {
    let fence = match fence {
        Some(fence) => fence,
        None => {
            if let Some(failure) = store.failure_of(&key).await.map_err(OpError::from)? {
                return Err(RegisterError::Failed {
                    key,
                    reason: format!("{} on node {}", failure.reason, failure.server_tag),
                    retry_in: Some(Duration::from_millis(failure.left_ms.max(0) as u64)),
                });
            }
            let lease_ms = settings.lease.as_millis() as i64;
            let claimed = store
                .claim(&key, &settings.server_tag, lease_ms)
                .await
                .map_err(OpError::from)?;
            match claimed {
                ClaimOutcome::Owned(claim) => claim.fence().ok_or_else(|| {
                    OpError::internal("claiming the workspace", "an owned claim without an owner")
                })?,
                ClaimOutcome::HeldBy(claim) => {
                    return Err(RegisterError::HeldBy {
                        key,
                        owner: claim.server_tag.unwrap_or_default(),
                    });
                }
            }
        }
    };
    let workspace = Workspace::start_linked(
        WorkspaceArgs {
            key,
            store,
            settings: workspaces,
            fence: fence.clone(),
        },
        supervisor,
    )
    .await?;
    Ok((workspace, fence))
}

impl AllocatorState {
    /// Starts (or restarts) a key's actor in a task.
    pub(super) fn activate(
        &mut self,
        myself: &ActorRef<AllocatorMsg>,
        key: &WorkspaceKey,
        restart: Option<String>,
    ) {
        self.next_generation += 1;
        let generation = self.next_generation;
        let Some(entry) = self.entries.get_mut(key) else {
            return;
        };
        entry.generation = generation;
        entry.phase = Phase::Activating { restart };
        let (store, settings, workspaces) = (
            self.store.clone(),
            self.settings.clone(),
            self.workspaces.clone(),
        );
        let (key, fence, myself) = (key.clone(), entry.fence.clone(), myself.clone());
        self.work.spawn(async move {
            let result = activation(
                store,
                settings,
                workspaces,
                key.clone(),
                fence,
                myself.get_cell(),
            )
            .await;
            let _ = myself.cast(AllocatorMsg::Activated {
                key,
                generation,
                result,
            });
        });
    }

    pub(super) fn register(
        &mut self,
        myself: &ActorRef<AllocatorMsg>,
        session: SessionInfo,
        key: WorkspaceKey,
        events: EventSink,
        reply: RpcReplyPort<Result<Workspace, RegisterError>>,
    ) {
        if self.draining {
            let _ = reply.send(Err(RegisterError::Draining));
            return;
        }
        let now = Instant::now();
        let entry = self.entries.entry(key.clone()).or_insert_with(Entry::new);
        let fresh = entry.generation == 0;
        if let Phase::Failed { reason, until } = &entry.phase
            && *until > now
        {
            let _ = reply.send(Err(RegisterError::Failed {
                key,
                reason: reason.clone(),
                retry_in: Some(until.duration_since(now)),
            }));
            return;
        }
        entry.zeroed_at = None;
        entry.sessions.insert(
            session.id.clone(),
            RegisteredSession {
                info: session,
                events,
            },
        );
        match &entry.phase {
            Phase::Active(workspace) => {
                let _ = reply.send(Ok(workspace.clone()));
            }
            Phase::Activating { .. } | Phase::Stopping { .. } if !fresh => {
                entry.waiters.push(reply)
            }
            _ => {
                entry.waiters.push(reply);
                self.activate(myself, &key, None);
            }
        }
    }

    pub(super) fn deregister(&mut self, session: &SessionId, key: &WorkspaceKey) {
        let Some(entry) = self.entries.get_mut(key) else {
            return;
        };
        if entry.sessions.remove(session).is_none() {
            return;
        }
        if let Phase::Active(workspace) = &entry.phase {
            workspace.detach(session);
        }
        if entry.sessions.is_empty() {
            entry.zeroed_at = Some(Instant::now());
        }
    }

    pub(super) fn activated(
        &mut self,
        key: WorkspaceKey,
        generation: u64,
        result: Result<(Workspace, Fence), RegisterError>,
    ) {
        let current = self
            .entries
            .get(&key)
            .is_some_and(|e| e.generation == generation);
        if !current {
            // Superseded while it started (drained, reset, ...): not wanted.
            if let Ok((workspace, _)) = result {
                self.work.spawn(async move { workspace.stop().await });
            }
            return;
        }
        let window = self.settings.restart.window;
        let Some(entry) = self.entries.get_mut(&key) else {
            return;
        };
        let restart = match &mut entry.phase {
            Phase::Activating { restart } => restart.take(),
            _ => None,
        };
        match result {
            Ok((workspace, fence)) => {
                self.stats.activations += 1;
                entry.phase = Phase::Active(workspace.clone());
                entry.fence = Some(fence);
                // Visible before anyone is told, so a told session finds it.
                self.by_actor
                    .insert(workspace.actor().get_id(), key.clone());
                publish(&self.registry, &key, Some(&workspace));
                if let Some(reason) = restart {
                    for attached in entry.sessions.values() {
                        workspace.reattach(attached.info.clone(), attached.events.clone());
                    }
                    entry.tell(&Event::Restarted { reason });
                }
                for waiter in entry.waiters.drain(..) {
                    let _ = waiter.send(Ok(workspace.clone()));
                }
                if entry.sessions.is_empty() {
                    entry.zeroed_at = Some(Instant::now());
                }
            }
            Err(err) => {
                tracing::warn!(workspace = %key, error = %err, "activation failed");
                for waiter in entry.waiters.drain(..) {
                    let _ = waiter.send(Err(err.clone()));
                }
                if restart.is_some() {
                    let reason = format!("restarting failed: {err}");
                    self.fail(&key, reason, Instant::now() + window);
                } else {
                    self.entries.remove(&key);
                }
            }
        }
    }
}
