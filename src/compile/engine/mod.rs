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

mod persist;
mod source;

pub use source::resolve_import;
use source::{ReadError, read_source, sha256};

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

impl Compiled {
    /// A compile whose thread did not finish in time (see
    /// [`super::CompileSettings::run`]).
    pub fn overran(entry: &str, timeout: std::time::Duration) -> Compiled {
        let message = format!(
            "the compile ran out of time ({} ms, BRANCHD_COMPILE_TIMEOUT)",
            timeout.as_millis()
        );
        Compiled {
            ok: false,
            diagnostics: vec![diagnostic(entry, 0, 0, DiagnosticKind::Limit, message)],
            output: None,
            stats: CompileStats::default(),
        }
    }

    /// This result, or, when its output would not fit in `max` bytes (one
    /// frame, to its caller and to every session told of it), a failed
    /// compile with a `limit` diagnostic on `entry` that says so.
    pub fn within(self, max: usize, entry: &str) -> Compiled {
        let Some(output) = &self.output else {
            return self;
        };
        let size = rmp_serde::to_vec_named(output).map_or(usize::MAX, |bytes| bytes.len());
        if size <= max {
            return self;
        }
        let message = format!(
            "the shape's output takes {size} bytes, more than the {max} an answer may carry \
             (BRANCHD_MAX_FRAME): make the shape simpler"
        );
        Compiled {
            ok: false,
            diagnostics: vec![diagnostic(entry, 0, 0, DiagnosticKind::Limit, message)],
            output: None,
            stats: self.stats,
        }
    }
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
mod tests;
