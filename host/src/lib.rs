//! One registry over the three plugin tiers (DESIGN.md, "Plugin tiers").
//!
//! Every tier ends up as the same trait object, so the rest of fusellm calls a WASM
//! component exactly as it calls a built-in; the registry adds what no plugin may skip:
//! unique names, parameter resolution, and checks of every input and output.

pub mod bench;
mod builtin;
pub mod conformance;
mod dylib;
mod wasm;

use std::collections::BTreeMap;
use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use fusellm_sdk::export::catch_panics;
use fusellm_sdk::suggest::did_you_mean;
use fusellm_sdk::{
    check_fused, Alignment, CheckpointFiles, Cooccurrence, FusedTarget, FusionFn, FusionInput, ModelAdapter, ModelSpec,
    ParamError, ParamValue, Params, PluginInfo, PluginKind, SequenceAligner, TokenStrings, Tokenization, VocabMap,
    VocabMapper,
};

pub use fusellm_files::default_cache_dir;
pub use wasm::{WasmHost, WasmLimits};

/// Where a plugin comes from.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Tier {
    Builtin,
    Dylib,
    Wasm,
}

impl Tier {
    pub fn as_str(self) -> &'static str {
        match self {
            Tier::Builtin => "builtin",
            Tier::Dylib => "dylib",
            Tier::Wasm => "wasm",
        }
    }

    /// The tier of a plugin file, from its extension.
    pub fn of_file(path: &Path) -> Result<Tier, PluginError> {
        match path.extension().and_then(|e| e.to_str()) {
            Some("wasm") => Ok(Tier::Wasm),
            Some("so" | "dylib" | "dll") => Ok(Tier::Dylib),
            _ => Err(PluginError::new(format!(
                "{}: a plugin file is a WASM component (.wasm) or a shared library (.so, .dylib, .dll)",
                path.display()
            ))),
        }
    }
}

impl fmt::Display for Tier {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A plugin failure, phrased for the user: which plugin, what went wrong, what to do.
#[derive(Clone, Debug, PartialEq)]
pub struct PluginError {
    pub message: String,
}

impl PluginError {
    pub fn new(message: impl Into<String>) -> Self {
        Self { message: message.into() }
    }
}

impl fmt::Display for PluginError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.message)
    }
}

impl std::error::Error for PluginError {}

/// One registered plugin.
#[derive(Clone)]
pub struct Entry {
    pub info: PluginInfo,
    pub tier: Tier,
    /// The crate of a built-in, or the file a dylib or component was loaded from.
    pub origin: String,
    handle: Handle,
}

/// A plugin with its parameters resolved against its schema: what a stage calls, carried
/// together from the config (or the command line) to the call.
#[derive(Clone)]
pub struct Configured<'r> {
    pub entry: &'r Entry,
    pub params: Params,
}

impl<'r> Configured<'r> {
    /// `entry` with the parameters `given` (the rest at their defaults).
    pub fn new(entry: &'r Entry, given: &BTreeMap<String, ParamValue>) -> Result<Self, ParamError> {
        Ok(Self { entry, params: entry.resolve_params(given)? })
    }

    /// The registered plugin `name` of `kind` with its default parameters.
    pub fn named(registry: &'r Registry, kind: PluginKind, name: &str) -> Result<Self, PluginError> {
        let entry = registry.get(kind, name)?;
        Self::new(entry, &BTreeMap::new()).map_err(|e| PluginError::new(e.message))
    }

    /// What identifies its behaviour in a cache key: name, version and parameters.
    pub fn id(&self) -> String {
        let info = &self.entry.info;
        format!("{}@{}:{}", info.name, info.version, serde_json::to_string(&self.params).expect("JSON"))
    }
}

/// What a plugin is called through: one handle per kind, whatever its tier.
#[derive(Clone)]
enum Handle {
    Adapter(Arc<dyn ModelAdapter>),
    SequenceAligner(Arc<dyn SequenceAligner>),
    VocabMapper(Arc<dyn VocabMapper>),
    Fusion(Arc<dyn FusionFn>),
}

impl Handle {
    /// The handle of a plugin linked into this binary.
    fn builtin(plugin: fusellm_sdk::Plugin) -> Self {
        match plugin {
            fusellm_sdk::Plugin::Adapter(p) => Handle::Adapter(Arc::new(p)),
            fusellm_sdk::Plugin::SequenceAligner(p) => Handle::SequenceAligner(Arc::new(p)),
            fusellm_sdk::Plugin::VocabMapper(p) => Handle::VocabMapper(Arc::new(p)),
            fusellm_sdk::Plugin::Fusion(p) => Handle::Fusion(Arc::new(p)),
        }
    }

    /// The handle of a plugin inside a dylib or component, of the kind it declares.
    fn remote<P: FusionFn + ModelAdapter + SequenceAligner + VocabMapper + 'static>(plugin: P) -> Self {
        match FusionFn::info(&plugin).kind {
            PluginKind::Adapter => Handle::Adapter(Arc::new(plugin)),
            PluginKind::SequenceAligner => Handle::SequenceAligner(Arc::new(plugin)),
            PluginKind::VocabMapper => Handle::VocabMapper(Arc::new(plugin)),
            PluginKind::Fusion => Handle::Fusion(Arc::new(plugin)),
        }
    }
}

impl Entry {
    fn new(info: PluginInfo, tier: Tier, origin: String, handle: Handle) -> Result<Self, PluginError> {
        info.check().map_err(|e| PluginError::new(format!("{origin}: {e}")))?;
        Ok(Self { info, tier, origin, handle })
    }

    /// "`min_ce` (builtin, fusellm-ce-fusion)", for messages.
    pub fn label(&self) -> String {
        format!("`{}` ({}, {})", self.info.name, self.tier, self.origin)
    }

    /// Checks configured parameters against the plugin's schema and fills in defaults.
    pub fn resolve_params(&self, given: &BTreeMap<String, ParamValue>) -> Result<Params, ParamError> {
        Params::resolve(&self.info.params, given)
            .map_err(|e| ParamError { message: format!("plugin `{}`: {}", self.info.name, e.message), param: e.param })
    }

    /// Runs an adapter on a checkpoint's files and checks the spec it returns.
    pub fn adapt(&self, params: &Params, files: CheckpointFiles<'_>) -> Result<ModelSpec, PluginError> {
        let Handle::Adapter(adapter) = &self.handle else { return Err(self.not_a(PluginKind::Adapter)) };
        let spec = catch_panics(|| adapter.spec(params, files))
            .map_err(|e| PluginError::new(format!("adapter {}: {e}", self.label())))?;
        spec.check().map_err(|e| PluginError::new(format!("adapter {} returned a bad spec: {e}", self.label())))?;
        Ok(spec)
    }

    /// Aligns two tokenizations with a sequence aligner.
    pub fn align(&self, params: &Params, a: Tokenization<'_>, b: Tokenization<'_>) -> Result<Alignment, PluginError> {
        let Handle::SequenceAligner(aligner) = &self.handle else {
            return Err(self.not_a(PluginKind::SequenceAligner));
        };
        let alignment = catch_panics(|| aligner.align(params, a, b))
            .map_err(|e| PluginError::new(format!("aligner {} failed: {e}", self.label())))?;
        let monotone = alignment.a.windows(2).zip(alignment.b.windows(2)).all(|(x, y)| x[0] <= x[1] && y[0] <= y[1]);
        let in_range =
            alignment.a.iter().all(|&i| (i as usize) < a.len()) && alignment.b.iter().all(|&j| (j as usize) < b.len());
        if alignment.a.len() != alignment.b.len() || !monotone || !in_range {
            return Err(PluginError::new(format!(
                "aligner {} returned a path that is not monotone and in range",
                self.label()
            )));
        }
        Ok(alignment)
    }

    /// Maps one vocabulary onto another with a vocabulary mapper.
    pub fn map_vocab(
        &self,
        params: &Params,
        source: TokenStrings<'_>,
        target: TokenStrings<'_>,
        cooccurrence: Cooccurrence<'_>,
    ) -> Result<VocabMap, PluginError> {
        let Handle::VocabMapper(mapper) = &self.handle else { return Err(self.not_a(PluginKind::VocabMapper)) };
        catch_panics(|| mapper.map_vocab(params, source, target, cooccurrence))
            .map_err(|e| PluginError::new(format!("vocabulary mapper {} failed: {e}", self.label())))
    }

    /// Runs a fusion plugin on one document, checking the input before and the output
    /// after: a plugin's bad output is an error naming it, never a silent corruption.
    pub fn fuse(&self, params: &Params, input: &FusionInput<'_>) -> Result<FusedTarget, PluginError> {
        let fusion = self.fusion()?;
        input.check().map_err(|e| PluginError::new(format!("input to {}: {e}", self.label())))?;
        let fused = catch_panics(|| fusion.fuse(params, input))
            .map_err(|e| PluginError::new(format!("fusion plugin {} failed: {e}", self.label())))?;
        check_fused(&fused, input.positions())
            .map_err(|e| PluginError::new(format!("fusion plugin {} returned a bad target: {e}", self.label())))?;
        Ok(fused)
    }

    fn fusion(&self) -> Result<&dyn FusionFn, PluginError> {
        match &self.handle {
            Handle::Fusion(f) => Ok(f.as_ref()),
            _ => Err(self.not_a(PluginKind::Fusion)),
        }
    }

    fn not_a(&self, kind: PluginKind) -> PluginError {
        PluginError::new(format!("{} is {}, not {}", self.label(), with_article(self.info.kind), with_article(kind)))
    }
}

/// The plugins fusellm knows, by name (unique across kinds and tiers).
pub struct Registry {
    entries: Vec<Entry>,
    loaded_files: Vec<PathBuf>,
    wasm: Option<WasmHost>,
    wasm_limits: WasmLimits,
}

impl Registry {
    /// A registry holding every built-in plugin linked into this binary.
    pub fn with_builtins() -> Result<Self, PluginError> {
        let mut registry = Self::empty();
        for entry in builtin::entries()? {
            registry.register(entry)?;
        }
        Ok(registry)
    }

    pub fn empty() -> Self {
        Self { entries: Vec::new(), loaded_files: Vec::new(), wasm: None, wasm_limits: WasmLimits::default() }
    }

    /// Sets the sandbox limits of WASM plugins loaded from now on.
    pub fn set_wasm_limits(&mut self, limits: WasmLimits) {
        if self.wasm_limits != limits {
            self.wasm_limits = limits;
            self.wasm = None;
        }
    }

    pub fn entries(&self) -> &[Entry] {
        &self.entries
    }

    /// Loads every plugin of a dylib or WASM component; a file already loaded is skipped.
    /// Returns the names it holds.
    pub fn load_file(&mut self, tier: Tier, path: &Path) -> Result<Vec<String>, PluginError> {
        let canonical = readable_file(path)?;
        if !self.loaded_files.contains(&canonical) {
            let entries = match tier {
                Tier::Wasm => self.wasm_host()?.load(&canonical)?,
                Tier::Dylib => dylib::load(&canonical)?,
                Tier::Builtin => return Err(PluginError::new("built-in plugins are linked in, not loaded from files")),
            };
            // All names are checked first, so that a clash leaves nothing of the file behind.
            for (i, entry) in entries.iter().enumerate() {
                self.check_free(entry)?;
                if let Some(twin) = entries[..i].iter().find(|e| e.info.name == entry.info.name) {
                    return Err(clash(twin, entry));
                }
            }
            self.entries.extend(entries);
            self.loaded_files.push(canonical.clone());
        }
        let origin = canonical.display().to_string();
        Ok(self.entries.iter().filter(|e| e.origin == origin).map(|e| e.info.name.clone()).collect())
    }

    fn wasm_host(&mut self) -> Result<&WasmHost, PluginError> {
        if self.wasm.is_none() {
            self.wasm = Some(WasmHost::new(self.wasm_limits.clone())?);
        }
        Ok(self.wasm.as_ref().expect("just created"))
    }

    /// Adds one plugin; a second plugin under a taken name is refused, naming both.
    pub fn register(&mut self, entry: Entry) -> Result<(), PluginError> {
        self.check_free(&entry)?;
        self.entries.push(entry);
        Ok(())
    }

    fn check_free(&self, entry: &Entry) -> Result<(), PluginError> {
        match self.entries.iter().find(|e| e.info.name == entry.info.name) {
            Some(taken) => Err(clash(taken, entry)),
            None => Ok(()),
        }
    }

    /// The adapter for a config.json `model_type`: the first registered adapter that
    /// declares it (built-ins are registered first, in name order).
    pub fn adapter_for(&self, model_type: &str) -> Result<&Entry, PluginError> {
        let adapters = || self.entries.iter().filter(|e| e.info.kind == PluginKind::Adapter);
        adapters().find(|e| e.info.handles.iter().any(|h| h == model_type)).ok_or_else(|| {
            let known: std::collections::BTreeSet<String> = adapters().flat_map(|e| e.info.handles.clone()).collect();
            let known: Vec<String> = known.into_iter().collect();
            PluginError::new(format!(
                "no adapter understands model_type `{model_type}`{}; known: {}; load an adapter plugin for it",
                did_you_mean(model_type, known.iter().map(String::as_str)),
                if known.is_empty() { "none".to_string() } else { known.join(", ") }
            ))
        })
    }

    /// Loads plugin files, each of the tier its extension says (`.wasm`; `.so`, `.dylib`,
    /// `.dll`): the command line's `--plugin`.
    pub fn load_files(&mut self, files: &[PathBuf]) -> Result<(), PluginError> {
        for file in files {
            self.load_file(Tier::of_file(file)?, file)?;
        }
        Ok(())
    }

    /// The plugin `name` of `kind`; an unknown name gets the nearest known one suggested.
    /// The plugin called `name`, whatever its kind (names are unique across kinds).
    pub fn find(&self, name: &str) -> Result<&Entry, PluginError> {
        self.entries.iter().find(|e| e.info.name == name).ok_or_else(|| {
            let known = self.entries.iter().map(|e| e.info.name.as_str());
            PluginError::new(format!("unknown plugin `{name}`{}", did_you_mean(name, known)))
        })
    }

    pub fn get(&self, kind: PluginKind, name: &str) -> Result<&Entry, PluginError> {
        match self.entries.iter().find(|e| e.info.name == name) {
            Some(e) if e.info.kind == kind => Ok(e),
            Some(e) => Err(e.not_a(kind)),
            None => {
                let known: Vec<&str> =
                    self.entries.iter().filter(|e| e.info.kind == kind).map(|e| e.info.name.as_str()).collect();
                Err(PluginError::new(format!(
                    "unknown {kind} plugin `{name}`{}; known {kind} plugins: {}",
                    did_you_mean(name, known.iter().copied()),
                    if known.is_empty() { "none".to_string() } else { known.join(", ") }
                )))
            }
        }
    }
}

/// "a fusion plugin", "an adapter plugin".
fn with_article(kind: PluginKind) -> String {
    let name = kind.to_string();
    let article = if name.starts_with(['a', 'e', 'i', 'o', 'u']) { "an" } else { "a" };
    format!("{article} {name} plugin")
}

/// Canonical path of a plugin file that exists and can be read.
fn readable_file(path: &Path) -> Result<PathBuf, PluginError> {
    let canonical = path.canonicalize().map_err(|e| {
        PluginError::new(format!(
            "plugin file {} not found ({e}); check the path, or build the plugin first",
            path.display()
        ))
    })?;
    if !canonical.is_file() {
        return Err(PluginError::new(format!("plugin file {} cannot be read: it is not a file", path.display())));
    }
    std::fs::File::open(&canonical)
        .map_err(|e| PluginError::new(format!("plugin file {} cannot be read: {e}", path.display())))?;
    Ok(canonical)
}

fn clash(taken: &Entry, entry: &Entry) -> PluginError {
    PluginError::new(format!(
        "two plugins register the name `{}`: {} and {}; rename one of them",
        entry.info.name,
        taken.label(),
        entry.label()
    ))
}
