//! Workspace actor figures on a generated 2,000-file, 20 MB project:
//! activation (snapshot fetched from the store, unpacked, repository
//! opened), small-file read and write latency through the actor, tree
//! listing and save.
//!
//! Run: `cargo bench --bench workspace` (SQLite in a temp dir; set
//! `DATABASE_URL=postgres://...` to use Postgres, and
//! `BENCH_WORKSPACE_DIR` to unpack somewhere other than the temp dir).

use std::sync::Arc;
use std::time::{Duration, Instant};

use branchd::config::Config;
use branchd::protocol::{Op, Reply};
use branchd::storage::{self, NewSnapshot, NewUser, Role, Store, WorkspaceKey};
use branchd::workspace::repo::GitAuthor;
use branchd::workspace::{SessionInfo, Workspace, WorkspaceArgs, WorkspaceSettings, snapshot};

const FILES: usize = 2_000;
const FILE_BYTES: usize = 10_000;

/// Text-like content (so it compresses like source files do), distinct per file.
fn generated_file(index: usize) -> Vec<u8> {
    const WORDS: [&str; 16] = [
        "cube",
        "sphere",
        "translate",
        "rotate",
        "let",
        "fn",
        "union",
        "difference",
        "width",
        "height",
        "radius",
        "gear",
        "tooth",
        "shaft",
        "bore",
        "import",
    ];
    let mut state = (index as u64 + 1).wrapping_mul(0x9E37_79B9_7F4A_7C15);
    let mut out = Vec::with_capacity(FILE_BYTES);
    while out.len() < FILE_BYTES {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        out.extend_from_slice(WORDS[(state % 16) as usize].as_bytes());
        out.push(if state.is_multiple_of(11) {
            b'\n'
        } else {
            b' '
        });
    }
    out.truncate(FILE_BYTES);
    out
}

/// A committed repository of FILES files, packed.
fn generated_project(scratch: &std::path::Path) -> Vec<u8> {
    let dir = tempfile::tempdir_in(scratch).expect("dir");
    let author = GitAuthor {
        name: "Bench".into(),
        email: "bench@example.com".into(),
    };
    branchd::workspace::repo::init_repository(dir.path(), "main", "# Bench\n", &author)
        .expect("init");
    for i in 0..FILES {
        let path = dir
            .path()
            .join(format!("part{:02}/file{i:04}.rhai", i % 40));
        std::fs::create_dir_all(path.parent().expect("parent")).expect("mkdir");
        std::fs::write(path, generated_file(i)).expect("write");
    }
    let repo = git2::Repository::open(dir.path()).expect("open");
    let mut index = repo.index().expect("index");
    index
        .add_all(["*"], git2::IndexAddOption::DEFAULT, None)
        .expect("add");
    index.write().expect("index write");
    let tree = repo
        .find_tree(index.write_tree().expect("tree"))
        .expect("tree");
    let head = repo.head().and_then(|h| h.peel_to_commit()).expect("head");
    let signature = git2::Signature::now("Bench", "bench@example.com").expect("sig");
    repo.commit(
        Some("HEAD"),
        &signature,
        &signature,
        "Parts",
        &tree,
        &[&head],
    )
    .expect("commit");
    snapshot::pack(dir.path()).expect("pack")
}

struct Stats(Vec<Duration>);

impl Stats {
    fn percentile(&mut self, p: f64) -> Duration {
        self.0.sort();
        let rank = ((self.0.len() as f64 - 1.0) * p).round() as usize;
        self.0[rank]
    }

    fn row(mut self, name: &str) {
        let n = self.0.len();
        let median = self.percentile(0.5);
        let p99 = self.percentile(0.99);
        println!(
            "| {name:<38} | {n:>6} | {:>12} | {:>12} |",
            fmt(median),
            fmt(p99)
        );
    }
}

fn fmt(d: Duration) -> String {
    let micros = d.as_secs_f64() * 1e6;
    if micros < 1_000.0 {
        format!("{micros:.1} µs")
    } else {
        format!("{:.2} ms", micros / 1_000.0)
    }
}

async fn timed<F, T>(times: usize, mut run: impl FnMut(usize) -> F) -> Stats
where
    F: std::future::Future<Output = T>,
{
    let mut samples = Vec::with_capacity(times);
    for i in 0..times {
        let started = Instant::now();
        run(i).await;
        samples.push(started.elapsed());
    }
    Stats(samples)
}

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

    let (mut activating, mut stopping) = (Vec::new(), Vec::new());
    for _ in 0..10 {
        let started = Instant::now();
        let (workspace, _) = Workspace::start(args()).await.expect("activate");
        activating.push(started.elapsed());
        let started = Instant::now();
        workspace.stop().await;
        stopping.push(started.elapsed());
    }
    Stats(activating).row("activation (fetch + unpack + open)");
    Stats(stopping).row("stop (remove the working dir)");

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
        .row("list_tree, 2,000 files (cold versions)");
    timed(20, |_| workspace.op(&me, Op::ListTree { path: None }))
        .await
        .row("list_tree, 2,000 files (warm)");
    timed(10_000, |_| {
        workspace.op(
            &me,
            Op::ReadFile {
                path: "small.txt".into(),
            },
        )
    })
    .await
    .row("read_file 1 KiB");
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
    .row("write_file 1 KiB (journalled)");

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
    Stats(plain).row("file write without journal (no actor)");
    let record =
        branchd::workspace::journal::encode_write("written/x.txt", &small).expect("record");
    timed(2_000, |_| store.append_journal(&key, &fence, &record))
        .await
        .row("journal append alone (1 KiB record)");
    let dir = workspace.info().await.expect("info").dir;
    timed(5, |_| {
        let dir = dir.clone();
        async move { tokio::task::spawn_blocking(move || snapshot::pack(&dir)).await }
    })
    .await
    .row("pack only (tar + gzip)");
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
    .row("save (pack + store)");
    workspace.stop().await;
    store.delete_project(project.id).await.expect("clean up");
}
