//! Multi-head and grouped-query causal self-attention with split or fused QKV, RoPE or
//! ALiBi, optional QKV clipping, per-head q/k norms and score soft-capping; scores and
//! softmax in f32, as transformers' eager path.

use candle_core::{Result as CandleResult, Tensor, D};
use fusellm_sdk::adapter::{AttentionSpec, NormKind, QkvLayout};

use super::layers::{Linear, Norm};
use super::ops::{Kernels, Scores};
use super::weights::Weights;
use crate::error::Result;

/// What one layer gets from the forward pass: positions and masks, and the kernels to run.
#[derive(Clone)]
pub struct Context {
    pub kernels: Kernels,
    /// RoPE `cos`, `sin` (`[t, rot / 2]`) and the rotary width.
    pub rope: Option<(Tensor, Tensor, usize)>,
    /// Additive scores bias `[b or 1, h or 1, t, t]`: the causal, padding and window masks,
    /// plus ALiBi where the model uses it.
    pub bias: Tensor,
    /// Seeds the LoRA adapters' dropout masks in training; `None`: no dropout.
    pub dropout: Option<u64>,
}

enum Qkv {
    Split { q: Linear, k: Linear, v: Linear },
    Fused(Linear),
}

pub struct Attention {
    spec: AttentionSpec,
    qkv: Qkv,
    /// Per-head norms of the queries and keys (Qwen3, Gemma 3).
    qk_norm: Option<(Norm, Norm)>,
    out: Linear,
}

impl Attention {
    pub fn load(w: &mut Weights, layer: usize, spec: AttentionSpec, norm: NormKind, hidden: usize) -> Result<Self> {
        let (h, kv, d) = (spec.heads, spec.kv_heads, spec.head_dim);
        let proj = |w: &mut Weights, name: &str, out, inp, bias| {
            Linear::load(w, &format!("layers.{{i}}.attn.{name}"), Some(layer), out, inp, bias)
        };
        let bias = spec.bias.qkv;
        let qkv = match spec.qkv {
            QkvLayout::Split => Qkv::Split {
                q: proj(w, "q", h * d, hidden, bias)?,
                k: proj(w, "k", kv * d, hidden, bias)?,
                v: proj(w, "v", kv * d, hidden, bias)?,
            },
            QkvLayout::Chunked | QkvLayout::PerHead => Qkv::Fused(proj(w, "qkv", (h + 2 * kv) * d, hidden, bias)?),
        };
        let qk_norm = match spec.qk_norm {
            true => Some((
                Norm::load(w, "layers.{i}.attn.q_norm", Some(layer), norm, d)?,
                Norm::load(w, "layers.{i}.attn.k_norm", Some(layer), norm, d)?,
            )),
            false => None,
        };
        Ok(Self { spec, qkv, qk_norm, out: proj(w, "o", hidden, h * d, spec.bias.out)? })
    }

    /// `x: [b, t, hidden]` -> `[b, t, hidden]`.
    pub fn forward(&self, x: &Tensor, ctx: &Context) -> CandleResult<Tensor> {
        let (q, k, v) = self.project(x, ctx)?;
        let (q, k) = match &self.qk_norm {
            Some((q_norm, k_norm)) => {
                (self.per_head(&q, q_norm, ctx.kernels)?, self.per_head(&k, k_norm, ctx.kernels)?)
            }
            None => (q, k),
        };
        let scores = Scores {
            heads: self.spec.heads,
            scale: self.spec.softmax_scale.unwrap_or(1.0 / (self.spec.head_dim as f64).sqrt()),
            softcap: self.spec.softcap,
            bias: &ctx.bias,
            rope: ctx.rope.as_ref().map(|(cos, sin, rot)| (cos, sin, *rot)),
        };
        self.out.forward(&ctx.kernels.attention(&q, &k, &v, &scores)?, ctx)
    }

    /// `norm` applied to each head of `x: [b, t, n * d]`.
    fn per_head(&self, x: &Tensor, norm: &Norm, k: Kernels) -> CandleResult<Tensor> {
        let (b, t, width) = x.dims3()?;
        let d = self.spec.head_dim;
        norm.forward(&x.reshape((b, t, width / d, d))?, k)?.reshape((b, t, width))
    }

    fn project(&self, x: &Tensor, ctx: &Context) -> CandleResult<(Tensor, Tensor, Tensor)> {
        let AttentionSpec { heads: h, kv_heads: kv, head_dim: d, .. } = self.spec;
        let (q, k, v) = match &self.qkv {
            Qkv::Split { q, k, v } => (q.forward(x, ctx)?, k.forward(x, ctx)?, v.forward(x, ctx)?),
            Qkv::Fused(qkv) => {
                let y = qkv.forward(x, ctx)?;
                if self.spec.qkv == QkvLayout::PerHead {
                    // GPT-NeoX: [b, t, h, 3d], each head's q, k, v side by side.
                    let (b, t, _) = y.dims3()?;
                    let y = y.reshape((b, t, h, 3 * d))?;
                    let part = |i: usize| y.narrow(D::Minus1, i * d, d)?.reshape((b, t, h * d));
                    (part(0)?, part(1)?, part(2)?)
                } else {
                    (
                        y.narrow(D::Minus1, 0, h * d)?,
                        y.narrow(D::Minus1, h * d, kv * d)?,
                        y.narrow(D::Minus1, (h + kv) * d, kv * d)?,
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
