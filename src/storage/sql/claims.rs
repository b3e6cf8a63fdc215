//! Ownership claims of workspaces (`git_actor_sessions`): who owns a key,
//! at which epoch, and the fence check every durable write makes.
//!
//! A claim must never pass to a second owner while the first one's
//! heartbeat is fresh: taking a key is one statement that checks the
//! holder's heartbeat, and every takeover bumps the epoch so that the old
//! owner's writes are refused. Rows are released, not deleted (except with
//! their project), so epochs never repeat.

use sqlx::any::AnyRow;
use sqlx::{Any, Row, Transaction};

use super::{SqlStore, all, key};
use crate::storage::dialect::Dialect;
use crate::storage::*;

macro_rules! claim_columns {
    () => {
        "project_id, branch, server_tag, epoch, updated_at"
    };
}

pub(super) fn claim_row(row: &AnyRow) -> Result<Claim, sqlx::Error> {
    Ok(Claim {
        key: key(row)?,
        server_tag: row.try_get("server_tag")?,
        epoch: row.try_get("epoch")?,
        updated_at: row.try_get("updated_at")?,
    })
}

/// Locks a claim row in a write transaction and checks that the fence is
/// the current owner's; `Fenced` otherwise.
pub(super) async fn check_fence(
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

pub(super) async fn claim(
    store: &SqlStore,
    key: &WorkspaceKey,
    server_tag: &str,
    lease_ms: i64,
) -> StoreResult<ClaimOutcome> {
    // One statement: take the row if it is free, released, or held by a
    // node whose heartbeat is older than the lease.
    let taken = sqlx::query(store.dialect.sql(concat!(
        "INSERT INTO git_actor_sessions AS c \
           (project_id, branch, server_tag, epoch, updated_at) \
         VALUES ($1, $2, $3, 1, {now}) \
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
    .fetch_optional(&store.pool)
    .await?;
    if let Some(row) = taken {
        return Ok(ClaimOutcome::Owned(claim_row(&row)?));
    }
    let current = claim_of(store, key)
        .await?
        .ok_or_else(|| StoreError::NotFound(format!("claim of {key} vanished")))?;
    if current.server_tag.as_deref() == Some(server_tag) {
        Ok(ClaimOutcome::Owned(current))
    } else {
        Ok(ClaimOutcome::HeldBy(current))
    }
}

pub(super) async fn claim_of(store: &SqlStore, key: &WorkspaceKey) -> StoreResult<Option<Claim>> {
    let row = sqlx::query(concat!(
        "SELECT ",
        claim_columns!(),
        " FROM git_actor_sessions WHERE project_id = $1 AND branch = $2"
    ))
    .bind(key.project_id)
    .bind(key.branch.as_str())
    .fetch_optional(&store.pool)
    .await?;
    Ok(row.as_ref().map(claim_row).transpose()?)
}

pub(super) async fn claims_of_node(store: &SqlStore, server_tag: &str) -> StoreResult<Vec<Claim>> {
    let rows = sqlx::query(concat!(
        "SELECT ",
        claim_columns!(),
        " FROM git_actor_sessions WHERE server_tag = $1 ORDER BY project_id, branch"
    ))
    .bind(server_tag)
    .fetch_all(&store.pool)
    .await?;
    all(rows, claim_row)
}

pub(super) async fn release_claim(
    store: &SqlStore,
    key: &WorkspaceKey,
    fence: &Fence,
) -> StoreResult<bool> {
    let done = sqlx::query(store.dialect.sql(
        "UPDATE git_actor_sessions SET server_tag = NULL, updated_at = {now} \
         WHERE project_id = $1 AND branch = $2 AND server_tag = $3 AND epoch = $4",
    ))
    .bind(key.project_id)
    .bind(key.branch.as_str())
    .bind(fence.server_tag.as_str())
    .bind(fence.epoch)
    .execute(&store.pool)
    .await?;
    Ok(done.rows_affected() > 0)
}

pub(super) async fn owned_claims(store: &SqlStore) -> StoreResult<Vec<Claim>> {
    let rows = sqlx::query(concat!(
        "SELECT ",
        claim_columns!(),
        " FROM git_actor_sessions WHERE server_tag IS NOT NULL ORDER BY project_id, branch"
    ))
    .fetch_all(&store.pool)
    .await?;
    all(rows, claim_row)
}
