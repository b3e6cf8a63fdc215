//! Many idle workspaces on one node: activate 2,000 small workspaces (one
//! session each, then detached, kept warm for the grace period) and report
//! resident memory per workspace and the file descriptors they hold.
//!
//! Run: `cargo bench --bench idle` (SQLite; `DATABASE_URL` for Postgres;
//! `BENCH_WORKSPACE_DIR` for where working copies go).

use std::time::Instant;

use branchd::protocol::Role;
use branchd::storage::{NewSnapshot, WorkspaceKey};
use branchd::workspace::SessionInfo;
use branchd::workspace::repo::GitAuthor;

mod common;

const WORKSPACES: usize = 2_000;

fn open_fds() -> usize {
    std::fs::read_dir("/proc/self/fd")
        .map(|d| d.count())
        .unwrap_or(0)
}

#[tokio::main]
async fn main() {
    let work_root = std::env::var("BENCH_WORKSPACE_DIR")
        .map(std::path::PathBuf::from)
        .unwrap_or_else(|_| std::env::temp_dir().join("branchd-bench"));
    std::fs::create_dir_all(&work_root).expect("work root");
    let (server, _base, _token, project, _data) =
        common::bench_server(Some(work_root.clone())).await;
    let store = server.store().clone();
    let allocator = server.allocator().clone();
    let author = GitAuthor {
        name: "Bench".into(),
        email: "bench@example.com".into(),
    };
    let small = branchd::workspace::first_snapshot(&work_root, "main", "# small\n", &author)
        .expect("small snapshot");
    for i in 0..WORKSPACES {
        let key = WorkspaceKey::new(project, format!("b{i}"));
        store
            .create_branch(
                &key,
                NewSnapshot {
                    data: small.clone(),
                    author: None,
                    journal_seq: 0,
                    keep: 1,
                },
            )
            .await
            .expect("branch");
    }

    let (rss_before, fds_before) = (common::resident_kib(), open_fds());
    let started = Instant::now();
    for i in 0..WORKSPACES {
        let key = WorkspaceKey::new(project, format!("b{i}"));
        let (events, _ignored) = tokio::sync::mpsc::channel(8);
        let session = SessionInfo {
            id: format!("s{i}"),
            user_id: 1,
            username: "admin".into(),
            display_name: "Admin".into(),
            email: "admin@example.com".into(),
            role: Role::Owner,
        };
        allocator
            .register(session, &key, events)
            .await
            .expect("register");
        allocator.deregister(&format!("s{i}"), &key).await;
    }
    let elapsed = started.elapsed();
    tokio::time::sleep(std::time::Duration::from_secs(1)).await;
    let (rss_after, fds_after) = (common::resident_kib(), open_fds());
    let live = allocator
        .workspaces()
        .await
        .expect("status")
        .iter()
        .filter(|w| w.state == "active")
        .count();
    println!(
        "branchd idle bench: {WORKSPACES} small workspaces activated in {:.1} s ({:.1} ms each), backend {:?}, working dirs in {}",
        elapsed.as_secs_f64(),
        elapsed.as_secs_f64() * 1e3 / WORKSPACES as f64,
        store.backend(),
        work_root.display()
    );
    println!("| measure | value |");
    println!("|---|---|");
    println!("| active idle workspaces | {live} |");
    println!(
        "| resident memory before / after | {} MiB / {} MiB |",
        rss_before / 1024,
        rss_after / 1024
    );
    let per_workspace_kib = rss_after.saturating_sub(rss_before) as f64 / WORKSPACES as f64;
    println!("| resident memory per idle workspace | {per_workspace_kib:.0} KiB |");
    println!("| file descriptors before / after | {fds_before} / {fds_after} |");
    let per_workspace_fds = fds_after.saturating_sub(fds_before) as f64 / WORKSPACES as f64;
    println!("| file descriptors per idle workspace | {per_workspace_fds:.3} |");
    let mut report = common::Report::new("idle");
    report.value("active idle workspaces", live as f64, "workspaces");
    report.ratio(
        "resident KiB per idle workspace",
        per_workspace_kib,
        Some(("<=", 256.0)),
    );
    // Not zero: the runtime and the database pool open a few descriptors
    // of their own while 2,000 workspaces start. Held per workspace, the
    // figure would be 1 or more.
    report.ratio(
        "file descriptors per idle workspace",
        per_workspace_fds,
        Some(("<=", 0.01)),
    );
    report.write();
    server.shutdown().await.expect("shutdown");
}
