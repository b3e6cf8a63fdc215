//! The edit lock of one workspace, as a plain value: who holds it, until
//! when, and the events each change of it causes.
//!
//! A lock is a lease (docs/architecture.md): it ends on release, on expiry or when its
//! holder leaves, and it never makes anyone wait. This type only decides:
//! it takes the time as an argument, sends nothing and starts no timer; the
//! actor broadcasts the events it returns and posts the expiry message.
//! That keeps every rule here testable without an actor or a clock.

use std::time::{Duration, Instant};

use crate::protocol::{Doer, ErrorCode, Event, LockInfo, OpError, SessionId};

/// The lock while someone holds it.
#[derive(Debug, Clone)]
struct Held {
    info: LockInfo,
    deadline: Instant,
    generation: u64,
}

/// A workspace's edit lock: free, or held by one session until a deadline.
#[derive(Debug, Default)]
pub struct EditLock {
    held: Option<Held>,
    /// Bumped on every take, so an expiry timer of an earlier take (the
    /// lock since renewed) is recognised and ignored.
    generation: u64,
}

/// A lock just taken or renewed: what to tell the taker, and when to
/// check for its expiry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Taken {
    pub info: LockInfo,
    /// Pass back to [`EditLock::expire`] when `ttl` has passed.
    pub generation: u64,
    pub ttl: Duration,
}

/// The limits on how long a lock may be asked for.
#[derive(Debug, Clone, Copy)]
pub struct LockLimits {
    /// Lifetime when the client names none.
    pub default_ttl: Duration,
    /// Longest lifetime a client may ask for.
    pub max_ttl: Duration,
}

impl EditLock {
    /// Who holds the lock now, if anyone (an expired lock may still show
    /// until the next [`EditLock::expire`]).
    pub fn info(&self) -> Option<&LockInfo> {
        self.held.as_ref().map(|h| &h.info)
    }

    /// Ends the lock if it has run out by `now` (only the one taken at
    /// `generation`, when given): the event to broadcast, if it ended.
    pub fn expire(&mut self, now: Instant, generation: Option<u64>) -> Option<Event> {
        let expired = self.held.as_ref().is_some_and(|held| {
            generation.is_none_or(|g| g == held.generation) && held.deadline <= now
        });
        if !expired {
            return None;
        }
        self.held = None;
        Some(Event::lock_changed(None, None))
    }

    /// `locked` if a session other than `session` holds a live lock at `now`.
    pub fn check(&self, session: &SessionId, now: Instant) -> Result<(), OpError> {
        match &self.held {
            Some(held) if &held.info.holder != session && held.deadline > now => {
                Err(locked_error(held, now))
            }
            _ => Ok(()),
        }
    }

    /// Takes or renews the lock for `by` for `ttl_ms` (the default when
    /// absent). `now_ms` is the wall clock, for the expiry clients see.
    pub fn take(
        &mut self,
        by: &Doer,
        ttl_ms: Option<u64>,
        limits: LockLimits,
        now: Instant,
        now_ms: i64,
    ) -> Result<(Taken, Event), OpError> {
        self.check(&by.session, now)?;
        let ttl = ttl_ms
            .map(Duration::from_millis)
            .unwrap_or(limits.default_ttl);
        if ttl.is_zero() || ttl > limits.max_ttl {
            return Err(OpError::bad_request(format!(
                "ttl_ms must be between 1 and {}",
                limits.max_ttl.as_millis()
            )));
        }
        self.generation += 1;
        let info = LockInfo {
            holder: by.session.clone(),
            user: by.user.clone(),
            expires_at: now_ms + ttl.as_millis() as i64,
        };
        self.held = Some(Held {
            info: info.clone(),
            deadline: now + ttl,
            generation: self.generation,
        });
        let event = Event::lock_changed(Some(&info), Some(by.clone()));
        Ok((
            Taken {
                info,
                generation: self.generation,
                ttl,
            },
            event,
        ))
    }

    /// Releases the lock on `by`'s request: the event to broadcast if it
    /// was held by `by`, nothing if it was free, `locked` if another
    /// session holds it (call [`EditLock::expire`] first, so a lock that
    /// has run out counts as free).
    pub fn release(&mut self, by: &Doer, now: Instant) -> Result<Option<Event>, OpError> {
        match &self.held {
            None => Ok(None),
            Some(held) if held.info.holder == by.session => {
                self.held = None;
                Ok(Some(Event::lock_changed(None, Some(by.clone()))))
            }
            Some(held) => Err(locked_error(held, now)),
        }
    }

    /// `session` left: the lock ends if it held it.
    pub fn holder_left(&mut self, session: &SessionId) -> Option<Event> {
        if self
            .held
            .as_ref()
            .is_some_and(|h| &h.info.holder == session)
        {
            self.held = None;
            return Some(Event::lock_changed(None, None));
        }
        None
    }
}

fn locked_error(held: &Held, now: Instant) -> OpError {
    OpError {
        lock: Some(Box::new(held.info.clone())),
        ..OpError::new(
            ErrorCode::Locked,
            format!(
                "{} holds the edit lock for another {:.1} s; wait, or ask them to unlock",
                held.info.user,
                held.deadline.saturating_duration_since(now).as_secs_f64()
            ),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const LIMITS: LockLimits = LockLimits {
        default_ttl: Duration::from_secs(30),
        max_ttl: Duration::from_secs(600),
    };

    fn doer(session: &str) -> Doer {
        Doer {
            session: session.into(),
            user: format!("user-{session}"),
        }
    }

    #[test]
    fn a_held_lock_refuses_others_until_it_expires() {
        let mut lock = EditLock::default();
        let t0 = Instant::now();
        let (taken, event) = lock
            .take(&doer("a"), Some(1_000), LIMITS, t0, 5_000)
            .expect("free lock");
        assert_eq!(taken.info.expires_at, 6_000);
        assert_eq!(
            event,
            Event::lock_changed(Some(&taken.info), Some(doer("a")))
        );
        lock.check(&"a".to_string(), t0)
            .expect("the holder may write");
        let err = lock
            .check(&"b".to_string(), t0)
            .expect_err("another session is locked out");
        assert_eq!(err.code, ErrorCode::Locked);
        assert_eq!(err.lock.as_deref(), Some(&taken.info));

        let later = t0 + Duration::from_millis(1_000);
        lock.check(&"b".to_string(), later)
            .expect("an expired lock refuses nobody");
        assert_eq!(
            lock.expire(later, Some(taken.generation)),
            Some(Event::lock_changed(None, None))
        );
        assert!(lock.info().is_none());
    }

    #[test]
    fn an_expiry_timer_of_a_renewed_lock_is_ignored() {
        let mut lock = EditLock::default();
        let t0 = Instant::now();
        let (first, _) = lock
            .take(&doer("a"), Some(100), LIMITS, t0, 0)
            .expect("take");
        let (second, _) = lock
            .take(&doer("a"), Some(10_000), LIMITS, t0, 0)
            .expect("renew");
        let at_first_deadline = t0 + Duration::from_millis(100);
        assert_eq!(lock.expire(at_first_deadline, Some(first.generation)), None);
        assert_eq!(lock.info(), Some(&second.info));
    }

    #[test]
    fn release_and_leaving_end_the_lock_only_for_its_holder() {
        let mut lock = EditLock::default();
        let t0 = Instant::now();
        assert_eq!(lock.release(&doer("a"), t0).expect("free"), None);
        lock.take(&doer("a"), None, LIMITS, t0, 0).expect("take");
        let err = lock.release(&doer("b"), t0).expect_err("not b's lock");
        assert_eq!(err.code, ErrorCode::Locked);
        assert_eq!(lock.holder_left(&"b".to_string()), None);
        assert_eq!(
            lock.holder_left(&"a".to_string()),
            Some(Event::lock_changed(None, None))
        );
        lock.take(&doer("a"), None, LIMITS, t0, 0).expect("take");
        assert_eq!(
            lock.release(&doer("a"), t0).expect("holder"),
            Some(Event::lock_changed(None, Some(doer("a"))))
        );
    }

    #[test]
    fn a_ttl_outside_the_limits_is_refused() {
        let mut lock = EditLock::default();
        let now = Instant::now();
        for ttl in [0, 600_001] {
            let err = lock
                .take(&doer("a"), Some(ttl), LIMITS, now, 0)
                .expect_err("out of range");
            assert_eq!(err.code, ErrorCode::BadRequest);
            assert_eq!(err.message, "ttl_ms must be between 1 and 600000");
        }
        assert!(lock.info().is_none());
    }
}
