//! The model side of precompute (DESIGN.md step 2): batched, padded forward passes that
//! keep, per position, the top-k next-token log-probabilities, the cross-entropy on the
//! gold next token, and per document the mean CE (and, optionally, the probability mass
//! outside the top-k). The store that writes these to disk builds on it.

use candle_core::Tensor;

use crate::error::{Error, Result};
use crate::model::Transformer;

/// What precompute keeps of one document.
#[derive(Clone, Debug, PartialEq)]
pub struct DocTopK {
    /// The document's token ids (BOS included where the model adds one).
    pub ids: Vec<u32>,
    /// `k` ids per position, by decreasing probability (`ids.len() * k`).
    pub topk_ids: Vec<u32>,
    /// Their natural-log probabilities under the full softmax.
    pub topk_logprobs: Vec<f32>,
    /// `-log p(ids[t + 1])` for `t < ids.len() - 1`.
    pub ce: Vec<f32>,
    /// The mean of `ce` (NaN for a one-token document).
    pub mean_ce: f32,
    /// Per position, the probability mass outside the top-k (when asked for).
    pub residual: Option<Vec<f32>>,
}

/// Batching and what to keep.
#[derive(Clone, Copy, Debug)]
pub struct Settings {
    pub k: usize,
    /// Upper bound of padded tokens per forward pass (the logits of a batch take
    /// `batch_tokens * vocab * 4` bytes).
    pub batch_tokens: usize,
    pub residual: bool,
}

impl Default for Settings {
    fn default() -> Self {
        Self { k: 10, batch_tokens: 4096, residual: false }
    }
}

/// The top-k of every document, in the order given. Documents are batched by length
/// (longest first, so padding stays small) within the token budget.
pub fn topk(model: &Transformer, docs: &[Vec<u32>], settings: Settings) -> Result<Vec<DocTopK>> {
    let vocab = model.spec().vocab_size;
    if settings.k == 0 || settings.k > vocab {
        return Err(Error::msg(format!("k = {} must be between 1 and the vocabulary size {vocab}", settings.k)));
    }
    if let Some(i) = docs.iter().position(|d| d.is_empty()) {
        return Err(Error::msg(format!("document {i} has no tokens")));
    }
    let mut order: Vec<usize> = (0..docs.len()).collect();
    order.sort_by_key(|&i| std::cmp::Reverse(docs[i].len()));
    let mut out: Vec<Option<DocTopK>> = vec![None; docs.len()];
    let mut start = 0;
    while start < order.len() {
        let t = docs[order[start]].len();
        let per_batch = (settings.batch_tokens / t).max(1);
        let batch = &order[start..(start + per_batch).min(order.len())];
        for (&i, result) in batch.iter().zip(forward_batch(model, docs, batch, t, settings)?) {
            out[i] = Some(result);
        }
        start += batch.len();
    }
    Ok(out.into_iter().map(|d| d.expect("every document was in a batch")).collect())
}

/// One padded forward pass over `batch` (documents of at most `t` tokens).
fn forward_batch(
    model: &Transformer,
    docs: &[Vec<u32>],
    batch: &[usize],
    t: usize,
    s: Settings,
) -> Result<Vec<DocTopK>> {
    let device = model.device();
    let mut ids = Vec::with_capacity(batch.len() * t);
    let mut keep = Vec::with_capacity(batch.len() * t);
    for &i in batch {
        let doc = &docs[i];
        ids.extend(doc.iter().copied().chain(std::iter::repeat_n(0, t - doc.len())));
        keep.extend((0..t).map(|p| u8::from(p < doc.len())));
    }
    let ids = Tensor::from_vec(ids, (batch.len(), t), device)?;
    let keep = Tensor::from_vec(keep, (batch.len(), t), device)?;
    let logits = model.forward(&ids, Some(&keep))?;
    batch
        .iter()
        .enumerate()
        .map(|(row, &i)| {
            let doc = &docs[i];
            let logits: Vec<f32> = logits.get(row)?.narrow(0, 0, doc.len())?.flatten_all()?.to_vec1()?;
            Ok(summarise(doc, &logits, model.spec().vocab_size, s))
        })
        .collect()
}

/// Top-k, CE and residual of one document from its logits (`[t, V]`, flat): per row one
/// pass for the log-sum-exp and one for the top-k, never a full log-softmax.
fn summarise(doc: &[u32], logits: &[f32], vocab: usize, s: Settings) -> DocTopK {
    let (mut topk_ids, mut topk_logprobs) = (Vec::with_capacity(doc.len() * s.k), Vec::with_capacity(doc.len() * s.k));
    let mut residual = s.residual.then(|| Vec::with_capacity(doc.len()));
    let mut lse = Vec::with_capacity(doc.len());
    for row in logits.chunks_exact(vocab) {
        let z = log_sum_exp(row);
        lse.push(z);
        let top = top_k(row, s.k);
        topk_ids.extend(top.iter().map(|&(i, _)| i));
        topk_logprobs.extend(top.iter().map(|&(_, v)| v - z));
        if let Some(r) = residual.as_mut() {
            let kept: f64 = top.iter().map(|&(_, v)| ((v - z) as f64).exp()).sum();
            r.push((1.0 - kept).max(0.0) as f32);
        }
    }
    let ce: Vec<f32> = (0..doc.len() - 1).map(|p| lse[p] - logits[p * vocab + doc[p + 1] as usize]).collect();
    let mean_ce = (ce.iter().map(|&x| x as f64).sum::<f64>() / ce.len() as f64) as f32;
    DocTopK { ids: doc.to_vec(), topk_ids, topk_logprobs, ce, mean_ce, residual }
}

/// `log(sum(exp(row)))`, shifted by the maximum for stability, summed in f64.
fn log_sum_exp(row: &[f32]) -> f32 {
    let max = row.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let sum: f64 = row.iter().map(|&x| ((x - max) as f64).exp()).sum();
    max + sum.ln() as f32
}

/// The `k` largest entries of a row with their indices, largest first (ties: lower index
/// first). One pass keeping a sorted list of k; most entries fail the first comparison.
fn top_k(row: &[f32], k: usize) -> Vec<(u32, f32)> {
    let mut top: Vec<(u32, f32)> = Vec::with_capacity(k + 1);
    for (i, &v) in row.iter().enumerate() {
        if top.len() == k && v <= top[k - 1].1 {
            continue;
        }
        let at = top.partition_point(|&(_, t)| t >= v);
        top.insert(at, (i as u32, v));
        top.truncate(k);
    }
    top
}
