//! Many idle sockets on one node: open 2,000 WebSockets (20 on each of 100
//! branches), leave them idle, and report resident memory per socket and
//! the CPU the node spends keeping them alive (pings and pongs) over an
//! idle window. This is how the per-socket ping machinery is chosen.
//!
//! Run: `BRANCHD_PING_INTERVAL=1s cargo bench --bench sockets` (a short
//! interval makes the pinging cost visible; SQLite, `DATABASE_URL` for
//! Postgres). Client and server share the process: both variants pay the
//! same client cost, so differences between runs are the server's.

use std::time::{Duration, Instant};

use branchd::client::Client;
use branchd::storage::{NewSnapshot, WorkspaceKey};
use branchd::workspace::repo::GitAuthor;

mod common;

const BRANCHES: usize = 100;
const PER_BRANCH: usize = 20;
const IDLE: Duration = Duration::from_secs(20);

/// CPU time (user + system) this process has used, from /proc.
fn cpu_time() -> Duration {
    let ticks = std::fs::read_to_string("/proc/self/stat")
        .ok()
        .and_then(|stat| {
            // Fields after the command name (which may hold spaces).
            let rest = stat
                .rsplit_once(')')?
                .1
                .split_whitespace()
                .collect::<Vec<_>>();
            let user: u64 = rest.get(11)?.parse().ok()?;
            let system: u64 = rest.get(12)?.parse().ok()?;
            Some(user + system)
        })
        .unwrap_or(0);
    // Linux reports in USER_HZ, 100 per second on every supported platform.
    Duration::from_millis(ticks * 10)
}

#[tokio::main]
async fn main() {
    let work_root = std::env::temp_dir().join("branchd-bench-sockets");
    std::fs::create_dir_all(&work_root).expect("work root");
    let (server, base, token, project, _data) = common::bench_server(Some(work_root.clone())).await;
    let store = server.store().clone();
    let author = GitAuthor {
        name: "Bench".into(),
        email: "bench@example.com".into(),
    };
    let small = branchd::workspace::first_snapshot(&work_root, "main", "# small\n", &author)
        .expect("small snapshot");
    for b in 0..BRANCHES {
        let key = WorkspaceKey::new(project, format!("s{b}"));
        let snapshot = NewSnapshot {
            data: small.clone(),
            author: None,
            journal_seq: 0,
            keep: 1,
        };
        store.create_branch(&key, snapshot).await.expect("branch");
    }
    // One socket per branch first, so that workspace activation is not
    // counted as socket memory.
    let mut clients = Vec::with_capacity(BRANCHES * PER_BRANCH);
    for b in 0..BRANCHES {
        let client = Client::connect(&base, &token, project, &format!("s{b}"))
            .await
            .expect("connect");
        clients.push(client);
    }
    tokio::time::sleep(Duration::from_secs(2)).await;
    let rss_before = common::resident_kib();
    let started = Instant::now();
    for _ in 1..PER_BRANCH {
        for b in 0..BRANCHES {
            let client = Client::connect(&base, &token, project, &format!("s{b}"))
                .await
                .expect("connect");
            clients.push(client);
        }
    }
    let opened = clients.len() - BRANCHES;
    let connect_time = started.elapsed();
    tokio::time::sleep(Duration::from_secs(2)).await;
    let rss_after = common::resident_kib();

    let cpu_before = cpu_time();
    tokio::time::sleep(IDLE).await;
    let cpu_idle = cpu_time().saturating_sub(cpu_before);

    let per_socket_kib = rss_after.saturating_sub(rss_before) as f64 / opened as f64;
    let cpu_share = cpu_idle.as_secs_f64() / IDLE.as_secs_f64();
    println!(
        "branchd sockets bench: {} sockets on {BRANCHES} branches, {opened} measured, opened in {:.1} s",
        clients.len(),
        connect_time.as_secs_f64()
    );
    println!("| measure | value |");
    println!("|---|---|");
    println!(
        "| resident memory before / after | {} MiB / {} MiB |",
        rss_before / 1024,
        rss_after / 1024
    );
    println!("| resident memory per idle socket | {per_socket_kib:.1} KiB |");
    println!(
        "| CPU over {} s idle (server and clients) | {} ms ({:.2}% of one core) |",
        IDLE.as_secs(),
        cpu_idle.as_millis(),
        cpu_share * 100.0
    );
    let mut report = common::Report::new("sockets");
    report.value("resident KiB per idle socket", per_socket_kib, "KiB");
    report.value("CPU share while idle", cpu_share * 100.0, "% of a core");
    report.write();
    for client in clients {
        client.close().await;
    }
    server.shutdown().await.expect("shutdown");
}
