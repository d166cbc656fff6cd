//! How much memory training a target takes per device, estimated from its spec and the
//! training settings before anything is loaded: so that `fusellm validate` tells whether a
//! run fits before it starts. Model states are counted as DeepSpeed's ZeRO paper counts
//! them (weights and gradients in the compute dtype; AdamW's two f32 moments, and f32
//! master weights below f32, that is K = 12 bytes per parameter in mixed precision),
//! activations as the tensors a transformer block keeps for its backward.

use fusellm_sdk::adapter::{NormKind, Positions};
use fusellm_sdk::ModelSpec;

use super::TrainConfig;
use crate::model::lora::LoraSpec;

/// Bytes per device, by what holds them.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Estimate {
    pub weights: u64,
    pub gradients: u64,
    pub optimizer: u64,
    pub activations: u64,
}

impl Estimate {
    pub fn total(&self) -> u64 {
        self.weights + self.gradients + self.optimizer + self.activations
    }
}

/// How the ranks share the work: their number, the ZeRO stage, and whether activations
/// are recomputed in the backward (only each block's input kept).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Layout {
    pub ranks: usize,
    pub zero: u8,
    pub checkpointing: bool,
}

/// The logits the fused head and loss hold at once: one chunk of at most 32 MB.
const HEAD_CHUNK: u64 = 32 << 20;

/// The widths of a block: the hidden size, the queries', the keys' (as the values').
fn widths(spec: &ModelSpec) -> (u64, u64, u64) {
    let a = &spec.attention;
    (spec.hidden as u64, (a.heads * a.head_dim) as u64, (a.kv_heads * a.head_dim) as u64)
}

/// The parameters of `spec` (weights and biases of the projections, embeddings, norms).
pub fn parameters(spec: &ModelSpec) -> u64 {
    let ((h, q, kv), a) = (widths(spec), &spec.attention);
    let attention = h * (q + 2 * kv) + q * h + if a.bias.qkv { q + 2 * kv } else { 0 } + if a.bias.out { h } else { 0 };
    let i = spec.mlp.hidden as u64;
    let projections = if spec.mlp.kind.gated() { 3 } else { 2 };
    let mlp = projections * h * i + if spec.mlp.bias { (projections - 1) * i + h } else { 0 };
    let norm = match spec.norm {
        NormKind::LayerNorm { bias: true, .. } => 2 * h,
        _ => h,
    };
    let norms = if spec.post_norms { 4 } else { 2 } * norm + if a.qk_norm { 2 * a.head_dim as u64 } else { 0 };
    let embeddings = spec.vocab_size as u64 * h * if spec.tied_embeddings { 1 } else { 2 };
    let positions = match spec.positions {
        Positions::Learned => spec.max_positions as u64 * h,
        _ => 0,
    };
    embeddings + positions + spec.layers as u64 * (attention + mlp + norms) + norm
}

/// The parameters of the LoRA adapters `lora` puts on `spec`'s projections: `r (in + out)`
/// for each targeted one.
pub fn lora_parameters(spec: &ModelSpec, lora: &LoraSpec) -> u64 {
    let ((h, q, kv), i) = (widths(spec), spec.mlp.hidden as u64);
    let projections = [
        ("attn.q", q, h),
        ("attn.k", kv, h),
        ("attn.v", kv, h),
        ("attn.qkv", q + 2 * kv, h),
        ("attn.o", h, q),
        ("mlp.gate", i, h),
        ("mlp.up", i, h),
        ("mlp.gate_up", 2 * i, h),
        ("mlp.down", h, i),
    ];
    let per_layer: u64 = projections
        .iter()
        .filter(|(name, ..)| {
            let theirs = spec.tensor_names.get(&format!("layers.{{i}}.{name}.weight"));
            theirs.is_some_and(|t| lora.targets_module(t).is_some())
        })
        .map(|(_, out, inp)| lora.rank as u64 * (out + inp))
        .sum();
    spec.layers as u64 * per_layer
}

/// The memory per device of training `spec` as `train` says, laid out as `layout` says.
/// With LoRA the base weights are held, and the adapters alone have gradients and
/// optimizer state (their activations, `r` per token and projection, are left out).
pub fn estimate(spec: &ModelSpec, train: &TrainConfig, layout: Layout) -> Estimate {
    let (params, adapters) = (parameters(spec), train.lora.as_ref().map_or(0, |l| lora_parameters(spec, &l.adapter)));
    let trained = if train.lora.is_some() { adapters } else { params };
    let dtype = train.precision.dtype().size_in_bytes() as u64;
    let state = 8 + if dtype < 4 { 4 } else { 0 };
    let shards = if layout.zero >= 1 { layout.ranks.max(1) as u64 } else { 1 };
    let tokens = (train.batching.batch_size * train.batching.seq_len) as u64;
    let block = tokens * block_elements(spec, train.batching.seq_len) * dtype;
    let layers = spec.layers as u64;
    let blocks = match layout.checkpointing {
        // Each block's input, and one block's tensors while it is recomputed.
        true => layers * tokens * spec.hidden as u64 * dtype + block,
        false => layers * block,
    };
    Estimate {
        weights: (params + adapters) * dtype,
        gradients: trained * dtype,
        optimizer: (trained * state).div_ceil(shards),
        activations: blocks + 2 * tokens * spec.hidden as u64 * dtype + HEAD_CHUNK,
    }
}

/// Elements a block keeps per token for its backward: the inputs of both norms and their
/// outputs, Q, K and V, the attention probabilities (one per head and key), the attention
/// output, and the MLP's projections and activation.
fn block_elements(spec: &ModelSpec, seq_len: usize) -> u64 {
    let ((h, q, kv), a) = (widths(spec), &spec.attention);
    let i = spec.mlp.hidden as u64;
    let mlp = if spec.mlp.kind.gated() { 3 * i } else { 2 * i };
    4 * h + q + 2 * kv + (a.heads * seq_len) as u64 + q + mlp
}
