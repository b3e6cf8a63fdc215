//! Partitions between real `branchd` processes, cut for real.
//!
//! Each node runs in a network namespace of its own with two links: one to
//! the other nodes (the cluster network) and one to the clients and the
//! database (the service network, where a proxy run by the test forwards
//! to Postgres). Cutting a link is `ip link set … down` on the root side of
//! its veth: packets vanish and no connection is reset, as in a real
//! partition. The test sets the namespaces, bridges and proxies up and
//! removes them, also when it fails.
//!
//! Needs root (CI runs as root) and Postgres; without root the tests say so
//! and pass, unless `BRANCHD_REQUIRE_NETNS=1`.

mod common;

use std::collections::HashSet;
use std::io::{BufRead, BufReader, Write};
use std::net::{Ipv4Addr, SocketAddr};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use branchd::client::{Client, ClientError};
use branchd::protocol::{ErrorCode, Op, Reply};
use common::process::{create_project, login, ready_peers};
use common::{TestDb, eventually_within};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;

const BIN: &str = env!("CARGO_BIN_EXE_branchd");
const PASSWORD: &str = "partition-test-password";
const COOKIE: &str = "partition-test-cookie";
const HTTP_PORT: u16 = 8080;

/// Runs `ip` with these arguments; panics with its error output if it fails.
fn ip(args: &[&str]) {
    let out = Command::new("ip")
        .args(args)
        .output()
        .expect("run ip (iproute2)");
    assert!(
        out.status.success(),
        "ip {}: {}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Whether this process may make network namespaces.
fn netns_available() -> bool {
    // SAFETY: geteuid has no preconditions and touches no memory.
    let root = unsafe { libc::geteuid() } == 0;
    let required = std::env::var("BRANCHD_REQUIRE_NETNS").is_ok_and(|v| v == "1");
    assert!(
        root || !required,
        "BRANCHD_REQUIRE_NETNS=1 but the tests do not run as root"
    );
    if !root {
        eprintln!("NOTICE: skipping a partition test: network namespaces need root");
    }
    root
}

/// The namespaces, bridges and veths of one test.
struct Net {
    id: u32,
    nodes: usize,
}

impl Net {
    fn new(nodes: usize) -> Net {
        static NEXT: AtomicU32 = AtomicU32::new(0);
        // Unique among the tests of this process, and probably among
        // processes: a subnet octet and part of every interface's name.
        let id = (std::process::id() + NEXT.fetch_add(1, Ordering::Relaxed) * 37) % 200 + 20;
        let net = Net { id, nodes };
        for (bridge, subnet) in [(net.bridge('c'), 201), (net.bridge('s'), 202)] {
            ip(&["link", "add", &bridge, "type", "bridge"]);
            ip(&[
                "addr",
                "add",
                &format!("10.{subnet}.{id}.1/24"),
                "dev",
                &bridge,
            ]);
            ip(&["link", "set", &bridge, "up"]);
        }
        for n in 0..nodes {
            let ns = net.ns(n);
            ip(&["netns", "add", &ns]);
            ip(&["-n", &ns, "link", "set", "lo", "up"]);
            for (kind, subnet) in [('c', 201), ('s', 202)] {
                let (outer, inner) = (net.veth(kind, n), format!("{}p", net.veth(kind, n)));
                ip(&[
                    "link", "add", &outer, "type", "veth", "peer", "name", &inner,
                ]);
                ip(&["link", "set", &inner, "netns", &ns]);
                ip(&["link", "set", &outer, "master", &net.bridge(kind), "up"]);
                let addr = format!("10.{subnet}.{id}.{}/24", 10 + n);
                ip(&["-n", &ns, "addr", "add", &addr, "dev", &inner]);
                ip(&["-n", &ns, "link", "set", &inner, "up"]);
            }
        }
        net
    }

    fn bridge(&self, kind: char) -> String {
        format!("bd{kind}{}", self.id)
    }

    fn ns(&self, n: usize) -> String {
        format!("branchd-{}-{n}", self.id)
    }

    fn veth(&self, kind: char, n: usize) -> String {
        format!("{kind}{}n{n}", self.id)
    }

    /// Where node `n` is dialled by the other nodes.
    fn cluster_ip(&self, n: usize) -> Ipv4Addr {
        Ipv4Addr::new(10, 201, self.id as u8, 10 + n as u8)
    }

    /// Where clients reach node `n`.
    fn service_ip(&self, n: usize) -> Ipv4Addr {
        Ipv4Addr::new(10, 202, self.id as u8, 10 + n as u8)
    }

    /// The test's own address on the service network (the database proxy).
    fn host_service_ip(&self) -> Ipv4Addr {
        Ipv4Addr::new(10, 202, self.id as u8, 1)
    }

    /// Cuts (or heals) node `n`'s link to the other nodes.
    fn cluster_link(&self, n: usize, up: bool) {
        ip(&[
            "link",
            "set",
            &self.veth('c', n),
            if up { "up" } else { "down" },
        ]);
    }
}

impl Drop for Net {
    fn drop(&mut self) {
        for n in 0..self.nodes {
            let _ = Command::new("ip")
                .args(["netns", "del", &self.ns(n)])
                .output();
        }
        for kind in ['c', 's'] {
            let _ = Command::new("ip")
                .args(["link", "del", &self.bridge(kind)])
                .output();
        }
    }
}

/// One node's way to Postgres: a proxy on the service network that
/// forwards to Postgres on loopback, and can be cut (a black hole: bytes
/// are held, nothing is reset) and healed.
struct DatabaseProxy {
    addr: SocketAddr,
    open: watch::Sender<bool>,
}

impl DatabaseProxy {
    async fn start(bind: Ipv4Addr) -> DatabaseProxy {
        let listener = TcpListener::bind((bind, 0)).await.expect("bind the proxy");
        let addr = listener.local_addr().expect("proxy address");
        let (open, _) = watch::channel(true);
        let gate = open.clone();
        tokio::spawn(async move {
            while let Ok((inbound, _)) = listener.accept().await {
                let mut gate = gate.subscribe();
                tokio::spawn(async move {
                    if gate.wait_for(|open| *open).await.is_err() {
                        return;
                    }
                    let Ok(outbound) = TcpStream::connect("127.0.0.1:5432").await else {
                        return;
                    };
                    let (from_node, to_node) = inbound.into_split();
                    let (from_db, to_db) = outbound.into_split();
                    tokio::join!(
                        pipe(from_node, to_db, gate.clone()),
                        pipe(from_db, to_node, gate)
                    );
                });
            }
        });
        DatabaseProxy { addr, open }
    }

    fn set_open(&self, open: bool) {
        self.open.send_replace(open);
    }
}

/// Copies one direction, holding the bytes while the proxy is cut.
async fn pipe(
    mut from: tokio::net::tcp::OwnedReadHalf,
    mut to: tokio::net::tcp::OwnedWriteHalf,
    mut gate: watch::Receiver<bool>,
) {
    let mut buf = vec![0u8; 16 * 1024];
    loop {
        let n = match from.read(&mut buf).await {
            Ok(0) | Err(_) => return,
            Ok(n) => n,
        };
        if gate.wait_for(|open| *open).await.is_err() || to.write_all(&buf[..n]).await.is_err() {
            return;
        }
    }
}

/// A `branchd serve` in a namespace.
struct NsNode {
    tag: String,
    child: Child,
    base: String,
    _dir: tempfile::TempDir,
}

impl NsNode {
    fn start(
        net: &Net,
        n: usize,
        tag: &str,
        database_url: &str,
        settings: &[(&str, &str)],
    ) -> NsNode {
        let dir = tempfile::tempdir().expect("node dir");
        let cluster_ip = net.cluster_ip(n).to_string();
        let mut child = Command::new("ip")
            .args(["netns", "exec", &net.ns(n), BIN, "serve"])
            .env_clear()
            .env("BRANCHD_LISTEN", format!("0.0.0.0:{HTTP_PORT}"))
            .env("BRANCHD_DATA_DIR", dir.path())
            .env("BRANCHD_DATABASE_URL", database_url)
            .env("BRANCHD_SERVER_TAG", tag)
            .env("BRANCHD_ADMIN_PASSWORD", PASSWORD)
            .env("BRANCHD_CLUSTER_COOKIE", COOKIE)
            .env("BRANCHD_CLUSTER_BIND", "0.0.0.0")
            .env("BRANCHD_ADVERTISE_HOST", &cluster_ip)
            .env(
                "BRANCHD_LOG",
                std::env::var("CLUSTER_TEST_LOG").unwrap_or_else(|_| "error".into()),
            )
            .envs(settings.iter().copied())
            .stdout(Stdio::piped())
            .spawn()
            .expect("spawn branchd in its namespace");
        let stdout = child.stdout.take().expect("stdout");
        let mut lines = BufReader::new(stdout).lines();
        loop {
            let line = lines
                .next()
                .expect("branchd printed its address")
                .expect("a line");
            if line.starts_with("branchd: listening on ") {
                break;
            }
        }
        std::thread::spawn(move || for _ in lines {});
        NsNode {
            tag: tag.to_string(),
            child,
            base: format!("http://{}:{HTTP_PORT}", net.service_ip(n)),
            _dir: dir,
        }
    }
}

impl Drop for NsNode {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The peers a node has a ready session with; none if it does not answer.
async fn peers_of(node: &NsNode, token: &str) -> HashSet<String> {
    let Ok(response) = reqwest::Client::new()
        .get(format!("{}/ops/api/cluster", node.base))
        .bearer_auth(token)
        .timeout(Duration::from_secs(2))
        .send()
        .await
    else {
        return HashSet::new();
    };
    ready_peers(&response.json().await.unwrap_or_default())
}

async fn linked(a: &NsNode, b: &NsNode, token: &str) -> bool {
    peers_of(a, token).await.contains(&b.tag) && peers_of(b, token).await.contains(&a.tag)
}

fn write(path: &str, content: &[u8]) -> Op {
    Op::WriteFile {
        path: path.to_string(),
        content: content.to_vec(),
        base_version: None,
        force: true,
    }
}

/// Clusters of two nodes in namespaces: fast membership, a 2 s lease and
/// a peer timeout long enough that any wait on it would show.
struct TwoNodes {
    db: TestDb,
    net: Net,
    proxies: [DatabaseProxy; 2],
    nodes: [NsNode; 2],
    token: String,
}

async fn two_nodes(test: &str) -> Option<TwoNodes> {
    if !netns_available() {
        return None;
    }
    let db = TestDb::postgres(test).await?;
    let net = Net::new(2);
    let proxies = [
        DatabaseProxy::start(net.host_service_ip()).await,
        DatabaseProxy::start(net.host_service_ip()).await,
    ];
    let url = |proxy: &DatabaseProxy| {
        let url = db
            .url
            .replacen("127.0.0.1:5432", &proxy.addr.to_string(), 1);
        assert_ne!(url, db.url, "the test database is on 127.0.0.1:5432");
        url
    };
    let settings = [
        ("BRANCHD_LEASE", "2s"),
        ("BRANCHD_HEARTBEAT_INTERVAL", "250ms"),
        ("BRANCHD_MEMBERSHIP_INTERVAL", "250ms"),
        ("BRANCHD_PEER_TIMEOUT", "60s"),
    ];
    let nodes = [
        NsNode::start(&net, 0, "part-a", &url(&proxies[0]), &settings),
        NsNode::start(&net, 1, "part-b", &url(&proxies[1]), &settings),
    ];
    let token = login(&reqwest::Client::new(), &nodes[0].base, "admin", PASSWORD).await;
    eventually_within("the two nodes link", Duration::from_secs(20), || {
        linked(&nodes[0], &nodes[1], &token)
    })
    .await;
    Some(TwoNodes {
        db,
        net,
        proxies,
        nodes,
        token,
    })
}

/// The owner cut from its peers but not from the database keeps its
/// workspace: the session routed to it from the other node ends within the
/// missed pings, connecting through the other node is answered at once
/// (`unavailable`, with a hint) instead of waiting on the owner, a client
/// of the owner itself goes on writing, and once the link is back the
/// nodes link again by themselves and routing works again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_owner_cut_from_its_peers_keeps_its_workspace_and_the_link_heals_by_itself() {
    let Some(TwoNodes {
        db,
        net,
        nodes,
        token,
        ..
    }) = two_nodes("an_owner_cut_from_its_peers_keeps_its_workspace_and_the_link_heals_by_itself")
        .await
    else {
        return;
    };
    let [a, b] = &nodes;
    let project = create_project(&reqwest::Client::new(), &a.base, &token, "Cut").await;
    let on_a = Client::connect(&a.base, &token, project, "main")
        .await
        .expect("A serves");
    assert_eq!(on_a.welcome().owner, "part-a");
    let routed = Client::connect(&b.base, &token, project, "main")
        .await
        .expect("B routes to A");
    assert_eq!(routed.welcome().owner, "part-a");
    routed
        .request(write("before.txt", b"before the cut"))
        .await
        .expect("a routed write");

    net.cluster_link(0, false);
    let cut = Instant::now();

    // The routed session ends once B has missed A's pings.
    let mut routed_ended = None;
    while routed_ended.is_none() {
        assert!(
            cut.elapsed() < Duration::from_secs(30),
            "the routed session still waits on A after 30 s"
        );
        let attempt = tokio::time::timeout(
            Duration::from_secs(1),
            routed.request(Op::ReadFile {
                path: "before.txt".into(),
            }),
        )
        .await;
        if let Ok(Err(_)) = attempt {
            routed_ended = Some(cut.elapsed());
        }
    }

    // Connecting through B is answered at once: A is live (it renews its
    // lease) but unreachable from B.
    let asked = Instant::now();
    match Client::connect(&b.base, &token, project, "main").await {
        Err(ClientError::Op(err)) => {
            assert_eq!(err.code, ErrorCode::Unavailable, "{err:?}");
            assert!(err.retry_after_ms.is_some(), "{err:?}");
        }
        Err(other) => panic!("B refused otherwise: {other:?}"),
        Ok(client) => panic!("B served a workspace A owns: {:?}", client.welcome()),
    }
    let connect_answered = asked.elapsed();
    assert!(
        connect_answered < Duration::from_secs(10),
        "a connect through B waited {connect_answered:?}, as if for A"
    );

    // A keeps its workspace and its own clients keep writing.
    on_a.request(write("during.txt", b"written on A during the cut"))
        .await
        .expect("A still serves its own clients");
    let claim = db
        .open()
        .await
        .claim_of(&branchd::storage::WorkspaceKey::new(project, "main"))
        .await
        .expect("claim")
        .expect("a claim row");
    assert_eq!(claim.server_tag.as_deref(), Some("part-a"));

    // Healed: the nodes link again by themselves, and routing works.
    net.cluster_link(0, true);
    let healed = Instant::now();
    eventually_within("A and B link again", Duration::from_secs(60), || {
        linked(a, b, &token)
    })
    .await;
    let relinked = healed.elapsed();
    let again = Client::connect(&b.base, &token, project, "main")
        .await
        .expect("B routes to A again");
    assert_eq!(again.welcome().owner, "part-a");
    match again
        .request(Op::ReadFile {
            path: "during.txt".into(),
        })
        .await
    {
        Ok(Reply::File { content, .. }) => assert_eq!(content, b"written on A during the cut"),
        other => panic!("reading through B after the heal: {other:?}"),
    }
    let _ = writeln!(
        std::io::stderr(),
        "owner cut from its peers (lease 2 s, pings every 250 ms, peer timeout 60 s): routed session ended {} ms after the cut, a connect through the other node answered in {} ms, nodes linked again {} ms after the heal",
        routed_ended.map(|d| d.as_millis()).unwrap_or_default(),
        connect_answered.as_millis(),
        relinked.as_millis()
    );
}

/// The owner cut from the database and from its peers fences itself: it
/// refuses writes within half a lease (a write already waiting on the
/// database included) and closes its sessions; the other node takes the
/// workspace over once the lease has run out, with everything
/// acknowledged; and after the links heal, nothing the old owner tried to
/// write reaches the journal (its epoch writes nothing after the cut).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_owner_cut_from_the_database_and_its_peers_fences_itself_and_is_replaced() {
    let Some(TwoNodes {
        db,
        net,
        proxies,
        nodes,
        token,
    }) = two_nodes("an_owner_cut_from_the_database_and_its_peers_fences_itself_and_is_replaced")
        .await
    else {
        return;
    };
    let [a, b] = &nodes;
    let store = db.open().await;
    let project = create_project(&reqwest::Client::new(), &a.base, &token, "Fenced").await;
    let key = branchd::storage::WorkspaceKey::new(project, "main");
    let on_a = Client::connect(&a.base, &token, project, "main")
        .await
        .expect("A serves");
    assert_eq!(on_a.welcome().owner, "part-a");
    on_a.request(write("acked.txt", b"acknowledged before the cut"))
        .await
        .expect("a write on A");
    let old_epoch = store
        .claim_of(&key)
        .await
        .expect("claim")
        .expect("a claim row")
        .epoch;
    let journalled_before = store
        .journal_after(&key, 0)
        .await
        .expect("journal")
        .into_iter()
        .filter(|e| e.epoch == old_epoch)
        .map(|e| e.seq)
        .max()
        .unwrap_or(0);

    proxies[0].set_open(false);
    net.cluster_link(0, false);
    let cut = Instant::now();

    // A's client keeps writing: nothing is acknowledged, and within about
    // half the lease (1 s) the writes are refused or the session closed.
    let mut refused = 0usize;
    let mut acknowledged = 0usize;
    let fenced = loop {
        assert!(
            cut.elapsed() < Duration::from_secs(20),
            "A still took writes {:?} after losing the database",
            cut.elapsed()
        );
        let attempt = tokio::time::timeout(
            Duration::from_secs(5),
            on_a.request(write("during.txt", b"never acknowledged")),
        )
        .await;
        match attempt {
            Ok(Ok(_)) => acknowledged += 1,
            Ok(Err(ClientError::Op(err))) if err.code == ErrorCode::Unavailable => {
                refused += 1;
                break cut.elapsed();
            }
            Ok(Err(_)) => break cut.elapsed(), // the session was closed
            Err(_) => panic!("a write on A waited 5 s without an answer"),
        }
    };
    assert_eq!(
        acknowledged, 0,
        "A acknowledged writes without its database"
    );

    // B takes over once A's lease has run out.
    let taken_over = loop {
        assert!(
            cut.elapsed() < Duration::from_secs(30),
            "B did not take over within 30 s"
        );
        match Client::connect(&b.base, &token, project, "main").await {
            Ok(client) if client.welcome().owner == "part-b" => break client,
            Ok(client) => panic!("B routed to {} while A is cut", client.welcome().owner),
            Err(ClientError::Op(err)) => {
                let wait = err.retry_after_ms.unwrap_or(100).min(2_000);
                tokio::time::sleep(Duration::from_millis(wait)).await;
            }
            Err(other) => panic!("connecting to B: {other:?}"),
        }
    };
    let takeover = cut.elapsed();
    match taken_over
        .request(Op::ReadFile {
            path: "acked.txt".into(),
        })
        .await
    {
        Ok(Reply::File { content, .. }) => assert_eq!(content, b"acknowledged before the cut"),
        other => panic!("reading on B after the takeover: {other:?}"),
    }
    taken_over
        .request(write("after.txt", b"written on B"))
        .await
        .expect("B writes as the new owner");

    // Healed: A's held traffic reaches the database, and is refused there.
    proxies[0].set_open(true);
    net.cluster_link(0, true);
    eventually_within("A and B link again", Duration::from_secs(60), || {
        linked(a, b, &token)
    })
    .await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    let late: Vec<i64> = store
        .journal_after(&key, journalled_before)
        .await
        .expect("journal")
        .into_iter()
        .filter(|e| e.epoch == old_epoch)
        .map(|e| e.seq)
        .collect();
    assert!(
        late.is_empty(),
        "the old owner wrote {late:?} after the cut"
    );
    let again = Client::connect(&a.base, &token, project, "main")
        .await
        .expect("A routes to the new owner after the heal");
    assert_eq!(again.welcome().owner, "part-b");
    let _ = writeln!(
        std::io::stderr(),
        "owner cut from the database and its peers (lease 2 s): fenced {} ms after the cut ({refused} write refused, 0 acknowledged), taken over {} ms after the cut, 0 journal records from the old owner after the cut",
        fenced.as_millis(),
        takeover.as_millis()
    );
}
