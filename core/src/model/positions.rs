//! Position information: rotary tables (RoPE), ALiBi slopes and biases, causal and padding
//! masks. All are constants built per forward pass; none needs a gradient.

use candle_core::{DType, Device, Result, Tensor};

/// A large negative score for masked keys: finite, so that a fully masked row (a padding
/// query) gives a uniform softmax instead of NaN.
const MASKED: f64 = -1e30;

/// `cos` and `sin` of `t * theta^(-2i/rot)` for positions `0..len`, each `[len, rot / 2]`,
/// as transformers computes them (f32 inverse frequencies).
pub fn rope_tables(theta: f64, rot: usize, len: usize, device: &Device) -> Result<(Tensor, Tensor)> {
    let inv_freq: Vec<f32> = (0..rot / 2).map(|i| 1.0 / (theta as f32).powf(2.0 * i as f32 / rot as f32)).collect();
    let inv_freq = Tensor::new(inv_freq.as_slice(), device)?;
    let positions = Tensor::arange(0u32, len as u32, device)?.to_dtype(DType::F32)?;
    let angles = positions.unsqueeze(1)?.broadcast_mul(&inv_freq.unsqueeze(0)?)?;
    Ok((angles.cos()?, angles.sin()?))
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

/// Additive attention mask `[b or 1, 1, t, t]`: causal, and with `keep: [b, t]` (1 for
/// real tokens, 0 for padding) also masking padded keys.
pub fn attention_mask(t: usize, keep: Option<&Tensor>, device: &Device) -> Result<Tensor> {
    let causal: Vec<f32> = (0..t * t).map(|k| if k % t > k / t { MASKED as f32 } else { 0.0 }).collect();
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

    #[test]
    fn masks_hide_future_and_padded_keys() -> Result<()> {
        let keep = Tensor::new(&[[1u8, 1, 0]], &Device::Cpu)?;
        let mask = attention_mask(3, Some(&keep), &Device::Cpu)?.squeeze(0)?.squeeze(0)?.to_vec2::<f32>()?;
        let hidden = |v: f32| v < -1e29;
        assert!(!hidden(mask[1][0]) && !hidden(mask[1][1]) && hidden(mask[1][2]) && hidden(mask[0][1]));
        assert!(hidden(mask[2][2]), "a padded key is hidden even from itself");
        Ok(())
    }
}
