//! The attention softmax `softmax(x * scale + bias)` and its backward, CPU and CUDA.

use candle_core::{CpuStorage, CustomOp2, Layout, Result, Shape, Tensor};
use rayon::prelude::*;

use super::width;
use crate::cpu::f32s;
#[cfg(feature = "cuda")]
use crate::cuda::{self, gpu, launch, per_element};
use crate::rowwise;
#[cfg(feature = "cuda")]
use candle_core::{backend::BackendStorage, CudaStorage};

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
