//! Many sockets joining one branch at once: open 1,000 WebSockets on the
//! same branch, 50 connecting at a time, and report how long until every
//! socket sees all the others, how many sockets were dropped, and how
//! many presence entries (sessions named in `presence` and
//! `presence_changed` events) the sockets were sent in all. Issue 17's
//! target: 1,000 sockets join within 10 s, none dropped.
//!
//! Run: `cargo bench --bench presence` (SQLite; `DATABASE_URL` for
//! Postgres; `SOCKETS=n` for another count). Client and server share the
//! process.

use std::collections::HashSet;
use std::time::{Duration, Instant};

use branchd::client::Client;
use branchd::protocol::Event;

mod common;

const AT_ONCE: usize = 50;

/// Follows a socket's presence events until it sees `want` sessions:
/// (entries it was sent, whether it got there).
async fn follow(mut client: Client, want: usize) -> (usize, bool, Client) {
    let mut present = HashSet::new();
    let mut entries = 0;
    while present.len() < want {
        match client.next_event(Duration::from_secs(60)).await {
            Some(Event::Presence { sessions }) => {
                entries += sessions.len();
                present = sessions.into_iter().map(|d| d.session).collect();
            }
            Some(Event::PresenceChanged { joined, left }) => {
                entries += joined.len() + left.len();
                for gone in left {
                    present.remove(&gone);
                }
                present.extend(joined.into_iter().map(|d| d.session));
            }
            Some(_) => {}
            None => return (entries, false, client),
        }
    }
    (entries, true, client)
}

#[tokio::main]
async fn main() {
    let sockets: usize = std::env::var("SOCKETS")
        .ok()
        .and_then(|n| n.parse().ok())
        .unwrap_or(1_000);
    let (server, base, token, project, _data) = common::bench_server(None).await;
    let started = Instant::now();
    let mut clients = Vec::with_capacity(sockets);
    while clients.len() < sockets {
        let batch = (sockets - clients.len()).min(AT_ONCE);
        let connects = (0..batch).map(|_| Client::connect(&base, &token, project, "main"));
        for connected in futures_util::future::join_all(connects).await {
            clients.push(connected.expect("connect"));
        }
    }
    let connected = started.elapsed();
    let followers: Vec<_> = clients
        .into_iter()
        .map(|client| tokio::spawn(follow(client, sockets)))
        .collect();
    let (mut entries, mut complete, mut dropped) = (0usize, 0usize, 0usize);
    let mut clients = Vec::new();
    for follower in followers {
        let (sent, got_there, client) = follower.await.expect("follower");
        entries += sent;
        if got_there {
            complete += 1;
        }
        if client.is_closed() {
            dropped += 1;
        }
        clients.push(client);
    }
    let everyone_seen = started.elapsed();
    println!("presence: {sockets} sockets on one branch, {AT_ONCE} connecting at a time");
    println!(
        "  all connected after        {:>8.2} s",
        connected.as_secs_f64()
    );
    println!(
        "  all see everyone after     {:>8.2} s",
        everyone_seen.as_secs_f64()
    );
    println!("  sockets that saw everyone  {complete:>8}");
    println!("  sockets dropped            {dropped:>8}");
    println!(
        "  presence entries sent      {entries:>8} ({:.1} per socket per join)",
        entries as f64 / (sockets * sockets) as f64
    );
    for client in clients {
        client.close().await;
    }
    server.shutdown().await.expect("shutdown");
}
