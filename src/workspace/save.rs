//! Saving a workspace: packing its working dir into a new snapshot while
//! the workspace goes on serving.
//!
//! [`SaveQueue`] is the decision alone, as a plain value: who waits for
//! which run, when a new run must start, who can be answered at once. The
//! rest of this module carries its decisions out for the actor: a run
//! copies the working dir by hard links (milliseconds, on the actor), then
//! packs and stores the copy in a task that reports back with
//! [`WorkspaceMsg::SaveDone`]. A save never holds the mailbox while it
//! packs or talks to the database.

use std::time::Instant;

use ractor::{ActorRef, RpcReplyPort};

use super::messages::{Responder, WorkspaceMsg};
use super::snapshot;
use super::state::{WorkspaceState, blocking};
use crate::protocol::{Doer, Event, OpError, Reply};
use crate::storage::NewSnapshot;

/// Who waits for a save, and how each is answered.
pub(super) enum SaveWaiter {
    /// The node (garbage collection, kill, drain, a handle's `save`).
    Node(RpcReplyPort<Result<(i64, bool), OpError>>),
    /// A session's `save` op; the other sessions hear `saved`.
    Session { reply: Responder, by: Doer },
    /// The autosave timer.
    Auto,
}

/// A save in progress: the journal position it covers and who waits.
#[derive(Debug)]
pub(super) struct Run<W> {
    pub journal_seq: i64,
    pub started: Instant,
    pub waiters: Vec<W>,
}

/// What to do about a request for a save.
#[derive(Debug, PartialEq, Eq)]
pub(super) enum Next<W> {
    /// Nothing changed since the last save: answer these with it.
    Unchanged(Vec<W>),
    /// Start a run covering every change so far, for these waiters.
    Start(Vec<W>),
    /// The waiter joined a run, or waits for the next one.
    Wait,
}

/// The save runs of one workspace: at most one at a time; a request that
/// the running one covers joins it, any other waits for the next run.
#[derive(Debug)]
pub(super) struct SaveQueue<W> {
    running: Option<Run<W>>,
    queued: Vec<W>,
}

impl<W> Default for SaveQueue<W> {
    fn default() -> Self {
        SaveQueue {
            running: None,
            queued: Vec::new(),
        }
    }
}

impl<W> SaveQueue<W> {
    pub fn is_running(&self) -> bool {
        self.running.is_some()
    }

    /// A request by `waiter`, with the journal at `journal_seq` and
    /// changes since the last save or not (`dirty`).
    pub fn request(&mut self, waiter: W, journal_seq: i64, dirty: bool) -> Next<W> {
        match &mut self.running {
            Some(run) if run.journal_seq == journal_seq => {
                run.waiters.push(waiter);
                Next::Wait
            }
            Some(_) => {
                self.queued.push(waiter);
                Next::Wait
            }
            None if !dirty => Next::Unchanged(vec![waiter]),
            None => Next::Start(vec![waiter]),
        }
    }

    /// A run covering `journal_seq` started for `waiters`.
    pub fn started(&mut self, journal_seq: i64, waiters: Vec<W>) {
        self.running = Some(Run {
            journal_seq,
            started: Instant::now(),
            waiters,
        });
    }

    /// The running save finished: the run, to answer its waiters.
    pub fn finished(&mut self) -> Option<Run<W>> {
        self.running.take()
    }

    /// After a run finished and its waiters were answered: what the
    /// requests that came meanwhile need (`dirty`: changes remain unsaved).
    pub fn after_finish(&mut self, dirty: bool) -> Next<W> {
        let queued = std::mem::take(&mut self.queued);
        match (queued.is_empty(), dirty) {
            (true, _) => Next::Wait,
            (false, true) => Next::Start(queued),
            (false, false) => Next::Unchanged(queued),
        }
    }
}

pub(super) type Saves = SaveQueue<SaveWaiter>;

impl WorkspaceState {
    /// Asks for a save. Nothing changed and nothing running: answered at
    /// once. A save running that covers every change so far: the waiter
    /// joins it. Otherwise the waiter is served by a new run (now, or after
    /// the running one).
    pub(super) async fn request_save(
        &mut self,
        myself: &ActorRef<WorkspaceMsg>,
        waiter: SaveWaiter,
    ) {
        let next = self.saves.request(waiter, self.journal_seq, self.dirty);
        self.carry_out(myself, next).await;
    }

    async fn carry_out(&mut self, myself: &ActorRef<WorkspaceMsg>, next: Next<SaveWaiter>) {
        match next {
            Next::Wait => {}
            Next::Unchanged(waiters) => {
                let version = self.snapshot_version;
                self.answer_save(waiters, Ok((version, false)));
            }
            Next::Start(waiters) => self.start_save(myself, waiters).await,
        }
    }

    /// Saves unsaved changes once they have been quiet for the autosave
    /// period, or have waited the longest autosave period.
    pub(super) async fn autosave(&mut self, myself: &ActorRef<WorkspaceMsg>) {
        let now = Instant::now();
        let quiet = self
            .last_change
            .is_some_and(|at| now.duration_since(at) >= self.settings.autosave_quiet);
        let overdue = self
            .dirty_since
            .is_some_and(|at| now.duration_since(at) >= self.settings.autosave_max);
        if self.dirty && (quiet || overdue) && !self.saves.is_running() {
            self.request_save(myself, SaveWaiter::Auto).await;
        }
    }

    /// Starts a save of everything journalled so far. The working dir is
    /// copied by hard links (writes replace files by renaming, and git
    /// writes new files, so a linked copy stays as it was); packing and
    /// storing then run in a task while the actor goes on serving reads and
    /// writes. Only the linking (milliseconds) holds the mailbox.
    async fn start_save(&mut self, myself: &ActorRef<WorkspaceMsg>, waiters: Vec<SaveWaiter>) {
        if let Err(err) = self.check_writable() {
            return self.answer_save(waiters, Err(err));
        }
        let (dir, root) = (self.dir.path().to_path_buf(), self.settings.root.clone());
        let copy = blocking("copying the working dir for a save", move || {
            let copy = tempfile::Builder::new()
                .prefix("save-")
                .tempdir_in(&root)
                .map_err(|e| OpError::internal("making a save dir", e))?;
            snapshot::link_tree(&dir, copy.path())
                .map_err(|e| OpError::internal("copying the working dir for a save", e))?;
            Ok(copy)
        })
        .await;
        let copy = match copy {
            Ok(copy) => copy,
            Err(err) => return self.answer_save(waiters, Err(err)),
        };
        let author = waiters.iter().find_map(|w| match w {
            SaveWaiter::Session { by, .. } => Some(by.user.clone()),
            _ => None,
        });
        let journal_seq = self.journal_seq;
        self.saves.started(journal_seq, waiters);
        let (store, key, fence, keep, max_bytes) = (
            self.store.clone(),
            self.key.clone(),
            self.fence.clone(),
            self.settings.snapshots_kept,
            self.settings.max_workspace,
        );
        let myself = myself.clone();
        self.settings.tasks.spawn(async move {
            let packed = blocking("packing the working dir", move || {
                // Never a snapshot activation would refuse: the changes
                // stay journalled instead, and the branch keeps opening.
                snapshot::pack_within(copy.path(), max_bytes).map_err(|e| match e {
                    snapshot::SnapshotError::TooLarge { limit } => OpError::too_large(format!(
                        "the working copy holds more than BRANCHD_MAX_WORKSPACE ({limit} bytes, \
                         history included) and cannot be saved: delete files"
                    )),
                    other => OpError::internal("packing the working dir", other),
                })
            })
            .await;
            let result = match packed {
                Err(err) => Err(err),
                Ok(data) => store
                    .put_snapshot(
                        &key,
                        NewSnapshot {
                            data,
                            author,
                            journal_seq,
                            keep,
                        },
                        Some(&fence),
                    )
                    .await
                    .map(|meta| meta.version)
                    .map_err(OpError::from),
            };
            // Undelivered, the actor is gone: so are its waiters.
            let _ = myself.cast(WorkspaceMsg::SaveDone { result });
        });
    }

    /// A background save finished: record it, answer its waiters, and
    /// start the next run if changes came in meanwhile and someone waits.
    pub(super) async fn save_done(
        &mut self,
        myself: &ActorRef<WorkspaceMsg>,
        result: Result<i64, OpError>,
    ) {
        let Some(run) = self.saves.finished() else {
            return;
        };
        match &result {
            Ok(version) => {
                self.snapshot_version = *version;
                if self.journal_seq == run.journal_seq {
                    self.dirty = false;
                    self.dirty_since = None;
                    self.last_change = None;
                }
                tracing::info!(workspace = %self.key, version, elapsed_ms = run.started.elapsed().as_millis() as u64, "workspace saved");
            }
            Err(err) => {
                tracing::warn!(workspace = %self.key, error = %err.message, "saving failed");
            }
        }
        self.answer_save(run.waiters, result.map(|version| (version, true)));
        let next = self.saves.after_finish(self.dirty);
        self.carry_out(myself, next).await;
    }

    fn answer_save(&mut self, waiters: Vec<SaveWaiter>, result: Result<(i64, bool), OpError>) {
        for waiter in waiters {
            match waiter {
                SaveWaiter::Node(reply) => {
                    let _ = reply.send(result.clone());
                }
                SaveWaiter::Auto => {}
                SaveWaiter::Session { reply, by } => {
                    if let Ok((snapshot_version, true)) = &result {
                        let session = by.session.clone();
                        self.broadcast(
                            Some(&session),
                            Event::Saved {
                                snapshot_version: *snapshot_version,
                                by,
                            },
                        );
                    }
                    reply.send(
                        result
                            .clone()
                            .map(|(snapshot_version, saved)| Reply::Saved {
                                snapshot_version,
                                saved,
                            }),
                    );
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nothing_to_save_is_answered_at_once() {
        let mut queue = SaveQueue::default();
        assert_eq!(queue.request("a", 3, false), Next::Unchanged(vec!["a"]));
        assert!(!queue.is_running());
    }

    #[test]
    fn a_request_the_running_save_covers_joins_it() {
        let mut queue = SaveQueue::default();
        let Next::Start(waiters) = queue.request("a", 3, true) else {
            panic!("a dirty workspace with no run starts one");
        };
        queue.started(3, waiters);
        assert_eq!(queue.request("b", 3, true), Next::Wait);
        let run = queue.finished().expect("a run was going");
        assert_eq!(run.waiters, vec!["a", "b"]);
        assert_eq!(run.journal_seq, 3);
        assert_eq!(queue.after_finish(false), Next::Wait);
    }

    #[test]
    fn a_request_after_newer_changes_waits_for_the_next_run() {
        let mut queue = SaveQueue::default();
        queue.started(3, vec!["a"]);
        assert_eq!(queue.request("b", 4, true), Next::Wait);
        assert_eq!(queue.request("c", 5, true), Next::Wait);
        let run = queue.finished().expect("running");
        assert_eq!(run.waiters, vec!["a"]);
        assert_eq!(queue.after_finish(true), Next::Start(vec!["b", "c"]));
        assert!(queue.finished().is_none());
    }

    #[test]
    fn queued_requests_are_answered_when_nothing_is_left_to_save() {
        let mut queue = SaveQueue::default();
        queue.started(3, vec!["a"]);
        assert_eq!(queue.request("b", 4, true), Next::Wait);
        queue.finished();
        assert_eq!(queue.after_finish(false), Next::Unchanged(vec!["b"]));
    }
}
