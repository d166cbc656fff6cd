//! The objective as terms over logits: each a weighted sum of negative log-likelihoods at
//! kept ids ([`Term`]). The CLM loss is one term, the sparse fusion loss another; the
//! objective is their mixture. This file holds the terms' values and their gradient over
//! materialised logits, built from the [`entry_nll`] kernels; `head_loss` computes the same
//! without materialising all the logits at once.

use candle_core::{Result, Tensor};

use super::entry_nll::{entry_nll, entry_nll_grad};
use super::ops::Kernels;

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
    /// The ids and weights of row `r`.
    pub(crate) fn row(&self, r: usize) -> (&[u32], &[f32]) {
        let span = r * self.k..(r + 1) * self.k;
        (&self.ids[span.clone()], &self.weights[span])
    }

    /// The term restricted to `rows` rows from `start`.
    pub(crate) fn rows(&self, start: usize, rows: usize) -> Term {
        let span = start * self.k..(start + rows) * self.k;
        Term { ids: self.ids[span.clone()].to_vec(), weights: self.weights[span].to_vec(), ..*self }
    }
}

/// Terms of one scale, their ids and weights side by side (`[n, sum of k]`), so that one
/// pass over the vocabulary serves them all.
struct Group {
    scale: f32,
    /// Indices of the member terms, with the first column of each in the side-by-side rows.
    members: Vec<(usize, usize)>,
    ids: Tensor,
    weights: Tensor,
    /// Each column's term mix, `[sum of k]`.
    mix: Tensor,
}

fn groups(terms: &[Term], rows: usize, device: &candle_core::Device) -> Result<Vec<Group>> {
    let mut scales: Vec<f32> = Vec::new();
    for t in terms {
        if !scales.contains(&t.scale) {
            scales.push(t.scale);
        }
    }
    scales
        .into_iter()
        .map(|scale| {
            let (mut members, mut mix) = (Vec::new(), Vec::new());
            for (i, t) in terms.iter().enumerate().filter(|(_, t)| t.scale == scale) {
                members.push((i, mix.len()));
                mix.extend(std::iter::repeat_n(t.mix, t.k));
            }
            let width = mix.len();
            let (mut ids, mut weights) = (Vec::with_capacity(rows * width), Vec::with_capacity(rows * width));
            for r in 0..rows {
                for &(i, _) in &members {
                    let (row_ids, row_weights) = terms[i].row(r);
                    ids.extend_from_slice(row_ids);
                    weights.extend_from_slice(row_weights);
                }
            }
            Ok(Group {
                scale,
                members,
                ids: Tensor::from_vec(ids, (rows, width), device)?,
                weights: Tensor::from_vec(weights, (rows, width), device)?,
                mix: Tensor::from_vec(mix, width, device)?,
            })
        })
        .collect()
}

fn scaled(logits: &Tensor, scale: f32) -> Result<Tensor> {
    match scale {
        1.0 => Ok(logits.clone()),
        s => logits * s as f64,
    }
}

/// The terms' values `[terms]` over logits `[n, V]` (f32), differentiable.
pub fn values(kernels: Kernels, logits: &Tensor, terms: &[Term]) -> Result<Tensor> {
    Ok(evaluate(kernels, logits, terms, false)?.0)
}

/// The terms' values as [`values`], and the gradient of `sum_t mix_t * value_t` with
/// respect to the logits as one `[n, V]` tensor: per scale `s`, `s * (softmax(s z) * sum_k
/// c_k - scatter(c))` with `c = mix * weights`. Each group's ids, weights and scaled logits
/// serve both.
pub fn values_and_grad(logits: &Tensor, terms: &[Term]) -> Result<(Tensor, Tensor)> {
    // The gradient is the entry-NLL kernel's, so its values are too.
    let (values, grad) = evaluate(Kernels::Fused, logits, terms, true)?;
    Ok((values, grad.expect("evaluate returns the gradient when asked")))
}

fn evaluate(kernels: Kernels, logits: &Tensor, terms: &[Term], with_grad: bool) -> Result<(Tensor, Option<Tensor>)> {
    let (mut values, mut grad) = (vec![None; terms.len()], None);
    for g in groups(terms, logits.dim(0)?, logits.device())? {
        let z = scaled(logits, g.scale)?;
        let weighted = (entry_nll(kernels, &z, &g.ids)? * &g.weights)?;
        for &(i, column) in &g.members {
            values[i] = Some(weighted.narrow(1, column, terms[i].k)?.sum_all()?);
        }
        if with_grad {
            let part = scaled(&entry_nll_grad(&z, &g.ids, &g.weights.broadcast_mul(&g.mix)?)?, g.scale)?;
            grad = Some(match grad {
                None => part,
                Some(sum) => (sum + part)?,
            });
        }
    }
    let values = values.into_iter().map(|v| v.expect("every term is in a group")).collect::<Vec<_>>();
    let grad = match (with_grad, grad) {
        (true, None) => Some(logits.zeros_like()?),
        (_, grad) => grad,
    };
    Ok((Tensor::stack(&values, 0)?, grad))
}
