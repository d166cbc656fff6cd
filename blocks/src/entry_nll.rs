//! The one vocabulary-wide operation of both losses: for logits `[n, V]` and kept ids
//! `[n, K]`, the negative log-likelihoods `lse(logits[r]) - logits[r, ids[r, k]]`, `[n, K]`.
//!
//! The CLM loss is the case K = 1 (the gold next token); the sparse fusion loss gathers the
//! fused target's ids; both together are one call. On the CPU this is a custom op whose
//! forward keeps O(n * K) and whose backward writes the single `[n, V]` gradient buffer
//! directly (`softmax * sum_k g_k - scatter(g)`), where the composed `log_softmax + gather`
//! holds several `[n, V]` intermediates. On CUDA the same two kernels run on the GPU
//! (`cuda.rs`); elsewhere the composition is used.

use candle_core::{CpuStorage, CustomOp2, CustomOp3, Layout, Shape, Tensor, D};
use rayon::prelude::*;

use super::cpu::{contiguous, f32s};
#[cfg(feature = "cuda")]
use super::cuda::{self, gpu, launch};
use super::ops::{log_softmax, Kernels, Reach};
use super::rowwise;
#[cfg(feature = "cuda")]
use candle_core::CudaStorage;

/// `-log softmax(logits)[ids]` per kept entry. `logits` `[.., V]` f32, `ids` `[.., K]` u32
/// with the same leading dimensions; the result has the shape of `ids`.
pub fn entry_nll(kernels: Kernels, logits: &Tensor, ids: &Tensor) -> candle_core::Result<Tensor> {
    if kernels.fusable(&[logits], Reach::Cuda) {
        let v = logits.dim(D::Minus1)?;
        let k = ids.dim(D::Minus1)?;
        let rows = logits.elem_count() / v;
        let flat = logits.reshape((rows, v))?;
        return flat.apply_op2(&ids.reshape((rows, k))?.contiguous()?, EntryNll)?.reshape(ids.shape());
    }
    composed_entry_nll(logits, ids)
}

/// The same as a composition of differentiable ops (any device; the reference in tests).
pub fn composed_entry_nll(logits: &Tensor, ids: &Tensor) -> candle_core::Result<Tensor> {
    log_softmax(logits)?.gather(&ids.contiguous()?, D::Minus1)?.neg()
}

struct EntryNll;

fn inputs<'a>(
    s1: &'a CpuStorage,
    l1: &Layout,
    s2: &'a CpuStorage,
    l2: &Layout,
) -> candle_core::Result<(&'a [f32], &'a [u32], usize, usize)> {
    let (CpuStorage::F32(logits), CpuStorage::U32(ids)) = (s1, s2) else {
        candle_core::bail!("entry_nll takes f32 logits and u32 ids")
    };
    let (rows, v) = l1.shape().dims2()?;
    let (rows_ids, k) = l2.shape().dims2()?;
    if rows != rows_ids {
        candle_core::bail!("entry_nll: {rows} rows of logits but {rows_ids} rows of ids");
    }
    let (logits, ids) = (contiguous(logits, l1, "entry_nll logits")?, contiguous(ids, l2, "entry_nll ids")?);
    if let Some(&bad) = ids.iter().find(|&&i| i as usize >= v) {
        candle_core::bail!("entry_nll: id {bad} is outside the vocabulary of {v}");
    }
    Ok((logits, ids, v, k))
}

impl CustomOp2 for EntryNll {
    fn name(&self) -> &'static str {
        "entry-nll"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let (logits, ids, v, k) = inputs(s1, l1, s2, l2)?;
        let mut out = vec![0f32; ids.len()];
        out.par_chunks_mut(k.max(1)).zip(logits.par_chunks(v)).zip(ids.par_chunks(k.max(1))).for_each(
            |((out, row), ids)| {
                let lse = rowwise::log_sum_exp(row, 1.0);
                for (o, &i) in out.iter_mut().zip(ids) {
                    *o = lse - row[i as usize];
                }
            },
        );
        Ok((CpuStorage::F32(out), l2.shape().clone()))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s1: &CudaStorage,
        l1: &Layout,
        s2: &CudaStorage,
        l2: &Layout,
    ) -> candle_core::Result<(CudaStorage, Shape)> {
        let ((rows, v), (_, k)) = (l1.shape().dims2()?, l2.shape().dims2()?);
        let (logits, ids) = (gpu::rows::<f32>(s1, l1)?, gpu::rows::<u32>(s2, l2)?);
        let dev = &s1.device;
        // SAFETY: the kernel writes every element.
        let out = unsafe { dev.alloc::<f32>(rows * k)? };
        launch!(dev, "entry_nll_fwd", cuda::rows(rows)?, &logits, &ids, &out, &cuda::int(v)?, &cuda::int(k)?)?;
        Ok((CudaStorage::wrap_cuda_slice(out, dev.clone()), l2.shape().clone()))
    }

    fn bwd(
        &self,
        logits: &Tensor,
        ids: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>)> {
        Ok((Some(entry_nll_grad(logits, ids, grad)?), None))
    }
}

/// The gradient with respect to `logits` `[n, V]` of `sum g * entry_nll(logits, ids)` for
/// `ids` and `g` `[n, K]`, as a value (no backward recorded): `softmax(logits) * sum_k g_k -
/// scatter(g)`. CPU and CUDA, f32.
pub(crate) fn entry_nll_grad(logits: &Tensor, ids: &Tensor, g: &Tensor) -> candle_core::Result<Tensor> {
    logits.contiguous()?.apply_op3_no_bwd(&ids.contiguous()?, &g.contiguous()?, &EntryNllGrad)
}

/// The backward of [`EntryNll`]: `d/dlogits = softmax(logits) * sum_k g_k - scatter(g)`.
struct EntryNllGrad;

impl CustomOp3 for EntryNllGrad {
    fn name(&self) -> &'static str {
        "entry-nll-grad"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let (logits, ids, v, k) = inputs(s1, l1, s2, l2)?;
        let grad = f32s(s3, l3, "entry_nll gradient")?;
        let mut out = vec![0f32; logits.len()];
        out.par_chunks_mut(v)
            .zip(logits.par_chunks(v))
            .zip(ids.par_chunks(k.max(1)).zip(grad.par_chunks(k.max(1))))
            .for_each(|((out, row), (ids, g))| {
                let total: f32 = g.iter().sum();
                if total != 0.0 {
                    let lse = rowwise::log_sum_exp(row, 1.0);
                    for (o, &x) in out.iter_mut().zip(row) {
                        *o = rowwise::exp(x - lse) * total;
                    }
                }
                for (&i, &g) in ids.iter().zip(g) {
                    out[i as usize] -= g;
                }
            });
        Ok((CpuStorage::F32(out), l1.shape().clone()))
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
    ) -> candle_core::Result<(CudaStorage, Shape)> {
        let ((rows, v), (_, k)) = (l1.shape().dims2()?, l2.shape().dims2()?);
        let (logits, ids, grad) = (gpu::rows::<f32>(s1, l1)?, gpu::rows::<u32>(s2, l2)?, gpu::rows::<f32>(s3, l3)?);
        let dev = &s1.device;
        // SAFETY: the kernel writes every element.
        let out = unsafe { dev.alloc::<f32>(rows * v)? };
        launch!(dev, "entry_nll_bwd", cuda::rows(rows)?, &logits, &ids, &grad, &out, &cuda::int(v)?, &cuda::int(k)?)?;
        Ok((CudaStorage::wrap_cuda_slice(out, dev.clone()), l1.shape().clone()))
    }
}
