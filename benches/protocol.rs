//! WebSocket protocol figures on a real server over loopback, in one run:
//!
//! - the round trip of `read_file` of a 1 KiB file next to a raw WebSocket
//!   echo of a 1 KiB frame on the same server (`/ws/echo`);
//! - throughput with 100 connections over 20 branches, 4 requests in flight
//!   per connection, 5 s a row: echo; `read_file` only; 80 % reads and 20 %
//!   writes; the same with one connection per branch, so that no write
//!   has anyone to send an event to. One driver loop runs these on raw
//!   sockets (it reads only a reply's id and skips events), so the rows
//!   differ only in what the server does. A last row runs the mixed load
//!   through `branchd::client::Client`, whose own cost (a reader task, a reply
//!   channel per request, every event decoded) then shows next to it.
//!
//! Run: `cargo bench --bench protocol` (SQLite; `DATABASE_URL=postgres://...`
//! for Postgres; `BENCH_WORKSPACE_DIR` for where working copies go).

use std::sync::Arc;
use std::time::{Duration, Instant};

use branchd::client::Client;
use branchd::protocol::{Op, Reply};
use futures_util::stream::FuturesUnordered;
use futures_util::{SinkExt, StreamExt};
use tokio_tungstenite::tungstenite::Message;

mod common;

const SECONDS: u64 = 5;

fn percentile(samples: &mut [Duration], p: f64) -> Duration {
    samples.sort();
    samples[((samples.len() as f64 - 1.0) * p).round() as usize]
}

fn micros(d: Duration) -> f64 {
    d.as_secs_f64() * 1e6
}

type Socket =
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

/// Connections of the throughput runs, the branches they spread over and
/// the requests each keeps in flight.
const CONNECTIONS: usize = 100;
const BRANCHES: usize = 20;
const DEPTH: usize = 4;

/// A socket configured like `branchd::client::Client`, so that every row
/// reads frames alike.
async fn open_socket(url: String) -> Socket {
    let config = tokio_tungstenite::tungstenite::protocol::WebSocketConfig::default()
        .read_buffer_size(branchd::gateway::ws::READ_BUFFER);
    tokio_tungstenite::connect_async_with_config(url, Some(config), false)
        .await
        .expect("socket")
        .0
}

async fn echo_socket(base: &str, token: &str) -> Socket {
    open_socket(format!(
        "{}/ws/echo?access_token={token}",
        base.replacen("http", "ws", 1)
    ))
    .await
}

async fn op_socket(base: &str, token: &str, project: i64, branch: String) -> Socket {
    open_socket(format!(
        "{}/ws?project={project}&branch={branch}&access_token={token}",
        base.replacen("http", "ws", 1)
    ))
    .await
}

fn read_op(connection: usize) -> Op {
    Op::ReadFile {
        path: format!("own{connection}.txt"),
    }
}

fn write_op(connection: usize, content: &[u8]) -> Op {
    Op::WriteFile {
        path: format!("own{connection}.txt"),
        content: content.to_vec(),
        base_version: None,
        force: true,
    }
}

/// Request `n` of a connection carries id `n + 1`.
fn op_frame(n: u64, op: Op) -> Message {
    Message::Binary(
        branchd::protocol::request_frame(n + 1, &op)
            .expect("request")
            .into(),
    )
}

/// What the driver reads of a server frame: its id, and whether it is an
/// event or an error (the rest is skipped unread).
#[derive(serde::Deserialize)]
struct Head {
    id: Option<u64>,
    event: Option<serde::de::IgnoredAny>,
    err: Option<rmpv::Value>,
}

/// Reads frames until the reply to request `id` (events are skipped) and
/// checks that it is `ok`.
async fn read_reply(socket: &mut Socket, id: u64) {
    loop {
        let Message::Binary(bytes) = socket.next().await.expect("open").expect("frame") else {
            continue;
        };
        let head: Head = rmp_serde::from_slice(&bytes).expect("a protocol frame");
        if head.event.is_some() {
            continue;
        }
        assert!(head.err.is_none(), "request failed: {:?}", head.err);
        assert_eq!(head.id, Some(id), "a reply to another request");
        return;
    }
}

/// One throughput run: every latency and the wall time it took.
struct Run {
    latencies: Vec<Duration>,
    elapsed: Duration,
}

impl Run {
    fn rate(&self) -> f64 {
        self.latencies.len() as f64 / self.elapsed.as_secs_f64()
    }

    fn percentile(&mut self, p: f64) -> Duration {
        percentile(&mut self.latencies, p)
    }
}

/// Keeps DEPTH frames in flight on every socket for SECONDS, then waits
/// for the last replies. `frame(connection, n)` is the n-th frame of a
/// connection. On `/ws` sockets, events are skipped and every reply must be
/// `ok` and come in request order (ids are `n + 1`); on echo sockets, each
/// frame back is a reply.
async fn drive<S, F>(sockets: impl Iterator<Item = S>, frame: F) -> Run
where
    S: std::future::Future<Output = Socket>,
    F: Fn(usize, u64) -> Message + Clone + Send + 'static,
{
    let mut connected = Vec::new();
    for socket in sockets {
        connected.push(socket.await);
    }
    let deadline = Instant::now() + Duration::from_secs(SECONDS);
    let started = Instant::now();
    let tasks: Vec<_> = connected
        .into_iter()
        .enumerate()
        .map(|(i, mut socket)| {
            let frame = frame.clone();
            tokio::spawn(async move {
                let mut latencies = Vec::new();
                let mut sent = std::collections::VecDeque::new();
                let mut n = 0u64;
                for _ in 0..DEPTH {
                    socket.send(frame(i, n)).await.expect("send");
                    sent.push_back((n, Instant::now()));
                    n += 1;
                }
                while let Some(&(expected, at)) = sent.front() {
                    let Message::Binary(bytes) = socket.next().await.expect("open").expect("frame")
                    else {
                        continue;
                    };
                    if let Ok(head) = rmp_serde::from_slice::<Head>(&bytes) {
                        if head.event.is_some() {
                            continue;
                        }
                        assert!(head.err.is_none(), "request failed: {:?}", head.err);
                        assert_eq!(head.id, Some(expected + 1), "replies out of order");
                    }
                    latencies.push(at.elapsed());
                    sent.pop_front();
                    if Instant::now() < deadline {
                        socket.send(frame(i, n)).await.expect("send");
                        sent.push_back((n, Instant::now()));
                        n += 1;
                    }
                }
                let _ = socket.close(None).await;
                latencies
            })
        })
        .collect();
    finish(started, tasks).await
}

/// The mixed load again, through `branchd::client::Client` (its reader
/// task, reply channels and event queue included).
async fn drive_clients(clients: &[Arc<Client>], small: &[u8]) -> Run {
    let deadline = Instant::now() + Duration::from_secs(SECONDS);
    let started = Instant::now();
    let tasks: Vec<_> = clients
        .iter()
        .enumerate()
        .map(|(i, c)| {
            let (c, small) = (c.clone(), small.to_vec());
            tokio::spawn(async move {
                let mut latencies = Vec::new();
                let mut in_flight = FuturesUnordered::new();
                let next = |n: u64| {
                    let c = c.clone();
                    let op = mixed_op(i, n, &small);
                    async move {
                        let t = Instant::now();
                        c.request(op).await.expect("op");
                        t.elapsed()
                    }
                };
                let mut n = 0u64;
                for _ in 0..DEPTH {
                    in_flight.push(next(n));
                    n += 1;
                }
                while let Some(latency) = in_flight.next().await {
                    latencies.push(latency);
                    if Instant::now() < deadline {
                        in_flight.push(next(n));
                        n += 1;
                    }
                }
                latencies
            })
        })
        .collect();
    finish(started, tasks).await
}

/// Waits for every connection's task: their latencies, and the wall time
/// since `started`.
async fn finish(started: Instant, tasks: Vec<tokio::task::JoinHandle<Vec<Duration>>>) -> Run {
    let mut latencies = Vec::new();
    for task in tasks {
        latencies.extend(task.await.expect("connection task"));
    }
    Run {
        latencies,
        elapsed: started.elapsed(),
    }
}

/// Request `n` of connection `connection` in the mixed load: every fifth
/// one writes, the others read.
fn mixed_op(connection: usize, n: u64, content: &[u8]) -> Op {
    if n % 5 == 4 {
        write_op(connection, content)
    } else {
        read_op(connection)
    }
}

#[tokio::main]
async fn main() {
    let (server, base, token, project, _data) =
        common::bench_server(std::env::var("BENCH_WORKSPACE_DIR").ok().map(Into::into)).await;

    let client = Client::connect(&base, &token, project, "main")
        .await
        .expect("client");
    let small = vec![b'x'; 1024];
    client
        .request(Op::WriteFile {
            path: "small.txt".into(),
            content: small.clone(),
            base_version: None,
            force: true,
        })
        .await
        .expect("seed");
    // Round trips on one socket each, interleaved in blocks so that drift
    // hits all alike. Echo and read go through the same raw socket code;
    // the third row adds `branchd::client::Client`'s own cost.
    let mut echo = echo_socket(&base, &token).await;
    let mut reader = op_socket(&base, &token, project, "main".into()).await;
    let echo_frame = Message::Binary(small.clone().into());
    let (mut echo_rtt, mut read_rtt, mut client_rtt) = (Vec::new(), Vec::new(), Vec::new());
    let mut ping_rtt = Vec::new();
    let ping_frame = |id: u64| Message::Binary(branchd::protocol::ping_frame(id).into());
    let mut id = 0u64;
    for round in 0..60 {
        let keep = round >= 10; // the first rounds warm up
        for _ in 0..100 {
            let started = Instant::now();
            echo.send(echo_frame.clone()).await.expect("echo send");
            echo.next().await.expect("echo reply").expect("frame");
            if keep {
                echo_rtt.push(started.elapsed());
            }
        }
        for _ in 0..100 {
            let started = Instant::now();
            reader
                .send(op_frame(
                    id,
                    Op::ReadFile {
                        path: "small.txt".into(),
                    },
                ))
                .await
                .expect("read send");
            read_reply(&mut reader, id + 1).await;
            id += 1;
            if keep {
                read_rtt.push(started.elapsed());
            }
        }
        for _ in 0..100 {
            let started = Instant::now();
            reader.send(ping_frame(id + 1)).await.expect("ping send");
            read_reply(&mut reader, id + 1).await;
            id += 1;
            if keep {
                ping_rtt.push(started.elapsed());
            }
        }
        for _ in 0..100 {
            let started = Instant::now();
            let reply = client
                .request(Op::ReadFile {
                    path: "small.txt".into(),
                })
                .await
                .expect("read");
            assert!(matches!(reply, Reply::File { .. }));
            if keep {
                client_rtt.push(started.elapsed());
            }
        }
    }
    println!(
        "branchd protocol bench: backend {:?}, one process (server and clients share 2 cores), {} samples each",
        server.store().backend(),
        echo_rtt.len()
    );
    println!("| scenario | median | p99 |");
    println!("|---|---|---|");
    let mut report = common::Report::new("protocol");
    let mut medians = Vec::new();
    for (scenario, samples) in [
        ("echo 1 KiB, one socket", &mut echo_rtt),
        ("read_file 1 KiB, one socket", &mut read_rtt),
        (
            "ping (answered by the connection), one socket",
            &mut ping_rtt,
        ),
        (
            "read_file 1 KiB, through branchd::client::Client",
            &mut client_rtt,
        ),
    ] {
        let (p50, p99) = (percentile(samples, 0.5), percentile(samples, 0.99));
        println!(
            "| {scenario} | {:.1} µs | {:.1} µs |",
            micros(p50),
            micros(p99)
        );
        report.value(&format!("{scenario}, n"), samples.len() as f64, "samples");
        report.value(&format!("{scenario}, median"), micros(p50), "µs");
        report.value(&format!("{scenario}, p99"), micros(p99), "µs");
        medians.push(micros(p50));
    }
    report.ratio(
        "read / echo (p50)",
        medians[1] / medians[0],
        Some(("<=", 1.3)),
    );
    report.ratio(
        "read through Client / echo (p50)",
        medians[3] / medians[0],
        None,
    );
    drop(reader);

    // Throughput: 100 connections over 20 branches, each driven by the
    // same loop as the echo sockets, so that the two rows differ only in
    // what the server does.
    for b in 1..20 {
        client
            .request(Op::GitCreateBranch {
                name: format!("b{b}"),
            })
            .await
            .expect("branch");
    }
    let branch_of = |i: usize| {
        if i.is_multiple_of(BRANCHES) {
            "main".to_string()
        } else {
            format!("b{}", i % BRANCHES)
        }
    };
    let connect_all = || async {
        let mut clients = Vec::new();
        for i in 0..CONNECTIONS {
            let c = Client::connect(&base, &token, project, &branch_of(i))
                .await
                .expect("client");
            c.request(write_op(i, &small)).await.expect("seed");
            clients.push(Arc::new(c));
        }
        clients
    };
    // Seed each connection's file, then hang up: an idle socket would still
    // take every event of its branch during the rows below.
    for c in connect_all().await {
        if let Ok(c) = Arc::try_unwrap(c) {
            c.close().await;
        }
    }

    let mut rows = Vec::new();
    let payload = tokio_tungstenite::tungstenite::Bytes::from(small.clone());
    let echo = drive(
        (0..CONNECTIONS).map(|_| echo_socket(&base, &token)),
        move |_, _| Message::Binary(payload.clone()),
    )
    .await;
    rows.push(("echo 1 KiB", echo));
    // Marks each row's start on stderr, for a profiler attached from
    // outside (docs/performance.md, the protocol section).
    eprintln!("bench: read row starts");
    let reads = drive(
        (0..CONNECTIONS).map(|i| op_socket(&base, &token, project, branch_of(i))),
        |i, n| op_frame(n, read_op(i)),
    )
    .await;
    rows.push(("read_file 1 KiB only", reads));
    let mixed_frames = || {
        let small = small.clone();
        move |i, n| op_frame(n, mixed_op(i, n, &small))
    };
    eprintln!("bench: mixed row starts");
    let mixed = drive(
        (0..CONNECTIONS).map(|i| op_socket(&base, &token, project, branch_of(i))),
        mixed_frames(),
    )
    .await;
    rows.push(("80 % read_file / 20 % write_file (1 KiB)", mixed));

    // The same load with one connection per branch: a write then has no
    // one to tell, so next to the row above it shows what the four
    // `file_changed` events of each write cost (four more frames out, and
    // in, per write).
    // New branches start from the last commit.
    for i in 0..CONNECTIONS {
        client.request(write_op(i, &small)).await.expect("seed");
    }
    client
        .request(Op::GitCommit {
            message: "every connection's file".into(),
            paths: None,
        })
        .await
        .expect("commit");
    for i in 0..CONNECTIONS {
        client
            .request(Op::GitCreateBranch {
                name: format!("solo{i}"),
            })
            .await
            .expect("branch");
    }
    eprintln!("bench: solo row starts");
    let solo = drive(
        (0..CONNECTIONS).map(|i| op_socket(&base, &token, project, format!("solo{i}"))),
        mixed_frames(),
    )
    .await;
    rows.push(("80 % / 20 %, one connection per branch (no events)", solo));
    let clients = connect_all().await;
    let via_client = drive_clients(&clients, &small).await;
    rows.push(("80 % / 20 %, through branchd::client::Client", via_client));

    println!();
    println!(
        "| {CONNECTIONS} connections, {BRANCHES} branches, depth {DEPTH}, {SECONDS} s each | ops/s | median | p99 | of echo |"
    );
    println!("|---|---|---|---|---|");
    let echo_rate = rows[0].1.rate();
    for (name, run) in &mut rows {
        let (rate, p50, p99) = (run.rate(), run.percentile(0.5), run.percentile(0.99));
        println!(
            "| {name} | {rate:.0} | {:.0} µs | {:.0} µs | {:.2} |",
            micros(p50),
            micros(p99),
            rate / echo_rate
        );
        report.value(&format!("{name}, {CONNECTIONS} connections"), rate, "ops/s");
        report.value(&format!("{name}, median"), micros(p50), "µs");
        report.value(&format!("{name}, p99"), micros(p99), "µs");
    }
    report.ratio(
        "read_file only / echo throughput",
        rows[1].1.rate() / echo_rate,
        None,
    );
    report.ratio(
        "mixed ops / echo throughput",
        rows[2].1.rate() / echo_rate,
        Some((">=", 0.6)),
    );
    report.write();
    server.shutdown().await.expect("shutdown");
}
