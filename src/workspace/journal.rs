//! The journal: every change a client is told succeeded, as a record.
//!
//! The workspace actor checks a change, appends its record to the store
//! (under its ownership fence), applies it, and only then replies: a
//! write-ahead log. Activation replays the records after the latest
//! snapshot in order, with the same functions, so a crash, a kill -9 or a
//! lost node loses nothing acknowledged. A commit's record carries its
//! author and time, so replay makes the very same commit id.

use std::path::Path;

use serde::{Deserialize, Serialize};

use super::files::Files;
use super::paths::WorkPath;
use super::repo::{self, GitAuthor};
use crate::protocol::OpError;

/// One recorded change. Only ever add variants: old records must replay.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case")]
pub enum JournalOp {
    Write {
        path: String,
        #[serde(with = "serde_bytes")]
        content: Vec<u8>,
    },
    Delete {
        path: String,
    },
    Rename {
        from: String,
        to: String,
    },
    MakeDir {
        path: String,
    },
    Commit {
        message: String,
        paths: Option<Vec<String>>,
        name: String,
        email: String,
        time_ms: i64,
    },
}

/// The encoding of `JournalOp::Write` from borrowed parts, so that a write's
/// content is not copied just to be recorded.
#[derive(Serialize)]
#[serde(tag = "op", rename = "write")]
struct WriteRecord<'a> {
    path: &'a str,
    #[serde(with = "serde_bytes")]
    content: &'a [u8],
}

/// Encodes a write record without copying the content.
pub fn encode_write(path: &str, content: &[u8]) -> Result<Vec<u8>, OpError> {
    rmp_serde::to_vec_named(&WriteRecord { path, content })
        .map_err(|e| OpError::internal("encoding a journal record", e))
}

impl JournalOp {
    pub fn encode(&self) -> Result<Vec<u8>, OpError> {
        rmp_serde::to_vec_named(self).map_err(|e| OpError::internal("encoding a journal record", e))
    }

    pub fn decode(bytes: &[u8]) -> Result<JournalOp, OpError> {
        rmp_serde::from_slice(bytes).map_err(|e| OpError::internal("reading a journal record", e))
    }

    /// Applies a record that was checked when it was written. Blocking (a
    /// commit runs git).
    pub fn apply(&self, files: &mut Files, dir: &Path) -> Result<(), OpError> {
        let path = |raw: &str| WorkPath::parse(raw, usize::MAX);
        match self {
            JournalOp::Write { path: p, content } => {
                files.apply_write(&path(p)?, content).map(drop)
            }
            JournalOp::Delete { path: p } => files.apply_delete(&path(p)?).map(drop),
            JournalOp::Rename { from, to } => files.apply_rename(&path(from)?, &path(to)?),
            JournalOp::MakeDir { path: p } => files.apply_make_dir(&path(p)?),
            JournalOp::Commit {
                message,
                paths,
                name,
                email,
                time_ms,
            } => {
                let paths = paths
                    .as_ref()
                    .map(|ps| ps.iter().map(|p| path(p)).collect::<Result<Vec<_>, _>>())
                    .transpose()?;
                let author = GitAuthor {
                    name: name.clone(),
                    email: email.clone(),
                };
                repo::commit(dir, message, paths.as_deref(), &author, *time_ms).map(drop)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_round_trip_with_binary_content() {
        let op = JournalOp::Write {
            path: "a/b.bin".into(),
            content: vec![0, 1, 255],
        };
        assert_eq!(
            JournalOp::decode(&op.encode().expect("encode")).expect("decode"),
            op
        );
        assert!(JournalOp::decode(&[0xc1]).is_err());
        let borrowed = encode_write("a/b.bin", &[0, 1, 255]).expect("encode");
        assert_eq!(JournalOp::decode(&borrowed).expect("decode"), op);
    }
}
