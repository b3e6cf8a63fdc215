//! Finding and reading source files for the engine: what an import names,
//! and a file's text, only ever below the working copy's root.

use std::io::Read;
use std::path::Path;

use sha2::{Digest, Sha256};

use super::Hash;
use crate::workspace::paths::WorkPath;

/// Resolves `spec`, written in `importer`, to a project file. A spec
/// starting with `./` or `../` is relative to the importer's directory;
/// any other is relative to the project root. The extension is optional.
/// The result must stay inside the project and obey the rules of
/// [`WorkPath`] (so `.git` can never be imported).
pub fn resolve_import(
    importer: &str,
    spec: &str,
    extension: &str,
    max_path: usize,
) -> Result<WorkPath, String> {
    if spec.is_empty() {
        return Err("the import path is empty".into());
    }
    if spec.starts_with('/') {
        return Err(format!(
            "import {spec:?} is absolute: name it relative to the project root, or start it with ./"
        ));
    }
    let mut segments: Vec<&str> = Vec::new();
    if spec.starts_with("./") || spec.starts_with("../") {
        segments.extend(importer.split('/'));
        segments.pop(); // the importer's own name
    }
    for segment in spec.split('/') {
        match segment {
            "" | "." => {}
            ".." => {
                if segments.pop().is_none() {
                    return Err(format!(
                        "import {spec:?} leads outside the project: imports must stay inside it"
                    ));
                }
            }
            other => segments.push(other),
        }
    }
    let mut joined = segments.join("/");
    let suffix = format!(".{extension}");
    if !joined.ends_with(&suffix) {
        joined.push_str(&suffix);
    }
    WorkPath::parse_non_root(&joined, max_path)
        .map_err(|e| format!("import {spec:?} is not allowed: {}", e.message))
}

pub(super) fn sha256(bytes: &[u8]) -> Hash {
    Sha256::digest(bytes).into()
}

/// Why a project file could not be read as source.
pub(super) enum ReadError {
    Missing,
    NotAFile,
    TooLarge(u64),
    NotUtf8,
    Refused(String),
    Io(std::io::Error),
}

pub(super) fn read_source(
    root: &Path,
    path: &WorkPath,
    max_file: u64,
) -> Result<String, ReadError> {
    let on_disk = path
        .resolve(root)
        .map_err(|e| ReadError::Refused(e.message))?;
    let meta = match std::fs::symlink_metadata(&on_disk) {
        Ok(meta) => meta,
        Err(err)
            if matches!(
                err.kind(),
                std::io::ErrorKind::NotFound | std::io::ErrorKind::NotADirectory
            ) =>
        {
            return Err(ReadError::Missing);
        }
        Err(err) => return Err(ReadError::Io(err)),
    };
    if !meta.is_file() {
        return Err(ReadError::NotAFile);
    }
    if meta.len() > max_file {
        return Err(ReadError::TooLarge(meta.len()));
    }
    let mut bytes = Vec::with_capacity(meta.len() as usize);
    std::fs::File::open(&on_disk)
        .and_then(|f| f.take(max_file.saturating_add(1)).read_to_end(&mut bytes))
        .map_err(ReadError::Io)?;
    if bytes.len() as u64 > max_file {
        return Err(ReadError::TooLarge(bytes.len() as u64));
    }
    String::from_utf8(bytes).map_err(|_| ReadError::NotUtf8)
}
