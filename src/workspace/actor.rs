//! The workspace actor: the one owner of a live working copy.
//!
//! It activates from the latest snapshot into a temp dir of its own
//! ([`super::activation`]), then handles one message at a time, handing
//! each to the code that owns it: ops to [`super::ops`], saves to
//! [`super::save`], sessions and the lock to [`super::state`]. Blocking
//! work (unpacking, packing, git) runs on the blocking pool so other
//! workspaces never stall; small file reads and writes run inline (they
//! take microseconds).
//!
//! It must never wait on a client: events go through bounded channels with
//! `try_send`, and a session that cannot keep up is detached. Its temp dir
//! lives in its state, so it is removed however the actor ends (stop, kill
//! or panic).

use std::time::Duration;

use ractor::{Actor, ActorProcessingErr, ActorRef};

use super::activation::activate;
use super::messages::WorkspaceMsg;
use super::ops;
use super::presence::PRESENCE_BATCH;
use super::save::SaveWaiter;
use super::settings::WorkspaceArgs;
use super::state::WorkspaceState;

pub struct WorkspaceActor;

impl Actor for WorkspaceActor {
    type Msg = WorkspaceMsg;
    type State = WorkspaceState;
    type Arguments = WorkspaceArgs;

    async fn pre_start(
        &self,
        myself: ActorRef<WorkspaceMsg>,
        args: WorkspaceArgs,
    ) -> Result<WorkspaceState, ActorProcessingErr> {
        let state = activate(args).await?;
        // Left by itself when the actor ends, however it ends.
        ractor::pg::join_scoped(
            super::GROUP_SCOPE.to_string(),
            super::group_of(&state.key),
            vec![myself.get_cell()],
        );
        let tick = (state.settings.autosave_quiet / 2)
            .min(state.settings.autosave_max / 2)
            .clamp(Duration::from_millis(10), Duration::from_secs(1));
        myself.send_interval(tick, || WorkspaceMsg::AutosaveTick);
        Ok(state)
    }

    async fn handle(
        &self,
        myself: ActorRef<WorkspaceMsg>,
        message: WorkspaceMsg,
        state: &mut WorkspaceState,
    ) -> Result<(), ActorProcessingErr> {
        match message {
            WorkspaceMsg::Attach {
                session,
                events,
                reply,
            } => {
                let attached = state.attach(session, events).await;
                if let Some(reply) = reply {
                    let _ = reply.send(attached);
                }
            }
            WorkspaceMsg::Detach { session } => state.detach(&session),
            WorkspaceMsg::Op { session, op, reply } => {
                ops::run(state, &myself, &session, op, reply).await
            }
            WorkspaceMsg::Info { reply } => {
                let _ = reply.send(state.info());
            }
            WorkspaceMsg::Save { reply } => {
                state.request_save(&myself, SaveWaiter::Node(reply)).await
            }
            WorkspaceMsg::SaveDone { result } => state.save_done(&myself, result).await,
            WorkspaceMsg::LockExpired { generation } => state.expire_lock(Some(generation)),
            WorkspaceMsg::AutosaveTick => state.autosave(&myself).await,
            WorkspaceMsg::PresenceTick => state.announce_presence(),
            WorkspaceMsg::Compiled {
                entry,
                compiled,
                by,
            } => ops::compile::compiled(state, entry, compiled, by),
            #[cfg(any(test, feature = "fault-injection"))]
            WorkspaceMsg::Panic => panic!("test-requested panic"),
        }
        if state.presence_due {
            state.presence_due = false;
            myself.send_after(PRESENCE_BATCH, || WorkspaceMsg::PresenceTick);
        }
        if state.stale {
            // Its journal and working copy may differ (see `record`): stop;
            // sessions are closed and told to reconnect.
            myself.stop(Some("lost the database while writing".into()));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Config;
    use crate::storage::{self, NewSnapshot, WorkspaceKey};
    use crate::workspace::repo::GitAuthor;
    use crate::workspace::{Workspace, WorkspaceArgs, WorkspaceSettings, first_snapshot};

    #[tokio::test]
    async fn a_panic_in_the_actor_removes_its_working_dir() {
        let data = tempfile::tempdir().expect("data");
        let store = storage::open(&storage::sqlite::default_url(data.path()), 2)
            .await
            .expect("store");
        let owner = store
            .create_user(storage::NewUser {
                username: "u".into(),
                display_name: "U".into(),
                email: "u@example.com".into(),
                password_hash: "x".into(),
                is_admin: false,
            })
            .await
            .expect("user");
        let author = GitAuthor {
            name: "U".into(),
            email: "u@example.com".into(),
        };
        let first = first_snapshot(data.path(), "main", "# t\n", &author).expect("snapshot");
        let (project, _) = store
            .create_project(
                "t",
                owner.id,
                "main",
                NewSnapshot {
                    data: first,
                    author: None,
                    journal_seq: 0,
                    keep: 10,
                },
            )
            .await
            .expect("project");
        let mut config = Config::for_tests().expect("the default config");
        config.database.data_dir = data.path().to_path_buf();
        config.workspace_dir = None;
        let key = WorkspaceKey::new(project.id, "main");
        store.register_node("t", None, None).await.expect("node");
        let fence = match store.claim(&key, "t", 60_000).await.expect("claim") {
            crate::storage::ClaimOutcome::Owned(claim) => claim.fence().expect("owner"),
            other => panic!("{other:?}"),
        };
        let (workspace, handle) = Workspace::start(WorkspaceArgs {
            key: key.clone(),
            store,
            settings: WorkspaceSettings::from_config(&config),
            fence,
        })
        .await
        .expect("start");
        let dir = workspace.info().await.expect("info").dir;
        assert!(dir.join("README.md").is_file());
        let members = || {
            ractor::pg::get_scoped_local_members(
                &crate::workspace::GROUP_SCOPE.to_string(),
                &crate::workspace::group_of(&key),
            )
        };
        assert_eq!(
            members().iter().map(|m| m.get_id()).collect::<Vec<_>>(),
            vec![workspace.actor().get_id()],
            "the active workspace is the member of its group {}:main",
            key.project_id
        );

        workspace.actor().cast(WorkspaceMsg::Panic).expect("cast");
        handle.await.expect("actor task ends");
        assert!(!dir.exists(), "the working dir is removed after a panic");
        assert!(members().is_empty(), "a crashed workspace leaves its group");
    }
}
