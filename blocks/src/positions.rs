//! Position information: rotary tables (RoPE), ALiBi slopes and biases, causal and padding
//! masks. All are constants built per forward pass; none needs a gradient.

use candle_core::{DType, Device, Result, Tensor};
use fusellm_sdk::adapter::RopeScaling;

/// A large negative score for masked keys: finite, so that a fully masked row (a padding
/// query) gives a uniform softmax instead of NaN.
const MASKED: f64 = -1e30;

/// `cos` and `sin` of `t * inv_freq_i` for positions `0..len`, each `[len, rot / 2]`,
/// times the scaling's attention factor, as transformers computes them (f32 inverse
/// frequencies; [`inverse_frequencies`]).
pub fn rope_tables(
    theta: f64,
    scaling: &RopeScaling,
    rot: usize,
    len: usize,
    device: &Device,
) -> Result<(Tensor, Tensor)> {
    let (inv_freq, factor) = inverse_frequencies(theta, scaling, rot, len);
    let inv_freq = Tensor::new(inv_freq.as_slice(), device)?;
    let positions = Tensor::arange(0u32, len as u32, device)?.to_dtype(DType::F32)?;
    let angles = positions.unsqueeze(1)?.broadcast_mul(&inv_freq.unsqueeze(0)?)?;
    match factor {
        1.0 => Ok((angles.cos()?, angles.sin()?)),
        f => Ok(((angles.cos()? * f as f64)?, (angles.sin()? * f as f64)?)),
    }
}

/// RoPE's inverse frequencies for a sequence of `len` positions (dynamic NTK and longrope
/// depend on it) and the factor that scales cos and sin, each kind as transformers'
/// `modeling_rope_utils` computes it in f32.
pub fn inverse_frequencies(theta: f64, scaling: &RopeScaling, rot: usize, len: usize) -> (Vec<f32>, f32) {
    let plain =
        |base: f32| -> Vec<f32> { (0..rot / 2).map(|i| 1.0 / base.powf(2.0 * i as f32 / rot as f32)).collect() };
    let base = theta as f32;
    match scaling {
        RopeScaling::None => (plain(base), 1.0),
        RopeScaling::Linear { factor } => (plain(base).iter().map(|f| f / *factor as f32).collect(), 1.0),
        RopeScaling::Dynamic { factor, original } if len > *original => {
            let (factor, rot) = (*factor as f32, rot as f32);
            let grown = base * ((factor * len as f32 / *original as f32) - (factor - 1.0)).powf(rot / (rot - 2.0));
            (plain(grown), 1.0)
        }
        RopeScaling::Dynamic { .. } => (plain(base), 1.0),
        RopeScaling::Llama3 { factor, low_freq_factor, high_freq_factor, original } => {
            let (factor, low, high, old) =
                (*factor as f32, *low_freq_factor as f32, *high_freq_factor as f32, *original as f32);
            let (low_wavelen, high_wavelen) = (old / low, old / high);
            let scaled = plain(base).into_iter().map(|f| {
                let wavelen = 2.0 * std::f32::consts::PI / f;
                let long = if wavelen > low_wavelen { f / factor } else { f };
                if wavelen < high_wavelen || wavelen > low_wavelen {
                    return long;
                }
                let smooth = (old / wavelen - low) / (high - low);
                (1.0 - smooth) * long / factor + smooth * long
            });
            (scaled.collect(), 1.0)
        }
        RopeScaling::LongRope { short_factor, long_factor, original, attention_factor } => {
            let factors = if len > *original { long_factor } else { short_factor };
            let freqs =
                factors.iter().enumerate().map(|(i, &e)| 1.0 / (e as f32 * base.powf((2 * i) as f32 / rot as f32)));
            (freqs.collect(), *attention_factor as f32)
        }
        RopeScaling::Yarn { factor, original, beta_fast, beta_slow, attention_factor, truncate } => {
            (yarn(base, rot, *factor as f32, *original, (*beta_fast, *beta_slow), *truncate), *attention_factor as f32)
        }
    }
}

/// YaRN's blend of interpolated (`/ factor`) and extrapolated frequencies over a linear
/// ramp between the correction dimensions of `beta_fast` and `beta_slow` rotations.
fn yarn(base: f32, rot: usize, factor: f32, original: usize, (fast, slow): (f64, f64), truncate: bool) -> Vec<f32> {
    let dim = rot as f64;
    let correction = |rotations: f64| {
        dim * (original as f64 / (rotations * 2.0 * std::f64::consts::PI)).ln() / (2.0 * (base as f64).ln())
    };
    let (mut low, mut high) = (correction(fast), correction(slow));
    if truncate {
        (low, high) = (low.floor(), high.ceil());
    }
    let (low, mut high) = (low.max(0.0) as f32, high.min(dim - 1.0) as f32);
    if low == high {
        high += 0.001;
    }
    (0..rot / 2)
        .map(|i| {
            let pos_freq = base.powf((2 * i) as f32 / rot as f32);
            let extrapolation = 1.0 - ((i as f32 - low) / (high - low)).clamp(0.0, 1.0);
            (1.0 / (factor * pos_freq)) * (1.0 - extrapolation) + (1.0 / pos_freq) * extrapolation
        })
        .collect()
}

/// MPT's ALiBi slopes (`gen_slopes` of modeling_mpt): 1 / 2^(k * max_bias / n) for
/// k = 1..n, n the next power of two, interleaved when n exceeds the head count.
pub fn alibi_slopes(heads: usize, max_bias: f64) -> Vec<f32> {
    let n = heads.next_power_of_two();
    let slopes: Vec<f32> = (1..=n).map(|k| 1.0 / 2f64.powf(k as f64 * max_bias / n as f64) as f32).collect();
    if n == heads {
        return slopes;
    }
    slopes.iter().skip(1).step_by(2).chain(slopes.iter().step_by(2)).copied().take(heads).collect()
}

/// ALiBi biases `[1, heads, t, t]`: `-(i - j) * slope_h` for query i and key j.
pub fn alibi_bias(slopes: &[f32], t: usize, device: &Device) -> Result<Tensor> {
    let pos = Tensor::arange(0u32, t as u32, device)?.to_dtype(DType::F32)?;
    let distance = pos.unsqueeze(0)?.broadcast_sub(&pos.unsqueeze(1)?)?; // j - i
    let slopes = Tensor::new(slopes, device)?.reshape((1, slopes.len(), 1, 1))?;
    distance.unsqueeze(0)?.unsqueeze(0)?.broadcast_mul(&slopes)
}

/// Additive attention mask `[b or 1, 1, t, t]`: causal, within a sliding `window` of
/// keys when given (key j visible from query i when i - window < j <= i), and with
/// `keep: [b, t]` (1 for real tokens, 0 for padding) also masking padded keys.
pub fn attention_mask(t: usize, keep: Option<&Tensor>, window: Option<usize>, device: &Device) -> Result<Tensor> {
    let hidden = |i: usize, j: usize| j > i || window.is_some_and(|w| i - j >= w);
    let causal: Vec<f32> = (0..t * t).map(|k| if hidden(k / t, k % t) { MASKED as f32 } else { 0.0 }).collect();
    let causal = Tensor::from_vec(causal, (1, 1, t, t), device)?;
    match keep {
        None => Ok(causal),
        Some(keep) => {
            let b = keep.dim(0)?;
            let padding = ((1.0 - keep.to_dtype(DType::F32)?)? * MASKED)?.reshape((b, 1, 1, t))?;
            causal.broadcast_add(&padding)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn alibi_slopes_match_mpt_for_power_of_two_and_other_head_counts() {
        assert_eq!(alibi_slopes(4, 8.0), vec![0.25, 0.0625, 0.015625, 0.00390625]);
        // n = 8 for 6 heads: odd-indexed slopes of the 8 first, then the even ones.
        let eight = alibi_slopes(8, 8.0);
        assert_eq!(alibi_slopes(6, 8.0), vec![eight[1], eight[3], eight[5], eight[7], eight[0], eight[2]]);
    }

    /// Each scaling's inverse frequencies (theta 1e4, 16 rotary dims) as transformers
    /// 5.24's `ROPE_INIT_FUNCTIONS` computes them, printed from there.
    #[test]
    fn rope_scalings_match_transformers() {
        let check = |scaling: RopeScaling, len: usize, want: [f32; 8], want_factor: f32| {
            let (got, factor) = inverse_frequencies(1e4, &scaling, 16, len);
            for (g, w) in got.iter().zip(want) {
                assert!((g - w).abs() <= 1e-6 * w, "{scaling:?}: {got:?} vs {want:?}");
            }
            assert!((factor - want_factor).abs() < 1e-4, "{scaling:?}: attention factor {factor}");
        };
        let linear = [0.25, 0.079_056_94, 0.025, 0.007_905_695, 0.0025, 0.00079056947, 0.000_25, 7.905_695e-5];
        check(RopeScaling::Linear { factor: 4.0 }, 100, linear, 1.0);
        let dynamic =
            [1.0, 0.28788307, 0.082_876_67, 0.023858791, 0.0068685426, 0.001_977_337, 0.000_569_241_9, 0.00016387513];
        check(RopeScaling::Dynamic { factor: 2.0, original: 4096 }, 6000, dynamic, 1.0);
        let (plain, _) = inverse_frequencies(1e4, &RopeScaling::None, 16, 100);
        assert_eq!(inverse_frequencies(1e4, &RopeScaling::Dynamic { factor: 2.0, original: 4096 }, 16, 4096).0, plain);
        let llama3 = [1.0, 0.31622776, 0.1, 0.031_622_78, 0.01, 0.0031622779, 0.00012935125, 9.882_118e-6];
        let scaling = RopeScaling::Llama3 { factor: 32.0, low_freq_factor: 1.0, high_freq_factor: 4.0, original: 8192 };
        check(scaling, 100, llama3, 1.0);
        let yarn = [1.0, 0.31622776, 0.081250004, 0.019764237, 0.004375, 0.00079056947, 0.000_25, 7.905_695e-5];
        let scaling = RopeScaling::Yarn {
            factor: 4.0,
            original: 1024,
            beta_fast: 32.0,
            beta_slow: 1.0,
            attention_factor: 0.1 * 4f64.ln() + 1.0,
            truncate: true,
        };
        check(scaling, 100, yarn, 1.1386);
    }

    #[test]
    fn masks_hide_future_and_padded_keys() -> Result<()> {
        let keep = Tensor::new(&[[1u8, 1, 0]], &Device::Cpu)?;
        let mask = attention_mask(3, Some(&keep), None, &Device::Cpu)?.squeeze(0)?.squeeze(0)?.to_vec2::<f32>()?;
        let hidden = |v: f32| v < -1e29;
        assert!(!hidden(mask[1][0]) && !hidden(mask[1][1]) && hidden(mask[1][2]) && hidden(mask[0][1]));
        assert!(hidden(mask[2][2]), "a padded key is hidden even from itself");
        Ok(())
    }
}
