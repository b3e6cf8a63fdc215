//! # branchd
//!
//! branchd keeps **one live git working copy per (project, branch)** for a
//! browser-based editor: clients read, write, compile and commit files in it
//! over a WebSocket, and every client of a branch shares the same copy.
//! `docs/architecture.md` is the full architecture (the words, the life of a
//! request, the invariants and the tests that prove them, the decisions);
//! this page says where each part lives. Arrows point down: gateway →
//! cluster → allocator → workspace → compile, with storage and protocol
//! below them all.
//!
//! - [`gateway`]: everything HTTP and WebSocket (axum): authentication and
//!   login tokens, the JSON API, operator routes, health checks, the `/ws`
//!   upgrade and the socket task, and the error type that maps to HTTP.
//! - [`cluster`]: many nodes over one database: membership (the `nodes`
//!   table, ractor_cluster node links in a full mesh), routing a session to
//!   the node that owns its workspace, and relaying events back.
//! - [`allocator`]: this node's supervisor of workspace actors: registry,
//!   the sessions of each workspace, restarts, garbage collection, drain.
//! - [`workspace`]: the workspace actor, owner of one live working copy: a
//!   thin dispatcher over one module per op family, the journal its changes
//!   are written to before they are applied, and the file, git and snapshot
//!   code under it.
//! - [`compile`]: incremental compilation: the import graph, content
//!   hashes and cached compiler state of a workspace, the pluggable
//!   [`compile::Compiler`] and the default Rhai CAD compiler.
//! - [`storage`]: the [`storage::Store`] trait and its SQLite/Postgres
//!   implementation; the only code that speaks SQL.
//! - [`protocol`]: wire types shared by every boundary: ops with their
//!   metadata, replies, events, error codes and frames.
//! - [`config`]: every knob, from flags and `BRANCHD_*` environment variables.
//! - [`server`]: wires the parts together for `branchd serve` and runs them
//!   until a shutdown signal, then drains.
//! - [`shutdown`]: the drain and stop signals every long-lived task listens
//!   to, and the tracker the drain waits on.
//! - [`client`]: a Rust client of the WebSocket protocol (tests, benches).
//!
//! The binary (`src/main.rs`) is a thin CLI over this library; the
//! integration tests in `tests/` drive the same library through a real server
//! on a real socket.

pub mod allocator;
pub mod client;
pub mod cluster;
pub mod compile;
pub mod config;
pub mod gateway;
pub mod protocol;
pub mod server;
pub mod shutdown;
pub mod storage;
pub mod workspace;

/// The system allocator, counting what each compile holds (see
/// [`compile::meter`]).
#[global_allocator]
static ALLOCATOR: compile::meter::Metered = compile::meter::Metered;
