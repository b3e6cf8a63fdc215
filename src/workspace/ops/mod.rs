//! The workspace's ops, one module per family, one dispatch line per op
//! (in the spirit of mini-redis's `cmd/`).
//!
//! Each op's function does the whole op: check, journal record, apply,
//! events, reply. An op that changes the working copy defines its journal
//! record and the one function that applies it, which the live path calls
//! after journalling and [`super::journal::Change::apply`] calls on
//! replay. Who may run an op, and whether it needs the edit lock, is the
//! op's metadata ([`crate::protocol::OpKind`]), checked once in
//! [`WorkspaceState::admit`] before dispatch.
//!
//! Adding an op: its variant (with metadata) in `protocol/ops.rs`, its
//! reply in `protocol/replies.rs` if it has a new one, its function in the
//! family's module here, and one line in [`run`].

pub(super) mod compile;
pub(super) mod files;
pub(super) mod git;
pub(super) mod lock;
pub(super) mod save;

use ractor::ActorRef;

use super::messages::{Responder, SessionInfo, WorkspaceMsg};
use super::state::WorkspaceState;
use crate::protocol::{Op, SessionId};

/// Who runs an op, and the actor it runs on (for timers and for work that
/// reports back by message).
pub(super) struct Ctx<'a> {
    pub myself: &'a ActorRef<WorkspaceMsg>,
    pub who: SessionInfo,
}

/// Runs one op of `session` and answers `reply`, now or (save, compile)
/// when the work it started is done.
pub(super) async fn run(
    ws: &mut WorkspaceState,
    myself: &ActorRef<WorkspaceMsg>,
    session: &SessionId,
    op: Op,
    reply: Responder,
) {
    let who = match ws.admit(session, &op) {
        Ok(who) => who,
        Err(err) => return reply.send(Err(err)),
    };
    let cx = Ctx { myself, who };
    // Every answer, now or later, is cut to the frame limit here.
    let max_reply = ws.settings.max_reply;
    let reply = reply.map(move |result| result.map(|answer| answer.fit(max_reply)));
    match op {
        Op::ListTree { path } => reply.send(files::list_tree(ws, path)),
        Op::ReadFile { path } => reply.send(files::read_file(ws, &path)),
        Op::Stat { path } => reply.send(files::stat(ws, &path)),
        Op::WriteFile {
            path,
            content,
            base_version,
            force,
        } => reply.send(files::write_file(ws, &cx, &path, content, base_version, force).await),
        Op::DeletePath { path, base_version } => {
            reply.send(files::delete_path(ws, &cx, &path, base_version).await)
        }
        Op::RenamePath { from, to } => reply.send(files::rename_path(ws, &cx, &from, &to).await),
        Op::MakeDir { path } => reply.send(files::make_dir(ws, &cx, &path).await),
        Op::Lock { ttl_ms } => reply.send(lock::lock(ws, &cx, ttl_ms)),
        Op::Unlock => reply.send(lock::unlock(ws, &cx)),
        Op::Save => save::save(ws, &cx, reply).await,
        Op::Compile { entry } => compile::compile(ws, &cx, &entry, reply),
        Op::GitStatus => reply.send(git::status(ws).await),
        Op::GitDiff { path } => reply.send(git::diff(ws, path).await),
        Op::GitCommit { message, paths } => reply.send(git::commit(ws, &cx, message, paths).await),
        Op::GitLog { limit } => reply.send(git::log(ws, limit).await),
        Op::GitBranches => reply.send(git::branches(ws).await),
        Op::GitCreateBranch { name } => reply.send(git::create_branch(ws, &cx, name).await),
    }
}
