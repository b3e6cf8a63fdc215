//! The `compile` op. The compile runs off the actor (so the workspace
//! keeps serving meanwhile), answers its caller itself, and then sends
//! [`WorkspaceMsg::Compiled`] so the other sessions hear of it through
//! [`compiled`]. Viewers may compile: it changes no file (its cache lives
//! in `.git/branchd/`, which clients cannot name).

use super::Ctx;
use crate::compile::Compiled;
use crate::protocol::{Doer, Event, Reply};
use crate::workspace::messages::{Responder, WorkspaceMsg};
use crate::workspace::state::WorkspaceState;

pub(super) fn compile(ws: &mut WorkspaceState, cx: &Ctx<'_>, entry: &str, reply: Responder) {
    let entry = match ws.path(entry) {
        Ok(entry) => entry,
        Err(err) => return reply.send(Err(err)),
    };
    let settings = ws.settings.compile.clone();
    let cache = ws.compile_cache.clone();
    let myself = cx.myself.clone();
    let by = cx.who.doer();
    let max_reply = ws.settings.max_reply;
    ws.settings.tasks.spawn(async move {
        match settings.run(cache, entry.clone()).await {
            Ok(compiled) => {
                let compiled = compiled.within(max_reply, entry.as_str());
                reply.send(Ok(Reply::Compiled {
                    ok: compiled.ok,
                    diagnostics: compiled.diagnostics.clone(),
                    output: compiled.output.clone(),
                    stats: compiled.stats,
                }));
                let _ = myself.cast(WorkspaceMsg::Compiled {
                    entry: entry.to_string(),
                    compiled,
                    by,
                });
            }
            Err(err) => reply.send(Err(err)),
        }
    });
}

/// A compile that `by` asked for finished: tell the other sessions.
pub(in crate::workspace) fn compiled(
    ws: &mut WorkspaceState,
    entry: String,
    compiled: Compiled,
    by: Doer,
) {
    let except = by.session.clone();
    ws.broadcast(
        Some(&except),
        Event::Compiled {
            entry,
            ok: compiled.ok,
            diagnostics: compiled.diagnostics,
            output: compiled.output,
            stats: compiled.stats,
            by,
        },
    );
}
