//! The safetensors plumbing the store's three shard kinds share: ids as u16 or u32, floats
//! as f16 or f32, 1-D or 2-D tensors, a format tag in the metadata, and decoding that
//! widens every id to u32 and every float to f32.

use std::collections::HashMap;

use half::f16;
use safetensors::tensor::{Dtype, SafeTensors, TensorView};

use crate::error::{Error, Result};

/// Tensors to serialise, in order.
#[derive(Default)]
pub struct Writer {
    tensors: Vec<(&'static str, Dtype, Vec<usize>, Vec<u8>)>,
}

impl Writer {
    pub fn u32s(mut self, name: &'static str, shape: Vec<usize>, v: &[u32]) -> Self {
        self.tensors.push((name, Dtype::U32, shape, v.iter().flat_map(|x| x.to_le_bytes()).collect()));
        self
    }

    /// Token ids: u16 unless `wide`.
    pub fn ids(mut self, name: &'static str, shape: Vec<usize>, v: &[u32], wide: bool) -> Self {
        if wide {
            return self.u32s(name, shape, v);
        }
        self.tensors.push((name, Dtype::U16, shape, v.iter().flat_map(|&i| (i as u16).to_le_bytes()).collect()));
        self
    }

    /// Floats: f16 when `half`.
    pub fn floats(mut self, name: &'static str, shape: Vec<usize>, v: &[f32], half: bool) -> Self {
        let (dtype, bytes) = if half {
            (Dtype::F16, v.iter().flat_map(|&x| f16::from_f32(x).to_le_bytes()).collect())
        } else {
            (Dtype::F32, v.iter().flat_map(|x| x.to_le_bytes()).collect())
        };
        self.tensors.push((name, dtype, shape, bytes));
        self
    }

    /// The safetensors bytes, tagged with `format`.
    pub fn finish(self, format: &str) -> Result<Vec<u8>> {
        let views = self
            .tensors
            .iter()
            .map(|(name, dtype, shape, bytes)| {
                Ok((*name, TensorView::new(*dtype, shape.clone(), bytes).map_err(st_error)?))
            })
            .collect::<Result<Vec<_>>>()?;
        let meta = HashMap::from([("format".to_string(), format.to_string())]);
        safetensors::serialize(views, Some(meta)).map_err(st_error)
    }
}

/// A decoded shard's tensors; `what` names the shard kind in errors.
pub struct Reader<'a> {
    st: SafeTensors<'a>,
    what: &'static str,
}

impl<'a> Reader<'a> {
    pub fn new(bytes: &'a [u8], what: &'static str) -> Result<Self> {
        Ok(Self { st: SafeTensors::deserialize(bytes).map_err(st_error)?, what })
    }

    fn get(&self, name: &str) -> Result<TensorView<'a>> {
        self.st.tensor(name).map_err(|_| Error::msg(format!("the {} has no `{name}` tensor", self.what)))
    }

    pub fn has(&self, name: &str) -> bool {
        self.st.tensor(name).is_ok()
    }

    /// A u16 or u32 tensor, as u32.
    pub fn u32s(&self, name: &str) -> Result<Vec<u32>> {
        let view = self.get(name)?;
        Ok(match view.dtype() {
            Dtype::U16 => view.data().chunks_exact(2).map(|c| u16::from_le_bytes([c[0], c[1]]) as u32).collect(),
            Dtype::U32 => view.data().chunks_exact(4).map(|c| u32::from_le_bytes(c.try_into().unwrap())).collect(),
            other => return Err(Error::msg(format!("the {}'s `{name}` is {other:?}, not u16 or u32", self.what))),
        })
    }

    /// An f16 or f32 tensor, as f32.
    pub fn f32s(&self, name: &str) -> Result<Vec<f32>> {
        let view = self.get(name)?;
        Ok(match view.dtype() {
            Dtype::F16 => view.data().chunks_exact(2).map(|c| f16::from_le_bytes([c[0], c[1]]).to_f32()).collect(),
            Dtype::F32 => view.data().chunks_exact(4).map(|c| f32::from_le_bytes(c.try_into().unwrap())).collect(),
            other => return Err(Error::msg(format!("the {}'s `{name}` is {other:?}, not f16 or f32", self.what))),
        })
    }
}

fn st_error(e: safetensors::SafeTensorError) -> Error {
    Error::msg(format!("safetensors: {e}"))
}
