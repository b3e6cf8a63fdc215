//! # branchd
//!
//! branchd keeps **one live git working copy per (project, branch)** for a
//! browser-based editor: clients read, write, compile and commit files in it
//! over a WebSocket, and every client of a branch shares the same copy.
//! `../DESIGN.md` (shared with the team) is the full architecture; this page
//! says where each part lives.
//!
//! - [`allocator`]: this node's supervisor of workspace actors: registry,
//!   reference counts, restarts, garbage collection, drain.
//! - [`client`]: a Rust client of the WebSocket protocol (tests, benches).
//! - [`cluster`]: many nodes over one database: membership (the `nodes`
//!   table, ractor_cluster sessions in a full mesh), routing a session to
//!   the node that owns its workspace, and relaying events back.
//! - [`compile`]: incremental compilation: the import graph, content
//!   hashes and cached compiler state of a workspace, the pluggable
//!   [`compile::Compiler`] and the default Rhai CAD compiler.
//! - [`config`]: every knob, from flags and `BRANCHD_*` environment variables.
//! - [`storage`]: the [`storage::Store`] trait and its SQLite/Postgres
//!   implementation; the only code that speaks SQL.
//! - [`workspace`]: the workspace actor, owner of one live working copy, and
//!   the file, git and snapshot code under it.
//! - [`gateway`]: the HTTP side (axum): authentication, the projects API,
//!   health checks, and the error type that maps to HTTP.
//! - [`protocol`]: wire types shared by every boundary: error codes, ops,
//!   replies and events.
//! - [`server`]: wires the parts together for `branchd serve` and runs them
//!   until a shutdown signal.
//! - [`shutdown`]: the drain and stop signals every long-lived task listens
//!   to, and the tracker the drain waits on.
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
