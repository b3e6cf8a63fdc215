//! The `save` op: a session asks for a snapshot now. The save itself is
//! [`crate::workspace::save`]'s; the reply comes when the run that covers
//! the session's changes is stored.

use super::Ctx;
use crate::workspace::messages::Responder;
use crate::workspace::save::SaveWaiter;
use crate::workspace::state::WorkspaceState;

pub(super) async fn save(ws: &mut WorkspaceState, cx: &Ctx<'_>, reply: Responder) {
    let waiter = SaveWaiter::Session {
        reply,
        by: cx.who.doer(),
    };
    ws.request_save(cx.myself, waiter).await
}
