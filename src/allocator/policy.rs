//! When a crashed workspace is restarted, and when it is given up on.

use std::collections::VecDeque;
use std::time::{Duration, Instant};

/// At most `limit` restarts of one workspace within any `window`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RestartPolicy {
    pub limit: u32,
    pub window: Duration,
}

impl RestartPolicy {
    /// Records a crash at `now` in `history` (the key's recent restarts).
    /// `Ok` if it may restart; otherwise `Err` with the moment the window
    /// frees up again, until which the key stays failed.
    pub fn admit(&self, history: &mut VecDeque<Instant>, now: Instant) -> Result<(), Instant> {
        while history
            .front()
            .is_some_and(|at| now.duration_since(*at) >= self.window)
        {
            history.pop_front();
        }
        if history.len() >= self.limit as usize {
            let oldest = history.front().copied().unwrap_or(now);
            return Err(oldest + self.window);
        }
        history.push_back(now);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn restarts_are_limited_within_the_window_and_allowed_again_after_it() {
        let policy = RestartPolicy {
            limit: 3,
            window: Duration::from_secs(60),
        };
        let start = Instant::now();
        let mut history = VecDeque::new();
        for i in 0..3 {
            assert!(
                policy
                    .admit(&mut history, start + Duration::from_secs(i))
                    .is_ok()
            );
        }
        let until = policy
            .admit(&mut history, start + Duration::from_secs(10))
            .expect_err("a fourth crash within 60 s fails the key");
        assert_eq!(until, start + Duration::from_secs(60));
        // Once the first crash is older than the window, one more restart is allowed.
        assert!(
            policy
                .admit(&mut history, start + Duration::from_secs(61))
                .is_ok()
        );
    }

    #[test]
    fn a_zero_limit_never_restarts() {
        let policy = RestartPolicy {
            limit: 0,
            window: Duration::from_secs(1),
        };
        assert!(policy.admit(&mut VecDeque::new(), Instant::now()).is_err());
    }
}
