//! Fresh checkpoints of the built-in architectures, in the Hugging Face layout that their
//! adapters read: config.json, tokenizer.json and seeded random weights.

use std::path::Path;

use candle_core::Device;
use fusellm_core::checkpoint::Checkpoint;
use fusellm_core::error::{Context, Result};
use fusellm_core::model::Transformer;
use fusellm_core::plugins::Registry;

/// The architectures of the paper's sources, as the demo builds them.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Arch {
    /// Llama-2 and OpenLLaMA: RMSNorm, RoPE, SwiGLU.
    Llama,
    /// MPT: LayerNorm, ALiBi, GELU, tied embeddings.
    Mpt,
    /// Llama 3.2: grouped-query attention, tied embeddings, llama3 RoPE scaling.
    Llama3,
    /// Qwen2.5: q/k/v biases, tied embeddings, the embedding padded to a multiple of 128.
    Qwen2,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Shape {
    pub hidden: usize,
    pub layers: usize,
    pub heads: usize,
    pub max_positions: usize,
}

fn config(arch: Arch, shape: Shape, vocab: usize) -> serde_json::Value {
    match arch {
        Arch::Llama => serde_json::json!({
            "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_act": "silu",
            "hidden_size": shape.hidden, "intermediate_size": shape.hidden * 8 / 3,
            "num_attention_heads": shape.heads, "num_key_value_heads": shape.heads,
            "num_hidden_layers": shape.layers, "max_position_embeddings": shape.max_positions,
            "rms_norm_eps": 1e-5, "rope_theta": 10000.0, "tie_word_embeddings": false,
            "attention_bias": false, "mlp_bias": false, "vocab_size": vocab,
            "bos_token_id": 1, "eos_token_id": 2, "dtype": "float32"
        }),
        Arch::Llama3 => serde_json::json!({
            "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_act": "silu",
            "hidden_size": shape.hidden, "intermediate_size": shape.hidden * 8 / 3,
            "num_attention_heads": shape.heads, "num_key_value_heads": shape.heads / 2,
            "num_hidden_layers": shape.layers, "max_position_embeddings": shape.max_positions,
            "rms_norm_eps": 1e-5, "rope_theta": 500000.0, "tie_word_embeddings": true,
            "rope_scaling": {"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0,
                "high_freq_factor": 4.0, "original_max_position_embeddings": 8192},
            "vocab_size": vocab, "bos_token_id": 128000, "eos_token_id": [128001, 128008, 128009],
            "dtype": "float32"
        }),
        Arch::Qwen2 => serde_json::json!({
            "architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2", "hidden_act": "silu",
            "hidden_size": shape.hidden, "intermediate_size": shape.hidden * 8 / 3,
            "num_attention_heads": shape.heads, "num_key_value_heads": shape.heads / 2,
            "num_hidden_layers": shape.layers, "max_position_embeddings": shape.max_positions,
            "rms_norm_eps": 1e-6, "rope_theta": 1000000.0, "tie_word_embeddings": true,
            "use_sliding_window": false, "vocab_size": vocab.next_multiple_of(128),
            "bos_token_id": 151643, "eos_token_id": 151643, "dtype": "float32"
        }),
        Arch::Mpt => serde_json::json!({
            "architectures": ["MptForCausalLM"], "model_type": "mpt", "d_model": shape.hidden,
            "n_heads": shape.heads, "n_layers": shape.layers, "expansion_ratio": 4,
            "max_seq_len": shape.max_positions, "vocab_size": vocab, "no_bias": true,
            "norm_type": "low_precision_layernorm", "layer_norm_epsilon": 1e-5,
            "attn_config": {"alibi": true, "alibi_bias_max": 8, "attn_type": "multihead_attention",
                "clip_qkv": null, "qk_ln": false, "softmax_scale": null},
            "tie_word_embeddings": true, "bos_token_id": 0, "eos_token_id": 0, "dtype": "float32"
        }),
    }
}

/// Writes a fresh checkpoint of `arch` with `tokenizer` (a tokenizer.json) into `dir`.
pub fn create(dir: &Path, arch: Arch, shape: Shape, tokenizer: &Path, seed: u64, registry: &Registry) -> Result<()> {
    std::fs::create_dir_all(dir).context(|| format!("creating {}", dir.display()))?;
    let vocab = crate::vocab::vocab_size(tokenizer)?;
    let text = serde_json::to_string_pretty(&config(arch, shape, vocab)).expect("JSON");
    std::fs::write(dir.join("config.json"), text).context(|| format!("writing {}", dir.display()))?;
    std::fs::copy(tokenizer, dir.join("tokenizer.json")).context(|| format!("copying {}", tokenizer.display()))?;
    let checkpoint = Checkpoint::open(dir, registry, None)?;
    let model = Transformer::init(&checkpoint.spec, seed, 0.02, candle_core::DType::F32, &Device::Cpu)?;
    Ok(model.save_weights(&dir.join("model.safetensors"))?)
}
