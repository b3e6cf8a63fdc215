//! The allocator on a real store (SQLite and Postgres) with real workspace
//! actors: shared actors, reference counts, garbage collection, restarts
//! after a crash, the restart limit, server-tag wipes and drain.
//!
//! Crashes are made with the workspace actor's test-only `Panic` message
//! (the `fault-injection` feature, on for the test suite only).

mod common;

use std::collections::HashSet;
use std::time::Duration;

use branchd::allocator::{Allocator, AllocatorSettings, RegisterError, RestartPolicy};
use branchd::protocol::{ErrorCode, Event, Op, OpError, Reply};
use branchd::shutdown::Shutdown;
use branchd::storage::{NewSnapshot, Role, WorkspaceKey};
use branchd::workspace::{Workspace, WorkspaceMsg, WorkspaceSettings};
use common::{Setup, TestDb, eventually, next_event, session};
use tokio::sync::mpsc;

on_both_backends!(
    two_sessions_share_one_actor_and_the_count_is_two,
    an_idle_workspace_is_saved_and_collected_after_the_grace_period,
    a_session_back_within_the_grace_period_finds_the_same_actor,
    fifty_concurrent_registers_spawn_exactly_one_actor,
    a_crashed_workspace_restarts_with_every_acknowledged_edit_and_its_sessions_keep_working,
    the_restart_limit_marks_the_key_failed_until_an_operator_resets_it,
    a_restarted_node_wipes_the_rows_its_server_tag_left,
    kill_saves_then_stops_a_workspace,
    a_drain_saves_every_dirty_workspace_and_removes_the_nodes_rows,
    a_drain_waits_for_a_collection_already_saving,
);

fn settings(setup: &Setup, tag: &str) -> AllocatorSettings {
    let mut settings = AllocatorSettings::from_config(&setup.config);
    settings.server_tag = tag.into();
    settings.heartbeat_interval = Duration::from_millis(200);
    settings.lease = Duration::from_secs(5);
    settings
}

async fn allocator(setup: &Setup, adjust: impl FnOnce(&mut AllocatorSettings)) -> Allocator {
    let mut settings = settings(setup, "node-a");
    adjust(&mut settings);
    Allocator::start(
        setup.store.clone(),
        WorkspaceSettings::from_config(&setup.config),
        settings,
        &Shutdown::new(),
    )
    .await
    .expect("allocator starts")
}

async fn register(
    allocator: &Allocator,
    key: &WorkspaceKey,
    id: &str,
) -> (Workspace, mpsc::Receiver<Event>) {
    let (events, received) = mpsc::channel(64);
    let registration = allocator
        .register(session(id, Role::Editor), key, events)
        .await
        .expect("register");
    (registration.workspace, received)
}

async fn write(workspace: &Workspace, who: &str, path: &str, content: &[u8]) {
    workspace
        .op(
            &who.to_string(),
            Op::WriteFile {
                path: path.into(),
                content: content.to_vec(),
                base_version: None,
                force: true,
            },
        )
        .await
        .expect("write");
}

/// The key's session rows (every node's sessions, as the store counts
/// them) and the claim's owner.
async fn rows_and_owner(setup: &Setup, key: &WorkspaceKey) -> (usize, Option<String>) {
    let rows = setup.store.sessions_of(key).await.expect("rows").len();
    let claim = setup
        .store
        .claim_of(key)
        .await
        .expect("claim")
        .expect("a claim row");
    (rows, claim.server_tag)
}

async fn two_sessions_share_one_actor_and_the_count_is_two(db: TestDb) {
    let setup = Setup::new(db, |_| {}).await;
    let allocator = allocator(&setup, |_| {}).await;
    let (first, _a) = register(&allocator, &setup.key, "ada").await;
    let (second, _b) = register(&allocator, &setup.key, "bob").await;
    assert_eq!(first.actor().get_id(), second.actor().get_id(), "one actor");
    let got = allocator.get(&setup.key).expect("a local lookup finds it");
    assert_eq!(got.actor().get_id(), first.actor().get_id());

    let (count, owner) = rows_and_owner(&setup, &setup.key).await;
    assert_eq!((count, owner.as_deref()), (2, Some("node-a")));
    let rows = setup.store.sessions_of(&setup.key).await.expect("rows");
    assert!(
        rows.iter().all(|r| r.server_tag == "node-a"),
        "rows carry the server tag"
    );
    let status = allocator.workspaces().await.expect("status");
    assert_eq!(status.len(), 1);
    assert_eq!((status[0].state, status[0].ref_count), ("active", 2));
    assert_eq!(status[0].sessions, ["ada", "bob"]);
}

async fn an_idle_workspace_is_saved_and_collected_after_the_grace_period(db: TestDb) {
    let setup = Setup::new(db, |_| {}).await;
    let allocator = allocator(&setup, |s| {
        s.gc_interval = Duration::from_millis(50);
        s.idle_grace = Duration::from_millis(400);
    })
    .await;
    let (workspace, _events) = register(&allocator, &setup.key, "ada").await;
    write(&workspace, "ada", "unsaved.txt", b"keep me").await;
    let status = allocator.workspaces().await.expect("status");
    assert_eq!(status[0].file_cache_bytes, 7, "the written file is kept");
    allocator.deregister(&"ada".to_string(), &setup.key).await;

    assert_eq!(rows_and_owner(&setup, &setup.key).await.0, 0);
    let status = allocator.workspaces().await.expect("status");
    assert!(status[0].gc_deadline.is_some(), "a GC deadline while idle");
    assert!(status[0].dirty);
    assert_eq!(status[0].file_cache_bytes, 0, "idle, it keeps no contents");

    eventually("the idle workspace is collected", || async {
        allocator.get(&setup.key).is_none()
    })
    .await;
    eventually("its claim is released", || async {
        rows_and_owner(&setup, &setup.key).await.1.is_none()
    })
    .await;
    let latest = setup
        .store
        .latest_snapshot(&setup.key)
        .await
        .expect("read")
        .expect("snapshot");
    assert_eq!(
        latest.meta.version, 2,
        "unsaved work was saved before the stop"
    );
    let dir = tempfile::tempdir().expect("dir");
    branchd::workspace::snapshot::unpack(&latest.data, dir.path(), 1 << 30).expect("unpack");
    assert_eq!(
        std::fs::read(dir.path().join("unsaved.txt")).expect("saved file"),
        b"keep me"
    );
    assert_eq!(allocator.stats().await.expect("stats").collected, 1);
    assert!(allocator.workspaces().await.expect("status").is_empty());
}

async fn a_session_back_within_the_grace_period_finds_the_same_actor(db: TestDb) {
    let setup = Setup::new(db, |_| {}).await;
    let allocator = allocator(&setup, |s| {
        s.gc_interval = Duration::from_millis(50);
        s.idle_grace = Duration::from_secs(30);
    })
    .await;
    let (first, _a) = register(&allocator, &setup.key, "ada").await;
    write(&first, "ada", "draft.txt", b"warm").await;
    allocator.deregister(&"ada".to_string(), &setup.key).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let (again, _b) = register(&allocator, &setup.key, "ada-again").await;
    assert_eq!(
        again.actor().get_id(),
        first.actor().get_id(),
        "the same warm actor"
    );
    let reply = again
        .op(
            &"ada-again".to_string(),
            Op::ReadFile {
                path: "draft.txt".into(),
            },
        )
        .await
        .expect("read");
    assert!(matches!(reply, Reply::File { content, .. } if content == b"warm"));
    assert_eq!(allocator.stats().await.expect("stats").activations, 1);
    assert_eq!(rows_and_owner(&setup, &setup.key).await.0, 1);
}

async fn fifty_concurrent_registers_spawn_exactly_one_actor(db: TestDb) {
    let setup = Setup::new(db, |_| {}).await;
    let allocator = allocator(&setup, |_| {}).await;
    let tasks: Vec<_> = (0..50)
        .map(|i| {
            let allocator = allocator.clone();
            let key = setup.key.clone();
            tokio::spawn(async move {
                let (events, _received) = mpsc::channel(8);
                allocator
                    .register(session(&format!("s{i}"), Role::Viewer), &key, events)
                    .await
                    .map(|r| r.workspace.actor().get_id())
            })
        })
        .collect();
    let mut actors = HashSet::new();
    for task in tasks {
        actors.insert(task.await.expect("task").expect("register"));
    }
    assert_eq!(actors.len(), 1, "every session got the same actor");
    assert_eq!(
        allocator.stats().await.expect("stats").activations,
        1,
        "one spawn"
    );
    assert_eq!(rows_and_owner(&setup, &setup.key).await.0, 50);
}

async fn a_crashed_workspace_restarts_with_every_acknowledged_edit_and_its_sessions_keep_working(
    db: TestDb,
) {
    let setup = Setup::new(db, |_| {}).await;
    let allocator = allocator(&setup, |_| {}).await;
    let (workspace, mut events) = register(&allocator, &setup.key, "ada").await;
    write(&workspace, "ada", "saved.txt", b"saved").await;
    workspace
        .op(&"ada".to_string(), Op::Save)
        .await
        .expect("save");
    write(
        &workspace,
        "ada",
        "unsaved.txt",
        b"acknowledged, not yet saved",
    )
    .await;
    let crashed = workspace.actor().get_id();

    workspace.actor().cast(WorkspaceMsg::Panic).expect("cast");
    let event = next_event(&mut events).await;
    assert!(
        matches!(event, Event::Restarted { ref reason } if reason.contains("nothing acknowledged was lost")),
        "{event:?}"
    );
    let restarted = allocator
        .get(&setup.key)
        .expect("a new actor serves the key");
    assert_ne!(restarted.actor().get_id(), crashed);

    // The session was re-attached: it works without registering again.
    let ada = "ada".to_string();
    let reply = restarted
        .op(
            &ada,
            Op::ReadFile {
                path: "saved.txt".into(),
            },
        )
        .await
        .expect("read after the restart");
    assert!(matches!(reply, Reply::File { content, .. } if content == b"saved"));
    let replayed = restarted
        .op(
            &ada,
            Op::ReadFile {
                path: "unsaved.txt".into(),
            },
        )
        .await
        .expect("an acknowledged write survives the crash (snapshot + journal)");
    assert!(
        matches!(replayed, Reply::File { content, .. } if content == b"acknowledged, not yet saved")
    );
    write(&restarted, "ada", "after.txt", b"still editing").await;
    let stats = allocator.stats().await.expect("stats");
    assert_eq!((stats.restarts, stats.activations), (1, 2));
    assert_eq!(allocator.workspaces().await.expect("status")[0].restarts, 1);
    assert_eq!(
        rows_and_owner(&setup, &setup.key).await.0,
        1,
        "the count did not drift"
    );
}

async fn the_restart_limit_marks_the_key_failed_until_an_operator_resets_it(db: TestDb) {
    let setup = Setup::new(db, |_| {}).await;
    let allocator = allocator(&setup, |s| {
        s.restart = RestartPolicy {
            limit: 1,
            window: Duration::from_secs(60),
        };
    })
    .await;
    let (workspace, mut events) = register(&allocator, &setup.key, "ada").await;
    workspace
        .actor()
        .cast(WorkspaceMsg::Panic)
        .expect("first crash");
    assert!(matches!(
        next_event(&mut events).await,
        Event::Restarted { .. }
    ));
    let restarted = allocator.get(&setup.key).expect("restarted once");
    restarted
        .actor()
        .cast(WorkspaceMsg::Panic)
        .expect("second crash");
    match next_event(&mut events).await {
        Event::Error { code, message, .. } => {
            assert_eq!(code, ErrorCode::Unavailable);
            assert!(message.contains("too often"), "{message}");
        }
        other => panic!("expected an error event, got {other:?}"),
    }
    assert!(allocator.get(&setup.key).is_none());

    let (sink, _r) = mpsc::channel(8);
    let refused = allocator
        .register(session("bob", Role::Editor), &setup.key, sink)
        .await
        .err()
        .expect("a failed key refuses registers");
    assert!(
        matches!(
            &refused,
            RegisterError::Failed {
                retry_in: Some(_),
                ..
            }
        ),
        "{refused:?}"
    );
    let told = OpError::from(refused);
    assert_eq!(told.code, ErrorCode::Unavailable);
    assert!(
        told.message.contains("failed repeatedly"),
        "{}",
        told.message
    );
    let status = allocator.workspaces().await.expect("status");
    assert_eq!(status[0].state, "failed");
    assert!(
        status[0]
            .failure
            .as_deref()
            .is_some_and(|f| f.contains("crashed too often"))
    );

    // Failed for the cluster, not only here: another node refuses it too,
    // so a crash-looping workspace cannot move from node to node.
    eventually("the failure is recorded for the cluster", || async {
        matches!(setup.store.failure_of(&setup.key).await, Ok(Some(_)))
    })
    .await;
    let other = Allocator::start(
        setup.store.clone(),
        WorkspaceSettings::from_config(&setup.config),
        settings(&setup, "node-b"),
        &Shutdown::new(),
    )
    .await
    .expect("node-b starts");
    let (sink, _r) = mpsc::channel(8);
    match other
        .register(session("cy", Role::Editor), &setup.key, sink.clone())
        .await
    {
        Err(RegisterError::Failed {
            reason,
            retry_in: Some(_),
            ..
        }) => assert!(reason.contains("on node node-a"), "{reason}"),
        Err(other) => panic!("node-b should refuse a key failed on node-a, got {other:?}"),
        Ok(_) => panic!("node-b activated a key failed on node-a"),
    }

    // The reset clears it for the cluster (and here).
    assert!(allocator.reset(&setup.key).await.expect("reset"));
    assert_eq!(
        setup.store.failure_of(&setup.key).await.expect("read"),
        None
    );
    match other
        .register(session("cy", Role::Editor), &setup.key, sink)
        .await
    {
        // No longer failed: node-b would activate it but for node-a's claim.
        Err(RegisterError::HeldBy { owner, .. }) => assert_eq!(owner, "node-a"),
        Err(other) => panic!("after the reset node-b should find node-a's claim, got {other:?}"),
        Ok(_) => panic!("node-b activated a key node-a still claims"),
    }
    let (after, _e) = register(&allocator, &setup.key, "bob").await;
    write(&after, "bob", "works.txt", b"again").await;
    assert!(!allocator.reset(&setup.key).await.expect("nothing to reset"));
}

async fn a_restarted_node_wipes_the_rows_its_server_tag_left(db: TestDb) {
    let setup = Setup::new(db, |_| {}).await;
    let crashed = allocator(&setup, |_| {}).await;
    let _a = register(&crashed, &setup.key, "ada").await;
    let _b = register(&crashed, &setup.key, "bob").await;
    let epoch = setup
        .store
        .claim_of(&setup.key)
        .await
        .expect("claim")
        .expect("row")
        .epoch;
    assert_eq!(rows_and_owner(&setup, &setup.key).await.0, 2);
    crashed.abandon(); // no drain: rows stay behind, as after kill -9

    let restarted = allocator(&setup, |_| {}).await;
    let (count, owner) = rows_and_owner(&setup, &setup.key).await;
    assert_eq!(
        (count, owner),
        (0, None),
        "the stale sessions and claim are gone"
    );
    assert!(
        setup
            .store
            .sessions_of(&setup.key)
            .await
            .expect("rows")
            .is_empty()
    );
    let (workspace, _c) = register(&restarted, &setup.key, "carol").await;
    write(&workspace, "carol", "fresh.txt", b"fresh").await;
    let claim = setup
        .store
        .claim_of(&setup.key)
        .await
        .expect("claim")
        .expect("row");
    assert_eq!(
        (rows_and_owner(&setup, &setup.key).await.0, claim.epoch),
        (1, epoch + 1),
        "a new epoch"
    );
}

async fn kill_saves_then_stops_a_workspace(db: TestDb) {
    let setup = Setup::new(db, |_| {}).await;
    let allocator = allocator(&setup, |_| {}).await;
    let (workspace, mut events) = register(&allocator, &setup.key, "ada").await;
    write(&workspace, "ada", "k.txt", b"k").await;
    allocator.kill(&setup.key).await.expect("kill");
    assert!(allocator.get(&setup.key).is_none());
    assert_eq!(
        setup
            .store
            .latest_snapshot(&setup.key)
            .await
            .expect("read")
            .expect("snapshot")
            .meta
            .version,
        2
    );
    eventually("the session's event stream ends", || {
        let closed = events
            .try_recv()
            .is_err_and(|e| e == mpsc::error::TryRecvError::Disconnected);
        async move { closed }
    })
    .await;
    let unknown = WorkspaceKey::new(setup.key.project_id, "nope");
    assert!(allocator.kill(&unknown).await.is_err());
}

async fn a_drain_saves_every_dirty_workspace_and_removes_the_nodes_rows(db: TestDb) {
    let setup = Setup::new(db, |_| {}).await;
    let first = setup
        .store
        .latest_snapshot(&setup.key)
        .await
        .expect("read")
        .expect("snapshot");
    let other = WorkspaceKey::new(setup.key.project_id, "other");
    setup
        .store
        .create_branch(
            &other,
            NewSnapshot {
                data: first.data,
                author: None,
                journal_seq: 0,
                keep: 10,
            },
        )
        .await
        .expect("second branch");
    let allocator = allocator(&setup, |_| {}).await;
    let (main, _a) = register(&allocator, &setup.key, "ada").await;
    let (second, _b) = register(&allocator, &other, "bob").await;
    write(&main, "ada", "m.txt", b"m").await;
    write(&second, "bob", "o.txt", b"o").await;

    let report = allocator.drain().await;
    assert_eq!((report.saved, report.failed), (2, 0));
    for key in [&setup.key, &other] {
        let latest = setup
            .store
            .latest_snapshot(key)
            .await
            .expect("read")
            .expect("snapshot");
        assert_eq!(latest.meta.version, 2, "{key} saved");
        assert!(setup.store.sessions_of(key).await.expect("rows").is_empty());
        assert_eq!(rows_and_owner(&setup, key).await.1, None, "{key} released");
    }
    assert!(
        setup
            .store
            .live_nodes(60_000)
            .await
            .expect("nodes")
            .is_empty(),
        "node row removed"
    );
    let (sink, _r) = mpsc::channel(8);
    let refused = allocator
        .register(session("late", Role::Editor), &setup.key, sink)
        .await
        .err()
        .expect("no registers after a drain");
    assert_eq!(refused, RegisterError::Draining);
    assert_eq!(OpError::from(refused).code, ErrorCode::Unavailable);
}

/// Bytes that do not compress, so that packing them takes a while.
fn noise(len: usize, seed: u64) -> Vec<u8> {
    let mut state = seed | 1;
    (0..len)
        .map(|_| {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state as u8
        })
        .collect()
}

async fn a_drain_waits_for_a_collection_already_saving(db: TestDb) {
    let setup = Setup::new(db, |_| {}).await;
    let allocator = allocator(&setup, |s| {
        s.gc_interval = Duration::from_millis(10);
        s.idle_grace = Duration::ZERO;
    })
    .await;
    let (workspace, _events) = register(&allocator, &setup.key, "ada").await;
    for i in 0..12u64 {
        let path = format!("noise-{i}.bin");
        write(&workspace, "ada", &path, &noise(1 << 20, i + 1)).await;
    }
    allocator.deregister(&"ada".to_string(), &setup.key).await;
    // Catch garbage collection in the middle of its save.
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        let status = allocator.workspaces().await.expect("status");
        match status.first().map(|s| s.state) {
            Some("stopping") => break,
            Some(_) => {}
            None => panic!("the collection finished before the drain began: make its save slower"),
        }
        assert!(
            std::time::Instant::now() < deadline,
            "garbage collection never started: {status:?}"
        );
        tokio::time::sleep(Duration::from_millis(1)).await;
    }

    allocator.drain().await;
    let version = || async {
        setup
            .store
            .latest_snapshot(&setup.key)
            .await
            .expect("read")
            .expect("snapshot")
            .meta
            .version
    };
    assert_eq!(
        version().await,
        2,
        "the collection's save landed before the drain returned"
    );
    assert_eq!(
        rows_and_owner(&setup, &setup.key).await.1,
        None,
        "claim released"
    );
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(version().await, 2, "nothing was written after the drain");
}
