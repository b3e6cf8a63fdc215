//! The HTTP API through a real server on a real socket: logins, roles, bad
//! input and the error codes a client sees. Every case runs on SQLite and
//! on Postgres.

mod common;

use branchd::workspace::snapshot;
use common::{TestDb, TestServer, assert_error};
use reqwest::Method;
use serde_json::json;

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
