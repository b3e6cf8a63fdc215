//! The cluster: many nodes over one database, one owner per workspace.
//!
//! The database decides who owns a workspace (the claim row, see
//! `storage`); ractor_cluster carries requests between nodes. A socket may
//! land on any node. [`attach`] decides where its session goes (here, the
//! owner, or, when the owner is lost, here once its lease runs out), and
//! [`route`] carries its requests there; other nodes reach this one
//! through its [`router`].
//!
//! [`membership`] keeps this node connected to every live node (a full
//! mesh: ractor_cluster does not pass on peers), hangs up on peers that are
//! stale or frozen, and removes the rows of dead nodes so their workspaces
//! can be taken over. [`links`] is what membership last saw of each peer
//! (up, lost, or never seen), so nothing waits on a peer known to be gone.
//! [`routes`] remembers who is attached across nodes so a lost peer closes
//! exactly the sockets that depended on it.
//!
//! Without a cookie (`BRANCHD_CLUSTER_COOKIE`) the node runs alone: no
//! listener, no routing, every key is served locally.
//!
//! This module never touches a working copy or the WebSocket itself; it
//! decides where a session's requests go and carries them there.

pub mod attach;
pub mod links;
pub mod membership;
pub mod route;
pub mod router;
pub mod routes;
pub mod tls;
pub mod wire;

use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use ractor::{Actor, ActorRef};
use ractor_cluster::{NodeServer, NodeServerMessage};
use serde::Serialize;

use crate::allocator::Allocator;
use crate::config::Config;
use crate::protocol::OpError;
use crate::shutdown::{Shutdown, Worker};
use crate::storage::{Backend, Failure, Store, StoreError, WorkspaceKey};
pub use attach::{AttachError, Attachment, TAKEOVER_WAIT};
use links::{LinkState, Links};
use membership::{Membership, MembershipSettings, PeerTable, PeerView};
pub use route::Route;
use router::{RouterActor, RouterState};
use routes::{Inbound, Outbound};
use wire::RouterMsg;

/// How long a reset waits for each peer's answer.
const RESET_WAIT: Duration = Duration::from_secs(2);

/// What an operator's reset did, cluster-wide.
#[derive(Debug, Clone, Serialize)]
pub struct ResetReport {
    /// Whether the workspace was failed anywhere (the database, or a node's memory).
    pub reset: bool,
    /// The nodes that held it failed in memory and forgot it.
    pub nodes: Vec<String>,
    /// Live nodes that could not be told (no link, or no answer in time).
    pub unreached: Vec<String>,
}

/// How long leaving the cluster waits for a membership round in flight and
/// for the node server to stop.
const LEAVE_WAIT: Duration = Duration::from_secs(5);

/// This node's part in the cluster (absent on a single node).
struct Node {
    server: ActorRef<NodeServerMessage>,
    router: ActorRef<RouterMsg>,
    membership: Worker,
    /// The TLS listener for node links, when mutual TLS is on.
    tls_listener: Option<Worker>,
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
    links: Links,
    node: Option<Node>,
    tasks: Shutdown,
}

/// The handle on this node's place in the cluster.
#[derive(Clone)]
pub struct Cluster(Arc<Inner>);

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
    /// Workspaces failed for the whole cluster (after repeated crashes),
    /// until their window ends or an operator resets them.
    pub failed: Vec<Failure>,
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
        let (outbound, inbound, peers, links) = (
            Outbound::default(),
            Inbound::default(),
            PeerTable::default(),
            Links::default(),
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
                        links.clone(),
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
            links,
            node,
            tasks: shutdown.clone(),
        })))
    }

    pub fn server_tag(&self) -> &str {
        &self.0.server_tag
    }

    /// Nodes, peers and who owns what.
    pub async fn view(&self) -> Result<ClusterView, StoreError> {
        let lease_ms = self.0.lease.as_millis() as i64;
        let nodes = self.0.store.nodes_with_age().await?;
        let claims = self.0.store.owned_claims().await?;
        let peers = self.0.peers.snapshot();
        let failed = self.0.store.failures().await?;
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
            failed,
        })
    }

    /// An operator's reset of a failed workspace, for the whole cluster: its
    /// database row goes, this node forgets it, and so does every node this
    /// one has a link to. Says where it was failed and which live nodes
    /// could not be told (they forget it when its window ends).
    pub async fn reset(&self, key: &WorkspaceKey) -> Result<ResetReport, OpError> {
        let cleared = self.0.store.clear_failure(key).await?;
        let mut report = ResetReport {
            reset: cleared,
            nodes: Vec::new(),
            unreached: Vec::new(),
        };
        if self.0.allocator.reset_here(key).await? {
            report.nodes.push(self.0.server_tag.clone());
        }
        if self.0.node.is_some() {
            let lease_ms = self.0.lease.as_millis() as i64;
            for peer in self.0.store.live_nodes(lease_ms).await? {
                let tag = peer.server_tag;
                if tag == self.0.server_tag {
                    continue;
                }
                let told = match (self.0.links.state(&tag), router::router_of(&tag)) {
                    (LinkState::Up(_), Some(router)) => router
                        .call(
                            |reply| RouterMsg::Reset(wire::encode(key), reply),
                            Some(RESET_WAIT),
                        )
                        .await
                        .ok()
                        .and_then(|answer| match answer {
                            ractor::rpc::CallResult::Success(reset) => Some(reset),
                            _ => None,
                        }),
                    _ => None,
                };
                match told {
                    Some(true) => report.nodes.push(tag),
                    Some(false) => {}
                    None => report.unreached.push(tag),
                }
            }
        }
        report.reset |= !report.nodes.is_empty();
        Ok(report)
    }

    /// Leaves the cluster (after the allocator drained): peers see the
    /// sessions close and send their clients elsewhere.
    pub async fn stop(&self) {
        if let Some(node) = &self.0.node {
            if !node.membership.stop(LEAVE_WAIT).await {
                tracing::warn!("a membership round was still running when the node left");
            }
            if let Some(listener) = &node.tls_listener {
                listener.stop(LEAVE_WAIT).await;
            }
            node.router.stop(None);
            let _ = node
                .server
                .stop_and_wait(Some("shutting down".into()), Some(LEAVE_WAIT))
                .await;
        }
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
    links: Links,
    shutdown: &Shutdown,
) -> anyhow::Result<Node> {
    let tls = load_tls(config)?;
    // Fail with a clear message if the port is taken (the listener would
    // only log it).
    let bind = std::net::SocketAddr::new(config.cluster_bind, config.cluster_port);
    let listener = std::net::TcpListener::bind(bind)
        .with_context(|| format!("binding the cluster port {bind} (BRANCHD_CLUSTER_PORT)"))?;
    let host = config.advertise_host();
    let cluster_addr = config.advertise_cluster();
    // With TLS, node links come in through this node's own listener (see
    // `tls`) and the node server listens on a loopback port only, with
    // TLS required there too.
    let (port, listen_on, encryption) = match &tls {
        Some(tls) => (
            0,
            std::net::IpAddr::from([127, 0, 0, 1]),
            Some(ractor_cluster::IncomingEncryptionMode::Tls(tls.acceptor())),
        ),
        None => (config.cluster_port, config.cluster_bind, None),
    };
    let node_server = NodeServer::new(
        port,
        cookie.to_string(),
        server_tag.to_string(),
        host.clone(),
        encryption,
        Some(ractor_cluster::node::NodeConnectionMode::Isolated),
    )
    .with_listen_addr(listen_on)
    .with_max_inbound_frame_size(config.max_frame.saturating_mul(2).max(1 << 20));
    let tls_listener = match &tls {
        Some(_) => {
            listener
                .set_nonblocking(true)
                .context("setting up the cluster listener")?;
            Some(
                tokio::net::TcpListener::from_std(listener)
                    .context("setting up the cluster listener")?,
            )
        }
        None => {
            drop(listener);
            None
        }
    };
    let (server, _) = Actor::spawn(None, node_server, ())
        .await
        .context("starting the cluster node server")?;
    let tls_listener = match (&tls, tls_listener) {
        (Some(tls), Some(listener)) => {
            let (tls, server, tasks) = (tls.clone(), server.clone(), shutdown.clone());
            Some(shutdown.spawn_worker(move |stop| async move {
                tls.listen(listener, server, tasks, stop).await
            }))
        }
        _ => None,
    };
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
        tls: tls.clone(),
    };
    let (membership, notes) = Membership::new(
        settings,
        store,
        allocator,
        server.clone(),
        outbound,
        inbound,
        peers,
        links,
        shutdown.clone(),
    );
    let membership = shutdown.spawn_worker(|stop| membership.run(notes, stop));
    tracing::info!(%cluster_addr, bind = %bind, tls = tls.is_some(), "cluster node started");
    Ok(Node {
        server,
        router,
        membership,
        tls_listener,
        cluster_addr,
    })
}

/// The node-link TLS settings: all three files, or none.
fn load_tls(config: &Config) -> anyhow::Result<Option<tls::ClusterTls>> {
    match (
        &config.cluster_tls_cert,
        &config.cluster_tls_key,
        &config.cluster_tls_ca,
    ) {
        (None, None, None) => Ok(None),
        (Some(cert), Some(key), Some(ca)) => tls::ClusterTls::load(cert, key, ca).map(Some),
        _ => anyhow::bail!(
            "mutual TLS between nodes needs all three of BRANCHD_CLUSTER_TLS_CERT, BRANCHD_CLUSTER_TLS_KEY and BRANCHD_CLUSTER_TLS_CA (or none of them)"
        ),
    }
}
