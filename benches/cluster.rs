//! Cross-node figures, in one run: two real `branchd` processes on
//! loopback joined as a cluster over Postgres. A client on the owner node
//! and a client on the other node (whose requests are routed to the owner
//! through ractor_cluster) take turns reading the same 1 KiB file, and then
//! writing; the table shows both side by side and the ratio.
//!
//! Run: `DATABASE_URL=postgres://postgres@127.0.0.1:5432/test cargo bench --bench cluster`
//! (clustering needs Postgres; without `DATABASE_URL` the bench says so and
//! stops). It works in a schema of its own and drops it afterwards.

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use branchd::client::Client;
use branchd::protocol::{Op, Reply};

mod common;

const BIN: &str = env!("CARGO_BIN_EXE_branchd");
const PASSWORD: &str = "bench-admin-password";
const ROUNDS: usize = 3_000;

struct Node {
    child: Child,
    base: String,
}

impl Drop for Node {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free port")
}

fn start(url: &str, tag: &str, dir: &std::path::Path) -> Node {
    let mut child = Command::new(BIN)
        .args(["serve", "--listen", "127.0.0.1:0"])
        .env("BRANCHD_DATABASE_URL", url)
        .env("BRANCHD_SERVER_TAG", tag)
        .env("BRANCHD_DATA_DIR", dir)
        .env("BRANCHD_ADMIN_PASSWORD", PASSWORD)
        .env("BRANCHD_CLUSTER_COOKIE", "bench-cookie")
        .env("BRANCHD_CLUSTER_PORT", free_port().to_string())
        .env("BRANCHD_CLUSTER_BIND", "127.0.0.1")
        .env("BRANCHD_ADVERTISE_HOST", "127.0.0.1")
        .env("BRANCHD_MEMBERSHIP_INTERVAL", "250ms")
        .env("BRANCHD_LOG", "error")
        .stdout(Stdio::piped())
        .spawn()
        .expect("spawn branchd");
    let stdout = child.stdout.take().expect("stdout");
    let mut lines = BufReader::new(stdout).lines();
    let base = loop {
        let line = lines
            .next()
            .expect("branchd printed its address")
            .expect("a line");
        if let Some(addr) = line.strip_prefix("branchd: listening on ") {
            break addr.to_string();
        }
    };
    std::thread::spawn(move || for _ in lines {});
    Node { child, base }
}

async fn connect(base: &str, token: &str, project: i64) -> Client {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        match Client::connect(base, token, project, "main").await {
            Ok(client) => return client,
            Err(err) => {
                assert!(Instant::now() < deadline, "connecting to {base}: {err}");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let Some(base_url) = std::env::var("DATABASE_URL")
        .ok()
        .filter(|u| u.starts_with("postgres"))
    else {
        println!("cluster bench: set DATABASE_URL=postgres://... (clustering needs Postgres)");
        return;
    };
    let schema = common::PgSchema::create(&base_url, "bench_cluster").await;
    let url = schema.url.clone();

    let dirs = (
        tempfile::tempdir().expect("dir"),
        tempfile::tempdir().expect("dir"),
    );
    let owner = start(&url, "bench-owner", dirs.0.path());
    let other = start(&url, "bench-other", dirs.1.path());
    let (token, project) = common::admin_and_project(&owner.base, PASSWORD).await;

    let direct = connect(&owner.base, &token, project).await;
    assert_eq!(direct.welcome().owner, "bench-owner");
    // The other node must see the owner before its client is routed there.
    let routed = loop {
        let client = connect(&other.base, &token, project).await;
        if client.welcome().owner == "bench-owner" {
            break client;
        }
        client.close().await;
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    direct
        .request(Op::WriteFile {
            path: "bench.txt".into(),
            content: vec![b'x'; 1024],
            base_version: None,
            force: true,
        })
        .await
        .expect("write");

    let read = || Op::ReadFile {
        path: "bench.txt".into(),
    };
    // Warm up both paths, then alternate so that noise hits both alike.
    for _ in 0..200 {
        direct.request(read()).await.expect("read");
        routed.request(read()).await.expect("read");
    }
    let (mut on_owner, mut via_other) = (Vec::new(), Vec::new());
    for _ in 0..ROUNDS {
        let t = Instant::now();
        let Ok(Reply::File { .. }) = direct.request(read()).await else {
            panic!("read on the owner failed");
        };
        on_owner.push(t.elapsed());
        let t = Instant::now();
        let Ok(Reply::File { .. }) = routed.request(read()).await else {
            panic!("read via the other node failed");
        };
        via_other.push(t.elapsed());
    }
    let (mut w_owner, mut w_other) = (Vec::new(), Vec::new());
    for i in 0..ROUNDS / 3 {
        for (client, samples) in [(&direct, &mut w_owner), (&routed, &mut w_other)] {
            let t = Instant::now();
            client
                .request(Op::WriteFile {
                    path: format!("w/{i}.txt"),
                    content: vec![b'y'; 1024],
                    base_version: None,
                    force: true,
                })
                .await
                .expect("write");
            samples.push(t.elapsed());
        }
    }

    let (mut owner_reads, mut other_reads) = (common::Stats(on_owner), common::Stats(via_other));
    let (mut owner_writes, mut other_writes) = (common::Stats(w_owner), common::Stats(w_other));
    let read_ratio =
        other_reads.percentile(0.5).as_secs_f64() / owner_reads.percentile(0.5).as_secs_f64();
    let write_ratio =
        other_writes.percentile(0.5).as_secs_f64() / owner_writes.percentile(0.5).as_secs_f64();
    println!(
        "| {:<38} | {:>6} | {:>12} | {:>12} |",
        "2 nodes, Postgres, 1 KiB", "n", "median", "p99"
    );
    println!("|{}|", "-".repeat(78));
    let mut report = common::Report::new("cluster");
    report.timing("read_file on the owner", owner_reads);
    report.timing("read_file via the other node", other_reads);
    report.timing("write_file on the owner", owner_writes);
    report.timing("write_file via the other node", other_writes);
    report.ratio("cross-node read / owner read (p50)", read_ratio, None);
    report.ratio("cross-node write / owner write (p50)", write_ratio, None);
    report.write();

    drop(direct);
    drop(routed);
    drop(owner);
    drop(other);
    schema.drop_schema().await;
}
