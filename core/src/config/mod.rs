//! The experiment configuration (TOML): which plugin each stage uses, with its parameters,
//! and the sandbox of WASM plugins. Errors name the file, line and key.
//!
//! ```toml
//! [fusion]
//! plugin = "min_ce"                                          # builtin
//! # plugin = { wasm = "plugins/my_fusion.wasm", name = "entropy_weighted" }
//! # plugin = { dylib = "target/release/libmy_fusion.so", name = "my_fusion" }
//! [fusion.params]
//! granularity = "token"
//!
//! [sandbox]            # limits of WASM plugins
//! deadline_secs = 30
//! memory_mib = 1024
//! ```

mod experiment;
mod located;
mod overrides;
mod raw;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

pub use experiment::{AlignSection, DataSection, EvalSection, MergeSection, ModelRef, PathAt, RunSection};
use fusellm_sdk::{ParamValue, PluginKind};
pub use located::ConfigError;
use located::Doc;
pub use overrides::{variants, Variant};
use raw::{RawConfig, RawPlugin, RawPluginName};
use serde::Deserialize;
use toml::Spanned;

use crate::plugins::{Configured, Registry, Tier, WasmLimits};

/// A loaded configuration.
#[derive(Clone, Debug)]
pub struct Config {
    pub path: PathBuf,
    pub run: RunSection,
    pub data: Option<DataSection>,
    pub target: Option<ModelRef>,
    pub sources: Vec<ModelRef>,
    pub precompute: crate::store::Options,
    pub align: AlignSection,
    pub fusion: Option<PluginChoice>,
    pub train: Option<crate::train::TrainConfig>,
    pub merge: Option<MergeSection>,
    pub eval: Option<EvalSection>,
    pub sandbox: WasmLimits,
    /// Where the keys that later checks refer to were written.
    located: BTreeMap<&'static str, ConfigError>,
}

/// Keys whose location checks made after parsing (shapes, files) point at.
const LOCATED: &[&str] = &[
    "data.max_len",
    "train.seq_len",
    "precompute.k",
    "run.device",
    "target",
    "sources",
    "fusion",
    "train",
    "data",
    "merge",
];

/// A stage's choice of plugin, with the locations needed to point at errors found only
/// once plugins are loaded (an unknown name, a parameter of the wrong type).
#[derive(Clone, Debug)]
pub struct PluginChoice {
    pub kind: PluginKind,
    pub plugin: PluginSpec,
    pub params: BTreeMap<String, ParamValue>,
    plugin_error: ConfigError,
    param_errors: BTreeMap<String, ConfigError>,
}

/// How a config names a plugin.
#[derive(Clone, Debug, PartialEq)]
pub enum PluginSpec {
    /// A plugin already in the registry (a built-in, or one loaded from a file).
    Named(String),
    /// A plugin in a dylib or WASM component; `name` may be left out when the file holds
    /// one plugin of the kind wanted.
    File { tier: Tier, path: PathBuf, name: Option<String> },
}

impl Config {
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|e| ConfigError {
            file: path.to_owned(),
            line: 0,
            column: 0,
            key: String::new(),
            set: None,
            message: format!("cannot read the config: {e}"),
        })?;
        Self::parse(path, &text)
    }

    /// Parses config text; `path` is used in messages and to resolve relative plugin paths.
    pub fn parse(path: &Path, text: &str) -> Result<Config, ConfigError> {
        let doc = Doc::of_file(path, text);
        let root = doc.parse()?;
        Self::read(&doc, root)
    }

    /// The config of one [`Variant`] of the file `path`: the file's values with the
    /// variant's merged in, each error where its value was written.
    pub fn of_variant(path: &Path, variant: &Variant) -> Result<Config, ConfigError> {
        let doc = variant.doc(path);
        let root = variant.merged(&doc)?;
        Self::read(&doc, root)
    }

    fn read(doc: &Doc<'_>, root: Spanned<toml::de::DeTable<'_>>) -> Result<Config, ConfigError> {
        let path = doc.path;
        let raw = RawConfig::deserialize(toml::de::Deserializer::from(root.clone()))
            .map_err(|e| doc.de_error(root.get_ref(), &e))?;
        // Absolute, so that the paths a run records stay valid from any working folder.
        let parent = path.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new("."));
        let base = &crate::files::absolute(parent);
        let fusion = raw.fusion.map(|f| plugin_choice(doc, "fusion", f, PluginKind::Fusion, base)).transpose()?;
        let read = experiment::Reader { doc, base };
        let sandbox = read.sandbox(raw.sandbox)?;
        let run = read.run(path, raw.run)?;
        let sources = read.sources(raw.sources)?;
        Ok(Config {
            path: path.to_owned(),
            data: read.data(raw.data)?,
            target: read.target(raw.target)?,
            merge: read.merge(raw.merge, &sources)?,
            sources,
            precompute: read.precompute(raw.precompute)?,
            align: read.align(raw.align)?,
            fusion,
            train: read.train(raw.train, run.seed)?,
            eval: read.eval(raw.eval)?,
            run,
            sandbox,
            located: LOCATED.iter().map(|&key| (key, doc.locate(&root, key))).collect(),
        })
    }

    /// Loads the plugins this config names from files into `registry`, and checks that
    /// each is there, of its kind, and takes its parameters.
    pub fn load_plugins(&self, registry: &mut Registry) -> Result<(), ConfigError> {
        registry.set_wasm_limits(self.sandbox.clone());
        for choice in self.choices() {
            choice.load(registry)?;
        }
        Ok(())
    }

    /// An error located at dotted `key` (one of the keys checked after parsing), or at the
    /// top of the file when the key is not written.
    pub fn error_at(&self, key: &str, message: impl Into<String>) -> ConfigError {
        let at = self.located.get(key).cloned().unwrap_or_else(|| ConfigError {
            file: self.path.clone(),
            line: 1,
            column: 1,
            key: key.into(),
            set: None,
            message: String::new(),
        });
        ConfigError { message: message.into(), ..at }
    }

    pub fn choices(&self) -> impl Iterator<Item = &PluginChoice> {
        let adapters = self.target.iter().chain(&self.sources).filter_map(|m| m.adapter.as_ref());
        [&self.align.sequence, &self.align.vocab].into_iter().chain(self.fusion.iter()).chain(adapters)
    }
}

impl PluginChoice {
    /// A choice the config left to its default, located at `at`.
    fn named(kind: PluginKind, name: &str, at: ConfigError) -> Self {
        let (params, param_errors) = Default::default();
        Self { kind, plugin: PluginSpec::Named(name.into()), params, plugin_error: at, param_errors }
    }

    /// Loads the plugin (from its file if it has one), finds it, and checks the parameters
    /// against its schema: everything a run needs before any compute starts.
    pub fn load<'r>(&self, registry: &'r mut Registry) -> Result<Configured<'r>, ConfigError> {
        if let PluginSpec::File { tier, path, .. } = &self.plugin {
            registry.load_file(*tier, path).map_err(|e| self.error(e.message))?;
        }
        self.find(registry)
    }

    /// [`PluginChoice::load`] once the plugin's file is loaded.
    pub fn find<'r>(&self, registry: &'r Registry) -> Result<Configured<'r>, ConfigError> {
        let name = match &self.plugin {
            PluginSpec::Named(name) | PluginSpec::File { name: Some(name), .. } => name.clone(),
            PluginSpec::File { path, name: None, .. } => {
                let origin = std::fs::canonicalize(path).unwrap_or_else(|_| path.clone()).display().to_string();
                let names: Vec<String> =
                    registry.entries().iter().filter(|e| e.origin == origin).map(|e| e.info.name.clone()).collect();
                self.only_plugin_of_kind(registry, &names, path).map_err(|m| self.error(m))?
            }
        };
        let entry = registry.get(self.kind, &name).map_err(|e| self.error(e.message))?;
        Configured::new(entry, &self.params).map_err(|e| match self.param_errors.get(&e.param) {
            Some(place) => ConfigError { message: e.message, ..place.clone() },
            None => self.error(e.message),
        })
    }

    fn error(&self, message: String) -> ConfigError {
        ConfigError { message, ..self.plugin_error.clone() }
    }

    fn only_plugin_of_kind(&self, registry: &Registry, names: &[String], path: &Path) -> Result<String, String> {
        let of_kind: Vec<&String> = names.iter().filter(|n| registry.get(self.kind, n).is_ok()).collect();
        match of_kind.as_slice() {
            [one] => Ok((*one).clone()),
            _ => Err(format!(
                "{} holds {} {} plugins ({}); say which with `name = \"...\"`",
                path.display(),
                of_kind.len(),
                self.kind,
                names.join(", ")
            )),
        }
    }
}

/// The plugin and parameters of the section at dotted `key`.
fn plugin_choice(
    doc: &Doc<'_>,
    key: &str,
    section: Spanned<RawPlugin>,
    kind: PluginKind,
    base: &Path,
) -> Result<PluginChoice, ConfigError> {
    let span = section.span();
    let raw = section.into_inner();
    let plugin_key = format!("{key}.plugin");
    let plugin = raw.plugin.ok_or_else(|| doc.error(span, &plugin_key, "missing required key"))?;
    let mut choice = plugin_name(doc, &plugin_key, plugin, kind, base)?;
    for (name, value) in raw.params {
        let (name, at) = (name.into_inner(), value.span());
        let param_key = format!("{key}.params.{name}");
        let v = param_value(value.get_ref()).ok_or_else(|| {
            let found = value.get_ref().type_str();
            doc.error(at.clone(), &param_key, format!("a parameter is a string, number or boolean, not {found}"))
        })?;
        choice.param_errors.insert(name.clone(), doc.error(at, &param_key, ""));
        choice.params.insert(name, v);
    }
    Ok(choice)
}

/// The plugin of `kind` named at dotted `key` (a registered name, or a file), with no
/// parameters.
fn plugin_name(
    doc: &Doc<'_>,
    key: &str,
    name: Spanned<RawPluginName>,
    kind: PluginKind,
    base: &Path,
) -> Result<PluginChoice, ConfigError> {
    let at = doc.error(name.span(), key, "");
    let plugin = match name.into_inner() {
        RawPluginName::Named(name) => PluginSpec::Named(name),
        RawPluginName::File(file) => {
            let (tier, path) = match (file.wasm, file.dylib) {
                (Some(p), None) => (Tier::Wasm, p),
                (None, Some(p)) => (Tier::Dylib, p),
                _ => {
                    let message = "give exactly one of `wasm = \"file.wasm\"` or `dylib = \"libfile.so\"`";
                    return Err(ConfigError { message: message.into(), ..at });
                }
            };
            PluginSpec::File { tier, path: base.join(path), name: file.name }
        }
    };
    let (params, param_errors) = Default::default();
    Ok(PluginChoice { kind, plugin, params, plugin_error: at, param_errors })
}

/// A scalar TOML value as a plugin parameter value (`None` for arrays, tables, dates).
fn param_value(value: &toml::Value) -> Option<ParamValue> {
    match value {
        toml::Value::String(s) => Some(ParamValue::Str(s.clone())),
        toml::Value::Boolean(b) => Some(ParamValue::Bool(*b)),
        toml::Value::Integer(i) => Some(ParamValue::Int(*i)),
        toml::Value::Float(x) => Some(ParamValue::Float(*x)),
        _ => None,
    }
}
