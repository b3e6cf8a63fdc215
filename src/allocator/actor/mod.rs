//! The allocator actor: the one place that decides, for this node, which
//! workspace actor serves a key, and when it starts, restarts and stops.
//!
//! Each key moves through [`Phase`](entry::Phase)s. Work that takes time (claiming and
//! activating, saving and stopping) runs in a task that reports back with
//! [`AllocatorMsg::Activated`] or [`AllocatorMsg::Stopped`]; a generation
//! number per key makes late reports from superseded tasks harmless. Every
//! such task runs in the allocator's [`TaskGroup`], which a drain waits for.
//!
//! This file holds the messages, the state and the dispatch; each job is a
//! child module with its own `impl AllocatorState`: [`entry`] (a key's
//! record and its phases), [`activation`] (registers and starting actors),
//! [`supervision`] (crashes, restarts, failed keys and their reset),
//! [`stop`] (saving and stopping: garbage collection and kills), [`drain`]
//! (giving keys up on shutdown or takeover) and [`status`] (what it
//! reports).
//!
//! It must never await inside a handler: anything slow goes to a task.

mod activation;
mod drain;
mod entry;
mod status;
mod stop;
mod supervision;

use std::collections::HashMap;
use std::sync::Arc;

use ractor::{Actor, ActorId, ActorProcessingErr, ActorRef, RpcReplyPort, SupervisionEvent};

use super::{AllocatorSettings, AllocatorStats, RegisterError, Registry, WorkspaceStatus};
use crate::protocol::{OpError, SessionId};
use crate::shutdown::TaskGroup;
use crate::storage::{Fence, Store, WorkspaceKey};
use crate::workspace::{EventSink, SessionInfo, Workspace, WorkspaceSettings};
use entry::Entry;

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
                let _ = reply.send(state.reset(&key));
            }
            AllocatorMsg::Stats { reply } => {
                let _ = reply.send(state.stats);
            }
            AllocatorMsg::Drain { reply } => {
                let _ = reply.send(state.drain());
            }
            AllocatorMsg::Disown { keys } => state.disown(keys),
            AllocatorMsg::Held { reply } => {
                let _ = reply.send(state.held());
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
