//! The data of CPU storages as the custom kernels read and write it: contiguous slices of
//! the right type, or an error naming the kernel.

use candle_core::{CpuStorage, DType, Device, Layout, Result, Storage, Tensor};

pub(crate) fn contiguous<'a, T>(data: &'a [T], l: &Layout, what: &str) -> Result<&'a [T]> {
    match l.contiguous_offsets() {
        Some((a, b)) => Ok(&data[a..b]),
        None => candle_core::bail!("{what}: contiguous inputs only"),
    }
}

pub fn f32s<'a>(s: &'a CpuStorage, l: &Layout, what: &str) -> Result<&'a [f32]> {
    let CpuStorage::F32(data) = s else { candle_core::bail!("{what}: f32 only") };
    contiguous(data, l, what)
}

pub fn f32s_mut<'a>(s: &'a mut CpuStorage, l: &Layout, what: &str) -> Result<&'a mut [f32]> {
    let CpuStorage::F32(data) = s else { candle_core::bail!("{what}: f32 only") };
    match l.contiguous_offsets() {
        Some((a, b)) => Ok(&mut data[a..b]),
        None => candle_core::bail!("{what}: contiguous inputs only"),
    }
}

/// Runs `f` on the elements of `t` as f32 on the host: in place for a contiguous f32 CPU
/// tensor, else from a converted copy (another dtype or device).
pub fn with_host_f32s<R>(t: &Tensor, f: impl FnOnce(&[f32]) -> R) -> Result<R> {
    let host;
    let t = match t.device().is_cpu() && t.dtype() == DType::F32 {
        true => t,
        false => {
            host = t.to_dtype(DType::F32)?.to_device(&Device::Cpu)?;
            &host
        }
    };
    let t = &t.contiguous()?;
    let (storage, layout) = t.storage_and_layout();
    let Storage::Cpu(storage) = &*storage else { candle_core::bail!("a host copy that is not on the host") };
    Ok(f(f32s(storage, layout, "host f32s")?))
}
