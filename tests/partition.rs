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

use std::io::{BufRead, BufReader, Write};
use std::net::{Ipv4Addr, SocketAddr};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use branchd::client::{Client, ClientError};
use branchd::protocol::{ErrorCode, Op, Reply};
use common::process::{create_project, login};
use common::{TestDb, eventually_within};
use serde_json::Value;
use tokio::net::{TcpListener, TcpStream};

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

/// Forwards connections on the service network to Postgres on loopback.
async fn database_proxy(bind: Ipv4Addr) -> SocketAddr {
    let listener = TcpListener::bind((bind, 0)).await.expect("bind the proxy");
    let addr = listener.local_addr().expect("proxy address");
    tokio::spawn(async move {
        while let Ok((mut inbound, _)) = listener.accept().await {
            tokio::spawn(async move {
                if let Ok(mut outbound) = TcpStream::connect("127.0.0.1:5432").await {
                    let _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound).await;
                }
            });
        }
    });
    addr
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

async fn ready_peers(node: &NsNode, token: &str) -> Vec<String> {
    let Ok(response) = reqwest::Client::new()
        .get(format!("{}/ops/api/cluster", node.base))
        .bearer_auth(token)
        .timeout(Duration::from_secs(2))
        .send()
        .await
    else {
        return Vec::new();
    };
    let view: Value = response.json().await.unwrap_or_default();
    view["peers"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|p| p["ready"] == true)
        .filter_map(|p| p["server_tag"].as_str().map(str::to_string))
        .collect()
}

async fn linked(a: &NsNode, b: &NsNode, token: &str) -> bool {
    ready_peers(a, token).await.contains(&b.tag) && ready_peers(b, token).await.contains(&a.tag)
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
async fn two_nodes(test: &str) -> Option<(TestDb, Net, [NsNode; 2], String)> {
    if !netns_available() {
        return None;
    }
    let db = TestDb::postgres(test).await?;
    let net = Net::new(2);
    let proxy = database_proxy(net.host_service_ip()).await;
    let url = db.url.replacen("127.0.0.1:5432", &proxy.to_string(), 1);
    assert_ne!(url, db.url, "the test database is on 127.0.0.1:5432");
    let settings = [
        ("BRANCHD_LEASE", "2s"),
        ("BRANCHD_HEARTBEAT_INTERVAL", "250ms"),
        ("BRANCHD_MEMBERSHIP_INTERVAL", "250ms"),
        ("BRANCHD_PEER_TIMEOUT", "60s"),
    ];
    let nodes = [
        NsNode::start(&net, 0, "part-a", &url, &settings),
        NsNode::start(&net, 1, "part-b", &url, &settings),
    ];
    let token = login(&reqwest::Client::new(), &nodes[0].base, "admin", PASSWORD).await;
    eventually_within("the two nodes link", Duration::from_secs(20), || {
        linked(&nodes[0], &nodes[1], &token)
    })
    .await;
    Some((db, net, nodes, token))
}

/// The owner cut from its peers but not from the database keeps its
/// workspace: the session routed to it from the other node ends within the
/// missed pings, connecting through the other node is answered at once
/// (`unavailable`, with a hint) instead of waiting on the owner, a client
/// of the owner itself goes on writing, and once the link is back the
/// nodes link again by themselves and routing works again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_owner_cut_from_its_peers_keeps_its_workspace_and_the_link_heals_by_itself() {
    let Some((db, net, nodes, token)) =
        two_nodes("an_owner_cut_from_its_peers_keeps_its_workspace_and_the_link_heals_by_itself")
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
