//! Matrix products on plain f32 slices for the custom kernels, by the `gemm` crate that
//! candle's CPU matmul uses.

use std::mem::{ManuallyDrop, MaybeUninit};

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
    dims: [usize; 3],
    dst: &mut [f32],
    accumulate: bool,
    a: (&[f32], usize, usize),
    b: (&[f32], usize, usize),
    threads: Threads,
) {
    assert!(dst.len() >= dims[0] * dims[1]);
    // SAFETY: `dst` holds m x n elements.
    unsafe { product(dims, dst.as_mut_ptr(), accumulate, a, b, threads) }
}

/// `a @ b` into `dst` (m x n, uninitialised until now): the kernels' output buffers need no
/// zeroing first, which was a twelfth of a small model's training step.
pub(crate) fn gemm_uninit(
    dims: [usize; 3],
    dst: &mut [MaybeUninit<f32>],
    a: (&[f32], usize, usize),
    b: (&[f32], usize, usize),
    threads: Threads,
) {
    assert!(dst.len() >= dims[0] * dims[1]);
    // SAFETY: `dst` holds m x n elements, which the product only writes.
    unsafe { product(dims, dst.as_mut_ptr().cast(), false, a, b, threads) }
}

/// A buffer of `len` uninitialised elements, for [`gemm_uninit`].
pub(crate) fn uninit(len: usize) -> Vec<MaybeUninit<f32>> {
    let mut buffer = Vec::with_capacity(len);
    // SAFETY: MaybeUninit elements need no initialisation.
    unsafe { buffer.set_len(len) };
    buffer
}

/// The buffer as f32s.
///
/// # Safety
/// Every element has been written (by [`gemm_uninit`] over the whole buffer).
pub(crate) unsafe fn assume_init(buffer: Vec<MaybeUninit<f32>>) -> Vec<f32> {
    let mut buffer = ManuallyDrop::new(buffer);
    // SAFETY: same allocation, layout and length; the caller vouches for the contents.
    unsafe { Vec::from_raw_parts(buffer.as_mut_ptr().cast(), buffer.len(), buffer.capacity()) }
}

/// # Safety
/// `dst` points to at least m x n writable elements (initialised when `accumulate`).
unsafe fn product(
    [m, n, k]: [usize; 3],
    dst: *mut f32,
    accumulate: bool,
    a: (&[f32], usize, usize),
    b: (&[f32], usize, usize),
    threads: Threads,
) {
    let last = |rows: usize, cols: usize, rs: usize, cs: usize| (rows.max(1) - 1) * rs + (cols.max(1) - 1) * cs;
    assert!(a.0.len() > last(m, k, a.1, a.2) && b.0.len() > last(k, n, b.1, b.2));
    let parallelism = match (threads, rayon::current_num_threads()) {
        (Threads::All, n) if n > 1 => gemm::Parallelism::Rayon(n),
        _ => gemm::Parallelism::None,
    };
    // SAFETY: the assert keeps every index of `a` and `b` inside their slices; the caller
    // vouches for `dst`.
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            dst,
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
