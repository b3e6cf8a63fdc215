//! The `branchd` binary as a user runs it: a real process, started from an
//! empty directory on the embedded default, driven over HTTP, stopped with
//! SIGTERM. Also the README promise that every setting is documented.

mod common;

use std::path::Path;

use common::process::{Served, branchd, create_project, login};
use serde_json::{Value, json};

#[tokio::test]
async fn serve_on_a_fresh_dir_prints_the_admin_password_once_and_keeps_data() {
    let dir = tempfile::tempdir().expect("dir");
    let http = reqwest::Client::new();

    let first = Served::start(dir.path());
    let password = first
        .admin_password()
        .expect("the first start prints the admin password");
    let token = login(&http, &first.base, "admin", &password).await;
    let created = http
        .post(format!("{}/api/projects", first.base))
        .bearer_auth(&token)
        .json(&json!({"name": "Demo"}))
        .send()
        .await
        .expect("create");
    assert_eq!(created.status(), 201);
    first.terminate();
    assert!(
        dir.path().join("data/branchd.db").exists(),
        "SQLite under ./data"
    );

    let second = Served::start(dir.path());
    assert_eq!(
        second.admin_password(),
        None,
        "the password is printed only once"
    );
    let token = login(&http, &second.base, "admin", &password).await;
    let list: Value = http
        .get(format!("{}/api/projects", second.base))
        .bearer_auth(&token)
        .send()
        .await
        .expect("list")
        .json()
        .await
        .expect("json");
    assert_eq!(list[0]["name"], "Demo", "the project survived the restart");
    second.terminate();
}

#[tokio::test]
async fn user_add_prints_a_password_that_logs_in() {
    let dir = tempfile::tempdir().expect("dir");
    let output = branchd(dir.path())
        .args(["user", "add", "bob", "--email", "bob@example.com"])
        .output()
        .expect("run user add");
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let stdout = String::from_utf8_lossy(&output.stdout);
    let password = stdout
        .lines()
        .find_map(|line| line.strip_prefix("password: "))
        .expect("a printed password")
        .to_string();
    let again = branchd(dir.path())
        .args(["user", "add", "bob"])
        .output()
        .expect("run user add again");
    assert!(!again.status.success());
    assert!(String::from_utf8_lossy(&again.stderr).contains("already exists"));

    let served = Served::start(dir.path());
    assert_eq!(
        served.admin_password(),
        None,
        "a user exists: no admin is made"
    );
    let http = reqwest::Client::new();
    let token = login(&http, &served.base, "bob", &password).await;
    let me: Value = http
        .get(format!("{}/api/me", served.base))
        .bearer_auth(&token)
        .send()
        .await
        .expect("me")
        .json()
        .await
        .expect("json");
    assert_eq!(me["email"], "bob@example.com");
    served.terminate();
}

#[test]
fn migrate_applies_migrations_and_bad_urls_are_explained() {
    let dir = tempfile::tempdir().expect("dir");
    let ok = branchd(dir.path())
        .arg("migrate")
        .output()
        .expect("migrate");
    assert!(
        ok.status.success(),
        "{}",
        String::from_utf8_lossy(&ok.stderr)
    );
    assert!(String::from_utf8_lossy(&ok.stdout).contains("migrations applied"));

    let bad = branchd(dir.path())
        .args(["migrate", "--database-url", "mysql://x"])
        .output()
        .expect("migrate");
    assert!(!bad.status.success());
    assert!(String::from_utf8_lossy(&bad.stderr).contains("sqlite://PATH or postgres://"));

    let bad_duration = branchd(dir.path())
        .args(["serve", "--gc-interval", "soon"])
        .output()
        .expect("serve");
    assert!(!bad_duration.status.success());
    assert!(String::from_utf8_lossy(&bad_duration.stderr).contains("500ms, 20s"));
}

#[test]
fn a_cluster_cookie_on_sqlite_is_refused_with_what_to_do() {
    let dir = tempfile::tempdir().expect("dir");
    let refused = branchd(dir.path())
        .args(["serve", "--listen", "127.0.0.1:0"])
        .env("BRANCHD_CLUSTER_COOKIE", "secret")
        .output()
        .expect("serve");
    assert_eq!(refused.status.code(), Some(1), "{refused:?}");
    let said = String::from_utf8_lossy(&refused.stderr);
    assert!(
        said.contains("clustering needs a shared Postgres database"),
        "{said}"
    );
    assert!(said.contains("BRANCHD_CLUSTER_COOKIE"), "{said}");
}

#[test]
fn readme_documents_every_setting() {
    let readme = std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("README.md"))
        .expect("README.md");
    let dir = tempfile::tempdir().expect("dir");
    let mut variables = Vec::new();
    for args in [
        &["--help"][..],
        &["serve", "--help"],
        &["user", "add", "--help"],
    ] {
        let help = branchd(dir.path()).args(args).output().expect("help");
        assert!(help.status.success());
        let text = String::from_utf8_lossy(&help.stdout).into_owned();
        for part in text.split("[env: ").skip(1) {
            let name: String = part
                .chars()
                .take_while(|c| c.is_ascii_uppercase() || *c == '_')
                .collect();
            variables.push(name);
        }
    }
    variables.sort();
    variables.dedup();
    assert!(variables.len() >= 15, "found only {variables:?}");
    let undocumented: Vec<&String> = variables
        .iter()
        .filter(|name| !readme.contains(&format!("`{name}`")))
        .collect();
    assert!(
        undocumented.is_empty(),
        "README.md's configuration table lacks {undocumented:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_killed_with_sessions_attached_wipes_its_rows_when_it_restarts() {
    use branchd::client::Client;
    use branchd::storage::WorkspaceKey;

    let dir = tempfile::tempdir().expect("dir");
    let envs = [
        ("BRANCHD_SERVER_TAG", "node-k"),
        ("BRANCHD_ADMIN_PASSWORD", "admin-password-k"),
    ];
    let http = reqwest::Client::new();
    let first = Served::start_with(dir.path(), &envs);
    let token = login(&http, &first.base, "admin", "admin-password-k").await;
    let project = create_project(&http, &first.base, &token, "Crashy").await;
    let a = Client::connect(&first.base, &token, project, "main")
        .await
        .expect("a");
    let b = Client::connect(&first.base, &token, project, "main")
        .await
        .expect("b");

    let store = branchd::storage::open(
        &branchd::storage::sqlite::default_url(&dir.path().join("data")),
        2,
    )
    .await
    .expect("the node's database");
    let key = WorkspaceKey::new(project, "main");
    let rows = || async { store.sessions_of(&key).await.expect("rows").len() };
    let claim = store.claim_of(&key).await.expect("claim").expect("row");
    assert_eq!(
        (rows().await, claim.server_tag.as_deref()),
        (2, Some("node-k"))
    );

    first.kill();
    drop((a, b));
    let stale = store.claim_of(&key).await.expect("claim").expect("row");
    assert_eq!(rows().await, 2, "a killed node leaves its rows behind");
    assert_eq!(stale.server_tag.as_deref(), Some("node-k"));

    let second = Served::start_with(dir.path(), &envs);
    let wiped = store.claim_of(&key).await.expect("claim").expect("row");
    assert_eq!(
        (rows().await, wiped.server_tag),
        (0, None),
        "wiped at start"
    );
    let c = Client::connect(&second.base, &token, project, "main")
        .await
        .expect("c");
    let counted = store.claim_of(&key).await.expect("claim").expect("row");
    assert_eq!((rows().await, counted.epoch), (1, stale.epoch + 1));
    c.close().await;
    second.terminate();
}
