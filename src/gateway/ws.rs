//! The WebSocket routes' door: `GET /ws?project=<id>&branch=<name>` and
//! the `GET /ws/echo` diagnostics socket.
//!
//! It owns admission: who is calling (token), whether they may open this
//! workspace (role) and which workspace that is, all decided before the
//! upgrade, so that a refusal is a plain HTTP error before any socket exists
//! (401 no or bad token, 403 not a member, 404 unknown project or branch,
//! 503 draining). What happens on an open socket is `super::socket`'s job;
//! nothing here may touch a socket after handing it over.
//!
//! The wire format is in `docs/protocol.md`; the types in `crate::protocol`.

use axum::extract::ws::rejection::WebSocketUpgradeRejection;
use axum::extract::ws::{Message, WebSocketUpgrade};
use axum::extract::{Query, State};
use axum::http::{HeaderMap, Uri};
use axum::response::{IntoResponse, Response};
use serde::Deserialize;

use super::AppState;
use super::access::access;
use super::auth::{AuthUser, TokenFrom, authenticate, bearer_token};
use super::error::ApiError;
use super::socket::{Target, serve};
use crate::protocol::{ErrorCode, SessionId};
use crate::storage::WorkspaceKey;
use crate::workspace::SessionInfo;

/// The WebSocket layer's read buffer. It zero-fills the free part of this
/// buffer before every read, so its default (128 KiB) cost a memset of up
/// to 128 KiB per small frame; larger frames still arrive whole (the
/// buffer grows for them).
pub const READ_BUFFER: usize = 8 * 1024;

#[derive(Deserialize)]
pub struct WsQuery {
    project: Option<String>,
    branch: Option<String>,
}

/// The upgrade: authenticate, authorise and find the workspace, then hand
/// the socket to a connection.
pub async fn upgrade(
    State(state): State<AppState>,
    query: Result<Query<WsQuery>, axum::extract::rejection::QueryRejection>,
    headers: HeaderMap,
    uri: Uri,
    upgrade: Result<WebSocketUpgrade, WebSocketUpgradeRejection>,
) -> Response {
    match prepare(&state, query, &headers, &uri).await {
        Err(err) => err.into_response(),
        Ok(target) => match upgrade {
            Err(_) => ApiError::bad_request(
                "GET /ws takes a WebSocket upgrade (Connection: Upgrade, Upgrade: websocket)",
            )
            .into_response(),
            Ok(upgrade) => {
                // Frames up to twice the limit are read and answered with
                // `too_large`; beyond that the socket is closed (1009).
                let hard_limit = state.config.max_frame.saturating_mul(2);
                let counted = state.sockets.token();
                configured(upgrade, hard_limit).on_upgrade(move |socket| async move {
                    serve(socket, state, target).await;
                    drop(counted);
                })
            }
        },
    }
}

/// The WebSocket layer's settings for a socket taking frames up to `limit`
/// bytes.
fn configured(upgrade: WebSocketUpgrade, limit: u64) -> WebSocketUpgrade {
    let limit = usize::try_from(limit).unwrap_or(usize::MAX);
    upgrade
        .read_buffer_size(READ_BUFFER)
        .max_message_size(limit)
        .max_frame_size(limit)
}

/// `GET /ws/echo`: a diagnostics socket that sends every binary frame
/// back unchanged (clients measure the network; the benchmarks compare an
/// op's round trip with it). Needs any valid token.
pub async fn echo(
    State(state): State<AppState>,
    headers: HeaderMap,
    uri: Uri,
    upgrade: Result<WebSocketUpgrade, WebSocketUpgradeRejection>,
) -> Response {
    if let Err(err) = admit(&state, &headers, &uri).await {
        return err.into_response();
    }
    let Ok(upgrade) = upgrade else {
        return ApiError::bad_request("GET /ws/echo takes a WebSocket upgrade").into_response();
    };
    // Not a session: it ends when the node stops, not at the drain.
    let (counted, stopping) = (
        state.shutdown.tracker().token(),
        state.shutdown.stopping().clone(),
    );
    configured(upgrade, state.config.max_frame).on_upgrade(|mut socket| async move {
        let _counted = counted;
        while let Some(Some(Ok(message))) = stopping.run_until_cancelled(socket.recv()).await {
            let reply = match message {
                Message::Binary(bytes) => Message::Binary(bytes),
                Message::Close(_) => break,
                _ => continue,
            };
            if socket.send(reply).await.is_err() {
                break;
            }
        }
    })
}

/// Who may open a socket: a valid token (header, else `access_token`) on a
/// node that is not draining.
async fn admit(state: &AppState, headers: &HeaderMap, uri: &Uri) -> Result<AuthUser, ApiError> {
    let token = bearer_token(headers, uri, TokenFrom::HeaderOrQuery)?;
    let caller = authenticate(state, &token).await?;
    if state.shutdown.is_draining() {
        return Err(ApiError::new(
            ErrorCode::Unavailable,
            "this node is shutting down; connect again to reach another",
        ));
    }
    Ok(caller)
}

async fn prepare(
    state: &AppState,
    query: Result<Query<WsQuery>, axum::extract::rejection::QueryRejection>,
    headers: &HeaderMap,
    uri: &Uri,
) -> Result<Target, ApiError> {
    let Query(query) = query.map_err(|e| ApiError::bad_request(e.body_text()))?;
    let caller = admit(state, headers, uri).await?;
    let project: i64 = query
        .project
        .as_deref()
        .ok_or_else(|| {
            ApiError::bad_request(
                "the project query parameter is missing: /ws?project=<id>&branch=<name>",
            )
        })?
        .parse()
        .map_err(|_| ApiError::bad_request("project must be a project id (an integer)"))?;
    let branch = query.branch.filter(|b| !b.is_empty()).ok_or_else(|| {
        ApiError::bad_request(
            "the branch query parameter is missing: /ws?project=<id>&branch=<name>",
        )
    })?;
    let (_, role) = access(state, &caller.user, project).await?;
    if !state.store.branches(project).await?.contains(&branch) {
        return Err(ApiError::not_found(format!(
            "branch {branch:?} of project {project} does not exist"
        )));
    }
    let session = SessionInfo {
        id: new_session_id(),
        user_id: caller.user.id,
        username: caller.user.username,
        display_name: caller.user.display_name,
        email: caller.user.email,
        role,
    };
    Ok(Target {
        session,
        key: WorkspaceKey::new(project, branch),
    })
}

fn new_session_id() -> SessionId {
    let mut bytes = [0u8; 12];
    // A failure of the OS random source leaves zeros; the time keeps ids apart.
    let _ = getrandom::fill(&mut bytes);
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(0);
    format!("{}{:x}", hex::encode(bytes), nanos & 0xffff)
}
