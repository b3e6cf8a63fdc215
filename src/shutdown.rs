//! Shutdown as a value: the signal every long-lived task listens to, and
//! the one record of which of them are still running.
//!
//! This is mini-redis's `shutdown.rs` in library form. A [`Shutdown`] is
//! cloned into every part of the node; each long-lived task (a socket, the
//! heartbeat, membership, the token purge, a background save) is spawned
//! through it, so the [`TaskTracker`] knows it, and ends by itself when its
//! token is cancelled, so it can finish what it was writing.
//!
//! Two moments, because a node stops in two steps:
//! - **drain** ([`Shutdown::draining`]): stop taking work; readiness turns
//!   503, new sockets are refused, open ones are told to reconnect and close;
//! - **stop** ([`Shutdown::stopping`]): the background tasks end (heartbeat,
//!   membership, purge, the HTTP server). Stopping implies draining.
//!
//! Between the two the allocator saves every workspace, which needs the
//! heartbeat still running (a node that stops renewing stops writing).
//! [`Shutdown::wait`] then waits, within a deadline, for every tracked task.
//!
//! This module never decides what a task does when told, and it never
//! aborts one: a task that does not end in time is reported, not killed.

use std::future::Future;
use std::sync::Mutex;
use std::time::Duration;

use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tokio_util::task::task_tracker::TaskTrackerToken;

/// One node's shutdown signal and its tracked tasks. Clones share both.
#[derive(Debug, Clone)]
pub struct Shutdown {
    draining: CancellationToken,
    stopping: CancellationToken,
    tasks: TaskTracker,
}

impl Default for Shutdown {
    fn default() -> Self {
        Shutdown::new()
    }
}

impl Shutdown {
    pub fn new() -> Shutdown {
        let stopping = CancellationToken::new();
        Shutdown {
            // A child: stopping without a drain (a failed start) still ends
            // the sockets.
            draining: stopping.child_token(),
            stopping,
            tasks: TaskTracker::new(),
        }
    }

    /// Cancelled when the node begins to drain: take no new work.
    pub fn draining(&self) -> &CancellationToken {
        &self.draining
    }

    /// Cancelled when background tasks must end (after the drain).
    pub fn stopping(&self) -> &CancellationToken {
        &self.stopping
    }

    pub fn is_draining(&self) -> bool {
        self.draining.is_cancelled()
    }

    /// The record of running tasks, for tasks spawned by others (axum's
    /// upgrade hands us a future to run; its token keeps it counted).
    pub fn tracker(&self) -> &TaskTracker {
        &self.tasks
    }

    /// Runs a task the drain waits for. The task must watch one of the
    /// tokens (or be short) and end by itself.
    pub fn spawn<F>(&self, task: F) -> JoinHandle<F::Output>
    where
        F: Future + Send + 'static,
        F::Output: Send + 'static,
    {
        self.tasks.spawn(task)
    }

    /// Runs a loop until stopping; the loop is dropped at its next await
    /// point then, so it must hold nothing that a drop would leave half done.
    pub fn spawn_until_stopped<F>(&self, task: F) -> JoinHandle<()>
    where
        F: Future<Output = ()> + Send + 'static,
    {
        let stopping = self.stopping.clone();
        self.tasks.spawn(async move {
            stopping.run_until_cancelled(task).await;
        })
    }

    /// Spawns a long-lived loop that its owner stops at its own moment in
    /// the shutdown order (the heartbeat must outlive the saves; membership
    /// ends when the node leaves the cluster). The loop gets its own token,
    /// cancelled by [`Worker::stop`] or when the node stops, and should
    /// check it between units of work rather than be dropped inside one.
    pub fn spawn_worker<F>(&self, task: impl FnOnce(CancellationToken) -> F) -> Worker
    where
        F: Future<Output = ()> + Send + 'static,
    {
        let stop = self.stopping.child_token();
        let handle = self.tasks.spawn(task(stop.clone()));
        Worker {
            stop,
            handle: Mutex::new(Some(handle)),
        }
    }

    /// A set of tasks one part of the node waits for by itself (a drain
    /// waits for the saves under way before it removes the node's rows),
    /// still counted by the node's tracker.
    pub fn group(&self) -> TaskGroup {
        TaskGroup {
            node: self.tasks.clone(),
            own: TaskTracker::new(),
        }
    }

    /// Readiness 503, no new sockets, open ones told to reconnect.
    pub fn begin_drain(&self) {
        self.draining.cancel();
    }

    /// Every background task is told to end.
    pub fn begin_stop(&self) {
        self.stopping.cancel();
    }

    /// Waits until every tracked task has ended, for at most `within`.
    /// No new task may be tracked afterwards. `Err` holds how many are
    /// still running when the time is up.
    pub async fn wait(&self, within: Duration) -> Result<(), usize> {
        wait_for(&self.tasks, within).await
    }
}

/// A long-lived loop with its own stop token (see [`Shutdown::spawn_worker`]).
#[derive(Debug)]
pub struct Worker {
    stop: CancellationToken,
    handle: Mutex<Option<JoinHandle<()>>>,
}

impl Worker {
    /// Tells the loop to end, without waiting (a crash, for tests).
    pub fn cancel(&self) {
        self.stop.cancel();
    }

    /// Tells the loop to end and waits for the unit of work in flight, for
    /// at most `within`; `false` if it had not ended by then.
    pub async fn stop(&self, within: Duration) -> bool {
        self.stop.cancel();
        let handle = self.handle.lock().ok().and_then(|mut h| h.take());
        match handle {
            Some(handle) => tokio::time::timeout(within, handle).await.is_ok(),
            None => true,
        }
    }
}

/// Tasks counted twice: in their own group and in the node's tracker.
#[derive(Debug, Clone)]
pub struct TaskGroup {
    node: TaskTracker,
    own: TaskTracker,
}

/// Keeps a task counted in its group and the node until dropped.
#[derive(Debug)]
pub struct TaskToken {
    _own: TaskTrackerToken,
    _node: TaskTrackerToken,
}

impl TaskGroup {
    pub fn spawn<F>(&self, task: F) -> JoinHandle<F::Output>
    where
        F: Future + Send + 'static,
        F::Output: Send + 'static,
    {
        self.node.spawn(self.own.track_future(task))
    }

    /// Counts a task that someone else runs (axum runs each upgraded
    /// socket), from now until the token is dropped.
    pub fn token(&self) -> TaskToken {
        TaskToken {
            _own: self.own.token(),
            _node: self.node.token(),
        }
    }

    /// Waits for this group's tasks only (see [`wait_for`]).
    pub async fn wait(&self, within: Duration) -> Result<(), usize> {
        wait_for(&self.own, within).await
    }
}

/// Closes `tasks` and waits for them to end, for at most `within`; `Err`
/// holds how many are still running then.
pub async fn wait_for(tasks: &TaskTracker, within: Duration) -> Result<(), usize> {
    tasks.close();
    match tokio::time::timeout(within, tasks.wait()).await {
        Ok(()) => Ok(()),
        Err(_) => Err(tasks.len()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;
    use std::sync::atomic::{AtomicBool, Ordering};

    #[tokio::test]
    async fn wait_returns_only_after_a_told_task_has_finished_its_work() {
        let shutdown = Shutdown::new();
        let finished = Arc::new(AtomicBool::new(false));
        let (done, stopping) = (finished.clone(), shutdown.stopping().clone());
        shutdown.spawn(async move {
            stopping.cancelled().await;
            // Work after the signal (a last save): wait must cover it.
            tokio::time::sleep(Duration::from_millis(50)).await;
            done.store(true, Ordering::SeqCst);
        });
        shutdown.begin_stop();
        assert_eq!(shutdown.wait(Duration::from_secs(5)).await, Ok(()));
        assert!(finished.load(Ordering::SeqCst));
    }

    #[tokio::test]
    async fn stopping_implies_draining_but_not_the_other_way_round() {
        let shutdown = Shutdown::new();
        shutdown.begin_drain();
        assert!(shutdown.is_draining());
        assert!(!shutdown.stopping().is_cancelled());
        let other = Shutdown::new();
        other.begin_stop();
        assert!(other.is_draining());
    }

    #[tokio::test]
    async fn a_task_that_ignores_the_signal_is_reported_not_killed() {
        let shutdown = Shutdown::new();
        let (release, hold) = tokio::sync::oneshot::channel::<()>();
        let handle = shutdown.spawn(async move {
            let _ = hold.await;
        });
        shutdown.begin_stop();
        assert_eq!(shutdown.wait(Duration::from_millis(50)).await, Err(1));
        assert!(!handle.is_finished());
        let _ = release.send(());
        assert_eq!(shutdown.wait(Duration::from_secs(5)).await, Ok(()));
        let late = shutdown.spawn_until_stopped(std::future::pending());
        assert_eq!(shutdown.wait(Duration::from_secs(5)).await, Ok(()));
        assert!(late.is_finished());
    }

    #[tokio::test]
    async fn a_group_is_waited_for_alone_and_still_counted_by_the_node() {
        let shutdown = Shutdown::new();
        let group = shutdown.group();
        let token = group.token();
        assert_eq!(group.wait(Duration::from_millis(20)).await, Err(1));
        let worker = shutdown.spawn_worker(|stop| async move { stop.cancelled().await });
        drop(token);
        assert_eq!(group.wait(Duration::from_secs(5)).await, Ok(()));
        assert_eq!(shutdown.wait(Duration::from_millis(20)).await, Err(1));
        assert!(worker.stop(Duration::from_secs(5)).await);
        assert_eq!(shutdown.wait(Duration::from_secs(5)).await, Ok(()));
    }
}
