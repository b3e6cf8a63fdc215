//! The links to peers, as membership last saw them: which peers this node
//! has a ready session with, which it lost, and for each link a
//! token that is cancelled the moment the link goes.
//!
//! Routing reads it so that nothing waits on a peer that is known to be
//! gone: a connect for a workspace whose owner's link is down is answered
//! at once (or after the owner's lease runs out, if that is soon), and a
//! routed request in flight ends when its link's token is cancelled, not
//! when its timeout fires.
//!
//! Only membership writes it (from ractor_cluster's session events and its
//! own pings); everything else reads. A plain map behind a mutex, held for
//! microseconds; nothing here waits.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use tokio_util::sync::CancellationToken;

/// What this node knows of its link to one peer.
#[derive(Debug, Clone)]
pub enum LinkState {
    /// A ready session: calls and groups work. The token is cancelled when
    /// the link goes.
    Up(CancellationToken),
    /// The link was up and went (the session closed, or the peer stopped
    /// answering pings); not up again yet.
    Lost,
    /// Never connected since this node started (it may be dialling).
    Unknown,
}

enum Link {
    Up(CancellationToken),
    Lost,
}

/// This node's links, by peer server tag.
#[derive(Clone, Default)]
pub struct Links(Arc<Mutex<HashMap<String, Link>>>);

impl Links {
    /// A session with `peer` became ready. A link already up keeps its token.
    pub fn up(&self, peer: &str) {
        if let Ok(mut map) = self.0.lock()
            && !matches!(map.get(peer), Some(Link::Up(_)))
        {
            map.insert(peer.to_string(), Link::Up(CancellationToken::new()));
        }
    }

    /// The last ready session with `peer` ended: whatever waits on the link
    /// stops waiting.
    pub fn lost(&self, peer: &str) {
        if let Ok(mut map) = self.0.lock() {
            if let Some(Link::Up(token)) = map.get(peer) {
                token.cancel();
            }
            map.insert(peer.to_string(), Link::Lost);
        }
    }

    pub fn state(&self, peer: &str) -> LinkState {
        match self.0.lock().ok().as_ref().and_then(|map| map.get(peer)) {
            Some(Link::Up(token)) => LinkState::Up(token.clone()),
            Some(Link::Lost) => LinkState::Lost,
            None => LinkState::Unknown,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn losing_a_link_cancels_its_token_and_a_new_link_gets_a_fresh_one() {
        let links = Links::default();
        assert!(matches!(links.state("b"), LinkState::Unknown));
        links.up("b");
        let LinkState::Up(first) = links.state("b") else {
            panic!("b is up, got {:?}", links.state("b"));
        };
        links.up("b");
        let LinkState::Up(same) = links.state("b") else {
            panic!("b is still up, got {:?}", links.state("b"));
        };
        assert!(!first.is_cancelled());
        links.lost("b");
        assert!(first.is_cancelled() && same.is_cancelled());
        assert!(matches!(links.state("b"), LinkState::Lost));
        links.up("b");
        let LinkState::Up(second) = links.state("b") else {
            panic!("b is up again, got {:?}", links.state("b"));
        };
        assert!(!second.is_cancelled(), "a new link is not born cancelled");
    }
}
