//! The HTTP side of branchd (axum): the JSON API for logins, users and
//! projects, health checks, and the layers every request passes through
//! (body limit, panic guard, request logging without query strings).
//!
//! Only this module knows HTTP. Handlers are small and delegate to the
//! store and to `workspace`; errors are [`error::ApiError`], which alone
//! decides status codes. Who is calling is [`auth`]; what they may do is
//! [`access`] (and each op's own metadata, over WebSocket); the WebSocket
//! door is [`ws`], an open socket `socket`. The listener that accepts
//! connections and bounds them is [`serve`]; what limits count a client by
//! is [`peer`]; logins are bounded by [`hashing`] and [`throttle`].

pub mod access;
pub mod api;
pub mod auth;
pub mod error;
pub mod hashing;
pub mod ops;
pub mod peer;
pub mod serve;
mod socket;
pub mod throttle;
pub mod ws;

use std::sync::Arc;

use axum::Router;
use axum::extract::{DefaultBodyLimit, FromRequest, FromRequestParts, Request};
use axum::http::{Method, Uri};
use axum::response::IntoResponse;
use axum::routing::{delete, get, post};
use tower_http::catch_panic::CatchPanicLayer;
use tower_http::trace::{DefaultOnResponse, TraceLayer};
use tracing::Level;

use crate::allocator::Allocator;
use crate::cluster::Cluster;
use crate::config::Config;
use crate::protocol::ErrorCode;
use crate::shutdown::{Shutdown, TaskGroup};
use crate::storage::Store;
use error::ApiError;

/// What every handler can reach.
#[derive(Clone)]
pub struct AppState {
    pub store: Arc<dyn Store>,
    pub config: Arc<Config>,
    /// This node's server tag.
    pub server_tag: Arc<str>,
    pub allocator: Allocator,
    /// Where sessions are attached: here, or on the node that owns the workspace.
    pub cluster: Cluster,
    /// Draining once shutdown begins: readiness answers 503, new sockets
    /// are refused and open ones are told to reconnect.
    pub shutdown: Shutdown,
    /// Every socket task (and its session's removal): the drain waits for
    /// them to have said `reconnect` before it stops their workspaces.
    pub sockets: TaskGroup,
    /// The node's password hashing threads and their bounded queue.
    pub hashing: Arc<hashing::PasswordHashing>,
    /// Failed logins per username and per client address.
    pub logins: Arc<throttle::LoginThrottle>,
}

/// The whole HTTP API.
pub fn router(state: AppState) -> Router {
    let body_limit = usize::try_from(state.config.max_request_body).unwrap_or(usize::MAX);
    Router::new()
        .route("/healthz", get(api::healthz))
        .route("/ws", get(ws::upgrade))
        .route("/ws/echo", get(ws::echo))
        .route("/readyz", get(api::readyz))
        .route("/api/auth/login", post(api::login))
        .route("/api/auth/logout", post(api::logout))
        .route("/api/me", get(api::me))
        .route("/api/users", get(api::list_users).post(api::add_user))
        .route("/api/projects", get(api::list_projects).post(api::create_project))
        .route(
            "/api/projects/{id}",
            get(api::get_project).delete(api::delete_project),
        )
        .route("/api/projects/{id}/members", post(api::set_member))
        .route(
            "/api/projects/{id}/members/{username}",
            delete(api::remove_member),
        )
        .nest("/ops/api", ops::routes(state.clone()))
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .layer(DefaultBodyLimit::max(body_limit))
        .layer(CatchPanicLayer::custom(|_panic| {
            ApiError::new(
                ErrorCode::Internal,
                "the server hit a bug handling this request; the server log has details",
            )
            .into_response()
        }))
        .layer(
            // One line per request at info. Log the path only: query
            // strings may carry access tokens.
            TraceLayer::new_for_http()
                .make_span_with(|request: &Request| {
                    tracing::info_span!("http", method = %request.method(), path = %request.uri().path())
                })
                .on_request(())
                .on_response(DefaultOnResponse::new().level(Level::INFO)),
        )
        .with_state(state)
}

async fn not_found(method: Method, uri: Uri) -> ApiError {
    ApiError::not_found(format!("no such endpoint: {method} {}", uri.path()))
}

/// A known path with the wrong method: `bad_request` (400), like any other
/// malformed request, so that status and code always agree.
async fn method_not_allowed(method: Method, uri: Uri) -> ApiError {
    ApiError::bad_request(format!(
        "{} does not accept {method}; see docs/operations.md for the API",
        uri.path()
    ))
}

/// A JSON body whose rejections are [`ApiError`]s (`bad_request`, `too_large`).
#[derive(FromRequest)]
#[from_request(via(axum::Json), rejection(ApiError))]
pub struct ApiJson<T>(pub T);

/// Path parameters whose rejections are [`ApiError`]s (`bad_request`).
#[derive(FromRequestParts)]
#[from_request(via(axum::extract::Path), rejection(ApiError))]
pub struct ApiPath<T>(pub T);
