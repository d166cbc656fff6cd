//! Weighted mixtures of sparse rows, the core of every averaging fusion function.

use crate::data::FusedTarget;

/// Accumulates `sum_c weight_c * p_c` over candidates' sparse rows, merging entries of the
/// same token id, in first-seen order (so results do not depend on hashing). Rows are
/// top-k sized, so a linear scan beats a map.
#[derive(Clone, Debug, Default)]
pub struct Mixture {
    entries: Vec<(u32, f64)>,
    total: f64,
}

impl Mixture {
    pub fn clear(&mut self) {
        self.entries.clear();
        self.total = 0.0;
    }

    /// Adds one candidate's row (`probs` summing to one, or less where the rest is left
    /// out) with `weight`; an empty row contributes nothing, its weight included.
    pub fn add(&mut self, ids: &[u32], probs: &[f64], weight: f64) {
        if ids.is_empty() {
            return;
        }
        self.total += weight;
        for (&id, &q) in ids.iter().zip(probs) {
            match self.entries.iter_mut().find(|(m, _)| *m == id) {
                Some((_, acc)) => *acc += weight * q,
                None => self.entries.push((id, weight * q)),
            }
        }
    }

    /// Appends the mixture, divided by the total weight, as the next row of `out`.
    pub fn push_normalised(&self, out: &mut FusedTarget) {
        out.ids.extend(self.entries.iter().map(|&(id, _)| id));
        out.values.extend(self.entries.iter().map(|&(_, q)| (q / self.total) as f32));
        out.end_row();
    }
}
