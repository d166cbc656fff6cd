//! Adapters for the Llama family (Llama-2 and OpenLLaMA share `LlamaForCausalLM`): RMSNorm,
//! rotary positions, grouped-query attention, SwiGLU, as transformers' `modeling_llama`.

use std::collections::BTreeMap;

use fusellm_sdk::adapter::{AttentionSpec, MlpKind, MlpSpec, NormKind, Positions, QkvLayout, Residual};
use fusellm_sdk::{
    CheckpointFiles, HfConfig, ModelAdapter, ModelSpec, Params, PluginInfo, PluginKind, TensorNames,
    TokenizerConventions,
};

/// One member of the family: the spec is the same, the name says which checkpoints and
/// tokenizer a config means.
pub struct Llama {
    name: &'static str,
    doc: &'static str,
}

pub const LLAMA: Llama = Llama { name: "llama", doc: "Llama-2 (LlamaForCausalLM) checkpoints" };
pub const OPENLLAMA: Llama =
    Llama { name: "openllama", doc: "OpenLLaMA checkpoints (LlamaForCausalLM, OpenLLaMA tokenizer)" };

impl ModelAdapter for Llama {
    fn info(&self) -> PluginInfo {
        PluginInfo::new(PluginKind::Adapter, self.name, env!("CARGO_PKG_VERSION"), self.doc).handles(&["llama"])
    }

    fn spec(&self, _params: &Params, files: CheckpointFiles<'_>) -> Result<ModelSpec, String> {
        let c = HfConfig::parse(files.config_json)?;
        if let Some(act) = c.str("hidden_act").filter(|a| *a != "silu") {
            return Err(format!(
                "config.json: hidden_act `{act}` is not supported by the llama adapter (expected silu)"
            ));
        }
        for section in ["rope_scaling", "rope_parameters"] {
            let scaling = c.section(section)?;
            if let Some(kind) = scaling.str("rope_type").or(scaling.str("type")).filter(|t| *t != "default") {
                return Err(format!("config.json: {section} of type `{kind}` is not supported (only unscaled RoPE)"));
            }
        }
        let hidden = c.usize("hidden_size")?;
        let heads = c.usize("num_attention_heads")?;
        let theta = match c.opt_f64("rope_theta")? {
            Some(t) => t,
            None => c.section("rope_parameters")?.opt_f64("rope_theta")?.unwrap_or(10_000.0),
        };
        let attention_bias = c.bool_or("attention_bias", false)?;
        let mlp_bias = c.bool_or("mlp_bias", false)?;
        Ok(ModelSpec {
            model_type: c.str("model_type").unwrap_or("llama").into(),
            vocab_size: c.usize("vocab_size")?,
            hidden,
            layers: c.usize("num_hidden_layers")?,
            max_positions: c.usize("max_position_embeddings")?,
            norm: NormKind::RmsNorm { eps: c.f64("rms_norm_eps")? },
            positions: Positions::Rope { theta, fraction: 1.0 },
            attention: AttentionSpec {
                heads,
                kv_heads: c.opt_usize("num_key_value_heads")?.unwrap_or(heads),
                head_dim: c.opt_usize("head_dim")?.unwrap_or(hidden / heads.max(1)),
                qkv: QkvLayout::Split,
                bias: attention_bias,
                clip_qkv: None,
                softmax_scale: None,
            },
            mlp: MlpSpec { kind: MlpKind::SwiGlu, hidden: c.usize("intermediate_size")?, bias: mlp_bias },
            residual: Residual::Sequential,
            tied_embeddings: c.bool_or("tie_word_embeddings", false)?,
            tensor_names: tensor_names(attention_bias, mlp_bias),
            tokenizer: tokenizer(files.tokenizer_json)?,
        })
    }
}

fn tensor_names(attention_bias: bool, mlp_bias: bool) -> BTreeMap<String, String> {
    let layer = "model.layers.{i}";
    let mut names = TensorNames::default()
        .add("embed", "model.embed_tokens", false)
        .add("final_norm", "model.norm", false)
        .add("lm_head", "lm_head", false)
        .add("layers.{i}.attn_norm", &format!("{layer}.input_layernorm"), false)
        .add("layers.{i}.mlp_norm", &format!("{layer}.post_attention_layernorm"), false);
    for p in ["q", "k", "v", "o"] {
        names = names.add(&format!("layers.{{i}}.attn.{p}"), &format!("{layer}.self_attn.{p}_proj"), attention_bias);
    }
    for p in ["gate", "up", "down"] {
        names = names.add(&format!("layers.{{i}}.mlp.{p}"), &format!("{layer}.mlp.{p}_proj"), mlp_bias);
    }
    names.build()
}

/// Conventions from tokenizer.json when there is one, else the Llama-2 tokenizer's.
fn tokenizer(tokenizer_json: Option<&str>) -> Result<TokenizerConventions, String> {
    let mut conventions = match tokenizer_json {
        Some(json) => TokenizerConventions::from_tokenizer_json(json)?,
        None => TokenizerConventions {
            space_marker: "\u{2581}".into(),
            byte_fallback: true,
            add_bos: true,
            bos: Some("<s>".into()),
            special_tokens: vec!["<unk>".into(), "<s>".into(), "</s>".into()],
            ..Default::default()
        },
    };
    conventions.eos = Some("</s>".into());
    Ok(conventions)
}

fusellm_sdk::export_plugins!(adapter: [LLAMA, OPENLLAMA]);
