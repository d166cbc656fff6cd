use fusellm_sdk::math::{exp, softmax_into};
use fusellm_sdk::{FusedTarget, FusionFn, FusionInput, Mixture, Params, PluginInfo, PluginKind};

use crate::candidates::{Pool, PoolParams};

fusellm_sdk::params! {
    /// How AvgCE weighs the candidates.
    pub struct Weighting {
        /// paper: softmax(exp(-CE)) as the paper's code (nearly uniform); softmax:
        /// softmax(-CE / tau)
        weights: Weights = Weights::Paper;
        /// temperature of weights = "softmax"
        tau: f64 = 1.0, min(1e-6);
    }
}

fusellm_sdk::choices! {
    /// How AvgCE turns the candidates' CE into weights.
    pub enum Weights {
        Paper = "paper",
        Softmax = "softmax",
    }
}

/// AvgCE: the average of the candidates' distributions weighted by their cross-entropy.
pub struct AvgCe;

impl FusionFn for AvgCe {
    fn info(&self) -> PluginInfo {
        PluginInfo::new(
            PluginKind::Fusion,
            "avg_ce",
            env!("CARGO_PKG_VERSION"),
            "average of the candidates' distributions weighted by their cross-entropy",
        )
        .params::<Weighting>()
        .params::<PoolParams>()
    }

    fn fuse(&self, params: &Params, input: &FusionInput<'_>) -> Result<FusedTarget, String> {
        let pool = Pool::new(params, input)?;
        let Weighting { weights, tau } = Weighting::read(params)?;
        let paper = weights == Weights::Paper;
        let positions = input.positions();
        let mut out = FusedTarget::with_capacity(positions, positions * 10);
        let (mut logits, mut weights, mut probs, mut mix) = (Vec::new(), Vec::new(), Vec::new(), Mixture::default());
        for p in 0..positions {
            // A source with no distribution here contributes the target's in its place, with
            // its own weight (the paper's collator); without the target it drops out and the
            // others' weights renormalise.
            let present: Vec<usize> = (0..pool.members.len()).filter(|&c| pool.row(c, p).is_some()).collect();
            logits.clear();
            logits.extend(present.iter().map(|&c| {
                let ce = pool.ce(c, p);
                (if paper { exp(-ce) } else { -ce / tau }) as f32
            }));
            softmax_into(&logits, 1.0, &mut weights);
            mix.clear();
            for (&c, &w) in present.iter().zip(&weights) {
                let (ids, values) = pool.row(c, p).expect("present members have a row");
                pool.probs(values, &mut probs)?;
                mix.add(ids, &probs, w);
            }
            mix.push_normalised(&mut out);
        }
        Ok(out)
    }
}
