//! The two parts of the FuseLLM objective (DESIGN.md, step 6), both as means over the
//! predicted positions: the causal LM loss on the gold next tokens and the fusion loss
//! `-sum_k p_k log q(id_k)`, gathered from the target's log-softmax at the kept ids only.

use candle_core::{Tensor, D};

use super::ops::log_softmax;
use crate::error::Result;

/// Log-probabilities `[b, t - 1, V]` of the predictions for positions 1..t.
pub fn next_token_logprobs(logits: &Tensor) -> Result<Tensor> {
    let t = logits.dim(1)?;
    if t < 2 {
        return Err(crate::error::Error::msg(format!(
            "a sequence of {t} token(s) has no next token to predict; the losses need at least 2"
        )));
    }
    Ok(log_softmax(&logits.narrow(1, 0, t - 1)?)?)
}

/// Mean cross-entropy `-log q(ids[t + 1])` over all `b * (t - 1)` predicted positions.
pub fn clm_loss(logprobs: &Tensor, ids: &Tensor) -> Result<Tensor> {
    let t = ids.dim(1)?;
    let gold = ids.narrow(1, 1, t - 1)?.unsqueeze(D::Minus1)?.contiguous()?;
    Ok(logprobs.gather(&gold, D::Minus1)?.neg()?.mean_all()?)
}

/// Mean fusion loss over positions for a sparse target: `ids`, `probs` `[b, t - 1, k]`.
pub fn fusion_loss(logprobs: &Tensor, ids: &Tensor, probs: &Tensor) -> Result<Tensor> {
    let gathered = logprobs.gather(&ids.contiguous()?, D::Minus1)?;
    let per_position = (gathered * probs.to_dtype(logprobs.dtype())?)?.sum(D::Minus1)?.neg()?;
    Ok(per_position.mean_all()?)
}
