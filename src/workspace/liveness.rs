//! Whether this node may still write: self-fencing.
//!
//! A node's claims are valid while its heartbeat in the database is younger
//! than the lease. A node that cannot renew its heartbeat does not know
//! whether another node has taken its workspaces over, so it stops
//! accepting writes by itself once half the lease has passed without a
//! renewal, well before any other node may claim them. The epoch check in
//! the database is the hard guarantee; this keeps a cut-off node from even
//! trying. This type only keeps time: it must never touch the database.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

/// The time of this node's last successful heartbeat, shared by the
/// heartbeat task (which renews it) and every workspace (which checks it).
#[derive(Debug, Clone)]
pub struct Liveness {
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
    /// its last renewal.
    pub fn new(fence_after: Duration) -> Liveness {
        Liveness {
            origin: Instant::now(),
            renewed: Arc::new(AtomicU64::new(0)),
            managed: Arc::new(AtomicBool::new(false)),
            fence_after,
        }
    }

    /// Records a successful heartbeat.
    pub fn renewed(&self) {
        let now = self.origin.elapsed().as_millis() as u64;
        self.renewed.fetch_max(now, Ordering::Relaxed);
        self.managed.store(true, Ordering::Relaxed);
    }

    /// Time since the last successful heartbeat.
    pub fn silence(&self) -> Duration {
        let last = Duration::from_millis(self.renewed.load(Ordering::Relaxed));
        self.origin.elapsed().saturating_sub(last)
    }

    /// Whether writes are allowed: the heartbeat is younger than the fence.
    pub fn writable(&self) -> bool {
        !self.managed.load(Ordering::Relaxed) || self.silence() < self.fence_after
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn writes_stop_after_the_fence_and_resume_on_renewal() {
        let liveness = Liveness::new(Duration::from_millis(30));
        std::thread::sleep(Duration::from_millis(40));
        assert!(liveness.writable(), "no heartbeat yet: not fenced");
        liveness.renewed();
        assert!(liveness.writable());
        std::thread::sleep(Duration::from_millis(40));
        assert!(!liveness.writable());
        liveness.renewed();
        assert!(liveness.writable());
    }
}
