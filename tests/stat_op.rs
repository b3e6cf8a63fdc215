//! The `stat` op over a real socket: a path's kind, size and version
//! without its content, for viewers too.

mod common;

use branchd::client::{Client, ClientError};
use branchd::protocol::{EntryKind, ErrorCode, Op, Reply};
use common::{TestDb, TestServer};

on_both_backends!(stat_tells_kind_size_and_version_without_the_content);

async fn stat(client: &Client, path: &str) -> Result<Reply, ClientError> {
    client.request(Op::Stat { path: path.into() }).await
}

async fn stat_tells_kind_size_and_version_without_the_content(db: TestDb) {
    let (server, admin, project): (TestServer, String, i64) =
        common::server_with_project(db, |_| {}).await;
    let viewer = server.member(&admin, project, "vera", "viewer").await;
    let editor = Client::connect(&server.base, &admin, project, "main")
        .await
        .expect("owner connects");
    let written = editor
        .request(Op::WriteFile {
            path: "parts/gear.rhai".into(),
            content: b"cube(1)".to_vec(),
            base_version: None,
            force: false,
        })
        .await
        .expect("write");
    let Reply::Written { version, .. } = written else {
        panic!("write_file answered {written:?}");
    };

    let reader = Client::connect(&server.base, &viewer, project, "main")
        .await
        .expect("viewer connects");
    let file = stat(&reader, "parts/gear.rhai").await.expect("stat a file");
    assert_eq!(
        file,
        Reply::Stat {
            path: "parts/gear.rhai".into(),
            kind: EntryKind::File,
            size: 7,
            version: Some(version),
        }
    );
    let dir = stat(&reader, "parts").await.expect("stat a directory");
    assert_eq!(
        dir,
        Reply::Stat {
            path: "parts".into(),
            kind: EntryKind::Dir,
            size: 0,
            version: None,
        }
    );

    let missing = stat(&reader, "parts/none.rhai").await;
    let code = missing
        .as_ref()
        .err()
        .and_then(|e| e.op_error())
        .map(|e| e.code);
    assert_eq!(code, Some(ErrorCode::NotFound), "{missing:?}");
    let escape = stat(&reader, "../outside").await;
    let code = escape
        .as_ref()
        .err()
        .and_then(|e| e.op_error())
        .map(|e| e.code);
    assert_eq!(code, Some(ErrorCode::BadRequest), "{escape:?}");
}
