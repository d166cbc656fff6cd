//! One shard of a distribution store: the top-k of a contiguous run of documents, ragged
//! (no padding), as safetensors. Ids are u16 when the vocabulary fits, log-probabilities
//! f16 or f32. The per-token CE is not stored where the gold next token is among the
//! kept entries (it is one of the stored log-probabilities); only the others are listed.

use super::tensors::{Reader, Writer};
use super::DocTopK;
use crate::error::{Context, Error, Result};

/// Storage types of a store.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Layout {
    pub k: usize,
    /// u16 ids (vocabularies up to 65536 tokens) or u32.
    pub wide_ids: bool,
    /// f16 log-probabilities (else f32).
    pub half: bool,
    pub residual: bool,
}

/// What a shard holds, decoded.
#[derive(Clone, Debug, PartialEq)]
pub struct Shard {
    /// Corpus index of each document.
    pub docs: Vec<u32>,
    /// Token offsets of the documents (`docs.len() + 1`).
    pub offsets: Vec<u32>,
    pub topk_ids: Vec<u32>,
    pub topk_logprobs: Vec<f32>,
    /// Positions (shard-wide) whose gold token is outside the top-k, and their CE.
    pub ce_missing_at: Vec<u32>,
    pub ce_missing: Vec<f32>,
    pub mean_ce: Vec<f32>,
    pub residual: Option<Vec<f32>>,
}

impl Shard {
    /// Collects documents' top-k (`docs[i]` being the corpus index of `tops[i]`).
    pub fn new(docs: &[u32], tops: &[DocTopK], layout: Layout) -> Self {
        let mut shard = Shard {
            docs: docs.to_vec(),
            offsets: vec![0],
            topk_ids: Vec::new(),
            topk_logprobs: Vec::new(),
            ce_missing_at: Vec::new(),
            ce_missing: Vec::new(),
            mean_ce: Vec::new(),
            residual: layout.residual.then(Vec::new),
        };
        for top in tops {
            let base = *shard.offsets.last().expect("starts at 0");
            for (t, &ce) in top.ce.iter().enumerate() {
                let row = &top.topk_ids[t * layout.k..(t + 1) * layout.k];
                if !row.contains(&top.ids[t + 1]) {
                    shard.ce_missing_at.push(base + t as u32);
                    shard.ce_missing.push(ce);
                }
            }
            shard.topk_ids.extend_from_slice(&top.topk_ids);
            shard.topk_logprobs.extend_from_slice(&top.topk_logprobs);
            shard.mean_ce.push(top.mean_ce);
            if let (Some(r), Some(mine)) = (shard.residual.as_mut(), top.residual.as_ref()) {
                r.extend_from_slice(mine);
            }
            shard.offsets.push(base + top.ids.len() as u32);
        }
        shard
    }

    /// The per-token CE of document `d` (its ids needed: where the gold token is among the
    /// kept entries, its log-probability is the CE).
    pub fn ce(&self, d: usize, ids: &[u32], k: usize) -> Result<Vec<f32>> {
        let (start, end) = (self.offsets[d] as usize, self.offsets[d + 1] as usize);
        if ids.len() != end - start {
            return Err(Error::msg(format!(
                "document {} has {} tokens in the store but {} given",
                self.docs[d],
                end - start,
                ids.len()
            )));
        }
        (0..ids.len().saturating_sub(1))
            .map(|t| {
                let p = start + t;
                match self.ce_missing_at.binary_search(&(p as u32)) {
                    Ok(i) => Ok(self.ce_missing[i]),
                    Err(_) => {
                        let row = p * k..(p + 1) * k;
                        let at = self.topk_ids[row.clone()].iter().position(|&id| id == ids[t + 1]).ok_or_else(|| {
                            Error::msg(format!("document {}: the gold token at {t} is neither kept nor listed; the store is corrupt", self.docs[d]))
                        })?;
                        Ok(-self.topk_logprobs[row.start + at])
                    }
                }
            })
            .collect()
    }

    /// The shard as safetensors bytes.
    pub fn encode(&self, layout: Layout) -> Result<Vec<u8>> {
        let tokens = *self.offsets.last().unwrap_or(&0) as usize;
        let w = Writer::default()
            .u32s("docs", vec![self.docs.len()], &self.docs)
            .u32s("offsets", vec![self.offsets.len()], &self.offsets)
            .u32s("ce_missing_at", vec![self.ce_missing_at.len()], &self.ce_missing_at)
            .floats("ce_missing", vec![self.ce_missing.len()], &self.ce_missing, layout.half)
            .floats("mean_ce", vec![self.mean_ce.len()], &self.mean_ce, false)
            .ids("topk_ids", vec![tokens, layout.k], &self.topk_ids, layout.wide_ids)
            .floats("topk_logprobs", vec![tokens, layout.k], &self.topk_logprobs, layout.half);
        let w = match &self.residual {
            Some(r) => w.floats("residual", vec![tokens], r, layout.half),
            None => w,
        };
        w.finish(super::FORMAT)
    }

    /// Decodes a shard written by [`Shard::encode`].
    pub fn decode(bytes: &[u8]) -> Result<Self> {
        let r = Reader::new(bytes, "shard")?;
        let shard = Shard {
            docs: r.u32s("docs")?,
            offsets: r.u32s("offsets")?,
            topk_ids: r.u32s("topk_ids")?,
            topk_logprobs: r.f32s("topk_logprobs")?,
            ce_missing_at: r.u32s("ce_missing_at")?,
            ce_missing: r.f32s("ce_missing")?,
            mean_ce: r.f32s("mean_ce")?,
            residual: if r.has("residual") { Some(r.f32s("residual")?) } else { None },
        };
        shard.check().context(|| "the shard is inconsistent".into())?;
        Ok(shard)
    }

    /// The lengths a reader indexes by, checked once: a corrupt shard is an error, never
    /// a panic.
    fn check(&self) -> std::result::Result<(), String> {
        let tokens = *self.offsets.last().ok_or("no offsets")? as usize;
        let k = self.topk_ids.len().checked_div(tokens).unwrap_or(0);
        let sorted =
            self.offsets.windows(2).all(|w| w[0] <= w[1]) && self.ce_missing_at.windows(2).all(|w| w[0] < w[1]);
        let consistent = self.offsets.len() == self.docs.len() + 1
            && self.offsets[0] == 0
            && self.topk_ids.len() == tokens * k
            && self.topk_logprobs.len() == self.topk_ids.len()
            && self.ce_missing_at.len() == self.ce_missing.len()
            && self.ce_missing_at.last().is_none_or(|&p| (p as usize) < tokens)
            && self.mean_ce.len() == self.docs.len()
            && self.residual.as_ref().is_none_or(|r| r.len() == tokens);
        match (sorted, consistent) {
            (true, true) => Ok(()),
            _ => Err(format!(
                "{} documents, {} offsets, {tokens} tokens, {} top-k entries",
                self.docs.len(),
                self.offsets.len(),
                self.topk_ids.len()
            )),
        }
    }
}
