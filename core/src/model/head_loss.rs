//! The language-model head and the loss as one CPU kernel, with the gradients computed in
//! the forward pass.
//!
//! The head turns hidden states `[n, d]` into logits `[n, V]`; at V = 32000 and a batch of
//! 1024 tokens that is 131 MB, and autograd holds it together with its gradient and the
//! intermediate sums. The loss needs only a few numbers per row (a log-sum-exp and the
//! logits at the kept ids), and the gradient of the logits is `softmax * c - scatter(w)`,
//! known as soon as the row's log-sum-exp is. So this kernel walks the rows in chunks:
//! logits of the chunk (one GEMM), losses and the logits' gradient in place, then the
//! chunk's share of the hidden states' and the head's gradients (two GEMMs). Nothing of
//! size `[n, V]` outlives a chunk.
//!
//! The price is that the gradient is fixed at forward time: the op's outputs are the loss
//! terms, and it can be differentiated only through the mixture the terms were built with
//! (`sum_t mix_t * value_t`, the training loss), which [`HeadLoss::bwd`] checks.

use std::sync::Mutex;

use candle_core::{CpuStorage, CustomOp2, Device, Layout, Shape, Tensor};
use rayon::prelude::*;

use super::cpu::f32s;
use super::gemm::{gemm, Threads};
use super::rowwise;

/// Logits held at once: chunks of rows of at most this many elements (32 MB).
const CHUNK_ELEMENTS: usize = 8 << 20;

/// One term of a loss over logits `z`: `sum_r sum_k weights[r, k] * nll(z[r] * scale, ids[r, k])`,
/// where `nll(y, i) = logsumexp(y) - y[i]`.
#[derive(Clone, Debug)]
pub struct Term {
    /// Multiplies the logits before the softmax (`1 / temperature`); positive.
    pub scale: f32,
    /// Entries per row.
    pub k: usize,
    /// `[n, k]` vocabulary ids.
    pub ids: Vec<u32>,
    /// `[n, k]` weights; a row of zeros leaves the row out of the term.
    pub weights: Vec<f32>,
    /// The term's weight in the differentiated total.
    pub mix: f32,
}

impl Term {
    fn row(&self, r: usize) -> (&[u32], &[f32]) {
        let span = r * self.k..(r + 1) * self.k;
        (&self.ids[span.clone()], &self.weights[span])
    }
}

/// The value of each term for hidden states `x: [n, d]` and head `w: [V, d]` (f32, CPU):
/// a `[terms]` tensor, differentiable through `sum_t mix_t * value_t`. The terms' ids are
/// below `V`: `Objective::terms` checks them before any kernel runs.
pub fn head_loss(x: &Tensor, w: &Tensor, terms: Vec<Term>) -> candle_core::Result<Tensor> {
    let n = x.dim(0)?;
    for t in &terms {
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
    x.contiguous()?.apply_op2(&w.contiguous()?, HeadLoss { terms, grads: Mutex::new(None) })
}

struct HeadLoss {
    terms: Vec<Term>,
    /// `d total / d x` and `d total / d w`, from the forward pass.
    grads: Mutex<Option<(Tensor, Tensor)>>,
}

impl CustomOp2 for HeadLoss {
    fn name(&self) -> &'static str {
        "head-loss"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let (x, w) = (f32s(s1, l1, "head_loss hidden states")?, f32s(s2, l2, "head_loss head")?);
        let ((n, d), (v, d_w)) = (l1.shape().dims2()?, l2.shape().dims2()?);
        if d != d_w {
            candle_core::bail!("head_loss: hidden states of width {d} but a head of width {d_w}");
        }
        let mut dx = vec![0f32; n * d];
        let mut dw = vec![0f32; v * d];
        let mut row_values = vec![0f64; n * self.terms.len()];
        let chunk = (CHUNK_ELEMENTS / v.max(1)).clamp(1, n.max(1));
        let mut logits = vec![0f32; chunk * v];
        for (c, start) in (0..n).step_by(chunk).enumerate() {
            let rows = chunk.min(n - start);
            let (z, xc) = (&mut logits[..rows * v], &x[start * d..(start + rows) * d]);
            // z = xc @ w^T, then z becomes dtotal/dz.
            gemm([rows, v, d], z, false, (xc, d, 1), (w, 1, d), Threads::All);
            let values = &mut row_values[start * self.terms.len()..(start + rows) * self.terms.len()];
            z.par_chunks_mut(v)
                .zip(values.par_chunks_mut(self.terms.len()))
                .enumerate()
                .for_each(|(i, (row, values))| self.row(row, start + i, values));
            gemm([rows, d, v], &mut dx[start * d..(start + rows) * d], false, (z, v, 1), (w, d, 1), Threads::All);
            gemm([v, d, rows], &mut dw, c > 0, (z, 1, v), (xc, d, 1), Threads::All);
        }
        let mut values = vec![0f64; self.terms.len()];
        for row in row_values.chunks(self.terms.len()) {
            values.iter_mut().zip(row).for_each(|(s, v)| *s += v);
        }
        let grads = (Tensor::from_vec(dx, (n, d), &Device::Cpu)?, Tensor::from_vec(dw, (v, d), &Device::Cpu)?);
        *self.grads.lock().expect("head_loss gradients") = Some(grads);
        let values: Vec<f32> = values.iter().map(|&s| s as f32).collect();
        Ok((CpuStorage::F32(values), Shape::from(self.terms.len())))
    }

    fn bwd(
        &self,
        _x: &Tensor,
        _w: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>)> {
        let c = self.along_mix(&grad.to_vec1::<f32>()?)?;
        let guard = self.grads.lock().expect("head_loss gradients");
        let Some((dx, dw)) = guard.as_ref() else { candle_core::bail!("head_loss: backward before forward") };
        if c == 1.0 {
            return Ok((Some(dx.clone()), Some(dw.clone())));
        }
        Ok((Some((dx * c as f64)?), Some((dw * c as f64)?)))
    }
}

impl HeadLoss {
    /// Losses of row `r` into `values`, and the row's logits replaced by their gradient.
    fn row(&self, row: &mut [f32], r: usize, values: &mut [f64]) {
        let max = rowwise::max(row);
        // (scale, sum of e^((z - max) * scale), softmax coefficient of the gradient)
        let mut groups: Vec<(f32, f64, f32)> = Vec::with_capacity(self.terms.len());
        for (t, value) in self.terms.iter().zip(values.iter_mut()) {
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
        for t in &self.terms {
            let (ids, weights) = t.row(r);
            for (&i, &w) in ids.iter().zip(weights) {
                row[i as usize] -= t.mix * t.scale * w;
            }
        }
    }

    /// The `c` with `grad = c * mix`: the only direction the forward pass prepared.
    fn along_mix(&self, grad: &[f32]) -> candle_core::Result<f32> {
        let mix: Vec<f32> = self.terms.iter().map(|t| t.mix).collect();
        let norm: f32 = mix.iter().map(|m| m * m).sum();
        let c = if norm > 0.0 { grad.iter().zip(&mix).map(|(g, m)| g * m).sum::<f32>() / norm } else { 0.0 };
        let scale = grad.iter().fold(0f32, |a, g| a.max(g.abs()));
        if grad.iter().zip(&mix).any(|(g, m)| (g - c * m).abs() > 1e-6 * scale) {
            candle_core::bail!(
                "head_loss is differentiable only through the total it was built for (weights {mix:?}), \
                 not with output gradients {grad:?}; take the gradient of the total loss"
            );
        }
        Ok(c)
    }
}
