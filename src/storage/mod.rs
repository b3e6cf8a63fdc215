//! The durable state of branchd: users, tokens, projects, snapshots, claims,
//! sessions, the journal and cluster membership.
//!
//! [`Store`] is the one interface the rest of the service uses. It is
//! implemented once, in [`sql`], over sqlx's `Any` driver, so the same code and
//! the same SQL serve both backends; [`sqlite`] (the embedded single-node
//! default) and [`postgres`] (required for more than one node) hold what differs
//! between them: connection set-up, migrations and a few SQL fragments.
//!
//! Times are milliseconds since the Unix epoch and are taken from the
//! database's clock, never the node's, so that every node of a cluster judges
//! leases and expiry by the same clock.
//!
//! This module must never know about HTTP, WebSockets or actors: it stores and
//! answers, and its errors say what went wrong in storage terms.

mod dialect;
pub mod postgres;
mod sql;
pub mod sqlite;

use std::sync::Arc;

use async_trait::async_trait;
use serde::{Deserialize, Serialize};

pub use crate::protocol::Role;
pub use sql::SqlStore;

/// What can go wrong in the store, in terms the callers can act on.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// A uniqueness or consistency rule would be broken (duplicate username,
    /// removing a project's last owner, ...). The text says which.
    #[error("{0}")]
    Conflict(String),
    /// The thing the caller named does not exist.
    #[error("{0}")]
    NotFound(String),
    /// A durable write was attempted under an epoch that is no longer the
    /// current owner's: the caller has lost ownership and must not retry.
    #[error("fenced: workspace {key} is no longer owned by {server_tag} at epoch {epoch}")]
    Fenced {
        key: WorkspaceKey,
        server_tag: String,
        epoch: i64,
    },
    /// The database could not be reached or failed. Shared, because one
    /// failed group commit fails every append of its batch with it.
    #[error("database error: {0}")]
    Database(Arc<sqlx::Error>),
    /// Applying migrations failed.
    #[error("migration failed: {0}")]
    Migrate(#[from] sqlx::migrate::MigrateError),
    /// The database URL or its options are unusable: the operator must
    /// change the configuration.
    #[error("bad database configuration: {0}")]
    Config(String),
    /// Something that must not happen did (an invariant of the store broke,
    /// or one of its own tasks is gone). Neither the caller's fault nor the
    /// configuration's; retrying does not help. The text says what.
    #[error("internal storage error: {0}")]
    Internal(String),
}

impl From<sqlx::Error> for StoreError {
    fn from(err: sqlx::Error) -> Self {
        StoreError::Database(Arc::new(err))
    }
}

pub type StoreResult<T> = Result<T, StoreError>;

/// How a storage failure reaches a client: the one mapping from store
/// errors to protocol error codes, used by every boundary (the HTTP API
/// goes through it too). Every variant is listed, so a new one must choose.
impl From<StoreError> for crate::protocol::OpError {
    fn from(err: StoreError) -> Self {
        use crate::protocol::{ErrorCode, OpError};
        match err {
            StoreError::Conflict(message) => OpError::conflict(message, None),
            StoreError::NotFound(message) => OpError::not_found(message),
            StoreError::Fenced { .. } => OpError::new(
                ErrorCode::Unavailable,
                "this node no longer owns the workspace; reconnect",
            ),
            StoreError::Database(e) => {
                tracing::error!(error = %e, "database error");
                OpError::new(
                    ErrorCode::Unavailable,
                    "the database is unavailable; retry shortly",
                )
            }
            err @ (StoreError::Migrate(_) | StoreError::Config(_) | StoreError::Internal(_)) => {
                OpError::internal("storage", err)
            }
        }
    }
}

/// Which SQL backend a store speaks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    Sqlite,
    Postgres,
}

impl Backend {
    /// The backend a database URL names, or an error saying which schemes work.
    pub fn from_url(url: &str) -> StoreResult<Backend> {
        if url.starts_with("sqlite:") {
            Ok(Backend::Sqlite)
        } else if url.starts_with("postgres:") || url.starts_with("postgresql:") {
            Ok(Backend::Postgres)
        } else {
            Err(StoreError::Config(format!(
                "unsupported database URL {:?}: use sqlite://PATH or postgres://USER@HOST/DB",
                redact_url(url)
            )))
        }
    }
}

/// A database URL with any password replaced by `***`, for logs and errors.
pub fn redact_url(url: &str) -> String {
    match (url.find("://"), url.rfind('@')) {
        (Some(scheme_end), Some(at)) if at > scheme_end => {
            let userinfo = &url[scheme_end + 3..at];
            match userinfo.find(':') {
                Some(colon) => format!(
                    "{}{}:***{}",
                    &url[..scheme_end + 3],
                    &userinfo[..colon],
                    &url[at..]
                ),
                None => url.to_string(),
            }
        }
        _ => url.to_string(),
    }
}

/// Opens the store a URL names and applies its migrations.
pub async fn open(url: &str, max_connections: u32) -> StoreResult<Arc<dyn Store>> {
    let store = SqlStore::connect(url, max_connections).await?;
    store.migrate().await?;
    Ok(Arc::new(store))
}

/// Identifies one workspace: a branch of a project.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct WorkspaceKey {
    pub project_id: i64,
    pub branch: String,
}

impl WorkspaceKey {
    pub fn new(project_id: i64, branch: impl Into<String>) -> Self {
        WorkspaceKey {
            project_id,
            branch: branch.into(),
        }
    }
}

impl std::fmt::Display for WorkspaceKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}:{}", self.project_id, self.branch)
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct User {
    pub id: i64,
    pub username: String,
    pub display_name: String,
    pub email: String,
    pub is_admin: bool,
    pub created_at: i64,
}

/// A user to create; the password is already hashed.
#[derive(Debug, Clone)]
pub struct NewUser {
    pub username: String,
    pub display_name: String,
    pub email: String,
    pub password_hash: String,
    pub is_admin: bool,
}

/// A login token's owner and expiry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AuthSession {
    pub user: User,
    pub expires_at: i64,
    /// True once `expires_at` has passed (by the database clock): the token
    /// must then be refused.
    pub expired: bool,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Project {
    pub id: i64,
    pub name: String,
    pub created_by: Option<i64>,
    pub created_at: i64,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Member {
    pub user_id: i64,
    pub username: String,
    pub role: Role,
}

/// A snapshot's description, without its bytes.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct SnapshotMeta {
    pub key: WorkspaceKey,
    pub version: i64,
    pub sha256: String,
    pub size: i64,
    /// The last journal sequence number this snapshot contains; replay starts after it.
    pub journal_seq: i64,
    pub author: Option<String>,
    pub created_at: i64,
}

#[derive(Debug, Clone)]
pub struct Snapshot {
    pub meta: SnapshotMeta,
    pub data: Vec<u8>,
}

/// A snapshot to store as the next version of its branch.
#[derive(Debug, Clone)]
pub struct NewSnapshot {
    pub data: Vec<u8>,
    pub author: Option<String>,
    /// Journal entries up to and including this sequence number are contained
    /// in the snapshot and are trimmed in the same transaction.
    pub journal_seq: i64,
    /// How many versions of the branch to keep, this one included (at least 1).
    pub keep: u32,
}

/// The proof of ownership a durable write carries.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Fence {
    pub server_tag: String,
    pub epoch: i64,
}

/// A workspace's ownership row.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Claim {
    pub key: WorkspaceKey,
    /// The owning node, or `None` when released.
    pub server_tag: Option<String>,
    pub epoch: i64,
    pub updated_at: i64,
}

impl Claim {
    /// The fence its owner writes under (`None` when released).
    pub fn fence(&self) -> Option<Fence> {
        self.server_tag.as_ref().map(|tag| Fence {
            server_tag: tag.clone(),
            epoch: self.epoch,
        })
    }
}

/// A workspace failed for the whole cluster (`failed_workspaces`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Failure {
    pub key: WorkspaceKey,
    pub reason: String,
    /// The node where it failed.
    pub server_tag: String,
    pub failed_at: i64,
    pub until_at: i64,
    /// How long it stays failed, in ms (database clock).
    pub left_ms: i64,
}

/// What a claim attempt found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ClaimOutcome {
    /// The caller owns the key: newly (epoch bumped) or already.
    Owned(Claim),
    /// Another node with a live heartbeat owns it.
    HeldBy(Claim),
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JournalEntry {
    pub seq: i64,
    pub epoch: i64,
    pub op: Vec<u8>,
    pub created_at: i64,
}

/// One connected client's row: the cluster-wide record of who is connected
/// where, wiped with its node's server tag. Not a reference count: the
/// allocator counts its own sessions in memory.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct WsSession {
    pub id: String,
    pub user_id: i64,
    pub key: WorkspaceKey,
    pub server_tag: String,
    pub connected_at: i64,
}

/// What wiping a server tag removed.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct WipeReport {
    pub sessions: u64,
    pub claims: u64,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct NodeRow {
    pub server_tag: String,
    pub cluster_addr: Option<String>,
    pub http_addr: Option<String>,
    pub started_at: i64,
    pub heartbeat_at: i64,
}

/// Every durable operation branchd performs. Implementations must be safe to
/// share between tasks and between nodes using the same database.
#[async_trait]
pub trait Store: Send + Sync + 'static {
    /// Which backend this is.
    fn backend(&self) -> Backend;
    /// The database's clock, in ms since the epoch.
    async fn now_ms(&self) -> StoreResult<i64>;
    /// True when the database answers and every migration this build knows is applied.
    async fn ready(&self) -> StoreResult<bool>;

    // ---- users and login tokens
    async fn create_user(&self, user: NewUser) -> StoreResult<User>;
    async fn user_count(&self) -> StoreResult<i64>;
    async fn user_by_id(&self, id: i64) -> StoreResult<Option<User>>;
    /// The user and their password hash.
    async fn user_by_name(&self, username: &str) -> StoreResult<Option<(User, String)>>;
    async fn list_users(&self) -> StoreResult<Vec<User>>;
    /// Replaces a user's password hash and revokes all of their login tokens.
    async fn set_password(&self, user_id: i64, password_hash: &str) -> StoreResult<()>;
    /// Stores a token (by its hash) valid for `ttl_ms`; returns its expiry.
    async fn create_auth_session(
        &self,
        token_hash: &str,
        user_id: i64,
        ttl_ms: i64,
    ) -> StoreResult<i64>;
    /// The token's session, expired or not; `None` for an unknown token.
    async fn auth_session(&self, token_hash: &str) -> StoreResult<Option<AuthSession>>;
    async fn delete_auth_session(&self, token_hash: &str) -> StoreResult<bool>;
    async fn purge_expired_auth_sessions(&self) -> StoreResult<u64>;

    // ---- projects and members
    /// Creates a project, makes `owner` its owner and stores `first` as version
    /// 1 of `branch`, all or nothing.
    async fn create_project(
        &self,
        name: &str,
        owner: i64,
        branch: &str,
        first: NewSnapshot,
    ) -> StoreResult<(Project, SnapshotMeta)>;
    async fn project(&self, id: i64) -> StoreResult<Option<Project>>;
    /// Projects the user is a member of, with their role, oldest first.
    async fn projects_of_user(&self, user_id: i64) -> StoreResult<Vec<(Project, Role)>>;
    async fn all_projects(&self) -> StoreResult<Vec<Project>>;
    /// Deletes a project and everything stored under it.
    async fn delete_project(&self, id: i64) -> StoreResult<bool>;
    async fn member_role(&self, project_id: i64, user_id: i64) -> StoreResult<Option<Role>>;
    async fn members(&self, project_id: i64) -> StoreResult<Vec<Member>>;
    /// Adds a member or changes their role. Refuses (`Conflict`) to leave the
    /// project without an owner.
    async fn set_member(&self, project_id: i64, user_id: i64, role: Role) -> StoreResult<()>;
    /// Removes a member; `false` if they were not one. Refuses (`Conflict`) to
    /// remove the last owner.
    async fn remove_member(&self, project_id: i64, user_id: i64) -> StoreResult<bool>;

    // ---- snapshots
    /// Stores the next version of a branch, trims the journal entries it
    /// covers and drops versions beyond `keep`, in one transaction. With a
    /// fence, fails with `Fenced` unless the fence is the current claim.
    async fn put_snapshot(
        &self,
        key: &WorkspaceKey,
        snapshot: NewSnapshot,
        fence: Option<&Fence>,
    ) -> StoreResult<SnapshotMeta>;
    /// Stores version 1 of a branch that has no snapshot yet; `Conflict` if
    /// the branch already exists.
    async fn create_branch(
        &self,
        key: &WorkspaceKey,
        snapshot: NewSnapshot,
    ) -> StoreResult<SnapshotMeta>;
    async fn latest_snapshot(&self, key: &WorkspaceKey) -> StoreResult<Option<Snapshot>>;
    async fn snapshot(&self, key: &WorkspaceKey, version: i64) -> StoreResult<Option<Snapshot>>;
    /// Every kept version of a branch, newest first.
    async fn list_snapshots(&self, key: &WorkspaceKey) -> StoreResult<Vec<SnapshotMeta>>;
    /// The project's branches (those with at least one snapshot), sorted.
    async fn branches(&self, project_id: i64) -> StoreResult<Vec<String>>;

    // ---- ownership claims
    /// Claims a workspace for `server_tag` unless a node whose heartbeat is
    /// younger than `lease_ms` holds it. Taking it over bumps the epoch.
    async fn claim(
        &self,
        key: &WorkspaceKey,
        server_tag: &str,
        lease_ms: i64,
    ) -> StoreResult<ClaimOutcome>;
    async fn claim_of(&self, key: &WorkspaceKey) -> StoreResult<Option<Claim>>;
    /// Claims currently owned by a node.
    async fn claims_of_node(&self, server_tag: &str) -> StoreResult<Vec<Claim>>;
    /// Gives up ownership (the row stays, so epochs never repeat). `false` if
    /// the fence was no longer current.
    async fn release_claim(&self, key: &WorkspaceKey, fence: &Fence) -> StoreResult<bool>;

    // ---- failed workspaces
    /// Marks a key failed for every node, for `for_ms` from now (database
    /// clock), with its reason and the node where it failed.
    async fn mark_failed(
        &self,
        key: &WorkspaceKey,
        reason: &str,
        server_tag: &str,
        for_ms: i64,
    ) -> StoreResult<()>;
    /// The key's failure, if it is still in force.
    async fn failure_of(&self, key: &WorkspaceKey) -> StoreResult<Option<Failure>>;
    /// Every failure still in force.
    async fn failures(&self) -> StoreResult<Vec<Failure>>;
    /// Clears a key's failure (an operator's reset); whether one was in force.
    async fn clear_failure(&self, key: &WorkspaceKey) -> StoreResult<bool>;

    // ---- websocket session rows
    /// Records a session (one statement); `Conflict` if its id is taken.
    async fn attach_session(&self, session: &WsSession) -> StoreResult<()>;
    /// Removes a session's row; returns its key, or `None` if unknown.
    async fn detach_session(&self, id: &str) -> StoreResult<Option<WorkspaceKey>>;
    /// A key's session rows, of every node, oldest first.
    async fn sessions_of(&self, key: &WorkspaceKey) -> StoreResult<Vec<WsSession>>;
    /// Deletes every session and releases every claim a server tag holds (a
    /// node restarting after a crash, or a dead node's rows).
    async fn wipe_server_tag(&self, server_tag: &str) -> StoreResult<WipeReport>;

    // ---- journal
    /// Appends an operation under a fence; returns its sequence number, or
    /// `Fenced` if the fence is no longer the current claim.
    async fn append_journal(
        &self,
        key: &WorkspaceKey,
        fence: &Fence,
        op: &[u8],
    ) -> StoreResult<i64>;
    /// Entries with a sequence number above `after_seq`, in order.
    async fn journal_after(
        &self,
        key: &WorkspaceKey,
        after_seq: i64,
    ) -> StoreResult<Vec<JournalEntry>>;

    // ---- cluster membership
    /// Announces a node (re)starting: sets its addresses and `started_at`.
    async fn register_node(
        &self,
        server_tag: &str,
        cluster_addr: Option<&str>,
        http_addr: Option<&str>,
    ) -> StoreResult<NodeRow>;
    /// Renews a node's heartbeat; `false` if the node has no row.
    async fn heartbeat(&self, server_tag: &str) -> StoreResult<bool>;
    /// Nodes whose heartbeat is younger than `lease_ms`.
    async fn live_nodes(&self, lease_ms: i64) -> StoreResult<Vec<NodeRow>>;
    async fn remove_node(&self, server_tag: &str) -> StoreResult<bool>;
    /// Removes a node's row only if its heartbeat is at least `lease_ms`
    /// old (by the database clock); `true` if it did. A node that renewed
    /// in the meantime keeps its row.
    async fn remove_node_if_stale(&self, server_tag: &str, lease_ms: i64) -> StoreResult<bool>;
    /// Every node row with the age of its heartbeat in ms (database clock).
    async fn nodes_with_age(&self) -> StoreResult<Vec<(NodeRow, i64)>>;
    /// Every claim that names an owner.
    async fn owned_claims(&self) -> StoreResult<Vec<Claim>>;
}
