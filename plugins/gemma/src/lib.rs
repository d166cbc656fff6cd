//! Adapters for Google's Gemma 1, 2 and 3 (text) checkpoints, as transformers'
//! `modeling_gemma`, `modeling_gemma2` and `modeling_gemma3`: RMSNorm scaled by `(1 + w)`,
//! embeddings times sqrt(hidden), a GeGLU MLP with the tanh GELU, and from Gemma 2 on
//! sandwich norms, `query_pre_attn_scalar` and alternating sliding and global layers;
//! Gemma 2 soft-caps the scores and the logits, Gemma 3 normalises q and k per head and
//! gives its local layers a RoPE base of their own.

use std::collections::BTreeMap;

use fusellm_sdk::adapter::{
    AttentionBias, AttentionSpec, LayerAttention, MlpKind, MlpSpec, NormKind, Positions, QkvLayout, Residual,
    RopeDefaults, RopeScaling,
};
use fusellm_sdk::{
    CheckpointFiles, HfConfig, ModelAdapter, ModelSpec, Params, PluginInfo, PluginKind, TensorNames,
    TokenizerConventions,
};

#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Generation {
    One,
    Two,
    Three,
}

pub struct Gemma {
    name: &'static str,
    doc: &'static str,
    generation: Generation,
}

pub const GEMMA: Gemma =
    Gemma { name: "gemma", doc: "Gemma (GemmaForCausalLM) checkpoints", generation: Generation::One };
pub const GEMMA2: Gemma =
    Gemma { name: "gemma2", doc: "Gemma 2 (Gemma2ForCausalLM) checkpoints", generation: Generation::Two };
pub const GEMMA3: Gemma = Gemma {
    name: "gemma3_text",
    doc: "Gemma 3 text models (Gemma3ForCausalLM) checkpoints",
    generation: Generation::Three,
};

/// Gemma 3's global layers: theta 1e6 unless the config says otherwise.
const GLOBAL_ROPE: RopeDefaults = RopeDefaults { theta: 1_000_000.0, fraction: 1.0, aliases: &[] };

impl ModelAdapter for Gemma {
    fn info(&self) -> PluginInfo {
        PluginInfo::new(PluginKind::Adapter, self.name, env!("CARGO_PKG_VERSION"), self.doc).handles(&[self.name])
    }

    fn spec(&self, _params: &Params, files: CheckpointFiles<'_>) -> Result<ModelSpec, String> {
        let c = HfConfig::parse(files.config_json)?;
        self.check_activation(&c)?;
        let hidden = c.usize("hidden_size")?;
        let heads = c.usize("num_attention_heads")?;
        let layers = c.usize("num_hidden_layers")?;
        let head_dim = c.opt_usize("head_dim")?.unwrap_or(256);
        let later = self.generation >= Generation::Two;
        let bias = AttentionBias::all(c.bool_or("attention_bias", false)?);
        let softmax_scale = match later {
            true => Some(c.opt_f64("query_pre_attn_scalar")?.unwrap_or(256.0).powf(-0.5)),
            false => None,
        };
        let (softcap, final_softcap) = match self.generation {
            Generation::One => (None, None),
            Generation::Two => {
                (capped(&c, "attn_logit_softcapping", 50.0)?, capped(&c, "final_logit_softcapping", 30.0)?)
            }
            // Gemma 3 keeps attn_logit_softcapping in its config but never applies it.
            Generation::Three => (None, c.opt_f64("final_logit_softcapping")?),
        };
        let rope = match self.generation {
            Generation::Three => GLOBAL_ROPE,
            _ => RopeDefaults::default(),
        };
        let tied = c.bool_or("tie_word_embeddings", true)?;
        let positions = c.rope(Some("full_attention"), &rope)?;
        Ok(ModelSpec {
            model_type: self.name.into(),
            vocab_size: c.usize("vocab_size")?,
            hidden,
            layers,
            max_positions: c.usize("max_position_embeddings")?,
            norm: NormKind::RmsNorm { eps: c.opt_f64("rms_norm_eps")?.unwrap_or(1e-6), offset: 1.0 },
            layer_attention: self.layer_attention(&c, layers, &positions)?,
            positions,
            attention: AttentionSpec {
                heads,
                kv_heads: c.opt_usize("num_key_value_heads")?.unwrap_or(heads),
                head_dim,
                qkv: QkvLayout::Split,
                bias,
                clip_qkv: None,
                softmax_scale,
                qk_norm: self.generation == Generation::Three,
                softcap,
            },
            mlp: MlpSpec {
                kind: MlpKind::GeGlu,
                hidden: c.usize("intermediate_size")?,
                bias: false,
                fused_gate_up: false,
            },
            residual: Residual::Sequential,
            tied_embeddings: tied,
            tensor_names: self.tensor_names(bias),
            tokenizer: TokenizerConventions::from_checkpoint(files.tokenizer_json.unwrap_or("{}"), &c)?,
            embed_scale: Some((hidden as f64).sqrt()),
            final_softcap,
            post_norms: later,
        })
    }
}

/// A soft-cap that defaults to `default` when absent and is off when null.
fn capped(c: &HfConfig, key: &str, default: f64) -> Result<Option<f64>, String> {
    match c.is_null(key) {
        true => Ok(None),
        false => Ok(Some(c.opt_f64(key)?.unwrap_or(default))),
    }
}

impl Gemma {
    /// Gemma uses GELU in its tanh approximation; Gemma 1 configs often say `gelu`, which
    /// transformers reads as that.
    fn check_activation(&self, c: &HfConfig) -> Result<(), String> {
        let key = if c.str("hidden_activation").is_some() { "hidden_activation" } else { "hidden_act" };
        let allowed: &[&str] = match self.generation {
            Generation::One => &["gelu_pytorch_tanh", "gelu_tanh", "gelu"],
            _ => &["gelu_pytorch_tanh", "gelu_tanh"],
        };
        match c.str(key) {
            Some(act) if !allowed.contains(&act) => Err(format!(
                "config.json: {key} `{act}` is not supported by the {} adapter (expected gelu_pytorch_tanh)",
                self.name
            )),
            _ => Ok(()),
        }
    }

    /// Sliding and global layers: `layer_types` where the config has it, else the
    /// generation's pattern (Gemma 2: even layers slide; Gemma 3: all but every
    /// `sliding_window_pattern`-th).
    /// A layer's positions are left unset where they are the model's (`global`), so that
    /// both config layouts give one spec.
    fn layer_attention(&self, c: &HfConfig, layers: usize, global: &Positions) -> Result<Vec<LayerAttention>, String> {
        if self.generation == Generation::One {
            return Ok(Vec::new());
        }
        let window = Some(c.opt_usize("sliding_window")?.unwrap_or(4096));
        let types = match c.layer_types(layers)? {
            Some(types) => types,
            None => {
                let pattern = c.opt_usize("sliding_window_pattern")?.unwrap_or(6).max(1);
                let sliding = |i: usize| match self.generation {
                    Generation::Two => i.is_multiple_of(2),
                    _ => !(i + 1).is_multiple_of(pattern),
                };
                let name = |i| if sliding(i) { "sliding_attention" } else { "full_attention" };
                (0..layers).map(|i| name(i).to_string()).collect()
            }
        };
        let mut per_layer = c.layer_attention(&types, window, &RopeDefaults::default())?;
        if self.generation == Generation::Three {
            // transformers 4 gives the local layers `rope_local_base_freq`, unscaled.
            let local = Positions::Rope {
                theta: c.opt_f64("rope_local_base_freq")?.unwrap_or(10_000.0),
                fraction: 1.0,
                scaling: RopeScaling::None,
            };
            for layer in per_layer.iter_mut().filter(|l| l.window.is_some() && l.positions.is_none()) {
                layer.positions = Some(local.clone());
            }
        }
        for layer in per_layer.iter_mut().filter(|l| l.positions.as_ref() == Some(global)) {
            layer.positions = None;
        }
        Ok(per_layer)
    }

    fn tensor_names(&self, bias: AttentionBias) -> BTreeMap<String, String> {
        let layer = "model.layers.{i}";
        let norms: &[(&str, &str)] = match self.generation {
            Generation::One => &[("attn_norm", "input_layernorm"), ("mlp_norm", "post_attention_layernorm")],
            _ => &[
                ("attn_norm", "input_layernorm"),
                ("attn_post_norm", "post_attention_layernorm"),
                ("mlp_norm", "pre_feedforward_layernorm"),
                ("mlp_post_norm", "post_feedforward_layernorm"),
            ],
        };
        let mut names = TensorNames::default()
            .add("embed", "model.embed_tokens", false)
            .add("final_norm", "model.norm", false)
            .add("lm_head", "lm_head", false);
        for (ours, theirs) in norms {
            names = names.add(&format!("layers.{{i}}.{ours}"), &format!("{layer}.{theirs}"), false);
        }
        for (p, bias) in [("q", bias.qkv), ("k", bias.qkv), ("v", bias.qkv), ("o", bias.out)] {
            names = names.add(&format!("layers.{{i}}.attn.{p}"), &format!("{layer}.self_attn.{p}_proj"), bias);
        }
        if self.generation == Generation::Three {
            for p in ["q", "k"] {
                names =
                    names.add(&format!("layers.{{i}}.attn.{p}_norm"), &format!("{layer}.self_attn.{p}_norm"), false);
            }
        }
        for p in ["gate", "up", "down"] {
            names = names.add(&format!("layers.{{i}}.mlp.{p}"), &format!("{layer}.mlp.{p}_proj"), false);
        }
        names.build()
    }
}

fusellm_sdk::export_plugins!(adapter: [GEMMA, GEMMA2, GEMMA3]);
