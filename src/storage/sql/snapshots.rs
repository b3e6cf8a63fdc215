//! Snapshots of branches (`git_snapshots`): versioned, never overwritten,
//! trimmed to the number to keep; storing one trims the journal it covers.
//!
//! A snapshot must never go backwards: one that covers less of the journal
//! than the newest is refused, since the records it lacks may be trimmed.

use sha2::{Digest, Sha256};
use sqlx::any::AnyRow;
use sqlx::{Any, Row, Transaction};

use super::{SqlStore, all, claims, key, unique_violation};
use crate::storage::*;

macro_rules! snapshot_columns {
    () => {
        "project_id, branch, version, sha256, size, journal_seq, author, created_at"
    };
}

pub(super) fn snapshot_meta(row: &AnyRow) -> Result<SnapshotMeta, sqlx::Error> {
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

/// Inserts the next version of a branch (or, with `first_only`, version
/// 1 of a branch that has none: `Conflict` otherwise), trims the journal
/// it covers and old versions beyond `keep`.
pub(super) async fn insert_snapshot(
    store: &SqlStore,
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
    let row = sqlx::query(store.dialect.sql(statement))
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

pub(super) async fn fetch_snapshot(
    store: &SqlStore,
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
        .fetch_optional(&store.pool)
        .await?;
    row.map(|row| {
        Ok(Snapshot {
            meta: snapshot_meta(&row)?,
            data: row.try_get("data")?,
        })
    })
    .transpose()
}

pub(super) async fn put_snapshot(
    store: &SqlStore,
    key: &WorkspaceKey,
    snapshot: NewSnapshot,
    fence: Option<&Fence>,
) -> StoreResult<SnapshotMeta> {
    let mut tx = store.begin_write().await?;
    if let Some(fence) = fence {
        claims::check_fence(store.dialect, &mut tx, key, fence).await?;
    }
    let meta = insert_snapshot(store, &mut tx, key, &snapshot, false).await?;
    tx.commit().await?;
    Ok(meta)
}

pub(super) async fn create_branch(
    store: &SqlStore,
    key: &WorkspaceKey,
    snapshot: NewSnapshot,
) -> StoreResult<SnapshotMeta> {
    let mut tx = store.begin_write().await?;
    let meta = insert_snapshot(store, &mut tx, key, &snapshot, true).await?;
    tx.commit().await?;
    Ok(meta)
}

pub(super) async fn latest_snapshot(
    store: &SqlStore,
    key: &WorkspaceKey,
) -> StoreResult<Option<Snapshot>> {
    fetch_snapshot(store, key, None).await
}

pub(super) async fn snapshot(
    store: &SqlStore,
    key: &WorkspaceKey,
    version: i64,
) -> StoreResult<Option<Snapshot>> {
    fetch_snapshot(store, key, Some(version)).await
}

pub(super) async fn list_snapshots(
    store: &SqlStore,
    key: &WorkspaceKey,
) -> StoreResult<Vec<SnapshotMeta>> {
    let rows = sqlx::query(concat!(
        "SELECT ",
        snapshot_columns!(),
        " FROM git_snapshots WHERE project_id = $1 AND branch = $2 ORDER BY version DESC"
    ))
    .bind(key.project_id)
    .bind(key.branch.as_str())
    .fetch_all(&store.pool)
    .await?;
    all(rows, snapshot_meta)
}

pub(super) async fn branches(store: &SqlStore, project_id: i64) -> StoreResult<Vec<String>> {
    Ok(sqlx::query_scalar(
        "SELECT DISTINCT branch FROM git_snapshots WHERE project_id = $1 ORDER BY branch",
    )
    .bind(project_id)
    .fetch_all(&store.pool)
    .await?)
}
