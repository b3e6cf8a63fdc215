//! Who is attached across nodes, seen from this node.
//!
//! [`Outbound`]: sockets here whose workspace is served by another node; the
//! router fans relayed events out to them, and when the owner is lost their
//! queues are dropped, which closes the sockets with "reconnect".
//! [`Inbound`]: sessions whose socket is on another node, attached to a
//! workspace here; when that node is lost they are detached, so garbage
//! collection is not held up by sessions nobody has any more.
//!
//! Plain maps behind a mutex, held for microseconds; nothing here waits.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use tokio::sync::mpsc;

use crate::protocol::{Event, SessionId};
use crate::storage::WorkspaceKey;
use crate::workspace::Audience;

struct OutboundKey {
    owner: String,
    sessions: HashMap<SessionId, mpsc::Sender<Event>>,
}

/// Sockets on this node attached to workspaces served elsewhere.
#[derive(Clone, Default)]
pub struct Outbound(Arc<Mutex<HashMap<WorkspaceKey, OutboundKey>>>);

impl Outbound {
    pub fn add(
        &self,
        key: &WorkspaceKey,
        owner: &str,
        session: &SessionId,
        events: mpsc::Sender<Event>,
    ) {
        if let Ok(mut map) = self.0.lock() {
            let entry = map.entry(key.clone()).or_insert_with(|| OutboundKey {
                owner: owner.to_string(),
                sessions: HashMap::new(),
            });
            entry.owner = owner.to_string();
            entry.sessions.insert(session.clone(), events);
        }
    }

    pub fn remove(&self, key: &WorkspaceKey, session: &SessionId) {
        if let Ok(mut map) = self.0.lock()
            && let Some(entry) = map.get_mut(key)
        {
            entry.sessions.remove(session);
            if entry.sessions.is_empty() {
                map.remove(key);
            }
        }
    }

    /// Hands an event to the audience among this node's sessions of `key`.
    /// A session whose queue is full or closed is dropped from the table,
    /// which closes its socket (the client reconnects and resyncs).
    pub fn deliver(&self, key: &WorkspaceKey, audience: &Audience, event: &Event) {
        let Ok(mut map) = self.0.lock() else {
            return;
        };
        let Some(entry) = map.get_mut(key) else {
            return;
        };
        entry.sessions.retain(|id, sender| {
            let wanted = match audience {
                Audience::AllBut(except) => except.as_ref() != Some(id),
                Audience::Only(only) => only == id,
            };
            !wanted || sender.try_send(event.clone()).is_ok()
        });
    }

    /// Forgets every session routed to `owner`: their sockets close and
    /// their clients reconnect (to whichever node serves the key next).
    /// Returns how many sessions were cut.
    pub fn drop_owner(&self, owner: &str) -> usize {
        let Ok(mut map) = self.0.lock() else {
            return 0;
        };
        let mut cut = 0;
        map.retain(|_, entry| {
            if entry.owner == owner {
                cut += entry.sessions.len();
                false
            } else {
                true
            }
        });
        cut
    }

    /// (key, owner, sessions) for the ops view.
    pub fn summary(&self) -> Vec<(WorkspaceKey, String, usize)> {
        let Ok(map) = self.0.lock() else {
            return Vec::new();
        };
        let mut rows: Vec<_> = map
            .iter()
            .map(|(key, e)| (key.clone(), e.owner.clone(), e.sessions.len()))
            .collect();
        rows.sort();
        rows
    }
}

/// Sessions attached here whose sockets are on other nodes, by node.
#[derive(Clone, Default)]
pub struct Inbound(Arc<Mutex<HashMap<String, HashMap<SessionId, WorkspaceKey>>>>);

impl Inbound {
    pub fn add(&self, node: &str, session: &SessionId, key: &WorkspaceKey) {
        if let Ok(mut map) = self.0.lock() {
            map.entry(node.to_string())
                .or_default()
                .insert(session.clone(), key.clone());
        }
    }

    pub fn remove(&self, node: &str, session: &SessionId) {
        if let Ok(mut map) = self.0.lock()
            && let Some(sessions) = map.get_mut(node)
        {
            sessions.remove(session);
            if sessions.is_empty() {
                map.remove(node);
            }
        }
    }

    /// Takes every session of a lost node.
    pub fn take_node(&self, node: &str) -> Vec<(SessionId, WorkspaceKey)> {
        self.0
            .lock()
            .ok()
            .and_then(|mut map| map.remove(node))
            .map(|sessions| sessions.into_iter().collect())
            .unwrap_or_default()
    }

    /// Remote sessions attached here, per node, for the ops view.
    pub fn counts(&self) -> HashMap<String, usize> {
        self.0
            .lock()
            .map(|map| map.iter().map(|(n, s)| (n.clone(), s.len())).collect())
            .unwrap_or_default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn events_reach_the_audience_and_a_lost_owner_closes_its_sessions() {
        let outbound = Outbound::default();
        let key = WorkspaceKey::new(1, "main");
        let (a, mut a_rx) = mpsc::channel(4);
        let (b, mut b_rx) = mpsc::channel(4);
        outbound.add(&key, "node-b", &"a".to_string(), a);
        outbound.add(&key, "node-b", &"b".to_string(), b);
        let event = Event::Presence { sessions: vec![] };
        outbound.deliver(&key, &Audience::AllBut(Some("a".into())), &event);
        assert!(a_rx.try_recv().is_err(), "the doer is left out");
        assert_eq!(b_rx.try_recv().ok(), Some(event.clone()));
        outbound.deliver(&key, &Audience::Only("a".into()), &event);
        assert_eq!(a_rx.try_recv().ok(), Some(event));
        assert_eq!(outbound.drop_owner("node-b"), 2);
        assert!(a_rx.is_closed() || a_rx.try_recv().is_err());
        assert!(outbound.summary().is_empty());
    }
}
