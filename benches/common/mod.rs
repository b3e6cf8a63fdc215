//! What the benchmarks share: the generated 20 MB project and the
//! percentile table.

#![allow(dead_code)] // each benchmark uses a different part of this module

use std::time::{Duration, Instant};

use branchd::workspace::repo::GitAuthor;
use branchd::workspace::snapshot;

pub const FILES: usize = 2_000;
pub const FILE_BYTES: usize = 10_000;

/// Text-like content (so it compresses like source files do), distinct per file.
pub fn generated_file(index: usize) -> Vec<u8> {
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
pub fn generated_project(scratch: &std::path::Path) -> Vec<u8> {
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

pub struct Stats(pub Vec<Duration>);

impl Stats {
    pub fn percentile(&mut self, p: f64) -> Duration {
        self.0.sort();
        let rank = ((self.0.len() as f64 - 1.0) * p).round() as usize;
        self.0[rank]
    }

    pub fn row(mut self, name: &str) {
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

impl Stats {
    /// Prints the row and records it in `report`.
    pub fn row_in(self, report: &mut Report, name: &str) {
        report.timing(name, self);
    }
}

pub fn fmt(d: Duration) -> String {
    let micros = d.as_secs_f64() * 1e6;
    if micros < 1_000.0 {
        format!("{micros:.1} µs")
    } else {
        format!("{:.2} ms", micros / 1_000.0)
    }
}

pub async fn timed<F, T>(times: usize, mut run: impl FnMut(usize) -> F) -> Stats
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

/// A server for a benchmark: in this process, on loopback, SQLite in a temp
/// dir (or `DATABASE_URL`), working copies in `workspace_dir`; logged in as
/// the admin, with one new project. Returns the server, its base URL, the
/// admin token, the project id and the data dir (keep it alive).
pub async fn bench_server(
    workspace_dir: Option<std::path::PathBuf>,
) -> (
    branchd::server::Server,
    String,
    String,
    i64,
    tempfile::TempDir,
) {
    const PASSWORD: &str = "bench-admin-password";
    let data = tempfile::tempdir().expect("data dir");
    let mut config = branchd::config::Config::from_env().expect("config");
    config.listen = "127.0.0.1:0".parse().expect("addr");
    config.database.data_dir = data.path().to_path_buf();
    config.database.database_url = std::env::var("DATABASE_URL").ok();
    config.workspace_dir = workspace_dir;
    config.admin_password = Some(PASSWORD.into());
    config.server_tag = Some(format!("bench-{}", std::process::id()));
    let server = branchd::server::Server::start(config)
        .await
        .expect("server");
    let base = format!("http://{}", server.local_addr());
    let (token, project) = admin_and_project(&base, PASSWORD).await;
    (server, base, token, project, data)
}

/// Logs in as `admin` on the server at `base` and creates a project:
/// (token, project id).
pub async fn admin_and_project(base: &str, password: &str) -> (String, i64) {
    let http = reqwest::Client::new();
    let login: serde_json::Value = http
        .post(format!("{base}/api/auth/login"))
        .json(&serde_json::json!({"username": "admin", "password": password}))
        .send()
        .await
        .expect("login")
        .json()
        .await
        .expect("json");
    let token = login["token"].as_str().expect("token").to_string();
    let project: serde_json::Value = http
        .post(format!("{base}/api/projects"))
        .bearer_auth(&token)
        .json(&serde_json::json!({"name": "bench"}))
        .send()
        .await
        .expect("project")
        .json()
        .await
        .expect("json");
    (token, project["id"].as_i64().expect("id"))
}

/// One benchmark's results as JSON, for `benches/run.sh`, which runs every
/// benchmark and merges these files into one table and one JSON file. The
/// file goes to `$BENCH_RESULTS_DIR/<bench>.json` (nothing is written when
/// the variable is unset, so a plain `cargo bench` stays as it was).
pub struct Report {
    bench: &'static str,
    entries: Vec<serde_json::Value>,
}

impl Report {
    pub fn new(bench: &'static str) -> Report {
        Report {
            bench,
            entries: Vec::new(),
        }
    }

    /// A timed scenario: prints its table row and records it.
    pub fn timing(&mut self, scenario: &str, mut stats: Stats) {
        self.record(scenario, &mut stats);
        stats.row(scenario);
    }

    /// Records a timed scenario without printing it (for benchmarks with
    /// tables of their own).
    pub fn record(&mut self, scenario: &str, stats: &mut Stats) {
        let n = stats.0.len();
        let (median, p99) = (stats.percentile(0.5), stats.percentile(0.99));
        self.entries.push(serde_json::json!({
            "kind": "timing",
            "scenario": scenario,
            "n": n,
            "median_us": median.as_secs_f64() * 1e6,
            "p99_us": p99.as_secs_f64() * 1e6,
        }));
    }

    /// A measured value with its unit (ops/s, KiB, ...).
    pub fn value(&mut self, name: &str, value: f64, unit: &str) {
        self.entries.push(serde_json::json!({
            "kind": "value", "name": name, "value": value, "unit": unit,
        }));
    }

    /// A ratio, and the target it must meet (`("<=", 1.3)` or `(">=", 100.0)`):
    /// printed and recorded.
    pub fn ratio(&mut self, name: &str, value: f64, target: Option<(&str, f64)>) {
        let met = target.map(|(op, bound)| match op {
            "<=" => value <= bound,
            _ => value >= bound,
        });
        match target {
            Some((op, bound)) => println!("ratio {name}: {value:.2}x (target {op} {bound})"),
            None => println!("ratio {name}: {value:.2}x"),
        }
        self.entries.push(serde_json::json!({
            "kind": "ratio",
            "name": name,
            "value": value,
            "target": target.map(|(op, bound)| format!("{op} {bound}")),
            "met": met,
        }));
    }

    /// Writes the JSON file when `BENCH_RESULTS_DIR` is set.
    pub fn write(self) {
        let Ok(dir) = std::env::var("BENCH_RESULTS_DIR") else {
            return;
        };
        let dir = std::path::PathBuf::from(dir);
        std::fs::create_dir_all(&dir).expect("create the results dir");
        let body = serde_json::json!({ "bench": self.bench, "results": self.entries });
        let text = serde_json::to_string_pretty(&body).expect("json");
        std::fs::write(dir.join(format!("{}.json", self.bench)), text).expect("write results");
    }
}

/// This process's resident memory in KiB, from /proc.
pub fn resident_kib() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|status| {
            status
                .lines()
                .find(|l| l.starts_with("VmRSS:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|kib| kib.parse().ok())
        })
        .unwrap_or(0)
}

/// A Postgres schema of a benchmark's own, made in the database at `base`
/// and dropped by [`PgSchema::drop_schema`]; `url` reaches it.
pub struct PgSchema {
    pub url: String,
    name: String,
    admin: sqlx::PgConnection,
}

impl PgSchema {
    /// Makes `{prefix}_{pid}` in the database at `base`.
    pub async fn create(base: &str, prefix: &str) -> PgSchema {
        use sqlx::Connection;
        let name = format!("{prefix}_{}", std::process::id());
        let mut admin = sqlx::PgConnection::connect(base)
            .await
            .expect("connect to Postgres");
        sqlx::raw_sql(sqlx::AssertSqlSafe(format!("CREATE SCHEMA {name}")))
            .execute(&mut admin)
            .await
            .expect("create schema");
        let separator = if base.contains('?') { '&' } else { '?' };
        let url = format!("{base}{separator}options=-c%20search_path%3D{name}");
        PgSchema { url, name, admin }
    }

    pub async fn drop_schema(mut self) {
        let _ = sqlx::raw_sql(sqlx::AssertSqlSafe(format!(
            "DROP SCHEMA IF EXISTS {} CASCADE",
            self.name
        )))
        .execute(&mut self.admin)
        .await;
    }
}
