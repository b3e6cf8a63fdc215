//! WebSocket protocol figures on a real server over loopback, in one run:
//!
//! - the round trip of `read_file` of a 1 KiB file next to a raw WebSocket
//!   echo of a 1 KiB frame on the same server (`/ws/echo`);
//! - throughput with 100 connections over 20 branches, 80 % reads and 20 %
//!   writes, 4 requests in flight per connection, next to echo throughput
//!   with the same connections and depth.
//!
//! Run: `cargo bench --bench protocol` (SQLite; `DATABASE_URL=postgres://...`
//! for Postgres; `BENCH_WORKSPACE_DIR` for where working copies go).

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
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

async fn echo_socket(
    base: &str,
    token: &str,
) -> tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>> {
    let url = format!(
        "{}/ws/echo?access_token={token}",
        base.replacen("http", "ws", 1)
    );
    // Configured like `branchd::client::Client`, so both sides compare alike.
    let config = tokio_tungstenite::tungstenite::protocol::WebSocketConfig::default()
        .read_buffer_size(branchd::gateway::ws::READ_BUFFER);
    tokio_tungstenite::connect_async_with_config(url, Some(config), false)
        .await
        .expect("echo socket")
        .0
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
    let mut echo = echo_socket(&base, &token).await;
    let frame = Message::Binary(small.clone().into());

    // Round trips, interleaved in blocks so that drift hits both alike.
    let (mut echo_rtt, mut read_rtt) = (Vec::new(), Vec::new());
    for round in 0..60 {
        for _ in 0..100 {
            let started = Instant::now();
            echo.send(frame.clone()).await.expect("echo send");
            echo.next().await.expect("echo reply").expect("frame");
            if round >= 10 {
                echo_rtt.push(started.elapsed());
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
            if round >= 10 {
                read_rtt.push(started.elapsed());
            }
        }
    }
    let (echo_p50, echo_p99) = (
        percentile(&mut echo_rtt, 0.5),
        percentile(&mut echo_rtt, 0.99),
    );
    let (read_p50, read_p99) = (
        percentile(&mut read_rtt, 0.5),
        percentile(&mut read_rtt, 0.99),
    );
    println!(
        "branchd protocol bench: backend {:?}, one process (server and clients share 2 cores), {} samples each",
        server.store().backend(),
        echo_rtt.len()
    );
    println!("| scenario | median | p99 |");
    println!("|---|---|---|");
    println!(
        "| echo 1 KiB, one socket | {:.1} µs | {:.1} µs |",
        micros(echo_p50),
        micros(echo_p99)
    );
    println!(
        "| read_file 1 KiB, one socket | {:.1} µs | {:.1} µs |",
        micros(read_p50),
        micros(read_p99)
    );
    println!(
        "| ratio read / echo | {:.2}x | {:.2}x |",
        micros(read_p50) / micros(echo_p50),
        micros(read_p99) / micros(echo_p99)
    );
    let mut report = common::Report::new("protocol");
    for (scenario, p50, p99, n) in [
        ("echo 1 KiB, one socket", echo_p50, echo_p99, echo_rtt.len()),
        (
            "read_file 1 KiB, one socket",
            read_p50,
            read_p99,
            read_rtt.len(),
        ),
    ] {
        report.value(&format!("{scenario}, n"), n as f64, "samples");
        report.value(&format!("{scenario}, median"), micros(p50), "µs");
        report.value(&format!("{scenario}, p99"), micros(p99), "µs");
    }
    report.ratio(
        "read / echo (p50)",
        micros(read_p50) / micros(echo_p50),
        Some(("<=", 1.3)),
    );

    // Throughput: 100 connections over 20 branches.
    for b in 1..20 {
        client
            .request(Op::GitCreateBranch {
                name: format!("b{b}"),
            })
            .await
            .expect("branch");
    }
    let mut clients = Vec::new();
    for i in 0..100 {
        let branch = if i % 20 == 0 {
            "main".to_string()
        } else {
            format!("b{}", i % 20)
        };
        let c = Client::connect(&base, &token, project, &branch)
            .await
            .expect("client");
        c.request(Op::WriteFile {
            path: format!("own{i}.txt"),
            content: small.clone(),
            base_version: None,
            force: true,
        })
        .await
        .expect("seed");
        clients.push(Arc::new(c));
    }
    let deadline = Instant::now() + Duration::from_secs(SECONDS);
    let started = Instant::now();
    let tasks: Vec<_> = clients
        .iter()
        .enumerate()
        .map(|(i, c)| {
            let (c, small) = (c.clone(), small.clone());
            tokio::spawn(async move {
                let mut latencies = Vec::new();
                let mut in_flight = FuturesUnordered::new();
                let mut n = 0u64;
                let next = |n: u64| {
                    let c = c.clone();
                    let small = small.clone();
                    async move {
                        let t = Instant::now();
                        let op = if n % 5 == 4 {
                            Op::WriteFile {
                                path: format!("own{i}.txt"),
                                content: small,
                                base_version: None,
                                force: true,
                            }
                        } else {
                            Op::ReadFile {
                                path: format!("own{i}.txt"),
                            }
                        };
                        c.request(op).await.expect("op");
                        t.elapsed()
                    }
                };
                for _ in 0..4 {
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
    let mut all = Vec::new();
    for task in tasks {
        all.extend(task.await.expect("task"));
    }
    let elapsed = started.elapsed();
    let ops = all.len();
    let (p50, p99) = (percentile(&mut all, 0.5), percentile(&mut all, 0.99));

    let echoes = AtomicU64::new(0);
    let echoes = Arc::new(echoes);
    let mut sockets = Vec::new();
    for _ in 0..100 {
        sockets.push(echo_socket(&base, &token).await);
    }
    let deadline = Instant::now() + Duration::from_secs(SECONDS);
    let started_echo = Instant::now();
    let tasks: Vec<_> = sockets
        .into_iter()
        .map(|mut socket| {
            let (frame, echoes) = (frame.clone(), echoes.clone());
            tokio::spawn(async move {
                for _ in 0..4 {
                    socket.send(frame.clone()).await.expect("send");
                }
                let mut outstanding = 4;
                while outstanding > 0 {
                    socket.next().await.expect("reply").expect("frame");
                    echoes.fetch_add(1, Ordering::Relaxed);
                    outstanding -= 1;
                    if Instant::now() < deadline {
                        socket.send(frame.clone()).await.expect("send");
                        outstanding += 1;
                    }
                }
            })
        })
        .collect();
    for task in tasks {
        task.await.expect("echo task");
    }
    let echo_elapsed = started_echo.elapsed();
    let echo_rate = echoes.load(Ordering::Relaxed) as f64 / echo_elapsed.as_secs_f64();
    let rate = ops as f64 / elapsed.as_secs_f64();
    println!();
    println!("| 100 connections, 20 branches, depth 4, {SECONDS} s | ops/s | median | p99 |");
    println!("|---|---|---|---|");
    println!(
        "| 80 % read_file / 20 % write_file (1 KiB) | {rate:.0} | {:.0} µs | {:.0} µs |",
        micros(p50),
        micros(p99)
    );
    println!("| echo 1 KiB | {echo_rate:.0} | | |");
    println!("| ratio ops / echo | {:.2} | | |", rate / echo_rate);
    report.value("mixed 80/20, 100 connections", rate, "ops/s");
    report.value("mixed 80/20, median", micros(p50), "µs");
    report.value("mixed 80/20, p99", micros(p99), "µs");
    report.value("echo, 100 connections", echo_rate, "ops/s");
    report.ratio(
        "mixed ops / echo throughput",
        rate / echo_rate,
        Some((">=", 0.6)),
    );
    report.write();
    server.shutdown().await.expect("shutdown");
}
