//! Kernels compiled twice: for AVX2 with FMA and for the baseline, chosen at run time.
//!
//! Release builds target the x86-64 baseline (SSE2), so the element-wise loops of the
//! kernels vectorise four floats wide; on the CPUs that have it, AVX2 doubles that (the
//! exp in softmax and SwiGLU was a tenth of a small model's step). The two builds compute
//! the same operations in the same order, so their results are identical.

/// Defines `fn $name` whose body is compiled for AVX2 + FMA and for the baseline; each call
/// takes the AVX2 build where the CPU supports it. For row kernels: the dispatch is one
/// cached feature check per call.
macro_rules! simd_fn {
    ($(#[$doc:meta])* $vis:vis fn $name:ident($($arg:ident: $ty:ty),* $(,)?) $(-> $ret:ty)? $body:block) => {
        $(#[$doc])*
        $vis fn $name($($arg: $ty),*) $(-> $ret)? {
            #[inline(always)]
            fn body($($arg: $ty),*) $(-> $ret)? $body
            #[cfg(target_arch = "x86_64")]
            {
                #[target_feature(enable = "avx2,fma")]
                fn avx2($($arg: $ty),*) $(-> $ret)? {
                    body($($arg),*)
                }
                if std::is_x86_feature_detected!("avx2") && std::is_x86_feature_detected!("fma") {
                    // SAFETY: the CPU has the features `avx2` was compiled for.
                    return unsafe { avx2($($arg),*) };
                }
            }
            body($($arg),*)
        }
    };
}

pub(crate) use simd_fn;
