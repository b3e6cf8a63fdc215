//! The cluster: many nodes over one database, one owner per workspace.
//!
//! The database decides who owns a workspace (the claim row, see
//! `storage`); ractor_cluster carries requests between nodes. A socket may
//! land on any node. [`Cluster::register`] looks at the key's claim: if a
//! live node other than this one owns it, the session is attached there,
//! through that node's router ([`router`]), and this node keeps only the
//! socket and a [`Route`] to the owner; otherwise the local allocator
//! activates (claiming the key) or joins the workspace here.
//!
//! [`membership`] keeps this node connected to every live node (a full
//! mesh: ractor_cluster does not pass on peers), hangs up on peers that are
//! stale or frozen, and removes the rows of dead nodes so their workspaces
//! can be taken over. [`routes`] remembers who is attached across nodes so a
//! lost peer closes exactly the sockets that depended on it.
//!
//! Without a cookie (`BRANCHD_CLUSTER_COOKIE`) the node runs alone: no
//! listener, no routing, every key is served locally.
//!
//! A register that fails says why in an [`AttachError`]: routing decides on
//! its variants (and the allocator's [`RegisterError`]), never on an error
//! code; the gateway turns it into what the client is told.
//!
//! This module never touches a working copy or the WebSocket itself; it
//! decides where a session's requests go and carries them there.

pub mod membership;
pub mod router;
pub mod routes;
pub mod wire;

use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use ractor::{Actor, ActorRef};
use ractor_cluster::{NodeServer, NodeServerMessage};
use serde::Serialize;
use tokio::sync::mpsc;

use crate::allocator::{Allocator, RegisterError};
use crate::config::Config;
use crate::protocol::{ErrorCode, Event, Op, OpError, SessionId};
use crate::shutdown::{Shutdown, Worker};
use crate::storage::{Backend, Store, StoreError, WorkspaceKey};
use crate::workspace::{AttachInfo, Responder, SessionInfo, Workspace, WorkspaceMsg};
use membership::{Membership, MembershipSettings, PeerTable, PeerView};
use router::{RouterActor, RouterState, router_of, servers_of};
use routes::{Inbound, Outbound};
use wire::{AttachReply, AttachRequest, DetachRequest, OpReply, OpRequest, RouterMsg};

/// How long a register waits for the owner's router to become visible
/// (process groups synchronise a few ms after a peer connects).
const FIND_OWNER_WAIT: Duration = Duration::from_secs(2);

/// How long leaving the cluster waits for a membership round in flight and
/// for the node server to stop.
const LEAVE_WAIT: Duration = Duration::from_secs(5);

/// This node's part in the cluster (absent on a single node).
struct Node {
    server: ActorRef<NodeServerMessage>,
    router: ActorRef<RouterMsg>,
    membership: Worker,
    cluster_addr: String,
}

struct Inner {
    allocator: Allocator,
    store: Arc<dyn Store>,
    server_tag: String,
    lease: Duration,
    peer_timeout: Duration,
    outbound: Outbound,
    inbound: Inbound,
    peers: PeerTable,
    node: Option<Node>,
    tasks: Shutdown,
}

/// The handle on this node's place in the cluster.
#[derive(Clone)]
pub struct Cluster(Arc<Inner>);

/// A session attached to its workspace, here or on the owner.
pub struct Attachment {
    pub route: Route,
    pub welcome: AttachInfo,
    /// The server tag of the node serving the workspace.
    pub owner: String,
}

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
    },
}

impl Route {
    /// Sends one op in order; its answer goes to `reply`. An op that cannot
    /// be delivered, or whose owner does not answer within the peer
    /// timeout, is answered `unavailable` (by the responder's drop).
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
            } => {
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
                let (timeout, owner) = (*timeout, owner.clone());
                tasks.spawn(async move {
                    let result = match tokio::time::timeout(timeout, answer).await {
                        Ok(Ok(bytes)) => {
                            wire::decode::<OpReply>(&bytes, "op reply").and_then(|result| result)
                        }
                        Ok(Err(_)) => Err(unavailable(format!(
                            "node {owner}, which serves this workspace, went away; reconnect"
                        ))),
                        Err(_) => Err(unavailable(format!(
                            "node {owner}, which serves this workspace, did not answer within {} ms; reconnect",
                            timeout.as_millis()
                        ))),
                    };
                    reply.send(result);
                });
            }
        }
    }
}

fn unavailable(message: impl Into<String>) -> OpError {
    OpError::new(ErrorCode::Unavailable, message)
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
    /// The owner is live by the database but this node has no session with it.
    #[error("workspace {key} is served by node {owner}, which this node cannot reach; retry")]
    Unreachable { key: WorkspaceKey, owner: String },
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
            other => unavailable(other.to_string()),
        }
    }
}

/// The cluster as one node sees it, for operators.
#[derive(Debug, Clone, Serialize)]
pub struct ClusterView {
    /// This node's server tag.
    pub node: String,
    pub clustered: bool,
    pub cluster_addr: Option<String>,
    pub lease_ms: u64,
    pub nodes: Vec<NodeView>,
    /// Sessions with other nodes, as ractor_cluster has them.
    pub peers: Vec<PeerView>,
    /// Sockets here whose workspace is served elsewhere, per workspace.
    pub routed_out: Vec<RoutedOut>,
}

#[derive(Debug, Clone, Serialize)]
pub struct NodeView {
    pub server_tag: String,
    pub cluster_addr: Option<String>,
    pub http_addr: Option<String>,
    pub heartbeat_age_ms: i64,
    /// Heartbeat younger than the lease.
    pub live: bool,
    /// This node has a ready session with it (always true for itself).
    pub connected: bool,
    /// Workspaces whose claim names it.
    pub workspaces: Vec<WorkspaceKey>,
    /// Its sessions attached to workspaces on this node.
    pub remote_sessions_here: usize,
}

#[derive(Debug, Clone, Serialize)]
pub struct RoutedOut {
    pub key: WorkspaceKey,
    pub owner: String,
    pub sessions: usize,
}

impl Cluster {
    /// Joins the cluster if a cookie is configured (starting the node
    /// server, the router and membership, whose tasks `shutdown` tracks);
    /// otherwise runs alone.
    pub async fn start(
        config: &Config,
        store: Arc<dyn Store>,
        allocator: Allocator,
        shutdown: &Shutdown,
    ) -> anyhow::Result<Cluster> {
        let server_tag = allocator.server_tag().to_string();
        let (outbound, inbound, peers) = (
            Outbound::default(),
            Inbound::default(),
            PeerTable::default(),
        );
        let node = match config.cluster_cookie.as_deref().filter(|c| !c.is_empty()) {
            None => None,
            Some(cookie) => {
                if store.backend() != Backend::Postgres {
                    anyhow::bail!(
                        "clustering needs a shared Postgres database: set BRANCHD_DATABASE_URL to postgres://…, or unset BRANCHD_CLUSTER_COOKIE to run a single node"
                    );
                }
                Some(
                    start_node(
                        config,
                        cookie,
                        &server_tag,
                        store.clone(),
                        allocator.clone(),
                        outbound.clone(),
                        inbound.clone(),
                        peers.clone(),
                        shutdown,
                    )
                    .await?,
                )
            }
        };
        Ok(Cluster(Arc::new(Inner {
            allocator,
            store,
            server_tag,
            lease: config.lease,
            peer_timeout: config.peer_timeout,
            outbound,
            inbound,
            peers,
            node,
            tasks: shutdown.clone(),
        })))
    }

    pub fn server_tag(&self) -> &str {
        &self.0.server_tag
    }

    /// The live node other than this one that owns `key`, if any.
    async fn remote_owner(&self, key: &WorkspaceKey) -> Result<Option<String>, StoreError> {
        let Some(owner) = self.0.store.claim_of(key).await?.and_then(|c| c.server_tag) else {
            return Ok(None);
        };
        if owner == self.0.server_tag {
            return Ok(None);
        }
        let lease_ms = self.0.lease.as_millis() as i64;
        let live = self.0.store.live_nodes(lease_ms).await?;
        Ok(live.iter().any(|n| n.server_tag == owner).then_some(owner))
    }

    /// Attaches a session to its workspace wherever it is served, activating
    /// it here if no live node owns it.
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
        let owner = match self.remote_owner(key).await? {
            Some(owner) => owner,
            None => match self
                .0
                .allocator
                .register(session.clone(), key, events.clone())
                .await
            {
                Ok(registration) => return Ok(local(registration)),
                // Another node claimed it first: join it there.
                Err(RegisterError::HeldBy { owner, .. }) => owner,
                // Another node took it over while this one waited: join
                // the new owner, if the claim names one yet.
                Err(err @ RegisterError::Moved { .. }) => match self.remote_owner(key).await? {
                    Some(owner) => owner,
                    None => return Err(err.into()),
                },
                Err(err) => return Err(err.into()),
            },
        };
        self.register_remote(session, key, events, owner).await
    }

    async fn register_remote(
        &self,
        session: SessionInfo,
        key: &WorkspaceKey,
        events: mpsc::Sender<Event>,
        owner: String,
    ) -> Result<Attachment, AttachError> {
        let id = session.id.clone();
        self.0.outbound.add(key, &owner, &id, events);
        let attached = self.attach_at(session, key, &owner).await;
        if attached.is_err() {
            self.0.outbound.remove(key, &id);
            self.0.allocator.remove_session_row(&id).await;
        }
        attached
    }

    async fn attach_at(
        &self,
        session: SessionInfo,
        key: &WorkspaceKey,
        owner: &str,
    ) -> Result<Attachment, AttachError> {
        self.0
            .allocator
            .record_routed_session(&session, key)
            .await?;
        let router = find_router(key, owner)
            .await
            .ok_or_else(|| AttachError::Unreachable {
                key: key.clone(),
                owner: owner.to_string(),
            })?;
        let request = AttachRequest {
            key: key.clone(),
            session,
            node: self.0.server_tag.clone(),
        };
        let called = router
            .call(
                |reply| RouterMsg::Attach(wire::encode(&request), reply),
                Some(self.0.peer_timeout),
            )
            .await;
        let bytes = match called {
            Ok(ractor::rpc::CallResult::Success(bytes)) => bytes,
            _ => {
                return Err(AttachError::NoAnswer {
                    key: key.clone(),
                    owner: owner.to_string(),
                });
            }
        };
        let welcome = wire::decode::<AttachReply>(&bytes, "attach reply")
            .and_then(|reply| reply)
            .map_err(AttachError::Owner)?;
        Ok(Attachment {
            route: Route::Remote {
                router,
                owner: owner.to_string(),
                key: key.clone(),
                timeout: self.0.peer_timeout,
                tasks: self.0.tasks.clone(),
            },
            welcome,
            owner: owner.to_string(),
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

    /// Nodes, peers and who owns what.
    pub async fn view(&self) -> Result<ClusterView, StoreError> {
        let lease_ms = self.0.lease.as_millis() as i64;
        let nodes = self.0.store.nodes_with_age().await?;
        let claims = self.0.store.owned_claims().await?;
        let peers = self.0.peers.snapshot();
        let remote_here = self.0.inbound.counts();
        let nodes = nodes
            .into_iter()
            .map(|(row, age)| {
                let tag = row.server_tag.clone();
                NodeView {
                    connected: tag == self.0.server_tag
                        || peers
                            .iter()
                            .any(|p| p.ready && p.server_tag.as_deref() == Some(tag.as_str())),
                    live: age < lease_ms,
                    heartbeat_age_ms: age,
                    workspaces: claims
                        .iter()
                        .filter(|c| c.server_tag.as_deref() == Some(tag.as_str()))
                        .map(|c| c.key.clone())
                        .collect(),
                    remote_sessions_here: remote_here.get(&tag).copied().unwrap_or(0),
                    cluster_addr: row.cluster_addr,
                    http_addr: row.http_addr,
                    server_tag: tag,
                }
            })
            .collect();
        Ok(ClusterView {
            node: self.0.server_tag.clone(),
            clustered: self.0.node.is_some(),
            cluster_addr: self.0.node.as_ref().map(|n| n.cluster_addr.clone()),
            lease_ms: lease_ms as u64,
            nodes,
            peers,
            routed_out: self
                .0
                .outbound
                .summary()
                .into_iter()
                .map(|(key, owner, sessions)| RoutedOut {
                    key,
                    owner,
                    sessions,
                })
                .collect(),
        })
    }

    /// Leaves the cluster (after the allocator drained): peers see the
    /// sessions close and send their clients elsewhere.
    pub async fn stop(&self) {
        if let Some(node) = &self.0.node {
            if !node.membership.stop(LEAVE_WAIT).await {
                tracing::warn!("a membership round was still running when the node left");
            }
            node.router.stop(None);
            let _ = node
                .server
                .stop_and_wait(Some("shutting down".into()), Some(LEAVE_WAIT))
                .await;
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

#[allow(clippy::too_many_arguments)]
async fn start_node(
    config: &Config,
    cookie: &str,
    server_tag: &str,
    store: Arc<dyn Store>,
    allocator: Allocator,
    outbound: Outbound,
    inbound: Inbound,
    peers: PeerTable,
    shutdown: &Shutdown,
) -> anyhow::Result<Node> {
    // Fail with a clear message if the port is taken (the listener would
    // only log it).
    let bind = std::net::SocketAddr::new(config.cluster_bind, config.cluster_port);
    drop(
        std::net::TcpListener::bind(bind)
            .with_context(|| format!("binding the cluster port {bind} (BRANCHD_CLUSTER_PORT)"))?,
    );
    let host = config.advertise_host();
    let cluster_addr = config.advertise_cluster();
    let node_server = NodeServer::new(
        config.cluster_port,
        cookie.to_string(),
        server_tag.to_string(),
        host.clone(),
        None,
        Some(ractor_cluster::node::NodeConnectionMode::Isolated),
    )
    .with_listen_addr(config.cluster_bind)
    .with_max_inbound_frame_size(config.max_frame.saturating_mul(2).max(1 << 20));
    let (server, _) = Actor::spawn(None, node_server, ())
        .await
        .context("starting the cluster node server")?;
    let (router, _) = Actor::spawn(
        None,
        RouterActor,
        RouterState {
            allocator: allocator.clone(),
            server_tag: server_tag.to_string(),
            outbound: outbound.clone(),
            inbound: inbound.clone(),
            tasks: shutdown.clone(),
        },
    )
    .await
    .context("starting the cluster router")?;
    // The router stands for this node's live workspaces in their groups.
    let member = router.get_cell();
    allocator.on_publish(Arc::new(move |key: &WorkspaceKey, live: bool| {
        let (scope, group) = (
            wire::WORKSPACE_SCOPE.to_string(),
            wire::workspace_group(key),
        );
        if live {
            ractor::pg::join_scoped(scope, group, vec![member.clone()]);
        } else {
            ractor::pg::leave_scoped(scope, group, vec![member.clone()]);
        }
    }));
    let settings = MembershipSettings {
        server_tag: server_tag.to_string(),
        interval: config.membership_interval,
        lease: config.lease,
        ping_timeout: config.membership_interval.max(Duration::from_millis(500)),
        dns: config
            .cluster_dns
            .clone()
            .filter(|d| !d.is_empty())
            .map(|d| {
                if d.contains(':') {
                    d
                } else {
                    format!("{d}:{}", config.cluster_port)
                }
            }),
        own_addr: cluster_addr.clone(),
    };
    let (membership, notes) = Membership::new(
        settings,
        store,
        allocator,
        server.clone(),
        outbound,
        inbound,
        peers,
        shutdown.clone(),
    );
    let membership = shutdown.spawn_worker(|stop| membership.run(notes, stop));
    tracing::info!(%cluster_addr, bind = %bind, "cluster node started");
    Ok(Node {
        server,
        router,
        membership,
        cluster_addr,
    })
}
