//! Membership: which nodes this node is connected to, and keeping it true.
//!
//! The `nodes` table is the list of members: every node writes its row and
//! renews its heartbeat (the allocator does that). Each round (default every
//! second) this node
//! - connects to every live node it has no ready session with (and to the
//!   addresses of `BRANCHD_CLUSTER_DNS`), with a backoff per peer;
//! - drops sessions that did not become ready in time (a wrong cookie, a
//!   frozen peer that still accepts TCP) and sessions with peers whose
//!   heartbeat went stale;
//! - pings every ready peer's router and drops a peer that misses
//!   [`MISSED_PINGS`] in a row: ractor_cluster never notices a frozen peer
//!   whose socket stays open;
//! - removes the rows of nodes whose heartbeat is older than the lease
//!   (their sessions and claims), so their workspaces can be taken over and
//!   the session rows list only live sessions.
//!
//! When a peer is lost, sockets here routed to its workspaces are closed
//! (clients reconnect and land on the next owner) and its sessions attached
//! here are detached. Every connection comes from ractor_cluster's events;
//! this module only decides when to dial and when to hang up.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use ractor::{ActorId, ActorRef};
use ractor_cluster::node::{NodeServerSessionInformation, NodeSessionMessage};
use ractor_cluster::{NodeEventSubscription, NodeServerMessage};
use serde::Serialize;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use super::links::Links;
use super::router::router_of;
use super::routes::{Inbound, Outbound};
use super::wire::RouterMsg;
use crate::allocator::Allocator;
use crate::shutdown::Shutdown;
use crate::storage::{NodeRow, Store};

/// Pings a peer may miss in a row before it is disconnected.
pub const MISSED_PINGS: u32 = 3;
/// How long a new session has to authenticate and exchange state.
const READY_TIMEOUT: Duration = Duration::from_secs(3);
/// How long dialling a peer may take.
const DIAL_TIMEOUT: Duration = Duration::from_secs(2);
/// The longest wait between two dials of an unreachable peer.
const MAX_BACKOFF: Duration = Duration::from_secs(30);

/// What membership needs to know.
#[derive(Clone)]
pub struct MembershipSettings {
    pub server_tag: String,
    pub interval: Duration,
    pub lease: Duration,
    pub ping_timeout: Duration,
    /// Peers to dial besides the `nodes` table: `host:port` of a headless service.
    pub dns: Option<String>,
    /// This node's own cluster address, never dialled.
    pub own_addr: String,
    /// Mutual TLS for the links this node dials, when it is on.
    pub tls: Option<super::tls::ClusterTls>,
}

/// One session with a peer, as the ops view shows it.
#[derive(Debug, Clone, Serialize)]
pub struct PeerView {
    /// The peer's server tag, once it has told it.
    pub server_tag: Option<String>,
    pub addr: String,
    /// Authenticated and synchronised: calls and groups work.
    pub ready: bool,
    /// Whether the peer dialled us.
    pub inbound: bool,
    /// How long the session has been open, in ms.
    pub age_ms: u64,
    /// Pings missed in a row.
    pub missed_pings: u32,
}

struct Session {
    actor: ActorRef<NodeSessionMessage>,
    addr: String,
    name: Option<String>,
    ready: bool,
    inbound: bool,
    opened: Instant,
    missed_pings: u32,
    ping_in_flight: bool,
}

impl Session {
    fn opened(ses: NodeServerSessionInformation) -> Session {
        Session {
            actor: ses.actor,
            addr: ses.peer_addr,
            name: None,
            ready: false,
            inbound: ses.is_server,
            opened: Instant::now(),
            missed_pings: 0,
            ping_in_flight: false,
        }
    }
}

pub(super) enum Note {
    Opened(NodeServerSessionInformation),
    Ready(NodeServerSessionInformation),
    Disconnected(NodeServerSessionInformation),
    Pinged { session: ActorId, ok: bool },
}

/// Forwards ractor_cluster's node events into the membership task.
struct Subscription(mpsc::UnboundedSender<Note>);

impl NodeEventSubscription for Subscription {
    fn node_session_opened(&self, ses: NodeServerSessionInformation) {
        let _ = self.0.send(Note::Opened(ses));
    }
    fn node_session_disconnected(&self, ses: NodeServerSessionInformation) {
        let _ = self.0.send(Note::Disconnected(ses));
    }
    fn node_session_authenticated(&self, _ses: NodeServerSessionInformation) {}
    fn node_session_ready(&self, ses: NodeServerSessionInformation) {
        let _ = self.0.send(Note::Ready(ses));
    }
}

/// The server tag in a ractor node name (`tag@host`).
fn tag_of(name: &str) -> String {
    name.rsplit_once('@')
        .map(|(tag, _)| tag)
        .unwrap_or(name)
        .to_string()
}

/// The peers as last seen by the membership task.
#[derive(Clone, Default)]
pub struct PeerTable(Arc<Mutex<Vec<PeerView>>>);

impl PeerTable {
    pub fn snapshot(&self) -> Vec<PeerView> {
        self.0.lock().map(|v| v.clone()).unwrap_or_default()
    }
}

pub struct Membership {
    settings: MembershipSettings,
    store: Arc<dyn Store>,
    allocator: Allocator,
    server: ActorRef<NodeServerMessage>,
    outbound: Outbound,
    inbound: Inbound,
    sessions: HashMap<ActorId, Session>,
    /// Per address: when it may be dialled next, and the current backoff.
    dials: HashMap<String, (Instant, Duration)>,
    notes_tx: mpsc::UnboundedSender<Note>,
    view: PeerTable,
    links: Links,
    ping_counter: u64,
    /// Tracks the dials and pings (each bounded by its own timeout).
    tasks: Shutdown,
}

impl Membership {
    /// Subscribes to the node server's events and returns the task's state.
    #[allow(clippy::too_many_arguments)]
    pub(super) fn new(
        settings: MembershipSettings,
        store: Arc<dyn Store>,
        allocator: Allocator,
        server: ActorRef<NodeServerMessage>,
        outbound: Outbound,
        inbound: Inbound,
        view: PeerTable,
        links: Links,
        tasks: Shutdown,
    ) -> (Membership, mpsc::UnboundedReceiver<Note>) {
        let (notes_tx, notes) = mpsc::unbounded_channel();
        let _ = server.cast(NodeServerMessage::SubscribeToEvents {
            id: "branchd-membership".into(),
            subscription: Box::new(Subscription(notes_tx.clone())),
        });
        let membership = Membership {
            settings,
            store,
            allocator,
            server,
            outbound,
            inbound,
            sessions: HashMap::new(),
            dials: HashMap::new(),
            notes_tx,
            view,
            links,
            ping_counter: 0,
            tasks,
        };
        (membership, notes)
    }

    /// Runs rounds and handles node events until `stop` is cancelled
    /// (checked between rounds, so a round is never cut off halfway).
    pub(super) async fn run(
        mut self,
        mut notes: mpsc::UnboundedReceiver<Note>,
        stop: CancellationToken,
    ) {
        let mut tick = tokio::time::interval(self.settings.interval);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = stop.cancelled() => return,
                note = notes.recv() => match note {
                    Some(note) => self.note(note),
                    None => return,
                },
                _ = tick.tick() => self.round().await,
            }
            self.publish();
        }
    }

    fn note(&mut self, note: Note) {
        match note {
            Note::Opened(ses) => {
                self.sessions
                    .entry(ses.actor.get_id())
                    .or_insert_with(|| Session::opened(ses));
            }
            Note::Ready(ses) => {
                let name = ses.peer_name.as_ref().map(|n| tag_of(&n.name));
                let session = self
                    .sessions
                    .entry(ses.actor.get_id())
                    .or_insert_with(|| Session::opened(ses));
                session.ready = true;
                session.name = name.clone();
                let addr = session.addr.clone();
                self.dials.remove(&addr);
                if let Some(name) = &name {
                    self.links.up(name);
                }
                tracing::info!(peer = name.as_deref().unwrap_or("?"), %addr, "peer joined");
            }
            Note::Disconnected(ses) => {
                let id = ses.actor.get_id();
                let Some(gone) = self.sessions.remove(&id) else {
                    return;
                };
                let Some(name) = gone.name.filter(|_| gone.ready) else {
                    return;
                };
                let still = self
                    .sessions
                    .values()
                    .any(|s| s.ready && s.name.as_deref() == Some(name.as_str()));
                if !still {
                    self.lost(&name);
                }
            }
            Note::Pinged { session, ok } => {
                let Some(peer) = self.sessions.get_mut(&session) else {
                    return;
                };
                peer.ping_in_flight = false;
                if ok {
                    peer.missed_pings = 0;
                    return;
                }
                peer.missed_pings += 1;
                if peer.missed_pings >= MISSED_PINGS {
                    tracing::warn!(
                        peer = peer.name.as_deref().unwrap_or("?"),
                        missed = peer.missed_pings,
                        "peer stopped answering pings; disconnecting it"
                    );
                    peer.actor.stop(Some("missed pings".into()));
                }
            }
        }
    }

    /// A peer is gone: cut what depended on it.
    fn lost(&self, name: &str) {
        self.links.lost(name);
        let cut = self.outbound.drop_owner(name);
        let detached = self.inbound.take_node(name);
        for (session, key) in &detached {
            self.allocator.deregister_remote(session, key);
        }
        tracing::warn!(
            peer = name,
            sockets_closed = cut,
            sessions_detached = detached.len(),
            "peer lost"
        );
    }

    async fn round(&mut self) {
        let lease_ms = self.settings.lease.as_millis() as i64;
        // One read of the table per round: who is live, and who is dead.
        let (live, dead): (Vec<_>, Vec<_>) = match self.store.nodes_with_age().await {
            Ok(nodes) => nodes
                .into_iter()
                .partition(|(_, age_ms)| *age_ms < lease_ms),
            Err(err) => {
                tracing::warn!(error = %err, "reading the nodes failed");
                return;
            }
        };
        let live: Vec<NodeRow> = live.into_iter().map(|(node, _)| node).collect();
        let me = self.settings.server_tag.as_str();
        let mut wanted: Vec<(Option<String>, String)> = live
            .iter()
            .filter(|n| n.server_tag != me)
            .filter_map(|n| {
                n.cluster_addr
                    .clone()
                    .map(|addr| (Some(n.server_tag.clone()), addr))
            })
            .collect();
        if let Some(dns) = &self.settings.dns {
            match tokio::net::lookup_host(dns.as_str()).await {
                Ok(addrs) => wanted.extend(addrs.map(|a| (None, a.to_string()))),
                Err(err) => {
                    tracing::debug!(error = %err, %dns, "looking up the cluster DNS name failed")
                }
            }
        }

        let now = Instant::now();
        // Hang up on sessions that never became ready, and on peers whose
        // heartbeat is stale (they may be frozen; their lease runs out).
        for session in self.sessions.values() {
            let stale_peer = session.ready
                && session
                    .name
                    .as_ref()
                    .is_some_and(|name| !live.iter().any(|n| &n.server_tag == name));
            let never_ready = !session.ready && now.duration_since(session.opened) > READY_TIMEOUT;
            if stale_peer || never_ready {
                tracing::warn!(
                    peer = session.name.as_deref().unwrap_or("?"),
                    addr = %session.addr,
                    reason = if stale_peer { "heartbeat stale" } else { "not ready in time (wrong cookie?)" },
                    "disconnecting a peer"
                );
                session.actor.stop(Some("membership".into()));
            }
        }

        for (tag, addr) in wanted {
            if addr == self.settings.own_addr {
                continue;
            }
            let connected = self.sessions.values().any(|s| {
                tag.as_ref().is_some_and(|t| s.name.as_ref() == Some(t))
                    || (!s.inbound && s.addr == addr)
            });
            if connected {
                continue;
            }
            let (next, backoff) = self
                .dials
                .get(&addr)
                .copied()
                .unwrap_or((now, self.settings.interval));
            if now < next {
                continue;
            }
            self.dials.insert(
                addr.clone(),
                (now + backoff, (backoff * 2).min(MAX_BACKOFF)),
            );
            let (server, tls) = (self.server.clone(), self.settings.tls.clone());
            self.tasks.spawn(async move {
                let dial = async {
                    match &tls {
                        Some(tls) => tls.dial(&server, addr.as_str()).await,
                        None => ractor_cluster::client_connect(&server, addr.as_str())
                            .await
                            .map_err(anyhow::Error::from),
                    }
                };
                match tokio::time::timeout(DIAL_TIMEOUT, dial).await {
                    Ok(Ok(())) => {
                        tracing::debug!(peer = tag.as_deref().unwrap_or("?"), %addr, "dialled a peer")
                    }
                    Ok(Err(err)) => {
                        tracing::info!(peer = tag.as_deref().unwrap_or("?"), %addr, error = format!("{err:#}"), "dialling a peer failed; retrying with backoff")
                    }
                    Err(_) => {
                        tracing::info!(peer = tag.as_deref().unwrap_or("?"), %addr, "dialling a peer timed out; retrying with backoff")
                    }
                }
            });
        }

        self.ping();
        self.bury_dead_nodes(dead, lease_ms).await;
    }

    /// Pings every ready peer's router (one ping in flight per peer).
    fn ping(&mut self) {
        for (id, session) in self.sessions.iter_mut() {
            if !session.ready || session.ping_in_flight {
                continue;
            }
            let Some(name) = session.name.clone() else {
                continue;
            };
            session.ping_in_flight = true;
            self.ping_counter += 1;
            let (n, id, notes, timeout) = (
                self.ping_counter,
                *id,
                self.notes_tx.clone(),
                self.settings.ping_timeout,
            );
            self.tasks.spawn(async move {
                let ok = match router_of(&name) {
                    Some(router) => matches!(
                        router.call(|reply| RouterMsg::Ping(n, reply), Some(timeout)).await,
                        Ok(ractor::rpc::CallResult::Success(answer)) if answer == n
                    ),
                    None => false,
                };
                let _ = notes.send(Note::Pinged { session: id, ok });
            });
        }
    }

    /// Removes the rows of nodes whose heartbeat is older than the lease:
    /// their session rows go and their claims are released.
    async fn bury_dead_nodes(&self, dead: Vec<(NodeRow, i64)>, lease_ms: i64) {
        for (node, age_ms) in dead {
            if node.server_tag == self.settings.server_tag {
                continue;
            }
            match self
                .store
                .remove_node_if_stale(&node.server_tag, lease_ms)
                .await
            {
                Ok(true) => match self.store.wipe_server_tag(&node.server_tag).await {
                    Ok(report) => tracing::warn!(
                        node = %node.server_tag,
                        heartbeat_age_ms = age_ms,
                        sessions = report.sessions,
                        claims = report.claims,
                        "removed a dead node's rows"
                    ),
                    Err(err) => {
                        tracing::warn!(error = %err, node = %node.server_tag, "removing a dead node's rows failed")
                    }
                },
                Ok(false) => {}
                Err(err) => {
                    tracing::warn!(error = %err, node = %node.server_tag, "removing a dead node failed")
                }
            }
        }
    }

    fn publish(&self) {
        let now = Instant::now();
        let mut peers: Vec<PeerView> = self
            .sessions
            .values()
            .map(|s| PeerView {
                server_tag: s.name.clone(),
                addr: s.addr.clone(),
                ready: s.ready,
                inbound: s.inbound,
                age_ms: now.duration_since(s.opened).as_millis() as u64,
                missed_pings: s.missed_pings,
            })
            .collect();
        peers.sort_by(|a, b| (&a.server_tag, &a.addr).cmp(&(&b.server_tag, &b.addr)));
        if let Ok(mut view) = self.view.0.lock() {
            *view = peers;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::tag_of;

    #[test]
    fn a_node_name_yields_its_server_tag() {
        assert_eq!(tag_of("node-a@10.0.0.7"), "node-a");
        assert_eq!(tag_of("odd@tag@host"), "odd@tag");
        assert_eq!(tag_of("plain"), "plain");
    }
}
