//! `fusellm bench plugins`: the cost of one fusion call in each tier, on the shape the
//! paper trains on (2048 positions, 3 candidates, top-10), timed in one run so that the
//! ratios between tiers are measured under the same conditions.

use std::time::{Duration, Instant};

use fusellm_sdk::Params;

use super::conformance::{synthetic_input, Shape};
use super::{Entry, PluginError};

/// The paper's training shape.
pub const PAPER_SHAPE: Shape = Shape { positions: 2048, candidates: 3, top_k: 10, vocab: 32000, unaligned: 0.05 };

/// Median wall time of one fusion call over `iters` calls (after one warm-up call).
pub fn time_fusion(entry: &Entry, params: &Params, shape: Shape, iters: usize) -> Result<Duration, PluginError> {
    let input = synthetic_input(42, shape);
    let view = input.view();
    entry.fuse(params, &view)?;
    let mut times = Vec::with_capacity(iters);
    for _ in 0..iters.max(1) {
        let start = Instant::now();
        let out = entry.fuse(params, &view)?;
        times.push(start.elapsed());
        std::hint::black_box(out);
    }
    times.sort();
    Ok(times[times.len() / 2])
}
