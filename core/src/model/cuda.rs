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

// ---- softmax over rows of n: y = softmax(x); dx = y * (g - sum(g * y))
extern "C" __global__ void softmax_fwd(const float* x, float* y, int n) {
    const float* xr = x + (size_t)blockIdx.x * n;
    float* yr = y + (size_t)blockIdx.x * n;
    float lse = row_lse(xr, n);
    for (int j = threadIdx.x; j < n; j += blockDim.x) yr[j] = expf(xr[j] - lse);
}

extern "C" __global__ void softmax_bwd(const float* y, const float* g, float* dx, int n) {
    size_t at = (size_t)blockIdx.x * n;
    float dot = 0.0f;
    for (int j = threadIdx.x; j < n; j += blockDim.x) dot += y[at + j] * g[at + j];
    dot = block_reduce(dot, false);
    for (int j = threadIdx.x; j < n; j += blockDim.x) dx[at + j] = y[at + j] * (g[at + j] - dot);
}

// ---- RMSNorm (centre = 0) and LayerNorm (centre = 1) over rows of n
// Row statistics: the mean (0 for RMSNorm) and r = 1 / sqrt(var + eps).
__device__ void norm_stats(const float* x, int n, float eps, int centre, float* mean, float* r) {
    float s = 0.0f;
    if (centre) {
        for (int j = threadIdx.x; j < n; j += blockDim.x) s += x[j];
        s = block_reduce(s, false) / n;
    }
    float v = 0.0f;
    for (int j = threadIdx.x; j < n; j += blockDim.x) v += (x[j] - s) * (x[j] - s);
    v = block_reduce(v, false) / n;
    *mean = s;
    *r = rsqrtf(v + eps);
}

extern "C" __global__ void norm_fwd(const float* x, const float* w, const float* b, float* y, int n, float eps, int centre) {
    const float* xr = x + (size_t)blockIdx.x * n;
    float* yr = y + (size_t)blockIdx.x * n;
    float mean, r;
    norm_stats(xr, n, eps, centre, &mean, &r);
    for (int j = threadIdx.x; j < n; j += blockDim.x) yr[j] = (xr[j] - mean) * r * w[j] + (centre ? b[j] : 0.0f);
}

// dx per row (and the row's statistics for norm_bwd_params):
// dx = r * (d - mean(d) - x_hat * mean(d * x_hat)), d = g * w (no mean(d) for RMSNorm)
extern "C" __global__ void norm_bwd_dx(const float* x, const float* w, const float* g, float* dx, float* stats, int n, float eps, int centre) {
    size_t at = (size_t)blockIdx.x * n;
    float mean, r;
    norm_stats(x + at, n, eps, centre, &mean, &r);
    float md = 0.0f, mdx = 0.0f;
    for (int j = threadIdx.x; j < n; j += blockDim.x) {
        float d = g[at + j] * w[j];
        md += d;
        mdx += d * (x[at + j] - mean) * r;
    }
    md = block_reduce(md, false) / n;
    mdx = block_reduce(mdx, false) / n;
    float shift = centre ? md : 0.0f;
    for (int j = threadIdx.x; j < n; j += blockDim.x) {
        float xh = (x[at + j] - mean) * r;
        dx[at + j] = r * (g[at + j] * w[j] - shift - xh * mdx);
    }
    if (threadIdx.x == 0) {
        stats[2 * blockIdx.x] = mean;
        stats[2 * blockIdx.x + 1] = r;
    }
}

// dw[j] = sum over rows of g * x_hat, db[j] = dw[n + j] = sum over rows of g: one thread
// per column, rows in order, so the sums do not depend on scheduling.
extern "C" __global__ void norm_bwd_params(const float* x, const float* g, const float* stats, float* dw, int rows, int n) {
    int j = blockIdx.x * blockDim.x + threadIdx.x;
    if (j >= n) return;
    float sw = 0.0f, sb = 0.0f;
    for (int i = 0; i < rows; i++) {
        size_t at = (size_t)i * n + j;
        sw += g[at] * (x[at] - stats[2 * i]) * stats[2 * i + 1];
        sb += g[at];
    }
    dw[j] = sw;
    dw[n + j] = sb;
}

// ---- rotate-half RoPE of rows of d (positions cycle with period t); sign -1 inverts it
extern "C" __global__ void rope(const float* x, const float* cos_t, const float* sin_t, float* y, int rows, int t, int d, float sign) {
    int half = d / 2;
    size_t k = (size_t)blockIdx.x * blockDim.x + threadIdx.x;
    if (k >= (size_t)rows * half) return;
    size_t row = k / half;
    int i = k % half, p = row % t;
    float c = cos_t[p * half + i], s = sign * sin_t[p * half + i];
    const float* xr = x + row * d;
    y[row * d + i] = xr[i] * c - xr[i + half] * s;
    y[row * d + i + half] = xr[i + half] * c + xr[i] * s;
}

// ---- SwiGLU: y = silu(gate) * up; grads packed [d_gate; d_up]
extern "C" __global__ void swiglu_fwd(const float* gate, const float* up, float* y, int len) {
    int k = blockIdx.x * blockDim.x + threadIdx.x;
    if (k >= len) return;
    float z = gate[k], s = 1.0f / (1.0f + expf(-z));
    y[k] = z * s * up[k];
}

extern "C" __global__ void swiglu_bwd(const float* gate, const float* up, const float* g, float* out, int len) {
    int k = blockIdx.x * blockDim.x + threadIdx.x;
    if (k >= len) return;
    float z = gate[k], s = 1.0f / (1.0f + expf(-z));
    out[k] = g[k] * up[k] * s * (1.0f + z * (1.0f - s));
    out[len + k] = g[k] * z * s;
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

/// Launches kernel `$name` of the module with launch configuration `$config` ([`rows`] or
/// [`elements`]) and the given arguments (device views and scalars, in the kernel's order).
macro_rules! launch {
    ($dev:expr, $name:literal, $config:expr, $($arg:expr),+ $(,)?) => {{
        use candle_core::cuda_backend::{cudarc::driver::PushKernelArg, WrapErr};
        let func = $dev.get_or_load_custom_func($name, $crate::model::cuda::MODULE, $crate::model::cuda::ptx()?)?;
        let mut builder = func.builder();
        $(
            let arg = $arg;
            builder.arg(arg);
        )+
        // SAFETY: the callers pass the kernel's arguments, sized for `$config`.
        unsafe { builder.launch($config) }.w()
    }};
}

pub(crate) use launch;

/// One block of [`ROW_THREADS`] per row.
pub(crate) fn rows(rows: usize) -> cudarc::driver::LaunchConfig {
    cudarc::driver::LaunchConfig { grid_dim: (rows as u32, 1, 1), block_dim: (ROW_THREADS, 1, 1), shared_mem_bytes: 0 }
}

/// One thread per element (or per column) of `n`.
pub(crate) fn elements(n: usize) -> cudarc::driver::LaunchConfig {
    cudarc::driver::LaunchConfig::for_num_elems(n as u32)
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

#[cfg(test)]
mod tests {
    /// NVRTC needs no GPU: a CUDA build can check here that the kernels compile.
    #[test]
    fn the_kernels_compile_with_nvrtc() {
        let ptx = super::ptx().unwrap();
        for kernel in ["entry_nll_fwd", "entry_nll_bwd", "softmax_fwd", "norm_bwd_params", "rope", "swiglu_bwd"] {
            assert!(ptx.contains(&format!(".entry {kernel}(")), "{kernel} missing from the PTX");
        }
    }
}
