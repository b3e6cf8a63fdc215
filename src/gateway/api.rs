//! The JSON API's handlers: health, login, users and projects.
//!
//! Each handler checks who is calling and what their role allows, then does
//! one thing through the store. Roles: a viewer reads, an editor also writes
//! (workspaces), an owner also manages members and deletes; `super::access`
//! says who acts with which role. docs/operations.md documents every route.

use std::time::Duration;

use axum::Json;
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::IntoResponse;
use serde::{Deserialize, Serialize};

use super::access::{Admin, access, effective_role, require};
use super::auth::{self, AuthUser, UserSpec};
use super::error::{ApiError, whole_seconds};
use super::peer::ClientAddr;
use super::{ApiJson, ApiPath, AppState};
use crate::protocol::ErrorCode;
use crate::storage::{Member, NewSnapshot, Project, Role, User};
use crate::workspace::{self, repo::GitAuthor};

/// How long `/readyz` waits for the database before answering 503.
const READY_TIMEOUT: Duration = Duration::from_secs(2);

/// The branch every new project starts with.
pub const DEFAULT_BRANCH: &str = "main";

#[derive(Serialize)]
pub struct Status {
    status: &'static str,
}

pub async fn healthz() -> Json<Status> {
    Json(Status { status: "ok" })
}

/// Ready when the node is not draining, the database answers and every
/// migration is applied.
pub async fn readyz(State(state): State<AppState>) -> Result<Json<Status>, ApiError> {
    if state.shutdown.is_draining() {
        return Err(ApiError::new(
            ErrorCode::Unavailable,
            "this node is shutting down",
        ));
    }
    let unreachable = || ApiError::new(ErrorCode::Unavailable, "the database is unreachable");
    match tokio::time::timeout(READY_TIMEOUT, state.store.ready()).await {
        Ok(Ok(true)) => Ok(Json(Status { status: "ready" })),
        Ok(Ok(false)) => Err(ApiError::new(
            ErrorCode::Unavailable,
            "database migrations are not all applied; run `branchd migrate`",
        )),
        Ok(Err(err)) => {
            tracing::warn!(error = %err, "readiness check failed");
            Err(unreachable())
        }
        Err(_) => {
            tracing::warn!(
                "readiness check failed: the database did not answer within {} s",
                READY_TIMEOUT.as_secs()
            );
            Err(unreachable())
        }
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LoginRequest {
    username: String,
    password: String,
}

#[derive(Serialize)]
pub struct LoginResponse {
    token: String,
    /// Milliseconds since the Unix epoch.
    expires_at: i64,
    user: User,
}

/// Checks a username and password and hands out a token. A login is
/// refused before any password is checked while its username or the
/// client's address is paused after failed logins (429, `super::throttle`),
/// and when every hashing slot and the queue are taken (503,
/// `super::hashing`).
pub async fn login(
    State(state): State<AppState>,
    client: ClientAddr,
    ApiJson(request): ApiJson<LoginRequest>,
) -> Result<Json<LoginResponse>, ApiError> {
    if let Err(wait) = state.logins.check(&request.username, client) {
        return Err(ApiError::new(
            ErrorCode::RateLimited,
            format!(
                "too many failed logins for this username or from this address; retry in {} s",
                whole_seconds(wait)
            ),
        )
        .retry_after(wait));
    }
    let found = state.store.user_by_name(&request.username).await?;
    let (user, hash) = match found {
        Some((user, hash)) => (Some(user), Some(hash)),
        None => (None, None),
    };
    let valid = state.hashing.verify(request.password, hash).await?;
    let user = match (user, valid) {
        (Some(user), true) => user,
        _ => {
            tracing::warn!(username = %request.username, %client, "failed login");
            state.logins.failed(&request.username, client);
            return Err(ApiError::unauthorized("wrong username or password"));
        }
    };
    state.logins.succeeded(&request.username);
    let token = auth::generate_token()?;
    let ttl_ms = i64::try_from(state.config.token_ttl.as_millis()).unwrap_or(i64::MAX / 2);
    let expires_at = state
        .store
        .create_auth_session(&auth::hash_token(&token), user.id, ttl_ms)
        .await?;
    tracing::info!(user = %user.username, "login");
    Ok(Json(LoginResponse {
        token,
        expires_at,
        user,
    }))
}

pub async fn logout(
    State(state): State<AppState>,
    caller: AuthUser,
) -> Result<StatusCode, ApiError> {
    state.store.delete_auth_session(&caller.token_hash).await?;
    Ok(StatusCode::NO_CONTENT)
}

pub async fn me(caller: AuthUser) -> Json<User> {
    Json(caller.user)
}

pub async fn list_users(
    State(state): State<AppState>,
    _: Admin,
) -> Result<Json<Vec<User>>, ApiError> {
    Ok(Json(state.store.list_users().await?))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AddUserRequest {
    username: String,
    password: Option<String>,
    display_name: Option<String>,
    email: Option<String>,
    #[serde(default)]
    admin: bool,
}

#[derive(Serialize)]
pub struct AddUserResponse {
    user: User,
    /// Present only when the server generated the password.
    #[serde(skip_serializing_if = "Option::is_none")]
    password: Option<String>,
}

pub async fn add_user(
    State(state): State<AppState>,
    Admin(caller): Admin,
    ApiJson(request): ApiJson<AddUserRequest>,
) -> Result<impl IntoResponse, ApiError> {
    let (user, password) = auth::create_user(
        state.store.as_ref(),
        &state.hashing,
        UserSpec {
            username: request.username,
            password: request.password,
            display_name: request.display_name,
            email: request.email,
            admin: request.admin,
        },
    )
    .await?;
    tracing::info!(user = %user.username, by = %caller.user.username, "user created");
    Ok((
        StatusCode::CREATED,
        Json(AddUserResponse { user, password }),
    ))
}

/// A project as one caller sees it.
#[derive(Serialize)]
pub struct ProjectView {
    #[serde(flatten)]
    project: Project,
    /// The caller's role.
    role: Role,
}

#[derive(Serialize)]
pub struct ProjectDetail {
    #[serde(flatten)]
    project: Project,
    role: Role,
    branches: Vec<String>,
    members: Vec<Member>,
}

pub async fn list_projects(
    State(state): State<AppState>,
    caller: AuthUser,
) -> Result<Json<Vec<ProjectView>>, ApiError> {
    // Administrators see every project; anyone else the ones they are a
    // member of. Either way the role shown is the one they act with.
    let projects: Vec<(Project, Option<Role>)> = if caller.user.is_admin {
        let all = state.store.all_projects().await?;
        all.into_iter().map(|project| (project, None)).collect()
    } else {
        let mine = state.store.projects_of_user(caller.user.id).await?;
        mine.into_iter()
            .map(|(project, role)| (project, Some(role)))
            .collect()
    };
    let views = projects
        .into_iter()
        .filter_map(|(project, membership)| {
            effective_role(&caller.user, membership).map(|role| ProjectView { project, role })
        })
        .collect();
    Ok(Json(views))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CreateProjectRequest {
    name: String,
}

pub async fn create_project(
    State(state): State<AppState>,
    caller: AuthUser,
    ApiJson(request): ApiJson<CreateProjectRequest>,
) -> Result<impl IntoResponse, ApiError> {
    let name = request.name.trim().to_string();
    if name.is_empty() || name.chars().count() > 200 || name.chars().any(char::is_control) {
        return Err(ApiError::bad_request(
            "project name must be 1 to 200 characters with no control characters",
        ));
    }
    let author = GitAuthor {
        name: caller.user.display_name.clone(),
        email: caller.user.email.clone(),
    };
    let scratch = state.config.workspace_dir();
    let readme = format!("# {name}\n");
    let data = tokio::task::spawn_blocking(move || {
        workspace::first_snapshot(&scratch, DEFAULT_BRANCH, &readme, &author)
    })
    .await
    .map_err(|e| ApiError::internal("creating the project repository", e))?
    .map_err(|e| ApiError::internal("creating the project repository", e))?;
    let size = data.len();
    let first = NewSnapshot {
        data,
        author: Some(caller.user.username.clone()),
        journal_seq: 0,
        keep: state.config.snapshots_kept,
    };
    let (project, _) = state
        .store
        .create_project(&name, caller.user.id, DEFAULT_BRANCH, first)
        .await?;
    tracing::info!(project = project.id, by = %caller.user.username, snapshot_bytes = size, "project created");
    let detail = ProjectDetail {
        branches: vec![DEFAULT_BRANCH.to_string()],
        members: state.store.members(project.id).await?,
        role: Role::Owner,
        project,
    };
    Ok((StatusCode::CREATED, Json(detail)))
}

pub async fn get_project(
    State(state): State<AppState>,
    caller: AuthUser,
    ApiPath(id): ApiPath<i64>,
) -> Result<Json<ProjectDetail>, ApiError> {
    let (project, role) = access(&state, &caller.user, id).await?;
    Ok(Json(ProjectDetail {
        branches: state.store.branches(id).await?,
        members: state.store.members(id).await?,
        role,
        project,
    }))
}

pub async fn delete_project(
    State(state): State<AppState>,
    caller: AuthUser,
    ApiPath(id): ApiPath<i64>,
) -> Result<StatusCode, ApiError> {
    let (_, role) = access(&state, &caller.user, id).await?;
    require(role, Role::Owner, "deleting a project")?;
    state.store.delete_project(id).await?;
    tracing::info!(project = id, by = %caller.user.username, "project deleted");
    Ok(StatusCode::NO_CONTENT)
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SetMemberRequest {
    username: String,
    role: String,
}

pub async fn set_member(
    State(state): State<AppState>,
    caller: AuthUser,
    ApiPath(id): ApiPath<i64>,
    ApiJson(request): ApiJson<SetMemberRequest>,
) -> Result<Json<Vec<Member>>, ApiError> {
    let (_, role) = access(&state, &caller.user, id).await?;
    require(role, Role::Owner, "changing members")?;
    let new_role = Role::parse(&request.role).ok_or_else(|| {
        ApiError::bad_request(format!(
            "role {:?} is unknown: use viewer, editor or owner",
            request.role
        ))
    })?;
    let (user, _) = state
        .store
        .user_by_name(&request.username)
        .await?
        .ok_or_else(|| ApiError::not_found(format!("no user named {:?}", request.username)))?;
    state.store.set_member(id, user.id, new_role).await?;
    tracing::info!(project = id, member = %user.username, role = new_role.as_str(), by = %caller.user.username, "member set");
    Ok(Json(state.store.members(id).await?))
}

pub async fn remove_member(
    State(state): State<AppState>,
    caller: AuthUser,
    ApiPath((id, username)): ApiPath<(i64, String)>,
) -> Result<StatusCode, ApiError> {
    let (_, role) = access(&state, &caller.user, id).await?;
    require(role, Role::Owner, "changing members")?;
    let (user, _) = state
        .store
        .user_by_name(&username)
        .await?
        .ok_or_else(|| ApiError::not_found(format!("no user named {username:?}")))?;
    if !state.store.remove_member(id, user.id).await? {
        return Err(ApiError::not_found(format!(
            "{username:?} is not a member of project {id}"
        )));
    }
    tracing::info!(project = id, member = %username, by = %caller.user.username, "member removed");
    Ok(StatusCode::NO_CONTENT)
}
