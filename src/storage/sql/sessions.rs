//! WebSocket session rows (`websocket_sessions`): one row per connected
//! client, carrying the server tag of the node that holds its socket.
//!
//! The rows are the cluster-wide view of who is connected, and what a
//! crashed node's successor wipes. They are not a reference count: nothing
//! counts them on a connect, and garbage collection goes by the allocator's
//! own sessions (see `allocator/`). Rows are written only through the
//! allocator of the socket's node. A connect or disconnect must never lock
//! the claim row: it is one statement on this table.

use sqlx::Row;
use sqlx::any::AnyRow;

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

pub(super) async fn attach_session(store: &SqlStore, session: &WsSession) -> StoreResult<()> {
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
    .execute(&store.pool)
    .await
    .map_err(|e| unique_violation(e, || format!("session {:?} already exists", session.id)))?;
    Ok(())
}

pub(super) async fn detach_session(
    store: &SqlStore,
    id: &str,
) -> StoreResult<Option<WorkspaceKey>> {
    let row =
        sqlx::query("DELETE FROM websocket_sessions WHERE id = $1 RETURNING project_id, branch")
            .bind(id)
            .fetch_optional(&store.pool)
            .await?;
    Ok(row.as_ref().map(key).transpose()?)
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

/// Two statements, not one transaction: each is complete on its own, and
/// running the wipe again finishes a wipe that was cut short.
pub(super) async fn wipe_server_tag(store: &SqlStore, server_tag: &str) -> StoreResult<WipeReport> {
    let sessions = sqlx::query("DELETE FROM websocket_sessions WHERE server_tag = $1")
        .bind(server_tag)
        .execute(&store.pool)
        .await?;
    let claims = sqlx::query(store.dialect.sql(
        "UPDATE git_actor_sessions SET server_tag = NULL, updated_at = {now} \
         WHERE server_tag = $1",
    ))
    .bind(server_tag)
    .execute(&store.pool)
    .await?;
    Ok(WipeReport {
        sessions: sessions.rows_affected(),
        claims: claims.rows_affected(),
    })
}
