//! A shard of a fused store (`fusellm fuse`): per document the target's token ids and, per
//! position, the fused sparse target (ids and probabilities) for predicting the next token;
//! a document's last position has none. What the training loop reads.

use super::tensors::{Reader, Writer};
use crate::error::{Error, Result};
use fusellm_sdk::SparseRowsBuf;

#[derive(Clone, Debug, Default, PartialEq)]
pub struct FusedShard {
    pub docs: Vec<u32>,
    /// Token offsets of the documents (`docs.len() + 1`).
    pub offsets: Vec<u32>,
    /// The target's token ids of every document, end to end.
    pub tokens: Vec<u32>,
    /// One row per token position; probabilities kept in f32 so that rows sum to one.
    pub rows: SparseRowsBuf,
}

impl FusedShard {
    /// Document `d`: its token ids and its rows (offsets rebased to 0).
    pub fn document(&self, d: usize) -> (&[u32], SparseRowsBuf) {
        let (start, end) = (self.offsets[d] as usize, self.offsets[d + 1] as usize);
        let (lo, hi) = (self.rows.offsets[start] as usize, self.rows.offsets[end] as usize);
        let rows = SparseRowsBuf {
            offsets: self.rows.offsets[start..=end].iter().map(|o| o - lo as u32).collect(),
            ids: self.rows.ids[lo..hi].to_vec(),
            values: self.rows.values[lo..hi].to_vec(),
        };
        (&self.tokens[start..end], rows)
    }

    /// Appends a document.
    pub fn push(&mut self, doc: u32, tokens: &[u32], rows: &SparseRowsBuf) {
        if self.offsets.is_empty() {
            self.offsets.push(0);
            self.rows = SparseRowsBuf::with_capacity(0, 0);
        }
        self.docs.push(doc);
        self.tokens.extend_from_slice(tokens);
        self.offsets.push(self.tokens.len() as u32);
        let base = *self.rows.offsets.last().expect("starts at 0");
        self.rows.offsets.extend(rows.offsets[1..].iter().map(|o| o + base));
        self.rows.ids.extend_from_slice(&rows.ids);
        self.rows.values.extend_from_slice(&rows.values);
    }

    pub fn encode(&self, wide_ids: bool) -> Result<Vec<u8>> {
        Writer::default()
            .u32s("docs", vec![self.docs.len()], &self.docs)
            .u32s("offsets", vec![self.offsets.len()], &self.offsets)
            .ids("tokens", vec![self.tokens.len()], &self.tokens, wide_ids)
            .u32s("row_offsets", vec![self.rows.offsets.len()], &self.rows.offsets)
            .ids("ids", vec![self.rows.ids.len()], &self.rows.ids, wide_ids)
            .floats("probs", vec![self.rows.values.len()], &self.rows.values, false)
            .finish(super::FUSED_FORMAT)
    }

    pub fn decode(bytes: &[u8]) -> Result<Self> {
        let r = Reader::new(bytes, "fused shard")?;
        let shard = Self {
            docs: r.u32s("docs")?,
            offsets: r.u32s("offsets")?,
            tokens: r.u32s("tokens")?,
            rows: SparseRowsBuf { offsets: r.u32s("row_offsets")?, ids: r.u32s("ids")?, values: r.f32s("probs")? },
        };
        let consistent = shard.offsets.len() == shard.docs.len() + 1
            && shard.offsets.first() == Some(&0)
            && shard.offsets.windows(2).all(|w| w[0] <= w[1])
            && *shard.offsets.last().unwrap_or(&0) as usize == shard.tokens.len()
            && shard.rows.rows().check_shape(shard.tokens.len(), "rows").is_ok();
        if !consistent {
            return Err(Error::msg(format!(
                "the fused shard is inconsistent: {} documents, {} offsets, {} tokens",
                shard.docs.len(),
                shard.offsets.len(),
                shard.tokens.len()
            )));
        }
        Ok(shard)
    }
}
