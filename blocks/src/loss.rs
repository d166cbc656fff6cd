//! The FuseLLM objective (DESIGN.md, step 6): `lambda * CLM + (1 - lambda) * fusion`, where
//! CLM is the mean cross-entropy on the gold next tokens and fusion the mean over positions
//! of `-sum_k p_k log q(id_k)` for the fused sparse target, gathered at the kept ids only:
//! never a dense `[b, t, V]` target.
//!
//! Positions are laid out like the logits: position `t` of a row predicts token `t + 1`, so
//! the last position of each row (and padding) carries weight 0.

use candle_core::{DType, Device, Tensor, D};

pub use super::divergence::{Divergence, Tail};
use super::entry_nll::entry_nll;
use super::head_loss::head_loss;
use super::ops::{self, Kernels};
use super::terms::{self, Term};
use crate::error::{Error, Result};

/// The targets of one batch, on the host; built by the data pipeline or by tests.
#[derive(Clone, Debug, PartialEq)]
pub struct LossBatch {
    pub batch: usize,
    pub len: usize,
    /// Input token ids `[batch, len]`.
    pub ids: Vec<u32>,
    /// 1 where the token is real, 0 for padding (`[batch, len]`); attention uses it.
    pub keep: Vec<u8>,
    /// Per position: 1 where `ids[t + 1]` is a real next token of the same document.
    pub clm_weight: Vec<f32>,
    /// Entries per position of the sparse target (rows shorter than `k` are padded with
    /// id 0 and probability 0; a position without a target has all zeros).
    pub k: usize,
    pub target_ids: Vec<u32>,
    pub target_probs: Vec<f32>,
    /// The positions the means are taken over when this batch is one rank's part of a
    /// global batch (data parallelism), so that the ranks' losses sum to the global one;
    /// `None`: this batch's own ([`LossBatch::counts`]).
    pub over: Option<Counts>,
    /// Seeds the LoRA adapters' dropout masks (training draws one per micro-batch);
    /// `None`: no dropout.
    pub dropout_seed: Option<u64>,
}

/// The positions a batch's means are taken over: those with a CLM target, and those with a
/// fused target.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct Counts {
    pub clm: f64,
    pub fused: f64,
}

impl LossBatch {
    /// `batch` sequences of equal length laid end to end in `ids`, every token real, with
    /// CLM targets only.
    pub fn sequences(ids: Vec<u32>, batch: usize) -> Result<Self> {
        let len = ids.len().checked_div(batch).unwrap_or(0);
        if len < 2 || len * batch != ids.len() {
            return Err(Error::msg(format!(
                "{} ids do not form {batch} sequences of at least 2 tokens; a sequence of one token has no next token to predict",
                ids.len()
            )));
        }
        let clm_weight = (0..ids.len()).map(|i| if i % len == len - 1 { 0.0 } else { 1.0 }).collect();
        let keep = vec![1; ids.len()];
        let (target_ids, target_probs) = (Vec::new(), Vec::new());
        Ok(Self { batch, len, ids, keep, clm_weight, k: 0, target_ids, target_probs, over: None, dropout_seed: None })
    }

    /// Adds a sparse target of `k` entries per position (`[batch, len, k]`).
    pub fn with_target(mut self, ids: Vec<u32>, probs: Vec<f32>, k: usize) -> Result<Self> {
        let n = self.batch * self.len * k;
        if ids.len() != n || probs.len() != n {
            return Err(Error::msg(format!(
                "a target of {} ids and {} probabilities for {} x {} positions x {k} entries",
                ids.len(),
                probs.len(),
                self.batch,
                self.len
            )));
        }
        (self.k, self.target_ids, self.target_probs) = (k, ids, probs);
        Ok(self)
    }

    /// The gold next token of each position (0 where there is none).
    fn gold(&self) -> Vec<u32> {
        let mut gold = vec![0; self.ids.len()];
        for (g, w) in gold.chunks_mut(self.len).zip(self.ids.chunks(self.len)) {
            g[..self.len - 1].copy_from_slice(&w[1..]);
        }
        gold
    }

    /// This batch's own counts.
    pub fn counts(&self) -> Counts {
        let clm = self.clm_weight.iter().sum::<f32>() as f64;
        Counts { clm, fused: self.target_positions() as f64 }
    }

    /// The positions the fusion part's mean is taken over.
    fn fused_over(&self) -> f64 {
        self.over.map_or(self.target_positions() as f64, |over| over.fused)
    }

    /// Positions that have a fused target.
    fn target_positions(&self) -> usize {
        self.target_probs.chunks(self.k.max(1)).filter(|row| row.iter().any(|&p| p > 0.0)).count()
    }

    /// `sum_k p log p` over all positions: KL = CE + this, per position.
    fn target_neg_entropy(&self) -> f64 {
        self.target_probs.iter().filter(|&&p| p > 0.0).map(|&p| p as f64 * (p as f64).ln()).sum()
    }

    /// Refuses a `[batch, len, ..]` tensor of other leading dimensions than the batch's.
    fn check_rows(&self, what: &str, t: &Tensor) -> Result<()> {
        let (b, len, _) = t.dims3()?;
        if b != self.batch || len != self.len {
            return Err(Error::msg(format!(
                "{what} {:?} do not match a batch of {} x {}",
                t.dims(),
                self.batch,
                self.len
            )));
        }
        Ok(())
    }

    pub fn tokens(&self) -> usize {
        self.keep.iter().filter(|&&k| k == 1).count()
    }

    pub fn ids_tensor(&self, device: &Device) -> Result<Tensor> {
        Ok(Tensor::from_slice(&self.ids, (self.batch, self.len), device)?)
    }

    /// The attention keep-mask, or None when nothing is padded.
    pub fn keep_tensor(&self, device: &Device) -> Result<Option<Tensor>> {
        if self.keep.iter().all(|&k| k == 1) {
            return Ok(None);
        }
        let keep: Vec<u32> = self.keep.iter().map(|&k| k as u32).collect();
        Ok(Some(Tensor::from_vec(keep, (self.batch, self.len), device)?))
    }
}

/// The objective's settings.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Objective {
    /// Weight of the CLM part (the paper: 0.9).
    pub lambda: f64,
    pub divergence: Divergence,
    /// Student temperature of the fusion part: `q = softmax(logits / T)`, the part scaled
    /// by `T^2` as in distillation.
    pub temperature: f64,
    /// Where the fused target's mass outside its kept ids goes.
    pub tail: Tail,
}

impl Default for Objective {
    fn default() -> Self {
        Self { lambda: 0.9, divergence: Divergence::Ce, temperature: 1.0, tail: Tail::Renormalize }
    }
}

/// The logits a loss is taken of: materialised, or the final hidden states `[n, d]` and the
/// head `[V, d]` (soft-capped when `softcap` is given).
enum Logits<'a> {
    Full(&'a Tensor),
    Head { hidden: &'a Tensor, head: &'a Tensor, softcap: Option<f64> },
}

/// Logits of the head held at once by [`Logits::log_probs_at`]: a chunk of rows at a time.
const CHUNK_ELEMENTS: usize = 16 << 20;

impl Logits<'_> {
    /// `log softmax(scale * z)` at `k` ids per row (`[n * k]`), without gradient: what a
    /// divergence other than the cross-entropy weighs the kept ids by.
    fn log_probs_at(&self, kernels: Kernels, ids: &[u32], k: usize, scale: f32) -> Result<Vec<f32>> {
        let of = |z: Tensor, start: usize, rows: usize| -> Result<Vec<f32>> {
            let z = if scale == 1.0 { z } else { (z * f64::from(scale))? };
            let ids = Tensor::from_slice(&ids[start * k..(start + rows) * k], (rows, k), z.device())?;
            Ok(entry_nll(kernels, &z, &ids)?.flatten_all()?.to_vec1::<f32>()?.into_iter().map(|x| -x).collect())
        };
        match *self {
            Logits::Full(logits) => {
                let z = logits.flatten_to(1)?.detach();
                let n = z.dim(0)?;
                of(z, 0, n)
            }
            Logits::Head { hidden, head, softcap } => {
                let (x, w) = (hidden.flatten_to(1)?.detach(), head.detach());
                let (n, v) = (x.dim(0)?, w.dim(0)?);
                let chunk = (CHUNK_ELEMENTS / v.max(1)).clamp(1, n.max(1));
                let mut out = Vec::with_capacity(n * k);
                for start in (0..n).step_by(chunk) {
                    let rows = chunk.min(n - start);
                    let z = kernels.linear(&x.narrow(0, start, rows)?, &w, None)?.to_dtype(DType::F32)?;
                    let z = match softcap {
                        Some(cap) => ops::soft_cap(&z, cap)?,
                        None => z,
                    };
                    out.extend(of(z, start, rows)?);
                }
                Ok(out)
            }
        }
    }
}

/// The loss and its two parts (means over their positions).
pub struct Losses {
    pub total: Tensor,
    pub clm: Tensor,
    pub fusion: Tensor,
}

impl Objective {
    /// The losses for `logits` `[batch, len, V]` of `batch`.
    pub fn losses(&self, logits: &Tensor, batch: &LossBatch, kernels: Kernels) -> Result<Losses> {
        batch.check_rows("logits", logits)?;
        let (terms, constant) = self.terms(batch, logits.dim(D::Minus1)?, kernels, Logits::Full(logits))?;
        self.combine(&terms::values(kernels, &logits.flatten_to(1)?, &terms)?, constant)
    }

    /// The losses for the final hidden states `[batch, len, d]` under the head `[V, d]`
    /// (`logits = hidden @ head^T`, in f32, soft-capped as `c * tanh(z / c)` when `softcap`
    /// is given). Where the fused kernels run (CPU, CUDA), the head and the loss are one op
    /// that never holds the `[batch * len, V]` logits (`head_loss`); elsewhere the logits
    /// are computed and [`Objective::losses`] applies.
    pub fn losses_at_head(
        &self,
        kernels: Kernels,
        hidden: &Tensor,
        head: &Tensor,
        softcap: Option<f64>,
        batch: &LossBatch,
    ) -> Result<Losses> {
        if !kernels.on(hidden.device(), ops::Reach::Cuda) {
            let logits = kernels.linear(hidden, head, None)?.to_dtype(DType::F32)?;
            let logits = match softcap {
                Some(cap) => ops::soft_cap(&logits, cap)?,
                None => logits,
            };
            return self.losses(&logits, batch, kernels);
        }
        batch.check_rows("hidden states", hidden)?;
        let logits = Logits::Head { hidden, head, softcap };
        let (terms, constant) = self.terms(batch, head.dim(0)?, kernels, logits)?;
        let rows = hidden.flatten_to(1)?;
        self.combine(&head_loss(kernels, &rows, head, &terms, softcap.map(|c| c as f32))?, constant)
    }

    /// The objective as terms over the logits ([`Term`]): CLM, and fusion when the batch has
    /// a target; with the constant that turns the fusion term's value into the divergence's.
    /// Every id is checked against `vocab` here, on the host, so that no kernel reads
    /// outside a row of logits.
    fn terms(&self, batch: &LossBatch, vocab: usize, kernels: Kernels, logits: Logits) -> Result<(Vec<Term>, f64)> {
        let outside = |ids: &[u32]| ids.iter().copied().find(|&i| i as usize >= vocab);
        if let Some(id) = outside(&batch.ids) {
            return Err(Error::msg(format!("token id {id} is outside the model's vocabulary of {vocab}")));
        }
        if let Some(id) = outside(&batch.target_ids) {
            return Err(Error::msg(format!(
                "fused target id {id} is outside the model's vocabulary of {vocab}; was the store made for another target tokenizer?"
            )));
        }
        self.divergence.check(self.tail).map_err(Error::msg)?;
        if self.tail == Tail::Renormalize {
            check_normalised(batch)?;
        }
        let (mut terms, constant) = self.sparse_terms(batch);
        match terms.get_mut(1) {
            Some(fusion) if !self.divergence.is_cross_entropy(self.tail) => {
                let log_q = logits.log_probs_at(kernels, &fusion.ids, fusion.k, fusion.scale)?;
                let constant = self.divergence_weights(batch, fusion, &log_q);
                Ok((terms, constant))
            }
            _ => Ok((terms, constant)),
        }
    }

    /// Turns the fusion term's weights into the divergence's, `-dD / dlog q` at each kept
    /// id per position (times each position's share, `T^2` over the positions), and returns
    /// the constant that makes the term's value, `sum w * nll`, the divergence's.
    fn divergence_weights(&self, batch: &LossBatch, fusion: &mut Term, log_q: &[f32]) -> f64 {
        let k = fusion.k;
        let share = self.temperature * self.temperature / batch.fused_over();
        let mut grad = vec![0f64; k];
        let (mut value, mut weighted_nll) = (0f64, 0f64);
        for (r, probs) in batch.target_probs.chunks(k).enumerate() {
            let row = &log_q[r * k..(r + 1) * k];
            value += share * self.divergence.row(self.tail, probs, row, &mut grad);
            for ((weight, g), &lq) in fusion.weights[r * k..(r + 1) * k].iter_mut().zip(&grad).zip(row) {
                *weight = (-g * share) as f32;
                weighted_nll -= f64::from(*weight) * f64::from(lq);
            }
        }
        value - weighted_nll
    }

    fn sparse_terms(&self, batch: &LossBatch) -> (Vec<Term>, f64) {
        let clm_positions: f32 = match batch.over {
            Some(over) => over.clm as f32,
            None => batch.clm_weight.iter().sum(),
        };
        let clm = Term {
            scale: 1.0,
            k: 1,
            ids: batch.gold(),
            weights: batch.clm_weight.iter().map(|w| w / clm_positions.max(1.0)).collect(),
            mix: self.lambda as f32,
        };
        let own = batch.target_positions();
        if batch.k == 0 || own == 0 {
            return (vec![clm], 0.0);
        }
        let fused_positions = batch.fused_over();
        let t2 = self.temperature * self.temperature;
        let per_position = (t2 / fused_positions) as f32;
        let fusion = Term {
            scale: (1.0 / self.temperature) as f32,
            k: batch.k,
            ids: batch.target_ids.clone(),
            weights: batch.target_probs.iter().map(|p| p * per_position).collect(),
            mix: (1.0 - self.lambda) as f32,
        };
        let kl_constant = match self.divergence {
            Divergence::Kl => batch.target_neg_entropy() * t2 / fused_positions,
            _ => 0.0,
        };
        (vec![clm, fusion], kl_constant)
    }

    /// The losses from the terms' values `[terms]`: the total is `sum_t mix_t * value_t`,
    /// the one combination [`head_loss`] can differentiate.
    fn combine(&self, values: &Tensor, constant: f64) -> Result<Losses> {
        let clm = values.get(0)?;
        let fusion = match values.dim(0)? {
            1 => Tensor::zeros((), DType::F32, values.device())?,
            _ => (values.get(1)? + constant)?,
        };
        let total = ((&clm * self.lambda)? + (&fusion * (1.0 - self.lambda))?)?;
        Ok(Losses { total, clm, fusion })
    }
}

/// Refuses a target whose rows leave mass outside their kept ids (a fusion with
/// `renormalize = false`) where the loss takes them as renormalised.
fn check_normalised(batch: &LossBatch) -> Result<()> {
    let k = batch.k.max(1);
    let short = batch
        .target_probs
        .chunks(k)
        .map(|row| row.iter().sum::<f32>())
        .enumerate()
        .find(|(_, s)| *s > 0.0 && *s < 1.0 - 1e-3);
    match short {
        Some((position, sum)) => Err(Error::msg(format!(
            "the fused target at position {position} keeps {sum:.3} of its mass (the fusion ran with renormalize = false), but the loss takes targets as renormalised: train with tail = \"bucket\", or fuse with renormalize = true"
        ))),
        None => Ok(()),
    }
}

/// The mean CLM loss of plain sequences: `ids` `[batch, len]`, every token real.
pub fn clm_loss(logits: &Tensor, ids: &Tensor) -> Result<Tensor> {
    let (batch, _) = ids.dims2()?;
    let batch = LossBatch::sequences(ids.flatten_all()?.to_vec1()?, batch)?;
    Ok(Objective { lambda: 1.0, ..Default::default() }.losses(logits, &batch, Kernels::default())?.clm)
}
