//! Row kernels over f32 that the compiler vectorises: max, exp, log-sum-exp.
//!
//! The losses take the log-sum-exp of every row of logits, 32k-50k wide for real
//! vocabularies; with libm's scalar `exp` that was a fifth of a training step. Here `exp`
//! is branch-free (a polynomial and an exponent shift, as Cephes' `expf`) and the
//! reductions keep `LANES` independent accumulators, so each loop compiles to SIMD (of
//! AVX2 where the CPU has it: `simd_fn`).

use super::simd::simd_fn;

/// Independent accumulators per reduction: enough for the widest SIMD registers.
const LANES: usize = 16;
/// Elements summed in f32 lanes before the partial sum moves to f64: long rows keep f64
/// accuracy, short blocks keep f32 speed.
const BLOCK: usize = 256;

/// `e^x` within 2 ulp for the range of f32; 0 below -87.3, `f32::MAX`-ish above 88; NaN
/// stays NaN.
#[inline(always)]
pub fn exp(x: f32) -> f32 {
    const LOG2_E: f32 = std::f32::consts::LOG2_E;
    const LN2_HI: f32 = 0.693_359_4;
    const LN2_LO: f32 = -2.121_944_4e-4;
    // Adding 1.5 * 2^23 rounds to an integer held in the low mantissa bits.
    const SHIFTER: f32 = 12_582_912.0;
    const LOW: f32 = -87.336_55;
    let clamped = if x > 88.0 { 88.0 } else { x };
    let clamped = if clamped < LOW { LOW } else { clamped };
    let shifted = clamped * LOG2_E + SHIFTER;
    let n = shifted - SHIFTER;
    let r = clamped - n * LN2_HI - n * LN2_LO;
    let p = ((((1.987_569_1e-4 * r + 1.398_199_9e-3) * r + 8.333_452e-3) * r + 4.166_579_6e-2) * r + 1.666_666_5e-1)
        * r
        + 0.5;
    let p = p * r * r + r + 1.0;
    let scale = f32::from_bits((shifted.to_bits().wrapping_sub(SHIFTER.to_bits()).wrapping_add(127)) << 23);
    if x < LOW {
        0.0
    } else {
        p * scale
    }
}

simd_fn! {
    /// The largest element (NaN elements are skipped; an all-NaN or empty row gives -inf).
    pub fn max(row: &[f32]) -> f32 {
        max_of(row)
    }
}

simd_fn! {
    /// `sum_j e^((row_j - shift) * scale)`, in f64.
    pub fn exp_sum(row: &[f32], shift: f32, scale: f32) -> f64 {
        row.chunks(BLOCK)
            .map(|block| {
                let mut lanes = [0f32; LANES];
                let chunks = block.chunks_exact(LANES);
                let tail: f32 = chunks.remainder().iter().map(|&x| exp((x - shift) * scale)).sum();
                for chunk in chunks {
                    for (s, &x) in lanes.iter_mut().zip(chunk) {
                        *s += exp((x - shift) * scale);
                    }
                }
                lanes.iter().sum::<f32>() as f64 + tail as f64
            })
            .sum()
    }
}

simd_fn! {
    /// `row_j = coef * e^((row_j - shift) * scale)`.
    pub fn scaled_exp_in_place(row: &mut [f32], shift: f32, scale: f32, coef: f32) {
        row.iter_mut().for_each(|x| *x = coef * exp((*x - shift) * scale));
    }
}

simd_fn! {
    /// Softmax of `row` in place.
    pub fn softmax_in_place(row: &mut [f32]) {
        let max = max_of(row);
        let mut lanes = [0f32; LANES];
        let mut chunks = row.chunks_exact_mut(LANES);
        for chunk in &mut chunks {
            for (s, x) in lanes.iter_mut().zip(chunk) {
                *x = exp(*x - max);
                *s += *x;
            }
        }
        let mut sum: f32 = lanes.iter().sum();
        for x in chunks.into_remainder() {
            *x = exp(*x - max);
            sum += *x;
        }
        let inv = 1.0 / sum;
        row.iter_mut().for_each(|x| *x *= inv);
    }
}

#[inline(always)]
fn max_of(row: &[f32]) -> f32 {
    let mut lanes = [f32::NEG_INFINITY; LANES];
    let chunks = row.chunks_exact(LANES);
    let tail = chunks.remainder();
    for chunk in chunks {
        for (m, &x) in lanes.iter_mut().zip(chunk) {
            *m = if x > *m { x } else { *m };
        }
    }
    tail.iter().chain(&lanes).fold(f32::NEG_INFINITY, |m, &x| if x > m { x } else { m })
}

/// `log sum_j e^(row_j * scale)` (`scale > 0`).
pub fn log_sum_exp(row: &[f32], scale: f32) -> f32 {
    let max = max(row);
    if max == f32::NEG_INFINITY {
        return max;
    }
    max * scale + exp_sum(row, max, scale).ln() as f32
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exp_is_within_two_ulp_of_libm_over_the_f32_range() {
        let mut worst = 0f64;
        let mut x = -87.0f32;
        while x < 88.0 {
            let (fast, exact) = (exp(x) as f64, (x as f64).exp());
            worst = worst.max((fast - exact).abs() / exact);
            x += 0.0137;
        }
        assert!(worst < 2.5e-7, "worst relative error {worst}");
        assert_eq!(exp(-1e30), 0.0);
        assert_eq!(exp(f32::NEG_INFINITY), 0.0);
        assert!(exp(f32::NAN).is_nan());
        assert!(exp(1e30).is_finite() && exp(1e30) > 1e38);
    }

    #[test]
    fn log_sum_exp_matches_f64_on_a_wide_row_and_propagates_nan() {
        let row: Vec<f32> = (0..32_003).map(|i| ((i * 7919) % 1000) as f32 / 37.0 - 10.0).collect();
        let exact = {
            let m = row.iter().copied().fold(f32::MIN, f32::max) as f64;
            m + row.iter().map(|&x| (x as f64 - m).exp()).sum::<f64>().ln()
        };
        assert!((log_sum_exp(&row, 1.0) as f64 - exact).abs() < 1e-5 * exact.abs());
        let halved = log_sum_exp(&row.iter().map(|x| x * 0.5).collect::<Vec<_>>(), 1.0);
        assert!((log_sum_exp(&row, 0.5) - halved).abs() < 1e-5);
        let mut bad = row.clone();
        bad[17] = f32::NAN;
        assert!(log_sum_exp(&bad, 1.0).is_nan());
        assert_eq!(max(&[]), f32::NEG_INFINITY);
    }
}
