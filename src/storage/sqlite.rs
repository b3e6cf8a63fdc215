//! SQLite: the embedded, single-node default (`branchd serve` with no
//! database URL keeps everything in one file under the data dir).
//!
//! Holds only what is SQLite's own: its dialect, its migrations and the
//! per-connection settings. It must not be used by more than one node: SQLite
//! has no way for nodes on different machines to share it safely.

use std::path::Path;

use sqlx::AnyConnection;
use sqlx::migrate::Migrator;

use super::dialect::Dialect;

pub(crate) static MIGRATOR: Migrator = sqlx::migrate!("migrations/sqlite");

pub(crate) const DIALECT: Dialect = Dialect {
    now: "CAST((julianday('now') - 2440587.5) * 86400000.0 AS INTEGER)",
    share_lock: "",
    update_lock: "",
    begin_write: "BEGIN IMMEDIATE",
};

/// Set on every new connection. WAL lets readers run beside the writer;
/// `synchronous=FULL` makes a commit durable before it returns, which the
/// journal's promise ("nothing acknowledged is lost") depends on.
const CONNECTION_PRAGMAS: &str = "PRAGMA journal_mode = WAL; \
     PRAGMA synchronous = FULL; \
     PRAGMA foreign_keys = ON; \
     PRAGMA busy_timeout = 10000;";

pub(crate) async fn configure(conn: &mut AnyConnection) -> Result<(), sqlx::Error> {
    sqlx::raw_sql(CONNECTION_PRAGMAS).execute(conn).await?;
    Ok(())
}

/// The URL of the default database file in a data dir, created if missing.
pub fn default_url(data_dir: &Path) -> String {
    format!(
        "sqlite://{}?mode=rwc",
        data_dir.join("branchd.db").display()
    )
}
