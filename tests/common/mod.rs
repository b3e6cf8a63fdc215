//! Shared test set-up: real databases (a SQLite file, or a fresh Postgres
//! schema per test), a real server on a real socket, and an HTTP client.
//!
//! Postgres tests read `DATABASE_URL`. Without it they are skipped with a
//! printed notice, unless `BRANCHD_REQUIRE_POSTGRES=1`, when a missing or
//! unreachable database fails the test.

#![allow(dead_code)] // each test crate uses a different part of this module

pub mod gated;
pub mod process;

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use branchd::config::Config;
use branchd::server::Server;
use branchd::storage::{self, NewSnapshot, NewUser, Role, Store, WorkspaceKey};
use branchd::workspace::SessionInfo;
use branchd::workspace::repo::GitAuthor;
use serde_json::Value;
use sqlx::Connection;

/// A database of its own for one test, removed when dropped.
pub struct TestDb {
    pub url: String,
    _dir: Option<tempfile::TempDir>,
    postgres: Option<(String, String)>,
}

fn unique_suffix() -> String {
    static NEXT: AtomicU64 = AtomicU64::new(0);
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or(0);
    format!(
        "{}_{}_{}",
        std::process::id(),
        NEXT.fetch_add(1, Ordering::Relaxed),
        nanos
    )
}

impl TestDb {
    /// A fresh SQLite file in a temp dir.
    pub async fn sqlite() -> TestDb {
        let dir = tempfile::tempdir().expect("temp dir");
        let url = storage::sqlite::default_url(dir.path());
        TestDb {
            url,
            _dir: Some(dir),
            postgres: None,
        }
    }

    /// A fresh schema in the Postgres database `DATABASE_URL` names, or `None`
    /// (with a notice) when there is none and Postgres is not required.
    pub async fn postgres(test: &str) -> Option<TestDb> {
        let required = std::env::var("BRANCHD_REQUIRE_POSTGRES").is_ok_and(|v| v == "1");
        let base = match std::env::var("DATABASE_URL") {
            Ok(url) if url.starts_with("postgres") => url,
            _ => {
                assert!(
                    !required,
                    "BRANCHD_REQUIRE_POSTGRES=1 but DATABASE_URL does not name a Postgres database"
                );
                eprintln!("NOTICE: skipping Postgres test {test}: DATABASE_URL is not set");
                return None;
            }
        };
        let schema = format!("t_{}", unique_suffix());
        let mut conn = match sqlx::PgConnection::connect(&base).await {
            Ok(conn) => conn,
            Err(err) if !required => {
                eprintln!("NOTICE: skipping Postgres test {test}: cannot connect: {err}");
                return None;
            }
            Err(err) => panic!("BRANCHD_REQUIRE_POSTGRES=1 but Postgres is unreachable: {err}"),
        };
        sqlx::raw_sql(sqlx::AssertSqlSafe(format!("CREATE SCHEMA {schema}")))
            .execute(&mut conn)
            .await
            .expect("create schema");
        let separator = if base.contains('?') { '&' } else { '?' };
        let url = format!("{base}{separator}options=-c%20search_path%3D{schema}");
        Some(TestDb {
            url,
            _dir: None,
            postgres: Some((base, schema)),
        })
    }

    /// Opens the store, migrated.
    pub async fn open(&self) -> Arc<dyn Store> {
        storage::open(&self.url, 8).await.expect("open store")
    }
}

impl Drop for TestDb {
    fn drop(&mut self) {
        let Some((base, schema)) = self.postgres.take() else {
            return;
        };
        // Drop runs inside the test's runtime: clean up on a thread of its own.
        let cleanup = std::thread::spawn(move || {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("runtime");
            runtime.block_on(async {
                if let Ok(mut conn) = sqlx::PgConnection::connect(&base).await {
                    let _ = sqlx::raw_sql(sqlx::AssertSqlSafe(format!(
                        "DROP SCHEMA IF EXISTS {schema} CASCADE"
                    )))
                    .execute(&mut conn)
                    .await;
                }
            });
        });
        let _ = cleanup.join();
    }
}

/// Runs each named `async fn(TestDb)` once on SQLite and once on Postgres,
/// as `sqlite::NAME` and `postgres::NAME`.
#[macro_export]
macro_rules! on_both_backends {
    ($($name:ident),* $(,)?) => {
        mod sqlite {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $name() {
                    super::$name($crate::common::TestDb::sqlite().await).await;
                }
            )*
        }
        mod postgres {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $name() {
                    if let Some(db) = $crate::common::TestDb::postgres(stringify!($name)).await {
                        super::$name(db).await;
                    }
                }
            )*
        }
    };
}

pub const ADMIN_PASSWORD: &str = "admin-password-for-tests";

/// A real branchd server on 127.0.0.1 (a free port), on its own data dir.
pub struct TestServer {
    pub server: Option<Server>,
    pub base: String,
    pub http: reqwest::Client,
    config: Config,
    _data: tempfile::TempDir,
    _db: TestDb,
}

impl TestServer {
    pub async fn start(db: TestDb) -> TestServer {
        Self::start_with(db, |_| {}).await
    }

    /// Starts with the test defaults, changed by `adjust`.
    pub async fn start_with(db: TestDb, adjust: impl FnOnce(&mut Config)) -> TestServer {
        let data = tempfile::tempdir().expect("data dir");
        let mut config = Config::for_tests().expect("the default config");
        config.listen = "127.0.0.1:0".parse().expect("addr");
        config.database.database_url = Some(db.url.clone());
        config.database.data_dir = data.path().to_path_buf();
        config.workspace_dir = None;
        config.server_tag = Some("test-node".into());
        config.admin_password = Some(ADMIN_PASSWORD.into());
        adjust(&mut config);
        let server = Server::start(config.clone()).await.expect("server starts");
        let base = format!("http://{}", server.local_addr());
        TestServer {
            server: Some(server),
            base,
            http: reqwest::Client::new(),
            config,
            _data: data,
            _db: db,
        }
    }

    /// Shuts the server down (saving and stopping every workspace) and
    /// starts a new one on the same database and data dir (a new port).
    pub async fn restart(mut self) -> TestServer {
        if let Some(server) = self.server.take() {
            server.shutdown().await.expect("clean shutdown");
        }
        let server = Server::start(self.config.clone())
            .await
            .expect("server restarts");
        self.base = format!("http://{}", server.local_addr());
        self.server = Some(server);
        self
    }

    pub fn store(&self) -> &Arc<dyn Store> {
        self.server.as_ref().expect("running").store()
    }

    pub fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base)
    }

    /// Logs in and returns the token; panics unless the login succeeds.
    pub async fn login(&self, username: &str, password: &str) -> String {
        let (status, body) = self
            .send(
                reqwest::Method::POST,
                "/api/auth/login",
                None,
                Some(serde_json::json!({"username": username, "password": password})),
            )
            .await;
        assert_eq!(status, 200, "login of {username} failed: {body}");
        body["token"].as_str().expect("token").to_string()
    }

    pub async fn admin_token(&self) -> String {
        self.login("admin", ADMIN_PASSWORD).await
    }

    /// Creates a user through the admin API; returns their token.
    /// A new user made a member of `project` with `role`; their token.
    pub async fn member(&self, admin: &str, project: i64, username: &str, role: &str) -> String {
        let token = self.user(admin, username).await;
        let (status, body) = self
            .send(
                reqwest::Method::POST,
                &format!("/api/projects/{project}/members"),
                Some(admin),
                Some(serde_json::json!({"username": username, "role": role})),
            )
            .await;
        assert_eq!(status, 200, "adding {username} as {role}: {body}");
        token
    }

    pub async fn user(&self, admin: &str, username: &str) -> String {
        let password = format!("{username}-password");
        let (status, body) = self
            .send(
                reqwest::Method::POST,
                "/api/users",
                Some(admin),
                Some(serde_json::json!({"username": username, "password": password})),
            )
            .await;
        assert_eq!(status, 201, "creating {username}: {body}");
        self.login(username, &password).await
    }

    /// Sends a request (JSON body optional) and returns status and JSON body
    /// (`Value::Null` for an empty body).
    pub async fn send(
        &self,
        method: reqwest::Method,
        path: &str,
        token: Option<&str>,
        body: Option<Value>,
    ) -> (u16, Value) {
        let mut request = self.http.request(method, self.url(path));
        if let Some(token) = token {
            request = request.bearer_auth(token);
        }
        if let Some(body) = body {
            request = request.json(&body);
        }
        let response = request.send().await.expect("request sent");
        let status = response.status().as_u16();
        let bytes = response.bytes().await.expect("body");
        let value = if bytes.is_empty() {
            Value::Null
        } else {
            serde_json::from_slice(&bytes).unwrap_or_else(|_| {
                panic!(
                    "non-JSON body ({status}): {}",
                    String::from_utf8_lossy(&bytes)
                )
            })
        };
        (status, value)
    }

    pub async fn get(&self, path: &str, token: &str) -> (u16, Value) {
        self.send(reqwest::Method::GET, path, Some(token), None)
            .await
    }

    pub async fn post(&self, path: &str, token: &str, body: Value) -> (u16, Value) {
        self.send(reqwest::Method::POST, path, Some(token), Some(body))
            .await
    }

    pub async fn delete(&self, path: &str, token: &str) -> (u16, Value) {
        self.send(reqwest::Method::DELETE, path, Some(token), None)
            .await
    }

    pub async fn stop(mut self) {
        if let Some(server) = self.server.take() {
            server.shutdown().await.expect("clean shutdown");
        }
    }
}

/// Asserts an error response: status, code, and that the message names `hint`.
pub fn assert_error(response: &(u16, Value), status: u16, code: &str, hint: &str) {
    let (got_status, body) = response;
    assert_eq!(*got_status, status, "unexpected status, body: {body}");
    assert_eq!(body["code"], code, "unexpected code, body: {body}");
    let message = body["message"].as_str().unwrap_or_default();
    assert!(
        message.contains(hint),
        "message {message:?} should mention {hint:?}"
    );
}

/// A store on its own database, a data dir with a configuration pointing
/// at it, and a project "Demo" owned by "olga" whose `main` has a first
/// snapshot (a repository with `README.md` = "# Demo\n").
pub struct Setup {
    pub store: Arc<dyn Store>,
    pub config: Config,
    pub key: WorkspaceKey,
    pub owner: i64,
    pub data: tempfile::TempDir,
    _db: TestDb,
}

impl Setup {
    pub async fn new(db: TestDb, adjust: impl FnOnce(&mut Config)) -> Setup {
        let store = db.open().await;
        let data = tempfile::tempdir().expect("data dir");
        let mut config = Config::for_tests().expect("the default config");
        config.database.data_dir = data.path().to_path_buf();
        config.database.database_url = Some(db.url.clone());
        config.workspace_dir = None;
        adjust(&mut config);
        let owner = store
            .create_user(NewUser {
                username: "olga".into(),
                display_name: "Olga Owner".into(),
                email: "olga@example.com".into(),
                password_hash: "x".into(),
                is_admin: false,
            })
            .await
            .expect("user");
        let author = GitAuthor {
            name: "Olga Owner".into(),
            email: "olga@example.com".into(),
        };
        let first = branchd::workspace::first_snapshot(data.path(), "main", "# Demo\n", &author)
            .expect("first snapshot");
        let (project, _) = store
            .create_project(
                "Demo",
                owner.id,
                "main",
                NewSnapshot {
                    data: first,
                    author: None,
                    journal_seq: 0,
                    keep: 10,
                },
            )
            .await
            .expect("project");
        Setup {
            store,
            config,
            key: WorkspaceKey::new(project.id, "main"),
            owner: owner.id,
            data,
            _db: db,
        }
    }
}

/// Makes this test the owner of `key` (as node "test-owner") and returns
/// the fence its writes go under.
pub async fn own(store: &dyn Store, key: &WorkspaceKey) -> branchd::storage::Fence {
    store
        .register_node("test-owner", None, None)
        .await
        .expect("node row");
    match store
        .claim(key, "test-owner", 600_000)
        .await
        .expect("claim")
    {
        branchd::storage::ClaimOutcome::Owned(claim) => claim.fence().expect("an owner"),
        other => panic!("the test could not own {key}: {other:?}"),
    }
}

/// A session of user `id` (the username too) with `role`.
pub fn session(id: &str, role: Role) -> SessionInfo {
    SessionInfo {
        id: id.into(),
        user_id: 1,
        username: id.into(),
        display_name: format!("{id} Example"),
        email: format!("{id}@example.com"),
        role,
    }
}

/// Polls `check` until it is true, for at most 10 s.
pub async fn eventually<F, Fut>(what: &str, check: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    eventually_within(what, std::time::Duration::from_secs(10), check).await
}

/// Polls `check` until it is true, for at most `within`; fails the test
/// naming `what` when time runs out.
pub async fn eventually_within<F, Fut>(what: &str, within: std::time::Duration, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = std::time::Instant::now() + within;
    while !check().await {
        assert!(
            std::time::Instant::now() < deadline,
            "timed out after {within:?} waiting until {what}"
        );
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
}

/// A TCP port on 127.0.0.1 that was free a moment ago.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free port")
}

/// Whether `event` says who is in the workspace (`presence` to a joiner,
/// `presence_changed` on joins and leaves).
pub fn is_presence(event: &branchd::protocol::Event) -> bool {
    use branchd::protocol::Event;
    matches!(
        event,
        Event::Presence { .. } | Event::PresenceChanged { .. }
    )
}

/// Who is in the workspace as a client following its presence events sees
/// it: session id → user name.
#[derive(Debug, Default)]
pub struct Present(pub std::collections::BTreeMap<String, String>);

impl Present {
    /// Follows one event; false if it was not a presence event.
    pub fn follow(&mut self, event: &branchd::protocol::Event) -> bool {
        use branchd::protocol::Event;
        match event {
            Event::Presence { sessions } => {
                self.0 = sessions
                    .iter()
                    .map(|d| (d.session.clone(), d.user.clone()))
                    .collect();
            }
            Event::PresenceChanged { joined, left } => {
                for gone in left {
                    self.0.remove(gone);
                }
                for d in joined {
                    self.0.insert(d.session.clone(), d.user.clone());
                }
            }
            _ => return false,
        }
        true
    }
}

/// The next event other than `presence` (which every join and leave sends).
pub async fn next_event(
    events: &mut tokio::sync::mpsc::Receiver<branchd::protocol::Event>,
) -> branchd::protocol::Event {
    loop {
        let event = tokio::time::timeout(std::time::Duration::from_secs(10), events.recv())
            .await
            .expect("an event within 10 s")
            .expect("the event stream is open");
        if !is_presence(&event) {
            return event;
        }
    }
}

/// A server configured by `adjust`, an admin token and a new project
/// ("Gearbox"): (server, admin token, project id).
pub async fn server_with_project(
    db: TestDb,
    adjust: impl FnOnce(&mut Config),
) -> (TestServer, String, i64) {
    let server = TestServer::start_with(db, adjust).await;
    let admin = server.admin_token().await;
    let (status, project) = server
        .post(
            "/api/projects",
            &admin,
            serde_json::json!({"name": "Gearbox"}),
        )
        .await;
    assert_eq!(status, 201, "{project}");
    let id = project["id"].as_i64().expect("id");
    (server, admin, id)
}
