//! Where a session goes: attached here, routed to the owner, or, when the
//! owner's link is lost, taken over at its lease.
//!
//! [`Cluster::register`] reads the key's claim. If a live node other than
//! this one owns it and the link to it is up, the session is attached there
//! through its router and this node keeps the socket and a [`Route`]. If no
//! live node owns it, the local allocator activates (claiming the key) or
//! joins it. If the owner's link is lost (the node link closed, or the
//! owner missed its pings), nothing waits on it: when its lease runs out
//! within [`TAKEOVER_WAIT`] the connect waits for that and activates the
//! workspace here (the client sees a slower welcome); otherwise it is
//! answered `unavailable` at once with `retry_after_ms`, the time left on
//! the lease. Each wait happens at most once per connect.
//!
//! A register that fails says why in an [`AttachError`]: routing decides on
//! its variants (and the allocator's [`RegisterError`]), never on an error
//! code; the gateway turns it into what the client is told.
//!
//! This file never touches the workspace itself; it only decides where the
//! session is attached.

use std::time::Duration;

use ractor::ActorRef;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use super::links::LinkState;
use super::router::{router_of, servers_of};
use super::wire::{self, AttachReply, AttachRequest, DetachRequest, RouterMsg};
use super::{Cluster, Route};
use crate::allocator::RegisterError;
use crate::protocol::{ErrorCode, Event, OpError, SessionId};
use crate::storage::{StoreError, WorkspaceKey};
use crate::workspace::{AttachInfo, SessionInfo};

/// How long a register waits for a link to an owner this node has not
/// been connected to yet (membership dials every live node each round), and
/// then for the owner's router to become visible (process groups
/// synchronise a few ms after a link is ready).
const FIND_OWNER_WAIT: Duration = Duration::from_secs(1);

/// How long a connect may wait for a lost owner's lease to run out, so as
/// to take the workspace over itself; a longer wait is answered at once
/// with `retry_after_ms` instead. With the activation after it, a connect
/// answers within about 1.5 s either way.
pub const TAKEOVER_WAIT: Duration = Duration::from_secs(1);

/// Waited past a lease's end, so that the database (whose clock decides)
/// sees it run out too.
const LEASE_MARGIN: Duration = Duration::from_millis(50);

/// A live node other than this one that owns a key.
struct Owner {
    tag: String,
    /// How long until its lease runs out, unless it renews its heartbeat.
    lease_left: Duration,
}

/// A session attached to its workspace, here or on the owner.
pub struct Attachment {
    pub route: Route,
    pub welcome: AttachInfo,
    /// The server tag of the node serving the workspace.
    pub owner: String,
}

/// Why a session could not be attached to its workspace, here or on the
/// node that owns it.
#[derive(Debug, thiserror::Error)]
pub enum AttachError {
    /// Registering on this node failed.
    #[error(transparent)]
    Local(#[from] RegisterError),
    /// Reading the claim, the nodes or writing the session row failed.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// The owner is live by the database but this node has no link to it
    /// (lost, or not made yet). Its lease runs out in `retry_after`, unless
    /// it renews it.
    #[error(
        "workspace {key} is served by node {owner}, which this node cannot reach; retry in {} ms",
        .retry_after.as_millis()
    )]
    Unreachable {
        key: WorkspaceKey,
        owner: String,
        retry_after: Duration,
    },
    /// The owner did not answer the attach within the peer timeout.
    #[error("node {owner}, which serves workspace {key}, did not answer; retry")]
    NoAnswer { key: WorkspaceKey, owner: String },
    /// The owner refused the session (the error crossed the wire already in
    /// client terms), or its answer could not be read.
    #[error("{}", .0.message)]
    Owner(OpError),
}

/// The edge: what a client is told.
impl From<AttachError> for OpError {
    fn from(err: AttachError) -> Self {
        match err {
            AttachError::Local(err) => err.into(),
            AttachError::Store(err) => err.into(),
            AttachError::Owner(err) => err,
            AttachError::Unreachable { retry_after, .. } => {
                OpError::unavailable_for(err.to_string(), retry_after)
            }
            other => OpError::new(ErrorCode::Unavailable, other.to_string()),
        }
    }
}

impl Cluster {
    /// The live node other than this one that owns `key`, if any, with
    /// how long its lease has left (both by the database).
    async fn remote_owner(&self, key: &WorkspaceKey) -> Result<Option<Owner>, StoreError> {
        let Some(tag) = self.0.store.claim_of(key).await?.and_then(|c| c.server_tag) else {
            return Ok(None);
        };
        if tag == self.0.server_tag {
            return Ok(None);
        }
        let lease_ms = self.0.lease.as_millis() as i64;
        let age_ms = self
            .0
            .store
            .nodes_with_age()
            .await?
            .into_iter()
            .find(|(node, _)| node.server_tag == tag)
            .map(|(_, age_ms)| age_ms);
        Ok(age_ms
            .filter(|age_ms| *age_ms < lease_ms)
            .map(|age_ms| Owner {
                tag,
                lease_left: Duration::from_millis((lease_ms - age_ms.max(0)) as u64),
            }))
    }

    /// Attaches a session to its workspace wherever it is served, activating
    /// it here if no live node owns it (or once a lost owner's lease runs
    /// out, if that is within [`TAKEOVER_WAIT`]).
    pub async fn register(
        &self,
        session: SessionInfo,
        key: &WorkspaceKey,
        events: mpsc::Sender<Event>,
    ) -> Result<Attachment, AttachError> {
        let local = |registration: crate::allocator::Registration| Attachment {
            route: Route::Local {
                allocator: self.0.allocator.clone(),
                key: key.clone(),
                workspace: registration.workspace,
            },
            welcome: registration.welcome,
            owner: self.0.server_tag.clone(),
        };
        if self.0.node.is_none() {
            let registration = self.0.allocator.register(session, key, events).await?;
            return Ok(local(registration));
        }
        // Each wait below happens at most once, so a connect is answered
        // within about FIND_OWNER_WAIT or TAKEOVER_WAIT plus an activation.
        let mut waited = false;
        loop {
            let owner = match self.remote_owner(key).await? {
                Some(owner) => owner,
                None => match self
                    .0
                    .allocator
                    .register(session.clone(), key, events.clone())
                    .await
                {
                    Ok(registration) => return Ok(local(registration)),
                    // Another node claimed it first, or took it over while
                    // this one waited: join it there, if the claim names a
                    // live owner.
                    Err(err @ (RegisterError::HeldBy { .. } | RegisterError::Moved { .. })) => {
                        match self.remote_owner(key).await? {
                            Some(owner) => owner,
                            None => return Err(err.into()),
                        }
                    }
                    Err(err) => return Err(err.into()),
                },
            };
            match self.0.links.state(&owner.tag) {
                LinkState::Up(link) => {
                    return self
                        .register_remote(session, key, events, owner, link)
                        .await;
                }
                LinkState::Unknown if !waited => {
                    // Not connected yet (this node or the owner just
                    // started): membership is dialling it.
                    waited = true;
                    self.wait_for_link(&owner.tag, FIND_OWNER_WAIT).await;
                }
                _ if !waited && owner.lease_left + LEASE_MARGIN <= TAKEOVER_WAIT => {
                    // Lost, and its lease is about to run out: take over.
                    waited = true;
                    tokio::time::sleep(owner.lease_left + LEASE_MARGIN).await;
                }
                _ => {
                    return Err(AttachError::Unreachable {
                        key: key.clone(),
                        owner: owner.tag,
                        retry_after: owner.lease_left + LEASE_MARGIN,
                    });
                }
            }
        }
    }

    /// Waits until the link to `peer` is up, at most `wait`.
    async fn wait_for_link(&self, peer: &str, wait: Duration) {
        let deadline = tokio::time::Instant::now() + wait;
        while !matches!(self.0.links.state(peer), LinkState::Up(_))
            && tokio::time::Instant::now() < deadline
        {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    async fn register_remote(
        &self,
        session: SessionInfo,
        key: &WorkspaceKey,
        events: mpsc::Sender<Event>,
        owner: Owner,
        link: CancellationToken,
    ) -> Result<Attachment, AttachError> {
        let id = session.id.clone();
        self.0.outbound.add(key, &owner.tag, &id, events);
        let attached = self.attach_at(session, key, owner, link).await;
        if attached.is_err() {
            self.0.outbound.remove(key, &id);
            self.0.allocator.remove_session_row(&id).await;
        }
        attached
    }

    /// Attaches through the owner's router; a lost link ends the wait.
    async fn attach_at(
        &self,
        session: SessionInfo,
        key: &WorkspaceKey,
        owner: Owner,
        link: CancellationToken,
    ) -> Result<Attachment, AttachError> {
        let unreachable = |owner: &Owner| AttachError::Unreachable {
            key: key.clone(),
            owner: owner.tag.clone(),
            retry_after: owner.lease_left + LEASE_MARGIN,
        };
        self.0
            .allocator
            .record_routed_session(&session, key)
            .await?;
        let router = tokio::select! {
            router = find_router(key, &owner.tag) => router,
            _ = link.cancelled() => None,
        }
        .ok_or_else(|| unreachable(&owner))?;
        let request = AttachRequest {
            key: key.clone(),
            session,
            node: self.0.server_tag.clone(),
        };
        let called = tokio::select! {
            called = router.call(
                |reply| RouterMsg::Attach(wire::encode(&request), reply),
                Some(self.0.peer_timeout),
            ) => called,
            _ = link.cancelled() => return Err(unreachable(&owner)),
        };
        let bytes = match called {
            Ok(ractor::rpc::CallResult::Success(bytes)) => bytes,
            _ => {
                return Err(AttachError::NoAnswer {
                    key: key.clone(),
                    owner: owner.tag,
                });
            }
        };
        let welcome = wire::decode::<AttachReply>(&bytes, "attach reply")
            .and_then(|reply| reply)
            .map_err(AttachError::Owner)?;
        Ok(Attachment {
            route: Route::Remote {
                router,
                owner: owner.tag.clone(),
                key: key.clone(),
                timeout: self.0.peer_timeout,
                tasks: self.0.tasks.clone(),
                link,
            },
            welcome,
            owner: owner.tag,
        })
    }

    /// Detaches a session however it was attached, and removes its row.
    pub async fn deregister(&self, session: &SessionId, route: &Route) {
        match route {
            Route::Local { key, .. } => self.0.allocator.deregister(session, key).await,
            Route::Remote { router, key, .. } => {
                self.0.outbound.remove(key, session);
                let request = DetachRequest {
                    key: key.clone(),
                    session: session.clone(),
                    node: self.0.server_tag.clone(),
                };
                let _ = router.cast(RouterMsg::Detach(wire::encode(&request)));
                self.0.allocator.remove_session_row(session).await;
            }
        }
    }
}

/// The owner's router: the member of the key's group on the owner, or the
/// owner's router itself while its workspace is still starting. Waits a
/// little for process groups to catch up with a fresh connection.
async fn find_router(key: &WorkspaceKey, owner: &str) -> Option<ActorRef<RouterMsg>> {
    let deadline = tokio::time::Instant::now() + FIND_OWNER_WAIT;
    loop {
        if let Some(router) = router_of(owner) {
            let serving = servers_of(key);
            let chosen = serving
                .into_iter()
                .find(|s| s.get_id() == router.get_id())
                .unwrap_or(router);
            return Some(chosen);
        }
        if tokio::time::Instant::now() >= deadline {
            return None;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}
