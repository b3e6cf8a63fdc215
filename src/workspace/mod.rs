//! Workspaces: the live working copy of one (project, branch).
//!
//! [`WorkspaceActor`] owns one working copy and does every operation on it,
//! one message at a time; [`Workspace`] is the handle callers use.
//!
//! - `actor`: the actor, a thin dispatcher; `messages`: what it is told;
//!   `handle`: the [`Workspace`] handle; `settings`: what it starts with;
//!   `activation`: snapshot + journal replay into a temp dir.
//! - `state`: the rules every op shares (sessions, admission by the op's
//!   metadata, journalling before applying, events); `lock` and `save`:
//!   the edit lock and the save queue as plain values, testable alone.
//! - `ops`: one module per op family, each owning check, journal record,
//!   apply (shared with replay through [`journal::Change`]) and events.
//! - Below them, plain blocking code: [`paths`] (what a client may name),
//!   [`files`] (versioned file operations, with hot files' contents kept in
//!   memory), [`repo`] (git) and [`snapshot`] (tar.gz in and out).
//!
//! Only the workspace touches the store for its snapshots and journal,
//! and it never knows about sockets, HTTP or which node a client is on.

mod activation;
mod actor;
pub mod events;
pub mod files;
mod handle;
pub mod journal;
pub mod liveness;
mod lock;
mod messages;
mod ops;
pub mod paths;
mod presence;
pub mod repo;
mod save;
mod settings;
pub mod snapshot;
mod state;

pub use actor::WorkspaceActor;
pub use handle::{CALL_TIMEOUT, Workspace};
pub use messages::{AttachInfo, Responder, SessionInfo, WorkspaceInfo, WorkspaceMsg};
pub use settings::{WorkspaceArgs, WorkspaceSettings};

pub use events::{Audience, EventSink, RemoteRelay};
pub use liveness::Liveness;

use std::path::Path;

use repo::GitAuthor;

use crate::storage::WorkspaceKey;

/// The process-group scope of workspaces.
pub const GROUP_SCOPE: &str = "git";

/// The process group of a workspace, `{project}:{branch}` in scope
/// [`GROUP_SCOPE`]: its actor joins it on the node that serves it (DESIGN's
/// shape). The group is joined locally only: a workspace actor's messages
/// cannot cross a network, so ractor_cluster does not announce it to other
/// nodes; there, the serving node's router (a member of the same group)
/// stands for it.
pub fn group_of(key: &WorkspaceKey) -> String {
    format!("{}:{}", key.project_id, key.branch)
}

/// Builds the first snapshot of a new project: a repository on `branch`
/// with a `README.md` and one commit by `author`, packed. The scratch
/// directory is made under `scratch_root` and removed afterwards.
pub fn first_snapshot(
    scratch_root: &Path,
    branch: &str,
    readme: &str,
    author: &GitAuthor,
) -> anyhow::Result<Vec<u8>> {
    std::fs::create_dir_all(scratch_root)?;
    let scratch = tempfile::Builder::new()
        .prefix("new-project-")
        .tempdir_in(scratch_root)?;
    repo::init_repository(scratch.path(), branch, readme, author)?;
    Ok(snapshot::pack(scratch.path())?)
}
