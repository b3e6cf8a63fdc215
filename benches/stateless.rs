//! Why a live workspace: the actor against the stateless way, on the same
//! 2,000-file, 20 MB project, in one run over a real server on loopback.
//!
//! - **read / write through the actor**: `read_file` / `write_file` of a
//!   1 KiB file over WebSocket, the workspace already active;
//! - **stateless read / write**: what a stateless service would do for the
//!   same operation: fetch the latest snapshot from the store, unpack it into
//!   a temp dir, read (or write, repack and store a new version);
//! - **cold activation**: connecting to a branch whose workspace is not
//!   active (claim, fetch, unpack, open, welcome), next to fetching the same
//!   snapshot and extracting it with the system `tar`.
//!
//! Run: `cargo bench --bench stateless` (SQLite; `DATABASE_URL` for
//! Postgres; `BENCH_WORKSPACE_DIR` for where working copies go).

use std::io::Write;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use branchd::client::Client;
use branchd::protocol::Op;
use branchd::storage::{NewSnapshot, WorkspaceKey};
use branchd::workspace::snapshot;

mod common;
use common::{Stats, generated_project};

fn median(samples: &mut [Duration]) -> Duration {
    samples.sort();
    samples[samples.len() / 2]
}

#[tokio::main]
async fn main() {
    let work_root = std::env::var("BENCH_WORKSPACE_DIR")
        .map(std::path::PathBuf::from)
        .unwrap_or_else(|_| std::env::temp_dir().join("branchd-bench"));
    std::fs::create_dir_all(&work_root).expect("work root");
    let (server, base, token, project, _data) = common::bench_server(Some(work_root.clone())).await;
    let store = server.store().clone();
    let blob = generated_project(&work_root);
    let size = blob.len();
    let fresh = |name: &str, data: Vec<u8>| {
        let store = store.clone();
        let key = WorkspaceKey::new(project, name);
        async move {
            store
                .create_branch(
                    &key,
                    NewSnapshot {
                        data,
                        author: None,
                        journal_seq: 0,
                        keep: 3,
                    },
                )
                .await
                .expect("branch");
            key
        }
    };
    fresh("live", blob.clone()).await;
    let cold_source = blob.clone();

    // The actor way: one live workspace, a 1 KiB file.
    let client = Client::connect(&base, &token, project, "live")
        .await
        .expect("client");
    let small = vec![b'x'; 1024];
    let write = |path: &str| Op::WriteFile {
        path: path.into(),
        content: small.clone(),
        base_version: None,
        force: true,
    };
    client.request(write("small.txt")).await.expect("seed");
    let (mut actor_reads, mut actor_writes) = (Vec::new(), Vec::new());
    for _ in 0..300 {
        let started = Instant::now();
        client
            .request(Op::ReadFile {
                path: "small.txt".into(),
            })
            .await
            .expect("read");
        actor_reads.push(started.elapsed());
        let started = Instant::now();
        client.request(write("small.txt")).await.expect("write");
        actor_writes.push(started.elapsed());
    }

    // The stateless way, on a branch of its own with the same content.
    let stateless = fresh("stateless", blob).await;
    let (mut stateless_reads, mut stateless_writes) = (Vec::new(), Vec::new());
    for i in 0..10 {
        let started = Instant::now();
        let snap = store
            .latest_snapshot(&stateless)
            .await
            .expect("fetch")
            .expect("snapshot");
        let dir = tempfile::tempdir_in(&work_root).expect("dir");
        snapshot::unpack(&snap.data, dir.path(), 1 << 31).expect("unpack");
        let _ = std::fs::read(dir.path().join("part00/file0000.rhai")).expect("read");
        drop(dir);
        stateless_reads.push(started.elapsed());

        let started = Instant::now();
        let snap = store
            .latest_snapshot(&stateless)
            .await
            .expect("fetch")
            .expect("snapshot");
        let dir = tempfile::tempdir_in(&work_root).expect("dir");
        snapshot::unpack(&snap.data, dir.path(), 1 << 31).expect("unpack");
        std::fs::write(dir.path().join("small.txt"), format!("{i}").repeat(1024)).expect("write");
        let packed = snapshot::pack(dir.path()).expect("pack");
        store
            .put_snapshot(
                &stateless,
                NewSnapshot {
                    data: packed,
                    author: None,
                    journal_seq: 0,
                    keep: 3,
                },
                None,
            )
            .await
            .expect("store");
        drop(dir);
        stateless_writes.push(started.elapsed());
    }

    // Cold activation against fetch + system tar.
    let (mut cold, mut tar) = (Vec::new(), Vec::new());
    for i in 0..5 {
        let branch = format!("cold{i}");
        fresh(&branch, cold_source.clone()).await;
        let started = Instant::now();
        let first = Client::connect(&base, &token, project, &branch)
            .await
            .expect("cold connect");
        cold.push(started.elapsed());
        first.close().await;

        let started = Instant::now();
        let snap = store
            .latest_snapshot(&WorkspaceKey::new(project, branch.clone()))
            .await
            .expect("fetch")
            .expect("snapshot");
        let dir = tempfile::tempdir_in(&work_root).expect("dir");
        let mut child = Command::new("tar")
            .args(["-xzf", "-", "-C"])
            .arg(dir.path())
            .stdin(Stdio::piped())
            .spawn()
            .expect("system tar");
        child
            .stdin
            .take()
            .expect("stdin")
            .write_all(&snap.data)
            .expect("feed tar");
        assert!(child.wait().expect("tar").success());
        tar.push(started.elapsed());
    }

    let ratio = |a: &mut Vec<Duration>, b: &mut Vec<Duration>| {
        median(a).as_secs_f64() / median(b).as_secs_f64()
    };
    println!(
        "branchd stateless bench: 2,000 files / 20 MB ({:.1} MB snapshot), backend {:?}, working dirs in {}",
        size as f64 / 1e6,
        store.backend(),
        work_root.display()
    );
    println!(
        "| {:<38} | {:>6} | {:>12} | {:>12} |",
        "scenario", "n", "median", "p99"
    );
    println!("|{:-<40}|{:->8}|{:->14}|{:->14}|", "", "", "", "");
    let read_ratio = ratio(&mut stateless_reads, &mut actor_reads);
    let write_ratio = ratio(&mut stateless_writes, &mut actor_writes);
    let cold_ratio = ratio(&mut cold, &mut tar);
    let mut report = common::Report::new("stateless");
    report.timing("read_file 1 KiB, live actor (WS)", Stats(actor_reads));
    report.timing("read, stateless (fetch + unpack)", Stats(stateless_reads));
    report.timing("write_file 1 KiB, live actor (WS)", Stats(actor_writes));
    report.timing("write, stateless (+ pack + store)", Stats(stateless_writes));
    report.timing("cold activation (connect to welcome)", Stats(cold));
    report.timing("fetch + system tar -xzf", Stats(tar));
    println!();
    report.ratio("stateless / actor, reads", read_ratio, Some((">=", 1000.0)));
    report.ratio(
        "stateless / actor, writes",
        write_ratio,
        Some((">=", 100.0)),
    );
    report.ratio(
        "cold activation / (fetch + tar)",
        cold_ratio,
        Some(("<=", 1.3)),
    );
    report.write();
    server.shutdown().await.expect("shutdown");
}
