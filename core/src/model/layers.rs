//! The layers of a block: linear projections, norms and MLPs, loaded by block-library name.

use candle_core::{Result as CandleResult, Tensor};
use fusellm_sdk::adapter::{MlpKind, MlpSpec, NormKind};

use super::ops;
use super::weights::Weights;
use crate::error::Result;

/// `x @ w^T + b`, as torch.nn.Linear.
pub struct Linear {
    weight: Tensor,
    bias: Option<Tensor>,
}

impl Linear {
    /// Loads `{name}.weight` of shape `[out, inp]` (and `{name}.bias` when `bias`).
    pub fn load(w: &mut Weights, name: &str, layer: Option<usize>, out: usize, inp: usize, bias: bool) -> Result<Self> {
        let weight = w.get(&format!("{name}.weight"), layer, &[out, inp])?;
        let bias = if bias { Some(w.get(&format!("{name}.bias"), layer, &[out])?) } else { None };
        Ok(Self { weight, bias })
    }

    pub fn forward(&self, x: &Tensor) -> CandleResult<Tensor> {
        ops::linear(x, &self.weight, self.bias.as_ref())
    }
}

/// RMSNorm or LayerNorm, per the spec.
pub struct Norm {
    kind: NormKind,
    weight: Tensor,
    bias: Option<Tensor>,
}

impl Norm {
    pub fn load(w: &mut Weights, name: &str, layer: Option<usize>, kind: NormKind, hidden: usize) -> Result<Self> {
        let weight = w.get(&format!("{name}.weight"), layer, &[hidden])?;
        let bias = match kind {
            NormKind::LayerNorm { bias: true, .. } => Some(w.get(&format!("{name}.bias"), layer, &[hidden])?),
            _ => None,
        };
        Ok(Self { kind, weight, bias })
    }

    pub fn forward(&self, x: &Tensor) -> CandleResult<Tensor> {
        match self.kind {
            NormKind::RmsNorm { eps } => ops::rms_norm(x, &self.weight, eps),
            NormKind::LayerNorm { eps, .. } => ops::layer_norm(x, &self.weight, self.bias.as_ref(), eps),
        }
    }
}

/// The feed-forward network: SwiGLU (gate, up, down) or GELU (up, down).
pub struct Mlp {
    gate: Option<Linear>,
    up: Linear,
    down: Linear,
}

impl Mlp {
    pub fn load(w: &mut Weights, layer: usize, spec: MlpSpec, hidden: usize) -> Result<Self> {
        let proj = |w: &mut Weights, name: &str, out, inp| {
            Linear::load(w, &format!("layers.{{i}}.mlp.{name}"), Some(layer), out, inp, spec.bias)
        };
        let gate = match spec.kind {
            MlpKind::SwiGlu => Some(proj(w, "gate", spec.hidden, hidden)?),
            MlpKind::Gelu => None,
        };
        Ok(Self { gate, up: proj(w, "up", spec.hidden, hidden)?, down: proj(w, "down", hidden, spec.hidden)? })
    }

    pub fn forward(&self, x: &Tensor) -> CandleResult<Tensor> {
        let up = self.up.forward(x)?;
        let act = match &self.gate {
            Some(gate) => ops::swiglu(&gate.forward(x)?, &up)?,
            None => up.gelu_erf()?,
        };
        self.down.forward(&act)
    }
}
