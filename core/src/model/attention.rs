//! Multi-head and grouped-query causal self-attention with split or fused QKV, RoPE or
//! ALiBi, optional QKV clipping; scores and softmax in f32, as transformers' eager path.

use candle_core::{Result as CandleResult, Tensor, D};
use fusellm_sdk::adapter::{AttentionSpec, QkvLayout};

use super::layers::Linear;
use super::ops;
use super::weights::Weights;
use crate::error::Result;

/// What the layers of one forward pass share: positions and masks.
pub struct Context {
    /// RoPE `cos`, `sin` (`[t, rot / 2]`) and the rotary width.
    pub rope: Option<(Tensor, Tensor, usize)>,
    /// Additive scores bias `[b or 1, h or 1, t, t]`: the causal and padding masks, plus
    /// ALiBi where the model uses it.
    pub bias: Tensor,
}

enum Qkv {
    Split { q: Linear, k: Linear, v: Linear },
    Fused(Linear),
}

pub struct Attention {
    spec: AttentionSpec,
    qkv: Qkv,
    out: Linear,
}

impl Attention {
    pub fn load(w: &mut Weights, layer: usize, spec: AttentionSpec, hidden: usize) -> Result<Self> {
        let (h, kv, d) = (spec.heads, spec.kv_heads, spec.head_dim);
        let proj = |w: &mut Weights, name: &str, out, inp| {
            Linear::load(w, &format!("layers.{{i}}.attn.{name}"), Some(layer), out, inp, spec.bias)
        };
        let qkv = match spec.qkv {
            QkvLayout::Split => Qkv::Split {
                q: proj(w, "q", h * d, hidden)?,
                k: proj(w, "k", kv * d, hidden)?,
                v: proj(w, "v", kv * d, hidden)?,
            },
            QkvLayout::Chunked | QkvLayout::PerHead => Qkv::Fused(proj(w, "qkv", 3 * h * d, hidden)?),
        };
        Ok(Self { spec, qkv, out: proj(w, "o", hidden, h * d)? })
    }

    /// `x: [b, t, hidden]` -> `[b, t, hidden]`.
    pub fn forward(&self, x: &Tensor, ctx: &Context) -> CandleResult<Tensor> {
        let (q, k, v) = self.project(x)?;
        let scale = self.spec.softmax_scale.unwrap_or(1.0 / (self.spec.head_dim as f64).sqrt());
        let rope = ctx.rope.as_ref().map(|(cos, sin, rot)| (cos, sin, *rot));
        let y = ops::attention(&q, &k, &v, self.spec.heads, scale, &ctx.bias, rope)?;
        self.out.forward(&y)
    }

    fn project(&self, x: &Tensor) -> CandleResult<(Tensor, Tensor, Tensor)> {
        let AttentionSpec { heads: h, head_dim: d, .. } = self.spec;
        let (q, k, v) = match &self.qkv {
            Qkv::Split { q, k, v } => (q.forward(x)?, k.forward(x)?, v.forward(x)?),
            Qkv::Fused(qkv) => {
                let y = qkv.forward(x)?;
                if self.spec.qkv == QkvLayout::PerHead {
                    // GPT-NeoX: [b, t, h, 3d], each head's q, k, v side by side.
                    let (b, t, _) = y.dims3()?;
                    let y = y.reshape((b, t, h, 3 * d))?;
                    let part = |i: usize| y.narrow(D::Minus1, i * d, d)?.reshape((b, t, h * d));
                    (part(0)?, part(1)?, part(2)?)
                } else {
                    (
                        y.narrow(D::Minus1, 0, h * d)?,
                        y.narrow(D::Minus1, h * d, h * d)?,
                        y.narrow(D::Minus1, 2 * h * d, h * d)?,
                    )
                }
            }
        };
        match self.spec.clip_qkv {
            Some(c) => Ok((q.clamp(-c, c)?, k.clamp(-c, c)?, v.clamp(-c, c)?)),
            None => Ok((q, k, v)),
        }
    }
}
