//! Incremental compile figures on a generated 500-module Rhai project:
//! a full (cold) compile, an unchanged project, a one-leaf edit, and the
//! first compile of a fresh workspace state from the persisted cache; once
//! through the engine directly and once over the WebSocket protocol (the
//! edit written with `write_file`, then `compile`).
//!
//! The project is a binary tree of imports: `main.rhai` imports module 0,
//! module i imports modules 2i+1 and 2i+2, so a leaf has about nine
//! importers above it. Leaves build a small gear (a hub and twelve teeth
//! in a loop); inner modules combine their two children's parts.
//!
//! Run: `cargo bench --bench compile` (SQLite in a temp dir; set
//! `DATABASE_URL=postgres://...` to use Postgres for the protocol rows).

use std::path::Path;
use std::sync::Arc;
use std::time::Instant;

use branchd::client::Client;
use branchd::compile::rhai::RhaiCompiler;
use branchd::compile::{CompileCache, CompileLimits, Compiled};
use branchd::config::Config;
use branchd::protocol::{Op, Reply};
use branchd::workspace::paths::WorkPath;

mod common;
use common::{Report, Stats, bench_server, fmt};

const MODULES: usize = 500;

fn module_path(i: usize) -> String {
    format!("parts/p{:02}/m{i:03}.rhai", i % 25)
}

fn spec(i: usize) -> String {
    format!("parts/p{:02}/m{i:03}", i % 25)
}

/// Module `i`'s source; `variant` changes a leaf's size (the edit).
fn module_source(i: usize, variant: usize) -> String {
    let (left, right) = (2 * i + 1, 2 * i + 2);
    if left >= MODULES {
        let size = 1 + (i + variant) % 7;
        // A gear: a hub and twelve teeth made in a loop.
        return format!(
            "export const size = {size};\nlet teeth = [cylinder(size, 2)];\nfor k in 0..12 {{\n  teeth.push(rotate(translate(cube(1, 0.5, 2), size, 0, 0), 0, 0, k * 30));\n}}\nexport const part = translate(union_all(teeth), {i}, 0, 0);\n"
        );
    }
    let mut source = format!("import \"{}\" as a;\n", spec(left));
    if right < MODULES {
        source.push_str(&format!(
            "import \"{}\" as b;\nexport const part = union(translate(a::part, 0, 1, 0), rotate(b::part, 0, 0, 5));\n",
            spec(right)
        ));
    } else {
        source.push_str("export const part = scale(a::part, 1.5);\n");
    }
    source
}

const MAIN: &str = "import \"parts/p00/m000\" as root;\nroot::part\n";

fn write_project(root: &Path) {
    std::fs::create_dir_all(root.join(".git/branchd")).expect("git dir");
    std::fs::write(root.join("main.rhai"), MAIN).expect("main");
    for i in 0..MODULES {
        let path = root.join(module_path(i));
        std::fs::create_dir_all(path.parent().expect("parent")).expect("dirs");
        std::fs::write(path, module_source(i, 0)).expect("module");
    }
}

/// The leaf edited each round: the last module, nine levels down.
const LEAF: usize = MODULES - 1;

fn timed(times: usize, mut run: impl FnMut(usize) -> Compiled) -> (Stats, Compiled) {
    let mut samples = Vec::with_capacity(times);
    let mut last = None;
    for i in 0..times {
        let started = Instant::now();
        let compiled = run(i);
        samples.push(started.elapsed());
        assert!(compiled.ok, "{:?}", compiled.diagnostics);
        last = Some(compiled);
    }
    (Stats(samples), last.expect("at least one run"))
}

fn stats_note(compiled: &Compiled) -> String {
    let s = compiled.stats;
    format!(
        "{} files: {} compiled, {} cached",
        s.files_total, s.files_compiled, s.files_cached
    )
}

#[tokio::main]
async fn main() {
    let config = Config::from_env().expect("config");
    let limits = CompileLimits::from_config(&config);
    let compiler = Arc::new(RhaiCompiler::new(
        config.compile_max_shape_nodes,
        config.compile_max_shape_depth,
    ));
    let dir = tempfile::tempdir().expect("dir");
    let scratch = tempfile::tempdir().expect("scratch");
    write_project(dir.path());
    let entry = WorkPath::parse("main.rhai", 1024).expect("entry");
    let fresh = || CompileCache::new(dir.path(), scratch.path(), compiler.clone());
    let cache_file = dir.path().join(branchd::compile::engine::CACHE_FILE);
    let mut report = Report::new("compile");

    println!(
        "branchd compile bench: {MODULES} modules + main.rhai, a binary tree of imports; the edited leaf has {} importers",
        (MODULES as f64).log2().floor() as usize + 1
    );
    println!();
    println!(
        "| {:<38} | {:>6} | {:>12} | {:>12} | what the last run did",
        "engine (no sockets)", "n", "median", "p99"
    );
    println!(
        "| {:-<38} | {:->6} | {:->12} | {:->12} | ---",
        "", "", "", ""
    );

    let (full, last) = timed(10, |_| {
        let _ = std::fs::remove_file(&cache_file);
        fresh().compile(&entry, &limits).expect("compile")
    });
    let note = stats_note(&last);
    print_row(
        &mut report,
        full,
        "full compile (cold, nothing cached)",
        &note,
    );

    let mut cache = fresh();
    cache.compile(&entry, &limits).expect("warm up");
    let (unchanged, last) = timed(50, |_| cache.compile(&entry, &limits).expect("compile"));
    print_row(
        &mut report,
        unchanged,
        "unchanged project",
        &stats_note(&last),
    );

    let leaf_path = dir.path().join(module_path(LEAF));
    let (edit, last) = timed(50, |i| {
        std::fs::write(&leaf_path, module_source(LEAF, i + 1)).expect("edit");
        cache.compile(&entry, &limits).expect("compile")
    });
    print_row(&mut report, edit, "one-leaf edit", &stats_note(&last));

    let (reactivated, last) = timed(10, |_| fresh().compile(&entry, &limits).expect("compile"));
    print_row(
        &mut report,
        reactivated,
        "fresh state from persisted cache",
        &stats_note(&last),
    );

    let (reactivated_edit, last) = timed(10, |i| {
        std::fs::write(&leaf_path, module_source(LEAF, 100 + i)).expect("edit");
        fresh().compile(&entry, &limits).expect("compile")
    });
    print_row(
        &mut report,
        reactivated_edit,
        "fresh state + one-leaf edit",
        &stats_note(&last),
    );

    protocol_rows(&mut report).await;
    report.write();
}

fn print_row(report: &mut Report, stats: Stats, name: &str, note: &str) {
    let mut stats = stats;
    report.record(name, &mut stats);
    let n = stats.0.len();
    let median = stats.percentile(0.5);
    let p99 = stats.percentile(0.99);
    println!(
        "| {name:<38} | {n:>6} | {:>12} | {:>12} | {note}",
        fmt(median),
        fmt(p99)
    );
}

/// The same project over the WebSocket protocol: written with
/// `write_file`, compiled with `compile`.
async fn protocol_rows(report: &mut Report) {
    let work_root = tempfile::tempdir().expect("workspace root");
    let (server, base, token, project, _data) =
        bench_server(Some(work_root.path().to_path_buf())).await;
    let client = Client::connect(&base, &token, project, "main")
        .await
        .expect("connect");
    let mut files = vec![("main.rhai".to_string(), MAIN.to_string())];
    for i in 0..MODULES {
        files.push((module_path(i), module_source(i, 0)));
    }
    for (path, content) in files {
        client
            .request(Op::WriteFile {
                path,
                content: content.into_bytes(),
                base_version: None,
                force: true,
            })
            .await
            .expect("write");
    }
    let compile = || async {
        let started = Instant::now();
        match client
            .request(Op::Compile {
                entry: "main.rhai".into(),
            })
            .await
            .expect("compile")
        {
            Reply::Compiled { ok, stats, .. } => {
                assert!(ok);
                (started.elapsed(), stats)
            }
            other => panic!("{other:?}"),
        }
    };
    println!();
    println!(
        "| {:<38} | {:>6} | {:>12} | {:>12} | what the last run did",
        "over WebSocket (compile round trip)", "n", "median", "p99"
    );
    println!(
        "| {:-<38} | {:->6} | {:->12} | {:->12} | ---",
        "", "", "", ""
    );
    let (first, stats) = compile().await;
    println!(
        "| {:<38} | {:>6} | {:>12} | {:>12} | {} files: {} compiled, {} cached (server: {} ms)",
        "full compile (first in the workspace)",
        1,
        fmt(first),
        fmt(first),
        stats.files_total,
        stats.files_compiled,
        stats.files_cached,
        stats.millis
    );
    let mut unchanged = Vec::new();
    let mut last = stats;
    for _ in 0..50 {
        let (took, stats) = compile().await;
        unchanged.push(took);
        last = stats;
    }
    print_row(
        report,
        Stats(unchanged),
        "unchanged project, over WebSocket",
        &format!(
            "{} files: {} compiled",
            last.files_total, last.files_compiled
        ),
    );
    let mut edits = Vec::new();
    for i in 0..50 {
        client
            .request(Op::WriteFile {
                path: module_path(LEAF),
                content: module_source(LEAF, i + 1).into_bytes(),
                base_version: None,
                force: true,
            })
            .await
            .expect("edit");
        let (took, stats) = compile().await;
        edits.push(took);
        last = stats;
    }
    print_row(
        report,
        Stats(edits),
        "one-leaf edit, over WebSocket",
        &format!(
            "{} files: {} compiled, {} cached",
            last.files_total, last.files_compiled, last.files_cached
        ),
    );
    client.close().await;
    server.shutdown().await.expect("shutdown");
}
