use fusellm_sdk::math::{ln, softmax_into};
use fusellm_sdk::{FusedTarget, FusionFn, FusionInput, Mixture, Params, PluginInfo, PluginKind};

/// Weights each candidate by the inverse entropy of its distribution at each position.
pub struct EntropyWeighted;

fusellm_sdk::params! { pub struct EntropyParams {
    /// added to each entropy before inverting
    eps: f64 = 0.1, min(1e-9);
} }

impl FusionFn for EntropyWeighted {
    fn info(&self) -> PluginInfo {
        PluginInfo::new(PluginKind::Fusion, "entropy_weighted", "0.1.0", "candidates weighted by inverse entropy")
            .params::<EntropyParams>()
    }

    fn fuse(&self, params: &Params, input: &FusionInput<'_>) -> Result<FusedTarget, String> {
        let EntropyParams { eps } = EntropyParams::read(params)?;
        let (mut out, mut mix, mut probs) =
            (FusedTarget::with_capacity(input.positions(), 0), Mixture::default(), Vec::new());
        for p in 0..input.positions() {
            mix.clear();
            for (ids, logits) in input.candidates.iter().map(|c| c.dist.row(p)) {
                softmax_into(logits, 1.0, &mut probs);
                let entropy: f64 = probs.iter().map(|&q| -q * ln(q.max(1e-300))).sum();
                mix.add(ids, &probs, 1.0 / (entropy + eps));
            }
            mix.push_normalised(&mut out);
        }
        Ok(out)
    }
}

fusellm_sdk::export_plugins!(fusion: [EntropyWeighted]);
