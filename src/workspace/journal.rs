//! The journal: every change a client is told succeeded, as a record.
//!
//! The workspace checks a change, appends its record to the store (under
//! its ownership fence), applies it, and only then replies: a write-ahead
//! log. Activation replays the records after the latest snapshot in order
//! through [`Change::apply`], which calls the very function the live path
//! applied the change with (each op's module owns its record type and its
//! apply function), so replay does what the live path did by
//! construction. A commit's record carries its author and time, so replay
//! makes the very same commit id.
//!
//! The encoding is stored in the database and read back by later
//! versions: only ever add variants, and never change a record's fields.

use std::path::Path;

use serde::{Deserialize, Serialize};

use super::files::Files;
use super::ops::{files as file_ops, git as git_ops};
use crate::protocol::OpError;

pub use file_ops::{DeleteRecord, MakeDirRecord, RenameRecord, WriteRecord};
pub use git_ops::CommitRecord;

/// One recorded change, stored as a MessagePack map tagged by `op`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case")]
pub enum Change {
    Write(file_ops::WriteRecord),
    Delete(file_ops::DeleteRecord),
    Rename(file_ops::RenameRecord),
    MakeDir(file_ops::MakeDirRecord),
    Commit(git_ops::CommitRecord),
}

/// A change's record, as an op's module defines it: its fields, and the
/// tag its [`Change`] variant has.
pub trait Record: Serialize {
    /// The `op` tag of its [`Change`] variant.
    const OP: &'static str;
}

/// Encodes a record as its [`Change`] would be encoded, from a borrow: the
/// live path journals a write without copying its content.
pub fn encode<R: Record>(record: &R) -> Result<Vec<u8>, OpError> {
    let fail = |e: &dyn std::fmt::Display| OpError::internal("encoding a journal record", e);
    let fields = rmp_serde::to_vec_named(record).map_err(|e| fail(&e))?;
    let mut rest: &[u8] = &fields;
    let len = rmp::decode::read_map_len(&mut rest).map_err(|e| fail(&e))?;
    let mut out = Vec::with_capacity(fields.len() + R::OP.len() + 8);
    rmp::encode::write_map_len(&mut out, len + 1).map_err(|e| fail(&e))?;
    rmp::encode::write_str(&mut out, "op").map_err(|e| fail(&e))?;
    rmp::encode::write_str(&mut out, R::OP).map_err(|e| fail(&e))?;
    out.extend_from_slice(rest);
    Ok(out)
}

impl Change {
    pub fn encode(&self) -> Result<Vec<u8>, OpError> {
        match self {
            Change::Write(record) => encode(record),
            Change::Delete(record) => encode(record),
            Change::Rename(record) => encode(record),
            Change::MakeDir(record) => encode(record),
            Change::Commit(record) => encode(record),
        }
    }

    pub fn decode(bytes: &[u8]) -> Result<Change, OpError> {
        rmp_serde::from_slice(bytes).map_err(|e| OpError::internal("reading a journal record", e))
    }

    /// Applies a change that was checked when it was recorded, with its
    /// op's own apply function: the same one the live path used. Blocking
    /// (a commit runs git).
    pub fn apply(&self, files: &mut Files, dir: &Path) -> Result<(), OpError> {
        match self {
            Change::Write(record) => file_ops::apply_write(files, record).map(drop),
            Change::Delete(record) => file_ops::apply_delete(files, record).map(drop),
            Change::Rename(record) => file_ops::apply_rename(files, record),
            Change::MakeDir(record) => file_ops::apply_make_dir(files, record),
            Change::Commit(record) => {
                git_ops::apply_commit(dir, record)?;
                files
                    .measure()
                    .map_err(|e| OpError::internal("measuring the working copy", e))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_round_trip_with_binary_content() {
        let change = Change::Write(file_ops::WriteRecord {
            path: "a/b.bin".into(),
            content: vec![0, 1, 255],
        });
        let bytes = change.encode().expect("encode");
        assert_eq!(Change::decode(&bytes).expect("decode"), change);
        assert!(Change::decode(&[0xc1]).is_err());
    }

    /// Records written by earlier versions (a flat map tagged by `op`,
    /// content as bin) must still replay.
    #[test]
    fn records_keep_their_stored_encoding() {
        #[derive(Serialize)]
        struct Stored<'a> {
            op: &'a str,
            path: &'a str,
            #[serde(with = "serde_bytes")]
            content: &'a [u8],
        }
        let stored = rmp_serde::to_vec_named(&Stored {
            op: "write",
            path: "a.txt",
            content: b"hi",
        })
        .expect("encode");
        let change = Change::Write(file_ops::WriteRecord {
            path: "a.txt".into(),
            content: b"hi".to_vec(),
        });
        assert_eq!(change.encode().expect("encode"), stored);
        assert_eq!(Change::decode(&stored).expect("decode"), change);
        // The serde encoding of the enum is the same map, so either reads
        // what the other wrote.
        assert_eq!(rmp_serde::to_vec_named(&change).expect("serde"), stored);

        let commit = Change::Commit(git_ops::CommitRecord {
            message: "m".into(),
            paths: None,
            name: "Ada".into(),
            email: "ada@example.com".into(),
            time_ms: 7,
        });
        let value: rmpv::Value =
            rmp_serde::from_slice(&commit.encode().expect("encode")).expect("map");
        assert_eq!(value["op"], rmpv::Value::from("commit"));
        assert_eq!(value["time_ms"], rmpv::Value::from(7));
    }
}
