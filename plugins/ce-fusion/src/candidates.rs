//! What min_ce and avg_ce share: which candidates take part, the CE each is ranked by,
//! and the row a candidate contributes at a position.

use fusellm_sdk::math::{exp, softmax_into};
use fusellm_sdk::{Candidate, FusionInput, Params};

fusellm_sdk::params! {
    /// The parameters both fusion functions take.
    pub struct PoolParams {
        /// rank candidates by their mean CE on the document (the paper's code) or by their CE
        /// on each token
        granularity: Granularity = Granularity::Document;
        /// token: CE in nats per token (the paper); byte: scaled by the candidate's tokens per
        /// byte of the document, so that tokenizers of different granularity compare fairly
        ce_norm: CeNorm = CeNorm::Token;
        /// whether the target's own distribution is a candidate (the paper: yes)
        include_target: bool = true;
        /// teacher temperature of the softmax over each candidate's kept top-k
        temperature: f64 = 1.0, min(1e-6);
        /// true: each candidate's kept entries scaled to sum to one (the paper); false: their
        /// probabilities under the model's full softmax, the rest left to the loss's tail
        /// bucket (`[train] tail = "bucket"`); needs temperature 1
        renormalize: bool = true;
    }
}

fusellm_sdk::choices! {
    /// What a candidate's CE is taken over.
    pub enum Granularity {
        Document = "document",
        Token = "token",
    }
}

fusellm_sdk::choices! {
    /// The unit CE is compared in.
    pub enum CeNorm {
        Token = "token",
        Byte = "byte",
    }
}

/// The candidates taking part in fusion, with the settings that apply to all positions.
pub struct Pool<'a> {
    pub members: Vec<Candidate<'a>>,
    /// Index in `members` of the target's own distribution, if it takes part.
    target: Option<usize>,
    per_token: bool,
    /// Per member: the factor from nats per token to the compared unit.
    scale: Vec<f64>,
    temperature: f64,
    renormalize: bool,
}

impl<'a> Pool<'a> {
    pub fn new(params: &Params, input: &FusionInput<'a>) -> Result<Self, String> {
        let p = PoolParams::read(params)?;
        if !p.renormalize && p.temperature != 1.0 {
            return Err(format!(
                "renormalize = false keeps each row's mass under its model's softmax, which is known at temperature 1 only (not {})",
                p.temperature
            ));
        }
        let include_target = p.include_target;
        let members: Vec<Candidate<'a>> =
            input.candidates.iter().copied().filter(|c| include_target || !c.is_target).collect();
        if members.is_empty() && input.positions() > 0 {
            return Err("no candidate distributions to fuse".into());
        }
        let per_byte = p.ce_norm == CeNorm::Byte;
        let scale = members.iter().map(|c| if per_byte { per_byte_factor(c, input.text_bytes) } else { 1.0 }).collect();
        Ok(Self {
            target: members.iter().position(|c| c.is_target),
            scale,
            per_token: p.granularity == Granularity::Token,
            temperature: p.temperature,
            renormalize: p.renormalize,
            members,
        })
    }

    /// The CE that ranks member `c` at position `p`; a NaN ranks last.
    pub fn ce(&self, c: usize, p: usize) -> f64 {
        let member = &self.members[c];
        let ce = if self.per_token { member.ce_token[p] } else { member.ce_doc } as f64;
        if ce.is_nan() {
            f64::INFINITY
        } else {
            ce * self.scale[c]
        }
    }

    /// The members by increasing CE at `p`; ties go to the target, then to the first.
    pub fn ranked(&self, p: usize) -> Vec<usize> {
        let mut order: Vec<usize> = (0..self.members.len()).collect();
        let tie = |c: usize| (!self.members[c].is_target, c);
        order.sort_by(|&a, &b| self.ce(a, p).total_cmp(&self.ce(b, p)).then(tie(a).cmp(&tie(b))));
        order
    }

    /// A kept row's probabilities: the softmax over its values at the teacher temperature,
    /// or (not renormalised) the values' own probabilities, which must then be
    /// log-probabilities under the model's full softmax.
    pub fn probs(&self, values: &[f32], out: &mut Vec<f64>) -> Result<(), String> {
        if self.renormalize {
            softmax_into(values, self.temperature, out);
            return Ok(());
        }
        out.clear();
        out.extend(values.iter().map(|&v| exp(f64::from(v))));
        let mass: f64 = out.iter().sum();
        if mass > 1.0 + 1e-3 {
            return Err(format!(
                "renormalize = false: a row's kept probabilities sum to {mass:.3}, more than 1, so its values are not \
                 log-probabilities under the full softmax (compat alignment keeps the paper's logits); renormalize instead"
            ));
        }
        Ok(())
    }

    /// The kept entries of member `c` at `p`. Where a source has none (alignment found no
    /// one-to-one match), the target's own row stands in, as in the paper's collator.
    pub fn row(&self, c: usize, p: usize) -> Option<(&'a [u32], &'a [f32])> {
        let own = self.members[c].dist.row(p);
        if !own.0.is_empty() {
            return Some(own);
        }
        let fallback = self.members[self.target?].dist.row(p);
        (!fallback.0.is_empty()).then_some(fallback)
    }
}

/// Nats per token to nats per byte: the candidate predicts `tokens - 1` tokens of a text of
/// `text_bytes` bytes, so its total CE over the text is `mean CE * (tokens - 1)`.
fn per_byte_factor(candidate: &Candidate<'_>, text_bytes: u32) -> f64 {
    candidate.tokens.saturating_sub(1) as f64 / text_bytes.max(1) as f64
}
