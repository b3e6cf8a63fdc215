//! Workspaces: the live working copy of one (project, branch).
//!
//! [`WorkspaceActor`] owns one working copy and does every operation on it,
//! one message at a time; [`Workspace`] is the handle callers use. Below it,
//! plain blocking code: [`paths`] (what a client may name), [`files`]
//! (versioned file operations, with hot files' contents kept in memory),
//! [`repo`] (git) and [`snapshot`] (tar.gz in and out). Only the actor touches the store (snapshots) and it never
//! knows about sockets or HTTP.

mod actor;
pub mod events;
pub mod files;
pub mod journal;
pub mod liveness;
pub mod paths;
pub mod repo;
pub mod snapshot;

pub use actor::{
    CALL_TIMEOUT, Responder, SessionInfo, Welcome, Workspace, WorkspaceActor, WorkspaceArgs,
    WorkspaceInfo, WorkspaceMsg, WorkspaceSettings,
};

pub use events::{Audience, EventSink, RemoteRelay};
pub use liveness::Liveness;

use std::path::Path;

use repo::GitAuthor;

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
