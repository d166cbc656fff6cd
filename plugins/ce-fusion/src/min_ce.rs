use fusellm_sdk::{FusedTarget, FusionFn, FusionInput, Params, PluginInfo, PluginKind};

use crate::candidates::{Pool, PoolParams};

/// MinCE: at each position, the distribution of the candidate with the lowest
/// cross-entropy (FuseLLM, eq. 5 with the minimum-CE fusion function).
pub struct MinCe;

impl FusionFn for MinCe {
    fn info(&self) -> PluginInfo {
        PluginInfo::new(
            PluginKind::Fusion,
            "min_ce",
            env!("CARGO_PKG_VERSION"),
            "the distribution of the candidate with the minimum cross-entropy; ties go to the target",
        )
        .params::<PoolParams>()
    }

    fn fuse(&self, params: &Params, input: &FusionInput<'_>) -> Result<FusedTarget, String> {
        let pool = Pool::new(params, input)?;
        let positions = input.positions();
        let mut out = FusedTarget::with_capacity(positions, positions * 10);
        let mut probs = Vec::new();
        for p in 0..positions {
            // The best candidate's row, or the target's where it has none (the paper); without
            // the target, the next candidate by rank that has one.
            let row = pool.ranked(p).into_iter().find_map(|c| pool.row(c, p));
            if let Some((ids, values)) = row {
                pool.probs(values, &mut probs)?;
                out.ids.extend_from_slice(ids);
                out.values.extend(probs.iter().map(|&x| x as f32));
            }
            out.end_row();
        }
        Ok(out)
    }
}
