//! A merge parameter's value as mergekit writes it: a number or a flag, a gradient (a list
//! of numbers interpolated over the layers), or a list of `{filter, value}` conditions
//! chosen by tensor name (the first whose filter is in the name, or that has none).

use serde::{Deserialize, Serialize};

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum Setting {
    Flag(bool),
    Number(f64),
    Gradient(Vec<f64>),
    Conditions(Vec<Condition>),
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Condition {
    pub filter: Option<String>,
    pub value: Setting,
}

impl From<f64> for Setting {
    fn from(v: f64) -> Self {
        Setting::Number(v)
    }
}

impl Setting {
    /// The value for tensor `name` at depth `t` (0 at the first layer, 1 at the last);
    /// `None` when no condition matches. Flags read as 0 or 1.
    pub fn at(&self, name: &str, t: f64) -> Option<f64> {
        match self {
            Setting::Flag(b) => Some(f64::from(u8::from(*b))),
            Setting::Number(v) => Some(*v),
            Setting::Gradient(values) if values.is_empty() => None,
            Setting::Gradient(values) => {
                // Piecewise linear over evenly spaced points, as mergekit interpolates.
                let scaled = t * (values.len() - 1) as f64;
                let i0 = scaled.floor() as usize;
                let i1 = (i0 + 1).min(values.len() - 1);
                let frac = scaled - i0 as f64;
                Some((1.0 - frac) * values[i0] + frac * values[i1])
            }
            Setting::Conditions(conditions) => conditions
                .iter()
                .find(|c| c.filter.as_deref().is_none_or(|f| name.contains(f)))
                .and_then(|c| c.value.at(name, t)),
        }
    }
}

/// Where a tensor sits, as mergekit's `t`: a layer's index over the last index (1 for a
/// model of one layer); the tensors outside the layers (embeddings, final norm, head) at 0.
pub fn depth(name: &str, layers: usize) -> f64 {
    let layer = name.split('.').collect::<Vec<_>>().windows(2).find_map(|w| match w[0] {
        "layers" | "h" | "blocks" => w[1].parse::<usize>().ok(),
        _ => None,
    });
    match layer {
        Some(_) if layers <= 1 => 1.0,
        Some(i) => i as f64 / (layers - 1) as f64,
        None => 0.0,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gradients_interpolate_over_the_layers_and_filters_pick_by_name() {
        let g = Setting::Gradient(vec![0.0, 0.5, 1.0]);
        assert_eq!(g.at("x", 0.0), Some(0.0));
        assert_eq!(g.at("x", 0.25), Some(0.25));
        assert_eq!(g.at("x", 1.0), Some(1.0));
        let yaml: Setting = serde_json::from_value(serde_json::json!([
            { "filter": "self_attn", "value": [0.0, 0.5] },
            { "filter": "mlp", "value": 0.3 },
            { "value": 0.4 },
        ]))
        .unwrap();
        assert_eq!(yaml.at("model.layers.1.self_attn.q_proj.weight", 1.0), Some(0.5));
        assert_eq!(yaml.at("model.layers.0.mlp.up_proj.weight", 0.0), Some(0.3));
        assert_eq!(yaml.at("model.norm.weight", 1.0), Some(0.4));
        assert_eq!(depth("model.layers.3.mlp.up_proj.weight", 4), 1.0);
        assert_eq!(depth("model.embed_tokens.weight", 4), 0.0);
        assert_eq!(depth("lm_head.weight", 4), 0.0);
        assert_eq!(depth("model.layers.0.mlp.up_proj.weight", 1), 1.0);
    }
}
