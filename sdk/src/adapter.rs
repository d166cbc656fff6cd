//! The model-adapter extension point: a checkpoint in the Hugging Face layout becomes a
//! [`ModelSpec`], the architecture as data, which the core's block library executes. An
//! adapter therefore crosses a dylib or WASM boundary as plain data (JSON).

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::params::Params;
use crate::plugin::PluginInfo;

#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum NormKind {
    /// x / sqrt(mean(x^2) + eps) * w (Llama).
    RmsNorm { eps: f64 },
    /// (x - mean) / sqrt(var + eps) * w (+ b), biased variance (MPT, GPT-NeoX).
    LayerNorm { eps: f64, bias: bool },
}

#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum Positions {
    /// Rotary embeddings in the rotate-half layout of HF checkpoints (dimension i pairs
    /// with i + rot/2), on the first `fraction` of each head's dimensions (1.0 for Llama,
    /// 0.25 for Pythia).
    Rope { theta: f64, fraction: f64 },
    /// ALiBi biases (MPT): head h adds -(i - j) * slope_h to the score of query i, key j.
    Alibi { max_bias: f64 },
    /// A learned table of position embeddings, added to the token embeddings.
    Learned,
}

/// How the rows of a fused QKV projection are ordered.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum QkvLayout {
    /// Three projections q, k, v.
    Split,
    /// One projection, rows [q | k | v] (MPT's Wqkv).
    Chunked,
    /// One projection, rows grouped per head as [q_h | k_h | v_h] (GPT-NeoX).
    PerHead,
}

#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct AttentionSpec {
    pub heads: usize,
    /// Key/value heads; fewer than `heads` is grouped-query attention.
    pub kv_heads: usize,
    pub head_dim: usize,
    pub qkv: QkvLayout,
    /// Biases on the q, k, v and output projections.
    pub bias: bool,
    /// Clamp of the q, k, v activations to [-c, c] (MPT's clip_qkv).
    pub clip_qkv: Option<f64>,
    /// Score scale; `None` is 1 / sqrt(head_dim).
    pub softmax_scale: Option<f64>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum MlpKind {
    /// down(silu(gate(x)) * up(x)) (Llama).
    SwiGlu,
    /// down(gelu(up(x))) with the exact (erf) GELU (MPT, GPT-NeoX).
    Gelu,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct MlpSpec {
    pub kind: MlpKind,
    pub hidden: usize,
    pub bias: bool,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Residual {
    /// x += attn(norm1(x)); x += mlp(norm2(x)).
    Sequential,
    /// x += attn(norm1(x)) + mlp(norm2(x)) (GPT-NeoX).
    Parallel,
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
    pub eos: Option<String>,
    pub special_tokens: Vec<String>,
}

/// A causal language model's architecture as data.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ModelSpec {
    /// The Hugging Face `model_type` this spec was made from.
    pub model_type: String,
    /// Rows of the embedding matrix (may exceed the tokenizer's vocabulary: MPT pads).
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
        if a.qkv != QkvLayout::Split && a.kv_heads != a.heads {
            return fail("a fused QKV projection needs as many key/value heads as heads".into());
        }
        if let Positions::Rope { fraction, .. } = self.positions {
            let rot = self.rotary_dim();
            if !(fraction > 0.0 && fraction <= 1.0) || rot == 0 || !rot.is_multiple_of(2) {
                return fail(format!(
                    "rotary fraction {fraction} of head_dim {} gives a width of {rot}; it must be even and positive",
                    a.head_dim
                ));
            }
        }
        Ok(())
    }

    /// Width of the rotary part of each head, truncated as transformers' `int(d * pct)`.
    pub fn rotary_dim(&self) -> usize {
        match self.positions {
            Positions::Rope { fraction, .. } => (self.attention.head_dim as f64 * fraction) as usize,
            _ => 0,
        }
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

/// Reads what every adapter needs from a Hugging Face config.json.
pub struct HfConfig(serde_json::Map<String, serde_json::Value>);

impl HfConfig {
    pub fn parse(config_json: &str) -> Result<Self, String> {
        match serde_json::from_str(config_json) {
            Ok(serde_json::Value::Object(map)) => Ok(Self(map)),
            Ok(_) => Err("config.json is not a JSON object".into()),
            Err(e) => Err(format!("config.json is not valid JSON: {e}")),
        }
    }

    pub fn get(&self, key: &str) -> Option<&serde_json::Value> {
        self.0.get(key).filter(|v| !v.is_null())
    }

    /// A nested object (`attn_config` of MPT), as a config of its own.
    pub fn section(&self, key: &str) -> Result<HfConfig, String> {
        match self.get(key) {
            Some(serde_json::Value::Object(map)) => Ok(HfConfig(map.clone())),
            Some(_) => Err(format!("config.json: `{key}` must be an object")),
            None => Ok(HfConfig(Default::default())),
        }
    }

    pub fn usize(&self, key: &str) -> Result<usize, String> {
        self.opt_usize(key)?.ok_or_else(|| format!("config.json: missing `{key}` (a positive integer)"))
    }

    pub fn opt_usize(&self, key: &str) -> Result<Option<usize>, String> {
        self.get(key)
            .map(|v| {
                v.as_u64()
                    .map(|n| n as usize)
                    .ok_or_else(|| format!("config.json: `{key}` must be a non-negative integer, found {v}"))
            })
            .transpose()
    }

    pub fn f64(&self, key: &str) -> Result<f64, String> {
        self.opt_f64(key)?.ok_or_else(|| format!("config.json: missing `{key}` (a number)"))
    }

    pub fn opt_f64(&self, key: &str) -> Result<Option<f64>, String> {
        self.get(key)
            .map(|v| v.as_f64().ok_or_else(|| format!("config.json: `{key}` must be a number, found {v}")))
            .transpose()
    }

    pub fn bool_or(&self, key: &str, default: bool) -> Result<bool, String> {
        self.get(key)
            .map(|v| v.as_bool().ok_or_else(|| format!("config.json: `{key}` must be a boolean, found {v}")))
            .unwrap_or(Ok(default))
    }

    pub fn str(&self, key: &str) -> Option<&str> {
        self.get(key).and_then(|v| v.as_str())
    }
}

impl TokenizerConventions {
    /// Reads the conventions from a tokenizers `tokenizer.json`: the space marker and byte
    /// handling from its normalizer, pre-tokenizer and model; the BOS policy from its
    /// post-processor (a template that starts with a special token adds a BOS); the
    /// special tokens from its added tokens.
    pub fn from_tokenizer_json(json: &str) -> Result<Self, String> {
        let doc: serde_json::Value =
            serde_json::from_str(json).map_err(|e| format!("tokenizer.json is not valid JSON: {e}"))?;
        let text = |v: &serde_json::Value| v.to_string();
        let pre = text(&doc["pre_tokenizer"]);
        let byte_level = pre.contains("\"ByteLevel\"");
        let metaspace = pre.contains("\"Metaspace\"") || text(&doc["normalizer"]).contains('\u{2581}');
        // The template of a TemplateProcessing post-processor, alone or in a Sequence.
        let post = &doc["post_processor"];
        let templates = std::iter::once(post).chain(post["processors"].as_array().into_iter().flatten());
        let bos = templates.filter_map(|p| p["single"][0]["SpecialToken"]["id"].as_str()).next().map(str::to_string);
        let special_tokens: Vec<String> = doc["added_tokens"]
            .as_array()
            .map(|tokens| {
                tokens
                    .iter()
                    .filter(|t| t["special"].as_bool() == Some(true))
                    .filter_map(|t| t["content"].as_str().map(str::to_string))
                    .collect()
            })
            .unwrap_or_default();
        // Beyond the template, the families' usual names say which specials are BOS and EOS.
        let named = |names: &[&str]| special_tokens.iter().find(|t| names.contains(&t.as_str())).cloned();
        let marker = if byte_level {
            "\u{0120}"
        } else if metaspace {
            "\u{2581}"
        } else {
            " "
        };
        Ok(Self {
            space_marker: marker.into(),
            byte_fallback: doc["model"]["byte_fallback"].as_bool().unwrap_or(false),
            byte_level,
            add_bos: bos.is_some(),
            bos: bos.or_else(|| named(&["<s>", "<bos>", "<|startoftext|>", "<|begin_of_text|>"])),
            eos: named(&["</s>", "<eos>", "<|endoftext|>", "<|end_of_text|>"]),
            special_tokens,
        })
    }
}
