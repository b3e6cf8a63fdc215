//! Projects and their members (`projects`, `project_members`).
//!
//! A project always keeps at least one owner: every change of membership
//! checks that in the same transaction, and refuses otherwise.

use sqlx::any::AnyRow;
use sqlx::{Any, Row, Transaction};

use super::{SqlStore, all, snapshots};
use crate::storage::*;

macro_rules! project_columns {
    () => {
        "p.id, p.name, p.created_by, p.created_at"
    };
}

pub(super) fn project_row(row: &AnyRow) -> Result<Project, sqlx::Error> {
    Ok(Project {
        id: row.try_get("id")?,
        name: row.try_get("name")?,
        created_by: row.try_get("created_by")?,
        created_at: row.try_get("created_at")?,
    })
}

pub(super) fn role(row: &AnyRow) -> Result<Role, sqlx::Error> {
    let text: String = row.try_get("role")?;
    Role::parse(&text).ok_or_else(|| sqlx::Error::ColumnDecode {
        index: "role".into(),
        source: format!("unknown role {text:?}").into(),
    })
}

pub(super) async fn create_project(
    store: &SqlStore,
    name: &str,
    owner: i64,
    branch: &str,
    first: NewSnapshot,
) -> StoreResult<(Project, SnapshotMeta)> {
    let mut tx = store.begin_write().await?;
    let row = sqlx::query(store.dialect.sql(
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
    let meta = snapshots::insert_snapshot(
        store,
        &mut tx,
        &WorkspaceKey::new(project.id, branch),
        &first,
        true,
    )
    .await?;
    tx.commit().await?;
    Ok((project, meta))
}

pub(super) async fn project(store: &SqlStore, id: i64) -> StoreResult<Option<Project>> {
    let row = sqlx::query(concat!(
        "SELECT ",
        project_columns!(),
        " FROM projects p WHERE p.id = $1"
    ))
    .bind(id)
    .fetch_optional(&store.pool)
    .await?;
    Ok(row.as_ref().map(project_row).transpose()?)
}

pub(super) async fn projects_of_user(
    store: &SqlStore,
    user_id: i64,
) -> StoreResult<Vec<(Project, Role)>> {
    let rows = sqlx::query(concat!(
        "SELECT ",
        project_columns!(),
        ", m.role FROM projects p JOIN project_members m ON m.project_id = p.id \
         WHERE m.user_id = $1 ORDER BY p.id"
    ))
    .bind(user_id)
    .fetch_all(&store.pool)
    .await?;
    all(rows, |row| Ok((project_row(row)?, role(row)?)))
}

pub(super) async fn all_projects(store: &SqlStore) -> StoreResult<Vec<Project>> {
    let rows = sqlx::query(concat!(
        "SELECT ",
        project_columns!(),
        " FROM projects p ORDER BY p.id"
    ))
    .fetch_all(&store.pool)
    .await?;
    all(rows, project_row)
}

pub(super) async fn delete_project(store: &SqlStore, id: i64) -> StoreResult<bool> {
    let done = sqlx::query("DELETE FROM projects WHERE id = $1")
        .bind(id)
        .execute(&store.pool)
        .await?;
    Ok(done.rows_affected() > 0)
}

pub(super) async fn member_role(
    store: &SqlStore,
    project_id: i64,
    user_id: i64,
) -> StoreResult<Option<Role>> {
    let row =
        sqlx::query("SELECT role FROM project_members WHERE project_id = $1 AND user_id = $2")
            .bind(project_id)
            .bind(user_id)
            .fetch_optional(&store.pool)
            .await?;
    Ok(row.as_ref().map(role).transpose()?)
}

pub(super) async fn members(store: &SqlStore, project_id: i64) -> StoreResult<Vec<Member>> {
    let rows = sqlx::query(
        "SELECT m.user_id, u.username, m.role FROM project_members m \
         JOIN users u ON u.id = m.user_id WHERE m.project_id = $1 ORDER BY u.username",
    )
    .bind(project_id)
    .fetch_all(&store.pool)
    .await?;
    all(rows, |row| {
        Ok(Member {
            user_id: row.try_get("user_id")?,
            username: row.try_get("username")?,
            role: role(row)?,
        })
    })
}

pub(super) async fn set_member(
    store: &SqlStore,
    project_id: i64,
    user_id: i64,
    role: Role,
) -> StoreResult<()> {
    let mut tx = store.begin_write().await?;
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

pub(super) async fn remove_member(
    store: &SqlStore,
    project_id: i64,
    user_id: i64,
) -> StoreResult<bool> {
    let mut tx = store.begin_write().await?;
    let done = sqlx::query("DELETE FROM project_members WHERE project_id = $1 AND user_id = $2")
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
