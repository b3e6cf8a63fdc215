//! Why a session could not be registered on a workspace of this node.
//!
//! [`RegisterError`] is what the allocator's register path returns, so that
//! its callers decide by variant: the cluster joins the owner on
//! [`RegisterError::HeldBy`] and looks for the new one on
//! [`RegisterError::Moved`]; the allocator itself registers again on
//! [`RegisterError::WorkspaceGone`]. Clients never see these: at the edge
//! (the gateway closing a socket, the router answering another node) they
//! become an [`OpError`], with the codes and messages `docs/protocol.md`
//! documents. Every variant but `Refused` is `unavailable` there.
//!
//! Nothing here may be matched on by its text; the text is for clients.

use std::time::Duration;

use crate::protocol::{ErrorCode, OpError};
use crate::storage::WorkspaceKey;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RegisterError {
    /// Another live node holds the key's claim: the session belongs there.
    #[error("workspace {key} is served by node {owner}; connect there")]
    HeldBy { key: WorkspaceKey, owner: String },
    /// Another node took the key over while this register waited for it.
    #[error("workspace {key} moved to another node; connect again")]
    Moved { key: WorkspaceKey },
    /// This node is draining: it takes no new sessions.
    #[error("this node is shutting down; reconnect to reach another")]
    Draining,
    /// The key is marked failed (it crashed too often, or could not be
    /// restarted). `retry_in` is how long it stays so, unless an operator
    /// resets it; absent for the registers waiting when it failed.
    #[error("{}", failed_message(key, reason, *retry_in))]
    Failed {
        key: WorkspaceKey,
        reason: String,
        retry_in: Option<Duration>,
    },
    /// The allocator did not answer within its timeout.
    #[error("the node is overloaded; retry")]
    TimedOut,
    /// The allocator has stopped (the node is shutting down).
    #[error("the node is shutting down")]
    Stopped,
    /// The workspace actor stopped between being handed out and taking the
    /// session (it crashed and is being restarted): registering again waits
    /// for the new one.
    #[error("the workspace stopped; reconnect")]
    WorkspaceGone,
    /// The workspace did not take the session within its call timeout.
    #[error("the workspace did not answer within {} s; retry", .0.as_secs())]
    WorkspaceTimedOut(Duration),
    /// An error already in client terms, from the store, the activation or
    /// the workspace; passed on as it is.
    #[error("{}", .0.message)]
    Refused(OpError),
}

fn failed_message(key: &WorkspaceKey, reason: &str, retry_in: Option<Duration>) -> String {
    match retry_in {
        Some(left) => format!(
            "workspace {key} failed repeatedly and is stopped ({reason}); an operator can reset it, or retry in {} s",
            left.as_secs() + 1
        ),
        None => format!("workspace {key} failed: {reason}"),
    }
}

impl From<OpError> for RegisterError {
    fn from(err: OpError) -> Self {
        RegisterError::Refused(err)
    }
}

/// The edge: what a client is told.
impl From<RegisterError> for OpError {
    fn from(err: RegisterError) -> Self {
        match err {
            RegisterError::Refused(err) => err,
            RegisterError::Failed {
                retry_in: Some(retry_in),
                ..
            } => OpError::unavailable_for(err.to_string(), retry_in),
            other => OpError::new(ErrorCode::Unavailable, other.to_string()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn clients_see_the_codes_and_messages_they_saw_before() {
        let key = WorkspaceKey::new(3, "main");
        let cases = [
            (
                RegisterError::HeldBy {
                    key: key.clone(),
                    owner: "node-b".into(),
                },
                "workspace 3:main is served by node node-b; connect there",
            ),
            (
                RegisterError::Draining,
                "this node is shutting down; reconnect to reach another",
            ),
            (
                RegisterError::Failed {
                    key: key.clone(),
                    reason: "it crashed too often".into(),
                    retry_in: Some(Duration::from_millis(59_400)),
                },
                "workspace 3:main failed repeatedly and is stopped (it crashed too often); an operator can reset it, or retry in 60 s",
            ),
            (
                RegisterError::Moved { key },
                "workspace 3:main moved to another node; connect again",
            ),
        ];
        for (err, message) in cases {
            let told = OpError::from(err);
            assert_eq!(told.code, ErrorCode::Unavailable);
            assert_eq!(told.message, message);
        }
        let passed = OpError::not_found("branch \"x\" has no snapshot");
        assert_eq!(OpError::from(RegisterError::from(passed.clone())), passed);
    }
}
