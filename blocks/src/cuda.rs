//! CUDA kernels of the custom ops, compiled from source by NVRTC once per process (the
//! `cuda` build links NVRTC already; no build-time nvcc step or architecture list).

use std::sync::OnceLock;

use candle_core::cuda_backend::cudarc;
use candle_core::Result;

/// The module name the kernels load under in candle's per-device cache.
pub const MODULE: &str = "fusellm-kernels";

/// Threads per block of the row kernels: one block per row.
pub const ROW_THREADS: u32 = 256;

/// The CUDA C of every kernel; its functions are named `<kernel>_<element type>`.
const SOURCE: &str = include_str!("kernels.cu");

static PTX: OnceLock<std::result::Result<String, String>> = OnceLock::new();

/// The kernels' PTX, compiled on first use.
pub fn ptx() -> Result<&'static str> {
    let compiled =
        PTX.get_or_init(|| cudarc::nvrtc::compile_ptx(SOURCE).map(|p| p.to_src()).map_err(|e| e.to_string()));
    match compiled {
        Ok(ptx) => Ok(ptx),
        Err(e) => candle_core::bail!("compiling fusellm's CUDA kernels with NVRTC: {e}"),
    }
}

/// Launches kernel `$name` (a string) of the module with launch configuration `$config`
/// ([`rows`], [`elements`] or [`columns`]) and the given arguments (device views and
/// scalars, in the kernel's order).
#[macro_export]
#[doc(hidden)]
macro_rules! launch {
    ($dev:expr, $name:expr, $config:expr, $($arg:expr),+ $(,)?) => {{
        use candle_core::cuda_backend::{cudarc::driver::PushKernelArg, WrapErr};
        let func = $dev.get_or_load_custom_func(&$name, $crate::cuda::MODULE, $crate::cuda::ptx()?)?;
        let mut builder = func.builder();
        $(
            let arg = $arg;
            builder.arg(arg);
        )+
        // SAFETY: the callers pass the kernel's arguments, sized for `$config`.
        unsafe { builder.launch($config) }.w().map(|_| ())
    }};
}

pub use crate::launch;

/// The element types of the layers' kernels, which are instantiated per type as
/// `<name>_f32` and `<name>_bf16`.
pub trait Element: candle_core::cuda_backend::CudaDType + cudarc::driver::DeviceRepr {
    const SUFFIX: &'static str;
}

impl Element for f32 {
    const SUFFIX: &'static str = "f32";
}

impl Element for half::bf16 {
    const SUFFIX: &'static str = "bf16";
}

/// The name of kernel `name` for elements of type `T`.
pub fn kernel<T: Element>(name: &str) -> String {
    format!("{name}_{}", T::SUFFIX)
}

/// Evaluates `$body` with `$t` the [`Element`] type of `$dtype`, or fails for other dtypes.
#[macro_export]
#[doc(hidden)]
macro_rules! per_element {
    ($dtype:expr, $t:ident => $body:expr) => {
        match $dtype {
            candle_core::DType::F32 => {
                type $t = f32;
                $body
            }
            candle_core::DType::BF16 => {
                type $t = half::bf16;
                $body
            }
            other => candle_core::bail!("fusellm's CUDA kernels take f32 or bf16, not {other:?}"),
        }
    };
}

pub use crate::per_element;

/// A size as the kernels' `int`, or an error where it does not fit.
pub fn int(n: usize) -> Result<i32> {
    match i32::try_from(n) {
        Ok(n) => Ok(n),
        Err(_) => candle_core::bail!("{n} is beyond the 32-bit sizes of fusellm's CUDA kernels; use smaller batches"),
    }
}

/// One block of [`ROW_THREADS`] per row.
pub fn rows(rows: usize) -> Result<cudarc::driver::LaunchConfig> {
    let grid_dim = (int(rows)? as u32, 1, 1);
    Ok(cudarc::driver::LaunchConfig { grid_dim, block_dim: (ROW_THREADS, 1, 1), shared_mem_bytes: 0 })
}

/// One thread per element of `n`.
pub fn elements(n: usize) -> Result<cudarc::driver::LaunchConfig> {
    Ok(cudarc::driver::LaunchConfig::for_num_elems(int(n)? as u32))
}

/// One thread per column of `n`, in blocks of [`ROW_THREADS`], times `parts` (`blockIdx.y`,
/// at most 65535).
pub fn columns(n: usize, parts: usize) -> Result<cudarc::driver::LaunchConfig> {
    if parts > 65535 {
        candle_core::bail!("{parts} parts exceed the CUDA grid's 65535 in y");
    }
    let grid_dim = (n.div_ceil(ROW_THREADS as usize) as u32, parts as u32, 1);
    Ok(cudarc::driver::LaunchConfig { grid_dim, block_dim: (ROW_THREADS, 1, 1), shared_mem_bytes: 0 })
}

/// Device memory of the custom ops' inputs.
pub mod gpu {
    use candle_core::cuda_backend::cudarc::driver::{CudaView, CudaViewMut};
    use candle_core::cuda_backend::CudaDType;
    use candle_core::{CudaStorage, Layout, Result};

    /// The tensor's elements, which must be contiguous (the ops call `contiguous()` first).
    pub fn rows<'a, T: CudaDType>(s: &'a CudaStorage, l: &Layout) -> Result<CudaView<'a, T>> {
        match l.contiguous_offsets() {
            Some((start, end)) => Ok(s.as_cuda_slice::<T>()?.slice(start..end)),
            None => candle_core::bail!("a fusellm CUDA kernel got a non-contiguous input"),
        }
    }

    /// The same, to write in place.
    pub fn rows_mut<'a, T: CudaDType>(s: &'a mut CudaStorage, l: &Layout) -> Result<CudaViewMut<'a, T>> {
        match l.contiguous_offsets() {
            Some((start, end)) => Ok(s.as_cuda_slice_mut::<T>()?.slice_mut(start..end)),
            None => candle_core::bail!("a fusellm CUDA kernel got a non-contiguous output"),
        }
    }
}

#[cfg(test)]
mod tests {
    /// NVRTC needs no GPU: a CUDA build can check here that the kernels compile.
    #[test]
    fn the_kernels_compile_with_nvrtc() {
        let ptx = super::ptx().unwrap();
        let typed = [
            "attention_softmax_fwd",
            "softmax_bwd",
            "norm_fwd",
            "norm_bwd_dx",
            "norm_bwd_partial",
            "norm_bwd_params",
            "rope",
            "swiglu_fwd",
            "swiglu_bwd",
            "adamw_moment",
        ];
        let typed = typed.iter().flat_map(|k| [super::kernel::<f32>(k), super::kernel::<half::bf16>(k)]);
        let untyped = ["entry_nll_fwd", "entry_nll_bwd", "adamw_update"].map(String::from);
        for kernel in untyped.into_iter().chain(typed) {
            assert!(ptx.contains(&format!(".entry {kernel}(")), "{kernel} missing from the PTX");
        }
    }
}
