//! RMSNorm and LayerNorm over the last dimension and their backward, CPU and CUDA.

use candle_core::{CpuStorage, CustomOp3, Layout, Result, Shape, Tensor};
use rayon::prelude::*;

use super::{unpack, width};
use crate::cpu::f32s;
#[cfg(feature = "cuda")]
use crate::cuda::{self, gpu, launch, per_element};
use crate::simd::simd_fn;
#[cfg(feature = "cuda")]
use candle_core::{backend::BackendStorage, CudaStorage};

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
