//! Compiling over the WebSocket protocol: a real server, real sockets,
//! Rhai projects written through `write_file` and compiled with `compile`.

mod common;

use std::time::{Duration, Instant};

use branchd::client::{Client, ClientError};
use branchd::compile::shape::Shape;
use branchd::protocol::{
    CompileOutput, CompileStats, Diagnostic, DiagnosticKind, ErrorCode, Event, Op, Reply,
};
use common::{TestDb, TestServer};
use serde_json::json;

const WAIT: Duration = Duration::from_secs(10);

on_both_backends!(
    a_project_of_several_files_compiles_to_its_tree_and_box_and_others_see_it,
    editing_a_leaf_recompiles_only_it_and_its_importers,
    a_syntax_error_names_the_file_and_line,
    endless_loops_and_recursion_hit_limits_and_the_workspace_keeps_serving,
    imports_outside_the_project_are_refused_and_bad_entries_are_errors,
    after_save_stop_and_reactivation_the_first_compile_is_served_from_the_cache,
);

/// A gearbox: `main` imports a housing and a shaft; the shaft imports a
/// gear, which imports the shared dimensions.
const PROJECT: &[(&str, &str)] = &[
    (
        "main.rhai",
        r#"import "parts/housing" as housing;
import "parts/shaft" as shaft;
difference(housing::body, shaft::assembly)
"#,
    ),
    (
        "parts/housing.rhai",
        r#"export const body = cube(20, 20, 10);
"#,
    ),
    (
        "parts/shaft.rhai",
        r#"import "./gear" as gear;
export const assembly = union(
    translate(cylinder(2, 30), 10, 10, -10),
    translate(gear::wheel, 10, 10, 4)
);
"#,
    ),
    (
        "parts/gear.rhai",
        r#"import "dims" as dims;
export const wheel = cylinder(dims::radius, 2);
"#,
    ),
    (
        "dims.rhai",
        r#"export const radius = 6;
"#,
    ),
];

/// A server (compile limits made small, so limit tests are quick), an
/// admin token and a project.
async fn server(db: TestDb) -> (TestServer, String, i64) {
    common::server_with_project(db, |config| {
        config.compile_max_operations = 200_000;
        config.compile_max_call_depth = 32;
    })
    .await
}

async fn connect(server: &TestServer, token: &str, project: i64) -> Client {
    Client::connect(&server.base, token, project, "main")
        .await
        .expect("connects")
}

async fn write(client: &Client, path: &str, content: &str) {
    client
        .request(Op::WriteFile {
            path: path.into(),
            content: content.as_bytes().to_vec(),
            base_version: None,
            force: true,
        })
        .await
        .unwrap_or_else(|e| panic!("writing {path}: {e}"));
}

async fn write_project(client: &Client) {
    for (path, content) in PROJECT {
        write(client, path, content).await;
    }
}

struct Result {
    ok: bool,
    diagnostics: Vec<Diagnostic>,
    output: Option<CompileOutput>,
    stats: CompileStats,
}

async fn compile(client: &Client, entry: &str) -> Result {
    match client
        .request(Op::Compile {
            entry: entry.into(),
        })
        .await
        .expect("compile answers")
    {
        Reply::Compiled {
            ok,
            diagnostics,
            output,
            stats,
        } => Result {
            ok,
            diagnostics,
            output,
            stats,
        },
        other => panic!("expected compiled, got {other:?}"),
    }
}

fn counts(stats: &CompileStats) -> (u32, u32, u32) {
    (stats.files_total, stats.files_compiled, stats.files_cached)
}

fn op_code(result: std::result::Result<Reply, ClientError>) -> ErrorCode {
    match result {
        Err(ClientError::Op(err)) => err.code,
        other => panic!("expected an error reply, got {other:?}"),
    }
}

async fn a_project_of_several_files_compiles_to_its_tree_and_box_and_others_see_it(db: TestDb) {
    let (server, admin, project) = server(db).await;
    let alice = connect(&server, &admin, project).await;
    let viewer = server.member(&admin, project, "vera", "viewer").await;
    let mut vera = connect(&server, &viewer, project).await;
    write_project(&alice).await;

    let compiled = compile(&alice, "main.rhai").await;
    assert!(compiled.ok, "{:?}", compiled.diagnostics);
    assert!(compiled.diagnostics.is_empty());
    assert_eq!(counts(&compiled.stats), (5, 5, 0));
    let output = compiled.output.expect("output");
    // The housing minus the shaft: the box is the housing's.
    let bbox = output.bbox.expect("bbox");
    assert_eq!((bbox.min, bbox.max), ([0.0; 3], [20.0, 20.0, 10.0]));
    let Shape::Difference { children } = &output.tree else {
        panic!("{:?}", output.tree)
    };
    assert_eq!(
        *children[0],
        Shape::Cube {
            size: [20.0, 20.0, 10.0]
        }
    );
    let Shape::Union { children: shaft } = &*children[1] else {
        panic!("{:?}", children[1])
    };
    let Shape::Translate { offset, child } = &*shaft[1] else {
        panic!("{:?}", shaft[1])
    };
    assert_eq!(*offset, [10.0, 10.0, 4.0]);
    assert_eq!(
        **child,
        Shape::Cylinder {
            radius: 6.0,
            height: 2.0
        }
    );
    // The shaft's own box: the long cylinder and the gear around it.
    let shaft_box = children[1].bounding_box().expect("shaft box");
    assert_eq!(
        (shaft_box.min, shaft_box.max),
        ([4.0, 4.0, -10.0], [16.0, 16.0, 20.0])
    );

    // The viewer hears of the compile, with the same result.
    match compiled_event(&mut vera).await {
        Event::Compiled {
            entry,
            ok,
            stats,
            by,
            output: pushed,
            ..
        } => {
            assert_eq!(entry, "main.rhai");
            assert!(ok);
            assert_eq!(counts(&stats), (5, 5, 0));
            assert_eq!(by.user, "admin");
            assert_eq!(pushed.as_ref(), Some(&output));
        }
        other => panic!("{other:?}"),
    }

    // Viewers may compile too; an unchanged project recompiles nothing.
    let mut alice = alice;
    let again = compile(&vera, "main.rhai").await;
    assert!(again.ok);
    assert_eq!(counts(&again.stats), (5, 0, 5));
    assert_eq!(again.output.as_ref(), Some(&output));
    match compiled_event(&mut alice).await {
        Event::Compiled { stats, by, .. } => {
            assert_eq!(counts(&stats), (5, 0, 5));
            assert_eq!(by.user, "vera");
        }
        other => panic!("{other:?}"),
    }
    server.stop().await;
}

/// The next `compiled` event, skipping any other.
async fn compiled_event(client: &mut Client) -> Event {
    loop {
        match client.next_event(WAIT).await.expect("a compiled event") {
            event @ Event::Compiled { .. } => return event,
            _ => continue,
        }
    }
}

async fn editing_a_leaf_recompiles_only_it_and_its_importers(db: TestDb) {
    let (server, admin, project) = server(db).await;
    let client = connect(&server, &admin, project).await;
    write_project(&client).await;
    assert!(compile(&client, "main.rhai").await.ok);

    // dims is imported by gear, gear by shaft, shaft by main; housing is not touched.
    write(&client, "dims.rhai", "export const radius = 15;\n").await;
    let edited = compile(&client, "main.rhai").await;
    assert!(edited.ok, "{:?}", edited.diagnostics);
    assert_eq!(counts(&edited.stats), (5, 4, 1));
    let output = edited.output.expect("output");
    let Shape::Difference { children } = &output.tree else {
        panic!("{:?}", output.tree)
    };
    let shaft = children[1].bounding_box().expect("shaft box");
    assert_eq!((shaft.min[0], shaft.max[0]), (-5.0, 25.0));

    // The housing is a leaf imported by main only.
    write(
        &client,
        "parts/housing.rhai",
        "export const body = cube(40, 20, 10);\n",
    )
    .await;
    let edited = compile(&client, "main.rhai").await;
    assert_eq!(counts(&edited.stats), (5, 2, 3));
    let bbox = edited.output.expect("output").bbox.expect("bbox");
    assert_eq!(bbox.max, [40.0, 20.0, 10.0]);

    let unchanged = compile(&client, "main.rhai").await;
    assert_eq!(counts(&unchanged.stats), (5, 0, 5));

    // Another entry point shares the cached modules.
    write(
        &client,
        "shaft_only.rhai",
        "import \"parts/shaft\" as s;\ns::assembly\n",
    )
    .await;
    let other = compile(&client, "shaft_only.rhai").await;
    assert!(other.ok, "{:?}", other.diagnostics);
    assert_eq!(counts(&other.stats), (4, 1, 3));
    server.stop().await;
}

async fn a_syntax_error_names_the_file_and_line(db: TestDb) {
    let (server, admin, project) = server(db).await;
    let client = connect(&server, &admin, project).await;
    write_project(&client).await;
    write(
        &client,
        "parts/gear.rhai",
        "import \"dims\" as dims;\n\nexport const wheel = cylinder(dims::radius, 2;\n",
    )
    .await;
    let compiled = compile(&client, "main.rhai").await;
    assert!(!compiled.ok);
    assert_eq!(compiled.output, None);
    let [diagnostic] = &compiled.diagnostics[..] else {
        panic!("{:?}", compiled.diagnostics)
    };
    assert_eq!(diagnostic.kind, DiagnosticKind::Syntax);
    assert_eq!(
        (diagnostic.file.as_str(), diagnostic.line),
        ("parts/gear.rhai", 3)
    );
    assert!(diagnostic.column > 0);
    assert!(!diagnostic.message.is_empty());

    // Fixing it compiles again.
    write(
        &client,
        "parts/gear.rhai",
        "import \"dims\" as dims;\n\nexport const wheel = cylinder(dims::radius, 2);\n",
    )
    .await;
    assert!(compile(&client, "main.rhai").await.ok);
    server.stop().await;
}

async fn endless_loops_and_recursion_hit_limits_and_the_workspace_keeps_serving(db: TestDb) {
    let (server, admin, project) = server(db).await;
    let client = connect(&server, &admin, project).await;
    write(&client, "spin.rhai", "let n = 0;\nloop {\n  n += 1;\n}\n").await;
    write(
        &client,
        "dive.rhai",
        "fn dive(n) {\n  dive(n + 1)\n}\ndive(0)\n",
    )
    .await;
    write(
        &client,
        "lib/recursive.rhai",
        "fn dive(n) { dive(n + 1) }\n",
    )
    .await;
    write(
        &client,
        "indirect.rhai",
        "import \"lib/recursive\" as r;\nr::dive(1)\n",
    )
    .await;

    for (entry, file, what) in [
        ("spin.rhai", "spin.rhai", "operations"),
        ("dive.rhai", "dive.rhai", "calls nest deeper"),
        // Rhai reports a call-depth overflow where the recursion was entered.
        ("indirect.rhai", "indirect.rhai", "calls nest deeper"),
    ] {
        let compiled = compile(&client, entry).await;
        assert!(!compiled.ok, "{entry}");
        let [diagnostic] = &compiled.diagnostics[..] else {
            panic!("{entry}: {:?}", compiled.diagnostics)
        };
        assert_eq!(diagnostic.kind, DiagnosticKind::Limit, "{diagnostic:?}");
        assert_eq!(diagnostic.file, file, "{diagnostic:?}");
        assert!(diagnostic.line > 0, "{diagnostic:?}");
        assert!(diagnostic.message.contains(what), "{diagnostic:?}");
        // The workspace still serves.
        let got = client
            .request(Op::ReadFile { path: entry.into() })
            .await
            .expect("read after a limit");
        let Reply::File { content, .. } = got else {
            panic!("expected Reply::File, got {got:?}");
        };
        assert!(!content.is_empty());
    }
    server.stop().await;
}

/// While a compile runs into its wall-time limit, the workspace answers
/// other requests at once: compiles run off the actor.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_long_compile_does_not_stall_the_workspace() {
    let server = TestServer::start_with(TestDb::sqlite().await, |config| {
        config.compile_max_operations = u64::MAX;
        config.compile_timeout = Duration::from_millis(1500);
    })
    .await;
    let admin = server.admin_token().await;
    let (_, project) = server
        .post("/api/projects", &admin, json!({"name": "Spin"}))
        .await;
    let project = project["id"].as_i64().expect("id");
    let client = std::sync::Arc::new(connect(&server, &admin, project).await);
    write(&client, "spin.rhai", "loop { }\n").await;

    let started = Instant::now();
    let compiling = tokio::spawn({
        let client = client.clone();
        async move { compile(&client, "spin.rhai").await }
    });
    tokio::time::sleep(Duration::from_millis(200)).await;
    let before_read = Instant::now();
    client
        .request(Op::ReadFile {
            path: "spin.rhai".into(),
        })
        .await
        .expect("read during a compile");
    let read_took = before_read.elapsed();
    let compiled = compiling.await.expect("compile task");
    let compile_took = started.elapsed();
    assert!(
        read_took < Duration::from_millis(500),
        "a read took {read_took:?} while a compile ran"
    );
    assert!(
        compile_took >= Duration::from_millis(1400),
        "{compile_took:?}"
    );
    let [diagnostic] = &compiled.diagnostics[..] else {
        panic!("{:?}", compiled.diagnostics)
    };
    assert_eq!(diagnostic.kind, DiagnosticKind::Limit);
    assert!(diagnostic.message.contains("out of time"), "{diagnostic:?}");
    server.stop().await;
}

/// A tree at the depth limit travels to the client and to other sessions;
/// one level more is a `limit` diagnostic.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_shape_at_the_depth_limit_travels_and_one_level_more_is_refused() {
    let server = TestServer::start(TestDb::sqlite().await).await;
    let admin = server.admin_token().await;
    let (_, project) = server
        .post("/api/projects", &admin, json!({"name": "Deep"}))
        .await;
    let project = project["id"].as_i64().expect("id");
    let client = connect(&server, &admin, project).await;
    let mut other = connect(&server, &admin, project).await;
    let depth = branchd::config::Config::for_tests()
        .expect("config")
        .compile_max_shape_depth;
    let deep = |levels: u32| {
        format!(
            "let s = cube(1, 1, 1);\nfor i in 0..{levels} {{\n  s = translate(s, 1, 0, 0);\n}}\ns\n"
        )
    };
    write(&client, "deep.rhai", &deep(depth - 1)).await;
    let compiled = compile(&client, "deep.rhai").await;
    assert!(compiled.ok, "{:?}", compiled.diagnostics);
    let bbox = compiled.output.expect("output").bbox.expect("bbox");
    assert_eq!(bbox.max[0], f64::from(depth));
    assert!(matches!(
        compiled_event(&mut other).await,
        Event::Compiled { ok: true, .. }
    ));

    write(&client, "deeper.rhai", &deep(depth)).await;
    let compiled = compile(&client, "deeper.rhai").await;
    let [diagnostic] = &compiled.diagnostics[..] else {
        panic!("{:?}", compiled.diagnostics)
    };
    assert_eq!(
        (diagnostic.kind, diagnostic.line),
        (DiagnosticKind::Limit, 3)
    );
    assert!(
        diagnostic
            .message
            .contains("BRANCHD_COMPILE_MAX_SHAPE_DEPTH"),
        "{diagnostic:?}"
    );
    server.stop().await;
}

async fn imports_outside_the_project_are_refused_and_bad_entries_are_errors(db: TestDb) {
    let (server, admin, project) = server(db).await;
    let client = connect(&server, &admin, project).await;
    write(&client, "parts/x.rhai", "cube(1, 1, 1)\n").await;
    write(
        &client,
        "evil.rhai",
        "import \"../../etc/passwd\" as pw;\ncube(1, 1, 1)\n",
    )
    .await;
    write(
        &client,
        "git.rhai",
        "import \".git/config\" as c;\ncube(1, 1, 1)\n",
    )
    .await;
    for (entry, hint) in [("evil.rhai", "outside the project"), ("git.rhai", ".git")] {
        let compiled = compile(&client, entry).await;
        assert!(!compiled.ok);
        let [diagnostic] = &compiled.diagnostics[..] else {
            panic!("{:?}", compiled.diagnostics)
        };
        assert_eq!(diagnostic.kind, DiagnosticKind::Import);
        assert_eq!((diagnostic.file.as_str(), diagnostic.line), (entry, 1));
        assert!(diagnostic.message.contains(hint), "{diagnostic:?}");
    }

    for (entry, code) in [
        ("../../etc/passwd", ErrorCode::BadRequest),
        (".git/config", ErrorCode::BadRequest),
        ("", ErrorCode::BadRequest),
        ("parts", ErrorCode::BadRequest),
        ("missing.rhai", ErrorCode::NotFound),
    ] {
        let result = client
            .request(Op::Compile {
                entry: entry.into(),
            })
            .await;
        assert_eq!(op_code(result), code, "{entry:?}");
    }
    server.stop().await;
}

async fn after_save_stop_and_reactivation_the_first_compile_is_served_from_the_cache(db: TestDb) {
    let (server, admin, project) = server(db).await;
    let client = connect(&server, &admin, project).await;
    write_project(&client).await;
    let first = compile(&client, "main.rhai").await;
    assert_eq!(counts(&first.stats), (5, 5, 0));
    assert!(matches!(
        client.request(Op::Save).await.expect("save"),
        Reply::Saved { saved: true, .. }
    ));
    // The cache lives in .git: nothing to commit, nothing to list.
    let got = client.request(Op::GitStatus).await.expect("status");
    let Reply::Status { changes, .. } = got else {
        panic!("expected Reply::Status, got {got:?}")
    };
    assert!(
        changes.iter().all(|c| !c.path.contains("branchd")),
        "{changes:?}"
    );
    client.close().await;

    let server = server.restart().await;
    let client = connect(&server, &admin, project).await;
    let warm = compile(&client, "main.rhai").await;
    assert!(warm.ok, "{:?}", warm.diagnostics);
    assert_eq!(counts(&warm.stats), (5, 0, 5));
    assert_eq!(warm.output, first.output);

    // An edit after re-activation recompiles the edited file and its
    // importers; the others come back from the persisted cache (they
    // export only data).
    write(
        &client,
        "parts/housing.rhai",
        "export const body = cube(40, 20, 10);\n",
    )
    .await;
    let edited = compile(&client, "main.rhai").await;
    assert!(edited.ok, "{:?}", edited.diagnostics);
    assert_eq!(counts(&edited.stats), (5, 2, 3));
    assert_eq!(
        edited.output.expect("output").bbox.expect("bbox").max,
        [40.0, 20.0, 10.0]
    );
    server.stop().await;
}
