//! Nothing acknowledged is lost: a real `branchd` process is driven by
//! several clients writing as fast as they can and killed with SIGKILL at
//! random moments, again and again; after each restart every acknowledged
//! write must be there with its acknowledged content, and nothing that was
//! not acknowledged may appear half-applied. Runs on SQLite and on Postgres.

mod common;

use std::collections::HashMap;
use std::io::Write;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use branchd::client::Client;
use branchd::protocol::{Op, Reply};
use common::TestDb;
use common::process::{Served, create_project, login};

const KILLS: usize = 20;
const WRITERS: usize = 4;
const FILES_PER_WRITER: usize = 8;

/// What a path may hold: the last acknowledged content, or the content of
/// a write that was in flight when the process died (it may have landed).
#[derive(Default, Clone)]
struct Expected {
    acked: Option<Vec<u8>>,
    in_flight: Option<Vec<u8>>,
}

/// A small deterministic generator (the run is reproducible).
struct Lcg(u64);

impl Lcg {
    fn next(&mut self, below: u64) -> u64 {
        self.0 = self
            .0
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        (self.0 >> 33) % below
    }
}

fn content(kill: usize, writer: usize, n: usize) -> Vec<u8> {
    // Sizes vary so that a torn write would show as a wrong length.
    let mut text = format!("kill {kill} writer {writer} write {n}\n").into_bytes();
    text.extend(std::iter::repeat_n(
        b'a' + (n % 26) as u8,
        100 + (n * 37) % 3000,
    ));
    text
}

async fn writer(
    base: String,
    token: String,
    project: i64,
    kill: usize,
    id: usize,
    expected: Arc<Mutex<HashMap<String, Expected>>>,
    acked: Arc<Mutex<u64>>,
) {
    let Ok(client) = Client::connect(&base, &token, project, "main").await else {
        return;
    };
    for n in 0.. {
        let path = format!("w{id}/f{}.txt", n % FILES_PER_WRITER);
        let body = content(kill, id, n);
        if let Ok(mut map) = expected.lock() {
            map.entry(path.clone()).or_default().in_flight = Some(body.clone());
        }
        let op = Op::WriteFile {
            path: path.clone(),
            content: body.clone(),
            base_version: None,
            force: true,
        };
        match client.request(op).await {
            Ok(Reply::Written { .. }) => {
                if let Ok(mut map) = expected.lock() {
                    let entry = map.entry(path).or_default();
                    entry.acked = Some(body);
                    entry.in_flight = None;
                }
                if let Ok(mut count) = acked.lock() {
                    *count += 1;
                }
            }
            _ => return, // the process died under us
        }
    }
}

async fn kill_run(db: Option<TestDb>, label: &str) {
    let dir = tempfile::tempdir().expect("dir");
    let mut envs = vec![
        ("BRANCHD_SERVER_TAG", "kill-node".to_string()),
        ("BRANCHD_ADMIN_PASSWORD", "kill-test-password".to_string()),
        ("BRANCHD_LOG", "error".to_string()),
    ];
    if let Some(db) = &db {
        envs.push(("BRANCHD_DATABASE_URL", db.url.clone()));
    }
    let envs: Vec<(&str, &str)> = envs.iter().map(|(k, v)| (*k, v.as_str())).collect();
    let http = reqwest::Client::new();
    let mut served = Served::start_with(dir.path(), &envs);
    let token = login(&http, &served.base, "admin", "kill-test-password").await;
    let project = create_project(&http, &served.base, &token, "Durable").await;

    let expected: Arc<Mutex<HashMap<String, Expected>>> = Arc::default();
    let acked = Arc::new(Mutex::new(0u64));
    let mut random = Lcg(0x5eed);
    let mut verified = 0u64;
    for kill in 0..KILLS {
        let writers: Vec<_> = (0..WRITERS)
            .map(|id| {
                tokio::spawn(writer(
                    served.base.clone(),
                    token.clone(),
                    project,
                    kill,
                    id,
                    expected.clone(),
                    acked.clone(),
                ))
            })
            .collect();
        tokio::time::sleep(Duration::from_millis(150 + random.next(350))).await;
        served.kill();
        for task in writers {
            let _ = task.await;
        }

        served = Served::start_with(dir.path(), &envs);
        let client = Client::connect(&served.base, &token, project, "main")
            .await
            .expect("the restarted node serves the workspace");
        let snapshot: Vec<(String, Expected)> = expected
            .lock()
            .map(|map| map.iter().map(|(k, v)| (k.clone(), v.clone())).collect())
            .unwrap_or_default();
        for (path, want) in snapshot {
            let found = match client.request(Op::ReadFile { path: path.clone() }).await {
                Ok(Reply::File { content, .. }) => Some(content),
                _ => None,
            };
            let fine = found == want.acked || (found.is_some() && found == want.in_flight);
            assert!(
                fine,
                "{label}, after kill {kill}: {path} holds {:?} bytes; acknowledged {:?} bytes, in flight {:?} bytes",
                found.as_ref().map(Vec::len),
                want.acked.as_ref().map(Vec::len),
                want.in_flight.as_ref().map(Vec::len)
            );
            if want.acked.is_some() {
                verified += 1;
            }
            // What is there now is what the next round builds on.
            if let Ok(mut map) = expected.lock() {
                map.insert(
                    path,
                    Expected {
                        acked: found,
                        in_flight: None,
                    },
                );
            }
        }
        client.close().await;
    }
    served.terminate();
    let acknowledged = acked.lock().map(|c| *c).unwrap_or(0);
    // Written to the process's stderr directly (not through the test
    // harness's capture) so that the summary shows in every test run.
    let _ = writeln!(
        std::io::stderr(),
        "durability ({label}): kills {KILLS}, writes acknowledged {acknowledged}, writes verified {verified}, lost 0"
    );
    assert!(
        acknowledged > KILLS as u64 * 10,
        "the writers wrote too little to mean anything"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn acknowledged_writes_survive_repeated_kill_9_on_sqlite() {
    kill_run(None, "sqlite").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn acknowledged_writes_survive_repeated_kill_9_on_postgres() {
    let Some(db) =
        TestDb::postgres("acknowledged_writes_survive_repeated_kill_9_on_postgres").await
    else {
        return;
    };
    kill_run(Some(db), "postgres").await;
}
