//! Operator endpoints (`/ops/api/...`): what this node is doing, and the
//! few levers an operator has.
//!
//! Every route needs an administrator, and [`routes`] makes that so for
//! every route it mounts, with a route layer: a handler here must never be
//! mounted anywhere else.

use axum::extract::State;
use axum::routing::{get, post};
use axum::{Json, Router, middleware};

use super::access::Admin;
use super::error::ApiError;
use super::{ApiJson, AppState};
use crate::allocator::{AllocatorStats, WorkspaceStatus};
use crate::cluster::{ClusterView, ResetReport};
use crate::storage::WorkspaceKey;

/// The operator routes, to be nested at `/ops/api`. The admin check is a
/// route layer over all of them (it runs after routing, so an unknown path
/// is still 404), so a route added here cannot forget it.
pub fn routes(state: AppState) -> Router<AppState> {
    Router::new()
        .route("/workspaces", get(workspaces))
        .route("/workspaces/reset", post(reset_workspace))
        .route("/cluster", get(cluster))
        .route_layer(middleware::from_extractor_with_state::<Admin, _>(state))
}

#[derive(serde::Serialize)]
pub struct WorkspacesView {
    server_tag: String,
    stats: AllocatorStats,
    workspaces: Vec<WorkspaceStatus>,
}

/// Every workspace on this node with its sessions, lock, dirty flag, last
/// activity, restarts and garbage-collection deadline.
pub async fn workspaces(State(state): State<AppState>) -> Result<Json<WorkspacesView>, ApiError> {
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

/// Clears a workspace marked failed after repeated crashes, so that
/// clients can open it again.
pub async fn reset_workspace(
    State(state): State<AppState>,
    Admin(caller): Admin,
    ApiJson(request): ApiJson<ResetRequest>,
) -> Result<Json<ResetReport>, ApiError> {
    let key = WorkspaceKey::new(request.project, request.branch);
    let report = state.cluster.reset(&key).await?;
    tracing::info!(workspace = %key, reset = report.reset, nodes = ?report.nodes, unreached = ?report.unreached, by = %caller.user.username, "workspace reset requested");
    Ok(Json(report))
}

/// The cluster as this node sees it: every node row with its heartbeat age
/// and the workspaces it owns, the peers this node is connected to, and the
/// sockets here whose workspace is served elsewhere.
pub async fn cluster(State(state): State<AppState>) -> Result<Json<ClusterView>, ApiError> {
    Ok(Json(state.cluster.view().await?))
}
