//! The workspace actor on real files, real git and a real store (SQLite and
//! Postgres): activation, versioned writes, events, locks, git and snapshots.

mod common;

use std::path::Path;
use std::process::Command;
use std::sync::Arc;
use std::time::Duration;

use branchd::config::Config;
use branchd::protocol::{EntryKind, ErrorCode, Event, Op, OpError, Reply};
use branchd::storage::{Role, Store, WorkspaceKey};
use branchd::workspace::liveness::ManualClock;
use branchd::workspace::{Liveness, Workspace, WorkspaceArgs, WorkspaceSettings, snapshot};
use common::gated::GatedStore;
use common::{Setup, TestDb, next_event, own, session};
use tokio::sync::mpsc;

on_both_backends!(
    a_workspace_activates_from_its_snapshot_and_sees_its_files,
    a_branch_without_a_snapshot_is_not_found,
    two_sessions_see_each_others_writes_as_events,
    a_stale_write_gets_conflict_and_loses_nothing,
    a_lock_refuses_strangers_writes_serves_their_reads_and_expires,
    the_lock_ends_when_its_holder_detaches_or_unlocks,
    viewers_read_but_cannot_change_anything,
    delete_rename_and_make_dir_change_the_tree_and_are_announced,
    git_status_diff_commit_and_log_match_the_git_cli,
    create_branch_starts_a_new_workspace_at_the_source_head,
    save_then_reactivation_restores_uncommitted_edits_byte_for_byte,
    every_bad_path_is_refused,
    the_working_dir_is_removed_when_the_actor_stops_or_is_killed,
    reads_and_writes_are_served_while_a_save_runs,
    links_on_the_servers_disk_are_never_committed_and_never_stop_a_branch_opening,
    writes_and_commits_keep_the_working_copy_within_its_limit_so_it_always_opens,
);

struct Fixture {
    store: Arc<dyn Store>,
    settings: WorkspaceSettings,
    key: WorkspaceKey,
    _setup: Setup,
}

impl Fixture {
    async fn new(db: TestDb) -> Fixture {
        Self::with(db, |_| {}).await
    }

    async fn with(db: TestDb, adjust: impl FnOnce(&mut Config)) -> Fixture {
        let setup = Setup::new(db, adjust).await;
        Fixture {
            store: setup.store.clone(),
            settings: WorkspaceSettings::from_config(&setup.config),
            key: setup.key.clone(),
            _setup: setup,
        }
    }

    async fn start(&self) -> Workspace {
        self.start_branch(&self.key.branch)
            .await
            .expect("workspace starts")
    }

    async fn start_branch(&self, branch: &str) -> Result<Workspace, OpError> {
        let key = WorkspaceKey::new(self.key.project_id, branch);
        let fence = own(self.store.as_ref(), &key).await;
        let (workspace, _) = Workspace::start(WorkspaceArgs {
            key,
            store: self.store.clone(),
            settings: self.settings.clone(),
            fence,
        })
        .await?;
        Ok(workspace)
    }
}

async fn attach(workspace: &Workspace, id: &str, role: Role) -> mpsc::Receiver<Event> {
    let (events, received) = mpsc::channel(64);
    workspace
        .attach(session(id, role), events)
        .await
        .expect("attach");
    received
}

async fn write(
    workspace: &Workspace,
    who: &str,
    path: &str,
    content: &[u8],
    base: Option<&str>,
) -> Result<String, OpError> {
    match workspace
        .op(
            &who.to_string(),
            Op::WriteFile {
                path: path.into(),
                content: content.to_vec(),
                base_version: base.map(str::to_string),
                force: false,
            },
        )
        .await?
    {
        Reply::Written { version, .. } => Ok(version),
        other => panic!("unexpected reply {other:?}"),
    }
}

async fn read(workspace: &Workspace, who: &str, path: &str) -> Result<(Vec<u8>, String), OpError> {
    match workspace
        .op(&who.to_string(), Op::ReadFile { path: path.into() })
        .await?
    {
        Reply::File {
            content, version, ..
        } => Ok((content, version)),
        other => panic!("unexpected reply {other:?}"),
    }
}

fn git(dir: &Path, args: &[&str]) -> String {
    let output = Command::new("git")
        .arg("-C")
        .arg(dir)
        .args(args)
        .output()
        .expect("git runs");
    assert!(
        output.status.success(),
        "git {args:?}: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8(output.stdout).expect("utf8")
}

/// Saves, then unpacks the latest snapshot into a fresh dir for the git CLI.
async fn saved_copy(
    fixture: &Fixture,
    workspace: &Workspace,
    key: &WorkspaceKey,
) -> tempfile::TempDir {
    workspace
        .op(&"olga".to_string(), Op::Save)
        .await
        .expect("save");
    let latest = fixture
        .store
        .latest_snapshot(key)
        .await
        .expect("read")
        .expect("snapshot");
    let dir = tempfile::tempdir().expect("dir");
    snapshot::unpack(&latest.data, dir.path(), 1 << 30).expect("unpack");
    dir
}

async fn a_workspace_activates_from_its_snapshot_and_sees_its_files(db: TestDb) {
    let fixture = Fixture::new(db).await;
    let workspace = fixture.start().await;
    let (events, _received) = mpsc::channel(8);
    let welcome = workspace
        .attach(session("olga", Role::Owner), events)
        .await
        .expect("attach");
    assert_eq!(welcome.branch, "main");
    assert_eq!(welcome.head.len(), 40);
    let Reply::Tree { entries, .. } = workspace
        .op(&"olga".to_string(), Op::ListTree { path: None })
        .await
        .expect("list")
    else {
        panic!("not a tree")
    };
    assert_eq!(
        entries.len(),
        1,
        "only README.md, .git is hidden: {entries:?}"
    );
    assert_eq!(
        (entries[0].path.as_str(), entries[0].kind, entries[0].size),
        ("README.md", EntryKind::File, 7)
    );
    let (content, version) = read(&workspace, "olga", "README.md").await.expect("read");
    assert_eq!(content, b"# Demo\n");
    assert_eq!(entries[0].version.as_deref(), Some(version.as_str()));
    let info = workspace.info().await.expect("info");
    let blob = git(&info.dir, &["hash-object", "README.md"]);
    assert_eq!(version, blob.trim(), "a version is the git blob id");
    assert_eq!(info.snapshot_version, 1);
    assert!(!info.dirty);
}

async fn a_branch_without_a_snapshot_is_not_found(db: TestDb) {
    let fixture = Fixture::new(db).await;
    let err = fixture
        .start_branch("nope")
        .await
        .err()
        .expect("no such branch");
    assert_eq!(err.code, ErrorCode::NotFound);
    assert!(err.message.contains("nope"), "{}", err.message);
}

async fn two_sessions_see_each_others_writes_as_events(db: TestDb) {
    let fixture = Fixture::new(db).await;
    let workspace = fixture.start().await;
    let mut ada_events = attach(&workspace, "ada", Role::Editor).await;
    let mut bob_events = attach(&workspace, "bob", Role::Editor).await;

    let version = write(&workspace, "ada", "src/main.rhai", b"cube(1, 2, 3)", None)
        .await
        .expect("write");
    match next_event(&mut bob_events).await {
        Event::FileChanged {
            path,
            version: v,
            by,
            ..
        } => {
            assert_eq!(
                (path.as_str(), v.as_deref()),
                ("src/main.rhai", Some(version.as_str()))
            );
            assert_eq!((by.session.as_str(), by.user.as_str()), ("ada", "ada"));
        }
        other => panic!("unexpected event {other:?}"),
    }
    let (content, seen) = read(&workspace, "bob", "src/main.rhai")
        .await
        .expect("bob reads");
    assert_eq!(
        (content.as_slice(), seen.as_str()),
        (&b"cube(1, 2, 3)"[..], version.as_str())
    );

    write(
        &workspace,
        "bob",
        "src/main.rhai",
        b"sphere(4)",
        Some(&version),
    )
    .await
    .expect("bob writes");
    assert!(
        matches!(next_event(&mut ada_events).await, Event::FileChanged { by, .. } if by.session == "bob")
    );
    assert!(
        ada_events.try_recv().is_err(),
        "ada got no echo of her own write"
    );
}

async fn a_stale_write_gets_conflict_and_loses_nothing(db: TestDb) {
    let fixture = Fixture::new(db).await;
    let workspace = fixture.start().await;
    let _a = attach(&workspace, "ada", Role::Editor).await;
    let _b = attach(&workspace, "bob", Role::Editor).await;
    let (_, base) = read(&workspace, "ada", "README.md").await.expect("read");
    let bobs = write(&workspace, "bob", "README.md", b"bob's text\n", Some(&base))
        .await
        .expect("bob first");

    let stale = write(&workspace, "ada", "README.md", b"ada's text\n", Some(&base))
        .await
        .expect_err("stale");
    assert_eq!(stale.code, ErrorCode::Conflict);
    assert_eq!(stale.current_version.as_deref(), Some(bobs.as_str()));
    let (content, _) = read(&workspace, "ada", "README.md").await.expect("read");
    assert_eq!(content, b"bob's text\n", "bob's write is intact");

    let create_existing = write(&workspace, "ada", "README.md", b"x", None)
        .await
        .expect_err("exists");
    assert_eq!(
        (
            create_existing.code,
            create_existing.current_version.as_deref()
        ),
        (ErrorCode::Conflict, Some(bobs.as_str()))
    );
    let deleted_meanwhile = write(&workspace, "ada", "gone.txt", b"x", Some(&base))
        .await
        .expect_err("missing");
    assert_eq!(
        (deleted_meanwhile.code, deleted_meanwhile.current_version),
        (ErrorCode::Conflict, None)
    );

    let forced = workspace
        .op(
            &"ada".to_string(),
            Op::WriteFile {
                path: "README.md".into(),
                content: b"forced\n".to_vec(),
                base_version: None,
                force: true,
            },
        )
        .await
        .expect("force overwrites");
    assert!(matches!(forced, Reply::Written { .. }));
    assert_eq!(
        read(&workspace, "bob", "README.md").await.expect("read").0,
        b"forced\n"
    );
}

async fn a_lock_refuses_strangers_writes_serves_their_reads_and_expires(db: TestDb) {
    let fixture = Fixture::new(db).await;
    let workspace = fixture.start().await;
    let _a = attach(&workspace, "ada", Role::Editor).await;
    let mut bob_events = attach(&workspace, "bob", Role::Editor).await;
    let taken = workspace
        .op(&"ada".to_string(), Op::Lock { ttl_ms: Some(400) })
        .await
        .expect("lock");
    let Reply::LockTaken {
        holder,
        user,
        expires_at,
    } = taken
    else {
        panic!("{taken:?}")
    };
    assert_eq!((holder.as_str(), user.as_str()), ("ada", "ada"));
    assert!(
        matches!(next_event(&mut bob_events).await, Event::LockChanged { holder: Some(h), .. } if h == "ada")
    );

    let refused = write(&workspace, "bob", "b.txt", b"b", None)
        .await
        .expect_err("locked");
    assert_eq!(refused.code, ErrorCode::Locked);
    let lock = refused.lock.expect("lock details");
    assert_eq!((lock.holder.as_str(), lock.expires_at), ("ada", expires_at));
    let steal = workspace
        .op(&"bob".to_string(), Op::Lock { ttl_ms: None })
        .await
        .expect_err("held");
    assert_eq!(steal.code, ErrorCode::Locked);
    assert_eq!(
        read(&workspace, "bob", "README.md")
            .await
            .expect("reads are never blocked")
            .0,
        b"# Demo\n"
    );
    write(&workspace, "ada", "a.txt", b"a", None)
        .await
        .expect("the holder writes");
    assert!(matches!(
        next_event(&mut bob_events).await,
        Event::FileChanged { .. }
    ));

    // The lock runs out by itself; everyone is told, and bob can write.
    match next_event(&mut bob_events).await {
        Event::LockChanged { holder: None, .. } => {}
        other => panic!("expected the lock to expire, got {other:?}"),
    }
    write(&workspace, "bob", "b.txt", b"b", None)
        .await
        .expect("unlocked now");
}

async fn the_lock_ends_when_its_holder_detaches_or_unlocks(db: TestDb) {
    let fixture = Fixture::new(db).await;
    let workspace = fixture.start().await;
    let _a = attach(&workspace, "ada", Role::Editor).await;
    let mut bob_events = attach(&workspace, "bob", Role::Editor).await;
    workspace
        .op(
            &"ada".to_string(),
            Op::Lock {
                ttl_ms: Some(60_000),
            },
        )
        .await
        .expect("lock");
    next_event(&mut bob_events).await;
    let not_yours = workspace
        .op(&"bob".to_string(), Op::Unlock)
        .await
        .expect_err("not holder");
    assert_eq!(not_yours.code, ErrorCode::Locked);
    workspace
        .op(&"ada".to_string(), Op::Unlock)
        .await
        .expect("unlock");
    assert!(matches!(
        next_event(&mut bob_events).await,
        Event::LockChanged { holder: None, .. }
    ));

    workspace
        .op(
            &"ada".to_string(),
            Op::Lock {
                ttl_ms: Some(60_000),
            },
        )
        .await
        .expect("lock again");
    next_event(&mut bob_events).await;
    workspace.detach(&"ada".to_string());
    assert!(matches!(
        next_event(&mut bob_events).await,
        Event::LockChanged { holder: None, .. }
    ));
    write(&workspace, "bob", "b.txt", b"b", None)
        .await
        .expect("lock gone with its holder");
    let too_long = workspace
        .op(
            &"bob".to_string(),
            Op::Lock {
                ttl_ms: Some(86_400_000),
            },
        )
        .await
        .expect_err("too long");
    assert_eq!(too_long.code, ErrorCode::BadRequest);
}

async fn viewers_read_but_cannot_change_anything(db: TestDb) {
    let fixture = Fixture::new(db).await;
    let workspace = fixture.start().await;
    let _v = attach(&workspace, "vic", Role::Viewer).await;
    let vic = "vic".to_string();
    assert!(read(&workspace, "vic", "README.md").await.is_ok());
    for op in [
        Op::WriteFile {
            path: "x".into(),
            content: vec![],
            base_version: None,
            force: true,
        },
        Op::DeletePath {
            path: "README.md".into(),
            base_version: None,
        },
        Op::RenamePath {
            from: "README.md".into(),
            to: "R.md".into(),
        },
        Op::MakeDir { path: "d".into() },
        Op::Lock { ttl_ms: None },
        Op::Save,
        Op::GitCommit {
            message: "m".into(),
            paths: None,
        },
        Op::GitCreateBranch { name: "b".into() },
    ] {
        let name = op.name();
        let err = workspace.op(&vic, op).await.expect_err(name);
        assert_eq!(err.code, ErrorCode::Forbidden, "{name}");
        assert!(err.message.contains("editor role"), "{}", err.message);
    }
    assert!(workspace.op(&vic, Op::GitStatus).await.is_ok());
    let unknown = workspace
        .op(&"stranger".to_string(), Op::GitStatus)
        .await
        .expect_err("not attached");
    assert_eq!(unknown.code, ErrorCode::Unavailable);
}

async fn delete_rename_and_make_dir_change_the_tree_and_are_announced(db: TestDb) {
    let fixture = Fixture::new(db).await;
    let workspace = fixture.start().await;
    let _a = attach(&workspace, "ada", Role::Editor).await;
    let mut bob_events = attach(&workspace, "bob", Role::Editor).await;
    let ada = "ada".to_string();
    let v = write(&workspace, "ada", "parts/gear.rhai", b"gear", None)
        .await
        .expect("write");
    next_event(&mut bob_events).await;

    workspace
        .op(
            &ada,
            Op::MakeDir {
                path: "empty/inner".into(),
            },
        )
        .await
        .expect("mkdir");
    assert!(matches!(
        next_event(&mut bob_events).await,
        Event::FileChanged {
            kind: EntryKind::Dir,
            ..
        }
    ));
    workspace
        .op(
            &ada,
            Op::MakeDir {
                path: "empty/inner".into(),
            },
        )
        .await
        .expect("mkdir is idempotent");
    let on_file = workspace
        .op(
            &ada,
            Op::MakeDir {
                path: "README.md".into(),
            },
        )
        .await
        .expect_err("file");
    assert_eq!(on_file.code, ErrorCode::Conflict);

    workspace
        .op(
            &ada,
            Op::RenamePath {
                from: "parts".into(),
                to: "lib/parts".into(),
            },
        )
        .await
        .expect("rename dir");
    assert!(
        matches!(next_event(&mut bob_events).await, Event::PathRenamed { from, to, .. } if from == "parts" && to == "lib/parts")
    );
    let (content, moved) = read(&workspace, "ada", "lib/parts/gear.rhai")
        .await
        .expect("moved file");
    assert_eq!(
        (content.as_slice(), moved.as_str()),
        (&b"gear"[..], v.as_str())
    );
    let onto = workspace
        .op(
            &ada,
            Op::RenamePath {
                from: "lib".into(),
                to: "README.md".into(),
            },
        )
        .await
        .expect_err("target exists");
    assert_eq!(onto.code, ErrorCode::Conflict);
    let into_itself = workspace
        .op(
            &ada,
            Op::RenamePath {
                from: "lib".into(),
                to: "lib/x".into(),
            },
        )
        .await
        .expect_err("into itself");
    assert_eq!(into_itself.code, ErrorCode::BadRequest);
    let missing = workspace
        .op(
            &ada,
            Op::RenamePath {
                from: "nope".into(),
                to: "x".into(),
            },
        )
        .await
        .expect_err("missing");
    assert_eq!(missing.code, ErrorCode::NotFound);

    let stale = workspace
        .op(
            &ada,
            Op::DeletePath {
                path: "lib/parts/gear.rhai".into(),
                base_version: Some("0".repeat(40)),
            },
        )
        .await
        .expect_err("stale delete");
    assert_eq!(
        (stale.code, stale.current_version.as_deref()),
        (ErrorCode::Conflict, Some(v.as_str()))
    );
    workspace
        .op(
            &ada,
            Op::DeletePath {
                path: "lib/parts/gear.rhai".into(),
                base_version: Some(v.clone()),
            },
        )
        .await
        .expect("delete file");
    assert!(matches!(
        next_event(&mut bob_events).await,
        Event::PathDeleted {
            kind: EntryKind::File,
            ..
        }
    ));
    workspace
        .op(
            &ada,
            Op::DeletePath {
                path: "lib".into(),
                base_version: None,
            },
        )
        .await
        .expect("delete dir");
    assert!(matches!(
        next_event(&mut bob_events).await,
        Event::PathDeleted {
            kind: EntryKind::Dir,
            ..
        }
    ));
    let got = workspace
        .op(&ada, Op::ListTree { path: None })
        .await
        .expect("list");
    let Reply::Tree { entries, .. } = got else {
        panic!("expected Reply::Tree, got {got:?}");
    };
    let paths: Vec<&str> = entries.iter().map(|e| e.path.as_str()).collect();
    assert_eq!(paths, ["README.md", "empty", "empty/inner"]);
    let gone = workspace
        .op(
            &ada,
            Op::DeletePath {
                path: "lib".into(),
                base_version: None,
            },
        )
        .await
        .expect_err("gone");
    assert_eq!(gone.code, ErrorCode::NotFound);
}

async fn git_status_diff_commit_and_log_match_the_git_cli(db: TestDb) {
    let fixture = Fixture::new(db).await;
    let workspace = fixture.start().await;
    let _a = attach(&workspace, "olga", Role::Owner).await;
    let olga = "olga".to_string();
    let (_, readme) = read(&workspace, "olga", "README.md").await.expect("read");
    write(
        &workspace,
        "olga",
        "README.md",
        b"# Demo\n\nA gearbox.\n",
        Some(&readme),
    )
    .await
    .expect("modify");
    write(&workspace, "olga", "src/box.rhai", b"cube(1, 1, 1)\n", None)
        .await
        .expect("add");
    write(&workspace, "olga", "notes.txt", b"todo\n", None)
        .await
        .expect("add");
    write(
        &workspace,
        "olga",
        "src-extra/other.rhai",
        b"sphere(1)\n",
        None,
    )
    .await
    .expect("add");

    let got = workspace.op(&olga, Op::GitStatus).await.expect("status");
    let Reply::Status {
        branch, changes, ..
    } = got
    else {
        panic!("expected Reply::Status, got {got:?}");
    };
    assert_eq!(branch, "main");
    let ours: Vec<(String, String)> = changes.into_iter().map(|c| (c.path, c.status)).collect();
    let copy = saved_copy(&fixture, &workspace, &fixture.key).await;
    let cli: Vec<(String, String)> = git(copy.path(), &["status", "--porcelain=v1", "-uall"])
        .lines()
        .map(|line| {
            let status = match &line[..2] {
                " M" | "M " | "MM" => "modified",
                "??" => "untracked",
                " D" | "D " => "deleted",
                "A " => "added",
                other => panic!("unexpected status {other:?}"),
            };
            (line[3..].to_string(), status.to_string())
        })
        .collect();
    assert_eq!(ours, cli);

    let got = workspace
        .op(
            &olga,
            Op::GitDiff {
                path: Some("README.md".into()),
            },
        )
        .await
        .expect("diff");
    let Reply::Diff { diff, .. } = got else {
        panic!("expected Reply::Diff, got {got:?}");
    };
    assert_eq!(diff, git(copy.path(), &["diff", "HEAD", "--", "README.md"]));
    let got = workspace
        .op(&olga, Op::GitDiff { path: None })
        .await
        .expect("diff");
    let Reply::Diff { diff: whole, .. } = got else {
        panic!("expected Reply::Diff, got {got:?}");
    };
    git(copy.path(), &["add", "--intent-to-add", "."]);
    assert_eq!(
        whole,
        git(copy.path(), &["diff", "HEAD"]),
        "new files show as additions"
    );

    let got = workspace
        .op(
            &olga,
            Op::GitCommit {
                message: "Add the box".into(),
                paths: Some(vec!["src".into()]),
            },
        )
        .await
        .expect("commit src only");
    let Reply::Committed { commit: first } = got else {
        panic!("expected Reply::Committed, got {got:?}");
    };
    let got = workspace.op(&olga, Op::GitStatus).await.expect("status");
    let Reply::Status { changes, .. } = got else {
        panic!("expected Reply::Status, got {got:?}");
    };
    let left: Vec<&str> = changes.iter().map(|c| c.path.as_str()).collect();
    assert_eq!(
        left,
        ["README.md", "notes.txt", "src-extra/other.rhai"],
        "only src was committed, literally (not src-extra)"
    );
    let got = workspace
        .op(
            &olga,
            Op::GitCommit {
                message: "Describe it".into(),
                paths: None,
            },
        )
        .await
        .expect("commit all");
    let Reply::Committed { commit: second } = got else {
        panic!("expected Reply::Committed, got {got:?}");
    };
    let empty = workspace
        .op(
            &olga,
            Op::GitCommit {
                message: "Nothing".into(),
                paths: None,
            },
        )
        .await
        .expect_err("nothing to commit");
    assert_eq!(empty.code, ErrorCode::Conflict);
    let blank = workspace
        .op(
            &olga,
            Op::GitCommit {
                message: "  \n".into(),
                paths: None,
            },
        )
        .await
        .expect_err("empty message");
    assert_eq!(blank.code, ErrorCode::BadRequest);
    for (paths, code) in [
        (vec![], ErrorCode::BadRequest),
        (vec!["nope".to_string()], ErrorCode::NotFound),
    ] {
        let err = workspace
            .op(
                &olga,
                Op::GitCommit {
                    message: "m".into(),
                    paths: Some(paths.clone()),
                },
            )
            .await
            .expect_err("bad paths");
        assert_eq!(err.code, code, "{paths:?}: {}", err.message);
    }

    let got = workspace
        .op(&olga, Op::GitLog { limit: Some(10) })
        .await
        .expect("log");
    let Reply::Log { commits, .. } = got else {
        panic!("expected Reply::Log, got {got:?}");
    };
    let copy = saved_copy(&fixture, &workspace, &fixture.key).await;
    let cli_log = git(copy.path(), &["log", "--format=%H|%an|%ae|%s"]);
    let ours: Vec<String> = commits
        .iter()
        .map(|c| format!("{}|{}|{}|{}", c.id, c.author, c.email, c.message.trim_end()))
        .collect();
    assert_eq!(ours, cli_log.lines().collect::<Vec<_>>());
    assert_eq!(
        (commits[0].id.as_str(), commits[1].id.as_str()),
        (second.as_str(), first.as_str())
    );
    assert_eq!(
        commits[0].author, "olga Example",
        "author from the session's user"
    );
    assert!(
        git(copy.path(), &["status", "--porcelain"]).is_empty(),
        "clean after commit"
    );
    let got = workspace.op(&olga, Op::GitStatus).await.expect("status");
    let Reply::Status { changes, head, .. } = got else {
        panic!("expected Reply::Status, got {got:?}");
    };
    assert!(changes.is_empty());
    assert_eq!(head, second);
}

async fn create_branch_starts_a_new_workspace_at_the_source_head(db: TestDb) {
    let fixture = Fixture::new(db).await;
    let workspace = fixture.start().await;
    let _a = attach(&workspace, "olga", Role::Owner).await;
    let olga = "olga".to_string();
    write(&workspace, "olga", "part.rhai", b"cube(2, 2, 2)\n", None)
        .await
        .expect("write");
    let got = workspace
        .op(
            &olga,
            Op::GitCommit {
                message: "Part".into(),
                paths: None,
            },
        )
        .await
        .expect("commit");
    let Reply::Committed { commit } = got else {
        panic!("expected Reply::Committed, got {got:?}");
    };
    write(&workspace, "olga", "draft.txt", b"uncommitted\n", None)
        .await
        .expect("uncommitted");

    let got = workspace
        .op(
            &olga,
            Op::GitCreateBranch {
                name: "feature/gears".into(),
            },
        )
        .await
        .expect("create branch");
    let Reply::BranchCreated {
        branch,
        head,
        snapshot_version,
    } = got
    else {
        panic!("expected Reply::BranchCreated, got {got:?}");
    };
    assert_eq!(
        (branch.as_str(), head.as_str(), snapshot_version),
        ("feature/gears", commit.as_str(), 1)
    );
    let got = workspace
        .op(&olga, Op::GitBranches)
        .await
        .expect("branches");
    let Reply::Branches { branches, .. } = got else {
        panic!("expected Reply::Branches, got {got:?}");
    };
    assert_eq!(branches, ["feature/gears", "main"]);

    let feature = fixture
        .start_branch("feature/gears")
        .await
        .expect("the branch activates");
    let _f = attach(&feature, "olga", Role::Owner).await;
    let got = feature.op(&olga, Op::GitStatus).await.expect("status");
    let Reply::Status {
        branch,
        head,
        changes,
        ..
    } = got
    else {
        panic!("expected Reply::Status, got {got:?}");
    };
    assert_eq!(
        (branch.as_str(), head.as_str()),
        ("feature/gears", commit.as_str())
    );
    assert!(changes.is_empty(), "a clean checkout of HEAD: {changes:?}");
    assert_eq!(
        read(&feature, "olga", "part.rhai")
            .await
            .expect("committed file")
            .0,
        b"cube(2, 2, 2)\n"
    );
    assert_eq!(
        read(&feature, "olga", "draft.txt")
            .await
            .expect_err("uncommitted stays behind")
            .code,
        ErrorCode::NotFound
    );

    let again = workspace
        .op(
            &olga,
            Op::GitCreateBranch {
                name: "feature/gears".into(),
            },
        )
        .await
        .expect_err("exists");
    assert_eq!(again.code, ErrorCode::Conflict);
    for bad in ["a..b", "-x", "has space", "end.lock", "x~1", ""] {
        let err = workspace
            .op(&olga, Op::GitCreateBranch { name: bad.into() })
            .await
            .expect_err(bad);
        assert_eq!(err.code, ErrorCode::BadRequest, "{bad:?}");
    }
}

async fn save_then_reactivation_restores_uncommitted_edits_byte_for_byte(db: TestDb) {
    let fixture = Fixture::new(db).await;
    let workspace = fixture.start().await;
    let _a = attach(&workspace, "olga", Role::Owner).await;
    let olga = "olga".to_string();
    let binary: Vec<u8> = (0..=255u8).cycle().take(100_000).collect();
    write(&workspace, "olga", "assets/mesh.bin", &binary, None)
        .await
        .expect("binary");
    write(
        &workspace,
        "olga",
        "ünïcode name.txt",
        "ß→∑\n".as_bytes(),
        None,
    )
    .await
    .expect("unicode");
    workspace
        .op(
            &olga,
            Op::MakeDir {
                path: "empty".into(),
            },
        )
        .await
        .expect("dir");

    let got = workspace.op(&olga, Op::Save).await.expect("save");
    let Reply::Saved {
        snapshot_version,
        saved,
    } = got
    else {
        panic!("expected Reply::Saved, got {got:?}");
    };
    assert_eq!((snapshot_version, saved), (2, true));
    let got = workspace.op(&olga, Op::Save).await.expect("save again");
    let Reply::Saved {
        snapshot_version,
        saved,
    } = got
    else {
        panic!("expected Reply::Saved, got {got:?}");
    };
    assert_eq!(
        (snapshot_version, saved),
        (2, false),
        "nothing changed: no new version"
    );
    assert_eq!(
        fixture
            .store
            .list_snapshots(&fixture.key)
            .await
            .expect("list")
            .len(),
        2
    );
    workspace.stop().await;

    let again = fixture.start().await;
    let _b = attach(&again, "olga", Role::Owner).await;
    assert_eq!(
        read(&again, "olga", "assets/mesh.bin")
            .await
            .expect("binary")
            .0,
        binary
    );
    assert_eq!(
        read(&again, "olga", "ünïcode name.txt")
            .await
            .expect("unicode")
            .0,
        "ß→∑\n".as_bytes()
    );
    let got = again
        .op(
            &olga,
            Op::ListTree {
                path: Some("empty".into()),
            },
        )
        .await
        .expect("empty dir survives");
    let Reply::Tree { entries, .. } = got else {
        panic!("expected Reply::Tree, got {got:?}");
    };
    assert!(entries.is_empty());
    let got = again.op(&olga, Op::GitStatus).await.expect("status");
    let Reply::Status { changes, .. } = got else {
        panic!("expected Reply::Status, got {got:?}");
    };
    let untracked: Vec<&str> = changes.iter().map(|c| c.path.as_str()).collect();
    assert_eq!(
        untracked,
        ["assets/mesh.bin", "ünïcode name.txt"],
        "still uncommitted"
    );
}

async fn every_bad_path_is_refused(db: TestDb) {
    let fixture = Fixture::with(db, |config| {
        config.max_file = 1024;
        config.max_path = 64;
    })
    .await;
    let workspace = fixture.start().await;
    let _a = attach(&workspace, "ada", Role::Editor).await;
    for bad in [
        "../escape",
        "a/../../escape",
        "/etc/passwd",
        ".git/config",
        ".git",
        "sub/.GIT/x",
        "nul\0byte",
        "",
        "back\\slash",
    ] {
        let err = write(&workspace, "ada", bad, b"x", None)
            .await
            .expect_err(bad);
        assert_eq!(
            err.code,
            ErrorCode::BadRequest,
            "write {bad:?}: {}",
            err.message
        );
        let err = read(&workspace, "ada", bad).await.expect_err(bad);
        assert_eq!(err.code, ErrorCode::BadRequest, "read {bad:?}");
    }
    let long = "x".repeat(65);
    assert_eq!(
        write(&workspace, "ada", &long, b"x", None)
            .await
            .expect_err("long")
            .code,
        ErrorCode::TooLarge
    );
    assert_eq!(
        write(&workspace, "ada", "big.bin", &[0u8; 1025], None)
            .await
            .expect_err("big")
            .code,
        ErrorCode::TooLarge
    );

    // A path that runs through a file is refused, not an internal error.
    let through_file = write(&workspace, "ada", "README.md/inner", b"x", None)
        .await
        .expect_err("through a file");
    assert_eq!(
        through_file.code,
        ErrorCode::BadRequest,
        "{}",
        through_file.message
    );
    let read_through = read(&workspace, "ada", "README.md/inner")
        .await
        .expect_err("through a file");
    assert_eq!(read_through.code, ErrorCode::NotFound);

    // A symbolic link planted in the working dir leads nowhere.
    let dir = workspace.info().await.expect("info").dir;
    let outside = tempfile::tempdir().expect("outside");
    std::fs::write(outside.path().join("secret"), b"secret").expect("secret");
    std::os::unix::fs::symlink(outside.path(), dir.join("link")).expect("symlink");
    std::os::unix::fs::symlink(outside.path().join("secret"), dir.join("file-link"))
        .expect("file symlink");
    for path in ["link/secret", "link", "file-link"] {
        assert_eq!(
            read(&workspace, "ada", path).await.expect_err(path).code,
            ErrorCode::BadRequest
        );
    }
    // A directory is not read; a FIFO is not part of the tree (and reading
    // it does not hang the workspace).
    std::fs::create_dir(dir.join("plain-dir")).expect("dir");
    assert_eq!(
        read(&workspace, "ada", "plain-dir")
            .await
            .expect_err("dir")
            .code,
        ErrorCode::BadRequest
    );
    let made = std::process::Command::new("mkfifo")
        .arg(dir.join("pipe"))
        .status()
        .expect("mkfifo");
    assert!(made.success(), "mkfifo");
    assert_eq!(
        read(&workspace, "ada", "pipe")
            .await
            .expect_err("fifo")
            .code,
        ErrorCode::NotFound
    );
    assert_eq!(
        write(&workspace, "ada", "link/new", b"x", None)
            .await
            .expect_err("through link")
            .code,
        ErrorCode::BadRequest
    );
    assert!(
        !outside.path().join("new").exists(),
        "nothing was written outside"
    );
    let got = workspace
        .op(&"ada".to_string(), Op::ListTree { path: None })
        .await
        .expect("list");
    let Reply::Tree { entries, .. } = got else {
        panic!("expected Reply::Tree, got {got:?}");
    };
    assert!(
        entries.iter().all(|e| e.path != "link"),
        "links are not part of the tree"
    );
}

/// Issue 17, item 11: a symbolic link placed on the server's disk was
/// committed, and branches made from that commit failed to open
/// (`internal`). A commit now never records a link or special file, a
/// snapshot never holds one, and a commit that holds one from before
/// (made here by the git CLI) still gives a branch that opens without it.
async fn links_on_the_servers_disk_are_never_committed_and_never_stop_a_branch_opening(db: TestDb) {
    let fixture = Fixture::new(db).await;
    let workspace = fixture.start().await;
    let _ada = attach(&workspace, "ada", Role::Editor).await;
    let _olga = attach(&workspace, "olga", Role::Owner).await;
    let ada = "ada".to_string();
    write(&workspace, "ada", "part.txt", b"part", None)
        .await
        .expect("write");
    let dir = workspace.info().await.expect("info").dir;
    std::os::unix::fs::symlink("/etc/passwd", dir.join("passwd-link")).expect("symlink");
    std::fs::create_dir(dir.join("sub")).expect("dir");
    std::os::unix::fs::symlink("../part.txt", dir.join("sub/inner-link")).expect("symlink");
    let made = Command::new("mkfifo")
        .arg(dir.join("pipe"))
        .status()
        .expect("mkfifo");
    assert!(made.success());

    workspace
        .op(
            &ada,
            Op::GitCommit {
                message: "everything".into(),
                paths: None,
            },
        )
        .await
        .expect("commit");
    assert_eq!(
        git(&dir, &["ls-tree", "-r", "--name-only", "HEAD"]),
        "README.md\npart.txt\n",
        "only plain files are committed"
    );
    for named in ["passwd-link", "sub"] {
        let err = workspace
            .op(
                &ada,
                Op::GitCommit {
                    message: "the link".into(),
                    paths: Some(vec![named.into()]),
                },
            )
            .await
            .expect_err(named);
        assert!(
            matches!(err.code, ErrorCode::NotFound | ErrorCode::Conflict),
            "{named}: {err:?}"
        );
    }

    // A commit holding a link from before (the git CLI records it).
    git(&dir, &["add", "passwd-link"]);
    git(
        &dir,
        &[
            "-c",
            "user.name=old",
            "-c",
            "user.email=old@example.com",
            "commit",
            "-qm",
            "old link",
        ],
    );
    let created = workspace
        .op(
            &ada,
            Op::GitCreateBranch {
                name: "feature".into(),
            },
        )
        .await;
    assert!(created.is_ok(), "{created:?}");
    let feature = fixture
        .start_branch("feature")
        .await
        .expect("the branch opens without the link");
    let _olga_there = attach(&feature, "olga", Role::Owner).await;
    let files = feature
        .op(&"olga".to_string(), Op::ListTree { path: None })
        .await;
    let Ok(Reply::Tree { entries, .. }) = files else {
        panic!("{files:?}");
    };
    let paths: Vec<&str> = entries.iter().map(|e| e.path.as_str()).collect();
    assert!(
        paths.contains(&"part.txt") && !paths.contains(&"passwd-link"),
        "{paths:?}"
    );

    // Saved with the link and the FIFO still on disk: the snapshot leaves
    // them out, and the branch opens again from it.
    let copy = saved_copy(&fixture, &workspace, &fixture.key).await;
    assert!(copy.path().join("part.txt").is_file());
    assert!(std::fs::symlink_metadata(copy.path().join("passwd-link")).is_err());
    assert!(std::fs::symlink_metadata(copy.path().join("pipe")).is_err());
    workspace.stop().await;
    fixture.start().await;
}

/// Issue 17, item 7: with `BRANCHD_MAX_WORKSPACE=20MiB`, three 8 MiB
/// writes succeeded, the save too, and the branch then answered
/// `too_large` forever. Now a write or commit that would take the working
/// copy (history included) past the limit is refused, and what was
/// accepted saves and opens again.
async fn writes_and_commits_keep_the_working_copy_within_its_limit_so_it_always_opens(db: TestDb) {
    const LIMIT: u64 = 2 << 20;
    const SIZE: usize = 450 << 10;
    let fixture = Fixture::with(db, |config| config.max_workspace = LIMIT).await;
    let workspace = fixture.start().await;
    let _ada = attach(&workspace, "ada", Role::Editor).await;
    let _olga = attach(&workspace, "olga", Role::Owner).await;
    let ada = "ada".to_string();
    // Incompressible, so git's copy costs as much as the file.
    let mut seed = 0x9e37_79b9_7f4a_7c15u64;
    let mut noise = || -> Vec<u8> {
        (0..SIZE)
            .map(|_| {
                seed ^= seed << 13;
                seed ^= seed >> 7;
                seed ^= seed << 17;
                seed as u8
            })
            .collect()
    };
    let mut versions = Vec::new();
    for i in 0..4 {
        let version = write(&workspace, "ada", &format!("part-{i}.bin"), &noise(), None)
            .await
            .expect("within the limit");
        versions.push(version);
    }
    let refused = write(&workspace, "ada", "part-4.bin", &noise(), None)
        .await
        .expect_err("past the limit");
    assert_eq!(refused.code, ErrorCode::TooLarge, "{}", refused.message);
    assert!(
        refused.message.contains("BRANCHD_MAX_WORKSPACE"),
        "{}",
        refused.message
    );
    // Replacing a file with one of the same size takes no more room.
    write(
        &workspace,
        "ada",
        "part-0.bin",
        &noise(),
        Some(&versions[0]),
    )
    .await
    .expect("a replacement fits");

    let commit = |message: &str| Op::GitCommit {
        message: message.into(),
        paths: None,
    };
    let refused = workspace
        .op(&ada, commit("all of it"))
        .await
        .expect_err("history would take it past the limit");
    assert_eq!(refused.code, ErrorCode::TooLarge, "{}", refused.message);
    for i in 1..4 {
        workspace
            .op(
                &ada,
                Op::DeletePath {
                    path: format!("part-{i}.bin"),
                    base_version: None,
                },
            )
            .await
            .expect("delete");
    }
    workspace
        .op(&ada, commit("what fits"))
        .await
        .expect("a commit that fits");

    let saved = workspace
        .op(&"olga".to_string(), Op::Save)
        .await
        .expect("the save fits");
    assert!(
        matches!(saved, Reply::Saved { saved: true, .. }),
        "{saved:?}"
    );
    workspace.stop().await;
    let again = fixture.start().await;
    let _olga = attach(&again, "olga", Role::Owner).await;
    assert!(read(&again, "olga", "part-0.bin").await.is_ok());
}

async fn the_working_dir_is_removed_when_the_actor_stops_or_is_killed(db: TestDb) {
    let fixture = Fixture::new(db).await;
    let stopped = fixture.start().await;
    let dir = stopped.info().await.expect("info").dir;
    assert!(dir.join("README.md").exists());
    stopped.stop().await;
    assert!(!dir.exists(), "removed after a stop");

    let killed = fixture.start().await;
    let dir = killed.info().await.expect("info").dir;
    killed.actor().kill_and_wait(None).await.expect("kill");
    assert!(!dir.exists(), "removed after a kill");
}

mod journal {
    use super::*;

    on_both_backends!(
        a_killed_workspace_replays_its_journal_to_the_same_files_and_commits,
        a_workspace_that_lost_its_claim_cannot_write,
        a_node_silent_for_the_fence_refuses_writes_and_serves_reads_until_it_renews,
        a_dirty_workspace_saves_itself_after_a_quiet_period,
    );

    async fn a_node_silent_for_the_fence_refuses_writes_and_serves_reads_until_it_renews(
        db: TestDb,
    ) {
        let mut fixture = Fixture::new(db).await;
        let clock = ManualClock::new();
        let fence_after = Duration::from_secs(5);
        fixture.settings.liveness = Liveness::with_clock(fence_after, Arc::new(clock.clone()));
        // The heartbeat task's side of the same liveness.
        let heartbeat = fixture.settings.liveness.clone();
        heartbeat.renewed();
        let workspace = fixture.start().await;
        let _a = attach(&workspace, "olga", Role::Owner).await;
        write(&workspace, "olga", "mine.txt", b"before", None)
            .await
            .expect("write while renewed");

        clock.advance(fence_after);
        let (_, version) = read(&workspace, "olga", "mine.txt")
            .await
            .expect("reads go on while fenced");
        let fenced = write(&workspace, "olga", "mine.txt", b"after", Some(&version))
            .await
            .expect_err("no writes once silent for the fence");
        assert_eq!(fenced.code, ErrorCode::Unavailable, "{fenced:?}");
        assert_eq!(
            read(&workspace, "olga", "mine.txt").await.expect("read").0,
            b"before",
            "never applied"
        );

        heartbeat.renewed();
        write(&workspace, "olga", "mine.txt", b"after", Some(&version))
            .await
            .expect("writes resume once the heartbeat is renewed");
    }

    async fn a_dirty_workspace_saves_itself_after_a_quiet_period(db: TestDb) {
        let fixture = Fixture::with(db, |config| {
            config.autosave_quiet = Duration::from_millis(200);
            config.autosave_max = Duration::from_secs(60);
        })
        .await;
        let workspace = fixture.start().await;
        let _a = attach(&workspace, "olga", Role::Owner).await;
        write(&workspace, "olga", "auto.txt", b"saved by itself", None)
            .await
            .expect("write");
        assert!(workspace.info().await.expect("info").dirty);
        common::eventually("the workspace saves itself", || async {
            !workspace.info().await.expect("info").dirty
        })
        .await;
        let latest = fixture
            .store
            .latest_snapshot(&fixture.key)
            .await
            .expect("read")
            .expect("snapshot");
        assert_eq!(latest.meta.version, 2);
        assert!(
            fixture
                .store
                .journal_after(&fixture.key, 0)
                .await
                .expect("journal")
                .is_empty(),
            "the save trimmed the journal"
        );
    }

    async fn a_killed_workspace_replays_its_journal_to_the_same_files_and_commits(db: TestDb) {
        let fixture = Fixture::new(db).await;
        let workspace = fixture.start().await;
        let _a = attach(&workspace, "olga", Role::Owner).await;
        let olga = "olga".to_string();
        write(&workspace, "olga", "a.txt", b"first", None)
            .await
            .expect("write");
        workspace
            .op(
                &olga,
                Op::MakeDir {
                    path: "empty".into(),
                },
            )
            .await
            .expect("mkdir");
        let got = workspace
            .op(
                &olga,
                Op::GitCommit {
                    message: "A".into(),
                    paths: None,
                },
            )
            .await
            .expect("commit");
        let Reply::Committed { commit } = got else {
            panic!("expected Reply::Committed, got {got:?}");
        };
        write(&workspace, "olga", "b.txt", b"second", None)
            .await
            .expect("write");
        workspace
            .op(
                &olga,
                Op::RenamePath {
                    from: "b.txt".into(),
                    to: "c.txt".into(),
                },
            )
            .await
            .expect("rename");
        workspace
            .op(
                &olga,
                Op::DeletePath {
                    path: "a.txt".into(),
                    base_version: None,
                },
            )
            .await
            .expect("delete");
        // No save: everything above lives only in the journal.
        workspace.actor().kill_and_wait(None).await.expect("kill");
        assert_eq!(
            fixture
                .store
                .list_snapshots(&fixture.key)
                .await
                .expect("list")
                .len(),
            1
        );

        let again = fixture.start().await;
        let _b = attach(&again, "olga", Role::Owner).await;
        assert_eq!(
            read(&again, "olga", "c.txt").await.expect("renamed").0,
            b"second"
        );
        assert_eq!(
            read(&again, "olga", "a.txt")
                .await
                .expect_err("deleted")
                .code,
            ErrorCode::NotFound
        );
        let got = again
            .op(&olga, Op::GitLog { limit: Some(1) })
            .await
            .expect("log");
        let Reply::Log { commits, .. } = got else {
            panic!("expected Reply::Log, got {got:?}");
        };
        assert_eq!(commits[0].id, commit, "replay makes the very same commit");
        let got = again
            .op(&olga, Op::ListTree { path: None })
            .await
            .expect("list");
        let Reply::Tree { entries, .. } = got else {
            panic!("expected Reply::Tree, got {got:?}");
        };
        assert!(entries.iter().any(|e| e.path == "empty"), "{entries:?}");

        // A save covers the journal and trims it.
        let got = again.op(&olga, Op::Save).await.expect("save");
        let Reply::Saved { saved, .. } = got else {
            panic!("expected Reply::Saved, got {got:?}")
        };
        assert!(saved);
        assert!(
            fixture
                .store
                .journal_after(&fixture.key, 0)
                .await
                .expect("journal")
                .is_empty()
        );
    }

    async fn a_workspace_that_lost_its_claim_cannot_write(db: TestDb) {
        let fixture = Fixture::new(db).await;
        let workspace = fixture.start().await;
        let _a = attach(&workspace, "olga", Role::Owner).await;
        write(&workspace, "olga", "mine.txt", b"before", None)
            .await
            .expect("write");
        // Another node takes the workspace over (this one's lease lapsed).
        let claim = fixture
            .store
            .claim_of(&fixture.key)
            .await
            .expect("claim")
            .expect("row");
        let fence = claim.fence().expect("owned");
        assert!(
            fixture
                .store
                .release_claim(&fixture.key, &fence)
                .await
                .expect("release")
        );
        fixture
            .store
            .register_node("other", None, None)
            .await
            .expect("node");
        fixture
            .store
            .claim(&fixture.key, "other", 60_000)
            .await
            .expect("takeover");

        let fenced = write(&workspace, "olga", "mine.txt", b"after", None)
            .await
            .expect_err("a stale owner cannot write");
        assert_eq!(
            fenced.code,
            ErrorCode::Conflict,
            "exists without base: checked first"
        );
        let (_, version) = read(&workspace, "olga", "mine.txt").await.expect("read");
        let fenced = write(&workspace, "olga", "mine.txt", b"after", Some(&version))
            .await
            .expect_err("a stale owner cannot write");
        assert_eq!(fenced.code, ErrorCode::Unavailable);
        assert_eq!(
            read(&workspace, "olga", "mine.txt").await.expect("read").0,
            b"before",
            "never applied"
        );
        assert!(
            fixture
                .store
                .journal_after(&fixture.key, 0)
                .await
                .expect("journal")
                .iter()
                .all(|r| !r.op.windows(5).any(|w| w == b"after")),
            "nothing from the stale owner in the journal"
        );
    }
}

async fn reads_and_writes_are_served_while_a_save_runs(db: TestDb) {
    let mut fixture = Fixture::new(db).await;
    let (store, gate) = GatedStore::wrap(fixture.store.clone());
    fixture.store = store;
    let workspace = fixture.start().await;
    let _a = attach(&workspace, "olga", Role::Owner).await;
    let olga = "olga".to_string();
    write(&workspace, "olga", "small.txt", b"before", None)
        .await
        .expect("small file");

    let saving = {
        let (workspace, olga) = (workspace.clone(), olga.clone());
        tokio::spawn(async move { workspace.op(&olga, Op::Save).await })
    };
    gate.until_a_save_waits().await;

    // The save is now held inside `put_snapshot` until the gate opens. Were
    // the workspace to wait for a save on its mailbox (awaiting the store in
    // its handler), the read and the write below would queue behind it and
    // go unanswered while the gate is shut: the time-outs turn that into a
    // failure, not a hang. No head start or slow packing is needed, and a
    // fast machine cannot make the save finish first.
    let within = Duration::from_secs(10);
    let read = tokio::time::timeout(
        within,
        workspace.op(
            &olga,
            Op::ReadFile {
                path: "small.txt".into(),
            },
        ),
    )
    .await
    .expect("a read is answered while a save is held in the store")
    .expect("a read during the save");
    let Reply::File { content, .. } = read else {
        panic!("expected a file, got {read:?}");
    };
    assert_eq!(content, b"before");
    tokio::time::timeout(
        within,
        write(
            &workspace,
            "olga",
            "during.txt",
            b"written while saving",
            None,
        ),
    )
    .await
    .expect("a write is answered while a save is held in the store")
    .expect("a write during the save");
    assert_eq!(
        gate.saves_waiting(),
        1,
        "the save was still held when the read and the write were answered"
    );
    assert!(!saving.is_finished(), "the save waits for the gate");

    gate.open();
    let saved = tokio::time::timeout(within, saving)
        .await
        .expect("the save completes once the gate opens")
        .expect("save task");
    let Ok(Reply::Saved {
        snapshot_version,
        saved: true,
    }) = saved
    else {
        panic!("expected a completed save, got {saved:?}");
    };

    // The held save has the tree as it was when the save began...
    let held = fixture
        .store
        .snapshot(&fixture.key, snapshot_version)
        .await
        .expect("read")
        .expect("the held save's snapshot");
    let dir = tempfile::tempdir().expect("dir");
    snapshot::unpack(&held.data, dir.path(), 1 << 30).expect("unpack");
    assert_eq!(
        std::fs::read(dir.path().join("small.txt")).expect("in the held save"),
        b"before"
    );
    assert!(
        !dir.path().join("during.txt").exists(),
        "a write made during the save is not in that snapshot"
    );
    // ... so the write made meanwhile keeps the workspace unsaved, and the
    // next save has it.
    let info = workspace.info().await.expect("info");
    assert!(
        info.dirty,
        "a change made during the save keeps the workspace dirty"
    );
    let copy = saved_copy(&fixture, &workspace, &fixture.key).await;
    assert_eq!(
        std::fs::read(copy.path().join("during.txt")).expect("in the next save"),
        b"written while saving"
    );
}
