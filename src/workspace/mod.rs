//! Working copies on disk: creating a project's first repository and moving
//! a whole working dir in and out of a snapshot (tar.gz).
//!
//! Everything here is blocking file and git work: callers run it with
//! `tokio::task::spawn_blocking`, never on the async threads. This module
//! must never touch the database or the network.

pub mod repo;
pub mod snapshot;

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
