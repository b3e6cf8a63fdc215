//! The workspace actor: the one owner of a live working copy.
//!
//! It activates from the latest snapshot into a temp dir of its own, then
//! handles one message at a time: file and git operations for attached
//! sessions, the edit lock, and saves. Every change is pushed as an
//! [`Event`] to the other attached sessions. Blocking work (unpacking,
//! packing, git) runs on the blocking pool so other workspaces never stall;
//! small file reads and writes run inline (they take microseconds).
//!
//! It must never wait on a client: events go through bounded channels with
//! `try_send`, and a session that cannot keep up is detached. Its temp dir
//! lives in its state, so it is removed however the actor ends (stop, kill
//! or panic).

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use ractor::rpc::CallResult;
use ractor::{Actor, ActorProcessingErr, ActorRef, RpcReplyPort, SpawnErr};
use serde::{Deserialize, Serialize};
use tempfile::TempDir;

use super::events::{self, EventSink};
use super::files::{CachePool, FileLimits, Files};
use super::journal::{self, JournalOp};
use super::liveness::Liveness;
use super::paths::WorkPath;
use super::repo::{self, GitAuthor};
use super::snapshot;
use crate::compile::{CompileCache, CompileSettings, Compiled};
use crate::config::Config;
use crate::protocol::{
    Doer, EntryKind, ErrorCode, Event, LockInfo, Op, OpError, OpResult, Reply, SessionId,
};
use crate::storage::{Fence, NewSnapshot, Role, Store, WorkspaceKey};

/// Everything about the service a workspace needs, taken from [`Config`].
#[derive(Debug, Clone)]
pub struct WorkspaceSettings {
    /// Where working copies (and scratch dirs) are made.
    pub root: PathBuf,
    pub files: FileLimits,
    pub max_path: usize,
    /// Most bytes a snapshot may unpack to.
    pub max_workspace: u64,
    pub snapshots_kept: u32,
    /// Lock lifetime when the client names none.
    pub lock_ttl: Duration,
    /// Longest lock lifetime a client may ask for.
    pub max_lock_ttl: Duration,
    /// Unsaved changes are saved this long after the last change...
    pub autosave_quiet: Duration,
    /// ... and at least this often while changes keep coming.
    pub autosave_max: Duration,
    /// Whether this node may still write (self-fencing); shared by the node.
    pub liveness: Liveness,
    /// The compiler, its limits and the node's compile slots (shared by
    /// every workspace made from these settings, as is the file cache's
    /// pool in `files`).
    pub compile: CompileSettings,
}

impl WorkspaceSettings {
    pub fn from_config(config: &Config) -> WorkspaceSettings {
        WorkspaceSettings {
            root: config.workspace_dir(),
            files: FileLimits {
                max_file: config.max_file,
                max_read: config.max_frame.saturating_sub(4096),
                cache: CachePool::new(config.file_cache),
            },
            max_path: config.max_path,
            max_workspace: config.max_workspace,
            snapshots_kept: config.snapshots_kept,
            lock_ttl: config.lock_ttl,
            max_lock_ttl: config.max_lock_ttl,
            autosave_quiet: config.autosave_quiet,
            autosave_max: config.autosave_max,
            liveness: Liveness::new(config.lease / 2),
            compile: CompileSettings::from_config(config),
        }
    }
}

/// A session as a workspace sees it: who, and with which role.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SessionInfo {
    pub id: SessionId,
    pub user_id: i64,
    pub username: String,
    pub display_name: String,
    pub email: String,
    pub role: Role,
}

impl SessionInfo {
    fn doer(&self) -> Doer {
        Doer {
            session: self.id.clone(),
            user: self.username.clone(),
        }
    }
}

/// What an attaching session learns.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Welcome {
    pub branch: String,
    pub head: String,
    pub lock: Option<LockInfo>,
}

/// A workspace's state, for operators and tests.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct WorkspaceInfo {
    pub key: WorkspaceKey,
    pub dir: PathBuf,
    pub sessions: Vec<SessionId>,
    pub lock: Option<LockInfo>,
    /// Changed since the last save.
    pub dirty: bool,
    pub snapshot_version: i64,
    /// When a session last did something (ms since the epoch).
    pub last_activity: i64,
    /// Bytes of file contents kept in memory (`BRANCHD_FILE_CACHE`).
    pub file_cache_bytes: u64,
}

#[derive(ractor_cluster::RactorMessage)]
pub enum WorkspaceMsg {
    /// Adds a session; its events go to `events`.
    /// Attaching again replaces the session's event sink (the allocator
    /// re-attaches sessions after a restart, with no reply port).
    Attach {
        session: SessionInfo,
        events: EventSink,
        reply: Option<RpcReplyPort<Result<Welcome, OpError>>>,
    },
    /// Removes a session (releasing its lock).
    Detach {
        session: SessionId,
    },
    /// One operation by an attached session.
    Op {
        session: SessionId,
        op: Op,
        reply: Responder,
    },
    Info {
        reply: RpcReplyPort<WorkspaceInfo>,
    },
    /// Saves on behalf of the node (garbage collection, kill, drain):
    /// the new snapshot version and whether one was written.
    Save {
        reply: RpcReplyPort<Result<(i64, bool), OpError>>,
    },
    /// The lock taken at `generation` may have run out.
    LockExpired {
        generation: u64,
    },
    /// Time to check whether unsaved changes are due for saving.
    AutosaveTick,
    /// A compile that `by` asked for finished (its reply is already
    /// sent): tell the other sessions.
    Compiled {
        entry: String,
        compiled: Compiled,
        by: Doer,
    },
    /// A save running in the background finished: the new snapshot
    /// version, or why it failed.
    SaveDone {
        result: Result<i64, OpError>,
    },
    /// Makes the actor panic, to test what survives one. Exists only in
    /// test builds; no client message can produce it.
    #[cfg(any(test, feature = "fault-injection"))]
    Panic,
}

/// Who waits for a save, and how each is answered.
enum SaveWaiter {
    /// The node (garbage collection, kill, drain, a handle's `save`).
    Node(RpcReplyPort<Result<(i64, bool), OpError>>),
    /// A session's `save` op; the other sessions hear `saved`.
    Session { reply: Responder, by: Doer },
    /// The autosave timer.
    Auto,
}

/// A save in progress: the journal position it covers and who waits.
struct SaveRun {
    journal_seq: i64,
    started: Instant,
    waiters: Vec<SaveWaiter>,
}

/// Where an op's result goes. A reply port for callers that wait; a
/// connection passes a closure that queues the reply for its socket, so the
/// result reaches the socket without an extra task in between.
///
/// A responder dropped unanswered (the actor died, or the message never
/// arrived) answers `unavailable`, so no caller waits forever.
pub struct Responder(Option<Box<dyn FnOnce(OpResult) + Send>>);

impl Responder {
    pub fn new(deliver: impl FnOnce(OpResult) + Send + 'static) -> Responder {
        Responder(Some(Box::new(deliver)))
    }

    pub fn send(mut self, result: OpResult) {
        if let Some(deliver) = self.0.take() {
            deliver(result);
        }
    }
}

impl Drop for Responder {
    fn drop(&mut self) {
        if let Some(deliver) = self.0.take() {
            deliver(Err(OpError::new(
                ErrorCode::Unavailable,
                "the workspace stopped before answering; retry",
            )));
        }
    }
}

impl From<RpcReplyPort<OpResult>> for Responder {
    fn from(port: RpcReplyPort<OpResult>) -> Responder {
        Responder::new(move |result| {
            let _ = port.send(result);
        })
    }
}

pub struct WorkspaceArgs {
    pub key: WorkspaceKey,
    pub store: Arc<dyn Store>,
    pub settings: WorkspaceSettings,
    /// Proof of ownership: every journal record and snapshot is written under it.
    pub fence: Fence,
}

struct Attached {
    info: SessionInfo,
    events: EventSink,
}

struct EditLock {
    info: LockInfo,
    deadline: Instant,
    generation: u64,
}

pub struct WorkspaceState {
    key: WorkspaceKey,
    store: Arc<dyn Store>,
    settings: WorkspaceSettings,
    fence: Fence,
    /// The last journal record applied here; a save covers up to it.
    journal_seq: i64,
    /// When the first unsaved change and the latest change were made (autosave).
    dirty_since: Option<Instant>,
    last_change: Option<Instant>,
    files: Files,
    sessions: HashMap<SessionId, Attached>,
    lock: Option<EditLock>,
    lock_generation: u64,
    dirty: bool,
    snapshot_version: i64,
    last_activity: i64,
    /// The compiler's state for this working copy, used by one compile
    /// at a time, off the actor (see [`CompileSettings::run`]).
    compile_cache: Arc<tokio::sync::Mutex<CompileCache>>,
    /// The save running in the background, if any, and the waiters that
    /// asked after changes it does not cover (served by the next run).
    saving: Option<SaveRun>,
    save_queue: Vec<SaveWaiter>,
    /// Declared last: dropped after everything that uses the directory.
    dir: TempDir,
}

pub struct WorkspaceActor;

fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

/// The outcome of applying a change that is already in the journal. It
/// cannot be refused any more (it was checked); if the disk fails it, the
/// working copy no longer matches the journal, so the actor stops here and
/// is restarted from snapshot + journal, which applies it again.
fn applied<T>(outcome: Result<T, OpError>) -> T {
    match outcome {
        Ok(value) => value,
        Err(err) => panic!(
            "a journalled change could not be applied ({}); restarting from the journal",
            err.message
        ),
    }
}

/// Runs blocking work on the blocking pool.
async fn blocking<T: Send + 'static>(
    context: &'static str,
    work: impl FnOnce() -> Result<T, OpError> + Send + 'static,
) -> Result<T, OpError> {
    tokio::task::spawn_blocking(work)
        .await
        .map_err(|e| OpError::internal(context, e))?
}

impl Actor for WorkspaceActor {
    type Msg = WorkspaceMsg;
    type State = WorkspaceState;
    type Arguments = WorkspaceArgs;

    async fn pre_start(
        &self,
        myself: ActorRef<WorkspaceMsg>,
        args: WorkspaceArgs,
    ) -> Result<WorkspaceState, ActorProcessingErr> {
        let state = activate(args).await?;
        let tick = (state.settings.autosave_quiet / 2)
            .min(state.settings.autosave_max / 2)
            .clamp(Duration::from_millis(10), Duration::from_secs(1));
        myself.send_interval(tick, || WorkspaceMsg::AutosaveTick);
        Ok(state)
    }

    async fn handle(
        &self,
        myself: ActorRef<WorkspaceMsg>,
        message: WorkspaceMsg,
        state: &mut WorkspaceState,
    ) -> Result<(), ActorProcessingErr> {
        match message {
            WorkspaceMsg::Attach {
                session,
                events,
                reply,
            } => {
                let welcome = state.attach(session, events).await;
                if let Some(reply) = reply {
                    let _ = reply.send(welcome);
                }
            }
            WorkspaceMsg::Detach { session } => state.detach(&session),
            WorkspaceMsg::Op {
                session,
                op: Op::Compile { entry },
                reply,
            } => state.compile(&myself, &session, &entry, reply),
            WorkspaceMsg::Op {
                session,
                op: Op::Save,
                reply,
            } => match state.admit(&session, &Op::Save) {
                Ok(who) => {
                    let waiter = SaveWaiter::Session {
                        reply,
                        by: who.doer(),
                    };
                    state.request_save(&myself, waiter).await
                }
                Err(err) => reply.send(Err(err)),
            },
            WorkspaceMsg::Op { session, op, reply } => {
                let result = state.op(&myself, &session, op).await;
                reply.send(result);
            }
            WorkspaceMsg::Info { reply } => {
                let _ = reply.send(state.info());
            }
            WorkspaceMsg::Save { reply } => {
                state.request_save(&myself, SaveWaiter::Node(reply)).await
            }
            WorkspaceMsg::SaveDone { result } => state.save_done(&myself, result).await,
            WorkspaceMsg::LockExpired { generation } => state.expire_lock(Some(generation)),
            WorkspaceMsg::AutosaveTick => state.autosave(&myself).await,
            WorkspaceMsg::Compiled {
                entry,
                compiled,
                by,
            } => state.broadcast(
                Some(&by.session.clone()),
                Event::Compiled {
                    entry,
                    ok: compiled.ok,
                    diagnostics: compiled.diagnostics,
                    output: compiled.output,
                    stats: compiled.stats,
                    by,
                },
            ),
            #[cfg(any(test, feature = "fault-injection"))]
            WorkspaceMsg::Panic => panic!("test-requested panic"),
        }
        Ok(())
    }
}

/// The latest snapshot and the journal records after it, consistent with
/// each other. A save that commits between the two reads trims records
/// the older snapshot needs; its own, newer snapshot has them, so the pair
/// is read again until no save came in between.
async fn load(
    store: &dyn Store,
    key: &WorkspaceKey,
) -> Result<(crate::storage::Snapshot, Vec<crate::storage::JournalEntry>), OpError> {
    loop {
        let snapshot = store.latest_snapshot(key).await?.ok_or_else(|| {
            OpError::not_found(format!(
                "branch {:?} of project {} does not exist",
                key.branch, key.project_id
            ))
        })?;
        let records = store.journal_after(key, snapshot.meta.journal_seq).await?;
        let newest = store.list_snapshots(key).await?.first().map(|m| m.version);
        if newest == Some(snapshot.meta.version) {
            return Ok((snapshot, records));
        }
        tracing::info!(workspace = %key, "a save landed while loading; loading again");
    }
}

/// Loads the latest snapshot into a new temp dir and checks it holds a repository.
async fn activate(args: WorkspaceArgs) -> Result<WorkspaceState, OpError> {
    let WorkspaceArgs {
        key,
        store,
        settings,
        fence,
    } = args;
    let started = Instant::now();
    let (snapshot, records) = load(store.as_ref(), &key).await?;
    std::fs::create_dir_all(&settings.root)
        .map_err(|e| OpError::internal("creating the workspace dir", e))?;
    let dir = tempfile::Builder::new()
        .prefix(&format!("ws-{}-", key.project_id))
        .tempdir_in(&settings.root)
        .map_err(|e| OpError::internal("creating the working dir", e))?;
    let path = dir.path().to_path_buf();
    let max_bytes = settings.max_workspace;
    let version = snapshot.meta.version;
    let data = snapshot.data;
    let replayed = records.len();
    let journal_seq = records.last().map_or(snapshot.meta.journal_seq, |r| r.seq);
    let limits = settings.files.clone();
    let files = blocking("unpacking the snapshot", move || {
        snapshot::unpack(&data, &path, max_bytes).map_err(|e| match e {
            snapshot::SnapshotError::TooLarge { .. } => OpError::too_large(format!(
                "the snapshot is larger than BRANCHD_MAX_WORKSPACE: {e}"
            )),
            other => OpError::internal("unpacking the snapshot", other),
        })?;
        git2::Repository::open(&path)
            .map_err(|e| OpError::internal("opening the snapshot's repository", e))?;
        let mut files = Files::open(&path, limits)
            .map_err(|e| OpError::internal("preparing the working dir", e))?;
        for record in &records {
            JournalOp::decode(&record.op)?
                .apply(&mut files, &path)
                .map_err(|e| {
                    OpError::internal(
                        "replaying the journal",
                        format!("record {} failed: {}", record.seq, e.message),
                    )
                })?;
        }
        Ok(files)
    })
    .await?;
    tracing::info!(workspace = %key, snapshot_version = version, replayed, elapsed_ms = started.elapsed().as_millis() as u64, "workspace activated");
    let replayed_at = (replayed > 0).then(Instant::now);
    let compile_cache = CompileCache::new(
        dir.path(),
        &settings.root,
        settings.compile.compiler.clone(),
    );
    Ok(WorkspaceState {
        compile_cache: Arc::new(tokio::sync::Mutex::new(compile_cache)),
        key,
        store,
        settings,
        fence,
        journal_seq,
        saving: None,
        save_queue: Vec::new(),
        dirty_since: replayed_at,
        last_change: replayed_at,
        files,
        sessions: HashMap::new(),
        lock: None,
        lock_generation: 0,
        dirty: replayed > 0,
        snapshot_version: version,
        last_activity: now_ms(),
        dir,
    })
}

impl WorkspaceState {
    fn path(&self, raw: &str) -> Result<WorkPath, OpError> {
        WorkPath::parse_non_root(raw, self.settings.max_path)
    }

    fn info(&self) -> WorkspaceInfo {
        let mut sessions: Vec<SessionId> = self.sessions.keys().cloned().collect();
        sessions.sort();
        WorkspaceInfo {
            key: self.key.clone(),
            dir: self.dir.path().to_path_buf(),
            sessions,
            lock: self.lock.as_ref().map(|l| l.info.clone()),
            dirty: self.dirty,
            snapshot_version: self.snapshot_version,
            last_activity: self.last_activity,
            file_cache_bytes: self.files.cached_bytes() as u64,
        }
    }

    async fn attach(
        &mut self,
        session: SessionInfo,
        events: EventSink,
    ) -> Result<Welcome, OpError> {
        let dir = self.dir.path().to_path_buf();
        let (branch, head) = blocking("reading HEAD", move || repo::head(&dir)).await?;
        self.expire_lock(None);
        self.sessions.insert(
            session.id.clone(),
            Attached {
                info: session,
                events,
            },
        );
        self.announce_presence();
        Ok(Welcome {
            branch,
            head,
            lock: self.lock.as_ref().map(|l| l.info.clone()),
        })
    }

    /// Tells every session who is attached now.
    fn announce_presence(&mut self) {
        let mut sessions: Vec<Doer> = self.sessions.values().map(|a| a.info.doer()).collect();
        sessions.sort_by(|a, b| a.session.cmp(&b.session));
        self.broadcast(None, Event::Presence { sessions });
    }

    fn detach(&mut self, session: &SessionId) {
        if self.sessions.remove(session).is_none() {
            return;
        }
        if self.sessions.is_empty() {
            // Nobody reads here until someone comes back: an idle
            // workspace keeps no file contents in memory.
            self.files.release_cache();
        }
        self.announce_presence();
        if self
            .lock
            .as_ref()
            .is_some_and(|l| &l.info.holder == session)
        {
            self.lock = None;
            self.broadcast(None, Event::lock_changed(None, None));
        }
    }

    /// Sends an event to every attached session but `except`. A session
    /// whose buffer is full (or gone) is detached: its connection sees the
    /// channel close and tells the client to reconnect.
    fn broadcast(&mut self, except: Option<&SessionId>, event: Event) {
        let sinks = self.sessions.iter().map(|(id, a)| (id, &a.events));
        for id in events::broadcast(sinks, except, &event) {
            tracing::info!(workspace = %self.key, session = %id, "detaching a session whose events cannot be delivered (gone, or not reading)");
            self.detach(&id);
        }
    }

    /// Drops the lock if it has run out (only the one taken at `generation`,
    /// when given) and tells everyone.
    fn expire_lock(&mut self, generation: Option<u64>) {
        let expired = self.lock.as_ref().is_some_and(|lock| {
            generation.is_none_or(|g| g == lock.generation) && lock.deadline <= Instant::now()
        });
        if expired {
            self.lock = None;
            self.broadcast(None, Event::lock_changed(None, None));
        }
    }

    /// `locked` if someone other than `session` holds a live lock.
    fn check_lock(&mut self, session: &SessionId) -> Result<(), OpError> {
        self.expire_lock(None);
        match &self.lock {
            Some(lock) if &lock.info.holder != session => Err(OpError {
                lock: Some(Box::new(lock.info.clone())),
                ..OpError::new(
                    ErrorCode::Locked,
                    format!(
                        "{} holds the edit lock for another {:.1} s; wait, or ask them to unlock",
                        lock.info.user,
                        lock.deadline
                            .saturating_duration_since(Instant::now())
                            .as_secs_f64()
                    ),
                )
            }),
            _ => Ok(()),
        }
    }

    /// The attached session `session`, or `unavailable`.
    fn attached(&self, session: &SessionId) -> Result<SessionInfo, OpError> {
        self.sessions
            .get(session)
            .map(|a| a.info.clone())
            .ok_or_else(|| {
                OpError::new(
                    ErrorCode::Unavailable,
                    "this session is no longer attached to the workspace; reconnect",
                )
            })
    }

    /// Starts a compile of `entry` and returns at once: the compile runs
    /// off the actor (so the workspace keeps serving meanwhile), answers
    /// `reply` itself, and then sends [`WorkspaceMsg::Compiled`] so the
    /// other sessions hear of it. Viewers may compile: it changes no file
    /// (its cache lives in `.git/branchd/`, which clients cannot name).
    fn compile(
        &mut self,
        myself: &ActorRef<WorkspaceMsg>,
        session: &SessionId,
        entry: &str,
        reply: Responder,
    ) {
        let who = match self.attached(session) {
            Ok(who) => who,
            Err(err) => return reply.send(Err(err)),
        };
        self.last_activity = now_ms();
        let entry = match self.path(entry) {
            Ok(entry) => entry,
            Err(err) => return reply.send(Err(err)),
        };
        let settings = self.settings.compile.clone();
        let cache = self.compile_cache.clone();
        let myself = myself.clone();
        tokio::spawn(async move {
            let result = settings.run(cache, entry.clone()).await;
            match result {
                Ok(compiled) => {
                    reply.send(Ok(Reply::Compiled {
                        ok: compiled.ok,
                        diagnostics: compiled.diagnostics.clone(),
                        output: compiled.output.clone(),
                        stats: compiled.stats,
                    }));
                    let _ = myself.cast(WorkspaceMsg::Compiled {
                        entry: entry.to_string(),
                        compiled,
                        by: who.doer(),
                    });
                }
                Err(err) => reply.send(Err(err)),
            }
        });
    }

    /// The session, if it may run `op`: attached, with the role it needs,
    /// holding the lock (or nobody does) for a change.
    fn admit(&mut self, session: &SessionId, op: &Op) -> Result<SessionInfo, OpError> {
        let who = self.attached(session)?;
        op.kind().authorize(who.role).map_err(OpError::forbidden)?;
        if op.kind().mutates() {
            self.check_lock(session)?;
        }
        self.last_activity = now_ms();
        Ok(who)
    }

    async fn op(
        &mut self,
        myself: &ActorRef<WorkspaceMsg>,
        session: &SessionId,
        op: Op,
    ) -> OpResult {
        let who = self.admit(session, &op)?;
        let by = who.doer();
        match op {
            Op::ListTree { path } => {
                let under = WorkPath::parse(path.as_deref().unwrap_or(""), self.settings.max_path)?;
                Ok(Reply::Tree {
                    entries: self.files.list(&under)?,
                })
            }
            Op::ReadFile { path } => {
                let path = self.path(&path)?;
                let (content, version) = self.files.read(&path)?;
                Ok(Reply::File {
                    path: path.to_string(),
                    content,
                    version,
                })
            }
            Op::Stat { path } => {
                let entry = self.files.stat(&self.path(&path)?)?;
                Ok(Reply::Stat {
                    path: entry.path,
                    kind: entry.kind,
                    size: entry.size,
                    version: entry.version,
                })
            }
            Op::WriteFile {
                path,
                content,
                base_version,
                force,
            } => {
                let path = self.path(&path)?;
                self.files
                    .check_write(&path, &content, base_version.as_deref(), force)?;
                self.record(journal::encode_write(path.as_str(), &content)?)
                    .await?;
                let version = applied(self.files.apply_write(&path, &content));
                self.broadcast(
                    Some(session),
                    Event::FileChanged {
                        path: path.to_string(),
                        kind: EntryKind::File,
                        version: Some(version.clone()),
                        by,
                    },
                );
                Ok(Reply::Written {
                    path: path.to_string(),
                    version,
                })
            }
            Op::DeletePath { path, base_version } => {
                let path = self.path(&path)?;
                self.files.check_delete(&path, base_version.as_deref())?;
                self.record(
                    JournalOp::Delete {
                        path: path.to_string(),
                    }
                    .encode()?,
                )
                .await?;
                let kind = applied(self.files.apply_delete(&path));
                self.broadcast(
                    Some(session),
                    Event::PathDeleted {
                        path: path.to_string(),
                        kind,
                        by,
                    },
                );
                Ok(Reply::Done {})
            }
            Op::RenamePath { from, to } => {
                let (from, to) = (self.path(&from)?, self.path(&to)?);
                self.files.check_rename(&from, &to)?;
                self.record(
                    JournalOp::Rename {
                        from: from.to_string(),
                        to: to.to_string(),
                    }
                    .encode()?,
                )
                .await?;
                applied(self.files.apply_rename(&from, &to));
                self.broadcast(
                    Some(session),
                    Event::PathRenamed {
                        from: from.to_string(),
                        to: to.to_string(),
                        by,
                    },
                );
                Ok(Reply::Done {})
            }
            Op::MakeDir { path } => {
                let path = self.path(&path)?;
                if self.files.check_make_dir(&path)? {
                    self.record(
                        JournalOp::MakeDir {
                            path: path.to_string(),
                        }
                        .encode()?,
                    )
                    .await?;
                    applied(self.files.apply_make_dir(&path));
                    self.broadcast(
                        Some(session),
                        Event::FileChanged {
                            path: path.to_string(),
                            kind: EntryKind::Dir,
                            version: None,
                            by,
                        },
                    );
                }
                Ok(Reply::Done {})
            }
            Op::Lock { ttl_ms } => self.take_lock(myself, &who, ttl_ms),
            Op::Unlock => {
                self.expire_lock(None);
                match &self.lock {
                    None => Ok(Reply::Done {}),
                    Some(lock) if &lock.info.holder == session => {
                        self.lock = None;
                        self.broadcast(Some(session), Event::lock_changed(None, Some(by)));
                        Ok(Reply::Done {})
                    }
                    Some(_) => Err(self.check_lock(session).err().unwrap_or_else(|| {
                        OpError::new(ErrorCode::Locked, "another session holds the lock")
                    })),
                }
            }
            // Answered by `request_save`, which does not wait for the save.
            Op::Save => Err(OpError::internal(
                "saving",
                "a save op reached the synchronous path",
            )),
            // Answered by `compile`, which does not wait for the result.
            Op::Compile { .. } => Err(OpError::internal(
                "compiling",
                "a compile reached the waiting op path",
            )),
            Op::GitStatus => {
                let dir = self.dir.path().to_path_buf();
                let (branch, head, changes) = blocking("reading the status", move || {
                    let (branch, head) = repo::head(&dir)?;
                    Ok((branch, head, repo::status(&dir)?))
                })
                .await?;
                Ok(Reply::Status {
                    branch,
                    head,
                    changes,
                })
            }
            Op::GitDiff { path } => {
                let path = path
                    .map(|p| WorkPath::parse(&p, self.settings.max_path))
                    .transpose()?;
                let dir = self.dir.path().to_path_buf();
                let diff = blocking("computing the diff", move || {
                    repo::diff(&dir, path.as_ref())
                })
                .await?;
                Ok(Reply::Diff { diff })
            }
            Op::GitCommit { message, paths } => {
                if message.len() > 64 * 1024 {
                    return Err(OpError::too_large("the commit message is over 64 KiB"));
                }
                let paths = paths
                    .map(|ps| {
                        ps.iter()
                            .map(|p| self.path(p))
                            .collect::<Result<Vec<_>, _>>()
                    })
                    .transpose()?;
                let dir = self.dir.path().to_path_buf();
                let author = GitAuthor {
                    name: who.display_name.clone(),
                    email: who.email.clone(),
                };
                let time_ms = now_ms();
                let (check_dir, check_paths, check_author, check_message) =
                    (dir.clone(), paths.clone(), author.clone(), message.clone());
                blocking("checking the commit", move || {
                    repo::check_commit(
                        &check_dir,
                        &check_message,
                        check_paths.as_deref(),
                        &check_author,
                        time_ms,
                    )
                })
                .await?;
                self.record(
                    JournalOp::Commit {
                        message: message.clone(),
                        paths: paths
                            .as_ref()
                            .map(|ps| ps.iter().map(|p| p.to_string()).collect()),
                        name: author.name.clone(),
                        email: author.email.clone(),
                        time_ms,
                    }
                    .encode()?,
                )
                .await?;
                let (commit, message) = applied(
                    blocking("committing", move || {
                        repo::commit(&dir, &message, paths.as_deref(), &author, time_ms)
                    })
                    .await,
                );
                self.broadcast(
                    Some(session),
                    Event::Committed {
                        commit: commit.clone(),
                        message,
                        by,
                    },
                );
                Ok(Reply::Committed { commit })
            }
            Op::GitLog { limit } => {
                let limit = limit.unwrap_or(50).clamp(1, 1000) as usize;
                let dir = self.dir.path().to_path_buf();
                let commits = blocking("reading the log", move || repo::log(&dir, limit)).await?;
                Ok(Reply::Log { commits })
            }
            Op::GitBranches => Ok(Reply::Branches {
                branches: self.store.branches(self.key.project_id).await?,
            }),
            Op::GitCreateBranch { name } => {
                repo::validate_branch_name(&name)?;
                let dir = self.dir.path().to_path_buf();
                let scratch = self.settings.root.clone();
                let branch = name.clone();
                let (data, head) = blocking("creating the branch", move || {
                    repo::branch_snapshot(&dir, &branch, &scratch)
                })
                .await?;
                let key = WorkspaceKey::new(self.key.project_id, name.clone());
                let meta = self
                    .store
                    .create_branch(
                        &key,
                        NewSnapshot {
                            data,
                            author: Some(who.username.clone()),
                            journal_seq: 0,
                            keep: self.settings.snapshots_kept,
                        },
                    )
                    .await?;
                self.broadcast(
                    Some(session),
                    Event::BranchCreated {
                        branch: name.clone(),
                        head: head.clone(),
                        by,
                    },
                );
                Ok(Reply::BranchCreated {
                    branch: name,
                    head,
                    snapshot_version: meta.version,
                })
            }
        }
    }

    fn take_lock(
        &mut self,
        myself: &ActorRef<WorkspaceMsg>,
        who: &SessionInfo,
        ttl_ms: Option<u64>,
    ) -> OpResult {
        self.check_lock(&who.id)?;
        let ttl = ttl_ms
            .map(Duration::from_millis)
            .unwrap_or(self.settings.lock_ttl);
        if ttl.is_zero() || ttl > self.settings.max_lock_ttl {
            return Err(OpError::bad_request(format!(
                "ttl_ms must be between 1 and {}",
                self.settings.max_lock_ttl.as_millis()
            )));
        }
        self.lock_generation += 1;
        let info = LockInfo {
            holder: who.id.clone(),
            user: who.username.clone(),
            expires_at: now_ms() + ttl.as_millis() as i64,
        };
        self.lock = Some(EditLock {
            info: info.clone(),
            deadline: Instant::now() + ttl,
            generation: self.lock_generation,
        });
        let generation = self.lock_generation;
        // The timer only posts a message: the actor never waits for it.
        myself.send_after(ttl, move || WorkspaceMsg::LockExpired { generation });
        self.broadcast(
            Some(&who.id),
            Event::lock_changed(Some(&info), Some(who.doer())),
        );
        Ok(Reply::LockTaken {
            holder: info.holder,
            user: info.user,
            expires_at: info.expires_at,
        })
    }

    /// Appends a change's record under the fence. Called after the change
    /// was checked and before it is applied: once this returns, the change
    /// survives any crash, and only then is it applied and acknowledged.
    async fn record(&mut self, record: Vec<u8>) -> Result<(), OpError> {
        self.check_writable()?;
        let seq = self
            .store
            .append_journal(&self.key, &self.fence, &record)
            .await?;
        self.journal_seq = seq;
        let now = Instant::now();
        self.dirty = true;
        self.last_change = Some(now);
        self.dirty_since.get_or_insert(now);
        Ok(())
    }

    /// Saves unsaved changes once they have been quiet for the autosave
    /// period, or have waited the longest autosave period.
    async fn autosave(&mut self, myself: &ActorRef<WorkspaceMsg>) {
        let now = Instant::now();
        let quiet = self
            .last_change
            .is_some_and(|at| now.duration_since(at) >= self.settings.autosave_quiet);
        let overdue = self
            .dirty_since
            .is_some_and(|at| now.duration_since(at) >= self.settings.autosave_max);
        if self.dirty && (quiet || overdue) && self.saving.is_none() {
            self.request_save(myself, SaveWaiter::Auto).await;
        }
    }

    /// Refuses writes while this node cannot renew its heartbeat: another
    /// node may be about to take the workspace over.
    fn check_writable(&self) -> Result<(), OpError> {
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

    /// Asks for a save. Nothing changed and nothing running: answered at
    /// once. A save running that covers every change so far: the waiter
    /// joins it. Otherwise the waiter is served by a new run (now, or after
    /// the running one).
    async fn request_save(&mut self, myself: &ActorRef<WorkspaceMsg>, waiter: SaveWaiter) {
        match &mut self.saving {
            Some(run) if run.journal_seq == self.journal_seq => run.waiters.push(waiter),
            Some(_) => self.save_queue.push(waiter),
            None if !self.dirty => {
                let version = self.snapshot_version;
                self.answer_save(vec![waiter], Ok((version, false)));
            }
            None => self.start_save(myself, vec![waiter]).await,
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
        self.saving = Some(SaveRun {
            journal_seq,
            started: Instant::now(),
            waiters,
        });
        let (store, key, fence, keep) = (
            self.store.clone(),
            self.key.clone(),
            self.fence.clone(),
            self.settings.snapshots_kept,
        );
        let myself = myself.clone();
        tokio::spawn(async move {
            let packed = blocking("packing the working dir", move || {
                snapshot::pack(copy.path())
                    .map_err(|e| OpError::internal("packing the working dir", e))
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
    async fn save_done(&mut self, myself: &ActorRef<WorkspaceMsg>, result: Result<i64, OpError>) {
        let Some(run) = self.saving.take() else {
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
        let queued = std::mem::take(&mut self.save_queue);
        if !queued.is_empty() {
            if self.dirty {
                self.start_save(myself, queued).await;
            } else {
                let version = self.snapshot_version;
                self.answer_save(queued, Ok((version, false)));
            }
        }
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

/// A handle on a running workspace actor: the typed way to talk to it.
#[derive(Clone)]
pub struct Workspace {
    actor: ActorRef<WorkspaceMsg>,
    timeout: Duration,
}

/// How long a caller waits for a workspace's answer before giving up.
pub const CALL_TIMEOUT: Duration = Duration::from_secs(120);

impl Workspace {
    /// Starts a workspace actor (unlinked) and waits until it is active.
    /// A branch with no snapshot is `not_found`.
    pub async fn start(
        args: WorkspaceArgs,
    ) -> Result<(Workspace, tokio::task::JoinHandle<()>), OpError> {
        match Actor::spawn(None, WorkspaceActor, args).await {
            Ok((actor, handle)) => Ok((Workspace::from_ref(actor), handle)),
            Err(err) => Err(startup_error(err)),
        }
    }

    /// Starts a workspace actor supervised by `supervisor` (which learns of
    /// its failures) and waits until it is active.
    pub async fn start_linked(
        args: WorkspaceArgs,
        supervisor: ractor::ActorCell,
    ) -> Result<Workspace, OpError> {
        match Actor::spawn_linked(None, WorkspaceActor, args, supervisor).await {
            Ok((actor, _)) => Ok(Workspace::from_ref(actor)),
            Err(err) => Err(startup_error(err)),
        }
    }

    pub fn from_ref(actor: ActorRef<WorkspaceMsg>) -> Workspace {
        Workspace {
            actor,
            timeout: CALL_TIMEOUT,
        }
    }

    pub fn actor(&self) -> &ActorRef<WorkspaceMsg> {
        &self.actor
    }

    async fn ask<T: Send + 'static>(
        &self,
        build: impl FnOnce(RpcReplyPort<T>) -> WorkspaceMsg,
    ) -> Result<T, OpError> {
        match self.actor.call(build, Some(self.timeout)).await {
            Ok(CallResult::Success(value)) => Ok(value),
            Ok(CallResult::Timeout) => Err(OpError::new(
                ErrorCode::Unavailable,
                format!(
                    "the workspace did not answer within {} s; retry",
                    self.timeout.as_secs()
                ),
            )),
            Ok(CallResult::SenderError) | Err(_) => Err(OpError::new(
                ErrorCode::Unavailable,
                "the workspace stopped; reconnect",
            )),
        }
    }

    pub async fn attach(
        &self,
        session: SessionInfo,
        events: impl Into<EventSink>,
    ) -> Result<Welcome, OpError> {
        let events = events.into();
        self.ask(|reply| WorkspaceMsg::Attach {
            session,
            events,
            reply: Some(reply),
        })
        .await?
    }

    /// Attaches without waiting for the answer (re-attaching after a restart).
    pub fn reattach(&self, session: SessionInfo, events: EventSink) {
        let _ = self.actor.cast(WorkspaceMsg::Attach {
            session,
            events,
            reply: None,
        });
    }

    /// Saves if anything changed: the snapshot version and whether it is new.
    pub async fn save(&self) -> Result<(i64, bool), OpError> {
        self.ask(|reply| WorkspaceMsg::Save { reply }).await?
    }

    pub fn detach(&self, session: &SessionId) {
        let _ = self.actor.cast(WorkspaceMsg::Detach {
            session: session.clone(),
        });
    }

    pub async fn op(&self, session: &SessionId, op: Op) -> OpResult {
        self.ask(|reply| WorkspaceMsg::Op {
            session: session.clone(),
            op,
            reply: reply.into(),
        })
        .await?
    }

    pub async fn info(&self) -> Result<WorkspaceInfo, OpError> {
        self.ask(|reply| WorkspaceMsg::Info { reply }).await
    }

    /// Stops the actor after the messages already queued, and waits.
    pub async fn stop(&self) {
        let _ = self.actor.stop_and_wait(None, Some(self.timeout)).await;
    }
}

/// The client-facing error for an actor that failed to start.
fn startup_error(err: SpawnErr) -> OpError {
    match err {
        SpawnErr::StartupFailed(inner) => match inner.downcast::<OpError>() {
            Ok(op_error) => *op_error,
            Err(other) => OpError::internal("activating the workspace", other),
        },
        other => OpError::internal("activating the workspace", other),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::storage;
    use crate::workspace::first_snapshot;

    #[tokio::test]
    async fn a_panic_in_the_actor_removes_its_working_dir() {
        let data = tempfile::tempdir().expect("data");
        let store = storage::open(&storage::sqlite::default_url(data.path()), 2)
            .await
            .expect("store");
        let owner = store
            .create_user(storage::NewUser {
                username: "u".into(),
                display_name: "U".into(),
                email: "u@example.com".into(),
                password_hash: "x".into(),
                is_admin: false,
            })
            .await
            .expect("user");
        let author = GitAuthor {
            name: "U".into(),
            email: "u@example.com".into(),
        };
        let first = first_snapshot(data.path(), "main", "# t\n", &author).expect("snapshot");
        let (project, _) = store
            .create_project(
                "t",
                owner.id,
                "main",
                NewSnapshot {
                    data: first,
                    author: None,
                    journal_seq: 0,
                    keep: 10,
                },
            )
            .await
            .expect("project");
        let mut config = Config::from_env().expect("config");
        config.database.data_dir = data.path().to_path_buf();
        config.workspace_dir = None;
        let key = WorkspaceKey::new(project.id, "main");
        store.register_node("t", None, None).await.expect("node");
        let fence = match store.claim(&key, "t", 60_000).await.expect("claim") {
            crate::storage::ClaimOutcome::Owned(claim) => claim.fence().expect("owner"),
            other => panic!("{other:?}"),
        };
        let (workspace, handle) = Workspace::start(WorkspaceArgs {
            key,
            store,
            settings: WorkspaceSettings::from_config(&config),
            fence,
        })
        .await
        .expect("start");
        let dir = workspace.info().await.expect("info").dir;
        assert!(dir.join("README.md").is_file());

        workspace.actor().cast(WorkspaceMsg::Panic).expect("cast");
        handle.await.expect("actor task ends");
        assert!(!dir.exists(), "the working dir is removed after a panic");
    }
}
