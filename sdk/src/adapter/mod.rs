//! The model-adapter extension point: a checkpoint in the Hugging Face layout becomes a
//! [`ModelSpec`], the architecture as data, which the core's block library executes. An
//! adapter therefore crosses a dylib or WASM boundary as plain data (JSON).
//!
//! Fields added after the first release carry `#[serde(default)]`, so that the JSON of an
//! adapter built against an older SDK still reads as the architecture it meant.

mod hf_config;
mod tokenizer;

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::params::Params;
use crate::plugin::PluginInfo;

pub use hf_config::{HfConfig, RopeDefaults};

#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum NormKind {
    /// x / sqrt(mean(x^2) + eps) * (offset + w), in f32: offset 0 for Llama, 1 for Gemma
    /// (whose checkpoints store w - 1).
    RmsNorm {
        eps: f64,
        #[serde(default)]
        offset: f64,
    },
    /// (x - mean) / sqrt(var + eps) * w (+ b), biased variance (MPT, GPT-NeoX).
    LayerNorm { eps: f64, bias: bool },
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum Positions {
    /// Rotary embeddings in the rotate-half layout of HF checkpoints (dimension i pairs
    /// with i + rot/2), on the first `fraction` of each head's dimensions (1.0 for Llama,
    /// 0.25 for Pythia, 0.75 for Phi-3), with the frequencies of `scaling`.
    Rope {
        theta: f64,
        fraction: f64,
        #[serde(default)]
        scaling: RopeScaling,
    },
    /// ALiBi biases (MPT): head h adds -(i - j) * slope_h to the score of query i, key j.
    Alibi { max_bias: f64 },
    /// A learned table of position embeddings, added to the token embeddings.
    Learned,
}

/// How a long-context checkpoint changes RoPE's inverse frequencies `theta^(-2i/rot)`, as
/// transformers' `modeling_rope_utils` names the kinds. `original` is the context length
/// the model was pre-trained with.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum RopeScaling {
    /// The plain frequencies.
    #[default]
    None,
    /// Frequencies divided by `factor` (position interpolation).
    Linear { factor: f64 },
    /// NTK-aware: for sequences longer than `original`, theta grows with the length.
    Dynamic { factor: f64, original: usize },
    /// Llama 3.1: long wavelengths divided by `factor`, short ones kept, smoothed between.
    Llama3 { factor: f64, low_freq_factor: f64, high_freq_factor: f64, original: usize },
    /// Phi-3 (`longrope`, once `su`): per-frequency factors, `short` up to `original`
    /// positions and `long` beyond; cos and sin scaled by `attention_factor`.
    LongRope { short_factor: Vec<f64>, long_factor: Vec<f64>, original: usize, attention_factor: f64 },
    /// YaRN: frequencies blended between interpolated and extrapolated by a linear ramp
    /// over the dimensions whose rotations fall between `beta_slow` and `beta_fast` within
    /// `original` positions; cos and sin scaled by `attention_factor`.
    Yarn { factor: f64, original: usize, beta_fast: f64, beta_slow: f64, attention_factor: f64, truncate: bool },
}

/// How the rows of a fused QKV projection are ordered.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum QkvLayout {
    /// Three projections q, k, v.
    Split,
    /// One projection, rows [q | k | v] (MPT's Wqkv; Phi-3's qkv_proj, whose k and v have
    /// `kv_heads` heads).
    Chunked,
    /// One projection, rows grouped per head as [q_h | k_h | v_h] (GPT-NeoX).
    PerHead,
}

/// Which attention projections have a bias. Reads `true` / `false` (all or none, the
/// first SDK's form) as well as `{ "qkv": .., "out": .. }`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(from = "BiasJson")]
pub struct AttentionBias {
    /// On the q, k and v projections (Qwen2 has only these).
    pub qkv: bool,
    /// On the output projection.
    pub out: bool,
}

impl AttentionBias {
    pub const NONE: Self = Self { qkv: false, out: false };

    /// Biases on all four projections, or on none.
    pub const fn all(on: bool) -> Self {
        Self { qkv: on, out: on }
    }
}

#[derive(Deserialize)]
#[serde(untagged)]
enum BiasJson {
    All(bool),
    Each { qkv: bool, out: bool },
}

impl From<BiasJson> for AttentionBias {
    fn from(json: BiasJson) -> Self {
        match json {
            BiasJson::All(on) => Self::all(on),
            BiasJson::Each { qkv, out } => Self { qkv, out },
        }
    }
}

/// A list that may also be written as one item or null.
fn one_or_many<'de, D: serde::Deserializer<'de>>(deserializer: D) -> Result<Vec<String>, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum OneOrMany {
        One(String),
        Many(Vec<String>),
    }
    Ok(match Option::<OneOrMany>::deserialize(deserializer)? {
        None => Vec::new(),
        Some(OneOrMany::One(s)) => vec![s],
        Some(OneOrMany::Many(v)) => v,
    })
}

#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct AttentionSpec {
    pub heads: usize,
    /// Key/value heads; fewer than `heads` is grouped-query attention.
    pub kv_heads: usize,
    /// Width of a head; `heads * head_dim` may differ from the hidden size (Qwen3, Gemma).
    pub head_dim: usize,
    pub qkv: QkvLayout,
    pub bias: AttentionBias,
    /// Clamp of the q, k, v activations to [-c, c] (MPT's clip_qkv).
    pub clip_qkv: Option<f64>,
    /// Score scale; `None` is 1 / sqrt(head_dim) (Gemma: query_pre_attn_scalar^-1/2).
    pub softmax_scale: Option<f64>,
    /// Each query and key head normalised over its `head_dim` by the model's norm before
    /// RoPE (Qwen3, Gemma 3): tensors `layers.{i}.attn.q_norm` and `k_norm`.
    #[serde(default)]
    pub qk_norm: bool,
    /// Scaled scores soft-capped as `c * tanh(s / c)` before the mask (Gemma 2).
    #[serde(default)]
    pub softcap: Option<f64>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum MlpKind {
    /// down(silu(gate(x)) * up(x)) (Llama).
    SwiGlu,
    /// down(gelu_tanh(gate(x)) * up(x)), GELU in its tanh approximation (Gemma).
    GeGlu,
    /// down(gelu(up(x))) with the exact (erf) GELU (MPT, GPT-NeoX).
    Gelu,
}

impl MlpKind {
    /// Whether the MLP has a gate projection.
    pub fn gated(self) -> bool {
        self != MlpKind::Gelu
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct MlpSpec {
    pub kind: MlpKind,
    pub hidden: usize,
    pub bias: bool,
    /// The gate and up projections as one tensor `layers.{i}.mlp.gate_up`, rows
    /// [gate | up] (Phi-3's gate_up_proj).
    #[serde(default)]
    pub fused_gate_up: bool,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Residual {
    /// x += attn(norm1(x)); x += mlp(norm2(x)).
    Sequential,
    /// x += attn(norm1(x)) + mlp(norm2(x)) (GPT-NeoX).
    Parallel,
}

/// What one layer's attention does differently from the model's default (Gemma's sliding
/// and global layers, Mistral's window, Gemma 3's local RoPE base).
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct LayerAttention {
    /// A query sees only the `window` most recent keys, itself included (sliding-window
    /// attention: key j is visible from query i when i - window < j <= i).
    #[serde(default)]
    pub window: Option<usize>,
    /// This layer's positions, where they are not the model's [`ModelSpec::positions`].
    #[serde(default)]
    pub positions: Option<Positions>,
}

/// How a tokenizer writes what the aligners compare and what precompute adds (DESIGN.md,
/// steps 1 and 4).
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct TokenizerConventions {
    /// "▁" for sentencepiece-style, "Ġ" for byte-level BPE.
    pub space_marker: String,
    /// Bytes appear as `<0x0A>` tokens (sentencepiece byte fallback).
    pub byte_fallback: bool,
    /// Every token is written in the GPT-2 byte-to-unicode alphabet ("Ċ" for "\n").
    pub byte_level: bool,
    /// A BOS token is prepended to every document (Llama family: yes; MPT: no).
    pub add_bos: bool,
    pub bos: Option<String>,
    /// Every token that ends a text (Llama 3: `<|end_of_text|>`, `<|eom_id|>`,
    /// `<|eot_id|>`); the aligners read them all as one EOS. Reads a single string or null
    /// too (the first SDK's form).
    #[serde(default, deserialize_with = "one_or_many")]
    pub eos: Vec<String>,
    pub special_tokens: Vec<String>,
}

/// A causal language model's architecture as data.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ModelSpec {
    /// The Hugging Face `model_type` this spec was made from.
    pub model_type: String,
    /// Rows of the embedding matrix (may exceed the tokenizer's vocabulary: MPT, Qwen and
    /// Phi-3 pad it).
    pub vocab_size: usize,
    pub hidden: usize,
    pub layers: usize,
    pub max_positions: usize,
    pub norm: NormKind,
    pub positions: Positions,
    pub attention: AttentionSpec,
    pub mlp: MlpSpec,
    pub residual: Residual,
    /// The LM head is the embedding matrix.
    pub tied_embeddings: bool,
    /// Block-library tensor name -> checkpoint tensor name; `{i}` is the layer index.
    pub tensor_names: BTreeMap<String, String>,
    pub tokenizer: TokenizerConventions,
    /// The token embeddings are multiplied by this (Gemma: sqrt(hidden)).
    #[serde(default)]
    pub embed_scale: Option<f64>,
    /// The logits are soft-capped as `c * tanh(z / c)` (Gemma 2).
    #[serde(default)]
    pub final_softcap: Option<f64>,
    /// Sandwich norms (Gemma 2, 3): the attention's and the MLP's outputs are normalised
    /// again before the residual add, by `layers.{i}.attn_post_norm` and `mlp_post_norm`.
    #[serde(default)]
    pub post_norms: bool,
    /// Per layer, where layers differ (empty: every layer attends to all earlier keys with
    /// the model's positions); else exactly one entry per layer.
    #[serde(default)]
    pub layer_attention: Vec<LayerAttention>,
}

impl ModelSpec {
    /// Checks the arithmetic a block library relies on.
    pub fn check(&self) -> Result<(), String> {
        let a = &self.attention;
        let fail = |what: String| Err(format!("model spec ({}): {what}", self.model_type));
        if [self.vocab_size, self.hidden, self.layers, a.heads, a.kv_heads, a.head_dim, self.mlp.hidden].contains(&0) {
            return fail("sizes must be positive".into());
        }
        if !a.heads.is_multiple_of(a.kv_heads) {
            return fail(format!("{} attention heads are not a multiple of {} key/value heads", a.heads, a.kv_heads));
        }
        if a.qkv == QkvLayout::PerHead && a.kv_heads != a.heads {
            return fail("a QKV projection grouped per head needs as many key/value heads as heads".into());
        }
        if !self.layer_attention.is_empty() && self.layer_attention.len() != self.layers {
            return fail(format!(
                "{} per-layer attention entries for {} layers; give one per layer or none",
                self.layer_attention.len(),
                self.layers
            ));
        }
        let positive = [
            ("the attention soft-cap", a.softcap),
            ("the final logit soft-cap", self.final_softcap),
            ("the embedding scale", self.embed_scale),
            ("the softmax scale", a.softmax_scale),
        ];
        for (what, value) in positive {
            if let Some(v) = value.filter(|v| !(v.is_finite() && *v > 0.0)) {
                return fail(format!("{what} must be a positive number, found {v}"));
            }
        }
        let eps = match self.norm {
            NormKind::RmsNorm { eps, .. } | NormKind::LayerNorm { eps, .. } => eps,
        };
        if !(eps.is_finite() && eps > 0.0) {
            return fail(format!(
                "the norms' epsilon (rms_norm_eps or layer_norm_eps in config.json) must be a small positive number, found {eps}"
            ));
        }
        for i in 0..self.layers {
            let (window, positions) = self.layer(i);
            if window == Some(0) {
                return fail(format!("layer {i}: a sliding window of 0 keys"));
            }
            self.check_positions(positions).or_else(|e| fail(format!("layer {i}: {e}")))?;
        }
        Ok(())
    }

    fn check_positions(&self, positions: &Positions) -> Result<(), String> {
        let Positions::Rope { theta, fraction, scaling } = positions else { return Ok(()) };
        let rot = self.rotary_dim_of(*fraction);
        if !(*fraction > 0.0 && *fraction <= 1.0) || rot == 0 || !rot.is_multiple_of(2) {
            return Err(format!(
                "rotary fraction {fraction} of head_dim {} gives a width of {rot}; it must be even and positive",
                self.attention.head_dim
            ));
        }
        if !(theta.is_finite() && *theta > 0.0) {
            return Err(format!("RoPE theta must be a positive number, found {theta}"));
        }
        if let RopeScaling::LongRope { short_factor, long_factor, .. } = scaling {
            for (name, factors) in [("short_factor", short_factor), ("long_factor", long_factor)] {
                if factors.len() != rot / 2 {
                    return Err(format!(
                        "longrope {name} has {} entries, but a rotary width of {rot} has {} frequencies",
                        factors.len(),
                        rot / 2
                    ));
                }
            }
        }
        Ok(())
    }

    /// Layer `i`'s sliding window (`None`: all earlier keys) and positions.
    pub fn layer(&self, i: usize) -> (Option<usize>, &Positions) {
        match self.layer_attention.get(i) {
            Some(layer) => (layer.window, layer.positions.as_ref().unwrap_or(&self.positions)),
            None => (None, &self.positions),
        }
    }

    /// Width of the rotary part of each head, truncated as transformers' `int(d * pct)`.
    pub fn rotary_dim(&self) -> usize {
        match self.positions {
            Positions::Rope { fraction, .. } => self.rotary_dim_of(fraction),
            _ => 0,
        }
    }

    fn rotary_dim_of(&self, fraction: f64) -> usize {
        (self.attention.head_dim as f64 * fraction) as usize
    }
}

/// Builds [`ModelSpec::tensor_names`]: block-library name -> checkpoint name, each for a
/// weight and, where the layer has one, its bias (`{i}` stands for the layer index).
#[derive(Clone, Debug, Default)]
pub struct TensorNames(BTreeMap<String, String>);

impl TensorNames {
    /// Maps `{ours}.weight` to `{theirs}.weight`, and the biases too when `bias`.
    pub fn add(mut self, ours: &str, theirs: &str, bias: bool) -> Self {
        let suffixes: &[&str] = if bias { &["weight", "bias"] } else { &["weight"] };
        for s in suffixes {
            self.0.insert(format!("{ours}.{s}"), format!("{theirs}.{s}"));
        }
        self
    }

    pub fn build(self) -> BTreeMap<String, String> {
        self.0
    }
}

/// The files of a checkpoint that an adapter reads, passed as text because a sandboxed
/// adapter has no file system.
#[derive(Clone, Copy, Debug)]
pub struct CheckpointFiles<'a> {
    pub config_json: &'a str,
    pub tokenizer_json: Option<&'a str>,
}

/// Turns a checkpoint (Hugging Face layout) into a [`ModelSpec`]. Its
/// [`PluginInfo::handles`] lists the config.json `model_type` values it understands.
pub trait ModelAdapter: Send + Sync {
    fn info(&self) -> PluginInfo;

    fn spec(&self, params: &Params, files: CheckpointFiles<'_>) -> Result<ModelSpec, String>;
}

/// A built-in is a `&'static` plugin; hosts hold every plugin alike behind one pointer type.
impl<T: ModelAdapter + ?Sized> ModelAdapter for &T {
    fn info(&self) -> PluginInfo {
        (**self).info()
    }
    fn spec(&self, params: &Params, files: CheckpointFiles<'_>) -> Result<ModelSpec, String> {
        (**self).spec(params, files)
    }
}
