//! The Store conformance suite: every case runs against SQLite and against
//! Postgres (`sqlite::CASE` and `postgres::CASE`), on a fresh database each.

mod common;

use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;

use branchd::storage::{
    ClaimOutcome, Fence, NewSnapshot, NewUser, Role, Store, StoreError, WorkspaceKey, WsSession,
};
use common::TestDb;
use sha2::{Digest, Sha256};

on_both_backends!(
    migrations_are_applied_and_the_clock_is_sane,
    users_are_unique_and_found_by_name_and_id,
    tokens_expire_by_the_database_clock_and_can_be_revoked,
    creating_a_project_makes_the_owner_and_the_first_snapshot,
    members_can_change_but_a_project_always_keeps_an_owner,
    deleting_a_project_removes_everything_under_it,
    snapshots_are_versioned_never_overwritten_and_trimmed_to_keep,
    a_branch_is_created_once_even_when_two_try_at_once,
    a_snapshot_trims_the_journal_entries_it_covers,
    a_claim_is_held_while_the_owner_heartbeats_and_taken_over_after_its_lease,
    released_claims_keep_their_epoch_so_epochs_never_repeat,
    a_failure_holds_for_every_node_until_its_window_ends_or_it_is_cleared,
    a_stale_fence_cannot_append_to_the_journal_or_store_a_snapshot,
    concurrent_claims_of_one_key_leave_exactly_one_owner,
    session_rows_are_recorded_once_and_removed_once,
    concurrent_attach_and_detach_leave_exactly_the_live_rows,
    wiping_a_server_tag_removes_its_sessions_and_claims_only,
    nodes_are_live_while_their_heartbeat_is_fresh,
    concurrent_appends_of_many_workspaces_all_land_and_a_stale_fence_alone_is_refused,
    the_heartbeat_keeps_its_pace_while_large_journal_records_are_written,
);

async fn user(store: &dyn Store, name: &str) -> i64 {
    store
        .create_user(NewUser {
            username: name.into(),
            display_name: name.into(),
            email: format!("{name}@example.com"),
            password_hash: "hash".into(),
            is_admin: false,
        })
        .await
        .expect("create user")
        .id
}

fn snapshot(data: &[u8], journal_seq: i64, keep: u32) -> NewSnapshot {
    NewSnapshot {
        data: data.to_vec(),
        author: Some("tester".into()),
        journal_seq,
        keep,
    }
}

/// A user and a project with a first snapshot on `main`; returns the key of `main`.
async fn project(store: &dyn Store) -> (i64, WorkspaceKey) {
    let owner = user(store, "owner").await;
    let (project, _) = store
        .create_project("Demo", owner, "main", snapshot(b"v1", 0, 10))
        .await
        .expect("create project");
    (owner, WorkspaceKey::new(project.id, "main"))
}

fn session(id: &str, key: &WorkspaceKey, user_id: i64, tag: &str) -> WsSession {
    WsSession {
        id: id.into(),
        user_id,
        key: key.clone(),
        server_tag: tag.into(),
        connected_at: 0,
    }
}

fn owned(outcome: ClaimOutcome) -> branchd::storage::Claim {
    match outcome {
        ClaimOutcome::Owned(claim) => claim,
        other => panic!("expected to own the claim, got {other:?}"),
    }
}

fn fence(tag: &str, epoch: i64) -> Fence {
    Fence {
        server_tag: tag.into(),
        epoch,
    }
}

async fn migrations_are_applied_and_the_clock_is_sane(db: TestDb) {
    let store = db.open().await;
    assert!(store.ready().await.expect("ready"));
    let now = store.now_ms().await.expect("now");
    let local = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("clock")
        .as_millis() as i64;
    assert!(
        (now - local).abs() < 60_000,
        "db clock {now} vs local {local}"
    );
    // Opening again (a second node, a restart) applies nothing new and works.
    let again = db.open().await;
    assert!(again.ready().await.expect("ready"));
}

async fn users_are_unique_and_found_by_name_and_id(db: TestDb) {
    let store = db.open().await;
    let id = user(store.as_ref(), "ada").await;
    let err = store
        .create_user(NewUser {
            username: "ada".into(),
            display_name: "Other".into(),
            email: "x@example.com".into(),
            password_hash: "h".into(),
            is_admin: true,
        })
        .await
        .expect_err("duplicate username");
    assert!(
        matches!(err, StoreError::Conflict(ref m) if m.contains("ada")),
        "{err}"
    );

    let (found, hash) = store
        .user_by_name("ada")
        .await
        .expect("query")
        .expect("found");
    assert_eq!(found.id, id);
    assert_eq!(hash, "hash");
    assert!(!found.is_admin);
    assert_eq!(store.user_by_id(id).await.expect("query"), Some(found));
    assert_eq!(store.user_by_name("nobody").await.expect("query"), None);
    assert_eq!(store.user_count().await.expect("count"), 1);

    store
        .create_auth_session("t", id, 60_000)
        .await
        .expect("token");
    store
        .set_password(id, "new-hash")
        .await
        .expect("set password");
    assert_eq!(
        store.auth_session("t").await.expect("query"),
        None,
        "a new password revokes the user's tokens"
    );
    let (_, hash) = store
        .user_by_name("ada")
        .await
        .expect("query")
        .expect("found");
    assert_eq!(hash, "new-hash");
    assert!(matches!(
        store.set_password(id + 100, "x").await,
        Err(StoreError::NotFound(_))
    ));
    let names: Vec<String> = store
        .list_users()
        .await
        .expect("list")
        .into_iter()
        .map(|u| u.username)
        .collect();
    assert_eq!(names, ["ada"]);
}

async fn tokens_expire_by_the_database_clock_and_can_be_revoked(db: TestDb) {
    let store = db.open().await;
    let id = user(store.as_ref(), "ada").await;
    let before = store.now_ms().await.expect("now");
    let expires = store
        .create_auth_session("live", id, 60_000)
        .await
        .expect("create");
    assert!(expires >= before + 60_000 && expires < before + 120_000);
    let live = store
        .auth_session("live")
        .await
        .expect("query")
        .expect("found");
    assert_eq!(live.user.username, "ada");
    assert!(!live.expired);

    store
        .create_auth_session("stale", id, -1)
        .await
        .expect("create expired");
    let stale = store
        .auth_session("stale")
        .await
        .expect("query")
        .expect("found");
    assert!(stale.expired);
    assert_eq!(store.auth_session("unknown").await.expect("query"), None);

    assert_eq!(store.purge_expired_auth_sessions().await.expect("purge"), 1);
    assert_eq!(store.auth_session("stale").await.expect("query"), None);
    assert!(store.delete_auth_session("live").await.expect("delete"));
    assert!(
        !store
            .delete_auth_session("live")
            .await
            .expect("delete again")
    );
    assert_eq!(store.auth_session("live").await.expect("query"), None);
}

async fn creating_a_project_makes_the_owner_and_the_first_snapshot(db: TestDb) {
    let store = db.open().await;
    let owner = user(store.as_ref(), "owner").await;
    let other = user(store.as_ref(), "other").await;
    let (project, meta) = store
        .create_project("Demo", owner, "main", snapshot(b"first", 0, 10))
        .await
        .expect("create");
    assert_eq!(meta.version, 1);
    assert_eq!(meta.key, WorkspaceKey::new(project.id, "main"));
    assert_eq!(meta.sha256, hex::encode(Sha256::digest(b"first")));
    assert_eq!(meta.size, 5);

    assert_eq!(
        store.project(project.id).await.expect("get"),
        Some(project.clone())
    );
    assert_eq!(
        store.member_role(project.id, owner).await.expect("role"),
        Some(Role::Owner)
    );
    assert_eq!(
        store.member_role(project.id, other).await.expect("role"),
        None
    );
    assert_eq!(
        store.branches(project.id).await.expect("branches"),
        ["main"]
    );
    let mine = store.projects_of_user(owner).await.expect("mine");
    assert_eq!(mine, vec![(project.clone(), Role::Owner)]);
    assert!(
        store
            .projects_of_user(other)
            .await
            .expect("theirs")
            .is_empty()
    );
    assert_eq!(
        store.all_projects().await.expect("all"),
        vec![project.clone()]
    );
    let latest = store
        .latest_snapshot(&meta.key)
        .await
        .expect("latest")
        .expect("exists");
    assert_eq!(latest.data, b"first");
    assert_eq!(latest.meta, meta);
}

async fn members_can_change_but_a_project_always_keeps_an_owner(db: TestDb) {
    let store = db.open().await;
    let (owner, key) = project(store.as_ref()).await;
    let id = key.project_id;
    let viewer = user(store.as_ref(), "viewer").await;

    store
        .set_member(id, viewer, Role::Viewer)
        .await
        .expect("add");
    assert_eq!(
        store.member_role(id, viewer).await.expect("role"),
        Some(Role::Viewer)
    );
    store
        .set_member(id, viewer, Role::Editor)
        .await
        .expect("promote");
    assert_eq!(
        store.member_role(id, viewer).await.expect("role"),
        Some(Role::Editor)
    );
    let names: Vec<(String, Role)> = store
        .members(id)
        .await
        .expect("members")
        .into_iter()
        .map(|m| (m.username, m.role))
        .collect();
    assert_eq!(
        names,
        [
            ("owner".to_string(), Role::Owner),
            ("viewer".to_string(), Role::Editor)
        ]
    );

    let demote = store.set_member(id, owner, Role::Viewer).await;
    assert!(matches!(demote, Err(StoreError::Conflict(_))), "{demote:?}");
    assert_eq!(
        store.member_role(id, owner).await.expect("role"),
        Some(Role::Owner)
    );
    let remove = store.remove_member(id, owner).await;
    assert!(matches!(remove, Err(StoreError::Conflict(_))), "{remove:?}");
    assert_eq!(
        store.member_role(id, owner).await.expect("role"),
        Some(Role::Owner)
    );

    // With a second owner, the first may step down.
    store
        .set_member(id, viewer, Role::Owner)
        .await
        .expect("second owner");
    assert!(store.remove_member(id, owner).await.expect("remove"));
    assert!(!store.remove_member(id, owner).await.expect("remove again"));
    assert_eq!(store.member_role(id, owner).await.expect("role"), None);
}

async fn deleting_a_project_removes_everything_under_it(db: TestDb) {
    let store = db.open().await;
    let (owner, key) = project(store.as_ref()).await;
    owned(store.claim(&key, "n1", 5_000).await.expect("claim"));
    store.register_node("n1", None, None).await.expect("node");
    store
        .attach_session(&session("s1", &key, owner, "n1"))
        .await
        .expect("attach");
    store
        .append_journal(&key, &fence("n1", 1), b"op")
        .await
        .expect("journal");

    assert!(store.delete_project(key.project_id).await.expect("delete"));
    assert!(
        !store
            .delete_project(key.project_id)
            .await
            .expect("delete again")
    );
    assert_eq!(store.project(key.project_id).await.expect("get"), None);
    assert!(
        store
            .branches(key.project_id)
            .await
            .expect("branches")
            .is_empty()
    );
    assert!(
        store
            .latest_snapshot(&key)
            .await
            .expect("snapshot")
            .is_none()
    );
    assert!(
        store
            .journal_after(&key, 0)
            .await
            .expect("journal")
            .is_empty()
    );
    assert!(store.sessions_of(&key).await.expect("sessions").is_empty());
    assert_eq!(store.claim_of(&key).await.expect("claim"), None);
    assert!(
        store
            .projects_of_user(owner)
            .await
            .expect("mine")
            .is_empty()
    );
}

async fn snapshots_are_versioned_never_overwritten_and_trimmed_to_keep(db: TestDb) {
    let store = db.open().await;
    let (_, key) = project(store.as_ref()).await;
    // A realistic blob: 5 MB of incompressible bytes survives byte for byte.
    let mut big = vec![0u8; 5 << 20];
    let mut x: u64 = 0x9E37_79B9_7F4A_7C15;
    for byte in big.iter_mut() {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        *byte = x as u8;
    }
    let v2 = store
        .put_snapshot(&key, snapshot(&big, 0, 3), None)
        .await
        .expect("v2");
    assert_eq!(v2.version, 2);
    assert_eq!(v2.size, big.len() as i64);
    let read = store
        .snapshot(&key, 2)
        .await
        .expect("read")
        .expect("v2 exists");
    assert!(read.data == big, "5 MB blob must read back unchanged");
    assert_eq!(read.meta.sha256, hex::encode(Sha256::digest(&big)));
    // Older versions stay readable.
    let v1 = store
        .snapshot(&key, 1)
        .await
        .expect("read")
        .expect("v1 kept");
    assert_eq!(v1.data, b"v1");

    for n in 3..=5 {
        let meta = store
            .put_snapshot(&key, snapshot(format!("v{n}").as_bytes(), 0, 3), None)
            .await
            .expect("put");
        assert_eq!(meta.version, n);
    }
    let versions: Vec<i64> = store
        .list_snapshots(&key)
        .await
        .expect("list")
        .iter()
        .map(|m| m.version)
        .collect();
    assert_eq!(versions, [5, 4, 3], "keep=3 keeps the newest three");
    assert!(store.snapshot(&key, 1).await.expect("read").is_none());
    let latest = store
        .latest_snapshot(&key)
        .await
        .expect("latest")
        .expect("some");
    assert_eq!(
        (latest.meta.version, latest.data.as_slice()),
        (5, &b"v5"[..])
    );

    // A new branch starts at version 1 and shows up in the branch list.
    let feature = WorkspaceKey::new(key.project_id, "feature/x");
    let first = store
        .put_snapshot(&feature, snapshot(b"f1", 0, 3), None)
        .await
        .expect("branch");
    assert_eq!(first.version, 1);
    assert_eq!(
        store.branches(key.project_id).await.expect("branches"),
        ["feature/x", "main"]
    );
}

async fn a_snapshot_trims_the_journal_entries_it_covers(db: TestDb) {
    let store = db.open().await;
    let (_, key) = project(store.as_ref()).await;
    store.register_node("n1", None, None).await.expect("node");
    let epoch = owned(store.claim(&key, "n1", 5_000).await.expect("claim")).epoch;
    let f = fence("n1", epoch);
    let mut seqs = Vec::new();
    for op in [b"a", b"b", b"c", b"d"] {
        seqs.push(store.append_journal(&key, &f, op).await.expect("append"));
    }
    assert!(
        seqs.windows(2).all(|w| w[0] < w[1]),
        "sequence increases: {seqs:?}"
    );
    let entries = store.journal_after(&key, 0).await.expect("journal");
    let ops: Vec<&[u8]> = entries.iter().map(|e| e.op.as_slice()).collect();
    assert_eq!(ops, [b"a", b"b", b"c", b"d"]);
    assert!(entries.iter().all(|e| e.epoch == epoch));

    // A snapshot that contains the first two entries trims exactly those.
    let meta = store
        .put_snapshot(&key, snapshot(b"with a,b", seqs[1], 10), Some(&f))
        .await
        .expect("save");
    assert_eq!(meta.journal_seq, seqs[1]);
    let rest: Vec<i64> = store
        .journal_after(&key, 0)
        .await
        .expect("journal")
        .iter()
        .map(|e| e.seq)
        .collect();
    assert_eq!(rest, &seqs[2..]);
    let after: Vec<i64> = store
        .journal_after(&key, seqs[2])
        .await
        .expect("journal")
        .iter()
        .map(|e| e.seq)
        .collect();
    assert_eq!(after, &seqs[3..]);

    // A save that finishes late and covers less of the journal than the
    // newest snapshot is refused: it would bring back trimmed records' gap.
    let late = store
        .put_snapshot(&key, snapshot(b"with a only", seqs[0], 10), Some(&f))
        .await;
    assert!(matches!(late, Err(StoreError::Conflict(_))), "{late:?}");
    let latest = store
        .latest_snapshot(&key)
        .await
        .expect("read")
        .expect("one");
    assert_eq!(latest.data, b"with a,b");
}

async fn a_claim_is_held_while_the_owner_heartbeats_and_taken_over_after_its_lease(db: TestDb) {
    let store = db.open().await;
    let (_, key) = project(store.as_ref()).await;
    store
        .register_node("a", Some("a:1"), None)
        .await
        .expect("a");
    store
        .register_node("b", Some("b:1"), None)
        .await
        .expect("b");

    let first = owned(store.claim(&key, "a", 60_000).await.expect("claim"));
    assert_eq!((first.server_tag.as_deref(), first.epoch), (Some("a"), 1));
    // Claiming again as the owner changes nothing.
    let again = owned(store.claim(&key, "a", 60_000).await.expect("claim"));
    assert_eq!(again.epoch, 1);
    // Another node sees it held while a's heartbeat is fresh.
    match store.claim(&key, "b", 60_000).await.expect("claim") {
        ClaimOutcome::HeldBy(claim) => assert_eq!(claim.server_tag.as_deref(), Some("a")),
        other => panic!("b must not take a live claim: {other:?}"),
    }
    // Once a's heartbeat is older than the lease, b takes over with a new epoch.
    tokio::time::sleep(Duration::from_millis(60)).await;
    store.heartbeat("b").await.expect("b heartbeat");
    let taken = owned(store.claim(&key, "b", 30).await.expect("claim"));
    assert_eq!((taken.server_tag.as_deref(), taken.epoch), (Some("b"), 2));
    assert_eq!(store.claims_of_node("b").await.expect("b's").len(), 1);
    assert!(store.claims_of_node("a").await.expect("a's").is_empty());
}

async fn released_claims_keep_their_epoch_so_epochs_never_repeat(db: TestDb) {
    let store = db.open().await;
    let (_, key) = project(store.as_ref()).await;
    store.register_node("a", None, None).await.expect("a");
    let claim = owned(store.claim(&key, "a", 5_000).await.expect("claim"));
    assert!(
        !store
            .release_claim(&key, &fence("a", claim.epoch + 1))
            .await
            .expect("stale")
    );
    assert!(
        !store
            .release_claim(&key, &fence("b", claim.epoch))
            .await
            .expect("not b's")
    );
    assert!(
        store
            .release_claim(&key, &fence("a", claim.epoch))
            .await
            .expect("release")
    );
    let released = store.claim_of(&key).await.expect("row").expect("row stays");
    assert_eq!((released.server_tag, released.epoch), (None, claim.epoch));
    let next = owned(store.claim(&key, "a", 5_000).await.expect("reclaim"));
    assert_eq!(next.epoch, claim.epoch + 1);
}

async fn a_failure_holds_for_every_node_until_its_window_ends_or_it_is_cleared(db: TestDb) {
    let store = db.open().await;
    let (_, key) = project(store.as_ref()).await;
    assert_eq!(store.failure_of(&key).await.expect("read"), None);
    store
        .mark_failed(&key, "it crashed too often", "node-a", 60_000)
        .await
        .expect("mark");
    let failure = store.failure_of(&key).await.expect("read").expect("failed");
    assert_eq!(
        (failure.reason.as_str(), failure.server_tag.as_str()),
        ("it crashed too often", "node-a")
    );
    assert!(
        failure.left_ms > 0 && failure.left_ms <= 60_000,
        "{failure:?}"
    );
    assert_eq!(failure.until_at - failure.failed_at, 60_000);
    // The list says the same (its left_ms is read a moment later).
    let listed: Vec<_> = store
        .failures()
        .await
        .expect("list")
        .into_iter()
        .map(|f| (f.key, f.reason, f.server_tag, f.until_at))
        .collect();
    assert_eq!(
        listed,
        vec![(
            failure.key.clone(),
            failure.reason.clone(),
            failure.server_tag.clone(),
            failure.until_at
        )]
    );

    // Failing again (another node, later) replaces the row.
    store
        .mark_failed(&key, "restarting failed", "node-b", 30_000)
        .await
        .expect("mark again");
    let again = store.failure_of(&key).await.expect("read").expect("failed");
    assert_eq!(again.server_tag, "node-b");
    assert!(again.left_ms <= 30_000, "{again:?}");

    assert!(store.clear_failure(&key).await.expect("clear"));
    assert!(!store.clear_failure(&key).await.expect("nothing left"));
    assert_eq!(store.failure_of(&key).await.expect("read"), None);

    // A window that has ended means nothing, and clearing it is no reset.
    store
        .mark_failed(&key, "long ago", "node-a", -1)
        .await
        .expect("mark expired");
    assert_eq!(store.failure_of(&key).await.expect("read"), None);
    assert!(store.failures().await.expect("list").is_empty());
    assert!(!store.clear_failure(&key).await.expect("expired"));
}

async fn a_stale_fence_cannot_append_to_the_journal_or_store_a_snapshot(db: TestDb) {
    let store = db.open().await;
    let (_, key) = project(store.as_ref()).await;
    store.register_node("a", None, None).await.expect("a");
    store.register_node("b", None, None).await.expect("b");
    let old = owned(store.claim(&key, "a", 5_000).await.expect("claim"));
    let old_fence = fence("a", old.epoch);
    store
        .append_journal(&key, &old_fence, b"before")
        .await
        .expect("owner writes");

    tokio::time::sleep(Duration::from_millis(60)).await;
    store.heartbeat("b").await.expect("b heartbeat");
    let new = owned(store.claim(&key, "b", 30).await.expect("takeover"));

    let refused = store.append_journal(&key, &old_fence, b"after").await;
    assert!(
        matches!(refused, Err(StoreError::Fenced { .. })),
        "{refused:?}"
    );
    let refused = store
        .put_snapshot(&key, snapshot(b"stale", 0, 10), Some(&old_fence))
        .await;
    assert!(
        matches!(refused, Err(StoreError::Fenced { .. })),
        "{refused:?}"
    );

    let ops: Vec<Vec<u8>> = store
        .journal_after(&key, 0)
        .await
        .expect("journal")
        .into_iter()
        .map(|e| e.op)
        .collect();
    assert_eq!(ops, [b"before".to_vec()], "the fenced write never lands");
    assert_eq!(store.list_snapshots(&key).await.expect("list").len(), 1);
    // The new owner writes fine.
    store
        .append_journal(&key, &fence("b", new.epoch), b"new owner")
        .await
        .expect("new owner writes");
}

async fn concurrent_claims_of_one_key_leave_exactly_one_owner(db: TestDb) {
    let store = db.open().await;
    let (_, key) = project(store.as_ref()).await;
    let tags: Vec<String> = (0..20).map(|i| format!("node-{i}")).collect();
    for tag in &tags {
        store.register_node(tag, None, None).await.expect("node");
    }
    let attempts = tags.iter().map(|tag| {
        let store: Arc<dyn Store> = store.clone();
        let key = key.clone();
        let tag = tag.clone();
        tokio::spawn(async move { store.claim(&key, &tag, 60_000).await })
    });
    let mut owners = HashSet::new();
    for attempt in attempts {
        match attempt.await.expect("task").expect("claim") {
            ClaimOutcome::Owned(claim) => {
                owners.insert(claim.server_tag.clone().expect("owner"));
                assert_eq!(claim.epoch, 1);
            }
            ClaimOutcome::HeldBy(claim) => assert_eq!(claim.epoch, 1),
        }
    }
    assert_eq!(owners.len(), 1, "exactly one owner: {owners:?}");
    let row = store.claim_of(&key).await.expect("row").expect("exists");
    assert_eq!(row.server_tag.as_ref(), owners.iter().next());
}

async fn session_rows_are_recorded_once_and_removed_once(db: TestDb) {
    let store = db.open().await;
    let (owner, key) = project(store.as_ref()).await;
    store.register_node("n1", None, None).await.expect("node");
    owned(store.claim(&key, "n1", 5_000).await.expect("claim"));

    for id in ["s1", "s2"] {
        store
            .attach_session(&session(id, &key, owner, "n1"))
            .await
            .expect("attach");
    }
    let duplicate = store
        .attach_session(&session("s2", &key, owner, "n1"))
        .await;
    assert!(
        matches!(duplicate, Err(StoreError::Conflict(_))),
        "{duplicate:?}"
    );
    let rows = store.sessions_of(&key).await.expect("sessions");
    assert_eq!(
        rows.iter().map(|s| s.id.as_str()).collect::<Vec<_>>(),
        ["s1", "s2"]
    );
    assert!(
        rows.iter()
            .all(|s| s.server_tag == "n1" && s.user_id == owner),
        "{rows:?}"
    );

    assert_eq!(
        store.detach_session("s1").await.expect("detach"),
        Some(key.clone())
    );
    assert_eq!(
        store.detach_session("s1").await.expect("detach again"),
        None
    );
    assert_eq!(store.sessions_of(&key).await.expect("sessions").len(), 1);
    assert_eq!(
        store.detach_session("s2").await.expect("detach"),
        Some(key.clone())
    );
    assert!(store.sessions_of(&key).await.expect("sessions").is_empty());
}

async fn concurrent_attach_and_detach_leave_exactly_the_live_rows(db: TestDb) {
    let store = db.open().await;
    let (owner, key) = project(store.as_ref()).await;
    store.register_node("n1", None, None).await.expect("node");
    owned(store.claim(&key, "n1", 60_000).await.expect("claim"));
    let attach = (0..30).map(|i| {
        let store: Arc<dyn Store> = store.clone();
        let s = session(&format!("s{i}"), &key, owner, "n1");
        tokio::spawn(async move { store.attach_session(&s).await })
    });
    for task in attach.collect::<Vec<_>>() {
        task.await.expect("task").expect("attach");
    }
    let detach = (0..30).step_by(2).map(|i| {
        let store: Arc<dyn Store> = store.clone();
        tokio::spawn(async move { store.detach_session(&format!("s{i}")).await })
    });
    for task in detach.collect::<Vec<_>>() {
        task.await.expect("task").expect("detach");
    }
    let mut live: Vec<String> = store
        .sessions_of(&key)
        .await
        .expect("sessions")
        .into_iter()
        .map(|s| s.id)
        .collect();
    live.sort();
    let mut odd: Vec<String> = (1..30).step_by(2).map(|i| format!("s{i}")).collect();
    odd.sort();
    assert_eq!(
        live, odd,
        "the rows are exactly the sessions still attached"
    );
}

async fn wiping_a_server_tag_removes_its_sessions_and_claims_only(db: TestDb) {
    let store = db.open().await;
    let (owner, key) = project(store.as_ref()).await;
    let other_key = WorkspaceKey::new(key.project_id, "other");
    store.register_node("dead", None, None).await.expect("node");
    store
        .register_node("alive", None, None)
        .await
        .expect("node");
    owned(store.claim(&key, "dead", 5_000).await.expect("claim"));
    owned(
        store
            .claim(&other_key, "alive", 5_000)
            .await
            .expect("claim"),
    );
    for (id, tag) in [("d1", "dead"), ("d2", "dead"), ("a1", "alive")] {
        store
            .attach_session(&session(id, &key, owner, tag))
            .await
            .expect("attach");
    }
    store
        .attach_session(&session("a2", &other_key, owner, "alive"))
        .await
        .expect("attach");

    let report = store.wipe_server_tag("dead").await.expect("wipe");
    assert_eq!((report.sessions, report.claims), (2, 1));
    let sessions: Vec<String> = store
        .sessions_of(&key)
        .await
        .expect("sessions")
        .into_iter()
        .map(|s| s.id)
        .collect();
    assert_eq!(sessions, ["a1"]);
    let released = store.claim_of(&key).await.expect("row").expect("exists");
    assert_eq!(released.server_tag, None);
    let untouched = store
        .claim_of(&other_key)
        .await
        .expect("row")
        .expect("exists");
    assert_eq!(untouched.server_tag.as_deref(), Some("alive"));
    assert_eq!(
        store.sessions_of(&other_key).await.expect("sessions").len(),
        1
    );
    assert_eq!(
        store.wipe_server_tag("dead").await.expect("again"),
        Default::default()
    );
}

async fn nodes_are_live_while_their_heartbeat_is_fresh(db: TestDb) {
    let store = db.open().await;
    let node = store
        .register_node("n1", Some("10.0.0.1:4000"), Some("10.0.0.1:8080"))
        .await
        .expect("register");
    assert_eq!(node.cluster_addr.as_deref(), Some("10.0.0.1:4000"));
    assert!(node.heartbeat_at >= node.started_at);
    assert!(store.heartbeat("n1").await.expect("beat"));
    assert!(!store.heartbeat("ghost").await.expect("unknown node"));
    let live: Vec<String> = store
        .live_nodes(60_000)
        .await
        .expect("live")
        .into_iter()
        .map(|n| n.server_tag)
        .collect();
    assert_eq!(live, ["n1"]);
    tokio::time::sleep(Duration::from_millis(60)).await;
    assert!(store.live_nodes(30).await.expect("live").is_empty());
    assert!(store.remove_node("n1").await.expect("remove"));
    assert!(store.live_nodes(60_000).await.expect("live").is_empty());
}

async fn a_branch_is_created_once_even_when_two_try_at_once(db: TestDb) {
    let store = db.open().await;
    let (_, key) = project(store.as_ref()).await;
    let feature = WorkspaceKey::new(key.project_id, "feature");
    let attempts: Vec<_> = (0..8)
        .map(|i| {
            let store: Arc<dyn Store> = store.clone();
            let feature = feature.clone();
            tokio::spawn(async move {
                store
                    .create_branch(&feature, snapshot(format!("try {i}").as_bytes(), 0, 10))
                    .await
            })
        })
        .collect();
    let mut created = 0;
    for attempt in attempts {
        match attempt.await.expect("task") {
            Ok(meta) => {
                created += 1;
                assert_eq!(meta.version, 1);
            }
            Err(StoreError::Conflict(message)) => assert!(message.contains("feature"), "{message}"),
            Err(other) => panic!("unexpected error {other}"),
        }
    }
    assert_eq!(created, 1, "exactly one creation wins");
    assert_eq!(store.list_snapshots(&feature).await.expect("list").len(), 1);
    // An existing branch, even one whose version 1 was trimmed, is refused.
    let existing = store.create_branch(&key, snapshot(b"again", 0, 10)).await;
    assert!(
        matches!(existing, Err(StoreError::Conflict(_))),
        "{existing:?}"
    );
    for _ in 0..3 {
        store
            .put_snapshot(&key, snapshot(b"next", 0, 1), None)
            .await
            .expect("put");
    }
    let trimmed = store.create_branch(&key, snapshot(b"again", 0, 10)).await;
    assert!(
        matches!(trimmed, Err(StoreError::Conflict(_))),
        "{trimmed:?}"
    );
}

async fn concurrent_appends_of_many_workspaces_all_land_and_a_stale_fence_alone_is_refused(
    db: TestDb,
) {
    let store = db.open().await;
    let (_, first) = project(store.as_ref()).await;
    store.register_node("n1", None, None).await.expect("node");
    // Five workspaces owned by n1, and one stale fence on the first.
    let mut keys = vec![first.clone()];
    for b in 1..5 {
        let key = WorkspaceKey::new(first.project_id, format!("b{b}"));
        store
            .create_branch(&key, snapshot(b"b", 0, 10))
            .await
            .expect("branch");
        keys.push(key);
    }
    let mut fences = Vec::new();
    for key in &keys {
        let epoch = owned(store.claim(key, "n1", 60_000).await.expect("claim")).epoch;
        fences.push(fence("n1", epoch));
    }
    let stale = fence("n1", fences[0].epoch - 1);
    // 20 appends per workspace at once, plus 5 under the stale fence: they
    // queue up behind each other and are committed in shared transactions.
    let mut tasks = Vec::new();
    for round in 0..20 {
        for (key, f) in keys.iter().zip(&fences) {
            let (store, key, f) = (store.clone(), key.clone(), f.clone());
            tasks.push(tokio::spawn(async move {
                let op = format!("{key} {round}").into_bytes();
                (
                    key.clone(),
                    store.append_journal(&key, &f, &op).await.map(|_| op),
                )
            }));
        }
    }
    let mut refused = Vec::new();
    for _ in 0..5 {
        let (store, key, f) = (store.clone(), keys[0].clone(), stale.clone());
        refused.push(tokio::spawn(async move {
            store.append_journal(&key, &f, b"stale").await
        }));
    }
    let mut landed: std::collections::HashMap<WorkspaceKey, Vec<Vec<u8>>> = Default::default();
    for task in tasks {
        let (key, op) = task.await.expect("task");
        landed
            .entry(key)
            .or_default()
            .push(op.expect("a current fence lands"));
    }
    for task in refused {
        let result = task.await.expect("task");
        assert!(
            matches!(result, Err(StoreError::Fenced { .. })),
            "{result:?}"
        );
    }
    for key in &keys {
        let mut stored: Vec<Vec<u8>> = store
            .journal_after(key, 0)
            .await
            .expect("journal")
            .into_iter()
            .map(|e| e.op)
            .collect();
        let mut expected = landed.remove(key).unwrap_or_default();
        stored.sort();
        expected.sort();
        assert_eq!(
            stored, expected,
            "every acknowledged record of {key}, nothing else"
        );
    }
}

/// Issue 17, item 13: during 40 back-to-back 8 MiB writes a node judged
/// itself cut off from the database and refused a write, because its
/// heartbeat waited behind the journal for seconds. A heartbeat must get
/// its turn within a transaction or so, however large the writes.
async fn the_heartbeat_keeps_its_pace_while_large_journal_records_are_written(db: TestDb) {
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::time::Instant;

    let store = db.open().await;
    let (_, key) = project(store.as_ref()).await;
    store.register_node("n1", None, None).await.expect("node");
    let f = fence(
        "n1",
        owned(store.claim(&key, "n1", 60_000).await.expect("claim")).epoch,
    );
    // 40 records of 8 MiB (the largest file a client may write), from four
    // writers back to back, so the journal always has one waiting.
    let record = Arc::new(vec![0x5a_u8; 8 << 20]);
    let mut writers = Vec::new();
    for _ in 0..4 {
        let (store, key, f, record) = (store.clone(), key.clone(), f.clone(), record.clone());
        writers.push(tokio::spawn(async move {
            for _ in 0..10 {
                store
                    .append_journal(&key, &f, &record)
                    .await
                    .expect("a large append lands");
            }
        }));
    }
    let writing = Arc::new(AtomicBool::new(true));
    let beats = tokio::spawn({
        let (store, writing) = (store.clone(), writing.clone());
        async move {
            let mut slowest = Duration::ZERO;
            let mut count = 0;
            while writing.load(Ordering::Relaxed) {
                let start = Instant::now();
                assert!(store.heartbeat("n1").await.expect("heartbeat"));
                slowest = slowest.max(start.elapsed());
                count += 1;
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
            (slowest, count)
        }
    });
    for writer in writers {
        writer.await.expect("writer");
    }
    writing.store(false, Ordering::Relaxed);
    let (slowest, count) = beats.await.expect("heartbeat task");
    assert!(
        count >= 3,
        "the writes were over too soon to judge ({count} heartbeats)"
    );
    // With the default settings a node stops writing 2.5 s after its last
    // renewal and renews every second: a renewal must take well under 1.5 s.
    assert!(
        slowest < Duration::from_millis(1000),
        "a heartbeat took {slowest:?} behind the journal's writes ({count} heartbeats)"
    );
}
