//! Postgres: the shared store of a cluster, and the arbiter of which node
//! owns which workspace.
//!
//! Holds only what is Postgres's own: its dialect and its migrations. Row
//! locks (`FOR SHARE` on a claim while a fenced write commits) are what make
//! ownership safe between nodes; see `sql/claims.rs` and `sql/journal.rs`
//! for where they are taken.

use sqlx::migrate::Migrator;

use super::dialect::Dialect;

pub(crate) static MIGRATOR: Migrator = sqlx::migrate!("migrations/postgres");

pub(crate) const DIALECT: Dialect = Dialect {
    now: "(EXTRACT(EPOCH FROM clock_timestamp()) * 1000)::BIGINT",
    share_lock: " FOR SHARE",
    begin_write: "BEGIN",
};
