//! The WebSocket protocol from the client's side: a real server on a real
//! socket, driven by `branchd::client::Client` and by raw frames.

mod common;

use std::time::Duration;

use branchd::client::{Client, ClientError, Unmatched};
use branchd::protocol::{EntryKind, ErrorCode, Event, Op, Reply, Role};
use branchd::storage::WorkspaceKey;
use common::{TestDb, TestServer, eventually};
use futures_util::StreamExt;
use serde_json::json;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;

const WAIT: Duration = Duration::from_secs(10);

on_both_backends!(
    the_welcome_comes_first_and_every_op_answers,
    two_clients_see_each_others_edits_and_presence,
);

/// A server, an admin token and a project; returns (server, admin token, project id).
async fn server_with_project(db: TestDb) -> (TestServer, String, i64) {
    server_pinging_every(db, Duration::from_secs(15)).await
}

async fn server_pinging_every(db: TestDb, ping_interval: Duration) -> (TestServer, String, i64) {
    common::server_with_project(db, |config| {
        config.max_frame = 256 * 1024;
        config.ping_interval = ping_interval;
    })
    .await
}

async fn connect(server: &TestServer, token: &str, project: i64, branch: &str) -> Client {
    Client::connect(&server.base, token, project, branch)
        .await
        .expect("connects")
}

/// The next event that is not `presence`.
async fn event(client: &mut Client) -> Event {
    loop {
        match client.next_event(WAIT).await.expect("an event") {
            other if common::is_presence(&other) => continue,
            other => return other,
        }
    }
}

fn op_code(result: Result<Reply, ClientError>) -> ErrorCode {
    match result {
        Err(ClientError::Op(err)) => err.code,
        other => panic!("expected an error reply, got {other:?}"),
    }
}

async fn the_welcome_comes_first_and_every_op_answers(db: TestDb) {
    let (server, admin, project) = server_with_project(db).await;
    let client = connect(&server, &admin, project, "main").await;
    let welcome = client.welcome().clone();
    assert_eq!(welcome.protocol, 1);
    assert_eq!(
        (welcome.node.as_str(), welcome.owner.as_str()),
        ("test-node", "test-node")
    );
    assert_eq!(
        (welcome.project, welcome.branch.as_str(), welcome.role),
        (project, "main", Role::Owner)
    );
    assert_eq!(welcome.head.len(), 40);
    assert_eq!(client.ping().await.expect("ping"), "test-node");

    let got = client
        .request(Op::ListTree { path: None })
        .await
        .expect("list_tree");
    let Reply::Tree { entries, .. } = got else {
        panic!("expected Reply::Tree, got {got:?}");
    };
    assert_eq!(entries[0].path, "README.md");
    let got = client
        .request(Op::ReadFile {
            path: "README.md".into(),
        })
        .await
        .expect("read_file");
    let Reply::File {
        content, version, ..
    } = got
    else {
        panic!("expected Reply::File, got {got:?}");
    };
    assert_eq!(content, b"# Gearbox\n");
    let got = client
        .request(Op::WriteFile {
            path: "README.md".into(),
            content: b"# Gearbox\nv2\n".to_vec(),
            base_version: Some(version),
            force: false,
        })
        .await
        .expect("write_file");
    let Reply::Written { path, version: v2 } = got else {
        panic!("expected Reply::Written, got {got:?}");
    };
    assert_eq!(path, "README.md");
    assert_eq!(v2.len(), 40);
    client
        .request(Op::WriteFile {
            path: "parts/gear.rhai".into(),
            content: b"cube(1, 1, 1)".to_vec(),
            base_version: None,
            force: false,
        })
        .await
        .expect("create");
    assert!(matches!(
        client
            .request(Op::MakeDir {
                path: "empty".into()
            })
            .await
            .expect("make_dir"),
        Reply::Done {}
    ));
    assert!(matches!(
        client
            .request(Op::RenamePath {
                from: "empty".into(),
                to: "blank".into()
            })
            .await
            .expect("rename_path"),
        Reply::Done {}
    ));
    assert!(matches!(
        client
            .request(Op::DeletePath {
                path: "blank".into(),
                base_version: None
            })
            .await
            .expect("delete_path"),
        Reply::Done {}
    ));
    let got = client
        .request(Op::Lock {
            ttl_ms: Some(5_000),
        })
        .await
        .expect("lock");
    let Reply::LockTaken {
        holder, expires_at, ..
    } = got
    else {
        panic!("expected Reply::LockTaken, got {got:?}");
    };
    assert_eq!(holder, welcome.session);
    assert!(expires_at > 0);
    assert!(matches!(
        client.request(Op::Unlock).await.expect("unlock"),
        Reply::Done {}
    ));
    let got = client.request(Op::Save).await.expect("save");
    let Reply::Saved {
        snapshot_version, ..
    } = got
    else {
        panic!("expected Reply::Saved, got {got:?}");
    };
    assert_eq!(snapshot_version, 2);
    assert_eq!(
        op_code(
            client
                .request(Op::Compile {
                    entry: "main.rhai".into()
                })
                .await
        ),
        ErrorCode::NotFound
    );
    let got = client.request(Op::GitStatus).await.expect("git_status");
    let Reply::Status {
        branch, changes, ..
    } = got
    else {
        panic!("expected Reply::Status, got {got:?}");
    };
    assert_eq!(branch, "main");
    assert_eq!(changes.len(), 2);
    let got = client
        .request(Op::GitDiff {
            path: Some("README.md".into()),
        })
        .await
        .expect("git_diff");
    let Reply::Diff { diff, .. } = got else {
        panic!("expected Reply::Diff, got {got:?}");
    };
    assert!(diff.contains("+v2"), "{diff}");
    let got = client
        .request(Op::GitCommit {
            message: "Add a gear".into(),
            paths: None,
        })
        .await
        .expect("git_commit");
    let Reply::Committed { commit } = got else {
        panic!("expected Reply::Committed, got {got:?}");
    };
    let got = client
        .request(Op::GitLog { limit: Some(5) })
        .await
        .expect("git_log");
    let Reply::Log { commits, .. } = got else {
        panic!("expected Reply::Log, got {got:?}");
    };
    assert_eq!(commits.len(), 2);
    assert_eq!(commits[0].id, commit);
    assert_eq!(commits[0].author, "admin");
    let got = client
        .request(Op::GitCreateBranch {
            name: "feature".into(),
        })
        .await
        .expect("git_create_branch");
    let Reply::BranchCreated { branch, .. } = got else {
        panic!("expected Reply::BranchCreated, got {got:?}");
    };
    assert_eq!(branch, "feature");
    let got = client.request(Op::GitBranches).await.expect("git_branches");
    let Reply::Branches { branches, .. } = got else {
        panic!("expected Reply::Branches, got {got:?}");
    };
    assert_eq!(branches, ["feature", "main"]);
    let on_branch = connect(&server, &admin, project, "feature").await;
    assert_eq!(
        on_branch.welcome().head,
        commit,
        "the new branch starts at HEAD"
    );
    on_branch.close().await;
    client.close().await;
    server.stop().await;
}

async fn two_clients_see_each_others_edits_and_presence(db: TestDb) {
    let (server, admin, project) = server_with_project(db).await;
    let ed = server.member(&admin, project, "ed", "editor").await;
    let mut alice = connect(&server, &admin, project, "main").await;
    let mut bob = connect(&server, &ed, project, "main").await;
    let bob_session = bob.welcome().session.clone();

    let mut seen = common::Present::default();
    while seen.0.len() < 2 {
        let event = alice.next_event(WAIT).await.expect("presence");
        assert!(seen.follow(&event), "expected presence, got {event:?}");
    }
    let users: Vec<&str> = seen.0.values().map(String::as_str).collect();
    assert_eq!(users.len(), 2);
    assert!(
        users.contains(&"admin") && users.contains(&"ed"),
        "{users:?}"
    );

    let got = bob
        .request(Op::WriteFile {
            path: "b.txt".into(),
            content: b"from bob".to_vec(),
            base_version: None,
            force: false,
        })
        .await
        .expect("bob writes");
    let Reply::Written { version, .. } = got else {
        panic!("expected Reply::Written, got {got:?}");
    };
    match event(&mut alice).await {
        Event::FileChanged {
            path,
            version: v,
            by,
            kind,
        } => {
            assert_eq!(
                (path.as_str(), v.as_deref(), kind),
                ("b.txt", Some(version.as_str()), EntryKind::File)
            );
            assert_eq!(
                (by.session.as_str(), by.user.as_str()),
                (bob_session.as_str(), "ed")
            );
        }
        other => panic!("expected file_changed, got {other:?}"),
    }
    alice
        .request(Op::RenamePath {
            from: "b.txt".into(),
            to: "c.txt".into(),
        })
        .await
        .expect("rename");
    assert!(
        matches!(event(&mut bob).await, Event::PathRenamed { from, to, .. } if from == "b.txt" && to == "c.txt")
    );
    alice
        .request(Op::DeletePath {
            path: "c.txt".into(),
            base_version: Some(version),
        })
        .await
        .expect("delete");
    assert!(matches!(event(&mut bob).await, Event::PathDeleted { path, .. } if path == "c.txt"));
    alice
        .request(Op::Lock {
            ttl_ms: Some(10_000),
        })
        .await
        .expect("lock");
    assert!(matches!(
        event(&mut bob).await,
        Event::LockChanged {
            holder: Some(_),
            expires_at: Some(_),
            ..
        }
    ));
    let refused = bob
        .request(Op::WriteFile {
            path: "x".into(),
            content: vec![],
            base_version: None,
            force: true,
        })
        .await;
    match refused {
        Err(ClientError::Op(err)) => {
            assert_eq!(err.code, ErrorCode::Locked);
            assert_eq!(err.lock.expect("lock details").user, "admin");
        }
        other => panic!("expected locked, got {other:?}"),
    }
    alice.request(Op::Unlock).await.expect("unlock");
    assert!(matches!(
        event(&mut bob).await,
        Event::LockChanged { holder: None, .. }
    ));
    bob.request(Op::WriteFile {
        path: "d.txt".into(),
        content: b"d".to_vec(),
        base_version: None,
        force: false,
    })
    .await
    .expect("write");
    event(&mut alice).await;
    bob.request(Op::GitCommit {
        message: "d".into(),
        paths: None,
    })
    .await
    .expect("commit");
    assert!(matches!(event(&mut alice).await, Event::Committed { by, .. } if by.user == "ed"));
    bob.request(Op::Save).await.expect("save");
    assert!(matches!(
        event(&mut alice).await,
        Event::Saved {
            snapshot_version: 2,
            ..
        }
    ));

    bob.close().await;
    while seen.0.len() > 1 {
        let event = alice.next_event(WAIT).await.expect("presence after leave");
        assert!(seen.follow(&event), "expected presence, got {event:?}");
    }
    assert!(!seen.0.contains_key(&bob_session), "{seen:?}");
    alice.close().await;
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stale_write_conflicts_and_a_viewer_cannot_write() {
    let (server, admin, project) = server_with_project(TestDb::sqlite().await).await;
    let viewer = server.member(&admin, project, "vic", "viewer").await;
    let owner = connect(&server, &admin, project, "main").await;
    let watcher = connect(&server, &viewer, project, "main").await;
    assert_eq!(watcher.welcome().role, Role::Viewer);

    let got = owner
        .request(Op::ReadFile {
            path: "README.md".into(),
        })
        .await
        .expect("read");
    let Reply::File { version, .. } = got else {
        panic!("expected Reply::File, got {got:?}");
    };
    let got = owner
        .request(Op::WriteFile {
            path: "README.md".into(),
            content: b"new".to_vec(),
            base_version: Some(version.clone()),
            force: false,
        })
        .await
        .expect("write");
    let Reply::Written { version: newer, .. } = got else {
        panic!("expected Reply::Written, got {got:?}");
    };
    match owner
        .request(Op::WriteFile {
            path: "README.md".into(),
            content: b"stale".to_vec(),
            base_version: Some(version),
            force: false,
        })
        .await
    {
        Err(ClientError::Op(err)) => {
            assert_eq!(err.code, ErrorCode::Conflict);
            assert_eq!(err.current_version, Some(newer));
        }
        other => panic!("expected conflict, got {other:?}"),
    }
    let got = watcher
        .request(Op::ReadFile {
            path: "README.md".into(),
        })
        .await
        .expect("viewers read");
    let Reply::File { content, .. } = got else {
        panic!("expected Reply::File, got {got:?}");
    };
    assert_eq!(content, b"new", "nothing lost");
    for op in [
        Op::WriteFile {
            path: "v.txt".into(),
            content: vec![],
            base_version: None,
            force: true,
        },
        Op::DeletePath {
            path: "README.md".into(),
            base_version: None,
        },
        Op::Lock { ttl_ms: None },
        Op::GitCommit {
            message: "m".into(),
            paths: None,
        },
        Op::Save,
    ] {
        assert_eq!(op_code(watcher.request(op).await), ErrorCode::Forbidden);
    }
    assert!(watcher.request(Op::GitLog { limit: None }).await.is_ok());
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_frames_get_errors_and_the_connection_survives() {
    let (server, admin, project) = server_with_project(TestDb::sqlite().await).await;
    let mut client = connect(&server, &admin, project, "main").await;
    let error_event = |event: Option<Event>| match event {
        Some(Event::Error { code, message, .. }) => (code, message),
        other => panic!("expected an error event, got {other:?}"),
    };

    client
        .send_raw(Message::Text("{\"op\":\"ping\"}".into()))
        .await
        .expect("send");
    let (code, message) = error_event(next_error(&mut client).await);
    assert_eq!(code, ErrorCode::BadRequest);
    assert!(message.contains("text frames"), "{message}");

    client
        .send_raw(Message::Binary(vec![0xc1, 0xff, 0x00].into()))
        .await
        .expect("send");
    let (code, message) = error_event(next_error(&mut client).await);
    assert_eq!(code, ErrorCode::BadRequest);
    assert!(message.contains("not valid MessagePack"), "{message}");

    let array = rmp_serde::to_vec(&vec![1, 2, 3]).expect("encode");
    client
        .send_raw(Message::Binary(array.into()))
        .await
        .expect("send");
    assert!(error_event(next_error(&mut client).await).1.contains("map"));

    let no_id = rmp_serde::to_vec_named(&json!({"op": "git_status"})).expect("encode");
    client
        .send_raw(Message::Binary(no_id.into()))
        .await
        .expect("send");
    assert!(
        error_event(next_error(&mut client).await)
            .1
            .contains("needs one")
    );

    for (frame, hint) in [
        (json!({"id": 900, "op": "launch_rockets"}), "unknown op"),
        (json!({"id": 901}), "no op"),
        (json!({"id": 902, "op": "read_file"}), "path"),
        (json!({"id": 903, "op": 7}), "string"),
        (
            json!({"id": 904, "op": "write_file", "path": "x"}),
            "content",
        ),
    ] {
        let bytes = rmp_serde::to_vec_named(&frame).expect("encode");
        client
            .send_raw(Message::Binary(bytes.into()))
            .await
            .expect("send");
        match client.next_unmatched(WAIT).await {
            Some(Unmatched::Reply {
                id,
                result: Err(err),
            }) => {
                assert_eq!(Some(id), frame["id"].as_u64());
                assert_eq!(err.code, ErrorCode::BadRequest);
                assert!(err.message.contains(hint), "{frame}: {}", err.message);
            }
            other => panic!("{frame}: expected an error reply, got {other:?}"),
        }
    }

    // Over the frame limit (256 KiB here): too_large, with the id.
    let big = rmp_serde::to_vec_named(
        &json!({"id": 905, "op": "write_file", "path": "big", "content": "x".repeat(300 * 1024)}),
    )
    .expect("encode");
    client
        .send_raw(Message::Binary(big.into()))
        .await
        .expect("send");
    match client.next_unmatched(WAIT).await {
        Some(Unmatched::Reply {
            id: 905,
            result: Err(err),
        }) => assert_eq!(err.code, ErrorCode::TooLarge),
        other => panic!("expected too_large, got {other:?}"),
    }
    assert_eq!(
        client.ping().await.expect("the connection survived"),
        "test-node"
    );

    // Over twice the limit the frame is not even read: the socket closes,
    // saying why (an `error` event, then close code 1009).
    let huge = vec![0u8; 600 * 1024];
    client
        .send_raw(Message::Binary(huge.into()))
        .await
        .expect("send");
    match next_error(&mut client).await {
        Some(Event::Error { code, message, .. }) => {
            assert_eq!(code, ErrorCode::TooLarge);
            assert!(message.contains("BRANCHD_MAX_FRAME"), "{message}");
        }
        other => panic!("expected a too_large error event, got {other:?}"),
    }
    assert!(client.ping().await.is_err(), "the socket is closed");
    server.stop().await;
}

/// The next `error` event (presence events skipped).
async fn next_error(client: &mut Client) -> Option<Event> {
    loop {
        match client.next_event(WAIT).await {
            Some(event) if common::is_presence(&event) => continue,
            other => return other,
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upgrades_are_refused_with_http_errors_before_the_socket_opens() {
    let (server, admin, project) = server_with_project(TestDb::sqlite().await).await;
    let stranger = server.user(&admin, "stranger").await;
    let refused = |result: Result<Client, ClientError>| match result {
        Err(ClientError::Refused { status, body }) => (status, body),
        Err(other) => panic!("expected an HTTP refusal, got {other}"),
        Ok(_) => panic!("expected an HTTP refusal, got a connection"),
    };
    let (status, body) = refused(Client::connect(&server.base, "bogus", project, "main").await);
    assert_eq!(status, 401, "{body}");
    assert!(body.contains("unauthorized"));
    let (status, _) = refused(Client::connect(&server.base, &stranger, project, "main").await);
    assert_eq!(status, 403);
    let (status, _) = refused(Client::connect(&server.base, &admin, project + 100, "main").await);
    assert_eq!(status, 404);
    let (status, body) = refused(Client::connect(&server.base, &admin, project, "nope").await);
    assert_eq!(status, 404);
    assert!(body.contains("nope"), "{body}");

    let no_token = format!(
        "{}/ws?project={project}&branch=main",
        server.base.replacen("http", "ws", 1)
    );
    let (status, _) =
        refused(Client::open(no_token.clone().into_client_request().expect("request")).await);
    assert_eq!(status, 401);
    // Browsers pass the token in the query instead.
    let with_query = format!("{no_token}&access_token={admin}");
    let client = Client::open(with_query.into_client_request().expect("request"))
        .await
        .expect("query token works");
    assert_eq!(client.welcome().project, project);
    client.close().await;
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_empty_token_is_no_token_on_either_socket() {
    let (server, admin, project) = server_with_project(TestDb::sqlite().await).await;
    // A login row for the empty token's hash: were an empty token ever
    // looked up, it would let this admin in.
    let (user, _) = server
        .store()
        .user_by_name("admin")
        .await
        .expect("store")
        .expect("admin exists");
    server
        .store()
        .create_auth_session(&branchd::gateway::auth::hash_token(""), user.id, 60_000)
        .await
        .expect("session row");
    let base = server.base.replacen("http", "ws", 1);
    let refused = |result: Result<Client, ClientError>| match result {
        Err(ClientError::Refused { status, body }) => (status, body),
        Err(other) => panic!("expected an HTTP refusal, got {other}"),
        Ok(_) => panic!("expected an HTTP refusal, got a connection"),
    };
    for url in [
        format!("{base}/ws?project={project}&branch=main&access_token="),
        format!("{base}/ws/echo?access_token="),
    ] {
        let request = url.as_str().into_client_request().expect("request");
        let (status, body) = refused(Client::open(request).await);
        assert_eq!(status, 401, "{url}: {body}");
        assert!(body.contains("missing credentials"), "{url}: {body}");
    }
    let mut blank_header = format!("{base}/ws?project={project}&branch=main")
        .into_client_request()
        .expect("request");
    blank_header
        .headers_mut()
        .insert("authorization", "Bearer  ".parse().expect("header value"));
    let (status, body) = refused(Client::open(blank_header).await);
    assert_eq!(status, 401, "{body}");
    // The same socket opens with a real token.
    connect(&server, &admin, project, "main")
        .await
        .close()
        .await;
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_stops_answering_pings_is_dropped_and_its_session_removed() {
    let (server, admin, project) =
        server_pinging_every(TestDb::sqlite().await, Duration::from_millis(500)).await;
    let key = WorkspaceKey::new(project, "main");
    let steady = connect(&server, &admin, project, "main").await;
    let count = |server: &TestServer| {
        let store = server.store().clone();
        let key = key.clone();
        async move { store.sessions_of(&key).await.expect("rows").len() }
    };
    assert_eq!(count(&server).await, 1);

    // A raw socket that reads the welcome and then never reads again, so it
    // never answers a ping.
    let url = format!(
        "{}/ws?project={project}&branch=main&access_token={admin}",
        server.base.replacen("http", "ws", 1)
    );
    let (mut silent, _) = tokio_tungstenite::connect_async(url)
        .await
        .expect("connects");
    let _welcome = silent.next().await.expect("welcome").expect("frame");
    eventually("the silent client's session is recorded", || async {
        count(&server).await == 2
    })
    .await;
    eventually(
        "the silent client is dropped after missing pongs",
        || async { count(&server).await == 1 },
    )
    .await;
    assert_eq!(count(&server).await, 1, "the count is back to what it was");
    assert_eq!(
        steady.ping().await.expect("the steady client is untouched"),
        "test-node"
    );
    let _ = silent.close(None).await;
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pipelined_requests_are_answered_by_id_and_in_order_per_connection() {
    let (server, admin, project) = server_with_project(TestDb::sqlite().await).await;
    let client = connect(&server, &admin, project, "main").await;
    let writes = (0..50).map(|i| {
        client.request(Op::WriteFile {
            path: format!("p/{i}.txt"),
            content: format!("{i}").into_bytes(),
            base_version: None,
            force: true,
        })
    });
    let reads = (0..50).map(|i| {
        client.request(Op::ReadFile {
            path: format!("p/{i}.txt"),
        })
    });
    let (written, read) = tokio::join!(
        futures_util::future::join_all(writes),
        futures_util::future::join_all(reads)
    );
    assert!(
        written
            .iter()
            .all(|r| matches!(r, Ok(Reply::Written { .. })))
    );
    for (i, reply) in read.into_iter().enumerate() {
        match reply.expect("read") {
            Reply::File { content, .. } => assert_eq!(content, format!("{i}").into_bytes()),
            other => panic!("{other:?}"),
        }
    }
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_crash_tells_clients_restarted_and_they_keep_working() {
    let (server, admin, project) = server_with_project(TestDb::sqlite().await).await;
    let mut client = connect(&server, &admin, project, "main").await;
    client.request(Op::Save).await.expect("save");
    let key = WorkspaceKey::new(project, "main");
    let allocator = server.server.as_ref().expect("running").allocator().clone();
    allocator
        .get(&key)
        .expect("live")
        .actor()
        .cast(branchd::workspace::WorkspaceMsg::Panic)
        .expect("cast");
    assert!(matches!(event(&mut client).await, Event::Restarted { .. }));
    let reply = client
        .request(Op::ReadFile {
            path: "README.md".into(),
        })
        .await
        .expect("works after the restart");
    assert!(matches!(reply, Reply::File { .. }));
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_draining_node_tells_clients_to_reconnect() {
    let (server, admin, project) = server_with_project(TestDb::sqlite().await).await;
    let mut client = connect(&server, &admin, project, "main").await;
    client
        .request(Op::WriteFile {
            path: "unsaved.txt".into(),
            content: b"u".to_vec(),
            base_version: None,
            force: true,
        })
        .await
        .expect("write");
    let store = server.store().clone();
    let stopping = tokio::spawn(server.stop());
    match event(&mut client).await {
        Event::Reconnect { reason } => assert!(reason.contains("shutting down"), "{reason}"),
        other => panic!("expected reconnect, got {other:?}"),
    }
    stopping.await.expect("server stops");
    eventually("the socket is closed", || async { client.is_closed() }).await;
    let key = WorkspaceKey::new(project, "main");
    let latest = store
        .latest_snapshot(&key)
        .await
        .expect("read")
        .expect("snapshot");
    assert_eq!(latest.meta.version, 2, "the drain saved the unsaved write");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_hundred_connections_over_twenty_branches_work() {
    let (server, admin, project) = server_with_project(TestDb::sqlite().await).await;
    let first = connect(&server, &admin, project, "main").await;
    for b in 1..20 {
        first
            .request(Op::GitCreateBranch {
                name: format!("b{b}"),
            })
            .await
            .expect("branch");
    }
    first.close().await;
    let branches: Vec<String> = std::iter::once("main".to_string())
        .chain((1..20).map(|b| format!("b{b}")))
        .collect();
    let tasks: Vec<_> = (0..200)
        .map(|i| {
            let (base, token, branch) =
                (server.base.clone(), admin.clone(), branches[i % 20].clone());
            tokio::spawn(async move {
                let client = Client::connect(&base, &token, project, &branch).await?;
                client
                    .request(Op::WriteFile {
                        path: format!("c{i}.txt"),
                        content: vec![b'x'; 64],
                        base_version: None,
                        force: false,
                    })
                    .await?;
                let reply = client
                    .request(Op::ReadFile {
                        path: format!("c{i}.txt"),
                    })
                    .await?;
                client.close().await;
                Ok::<Reply, ClientError>(reply)
            })
        })
        .collect();
    let mut ok = 0;
    for task in tasks {
        match task.await.expect("task") {
            Ok(Reply::File { content, .. }) if content == vec![b'x'; 64] => ok += 1,
            other => panic!("a connection failed: {other:?}"),
        }
    }
    assert_eq!(ok, 200);
    let store = server.store().clone();
    eventually("every session row is gone", || {
        let store = store.clone();
        let branches = branches.clone();
        async move {
            let mut total = 0;
            for branch in &branches {
                total += store
                    .sessions_of(&WorkspaceKey::new(project, branch.clone()))
                    .await
                    .expect("rows")
                    .len();
            }
            total == 0
        }
    })
    .await;
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_echo_socket_sends_frames_back_to_any_logged_in_user() {
    use futures_util::SinkExt;
    let (server, admin, _) = server_with_project(TestDb::sqlite().await).await;
    let url = format!("{}/ws/echo", server.base.replacen("http", "ws", 1));
    match tokio_tungstenite::connect_async(url.clone()).await {
        Err(tokio_tungstenite::tungstenite::Error::Http(response)) => {
            assert_eq!(response.status(), 401)
        }
        other => panic!("expected 401, got {:?}", other.map(|_| ())),
    }
    let (mut socket, _) = tokio_tungstenite::connect_async(format!("{url}?access_token={admin}"))
        .await
        .expect("echo connects");
    let payload = vec![7u8, 0, 255, 42];
    socket
        .send(Message::Binary(payload.clone().into()))
        .await
        .expect("send");
    match socket.next().await {
        Some(Ok(Message::Binary(bytes))) => assert_eq!(bytes.to_vec(), payload),
        other => panic!("expected the frame back, got {other:?}"),
    }
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_joining_a_locked_workspace_learns_the_lock_in_its_welcome() {
    let (server, admin, project) = server_with_project(TestDb::sqlite().await).await;
    let holder = connect(&server, &admin, project, "main").await;
    assert_eq!(holder.welcome().lock, None);
    holder
        .request(Op::Lock {
            ttl_ms: Some(30_000),
        })
        .await
        .expect("lock");
    let late = connect(&server, &admin, project, "main").await;
    let lock = late
        .welcome()
        .lock
        .clone()
        .expect("the welcome names the lock");
    assert_eq!(lock.holder, holder.welcome().session);
    assert_eq!(lock.user, "admin");
    server.stop().await;
}

/// A file or directory name longer than 255 bytes is refused as
/// `bad_request` naming the limit (the disk would refuse it, which used to
/// surface as `internal`); 255 bytes is fine. A `git_log` limit may be any
/// unsigned integer (it counts as 1000).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn long_names_are_refused_by_name_and_any_log_limit_is_taken() {
    let (server, admin, project) = server_with_project(TestDb::sqlite().await).await;
    let client = connect(&server, &admin, project, "main").await;
    let write = |path: String| Op::WriteFile {
        path,
        content: b"x".to_vec(),
        base_version: None,
        force: true,
    };
    match client
        .request(write(format!("dir/{}", "n".repeat(256))))
        .await
    {
        Err(ClientError::Op(err)) => {
            assert_eq!(err.code, ErrorCode::BadRequest, "{err:?}");
            assert!(err.message.contains("at most 255 bytes"), "{err:?}");
        }
        other => panic!("expected bad_request, got {other:?}"),
    }
    client
        .request(write(format!("dir/{}", "n".repeat(255))))
        .await
        .expect("a 255-byte name");
    match client
        .request(Op::GitLog {
            limit: Some(u64::MAX),
        })
        .await
    {
        Ok(Reply::Log { commits, .. }) => assert!(!commits.is_empty()),
        other => panic!("expected the log, got {other:?}"),
    }
    server.stop().await;
}

/// Names git cannot track (`.git ` and its look-alikes) are refused when a
/// file, a rename target or a directory would get them, so the branch keeps
/// committing; before, the write succeeded and every later `git_commit`
/// answered `internal`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn names_git_cannot_track_are_refused_and_commits_keep_working() {
    let (server, admin, project) = server_with_project(TestDb::sqlite().await).await;
    let client = connect(&server, &admin, project, "main").await;
    let bad_request = |result: Result<Reply, ClientError>, what: &str| match result {
        Err(ClientError::Op(err)) => {
            assert_eq!(err.code, ErrorCode::BadRequest, "{what}: {err:?}");
            assert!(err.message.contains("git cannot track"), "{what}: {err:?}");
        }
        other => panic!("{what}: expected bad_request, got {other:?}"),
    };
    for path in [
        ".git /x",
        ".git./x",
        "git~1/x",
        "GIT~1/x",
        ".git::$INDEX_ALLOCATION/x",
    ] {
        let written = client
            .request(Op::WriteFile {
                path: path.into(),
                content: b"x".to_vec(),
                base_version: None,
                force: true,
            })
            .await;
        bad_request(written, path);
    }
    client
        .request(Op::WriteFile {
            path: "ok.txt".into(),
            content: b"fine".to_vec(),
            base_version: None,
            force: true,
        })
        .await
        .expect("an ordinary name");
    let renamed = client
        .request(Op::RenamePath {
            from: "ok.txt".into(),
            to: "git~1/ok.txt".into(),
        })
        .await;
    bad_request(renamed, "rename");
    let made = client
        .request(Op::MakeDir {
            path: "GIT~1".into(),
        })
        .await;
    bad_request(made, "make_dir");
    client
        .request(Op::GitCommit {
            message: "still commits".into(),
            paths: None,
        })
        .await
        .expect("the branch still commits");
    server.stop().await;
}
