//! Cross-node figures, in one run, of real `branchd` processes on loopback
//! joined as a cluster over Postgres:
//!
//! - two nodes: a client on the owner node and a client on the other node
//!   (whose requests are routed to the owner through ractor_cluster) take
//!   turns reading the same 1 KiB file, and then writing; the table shows
//!   both side by side and the ratio;
//! - failover, three nodes with **default** settings (lease 5 s): writers
//!   on the two other nodes write through the owner, the owner is killed
//!   with SIGKILL, and the writers reconnect (honouring `retry_after_ms`)
//!   until a surviving node serves them. Reported: kill to the first write
//!   served elsewhere (target: lease + 1 s) and the longest any connect
//!   attempt during the outage waited for an answer (target: 1.5 s).
//!
//! Run: `DATABASE_URL=postgres://postgres@127.0.0.1:5432/test cargo bench --bench cluster`
//! (clustering needs Postgres; without `DATABASE_URL` the bench says so and
//! stops). It works in a schema of its own and drops it afterwards.

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use branchd::client::{Client, ClientError};
use branchd::protocol::{Op, Reply};

mod common;

const BIN: &str = env!("CARGO_BIN_EXE_branchd");
const PASSWORD: &str = "bench-admin-password";
const ROUNDS: usize = 3_000;
/// Failover trials, each with three fresh nodes.
const FAILOVER_TRIALS: usize = 3;
/// The default lease, which the failover trials run with.
const DEFAULT_LEASE: Duration = Duration::from_secs(5);

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

/// Starts a node; `settings` are `BRANCHD_*` variables besides the ones
/// every node needs (the defaults apply to the rest).
fn start(url: &str, tag: &str, dir: &std::path::Path, settings: &[(&str, &str)]) -> Node {
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
        .envs(settings.iter().copied())
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
    let fast = [("BRANCHD_MEMBERSHIP_INTERVAL", "250ms")];
    let owner = start(&url, "bench-owner", dirs.0.path(), &fast);
    let other = start(&url, "bench-other", dirs.1.path(), &fast);
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

    drop(direct);
    drop(routed);
    drop(owner);
    drop(other);
    schema.drop_schema().await;

    let mut trials = Vec::new();
    for trial in 0..FAILOVER_TRIALS {
        trials.push(failover(&base_url, trial).await);
    }
    println!();
    println!(
        "| failover, 3 nodes, default settings (lease 5 s) | kill to first write elsewhere | longest connect answer | connects answered with retry_after_ms |"
    );
    println!("|---|---|---|---|");
    for (i, t) in trials.iter().enumerate() {
        println!(
            "| trial {} | {} ms | {} ms | {} |",
            i + 1,
            t.first_write.as_millis(),
            t.slowest_connect.as_millis(),
            t.hints
        );
    }
    let worst_write = trials
        .iter()
        .map(|t| t.first_write)
        .max()
        .unwrap_or_default();
    let worst_connect = trials
        .iter()
        .map(|t| t.slowest_connect)
        .max()
        .unwrap_or_default();
    let write_target = DEFAULT_LEASE + Duration::from_secs(1);
    println!(
        "failover: kill to first write elsewhere, worst of {FAILOVER_TRIALS}: {} ms (target <= {} ms)",
        worst_write.as_millis(),
        write_target.as_millis()
    );
    println!(
        "failover: longest connect answer during the outage, worst of {FAILOVER_TRIALS}: {} ms (target <= 1500 ms)",
        worst_connect.as_millis()
    );
    report.value(
        "failover (default lease 5 s): kill to first write elsewhere, worst",
        worst_write.as_millis() as f64,
        "ms",
    );
    report.value(
        "failover (default lease 5 s): longest connect answer during the outage, worst",
        worst_connect.as_millis() as f64,
        "ms",
    );
    report.write();
}

/// What one failover trial measured.
#[derive(Default)]
struct Outage {
    first_write: Duration,
    slowest_connect: Duration,
    hints: usize,
}

/// What the writers of a trial share.
struct Trial {
    bases: Vec<String>,
    token: String,
    project: i64,
    old_owner: String,
    killed: OnceLock<Instant>,
    first_write: OnceLock<Duration>,
    slowest_connect: Mutex<Duration>,
    hints: Mutex<usize>,
    stop: AtomicBool,
}

/// Three fresh nodes with default settings; writers on two of them write
/// through the third, which is then killed.
async fn failover(base_url: &str, trial: usize) -> Outage {
    let schema = common::PgSchema::create(base_url, "bench_failover").await;
    let dirs: Vec<_> = (0..3).map(|_| tempfile::tempdir().expect("dir")).collect();
    let tags: Vec<String> = (0..3).map(|i| format!("failover-{trial}-{i}")).collect();
    let mut nodes: Vec<Option<Node>> = (0..3)
        .map(|i| Some(start(&schema.url, &tags[i], dirs[i].path(), &[])))
        .collect();
    let base = |i: usize| nodes[i].as_ref().map(|n| n.base.clone()).expect("running");
    let (token, project) = common::admin_and_project(&base(0), PASSWORD).await;
    let on_owner = connect(&base(0), &token, project).await;
    assert_eq!(on_owner.welcome().owner, tags[0]);
    // Both other nodes must be linked to the owner before the kill.
    for i in [1, 2] {
        loop {
            let client = connect(&base(i), &token, project).await;
            let routed = client.welcome().owner == tags[0];
            client.close().await;
            if routed {
                break;
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }
    let shared = Arc::new(Trial {
        bases: vec![base(1), base(2)],
        token: token.clone(),
        project,
        old_owner: tags[0].clone(),
        killed: OnceLock::new(),
        first_write: OnceLock::new(),
        slowest_connect: Mutex::new(Duration::ZERO),
        hints: Mutex::new(0),
        stop: AtomicBool::new(false),
    });
    let writers: Vec<_> = (0..4)
        .map(|id| tokio::spawn(failover_writer(shared.clone(), id)))
        .collect();
    tokio::time::sleep(Duration::from_secs(1)).await;
    drop(on_owner);
    nodes[0] = None; // SIGKILL
    let _ = shared.killed.set(Instant::now());
    let deadline = Instant::now() + Duration::from_secs(60);
    while shared.first_write.get().is_none() {
        assert!(
            Instant::now() < deadline,
            "no write served elsewhere within 60 s of the kill"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    shared.stop.store(true, Ordering::Relaxed);
    for writer in writers {
        let _ = writer.await;
    }
    let outage = Outage {
        first_write: shared.first_write.get().copied().unwrap_or_default(),
        slowest_connect: *shared.slowest_connect.lock().expect("lock"),
        hints: *shared.hints.lock().expect("lock"),
    };
    drop(nodes);
    schema.drop_schema().await;
    outage
}

/// Writes until told to stop; reconnects on any failure, to the two nodes
/// in turn, waiting `retry_after_ms` when told to.
async fn failover_writer(shared: Arc<Trial>, id: usize) {
    let mut turn = id;
    let mut n = 0usize;
    while !shared.stop.load(Ordering::Relaxed) {
        let base = &shared.bases[turn % shared.bases.len()];
        turn += 1;
        let during_outage = shared.killed.get().is_some() && shared.first_write.get().is_none();
        let asked = Instant::now();
        let connected = Client::connect(base, &shared.token, shared.project, "main").await;
        if during_outage {
            let mut slowest = shared.slowest_connect.lock().expect("lock");
            *slowest = (*slowest).max(asked.elapsed());
        }
        let client = match connected {
            Ok(client) => client,
            Err(ClientError::Op(err)) if err.retry_after_ms.is_some() => {
                *shared.hints.lock().expect("lock") += 1;
                let wait = err.retry_after_ms.unwrap_or_default();
                tokio::time::sleep(Duration::from_millis(wait)).await;
                continue;
            }
            Err(_) => {
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        while !shared.stop.load(Ordering::Relaxed) {
            let written = client
                .request(Op::WriteFile {
                    path: format!("w{id}/{n:05}.txt"),
                    content: vec![b'z'; 256],
                    base_version: None,
                    force: true,
                })
                .await;
            if written.is_err() {
                break;
            }
            n += 1;
            if client.welcome().owner != shared.old_owner
                && let Some(killed) = shared.killed.get()
            {
                let _ = shared.first_write.set(killed.elapsed());
            }
        }
    }
}
