//! Whether this node may still write: self-fencing.
//!
//! A node's claims are valid while its heartbeat in the database is younger
//! than the lease. A node that cannot renew its heartbeat does not know
//! whether another node has taken its workspaces over, so it stops
//! accepting writes by itself once half the lease has passed without a
//! renewal, well before any other node may claim them. The epoch check in
//! the database is the hard guarantee; this keeps a cut-off node from even
//! trying. This type only keeps time: it must never touch the database.
//!
//! It reads the time from a [`Clock`]: the system's in a node, a
//! [`ManualClock`] in tests, which advance it past the fence instead of
//! sleeping.

use std::fmt;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

/// Where [`Liveness`] reads the time.
pub trait Clock: fmt::Debug + Send + Sync {
    fn now(&self) -> Instant;
}

/// The system's monotonic clock: what a node runs on.
#[derive(Debug, Clone, Copy, Default)]
pub struct SystemClock;

impl Clock for SystemClock {
    fn now(&self) -> Instant {
        Instant::now()
    }
}

/// A clock that moves only when [`advance`](ManualClock::advance)d, so a
/// test of self-fencing takes no wall time. Clones share one time.
#[derive(Debug, Clone)]
pub struct ManualClock {
    start: Instant,
    /// Milliseconds advanced since `start`.
    advanced: Arc<AtomicU64>,
}

impl ManualClock {
    pub fn new() -> ManualClock {
        ManualClock {
            start: Instant::now(),
            advanced: Arc::new(AtomicU64::new(0)),
        }
    }

    pub fn advance(&self, by: Duration) {
        self.advanced
            .fetch_add(by.as_millis() as u64, Ordering::Relaxed);
    }
}

impl Default for ManualClock {
    fn default() -> ManualClock {
        ManualClock::new()
    }
}

impl Clock for ManualClock {
    fn now(&self) -> Instant {
        self.start + Duration::from_millis(self.advanced.load(Ordering::Relaxed))
    }
}

/// The time of this node's last successful heartbeat, shared by the
/// heartbeat task (which renews it) and every workspace (which checks it).
#[derive(Debug, Clone)]
pub struct Liveness {
    clock: Arc<dyn Clock>,
    origin: Instant,
    /// Milliseconds after `origin` of the last renewal.
    renewed: Arc<AtomicU64>,
    /// Set by the first renewal: a workspace run without a heartbeat (a
    /// tool, a unit test) is never fenced.
    managed: Arc<AtomicBool>,
    /// How long without a renewal before writes stop.
    fence_after: Duration,
}

impl Liveness {
    /// A node that has just renewed, and stops writing `fence_after` after
    /// its last renewal, by the system clock.
    pub fn new(fence_after: Duration) -> Liveness {
        Liveness::with_clock(fence_after, Arc::new(SystemClock))
    }

    /// As [`Liveness::new`], reading the time from `clock`.
    pub fn with_clock(fence_after: Duration, clock: Arc<dyn Clock>) -> Liveness {
        Liveness {
            origin: clock.now(),
            clock,
            renewed: Arc::new(AtomicU64::new(0)),
            managed: Arc::new(AtomicBool::new(false)),
            fence_after,
        }
    }

    fn elapsed(&self) -> Duration {
        self.clock.now().saturating_duration_since(self.origin)
    }

    /// Records a successful heartbeat.
    pub fn renewed(&self) {
        let now = self.elapsed().as_millis() as u64;
        self.renewed.fetch_max(now, Ordering::Relaxed);
        self.managed.store(true, Ordering::Relaxed);
    }

    /// Time since the last successful heartbeat.
    pub fn silence(&self) -> Duration {
        let last = Duration::from_millis(self.renewed.load(Ordering::Relaxed));
        self.elapsed().saturating_sub(last)
    }

    /// Whether writes are allowed: the heartbeat is younger than the fence.
    pub fn writable(&self) -> bool {
        !self.managed.load(Ordering::Relaxed) || self.silence() < self.fence_after
    }

    /// How long writes stay allowed without another renewal; `None` when
    /// no heartbeat manages this node (no limit).
    pub fn writable_for(&self) -> Option<Duration> {
        self.managed
            .load(Ordering::Relaxed)
            .then(|| self.fence_after.saturating_sub(self.silence()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn manual(fence_after: Duration) -> (Liveness, ManualClock) {
        let clock = ManualClock::new();
        (
            Liveness::with_clock(fence_after, Arc::new(clock.clone())),
            clock,
        )
    }

    #[test]
    fn a_node_that_never_renewed_is_not_fenced() {
        let (liveness, clock) = manual(Duration::from_millis(30));
        clock.advance(Duration::from_secs(3600));
        assert!(liveness.writable(), "no heartbeat yet: not fenced");
    }

    #[test]
    fn the_time_left_to_write_shrinks_to_zero_at_the_fence() {
        let (liveness, clock) = manual(Duration::from_millis(1000));
        liveness.renewed();
        assert_eq!(liveness.writable_for(), Some(Duration::from_millis(1000)));
        clock.advance(Duration::from_millis(400));
        assert_eq!(liveness.writable_for(), Some(Duration::from_millis(600)));
        clock.advance(Duration::from_millis(700));
        assert_eq!(liveness.writable_for(), Some(Duration::ZERO));
        assert_eq!(Liveness::new(Duration::from_secs(1)).writable_for(), None);
    }

    #[test]
    fn writes_stop_at_the_fence_and_resume_on_renewal() {
        let (liveness, clock) = manual(Duration::from_millis(30));
        liveness.renewed();
        clock.advance(Duration::from_millis(29));
        assert!(liveness.writable(), "just inside the fence");
        assert_eq!(liveness.silence(), Duration::from_millis(29));
        clock.advance(Duration::from_millis(1));
        assert!(!liveness.writable(), "silent for the whole fence");
        liveness.renewed();
        assert!(liveness.writable());
        assert_eq!(liveness.silence(), Duration::ZERO);
    }

    #[test]
    fn clones_share_the_renewals_and_the_clock() {
        let (liveness, clock) = manual(Duration::from_millis(30));
        let workspace_side = liveness.clone();
        liveness.renewed();
        clock.clone().advance(Duration::from_millis(40));
        assert!(!workspace_side.writable());
        liveness.renewed();
        assert!(workspace_side.writable());
    }

    #[test]
    fn the_system_clock_starts_unfenced() {
        let liveness = Liveness::new(Duration::from_secs(60));
        liveness.renewed();
        assert!(liveness.writable());
    }
}
