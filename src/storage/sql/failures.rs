//! Failed workspaces (`failed_workspaces`): a key that crashed too often is
//! failed for the whole cluster until its restart window ends or an
//! operator resets it.
//!
//! A row whose `until_at` has passed means nothing: every read filters it
//! out, so no clean-up is needed for correctness. This file must never
//! decide *whether* a key fails; the allocator's restart policy does.

use sqlx::Row;
use sqlx::any::AnyRow;

use super::{SqlStore, all, key};
use crate::storage::*;

macro_rules! failure_columns {
    () => {
        "project_id, branch, reason, server_tag, failed_at, until_at, until_at - {now} AS left_ms"
    };
}

fn failure_row(row: &AnyRow) -> Result<Failure, sqlx::Error> {
    Ok(Failure {
        key: key(row)?,
        reason: row.try_get("reason")?,
        server_tag: row.try_get("server_tag")?,
        failed_at: row.try_get("failed_at")?,
        until_at: row.try_get("until_at")?,
        left_ms: row.try_get("left_ms")?,
    })
}

pub(super) async fn mark_failed(
    store: &SqlStore,
    key: &WorkspaceKey,
    reason: &str,
    server_tag: &str,
    for_ms: i64,
) -> StoreResult<()> {
    sqlx::query(store.dialect.sql(
        "INSERT INTO failed_workspaces \
           (project_id, branch, reason, server_tag, failed_at, until_at) \
         VALUES ($1, $2, $3, $4, {now}, {now} + $5) \
         ON CONFLICT (project_id, branch) DO UPDATE SET \
           reason = excluded.reason, server_tag = excluded.server_tag, \
           failed_at = excluded.failed_at, until_at = excluded.until_at",
    ))
    .bind(key.project_id)
    .bind(key.branch.as_str())
    .bind(reason)
    .bind(server_tag)
    .bind(for_ms)
    .execute(&store.pool)
    .await?;
    Ok(())
}

pub(super) async fn failure_of(
    store: &SqlStore,
    key: &WorkspaceKey,
) -> StoreResult<Option<Failure>> {
    let row = sqlx::query(store.dialect.sql(concat!(
        "SELECT ",
        failure_columns!(),
        " FROM failed_workspaces WHERE project_id = $1 AND branch = $2 AND until_at > {now}"
    )))
    .bind(key.project_id)
    .bind(key.branch.as_str())
    .fetch_optional(&store.pool)
    .await?;
    Ok(row.as_ref().map(failure_row).transpose()?)
}

pub(super) async fn failures(store: &SqlStore) -> StoreResult<Vec<Failure>> {
    let rows = sqlx::query(store.dialect.sql(concat!(
        "SELECT ",
        failure_columns!(),
        " FROM failed_workspaces WHERE until_at > {now} ORDER BY project_id, branch"
    )))
    .fetch_all(&store.pool)
    .await?;
    all(rows, failure_row)
}

pub(super) async fn clear_failure(store: &SqlStore, key: &WorkspaceKey) -> StoreResult<bool> {
    // One statement: the row goes, expired or not, and says whether it was
    // still in force (only that counts as a reset).
    let in_force: Option<i64> = sqlx::query_scalar(store.dialect.sql(
        "DELETE FROM failed_workspaces WHERE project_id = $1 AND branch = $2 \
         RETURNING CASE WHEN until_at > {now} THEN 1 ELSE 0 END",
    ))
    .bind(key.project_id)
    .bind(key.branch.as_str())
    .fetch_optional(&store.pool)
    .await?;
    Ok(in_force == Some(1))
}
