//! Activation: a workspace comes to life from its latest snapshot and the
//! journal records after it, in a temp dir of its own. Replay applies each
//! record with [`Change::apply`], the functions the live path used.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Instant;

use super::files::Files;
use super::journal::Change;
use super::lock::EditLock;
use super::save::Saves;
use super::settings::WorkspaceArgs;
use super::snapshot;
use super::state::{WorkspaceState, blocking, now_ms};
use crate::compile::CompileCache;
use crate::protocol::OpError;
use crate::storage::{JournalEntry, Snapshot, Store, WorkspaceKey};

/// The latest snapshot and the journal records after it, consistent with
/// each other. A save that commits between the two reads trims records
/// the older snapshot needs; its own, newer snapshot has them, so the pair
/// is read again until no save came in between.
async fn load(
    store: &dyn Store,
    key: &WorkspaceKey,
) -> Result<(Snapshot, Vec<JournalEntry>), OpError> {
    loop {
        let snapshot = store.latest_snapshot(key).await?.ok_or_else(|| {
            OpError::not_found(format!(
                "branch {:?} of project {} does not exist",
                key.branch, key.project_id
            ))
        })?;
        let records = store.journal_after(key, snapshot.meta.journal_seq).await?;
        let newest = store.list_snapshots(key).await?.first().map(|m| m.version);
        if newest == Some(snapshot.meta.version) {
            return Ok((snapshot, records));
        }
        tracing::info!(workspace = %key, "a save landed while loading; loading again");
    }
}

/// Loads the latest snapshot into a new temp dir and checks it holds a repository.
pub(super) async fn activate(args: WorkspaceArgs) -> Result<WorkspaceState, OpError> {
    let WorkspaceArgs {
        key,
        store,
        settings,
        fence,
    } = args;
    let started = Instant::now();
    let (snapshot, records) = load(store.as_ref(), &key).await?;
    std::fs::create_dir_all(&settings.root)
        .map_err(|e| OpError::internal("creating the workspace dir", e))?;
    let dir = tempfile::Builder::new()
        .prefix(&format!("ws-{}-", key.project_id))
        .tempdir_in(&settings.root)
        .map_err(|e| OpError::internal("creating the working dir", e))?;
    let path = dir.path().to_path_buf();
    let max_bytes = settings.max_workspace;
    let version = snapshot.meta.version;
    let data = snapshot.data;
    let replayed = records.len();
    let journal_seq = records.last().map_or(snapshot.meta.journal_seq, |r| r.seq);
    let limits = settings.files.clone();
    let key_shown = key.to_string();
    let files = blocking("unpacking the snapshot", move || {
        let unpacked = snapshot::unpack(&data, &path, max_bytes).map_err(|e| match e {
            snapshot::SnapshotError::TooLarge { .. } => OpError::too_large(format!(
                "the snapshot is larger than BRANCHD_MAX_WORKSPACE: {e}"
            )),
            other => OpError::internal("unpacking the snapshot", other),
        })?;
        for path in &unpacked.skipped {
            tracing::error!(workspace = %key_shown, snapshot_version = version, %path, "snapshot entry left out: it is neither a plain file nor a directory (a symbolic link or special file); the branch opens without it");
        }
        git2::Repository::open(&path)
            .map_err(|e| OpError::internal("opening the snapshot's repository", e))?;
        let mut files = Files::open_measured(&path, limits, unpacked.bytes)
            .map_err(|e| OpError::internal("preparing the working dir", e))?;
        for record in &records {
            Change::decode(&record.op)?
                .apply(&mut files, &path)
                .map_err(|e| {
                    OpError::internal(
                        "replaying the journal",
                        format!("record {} failed: {}", record.seq, e.message),
                    )
                })?;
        }
        Ok(files)
    })
    .await?;
    tracing::info!(workspace = %key, snapshot_version = version, replayed, elapsed_ms = started.elapsed().as_millis() as u64, "workspace activated");
    let replayed_at = (replayed > 0).then(Instant::now);
    let compile_cache = CompileCache::new(
        dir.path(),
        &settings.root,
        settings.compile.compiler.clone(),
    );
    Ok(WorkspaceState {
        compile_cache: Arc::new(tokio::sync::Mutex::new(compile_cache)),
        key,
        store,
        settings,
        fence,
        journal_seq,
        saves: Saves::default(),
        stale: false,
        presence: Default::default(),
        presence_due: false,
        undelivered: Default::default(),
        dirty_since: replayed_at,
        last_change: replayed_at,
        files,
        sessions: HashMap::new(),
        lock: EditLock::default(),
        dirty: replayed > 0,
        snapshot_version: version,
        last_activity: now_ms(),
        dir,
    })
}
