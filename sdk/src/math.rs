//! Transcendental functions that give the same bits on every target.
//!
//! `f64::exp` calls the platform's libm natively but a compiled-in one on wasm32, so the
//! builtin, dylib and WASM forms of one plugin could differ in the last bit. Plugins that
//! want identical results across tiers use these (the pure-Rust `libm` crate everywhere).

#[inline]
pub fn exp(x: f64) -> f64 {
    libm::exp(x)
}

#[inline]
pub fn ln(x: f64) -> f64 {
    libm::log(x)
}

/// Softmax of `values / temperature`, written into `out`; the max is subtracted first so
/// that logits and log-probabilities give the same result (DESIGN.md, step 6).
pub fn softmax_into(values: &[f32], temperature: f64, out: &mut Vec<f64>) {
    out.clear();
    let max = values.iter().fold(f64::NEG_INFINITY, |m, &v| m.max(v as f64));
    if max == f64::NEG_INFINITY {
        // Every entry impossible: no entry is preferred over another.
        out.extend(values.iter().map(|_| 1.0 / values.len() as f64));
        return;
    }
    out.extend(values.iter().map(|&v| exp((v as f64 - max) / temperature)));
    let sum: f64 = out.iter().sum();
    out.iter_mut().for_each(|p| *p /= sum);
}
