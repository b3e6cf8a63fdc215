//! Compiling a project's source files into a CAD model, incrementally.
//!
//! - [`engine`]: the per-workspace [`CompileCache`]: the import graph,
//!   content hashes, each module's compiled and evaluated form, each entry
//!   point's last output, and their persistence in `.git/branchd/`. It
//!   decides what must be compiled again; the compiler never does.
//! - [`Compiler`]: the language, pluggable. It parses one file into a unit
//!   with its imports and evaluates a file given its dependencies' values.
//! - [`rhai`]: the default compiler, Rhai scripts with a small CAD API.
//! - [`shape`]: the CSG tree a compile produces, and its bounding box.
//!
//! - [`meter`]: the memory a compile holds, counted as it allocates.
//!
//! Compiling is blocking, CPU-bound work on client input: it runs on a
//! thread of its own (see the workspace actor), never on the async
//! threads, under the node's limits ([`CompileLimits`]), its wall time
//! covering parsing as well as running. Nothing here may
//! read outside the working copy or panic on anything a script does: every
//! problem a script has becomes a [`Diagnostic`].

pub mod engine;
pub mod meter;
pub mod rhai;
pub mod shape;

use std::any::Any;
use std::sync::Arc;
use std::time::{Duration, Instant};

pub use engine::{CompileCache, Compiled};

use crate::config::Config;
use crate::protocol::OpError;
pub use crate::protocol::{Diagnostic, DiagnosticKind};
use crate::workspace::paths::WorkPath;

/// What [`Compiler::parse`] made of a file, opaque to the engine (for Rhai
/// an `AST`). Cached per file and content hash.
pub type Unit = Arc<dyn Any + Send + Sync>;

/// An evaluated module, as its importers receive it, opaque to the engine
/// (for Rhai a `rhai::Module`). Cached per file and the hash of everything
/// it depends on.
pub type ModuleValue = Arc<dyn Any + Send + Sync>;

/// One `import` a file makes, as written, and where.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Import {
    pub spec: String,
    pub line: u32,
    pub column: u32,
}

/// A parsed file: its unit and its imports in source order.
pub struct Parsed {
    pub unit: Unit,
    pub imports: Vec<Import>,
}

/// One import of the file being evaluated, resolved: the spec as the file
/// wrote it, the project file it names, and that file's module.
pub struct Dep<'a> {
    pub spec: &'a str,
    pub path: &'a str,
    pub value: &'a ModuleValue,
}

/// The limits one compile runs under (from [`Config`]).
#[derive(Debug, Clone)]
pub struct CompileLimits {
    /// Wall time for the whole compile (all files).
    pub timeout: Duration,
    /// Operations per file evaluated.
    pub max_operations: u64,
    pub max_call_depth: usize,
    /// Nesting depth of expressions when parsing.
    pub max_expr_depth: usize,
    pub max_string_size: usize,
    pub max_array_size: usize,
    pub max_map_size: usize,
    /// Files in one compile (the entry and all it imports).
    pub max_modules: usize,
    /// Nodes in one shape tree.
    pub max_shape_nodes: u64,
    /// Levels of one shape tree.
    pub max_shape_depth: u32,
    /// Bytes one compile may hold at once ([`meter`]).
    pub max_memory: u64,
    /// Largest source file read.
    pub max_file: u64,
    /// Longest path an import may name.
    pub max_path: usize,
}

impl CompileLimits {
    pub fn from_config(config: &Config) -> CompileLimits {
        CompileLimits {
            timeout: config.compile_timeout,
            max_operations: config.compile_max_operations,
            max_call_depth: config.compile_max_call_depth,
            max_expr_depth: config.compile_max_expr_depth,
            max_string_size: usize::try_from(config.compile_max_string).unwrap_or(usize::MAX),
            max_array_size: config.compile_max_array,
            max_map_size: config.compile_max_map,
            max_modules: config.compile_max_modules,
            max_shape_nodes: config.compile_max_shape_nodes,
            max_shape_depth: config.compile_max_shape_depth,
            max_memory: config.compile_max_memory,
            max_file: config.max_file,
            max_path: config.max_path,
        }
    }
}

/// Everything a workspace needs to compile, made once per node from
/// [`Config`] and shared by every workspace of the node.
#[derive(Clone)]
pub struct CompileSettings {
    pub compiler: Arc<dyn Compiler>,
    pub limits: CompileLimits,
    /// The node's compile slots (`BRANCHD_COMPILE_CONCURRENCY`).
    pub slots: Arc<tokio::sync::Semaphore>,
}

impl std::fmt::Debug for CompileSettings {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CompileSettings")
            .field("compiler", &self.compiler.id())
            .field("limits", &self.limits)
            .field("slots", &self.slots.available_permits())
            .finish()
    }
}

impl CompileSettings {
    /// The default (Rhai) compiler under the configured limits.
    pub fn from_config(config: &Config) -> CompileSettings {
        let slots = match config.compile_concurrency {
            0 => std::thread::available_parallelism().map_or(1, |n| n.get()),
            n => n,
        };
        CompileSettings {
            compiler: Arc::new(rhai::RhaiCompiler::new(
                config.compile_max_shape_nodes,
                config.compile_max_shape_depth,
            )),
            limits: CompileLimits::from_config(config),
            slots: Arc::new(tokio::sync::Semaphore::new(slots)),
        }
    }
}

/// How long past its deadline a compile is waited for before its caller
/// is answered without it.
const OVERRUN: Duration = Duration::from_secs(2);

/// A compile that held more than this gives the free memory back to the
/// system when it ends.
const GIVE_BACK_AFTER: u64 = 16 << 20;

/// The stack of a compile thread. Evaluating scripts is recursive (calls,
/// nested expressions, nested imports); with this much stack the script
/// limits, not the thread's stack, are what a script runs into.
const COMPILE_STACK: usize = 64 * 1024 * 1024;

impl CompileSettings {
    /// Compiles `entry` with `cache` off the async threads: waits for the
    /// workspace's cache (one compile per workspace at a time: a second
    /// one then finds the first one's work cached), then for one of the
    /// node's compile slots, then runs on a thread of its own.
    pub async fn run(
        &self,
        cache: Arc<tokio::sync::Mutex<CompileCache>>,
        entry: WorkPath,
    ) -> Result<Compiled, OpError> {
        let mut cache = cache.lock_owned().await;
        let slot = self
            .slots
            .clone()
            .acquire_owned()
            .await
            .map_err(|e| OpError::internal("waiting for a compile slot", e))?;
        let limits = self.limits.clone();
        let timeout = limits.timeout;
        let entry_name = entry.to_string();
        let (done, result) = tokio::sync::oneshot::channel();
        std::thread::Builder::new()
            .name("branchd-compile".into())
            .stack_size(COMPILE_STACK)
            .spawn(move || {
                let meter = meter::Meter::start();
                let compiled = cache.compile(&entry, &limits);
                let peak = meter.peak();
                drop(meter);
                let _ = done.send(compiled);
                drop(cache);
                drop(slot);
                if peak > GIVE_BACK_AFTER {
                    meter::give_back();
                }
            })
            .map_err(|e| OpError::internal("starting a compile thread", e))?;
        // The compiler stops itself at its deadline, parsing included; this
        // is the backstop should a step of it not look at the clock. The
        // caller is answered and the thread left to finish: it keeps its
        // compile slot and the workspace's cache until it does, so it still
        // counts against BRANCHD_COMPILE_CONCURRENCY.
        match tokio::time::timeout(timeout + OVERRUN, result).await {
            Ok(compiled) => compiled
                .map_err(|_| OpError::internal("compiling", "the compile thread panicked"))?,
            Err(_) => {
                tracing::warn!(
                    timeout_ms = timeout.as_millis() as u64,
                    "a compile ran past its deadline; answered, and left to finish"
                );
                Ok(Compiled::overran(&entry_name, timeout))
            }
        }
    }
}

/// The limits plus the compile's deadline, handed to every compiler call.
#[derive(Debug, Clone)]
pub struct Budget {
    pub limits: CompileLimits,
    pub deadline: Instant,
}

/// A language. Implementations hold no per-project state: the engine owns
/// caching and invalidation and calls these with everything they need.
/// Every failure is a [`Diagnostic`] naming the file, never a panic.
pub trait Compiler: Send + Sync + 'static {
    /// Names the compiler and the format of its saved modules; a persisted
    /// cache written under another id is ignored.
    fn id(&self) -> &str;

    /// The source files' extension, without the dot (`rhai`). An import
    /// whose last segment has no extension gets this one.
    fn extension(&self) -> &str;

    /// Parses one file. Imports are reported, not resolved.
    fn parse(&self, file: &str, source: &str, budget: &Budget) -> Result<Parsed, Vec<Diagnostic>>;

    /// Evaluates a file imported by others into the value importers see.
    fn evaluate_module(
        &self,
        file: &str,
        unit: &Unit,
        deps: &[Dep<'_>],
        budget: &Budget,
    ) -> Result<ModuleValue, Diagnostic>;

    /// Evaluates an entry point into its shape.
    fn evaluate_entry(
        &self,
        file: &str,
        unit: &Unit,
        deps: &[Dep<'_>],
        budget: &Budget,
    ) -> Result<Arc<shape::Shape>, Diagnostic>;

    /// A module's value as bytes that [`Compiler::load_module`] turns back
    /// into an equal value given the same dependencies, or `None` if it
    /// cannot be saved (then it is evaluated again after activation).
    fn save_module(&self, value: &ModuleValue, deps: &[Dep<'_>]) -> Option<Vec<u8>>;

    /// The value [`Compiler::save_module`] saved; `None` if unreadable.
    fn load_module(&self, saved: &[u8], deps: &[Dep<'_>]) -> Option<ModuleValue>;
}
