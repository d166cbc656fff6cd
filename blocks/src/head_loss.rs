//! The language-model head and the loss as one op, with the gradients computed in the
//! forward pass.
//!
//! The head turns hidden states `[n, d]` into logits `[n, V]`; at V = 32000 and a batch of
//! 1024 tokens that is 131 MB, and autograd holds it together with its gradient and the
//! intermediate sums. The loss needs only a few numbers per row (a log-sum-exp and the
//! logits at the kept ids), and the gradient of the logits is `softmax * c - scatter(w)`,
//! known as soon as the row's log-sum-exp is. So the op walks the rows in chunks: logits
//! of the chunk (one GEMM), losses and the logits' gradient, then the chunk's share of the
//! hidden states' and the head's gradients (two GEMMs). Nothing of size `[n, V]` outlives
//! a chunk. On the CPU in f32 this is one kernel that turns the logits into their gradient
//! in place ([`cpu_pass`]); on other devices and dtypes (CUDA in bf16 or f32) it is
//! composed of cuBLAS products and the entry-NLL kernels ([`chunked_pass`]).
//!
//! The price is that the gradient is fixed at forward time: the op's outputs are the loss
//! terms, and it can be differentiated only through the mixture the terms were built with
//! (`sum_t mix_t * value_t`, the training loss), which [`HeadLoss::bwd`] checks.

use candle_core::{CpuStorage, CustomOp2, DType, Device, Layout, Shape, Tensor};
use rayon::prelude::*;

use super::cpu::with_host_f32s;
use super::gemm::{gemm, Threads};
use super::ops::{Kernels, Reach};
use super::rowwise;
use super::terms::{self, Term};

/// Logits held at once elsewhere. A chunk's working set is a few buffers of its size (the
/// logits in the model's dtype and in f32, their gradient in f32 and in the model's dtype),
/// about 1 GB here: large enough for efficient GPU products, a quarter of the logits of
/// 8 x 1024 tokens at V = 32000.
const DEVICE_CHUNK_ELEMENTS: usize = 64 << 20;

/// The value of each term for hidden states `x: [n, d]` and head `w: [V, d]` (logits
/// `x w^T`, soft-capped as `c * tanh(z / c)` when `softcap` is given): a `[terms]` f32
/// tensor, differentiable through `sum_t mix_t * value_t`. The terms' ids are below `V`:
/// `Objective::terms` checks them before any kernel runs.
pub fn head_loss(
    kernels: Kernels,
    x: &Tensor,
    w: &Tensor,
    terms: &[Term],
    softcap: Option<f32>,
) -> candle_core::Result<Tensor> {
    let n = x.dim(0)?;
    for t in terms {
        if t.ids.len() != n * t.k || t.weights.len() != n * t.k || t.scale.is_nan() || t.scale <= 0.0 {
            candle_core::bail!(
                "head_loss: a term of {} ids and {} weights with scale {} for {n} rows of {} entries",
                t.ids.len(),
                t.weights.len(),
                t.scale,
                t.k
            );
        }
    }
    let (x, w) = (x.contiguous()?, w.contiguous()?);
    let (values, grads) = match kernels.fusable(&[&x, &w], Reach::Cpu) {
        true => cpu_pass(&x, &w, terms, softcap)?,
        false => chunked_pass(&x, &w, terms, softcap, DEVICE_CHUNK_ELEMENTS)?,
    };
    x.apply_op2(&w, HeadLoss { mix: terms.iter().map(|t| t.mix).collect(), values, grads })
}

/// The terms' values, and the total's gradients with respect to `x` and `w`.
type Pass = (Vec<f32>, (Tensor, Tensor));

/// One CPU kernel: per chunk, `z = x w^T` (GEMM), soft-capped in place, then each row of
/// `z` becomes the row's losses and, in place, `d total / d z`, then two GEMMs add the
/// chunk's `dx` and `dw`.
fn cpu_pass(x: &Tensor, w: &Tensor, terms: &[Term], softcap: Option<f32>) -> candle_core::Result<Pass> {
    let ((n, d), (v, d_w)) = (x.dims2()?, w.dims2()?);
    if d != d_w {
        candle_core::bail!("head_loss: hidden states of width {d} but a head of width {d_w}");
    }
    let (mut dx, mut dw) = (vec![0f32; n * d], vec![0f32; v * d]);
    let mut row_values = vec![0f64; n * terms.len()];
    let chunk = (super::HOST_CHUNK_ELEMENTS / v.max(1)).clamp(1, n.max(1));
    let mut logits = vec![0f32; chunk * v];
    // With a soft-cap, the derivative of the cap at each logit of the chunk.
    let mut slopes = vec![0f32; if softcap.is_some() { chunk * v } else { chunk }];
    let per_row = slopes.len() / chunk;
    with_host_f32s(x, |x| {
        with_host_f32s(w, |w| {
            for (c, start) in (0..n).step_by(chunk).enumerate() {
                let rows = chunk.min(n - start);
                let (z, xc) = (&mut logits[..rows * v], &x[start * d..(start + rows) * d]);
                gemm([rows, v, d], z, false, (xc, d, 1), (w, 1, d), Threads::All);
                let values = &mut row_values[start * terms.len()..(start + rows) * terms.len()];
                z.par_chunks_mut(v)
                    .zip(values.par_chunks_mut(terms.len()))
                    .zip(slopes.par_chunks_mut(per_row))
                    .enumerate()
                    .for_each(|(i, ((row, values), slopes))| {
                        if let Some(cap) = softcap {
                            soft_cap(row, slopes, cap);
                        }
                        grad_row(terms, row, start + i, values);
                        if softcap.is_some() {
                            row.iter_mut().zip(slopes.iter()).for_each(|(g, s)| *g *= s);
                        }
                    });
                gemm([rows, d, v], &mut dx[start * d..(start + rows) * d], false, (z, v, 1), (w, d, 1), Threads::All);
                gemm([v, d, rows], &mut dw, c > 0, (z, 1, v), (xc, d, 1), Threads::All);
            }
        })
    })??;
    let mut values = vec![0f64; terms.len()];
    for row in row_values.chunks(terms.len()) {
        values.iter_mut().zip(row).for_each(|(s, v)| *s += v);
    }
    let grads = (Tensor::from_vec(dx, (n, d), &Device::Cpu)?, Tensor::from_vec(dw, (v, d), &Device::Cpu)?);
    Ok((values.iter().map(|&s| s as f32).collect(), grads))
}

/// `z = c * tanh(z / c)` in place, with the derivative `1 - tanh^2` of each into `slopes`.
fn soft_cap(row: &mut [f32], slopes: &mut [f32], cap: f32) {
    for (z, slope) in row.iter_mut().zip(slopes) {
        let tanh = (*z / cap).tanh();
        (*z, *slope) = (cap * tanh, 1.0 - tanh * tanh);
    }
}

/// The same from tensor ops on any device and dtype, in chunks of `chunk_elements` logits:
/// the products in the model's dtype (cuBLAS on CUDA), the losses and the logits' gradient
/// in f32 by the entry-NLL kernels ([`terms::values_and_grad`]); the chunks' shares of `dw`
/// are added up in f32.
fn chunked_pass(
    x: &Tensor,
    w: &Tensor,
    terms: &[Term],
    softcap: Option<f32>,
    chunk_elements: usize,
) -> candle_core::Result<Pass> {
    let (x, w) = (x.detach(), w.detach());
    let ((n, _), (v, _)) = (x.dims2()?, w.dims2()?);
    let chunk = (chunk_elements / v.max(1)).clamp(1, n.max(1));
    let (mut values, mut dxs, mut dw) = (Tensor::zeros(terms.len(), DType::F32, x.device())?, Vec::new(), None);
    for start in (0..n).step_by(chunk) {
        let rows = chunk.min(n - start);
        let part: Vec<Term> = terms.iter().map(|t| t.rows(start, rows)).collect();
        let xc = x.narrow(0, start, rows)?;
        let mut z = xc.matmul(&w.t()?)?.to_dtype(DType::F32)?;
        let mut slopes = None;
        if let Some(cap) = softcap {
            let tanh = (z / cap as f64)?.tanh()?;
            slopes = Some((1.0 - tanh.sqr()?)?);
            z = (tanh * cap as f64)?;
        }
        let (chunk_values, mut dz) = terms::values_and_grad(&z, &part)?;
        drop(z);
        if let Some(slopes) = slopes {
            dz = (dz * slopes)?;
        }
        values = (values + chunk_values)?;
        let dz = dz.to_dtype(x.dtype())?;
        dxs.push(dz.matmul(&w)?);
        let dw_chunk = dz.t()?.matmul(&xc)?.to_dtype(DType::F32)?;
        dw = Some(match dw {
            None => dw_chunk,
            Some(sum) => (sum + dw_chunk)?,
        });
    }
    let dx = Tensor::cat(&dxs, 0)?;
    let dw = match dw {
        Some(dw) => dw.to_dtype(w.dtype())?,
        None => w.zeros_like()?,
    };
    Ok((values.to_vec1()?, (dx, dw)))
}

/// The op that gives the terms' values the gradients computed with them.
struct HeadLoss {
    mix: Vec<f32>,
    values: Vec<f32>,
    /// `d total / d x` and `d total / d w`.
    grads: (Tensor, Tensor),
}

impl CustomOp2 for HeadLoss {
    fn name(&self) -> &'static str {
        "head-loss"
    }

    fn cpu_fwd(
        &self,
        _: &CpuStorage,
        _: &Layout,
        _: &CpuStorage,
        _: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        Ok((CpuStorage::F32(self.values.clone()), Shape::from(self.values.len())))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s1: &candle_core::CudaStorage,
        _: &Layout,
        _: &candle_core::CudaStorage,
        _: &Layout,
    ) -> candle_core::Result<(candle_core::CudaStorage, Shape)> {
        use candle_core::backend::BackendDevice;
        Ok((s1.device.storage_from_slice(&self.values)?, Shape::from(self.values.len())))
    }

    fn bwd(
        &self,
        _x: &Tensor,
        _w: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>)> {
        let c = along_mix(&self.mix, &grad.to_vec1::<f32>()?)?;
        let (dx, dw) = &self.grads;
        if c == 1.0 {
            return Ok((Some(dx.clone()), Some(dw.clone())));
        }
        Ok((Some((dx * c as f64)?), Some((dw * c as f64)?)))
    }
}

/// Losses of row `r` into `values`, and the row's logits replaced by their gradient.
fn grad_row(terms: &[Term], row: &mut [f32], r: usize, values: &mut [f64]) {
    let max = rowwise::max(row);
    // (scale, sum of e^((z - max) * scale), softmax coefficient of the gradient)
    let mut groups: Vec<(f32, f64, f32)> = Vec::with_capacity(terms.len());
    for (t, value) in terms.iter().zip(values.iter_mut()) {
        let (ids, weights) = t.row(r);
        let total: f32 = weights.iter().sum();
        if total == 0.0 {
            continue;
        }
        let group = match groups.iter().position(|g| g.0 == t.scale) {
            Some(i) => i,
            None => {
                groups.push((t.scale, rowwise::exp_sum(row, max, t.scale), 0.0));
                groups.len() - 1
            }
        };
        let (scale, sum, coef) = &mut groups[group];
        let lse = (max * *scale) as f64 + sum.ln();
        *value = ids.iter().zip(weights).map(|(&i, &w)| w as f64 * (lse - (row[i as usize] * *scale) as f64)).sum();
        *coef += t.mix * *scale * total / *sum as f32;
    }
    match groups[..] {
        [] => row.fill(0.0),
        [(scale, _, coef)] => rowwise::scaled_exp_in_place(row, max, scale, coef),
        _ => row.iter_mut().for_each(|z| {
            let x = *z;
            *z = groups.iter().map(|&(scale, _, coef)| coef * rowwise::exp((x - max) * scale)).sum();
        }),
    }
    for t in terms {
        let (ids, weights) = t.row(r);
        for (&i, &w) in ids.iter().zip(weights) {
            row[i as usize] -= t.mix * t.scale * w;
        }
    }
}

/// The `c` with `grad = c * mix`: the only direction the forward pass prepared.
fn along_mix(mix: &[f32], grad: &[f32]) -> candle_core::Result<f32> {
    let norm: f32 = mix.iter().map(|m| m * m).sum();
    let c = if norm > 0.0 { grad.iter().zip(mix).map(|(g, m)| g * m).sum::<f32>() / norm } else { 0.0 };
    let scale = grad.iter().fold(0f32, |a, g| a.max(g.abs()));
    if grad.iter().zip(mix).any(|(g, m)| (g - c * m).abs() > 1e-6 * scale) {
        candle_core::bail!(
            "head_loss is differentiable only through the total it was built for (weights {mix:?}), \
             not with output gradients {grad:?}; take the gradient of the total loss"
        );
    }
    Ok(c)
}

#[cfg(test)]
mod tests {
    use super::*;
    use fusellm_sdk::rng::Rng;

    fn random(rng: &mut Rng, shape: (usize, usize), scale: f64) -> Tensor {
        let data: Vec<f32> = (0..shape.0 * shape.1).map(|_| (rng.normal() * scale) as f32).collect();
        Tensor::from_vec(data, shape, &Device::Cpu).unwrap()
    }

    fn term(rng: &mut Rng, n: usize, k: usize, v: u32, scale: f32, mix: f32) -> Term {
        let ids = (0..n * k).map(|_| rng.below(v)).collect();
        // Every fifth row left out of the term.
        let weights =
            (0..n * k).map(|i| if (i / k).is_multiple_of(5) { 0.0 } else { rng.unit() as f32 / n as f32 }).collect();
        Term { scale, k, ids, weights, mix }
    }

    fn max_abs_diff(a: &Tensor, b: &Tensor) -> f32 {
        let diff = (a.to_dtype(DType::F32).unwrap() - b.to_dtype(DType::F32).unwrap()).unwrap();
        diff.abs().unwrap().flatten_all().unwrap().max(0).unwrap().to_scalar().unwrap()
    }

    /// The composed pass that CUDA runs, here on the CPU in chunks of 7 rows, against the
    /// CPU kernel: the same values and gradients, in f32 and from f64 inputs. Two terms
    /// share a scale and one has another, so both the shared and the separate passes over
    /// the vocabulary are covered.
    #[test]
    fn the_chunked_pass_matches_the_cpu_kernel() {
        let mut rng = Rng::new(11);
        let (n, d, v) = (30, 8, 300);
        let (x, w) = (random(&mut rng, (n, d), 1.0), random(&mut rng, (v, d), 0.7));
        let terms = [
            term(&mut rng, n, 1, 300, 1.0, 0.7),
            term(&mut rng, n, 3, 300, 1.0, 0.2),
            term(&mut rng, n, 2, 300, 0.5, 0.1),
        ];
        for softcap in [None, Some(1.5)] {
            let (values, (dx, dw)) = cpu_pass(&x, &w, &terms, softcap).unwrap();
            for dtype in [DType::F32, DType::F64] {
                let (x, w) = (x.to_dtype(dtype).unwrap(), w.to_dtype(dtype).unwrap());
                let (chunked, (cdx, cdw)) = chunked_pass(&x, &w, &terms, softcap, 7 * v).unwrap();
                for (a, b) in chunked.iter().zip(&values) {
                    assert!((a - b).abs() <= 1e-5 * b.abs().max(1.0), "{dtype:?}: values {chunked:?} vs {values:?}");
                }
                assert_eq!((cdx.dims(), cdx.dtype(), cdw.dims(), cdw.dtype()), (dx.dims(), dtype, dw.dims(), dtype));
                for (name, a, b) in [("dx", &cdx, &dx), ("dw", &cdw, &dw)] {
                    let scale = max_abs_diff(b, &b.zeros_like().unwrap());
                    assert!(max_abs_diff(a, b) <= 1e-4 * scale, "{dtype:?} {softcap:?}: {name} differs");
                }
            }
        }
    }
}
