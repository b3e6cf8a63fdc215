//! Lock ops: `lock` (take or renew the edit lock) and `unlock`. The rules
//! are [`crate::workspace::lock::EditLock`]'s; this module times the
//! expiry and tells the other sessions.

use std::time::Instant;

use super::Ctx;
use crate::protocol::{OpResult, Reply};
use crate::workspace::messages::WorkspaceMsg;
use crate::workspace::state::{WorkspaceState, now_ms};

pub(super) fn lock(ws: &mut WorkspaceState, cx: &Ctx<'_>, ttl_ms: Option<u64>) -> OpResult {
    ws.expire_lock(None);
    let limits = ws.settings.lock_limits();
    let (taken, event) = ws
        .lock
        .take(&cx.who.doer(), ttl_ms, limits, Instant::now(), now_ms())?;
    let generation = taken.generation;
    // The timer only posts a message: the actor never waits for it.
    cx.myself
        .send_after(taken.ttl, move || WorkspaceMsg::LockExpired { generation });
    ws.broadcast(Some(&cx.who.id), event);
    Ok(Reply::LockTaken {
        holder: taken.info.holder,
        user: taken.info.user,
        expires_at: taken.info.expires_at,
    })
}

pub(super) fn unlock(ws: &mut WorkspaceState, cx: &Ctx<'_>) -> OpResult {
    ws.expire_lock(None);
    if let Some(event) = ws.lock.release(&cx.who.doer(), Instant::now())? {
        ws.broadcast(Some(&cx.who.id), event);
    }
    Ok(Reply::Done {})
}
