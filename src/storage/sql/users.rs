//! Users and their login tokens (`users`, `auth_sessions`).
//!
//! Passwords arrive already hashed and tokens by their hash: this file
//! never sees a secret in the clear.

use sqlx::Row;
use sqlx::any::AnyRow;

use super::{SqlStore, all, unique_violation};
use crate::storage::*;

macro_rules! user_columns {
    () => {
        "u.id, u.username, u.display_name, u.email, u.is_admin, u.created_at"
    };
}

pub(super) fn user(row: &AnyRow) -> Result<User, sqlx::Error> {
    Ok(User {
        id: row.try_get("id")?,
        username: row.try_get("username")?,
        display_name: row.try_get("display_name")?,
        email: row.try_get("email")?,
        is_admin: row.try_get::<i64, _>("is_admin")? != 0,
        created_at: row.try_get("created_at")?,
    })
}

pub(super) async fn create_user(store: &SqlStore, new: NewUser) -> StoreResult<User> {
    let row = sqlx::query(store.dialect.sql(
        "INSERT INTO users (username, display_name, email, password_hash, is_admin, created_at) \
         VALUES ($1, $2, $3, $4, $5, {now}) \
         RETURNING id, created_at",
    ))
    .bind(new.username.as_str())
    .bind(new.display_name.as_str())
    .bind(new.email.as_str())
    .bind(new.password_hash.as_str())
    .bind(i64::from(new.is_admin))
    .fetch_one(&store.pool)
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

pub(super) async fn user_count(store: &SqlStore) -> StoreResult<i64> {
    Ok(sqlx::query_scalar("SELECT COUNT(*) FROM users")
        .fetch_one(&store.pool)
        .await?)
}

pub(super) async fn user_by_id(store: &SqlStore, id: i64) -> StoreResult<Option<User>> {
    let row = sqlx::query(concat!(
        "SELECT ",
        user_columns!(),
        " FROM users u WHERE u.id = $1"
    ))
    .bind(id)
    .fetch_optional(&store.pool)
    .await?;
    Ok(row.as_ref().map(user).transpose()?)
}

pub(super) async fn user_by_name(
    store: &SqlStore,
    username: &str,
) -> StoreResult<Option<(User, String)>> {
    let row = sqlx::query(concat!(
        "SELECT ",
        user_columns!(),
        ", u.password_hash FROM users u WHERE u.username = $1"
    ))
    .bind(username)
    .fetch_optional(&store.pool)
    .await?;
    match row {
        Some(row) => Ok(Some((user(&row)?, row.try_get("password_hash")?))),
        None => Ok(None),
    }
}

pub(super) async fn list_users(store: &SqlStore) -> StoreResult<Vec<User>> {
    let rows = sqlx::query(concat!(
        "SELECT ",
        user_columns!(),
        " FROM users u ORDER BY u.id"
    ))
    .fetch_all(&store.pool)
    .await?;
    all(rows, user)
}

pub(super) async fn set_password(
    store: &SqlStore,
    user_id: i64,
    password_hash: &str,
) -> StoreResult<()> {
    let mut tx = store.begin_write().await?;
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

pub(super) async fn create_auth_session(
    store: &SqlStore,
    token_hash: &str,
    user_id: i64,
    ttl_ms: i64,
) -> StoreResult<i64> {
    Ok(sqlx::query_scalar(store.dialect.sql(
        "INSERT INTO auth_sessions (token_hash, user_id, created_at, expires_at) \
         VALUES ($1, $2, {now}, {now} + $3) RETURNING expires_at",
    ))
    .bind(token_hash)
    .bind(user_id)
    .bind(ttl_ms)
    .fetch_one(&store.pool)
    .await?)
}

pub(super) async fn auth_session(
    store: &SqlStore,
    token_hash: &str,
) -> StoreResult<Option<AuthSession>> {
    let row = sqlx::query(store.dialect.sql(concat!(
        "SELECT ",
        user_columns!(),
        ", s.expires_at, CASE WHEN s.expires_at > {now} THEN 0 ELSE 1 END AS expired \
         FROM auth_sessions s JOIN users u ON u.id = s.user_id WHERE s.token_hash = $1"
    )))
    .bind(token_hash)
    .fetch_optional(&store.pool)
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

pub(super) async fn delete_auth_session(store: &SqlStore, token_hash: &str) -> StoreResult<bool> {
    let done = sqlx::query("DELETE FROM auth_sessions WHERE token_hash = $1")
        .bind(token_hash)
        .execute(&store.pool)
        .await?;
    Ok(done.rows_affected() > 0)
}

pub(super) async fn purge_expired_auth_sessions(store: &SqlStore) -> StoreResult<u64> {
    let done = sqlx::query(
        store
            .dialect
            .sql("DELETE FROM auth_sessions WHERE expires_at <= {now}"),
    )
    .execute(&store.pool)
    .await?;
    Ok(done.rows_affected())
}
