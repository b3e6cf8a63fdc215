//! A session's route: where its requests go once it is attached, and how
//! their answers come back. Local routes cast to the workspace actor; remote
//! ones cast to the owner's router and wait for the answer in a tracked task,
//! which ends at once when the link to the owner is lost.
//!
//! Never waits inside `send`: the order of a connection's requests is kept
//! by the casts, the waiting happens beside them.

use std::time::Duration;

use ractor::ActorRef;
use tokio_util::sync::CancellationToken;

use super::wire::{self, OpReply, OpRequest, RouterMsg};
use crate::allocator::Allocator;
use crate::protocol::{ErrorCode, Op, OpError, SessionId};
use crate::shutdown::Shutdown;
use crate::storage::WorkspaceKey;
use crate::workspace::{Responder, Workspace, WorkspaceMsg};

/// Where a session's requests go.
#[derive(Clone)]
pub enum Route {
    /// The workspace lives on this node.
    Local {
        allocator: Allocator,
        key: WorkspaceKey,
        workspace: Workspace,
    },
    /// The workspace lives on `owner`; requests go through its router.
    Remote {
        router: ActorRef<RouterMsg>,
        owner: String,
        key: WorkspaceKey,
        timeout: Duration,
        /// Tracks the wait for each answer (at most `timeout`).
        tasks: Shutdown,
        /// Cancelled when the link to `owner` goes: waits end at once.
        link: CancellationToken,
    },
}

impl Route {
    /// Sends one op in order; its answer goes to `reply`. An op that cannot
    /// be delivered, whose owner's link is lost (before or while it waits),
    /// or whose owner does not answer within the peer timeout, is answered
    /// `unavailable`.
    pub fn send(&mut self, session: &SessionId, op: Op, reply: Responder) {
        match self {
            Route::Local {
                allocator,
                key,
                workspace,
            } => {
                // The live actor of the key (a new one after a restart).
                if let Some(current) = allocator.get(key) {
                    *workspace = current;
                }
                let _ = workspace.actor().cast(WorkspaceMsg::Op {
                    session: session.clone(),
                    op,
                    reply,
                });
            }
            Route::Remote {
                router,
                key,
                timeout,
                owner,
                tasks,
                link,
            } => {
                if link.is_cancelled() {
                    return reply.send(Err(went_away(owner)));
                }
                let request = OpRequest {
                    key: key.clone(),
                    session: session.clone(),
                    op,
                };
                let (port, answer) = ractor::concurrency::oneshot();
                // The cast keeps the order of a connection's requests; the
                // wait happens in a task of its own.
                if router
                    .cast(RouterMsg::Op(wire::encode(&request), port.into()))
                    .is_err()
                {
                    return;
                }
                let (timeout, owner, link) = (*timeout, owner.clone(), link.clone());
                tasks.spawn(async move {
                    let result = tokio::select! {
                        _ = link.cancelled() => Err(went_away(&owner)),
                        answered = tokio::time::timeout(timeout, answer) => match answered {
                            Ok(Ok(bytes)) => wire::decode::<OpReply>(&bytes, "op reply")
                                .and_then(|result| result),
                            Ok(Err(_)) => Err(went_away(&owner)),
                            Err(_) => Err(unavailable(format!(
                                "node {owner}, which serves this workspace, did not answer within {} ms; reconnect",
                                timeout.as_millis()
                            ))),
                        },
                    };
                    reply.send(result);
                });
            }
        }
    }
}

/// The answer to a request whose owner's link is lost.
fn went_away(owner: &str) -> OpError {
    unavailable(format!(
        "node {owner}, which serves this workspace, went away; reconnect"
    ))
}

fn unavailable(message: impl Into<String>) -> OpError {
    OpError::new(ErrorCode::Unavailable, message)
}
