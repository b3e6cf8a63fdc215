//! What a hostile or careless client cannot make the server spend: each
//! test runs a real `branchd serve` process, attacks it as issue 17's
//! findings did, and measures the process from outside.

mod common;

use std::time::Duration;

use branchd::client::Client;
use branchd::protocol::Op;
use common::TestDb;
use common::process::{Served, create_project, login};
use futures_util::{SinkExt, StreamExt};
use serde_json::json;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;

const PASSWORD: &str = "limits-test-password";

/// A WebSocket driven frame by frame, to see what the server sends as it
/// is sent (sizes included) and to not read when a test says so.
struct Raw {
    socket: tokio_tungstenite::WebSocketStream<
        tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>,
    >,
}

impl Raw {
    /// Connects and takes the welcome.
    async fn open(base: &str, token: &str, project: i64) -> Raw {
        let url = format!(
            "{}/ws?project={project}&branch=main",
            base.replacen("http", "ws", 1)
        );
        let mut request = url.into_client_request().expect("request");
        request.headers_mut().insert(
            "authorization",
            format!("Bearer {token}").parse().expect("header"),
        );
        let (socket, _) = tokio_tungstenite::connect_async(request)
            .await
            .expect("a raw socket");
        let mut raw = Raw { socket };
        let (_, welcome) = raw.frame().await;
        assert_eq!(welcome["event"].as_str(), Some("welcome"), "{welcome}");
        raw
    }

    async fn send(&mut self, request: serde_json::Value) {
        let frame = rmp_serde::to_vec_named(&request).expect("encode");
        self.socket
            .send(Message::Binary(frame.into()))
            .await
            .expect("send a request");
    }

    /// The next binary frame: its size and what it holds.
    async fn frame(&mut self) -> (usize, rmpv::Value) {
        loop {
            let message = tokio::time::timeout(Duration::from_secs(30), self.socket.next())
                .await
                .expect("a frame within 30 s")
                .expect("the socket stays open")
                .expect("a frame");
            if let Message::Binary(bytes) = message {
                let value = rmp_serde::from_slice(&bytes).expect("MessagePack");
                return (bytes.len(), value);
            }
        }
    }

    /// The next reply (events skipped): its size and what it holds.
    async fn reply(&mut self) -> (usize, rmpv::Value) {
        loop {
            let (size, frame) = self.frame().await;
            if frame["id"].as_u64().is_some() {
                return (size, frame);
            }
        }
    }

    /// Sends a request and waits for its reply.
    async fn request(&mut self, request: serde_json::Value) -> (usize, rmpv::Value) {
        self.send(request).await;
        self.reply().await
    }
}

/// A server process with the admin's token and a fresh project.
async fn served(envs: &[(&str, &str)]) -> (tempfile::TempDir, Served, String, i64) {
    let dir = tempfile::tempdir().expect("dir");
    let mut all = vec![
        ("BRANCHD_ADMIN_PASSWORD", PASSWORD),
        ("BRANCHD_LOG", "error"),
    ];
    all.extend_from_slice(envs);
    let served = Served::start_with(dir.path(), &all);
    let http = reqwest::Client::new();
    let token = login(&http, &served.base, "admin", PASSWORD).await;
    let project = create_project(&http, &served.base, &token, "Limits").await;
    (dir, served, token, project)
}

/// Issue 17, item 1: 256 `read_file` of an 8 MiB file from a client that
/// never read grew the server by 2 GB. Now a connection holds at most
/// twice `BRANCHD_MAX_FRAME` of answers and stops reading requests beyond
/// that, so the same attack (scaled down: 150 reads of 3 MiB, 450 MB of
/// answers) leaves the server's peak memory near where it was, and a
/// client that does read in the end gets every answer.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_asks_faster_than_it_reads_is_slowed_down_not_buffered() {
    const READS: u64 = 150;
    const SIZE: usize = 3 << 20;
    let (_dir, served, token, project) = served(&[("BRANCHD_MAX_FRAME", "4MiB")]).await;
    let writer = Client::connect(&served.base, &token, project, "main")
        .await
        .expect("connect");
    let content: Vec<u8> = (0..SIZE).map(|i| (i % 251) as u8).collect();
    writer
        .request(Op::WriteFile {
            path: "big.bin".into(),
            content: content.clone(),
            base_version: None,
            force: false,
        })
        .await
        .expect("write the big file");
    let before = served.peak_memory();

    let mut socket = Raw::open(&served.base, &token, project).await;
    for id in 1..=READS {
        // Small requests: the socket takes them all.
        socket
            .send(json!({"id": id, "op": "read_file", "path": "big.bin"}))
            .await;
    }
    // Not reading: without backpressure, the server would make and keep
    // every answer now.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let grown = served.peak_memory().saturating_sub(before);
    assert!(
        grown < 120 << 20,
        "the server grew by {} MiB for {READS} answers nobody read ({} MiB of them)",
        grown >> 20,
        (READS as usize * SIZE) >> 20
    );

    for answered in 1..=READS {
        let (_, frame) = socket.reply().await;
        let id = frame["id"].as_u64();
        assert_eq!(id, Some(answered), "answers come in order");
        let got = frame["ok"]["content"].as_slice();
        assert!(
            got == Some(&content[..]),
            "answer {answered} holds the file: {:?}",
            frame["err"]
        );
    }
    writer.close().await;
    served.terminate();
}

/// Issue 17, item 8: `list_tree`, `git_diff` and `git_log` answered with
/// frames far over `BRANCHD_MAX_FRAME`. Now each such answer keeps what
/// fits, says `truncated: true`, and its frame is within the limit.
#[tokio::test]
async fn answers_larger_than_a_frame_are_cut_to_the_limit_and_say_so() {
    const MAX_FRAME: usize = 64 * 1024;
    let (server, admin, project) = common::server_with_project(TestDb::sqlite().await, |config| {
        config.max_frame = MAX_FRAME as u64;
    })
    .await;
    let client = Client::connect(&server.base, &admin, project, "main")
        .await
        .expect("connect");
    let deep = "d".repeat(200);
    for i in 0..300 {
        let content = format!("{i}\n").repeat(if i < 4 { 8000 } else { 1 });
        client
            .request(Op::WriteFile {
                path: format!("{deep}/{i:03}.txt"),
                content: content.into_bytes(),
                base_version: None,
                force: false,
            })
            .await
            .expect("write");
    }
    for i in 0..4 {
        client
            .request(Op::GitCommit {
                message: format!("commit {i} {}", "m".repeat(30_000)),
                paths: None,
            })
            .await
            .expect("commit");
        client
            .request(Op::WriteFile {
                path: format!("{deep}/{i:03}.txt"),
                content: format!("changed {i}\n").repeat(4000).into_bytes(),
                base_version: None,
                force: true,
            })
            .await
            .expect("change");
    }

    let mut raw = Raw::open(&server.base, &admin, project).await;
    let asks = [
        (json!({"id": 1, "op": "list_tree"}), "entries"),
        (json!({"id": 2, "op": "git_diff"}), "diff"),
        (json!({"id": 3, "op": "git_log", "limit": 1000}), "commits"),
    ];
    for (ask, field) in asks {
        let (size, reply) = raw.request(ask.clone()).await;
        assert!(size <= MAX_FRAME, "{ask}: a frame of {size} bytes");
        let ok = &reply["ok"];
        assert_eq!(
            ok["truncated"].as_bool(),
            Some(true),
            "{ask}: {}",
            reply["err"]
        );
        let kept = match &ok[field] {
            rmpv::Value::Array(items) => items.len(),
            rmpv::Value::String(text) => text.as_str().map_or(0, str::len),
            other => panic!("{ask}: {other}"),
        };
        assert!(kept > 0, "{ask}: keeps what fits");
    }
    // A small answer has no flag at all.
    let (_, reply) = raw
        .request(json!({"id": 4, "op": "git_log", "limit": 1}))
        .await;
    assert!(
        reply["ok"]["commits"]
            .as_array()
            .is_some_and(|c| c.len() == 1)
    );
    assert!(reply["ok"]["truncated"].is_nil(), "{reply}");
}

/// Issue 17, item 4: each join sent every session the whole list, so n
/// sockets joining one branch made O(n²) presence entries per socket
/// (1,000 sockets: 10 GB of frames, most sockets dropped). Now a joiner
/// gets the list once and everyone gets batched diffs: the first socket
/// hears of each later one about once, and all of them see everyone.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn joining_one_branch_costs_each_socket_a_few_entries_per_join() {
    const SOCKETS: usize = 150;
    let (server, admin, project) =
        common::server_with_project(TestDb::sqlite().await, |_| {}).await;
    let mut clients = Vec::new();
    for _ in 0..SOCKETS {
        clients.push(
            Client::connect(&server.base, &admin, project, "main")
                .await
                .expect("connect"),
        );
    }
    let mut entries = 0usize;
    let mut present = common::Present::default();
    let first = &mut clients[0];
    while present.0.len() < SOCKETS {
        let event = first
            .next_event(Duration::from_secs(30))
            .await
            .expect("presence events until everyone is there");
        entries += match &event {
            branchd::protocol::Event::Presence { sessions } => sessions.len(),
            branchd::protocol::Event::PresenceChanged { joined, left } => joined.len() + left.len(),
            _ => 0,
        };
        present.follow(&event);
    }
    assert!(
        entries <= 2 * SOCKETS,
        "the first socket was sent {entries} presence entries for {SOCKETS} joins"
    );
    // The last one to join was told everyone at once, and nobody was dropped.
    let last = clients.last_mut().expect("clients");
    let mut seen = common::Present::default();
    while seen.0.len() < SOCKETS {
        let event = last
            .next_event(Duration::from_secs(30))
            .await
            .expect("the joiner's list");
        seen.follow(&event);
    }
    assert!(clients.iter().all(|c| !c.is_closed()));
    for client in clients {
        client.close().await;
    }
    server.stop().await;
}

/// Issue 17, item 2, through a real process: a script that hoards 2,000
/// strings of 1 MiB (2 GB before; 8,000 aborted the node) stops at
/// `BRANCHD_COMPILE_MAX_MEMORY` with a `limit` diagnostic, the node's peak
/// stays near the limit, and a large compile within it gives its memory
/// back when it ends.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_compile_holds_at_most_its_memory_limit_and_gives_it_back() {
    let (_dir, served, token, project) = served(&[
        ("BRANCHD_COMPILE_MAX_MEMORY", "64MiB"),
        ("BRANCHD_COMPILE_MAX_STRING", "2MiB"),
        ("BRANCHD_COMPILE_MAX_MAP", "100000"),
    ])
    .await;
    let client = Client::connect(&served.base, &token, project, "main")
        .await
        .expect("connect");
    let hoard = |count: u32| {
        format!(
            "let s = \"x\";\nwhile s.len < 1048576 {{ s += s; }}\nlet m = #{{}};\n\
             for i in 0..{count} {{ m[`k${{i}}`] = s + i; }}\ncube(1, 1, 1)\n"
        )
    };
    for (path, count) in [("hoard.rhai", 2000), ("fits.rhai", 40)] {
        client
            .request(Op::WriteFile {
                path: path.into(),
                content: hoard(count).into_bytes(),
                base_version: None,
                force: false,
            })
            .await
            .expect("write");
    }
    let resident = || served.memory_kib("VmRSS") << 10;
    let before = served.peak_memory();
    let compiled = client
        .request(Op::Compile {
            entry: "hoard.rhai".into(),
        })
        .await
        .expect("compile");
    let branchd::protocol::Reply::Compiled {
        ok, diagnostics, ..
    } = compiled
    else {
        panic!("{compiled:?}");
    };
    assert!(!ok, "the hoard is stopped");
    assert!(
        diagnostics
            .iter()
            .any(|d| d.message.contains("BRANCHD_COMPILE_MAX_MEMORY")),
        "{diagnostics:?}"
    );
    let grown = served.peak_memory().saturating_sub(before);
    assert!(
        grown < 160 << 20,
        "the node grew by {} MiB under a 64 MiB compile limit",
        grown >> 20
    );

    let base = resident();
    let compiled = client
        .request(Op::Compile {
            entry: "fits.rhai".into(),
        })
        .await
        .expect("compile");
    assert!(
        matches!(
            compiled,
            branchd::protocol::Reply::Compiled { ok: true, .. }
        ),
        "{compiled:?}"
    );
    common::eventually("the compile's memory is given back", || async {
        resident() < base + (16 << 20)
    })
    .await;
    client.close().await;
    served.terminate();
}
