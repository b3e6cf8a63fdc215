//! The engine's state on disk: [`CACHE_FILE`], written after every compile
//! that changed it and read on a workspace's first compile, so a freshly
//! activated workspace starts warm. Anything unreadable means a cold
//! start, never an error.

use std::collections::HashSet;

use serde::{Deserialize, Serialize};

use super::*;

#[derive(Serialize, Deserialize)]
struct PersistedFile {
    path: String,
    hash: Hash,
    imports: Vec<Resolved>,
}

#[derive(Serialize, Deserialize)]
struct PersistedModule {
    path: String,
    closure: Hash,
    #[serde(with = "serde_bytes")]
    saved: Vec<u8>,
}

#[derive(Serialize, Deserialize)]
struct PersistedEntry {
    path: String,
    closure: Hash,
    output: CompileOutput,
}

#[derive(Serialize, Deserialize)]
struct Persisted {
    format: u32,
    compiler: String,
    files: Vec<PersistedFile>,
    modules: Vec<PersistedModule>,
    entries: Vec<PersistedEntry>,
}

impl CompileCache {
    /// Reads the persisted state, if there is a usable one, keeping only
    /// files that still exist. Anything unreadable means a cold start.
    pub(super) fn load(&mut self) {
        let Ok(bytes) = std::fs::read(self.root.join(CACHE_FILE)) else {
            return;
        };
        let persisted: Persisted = match rmp_serde::from_slice(&bytes) {
            Ok(p) => p,
            Err(err) => {
                tracing::warn!(error = %err, "ignoring an unreadable compile cache");
                return;
            }
        };
        if persisted.format != FORMAT || persisted.compiler != self.compiler.id() {
            return;
        }
        let exists = |path: &str| {
            WorkPath::parse_non_root(path, usize::MAX)
                .and_then(|p| p.resolve(&self.root))
                .is_ok_and(|p| p.is_file())
        };
        let mut kept = HashSet::new();
        for file in persisted.files {
            if exists(&file.path) {
                kept.insert(file.path.clone());
                self.files.insert(
                    file.path,
                    FileState {
                        hash: file.hash,
                        imports: file.imports,
                        unit: None,
                    },
                );
            }
        }
        for module in persisted
            .modules
            .into_iter()
            .filter(|m| kept.contains(&m.path))
        {
            self.modules.insert(
                module.path,
                ModuleState {
                    closure: module.closure,
                    value: None,
                    saved: Some(Some(module.saved)),
                },
            );
        }
        for entry in persisted
            .entries
            .into_iter()
            .filter(|e| kept.contains(&e.path))
        {
            self.entries.insert(
                entry.path,
                EntryState {
                    closure: entry.closure,
                    output: entry.output,
                },
            );
        }
    }

    /// Writes the state to [`CACHE_FILE`] (through a temp file and a
    /// rename, so a snapshot never packs half a cache).
    pub(super) fn persist(&mut self) -> std::io::Result<()> {
        // Save each module's value once; later persists reuse the bytes.
        let paths: Vec<String> = self
            .modules
            .iter()
            .filter(|(_, m)| m.saved.is_none())
            .map(|(p, _)| p.clone())
            .collect();
        for path in paths {
            let imports = self
                .files
                .get(&path)
                .map(|f| f.imports.clone())
                .unwrap_or_default();
            let values: Option<Vec<ModuleValue>> = imports
                .iter()
                .filter_map(|i| i.target.as_ref().ok())
                .map(|t| self.modules.get(t).and_then(|m| m.value.clone()))
                .collect();
            let saved = match (
                values,
                self.modules.get(&path).and_then(|m| m.value.clone()),
            ) {
                (Some(values), Some(value)) => {
                    self.compiler.save_module(&value, &deps(&imports, &values))
                }
                _ => None,
            };
            if let Some(state) = self.modules.get_mut(&path) {
                state.saved = Some(saved);
            }
        }
        let persisted = Persisted {
            format: FORMAT,
            compiler: self.compiler.id().to_string(),
            files: self
                .files
                .iter()
                .map(|(path, f)| PersistedFile {
                    path: path.clone(),
                    hash: f.hash,
                    imports: f.imports.clone(),
                })
                .collect(),
            modules: self
                .modules
                .iter()
                .filter_map(|(path, m)| match &m.saved {
                    Some(Some(saved)) => Some(PersistedModule {
                        path: path.clone(),
                        closure: m.closure,
                        saved: saved.clone(),
                    }),
                    _ => None,
                })
                .collect(),
            entries: self
                .entries
                .iter()
                .map(|(path, e)| PersistedEntry {
                    path: path.clone(),
                    closure: e.closure,
                    output: e.output.clone(),
                })
                .collect(),
        };
        let bytes = rmp_serde::to_vec_named(&persisted).map_err(std::io::Error::other)?;
        static NEXT: AtomicU64 = AtomicU64::new(0);
        let staged = self.scratch.join(format!(
            "compile-cache-{}-{}.tmp",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed)
        ));
        std::fs::write(&staged, bytes)?;
        // Never creates directories: once the working copy is gone (the
        // workspace stopped mid-compile), this fails instead of recreating it.
        std::fs::rename(&staged, self.root.join(CACHE_FILE)).inspect_err(|_| {
            let _ = std::fs::remove_file(&staged);
        })
    }
}
