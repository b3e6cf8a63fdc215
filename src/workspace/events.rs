//! Where a session's events go.
//!
//! A session on this node has a bounded queue to its socket. A session on
//! another node (its socket is there, the workspace is here) is reached
//! through that node's relay: the workspace sends each event **once per
//! node**, naming who should get it, and the relay fans it out to its local
//! sockets. This module only describes the two kinds of sink; it must never
//! block: a sink that cannot take an event says so and the workspace
//! detaches the session.

use std::fmt;
use std::sync::Arc;

use serde::{Deserialize, Serialize};
use tokio::sync::mpsc;

use crate::protocol::{Event, SessionId};

/// Who, among a workspace's sessions on one node, should get an event.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Audience {
    /// Every session of the workspace on that node but this one (the doer).
    AllBut(Option<SessionId>),
    /// One session.
    Only(SessionId),
}

/// A path to another node's sessions of one workspace.
pub trait RemoteRelay: Send + Sync {
    /// The node's server tag: sessions with the same node share one delivery.
    fn node(&self) -> &str;
    /// Sends an event for the node's sessions of this workspace; `false` if
    /// the node cannot be reached (its sessions should be detached).
    fn deliver(&self, audience: Audience, event: &Event) -> bool;
}

/// Where one attached session's events go. Never waits.
#[derive(Clone)]
pub enum EventSink {
    /// A socket on this node, through a bounded queue.
    Local(mpsc::Sender<Event>),
    /// A socket on another node, through its relay.
    Remote(Arc<dyn RemoteRelay>),
}

impl fmt::Debug for EventSink {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            EventSink::Local(_) => f.write_str("EventSink::Local"),
            EventSink::Remote(relay) => write!(f, "EventSink::Remote({})", relay.node()),
        }
    }
}

impl From<mpsc::Sender<Event>> for EventSink {
    fn from(sender: mpsc::Sender<Event>) -> EventSink {
        EventSink::Local(sender)
    }
}

impl EventSink {
    /// Sends one event to one session; `false` if it could not be queued.
    pub fn send_to(&self, session: &SessionId, event: &Event) -> bool {
        match self {
            EventSink::Local(sender) => sender.try_send(event.clone()).is_ok(),
            EventSink::Remote(relay) => relay.deliver(Audience::Only(session.clone()), event),
        }
    }
}

/// Sends `event` to every session in `sessions` but `except`: local ones one
/// by one, remote ones once per node. Returns the sessions that could not
/// be reached (to be detached).
pub fn broadcast<'a>(
    sessions: impl Iterator<Item = (&'a SessionId, &'a EventSink)>,
    except: Option<&SessionId>,
    event: &Event,
) -> Vec<SessionId> {
    let mut unreachable = Vec::new();
    // Per remote node: its relay, the sessions it stands for, and whether any
    // of them is in the audience.
    let mut nodes: Vec<(Arc<dyn RemoteRelay>, Vec<SessionId>, bool)> = Vec::new();
    for (id, sink) in sessions {
        let included = Some(id) != except;
        match sink {
            EventSink::Local(sender) => {
                if included && sender.try_send(event.clone()).is_err() {
                    unreachable.push(id.clone());
                }
            }
            EventSink::Remote(relay) => {
                match nodes.iter_mut().find(|(r, _, _)| r.node() == relay.node()) {
                    Some((_, ids, any)) => {
                        ids.push(id.clone());
                        *any |= included;
                    }
                    None => nodes.push((relay.clone(), vec![id.clone()], included)),
                }
            }
        }
    }
    for (relay, ids, any) in nodes {
        if any && !relay.deliver(Audience::AllBut(except.cloned()), event) {
            unreachable.extend(ids);
        }
    }
    unreachable
}

#[cfg(test)]
mod tests {
    use std::sync::Mutex;

    use super::*;

    struct Recorder {
        node: String,
        got: Mutex<Vec<Audience>>,
    }

    impl RemoteRelay for Recorder {
        fn node(&self) -> &str {
            &self.node
        }
        fn deliver(&self, audience: Audience, _event: &Event) -> bool {
            if let Ok(mut got) = self.got.lock() {
                got.push(audience);
            }
            true
        }
    }

    #[test]
    fn remote_sessions_of_one_node_get_one_delivery() {
        let relay = Arc::new(Recorder {
            node: "b".into(),
            got: Mutex::default(),
        });
        let (local, mut received) = mpsc::channel(4);
        let sinks: Vec<(SessionId, EventSink)> = vec![
            ("l1".into(), EventSink::Local(local)),
            ("r1".into(), EventSink::Remote(relay.clone())),
            ("r2".into(), EventSink::Remote(relay.clone())),
        ];
        let event = Event::Presence { sessions: vec![] };
        let doer: SessionId = "r1".into();
        let unreachable = broadcast(sinks.iter().map(|(i, s)| (i, s)), Some(&doer), &event);
        assert!(unreachable.is_empty());
        assert_eq!(received.try_recv().ok(), Some(event));
        let got = relay.got.lock().map(|g| g.clone()).unwrap_or_default();
        assert_eq!(got, vec![Audience::AllBut(Some(doer))]);
    }
}
