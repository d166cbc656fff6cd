//! CUDA kernels of the custom ops, compiled from source by NVRTC once per process (the
//! `cuda` build links NVRTC already; no build-time nvcc step or architecture list).

use std::sync::OnceLock;

use candle_core::cuda_backend::cudarc;
use candle_core::Result;

/// The module name the kernels load under in candle's per-device cache.
pub(crate) const MODULE: &str = "fusellm-kernels";

/// Threads per block of the row kernels: one block per row.
pub(crate) const ROW_THREADS: u32 = 256;

const SOURCE: &str = r#"
#define NEG_INF __int_as_float(0xff800000)

// Reduce over the block (blockDim.x a multiple of 32, at most 1024).
__device__ float block_reduce(float v, bool is_max) {
    __shared__ float warps[32];
    for (int o = 16; o > 0; o /= 2) {
        float w = __shfl_xor_sync(0xffffffff, v, o);
        v = is_max ? fmaxf(v, w) : v + w;
    }
    int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
    __syncthreads();
    if (lane == 0) warps[warp] = v;
    __syncthreads();
    int n = blockDim.x / 32;
    v = lane < n ? warps[lane] : (is_max ? NEG_INF : 0.0f);
    for (int o = 16; o > 0; o /= 2) {
        float w = __shfl_xor_sync(0xffffffff, v, o);
        v = is_max ? fmaxf(v, w) : v + w;
    }
    return v;
}

// log sum exp of one row, the same value in every thread of the block.
__device__ float row_lse(const float* x, int v) {
    float m = NEG_INF;
    for (int j = threadIdx.x; j < v; j += blockDim.x) m = fmaxf(m, x[j]);
    m = block_reduce(m, true);
    float s = 0.0f;
    for (int j = threadIdx.x; j < v; j += blockDim.x) s += expf(x[j] - m);
    s = block_reduce(s, false);
    return m + logf(s);
}

// out[r, i] = lse(logits[r]) - logits[r, ids[r, i]]
extern "C" __global__ void entry_nll_fwd(const float* logits, const unsigned int* ids, float* out, int v, int k) {
    const float* x = logits + (size_t)blockIdx.x * v;
    float lse = row_lse(x, v);
    for (int i = threadIdx.x; i < k; i += blockDim.x) {
        out[(size_t)blockIdx.x * k + i] = lse - x[ids[(size_t)blockIdx.x * k + i]];
    }
}

// d logits[r, j] = softmax(logits[r])_j * sum_i g[r, i] - sum_{i: ids[r, i] = j} g[r, i]
extern "C" __global__ void entry_nll_bwd(const float* logits, const unsigned int* ids, const float* g, float* out, int v, int k) {
    const float* x = logits + (size_t)blockIdx.x * v;
    const unsigned int* row_ids = ids + (size_t)blockIdx.x * k;
    const float* row_g = g + (size_t)blockIdx.x * k;
    float* y = out + (size_t)blockIdx.x * v;
    float total = 0.0f;
    for (int i = 0; i < k; i++) total += row_g[i];
    float lse = row_lse(x, v);
    for (int j = threadIdx.x; j < v; j += blockDim.x) y[j] = total == 0.0f ? 0.0f : expf(x[j] - lse) * total;
    __syncthreads();
    // One thread, so that repeated ids subtract in turn.
    if (threadIdx.x == 0) {
        for (int i = 0; i < k; i++) y[row_ids[i]] -= row_g[i];
    }
}
"#;

static PTX: OnceLock<std::result::Result<String, String>> = OnceLock::new();

/// The kernels' PTX, compiled on first use.
pub(crate) fn ptx() -> Result<&'static str> {
    let compiled =
        PTX.get_or_init(|| cudarc::nvrtc::compile_ptx(SOURCE).map(|p| p.to_src()).map_err(|e| e.to_string()));
    match compiled {
        Ok(ptx) => Ok(ptx),
        Err(e) => candle_core::bail!("compiling fusellm's CUDA kernels with NVRTC: {e}"),
    }
}

/// Launches kernel `$name` of the module with one block per row over `$rows` rows, with
/// the given arguments (device views and scalars, in the kernel's order).
macro_rules! launch_rows {
    ($dev:expr, $name:literal, $rows:expr, $($arg:expr),+ $(,)?) => {{
        use candle_core::cuda_backend::{cudarc::driver::PushKernelArg, WrapErr};
        let func = $dev.get_or_load_custom_func($name, $crate::model::cuda::MODULE, $crate::model::cuda::ptx()?)?;
        let mut builder = func.builder();
        $(
            let arg = $arg;
            builder.arg(arg);
        )+
        // SAFETY: the callers pass the kernel's arguments, sized for `$rows` rows.
        unsafe { builder.launch($crate::model::cuda::rows_config($rows)) }.w()
    }};
}

pub(crate) use launch_rows;

/// One block of [`ROW_THREADS`] per row.
pub(crate) fn rows_config(rows: usize) -> cudarc::driver::LaunchConfig {
    cudarc::driver::LaunchConfig { grid_dim: (rows as u32, 1, 1), block_dim: (ROW_THREADS, 1, 1), shared_mem_bytes: 0 }
}

/// Device memory of the custom ops' inputs.
pub(crate) mod gpu {
    use candle_core::cuda_backend::cudarc::driver::CudaView;
    use candle_core::cuda_backend::CudaDType;
    use candle_core::{CudaStorage, Layout, Result};

    /// The tensor's elements, which must be contiguous (the ops call `contiguous()` first).
    pub(crate) fn rows<'a, T: CudaDType>(s: &'a CudaStorage, l: &Layout) -> Result<CudaView<'a, T>> {
        match l.contiguous_offsets() {
            Some((start, end)) => Ok(s.as_cuda_slice::<T>()?.slice(start..end)),
            None => candle_core::bail!("a fusellm CUDA kernel got a non-contiguous input"),
        }
    }
}
