//! Git ops: `git_status`, `git_diff`, `git_commit`, `git_log`,
//! `git_branches`, `git_create_branch`. Git runs on the blocking pool; a
//! commit is checked, journalled (with its author and time, so replay
//! makes the same commit id) and then made by [`apply_commit`], the
//! function replay calls too.

use std::path::Path;

use serde::{Deserialize, Serialize};

use super::Ctx;
use crate::protocol::{Event, OpError, OpResult, Reply};
use crate::storage::{NewSnapshot, WorkspaceKey};
use crate::workspace::journal::Record;
use crate::workspace::paths::WorkPath;
use crate::workspace::repo::{self, GitAuthor};
use crate::workspace::state::{WorkspaceState, applied, blocking, now_ms};

/// The longest commit message taken.
const MAX_MESSAGE: usize = 64 * 1024;

pub(super) async fn status(ws: &mut WorkspaceState) -> OpResult {
    let dir = ws.dir.path().to_path_buf();
    let (branch, head, changes) = blocking("reading the status", move || {
        let (branch, head) = repo::head(&dir)?;
        Ok((branch, head, repo::status(&dir)?))
    })
    .await?;
    Ok(Reply::Status {
        branch,
        head,
        changes,
        truncated: false,
    })
}

pub(super) async fn diff(ws: &mut WorkspaceState, path: Option<String>) -> OpResult {
    let path = path.map(|p| ws.path_or_root(&p)).transpose()?;
    let dir = ws.dir.path().to_path_buf();
    let diff = blocking("computing the diff", move || {
        repo::diff(&dir, path.as_ref())
    })
    .await?;
    Ok(Reply::Diff {
        diff,
        truncated: false,
    })
}

/// A commit made: everything, or only `paths`, by this author at this time.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CommitRecord {
    pub message: String,
    pub paths: Option<Vec<String>>,
    pub name: String,
    pub email: String,
    pub time_ms: i64,
}

impl Record for CommitRecord {
    const OP: &'static str = "commit";
}

impl CommitRecord {
    fn paths(&self) -> Result<Option<Vec<WorkPath>>, OpError> {
        self.paths
            .as_ref()
            .map(|ps| {
                ps.iter()
                    .map(|p| WorkPath::parse(p, usize::MAX))
                    .collect::<Result<Vec<_>, _>>()
            })
            .transpose()
    }

    fn author(&self) -> GitAuthor {
        GitAuthor {
            name: self.name.clone(),
            email: self.email.clone(),
        }
    }
}

/// Makes the recorded commit: its id and message. Blocking.
pub fn apply_commit(dir: &Path, record: &CommitRecord) -> Result<(String, String), OpError> {
    let paths = record.paths()?;
    repo::commit(
        dir,
        &record.message,
        paths.as_deref(),
        &record.author(),
        record.time_ms,
    )
}

pub(super) async fn commit(
    ws: &mut WorkspaceState,
    cx: &Ctx<'_>,
    message: String,
    paths: Option<Vec<String>>,
) -> OpResult {
    if message.len() > MAX_MESSAGE {
        return Err(OpError::too_large("the commit message is over 64 KiB"));
    }
    let paths = paths
        .map(|ps| ps.iter().map(|p| ws.path(p)).collect::<Result<Vec<_>, _>>())
        .transpose()?;
    let record = CommitRecord {
        message,
        paths: paths
            .as_ref()
            .map(|ps| ps.iter().map(|p| p.to_string()).collect()),
        name: cx.who.display_name.clone(),
        email: cx.who.email.clone(),
        time_ms: now_ms(),
    };
    let dir = ws.dir.path().to_path_buf();
    let (check_dir, check) = (dir.clone(), record.clone());
    // The room checked first: staging already writes objects into `.git`.
    let growth = blocking("checking the commit", move || {
        let growth = repo::commit_growth(&check_dir, paths.as_deref())?;
        Ok((growth, check_dir, check, paths))
    })
    .await?;
    let (growth, check_dir, check, paths) = growth;
    ws.files.check_room("this commit", growth, 0)?;
    blocking("checking the commit", move || {
        repo::check_commit(
            &check_dir,
            &check.message,
            paths.as_deref(),
            &check.author(),
            check.time_ms,
        )
    })
    .await?;
    ws.record(&record).await?;
    let ((commit, message), used) = applied(
        blocking("committing", move || {
            let made = apply_commit(&dir, &record)?;
            let used = crate::workspace::files::content_bytes(&dir)
                .map_err(|e| OpError::internal("measuring the working copy", e))?;
            Ok((made, used))
        })
        .await,
    );
    ws.files.measured(used);
    ws.broadcast(
        Some(&cx.who.id),
        Event::Committed {
            commit: commit.clone(),
            message,
            by: cx.who.doer(),
        },
    );
    Ok(Reply::Committed { commit })
}

pub(super) async fn log(ws: &mut WorkspaceState, limit: Option<u64>) -> OpResult {
    let limit = limit.unwrap_or(50).clamp(1, 1000) as usize;
    let dir = ws.dir.path().to_path_buf();
    let commits = blocking("reading the log", move || repo::log(&dir, limit)).await?;
    Ok(Reply::Log {
        commits,
        truncated: false,
    })
}

pub(super) async fn branches(ws: &mut WorkspaceState) -> OpResult {
    Ok(Reply::Branches {
        branches: ws.store.branches(ws.key.project_id).await?,
        truncated: false,
    })
}

/// Creates branch `name` from this branch's HEAD, as a new workspace of
/// its own (a first snapshot); this workspace does not change.
pub(super) async fn create_branch(ws: &mut WorkspaceState, cx: &Ctx<'_>, name: String) -> OpResult {
    repo::validate_branch_name(&name)?;
    let dir = ws.dir.path().to_path_buf();
    let scratch = ws.settings.root.clone();
    let branch = name.clone();
    let (data, head) = blocking("creating the branch", move || {
        repo::branch_snapshot(&dir, &branch, &scratch)
    })
    .await?;
    let key = WorkspaceKey::new(ws.key.project_id, name.clone());
    let meta = ws
        .store
        .create_branch(
            &key,
            NewSnapshot {
                data,
                author: Some(cx.who.username.clone()),
                journal_seq: 0,
                keep: ws.settings.snapshots_kept,
            },
        )
        .await?;
    ws.broadcast(
        Some(&cx.who.id),
        Event::BranchCreated {
            branch: name.clone(),
            head: head.clone(),
            by: cx.who.doer(),
        },
    );
    Ok(Reply::BranchCreated {
        branch: name,
        head,
        snapshot_version: meta.version,
    })
}
