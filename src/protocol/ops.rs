//! Ops: what a client can ask of a workspace, and what each op needs.
//!
//! An op's metadata lives on its variant, as attributes, and is read
//! through [`OpKind`] (derived): its wire name, the role it needs, whether
//! it changes the working copy (journalled, refused while another session
//! holds the edit lock), and the name of the [`Reply`](super::Reply)
//! variant that answers it. Adding an op means adding a variant here, with
//! its attributes, and its module under `workspace/ops/`.

use serde::{Deserialize, Serialize};
use strum::EnumProperty;

/// Identifies one connected client (one WebSocket) for as long as it is connected.
pub type SessionId = String;

/// A workspace operation, as a client names it: `{op: "write_file", ...}`.
/// The same type travels from the WebSocket gateway to the workspace actor.
///
/// Each variant's `props` say what it needs: `role` (the least role that
/// may run it), `mutates` (it changes the working copy: journalled before
/// it is applied, refused while another session holds the edit lock) and
/// `reply` (the [`Reply`](super::Reply) variant that answers it, by wire
/// name) and `large_reply` (its answer can be as large as a frame: file
/// contents, trees, diffs, logs, compile output; the connection bounds the
/// bytes such replies may hold in memory). A variant without a `role` needs the owner: missing metadata
/// fails closed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, strum::EnumDiscriminants)]
#[serde(tag = "op", rename_all = "snake_case")]
#[strum_discriminants(
    name(OpKind),
    derive(
        Hash,
        strum::IntoStaticStr,
        strum::EnumString,
        strum::EnumIter,
        strum::EnumProperty
    ),
    strum(serialize_all = "snake_case")
)]
pub enum Op {
    /// Every file and directory below `path` (default: the root), `.git` excluded.
    #[strum_discriminants(strum(props(
        role = "viewer",
        mutates = false,
        reply = "tree",
        large_reply = true
    )))]
    ListTree {
        #[serde(default)]
        path: Option<String>,
    },
    #[strum_discriminants(strum(props(
        role = "viewer",
        mutates = false,
        reply = "file",
        large_reply = true
    )))]
    ReadFile { path: String },
    /// The kind, size and version of one path, without its content.
    #[strum_discriminants(strum(props(
        role = "viewer",
        mutates = false,
        reply = "stat",
        large_reply = false
    )))]
    Stat { path: String },
    /// Creates or replaces a file. `base_version`: the version the content
    /// was based on; absent means "create, the file must not exist".
    /// `force` skips the check.
    #[strum_discriminants(strum(props(
        role = "editor",
        mutates = true,
        reply = "written",
        large_reply = false
    )))]
    WriteFile {
        path: String,
        #[serde(with = "serde_bytes")]
        content: Vec<u8>,
        #[serde(default)]
        base_version: Option<String>,
        #[serde(default)]
        force: bool,
    },
    /// Deletes a file (checked against `base_version` when given) or a
    /// directory with everything in it.
    #[strum_discriminants(strum(props(
        role = "editor",
        mutates = true,
        reply = "done",
        large_reply = false
    )))]
    DeletePath {
        path: String,
        #[serde(default)]
        base_version: Option<String>,
    },
    #[strum_discriminants(strum(props(
        role = "editor",
        mutates = true,
        reply = "done",
        large_reply = false
    )))]
    RenamePath { from: String, to: String },
    #[strum_discriminants(strum(props(
        role = "editor",
        mutates = true,
        reply = "done",
        large_reply = false
    )))]
    MakeDir { path: String },
    /// Takes or renews the exclusive edit lock for `ttl_ms` (default 30 s).
    #[strum_discriminants(strum(props(
        role = "editor",
        mutates = false,
        reply = "lock_taken",
        large_reply = false
    )))]
    Lock {
        #[serde(default)]
        ttl_ms: Option<u64>,
    },
    #[strum_discriminants(strum(props(
        role = "editor",
        mutates = false,
        reply = "done",
        large_reply = false
    )))]
    Unlock,
    /// Stores the working copy as a new snapshot version, if it changed.
    #[strum_discriminants(strum(props(
        role = "editor",
        mutates = false,
        reply = "saved",
        large_reply = false
    )))]
    Save,
    #[strum_discriminants(strum(props(
        role = "viewer",
        mutates = false,
        reply = "compiled",
        large_reply = true
    )))]
    Compile { entry: String },
    #[strum_discriminants(strum(props(
        role = "viewer",
        mutates = false,
        reply = "status",
        large_reply = true
    )))]
    GitStatus,
    #[strum_discriminants(strum(props(
        role = "viewer",
        mutates = false,
        reply = "diff",
        large_reply = true
    )))]
    GitDiff {
        #[serde(default)]
        path: Option<String>,
    },
    /// Commits every change, or only `paths`.
    #[strum_discriminants(strum(props(
        role = "editor",
        mutates = true,
        reply = "committed",
        large_reply = false
    )))]
    GitCommit {
        message: String,
        #[serde(default)]
        paths: Option<Vec<String>>,
    },
    #[strum_discriminants(strum(props(
        role = "viewer",
        mutates = false,
        reply = "log",
        large_reply = true
    )))]
    GitLog {
        /// Any unsigned integer; the workspace keeps it between 1 and 1000.
        #[serde(default)]
        limit: Option<u64>,
    },
    #[strum_discriminants(strum(props(
        role = "viewer",
        mutates = false,
        reply = "branches",
        large_reply = true
    )))]
    GitBranches,
    /// Creates branch `name` from this branch's HEAD as a new workspace.
    #[strum_discriminants(strum(props(
        role = "editor",
        mutates = false,
        reply = "branch_created",
        large_reply = false
    )))]
    GitCreateBranch { name: String },
}

impl Op {
    /// What kind of op this is; its metadata hangs off the kind.
    pub fn kind(&self) -> OpKind {
        OpKind::from(self)
    }

    /// The op's name on the wire.
    pub fn name(&self) -> &'static str {
        self.kind().name()
    }
}

impl OpKind {
    /// The op's name on the wire (`write_file`).
    pub fn name(self) -> &'static str {
        self.into()
    }

    /// The kind named `name` on the wire, if there is one.
    pub fn parse(name: &str) -> Option<OpKind> {
        name.parse().ok()
    }

    /// The least role that may run this op (the owner, if its metadata
    /// names none: a forgotten attribute fails closed).
    pub fn required_role(self) -> Role {
        self.get_str("role")
            .and_then(Role::parse)
            .unwrap_or(Role::Owner)
    }

    /// Whether the op changes the working copy: it is journalled before it
    /// is applied, and refused while another session holds the edit lock.
    pub fn mutates(self) -> bool {
        self.get_bool("mutates").unwrap_or(false)
    }

    /// The wire name of the [`Reply`](super::Reply) variant that answers
    /// this op.
    pub fn reply_variant(self) -> &'static str {
        self.get_str("reply").unwrap_or("done")
    }

    /// Whether the answer can be as large as a frame (a file's content, a
    /// tree, a diff, a log, compile output) rather than a few fields. A
    /// kind that does not say counts as large: the connection's reply
    /// budget then errs on the safe side.
    pub fn large_reply(self) -> bool {
        self.get_bool("large_reply").unwrap_or(true)
    }

    /// Whether `role` may run this op: `Err` says what is missing.
    pub fn authorize(self, role: Role) -> Result<(), String> {
        let needed = self.required_role();
        if role >= needed {
            return Ok(());
        }
        Err(format!(
            "{} needs the {} role; you are {}",
            self.name(),
            needed.as_str(),
            role.as_str()
        ))
    }
}

/// A project member's role. Ordered: each role can do what the ones before it can.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    Viewer,
    Editor,
    Owner,
}

impl Role {
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Viewer => "viewer",
            Role::Editor => "editor",
            Role::Owner => "owner",
        }
    }

    pub fn parse(s: &str) -> Option<Role> {
        match s {
            "viewer" => Some(Role::Viewer),
            "editor" => Some(Role::Editor),
            "owner" => Some(Role::Owner),
            _ => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use strum::IntoEnumIterator;

    use super::*;

    #[test]
    fn every_op_kind_has_its_metadata() {
        for kind in OpKind::iter() {
            assert!(
                kind.get_str("role").and_then(Role::parse).is_some(),
                "{kind:?} names no valid role"
            );
            assert!(
                kind.get_bool("mutates").is_some(),
                "{kind:?} says nothing of mutates"
            );
            assert!(kind.get_str("reply").is_some(), "{kind:?} names no reply");
            assert!(
                kind.get_bool("large_reply").is_some(),
                "{kind:?} says nothing of large_reply"
            );
            assert_eq!(OpKind::parse(kind.name()), Some(kind));
        }
    }

    #[test]
    fn roles_and_mutation_follow_the_metadata() {
        let write = Op::WriteFile {
            path: "a".into(),
            content: vec![],
            base_version: None,
            force: false,
        };
        assert_eq!(write.name(), "write_file");
        assert!(write.kind().mutates());
        assert!(write.kind().authorize(Role::Viewer).is_err());
        assert!(write.kind().authorize(Role::Editor).is_ok());
        let read = Op::ReadFile { path: "a".into() };
        assert!(!read.kind().mutates());
        assert!(read.kind().authorize(Role::Viewer).is_ok());
        assert!(!OpKind::Lock.mutates());
        assert_eq!(OpKind::Lock.required_role(), Role::Editor);
        assert_eq!(
            OpKind::GitCommit.authorize(Role::Viewer),
            Err("git_commit needs the editor role; you are viewer".to_string())
        );
    }
}
