//! The model-adapter extension point: a checkpoint in the Hugging Face layout becomes a
//! [`ModelSpec`], the architecture as data, which the core's block library executes. An
//! adapter therefore crosses a dylib or WASM boundary as plain data.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::params::Params;
use crate::plugin::PluginInfo;

#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum NormKind {
    RmsNorm { eps: f64 },
    LayerNorm { eps: f64, bias: bool },
}

#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum Positions {
    /// Rotary embeddings in the rotate-half layout of HF checkpoints, on the first
    /// `fraction` of each head's dimensions (1.0 for Llama, 0.25 for Pythia).
    Rope { theta: f64, fraction: f64 },
    /// ALiBi biases (MPT), with the slopes' maximum bias.
    Alibi { max_bias: f64 },
    /// A learned position-embedding table.
    Learned { max_positions: usize },
}

#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct AttentionSpec {
    pub heads: usize,
    pub kv_heads: usize,
    /// One fused QKV projection rather than three.
    pub fused_qkv: bool,
    pub bias: bool,
    /// Clamp of the QKV activations (MPT's clip_qkv).
    pub clip_qkv: Option<f64>,
}

#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum MlpKind {
    SwiGlu,
    Gelu,
}

#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct MlpSpec {
    pub kind: MlpKind,
    pub hidden: usize,
    pub bias: bool,
}

#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Residual {
    /// x + attn(norm(x)), then + mlp(norm(.)).
    Sequential,
    /// x + attn(norm1(x)) + mlp(norm2(x)) (GPT-NeoX).
    Parallel,
}

/// How a tokenizer writes what the aligners must compare (DESIGN.md, step 4).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct TokenizerConventions {
    /// "▁" for sentencepiece, "Ġ" for byte-level BPE.
    pub space_marker: String,
    /// Bytes appear as `<0x0A>` tokens (sentencepiece byte fallback).
    pub byte_fallback: bool,
    /// Every token is written in the GPT-2 byte-to-unicode alphabet ("Ċ" for "\n").
    pub byte_level: bool,
    /// A BOS token is prepended to every document.
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
    pub vocab_size: usize,
    pub hidden: usize,
    pub layers: usize,
    pub max_positions: usize,
    pub norm: NormKind,
    pub positions: Positions,
    pub attention: AttentionSpec,
    pub mlp: MlpSpec,
    pub residual: Residual,
    pub tied_embeddings: bool,
    /// Block-library tensor name -> checkpoint tensor name; `{i}` stands for the layer index.
    pub tensor_names: BTreeMap<String, String>,
    pub tokenizer: TokenizerConventions,
}

/// The files of a checkpoint that an adapter reads, passed as text because a sandboxed
/// adapter has no file system.
#[derive(Clone, Copy, Debug)]
pub struct CheckpointFiles<'a> {
    pub config_json: &'a str,
    pub tokenizer_json: Option<&'a str>,
}

/// Turns a checkpoint (Hugging Face layout) into a [`ModelSpec`].
pub trait ModelAdapter: Send + Sync {
    fn info(&self) -> PluginInfo;

    /// The `model_type` values of config.json this adapter understands.
    fn model_types(&self) -> Vec<String>;

    fn spec(&self, params: &Params, files: CheckpointFiles<'_>) -> Result<ModelSpec, String>;
}
