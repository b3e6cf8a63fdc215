//! The HTTP API through a real server on a real socket: logins, roles, bad
//! input and the error codes a client sees. Every case runs on SQLite and
//! on Postgres, except the limits on connections (`mod connections`), which
//! do not depend on the database and run on SQLite, some of them against a
//! real `branchd serve` process.

mod common;

use branchd::workspace::snapshot;
use common::{TestDb, TestServer, assert_error};
use reqwest::Method;
use serde_json::json;
use std::time::Duration;

on_both_backends!(
    admin_logs_in_creates_a_project_and_lists_it,
    a_new_project_holds_a_git_repository_with_one_initial_commit,
    wrong_passwords_and_unknown_users_get_the_same_401,
    requests_without_a_valid_token_get_401_saying_why,
    logout_revokes_the_token,
    a_stranger_cannot_see_a_project_and_a_viewer_cannot_delete_it,
    only_owners_manage_members_and_the_last_owner_stays,
    only_admins_create_users_and_usernames_are_unique,
    bad_input_gets_bad_request_with_what_to_fix,
    oversized_bodies_get_too_large,
    unknown_things_get_not_found,
    health_and_readiness_answer,
    failed_logins_pause_the_username_for_a_growing_time,
    failed_logins_from_one_address_pause_it_whatever_the_username,
    logins_beyond_the_hashing_queue_get_503_at_once,
);

async fn admin_logs_in_creates_a_project_and_lists_it(db: TestDb) {
    let server = TestServer::start(db).await;
    let token = server.admin_token().await;
    let (status, me) = server.get("/api/me", &token).await;
    assert_eq!(status, 200);
    assert_eq!(
        (me["username"].as_str(), me["is_admin"].as_bool()),
        (Some("admin"), Some(true))
    );

    let (status, created) = server
        .post("/api/projects", &token, json!({"name": "  Gearbox  "}))
        .await;
    assert_eq!(status, 201, "{created}");
    assert_eq!(created["name"], "Gearbox", "names are trimmed");
    assert_eq!(created["role"], "owner");
    assert_eq!(created["branches"], json!(["main"]));
    assert_eq!(created["members"][0]["username"], "admin");

    let (status, list) = server.get("/api/projects", &token).await;
    assert_eq!(status, 200);
    let names: Vec<&str> = list
        .as_array()
        .expect("array")
        .iter()
        .filter_map(|p| p["name"].as_str())
        .collect();
    assert_eq!(names, ["Gearbox"]);
    let id = created["id"].as_i64().expect("id");
    let (status, detail) = server.get(&format!("/api/projects/{id}"), &token).await;
    assert_eq!(status, 200);
    assert_eq!(detail["branches"], json!(["main"]));
    server.stop().await;
}

async fn a_new_project_holds_a_git_repository_with_one_initial_commit(db: TestDb) {
    let server = TestServer::start(db).await;
    let token = server.admin_token().await;
    let (_, created) = server
        .post("/api/projects", &token, json!({"name": "Bracket"}))
        .await;
    let key = branchd::storage::WorkspaceKey::new(created["id"].as_i64().expect("id"), "main");
    let stored = server
        .store()
        .latest_snapshot(&key)
        .await
        .expect("read")
        .expect("first snapshot exists");
    assert_eq!(stored.meta.version, 1);
    assert_eq!(stored.meta.author.as_deref(), Some("admin"));

    let dir = tempfile::tempdir().expect("dir");
    snapshot::unpack(&stored.data, dir.path(), 1 << 30).expect("unpack");
    let repo = git2::Repository::open(dir.path()).expect("a git repository");
    let head = repo.head().expect("HEAD");
    assert_eq!(head.shorthand().ok(), Some("main"));
    let commit = head.peel_to_commit().expect("commit");
    assert_eq!(commit.parent_count(), 0, "exactly one commit");
    assert_eq!(commit.summary().expect("utf8"), Some("Initial commit"));
    assert_eq!(commit.author().email().ok(), Some("admin@branchd.invalid"));
    assert_eq!(
        std::fs::read_to_string(dir.path().join("README.md")).expect("README"),
        "# Bracket\n"
    );
    assert!(
        repo.statuses(None).expect("status").is_empty(),
        "clean work tree"
    );
    server.stop().await;
}

async fn wrong_passwords_and_unknown_users_get_the_same_401(db: TestDb) {
    let server = TestServer::start(db).await;
    let wrong = server
        .send(
            Method::POST,
            "/api/auth/login",
            None,
            Some(json!({"username": "admin", "password": "not-the-password"})),
        )
        .await;
    assert_error(&wrong, 401, "unauthorized", "wrong username or password");
    let unknown = server
        .send(
            Method::POST,
            "/api/auth/login",
            None,
            Some(json!({"username": "nobody", "password": "whatever1"})),
        )
        .await;
    assert_eq!(unknown, wrong, "no hint whether the user exists");
    server.stop().await;
}

async fn requests_without_a_valid_token_get_401_saying_why(db: TestDb) {
    let server = TestServer::start(db).await;
    let missing = server.send(Method::GET, "/api/me", None, None).await;
    assert_error(&missing, 401, "unauthorized", "Authorization: Bearer");
    let bogus = server.get("/api/me", "not-a-token").await;
    assert_error(&bogus, 401, "unauthorized", "not valid");
    let basic = server
        .http
        .get(server.url("/api/me"))
        .basic_auth("admin", Some(common::ADMIN_PASSWORD))
        .send()
        .await
        .expect("send");
    assert_eq!(basic.status(), 401);

    // A token past its expiry (by the database clock) is refused as expired.
    // It expires a second after it is made, so that the purge the server
    // runs at start cannot have deleted it (the next one is an hour later).
    let token = "0".repeat(64);
    let (admin, _) = server
        .store()
        .user_by_name("admin")
        .await
        .expect("query")
        .expect("admin");
    server
        .store()
        .create_auth_session(&branchd::gateway::auth::hash_token(&token), admin.id, 1_000)
        .await
        .expect("a short session");
    tokio::time::sleep(std::time::Duration::from_millis(1_200)).await;
    let expired = server.get("/api/projects", &token).await;
    assert_error(&expired, 401, "unauthorized", "expired");
    server.stop().await;
}

async fn logout_revokes_the_token(db: TestDb) {
    let server = TestServer::start(db).await;
    let token = server.admin_token().await;
    let other = server.admin_token().await;
    let (status, _) = server
        .send(Method::POST, "/api/auth/logout", Some(&token), None)
        .await;
    assert_eq!(status, 204);
    assert_error(
        &server.get("/api/me", &token).await,
        401,
        "unauthorized",
        "log in again",
    );
    assert_eq!(
        server.get("/api/me", &other).await.0,
        200,
        "other tokens stay valid"
    );
    server.stop().await;
}

async fn a_stranger_cannot_see_a_project_and_a_viewer_cannot_delete_it(db: TestDb) {
    let server = TestServer::start(db).await;
    let admin = server.admin_token().await;
    let owner = server.user(&admin, "olga").await;
    let viewer = server.user(&admin, "victor").await;
    let stranger = server.user(&admin, "sam").await;
    let (_, project) = server
        .post("/api/projects", &owner, json!({"name": "Private"}))
        .await;
    let id = project["id"].as_i64().expect("id");
    let path = format!("/api/projects/{id}");
    let (status, _) = server
        .post(
            &format!("{path}/members"),
            &owner,
            json!({"username": "victor", "role": "viewer"}),
        )
        .await;
    assert_eq!(status, 200);

    assert_error(
        &server.get(&path, &stranger).await,
        403,
        "forbidden",
        "not a member",
    );
    let (_, listed) = server.get("/api/projects", &stranger).await;
    assert_eq!(listed, json!([]), "strangers do not see it in their list");
    assert_error(
        &server.delete(&path, &stranger).await,
        403,
        "forbidden",
        "not a member",
    );

    let (status, seen) = server.get(&path, &viewer).await;
    assert_eq!((status, seen["role"].as_str()), (200, Some("viewer")));
    assert_error(
        &server.delete(&path, &viewer).await,
        403,
        "forbidden",
        "owner role",
    );
    assert_eq!(server.get(&path, &owner).await.0, 200, "still there");

    // Admins act as owners of every project.
    let (_, all) = server.get("/api/projects", &admin).await;
    assert_eq!(all[0]["role"], "owner");
    assert_eq!(server.delete(&path, &owner).await.0, 204);
    assert_error(
        &server.get(&path, &owner).await,
        404,
        "not_found",
        "does not exist",
    );
    server.stop().await;
}

async fn only_owners_manage_members_and_the_last_owner_stays(db: TestDb) {
    let server = TestServer::start(db).await;
    let admin = server.admin_token().await;
    let owner = server.user(&admin, "olga").await;
    let editor = server.user(&admin, "eddie").await;
    server.user(&admin, "newbie").await;
    let (_, project) = server
        .post("/api/projects", &owner, json!({"name": "Team"}))
        .await;
    let members = format!("/api/projects/{}/members", project["id"]);

    let (status, list) = server
        .post(
            &members,
            &owner,
            json!({"username": "eddie", "role": "editor"}),
        )
        .await;
    assert_eq!(status, 200);
    assert_eq!(list.as_array().map(Vec::len), Some(2));
    let refused = server
        .post(
            &members,
            &editor,
            json!({"username": "newbie", "role": "viewer"}),
        )
        .await;
    assert_error(&refused, 403, "forbidden", "owner role");
    let bad_role = server
        .post(
            &members,
            &owner,
            json!({"username": "newbie", "role": "boss"}),
        )
        .await;
    assert_error(&bad_role, 400, "bad_request", "viewer, editor or owner");
    let ghost = server
        .post(
            &members,
            &owner,
            json!({"username": "ghost", "role": "viewer"}),
        )
        .await;
    assert_error(&ghost, 404, "not_found", "ghost");
    let demote_last = server
        .post(
            &members,
            &owner,
            json!({"username": "olga", "role": "editor"}),
        )
        .await;
    assert_error(&demote_last, 409, "conflict", "without an owner");
    let remove_last = server.delete(&format!("{members}/olga"), &owner).await;
    assert_error(&remove_last, 409, "conflict", "last owner");
    assert_eq!(
        server.delete(&format!("{members}/eddie"), &owner).await.0,
        204
    );
    let again = server.delete(&format!("{members}/eddie"), &owner).await;
    assert_error(&again, 404, "not_found", "not a member");
    server.stop().await;
}

async fn only_admins_create_users_and_usernames_are_unique(db: TestDb) {
    let server = TestServer::start(db).await;
    let admin = server.admin_token().await;
    let alice = server.user(&admin, "alice").await;
    let refused = server
        .post("/api/users", &alice, json!({"username": "mallory"}))
        .await;
    assert_error(&refused, 403, "forbidden", "administrator");
    assert_error(
        &server.get("/api/users", &alice).await,
        403,
        "forbidden",
        "administrator",
    );

    let duplicate = server
        .post(
            "/api/users",
            &admin,
            json!({"username": "alice", "password": "long-enough"}),
        )
        .await;
    assert_error(&duplicate, 409, "conflict", "alice");
    let (status, generated) = server
        .post("/api/users", &admin, json!({"username": "bob"}))
        .await;
    assert_eq!(status, 201);
    let password = generated["password"]
        .as_str()
        .expect("a generated password");
    server.login("bob", password).await;
    let short = server
        .post(
            "/api/users",
            &admin,
            json!({"username": "carol", "password": "short"}),
        )
        .await;
    assert_error(&short, 400, "bad_request", "at least 8");
    let bad_name = server
        .post("/api/users", &admin, json!({"username": "bad name"}))
        .await;
    assert_error(&bad_name, 400, "bad_request", "not allowed");
    server.stop().await;
}

async fn bad_input_gets_bad_request_with_what_to_fix(db: TestDb) {
    let server = TestServer::start(db).await;
    let token = server.admin_token().await;
    let raw = |body: &'static str, content_type: &'static str| {
        server
            .http
            .post(server.url("/api/projects"))
            .bearer_auth(&token)
            .header("content-type", content_type)
            .body(body)
            .send()
    };
    let malformed = raw("{\"name\": ", "application/json").await.expect("send");
    assert_eq!(malformed.status(), 400);
    let body: serde_json::Value = malformed.json().await.expect("json");
    assert_eq!(body["code"], "bad_request");
    assert!(
        body["message"]
            .as_str()
            .unwrap_or_default()
            .contains("invalid JSON")
    );

    let not_json = raw("name=x", "application/x-www-form-urlencoded")
        .await
        .expect("send");
    assert_eq!(not_json.status(), 400);
    let body: serde_json::Value = not_json.json().await.expect("json");
    assert!(
        body["message"]
            .as_str()
            .unwrap_or_default()
            .contains("Content-Type")
    );

    let missing = server.post("/api/projects", &token, json!({})).await;
    assert_error(&missing, 400, "bad_request", "name");
    let unknown_field = server
        .post(
            "/api/projects",
            &token,
            json!({"name": "x", "colour": "red"}),
        )
        .await;
    assert_error(&unknown_field, 400, "bad_request", "colour");
    let empty = server
        .post("/api/projects", &token, json!({"name": "   "}))
        .await;
    assert_error(&empty, 400, "bad_request", "1 to 200");
    let control = server
        .post("/api/projects", &token, json!({"name": "a\u{0}b"}))
        .await;
    assert_error(&control, 400, "bad_request", "control");
    let login_missing = server
        .send(
            Method::POST,
            "/api/auth/login",
            None,
            Some(json!({"username": "admin"})),
        )
        .await;
    assert_error(&login_missing, 400, "bad_request", "password");
    let not_a_number = server.get("/api/projects/abc", &token).await;
    assert_error(&not_a_number, 400, "bad_request", "abc");
    let (status, list) = server.get("/api/projects", &token).await;
    assert_eq!(
        (status, list),
        (200, json!([])),
        "nothing was created by bad input"
    );
    server.stop().await;
}

async fn oversized_bodies_get_too_large(db: TestDb) {
    let server = TestServer::start_with(db, |config| config.max_request_body = 4096).await;
    let token = server.admin_token().await;
    let huge = server
        .post("/api/projects", &token, json!({"name": "x".repeat(10_000)}))
        .await;
    assert_error(&huge, 413, "too_large", "BRANCHD_MAX_REQUEST_BODY");
    let (_, list) = server.get("/api/projects", &token).await;
    assert_eq!(list, json!([]));
    server.stop().await;
}

async fn unknown_things_get_not_found(db: TestDb) {
    let server = TestServer::start(db).await;
    let token = server.admin_token().await;
    assert_error(
        &server.get("/api/projects/999", &token).await,
        404,
        "not_found",
        "999",
    );
    assert_error(
        &server.get("/api/nothing", &token).await,
        404,
        "not_found",
        "/api/nothing",
    );
    let wrong_method = server
        .send(Method::PUT, "/api/projects", Some(&token), None)
        .await;
    assert_error(&wrong_method, 400, "bad_request", "PUT");
    server.stop().await;
}

async fn health_and_readiness_answer(db: TestDb) {
    let server = TestServer::start(db).await;
    let (status, health) = server.send(Method::GET, "/healthz", None, None).await;
    assert_eq!((status, health), (200, json!({"status": "ok"})));
    let (status, ready) = server.send(Method::GET, "/readyz", None, None).await;
    assert_eq!((status, ready), (200, json!({"status": "ready"})));
    server.stop().await;
}

/// One login attempt through `http`: status, `Retry-After` (seconds) and
/// body.
async fn login_attempt(
    http: &reqwest::Client,
    base: &str,
    username: &str,
    password: &str,
) -> (u16, Option<u64>, serde_json::Value) {
    let response = http
        .post(format!("{base}/api/auth/login"))
        .json(&json!({"username": username, "password": password}))
        .send()
        .await
        .expect("login request sent");
    let status = response.status().as_u16();
    let retry_after = response.headers().get("retry-after").map(|value| {
        value
            .to_str()
            .ok()
            .and_then(|v| v.parse().ok())
            .expect("Retry-After is whole seconds")
    });
    let body = response.json().await.expect("a JSON body");
    (status, retry_after, body)
}

/// A client whose connections come from 127.0.0.2: another address.
fn client_from_another_address() -> reqwest::Client {
    reqwest::Client::builder()
        .local_address(std::net::IpAddr::from([127, 0, 0, 2]))
        .build()
        .expect("a client")
}

/// Asserts a 429 `rate_limited` for a pause of `pause` that began after
/// `since` (the moment before the failure that earned it was sent): the
/// wait it asks for is at most `pause` and no shorter than what is left of
/// it, however slow the machine; `Retry-After` is that wait in whole
/// seconds, rounded up. Returns the wait.
fn assert_paused(
    attempt: &(u16, Option<u64>, serde_json::Value),
    pause: Duration,
    since: std::time::Instant,
) -> Duration {
    let (status, retry_after, body) = attempt;
    assert_eq!(
        (*status, body["code"].as_str()),
        (429, Some("rate_limited")),
        "{body}"
    );
    let wait = Duration::from_millis(body["retry_after_ms"].as_u64().expect("retry_after_ms"));
    assert!(
        wait <= pause,
        "asked to wait {wait:?} for a pause of {pause:?}"
    );
    let left = pause.saturating_sub(since.elapsed());
    assert!(
        wait + Duration::from_millis(1) >= left,
        "asked to wait {wait:?} when {left:?} of the pause is left"
    );
    let seconds = wait.as_secs() + u64::from(wait.subsec_nanos() > 0);
    assert_eq!(*retry_after, Some(seconds), "Retry-After, body {body}");
    assert!(
        body["message"]
            .as_str()
            .is_some_and(|m| m.contains("too many failed logins")),
        "{body}"
    );
    wait
}

async fn failed_logins_pause_the_username_for_a_growing_time(db: TestDb) {
    let server = TestServer::start(db).await;
    let (http, base) = (&server.http, server.base.as_str());
    let password = common::ADMIN_PASSWORD;
    let second = Duration::from_secs(1);
    let mut since = std::time::Instant::now();
    for _ in 0..5 {
        since = std::time::Instant::now();
        let wrong = login_attempt(http, base, "admin", "not-the-password").await;
        assert_eq!((wrong.0, wrong.1), (401, None), "{}", wrong.2);
    }
    // The fifth failure paused the username for 1 s: even the right
    // password has to wait.
    let right = login_attempt(http, base, "admin", password).await;
    tokio::time::sleep(assert_paused(&right, second, since)).await;
    // The next failure doubles the pause.
    let since = std::time::Instant::now();
    let wrong = login_attempt(http, base, "admin", "not-the-password").await;
    assert_eq!(wrong.0, 401, "{}", wrong.2);
    let right = login_attempt(http, base, "admin", password).await;
    let wait = assert_paused(&right, 2 * second, since);
    // Other usernames are not paused.
    let other = login_attempt(http, base, "someone", "not-the-password").await;
    assert_eq!(other.0, 401, "{}", other.2);
    tokio::time::sleep(wait).await;
    let (status, _, body) = login_attempt(http, base, "admin", password).await;
    assert_eq!(status, 200, "{body}");
    // A success starts the count again: one failure is free once more.
    let wrong = login_attempt(http, base, "admin", "not-the-password").await;
    assert_eq!(wrong.0, 401, "{}", wrong.2);
    let (status, _, body) = login_attempt(http, base, "admin", password).await;
    assert_eq!(status, 200, "{body}");
    server.stop().await;
}

async fn failed_logins_from_one_address_pause_it_whatever_the_username(db: TestDb) {
    // A pause long enough to outlast the logins below on a slow machine.
    let pause = Duration::from_secs(60);
    let server = TestServer::start_with(db, |config| config.login_backoff = pause).await;
    let (http, base) = (&server.http, server.base.as_str());
    let password = common::ADMIN_PASSWORD;
    let mut since = std::time::Instant::now();
    for n in 0..20 {
        since = std::time::Instant::now();
        let wrong = login_attempt(http, base, &format!("guess{n}"), "whatever1").await;
        assert_eq!(wrong.0, 401, "{}", wrong.2);
    }
    assert_paused(
        &login_attempt(http, base, "admin", password).await,
        pause,
        since,
    );
    // Another address is not paused, and its success does not free the first.
    let elsewhere = client_from_another_address();
    let (status, _, body) = login_attempt(&elsewhere, base, "admin", password).await;
    assert_eq!(status, 200, "{body}");
    assert_paused(
        &login_attempt(http, base, "admin", password).await,
        pause,
        since,
    );
    server.stop().await;
}

async fn logins_beyond_the_hashing_queue_get_503_at_once(db: TestDb) {
    let server = TestServer::start_with(db, |config| {
        config.hash_concurrency = 1;
        config.hash_queue = 1;
        // Only the hashing bound answers here.
        config.login_failures_per_user = 0;
        config.login_failures_per_address = 0;
    })
    .await;
    let attempts = (0..32).map(|_| {
        let (http, base) = (server.http.clone(), server.base.clone());
        tokio::spawn(async move { login_attempt(&http, &base, "admin", "not-the-password").await })
    });
    let mut busy = 0;
    for attempt in attempts.collect::<Vec<_>>() {
        let (status, retry_after, body) = attempt.await.expect("attempt");
        match status {
            401 => assert_eq!(retry_after, None),
            503 => {
                busy += 1;
                assert_eq!(body["code"], "unavailable", "{body}");
                assert_eq!(retry_after, Some(1), "{body}");
                assert_eq!(body["retry_after_ms"], 1000, "{body}");
                assert!(
                    body["message"]
                        .as_str()
                        .is_some_and(|m| m.contains("too many password checks")),
                    "{body}"
                );
            }
            other => panic!("unexpected {other}: {body}"),
        }
    }
    assert!(
        busy > 0,
        "32 logins at once on 1 hashing thread with a queue of 1: none refused"
    );
    // Refusals cost nothing and leave no mark: the right password works.
    server.login("admin", common::ADMIN_PASSWORD).await;
    server.stop().await;
}

mod connections {
    use super::*;
    use branchd::client::Client;
    use branchd::protocol::{Op, Reply};
    use common::process::{Served, create_project, login};
    use std::sync::Arc;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::TcpStream;

    fn addr(server: &TestServer) -> String {
        server.base.trim_start_matches("http://").to_string()
    }

    /// Reads until the server closes the connection (end of file or a
    /// reset); fails if it is still open after `within`. Returns what was
    /// read.
    async fn closed_within(stream: &mut TcpStream, within: Duration) -> Vec<u8> {
        let mut read = Vec::new();
        match tokio::time::timeout(within, stream.read_to_end(&mut read)).await {
            Ok(_) => read,
            Err(_) => panic!("the connection is still open after {within:?}"),
        }
    }

    /// Whether the server is holding the connection open (nothing to read
    /// and no end of file for `for_at_least`).
    async fn still_open(stream: &mut TcpStream, for_at_least: Duration) -> bool {
        let mut byte = [0u8; 1];
        tokio::time::timeout(for_at_least, stream.read(&mut byte))
            .await
            .is_err()
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_client_that_does_not_send_its_headers_in_time_is_disconnected() {
        let timeout = Duration::from_millis(500);
        let server = TestServer::start_with(TestDb::sqlite().await, |config| {
            config.header_read_timeout = timeout;
        })
        .await;
        // Half a request, then nothing (slowloris).
        let mut slow = TcpStream::connect(addr(&server)).await.expect("connect");
        slow.write_all(b"GET /healthz HTTP/1.1\r\nHost: branchd\r\nX-Slow: 1\r\n")
            .await
            .expect("write");
        let started = std::time::Instant::now();
        let answer = closed_within(&mut slow, Duration::from_secs(10)).await;
        assert!(started.elapsed() >= timeout - Duration::from_millis(50));
        assert!(
            !String::from_utf8_lossy(&answer).contains("200 OK"),
            "{answer:?}"
        );
        // A client that sends nothing at all is closed the same way.
        let mut silent = TcpStream::connect(addr(&server)).await.expect("connect");
        closed_within(&mut silent, Duration::from_secs(10)).await;
        // One that sends its headers in time is answered, and its kept-alive
        // connection then has the same time for its next request.
        let mut prompt = TcpStream::connect(addr(&server)).await.expect("connect");
        prompt
            .write_all(b"GET /healthz HTTP/1.1\r\nHost: branchd\r\n\r\n")
            .await
            .expect("write");
        let answer = closed_within(&mut prompt, Duration::from_secs(10)).await;
        assert!(
            String::from_utf8_lossy(&answer).starts_with("HTTP/1.1 200 OK"),
            "{answer:?}"
        );
        server.stop().await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_connection_on_which_nothing_moves_is_closed_but_a_websocket_is_not() {
        let idle = Duration::from_millis(500);
        let (server, admin, project) =
            common::server_with_project(TestDb::sqlite().await, |config| {
                config.http_idle_timeout = idle;
            })
            .await;
        // Headers in full, then a body that never comes.
        let mut stalled = TcpStream::connect(addr(&server)).await.expect("connect");
        stalled
            .write_all(
                b"POST /api/auth/login HTTP/1.1\r\nHost: branchd\r\n\
                  Content-Type: application/json\r\nContent-Length: 100\r\n\r\n{\"user",
            )
            .await
            .expect("write");
        let started = std::time::Instant::now();
        let answer = closed_within(&mut stalled, Duration::from_secs(10)).await;
        assert!(started.elapsed() >= idle - Duration::from_millis(50));
        assert!(answer.is_empty(), "{}", String::from_utf8_lossy(&answer));
        // A WebSocket is no longer HTTP: quiet for longer than the idle
        // timeout, it stays open and answers.
        let client = Client::connect(&server.base, &admin, project, "main")
            .await
            .expect("connect");
        tokio::time::sleep(idle * 3).await;
        client.ping().await.expect("the socket still answers");
        client.close().await;
        server.stop().await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn connections_beyond_the_per_address_cap_are_closed_at_once() {
        let server = TestServer::start_with(TestDb::sqlite().await, |config| {
            config.max_connections_per_address = 3;
        })
        .await;
        // Set-up from another address, so that 127.0.0.1 has only what follows.
        let elsewhere = client_from_another_address();
        let (status, _, body) =
            login_attempt(&elsewhere, &server.base, "admin", common::ADMIN_PASSWORD).await;
        assert_eq!(status, 200, "{body}");
        let token = body["token"].as_str().expect("token");
        let project = create_project(&elsewhere, &server.base, token, "Capped").await;
        // Three connections from 127.0.0.1, a WebSocket among them.
        let client = Client::connect(&server.base, token, project, "main")
            .await
            .expect("a WebSocket within the cap");
        let mut first = TcpStream::connect(addr(&server)).await.expect("connect");
        let mut second = TcpStream::connect(addr(&server)).await.expect("connect");
        // The fourth is closed before anything is read.
        let mut fourth = TcpStream::connect(addr(&server)).await.expect("connect");
        let _ = fourth
            .write_all(b"GET /healthz HTTP/1.1\r\nHost: branchd\r\n\r\n")
            .await;
        let answer = closed_within(&mut fourth, Duration::from_secs(5)).await;
        assert!(answer.is_empty(), "{}", String::from_utf8_lossy(&answer));
        assert!(still_open(&mut first, Duration::from_millis(200)).await);
        assert!(still_open(&mut second, Duration::from_millis(200)).await);
        client.ping().await.expect("the WebSocket is unaffected");
        // Other addresses are not affected.
        let response = elsewhere
            .get(server.url("/healthz"))
            .send()
            .await
            .expect("healthz");
        assert_eq!(response.status(), 200);
        // Once one closes, there is room again.
        drop(first);
        common::eventually("a new connection from 127.0.0.1 is served", || async {
            reqwest::Client::new()
                .get(server.url("/healthz"))
                .send()
                .await
                .is_ok_and(|r| r.status() == 200)
        })
        .await;
        drop(second);
        client.close().await;
        server.stop().await;
    }

    const PASSWORD: &str = "a-password-for-tests";

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn two_hundred_wrong_logins_at_once_cost_a_bounded_amount_of_memory() {
        let dir = tempfile::tempdir().expect("dir");
        let served = Served::start_with(
            dir.path(),
            &[
                ("BRANCHD_ADMIN_PASSWORD", PASSWORD),
                // Only the hashing bound acts here.
                ("BRANCHD_LOGIN_FAILURES_PER_USER", "0"),
                ("BRANCHD_LOGIN_FAILURES_PER_ADDRESS", "0"),
            ],
        );
        let http = reqwest::Client::new();
        login(&http, &served.base, "admin", PASSWORD).await;
        let before = served.memory_kib("VmRSS");
        let attempts: Vec<_> = (0..200)
            .map(|_| {
                let (http, base) = (http.clone(), served.base.clone());
                tokio::spawn(async move {
                    login_attempt(&http, &base, "admin", "not-the-password").await
                })
            })
            .collect();
        let mut statuses = std::collections::BTreeMap::<u16, usize>::new();
        for attempt in attempts {
            let (status, _, body) = attempt.await.expect("attempt");
            assert!(status == 401 || status == 503, "{status}: {body}");
            *statuses.entry(status).or_default() += 1;
        }
        let peak_growth_mib = served.memory_kib("VmHWM").saturating_sub(before) / 1024;
        let after_growth_mib = served.memory_kib("VmRSS").saturating_sub(before) / 1024;
        // 200 argon2id hashes at once would take about 3.8 GiB.
        assert!(
            peak_growth_mib < 256,
            "peak grew by {peak_growth_mib} MiB ({statuses:?})"
        );
        assert!(after_growth_mib < 256, "kept {after_growth_mib} MiB");
        // The queue's worth was checked; the rest was refused at once.
        assert!(statuses.contains_key(&503), "{statuses:?}");
        login(&http, &served.base, "admin", PASSWORD).await;
        served.terminate();
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn with_few_file_descriptors_a_flood_of_connections_is_refused_and_the_database_keeps_working()
     {
        // 512 open files, 256 kept in reserve (the default): 256 connections.
        const NOFILE: u64 = 512;
        const BUDGET: usize = 256;
        const FLOOD: usize = 600;
        let dir = tempfile::tempdir().expect("dir");
        let served = Served::start_with_open_file_limit(
            dir.path(),
            &[
                ("BRANCHD_ADMIN_PASSWORD", PASSWORD),
                // All from 127.0.0.1: this is about the node's budget.
                ("BRANCHD_MAX_CONNECTIONS_PER_ADDRESS", "0"),
                // The flood holds its connections for the whole test.
                ("BRANCHD_HEADER_READ_TIMEOUT", "5m"),
            ],
            NOFILE,
        );
        let http = reqwest::Client::new();
        let token = login(&http, &served.base, "admin", PASSWORD).await;
        let project = create_project(&http, &served.base, &token, "Flooded").await;
        let client = Client::connect(&served.base, &token, project, "main")
            .await
            .expect("connect");
        let write = |path: &str, content: &str| Op::WriteFile {
            path: path.into(),
            content: content.as_bytes().to_vec(),
            base_version: None,
            force: false,
        };
        client
            .request(write("before.txt", "before the flood\n"))
            .await
            .expect("a write before the flood");

        // Far more connections than the node has room for; none sends a byte.
        let addr = served.base.trim_start_matches("http://").to_string();
        let refused = Arc::new(AtomicUsize::new(0));
        let mut flood = Vec::new();
        for _ in 0..FLOOD {
            let mut stream = TcpStream::connect(&addr).await.expect("connect");
            let refused = refused.clone();
            flood.push(tokio::spawn(async move {
                let mut byte = [0u8; 1];
                let _ = stream.read(&mut byte).await;
                refused.fetch_add(1, Ordering::SeqCst);
            }));
        }
        // The node takes what its budget allows and closes the rest at once.
        common::eventually_within(
            "the connections beyond the budget are closed",
            Duration::from_secs(30),
            || async { refused.load(Ordering::SeqCst) >= FLOOD - BUDGET },
        )
        .await;
        tokio::time::sleep(Duration::from_millis(500)).await;
        let closed = refused.load(Ordering::SeqCst);
        assert!(
            closed <= FLOOD - BUDGET + 4,
            "{closed} closed: the budget was not used"
        );

        // Meanwhile the database and the working copy have descriptors left.
        client
            .request(write("during.txt", "during the flood\n"))
            .await
            .expect("a write during the flood");
        let committed = client
            .request(Op::GitCommit {
                message: "during the flood".into(),
                paths: None,
            })
            .await
            .expect("a commit during the flood");
        assert!(
            matches!(committed, Reply::Committed { .. }),
            "{committed:?}"
        );
        let saved = client
            .request(Op::Save)
            .await
            .expect("a save during the flood");
        assert!(matches!(saved, Reply::Saved { .. }), "{saved:?}");

        // Once the flood is gone, new clients are served again.
        for connection in &flood {
            connection.abort();
        }
        let fresh = reqwest::Client::new();
        common::eventually("logins work again", || async {
            fresh
                .post(format!("{}/api/auth/login", served.base))
                .json(&json!({"username": "admin", "password": PASSWORD}))
                .send()
                .await
                .is_ok_and(|r| r.status() == 200)
        })
        .await;
        let token = login(&fresh, &served.base, "admin", PASSWORD).await;
        let another = create_project(&fresh, &served.base, &token, "After").await;
        assert!(another > project);
        client.ping().await.expect("the WebSocket lived through it");
        client.close().await;
        served.terminate();
    }
}

mod ops {
    use super::*;
    use branchd::storage::{Role, WorkspaceKey};

    #[tokio::test]
    async fn ops_workspaces_lists_live_workspaces_for_admins_only() {
        let server = TestServer::start(TestDb::sqlite().await).await;
        let admin = server.admin_token().await;
        let (_, project) = server
            .post("/api/projects", &admin, json!({"name": "Ops"}))
            .await;
        let key = WorkspaceKey::new(project["id"].as_i64().expect("id"), "main");
        let (events, _received) = tokio::sync::mpsc::channel(8);
        server
            .server
            .as_ref()
            .expect("running")
            .allocator()
            .register(common::session("ada", Role::Editor), &key, events)
            .await
            .expect("register");

        let (status, view) = server.get("/ops/api/workspaces", &admin).await;
        assert_eq!(status, 200, "{view}");
        assert_eq!(view["server_tag"], "test-node");
        assert_eq!(view["stats"]["activations"], 1);
        let workspace = &view["workspaces"][0];
        assert_eq!(workspace["state"], "active");
        assert_eq!(workspace["ref_count"], 1);
        assert_eq!(workspace["sessions"], json!(["ada"]));

        let viewer = server.user(&admin, "vera").await;
        let refused = server.get("/ops/api/workspaces", &viewer).await;
        assert_error(&refused, 403, "forbidden", "administrator");
        let (status, reset) = server
            .post(
                "/ops/api/workspaces/reset",
                &admin,
                json!({"project": key.project_id, "branch": "main"}),
            )
            .await;
        assert_eq!(
            (status, reset),
            (200, json!({"reset": false, "nodes": [], "unreached": []}))
        );
        server.stop().await;
    }

    /// Every `/ops/api` route docs/operations.md documents, as (method, path).
    fn documented_ops_routes() -> Vec<(Method, String)> {
        let docs =
            std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/docs/operations.md"))
                .expect("docs/operations.md");
        docs.lines()
            .filter_map(|line| line.strip_prefix("#### `")?.strip_suffix('`'))
            .filter_map(|route| route.split_once(' '))
            .filter(|(_, path)| path.starts_with("/ops/api/"))
            .map(|(method, path)| {
                let method = Method::from_bytes(method.as_bytes()).expect("a method");
                (method, path.to_string())
            })
            .collect()
    }

    #[tokio::test]
    async fn every_ops_route_refuses_anyone_but_an_administrator() {
        let routes = documented_ops_routes();
        assert!(routes.len() >= 3, "found only {routes:?} in the docs");
        let server = TestServer::start(TestDb::sqlite().await).await;
        let admin = server.admin_token().await;
        let viewer = server.user(&admin, "vera").await;
        for (method, path) in &routes {
            // No body: the admin check comes before the body is read.
            let refused = server.send(method.clone(), path, Some(&viewer), None).await;
            assert_error(&refused, 403, "forbidden", "administrator");
            let anonymous = server.send(method.clone(), path, None, None).await;
            assert_eq!(anonymous.0, 401, "{method} {path}: {}", anonymous.1);
            let (status, body) = server.send(method.clone(), path, Some(&admin), None).await;
            assert!(
                status == 200 || (*method == Method::POST && status == 400),
                "{method} {path} as admin: {status} {body}"
            );
        }
        // Routing still comes first: an unknown path is 404 and a wrong
        // method 400, for anyone.
        let unknown = server.get("/ops/api/nothing", &viewer).await;
        assert_error(&unknown, 404, "not_found", "/ops/api/nothing");
        let wrong_method = server
            .send(Method::DELETE, "/ops/api/workspaces", Some(&admin), None)
            .await;
        assert_error(&wrong_method, 400, "bad_request", "DELETE");
        server.stop().await;
    }
}
