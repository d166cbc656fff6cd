//! The adapter for MosaicML's MPT: LayerNorm, ALiBi, one fused QKV projection, a GELU MLP,
//! tied embeddings, as transformers' `modeling_mpt`.

use std::collections::BTreeMap;

use fusellm_sdk::adapter::{AttentionBias, AttentionSpec, MlpKind, MlpSpec, NormKind, Positions, QkvLayout, Residual};
use fusellm_sdk::{
    CheckpointFiles, HfConfig, ModelAdapter, ModelSpec, Params, PluginInfo, PluginKind, TensorNames,
    TokenizerConventions,
};

pub struct Mpt;

impl ModelAdapter for Mpt {
    fn info(&self) -> PluginInfo {
        PluginInfo::new(PluginKind::Adapter, "mpt", env!("CARGO_PKG_VERSION"), "MPT (MptForCausalLM) checkpoints")
            .handles(&["mpt"])
    }

    fn spec(&self, _params: &Params, files: CheckpointFiles<'_>) -> Result<ModelSpec, String> {
        let c = HfConfig::parse(files.config_json)?;
        let attn = c.section("attn_config")?;
        if !attn.bool_or("alibi", true)? {
            return Err("config.json: attn_config.alibi = false (learned positions) is not supported for MPT".into());
        }
        if attn.bool_or("qk_ln", false)? {
            return Err("config.json: attn_config.qk_ln = true is not supported for MPT".into());
        }
        if let Some(kind) = attn.str("attn_type").filter(|t| *t != "multihead_attention") {
            return Err(format!("config.json: attn_config.attn_type `{kind}` is not supported for MPT"));
        }
        if let Some(kind) = c.section("ffn_config")?.str("ffn_type").filter(|t| *t != "mptmlp") {
            return Err(format!(
                "config.json: ffn_config.ffn_type `{kind}` is not supported for MPT (expected mptmlp)"
            ));
        }
        if let Some(norm) = c.str("norm_type").filter(|n| !matches!(*n, "low_precision_layernorm" | "layernorm")) {
            return Err(format!("config.json: norm_type `{norm}` is not supported for MPT (expected layernorm)"));
        }
        let hidden = c.usize("d_model")?;
        let heads = c.usize("n_heads")?;
        let bias = !c.bool_or("no_bias", true)?;
        let tied = c.bool_or("tie_word_embeddings", true)?;
        Ok(ModelSpec {
            model_type: "mpt".into(),
            vocab_size: c.usize("vocab_size")?,
            hidden,
            layers: c.usize("n_layers")?,
            max_positions: c.usize("max_seq_len")?,
            norm: NormKind::LayerNorm { eps: c.opt_f64("layer_norm_epsilon")?.unwrap_or(1e-5), bias },
            positions: Positions::Alibi { max_bias: attn.opt_f64("alibi_bias_max")?.unwrap_or(8.0) },
            attention: AttentionSpec {
                heads,
                kv_heads: heads,
                head_dim: hidden / heads.max(1),
                qkv: QkvLayout::Chunked,
                bias: AttentionBias::all(bias),
                clip_qkv: attn.opt_f64("clip_qkv")?,
                softmax_scale: attn.opt_f64("softmax_scale")?,
                qk_norm: false,
                softcap: None,
            },
            mlp: MlpSpec {
                kind: MlpKind::Gelu,
                hidden: c.opt_usize("expansion_ratio")?.unwrap_or(4) * hidden,
                bias,
                fused_gate_up: false,
            },
            residual: Residual::Sequential,
            tied_embeddings: tied,
            tensor_names: tensor_names(bias, tied),
            embed_scale: None,
            final_softcap: None,
            post_norms: false,
            layer_attention: Vec::new(),
            tokenizer: tokenizer(files.tokenizer_json, &c)?,
        })
    }
}

fn tensor_names(bias: bool, tied: bool) -> BTreeMap<String, String> {
    let block = "transformer.blocks.{i}";
    let names = TensorNames::default()
        .add("embed", "transformer.wte", false)
        .add("final_norm", "transformer.norm_f", bias)
        .add("layers.{i}.attn_norm", &format!("{block}.norm_1"), bias)
        .add("layers.{i}.mlp_norm", &format!("{block}.norm_2"), bias)
        .add("layers.{i}.attn.qkv", &format!("{block}.attn.Wqkv"), bias)
        .add("layers.{i}.attn.o", &format!("{block}.attn.out_proj"), bias)
        .add("layers.{i}.mlp.up", &format!("{block}.ffn.up_proj"), bias)
        .add("layers.{i}.mlp.down", &format!("{block}.ffn.down_proj"), bias);
    if tied { names } else { names.add("lm_head", "lm_head", false) }.build()
}

/// Conventions from tokenizer.json when there is one, else GPT-NeoX's; MPT adds no BOS.
fn tokenizer(tokenizer_json: Option<&str>, config: &HfConfig) -> Result<TokenizerConventions, String> {
    let mut conventions = match tokenizer_json {
        Some(json) => TokenizerConventions::from_checkpoint(json, config)?,
        None => TokenizerConventions {
            space_marker: "\u{0120}".into(),
            byte_level: true,
            special_tokens: vec!["<|endoftext|>".into(), "<|padding|>".into()],
            ..Default::default()
        },
    };
    conventions.add_bos = false;
    conventions.bos = None;
    if conventions.eos.is_empty() {
        conventions.eos = vec!["<|endoftext|>".into()];
    }
    Ok(conventions)
}

fusellm_sdk::export_plugins!(adapter: [Mpt]);
