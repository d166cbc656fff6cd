//! The adapter for MosaicML's MPT: LayerNorm, ALiBi, one fused QKV projection, a GELU MLP,
//! tied embeddings, as transformers' `modeling_mpt`.

use std::collections::BTreeMap;

use fusellm_sdk::adapter::{AttentionSpec, MlpKind, MlpSpec, NormKind, Positions, QkvLayout, Residual};
use fusellm_sdk::{
    CheckpointFiles, HfConfig, ModelAdapter, ModelSpec, Params, PluginInfo, PluginKind, TokenizerConventions,
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
        if let Some(norm) = c.str("norm_type").filter(|n| !matches!(*n, "low_precision_layernorm" | "layernorm")) {
            return Err(format!("config.json: norm_type `{norm}` is not supported for MPT (expected layernorm)"));
        }
        let hidden = c.usize("d_model")?;
        let heads = c.usize("n_heads")?;
        let bias = !c.bool_or("no_bias", true)?;
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
                bias,
                clip_qkv: attn.opt_f64("clip_qkv")?,
                softmax_scale: attn.opt_f64("softmax_scale")?,
            },
            mlp: MlpSpec { kind: MlpKind::Gelu, hidden: c.opt_usize("expansion_ratio")?.unwrap_or(4) * hidden, bias },
            residual: Residual::Sequential,
            tied_embeddings: c.bool_or("tie_word_embeddings", true)?,
            tensor_names: tensor_names(bias),
            tokenizer: tokenizer(files.tokenizer_json)?,
        })
    }
}

fn tensor_names(bias: bool) -> BTreeMap<String, String> {
    let weights = [
        ("embed", "transformer.wte"),
        ("final_norm", "transformer.norm_f"),
        ("layers.{i}.attn_norm", "transformer.blocks.{i}.norm_1"),
        ("layers.{i}.mlp_norm", "transformer.blocks.{i}.norm_2"),
        ("layers.{i}.attn.qkv", "transformer.blocks.{i}.attn.Wqkv"),
        ("layers.{i}.attn.o", "transformer.blocks.{i}.attn.out_proj"),
        ("layers.{i}.mlp.up", "transformer.blocks.{i}.ffn.up_proj"),
        ("layers.{i}.mlp.down", "transformer.blocks.{i}.ffn.down_proj"),
    ];
    let suffixes: &[&str] = if bias { &["weight", "bias"] } else { &["weight"] };
    weights
        .iter()
        .flat_map(|(ours, theirs)| suffixes.iter().map(move |s| (format!("{ours}.{s}"), format!("{theirs}.{s}"))))
        .filter(|(ours, _)| ours != "embed.bias")
        .collect()
}

/// Conventions from tokenizer.json when there is one, else GPT-NeoX's; MPT adds no BOS.
fn tokenizer(tokenizer_json: Option<&str>) -> Result<TokenizerConventions, String> {
    let mut conventions = match tokenizer_json {
        Some(json) => TokenizerConventions::from_tokenizer_json(json)?,
        None => TokenizerConventions {
            space_marker: "\u{0120}".into(),
            byte_level: true,
            special_tokens: vec!["<|endoftext|>".into(), "<|padding|>".into()],
            ..Default::default()
        },
    };
    conventions.add_bos = false;
    conventions.bos = None;
    conventions.eos = Some("<|endoftext|>".into());
    Ok(conventions)
}

fusellm_sdk::export_plugins!(adapter: [Mpt]);
