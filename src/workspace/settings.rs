//! What a workspace needs to start: the service's settings that concern it
//! ([`WorkspaceSettings`], shared by every workspace of the node) and one
//! workspace's own arguments ([`WorkspaceArgs`]).

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use tokio_util::task::TaskTracker;

use super::files::{CachePool, FileLimits};
use super::liveness::Liveness;
use super::lock::LockLimits;
use crate::compile::CompileSettings;
use crate::config::Config;
use crate::storage::{Fence, Store, WorkspaceKey};

/// What a frame holds besides the answer in it (its id, keys, a file's
/// path and version): the answer's bound is the frame limit less this.
const FRAME_SLACK: u64 = 4096;

/// Everything about the service a workspace needs, taken from [`Config`].
#[derive(Debug, Clone)]
pub struct WorkspaceSettings {
    /// Where working copies (and scratch dirs) are made.
    pub root: PathBuf,
    pub files: FileLimits,
    pub max_path: usize,
    /// Most bytes an answer may take (see [`crate::protocol::Reply::fit`]):
    /// the frame limit less room for the frame around it.
    pub max_reply: usize,
    /// Most bytes a snapshot may unpack to.
    pub max_workspace: u64,
    pub snapshots_kept: u32,
    /// Lock lifetime when the client names none.
    pub lock_ttl: Duration,
    /// Longest lock lifetime a client may ask for.
    pub max_lock_ttl: Duration,
    /// Unsaved changes are saved this long after the last change...
    pub autosave_quiet: Duration,
    /// ... and at least this often while changes keep coming.
    pub autosave_max: Duration,
    /// Whether this node may still write (self-fencing); shared by the node.
    pub liveness: Liveness,
    /// The compiler, its limits and the node's compile slots (shared by
    /// every workspace made from these settings, as is the file cache's
    /// pool in `files`).
    pub compile: CompileSettings,
    /// Where the workspace's background work (saves, compiles) is
    /// spawned, so that shutdown can wait for it; the node's tracker in a
    /// server ([`crate::shutdown::Shutdown::tracker`]), a fresh one elsewhere.
    pub tasks: TaskTracker,
}

impl WorkspaceSettings {
    pub fn from_config(config: &Config) -> WorkspaceSettings {
        WorkspaceSettings {
            root: config.workspace_dir(),
            files: FileLimits {
                max_file: config.max_file,
                max_read: config.max_frame.saturating_sub(FRAME_SLACK),
                max_total: config.max_workspace,
                cache: CachePool::new(config.file_cache),
            },
            max_path: config.max_path,
            max_reply: usize::try_from(config.max_frame.saturating_sub(FRAME_SLACK))
                .unwrap_or(usize::MAX),
            max_workspace: config.max_workspace,
            snapshots_kept: config.snapshots_kept,
            lock_ttl: config.lock_ttl,
            max_lock_ttl: config.max_lock_ttl,
            autosave_quiet: config.autosave_quiet,
            autosave_max: config.autosave_max,
            liveness: Liveness::new(config.lease / 2),
            compile: CompileSettings::from_config(config),
            tasks: TaskTracker::new(),
        }
    }
}

impl WorkspaceSettings {
    pub(super) fn lock_limits(&self) -> LockLimits {
        LockLimits {
            default_ttl: self.lock_ttl,
            max_ttl: self.max_lock_ttl,
        }
    }
}

pub struct WorkspaceArgs {
    pub key: WorkspaceKey,
    pub store: Arc<dyn Store>,
    pub settings: WorkspaceSettings,
    /// Proof of ownership: every journal record and snapshot is written under it.
    pub fence: Fence,
}
