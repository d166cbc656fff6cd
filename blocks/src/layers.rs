//! The layers of a block: linear projections, norms and MLPs, loaded by block-library name.

use candle_core::{Result as CandleResult, Tensor, D};
use fusellm_sdk::adapter::{MlpKind, MlpSpec, NormKind};

use super::attention::Context;
use super::lora::Lora;
use super::ops::Kernels;
use super::weights::Weights;
use crate::error::Result;

/// `x @ w^T + b`, as torch.nn.Linear, plus a LoRA adapter's term where one is targeted.
pub struct Linear {
    weight: Tensor,
    bias: Option<Tensor>,
    lora: Option<Lora>,
}

impl Linear {
    /// Loads `{name}.weight` of shape `[out, inp]` (and `{name}.bias` when `bias`).
    pub fn load(w: &mut Weights, name: &str, layer: Option<usize>, out: usize, inp: usize, bias: bool) -> Result<Self> {
        let weight = w.get(&format!("{name}.weight"), layer, &[out, inp])?;
        let bias = if bias { Some(w.get(&format!("{name}.bias"), layer, &[out])?) } else { None };
        let lora = w.adapter(name, layer, (out, inp))?;
        Ok(Self { weight, bias, lora })
    }

    pub fn forward(&self, x: &Tensor, ctx: &Context) -> CandleResult<Tensor> {
        let y = ctx.kernels.linear(x, &self.weight, self.bias.as_ref())?;
        match &self.lora {
            Some(lora) => y + lora.forward(x, ctx.dropout, ctx.kernels)?,
            None => Ok(y),
        }
    }
}

/// RMSNorm or LayerNorm, per the spec.
pub struct Norm {
    kind: NormKind,
    weight: Tensor,
    bias: Option<Tensor>,
}

impl Norm {
    /// Loads `{name}.weight` (and `{name}.bias` for a LayerNorm with bias) of width `width`.
    pub fn load(w: &mut Weights, name: &str, layer: Option<usize>, kind: NormKind, width: usize) -> Result<Self> {
        let weight = w.get(&format!("{name}.weight"), layer, &[width])?;
        let bias = match kind {
            NormKind::LayerNorm { bias: true, .. } => Some(w.get(&format!("{name}.bias"), layer, &[width])?),
            _ => None,
        };
        Ok(Self { kind, weight, bias })
    }

    /// Normalises over the last dimension of `x`.
    pub fn forward(&self, x: &Tensor, k: Kernels) -> CandleResult<Tensor> {
        match self.kind {
            NormKind::RmsNorm { eps, offset: 0.0 } => k.rms_norm(x, &self.weight, eps),
            // Gemma's `(1 + w)`, as a differentiable op so that the gradient reaches w.
            NormKind::RmsNorm { eps, offset } => k.rms_norm(x, &(&self.weight + offset)?, eps),
            NormKind::LayerNorm { eps, .. } => k.layer_norm(x, &self.weight, self.bias.as_ref(), eps),
        }
    }
}

/// The feed-forward network: gated (SwiGLU, GeGLU: gate, up, down, the gate and up
/// projections possibly one tensor) or GELU (up, down).
pub struct Mlp {
    kind: MlpKind,
    inputs: MlpInputs,
    down: Linear,
}

enum MlpInputs {
    Up(Linear),
    Gated {
        gate: Linear,
        up: Linear,
    },
    /// One projection, rows [gate | up] (Phi-3).
    GateUp(Linear),
}

impl Mlp {
    pub fn load(w: &mut Weights, layer: usize, spec: MlpSpec, hidden: usize) -> Result<Self> {
        let proj = |w: &mut Weights, name: &str, out, inp| {
            Linear::load(w, &format!("layers.{{i}}.mlp.{name}"), Some(layer), out, inp, spec.bias)
        };
        let inputs = match (spec.kind.gated(), spec.fused_gate_up) {
            (false, _) => MlpInputs::Up(proj(w, "up", spec.hidden, hidden)?),
            (true, false) => MlpInputs::Gated {
                gate: proj(w, "gate", spec.hidden, hidden)?,
                up: proj(w, "up", spec.hidden, hidden)?,
            },
            (true, true) => MlpInputs::GateUp(proj(w, "gate_up", 2 * spec.hidden, hidden)?),
        };
        Ok(Self { kind: spec.kind, inputs, down: proj(w, "down", hidden, spec.hidden)? })
    }

    pub fn forward(&self, x: &Tensor, ctx: &Context) -> CandleResult<Tensor> {
        let k = ctx.kernels;
        let (gate, up) = match &self.inputs {
            MlpInputs::Up(up) => return self.down.forward(&up.forward(x, ctx)?.gelu_erf()?, ctx),
            MlpInputs::Gated { gate, up } => (gate.forward(x, ctx)?, up.forward(x, ctx)?),
            MlpInputs::GateUp(gate_up) => {
                let y = gate_up.forward(x, ctx)?;
                let half = y.dim(D::Minus1)? / 2;
                (y.narrow(D::Minus1, 0, half)?, y.narrow(D::Minus1, half, half)?)
            }
        };
        let act = match self.kind {
            MlpKind::GeGlu => (gate.gelu()? * up)?,
            _ => k.swiglu(&gate, &up)?,
        };
        self.down.forward(&act, ctx)
    }
}
