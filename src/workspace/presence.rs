//! Who is in a workspace, as its sessions are told: a session that joins
//! gets the whole list once (`presence`); everyone gets the changes since
//! the last announcement (`presence_changed`), at most one every
//! [`PRESENCE_BATCH`].
//!
//! Sending everyone the whole list on every join cost O(n) per session per
//! join: 1,000 sockets joining one branch made 10 GB of event frames and
//! dropped most of them. Batched diffs cost O(1) per other session per
//! join. This module only keeps the books (plain values, no I/O); the
//! workspace sends what it says and schedules the tick.

use std::collections::BTreeMap;
use std::time::Duration;

use crate::protocol::{Doer, Event, SessionId};

/// The longest a join or leave waits to be announced; joins and leaves in
/// one such window go out as one `presence_changed`.
pub const PRESENCE_BATCH: Duration = Duration::from_millis(100);

/// The sessions last announced, and whether an announcement is due.
#[derive(Debug, Default)]
pub struct Presence {
    announced: BTreeMap<SessionId, Doer>,
    /// A tick is on its way: no other needs scheduling.
    scheduled: bool,
}

impl Presence {
    /// The whole list, sorted by session id, for a session that joins.
    pub fn everyone<'a>(sessions: impl Iterator<Item = Doer> + 'a) -> Event {
        let mut sessions: Vec<Doer> = sessions.collect();
        sessions.sort_by(|a, b| a.session.cmp(&b.session));
        Event::Presence { sessions }
    }

    /// Someone joined or left. True when the caller must schedule a tick
    /// ([`PRESENCE_BATCH`] from now) that calls [`Presence::announce`].
    pub fn changed(&mut self) -> bool {
        !std::mem::replace(&mut self.scheduled, true)
    }

    /// The tick: what changed since the last announcement, as one event,
    /// if anything did. `now` is everyone attached now.
    pub fn announce(&mut self, now: impl Iterator<Item = Doer>) -> Option<Event> {
        self.scheduled = false;
        let now: BTreeMap<SessionId, Doer> = now.map(|d| (d.session.clone(), d)).collect();
        let joined: Vec<Doer> = now
            .iter()
            .filter(|(id, _)| !self.announced.contains_key(*id))
            .map(|(_, d)| d.clone())
            .collect();
        let left: Vec<SessionId> = self
            .announced
            .keys()
            .filter(|id| !now.contains_key(*id))
            .cloned()
            .collect();
        self.announced = now;
        (!joined.is_empty() || !left.is_empty()).then_some(Event::PresenceChanged { joined, left })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn doer(id: &str) -> Doer {
        Doer {
            session: id.into(),
            user: format!("user-{id}"),
        }
    }

    #[test]
    fn joins_and_leaves_in_one_window_make_one_diff() {
        let mut presence = Presence::default();
        assert!(presence.changed(), "the first change schedules a tick");
        assert!(!presence.changed(), "later ones ride on it");
        let event = presence.announce([doer("a"), doer("b")].into_iter());
        assert_eq!(
            event,
            Some(Event::PresenceChanged {
                joined: vec![doer("a"), doer("b")],
                left: vec![],
            })
        );
        assert!(
            presence.changed(),
            "after a tick, the next change schedules one"
        );
        // c joins and leaves within the window: never announced.
        let event = presence.announce([doer("b"), doer("d")].into_iter());
        assert_eq!(
            event,
            Some(Event::PresenceChanged {
                joined: vec![doer("d")],
                left: vec!["a".into()],
            })
        );
        assert_eq!(presence.announce([doer("b"), doer("d")].into_iter()), None);
    }

    #[test]
    fn a_joiner_gets_everyone_sorted() {
        let event = Presence::everyone([doer("b"), doer("a")].into_iter());
        assert_eq!(
            event,
            Event::Presence {
                sessions: vec![doer("a"), doer("b")]
            }
        );
    }
}
