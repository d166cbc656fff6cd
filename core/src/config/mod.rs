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

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

pub use experiment::{AlignSection, DataSection, EvalSection, ModelRef, PathAt, RunSection};
use fusellm_sdk::{ParamValue, PluginKind};
pub use located::ConfigError;
use located::{scalar, Doc, Section};
pub use overrides::{apply_overrides, variants, Variant};
use toml::de::DeValue;

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
    pub eval: Option<EvalSection>,
    pub sandbox: WasmLimits,
    /// Where the keys that later checks refer to were written.
    located: BTreeMap<&'static str, ConfigError>,
}

/// Keys whose location checks made after parsing (shapes, files) point at.
const LOCATED: &[&str] =
    &["data.max_len", "train.seq_len", "precompute.k", "run.device", "target", "sources", "fusion", "train", "data"];

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

const SECTIONS: &[&str] =
    &["run", "data", "target", "sources", "precompute", "align", "fusion", "train", "eval", "sandbox", "sweep"];

impl Config {
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|e| ConfigError {
            file: path.to_owned(),
            line: 0,
            column: 0,
            key: String::new(),
            message: format!("cannot read the config: {e}"),
        })?;
        Self::parse(path, &text)
    }

    /// Parses config text; `path` is used in messages and to resolve relative plugin paths.
    pub fn parse(path: &Path, text: &str) -> Result<Config, ConfigError> {
        let doc = Doc { path, text };
        let table = doc.parse()?;
        let root = Section::root(&doc, &table);
        root.allow_only(SECTIONS)?;
        // Absolute, so that the paths a run records stay valid from any working folder.
        let parent = path.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new("."));
        let base = &crate::files::absolute(parent);
        let fusion = root.subsection("fusion")?.map(|s| plugin_choice(&s, PluginKind::Fusion, base)).transpose()?;
        let sandbox = root.subsection("sandbox")?.map(|s| sandbox(&s)).transpose()?.unwrap_or_default();
        let read = experiment::Reader { root: &root, base };
        let run = read.run(path)?;
        Ok(Config {
            path: path.to_owned(),
            data: read.data()?,
            target: read.target()?,
            sources: read.sources()?,
            precompute: read.precompute()?,
            align: read.align()?,
            fusion,
            train: read.train(run.seed)?,
            eval: read.eval()?,
            run,
            sandbox,
            located: LOCATED.iter().map(|&key| (key, locate(&root, key))).collect(),
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

fn plugin_choice(section: &Section<'_, '_>, kind: PluginKind, base: &Path) -> Result<PluginChoice, ConfigError> {
    section.allow_only(&["plugin", "params"])?;
    let mut choice = named_plugin(section, "plugin", kind, base)?;
    if let Some(p) = section.subsection("params")? {
        for (key, value) in p.table.iter() {
            let name = key.get_ref().to_string();
            let v = scalar(value.get_ref()).ok_or_else(|| {
                p.error_at(
                    &name,
                    format!("a parameter is a string, number or boolean, not {}", value.get_ref().type_str()),
                )
            })?;
            choice.param_errors.insert(name.clone(), p.error_at(&name, ""));
            choice.params.insert(name, v);
        }
    }
    Ok(choice)
}

/// The plugin of `kind` that `key` of `section` names (a registered name, or a file), with
/// no parameters.
fn named_plugin(
    section: &Section<'_, '_>,
    key: &str,
    kind: PluginKind,
    base: &Path,
) -> Result<PluginChoice, ConfigError> {
    let value = section.required(key)?;
    let plugin = match value.get_ref() {
        DeValue::String(name) => PluginSpec::Named(name.to_string()),
        DeValue::Table(_) => plugin_file(&section.doc.section(section.path_of(key), value)?, base)?,
        other => {
            return Err(section.error_at(
                key,
                format!(
                    "expected a plugin name or {{ wasm = \"...\" }} / {{ dylib = \"...\" }}, found {}",
                    other.type_str()
                ),
            ))
        }
    };
    let (params, param_errors) = Default::default();
    Ok(PluginChoice { kind, plugin, params, plugin_error: section.error_at(key, ""), param_errors })
}

fn plugin_file(table: &Section<'_, '_>, base: &Path) -> Result<PluginSpec, ConfigError> {
    table.allow_only(&["wasm", "dylib", "name"])?;
    let name = table.string("name")?.map(str::to_string);
    let (tier, path) = match (table.string("wasm")?, table.string("dylib")?) {
        (Some(p), None) => (Tier::Wasm, p),
        (None, Some(p)) => (Tier::Dylib, p),
        _ => return Err(table.error_at("", "give exactly one of `wasm = \"file.wasm\"` or `dylib = \"libfile.so\"`")),
    };
    Ok(PluginSpec::File { tier, path: base.join(path), name })
}

fn sandbox(section: &Section<'_, '_>) -> Result<WasmLimits, ConfigError> {
    section.allow_only(&["deadline_secs", "memory_mib", "cache"])?;
    let mut limits = WasmLimits::default();
    if let Some(secs) = section.float("deadline_secs")? {
        if !(secs > 0.0 && secs < 1e6) {
            return Err(section.error_at("deadline_secs", "must be a positive number of seconds"));
        }
        limits.deadline = Duration::from_secs_f64(secs);
    }
    if let Some(mib) = section.int("memory_mib")? {
        if !(1..=1 << 20).contains(&mib) {
            return Err(section.error_at("memory_mib", "must be between 1 and 1048576 MiB"));
        }
        limits.memory_bytes = (mib as usize) << 20;
    }
    if section.bool("cache")? == Some(false) {
        limits.cache_dir = None;
    }
    Ok(limits)
}

/// The location of dotted `key` (of its innermost written section when it is not).
fn locate(root: &Section<'_, '_>, key: &str) -> ConfigError {
    match key.split_once('.') {
        Some((section, rest)) => match root.subsection(section) {
            Ok(Some(s)) if s.get(rest).is_some() => s.error_at(rest, ""),
            Ok(Some(s)) => ConfigError { key: key.into(), ..s.error_at(rest, "") },
            _ => ConfigError { key: key.into(), ..root.error_at(section, "") },
        },
        None => root.error_at(key, ""),
    }
}
