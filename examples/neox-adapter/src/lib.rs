//! The template of a third-party model adapter: a crate that depends on fusellm-sdk alone
//! and describes an architecture as data, which fusellm's block library then executes.
//! It describes GPT-NeoX (parallel residual, rotary embeddings on a fraction of each head,
//! LayerNorm with bias, biased projections, a fused QKV projection whose rows are grouped
//! per head, as transformers' `modeling_gpt_neox`) for checkpoints whose config.json says
//! `"model_type": "neox_example"`, so that it never shadows fusellm's built-in `gpt_neox`.

use std::collections::BTreeMap;

use fusellm_sdk::adapter::{AttentionBias, AttentionSpec, MlpKind, MlpSpec, NormKind, Positions, QkvLayout, Residual};
use fusellm_sdk::{
    CheckpointFiles, HfConfig, ModelAdapter, ModelSpec, Params, PluginInfo, PluginKind, TensorNames,
    TokenizerConventions,
};

pub struct GptNeox;

impl ModelAdapter for GptNeox {
    fn info(&self) -> PluginInfo {
        PluginInfo::new(
            PluginKind::Adapter,
            "neox_example",
            "0.1.0",
            "the third-party adapter template: GPT-NeoX-shaped checkpoints of model_type neox_example",
        )
        .handles(&["neox_example"])
    }

    fn spec(&self, _params: &Params, files: CheckpointFiles<'_>) -> Result<ModelSpec, String> {
        let c = HfConfig::parse(files.config_json)?;
        if let Some(act) = c.str("hidden_act").filter(|a| *a != "gelu") {
            return Err(format!("config.json: hidden_act `{act}` is not supported (expected gelu)"));
        }
        let hidden = c.usize("hidden_size")?;
        let heads = c.usize("num_attention_heads")?;
        let bias = c.bool_or("attention_bias", true)?;
        let eps = c.opt_f64("layer_norm_eps")?.unwrap_or(1e-5);
        Ok(ModelSpec {
            model_type: "neox_example".into(),
            vocab_size: c.usize("vocab_size")?,
            hidden,
            layers: c.usize("num_hidden_layers")?,
            max_positions: c.usize("max_position_embeddings")?,
            norm: NormKind::LayerNorm { eps, bias: true },
            positions: Positions::Rope {
                theta: c.opt_f64("rotary_emb_base")?.unwrap_or(10_000.0),
                fraction: c.opt_f64("rotary_pct")?.unwrap_or(0.25),
                scaling: Default::default(),
            },
            attention: AttentionSpec {
                heads,
                kv_heads: heads,
                head_dim: hidden / heads.max(1),
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
            tied_embeddings: c.bool_or("tie_word_embeddings", false)?,
            tensor_names: tensor_names(bias),
            embed_scale: None,
            final_softcap: None,
            post_norms: false,
            layer_attention: Vec::new(),
            tokenizer: match files.tokenizer_json {
                Some(json) => TokenizerConventions::from_checkpoint(json, &c)?,
                None => {
                    TokenizerConventions { space_marker: "\u{0120}".into(), byte_level: true, ..Default::default() }
                }
            },
        })
    }
}

fn tensor_names(attention_bias: bool) -> BTreeMap<String, String> {
    let layer = "gpt_neox.layers.{i}";
    TensorNames::default()
        .add("embed", "gpt_neox.embed_in", false)
        .add("lm_head", "embed_out", false)
        .add("final_norm", "gpt_neox.final_layer_norm", true)
        .add("layers.{i}.attn_norm", &format!("{layer}.input_layernorm"), true)
        .add("layers.{i}.mlp_norm", &format!("{layer}.post_attention_layernorm"), true)
        .add("layers.{i}.attn.qkv", &format!("{layer}.attention.query_key_value"), attention_bias)
        .add("layers.{i}.attn.o", &format!("{layer}.attention.dense"), attention_bias)
        .add("layers.{i}.mlp.up", &format!("{layer}.mlp.dense_h_to_4h"), true)
        .add("layers.{i}.mlp.down", &format!("{layer}.mlp.dense_4h_to_h"), true)
        .build()
}

fusellm_sdk::export_plugins!(adapter: [GptNeox]);
