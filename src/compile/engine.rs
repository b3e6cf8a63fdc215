//! The incremental compile engine of one workspace.
//!
//! A compile of an entry point walks its imports from disk, hashing each
//! file's content (SHA-256). Every file then gets a *closure hash*: the
//! hash of its content and of its imports' closure hashes, in order. A
//! file's closure hash changes exactly when the file or anything it
//! imports, directly or not, changed, so:
//!
//! - a file whose content hash is known is not parsed again (its unit and
//!   imports are cached per content hash);
//! - a module whose closure hash is known is not evaluated again (its
//!   value is cached per closure hash);
//! - an entry point whose closure hash is known is not evaluated at all
//!   (its output is cached per closure hash).
//!
//! Editing one file therefore recompiles that file and the files that
//! import it, transitively, and nothing else. Because every cached value is
//! keyed by the hashes of what it was computed from, an edit that lands
//! while a compile runs can never make a stale value look fresh: the next
//! compile sees other hashes.
//!
//! The graph, the hashes, each module's saved value (when the compiler can
//! save it: for Rhai, modules that export only data) and each entry point's
//! last output are persisted in `.git/branchd/compile-cache` after every
//! compile that changed them. That file lives inside `.git`, so it travels
//! in snapshots and is never committed; a freshly activated workspace
//! reads it on its first compile and starts warm.
//!
//! This code reads only files below the working copy's root, through
//! [`WorkPath`] (no `..`, no `.git`, no symbolic links on the way).

use std::collections::{HashMap, HashSet};
use std::io::Read;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Instant;

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use super::shape::Shape;
use super::{Budget, CompileLimits, Compiler, Dep, Diagnostic, DiagnosticKind, ModuleValue, Unit};
use crate::protocol::{CompileOutput, CompileStats, OpError};
use crate::workspace::paths::WorkPath;

type Hash = [u8; 32];

/// The persisted cache's format; a file of another format is ignored.
const FORMAT: u32 = 1;

/// Where the cache is persisted, below the working copy's root.
pub const CACHE_FILE: &str = ".git/branchd/compile-cache";

/// A compile's result: diagnostics (then `ok` is false and there is no
/// output) or the output, with what it cost.
#[derive(Debug, Clone, PartialEq)]
pub struct Compiled {
    pub ok: bool,
    pub diagnostics: Vec<Diagnostic>,
    pub output: Option<CompileOutput>,
    pub stats: CompileStats,
}

/// An import, resolved to a project file or refused with a reason.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct Resolved {
    spec: String,
    line: u32,
    column: u32,
    target: Result<String, String>,
}

struct FileState {
    hash: Hash,
    imports: Vec<Resolved>,
    /// Absent when the state was read from disk: parsed again if needed.
    unit: Option<Unit>,
}

struct ModuleState {
    closure: Hash,
    /// Absent when read from disk: loaded from `saved` if needed.
    value: Option<ModuleValue>,
    /// `None`: not tried yet; `Some(None)`: the compiler cannot save it.
    saved: Option<Option<Vec<u8>>>,
}

struct EntryState {
    closure: Hash,
    output: CompileOutput,
}

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

/// Where a file stands in the current compile's walk.
enum Visit {
    InProgress,
    Done(Hash),
    Failed,
}

/// The state of one compile.
struct Run<'a> {
    budget: &'a Budget,
    visits: HashMap<String, Visit>,
    /// The files being walked, importer first (for naming cycles).
    stack: Vec<String>,
    /// Content read in this compile (parsed again only if needed).
    sources: HashMap<String, Arc<str>>,
    /// Files parsed or evaluated in this compile.
    compiled: HashSet<String>,
    diagnostics: Vec<Diagnostic>,
}

impl Run<'_> {
    fn closure(&self, path: &str) -> Option<Hash> {
        match self.visits.get(path) {
            Some(Visit::Done(hash)) => Some(*hash),
            _ => None,
        }
    }

    fn files_total(&self) -> usize {
        self.visits
            .values()
            .filter(|v| matches!(v, Visit::Done(_)))
            .count()
    }
}

fn diagnostic(
    file: &str,
    line: u32,
    column: u32,
    kind: DiagnosticKind,
    message: String,
) -> Diagnostic {
    Diagnostic {
        file: file.to_string(),
        line,
        column,
        message,
        kind,
    }
}

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

fn sha256(bytes: &[u8]) -> Hash {
    Sha256::digest(bytes).into()
}

/// Why a project file could not be read as source.
enum ReadError {
    Missing,
    NotAFile,
    TooLarge(u64),
    NotUtf8,
    Refused(String),
    Io(std::io::Error),
}

fn read_source(root: &Path, path: &WorkPath, max_file: u64) -> Result<String, ReadError> {
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

/// The compile state of one workspace. Only one compile uses it at a time
/// (the workspace holds it behind a lock).
pub struct CompileCache {
    root: PathBuf,
    /// Where the persisted file is staged: on the working copy's file
    /// system but outside it, so a snapshot packing the working copy
    /// concurrently never sees a half-written or vanishing file.
    scratch: PathBuf,
    compiler: Arc<dyn Compiler>,
    /// Whether the persisted state was read (lazily, on the first compile).
    loaded: bool,
    /// Whether anything changed since the last persist.
    changed: bool,
    files: HashMap<String, FileState>,
    modules: HashMap<String, ModuleState>,
    entries: HashMap<String, EntryState>,
}

impl CompileCache {
    /// An empty cache for the working copy at `root`, staging its
    /// persisted file in `scratch` (same file system).
    pub fn new(root: &Path, scratch: &Path, compiler: Arc<dyn Compiler>) -> CompileCache {
        CompileCache {
            root: root.to_path_buf(),
            scratch: scratch.to_path_buf(),
            compiler,
            loaded: false,
            changed: false,
            files: HashMap::new(),
            modules: HashMap::new(),
            entries: HashMap::new(),
        }
    }

    /// Compiles `entry`. `not_found` if it does not exist and `bad_request`
    /// if it is not a file; every problem in the sources is a diagnostic.
    pub fn compile(
        &mut self,
        entry: &WorkPath,
        limits: &CompileLimits,
    ) -> Result<Compiled, OpError> {
        let started = Instant::now();
        let budget = Budget {
            limits: limits.clone(),
            deadline: started + limits.timeout,
        };
        if !self.loaded {
            self.loaded = true;
            self.load();
        }
        match std::fs::symlink_metadata(entry.resolve(&self.root)?) {
            Ok(meta) if meta.is_file() => {}
            Ok(_) => return Err(OpError::bad_request(format!("{entry:?} is not a file"))),
            Err(_) => return Err(OpError::not_found(format!("{entry:?} does not exist"))),
        }
        let mut run = Run {
            budget: &budget,
            visits: HashMap::new(),
            stack: Vec::new(),
            sources: HashMap::new(),
            compiled: HashSet::new(),
            diagnostics: Vec::new(),
        };
        let closure = self.visit(entry.as_str(), None, &mut run);
        let output = match closure {
            Some(closure) if run.diagnostics.is_empty() => {
                match self.output(entry.as_str(), closure, &mut run) {
                    Ok(output) => Some(output),
                    Err(diagnostic) => {
                        run.diagnostics.push(diagnostic);
                        None
                    }
                }
            }
            _ => None,
        };
        if self.changed {
            self.changed = false;
            if let Err(err) = self.persist() {
                tracing::warn!(error = %err, "could not persist the compile cache; the next activation starts cold");
            }
        }
        let total = run.files_total().max(run.compiled.len());
        let compiled = run.compiled.len();
        Ok(Compiled {
            ok: output.is_some(),
            diagnostics: run.diagnostics,
            output,
            stats: CompileStats {
                files_total: total as u32,
                files_compiled: compiled as u32,
                files_cached: (total - compiled) as u32,
                millis: started.elapsed().as_millis() as u64,
            },
        })
    }

    /// Walks `path` and what it imports: reads, hashes, parses what is new,
    /// resolves imports. Returns the closure hash, or `None` after adding
    /// diagnostics. `via`: the import that led here.
    fn visit(
        &mut self,
        path: &str,
        via: Option<(&str, &Resolved)>,
        run: &mut Run<'_>,
    ) -> Option<Hash> {
        let at = |kind, message| match via {
            Some((importer, import)) => {
                diagnostic(importer, import.line, import.column, kind, message)
            }
            None => diagnostic(path, 0, 0, kind, message),
        };
        match run.visits.get(path) {
            Some(Visit::Done(hash)) => return Some(*hash),
            Some(Visit::Failed) => return None,
            Some(Visit::InProgress) => {
                let from = run.stack.iter().position(|p| p == path).unwrap_or(0);
                let mut circle: Vec<&str> = run.stack[from..].iter().map(String::as_str).collect();
                circle.push(path);
                run.diagnostics.push(at(
                    DiagnosticKind::Cycle,
                    format!("import cycle: {}", circle.join(" → ")),
                ));
                return None;
            }
            None => {}
        }
        if run.visits.len() >= run.budget.limits.max_modules {
            run.diagnostics.push(at(
                DiagnosticKind::Limit,
                format!(
                    "the compile reaches more than {} files (BRANCHD_COMPILE_MAX_MODULES)",
                    run.budget.limits.max_modules
                ),
            ));
            return None;
        }
        run.visits.insert(path.to_string(), Visit::InProgress);
        let hash = self.scan(path, &at, run);
        let closure = hash.and_then(|hash| {
            run.stack.push(path.to_string());
            let imports = self
                .files
                .get(path)
                .map(|f| f.imports.clone())
                .unwrap_or_default();
            let mut closure = Sha256::new();
            closure.update(hash);
            let mut failed = false;
            for import in &imports {
                match &import.target {
                    Ok(target) => match self.visit(target, Some((path, import)), run) {
                        Some(child) => closure.update(child),
                        None => failed = true,
                    },
                    Err(message) => {
                        failed = true;
                        run.diagnostics.push(diagnostic(
                            path,
                            import.line,
                            import.column,
                            DiagnosticKind::Import,
                            message.clone(),
                        ));
                    }
                }
            }
            run.stack.pop();
            (!failed).then(|| closure.finalize().into())
        });
        run.visits.insert(
            path.to_string(),
            match closure {
                Some(hash) => Visit::Done(hash),
                None => Visit::Failed,
            },
        );
        closure
    }

    /// Reads and hashes one file and makes sure its parse (imports at
    /// least) is known for this content. Returns its content hash.
    fn scan(
        &mut self,
        path: &str,
        at: &dyn Fn(DiagnosticKind, String) -> Diagnostic,
        run: &mut Run<'_>,
    ) -> Option<Hash> {
        let limits = &run.budget.limits;
        let work_path = match WorkPath::parse_non_root(path, usize::MAX) {
            Ok(p) => p,
            Err(err) => {
                run.diagnostics
                    .push(at(DiagnosticKind::Import, err.message));
                return None;
            }
        };
        let source = match read_source(&self.root, &work_path, limits.max_file) {
            Ok(source) => source,
            Err(err) => {
                let (kind, message) = match err {
                    ReadError::Missing => {
                        (DiagnosticKind::Import, format!("{path:?} does not exist"))
                    }
                    ReadError::NotAFile => {
                        (DiagnosticKind::Import, format!("{path:?} is not a file"))
                    }
                    ReadError::Refused(message) => (DiagnosticKind::Import, message),
                    ReadError::TooLarge(size) => (
                        DiagnosticKind::Limit,
                        format!(
                            "{path:?} is {size} bytes; the largest source file is {} (BRANCHD_MAX_FILE)",
                            limits.max_file
                        ),
                    ),
                    ReadError::NotUtf8 => {
                        run.diagnostics.push(diagnostic(
                            path,
                            0,
                            0,
                            DiagnosticKind::Syntax,
                            "the file is not UTF-8 text".into(),
                        ));
                        return None;
                    }
                    ReadError::Io(err) => {
                        tracing::warn!(file = path, error = %err, "reading a source file failed");
                        (
                            DiagnosticKind::Import,
                            format!("{path:?} could not be read"),
                        )
                    }
                };
                run.diagnostics.push(at(kind, message));
                return None;
            }
        };
        let hash = sha256(source.as_bytes());
        let source: Arc<str> = source.into();
        run.sources.insert(path.to_string(), source.clone());
        if self.files.get(path).is_some_and(|f| f.hash == hash) {
            return Some(hash);
        }
        if let Err(late) = check_deadline(path, run.budget) {
            run.diagnostics.push(late);
            return None;
        }
        let parsed = self.parse(path, &source, run)?;
        self.files.insert(
            path.to_string(),
            FileState {
                hash,
                imports: parsed.0,
                unit: Some(parsed.1),
            },
        );
        self.changed = true;
        Some(hash)
    }

    /// Parses a file (counted as compiled) and resolves its imports.
    fn parse(&self, path: &str, source: &str, run: &mut Run<'_>) -> Option<(Vec<Resolved>, Unit)> {
        run.compiled.insert(path.to_string());
        let parsed = match self.compiler.parse(path, source, run.budget) {
            Ok(parsed) => parsed,
            Err(diagnostics) => {
                run.diagnostics.extend(diagnostics);
                return None;
            }
        };
        let extension = self.compiler.extension();
        let imports = parsed
            .imports
            .into_iter()
            .map(|import| Resolved {
                target: resolve_import(path, &import.spec, extension, run.budget.limits.max_path)
                    .map(|p| p.to_string()),
                spec: import.spec,
                line: import.line,
                column: import.column,
            })
            .collect();
        Some((imports, parsed.unit))
    }

    /// The entry's output: from the cache if its closure is unchanged,
    /// otherwise evaluated (after whatever modules it needs).
    fn output(
        &mut self,
        entry: &str,
        closure: Hash,
        run: &mut Run<'_>,
    ) -> Result<CompileOutput, Diagnostic> {
        if let Some(cached) = self.entries.get(entry).filter(|e| e.closure == closure) {
            return Ok(cached.output.clone());
        }
        let (unit, imports) = self.unit(entry, run)?;
        let values = self.dep_values(&imports, run)?;
        let deps = deps(&imports, &values);
        check_deadline(entry, run.budget)?;
        run.compiled.insert(entry.to_string());
        let shape = self
            .compiler
            .evaluate_entry(entry, &unit, &deps, run.budget)?;
        let output = CompileOutput {
            bbox: shape.bounding_box(),
            tree: Shape::clone(&shape),
        };
        self.entries.insert(
            entry.to_string(),
            EntryState {
                closure,
                output: output.clone(),
            },
        );
        self.changed = true;
        Ok(output)
    }

    /// A file's unit and imports, parsing it again if only its imports
    /// were known (after activation).
    fn unit(&mut self, path: &str, run: &mut Run<'_>) -> Result<(Unit, Vec<Resolved>), Diagnostic> {
        if let Some(FileState {
            unit: Some(unit),
            imports,
            ..
        }) = self.files.get(path)
        {
            return Ok((unit.clone(), imports.clone()));
        }
        let source = run.sources.get(path).cloned().ok_or_else(|| {
            diagnostic(
                path,
                0,
                0,
                DiagnosticKind::Import,
                format!("{path:?} was not read"),
            )
        })?;
        let Some((imports, unit)) = self.parse(path, &source, run) else {
            return Err(run.diagnostics.pop().unwrap_or_else(|| {
                diagnostic(
                    path,
                    0,
                    0,
                    DiagnosticKind::Syntax,
                    "the file does not parse".into(),
                )
            }));
        };
        if let Some(state) = self.files.get_mut(path) {
            state.unit = Some(unit.clone());
            state.imports = imports.clone();
        }
        Ok((unit, imports))
    }

    fn dep_values(
        &mut self,
        imports: &[Resolved],
        run: &mut Run<'_>,
    ) -> Result<Vec<ModuleValue>, Diagnostic> {
        imports
            .iter()
            .filter_map(|i| i.target.as_ref().ok())
            .map(|target| self.module(target, run))
            .collect()
    }

    /// The value of module `path` for this compile: cached if its closure
    /// is unchanged (loaded from its saved form after activation),
    /// otherwise evaluated after its own imports.
    fn module(&mut self, path: &str, run: &mut Run<'_>) -> Result<ModuleValue, Diagnostic> {
        let closure = run.closure(path).ok_or_else(|| {
            diagnostic(
                path,
                0,
                0,
                DiagnosticKind::Import,
                format!("{path:?} was not walked"),
            )
        })?;
        if let Some(state) = self.modules.get(path).filter(|m| m.closure == closure) {
            if let Some(value) = &state.value {
                return Ok(value.clone());
            }
            if let Some(Some(saved)) = state.saved.clone() {
                let imports = self
                    .files
                    .get(path)
                    .map(|f| f.imports.clone())
                    .unwrap_or_default();
                let values = self.dep_values(&imports, run)?;
                if let Some(value) = self.compiler.load_module(&saved, &deps(&imports, &values)) {
                    if let Some(state) = self.modules.get_mut(path) {
                        state.value = Some(value.clone());
                    }
                    return Ok(value);
                }
            }
        }
        let (unit, imports) = self.unit(path, run)?;
        let values = self.dep_values(&imports, run)?;
        check_deadline(path, run.budget)?;
        run.compiled.insert(path.to_string());
        let value =
            self.compiler
                .evaluate_module(path, &unit, &deps(&imports, &values), run.budget)?;
        self.modules.insert(
            path.to_string(),
            ModuleState {
                closure,
                value: Some(value.clone()),
                saved: None,
            },
        );
        self.changed = true;
        Ok(value)
    }

    /// Reads the persisted state, if there is a usable one, keeping only
    /// files that still exist. Anything unreadable means a cold start.
    fn load(&mut self) {
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
    fn persist(&mut self) -> std::io::Result<()> {
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

/// The [`Dep`]s of a file: its resolved imports with their values (in the
/// same order as `imports`' resolved targets).
fn deps<'a>(imports: &'a [Resolved], values: &'a [ModuleValue]) -> Vec<Dep<'a>> {
    imports
        .iter()
        .filter_map(|i| {
            i.target
                .as_ref()
                .ok()
                .map(|t| (i.spec.as_str(), t.as_str()))
        })
        .zip(values)
        .map(|((spec, path), value)| Dep { spec, path, value })
        .collect()
}

fn check_deadline(file: &str, budget: &Budget) -> Result<(), Diagnostic> {
    if Instant::now() >= budget.deadline {
        return Err(diagnostic(
            file,
            0,
            0,
            DiagnosticKind::Limit,
            format!(
                "the compile ran out of time ({} ms, BRANCHD_COMPILE_TIMEOUT)",
                budget.limits.timeout.as_millis()
            ),
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::compile::rhai::RhaiCompiler;

    fn limits() -> CompileLimits {
        CompileLimits {
            timeout: Duration::from_secs(10),
            max_operations: 100_000,
            max_call_depth: 32,
            max_expr_depth: 64,
            max_string_size: 1 << 16,
            max_array_size: 1_000,
            max_map_size: 1_000,
            max_modules: 100,
            max_shape_nodes: 10_000,
            max_shape_depth: 64,
            max_file: 1 << 20,
            max_path: 1024,
        }
    }

    /// A working copy (with the `.git/branchd` a workspace has) and its scratch dir.
    struct Project {
        dir: tempfile::TempDir,
        scratch: tempfile::TempDir,
    }

    impl Project {
        fn new(files: &[(&str, &str)]) -> Project {
            let project = Project {
                dir: tempfile::tempdir().expect("dir"),
                scratch: tempfile::tempdir().expect("scratch"),
            };
            std::fs::create_dir_all(project.dir.path().join(".git/branchd")).expect("git dir");
            for (path, content) in files {
                project.write(path, content);
            }
            project
        }

        fn write(&self, path: &str, content: &str) {
            let on_disk = self.dir.path().join(path);
            std::fs::create_dir_all(on_disk.parent().expect("parent")).expect("dirs");
            std::fs::write(on_disk, content).expect("write");
        }

        fn cache(&self) -> CompileCache {
            CompileCache::new(
                self.dir.path(),
                self.scratch.path(),
                Arc::new(RhaiCompiler::new(10_000, 64)),
            )
        }
    }

    fn compile(cache: &mut CompileCache, entry: &str) -> Compiled {
        compile_with(cache, entry, &limits())
    }

    fn compile_with(cache: &mut CompileCache, entry: &str, limits: &CompileLimits) -> Compiled {
        cache
            .compile(&WorkPath::parse(entry, 1024).expect("entry"), limits)
            .expect("compiles")
    }

    fn counts(compiled: &Compiled) -> (u32, u32, u32) {
        let s = compiled.stats;
        (s.files_total, s.files_compiled, s.files_cached)
    }

    /// main ← {parts/a ← parts/leaf, parts/b ← parts/c}
    fn tree_project() -> Project {
        Project::new(&[
            (
                "main.rhai",
                "import \"parts/a\" as a;\nimport \"parts/b\" as b;\nunion(a::part, b::part)\n",
            ),
            (
                "parts/a.rhai",
                "import \"./leaf\" as leaf;\nexport const part = translate(leaf::part, 10, 0, 0);\n",
            ),
            ("parts/leaf.rhai", "export const part = cube(1, 2, 3);\n"),
            (
                "parts/b.rhai",
                "import \"parts/c\" as c;\nexport const part = scale(c::part, 2);\n",
            ),
            ("parts/c.rhai", "export const part = sphere(1);\n"),
        ])
    }

    #[test]
    fn a_project_compiles_to_its_tree_and_box() {
        let project = tree_project();
        let mut cache = project.cache();
        let compiled = compile(&mut cache, "main.rhai");
        assert!(compiled.ok, "{:?}", compiled.diagnostics);
        assert_eq!(counts(&compiled), (5, 5, 0));
        let output = compiled.output.expect("output");
        let bbox = output.bbox.expect("bbox");
        assert_eq!(bbox.min, [-2.0, -2.0, -2.0]);
        assert_eq!(bbox.max, [11.0, 2.0, 3.0]);
        let Shape::Union { children } = &output.tree else {
            panic!("{:?}", output.tree)
        };
        assert!(matches!(*children[0], Shape::Translate { .. }));
        assert!(matches!(*children[1], Shape::Scale { .. }));
    }

    #[test]
    fn an_edit_recompiles_the_file_and_its_importers_only() {
        let project = tree_project();
        let mut cache = project.cache();
        compile(&mut cache, "main.rhai");

        let unchanged = compile(&mut cache, "main.rhai");
        assert_eq!(counts(&unchanged), (5, 0, 5));

        project.write("parts/leaf.rhai", "export const part = cube(1, 2, 30);\n");
        let edited = compile(&mut cache, "main.rhai");
        assert!(edited.ok, "{:?}", edited.diagnostics);
        // leaf, its importer a, and a's importer main; b and c are cached.
        assert_eq!(counts(&edited), (5, 3, 2));
        assert_eq!(
            edited.output.expect("output").bbox.expect("bbox").max[2],
            30.0
        );

        project.write("parts/c.rhai", "export const part = sphere(5);\n");
        let edited = compile(&mut cache, "main.rhai");
        assert_eq!(counts(&edited), (5, 3, 2));
        assert_eq!(
            edited.output.expect("output").bbox.expect("bbox").min[0],
            -10.0
        );
    }

    #[test]
    fn a_fresh_cache_starts_warm_from_the_persisted_state() {
        let project = tree_project();
        let first = compile(&mut project.cache(), "main.rhai");
        assert!(project.dir.path().join(CACHE_FILE).is_file());

        let mut fresh = project.cache();
        let again = compile(&mut fresh, "main.rhai");
        assert_eq!(counts(&again), (5, 0, 5));
        assert_eq!(again.output, first.output);

        // Modules that export only data come back without evaluation.
        project.write("parts/leaf.rhai", "export const part = cube(4, 4, 4);\n");
        let mut fresh = project.cache();
        let edited = compile(&mut fresh, "main.rhai");
        assert!(edited.ok, "{:?}", edited.diagnostics);
        assert_eq!(counts(&edited), (5, 3, 2));
        assert_eq!(
            edited.output.expect("output").bbox.expect("bbox").max,
            [14.0, 4.0, 4.0]
        );
    }

    #[test]
    fn modules_exporting_functions_are_evaluated_again_after_activation() {
        let project = Project::new(&[
            (
                "main.rhai",
                "import \"lib\" as lib;\nimport \"leaf\" as leaf;\nlib::wide(leaf::size)\n",
            ),
            ("lib.rhai", "fn wide(n) { cube(n * 2, n, n) }\n"),
            ("leaf.rhai", "export const size = 3;\n"),
        ]);
        compile(&mut project.cache(), "main.rhai");
        project.write("leaf.rhai", "export const size = 4;\n");
        let edited = compile(&mut project.cache(), "main.rhai");
        assert!(edited.ok, "{:?}", edited.diagnostics);
        // leaf and main changed; lib defines a function, so it is evaluated again.
        assert_eq!(counts(&edited), (3, 3, 0));
        assert_eq!(
            edited.output.expect("output").bbox.expect("bbox").max,
            [8.0, 4.0, 4.0]
        );
    }

    #[test]
    fn a_cycle_is_a_diagnostic_naming_the_cycle() {
        let project = Project::new(&[
            ("main.rhai", "import \"a\" as a;\ncube(1, 1, 1)\n"),
            ("a.rhai", "import \"b\" as b;\n"),
            ("b.rhai", "\nimport \"a\" as a;\n"),
        ]);
        let compiled = compile(&mut project.cache(), "main.rhai");
        assert!(!compiled.ok);
        let [d] = &compiled.diagnostics[..] else {
            panic!("{:?}", compiled.diagnostics)
        };
        assert_eq!(d.kind, DiagnosticKind::Cycle);
        assert_eq!((d.file.as_str(), d.line), ("b.rhai", 2));
        assert_eq!(d.message, "import cycle: a.rhai → b.rhai → a.rhai");
    }

    #[test]
    fn syntax_errors_and_bad_imports_name_file_and_line() {
        let project = Project::new(&[
            (
                "main.rhai",
                "import \"broken\" as b;\nimport \"missing\" as m;\ncube(1, 1, 1)\n",
            ),
            ("broken.rhai", "let x = 1;\nlet y = ;\n"),
        ]);
        let compiled = compile(&mut project.cache(), "main.rhai");
        assert!(!compiled.ok);
        let syntax = compiled
            .diagnostics
            .iter()
            .find(|d| d.kind == DiagnosticKind::Syntax)
            .expect("a syntax error");
        assert_eq!((syntax.file.as_str(), syntax.line), ("broken.rhai", 2));
        let import = compiled
            .diagnostics
            .iter()
            .find(|d| d.kind == DiagnosticKind::Import)
            .expect("an import error");
        assert_eq!((import.file.as_str(), import.line), ("main.rhai", 2));
        assert!(
            import.message.contains("missing.rhai"),
            "{}",
            import.message
        );
    }

    #[test]
    fn imports_stay_inside_the_project() {
        let resolve =
            |importer, spec| resolve_import(importer, spec, "rhai", 1024).map(|p| p.to_string());
        assert_eq!(
            resolve("main.rhai", "parts/gear").as_deref(),
            Ok("parts/gear.rhai")
        );
        assert_eq!(
            resolve("parts/a.rhai", "./b.rhai").as_deref(),
            Ok("parts/b.rhai")
        );
        assert_eq!(
            resolve("parts/x/a.rhai", "../b").as_deref(),
            Ok("parts/b.rhai")
        );
        for (importer, spec) in [
            ("main.rhai", "../../etc/passwd"),
            ("parts/a.rhai", "../../x"),
            ("main.rhai", "/etc/passwd"),
            ("main.rhai", ".git/config"),
            ("main.rhai", ""),
            ("main.rhai", "a\\b"),
        ] {
            assert!(
                resolve(importer, spec).is_err(),
                "{spec:?} from {importer:?}"
            );
        }
    }

    #[test]
    fn endless_loops_recursion_and_huge_shapes_hit_limits() {
        let project = Project::new(&[
            ("loop.rhai", "loop { }\n"),
            ("recurse.rhai", "fn f(n) { f(n + 1) }\nf(0)\n"),
            (
                "grow.rhai",
                "let s = cube(1, 1, 1);\nfor i in 0..100 { s = union(s, s); }\ns\n",
            ),
            (
                "deep.rhai",
                "let s = cube(1, 1, 1);\nfor i in 0..100 { s = translate(s, 1, 0, 0); }\ns\n",
            ),
            (
                "nest.rhai",
                "let a = [];\nfor i in 0..100000 { a = [a]; }\ncube(1, 1, 1)\n",
            ),
        ]);
        let mut cache = project.cache();
        for entry in [
            "loop.rhai",
            "recurse.rhai",
            "grow.rhai",
            "deep.rhai",
            "nest.rhai",
        ] {
            let compiled = compile(&mut cache, entry);
            let [d] = &compiled.diagnostics[..] else {
                panic!("{entry}: {:?}", compiled.diagnostics)
            };
            assert_eq!(
                (d.kind, d.file.as_str()),
                (DiagnosticKind::Limit, entry),
                "{d:?}"
            );
            assert!(d.line > 0, "{d:?}");
        }
        let slow = CompileLimits {
            timeout: Duration::from_millis(200),
            max_operations: u64::MAX,
            ..limits()
        };
        let started = Instant::now();
        let compiled = compile_with(&mut cache, "loop.rhai", &slow);
        assert!(started.elapsed() < Duration::from_secs(5));
        assert!(
            compiled.diagnostics[0].message.contains("out of time"),
            "{:?}",
            compiled.diagnostics
        );
    }

    #[test]
    fn a_missing_entry_is_not_found_and_runtime_errors_are_diagnostics() {
        let project = Project::new(&[
            ("main.rhai", "import \"lib\" as lib;\nlib::part(\"x\")\n"),
            ("lib.rhai", "fn part(n) {\n  cube(n, 1, 1)\n}\n"),
            ("nothing.rhai", "let x = 1;\n"),
        ]);
        let mut cache = project.cache();
        let missing = cache.compile(
            &WorkPath::parse("nope.rhai", 1024).expect("path"),
            &limits(),
        );
        assert_eq!(
            missing.expect_err("missing").code,
            crate::protocol::ErrorCode::NotFound
        );
        let compiled = compile(&mut cache, "main.rhai");
        let [d] = &compiled.diagnostics[..] else {
            panic!("{:?}", compiled.diagnostics)
        };
        assert_eq!(
            (d.kind, d.file.as_str(), d.line),
            (DiagnosticKind::Runtime, "lib.rhai", 2),
            "{d:?}"
        );
        assert!(d.message.contains("must be a number"), "{d:?}");
        let compiled = compile(&mut cache, "nothing.rhai");
        assert!(
            compiled.diagnostics[0]
                .message
                .contains("must end with a shape")
        );
    }
}
