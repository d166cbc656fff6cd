use fusellm_sdk::math::{ln, softmax_into};
use fusellm_sdk::{FusedTarget, FusionFn, FusionInput, Mixture, ParamSpec, Params, PluginInfo, PluginKind};

/// At each position, weights each candidate by the inverse entropy of its distribution:
/// a confident source counts more than an unsure one.
pub struct EntropyWeighted;

impl FusionFn for EntropyWeighted {
    fn info(&self) -> PluginInfo {
        PluginInfo::new(PluginKind::Fusion, "entropy_weighted", "0.1.0", "candidates weighted by inverse entropy")
            .param(ParamSpec::float("eps", 0.1, "added to each entropy before inverting").range(Some(1e-9), None))
    }

    fn fuse(&self, params: &Params, input: &FusionInput<'_>) -> Result<FusedTarget, String> {
        let mut out = FusedTarget::with_capacity(input.positions(), 0);
        let (mut mix, mut probs) = (Mixture::default(), Vec::new());
        for p in 0..input.positions() {
            mix.clear();
            for candidate in &input.candidates {
                let (ids, logits) = candidate.dist.row(p);
                softmax_into(logits, 1.0, &mut probs);
                let entropy: f64 = probs.iter().map(|&q| -q * ln(q.max(1e-300))).sum();
                mix.add(ids, &probs, 1.0 / (entropy + params.float("eps")));
            }
            mix.push_normalised(&mut out);
        }
        Ok(out)
    }
}

fusellm_sdk::export_plugins!(fusion: [EntropyWeighted]);
