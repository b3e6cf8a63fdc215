//! WebSocket session rows (`websocket_sessions`) and the reference count
//! of each claim that is recounted from them.

use sqlx::any::AnyRow;
use sqlx::{Any, Row, Transaction};

use super::{SqlStore, all, key, unique_violation};
use crate::storage::*;

macro_rules! session_columns {
    () => {
        "id, user_id, project_id, branch, server_tag, connected_at"
    };
}

pub(super) fn session(row: &AnyRow) -> Result<WsSession, sqlx::Error> {
    Ok(WsSession {
        id: row.try_get("id")?,
        user_id: row.try_get("user_id")?,
        key: key(row)?,
        server_tag: row.try_get("server_tag")?,
        connected_at: row.try_get("connected_at")?,
    })
}

/// Sets a key's claim count to the number of its session rows.
///
/// The claim row is locked before counting, so concurrent recounts of
/// one key run in turn and each counts every session committed before
/// it: the last one to run always writes the true count.
pub(super) async fn recount(store: &SqlStore, key: &WorkspaceKey) -> StoreResult<i64> {
    let mut tx = store.begin_write().await?;
    let count = recount_in(store, &mut tx, key).await?;
    tx.commit().await?;
    Ok(count)
}

/// [`recount`] inside a caller's write transaction, so a session
/// row and the count that includes it commit together: no reader ever
/// sees one without the other.
pub(super) async fn recount_in(
    store: &SqlStore,
    tx: &mut Transaction<'static, Any>,
    key: &WorkspaceKey,
) -> StoreResult<i64> {
    sqlx::query(store.dialect.sql(
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
    sqlx::query(store.dialect.sql(
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

pub(super) async fn attach_session(store: &SqlStore, session: &WsSession) -> StoreResult<i64> {
    let mut tx = store.begin_write().await?;
    sqlx::query(store.dialect.sql(
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
    let count = recount_in(store, &mut tx, &session.key).await?;
    tx.commit().await?;
    Ok(count)
}

pub(super) async fn detach_session(
    store: &SqlStore,
    id: &str,
) -> StoreResult<Option<(WorkspaceKey, i64)>> {
    let mut tx = store.begin_write().await?;
    let row =
        sqlx::query("DELETE FROM websocket_sessions WHERE id = $1 RETURNING project_id, branch")
            .bind(id)
            .fetch_optional(&mut *tx)
            .await?;
    let Some(row) = row else {
        return Ok(None);
    };
    let key = key(&row)?;
    let count = recount_in(store, &mut tx, &key).await?;
    tx.commit().await?;
    Ok(Some((key, count)))
}

pub(super) async fn sessions_of(
    store: &SqlStore,
    key: &WorkspaceKey,
) -> StoreResult<Vec<WsSession>> {
    let rows = sqlx::query(concat!(
        "SELECT ",
        session_columns!(),
        " FROM websocket_sessions WHERE project_id = $1 AND branch = $2 ORDER BY connected_at, id"
    ))
    .bind(key.project_id)
    .bind(key.branch.as_str())
    .fetch_all(&store.pool)
    .await?;
    all(rows, session)
}

pub(super) async fn wipe_server_tag(store: &SqlStore, server_tag: &str) -> StoreResult<WipeReport> {
    let gone = sqlx::query(
        "DELETE FROM websocket_sessions WHERE server_tag = $1 RETURNING project_id, branch",
    )
    .bind(server_tag)
    .fetch_all(&store.pool)
    .await?;
    let released = sqlx::query(store.dialect.sql(
        "UPDATE git_actor_sessions SET server_tag = NULL, updated_at = {now} \
         WHERE server_tag = $1 RETURNING project_id, branch",
    ))
    .bind(server_tag)
    .fetch_all(&store.pool)
    .await?;
    let mut keys = all(gone.clone(), key)?;
    keys.extend(all(released.clone(), key)?);
    keys.sort();
    keys.dedup();
    for key in &keys {
        recount(store, key).await?;
    }
    Ok(WipeReport {
        sessions: gone.len() as u64,
        claims: released.len() as u64,
    })
}
