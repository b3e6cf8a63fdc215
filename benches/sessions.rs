//! What a connect and a disconnect cost the store: recording a session row
//! (`attach_session`) and removing it (`detach_session`) on a claimed key,
//! one client at a time and 16 clients of one key at once (where writes to
//! the same key queue behind each other).
//!
//! Run: `cargo bench --bench sessions` (SQLite in a temp dir; set
//! `DATABASE_URL=postgres://...` for Postgres, in a schema of its own that
//! is dropped afterwards).

use std::sync::Arc;

use branchd::storage::{self, NewSnapshot, NewUser, Store, WorkspaceKey, WsSession};

mod common;
use common::{Report, Stats, timed};

const PAIRS: usize = 2_000;
const CONCURRENT: usize = 16;
const PAIRS_EACH: usize = 200;

fn row(id: String, user_id: i64, key: &WorkspaceKey) -> WsSession {
    WsSession {
        id,
        user_id,
        key: key.clone(),
        server_tag: "bench-node".into(),
        connected_at: 0,
    }
}

async fn attach_and_detach(store: &dyn Store, session: &WsSession) {
    store.attach_session(session).await.expect("attach");
    store.detach_session(&session.id).await.expect("detach");
}

#[tokio::main]
async fn main() {
    let data = tempfile::tempdir().expect("data");
    let schema = match std::env::var("DATABASE_URL") {
        Ok(base) if base.starts_with("postgres") => {
            Some(common::PgSchema::create(&base, "bench_sessions").await)
        }
        _ => None,
    };
    let url = schema.as_ref().map_or_else(
        || storage::sqlite::default_url(data.path()),
        |schema| schema.url.clone(),
    );
    let store: Arc<dyn Store> = storage::open(&url, 8).await.expect("store");
    let user = store
        .create_user(NewUser {
            username: "bench".into(),
            display_name: "Bench".into(),
            email: "bench@example.com".into(),
            password_hash: "x".into(),
            is_admin: false,
        })
        .await
        .expect("user")
        .id;
    let first = NewSnapshot {
        data: b"bench".to_vec(),
        author: None,
        journal_seq: 0,
        keep: 1,
    };
    let (project, _) = store
        .create_project("bench", user, "main", first)
        .await
        .expect("project");
    let key = WorkspaceKey::new(project.id, "main");
    store
        .register_node("bench-node", None, None)
        .await
        .expect("node");
    store
        .claim(&key, "bench-node", 60_000)
        .await
        .expect("claim");

    println!(
        "branchd sessions bench: {:?}, attach_session + detach_session on one claimed key",
        store.backend()
    );
    println!(
        "| {:<38} | {:>6} | {:>12} | {:>12} |",
        "scenario", "n", "median", "p99"
    );
    println!(
        "|{}|{}|{}|{}|",
        "-".repeat(40),
        "-".repeat(8),
        "-".repeat(14),
        "-".repeat(14)
    );
    let mut report = Report::new("sessions");

    let one = timed(PAIRS, |i| {
        let store = store.clone();
        let session = row(format!("one{i}"), user, &key);
        async move { attach_and_detach(store.as_ref(), &session).await }
    })
    .await;
    report.timing("connect + disconnect, one client", one);

    let clients: Vec<_> = (0..CONCURRENT)
        .map(|client| {
            let store = store.clone();
            let key = key.clone();
            tokio::spawn(async move {
                timed(PAIRS_EACH, |i| {
                    let store = store.clone();
                    let session = row(format!("c{client}-{i}"), user, &key);
                    async move { attach_and_detach(store.as_ref(), &session).await }
                })
                .await
                .0
            })
        })
        .collect();
    let mut all = Vec::new();
    for client in clients {
        all.extend(client.await.expect("client task"));
    }
    report.timing(
        &format!("connect + disconnect, {CONCURRENT} clients at once"),
        Stats(all),
    );
    report.write();

    drop(store);
    if let Some(schema) = schema {
        schema.drop_schema().await;
    }
}
