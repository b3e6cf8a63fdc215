//! What a successful op answers: [`Reply`], one variant per kind of
//! answer, and the plain data types inside replies and events.

use serde::{Deserialize, Serialize};

use super::SessionId;
use crate::compile::shape::{Aabb, Shape};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum EntryKind {
    File,
    Dir,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TreeEntry {
    pub path: String,
    pub kind: EntryKind,
    /// Bytes for a file, 0 for a directory.
    pub size: u64,
    /// The file's version (its git blob id); absent for a directory.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub version: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FileChange {
    pub path: String,
    /// `modified`, `added`, `deleted`, `renamed`, `typechange` or `untracked`.
    pub status: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CommitInfo {
    pub id: String,
    pub message: String,
    pub author: String,
    pub email: String,
    /// Commit time, ms since the Unix epoch.
    pub time: i64,
}

/// Who holds the edit lock, and until when (ms since the Unix epoch).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LockInfo {
    pub holder: SessionId,
    pub user: String,
    pub expires_at: i64,
}

/// Who did something, as events report it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Doer {
    pub session: SessionId,
    pub user: String,
}

/// A successful op's result. Each variant's fields are the `ok` map of the
/// reply on the wire. (`PartialEq` only: compile output holds floats.)
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Reply {
    Tree {
        entries: Vec<TreeEntry>,
        /// Present (true) when the answer was cut to fit the frame limit.
        #[serde(default, skip_serializing_if = "is_false")]
        truncated: bool,
    },
    File {
        path: String,
        #[serde(with = "serde_bytes")]
        content: Vec<u8>,
        version: String,
    },
    Written {
        path: String,
        version: String,
    },
    /// One path's kind and size, and its version when it is a file.
    Stat {
        path: String,
        kind: EntryKind,
        size: u64,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        version: Option<String>,
    },
    Done {},
    /// The caller holds the edit lock until `expires_at` (ms since the epoch).
    LockTaken {
        holder: SessionId,
        user: String,
        expires_at: i64,
    },
    Saved {
        snapshot_version: i64,
        /// False when nothing had changed since the last save.
        saved: bool,
    },
    Status {
        branch: String,
        head: String,
        changes: Vec<FileChange>,
        /// Present (true) when the answer was cut to fit the frame limit.
        #[serde(default, skip_serializing_if = "is_false")]
        truncated: bool,
    },
    Diff {
        diff: String,
        /// Present (true) when the answer was cut to fit the frame limit.
        #[serde(default, skip_serializing_if = "is_false")]
        truncated: bool,
    },
    Committed {
        commit: String,
    },
    Log {
        commits: Vec<CommitInfo>,
        /// Present (true) when the answer was cut to fit the frame limit.
        #[serde(default, skip_serializing_if = "is_false")]
        truncated: bool,
    },
    Branches {
        branches: Vec<String>,
        /// Present (true) when the answer was cut to fit the frame limit.
        #[serde(default, skip_serializing_if = "is_false")]
        truncated: bool,
    },
    BranchCreated {
        branch: String,
        head: String,
        snapshot_version: i64,
    },
    /// A compile ran. `ok` is false when it produced diagnostics (then
    /// `output` is absent): a failed compile is still a successful op.
    Compiled {
        ok: bool,
        diagnostics: Vec<Diagnostic>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        output: Option<CompileOutput>,
        stats: CompileStats,
    },
}

/// What kind of problem a [`Diagnostic`] reports.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DiagnosticKind {
    /// The file does not parse.
    Syntax,
    /// An import names a file that is missing, outside the project, or not
    /// a source file.
    Import,
    /// Files import each other in a circle.
    Cycle,
    /// The script failed while running (a type error, a missing variable,
    /// a bad argument to a built-in, an entry that returns no shape).
    Runtime,
    /// The compile hit one of the node's limits (operations, call depth,
    /// sizes, modules, shape size, wall time).
    Limit,
}

/// One problem found by a compile, at a place in a file. `line` and
/// `column` count from 1; 0 means the problem is not tied to a place
/// (the file as a whole).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Diagnostic {
    pub file: String,
    pub line: u32,
    pub column: u32,
    pub message: String,
    pub kind: DiagnosticKind,
}

/// The result of a successful compile: the entry point's CSG tree and its
/// axis-aligned bounding box (absent when the shape is certainly empty).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CompileOutput {
    pub tree: Shape,
    #[serde(default)]
    pub bbox: Option<Aabb>,
}

/// How much work a compile did. `files_total` counts the entry and every
/// file it imports, directly or not; each was either compiled again
/// (parsed or evaluated: `files_compiled`) or served from the cache
/// (`files_cached`). `millis` is the time the compile ran, not counting any
/// wait for a free compile slot.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct CompileStats {
    pub files_total: u32,
    pub files_compiled: u32,
    pub files_cached: u32,
    pub millis: u64,
}

fn is_false(value: &bool) -> bool {
    !*value
}

/// What one element of a list answer takes on the wire beyond its strings
/// (its keys, headers, numbers and a 40-character version or id), rounded
/// up: [`Reply::fit`] may keep a little less than would fit, never more.
const TREE_ENTRY: usize = 128;
const COMMIT: usize = 128;
const CHANGE: usize = 64;
const BRANCH: usize = 16;

impl Reply {
    /// The reply cut, if need be, so that it encodes to at most about
    /// `max` bytes: a list answer (`tree`, `status`, `log`, `branches`)
    /// keeps its first elements that fit, a diff its first lines that fit,
    /// and either says `truncated: true`. Other answers are bounded
    /// elsewhere (a file by the read limit, compile output by the shape
    /// limit) and pass unchanged. How to get the rest is in
    /// docs/protocol.md ("Answers larger than a frame").
    pub fn fit(self, max: usize) -> Reply {
        match self {
            Reply::Tree { entries, truncated } => {
                let (entries, cut) = keep_fitting(entries, max, |e| e.path.len() + TREE_ENTRY);
                Reply::Tree {
                    entries,
                    truncated: truncated || cut,
                }
            }
            Reply::Status {
                branch,
                head,
                changes,
                truncated,
            } => {
                let room = max.saturating_sub(branch.len() + head.len());
                let (changes, cut) =
                    keep_fitting(changes, room, |c| c.path.len() + c.status.len() + CHANGE);
                Reply::Status {
                    branch,
                    head,
                    changes,
                    truncated: truncated || cut,
                }
            }
            Reply::Log { commits, truncated } => {
                let (commits, cut) = keep_fitting(commits, max, |c| {
                    c.message.len() + c.author.len() + c.email.len() + COMMIT
                });
                Reply::Log {
                    commits,
                    truncated: truncated || cut,
                }
            }
            Reply::Branches {
                branches,
                truncated,
            } => {
                let (branches, cut) = keep_fitting(branches, max, |b| b.len() + BRANCH);
                Reply::Branches {
                    branches,
                    truncated: truncated || cut,
                }
            }
            Reply::Diff { diff, truncated } => {
                let (diff, cut) = cut_lines(diff, max);
                Reply::Diff {
                    diff,
                    truncated: truncated || cut,
                }
            }
            other => other,
        }
    }
}

/// The first elements of `items` whose sizes add up to at most `max`, and
/// whether any were left out.
fn keep_fitting<T>(mut items: Vec<T>, max: usize, size: impl Fn(&T) -> usize) -> (Vec<T>, bool) {
    let mut total = 0usize;
    let keep = items
        .iter()
        .take_while(|item| {
            total = total.saturating_add(size(item));
            total <= max
        })
        .count();
    let cut = keep < items.len();
    items.truncate(keep);
    (items, cut)
}

/// `text` cut after its last whole line within `max` bytes, and whether
/// it was cut. A first line longer than `max` is cut at a character.
fn cut_lines(mut text: String, max: usize) -> (String, bool) {
    if text.len() <= max {
        return (text, false);
    }
    let mut end = max;
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    if let Some(newline) = text[..end].rfind('\n') {
        end = newline + 1;
    }
    text.truncate(end);
    (text, true)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::codec;

    const MAX: usize = 64 * 1024;
    /// What a frame may carry beyond the answer's own bound (the id, the
    /// `ok` key): the slack the workspace leaves below the frame limit.
    const SLACK: usize = 4096;

    fn frame_len(reply: Reply) -> usize {
        codec::reply_frame(7, Ok(reply)).len()
    }

    #[test]
    fn list_answers_larger_than_a_frame_keep_what_fits_and_say_so() {
        let entries: Vec<TreeEntry> = (0..2000)
            .map(|i| TreeEntry {
                path: format!("{}/{i}", "d".repeat(200)),
                kind: EntryKind::File,
                size: u64::MAX,
                version: Some("f".repeat(40)),
            })
            .collect();
        let fitted = Reply::Tree {
            entries: entries.clone(),
            truncated: false,
        }
        .fit(MAX);
        let Reply::Tree {
            entries: kept,
            truncated,
        } = fitted.clone()
        else {
            panic!("{fitted:?}");
        };
        assert!(truncated);
        assert!(kept.len() > 100 && kept.len() < 2000, "{}", kept.len());
        assert_eq!(kept[..], entries[..kept.len()]);
        assert!(frame_len(fitted) <= MAX + SLACK);

        let commits: Vec<CommitInfo> = (0..100)
            .map(|i| CommitInfo {
                id: "c".repeat(40),
                message: format!("{i} {}", "m".repeat(10_000)),
                author: "a".repeat(300),
                email: "e".repeat(300),
                time: i64::MIN,
            })
            .collect();
        let fitted = Reply::Log {
            commits,
            truncated: false,
        }
        .fit(MAX);
        assert!(matches!(&fitted, Reply::Log { commits, truncated: true } if commits.len() == 6));
        assert!(frame_len(fitted) <= MAX + SLACK);

        let changes: Vec<FileChange> = (0..5000)
            .map(|i| FileChange {
                path: format!("p/{i}"),
                status: "typechange".into(),
            })
            .collect();
        let fitted = Reply::Status {
            branch: "b".repeat(250),
            head: "h".repeat(40),
            changes,
            truncated: false,
        }
        .fit(MAX);
        assert!(matches!(
            &fitted,
            Reply::Status {
                truncated: true,
                ..
            }
        ));
        assert!(frame_len(fitted) <= MAX + SLACK);
    }

    #[test]
    fn a_large_diff_keeps_whole_lines_and_a_small_answer_is_untouched() {
        let diff: String = (0..10_000).map(|i| format!("+line {i} é\n")).collect();
        let fitted = Reply::Diff {
            diff: diff.clone(),
            truncated: false,
        }
        .fit(MAX);
        let Reply::Diff {
            diff: kept,
            truncated,
        } = fitted.clone()
        else {
            panic!("{fitted:?}");
        };
        assert!(truncated && kept.ends_with('\n') && diff.starts_with(&kept));
        assert!(kept.len() <= MAX && kept.len() > MAX - 100);
        assert!(frame_len(fitted) <= MAX + SLACK);

        let one_line = "é".repeat(MAX);
        let (cut, was_cut) = cut_lines(one_line, MAX + 1);
        assert!(was_cut && cut.len() == MAX);

        let small = Reply::Branches {
            branches: vec!["main".into()],
            truncated: false,
        };
        assert_eq!(small.clone().fit(MAX), small);
        let encoded = codec::reply_frame(1, Ok(small));
        let text = String::from_utf8_lossy(&encoded);
        assert!(!text.contains("truncated"), "the flag is absent unless set");
    }
}
