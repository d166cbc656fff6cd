//! Greedy decoding for smoke checks: argmax over the whole vocabulary, no EOS stop,
//! recomputing the full forward pass at each step (the training path has no KV cache).

use candle_core::Tensor;
use candle_transformers::generation::{LogitsProcessor, Sampling};

use super::Transformer;
use crate::error::{Error, Result};

/// `max_new` greedily chosen ids following `prompt`.
pub fn greedy(model: &Transformer, prompt: &[u32], max_new: usize) -> Result<Vec<u32>> {
    if prompt.is_empty() {
        return Err(Error::msg(
            "greedy decoding needs at least one prompt token (this model adds no BOS); give a prompt",
        ));
    }
    let limit = model.spec().max_positions;
    if prompt.len() + max_new > limit {
        return Err(Error::msg(format!(
            "{} prompt tokens and {max_new} new ones exceed the model's {limit} positions; ask for fewer",
            prompt.len()
        )));
    }
    let mut argmax = LogitsProcessor::from_sampling(0, Sampling::ArgMax);
    let mut ids = prompt.to_vec();
    for _ in 0..max_new {
        let input = Tensor::new(ids.as_slice(), model.device())?.unsqueeze(0)?;
        let logits = model.forward(&input, None)?;
        let last = logits.squeeze(0)?.get(ids.len() - 1)?;
        ids.push(argmax.sample(&last)?);
    }
    Ok(ids[prompt.len()..].to_vec())
}
