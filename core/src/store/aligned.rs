//! A shard of an aligned store: one source's distributions projected onto the target's
//! positions (DESIGN.md step 4), ragged per position, with the source's CE at each target
//! position (NaN where nothing aligns), per document, and its token count per document
//! (for CE per byte).

use super::tensors::{Reader, Writer};
use crate::error::{Error, Result};
use fusellm_sdk::SparseRowsBuf;

#[derive(Clone, Debug, PartialEq)]
pub struct AlignedShard {
    pub docs: Vec<u32>,
    /// Target-position offsets of the documents (`docs.len() + 1`).
    pub offsets: Vec<u32>,
    /// One row per target position: target ids and values (log-probs, or the paper's
    /// logits under compat).
    pub rows: SparseRowsBuf,
    pub ce_token: Vec<f32>,
    pub mean_ce: Vec<f32>,
    /// Length of the source's own tokenization of each document.
    pub source_tokens: Vec<u32>,
}

impl AlignedShard {
    pub fn encode(&self, wide_ids: bool, half: bool) -> Result<Vec<u8>> {
        Writer::default()
            .u32s("docs", vec![self.docs.len()], &self.docs)
            .u32s("offsets", vec![self.offsets.len()], &self.offsets)
            .u32s("row_offsets", vec![self.rows.offsets.len()], &self.rows.offsets)
            .ids("ids", vec![self.rows.ids.len()], &self.rows.ids, wide_ids)
            .floats("values", vec![self.rows.values.len()], &self.rows.values, half)
            .floats("ce_token", vec![self.ce_token.len()], &self.ce_token, half)
            .floats("mean_ce", vec![self.mean_ce.len()], &self.mean_ce, false)
            .u32s("source_tokens", vec![self.source_tokens.len()], &self.source_tokens)
            .finish(super::ALIGNED_FORMAT)
    }

    pub fn decode(bytes: &[u8]) -> Result<Self> {
        let r = Reader::new(bytes, "aligned shard")?;
        let shard = Self {
            docs: r.u32s("docs")?,
            offsets: r.u32s("offsets")?,
            rows: SparseRowsBuf { offsets: r.u32s("row_offsets")?, ids: r.u32s("ids")?, values: r.f32s("values")? },
            ce_token: r.f32s("ce_token")?,
            mean_ce: r.f32s("mean_ce")?,
            source_tokens: r.u32s("source_tokens")?,
        };
        let positions = *shard.offsets.last().unwrap_or(&0) as usize;
        let docs = shard.docs.len();
        let consistent = shard.offsets.len() == docs + 1
            && shard.mean_ce.len() == docs
            && shard.source_tokens.len() == docs
            && shard.ce_token.len() == positions
            && shard.rows.rows().check_shape(positions, "rows").is_ok();
        if !consistent {
            return Err(Error::msg(format!(
                "the aligned shard is inconsistent: {docs} documents, {} offsets, {positions} positions",
                shard.offsets.len()
            )));
        }
        Ok(shard)
    }
}
