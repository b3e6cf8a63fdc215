//! The router: this node's one actor that other nodes talk to.
//!
//! It stands for the node in the cluster in two ways. As the owner of
//! workspaces, it takes other nodes' sessions (attach, ops, detach) and
//! hands them to the local allocator and workspace actors; it is a member
//! of the process group `{project}:{branch}` (scope `git`) exactly while a
//! workspace of that key is live here. As the home of sockets, it takes
//! events relayed by owners elsewhere and fans them out to the local
//! sockets, and it answers pings so peers can tell a live node from a
//! frozen one.
//!
//! Why one router and not the workspace actors themselves: workspace
//! messages carry closures and channels (reply routes, event queues) that
//! cannot cross a network, and ractor_cluster announces every actor whose
//! messages can. One small serialisable front per node keeps the workspace
//! actor local and cheap.
//!
//! It never waits inside a handler: attaches run in tasks, ops are cast to
//! the workspace with a responder that answers the remote caller directly.

use std::sync::Arc;

use ractor::{Actor, ActorProcessingErr, ActorRef, RpcReplyPort};

use super::routes::{Inbound, Outbound};
use super::wire::{
    self, AttachReply, AttachRequest, DetachRequest, OpReply, OpRequest, RelayedEvent, RouterMsg,
};
use crate::allocator::Allocator;
use crate::protocol::{ErrorCode, Event, OpError};
use crate::shutdown::Shutdown;
use crate::storage::WorkspaceKey;
use crate::workspace::{Audience, EventSink, RemoteRelay, Responder, WorkspaceMsg};

pub struct RouterActor;

pub struct RouterState {
    pub allocator: Allocator,
    pub server_tag: String,
    pub outbound: Outbound,
    pub inbound: Inbound,
    /// Tracks the attach tasks, which may wait for an activation.
    pub tasks: Shutdown,
}

impl Actor for RouterActor {
    type Msg = RouterMsg;
    type State = RouterState;
    type Arguments = RouterState;

    async fn pre_start(
        &self,
        myself: ActorRef<RouterMsg>,
        state: RouterState,
    ) -> Result<RouterState, ActorProcessingErr> {
        ractor::pg::join_scoped(
            wire::NODE_SCOPE.to_string(),
            wire::router_group(&state.server_tag),
            vec![myself.get_cell()],
        );
        Ok(state)
    }

    async fn handle(
        &self,
        _myself: ActorRef<RouterMsg>,
        message: RouterMsg,
        state: &mut RouterState,
    ) -> Result<(), ActorProcessingErr> {
        match message {
            RouterMsg::Attach(bytes, reply) => state.attach(bytes, reply),
            RouterMsg::Op(bytes, reply) => state.op(bytes, reply),
            RouterMsg::Detach(bytes) => match wire::decode::<DetachRequest>(&bytes, "detach") {
                Ok(request) => {
                    state.inbound.remove(&request.node, &request.session);
                    state
                        .allocator
                        .deregister_remote(&request.session, &request.key);
                }
                Err(err) => tracing::warn!(error = %err.message, "dropping an unreadable detach"),
            },
            RouterMsg::Event(bytes) => match wire::decode::<RelayedEvent>(&bytes, "event") {
                Ok(relayed) => {
                    state
                        .outbound
                        .deliver(&relayed.key, &relayed.audience, &relayed.event)
                }
                Err(err) => tracing::warn!(error = %err.message, "dropping an unreadable event"),
            },
            RouterMsg::Ping(n, reply) => {
                let _ = reply.send(n);
            }
            RouterMsg::Reset(bytes, reply) => match wire::decode::<WorkspaceKey>(&bytes, "reset") {
                Ok(key) => {
                    let allocator = state.allocator.clone();
                    state.tasks.spawn(async move {
                        let reset = allocator.reset_here(&key).await.unwrap_or(false);
                        let _ = reply.send(reset);
                    });
                }
                Err(err) => tracing::warn!(error = %err.message, "dropping an unreadable reset"),
            },
        }
        Ok(())
    }
}

impl RouterState {
    fn attach(&self, bytes: Vec<u8>, reply: RpcReplyPort<Vec<u8>>) {
        let request = match wire::decode::<AttachRequest>(&bytes, "attach") {
            Ok(request) => request,
            Err(err) => {
                let _ = reply.send(wire::encode(&AttachReply::Err(err)));
                return;
            }
        };
        let (allocator, inbound) = (self.allocator.clone(), self.inbound.clone());
        self.tasks.spawn(async move {
            let AttachRequest { key, session, node } = request;
            let sink = EventSink::Remote(Arc::new(NodeRelay {
                node: node.clone(),
                key: key.clone(),
            }));
            let id = session.id.clone();
            // The wire edge: the calling node gets the error in client terms.
            let answer: AttachReply = allocator
                .register_remote(session, &key, sink)
                .await
                .map(|registration| registration.welcome)
                .map_err(OpError::from);
            if answer.is_ok() {
                inbound.add(&node, &id, &key);
            }
            if reply.send(wire::encode(&answer)).is_err() && answer.is_ok() {
                // The caller gave up (timeout, or its node went away).
                inbound.remove(&node, &id);
                allocator.deregister_remote(&id, &key);
            }
        });
    }

    fn op(&self, bytes: Vec<u8>, reply: RpcReplyPort<Vec<u8>>) {
        let answer = move |result: OpReply| {
            let _ = reply.send(wire::encode(&result));
        };
        let request = match wire::decode::<OpRequest>(&bytes, "op") {
            Ok(request) => request,
            Err(err) => return answer(Err(err)),
        };
        let Some(workspace) = self.allocator.get(&request.key) else {
            return answer(Err(OpError::new(
                ErrorCode::Unavailable,
                format!(
                    "workspace {} is no longer served by node {}; reconnect",
                    request.key, self.server_tag
                ),
            )));
        };
        // Undelivered (the actor just stopped), the responder answers
        // `unavailable` by itself when it is dropped.
        let _ = workspace.actor().cast(WorkspaceMsg::Op {
            session: request.session,
            op: request.op,
            reply: Responder::new(answer),
        });
    }
}

/// Finds a node's router, if this node is connected to it.
pub fn router_of(server_tag: &str) -> Option<ActorRef<RouterMsg>> {
    ractor::pg::get_scoped_members(
        &wire::NODE_SCOPE.to_string(),
        &wire::router_group(server_tag),
    )
    .into_iter()
    .next()
    .map(ActorRef::from)
}

/// The routers serving a workspace, as this node sees the group (which
/// also holds, on the serving node, the workspace actor itself).
pub fn servers_of(key: &WorkspaceKey) -> Vec<ActorRef<RouterMsg>> {
    ractor::pg::get_scoped_members(
        &wire::WORKSPACE_SCOPE.to_string(),
        &wire::workspace_group(key),
    )
    .into_iter()
    .filter(|member| member.is_message_type_of::<RouterMsg>() != Some(false))
    .map(ActorRef::from)
    .collect()
}

/// How an owner reaches another node's sessions of one workspace: once per
/// event, through that node's router.
struct NodeRelay {
    node: String,
    key: WorkspaceKey,
}

impl RemoteRelay for NodeRelay {
    fn node(&self) -> &str {
        &self.node
    }

    fn deliver(&self, audience: Audience, event: &Event) -> bool {
        let Some(router) = router_of(&self.node) else {
            return false;
        };
        let relayed = RelayedEvent {
            key: self.key.clone(),
            audience,
            event: event.clone(),
        };
        router
            .cast(RouterMsg::Event(wire::encode(&relayed)))
            .is_ok()
    }
}
