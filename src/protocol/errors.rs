//! Errors as clients see them: the closed set of codes, and the error an
//! op answers with. Internal code uses typed errors of its own and turns
//! them into these only at the edge (the gateway); nothing here is ever
//! matched on by its text.

use serde::{Deserialize, Serialize};

use super::{LockInfo, Reply};

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
    /// Too many attempts (failed logins) from this client or for this
    /// account; wait as long as the error says, then retry.
    RateLimited,
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
            ErrorCode::RateLimited => "rate_limited",
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
            ErrorCode::RateLimited => 429,
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
    /// For `rate_limited`, and `unavailable` when the server knows: how
    /// long to wait before trying again (also the `Retry-After` header).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retry_after_ms: Option<u64>,
}

/// A failed op: a code from the closed set, a message saying what to fix,
/// and, where they apply, the facts a client needs to recover.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
#[error("{code:?}: {message}")]
pub struct OpError {
    pub code: ErrorCode,
    pub message: String,
    /// For `conflict` on a file: its current version (absent if it does not exist).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub current_version: Option<String>,
    /// For `locked`: who holds the lock and until when.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lock: Option<Box<LockInfo>>,
    /// For `unavailable` when the server knows when trying again makes
    /// sense (a lost node's lease runs out then): wait this long first.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retry_after_ms: Option<u64>,
}

impl OpError {
    pub fn new(code: ErrorCode, message: impl Into<String>) -> Self {
        OpError {
            code,
            message: message.into(),
            current_version: None,
            lock: None,
            retry_after_ms: None,
        }
    }

    /// `unavailable`, with when to try again.
    pub fn unavailable_for(message: impl Into<String>, retry_after: std::time::Duration) -> Self {
        OpError {
            retry_after_ms: Some(retry_after.as_millis().try_into().unwrap_or(u64::MAX)),
            ..Self::new(ErrorCode::Unavailable, message)
        }
    }

    pub fn bad_request(message: impl Into<String>) -> Self {
        Self::new(ErrorCode::BadRequest, message)
    }

    pub fn not_found(message: impl Into<String>) -> Self {
        Self::new(ErrorCode::NotFound, message)
    }

    pub fn conflict(message: impl Into<String>, current_version: Option<String>) -> Self {
        OpError {
            current_version,
            ..Self::new(ErrorCode::Conflict, message)
        }
    }

    pub fn forbidden(message: impl Into<String>) -> Self {
        Self::new(ErrorCode::Forbidden, message)
    }

    pub fn too_large(message: impl Into<String>) -> Self {
        Self::new(ErrorCode::TooLarge, message)
    }

    /// An unexpected failure: logged here in full, reported without internals.
    pub fn internal(context: &str, err: impl std::fmt::Display) -> Self {
        tracing::error!(error = %err, "{context}");
        Self::new(
            ErrorCode::Internal,
            format!("{context} failed on the server; the server log has details"),
        )
    }
}

pub type OpResult = Result<Reply, OpError>;
