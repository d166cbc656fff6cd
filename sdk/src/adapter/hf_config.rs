//! Reading a Hugging Face config.json: typed getters with errors that name the key, and
//! the parts every family shares (head width, RoPE in transformers 4's and 5's layouts,
//! per-layer attention types), so that an adapter states only what is its own.

use super::{LayerAttention, Positions, RopeScaling};

/// What a family assumes where its config.json says nothing about RoPE.
#[derive(Clone, Copy, Debug)]
pub struct RopeDefaults {
    pub theta: f64,
    pub fraction: f64,
    /// RoPE type names a family's configs use for another type (Phi-3: `yarn` is longrope).
    pub aliases: &'static [(&'static str, &'static str)],
}

impl Default for RopeDefaults {
    fn default() -> Self {
        Self { theta: 10_000.0, fraction: 1.0, aliases: &[] }
    }
}

/// Reads what every adapter needs from a Hugging Face config.json.
pub struct HfConfig(serde_json::Map<String, serde_json::Value>);

impl HfConfig {
    pub fn parse(config_json: &str) -> Result<Self, String> {
        match serde_json::from_str(config_json) {
            Ok(serde_json::Value::Object(map)) => Ok(Self(map)),
            Ok(_) => Err("config.json is not a JSON object".into()),
            Err(e) => Err(format!("config.json is not valid JSON: {e}")),
        }
    }

    pub fn get(&self, key: &str) -> Option<&serde_json::Value> {
        self.0.get(key).filter(|v| !v.is_null())
    }

    /// Whether `key` is present and null (a feature switched off, where absence means its
    /// default).
    pub fn is_null(&self, key: &str) -> bool {
        self.0.get(key).is_some_and(|v| v.is_null())
    }

    /// A nested object (`attn_config` of MPT), as a config of its own.
    pub fn section(&self, key: &str) -> Result<HfConfig, String> {
        match self.get(key) {
            Some(serde_json::Value::Object(map)) => Ok(HfConfig(map.clone())),
            Some(_) => Err(format!("config.json: `{key}` must be an object")),
            None => Ok(HfConfig(Default::default())),
        }
    }

    pub fn usize(&self, key: &str) -> Result<usize, String> {
        self.opt_usize(key)?.ok_or_else(|| format!("config.json: missing `{key}` (a positive integer)"))
    }

    pub fn opt_usize(&self, key: &str) -> Result<Option<usize>, String> {
        self.get(key)
            .map(|v| {
                v.as_u64()
                    .map(|n| n as usize)
                    .ok_or_else(|| format!("config.json: `{key}` must be a non-negative integer, found {v}"))
            })
            .transpose()
    }

    pub fn f64(&self, key: &str) -> Result<f64, String> {
        self.opt_f64(key)?.ok_or_else(|| format!("config.json: missing `{key}` (a number)"))
    }

    pub fn opt_f64(&self, key: &str) -> Result<Option<f64>, String> {
        self.get(key)
            .map(|v| v.as_f64().ok_or_else(|| format!("config.json: `{key}` must be a number, found {v}")))
            .transpose()
    }

    pub fn bool_or(&self, key: &str, default: bool) -> Result<bool, String> {
        self.get(key)
            .map(|v| v.as_bool().ok_or_else(|| format!("config.json: `{key}` must be a boolean, found {v}")))
            .unwrap_or(Ok(default))
    }

    pub fn str(&self, key: &str) -> Option<&str> {
        self.get(key).and_then(|v| v.as_str())
    }

    /// A list of numbers (longrope's factors).
    pub fn f64_list(&self, key: &str) -> Result<Vec<f64>, String> {
        let bad = || format!("config.json: `{key}` must be a list of numbers");
        match self.get(key) {
            Some(serde_json::Value::Array(items)) => items.iter().map(|v| v.as_f64().ok_or_else(bad)).collect(),
            Some(_) => Err(bad()),
            None => Err(format!("config.json: missing `{key}` (a list of numbers)")),
        }
    }

    /// The width of an attention head: `head_dim` where the config gives it (Qwen3 and
    /// Gemma choose it freely), else `hidden_size / num_attention_heads`, which must divide.
    /// Token ids written as one integer or a list (`eos_token_id`); none when absent.
    pub fn id_list(&self, key: &str) -> Result<Vec<u64>, String> {
        let bad = || format!("config.json: `{key}` must be a token id or a list of token ids");
        match self.get(key) {
            None => Ok(Vec::new()),
            Some(serde_json::Value::Array(ids)) => ids.iter().map(|v| v.as_u64().ok_or_else(bad)).collect(),
            Some(v) => v.as_u64().map(|id| vec![id]).ok_or_else(bad),
        }
    }

    pub fn head_dim(&self, hidden: usize, heads: usize) -> Result<usize, String> {
        if let Some(d) = self.opt_usize("head_dim")? {
            return match d {
                0 => Err("config.json: `head_dim` must be positive".into()),
                d => Ok(d),
            };
        }
        if heads == 0 || !hidden.is_multiple_of(heads) {
            return Err(format!(
                "config.json: hidden_size {hidden} is not a multiple of num_attention_heads {heads}, and no `head_dim` says the width of a head"
            ));
        }
        Ok(hidden / heads)
    }

    /// RoPE as the config describes it, for the layers of `layer_type` (`None`: the
    /// model's), with a family's defaults. Both layouts: transformers 5's `rope_parameters`
    /// (also nested per layer type, as Gemma 3 writes it) and transformers 4's top-level
    /// `rope_theta` with `rope_scaling`; `partial_rotary_factor` (or GPT-NeoX's
    /// `rotary_pct`) wherever it is.
    pub fn rope(&self, layer_type: Option<&str>, defaults: &RopeDefaults) -> Result<Positions, String> {
        let mut params = self.section("rope_parameters")?;
        if let Some(kind) = layer_type.filter(|t| params.get(t).is_some()) {
            params = params.section(kind)?;
        }
        let legacy = self.section("rope_scaling")?;
        let first = |keys: &[&str]| -> Result<Option<f64>, String> {
            for key in keys {
                if let Some(v) = params.opt_f64(key)?.or(self.opt_f64(key)?) {
                    return Ok(Some(v));
                }
            }
            Ok(None)
        };
        let theta = first(&["rope_theta", "rotary_emb_base"])?.unwrap_or(defaults.theta);
        let fraction = first(&["partial_rotary_factor", "rotary_pct"])?.unwrap_or(defaults.fraction);
        let kind_of = |c: &HfConfig| c.str("rope_type").or(c.str("type")).map(str::to_string);
        // transformers 5 writes the scaling into rope_parameters; 4 into rope_scaling.
        let (scaling, kind) = match (kind_of(&params), kind_of(&legacy)) {
            (Some(kind), _) if kind != "default" => (&params, kind),
            (_, Some(kind)) => (&legacy, kind),
            (kind, None) => (&params, kind.unwrap_or_else(|| "default".into())),
        };
        let kind = defaults.aliases.iter().find(|(from, _)| *from == kind).map_or(kind.as_str(), |(_, to)| to);
        Ok(Positions::Rope { theta, fraction, scaling: self.rope_scaling(scaling, kind)? })
    }

    /// The frequencies' scaling of RoPE type `kind`, read from `s` (the section that names
    /// the type). A top-level `original_max_position_embeddings` wins over the section's,
    /// as transformers reads Phi-3's configs.
    fn rope_scaling(&self, s: &HfConfig, kind: &str) -> Result<RopeScaling, String> {
        let max_positions = self.opt_usize("max_position_embeddings")?;
        let original = match self.opt_usize("original_max_position_embeddings")? {
            Some(n) => Some(n),
            None => s.opt_usize("original_max_position_embeddings")?,
        };
        let need = |what: &str, value: Option<usize>| {
            value.filter(|&n| n > 0).ok_or_else(|| format!("config.json: RoPE type `{kind}` needs a positive `{what}`"))
        };
        let original = || need("original_max_position_embeddings", original.or(max_positions));
        // Long-context variants state the extension as a factor or as two context lengths.
        let factor_or_ratio = |original: usize| -> Result<f64, String> {
            Ok(match (s.opt_f64("factor")?, max_positions) {
                (Some(f), _) => f,
                (None, Some(m)) => m as f64 / original as f64,
                (None, None) => 1.0,
            })
        };
        Ok(match kind {
            "default" => RopeScaling::None,
            "linear" => RopeScaling::Linear { factor: s.f64("factor")? },
            "dynamic" => RopeScaling::Dynamic {
                factor: s.f64("factor")?,
                original: need("max_position_embeddings", max_positions)?,
            },
            "llama3" => RopeScaling::Llama3 {
                factor: s.f64("factor")?,
                low_freq_factor: s.f64("low_freq_factor")?,
                high_freq_factor: s.f64("high_freq_factor")?,
                original: original()?,
            },
            "longrope" | "su" => {
                let original = original()?;
                let factor = factor_or_ratio(original)?;
                let attention_factor = match s.opt_f64("attention_factor")? {
                    Some(a) => a,
                    None if factor <= 1.0 => 1.0,
                    None => (1.0 + factor.ln() / (original as f64).ln()).sqrt(),
                };
                RopeScaling::LongRope {
                    short_factor: s.f64_list("short_factor")?,
                    long_factor: s.f64_list("long_factor")?,
                    original,
                    attention_factor,
                }
            }
            "yarn" => {
                let original = original()?;
                let factor = factor_or_ratio(original)?;
                let mscale = |m: f64| if factor <= 1.0 { 1.0 } else { 0.1 * m * factor.ln() + 1.0 };
                let given = (s.opt_f64("attention_factor")?, s.opt_f64("mscale")?, s.opt_f64("mscale_all_dim")?);
                let attention_factor = match given {
                    (Some(a), _, _) => a,
                    (None, Some(m), Some(all)) if m != 0.0 && all != 0.0 => mscale(m) / mscale(all),
                    _ => mscale(1.0),
                };
                RopeScaling::Yarn {
                    factor,
                    original,
                    beta_fast: s.opt_f64("beta_fast")?.unwrap_or(32.0),
                    beta_slow: s.opt_f64("beta_slow")?.unwrap_or(1.0),
                    attention_factor,
                    truncate: s.bool_or("truncate", true)?,
                }
            }
            other => {
                return Err(format!(
                    "config.json: RoPE type `{other}` is not supported; supported: default, linear, dynamic, llama3, longrope (su), yarn"
                ))
            }
        })
    }

    /// `layer_types` (transformers 5: "full_attention" or "sliding_attention" per layer),
    /// checked to have one entry per layer; `None` when the config has none.
    pub fn layer_types(&self, layers: usize) -> Result<Option<Vec<String>>, String> {
        let Some(value) = self.get("layer_types") else { return Ok(None) };
        let bad = || format!("config.json: `layer_types` must be a list of strings, found {value}");
        let types: Vec<String> = value
            .as_array()
            .ok_or_else(bad)?
            .iter()
            .map(|t| t.as_str().map(str::to_string).ok_or_else(bad))
            .collect::<Result<_, _>>()?;
        if types.len() != layers {
            return Err(format!(
                "config.json: `layer_types` has {} entries for num_hidden_layers = {layers}; give one per layer",
                types.len()
            ));
        }
        if let Some(t) = types.iter().find(|t| !matches!(t.as_str(), "full_attention" | "sliding_attention")) {
            return Err(format!(
                "config.json: layer type `{t}` is not supported; supported: full_attention, sliding_attention"
            ));
        }
        Ok(Some(types))
    }

    /// One [`LayerAttention`] per layer from per-layer types: a sliding layer gets
    /// `window` and the RoPE of its type where the config gives one of its own.
    pub fn layer_attention(
        &self,
        types: &[String],
        window: Option<usize>,
        defaults: &RopeDefaults,
    ) -> Result<Vec<LayerAttention>, String> {
        let nested = self.section("rope_parameters")?;
        types
            .iter()
            .map(|t| {
                let sliding = t == "sliding_attention";
                if sliding && window.is_none() {
                    return Err("config.json: a layer is `sliding_attention` but `sliding_window` is not set".into());
                }
                let positions = nested.get(t).is_some().then(|| self.rope(Some(t), defaults)).transpose()?;
                Ok(LayerAttention { window: window.filter(|_| sliding), positions })
            })
            .collect()
    }
}
