//! The default [`Compiler`]: Rhai scripts (`*.rhai`) with a small CAD API.
//!
//! A file is parsed into an `AST`; its `import "path" as name;` statements
//! (string literals only) are its imports. A module is evaluated with
//! `Module::eval_ast_as_new`: what it `export`s and its functions are what
//! importers see. An entry point is evaluated for its value, which must be
//! a shape. Imports are served by a resolver that holds only the modules
//! the engine resolved for this file, so a script can never load anything
//! by itself: no file system, no `eval`, no printing.
//!
//! Built-ins: `cube(x, y, z)`, `sphere(r)`, `cylinder(r, h)`,
//! `translate(s, x, y, z)`, `rotate(s, ax, ay, az)` (degrees), `scale(s, f)`,
//! `union(a, b)`, `difference(a, b)`, `intersection(a, b)` and
//! `union_all(array)` (one flat union, for parts made in a loop). Numbers
//! may be integers or floats. Every engine limit (operations, call depth,
//! expression depth, string, array and map sizes, modules, wall time) is
//! set from [`Budget`], and shape trees are capped in nodes and depth, so
//! no script can hang or exhaust the node.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Instant;

use rhai::packages::{Package, StandardPackage};
use rhai::{
    AST, ASTNode, Dynamic, Engine, EvalAltResult, Expr, ImmutableString, Module, ModuleResolver,
    NativeCallContext, ParseErrorType, Position, Scope, Shared, Stmt,
};
use serde::{Deserialize, Serialize};

use super::meter::Meter;
use super::shape::{Shape, Solid};
use super::{Budget, Compiler, Dep, Diagnostic, DiagnosticKind, Import, ModuleValue, Parsed, Unit};

type RhaiResult<T> = Result<T, Box<EvalAltResult>>;

/// What `on_progress` aborts a script with when the wall time is up.
const TIMEOUT_TOKEN: &str = "branchd: compile timeout";
/// What `on_progress` aborts a script with when the compile holds more
/// than `BRANCHD_COMPILE_MAX_MEMORY`.
const MEMORY_TOKEN: &str = "branchd: compile memory";
/// Tokens parsed between two looks at the clock and the memory meter.
const TOKENS_PER_CHECK: u64 = 1024;

/// Why a compile must stop now, if it must: past its deadline, or holding
/// more memory than it may.
fn over_budget(deadline: Instant, max_memory: u64) -> Option<&'static str> {
    if Meter::live() > max_memory {
        Some(MEMORY_TOKEN)
    } else if Instant::now() >= deadline {
        Some(TIMEOUT_TOKEN)
    } else {
        None
    }
}

/// The Rhai CAD compiler. Cheap to share: the standard library and the CAD
/// built-ins are built once and shared by every engine it makes.
pub struct RhaiCompiler {
    std: Shared<Module>,
    cad: Shared<Module>,
}

impl RhaiCompiler {
    pub fn new(max_shape_nodes: u64, max_shape_depth: u32) -> RhaiCompiler {
        RhaiCompiler {
            std: StandardPackage::new().as_shared_module(),
            cad: cad_module(max_shape_nodes, max_shape_depth),
        }
    }

    /// A sandboxed engine under `budget`, importing only `modules`
    /// (spec as written → module).
    fn engine(&self, budget: &Budget, modules: HashMap<String, Shared<Module>>) -> Engine {
        let limits = &budget.limits;
        let mut engine = Engine::new_raw();
        engine.register_global_module(self.std.clone());
        engine.register_global_module(self.cad.clone());
        engine.register_type_with_name::<Solid>("Shape");
        engine.disable_symbol("eval");
        engine
            .set_max_operations(limits.max_operations.max(1))
            .set_max_call_levels(limits.max_call_depth)
            .set_max_expr_depths(limits.max_expr_depth, limits.max_expr_depth)
            .set_max_string_size(limits.max_string_size.max(1))
            .set_max_array_size(limits.max_array_size.max(1))
            .set_max_map_size(limits.max_map_size.max(1))
            .set_max_modules(limits.max_modules.max(1));
        let (deadline, max_memory) = (budget.deadline, limits.max_memory);
        engine.on_progress(move |operations| {
            // Memory is looked at every operation (a thread-local read):
            // one operation can allocate a value as large as the per-value
            // limits allow. A clock read every 256 keeps time cheap.
            if Meter::live() > max_memory {
                return Some(MEMORY_TOKEN.into());
            }
            (operations % 256 == 0 && Instant::now() >= deadline).then(|| TIMEOUT_TOKEN.into())
        });
        // Parsing has no progress callback; a token mapper sees every
        // token, so the wall time and the memory bound cover parsing too
        // (a huge file would otherwise parse for minutes).
        let tokens = std::sync::atomic::AtomicU64::new(0);
        #[allow(deprecated)] // "volatile", not deprecated: see its docs
        engine.on_parse_token(move |token, _, _| {
            let seen = tokens.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            if seen.is_multiple_of(TOKENS_PER_CHECK)
                && let Some(reason) = over_budget(deadline, max_memory)
            {
                return rhai::Token::LexError(Box::new(rhai::LexError::Runtime(reason.into())));
            }
            token
        });
        engine.set_module_resolver(Resolver(modules));
        engine
    }

    fn modules(deps: &[Dep<'_>]) -> HashMap<String, Shared<Module>> {
        deps.iter()
            .filter_map(|d| {
                d.value
                    .downcast_ref::<Shared<Module>>()
                    .map(|m| (d.spec.to_string(), m.clone()))
            })
            .collect()
    }

    fn ast<'a>(file: &str, unit: &'a Unit) -> Result<&'a AST, Diagnostic> {
        unit.downcast_ref::<AST>().ok_or_else(|| Diagnostic {
            file: file.to_string(),
            line: 0,
            column: 0,
            message: "the file was compiled by another compiler".into(),
            kind: DiagnosticKind::Runtime,
        })
    }
}

impl Compiler for RhaiCompiler {
    fn id(&self) -> &str {
        "rhai-cad/1"
    }

    fn extension(&self) -> &str {
        "rhai"
    }

    fn parse(&self, file: &str, source: &str, budget: &Budget) -> Result<Parsed, Vec<Diagnostic>> {
        let engine = self.engine(budget, HashMap::new());
        let mut ast = engine.compile(source).map_err(|err| {
            let kind = match *err.0 {
                ParseErrorType::ExprTooDeep | ParseErrorType::LiteralTooLarge(..) => {
                    DiagnosticKind::Limit
                }
                ParseErrorType::BadInput(rhai::LexError::Runtime(ref reason))
                    if reason == TIMEOUT_TOKEN || reason == MEMORY_TOKEN =>
                {
                    let message = stopped(reason, budget);
                    return vec![at(file, err.1, DiagnosticKind::Limit, message)];
                }
                _ => DiagnosticKind::Syntax,
            };
            vec![at(file, err.1, kind, err.0.to_string())]
        })?;
        ast.set_source(file);
        let mut imports = Vec::new();
        let mut refused = Vec::new();
        ast.walk(&mut |path: &[ASTNode]| {
            if let Some(ASTNode::Stmt(Stmt::Import(import, position))) = path.last() {
                match &import.0 {
                    Expr::StringConstant(spec, _) => {
                        let (line, column) = line_column(*position);
                        imports.push(Import {
                            spec: spec.to_string(),
                            line,
                            column,
                        });
                    }
                    _ => refused.push(at(
                        file,
                        *position,
                        DiagnosticKind::Import,
                        "an import path must be a string literal".into(),
                    )),
                }
            }
            true
        });
        if !refused.is_empty() {
            return Err(refused);
        }
        Ok(Parsed {
            unit: Arc::new(ast),
            imports,
        })
    }

    fn evaluate_module(
        &self,
        file: &str,
        unit: &Unit,
        deps: &[Dep<'_>],
        budget: &Budget,
    ) -> Result<ModuleValue, Diagnostic> {
        let ast = Self::ast(file, unit)?;
        let engine = self.engine(budget, Self::modules(deps));
        let mut module = Module::eval_ast_as_new(Scope::new(), ast, &engine)
            .map_err(|err| runtime(file, &err, budget))?;
        module.build_index();
        Ok(Arc::new(Shared::new(module)))
    }

    fn evaluate_entry(
        &self,
        file: &str,
        unit: &Unit,
        deps: &[Dep<'_>],
        budget: &Budget,
    ) -> Result<Arc<Shape>, Diagnostic> {
        let ast = Self::ast(file, unit)?;
        let engine = self.engine(budget, Self::modules(deps));
        let value: Dynamic = engine
            .eval_ast(ast)
            .map_err(|err| runtime(file, &err, budget))?;
        let type_name = value.type_name().to_string();
        match value.try_cast::<Solid>() {
            Some(solid) => Ok(solid.shape),
            None => Err(Diagnostic {
                file: file.to_string(),
                line: 0,
                column: 0,
                message: format!(
                    "an entry point must end with a shape (e.g. `cube(1, 1, 1)`); it ended with {}",
                    if type_name == "()" {
                        "nothing".to_string()
                    } else {
                        type_name
                    }
                ),
                kind: DiagnosticKind::Runtime,
            }),
        }
    }

    fn save_module(&self, value: &ModuleValue, deps: &[Dep<'_>]) -> Option<Vec<u8>> {
        let module = value.downcast_ref::<Shared<Module>>()?;
        // Functions carry their AST and environment: such a module is
        // evaluated again after activation rather than saved.
        if module.count().1 > 0 {
            return None;
        }
        let vars = module
            .iter_var()
            .map(|(name, value)| Some((name.to_string(), Plain::from_dynamic(value, 0)?)))
            .collect::<Option<Vec<_>>>()?;
        let subs = module
            .iter_sub_modules()
            .map(|(alias, sub)| {
                deps.iter()
                    .find(|d| {
                        d.value
                            .downcast_ref::<Shared<Module>>()
                            .is_some_and(|m| Shared::ptr_eq(m, sub))
                    })
                    .map(|d| (alias.to_string(), d.spec.to_string()))
            })
            .collect::<Option<Vec<_>>>()?;
        rmp_serde::to_vec_named(&SavedModule { vars, subs }).ok()
    }

    fn load_module(&self, saved: &[u8], deps: &[Dep<'_>]) -> Option<ModuleValue> {
        let saved: SavedModule = rmp_serde::from_slice(saved).ok()?;
        let mut module = Module::new();
        for (name, value) in saved.vars {
            module.set_var(name, value.into_dynamic());
        }
        let modules = Self::modules(deps);
        for (alias, spec) in saved.subs {
            module.set_sub_module(alias, modules.get(&spec)?.clone());
        }
        module.build_index();
        Some(Arc::new(Shared::new(module)))
    }
}

/// Serves imports from the modules the engine resolved for this file and
/// nothing else.
struct Resolver(HashMap<String, Shared<Module>>);

impl ModuleResolver for Resolver {
    fn resolve(
        &self,
        _engine: &Engine,
        _source: Option<&str>,
        path: &str,
        pos: Position,
    ) -> RhaiResult<Shared<Module>> {
        self.0
            .get(path)
            .cloned()
            .ok_or_else(|| Box::new(EvalAltResult::ErrorModuleNotFound(path.to_string(), pos)))
    }
}

/// A module's exported value as plain data (what can be saved).
#[derive(Serialize, Deserialize)]
enum Plain {
    Unit,
    Bool(bool),
    Int(i64),
    Float(f64),
    Char(char),
    Str(String),
    Blob(#[serde(with = "serde_bytes")] Vec<u8>),
    Array(Vec<Plain>),
    Map(Vec<(String, Plain)>),
    Shape(Arc<Shape>),
}

#[derive(Serialize, Deserialize)]
struct SavedModule {
    vars: Vec<(String, Plain)>,
    /// Imported modules the module re-exports: alias and import spec.
    subs: Vec<(String, String)>,
}

impl Plain {
    /// Deeper data than this is not saved (the module is evaluated again).
    const MAX_DEPTH: u32 = 32;

    fn from_dynamic(value: &Dynamic, depth: u32) -> Option<Plain> {
        if depth > Self::MAX_DEPTH {
            return None;
        }
        let value = value.flatten_clone();
        Some(if value.is_unit() {
            Plain::Unit
        } else if let Ok(b) = value.as_bool() {
            Plain::Bool(b)
        } else if let Ok(i) = value.as_int() {
            Plain::Int(i)
        } else if let Ok(f) = value.as_float() {
            Plain::Float(f)
        } else if let Ok(c) = value.as_char() {
            Plain::Char(c)
        } else if value.is_string() {
            Plain::Str(value.into_immutable_string().ok()?.to_string())
        } else if value.is_blob() {
            Plain::Blob(value.into_blob().ok()?)
        } else if value.is_array() {
            let items = value.into_array().ok()?;
            Plain::Array(
                items
                    .iter()
                    .map(|v| Plain::from_dynamic(v, depth + 1))
                    .collect::<Option<_>>()?,
            )
        } else if value.is_map() {
            let map = value.try_cast::<rhai::Map>()?;
            Plain::Map(
                map.iter()
                    .map(|(k, v)| Some((k.to_string(), Plain::from_dynamic(v, depth + 1)?)))
                    .collect::<Option<_>>()?,
            )
        } else {
            Plain::Shape(value.try_cast::<Solid>()?.shape)
        })
    }

    fn into_dynamic(self) -> Dynamic {
        match self {
            Plain::Unit => Dynamic::UNIT,
            Plain::Bool(b) => b.into(),
            Plain::Int(i) => i.into(),
            Plain::Float(f) => f.into(),
            Plain::Char(c) => c.into(),
            Plain::Str(s) => s.into(),
            Plain::Blob(b) => Dynamic::from_blob(b),
            Plain::Array(items) => {
                Dynamic::from_array(items.into_iter().map(Plain::into_dynamic).collect())
            }
            Plain::Map(entries) => Dynamic::from_map(
                entries
                    .into_iter()
                    .map(|(k, v)| (k.into(), v.into_dynamic()))
                    .collect(),
            ),
            Plain::Shape(shape) => Dynamic::from(Solid::measure(shape)),
        }
    }
}

fn line_column(position: Position) -> (u32, u32) {
    (
        position.line().unwrap_or(0) as u32,
        position.position().unwrap_or(0) as u32,
    )
}

fn at(file: &str, position: Position, kind: DiagnosticKind, message: String) -> Diagnostic {
    let (line, column) = line_column(position);
    Diagnostic {
        file: file.to_string(),
        line,
        column,
        message,
        kind,
    }
}

/// What a compile stopped by [`over_budget`] for `reason` is told.
fn stopped(reason: &str, budget: &Budget) -> String {
    if reason == MEMORY_TOKEN {
        format!(
            "the compile held more than {} bytes (BRANCHD_COMPILE_MAX_MEMORY): build less",
            budget.limits.max_memory
        )
    } else {
        format!(
            "the compile ran out of time ({} ms, BRANCHD_COMPILE_TIMEOUT)",
            budget.limits.timeout.as_millis()
        )
    }
}

/// A runtime error as a diagnostic: unwrapped to its cause, placed in the
/// file and at the line where it happened (inside an imported function,
/// that function's file), with the calls that led there named.
fn runtime(file: &str, err: &EvalAltResult, budget: &Budget) -> Diagnostic {
    let mut file = file.to_string();
    let mut err = err;
    let mut calls = Vec::new();
    loop {
        match err {
            EvalAltResult::ErrorInFunctionCall(name, source, inner, _) => {
                calls.push(name.clone());
                if !source.is_empty() {
                    file = source.clone();
                }
                err = inner;
            }
            EvalAltResult::ErrorInModule(_, inner, _) => err = inner,
            _ => break,
        }
    }
    let limits = &budget.limits;
    let (kind, message) = match err {
        EvalAltResult::ErrorTooManyOperations(_) => (
            DiagnosticKind::Limit,
            format!(
                "the script ran more than {} operations (BRANCHD_COMPILE_MAX_OPERATIONS): is there an endless loop?",
                limits.max_operations
            ),
        ),
        EvalAltResult::ErrorStackOverflow(_) => (
            DiagnosticKind::Limit,
            format!(
                "calls nest deeper than {} (BRANCHD_COMPILE_MAX_CALL_DEPTH): is there an endless recursion?",
                limits.max_call_depth
            ),
        ),
        EvalAltResult::ErrorTerminated(token, _) => {
            let reason = token.clone().into_string().unwrap_or_default();
            (DiagnosticKind::Limit, stopped(&reason, budget))
        }
        EvalAltResult::ErrorTooManyModules(_) => (
            DiagnosticKind::Limit,
            format!(
                "the script loads more than {} modules (BRANCHD_COMPILE_MAX_MODULES)",
                limits.max_modules
            ),
        ),
        EvalAltResult::ErrorDataTooLarge(what, _) => (
            DiagnosticKind::Limit,
            format!("{what} exceeds the node's limit"),
        ),
        EvalAltResult::ErrorParsing(parse, _) => (DiagnosticKind::Syntax, parse.to_string()),
        EvalAltResult::ErrorModuleNotFound(spec, _) => (
            DiagnosticKind::Import,
            format!("module {spec:?} is not available here: import modules at a file's top level"),
        ),
        other => (
            DiagnosticKind::Runtime,
            without_position(&other.to_string()),
        ),
    };
    let message = if calls.is_empty() {
        message
    } else {
        format!("{message} (in {})", calls.join(" ← "))
    };
    at(&file, err.position(), kind, message)
}

/// Rhai's messages end with ` (line L, position C)`; diagnostics carry
/// those as fields.
fn without_position(message: &str) -> String {
    match message.rfind(" (line ") {
        Some(cut) if message.ends_with(')') => message[..cut].to_string(),
        _ => message.to_string(),
    }
}

/// A number argument (integer or float), finite.
fn number(value: &Dynamic, what: &str) -> RhaiResult<f64> {
    let n = if let Ok(i) = value.as_int() {
        i as f64
    } else if let Ok(f) = value.as_float() {
        f
    } else {
        return Err(format!("{what} must be a number, not {}", value.type_name()).into());
    };
    if !n.is_finite() {
        return Err(format!("{what} must be finite, not {n}").into());
    }
    Ok(n)
}

fn non_negative(value: &Dynamic, what: &str) -> RhaiResult<f64> {
    let n = number(value, what)?;
    if n < 0.0 {
        return Err(format!("{what} must not be negative, not {n}").into());
    }
    Ok(n)
}

/// The CAD built-ins, with the shape limits they enforce.
fn cad_module(max_nodes: u64, max_depth: u32) -> Shared<Module> {
    let checked = move |solid: Solid| -> RhaiResult<Solid> {
        if solid.nodes > max_nodes {
            return Err(Box::new(EvalAltResult::ErrorDataTooLarge(
                format!(
                    "a shape of {} nodes (BRANCHD_COMPILE_MAX_SHAPE_NODES is {max_nodes})",
                    solid.nodes
                ),
                Position::NONE,
            )));
        }
        if solid.depth > max_depth {
            return Err(Box::new(EvalAltResult::ErrorDataTooLarge(
                format!(
                    "a shape {} levels deep (BRANCHD_COMPILE_MAX_SHAPE_DEPTH is {max_depth}; use union_all for parts made in a loop)",
                    solid.depth
                ),
                Position::NONE,
            )));
        }
        Ok(solid)
    };
    let mut module = Module::new();
    module.set_native_fn("cube", |x: Dynamic, y: Dynamic, z: Dynamic| {
        Ok(Solid::primitive(Shape::Cube {
            size: [
                non_negative(&x, "cube's x")?,
                non_negative(&y, "cube's y")?,
                non_negative(&z, "cube's z")?,
            ],
        }))
    });
    module.set_native_fn("sphere", |r: Dynamic| {
        Ok(Solid::primitive(Shape::Sphere {
            radius: non_negative(&r, "sphere's radius")?,
        }))
    });
    module.set_native_fn("cylinder", |r: Dynamic, h: Dynamic| {
        Ok(Solid::primitive(Shape::Cylinder {
            radius: non_negative(&r, "cylinder's radius")?,
            height: non_negative(&h, "cylinder's height")?,
        }))
    });
    module.set_native_fn(
        "translate",
        move |s: Solid, x: Dynamic, y: Dynamic, z: Dynamic| {
            let offset = [number(&x, "x")?, number(&y, "y")?, number(&z, "z")?];
            checked(Solid::node(
                |mut c| Shape::Translate {
                    offset,
                    child: c.remove(0),
                },
                &[&s],
            ))
        },
    );
    module.set_native_fn(
        "rotate",
        move |s: Solid, x: Dynamic, y: Dynamic, z: Dynamic| {
            let degrees = [number(&x, "ax")?, number(&y, "ay")?, number(&z, "az")?];
            checked(Solid::node(
                |mut c| Shape::Rotate {
                    degrees,
                    child: c.remove(0),
                },
                &[&s],
            ))
        },
    );
    module.set_native_fn("scale", move |s: Solid, f: Dynamic| {
        let factor = number(&f, "the scale factor")?;
        checked(Solid::node(
            |mut c| Shape::Scale {
                factor,
                child: c.remove(0),
            },
            &[&s],
        ))
    });
    module.set_native_fn("union", move |a: Solid, b: Solid| {
        checked(Solid::node(|children| Shape::Union { children }, &[&a, &b]))
    });
    module.set_native_fn("difference", move |a: Solid, b: Solid| {
        checked(Solid::node(
            |children| Shape::Difference { children },
            &[&a, &b],
        ))
    });
    module.set_native_fn("intersection", move |a: Solid, b: Solid| {
        checked(Solid::node(
            |children| Shape::Intersection { children },
            &[&a, &b],
        ))
    });
    module.set_native_fn("union_all", move |parts: rhai::Array| {
        let solids = parts
            .into_iter()
            .map(|p| {
                let name = p.type_name().to_string();
                p.try_cast::<Solid>()
                    .ok_or_else(|| format!("union_all takes an array of shapes; it holds a {name}"))
            })
            .collect::<Result<Vec<_>, _>>()?;
        if solids.is_empty() {
            return Err("union_all needs at least one shape".into());
        }
        let refs: Vec<&Solid> = solids.iter().collect();
        checked(Solid::node(|children| Shape::Union { children }, &refs))
    });
    // `replace` can make one string far larger than those it is given
    // (each match of a short string replaced by a long one, quadratic in
    // the worst case): the result's size is checked before it is built,
    // where the engine would check it only after. These shadow the
    // standard library's `replace` (modules registered later win).
    module.set_native_fn(
        "replace",
        |cx: NativeCallContext, text: &mut ImmutableString, find: &str, with: &str| {
            let found = text.matches(find).count();
            replaced_fits(&cx, text.len(), found, find.len(), with.len())?;
            *text = text.replace(find, with).into();
            Ok(())
        },
    );
    module.set_native_fn(
        "replace",
        |cx: NativeCallContext, text: &mut ImmutableString, find: char, with: &str| {
            let found = text.matches(find).count();
            replaced_fits(&cx, text.len(), found, find.len_utf8(), with.len())?;
            *text = text.replace(find, with).into();
            Ok(())
        },
    );
    module.build_index();
    Shared::new(module)
}

/// `ErrorDataTooLarge` if replacing `found` matches of `find` bytes with
/// `with` bytes in a string of `len` bytes would make it longer than the
/// engine's string limit.
fn replaced_fits(
    cx: &NativeCallContext,
    len: usize,
    found: usize,
    find: usize,
    with: usize,
) -> RhaiResult<()> {
    let max = cx.engine().max_string_size();
    let after = len
        .saturating_sub(found.saturating_mul(find))
        .saturating_add(found.saturating_mul(with));
    if max > 0 && after > max {
        return Err(Box::new(EvalAltResult::ErrorDataTooLarge(
            format!("a string of {after} bytes (BRANCHD_COMPILE_MAX_STRING is {max})"),
            cx.call_position(),
        )));
    }
    Ok(())
}
