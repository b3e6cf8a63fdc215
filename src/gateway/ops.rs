//! Operator endpoints (`/ops/api/...`): what this node is doing, and the
//! few levers an operator has. Every route needs an administrator.

use axum::Json;
use axum::extract::State;

use super::auth::AuthUser;
use super::error::ApiError;
use super::{ApiJson, AppState};
use crate::allocator::{AllocatorStats, WorkspaceStatus};
use crate::cluster::ClusterView;
use crate::storage::WorkspaceKey;

#[derive(serde::Serialize)]
pub struct WorkspacesView {
    server_tag: String,
    stats: AllocatorStats,
    workspaces: Vec<WorkspaceStatus>,
}

/// Every workspace on this node with its sessions, lock, dirty flag, last
/// activity, restarts and garbage-collection deadline.
pub async fn workspaces(
    State(state): State<AppState>,
    caller: AuthUser,
) -> Result<Json<WorkspacesView>, ApiError> {
    caller.require_admin()?;
    Ok(Json(WorkspacesView {
        server_tag: state.server_tag.to_string(),
        stats: state.allocator.stats().await?,
        workspaces: state.allocator.workspaces().await?,
    }))
}

#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ResetRequest {
    project: i64,
    branch: String,
}

#[derive(serde::Serialize)]
pub struct ResetResponse {
    /// False if the workspace was not marked failed (nothing to reset).
    reset: bool,
}

/// Clears a workspace marked failed after repeated crashes, so that
/// clients can open it again.
pub async fn reset_workspace(
    State(state): State<AppState>,
    caller: AuthUser,
    ApiJson(request): ApiJson<ResetRequest>,
) -> Result<Json<ResetResponse>, ApiError> {
    caller.require_admin()?;
    let key = WorkspaceKey::new(request.project, request.branch);
    let reset = state.allocator.reset(&key).await?;
    tracing::info!(workspace = %key, reset, by = %caller.user.username, "workspace reset requested");
    Ok(Json(ResetResponse { reset }))
}

/// The cluster as this node sees it: every node row with its heartbeat age
/// and the workspaces it owns, the peers this node is connected to, and the
/// sockets here whose workspace is served elsewhere.
pub async fn cluster(
    State(state): State<AppState>,
    caller: AuthUser,
) -> Result<Json<ClusterView>, ApiError> {
    caller.require_admin()?;
    Ok(Json(state.cluster.view().await?))
}
