//! The state of one live workspace and the rules every op shares: who is
//! attached, who may run what, the edit lock's enforcement, writing a
//! change to the journal before it is applied, and telling the other
//! sessions.
//!
//! What each op does lives in [`super::ops`]; saving in [`super::save`].
//! This module must never wait on a client: events go out with `try_send`
//! (through [`events::broadcast`]) and a session that cannot take them is
//! detached.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use tempfile::TempDir;

use super::events::{self, EventSink};
use super::files::Files;
use super::journal::{self, Record};
use super::lock::EditLock;
use super::messages::{AttachInfo, SessionInfo, WorkspaceInfo};
use super::paths::WorkPath;
use super::presence::Presence;
use super::repo;
use super::save::Saves;
use super::settings::WorkspaceSettings;
use crate::compile::CompileCache;
use crate::protocol::{ErrorCode, Event, Op, OpError, SessionId};
use crate::storage::{Fence, Store, WorkspaceKey};

/// How often the workspace says it detached sessions that could not take
/// their events: a burst (a thousand sockets that stopped reading) makes
/// one line a second, with a count, not a line each.
const UNDELIVERED_LOG_EVERY: std::time::Duration = std::time::Duration::from_secs(1);

/// The books of [`UNDELIVERED_LOG_EVERY`].
#[derive(Debug, Default)]
pub(super) struct Undelivered {
    last_line: Option<Instant>,
    since: u64,
}

impl Undelivered {
    /// Whether to log a detach now, and how many were not logged since the
    /// last line.
    fn log_now(&mut self, now: Instant) -> Option<u64> {
        let due = self
            .last_line
            .is_none_or(|last| now.duration_since(last) >= UNDELIVERED_LOG_EVERY);
        if !due {
            self.since += 1;
            return None;
        }
        self.last_line = Some(now);
        Some(std::mem::take(&mut self.since))
    }
}

/// An attached session: who, and where its events go.
pub(super) struct Member {
    pub info: SessionInfo,
    pub events: EventSink,
}

pub struct WorkspaceState {
    pub(super) key: WorkspaceKey,
    pub(super) store: Arc<dyn Store>,
    pub(super) settings: WorkspaceSettings,
    pub(super) fence: Fence,
    /// The last journal record applied here; a save covers up to it.
    pub(super) journal_seq: i64,
    /// When the first unsaved change and the latest change were made (autosave).
    pub(super) dirty_since: Option<Instant>,
    pub(super) last_change: Option<Instant>,
    pub(super) files: Files,
    pub(super) sessions: HashMap<SessionId, Member>,
    pub(super) lock: EditLock,
    pub(super) dirty: bool,
    pub(super) snapshot_version: i64,
    pub(super) last_activity: i64,
    /// The compiler's state for this working copy, used by one compile
    /// at a time, off the actor (see [`crate::compile::CompileSettings::run`]).
    pub(super) compile_cache: Arc<tokio::sync::Mutex<CompileCache>>,
    /// The save running in the background, if any, and who waits.
    pub(super) saves: Saves,
    /// Who the sessions were last told is here.
    pub(super) presence: Presence,
    /// A presence tick must be scheduled (the actor does it).
    pub(super) presence_due: bool,
    /// Sessions detached because their events could not be delivered, and
    /// the log line about them, kept to one a second.
    pub(super) undelivered: Undelivered,
    /// Set when a journal append did not finish before the fence: whether
    /// it landed is unknown, so this actor stops once it has answered (see
    /// [`WorkspaceState::record`]).
    pub(super) stale: bool,
    /// Declared last: dropped after everything that uses the directory.
    pub(super) dir: TempDir,
}

pub(super) fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

/// Runs blocking work on the blocking pool.
pub(super) async fn blocking<T: Send + 'static>(
    context: &'static str,
    work: impl FnOnce() -> Result<T, OpError> + Send + 'static,
) -> Result<T, OpError> {
    tokio::task::spawn_blocking(work)
        .await
        .map_err(|e| OpError::internal(context, e))?
}

/// The outcome of applying a change that is already in the journal. It
/// cannot be refused any more (it was checked); if the disk fails it, the
/// working copy no longer matches the journal, so the actor stops here and
/// is restarted from snapshot + journal, which applies it again.
pub(super) fn applied<T>(outcome: Result<T, OpError>) -> T {
    match outcome {
        Ok(value) => value,
        Err(err) => panic!(
            "a journalled change could not be applied ({}); restarting from the journal",
            err.message
        ),
    }
}

impl WorkspaceState {
    /// A client-named path that is not the root.
    pub(super) fn path(&self, raw: &str) -> Result<WorkPath, OpError> {
        WorkPath::parse_non_root(raw, self.settings.max_path)
    }

    /// A client-named path, the root allowed (`""`).
    pub(super) fn path_or_root(&self, raw: &str) -> Result<WorkPath, OpError> {
        WorkPath::parse(raw, self.settings.max_path)
    }

    pub(super) fn info(&self) -> WorkspaceInfo {
        let mut sessions: Vec<SessionId> = self.sessions.keys().cloned().collect();
        sessions.sort();
        WorkspaceInfo {
            key: self.key.clone(),
            dir: self.dir.path().to_path_buf(),
            sessions,
            lock: self.lock.info().cloned(),
            dirty: self.dirty,
            snapshot_version: self.snapshot_version,
            last_activity: self.last_activity,
            file_cache_bytes: self.files.cached_bytes() as u64,
        }
    }

    pub(super) async fn attach(
        &mut self,
        session: SessionInfo,
        events: EventSink,
    ) -> Result<AttachInfo, OpError> {
        let dir = self.dir.path().to_path_buf();
        let (branch, head) = blocking("reading HEAD", move || repo::head(&dir)).await?;
        self.expire_lock(None);
        let id = session.id.clone();
        self.sessions.insert(
            session.id.clone(),
            Member {
                info: session,
                events,
            },
        );
        // The joiner learns everyone now, the others the change soon.
        let everyone = Presence::everyone(self.sessions.values().map(|m| m.info.doer()));
        if let Some(member) = self.sessions.get(&id)
            && !member.events.send_to(&id, &everyone)
        {
            self.detach(&id);
        }
        self.presence_changed();
        Ok(AttachInfo {
            branch,
            head,
            lock: self.lock.info().cloned(),
        })
    }

    fn presence_changed(&mut self) {
        if self.presence.changed() {
            self.presence_due = true;
        }
    }

    /// Tells every session who joined and left since it was last told.
    pub(super) fn announce_presence(&mut self) {
        let now = self.sessions.values().map(|m| m.info.doer());
        if let Some(event) = self.presence.announce(now) {
            self.broadcast(None, event);
        }
    }

    pub(super) fn detach(&mut self, session: &SessionId) {
        if self.sessions.remove(session).is_none() {
            return;
        }
        if self.sessions.is_empty() {
            // Nobody reads here until someone comes back: an idle
            // workspace keeps no file contents in memory.
            self.files.release_cache();
        }
        self.presence_changed();
        if let Some(event) = self.lock.holder_left(session) {
            self.broadcast(None, event);
        }
    }

    /// Sends an event to every attached session but `except`. A session
    /// whose buffer is full (or gone) is detached: its connection sees the
    /// channel close and tells the client to reconnect.
    pub(super) fn broadcast(&mut self, except: Option<&SessionId>, event: Event) {
        let sinks = self.sessions.iter().map(|(id, m)| (id, &m.events));
        for id in events::broadcast(sinks, except, &event) {
            if let Some(more) = self.undelivered.log_now(Instant::now()) {
                tracing::info!(workspace = %self.key, session = %id, also_detached_since_last_line = more, "detaching a session whose events cannot be delivered (gone, or not reading)");
            }
            self.detach(&id);
        }
    }

    /// Drops the lock if it has run out (only the one taken at `generation`,
    /// when given) and tells everyone.
    pub(super) fn expire_lock(&mut self, generation: Option<u64>) {
        if let Some(event) = self.lock.expire(Instant::now(), generation) {
            self.broadcast(None, event);
        }
    }

    /// The attached session `session`, or `unavailable`.
    pub(super) fn attached(&self, session: &SessionId) -> Result<SessionInfo, OpError> {
        self.sessions
            .get(session)
            .map(|m| m.info.clone())
            .ok_or_else(|| {
                OpError::new(
                    ErrorCode::Unavailable,
                    "this session is no longer attached to the workspace; reconnect",
                )
            })
    }

    /// The session, if it may run `op`: attached, with the role the op
    /// needs, and holding the lock (or nobody does) for an op that
    /// changes the working copy. Both rules come from the op's metadata.
    pub(super) fn admit(&mut self, session: &SessionId, op: &Op) -> Result<SessionInfo, OpError> {
        let who = self.attached(session)?;
        let kind = op.kind();
        kind.authorize(who.role).map_err(OpError::forbidden)?;
        if kind.mutates() {
            self.expire_lock(None);
            self.lock.check(session, Instant::now())?;
        }
        self.last_activity = now_ms();
        Ok(who)
    }

    /// Appends a change's record under the fence. Called after the change
    /// was checked and before it is applied: once this returns, the change
    /// survives any crash, and only then is it applied and acknowledged.
    pub(super) async fn record<R: Record>(&mut self, record: &R) -> Result<(), OpError> {
        self.check_writable()?;
        let record = journal::encode(record)?;
        let append = self.store.append_journal(&self.key, &self.fence, &record);
        tokio::pin!(append);
        // The append may wait at most until the fence (which a renewal
        // meanwhile moves on): a node cut off from the database must not
        // keep its clients, or the ops queued behind this one, waiting, and
        // must stop writing by then anyway.
        let seq = loop {
            let Some(left) = self.settings.liveness.writable_for() else {
                break append.await?;
            };
            match tokio::time::timeout(left, &mut append).await {
                Ok(appended) => break appended?,
                Err(_) if self.settings.liveness.writable() => continue,
                Err(_) => {
                    // Whether the record landed is unknown (it commits later
                    // only if this node still owns the workspace then), so
                    // this actor must not go on from its state: it stops,
                    // and the next activation replays what the journal holds.
                    self.stale = true;
                    tracing::warn!(workspace = %self.key, "the database did not take a change before the fence; stopping the workspace");
                    return Err(OpError::new(
                        ErrorCode::Unavailable,
                        "this node lost the database while writing; whether the change was kept is unknown: reconnect and re-read",
                    ));
                }
            }
        };
        self.journal_seq = seq;
        let now = Instant::now();
        self.dirty = true;
        self.last_change = Some(now);
        self.dirty_since.get_or_insert(now);
        Ok(())
    }

    /// Refuses writes while this node cannot renew its heartbeat: another
    /// node may be about to take the workspace over.
    pub(super) fn check_writable(&self) -> Result<(), OpError> {
        if self.settings.liveness.writable() {
            return Ok(());
        }
        Err(OpError::new(
            ErrorCode::Unavailable,
            format!(
                "this node has not reached the database for {} ms and accepts no writes; reconnect",
                self.settings.liveness.silence().as_millis()
            ),
        ))
    }
}
