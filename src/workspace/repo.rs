//! Creating a project's first git repository.

use std::path::Path;

use git2::{Repository, RepositoryInitOptions, Signature};

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

#[cfg(test)]
mod tests {
    use super::*;

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
