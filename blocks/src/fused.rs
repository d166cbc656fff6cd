//! Fused CPU kernels of the block library's hot paths, each with its backward: linear
//! projections, the attention softmax, RMSNorm, LayerNorm, rotary embedding and SwiGLU.
//! candle's own fused ops record no backward; the compositions in `ops` do, but allocate a
//! tensor per step of the formula (and again in backward). These run row by row
//! over contiguous f32 data on all cores; the attention softmax, the norms, RoPE and SwiGLU
//! also on CUDA (`cuda.rs`), in f32 and bf16. `ops` uses them where they exist and the
//! compositions elsewhere; tests check both against each other.

use candle_core::{CpuStorage, CustomOp2, CustomOp3, Layout, Result, Shape, Tensor};
use rayon::prelude::*;

use super::cpu::f32s;
#[cfg(feature = "cuda")]
use super::cuda::{self, gpu, launch, per_element};
use super::gemm::{assume_init, gemm_uninit, uninit, Threads};
use super::rowwise;
use super::simd::simd_fn;
#[cfg(feature = "cuda")]
use candle_core::{backend::BackendStorage, CudaStorage};

/// Rows of the last dimension.
fn width(l: &Layout) -> usize {
    l.dims().last().copied().unwrap_or(1).max(1)
}

/// The gradients a backward kernel wrote one after another into its single output buffer,
/// cut apart and given their shapes.
fn unpack<const N: usize>(packed: &Tensor, shapes: [&Shape; N]) -> Result<[Tensor; N]> {
    let mut start = 0;
    let parts = shapes
        .iter()
        .map(|shape| {
            let part = packed.narrow(0, start, shape.elem_count())?.reshape(*shape);
            start += shape.elem_count();
            part
        })
        .collect::<Result<Vec<_>>>()?;
    Ok(parts.try_into().expect("one part per shape"))
}

/// The gradients of both inputs `a`, `b` of a two-input op under the output's gradient `g`,
/// from `kernel`, which writes them one after the other into one buffer.
fn both_grads(a: &Tensor, b: &Tensor, g: &Tensor, kernel: &impl CustomOp3) -> Result<(Option<Tensor>, Option<Tensor>)> {
    let packed = a.apply_op3_no_bwd(b, &g.contiguous()?, kernel)?;
    let [da, db] = unpack(&packed, [a.shape(), b.shape()])?;
    Ok((Some(da), Some(db)))
}

// ---------------------------------------------------------------- attention softmax

/// The attention probabilities `softmax(x * scale + bias)` of scores `x: [b, h, t, s]`, with
/// `bias: [b or 1, h or 1, t, s]` in f32 (masks, ALiBi), computed in f32 and given in `x`'s
/// dtype. The bias is a constant: it gets no gradient.
#[derive(Clone, Copy)]
struct AttentionSoftmax {
    scale: f32,
}

/// `x`'s dimensions, and the bias's batch and head counts, which must each be 1 or `x`'s.
fn attention_dims(x: &Layout, bias: &Layout) -> Result<([usize; 4], usize, usize)> {
    let ((b, h, t, s), (bb, bh, bt, bs)) = (x.shape().dims4()?, bias.shape().dims4()?);
    if (bb != 1 && bb != b) || (bh != 1 && bh != h) || (bt, bs) != (t, s) || s == 0 {
        candle_core::bail!("attention softmax: scores {:?} with a bias of {:?}", x.dims(), bias.dims());
    }
    Ok(([b, h, t, s], bb, bh))
}

/// The index of the `[t, s]` block of a `[bb, bh, t, s]` bias (`bb`, `bh` 1 or the batch and
/// head counts, broadcast where 1) that sequence `bi`, head `hi` reads.
pub(super) fn bias_block((bb, bh): (usize, usize), bi: usize, hi: usize) -> usize {
    (if bb == 1 { 0 } else { bi }) * bh + if bh == 1 { 0 } else { hi }
}

impl CustomOp2 for AttentionSoftmax {
    fn name(&self) -> &'static str {
        "fused-attention-softmax"
    }

    fn cpu_fwd(&self, s1: &CpuStorage, l1: &Layout, s2: &CpuStorage, l2: &Layout) -> Result<(CpuStorage, Shape)> {
        let (x, bias) = (f32s(s1, l1, "attention softmax")?, f32s(s2, l2, "attention softmax bias")?);
        let ([_, h, t, s], bb, bh) = attention_dims(l1, l2)?;
        let mut y = vec![0f32; x.len()];
        y.par_chunks_mut(s).zip(x.par_chunks(s)).enumerate().for_each(|(row, (y, x))| {
            let (i, hi, bi) = (row % t, row / t % h, row / t / h);
            let at = (bias_block((bb, bh), bi, hi) * t + i) * s;
            for ((y, x), b) in y.iter_mut().zip(x).zip(&bias[at..at + s]) {
                *y = x * self.scale + b;
            }
            rowwise::softmax_in_place(y);
        });
        Ok((CpuStorage::F32(y), l1.shape().clone()))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(&self, s1: &CudaStorage, l1: &Layout, s2: &CudaStorage, l2: &Layout) -> Result<(CudaStorage, Shape)> {
        let ([_, h, t, s], bb, bh) = attention_dims(l1, l2)?;
        let rows = l1.shape().elem_count() / s.max(1);
        per_element!(s1.dtype(), T => {
            let (x, bias) = (gpu::rows::<T>(s1, l1)?, gpu::rows::<f32>(s2, l2)?);
            // SAFETY: the kernel writes every element.
            let y = unsafe { s1.device.alloc::<T>(rows * s)? };
            let dims = [cuda::int(s)?, cuda::int(t)?, cuda::int(h)?, cuda::int(bb)?, cuda::int(bh)?];
            let name = cuda::kernel::<T>("attention_softmax_fwd");
            launch!(s1.device, name, cuda::rows(rows)?, &x, &bias, &y, &dims[0], &dims[1], &dims[2], &dims[3], &dims[4], &self.scale)?;
            Ok((CudaStorage::wrap_cuda_slice(y, s1.device.clone()), l1.shape().clone()))
        })
    }

    fn bwd(&self, _x: &Tensor, _bias: &Tensor, y: &Tensor, g: &Tensor) -> Result<(Option<Tensor>, Option<Tensor>)> {
        Ok((Some(y.apply_op2_no_bwd(&g.contiguous()?, &SoftmaxGrad { scale: self.scale })?), None))
    }
}

/// `dx = scale * y * (g - sum(g * y))`.
struct SoftmaxGrad {
    scale: f32,
}

impl CustomOp2 for SoftmaxGrad {
    fn name(&self) -> &'static str {
        "fused-softmax-grad"
    }

    fn cpu_fwd(&self, s1: &CpuStorage, l1: &Layout, s2: &CpuStorage, l2: &Layout) -> Result<(CpuStorage, Shape)> {
        let (y, g, n) = (f32s(s1, l1, "softmax grad")?, f32s(s2, l2, "softmax grad")?, width(l1));
        let mut dx = vec![0f32; y.len()];
        dx.par_chunks_mut(n).zip(y.par_chunks(n).zip(g.par_chunks(n))).for_each(|(dx, (y, g))| {
            let dot: f32 = y.iter().zip(g).map(|(y, g)| y * g).sum();
            for ((dx, y), g) in dx.iter_mut().zip(y).zip(g) {
                *dx = self.scale * y * (g - dot);
            }
        });
        Ok((CpuStorage::F32(dx), l1.shape().clone()))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(&self, s1: &CudaStorage, l1: &Layout, s2: &CudaStorage, l2: &Layout) -> Result<(CudaStorage, Shape)> {
        let n = width(l1);
        let rows = l1.shape().elem_count() / n;
        per_element!(s1.dtype(), T => {
            let (y, g) = (gpu::rows::<T>(s1, l1)?, gpu::rows::<T>(s2, l2)?);
            // SAFETY: the kernel writes every element.
            let dx = unsafe { s1.device.alloc::<T>(rows * n)? };
            let name = cuda::kernel::<T>("softmax_bwd");
            launch!(s1.device, name, cuda::rows(rows)?, &y, &g, &dx, &cuda::int(n)?, &self.scale)?;
            Ok((CudaStorage::wrap_cuda_slice(dx, s1.device.clone()), l1.shape().clone()))
        })
    }
}

pub fn attention_softmax(x: &Tensor, bias: &Tensor, scale: f64) -> Result<Tensor> {
    x.contiguous()?.apply_op2(&bias.contiguous()?.detach(), AttentionSoftmax { scale: scale as f32 })
}

// ---------------------------------------------------------------- norms

/// RMSNorm (`bias` false) or LayerNorm (`bias` true) over the last dimension:
/// `y = (x - mean) / sqrt(var + eps) * w (+ b)`, the mean taken as 0 for RMSNorm.
#[derive(Clone, Copy)]
struct Norm {
    eps: f32,
    centre: bool,
}

/// `x_hat` of one row into `out`, and `1 / sqrt(var + eps)`.
#[inline(always)]
fn normalise(x: &[f32], out: &mut [f32], eps: f32, centre: bool) -> f32 {
    let n = x.len() as f32;
    let mean = if centre { x.iter().sum::<f32>() / n } else { 0.0 };
    let var = x.iter().map(|v| (v - mean) * (v - mean)).sum::<f32>() / n;
    let r = 1.0 / (var + eps).sqrt();
    for (o, v) in out.iter_mut().zip(x) {
        *o = (v - mean) * r;
    }
    r
}

simd_fn! {
    /// One row of [`Norm`]'s forward pass.
    fn norm_row(y: &mut [f32], x: &[f32], w: &[f32], b: &[f32], eps: f32, centre: bool) {
        normalise(x, y, eps, centre);
        for ((y, w), b) in y.iter_mut().zip(w).zip(b) {
            *y = *y * w + if centre { *b } else { 0.0 };
        }
    }
}

simd_fn! {
    /// A block of rows of [`NormGrad`]: `dx` of each row, and the block's sums of `dw`, `db`.
    fn norm_grad_rows(
        dx: &mut [f32],
        x: &[f32],
        g: &[f32],
        w: &[f32],
        sums: (&mut [f32], &mut [f32], &mut [f32]),
        eps: f32,
        centre: bool,
    ) {
        let (dw, db, xh) = sums;
        let n = w.len();
        for ((dx, x), g) in dx.chunks_mut(n).zip(x.chunks(n)).zip(g.chunks(n)) {
            let r = normalise(x, xh, eps, centre);
            let (mut mean_d, mut mean_dx) = (0f32, 0f32);
            for i in 0..n {
                let d = g[i] * w[i];
                mean_d += d;
                mean_dx += d * xh[i];
                dw[i] += g[i] * xh[i];
                db[i] += g[i];
            }
            let (mean_d, mean_dx) = (mean_d / n as f32, mean_dx / n as f32);
            let shift = if centre { mean_d } else { 0.0 };
            for i in 0..n {
                dx[i] = r * (g[i] * w[i] - shift - xh[i] * mean_dx);
            }
        }
    }
}

/// Forward: inputs x, w, b (b ignored for RMSNorm, pass w).
impl CustomOp3 for Norm {
    fn name(&self) -> &'static str {
        "fused-norm"
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
        let (x, w, b, n) = (f32s(s1, l1, "norm")?, f32s(s2, l2, "norm")?, f32s(s3, l3, "norm")?, width(l1));
        let mut y = vec![0f32; x.len()];
        y.par_chunks_mut(n).zip(x.par_chunks(n)).for_each(|(y, x)| norm_row(y, x, w, b, self.eps, self.centre));
        Ok((CpuStorage::F32(y), l1.shape().clone()))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s1: &CudaStorage,
        l1: &Layout,
        s2: &CudaStorage,
        l2: &Layout,
        s3: &CudaStorage,
        l3: &Layout,
    ) -> Result<(CudaStorage, Shape)> {
        per_element!(s1.dtype(), T => {
            let (x, w, b) = (gpu::rows::<T>(s1, l1)?, gpu::rows::<T>(s2, l2)?, gpu::rows::<T>(s3, l3)?);
            let n = width(l1);
            let rows = l1.shape().elem_count() / n;
            // SAFETY: the kernel writes every element.
            let y = unsafe { s1.device.alloc::<T>(rows * n)? };
            let (eps, centre) = (self.eps, i32::from(self.centre));
            let name = cuda::kernel::<T>("norm_fwd");
            launch!(s1.device, name, cuda::rows(rows)?, &x, &w, &b, &y, &cuda::int(n)?, &eps, &centre)?;
            Ok((CudaStorage::wrap_cuda_slice(y, s1.device.clone()), l1.shape().clone()))
        })
    }

    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        _b: &Tensor,
        _y: &Tensor,
        g: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        // One buffer: dx, then dw, then db.
        let packed = x.apply_op3_no_bwd(w, &g.contiguous()?, &NormGrad(*self))?;
        let [dx, dw, db] = unpack(&packed, [x.shape(), w.shape(), w.shape()])?;
        Ok((Some(dx), Some(dw), self.centre.then_some(db)))
    }
}

/// The backward of [`Norm`]: `dx = r * (dxh - mean(dxh) - x_hat * mean(dxh * x_hat))` with
/// `dxh = g * w` (no `mean(dxh)` term for RMSNorm); `dw = sum g * x_hat`; `db = sum g`.
struct NormGrad(Norm);

impl CustomOp3 for NormGrad {
    fn name(&self) -> &'static str {
        "fused-norm-grad"
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
        let (x, w, g, n) =
            (f32s(s1, l1, "norm grad")?, f32s(s2, l2, "norm grad")?, f32s(s3, l3, "norm grad")?, width(l1));
        let mut dx = vec![0f32; x.len()];
        // dw and db are sums over rows: per fixed block of rows, then over blocks in order,
        // so that the result does not depend on how threads split the work.
        const BLOCK: usize = 32;
        let partial: Vec<(Vec<f32>, Vec<f32>)> = dx
            .par_chunks_mut(n * BLOCK)
            .zip(x.par_chunks(n * BLOCK).zip(g.par_chunks(n * BLOCK)))
            .map(|(dx, (x, g))| {
                let (mut dw, mut db, mut xh) = (vec![0f32; n], vec![0f32; n], vec![0f32; n]);
                norm_grad_rows(dx, x, g, w, (&mut dw, &mut db, &mut xh), self.0.eps, self.0.centre);
                (dw, db)
            })
            .collect();
        let mut out = dx;
        let (mut dw, mut db) = (vec![0f32; n], vec![0f32; n]);
        for (pw, pb) in partial {
            dw.iter_mut().zip(pw).for_each(|(a, b)| *a += b);
            db.iter_mut().zip(pb).for_each(|(a, b)| *a += b);
        }
        out.extend(dw);
        out.extend(db);
        let len = out.len();
        Ok((CpuStorage::F32(out), Shape::from(len)))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s1: &CudaStorage,
        l1: &Layout,
        s2: &CudaStorage,
        l2: &Layout,
        s3: &CudaStorage,
        l3: &Layout,
    ) -> Result<(CudaStorage, Shape)> {
        per_element!(s1.dtype(), T => {
            let (x, w, g) = (gpu::rows::<T>(s1, l1)?, gpu::rows::<T>(s2, l2)?, gpu::rows::<T>(s3, l3)?);
            let n = width(l1);
            let rows = l1.shape().elem_count() / n;
            let dev = &s1.device;
            // dw and db sum over rows in parts of at least 64 rows (at most 65535 parts, the
            // grid's limit), then over the parts.
            let per_part = 64.max(rows.div_ceil(65535));
            let parts = rows.div_ceil(per_part).max(1);
            // SAFETY: the kernels write every element of all three.
            let (mut packed, stats, part) = unsafe {
                (dev.alloc::<T>(rows * n + 2 * n)?, dev.alloc::<f32>(2 * rows)?, dev.alloc::<f32>(parts * 2 * n)?)
            };
            let (eps, centre) = (self.0.eps, i32::from(self.0.centre));
            let dx = &mut packed.slice_mut(..rows * n);
            let name = cuda::kernel::<T>("norm_bwd_dx");
            launch!(dev, name, cuda::rows(rows)?, &x, &w, &g, dx, &stats, &cuda::int(n)?, &eps, &centre)?;
            let (rows_i, n_i, per_part) = (cuda::int(rows)?, cuda::int(n)?, cuda::int(per_part)?);
            let name = cuda::kernel::<T>("norm_bwd_partial");
            launch!(dev, name, cuda::columns(n, parts)?, &x, &g, &stats, &part, &rows_i, &n_i, &per_part)?;
            let params = &mut packed.slice_mut(rows * n..);
            let name = cuda::kernel::<T>("norm_bwd_params");
            launch!(dev, name, cuda::elements(2 * n)?, &part, params, &cuda::int(parts)?, &cuda::int(2 * n)?)?;
            Ok((CudaStorage::wrap_cuda_slice(packed, dev.clone()), Shape::from(rows * n + 2 * n)))
        })
    }
}

pub fn rms_norm(x: &Tensor, w: &Tensor, eps: f64) -> Result<Tensor> {
    x.contiguous()?.apply_op3(w, w, Norm { eps: eps as f32, centre: false })
}

pub fn layer_norm(x: &Tensor, w: &Tensor, b: Option<&Tensor>, eps: f64) -> Result<Tensor> {
    match b {
        Some(b) => x.contiguous()?.apply_op3(w, b, Norm { eps: eps as f32, centre: true }),
        // No bias: a zero one that receives no gradient.
        None => x.contiguous()?.apply_op3(w, &w.zeros_like()?.detach(), Norm { eps: eps as f32, centre: true }),
    }
}

// ---------------------------------------------------------------- rotary embedding

/// Rotate-half RoPE of `x: [b, h, t, d]` (all `d` dimensions) by `cos`, `sin` `[t, d / 2]`;
/// its backward is the rotation by the opposite angle.
struct Rope {
    inverse: bool,
}

impl CustomOp3 for Rope {
    fn name(&self) -> &'static str {
        "fused-rope"
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
        let (x, cos, sin) = (f32s(s1, l1, "rope")?, f32s(s2, l2, "rope")?, f32s(s3, l3, "rope")?);
        let dims = l1.dims();
        let (t, d) = (dims[dims.len() - 2], dims[dims.len() - 1]);
        let half = d / 2;
        let sign = if self.inverse { -1.0 } else { 1.0 };
        let mut y = vec![0f32; x.len()];
        y.par_chunks_mut(t * d).zip(x.par_chunks(t * d)).for_each(|(y, x)| {
            for p in 0..t {
                let (x, y) = (&x[p * d..(p + 1) * d], &mut y[p * d..(p + 1) * d]);
                rotate_half(x, y, &cos[p * half..(p + 1) * half], &sin[p * half..(p + 1) * half], sign);
            }
        });
        Ok((CpuStorage::F32(y), l1.shape().clone()))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s1: &CudaStorage,
        l1: &Layout,
        s2: &CudaStorage,
        l2: &Layout,
        s3: &CudaStorage,
        l3: &Layout,
    ) -> Result<(CudaStorage, Shape)> {
        per_element!(s1.dtype(), T => {
            let (x, cos, sin) = (gpu::rows::<T>(s1, l1)?, gpu::rows::<T>(s2, l2)?, gpu::rows::<T>(s3, l3)?);
            let dims = l1.dims();
            let (t, d) = (dims[dims.len() - 2], dims[dims.len() - 1]);
            let rows = l1.shape().elem_count() / d;
            let sign: f32 = if self.inverse { -1.0 } else { 1.0 };
            // SAFETY: the kernel writes every element.
            let y = unsafe { s1.device.alloc::<T>(rows * d)? };
            let (config, name) = (cuda::elements(rows * (d / 2))?, cuda::kernel::<T>("rope"));
            launch!(s1.device, name, config, &x, &cos, &sin, &y, &cuda::int(rows)?, &cuda::int(t)?, &cuda::int(d)?, &sign)?;
            Ok((CudaStorage::wrap_cuda_slice(y, s1.device.clone()), l1.shape().clone()))
        })
    }

    fn bwd(
        &self,
        _x: &Tensor,
        cos: &Tensor,
        sin: &Tensor,
        _y: &Tensor,
        g: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let dx = g.contiguous()?.apply_op3_no_bwd(cos, sin, &Rope { inverse: !self.inverse })?;
        Ok((Some(dx), None, None))
    }
}

/// Rotate-half RoPE of one head vector's first `2 * cos.len()` dimensions by `sign` times
/// the angles whose cosines and sines are given; `dst` gets the rotated part.
pub(super) fn rotate_half(src: &[f32], dst: &mut [f32], cos: &[f32], sin: &[f32], sign: f32) {
    let half = cos.len();
    for (i, (&c, &s)) in cos.iter().zip(sin).enumerate() {
        let s = sign * s;
        dst[i] = src[i] * c - src[i + half] * s;
        dst[i + half] = src[i + half] * c + src[i] * s;
    }
}

pub fn rope(x: &Tensor, cos: &Tensor, sin: &Tensor) -> Result<Tensor> {
    // The kernels read `[t, d / 2]` tables for `x: [.., t, d]`.
    let &[.., t, d] = x.dims() else { candle_core::bail!("rope: x {:?} has no [t, d] dimensions", x.dims()) };
    let table = [t, d / 2];
    if cos.dims() != table || sin.dims() != table {
        candle_core::bail!(
            "rope: x {:?} needs cos and sin of {table:?}, not {:?} and {:?}",
            x.dims(),
            cos.dims(),
            sin.dims()
        );
    }
    x.contiguous()?.apply_op3(&cos.contiguous()?, &sin.contiguous()?, Rope { inverse: false })
}

// ---------------------------------------------------------------- SwiGLU

/// `silu(gate) * up`.
struct SwiGlu;

#[inline(always)]
fn sigmoid(z: f32) -> f32 {
    1.0 / (1.0 + rowwise::exp(-z))
}

simd_fn! {
    fn swiglu_row(y: &mut [f32], gate: &[f32], up: &[f32]) {
        for ((y, &z), &u) in y.iter_mut().zip(gate).zip(up) {
            *y = z * sigmoid(z) * u;
        }
    }
}

simd_fn! {
    fn swiglu_grad_row(dg: &mut [f32], du: &mut [f32], gate: &[f32], up: &[f32], g: &[f32]) {
        for ((((dg, du), &z), &u), &g) in dg.iter_mut().zip(du.iter_mut()).zip(gate).zip(up).zip(g) {
            let s = sigmoid(z);
            *du = g * z * s;
            *dg = g * u * s * (1.0 + z * (1.0 - s));
        }
    }
}

impl CustomOp2 for SwiGlu {
    fn name(&self) -> &'static str {
        "fused-swiglu"
    }

    fn cpu_fwd(&self, s1: &CpuStorage, l1: &Layout, s2: &CpuStorage, l2: &Layout) -> Result<(CpuStorage, Shape)> {
        let (gate, up) = (f32s(s1, l1, "swiglu")?, f32s(s2, l2, "swiglu")?);
        let mut y = vec![0f32; gate.len()];
        let n = width(l1);
        y.par_chunks_mut(n)
            .zip(gate.par_chunks(n).zip(up.par_chunks(n)))
            .for_each(|(y, (gate, up))| swiglu_row(y, gate, up));
        Ok((CpuStorage::F32(y), l1.shape().clone()))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(&self, s1: &CudaStorage, l1: &Layout, s2: &CudaStorage, l2: &Layout) -> Result<(CudaStorage, Shape)> {
        per_element!(s1.dtype(), T => {
            let (gate, up) = (gpu::rows::<T>(s1, l1)?, gpu::rows::<T>(s2, l2)?);
            let len = l1.shape().elem_count();
            // SAFETY: the kernel writes every element.
            let y = unsafe { s1.device.alloc::<T>(len)? };
            let name = cuda::kernel::<T>("swiglu_fwd");
            launch!(s1.device, name, cuda::elements(len)?, &gate, &up, &y, &cuda::int(len)?)?;
            Ok((CudaStorage::wrap_cuda_slice(y, s1.device.clone()), l1.shape().clone()))
        })
    }

    fn bwd(&self, gate: &Tensor, up: &Tensor, _y: &Tensor, g: &Tensor) -> Result<(Option<Tensor>, Option<Tensor>)> {
        both_grads(gate, up, g, &SwiGluGrad)
    }
}

struct SwiGluGrad;

impl CustomOp3 for SwiGluGrad {
    fn name(&self) -> &'static str {
        "fused-swiglu-grad"
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
        let (gate, up, g) = (f32s(s1, l1, "swiglu grad")?, f32s(s2, l2, "swiglu grad")?, f32s(s3, l3, "swiglu grad")?);
        let len = gate.len();
        let mut out = vec![0f32; 2 * len];
        let (d_gate, d_up) = out.split_at_mut(len);
        let n = width(l1);
        d_gate
            .par_chunks_mut(n)
            .zip(d_up.par_chunks_mut(n))
            .zip(gate.par_chunks(n).zip(up.par_chunks(n)).zip(g.par_chunks(n)))
            .for_each(|((dg, du), ((gate, up), g))| swiglu_grad_row(dg, du, gate, up, g));
        Ok((CpuStorage::F32(out), Shape::from(2 * len)))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s1: &CudaStorage,
        l1: &Layout,
        s2: &CudaStorage,
        l2: &Layout,
        s3: &CudaStorage,
        l3: &Layout,
    ) -> Result<(CudaStorage, Shape)> {
        per_element!(s1.dtype(), T => {
            let (gate, up, g) = (gpu::rows::<T>(s1, l1)?, gpu::rows::<T>(s2, l2)?, gpu::rows::<T>(s3, l3)?);
            let len = l1.shape().elem_count();
            // SAFETY: the kernel writes every element.
            let out = unsafe { s1.device.alloc::<T>(2 * len)? };
            let name = cuda::kernel::<T>("swiglu_bwd");
            launch!(s1.device, name, cuda::elements(len)?, &gate, &up, &g, &out, &cuda::int(len)?)?;
            Ok((CudaStorage::wrap_cuda_slice(out, s1.device.clone()), Shape::from(2 * len)))
        })
    }
}

pub fn swiglu(gate: &Tensor, up: &Tensor) -> Result<Tensor> {
    gate.contiguous()?.apply_op2(&up.contiguous()?, SwiGlu)
}

// ---------------------------------------------------------------- linear

/// `x @ w^T` for `x: [.., inp]`, `w: [out, inp]`. As a composition this is four autograd
/// nodes (transpose, matmul, two reshapes), each with a gradient buffer to allocate and
/// accumulate, and a transposed copy of the weight's gradient; here it is one node whose
/// backward is two GEMMs.
struct Linear;

impl CustomOp2 for Linear {
    fn name(&self) -> &'static str {
        "fused-linear"
    }

    fn cpu_fwd(&self, s1: &CpuStorage, l1: &Layout, s2: &CpuStorage, l2: &Layout) -> Result<(CpuStorage, Shape)> {
        let (x, w) = (f32s(s1, l1, "linear")?, f32s(s2, l2, "linear")?);
        let (out, inp) = l2.shape().dims2()?;
        let n = x.len() / inp;
        let mut y = uninit(n * out);
        gemm_uninit([n, out, inp], &mut y, (x, inp, 1), (w, 1, inp), Threads::All);
        // SAFETY: the product wrote all of `y`.
        let y = unsafe { assume_init(y) };
        let mut dims = l1.dims().to_vec();
        *dims.last_mut().expect("linear: x has a last dimension") = out;
        Ok((CpuStorage::F32(y), Shape::from(dims)))
    }

    fn bwd(&self, x: &Tensor, w: &Tensor, _y: &Tensor, g: &Tensor) -> Result<(Option<Tensor>, Option<Tensor>)> {
        both_grads(x, w, g, &LinearGrad)
    }
}

/// `dx = g @ w`, `dw = g^T @ x`.
struct LinearGrad;

impl CustomOp3 for LinearGrad {
    fn name(&self) -> &'static str {
        "fused-linear-grad"
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
        let (x, w, g) = (f32s(s1, l1, "linear grad")?, f32s(s2, l2, "linear grad")?, f32s(s3, l3, "linear grad")?);
        let (out, inp) = l2.shape().dims2()?;
        let n = x.len() / inp;
        let mut packed = uninit(x.len() + w.len());
        let (dx, dw) = packed.split_at_mut(x.len());
        gemm_uninit([n, inp, out], dx, (g, out, 1), (w, inp, 1), Threads::All);
        gemm_uninit([out, inp, n], dw, (g, 1, out), (x, inp, 1), Threads::All);
        // SAFETY: the two products wrote all of `packed`.
        let packed = unsafe { assume_init(packed) };
        Ok((CpuStorage::F32(packed), Shape::from(x.len() + w.len())))
    }
}

/// `x: [.., inp]` times `w: [out, inp]` transposed.
pub fn linear(x: &Tensor, w: &Tensor) -> Result<Tensor> {
    let inp = x.dim(candle_core::D::Minus1)?;
    let (_, w_inp) = w.dims2()?;
    if inp != w_inp {
        candle_core::bail!("linear: inputs of width {inp} for a weight {:?}", w.dims());
    }
    x.contiguous()?.apply_op2(&w.contiguous()?, Linear)
}
