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

// ---- Element types. bf16 travels as its bits, so that NVRTC needs no headers: loads widen
// to f32, stores round to nearest even. The layers' kernels below are templates over the
// element type; EACH_TYPE instantiates a kernel as <name>_f32 and <name>_bf16.
typedef unsigned short bf16;
__device__ __forceinline__ float load(const float* p, size_t i) { return p[i]; }
__device__ __forceinline__ float load(const bf16* p, size_t i) { return __uint_as_float((unsigned int)p[i] << 16); }
__device__ __forceinline__ void store(float* p, size_t i, float v) { p[i] = v; }
__device__ __forceinline__ void store(bf16* p, size_t i, float v) {
    unsigned int u = __float_as_uint(v);
    p[i] = (u & 0x7fffffff) > 0x7f800000 ? (bf16)0x7fc0 : (bf16)((u + 0x7fff + ((u >> 16) & 1)) >> 16);
}
#define EACH_TYPE(KERNEL) KERNEL(float, f32) KERNEL(bf16, bf16)

// ---- attention softmax: y = softmax(x * scale + bias) over rows of n (one block per row),
// x [b, h, t, n], bias [bias_b, bias_h, t, n] f32 with bias_b in {1, b}, bias_h in {1, h};
// dx = scale * y * (g - sum(g * y))
template <typename T>
__device__ void attention_softmax_fwd(const T* x, const float* bias, T* y, int n, int t, int heads, int bias_b, int bias_h, float scale) {
    size_t row = blockIdx.x, at = row * n;
    size_t i = row % t, hi = row / t % heads, bi = row / t / heads;
    const float* br = bias + (((bias_b == 1 ? 0 : bi) * bias_h + (bias_h == 1 ? 0 : hi)) * t + i) * n;
    float m = NEG_INF;
    for (int j = threadIdx.x; j < n; j += blockDim.x) m = fmaxf(m, load(x, at + j) * scale + br[j]);
    m = block_reduce(m, true);
    float s = 0.0f;
    for (int j = threadIdx.x; j < n; j += blockDim.x) s += expf(load(x, at + j) * scale + br[j] - m);
    float lse = m + logf(block_reduce(s, false));
    for (int j = threadIdx.x; j < n; j += blockDim.x) store(y, at + j, expf(load(x, at + j) * scale + br[j] - lse));
}
#define ATTENTION_SOFTMAX_FWD(T, S) extern "C" __global__ void attention_softmax_fwd_##S(const T* x, const float* bias, T* y, int n, int t, int heads, int bias_b, int bias_h, float scale) { attention_softmax_fwd(x, bias, y, n, t, heads, bias_b, bias_h, scale); }
EACH_TYPE(ATTENTION_SOFTMAX_FWD)

template <typename T>
__device__ void softmax_bwd(const T* y, const T* g, T* dx, int n, float scale) {
    size_t at = (size_t)blockIdx.x * n;
    float dot = 0.0f;
    for (int j = threadIdx.x; j < n; j += blockDim.x) dot += load(y, at + j) * load(g, at + j);
    dot = block_reduce(dot, false);
    for (int j = threadIdx.x; j < n; j += blockDim.x) store(dx, at + j, scale * load(y, at + j) * (load(g, at + j) - dot));
}
#define SOFTMAX_BWD(T, S) extern "C" __global__ void softmax_bwd_##S(const T* y, const T* g, T* dx, int n, float scale) { softmax_bwd(y, g, dx, n, scale); }
EACH_TYPE(SOFTMAX_BWD)

// ---- RMSNorm (centre = 0) and LayerNorm (centre = 1) over rows of n
// Row statistics: the mean (0 for RMSNorm) and r = 1 / sqrt(var + eps).
template <typename T>
__device__ void norm_stats(const T* x, int n, float eps, int centre, float* mean, float* r) {
    float s = 0.0f;
    if (centre) {
        for (int j = threadIdx.x; j < n; j += blockDim.x) s += load(x, j);
        s = block_reduce(s, false) / n;
    }
    float v = 0.0f;
    for (int j = threadIdx.x; j < n; j += blockDim.x) v += (load(x, j) - s) * (load(x, j) - s);
    v = block_reduce(v, false) / n;
    *mean = s;
    *r = rsqrtf(v + eps);
}

template <typename T>
__device__ void norm_fwd(const T* x, const T* w, const T* b, T* y, int n, float eps, int centre) {
    size_t at = (size_t)blockIdx.x * n;
    float mean, r;
    norm_stats(x + at, n, eps, centre, &mean, &r);
    for (int j = threadIdx.x; j < n; j += blockDim.x) {
        store(y, at + j, (load(x, at + j) - mean) * r * load(w, j) + (centre ? load(b, j) : 0.0f));
    }
}
#define NORM_FWD(T, S) extern "C" __global__ void norm_fwd_##S(const T* x, const T* w, const T* b, T* y, int n, float eps, int centre) { norm_fwd(x, w, b, y, n, eps, centre); }
EACH_TYPE(NORM_FWD)

// dx per row (and the row's statistics for norm_bwd_params):
// dx = r * (d - mean(d) - x_hat * mean(d * x_hat)), d = g * w (no mean(d) for RMSNorm)
template <typename T>
__device__ void norm_bwd_dx(const T* x, const T* w, const T* g, T* dx, float* stats, int n, float eps, int centre) {
    size_t at = (size_t)blockIdx.x * n;
    float mean, r;
    norm_stats(x + at, n, eps, centre, &mean, &r);
    float md = 0.0f, mdx = 0.0f;
    for (int j = threadIdx.x; j < n; j += blockDim.x) {
        float d = load(g, at + j) * load(w, j);
        md += d;
        mdx += d * (load(x, at + j) - mean) * r;
    }
    md = block_reduce(md, false) / n;
    mdx = block_reduce(mdx, false) / n;
    float shift = centre ? md : 0.0f;
    for (int j = threadIdx.x; j < n; j += blockDim.x) {
        float xh = (load(x, at + j) - mean) * r;
        store(dx, at + j, r * (load(g, at + j) * load(w, j) - shift - xh * mdx));
    }
    if (threadIdx.x == 0) {
        stats[2 * blockIdx.x] = mean;
        stats[2 * blockIdx.x + 1] = r;
    }
}
#define NORM_BWD_DX(T, S) extern "C" __global__ void norm_bwd_dx_##S(const T* x, const T* w, const T* g, T* dx, float* stats, int n, float eps, int centre) { norm_bwd_dx(x, w, g, dx, stats, n, eps, centre); }
EACH_TYPE(NORM_BWD_DX)

// dw[j] = sum over rows of g * x_hat, db[j] = dw[n + j] = sum over rows of g, in two steps
// whose order of addition is fixed, so that the sums do not depend on scheduling: partial
// sums per column over parts of `per_part` rows (a grid of column blocks x parts), then
// the parts in order.
template <typename T>
__device__ void norm_bwd_partial(const T* x, const T* g, const float* stats, float* part, int rows, int n, int per_part) {
    int j = blockIdx.x * blockDim.x + threadIdx.x;
    if (j >= n) return;
    int first = blockIdx.y * per_part, end = min(rows, first + per_part);
    float sw = 0.0f, sb = 0.0f;
    for (int i = first; i < end; i++) {
        size_t at = (size_t)i * n + j;
        sw += load(g, at) * (load(x, at) - stats[2 * i]) * stats[2 * i + 1];
        sb += load(g, at);
    }
    part[(size_t)blockIdx.y * 2 * n + j] = sw;
    part[(size_t)blockIdx.y * 2 * n + n + j] = sb;
}
#define NORM_BWD_PARTIAL(T, S) extern "C" __global__ void norm_bwd_partial_##S(const T* x, const T* g, const float* stats, float* part, int rows, int n, int per_part) { norm_bwd_partial(x, g, stats, part, rows, n, per_part); }
EACH_TYPE(NORM_BWD_PARTIAL)

template <typename T>
__device__ void norm_bwd_params(const float* part, T* dw, int parts, int width) {
    int j = blockIdx.x * blockDim.x + threadIdx.x;
    if (j >= width) return;
    float s = 0.0f;
    for (int p = 0; p < parts; p++) s += part[(size_t)p * width + j];
    store(dw, j, s);
}
#define NORM_BWD_PARAMS(T, S) extern "C" __global__ void norm_bwd_params_##S(const float* part, T* dw, int parts, int width) { norm_bwd_params(part, dw, parts, width); }
EACH_TYPE(NORM_BWD_PARAMS)

// ---- rotate-half RoPE of rows of d (positions cycle with period t); sign -1 inverts it
template <typename T>
__device__ void rope(const T* x, const T* cos_t, const T* sin_t, T* y, int rows, int t, int d, float sign) {
    int half = d / 2;
    size_t k = (size_t)blockIdx.x * blockDim.x + threadIdx.x;
    if (k >= (size_t)rows * half) return;
    size_t row = k / half;
    int i = k % half, p = row % t;
    float c = load(cos_t, p * half + i), s = sign * load(sin_t, p * half + i);
    float a = load(x, row * d + i), b = load(x, row * d + i + half);
    store(y, row * d + i, a * c - b * s);
    store(y, row * d + i + half, b * c + a * s);
}
#define ROPE(T, S) extern "C" __global__ void rope_##S(const T* x, const T* cos_t, const T* sin_t, T* y, int rows, int t, int d, float sign) { rope(x, cos_t, sin_t, y, rows, t, d, sign); }
EACH_TYPE(ROPE)

// ---- SwiGLU: y = silu(gate) * up; grads packed [d_gate; d_up]
template <typename T>
__device__ void swiglu_fwd(const T* gate, const T* up, T* y, int len) {
    int k = blockIdx.x * blockDim.x + threadIdx.x;
    if (k >= len) return;
    float z = load(gate, k), s = 1.0f / (1.0f + expf(-z));
    store(y, k, z * s * load(up, k));
}
#define SWIGLU_FWD(T, S) extern "C" __global__ void swiglu_fwd_##S(const T* gate, const T* up, T* y, int len) { swiglu_fwd(gate, up, y, len); }
EACH_TYPE(SWIGLU_FWD)

template <typename T>
__device__ void swiglu_bwd(const T* gate, const T* up, const T* g, T* out, int len) {
    int k = blockIdx.x * blockDim.x + threadIdx.x;
    if (k >= len) return;
    float z = load(gate, k), s = 1.0f / (1.0f + expf(-z)), gk = load(g, k);
    store(out, k, gk * load(up, k) * s * (1.0f + z * (1.0f - s)));
    store(out, (size_t)len + k, gk * z * s);
}
#define SWIGLU_BWD(T, S) extern "C" __global__ void swiglu_bwd_##S(const T* gate, const T* up, const T* g, T* out, int len) { swiglu_bwd(gate, up, g, out, len); }
EACH_TYPE(SWIGLU_BWD)

// ---- AdamW, in place on f32 state (the gradient in f32 or bf16):
// m = decay * m + scale * g (or g^2); p = p * keep - step * m / (sqrt(v) / bc2 + eps)
template <typename T>
__device__ void adamw_moment(float* m, const T* g, int n, float decay, float scale, int square) {
    int k = blockIdx.x * blockDim.x + threadIdx.x;
    if (k >= n) return;
    float gk = load(g, k);
    m[k] = decay * m[k] + scale * (square ? gk * gk : gk);
}
#define ADAMW_MOMENT(T, S) extern "C" __global__ void adamw_moment_##S(float* m, const T* g, int n, float decay, float scale, int square) { adamw_moment(m, g, n, decay, scale, square); }
EACH_TYPE(ADAMW_MOMENT)

extern "C" __global__ void adamw_update(float* p, const float* m, const float* v, int n, float keep, float step, float bc2, float eps) {
    int k = blockIdx.x * blockDim.x + threadIdx.x;
    if (k >= n) return;
    p[k] = p[k] * keep - step * m[k] / (sqrtf(v[k]) / bc2 + eps);
}
