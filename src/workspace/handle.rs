//! [`Workspace`]: the typed handle on a running workspace actor, for the
//! allocator, the cluster and tests. Every call has a time-out; a handle
//! never touches the working copy itself.

use std::time::Duration;

use ractor::rpc::CallResult;
use ractor::{Actor, ActorRef, RpcReplyPort, SpawnErr};

use super::actor::WorkspaceActor;
use super::events::EventSink;
use super::messages::{AttachInfo, SessionInfo, WorkspaceInfo, WorkspaceMsg};
use super::settings::WorkspaceArgs;
use crate::protocol::{ErrorCode, Op, OpError, OpResult, SessionId};

/// A handle on a running workspace actor: the typed way to talk to it.
#[derive(Clone)]
pub struct Workspace {
    actor: ActorRef<WorkspaceMsg>,
    timeout: Duration,
}

/// How long a caller waits for a workspace's answer before giving up.
pub const CALL_TIMEOUT: Duration = Duration::from_secs(120);

impl Workspace {
    /// Starts a workspace actor (unlinked) and waits until it is active.
    /// A branch with no snapshot is `not_found`.
    pub async fn start(
        args: WorkspaceArgs,
    ) -> Result<(Workspace, tokio::task::JoinHandle<()>), OpError> {
        match Actor::spawn(None, WorkspaceActor, args).await {
            Ok((actor, handle)) => Ok((Workspace::from_ref(actor), handle)),
            Err(err) => Err(startup_error(err)),
        }
    }

    /// Starts a workspace actor supervised by `supervisor` (which learns of
    /// its failures) and waits until it is active.
    pub async fn start_linked(
        args: WorkspaceArgs,
        supervisor: ractor::ActorCell,
    ) -> Result<Workspace, OpError> {
        match Actor::spawn_linked(None, WorkspaceActor, args, supervisor).await {
            Ok((actor, _)) => Ok(Workspace::from_ref(actor)),
            Err(err) => Err(startup_error(err)),
        }
    }

    pub fn from_ref(actor: ActorRef<WorkspaceMsg>) -> Workspace {
        Workspace {
            actor,
            timeout: CALL_TIMEOUT,
        }
    }

    pub fn actor(&self) -> &ActorRef<WorkspaceMsg> {
        &self.actor
    }

    async fn ask<T: Send + 'static>(
        &self,
        build: impl FnOnce(RpcReplyPort<T>) -> WorkspaceMsg,
    ) -> Result<T, OpError> {
        match self.actor.call(build, Some(self.timeout)).await {
            Ok(CallResult::Success(value)) => Ok(value),
            Ok(CallResult::Timeout) => Err(OpError::new(
                ErrorCode::Unavailable,
                format!(
                    "the workspace did not answer within {} s; retry",
                    self.timeout.as_secs()
                ),
            )),
            Ok(CallResult::SenderError) | Err(_) => Err(OpError::new(
                ErrorCode::Unavailable,
                "the workspace stopped; reconnect",
            )),
        }
    }

    pub async fn attach(
        &self,
        session: SessionInfo,
        events: impl Into<EventSink>,
    ) -> Result<AttachInfo, OpError> {
        let events = events.into();
        self.ask(|reply| WorkspaceMsg::Attach {
            session,
            events,
            reply: Some(reply),
        })
        .await?
    }

    /// Attaches without waiting for the answer (re-attaching after a restart).
    pub fn reattach(&self, session: SessionInfo, events: EventSink) {
        let _ = self.actor.cast(WorkspaceMsg::Attach {
            session,
            events,
            reply: None,
        });
    }

    /// Saves if anything changed: the snapshot version and whether it is new.
    pub async fn save(&self) -> Result<(i64, bool), OpError> {
        self.ask(|reply| WorkspaceMsg::Save { reply }).await?
    }

    pub fn detach(&self, session: &SessionId) {
        let _ = self.actor.cast(WorkspaceMsg::Detach {
            session: session.clone(),
        });
    }

    pub async fn op(&self, session: &SessionId, op: Op) -> OpResult {
        self.ask(|reply| WorkspaceMsg::Op {
            session: session.clone(),
            op,
            reply: reply.into(),
        })
        .await?
    }

    pub async fn info(&self) -> Result<WorkspaceInfo, OpError> {
        self.ask(|reply| WorkspaceMsg::Info { reply }).await
    }

    /// Stops the actor after the messages already queued, and waits.
    pub async fn stop(&self) {
        let _ = self.actor.stop_and_wait(None, Some(self.timeout)).await;
    }
}

/// The client-facing error for an actor that failed to start.
fn startup_error(err: SpawnErr) -> OpError {
    match err {
        SpawnErr::StartupFailed(inner) => match inner.downcast::<OpError>() {
            Ok(op_error) => *op_error,
            Err(other) => OpError::internal("activating the workspace", other),
        },
        other => OpError::internal("activating the workspace", other),
    }
}
