//! Evaluation on held-out text: perplexity, and bits per byte, which does not depend on the
//! tokenizer, so that models with different vocabularies compare fairly.

use candle_core::Tensor;
use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::model::entry_nll::entry_nll;
use crate::model::Transformer;
use crate::tokenizer::Tokenizer;

/// The summed negative log-likelihood of a model over a set of texts.
#[derive(Clone, Copy, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Score {
    /// Tokens predicted.
    pub tokens: u64,
    /// UTF-8 bytes of the texts.
    pub bytes: u64,
    /// Total negative log-likelihood, in nats.
    pub nll: f64,
}

impl Score {
    pub fn perplexity(&self) -> f64 {
        (self.nll / self.tokens.max(1) as f64).exp()
    }

    pub fn bits_per_byte(&self) -> f64 {
        self.nll / std::f64::consts::LN_2 / self.bytes.max(1) as f64
    }
}

/// Scores `texts`: each tokenized as the model's pipeline does (BOS first where it has
/// one), cut into windows of at most `window` tokens that overlap by one, so that every
/// token after the first is predicted exactly once; windows go through the model in
/// batches of at most `batch_tokens` padded tokens.
pub fn score(
    model: &Transformer,
    tokenizer: &Tokenizer,
    texts: &[String],
    window: usize,
    batch_tokens: usize,
) -> Result<Score> {
    if window < 2 {
        return Err(Error::msg(format!("an evaluation window of {window} tokens predicts nothing; use at least 2")));
    }
    let window = window.min(model.spec().max_positions);
    let mut windows: Vec<Vec<u32>> = Vec::new();
    let mut total = Score::default();
    for text in texts {
        let ids = tokenizer.encode(text)?;
        total.bytes += text.len() as u64;
        let mut start = 0;
        while start + 1 < ids.len() {
            let end = (start + window).min(ids.len());
            windows.push(ids[start..end].to_vec());
            start = end - 1;
        }
    }
    windows.sort_by_key(|w| std::cmp::Reverse(w.len()));
    let mut i = 0;
    while i < windows.len() {
        let len = windows[i].len();
        let n = (batch_tokens / len).clamp(1, windows.len() - i);
        let (nll, tokens) = batch_nll(model, &windows[i..i + n], len)?;
        total.nll += nll;
        total.tokens += tokens;
        i += n;
    }
    Ok(total)
}

/// The summed NLL of the next tokens of `windows` (each at most `len` long, right-padded).
fn batch_nll(model: &Transformer, windows: &[Vec<u32>], len: usize) -> Result<(f64, u64)> {
    let cells = windows.len() * len;
    let (mut ids, mut keep, mut gold, mut weight) =
        (vec![0u32; cells], vec![0u32; cells], vec![0u32; cells], vec![0f32; cells]);
    for (row, w) in windows.iter().enumerate() {
        for (t, &id) in w.iter().enumerate() {
            ids[row * len + t] = id;
            keep[row * len + t] = 1;
            if t + 1 < w.len() {
                gold[row * len + t] = w[t + 1];
                weight[row * len + t] = 1.0;
            }
        }
    }
    let shape = (windows.len(), len);
    let device = model.device();
    let padded = keep.contains(&0);
    let keep = Tensor::from_vec(keep, shape, device)?;
    let logits = model.forward(&Tensor::from_vec(ids, shape, device)?, padded.then_some(&keep))?;
    let nll = entry_nll(&logits, &Tensor::from_vec(gold, (shape.0, shape.1, 1), device)?)?;
    let weight = Tensor::from_vec(weight.clone(), (shape.0, shape.1, 1), device)?;
    let sum = (nll * &weight)?.sum_all()?.to_scalar::<f32>()? as f64;
    let tokens = weight.sum_all()?.to_scalar::<f32>()? as u64;
    Ok((sum, tokens))
}
