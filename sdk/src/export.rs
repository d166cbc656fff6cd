//! What a plugin crate exports, and the one data path that every tier's glue shares.

use std::collections::BTreeMap;

use crate::adapter::{CheckpointFiles, ModelAdapter};
use crate::aligner::{Alignment, Cooccurrence, SequenceAligner, TokenStrings, Tokenization, VocabMap, VocabMapper};
use crate::data::{FusedTarget, FusionInput};
use crate::fusion::FusionFn;
use crate::params::{ParamValue, Params};
use crate::plugin::PluginInfo;

/// One plugin as a crate exports it with [`export_plugins!`](crate::export_plugins).
#[derive(Clone, Copy)]
pub enum Plugin {
    Fusion(&'static dyn FusionFn),
    SequenceAligner(&'static dyn SequenceAligner),
    VocabMapper(&'static dyn VocabMapper),
    Adapter(&'static dyn ModelAdapter),
}

impl Plugin {
    pub fn info(&self) -> PluginInfo {
        match self {
            Plugin::Fusion(p) => p.info(),
            Plugin::SequenceAligner(p) => p.info(),
            Plugin::VocabMapper(p) => p.info(),
            Plugin::Adapter(p) => p.info(),
        }
    }
}

/// The plugins of one crate linked into the host (the builtin tier); collected with
/// `inventory`, so a built-in crate registers itself by being linked.
#[cfg(not(target_arch = "wasm32"))]
pub struct BuiltinSet {
    pub crate_name: &'static str,
    pub plugins: &'static [Plugin],
}

#[cfg(not(target_arch = "wasm32"))]
inventory::collect!(BuiltinSet);

/// Every built-in plugin set linked into this binary.
#[cfg(not(target_arch = "wasm32"))]
pub fn builtin_sets() -> impl Iterator<Item = &'static BuiltinSet> {
    inventory::iter::<BuiltinSet>.into_iter()
}

/// The manifest a dylib or component reports: its plugins' descriptions as JSON.
pub fn manifest_json(plugins: &[Plugin]) -> String {
    let infos: Vec<PluginInfo> = plugins.iter().map(Plugin::info).collect();
    serde_json::to_string(&infos).expect("plugin descriptions serialise")
}

/// Runs fusion plugin `name` on behalf of a host across a boundary: the parameters arrive
/// as JSON and are resolved against the plugin's schema again, the input is checked.
pub fn fuse_by_name(
    plugins: &[Plugin],
    name: &str,
    params_json: &str,
    input: &FusionInput<'_>,
) -> Result<FusedTarget, String> {
    let (plugin, params) = find(plugins, "fusion", name, params_json, |p| match p {
        Plugin::Fusion(f) => Some(*f),
        _ => None,
    })?;
    input.check()?;
    plugin.fuse(&params, input)
}

/// Runs adapter `name` on behalf of a host across a boundary; the spec returns as JSON.
pub fn adapt_by_name(
    plugins: &[Plugin],
    name: &str,
    params_json: &str,
    files: CheckpointFiles<'_>,
) -> Result<String, String> {
    let (adapter, params) = find(plugins, "adapter", name, params_json, |p| match p {
        Plugin::Adapter(a) => Some(*a),
        _ => None,
    })?;
    let spec = adapter.spec(&params, files)?;
    Ok(serde_json::to_string(&spec).expect("model specs serialise"))
}

/// Runs sequence aligner `name` on behalf of a host across a boundary.
pub fn align_by_name(
    plugins: &[Plugin],
    name: &str,
    params_json: &str,
    a: Tokenization<'_>,
    b: Tokenization<'_>,
) -> Result<Alignment, String> {
    let (aligner, params) = find(plugins, "sequence aligner", name, params_json, |p| match p {
        Plugin::SequenceAligner(a) => Some(*a),
        _ => None,
    })?;
    aligner.align(&params, a, b)
}

/// Runs vocabulary mapper `name` on behalf of a host across a boundary.
pub fn map_vocab_by_name(
    plugins: &[Plugin],
    name: &str,
    params_json: &str,
    source: TokenStrings<'_>,
    target: TokenStrings<'_>,
    cooccurrence: Cooccurrence<'_>,
) -> Result<VocabMap, String> {
    let (mapper, params) = find(plugins, "vocabulary mapper", name, params_json, |p| match p {
        Plugin::VocabMapper(m) => Some(*m),
        _ => None,
    })?;
    mapper.map_vocab(&params, source, target, cooccurrence)
}

/// The plugin `name` among those `pick` accepts, with the parameters (JSON, from the host)
/// resolved against its schema once more.
fn find<T>(
    plugins: &[Plugin],
    kind: &str,
    name: &str,
    params_json: &str,
    pick: impl Fn(&Plugin) -> Option<T>,
) -> Result<(T, Params), String> {
    let (info, plugin) = plugins
        .iter()
        .map(|p| (p.info(), p))
        .filter(|(info, _)| info.name == name)
        .find_map(|(info, p)| pick(p).map(|found| (info, found)))
        .ok_or_else(|| format!("this library has no {kind} plugin `{name}`"))?;
    let given: BTreeMap<String, ParamValue> =
        serde_json::from_str(params_json).map_err(|e| format!("parameters of `{}`: {e}", info.name))?;
    let params = Params::resolve(&info.params, &given).map_err(|e| e.message)?;
    Ok((plugin, params))
}

/// Runs `f`, turning a panic into an error: a plugin's panic must never unwind into (or
/// across the ABI to) the host.
pub fn catch_panics<T>(f: impl FnOnce() -> Result<T, String>) -> Result<T, String> {
    std::panic::catch_unwind(std::panic::AssertUnwindSafe(f))
        .unwrap_or_else(|payload| Err(format!("plugin panicked: {}", panic_message(&*payload))))
}

/// Resolved parameters as the JSON object that crosses a dylib or WASM boundary.
pub fn params_json(params: &Params) -> String {
    serde_json::to_string(&params.0).expect("parameters serialise")
}

/// The message of a caught panic payload.
fn panic_message(payload: &(dyn std::any::Any + Send)) -> String {
    payload
        .downcast_ref::<&str>()
        .map(|s| s.to_string())
        .or_else(|| payload.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "a panic with a non-string payload".into())
}
