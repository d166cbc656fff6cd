//! Rotate-half rotary embedding and its backward (the opposite rotation), CPU and CUDA.

use candle_core::{CpuStorage, CustomOp3, Layout, Result, Shape, Tensor};
use rayon::prelude::*;

use crate::cpu::f32s;
#[cfg(feature = "cuda")]
use crate::cuda::{self, gpu, launch, per_element};
#[cfg(feature = "cuda")]
use candle_core::{backend::BackendStorage, CudaStorage};

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
