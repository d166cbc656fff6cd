//! Causal self-attention as one CPU kernel with its backward: RoPE, scores, bias, softmax
//! and the weighted sum of values, per (sequence, head) on all cores.
//!
//! As a composition, attention is a dozen tensors per layer (head transposes, the rotated
//! queries and keys, repeated key-value heads, scaled and biased scores, probabilities),
//! and autograd allocates and accumulates a gradient for each. Here the forward pass keeps
//! what the backward needs (rotated queries and keys, values, probabilities: `O(b h t (t + d))`)
//! and the backward writes the three input gradients directly.

use std::sync::Mutex;

use candle_core::{CpuStorage, CustomOp3, Device, Layout, Result, Shape, Tensor};
use rayon::prelude::*;

use super::{bias_block, rotate_half};
use crate::cpu::f32s;
use crate::gemm::{gemm, Threads};
use crate::ops::Scores;
use crate::rowwise;

/// Rotary tables `cos`, `sin` (`[t, rot / 2]`, flattened) and the rotary width.
struct RopeTables {
    cos: Vec<f32>,
    sin: Vec<f32>,
    rot: usize,
}

/// `q: [b, t, heads * d]`, `k`, `v`: `[b, t, kv_heads * d]` (f32, CPU) -> `[b, t, heads * d]`,
/// with the scores of `scores`: RoPE on the first `rot` dimensions of each query and key
/// head (rotate-half layout), scale, soft-cap, then the bias.
pub fn attention(q: &Tensor, k: &Tensor, v: &Tensor, scores: &Scores) -> Result<Tensor> {
    let (heads, bias) = (scores.heads, scores.bias);
    let (b, t, width) = q.dims3()?;
    let (bias_b, bias_h, _, _) = bias.dims4()?;
    if width % heads != 0 || (bias_b != 1 && bias_b != b) || (bias_h != 1 && bias_h != heads) {
        candle_core::bail!("attention: q {:?} for {heads} heads with a bias of {:?}", q.dims(), bias.dims());
    }
    let d = width / heads;
    let kv_heads = k.dim(2)? / d;
    if kv_heads == 0 || !heads.is_multiple_of(kv_heads) || k.dims() != v.dims() {
        candle_core::bail!("attention: k {:?} and v {:?} for {heads} query heads of {d}", k.dims(), v.dims());
    }
    let host = |t: &Tensor| t.flatten_all()?.to_dtype(candle_core::DType::F32)?.to_vec1::<f32>();
    let rope = match scores.rope {
        Some((cos, sin, rot)) => Some(RopeTables { cos: host(cos)?, sin: host(sin)?, rot }),
        None => None,
    };
    let op = Attention {
        shape: Dims { b, t, heads, kv_heads, d },
        scale: scores.scale as f32,
        softcap: scores.softcap.map(|c| c as f32),
        bias: host(bias)?,
        bias_dims: (bias_b, bias_h),
        rope,
        saved: Mutex::new(None),
    };
    q.contiguous()?.apply_op3(&k.contiguous()?, &v.contiguous()?, op)
}

#[derive(Clone, Copy)]
struct Dims {
    b: usize,
    t: usize,
    heads: usize,
    kv_heads: usize,
    d: usize,
}

/// What the forward pass keeps for the backward, per head `[b, n, t, d]` and `[b, h, t, t]`.
struct Saved {
    q: Vec<f32>,
    k: Vec<f32>,
    v: Vec<f32>,
    probs: Vec<f32>,
    /// With a soft-cap, the derivative `1 - tanh^2` of each capped score, `[b, h, t, t]`.
    cap_slopes: Option<Vec<f32>>,
}

struct Attention {
    shape: Dims,
    scale: f32,
    softcap: Option<f32>,
    bias: Vec<f32>,
    bias_dims: (usize, usize),
    rope: Option<RopeTables>,
    saved: Mutex<Option<Saved>>,
}

impl Attention {
    /// The `[t, t]` bias of sequence `bi`, head `hi`.
    fn bias(&self, bi: usize, hi: usize) -> &[f32] {
        let t = self.shape.t;
        let at = bias_block(self.bias_dims, bi, hi) * t * t;
        &self.bias[at..at + t * t]
    }

    /// `[b, t, n * d]` -> `[b, n, t, d]`, rotated by `sign` times the RoPE angle when
    /// `rotate`.
    fn split_heads(&self, x: &[f32], n: usize, rotate: bool, sign: f32) -> Vec<f32> {
        let Dims { t, d, .. } = self.shape;
        let mut out = vec![0f32; x.len()];
        out.par_chunks_mut(t * d).enumerate().for_each(|(unit, out)| {
            let (bi, hi) = (unit / n, unit % n);
            for p in 0..t {
                let src = &x[((bi * t + p) * n + hi) * d..][..d];
                self.rotate(src, &mut out[p * d..(p + 1) * d], p, rotate, sign);
            }
        });
        out
    }

    /// `[b, n, t, d]` -> `[b, t, n * d]`, rotated as [`Attention::split_heads`].
    fn merge_heads(&self, x: &[f32], n: usize, rotate: bool, sign: f32) -> Vec<f32> {
        let Dims { t, d, .. } = self.shape;
        let mut out = vec![0f32; x.len()];
        out.par_chunks_mut(n * d).enumerate().for_each(|(row, out)| {
            let (bi, p) = (row / t, row % t);
            for hi in 0..n {
                let src = &x[((bi * n + hi) * t + p) * d..][..d];
                self.rotate(src, &mut out[hi * d..(hi + 1) * d], p, rotate, sign);
            }
        });
        out
    }

    /// One head vector at position `p`: rotate-half RoPE on the first `rot` dimensions.
    fn rotate(&self, src: &[f32], dst: &mut [f32], p: usize, rotate: bool, sign: f32) {
        dst.copy_from_slice(src);
        let Some(RopeTables { cos, sin, rot }) = self.rope.as_ref().filter(|_| rotate) else { return };
        let half = rot / 2;
        let span = p * half..(p + 1) * half;
        rotate_half(src, dst, &cos[span.clone()], &sin[span], sign);
    }
}

impl CustomOp3 for Attention {
    fn name(&self) -> &'static str {
        "fused-attention"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let Dims { t, heads, kv_heads, d, .. } = self.shape;
        let q = self.split_heads(f32s(s1, l1, "attention q")?, heads, true, 1.0);
        let k = self.split_heads(f32s(s2, l2, "attention k")?, kv_heads, true, 1.0);
        let v = self.split_heads(f32s(s3, l3, "attention v")?, kv_heads, false, 1.0);
        let group = heads / kv_heads;
        let mut probs = vec![0f32; q.len() / d * t];
        let mut y = vec![0f32; q.len()];
        // Without a soft-cap, one unused slope per unit keeps the chunks aligned.
        let units = probs.len() / (t * t);
        let mut slopes = vec![0f32; if self.softcap.is_some() { probs.len() } else { units }];
        let per_unit = slopes.len() / units;
        let parts = probs.par_chunks_mut(t * t).zip(y.par_chunks_mut(t * d)).zip(slopes.par_chunks_mut(per_unit));
        parts.enumerate().for_each(|(unit, ((p, y), slopes))| {
            let (bi, hi) = (unit / heads, unit % heads);
            let kv = (bi * kv_heads + hi / group) * t * d;
            let (qh, kh, vh) = (&q[unit * t * d..][..t * d], &k[kv..kv + t * d], &v[kv..kv + t * d]);
            gemm([t, t, d], p, false, (qh, d, 1), (kh, 1, d), Threads::One);
            match self.softcap {
                Some(cap) => p.iter_mut().zip(slopes.iter_mut()).for_each(|(s, slope)| {
                    let tanh = (*s * self.scale / cap).tanh();
                    (*s, *slope) = (cap * tanh, 1.0 - tanh * tanh);
                }),
                None => p.iter_mut().for_each(|s| *s *= self.scale),
            }
            for (row, bias) in p.chunks_mut(t).zip(self.bias(bi, hi).chunks(t)) {
                row.iter_mut().zip(bias).for_each(|(s, b)| *s += b);
                rowwise::softmax_in_place(row);
            }
            gemm([t, d, t], y, false, (p, t, 1), (vh, d, 1), Threads::One);
        });
        let out = self.merge_heads(&y, heads, false, 1.0);
        *self.saved.lock().expect("attention state") =
            Some(Saved { q, k, v, probs, cap_slopes: self.softcap.map(|_| slopes) });
        Ok((CpuStorage::F32(out), l1.shape().clone()))
    }

    fn bwd(
        &self,
        _q: &Tensor,
        _k: &Tensor,
        _v: &Tensor,
        _y: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let Dims { b, t, heads, kv_heads, d } = self.shape;
        let guard = self.saved.lock().expect("attention state");
        let Some(saved) = guard.as_ref() else { candle_core::bail!("attention: backward before forward") };
        let dy = self.split_heads(&grad.flatten_all()?.to_vec1::<f32>()?, heads, false, 1.0);
        let group = heads / kv_heads;
        let mut dq = vec![0f32; dy.len()];
        let mut dk = vec![0f32; saved.k.len()];
        let mut dv = vec![0f32; saved.v.len()];
        // One unit per key-value head: it owns the gradients of its keys, values and queries.
        dq.par_chunks_mut(group * t * d)
            .zip(dk.par_chunks_mut(t * d).zip(dv.par_chunks_mut(t * d)))
            .enumerate()
            .for_each(|(unit, (dq, (dk, dv)))| {
                let (kh, vh) = (&saved.k[unit * t * d..][..t * d], &saved.v[unit * t * d..][..t * d]);
                let mut ds = vec![0f32; t * t];
                for (j, dq) in dq.chunks_mut(t * d).enumerate() {
                    let head = unit * group + j;
                    let (qh, dyh) = (&saved.q[head * t * d..][..t * d], &dy[head * t * d..][..t * d]);
                    let p = &saved.probs[head * t * t..][..t * t];
                    gemm([t, t, d], &mut ds, false, (dyh, d, 1), (vh, 1, d), Threads::One);
                    for (ds, p) in ds.chunks_mut(t).zip(p.chunks(t)) {
                        let dot: f32 = ds.iter().zip(p).map(|(g, p)| g * p).sum();
                        ds.iter_mut().zip(p).for_each(|(g, p)| *g = p * (*g - dot) * self.scale);
                    }
                    if let Some(slopes) = &saved.cap_slopes {
                        let slopes = &slopes[head * t * t..(head + 1) * t * t];
                        ds.iter_mut().zip(slopes).for_each(|(g, slope)| *g *= slope);
                    }
                    gemm([t, d, t], dq, false, (&ds, t, 1), (kh, d, 1), Threads::One);
                    gemm([t, d, t], dk, j > 0, (&ds, 1, t), (qh, d, 1), Threads::One);
                    gemm([t, d, t], dv, j > 0, (p, 1, t), (dyh, d, 1), Threads::One);
                }
            });
        let tensor = |x: Vec<f32>, n: usize| Tensor::from_vec(x, (b, t, n * d), &Device::Cpu);
        Ok((
            Some(tensor(self.merge_heads(&dq, heads, true, -1.0), heads)?),
            Some(tensor(self.merge_heads(&dk, kv_heads, true, -1.0), kv_heads)?),
            Some(tensor(self.merge_heads(&dv, kv_heads, false, 1.0), kv_heads)?),
        ))
    }
}
