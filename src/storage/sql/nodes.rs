//! Cluster membership (`nodes`): each node's addresses and heartbeat,
//! judged by the database clock.
//!
//! Ages are never computed with a node's own clock: every comparison is
//! made in SQL, against the database's. A node writes its own row on the
//! heartbeat's connection, never the shared pool, so that renewing it
//! never queues behind other work.

use sqlx::Row;
use sqlx::any::AnyRow;

use super::{SqlStore, WriteTurns, all};
use crate::storage::*;

macro_rules! node_columns {
    () => {
        "server_tag, cluster_addr, http_addr, started_at, heartbeat_at"
    };
}

pub(super) fn node(row: &AnyRow) -> Result<NodeRow, sqlx::Error> {
    Ok(NodeRow {
        server_tag: row.try_get("server_tag")?,
        cluster_addr: row.try_get("cluster_addr")?,
        http_addr: row.try_get("http_addr")?,
        started_at: row.try_get("started_at")?,
        heartbeat_at: row.try_get("heartbeat_at")?,
    })
}

pub(super) async fn register_node(
    store: &SqlStore,
    server_tag: &str,
    cluster_addr: Option<&str>,
    http_addr: Option<&str>,
) -> StoreResult<NodeRow> {
    let _turn = WriteTurns::take(&store.writers).await;
    let row = sqlx::query(store.dialect.sql(concat!(
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
    .fetch_one(&store.heartbeat_pool)
    .await?;
    Ok(node(&row)?)
}

/// On the heartbeat's own connection, in its turn among SQLite's writers:
/// it waits for neither the pool nor a queue of large journal writes.
pub(super) async fn heartbeat(store: &SqlStore, server_tag: &str) -> StoreResult<bool> {
    let _turn = WriteTurns::take(&store.writers).await;
    let done = sqlx::query(
        store
            .dialect
            .sql("UPDATE nodes SET heartbeat_at = {now} WHERE server_tag = $1"),
    )
    .bind(server_tag)
    .execute(&store.heartbeat_pool)
    .await?;
    Ok(done.rows_affected() > 0)
}

pub(super) async fn live_nodes(store: &SqlStore, lease_ms: i64) -> StoreResult<Vec<NodeRow>> {
    let rows = sqlx::query(store.dialect.sql(concat!(
        "SELECT ",
        node_columns!(),
        " FROM nodes WHERE heartbeat_at > {now} - $1 ORDER BY server_tag"
    )))
    .bind(lease_ms)
    .fetch_all(&store.pool)
    .await?;
    all(rows, node)
}

pub(super) async fn remove_node_if_stale(
    store: &SqlStore,
    server_tag: &str,
    lease_ms: i64,
) -> StoreResult<bool> {
    let done = sqlx::query(
        store
            .dialect
            .sql("DELETE FROM nodes WHERE server_tag = $1 AND heartbeat_at <= {now} - $2"),
    )
    .bind(server_tag)
    .bind(lease_ms)
    .execute(&store.pool)
    .await?;
    Ok(done.rows_affected() > 0)
}

pub(super) async fn nodes_with_age(store: &SqlStore) -> StoreResult<Vec<(NodeRow, i64)>> {
    let rows = sqlx::query(store.dialect.sql(concat!(
        "SELECT ",
        node_columns!(),
        ", {now} - heartbeat_at AS age_ms FROM nodes ORDER BY server_tag"
    )))
    .fetch_all(&store.pool)
    .await?;
    all(rows, |row| {
        Ok((node(row)?, row.try_get::<i64, _>("age_ms")?))
    })
}

pub(super) async fn remove_node(store: &SqlStore, server_tag: &str) -> StoreResult<bool> {
    let done = sqlx::query("DELETE FROM nodes WHERE server_tag = $1")
        .bind(server_tag)
        .execute(&store.pool)
        .await?;
    Ok(done.rows_affected() > 0)
}
