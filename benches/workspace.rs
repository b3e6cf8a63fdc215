//! Workspace actor figures on a generated 2,000-file, 20 MB project:
//! activation (snapshot fetched from the store, unpacked, repository
//! opened), small-file read and write latency through the actor, tree
//! listing and save.
//!
//! Run: `cargo bench --bench workspace` (SQLite in a temp dir; set
//! `DATABASE_URL=postgres://...` to use Postgres, and
//! `BENCH_WORKSPACE_DIR` to unpack somewhere other than the temp dir).

use std::sync::Arc;
use std::time::Instant;

use branchd::config::Config;
use branchd::protocol::{Op, Reply};
use branchd::storage::{self, NewSnapshot, NewUser, Role, Store, WorkspaceKey};
use branchd::workspace::{SessionInfo, Workspace, WorkspaceArgs, WorkspaceSettings, snapshot};

mod common;
use common::{FILE_BYTES, FILES, Stats, generated_project, timed};

#[tokio::main]
async fn main() {
    let data = tempfile::tempdir().expect("data");
    let work_root = std::env::var("BENCH_WORKSPACE_DIR")
        .map(std::path::PathBuf::from)
        .unwrap_or_else(|_| std::env::temp_dir().join("branchd-bench"));
    std::fs::create_dir_all(&work_root).expect("workspace root");
    let url =
        std::env::var("DATABASE_URL").unwrap_or_else(|_| storage::sqlite::default_url(data.path()));
    let store: Arc<dyn Store> = storage::open(&url, 8).await.expect("store");

    let generating = Instant::now();
    let blob = generated_project(&work_root);
    let owner = store
        .create_user(NewUser {
            username: format!("bench-{}", std::process::id()),
            display_name: "Bench".into(),
            email: "bench@example.com".into(),
            password_hash: "x".into(),
            is_admin: false,
        })
        .await
        .expect("user");
    let (project, meta) = store
        .create_project(
            "bench",
            owner.id,
            "main",
            NewSnapshot {
                data: blob,
                author: None,
                journal_seq: 0,
                keep: 3,
            },
        )
        .await
        .expect("project");
    let key = WorkspaceKey::new(project.id, "main");

    let mut config = Config::from_env().expect("config");
    config.workspace_dir = Some(work_root.clone());
    let settings = WorkspaceSettings::from_config(&config);
    let node = format!("bench-{}", std::process::id());
    store.register_node(&node, None, None).await.expect("node");
    let fence = match store.claim(&key, &node, 600_000).await.expect("claim") {
        storage::ClaimOutcome::Owned(claim) => claim.fence().expect("owner"),
        other => panic!("the bench could not own the workspace: {other:?}"),
    };
    let args = || WorkspaceArgs {
        key: key.clone(),
        store: store.clone(),
        settings: settings.clone(),
        fence: fence.clone(),
    };

    println!(
        "branchd workspace bench: {FILES} files x {FILE_BYTES} B committed; snapshot {:.1} MB compressed; backend {:?}; working dirs in {}; generated in {:.1} s",
        meta.size as f64 / 1e6,
        store.backend(),
        work_root.display(),
        generating.elapsed().as_secs_f64()
    );
    println!(
        "| {:<38} | {:>6} | {:>12} | {:>12} |",
        "scenario", "n", "median", "p99"
    );
    println!("|{:-<40}|{:->8}|{:->14}|{:->14}|", "", "", "", "");
    let mut report = common::Report::new("workspace");

    let (mut activating, mut stopping) = (Vec::new(), Vec::new());
    for _ in 0..10 {
        let started = Instant::now();
        let (workspace, _) = Workspace::start(args()).await.expect("activate");
        activating.push(started.elapsed());
        let started = Instant::now();
        workspace.stop().await;
        stopping.push(started.elapsed());
    }
    Stats(activating).row_in(&mut report, "activation (fetch + unpack + open)");
    Stats(stopping).row_in(&mut report, "stop (remove the working dir)");

    let (workspace, _) = Workspace::start(args()).await.expect("activate");
    let (events, _keep) = tokio::sync::mpsc::channel(1024);
    let me = "bench".to_string();
    workspace
        .attach(
            SessionInfo {
                id: me.clone(),
                user_id: owner.id,
                username: "bench".into(),
                display_name: "Bench".into(),
                email: "bench@example.com".into(),
                role: Role::Owner,
            },
            events,
        )
        .await
        .expect("attach");
    let small = vec![b'x'; 1024];
    workspace
        .op(
            &me,
            Op::WriteFile {
                path: "small.txt".into(),
                content: small.clone(),
                base_version: None,
                force: true,
            },
        )
        .await
        .expect("seed");

    timed(1, |_| workspace.op(&me, Op::ListTree { path: None }))
        .await
        .row_in(&mut report, "list_tree, 2,000 files (cold versions)");
    timed(20, |_| workspace.op(&me, Op::ListTree { path: None }))
        .await
        .row_in(&mut report, "list_tree, 2,000 files (warm)");
    timed(10_000, |_| {
        workspace.op(
            &me,
            Op::ReadFile {
                path: "small.txt".into(),
            },
        )
    })
    .await
    .row_in(&mut report, "read_file 1 KiB");
    timed(2_000, |i| {
        workspace.op(
            &me,
            Op::WriteFile {
                path: format!("written/{}.txt", i % 50),
                content: small.clone(),
                base_version: None,
                force: true,
            },
        )
    })
    .await
    .row_in(&mut report, "write_file 1 KiB (journalled)");

    // The same write without the journal: the file work alone, and the
    // journal append alone, so the cost of durability is visible.
    let scratch = tempfile::tempdir_in(&work_root).expect("scratch");
    std::fs::create_dir_all(scratch.path().join(".git")).expect(".git");
    let mut files =
        branchd::workspace::files::Files::open(scratch.path(), settings.files).expect("files");
    let mut plain = Vec::with_capacity(2_000);
    for i in 0..2_000 {
        let path =
            branchd::workspace::paths::WorkPath::parse(&format!("written/{}.txt", i % 50), 1024)
                .expect("path");
        let started = Instant::now();
        files.check_write(&path, &small, None, true).expect("check");
        files.apply_write(&path, &small).expect("write");
        plain.push(started.elapsed());
    }
    Stats(plain).row_in(&mut report, "file write without journal (no actor)");
    let record = branchd::workspace::journal::encode(&branchd::workspace::journal::WriteRecord {
        path: "written/x.txt".into(),
        content: small.clone(),
    })
    .expect("record");
    timed(2_000, |_| store.append_journal(&key, &fence, &record))
        .await
        .row_in(&mut report, "journal append alone (1 KiB record)");
    let dir = workspace.info().await.expect("info").dir;
    timed(5, |_| {
        let dir = dir.clone();
        async move { tokio::task::spawn_blocking(move || snapshot::pack(&dir)).await }
    })
    .await
    .row_in(&mut report, "pack only (tar + gzip)");
    timed(5, |i| {
        let workspace = workspace.clone();
        let me = me.clone();
        let small = small.clone();
        async move {
            workspace
                .op(
                    &me,
                    Op::WriteFile {
                        path: format!("saved/{i}.txt"),
                        content: small,
                        base_version: None,
                        force: true,
                    },
                )
                .await
                .expect("write");
            match workspace.op(&me, Op::Save).await.expect("save") {
                Reply::Saved { saved: true, .. } => {}
                other => panic!("expected a new snapshot, got {other:?}"),
            }
        }
    })
    .await
    .row_in(&mut report, "save (pack + store)");

    // Reads while a save runs: the save packs in the background, so a read
    // should cost what it costs when the workspace is idle.
    let mut during = Vec::new();
    for round in 0..5 {
        workspace
            .op(
                &me,
                Op::WriteFile {
                    path: format!("during/{round}.txt"),
                    content: small.clone(),
                    base_version: None,
                    force: true,
                },
            )
            .await
            .expect("write");
        let saving = {
            let (workspace, me) = (workspace.clone(), me.clone());
            tokio::spawn(async move { workspace.op(&me, Op::Save).await })
        };
        while !saving.is_finished() {
            let started = Instant::now();
            workspace
                .op(
                    &me,
                    Op::ReadFile {
                        path: "small.txt".into(),
                    },
                )
                .await
                .expect("read during a save");
            during.push(started.elapsed());
        }
        saving.await.expect("task").expect("save");
    }
    Stats(during).row_in(&mut report, "read_file 1 KiB during a save");
    report.write();
    workspace.stop().await;
    store.delete_project(project.id).await.expect("clean up");
}
