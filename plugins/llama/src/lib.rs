//! Adapters for the Llama-shaped families: RMSNorm, rotary positions, grouped-query
//! attention and a SwiGLU MLP, as transformers' `modeling_llama`, and the members that
//! differ from it by a few switches: Mistral (a sliding window), Qwen2 (q/k/v biases,
//! windowed upper layers) and Qwen3 (per-head q/k norms, a free head width).

use std::collections::BTreeMap;

use fusellm_sdk::adapter::{
    AttentionBias, AttentionSpec, LayerAttention, MlpKind, MlpSpec, NormKind, QkvLayout, Residual, RopeDefaults,
};
use fusellm_sdk::{
    CheckpointFiles, HfConfig, ModelAdapter, ModelSpec, Params, PluginInfo, PluginKind, TensorNames,
    TokenizerConventions,
};

/// What sets a member apart from Llama.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Variant {
    /// Llama 1-3 and OpenLLaMA: `attention_bias` and `mlp_bias` as the config says.
    Llama,
    /// `sliding_window` on every layer where the config sets one.
    Mistral,
    /// Biases on q, k and v (no config flag: always), windows from `layer_types` or
    /// `use_sliding_window` with `max_window_layers`.
    Qwen2,
    /// Qwen2's windows, no biases unless `attention_bias`, q/k RMSNorm per head.
    Qwen3,
}

/// One member of the family: a name for configs, the `model_type` values it reads.
pub struct Llama {
    name: &'static str,
    doc: &'static str,
    handles: &'static [&'static str],
    variant: Variant,
}

pub const LLAMA: Llama = Llama {
    name: "llama",
    doc: "Llama 1-3 (LlamaForCausalLM) checkpoints, Llama 3.1's rope scaling included",
    handles: &["llama"],
    variant: Variant::Llama,
};
pub const OPENLLAMA: Llama = Llama {
    name: "openllama",
    doc: "OpenLLaMA checkpoints (LlamaForCausalLM, OpenLLaMA tokenizer)",
    handles: &["llama"],
    variant: Variant::Llama,
};
pub const MISTRAL: Llama = Llama {
    name: "mistral",
    doc: "Mistral (MistralForCausalLM) checkpoints, with sliding-window attention",
    handles: &["mistral"],
    variant: Variant::Mistral,
};
pub const QWEN2: Llama = Llama {
    name: "qwen2",
    doc: "Qwen2 and Qwen2.5 (Qwen2ForCausalLM) checkpoints",
    handles: &["qwen2"],
    variant: Variant::Qwen2,
};
pub const QWEN3: Llama = Llama {
    name: "qwen3",
    doc: "Qwen3 (Qwen3ForCausalLM) checkpoints, with per-head q/k norms",
    handles: &["qwen3"],
    variant: Variant::Qwen3,
};

impl ModelAdapter for Llama {
    fn info(&self) -> PluginInfo {
        PluginInfo::new(PluginKind::Adapter, self.name, env!("CARGO_PKG_VERSION"), self.doc).handles(self.handles)
    }

    fn spec(&self, _params: &Params, files: CheckpointFiles<'_>) -> Result<ModelSpec, String> {
        let c = HfConfig::parse(files.config_json)?;
        if let Some(act) = c.str("hidden_act").filter(|a| *a != "silu") {
            return Err(format!(
                "config.json: hidden_act `{act}` is not supported by the {} adapter (expected silu)",
                self.name
            ));
        }
        let hidden = c.usize("hidden_size")?;
        let heads = c.usize("num_attention_heads")?;
        let layers = c.usize("num_hidden_layers")?;
        let bias = match self.variant {
            Variant::Qwen2 => AttentionBias { qkv: true, out: false },
            Variant::Mistral => AttentionBias::NONE,
            Variant::Llama | Variant::Qwen3 => AttentionBias::all(c.bool_or("attention_bias", false)?),
        };
        let mlp_bias = self.variant == Variant::Llama && c.bool_or("mlp_bias", false)?;
        Ok(ModelSpec {
            model_type: c.str("model_type").unwrap_or(self.name).into(),
            vocab_size: c.usize("vocab_size")?,
            hidden,
            layers,
            max_positions: c.usize("max_position_embeddings")?,
            norm: NormKind::RmsNorm { eps: c.f64("rms_norm_eps")?, offset: 0.0 },
            positions: c.rope(None, &RopeDefaults::default())?,
            attention: AttentionSpec {
                heads,
                kv_heads: c.opt_usize("num_key_value_heads")?.unwrap_or(heads),
                head_dim: c.head_dim(hidden, heads)?,
                qkv: QkvLayout::Split,
                bias,
                clip_qkv: None,
                softmax_scale: None,
                qk_norm: self.variant == Variant::Qwen3,
                softcap: None,
            },
            mlp: MlpSpec {
                kind: MlpKind::SwiGlu,
                hidden: c.usize("intermediate_size")?,
                bias: mlp_bias,
                fused_gate_up: false,
            },
            residual: Residual::Sequential,
            tied_embeddings: c.bool_or("tie_word_embeddings", false)?,
            tensor_names: tensor_names(bias, mlp_bias, self.variant == Variant::Qwen3),
            tokenizer: tokenizer(files.tokenizer_json, &c)?,
            embed_scale: None,
            final_softcap: None,
            post_norms: false,
            layer_attention: self.layer_attention(&c, layers)?,
        })
    }
}

impl Llama {
    /// Which layers attend through a sliding window (none: an empty list).
    fn layer_attention(&self, c: &HfConfig, layers: usize) -> Result<Vec<LayerAttention>, String> {
        let window = c.opt_usize("sliding_window")?;
        let windowed = |from: usize| -> Vec<LayerAttention> {
            (0..layers).map(|i| LayerAttention { window: window.filter(|_| i >= from), positions: None }).collect()
        };
        match self.variant {
            Variant::Llama => Ok(Vec::new()),
            Variant::Mistral => Ok(if window.is_some() { windowed(0) } else { Vec::new() }),
            Variant::Qwen2 | Variant::Qwen3 => {
                if !c.bool_or("use_sliding_window", false)? {
                    return Ok(Vec::new());
                }
                match c.layer_types(layers)? {
                    Some(types) => c.layer_attention(&types, window, &RopeDefaults::default()),
                    None => Ok(windowed(c.opt_usize("max_window_layers")?.unwrap_or(layers))),
                }
            }
        }
    }
}

fn tensor_names(bias: AttentionBias, mlp_bias: bool, qk_norm: bool) -> BTreeMap<String, String> {
    let layer = "model.layers.{i}";
    let mut names = TensorNames::default()
        .add("embed", "model.embed_tokens", false)
        .add("final_norm", "model.norm", false)
        .add("lm_head", "lm_head", false)
        .add("layers.{i}.attn_norm", &format!("{layer}.input_layernorm"), false)
        .add("layers.{i}.mlp_norm", &format!("{layer}.post_attention_layernorm"), false);
    for (p, bias) in [("q", bias.qkv), ("k", bias.qkv), ("v", bias.qkv), ("o", bias.out)] {
        names = names.add(&format!("layers.{{i}}.attn.{p}"), &format!("{layer}.self_attn.{p}_proj"), bias);
    }
    if qk_norm {
        for p in ["q", "k"] {
            names = names.add(&format!("layers.{{i}}.attn.{p}_norm"), &format!("{layer}.self_attn.{p}_norm"), false);
        }
    }
    for p in ["gate", "up", "down"] {
        names = names.add(&format!("layers.{{i}}.mlp.{p}"), &format!("{layer}.mlp.{p}_proj"), mlp_bias);
    }
    names.build()
}

/// Conventions from tokenizer.json when there is one, else the Llama-2 tokenizer's.
fn tokenizer(tokenizer_json: Option<&str>, config: &HfConfig) -> Result<TokenizerConventions, String> {
    match tokenizer_json {
        Some(json) => TokenizerConventions::from_checkpoint(json, config),
        None => Ok(TokenizerConventions {
            space_marker: "\u{2581}".into(),
            byte_fallback: true,
            add_bos: true,
            bos: Some("<s>".into()),
            eos: vec!["</s>".into()],
            special_tokens: vec!["<unk>".into(), "<s>".into(), "</s>".into()],
            ..Default::default()
        }),
    }
}

fusellm_sdk::export_plugins!(adapter: [LLAMA, OPENLLAMA, MISTRAL, QWEN2, QWEN3]);
