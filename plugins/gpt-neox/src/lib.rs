//! The adapter for GPT-NeoX and Pythia: parallel residual, rotary embeddings on a fraction
//! of each head, LayerNorm with bias, biased projections, and a fused QKV projection whose
//! rows are grouped per head, as transformers' `modeling_gpt_neox`.

use std::collections::BTreeMap;

use fusellm_sdk::adapter::{
    AttentionBias, AttentionSpec, MlpKind, MlpSpec, NormKind, QkvLayout, Residual, RopeDefaults,
};
use fusellm_sdk::{
    CheckpointFiles, HfConfig, ModelAdapter, ModelSpec, Params, PluginInfo, PluginKind, TensorNames,
    TokenizerConventions,
};

pub struct GptNeox;

/// GPT-NeoX rotates a quarter of each head unless the config says otherwise.
const ROPE: RopeDefaults = RopeDefaults { theta: 10_000.0, fraction: 0.25, aliases: &[] };

impl ModelAdapter for GptNeox {
    fn info(&self) -> PluginInfo {
        let doc = "GPT-NeoX and Pythia (GPTNeoXForCausalLM) checkpoints";
        PluginInfo::new(PluginKind::Adapter, "gpt_neox", env!("CARGO_PKG_VERSION"), doc).handles(&["gpt_neox"])
    }

    fn spec(&self, _params: &Params, files: CheckpointFiles<'_>) -> Result<ModelSpec, String> {
        let c = HfConfig::parse(files.config_json)?;
        if let Some(act) = c.str("hidden_act").filter(|a| *a != "gelu") {
            return Err(format!(
                "config.json: hidden_act `{act}` is not supported by the gpt_neox adapter (expected gelu)"
            ));
        }
        let hidden = c.usize("hidden_size")?;
        let heads = c.usize("num_attention_heads")?;
        let bias = c.bool_or("attention_bias", true)?;
        let tied = c.bool_or("tie_word_embeddings", false)?;
        Ok(ModelSpec {
            model_type: "gpt_neox".into(),
            vocab_size: c.usize("vocab_size")?,
            hidden,
            layers: c.usize("num_hidden_layers")?,
            max_positions: c.usize("max_position_embeddings")?,
            norm: NormKind::LayerNorm { eps: c.opt_f64("layer_norm_eps")?.unwrap_or(1e-5), bias: true },
            positions: c.rope(None, &ROPE)?,
            attention: AttentionSpec {
                heads,
                kv_heads: heads,
                head_dim: c.head_dim(hidden, heads)?,
                qkv: QkvLayout::PerHead,
                bias: AttentionBias::all(bias),
                clip_qkv: None,
                softmax_scale: None,
                qk_norm: false,
                softcap: None,
            },
            mlp: MlpSpec {
                kind: MlpKind::Gelu,
                hidden: c.usize("intermediate_size")?,
                bias: true,
                fused_gate_up: false,
            },
            residual: if c.bool_or("use_parallel_residual", true)? { Residual::Parallel } else { Residual::Sequential },
            tied_embeddings: tied,
            tensor_names: tensor_names(bias, tied),
            tokenizer: match files.tokenizer_json {
                Some(json) => TokenizerConventions::from_checkpoint(json, &c)?,
                None => {
                    TokenizerConventions { space_marker: "\u{0120}".into(), byte_level: true, ..Default::default() }
                }
            },
            embed_scale: None,
            final_softcap: None,
            post_norms: false,
            layer_attention: Vec::new(),
        })
    }
}

fn tensor_names(attention_bias: bool, tied: bool) -> BTreeMap<String, String> {
    let layer = "gpt_neox.layers.{i}";
    let names = TensorNames::default()
        .add("embed", "gpt_neox.embed_in", false)
        .add("final_norm", "gpt_neox.final_layer_norm", true)
        .add("layers.{i}.attn_norm", &format!("{layer}.input_layernorm"), true)
        .add("layers.{i}.mlp_norm", &format!("{layer}.post_attention_layernorm"), true)
        .add("layers.{i}.attn.qkv", &format!("{layer}.attention.query_key_value"), attention_bias)
        .add("layers.{i}.attn.o", &format!("{layer}.attention.dense"), attention_bias)
        .add("layers.{i}.mlp.up", &format!("{layer}.mlp.dense_h_to_4h"), true)
        .add("layers.{i}.mlp.down", &format!("{layer}.mlp.dense_4h_to_h"), true);
    // Checkpoints name the untied head `embed_out`.
    if tied { names } else { names.add("lm_head", "embed_out", false) }.build()
}

fusellm_sdk::export_plugins!(adapter: [GptNeox]);
