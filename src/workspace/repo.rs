//! Git on a working copy: creating a project's first repository, and the
//! status, diff, commit, log and branch operations clients ask for.
//!
//! Every function opens the repository itself (a `Repository` is not
//! `Sync`) and is blocking: callers run it on the blocking pool.

use std::path::Path;
use std::sync::{Mutex, OnceLock};

use git2::build::CheckoutBuilder;
use git2::{
    DiffFormat, DiffOptions, IndexAddOption, Repository, RepositoryInitOptions, Signature, Status,
    StatusOptions, Time,
};

use super::paths::WorkPath;
use crate::protocol::{CommitInfo, FileChange, OpError};

/// Who a commit is by.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GitAuthor {
    pub name: String,
    pub email: String,
}

/// Initialises a repository in `dir` on `branch`, with a `README.md` holding
/// `readme` and one commit of it by `author`. Returns the commit id.
pub fn init_repository(
    dir: &Path,
    branch: &str,
    readme: &str,
    author: &GitAuthor,
) -> Result<String, git2::Error> {
    let mut options = RepositoryInitOptions::new();
    options.initial_head(branch).no_reinit(true);
    let repo = Repository::init_opts(dir, &options)?;
    std::fs::write(dir.join("README.md"), readme)
        .map_err(|e| git2::Error::from_str(&format!("writing README.md: {e}")))?;
    let mut index = repo.index()?;
    index.add_path(Path::new("README.md"))?;
    index.write()?;
    let tree = repo.find_tree(index.write_tree()?)?;
    let signature = Signature::now(&author.name, &author.email)?;
    let commit = repo.commit(
        Some("HEAD"),
        &signature,
        &signature,
        "Initial commit",
        &tree,
        &[],
    )?;
    Ok(commit.to_string())
}

/// A scratch repository of this process that answers whether git takes a
/// path: one empty blob, and an index that is cleared after each check.
struct Scratch {
    repo: Repository,
    blob: git2::Oid,
    _dir: tempfile::TempDir,
}

impl Scratch {
    fn new() -> Result<Scratch, git2::Error> {
        let dir = tempfile::tempdir()
            .map_err(|e| git2::Error::from_str(&format!("a scratch directory: {e}")))?;
        let repo = Repository::init_bare(dir.path())?;
        let blob = repo.blob(b"")?;
        Ok(Scratch {
            repo,
            blob,
            _dir: dir,
        })
    }
}

/// `bad_request` unless git takes `path` as the path of a tracked file.
/// libgit2's index refuses names that some file systems would take for
/// `.git` (`.git `, `.git.`, `git~1`, `.git::$INDEX_ALLOCATION`, ...); a file
/// under such a name would make every later commit of the branch fail. The
/// check is git's own (not a second list), against a scratch repository of
/// this process: a few microseconds, under a lock, without touching the
/// working copy.
pub fn check_trackable(path: &WorkPath) -> Result<(), OpError> {
    static SCRATCH: OnceLock<Result<Mutex<Scratch>, String>> = OnceLock::new();
    let scratch = SCRATCH
        .get_or_init(|| Scratch::new().map(Mutex::new).map_err(|e| e.to_string()))
        .as_ref()
        .map_err(|err| OpError::internal("preparing the git path check", err))?;
    let scratch = scratch
        .lock()
        .map_err(|_| OpError::internal("the git path check", "its lock was poisoned"))?;
    let entry = git2::IndexEntry {
        ctime: git2::IndexTime::new(0, 0),
        mtime: git2::IndexTime::new(0, 0),
        dev: 0,
        ino: 0,
        mode: 0o100644,
        uid: 0,
        gid: 0,
        file_size: 0,
        id: scratch.blob,
        flags: 0,
        flags_extended: 0,
        path: path.as_str().as_bytes().to_vec(),
    };
    let mut index = scratch
        .repo
        .index()
        .map_err(|err| git_error("the git path check", err))?;
    let added = index.add(&entry);
    let cleared = index.clear();
    match (added, cleared) {
        (Ok(()), Ok(())) => Ok(()),
        (Err(err), _) if err.class() == git2::ErrorClass::Index => {
            Err(OpError::bad_request(format!(
                "git cannot track {path:?} (a name that some file systems take for .git, such as \".git \" or \"git~1\"): choose another name"
            )))
        }
        (Err(err), _) | (_, Err(err)) => Err(git_error("the git path check", err)),
    }
}

fn git_error(context: &str, err: git2::Error) -> OpError {
    OpError::internal(context, err)
}

fn open(dir: &Path) -> Result<Repository, OpError> {
    Repository::open(dir).map_err(|e| git_error("opening the repository", e))
}

/// The checked-out branch's name and HEAD commit id.
pub fn head(dir: &Path) -> Result<(String, String), OpError> {
    let repo = open(dir)?;
    let head = repo.head().map_err(|e| git_error("reading HEAD", e))?;
    let branch = head.shorthand().ok().unwrap_or("HEAD").to_string();
    let id = head
        .peel_to_commit()
        .map_err(|e| git_error("reading HEAD", e))?
        .id()
        .to_string();
    Ok((branch, id))
}

/// What differs between the work tree and HEAD, path by path (what
/// `git status` shows; clients never stage, so the index follows HEAD).
pub fn status(dir: &Path) -> Result<Vec<FileChange>, OpError> {
    let repo = open(dir)?;
    let mut options = StatusOptions::new();
    options
        .include_untracked(true)
        .recurse_untracked_dirs(true)
        .include_ignored(false);
    let statuses = repo
        .statuses(Some(&mut options))
        .map_err(|e| git_error("reading the status", e))?;
    let mut changes: Vec<FileChange> = statuses
        .iter()
        .filter_map(|entry| {
            let path = entry.path().ok()?.to_string();
            let flags = entry.status();
            let status = if flags.intersects(Status::INDEX_NEW) {
                "added"
            } else if flags.intersects(Status::WT_NEW) {
                "untracked"
            } else if flags.intersects(Status::WT_DELETED | Status::INDEX_DELETED) {
                "deleted"
            } else if flags.intersects(Status::WT_RENAMED | Status::INDEX_RENAMED) {
                "renamed"
            } else if flags.intersects(Status::WT_TYPECHANGE | Status::INDEX_TYPECHANGE) {
                "typechange"
            } else if flags.intersects(Status::WT_MODIFIED | Status::INDEX_MODIFIED) {
                "modified"
            } else {
                return None;
            };
            Some(FileChange {
                path,
                status: status.to_string(),
            })
        })
        .collect();
    changes.sort_by(|a, b| a.path.cmp(&b.path));
    Ok(changes)
}

/// The unified diff of the work tree against HEAD, new files included, for
/// the whole tree or below one path.
pub fn diff(dir: &Path, path: Option<&WorkPath>) -> Result<String, OpError> {
    let repo = open(dir)?;
    let tree = repo
        .head()
        .and_then(|h| h.peel_to_tree())
        .map_err(|e| git_error("reading HEAD", e))?;
    let mut options = DiffOptions::new();
    options
        .include_untracked(true)
        .recurse_untracked_dirs(true)
        .show_untracked_content(true);
    if let Some(path) = path.filter(|p| !p.is_root()) {
        options
            .pathspec(path.as_str())
            .disable_pathspec_match(false);
    }
    let diff = repo
        .diff_tree_to_workdir_with_index(Some(&tree), Some(&mut options))
        .map_err(|e| git_error("computing the diff", e))?;
    let mut text = Vec::new();
    diff.print(DiffFormat::Patch, |_delta, _hunk, line| {
        if matches!(line.origin(), '+' | '-' | ' ') {
            text.push(line.origin() as u8);
        }
        text.extend_from_slice(line.content());
        true
    })
    .map_err(|e| git_error("printing the diff", e))?;
    Ok(String::from_utf8_lossy(&text).into_owned())
}

/// Whether git may stage what is at `path`: anything but a symbolic link or
/// a special file (a FIFO, a socket, a device) someone put on the server's
/// disk, which a commit never records (a snapshot could not hold it). A
/// path that is gone may be staged: that is a deletion. Used as the
/// callback of `add_all`/`update_all` (0 stages, 1 skips).
fn stageable(dir: &Path, path: &Path) -> i32 {
    match std::fs::symlink_metadata(dir.join(path)) {
        Ok(meta) if !meta.is_file() && !meta.is_dir() => {
            tracing::warn!(path = %path.display(), "not committed: a symbolic link or special file");
            1
        }
        _ => 0,
    }
}

/// Stages one named path exactly (never as a pattern): a file, a directory
/// and everything below it, or a path gone from the work tree (a deletion).
/// A path that is neither in the work tree nor in HEAD is `NotFound`.
fn stage_path(index: &mut git2::Index, dir: &Path, path: &WorkPath) -> Result<(), git2::Error> {
    let name = path.as_str();
    let below = format!("{name}/");
    let on_disk = dir.join(name);
    let meta = std::fs::symlink_metadata(&on_disk).ok();
    if meta.as_ref().is_some_and(|m| m.is_file()) {
        return index.add_path(Path::new(name));
    }
    let tracked = index
        .iter()
        .any(|entry| entry.path == name.as_bytes() || entry.path.starts_with(below.as_bytes()));
    if meta.as_ref().is_some_and(|m| m.is_dir()) {
        let mut only_below = |found: &Path, _spec: &[u8]| -> i32 {
            if !found.to_str().is_some_and(|f| f.starts_with(&below)) {
                return 1;
            }
            stageable(dir, found)
        };
        index.add_all(["*"], IndexAddOption::DEFAULT, Some(&mut only_below))?;
        return index.update_all(["*"], Some(&mut only_below));
    }
    if meta.is_some() {
        return Err(git2::Error::new(
            git2::ErrorCode::NotFound,
            git2::ErrorClass::Index,
            format!("{name:?} is a symbolic link or special file, which is never committed"),
        ));
    }
    if !tracked {
        return Err(git2::Error::new(
            git2::ErrorCode::NotFound,
            git2::ErrorClass::Index,
            format!("{name:?} is neither in the work tree nor in HEAD"),
        ));
    }
    // Gone from the work tree: drop it (file or directory) from the commit.
    let _ = index.remove_path(Path::new(name));
    index.remove_dir(Path::new(name), 0)
}

/// A commit staged but not made: the tree it would record, checked to differ from HEAD.
struct Staged {
    repo: Repository,
    head_id: git2::Oid,
    index: git2::Index,
    tree_id: git2::Oid,
    message: String,
    signature: Signature<'static>,
}

fn stage(
    dir: &Path,
    message: &str,
    paths: Option<&[WorkPath]>,
    author: &GitAuthor,
    time_ms: i64,
) -> Result<Staged, OpError> {
    let message = git2::message_prettify(message, None)
        .map_err(|e| OpError::bad_request(format!("commit message is not usable: {e}")))?;
    if message.trim().is_empty() {
        return Err(OpError::bad_request("commit message is empty"));
    }
    let when = Time::new(time_ms.div_euclid(1000), 0);
    let signature = Signature::new(&author.name, &author.email, &when)
        .map_err(|e| OpError::bad_request(format!("the author is not usable in git: {e}")))?;
    let repo = open(dir)?;
    let head = repo
        .head()
        .and_then(|h| h.peel_to_commit())
        .map_err(|e| git_error("reading HEAD", e))?;
    let (head_id, head_tree) = (head.id(), head.tree_id());
    drop(head);
    let mut index = repo
        .index()
        .map_err(|e| git_error("reading the index", e))?;
    let staged = match paths {
        None => {
            let mut plain = |found: &Path, _spec: &[u8]| stageable(dir, found);
            index
                .add_all(["*"], IndexAddOption::DEFAULT, Some(&mut plain))
                .and_then(|()| index.update_all(["*"], Some(&mut plain)))
        }
        Some([]) => {
            return Err(OpError::bad_request(
                "paths is empty: omit it to commit everything",
            ));
        }
        Some(paths) => paths
            .iter()
            .try_for_each(|path| stage_path(&mut index, dir, path)),
    };
    staged.map_err(|e| match e.code() {
        git2::ErrorCode::NotFound => OpError::not_found(format!(
            "nothing to commit at a named path: {}",
            e.message()
        )),
        _ => git_error("staging the changes", e),
    })?;
    let tree_id = index
        .write_tree()
        .map_err(|e| git_error("writing the tree", e))?;
    if tree_id == head_tree {
        return Err(OpError::conflict(
            "nothing to commit: the named files match HEAD",
            None,
        ));
    }
    Ok(Staged {
        repo,
        head_id,
        index,
        tree_id,
        message,
        signature,
    })
}

/// The most a commit of every change (or of those at `paths`) can add to
/// the repository: the content of each new or changed file (git stores
/// it compressed, so no more) and room for its tree entries, plus the
/// commit itself.
pub fn commit_growth(dir: &Path, paths: Option<&[WorkPath]>) -> Result<u64, OpError> {
    const PER_CHANGE: u64 = 512;
    let named = |path: &str| {
        paths.is_none_or(|paths| {
            paths
                .iter()
                .any(|p| p.is_root() || p.as_str() == path || path.starts_with(&format!("{p}/")))
        })
    };
    let growth = status(dir)?
        .iter()
        .filter(|change| change.status != "deleted" && named(&change.path))
        .map(|change| {
            let size = super::files::file_size(&dir.join(&change.path));
            size + size / 100 + PER_CHANGE
        })
        .sum::<u64>();
    Ok(growth + 4096)
}

/// Checks that [`commit`] with these arguments would succeed, without
/// committing (the index on disk is untouched).
pub fn check_commit(
    dir: &Path,
    message: &str,
    paths: Option<&[WorkPath]>,
    author: &GitAuthor,
    time_ms: i64,
) -> Result<(), OpError> {
    stage(dir, message, paths, author, time_ms).map(|_| ())
}

/// Commits every change in the work tree, or only those at `paths`, as
/// `author` at `time_ms`. Refuses (`conflict`) when nothing would change.
/// Returns the commit id and the message as stored (cleaned up as git does).
/// The same arguments on the same tree give the same commit id.
pub fn commit(
    dir: &Path,
    message: &str,
    paths: Option<&[WorkPath]>,
    author: &GitAuthor,
    time_ms: i64,
) -> Result<(String, String), OpError> {
    let Staged {
        repo,
        head_id,
        mut index,
        tree_id,
        message,
        signature,
    } = stage(dir, message, paths, author, time_ms)?;
    let tree = repo
        .find_tree(tree_id)
        .map_err(|e| git_error("reading the tree", e))?;
    let head = repo
        .find_commit(head_id)
        .map_err(|e| git_error("reading HEAD", e))?;
    let id = repo
        .commit(
            Some("HEAD"),
            &signature,
            &signature,
            &message,
            &tree,
            &[&head],
        )
        .map_err(|e| git_error("committing", e))?;
    index
        .write()
        .map_err(|e| git_error("writing the index", e))?;
    Ok((id.to_string(), message))
}

/// Up to `limit` commits reachable from HEAD, newest first.
pub fn log(dir: &Path, limit: usize) -> Result<Vec<CommitInfo>, OpError> {
    let repo = open(dir)?;
    let mut walk = repo
        .revwalk()
        .map_err(|e| git_error("walking history", e))?;
    walk.set_sorting(git2::Sort::TIME | git2::Sort::TOPOLOGICAL)
        .and_then(|()| walk.push_head())
        .map_err(|e| git_error("walking history", e))?;
    walk.take(limit)
        .map(|id| {
            let commit = id
                .and_then(|id| repo.find_commit(id))
                .map_err(|e| git_error("reading a commit", e))?;
            let author = commit.author();
            Ok(CommitInfo {
                id: commit.id().to_string(),
                message: String::from_utf8_lossy(commit.message_bytes()).into_owned(),
                author: String::from_utf8_lossy(author.name_bytes()).into_owned(),
                email: String::from_utf8_lossy(author.email_bytes()).into_owned(),
                time: commit.time().seconds() * 1000,
            })
        })
        .collect()
}

/// Checks a new branch name the way git does (`git check-ref-format --branch`).
pub fn validate_branch_name(name: &str) -> Result<(), OpError> {
    let valid = name.len() <= 200
        && !name.starts_with('-')
        && git2::Branch::name_is_valid(name).unwrap_or(false);
    if valid {
        Ok(())
    } else {
        Err(OpError::bad_request(format!(
            "{name:?} is not a valid branch name (see git check-ref-format)"
        )))
    }
}

/// A copy of the repository in `dir` with branch `name` created at HEAD and
/// checked out (a clean work tree: uncommitted changes stay behind), made in
/// a scratch dir under `scratch_root` and packed. Returns the snapshot and
/// the branch's HEAD.
pub fn branch_snapshot(
    dir: &Path,
    name: &str,
    scratch_root: &Path,
) -> Result<(Vec<u8>, String), OpError> {
    validate_branch_name(name)?;
    let scratch = tempfile::Builder::new()
        .prefix("branch-")
        .tempdir_in(scratch_root)
        .map_err(|e| OpError::internal("creating a scratch dir", e))?;
    copy_tree(&dir.join(".git"), &scratch.path().join(".git"))
        .map_err(|e| OpError::internal("copying the repository", e))?;
    let repo = open(scratch.path())?;
    let head = repo
        .head()
        .and_then(|h| h.peel_to_commit())
        .map_err(|e| git_error("reading HEAD", e))?;
    repo.branch(name, &head, false).map_err(|e| {
        OpError::conflict(
            format!("branch {name:?} cannot be created: {}", e.message()),
            None,
        )
    })?;
    repo.set_head(&format!("refs/heads/{name}"))
        .and_then(|()| repo.checkout_head(Some(CheckoutBuilder::new().force())))
        .map_err(|e| git_error("checking out the new branch", e))?;
    let data = super::snapshot::pack(scratch.path())
        .map_err(|e| OpError::internal("packing the new branch", e))?;
    Ok((data, head.id().to_string()))
}

/// Copies a directory tree of plain files and directories (links skipped).
fn copy_tree(from: &Path, to: &Path) -> std::io::Result<()> {
    std::fs::create_dir_all(to)?;
    for entry in std::fs::read_dir(from)? {
        let entry = entry?;
        let kind = entry.file_type()?;
        if kind.is_dir() {
            copy_tree(&entry.path(), &to.join(entry.file_name()))?;
        } else if kind.is_file() {
            std::fs::copy(entry.path(), to.join(entry.file_name()))?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_git_cannot_track_are_refused_and_ordinary_ones_pass() {
        let path = |raw: &str| WorkPath::parse(raw, 1024).expect(raw);
        for refused in [
            ".git /x",
            ".git./x",
            "git~1/x",
            "GIT~1/x",
            ".git::$INDEX_ALLOCATION/x",
        ] {
            let err = check_trackable(&path(refused)).expect_err(refused);
            assert_eq!(
                err.code,
                crate::protocol::ErrorCode::BadRequest,
                "{refused}"
            );
        }
        for fine in [
            "a/b.txt",
            "dir.git/x",
            "x/.gitmodules",
            "ünïcode/ファイル",
            "git~1x/y",
        ] {
            check_trackable(&path(fine)).expect(fine);
        }
    }

    #[test]
    fn new_repository_has_one_commit_with_the_readme_on_the_named_branch() {
        let dir = tempfile::tempdir().expect("temp dir");
        let author = GitAuthor {
            name: "Ada".into(),
            email: "ada@example.com".into(),
        };
        let id = init_repository(dir.path(), "main", "# Demo\n", &author).expect("init");

        let repo = Repository::open(dir.path()).expect("open");
        let head = repo.head().expect("head");
        assert_eq!(head.shorthand().ok(), Some("main"));
        let commit = head.peel_to_commit().expect("commit");
        assert_eq!(commit.id().to_string(), id);
        assert_eq!(commit.parent_count(), 0);
        assert_eq!(commit.author().name().ok(), Some("Ada"));
        let blob = commit
            .tree()
            .expect("tree")
            .get_path(Path::new("README.md"))
            .expect("README in tree")
            .to_object(&repo)
            .expect("object")
            .peel_to_blob()
            .expect("blob");
        assert_eq!(blob.content(), b"# Demo\n");
        assert!(repo.statuses(None).expect("status").is_empty());
    }
}
