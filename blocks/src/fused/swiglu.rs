//! The SwiGLU activation `silu(gate) * up` and its backward, CPU and CUDA.

use candle_core::{CpuStorage, CustomOp2, CustomOp3, Layout, Result, Shape, Tensor};
use rayon::prelude::*;

use super::{both_grads, width};
use crate::cpu::f32s;
#[cfg(feature = "cuda")]
use crate::cuda::{self, gpu, launch, per_element};
use crate::rowwise;
use crate::simd::simd_fn;
#[cfg(feature = "cuda")]
use candle_core::{backend::BackendStorage, CudaStorage};

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
