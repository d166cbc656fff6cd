//! `x @ w^T` as one autograd node whose backward is two GEMMs (CPU).

use candle_core::{CpuStorage, CustomOp2, CustomOp3, Layout, Result, Shape, Tensor};

use super::both_grads;
use crate::cpu::f32s;
use crate::gemm::{assume_init, gemm_uninit, uninit, Threads};

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
