//! Replay does what the live path did: a random sequence of ops goes
//! through a live workspace (with saves in between, so recovery starts
//! from a snapshot and replays the journal's tail), the actor is killed
//! without saving, and the workspace activated again from snapshot +
//! journal must have the very same working tree: every file byte for
//! byte, every directory, the same HEAD and the same history.
//!
//! The sequence comes from a seeded generator; a failure names its seed
//! and the op that was last applied, so it can be replayed exactly.

mod common;

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;

use branchd::protocol::{ErrorCode, Op, Reply};
use branchd::storage::{Role, Store, WorkspaceKey};
use branchd::workspace::{Workspace, WorkspaceArgs, WorkspaceMsg, WorkspaceSettings};
use common::{Setup, TestDb, own, session};
use tokio::sync::mpsc;

on_both_backends!(a_killed_workspace_replays_random_ops_to_the_same_tree);

/// xorshift64*: small, seeded, and the same on every machine.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }

    fn pick<'a>(&mut self, items: &[&'a str]) -> &'a str {
        items[self.below(items.len())]
    }
}

const PATHS: &[&str] = &[
    "a.txt",
    "b.rhai",
    "dir/c.txt",
    "dir/sub/d.bin",
    "other/e.txt",
    "README.md",
];
const DIRS: &[&str] = &["dir", "dir/sub", "other", "empty", "empty/deeper"];

/// One random op; writes name the current version (or force) so most of
/// them land, and some are refused on purpose (stale, missing).
fn random_op(rng: &mut Rng, versions: &BTreeMap<String, String>) -> Op {
    match rng.below(12) {
        0..=4 => {
            let path = rng.pick(PATHS).to_string();
            let len = rng.below(300);
            let content: Vec<u8> = (0..len).map(|_| rng.next() as u8).collect();
            let (base_version, force) = match rng.below(4) {
                0 => (None, true),
                1 => (
                    Some("0000000000000000000000000000000000000000".into()),
                    false,
                ),
                _ => (versions.get(&path).cloned(), false),
            };
            Op::WriteFile {
                path,
                content,
                base_version,
                force,
            }
        }
        5 => {
            let among = if rng.below(2) == 0 { PATHS } else { DIRS };
            Op::DeletePath {
                path: rng.pick(among).into(),
                base_version: None,
            }
        }
        6 => {
            let among = if rng.below(2) == 0 { PATHS } else { DIRS };
            let from = rng.pick(among);
            let to = rng.pick(&["moved.txt", "dir/moved.txt", "elsewhere", "dir/sub/x"]);
            Op::RenamePath {
                from: from.into(),
                to: to.into(),
            }
        }
        7 => Op::MakeDir {
            path: rng.pick(DIRS).into(),
        },
        8 | 9 => Op::GitCommit {
            message: format!("change {}", rng.next() % 1000),
            paths: (rng.below(3) == 0).then(|| vec![rng.pick(PATHS).to_string()]),
        },
        10 => Op::Save,
        _ => Op::Lock {
            ttl_ms: Some(60_000),
        },
    }
}

/// What a user could ever see of a working copy: every path below the
/// root (`.git` aside) with a file's content, and git's HEAD and history.
#[derive(Debug, PartialEq, Eq)]
struct Tree {
    entries: BTreeMap<String, Option<Vec<u8>>>,
    head: String,
    history: Vec<String>,
}

fn read_tree(root: &Path) -> Tree {
    fn walk(root: &Path, dir: &Path, into: &mut BTreeMap<String, Option<Vec<u8>>>) {
        let mut items: Vec<_> = std::fs::read_dir(dir)
            .expect("read dir")
            .map(|e| e.expect("dir entry"))
            .collect();
        items.sort_by_key(|e| e.file_name());
        for item in items {
            let path = item.path();
            let rel = path
                .strip_prefix(root)
                .expect("below root")
                .to_string_lossy()
                .into_owned();
            if rel == ".git" {
                continue;
            }
            if item.file_type().expect("file type").is_dir() {
                into.insert(rel, None);
                walk(root, &path, into);
            } else {
                into.insert(rel, Some(std::fs::read(&path).expect("read file")));
            }
        }
    }
    let mut entries = BTreeMap::new();
    walk(root, root, &mut entries);
    let repo = git2::Repository::open(root).expect("a repository");
    let head = repo
        .head()
        .expect("HEAD")
        .peel_to_commit()
        .expect("a commit");
    let mut walk_history = repo.revwalk().expect("revwalk");
    walk_history.push(head.id()).expect("push HEAD");
    Tree {
        head: head.id().to_string(),
        history: walk_history
            .map(|id| id.expect("commit id").to_string())
            .collect(),
        entries,
    }
}

async fn start(
    store: &Arc<dyn Store>,
    settings: &WorkspaceSettings,
    key: &WorkspaceKey,
) -> Workspace {
    let fence = own(store.as_ref(), key).await;
    let (workspace, _) = Workspace::start(WorkspaceArgs {
        key: key.clone(),
        store: store.clone(),
        settings: settings.clone(),
        fence,
    })
    .await
    .expect("the workspace activates");
    workspace
}

async fn a_killed_workspace_replays_random_ops_to_the_same_tree(db: TestDb) {
    let setup = Setup::new(db, |config| {
        // No autosave in the middle: the test decides when saves happen.
        config.autosave_quiet = std::time::Duration::from_secs(3600);
        config.autosave_max = std::time::Duration::from_secs(3600);
    })
    .await;
    let settings = WorkspaceSettings::from_config(&setup.config);
    let seeds = [0x5eed_0001_u64, 0x5eed_0002, 0x5eed_0003];
    for (round, seed) in seeds.into_iter().enumerate() {
        let branch = format!("replay-{round}");
        let key = WorkspaceKey::new(setup.key.project_id, branch.clone());
        {
            // Each seed on a branch of its own, from main's HEAD.
            let main = start(&setup.store, &settings, &setup.key).await;
            let (events, _keep) = mpsc::channel(1024);
            main.attach(session("maker", Role::Editor), events)
                .await
                .expect("attach to main");
            main.op(&"maker".into(), Op::GitCreateBranch { name: branch })
                .await
                .expect("branch created");
            main.stop().await;
        }
        let live = start(&setup.store, &settings, &key).await;
        let (events, mut incoming) = mpsc::channel(1024);
        let me = "writer".to_string();
        live.attach(session(&me, Role::Editor), events)
            .await
            .expect("attach");
        let drain = tokio::spawn(async move { while incoming.recv().await.is_some() {} });

        let mut rng = Rng(seed);
        let mut versions = BTreeMap::new();
        let (mut landed, mut refused) = (0, 0);
        for step in 0..80 {
            let op = random_op(&mut rng, &versions);
            let name = op.name();
            match live.op(&me, op).await {
                Ok(Reply::Written { path, version }) => {
                    versions.insert(path, version);
                    landed += 1;
                }
                Ok(_) => landed += 1,
                Err(err) => {
                    assert!(
                        matches!(
                            err.code,
                            ErrorCode::NotFound | ErrorCode::Conflict | ErrorCode::BadRequest
                        ),
                        "seed {seed:#x} step {step}: {name} failed unexpectedly: {err:?}"
                    );
                    refused += 1;
                }
            }
        }
        assert!(
            landed > 30 && refused > 0,
            "seed {seed:#x}: the sequence should mix changes and refusals ({landed} landed, {refused} refused)"
        );
        let info = live.info().await.expect("info");
        let before = read_tree(&info.dir);

        // Killed with no save: everything after the last save is only in the journal.
        live.actor()
            .cast(WorkspaceMsg::Panic)
            .expect("the kill is delivered");
        ractor_gone(&info.dir).await;
        drain.abort();

        let replayed = start(&setup.store, &settings, &key).await;
        let after = read_tree(&replayed.info().await.expect("info").dir);
        assert_eq!(
            after, before,
            "seed {seed:#x}: the replayed working copy differs from the live one"
        );
        replayed.stop().await;
    }
}

/// Waits until the killed actor's working dir is gone (its state dropped).
async fn ractor_gone(dir: &Path) {
    common::eventually("the killed workspace's dir is removed", || async {
        !dir.exists()
    })
    .await;
}
