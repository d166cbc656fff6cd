//! The safetensors plumbing the store's three shard kinds share: ids as u16 or u32, floats
//! as f16 or f32, a format tag in the metadata, and decoding that widens every id to u32
//! and every float to f32.
//!
//! Large tensors are written compressed: their bytes split into planes (every first byte,
//! then every second, ...: the sign-and-exponent bytes of floats and the high bytes of ids
//! repeat a lot; Parquet's BYTE_STREAM_SPLIT encoding, here on safetensors, kept because
//! no crate offers it for safetensors and the store is 10-50x smaller for it) and deflated, stored as a u8 tensor whose name also declares the logical
//! dtype and shape (`topk_ids@deflate-planes:U16:5144,10`; not in the metadata, which
//! safetensors writes in hash order, and shards must be byte-identical across runs).
//! Readers accept plain tensors too, which is what other tools write (examples/import).

use std::collections::HashMap;

use half::f16;
use safetensors::tensor::{Dtype, SafeTensors, TensorView};

use crate::error::{Error, Result};

/// Tensors smaller than this are stored plain.
const COMPRESS_FROM: usize = 512;
const ENCODING: &str = "deflate-planes";

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

    /// The safetensors bytes, tagged with `format`; large tensors compressed.
    pub fn finish(self, format: &str) -> Result<Vec<u8>> {
        let stored: Vec<(String, Dtype, Vec<usize>, Vec<u8>)> = self
            .tensors
            .into_iter()
            .map(|(name, dtype, shape, bytes)| {
                if bytes.len() < COMPRESS_FROM {
                    return (name.to_string(), dtype, shape, bytes);
                }
                let dims: Vec<String> = shape.iter().map(usize::to_string).collect();
                let packed = miniz_oxide::deflate::compress_to_vec(&planes(&bytes, dtype.bitsize() / 8), 6);
                (format!("{name}@{ENCODING}:{dtype:?}:{}", dims.join(",")), Dtype::U8, vec![packed.len()], packed)
            })
            .collect();
        let views = stored
            .iter()
            .map(|(name, dtype, shape, bytes)| {
                Ok((name.as_str(), TensorView::new(*dtype, shape.clone(), bytes).map_err(st_error)?))
            })
            .collect::<Result<Vec<_>>>()?;
        let meta = HashMap::from([("format".to_string(), format.to_string())]);
        safetensors::serialize(views, Some(meta)).map_err(st_error)
    }
}

/// The bytes of `width`-byte elements regrouped by byte position.
fn planes(bytes: &[u8], width: usize) -> Vec<u8> {
    (0..width).flat_map(|i| bytes.iter().skip(i).step_by(width).copied()).collect()
}

/// The inverse of [`planes`].
fn interleave(planes: &[u8], width: usize) -> Vec<u8> {
    let n = planes.len() / width.max(1);
    (0..planes.len()).map(|j| planes[(j % width) * n + j / width]).collect()
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

    /// The stored name of tensor `name`: itself, or its compressed form.
    fn stored(&self, name: &str) -> Option<String> {
        let prefix = format!("{name}@");
        self.st.names().into_iter().find(|n| *n == name || n.starts_with(&prefix)).map(str::to_string)
    }

    pub fn has(&self, name: &str) -> bool {
        self.stored(name).is_some()
    }

    /// The logical dtype and little-endian bytes of tensor `name`, decompressed.
    fn get(&self, name: &str) -> Result<(Dtype, Vec<u8>)> {
        let stored =
            self.stored(name).ok_or_else(|| Error::msg(format!("the {} has no `{name}` tensor", self.what)))?;
        let view = self.st.tensor(&stored).map_err(st_error)?;
        let Some((_, encoding)) = stored.split_once('@') else { return Ok((view.dtype(), view.data().to_vec())) };
        let bad =
            || Error::msg(format!("the {}'s `{name}` is stored as {encoding:?}, which cannot be read", self.what));
        let mut words = encoding.split(':');
        let (Some(ENCODING), Some(dtype)) = (words.next(), words.next()) else { return Err(bad()) };
        let (dtype, width) = match dtype {
            "U16" => (Dtype::U16, 2),
            "U32" => (Dtype::U32, 4),
            "F16" => (Dtype::F16, 2),
            "F32" => (Dtype::F32, 4),
            _ => return Err(bad()),
        };
        let planes = miniz_oxide::inflate::decompress_to_vec(view.data()).map_err(|e| {
            Error::msg(format!("the {}'s `{name}` does not decompress ({e:?}): the shard is corrupt", self.what))
        })?;
        Ok((dtype, interleave(&planes, width)))
    }

    /// A u16 or u32 tensor, as u32.
    pub fn u32s(&self, name: &str) -> Result<Vec<u32>> {
        Ok(match self.get(name)? {
            (Dtype::U16, data) => data.chunks_exact(2).map(|c| u16::from_le_bytes([c[0], c[1]]) as u32).collect(),
            (Dtype::U32, data) => data.chunks_exact(4).map(|c| u32::from_le_bytes(c.try_into().unwrap())).collect(),
            (other, _) => return Err(Error::msg(format!("the {}'s `{name}` is {other:?}, not u16 or u32", self.what))),
        })
    }

    /// An f16 or f32 tensor, as f32.
    pub fn f32s(&self, name: &str) -> Result<Vec<f32>> {
        Ok(match self.get(name)? {
            (Dtype::F16, data) => data.chunks_exact(2).map(|c| f16::from_le_bytes([c[0], c[1]]).to_f32()).collect(),
            (Dtype::F32, data) => data.chunks_exact(4).map(|c| f32::from_le_bytes(c.try_into().unwrap())).collect(),
            (other, _) => return Err(Error::msg(format!("the {}'s `{name}` is {other:?}, not f16 or f32", self.what))),
        })
    }
}

fn st_error(e: safetensors::SafeTensorError) -> Error {
    Error::Context { what: "safetensors".into(), source: e.into() }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn compressed_tensors_read_back_exactly() {
        let ids: Vec<u32> = (0..3000).map(|i| (i * 7919) % 32000).collect();
        let floats: Vec<f32> = (0..3000).map(|i| -(i as f32) / 300.0).collect();
        let bytes = Writer::default()
            .ids("ids", vec![300, 10], &ids, false)
            .floats("lp", vec![3000], &floats, true)
            .u32s("small", vec![2], &[1, 2])
            .finish("test/1")
            .unwrap();
        assert!(bytes.len() < 3000 * 4, "{} bytes", bytes.len());
        let r = Reader::new(&bytes, "test shard").unwrap();
        assert_eq!(r.u32s("ids").unwrap(), ids);
        let expected: Vec<f32> = floats.iter().map(|&x| f16::from_f32(x).to_f32()).collect();
        assert_eq!(r.f32s("lp").unwrap(), expected);
        assert_eq!(r.u32s("small").unwrap(), vec![1, 2]);
    }
}
