//! The allocator actor: the one place that decides, for this node, which
//! workspace actor serves a key, and when it starts, restarts and stops.
//!
//! Each key moves through [`Phase`]s. Work that takes time (claiming and
//! activating, saving and stopping) runs in a task that reports back with
//! [`AllocatorMsg::Activated`] or [`AllocatorMsg::Stopped`]; a generation
//! number per key makes late reports from superseded tasks harmless. Every
//! such task runs in the allocator's [`TaskGroup`], which a drain waits for.

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use ractor::{
    Actor, ActorCell, ActorId, ActorProcessingErr, ActorRef, RpcReplyPort, SupervisionEvent,
};

use super::{AllocatorSettings, AllocatorStats, RegisterError, Registry, WorkspaceStatus};
use crate::protocol::{ErrorCode, Event, OpError, SessionId};
use crate::shutdown::TaskGroup;
use crate::storage::{ClaimOutcome, Fence, Store, WorkspaceKey};
use crate::workspace::{EventSink, SessionInfo, Workspace, WorkspaceArgs, WorkspaceSettings};

pub(super) struct AllocatorActor;

pub(super) struct AllocatorArgs {
    pub store: Arc<dyn Store>,
    pub workspaces: WorkspaceSettings,
    pub settings: Arc<AllocatorSettings>,
    pub registry: Registry,
    pub work: TaskGroup,
}

#[derive(ractor_cluster::RactorMessage)]
pub(super) enum AllocatorMsg {
    Register {
        session: SessionInfo,
        key: WorkspaceKey,
        events: EventSink,
        reply: RpcReplyPort<Result<Workspace, RegisterError>>,
    },
    Deregister {
        session: SessionId,
        key: WorkspaceKey,
    },
    /// An activation task finished.
    Activated {
        key: WorkspaceKey,
        generation: u64,
        result: Result<(Workspace, Fence), RegisterError>,
    },
    /// A save-and-stop task finished (`Err`: the save failed, the actor lives on).
    Stopped {
        key: WorkspaceKey,
        generation: u64,
        result: Result<(), OpError>,
    },
    Kill {
        key: WorkspaceKey,
        reply: RpcReplyPort<Result<(), OpError>>,
    },
    GcTick,
    Entries {
        reply: RpcReplyPort<Vec<(WorkspaceStatus, Option<Workspace>)>>,
    },
    Reset {
        key: WorkspaceKey,
        reply: RpcReplyPort<bool>,
    },
    Stats {
        reply: RpcReplyPort<AllocatorStats>,
    },
    /// This node no longer owns these keys (its claim was taken over): stop
    /// their actors without saving (a save would be refused by the fence)
    /// and tell their sessions to reconnect.
    Disown {
        keys: Vec<WorkspaceKey>,
    },
    /// The keys this node has an active actor for, with the epoch of the
    /// claim the actor writes under.
    Held {
        reply: RpcReplyPort<Vec<(WorkspaceKey, i64)>>,
    },
    /// Stop taking registers; hand over every active workspace for saving.
    Drain {
        reply: RpcReplyPort<Vec<(WorkspaceKey, Workspace)>>,
    },
}

enum Phase {
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
struct RegisteredSession {
    info: SessionInfo,
    events: EventSink,
}

struct Entry {
    phase: Phase,
    generation: u64,
    waiters: Vec<RpcReplyPort<Result<Workspace, RegisterError>>>,
    sessions: HashMap<SessionId, RegisteredSession>,
    fence: Option<Fence>,
    zeroed_at: Option<Instant>,
    history: VecDeque<Instant>,
    restarts: u32,
}

impl Entry {
    fn new() -> Entry {
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

    fn tell(&self, event: &Event) {
        for (id, attached) in &self.sessions {
            attached.events.send_to(id, event);
        }
    }
}

pub(super) struct AllocatorState {
    store: Arc<dyn Store>,
    workspaces: WorkspaceSettings,
    settings: Arc<AllocatorSettings>,
    registry: Registry,
    work: TaskGroup,
    entries: HashMap<WorkspaceKey, Entry>,
    by_actor: HashMap<ActorId, WorkspaceKey>,
    draining: bool,
    stats: AllocatorStats,
    next_generation: u64,
}

fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

impl Actor for AllocatorActor {
    type Msg = AllocatorMsg;
    type State = AllocatorState;
    type Arguments = AllocatorArgs;

    async fn pre_start(
        &self,
        myself: ActorRef<AllocatorMsg>,
        args: AllocatorArgs,
    ) -> Result<AllocatorState, ActorProcessingErr> {
        myself.send_interval(args.settings.gc_interval, || AllocatorMsg::GcTick);
        Ok(AllocatorState {
            store: args.store,
            workspaces: args.workspaces,
            settings: args.settings,
            registry: args.registry,
            work: args.work,
            entries: HashMap::new(),
            by_actor: HashMap::new(),
            draining: false,
            stats: AllocatorStats::default(),
            next_generation: 0,
        })
    }

    async fn handle(
        &self,
        myself: ActorRef<AllocatorMsg>,
        message: AllocatorMsg,
        state: &mut AllocatorState,
    ) -> Result<(), ActorProcessingErr> {
        match message {
            AllocatorMsg::Register {
                session,
                key,
                events,
                reply,
            } => state.register(&myself, session, key, events, reply),
            AllocatorMsg::Deregister { session, key } => state.deregister(&session, &key),
            AllocatorMsg::Activated {
                key,
                generation,
                result,
            } => state.activated(key, generation, result),
            AllocatorMsg::Stopped {
                key,
                generation,
                result,
            } => state.stopped(&myself, key, generation, result),
            AllocatorMsg::Kill { key, reply } => state.kill(&myself, key, reply),
            AllocatorMsg::GcTick => state.collect(&myself),
            AllocatorMsg::Entries { reply } => {
                let _ = reply.send(state.entries());
            }
            AllocatorMsg::Reset { key, reply } => {
                let failed = matches!(
                    state.entries.get(&key).map(|e| &e.phase),
                    Some(Phase::Failed { .. })
                );
                if failed {
                    state.entries.remove(&key);
                    tracing::info!(workspace = %key, "failed workspace reset by an operator");
                }
                let _ = reply.send(failed);
            }
            AllocatorMsg::Stats { reply } => {
                let _ = reply.send(state.stats);
            }
            AllocatorMsg::Drain { reply } => {
                let _ = reply.send(state.drain());
            }
            AllocatorMsg::Disown { keys } => state.disown(keys),
            AllocatorMsg::Held { reply } => {
                let held = state
                    .entries
                    .iter()
                    // Not stopping ones: they release their claim on the
                    // way out, and are not serving anyone any more.
                    .filter(|(_, e)| matches!(e.phase, Phase::Active(_)))
                    .filter_map(|(key, e)| e.fence.as_ref().map(|f| (key.clone(), f.epoch)))
                    .collect();
                let _ = reply.send(held);
            }
        }
        Ok(())
    }

    /// Children never take the allocator down: a crash is a restart (or a
    /// failed key), a stop is bookkeeping.
    async fn handle_supervisor_evt(
        &self,
        myself: ActorRef<AllocatorMsg>,
        event: SupervisionEvent,
        state: &mut AllocatorState,
    ) -> Result<(), ActorProcessingErr> {
        match event {
            SupervisionEvent::ActorFailed(cell, err) => {
                state.crashed(&myself, cell.get_id(), err.to_string())
            }
            SupervisionEvent::ActorTerminated(cell, _, _) => state.terminated(cell.get_id()),
            _ => {}
        }
        Ok(())
    }
}

/// Claims the key (unless a fence is already held) and starts its actor.
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

/// Makes a key's live workspace visible to [`super::Allocator::get`] (or hides it).
fn publish(registry: &Registry, key: &WorkspaceKey, workspace: Option<&Workspace>) {
    let changed = match registry.map.write() {
        Ok(mut map) => match workspace {
            Some(workspace) => map.insert(key.clone(), workspace.clone()).is_none(),
            None => map.remove(key).is_some(),
        },
        Err(_) => false,
    };
    if changed && let Some(hook) = registry.hook.get() {
        hook(key, workspace.is_some());
    }
}

impl AllocatorState {
    /// Starts (or restarts) a key's actor in a task.
    fn activate(
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

    fn register(
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

    fn deregister(&mut self, session: &SessionId, key: &WorkspaceKey) {
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

    fn activated(
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

    /// Marks a key failed until `until`: its sessions are told and dropped.
    fn fail(&mut self, key: &WorkspaceKey, reason: String, until: Instant) {
        let Some(entry) = self.entries.get_mut(key) else {
            return;
        };
        tracing::error!(workspace = %key, %reason, "workspace marked failed");
        entry.tell(&Event::Error {
            code: ErrorCode::Unavailable,
            message: format!("workspace {key} failed and is stopped: {reason}"),
        });
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
        entry.phase = Phase::Failed { reason, until };
        publish(&self.registry, key, None);
    }

    fn crashed(&mut self, myself: &ActorRef<AllocatorMsg>, actor: ActorId, reason: String) {
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

    fn terminated(&mut self, actor: ActorId) {
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

    /// Saves then stops a key's actor in a task.
    fn begin_stop(
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

    fn stopped(
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

    fn kill(
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
    fn collect(&mut self, myself: &ActorRef<AllocatorMsg>) {
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

    fn entries(&self) -> Vec<(WorkspaceStatus, Option<Workspace>)> {
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

    fn disown(&mut self, keys: Vec<WorkspaceKey>) {
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

    fn drain(&mut self) -> Vec<(WorkspaceKey, Workspace)> {
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
