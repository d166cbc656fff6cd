//! Differentiable building blocks. candle's fused kernels (softmax_last_dim, rms_norm, the
//! LayerNorm fast path, rope) record no backward op, so training through them would stop
//! gradients silently. These use our own fused kernels, which have a backward, where they
//! exist (`fused/`: f32 on the CPU; on CUDA the attention softmax, the
//! norms, RoPE and SwiGLU in f32 and bf16); elsewhere, compositions of ops that all have one
//! (`composed`, also the reference the fused kernels are tested against). Which of the two a
//! model runs is a value it carries ([`Kernels`]), not a switch of the process.

use candle_core::{DType, Result, Tensor, D};

use super::fused;

/// The implementation of the ops a model runs: our fused kernels where they exist for the
/// device and dtype (the default), or the compositions of candle's ops everywhere (the
/// reference; what `fusellm bench train` compares the kernels against).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Kernels {
    #[default]
    Fused,
    Composed,
}

/// Where a fused kernel exists.
#[derive(Clone, Copy, PartialEq, Eq)]
pub(crate) enum Reach {
    /// f32 on the CPU.
    Cpu,
    /// f32 on the CPU and on CUDA (in a CUDA build).
    Cuda,
    /// f32 on the CPU, f32 and bf16 on CUDA.
    CudaBf16,
}

impl Kernels {
    /// Whether kernels of `reach` run on `device`: the fused kernels are chosen, and the
    /// device is the CPU or, for kernels with a CUDA version, a CUDA device of a CUDA build.
    pub(crate) fn on(self, device: &candle_core::Device, reach: Reach) -> bool {
        let cuda = reach != Reach::Cpu && cfg!(feature = "cuda") && device.is_cuda();
        self == Kernels::Fused && (device.is_cpu() || cuda)
    }

    /// Whether the fused kernels of `reach` apply to these tensors: one dtype that the
    /// kernels take on their device. Anything else (say an f32 norm weight for bf16
    /// activations) takes the composition.
    pub(crate) fn fusable(self, tensors: &[&Tensor], reach: Reach) -> bool {
        let dtype_ok = |t: &Tensor| match t.dtype() {
            DType::F32 => true,
            DType::BF16 => reach == Reach::CudaBf16 && t.device().is_cuda(),
            _ => false,
        };
        let same = |t: &Tensor| t.dtype() == tensors[0].dtype();
        tensors.iter().all(|t| self.on(t.device(), reach) && dtype_ok(t) && same(t))
    }

    /// The attention probabilities `softmax(x * scale + bias)` over the last dimension of
    /// scores `x: [b, h, t, s]`, in `x`'s dtype, computed in f32; `bias` (`[b or 1, h or 1,
    /// t, s]`, f32: masks, ALiBi) gets no gradient.
    pub fn attention_softmax(self, x: &Tensor, bias: &Tensor, scale: f64) -> Result<Tensor> {
        match self.fusable(&[x], Reach::CudaBf16) && self.fusable(&[bias], Reach::Cuda) {
            true => fused::attention_softmax(x, bias, scale),
            false => composed::attention_softmax(x, bias, scale),
        }
    }

    /// RMSNorm as transformers computes it: in f32, x / sqrt(mean(x^2) + eps), then the
    /// weight in the input's dtype.
    pub fn rms_norm(self, x: &Tensor, weight: &Tensor, eps: f64) -> Result<Tensor> {
        match self.fusable(&[x, weight], Reach::CudaBf16) {
            true => fused::rms_norm(x, weight, eps),
            false => composed::rms_norm(x, weight, eps),
        }
    }

    /// LayerNorm with biased variance, computed in f32 with the weight and bias applied
    /// before the cast back, as torch does; `bias` is optional.
    pub fn layer_norm(self, x: &Tensor, weight: &Tensor, bias: Option<&Tensor>, eps: f64) -> Result<Tensor> {
        let fusable = |t: &Tensor| self.fusable(&[x, t], Reach::CudaBf16);
        match fusable(weight) && bias.is_none_or(fusable) {
            true => fused::layer_norm(x, weight, bias, eps),
            false => composed::layer_norm(x, weight, bias, eps),
        }
    }

    /// `x @ w^T (+ b)` for x of any rank, as `torch.nn.Linear`.
    ///
    /// The leading dimensions are folded into rows for one 2-D product: a batched matmul
    /// against the broadcast weight would make autograd build the weight's gradient per
    /// batch entry and then sum it.
    pub fn linear(self, x: &Tensor, weight: &Tensor, bias: Option<&Tensor>) -> Result<Tensor> {
        let y = match self.fusable(&[x, weight], Reach::Cpu) {
            true => fused::linear(x, weight)?,
            false => {
                let (inp, mut dims) = (x.dim(D::Minus1)?, x.dims().to_vec());
                *dims.last_mut().expect("x has at least one dimension") = weight.dim(0)?;
                x.reshape(((), inp))?.matmul(&weight.t()?)?.reshape(dims)?
            }
        };
        match bias {
            Some(b) => y.broadcast_add(b),
            None => Ok(y),
        }
    }

    /// Rotary embedding in the rotate-half layout on the first `rot` dimensions of
    /// `x: [b, h, t, d]`; `cos` and `sin` are `[t, rot / 2]`.
    pub fn rope(self, x: &Tensor, cos: &Tensor, sin: &Tensor, rot: usize) -> Result<Tensor> {
        let d = x.dim(D::Minus1)?;
        let part = x.narrow(D::Minus1, 0, rot)?;
        let rotated = match self.fusable(&[x, cos, sin], Reach::CudaBf16) {
            true => fused::rope(&part, cos, sin)?,
            false => composed::rope(&part, cos, sin)?,
        };
        if rot == d {
            return Ok(rotated);
        }
        Tensor::cat(&[&rotated, &x.narrow(D::Minus1, rot, d - rot)?], D::Minus1)
    }

    /// Causal self-attention of projected `q: [b, t, heads * d]`, `k`, `v: [b, t, kv_heads
    /// * d]` (grouped-query when there are fewer key-value heads), with scores as `scores`
    /// says and softmax in f32. Returns `[b, t, heads * d]`.
    pub fn attention(self, q: &Tensor, k: &Tensor, v: &Tensor, scores: &Scores) -> Result<Tensor> {
        match self.fusable(&[q, k, v], Reach::Cpu) {
            true => fused::attention(q, k, v, scores),
            false => composed::attention(self, q, k, v, scores),
        }
    }

    /// `silu(gate) * up`, the SwiGLU activation.
    pub fn swiglu(self, gate: &Tensor, up: &Tensor) -> Result<Tensor> {
        match self.fusable(&[gate, up], Reach::CudaBf16) {
            true => fused::swiglu(gate, up),
            false => composed::swiglu(gate, up),
        }
    }
}

/// `c * tanh(x / c)`: Gemma 2's soft-cap of the logits, differentiable.
pub fn soft_cap(x: &Tensor, cap: f64) -> Result<Tensor> {
    (x / cap)?.tanh()? * cap
}

/// Log-softmax over the last dimension, with a detached max (softmax is shift-invariant,
/// so no gradient changes, and the max needs no backward pass).
pub fn log_softmax(x: &Tensor) -> Result<Tensor> {
    let shifted = x.broadcast_sub(&x.max_keepdim(D::Minus1)?.detach())?;
    shifted.broadcast_sub(&shifted.exp()?.sum_keepdim(D::Minus1)?.log()?)
}

/// How the scores of an attention are made: the head count, the scale, an optional
/// soft-cap `c * tanh(s / c)` of the scaled scores (Gemma 2), the additive bias
/// (`[b or 1, heads or 1, t, t]`: masks, ALiBi) and RoPE on the first `rot` dimensions of
/// each query and key head (`cos`, `sin` `[t, rot / 2]`).
pub struct Scores<'a> {
    pub heads: usize,
    pub scale: f64,
    pub softcap: Option<f64>,
    pub bias: &'a Tensor,
    pub rope: Option<(&'a Tensor, &'a Tensor, usize)>,
}

/// The compositions: any device and dtype.
pub mod composed {
    use super::*;

    /// As transformers' eager attention: scaled in `x`'s dtype, then in f32 with a detached
    /// max as [`log_softmax`]; the bias is a constant.
    pub fn attention_softmax(x: &Tensor, bias: &Tensor, scale: f64) -> Result<Tensor> {
        let scores = (x * scale)?.to_dtype(DType::F32)?.broadcast_add(&bias.detach())?;
        let shifted = scores.broadcast_sub(&scores.max_keepdim(D::Minus1)?.detach())?;
        let num = shifted.exp()?;
        num.broadcast_div(&num.sum_keepdim(D::Minus1)?)?.to_dtype(x.dtype())
    }

    pub fn rms_norm(x: &Tensor, weight: &Tensor, eps: f64) -> Result<Tensor> {
        let dtype = x.dtype();
        let x = x.to_dtype(DType::F32)?;
        let rms = (x.sqr()?.mean_keepdim(D::Minus1)? + eps)?.sqrt()?;
        x.broadcast_div(&rms)?.to_dtype(dtype)?.broadcast_mul(weight)
    }

    pub fn layer_norm(x: &Tensor, weight: &Tensor, bias: Option<&Tensor>, eps: f64) -> Result<Tensor> {
        let dtype = x.dtype();
        let x = x.to_dtype(DType::F32)?;
        let centred = x.broadcast_sub(&x.mean_keepdim(D::Minus1)?)?;
        let std = (centred.sqr()?.mean_keepdim(D::Minus1)? + eps)?.sqrt()?;
        let y = centred.broadcast_div(&std)?.broadcast_mul(&weight.to_dtype(DType::F32)?)?;
        let y = match bias {
            Some(b) => y.broadcast_add(&b.to_dtype(DType::F32)?)?,
            None => y,
        };
        y.to_dtype(dtype)
    }

    /// On all of `x`'s last dimension.
    pub fn rope(x: &Tensor, cos: &Tensor, sin: &Tensor) -> Result<Tensor> {
        candle_nn::rotary_emb::rope_slow(x, cos, sin)
    }

    pub fn swiglu(gate: &Tensor, up: &Tensor) -> Result<Tensor> {
        gate.silu()? * up
    }

    /// As transformers' eager attention: heads transposed out, key-value heads repeated,
    /// scores scaled (and soft-capped), softmax in f32; RoPE and the softmax as `kernels`
    /// choose (our kernels where there are some).
    pub fn attention(kernels: Kernels, q: &Tensor, k: &Tensor, v: &Tensor, scores: &Scores) -> Result<Tensor> {
        let heads = scores.heads;
        let (b, t, width) = q.dims3()?;
        let d = width / heads;
        let kv = k.dim(2)? / d;
        let split = |x: &Tensor, n: usize| x.reshape((b, t, n, d))?.transpose(1, 2)?.contiguous();
        let (mut q, mut k, v) = (split(q, heads)?, split(k, kv)?, split(v, kv)?);
        if let Some((cos, sin, rot)) = scores.rope {
            q = kernels.rope(&q, cos, sin, rot)?;
            k = kernels.rope(&k, cos, sin, rot)?;
        }
        let k = candle_transformers::utils::repeat_kv(k, heads / kv)?;
        let v = candle_transformers::utils::repeat_kv(v, heads / kv)?;
        let raw = q.matmul(&k.t()?)?;
        let probs = match scores.softcap {
            Some(cap) => {
                kernels.attention_softmax(&(((raw * (scores.scale / cap))?.tanh()? * cap)?), scores.bias, 1.0)?
            }
            None => kernels.attention_softmax(&raw, scores.bias, scores.scale)?,
        };
        probs.matmul(&v)?.transpose(1, 2)?.reshape((b, t, heads * d))
    }
}
