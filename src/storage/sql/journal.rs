//! The journal (`journal`): appends go through one committer task per
//! store (group commit); reads serve replay.
//!
//! An append must never be acknowledged before the transaction holding it
//! has committed, and a stale fence must never cost another record of the
//! same batch its place: each record is checked against its own claim.

use sqlx::{AnyPool, Row};

use super::{SqlStore, WriteTurns, all};
use crate::storage::dialect::Dialect;
use crate::storage::*;

/// A journal append waiting for its turn in a group commit.
pub(super) struct PendingAppend {
    key: WorkspaceKey,
    fence: Fence,
    op: Vec<u8>,
    done: tokio::sync::oneshot::Sender<StoreResult<i64>>,
}

/// Most appends one journal transaction takes.
const MAX_JOURNAL_BATCH: usize = 256;

/// Most bytes of records one journal transaction takes (it always takes
/// at least one record). Bounds how long a transaction holds SQLite's
/// write lock, which the heartbeat waits for: about two of the largest
/// files a client may write by default.
const MAX_JOURNAL_BATCH_BYTES: usize = 16 << 20;

/// Group commit: every workspace of a node appends its journal records
/// through this one task, which commits whatever has queued up while the
/// previous transaction was committing in a single transaction (each
/// record still checked against its own fence). With one workspace and no
/// load that is one record per commit, as before; under load many
/// workspaces share each wait for the disk. What a caller sees does not
/// change: its record is durable when its append returns, and a record
/// whose fence is stale is refused while the others of the batch land.
pub(super) struct JournalCommitter {
    pub(super) pool: AnyPool,
    pub(super) dialect: &'static Dialect,
    /// SQLite: each transaction waits for its turn (see [`WriteTurns`]).
    pub(super) writers: Option<WriteTurns>,
}

impl JournalCommitter {
    pub(super) async fn run(self, mut queue: tokio::sync::mpsc::UnboundedReceiver<PendingAppend>) {
        // An append that did not fit the last batch: it opens the next.
        let mut carried: Option<PendingAppend> = None;
        loop {
            let first = match carried.take() {
                Some(append) => append,
                None => match queue.recv().await {
                    Some(append) => append,
                    None => return,
                },
            };
            let mut bytes = first.op.len();
            let mut batch = vec![first];
            while batch.len() < MAX_JOURNAL_BATCH {
                match queue.try_recv() {
                    Ok(next) if bytes + next.op.len() > MAX_JOURNAL_BATCH_BYTES => {
                        carried = Some(next);
                        break;
                    }
                    Ok(next) => {
                        bytes += next.op.len();
                        batch.push(next);
                    }
                    Err(_) => break,
                }
            }
            let turn = WriteTurns::take(&self.writers).await;
            let committed = self.commit(&batch).await;
            drop(turn);
            match committed {
                Ok(results) => {
                    for (append, result) in batch.into_iter().zip(results) {
                        let _ = append.done.send(result);
                    }
                }
                Err(err) => {
                    // Nothing of the batch landed: every caller gets the
                    // failure, as the same kind of error.
                    for append in batch {
                        let _ = append.done.send(Err(batch_failure(&err)));
                    }
                }
            }
        }
    }

    /// One transaction for the whole batch, in four statements whatever
    /// its size (each statement is a round trip to the database, and with
    /// SQLite a hand-off to its worker thread, which under load cost more
    /// than the work): begin; read the claims of the batch's keys, locked
    /// in key order (so two committers never wait on each other in a
    /// circle); insert every record whose fence matches its key's claim;
    /// commit. Per record: `Fenced`, or its sequence number.
    async fn commit(&self, batch: &[PendingAppend]) -> StoreResult<Vec<StoreResult<i64>>> {
        let mut keys: Vec<&WorkspaceKey> = batch.iter().map(|a| &a.key).collect();
        keys.sort();
        keys.dedup();
        let mut tx = self.pool.begin_with(self.dialect.begin_write).await?;

        let mut select = String::from(
            "SELECT project_id, branch, server_tag, epoch FROM git_actor_sessions WHERE ",
        );
        for i in 0..keys.len() {
            if i > 0 {
                select.push_str(" OR ");
            }
            select.push_str(&format!(
                "(project_id = ${} AND branch = ${})",
                2 * i + 1,
                2 * i + 2
            ));
        }
        select.push_str(" ORDER BY project_id, branch{share_lock}");
        let mut query = sqlx::query(self.dialect.sql_built(select));
        for key in &keys {
            query = query.bind(key.project_id).bind(key.branch.as_str());
        }
        let mut holders = std::collections::HashMap::new();
        for row in query.fetch_all(&mut *tx).await? {
            let branch: String = row.try_get("branch")?;
            let key = WorkspaceKey::new(row.try_get("project_id")?, branch);
            let tag: String = row.try_get("server_tag")?;
            let epoch: i64 = row.try_get("epoch")?;
            holders.insert(key, (tag, epoch));
        }

        let admitted = |append: &PendingAppend| {
            holders.get(&append.key).is_some_and(|(tag, epoch)| {
                *tag == append.fence.server_tag && *epoch == append.fence.epoch
            })
        };
        let accepted: Vec<&PendingAppend> = batch.iter().filter(|a| admitted(a)).collect();
        let mut seqs = Vec::with_capacity(accepted.len());
        if !accepted.is_empty() {
            let mut insert = String::from(
                "INSERT INTO journal (project_id, branch, epoch, op, created_at) VALUES ",
            );
            for i in 0..accepted.len() {
                if i > 0 {
                    insert.push_str(", ");
                }
                let n = 4 * i;
                insert.push_str(&format!(
                    "(${}, ${}, ${}, ${}, {{now}})",
                    n + 1,
                    n + 2,
                    n + 3,
                    n + 4
                ));
            }
            insert.push_str(" RETURNING seq");
            let mut query = sqlx::query_scalar(self.dialect.sql_built(insert));
            for append in &accepted {
                query = query
                    .bind(append.key.project_id)
                    .bind(append.key.branch.as_str())
                    .bind(append.fence.epoch)
                    .bind(append.op.as_slice());
            }
            seqs = query.fetch_all(&mut *tx).await?;
        }
        if seqs.len() != accepted.len() {
            return Err(StoreError::Internal(format!(
                "the journal insert returned {} sequence numbers for {} records",
                seqs.len(),
                accepted.len()
            )));
        }
        tx.commit().await?;

        // The rows were inserted in batch order, so their sequence numbers
        // rise in that order (whatever order RETURNING lists them in): each
        // workspace's records keep the order it sent them in.
        seqs.sort_unstable();
        let mut seqs = seqs.into_iter();
        Ok(batch
            .iter()
            .map(|append| {
                if admitted(append) {
                    seqs.next().ok_or_else(|| {
                        StoreError::Internal("a journal record got no sequence number".into())
                    })
                } else {
                    Err(StoreError::Fenced {
                        key: append.key.clone(),
                        server_tag: append.fence.server_tag.clone(),
                        epoch: append.fence.epoch,
                    })
                }
            })
            .collect())
    }
}

/// A failed batch's error as each of its callers gets it: a database
/// failure stays one (the caller may retry), anything else is internal.
fn batch_failure(err: &StoreError) -> StoreError {
    match err {
        StoreError::Database(e) => StoreError::Database(e.clone()),
        other => StoreError::Internal(format!("the journal transaction failed: {other}")),
    }
}

pub(super) async fn append_journal(
    store: &SqlStore,
    key: &WorkspaceKey,
    fence: &Fence,
    op: &[u8],
) -> StoreResult<i64> {
    let (done, answer) = tokio::sync::oneshot::channel();
    let append = PendingAppend {
        key: key.clone(),
        fence: fence.clone(),
        op: op.to_vec(),
        done,
    };
    if store.journal.send(append).is_err() {
        return Err(StoreError::Internal(
            "the journal committer has stopped".into(),
        ));
    }
    answer.await.unwrap_or_else(|_| {
        Err(StoreError::Internal(
            "the journal committer stopped before answering".into(),
        ))
    })
}

pub(super) async fn journal_after(
    store: &SqlStore,
    key: &WorkspaceKey,
    after_seq: i64,
) -> StoreResult<Vec<JournalEntry>> {
    let rows = sqlx::query(
        "SELECT seq, epoch, op, created_at FROM journal \
         WHERE project_id = $1 AND branch = $2 AND seq > $3 ORDER BY seq",
    )
    .bind(key.project_id)
    .bind(key.branch.as_str())
    .bind(after_seq)
    .fetch_all(&store.pool)
    .await?;
    all(rows, |row| {
        Ok(JournalEntry {
            seq: row.try_get("seq")?,
            epoch: row.try_get("epoch")?,
            op: row.try_get("op")?,
            created_at: row.try_get("created_at")?,
        })
    })
}
