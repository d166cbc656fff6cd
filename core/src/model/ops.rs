//! Differentiable building blocks. candle's fused kernels (softmax_last_dim, rms_norm, the
//! LayerNorm fast path, rope) record no backward op, so training through them would stop
//! gradients silently; these are compositions of ops that all have one.

use candle_core::{DType, Result, Tensor, D};

/// Softmax over the last dimension; the max is detached, which changes no gradient
/// (softmax is shift-invariant) and saves its backward pass.
pub fn softmax(x: &Tensor) -> Result<Tensor> {
    let shifted = x.broadcast_sub(&x.max_keepdim(D::Minus1)?.detach())?;
    let num = shifted.exp()?;
    num.broadcast_div(&num.sum_keepdim(D::Minus1)?)
}

/// Log-softmax over the last dimension, with the same detached max.
pub fn log_softmax(x: &Tensor) -> Result<Tensor> {
    let shifted = x.broadcast_sub(&x.max_keepdim(D::Minus1)?.detach())?;
    shifted.broadcast_sub(&shifted.exp()?.sum_keepdim(D::Minus1)?.log()?)
}

/// RMSNorm as transformers computes it: in f32, x / sqrt(mean(x^2) + eps), then the
/// weight in the input's dtype.
pub fn rms_norm(x: &Tensor, weight: &Tensor, eps: f64) -> Result<Tensor> {
    let dtype = x.dtype();
    let x = x.to_dtype(DType::F32)?;
    let rms = (x.sqr()?.mean_keepdim(D::Minus1)? + eps)?.sqrt()?;
    x.broadcast_div(&rms)?.to_dtype(dtype)?.broadcast_mul(weight)
}

/// LayerNorm with biased variance, computed in f32 with the weight and bias applied before
/// the cast back, as torch does; `bias` is optional.
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

/// `x @ w^T (+ b)` for x of any rank, as `torch.nn.Linear`.
pub fn linear(x: &Tensor, weight: &Tensor, bias: Option<&Tensor>) -> Result<Tensor> {
    let y = x.broadcast_matmul(&weight.t()?)?;
    match bias {
        Some(b) => y.broadcast_add(b),
        None => Ok(y),
    }
}

/// Rotary embedding in the rotate-half layout on the first `rot` dimensions of
/// `x: [b, h, t, d]`; `cos` and `sin` are `[t, rot / 2]`.
pub fn rope(x: &Tensor, cos: &Tensor, sin: &Tensor, rot: usize) -> Result<Tensor> {
    let d = x.dim(D::Minus1)?;
    let rotated = candle_nn::rotary_emb::rope_slow(&x.narrow(D::Minus1, 0, rot)?, cos, sin)?;
    if rot == d {
        return Ok(rotated);
    }
    Tensor::cat(&[&rotated, &x.narrow(D::Minus1, rot, d - rot)?], D::Minus1)
}
