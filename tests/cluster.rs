//! Many nodes, one owner per workspace: real `branchd` processes on
//! 127.0.0.1 ports over one Postgres schema, joined with ractor_cluster.
//! Nodes run with a short lease (2 s) and heartbeat (250 ms) so that
//! failover happens within seconds. Postgres only: clustering needs a
//! shared database.

mod common;

use std::collections::{BTreeMap, HashSet};
use std::io::Write;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use branchd::client::{Client, ClientError};
use branchd::protocol::{ErrorCode, Event, Op, Reply};
use common::process::{Served, create_project, login, ready_peers};
use common::{TestDb, eventually_within, free_port};
use serde_json::Value;

const COOKIE: &str = "cluster-test-cookie";
const PASSWORD: &str = "cluster-test-password";
const LEASE_MS: u64 = 2000;

/// One node of a test cluster: its process, and what restarts it as itself.
struct Node {
    tag: String,
    served: Option<Served>,
    envs: Vec<(String, String)>,
    dir: tempfile::TempDir,
}

impl Node {
    fn start(db: &TestDb, tag: &str, cookie: &str) -> Node {
        Node::start_with(db, tag, cookie, &[])
    }

    /// Starts a node with some settings other than the tests' defaults.
    fn start_with(db: &TestDb, tag: &str, cookie: &str, changed: &[(&str, &str)]) -> Node {
        let mut envs = vec![
            ("BRANCHD_DATABASE_URL".to_string(), db.url.clone()),
            ("BRANCHD_SERVER_TAG".into(), tag.to_string()),
            ("BRANCHD_ADMIN_PASSWORD".into(), PASSWORD.into()),
            ("BRANCHD_CLUSTER_COOKIE".into(), cookie.to_string()),
            ("BRANCHD_CLUSTER_PORT".into(), free_port().to_string()),
            ("BRANCHD_CLUSTER_BIND".into(), "127.0.0.1".into()),
            ("BRANCHD_ADVERTISE_HOST".into(), "127.0.0.1".into()),
            ("BRANCHD_LEASE".into(), format!("{LEASE_MS}ms")),
            ("BRANCHD_HEARTBEAT_INTERVAL".into(), "250ms".into()),
            ("BRANCHD_MEMBERSHIP_INTERVAL".into(), "250ms".into()),
            ("BRANCHD_PEER_TIMEOUT".into(), "3s".into()),
            (
                "BRANCHD_LOG".into(),
                std::env::var("CLUSTER_TEST_LOG").unwrap_or_else(|_| "error".into()),
            ),
        ];
        for (name, value) in changed {
            envs.retain(|(n, _)| n != name);
            envs.push((name.to_string(), value.to_string()));
        }
        let dir = tempfile::tempdir().expect("node dir");
        let mut node = Node {
            tag: tag.to_string(),
            served: None,
            envs,
            dir,
        };
        node.restart();
        node
    }

    fn restart(&mut self) {
        let envs: Vec<(&str, &str)> = self
            .envs
            .iter()
            .map(|(k, v)| (k.as_str(), v.as_str()))
            .collect();
        self.served = Some(Served::start_with(self.dir.path(), &envs));
    }

    fn base(&self) -> String {
        self.served.as_ref().expect("the node runs").base.clone()
    }

    fn cluster_port(&self) -> u16 {
        self.envs
            .iter()
            .find(|(name, _)| name == "BRANCHD_CLUSTER_PORT")
            .and_then(|(_, port)| port.parse().ok())
            .expect("a cluster port")
    }

    fn served(&self) -> &Served {
        self.served.as_ref().expect("the node runs")
    }

    fn kill(&mut self) {
        if let Some(served) = self.served.take() {
            served.kill();
        }
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        if let Some(served) = &self.served {
            // A stopped process cannot die of SIGKILL until it runs again.
            served.signal(libc::SIGCONT);
        }
        self.kill();
    }
}

async fn postgres(test: &str) -> Option<TestDb> {
    TestDb::postgres(test).await
}

/// Starts `tags` as one cluster and returns them with an admin token.
async fn cluster(db: &TestDb, tags: &[&str]) -> (Vec<Node>, String) {
    let nodes: Vec<Node> = tags.iter().map(|t| Node::start(db, t, COOKIE)).collect();
    let token = login(&reqwest::Client::new(), &nodes[0].base(), "admin", PASSWORD).await;
    (nodes, token)
}

async fn view(node: &Node, token: &str) -> Value {
    reqwest::Client::new()
        .get(format!("{}/ops/api/cluster", node.base()))
        .bearer_auth(token)
        .send()
        .await
        .expect("cluster view")
        .json()
        .await
        .expect("json")
}

async fn full_mesh(nodes: &[Node], token: &str) {
    for node in nodes {
        let others: HashSet<String> = nodes
            .iter()
            .filter(|n| n.tag != node.tag)
            .map(|n| n.tag.clone())
            .collect();
        eventually_within(
            &format!("{} is connected to every other node", node.tag),
            Duration::from_secs(20),
            || async { others.is_subset(&ready_peers(&view(node, token).await)) },
        )
        .await;
    }
}

fn write(path: &str, content: &[u8]) -> Op {
    Op::WriteFile {
        path: path.to_string(),
        content: content.to_vec(),
        base_version: None,
        force: true,
    }
}

async fn read(client: &Client, path: &str) -> Option<Vec<u8>> {
    match client
        .request(Op::ReadFile {
            path: path.to_string(),
        })
        .await
    {
        Ok(Reply::File { content, .. }) => Some(content),
        _ => None,
    }
}

/// Waits for a `file_changed` of `path` (skipping presence and the like).
async fn file_changed(client: &mut Client, path: &str) -> String {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match client.next_event(left).await {
            Some(Event::FileChanged { path: p, by, .. }) if p == path => return by.session,
            Some(_) => continue,
            None => panic!("no file_changed for {path} within 10 s"),
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_nodes_form_a_full_mesh_and_show_it() {
    let Some(db) = postgres("three_nodes_form_a_full_mesh_and_show_it").await else {
        return;
    };
    let (nodes, token) = cluster(&db, &["mesh-a", "mesh-b", "mesh-c"]).await;
    full_mesh(&nodes, &token).await;
    let seen = view(&nodes[1], &token).await;
    assert_eq!(seen["node"], "mesh-b");
    assert_eq!(seen["clustered"], true);
    let rows = seen["nodes"].as_array().expect("nodes");
    assert_eq!(rows.len(), 3, "{seen}");
    for row in rows {
        assert_eq!(row["live"], true, "{row}");
        assert_eq!(row["connected"], true, "{row}");
        assert!(row["heartbeat_age_ms"].as_i64().expect("age") < LEASE_MS as i64);
        assert!(
            row["cluster_addr"]
                .as_str()
                .is_some_and(|a| a.starts_with("127.0.0.1:"))
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clients_on_two_nodes_edit_a_workspace_owned_by_a_third() {
    let Some(db) = postgres("clients_on_two_nodes_edit_a_workspace_owned_by_a_third").await else {
        return;
    };
    let (nodes, token) = cluster(&db, &["edit-a", "edit-b", "edit-c"]).await;
    full_mesh(&nodes, &token).await;
    let http = reqwest::Client::new();
    let project = create_project(&http, &nodes[1].base(), &token, "Shared").await;

    // The first session activates the workspace on B: B owns it.
    let mut on_b = Client::connect(&nodes[1].base(), &token, project, "main")
        .await
        .expect("connect to B");
    assert_eq!(on_b.welcome().owner, "edit-b");
    let mut on_a = Client::connect(&nodes[0].base(), &token, project, "main")
        .await
        .expect("connect to A");
    let mut on_c = Client::connect(&nodes[2].base(), &token, project, "main")
        .await
        .expect("connect to C");
    assert_eq!(on_a.welcome().node, "edit-a");
    assert_eq!(on_a.welcome().owner, "edit-b", "A routes to the owner");
    assert_eq!(on_c.welcome().owner, "edit-b", "C routes to the owner");
    assert_eq!(on_a.welcome().head, on_b.welcome().head);

    // A writes; C and B see it; C writes back; A sees that.
    on_a.request(write("from-a.txt", b"written on A"))
        .await
        .expect("A writes");
    assert_eq!(
        file_changed(&mut on_c, "from-a.txt").await,
        on_a.welcome().session
    );
    assert_eq!(
        file_changed(&mut on_b, "from-a.txt").await,
        on_a.welcome().session
    );
    on_c.request(write("from-c.txt", b"written on C"))
        .await
        .expect("C writes");
    assert_eq!(
        file_changed(&mut on_a, "from-c.txt").await,
        on_c.welcome().session
    );
    assert_eq!(
        read(&on_a, "from-c.txt").await.as_deref(),
        Some(&b"written on C"[..])
    );
    assert_eq!(
        read(&on_c, "from-a.txt").await.as_deref(),
        Some(&b"written on A"[..])
    );
    assert_eq!(
        read(&on_b, "from-c.txt").await.as_deref(),
        Some(&b"written on C"[..])
    );

    // A compiles through B; C hears of it (the model crosses both hops).
    on_a.request(write("part.rhai", b"translate(cube(2, 2, 2), 1, 0, 0)\n"))
        .await
        .expect("A writes a model");
    let compiled = on_a
        .request(Op::Compile {
            entry: "part.rhai".into(),
        })
        .await
        .expect("A compiles");
    let Reply::Compiled {
        ok: true,
        output: Some(output),
        ..
    } = compiled
    else {
        panic!("expected a compiled model, got {compiled:?}");
    };
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match on_c.next_event(left).await {
            Some(Event::Compiled {
                entry,
                output: seen,
                by,
                ..
            }) => {
                assert_eq!(entry, "part.rhai");
                assert_eq!(by.session, on_a.welcome().session);
                assert_eq!(seen, Some(output));
                break;
            }
            Some(_) => continue,
            None => panic!("C never heard of A's compile"),
        }
    }

    // Only B runs the workspace; A shows its socket routed to B.
    let seen = view(&nodes[0], &token).await;
    let routed = &seen["routed_out"][0];
    assert_eq!(routed["owner"], "edit-b", "{seen}");
    assert_eq!(routed["sessions"], 1, "{seen}");
    let owners = seen["nodes"]
        .as_array()
        .expect("nodes")
        .iter()
        .filter(|n| !n["workspaces"].as_array().expect("list").is_empty())
        .map(|n| n["server_tag"].as_str().unwrap_or_default().to_string())
        .collect::<Vec<_>>();
    assert_eq!(owners, vec!["edit-b".to_string()]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_registers_across_three_nodes_leave_exactly_one_owner() {
    let Some(db) =
        postgres("concurrent_registers_across_three_nodes_leave_exactly_one_owner").await
    else {
        return;
    };
    let (nodes, token) = cluster(&db, &["race-a", "race-b", "race-c"]).await;
    full_mesh(&nodes, &token).await;
    let project = create_project(&reqwest::Client::new(), &nodes[0].base(), &token, "Race").await;
    let bases: Vec<String> = nodes.iter().map(Node::base).collect();
    let connects = (0..100).map(|i| {
        let (base, token) = (bases[i % 3].clone(), token.clone());
        tokio::spawn(async move {
            // A client that lands mid-takeover is told to retry.
            for _ in 0..20 {
                match Client::connect(&base, &token, project, "main").await {
                    Ok(client) => return Some(client),
                    Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
                }
            }
            None
        })
    });
    let mut clients = Vec::new();
    for connect in connects.collect::<Vec<_>>() {
        clients.push(connect.await.expect("task").expect("every client gets in"));
    }
    let owners: HashSet<String> = clients.iter().map(|c| c.welcome().owner.clone()).collect();
    assert_eq!(owners.len(), 1, "one owner for everyone: {owners:?}");
    let owner = owners.into_iter().next().expect("owner");
    // The database agrees, and every node agrees.
    for node in &nodes {
        let seen = view(node, &token).await;
        for row in seen["nodes"].as_array().expect("nodes") {
            let holds = !row["workspaces"].as_array().expect("list").is_empty();
            assert_eq!(holds, row["server_tag"] == owner.as_str(), "{seen}");
        }
    }
    // Every client can work through the one owner.
    let last = clients.last().expect("a client");
    last.request(write("raced.txt", b"one owner"))
        .await
        .expect("a write lands");
    assert_eq!(
        read(&clients[0], "raced.txt").await.as_deref(),
        Some(&b"one owner"[..])
    );
}

/// What the writers of the failover test share.
struct Writers {
    bases: Vec<String>,
    token: String,
    project: i64,
    /// Every acknowledged write: path → content.
    acked: Mutex<BTreeMap<String, Vec<u8>>>,
    /// When the first write was acknowledged through an owner other than
    /// `old_owner`.
    first_after: Mutex<Option<Instant>>,
    old_owner: String,
    stop: std::sync::atomic::AtomicBool,
}

impl Writers {
    fn stopped(&self) -> bool {
        self.stop.load(std::sync::atomic::Ordering::Relaxed)
    }

    fn acked(&self) -> BTreeMap<String, Vec<u8>> {
        self.acked.lock().map(|m| m.clone()).unwrap_or_default()
    }

    fn first_after(&self) -> Option<Instant> {
        self.first_after.lock().ok().and_then(|f| *f)
    }
}

/// Writes numbered files until told to stop, recording what was
/// acknowledged. On any failure it reconnects (to the nodes in turn) and
/// goes on.
async fn steady_writer(shared: Arc<Writers>, id: usize) {
    let mut n = 0usize;
    let mut turn = id;
    while !shared.stopped() {
        let base = &shared.bases[turn % shared.bases.len()];
        turn += 1;
        let Ok(client) = Client::connect(base, &shared.token, shared.project, "main").await else {
            tokio::time::sleep(Duration::from_millis(50)).await;
            continue;
        };
        while !shared.stopped() {
            let path = format!("w{id}/{n:05}.txt");
            let body = format!("writer {id} write {n}").into_bytes();
            match client.request(write(&path, &body)).await {
                Ok(Reply::Written { .. }) => {
                    if client.welcome().owner != shared.old_owner
                        && let Ok(mut first) = shared.first_after.lock()
                        && first.is_none()
                    {
                        *first = Some(Instant::now());
                    }
                    if let Ok(mut map) = shared.acked.lock() {
                        map.insert(path, body);
                    }
                    n += 1;
                }
                _ => break,
            }
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killing_the_owner_moves_the_workspace_and_loses_no_acknowledged_write() {
    let Some(db) =
        postgres("killing_the_owner_moves_the_workspace_and_loses_no_acknowledged_write").await
    else {
        return;
    };
    let (mut nodes, token) = cluster(&db, &["kill-a", "kill-b", "kill-c"]).await;
    full_mesh(&nodes, &token).await;
    let project = create_project(
        &reqwest::Client::new(),
        &nodes[1].base(),
        &token,
        "Failover",
    )
    .await;
    let on_b = Client::connect(&nodes[1].base(), &token, project, "main")
        .await
        .expect("B activates the workspace");
    assert_eq!(on_b.welcome().owner, "kill-b");

    // Writers on A and C, through the owner B.
    let shared = Arc::new(Writers {
        bases: vec![nodes[0].base(), nodes[2].base()],
        token: token.clone(),
        project,
        acked: Mutex::default(),
        first_after: Mutex::default(),
        old_owner: "kill-b".into(),
        stop: false.into(),
    });
    let writers: Vec<_> = (0..4)
        .map(|id| tokio::spawn(steady_writer(shared.clone(), id)))
        .collect();
    eventually_within("writes flow through B", Duration::from_secs(10), || async {
        shared.acked().len() >= 40
    })
    .await;
    drop(on_b);

    nodes[1].kill();
    let kill_time = Instant::now();
    let before = shared.acked().len();
    eventually_within(
        "writes land on a new owner",
        Duration::from_secs(30),
        || async { shared.first_after().is_some() },
    )
    .await;
    let recovered = shared
        .first_after()
        .map(|f| f.duration_since(kill_time))
        .expect("a write after the kill");
    tokio::time::sleep(Duration::from_secs(1)).await;
    shared
        .stop
        .store(true, std::sync::atomic::Ordering::Relaxed);
    for writer in writers {
        let _ = writer.await;
    }

    // Every acknowledged write is there, wherever the workspace is now.
    let reader = Client::connect(&nodes[0].base(), &token, project, "main")
        .await
        .expect("the workspace is served again");
    assert_ne!(reader.welcome().owner, "kill-b");
    let expected = shared.acked();
    for (path, body) in &expected {
        assert_eq!(
            read(&reader, path).await.as_deref(),
            Some(body.as_slice()),
            "acknowledged write {path} is present"
        );
    }
    // Written past the test harness's capture, so every run shows it.
    let _ = writeln!(
        std::io::stderr(),
        "cluster failover: lease {LEASE_MS} ms, writes acknowledged {} ({} before the kill), lost 0, kill to first write on the new owner ({}) {} ms",
        expected.len(),
        before,
        reader.welcome().owner,
        recovered.as_millis()
    );
}

/// No client waits on a peer known to be gone. The peer timeout is a
/// minute and the lease the default 5 s: the owner is frozen (its socket
/// stays open, so only missed pings tell), and a request routed to it that
/// was in flight ends once the pings are missed; every connect meanwhile is
/// answered within seconds, `unavailable` with `retry_after_ms` until the
/// lease runs out; a client honouring that hint is then served by a live
/// node, with everything acknowledged.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lost_owner_is_never_waited_for_and_is_replaced_at_its_lease() {
    let Some(db) = postgres("a_lost_owner_is_never_waited_for_and_is_replaced_at_its_lease").await
    else {
        return;
    };
    const LEASE: Duration = Duration::from_secs(5);
    const PEER_TIMEOUT: Duration = Duration::from_secs(60);
    let changed = [("BRANCHD_LEASE", "5s"), ("BRANCHD_PEER_TIMEOUT", "60s")];
    let nodes: Vec<Node> = ["lost-a", "lost-b", "lost-c"]
        .iter()
        .map(|tag| Node::start_with(&db, tag, COOKIE, &changed))
        .collect();
    let token = login(&reqwest::Client::new(), &nodes[0].base(), "admin", PASSWORD).await;
    full_mesh(&nodes, &token).await;
    let project = create_project(&reqwest::Client::new(), &nodes[1].base(), &token, "Lost").await;
    let on_b = Client::connect(&nodes[1].base(), &token, project, "main")
        .await
        .expect("B activates the workspace");
    assert_eq!(on_b.welcome().owner, "lost-b");
    let routed = Client::connect(&nodes[0].base(), &token, project, "main")
        .await
        .expect("A routes to B");
    assert_eq!(routed.welcome().owner, "lost-b");
    routed
        .request(write("acked.txt", b"acknowledged before the freeze"))
        .await
        .expect("a routed write");

    nodes[1].served().freeze();
    let frozen = Instant::now();
    let in_flight = routed.request(Op::ReadFile {
        path: "acked.txt".into(),
    });
    let ended = tokio::time::timeout(PEER_TIMEOUT / 2, in_flight).await;
    let in_flight_ended = frozen.elapsed();
    match ended {
        Ok(Ok(reply)) => panic!("a frozen owner answered: {reply:?}"),
        Ok(Err(_)) => {}
        Err(_) => panic!("the routed request still waits after {in_flight_ended:?}"),
    }

    // Connect through A and C in turn until a live node serves the key.
    let mut hinted = Vec::new();
    let mut slowest = Duration::ZERO;
    let served = loop {
        assert!(
            frozen.elapsed() < LEASE + PEER_TIMEOUT / 4,
            "no node took over within {:?} of the freeze",
            frozen.elapsed()
        );
        let base = &nodes[if hinted.len() % 2 == 0 { 0 } else { 2 }].base();
        let asked = Instant::now();
        let answer = Client::connect(base, &token, project, "main").await;
        slowest = slowest.max(asked.elapsed());
        match answer {
            Ok(client) => break client,
            Err(ClientError::Op(err)) => {
                assert_eq!(err.code, ErrorCode::Unavailable, "{err:?}");
                let wait = err
                    .retry_after_ms
                    .unwrap_or_else(|| panic!("no retry hint in {err:?}"));
                assert!(
                    wait <= LEASE.as_millis() as u64 + 100,
                    "the hint {wait} ms is longer than the lease: {err:?}"
                );
                hinted.push(wait);
                tokio::time::sleep(Duration::from_millis(wait)).await;
            }
            Err(other) => panic!("connecting during the outage failed otherwise: {other:?}"),
        }
    };
    let took_over = frozen.elapsed();
    assert_ne!(served.welcome().owner, "lost-b");
    assert!(
        slowest < PEER_TIMEOUT / 6,
        "a connect waited {slowest:?}, as if for the dead owner"
    );
    assert!(
        !hinted.is_empty(),
        "the first connects came before the lease ran out"
    );
    assert_eq!(
        read(&served, "acked.txt").await.as_deref(),
        Some(&b"acknowledged before the freeze"[..])
    );
    let _ = writeln!(
        std::io::stderr(),
        "lost owner (lease {} ms, peer timeout {} s): in-flight request ended after {} ms, connects answered within {} ms, hints {hinted:?} ms, served by {} {} ms after the freeze",
        LEASE.as_millis(),
        PEER_TIMEOUT.as_secs(),
        in_flight_ended.as_millis(),
        slowest.as_millis(),
        served.welcome().owner,
        took_over.as_millis()
    );
    drop(on_b);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_frozen_owner_is_replaced_and_its_writes_are_refused_when_it_wakes() {
    let Some(db) =
        postgres("a_frozen_owner_is_replaced_and_its_writes_are_refused_when_it_wakes").await
    else {
        return;
    };
    let (nodes, token) = cluster(&db, &["frozen-a", "frozen-b"]).await;
    full_mesh(&nodes, &token).await;
    let project = create_project(&reqwest::Client::new(), &nodes[1].base(), &token, "Frozen").await;
    let mut stale = Client::connect(&nodes[1].base(), &token, project, "main")
        .await
        .expect("B owns the workspace");
    assert_eq!(stale.welcome().owner, "frozen-b");
    stale
        .request(write("before.txt", b"before the freeze"))
        .await
        .expect("B writes while it owns");

    nodes[1].served().freeze();
    tokio::time::sleep(Duration::from_millis(LEASE_MS + 1000)).await;
    // A takes over once B's lease has run out.
    let mut fresh = None;
    for _ in 0..100 {
        if let Ok(client) = Client::connect(&nodes[0].base(), &token, project, "main").await {
            fresh = Some(client);
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let fresh = fresh.expect("A serves the workspace while B is frozen");
    assert_eq!(fresh.welcome().owner, "frozen-a");
    assert_eq!(
        read(&fresh, "before.txt").await.as_deref(),
        Some(&b"before the freeze"[..])
    );
    fresh
        .request(write("after.txt", b"A's version"))
        .await
        .expect("A writes as the new owner");

    nodes[1].served().signal(libc::SIGCONT);
    // The woken owner refuses its stale session's write, and drops it.
    let refused = stale
        .request(write("after.txt", b"B's stale version"))
        .await;
    match &refused {
        Err(ClientError::Op(err)) => assert_eq!(err.code, ErrorCode::Unavailable, "{err:?}"),
        Err(_) => {} // the socket was closed: the stale actor is gone
        Ok(reply) => panic!("a stale owner accepted a write: {reply:?}"),
    }
    let _ = writeln!(
        std::io::stderr(),
        "frozen owner: its stale write got {refused:?}"
    );
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let dropped = match stale.next_event(Duration::from_millis(200)).await {
            Some(Event::Reconnect { .. }) => true,
            Some(_) => false,
            None => stale.request(Op::GitStatus).await.is_err(),
        };
        if dropped {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "B did not drop its stale session within 10 s"
        );
    }
    assert_eq!(
        read(&fresh, "after.txt").await.as_deref(),
        Some(&b"A's version"[..])
    );
    let seen = view(&nodes[0], &token).await;
    let b_row = seen["nodes"]
        .as_array()
        .expect("nodes")
        .iter()
        .find(|n| n["server_tag"] == "frozen-b")
        .cloned()
        .unwrap_or_default();
    assert!(
        b_row["workspaces"].as_array().is_none_or(|w| w.is_empty()),
        "B owns nothing after waking: {seen}"
    );
}

/// A workspace failed on one node is failed on every node: connecting
/// anywhere is refused with how long it lasts, the cluster view lists it,
/// and a reset through any node clears it for all. The failure is written
/// as a node that crashed it too often writes it (then died, so no live
/// node holds it in memory).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_workspace_is_refused_by_every_node_until_one_resets_it() {
    let Some(db) =
        postgres("a_failed_workspace_is_refused_by_every_node_until_one_resets_it").await
    else {
        return;
    };
    let (nodes, token) = cluster(&db, &["failed-a", "failed-b"]).await;
    full_mesh(&nodes, &token).await;
    let project = create_project(&reqwest::Client::new(), &nodes[0].base(), &token, "Failed").await;
    let store = db.open().await;
    let key = branchd::storage::WorkspaceKey::new(project, "main");
    store
        .mark_failed(&key, "it crashed too often", "failed-x", 60_000)
        .await
        .expect("mark failed");

    for node in &nodes {
        match Client::connect(&node.base(), &token, project, "main").await {
            Err(ClientError::Op(err)) => {
                assert_eq!(err.code, ErrorCode::Unavailable, "{err:?}");
                assert!(
                    err.message.contains("failed repeatedly") && err.message.contains("failed-x"),
                    "{err:?}"
                );
                let wait = err.retry_after_ms.unwrap_or_default();
                assert!(wait > 0 && wait <= 60_000, "{err:?}");
            }
            Err(other) => panic!("{} refused otherwise: {other:?}", node.tag),
            Ok(client) => panic!(
                "{} opened a failed workspace (owner {})",
                node.tag,
                client.welcome().owner
            ),
        }
    }
    let seen = view(&nodes[1], &token).await;
    assert_eq!(seen["failed"][0]["server_tag"], "failed-x", "{seen}");
    assert_eq!(
        seen["failed"][0]["reason"], "it crashed too often",
        "{seen}"
    );

    let reset: Value = reqwest::Client::new()
        .post(format!("{}/ops/api/workspaces/reset", nodes[1].base()))
        .bearer_auth(&token)
        .json(&serde_json::json!({"project": project, "branch": "main"}))
        .send()
        .await
        .expect("reset")
        .json()
        .await
        .expect("json");
    assert_eq!(
        reset,
        serde_json::json!({"reset": true, "nodes": [], "unreached": []})
    );
    let client = Client::connect(&nodes[0].base(), &token, project, "main")
        .await
        .expect("served again after the reset");
    assert_eq!(client.welcome().owner, "failed-a");
    assert!(
        view(&nodes[0], &token).await["failed"]
            .as_array()
            .is_some_and(|f| f.is_empty())
    );
}

/// A certificate authority made for one test, and node certificates it
/// signs, written as PEM files the nodes read.
struct TestCa {
    issuer: rcgen::CertifiedIssuer<'static, rcgen::KeyPair>,
    dir: tempfile::TempDir,
}

impl TestCa {
    fn new(name: &str) -> TestCa {
        let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).expect("params");
        params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, name);
        params.key_usages = vec![
            rcgen::KeyUsagePurpose::KeyCertSign,
            rcgen::KeyUsagePurpose::DigitalSignature,
        ];
        let key = rcgen::KeyPair::generate().expect("CA key");
        let issuer = rcgen::CertifiedIssuer::self_signed(params, key).expect("CA certificate");
        let dir = tempfile::tempdir().expect("certificate dir");
        std::fs::write(dir.path().join("ca.pem"), issuer.pem()).expect("write the CA");
        TestCa { issuer, dir }
    }

    /// A certificate for `tag` signed by this CA, as the three settings.
    fn node(&self, tag: &str) -> Vec<(String, String)> {
        self.node_with(tag, |_| {})
    }

    /// The same, with the certificate's parameters changed first.
    fn node_with(
        &self,
        tag: &str,
        change: impl FnOnce(&mut rcgen::CertificateParams),
    ) -> Vec<(String, String)> {
        let mut params =
            rcgen::CertificateParams::new(vec![format!("{tag}.branchd.test")]).expect("params");
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, tag);
        params.extended_key_usages = vec![
            rcgen::ExtendedKeyUsagePurpose::ServerAuth,
            rcgen::ExtendedKeyUsagePurpose::ClientAuth,
        ];
        change(&mut params);
        let key = rcgen::KeyPair::generate().expect("node key");
        let cert = params
            .signed_by(&key, &self.issuer)
            .expect("node certificate");
        let (cert_path, key_path) = (
            self.dir.path().join(format!("{tag}.pem")),
            self.dir.path().join(format!("{tag}.key")),
        );
        std::fs::write(&cert_path, cert.pem()).expect("write the certificate");
        std::fs::write(&key_path, key.serialize_pem()).expect("write the key");
        let path = |p: &std::path::Path| p.to_string_lossy().into_owned();
        vec![
            ("BRANCHD_CLUSTER_TLS_CERT".into(), path(&cert_path)),
            ("BRANCHD_CLUSTER_TLS_KEY".into(), path(&key_path)),
            (
                "BRANCHD_CLUSTER_TLS_CA".into(),
                path(&self.dir.path().join("ca.pem")),
            ),
        ]
    }
}

fn tls_node(db: &TestDb, tag: &str, settings: &[(String, String)]) -> Node {
    let settings: Vec<(&str, &str)> = settings
        .iter()
        .map(|(k, v)| (k.as_str(), v.as_str()))
        .collect();
    Node::start_with(db, tag, COOKIE, &settings)
}

/// With mutual TLS, nodes holding certificates of the cluster's CA form
/// the mesh and route to each other; a connection that never finishes its
/// handshake and one that sends garbage are refused without holding up
/// anyone; a node with a certificate of another CA, one with an expired
/// certificate of the right CA, and a node without TLS never join,
/// although they know the cookie.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mutual_tls_admits_the_cas_nodes_only() {
    let Some(db) = postgres("mutual_tls_admits_the_cas_nodes_only").await else {
        return;
    };
    let ca = TestCa::new("branchd test cluster CA");
    let mut nodes = vec![
        tls_node(&db, "tls-a", &ca.node("tls-a")),
        tls_node(&db, "tls-b", &ca.node("tls-b")),
    ];
    let token = login(&reqwest::Client::new(), &nodes[0].base(), "admin", PASSWORD).await;
    full_mesh(&nodes, &token).await;

    // Sessions route over the TLS links.
    let project = create_project(&reqwest::Client::new(), &nodes[0].base(), &token, "Tls").await;
    let on_a = Client::connect(&nodes[0].base(), &token, project, "main")
        .await
        .expect("A serves");
    let routed = Client::connect(&nodes[1].base(), &token, project, "main")
        .await
        .expect("B routes to A");
    assert_eq!(routed.welcome().owner, "tls-a");
    routed
        .request(write("over-tls.txt", b"routed over TLS"))
        .await
        .expect("a routed write");
    assert_eq!(
        read(&on_a, "over-tls.txt").await.as_deref(),
        Some(&b"routed over TLS"[..])
    );

    // A connection that never finishes its handshake, and one that sends
    // garbage, on A's cluster port: refused, and nobody waits on them.
    let port = nodes[0].cluster_port();
    let _stalled = tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .expect("a silent connection");
    let mut garbage = tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .expect("a garbage connection");
    tokio::io::AsyncWriteExt::write_all(&mut garbage, b"GET / HTTP/1.1\r\n\r\nnot a TLS hello")
        .await
        .expect("send garbage");
    nodes.push(tls_node(&db, "tls-c", &ca.node("tls-c")));
    full_mesh(&nodes, &token).await;

    // A certificate of another CA, an expired one of the right CA, and no
    // TLS at all: never let in.
    let other_ca = TestCa::new("a foreign CA");
    let expired = ca.node_with("tls-expired", |params| {
        params.not_before = rcgen::date_time_ymd(2020, 1, 1);
        params.not_after = rcgen::date_time_ymd(2021, 1, 1);
    });
    let intruders = [
        tls_node(&db, "tls-foreign", &other_ca.node("tls-foreign")),
        tls_node(&db, "tls-expired", &expired),
        Node::start(&db, "tls-plain", COOKIE),
    ];
    tokio::time::sleep(Duration::from_secs(3)).await;
    for node in &nodes {
        let peers = ready_peers(&view(node, &token).await);
        assert!(
            ["tls-foreign", "tls-expired", "tls-plain"]
                .iter()
                .all(|intruder| !peers.contains(*intruder)),
            "{} let an intruder in: {peers:?}",
            node.tag
        );
    }
    for intruder in &intruders {
        let peers = ready_peers(&view(intruder, &token).await);
        assert!(peers.is_empty(), "{} joined {peers:?}", intruder.tag);
    }
    // The members still work together.
    full_mesh(&nodes, &token).await;
    routed
        .request(write("still.txt", b"still routed"))
        .await
        .expect("routing still works");
}

/// Partial or mismatched TLS settings stop a node at start, saying what
/// to fix, instead of running it without the protection it was given.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_tls_settings_stop_the_node_with_what_to_fix() {
    let Some(db) = postgres("bad_tls_settings_stop_the_node_with_what_to_fix").await else {
        return;
    };
    let ca = TestCa::new("branchd test cluster CA");
    let (one, other) = (ca.node("tls-one"), ca.node("tls-other"));
    let setting = |files: &[(String, String)], name: &str| {
        files
            .iter()
            .find(|(n, _)| n == name)
            .map(|(n, v)| (n.clone(), v.clone()))
            .expect("a setting")
    };
    let cases = [
        (
            vec![setting(&one, "BRANCHD_CLUSTER_TLS_CERT")],
            "needs all three of BRANCHD_CLUSTER_TLS_CERT, BRANCHD_CLUSTER_TLS_KEY and BRANCHD_CLUSTER_TLS_CA",
        ),
        (
            vec![
                setting(&one, "BRANCHD_CLUSTER_TLS_CERT"),
                setting(&other, "BRANCHD_CLUSTER_TLS_KEY"),
                setting(&one, "BRANCHD_CLUSTER_TLS_CA"),
            ],
            "does not match the key (BRANCHD_CLUSTER_TLS_KEY)",
        ),
        (
            vec![
                setting(&one, "BRANCHD_CLUSTER_TLS_CERT"),
                setting(&one, "BRANCHD_CLUSTER_TLS_KEY"),
                (
                    "BRANCHD_CLUSTER_TLS_CA".into(),
                    "/nonexistent/ca.pem".into(),
                ),
            ],
            "reading the CA /nonexistent/ca.pem (BRANCHD_CLUSTER_TLS_CA)",
        ),
    ];
    for (settings, expected) in cases {
        let dir = tempfile::tempdir().expect("dir");
        let refused = std::process::Command::new(env!("CARGO_BIN_EXE_branchd"))
            .args(["serve", "--listen", "127.0.0.1:0"])
            .env_clear()
            .env("BRANCHD_DATA_DIR", dir.path())
            .env("BRANCHD_DATABASE_URL", &db.url)
            .env("BRANCHD_ADMIN_PASSWORD", PASSWORD)
            .env("BRANCHD_CLUSTER_COOKIE", COOKIE)
            .env("BRANCHD_CLUSTER_PORT", free_port().to_string())
            .env("BRANCHD_CLUSTER_BIND", "127.0.0.1")
            .env("BRANCHD_ADVERTISE_HOST", "127.0.0.1")
            .envs(settings.iter().map(|(k, v)| (k.as_str(), v.as_str())))
            .output()
            .expect("run branchd");
        let said = String::from_utf8_lossy(&refused.stderr);
        assert_eq!(refused.status.code(), Some(1), "{said}");
        assert!(said.contains(expected), "expected {expected:?} in {said}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_with_the_wrong_cookie_never_joins() {
    let Some(db) = postgres("a_node_with_the_wrong_cookie_never_joins").await else {
        return;
    };
    let (nodes, token) = cluster(&db, &["cookie-a", "cookie-b"]).await;
    full_mesh(&nodes, &token).await;
    let intruder = Node::start(&db, "cookie-x", "not-the-cookie");
    // Long enough for several membership rounds and dial attempts.
    tokio::time::sleep(Duration::from_secs(4)).await;
    for node in &nodes {
        let seen = view(node, &token).await;
        assert!(!ready_peers(&seen).contains("cookie-x"), "{seen}");
        let row = seen["nodes"]
            .as_array()
            .expect("nodes")
            .iter()
            .find(|n| n["server_tag"] == "cookie-x")
            .cloned()
            .expect("the intruder has a row (it shares the database)");
        assert_eq!(row["connected"], false, "{row}");
    }
    let seen = view(&intruder, &token).await;
    assert!(
        ready_peers(&seen).is_empty(),
        "the intruder has no peer: {seen}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_restarted_with_its_tag_wipes_its_old_rows() {
    let Some(db) = postgres("a_node_restarted_with_its_tag_wipes_its_old_rows").await else {
        return;
    };
    let (mut nodes, token) = cluster(&db, &["wipe-a", "wipe-b"]).await;
    full_mesh(&nodes, &token).await;
    let project = create_project(&reqwest::Client::new(), &nodes[1].base(), &token, "Wipe").await;
    let client = Client::connect(&nodes[1].base(), &token, project, "main")
        .await
        .expect("B owns the workspace");
    client
        .request(write("kept.txt", b"journalled"))
        .await
        .expect("a write");
    let store = db.open().await;
    let key = branchd::storage::WorkspaceKey::new(project, "main");
    assert_eq!(store.sessions_of(&key).await.expect("sessions").len(), 1);

    nodes[1].kill();
    drop(client);
    nodes[1].restart();
    // Right at start, before any lease could run out: its own rows are gone.
    let claim = store
        .claim_of(&key)
        .await
        .expect("claim")
        .expect("row kept");
    assert_eq!(
        claim.server_tag, None,
        "the restarted node released its claim"
    );
    assert!(store.sessions_of(&key).await.expect("sessions").is_empty());
    full_mesh(&nodes, &token).await;
    let again = Client::connect(&nodes[0].base(), &token, project, "main")
        .await
        .expect("served again");
    assert_eq!(
        read(&again, "kept.txt").await.as_deref(),
        Some(&b"journalled"[..])
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_local_cluster_script_starts_a_mesh_shows_it_and_stops_it() {
    let Some(db) = postgres("the_local_cluster_script_starts_a_mesh_shows_it_and_stops_it").await
    else {
        return;
    };
    let run_dir = tempfile::tempdir().expect("run dir");
    // Two nodes need HTTP_BASE+1..2 and CLUSTER_BASE+1..2: pick bases whose
    // ports are free now.
    let base = |from: u16| {
        (from..from + 2000)
            .step_by(10)
            .find(|b| (1..=2).all(|i| std::net::TcpListener::bind(("127.0.0.1", b + i)).is_ok()))
            .expect("free ports")
    };
    let (http_base, cluster_base) = (base(21000), base(24000));
    let script = |command: &str| {
        let mut run = std::process::Command::new("bash");
        for (name, _) in std::env::vars() {
            if name.starts_with("BRANCHD_") {
                run.env_remove(name);
            }
        }
        run.arg(concat!(env!("CARGO_MANIFEST_DIR"), "/cluster/local.sh"))
            .args(command.split(' '))
            .env("BRANCHD_BIN", env!("CARGO_BIN_EXE_branchd"))
            .env("RUN_DIR", run_dir.path())
            .env("DATABASE_URL", &db.url)
            .env("HTTP_BASE", http_base.to_string())
            .env("CLUSTER_BASE", cluster_base.to_string())
            .env("BRANCHD_LOG", "error")
            .output()
            .expect("run cluster/local.sh")
    };
    let started = script("start 2");
    assert!(started.status.success(), "{started:?}");
    let mut mesh = false;
    // `status` fails until node-1 answers; then it prints one view per node.
    for _ in 0..150 {
        let status = script("status");
        let text = String::from_utf8_lossy(&status.stdout).to_string();
        let views: Vec<Value> = text
            .lines()
            .filter_map(|line| serde_json::from_str(line).ok())
            .collect();
        if views.len() == 2 && views.iter().all(|v| ready_peers(v).len() == 1) {
            mesh = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert!(mesh, "the two nodes joined each other, as `status` shows");
    let stopped = script("stop");
    assert!(stopped.status.success(), "{stopped:?}");
    for i in 1..=2 {
        let addr = format!("127.0.0.1:{}", http_base + i);
        assert!(
            std::net::TcpStream::connect(&addr).is_err(),
            "node-{i} stopped listening"
        );
    }
}
