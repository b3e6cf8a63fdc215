//! The one implementation of [`Store`], shared by SQLite and Postgres through
//! sqlx's `Any` driver.
//!
//! Every statement is written once, with `$N` parameters (both backends accept
//! them) and the `{now}`/`{share_lock}` placeholders of [`Dialect`]. Runtime
//! queries only (no `query!` macros), so the crate builds with no database at
//! hand. This is the only file in branchd that holds SQL.

use std::time::Duration;

use async_trait::async_trait;
use sha2::{Digest, Sha256};
use sqlx::any::{AnyPoolOptions, AnyRow};
use sqlx::{Any, AnyPool, Row, Transaction};

use super::dialect::Dialect;
use super::*;

// Column lists shared by the statements that read each table.
macro_rules! user_columns {
    () => {
        "u.id, u.username, u.display_name, u.email, u.is_admin, u.created_at"
    };
}
macro_rules! project_columns {
    () => {
        "p.id, p.name, p.created_by, p.created_at"
    };
}
macro_rules! snapshot_columns {
    () => {
        "project_id, branch, version, sha256, size, journal_seq, author, created_at"
    };
}
macro_rules! claim_columns {
    () => {
        "project_id, branch, server_tag, epoch, ref_count, time_zeroed, updated_at"
    };
}
macro_rules! session_columns {
    () => {
        "id, user_id, project_id, branch, server_tag, connected_at"
    };
}
macro_rules! node_columns {
    () => {
        "server_tag, cluster_addr, http_addr, started_at, heartbeat_at"
    };
}

/// A [`Store`] over a pool of SQLite or Postgres connections.
pub struct SqlStore {
    pool: AnyPool,
    backend: Backend,
    dialect: &'static Dialect,
    /// Journal appends go through one committer task per store (group
    /// commit, see [`JournalCommitter`]).
    journal: tokio::sync::mpsc::UnboundedSender<PendingAppend>,
}

/// A journal append waiting for its turn in a group commit.
struct PendingAppend {
    key: WorkspaceKey,
    fence: Fence,
    op: Vec<u8>,
    done: tokio::sync::oneshot::Sender<StoreResult<i64>>,
}

/// Most appends one journal transaction takes.
const MAX_JOURNAL_BATCH: usize = 256;

/// Group commit: every workspace of a node appends its journal records
/// through this one task, which commits whatever has queued up while the
/// previous transaction was committing in a single transaction (each
/// record still checked against its own fence). With one workspace and no
/// load that is one record per commit, as before; under load many
/// workspaces share each wait for the disk. What a caller sees does not
/// change: its record is durable when its append returns, and a record
/// whose fence is stale is refused while the others of the batch land.
struct JournalCommitter {
    pool: AnyPool,
    dialect: &'static Dialect,
}

impl JournalCommitter {
    async fn run(self, mut queue: tokio::sync::mpsc::UnboundedReceiver<PendingAppend>) {
        while let Some(first) = queue.recv().await {
            let mut batch = vec![first];
            while batch.len() < MAX_JOURNAL_BATCH {
                match queue.try_recv() {
                    Ok(next) => batch.push(next),
                    Err(_) => break,
                }
            }
            match self.commit(&batch).await {
                Ok(results) => {
                    for (append, result) in batch.into_iter().zip(results) {
                        let _ = append.done.send(result);
                    }
                }
                Err(err) => {
                    // Nothing of the batch landed: every caller gets the
                    // failure (the first one the database's own words).
                    let text = err.to_string();
                    let mut first = Some(err);
                    for append in batch {
                        let err = first.take().unwrap_or_else(|| {
                            StoreError::Database(sqlx::Error::Protocol(format!(
                                "the journal transaction failed: {text}"
                            )))
                        });
                        let _ = append.done.send(Err(err));
                    }
                }
            }
        }
    }

    /// One transaction for the whole batch, in four statements whatever
    /// its size (each statement is a round trip to the database, and with
    /// SQLite a hand-off to its worker thread, which under load cost more
    /// than the work): begin; read the claims of the batch's keys, locked
    /// in key order (so two committers never wait on each other in a
    /// circle); insert every record whose fence matches its key's claim;
    /// commit. Per record: `Fenced`, or its sequence number.
    async fn commit(&self, batch: &[PendingAppend]) -> StoreResult<Vec<StoreResult<i64>>> {
        let mut keys: Vec<&WorkspaceKey> = batch.iter().map(|a| &a.key).collect();
        keys.sort();
        keys.dedup();
        let mut tx = self.pool.begin_with(self.dialect.begin_write).await?;

        let mut select = String::from(
            "SELECT project_id, branch, server_tag, epoch FROM git_actor_sessions WHERE ",
        );
        for i in 0..keys.len() {
            if i > 0 {
                select.push_str(" OR ");
            }
            select.push_str(&format!(
                "(project_id = ${} AND branch = ${})",
                2 * i + 1,
                2 * i + 2
            ));
        }
        select.push_str(" ORDER BY project_id, branch{share_lock}");
        let mut query = sqlx::query(self.dialect.sql_built(select));
        for key in &keys {
            query = query.bind(key.project_id).bind(key.branch.as_str());
        }
        let mut holders = std::collections::HashMap::new();
        for row in query.fetch_all(&mut *tx).await? {
            let branch: String = row.try_get("branch")?;
            let key = WorkspaceKey::new(row.try_get("project_id")?, branch);
            let tag: String = row.try_get("server_tag")?;
            let epoch: i64 = row.try_get("epoch")?;
            holders.insert(key, (tag, epoch));
        }

        let admitted = |append: &PendingAppend| {
            holders.get(&append.key).is_some_and(|(tag, epoch)| {
                *tag == append.fence.server_tag && *epoch == append.fence.epoch
            })
        };
        let accepted: Vec<&PendingAppend> = batch.iter().filter(|a| admitted(a)).collect();
        let mut seqs = Vec::with_capacity(accepted.len());
        if !accepted.is_empty() {
            let mut insert = String::from(
                "INSERT INTO journal (project_id, branch, epoch, op, created_at) VALUES ",
            );
            for i in 0..accepted.len() {
                if i > 0 {
                    insert.push_str(", ");
                }
                let n = 4 * i;
                insert.push_str(&format!(
                    "(${}, ${}, ${}, ${}, {{now}})",
                    n + 1,
                    n + 2,
                    n + 3,
                    n + 4
                ));
            }
            insert.push_str(" RETURNING seq");
            let mut query = sqlx::query_scalar(self.dialect.sql_built(insert));
            for append in &accepted {
                query = query
                    .bind(append.key.project_id)
                    .bind(append.key.branch.as_str())
                    .bind(append.fence.epoch)
                    .bind(append.op.as_slice());
            }
            seqs = query.fetch_all(&mut *tx).await?;
        }
        if seqs.len() != accepted.len() {
            return Err(StoreError::Config(format!(
                "the journal insert returned {} sequence numbers for {} records",
                seqs.len(),
                accepted.len()
            )));
        }
        tx.commit().await?;

        // The rows were inserted in batch order, so their sequence numbers
        // rise in that order (whatever order RETURNING lists them in): each
        // workspace's records keep the order it sent them in.
        seqs.sort_unstable();
        let mut seqs = seqs.into_iter();
        Ok(batch
            .iter()
            .map(|append| {
                if admitted(append) {
                    seqs.next().ok_or_else(|| {
                        StoreError::Config("a journal record got no sequence number".into())
                    })
                } else {
                    Err(StoreError::Fenced {
                        key: append.key.clone(),
                        server_tag: append.fence.server_tag.clone(),
                        epoch: append.fence.epoch,
                    })
                }
            })
            .collect())
    }
}

/// Locks a claim row in a write transaction and checks that the fence is
/// the current owner's; `Fenced` otherwise.
async fn check_fence(
    dialect: &Dialect,
    tx: &mut Transaction<'static, Any>,
    key: &WorkspaceKey,
    fence: &Fence,
) -> StoreResult<()> {
    let held: Option<i64> = sqlx::query_scalar(dialect.sql(
        "SELECT epoch FROM git_actor_sessions \
         WHERE project_id = $1 AND branch = $2 AND server_tag = $3 AND epoch = $4\
         {share_lock}",
    ))
    .bind(key.project_id)
    .bind(key.branch.as_str())
    .bind(fence.server_tag.as_str())
    .bind(fence.epoch)
    .fetch_optional(&mut **tx)
    .await?;
    match held {
        Some(_) => Ok(()),
        None => Err(StoreError::Fenced {
            key: key.clone(),
            server_tag: fence.server_tag.clone(),
            epoch: fence.epoch,
        }),
    }
}

impl SqlStore {
    /// Connects to a database URL (`sqlite://...` or `postgres://...`)
    /// without applying migrations.
    pub async fn connect(url: &str, max_connections: u32) -> StoreResult<SqlStore> {
        sqlx::any::install_default_drivers();
        let backend = Backend::from_url(url)?;
        let options = AnyPoolOptions::new()
            .max_connections(max_connections.max(1))
            .acquire_timeout(Duration::from_secs(10));
        let (options, dialect) = match backend {
            Backend::Sqlite => (
                options.after_connect(|conn, _meta| Box::pin(sqlite::configure(conn))),
                &sqlite::DIALECT,
            ),
            Backend::Postgres => (options, &postgres::DIALECT),
        };
        let url = match backend {
            Backend::Sqlite => sqlite::prepare_url(url).map_err(|e| {
                StoreError::Config(format!("creating the directory of {url:?}: {e}"))
            })?,
            Backend::Postgres => url.to_string(),
        };
        let pool = options.connect(&url).await?;
        let (journal, queue) = tokio::sync::mpsc::unbounded_channel();
        let committer = JournalCommitter {
            pool: pool.clone(),
            dialect,
        };
        // Ends when the store (the queue's only sender) is dropped.
        tokio::spawn(committer.run(queue));
        Ok(SqlStore {
            pool,
            backend,
            dialect,
            journal,
        })
    }

    /// Applies every migration this build carries that the database lacks.
    pub async fn migrate(&self) -> StoreResult<()> {
        self.migrator().run(&self.pool).await?;
        Ok(())
    }

    /// Closes the pool, waiting for connections in use to come back.
    pub async fn close(&self) {
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

    /// Locks a claim row in a write transaction and checks that the fence is
    /// the current owner's; `Fenced` otherwise.
    async fn check_fence(
        &self,
        tx: &mut Transaction<'static, Any>,
        key: &WorkspaceKey,
        fence: &Fence,
    ) -> StoreResult<()> {
        check_fence(self.dialect, tx, key, fence).await
    }

    /// Sets a key's claim count to the number of its session rows.
    ///
    /// The claim row is locked before counting, so concurrent recounts of
    /// one key run in turn and each counts every session committed before
    /// it: the last one to run always writes the true count.
    async fn recount(&self, key: &WorkspaceKey) -> StoreResult<i64> {
        let mut tx = self.begin_write().await?;
        let count = self.recount_in(&mut tx, key).await?;
        tx.commit().await?;
        Ok(count)
    }

    /// [`Self::recount`] inside a caller's write transaction, so a session
    /// row and the count that includes it commit together: no reader ever
    /// sees one without the other.
    async fn recount_in(
        &self,
        tx: &mut Transaction<'static, Any>,
        key: &WorkspaceKey,
    ) -> StoreResult<i64> {
        sqlx::query(self.dialect.sql(
            "SELECT epoch FROM git_actor_sessions WHERE project_id = $1 AND branch = $2\
             {update_lock}",
        ))
        .bind(key.project_id)
        .bind(key.branch.as_str())
        .fetch_optional(&mut **tx)
        .await?;
        let count: i64 = sqlx::query_scalar(
            "SELECT COUNT(*) FROM websocket_sessions WHERE project_id = $1 AND branch = $2",
        )
        .bind(key.project_id)
        .bind(key.branch.as_str())
        .fetch_one(&mut **tx)
        .await?;
        sqlx::query(self.dialect.sql(
            "UPDATE git_actor_sessions SET \
               ref_count = $3, \
               time_zeroed = CASE WHEN $3 > 0 THEN NULL ELSE COALESCE(time_zeroed, {now}) END, \
               updated_at = {now} \
             WHERE project_id = $1 AND branch = $2",
        ))
        .bind(key.project_id)
        .bind(key.branch.as_str())
        .bind(count)
        .execute(&mut **tx)
        .await?;
        Ok(count)
    }

    /// Inserts the next version of a branch (or, with `first_only`, version
    /// 1 of a branch that has none: `Conflict` otherwise), trims the journal
    /// it covers and old versions beyond `keep`.
    async fn insert_snapshot(
        &self,
        tx: &mut Transaction<'static, Any>,
        key: &WorkspaceKey,
        snapshot: &NewSnapshot,
        first_only: bool,
    ) -> StoreResult<SnapshotMeta> {
        let sha256 = hex::encode(Sha256::digest(&snapshot.data));
        // Snapshots only move forward: one that covers less of the journal
        // than the newest (a save that finished late, after its actor was
        // replaced) would bring back a state whose later journal records
        // are already trimmed.
        let newest: Option<i64> = sqlx::query_scalar(
            "SELECT MAX(journal_seq) FROM git_snapshots WHERE project_id = $1 AND branch = $2",
        )
        .bind(key.project_id)
        .bind(key.branch.as_str())
        .fetch_one(&mut **tx)
        .await?;
        if let Some(newest) = newest
            && newest > snapshot.journal_seq
        {
            return Err(StoreError::Conflict(format!(
                "a newer snapshot of {key} already covers the journal up to {newest}; this one stops at {}",
                snapshot.journal_seq
            )));
        }
        let statement = if first_only {
            "INSERT INTO git_snapshots \
               (project_id, branch, version, data, sha256, size, journal_seq, author, created_at) \
             SELECT $1, $2, 1, $3, $4, $5, $6, $7, {now} \
             WHERE NOT EXISTS (SELECT 1 FROM git_snapshots WHERE project_id = $1 AND branch = $2) \
             RETURNING version, created_at"
        } else {
            "INSERT INTO git_snapshots \
               (project_id, branch, version, data, sha256, size, journal_seq, author, created_at) \
             VALUES ($1, $2, \
               (SELECT COALESCE(MAX(version), 0) + 1 FROM git_snapshots \
                WHERE project_id = $1 AND branch = $2), \
               $3, $4, $5, $6, $7, {now}) \
             RETURNING version, created_at"
        };
        let exists = || StoreError::Conflict(format!("branch {:?} already exists", key.branch));
        let row = sqlx::query(self.dialect.sql(statement))
            .bind(key.project_id)
            .bind(key.branch.as_str())
            .bind(snapshot.data.as_slice())
            .bind(sha256.as_str())
            .bind(snapshot.data.len() as i64)
            .bind(snapshot.journal_seq)
            .bind(snapshot.author.as_deref())
            .fetch_optional(&mut **tx)
            .await
            .map_err(|e| unique_violation(e, || exists().to_string()))?
            .ok_or_else(exists)?;
        let version: i64 = row.try_get("version")?;
        sqlx::query("DELETE FROM journal WHERE project_id = $1 AND branch = $2 AND seq <= $3")
            .bind(key.project_id)
            .bind(key.branch.as_str())
            .bind(snapshot.journal_seq)
            .execute(&mut **tx)
            .await?;
        sqlx::query(
            "DELETE FROM git_snapshots WHERE project_id = $1 AND branch = $2 AND version <= $3",
        )
        .bind(key.project_id)
        .bind(key.branch.as_str())
        .bind(version - i64::from(snapshot.keep.max(1)))
        .execute(&mut **tx)
        .await?;
        Ok(SnapshotMeta {
            key: key.clone(),
            version,
            sha256,
            size: snapshot.data.len() as i64,
            journal_seq: snapshot.journal_seq,
            author: snapshot.author.clone(),
            created_at: row.try_get("created_at")?,
        })
    }

    async fn fetch_snapshot(
        &self,
        key: &WorkspaceKey,
        version: Option<i64>,
    ) -> StoreResult<Option<Snapshot>> {
        let query = match version {
            Some(_) => sqlx::query(concat!(
                "SELECT ",
                snapshot_columns!(),
                ", data FROM git_snapshots WHERE project_id = $1 AND branch = $2 AND version = $3"
            )),
            None => sqlx::query(concat!(
                "SELECT ",
                snapshot_columns!(),
                ", data FROM git_snapshots WHERE project_id = $1 AND branch = $2 \
                 ORDER BY version DESC LIMIT 1"
            )),
        };
        let row = query
            .bind(key.project_id)
            .bind(key.branch.as_str())
            .bind(version.unwrap_or(0))
            .fetch_optional(&self.pool)
            .await?;
        row.map(|row| {
            Ok(Snapshot {
                meta: snapshot_meta(&row)?,
                data: row.try_get("data")?,
            })
        })
        .transpose()
    }
}

fn user(row: &AnyRow) -> Result<User, sqlx::Error> {
    Ok(User {
        id: row.try_get("id")?,
        username: row.try_get("username")?,
        display_name: row.try_get("display_name")?,
        email: row.try_get("email")?,
        is_admin: row.try_get::<i64, _>("is_admin")? != 0,
        created_at: row.try_get("created_at")?,
    })
}

fn project(row: &AnyRow) -> Result<Project, sqlx::Error> {
    Ok(Project {
        id: row.try_get("id")?,
        name: row.try_get("name")?,
        created_by: row.try_get("created_by")?,
        created_at: row.try_get("created_at")?,
    })
}

fn role(row: &AnyRow) -> Result<Role, sqlx::Error> {
    let text: String = row.try_get("role")?;
    Role::parse(&text).ok_or_else(|| sqlx::Error::ColumnDecode {
        index: "role".into(),
        source: format!("unknown role {text:?}").into(),
    })
}

fn key(row: &AnyRow) -> Result<WorkspaceKey, sqlx::Error> {
    Ok(WorkspaceKey {
        project_id: row.try_get("project_id")?,
        branch: row.try_get("branch")?,
    })
}

fn snapshot_meta(row: &AnyRow) -> Result<SnapshotMeta, sqlx::Error> {
    Ok(SnapshotMeta {
        key: key(row)?,
        version: row.try_get("version")?,
        sha256: row.try_get("sha256")?,
        size: row.try_get("size")?,
        journal_seq: row.try_get("journal_seq")?,
        author: row.try_get("author")?,
        created_at: row.try_get("created_at")?,
    })
}

fn claim(row: &AnyRow) -> Result<Claim, sqlx::Error> {
    Ok(Claim {
        key: key(row)?,
        server_tag: row.try_get("server_tag")?,
        epoch: row.try_get("epoch")?,
        ref_count: row.try_get("ref_count")?,
        time_zeroed: row.try_get("time_zeroed")?,
        updated_at: row.try_get("updated_at")?,
    })
}

fn session(row: &AnyRow) -> Result<WsSession, sqlx::Error> {
    Ok(WsSession {
        id: row.try_get("id")?,
        user_id: row.try_get("user_id")?,
        key: key(row)?,
        server_tag: row.try_get("server_tag")?,
        connected_at: row.try_get("connected_at")?,
    })
}

fn node(row: &AnyRow) -> Result<NodeRow, sqlx::Error> {
    Ok(NodeRow {
        server_tag: row.try_get("server_tag")?,
        cluster_addr: row.try_get("cluster_addr")?,
        http_addr: row.try_get("http_addr")?,
        started_at: row.try_get("started_at")?,
        heartbeat_at: row.try_get("heartbeat_at")?,
    })
}

fn all<T>(
    rows: Vec<AnyRow>,
    map: impl Fn(&AnyRow) -> Result<T, sqlx::Error>,
) -> StoreResult<Vec<T>> {
    rows.iter()
        .map(|row| map(row).map_err(StoreError::from))
        .collect()
}

/// Turns a uniqueness violation into a `Conflict` with the caller's words.
fn unique_violation(err: sqlx::Error, message: impl FnOnce() -> String) -> StoreError {
    match &err {
        sqlx::Error::Database(db) if db.is_unique_violation() => StoreError::Conflict(message()),
        _ => StoreError::Database(err),
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

    async fn create_user(&self, new: NewUser) -> StoreResult<User> {
        let row = sqlx::query(self.dialect.sql(
            "INSERT INTO users (username, display_name, email, password_hash, is_admin, created_at) \
             VALUES ($1, $2, $3, $4, $5, {now}) \
             RETURNING id, created_at",
        ))
        .bind(new.username.as_str())
        .bind(new.display_name.as_str())
        .bind(new.email.as_str())
        .bind(new.password_hash.as_str())
        .bind(i64::from(new.is_admin))
        .fetch_one(&self.pool)
        .await
        .map_err(|e| unique_violation(e, || format!("user {:?} already exists", new.username)))?;
        Ok(User {
            id: row.try_get("id")?,
            created_at: row.try_get("created_at")?,
            username: new.username,
            display_name: new.display_name,
            email: new.email,
            is_admin: new.is_admin,
        })
    }

    async fn user_count(&self) -> StoreResult<i64> {
        Ok(sqlx::query_scalar("SELECT COUNT(*) FROM users")
            .fetch_one(&self.pool)
            .await?)
    }

    async fn user_by_id(&self, id: i64) -> StoreResult<Option<User>> {
        let row = sqlx::query(concat!(
            "SELECT ",
            user_columns!(),
            " FROM users u WHERE u.id = $1"
        ))
        .bind(id)
        .fetch_optional(&self.pool)
        .await?;
        Ok(row.as_ref().map(user).transpose()?)
    }

    async fn user_by_name(&self, username: &str) -> StoreResult<Option<(User, String)>> {
        let row = sqlx::query(concat!(
            "SELECT ",
            user_columns!(),
            ", u.password_hash FROM users u WHERE u.username = $1"
        ))
        .bind(username)
        .fetch_optional(&self.pool)
        .await?;
        match row {
            Some(row) => Ok(Some((user(&row)?, row.try_get("password_hash")?))),
            None => Ok(None),
        }
    }

    async fn list_users(&self) -> StoreResult<Vec<User>> {
        let rows = sqlx::query(concat!(
            "SELECT ",
            user_columns!(),
            " FROM users u ORDER BY u.id"
        ))
        .fetch_all(&self.pool)
        .await?;
        all(rows, user)
    }

    async fn set_password(&self, user_id: i64, password_hash: &str) -> StoreResult<()> {
        let mut tx = self.begin_write().await?;
        let done = sqlx::query("UPDATE users SET password_hash = $2 WHERE id = $1")
            .bind(user_id)
            .bind(password_hash)
            .execute(&mut *tx)
            .await?;
        if done.rows_affected() == 0 {
            return Err(StoreError::NotFound(format!("no user with id {user_id}")));
        }
        sqlx::query("DELETE FROM auth_sessions WHERE user_id = $1")
            .bind(user_id)
            .execute(&mut *tx)
            .await?;
        tx.commit().await?;
        Ok(())
    }

    async fn create_auth_session(
        &self,
        token_hash: &str,
        user_id: i64,
        ttl_ms: i64,
    ) -> StoreResult<i64> {
        Ok(sqlx::query_scalar(self.dialect.sql(
            "INSERT INTO auth_sessions (token_hash, user_id, created_at, expires_at) \
             VALUES ($1, $2, {now}, {now} + $3) RETURNING expires_at",
        ))
        .bind(token_hash)
        .bind(user_id)
        .bind(ttl_ms)
        .fetch_one(&self.pool)
        .await?)
    }

    async fn auth_session(&self, token_hash: &str) -> StoreResult<Option<AuthSession>> {
        let row = sqlx::query(self.dialect.sql(concat!(
            "SELECT ",
            user_columns!(),
            ", s.expires_at, CASE WHEN s.expires_at > {now} THEN 0 ELSE 1 END AS expired \
             FROM auth_sessions s JOIN users u ON u.id = s.user_id WHERE s.token_hash = $1"
        )))
        .bind(token_hash)
        .fetch_optional(&self.pool)
        .await?;
        match row {
            Some(row) => Ok(Some(AuthSession {
                user: user(&row)?,
                expires_at: row.try_get("expires_at")?,
                expired: row.try_get::<i64, _>("expired")? != 0,
            })),
            None => Ok(None),
        }
    }

    async fn delete_auth_session(&self, token_hash: &str) -> StoreResult<bool> {
        let done = sqlx::query("DELETE FROM auth_sessions WHERE token_hash = $1")
            .bind(token_hash)
            .execute(&self.pool)
            .await?;
        Ok(done.rows_affected() > 0)
    }

    async fn purge_expired_auth_sessions(&self) -> StoreResult<u64> {
        let done = sqlx::query(
            self.dialect
                .sql("DELETE FROM auth_sessions WHERE expires_at <= {now}"),
        )
        .execute(&self.pool)
        .await?;
        Ok(done.rows_affected())
    }

    async fn create_project(
        &self,
        name: &str,
        owner: i64,
        branch: &str,
        first: NewSnapshot,
    ) -> StoreResult<(Project, SnapshotMeta)> {
        let mut tx = self.begin_write().await?;
        let row = sqlx::query(self.dialect.sql(
            "INSERT INTO projects (name, created_by, created_at) VALUES ($1, $2, {now}) \
             RETURNING id, created_at",
        ))
        .bind(name)
        .bind(owner)
        .fetch_one(&mut *tx)
        .await?;
        let project = Project {
            id: row.try_get("id")?,
            name: name.to_string(),
            created_by: Some(owner),
            created_at: row.try_get("created_at")?,
        };
        sqlx::query("INSERT INTO project_members (project_id, user_id, role) VALUES ($1, $2, $3)")
            .bind(project.id)
            .bind(owner)
            .bind(Role::Owner.as_str())
            .execute(&mut *tx)
            .await?;
        let meta = self
            .insert_snapshot(
                &mut tx,
                &WorkspaceKey::new(project.id, branch),
                &first,
                true,
            )
            .await?;
        tx.commit().await?;
        Ok((project, meta))
    }

    async fn project(&self, id: i64) -> StoreResult<Option<Project>> {
        let row = sqlx::query(concat!(
            "SELECT ",
            project_columns!(),
            " FROM projects p WHERE p.id = $1"
        ))
        .bind(id)
        .fetch_optional(&self.pool)
        .await?;
        Ok(row.as_ref().map(project).transpose()?)
    }

    async fn projects_of_user(&self, user_id: i64) -> StoreResult<Vec<(Project, Role)>> {
        let rows = sqlx::query(concat!(
            "SELECT ",
            project_columns!(),
            ", m.role FROM projects p JOIN project_members m ON m.project_id = p.id \
             WHERE m.user_id = $1 ORDER BY p.id"
        ))
        .bind(user_id)
        .fetch_all(&self.pool)
        .await?;
        all(rows, |row| Ok((project(row)?, role(row)?)))
    }

    async fn all_projects(&self) -> StoreResult<Vec<Project>> {
        let rows = sqlx::query(concat!(
            "SELECT ",
            project_columns!(),
            " FROM projects p ORDER BY p.id"
        ))
        .fetch_all(&self.pool)
        .await?;
        all(rows, project)
    }

    async fn delete_project(&self, id: i64) -> StoreResult<bool> {
        let done = sqlx::query("DELETE FROM projects WHERE id = $1")
            .bind(id)
            .execute(&self.pool)
            .await?;
        Ok(done.rows_affected() > 0)
    }

    async fn member_role(&self, project_id: i64, user_id: i64) -> StoreResult<Option<Role>> {
        let row =
            sqlx::query("SELECT role FROM project_members WHERE project_id = $1 AND user_id = $2")
                .bind(project_id)
                .bind(user_id)
                .fetch_optional(&self.pool)
                .await?;
        Ok(row.as_ref().map(role).transpose()?)
    }

    async fn members(&self, project_id: i64) -> StoreResult<Vec<Member>> {
        let rows = sqlx::query(
            "SELECT m.user_id, u.username, m.role FROM project_members m \
             JOIN users u ON u.id = m.user_id WHERE m.project_id = $1 ORDER BY u.username",
        )
        .bind(project_id)
        .fetch_all(&self.pool)
        .await?;
        all(rows, |row| {
            Ok(Member {
                user_id: row.try_get("user_id")?,
                username: row.try_get("username")?,
                role: role(row)?,
            })
        })
    }

    async fn set_member(&self, project_id: i64, user_id: i64, role: Role) -> StoreResult<()> {
        let mut tx = self.begin_write().await?;
        sqlx::query(
            "INSERT INTO project_members (project_id, user_id, role) VALUES ($1, $2, $3) \
             ON CONFLICT (project_id, user_id) DO UPDATE SET role = excluded.role",
        )
        .bind(project_id)
        .bind(user_id)
        .bind(role.as_str())
        .execute(&mut *tx)
        .await?;
        ensure_an_owner(
            &mut tx,
            project_id,
            "that would leave the project without an owner",
        )
        .await?;
        tx.commit().await?;
        Ok(())
    }

    async fn remove_member(&self, project_id: i64, user_id: i64) -> StoreResult<bool> {
        let mut tx = self.begin_write().await?;
        let done =
            sqlx::query("DELETE FROM project_members WHERE project_id = $1 AND user_id = $2")
                .bind(project_id)
                .bind(user_id)
                .execute(&mut *tx)
                .await?;
        ensure_an_owner(
            &mut tx,
            project_id,
            "cannot remove the project's last owner",
        )
        .await?;
        tx.commit().await?;
        Ok(done.rows_affected() > 0)
    }

    async fn put_snapshot(
        &self,
        key: &WorkspaceKey,
        snapshot: NewSnapshot,
        fence: Option<&Fence>,
    ) -> StoreResult<SnapshotMeta> {
        let mut tx = self.begin_write().await?;
        if let Some(fence) = fence {
            self.check_fence(&mut tx, key, fence).await?;
        }
        let meta = self.insert_snapshot(&mut tx, key, &snapshot, false).await?;
        tx.commit().await?;
        Ok(meta)
    }

    async fn create_branch(
        &self,
        key: &WorkspaceKey,
        snapshot: NewSnapshot,
    ) -> StoreResult<SnapshotMeta> {
        let mut tx = self.begin_write().await?;
        let meta = self.insert_snapshot(&mut tx, key, &snapshot, true).await?;
        tx.commit().await?;
        Ok(meta)
    }

    async fn latest_snapshot(&self, key: &WorkspaceKey) -> StoreResult<Option<Snapshot>> {
        self.fetch_snapshot(key, None).await
    }

    async fn snapshot(&self, key: &WorkspaceKey, version: i64) -> StoreResult<Option<Snapshot>> {
        self.fetch_snapshot(key, Some(version)).await
    }

    async fn list_snapshots(&self, key: &WorkspaceKey) -> StoreResult<Vec<SnapshotMeta>> {
        let rows = sqlx::query(concat!(
            "SELECT ",
            snapshot_columns!(),
            " FROM git_snapshots WHERE project_id = $1 AND branch = $2 ORDER BY version DESC"
        ))
        .bind(key.project_id)
        .bind(key.branch.as_str())
        .fetch_all(&self.pool)
        .await?;
        all(rows, snapshot_meta)
    }

    async fn branches(&self, project_id: i64) -> StoreResult<Vec<String>> {
        Ok(sqlx::query_scalar(
            "SELECT DISTINCT branch FROM git_snapshots WHERE project_id = $1 ORDER BY branch",
        )
        .bind(project_id)
        .fetch_all(&self.pool)
        .await?)
    }

    async fn claim(
        &self,
        key: &WorkspaceKey,
        server_tag: &str,
        lease_ms: i64,
    ) -> StoreResult<ClaimOutcome> {
        // One statement: take the row if it is free, released, or held by a
        // node whose heartbeat is older than the lease. The count starts
        // from the key's session rows, so sessions outlive an owner change.
        let taken = sqlx::query(self.dialect.sql(concat!(
            "INSERT INTO git_actor_sessions AS c \
               (project_id, branch, server_tag, epoch, ref_count, time_zeroed, updated_at) \
             VALUES ($1, $2, $3, 1, 0, {now}, {now}) \
             ON CONFLICT (project_id, branch) DO UPDATE SET \
               server_tag = excluded.server_tag, \
               epoch = c.epoch + 1, \
               updated_at = excluded.updated_at \
             WHERE c.server_tag IS NULL OR NOT EXISTS ( \
               SELECT 1 FROM nodes n WHERE n.server_tag = c.server_tag \
               AND n.heartbeat_at > {now} - $4) \
             RETURNING ",
            claim_columns!()
        )))
        .bind(key.project_id)
        .bind(key.branch.as_str())
        .bind(server_tag)
        .bind(lease_ms)
        .fetch_optional(&self.pool)
        .await?;
        if taken.is_some() {
            self.recount(key).await?;
            let current = self.claim_of(key).await?.ok_or_else(|| {
                StoreError::NotFound(format!("claim of {key} vanished after it was taken"))
            })?;
            return Ok(ClaimOutcome::Owned(current));
        }
        let current = self
            .claim_of(key)
            .await?
            .ok_or_else(|| StoreError::NotFound(format!("claim of {key} vanished")))?;
        if current.server_tag.as_deref() == Some(server_tag) {
            Ok(ClaimOutcome::Owned(current))
        } else {
            Ok(ClaimOutcome::HeldBy(current))
        }
    }

    async fn claim_of(&self, key: &WorkspaceKey) -> StoreResult<Option<Claim>> {
        let row = sqlx::query(concat!(
            "SELECT ",
            claim_columns!(),
            " FROM git_actor_sessions WHERE project_id = $1 AND branch = $2"
        ))
        .bind(key.project_id)
        .bind(key.branch.as_str())
        .fetch_optional(&self.pool)
        .await?;
        Ok(row.as_ref().map(claim).transpose()?)
    }

    async fn claims_of_node(&self, server_tag: &str) -> StoreResult<Vec<Claim>> {
        let rows = sqlx::query(concat!(
            "SELECT ",
            claim_columns!(),
            " FROM git_actor_sessions WHERE server_tag = $1 ORDER BY project_id, branch"
        ))
        .bind(server_tag)
        .fetch_all(&self.pool)
        .await?;
        all(rows, claim)
    }

    async fn release_claim(&self, key: &WorkspaceKey, fence: &Fence) -> StoreResult<bool> {
        let done = sqlx::query(self.dialect.sql(
            "UPDATE git_actor_sessions SET server_tag = NULL, updated_at = {now} \
             WHERE project_id = $1 AND branch = $2 AND server_tag = $3 AND epoch = $4",
        ))
        .bind(key.project_id)
        .bind(key.branch.as_str())
        .bind(fence.server_tag.as_str())
        .bind(fence.epoch)
        .execute(&self.pool)
        .await?;
        Ok(done.rows_affected() > 0)
    }

    async fn attach_session(&self, session: &WsSession) -> StoreResult<i64> {
        let mut tx = self.begin_write().await?;
        sqlx::query(self.dialect.sql(
            "INSERT INTO websocket_sessions \
               (id, user_id, project_id, branch, server_tag, connected_at) \
             VALUES ($1, $2, $3, $4, $5, {now})",
        ))
        .bind(session.id.as_str())
        .bind(session.user_id)
        .bind(session.key.project_id)
        .bind(session.key.branch.as_str())
        .bind(session.server_tag.as_str())
        .execute(&mut *tx)
        .await
        .map_err(|e| unique_violation(e, || format!("session {:?} already exists", session.id)))?;
        let count = self.recount_in(&mut tx, &session.key).await?;
        tx.commit().await?;
        Ok(count)
    }

    async fn detach_session(&self, id: &str) -> StoreResult<Option<(WorkspaceKey, i64)>> {
        let mut tx = self.begin_write().await?;
        let row = sqlx::query(
            "DELETE FROM websocket_sessions WHERE id = $1 RETURNING project_id, branch",
        )
        .bind(id)
        .fetch_optional(&mut *tx)
        .await?;
        let Some(row) = row else {
            return Ok(None);
        };
        let key = key(&row)?;
        let count = self.recount_in(&mut tx, &key).await?;
        tx.commit().await?;
        Ok(Some((key, count)))
    }

    async fn sessions_of(&self, key: &WorkspaceKey) -> StoreResult<Vec<WsSession>> {
        let rows = sqlx::query(concat!(
            "SELECT ",
            session_columns!(),
            " FROM websocket_sessions WHERE project_id = $1 AND branch = $2 ORDER BY connected_at, id"
        ))
        .bind(key.project_id)
        .bind(key.branch.as_str())
        .fetch_all(&self.pool)
        .await?;
        all(rows, session)
    }

    async fn wipe_server_tag(&self, server_tag: &str) -> StoreResult<WipeReport> {
        let gone = sqlx::query(
            "DELETE FROM websocket_sessions WHERE server_tag = $1 RETURNING project_id, branch",
        )
        .bind(server_tag)
        .fetch_all(&self.pool)
        .await?;
        let released = sqlx::query(self.dialect.sql(
            "UPDATE git_actor_sessions SET server_tag = NULL, updated_at = {now} \
             WHERE server_tag = $1 RETURNING project_id, branch",
        ))
        .bind(server_tag)
        .fetch_all(&self.pool)
        .await?;
        let mut keys = all(gone.clone(), key)?;
        keys.extend(all(released.clone(), key)?);
        keys.sort();
        keys.dedup();
        for key in &keys {
            self.recount(key).await?;
        }
        Ok(WipeReport {
            sessions: gone.len() as u64,
            claims: released.len() as u64,
        })
    }

    async fn append_journal(
        &self,
        key: &WorkspaceKey,
        fence: &Fence,
        op: &[u8],
    ) -> StoreResult<i64> {
        let (done, answer) = tokio::sync::oneshot::channel();
        let append = PendingAppend {
            key: key.clone(),
            fence: fence.clone(),
            op: op.to_vec(),
            done,
        };
        if self.journal.send(append).is_err() {
            return Err(StoreError::Config(
                "the journal committer has stopped".into(),
            ));
        }
        answer.await.unwrap_or_else(|_| {
            Err(StoreError::Config(
                "the journal committer stopped before answering".into(),
            ))
        })
    }

    async fn journal_after(
        &self,
        key: &WorkspaceKey,
        after_seq: i64,
    ) -> StoreResult<Vec<JournalEntry>> {
        let rows = sqlx::query(
            "SELECT seq, epoch, op, created_at FROM journal \
             WHERE project_id = $1 AND branch = $2 AND seq > $3 ORDER BY seq",
        )
        .bind(key.project_id)
        .bind(key.branch.as_str())
        .bind(after_seq)
        .fetch_all(&self.pool)
        .await?;
        all(rows, |row| {
            Ok(JournalEntry {
                seq: row.try_get("seq")?,
                epoch: row.try_get("epoch")?,
                op: row.try_get("op")?,
                created_at: row.try_get("created_at")?,
            })
        })
    }

    async fn register_node(
        &self,
        server_tag: &str,
        cluster_addr: Option<&str>,
        http_addr: Option<&str>,
    ) -> StoreResult<NodeRow> {
        let row = sqlx::query(self.dialect.sql(concat!(
            "INSERT INTO nodes (server_tag, cluster_addr, http_addr, started_at, heartbeat_at) \
             VALUES ($1, $2, $3, {now}, {now}) \
             ON CONFLICT (server_tag) DO UPDATE SET \
               cluster_addr = excluded.cluster_addr, http_addr = excluded.http_addr, \
               started_at = excluded.started_at, heartbeat_at = excluded.heartbeat_at \
             RETURNING ",
            node_columns!()
        )))
        .bind(server_tag)
        .bind(cluster_addr)
        .bind(http_addr)
        .fetch_one(&self.pool)
        .await?;
        Ok(node(&row)?)
    }

    async fn heartbeat(&self, server_tag: &str) -> StoreResult<bool> {
        let done = sqlx::query(
            self.dialect
                .sql("UPDATE nodes SET heartbeat_at = {now} WHERE server_tag = $1"),
        )
        .bind(server_tag)
        .execute(&self.pool)
        .await?;
        Ok(done.rows_affected() > 0)
    }

    async fn live_nodes(&self, lease_ms: i64) -> StoreResult<Vec<NodeRow>> {
        let rows = sqlx::query(self.dialect.sql(concat!(
            "SELECT ",
            node_columns!(),
            " FROM nodes WHERE heartbeat_at > {now} - $1 ORDER BY server_tag"
        )))
        .bind(lease_ms)
        .fetch_all(&self.pool)
        .await?;
        all(rows, node)
    }

    async fn remove_node_if_stale(&self, server_tag: &str, lease_ms: i64) -> StoreResult<bool> {
        let done = sqlx::query(
            self.dialect
                .sql("DELETE FROM nodes WHERE server_tag = $1 AND heartbeat_at <= {now} - $2"),
        )
        .bind(server_tag)
        .bind(lease_ms)
        .execute(&self.pool)
        .await?;
        Ok(done.rows_affected() > 0)
    }

    async fn nodes_with_age(&self) -> StoreResult<Vec<(NodeRow, i64)>> {
        let rows = sqlx::query(self.dialect.sql(concat!(
            "SELECT ",
            node_columns!(),
            ", {now} - heartbeat_at AS age_ms FROM nodes ORDER BY server_tag"
        )))
        .fetch_all(&self.pool)
        .await?;
        all(rows, |row| {
            Ok((node(row)?, row.try_get::<i64, _>("age_ms")?))
        })
    }

    async fn owned_claims(&self) -> StoreResult<Vec<Claim>> {
        let rows = sqlx::query(concat!(
            "SELECT ",
            claim_columns!(),
            " FROM git_actor_sessions WHERE server_tag IS NOT NULL ORDER BY project_id, branch"
        ))
        .fetch_all(&self.pool)
        .await?;
        all(rows, claim)
    }

    async fn remove_node(&self, server_tag: &str) -> StoreResult<bool> {
        let done = sqlx::query("DELETE FROM nodes WHERE server_tag = $1")
            .bind(server_tag)
            .execute(&self.pool)
            .await?;
        Ok(done.rows_affected() > 0)
    }
}

/// Fails with `Conflict` if a project (that still exists) has no owner left.
async fn ensure_an_owner(
    tx: &mut Transaction<'static, Any>,
    project_id: i64,
    message: &str,
) -> StoreResult<()> {
    let owners: i64 = sqlx::query_scalar(
        "SELECT COUNT(*) FROM project_members WHERE project_id = $1 AND role = 'owner'",
    )
    .bind(project_id)
    .fetch_one(&mut **tx)
    .await?;
    if owners == 0 {
        return Err(StoreError::Conflict(message.to_string()));
    }
    Ok(())
}
