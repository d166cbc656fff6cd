//! The data of CPU storages as the custom kernels read and write it: contiguous slices of
//! the right type, or an error naming the kernel.

use candle_core::{CpuStorage, Layout, Result};

pub(crate) fn contiguous<'a, T>(data: &'a [T], l: &Layout, what: &str) -> Result<&'a [T]> {
    match l.contiguous_offsets() {
        Some((a, b)) => Ok(&data[a..b]),
        None => candle_core::bail!("{what}: contiguous inputs only"),
    }
}

pub(crate) fn f32s<'a>(s: &'a CpuStorage, l: &Layout, what: &str) -> Result<&'a [f32]> {
    let CpuStorage::F32(data) = s else { candle_core::bail!("{what}: f32 only") };
    contiguous(data, l, what)
}

pub(crate) fn f32s_mut<'a>(s: &'a mut CpuStorage, l: &Layout, what: &str) -> Result<&'a mut [f32]> {
    let CpuStorage::F32(data) = s else { candle_core::bail!("{what}: f32 only") };
    match l.contiguous_offsets() {
        Some((a, b)) => Ok(&mut data[a..b]),
        None => candle_core::bail!("{what}: contiguous inputs only"),
    }
}
