//! The experiment config as serde reads it: one struct per section, unknown keys refused
//! (`deny_unknown_fields`), each value a later check may refuse kept with where it was
//! written (`toml::Spanned`). `experiment.rs` checks the ranges and builds the typed
//! sections, with the defaults, from these.

use std::collections::BTreeMap;

use serde::Deserialize;
use toml::Spanned;

use crate::merge::Setting;
use crate::model::loss::Tail;
use crate::train::schedule::Decay;
use crate::train::Precision;

/// A string, or an array of strings.
#[derive(Deserialize)]
#[serde(untagged)]
pub enum OneOrMany {
    One(String),
    Many(Vec<String>),
}

impl OneOrMany {
    pub fn into_vec(self) -> Vec<String> {
        match self {
            OneOrMany::One(s) => vec![s],
            OneOrMany::Many(v) => v,
        }
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawConfig {
    pub run: Option<Spanned<RawRun>>,
    pub data: Option<Spanned<RawData>>,
    pub target: Option<Spanned<RawModel>>,
    #[serde(default)]
    pub sources: Vec<Spanned<RawModel>>,
    pub precompute: Option<Spanned<RawPrecompute>>,
    pub align: Option<Spanned<RawAlign>>,
    pub fusion: Option<Spanned<RawPlugin>>,
    pub train: Option<Spanned<RawTrain>>,
    pub merge: Option<Spanned<RawMerge>>,
    pub eval: Option<Spanned<RawEval>>,
    pub sandbox: Option<Spanned<RawSandbox>>,
    /// Read by `variants` before the config is; ignored here.
    #[allow(dead_code)]
    pub sweep: Option<serde::de::IgnoredAny>,
}

#[derive(Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawRun {
    pub dir: Option<String>,
    pub seed: Option<Spanned<i64>>,
    pub device: Option<Spanned<String>>,
    pub dtype: Option<Precision>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawData {
    pub corpus: Option<Spanned<OneOrMany>>,
    pub text_fields: Option<OneOrMany>,
    pub max_len: Option<Spanned<i64>>,
    pub margin: Option<Spanned<i64>>,
    pub skip_bad: Option<bool>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawModel {
    pub model: Option<Spanned<String>>,
    pub revision: Option<Spanned<String>>,
    pub name: Option<String>,
    pub adapter: Option<Spanned<RawPluginName>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawPrecompute {
    pub k: Option<Spanned<i64>>,
    pub dtype: Option<LogprobDtype>,
    pub residual: Option<bool>,
    pub docs_per_shard: Option<Spanned<i64>>,
    pub batch_tokens: Option<Spanned<i64>>,
}

/// The dtype a store keeps log-probabilities in.
#[derive(Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogprobDtype {
    #[default]
    F16,
    F32,
}

#[derive(Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawAlign {
    pub sequence: Option<Spanned<RawPlugin>>,
    pub vocab: Option<Spanned<RawPlugin>>,
    pub compat: Option<bool>,
}

/// A stage's plugin and its parameters.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawPlugin {
    pub plugin: Option<Spanned<RawPluginName>>,
    #[serde(default)]
    pub params: BTreeMap<Spanned<String>, Spanned<toml::Value>>,
}

/// How a config names a plugin: registered, or in a file.
#[derive(Deserialize)]
#[serde(untagged)]
pub enum RawPluginName {
    Named(String),
    File(RawPluginFile),
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawPluginFile {
    pub wasm: Option<String>,
    pub dylib: Option<String>,
    pub name: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawTrain {
    pub steps: Option<Spanned<i64>>,
    pub batch_size: Option<Spanned<i64>>,
    pub seq_len: Option<Spanned<i64>>,
    pub packing: Option<bool>,
    pub accumulation: Option<Spanned<i64>>,
    pub lr: Option<Spanned<f64>>,
    pub warmup_steps: Option<Spanned<i64>>,
    pub decay: Option<Decay>,
    pub min_lr_ratio: Option<Spanned<f64>>,
    pub lambda: Option<Spanned<f64>>,
    pub lambda_end: Option<Spanned<f64>>,
    pub divergence: Option<Spanned<DivergenceName>>,
    /// The generalised JSD's mixture weight.
    pub beta: Option<Spanned<f64>>,
    /// The skew KLs' mixture weight.
    pub alpha: Option<Spanned<f64>>,
    pub tail: Option<Tail>,
    pub temperature: Option<Spanned<f64>>,
    pub weight_decay: Option<Spanned<f64>>,
    pub beta1: Option<Spanned<f64>>,
    pub beta2: Option<Spanned<f64>>,
    pub eps: Option<Spanned<f64>>,
    pub clip: Option<Spanned<f64>>,
    pub checkpoint_every: Option<Spanned<i64>>,
    pub keep_checkpoints: Option<Spanned<i64>>,
    pub dtype: Option<Precision>,
    pub zero: Option<Spanned<i64>>,
    pub checkpoint_activations: Option<bool>,
    pub lora: Option<Spanned<RawLora>>,
}

/// `[train] divergence`, by name; its parameter is a key of its own.
#[derive(Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DivergenceName {
    Ce,
    Kl,
    ReverseKl,
    Jsd,
    SkewKl,
    SkewReverseKl,
    Tv,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawLora {
    pub rank: Option<Spanned<i64>>,
    pub alpha: Option<Spanned<f64>>,
    pub dropout: Option<Spanned<f64>>,
    pub targets: Option<Spanned<Vec<String>>>,
    pub merge: Option<bool>,
}

/// `[merge]`: FuseChat's recipe, mergekit's names.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawMerge {
    pub method: Option<Spanned<String>>,
    #[serde(default)]
    pub parameters: BTreeMap<String, Setting>,
    /// Per-model parameters, by source name.
    #[serde(default)]
    pub models: BTreeMap<Spanned<String>, BTreeMap<String, Setting>>,
    pub dtype: Option<Spanned<String>>,
    pub all_sources: Option<bool>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawEval {
    pub sets: Option<Spanned<BTreeMap<Spanned<String>, Spanned<String>>>>,
    pub window: Option<Spanned<i64>>,
    pub batch_tokens: Option<Spanned<i64>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawSandbox {
    pub deadline_secs: Option<Spanned<f64>>,
    pub memory_mib: Option<Spanned<i64>>,
    pub cache: Option<bool>,
}
