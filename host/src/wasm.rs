//! The WASM tier: WebAssembly components of the world in sdk/wit/plugin.wit, run by
//! wasmtime in a sandbox: an epoch deadline per call, a memory cap, and a WASI context
//! with no file system, network, environment or arguments. An instance serves one call at
//! a time and is reused while calls succeed (its grown memory and warm pages are most of
//! the fixed cost of a call); after any failure it is dropped, so a trap cannot outlive
//! its call. Compiled components are cached on disk.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use fusellm_files::{read_cache, sha256_hex, write_cache};
use fusellm_sdk::export::params_json;
use fusellm_sdk::{
    Alignment, CheckpointFiles, Cooccurrence, FusedTarget, FusionFn, FusionInput, ModelAdapter, ModelSpec, Params,
    PluginInfo, SequenceAligner, TokenStrings, Tokenization, VocabMap, VocabMapper,
};
use wasmtime::component::{Component, Linker, ResourceTable};
use wasmtime::{Config, Engine, ResourceLimiter, Store, Trap};
use wasmtime_wasi::p2::pipe::MemoryOutputPipe;
use wasmtime_wasi::{WasiCtx, WasiCtxBuilder, WasiCtxView, WasiView};

use super::dylib::{parse_manifest, parse_spec};
use super::{Entry, Handle, PluginError, Tier};

mod bindings {
    wasmtime::component::bindgen!({ world: "plugin", path: "../sdk/wit/plugin.wit" });
}

use bindings::fusellm::plugin::types as wit;
use bindings::{Plugin, PluginPre};

/// The sandbox of every WASM call.
#[derive(Clone, Debug, PartialEq)]
pub struct WasmLimits {
    /// Wall-clock limit of one call (an epoch deadline).
    pub deadline: Duration,
    /// Cap on the component's linear memory.
    pub memory_bytes: usize,
    /// Where compiled components are cached (`None`: no cache).
    pub cache_dir: Option<PathBuf>,
}

impl Default for WasmLimits {
    fn default() -> Self {
        Self { deadline: Duration::from_secs(30), memory_bytes: 1 << 30, cache_dir: fusellm_files::default_cache_dir() }
    }
}

/// How much of a plugin's stderr is kept (for the messages of its panics).
const STDERR_CAPACITY: usize = 64 << 10;

/// How often the epoch advances; deadlines are counted in these ticks.
const TICK: Duration = Duration::from_millis(5);

/// The engine and linker that every component of a registry shares.
pub struct WasmHost {
    engine: Engine,
    linker: Linker<Sandbox>,
    limits: WasmLimits,
}

/// Per-call state: WASI with nothing granted, stderr captured for error messages, and the
/// memory cap (recording whether it was hit, to tell that apart from other traps).
struct Sandbox {
    wasi: WasiCtx,
    table: ResourceTable,
    stderr: MemoryOutputPipe,
    memory_cap: usize,
    memory_denied: bool,
}

impl WasiView for Sandbox {
    fn ctx(&mut self) -> WasiCtxView<'_> {
        WasiCtxView { ctx: &mut self.wasi, table: &mut self.table }
    }
}

impl ResourceLimiter for Sandbox {
    fn memory_growing(&mut self, _current: usize, desired: usize, _maximum: Option<usize>) -> wasmtime::Result<bool> {
        let allowed = desired <= self.memory_cap;
        self.memory_denied |= !allowed;
        Ok(allowed)
    }

    fn table_growing(&mut self, _current: usize, desired: usize, _maximum: Option<usize>) -> wasmtime::Result<bool> {
        Ok(desired <= 1 << 20)
    }
}

fn host_error(context: &str, e: impl std::fmt::Display) -> PluginError {
    PluginError::new(format!("{context}: {e}"))
}

impl WasmHost {
    pub fn new(limits: WasmLimits) -> Result<Self, PluginError> {
        let mut config = Config::new();
        config.epoch_interruption(true);
        let engine = Engine::new(&config).map_err(|e| host_error("starting the WASM engine", e))?;
        let mut linker = Linker::new(&engine);
        wasmtime_wasi::p2::add_to_linker_sync(&mut linker).map_err(|e| host_error("linking WASI", e))?;
        spawn_ticker(&engine);
        Ok(Self { engine, linker, limits })
    }

    /// Compiles (or fetches from the cache) a component and registers its plugins.
    pub(super) fn load(&self, path: &Path) -> Result<Vec<Entry>, PluginError> {
        let bytes = std::fs::read(path).map_err(|e| host_error(&format!("reading {}", path.display()), e))?;
        let component = self.compile(path, &bytes)?;
        let pre = self.linker.instantiate_pre(&component).and_then(PluginPre::new).map_err(|e| {
            host_error(
                &format!("{} is not a fusellm plugin component (world fusellm:plugin/plugin)", path.display()),
                first_line(&e),
            )
        })?;
        let loaded = Arc::new(Loaded {
            pre,
            engine: self.engine.clone(),
            limits: self.limits.clone(),
            path: path.to_owned(),
            idle: Mutex::new(None),
        });
        let manifest = loaded.call(|plugin, store| plugin.call_manifest(store))?;
        parse_manifest(path, &manifest)?
            .into_iter()
            .map(|info| {
                let handle = Handle::remote(WasmPlugin { loaded: loaded.clone(), info: info.clone() });
                Entry::new(info, Tier::Wasm, path.display().to_string(), handle)
            })
            .collect()
    }

    fn compile(&self, path: &Path, bytes: &[u8]) -> Result<Component, PluginError> {
        let cached = self.limits.cache_dir.as_ref().map(|dir| dir.join("wasm").join(self.cache_key(bytes)));
        if let Some(data) = cached.as_ref().and_then(|f| read_cache(f)) {
            // SAFETY: a .cwasm is native code that runs outside the sandbox, so the cache
            // folder is trusted as the fusellm binary is (it is created private to the user);
            // its hash was checked as read, wasmtime's header check rejects files of another
            // engine or version, and a file that fails either is recompiled below.
            if let Ok(component) = unsafe { Component::deserialize(&self.engine, &data) } {
                return Ok(component);
            }
        }
        let component = Component::new(&self.engine, bytes).map_err(|e| {
            host_error(&format!("{} is not a valid WebAssembly component", path.display()), first_line(&e))
        })?;
        if let Some(file) = cached {
            // The cache only saves time: failing to write it is not an error.
            let _ = component.serialize().map(|data| write_cache(&file, &data));
        }
        Ok(component)
    }

    fn cache_key(&self, bytes: &[u8]) -> String {
        use std::hash::{Hash, Hasher};
        let mut engine_hash = std::collections::hash_map::DefaultHasher::new();
        self.engine.precompile_compatibility_hash().hash(&mut engine_hash);
        format!("{}-{:016x}.cwasm", &sha256_hex(bytes)[..32], engine_hash.finish())
    }
}

/// Advances the engine's epoch until the engine is dropped.
fn spawn_ticker(engine: &Engine) {
    let weak = engine.weak();
    std::thread::spawn(move || {
        while let Some(engine) = weak.upgrade() {
            engine.increment_epoch();
            drop(engine);
            std::thread::sleep(TICK);
        }
    });
}

fn first_line(e: &impl std::fmt::Display) -> String {
    format!("{e:#}").lines().next().unwrap_or_default().to_string()
}

/// A compiled component ready to instantiate, and its idle instance.
struct Loaded {
    pre: PluginPre<Sandbox>,
    engine: Engine,
    limits: WasmLimits,
    path: PathBuf,
    idle: Mutex<Option<Instance>>,
}

/// A live instance of a component with its store.
struct Instance {
    store: Store<Sandbox>,
    plugin: Plugin,
}

impl Loaded {
    /// Runs `f` inside the sandbox, turning traps into plain errors.
    fn call<T>(&self, f: impl FnOnce(&Plugin, &mut Store<Sandbox>) -> wasmtime::Result<T>) -> Result<T, PluginError> {
        let idle = self.idle.lock().unwrap_or_else(|poisoned| poisoned.into_inner()).take();
        // An instance whose captured stderr is half full is retired: a full pipe would make
        // the plugin's next write trap.
        let mut instance = match idle.filter(|i| i.store.data().stderr.contents().len() < STDERR_CAPACITY / 2) {
            Some(instance) => instance,
            None => self.instantiate()?,
        };
        instance.store.set_epoch_deadline(self.deadline_ticks());
        instance.store.data_mut().memory_denied = false;
        let result = f(&instance.plugin, &mut instance.store).map_err(|e| self.explain(&e, instance.store.data()))?;
        *self.idle.lock().unwrap_or_else(|poisoned| poisoned.into_inner()) = Some(instance);
        Ok(result)
    }

    /// The deadline in epoch ticks from now (wasmtime adds it to the current epoch).
    fn deadline_ticks(&self) -> u64 {
        let ticks = self.limits.deadline.as_nanos().div_ceil(TICK.as_nanos()).max(1);
        u64::try_from(ticks).unwrap_or(u64::MAX / 2).min(u64::MAX / 2)
    }

    fn instantiate(&self) -> Result<Instance, PluginError> {
        let stderr = MemoryOutputPipe::new(STDERR_CAPACITY);
        let sandbox = Sandbox {
            wasi: WasiCtxBuilder::new().stderr(stderr.clone()).build(),
            table: ResourceTable::new(),
            stderr,
            memory_cap: self.limits.memory_bytes,
            memory_denied: false,
        };
        let mut store = Store::new(&self.engine, sandbox);
        store.limiter(|s| s as &mut dyn ResourceLimiter);
        store.set_epoch_deadline(self.deadline_ticks());
        match self.pre.instantiate(&mut store) {
            Ok(plugin) => Ok(Instance { store, plugin }),
            Err(e) => Err(self.explain(&e, store.data())),
        }
    }

    fn explain(&self, e: &wasmtime::Error, sandbox: &Sandbox) -> PluginError {
        let file = self.path.display();
        let stderr = String::from_utf8_lossy(&sandbox.stderr.contents()).into_owned();
        let message = if sandbox.memory_denied {
            format!("{file}: exceeded the memory cap of {} MiB", self.limits.memory_bytes >> 20)
        } else if let Some(panic) = panic_report(&stderr) {
            format!("{file}: plugin panicked: {panic}")
        } else {
            match e.downcast_ref::<Trap>() {
                Some(Trap::Interrupt) => {
                    format!("{file}: exceeded the deadline of {:?} per call", self.limits.deadline)
                }
                Some(trap) => format!("{file}: {trap}"),
                None => format!("{file}: {}", first_line(e)),
            }
        };
        PluginError::new(message)
    }
}

/// The message and place of a Rust panic from what the guest wrote to stderr
/// ("thread '...' panicked at src/lib.rs:29:5:\nmessage\nnote: ...").
fn panic_report(stderr: &str) -> Option<String> {
    let mut lines = stderr.lines().skip_while(|l| !l.contains(" panicked at "));
    let place = lines.next()?.split(" panicked at ").nth(1)?.trim_end_matches(':').to_string();
    let message: Vec<&str> = lines.take_while(|l| !l.starts_with("note: ")).collect();
    Some(format!("{} (at {place})", message.join(" ")))
}

/// A plugin inside a component.
struct WasmPlugin {
    loaded: Arc<Loaded>,
    info: PluginInfo,
}

impl ModelAdapter for WasmPlugin {
    fn info(&self) -> PluginInfo {
        self.info.clone()
    }

    fn spec(&self, params: &Params, files: CheckpointFiles<'_>) -> Result<ModelSpec, String> {
        let params = params_json(params);
        let call = |plugin: &Plugin, store: &mut Store<Sandbox>| {
            plugin.call_adapt(store, &self.info.name, &params, files.config_json, files.tokenizer_json)
        };
        let json = self.loaded.call(call).map_err(|e| e.message)??;
        parse_spec(&json)
    }
}

impl SequenceAligner for WasmPlugin {
    fn info(&self) -> PluginInfo {
        self.info.clone()
    }

    fn align(&self, params: &Params, a: Tokenization<'_>, b: Tokenization<'_>) -> Result<Alignment, String> {
        let params = params_json(params);
        let (a, b) = (wit_tokenization(a), wit_tokenization(b));
        let call =
            |plugin: &Plugin, store: &mut Store<Sandbox>| plugin.call_align(store, &self.info.name, &params, &a, &b);
        let al = self.loaded.call(call).map_err(|e| e.message)??;
        Ok(Alignment { a: al.a, b: al.b, cost: al.cost })
    }
}

impl VocabMapper for WasmPlugin {
    fn info(&self) -> PluginInfo {
        self.info.clone()
    }

    fn map_vocab(
        &self,
        params: &Params,
        source: TokenStrings<'_>,
        target: TokenStrings<'_>,
        cooccurrence: Cooccurrence<'_>,
    ) -> Result<VocabMap, String> {
        let params = params_json(params);
        let (source, target) = (wit_strings(source), wit_strings(target));
        let counts = wit::Cooccurrence {
            source: cooccurrence.source.to_vec(),
            target: cooccurrence.target.to_vec(),
            count: cooccurrence.count.to_vec(),
        };
        let call = |plugin: &Plugin, store: &mut Store<Sandbox>| {
            plugin.call_map_vocab(store, &self.info.name, &params, &source, &target, &counts)
        };
        let map = self.loaded.call(call).map_err(|e| e.message)??;
        Ok(VocabMap {
            target: map.target.iter().map(|&t| (t != u32::MAX).then_some(t)).collect(),
            distance: map.distance,
        })
    }
}

fn wit_strings(t: TokenStrings<'_>) -> wit::TokenStrings {
    wit::TokenStrings { offsets: t.offsets.to_vec(), bytes: t.bytes.to_vec() }
}

fn wit_tokenization(t: Tokenization<'_>) -> wit::Tokenization {
    wit::Tokenization { strings: wit_strings(t.strings), spans: t.spans.to_vec() }
}

impl FusionFn for WasmPlugin {
    fn info(&self) -> PluginInfo {
        self.info.clone()
    }

    fn fuse(&self, params: &Params, input: &FusionInput<'_>) -> Result<FusedTarget, String> {
        let params = params_json(params);
        let input = to_wit(input);
        let result = self.loaded.call(|plugin, store| plugin.call_fuse(store, &self.info.name, &params, &input));
        let rows = result.map_err(|e| e.message)??;
        Ok(FusedTarget { offsets: rows.offsets, ids: rows.ids, values: rows.values })
    }
}

fn to_wit(input: &FusionInput<'_>) -> wit::FusionInput {
    let candidates = input
        .candidates
        .iter()
        .map(|c| wit::Candidate {
            dist: wit::SparseRows {
                offsets: c.dist.offsets.to_vec(),
                ids: c.dist.ids.to_vec(),
                values: c.dist.values.to_vec(),
            },
            ce_doc: c.ce_doc,
            ce_token: c.ce_token.to_vec(),
            tokens: c.tokens,
            is_target: c.is_target,
        })
        .collect();
    wit::FusionInput { gold: input.gold.to_vec(), text_bytes: input.text_bytes, candidates }
}
