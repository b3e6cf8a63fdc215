//! The allocator: this node's supervisor of workspace actors.
//!
//! It keeps the registry (workspace key → live actor), the sessions
//! attached to each key (in memory: this is the reference count garbage
//! collection goes by), restarts crashed actors under a [`RestartPolicy`],
//! collects workspaces left without sessions for the grace period, and
//! drains everything on shutdown. At start it wipes the rows its server tag
//! left behind (a crash) and keeps the node's heartbeat fresh.
//!
//! The allocator actor decides; it never waits. Activation (claim + unpack),
//! saving and stopping run in tasks that report back with a message, so one
//! slow workspace never holds up registers of another. Those tasks and the
//! heartbeat are tracked by the node's [`Shutdown`]: a drain waits for the
//! saves under way before it releases the node's claims.
//!
//! The [`Allocator`] handle is the one owner of this node's session rows
//! (`websocket_sessions`, the cluster-wide record of who is connected
//! where): it writes and deletes them in the caller's task, for sessions
//! it serves and for sessions the cluster routes to another node alike.
//! Nothing counts the rows on a connect. [`Allocator::get`] reads a shared
//! map: no message, no database.
//!
//! Registers fail with a typed [`RegisterError`], never a bare error code:
//! callers decide by variant, and clients get an `OpError` at the edge.
//!
//! It must never touch sockets or HTTP, and never run git or file work.

mod actor;
mod error;
mod policy;

use std::collections::HashMap;
use std::sync::{Arc, OnceLock, RwLock};
use std::time::Duration;

use ractor::rpc::CallResult;
use ractor::{Actor, ActorRef, RpcReplyPort};
use serde::Serialize;
use tokio_util::sync::CancellationToken;

use crate::config::Config;
use crate::protocol::{LockInfo, OpError, SessionId};
use crate::shutdown::{Shutdown, TaskGroup, Worker};
use crate::storage::{Store, StoreError, WorkspaceKey, WsSession};
use crate::workspace::{
    AttachInfo, CALL_TIMEOUT, EventSink, SessionInfo, Workspace, WorkspaceMsg, WorkspaceSettings,
};
use actor::{AllocatorActor, AllocatorArgs, AllocatorMsg};
pub use error::RegisterError;
pub use policy::RestartPolicy;

/// What the allocator needs from the configuration.
#[derive(Debug, Clone)]
pub struct AllocatorSettings {
    pub server_tag: String,
    /// This node's HTTP address as others should reach it, for the `nodes` row.
    pub http_addr: Option<String>,
    /// This node's cluster address, for the `nodes` row (clustered nodes only).
    pub cluster_addr: Option<String>,
    pub lease: Duration,
    pub heartbeat_interval: Duration,
    pub gc_interval: Duration,
    pub idle_grace: Duration,
    pub restart: RestartPolicy,
    pub drain_timeout: Duration,
}

impl AllocatorSettings {
    pub fn from_config(config: &Config) -> AllocatorSettings {
        AllocatorSettings {
            server_tag: config.server_tag(),
            http_addr: None,
            cluster_addr: None,
            lease: config.lease,
            heartbeat_interval: config.heartbeat_interval,
            gc_interval: config.gc_interval,
            idle_grace: config.idle_grace,
            restart: RestartPolicy {
                limit: config.restart_limit,
                window: config.restart_window,
            },
            drain_timeout: config.drain_timeout,
        }
    }
}

/// Told when a key gets a live actor on this node (`true`) and when it
/// loses it (`false`); called from the allocator actor, so it must not block.
pub type PublishHook = Arc<dyn Fn(&WorkspaceKey, bool) + Send + Sync>;

/// The shared read side of the registry: live workspaces by key, and whoever
/// wants to know when that changes (the cluster's routing).
#[derive(Default)]
struct RegistryInner {
    map: RwLock<HashMap<WorkspaceKey, Workspace>>,
    hook: OnceLock<PublishHook>,
}

type Registry = Arc<RegistryInner>;

/// A registered session's view of its workspace.
pub struct Registration {
    pub workspace: Workspace,
    pub welcome: AttachInfo,
}

/// One workspace as the allocator sees it, for the ops dashboard and tests.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct WorkspaceStatus {
    pub key: WorkspaceKey,
    /// `activating`, `active`, `stopping` or `failed`.
    pub state: &'static str,
    /// Sessions attached on this node (the reference count).
    pub ref_count: usize,
    pub sessions: Vec<SessionId>,
    pub lock: Option<LockInfo>,
    /// Changed since the last save.
    pub dirty: bool,
    /// ms since the epoch; absent while not active.
    pub last_activity: Option<i64>,
    /// Bytes of file contents it keeps in memory; 0 while not active.
    pub file_cache_bytes: u64,
    /// Restarts after crashes since this node started.
    pub restarts: u32,
    /// When garbage collection will stop it if no session comes (ms since
    /// the epoch); absent while sessions are attached.
    pub gc_deadline: Option<i64>,
    /// Why it is failed, for a failed key.
    pub failure: Option<String>,
}

/// Counters since start.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct AllocatorStats {
    /// Workspace actors started (first activations and restarts).
    pub activations: u64,
    pub restarts: u64,
    /// Workspaces stopped by garbage collection.
    pub collected: u64,
}

/// What a drain did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct DrainReport {
    /// Workspaces that had unsaved changes and were saved.
    pub saved: usize,
    /// Workspaces stopped with nothing to save.
    pub unchanged: usize,
    /// Workspaces that could not be saved in time (their unsaved work is lost).
    pub failed: usize,
}

/// The handle on this node's allocator.
#[derive(Clone)]
pub struct Allocator {
    actor: ActorRef<AllocatorMsg>,
    registry: Registry,
    store: Arc<dyn Store>,
    settings: Arc<AllocatorSettings>,
    heartbeat: Arc<Worker>,
    /// Activations, saves and stops under way.
    work: TaskGroup,
}

/// How long handle calls wait for the allocator actor itself.
const ALLOCATOR_TIMEOUT: Duration = Duration::from_secs(120);

/// The least a drain waits for a heartbeat renewal in flight, so that none
/// lands (announcing the node again) after the node's row was removed.
const HEARTBEAT_END_WAIT: Duration = Duration::from_secs(1);

impl Allocator {
    /// Wipes what this server tag left in the store, announces the node,
    /// starts its heartbeat and the allocator actor. Their tasks are
    /// tracked by `shutdown`, and end when it stops if not drained before.
    pub async fn start(
        store: Arc<dyn Store>,
        workspaces: WorkspaceSettings,
        settings: AllocatorSettings,
        shutdown: &Shutdown,
    ) -> Result<Allocator, StoreError> {
        let tag = settings.server_tag.clone();
        let wiped = store.wipe_server_tag(&tag).await?;
        tracing::info!(
            server_tag = %tag,
            sessions = wiped.sessions,
            claims = wiped.claims,
            "removed rows this server tag left behind"
        );
        announce(store.as_ref(), &settings).await?;
        let liveness = workspaces.liveness.clone();
        liveness.renewed();
        let registry: Registry = Arc::default();
        let settings = Arc::new(settings);
        let work = shutdown.group();
        let (actor, _) = Actor::spawn(
            None,
            AllocatorActor,
            AllocatorArgs {
                store: store.clone(),
                workspaces,
                settings: settings.clone(),
                registry: registry.clone(),
                work: work.clone(),
            },
        )
        .await
        .map_err(|e| StoreError::Internal(format!("starting the allocator: {e}")))?;
        let heartbeat = shutdown.spawn_worker({
            let (store, settings, actor) = (store.clone(), settings.clone(), actor.clone());
            |stop| heartbeat(store, settings, liveness, actor, stop)
        });
        Ok(Allocator {
            actor,
            registry,
            store,
            settings,
            heartbeat: Arc::new(heartbeat),
            work,
        })
    }

    pub fn server_tag(&self) -> &str {
        &self.settings.server_tag
    }

    async fn ask<T: Send + 'static>(
        &self,
        build: impl FnOnce(RpcReplyPort<T>) -> AllocatorMsg,
    ) -> Result<T, RegisterError> {
        match self.actor.call(build, Some(ALLOCATOR_TIMEOUT)).await {
            Ok(CallResult::Success(value)) => Ok(value),
            Ok(CallResult::Timeout) => Err(RegisterError::TimedOut),
            Ok(CallResult::SenderError) | Err(_) => Err(RegisterError::Stopped),
        }
    }

    /// Attaches a session to a workspace, activating it on first use, and
    /// records its row in the store.
    pub async fn register(
        &self,
        session: SessionInfo,
        key: &WorkspaceKey,
        events: impl Into<EventSink>,
    ) -> Result<Registration, RegisterError> {
        let row = self.session_row(&session, key);
        self.attach(session, key, events.into(), Some(row)).await
    }

    /// The row of a session whose socket is on this node.
    fn session_row(&self, session: &SessionInfo, key: &WorkspaceKey) -> WsSession {
        WsSession {
            id: session.id.clone(),
            user_id: session.user_id,
            key: key.clone(),
            server_tag: self.settings.server_tag.clone(),
            connected_at: 0,
        }
    }

    /// Records the row of a session whose socket is on this node while
    /// another node serves its workspace (the cluster routes it there).
    pub async fn record_routed_session(
        &self,
        session: &SessionInfo,
        key: &WorkspaceKey,
    ) -> Result<(), StoreError> {
        let row = self.session_row(session, key);
        self.store.attach_session(&row).await
    }

    /// Removes the row of a session whose socket is on this node. A failure
    /// is logged, not returned: the row goes with the next wipe of this
    /// server tag.
    pub async fn remove_session_row(&self, session: &SessionId) {
        if let Err(err) = self.store.detach_session(session).await {
            tracing::warn!(error = %err, session = %session, "removing a session row failed; the next wipe of this server tag removes it");
        }
    }

    /// Attaches a session whose socket is on another node (which recorded
    /// its row): it counts against garbage collection here like any other.
    pub async fn register_remote(
        &self,
        session: SessionInfo,
        key: &WorkspaceKey,
        events: EventSink,
    ) -> Result<Registration, RegisterError> {
        self.attach(session, key, events, None).await
    }

    /// Detaches a session registered with [`Allocator::register_remote`].
    pub fn deregister_remote(&self, session: &SessionId, key: &WorkspaceKey) {
        self.forget(session, key);
    }

    async fn attach(
        &self,
        session: SessionInfo,
        key: &WorkspaceKey,
        events: EventSink,
        row: Option<WsSession>,
    ) -> Result<Registration, RegisterError> {
        let mut attempts = 0;
        loop {
            attempts += 1;
            let registered = self
                .ask(|reply| AllocatorMsg::Register {
                    session: session.clone(),
                    key: key.clone(),
                    events: events.clone(),
                    reply,
                })
                .await
                .and_then(|answer| answer);
            let workspace = match registered {
                Ok(workspace) => workspace,
                Err(err) => {
                    if attempts > 1 {
                        // The first attempt wrote the session row: remove it.
                        self.undo(&session.id, key, row.is_some()).await;
                    }
                    return Err(err);
                }
            };
            if attempts == 1
                && let Some(row) = &row
                && let Err(err) = self.store.attach_session(row).await
            {
                self.forget(&session.id, key);
                return Err(RegisterError::Refused(err.into()));
            }
            match attach_to(&workspace, session.clone(), events.clone()).await {
                Ok(welcome) => return Ok(Registration { workspace, welcome }),
                // The actor died between the two steps: it is being
                // restarted, and registering again waits for that.
                Err(RegisterError::WorkspaceGone) if attempts < 3 => continue,
                Err(err) => {
                    self.undo(&session.id, key, row.is_some()).await;
                    return Err(err);
                }
            }
        }
    }

    async fn undo(&self, session: &SessionId, key: &WorkspaceKey, row: bool) {
        if row {
            self.deregister(session, key).await;
        } else {
            self.forget(session, key);
        }
    }

    fn forget(&self, session: &SessionId, key: &WorkspaceKey) {
        let _ = self.actor.cast(AllocatorMsg::Deregister {
            session: session.clone(),
            key: key.clone(),
        });
    }

    /// Detaches a session and removes its row.
    pub async fn deregister(&self, session: &SessionId, key: &WorkspaceKey) {
        self.forget(session, key);
        self.remove_session_row(session).await;
    }

    /// The live workspace for a key, if this node has one: a map read, no
    /// message and no database.
    pub fn get(&self, key: &WorkspaceKey) -> Option<Workspace> {
        self.registry
            .map
            .read()
            .ok()
            .and_then(|map| map.get(key).cloned())
    }

    /// Installs the hook told about every key that gains or loses its live
    /// actor here. Once per allocator; `false` if one was installed already.
    pub fn on_publish(&self, hook: PublishHook) -> bool {
        self.registry.hook.set(hook).is_ok()
    }

    /// Saves a workspace, then stops it (its sessions lose their events
    /// and must reconnect).
    pub async fn kill(&self, key: &WorkspaceKey) -> Result<(), OpError> {
        self.ask(|reply| AllocatorMsg::Kill {
            key: key.clone(),
            reply,
        })
        .await?
    }

    /// Clears a failed key, for the cluster (its database row) and on this
    /// node, so that it can be registered again. Whether it was failed in
    /// either place. Other nodes that hold it failed in memory are told by
    /// the cluster (`Cluster::reset`).
    pub async fn reset(&self, key: &WorkspaceKey) -> Result<bool, OpError> {
        let cleared = self.store.clear_failure(key).await?;
        let here = self.reset_here(key).await?;
        Ok(cleared || here)
    }

    /// Clears a key failed in this node's memory only.
    pub async fn reset_here(&self, key: &WorkspaceKey) -> Result<bool, OpError> {
        Ok(self
            .ask(|reply| AllocatorMsg::Reset {
                key: key.clone(),
                reply,
            })
            .await?)
    }

    pub async fn stats(&self) -> Result<AllocatorStats, OpError> {
        Ok(self.ask(|reply| AllocatorMsg::Stats { reply }).await?)
    }

    /// Every workspace this node knows, with what its actor reports.
    pub async fn workspaces(&self) -> Result<Vec<WorkspaceStatus>, OpError> {
        let entries = self.ask(|reply| AllocatorMsg::Entries { reply }).await?;
        let mut statuses = Vec::with_capacity(entries.len());
        for (mut status, workspace) in entries {
            if let Some(workspace) = workspace
                && let Ok(Ok(info)) =
                    tokio::time::timeout(Duration::from_secs(5), workspace.info()).await
            {
                status.lock = info.lock;
                status.dirty = info.dirty;
                status.last_activity = Some(info.last_activity);
                status.file_cache_bytes = info.file_cache_bytes;
            }
            statuses.push(status);
        }
        statuses.sort_by(|a, b| a.key.cmp(&b.key));
        Ok(statuses)
    }

    /// Stops taking registers, saves and stops every workspace (in parallel,
    /// within the drain timeout), waits for the saves and stops already
    /// under way (garbage collection, a kill), releases the node's claims
    /// and removes its rows. Registers afterwards answer `unavailable`.
    pub async fn drain(&self) -> DrainReport {
        let live = self
            .ask(|reply| AllocatorMsg::Drain { reply })
            .await
            .unwrap_or_default();
        let total = live.len();
        let saving = live.into_iter().map(|(key, workspace)| {
            self.work.spawn(async move {
                let saved = workspace.save().await;
                if let Err(err) = &saved {
                    tracing::error!(workspace = %key, error = %err.message, "saving during drain failed");
                }
                workspace.stop().await;
                saved.map(|(_, new)| new)
            })
        });
        let tasks: Vec<_> = saving.collect();
        let mut report = DrainReport::default();
        let deadline = tokio::time::Instant::now() + self.settings.drain_timeout;
        for task in tasks {
            match tokio::time::timeout_at(deadline, task).await {
                Ok(Ok(Ok(true))) => report.saved += 1,
                Ok(Ok(Ok(false))) => report.unchanged += 1,
                _ => report.failed += 1,
            }
        }
        // A save still running when the claims go would be refused by its
        // fence: the rows are removed only after the work under way ends.
        let left = deadline.saturating_duration_since(tokio::time::Instant::now());
        if let Err(running) = self.work.wait(left).await {
            tracing::warn!(running, "saves or stops still running at the drain timeout");
        }
        let left = deadline.saturating_duration_since(tokio::time::Instant::now());
        if !self.heartbeat.stop(left.max(HEARTBEAT_END_WAIT)).await {
            tracing::warn!("a heartbeat was still renewing when the drain removed the node's row");
        }
        let tag = &self.settings.server_tag;
        if let Err(err) = self.store.wipe_server_tag(tag).await {
            tracing::warn!(error = %err, "removing this node's rows during drain failed");
        }
        if let Err(err) = self.store.remove_node(tag).await {
            tracing::warn!(error = %err, "removing this node's row during drain failed");
        }
        tracing::info!(
            workspaces = total,
            saved = report.saved,
            unchanged = report.unchanged,
            failed = report.failed,
            "drained"
        );
        report
    }

    /// Stops the actors of keys this node no longer owns, without saving,
    /// and tells their sessions to reconnect.
    pub fn disown(&self, keys: Vec<WorkspaceKey>) {
        if !keys.is_empty() {
            let _ = self.actor.cast(AllocatorMsg::Disown { keys });
        }
    }

    /// Stops the allocator actor (after a drain).
    pub async fn stop(&self) {
        self.heartbeat.stop(HEARTBEAT_END_WAIT).await;
        let _ = self
            .actor
            .stop_and_wait(None, Some(ALLOCATOR_TIMEOUT))
            .await;
    }

    /// Ends the allocator without draining, leaving rows behind as a crash
    /// would. For tests of what a restarted node finds.
    pub fn abandon(&self) {
        self.heartbeat.cancel();
        self.actor.kill();
    }
}

/// Hands a session to the workspace actor. Asked directly rather than
/// through [`Workspace::attach`], so that an actor gone since it was handed
/// out (a crash: registering again waits for its restart) is told apart
/// from one that answered with an error.
async fn attach_to(
    workspace: &Workspace,
    session: SessionInfo,
    events: EventSink,
) -> Result<AttachInfo, RegisterError> {
    let called = workspace
        .actor()
        .call(
            |reply| WorkspaceMsg::Attach {
                session,
                events,
                reply: Some(reply),
            },
            Some(CALL_TIMEOUT),
        )
        .await;
    match called {
        Ok(CallResult::Success(answer)) => answer.map_err(RegisterError::Refused),
        Ok(CallResult::Timeout) => Err(RegisterError::WorkspaceTimedOut(CALL_TIMEOUT)),
        Ok(CallResult::SenderError) | Err(_) => Err(RegisterError::WorkspaceGone),
    }
}

async fn announce(store: &dyn Store, settings: &AllocatorSettings) -> Result<(), StoreError> {
    store
        .register_node(
            &settings.server_tag,
            settings.cluster_addr.as_deref(),
            settings.http_addr.as_deref(),
        )
        .await
        .map(|_| ())
}

/// Renews this node's heartbeat until `stop` is cancelled (checked between
/// renewals, so one is never cut off halfway), and marks every renewal in
/// `liveness` (workspaces stop writing when renewals stop: see
/// [`crate::workspace::Liveness`]). After each renewal it drops the actors
/// whose claim another node has taken over (this node was cut off or frozen
/// for longer than the lease).
async fn heartbeat(
    store: Arc<dyn Store>,
    settings: Arc<AllocatorSettings>,
    liveness: crate::workspace::Liveness,
    allocator: ActorRef<AllocatorMsg>,
    stop: CancellationToken,
) {
    let mut tick = tokio::time::interval(settings.heartbeat_interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tick.tick() => {}
        }
        let renewed = match store.heartbeat(&settings.server_tag).await {
            Ok(true) => true,
            Ok(false) => {
                tracing::warn!(
                    "this node's row vanished (it was taken for dead); announcing it again"
                );
                match announce(store.as_ref(), &settings).await {
                    Ok(()) => true,
                    Err(err) => {
                        tracing::warn!(error = %err, "announcing the node failed");
                        false
                    }
                }
            }
            Err(err) => {
                tracing::warn!(error = %err, silence_ms = liveness.silence().as_millis() as u64, "heartbeat failed");
                false
            }
        };
        if renewed {
            liveness.renewed();
            drop_lost_claims(store.as_ref(), &settings.server_tag, &allocator).await;
        }
    }
}

/// Stops the actors of keys whose claim (at the actor's epoch) this node no
/// longer holds. Reads what the node runs first, then the claims: an actor
/// is only active after its claim was written, so a fresh one is never
/// mistaken for a lost one.
async fn drop_lost_claims(store: &dyn Store, server_tag: &str, allocator: &ActorRef<AllocatorMsg>) {
    let held = match allocator
        .call(
            |reply| AllocatorMsg::Held { reply },
            Some(ALLOCATOR_TIMEOUT),
        )
        .await
    {
        Ok(CallResult::Success(held)) => held,
        _ => return,
    };
    if held.is_empty() {
        return;
    }
    let claims = match store.claims_of_node(server_tag).await {
        Ok(claims) => claims,
        Err(err) => {
            tracing::warn!(error = %err, "reading this node's claims failed");
            return;
        }
    };
    let lost: Vec<WorkspaceKey> = held
        .into_iter()
        .filter(|(key, epoch)| !claims.iter().any(|c| &c.key == key && c.epoch == *epoch))
        .map(|(key, _)| key)
        .collect();
    if !lost.is_empty() {
        let _ = allocator.cast(AllocatorMsg::Disown { keys: lost });
    }
}
