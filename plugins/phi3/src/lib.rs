//! The adapter for Microsoft's Phi-3 (and Phi-3.5, Phi-4 mini) checkpoints, as
//! transformers' `modeling_phi3`: Llama's blocks with one fused `qkv_proj` (rows
//! [q | k | v], k and v of the key-value heads) and one `gate_up_proj` (rows [gate | up]),
//! partial rotary embeddings and `longrope` scaling.

use std::collections::BTreeMap;

use fusellm_sdk::adapter::{
    AttentionBias, AttentionSpec, LayerAttention, MlpKind, MlpSpec, NormKind, QkvLayout, Residual, RopeDefaults,
};
use fusellm_sdk::{
    CheckpointFiles, HfConfig, ModelAdapter, ModelSpec, Params, PluginInfo, PluginKind, TensorNames,
    TokenizerConventions,
};

pub struct Phi3;

/// Phi-3's configs call longrope `su` (early releases) and `yarn` (Phi-3.5 MoE and vision).
const ROPE: RopeDefaults = RopeDefaults { theta: 10_000.0, fraction: 1.0, aliases: &[("yarn", "longrope")] };

impl ModelAdapter for Phi3 {
    fn info(&self) -> PluginInfo {
        PluginInfo::new(PluginKind::Adapter, "phi3", env!("CARGO_PKG_VERSION"), "Phi-3 (Phi3ForCausalLM) checkpoints")
            .handles(&["phi3"])
    }

    fn spec(&self, _params: &Params, files: CheckpointFiles<'_>) -> Result<ModelSpec, String> {
        let c = HfConfig::parse(files.config_json)?;
        if let Some(act) = c.str("hidden_act").filter(|a| *a != "silu") {
            return Err(format!(
                "config.json: hidden_act `{act}` is not supported by the phi3 adapter (expected silu)"
            ));
        }
        let hidden = c.usize("hidden_size")?;
        let heads = c.usize("num_attention_heads")?;
        let layers = c.usize("num_hidden_layers")?;
        let window = c.opt_usize("sliding_window")?;
        Ok(ModelSpec {
            model_type: "phi3".into(),
            vocab_size: c.usize("vocab_size")?,
            hidden,
            layers,
            max_positions: c.usize("max_position_embeddings")?,
            norm: NormKind::RmsNorm { eps: c.opt_f64("rms_norm_eps")?.unwrap_or(1e-5), offset: 0.0 },
            positions: c.rope(None, &ROPE)?,
            attention: AttentionSpec {
                heads,
                kv_heads: c.opt_usize("num_key_value_heads")?.unwrap_or(heads),
                head_dim: c.head_dim(hidden, heads)?,
                qkv: QkvLayout::Chunked,
                bias: AttentionBias::NONE,
                clip_qkv: None,
                softmax_scale: None,
                qk_norm: false,
                softcap: None,
            },
            mlp: MlpSpec {
                kind: MlpKind::SwiGlu,
                hidden: c.usize("intermediate_size")?,
                bias: false,
                fused_gate_up: true,
            },
            residual: Residual::Sequential,
            tied_embeddings: c.bool_or("tie_word_embeddings", false)?,
            tensor_names: tensor_names(),
            tokenizer: TokenizerConventions::from_checkpoint(files.tokenizer_json.unwrap_or("{}"), &c)?,
            embed_scale: None,
            final_softcap: None,
            post_norms: false,
            layer_attention: match window {
                Some(w) => (0..layers).map(|_| LayerAttention { window: Some(w), positions: None }).collect(),
                None => Vec::new(),
            },
        })
    }
}

fn tensor_names() -> BTreeMap<String, String> {
    let layer = "model.layers.{i}";
    TensorNames::default()
        .add("embed", "model.embed_tokens", false)
        .add("final_norm", "model.norm", false)
        .add("lm_head", "lm_head", false)
        .add("layers.{i}.attn_norm", &format!("{layer}.input_layernorm"), false)
        .add("layers.{i}.mlp_norm", &format!("{layer}.post_attention_layernorm"), false)
        .add("layers.{i}.attn.qkv", &format!("{layer}.self_attn.qkv_proj"), false)
        .add("layers.{i}.attn.o", &format!("{layer}.self_attn.o_proj"), false)
        .add("layers.{i}.mlp.gate_up", &format!("{layer}.mlp.gate_up_proj"), false)
        .add("layers.{i}.mlp.down", &format!("{layer}.mlp.down_proj"), false)
        .build()
}

fusellm_sdk::export_plugins!(adapter: [Phi3]);
