//! The one implementation of [`Store`], shared by SQLite and Postgres through
//! sqlx's `Any` driver.
//!
//! Every statement is written once, with `$N` parameters (both backends accept
//! them) and the `{now}`/`{share_lock}` placeholders of [`Dialect`]. Runtime
//! queries only (no `query!` macros), so the crate builds with no database at
//! hand. This directory is the only place in branchd that holds SQL.
//!
//! One file per group of tables, each holding the statements of its tables
//! as functions over the [`SqlStore`]: [`users`] (users and login tokens),
//! [`projects`] (projects and members), [`snapshots`], [`claims`] (ownership
//! and fencing), [`failures`] (workspaces failed cluster-wide), [`sessions`] (WebSocket session rows), [`nodes`] (cluster
//! membership) and [`journal`] (the group committer and replay reads). This
//! file holds the connection pools (the shared one, and the heartbeat's
//! own), the SQLite writers' turns and the [`Store`] impl, one dispatch
//! line per method.
//!
//! Statements must never be built from values: only from the crate's own
//! fragments and `$N` parameters.

mod claims;
mod failures;
mod journal;
mod nodes;
mod projects;
mod sessions;
mod snapshots;
mod users;

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use sqlx::any::{AnyPoolOptions, AnyRow};
use sqlx::{Any, AnyPool, Row, Transaction};

use super::dialect::Dialect;
use super::*;
use journal::{JournalCommitter, PendingAppend};

/// A [`Store`] over a pool of SQLite or Postgres connections.
pub struct SqlStore {
    pool: AnyPool,
    /// The node's own row (heartbeat, announcing) on a connection of its
    /// own, opened on first use: a renewal never waits for a connection
    /// behind other work, however busy the pool is.
    heartbeat_pool: AnyPool,
    backend: Backend,
    dialect: &'static Dialect,
    /// Journal appends go through one committer task per store (group
    /// commit, see [`JournalCommitter`]).
    journal: tokio::sync::mpsc::UnboundedSender<PendingAppend>,
    /// SQLite only: the turns of the writers that must not starve.
    writers: Option<WriteTurns>,
}

/// SQLite has one writer at a time, and a connection that finds the write
/// lock taken polls for it (sleeping up to 100 ms between tries). A writer
/// that comes straight back, as the journal committer does under load,
/// wins nearly every time, and the heartbeat waited seconds behind large
/// journal writes (issue 17, item 13). The journal committer and the
/// heartbeat therefore take their turns here, first come first served, so
/// a heartbeat waits for at most the one transaction under way. Postgres
/// locks rows, not the database, and needs none of this.
#[derive(Clone, Default)]
struct WriteTurns(Arc<tokio::sync::Mutex<()>>);

impl WriteTurns {
    /// Waits for this writer's turn; the turn ends when the guard drops.
    async fn take(turns: &Option<WriteTurns>) -> Option<tokio::sync::OwnedMutexGuard<()>> {
        match turns {
            Some(turns) => Some(turns.0.clone().lock_owned().await),
            None => None,
        }
    }
}

impl SqlStore {
    /// Connects to a database URL (`sqlite://...` or `postgres://...`)
    /// without applying migrations.
    pub async fn connect(url: &str, max_connections: u32) -> StoreResult<SqlStore> {
        sqlx::any::install_default_drivers();
        let backend = Backend::from_url(url)?;
        let options = |max: u32| {
            let options = AnyPoolOptions::new()
                .max_connections(max)
                .acquire_timeout(Duration::from_secs(10));
            match backend {
                Backend::Sqlite => {
                    let writable = !sqlite::read_only_url(url);
                    options.after_connect(move |conn, _meta| {
                        Box::pin(sqlite::configure(conn, writable))
                    })
                }
                Backend::Postgres => options,
            }
        };
        let dialect = match backend {
            Backend::Sqlite => &sqlite::DIALECT,
            Backend::Postgres => &postgres::DIALECT,
        };
        let url = match backend {
            Backend::Sqlite => sqlite::prepare_url(url).map_err(|e| {
                StoreError::Config(format!("creating the directory of {url:?}: {e}"))
            })?,
            Backend::Postgres => url.to_string(),
        };
        let pool = options(max_connections.max(1)).connect(&url).await?;
        // Lazy: tools that never renew a heartbeat never open it.
        let heartbeat_pool = options(1).connect_lazy(&url)?;
        let writers = (backend == Backend::Sqlite).then(WriteTurns::default);
        let (journal, queue) = tokio::sync::mpsc::unbounded_channel();
        let committer = JournalCommitter {
            pool: pool.clone(),
            dialect,
            writers: writers.clone(),
        };
        // Ends when the store (the queue's only sender) is dropped. Not on
        // the node's shutdown tracker: the store lives below the node (tools
        // and tests open one with no node), and nothing in the queue is
        // unwaited: every append is awaited by its caller, a tracked task,
        // so a drain that waits for its tasks waits for their appends.
        tokio::spawn(committer.run(queue));
        Ok(SqlStore {
            pool,
            heartbeat_pool,
            backend,
            dialect,
            journal,
            writers,
        })
    }

    /// Applies every migration this build carries that the database lacks.
    pub async fn migrate(&self) -> StoreResult<()> {
        self.migrator().run(&self.pool).await?;
        Ok(())
    }

    /// Closes the pools, waiting for connections in use to come back.
    pub async fn close(&self) {
        self.heartbeat_pool.close().await;
        self.pool.close().await;
    }

    fn migrator(&self) -> &'static sqlx::migrate::Migrator {
        match self.backend {
            Backend::Sqlite => &sqlite::MIGRATOR,
            Backend::Postgres => &postgres::MIGRATOR,
        }
    }

    /// Opens a transaction that will write (see [`Dialect::begin_write`]).
    async fn begin_write(&self) -> StoreResult<Transaction<'static, Any>> {
        Ok(self.pool.begin_with(self.dialect.begin_write).await?)
    }
}

pub(super) fn key(row: &AnyRow) -> Result<WorkspaceKey, sqlx::Error> {
    Ok(WorkspaceKey {
        project_id: row.try_get("project_id")?,
        branch: row.try_get("branch")?,
    })
}

pub(super) fn all<T>(
    rows: Vec<AnyRow>,
    map: impl Fn(&AnyRow) -> Result<T, sqlx::Error>,
) -> StoreResult<Vec<T>> {
    rows.iter()
        .map(|row| map(row).map_err(StoreError::from))
        .collect()
}

/// Turns a uniqueness violation into a `Conflict` with the caller's words.
pub(super) fn unique_violation(err: sqlx::Error, message: impl FnOnce() -> String) -> StoreError {
    match &err {
        sqlx::Error::Database(db) if db.is_unique_violation() => StoreError::Conflict(message()),
        _ => err.into(),
    }
}

#[async_trait]
impl Store for SqlStore {
    fn backend(&self) -> Backend {
        self.backend
    }

    async fn now_ms(&self) -> StoreResult<i64> {
        Ok(sqlx::query_scalar(self.dialect.sql("SELECT {now}"))
            .fetch_one(&self.pool)
            .await?)
    }

    async fn ready(&self) -> StoreResult<bool> {
        let latest = self.migrator().iter().map(|m| m.version).max().unwrap_or(0);
        let applied: Option<i64> =
            sqlx::query_scalar("SELECT MAX(version) FROM _sqlx_migrations WHERE success = $1")
                .bind(true)
                .fetch_one(&self.pool)
                .await?;
        Ok(applied == Some(latest))
    }

    async fn create_user(&self, user: NewUser) -> StoreResult<User> {
        users::create_user(self, user).await
    }

    async fn user_count(&self) -> StoreResult<i64> {
        users::user_count(self).await
    }

    async fn user_by_id(&self, id: i64) -> StoreResult<Option<User>> {
        users::user_by_id(self, id).await
    }

    async fn user_by_name(&self, username: &str) -> StoreResult<Option<(User, String)>> {
        users::user_by_name(self, username).await
    }

    async fn list_users(&self) -> StoreResult<Vec<User>> {
        users::list_users(self).await
    }

    async fn set_password(&self, user_id: i64, password_hash: &str) -> StoreResult<()> {
        users::set_password(self, user_id, password_hash).await
    }

    async fn create_auth_session(
        &self,
        token_hash: &str,
        user_id: i64,
        ttl_ms: i64,
    ) -> StoreResult<i64> {
        users::create_auth_session(self, token_hash, user_id, ttl_ms).await
    }

    async fn auth_session(&self, token_hash: &str) -> StoreResult<Option<AuthSession>> {
        users::auth_session(self, token_hash).await
    }

    async fn delete_auth_session(&self, token_hash: &str) -> StoreResult<bool> {
        users::delete_auth_session(self, token_hash).await
    }

    async fn purge_expired_auth_sessions(&self) -> StoreResult<u64> {
        users::purge_expired_auth_sessions(self).await
    }

    async fn create_project(
        &self,
        name: &str,
        owner: i64,
        branch: &str,
        first: NewSnapshot,
    ) -> StoreResult<(Project, SnapshotMeta)> {
        projects::create_project(self, name, owner, branch, first).await
    }

    async fn project(&self, id: i64) -> StoreResult<Option<Project>> {
        projects::project(self, id).await
    }

    async fn projects_of_user(&self, user_id: i64) -> StoreResult<Vec<(Project, Role)>> {
        projects::projects_of_user(self, user_id).await
    }

    async fn all_projects(&self) -> StoreResult<Vec<Project>> {
        projects::all_projects(self).await
    }

    async fn delete_project(&self, id: i64) -> StoreResult<bool> {
        projects::delete_project(self, id).await
    }

    async fn member_role(&self, project_id: i64, user_id: i64) -> StoreResult<Option<Role>> {
        projects::member_role(self, project_id, user_id).await
    }

    async fn members(&self, project_id: i64) -> StoreResult<Vec<Member>> {
        projects::members(self, project_id).await
    }

    async fn set_member(&self, project_id: i64, user_id: i64, role: Role) -> StoreResult<()> {
        projects::set_member(self, project_id, user_id, role).await
    }

    async fn remove_member(&self, project_id: i64, user_id: i64) -> StoreResult<bool> {
        projects::remove_member(self, project_id, user_id).await
    }

    async fn put_snapshot(
        &self,
        key: &WorkspaceKey,
        snapshot: NewSnapshot,
        fence: Option<&Fence>,
    ) -> StoreResult<SnapshotMeta> {
        snapshots::put_snapshot(self, key, snapshot, fence).await
    }

    async fn create_branch(
        &self,
        key: &WorkspaceKey,
        snapshot: NewSnapshot,
    ) -> StoreResult<SnapshotMeta> {
        snapshots::create_branch(self, key, snapshot).await
    }

    async fn latest_snapshot(&self, key: &WorkspaceKey) -> StoreResult<Option<Snapshot>> {
        snapshots::latest_snapshot(self, key).await
    }

    async fn snapshot(&self, key: &WorkspaceKey, version: i64) -> StoreResult<Option<Snapshot>> {
        snapshots::snapshot(self, key, version).await
    }

    async fn list_snapshots(&self, key: &WorkspaceKey) -> StoreResult<Vec<SnapshotMeta>> {
        snapshots::list_snapshots(self, key).await
    }

    async fn branches(&self, project_id: i64) -> StoreResult<Vec<String>> {
        snapshots::branches(self, project_id).await
    }

    async fn claim(
        &self,
        key: &WorkspaceKey,
        server_tag: &str,
        lease_ms: i64,
    ) -> StoreResult<ClaimOutcome> {
        claims::claim(self, key, server_tag, lease_ms).await
    }

    async fn claim_of(&self, key: &WorkspaceKey) -> StoreResult<Option<Claim>> {
        claims::claim_of(self, key).await
    }

    async fn claims_of_node(&self, server_tag: &str) -> StoreResult<Vec<Claim>> {
        claims::claims_of_node(self, server_tag).await
    }

    async fn release_claim(&self, key: &WorkspaceKey, fence: &Fence) -> StoreResult<bool> {
        claims::release_claim(self, key, fence).await
    }

    async fn mark_failed(
        &self,
        key: &WorkspaceKey,
        reason: &str,
        server_tag: &str,
        for_ms: i64,
    ) -> StoreResult<()> {
        failures::mark_failed(self, key, reason, server_tag, for_ms).await
    }

    async fn failure_of(&self, key: &WorkspaceKey) -> StoreResult<Option<Failure>> {
        failures::failure_of(self, key).await
    }

    async fn failures(&self) -> StoreResult<Vec<Failure>> {
        failures::failures(self).await
    }

    async fn clear_failure(&self, key: &WorkspaceKey) -> StoreResult<bool> {
        failures::clear_failure(self, key).await
    }

    async fn attach_session(&self, session: &WsSession) -> StoreResult<()> {
        sessions::attach_session(self, session).await
    }

    async fn detach_session(&self, id: &str) -> StoreResult<Option<WorkspaceKey>> {
        sessions::detach_session(self, id).await
    }

    async fn sessions_of(&self, key: &WorkspaceKey) -> StoreResult<Vec<WsSession>> {
        sessions::sessions_of(self, key).await
    }

    async fn wipe_server_tag(&self, server_tag: &str) -> StoreResult<WipeReport> {
        sessions::wipe_server_tag(self, server_tag).await
    }

    async fn append_journal(
        &self,
        key: &WorkspaceKey,
        fence: &Fence,
        op: &[u8],
    ) -> StoreResult<i64> {
        journal::append_journal(self, key, fence, op).await
    }

    async fn journal_after(
        &self,
        key: &WorkspaceKey,
        after_seq: i64,
    ) -> StoreResult<Vec<JournalEntry>> {
        journal::journal_after(self, key, after_seq).await
    }

    async fn register_node(
        &self,
        server_tag: &str,
        cluster_addr: Option<&str>,
        http_addr: Option<&str>,
    ) -> StoreResult<NodeRow> {
        nodes::register_node(self, server_tag, cluster_addr, http_addr).await
    }

    async fn heartbeat(&self, server_tag: &str) -> StoreResult<bool> {
        nodes::heartbeat(self, server_tag).await
    }

    async fn live_nodes(&self, lease_ms: i64) -> StoreResult<Vec<NodeRow>> {
        nodes::live_nodes(self, lease_ms).await
    }

    async fn remove_node(&self, server_tag: &str) -> StoreResult<bool> {
        nodes::remove_node(self, server_tag).await
    }

    async fn remove_node_if_stale(&self, server_tag: &str, lease_ms: i64) -> StoreResult<bool> {
        nodes::remove_node_if_stale(self, server_tag, lease_ms).await
    }

    async fn nodes_with_age(&self) -> StoreResult<Vec<(NodeRow, i64)>> {
        nodes::nodes_with_age(self).await
    }

    async fn owned_claims(&self) -> StoreResult<Vec<Claim>> {
        claims::owned_claims(self).await
    }
}
