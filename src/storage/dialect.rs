//! The few places where the SQL of SQLite and Postgres differ.
//!
//! Shared statements in `sql/` are written once with `{now}` and
//! `{share_lock}` placeholders; a [`Dialect`] fills them in. Nothing else of
//! the SQL text may vary by backend.

use std::borrow::Cow;

use sqlx::AssertSqlSafe;

/// The backend-specific fragments of the shared SQL.
#[derive(Debug)]
pub(crate) struct Dialect {
    /// An expression for the database clock in ms since the Unix epoch.
    pub now: &'static str,
    /// Appended to a `SELECT` of a claim row that a write depends on, so a
    /// concurrent takeover waits for the write's transaction to end.
    pub share_lock: &'static str,
    /// The statement that opens a transaction which will write. SQLite must
    /// take its write lock up front: a deferred transaction that reads first
    /// fails with `SQLITE_BUSY` when another writer commits in between.
    pub begin_write: &'static str,
}

impl Dialect {
    /// The SQL text for a shared statement, placeholders filled in. Only
    /// ever called with the crate's own `'static` statements.
    pub fn sql(&self, template: &'static str) -> AssertSqlSafe<Cow<'static, str>> {
        if !template.contains('{') {
            return AssertSqlSafe(Cow::Borrowed(template));
        }
        AssertSqlSafe(Cow::Owned(
            template
                .replace("{now}", self.now)
                .replace("{share_lock}", self.share_lock),
        ))
    }

    /// Like [`Dialect::sql`], for a statement whose length depends on how
    /// many rows it covers (a batch). The text is assembled by the crate
    /// from its own fragments and `$N` parameters, never from values.
    pub fn sql_built(&self, text: String) -> AssertSqlSafe<Cow<'static, str>> {
        AssertSqlSafe(Cow::Owned(
            text.replace("{now}", self.now)
                .replace("{share_lock}", self.share_lock),
        ))
    }
}
