//! The model side of precompute (DESIGN.md step 2): batched, padded forward passes that
//! keep, per position, the top-k next-token log-probabilities, the cross-entropy on the
//! gold next token, and per document the mean CE (and, optionally, the probability mass
//! outside the top-k). The store that writes these to disk builds on it.

use std::path::Path;

use crate::checkpoint::Checkpoint;
use crate::error::{Error, Result};
use crate::model::{rowwise, LoadMode, Transformer};
use crate::store::{fill, DocTopK, Identity, Layout, Options, Progress, RunSummary, FORMAT};
use crate::tokenizer::Tokenizer;

/// Batching and what to keep.
#[derive(Clone, Copy, Debug)]
pub struct Settings {
    pub k: usize,
    /// Upper bound of padded tokens per forward pass (the logits of a batch take
    /// `batch_tokens * vocab * 4` bytes).
    pub batch_tokens: usize,
    pub residual: bool,
    /// The tokenizer's vocabulary, when the embedding has more rows (Qwen, Phi-3 and MPT
    /// pad it): ids at or beyond it are rows no text produces, never kept in the top-k.
    pub tokens: Option<usize>,
}

impl Default for Settings {
    fn default() -> Self {
        Self { k: 10, batch_tokens: 4096, residual: false, tokens: None }
    }
}

/// Precomputes the store of `checkpoint` on `device`, computing in `dtype`, over the split corpus `corpus` (this
/// worker's shards of it) into `out`.
pub fn precompute_model(
    checkpoint: &Checkpoint,
    (device, dtype): (&candle_core::Device, candle_core::DType),
    corpus: &Path,
    out: &Path,
    options: Options,
    worker: (usize, usize),
    progress: impl FnMut(Progress),
) -> Result<RunSummary> {
    let model_dir = checkpoint.dir.as_path();
    let model = checkpoint.load_model(LoadMode::Frozen, dtype, device)?;
    let texts = crate::split::read_texts(corpus)?;
    let layout = Layout {
        k: options.k,
        wide_ids: checkpoint.spec.vocab_size > 1 << 16,
        half: options.half,
        residual: options.residual,
    };
    let identity = Identity {
        format: FORMAT.into(),
        model: model_dir.display().to_string(),
        model_sha256: checkpoint.content_sha256()?,
        tokenizer_sha256: checkpoint.tokenizer_sha256.clone(),
        corpus: corpus.display().to_string(),
        corpus_sha256: crate::files::file_sha256(corpus)?,
        documents: texts.len(),
        docs_per_shard: options.docs_per_shard.max(1),
        layout,
    };
    let settings =
        Settings { k: options.k, batch_tokens: options.batch_tokens, residual: options.residual, ..Default::default() };
    precompute(out, &identity, &texts, (&model, &checkpoint.tokenizer), settings, worker, progress)
}

/// Fills this worker's shards of the store in `dir` with the top-k of `texts` under
/// `model` ([`fill`]).
pub fn precompute(
    dir: &Path,
    identity: &Identity,
    texts: &[String],
    (model, tokenizer): (&Transformer, &Tokenizer),
    settings: Settings,
    worker: (usize, usize),
    progress: impl FnMut(Progress),
) -> Result<RunSummary> {
    // The embedding's padded rows (beyond the tokenizer's ids) never enter the top-k.
    let settings = Settings { tokens: Some(tokenizer.vocab_size()), ..settings };
    let compute = |range: std::ops::Range<usize>| {
        let docs = texts[range].iter().map(|t| tokenizer.encode(t)).collect::<Result<Vec<_>>>()?;
        topk(model, &docs, settings)
    };
    fill(dir, identity, worker, compute, progress)
}

/// The top-k of every document, in the order given. Documents are batched by length
/// (longest first, so padding stays small) within the token budget.
pub fn topk(model: &Transformer, docs: &[Vec<u32>], settings: Settings) -> Result<Vec<DocTopK>> {
    let vocab = settings.tokens.map_or(model.spec().vocab_size, |t| t.min(model.spec().vocab_size));
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
        for (&i, result) in batch.iter().zip(forward_batch(model, docs, batch, settings)?) {
            out[i] = Some(result);
        }
        start += batch.len();
    }
    Ok(out.into_iter().map(|d| d.expect("every document was in a batch")).collect())
}

/// What one position keeps: the log-sum-exp of its logits, their top-k, and the logit of
/// the next token (none at a document's last position).
struct Position {
    lse: f32,
    top: Vec<(u32, f32)>,
    next: Option<f32>,
}

/// One padded forward pass over `batch`, its positions summarised on all cores.
fn forward_batch(model: &Transformer, docs: &[Vec<u32>], batch: &[usize], s: Settings) -> Result<Vec<DocTopK>> {
    let seqs: Vec<&[u32]> = batch.iter().map(|&i| docs[i].as_slice()).collect();
    let tokens = s.tokens.unwrap_or(usize::MAX);
    let positions = model.map_positions(&seqs, |b, p, z| Position {
        lse: rowwise::log_sum_exp(z, 1.0),
        top: top_k(&z[..tokens.min(z.len())], s.k),
        next: seqs[b].get(p + 1).map(|&id| z[id as usize]),
    })?;
    Ok(seqs.iter().zip(&positions).map(|(doc, positions)| summarise(doc, positions, s)).collect())
}

/// A document's top-k, CE and residual from its positions.
fn summarise(doc: &[u32], positions: &[Position], s: Settings) -> DocTopK {
    let (mut topk_ids, mut topk_logprobs) = (Vec::with_capacity(doc.len() * s.k), Vec::with_capacity(doc.len() * s.k));
    let mut residual = s.residual.then(|| Vec::with_capacity(doc.len()));
    for Position { lse, top, .. } in positions {
        topk_ids.extend(top.iter().map(|&(i, _)| i));
        topk_logprobs.extend(top.iter().map(|&(_, v)| v - lse));
        if let Some(r) = residual.as_mut() {
            let kept: f64 = top.iter().map(|&(_, v)| ((v - lse) as f64).exp()).sum();
            r.push((1.0 - kept).max(0.0) as f32);
        }
    }
    let ce: Vec<f32> = positions.iter().filter_map(|p| p.next.map(|next| p.lse - next)).collect();
    let mean_ce = (ce.iter().map(|&x| x as f64).sum::<f64>() / ce.len() as f64) as f32;
    DocTopK { ids: doc.to_vec(), topk_ids, topk_logprobs, ce, mean_ce, residual }
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
