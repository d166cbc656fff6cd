//! Matrix products on plain f32 slices for the custom kernels, by the `gemm` crate that
//! candle's CPU matmul uses.

/// How many threads one product may use: all of rayon's, or one when the caller already
/// runs products in parallel.
#[derive(Clone, Copy)]
pub(crate) enum Threads {
    All,
    One,
}

/// `dst (+)= a @ b` for `[m, n, k]`, with `a` (m x k) and `b` (k x n) given as
/// (data, row stride, column stride) and `dst` row-major m x n; `accumulate` adds to `dst`
/// instead of overwriting it.
pub(crate) fn gemm(
    [m, n, k]: [usize; 3],
    dst: &mut [f32],
    accumulate: bool,
    a: (&[f32], usize, usize),
    b: (&[f32], usize, usize),
    threads: Threads,
) {
    let last = |rows: usize, cols: usize, rs: usize, cs: usize| (rows.max(1) - 1) * rs + (cols.max(1) - 1) * cs;
    assert!(dst.len() >= m * n && a.0.len() > last(m, k, a.1, a.2) && b.0.len() > last(k, n, b.1, b.2));
    let parallelism = match (threads, rayon::current_num_threads()) {
        (Threads::All, n) if n > 1 => gemm::Parallelism::Rayon(n),
        _ => gemm::Parallelism::None,
    };
    // SAFETY: the assert keeps every index of the three matrices inside its slice.
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            dst.as_mut_ptr(),
            1,
            n as isize,
            accumulate,
            a.0.as_ptr(),
            a.2 as isize,
            a.1 as isize,
            b.0.as_ptr(),
            b.2 as isize,
            b.1 as isize,
            1.0,
            1.0,
            false,
            false,
            false,
            parallelism,
        )
    }
}
