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
}
