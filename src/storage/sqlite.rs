//! SQLite: the embedded, single-node default (`branchd serve` with no
//! database URL keeps everything in one file under the data dir).
//!
//! Holds only what is SQLite's own: its dialect, its migrations and the
//! set-up of each new connection (settings, and refusing a connection that
//! came up read-only). It must not be used by more than one node: SQLite
//! has no way for nodes on different machines to share it safely.

use std::path::Path;

use sqlx::AnyConnection;
use sqlx::migrate::Migrator;

use super::dialect::Dialect;

pub(crate) static MIGRATOR: Migrator = sqlx::migrate!("migrations/sqlite");

pub(crate) const DIALECT: Dialect = Dialect {
    now: "CAST((julianday('now') - 2440587.5) * 86400000.0 AS INTEGER)",
    share_lock: "",
    begin_write: "BEGIN IMMEDIATE",
};

/// Set on every new connection. WAL lets readers run beside the writer;
/// `synchronous=FULL` makes a commit durable before it returns, which the
/// journal's promise ("nothing acknowledged is lost") depends on.
const CONNECTION_PRAGMAS: &str = "PRAGMA journal_mode = WAL; \
     PRAGMA synchronous = FULL; \
     PRAGMA foreign_keys = ON;";

/// How long a statement waits for another connection's write lock.
const BUSY_TIMEOUT: &str = "PRAGMA busy_timeout = 10000;";

/// SQLite's primary result codes the writability probe tells apart.
const SQLITE_BUSY: i32 = 5;
const SQLITE_LOCKED: i32 = 6;
const SQLITE_READONLY: i32 = 8;

/// Sets up a new connection. Unless the URL asks for a read-only database
/// (`writable` false), it also refuses a connection that cannot write.
///
/// Why: when SQLite cannot open the database or its WAL read-write (any
/// error but "is a directory", so `EMFILE` too, when the process is out of
/// file descriptors), it opens the file read-only instead and keeps it so
/// for the connection's life. The pool would keep such a connection, and
/// every write that drew it would fail with `attempt to write a readonly
/// database` until the node restarts. Refused here, the pool closes it and
/// opens another (sqlx retries a failed set-up until the acquire timeout),
/// so the node heals once descriptors are free again.
pub(crate) async fn configure(conn: &mut AnyConnection, writable: bool) -> Result<(), sqlx::Error> {
    sqlx::raw_sql(CONNECTION_PRAGMAS)
        .execute(&mut *conn)
        .await?;
    if writable {
        probe_writable(conn).await?;
    }
    sqlx::raw_sql(BUSY_TIMEOUT).execute(conn).await?;
    Ok(())
}

/// Writes in a transaction it rolls back, without waiting for the write
/// lock: a read-only connection fails with `SQLITE_READONLY` (whether the
/// database or its WAL was opened read-only), a writable one either
/// writes or is told another connection holds the lock (`SQLITE_BUSY`,
/// which proves it may write too). Nothing reaches the disk.
async fn probe_writable(conn: &mut AnyConnection) -> Result<(), sqlx::Error> {
    sqlx::raw_sql("PRAGMA busy_timeout = 0;")
        .execute(&mut *conn)
        .await?;
    sqlx::raw_sql("BEGIN").execute(&mut *conn).await?;
    // A table that is never committed; creating it needs the write lock
    // (`BEGIN IMMEDIATE` alone would not do: on a read-only database file
    // SQLite quietly starts a read transaction instead).
    let write = sqlx::raw_sql("CREATE TABLE main.branchd_write_probe (x)")
        .execute(&mut *conn)
        .await;
    sqlx::raw_sql("ROLLBACK").execute(&mut *conn).await?;
    match write {
        Ok(_) => Ok(()),
        Err(err) if matches!(primary_code(&err), Some(SQLITE_BUSY | SQLITE_LOCKED)) => Ok(()),
        Err(err) if primary_code(&err) == Some(SQLITE_READONLY) => {
            Err(sqlx::Error::Protocol(format!(
                "this SQLite connection was opened read-only ({err}): the process may be out of \
                 file descriptors; closing it and opening another"
            )))
        }
        // Anything else (cannot open, I/O error): not a connection to keep.
        Err(err) => Err(err),
    }
}

/// The primary SQLite result code of a database error (its extended code
/// carries the primary one in its low byte).
fn primary_code(err: &sqlx::Error) -> Option<i32> {
    let code = err.as_database_error()?.code()?;
    code.parse::<i32>().ok().map(|c| c & 0xff)
}

/// Whether a SQLite URL opens the database read-only (`mode=ro`), which
/// the operator chose: its connections are then expected not to write.
pub(crate) fn read_only_url(url: &str) -> bool {
    url.split_once('?')
        .is_some_and(|(_, query)| query.split('&').any(|pair| pair == "mode=ro"))
}

/// The URL of the default database file in a data dir.
pub fn default_url(data_dir: &Path) -> String {
    format!("sqlite://{}", data_dir.join("branchd.db").display())
}

/// Prepares a SQLite URL for opening: the file's directory is created and,
/// unless the URL chooses a `mode`, the file is created if missing (sqlx
/// would otherwise refuse a file that does not exist yet).
pub(crate) fn prepare_url(url: &str) -> std::io::Result<String> {
    let rest = url.trim_start_matches("sqlite:").trim_start_matches("//");
    let (path, query) = rest.split_once('?').unwrap_or((rest, ""));
    if path.is_empty() || path == ":memory:" {
        return Ok(url.to_string());
    }
    if let Some(parent) = Path::new(path).parent()
        && !parent.as_os_str().is_empty()
    {
        std::fs::create_dir_all(parent)?;
    }
    if query.split('&').any(|pair| pair.starts_with("mode=")) {
        return Ok(url.to_string());
    }
    let separator = if query.is_empty() { '?' } else { '&' };
    Ok(format!("{url}{separator}mode=rwc"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prepare_url_creates_the_directory_and_asks_for_creation() {
        let dir = tempfile::tempdir().expect("dir");
        let url = default_url(&dir.path().join("nested/deeper"));
        let prepared = prepare_url(&url).expect("prepare");
        assert_eq!(prepared, format!("{url}?mode=rwc"));
        assert!(dir.path().join("nested/deeper").is_dir());
        assert_eq!(
            prepare_url("sqlite://x.db?mode=ro").expect("prepare"),
            "sqlite://x.db?mode=ro"
        );
        assert_eq!(
            prepare_url("sqlite::memory:").expect("prepare"),
            "sqlite::memory:"
        );
    }

    #[test]
    fn only_mode_ro_makes_a_url_read_only() {
        assert!(read_only_url("sqlite://x.db?mode=ro"));
        assert!(read_only_url("sqlite://x.db?cache=shared&mode=ro"));
        assert!(!read_only_url("sqlite://x.db?mode=rwc"));
        assert!(!read_only_url("sqlite://ro.db"));
    }
}
