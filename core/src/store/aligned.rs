//! A shard of an aligned store: one source's distributions projected onto the target's
//! positions (DESIGN.md step 4), ragged per position, with the source's CE at each target
//! position (NaN where nothing aligns) and per document.

use std::collections::HashMap;

use safetensors::tensor::{Dtype, SafeTensors, TensorView};

use super::shard::{f32s, floats, st_error, u32s};
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
}

impl AlignedShard {
    pub fn encode(&self, wide_ids: bool, half: bool) -> Result<Vec<u8>> {
        let (id_dtype, ids) = if wide_ids {
            (Dtype::U32, u32s(&self.rows.ids))
        } else {
            (Dtype::U16, self.rows.ids.iter().flat_map(|&i| (i as u16).to_le_bytes()).collect())
        };
        let (value_dtype, values) = floats(&self.rows.values, half);
        let (ce_dtype, ce) = floats(&self.ce_token, half);
        let tensors: Vec<(&str, Dtype, usize, Vec<u8>)> = vec![
            ("docs", Dtype::U32, self.docs.len(), u32s(&self.docs)),
            ("offsets", Dtype::U32, self.offsets.len(), u32s(&self.offsets)),
            ("row_offsets", Dtype::U32, self.rows.offsets.len(), u32s(&self.rows.offsets)),
            ("ids", id_dtype, self.rows.ids.len(), ids),
            ("values", value_dtype, self.rows.values.len(), values),
            ("ce_token", ce_dtype, self.ce_token.len(), ce),
            ("mean_ce", Dtype::F32, self.mean_ce.len(), f32s(&self.mean_ce)),
        ];
        let views = tensors
            .iter()
            .map(|(name, dtype, n, bytes)| Ok((*name, TensorView::new(*dtype, vec![*n], bytes).map_err(st_error)?)))
            .collect::<Result<Vec<_>>>()?;
        let meta = HashMap::from([("format".to_string(), super::ALIGNED_FORMAT.to_string())]);
        safetensors::serialize(views, Some(meta)).map_err(st_error)
    }

    pub fn decode(bytes: &[u8]) -> Result<Self> {
        let st = SafeTensors::deserialize(bytes).map_err(st_error)?;
        let get =
            |name: &str| st.tensor(name).map_err(|_| Error::msg(format!("the aligned shard has no `{name}` tensor")));
        let u32v = |v: TensorView<'_>| -> Vec<u32> {
            match v.dtype() {
                Dtype::U16 => {
                    v.data().chunks_exact(2).map(|c| u16::from_le_bytes(c.try_into().unwrap()) as u32).collect()
                }
                _ => v.data().chunks_exact(4).map(|c| u32::from_le_bytes(c.try_into().unwrap())).collect(),
            }
        };
        let f32v = |v: TensorView<'_>| -> Vec<f32> {
            match v.dtype() {
                Dtype::F16 => {
                    v.data().chunks_exact(2).map(|c| half::f16::from_le_bytes(c.try_into().unwrap()).to_f32()).collect()
                }
                _ => v.data().chunks_exact(4).map(|c| f32::from_le_bytes(c.try_into().unwrap())).collect(),
            }
        };
        Ok(Self {
            docs: u32v(get("docs")?),
            offsets: u32v(get("offsets")?),
            rows: SparseRowsBuf {
                offsets: u32v(get("row_offsets")?),
                ids: u32v(get("ids")?),
                values: f32v(get("values")?),
            },
            ce_token: f32v(get("ce_token")?),
            mean_ce: f32v(get("mean_ce")?),
        })
    }
}
