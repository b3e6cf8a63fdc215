//! Wire types shared by every boundary of branchd: the HTTP API today, the
//! WebSocket protocol and cluster messages as they land.
//!
//! Everything here is plain data with serde derives. It must never depend on
//! a transport (axum, ractor) or on storage, so that the server, the tests and
//! the bench client can all use it as it is.

use serde::{Deserialize, Serialize};

/// The closed set of error codes a client can receive, over HTTP (with the
/// status in [`ErrorCode::http_status`]) and over WebSocket alike.
/// `docs/protocol.md` documents each; new codes are only ever added.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ErrorCode {
    /// No credentials, or credentials that are wrong, expired or revoked.
    Unauthorized,
    /// Authenticated, but the role does not allow the operation.
    Forbidden,
    /// The named project, branch, path or route does not exist.
    NotFound,
    /// The request is malformed or names something invalid; the message says what.
    BadRequest,
    /// The request is stale or clashes with existing state (duplicate name,
    /// outdated file version, last owner).
    Conflict,
    /// Another session holds the workspace's edit lock.
    Locked,
    /// A request, frame, file or archive exceeds a size limit.
    TooLarge,
    /// The operation is not supported (yet) by this server.
    Unsupported,
    /// The service cannot serve this now (database down, draining, lost
    /// ownership); retry or reconnect.
    Unavailable,
    /// A bug or an unexpected failure on the server; details are in its log.
    Internal,
}

impl ErrorCode {
    pub fn as_str(self) -> &'static str {
        match self {
            ErrorCode::Unauthorized => "unauthorized",
            ErrorCode::Forbidden => "forbidden",
            ErrorCode::NotFound => "not_found",
            ErrorCode::BadRequest => "bad_request",
            ErrorCode::Conflict => "conflict",
            ErrorCode::Locked => "locked",
            ErrorCode::TooLarge => "too_large",
            ErrorCode::Unsupported => "unsupported",
            ErrorCode::Unavailable => "unavailable",
            ErrorCode::Internal => "internal",
        }
    }

    /// The HTTP status that carries this code.
    pub fn http_status(self) -> u16 {
        match self {
            ErrorCode::Unauthorized => 401,
            ErrorCode::Forbidden => 403,
            ErrorCode::NotFound => 404,
            ErrorCode::BadRequest => 400,
            ErrorCode::Conflict => 409,
            ErrorCode::Locked => 423,
            ErrorCode::TooLarge => 413,
            ErrorCode::Unsupported => 501,
            ErrorCode::Unavailable => 503,
            ErrorCode::Internal => 500,
        }
    }
}

/// The body of every error: a code from the closed set and a message that
/// says what to fix.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ErrorBody {
    pub code: ErrorCode,
    pub message: String,
}
